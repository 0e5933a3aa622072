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
instead of building B x C one-hot matrices and running ``acos``/``cos`` over every class, and
the kernel's column normalisation is folded into the same function (no normalised E x C copy).

Layout for later sharding of the class centres (Partial FC): a head is ``class centres`` (the
``kernel``, passed to :class:`MarginLogits` as an input, so a shard can be passed instead) + a
*margin rule* (:meth:`MarginHead.target_margins`) that only sees feature norms and the batch size.
"""
from __future__ import annotations

import logging
import math
from typing import Optional, Tuple

import torch
from torch import nn
from torch.nn import Parameter

from utils.errors import UserError
from utils.quality import NORM_CLIP, quality_indicator

logger = logging.getLogger(__name__)

HEAD_TYPES = ("adaface", "arcface", "cosface")

#: Which of the head's device-specific code paths run: ``None`` follows each tensor's device (the
#: CUDA path on CUDA tensors); ``"cuda"`` forces the CUDA path (asynchronous label check,
#: unconditional clamp) and ``"cpu"`` the CPU path (synchronous check with a ValueError, clamp
#: only when a cosine is out of range) on any tensor. Both give the same numbers; the switch lets
#: the tests run the CUDA path on a machine without a GPU.
DEVICE_BRANCH: Optional[str] = None


def _cuda_branch(tensor: torch.Tensor) -> bool:
    """Whether the CUDA code path runs for ``tensor`` (see :data:`DEVICE_BRANCH`)."""
    if DEVICE_BRANCH is None:
        return tensor.is_cuda
    if DEVICE_BRANCH not in ("cuda", "cpu"):
        raise ValueError(f"head.DEVICE_BRANCH must be None, 'cuda' or 'cpu', got {DEVICE_BRANCH!r}")
    return DEVICE_BRANCH == "cuda"


def l2_norm(input: torch.Tensor, axis: int = 1) -> torch.Tensor:
    """Divide ``input`` by its L2 norm along ``axis`` (published helper, kept for compatibility)."""
    norm = torch.norm(input, 2, axis, True)
    return torch.div(input, norm)


def init_kernel(embedding_size: int, classnum: int) -> torch.Tensor:
    """Class centres as published: uniform(-1, 1), each column renormed to unit length."""
    kernel = torch.empty(embedding_size, classnum)
    kernel.uniform_(-1, 1).renorm_(2, 1, 1e-5).mul_(1e5)
    return kernel


class LabelError(UserError, ValueError):
    """Training labels that are not class indices of the head (wrong shape, type or range)."""


def check_labels(labels: torch.Tensor, classnum: int, batch_size: int) -> torch.Tensor:
    """Return ``labels`` as an int64 column; raise :class:`LabelError` (a ``ValueError``) on a wrong
    shape, type or range."""
    if labels.dim() not in (1, 2) or labels.numel() != batch_size:
        raise LabelError(f"labels must hold one class index per embedding: got shape "
                         f"{tuple(labels.shape)} for {batch_size} embeddings")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise LabelError(f"labels must be integer class indices, got dtype {labels.dtype}")
    labels = labels.reshape(-1, 1).long()
    if batch_size and _cuda_branch(labels):
        # no host synchronisation per training step on the GPU: the check fails asynchronously
        torch._assert_async(((labels >= 0) & (labels < classnum)).all(),
                            f"labels must lie in [0, {classnum}) (the head's classnum)")
    elif batch_size:
        low, high = int(labels.min()), int(labels.max())
        if low < 0 or high >= classnum:
            raise LabelError(f"labels must lie in [0, {classnum}) (the head's classnum), got values "
                             f"from {low} to {high}; is --custom_num_class or the data set right?")
    return labels


def _target_transform(raw_target: torch.Tensor, angular: Optional[torch.Tensor],
                      additive: torch.Tensor, eps: float):
    """Margin on the target cosines (B, 1): returns ``(new target cosine, d new / d raw cosine)``.

    ``cos(clip(acos(c) + angular, eps, pi - eps)) - additive`` of the clamped cosine ``c`` (or
    ``c - additive`` without an angular margin); the derivative is zero where a clamp or clip bites.
    """
    low, high = -1.0 + eps, 1.0 - eps
    passes = (raw_target >= low) & (raw_target <= high)
    target = raw_target.clamp(low, high)
    if angular is None:
        return target - additive, passes.to(target.dtype)
    shifted = target.acos() + angular
    theta_m = shifted.clamp(eps, math.pi - eps)
    # d cos(clip(acos(c) + g)) / dc = sin(theta_m) / sqrt(1 - c^2) where the clip lets it through
    derivative = theta_m.sin() / (1.0 - target * target).sqrt()
    derivative = derivative * ((shifted >= eps) & (shifted <= math.pi - eps)) * passes
    return theta_m.cos() - additive, derivative


class _MarginState:
    """What :func:`margin_logits_backward` needs of a :func:`margin_logits_forward` call."""

    __slots__ = ("embeddings", "kernel", "labels", "inv_norm", "logits", "derivative", "target_cos",
                 "s", "bound", "clamped")


def margin_logits_forward(embeddings: torch.Tensor, kernel: torch.Tensor, labels: torch.Tensor,
                          angular: Optional[torch.Tensor], additive: torch.Tensor, s: float, eps: float,
                          has_target: Optional[torch.Tensor] = None):
    """The forward of :class:`MarginLogits`: returns ``(logits, state)`` (see there).

    ``has_target`` (B x 1 bool, optional): rows whose class is not among ``kernel``'s columns (a
    shard of the class centres) have ``False``; their ``labels`` entry is any valid column, which
    then gets the non-target rule (clamped cosine, derivative 1 inside the clamp).

    ``kernel`` is an E x C tensor, or an object that reads some columns of one in place: its
    ``logits_and_inv_norm(embeddings)`` returns ``(embeddings @ columns, 1 / column norms)`` and its
    ``times_transpose(grad)`` ``grad @ columns^T`` (the backward's embedding gradient; no kernel
    gradient is computed for it).
    """
    if isinstance(kernel, torch.Tensor):
        inv_norm = column_norms(kernel).reciprocal_()
        logits = torch.mm(embeddings, kernel)
    else:  # some columns of a larger kernel, read in place (head_sharded's kept columns)
        logits, inv_norm = kernel.logits_and_inv_norm(embeddings)
    bound = (1.0 - eps) * s
    logits.mul_(inv_norm * s)                                  # s * cos, one pass
    raw_target = logits.gather(1, labels).div_(s)
    if _cuda_branch(logits):  # a clamp pass is cheap there; reading min/max back would synchronise
        clamped = True
    else:  # rare on the CPU: skip the clamp (and the backward mask) when nothing is outside
        low, high = torch.aminmax(logits)
        clamped = bool(low < -bound) or bool(high > bound)
    if clamped:
        logits.clamp_(-bound, bound)
    new_target, derivative = _target_transform(raw_target, angular, additive, eps)
    target_cos = raw_target.clamp(-1.0 + eps, 1.0 - eps)
    if has_target is not None:
        passes = ((raw_target >= -1.0 + eps) & (raw_target <= 1.0 - eps)).to(derivative.dtype)
        new_target = torch.where(has_target, new_target, target_cos)
        derivative = torch.where(has_target, derivative, passes)
    logits.scatter_(1, labels, new_target * s)
    state = _MarginState()
    state.embeddings, state.kernel, state.labels, state.inv_norm = embeddings, kernel, labels, inv_norm
    state.logits, state.derivative, state.target_cos = logits, derivative, target_cos
    state.s, state.bound, state.clamped = s, bound, clamped
    return logits, state


def margin_grad_rows_(grad: torch.Tensor, state: _MarginState, rows: slice,
                     scale: torch.Tensor) -> torch.Tensor:
    """Turn ``grad``, the upstream gradient of the logits of ``rows`` (a block of rows, or all),
    in place into ``G`` (see :class:`MarginLogits`) for those rows; ``scale = s / n`` per column.
    Reads ``state.logits[rows]`` (the clamp mask), which must still hold the forward's logits.
    Returns the rows' target entries of ``G`` (rows x 1)."""
    labels = state.labels[rows]
    grad_target = grad.gather(1, labels) * state.derivative[rows] * scale[labels]
    grad.mul_(scale)
    if state.clamped:
        logits = state.logits[rows]
        grad.masked_fill_((logits <= -state.bound) | (logits >= state.bound), 0.0)
    grad.scatter_(1, labels, grad_target)
    return grad_target


def margin_input_grads(grad: torch.Tensor, state: _MarginState, grad_target: torch.Tensor,
                       col: Optional[torch.Tensor], target_logits: torch.Tensor,
                       needs_embeddings: bool = True, needs_kernel: bool = True):
    """``(grad_embeddings, grad_kernel)`` from ``G`` (``grad``, B x C), its target entries and
    ``col = sum_b G[b, j] * logits[b, j]`` over the forward's logits (``target_logits``: their
    target entries), which :func:`margin_logits_backward` computes and a caller that overwrites
    the logits with ``G`` (the sharded head) accumulates row block by row block."""
    grad_embeddings = grad_kernel = None
    if needs_embeddings:
        kernel = state.kernel
        grad_embeddings = (torch.mm(grad, kernel.t()) if isinstance(kernel, torch.Tensor)
                           else kernel.times_transpose(grad))
    if needs_kernel:
        grad_kernel = torch.mm(state.embeddings.t(), grad)
        grad_kernel.addcmul_(state.kernel, kernel_column_scale(state, grad_target, col, target_logits).unsqueeze(0),
                             value=-1.0)
    return grad_embeddings, grad_kernel


def kernel_column_scale(state: _MarginState, grad_target: torch.Tensor, col: torch.Tensor,
                        target_logits: torch.Tensor) -> torch.Tensor:
    """``(sum_b G[b, j] * cos[b, j]) / n_j`` per column ``j``: the kernel gradient is
    ``embeddings^T @ G - kernel * scale`` (see :func:`margin_input_grads`)."""
    # sum_b G[b, j] * cos[b, j], the cosines read back from the logits (targets from target_cos)
    col = col / state.s
    col.index_add_(0, state.labels.reshape(-1),
                   (grad_target * (state.target_cos - target_logits / state.s)).reshape(-1))
    return col * state.inv_norm


def margin_logits_backward(grad: torch.Tensor, state: _MarginState, needs_embeddings: bool = True,
                           needs_kernel: bool = True, inplace: bool = False):
    """The backward of :class:`MarginLogits`: ``(grad_embeddings, grad_kernel)`` for the upstream
    gradient ``grad`` (B x C) of the logits; with ``inplace`` ``grad`` is overwritten (no new B x C
    buffer)."""
    logits = state.logits
    scale = state.inv_norm * state.s                           # (C,)
    grad = grad if inplace else grad.clone()                   # G, at most one new B x C buffer
    grad_target = margin_grad_rows_(grad, state, slice(None), scale)
    col = None
    if needs_kernel:
        col = torch.zeros_like(state.inv_norm)
        for start in range(0, grad.shape[0], 64):          # row blocks keep the product small
            col += (grad[start:start + 64] * logits[start:start + 64]).sum(0)
    return margin_input_grads(grad, state, grad_target, col, logits.gather(1, state.labels),
                              needs_embeddings, needs_kernel)


class MarginLogits(torch.autograd.Function):
    """``embeddings (B x E), kernel (E x C) -> s * margin-adjusted cosine (B x C)``, hand-differentiated.

    Forward (:func:`margin_logits_forward`), with ``n_j`` the L2 norm of kernel column ``j`` and one
    B x C buffer (the output):

    1. ``s * cos = (embeddings @ kernel) * s / n`` (columns scaled in place; no normalised kernel copy);
    2. remember each row's target cosine, then clamp everything to ``s * [-1 + eps, 1 - eps]``
       (skipped when one min/max pass shows that nothing lies outside);
    3. target entries only: ``s *`` :func:`_target_transform` (the angular and additive margins).

    For non-target entries the published heads compute ``cos(clip(acos(c)))``, which after the
    clamp equals ``c`` (``acos(c)`` lies well inside ``[eps, pi - eps]``): they stay as they are,
    with derivative 1. Backward (:func:`margin_logits_backward`): ``G = s * grad / n`` where the
    clamp let the cosine through (zero where it clamped; clamped entries are recognised by their
    output value ``+-s(1 - eps)``) and ``s * grad * d target / d c / n`` at the targets; then
    ``grad_embeddings = G @ kernel^T`` and ``grad_kernel = embeddings^T @ G - kernel * (sum_b G * cos) / n``
    (the derivative through the column normalisation). Only the output and O(B + C) values are
    kept for backward. The sharded head (``head_sharded.py``) calls the same two functions.
    """

    @staticmethod
    def forward(ctx, embeddings: torch.Tensor, kernel: torch.Tensor, labels: torch.Tensor,
                angular: Optional[torch.Tensor], additive: torch.Tensor, s: float,
                eps: float) -> torch.Tensor:
        logits, state = margin_logits_forward(embeddings, kernel, labels, angular, additive, s, eps)
        ctx.save_for_backward(embeddings, kernel, labels, state.inv_norm, logits, state.derivative,
                              state.target_cos)
        ctx.s, ctx.bound, ctx.clamped = s, state.bound, state.clamped
        return logits

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        state = _MarginState()
        (state.embeddings, state.kernel, state.labels, state.inv_norm, state.logits, state.derivative,
         state.target_cos) = ctx.saved_tensors
        state.s, state.bound, state.clamped = ctx.s, ctx.bound, ctx.clamped
        grad_embeddings, grad_kernel = margin_logits_backward(
            grad_output, state, ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        return grad_embeddings, grad_kernel, None, None, None, None, None


def column_norms(matrix: torch.Tensor, rows_per_block: int = 32) -> torch.Tensor:
    """L2 norm of every column of ``matrix`` (E x C), summing squares over blocks of rows.

    Several times faster on CPUs than ``torch.norm(matrix, 2, 0)`` for a wide E x C kernel, and
    without an E x C temporary. A class-major ``matrix`` (the transposed view of a contiguous
    C x E tensor) takes each column's norm from its contiguous row instead.
    """
    if matrix.dim() == 2 and matrix.shape[0] > 1 and not matrix.is_contiguous() and matrix.t().is_contiguous():
        classes = matrix.t()      # class-major storage (the sampled sharded head's): a column is a row
        step = max(1, (1 << 18) // classes.shape[1])
        return torch.cat([torch.linalg.vector_norm(classes[start:start + step], dim=1)
                          for start in range(0, classes.shape[0], step)])
    squares = torch.zeros(matrix.shape[1], dtype=matrix.dtype, device=matrix.device)
    for start in range(0, matrix.shape[0], rows_per_block):
        block = matrix[start:start + rows_per_block]
        squares += (block * block).sum(0)
    return squares.sqrt_()


class MarginHead(nn.Module):
    """Shared machinery: the class centres (``kernel``) and the margin logits of :class:`MarginLogits`.

    Subclasses define :meth:`target_margins`, which maps feature norms to the per-sample
    angular and additive margins applied to the target cosines.
    """

    eps: float = 1e-4

    def __init__(self, embedding_size: int, classnum: int, s: float, m: float) -> None:
        super().__init__()
        self.classnum = classnum
        self.embedding_size = embedding_size
        self.kernel = Parameter(self.initial_kernel(embedding_size, classnum))
        self.m = m
        self.s = s

    def initial_kernel(self, embedding_size: int, classnum: int) -> torch.Tensor:
        """The initial class centres (:func:`init_kernel`; a sharded head draws its own columns)."""
        return init_kernel(embedding_size, classnum)

    def target_margins(self, norms: torch.Tensor,
                       batch_size: int) -> Tuple[Optional[torch.Tensor], torch.Tensor]:
        """Per-sample ``(angular, additive)`` margins (B x 1 each; ``angular`` may be None)."""
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
            return MarginLogits.apply(embeddings, self.kernel, labels, angular, additive,
                                      float(self.s), self.eps)

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
        safe_norms = torch.clip(norms, min=NORM_CLIP[0], max=NORM_CLIP[1]).clone().detach()
        self.update_norm_statistics(safe_norms)
        # the one formula of the quality indicator (utils.quality), with this batch's statistics
        return quality_indicator(safe_norms, self.batch_mean, self.batch_std, self.h, eps=self.eps)

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
