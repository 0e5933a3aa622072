"""Five-point similarity alignment onto the 112x112 reference face: the one home of this step.

Every path that aligns a face from 5 landmarks (MTCNN detections, the landmarks that IJB-B/C ship)
uses :func:`align_face`, so all of them produce the same crop for the same landmarks.

The transform is the least-squares similarity (rotation, uniform scale, translation; no reflection)
from the landmarks to :data:`REFERENCE_POINTS_112`, the same optimum as
``skimage.transform.SimilarityTransform``'s estimate (Umeyama). The crop is warped with
``cv2.warpAffine`` (bilinear, black border).

:func:`estimate_similarity_published` reproduces the published photo crop instead
(``compat="published"``): its ``warp_and_crop_face`` fits the transform the way MATLAB's
``cp2tform(..., 'similarity')`` does, quirks included (see that function).
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


def _fit_reference_to_image(ref: np.ndarray, img: np.ndarray) -> np.ndarray:
    """Least squares ``u = a·x + b·y + c``, ``v = -b·x + a·y + d`` from reference points (x, y)
    to image points (u, v); returns that 2x3 crop->image matrix ``[[a, b, c], [-b, a, d]]``."""
    n = len(ref)
    x, y = ref[:, 0], ref[:, 1]
    design = np.zeros((2 * n, 4))
    design[:n] = np.stack([x, y, np.ones(n), np.zeros(n)], axis=1)
    design[n:] = np.stack([y, -x, np.zeros(n), np.ones(n)], axis=1)
    if np.linalg.matrix_rank(design) < 4:
        raise ValueError(f"reference points {ref.tolist()}: need two distinct points")
    (a, b, c, d), *_ = np.linalg.lstsq(design, np.concatenate([img[:, 0], img[:, 1]]), rcond=None)
    return np.array([[a, b, c], [-b, a, d]])


def _invert_affine(matrix: np.ndarray) -> np.ndarray:
    full = np.vstack([matrix, [0.0, 0.0, 1.0]])
    return np.linalg.inv(full)[:2]


def estimate_similarity_published(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The image->crop similarity of the published ``warp_and_crop_face`` (``matlab_cp2tform``).

    Not the least-squares fit of ``src`` onto ``dst``: the published code (1) rounds both point
    sets to float32; (2) fits the similarity from the reference points ``dst`` to the image points
    ``src`` in the least-squares sense and inverts it (so the residual is minimised in image
    pixels, which makes the face about 5 % larger than the forward fit); (3) also fits a
    reflective candidate (the same fit to the reference mirrored across the y axis, the result
    mirrored back); (4) keeps whichever candidate lands nearer the reference *as mirrored* —
    the published ``xyR = xy`` aliases the reference array, so mirroring it for (3) also mirrors
    the points both candidates are then scored against. The first candidate wins ties.
    Returns the 2x3 matrix for ``cv2.warpAffine``.
    """
    src = _as_points(src, "src").astype(np.float32).astype(np.float64)
    dst = _as_points(dst, "dst").astype(np.float32).astype(np.float64)
    if src.shape != dst.shape:
        raise ValueError(f"src and dst must have the same shape, got {src.shape} and {dst.shape}")
    mirror = np.array([[-1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    mirrored = dst * [-1.0, 1.0]
    direct = _invert_affine(_fit_reference_to_image(dst, src))
    reflected = np.vstack([mirror, [0.0, 0.0, 1.0]])[:2] @ np.vstack(
        [_invert_affine(_fit_reference_to_image(mirrored, src)), [0.0, 0.0, 1.0]])
    miss_direct = np.linalg.norm(transform_points(direct, src) - mirrored)
    miss_reflected = np.linalg.norm(transform_points(reflected, src) - mirrored)
    return direct if miss_direct <= miss_reflected else reflected


def transform_points(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Apply a 2x3 affine ``matrix`` to ``(N, 2)`` points."""
    pts = _as_points(points, "points")
    m = np.asarray(matrix, dtype=np.float64)
    return pts @ m[:, :2].T + m[:, 2]


def align_face(rgb_image: Union[np.ndarray, Image.Image], landmarks5: np.ndarray,
               return_matrix: bool = False, compat: str = "default",
               ) -> Union[np.ndarray, Tuple[np.ndarray, np.ndarray]]:
    """Warp a face to the 112x112 reference pose from its 5 landmarks.

    ``rgb_image``: RGB ``uint8`` ``(H, W, 3)`` array or PIL image. ``landmarks5``: ``(5, 2)`` pixel
    coordinates (x, y) of left eye, right eye, nose tip, left and right mouth corner (a flat
    MTCNN-style ``x1..x5, y1..y5`` vector or an IJB-style ``x1, y1, x2, ...`` row must be reshaped
    by the caller; other shapes are refused rather than guessed). Returns the aligned RGB ``uint8``
    ``(112, 112, 3)`` array, and the 2x3 matrix from image to crop coordinates if
    ``return_matrix``. ``compat="published"`` estimates the matrix as the published photo crop
    does (:func:`estimate_similarity_published`) instead of the forward least-squares fit.
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
    if compat == "published":
        matrix = estimate_similarity_published(points, REFERENCE_POINTS_112)
    elif compat == "default":
        matrix = estimate_similarity(points, REFERENCE_POINTS_112)
    else:
        raise ValueError(f"compat must be 'default' or 'published', got {compat!r}")
    aligned = cv2.warpAffine(np.ascontiguousarray(image), matrix, (ALIGNED_SIZE, ALIGNED_SIZE),
                             flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                             borderValue=(0, 0, 0))
    return (aligned, matrix) if return_matrix else aligned
