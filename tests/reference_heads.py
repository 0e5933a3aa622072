"""Plain dense re-statements of the published margin formulas.

One-hot matrices over all B x C logits and ``acos``/``cos`` over the whole cosine matrix, exactly
as the published heads compute them. The tests compare ``head.py`` against these, and
``bench/bench_head.py`` times ``head.py`` against them.
"""
from __future__ import annotations

import math

import torch


def _cosine(embeddings, kernel):
    kernel_norm = kernel / torch.norm(kernel, 2, 0, True)
    return torch.mm(embeddings, kernel_norm)


def adaface_dense(embeddings, norms, labels, kernel, stats, m=0.4, h=0.333, s=64., t_alpha=1.0):
    """AdaFace; ``stats`` is a dict with tensors ``batch_mean`` and ``batch_std``, updated in place."""
    eps = 1e-3
    cosine = _cosine(embeddings, kernel).clamp(-1 + eps, 1 - eps)
    safe_norms = torch.clip(norms, min=0.001, max=100).clone().detach()
    with torch.no_grad():
        mean = safe_norms.mean()
        stats["batch_mean"] = mean * t_alpha + (1 - t_alpha) * stats["batch_mean"]
        if safe_norms.numel() > 1:  # documented deviation for a batch of one (see head.AdaFace)
            std = safe_norms.std()
            stats["batch_std"] = std * t_alpha + (1 - t_alpha) * stats["batch_std"]
    margin_scaler = (safe_norms - stats["batch_mean"]) / (stats["batch_std"] + eps)
    margin_scaler = torch.clip(margin_scaler * h, -1, 1)
    one_hot = torch.zeros(labels.shape[0], cosine.shape[1])
    one_hot.scatter_(1, labels.reshape(-1, 1), 1.0)
    m_arc = one_hot * (m * margin_scaler * -1)
    theta = cosine.acos()
    theta_m = torch.clip(theta + m_arc, min=eps, max=math.pi - eps)
    cosine = theta_m.cos()
    m_cos = one_hot * (m + m * margin_scaler)
    return (cosine - m_cos) * s


def arcface_dense(embeddings, norms, labels, kernel, m=0.5, s=64.):
    eps = 1e-4
    cosine = _cosine(embeddings, kernel).clamp(-1 + eps, 1 - eps)
    m_hot = torch.zeros(labels.shape[0], cosine.shape[1])
    m_hot.scatter_(1, labels.reshape(-1, 1), m)
    theta_m = torch.clip(cosine.acos() + m_hot, min=eps, max=math.pi - eps)
    return theta_m.cos() * s


def cosface_dense(embeddings, norms, labels, kernel, m=0.4, s=64.):
    eps = 1e-4
    cosine = _cosine(embeddings, kernel).clamp(-1 + eps, 1 - eps)
    m_hot = torch.zeros(labels.shape[0], cosine.shape[1])
    m_hot.scatter_(1, labels.reshape(-1, 1), m)
    return (cosine - m_hot) * s
