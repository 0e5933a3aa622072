#!/usr/bin/env python3
"""IJB-B / IJB-C evaluation: 1:1 verification (TAR@FAR) and 1:N identification.

The protocol of the published ``validation_mixed/validate_IJB_BC.py`` (InsightFace's IJB helpers):

* every meta file is parsed completely and cross-checked first (:func:`utils.ijb.read_ijb_protocol`);
  a bad line is reported (file, line, what to do) before any image is embedded;
* every image of ``loose_crop/`` is aligned with its 5 landmarks of ``*_name_5pts_score.txt``
  (similarity transform onto the 112x112 reference points) and embedded, with the flipped image
  fused by ``--fusion_method`` when ``--use_flip_test``;
* with ``--fusion_method pre_norm_vector_add`` the (normalised) image features are multiplied by
  their norms before template aggregation, as the published script does, so that low-quality images
  weigh less in a template;
* the faceness scores of the landmark file are read but not used (AdaFace's script does not use
  them; InsightFace's optional detector-score weighting is off there);
* template features, pair scores and the TAR@FAR table come from :mod:`utils.ijb`; 1:N reports
  rank-1/5/10 and TPIR at FPIR 0.01/0.1 per gallery and their mean, and, as the published script's
  number, rank-k over the two galleries merged.

Outputs (``--output_dir``, default ``result/<dataset>/<model>``): ``verification_tar_at_far.csv``,
``roc_<dataset>.png``, ``identification.csv`` and, with ``--save_features``, ``features.npz``, which
``--features_path`` reads to re-run the metrics without the model.

``--quality_report`` measures the feature norm as a quality score (:mod:`utils.quality`): a
template's quality is the mean over its media of the mean quality of each media's images (the
aggregation of the template feature), a pair's the lower of its two templates'. It writes
``quality_pauc.csv``, ``quality_evrc.csv`` and ``quality_evrc.png`` (1:1 FNMR at FMR 1e-3 and 1e-4
against the fraction of pairs rejected; 1:N 1 - rank-1 against the fraction of probe templates
rejected, per gallery) and prints the pAUC table.

Example::

    python validation_mixed/validate_IJB_BC.py --dataset_name IJBC --data_root /data/IJB \\
        --model_name ir101_webface12m --device cuda --batch_size 256 --save_features
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Dict, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib import pyplot as plt  # noqa: E402
from prettytable import PrettyTable  # noqa: E402
from sklearn.metrics import roc_curve  # noqa: E402

from utils.device import resolve_device  # noqa: E402
from utils.eval_common import (ImageListDataset, add_device_argument, add_feature_arguments,  # noqa: E402
                               add_fusion_arguments, add_loader_arguments, add_model_arguments, add_quality_arguments,
                               check_files_exist,
                               compute_or_load_features, file_safe, model_specs_from_args, prepare_output_dir,
                               run_cli, run_label)
from utils.identification import rank_rates  # noqa: E402
from utils.ijb import (FAR_TARGETS, IJBProtocol, format_tar_far_table, identification,  # noqa: E402
                       ijb_meta_paths, image2template_feature, image_features_for_templates, mean_over_galleries,
                       read_ijb_protocol, select_template_features, tar_at_far, template_rows, verification)
from utils.quality import template_quality  # noqa: E402
from utils.quality_report import (identification_report, image_quality_measures,  # noqa: E402
                                  print_quality_report, verification_report, write_quality_report)

logger = logging.getLogger("validate_IJB_BC")

RANKS = (1, 5, 10)
FPIRS = (0.01, 0.1)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="IJB-B / IJB-C 1:1 verification and 1:N identification",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--dataset_name", default="IJBC", type=str.upper, choices=("IJBB", "IJBC"))
    parser.add_argument("--data_root", required=True,
                        help="folder holding IJBB/ and/or IJBC/ (loose_crop/ and meta/ of InsightFace's release)")
    add_model_arguments(parser)
    add_device_argument(parser)
    add_loader_arguments(parser, batch_size=128, num_workers=4)
    add_fusion_arguments(parser, use_flip_default=True)
    parser.add_argument("--output_dir", default=None, help="default: result/<dataset_name>/<model>")
    add_feature_arguments(parser)
    add_quality_arguments(parser)
    return parser


def save_roc_plot(path: Path, scores: np.ndarray, labels: np.ndarray, title: str, label: str) -> None:
    fpr, tpr, _ = roc_curve(labels, scores)
    fig, ax = plt.subplots(figsize=(6, 5))
    ax.plot(fpr, tpr, lw=1.5, label=label)
    ax.set_xscale("log")
    ax.set_xlim(1e-6, 1.0)
    ax.set_ylim(0.0, 1.0)
    ax.set_xlabel("False Positive Rate")
    ax.set_ylabel("True Positive Rate")
    ax.set_title(title)
    ax.grid(True, which="both", linestyle=":", linewidth=0.6)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def identification_results(template_feats: np.ndarray, unique_templates: np.ndarray,
                           protocol: IJBProtocol) -> Dict[str, Dict[str, float]]:
    """Per gallery, their mean, and the rank-k of the merged gallery (the published number)."""
    probe_t, probe_s = protocol.probe
    probe_feats = select_template_features(template_feats, unique_templates, probe_t)
    rows: Dict[str, Dict[str, float]] = {}
    gallery_feats, gallery_subjects = [], []
    for name, (g_t, g_s) in protocol.galleries.items():
        g_feats = select_template_features(template_feats, unique_templates, g_t)
        rows[name] = identification(g_feats, g_s, probe_feats, probe_s, ranks=RANKS, fpirs=FPIRS)
        gallery_feats.append(g_feats)
        gallery_subjects.append(g_s)
    rows["mean"] = mean_over_galleries(list(rows.values()))
    merged_feats, merged_subjects = np.concatenate(gallery_feats), np.concatenate(gallery_subjects)
    labels = probe_s[:, None] == merged_subjects[None, :]
    merged = rank_rates(probe_feats @ merged_feats.T, labels, RANKS)
    merged["num_mated"] = int(labels.any(axis=1).sum())
    merged["num_nonmated"] = int((~labels.any(axis=1)).sum())
    rows["merged"] = merged
    return rows


def quality_results(feature_set, template_feats: np.ndarray, unique_templates: np.ndarray, protocol: IJBProtocol,
                    scores: np.ndarray, name: str) -> dict:
    """``--quality_report``: 1:1 EVRC over template pairs and 1:N rank-1 error against rejected probe
    templates (per gallery), with template quality from the images' (:func:`utils.quality.template_quality`)."""
    measures = image_quality_measures(feature_set, name)
    template_q = {}
    for measure, image_q in measures.items():
        templates, q = template_quality(image_q, protocol.templates, protocol.medias)
        if not np.array_equal(templates, unique_templates):
            raise AssertionError("template quality and template features disagree on the templates")
        template_q[measure] = q
    rows1 = template_rows(unique_templates, protocol.p1, "pair templates")
    rows2 = template_rows(unique_templates, protocol.p2, "pair templates")
    report = {f"{name} 1:1": verification_report(scores, protocol.labels, {m: q[rows1] for m, q in template_q.items()},
                                                 {m: q[rows2] for m, q in template_q.items()})}
    probe_t, probe_s = protocol.probe
    probe_feats = select_template_features(template_feats, unique_templates, probe_t)
    probe_rows = template_rows(unique_templates, probe_t, "probe templates")
    for gallery, (g_t, g_s) in protocol.galleries.items():
        g_feats = select_template_features(template_feats, unique_templates, g_t)
        report[f"{name} 1:N {gallery}"] = identification_report(
            probe_feats @ g_feats.T, probe_s[:, None] == g_s[None, :],
            {m: q[probe_rows] for m, q in template_q.items()})
    return report


def format_identification_table(rows: Dict[str, Dict[str, float]]) -> PrettyTable:
    columns = [f"rank-{r}" for r in RANKS] + [f"TPIR@FPIR={f:g}" for f in FPIRS]
    table = PrettyTable(["gallery"] + columns + ["mated probes", "non-mated probes"])
    for name, row in rows.items():
        title = "G1+G2 merged (published)" if name == "merged" else name
        cells = [f"{100 * row[c]:.2f}" if c in row and np.isfinite(row[c]) else "-" for c in columns]
        table.add_row([title] + cells + [row.get("num_mated", "-"), row.get("num_nonmated", "-")])
    return table


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, object]:
    args = build_parser().parse_args(argv)
    name = args.dataset_name
    spec = None if args.features_path else model_specs_from_args(args)[0]
    parts = ("verification", "identification") if args.features_path else \
        ("landmarks", "verification", "identification")
    if not args.features_path:
        resolve_device(args.device)
    paths = ijb_meta_paths(args.data_root, name, parts=parts)      # one error lists every missing meta file
    # every meta file is parsed and cross-checked before any image is embedded
    protocol = read_ijb_protocol(paths, read_landmark_file=not args.features_path)
    images = protocol.images
    if not args.features_path:
        check_files_exist(paths["image_dir"], list(images), f"{name} images")
    label = run_label(args, spec)
    output_dir = prepare_output_dir(args.output_dir or Path("result") / name / file_safe(label))
    dataset = None
    if not args.features_path:
        dataset = ImageListDataset([paths["image_dir"] / i for i in images], protocol.landmarks).check_first()

    feature_set = compute_or_load_features(args, name, list(images), lambda: dataset, spec, output_dir,
                                           desc=f"{name} images")
    img_feats = image_features_for_templates(feature_set.features, feature_set.norms, feature_set.fusion_method)

    # 1:1 verification
    template_feats, unique_templates = image2template_feature(img_feats, protocol.templates, protocol.medias)
    p1, p2, pair_labels = protocol.p1, protocol.p2, protocol.labels
    scores = verification(template_feats, unique_templates, p1, p2, progress=True)
    tar = tar_at_far(scores, pair_labels, FAR_TARGETS)
    tar_table = format_tar_far_table({label: tar}, FAR_TARGETS)
    print(f"\n{name} 1:1 verification, TAR (%) at FAR:")
    print(tar_table)
    pd.DataFrame([{"model": label, **{f"TAR@FAR={far:g}": 100 * v for far, v in tar.items()}}]).to_csv(
        output_dir / "verification_tar_at_far.csv", index=False)
    save_roc_plot(output_dir / f"roc_{name}.png", scores, pair_labels, f"ROC on {name}", label)

    # 1:N identification
    id_rows = identification_results(template_feats, unique_templates, protocol)
    print(f"\n{name} 1:N identification (%):")
    print(format_identification_table(id_rows))
    pd.DataFrame([{"gallery": k, **v} for k, v in id_rows.items()]).to_csv(
        output_dir / "identification.csv", index=False)

    summary = PrettyTable(["dataset", "model", "images", "templates", "pairs", "TAR@FAR=1e-4 (%)",
                           "rank-1 (%)", "TPIR@FPIR=0.01 (%)"])
    summary.add_row([name, label, len(images), len(unique_templates), len(p1), f"{100 * tar[1e-4]:.2f}",
                     f"{100 * id_rows['mean']['rank-1']:.2f}",
                     f"{100 * id_rows['mean']['TPIR@FPIR=0.01']:.2f}"])
    print(f"\nsummary (gallery mean for 1:N; results in {output_dir}):")
    print(summary)
    quality = None
    if args.quality_report:
        quality = quality_results(feature_set, template_feats, unique_templates, protocol, scores, name)
        paths = write_quality_report(output_dir, quality, title=f"{label} on {name}: error versus reject")
        print_quality_report(quality, paths, f"{label} on {name}, feature norm as face quality (template quality "
                                             f"= mean over media of the media's mean)")
    return {"tar_at_far": tar, "identification": id_rows, "scores": scores, "labels": pair_labels,
            "output_dir": output_dir, "fusion_method": feature_set.fusion_method, "quality": quality}


if __name__ == "__main__":
    sys.exit(run_cli(main))
