"""AdaFace's training augmentations: crop with zero padding, low resolution, photometric.

This follows the published AdaFace augmenter (``dataset/augmenter.py`` of mk-minchul/AdaFace)
step for step, in this order, each step with its own probability:

1. **crop** (``crop_augmentation_prob``): ``torchvision``'s ``RandomResizedCrop.get_params``
   with scale ``(0.2, 1.0)`` and ratio ``(3/4, 4/3)`` picks a box ``(i, j, h, w)``; the box is
   kept at its own position inside an otherwise black image of the original size (no resizing).
2. **low resolution** (``low_res_augmentation_prob``): a side ratio ``r ~ U(0.2, 1.0)``; the
   image is resized to ``int(r * H)`` squared with an interpolation drawn from cv2's nearest /
   linear / area / cubic / Lanczos-4 and resized back to its original size with an independently
   drawn one.
3. **photometric** (``photometric_augmentation_prob``): ``ColorJitter(brightness=0.5, contrast=0.5,
   saturation=0.5, hue=0)`` factors and random order (``ColorJitter.get_params``), applied to a PIL
   image with ``torchvision.transforms.functional.adjust_*`` as in the published code.

Random numbers come from the same sources as in the published code: the coin flips and the
low-resolution draws from NumPy (the global ``np.random`` state, or the ``rng`` given to the
constructor or to :meth:`Augmenter.augment`), the crop box and the jitter factors from torch's
global generator. A ``numpy.random.RandomState`` as ``rng`` draws exactly as ``np.random`` seeded
the same way (the published augmenter, draw for draw); a ``numpy.random.Generator`` works too.
Training (``data.py``) passes each sample its own ``RandomState`` and seeds torch's generator for
that sample (``utils.seeding.sample_random_state``), so every draw is a function of (seed, epoch,
sample index) only, in any process or DataLoader worker.
Do not share one constructor ``rng`` object between DataLoader workers (every worker would get a
copy of it and produce the same augmentations).

The horizontal flip and the conversion to network input are not part of the augmenter: the training
datasets (``data.py``) flip with probability 0.5 and then call ``utils.image.rgb_to_tensor``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Optional, Tuple, Union

import cv2
import numpy as np
import torch
from PIL import Image
from torchvision import transforms
from torchvision.transforms import functional as TF

logger = logging.getLogger(__name__)

CROP_SCALE = (0.2, 1.0)
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
LOW_RES_SIDE_RATIO = (0.2, 1.0)
JITTER_STRENGTH = 0.5  # brightness, contrast and saturation factors in [0.5, 1.5]; hue untouched
RESIZE_INTERPOLATIONS = (cv2.INTER_NEAREST, cv2.INTER_LINEAR, cv2.INTER_AREA, cv2.INTER_CUBIC,
                         cv2.INTER_LANCZOS4)
INTERPOLATION_NAMES = {cv2.INTER_NEAREST: "nearest", cv2.INTER_LINEAR: "linear",
                       cv2.INTER_AREA: "area", cv2.INTER_CUBIC: "cubic",
                       cv2.INTER_LANCZOS4: "lanczos4"}

ImageLike = Union[np.ndarray, Image.Image]
NumpyRandom = Union[np.random.Generator, np.random.RandomState]


@dataclass
class AugmentInfo:
    """What one call of :meth:`Augmenter.augment_with_info` did (for analysis and tests).

    ``crop_box`` is ``(i, j, h, w)`` (top, left, height, width) or ``None``; ``crop_ratio`` is the
    published ``min(h, w) / max(H, W)`` (1.0 without crop); ``low_res_ratio`` the side ratio of the
    low-resolution step (1.0 without it); ``photometric`` the applied ``(name, factor)`` steps in
    order (empty without it).
    """

    crop_box: Optional[Tuple[int, int, int, int]] = None
    crop_ratio: float = 1.0
    low_res_ratio: float = 1.0
    low_res_interpolations: Optional[Tuple[int, int]] = None
    photometric: Tuple[Tuple[str, float], ...] = field(default_factory=tuple)

    @property
    def information_score(self) -> float:
        """The published ``resize_ratio * crop_ratio`` (how much of the original detail is left)."""
        return self.low_res_ratio * self.crop_ratio


def _check_probability(name: str, value: float) -> float:
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {value}")
    return value


def _as_rgb_array(image: ImageLike) -> np.ndarray:
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.uint8)
    arr = np.asarray(image)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"Augmenter expects an RGB uint8 image of shape (H, W, 3), "
                         f"got dtype {arr.dtype} and shape {tuple(arr.shape)}")
    return arr


class Augmenter:
    """AdaFace's crop / low-resolution / photometric augmenter on RGB ``uint8`` images.

    The three probabilities are in the published argument order. :meth:`augment` takes an RGB
    ``uint8`` array ``(H, W, 3)`` or a PIL image and returns the same kind it was given.
    """

    def __init__(self, crop_augmentation_prob: float, photometric_augmentation_prob: float,
                 low_res_augmentation_prob: float, rng: Optional[NumpyRandom] = None):
        self.crop_augmentation_prob = _check_probability("crop_augmentation_prob",
                                                         crop_augmentation_prob)
        self.photometric_augmentation_prob = _check_probability("photometric_augmentation_prob",
                                                                photometric_augmentation_prob)
        self.low_res_augmentation_prob = _check_probability("low_res_augmentation_prob",
                                                            low_res_augmentation_prob)
        self.rng = rng
        self.color_jitter = transforms.ColorJitter(brightness=JITTER_STRENGTH,
                                                   contrast=JITTER_STRENGTH,
                                                   saturation=JITTER_STRENGTH, hue=0)

    @property
    def is_identity(self) -> bool:
        """True when every probability is zero (the augmenter never changes an image)."""
        return (self.crop_augmentation_prob == 0.0 and self.photometric_augmentation_prob == 0.0
                and self.low_res_augmentation_prob == 0.0)

    def _numpy_random(self, rng: Optional[NumpyRandom]) -> Any:
        """Where this call's NumPy draws come from: ``rng``, the constructor's, or ``np.random``."""
        if rng is not None:
            return rng
        return self.rng if self.rng is not None else np.random

    # -- the pipeline ----------------------------------------------------------------------------
    def augment(self, image: ImageLike, rng: Optional[NumpyRandom] = None) -> ImageLike:
        """Apply the three augmentations, each with its probability; return the same image type.
        ``rng`` (NumPy draws of this call) overrides the constructor's ``rng``."""
        return self.augment_with_info(image, rng)[0]

    def augment_with_info(self, image: ImageLike, rng: Optional[NumpyRandom] = None
                          ) -> Tuple[ImageLike, AugmentInfo]:
        """Like :meth:`augment`, also returning an :class:`AugmentInfo` with what was applied."""
        numpy_random = self._numpy_random(rng)
        as_pil = isinstance(image, Image.Image)
        rgb = _as_rgb_array(image)
        info = AugmentInfo()

        if float(numpy_random.random()) < self.crop_augmentation_prob:
            rgb, info.crop_box = self.crop_augment(rgb)
            _, _, h, w = info.crop_box
            info.crop_ratio = min(h, w) / max(rgb.shape[0], rgb.shape[1])

        if float(numpy_random.random()) < self.low_res_augmentation_prob:
            rgb, info.low_res_ratio, info.low_res_interpolations = self.low_res_augment(
                rgb, numpy_random)

        if float(numpy_random.random()) < self.photometric_augmentation_prob:
            rgb, info.photometric = self.photometric_augment(rgb)

        return (Image.fromarray(rgb) if as_pil else rgb), info

    def crop_augment(self, rgb: np.ndarray) -> Tuple[np.ndarray, Tuple[int, int, int, int]]:
        """Keep a RandomResizedCrop box at its own place in a black image of the same size."""
        height, width = rgb.shape[:2]
        # get_params only reads the image size; a broadcast view avoids allocating an image.
        size_probe = torch.zeros(()).expand(1, height, width)
        i, j, h, w = transforms.RandomResizedCrop.get_params(size_probe, list(CROP_SCALE),
                                                             list(CROP_RATIO))
        out = np.zeros_like(rgb)
        out[i:i + h, j:j + w] = rgb[i:i + h, j:j + w]
        return out, (int(i), int(j), int(h), int(w))

    def low_res_augment(self, rgb: np.ndarray, rng: Optional[NumpyRandom] = None
                        ) -> Tuple[np.ndarray, float, Tuple[int, int]]:
        """Down-scale by a random side ratio and back up, each way with a random interpolation
        (NumPy draws from ``rng``, else the constructor's ``rng``, else ``np.random``).

        Returns the image, the side ratio and the (down, up) cv2 interpolation flags.
        """
        numpy_random = self._numpy_random(rng)
        height, width = rgb.shape[:2]
        side_ratio = float(numpy_random.uniform(*LOW_RES_SIDE_RATIO))
        # The published code sizes the small image from the height only (square), as here.
        small_side = max(1, int(side_ratio * height))
        down = int(numpy_random.choice(RESIZE_INTERPOLATIONS))
        small = cv2.resize(rgb, (small_side, small_side), interpolation=down)
        up = int(numpy_random.choice(RESIZE_INTERPOLATIONS))
        restored = cv2.resize(small, (width, height), interpolation=up)
        return restored, side_ratio, (down, up)

    def photometric_augment(self, rgb: np.ndarray
                            ) -> Tuple[np.ndarray, Tuple[Tuple[str, float], ...]]:
        """ColorJitter's brightness / contrast / saturation in ColorJitter's random order (PIL)."""
        jitter = self.color_jitter
        order, brightness, contrast, saturation, _hue = jitter.get_params(
            jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue)
        pil = Image.fromarray(rgb)
        applied = []
        for fn_id in order.tolist():
            if fn_id == 0 and brightness is not None:
                pil = TF.adjust_brightness(pil, brightness)
                applied.append(("brightness", brightness))
            elif fn_id == 1 and contrast is not None:
                pil = TF.adjust_contrast(pil, contrast)
                applied.append(("contrast", contrast))
            elif fn_id == 2 and saturation is not None:
                pil = TF.adjust_saturation(pil, saturation)
                applied.append(("saturation", saturation))
        return np.asarray(pil, dtype=np.uint8), tuple(applied)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(crop_augmentation_prob={self.crop_augmentation_prob}, "
                f"photometric_augmentation_prob={self.photometric_augmentation_prob}, "
                f"low_res_augmentation_prob={self.low_res_augmentation_prob})")
