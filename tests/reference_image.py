"""The published image convention written out plainly, independently of ``utils.image``.

The tests of every path that turns a picture into network input (pair-set memfiles, training
datasets, ``inference.to_input``, the evaluation scripts) compare against this one statement.
"""
from __future__ import annotations

import numpy as np


def published_input(rgb) -> np.ndarray:
    """RGB ``uint8`` ``(H, W, 3)``, or a stack ``(N, H, W, 3)``, -> the network input as the
    published code computes it: BGR, channels first, ``(pixel / 255 - 0.5) / 0.5``, in float64."""
    bgr = np.asarray(rgb)[..., ::-1].astype(np.float64)
    return np.ascontiguousarray(np.moveaxis((bgr / 255.0 - 0.5) / 0.5, -1, -3))
