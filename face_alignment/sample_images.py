"""Redistributable test photographs, written on demand from installed packages' sample data.

Nothing binary is committed: :func:`ensure_test_images` creates the JPEGs when they are absent.

* ``astronaut.jpg`` — ``skimage.data.astronaut()`` (Eileen Collins, NASA, public domain); one face.
* ``camera.jpg`` — ``skimage.data.camera()`` (greyscale, saved as RGB; released by its author
  without copyright restrictions); one face.
* ``grace_hopper.jpg`` — matplotlib's ``mpl-data/sample_data/grace_hopper.jpg`` (US Navy, public
  domain), copied byte for byte; one face.
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Callable, Dict, List, Tuple, Union

import numpy as np

from utils.image import encode_jpeg

logger = logging.getLogger(__name__)

DEFAULT_DIR = Path(__file__).resolve().parent / "test_images"
JPEG_QUALITY = 95


def _astronaut(path: Path) -> None:
    from skimage import data
    path.write_bytes(encode_jpeg(data.astronaut(), quality=JPEG_QUALITY))


def _camera(path: Path) -> None:
    from skimage import data
    grey = data.camera()
    path.write_bytes(encode_jpeg(np.repeat(grey[:, :, None], 3, axis=2), quality=JPEG_QUALITY))


def _grace_hopper(path: Path) -> None:
    import matplotlib
    source = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    if not source.is_file():
        raise FileNotFoundError(f"matplotlib's sample photo is missing: {source}")
    shutil.copyfile(source, path)


SAMPLES: Dict[str, Callable[[Path], None]] = {
    "astronaut.jpg": _astronaut,
    "camera.jpg": _camera,
    "grace_hopper.jpg": _grace_hopper,
}


def ensure_test_images(directory: Union[str, Path, None] = None) -> List[Path]:
    """Write the sample photos into ``directory`` (default ``face_alignment/test_images``) if absent;
    returns their paths in the order astronaut, camera, grace_hopper."""
    folder = Path(directory) if directory is not None else DEFAULT_DIR
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, write in SAMPLES.items():
        path = folder / name
        if not path.is_file():
            tmp = path.with_name(path.name + ".part")
            write(tmp)
            tmp.replace(path)
            logger.info("wrote sample photo %s", path)
        paths.append(path)
    return paths


def portrait_arrays() -> Dict[str, np.ndarray]:
    """The three sample portraits as RGB ``uint8`` arrays, decoded without a JPEG round trip:
    skimage's astronaut and camera (greyscale repeated to RGB) as shipped, matplotlib's
    grace_hopper.jpg decoded by PIL (the published code's decoder)."""
    import matplotlib
    from PIL import Image
    from skimage import data

    hopper = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    with Image.open(hopper) as img:
        hopper_rgb = np.asarray(img.convert("RGB"))
    return {"astronaut": np.ascontiguousarray(data.astronaut()),
            "camera": np.repeat(data.camera()[:, :, None], 3, axis=2),
            "grace_hopper": hopper_rgb}


def closeup_photos() -> Dict[str, np.ndarray]:
    """Two portraits cut so tightly that the detector's boxes leave the image (where box
    clipping matters): ``astronaut_closeup`` (rows 60-190, columns 175-275) and
    ``grace_hopper_closeup`` (rows 30-260, columns 150-380)."""
    photos = portrait_arrays()
    return {"astronaut_closeup": np.ascontiguousarray(photos["astronaut"][60:190, 175:275]),
            "grace_hopper_closeup": np.ascontiguousarray(photos["grace_hopper"][30:260, 150:380])}


def _paste(canvas: np.ndarray, tile: np.ndarray, x: int, y: int) -> None:
    canvas[y:y + tile.shape[0], x:x + tile.shape[1]] = tile


def group_photos() -> Dict[str, Tuple[np.ndarray, int]]:
    """Synthetic group photos made from the shipped real photos: ``name -> (RGB array, faces
    pasted)``. Deterministic (PIL bilinear resizes onto a plain grey canvas).

    * ``portraits_3sizes``: the three portraits, each at 60 %, 40 % and 28 % of its size
      (9 faces of about 25-120 px).
    * ``lfw_grid_24``: 24 LFW faces (``skimage.data.lfw_subset()``, the first 100 are faces),
      upscaled to 96, 72 and 56 px, 8 per size, in a grid with gaps.
    """
    from PIL import Image
    from skimage import data

    photos = portrait_arrays()
    canvas = np.full((790, 1000, 3), 128, dtype=np.uint8)
    x_at = 0
    for name in ("astronaut", "camera", "grace_hopper"):
        y_at = 0
        for frac in (0.6, 0.4, 0.28):
            img = Image.fromarray(photos[name])
            size = (round(img.width * frac), round(img.height * frac))
            tile = np.asarray(img.resize(size, Image.BILINEAR))
            _paste(canvas, tile, x_at, y_at)
            y_at += tile.shape[0] + 4
            if frac == 0.6:
                x_next = x_at + tile.shape[1] + 4
        x_at = x_next
    portraits = (canvas[:, :x_at], 9)

    faces = (data.lfw_subset()[:24] * 255).round().astype(np.uint8)
    grid = np.full((3 * 96 + 4 * 20, 8 * 96 + 9 * 20, 3), 128, dtype=np.uint8)
    for i, face in enumerate(faces):
        side = (96, 72, 56)[i // 8]
        tile = np.asarray(Image.fromarray(face).resize((side, side), Image.BILINEAR))
        _paste(grid, np.repeat(tile[:, :, None], 3, axis=2),
               20 + (i % 8) * 116, 20 + (i // 8) * 116)
    return {"portraits_3sizes": portraits, "lfw_grid_24": (grid, 24)}


if __name__ == "__main__":
    import sys

    from utils.cli import setup_logging

    setup_logging()
    for written in ensure_test_images(sys.argv[1] if len(sys.argv) > 1 else None):
        print(written)
