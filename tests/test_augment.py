"""Tests of utils.augment: probabilities, crop position, low resolution, photometric bounds, and
agreement with a straightforward re-statement of the published AdaFace augmenter."""
from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance
from torchvision import transforms

from utils.augment import (CROP_RATIO, CROP_SCALE, LOW_RES_SIDE_RATIO, RESIZE_INTERPOLATIONS,
                           Augmenter)


def _textured_image(seed: int = 0, size: int = 112) -> np.ndarray:
    """An RGB image with no zero pixel (so a black region can only come from the crop)."""
    return np.random.default_rng(seed).integers(1, 256, size=(size, size, 3), dtype=np.uint8)


def test_zero_probabilities_never_change_the_image():
    aug = Augmenter(0.0, 0.0, 0.0)
    img = _textured_image()
    for _ in range(50):
        out, info = aug.augment_with_info(img)
        assert np.array_equal(out, img)
        assert info.crop_box is None and info.low_res_ratio == 1.0 and info.photometric == ()
    assert aug.is_identity


def test_probability_one_always_applies_every_step():
    aug = Augmenter(1.0, 1.0, 1.0)
    img = _textured_image()
    for _ in range(30):
        out, info = aug.augment_with_info(img)
        assert info.crop_box is not None
        assert LOW_RES_SIDE_RATIO[0] <= info.low_res_ratio < LOW_RES_SIDE_RATIO[1]
        assert sorted(name for name, _ in info.photometric) == ["brightness", "contrast",
                                                                "saturation"]
        assert out.shape == img.shape and out.dtype == np.uint8
        assert not np.array_equal(out, img)


def test_frequencies_match_probability_point_two():
    aug = Augmenter(0.2, 0.2, 0.2, rng=np.random.default_rng(5))
    img = _textured_image(size=32)
    n = 3000
    crops = low = photo = 0
    for _ in range(n):
        _, info = aug.augment_with_info(img)
        crops += info.crop_box is not None
        low += info.low_res_ratio != 1.0
        photo += bool(info.photometric)
    sigma = math.sqrt(0.2 * 0.8 / n)
    for count in (crops, low, photo):
        assert abs(count / n - 0.2) < 4 * sigma, (crops, low, photo)


def test_crop_keeps_position_and_blacks_out_the_rest():
    aug = Augmenter(1.0, 0.0, 0.0)
    img = _textured_image(1)
    areas = []
    for _ in range(40):
        out, info = aug.augment_with_info(img)
        i, j, h, w = info.crop_box
        inside = np.zeros(img.shape[:2], bool)
        inside[i:i + h, j:j + w] = True
        assert np.array_equal(out[inside], img[inside])          # same pixels at the same place
        assert not out[~inside].any()                            # everything else black
        assert out.shape == img.shape
        assert info.crop_ratio == pytest.approx(min(h, w) / 112)
        # box drawn with the published RandomResizedCrop parameters (integer rounding allowed)
        assert CROP_SCALE[0] * 0.95 <= h * w / 112 ** 2 <= CROP_SCALE[1]
        assert CROP_RATIO[0] * 0.95 <= w / h <= CROP_RATIO[1] * 1.05
        areas.append(h * w / 112 ** 2)
    assert min(areas) < 0.5 < max(areas)   # the scale range is really used


def test_low_resolution_ratio_range_size_and_reference_resizes():
    aug = Augmenter(0.0, 0.0, 1.0)
    img = _textured_image(2)
    ratios, interps = [], set()
    for _ in range(60):
        out, info = aug.augment_with_info(img)
        assert out.shape == img.shape and out.dtype == np.uint8
        r = info.low_res_ratio
        assert LOW_RES_SIDE_RATIO[0] <= r < LOW_RES_SIDE_RATIO[1]
        down, up = info.low_res_interpolations
        assert down in RESIZE_INTERPOLATIONS and up in RESIZE_INTERPOLATIONS
        side = int(r * 112)
        expected = cv2.resize(cv2.resize(img, (side, side), interpolation=down), (112, 112),
                              interpolation=up)
        assert np.array_equal(out, expected)
        ratios.append(r)
        interps.update(info.low_res_interpolations)
    assert min(ratios) < 0.4 and max(ratios) > 0.8
    assert interps == set(RESIZE_INTERPOLATIONS)


def test_photometric_changes_colours_only_within_jitter_bounds():
    aug = Augmenter(0.0, 1.0, 0.0)
    grey = np.full((16, 16, 3), 120, np.uint8)
    gains = []
    for _ in range(200):
        out, info = aug.augment_with_info(grey)
        for name, factor in info.photometric:
            assert 0.5 <= factor <= 1.5, (name, factor)
        # contrast and saturation leave a uniform grey image grey; brightness scales it
        assert len(np.unique(out)) == 1
        brightness = dict(info.photometric)["brightness"]
        assert out[0, 0, 0] == pytest.approx(120 * brightness, abs=1.0)
        gains.append(out[0, 0, 0] / 120)
    assert 0.5 - 0.01 <= min(gains) < 0.6 and 1.4 < max(gains) <= 1.5 + 0.01
    # on a coloured image the geometry is untouched: the output is PIL's enhancers in drawn order
    img = _textured_image(3)
    out, info = aug.augment_with_info(img)
    pil = Image.fromarray(img)
    enhancers = {"brightness": ImageEnhance.Brightness, "contrast": ImageEnhance.Contrast,
                 "saturation": ImageEnhance.Color}
    for name, factor in info.photometric:
        pil = enhancers[name](pil).enhance(factor)
    assert np.array_equal(out, np.asarray(pil))


def test_pil_in_pil_out_and_bad_input():
    aug = Augmenter(1.0, 1.0, 1.0)
    out = aug.augment(Image.fromarray(_textured_image()))
    assert isinstance(out, Image.Image) and out.size == (112, 112) and out.mode == "RGB"
    with pytest.raises(ValueError, match="probability"):
        Augmenter(1.5, 0.0, 0.0)
    with pytest.raises(ValueError, match="uint8"):
        aug.augment(np.zeros((112, 112, 3), np.float32))


def test_seeded_runs_repeat():
    img = _textured_image(4)

    def run():
        torch.manual_seed(11)
        aug = Augmenter(0.5, 0.5, 0.5, rng=np.random.default_rng(11))
        return [aug.augment(img) for _ in range(20)]

    first, second = run(), run()
    assert all(np.array_equal(a, b) for a, b in zip(first, second))


def _published_augment(pil: Image.Image, p_crop: float, p_photo: float, p_low: float
                       ) -> Image.Image:
    """The published augmenter's steps restated plainly (PIL image, global NumPy and torch RNGs)."""
    if np.random.random() < p_crop:
        canvas = np.zeros_like(np.array(pil))
        i, j, h, w = transforms.RandomResizedCrop.get_params(pil, [0.2, 1.0], [0.75, 4 / 3])
        canvas[i:i + h, j:j + w, :] = np.array(pil.crop((j, i, j + w, i + h)))
        pil = Image.fromarray(canvas)
    if np.random.random() < p_low:
        arr = np.array(pil)
        ratio = np.random.uniform(0.2, 1.0)
        side = int(ratio * arr.shape[0])
        flags = [cv2.INTER_NEAREST, cv2.INTER_LINEAR, cv2.INTER_AREA, cv2.INTER_CUBIC,
                 cv2.INTER_LANCZOS4]
        small = cv2.resize(arr, (side, side), interpolation=np.random.choice(flags))
        pil = Image.fromarray(cv2.resize(small, (arr.shape[1], arr.shape[0]),
                                         interpolation=np.random.choice(flags)))
    if np.random.random() < p_photo:
        order = torch.randperm(4)
        b = float(torch.empty(1).uniform_(0.5, 1.5))
        c = float(torch.empty(1).uniform_(0.5, 1.5))
        s = float(torch.empty(1).uniform_(0.5, 1.5))
        for k in order.tolist():
            if k == 0:
                pil = ImageEnhance.Brightness(pil).enhance(b)
            elif k == 1:
                pil = ImageEnhance.Contrast(pil).enhance(c)
            elif k == 2:
                pil = ImageEnhance.Color(pil).enhance(s)
    return pil


def test_equals_the_published_augmenter_draw_for_draw():
    images = [_textured_image(10 + k) for k in range(40)]
    np.random.seed(3)
    torch.manual_seed(3)
    expected = [np.asarray(_published_augment(Image.fromarray(im), 0.5, 0.5, 0.5)) for im in images]
    np.random.seed(3)
    torch.manual_seed(3)
    aug = Augmenter(0.5, 0.5, 0.5)
    got = [aug.augment(im) for im in images]
    for k, (a, b) in enumerate(zip(got, expected)):
        assert np.array_equal(a, b), f"image {k} differs"
    assert sum(not np.array_equal(a, im) for a, im in zip(got, images)) > 20
