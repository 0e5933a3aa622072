"""CPU images/s of `inference.py`'s pipeline: decode, MTCNN detection, alignment, embedding.

Stages, each timed per image on the sample photos of ``face_alignment/sample_images.py``
(astronaut 512x512, camera 512x512, grace_hopper 600x512, one face each):

* decode: ``utils.image.load_image_file`` (JPEG -> RGB array);
* detection: ``MTCNN.detect`` (P-Net pyramid, R-Net, O-Net; AdaFace settings);
* alignment: ``face_alignment.similarity.align_face`` (5-point similarity warp to 112x112);
* to_input: ``utils.image.to_input`` (RGB PIL -> BGR tensor in [-1, 1]);
* embedding: ``ir_50`` (random weights: the speed is that of the published network), batch 1
  as the CLI's default, with flip fusion (two forwards), and batched;
* end to end: decode + detection + alignment + to_input + ir_50 at batch 1, one image at a time.

Every stage runs for each torch thread count given (``--threads``): on a shared machine the
small ops of MTCNN suffer from two OpenMP threads far more than the large convolutions of ir_50.
Each configuration: one warm-up pass over the photos, then ``--repeats`` timed passes; the table
shows the median and fastest ms per image and the images/s of the median.

    python bench/bench_inference.py [--threads 1 2] [--repeats 5] [--batch_size 16] [--onnx]
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, List

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from PIL import Image  # noqa: E402
from prettytable import PrettyTable  # noqa: E402

from face_alignment.align import get_detector  # noqa: E402
from face_alignment.sample_images import ensure_test_images  # noqa: E402
from face_alignment.similarity import align_face  # noqa: E402
from net import build_model  # noqa: E402
from utils.features import embed_batch  # noqa: E402
from utils.image import load_image_file, to_input  # noqa: E402


def _time_per_image(fn: Callable[[], int], repeats: int) -> List[float]:
    """Run ``fn`` (which returns how many images it processed) once to warm up, then ``repeats``
    times; seconds per image of each timed run."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        count = fn()
        times.append((time.perf_counter() - start) / count)
    return times


def _ms(seconds: float) -> str:
    ms = 1000 * seconds
    return f"{ms:.1f}" if ms >= 10 else f"{ms:.2f}" if ms >= 0.1 else f"{ms:.3f}"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def build_stages(photos: List[Path], batch_size: int, use_onnx: bool, tmp: Path):
    """Name -> closure over prepared inputs; each closure processes all photos once (or a batch)."""
    detector = get_detector()
    model = build_model("ir_50").eval()
    rgbs = [load_image_file(p) for p in photos]
    detections = [detector.detect(rgb) for rgb in rgbs]
    if any(len(d) != 1 for d in detections):
        raise RuntimeError(f"expected one face per sample photo, found {[len(d) for d in detections]}")
    landmarks = [d.landmarks[0] for d in detections]
    aligned = [Image.fromarray(align_face(rgb, lm)) for rgb, lm in zip(rgbs, landmarks)]
    inputs = [to_input(face) for face in aligned]
    batch = torch.cat([inputs[i % len(inputs)] for i in range(batch_size)])

    def decode() -> int:
        for p in photos:
            load_image_file(p)
        return len(photos)

    def detect() -> int:
        for rgb in rgbs:
            detector.detect(rgb)
        return len(rgbs)

    def align() -> int:
        for rgb, lm in zip(rgbs, landmarks):
            align_face(rgb, lm)
        return len(rgbs)

    def convert() -> int:
        for face in aligned:
            to_input(face)
        return len(aligned)

    def embed_one() -> int:
        for x in inputs:
            embed_batch(model, x, use_flip=False)
        return len(inputs)

    def embed_one_flip() -> int:
        for x in inputs:
            embed_batch(model, x, use_flip=True, fusion_method="pre_norm_vector_add")
        return len(inputs)

    def embed_batched() -> int:
        embed_batch(model, batch, use_flip=False)
        return len(batch)

    def end_to_end() -> int:
        for p in photos:
            rgb = load_image_file(p)
            det = detector.detect(rgb)
            face = Image.fromarray(align_face(rgb, det.landmarks[0]))
            embed_batch(model, to_input(face), use_flip=False)
        return len(photos)

    stages = [
        ("decode (JPEG -> RGB)", decode),
        ("detection (MTCNN)", detect),
        ("alignment (similarity warp)", align),
        ("to_input (BGR tensor)", convert),
        ("ir_50 embedding, batch 1", embed_one),
        ("ir_50 embedding + flip, batch 1", embed_one_flip),
        (f"ir_50 embedding, batch {batch_size}", embed_batched),
        ("end to end, batch 1", end_to_end),
    ]
    if use_onnx:
        from utils.onnx_export import export_onnx, load_onnx_session, run_onnx
        session = load_onnx_session(export_onnx(model, tmp / "ir_50.onnx"))

        def onnx_one() -> int:
            for x in inputs:
                run_onnx(session, x)
            return len(inputs)

        def onnx_batched() -> int:
            run_onnx(session, batch)
            return len(batch)

        stages += [("ir_50 onnxruntime, batch 1", onnx_one),
                   (f"ir_50 onnxruntime, batch {batch_size}", onnx_batched)]
    return stages


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2],
                        help="torch thread counts to measure (default: 1 2)")
    parser.add_argument("--repeats", type=int, default=5, help="timed passes per stage")
    parser.add_argument("--batch_size", type=int, default=16, help="batch of the batched embedding")
    parser.add_argument("--onnx", action="store_true",
                        help="also time the exported ir_50 in onnxruntime (its own thread pool)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        photos = ensure_test_images(Path(tmp) / "photos")
        stages = build_stages(photos, args.batch_size, args.onnx, Path(tmp))
        load_before = os.getloadavg()[0]
        table = PrettyTable(["stage", "threads", "median ms/img", "fastest ms/img",
                             "images/s (median)"])
        for threads in args.threads:
            torch.set_num_threads(threads)
            for name, fn in stages:
                times = _time_per_image(fn, args.repeats)
                median = statistics.median(times)
                table.add_row([name, threads, _ms(median), _ms(min(times)), f"{1 / median:.1f}"])
                print(f"  {name}, {threads} thread(s): {1000 * median:.1f} ms/img", flush=True)
        load_after = os.getloadavg()[0]

    table.align = "r"
    table.align["stage"] = "l"
    print(f"\n{_cpu_name()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}, photos {[p.name for p in photos]}, "
          f"repeats {args.repeats}; 1-min load average {load_before:.1f} -> {load_after:.1f}")
    print(table)


if __name__ == "__main__":
    main()
