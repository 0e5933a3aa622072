"""Peak memory of saving and resuming the sharded head's checkpoint (published layout, E x C).

W gloo processes each hold a kernel shard and its SGD momentum (E x C_local, random values) and a
small stand-in backbone. ``save``: every rank gathers the head into a Lightning-style checkpoint
dict and rank 0 writes it, either

* ``memory`` -- the full kernel and momentum gathered into memory on rank 0 and written by
  Lightning's ``TorchCheckpointIO`` (which serialises into an in-memory buffer first), or
* ``disk``   -- gathered shard by shard into files and written by ``SafeCheckpointIO`` (what
  training does, ``utils/checkpoint_io.save_with_deferred_tensors``);

``load``: every rank reads that file and keeps its own columns, either with a full read
(``memory``) or mapped (``disk``: ``read_checkpoint(mmap=True)`` + ``own_checkpoint_tensors``).
Reported: growth of the peak resident set size (``ru_maxrss``, which counts mapped file pages
too: a mapped read of a row-major E x C record maps the whole file's page cache, whichever columns
are copied) and of the anonymous resident memory (``RssAnon``, sampled every 5 ms: the memory the
process itself holds) from just before the save / load to its end, rank 0 for the save, the
largest rank for the load; also in units of one full E x C float32 tensor. Each measurement runs
in fresh processes.

    python bench/bench_partial_fc_checkpoint.py --classes 500000 --world 4
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from bench_partial_fc import GIB, _peak_rss, proc_kib_field  # noqa: E402  (the same memory measure)

E = 512


def _rss_anon() -> int:
    return proc_kib_field("/proc/self/status", "RssAnon")


class _AnonPeak:
    """Largest anonymous resident memory (``RssAnon``: not file pages) seen by a 5 ms sampler."""

    def __enter__(self):
        import threading
        self.peak, self._stop = _rss_anon(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _rss_anon())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_anon())


class _Head:
    """What the checkpoint functions read of a sharded head."""

    def __init__(self, classes: int, world: int, rank: int) -> None:
        from head_sharded import shard_bounds
        self.classnum, self.world, self.rank, self.embedding_size = classes, world, rank, E
        self.start, self.stop = shard_bounds(classes, world, rank)
        self.group = None
        self.kernel = torch.rand(E, self.stop - self.start)


def worker(rank: int, cfg: dict, folder: str) -> None:
    from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

    from head_sharded import gather_head_checkpoint, own_checkpoint_tensors, shard_head_checkpoint
    from utils.checkpoint import read_checkpoint
    from utils.checkpoint_io import SafeCheckpointIO

    torch.set_num_threads(1)
    world, classes = cfg["world"], cfg["classes"]
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=world)
    head = _Head(classes, world, rank)
    backbone = torch.rand(4_000_000)                     # 16 MB stand-in for the backbone
    path = cfg["path"]
    result = {"rank": rank}
    if cfg["phase"] == "save":
        checkpoint = {"state_dict": {"model.weight": backbone, "head.kernel": head.kernel},
                      "optimizer_states": [{"state": {0: {"momentum_buffer": backbone.clone()},
                                                      1: {"momentum_buffer": torch.rand_like(head.kernel)}},
                                            "param_groups": [{"params": [0, 1]}]}]}
        dist.barrier()
        before, anon_before, t0 = _peak_rss(), _rss_anon(), time.perf_counter()
        with _AnonPeak() as anon:
            gather_head_checkpoint(checkpoint, head, 1, to_disk=cfg["mode"] == "disk", directory=folder)
            if rank == 0:
                io = SafeCheckpointIO() if cfg["mode"] == "disk" else TorchCheckpointIO()
                io.save_checkpoint(checkpoint, path)
            del checkpoint
            dist.barrier()
    else:
        dist.barrier()
        before, anon_before, t0 = _peak_rss(), _rss_anon(), time.perf_counter()
        with _AnonPeak() as anon:
            if cfg["mode"] == "disk":
                checkpoint = own_checkpoint_tensors(read_checkpoint(path, mmap=True), (E, classes))
            else:
                checkpoint = read_checkpoint(path)
            shard_head_checkpoint(checkpoint, head, 1)
            kept = checkpoint["state_dict"]["head.kernel"]
            assert kept.shape == head.kernel.shape
            del checkpoint, kept
            dist.barrier()
    result.update(seconds=time.perf_counter() - t0, growth=_peak_rss() - before,
                  anon_growth=anon.peak - anon_before)
    Path(folder, f"{cfg['phase']}{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def measure(phase: str, mode: str, classes: int, world: int, path: str) -> dict:
    with tempfile.TemporaryDirectory(dir=os.path.dirname(path)) as folder:
        cfg = dict(phase=phase, mode=mode, classes=classes, world=world, path=path)
        mp.spawn(worker, args=(cfg, folder), nprocs=world, join=True)
        ranks = [json.loads(Path(folder, f"{phase}{r}.json").read_text()) for r in range(world)]
    pick = (lambda key: ranks[0][key]) if phase == "save" else (lambda key: max(r[key] for r in ranks))
    return {"growth_gib": pick("growth") / GIB, "anon_gib": pick("anon_growth") / GIB,
            "seconds": max(r["seconds"] for r in ranks)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--classes", type=int, default=500_000)
    p.add_argument("--world", type=int, default=4)
    p.add_argument("--modes", nargs="+", default=["memory", "disk"], choices=["memory", "disk"])
    p.add_argument("--folder", default=None, help="where the checkpoints are written (default: a temporary folder)")
    args = p.parse_args()
    full = E * args.classes * 4 / GIB
    print(f"# torch {torch.__version__}, load average {os.getloadavg()}; one full E x C tensor = "
          f"{full:.2f} GiB, C = {args.classes}, W = {args.world}", flush=True)
    print("| phase | mode | peak RSS growth GiB (full tensors) | peak anonymous growth GiB (full tensors) "
          "| seconds |\n|---|---|---:|---:|---:|")
    with tempfile.TemporaryDirectory(dir=args.folder) as folder:
        for mode in args.modes:
            path = os.path.join(folder, f"{mode}.ckpt")
            for phase in ("save", "load"):
                r = measure(phase, mode, args.classes, args.world, path)
                print(f"| {phase} | {mode} | {r['growth_gib']:.2f} ({r['growth_gib'] / full:.2f}) | "
                      f"{r['anon_gib']:.2f} ({r['anon_gib'] / full:.2f}) | {r['seconds']:.1f} |", flush=True)
            os.unlink(path)
    print(f"# load average at the end {os.getloadavg()}", flush=True)


if __name__ == "__main__":
    main()
