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
from typing import Callable, Dict, List, Union

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


if __name__ == "__main__":
    import sys

    from utils.cli import setup_logging

    setup_logging()
    for written in ensure_test_images(sys.argv[1] if len(sys.argv) > 1 else None):
        print(written)
