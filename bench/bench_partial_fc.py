"""Head step time and per-rank peak memory of the sharded head (Partial FC) on gloo CPU processes.

One head step = forward (loss) + backward + SGD step (momentum 0.9, weight decay 5e-4; ours and
replicated with training's ``train_val.SGD``, ``--torch_sgd`` for torch's) on the kernel, with
the embeddings (per-rank batch B, E = 512, unit length) as a leaf input. Each configuration
runs in W fresh processes (``torch.multiprocessing`` + gloo; W = 1 without torch.distributed for
ours and ``head.py``): one warm-up step, then ``--steps`` timed steps
between barriers (median). Memory: the growth of each rank's peak resident set size from just
before the head is built to the end (head state + the step's temporaries), the largest over the
ranks. Implementations:

* ``ours``       -- ``head_sharded.py`` (ArcFace margins; the three heads share the same code path) as
  training runs it: the kernel's gradient kept as a ``utils.column_sgd.ColumnGradient`` (the G
  buffer at r = 1, the kept columns' gradient at r < 1) and stepped by ``train_val.SGD``'s fused
  column step; ``--dense_kernel_grad`` measures the dense ``kernel.grad`` path instead (what
  16-mixed uses);
* ``replicated`` -- ``head.py``'s ArcFace on every rank + an all-reduce of the kernel gradient (what
  DDP does), the baseline where it fits;
* ``matmul_floor`` -- only the step's three matrix products at the same sizes (logits = global
  embeddings x kept kernel columns, their gradients with respect to the embeddings and the kernel),
  into preallocated buffers: the time no exact implementation of the same softmax can go below;
* ``arcface_torch`` -- insightface's ``recognition/arcface_torch/partial_fc_v2.py`` with its
  ``CombinedMarginLoss(64, 1.0, 0.5, 0.0)`` (ArcFace), run unchanged but for ``.cuda()`` made a
  no-op; pass ``--insightface`` the folder that holds ``partial_fc_v2.py`` and ``losses.py``.

The initial kernel of ours is drawn per shard (``--exact_init`` draws the exact replicated-head
stream, which costs E x C random numbers per rank and is not what is measured). Configurations
whose estimated memory exceeds what the machine has available are skipped and reported.

    python bench/bench_partial_fc.py                                   # the full grid (long)
    python bench/bench_partial_fc.py --classes 100000 --worlds 1 2 --impl ours replicated
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
import torch.nn.functional as F  # noqa: E402

GIB = 1024 ** 3


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def proc_kib_field(path: str, field: str) -> int:
    """Bytes of a ``field:  N kB`` line of a /proc file (0 when absent)."""
    with open(path) as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _available_bytes() -> int:
    return proc_kib_field("/proc/meminfo", "MemAvailable")


def estimate_bytes(impl: str, classes: int, world: int, batch: int, dim: int, rate: float) -> int:
    """Rough total over all ranks (for skipping what cannot fit; the measurement is what counts)."""
    local = math.ceil(classes / world)
    kept = local if rate >= 1 else max(math.ceil(rate * local), batch * world)
    logits = batch * world * kept * 4
    if impl == "ours":
        per_rank = 3 * dim * local * 4 + logits + (2 * dim * kept * 4 if rate < 1 else 0)  # dense path: the most
    elif impl == "matmul_floor":
        per_rank = 2 * dim * kept * 4 + logits
    elif impl == "replicated":
        per_rank = 3 * dim * classes * 4 + 2 * batch * classes * 4 + dim * classes * 4
    else:  # arcface_torch: weight, grad, momentum, normalised copy, backward temporaries
        per_rank = 3 * dim * local * 4 + 4 * dim * kept * 4 + 3 * logits
    return world * (per_rank + 400 * 1024 ** 2)


def _build(impl: str, classes: int, world: int, rank: int, dim: int, rate: float, exact_init: bool,
           insightface: str, defer: bool = True):
    if impl == "ours":
        import head_sharded
        if not exact_init:  # per-shard draw: not the replicated head's stream, same cost per step
            def fast(embedding_size, classnum, start, stop, generator=None, class_major=False):
                cols = torch.empty(stop - start, embedding_size).uniform_(-1, 1).t() if class_major \
                    else torch.empty(embedding_size, stop - start).uniform_(-1, 1)
                return cols.renorm_(2, 1, 1e-5).mul_(1e5)
            head_sharded.init_kernel_columns = fast
        head = head_sharded.build_sharded_head("arcface", dim, classes, m=0.5, t_alpha=1.0, h=0.0, s=64.,
                                               sample_rate=rate, seed=0)
        head.defer_kernel_grad = defer
        return head, head.kernel, lambda emb, labels, step: head(emb, None, labels, step=step)
    if impl == "replicated":
        import head as heads
        head = heads.build_head("arcface", dim, classes, m=0.5, t_alpha=1.0, h=0.0, s=64.)

        def loss_fn(emb, labels, step):
            return F.cross_entropy(head(emb, None, labels), labels)
        return head, head.kernel, loss_fn
    sys.path.insert(0, insightface)
    torch.Tensor.cuda = lambda self, *args, **kwargs: self       # the one change: .cuda() is a no-op
    from losses import CombinedMarginLoss
    from partial_fc_v2 import PartialFC_V2
    head = PartialFC_V2(CombinedMarginLoss(64.0, 1.0, 0.5, 0.0), dim, classes, rate, False)
    return head, head.weight, lambda emb, labels, step: head(emb, labels.clone())


def _matmul_floor(classes: int, world: int, rank: int, batch: int, dim: int, rate: float):
    """The three products of a head step on this rank's kept columns, into preallocated buffers."""
    local = math.ceil(classes / world)
    kept = local if rate >= 1 else max(math.ceil(rate * local), batch * world)
    kernel = torch.randn(dim, kept)
    logits = torch.empty(batch * world, kept)
    grad_embeddings = torch.empty(batch * world, dim)
    grad_kernel = torch.empty(dim, kept)

    def step(emb: torch.Tensor) -> None:
        embeddings = emb.repeat(world, 1)             # stands for the all-gathered global batch
        torch.mm(embeddings, kernel, out=logits)
        torch.mm(logits, kernel.t(), out=grad_embeddings)
        torch.mm(embeddings.t(), logits, out=grad_kernel)
    return kernel, step


def worker(rank: int, cfg: dict, out_dir: str) -> None:
    world, impl = cfg["world"], cfg["impl"]
    torch.set_num_threads(cfg["threads"])
    distributed = world > 1 or impl == "arcface_torch"
    if distributed:
        dist.init_process_group("gloo", init_method=f"file://{out_dir}/store", rank=rank, world_size=world)
    batch, dim = cfg["batch"], cfg["dim"]
    inputs = []
    for i in range(cfg["steps"] + 1):           # a new batch each step (a fixed one is soon memorised)
        g = torch.Generator().manual_seed(1000 * i + rank)
        inputs.append((F.normalize(torch.randn(batch, dim, generator=g)),
                       torch.randint(0, cfg["classes"], (batch,), generator=g)))
    sgd = torch.optim.SGD
    if impl != "arcface_torch" and not cfg.get("torch_sgd"):
        # training's SGD (weight decay folded in place, the fused step for a kept kernel gradient),
        # imported before the baseline: Lightning's import is not head memory
        from train_val import SGD as sgd
    before = _peak_rss()
    t0 = time.perf_counter()
    if impl == "matmul_floor":
        kernel, floor_step = _matmul_floor(cfg["classes"], world, rank, batch, dim, cfg["rate"])
    else:
        head, kernel, loss_fn = _build(impl, cfg["classes"], world, rank, dim, cfg["rate"],
                                       cfg["exact_init"], cfg["insightface"], not cfg["dense_kernel_grad"])
    build_s = time.perf_counter() - t0
    if impl == "matmul_floor":
        opt = None
    else:
        opt = sgd([kernel], lr=0.1, momentum=0.9, weight_decay=5e-4)

    def step(i: int) -> float:
        emb, labels = inputs[i]
        if opt is None:
            floor_step(emb)
            return float("nan")
        emb = emb.clone().requires_grad_(True)
        opt.zero_grad()
        loss = loss_fn(emb, labels, i)
        loss.backward()
        if impl == "replicated" and world > 1:
            dist.all_reduce(kernel.grad)
            kernel.grad.div_(world)
        opt.step()
        return float(loss.detach())

    times = []
    for i in range(cfg["steps"] + 1):
        if distributed:
            dist.barrier()
        t0 = time.perf_counter()
        loss = step(i)
        if distributed:
            dist.barrier()
        if i:
            times.append(time.perf_counter() - t0)
    state = 0  # what outlives a step: kernel, momentum, and a dense gradient where one is kept
    if impl != "matmul_floor":
        held = [kernel, kernel.grad, opt.state[kernel].get("momentum_buffer")]
        state = sum(t.numel() * t.element_size() for t in held if t is not None)
    result = {"rank": rank, "median_s": statistics.median(times), "min_s": min(times), "build_s": build_s,
              "peak_growth": _peak_rss() - before, "state": state, "loss": loss}
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    if distributed:
        dist.destroy_process_group()


def run_config(cfg: dict) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(worker, args=(cfg, folder), nprocs=cfg["world"], join=True)
        ranks = [json.loads(Path(folder, f"rank{r}.json").read_text()) for r in range(cfg["world"])]
    return {"median_s": max(r["median_s"] for r in ranks), "min_s": max(r["min_s"] for r in ranks),
            "peak_gib": max(r["peak_growth"] for r in ranks) / GIB,
            "state_gib": max(r["state"] for r in ranks) / GIB, "build_s": max(r["build_s"] for r in ranks),
            "loss": ranks[0]["loss"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--classes", type=int, nargs="+", default=[100000, 1000000, 2059906])
    p.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--rates", type=float, nargs="+", default=[1.0, 0.1])
    p.add_argument("--impl", nargs="+", default=["ours", "replicated", "arcface_torch"],
                   choices=["ours", "replicated", "arcface_torch", "matmul_floor"])
    p.add_argument("--batch", type=int, default=64, help="per-rank batch")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per rank (1: on a shared CPU two threads make small ops wait)")
    p.add_argument("--exact_init", action="store_true")
    p.add_argument("--torch_sgd", action="store_true",
                   help="ours and replicated with torch.optim.SGD (an E x C weight-decay temporary) "
                        "instead of training's train_val.SGD")
    p.add_argument("--dense_kernel_grad", action="store_true",
                   help="ours with a dense kernel.grad (the 16-mixed path) instead of the kept column gradient")
    p.add_argument("--insightface", default="", help="folder with partial_fc_v2.py and losses.py")
    p.add_argument("--margin_gib", type=float, default=2.0, help="memory left free when deciding to skip")
    args = p.parse_args()
    print(f"# torch {torch.__version__}, {os.cpu_count()} CPUs, load average {os.getloadavg()}", flush=True)
    print("| impl | C | W | r | step s (median) | step s (min) | peak RSS growth / rank GiB | "
          "state / rank GiB | 3CE4/W GiB | loss |", flush=True)
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|", flush=True)
    for classes in args.classes:
        for world in args.worlds:
            for rate in args.rates:
                for impl in args.impl:
                    if impl == "replicated" and rate < 1:
                        continue
                    if impl == "arcface_torch" and not args.insightface:
                        continue
                    cfg = dict(impl=impl, classes=classes, world=world, rate=rate, batch=args.batch,
                               dim=args.dim, steps=args.steps, threads=args.threads, exact_init=args.exact_init,
                               torch_sgd=args.torch_sgd, dense_kernel_grad=args.dense_kernel_grad,
                               insightface=args.insightface)
                    ideal = 3 * classes * args.dim * 4 / world / GIB
                    need = estimate_bytes(impl, classes, world, args.batch, args.dim, rate)
                    free = _available_bytes() - args.margin_gib * GIB
                    if need > free:
                        print(f"| {impl} | {classes} | {world} | {rate} | skipped: needs ~{need / GIB:.1f} GiB, "
                              f"{free / GIB:.1f} GiB available | | | | {ideal:.2f} | |", flush=True)
                        continue
                    try:
                        r = run_config(cfg)
                    except Exception as exc:  # a failed configuration is a result too
                        print(f"| {impl} | {classes} | {world} | {rate} | failed: {type(exc).__name__} | | | | "
                              f"{ideal:.2f} | |", flush=True)
                        continue
                    print(f"| {impl} | {classes} | {world} | {rate} | {r['median_s']:.3f} | {r['min_s']:.3f} | "
                          f"{r['peak_gib']:.2f} | {r['state_gib']:.2f} | {ideal:.2f} | {r['loss']:.3f} |",
                          flush=True)
    print(f"# load average at the end {os.getloadavg()}", flush=True)


if __name__ == "__main__":
    main()
