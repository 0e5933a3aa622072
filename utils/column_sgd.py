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

Everything here works for any memory layout of the E x C parameter. With negative sampling the
sharded head stores it *class-major* (the transposed view of a contiguous C x E tensor, so that a
class's column is one contiguous run and reading some columns is a row gather); the operations
below work on the C x E view (``param.t()``), a block or chunk of classes at a time, and compute a
row-major parameter's blocks in its own layout.

:func:`sgd_step_` applies ``torch.optim.SGD``'s update (momentum, dampening, Nesterov, weight
decay), op for op torch's arithmetic:

* a gradient of every column: a block of classes at a time, the block's gradient computed just
  before its update while the block is in cache;
* a gradient of some columns (negative sampling): only those columns are stepped. Every other
  column would take a *zero-gradient* step (weight decay and momentum still move it), a linear map
  of its (weight, momentum) pair that is the same for every column. Those steps are kept pending
  (:class:`PendingSteps`: one step counter per column) and applied in closed form, the map's n-th
  power (computed in float64), when the column is next read (:func:`current_rows`, which the head
  calls before it reads kept columns) or when everything is flushed (:func:`flush_pending_`: before
  a checkpoint is written, a learning-rate change, a step of every column). Equal to torch's
  step-by-step float32 updates up to rounding (the tests: 1e-6 relative); the cost of a step is
  that of the kept columns, not of the shard.

Gradient accumulation adds into the kept form (:meth:`ColumnGradient.add_`), clipping reads
:meth:`ColumnGradient.square_norm` and scales with :meth:`ColumnGradient.mul_`; anything else can
:func:`materialize_column_grad` it into ``param.grad``.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch

_ATTR = "_column_grad"
_PENDING_ATTR = "_pending_sgd_steps"
_CPU_BLOCK_BYTES = 1 << 20        # classes stepped at a time: ~1 MiB of each tensor, so a block stays in cache
_DEVICE_BLOCK_BYTES = 1 << 26     # on a GPU bandwidth is not the issue: few, large blocks
_CHUNK_BYTES = 1 << 20            # kept classes gathered (and their gradient rows computed) at a time: 1 MiB


def class_rows(param: torch.Tensor) -> torch.Tensor:
    """The C x E view of an E x C parameter (contiguous when the parameter is class-major)."""
    return param.detach().t()


def class_major(columns: torch.Tensor) -> torch.Tensor:
    """An E x C tensor with the same values stored class-major (the transposed view of a
    contiguous C x E tensor); returned as is when it already is."""
    if columns.dim() == 2 and columns.t().is_contiguous():
        return columns
    return columns.t().contiguous().t()


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

    @property
    def width(self) -> int:
        """K: the number of columns given."""
        return self.grad_logits.shape[1] if self.is_factored else self.values.shape[1]

    def rows(self, param: torch.Tensor, start: int, stop: int,
             current: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The gradient of the given columns ``[start, stop)`` (positions in ``index``) as class
        rows, (stop - start) x E: a new tensor for ``factored`` (``current``: those columns of
        ``param`` as class rows, when the caller has them already), a view for ``columns``."""
        if not self.is_factored:
            return self.values.t()[start:stop]
        if current is None:
            current = _rows_at(class_rows(param), self.index, start, stop)
        if current.is_contiguous():     # class rows
            out = torch.mm(self.grad_logits[:, start:stop].t(), self.embeddings)
        else:                           # a block of a row-major parameter: computed in its layout
            out = torch.mm(self.embeddings.t(), self.grad_logits[:, start:stop]).t()
        return out.addcmul_(current, self.scale[start:stop].unsqueeze(1), value=-1.0)

    def explicit(self, param: torch.Tensor) -> "ColumnGradient":
        """The same gradient as ``columns`` (its values computed at ``param``; class-major)."""
        if not self.is_factored:
            return self
        values = self.embeddings.new_empty(self.width, self.embeddings.shape[1])
        for start, stop in _chunks(self.width, param):
            values[start:stop] = self.rows(param, start, stop)
        return ColumnGradient.columns(self.index, values.t())

    def to_dense(self, param: torch.Tensor) -> torch.Tensor:
        """The whole gradient as one E x C tensor laid out like ``param`` (evaluated at its values)."""
        grad = self.explicit(param)
        if grad.index is None:      # no second E x C copy where the layouts agree
            values = grad.values
            return values if values.stride() == param.stride() else torch.empty_like(param).copy_(values)
        dense = torch.zeros_like(param)
        class_rows(dense).index_copy_(0, grad.index, grad.values.t())
        return dense

    def square_norm(self, param: torch.Tensor) -> torch.Tensor:
        """Sum of squares (float32, a tensor: no host synchronisation); a ``factored`` gradient
        is evaluated a chunk of columns at a time, never whole."""
        if not self.is_factored:
            return self.values.float().pow(2).sum()
        total = torch.zeros((), dtype=torch.float32, device=param.device)
        for start, stop in _chunks(self.width, param):
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
        rows = self.values.new_zeros(union.shape[0], self.values.shape[0])
        rows.index_copy_(0, torch.searchsorted(union, self.index), self.values.t())
        values = rows.t()
        _add_columns_(values, torch.searchsorted(union, other.index), other.values)
        self.index, self.values = union, values
        return self


def _add_columns_(values: torch.Tensor, index: torch.Tensor, addend: torch.Tensor) -> None:
    """``values[:, index] += addend`` for unique ``index`` (as class rows: a row gather and scatter)."""
    rows = values.t()
    rows.index_copy_(0, index, rows.index_select(0, index).add_(addend.t()))


def _rows_at(rows: torch.Tensor, index: Optional[torch.Tensor], start: int, stop: int) -> torch.Tensor:
    """``rows[index[start:stop]]`` (a new tensor), or the slice ``rows[start:stop]`` when ``index`` is None."""
    return rows[start:stop] if index is None else rows.index_select(0, index[start:stop])


def _block_bytes(param: torch.Tensor) -> int:
    return _CPU_BLOCK_BYTES if param.device.type == "cpu" else _DEVICE_BLOCK_BYTES


def _blocks(param: torch.Tensor):
    """``[start, stop)`` blocks of classes (columns of the E x C ``param``), ~``_block_bytes`` each."""
    rows, columns = param.shape
    height = max(1, _block_bytes(param) // max(1, rows * param.element_size()))
    for start in range(0, columns, height):
        yield start, min(columns, start + height)


def _chunks(count: int, param: torch.Tensor):
    """``[start, stop)`` chunks of ``count`` given columns, ~``_CHUNK_BYTES`` of ``param``'s columns each."""
    per_chunk = _CHUNK_BYTES if param.device.type == "cpu" else _DEVICE_BLOCK_BYTES
    height = max(1, per_chunk // max(1, param.shape[0] * param.element_size()))
    for start in range(0, count, height):
        yield start, min(count, start + height)


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
        flush_pending_(param)
        dense = grad.to_dense(param.detach())
        if param.grad is None:
            param.grad = dense
        else:
            param.grad.add_(dense)


# ----------------------------------------------------------------------------------------------
# Zero-gradient steps kept pending (negative sampling)

Hyper = Tuple[float, float, float, float, bool]      # lr, momentum, dampening, weight_decay, nesterov


def _step_map(hyper: Hyper, first: bool) -> Tuple[float, float, float, float]:
    """``(a, b, c, d)``: one zero-gradient torch SGD step maps (weight w, momentum m) to
    ``(a w + b m, c w + d m)``; ``first``: the step that creates the momentum buffer (``m = d_p``)."""
    lr, momentum, dampening, decay, nesterov = hyper
    if momentum == 0:
        return 1.0 - lr * decay, 0.0, 0.0, 0.0
    if first:      # m' = decay * w; update = decay * w (+ momentum * m' with Nesterov)
        return 1.0 - lr * decay * (1.0 + momentum if nesterov else 1.0), 0.0, decay, 0.0
    c, d = (1.0 - dampening) * decay, momentum      # m' = c w + d m
    if nesterov:                                     # update = decay * w + momentum * m'
        u_w, u_m = decay + momentum * c, momentum * d
    else:
        u_w, u_m = c, d
    return 1.0 - lr * u_w, -lr * u_m, c, d


def _compose(x, y):
    """The map ``x`` after ``y`` (2 x 2 matrices as ``(a, b, c, d)`` rows)."""
    return (x[0] * y[0] + x[1] * y[2], x[0] * y[1] + x[1] * y[3],
            x[2] * y[0] + x[3] * y[2], x[2] * y[1] + x[3] * y[3])


class PendingSteps:
    """Zero-gradient SGD steps not yet applied to some columns of a parameter.

    ``clock`` counts the sampled steps since this record began; ``last[j]`` is the clock at which
    column ``j`` was last brought up to date, so it owes ``clock - last[j]`` steps of the map of
    ``hyper``. ``fresh``: the momentum buffer was created with this record (all zeros), so a
    column still at ``last == 0`` owes first the step that creates its buffer."""

    def __init__(self, param: torch.Tensor, buffer: Optional[torch.Tensor], hyper: Hyper, fresh: bool) -> None:
        self.buffer, self.hyper, self.fresh = buffer, hyper, fresh
        self.clock = 0
        self.last = torch.zeros(param.shape[1], dtype=torch.int32, device=param.device)
        self._powers: List[Tuple[float, float, float, float]] = [(1.0, 0.0, 0.0, 1.0)]
        self._table: Optional[torch.Tensor] = None

    def _power_table(self, device) -> torch.Tensor:
        """Rows ``n = 0 .. at least clock``: the map's n-th power (float64). Grown by doubling, so
        it is rebuilt O(log clock) times in a run, not at every step."""
        if self._table is None or self._table.shape[0] <= self.clock:
            step = _step_map(self.hyper, first=False)
            while len(self._powers) <= 2 * self.clock:
                self._powers.append(_compose(step, self._powers[-1]))
            self._table = torch.tensor(self._powers, dtype=torch.float64, device=device)
        return self._table

    def coefficients(self, owed: torch.Tensor, never: Optional[torch.Tensor]) -> torch.Tensor:
        """K x 4 float32 ``(a, b, c, d)`` of the maps that bring columns owing ``owed`` steps up to
        date (``never``: columns whose first owed step is the buffer-creating one)."""
        table = self._power_table(owed.device)
        if never is None:
            return table[owed].float()
        plain = table[owed]
        first = torch.tensor(_step_map(self.hyper, first=True), dtype=torch.float64, device=owed.device)
        before = table[(owed - 1).clamp_(min=0)]
        after_first = torch.stack([before[:, 0] * first[0] + before[:, 1] * first[2],
                                   before[:, 0] * first[1] + before[:, 1] * first[3],
                                   before[:, 2] * first[0] + before[:, 3] * first[2],
                                   before[:, 2] * first[1] + before[:, 3] * first[3]], dim=1)
        return torch.where(never.unsqueeze(1), after_first, plain).float()

    def bring_up_to_date_(self, rows: torch.Tensor, momentum: Optional[torch.Tensor],
                          last: torch.Tensor) -> bool:
        """Apply what the columns of ``rows`` (class rows, their momentum rows alike) owe, in place;
        ``last`` is their slice or gather of :attr:`last` (updated by the caller). Returns whether
        anything was owed (on a GPU: always True, nothing is read back)."""
        owed = self.clock - last
        if rows.device.type == "cpu" and not bool(owed.any()):
            return False
        never = (last == 0) & (owed > 0) if self.fresh else None
        coef = self.coefficients(owed, never).unsqueeze(2)       # K x 4 x 1
        if momentum is None:
            rows.mul_(coef[:, 0])
            return True
        weights = rows.clone()
        rows.mul_(coef[:, 0]).addcmul_(momentum, coef[:, 1])
        momentum.mul_(coef[:, 3]).addcmul_(weights, coef[:, 2])
        return True


def pending_steps(param: torch.Tensor) -> Optional[PendingSteps]:
    """The :class:`PendingSteps` of ``param`` (``None``: every column is up to date)."""
    return getattr(param, _PENDING_ATTR, None)


def drop_pending(param: torch.Tensor) -> None:
    """Forget the pending steps of ``param`` without applying them (its values were replaced)."""
    if pending_steps(param) is not None:
        setattr(param, _PENDING_ATTR, None)


@torch.no_grad()
def current_rows(param: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``param[:, index]`` as class rows (K x E, a new tensor), brought up to date first (written
    back into ``param`` and its momentum) if they owe pending steps."""
    rows = class_rows(param).index_select(0, index)
    pending = pending_steps(param)
    if pending is None:
        return rows
    last = pending.last.index_select(0, index)
    momentum = None if pending.buffer is None else class_rows(pending.buffer).index_select(0, index)
    if pending.bring_up_to_date_(rows, momentum, last):
        class_rows(param).index_copy_(0, index, rows)
        if momentum is not None:
            class_rows(pending.buffer).index_copy_(0, index, momentum)
        pending.last.index_fill_(0, index, pending.clock)
    return rows


@torch.no_grad()
def flush_pending_(param: torch.Tensor) -> None:
    """Apply every pending step of ``param`` (a block of classes at a time) and forget the record."""
    pending = pending_steps(param)
    if pending is None:
        return
    rows = class_rows(param)
    momentum = None if pending.buffer is None else class_rows(pending.buffer)
    for start, stop in _blocks(param):
        block_momentum = None if momentum is None else momentum[start:stop]
        pending.bring_up_to_date_(rows[start:stop], block_momentum, pending.last[start:stop])
    setattr(param, _PENDING_ATTR, None)


# ----------------------------------------------------------------------------------------------
# The step

def fused_step_supported(group: dict) -> bool:
    """Whether :func:`sgd_step_` implements this ``torch.optim.SGD`` parameter group's options."""
    return not (group.get("maximize") or group.get("differentiable") or torch.is_tensor(group["lr"])
                or torch.is_tensor(group["weight_decay"]))


@torch.no_grad()
def sgd_step_(param: torch.Tensor, grad: ColumnGradient, state: dict, *, lr: float, momentum: float,
              dampening: float, weight_decay: float, nesterov: bool) -> None:
    """One ``torch.optim.SGD`` step of ``param`` (E x C) with gradient ``grad``; ``state`` is the
    optimizer's state of ``param`` (its ``momentum_buffer`` is created on the first step, as torch
    does, laid out like ``param``). Per column: ``d = g + weight_decay * p``; ``buf = momentum *
    buf + (1 - dampening) * d`` (``buf = d`` the first time); ``p -= lr * (d + momentum * buf if
    nesterov else buf)``. A gradient of every column goes a block of classes at a time; one of some
    columns steps those (a chunk at a time) and leaves the others' zero-gradient step pending."""
    buf = state.get("momentum_buffer") if momentum != 0 else None
    first = momentum != 0 and buf is None
    hyper: Hyper = (float(lr), float(momentum), float(dampening), float(weight_decay), bool(nesterov))
    if grad.index is None:
        flush_pending_(param)
        if first:
            buf = state["momentum_buffer"] = torch.empty_like(param.detach())
        _step_all_columns(param, grad, buf, first, hyper)
        return
    pending = pending_steps(param)
    if pending is not None and (pending.hyper != hyper or pending.buffer is not buf):
        flush_pending_(param)                 # owed under the old settings: applied with them
        pending = None
    if first:
        buf = state["momentum_buffer"] = torch.zeros_like(param.detach())
    if pending is None and (momentum != 0 or weight_decay != 0):    # otherwise the others never move
        pending = PendingSteps(param, buf, hyper, fresh=first)
        setattr(param, _PENDING_ATTR, pending)
    rows = class_rows(param)
    momentum_rows = None if buf is None else class_rows(buf)
    for start, stop in _chunks(grad.width, param):
        index = grad.index[start:stop]
        current = current_rows(param, index)
        d = grad.rows(param, start, stop, current=current)
        d = torch.add(d, current, alpha=weight_decay) if weight_decay != 0 else d.clone()
        buf_rows = None if momentum_rows is None else momentum_rows.index_select(0, index)
        _update_(current, d, buf_rows, first, hyper)
        rows.index_copy_(0, index, current)
        if buf_rows is not None:
            momentum_rows.index_copy_(0, index, buf_rows)
    if pending is not None:
        pending.clock += 1
        pending.last.index_fill_(0, grad.index, pending.clock)


def _step_all_columns(param: torch.Tensor, grad: ColumnGradient, buf: Optional[torch.Tensor], first: bool,
                      hyper: Hyper) -> None:
    """torch's step with a gradient of every column, a block of classes at a time."""
    rows = class_rows(param)
    momentum_rows = None if buf is None else class_rows(buf)
    weight_decay = hyper[3]
    for start, stop in _blocks(param):
        block = rows[start:stop]
        g = grad.rows(param, start, stop, current=block)
        d = torch.add(g, block, alpha=weight_decay) if weight_decay != 0 else g.clone()
        _update_(block, d, None if momentum_rows is None else momentum_rows[start:stop], first, hyper)


def _update_(p: torch.Tensor, d: torch.Tensor, buf: Optional[torch.Tensor], first: bool, hyper: Hyper) -> None:
    """torch's SGD update of one block, in place; ``d``: the block's decayed gradient (scratch)."""
    lr, momentum, dampening, _, nesterov = hyper
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
