"""IJB-C-sized 1:1 evaluation: template features, pair scores and the TAR@FAR table.

Synthetic data with the sizes of IJB-C (469,375 images x 512-d float32 features, 23,124 templates
= 3,531 enrollment + 19,593 verification templates, several medias each, 15,658,489 enrollment x
verification pairs of which 19,557 genuine). The vectorised functions of ``utils.ijb`` and the
plain loops that mirror the published helper (``*_reference``) run in the same process on the same
data; the results must agree (max abs difference asserted) and the table reports both timings.

    python bench/bench_eval.py                    # full IJB-C size (reference part takes minutes)
    python bench/bench_eval.py --scale 0.05       # small and quick
    python bench/bench_eval.py --skip_reference   # only the fast path
"""
from __future__ import annotations

import argparse
import platform
import resource
import sys
import time
from pathlib import Path
from typing import Dict, Tuple

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
from prettytable import PrettyTable  # noqa: E402

from utils.ijb import (format_tar_far_table, image2template_feature, image2template_feature_reference,  # noqa: E402
                       tar_at_far, verification, verification_reference)

SIGNAL = 0.15     # weight of the subject centre against unit-variance noise per image
IJBC = dict(images=469_375, enroll_templates=3_531, verif_templates=19_593, pairs=15_658_489, genuine=19_557)


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def make_data(scale: float, dim: int, seed: int) -> Dict[str, np.ndarray]:
    """Synthetic IJB-C-like protocol: features cluster by subject, so that the TAR@FAR table is meaningful."""
    rng = np.random.default_rng(seed)
    n_enroll = max(2, round(IJBC["enroll_templates"] * scale))
    n_verif = max(2, round(IJBC["verif_templates"] * scale))
    n_templates = n_enroll + n_verif
    n_images = max(n_templates, round(IJBC["images"] * scale))
    n_pairs = max(10, round(IJBC["pairs"] * scale))
    n_genuine = max(1, round(IJBC["genuine"] * scale))

    # template ids: unique, unsorted, with gaps; enrollment template i belongs to subject i
    template_ids = rng.choice(np.arange(1, 10 * n_templates), n_templates, replace=False)
    subject = np.concatenate([np.arange(n_enroll), rng.integers(0, n_enroll, n_verif)])

    # images grouped by template (as in the meta file); each template has 1 + Poisson(3) medias,
    # media ids drawn from a shared pool, so the same media id can occur in several templates
    per_template = 1 + np.bincount(rng.integers(0, n_templates, n_images - n_templates), minlength=n_templates)
    image_template = np.repeat(np.arange(n_templates), per_template)
    medias_per_template = 1 + rng.poisson(3, n_templates)
    local_media = (rng.random(n_images) * medias_per_template[image_template]).astype(np.int64)
    media_base = rng.integers(0, 4 * n_templates, n_templates)
    medias = media_base[image_template] + local_media
    templates = template_ids[image_template]

    centres = rng.standard_normal((n_enroll, dim), dtype=np.float32)
    feats = np.empty((n_images, dim), dtype=np.float32)
    for start in range(0, n_images, 65536):      # in chunks to keep the peak memory low
        stop = min(start + 65536, n_images)
        chunk = centres[subject[image_template[start:stop]]] * SIGNAL
        chunk += rng.standard_normal((stop - start, dim), dtype=np.float32)
        chunk /= np.linalg.norm(chunk, axis=1, keepdims=True)
        feats[start:stop] = chunk

    # enrollment x verification pairs: the genuine ones, then random impostor-dominated ones
    verif_rows = n_enroll + rng.integers(0, n_verif, n_genuine)
    impostor2 = n_enroll + rng.integers(0, n_verif, n_pairs - n_genuine)
    impostor1 = rng.integers(0, n_enroll, n_pairs - n_genuine)
    same = impostor1 == subject[impostor2]
    impostor1[same] = (impostor1[same] + 1) % n_enroll                # enrollment template i is subject i
    rows1 = np.concatenate([subject[verif_rows], impostor1])
    rows2 = np.concatenate([verif_rows, impostor2])
    labels = (subject[rows1] == subject[rows2]).astype(np.int64)
    return dict(feats=feats, templates=templates, medias=medias, p1=template_ids[rows1], p2=template_ids[rows2],
                labels=labels)


def timed(func, *args, **kwargs) -> Tuple[object, float]:
    start = time.perf_counter()
    result = func(*args, **kwargs)
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of the IJB-C sizes (default 1.0)")
    parser.add_argument("--dim", type=int, default=512, help="feature dimension (default 512)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip_reference", action="store_true", help="time only the fast functions")
    parser.add_argument("--also_gather", action="store_true",
                        help="also time verification(method='gather') (the path for sparse pair grids)")
    args = parser.parse_args()

    start = time.perf_counter()
    data = make_data(args.scale, args.dim, args.seed)
    print(f"data: {len(data['feats']):,} images x {args.dim}, {len(np.unique(data['templates'])):,} templates, "
          f"{len(data['p1']):,} pairs ({int(data['labels'].sum()):,} genuine); generated in "
          f"{time.perf_counter() - start:.1f} s; peak RSS {peak_rss_gib():.2f} GiB")

    tar_at_far(np.arange(4.0), np.array([0, 1, 0, 1]))            # warm-up (first-call costs)
    (feats, unique_templates), t_feat = timed(image2template_feature, data["feats"], data["templates"], data["medias"])
    scores, t_score = timed(verification, feats, unique_templates, data["p1"], data["p2"])
    tars, t_table = timed(tar_at_far, scores, data["labels"])
    rss_fast = peak_rss_gib()
    if args.also_gather:
        gathered, t_gather = timed(verification, feats, unique_templates, data["p1"], data["p2"], method="gather")
        print(f"verification(method='gather'): {t_gather:.2f} s, max |gather - auto| "
              f"{np.abs(gathered - scores).max():.2e}")
        del gathered

    results = {"fast": tars}
    if args.skip_reference:
        ref = dict(feat=None, score=None, table=None)
    else:
        (ref_feats, ref_unique), r_feat = timed(image2template_feature_reference, data["feats"], data["templates"],
                                                data["medias"])
        ref_scores, r_score = timed(verification_reference, ref_feats, ref_unique, data["p1"], data["p2"])
        ref_tars, r_table = timed(tar_at_far, ref_scores, data["labels"])
        results["reference"] = ref_tars
        assert np.array_equal(unique_templates, ref_unique)
        diff_feat = float(np.abs(feats - ref_feats).max())
        diff_score = float(np.abs(scores - ref_scores).max())
        diff_tar = max(abs(tars[far] - ref_tars[far]) for far in tars)
        assert diff_feat < 1e-5, f"template features differ by {diff_feat}"
        assert diff_score < 1e-5, f"scores differ by {diff_score}"
        assert diff_tar <= 1e-3, f"TAR@FAR differs by {diff_tar}"
        ref = dict(feat=(r_feat, diff_feat), score=(r_score, diff_score), table=(r_table, diff_tar))

    table = PrettyTable(["step", "fast (s)", "reference (s)", "speed-up", "max |fast - reference|"])
    for name, fast_time, key in [("template features", t_feat, "feat"), ("pair scores", t_score, "score"),
                                 ("TAR@FAR (roc_curve)", t_table, "table")]:
        if ref[key] is None:
            table.add_row([name, f"{fast_time:.2f}", "-", "-", "-"])
        else:
            ref_time, diff = ref[key]
            table.add_row([name, f"{fast_time:.2f}", f"{ref_time:.2f}", f"{ref_time / fast_time:.1f}x", f"{diff:.1e}"])
    if not args.skip_reference:
        fast_total, ref_total = t_feat + t_score, ref["feat"][0] + ref["score"][0]
        table.add_row(["features + scores", f"{fast_total:.2f}", f"{ref_total:.2f}",
                       f"{ref_total / fast_total:.1f}x", ""])
    print(f"machine: {platform.machine()}, {platform.processor() or 'cpu'}, numpy {np.__version__}; "
          f"peak RSS after fast path {rss_fast:.2f} GiB, at the end {peak_rss_gib():.2f} GiB")
    print(table)
    print(format_tar_far_table(results))


if __name__ == "__main__":
    main()
