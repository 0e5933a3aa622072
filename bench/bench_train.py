"""End-to-end training throughput on the CPU (data loading, augmentation, backbone, head, SGD).

Runs the real training stack (``data.DataModule`` -> ``train_val.Trainer`` -> ``pl.Trainer``) on the
demo data for a number of batches and reports images/s over the batches after the warm-up.

    python bench/bench_train.py                       # ir_18, batch 32, 2 workers, AdaFace
    python bench/bench_train.py --arch ir_tiny --batch_size 64 --channels_last
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
from prettytable import PrettyTable  # noqa: E402

import data  # noqa: E402
from main import build_module  # noqa: E402
from utils.config import get_args  # noqa: E402
from utils.demo_data import ensure_demo_data  # noqa: E402


class BatchTimer(pl.Callback):
    """Wall time of every training batch (from the end of one to the end of the next)."""

    def __init__(self) -> None:
        self.stamps = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.stamps.append(time.perf_counter())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--arch", default="ir_18")
    parser.add_argument("--head", default="adaface")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--num_workers", type=int, default=2)
    parser.add_argument("--batches", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--channels_last", action="store_true")
    parser.add_argument("--use_mxrecord", action="store_true")
    parser.add_argument("--demo_dir", default="tmp/demo_data")
    opts = parser.parse_args()

    ensure_demo_data(opts.demo_dir, pairs_per_set=200)
    argv = ["--data_root", opts.demo_dir, "--train_data_path", ".", "--val_data_path", ".", "--gpus", "0",
            "--arch", opts.arch, "--head", opts.head, "--batch_size", str(opts.batch_size),
            "--num_workers", str(opts.num_workers), "--epochs", "1", "--m", "0.4", "--h", "0.333",
            "--low_res_augmentation_prob", "0.2", "--crop_augmentation_prob", "0.2",
            "--photometric_augmentation_prob", "0.2", "--output_dir", "tmp/bench_train"]
    if opts.channels_last:
        argv.append("--channels_last")
    if opts.use_mxrecord:
        argv.append("--use_mxrecord")
    args = get_args(argv)
    args.total_batch_size = args.batch_size
    dm = data.DataModule.from_args(args, seed=args.seed)
    module = build_module(args, dm)
    timer = BatchTimer()
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=1, limit_train_batches=opts.batches,
                         limit_val_batches=0, num_sanity_val_steps=0, logger=False,
                         enable_checkpointing=False, callbacks=[timer], enable_progress_bar=True)
    start = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    total = time.perf_counter() - start
    steps = [b - a for a, b in zip(timer.stamps[opts.warmup:], timer.stamps[opts.warmup + 1:])]
    median = statistics.median(steps)
    table = PrettyTable(["arch", "head", "batch", "workers", "source", "channels_last",
                         "median s/batch", "images/s", "timed batches"])
    table.add_row([opts.arch, opts.head, opts.batch_size, opts.num_workers,
                   "train.rec" if opts.use_mxrecord else "image folder", opts.channels_last,
                   f"{median:.3f}", f"{opts.batch_size / median:.1f}", len(steps)])
    print(f"CPU threads: {torch.get_num_threads()}, whole fit incl. start-up: {total:.1f} s")
    print(table)


if __name__ == "__main__":
    main()
