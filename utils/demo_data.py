"""Synthetic face-like data in the real formats, for tests, demos and quick experiments.

``python -m utils.demo_data --out DIR`` writes, deterministically from ``--seed``::

    DIR/
      train.rec, train.idx          InsightFace face pack (header record 0, images at keys 1..N)
      imgs/<label>/<key>.jpg        the same JPEG bytes as an image folder (zero-padded names, so
                                    the sorted folder order equals the pack's labels and keys)
      agedb_30.bin cfp_fp.bin lfw.bin cplfw.bin calfw.bin
                                    verification pair sets (pickled ``(bins, issame)``)
      <set>/memfile/mem_file.dat(.conf), <set>_list.npy
                                    the pair sets converted to network-input memfiles
      quality.csv                   per image: the capture quality (scale, blur, capture noise,
                                    contrast, quality_score) and nuisance values (pose, age, ...)
      meta.json                     seed, parameters, counts, version

While it is written the folder holds ``.demo_data_in_progress`` (the parameters): the next run
of :func:`ensure_demo_data` / :func:`generate_demo_data` after a killed one finds it, removes what
the killed run wrote (only the generator's own files, never a folder it did not write) and
generates again. A complete set is reused while ``meta.json`` matches the parameters; otherwise
it is generated again, with a log line saying why.

Train with ``--data_root DIR --train_data_path . --val_data_path .`` (or, as with the public
packs, ``--data_root <parent of DIR> --train_data_path <DIR name> --val_data_path <DIR name>``);
add ``--use_mxrecord`` to read ``train.rec`` instead of ``imgs/``.

Identities share their coarse look (a narrow range of skin tones, four hair colours, three hair
styles, similar face shapes); what tells them apart is mid-sized geometry (the places and sizes of
eyes, brows, nose and mouth) and fine detail (skin texture with a period of 3-6 pixels, freckles,
iris colour, a mark). Each image varies pose (rotation, shift, scale, a simple yaw), lighting,
expression, age (greying, wrinkles) and sensor noise; the background and lighting vary only a
little, so that most of what changes between images is the face. Each image is then captured at a
recorded :class:`Quality`: a poor capture is down-scaled, lower in contrast, noisier and blurred,
all by one drawn severity, which removes first the fine and then the mid-sized detail, so that
low quality genuinely makes identities hard to tell apart. ``quality_score`` (in ``quality.csv``)
is the detail left: effective resolution x contrast x a noise factor. Identities come from an
:class:`IdentityBank`; identities of different namespaces (``train``, ``val``, ...) never coincide.

Measured with ``python main.py --demo`` (ir_tiny, AdaFace, 8 epochs, 2 shared CPU cores; 4.5
minutes including 9 s of data generation): mean 5-set accuracy 0.949, and a Spearman correlation
of +0.49 between the feature norm and ``quality_score`` on the 2000 held-out pair images (mean
norm 17.5 below a score of 0.1, 23.9 at 1.0). The norm follows mostly the contrast left and, less,
the resolution; an untrained network of the same architecture already shows such a correlation
(+0.53: its norm grows with the energy of the image's detail), so at this scale the demo shows
that the norm tracks quality, not that training created the relation.
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import shutil
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import cv2
import numpy as np
from tqdm import tqdm

from utils.files import interruption_point, remove_temporaries, write_atomically
from utils.image import INPUT_SIZE, encode_jpeg
from utils.pairsets import VAL_SET_NAMES, bin_to_memfile, write_pair_bin
from utils.recordio import write_face_pack

logger = logging.getLogger(__name__)

DEMO_DATA_VERSION = 2
JPEG_QUALITY = 95
META_FILE = "meta.json"
IN_PROGRESS_FILE = ".demo_data_in_progress"
QUALITY_FILE = "quality.csv"
IMAGE_FOLDER = "imgs"

DEFAULT_NUM_TRAIN_IDS = 120
DEFAULT_IMGS_PER_ID = 25
DEFAULT_NUM_VAL_IDS = 100
DEFAULT_PAIRS_PER_SET = 300

PathLike = Union[str, Path]


# ----------------------------------------------------------------------------------------------
# Identities
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class IdentityParams:
    """Everything that makes one synthetic identity look like itself (112x112 coordinates).

    The coarse look (skin tone, face shape, hair colour and style) is shared by many identities;
    what tells them apart is mid-sized geometry (eyes, brows, nose, mouth) and fine detail (skin
    texture, freckles, iris colour, a mark) that down-scaling and blur remove.
    """

    identity_id: str
    skin: Tuple[float, float, float]
    face_center: Tuple[float, float]
    face_axes: Tuple[float, float]
    hair: Tuple[float, float, float]
    hair_height: float           # how far the hair comes down the forehead (fraction of the face)
    hair_style: int              # 0: cap, 1: cap with side locks, 2: short / receding
    eye_y: float
    eye_dx: float                # half the distance between the eyes
    eye_size: Tuple[float, float]
    iris: Tuple[float, float, float]
    brow_gap: float
    brow_slant: float
    brow_thickness: int
    nose_length: float
    nose_width: float
    mouth_y: float
    mouth_width: float
    lips: Tuple[float, float, float]
    lip_thickness: float
    texture: Tuple[Tuple[float, float, float, float], ...]   # (fx, fy, phase, amplitude) gratings
    mark: Tuple[float, float, float]                       # a mole / mark: x, y, radius (0: none)
    freckles: Tuple[Tuple[float, float, float], ...] = ()  # dots: x, y (from the centre), radius


def _identity_seed(seed: int, namespace: str, index: int) -> np.random.SeedSequence:
    tag = zlib.crc32(namespace.encode("utf-8"))
    return np.random.SeedSequence([int(seed), 0x1D, tag, int(index)])


def _colour(rng: np.random.Generator, low: float, high: float) -> Tuple[float, float, float]:
    return tuple(float(v) for v in rng.uniform(low, high, size=3))


# Coarse looks shared by many identities: a few hair colours (RGB) and a narrow range of skin tones.
HAIR_COLOURS = ((30.0, 22.0, 18.0), (85.0, 55.0, 32.0), (165.0, 125.0, 70.0), (120.0, 45.0, 25.0))
HAIR_STYLES = (0, 1, 2)
# skin-texture gratings; one of period P pixels is lost once the scale falls below about 2 / P
TEXTURE_PERIOD_PX = (3.0, 6.0)


def random_identity(rng: np.random.Generator, identity_id: str = "") -> IdentityParams:
    """Draw the parameters of one identity from ``rng``."""
    tone = rng.uniform(0.8, 0.95)
    skin = (230 * tone, 170 * tone * rng.uniform(0.95, 1.0), 140 * tone * rng.uniform(0.9, 1.0))
    texture = []
    for _ in range(3):
        freq = 2 * np.pi / rng.uniform(*TEXTURE_PERIOD_PX)
        angle = rng.uniform(0, np.pi)
        texture.append((float(freq * np.cos(angle)), float(freq * np.sin(angle)),
                        float(rng.uniform(0, 2 * np.pi)), float(rng.uniform(5, 10))))
    freckles = tuple((float(rng.uniform(-24, 24)), float(rng.uniform(-8, 30)),
                      float(rng.uniform(0.9, 1.6))) for _ in range(int(rng.integers(0, 9))))
    has_mark = rng.random() < 0.5
    hair = np.array(HAIR_COLOURS[int(rng.integers(len(HAIR_COLOURS)))]) + rng.uniform(-8, 8, 3)
    return IdentityParams(
        identity_id=identity_id,
        skin=tuple(float(v) for v in skin),
        face_center=(float(56 + rng.uniform(-1.5, 1.5)), float(60 + rng.uniform(-1.5, 1.5))),
        face_axes=(float(rng.uniform(34, 38)), float(rng.uniform(45, 49))),
        hair=tuple(float(v) for v in hair),
        hair_height=float(rng.uniform(0.25, 0.35)),
        hair_style=int(HAIR_STYLES[int(rng.integers(len(HAIR_STYLES)))]),
        eye_y=float(rng.uniform(47, 56)),
        eye_dx=float(rng.uniform(13, 21)),
        eye_size=(float(rng.uniform(5, 9)), float(rng.uniform(2.5, 5))),
        iris=_colour(rng, 20, 200),
        brow_gap=float(rng.uniform(6, 12)),
        brow_slant=float(rng.uniform(-0.3, 0.3)),
        brow_thickness=int(rng.integers(1, 4)),
        nose_length=float(rng.uniform(10, 20)),
        nose_width=float(rng.uniform(4, 10)),
        mouth_y=float(rng.uniform(84, 94)),
        mouth_width=float(rng.uniform(10, 20)),
        lips=(float(rng.uniform(150, 200)), float(rng.uniform(70, 100)),
              float(rng.uniform(70, 100))),
        lip_thickness=float(rng.uniform(2, 4)),
        texture=tuple(texture),
        mark=((float(rng.uniform(-20, 20)), float(rng.uniform(-10, 25)),
               float(rng.uniform(1.2, 2.2))) if has_mark else (0.0, 0.0, 0.0)),
        freckles=freckles,
    )


class IdentityBank:
    """Deterministic source of any number of distinct synthetic identities.

    ``bank.get("train", 7)`` always returns the same identity for a given seed, whatever else was
    drawn; identities of different namespaces (or indices) are drawn independently, so a training
    set and pair sets built from different namespaces never share an identity.
    """

    def __init__(self, seed: int = 0):
        self.seed = int(seed)

    def get(self, namespace: str, index: int) -> IdentityParams:
        rng = np.random.default_rng(_identity_seed(self.seed, namespace, index))
        return random_identity(rng, identity_id=f"{namespace}/{index}")

    def identities(self, namespace: str, count: int, start: int = 0) -> List[IdentityParams]:
        return [self.get(namespace, start + k) for k in range(count)]


# ----------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Variation:
    """Ranges of the per-image nuisance factors (drawn uniformly inside each range).

    Lighting (``gain``, ``bias``, ``gradient``, ``colour_cast``) and the background vary little
    by default: a network's feature norm grows with image contrast, and large contrast changes
    that are not quality would drown the norm's relation to quality.
    """

    rotation_deg: float = 8.0
    shift_px: float = 3.0
    scale: Tuple[float, float] = (0.94, 1.06)
    yaw: Tuple[float, float] = (-0.35, 0.35)
    age: Tuple[float, float] = (0.0, 0.5)
    gain: Tuple[float, float] = (0.95, 1.05)
    bias: float = 5.0
    gradient: float = 10.0
    expression: float = 1.0
    noise_sigma: Tuple[float, float] = (1.0, 4.0)
    colour_cast: float = 0.03    # per-channel gain in [1 - c, 1 + c] (white balance)
    background: Tuple[float, float] = (100.0, 160.0)   # background colour range (per channel)
    background_gradient: float = 10.0


NOISE_REFERENCE = 20.0    # capture noise (grey levels) at which the score's noise factor is 0.71


@dataclass(frozen=True)
class Quality:
    """The recorded degradation of one image: how the face was captured.

    The face is rendered sharp, down-scaled by ``scale`` (the captured image), its contrast scaled
    by ``contrast`` around each channel's mean (dim or hazy light), given Gaussian noise of
    ``noise_sigma`` grey levels at that size, scaled back up to 112x112 and blurred by
    ``blur_sigma`` pixels. Each of these removes detail that tells identities apart.
    """

    scale: float = 1.0          # side ratio of the down-scaled image (1.0: no down-scaling)
    blur_sigma: float = 0.0     # Gaussian blur in pixels at 112x112 (0: none)
    noise_sigma: float = 0.0    # capture noise in grey levels at the down-scaled size (0: none)
    contrast: float = 1.0       # contrast left, in (0, 1] (1: full)

    @property
    def resolution(self) -> float:
        """The effective resolution left (1 = full): one over the effective pixel size in
        112x112 pixels, ``sqrt((1 / scale)^2 + blur_sigma^2)``."""
        return float(self.scale / math.sqrt(1.0 + (self.blur_sigma * self.scale) ** 2))

    @property
    def score(self) -> float:
        """A single number in (0, 1]: the detail left, 1 = pristine. The product of the
        effective resolution, the contrast and the noise factor
        ``1 / sqrt(1 + (noise_sigma / NOISE_REFERENCE)^2)``."""
        noise_factor = 1.0 / math.sqrt(1.0 + (self.noise_sigma / NOISE_REFERENCE) ** 2)
        return float(self.resolution * self.contrast * noise_factor)


def draw_quality(rng: np.random.Generator, low_quality_fraction: float = 0.5,
                 min_scale: float = 0.1, max_blur: float = 1.5, max_noise: float = 12.0,
                 min_contrast: float = 0.3) -> Quality:
    """Good captures, and a ``low_quality_fraction`` of poor ones.

    A poor capture has a severity ``u`` uniform in [0, 1] that, together and each with some
    spread, lowers the scale to about ``min_scale ** u`` (log-uniform in ``[min_scale, 1]``) and
    the contrast towards ``min_contrast``, and raises the blur towards ``max_blur`` and the noise
    towards ``max_noise`` (as a face far from a camera in poor light is small, soft, flat and
    noisy at once). Half of the good captures are slightly blurred (up to 0.5 pixel).
    """
    if not 0.0 < min_scale <= 1.0 or not 0.0 < min_contrast <= 1.0:
        raise ValueError(f"min_scale and min_contrast must be in (0, 1], got {min_scale}, "
                         f"{min_contrast}")
    if rng.random() < low_quality_fraction:
        severity = float(rng.uniform(0.0, 1.0))
        scale = min(1.0, max(min_scale, min_scale ** severity * float(rng.uniform(0.9, 1.1))))
        contrast = 1.0 - (1.0 - min_contrast) * severity * float(rng.uniform(0.7, 1.0))
        blur = max_blur * severity * float(rng.uniform(0.5, 1.0))
        noise = max_noise * severity * float(rng.uniform(0.5, 1.0))
    else:
        scale, contrast, noise = 1.0, 1.0, 0.0
        blur = float(rng.uniform(0.0, 0.5)) if rng.random() < 0.5 else 0.0
    return Quality(scale=round(scale, 4), blur_sigma=round(blur, 4), noise_sigma=round(noise, 3),
                   contrast=round(contrast, 4))


@dataclass
class RenderInfo:
    """The nuisance values one image was rendered with (written to ``quality.csv``)."""

    rotation_deg: float = 0.0
    yaw: float = 0.0
    age: float = 0.0
    gain: float = 1.0
    noise_sigma: float = 0.0


_GRIDS: Dict[int, Tuple[np.ndarray, np.ndarray]] = {}


def _unit_grid(size: int) -> Tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates scaled to [-0.5, 0.5), cached per size (read-only)."""
    grid = _GRIDS.get(size)
    if grid is None:
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size - 0.5
        yy.flags.writeable = xx.flags.writeable = False
        grid = _GRIDS[size] = (yy, xx)
    return grid


def _texture_field(identity: IdentityParams, size: int) -> np.ndarray:
    """The identity's fine skin detail (grey-level offsets): gratings and freckles."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) * (112.0 / size)
    field_ = np.zeros((size, size), np.float32)
    for fx, fy, phase, amp in identity.texture:
        field_ += amp * np.sin(fx * xx + fy * yy + phase).astype(np.float32)
    s = size / 112.0
    cx, cy = identity.face_center
    for dx, dy, radius in identity.freckles:
        _ellipse(field_, ((cx + dx) * s, (cy + dy) * s), (radius * s, radius * s), 0, -45.0)
    return field_


_TEXTURE_CACHE: Dict[Tuple[IdentityParams, int], np.ndarray] = {}


def _cached_texture(identity: IdentityParams, size: int) -> np.ndarray:
    tex = _TEXTURE_CACHE.get((identity, size))
    if tex is None:
        if len(_TEXTURE_CACHE) > 4096:
            _TEXTURE_CACHE.clear()
        tex = _TEXTURE_CACHE[(identity, size)] = _texture_field(identity, size)
    return tex


_SUB = 4            # cv2 drawing with 2 fractional bits (sub-pixel precision)
_SUB_SCALE = 1 << _SUB


def _pt(x: float, y: float) -> Tuple[int, int]:
    return int(round(x * _SUB_SCALE)), int(round(y * _SUB_SCALE))


def _ax(a: float, b: float) -> Tuple[int, int]:
    return max(1, int(round(a * _SUB_SCALE))), max(1, int(round(b * _SUB_SCALE)))


def _ellipse(img, center, axes, angle, colour, thickness=-1, start=0, end=360):
    cv2.ellipse(img, _pt(*center), _ax(*axes), angle, start, end, colour, thickness,
                cv2.LINE_AA, _SUB)


def render_identity_image(identity: IdentityParams, rng: np.random.Generator,
                          quality: Optional[Quality] = None,
                          variation: Optional[Variation] = None,
                          size: int = INPUT_SIZE,
                          info: Optional[RenderInfo] = None,
                          yaw: Optional[float] = None, age: Optional[float] = None) -> np.ndarray:
    """Render one RGB ``uint8`` ``size x size`` image of ``identity``.

    Nuisance factors are drawn from ``rng`` within ``variation``; ``yaw`` / ``age`` override the
    drawn values; ``quality`` (default: pristine) sets the down-scaling and blur. ``info``, if
    given, receives the drawn nuisance values.
    """
    variation = variation or Variation()
    quality = quality or Quality()
    s = size / 112.0
    # -- per-image nuisance values -----------------------------------------------------------------
    rot = float(rng.uniform(-variation.rotation_deg, variation.rotation_deg))
    shift = rng.uniform(-variation.shift_px, variation.shift_px, size=2) * s
    zoom = float(rng.uniform(*variation.scale))
    yaw_v = float(rng.uniform(*variation.yaw)) if yaw is None else float(yaw)
    age_v = float(rng.uniform(*variation.age)) if age is None else float(age)
    gain = float(rng.uniform(*variation.gain))
    bias = float(rng.uniform(-variation.bias, variation.bias))
    grad = rng.uniform(-variation.gradient, variation.gradient, size=2)
    smile = float(rng.uniform(-1, 1)) * variation.expression
    eye_open = float(1.0 - 0.4 * rng.random() * variation.expression)
    noise_sigma = float(rng.uniform(*variation.noise_sigma))
    cast = rng.uniform(1.0 - variation.colour_cast, 1.0 + variation.colour_cast, size=3)
    background = rng.uniform(*variation.background, size=3)
    bg_grad = rng.uniform(-variation.background_gradient, variation.background_gradient,
                          size=(2, 3))

    # -- canvas: background ------------------------------------------------------------------------
    yy, xx = _unit_grid(size)
    img = (background[None, None, :] + xx[..., None] * bg_grad[0] + yy[..., None] * bg_grad[1])
    img = img.astype(np.float32)

    # -- face geometry (identity), shifted by yaw --------------------------------------------------
    cx, cy = identity.face_center
    ax, ay = identity.face_axes
    ax_eff = ax * (1.0 - 0.12 * abs(yaw_v))
    feat_dx = 9.0 * yaw_v                      # inner features move towards the turned side
    k = lambda v: v * s                        # noqa: E731  (scale 112-coordinates to size)

    hair_col = np.array(identity.hair, np.float32)
    grey = hair_col.mean() * 0.3 + 170.0
    hair_col = (1.0 - age_v) * hair_col + age_v * grey
    hair_top = cy - ay
    if identity.hair_style != 2:
        _ellipse(img, (k(cx), k(cy - 0.15 * ay)), (k(ax + 5), k(ay + 3)), 0, hair_col.tolist())
    if identity.hair_style == 1:
        for side in (-1, 1):
            _ellipse(img, (k(cx + side * (ax + 1)), k(cy + 0.1 * ay)), (k(5), k(0.6 * ay)), 0,
                     hair_col.tolist())

    face = np.zeros((size, size), np.float32)
    _ellipse(face, (k(cx + 0.3 * feat_dx), k(cy)), (k(ax_eff), k(ay)), 0, 1.0)
    skin = np.array(identity.skin, np.float32)
    tex = _cached_texture(identity, size)
    shade = 1.0 + 0.002 * (xx * 112 * yaw_v)   # the turned-away side is a little darker
    skin_img = (skin[None, None, :] + tex[..., None] * (1.0 + 0.6 * age_v)) * shade[..., None]
    img = img * (1.0 - face[..., None]) + skin_img * face[..., None]

    # hairline: hair covers the top of the face
    hair_line = hair_top + identity.hair_height * ay * (2.0 - (0.8 if identity.hair_style == 2
                                                               else 0.0))
    cover = np.zeros((size, size), np.float32)
    _ellipse(cover, (k(cx), k(hair_top - 2)), (k(ax + 6), k(hair_line - hair_top + 2)), 0, 1.0)
    cover *= face
    img = img * (1.0 - cover[..., None]) + hair_col[None, None, :] * cover[..., None]

    # eyes and brows
    ecx = cx + feat_dx
    for side in (-1, 1):
        near = 1.0 - 0.25 * yaw_v * side          # eye on the turned side looks smaller
        ex = ecx + side * identity.eye_dx * (1.0 - 0.15 * abs(yaw_v))
        ey = identity.eye_y
        ew, eh = identity.eye_size[0] * near, identity.eye_size[1] * eye_open
        _ellipse(img, (k(ex), k(ey)), (k(ew), k(eh)), 0, (235, 235, 235))
        _ellipse(img, (k(ex + 0.5 * feat_dx * 0.3), k(ey)), (k(eh * 0.9), k(eh * 0.9)), 0,
                 identity.iris)
        _ellipse(img, (k(ex + 0.5 * feat_dx * 0.3), k(ey)), (k(eh * 0.4), k(eh * 0.4)), 0,
                 (15, 15, 15))
        by = ey - identity.brow_gap
        slope = identity.brow_slant * side
        p1 = (k(ex - ew - 1), k(by + slope * ew))
        p2 = (k(ex + ew + 1), k(by - slope * ew))
        cv2.line(img, _pt(*p1), _pt(*p2), (hair_col * 0.6).tolist(),
                 max(1, int(round(identity.brow_thickness * s))), cv2.LINE_AA, _SUB)
    # nose
    nx = cx + 1.3 * feat_dx
    ny0 = identity.eye_y + 4
    ny1 = ny0 + identity.nose_length
    nose_col = (skin * 0.7).tolist()
    pts = np.array([_pt(k(nx), k(ny0)), _pt(k(nx - identity.nose_width / 2), k(ny1)),
                    _pt(k(nx + identity.nose_width / 2), k(ny1))], np.int32)
    cv2.polylines(img, [pts], True, nose_col, max(1, int(round(1.5 * s))), cv2.LINE_AA, _SUB)
    # mouth: an arc whose curvature is the expression
    mx = cx + 1.1 * feat_dx
    my = identity.mouth_y
    mw = identity.mouth_width * (1.0 - 0.15 * abs(yaw_v))
    curve = 2.0 + 3.0 * abs(smile)
    if smile >= 0:
        _ellipse(img, (k(mx), k(my - curve)), (k(mw), k(curve)), 0, identity.lips,
                 max(1, int(round(identity.lip_thickness * s))), 20, 160)
    else:
        _ellipse(img, (k(mx), k(my + curve)), (k(mw), k(curve)), 0, identity.lips,
                 max(1, int(round(identity.lip_thickness * s))), 200, 340)
    # identity mark
    mxk, myk, mr = identity.mark
    if mr > 0:
        _ellipse(img, (k(cx + mxk + 0.5 * feat_dx), k(cy + myk)), (k(mr), k(mr)), 0,
                 (skin * 0.45).tolist())
    # age: wrinkles on the forehead and beside the eyes
    if age_v > 0.25:
        wr_col = (skin * (1.0 - 0.35 * age_v)).tolist()
        for r in range(int(1 + 3 * age_v)):
            wy = identity.eye_y - identity.brow_gap - 5 - 3 * r
            _ellipse(img, (k(cx + feat_dx), k(wy + 8)), (k(0.45 * ax), k(8)), 0, wr_col, 1,
                     200, 340)

    # -- pose: similarity transform around the face centre -----------------------------------------
    m = cv2.getRotationMatrix2D((k(cx), k(cy)), rot, zoom)
    m[:, 2] += shift
    img = cv2.warpAffine(img, m, (size, size), flags=cv2.INTER_LINEAR,
                         borderMode=cv2.BORDER_REFLECT101)

    # -- lighting ----------------------------------------------------------------------------------
    light = gain + (xx * grad[0] + yy * grad[1]) / 100.0
    img = img * light[..., None] * cast.astype(np.float32) + bias

    # -- quality: capture at a lower resolution with noise, scale back up, blur --------------------
    small = max(2, int(round(quality.scale * size))) if quality.scale < 1.0 else size
    if small < size:
        img = cv2.resize(img, (small, small), interpolation=cv2.INTER_AREA)
    if quality.contrast < 1.0:
        mean = img.mean(axis=(0, 1), keepdims=True)
        img = mean + quality.contrast * (img - mean)
    if quality.noise_sigma > 0:
        img = img + rng.normal(0.0, quality.noise_sigma, size=img.shape).astype(np.float32)
    if small < size:
        img = cv2.resize(img, (size, size), interpolation=cv2.INTER_LINEAR)
    if quality.blur_sigma > 0:
        img = cv2.GaussianBlur(img, (0, 0), quality.blur_sigma * s)
    if noise_sigma > 0:
        img = img + rng.normal(0.0, noise_sigma, size=img.shape).astype(np.float32)

    if info is not None:
        info.rotation_deg, info.yaw, info.age = rot, yaw_v, age_v
        info.gain, info.noise_sigma = gain, noise_sigma
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------------
# Pair-set flavours
# ----------------------------------------------------------------------------------------------
TRAIN_VARIATION = Variation(yaw=(-0.6, 0.6), age=(0.0, 0.7))
PAIR_VARIATION = Variation()
# draw_quality settings of the training images and of the pair-set images
TRAIN_QUALITY = dict(low_quality_fraction=0.5, min_scale=0.1, max_blur=1.5, max_noise=12.0,
                     min_contrast=0.3)
PAIR_QUALITY = dict(low_quality_fraction=0.4, min_scale=0.12, max_blur=1.2, max_noise=10.0,
                    min_contrast=0.3)


def _pair_yaw_age(set_name: str, rng: np.random.Generator
                  ) -> Tuple[Tuple[Optional[float], Optional[float]],
                             Tuple[Optional[float], Optional[float]]]:
    """(yaw, age) overrides of the two images of a pair, giving each set its character:
    ``cfp_fp`` frontal vs. turned, ``cplfw`` both turned, ``agedb_30`` / ``calfw`` an age gap,
    ``lfw`` (and any other name) unconstrained."""
    def turned() -> float:
        return float(rng.choice([-1.0, 1.0]) * rng.uniform(0.35, 0.6))

    if set_name == "cfp_fp":
        first, second = (float(rng.uniform(-0.1, 0.1)), None), (turned(), None)
    elif set_name == "cplfw":
        first, second = (turned(), None), (turned(), None)
    elif set_name == "agedb_30":
        first, second = (None, float(rng.uniform(0.0, 0.15))), (None, float(rng.uniform(0.5, 0.7)))
    elif set_name == "calfw":
        first, second = (None, float(rng.uniform(0.0, 0.3))), (None, float(rng.uniform(0.35, 0.7)))
    else:
        first, second = (None, None), (None, None)
    if rng.random() < 0.5:
        first, second = second, first
    return first, second


# ----------------------------------------------------------------------------------------------
# Generation
# ----------------------------------------------------------------------------------------------
QUALITY_COLUMNS = ("split", "index", "pair", "label", "identity", "file", "scale", "blur_sigma",
                   "capture_noise", "contrast", "quality_score", "noise_sigma", "rotation_deg",
                   "yaw", "age", "gain")


def _stream(seed: int, name: str, *numbers: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(
        [int(seed), zlib.crc32(name.encode("utf-8")), *[int(n) for n in numbers]]))


def _pad(count: int) -> int:
    return len(str(max(count - 1, 0)))


def demo_params(seed: int = 0, num_train_ids: int = DEFAULT_NUM_TRAIN_IDS,
                imgs_per_id: int = DEFAULT_IMGS_PER_ID, num_val_ids: int = DEFAULT_NUM_VAL_IDS,
                pairs_per_set: int = DEFAULT_PAIRS_PER_SET,
                set_names: Sequence[str] = VAL_SET_NAMES, make_memfiles: bool = True,
                make_image_folder: bool = True) -> dict:
    """The parameters that determine a demo data set (what ``meta.json`` records)."""
    if num_train_ids < 1 or imgs_per_id < 1:
        raise ValueError(f"need at least one training identity and image, got num_train_ids="
                         f"{num_train_ids}, imgs_per_id={imgs_per_id}")
    if pairs_per_set and num_val_ids < 2:
        raise ValueError(f"pair sets need at least 2 validation identities, got {num_val_ids}")
    if pairs_per_set < 0:
        raise ValueError(f"pairs_per_set must be >= 0, got {pairs_per_set}")
    return {"seed": int(seed), "num_train_ids": int(num_train_ids),
            "imgs_per_id": int(imgs_per_id), "num_val_ids": int(num_val_ids),
            "pairs_per_set": int(pairs_per_set), "set_names": [str(n) for n in set_names],
            "make_memfiles": bool(make_memfiles), "make_image_folder": bool(make_image_folder),
            "image_size": INPUT_SIZE, "jpeg_quality": JPEG_QUALITY}


def _output_paths(out_dir: Path, params: dict) -> Dict[str, object]:
    paths: Dict[str, object] = {
        "root": out_dir, "rec": out_dir / "train.rec", "idx": out_dir / "train.idx",
        "quality_csv": out_dir / QUALITY_FILE, "meta": out_dir / META_FILE,
        "bins": {n: out_dir / f"{n}.bin" for n in params["set_names"]} if params["pairs_per_set"]
        else {},
    }
    if params["make_image_folder"]:
        paths["image_folder"] = out_dir / IMAGE_FOLDER
    if params["make_memfiles"] and params["pairs_per_set"]:
        paths["memfiles"] = {n: out_dir / n / "memfile" / "mem_file.dat"
                             for n in params["set_names"]}
    return paths


def _required_files(paths: Dict[str, object]) -> List[Path]:
    files = [paths["rec"], paths["idx"], paths["quality_csv"]]
    files += list(paths["bins"].values())
    files += list(paths.get("memfiles", {}).values())
    return files


def _render_train(params: dict, bank: IdentityBank, image_folder: Optional[Path],
                  rows: List[dict], show_progress: bool) -> Iterable[Tuple[int, bytes]]:
    seed, n_ids, per_id = params["seed"], params["num_train_ids"], params["imgs_per_id"]
    label_w, key_w = _pad(n_ids), _pad(n_ids * per_id + 1)
    key = 1  # the pack's image keys start after header record 0
    bar = tqdm(total=n_ids * per_id, desc="demo data: training images", unit="img",
               disable=not show_progress, mininterval=0.5)
    for label in range(n_ids):
        identity = bank.get("train", label)
        label_dir = None
        if image_folder is not None:
            label_dir = image_folder / f"{label:0{label_w}d}"
            label_dir.mkdir(parents=True, exist_ok=True)
        for j in range(per_id):
            rng = _stream(seed, "train-image", label, j)
            quality = draw_quality(rng, **TRAIN_QUALITY)
            info = RenderInfo()
            rgb = render_identity_image(identity, rng, quality, TRAIN_VARIATION, info=info)
            jpeg = encode_jpeg(rgb, JPEG_QUALITY)
            rel = ""
            if label_dir is not None:
                file = label_dir / f"{key:0{key_w}d}.jpg"
                file.write_bytes(jpeg)
                rel = file.relative_to(image_folder.parent).as_posix()
            rows.append(_quality_row("train", key, -1, label, identity.identity_id, rel, quality,
                                     info))
            key += 1
            bar.update(1)
            interruption_point("demo_data")
            yield label, jpeg
    bar.close()


def _quality_row(split: str, index: int, pair: int, label: int, identity: str, file: str,
                 quality: Quality, info: RenderInfo) -> dict:
    return {"split": split, "index": index, "pair": pair, "label": label, "identity": identity,
            "file": file, "scale": f"{quality.scale:.4f}",
            "blur_sigma": f"{quality.blur_sigma:.4f}",
            "capture_noise": f"{quality.noise_sigma:.3f}", "contrast": f"{quality.contrast:.4f}",
            "quality_score": f"{quality.score:.4f}", "noise_sigma": f"{info.noise_sigma:.3f}",
            "rotation_deg": f"{info.rotation_deg:.3f}", "yaw": f"{info.yaw:.3f}",
            "age": f"{info.age:.3f}", "gain": f"{info.gain:.3f}"}


def _render_pair_set(name: str, params: dict, val_ids: List[IdentityParams], rows: List[dict]
                     ) -> Tuple[List[bytes], np.ndarray]:
    seed, n_pairs = params["seed"], params["pairs_per_set"]
    order_rng = _stream(seed, f"pairs-{name}")
    issame = np.zeros(n_pairs, dtype=bool)
    issame[: (n_pairs + 1) // 2] = True
    issame = issame[order_rng.permutation(n_pairs)]
    images: List[bytes] = []
    for p in range(n_pairs):
        rng = _stream(seed, f"pair-{name}", p)
        if issame[p]:
            a = b = int(rng.integers(len(val_ids)))
        else:
            a, b = (int(v) for v in rng.choice(len(val_ids), size=2, replace=False))
        overrides = _pair_yaw_age(name, rng)
        for side, (ident_index, (yaw, age)) in enumerate(zip((a, b), overrides)):
            identity = val_ids[ident_index]
            quality = draw_quality(rng, **PAIR_QUALITY)
            info = RenderInfo()
            rgb = render_identity_image(identity, rng, quality, PAIR_VARIATION, info=info,
                                        yaw=yaw, age=age)
            images.append(encode_jpeg(rgb, JPEG_QUALITY))
            rows.append(_quality_row(name, 2 * p + side, p, -1, identity.identity_id, "", quality,
                                     info))
    return images, issame


def _set_names_in(path: Path) -> List[str]:
    """The pair-set names recorded in a ``meta.json`` or in-progress marker (none if unreadable)."""
    try:
        names = json.loads(path.read_text()).get("params", {}).get("set_names", [])
    except (OSError, ValueError, AttributeError):
        return []
    return [str(n) for n in names if isinstance(n, str) and n and "/" not in n and n != ".."]


def _clear_previous_outputs(out_dir: Path) -> None:
    """Remove what an earlier generation left, complete (``meta.json``) or killed (the
    in-progress marker): only the generator's own file names. An image folder with neither is
    someone else's and is refused."""
    meta_path, marker = out_dir / META_FILE, out_dir / IN_PROGRESS_FILE
    folder = out_dir / IMAGE_FOLDER
    if folder.exists() and not meta_path.is_file() and not marker.is_file():
        raise FileExistsError(f"{out_dir}: has an '{IMAGE_FOLDER}' folder but no {META_FILE}; "
                              f"refusing to overwrite data that demo_data did not write (choose "
                              f"another output folder)")
    if marker.is_file():
        logger.info("%s: removing what an interrupted demo-data generation left", out_dir)
    if folder.exists():
        shutil.rmtree(folder)
    names = list(dict.fromkeys(_set_names_in(meta_path) + _set_names_in(marker)))
    for name in names:
        for stale in (out_dir / name, out_dir / f"{name}_list.npy", out_dir / f"{name}.bin"):
            if stale.is_dir():
                shutil.rmtree(stale)
            elif stale.exists():
                stale.unlink()
    ours = ["train.rec", "train.idx", "train.labels.npz", QUALITY_FILE, META_FILE]
    for stale in ours:
        (out_dir / stale).unlink(missing_ok=True)
    remove_temporaries(out_dir, ours + [IN_PROGRESS_FILE] + [f"{n}.bin" for n in names]
                       + [f"{n}_list.npy" for n in names])
    marker.unlink(missing_ok=True)


def generate_demo_data(out_dir: PathLike, seed: int = 0,
                       num_train_ids: int = DEFAULT_NUM_TRAIN_IDS,
                       imgs_per_id: int = DEFAULT_IMGS_PER_ID,
                       num_val_ids: int = DEFAULT_NUM_VAL_IDS,
                       pairs_per_set: int = DEFAULT_PAIRS_PER_SET,
                       set_names: Sequence[str] = VAL_SET_NAMES, make_memfiles: bool = True,
                       make_image_folder: bool = True, show_progress: bool = True) -> dict:
    """Write a synthetic data set in the real formats under ``out_dir`` (see the module doc).

    Returns a dict with the paths (``root``, ``rec``, ``idx``, ``image_folder``, ``bins``,
    ``memfiles``, ``quality_csv``, ``meta``), the ``params`` and the ``counts``.
    """
    params = demo_params(seed, num_train_ids, imgs_per_id, num_val_ids, pairs_per_set, set_names,
                         make_memfiles, make_image_folder)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _clear_previous_outputs(out_dir)
    marker = out_dir / IN_PROGRESS_FILE
    write_atomically(marker, lambda f: f.write(json.dumps({"params": params}) + "\n"), text=True)
    paths = _output_paths(out_dir, params)
    start = time.perf_counter()
    bank = IdentityBank(seed)
    rows: List[dict] = []

    image_folder = paths.get("image_folder")
    num_images = write_face_pack(paths["rec"], _render_train(params, bank, image_folder, rows,
                                                             show_progress))
    val_ids = bank.identities("val", num_val_ids) if pairs_per_set else []
    for name in tqdm(list(paths["bins"]), desc="demo data: pair sets", unit="set",
                     disable=not show_progress):
        images, issame = _render_pair_set(name, params, val_ids, rows)
        write_pair_bin(paths["bins"][name], images, issame)
        if "memfiles" in paths:
            bin_to_memfile(paths["bins"][name], out_dir, name, show_progress=False)

    with open(paths["quality_csv"], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=QUALITY_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)

    counts = {"train_images": int(num_images), "train_identities": int(num_train_ids),
              "val_identities": int(num_val_ids) if pairs_per_set else 0,
              "pairs_per_set": int(pairs_per_set), "pair_sets": len(paths["bins"])}
    meta = {"generator": "utils.demo_data", "version": DEMO_DATA_VERSION, "params": params,
            "counts": counts,
            "files": sorted(p.relative_to(out_dir).as_posix() for p in _required_files(paths)),
            "usage": "--data_root <this folder> --train_data_path . --val_data_path . "
                     "[--use_mxrecord]"}
    write_atomically(paths["meta"], lambda f: f.write(json.dumps(meta, indent=2, sort_keys=True)
                                                      + "\n"), text=True)
    marker.unlink()
    elapsed = time.perf_counter() - start
    logger.info("demo data written to %s in %.1f s (%d training images, %d pair sets)", out_dir,
                elapsed, num_images, len(paths["bins"]))
    return {**paths, "params": params, "counts": counts, "seconds": elapsed, "generated": True}


def _existing_matches(out_dir: Path, params: dict) -> Tuple[Optional[dict], str]:
    """The complete set in ``out_dir`` made with ``params``, or None and why not."""
    meta_path = out_dir / META_FILE
    if (out_dir / IN_PROGRESS_FILE).is_file():
        return None, "an earlier generation was interrupted"
    if not meta_path.is_file():
        return None, f"there is no {META_FILE}"
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        return None, f"{META_FILE} is unreadable"
    if meta.get("version") != DEMO_DATA_VERSION or meta.get("params") != params:
        return None, "it was made with other parameters"
    paths = _output_paths(out_dir, params)
    missing = [p.name for p in _required_files(paths) if not p.is_file()]
    if missing or ("image_folder" in paths and not Path(paths["image_folder"]).is_dir()):
        return None, f"{', '.join(missing) or IMAGE_FOLDER} is missing"
    return {**paths, "params": params, "counts": meta.get("counts", {}), "seconds": 0.0,
            "generated": False}, ""


def ensure_demo_data(out_dir: PathLike, seed: int = 0,
                     num_train_ids: int = DEFAULT_NUM_TRAIN_IDS,
                     imgs_per_id: int = DEFAULT_IMGS_PER_ID,
                     num_val_ids: int = DEFAULT_NUM_VAL_IDS,
                     pairs_per_set: int = DEFAULT_PAIRS_PER_SET,
                     set_names: Sequence[str] = VAL_SET_NAMES, make_memfiles: bool = True,
                     make_image_folder: bool = True, show_progress: bool = True) -> dict:
    """Like :func:`generate_demo_data`, but reuse a complete, unchanged set made with the same
    parameters (``generated`` in the result says which happened); an interrupted or altered one
    is generated again."""
    params = demo_params(seed, num_train_ids, imgs_per_id, num_val_ids, pairs_per_set, set_names,
                         make_memfiles, make_image_folder)
    existing, reason = _existing_matches(Path(out_dir), params)
    if existing is not None:
        logger.info("reusing the demo data in %s", out_dir)
        return existing
    if Path(out_dir).is_dir() and any(Path(out_dir).iterdir()):
        logger.info("generating the demo data in %s again: %s", out_dir, reason)
    return generate_demo_data(out_dir, seed, num_train_ids, imgs_per_id, num_val_ids,
                              pairs_per_set, set_names, make_memfiles, make_image_folder,
                              show_progress)


def read_quality_table(path: PathLike) -> List[dict]:
    """Rows of a ``quality.csv`` with numbers parsed (``index``, ``pair``, ``label`` as int, the
    quality and nuisance columns as float; columns of older versions that are absent are left out).
    """
    path = Path(path)
    out = []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        required = ("split", "index", "pair", "label", "quality_score")
        missing = [c for c in required if c not in columns]
        if missing:
            raise ValueError(f"{path}: not a demo-data quality table (missing column(s) "
                             f"{', '.join(missing)}; found {', '.join(columns) or 'none'})")
        numeric = [c for c in QUALITY_COLUMNS[6:] if c in columns]
        for line, row in enumerate(reader, start=2):
            parsed: dict = dict(row)
            try:
                for key in ("index", "pair", "label"):
                    parsed[key] = int(row[key])
                for key in numeric:
                    parsed[key] = float(row[key])
            except (TypeError, ValueError) as exc:
                raise ValueError(f"{path}, line {line}: bad number ({exc})") from None
            out.append(parsed)
    return out


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------
def main(argv: Optional[Sequence[str]] = None) -> dict:
    parser = argparse.ArgumentParser(
        prog="python -m utils.demo_data",
        description="Write a small synthetic face data set in the real formats (InsightFace "
                    "train.rec/.idx, an image folder, .bin pair sets and their memfiles).")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num_train_ids", type=int, default=DEFAULT_NUM_TRAIN_IDS)
    parser.add_argument("--imgs_per_id", type=int, default=DEFAULT_IMGS_PER_ID)
    parser.add_argument("--num_val_ids", type=int, default=DEFAULT_NUM_VAL_IDS)
    parser.add_argument("--pairs_per_set", type=int, default=DEFAULT_PAIRS_PER_SET)
    parser.add_argument("--no_image_folder", action="store_true",
                        help="skip writing imgs/ (the pack alone)")
    parser.add_argument("--no_memfiles", action="store_true",
                        help="skip converting the pair sets to memfiles")
    parser.add_argument("--force", action="store_true",
                        help="regenerate even if a complete set with these parameters exists")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    kwargs = dict(seed=args.seed, num_train_ids=args.num_train_ids, imgs_per_id=args.imgs_per_id,
                  num_val_ids=args.num_val_ids, pairs_per_set=args.pairs_per_set,
                  make_memfiles=not args.no_memfiles, make_image_folder=not args.no_image_folder)
    result = (generate_demo_data if args.force else ensure_demo_data)(args.out, **kwargs)

    from prettytable import PrettyTable
    table = PrettyTable(["item", "value"])
    table.align = "l"
    table.add_row(["folder", str(result["root"])])
    table.add_row(["status", "generated" if result["generated"] else "already complete, reused"])
    for key, value in result["counts"].items():
        table.add_row([key, value])
    table.add_row(["pair sets", ", ".join(result["params"]["set_names"])])
    table.add_row(["seconds", f"{result['seconds']:.1f}"])
    table.add_row(["train with", f"--data_root {result['root']} --train_data_path . "
                                 f"--val_data_path . [--use_mxrecord]"])
    print(table)
    return result


if __name__ == "__main__":
    main()
