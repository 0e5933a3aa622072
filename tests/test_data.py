"""Tests of data.py: folder and RecordIO training sets, subset, pair sets, loaders, bad input."""
from __future__ import annotations

import io
import logging
import pickle
import shutil
from argparse import Namespace
from pathlib import Path

import cv2
import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from PIL import Image
from skimage import data as skimage_data
from torch.utils.data import DataLoader, Dataset

from data import (BadSampleError, DataModule, ImageFolderFaceDataset, MissingPairSetsError,
                  RecordFaceDataset, TrainDataError, ValidationPairDataset, load_subset_index,
                  subset_positions, worker_init_fn)
from tests.reference_image import published_input
from utils.demo_data import generate_demo_data
from utils.image import decode_image_bytes, encode_jpeg, rgb_to_tensor, to_input
from utils.pairsets import VAL_SET_NAMES, write_pair_bin
from utils.recordio import write_face_pack

TINY = dict(num_train_ids=4, imgs_per_id=6, num_val_ids=5, pairs_per_set=4, show_progress=False)


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    """A tiny demo set (24 training images of 4 identities, five pair sets of 4 pairs)."""
    return generate_demo_data(tmp_path_factory.mktemp("data") / "demo", seed=1, **TINY)["root"]


def _module(root: Path, **kwargs) -> DataModule:
    args = dict(data_root=root, train_data_path=".", val_data_path=".", batch_size=4,
                num_workers=0, output_dir=None, label_cache_dir=root / "label_cache")
    args.update(kwargs)
    return DataModule(**args)


def _copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ----------------------------------------------------------------------------------------------
# Both training paths
# ----------------------------------------------------------------------------------------------
def test_folder_and_record_paths_give_identical_tensors(demo):
    folder_dm, rec_dm = _module(demo), _module(demo, use_mxrecord=True)
    folder_dm.setup("fit")
    rec_dm.setup("fit")
    folder, rec = folder_dm.train_dataset, rec_dm.train_dataset
    assert isinstance(folder, ImageFolderFaceDataset) and isinstance(rec, RecordFaceDataset)
    assert folder_dm.num_classes == rec_dm.num_classes == 4
    assert len(folder) == len(rec) == 24
    folder.random_flip = rec.random_flip = False
    for i in range(len(folder)):
        (a, la), (b, lb) = folder[i], rec[i]
        assert la == lb == i // 6
        assert a.shape == (3, 112, 112) and a.dtype == torch.float32
        assert torch.equal(a, b)
        assert torch.equal(a, rgb_to_tensor(decode_image_bytes(folder.path_of(i).read_bytes())))


def test_folder_order_and_labels_match_torchvision_imagefolder(demo, tmp_path):
    from torchvision.datasets import ImageFolder
    root = _copy_tree(demo / "imgs", tmp_path / "imgs")
    jpeg = next((root / "0").iterdir()).read_bytes()
    (root / "10" / "sub").mkdir(parents=True)   # "10" sorts before "2"; nested images count
    for rel in ("10/2.jpg", "10/10.jpg", "10/sub/1.JPG", "2/9.png"):
        (root / rel).write_bytes(jpeg)
    ours = ImageFolderFaceDataset(root)
    reference = ImageFolder(str(root))
    assert [str(ours.path_of(i)) for i in range(len(ours))] == [p for p, _ in reference.samples]
    assert ours.labels.tolist() == reference.targets
    assert ours.identity_names == reference.classes


def test_flip_and_swap_color_channel(demo):
    dm = _module(demo)
    dm.setup("fit")
    ds = dm.train_dataset
    ds.random_flip = False
    plain = ds[3][0]
    ds.random_flip = True
    torch.manual_seed(0)
    seen = {torch.equal(ds[3][0], plain) for _ in range(20)}
    torch.manual_seed(0)
    flipped = [t for t in (ds[3][0] for _ in range(20)) if not torch.equal(t, plain)]
    assert seen == {True, False}
    assert torch.equal(flipped[0], torch.flip(plain, dims=[2]))
    swapped = _module(demo, swap_color_channel=True)
    swapped.setup("fit")
    swapped.train_dataset.random_flip = False
    assert torch.equal(swapped.train_dataset[3][0], torch.flip(plain, dims=[0]))


def test_augmentation_is_applied_with_the_configured_probabilities(demo):
    dm = _module(demo, crop_augmentation_prob=1.0)
    dm.setup("fit")
    ds = dm.train_dataset
    ds.random_flip = False
    x, _ = ds[0]
    black = (x == -1.0).all(dim=0)          # pixel value 0 -> -1 in every channel
    assert black.any() and not black.all()
    assert dm.train_dataset.augmenter.crop_augmentation_prob == 1.0


def test_real_photo_same_tensor_through_every_path(tmp_path):
    crop = skimage_data.astronaut()[40:200, 150:300]
    face = cv2.resize(crop, (112, 112), interpolation=cv2.INTER_AREA)
    jpeg = encode_jpeg(face)
    # 1. image folder (5 copies so that the identity is a valid one)
    folder = tmp_path / "ds" / "imgs" / "0"
    folder.mkdir(parents=True)
    for k in range(5):
        (folder / f"{k}.jpg").write_bytes(jpeg)
    # 2. RecordIO pack
    write_face_pack(tmp_path / "ds" / "train.rec", [(0, jpeg)] * 5)
    # 3. .bin -> memfile (all five sets, so the pair-set dataset opens)
    for name in VAL_SET_NAMES:
        write_pair_bin(tmp_path / "ds" / f"{name}.bin", [jpeg, jpeg], [True])
    common = dict(data_root=tmp_path, train_data_path="ds", val_data_path="ds", batch_size=2,
                  num_workers=0, output_dir=tmp_path / "out", label_cache_dir=tmp_path / "c")
    tensors = []
    for use_mxrecord in (False, True):
        dm = DataModule(use_mxrecord=use_mxrecord, **common)
        dm.setup("fit")
        dm.train_dataset.random_flip = False
        tensors.append(dm.train_dataset[2][0])
    tensors.append(dm.val_dataset[9][0])         # the pair-set path (.bin converted on the fly)
    tensors.append(to_input(Image.open(io.BytesIO(jpeg)))[0])   # inference's to_input
    for t in tensors[1:]:
        assert torch.equal(t, tensors[0])
    # it is the BGR [-1, 1] input of the decoded photo, and not the RGB one
    rgb = decode_image_bytes(jpeg)
    expected = torch.from_numpy(published_input(rgb)).float()
    assert torch.allclose(tensors[0], expected, atol=1e-6)
    assert not torch.allclose(tensors[0], torch.flip(expected, dims=[0]), atol=1e-2)
    # the saved training sample is in true colours
    saved = np.asarray(Image.open(tmp_path / "out" / "training_samples" / "sample.jpg"))
    assert np.abs(saved.astype(int) - rgb).mean() < 3


# ----------------------------------------------------------------------------------------------
# Subset
# ----------------------------------------------------------------------------------------------
def test_subset_positions_reference():
    labels = np.repeat([0, 1, 2, 3], 6)
    # identity 0: 6 chosen, 1: 4 (dropped), 2: 5, 3: 1 (dropped)
    subset = np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 13, 14, 15, 16, 23])
    positions, new_labels, old_of_new = subset_positions(labels, subset)
    assert positions.tolist() == [0, 1, 2, 3, 4, 5, 12, 13, 14, 15, 16]
    assert new_labels.tolist() == [0] * 6 + [1] * 5
    assert old_of_new.tolist() == [0, 2]
    with pytest.raises(TrainDataError, match="out of range"):
        subset_positions(labels, np.array([0, 24]), source="idx.txt")


@pytest.mark.parametrize("use_mxrecord", [False, True])
@pytest.mark.parametrize("fmt", ["txt", "npy"])
def test_train_data_subset(demo, tmp_path, use_mxrecord, fmt):
    subset = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 13, 14, 15, 16, 23]
    path = tmp_path / f"subset.{fmt}"
    if fmt == "npy":
        np.save(path, np.array(subset))
    else:
        path.write_text(",".join(map(str, subset)))
    full = _module(demo, use_mxrecord=use_mxrecord)
    full.setup("fit")
    dm = _module(demo, use_mxrecord=use_mxrecord, train_data_subset=True,
                 train_data_subset_path=path)
    assert dm.num_classes == 2                       # builds the training set on demand
    ds = dm.train_dataset
    assert len(ds) == 11 and ds.labels.tolist() == [0] * 6 + [1] * 5
    full.train_dataset.random_flip = ds.random_flip = False
    for new_pos, old_pos in enumerate([0, 1, 2, 3, 4, 5, 12, 13, 14, 15, 16]):
        assert torch.equal(ds[new_pos][0], full.train_dataset[old_pos][0])
    assert ds.identity_names == [full.train_dataset.identity_names[0],
                                 full.train_dataset.identity_names[2]]


def test_subset_file_errors(tmp_path, demo):
    bad = tmp_path / "bad.txt"
    bad.write_text("1, 2, x")
    with pytest.raises(TrainDataError, match="bad.txt"):
        load_subset_index(bad)
    with pytest.raises(TrainDataError, match="not found"):
        load_subset_index(tmp_path / "none.txt")
    dm = _module(demo, train_data_subset=True, train_data_subset_path=tmp_path / "none.txt")
    with pytest.raises(TrainDataError, match="none.txt"):
        dm.setup("fit")


# ----------------------------------------------------------------------------------------------
# Validation pair sets
# ----------------------------------------------------------------------------------------------
def test_validation_items_and_loader_order(demo):
    dm = _module(demo, val_batch_size=7)
    dm.setup("validate")
    ds = dm.val_dataset
    assert len(ds) == 5 * 8 and dm.val_set_names == VAL_SET_NAMES
    seen = []
    for images, issame, set_index, index in dm.val_dataloader():
        assert images.shape[1:] == (3, 112, 112) and images.dtype == torch.float32
        seen += index.tolist()
        for i, same, k in zip(index.tolist(), issame.tolist(), set_index.tolist()):
            assert k == i // 8
            assert same == bool(ds.issame(k)[(i % 8) // 2])
    assert seen == list(range(40))
    x, same, k, i = ds[13]
    memmap = np.memmap(demo / "cfp_fp" / "memfile" / "mem_file.dat", dtype=np.float32,
                       mode="r", shape=(8, 3, 112, 112))
    assert torch.equal(x, torch.from_numpy(np.array(memmap[5]))) and k == 1 and i == 13
    dm.setup("test")
    assert [t[3].tolist() for t in dm.test_dataloader()][0][:3] == [0, 1, 2]


def test_missing_pair_sets_listed_and_bin_converted(demo, tmp_path):
    root = _copy_tree(demo, tmp_path / "copy")
    shutil.rmtree(root / "lfw")                      # memfile gone, .bin kept -> converted
    for name in ("cplfw", "calfw"):                  # both gone -> reported together
        shutil.rmtree(root / name)
        (root / f"{name}.bin").unlink()
    dm = _module(root)
    with pytest.raises(MissingPairSetsError) as err:
        dm.setup("validate")
    message = str(err.value)
    assert "pair set(s) cplfw, calfw:" in message
    assert str(root / "<set>.bin") in message
    dm = _module(root, val_set_names=("agedb_30", "lfw"))
    dm.prepare_data()
    dm.setup("validate")
    assert (root / "lfw" / "memfile" / "mem_file.dat").is_file()
    assert len(dm.val_dataset) == 16 and dm.val_dataset[9][2] == 1


def test_validation_dataset_survives_pickling(demo):
    ds = ValidationPairDataset(demo)
    _ = ds[0]
    clone = pickle.loads(pickle.dumps(ds))
    assert clone._memmaps is None and torch.equal(clone[17][0], ds[17][0])


# ----------------------------------------------------------------------------------------------
# DataLoader
# ----------------------------------------------------------------------------------------------
def test_train_loader_with_two_workers_is_seeded_and_complete(demo):
    def first_epoch(seed):
        dm = _module(demo, num_workers=2, batch_size=5, seed=seed,
                     crop_augmentation_prob=0.5, low_res_augmentation_prob=0.5,
                     photometric_augmentation_prob=0.5)
        loader = dm.train_dataloader()
        assert loader.persistent_workers and loader.drop_last
        batches = list(loader)
        return torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])

    images, labels = first_epoch(seed=5)
    assert images.shape == (20, 3, 112, 112) and labels.shape == (20,)   # 24 -> 4 full batches
    assert set(labels.tolist()) <= {0, 1, 2, 3}
    again, labels_again = first_epoch(seed=5)
    assert torch.equal(images, again) and torch.equal(labels, labels_again)
    other, _ = first_epoch(seed=6)
    assert not torch.equal(images, other)


class _NumpyDraw(Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, index):
        return torch.tensor(np.random.random())


def test_worker_init_fn_gives_each_worker_its_own_numpy_stream():
    loader = DataLoader(_NumpyDraw(), batch_size=1, num_workers=2, worker_init_fn=worker_init_fn)
    draws = [float(x) for x in loader]
    # items 0, 2 come from worker 0 and 1, 3 from worker 1: the first draw of each worker differs
    assert draws[0] != draws[1]


# ----------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------
def test_wrong_image_size_names_the_file(demo, tmp_path):
    root = _copy_tree(demo, tmp_path / "copy")
    bad = sorted((root / "imgs" / "1").iterdir())[2]
    bad.write_bytes(encode_jpeg(np.zeros((100, 90, 3), np.uint8)))
    dm = _module(root)
    dm.setup("fit")
    position = [dm.train_dataset.path_of(i) for i in range(24)].index(bad)
    with pytest.raises(BadSampleError, match=f"{bad}.*112x112.*\\(100, 90, 3\\)"):
        dm.train_dataset[position]


def test_first_sample_is_checked_at_setup(demo, tmp_path):
    root = _copy_tree(demo, tmp_path / "copy")
    first = sorted((root / "imgs" / "0").iterdir())[0]
    first.write_bytes(encode_jpeg(np.zeros((64, 64, 3), np.uint8)))
    with pytest.raises(BadSampleError, match=str(first)):
        _module(root).setup("fit")


def test_empty_identity_folder_and_non_image_file_are_named(demo, tmp_path):
    root = _copy_tree(demo, tmp_path / "copy")
    (root / "imgs" / "9_empty").mkdir()
    (root / "imgs" / "2" / "notes.txt").write_text("hello")
    (root / "imgs" / "2" / ".DS_Store").write_text("ignored")
    with pytest.raises(TrainDataError) as err:
        _module(root).setup("fit")
    message = str(err.value)
    assert str(root / "imgs" / "9_empty") in message
    assert str(root / "imgs" / "2" / "notes.txt") in message
    assert ".DS_Store" not in message


def test_missing_training_data_is_named(tmp_path, demo):
    with pytest.raises(TrainDataError, match="nowhere"):
        _module(tmp_path, train_data_path="nowhere").setup("fit")
    with pytest.raises(TrainDataError, match="train.rec"):
        _module(tmp_path, train_data_path=".", use_mxrecord=True).setup("fit")
    root = tmp_path / "rec_only"
    root.mkdir()
    shutil.copy(demo / "train.rec", root)
    shutil.copy(demo / "train.idx", root)
    with pytest.raises(TrainDataError, match="--use_mxrecord"):
        _module(root).setup("fit")


def _corrupt(data: bytes) -> bytes:
    return data[:200] + b"\x00" * 50   # header kept, image data gone


def test_corrupt_jpeg_in_folder_raises_or_is_skipped(demo, tmp_path, caplog):
    root = _copy_tree(demo, tmp_path / "copy")
    bad = sorted((root / "imgs" / "3").iterdir())[1]
    bad.write_bytes(b"this is not a jpeg")
    dm = _module(root)
    dm.setup("fit")
    position = [dm.train_dataset.path_of(i) for i in range(24)].index(bad)
    with pytest.raises(BadSampleError, match=str(bad)) as refused:
        dm.train_dataset[position]
    assert "pass --skip_corrupt_images" in str(refused.value)  # says what to do
    skipping = _module(root, skip_corrupt_images=True)
    skipping.setup("fit")
    with caplog.at_level(logging.WARNING, logger="data"):
        for _ in range(3):
            x, label = skipping.train_dataset[position]
            assert x.shape == (3, 112, 112) and 0 <= label < 4
    assert skipping.num_skipped_images == 3
    assert str(bad) in caplog.text


def test_corrupt_jpeg_in_pack_raises_or_is_skipped_across_workers(tmp_path):
    good = encode_jpeg(np.full((112, 112, 3), 90, np.uint8))
    samples = [(0, good)] * 3 + [(1, good), (1, _corrupt(good)), (1, good)]
    (tmp_path / "p").mkdir()
    write_face_pack(tmp_path / "p" / "train.rec", samples)
    dm = DataModule(data_root=tmp_path, train_data_path="p", val_data_path="p", batch_size=3,
                    num_workers=0, use_mxrecord=True, output_dir=None,
                    label_cache_dir=tmp_path / "c")
    assert dm.num_classes == 2                         # builds the training set only
    with pytest.raises(BadSampleError, match="train.rec: key 5"):
        dm.train_dataset[4]
    dm = DataModule(data_root=tmp_path, train_data_path="p", val_data_path="p", batch_size=3,
                    num_workers=2, use_mxrecord=True, output_dir=None, skip_corrupt_images=True,
                    label_cache_dir=tmp_path / "c", seed=0)
    loader = dm.train_dataloader()
    for _ in range(2):                                 # two epochs: the bad key is met twice
        assert sum(len(labels) for _, labels in loader) == 6
    assert dm.num_skipped_images == 2                  # counted in the workers, seen here


def test_bad_arguments():
    with pytest.raises(ValueError, match="probability"):
        DataModule(data_root=".", train_data_path=".", val_data_path=".", batch_size=2,
                   crop_augmentation_prob=2.0)
    with pytest.raises(ValueError, match="batch_size"):
        DataModule(data_root=".", train_data_path=".", val_data_path=".", batch_size=0)


def test_from_args_ignores_other_flags(demo):
    args = Namespace(data_root=str(demo), train_data_path=".", val_data_path=".", batch_size=3,
                     num_workers=0, arch="ir_18", lr=0.1, use_mxrecord=True, output_dir=None)
    dm = DataModule.from_args(args, label_cache_dir=demo / "label_cache")
    assert dm.use_mxrecord and dm.batch_size == 3 and dm.num_classes == 4


class _Probe(pl.LightningModule):
    """Records what Lightning feeds it from the DataModule."""

    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(3, 1)
        self.train_batches, self.val_batches = [], []

    def training_step(self, batch, batch_idx):
        images, labels = batch
        self.train_batches.append((images.shape, labels.dtype))
        return self.layer(images.mean(dim=(2, 3))).mean()

    def validation_step(self, batch, batch_idx):
        images, issame, set_index, index = batch
        self.val_batches.append((images.shape, issame.dtype, set_index.tolist(), index.tolist()))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_lightning_trainer_drives_the_datamodule(demo, tmp_path):
    dm = _module(demo, batch_size=4, val_batch_size=8, output_dir=tmp_path)
    probe = _Probe()
    trainer = pl.Trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=2,
                         num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path, accelerator="cpu", devices=1)
    trainer.fit(probe, datamodule=dm)
    assert probe.train_batches == [(torch.Size([4, 3, 112, 112]), torch.int64)] * 2
    assert [b[3] for b in probe.val_batches] == [list(range(8)), list(range(8, 16))]
    assert probe.val_batches[1][2] == [1] * 8 and probe.val_batches[0][1] == torch.bool
    assert (tmp_path / "training_samples" / "sample.jpg").is_file()
