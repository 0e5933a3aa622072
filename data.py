"""Training and validation data: the LightningDataModule, the training datasets, the pair sets.

Layout (the published arguments; ``<dir>`` = ``<data_root>/<train_data_path>``)::

    <dir>/train.rec, <dir>/train.idx         --use_mxrecord: InsightFace face pack
    <dir>/imgs/<identity>/<image>.jpg        otherwise: one folder per identity (``<dir>`` itself
                                             is used when it has no ``imgs`` folder)
    <data_root>/<val_data_path>/<set>/memfile/mem_file.dat, <set>_list.npy
                                             validation pair sets (memfiles; a ``<set>.bin`` there
                                             is converted on the fly when its memfile is missing
                                             or older, into the user cache if read-only)

Every training image is decoded to RGB (``utils.image``), red and blue are exchanged when
``swap_color_channel`` (for sources whose files hold them swapped), then augmented
(``utils.augment``), flipped horizontally with probability 0.5 and turned into the BGR ``[-1, 1]``
network input by ``utils.image.rgb_to_tensor``. Training items are ``(image, label)``; validation
and test items are ``(image, issame_of_its_pair, set_index, global_image_index)``.

Training order and augmentation are functions of (seed, epoch, sample index) only: the training
loader's :class:`EpochSampler` permutes the samples per epoch, gives each process its share and
yields ``(index, epoch)`` keys, and the dataset draws every random number of that key from its own
stream (``utils.seeding.sample_random_state``). The result does not depend on ``num_workers``,
persistent workers or the number of processes, and a resumed run (even mid-epoch, see
``utils.resume``) continues exactly where the interrupted one stopped.
"""
from __future__ import annotations

import inspect
import logging
import multiprocessing
import os
import random
import re
from argparse import Namespace
from pathlib import Path
from typing import Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import pytorch_lightning as pl
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from utils.augment import Augmenter
from utils.errors import UserError
from utils.image import (IMAGE_EXTENSIONS, ImageDecodeError, check_input_size, decode_image_bytes,
                         is_image_file, load_image_file, rgb_to_tensor, swap_red_blue)
from utils.messages import name_some
from utils.pairsets import (VAL_SET_NAMES, ensure_memfile, locate_memfile, memfile_exists,
                            open_memfile)
from utils.recordio import (RecordIOError, RecordReader, load_face_pack_index,
                            read_face_record)
from utils.resume import training_position
from utils.seeding import SHUFFLE_STREAM, sample_random_state, stream_seed

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

IMAGE_FOLDER_NAME = "imgs"
REC_FILE_NAME = "train.rec"
MIN_IMAGES_PER_IDENTITY = 5          # identities with fewer images are dropped by the subset
DEFAULT_SUBSET_INDEX_FILE = "assets/ms1mv2_train_subset_index.txt"
MAX_CONSECUTIVE_BAD_SAMPLES = 100
TRAINING_SAMPLE_FILE = Path("training_samples") / "sample.jpg"


class TrainDataError(UserError, ValueError):
    """The training data (folder, pack or subset file) is missing or malformed."""


class BadSampleError(UserError, ValueError):
    """One training sample cannot be used (unreadable, not decodable, wrong size)."""


class MissingPairSetsError(UserError, FileNotFoundError):
    """Validation pair sets are missing (the message lists every one of them)."""


# ----------------------------------------------------------------------------------------------
# Training datasets
# ----------------------------------------------------------------------------------------------
class FaceTrainDataset(Dataset):
    """Common part of the folder and RecordIO training sets: decode, swap, augment, flip, tensor.

    Subclasses hold ``labels`` (int64, one per sample) and implement :meth:`_read_rgb` and
    :meth:`source_of`. With ``skip_corrupt_images`` a bad sample is logged, counted in
    :attr:`skipped_count` (shared by DataLoader workers) and replaced by a random other sample.

    Keys: ``dataset[(index, epoch)]`` (what :class:`EpochSampler` yields) draws every random number
    (augmentation, flip, replacement of a bad sample) from the stream of (``seed``, epoch, index);
    a plain ``dataset[index]`` draws from the global NumPy and torch generators, as published.
    """

    def __init__(self, augmenter: Optional[Augmenter] = None, swap_color_channel: bool = False,
                 skip_corrupt_images: bool = False, random_flip: bool = True, seed: int = 0):
        self.augmenter = augmenter if augmenter is not None else Augmenter(0.0, 0.0, 0.0)
        self.swap_color_channel = bool(swap_color_channel)
        self.skip_corrupt_images = bool(skip_corrupt_images)
        self.random_flip = bool(random_flip)
        self.seed = int(seed)
        self.labels = np.zeros(0, dtype=np.int64)
        self.identity_names: List[str] = []
        self._skipped = multiprocessing.Value("q", 0)

    # -- to be provided by subclasses ------------------------------------------------------------
    def source_of(self, index: int) -> str:
        raise NotImplementedError

    def _read_rgb(self, index: int) -> np.ndarray:
        raise NotImplementedError

    def _take(self, positions: np.ndarray) -> None:
        raise NotImplementedError

    # -- public --------------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.labels.size)

    @property
    def num_classes(self) -> int:
        return len(self.identity_names)

    @property
    def skipped_count(self) -> int:
        """How many bad samples were skipped so far (all DataLoader workers together)."""
        return int(self._skipped.value)

    def load_rgb(self, index: int) -> np.ndarray:
        """The sample as an RGB ``uint8`` 112x112 array, colours swapped if configured."""
        try:
            rgb = self._read_rgb(index)
            check_input_size(rgb, self.source_of(index))
        except (ImageDecodeError, RecordIOError, ValueError, OSError) as exc:
            if isinstance(exc, BadSampleError):
                raise
            raise BadSampleError(str(exc)) from exc
        return swap_red_blue(rgb) if self.swap_color_channel else rgb

    def augmented_rgb(self, index: int, epoch: int = 0) -> np.ndarray:
        """Decoded, swapped (if configured) and augmented as in ``epoch``, before the flip."""
        with sample_random_state(self.seed, epoch, index) as rng:
            return self.augmenter.augment(self.load_rgb(index), rng=rng)

    def __getitem__(self, key: Union[int, Tuple[int, int]]) -> Tuple[torch.Tensor, int]:
        if isinstance(key, tuple):
            index, epoch = int(key[0]), int(key[1])
            with sample_random_state(self.seed, epoch, index) as rng:
                return self._sample(index, rng)
        return self._sample(int(key), None)

    def _sample(self, index: int, rng: Optional[np.random.RandomState]
                ) -> Tuple[torch.Tensor, int]:
        """Item ``index``; NumPy draws from ``rng`` (``np.random`` if None), torch's from its
        global generator."""
        numpy_random = rng if rng is not None else np.random
        for attempt in range(MAX_CONSECUTIVE_BAD_SAMPLES):
            try:
                rgb = self.load_rgb(index)
                break
            except BadSampleError as exc:
                if not self.skip_corrupt_images:
                    raise BadSampleError(f"{exc}; replace the file, or pass --skip_corrupt_images to "
                                         f"skip bad training samples") from None
                with self._skipped.get_lock():
                    self._skipped.value += 1
                logger.warning("skipping bad training sample %d (%s)", index, exc)
                if len(self) > 1:  # a random other sample
                    index = (index + 1 + int(numpy_random.randint(len(self) - 1))) % len(self)
        else:
            raise TrainDataError(f"{MAX_CONSECUTIVE_BAD_SAMPLES} bad samples in a row "
                                 f"(last: {self.source_of(index)}); is the training data intact?")
        rgb = self.augmenter.augment(rgb, rng=rng)
        if self.random_flip and torch.rand(1).item() < 0.5:
            rgb = rgb[:, ::-1]
        return rgb_to_tensor(rgb), int(self.labels[index])

    def select(self, positions: np.ndarray, labels: np.ndarray, identity_names: List[str]
               ) -> None:
        """Keep only the samples at ``positions`` (in that order) with new ``labels``."""
        positions = np.asarray(positions, dtype=np.int64)
        self._take(positions)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.identity_names = list(identity_names)



def scan_image_folder(root: PathLike) -> Tuple[List[str], np.ndarray, np.ndarray]:
    """List an identity-per-folder image tree like ``torchvision.datasets.ImageFolder``.

    Returns ``(identity names, relative paths as a bytes array, labels)``: identities are the
    sub-folders in sorted order (label = position), images are the files with an image extension
    found below each (sorted walk, as torchvision does), so sample indices agree with
    ImageFolder's. Hidden entries (starting with ``.``) are ignored. Raises
    :class:`TrainDataError` naming every empty identity folder and non-image file.
    """
    root = Path(root)
    if not root.is_dir():
        raise TrainDataError(f"{root}: training image folder not found")
    classes = sorted(entry.name for entry in os.scandir(root)
                     if entry.is_dir() and not entry.name.startswith("."))
    if not classes:
        raise TrainDataError(f"{root}: no identity folders found (expected one sub-folder of "
                             f"images per identity)")
    rel_paths: List[str] = []
    labels: List[int] = []
    empty: List[str] = []
    foreign: List[str] = []
    for label, name in enumerate(classes):
        class_dir = root / name
        found = 0
        for dirpath, dirnames, filenames in sorted(os.walk(class_dir, followlinks=True)):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            rel_dir = os.path.relpath(dirpath, root)
            for fname in sorted(filenames):
                if fname.startswith("."):
                    continue
                rel = os.path.join(rel_dir, fname)
                if is_image_file(fname):
                    rel_paths.append(rel)
                    labels.append(label)
                    found += 1
                else:
                    foreign.append(rel)
        if not found:
            empty.append(name)
    problems = []
    if empty:
        problems.append(f"{len(empty)} identity folder(s) without images: "
                        + name_some((root / n for n in empty), 10))
    if foreign:
        problems.append(f"{len(foreign)} file(s) that are not images (extensions "
                        f"{', '.join(IMAGE_EXTENSIONS)}): " + name_some((root / f for f in foreign), 10))
    if problems:
        raise TrainDataError(f"{root}: bad training image folder: " + "; ".join(problems))
    encoded = np.array([os.fsencode(p) for p in rel_paths], dtype=bytes)
    return classes, encoded, np.asarray(labels, dtype=np.int64)


class ImageFolderFaceDataset(FaceTrainDataset):
    """Training images in ``root/<identity>/<image>``; labels follow the sorted folder names."""

    def __init__(self, root: PathLike, augmenter: Optional[Augmenter] = None,
                 swap_color_channel: bool = False, skip_corrupt_images: bool = False,
                 random_flip: bool = True, seed: int = 0):
        super().__init__(augmenter, swap_color_channel, skip_corrupt_images, random_flip, seed)
        self.root = Path(root)
        self.identity_names, self.rel_paths, self.labels = scan_image_folder(self.root)
        logger.info("image folder %s: %d images of %d identities", self.root, len(self),
                    self.num_classes)

    def path_of(self, index: int) -> Path:
        return self.root / os.fsdecode(self.rel_paths[index])

    def source_of(self, index: int) -> str:
        return str(self.path_of(index))

    def _read_rgb(self, index: int) -> np.ndarray:
        return load_image_file(self.path_of(index))

    def _take(self, positions: np.ndarray) -> None:
        self.rel_paths = self.rel_paths[positions]


class RecordFaceDataset(FaceTrainDataset):
    """Training images read straight from an InsightFace ``train.rec`` (labels from its index)."""

    def __init__(self, rec_path: PathLike, augmenter: Optional[Augmenter] = None,
                 swap_color_channel: bool = False, skip_corrupt_images: bool = False,
                 random_flip: bool = True, cache_dir: Optional[PathLike] = None,
                 show_progress: bool = True, seed: int = 0):
        super().__init__(augmenter, swap_color_channel, skip_corrupt_images, random_flip, seed)
        self.rec_path = Path(rec_path)
        if not self.rec_path.is_file():
            raise TrainDataError(f"{self.rec_path}: training pack not found (with --use_mxrecord "
                                 f"the pack is <data_root>/<train_data_path>/{REC_FILE_NAME})")
        index = load_face_pack_index(self.rec_path, cache_dir=cache_dir,
                                     show_progress=show_progress)
        if len(index) == 0:
            raise TrainDataError(f"{self.rec_path}: the pack holds no images")
        self.keys = np.asarray(index.keys, dtype=np.int64)
        self.labels = np.asarray(index.labels, dtype=np.int64)
        self.identity_names = [str(c) for c in range(int(index.num_classes))]
        self.reader = RecordReader(self.rec_path)
        logger.info("face pack %s: %d images of %d identities", self.rec_path, len(self),
                    self.num_classes)

    def source_of(self, index: int) -> str:
        return f"{self.rec_path}: key {int(self.keys[index])}"

    def _read_rgb(self, index: int) -> np.ndarray:
        key = int(self.keys[index])
        _, payload = read_face_record(self.reader, key)
        return decode_image_bytes(payload, self.source_of(index))

    def _take(self, positions: np.ndarray) -> None:
        self.keys = self.keys[positions]


# ----------------------------------------------------------------------------------------------
# Subset (the paper's MS1MV2 ablation subset)
# ----------------------------------------------------------------------------------------------
def load_subset_index(path: PathLike) -> np.ndarray:
    """Sample indices from a ``.npy`` file or a text file of integers (comma / space separated)."""
    path = Path(path)
    if not path.is_file():
        raise TrainDataError(f"{path}: training subset index file not found")
    if path.suffix == ".npy":
        try:
            values = np.load(path, allow_pickle=False)
        except (ValueError, OSError) as exc:
            raise TrainDataError(f"{path}: not a readable .npy index file ({exc})") from exc
        if values.ndim != 1 or not np.issubdtype(values.dtype, np.integer):
            raise TrainDataError(f"{path}: expected a 1-d integer array, found {values.dtype} "
                                 f"of shape {values.shape}")
        return values.astype(np.int64)
    tokens = [t for t in re.split(r"[,\s]+", path.read_text()) if t]
    try:
        return np.array([int(t) for t in tokens], dtype=np.int64)
    except ValueError as exc:
        raise TrainDataError(f"{path}: expected integers separated by commas or spaces "
                             f"({exc})") from exc


def subset_positions(labels: np.ndarray, subset: np.ndarray,
                     min_images: int = MIN_IMAGES_PER_IDENTITY, source: str = "<subset>"
                     ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Keep samples ``subset``, drop identities with fewer than ``min_images`` of them, relabel.

    Returns ``(kept positions, new labels 0..K-1, old label of each new label)``; new labels keep
    the order of the old ones (as the published code does).
    """
    labels = np.asarray(labels, dtype=np.int64)
    subset = np.asarray(subset, dtype=np.int64)
    bad = subset[(subset < 0) | (subset >= labels.size)]
    if bad.size:
        raise TrainDataError(f"{source}: index {int(bad[0])} is out of range for a training set "
                             f"of {labels.size} samples ({bad.size} such indices)")
    chosen = labels[subset]
    counts = np.bincount(chosen, minlength=int(labels.max()) + 1 if labels.size else 0)
    keep = counts[chosen] >= min_images
    kept_old = chosen[keep]
    old_of_new = np.unique(kept_old)
    return subset[keep], np.searchsorted(old_of_new, kept_old), old_of_new


def apply_subset(dataset: FaceTrainDataset, subset: np.ndarray,
                 min_images: int = MIN_IMAGES_PER_IDENTITY, source: str = "<subset>") -> None:
    """Restrict ``dataset`` in place to a subset (see :func:`subset_positions`)."""
    before_n, before_k = len(dataset), dataset.num_classes
    positions, new_labels, old_of_new = subset_positions(dataset.labels, subset, min_images,
                                                         source)
    names = [dataset.identity_names[int(o)] for o in old_of_new]
    dataset.select(positions, new_labels, names)
    logger.info("training subset %s: %d of %d samples, %d of %d identities (identities with "
                "fewer than %d images dropped)", source, len(dataset), before_n,
                dataset.num_classes, before_k, min_images)


# ----------------------------------------------------------------------------------------------
# Validation pair sets
# ----------------------------------------------------------------------------------------------
def find_missing_pair_sets(root: PathLike, names: Sequence[str]) -> List[str]:
    """Names of pair sets with neither a complete memfile nor a ``.bin`` under ``root``."""
    root = Path(root)
    return [n for n in names if not memfile_exists(root, n) and not (root / f"{n}.bin").is_file()]


def ensure_pair_memfiles(root: PathLike, names: Sequence[str], show_progress: bool = True
                         ) -> List[str]:
    """Give every pair set an up-to-date memfile: ``<root>/<name>.bin`` is converted where its
    memfile is missing or older than the ``.bin`` (a log line says why), into the user cache
    when ``root`` is read-only (:func:`utils.pairsets.ensure_memfile`).

    Raises :class:`MissingPairSetsError` listing every set that has neither. Returns the names
    that were converted.
    """
    root = Path(root)
    missing = find_missing_pair_sets(root, names)
    if missing:
        raise MissingPairSetsError(
            f"{root}: missing validation pair set(s) {', '.join(missing)}: expected, for each "
            f"<set>, {root / '<set>' / 'memfile' / 'mem_file.dat'} (with <set>_list.npy) or "
            f"{root / '<set>.bin'}")
    converted = []
    for name in names:
        if (root / f"{name}.bin").is_file():
            _, done = ensure_memfile(root / f"{name}.bin", root, name,
                                     show_progress=show_progress)
            if done:
                converted.append(name)
    return converted


class ValidationPairDataset(Dataset):
    """The pair sets' memfiles, concatenated in ``set_names`` order.

    Item ``i``: ``(image (3, 112, 112) float32, issame of its pair, set index, i)``. The memmaps
    are opened lazily in each process (pickling drops them), so DataLoader workers share the
    page cache instead of copying the images.
    """

    def __init__(self, root: PathLike, set_names: Sequence[str] = VAL_SET_NAMES):
        self.root = Path(root)
        self.set_names = tuple(set_names)
        missing = find_missing_pair_sets(self.root, self.set_names)
        # each set's up-to-date memfile: beside its .bin, or in the cache for read-only data
        self._memfile_roots = {n: locate_memfile(self.root, n) for n in self.set_names
                               if n not in missing}
        missing += [n for n, where in self._memfile_roots.items() if where is None]
        if missing:
            raise MissingPairSetsError(f"{self.root}: no up-to-date memfile for pair set(s) "
                                       f"{', '.join(missing)} (data.ensure_pair_memfiles "
                                       f"converts <set>.bin files)")
        sizes, issame_per_image, set_per_image = [], [], []
        self._issame: Dict[int, np.ndarray] = {}
        for k, name in enumerate(self.set_names):
            images, issame = open_memfile(self._memfile_roots[name], name)
            sizes.append(len(images))
            self._issame[k] = np.asarray(issame, dtype=bool)
            issame_per_image.append(np.repeat(self._issame[k], 2))
            set_per_image.append(np.full(len(images), k, dtype=np.int64))
            del images
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.image_issame = (np.concatenate(issame_per_image) if issame_per_image
                             else np.zeros(0, bool))
        self.image_set = (np.concatenate(set_per_image) if set_per_image
                          else np.zeros(0, np.int64))
        self._memmaps: Optional[List[np.memmap]] = None

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def issame(self, set_index: int) -> np.ndarray:
        """The pair labels of one set (P booleans)."""
        return self._issame[int(set_index)]

    def set_range(self, set_index: int) -> range:
        """Global image indices of one set."""
        return range(int(self.offsets[set_index]), int(self.offsets[set_index + 1]))

    def _arrays(self) -> List[np.memmap]:
        if self._memmaps is None:
            self._memmaps = [open_memfile(self._memfile_roots[n], n)[0] for n in self.set_names]
        return self._memmaps

    def __getitem__(self, index: int):
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} validation images")
        k = int(self.image_set[index])
        image = np.array(self._arrays()[k][index - self.offsets[k]], dtype=np.float32)
        return torch.from_numpy(image), bool(self.image_issame[index]), k, index

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_memmaps"] = None
        return state


# ----------------------------------------------------------------------------------------------
# DataLoader helpers
# ----------------------------------------------------------------------------------------------
def worker_init_fn(worker_id: int) -> None:
    """Seed NumPy and ``random`` in each DataLoader worker from torch's per-worker seed (for code
    that draws from the global generators; training samples use their own streams)."""
    seed = torch.initial_seed() % (2 ** 32)
    np.random.seed(seed)
    random.seed(seed)


class ResumeMismatchError(UserError, ValueError):
    """A mid-epoch checkpoint cannot be resumed with this data, batch size or seed."""


class EpochSampler(DistributedSampler):
    """The training order: a permutation of the samples that depends on (seed, epoch) only, of
    which each of ``num_replicas`` processes takes every ``num_replicas``-th entry from ``rank``
    (as ``DistributedSampler`` does, so Lightning leaves it in place under DDP).

    With ``drop_last`` the epoch holds only whole global batches (``batch_size`` per process times
    ``num_replicas``), so the union of the processes' batch ``k`` is the single-process batch
    ``k`` of the same global size; without it the permutation is padded with its first entries to a
    multiple of ``num_replicas``. Items are ``(index, epoch)`` keys for
    :class:`FaceTrainDataset`. :meth:`set_epoch` (called by Lightning every epoch) picks the epoch;
    :meth:`set_position` also skips the first batches of it (a mid-epoch resume); the skip applies
    to the next iteration only.
    """

    def __init__(self, dataset_size: int, batch_size: int, seed: int = 0, num_replicas: int = 1,
                 rank: int = 0, drop_last: bool = True):
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in [0, {num_replicas})")
        self.dataset_size = int(dataset_size)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        self.drop_last = bool(drop_last)
        self.shuffle = True
        self.epoch = 0
        self._skip_batches = 0
        global_batch = self.batch_size * self.num_replicas
        if self.drop_last:
            self.total_size = self.dataset_size // global_batch * global_batch
        else:
            self.total_size = -(-self.dataset_size // self.num_replicas) * self.num_replicas
        self.num_samples = self.total_size // self.num_replicas

    def set_epoch(self, epoch: int) -> None:
        if int(epoch) != self.epoch:
            self.epoch = int(epoch)
            self._skip_batches = 0

    def set_position(self, epoch: int, batches_done: int) -> None:
        """Start the next iteration in ``epoch`` after its first ``batches_done`` batches."""
        self.epoch = int(epoch)
        self._skip_batches = int(batches_done)

    def permutation(self, epoch: int) -> torch.Tensor:
        """The whole epoch's order (all processes, before padding or dropping)."""
        generator = torch.Generator().manual_seed(stream_seed(self.seed, SHUFFLE_STREAM, epoch))
        return torch.randperm(self.dataset_size, generator=generator)

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        epoch, skip = self.epoch, self._skip_batches
        self._skip_batches = 0
        order = self.permutation(epoch)
        if self.total_size > len(order):  # pad with the first entries (as often as needed)
            order = order.repeat(-(-self.total_size // max(1, len(order))))
        mine = order[self.rank:self.total_size:self.num_replicas][skip * self.batch_size:].tolist()
        return ((index, epoch) for index in mine)


class TrainDataLoader(DataLoader):
    """The training DataLoader. Its state (the sizes that map a mid-epoch position to samples)
    goes into checkpoints; resuming mid-epoch with other sizes is refused."""

    def state_dict(self) -> Dict[str, int]:
        sampler = self.sampler
        return {"dataset_size": sampler.dataset_size, "batch_size": sampler.batch_size,
                "num_replicas": sampler.num_replicas, "seed": sampler.seed}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        mine = self.state_dict()
        differ = [f"{k} {state[k]} then, {mine[k]} now" for k in mine if k in state and state[k] != mine[k]]
        if differ:
            raise ResumeMismatchError(
                f"cannot resume mid-epoch: the checkpoint was written with other training sizes "
                f"({'; '.join(differ)}); use the same data, --batch_size, number of processes and "
                f"--seed, or resume from last.ckpt (an epoch end)")


# ----------------------------------------------------------------------------------------------
# The DataModule
# ----------------------------------------------------------------------------------------------
class DataModule(pl.LightningDataModule):
    """AdaFace's data: training images (folder or ``train.rec``) and the validation pair sets.

    ``batch_size`` is per process (divide the total by the number of GPUs before passing it).
    ``num_classes`` (after the optional subset) and ``num_skipped_images`` are for the training
    module; ``val_set_names`` maps the validation items' set index to its name.
    """

    def __init__(self, data_root: PathLike, train_data_path: str, val_data_path: str,
                 batch_size: int, num_workers: int = 16, train_data_subset: bool = False,
                 low_res_augmentation_prob: float = 0.0, crop_augmentation_prob: float = 0.0,
                 photometric_augmentation_prob: float = 0.0, swap_color_channel: bool = False,
                 use_mxrecord: bool = False, output_dir: Optional[PathLike] = None,
                 train_data_subset_path: Optional[PathLike] = None,
                 skip_corrupt_images: bool = False, val_batch_size: Optional[int] = None,
                 seed: Optional[int] = None, val_set_names: Sequence[str] = VAL_SET_NAMES,
                 label_cache_dir: Optional[PathLike] = None):
        super().__init__()
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if int(num_workers) < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.data_root = str(data_root)
        self.train_data_path = str(train_data_path)
        self.val_data_path = str(val_data_path)
        self.batch_size = int(batch_size)
        self.val_batch_size = int(val_batch_size) if val_batch_size else self.batch_size
        self.num_workers = int(num_workers)
        self.train_data_subset = bool(train_data_subset)
        self.train_data_subset_path = train_data_subset_path
        self.low_res_augmentation_prob = low_res_augmentation_prob
        self.crop_augmentation_prob = crop_augmentation_prob
        self.photometric_augmentation_prob = photometric_augmentation_prob
        self.swap_color_channel = bool(swap_color_channel)
        self.use_mxrecord = bool(use_mxrecord)
        self.output_dir = output_dir
        self.skip_corrupt_images = bool(skip_corrupt_images)
        self.seed = seed
        self.val_set_names = tuple(val_set_names)
        self.label_cache_dir = label_cache_dir
        # validate the probabilities now rather than at setup
        self._augmenter = Augmenter(crop_augmentation_prob, photometric_augmentation_prob,
                                    low_res_augmentation_prob)
        self.train_dataset: Optional[FaceTrainDataset] = None
        self.val_dataset: Optional[ValidationPairDataset] = None
        self.test_dataset: Optional[ValidationPairDataset] = None

    @classmethod
    def from_args(cls, args: Union[Namespace, Mapping], **overrides) -> "DataModule":
        """Build from the parsed command line (other keys are ignored)."""
        values = dict(vars(args) if isinstance(args, Namespace) else args)
        values.update(overrides)
        accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
        return cls(**{k: v for k, v in values.items() if k in accepted})

    # -- paths -----------------------------------------------------------------------------------
    @property
    def train_dir(self) -> Path:
        return Path(self.data_root) / self.train_data_path

    @property
    def val_dir(self) -> Path:
        return Path(self.data_root) / self.val_data_path

    def train_source(self) -> Path:
        """The ``train.rec`` (``use_mxrecord``) or the image folder that training reads."""
        base = self.train_dir
        if self.use_mxrecord:
            return base if base.suffix == ".rec" else base / REC_FILE_NAME
        if (base / IMAGE_FOLDER_NAME).is_dir():
            return base / IMAGE_FOLDER_NAME
        if not base.is_dir():
            raise TrainDataError(f"{base}: training data folder not found (expected "
                                 f"<data_root>/<train_data_path>/{IMAGE_FOLDER_NAME}/<identity>/"
                                 f"<image>, or {REC_FILE_NAME} there with --use_mxrecord)")
        if (base / REC_FILE_NAME).is_file():
            raise TrainDataError(f"{base}: holds {REC_FILE_NAME} but no {IMAGE_FOLDER_NAME}/ "
                                 f"folder; pass --use_mxrecord to train from the pack (or "
                                 f"convert it to images with convert.py)")
        return base

    # -- Lightning hooks -----------------------------------------------------------------------
    def prepare_data(self) -> None:
        """Convert pair-set ``.bin`` files to memfiles where needed (once, on the main process)."""
        ensure_pair_memfiles(self.val_dir, self.val_set_names)

    def setup(self, stage: Optional[str] = None) -> None:
        if stage in (None, "fit"):
            self._build_train_dataset()
        if stage in (None, "fit", "validate"):
            if self.val_dataset is None:
                ensure_pair_memfiles(self.val_dir, self.val_set_names)
                self.val_dataset = ValidationPairDataset(self.val_dir, self.val_set_names)
        if stage in (None, "test"):
            if self.test_dataset is None:
                ensure_pair_memfiles(self.val_dir, self.val_set_names)
                self.test_dataset = ValidationPairDataset(self.val_dir, self.val_set_names)

    def _build_train_dataset(self) -> FaceTrainDataset:
        if self.train_dataset is not None:
            return self.train_dataset
        source = self.train_source()
        common = dict(augmenter=self._augmenter, swap_color_channel=self.swap_color_channel,
                      skip_corrupt_images=self.skip_corrupt_images, seed=self._seed)
        if self.use_mxrecord:
            dataset: FaceTrainDataset = RecordFaceDataset(source, cache_dir=self.label_cache_dir,
                                                          **common)
        else:
            dataset = ImageFolderFaceDataset(source, **common)
        if self.train_data_subset:
            subset_file = self._subset_file()
            apply_subset(dataset, load_subset_index(subset_file), source=str(subset_file))
        self.train_dataset = dataset
        self._save_training_sample(dataset)
        return dataset

    def _subset_file(self) -> Path:
        if self.train_data_subset_path:
            return Path(self.train_data_subset_path)
        candidates = [Path(DEFAULT_SUBSET_INDEX_FILE),
                      Path(__file__).resolve().parent / DEFAULT_SUBSET_INDEX_FILE]
        for candidate in candidates:
            if candidate.is_file():
                return candidate
        raise TrainDataError(f"--train_data_subset needs the subset index file: pass "
                             f"train_data_subset_path (looked for "
                             f"{', '.join(str(c) for c in candidates)})")

    def _save_training_sample(self, dataset: FaceTrainDataset) -> None:
        """Decode one sample now (a bad folder fails early) and save it, augmented, as
        ``<output_dir>/training_samples/sample.jpg`` in true colours for a visual colour check."""
        try:
            rgb = dataset.augmented_rgb(0)
        except BadSampleError as exc:
            if not dataset.skip_corrupt_images:
                raise
            logger.warning("first training sample is bad (%s); no training sample saved", exc)
            return
        if self.output_dir is None:
            return
        rank = getattr(self.trainer, "global_rank", 0) if self.trainer is not None else 0
        path = Path(self.output_dir) / TRAINING_SAMPLE_FILE
        if rank != 0 or path.exists():
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rgb).save(path, quality=95)
        except OSError as exc:
            logger.warning("could not save the training sample %s (%s)", path, exc)

    # -- information for the training module ----------------------------------------------------
    @property
    def num_classes(self) -> int:
        """Identities of the training set (after the subset); builds the training set if needed."""
        return self._build_train_dataset().num_classes

    @property
    def num_skipped_images(self) -> int:
        """Bad training samples skipped so far (with ``skip_corrupt_images``)."""
        return self.train_dataset.skipped_count if self.train_dataset is not None else 0

    # -- loaders ---------------------------------------------------------------------------------
    def _loader_kwargs(self) -> dict:
        # The loader's own generator (seeded) draws the worker base seeds, so that no loader
        # consumes torch's global generator (dropout's stream, restored on resume).
        return dict(num_workers=self.num_workers, pin_memory=torch.cuda.is_available(),
                    worker_init_fn=worker_init_fn, persistent_workers=self.num_workers > 0,
                    generator=torch.Generator().manual_seed(self._seed))

    @property
    def _seed(self) -> int:
        return int(self.seed) if self.seed is not None else 0

    def _loader(self, dataset: Dataset, batch_size: int, shuffle: bool, drop_last: bool
                ) -> DataLoader:
        return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last,
                          **self._loader_kwargs())

    def train_dataloader(self) -> DataLoader:
        """Batches of ``(image, label)`` in the :class:`EpochSampler` order of this process,
        starting where training (re)starts (``utils.resume.training_position``)."""
        dataset = self._build_train_dataset()
        trainer = self.trainer
        world = trainer.world_size if trainer is not None else 1
        rank = trainer.global_rank if trainer is not None else 0
        # A last batch of very few samples gives degenerate batch statistics (BatchNorm, the
        # feature-norm std of AdaFace); drop it when at least one full batch exists.
        drop_last = len(dataset) >= self.batch_size * world
        sampler = EpochSampler(len(dataset), self.batch_size, seed=self._seed, num_replicas=world,
                               rank=rank, drop_last=drop_last)
        sampler.set_position(*training_position(trainer))
        return TrainDataLoader(dataset, batch_size=self.batch_size, sampler=sampler,
                               drop_last=drop_last, **self._loader_kwargs())

    def val_dataloader(self) -> DataLoader:
        if self.val_dataset is None:
            self.setup("validate")
        return self._loader(self.val_dataset, self.val_batch_size, shuffle=False, drop_last=False)

    def test_dataloader(self) -> DataLoader:
        if self.test_dataset is None:
            self.setup("test")
        return self._loader(self.test_dataset, self.val_batch_size, shuffle=False,
                            drop_last=False)
