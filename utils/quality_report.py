"""``--quality_report`` of the evaluation scripts: the quality measures of saved features, the
error-versus-reject curves of each, and their CSV files, PNG plot and pAUC table.

The metrics are :mod:`utils.quality`; this module only arranges them. A report is a nested dict
``{group (pair set / protocol): {measure: {operating point: RejectCurve}}}``; the measures are

* ``norm``: the image's feature norm (mean of the norms of the image and its mirror, before fusion);
* ``indicator``: AdaFace's quality indicator of that norm from the checkpoint's statistics (only
  when the checkpoint has an AdaFace head);
* ``laplacian``: the image baseline, variance of the Laplacian of the aligned crop;
* ``random``: the expected curve of random rejection;
* in the demo also ``untrained norm`` and ``oracle`` (the generator's recorded quality).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Dict, Mapping, Sequence

import numpy as np
import pandas as pd
from prettytable import PrettyTable

from utils.eval_common import SHARPNESS, VIEW_NORMS, FeatureSet
from utils.files import write_atomically
from utils.quality import (DEFAULT_FMRS, DEFAULT_MAX_REJECT, NormStatistics, RejectCurve, error_versus_reject,
                           identification_versus_reject, image_norm, pair_quality, random_rejection)

logger = logging.getLogger(__name__)

NORM, INDICATOR, LAPLACIAN, RANDOM = "norm", "indicator", "laplacian", "random"
GRID_STEP = 0.005            # the CSV lists each curve at 0, 0.005, ..., max_reject
PLOT_POINTS = 2001

Report = Dict[str, Dict[str, Dict[str, RejectCurve]]]


def fmr_label(fmr: float) -> str:
    return f"FMR={fmr:g}"


def image_quality_measures(feature_set: FeatureSet, source: str = "") -> Dict[str, np.ndarray]:
    """Per-image quality scores of a feature set, ``{measure: (N,)}`` (see the module docstring).

    Files saved before these scripts kept the per-view norms hold only the fused norm: it is used
    as the norm then (a warning says so) and the indicator is omitted.
    """
    measures: Dict[str, np.ndarray] = {}
    views = feature_set.arrays.get(VIEW_NORMS)
    if views is None:
        logger.warning("%s: no per-view norms saved; the quality report uses the fused norm and omits the "
                       "indicator (re-save the features with this version to get both)", source or "features")
        measures[NORM] = np.asarray(feature_set.norms, np.float64).reshape(-1)
    else:
        measures[NORM] = image_norm(views)
        stats = feature_set.meta.get("norm_statistics")
        if isinstance(stats, Mapping):
            measures[INDICATOR] = NormStatistics(float(stats["batch_mean"]), float(stats["batch_std"]),
                                                 float(stats["h"])).indicator(measures[NORM])
        else:
            logger.warning("%s: the checkpoint has no AdaFace norm statistics; the quality indicator is "
                           "omitted from the report", source or "features")
    sharp = feature_set.arrays.get(SHARPNESS)
    if sharp is not None:
        measures[LAPLACIAN] = np.asarray(sharp, np.float64).reshape(-1)
    return measures


def verification_report(scores: np.ndarray, labels: np.ndarray, quality_1: Mapping[str, np.ndarray],
                        quality_2: Mapping[str, np.ndarray], fmrs: Sequence[float] = DEFAULT_FMRS,
                        max_reject: float = DEFAULT_MAX_REJECT) -> Dict[str, Dict[str, RejectCurve]]:
    """``{measure: {"FMR=..": curve}}`` of one pair list, pair quality = min of the two sides',
    plus ``random``."""
    out: Dict[str, Dict[str, RejectCurve]] = {}
    for i, measure in enumerate(quality_1):
        curves = error_versus_reject(scores, labels, pair_quality(quality_1[measure], quality_2[measure]),
                                     fmr=fmrs, max_reject=max_reject, warn=i == 0)
        out[measure] = {fmr_label(f): c for f, c in curves.items()}
    first = next(iter(out.values()))
    out[RANDOM] = {k: random_rejection(c) for k, c in first.items()}
    return out


def pair_list_report(features: np.ndarray, issame: np.ndarray, measures: Mapping[str, np.ndarray],
                     fmrs: Sequence[float] = DEFAULT_FMRS, max_reject: float = DEFAULT_MAX_REJECT
                     ) -> Dict[str, Dict[str, RejectCurve]]:
    """:func:`verification_report` of a pair set whose images ``2i`` and ``2i+1`` form pair ``i``
    (the ``.bin`` layout); the score is the cosine similarity of the two features."""
    feats = np.asarray(features, np.float64)
    feats = feats / np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12)
    scores = np.sum(feats[0::2] * feats[1::2], axis=1)
    return verification_report(scores, np.asarray(issame, bool), {m: q[0::2] for m, q in measures.items()},
                               {m: q[1::2] for m, q in measures.items()}, fmrs, max_reject)


def identification_report(score_mat: np.ndarray, label_mat: np.ndarray, probe_quality: Mapping[str, np.ndarray],
                          max_reject: float = DEFAULT_MAX_REJECT) -> Dict[str, Dict[str, RejectCurve]]:
    """``{measure: {"rank-1": curve}}``: 1 - rank-1 against the fraction of probes rejected."""
    out = {m: {"rank-1": identification_versus_reject(score_mat, label_mat, q, max_reject)}
           for m, q in probe_quality.items()}
    out[RANDOM] = {"rank-1": random_rejection(next(iter(out.values()))["rank-1"])}
    return out


def report_rows(report: Report) -> list:
    """One dict per (group, operating point, measure): pAUC and the curve's summary numbers."""
    rows = []
    for group, measures in report.items():
        for measure, curves in measures.items():
            for point, c in curves.items():
                rows.append({"set": group, "operating_point": point, "measure": measure, "pauc": c.pauc,
                             "error_at_0": float(c.error[0]), "error_at_max_reject": float(c.at(c.max_reject)),
                             "max_reject": c.max_reject, "items": c.items, "counted": c.counted,
                             "threshold": c.threshold, "achieved_fmr": c.achieved_fmr, "impostors": c.impostors})
    return rows


def format_pauc_table(report: Report) -> str:
    """pAUC (%) per group and operating point (rows) and measure (columns)."""
    measures: list = []
    for group in report.values():
        measures += [m for m in group if m not in measures]
    table = PrettyTable(["set", "operating point", "error at 0 (%)"] + [f"{m} pAUC (%)" for m in measures])
    for group, by_measure in report.items():
        points = list(dict.fromkeys(p for curves in by_measure.values() for p in curves))
        for point in points:
            first = next(c[point] for c in by_measure.values() if point in c)
            cells = [f"{100 * by_measure[m][point].pauc:.2f}" if point in by_measure.get(m, {}) else "-"
                     for m in measures]
            table.add_row([group, point, f"{100 * first.error[0]:.2f}"] + cells)
    return table.get_string()


def _save_plot(path: Path, report: Report, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    panels = [(g, p) for g, by_measure in report.items()
              for p in dict.fromkeys(p for curves in by_measure.values() for p in curves)]
    cols = max(len(dict.fromkeys(p for _, p in panels)), 1)
    rows = int(np.ceil(len(panels) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    for ax, (group, point) in zip(axes.ravel(), panels):
        for measure, curves in report[group].items():
            if point not in curves:
                continue
            c = curves[point]
            keep = c.reject <= c.max_reject + 1e-12
            xs = np.r_[c.reject[keep], c.max_reject]
            if len(xs) > PLOT_POINTS:          # millions of pairs (IJB-C): a fine grid is enough
                xs = np.linspace(0.0, c.max_reject, PLOT_POINTS)
            ys = c.at(xs)
            ax.plot(xs, ys, lw=1.4, ls="--" if measure == RANDOM else "-",
                    label=f"{measure} (pAUC {100 * c.pauc:.2f}%)")
        ax.set_title(f"{group}, {point}", fontsize=9)
        ax.set_xlabel("fraction rejected (lowest quality first)")
        ax.set_ylabel("FNMR" if point.startswith("FMR") else "1 - rank-1")
        ax.grid(True, linestyle=":", linewidth=0.6)
        ax.legend(fontsize=7)
    for ax in axes.ravel()[len(panels):]:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    write_atomically(path, lambda f: fig.savefig(f, dpi=110, format="png"))
    plt.close(fig)


def write_quality_report(output_dir: Path, report: Report, stem: str = "quality", title: str = "") -> Dict[str, Path]:
    """Write ``<stem>_pauc.csv`` (one line per curve), ``<stem>_evrc.csv`` (every curve at the rejected
    fractions 0, 0.005, ..., max_reject) and ``<stem>_evrc.png``; print nothing, return the paths."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = {"pauc": output_dir / f"{stem}_pauc.csv", "evrc": output_dir / f"{stem}_evrc.csv",
             "plot": output_dir / f"{stem}_evrc.png"}
    pd.DataFrame(report_rows(report)).to_csv(paths["pauc"], index=False)
    lines = []
    for group, measures in report.items():
        for measure, curves in measures.items():
            for point, c in curves.items():
                grid = np.round(np.arange(0.0, c.max_reject + GRID_STEP / 2, GRID_STEP), 6)
                lines += [{"set": group, "operating_point": point, "measure": measure, "reject_fraction": r,
                           "error": e} for r, e in zip(grid, c.at(grid))]
    pd.DataFrame(lines).to_csv(paths["evrc"], index=False)
    _save_plot(paths["plot"], report, title or "error versus reject")
    return paths


def print_quality_report(report: Report, paths: Mapping[str, Path], what: str) -> str:
    """The pAUC table as printed by the scripts (returned too)."""
    first = next(c for m in report.values() for cs in m.values() for c in cs.values())
    text = (f"\nquality: {what}; pAUC = mean error over the first {100 * first.max_reject:g}% rejected "
            f"(lower is better; random rejection = error at 0)  [{paths['plot']}]\n{format_pauc_table(report)}")
    print(text)
    return text
