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
def embed_batch_views(model: nn.Module, images: torch.Tensor, use_flip: bool = True,
                      fusion_method: Optional[str] = "pre_norm_vector_add"
                      ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`embed_batch` plus the norm of every view before fusion: ``(features, norms,
    view_norms)``, ``view_norms`` of shape ``(B, 2)`` (image, mirror) with the flip, else ``(B, 1)``."""
    embeddings, norms = model(images)
    if not use_flip or fusion_method in (None, "none"):
        return embeddings.float(), norms.float(), norms.float().reshape(-1, 1)
    flip_embeddings, flip_norms = model(torch.flip(images, dims=[3]))
    features, fused = fuse_features(embeddings.float(), norms.float(), flip_embeddings.float(),
                                    flip_norms.float(), method=fusion_method)
    return features, fused, torch.cat([norms.float().reshape(-1, 1), flip_norms.float().reshape(-1, 1)], dim=1)


@torch.no_grad()
def embed_batch(model: nn.Module, images: torch.Tensor, use_flip: bool = True,
                fusion_method: Optional[str] = "pre_norm_vector_add") -> Tuple[torch.Tensor, torch.Tensor]:
    """Embed a batch ``(B, 3, 112, 112)``; with ``use_flip`` also its mirror, fused by ``fusion_method``.

    Returns ``(features, norms)`` in float32: features ``(B, 512)`` (``(B, 1024)`` for ``concat``)
    and norms ``(B, 1)``.
    """
    features, norms, _ = embed_batch_views(model, images, use_flip, fusion_method)
    return features, norms


@torch.no_grad()
def extract_features(model: nn.Module, batches: Iterable, device: torch.device | str = "cpu",
                     use_flip: bool = True, fusion_method: Optional[str] = "pre_norm_vector_add",
                     total: Optional[int] = None, desc: str = "embedding", with_quality: bool = False):
    """Embed every batch of images (a tensor, or a tuple whose first item is the tensor).

    Returns numpy ``(features (N, D), norms (N, 1))`` in the order of the batches, with a progress bar.
    With ``with_quality`` it returns ``(features, norms, view_norms (N, V), sharpness (N,))``: the
    norms of the image (and its mirror) before fusion and the image baseline
    :func:`utils.quality.laplacian_variance` of each input, for quality reports.
    """
    from utils.quality import laplacian_variance

    model.eval()
    feats, norms, views, sharp = [], [], [], []
    for batch in tqdm(batches, total=total, desc=desc, unit="batch"):
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        images = images.to(device, non_blocking=True)
        f, n, v = embed_batch_views(model, images, use_flip, fusion_method)
        feats.append(f.cpu().numpy())
        norms.append(n.cpu().numpy())
        if with_quality:
            views.append(v.cpu().numpy())
            sharp.append(laplacian_variance(images).numpy())
    if not feats:
        raise ValueError("extract_features: no images to embed")
    if with_quality:
        return np.concatenate(feats), np.concatenate(norms), np.concatenate(views), np.concatenate(sharp)
    return np.concatenate(feats), np.concatenate(norms)
