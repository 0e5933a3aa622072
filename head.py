"""Margin heads: AdaFace, ArcFace and CosFace.

The interface is the published one::

    from head import AdaFace
    adaface = AdaFace(embedding_size=512, classnum=70722, m=0.4, h=0.333, s=64., t_alpha=0.01)
    logits = adaface(embeddings, norms, labels)
    loss = torch.nn.CrossEntropyLoss()(logits, labels)

The values (logits, gradients, AdaFace's running statistics) are those of the published formulas
(README "Margin heads"). The implementation differs from the published one only in how it gets
there: the margin is applied to the B target logits alone (gather, transform, scatter) and the
B x C cosine matrix is clamped, scaled and back-propagated in place by :class:`MarginLogits`,
instead of building B x C one-hot matrices and running ``acos``/``cos`` over every class.

Layout for later sharding of the class centres (Partial FC): a head is ``class centres`` (the
``kernel``) + ``cosine_matrix`` + a *margin rule* that only sees target cosines and feature norms.
"""
from __future__ import annotations

import logging
import math
from typing import Optional, Tuple

import torch
from torch import nn
from torch.nn import Parameter

logger = logging.getLogger(__name__)

HEAD_TYPES = ("adaface", "arcface", "cosface")


def l2_norm(input: torch.Tensor, axis: int = 1) -> torch.Tensor:
    """Divide ``input`` by its L2 norm along ``axis`` (published helper, kept for compatibility)."""
    norm = torch.norm(input, 2, axis, True)
    return torch.div(input, norm)


def init_kernel(embedding_size: int, classnum: int) -> torch.Tensor:
    """Class centres as published: uniform(-1, 1), each column renormed to unit length."""
    kernel = torch.empty(embedding_size, classnum)
    kernel.uniform_(-1, 1).renorm_(2, 1, 1e-5).mul_(1e5)
    return kernel


def check_labels(labels: torch.Tensor, classnum: int, batch_size: int) -> torch.Tensor:
    """Return ``labels`` as an int64 column; raise ``ValueError`` on a wrong shape or range."""
    if labels.dim() not in (1, 2) or labels.numel() != batch_size:
        raise ValueError(f"labels must hold one class index per embedding: got shape "
                         f"{tuple(labels.shape)} for {batch_size} embeddings")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"labels must be integer class indices, got dtype {labels.dtype}")
    labels = labels.reshape(-1, 1).long()
    if batch_size:
        low, high = int(labels.min()), int(labels.max())
        if low < 0 or high >= classnum:
            raise ValueError(f"labels must lie in [0, {classnum}) (the head's classnum), got values "
                             f"from {low} to {high}; is --custom_num_class or the data set right?")
    return labels


class MarginLogits(torch.autograd.Function):
    """In-place ``cosine (B x C) -> s * margin-adjusted cosine`` with a hand-written backward.

    Forward, on the cosine matrix itself (no B x C temporaries):

    1. remember each row's target cosine ``c_t`` before clamping;
    2. clamp everything to ``[-1 + eps, 1 - eps]``;
    3. target entries only: ``cos(clip(acos(c_t) + angular, eps, pi - eps)) - additive``
       (``angular`` may be ``None`` for a purely additive margin);
    4. multiply by ``s``.

    For the non-target entries the published heads compute ``cos(clip(acos(c)))``; after the clamp
    that equals ``c`` (``acos(c)`` lies well inside ``[eps, pi - eps]``), so they stay as they are,
    with derivative 1. Backward: the gradient is ``s * grad`` where the clamp let the cosine through,
    zero where it clamped, and ``s * grad * d(target)/d(c_t)`` at the targets.

    Only the output (which the loss needs anyway) and O(B) values are saved. Clamped non-target
    entries are recognised in backward by their output value ``s * (+-(1 - eps))``.
    """

    @staticmethod
    def forward(ctx, cosine: torch.Tensor, labels: torch.Tensor, angular: Optional[torch.Tensor],
                additive: torch.Tensor, s: float, eps: float, angle_eps: float) -> torch.Tensor:
        low, high = -1.0 + eps, 1.0 - eps
        raw_target = cosine.gather(1, labels)
        target_passes = (raw_target >= low) & (raw_target <= high)
        target = raw_target.clamp(low, high)
        cosine.clamp_(low, high)
        if angular is not None:
            theta = target.acos()
            shifted = theta + angular
            theta_m = shifted.clamp(angle_eps, math.pi - angle_eps)
            new_target = theta_m.cos()
            # d cos(clip(acos(c) + g)) / dc = sin(theta_m) / sqrt(1 - c^2) where the clip passes
            derivative = theta_m.sin() / (1.0 - target * target).sqrt()
            angle_passes = (shifted >= angle_eps) & (shifted <= math.pi - angle_eps)
            derivative = derivative * angle_passes
        else:
            new_target = target
            derivative = torch.ones_like(target)
        new_target = new_target - additive
        cosine.scatter_(1, labels, new_target)
        cosine.mul_(s)
        ctx.mark_dirty(cosine)
        ctx.save_for_backward(cosine, labels, derivative * target_passes)
        ctx.s, ctx.low, ctx.high = s, low * s, high * s
        return cosine

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        logits, labels, target_derivative = ctx.saved_tensors
        s = ctx.s
        grad_target = grad_output.gather(1, labels) * (target_derivative * s)
        grad = grad_output * s
        grad.masked_fill_((logits <= ctx.low) | (logits >= ctx.high), 0.0)
        grad.scatter_(1, labels, grad_target)
        return grad, None, None, None, None, None, None


class MarginHead(nn.Module):
    """Shared machinery: class centres, cosine matrix, and the in-place margin logits.

    Subclasses define :meth:`target_margins`, which maps feature norms and labels to the per-sample
    angular and additive margins applied to the target cosines.
    """

    eps: float = 1e-4

    def __init__(self, embedding_size: int, classnum: int, s: float, m: float) -> None:
        super().__init__()
        self.classnum = classnum
        self.embedding_size = embedding_size
        self.kernel = Parameter(init_kernel(embedding_size, classnum))
        self.m = m
        self.s = s

    def cosine_matrix(self, embeddings: torch.Tensor) -> torch.Tensor:
        """``embeddings (B x E) @ unit columns of kernel (E x C)``."""
        kernel_norm = l2_norm(self.kernel, axis=0)
        return torch.mm(embeddings, kernel_norm)

    def target_margins(self, norms: torch.Tensor,
                       batch_size: int) -> Tuple[Optional[torch.Tensor], torch.Tensor]:
        raise NotImplementedError

    def forward(self, embbedings: torch.Tensor, norms: Optional[torch.Tensor],
                label: torch.Tensor) -> torch.Tensor:
        """Scaled margin logits ``(B x classnum)`` for L2-normalised ``embbedings`` (B x E)."""
        if embbedings.dim() != 2 or embbedings.shape[1] != self.embedding_size:
            raise ValueError(f"embeddings must have shape (B, {self.embedding_size}), "
                             f"got {tuple(embbedings.shape)}")
        batch_size = embbedings.shape[0]
        labels = check_labels(label, self.classnum, batch_size)
        device_type = embbedings.device.type
        with torch.autocast(device_type=device_type, enabled=False):
            embeddings = embbedings.float()
            if norms is not None:
                norms = norms.float()
            angular, additive = self.target_margins(norms, batch_size)
            cosine = self.cosine_matrix(embeddings)
            return MarginLogits.apply(cosine, labels, angular, additive, float(self.s),
                                      self.eps, self.eps)

    def extra_repr(self) -> str:
        return f"embedding_size={self.embedding_size}, classnum={self.classnum}, m={self.m}, s={self.s}"


class AdaFace(MarginHead):
    """AdaFace: a margin that adapts to image quality through the feature norm.

    With ``z`` the feature norm (detached, clipped to [0.001, 100]) and ``mu``, ``sigma`` running
    averages (momentum ``t_alpha``) of the batch mean and unbiased std of ``z``, updated with the
    current batch before use: ``z_hat = clip(h * (z - mu) / (sigma + eps), -1, 1)``; the target logit
    is ``s * (cos(clip(theta - m * z_hat, eps, pi - eps)) - (m + m * z_hat))``, ``eps = 1e-3``.

    A batch of one has no standard deviation (the published code turns ``batch_std`` into NaN for
    good); here ``batch_std`` is then left unchanged and a warning is logged.
    """

    eps = 1e-3

    def __init__(self, embedding_size: int = 512, classnum: int = 70722, m: float = 0.4,
                 h: float = 0.333, s: float = 64., t_alpha: float = 1.0) -> None:
        super().__init__(embedding_size, classnum, s=s, m=m)
        self.h = h
        self.t_alpha = t_alpha
        self.register_buffer("t", torch.zeros(1))
        self.register_buffer("batch_mean", torch.ones(1) * 20)
        self.register_buffer("batch_std", torch.ones(1) * 100)
        logger.info("AdaFace head: m=%s h=%s s=%s t_alpha=%s classnum=%d", m, h, s, t_alpha, classnum)

    @torch.no_grad()
    def update_norm_statistics(self, safe_norms: torch.Tensor) -> None:
        """EMA update of ``batch_mean``/``batch_std`` with this batch (on every call, as published)."""
        alpha = self.t_alpha
        mean = safe_norms.mean()
        self.batch_mean.copy_(mean * alpha + (1 - alpha) * self.batch_mean)
        if safe_norms.numel() > 1:
            std = safe_norms.std()
            self.batch_std.copy_(std * alpha + (1 - alpha) * self.batch_std)
        else:
            logger.warning("AdaFace: a batch of one sample has no norm std; batch_std kept at %.4f",
                           float(self.batch_std))

    def margin_scaler(self, norms: torch.Tensor) -> torch.Tensor:
        """``z_hat`` per sample, shape (B, 1); updates the running statistics first."""
        safe_norms = torch.clip(norms, min=0.001, max=100).clone().detach()
        self.update_norm_statistics(safe_norms)
        scaler = (safe_norms - self.batch_mean) / (self.batch_std + self.eps)
        return torch.clip(scaler * self.h, -1, 1)

    def target_margins(self, norms, batch_size):
        if norms is None:
            raise ValueError("AdaFace needs the feature norms: call head(embeddings, norms, labels)")
        norms = norms.reshape(-1, 1)
        if norms.shape[0] != batch_size:
            raise ValueError(f"norms must hold one value per embedding: got {norms.shape[0]} "
                             f"for {batch_size} embeddings")
        scaler = self.margin_scaler(norms)
        angular = self.m * scaler * -1
        additive = self.m + self.m * scaler
        return angular, additive

    def extra_repr(self) -> str:
        return super().extra_repr() + f", h={self.h}, t_alpha={self.t_alpha}"


class ArcFace(MarginHead):
    """ArcFace: target logit ``s * cos(clip(theta + m, eps, pi - eps))``, ``eps = 1e-4``."""

    def __init__(self, embedding_size: int = 512, classnum: int = 51332, s: float = 64.,
                 m: float = 0.5) -> None:
        super().__init__(embedding_size, classnum, s=s, m=m)
        logger.info("ArcFace head: m=%s s=%s classnum=%d", m, s, classnum)

    def target_margins(self, norms, batch_size):
        angular = torch.full((batch_size, 1), float(self.m), device=self.kernel.device)
        additive = torch.zeros((batch_size, 1), device=self.kernel.device)
        return angular, additive


class CosFace(MarginHead):
    """CosFace: target logit ``s * (cos(theta) - m)``, ``eps = 1e-4``."""

    def __init__(self, embedding_size: int = 512, classnum: int = 51332, s: float = 64.,
                 m: float = 0.4) -> None:
        super().__init__(embedding_size, classnum, s=s, m=m)
        logger.info("CosFace head: m=%s s=%s classnum=%d", m, s, classnum)

    def target_margins(self, norms, batch_size):
        additive = torch.full((batch_size, 1), float(self.m), device=self.kernel.device)
        return None, additive


def build_head(head_type: str, embedding_size: int, class_num: int, m: float, t_alpha: float,
               h: float, s: float) -> MarginHead:
    """The published factory: ``head_type`` is one of ``adaface``, ``arcface``, ``cosface``."""
    if head_type == "adaface":
        return AdaFace(embedding_size=embedding_size, classnum=class_num, m=m, h=h, s=s,
                       t_alpha=t_alpha)
    if head_type == "arcface":
        return ArcFace(embedding_size=embedding_size, classnum=class_num, m=m, s=s)
    if head_type == "cosface":
        return CosFace(embedding_size=embedding_size, classnum=class_num, m=m, s=s)
    raise ValueError(f"unknown head type {head_type!r}; valid head types: {', '.join(HEAD_TYPES)}")
