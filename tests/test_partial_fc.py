"""The sharded margin heads (head_sharded.py) against the unsharded head on the concatenated batch.

W = 1 runs here without torch.distributed; W = 2, 3, 4 run once in four spawned gloo processes
(groups of the first 2, 3 and all 4 ranks), which record relative errors that the tests below
assert. Tiny sizes: E = 16, C = 23 (203 for sampling), 3 samples per rank.
"""
from __future__ import annotations

import copy
import datetime
import math
import os
import re
import zipfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from head import HEAD_TYPES, ArcFace, build_head
from head_sharded import (ShardedCheckpointError, build_sharded_head, gather_columns, gather_head_checkpoint, own_checkpoint_tensors,
                          global_grad_norm, kernel_state_index, sample_columns, sample_seed, shard_bounds, shard_columns,
                          shard_head_checkpoint)
from utils.checkpoint import read_checkpoint
from utils.checkpoint_io import SafeCheckpointIO
from utils.column_sgd import pending_steps, take_column_grad

E, C, C_SAMPLE, PER_RANK, SEED = 16, 23, 203, 3, 11
HEAD_ARGS = {"adaface": dict(m=0.4, h=0.333, s=64., t_alpha=0.5),
             "arcface": dict(m=0.5, h=0.0, s=64., t_alpha=1.0),
             "cosface": dict(m=0.4, h=0.0, s=64., t_alpha=1.0)}
TOL = 1e-5


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def _heads(head_type: str, classnum: int, group, **sharded):
    """The unsharded head and a sharded one drawn from the same random state."""
    args = HEAD_ARGS[head_type]
    torch.manual_seed(SEED)
    ref = build_head(head_type, E, classnum, **args)
    torch.manual_seed(SEED)
    return ref, build_sharded_head(head_type, E, classnum, group=group, seed=SEED, **args, **sharded)


def _batch(world: int, step: int, classnum: int = C):
    g = torch.Generator().manual_seed(1000 * world + step)
    size = world * PER_RANK
    emb = F.normalize(torch.randn(size, E, generator=g))
    norms = torch.empty(size, 1).uniform_(5.0, 40.0, generator=g)
    return emb, norms, torch.randint(0, classnum, (size,), generator=g), torch.randn(size, 8, generator=g)


def _rows(rank: int):
    return slice(rank * PER_RANK, (rank + 1) * PER_RANK)


def _kernel_rel(shard: torch.Tensor, full: torch.Tensor, group, rank: int) -> float:
    """Relative error of the reassembled shards (rank 0 gathers; -1 elsewhere)."""
    gathered = gather_columns(shard, full.shape[1], group)
    return _rel(gathered, full) if rank == 0 else -1.0


def check_gradients(head_type: str, group, world: int, rank: int) -> dict:
    """Initial kernel, then two batches: loss, embedding gradient, reassembled kernel gradient."""
    ref, sharded = _heads(head_type, C, group)
    initial = gather_columns(sharded.kernel, C, group)
    out = {"init_equal": bool(torch.equal(initial, ref.kernel)) if rank == 0 else True}
    for step in range(2):
        emb, norms, labels, _ = _batch(world, step)
        e_ref = emb.clone().requires_grad_(True)
        loss_ref = F.cross_entropy(ref(e_ref, norms, labels), labels)
        loss_ref.backward()
        e = emb[_rows(rank)].clone().requires_grad_(True)
        loss = sharded(e, norms[_rows(rank)], labels[_rows(rank)])
        loss.backward()
        out[f"loss{step}"] = _rel(loss, loss_ref)
        out[f"emb_grad{step}"] = _rel(e.grad, e_ref.grad[_rows(rank)])
        kernel_rel = _kernel_rel(sharded.kernel.grad, ref.kernel.grad, group, rank)
        if rank == 0:
            out[f"kernel_grad{step}"] = kernel_rel
        replicated = torch.nn.Parameter(torch.ones(3))          # the same gradient on every rank
        replicated.grad = torch.full((3,), 2.0)
        norm = global_grad_norm([replicated], [sharded.kernel], group)
        out[f"clip_norm{step}"] = _rel(norm, (ref.kernel.grad.pow(2).sum() + 12.0).sqrt())
        if head_type == "adaface":
            out[f"stats{step}"] = max(_rel(sharded.batch_mean, ref.batch_mean),
                                      _rel(sharded.batch_std, ref.batch_std))
        ref.kernel.grad = sharded.kernel.grad = None
    return out


def _sgd(params):
    return torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=5e-4)


def _embed(layer: torch.nn.Linear, x: torch.Tensor):
    out = layer(x)
    norms = out.norm(dim=1, keepdim=True)
    return out / norms, norms


def _sum_over_ranks(tensors, group) -> None:
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, group=group)
    for t, part in zip(tensors, flat.split([t.numel() for t in tensors])):
        t.copy_(part.view_as(t))


def check_sgd(head_type: str, group, world: int, rank: int, steps: int = 20, deferred: bool = False) -> dict:
    """A linear 'backbone' + head trained with SGD (momentum, weight decay) for ``steps`` steps;
    the sharded side sums the backbone gradient over the ranks (what DDP's mean times W gives).
    ``deferred``: the sharded side as training runs it, the kernel's gradient kept as a
    ``ColumnGradient`` (the G buffer) and stepped by ``train_val.SGD``; its global norm (what
    clipping uses) is checked too."""
    from train_val import SGD

    ref, sharded = _heads(head_type, C, group)
    sharded.defer_kernel_grad = deferred
    torch.manual_seed(SEED + 1)
    layer_ref = torch.nn.Linear(8, E)
    layer = copy.deepcopy(layer_ref)
    opt_ref = _sgd([*layer_ref.parameters(), ref.kernel])
    opt = (SGD if deferred else torch.optim.SGD)([*layer.parameters(), sharded.kernel], lr=0.05, momentum=0.9,
                                                 weight_decay=5e-4)
    out = {}
    for step in range(steps):
        _, _, labels, x = _batch(world, 100 + step)
        emb, norms = _embed(layer_ref, x)
        opt_ref.zero_grad()
        F.cross_entropy(ref(emb, norms, labels), labels).backward()
        emb, norms = _embed(layer, x[_rows(rank)])
        opt.zero_grad()
        sharded(emb, norms, labels[_rows(rank)]).backward()
        if deferred:
            out["no_dense_grad"] = out.get("no_dense_grad", True) and sharded.kernel.grad is None
            out[f"norm{step}"] = _rel(global_grad_norm([], [sharded.kernel], group), ref.kernel.grad.norm())
        opt_ref.step()
        if world > 1:
            _sum_over_ranks([p.grad for p in layer.parameters()], group)
        opt.step()
    out["backbone"] = max(_rel(p, q) for p, q in zip(layer.parameters(), layer_ref.parameters()))
    kernel_rel = _kernel_rel(sharded.kernel, ref.kernel, group, rank)
    if rank == 0:
        out["kernel"] = kernel_rel
    return out


def check_local_stats(group, world: int, rank: int) -> dict:
    """``stats='local'``: each rank's statistics from its own norms, its samples' margins from them;
    the reference is one unsharded AdaFace per rank, each fed that rank's rows."""
    ref, sharded = _heads("adaface", C, group, stats="local")
    refs = [copy.deepcopy(ref) for _ in range(world)]
    out = {}
    for step in range(2):
        emb, norms, labels, _ = _batch(world, step)
        e_ref = emb.clone().requires_grad_(True)
        total = sum(F.cross_entropy(h(e_ref[_rows(q)], norms[_rows(q)], labels[_rows(q)]), labels[_rows(q)],
                                    reduction="sum") for q, h in enumerate(refs))
        loss_ref = total / emb.shape[0]
        loss_ref.backward()
        e = emb[_rows(rank)].clone().requires_grad_(True)
        loss = sharded(e, norms[_rows(rank)], labels[_rows(rank)])
        loss.backward()
        kernel_grad_ref = sum(h.kernel.grad for h in refs)
        out[f"loss{step}"] = _rel(loss, loss_ref)
        out[f"emb_grad{step}"] = _rel(e.grad, e_ref.grad[_rows(rank)])
        kernel_rel = _kernel_rel(sharded.kernel.grad, kernel_grad_ref, group, rank)
        if rank == 0:
            out[f"kernel_grad{step}"] = kernel_rel
        out[f"stats{step}"] = max(_rel(sharded.batch_mean, refs[rank].batch_mean),
                                  _rel(sharded.batch_std, refs[rank].batch_std))
        # the global mode's statistics (all norms) differ from this rank's own (equal at W = 1)
        global_mean = 0.5 * norms.clamp(0.001, 100).mean() + 0.5 * (20.0 if step == 0 else out["gm"])
        out["gm"] = float(global_mean)
        gap = abs(float(sharded.batch_mean) - float(global_mean))
        out[f"global_vs_local{step}"] = gap < 1e-4 if world == 1 else gap > 1e-3
        sharded.kernel.grad = None
        for h in refs:
            h.kernel.grad = None
    del out["gm"]
    return out


def _all_gather_list(tensor: torch.Tensor, group, world: int):
    if world == 1:
        return [tensor]
    parts = [None] * world
    dist.all_gather_object(parts, tensor, group=group)
    return parts


def check_sampling(group, world: int, rank: int, rate: float = 0.3) -> dict:
    """``sample_rate``: positives kept, the loss is the softmax over the kept classes, and the kept
    classes depend only on (seed, rank, step)."""
    ref, sharded = _heads("arcface", C_SAMPLE, group, sample_rate=rate)
    _, deferred = _heads("arcface", C_SAMPLE, group, sample_rate=rate)   # as training runs it
    deferred.defer_kernel_grad = True
    start, stop = shard_bounds(C_SAMPLE, world, rank)
    n_local = stop - start
    out = {"positives_kept": True, "count_ok": True, "loss": 0.0, "emb_grad": 0.0, "kernel_grad": 0.0,
           "deferred_equal": True}
    kept_at = {}
    for step in (5, 6):
        emb, norms, labels, _ = _batch(world, step, C_SAMPLE)
        e = emb[_rows(rank)].clone().requires_grad_(True)
        loss = sharded(e, norms[_rows(rank)], labels[_rows(rank)], step=step)
        loss.backward()
        e_deferred = emb[_rows(rank)].clone().requires_grad_(True)
        deferred(e_deferred, norms[_rows(rank)], labels[_rows(rank)], step=step).backward()
        kept_grad = take_column_grad(deferred.kernel)     # the kept columns' gradient only
        out["deferred_equal"] &= (deferred.kernel.grad is None and kept_grad.index.numel() < n_local
                                  and torch.equal(kept_grad.to_dense(deferred.kernel.detach()), sharded.kernel.grad)
                                  and torch.equal(e_deferred.grad, e.grad))
        mine = sharded.sampled_classes.clone()
        kept_at[step] = mine
        out["count_ok"] &= mine.numel() == min(n_local, max(math.ceil(rate * n_local), emb.shape[0]))
        out["count_ok"] &= bool(((mine >= start) & (mine < stop)).all())
        kept = torch.cat(_all_gather_list(mine, group, world)).sort().values
        positives = labels.unique()
        out["positives_kept"] &= bool(torch.isin(positives, kept).all())
        # reference: the unsharded head over the kept classes only
        sub = ArcFace(embedding_size=E, classnum=kept.numel(), m=HEAD_ARGS["arcface"]["m"], s=64.)
        with torch.no_grad():
            sub.kernel.copy_(ref.kernel[:, kept])
        e_ref = emb.clone().requires_grad_(True)
        sub_labels = torch.searchsorted(kept, labels)
        loss_ref = F.cross_entropy(sub(e_ref, None, sub_labels), sub_labels)
        loss_ref.backward()
        out["loss"] = max(out["loss"], _rel(loss, loss_ref))
        out["emb_grad"] = max(out["emb_grad"], _rel(e.grad, e_ref.grad[_rows(rank)]))
        full_grad = torch.zeros(E, C_SAMPLE)
        full_grad[:, kept] = sub.kernel.grad
        kernel_rel = _kernel_rel(sharded.kernel.grad, full_grad, group, rank)
        if rank == 0:
            out["kernel_grad"] = max(out["kernel_grad"], kernel_rel)
        sharded.kernel.grad = None
    # the same (seed, rank, step) draws the same classes whatever happened in between
    emb, norms, labels, _ = _batch(world, 5, C_SAMPLE)
    sharded(emb[_rows(rank)], norms[_rows(rank)], labels[_rows(rank)], step=5)
    out["deterministic"] = bool(torch.equal(sharded.sampled_classes, kept_at[5]))
    out["steps_differ"] = not torch.equal(kept_at[5], kept_at[6])
    return out


def run_checks(group, world: int, rank: int) -> dict:
    results = {}
    for head_type in HEAD_TYPES:
        results[f"grad/{head_type}"] = check_gradients(head_type, group, world, rank)
        results[f"sgd/{head_type}"] = check_sgd(head_type, group, world, rank)
        results[f"sgd_deferred/{head_type}"] = check_sgd(head_type, group, world, rank, deferred=True)
    results["local_stats"] = check_local_stats(group, world, rank)
    results["sampling"] = check_sampling(group, world, rank)
    return results


def _resume_step(head, layer, opt, group, world: int, rank: int, step: int, train: bool = True) -> float:
    """One step on the same global batch of 12 samples whatever ``world`` (rank ``rank``'s rows)."""
    _, _, labels, x = _batch(4, 300 + step)
    rows = slice(rank * x.shape[0] // world, (rank + 1) * x.shape[0] // world)
    emb, norms = _embed(layer, x[rows])
    loss = head(emb, norms, labels[rows])
    if train:
        opt.zero_grad()
        loss.backward()
        if world > 1:
            _sum_over_ranks([p.grad for p in layer.parameters()], group)
        opt.step()
    return float(loss)


def _fresh(group, seed: int):
    torch.manual_seed(seed)
    head = build_sharded_head("adaface", E, C, group=group, seed=SEED, **HEAD_ARGS["adaface"])
    torch.manual_seed(seed + 1)
    layer = torch.nn.Linear(8, E)
    return head, layer, _sgd([*layer.parameters(), head.kernel])


def _checkpoint(head, layer, opt) -> dict:
    state = {**{"model." + k: v for k, v in layer.state_dict().items()},
             **{"head." + k: v for k, v in head.state_dict().items()}}
    return {"state_dict": state, "optimizer_states": [opt.state_dict()]}


def _restore(checkpoint: dict, head, layer, opt, momentum: bool = True) -> None:
    shard_head_checkpoint(checkpoint, head, kernel_state_index(opt, head.kernel))
    state = checkpoint["state_dict"]
    layer.load_state_dict({k[6:]: v for k, v in state.items() if k.startswith("model.")})
    head.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("head.")})
    if momentum:
        opt.load_state_dict(checkpoint["optimizer_states"][0])


def check_resume(groups: dict, rank: int, path: str) -> dict:
    """Save at W = 4 (published layout, gathered optimizer state), resume at W = 1, 2, 3: the loss of
    the step after the first resumed step equals continuing at W = 4 (momentum included)."""
    head, layer, opt = _fresh(groups[4], SEED)
    for step in range(3):
        _resume_step(head, layer, opt, groups[4], 4, rank, step)
    checkpoint = _checkpoint(head, layer, opt)
    gather_head_checkpoint(checkpoint, head, kernel_state_index(opt, head.kernel))
    on_disk = _checkpoint(head, layer, opt)       # gathered into files, written by SafeCheckpointIO
    gather_head_checkpoint(on_disk, head, kernel_state_index(opt, head.kernel), to_disk=True,
                           directory=os.path.dirname(path))
    out = {}
    if rank == 0:
        kernel = checkpoint["state_dict"]["head.kernel"]
        momentum = checkpoint["optimizer_states"][0]["state"][kernel_state_index(opt, head.kernel)]
        out["published_layout"] = tuple(kernel.shape) == (E, C) and tuple(
            momentum["momentum_buffer"].shape) == (E, C)
        torch.save(checkpoint, path)
        SafeCheckpointIO().save_checkpoint(on_disk, path + ".disk")
        written = read_checkpoint(path + ".disk", mmap=True)
        index = kernel_state_index(opt, head.kernel)
        out["disk_save_equal"] = (
            torch.equal(written["state_dict"]["head.kernel"], kernel)
            and torch.equal(written["optimizer_states"][0]["state"][index]["momentum_buffer"],
                            momentum["momentum_buffer"])
            and torch.equal(written["state_dict"]["model.weight"], layer.weight))
        with zipfile.ZipFile(path + ".disk") as archive:    # every CRC-32 filled in and right
            out["disk_save_crc32"] = archive.testzip() is None and all(
                info.CRC for info in archive.infolist())
        del on_disk, written
        out["raw_files_removed"] = not list(Path(path).parent.glob(".head_columns.*.tmp"))
    _resume_step(head, layer, opt, groups[4], 4, rank, 3)
    expected = _resume_step(head, layer, opt, groups[4], 4, rank, 4, train=False)
    dist.barrier()
    for world in (1, 2, 3):
        if rank < world:
            for momentum in ((True, False) if world == 2 else (True,)):
                head, layer, opt = _fresh(groups[world], SEED + 5)  # another initial kernel
                # the file SafeCheckpointIO wrote, mapped: each rank copies its columns only
                mapped = own_checkpoint_tensors(read_checkpoint(path + ".disk", mmap=True), (E, C))
                _restore(mapped, head, layer, opt, momentum)
                _resume_step(head, layer, opt, groups[world], world, rank, 3)
                got = _resume_step(head, layer, opt, groups[world], world, rank, 4, train=False)
                if momentum:
                    out[f"resume_at_{world}"] = abs(got - expected) / abs(expected) <= 1e-6
                else:
                    out["without_momentum_differs"] = abs(got - expected) / abs(expected) > 1e-4
        dist.barrier()
    return out


def check_collective_paths(group, world: int, rank: int) -> dict:
    """The embeddings' gradient through the reduce-scatter branch (NCCL's; gloo here has it too)
    and through torch's older names of the two collectives, against the all-reduce branch."""
    import head_sharded

    emb, norms, labels, _ = _batch(world, 0)
    saved = {name: getattr(dist, name) for name in ("all_gather_single", "reduce_scatter_single")
             if hasattr(dist, name)}
    branch = head_sharded._reduce_scatter_supported
    grads = {}
    try:
        for path in ("all_reduce", "reduce_scatter", "old_names"):
            head_sharded._reduce_scatter_supported = lambda group, scatter=path != "all_reduce": scatter
            if path == "old_names":        # torch before all_gather_single / reduce_scatter_single
                for name in saved:
                    delattr(dist, name)
            _, sharded = _heads("cosface", C, group)
            e = emb[_rows(rank)].clone().requires_grad_(True)
            sharded(e, norms[_rows(rank)], labels[_rows(rank)]).backward()
            grads[path] = e.grad
    finally:
        head_sharded._reduce_scatter_supported = branch
        for name, collective in saved.items():
            setattr(dist, name, collective)
    return {"reduce_scatter": _rel(grads["reduce_scatter"], grads["all_reduce"]),
            "old_names": _rel(grads["old_names"], grads["all_reduce"]),
            "nonzero": bool(grads["all_reduce"].abs().sum() > 0)}


def _worker(rank: int, world: int, folder: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    try:
        groups = {size: dist.new_group(list(range(size))) for size in range(1, world)}
        groups[world] = None            # the default group, as in training
        results = {}
        for size in range(2, world + 1):
            if rank < size:
                results[size] = run_checks(groups[size], size, rank)
            dist.barrier()
        results[world]["resume"] = check_resume(groups, rank, os.path.join(folder, "w4.ckpt"))
        results[world]["collectives"] = check_collective_paths(groups[world], world, rank)
        torch.save(results, os.path.join(folder, f"rank{rank}.pt"))  # plain dicts of numbers
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def gloo_results(tmp_path_factory):
    """{W: {check: {metric: value}} for each rank} from one spawn of 4 gloo processes."""
    folder = tmp_path_factory.mktemp("pfc")
    mp.spawn(_worker, args=(4, str(folder)), nprocs=4, join=True)
    per_rank = [torch.load(Path(folder) / f"rank{r}.pt", weights_only=True) for r in range(4)]
    merged = {}
    for rank, results in enumerate(per_rank):
        for size, checks in results.items():
            merged.setdefault(size, []).append(checks)
    return merged


def _assert_results(per_rank_checks, name):
    for rank, checks in enumerate(per_rank_checks):
        for metric, value in checks[name].items():
            if isinstance(value, bool):
                assert value, f"{name}: {metric} failed on rank {rank}"
            else:
                assert value <= TOL, f"{name}: {metric} relative error {value:.2e} on rank {rank}"


CHECKS = ([f"grad/{h}" for h in HEAD_TYPES] + [f"sgd/{h}" for h in HEAD_TYPES]
          + [f"sgd_deferred/{h}" for h in HEAD_TYPES] + ["local_stats", "sampling"])


def test_checkpoint_saved_at_4_resumes_at_1_2_3(gloo_results):
    _assert_results(gloo_results[4], "resume")
    assert {"resume_at_1", "resume_at_2", "resume_at_3", "published_layout", "disk_save_equal",
            "disk_save_crc32", "raw_files_removed"} <= set(gloo_results[4][0]["resume"])


def test_reduce_scatter_branch_and_older_collective_names_agree(gloo_results):
    """NCCL's branch of the all-gather's backward (forced on gloo) and the collectives' older names
    (a torch before ``all_gather_single``) give the embeddings' gradient of the default branch."""
    _assert_results(gloo_results[4], "collectives")


@pytest.mark.parametrize("name", CHECKS)
def test_single_process_without_distributed(name):
    assert not dist.is_initialized()
    head_type = name.split("/")[-1]
    if name.startswith("grad/"):
        checks = {name: check_gradients(head_type, None, 1, 0)}
    elif name.startswith("sgd"):
        checks = {name: check_sgd(head_type, None, 1, 0, deferred=name.startswith("sgd_deferred/"))}
    elif name == "local_stats":
        checks = {name: check_local_stats(None, 1, 0)}
    else:
        checks = {name: check_sampling(None, 1, 0)}
    _assert_results([checks], name)


@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize("name", CHECKS)
def test_gloo_matches_unsharded(gloo_results, world, name):
    assert len(gloo_results[world]) == world
    _assert_results(gloo_results[world], name)


def test_shard_bounds_cover_the_classes_without_padding():
    for classnum, world in ((23, 4), (23, 3), (8, 8), (1000003, 7)):
        bounds = [shard_bounds(classnum, world, r) for r in range(world)]
        assert bounds[0][0] == 0 and bounds[-1][1] == classnum
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
        sizes = [b - a for a, b in bounds]
        assert max(sizes) - min(sizes) <= 1
    with pytest.raises(ValueError, match="cannot shard"):
        shard_bounds(3, 4, 0)


def test_shard_columns_and_gather_round_trip_single_process():
    full = torch.randn(E, C)
    parts = [shard_columns(full, 3, r) for r in range(3)]
    assert torch.equal(torch.cat(parts, 1), full)
    assert torch.equal(gather_columns(full, C), full)


def test_sample_columns_keeps_positives_even_when_they_fill_the_budget():
    labels = torch.arange(0, 40, 2).reshape(-1, 1)            # 20 positives, rate 0.01 of 50 classes
    has_target = torch.ones_like(labels, dtype=torch.bool)
    g = torch.Generator().manual_seed(sample_seed(1, 0, 3))
    kept = sample_columns(labels, has_target, 50, 0.01, g)
    assert kept.numel() == 20 and torch.equal(kept, labels.reshape(-1))



def _sample_reference(labels, has_target, n_local, rate, generator):
    """The sampling rule done the straightforward way: all scores in one draw, 2 for positives,
    a stable sort (ties: the lower index first), the first ``keep``."""
    keep = min(n_local, max(math.ceil(rate * n_local), labels.shape[0]))
    score = torch.rand(n_local, generator=generator)
    score[labels.reshape(-1)[has_target.reshape(-1)]] = 2.0
    return torch.sort(score, descending=True, stable=True).indices[:keep].sort().values


@pytest.mark.parametrize("n_local, rate, batch", [(300_000, 0.1, 64), (70_000, 0.05, 128), (1000, 0.1, 16)])
@pytest.mark.parametrize("fallback", [False, True])
def test_sample_columns_equals_the_straightforward_rule(monkeypatch, n_local, rate, batch, fallback):
    """The chunked candidate draw (and, when too few scores pass its threshold, the whole draw it
    falls back to) keeps the same classes as one full draw and a sort, and leaves the generator
    where one full draw leaves it."""
    import head_sharded

    if fallback:       # a threshold that too few pass: the rare path, made certain
        monkeypatch.setattr(head_sharded, "_candidate_fraction", lambda keep, n: 0.5 * keep / n)
    g = torch.Generator().manual_seed(batch)
    labels = torch.randint(0, n_local, (batch, 1), generator=g)
    has_target = torch.rand(batch, 1, generator=g) < 0.7
    mine, theirs = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    kept = sample_columns(labels, has_target, n_local, rate, mine)
    assert torch.equal(kept, _sample_reference(labels, has_target, n_local, rate, theirs))
    assert torch.equal(torch.rand(4, generator=mine), torch.rand(4, generator=theirs))


def test_sample_columns_breaks_ties_at_the_boundary_towards_the_lower_index():
    from head_sharded import _top_scores

    g = torch.Generator().manual_seed(3)
    score = torch.randint(0, 6, (500,), generator=g).float()       # many ties at every value
    for keep in (0, 1, 137, 250, 499, 500):
        order = torch.sort(score, descending=True, stable=True).indices[:keep].sort().values
        index = torch.arange(1000, 1500)
        assert torch.equal(_top_scores(index, score, keep), index[order])

def test_kept_columns_are_read_in_chunks_as_from_a_copy(monkeypatch):
    """Training's sampled head (deferred kernel gradient) reads the kept columns in place, 7
    classes at a time, and runs its softmax over blocks of 4 rows (a full block and a partial one
    of the 6): loss, embedding gradient and kernel gradient equal the path that copies the kept
    columns (E x K), has autograd give a dense gradient and takes the softmax in one block."""
    import head_sharded

    results = []
    for defer in (False, True):
        if defer:
            monkeypatch.setattr(head_sharded, "_KEPT_CHUNK_ELEMENTS", 7 * E)
            monkeypatch.setattr(head_sharded, "_CHUNK_ELEMENTS", 4 * math.ceil(0.2 * C_SAMPLE))
        _, head = _heads("adaface", C_SAMPLE, None, sample_rate=0.2)
        head.defer_kernel_grad = defer
        emb, norms, labels, _ = _batch(2, 7, C_SAMPLE)
        e = emb.clone().requires_grad_(True)
        loss = head(e, norms, labels, step=3)
        loss.backward()
        grad = take_column_grad(head.kernel).to_dense(head.kernel.detach()) if defer else head.kernel.grad
        assert (head.kernel.grad is None) == defer
        results.append((loss.detach(), e.grad, grad, head.sampled_classes.numel()))
    assert results[0][3] == results[1][3] == math.ceil(0.2 * C_SAMPLE) > 7 * 3   # several chunks of kept columns
    for want, got in zip(results[0][:3], results[1][:3]):   # sums over chunks of classes: float32 rounding
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6 * float(want.abs().max()))


@pytest.mark.parametrize("bad, match", [([0, C], r"\[0, 23\)"), ([-1, 2], r"\[0, 23\)"),
                                        ([0.0, 1.0], "integer class indices")])
def test_bad_labels_are_rejected(bad, match):
    _, sharded = _heads("cosface", C, None)
    with pytest.raises(ValueError, match=match):
        sharded(F.normalize(torch.randn(2, E)), None, torch.tensor(bad))


def test_bad_settings_are_rejected():
    with pytest.raises(ValueError, match="sample_rate"):
        _heads("arcface", C, None, sample_rate=0.0)
    with pytest.raises(ValueError, match="statistics mode"):
        _heads("adaface", C, None, stats="rank0")
    _, ada = _heads("adaface", C, None)
    with pytest.raises(ValueError, match="one feature norm per embedding"):
        ada(F.normalize(torch.randn(2, E)), None, torch.tensor([0, 1]))


def test_deferred_training_resumed_from_its_state_equals_the_uninterrupted_run():
    """Training's path (kept kernel gradient, fused step; sampling on): 5 steps straight, or 3 steps,
    the head's and optimizer's state_dicts saved and loaded into a fresh head and optimizer, then 2:
    the same weights and momentum bit for bit (the momentum lives in torch's optimizer state). The
    straight run writes its checkpoint after step 3 too, as training does at the same point:
    saving applies the steps the unsampled columns owe (utils/column_sgd.py)."""
    from train_val import SGD

    def fresh():
        _, head = _heads("arcface", C_SAMPLE, None, sample_rate=0.3)
        head.defer_kernel_grad = True
        return head, SGD([head.kernel], lr=0.1, momentum=0.9, weight_decay=5e-4)

    def train(head, opt, steps):
        for step in steps:
            emb, _, labels, _ = _batch(2, 40 + step, C_SAMPLE)
            opt.zero_grad()
            head(emb.requires_grad_(True), None, labels, step=step).backward()
            opt.step()

    straight, opt_straight = fresh()
    train(straight, opt_straight, range(3))
    assert pending_steps(straight.kernel) is not None
    copy.deepcopy({"head": straight.state_dict(), "optimizer": opt_straight.state_dict()})
    assert pending_steps(straight.kernel) is None
    train(straight, opt_straight, range(3, 5))
    first, opt_first = fresh()
    train(first, opt_first, range(3))
    saved = copy.deepcopy({"head": first.state_dict(), "optimizer": opt_first.state_dict()})
    resumed, opt_resumed = fresh()
    resumed.load_state_dict(saved["head"])
    opt_resumed.load_state_dict(saved["optimizer"])
    train(resumed, opt_resumed, range(3, 5))
    assert torch.equal(resumed.kernel, straight.kernel)
    assert torch.equal(opt_resumed.state[resumed.kernel]["momentum_buffer"],
                       opt_straight.state[straight.kernel]["momentum_buffer"])
    assert not torch.equal(resumed.kernel, first.kernel)


def test_kernel_gradient_mode_follows_the_flag_and_the_precision():
    """Training keeps the kernel's gradient compact unless ``--partial_fc_dense_grad`` or 16-mixed
    (whose gradient scaler reads ``.grad`` only) ask for a dense ``kernel.grad``."""
    from types import SimpleNamespace

    from train_val import Trainer
    from utils.config import ConfigError, check_partial_fc_args, get_args

    base = ["--arch", "ir_tiny", "--gpus", "0", "--partial_fc"]
    for extra, precision, deferred in (((), "32-true", True), ((), "bf16-mixed", True), ((), "16-mixed", False),
                                       (("--partial_fc_dense_grad",), "32-true", False)):
        module = Trainer(**{**vars(get_args(base + list(extra))), "class_num": 6})
        module.configure_model()
        module._trainer = SimpleNamespace(precision=precision)
        module.on_train_start()
        assert module.head.defer_kernel_grad is deferred, (extra, precision)
    with pytest.raises(ConfigError, match="need --partial_fc"):
        check_partial_fc_args(get_args(["--partial_fc_dense_grad"]))


def test_state_dict_keys_are_the_published_ones():
    _, ada = _heads("adaface", C, None)
    assert list(ada.state_dict()) == ["kernel", "t", "batch_mean", "batch_std"]


def test_a_checkpoint_of_another_class_count_is_a_clear_error():
    _, head = _heads("arcface", C, None)
    checkpoint = {"state_dict": {"head.kernel": torch.zeros(E, C + 1)}}
    with pytest.raises(ShardedCheckpointError, match=r"shape \(16, 24\).*\(16, 23\)"):
        shard_head_checkpoint(checkpoint, head, None)


REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """Demo-format data: 6 identities x 5 images, 10 pairs per validation set."""
    from utils.demo_data import generate_demo_data

    data = tmp_path_factory.mktemp("pfc_data") / "data"
    generate_demo_data(data, seed=3, num_train_ids=6, imgs_per_id=5, num_val_ids=6, pairs_per_set=10,
                       show_progress=False)
    return data


def _main_command(data: Path, out: Path, *extra: str, processes: int = 2):
    """``main.py`` on ``tiny_data`` (ir_tiny, global batch 8, 1 epoch unless ``extra`` says otherwise)."""
    import sys

    cmd = [sys.executable, str(REPO / "main.py"), "--data_root", str(data), "--train_data_path", ".",
           "--val_data_path", ".", "--gpus", "0", "--arch", "ir_tiny", "--batch_size", "8",
           "--num_workers", "0", "--output_dir", str(out), "--seed", "7",
           "--cpu_processes", str(processes), *extra]
    return cmd if "--epochs" in extra else cmd + ["--epochs", "1"]


def _main_env(**extra: str) -> dict:
    """One torch thread per process on any machine (Lightning would divide the node's CPUs among
    its processes: runs launched differently would sum in different orders)."""
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **extra}


def _run_main(data: Path, out: Path, *extra: str, processes: int = 2):
    import subprocess

    proc = subprocess.run(_main_command(data, out, *extra, processes=processes), cwd=REPO, capture_output=True,
                          text=True, timeout=600, env=_main_env())
    return proc.returncode, proc.stdout + proc.stderr


def _kernel_index() -> int:
    import net
    from train_val import split_parameters

    return len(split_parameters(net.build_model("ir_tiny"))[0])


@pytest.fixture(scope="module")
def pfc_run(tiny_data, tmp_path_factory):
    """``--partial_fc`` on 2 gloo processes, with sampling and clipping (1 epoch, 4 steps)."""
    out = tmp_path_factory.mktemp("pfc_run") / "run"
    rc, log = _run_main(tiny_data, out, "--partial_fc", "--sample_rate", "0.5", "--gradient_clip_val", "5")
    assert rc == 0, log[-3000:]
    return out, log


def test_main_partial_fc_on_two_gloo_processes(pfc_run):
    """``main.py --partial_fc`` end to end on 2 gloo processes (ir_tiny, 4 steps, sampling, clipping):
    each rank holds half of the 6 classes, the backbone stays identical on both ranks, and
    last.ckpt (written by SafeCheckpointIO from the gathered files) holds the full kernel and its
    momentum for every class (published layout)."""
    out, log = pfc_run
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in log
    assert "classes [0, 3) of 6 on rank 0 of 2" in log and "classes [3, 6) of 6 on rank 1 of 2" in log
    assert log.count("replicated weights identical on all 2 ranks") == 2
    assert "host allocator: freed memory is kept" not in log   # not with the memory-saving sharded head
    assert log.count("sharded head: kernel gradient deferred to the optimizer step") == 2
    steps = [int(m) for m in re.findall(r"backbone identical on all 2 ranks after (\d+) steps", log)]
    assert len(steps) == 2 and steps[0] >= 3, steps
    assert not list(out.glob(".head_columns.*.tmp"))           # the gathered files are gone
    ckpt = read_checkpoint(out / "last.ckpt")  # the project's safe loader
    assert ckpt["global_step"] >= 1
    kernel = ckpt["state_dict"]["head.kernel"]
    momentum = ckpt["optimizer_states"][0]["state"][_kernel_index()]["momentum_buffer"]
    assert kernel.shape == momentum.shape == (512, 6) and kernel.dtype == torch.float32
    assert momentum[:, :3].abs().sum() > 0 and momentum[:, 3:].abs().sum() > 0   # both ranks' classes
    torch.testing.assert_close(kernel.norm(dim=0), torch.ones(6), atol=0.2, rtol=0)


def test_two_nodes_of_one_process_are_one_node_of_two(pfc_run, tiny_data, tmp_path):
    """``--num_nodes 2 --cpu_processes 1``, one launch per node with ``NODE_RANK``, ``MASTER_ADDR``
    and ``MASTER_PORT`` (what torchrun or SLURM set) and a shared output folder: global ranks,
    shards and the whole run are those of one node with 2 processes, checkpoint bit for bit (one
    torch thread per process in both)."""
    import socket
    import subprocess

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = tmp_path / "run"
    cmd = _main_command(tiny_data, out, "--partial_fc", "--sample_rate", "0.5", "--gradient_clip_val", "5",
                        "--num_nodes", "2", processes=1)
    nodes = [subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=_main_env(NODE_RANK=str(node), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)))
             for node in (0, 1)]
    logs = [node.communicate(timeout=600)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], logs[0][-2000:] + logs[1][-2000:]
    assert "classes [0, 3) of 6 on rank 0 of 2" in logs[0] and "classes [3, 6) of 6 on rank 1 of 2" in logs[1]
    one_node, two_nodes = read_checkpoint(pfc_run[0] / "last.ckpt"), read_checkpoint(out / "last.ckpt")
    assert two_nodes["global_step"] == one_node["global_step"] >= 3
    assert one_node["state_dict"].keys() == two_nodes["state_dict"].keys()
    for key, value in one_node["state_dict"].items():
        assert torch.equal(two_nodes["state_dict"][key], value), key
    ours, theirs = (c["optimizer_states"][0]["state"] for c in (two_nodes, one_node))
    assert ours.keys() == theirs.keys()
    for index in theirs:
        assert torch.equal(ours[index]["momentum_buffer"], theirs[index]["momentum_buffer"]), index


def test_main_partial_fc_bf16_mixed(tiny_data, tmp_path):
    """``--precision bf16-mixed`` on 2 gloo processes (one step: bf16 convolutions are ~13x slower
    than float32 on CPUs without bf16 instructions): the step runs, its loss is finite and the
    backbone is identical on both ranks after it."""
    rc, log = _run_main(tiny_data, tmp_path / "run", "--partial_fc", "--precision", "bf16-mixed",
                        "--fast_dev_run")
    assert rc == 0, log[-3000:]
    assert re.findall(r"backbone identical on all 2 ranks after 1 steps", log), log[-3000:]
    losses = [float(v) for v in re.findall(r"train_loss_step=([0-9.naif]+)", log)]
    assert losses and all(math.isfinite(v) for v in losses), losses


def test_sharded_loss_under_bf16_autocast_is_float32():
    """The head leaves autocast: under bf16-mixed its loss and gradients equal the float32 ones
    (ArcFace: no running statistics that would move between the two calls)."""
    _, head = _heads("arcface", C, None)
    emb, norms, labels, _ = _batch(1, 0)
    results = []
    for enabled in (False, True):
        e = emb.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
            loss = head(e, norms, labels)
        loss.backward()
        results.append((loss.dtype, float(loss.detach()), e.grad.clone(), head.kernel.grad.clone()))
        head.kernel.grad = None
    assert results[1][0] == torch.float32
    assert results[0][1] == results[1][1]
    assert torch.equal(results[0][2], results[1][2]) and torch.equal(results[0][3], results[1][3])


def test_resume_on_fewer_processes_continues_exactly(pfc_run, tiny_data, tmp_path):
    """last.ckpt written by 2 processes, resumed at 1: ``main.py`` resumes and trains on; and the
    resumed sharded head (file mapped, columns copied) gives the same next-step loss, and after one
    SGD step (momentum included) the same loss again, as the replicated head loaded from that
    checkpoint, i.e. as continuing with the full state."""
    from train_val import SGD, Trainer
    from utils.checkpoint_io import SafeCheckpointIO

    out, _ = pfc_run
    # what a save killed mid-way leaves beside the checkpoint: removed by the next run, nothing else
    stale = [out / ".head_columns.k1lled00.tmp", out / ".last.ckpt.k1lled00.tmp"]
    for path in stale:
        path.write_bytes(b"\0" * 64)
    kept = out / "notes.head_columns.tmp"
    kept.write_text("a user's file")
    rc, log = _run_main(tiny_data, tmp_path / "resumed", "--partial_fc", "--epochs", "2",
                        "--resume_from_checkpoint", str(out / "last.ckpt"), processes=1)
    assert rc == 0, log[-3000:]
    assert not any(path.exists() for path in stale) and kept.exists()
    assert "random generators of 2 process(es), this run has 1" in log
    assert read_checkpoint(tmp_path / "resumed" / "last.ckpt")["epoch"] == 1

    losses = {}
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, 3, 112, 112, generator=g), torch.randint(0, 6, (8,), generator=g)) for _ in range(2)]
    for mode in ("sharded", "replicated"):
        checkpoint = SafeCheckpointIO(mmap=mode == "sharded").load_checkpoint(out / "last.ckpt")
        hp = dict(checkpoint["hyper_parameters"])
        hp.update(partial_fc=mode == "sharded", precision="32", sample_rate=1.0)
        module = Trainer(**hp)
        module.configure_model()
        module.on_load_checkpoint(checkpoint)
        module.load_state_dict(checkpoint["state_dict"])
        (optimizer,), _ = module.configure_optimizers()
        optimizer.load_state_dict(checkpoint["optimizer_states"][0])
        assert isinstance(optimizer, SGD)
        module.train()
        torch.manual_seed(1)                                   # the same dropout draws, if any
        losses[mode] = []
        for images, labels in batches:
            if mode == "sharded":
                loss = module.head(*module.model(images), labels)
            else:
                logits, _, _, _ = module(images, labels)
                loss = F.cross_entropy(logits, labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses[mode].append(float(loss.detach()))
    for got, ref in zip(losses["sharded"], losses["replicated"]):
        assert abs(got - ref) <= 1e-5 * abs(ref), losses


def test_gradient_accumulation_equals_the_replicated_head(tmp_path_factory):
    """``--accumulate_grad_batches 2`` on 2 gloo processes: one optimizer step of two micro-batches
    (16 images, global batch 8), AdaFace with ``--partial_fc_stats local`` against the replicated
    head from the same seed. The momentum after the first step is the decayed gradient at the
    (identical) initial weights, so it compares the accumulated gradients themselves, kernel
    included: equal to float32 precision. Excepted: the biases of the BatchNorms that end a residual
    branch or a shortcut, whose output only feeds further BatchNorms: their true gradient is zero,
    both runs hold round-off (1e-7 of the largest gradient) there. A wrongly scaled accumulation
    would be off by 50-100 % everywhere. The AdaFace statistics agree bit for bit. Then both again
    with ``--gradient_clip_val`` small enough to clip: the sharded run's global norm includes the
    kernel's kept gradient (which clipping must scale too), so the clipped states agree as well."""
    from utils.demo_data import generate_demo_data

    data = tmp_path_factory.mktemp("accumulation") / "data"
    generate_demo_data(data, seed=3, num_train_ids=4, imgs_per_id=4, num_val_ids=6, pairs_per_set=10,
                       show_progress=False)
    out = tmp_path_factory.mktemp("accumulation_runs")
    checkpoints = {}
    clip = ("--gradient_clip_val", "0.5")
    for mode, extra in (("replicated", ()), ("sharded", ("--partial_fc", "--partial_fc_stats", "local")),
                        ("replicated_clipped", clip),
                        ("sharded_clipped", ("--partial_fc", "--partial_fc_stats", "local", *clip))):
        rc, log = _run_main(data, out / mode, "--accumulate_grad_batches", "2", *extra)
        assert rc == 0, log[-3000:]
        checkpoints[mode] = read_checkpoint(out / mode / "last.ckpt")
    index = _kernel_index()
    kernel_momentum = [checkpoints[m]["optimizer_states"][0]["state"][index]["momentum_buffer"]
                       for m in ("replicated", "replicated_clipped")]
    change = float((kernel_momentum[0] - kernel_momentum[1]).norm() / kernel_momentum[0].norm())
    assert change > 0.1, change                 # the clip value does clip
    for suffix in ("", "_clipped"):
        _assert_same_first_step(checkpoints["sharded" + suffix], checkpoints["replicated" + suffix])


def _assert_same_first_step(sharded: dict, replicated: dict) -> None:
    """The sharded and replicated runs' checkpoints after one step: statistics, momentum buffers."""
    assert sharded["global_step"] == replicated["global_step"] == 1
    for key in ("head.batch_mean", "head.batch_std"):
        assert torch.equal(sharded["state_dict"][key], replicated["state_dict"][key]), key
    got = sharded["optimizer_states"][0]["state"]
    want = replicated["optimizer_states"][0]["state"]
    assert sorted(got) == sorted(want) and _kernel_index() in want
    largest = max(float(entry["momentum_buffer"].norm()) for entry in want.values())
    significant = 0
    for index, entry in want.items():
        reference = entry["momentum_buffer"]
        assert got[index]["momentum_buffer"].shape == reference.shape, index
        size, error = float(reference.norm()), float((got[index]["momentum_buffer"] - reference).norm())
        if size > 1e-3 * largest:
            significant += 1
            assert error <= 3e-4 * size, (index, error, size)   # measured: at most 5e-5
        else:                                   # a zero gradient: round-off on both sides
            assert size <= 1e-6 * largest and error <= 1e-6 * largest, (index, error, size)
    assert significant >= 50, significant      # nearly every tensor carries a real gradient


def test_out_of_range_labels_stop_main_with_one_clear_line(tiny_data, tmp_path):
    """Labels beyond the head (--custom_num_class 4 for 6 identities) under --partial_fc on 2
    processes: every rank stops with the label error (no hang, no capped loss)."""
    rc, log = _run_main(tiny_data, tmp_path / "run", "--partial_fc", "--custom_num_class", "4")
    assert rc == 2, log[-3000:]
    assert "error: labels must lie in [0, 4) (the head's classnum), got values from" in log
    assert "Traceback" not in log


def test_training_sgd_equals_torch_sgd_with_the_published_groups():
    """train_val.SGD folds the weight decay into the gradient in place (no E x C temporary): the
    parameters and momentum buffers must equal torch's SGD bit for bit over several steps, with
    the published groups (decay: convolutions/linear + kernel; none: BatchNorm) and a milestone."""
    from train_val import SGD, split_parameters

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, E), torch.nn.BatchNorm1d(E))
    kernel = torch.nn.Parameter(torch.randn(E, C))
    twins = [(model, kernel), (copy.deepcopy(model), torch.nn.Parameter(kernel.detach().clone()))]
    optimizers = []
    for cls, (m, k) in zip((torch.optim.SGD, SGD), twins):
        decay, no_decay = split_parameters(m)
        opt = cls([{"params": decay + [k], "weight_decay": 5e-4}, {"params": no_decay}], lr=0.1, momentum=0.9)
        optimizers.append((opt, torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[3], gamma=0.1)))
    for step in range(6):
        g = torch.Generator().manual_seed(step)
        grads = [torch.randn(p.shape, generator=g) for p in [*model.parameters(), kernel]]
        for (opt, sched), (m, k) in zip(optimizers, twins):
            for p, grad in zip([*m.parameters(), k], grads):
                p.grad = grad.clone()
            opt.step()
            sched.step()
        for p, q in zip([*twins[0][0].parameters(), twins[0][1]], [*twins[1][0].parameters(), twins[1][1]]):
            assert torch.equal(p, q), f"step {step}: parameters differ"
    ref, ours = optimizers[0][0], optimizers[1][0]
    assert [g["weight_decay"] for g in ours.param_groups] == [5e-4, 0]     # restored after each step
    for p, q in zip([*twins[0][0].parameters(), twins[0][1]], [*twins[1][0].parameters(), twins[1][1]]):
        assert torch.equal(ref.state[p]["momentum_buffer"], ours.state[q]["momentum_buffer"])
    assert ours.state_dict()["param_groups"] == ref.state_dict()["param_groups"]
