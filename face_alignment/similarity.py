"""Five-point similarity alignment onto the 112x112 reference face: the one home of this step.

Every path that aligns a face from 5 landmarks (MTCNN detections, the landmarks that IJB-B/C ship)
uses :func:`align_face`, so all of them produce the same crop for the same landmarks.

The transform is the least-squares similarity (rotation, uniform scale, translation; no reflection)
from the landmarks to :data:`REFERENCE_POINTS_112`, the same optimum as
``skimage.transform.SimilarityTransform``'s estimate (Umeyama). The crop is warped with
``cv2.warpAffine`` (bilinear, black border).
"""
from __future__ import annotations

from typing import Tuple, Union

import cv2
import numpy as np
from PIL import Image

ALIGNED_SIZE = 112

#: Left eye, right eye, nose tip, left mouth corner, right mouth corner in the 112x112 crop.
REFERENCE_POINTS_112 = np.array([
    [38.2946, 51.6963],
    [73.5318, 51.5014],
    [56.0252, 71.7366],
    [41.5493, 92.3655],
    [70.7299, 92.2041],
], dtype=np.float64)


def _as_points(points: np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(points, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != 2 or arr.shape[0] < 2:
        raise ValueError(f"{name}: expected an (N, 2) array of points with N >= 2, "
                         f"got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name}: points must be finite, got {arr.tolist()}")
    return arr


def estimate_similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity transform mapping ``src`` points onto ``dst`` points.

    Returns the 2x3 matrix ``[[a, -b, tx], [b, a, ty]]`` (``dst ≈ M @ [x, y, 1]``) for
    ``cv2.warpAffine``. In 2-D the family ``s·R`` (scale, proper rotation) is exactly the set of
    matrices ``[[a, -b], [b, a]]``, so writing points as complex numbers the optimum is closed-form:
    ``z = Σ conj(p_i) q_i / Σ |p_i|²`` on centred points, ``t = mean(dst) - z·mean(src)``.
    """
    src = _as_points(src, "src")
    dst = _as_points(dst, "dst")
    if src.shape != dst.shape:
        raise ValueError(f"src and dst must have the same shape, got {src.shape} and {dst.shape}")
    p = src[:, 0] + 1j * src[:, 1]
    q = dst[:, 0] + 1j * dst[:, 1]
    p_mean, q_mean = p.mean(), q.mean()
    pc, qc = p - p_mean, q - q_mean
    spread = float(np.sum(np.abs(pc) ** 2))
    if spread <= 1e-12:
        raise ValueError(f"src: all points coincide ({src.tolist()}); no similarity transform")
    z = np.sum(np.conj(pc) * qc) / spread
    t = q_mean - z * p_mean
    return np.array([[z.real, -z.imag, t.real],
                     [z.imag, z.real, t.imag]], dtype=np.float64)


def transform_points(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Apply a 2x3 affine ``matrix`` to ``(N, 2)`` points."""
    pts = _as_points(points, "points")
    m = np.asarray(matrix, dtype=np.float64)
    return pts @ m[:, :2].T + m[:, 2]


def align_face(rgb_image: Union[np.ndarray, Image.Image], landmarks5: np.ndarray,
               return_matrix: bool = False,
               ) -> Union[np.ndarray, Tuple[np.ndarray, np.ndarray]]:
    """Warp a face to the 112x112 reference pose from its 5 landmarks.

    ``rgb_image``: RGB ``uint8`` ``(H, W, 3)`` array or PIL image. ``landmarks5``: ``(5, 2)`` pixel
    coordinates (x, y) of left eye, right eye, nose tip, left and right mouth corner (a flat
    MTCNN-style ``x1..x5, y1..y5`` vector or an IJB-style ``x1, y1, x2, ...`` row must be reshaped
    by the caller; other shapes are refused rather than guessed). Returns the aligned RGB ``uint8``
    ``(112, 112, 3)`` array, and the 2x3 matrix from image to crop coordinates if
    ``return_matrix``.
    """
    image = np.asarray(rgb_image.convert("RGB")) if isinstance(rgb_image, Image.Image) \
        else np.asarray(rgb_image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"align_face: expected an RGB uint8 (H, W, 3) image, got "
                         f"{image.dtype} array of shape {image.shape}")
    points = np.asarray(landmarks5, dtype=np.float64)
    if points.shape != (5, 2):
        raise ValueError(f"align_face: expected 5 landmarks as a (5, 2) array of (x, y), "
                         f"got shape {points.shape}")
    matrix = estimate_similarity(points, REFERENCE_POINTS_112)
    aligned = cv2.warpAffine(np.ascontiguousarray(image), matrix, (ALIGNED_SIZE, ALIGNED_SIZE),
                             flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                             borderValue=(0, 0, 0))
    return (aligned, matrix) if return_matrix else aligned
