"""Benchmark of the training data path (data.py, utils.recordio, utils.augment).

1. Open time of a 1,000,000-image face pack (tiny identical JPEG payloads, written to a temporary
   folder and deleted afterwards): the label index built from the pack (not cached), loaded from
   its cache, and a whole ``RecordFaceDataset`` opened with the cache present.
2. Images/s through the training DataLoader from ``train.rec`` and from the image folder of a demo
   data set, with all three augmentations at p=0.2, the flip, and 2 workers.

    python bench/bench_data.py [--records 1000000] [--workers 2] [--batch_size 64] [--epochs 2]
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from prettytable import PrettyTable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data import DataModule, RecordFaceDataset  # noqa: E402
from utils.demo_data import generate_demo_data  # noqa: E402
from utils.image import encode_jpeg  # noqa: E402
from utils.recordio import load_face_pack_index, write_face_pack  # noqa: E402


def _load() -> str:
    try:
        return "/".join(f"{v:.1f}" for v in os.getloadavg())
    except OSError:  # pragma: no cover
        return "?"


def bench_open(work: Path, records: int, per_identity: int) -> list:
    payload = encode_jpeg(np.full((8, 8, 3), 128, np.uint8), quality=50)
    rec = work / "big" / "train.rec"
    rec.parent.mkdir(parents=True)
    t = time.perf_counter()
    n = write_face_pack(rec, ((i // per_identity, payload) for i in range(records)))
    write_s = time.perf_counter() - t
    size_mb = (rec.stat().st_size + rec.with_suffix(".idx").stat().st_size) / 2 ** 20
    cache = work / "cache"
    rows = [["write pack (for the benchmark)", f"{n:,} images, {size_mb:.0f} MiB", write_s]]
    t = time.perf_counter()
    index = load_face_pack_index(rec, cache_dir=cache, show_progress=False)
    rows.append(["label index, not cached", f"{index.num_classes:,} identities",
                 time.perf_counter() - t])
    t = time.perf_counter()
    load_face_pack_index(rec, cache_dir=cache, show_progress=False)
    rows.append(["label index, cached", "", time.perf_counter() - t])
    t = time.perf_counter()
    dataset = RecordFaceDataset(rec, cache_dir=cache, show_progress=False)
    rows.append(["RecordFaceDataset open (cached index)", f"{len(dataset):,} samples",
                 time.perf_counter() - t])
    shutil.rmtree(rec.parent)
    shutil.rmtree(cache, ignore_errors=True)
    return rows


def bench_loader(root: Path, use_mxrecord: bool, workers: int, batch_size: int, epochs: int
                 ) -> list:
    dm = DataModule(data_root=root, train_data_path=".", val_data_path=".",
                    batch_size=batch_size, num_workers=workers, low_res_augmentation_prob=0.2,
                    crop_augmentation_prob=0.2, photometric_augmentation_prob=0.2,
                    use_mxrecord=use_mxrecord, output_dir=None, seed=0,
                    label_cache_dir=root / "label_cache")
    loader = dm.train_dataloader()
    rates = []
    for _ in range(epochs + 1):          # the first epoch (worker start-up) is a warm-up
        t = time.perf_counter()
        count = sum(len(labels) for _, labels in loader)
        rates.append(count / (time.perf_counter() - t))
    return ["train.rec" if use_mxrecord else "imgs/ folder", workers, batch_size, count,
            rates[0], float(np.median(rates[1:])), max(rates[1:])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--per_identity", type=int, default=100)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--num_train_ids", type=int, default=120)
    parser.add_argument("--imgs_per_id", type=int, default=25)
    args = parser.parse_args()
    print(f"load average before: {_load()}")
    with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
        work = Path(tmp)
        open_rows = bench_open(work, args.records, args.per_identity)
        table = PrettyTable(["step", "size", "seconds"])
        table.align = "l"
        for step, size, seconds in open_rows:
            table.add_row([step, size, f"{seconds:.3f}"])
        print(table)

        root = generate_demo_data(work / "demo", seed=0, num_train_ids=args.num_train_ids,
                                  imgs_per_id=args.imgs_per_id, pairs_per_set=0,
                                  make_memfiles=False, show_progress=False)["root"]
        table = PrettyTable(["source", "workers", "batch", "images/epoch",
                             "first epoch img/s", "median img/s", "best img/s"])
        for use_mxrecord in (True, False):
            row = bench_loader(root, use_mxrecord, args.workers, args.batch_size, args.epochs)
            table.add_row(row[:4] + [f"{v:.0f}" for v in row[4:]])
        print("training DataLoader, crop/low-res/photometric p=0.2, flip, "
              f"{args.workers} workers")
        print(table)
    print(f"load average after: {_load()}")


if __name__ == "__main__":
    main()
