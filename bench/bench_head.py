"""Forward + backward time and peak memory of the margin heads against the dense reference.

The dense reference (tests/reference_heads.py) restates the published formulas with B x C one-hot
matrices and acos/cos over every logit. Runs alternate (ours, dense, ours, dense, ...) so that both
see the same machine load; the speed-up is the median of the per-pair ratios. Peak memory is the
growth of the peak resident set size during one forward + backward (after the inputs and the
head exist), each measured in a fresh process started before the timing runs.

    python bench/bench_head.py                      # B=256, C=70,722, E=512, float32, CPU
    python bench/bench_head.py --repeats 3 --classes 10000
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from prettytable import PrettyTable  # noqa: E402

from head import build_head  # noqa: E402
from tests.reference_heads import adaface_dense, arcface_dense, cosface_dense  # noqa: E402

MARGINS = {"adaface": 0.4, "arcface": 0.5, "cosface": 0.4}


def make_inputs(batch: int, classes: int, dim: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    emb = F.normalize(torch.randn(batch, dim, generator=g))
    norms = torch.rand(batch, 1, generator=g) * 30 + 5
    labels = torch.randint(0, classes, (batch,), generator=g)
    return emb, norms, labels


def make_steps(head_type: str, batch: int, classes: int, dim: int):
    """Two closures, each one forward + cross-entropy + backward: ours and the dense reference."""
    emb, norms, labels = make_inputs(batch, classes, dim)
    head = build_head(head_type, dim, classes, m=MARGINS[head_type], t_alpha=0.01, h=0.333, s=64.)
    kernel = head.kernel.detach().clone().requires_grad_(True)
    stats = {"batch_mean": torch.ones(1) * 20, "batch_std": torch.ones(1) * 100}

    def ours():
        e = emb.clone().requires_grad_(True)
        head.kernel.grad = None
        F.cross_entropy(head(e, norms, labels), labels).backward()

    def dense():
        e = emb.clone().requires_grad_(True)
        kernel.grad = None
        m = MARGINS[head_type]
        if head_type == "adaface":
            logits = adaface_dense(e, norms, labels, kernel, stats, m=m, t_alpha=0.01)
        elif head_type == "arcface":
            logits = arcface_dense(e, norms, labels, kernel, m=m)
        else:
            logits = cosface_dense(e, norms, labels, kernel, m=m)
        F.cross_entropy(logits, labels).backward()

    return ours, dense


def time_pairs(ours, dense, repeats: int):
    ours(), dense()  # warm-up
    t_ours, t_dense, ratios = [], [], []
    for _ in range(repeats):
        t0 = time.perf_counter(); ours(); t1 = time.perf_counter(); dense(); t2 = time.perf_counter()
        t_ours.append(t1 - t0); t_dense.append(t2 - t1); ratios.append((t2 - t1) / (t1 - t0))
    return statistics.median(t_ours), statistics.median(t_dense), statistics.median(ratios)


def peak_memory_child(head_type: str, variant: str, batch: int, classes: int, dim: int) -> None:
    """Run in a fresh process: print the RSS growth (MiB) of one forward + backward."""
    ours, dense = make_steps(head_type, batch, classes, dim)
    step = ours if variant == "ours" else dense
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"peak_mib": (after - before) / 1024.0}))


def peak_memory(head_type: str, variant: str, batch: int, classes: int, dim: int) -> float:
    cmd = [sys.executable, __file__, "--memory_child", head_type, variant, "--batch", str(batch),
           "--classes", str(classes), "--dim", str(dim)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_mib"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--classes", type=int, default=70722)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--heads", default="adaface,arcface,cosface")
    parser.add_argument("--memory_child", nargs=2, metavar=("HEAD", "VARIANT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        peak_memory_child(*args.memory_child, args.batch, args.classes, args.dim)
        return

    torch.manual_seed(0)
    table = PrettyTable(["head", "ours fwd+bwd (s)", "dense fwd+bwd (s)", "speed-up (median ratio)",
                         "ours peak (MiB)", "dense peak (MiB)"])
    heads = args.heads.split(",")
    # memory first: a child process inherits the parent's peak RSS, so the parent must still be small
    memory = {(h, v): peak_memory(h, v, args.batch, args.classes, args.dim)
              for h in heads for v in ("ours", "dense")}
    for head_type in heads:
        ours, dense = make_steps(head_type, args.batch, args.classes, args.dim)
        t_ours, t_dense, ratio = time_pairs(ours, dense, args.repeats)
        del ours, dense
        mem_ours, mem_dense = memory[(head_type, "ours")], memory[(head_type, "dense")]
        table.add_row([head_type, f"{t_ours:.3f}", f"{t_dense:.3f}", f"{ratio:.2f}x",
                       f"{mem_ours:.0f}", f"{mem_dense:.0f}"])
    print(f"B={args.batch} C={args.classes} E={args.dim} float32 CPU, threads={torch.get_num_threads()}, "
          f"repeats={args.repeats}")
    print(table)


if __name__ == "__main__":
    main()
