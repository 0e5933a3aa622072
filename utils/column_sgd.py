"""The sharded head's kernel gradient kept in a compact form, and the SGD step that consumes it.

With ``--partial_fc`` the kernel is the largest tensor of a run (E x C_local per rank). Its
gradient as a dense ``param.grad`` is one more tensor of that size: a third of the head's memory,
and four passes over E x C_local in the optimizer step (zero fill, weight decay, momentum, update).
Training therefore hands the kernel's gradient to the optimizer as a :class:`ColumnGradient`, kept
beside the parameter (:func:`add_column_grad`), never as ``param.grad``:

* ``columns``: the gradient of some columns (``index``, values E x K); zero elsewhere. Negative
  sampling (``--sample_rate r < 1``) produces this: only the kept columns have a gradient.
* ``dense``: ``columns`` with every column (``index=None``).
* ``factored``: ``embeddings^T @ G - kernel * scale`` (``G``: the B x C_local gradient of the
  logits, which the backward writes over the logits buffer anyway; ``scale``: one value per
  column). At ``r = 1`` the E x C_local gradient is then never stored: the step computes it column
  block by column block, each block just before that block's update.

:func:`sgd_step_` applies ``torch.optim.SGD``'s update (momentum, dampening, Nesterov, weight
decay) to the whole parameter, column block by column block so that the block's gradient, momentum
and weights are read and written while in cache: the same arithmetic as torch's step with the
dense gradient (zeros where ``columns`` has none; momentum and weight decay still move those
columns), op for op; the tests compare it with torch's SGD. Gradient accumulation adds into the
kept form (:meth:`ColumnGradient.add_`), clipping reads :meth:`ColumnGradient.square_norm` and
scales with :meth:`ColumnGradient.mul_`; anything else can :func:`materialize_column_grad` it
into ``param.grad``.
"""
from __future__ import annotations

from typing import Optional

import torch

_ATTR = "_column_grad"
_CPU_BLOCK_BYTES = 1 << 20        # one block of a tensor: ~1 MiB, so a block's three tensors stay in cache
_DEVICE_BLOCK_BYTES = 1 << 26     # on a GPU bandwidth is not the issue: few, large blocks


class ColumnGradient:
    """The gradient of an E x C parameter in one of three forms (see the module docstring)."""

    __slots__ = ("index", "values", "embeddings", "grad_logits", "scale")

    def __init__(self, index: Optional[torch.Tensor] = None, values: Optional[torch.Tensor] = None,
                 embeddings: Optional[torch.Tensor] = None, grad_logits: Optional[torch.Tensor] = None,
                 scale: Optional[torch.Tensor] = None) -> None:
        self.index, self.values = index, values
        self.embeddings, self.grad_logits, self.scale = embeddings, grad_logits, scale

    @classmethod
    def columns(cls, index: Optional[torch.Tensor], values: torch.Tensor) -> "ColumnGradient":
        """Columns ``index`` (sorted, unique; ``None``: all) have gradient ``values`` (E x K)."""
        return cls(index=index, values=values)

    @classmethod
    def factored(cls, embeddings: torch.Tensor, grad_logits: torch.Tensor,
                 scale: torch.Tensor) -> "ColumnGradient":
        """``embeddings^T @ grad_logits - param * scale`` (B x E, B x C, C), evaluated at the step."""
        return cls(embeddings=embeddings, grad_logits=grad_logits, scale=scale)

    @property
    def is_factored(self) -> bool:
        return self.grad_logits is not None

    def block(self, param: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """The gradient of columns ``[start, stop)`` as a new E x (stop - start) tensor
        (``factored`` or ``dense`` only)."""
        if self.is_factored:
            out = torch.mm(self.embeddings.t(), self.grad_logits[:, start:stop])
            return out.addcmul_(param[:, start:stop], self.scale[start:stop].unsqueeze(0), value=-1.0)
        return self.values[:, start:stop].clone()

    def to_dense(self, param: torch.Tensor) -> torch.Tensor:
        """The whole gradient as one E x C tensor (evaluated at ``param``'s current values)."""
        if self.is_factored:
            out = torch.mm(self.embeddings.t(), self.grad_logits)
            return out.addcmul_(param, self.scale.unsqueeze(0), value=-1.0)
        if self.index is None:
            return self.values
        return torch.zeros_like(param).index_copy_(1, self.index, self.values)

    def square_norm(self, param: torch.Tensor) -> torch.Tensor:
        """Sum of squares (float32, a tensor: no host synchronisation)."""
        if not self.is_factored:
            return self.values.float().pow(2).sum()
        total = torch.zeros((), dtype=torch.float32, device=param.device)
        for start, stop in _blocks(param):
            total = total + self.block(param, start, stop).float().pow(2).sum()
        return total

    def mul_(self, factor) -> "ColumnGradient":
        """Scale the gradient in place (``factor``: a number or a 0-d tensor)."""
        if self.is_factored:
            self.grad_logits.mul_(factor)
            self.scale = self.scale * factor
        else:
            self.values.mul_(factor)
        return self

    def add_(self, other: "ColumnGradient", param: torch.Tensor) -> "ColumnGradient":
        """Accumulate ``other`` (gradient accumulation over micro-batches): ``self + other`` with
        the values that autograd's ``grad += new`` would give. A ``factored`` operand is first
        evaluated at ``param`` (the weights do not change between micro-batches)."""
        if self.is_factored:
            self.__init__(index=None, values=self.to_dense(param))
        if other.is_factored:
            other = ColumnGradient.columns(None, other.to_dense(param))
        if self.index is None:
            if other.index is None:
                self.values.add_(other.values)
            else:
                _add_columns_(self.values, other.index, other.values)
            return self
        if other.index is None:
            values = other.values.clone()
            _add_columns_(values, self.index, self.values)    # x + y == y + x in floating point
            self.index, self.values = None, values
            return self
        union = torch.unique(torch.cat([self.index, other.index]))         # sorted
        values = self.values.new_zeros(self.values.shape[0], union.shape[0])
        values.index_copy_(1, torch.searchsorted(union, self.index), self.values)
        _add_columns_(values, torch.searchsorted(union, other.index), other.values)
        self.index, self.values = union, values
        return self


def _add_columns_(values: torch.Tensor, index: torch.Tensor, addend: torch.Tensor) -> None:
    """``values[:, index] += addend`` for unique ``index`` (index_select / index_copy: fast along dim 1)."""
    values.index_copy_(1, index, values.index_select(1, index).add_(addend))


def _blocks(param: torch.Tensor):
    """``[start, stop)`` column blocks of about ``_BLOCK_BYTES`` of ``param`` (E x C) each."""
    rows, columns = param.shape
    width = max(64, _block_bytes(param) // max(1, rows * param.element_size()))
    for start in range(0, columns, width):
        yield start, min(columns, start + width)


def _row_blocks(param: torch.Tensor):
    """``[start, stop)`` row blocks (contiguous) of about ``_BLOCK_BYTES`` of ``param`` each."""
    rows, columns = param.shape
    height = max(1, _block_bytes(param) // max(1, columns * param.element_size()))
    for start in range(0, rows, height):
        yield start, min(rows, start + height)


def _block_bytes(param: torch.Tensor) -> int:
    return _CPU_BLOCK_BYTES if param.device.type == "cpu" else _DEVICE_BLOCK_BYTES


def column_grad(param: torch.Tensor) -> Optional[ColumnGradient]:
    """The :class:`ColumnGradient` kept for ``param`` (``None`` when there is none)."""
    return getattr(param, _ATTR, None)


def add_column_grad(param: torch.Tensor, grad: ColumnGradient) -> None:
    """Keep ``grad`` for ``param``, adding it to what is kept already (accumulation)."""
    kept = column_grad(param)
    setattr(param, _ATTR, grad if kept is None else kept.add_(grad, param.detach()))


def take_column_grad(param: torch.Tensor) -> Optional[ColumnGradient]:
    """Remove and return what is kept for ``param``."""
    grad = column_grad(param)
    if grad is not None:
        setattr(param, _ATTR, None)
    return grad


def materialize_column_grad(param: torch.Tensor) -> None:
    """Move what is kept for ``param`` into ``param.grad`` (added to it if that exists)."""
    grad = take_column_grad(param)
    if grad is None:
        return
    with torch.no_grad():
        dense = grad.to_dense(param.detach())
        if param.grad is None:
            param.grad = dense
        else:
            param.grad.add_(dense)


def fused_step_supported(group: dict) -> bool:
    """Whether :func:`sgd_step_` implements this ``torch.optim.SGD`` parameter group's options."""
    return not (group.get("maximize") or group.get("differentiable") or torch.is_tensor(group["lr"])
                or torch.is_tensor(group["weight_decay"]))


@torch.no_grad()
def sgd_step_(param: torch.Tensor, grad: ColumnGradient, state: dict, *, lr: float, momentum: float,
              dampening: float, weight_decay: float, nesterov: bool) -> None:
    """One ``torch.optim.SGD`` step of ``param`` (E x C) with gradient ``grad``; ``state`` is the
    optimizer's state of ``param`` (its ``momentum_buffer`` is created on the first step, as torch
    does). Per block: ``d = g + weight_decay * p``; ``buf = momentum * buf + (1 - dampening) * d``
    (``buf = d`` the first time); ``p -= lr * (d + momentum * buf if nesterov else buf)``.
    ``columns`` and ``dense`` go row block by row block (contiguous; a ``columns`` block's ``d`` is
    ``weight_decay * p`` with the given columns' ``g + weight_decay * p`` written in), ``factored``
    column block by column block (each block's gradient is one small product)."""
    p = param.detach()
    buf = state.get("momentum_buffer") if momentum != 0 else None
    first = momentum != 0 and buf is None
    if first:
        buf = torch.empty_like(p)
        state["momentum_buffer"] = buf
    if grad.is_factored:
        for start, stop in _blocks(p):
            d = grad.block(p, start, stop)
            if weight_decay != 0:
                d.add_(p[:, start:stop], alpha=weight_decay)
            _update_(p[:, start:stop], d, None if buf is None else buf[:, start:stop], first, lr, momentum,
                     dampening, nesterov)
        return
    scratch = None
    for start, stop in _row_blocks(p):
        p_rows, g_rows = p[start:stop], grad.values[start:stop]
        if scratch is None or scratch.shape[0] != stop - start:
            scratch = torch.empty_like(p_rows)
        if grad.index is None:
            d = torch.add(g_rows, p_rows, alpha=weight_decay, out=scratch) if weight_decay != 0 else scratch.copy_(g_rows)
        else:
            d = torch.mul(p_rows, weight_decay, out=scratch) if weight_decay != 0 else scratch.zero_()
            given = g_rows.add(p_rows.index_select(1, grad.index), alpha=weight_decay) if weight_decay != 0 else g_rows
            d.index_copy_(1, grad.index, given)
        _update_(p_rows, d, None if buf is None else buf[start:stop], first, lr, momentum, dampening, nesterov)


def _update_(p: torch.Tensor, d: torch.Tensor, buf: Optional[torch.Tensor], first: bool, lr: float,
             momentum: float, dampening: float, nesterov: bool) -> None:
    """torch's SGD update of one block, in place; ``d``: the block's decayed gradient (scratch)."""
    if buf is not None:
        if first:
            buf.copy_(d)
        else:
            buf.mul_(momentum).add_(d, alpha=1 - dampening)
        if nesterov:
            d.add_(buf, alpha=momentum)
        else:
            d = buf
    p.add_(d, alpha=-lr)
