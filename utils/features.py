"""Batched embedding extraction with flip fusion (training validation, evaluation, inference)."""
from __future__ import annotations

import logging
from typing import Iterable, Optional, Tuple

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from utils.fusion import fuse_features

logger = logging.getLogger(__name__)


@torch.no_grad()
def embed_batch(model: nn.Module, images: torch.Tensor, use_flip: bool = True,
                fusion_method: Optional[str] = "pre_norm_vector_add") -> Tuple[torch.Tensor, torch.Tensor]:
    """Embed a batch ``(B, 3, 112, 112)``; with ``use_flip`` also its mirror, fused by ``fusion_method``.

    Returns ``(features, norms)`` in float32: features ``(B, 512)`` (``(B, 1024)`` for ``concat``)
    and norms ``(B, 1)``.
    """
    embeddings, norms = model(images)
    if not use_flip or fusion_method in (None, "none"):
        return embeddings.float(), norms.float()
    flip_embeddings, flip_norms = model(torch.flip(images, dims=[3]))
    return fuse_features(embeddings.float(), norms.float(), flip_embeddings.float(), flip_norms.float(),
                         method=fusion_method)


@torch.no_grad()
def extract_features(model: nn.Module, batches: Iterable, device: torch.device | str = "cpu",
                     use_flip: bool = True, fusion_method: Optional[str] = "pre_norm_vector_add",
                     total: Optional[int] = None, desc: str = "embedding") -> Tuple[np.ndarray, np.ndarray]:
    """Embed every batch of images (a tensor, or a tuple whose first item is the tensor).

    Returns numpy ``(features (N, D), norms (N, 1))`` in the order of the batches, with a progress bar.
    """
    model.eval()
    feats, norms = [], []
    for batch in tqdm(batches, total=total, desc=desc, unit="batch"):
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        f, n = embed_batch(model, images.to(device, non_blocking=True), use_flip, fusion_method)
        feats.append(f.cpu().numpy())
        norms.append(n.cpu().numpy())
    if not feats:
        raise ValueError("extract_features: no images to embed")
    return np.concatenate(feats), np.concatenate(norms)
