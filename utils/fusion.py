"""Flip fusion: combine the embedding of an image with that of its horizontal mirror.

The network returns an L2-normalised embedding ``e`` (N, D) and its pre-normalisation norm ``n``
(N, 1). At test time the flipped image (``torch.flip(x, dims=[3])``) is embedded too and the two
results are fused. The methods are those of the published AdaFace evaluation code
(``fuse_features_with_norm``):

``pre_norm_vector_add`` (the default for the 5 validation sets, IJB-B/C and TinyFace)
    ``f = normalize(e1*n1 + e2*n2)``, norm ``||e1*n1 + e2*n2||``.
``norm_weighted_avg``
    weights ``n_i / (n1 + n2)``, ``f = normalize(w1*e1 + w2*e2)``, norm ``(n1 + n2) / 2``.
``average``
    ``f = normalize(e1 + e2)``, norm ``(n1 + n2) / 2`` (ones when no norms are given).
``concat``
    ``f = [e1, e2]`` of dimension 2D (not re-normalised), norm as for ``average``.
``None`` / ``'none'``
    no flip test: ``(e1, n1)`` is returned unchanged.

Like the published code the normalisation divides by the plain L2 norm (no epsilon).
Every function works on torch tensors and on numpy arrays alike; the result has the input's type.
"""
from __future__ import annotations

import logging
from typing import Optional, Tuple, Union

import numpy as np
import torch

logger = logging.getLogger(__name__)

Array = Union[np.ndarray, torch.Tensor]

FUSION_METHODS: Tuple[str, ...] = ("pre_norm_vector_add", "norm_weighted_avg", "average", "concat", "none")
_NEEDS_NORMS = ("pre_norm_vector_add", "norm_weighted_avg")


def _canonical_method(method: Optional[str]) -> str:
    if method is None:
        return "none"
    if not isinstance(method, str) or method.lower() not in FUSION_METHODS:
        raise ValueError(f"unknown fusion method {method!r}; valid methods: {', '.join(FUSION_METHODS)} "
                         f"(or None for no flip fusion)")
    return method.lower()


def _l2_normalize(x: Array) -> Tuple[Array, Array]:
    """Return ``(x / ||x||, ||x||)`` row-wise, the norm of shape (N, 1)."""
    if isinstance(x, torch.Tensor):
        norm = torch.norm(x, 2, 1, True)
        return torch.div(x, norm), norm
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / norm, norm


def _check_pair(name_e: str, emb: Array, name_n: str, norm: Optional[Array]) -> Optional[Array]:
    """Validate one (embedding, norm) pair and return the norm as (N, 1)."""
    if emb.ndim != 2:
        raise ValueError(f"{name_e} must have shape (N, D), got {tuple(emb.shape)}")
    if norm is None:
        return None
    if isinstance(norm, torch.Tensor) != isinstance(emb, torch.Tensor):
        raise TypeError(f"{name_n} is a {type(norm).__name__} but {name_e} is a {type(emb).__name__}; "
                        f"pass torch tensors or numpy arrays, not a mix")
    if tuple(norm.shape) == (emb.shape[0],):
        norm = norm.reshape(-1, 1)
    if tuple(norm.shape) != (emb.shape[0], 1):
        raise ValueError(f"{name_n} must have shape ({emb.shape[0]}, 1) to match {name_e} "
                         f"{tuple(emb.shape)}, got {tuple(norm.shape)}")
    return norm


def fuse_features(emb: Array, norm: Optional[Array], flip_emb: Optional[Array] = None,
                  flip_norm: Optional[Array] = None,
                  method: Optional[str] = "pre_norm_vector_add") -> Tuple[Array, Array]:
    """Fuse the features of images and of their flips; returns ``(features, norms)``.

    ``emb``/``flip_emb``: (N, D) L2-normalised embeddings; ``norm``/``flip_norm``: their (N, 1)
    pre-normalisation norms ((N,) is accepted too). ``method`` is one of :data:`FUSION_METHODS`
    or ``None``; see the module docstring for the exact formulas. The returned norms have shape (N, 1).
    """
    method = _canonical_method(method)
    is_torch = isinstance(emb, torch.Tensor)
    if not is_torch and not isinstance(emb, np.ndarray):
        raise TypeError(f"emb must be a torch.Tensor or numpy.ndarray, got {type(emb).__name__}")
    norm = _check_pair("emb", emb, "norm", norm)

    if method == "none":
        if norm is None:
            raise ValueError("fusion method 'none' returns (emb, norm) and needs norm")
        return emb, norm

    if flip_emb is None:
        raise ValueError(f"fusion method {method!r} needs flip_emb (use method=None for no flip test)")
    if isinstance(flip_emb, torch.Tensor) != is_torch:
        raise TypeError(f"flip_emb is a {type(flip_emb).__name__} but emb is a {type(emb).__name__}")
    flip_norm = _check_pair("flip_emb", flip_emb, "flip_norm", flip_norm)
    if tuple(flip_emb.shape) != tuple(emb.shape):
        raise ValueError(f"flip_emb {tuple(flip_emb.shape)} and emb {tuple(emb.shape)} differ in shape")
    if (norm is None) != (flip_norm is None):
        raise ValueError("give both norm and flip_norm, or neither")
    if method in _NEEDS_NORMS and norm is None:
        raise ValueError(f"fusion method {method!r} needs norm and flip_norm")

    if method == "pre_norm_vector_add":
        return _l2_normalize(emb * norm + flip_emb * flip_norm)

    if norm is None:
        mean_norm = torch.ones((emb.shape[0], 1), dtype=emb.dtype, device=emb.device) if is_torch \
            else np.ones((emb.shape[0], 1), dtype=emb.dtype)
    else:
        mean_norm = (norm + flip_norm) / 2

    if method == "norm_weighted_avg":
        total = norm + flip_norm
        fused, _ = _l2_normalize(emb * (norm / total) + flip_emb * (flip_norm / total))
        return fused, mean_norm
    if method == "average":
        fused, _ = _l2_normalize(emb + flip_emb)
        return fused, mean_norm
    # concat
    fused = torch.cat([emb, flip_emb], dim=-1) if is_torch else np.concatenate([emb, flip_emb], axis=-1)
    return fused, mean_norm
