"""One full training step, ours against a plain eager re-statement of the published step.

A step is: backbone forward (``net.py``), AdaFace head, cross-entropy, backward, SGD step with the
published parameter groups (weight decay 5e-4 on every parameter but BatchNorm's, the head's kernel
included; momentum 0.9). Variants, all on the same random batch:

* ``reference``: contiguous NCHW backbone and the dense head formulas of ``tests/reference_heads.py``
  (B x C one-hot matrices, ``acos``/``cos`` over every logit, autograd through the normalisation),
  in a process with glibc's default allocator, as the published ``main.py`` runs;
* ``ours NCHW (CPU default)``: ``train_val.Trainer`` with the default flags of CPU training, in a
  process set up as ``main.py`` sets up CPU training (NCHW; freed host memory kept for reuse,
  ``utils/host_memory.py``);
* ``ours channels_last``: the same with ``--channels_last`` (the GPU default);
* ``ours compiled, chan.last``: ``--channels_last --compile`` (timed after its compiling first step);
* ``reference, kept memory``: the reference in a process with the allocator setting (what that
  setting alone gives the published step).

Every variant runs in its own process (its own allocator state, as in a real run), started one
after the other; a group of them runs at once with a reference of its own (``--groups``: an ir_50
process holds ~5 GiB). Rounds are interleaved (each process steps in turn, the order rotating from
round to round, so all see the same load); the speed-up is the median over rounds of ``reference
time / variant time``, with the smallest and largest ratio. The compiling first step is timed cold
(an empty inductor cache, unless ``--cache_dir`` points at a filled one) and warm (recompiled in
the same process after ``torch._dynamo.reset()``, from the on-disk cache).

    python bench/bench_train_vs_reference.py --arch ir_18 ir_50 --classes 10000 70722 --rounds 5
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def load_average() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def reference_step(arch: str, classes: int, images, labels) -> Callable[[], float]:
    """The published step restated: contiguous backbone, dense AdaFace head, published groups."""
    import torch
    import net
    from head import init_kernel
    from tests.reference_heads import adaface_dense
    from train_val import split_parameters

    torch.manual_seed(0)
    model = net.build_model(arch).train()
    kernel = torch.nn.Parameter(init_kernel(512, classes))
    stats = {"batch_mean": torch.ones(1) * 20, "batch_std": torch.ones(1) * 100}
    decay, no_decay = split_parameters(model)
    optimizer = torch.optim.SGD([{"params": decay + [kernel], "weight_decay": 5e-4},
                                 {"params": no_decay}], lr=0.1, momentum=0.9)
    loss_fn = torch.nn.CrossEntropyLoss()

    def step() -> float:
        start = time.perf_counter()
        embeddings, norms = model(images)
        logits = adaface_dense(embeddings, norms, labels, kernel, stats, m=0.4, h=0.333, s=64.,
                               t_alpha=0.01)
        loss = loss_fn(logits, labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)  # no gradients held while the other variants run
        return time.perf_counter() - start
    return step


def our_step(arch: str, classes: int, images, labels, channels_last: bool,
             compile: bool) -> Callable[[], float]:
    """``train_val.Trainer``'s step (forward, loss, non-finite check, backward, its optimizer)."""
    import torch
    import train_val

    torch.manual_seed(0)
    module = train_val.Trainer(arch=arch, head="adaface", class_num=classes, m=0.4, h=0.333, s=64.,
                               t_alpha=0.01, lr=0.1, momentum=0.9, weight_decay=5e-4,
                               lr_milestones=[8, 12, 14], lr_gamma=0.1, channels_last=channels_last,
                               compile=compile, compile_mode="default").train()
    optimizer = module.configure_optimizers()[0][0]

    def step() -> float:
        start = time.perf_counter()
        logits, _, _, target = module(images, labels)
        loss = module.cross_entropy_loss(logits, target)
        module._stop_on_non_finite(loss)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start
    step.module = module  # type: ignore[attr-defined]
    return step


def warm_compile_seconds(arch: str, classes: int, images, labels) -> float:
    """The first compiled step again, in this process after ``torch._dynamo.reset()``."""
    import torch
    torch._dynamo.reset()
    step = our_step(arch, classes, images, labels, channels_last=True, compile=True)
    step()
    module = step.module  # type: ignore[attr-defined]
    return sum(c.seconds or 0.0 for c in (module._train_model, module._train_head))


VARIANTS = {  # name: (label, channels_last, compile, keep host memory)
    "reference": ("reference", False, False, False),
    "reference_kept": ("reference, kept memory", False, False, True),
    "contiguous": ("ours NCHW (CPU default)", False, False, True),
    "channels_last": ("ours channels_last", True, False, True),
    "compiled": ("ours compiled, chan.last", True, True, True),
}


def _worker(conn, variant: str, arch: str, classes: int, batch_size: int, cache: str) -> None:
    """One variant in its own process (its own allocator state, as in a real run); steps on request."""
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")  # no pool of compile workers
    _, channels_last, compile, keep = VARIANTS[variant]
    if keep:  # what main.py does when it trains on the CPU
        from utils.host_memory import keep_freed_host_memory
        keep_freed_host_memory()
    import resource
    import torch
    import utils.compile  # noqa: F401  (inductor configured before the first compilation)
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(batch_size, 3, 112, 112, generator=generator)
    labels = torch.randint(0, classes, (batch_size,), generator=generator)
    if variant.startswith("reference"):
        step = reference_step(arch, classes, images, labels)
    else:
        step = our_step(arch, classes, images, labels, channels_last, compile)
    first = step()  # warm-up; the compiled variant compiles here
    note = ""
    if compile:
        module = step.module  # type: ignore[attr-defined]
        parts = [f"{c.name} {c.seconds:.1f} s" for c in (module._train_model, module._train_head)
                 if getattr(c, "active", False)]
        note = f"first compiled step {first:.1f} s ({', '.join(parts) or 'fell back to eager'})"
    conn.send(note)
    while True:
        command = conn.recv()
        if command == "step":
            conn.send(step())
        elif command == "warm_compile":
            del step
            conn.send(warm_compile_seconds(arch, classes, images, labels))
        elif command == "peak_rss":
            conn.send(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20)  # GiB
        else:
            return


def run_group(variants: List[str], arch: str, classes: int, batch_size: int, rounds: int,
              cache: str) -> None:
    """The reference and ``variants``, each in its own process (started one after another, so no
    warm-up overlaps another's), stepped in interleaved rounds whose order rotates."""
    import multiprocessing as mp
    context = mp.get_context("spawn")
    names = ["reference"] + [v for v in variants if v != "reference"]
    workers = {}
    try:
        for name in names:
            parent, child = context.Pipe()
            process = context.Process(target=_worker, args=(child, name, arch, classes, batch_size, cache))
            process.start()
            workers[name] = (process, parent)
            note = parent.recv()
            if note:
                print(note, flush=True)
        print(f"load average before the rounds: {load_average()}", flush=True)
        times: Dict[str, List[float]] = {name: [] for name in names}
        for r in range(rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                workers[name][1].send("step")
                times[name].append(workers[name][1].recv())
        print(f"load average after: {load_average()}")
        print(f"{'variant':<24} {'median s/step':>13} {'images/s':>9} {'peak RSS GiB':>12} "
              f"{'x reference (median [min, max])':>34}")
        for name in names:
            workers[name][1].send("peak_rss")
            rss = workers[name][1].recv()
            values = times[name]
            median = statistics.median(values)
            line = f"{VARIANTS[name][0]:<24} {median:13.3f} {batch_size / median:9.2f} {rss:12.2f}"
            if name != "reference":
                ratios = [ref / v for ref, v in zip(times["reference"], values)]
                line += f"   {statistics.median(ratios):.2f}x [{min(ratios):.2f}, {max(ratios):.2f}]"
            print(line, flush=True)
        if "compiled" in workers:
            workers["compiled"][1].send("warm_compile")
            print(f"warm compilation (same process, on-disk cache): {workers['compiled'][1].recv():.1f} s",
                  flush=True)
    finally:
        for process, conn in workers.values():
            if process.is_alive():
                try:
                    conn.send("stop")
                except OSError:
                    pass
            process.join(timeout=60)
            if process.is_alive():
                process.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--arch", nargs="+", default=["ir_18", "ir_50"])
    parser.add_argument("--classes", nargs="+", type=int, default=[10000, 70722])
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--groups", default="channels_last,contiguous;compiled,reference_kept",
                        help="variants run together with a reference, groups separated by ';' "
                             f"(variants: {', '.join(VARIANTS)}); a group's processes are alive at "
                             "once (an ir_50 process holds ~5 GiB)")
    parser.add_argument("--cache_dir", default="", help="inductor cache (default: a new, empty one)")
    opts = parser.parse_args()
    groups = [[v.strip() for v in group.split(",") if v.strip()] for group in opts.groups.split(";")]
    unknown = sorted({v for group in groups for v in group} - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {', '.join(unknown)}; valid: {', '.join(VARIANTS)}")
    cache = opts.cache_dir or tempfile.mkdtemp(prefix="inductor_cache_")
    import torch
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads per process, inductor cache {cache}")
    for arch in opts.arch:
        for classes in opts.classes:
            for group in groups:
                print(f"\n== {arch}, {classes} classes, batch {opts.batch_size}: reference + "
                      f"{', '.join(group)}; load average {load_average()}", flush=True)
                run_group(group, arch, classes, opts.batch_size, opts.rounds, cache)


if __name__ == "__main__":
    main()
