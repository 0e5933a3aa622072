"""The MTCNN face detector (three cascaded networks) with the settings of the AdaFace code.

Pipeline (as in the mtcnn-pytorch implementation that AdaFace's ``face_alignment/mtcnn.py`` uses):

1. Image pyramid: scales ``m·f^k`` with ``m = 12 / min_face_size`` while the shorter side times the
   scale stays above 12 px (AdaFace: ``min_face_size=20``, factor ``f=0.85``). Each level is resized
   with PIL's bilinear filter to ``ceil(W·s) x ceil(H·s)``.
2. P-Net on every level; cells with face probability > 0.6 become 12x12 boxes (stride 2) mapped back
   to the image; NMS 0.5 (IoU) within each level, NMS 0.7 over all levels, box regression, squaring,
   rounding.
3. R-Net on 24x24 crops (zero-padded where a box leaves the image), probability > 0.7, NMS 0.7,
   box regression, squaring, rounding.
4. O-Net on 48x48 crops, probability > 0.9, landmarks from the (unregressed) box, box regression,
   NMS 0.7 measured by intersection over the smaller area ('min').

After the R-Net and the O-Net crops are cut, the boxes are clipped to the image (the published
code does so through array views, see :func:`clip_boxes`); NMS breaks score ties as the published
``argsort`` does. ``compat="published"`` changes only P-Net's softmax axis (see
:data:`COMPAT_MODES`).

Boxes are ``(x1, y1, x2, y2)`` with inclusive corners (width ``x2 - x1 + 1``) as in the reference.
The detections come out sorted by O-Net confidence, highest first.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import List, Sequence, Union

import numpy as np
import torch
from PIL import Image

from face_alignment.nets import load_nets

logger = logging.getLogger(__name__)

MIN_FACE_SIZE = 20
THRESHOLDS = (0.6, 0.7, 0.9)
NMS_THRESHOLDS = (0.7, 0.7, 0.7)
SCALE_FACTOR = 0.85
PNET_NMS_WITHIN_SCALE = 0.5
PNET_CELL, PNET_STRIDE = 12, 2
MAX_BATCH = 1024  # crops per R-Net / O-Net forward pass
#: ``"default"``: P-Net's softmax over its two channels; ``"published"``: over the last axis (the
#: image columns), as the published ``get_nets.py`` computes it. Nothing else differs.
COMPAT_MODES = ("default", "published")


def check_compat(compat: str) -> str:
    """``compat`` if it is one of :data:`COMPAT_MODES`, else a ``ValueError`` naming them."""
    if compat not in COMPAT_MODES:
        raise ValueError(f"compat must be one of {', '.join(COMPAT_MODES)}, got {compat!r}")
    return compat


@dataclass
class Detections:
    """MTCNN output for one image, sorted by score (highest first).

    ``boxes``: ``(N, 4)`` float ``x1, y1, x2, y2``; ``scores``: ``(N,)``; ``landmarks``: ``(N, 5, 2)``
    pixel (x, y) of left eye, right eye, nose, left and right mouth corner.
    """

    boxes: np.ndarray
    scores: np.ndarray
    landmarks: np.ndarray

    def __len__(self) -> int:
        return len(self.scores)

    @classmethod
    def empty(cls) -> "Detections":
        return cls(np.zeros((0, 4)), np.zeros((0,)), np.zeros((0, 5, 2)))


def normalize_pixels(rgb: np.ndarray) -> torch.Tensor:
    """RGB ``(..., H, W, 3)`` values -> float tensor ``(..., 3, H, W)`` scaled as MTCNN expects."""
    arr = np.asarray(rgb, dtype=np.float32)
    t = torch.from_numpy(np.ascontiguousarray(np.moveaxis(arr, -1, -3)))
    return (t - 127.5) * 0.0078125


def pyramid_scales(width: int, height: int, min_face_size: float = MIN_FACE_SIZE,
                   factor: float = SCALE_FACTOR) -> List[float]:
    """Scales at which P-Net (12 px window) sees faces from ``min_face_size`` px upwards."""
    m = PNET_CELL / min_face_size
    min_length = min(width, height) * m
    scales = []
    k = 0
    while min_length > PNET_CELL:
        scales.append(m * factor ** k)
        min_length *= factor
        k += 1
    return scales


def nms(boxes: np.ndarray, scores: np.ndarray, threshold: float, mode: str = "union") -> np.ndarray:
    """Greedy non-maximum suppression; returns kept indices, highest score first.

    Overlap is intersection over union (``mode='union'``) or over the smaller box (``'min'``),
    with inclusive-pixel areas ``(x2 - x1 + 1)(y2 - y1 + 1)``; a box is dropped when its overlap with
    a kept, higher-scoring box exceeds ``threshold``. Equal scores are visited in the order of the
    published code (numpy's default ascending ``argsort``, taken from its end), so ties among
    equally confident faces resolve, and the faces come out, as there.
    """
    if mode not in ("union", "min"):
        raise ValueError(f"nms mode must be 'union' or 'min', got {mode!r}")
    if len(boxes) == 0:
        return np.zeros((0,), dtype=np.int64)
    x1, y1, x2, y2 = (boxes[:, i] for i in range(4))
    area = (x2 - x1 + 1.0) * (y2 - y1 + 1.0)
    order = np.argsort(scores)[::-1]
    keep = []
    while order.size:
        best, rest = order[0], order[1:]
        keep.append(best)
        iw = np.maximum(0.0, np.minimum(x2[best], x2[rest]) - np.maximum(x1[best], x1[rest]) + 1.0)
        ih = np.maximum(0.0, np.minimum(y2[best], y2[rest]) - np.maximum(y1[best], y1[rest]) + 1.0)
        inter = iw * ih
        if mode == "min":
            overlap = inter / np.minimum(area[best], area[rest])
        else:
            overlap = inter / (area[best] + area[rest] - inter)
        order = rest[overlap <= threshold]
    return np.asarray(keep, dtype=np.int64)


def regress_boxes(boxes: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Apply the networks' box offsets: each corner moves by offset × box width/height."""
    w = boxes[:, 2] - boxes[:, 0] + 1.0
    h = boxes[:, 3] - boxes[:, 1] + 1.0
    return boxes + offsets * np.stack([w, h, w, h], axis=1)


def square_boxes(boxes: np.ndarray) -> np.ndarray:
    """Grow each box to a square of its longer side around the same centre."""
    w = boxes[:, 2] - boxes[:, 0] + 1.0
    h = boxes[:, 3] - boxes[:, 1] + 1.0
    side = np.maximum(w, h)
    x1 = boxes[:, 0] + 0.5 * w - 0.5 * side
    y1 = boxes[:, 1] + 0.5 * h - 0.5 * side
    return np.stack([x1, y1, x1 + side - 1.0, y1 + side - 1.0], axis=1)


def crop_boxes(rgb: np.ndarray, boxes: np.ndarray, size: int) -> torch.Tensor:
    """Cut integer boxes out of ``rgb`` (black where they leave the image) and resize each to
    ``size`` x ``size`` with PIL's bilinear filter; returns the normalised batch
    ``(N, 3, size, size)``."""
    height, width = rgb.shape[:2]
    crops = np.zeros((len(boxes), size, size, 3), dtype=np.uint8)
    for i, (x1, y1, x2, y2) in enumerate(boxes.astype(np.int64)):
        canvas = np.zeros((y2 - y1 + 1, x2 - x1 + 1, 3), dtype=np.uint8)
        sx1, sy1 = max(x1, 0), max(y1, 0)
        sx2, sy2 = min(x2, width - 1), min(y2, height - 1)
        if sx2 >= sx1 and sy2 >= sy1:
            canvas[sy1 - y1:sy2 - y1 + 1, sx1 - x1:sx2 - x1 + 1] = rgb[sy1:sy2 + 1, sx1:sx2 + 1]
        crops[i] = np.asarray(Image.fromarray(canvas).resize((size, size), Image.BILINEAR))
    return normalize_pixels(crops)


def clip_boxes(boxes: np.ndarray, width: int, height: int) -> np.ndarray:
    """Boxes with ``x1, y1`` raised to 0 and ``x2, y2`` lowered to ``width - 1, height - 1``.

    The published detector does this to its boxes as a side effect of cutting them out
    (``correct_bboxes`` writes through views of the box array), after R-Net's and O-Net's crops
    are taken, so each later step (NMS, box regression, landmark placement) works on the clipped
    box while the network saw the unclipped one. Both modes do the same, so that the default
    detector equals the published one apart from P-Net's softmax axis.
    """
    out = boxes.copy()
    out[:, 0] = np.maximum(out[:, 0], 0.0)
    out[:, 1] = np.maximum(out[:, 1], 0.0)
    out[:, 2] = np.minimum(out[:, 2], width - 1.0)
    out[:, 3] = np.minimum(out[:, 3], height - 1.0)
    return out


def _valid(boxes: np.ndarray) -> np.ndarray:
    """Boxes at least one pixel wide and high (degenerate regressions are dropped)."""
    return (boxes[:, 2] >= boxes[:, 0]) & (boxes[:, 3] >= boxes[:, 1])


class MTCNN:
    """Three-stage MTCNN detector; defaults are the AdaFace settings.

    ``weights_dir``: folder with ``pnet.pt``, ``rnet.pt``, ``onet.pt`` (default: the installed
    facenet-pytorch wheel's data). ``device``: where the networks run (``'cpu'``, ``'cuda'``, ...).
    ``compat``: ``"published"`` takes P-Net's softmax over the last axis as the published code
    does (it then finds far fewer faces on group photos); see :data:`COMPAT_MODES`.
    """

    def __init__(self, weights_dir: Union[str, Path, None] = None,
                 device: Union[str, torch.device] = "cpu",
                 min_face_size: float = MIN_FACE_SIZE,
                 thresholds: Sequence[float] = THRESHOLDS,
                 nms_thresholds: Sequence[float] = NMS_THRESHOLDS,
                 scale_factor: float = SCALE_FACTOR, compat: str = "default") -> None:
        if not 0.0 < scale_factor < 1.0:
            raise ValueError(f"scale_factor must be in (0, 1), got {scale_factor}")
        if min_face_size < PNET_CELL:
            raise ValueError(f"min_face_size must be >= {PNET_CELL} px, got {min_face_size}")
        if len(thresholds) != 3 or len(nms_thresholds) != 3:
            raise ValueError("thresholds and nms_thresholds need one value per stage (3 each)")
        self.device = torch.device(device)
        self.compat = check_compat(compat)
        self.pnet, self.rnet, self.onet = load_nets(weights_dir, self.device)
        self.pnet.softmax_dim = -1 if compat == "published" else 1
        self.min_face_size = float(min_face_size)
        self.thresholds = tuple(float(t) for t in thresholds)
        self.nms_thresholds = tuple(float(t) for t in nms_thresholds)
        self.scale_factor = float(scale_factor)

    # -- stages -----------------------------------------------------------------------------
    def _proposals_at(self, image: Image.Image, scale: float) -> np.ndarray:
        """P-Net on one pyramid level: ``(n, 9)`` rows of box, score, 4 offsets after NMS 0.5."""
        width, height = image.size
        level = image.resize((math.ceil(width * scale), math.ceil(height * scale)), Image.BILINEAR)
        x = normalize_pixels(np.asarray(level))[None].to(self.device)
        offsets, probs = self.pnet(x)
        probs = probs[0, 1].cpu().numpy()
        offsets = offsets[0].cpu().numpy()
        rows, cols = np.nonzero(probs > self.thresholds[0])
        if rows.size == 0:
            return np.zeros((0, 9))
        boxes = np.stack([
            np.round((PNET_STRIDE * cols + 1.0) / scale),
            np.round((PNET_STRIDE * rows + 1.0) / scale),
            np.round((PNET_STRIDE * cols + 1.0 + PNET_CELL) / scale),
            np.round((PNET_STRIDE * rows + 1.0 + PNET_CELL) / scale),
        ], axis=1)
        scores = probs[rows, cols].astype(np.float64)
        cand = np.concatenate([boxes, scores[:, None], offsets[:, rows, cols].T], axis=1)
        return cand[nms(boxes, scores, PNET_NMS_WITHIN_SCALE)]

    def _run_batched(self, net: torch.nn.Module, rgb: np.ndarray, boxes: np.ndarray,
                     size: int) -> List[np.ndarray]:
        """Run ``net`` on the crops of ``boxes`` in chunks; returns its outputs as numpy arrays."""
        chunks = []
        for start in range(0, len(boxes), MAX_BATCH):
            batch = crop_boxes(rgb, boxes[start:start + MAX_BATCH], size).to(self.device)
            chunks.append([o.cpu().numpy().astype(np.float64) for o in net(batch)])
        return [np.concatenate(parts, axis=0) for parts in zip(*chunks)]

    @torch.no_grad()
    def detect(self, image: Union[np.ndarray, Image.Image]) -> Detections:
        """Detect faces in an RGB image (``uint8`` ``(H, W, 3)`` array or PIL image)."""
        rgb = to_rgb_array(image)
        pil = Image.fromarray(rgb)
        empty = Detections.empty()

        # Stage 1: proposals over the pyramid.
        levels = [self._proposals_at(pil, s)
                  for s in pyramid_scales(pil.width, pil.height, self.min_face_size,
                                          self.scale_factor)]
        cand = np.concatenate(levels, axis=0) if levels else np.zeros((0, 9))
        if len(cand) == 0:
            return empty
        cand = cand[nms(cand[:, :4], cand[:, 4], self.nms_thresholds[0])]
        boxes = np.round(square_boxes(regress_boxes(cand[:, :4], cand[:, 5:9])))
        boxes = boxes[_valid(boxes)]

        # Stage 2: refine.
        if len(boxes) == 0:
            return empty
        offsets, probs = self._run_batched(self.rnet, rgb, boxes, 24)
        boxes = clip_boxes(boxes, pil.width, pil.height)
        keep = probs[:, 1] > self.thresholds[1]
        boxes, scores, offsets = boxes[keep], probs[keep, 1], offsets[keep]
        keep = nms(boxes, scores, self.nms_thresholds[1])
        boxes = np.round(square_boxes(regress_boxes(boxes[keep], offsets[keep])))
        boxes = boxes[_valid(boxes)]

        # Stage 3: output boxes and landmarks.
        if len(boxes) == 0:
            return empty
        marks, offsets, probs = self._run_batched(self.onet, rgb, boxes, 48)
        boxes = clip_boxes(boxes, pil.width, pil.height)
        keep = probs[:, 1] > self.thresholds[2]
        boxes, scores, offsets, marks = boxes[keep], probs[keep, 1], offsets[keep], marks[keep]
        if len(boxes) == 0:
            return empty
        w = boxes[:, 2:3] - boxes[:, 0:1] + 1.0
        h = boxes[:, 3:4] - boxes[:, 1:2] + 1.0
        landmarks = np.stack([boxes[:, 0:1] + w * marks[:, 0:5],
                              boxes[:, 1:2] + h * marks[:, 5:10]], axis=2)
        boxes = regress_boxes(boxes, offsets)
        keep = nms(boxes, scores, self.nms_thresholds[2], mode="min")
        return Detections(boxes[keep], scores[keep], landmarks[keep])


def to_rgb_array(image: Union[np.ndarray, Image.Image]) -> np.ndarray:
    """An RGB ``uint8`` ``(H, W, 3)`` array from a PIL image or an RGB / greyscale ``uint8`` array."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got dtype {arr.dtype}")
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected an RGB (H, W, 3) image, got shape {arr.shape}")
    if min(arr.shape[:2]) < 1:
        raise ValueError(f"empty image of shape {arr.shape}")
    return np.ascontiguousarray(arr)
