"""The one image convention of the project (see README "Image conventions").

Every path that turns a picture into network input goes through this module:

* files and encoded bytes (JPEG/PNG inside RecordIO packs, ``.bin`` pair sets and image folders)
  hold **true colours** and decode to RGB ``uint8`` arrays of shape ``(H, W, 3)``;
* the network sees **BGR** float32 tensors of shape ``(3, 112, 112)`` with values
  ``(pixel / 255 - 0.5) / 0.5`` in ``[-1, 1]`` (what the published AdaFace checkpoints were trained on);
* ``swap_color_channel=True`` is for sources whose files hold red and blue swapped: the channels
  are exchanged right after decoding, so the network again sees true-colour BGR.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import List, Union

import cv2
import numpy as np
import torch
from PIL import Image

from utils.errors import UserError

logger = logging.getLogger(__name__)

INPUT_SIZE = 112
MEAN = 0.5
STD = 0.5

#: File endings read as images: those of torchvision's ``ImageFolder``, so that a training folder
#: lists the same samples as the published code.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class ImageDecodeError(UserError, ValueError):
    """An image file or byte string could not be decoded."""


def decode_image_bytes(data: bytes, source: str = "<bytes>") -> np.ndarray:
    """Decode encoded image bytes (JPEG, PNG, ...) to an RGB ``uint8`` array ``(H, W, 3)``.

    ``source`` names where the bytes came from (file, record key) for error messages.
    Greyscale images are expanded to three channels; an alpha channel is dropped.
    """
    if not data:
        raise ImageDecodeError(f"{source}: empty image data")
    buf = np.frombuffer(data, dtype=np.uint8)
    bgr = cv2.imdecode(buf, cv2.IMREAD_COLOR)
    if bgr is None:
        raise ImageDecodeError(f"{source}: not a decodable image ({len(data)} bytes, "
                               f"starts with {bytes(data[:4])!r})")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def is_image_file(name: Union[str, Path]) -> bool:
    """Whether a file name has an image ending (any case) and is not hidden (``.``-prefixed, such
    as the ``._x.jpg`` files that macOS leaves beside copies)."""
    name = Path(name).name
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def list_images(folder: Union[str, Path]) -> List[Path]:
    """The image files below ``folder`` (recursive), sorted by path (part by part, as pathlib
    compares paths); raises ``FileNotFoundError`` naming the folder when it is absent."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    return sorted(p for p in folder.rglob("*") if is_image_file(p) and p.is_file())


def load_image_file(path: Union[str, Path]) -> np.ndarray:
    """Read an image file from disk as an RGB ``uint8`` array; errors name the file."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ImageDecodeError(f"{path}: cannot read file ({exc.strerror or exc})") from exc
    return decode_image_bytes(data, str(path))


def encode_jpeg(rgb: np.ndarray, quality: int = 95) -> bytes:
    """Encode an RGB ``uint8`` array as JPEG bytes (true colours, as in the public packs)."""
    ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(rgb[:, :, ::-1]),
                           [int(cv2.IMWRITE_JPEG_QUALITY), int(quality)])
    if not ok:
        raise ValueError("JPEG encoding failed")
    return buf.tobytes()


def encode_png(rgb: np.ndarray) -> bytes:
    """Encode an RGB ``uint8`` array as PNG bytes (lossless)."""
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(rgb[:, :, ::-1]))
    if not ok:
        raise ValueError("PNG encoding failed")
    return buf.tobytes()


def swap_red_blue(image: np.ndarray) -> np.ndarray:
    """Exchange the first and last channel of an ``(H, W, 3)`` array (RGB <-> BGR)."""
    return np.ascontiguousarray(image[:, :, ::-1])


def check_input_size(rgb: np.ndarray, source: str = "<image>", size: int = INPUT_SIZE) -> None:
    """Raise a clear error unless ``rgb`` is a ``size`` x ``size`` 3-channel image."""
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.shape[0] != size or rgb.shape[1] != size:
        raise ValueError(f"{source}: expected an aligned {size}x{size} RGB face image, "
                         f"got an array of shape {tuple(rgb.shape)}")


def rgb_to_input_array(rgb: np.ndarray) -> np.ndarray:
    """RGB ``uint8`` ``(H, W, 3)`` -> network input as float32 ``(3, H, W)``, BGR, in [-1, 1]."""
    bgr = rgb[:, :, ::-1].astype(np.float32)
    chw = np.ascontiguousarray(bgr.transpose(2, 0, 1))
    chw *= 1.0 / (255.0 * STD)
    chw -= MEAN / STD
    return chw


def rgb_to_tensor(rgb: np.ndarray) -> torch.Tensor:
    """RGB ``uint8`` ``(H, W, 3)`` -> float32 tensor ``(3, H, W)``, BGR, ``(x/255 - 0.5)/0.5``."""
    return torch.from_numpy(rgb_to_input_array(rgb))


def input_to_rgb(tensor: Union[torch.Tensor, np.ndarray]) -> np.ndarray:
    """Inverse of :func:`rgb_to_tensor` for one image ``(3, H, W)``: back to RGB ``uint8``."""
    arr = tensor.detach().cpu().numpy() if isinstance(tensor, torch.Tensor) else np.asarray(tensor)
    hwc = (arr.transpose(1, 2, 0) * STD + MEAN) * 255.0
    return np.clip(np.rint(hwc), 0, 255).astype(np.uint8)[:, :, ::-1].copy()


def to_input(pil_rgb_image: Image.Image) -> torch.Tensor:
    """An aligned 112x112 RGB PIL face -> the network's input batch ``(1, 3, 112, 112)``."""
    rgb = np.asarray(pil_rgb_image.convert("RGB"), dtype=np.uint8)
    check_input_size(rgb, "to_input")
    return rgb_to_tensor(rgb).unsqueeze(0)
