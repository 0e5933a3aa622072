"""One full training step, ours against a plain eager re-statement of the published step.

A step is: backbone forward (``net.py``), AdaFace head, cross-entropy, backward, SGD step with the
published parameter groups (weight decay 5e-4 on every parameter but BatchNorm's, the head's kernel
included; momentum 0.9). Variants, all on the same random batch:

* ``reference``: contiguous NCHW backbone and the dense head formulas of ``tests/reference_heads.py``
  (B x C one-hot matrices, ``acos``/``cos`` over every logit, autograd through the normalisation);
* ``ours contiguous``: ``train_val.Trainer`` with ``--no-channels_last``;
* ``ours default``: ``train_val.Trainer`` with the default flags (channels_last);
* ``ours compiled``: the default flags plus ``--compile`` (timed after its compiling first step).

Rounds are interleaved (one step of each variant per round, so all see the same load); the speed-up
is the median over rounds of ``reference time / variant time``, with the smallest and largest ratio.
The compilation time of the first compiled step is printed cold (an empty inductor cache, unless
``--cache_dir`` points at a filled one) and warm (recompiled in the same process after
``torch._dynamo.reset()``, from the on-disk cache).

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--arch", nargs="+", default=["ir_18", "ir_50"])
    parser.add_argument("--classes", nargs="+", type=int, default=[10000, 70722])
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--variants", default="reference,contiguous,default,compiled")
    parser.add_argument("--cache_dir", default="", help="inductor cache (default: a new, empty one)")
    opts = parser.parse_args()
    cache = opts.cache_dir or tempfile.mkdtemp(prefix="inductor_cache_")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")  # no pool of compile workers

    import torch
    import utils.compile  # noqa: F401  (inductor configured before the first compilation)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, inductor cache {cache}")
    wanted = opts.variants.split(",")
    for arch in opts.arch:
        for classes in opts.classes:
            generator = torch.Generator().manual_seed(1)
            images = torch.randn(opts.batch_size, 3, 112, 112, generator=generator)
            labels = torch.randint(0, classes, (opts.batch_size,), generator=generator)
            print(f"\n== {arch}, {classes} classes, batch {opts.batch_size}; load average "
                  f"{load_average()}", flush=True)
            steps: Dict[str, Callable[[], float]] = {}
            if "reference" in wanted:
                steps["reference"] = reference_step(arch, classes, images, labels)
            if "contiguous" in wanted:
                steps["ours contiguous"] = our_step(arch, classes, images, labels, False, False)
            if "default" in wanted:
                steps["ours default"] = our_step(arch, classes, images, labels, True, False)
            compile_note = ""
            if "compiled" in wanted:
                steps["ours compiled"] = our_step(arch, classes, images, labels, True, True)
            for name, step in steps.items():  # warm-up; the compiled variant compiles here
                seconds = step()
                if name == "ours compiled":
                    module = step.module  # type: ignore[attr-defined]
                    compiled = [c for c in (module._train_model, module._train_head)
                                if getattr(c, "active", False)]
                    compile_note = (f"first compiled step {seconds:.1f} s (cold: "
                                    + ", ".join(f"{c.name} {c.seconds:.1f} s" for c in compiled) + ")")
                    print(compile_note, flush=True)
            times: Dict[str, List[float]] = {name: [] for name in steps}
            names = list(steps)
            for r in range(opts.rounds):  # the order rotates, so no variant always runs first
                for name in names[r % len(names):] + names[:r % len(names)]:
                    times[name].append(steps[name]())
            print(f"load average after: {load_average()}")
            print(f"{'variant':<16} {'median s/step':>13} {'images/s':>9} {'x reference (median [min, max])':>34}")
            for name, values in times.items():
                median = statistics.median(values)
                line = f"{name:<16} {median:13.3f} {opts.batch_size / median:9.2f}"
                if "reference" in times and name != "reference":
                    ratios = [r / v for r, v in zip(times["reference"], values)]
                    line += f"   {statistics.median(ratios):.2f}x [{min(ratios):.2f}, {max(ratios):.2f}]"
                print(line, flush=True)
            if "compiled" in wanted:
                del steps
                print(f"warm compilation (same process, on-disk cache): "
                      f"{warm_compile_seconds(arch, classes, images, labels):.1f} s", flush=True)


if __name__ == "__main__":
    main()
