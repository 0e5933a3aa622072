"""Public face-alignment API: detect faces with MTCNN and align them to 112x112 RGB crops.

* :func:`get_aligned_face` — the most prominent face of one photo as a 112x112 RGB PIL image, or
  None. "Most prominent" follows the published AdaFace code (``align_multi(img, limit=1)``): the
  detection with the highest O-Net confidence.
* :func:`detect_faces` — every face of an image (box, score, landmarks, aligned crop).
* :func:`align_folder` — align every image of a folder tree into another tree, with a progress bar
  and a summary of faces found and missed. Also a CLI:
  ``python -m face_alignment.align SRC_DIR DST_DIR [--mtcnn_weights DIR] [--device cuda]
  [--compat published]``.

Every function takes ``compat``: ``"default"`` (P-Net's softmax over its channels, forward
least-squares similarity; the crop InsightFace made for MS1MV2) or ``"published"`` (the published
photo pipeline exactly: P-Net's softmax over the last axis, the ``matlab_cp2tform`` transform with
its reflective candidate, files decoded by PIL without EXIF orientation). Both return the faces in
the same order (highest O-Net confidence first, ties as in the published NMS). The CLIs take
``--compat published``. The README's "Align and infer" section measures the difference.

The detector is built on first use and cached per (weights folder, device, compat).
"""
from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image
from prettytable import PrettyTable
from tqdm import tqdm

from face_alignment.mtcnn import COMPAT_MODES, MTCNN, check_compat, to_rgb_array
from face_alignment.nets import INSTALL_HINT, find_weights_dir
from face_alignment.similarity import align_face
from utils.cli import run_cli
from utils.device import resolve_device
from utils.image import IMAGE_EXTENSIONS, ImageDecodeError, encode_jpeg, encode_png, list_images, load_image_file

logger = logging.getLogger(__name__)

_DETECTORS: Dict[Tuple[str, str, str], MTCNN] = {}


@dataclass
class Face:
    """One detected face: ``box`` (x1, y1, x2, y2), O-Net ``score``, ``landmarks`` (5, 2) pixel
    (x, y) of left eye, right eye, nose, left and right mouth corner, and the ``aligned`` 112x112
    RGB crop."""

    box: np.ndarray
    score: float
    landmarks: np.ndarray
    aligned: Image.Image


def get_detector(weights_dir: Union[str, Path, None] = None,
                 device: Union[str, torch.device] = "cpu", compat: str = "default") -> MTCNN:
    """The cached MTCNN detector for this weights folder, device and compat mode (built on first
    call)."""
    key = (str(find_weights_dir(weights_dir).resolve()), str(torch.device(device)),
           check_compat(compat))
    if key not in _DETECTORS:
        _DETECTORS[key] = MTCNN(weights_dir=key[0], device=device, compat=compat)
    return _DETECTORS[key]


def detect_faces(rgb_image: Union[np.ndarray, Image.Image],
                 weights_dir: Union[str, Path, None] = None,
                 device: Union[str, torch.device] = "cpu", compat: str = "default") -> List[Face]:
    """All faces in an RGB image (array or PIL), highest confidence first, each aligned
    (``compat``: see the module docstring)."""
    rgb = to_rgb_array(rgb_image)
    det = get_detector(weights_dir, device, compat).detect(rgb)
    return [Face(box=det.boxes[i].copy(), score=float(det.scores[i]),
                 landmarks=det.landmarks[i].copy(),
                 aligned=Image.fromarray(align_face(rgb, det.landmarks[i], compat=compat)))
            for i in range(len(det))]


def load_photo(path: Path, compat: str = "default") -> np.ndarray:
    """Decode a photo file to RGB: OpenCV with EXIF orientation applied (default), or PIL's
    ``Image.open(path).convert('RGB')`` without it, as the published code (``"published"``).
    Undecodable files raise ``ImageDecodeError`` (a ``ValueError``) naming the file."""
    if check_compat(compat) == "default":
        return load_image_file(path)
    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageDecodeError(f"{path}: cannot decode image ({exc})") from exc


def _load_rgb(image_path: Union[str, Path], compat: str = "default") -> np.ndarray:
    path = Path(image_path)
    if not path.exists():
        raise FileNotFoundError(f"image file not found: {path}")
    if not path.is_file():
        raise ValueError(f"{path}: not a file")
    return load_photo(path, compat)


def _most_prominent(rgb: np.ndarray, weights_dir, device,
                    compat: str = "default") -> Optional[Image.Image]:
    """Aligned crop of the most confident face (the published choice), or None."""
    det = get_detector(weights_dir, device, compat).detect(rgb)
    if len(det) == 0:
        return None
    return Image.fromarray(align_face(rgb, det.landmarks[0], compat=compat))


def get_aligned_face(image_path: Union[str, Path, None],
                     rgb_pil_image: Optional[Image.Image] = None,
                     weights_dir: Union[str, Path, None] = None,
                     device: Union[str, torch.device] = "cpu",
                     compat: str = "default") -> Optional[Image.Image]:
    """The most confident face of a photo, aligned to a 112x112 RGB PIL image; None if no face.

    The photo is read from ``image_path`` unless ``rgb_pil_image`` is given (then the path only
    names it in messages). A missing file raises ``FileNotFoundError``; an undecodable one a
    ``ValueError`` naming the path. When no face is found a warning says so and None is returned.
    Files are decoded by ``utils.image.load_image_file`` (OpenCV, which applies the EXIF
    orientation; the published code opened them with PIL, which does not, and so does
    ``compat="published"``).
    """
    check_compat(compat)
    if rgb_pil_image is not None:
        if not isinstance(rgb_pil_image, Image.Image):
            raise TypeError(f"rgb_pil_image must be a PIL image, got {type(rgb_pil_image).__name__}")
        rgb = to_rgb_array(rgb_pil_image)
        name = str(image_path) if image_path is not None else "<PIL image>"
    elif image_path is None:
        raise ValueError("get_aligned_face needs an image_path or an rgb_pil_image")
    else:
        rgb = _load_rgb(image_path, compat)
        name = str(image_path)
    face = _most_prominent(rgb, weights_dir, device, compat)
    if face is None:
        logger.warning("no face found in %s", name)
    return face


@dataclass
class AlignSummary:
    """Outcome of :func:`align_folder`."""

    found: int = 0
    no_face: List[Path] = field(default_factory=list)
    unreadable: List[Path] = field(default_factory=list)
    skipped_existing: int = 0

    @property
    def total(self) -> int:
        return self.found + len(self.no_face) + len(self.unreadable) + self.skipped_existing

    def table(self) -> PrettyTable:
        table = PrettyTable(["images", "aligned", "no face", "unreadable", "already aligned"])
        table.add_row([self.total, self.found, len(self.no_face), len(self.unreadable),
                       self.skipped_existing])
        return table


def aligned_path(src_file: Path, src_dir: Path, dst_dir: Path) -> Path:
    """Where :func:`align_folder` writes the crop of ``src_file``: same relative path; JPEGs stay
    JPEG, every other format is written as PNG."""
    rel = src_file.relative_to(src_dir)
    if rel.suffix.lower() in (".jpg", ".jpeg"):
        return dst_dir / rel
    return dst_dir / rel.with_suffix(".png")


def align_folder(src_dir: Union[str, Path], dst_dir: Union[str, Path],
                 weights_dir: Union[str, Path, None] = None,
                 device: Union[str, torch.device] = "cpu",
                 overwrite: bool = False, progress: bool = True,
                 compat: str = "default") -> AlignSummary:
    """Align the most confident face of every image under ``src_dir`` into ``dst_dir``.

    The folder structure is kept (see :func:`aligned_path`); images without a face or that cannot
    be decoded are skipped and listed in the returned summary. Existing outputs are kept unless
    ``overwrite``. ``compat``: see the module docstring.
    """
    src, dst = Path(src_dir), Path(dst_dir)
    files = list_images(src)
    if not files:
        logger.warning("no image files (%s) under %s", ", ".join(IMAGE_EXTENSIONS), src)
    detector = get_detector(weights_dir, device, compat)
    summary = AlignSummary()
    for path in tqdm(files, desc=f"aligning {src.name}", unit="img", disable=not progress):
        out = aligned_path(path, src, dst)
        if out.exists() and not overwrite:
            summary.skipped_existing += 1
            continue
        try:
            rgb = load_photo(path, compat)
        except ImageDecodeError as exc:
            logger.warning("skipping unreadable image: %s", exc)
            summary.unreadable.append(path)
            continue
        det = detector.detect(rgb)
        if len(det) == 0:
            logger.debug("no face found in %s", path)
            summary.no_face.append(path)
            continue
        aligned = align_face(rgb, det.landmarks[0], compat=compat)
        out.parent.mkdir(parents=True, exist_ok=True)
        is_jpeg = out.suffix.lower() in (".jpg", ".jpeg")
        data = encode_jpeg(aligned) if is_jpeg else encode_png(aligned)
        out.write_bytes(data)
        summary.found += 1
    logger.info("aligned %d of %d images from %s into %s (%d without a face, %d unreadable, "
                "%d already aligned)", summary.found, summary.total, src, dst,
                len(summary.no_face), len(summary.unreadable), summary.skipped_existing)
    return summary


def add_compat_argument(parser: argparse.ArgumentParser) -> None:
    """The ``--compat`` flag of the alignment CLIs."""
    parser.add_argument("--compat", choices=COMPAT_MODES, default="default",
                        help="'published' reproduces the published photo alignment exactly "
                             "(P-Net softmax over the last axis, cp2tform-style transform, PIL "
                             "decoding); default: softmax over the channels, forward "
                             "least-squares similarity")


def _run(argv: Optional[Sequence[str]]) -> None:
    parser = argparse.ArgumentParser(
        description="Align the most confident face of every image in a folder tree to 112x112 "
                    "(MTCNN + 5-point similarity transform).")
    parser.add_argument("src_dir", help="folder of photos (searched recursively)")
    parser.add_argument("dst_dir", help="output folder; the folder structure is kept")
    parser.add_argument("--mtcnn_weights", default=None,
                        help=f"folder holding pnet.pt, rnet.pt, onet.pt (default: the data of "
                             f"the facenet-pytorch wheel, installed with `{INSTALL_HINT}`)")
    parser.add_argument("--device", default="cpu", help="torch device for MTCNN, e.g. cpu, cuda")
    parser.add_argument("--overwrite", action="store_true", help="redo images already aligned")
    add_compat_argument(parser)
    args = parser.parse_args(argv)
    summary = align_folder(args.src_dir, args.dst_dir, weights_dir=args.mtcnn_weights,
                           device=resolve_device(args.device), overwrite=args.overwrite,
                           compat=args.compat)
    print(summary.table())
    for path in summary.no_face:
        print(f"no face: {path}")
    for path in summary.unreadable:
        print(f"unreadable: {path}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m face_alignment.align SRC DST``; a missing folder or MTCNN weights end with one
    error line and exit status 2."""
    return run_cli(_run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
