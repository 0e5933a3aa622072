"""Sharded margin heads (Partial FC): the class centres split over the ranks of a process group.

Each of the W ranks holds the kernel columns of its own classes, ``[start, stop)`` of
:func:`shard_bounds` (C split as evenly as possible, no padding classes). A forward:

1. all-gathers the embeddings (with a backward that sums every rank's contribution, so the
   backbone gets exactly the gradient of the unsharded head on the concatenated batch), the labels
   and, for AdaFace, the norms (``stats="global"``) or the per-sample margins (``stats="local"``);
2. computes this shard's margin logits with ``head.py``'s :func:`~head.margin_logits_forward`
   (the one home of the margin maths; rows whose class lives elsewhere get the non-target rule);
3. returns the cross-entropy of the whole global batch (mean over its B samples, identical on
   every rank) from a distributed, stable float32 log-softmax: each shard's row maxima, sums of
   ``exp(logit - max)`` below them and target logits go round in one all-gather, and every rank
   combines them the same way (the embeddings, labels and norms of step 1 share one all-gather
   too: two collectives per forward). No probability floor,
   no host synchronisation; the backward recomputes the probabilities from the logits block by
   block and overwrites the logits with the gradient (one B x C_local buffer in all).

With ``sample_rate < 1`` (negative sampling) a rank keeps every class of its shard that is a
label of the global batch and fills up to ``max(ceil(rate * C_local), B)`` columns (at most
C_local) with classes drawn uniformly from the rest of its shard, from a generator seeded by
``(seed, rank, step)``; the loss is the exact softmax over the kept classes.

AdaFace statistics: ``global`` updates ``batch_mean``/``batch_std`` with the all-gathered norms
(identical on every rank, equal to the unsharded head fed the concatenated batch); ``local``
updates them with the rank's own norms and computes the rank's own samples' margins from them
(the published per-rank behaviour).

In training (``defer_kernel_grad``) the kernel's gradient is not materialised: the backward keeps
``G`` (the logits buffer) and one value per column as a :class:`utils.column_sgd.ColumnGradient`,
and ``train_val.SGD``'s fused step computes the gradient a block at a time while it updates the
kernel. The state per rank is then the kernel and its momentum, plus one B x K buffer during a step.

With sampling the kernel is stored class-major (the E x C_local parameter is the transposed view
of a contiguous C_local x E tensor: a class's centre is one contiguous run), so the kept columns
are row gathers, read a chunk at a time (:class:`_KeptColumns`), never copied whole; and only the
kept columns are stepped, the others' zero-gradient SGD steps (weight decay, momentum) being
applied in closed form when a column is next read or a checkpoint is written
(:mod:`utils.column_sgd`). A step then costs the kept columns, not the shard. Without sampling
the kernel stays row-major, as ``head.py``'s.

W = 1 works without ``torch.distributed``. Checkpoints hold the head in the published layout:
:func:`gather_columns` assembles a full E x C tensor (the kernel, its momentum) on one rank and
:func:`shard_columns` takes a rank's slice of one, for any W.
"""
from __future__ import annotations

import logging
import math
import os
import tempfile
from typing import Optional, Tuple

import torch
import torch.distributed as dist

from head import (AdaFace, ArcFace, CosFace, HEAD_TYPES, LabelError, MarginHead, check_labels, column_norms,
                  kernel_column_scale, margin_grad_rows_, margin_input_grads, margin_logits_forward)
from utils.column_sgd import (ColumnGradient, add_column_grad, class_rows, column_grad, current_rows, drop_pending,
                              flush_pending_, materialize_column_grad)
from utils.errors import UserError

logger = logging.getLogger(__name__)

STATS_MODES = ("global", "local")
_CHUNK_ELEMENTS = 1 << 18     # softmax temporaries (rows of the logits) of forward and backward: floats at a time
_KEPT_CHUNK_ELEMENTS = 1 << 18    # kept columns gathered at a time (one product each): floats
_INIT_ROWS = 16               # kernel rows drawn before they are written into the class-major shard
_INIT_CLASSES = 4096          # classes renormalised at a time
_SCORE_CHUNK = 1 << 16        # negative sampling's uniform scores drawn at a time (CPU)


def shard_bounds(classnum: int, world: int, rank: int) -> Tuple[int, int]:
    """``[start, stop)`` of rank ``rank``'s classes: the first ``classnum % world`` ranks hold one more."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in a group of {world}")
    if classnum < world:
        raise ValueError(f"cannot shard {classnum} classes over {world} ranks (each needs one class)")
    base, extra = divmod(classnum, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def init_kernel_columns(embedding_size: int, classnum: int, start: int, stop: int,
                        generator: Optional[torch.Generator] = None, class_major: bool = False) -> torch.Tensor:
    """Columns ``[start, stop)`` of :func:`head.init_kernel` ``(embedding_size, classnum)`` drawn
    from the same random state, bit for bit, holding one row of C values at a time (the draws of
    a row-major E x C uniform fill are consumed row by row; the other ranks' columns are dropped).
    ``class_major``: stored as the transposed view of a contiguous (stop - start) x E tensor (see
    :func:`utils.column_sgd.class_major`), written ``_INIT_ROWS`` rows at a time."""
    if not class_major:
        columns = torch.empty(embedding_size, stop - start, device="cpu")
        row = torch.empty(classnum, device="cpu")
        for i in range(embedding_size):
            row.uniform_(-1, 1, generator=generator)
            columns[i] = row[start:stop]
        return columns.renorm_(2, 1, 1e-5).mul_(1e5)
    classes = torch.empty(stop - start, embedding_size, device="cpu")
    row = torch.empty(classnum, device="cpu")
    rows = torch.empty(min(_INIT_ROWS, embedding_size), stop - start, device="cpu")
    for first in range(0, embedding_size, rows.shape[0]):
        count = min(rows.shape[0], embedding_size - first)
        for i in range(count):
            row.uniform_(-1, 1, generator=generator)
            rows[i] = row[start:stop]
        classes[:, first:first + count] = rows[:count].t()
    for first in range(0, stop - start, _INIT_CLASSES):   # renorm on row-major copies: the unsharded
        block = classes[first:first + _INIT_CLASSES]        # head's reduction order, bit for bit
        block.copy_(block.t().contiguous().renorm_(2, 1, 1e-5).mul_(1e5).t())
    return classes.t()


def skip_kernel_draws(embedding_size: int, classnum: int,
                      generator: Optional[torch.Generator] = None) -> None:
    """Advance ``generator`` (default: the global one) past the draws of :func:`head.init_kernel`."""
    row = torch.empty(classnum, device="cpu")
    for _ in range(embedding_size):
        row.uniform_(-1, 1, generator=generator)


def _world_rank(group) -> Tuple[int, int]:
    if not (dist.is_available() and dist.is_initialized()):
        if group is not None:
            raise ValueError("a process group was given but torch.distributed is not initialised")
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


def _collective(new_name: str, old_name: str):
    """``torch.distributed``'s single-tensor collective under its current name, or, on a torch
    that predates that name, under the one it had (``all_gather_into_tensor``, ``reduce_scatter_tensor``)."""
    return getattr(dist, new_name, None) or getattr(dist, old_name)


def _reduce_scatter_supported(group) -> bool:
    """Whether the embeddings' gradient is reduce-scattered (NCCL) rather than all-reduced and
    sliced (gloo: not every torch version has its reduce-scatter)."""
    return dist.get_backend(group) == "nccl"


def _all_gather(tensor: torch.Tensor, group) -> torch.Tensor:
    """Concatenation over the ranks (dim 0) of equally shaped tensors; no autograd."""
    world = dist.get_world_size(group)
    tensor = tensor.contiguous()
    out = torch.empty((world * tensor.shape[0],) + tuple(tensor.shape[1:]), dtype=tensor.dtype,
                      device=tensor.device)
    _collective("all_gather_single", "all_gather_into_tensor")(out, tensor, group=group)
    return out


class _AllGather(torch.autograd.Function):
    """All-gather along dim 0 whose backward hands each rank the sum over ranks of its rows' gradient."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group) -> torch.Tensor:
        ctx.group, ctx.rows = group, tensor.shape[0]
        return _all_gather(tensor, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        group, rows = ctx.group, ctx.rows
        grad = grad.contiguous()
        if _reduce_scatter_supported(group):
            out = torch.empty((rows,) + tuple(grad.shape[1:]), dtype=grad.dtype, device=grad.device)
            _collective("reduce_scatter_single", "reduce_scatter_tensor")(out, grad, group=group)
            return out, None
        grad = grad.clone()
        dist.all_reduce(grad, group=group)
        rank = dist.get_rank(group)
        return grad[rank * rows:(rank + 1) * rows].contiguous(), None


class _KeptColumns:
    """Columns ``index`` of the class-major kernel ``param`` (E x C_local) as
    :func:`head.margin_logits_forward` reads them, without an E x K copy: a chunk of kept classes
    at a time (contiguous class rows, gathered and dropped). The forward's read brings the columns
    up to date first (:func:`utils.column_sgd.current_rows`: SGD steps they owe from earlier steps
    that did not sample them)."""

    def __init__(self, param: torch.Tensor, index: torch.Tensor) -> None:
        self.param, self.index = param, index

    def _chunk(self) -> int:
        return max(1, _KEPT_CHUNK_ELEMENTS // max(1, self.param.shape[0]))

    def logits_and_inv_norm(self, embeddings: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        kept, width = self.index.shape[0], self._chunk()
        logits = embeddings.new_empty(embeddings.shape[0], kept)
        inv_norm = embeddings.new_empty(kept)
        for start in range(0, kept, width):
            rows = current_rows(self.param, self.index[start:start + width])
            inv_norm[start:start + width] = column_norms(rows.t())
            torch.mm(embeddings, rows.t(), out=logits[:, start:start + width])
        return logits, inv_norm.reciprocal_()

    def times_transpose(self, grad: torch.Tensor) -> torch.Tensor:
        out = grad.new_zeros(grad.shape[0], self.param.shape[0])
        rows_of = class_rows(self.param)
        width = self._chunk()
        for start in range(0, self.index.shape[0], width):
            rows = rows_of.index_select(0, self.index[start:start + width])
            out.addmm_(grad[:, start:start + width], rows)
        return out


class _KernelGradSink:
    """Where a deferred kernel gradient goes: ``param`` (the kernel) and the kept columns (``None``: all)."""

    __slots__ = ("param", "index")

    def __init__(self, param: torch.Tensor, index: Optional[torch.Tensor] = None) -> None:
        self.param, self.index = param, index


class _ShardedMarginLoss(torch.autograd.Function):
    """Margin logits of this shard + cross-entropy over all shards (mean over the B rows). With a
    ``sink`` the kernel (passed detached, or as :class:`_KeptColumns`) gets its gradient as a
    ``factored`` :class:`ColumnGradient` kept beside the parameter: the logits buffer, which the
    backward overwrites with ``G``, and one value per column are kept for the optimizer step
    instead of an E x K gradient."""

    @staticmethod
    def forward(ctx, embeddings, kernel, labels, has_target, angular, additive, s, eps, group, world,
                sink=None):
        logits, state = margin_logits_forward(embeddings, kernel, labels, angular, additive, s, eps,
                                              has_target)
        batch = logits.shape[0]
        stats = torch.empty(3, batch, dtype=logits.dtype, device=logits.device)
        torch.amax(logits, 1, out=stats[0])                        # this shard's row maxima
        rows = max(1, _CHUNK_ELEMENTS // max(1, logits.shape[1]))
        scratch = logits.new_empty(min(rows, batch), logits.shape[1])   # reused: no allocation per block
        for start in range(0, batch, rows):
            n = min(rows, batch - start)
            block = torch.sub(logits[start:start + n], stats[0, start:start + n, None], out=scratch[:n])
            torch.sum(block.exp_(), 1, out=stats[1, start:start + n])
        del scratch
        stats[2] = logits.gather(1, labels).reshape(-1) * has_target.reshape(-1)
        if world > 1:   # one collective: every shard's (max, sum of exp below it, target logit)
            shards = _all_gather(stats, group).view(world, 3, batch)
            row_max = shards[:, 0].amax(0)
            sum_exp = (shards[:, 1] * (shards[:, 0] - row_max).exp_()).sum(0)
            target = shards[:, 2].sum(0)
        else:
            row_max, sum_exp, target = stats[0], stats[1], stats[2]
        loss = (sum_exp.log() + row_max - target).mean()
        ctx.state, ctx.row_max, ctx.sum_exp, ctx.has_target = state, row_max, sum_exp, has_target
        ctx.sink = sink
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        """The logits buffer becomes ``G`` row block by row block (a block's softmax gradient is
        computed into a small temporary, turned into ``G`` by :func:`head.margin_grad_rows_`, its
        ``sum_b G * logits`` accumulated, then copied over the block's logits): no second
        B x C_local buffer."""
        state = ctx.state
        logits = state.logits
        batch, width = logits.shape
        scale = state.inv_norm * state.s
        target_logits = logits.gather(1, state.labels)
        col = torch.zeros_like(state.inv_norm)
        factor = grad_loss / batch
        row_factor = factor / ctx.sum_exp                      # (softmax - one-hot) * factor, one pass
        not_target = -ctx.has_target.to(logits.dtype) * factor
        targets = []
        rows = max(1, _CHUNK_ELEMENTS // max(1, width))
        scratch = logits.new_empty(2, min(rows, batch), width)     # reused: no allocation per block
        column_sum = torch.empty_like(col)
        for start in range(0, batch, rows):
            n = min(rows, batch - start)
            block = slice(start, start + n)
            grad = torch.sub(logits[block], ctx.row_max[block, None], out=scratch[0, :n])
            grad.exp_().mul_(row_factor[block, None])
            grad.scatter_add_(1, state.labels[block], not_target[block])
            targets.append(margin_grad_rows_(grad, state, block, scale))
            col += torch.sum(torch.mul(grad, logits[block], out=scratch[1, :n]), 0, out=column_sum)
            logits[block] = grad
        del scratch, grad
        sink, targets = ctx.sink, torch.cat(targets)
        if sink is None:
            grad_embeddings, grad_kernel = margin_input_grads(
                logits, state, targets, col, target_logits, ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        else:                 # keep G (the logits buffer) and one value per column, not E x K
            grad_embeddings, grad_kernel = margin_input_grads(logits, state, targets, col, target_logits,
                                                              ctx.needs_input_grad[0], False)
            scale = kernel_column_scale(state, targets, col, target_logits)
            add_column_grad(sink.param, ColumnGradient.factored(state.embeddings.detach(), logits, scale,
                                                                sink.index))
        ctx.state = ctx.sink = None
        return grad_embeddings, grad_kernel, None, None, None, None, None, None, None, None, None


class _ScaleGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor: torch.Tensor, factor: float) -> torch.Tensor:
        ctx.factor = factor
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.factor, None


def scale_gradient(tensor: torch.Tensor, factor: float) -> torch.Tensor:
    """Identity whose backward multiplies the gradient by ``factor``. Training multiplies the
    embeddings' gradient by W: the sharded loss is the global batch's mean on every rank, so each
    rank's backbone gradient is its share of the exact one, and DDP's all-reduce divides by W."""
    return _ScaleGradient.apply(tensor, float(factor)) if factor != 1 else tensor


def global_grad_norm(replicated, sharded, group=None) -> torch.Tensor:
    """L2 norm of all gradients: ``replicated`` parameters (equal on every rank, counted once) and
    ``sharded`` ones (``.grad`` and a deferred :class:`~utils.column_sgd.ColumnGradient`, summed
    over the ranks of ``group``). No host synchronisation."""
    grads = [p.grad for p in replicated if p.grad is not None]
    sharded = list(sharded)
    for p in sharded:
        if p.grad is not None and column_grad(p) is not None:
            materialize_column_grad(p)   # both kinds at once: their sum is the gradient
    shard_grads = [p.grad for p in sharded if p.grad is not None]
    kept = [(p, column_grad(p)) for p in sharded if column_grad(p) is not None]
    device = (grads or shard_grads or [p for p, _ in kept])[0].device
    sharded_sq = torch.zeros((), device=device)
    for g in shard_grads:
        sharded_sq = sharded_sq + g.float().pow(2).sum()
    for p, g in kept:                    # a deferred kernel gradient (utils.column_sgd)
        sharded_sq = sharded_sq + g.square_norm(p.detach())
    world, _ = _world_rank(group)
    if world > 1:
        dist.all_reduce(sharded_sq, group=group)
    replicated_sq = torch.zeros((), device=device)
    for g in grads:
        replicated_sq = replicated_sq + g.float().pow(2).sum()
    return (replicated_sq + sharded_sq).sqrt()


class ReplicaMismatchError(RuntimeError):
    """Replicated parameters differ between the ranks (a data-parallel bug, not bad input)."""


def check_replicas_in_sync(module: torch.nn.Module, group=None) -> None:
    """Raise :class:`ReplicaMismatchError` unless every parameter of ``module`` is the
    same on all ranks (compared by float64 sums and position-weighted sums, gathered once)."""
    world, rank = _world_rank(group)
    if world == 1:
        return
    stats = []
    for tensor in module.parameters():
        flat = tensor.detach().reshape(-1).double()
        weights = torch.arange(1, flat.numel() + 1, dtype=torch.float64, device=flat.device)
        stats.append(torch.stack([flat.sum(), (flat * weights).sum()]))
    mine = torch.stack(stats) if stats else torch.zeros(0, 2)
    low, high = mine.clone(), mine.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN, group=group)
    dist.all_reduce(high, op=dist.ReduceOp.MAX, group=group)
    if not torch.equal(low, high):
        raise ReplicaMismatchError(f"the replicated weights differ between the {world} ranks")
    logger.info("replicated weights identical on all %d ranks (%d tensors)", world, len(stats))


class _SelectColumns(torch.autograd.Function):
    """``kernel[:, index]`` for sorted unique ``index`` (a row gather of the class-major kernel); the
    backward writes the columns' gradient into a dense zero gradient with ``index_copy_``."""

    @staticmethod
    def forward(ctx, kernel: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(index)
        ctx.kernel = kernel.detach()
        return class_rows(kernel).index_select(0, index).t()       # class-major, like the kernel

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (index,) = ctx.saved_tensors
        full = torch.zeros_like(ctx.kernel)                          # laid out like the kernel
        class_rows(full).index_copy_(0, index, grad.t())
        ctx.kernel = None
        return full, None


def sample_seed(seed: int, rank: int, step: int) -> int:
    """The seed of rank ``rank``'s negative sampling at step ``step`` of a run seeded ``seed``."""
    return (int(seed) * 1_000_003 + int(rank) * 7_919 + int(step) * 104_729 + 0x5EED) % (2 ** 63 - 1)


def sample_columns(local_labels: torch.Tensor, has_target: torch.Tensor, n_local: int, rate: float,
                   generator: torch.Generator) -> torch.Tensor:
    """Sorted local class indices to keep: every positive, then uniform negatives up to
    ``min(n_local, max(ceil(rate * n_local), B))`` columns (a fixed count: no host synchronisation).

    The rule: one uniform score per class (``torch.rand(n_local)`` from ``generator``), 2 for the
    positives, keep the top ``keep`` (on the CPU ties at the boundary go to the lower class index;
    on a GPU as ``topk`` has them). On the CPU the scores are drawn :data:`_SCORE_CHUNK` at a
    time (the same numbers as one draw: the CPU stream is sequential) and only those above a
    threshold are kept as candidates: the top ``keep`` lie above it but for a chance below 1e-8,
    so dropping the lowest of those few candidates gives the same set without any full-length
    array (8 MiB of scores at 2M classes, and topk's copies); when too few pass, the scores are
    drawn again whole."""
    device = local_labels.device
    keep = min(n_local, max(math.ceil(rate * n_local), local_labels.shape[0]))
    fraction = _candidate_fraction(keep, n_local)
    positives = local_labels.reshape(-1)[has_target.reshape(-1)]
    if device.type == "cpu" and fraction < 0.5:
        restart = generator.get_state()
        positives = torch.unique(positives)                                 # sorted
        found, values = [], []
        for start in range(0, n_local, _SCORE_CHUNK):
            score = torch.rand(min(_SCORE_CHUNK, n_local - start), generator=generator)
            mine = positives[(positives >= start) & (positives < start + score.shape[0])]
            score.index_fill_(0, mine - start, 2.0)                         # positives outrank every negative
            hit = (score >= 1.0 - fraction).nonzero().reshape(-1)
            values.append(score[hit])
            found.append(hit.add_(start))
        candidates, value = torch.cat(found), torch.cat(values)             # candidates ascending
        if candidates.numel() >= keep:
            return _top_scores(candidates, value, keep)
        generator.set_state(restart)
    score = torch.rand(n_local, generator=generator, device=device)
    score.scatter_reduce_(0, positives, score.new_full(positives.shape, 2.0), reduce="amax")
    if device.type == "cpu":
        return _top_scores(torch.arange(n_local), score, keep)
    return score.topk(keep, sorted=False).indices.sort().values


def _candidate_fraction(keep: int, n_local: int) -> float:
    """A share of uniform scores that more than ``keep`` of ``n_local`` pass but for a chance
    below 1e-8 (the mean plus six standard deviations, and some)."""
    return (keep + 6.0 * math.sqrt(keep) + 16.0) / n_local


def _top_scores(index: torch.Tensor, score: torch.Tensor, keep: int) -> torch.Tensor:
    """The ``keep`` entries of ascending ``index`` with the highest ``score``, ties at the boundary
    going to the lower index, ascending. Drops the lowest ``len - keep`` (few, from the candidates)
    rather than sorting or copying nearly all."""
    surplus = index.numel() - keep
    if surplus == 0:
        return index
    boundary = score.topk(surplus, largest=False, sorted=False).values.max()
    drop = score < boundary
    ties = (score == boundary).nonzero().reshape(-1)
    drop[ties[ties.numel() - (surplus - int(drop.sum())):]] = True     # the highest indices among the ties
    return index[~drop]


def _apply_pending_steps(module: "ShardedMarginHead", prefix: str, keep_vars: bool) -> None:
    """State-dict pre-hook: the kernel a state dict (a checkpoint) holds has every SGD step applied."""
    flush_pending_(module.kernel)


def _forget_pending_steps(module: "ShardedMarginHead", state_dict: dict, prefix: str, *args) -> None:
    """Load pre-hook: a loaded kernel replaces the values that owed steps."""
    if prefix + "kernel" in state_dict:
        drop_pending(module.kernel)


class ShardedMarginHead(MarginHead):
    """Mixin that shards a :class:`head.MarginHead` (see the module docstring); put it first in the
    bases. ``forward(embeddings, norms, labels, step=None)`` returns the loss, not logits.

    ``defer_kernel_grad`` (off by default; training turns it on, see ``train_val.Trainer``): the
    backward leaves ``kernel.grad`` alone and keeps the kernel's gradient beside it as a
    :class:`utils.column_sgd.ColumnGradient` (``G`` and one value per kept column), which
    ``train_val.SGD`` consumes: no E x C_local gradient tensor."""

    def __init__(self, *args, group=None, stats: str = "global", sample_rate: float = 1.0,
                 seed: int = 0, generator: Optional[torch.Generator] = None, **kwargs) -> None:
        if stats not in STATS_MODES:
            raise ValueError(f"unknown AdaFace statistics mode {stats!r}; valid: {', '.join(STATS_MODES)}")
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"sample_rate must lie in (0, 1], got {sample_rate}")
        self.group = group
        self.world, self.rank = _world_rank(group)
        self.stats, self.sample_rate, self.seed = stats, float(sample_rate), int(seed)
        self._generator = generator
        self._calls = 0
        self.sampled_classes: Optional[torch.Tensor] = None
        self.defer_kernel_grad = False
        super().__init__(*args, **kwargs)
        self._generator = None
        self.register_state_dict_pre_hook(_apply_pending_steps)
        self.register_load_state_dict_pre_hook(_forget_pending_steps)

    def initial_kernel(self, embedding_size: int, classnum: int) -> torch.Tensor:
        self.start, self.stop = shard_bounds(classnum, self.world, self.rank)
        return init_kernel_columns(embedding_size, classnum, self.start, self.stop, self._generator,
                                   class_major=self.sample_rate < 1.0)

    def _gather(self, tensor: torch.Tensor, grad: bool = False) -> torch.Tensor:
        if self.world == 1:
            return tensor
        return _AllGather.apply(tensor, self.group) if grad else _all_gather(tensor, self.group)

    def _gather_batch(self, embeddings: torch.Tensor, labels: torch.Tensor, norms: Optional[torch.Tensor]):
        """The global batch's embeddings (with the all-gather's backward), labels and (if given)
        norms, in one collective: the labels' int64 bits and the norms ride along as columns."""
        if self.world == 1:
            return embeddings, labels, norms
        parts = [embeddings, labels.reshape(-1, 1).view(torch.float32)]  # 2 float32 columns of bits
        if norms is not None:
            parts.append(norms)
        packed = _AllGather.apply(torch.cat(parts, dim=1), self.group)
        width = embeddings.shape[1]
        labels = packed[:, width:width + 2].detach().contiguous().view(torch.int64).reshape(-1)
        norms = packed[:, width + 2:].detach() if norms is not None else None
        return packed[:, :width], labels, norms

    def forward(self, embbedings: torch.Tensor, norms: Optional[torch.Tensor], label: torch.Tensor,
                step: Optional[int] = None) -> torch.Tensor:
        """Cross-entropy (mean over the global batch) of the margin logits of all shards."""
        if embbedings.dim() != 2 or embbedings.shape[1] != self.embedding_size:
            raise ValueError(f"embeddings must have shape (B, {self.embedding_size}), "
                             f"got {tuple(embbedings.shape)}")
        local_batch = embbedings.shape[0]
        if label.dtype.is_floating_point or label.dtype == torch.bool:
            raise LabelError(f"labels must be integer class indices, got dtype {label.dtype}")
        if label.numel() != local_batch:
            raise LabelError(f"labels must hold one class index per embedding: got shape "
                             f"{tuple(label.shape)} for {local_batch} embeddings")
        adaface = isinstance(self, AdaFace)
        if adaface and (norms is None or norms.numel() != local_batch):
            raise ValueError("AdaFace needs one feature norm per embedding: call head(embeddings, norms, labels)")
        with torch.autocast(device_type=embbedings.device.type, enabled=False):
            norms = norms.detach().float().reshape(-1, 1) if adaface else None
            global_norms = adaface and self.stats == "global"
            embeddings, labels, gathered_norms = self._gather_batch(embbedings.float(), label.reshape(-1).long(),
                                                                    norms if global_norms else None)
            batch = embeddings.shape[0]
            labels = check_labels(labels, self.classnum, batch)
            if global_norms:
                angular, additive = self.target_margins(gathered_norms, batch)
            elif adaface:                   # own samples' margins from own statistics, then gathered
                angular, additive = self.target_margins(norms, local_batch)
                angular, additive = self._gather(angular), self._gather(additive)
            else:
                angular, additive = self.target_margins(None, batch)
            local_labels = labels - self.start
            has_target = (local_labels >= 0) & (local_labels < self.stop - self.start)
            defer = self.defer_kernel_grad and torch.is_grad_enabled() and self.kernel.requires_grad
            kernel = self.kernel.detach() if defer else self.kernel
            sink = _KernelGradSink(self.kernel) if defer else None
            if self.sample_rate >= 1.0:
                flush_pending_(self.kernel)          # (only a sampled step leaves steps pending)
            else:
                step = self._calls if step is None else step
                self.sampled_classes = None           # the last step's: freed before this one's is drawn
                generator = torch.Generator(device=kernel.device)
                generator.manual_seed(sample_seed(self.seed, self.rank, step))
                index = sample_columns(local_labels.clamp(0, self.stop - self.start - 1), has_target,
                                       self.stop - self.start, self.sample_rate, generator)
                self.sampled_classes = index + self.start if self.start else index   # kept classes (global ids)
                if defer:
                    kernel, sink.index = _KeptColumns(self.kernel, index), index
                else:
                    flush_pending_(self.kernel)
                    kernel = _SelectColumns.apply(kernel, index)
                local_labels = torch.searchsorted(index, local_labels.clamp(0, self.stop - self.start - 1))
                local_labels = local_labels.clamp_(max=index.shape[0] - 1)
            local_labels = torch.where(has_target, local_labels, torch.zeros_like(local_labels))
            self._calls += 1
            return _ShardedMarginLoss.apply(embeddings, kernel, local_labels, has_target, angular,
                                            additive, float(self.s), self.eps, self.group, self.world, sink)

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", shard=[{self.start}, {self.stop}) of rank {self.rank}/"
                f"{self.world}, stats={self.stats}, sample_rate={self.sample_rate}")


class ShardedAdaFace(ShardedMarginHead, AdaFace):
    """AdaFace with sharded class centres."""


class ShardedArcFace(ShardedMarginHead, ArcFace):
    """ArcFace with sharded class centres."""


class ShardedCosFace(ShardedMarginHead, CosFace):
    """CosFace with sharded class centres."""


def build_sharded_head(head_type: str, embedding_size: int, class_num: int, m: float, t_alpha: float,
                       h: float, s: float, group=None, stats: str = "global", sample_rate: float = 1.0,
                       seed: int = 0, generator: Optional[torch.Generator] = None) -> ShardedMarginHead:
    """The sharded twin of :func:`head.build_head`; ``generator`` (default: the global one) is in the
    state the unsharded head would draw its kernel from."""
    common = dict(embedding_size=embedding_size, classnum=class_num, m=m, s=s, group=group,
                  stats=stats, sample_rate=sample_rate, seed=seed, generator=generator)
    if head_type == "adaface":
        return ShardedAdaFace(h=h, t_alpha=t_alpha, **common)
    if head_type == "arcface":
        return ShardedArcFace(**common)
    if head_type == "cosface":
        return ShardedCosFace(**common)
    raise ValueError(f"unknown head type {head_type!r}; valid head types: {', '.join(HEAD_TYPES)}")


def gather_columns(shard: torch.Tensor, classnum: int, group=None, dst: int = 0) -> Optional[torch.Tensor]:
    """The full E x C tensor (kernel or its optimizer state), in host memory, on rank ``dst`` of
    ``group``; None on the others. Shards arrive one at a time into the preallocated result (one
    full copy + one shard)."""
    world, rank = _world_rank(group)
    if world == 1:
        return shard.detach().to("cpu").clone(memory_format=torch.contiguous_format)   # row-major
    shard = shard.detach().contiguous()
    if rank != dst:
        dist.send(shard, group=group, group_dst=dst)
        return None
    full = torch.empty(shard.shape[0], classnum, dtype=shard.dtype, device="cpu")
    for other in range(world):
        start, stop = shard_bounds(classnum, world, other)
        if other == rank:
            full[:, start:stop] = shard.cpu()
            continue
        part = torch.empty(shard.shape[0], stop - start, dtype=shard.dtype, device=shard.device)
        dist.recv(part, group=group, group_src=other)
        full[:, start:stop] = part.cpu()
        del part
    return full


def gather_columns_to_file(shard: torch.Tensor, classnum: int, group=None, dst: int = 0,
                           directory: Optional[str] = None) -> Optional[torch.Tensor]:
    """Like :func:`gather_columns`, but rank ``dst`` writes the full E x C tensor into a raw file
    (row-major, in ``directory``, default the temporary folder) as the shards arrive and returns a
    :func:`utils.checkpoint_io.deferred_tensor` placeholder for it: resident memory on ``dst`` is
    one shard at a time, never the full tensor. ``SafeCheckpointIO`` writes the file's bytes into
    the checkpoint in the placeholder's place."""
    from utils.checkpoint_io import deferred_tensor   # Lightning's IO: imported only when saving

    world, rank = _world_rank(group)
    shard = shard.detach().contiguous()
    if world > 1 and rank != dst:
        dist.send(shard, group=group, group_dst=dst)
        return None
    rows, item = shard.shape[0], shard.element_size()
    fd, raw_path = tempfile.mkstemp(dir=directory, prefix=".head_columns.", suffix=".tmp")  # removed by a later run if killed
    try:
        os.ftruncate(fd, rows * classnum * item)
        for other in range(world):
            start, stop = shard_bounds(classnum, world, other)
            if other == rank:
                part = shard.cpu()
            else:
                part = torch.empty(rows, stop - start, dtype=shard.dtype, device=shard.device)
                dist.recv(part, group=group, group_src=other)
                part = part.cpu()
            data = part.numpy() if part.dtype != torch.bfloat16 else part.view(torch.int16).numpy()
            for row in range(rows):         # the shard's columns of each row: one contiguous run
                os.pwrite(fd, data[row], (row * classnum + start) * item)
            del part, data
    except BaseException:
        os.close(fd)
        os.unlink(raw_path)
        raise
    os.close(fd)
    return deferred_tensor((rows, classnum), raw_path, dtype=shard.dtype)


def shard_columns(full: torch.Tensor, world: int, rank: int) -> torch.Tensor:
    """Rank ``rank``'s columns (a new contiguous copy, also at W = 1: ``full`` may map a file) of a
    full E x C tensor, for a group of ``world``."""
    start, stop = shard_bounds(full.shape[1], world, rank)
    return full[:, start:stop].clone(memory_format=torch.contiguous_format)


def own_checkpoint_tensors(obj, skip_shape: Optional[Tuple[int, ...]] = None):
    """Replace, in place in the dicts and lists of ``obj``, every tensor by a copy (a checkpoint
    read with ``mmap`` maps the file, which a later save may overwrite), except tensors shaped
    ``skip_shape`` (the full head tensors, which :func:`shard_head_checkpoint` slices). Returns ``obj``."""
    def own(value):
        if torch.is_tensor(value):
            return value if skip_shape is not None and tuple(value.shape) == tuple(skip_shape) else value.clone()
        own_checkpoint_tensors(value, skip_shape)
        return value

    if isinstance(obj, dict):
        for key in list(obj):
            obj[key] = own(obj[key])
    elif isinstance(obj, list):
        for i, value in enumerate(obj):
            obj[i] = own(value)
    return obj


class ShardedCheckpointError(UserError, ValueError):
    """A checkpoint's head does not fit the sharded head it is loaded into."""


def kernel_state_index(optimizer: torch.optim.Optimizer, kernel: torch.Tensor) -> int:
    """The key of ``kernel``'s entry in ``optimizer.state_dict()["state"]``."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for index, param in enumerate(params):
        if param is kernel:
            return index
    raise ValueError("the head's kernel is not among the optimizer's parameters")


def _map_kernel_state(checkpoint: dict, kernel_key: str, index: Optional[int], shape, fn) -> None:
    """Apply ``fn`` to the kernel and to every tensor of its optimizer state shaped ``shape``, in
    new dicts (an optimizer's ``state_dict()`` shares its per-parameter dicts with the live state)."""
    state_dict = checkpoint["state_dict"]
    result = fn(state_dict[kernel_key])
    if result is not None:
        state_dict[kernel_key] = result
    if index is None:
        return
    for optimizer_state in checkpoint.get("optimizer_states", []):
        entry = optimizer_state["state"].get(index)
        if entry is None:
            continue
        mapped = {}
        for name in sorted(entry):
            value = entry[name]
            if torch.is_tensor(value) and tuple(value.shape) == tuple(shape):
                value = fn(value)
                value = entry[name] if value is None else value
            mapped[name] = value
        optimizer_state["state"][index] = mapped


def gather_head_checkpoint(checkpoint: dict, head: ShardedMarginHead, index: Optional[int],
                           prefix: str = "head.", dst: int = 0, to_disk: bool = False,
                           directory: Optional[str] = None) -> None:
    """Turn a Lightning-style checkpoint dict holding this rank's shard (``state_dict[prefix +
    'kernel']`` and the kernel's optimizer state at ``index``) into the published layout: the full
    E x C tensors on rank ``dst`` (tensors one at a time; the shards stay on the other ranks).
    With ``to_disk`` they are gathered into files (:func:`gather_columns_to_file`, for
    ``SafeCheckpointIO`` to write) instead of memory. Every rank of the head's group must call it,
    in the same order."""
    group = head.group if head.world > 1 else None
    if to_disk:
        def gather(shard):
            return gather_columns_to_file(shard, head.classnum, group, dst, directory)
    else:
        def gather(shard):
            return gather_columns(shard, head.classnum, group, dst)
    _map_kernel_state(checkpoint, prefix + "kernel", index, tuple(head.kernel.shape), gather)


def shard_head_checkpoint(checkpoint: dict, head: ShardedMarginHead, index: Optional[int],
                          prefix: str = "head.") -> None:
    """The reverse of :func:`gather_head_checkpoint` for any number of ranks: replace the full
    E x C kernel (published layout, e.g. from another W or an unsharded run) and its optimizer
    state by this rank's columns."""
    key = prefix + "kernel"
    full = checkpoint.get("state_dict", {}).get(key)
    expected = (head.embedding_size, head.classnum)
    if full is None or tuple(full.shape) != expected:
        got = "no head.kernel" if full is None else f"head.kernel of shape {tuple(full.shape)}"
        raise ShardedCheckpointError(f"the checkpoint holds {got}; the sharded head expects the "
                                     f"published layout {expected} (embedding size x classes)")
    _map_kernel_state(checkpoint, key, index, expected,
                      lambda tensor: shard_columns(tensor, head.world, head.rank))
