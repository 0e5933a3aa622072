"""Exact resume: a run killed (SIGKILL) and resumed from last.ckpt or last_step.ckpt ends with the
weights and metrics of the uninterrupted run; last.ckpt is the end-of-run state; the training order
and augmentations depend on (seed, epoch, sample index) only."""
from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

import main as main_module
from data import DataModule, EpochSampler
from utils.demo_data import generate_demo_data

REPO = Path(__file__).resolve().parent.parent

# 16 images at batch 4: 4 steps per epoch; with <= 4 epochs validation runs after every step
# (val_check_interval 0.1, as published), so the kill lands between validations.
EPOCHS, STEPS_PER_EPOCH, KILL_AT_STEP, EVERY_N_STEPS = 3, 4, 10, 5

# Runs main.main in a fresh process like the in-process runs (one thread, deterministic
# algorithms) and SIGKILLs it at the start of the batch after global step K.
KILLER = """
import os, signal, sys
import torch
torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)
sys.path.insert(0, {repo!r})
import pytorch_lightning as pl
import main

K = int(sys.argv[1])

class Kill(pl.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step >= K:
            os.kill(os.getpid(), signal.SIGKILL)

build_trainer = main.build_trainer
main.build_trainer = lambda args, callbacks, loggers: build_trainer(args, [*callbacks, Kill()], loggers)
sys.exit(main.main(sys.argv[2:]))
"""


@pytest.fixture(scope="module")
def deterministic(single_torch_thread):
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(before)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("resume_data")
    generate_demo_data(root, seed=5, num_train_ids=4, imgs_per_id=4, num_val_ids=4, pairs_per_set=2,
                       show_progress=False)
    return root


def _argv(data: Path, out: Path, *extra: str) -> list:
    return ["--data_root", str(data), "--train_data_path", ".", "--val_data_path", ".", "--gpus", "0",
            "--arch", "ir_tiny", "--batch_size", "4", "--num_workers", "0", "--output_dir", str(out),
            "--epochs", str(EPOCHS), "--seed", "11", "--crop_augmentation_prob", "0.5",
            "--photometric_augmentation_prob", "0.5", "--low_res_augmentation_prob", "0.5", *extra]


def _load(path: Path) -> dict:
    # weights_only: everything a checkpoint holds must be plain types
    return torch.load(path, map_location="cpu", weights_only=True)


def _metrics(out: Path) -> dict:
    """Last logged value of every metric in the newest CSV log of a run."""
    files = sorted(out.glob("result/version_*/metrics.csv"), key=lambda p: int(p.parent.name[8:]))
    values: dict = {}
    with open(files[-1]) as f:
        for row in csv.DictReader(f):
            values.update({k: float(v) for k, v in row.items() if v not in ("", None)})
    return values


def _assert_same_final_state(out: Path, reference: Path, keys=("test_acc", "val_acc")) -> None:
    got, want = _load(out / "last.ckpt"), _load(reference / "last.ckpt")
    assert got["global_step"] == want["global_step"] == EPOCHS * STEPS_PER_EPOCH
    assert got["epoch"] == want["epoch"]
    assert got["state_dict"].keys() == want["state_dict"].keys()
    for key, value in want["state_dict"].items():
        assert torch.equal(got["state_dict"][key], value), key
    for i, state in want["optimizer_states"][0]["state"].items():
        assert torch.equal(got["optimizer_states"][0]["state"][i]["momentum_buffer"], state["momentum_buffer"])
    metrics, expected = _metrics(out), _metrics(reference)
    names = [k for k in expected if k.endswith("_test_acc") or k in keys]
    assert len(names) >= 7
    for name in names:
        assert metrics[name] == expected[name], name


@pytest.fixture(scope="module")
def reference(tiny, tmp_path_factory, deterministic) -> Path:
    """The uninterrupted 3-epoch run."""
    out = tmp_path_factory.mktemp("reference") / "run"
    assert main_module.main(_argv(tiny, out)) == 0
    return out


@pytest.fixture(scope="module")
def killed(tiny, tmp_path_factory, deterministic) -> tuple:
    """The same run, with --save_every_n_steps, SIGKILLed in epoch 2 after step 10; returns
    (its output folder, a copy of it to restore before each resume)."""
    base = tmp_path_factory.mktemp("killed")
    out, script = base / "run", base / "killer.py"
    script.write_text(KILLER.format(repo=str(REPO)))
    cmd = [sys.executable, str(script), str(KILL_AT_STEP),
           *_argv(tiny, out, "--save_every_n_steps", str(EVERY_N_STEPS))]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == -9, proc.stderr[-3000:]
    shutil.copytree(out, base / "snapshot")
    return out, base / "snapshot"


def _restore(killed: tuple) -> Path:
    out, snapshot = killed
    shutil.rmtree(out)
    shutil.copytree(snapshot, out)
    return out


def test_killed_run_resumed_from_last_ckpt_ends_bit_identical(tiny, reference, killed):
    out = _restore(killed)
    # killed in epoch 2: last.ckpt is the end of epoch 1, not a later validation's state
    assert _load(out / "last.ckpt")["global_step"] == 2 * STEPS_PER_EPOCH
    assert main_module.main(_argv(tiny, out, "--resume_from_checkpoint", str(out / "last.ckpt"))) == 0
    _assert_same_final_state(out, reference, keys=("test_acc", "val_acc", "train_loss_epoch"))


def test_mid_epoch_resume_from_step_checkpoint_with_workers_ends_bit_identical(tiny, reference, killed):
    out = _restore(killed)
    step = _load(out / "last_step.ckpt")
    assert step["global_step"] == 2 * EVERY_N_STEPS   # mid-epoch 2, after that step's validation
    # resumed with DataLoader workers (persistent, prefetching): same batches, same augmentations
    argv = _argv(tiny, out, "--resume_from_checkpoint", str(out / "last_step.ckpt"),
                 "--save_every_n_steps", str(EVERY_N_STEPS), "--num_workers", "2")
    assert main_module.main(argv) == 0
    # (the epoch mean of the training loss covers only the batches after a mid-epoch resume)
    _assert_same_final_state(out, reference)


def test_last_ckpt_is_the_end_of_a_run_and_resuming_it_equals_the_longer_run(tiny, reference, tmp_path,
                                                                            deterministic):
    out = tmp_path / "run"
    assert main_module.main(_argv(tiny, out, "--epochs", "1")) == 0
    # validation ran after every step and the best checkpoint is another file: last.ckpt is step 4
    assert _load(out / "last.ckpt")["global_step"] == STEPS_PER_EPOCH
    assert main_module.main(_argv(tiny, out, "--resume_from_checkpoint", str(out / "last.ckpt"))) == 0
    _assert_same_final_state(out, reference, keys=("val_acc", "train_loss_epoch"))


class _Keyed(torch.utils.data.Dataset):
    """The training set's items with their sample index."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        image, label = self.dataset[key]
        return image, label, key[0]


def _items(dm: DataModule, sampler: EpochSampler, num_workers: int) -> list:
    """Each batch as {sample index: image tensor}."""
    loader = DataLoader(_Keyed(dm.train_dataset), batch_size=sampler.batch_size, sampler=sampler,
                        num_workers=num_workers, drop_last=sampler.drop_last)
    batches = []
    for images, labels, indices in loader:
        assert labels.tolist() == [int(dm.train_dataset.labels[i]) for i in indices]
        batches.append(dict(zip(indices.tolist(), images)))
    return batches


def _same(a: list, b: list) -> bool:
    return [list(x) for x in a] == [list(x) for x in b] and all(
        torch.equal(x[i], y[i]) for x, y in zip(a, b) for i in x)


def test_order_and_augmentation_depend_on_seed_epoch_and_index_only(tiny):
    dm = DataModule(data_root=tiny, train_data_path=".", val_data_path=".", batch_size=4, num_workers=0,
                    seed=3, crop_augmentation_prob=0.5, photometric_augmentation_prob=0.5,
                    low_res_augmentation_prob=0.5)
    dm.setup("fit")
    single = EpochSampler(16, 4, seed=3)
    single.set_epoch(1)
    whole = _items(dm, single, num_workers=0)
    assert len(whole) == 4 and sorted(i for b in whole for i in b) == list(range(16))
    assert _same(_items(dm, single, num_workers=2), whole)
    # two processes at batch 2 each: the union of their k-th batches is the k-th batch of 4
    ranks = []
    for rank in (0, 1):
        sampler = EpochSampler(16, 2, seed=3, num_replicas=2, rank=rank)
        sampler.set_epoch(1)
        ranks.append(_items(dm, sampler, num_workers=1 + rank))
    assert [len(r) for r in ranks] == [4, 4]
    for k, batch in enumerate(whole):
        union = {**ranks[0][k], **ranks[1][k]}
        assert sorted(union) == sorted(batch)
        assert all(torch.equal(union[i], batch[i]) for i in batch)
    # another epoch: another order and other augmentations of the same samples
    single.set_epoch(2)
    other = _items(dm, single, num_workers=0)
    assert [list(b) for b in other] != [list(b) for b in whole]
    first = {i: x for b in whole for i, x in b.items()}
    assert sum(not torch.equal(x, first[i]) for b in other for i, x in b.items()) > 8
    # a mid-epoch position skips exactly the batches already trained on, for one iteration
    single.set_position(1, 3)
    assert _same(_items(dm, single, num_workers=2), whole[3:])
    assert _same(_items(dm, single, num_workers=0), whole)


def test_a_random_state_per_call_gives_the_published_augmenter_draw_for_draw():
    import numpy as np
    from PIL import Image

    from test_augment import _published_augment, _textured_image
    from utils.augment import Augmenter

    aug = Augmenter(0.5, 0.5, 0.5)
    for seed in range(12):
        image = _textured_image(20 + seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        expected = np.asarray(_published_augment(Image.fromarray(image), 0.5, 0.5, 0.5))
        torch.manual_seed(seed)
        assert np.array_equal(aug.augment(image, rng=np.random.RandomState(seed)), expected), seed


def test_mid_epoch_resume_with_other_sizes_is_refused_in_one_line(tiny):
    from data import ResumeMismatchError
    from utils.config import ConfigError, get_args

    dm = DataModule(data_root=tiny, train_data_path=".", val_data_path=".", batch_size=4, num_workers=0,
                    seed=3)
    loader = dm.train_dataloader()
    state = loader.state_dict()
    assert state == {"dataset_size": 16, "batch_size": 4, "num_replicas": 1, "seed": 3}
    loader.load_state_dict(state)
    with pytest.raises(ResumeMismatchError, match=r"batch_size 8 then, 4 now.*last\.ckpt"):
        loader.load_state_dict({**state, "batch_size": 8})
    with pytest.raises(ConfigError, match="--save_every_n_steps must be >= 0"):
        get_args(["--save_every_n_steps", "-1"])
