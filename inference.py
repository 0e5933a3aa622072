"""AdaFace inference on photos: align the faces (MTCNN), embed them, compare them.

Library use (as in the AdaFace README)::

    from face_alignment import align
    from inference import load_pretrained_model, to_input

    model = load_pretrained_model('ir_50')               # pretrained/adaface_ir50_ms1mv2.ckpt
    aligned_rgb_img = align.get_aligned_face('photo.jpg')
    feature, norm = model(to_input(aligned_rgb_img))     # norm: the quality score

Command line::

    python inference.py [--image_dir DIR] [--architecture ir_50 | --ckpt_path FILE [--arch ARCH]]
                        [--trust_checkpoint]
                        [--device cpu|cuda] [--fusion_method none|pre_norm_vector_add|...]
                        [--export_onnx PATH] [--compat default|published]

It aligns the most confident face of every image in ``--image_dir`` (default
``face_alignment/test_images``, filled with sample photos on first use), prints the cosine
similarity matrix and each face's feature norm and AdaFace quality indicator (the norm on the
checkpoint's training scale, :mod:`utils.quality`; in [-1, 1]), and lists the images it skipped and
why. ``--min_quality X`` leaves out (and lists) the faces whose indicator is below X. With
``--export_onnx`` it writes the backbone as ONNX instead and checks the file with onnxruntime.
"""
from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image
from prettytable import PrettyTable
from torch import nn
from tqdm import tqdm

from face_alignment.align import add_compat_argument, detect_faces, get_detector, load_photo
from face_alignment.nets import INSTALL_HINT
from face_alignment.sample_images import DEFAULT_DIR as SAMPLE_IMAGE_DIR
from face_alignment.sample_images import ensure_test_images
from net import ARCHITECTURES, SMALL_ARCHITECTURE_CONFIG
from utils.checkpoint import load_pretrained_backbone
from utils.cli import run_cli
from utils.device import resolve_device
from utils.features import embed_batch_views
from utils.fusion import FUSION_METHODS
from utils.image import IMAGE_EXTENSIONS, ImageDecodeError, list_images
from utils.image import to_input  # noqa: F401 - re-exported: the published inference.to_input
from utils.onnx_export import export_and_check
from utils.quality import NormStatistics, QualityError, image_norm, read_norm_statistics
from utils.pretrained import (DEFAULT_ARCH, PRETRAINED_DIR, PRETRAINED_MODELS_URL, REPO_ROOT,
                              default_checkpoint_paths, find_pretrained_checkpoint)

logger = logging.getLogger(__name__)

# The default checkpoint of each architecture, relative to the repository (the published name
# of this table; utils.pretrained holds every published file).
adaface_models: Dict[str, str] = default_checkpoint_paths()


DEFAULT_FUSION = "none"  # the published inference.py embeds each face once, without its mirror
EMBED_BATCH_SIZE = 32


# -- loading the model ----------------------------------------------------------------------

def load_pretrained_model(architecture: Optional[str] = None,
                          ckpt_path: Union[str, Path, None] = None,
                          device: Union[str, torch.device] = 'cpu',
                          pretrained_dir: Union[str, Path, None] = None,
                          trust: bool = False) -> nn.Module:
    """The AdaFace backbone with its trained weights, in eval mode on ``device``.

    Without ``ckpt_path`` the published checkpoint of ``architecture`` (default ``ir_50``) is
    taken from ``pretrained/`` (see :func:`utils.pretrained.find_pretrained_checkpoint`). With
    ``ckpt_path`` any checkpoint that ``utils.checkpoint`` reads is loaded; when
    ``architecture`` is None it is read from the checkpoint (its training arguments, else its
    keys). The file is read with the safe unpickler; ``trust=True`` allows the full one, which
    can run code stored in the file (:func:`utils.checkpoint.read_checkpoint`). Raises
    ``CheckpointError`` (:class:`utils.pretrained.MissingCheckpointError` saying what to download
    and where to put it) with the file named when a checkpoint is missing, refused or does not
    fit; ``ValueError`` for an unknown architecture or an unusable device.
    """
    device = resolve_device(device)
    if ckpt_path is None:
        architecture = architecture or DEFAULT_ARCH
        ckpt_path = find_pretrained_checkpoint(architecture, pretrained_dir)
    return load_pretrained_backbone(architecture, ckpt_path, device, trust=trust)


# -- aligning, embedding, comparing ---------------------------------------------------------

@dataclass
class FaceEmbedding:
    """The most confident face of one photo: its aligned crop, feature and feature norm."""

    name: str
    path: Path
    aligned: Image.Image
    faces_in_photo: int
    detection_score: float
    feature: Optional[np.ndarray] = None
    norm: Optional[float] = None            # the (fused) norm of ``feature``'s computation
    image_norm: Optional[float] = None      # mean of the norms of the face (and its mirror) before fusion
    quality: Optional[float] = None         # AdaFace's quality indicator of image_norm, in [-1, 1]


@dataclass
class InferenceResult:
    """Faces found (in file order) and the images skipped, each with the reason."""

    faces: List[FaceEmbedding] = field(default_factory=list)
    skipped: List[Tuple[Path, str]] = field(default_factory=list)

    @property
    def names(self) -> List[str]:
        return [f.name for f in self.faces]

    @property
    def features(self) -> np.ndarray:
        return np.stack([f.feature for f in self.faces]) if self.faces else np.zeros((0, 0))

    @property
    def norms(self) -> np.ndarray:
        return np.array([f.norm for f in self.faces], dtype=np.float64)

    @property
    def qualities(self) -> np.ndarray:
        """The quality indicator of each face (NaN where the checkpoint has no AdaFace statistics)."""
        return np.array([np.nan if f.quality is None else f.quality for f in self.faces], dtype=np.float64)

    @property
    def similarity(self) -> np.ndarray:
        return cosine_similarity_matrix(self.features)


def cosine_similarity_matrix(features: np.ndarray) -> np.ndarray:
    """Cosine similarities ``(N, N)`` of feature rows, in float64 and exactly symmetric.

    The rows are L2-normalised first (``concat`` fusion gives rows of norm sqrt(2))."""
    feats = np.asarray(features, dtype=np.float64)
    if feats.ndim != 2:
        raise ValueError(f"expected features of shape (N, D), got {feats.shape}")
    lengths = np.linalg.norm(feats, axis=1, keepdims=True)
    if np.any(lengths == 0):
        raise ValueError("a feature vector is all zeros; its cosine similarity is undefined")
    unit = feats / lengths
    sims = unit @ unit.T
    return (sims + sims.T) / 2


def align_images(paths: Sequence[Path], root: Optional[Path] = None,
                 mtcnn_weights: Union[str, Path, None] = None,
                 device: Union[str, torch.device] = 'cpu',
                 progress: bool = True, compat: str = "default") -> InferenceResult:
    """Detect and align the most confident face of each photo (what ``get_aligned_face`` returns;
    ``compat="published"``: the published photo alignment, see ``face_alignment.align``).

    Unreadable files and photos without a face are recorded in ``skipped`` with the reason.
    Names are the paths relative to ``root`` (or the file names).
    """
    get_detector(mtcnn_weights, device, compat)  # fail early on missing MTCNN weights
    result = InferenceResult()
    for path in tqdm(paths, desc="aligning", unit="img", disable=not progress):
        path = Path(path)
        name = path.relative_to(root).as_posix() if root is not None else path.name
        try:
            rgb = load_photo(path, compat)
        except ImageDecodeError as exc:
            result.skipped.append((path, f"unreadable ({exc})"))
            continue
        faces = detect_faces(rgb, weights_dir=mtcnn_weights, device=device, compat=compat)
        if not faces:
            result.skipped.append((path, "no face found"))
            continue
        result.faces.append(FaceEmbedding(name=name, path=path, aligned=faces[0].aligned,
                                          faces_in_photo=len(faces),
                                          detection_score=faces[0].score))
    return result


def load_norm_statistics(architecture: Optional[str] = None, ckpt_path: Union[str, Path, None] = None,
                         pretrained_dir: Union[str, Path, None] = None,
                         trust: bool = False) -> Optional[NormStatistics]:
    """AdaFace's norm statistics of the checkpoint :func:`load_pretrained_model` reads for the same
    arguments, or None (with a log line) when the checkpoint has none (another head, a bare backbone)."""
    if ckpt_path is None:
        ckpt_path = find_pretrained_checkpoint(architecture or DEFAULT_ARCH, pretrained_dir)
    try:
        return read_norm_statistics(ckpt_path, trust=trust)
    except QualityError as exc:
        logger.warning("%s", exc)
        return None


def embed_faces(model: nn.Module, result: InferenceResult, fusion_method: str = DEFAULT_FUSION,
                batch_size: int = EMBED_BATCH_SIZE,
                statistics: Optional[NormStatistics] = None) -> InferenceResult:
    """Fill in each face's feature and norm: ``to_input`` on the aligned crop, then the backbone
    (with the mirrored crop fused in by ``fusion_method`` unless it is ``'none'``); also its
    ``image_norm`` and, given the checkpoint's ``statistics``, its quality indicator."""
    if fusion_method not in FUSION_METHODS:
        raise ValueError(f"unknown fusion_method {fusion_method!r}; choose from "
                         f"{', '.join(FUSION_METHODS)}")
    device = next(model.parameters()).device
    model.eval()
    for start in range(0, len(result.faces), batch_size):
        chunk = result.faces[start:start + batch_size]
        images = torch.cat([to_input(face.aligned) for face in chunk]).to(device)
        features, norms, views = embed_batch_views(model, images, use_flip=fusion_method != "none",
                                                   fusion_method=fusion_method)
        single = image_norm(views.cpu().numpy())
        quality = statistics.indicator(single) if statistics is not None else [None] * len(chunk)
        for face, feature, norm, n, q in zip(chunk, features.cpu().numpy(), norms.cpu().numpy(), single, quality):
            face.feature, face.norm = feature, float(norm.reshape(-1)[0])
            face.image_norm, face.quality = float(n), (None if q is None else float(q))
    return result


def filter_by_quality(result: InferenceResult, min_quality: float) -> InferenceResult:
    """Move the faces whose quality indicator is below ``min_quality`` to ``result.skipped`` (with
    the reason); raises :class:`QualityError` when the indicator is unknown (no AdaFace statistics)."""
    if any(face.quality is None for face in result.faces):
        raise QualityError(f"--min_quality {min_quality:g}: the checkpoint has no AdaFace norm statistics, so "
                           f"faces have no quality indicator; use a checkpoint trained with the AdaFace head")
    kept = []
    for face in result.faces:
        if face.quality < min_quality:
            result.skipped.append((face.path, f"quality indicator {face.quality:+.3f} below --min_quality "
                                              f"{min_quality:g} (feature norm {face.image_norm:.3f})"))
        else:
            kept.append(face)
    result.faces = kept
    return result


def run_inference(model: nn.Module, image_dir: Union[str, Path],
                  fusion_method: str = DEFAULT_FUSION,
                  mtcnn_weights: Union[str, Path, None] = None,
                  progress: bool = True, compat: str = "default",
                  statistics: Optional[NormStatistics] = None,
                  min_quality: Optional[float] = None) -> InferenceResult:
    """Align every image under ``image_dir`` (recursively, sorted) and embed the faces with
    ``model``; MTCNN runs on the model's device (``compat``: see ``align_images``). With the
    checkpoint's ``statistics`` (:func:`load_norm_statistics`) each face gets its quality
    indicator; ``min_quality`` then skips the faces below it (:func:`filter_by_quality`)."""
    root = Path(image_dir)
    paths = list_images(root)
    device = next(model.parameters()).device
    result = align_images(paths, root=root, mtcnn_weights=mtcnn_weights, device=device,
                          progress=progress, compat=compat)
    result = embed_faces(model, result, fusion_method=fusion_method, statistics=statistics)
    if min_quality is not None:
        filter_by_quality(result, min_quality)
    return result


# -- reporting ------------------------------------------------------------------------------

def similarity_table(result: InferenceResult, digits: int = 4) -> PrettyTable:
    """The cosine similarity matrix with the image names as row and column headers."""
    table = PrettyTable([""] + result.names)
    for name, row in zip(result.names, result.similarity):
        table.add_row([name] + [f"{v:.{digits}f}" for v in row])
    table.align = "r"
    table.align[""] = "l"
    return table


def quality_table(result: InferenceResult) -> PrettyTable:
    """Per face: feature norm (AdaFace's quality score), its quality indicator on the checkpoint's
    scale, faces in the photo, MTCNN confidence."""
    table = PrettyTable(["image", "feature norm (quality)", "faces in photo", "detection score",
                         "quality indicator [-1, 1]"])
    for face in result.faces:
        table.add_row([face.name, f"{face.norm:.3f}", face.faces_in_photo, f"{face.detection_score:.4f}",
                       "-" if face.quality is None else f"{face.quality:+.3f}"])
    table.align = "r"
    table.align["image"] = "l"
    return table


# -- command line ---------------------------------------------------------------------------

def _parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    names = list(ARCHITECTURES) + list(SMALL_ARCHITECTURE_CONFIG)
    parser = argparse.ArgumentParser(
        description="Align the face in every photo of a folder (MTCNN), embed it with an AdaFace "
                    "backbone, and print the cosine similarity matrix and each face's feature norm "
                    "(AdaFace's image-quality proxy).",
        epilog=f"Published checkpoints go into pretrained/ under their published names "
               f"({', '.join(Path(p).name for p in adaface_models.values())}, ...); download "
               f"links: {PRETRAINED_MODELS_URL}")
    parser.add_argument("--image_dir", default=None,
                        help=f"folder of photos, searched recursively (default: "
                             f"{SAMPLE_IMAGE_DIR.relative_to(REPO_ROOT)}, where three public-domain "
                             f"sample photos are written if absent)")
    parser.add_argument("--architecture", "--arch", dest="architecture", default=None,
                        choices=names, metavar="ARCH",
                        help="backbone: picks the published checkpoint in pretrained/ "
                             "(ir_18, ir_50, ir_101; default ir_50), or names the architecture of "
                             "--ckpt_path (default: recognised from its keys)")
    parser.add_argument("--ckpt_path", default=None,
                        help="checkpoint file to load instead of the published one (Lightning "
                             "checkpoint or backbone state dict)")
    parser.add_argument("--trust_checkpoint", action="store_true",
                        help="read the checkpoint with the full unpickler, which can run code stored in "
                             "the file: only for files from a source you trust (by default anything but "
                             "tensors and training arguments is refused)")
    parser.add_argument("--pretrained_dir", default=str(PRETRAINED_DIR),
                        help="folder holding the published checkpoints (default: %(default)s)")
    parser.add_argument("--device", default="cpu",
                        help="torch device for MTCNN and the backbone: cpu (default), cuda, cuda:1")
    parser.add_argument("--fusion_method", default=DEFAULT_FUSION, choices=FUSION_METHODS,
                        help="flip test: fuse each face's features with those of its mirror image "
                             "('none', the default, embeds the face once as the published "
                             "inference.py does; the evaluation scripts use pre_norm_vector_add)")
    parser.add_argument("--mtcnn_weights", default=None,
                        help=f"folder with pnet.pt, rnet.pt, onet.pt (default: the facenet-pytorch "
                             f"wheel's data, `{INSTALL_HINT}`)")
    parser.add_argument("--export_onnx", default=None, metavar="PATH",
                        help="write the backbone to PATH as ONNX (dynamic batch axis; outputs "
                             "embedding and norm), check it against PyTorch with onnxruntime, and "
                             "exit without processing images")
    parser.add_argument("--min_quality", type=float, default=None, metavar="X",
                        help="skip (and list) faces whose AdaFace quality indicator (in [-1, 1], from "
                             "the checkpoint's norm statistics; 0 = the mean training norm) is below X")
    parser.add_argument("--no_progress", action="store_true", help="hide the progress bar")
    add_compat_argument(parser)
    return parser.parse_args(argv)


def _image_folder(image_dir: Optional[str]) -> Path:
    if image_dir is None or Path(image_dir).resolve() == SAMPLE_IMAGE_DIR:
        ensure_test_images(SAMPLE_IMAGE_DIR)
        return SAMPLE_IMAGE_DIR
    return Path(image_dir)


def _run(argv: Optional[Sequence[str]]) -> None:
    args = _parse_args(argv)
    model = load_pretrained_model(args.architecture, ckpt_path=args.ckpt_path,
                                  device=args.device, pretrained_dir=args.pretrained_dir,
                                  trust=args.trust_checkpoint)
    if args.export_onnx:
        report = export_and_check(model, args.export_onnx)
        print(f"wrote {args.export_onnx} (input 'input' [batch, 3, 112, 112] BGR in [-1, 1]; "
              f"outputs 'embedding' [batch, 512], 'norm' [batch, 1])")
        print("onnxruntime vs PyTorch:")
        print(report.table())
        return

    image_dir = _image_folder(args.image_dir)
    if not image_dir.is_dir():
        raise FileNotFoundError(f"image folder not found: {image_dir}")
    if not list_images(image_dir):
        raise ValueError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) under {image_dir}")
    statistics = load_norm_statistics(args.architecture, args.ckpt_path, args.pretrained_dir,
                                      trust=args.trust_checkpoint)
    if args.min_quality is not None and statistics is None:
        raise QualityError(f"--min_quality {args.min_quality:g}: the checkpoint has no AdaFace norm statistics "
                           f"(head.batch_mean / head.batch_std), so faces have no quality indicator")
    result = run_inference(model, image_dir, fusion_method=args.fusion_method,
                           mtcnn_weights=args.mtcnn_weights, progress=not args.no_progress,
                           compat=args.compat, statistics=statistics, min_quality=args.min_quality)
    for path, reason in result.skipped:
        print(f"skipped {path}: {reason}")
    if not result.faces:
        if args.min_quality is not None:
            raise ValueError(f"no face under {image_dir} has a quality indicator of at least --min_quality "
                             f"{args.min_quality:g} (see the skipped lines above)")
        raise ValueError(f"no face found in any image under {image_dir}")
    print(f"cosine similarity ({model.arch if hasattr(model, 'arch') else 'backbone'}, "
          f"fusion: {args.fusion_method}):")
    print(similarity_table(result))
    print("feature norm (AdaFace's quality score: higher means a clearer, more recognisable face) and "
          "its quality indicator (the norm on the checkpoint's training scale: 0 = the mean training norm; "
          f"{_statistics_text(statistics)}):")
    print(quality_table(result))


def _statistics_text(statistics: Optional[NormStatistics]) -> str:
    if statistics is None:
        return "the checkpoint has no AdaFace statistics"
    return (f"mean {statistics.batch_mean:.3f}, std {statistics.batch_std:.3f}, h {statistics.h:g}, "
            f"i.e. -1 / +1 = {1 / statistics.h:.3g} std below / above")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point; returns the exit status (0 success, 2 bad input: a missing or
    unfitting checkpoint, missing MTCNN weights, no image or no face, a failed ONNX export)."""
    return run_cli(_run, argv)


if __name__ == "__main__":
    sys.exit(main())
