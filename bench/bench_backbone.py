"""CPU throughput of the IResNet backbones: training step and inference, with and without channels_last.

A training step is forward + a small cross-entropy classifier on the embedding + backward + SGD
step (train mode); inference is a no_grad forward in eval mode. Every configuration is warmed up,
then the timed repeats run round-robin over the configurations so that all of them see the same
machine load; the table reports the median time per batch and images/s.

    python bench/bench_backbone.py                                   # ir_18 and ir_50, batch 32
    python bench/bench_backbone.py --arch ir_50 --batch_size 16 --repeats 3
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from prettytable import PrettyTable  # noqa: E402

from net import ARCHITECTURES, build_model  # noqa: E402

NUM_CLASSES = 100


def make_step(arch: str, mode: str, channels_last: bool, batch_size: int) -> Callable[[], None]:
    """A closure running one training step or one inference batch of ``arch``."""
    torch.manual_seed(0)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = build_model(arch).to(memory_format=memory_format)
    x = torch.randn(batch_size, 3, 112, 112).contiguous(memory_format=memory_format)
    if mode == 'inference':
        model.eval()

        def infer() -> None:
            with torch.no_grad():
                model(x)
        return infer

    model.train()
    classifier = torch.nn.Linear(512, NUM_CLASSES, bias=False)
    labels = torch.randint(0, NUM_CLASSES, (batch_size,))
    optimizer = torch.optim.SGD(list(model.parameters()) + list(classifier.parameters()),
                                lr=0.01, momentum=0.9, weight_decay=5e-4)

    def train_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        embedding, _ = model(x)
        loss = F.cross_entropy(classifier(embedding) * 64.0, labels)
        loss.backward()
        optimizer.step()
    return train_step


def timed(step: Callable[[], None]) -> float:
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--arch', nargs='+', default=['ir_18', 'ir_50'], choices=ARCHITECTURES)
    parser.add_argument('--batch_size', type=int, default=32)
    parser.add_argument('--repeats', type=int, default=5, help='timed runs per configuration')
    parser.add_argument('--warmup', type=int, default=1, help='untimed runs per configuration')
    parser.add_argument('--modes', nargs='+', default=['train', 'inference'], choices=['train', 'inference'])
    args = parser.parse_args()

    configs = [(arch, mode, cl) for arch in args.arch for mode in args.modes for cl in (False, True)]
    load_before = os.getloadavg()
    steps = {}
    for config in configs:
        steps[config] = make_step(*config, batch_size=args.batch_size)
        for _ in range(args.warmup):
            steps[config]()
    times: dict[tuple, list[float]] = {config: [] for config in configs}
    for r in range(args.repeats):
        for config in configs:
            times[config].append(timed(steps[config]))
        print(f"repeat {r + 1}/{args.repeats} done", file=sys.stderr)
    load_after = os.getloadavg()

    table = PrettyTable(['arch', 'mode', 'memory format', 'median ms/batch', 'min ms/batch', 'images/s'])
    for arch, mode, cl in configs:
        t = times[(arch, mode, cl)]
        median = statistics.median(t)
        table.add_row([arch, mode, 'channels_last' if cl else 'contiguous', f"{median * 1e3:.0f}",
                       f"{min(t) * 1e3:.0f}", f"{args.batch_size / median:.1f}"])
    print(f"torch {torch.__version__}, {platform.machine()}, {os.cpu_count()} CPUs, "
          f"{torch.get_num_threads()} threads, batch {args.batch_size}, float32, "
          f"{args.warmup} warm-up + {args.repeats} timed runs each (round-robin)")
    print(f"load average (1 min) before {load_before[0]:.2f}, after {load_after[0]:.2f}")
    print(table)


if __name__ == '__main__':
    main()
