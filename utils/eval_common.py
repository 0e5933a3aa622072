"""What the evaluation scripts share: model selection, device, input checks, image loading, saved features.

The scripts (``validation_hq/eval_5valsets.py``, ``validation_mixed/validate_IJB_BC.py``,
``validation_lq/validate_tinyface.py``, ``validation_lq/validate_IJB_S.py``) are thin: each reads its
protocol, checks that every input exists, obtains image features (from a checkpoint, or from a file
saved by an earlier run) and hands them to the metric library (``utils.evaluate_utils``,
``utils.ijb``, ``utils.identification``). This module holds the parts they have in common:

* **models**: ``--model_name`` takes the published names of :mod:`utils.pretrained`
  (``ir101_webface12m``, ``ir50_ms1mv2``, ...; ``ir_101_webface12m`` is accepted too); ``--ckpt_path``
  (+ ``--arch``, else read from the checkpoint's ``hyper_parameters`` or recognised from its keys)
  takes any checkpoint that :mod:`utils.checkpoint` reads, with the safe unpickler unless
  ``--trust_checkpoint`` is given;
* **device**: ``--device cpu|cuda|cuda:N|auto`` (:func:`utils.device.resolve_device`);
* **inputs**: :func:`check_files_exist` raises one error naming the first few missing files and
  their count, :func:`prepare_output_dir` checks that ``--output_dir`` is writable and
  :meth:`ImageListDataset.check_first` decodes the first image, so that a broken data folder or an
  unusable output folder is reported before any feature is computed (the protocol files
  themselves are checked by :mod:`utils.meta_files` and the scripts' readers);
* **images**: :class:`ImageListDataset` decodes (and, given 5 landmarks, aligns with
  :func:`face_alignment.similarity.align_face`) in DataLoader workers, following the one image
  convention of :mod:`utils.image`;
* **saved features**: ``--save_features`` writes ``<output_dir>/features.npz`` (features, norms,
  image names and how they were made); ``--features_path`` reads it back so that the metrics can
  be re-run without the model. The names are checked against the protocol.
"""
from __future__ import annotations

import argparse
import datetime
import errno
import json
import logging
import os
import re
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from face_alignment.similarity import align_face
from utils import cli
from utils.checkpoint import load_pretrained_backbone
from utils.device import resolve_device
from utils.errors import UserError
from utils.features import extract_features
from utils.files import is_writable_folder, write_atomically
from utils.fusion import FUSION_METHODS
from utils.image import check_input_size, load_image_file, rgb_to_tensor
from utils.messages import name_some
from utils.pretrained import PRETRAINED_DIR, PUBLISHED_MODELS, canonical_model_name, published_checkpoint

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

FEATURES_FILE = "features.npz"
FEATURES_FORMAT_VERSION = 1
# extra arrays of a features file with one row per image (reordered with the images): the norms of
# each view before flip fusion and the image baseline of utils.quality, for --quality_report
PER_IMAGE_PREFIX = "image_"
VIEW_NORMS = PER_IMAGE_PREFIX + "view_norms"
SHARPNESS = PER_IMAGE_PREFIX + "laplacian_variance"


# ----------------------------------------------------------------------------------------------
# errors
# ----------------------------------------------------------------------------------------------
class EvalInputError(UserError, ValueError):
    """A protocol file, data folder, feature file or option is unusable; the message says which."""


class MissingFilesError(UserError, FileNotFoundError):
    """Files that the protocol needs are missing (the message names the first few and the count)."""


#: The errors a script reports as one line (``error: ...``) instead of a traceback.
USER_ERRORS = cli.USER_ERRORS


def check_files_exist(root: PathLike, rel_paths: Sequence[str], what: str = "images") -> None:
    """Raise :class:`MissingFilesError` unless every ``root/rel_path`` is a file.

    Each folder is listed once (fast for hundreds of thousands of files in one folder). The error
    names the first few missing paths and how many there are.
    """
    root = Path(root)
    listings: Dict[str, Optional[set]] = {}
    missing: List[str] = []
    for rel in rel_paths:
        parent, _, name = str(rel).replace("\\", "/").rpartition("/")
        if parent not in listings:
            folder = root / parent if parent else root
            try:
                listings[parent] = {e.name for e in os.scandir(folder) if e.is_file()}
            except (FileNotFoundError, NotADirectoryError):
                listings[parent] = None
        entries = listings[parent]
        if entries is None or name not in entries:
            missing.append(str(rel))
    if missing:
        raise MissingFilesError(f"{len(missing)} of {len(rel_paths)} {what} missing under {root}: "
                                f"{name_some(missing)}")


def check_paths_exist(paths: Iterable[PathLike], what: str = "files") -> None:
    """One error listing every missing path of a short list (protocol files, folders)."""
    missing = [str(p) for p in paths if not Path(p).exists()]
    if missing:
        raise MissingFilesError(f"{len(missing)} {what} missing:\n  " + "\n  ".join(missing))


def prepare_output_dir(path: PathLike, create: bool = True) -> Path:
    """Check that files can be written in ``path`` (the ``--output_dir``), so that an unusable folder
    is reported before any feature is computed rather than after; create it unless ``create`` is
    False (a check before the work, when a failed run should leave nothing behind)."""
    path = Path(path)
    try:
        if create:
            path.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=path):
                pass
        elif path.exists() and not path.is_dir():
            raise FileExistsError(errno.EEXIST, "a file of that name exists")
        elif not is_writable_folder(path):
            raise PermissionError(errno.EACCES, "permission denied or read-only file system")
    except OSError as exc:
        reason = "a file of that name exists" if path.is_file() else (exc.strerror or str(exc))
        raise EvalInputError(f"--output_dir {path}: cannot write results there ({reason}); choose a writable "
                             f"folder with --output_dir") from exc
    return path


# ----------------------------------------------------------------------------------------------
# models
# ----------------------------------------------------------------------------------------------
@dataclass
class ModelSpec:
    """Which backbone to evaluate: a label for tables and file names, the file and its architecture."""

    label: str
    ckpt_path: Path
    arch: Optional[str] = None
    trust: bool = False  # read with the full unpickler (--trust_checkpoint)


def add_model_arguments(parser: argparse.ArgumentParser, multiple: bool = False) -> None:
    """``--model_name`` / ``--ckpt_path`` (+ ``--arch``, ``--pretrained_dir``, ``--trust_checkpoint``)."""
    nargs = "+" if multiple else None
    many = " (one or more)" if multiple else ""
    parser.add_argument("--model_name", nargs=nargs, default=None,
                        help=f"published model name{many}: {', '.join(PUBLISHED_MODELS)}; the file "
                             f"is read from --pretrained_dir")
    parser.add_argument("--ckpt_path", nargs=nargs, default=None,
                        help=f"checkpoint file{many} (Lightning checkpoint or backbone state dict)")
    parser.add_argument("--arch", nargs=nargs, default=None,
                        help="backbone of --ckpt_path (ir_18, ir_50, ir_101, ir_tiny, ...); default: the "
                             "checkpoint's hyper_parameters.arch, else recognised from its keys")
    parser.add_argument("--pretrained_dir", default=str(PRETRAINED_DIR),
                        help="folder of the published checkpoints (default: %(default)s)")
    parser.add_argument("--trust_checkpoint", action="store_true",
                        help="read the checkpoints with the full unpickler, which can run code stored in "
                             "the file: only for files from a source you trust (by default anything but "
                             "tensors and training arguments is refused)")


def _as_list(value) -> List:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def model_specs_from_args(args: argparse.Namespace) -> List[ModelSpec]:
    """The models selected on the command line; published files are checked to exist here."""
    names, paths, archs = _as_list(args.model_name), _as_list(args.ckpt_path), _as_list(args.arch)
    trust = bool(getattr(args, "trust_checkpoint", False))
    if names and paths:
        raise EvalInputError("give either --model_name or --ckpt_path, not both")
    if not names and not paths:
        raise EvalInputError("no model: give --model_name (a published model), --ckpt_path (+ --arch) "
                             "or --features_path (features saved by an earlier run)")
    specs: List[ModelSpec] = []
    if names:
        if archs:
            raise EvalInputError("--arch goes with --ckpt_path; --model_name implies the architecture")
        for name in names:
            path, arch = published_checkpoint(name, args.pretrained_dir)
            specs.append(ModelSpec(canonical_model_name(name), path, arch, trust))
        return specs
    if len(archs) not in (0, 1, len(paths)):
        raise EvalInputError(f"give one --arch for all checkpoints or one per checkpoint "
                             f"({len(paths)} checkpoints, {len(archs)} architectures)")
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise MissingFilesError(f"checkpoint file(s) not found: {name_some(missing)}")
    stems = [Path(p).stem for p in paths]
    labels: List[str] = []
    for i, path in enumerate(paths):
        arch = archs[i] if len(archs) == len(paths) else (archs[0] if archs else None)
        label = stems[i] if stems.count(stems[i]) == 1 else str(Path(path).with_suffix(""))
        if label in labels:
            label = f"{label}#{i + 1}"
        labels.append(label)
        specs.append(ModelSpec(label, Path(path), arch, trust))
    return specs


def file_safe(label: str) -> str:
    """``label`` usable as one file or folder name (``runs/a/last`` -> ``runs_a_last``)."""
    safe = re.sub(r"[^A-Za-z0-9._+-]+", "_", str(label)).strip("._")
    return safe or "model"


def load_model(spec: ModelSpec, device: Union[str, torch.device] = "cpu",
               trust: Optional[bool] = None) -> nn.Module:
    """The backbone of ``spec`` with its weights loaded strictly, on ``device``, in eval mode; a
    missing ``spec.arch`` is filled in from the checkpoint (its training arguments, else its keys).
    The file is read with the safe unpickler unless ``trust`` (default: ``spec.trust``) is true."""
    trust = spec.trust if trust is None else trust
    model = load_pretrained_backbone(spec.arch, spec.ckpt_path, device, trust=trust)
    spec.arch = model.arch
    logger.info("loaded %s (%s) from %s", spec.label, spec.arch, spec.ckpt_path)
    return model


# ----------------------------------------------------------------------------------------------
# device, options
# ----------------------------------------------------------------------------------------------
def add_device_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto",
                        help="cpu, cuda, cuda:N or auto (cuda when available; default: %(default)s)")


def str2bool(value: Union[str, bool]) -> bool:
    """``True``/``False`` from the published scripts' ``--use_flip_test True`` style."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("yes", "true", "t", "y", "1"):
        return True
    if text in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false), got {value!r}")


def add_fusion_arguments(parser: argparse.ArgumentParser, use_flip_default: bool = True,
                         fusion_default: str = "pre_norm_vector_add") -> None:
    parser.add_argument("--use_flip_test", type=str2bool, nargs="?", const=True, default=use_flip_default,
                        help="also embed the horizontally flipped image and fuse (default: %(default)s)")
    parser.add_argument("--fusion_method", default=fusion_default, choices=FUSION_METHODS,
                        help="how an image and its flip are fused (default: %(default)s)")


def _int_at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value
    return parse


def add_loader_arguments(parser: argparse.ArgumentParser, batch_size: int = 128, num_workers: int = 4) -> None:
    parser.add_argument("--batch_size", type=_int_at_least(1), default=batch_size,
                        help="images per batch (default: %(default)s)")
    parser.add_argument("--num_workers", type=_int_at_least(0), default=num_workers,
                        help="DataLoader worker processes decoding (and aligning) images (default: %(default)s)")


def add_feature_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--save_features", action="store_true",
                        help=f"save the image features to <output_dir>/{FEATURES_FILE}")
    parser.add_argument("--features_path", default=None,
                        help="re-run the metrics on features saved by --save_features (no model needed)")


def add_quality_arguments(parser: argparse.ArgumentParser) -> None:
    """``--quality_report`` (error-versus-reject curves of the feature norm; utils.quality_report)."""
    parser.add_argument("--quality_report", action="store_true",
                        help="also measure the feature norm as a face-quality score: error-versus-reject "
                             "curves (CSV + PNG) and their pAUC table for the norm, AdaFace's quality "
                             "indicator (from the checkpoint's norm statistics), an image baseline "
                             "(variance of the Laplacian) and random rejection; works with --features_path")


def run_cli(main: Callable[[Optional[Sequence[str]]], object], argv: Optional[Sequence[str]] = None) -> int:
    """Run an evaluation script's ``main``: :data:`USER_ERRORS` become one ``error: ...`` line and exit
    status 2 (:func:`utils.cli.run_cli`)."""
    return cli.run_cli(main, argv)


# ----------------------------------------------------------------------------------------------
# images
# ----------------------------------------------------------------------------------------------
class ImageListDataset(Dataset):
    """Image files -> network input ``(3, 112, 112)`` (BGR, [-1, 1]) and the item's index.

    With ``landmarks`` ``(N, 5, 2)`` each image is aligned by the 5-point similarity transform
    (:func:`face_alignment.similarity.align_face`); without, images must already be aligned 112x112
    crops. Decoding and alignment run in the DataLoader workers.
    """

    def __init__(self, paths: Sequence[PathLike], landmarks: Optional[np.ndarray] = None):
        self.paths = np.asarray([str(p) for p in paths], dtype=object)
        if landmarks is not None:
            landmarks = np.asarray(landmarks, dtype=np.float32)
            if landmarks.shape != (len(self.paths), 5, 2):
                raise EvalInputError(f"landmarks must have shape ({len(self.paths)}, 5, 2), got {landmarks.shape}")
        self.landmarks = landmarks

    def __len__(self) -> int:
        return len(self.paths)

    def load_rgb(self, index: int) -> np.ndarray:
        """The aligned 112x112 RGB face of item ``index``."""
        path = self.paths[index]
        rgb = load_image_file(path)
        if self.landmarks is not None:
            try:
                return align_face(rgb, self.landmarks[index])
            except ValueError as exc:
                raise EvalInputError(f"{path}: cannot align with landmarks {self.landmarks[index].tolist()} "
                                     f"({exc})") from exc
        check_input_size(rgb, path)
        return rgb

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int]:
        return rgb_to_tensor(self.load_rgb(int(index))), int(index)

    def check_first(self) -> "ImageListDataset":
        """Decode (and align) the first image now, in this process: a folder of unaligned or
        unreadable images is reported before the model is loaded. Returns ``self``."""
        if len(self):
            self.load_rgb(0)
        return self


def make_loader(dataset: Dataset, batch_size: int, num_workers: int, device: torch.device) -> DataLoader:
    """An in-order DataLoader (no shuffling, last batch kept)."""
    if batch_size < 1:
        raise EvalInputError(f"--batch_size must be >= 1, got {batch_size}")
    if num_workers < 0:
        raise EvalInputError(f"--num_workers must be >= 0, got {num_workers}")
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, drop_last=False, num_workers=num_workers,
                      pin_memory=torch.device(device).type == "cuda")


# ----------------------------------------------------------------------------------------------
# features: computed or saved
# ----------------------------------------------------------------------------------------------
@dataclass
class FeatureSet:
    """Image features in protocol order and how they were made."""

    features: np.ndarray                     # (N, D) float32, flip-fused and L2-normalised
    norms: np.ndarray                        # (N, 1) float32, the (fused) feature norms
    names: List[str]
    meta: Dict[str, object] = field(default_factory=dict)
    arrays: Dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def fusion_method(self) -> str:
        return str(self.meta.get("fusion_method", "none"))


def save_features(path: PathLike, feature_set: FeatureSet) -> Path:
    """Write ``feature_set`` as an ``.npz`` (readable with ``np.load(..., allow_pickle=False)``)."""
    path = Path(path)
    names = np.asarray(feature_set.names, dtype=str)
    if len(names) != len(feature_set.features) or len(feature_set.norms) != len(feature_set.features):
        raise ValueError(f"{len(feature_set.features)} features, {len(feature_set.norms)} norms and "
                         f"{len(names)} names must agree")
    meta = dict(feature_set.meta, format_version=FEATURES_FORMAT_VERSION,
                created=datetime.datetime.now().isoformat(timespec="seconds"))
    reserved = {"features", "norms", "names", "meta"} & set(feature_set.arrays)
    if reserved:
        raise ValueError(f"extra arrays may not be called {sorted(reserved)}")
    write_atomically(path, lambda f: np.savez(
        f, features=np.asarray(feature_set.features, dtype=np.float32),
        norms=np.asarray(feature_set.norms, dtype=np.float32).reshape(-1, 1), names=names,
        meta=np.asarray(json.dumps(meta, sort_keys=True)), **feature_set.arrays))
    logger.info("saved %d features to %s", len(names), path)
    return path


def load_features(path: PathLike, kind: Optional[str] = None) -> FeatureSet:
    """Read a file written by :func:`save_features`; ``kind`` (e.g. ``'IJBC'``) must match if given."""
    path = Path(path)
    if not path.is_file():
        raise MissingFilesError(f"{path}: features file not found")
    if not zipfile.is_zipfile(path):
        raise EvalInputError(f"{path}: not a features file (an .npz written by --save_features); give the "
                             f"features.npz of an earlier run to --features_path")
    try:
        with np.load(path, allow_pickle=False) as data:
            content = {k: data[k] for k in data.files}
    except (OSError, ValueError, EOFError) as exc:
        raise EvalInputError(f"{path}: not a readable .npz features file ({exc})") from exc
    lacking = [k for k in ("features", "norms", "names", "meta") if k not in content]
    if lacking:
        raise EvalInputError(f"{path}: not a features file of these scripts (lacks {', '.join(lacking)})")
    try:
        meta = json.loads(str(content.pop("meta")))
    except ValueError as exc:
        raise EvalInputError(f"{path}: unreadable 'meta' entry ({exc})") from exc
    features, norms, names = content.pop("features"), content.pop("norms"), content.pop("names")
    if features.ndim != 2 or norms.shape != (len(features), 1) or names.shape != (len(features),):
        raise EvalInputError(f"{path}: inconsistent shapes: features {features.shape}, norms {norms.shape}, "
                             f"names {names.shape}")
    if kind is not None and meta.get("kind") != kind:
        raise EvalInputError(f"{path}: holds {meta.get('kind')!r} features, not {kind!r}")
    return FeatureSet(features, norms, [str(n) for n in names], meta, content)


def select_by_names(feature_set: FeatureSet, names: Sequence[str], source: str) -> FeatureSet:
    """The rows of ``feature_set`` for ``names`` in that order; one error lists names it lacks."""
    names = [str(n) for n in names]
    if feature_set.names == names:
        return feature_set
    row_of = {n: i for i, n in enumerate(feature_set.names)}
    missing = [n for n in names if n not in row_of]
    if missing:
        raise EvalInputError(f"{source}: {len(missing)} of the {len(names)} images of the protocol have no "
                             f"saved feature: {name_some(missing)}; give the features of this data set, or "
                             f"compute them with --model_name / --ckpt_path")
    rows = np.array([row_of[n] for n in names], dtype=np.int64)
    arrays = {k: (v[rows] if k.startswith(PER_IMAGE_PREFIX) else v) for k, v in feature_set.arrays.items()}
    return FeatureSet(feature_set.features[rows], feature_set.norms[rows], names, feature_set.meta, arrays)


def embed_dataset(model: nn.Module, dataset: Dataset, device: torch.device, batch_size: int, num_workers: int,
                  use_flip: bool, fusion_method: str, desc: str = "embedding", with_quality: bool = False):
    """Features and norms of every item of ``dataset`` (in order), with a progress bar; with
    ``with_quality`` also the per-view norms and the image baseline (:func:`extract_features`)."""
    loader = make_loader(dataset, batch_size, num_workers, device)
    return extract_features(model, loader, device=device, use_flip=use_flip, fusion_method=fusion_method,
                            total=len(loader), desc=desc, with_quality=with_quality)


def quality_extras(spec: ModelSpec, view_norms: np.ndarray, sharpness: np.ndarray) -> Tuple[Dict, Dict]:
    """``(meta, arrays)`` that a features file keeps for quality reports: the per-image view norms and
    image baseline, and the checkpoint's AdaFace norm statistics when it has them."""
    from utils.quality import QualityError, read_norm_statistics

    meta: Dict[str, object] = {}
    try:
        meta["norm_statistics"] = read_norm_statistics(spec.ckpt_path, trust=spec.trust).as_dict()
    except QualityError as exc:
        logger.info("%s", exc)
    return meta, {VIEW_NORMS: np.asarray(view_norms, np.float32), SHARPNESS: np.asarray(sharpness, np.float32)}


def compute_or_load_features(args: argparse.Namespace, kind: str, names: Sequence[str],
                             make_dataset: Callable[[], Dataset], spec: Optional[ModelSpec],
                             output_dir: Optional[PathLike] = None, desc: str = "embedding") -> FeatureSet:
    """Features of ``names`` from ``--features_path``, or embedded by the model of ``spec``.

    ``make_dataset`` is only called when features are computed; ``--save_features`` then writes
    them to ``<output_dir>/features.npz``.
    """
    if args.features_path:
        if getattr(args, "model_name", None) or getattr(args, "ckpt_path", None):
            logger.warning("--features_path given: the features are read from it; --model_name / --ckpt_path "
                           "are ignored")
        saved = load_features(args.features_path, kind)
        logger.info("features of %d images read from %s (model %s, fusion %s, flip %s)", len(saved.names),
                    args.features_path, saved.meta.get("model"), saved.meta.get("fusion_method"),
                    saved.meta.get("use_flip_test"))
        return select_by_names(saved, names, str(args.features_path))
    if spec is None:
        raise EvalInputError("no model and no --features_path")
    device = resolve_device(args.device)
    model = load_model(spec, device)
    features, norms, view_norms, sharpness = embed_dataset(model, make_dataset(), device, args.batch_size,
                                                           args.num_workers, args.use_flip_test, args.fusion_method,
                                                           desc=desc, with_quality=True)
    quality_meta, quality_arrays = quality_extras(spec, view_norms, sharpness)
    # the fusion method is recorded as requested: the published scripts weight image features by
    # their norms for 'pre_norm_vector_add' whether or not the flip was used
    feature_set = FeatureSet(features, norms, [str(n) for n in names],
                             {"kind": kind, "model": spec.label, "arch": spec.arch, "ckpt_path": str(spec.ckpt_path),
                              "use_flip_test": bool(args.use_flip_test), "fusion_method": args.fusion_method,
                              **quality_meta}, quality_arrays)
    if args.save_features:
        if output_dir is None:
            raise EvalInputError("--save_features needs an output folder")
        save_features(Path(output_dir) / FEATURES_FILE, feature_set)
    return feature_set


def run_label(args: argparse.Namespace, spec: Optional[ModelSpec]) -> str:
    """A name for the evaluated model (output folders, tables)."""
    if spec is not None:
        return spec.label
    if getattr(args, "features_path", None):
        try:
            return str(load_features_meta(args.features_path).get("model") or Path(args.features_path).stem)
        except (EvalInputError, MissingFilesError):
            return Path(args.features_path).stem
    return "model"


def load_features_meta(path: PathLike) -> Dict[str, object]:
    """Only the ``meta`` entry of a features file (cheap: the arrays are not read)."""
    path = Path(path)
    if not path.is_file():
        raise MissingFilesError(f"{path}: features file not found")
    try:
        with np.load(path, allow_pickle=False) as data:
            return json.loads(str(data["meta"]))
    except (OSError, ValueError, KeyError, EOFError) as exc:
        raise EvalInputError(f"{path}: not a features file of these scripts ({exc})") from exc
