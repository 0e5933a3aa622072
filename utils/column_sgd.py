"""The sharded head's kernel gradient kept in a compact form, and the SGD step that consumes it.

With ``--partial_fc`` the kernel is the largest tensor of a run (E x C_local per rank). Its
gradient as a dense ``param.grad`` is one more tensor of that size: a third of the head's memory,
and four passes over E x C_local in the optimizer step (zero fill, weight decay, momentum, update).
Training therefore hands the kernel's gradient to the optimizer as a :class:`ColumnGradient`, kept
beside the parameter (:func:`add_column_grad`), never as ``param.grad``:

* ``factored``: ``embeddings^T @ G - kernel[:, index] * scale`` for the columns ``index`` (``None``:
  all), zero elsewhere. ``G`` is the B x K gradient of the logits, which the head's backward writes
  over its logits buffer anyway, ``scale`` one value per column. This is what the head produces:
  at ``r = 1`` every column, with negative sampling (``--sample_rate r < 1``) the kept ones. The
  E x K gradient is never stored: the step computes it a block at a time, just before that block's
  update.
* ``columns``: explicit values (E x K) for the columns ``index`` (``None``: all, i.e. dense); what
  gradient accumulation turns a ``factored`` gradient into when a second micro-batch arrives.

:func:`sgd_step_` applies ``torch.optim.SGD``'s update (momentum, dampening, Nesterov, weight
decay) to the whole parameter, a block at a time so that the block's gradient, momentum and
weights are read and written while in cache: the same arithmetic as torch's step with the dense
gradient (zeros where none is given; momentum and weight decay still move those columns), op for
op; the tests compare it with torch's SGD. Gradient accumulation adds into the kept form
(:meth:`ColumnGradient.add_`), clipping reads :meth:`ColumnGradient.square_norm` and scales with
:meth:`ColumnGradient.mul_`; anything else can :func:`materialize_column_grad` it into
``param.grad``.
"""
from __future__ import annotations

from typing import Optional

import torch

_ATTR = "_column_grad"
_CPU_BLOCK_BYTES = 1 << 20        # one block of a tensor: ~1 MiB, so a block's three tensors stay in cache
_DEVICE_BLOCK_BYTES = 1 << 26     # on a GPU bandwidth is not the issue: few, large blocks
_GROUP_ROWS = 8                   # rows of a factored gradient computed by one product: at least these,
_GROUP_BYTES = 1 << 22            # or as many as fill 4 MiB of the given columns


class ColumnGradient:
    """The gradient of an E x C parameter in one of the forms of the module docstring."""

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
    def factored(cls, embeddings: torch.Tensor, grad_logits: torch.Tensor, scale: torch.Tensor,
                 index: Optional[torch.Tensor] = None) -> "ColumnGradient":
        """Columns ``index`` (``None``: all) have gradient ``embeddings^T @ grad_logits - param[:, index]
        * scale`` (B x E, B x K, K), evaluated at the step; the others none."""
        return cls(index=index, embeddings=embeddings, grad_logits=grad_logits, scale=scale)

    @property
    def is_factored(self) -> bool:
        return self.grad_logits is not None

    def block(self, param: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """The gradient of columns ``[start, stop)`` as a new E x (stop - start) tensor
        (only where every column has one: ``index`` is ``None``)."""
        if self.is_factored:
            out = torch.mm(self.embeddings.t(), self.grad_logits[:, start:stop])
            return out.addcmul_(param[:, start:stop], self.scale[start:stop].unsqueeze(0), value=-1.0)
        return self.values[:, start:stop].clone()

    def rows(self, param: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Rows ``[start, stop)`` of the given columns' gradient ((stop - start) x K; a view for
        ``columns``)."""
        out = self.row_products(start, stop)
        if self.is_factored:
            self.correct_rows_(out, select_columns(param[start:stop], self.index))
        return out

    def row_products(self, start: int, stop: int) -> torch.Tensor:
        """``rows`` without the ``factored`` form's column term (see :meth:`correct_rows_`)."""
        if not self.is_factored:
            return self.values[start:stop]
        return torch.mm(self.embeddings.t()[start:stop], self.grad_logits)

    def correct_rows_(self, rows: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
        """Turn :meth:`row_products` rows into :meth:`rows` given those rows of ``param[:, index]``."""
        return rows.addcmul_(columns, self.scale.unsqueeze(0), value=-1.0) if self.is_factored else rows

    def explicit(self, param: torch.Tensor) -> "ColumnGradient":
        """The same gradient as ``columns`` (its values computed at ``param``)."""
        if not self.is_factored:
            return self
        if self.index is None:
            return ColumnGradient.columns(None, self.block(param, 0, param.shape[1]))
        return ColumnGradient.columns(self.index, self.rows(param, 0, param.shape[0]))

    def to_dense(self, param: torch.Tensor) -> torch.Tensor:
        """The whole gradient as one E x C tensor (evaluated at ``param``'s current values)."""
        grad = self.explicit(param)
        if grad.index is None:
            return grad.values
        return torch.zeros_like(param).index_copy_(1, grad.index, grad.values)

    def square_norm(self, param: torch.Tensor) -> torch.Tensor:
        """Sum of squares (float32, a tensor: no host synchronisation); a ``factored`` gradient
        is evaluated block by block, never whole."""
        if not self.is_factored:
            return self.values.float().pow(2).sum()
        total = torch.zeros((), dtype=torch.float32, device=param.device)
        if self.index is None:
            for start, stop in _blocks(param):
                total = total + self.block(param, start, stop).float().pow(2).sum()
        else:
            for start, stop in _row_groups(param, self.index.numel()):
                total = total + self.rows(param, start, stop).float().pow(2).sum()
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
        mine, other = self.explicit(param), other.explicit(param)
        self.__init__(index=mine.index, values=mine.values)
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


def select_columns(matrix: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``matrix[:, index]`` (a new tensor): ``torch.gather`` with the index broadcast over the rows,
    2-3x faster on CPUs than ``index_select`` along dim 1."""
    return torch.gather(matrix, 1, index.unsqueeze(0).expand(matrix.shape[0], -1))


def put_columns_(matrix: torch.Tensor, index: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``matrix[:, index] = values`` in place (``scatter_``; ~2.5x faster than ``index_copy_`` there)."""
    return matrix.scatter_(1, index.unsqueeze(0).expand(matrix.shape[0], -1), values)


def _columns_of_rows(rows: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``rows[:, index]`` for a block of a few rows (one row: a 1-D ``index_select``, the fastest)."""
    if rows.shape[0] == 1:
        return rows[0].index_select(0, index).unsqueeze(0)
    return select_columns(rows, index)


def _add_columns_(values: torch.Tensor, index: torch.Tensor, addend: torch.Tensor) -> None:
    """``values[:, index] += addend`` for unique ``index`` (index_select / index_copy: fast along dim 1)."""
    values.index_copy_(1, index, values.index_select(1, index).add_(addend))


def _blocks(param: torch.Tensor):
    """``[start, stop)`` column blocks of about :func:`_block_bytes` of ``param`` (E x C) each."""
    rows, columns = param.shape
    width = max(64, _block_bytes(param) // max(1, rows * param.element_size()))
    for start in range(0, columns, width):
        yield start, min(columns, start + width)


def _row_blocks(param: torch.Tensor, start: int = 0, stop: Optional[int] = None):
    """``[a, b)`` row blocks (contiguous) of about :func:`_block_bytes` of ``param`` each, within rows
    ``[start, stop)``."""
    stop = param.shape[0] if stop is None else stop
    height = _rows_per_block(param)
    for a in range(start, stop, height):
        yield a, min(stop, a + height)


def _row_groups(param: torch.Tensor, kept: Optional[int] = None):
    """Groups of whole row blocks, each about ``_GROUP_BYTES`` of the ``kept`` given columns (at
    least ``_GROUP_ROWS`` rows): a ``factored`` gradient's rows are one product per group (a
    product per single row would read all of ``grad_logits`` E times)."""
    rows, columns = param.shape
    height = _rows_per_block(param)
    wanted = max(_GROUP_ROWS, _GROUP_BYTES // max(1, (kept or columns) * param.element_size()))
    group = max(height, wanted // height * height)
    for start in range(0, rows, group):
        yield start, min(rows, start + group)


def _block_bytes(param: torch.Tensor) -> int:
    return _CPU_BLOCK_BYTES if param.device.type == "cpu" else _DEVICE_BLOCK_BYTES


def _rows_per_block(param: torch.Tensor) -> int:
    return max(1, _block_bytes(param) // max(1, param.shape[1] * param.element_size()))


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
    A ``factored`` gradient of every column goes column block by column block (each block's
    gradient is one small product); the others row block by row block (contiguous), a block's ``d``
    being ``weight_decay * p`` with the given columns' ``g + weight_decay * p`` written in, their
    ``g`` computed for a group of rows at a time (:func:`_row_groups`)."""
    p = param.detach()
    buf = state.get("momentum_buffer") if momentum != 0 else None
    first = momentum != 0 and buf is None
    if first:
        buf = torch.empty_like(p)
        state["momentum_buffer"] = buf
    if grad.is_factored and grad.index is None:
        for start, stop in _blocks(p):
            d = grad.block(p, start, stop)
            if weight_decay != 0:
                d.add_(p[:, start:stop], alpha=weight_decay)
            _update_(p[:, start:stop], d, None if buf is None else buf[:, start:stop], first, lr, momentum,
                     dampening, nesterov)
        return
    scratch = None
    for group_start, group_stop in _row_groups(p, None if grad.index is None else grad.index.numel()):
        products = grad.row_products(group_start, group_stop)     # one product for the group's rows
        for start, stop in _row_blocks(p, group_start, group_stop):
            p_rows, g_rows = p[start:stop], products[start - group_start:stop - group_start]
            if scratch is None or scratch.shape[0] != stop - start:
                scratch = torch.empty_like(p_rows)
            if grad.index is None:
                d = (torch.add(g_rows, p_rows, alpha=weight_decay, out=scratch) if weight_decay != 0
                     else scratch.copy_(g_rows))
            else:
                d = torch.mul(p_rows, weight_decay, out=scratch) if weight_decay != 0 else scratch.zero_()
                columns = _columns_of_rows(p_rows, grad.index)   # gathered while the rows are in cache
                g_rows = grad.correct_rows_(g_rows, columns)
                if weight_decay != 0:
                    g_rows = g_rows.add(columns, alpha=weight_decay)
                put_columns_(d, grad.index, g_rows)
            _update_(p_rows, d, None if buf is None else buf[start:stop], first, lr, momentum, dampening,
                     nesterov)


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
