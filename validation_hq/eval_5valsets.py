#!/usr/bin/env python3
"""Verification accuracy of one or more checkpoints on the five high-quality pair sets.

LFW, CFP-FP, CPLFW, CALFW and AgeDB-30, with the protocol of the published training validation
(``utils.evaluate_utils``: 10 folds in order, best threshold on the squared distance of the other
nine folds): every image and its horizontal flip are embedded and fused with ``pre_norm_vector_add``
(``utils.features``), and the paper's table (LFW, CFPFP, CPLFW, CALFW, AGEDB, AVG) is printed.

The pair sets are read from ``<data_root>/<val_data_path>``: the memfiles of the AdaFace layout
(``<set>/memfile/mem_file.dat`` + ``<set>_list.npy``), or ``<set>.bin`` files, which are converted
to memfiles there first (as training does). Outputs (``--output_dir``, default ``result/5valsets``):
``results.csv`` (accuracy %, one line per model), ``results_detail.csv`` (accuracy, its standard
deviation over the folds and the mean best threshold per set) and, with ``--save_features``,
``<model>_features.npz`` per model (they hold the pair labels too, so ``--features_path`` needs no
data). ``--quality_report`` adds, per model and set, the error-versus-reject curves of the feature
norm as a quality score (pair quality = the lower of the two images'; ``utils.quality``):
``<model>_quality_pauc.csv``, ``<model>_quality_evrc.csv`` and ``<model>_quality_evrc.png``, and
prints the pAUC table; it works on saved features too.

Examples::

    python validation_hq/eval_5valsets.py --data_root /data --val_data_path faces_emore \\
        --model_name ir50_ms1mv2 ir101_webface12m --device cuda
    python validation_hq/eval_5valsets.py --data_root /data --ckpt_path runs/a/last.ckpt runs/b/last.ckpt --arch ir_50
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from data import ValidationPairDataset, ensure_pair_memfiles  # noqa: E402
from utils.device import resolve_device  # noqa: E402
from utils.eval_common import (EvalInputError, FeatureSet, add_device_argument, add_fusion_arguments,  # noqa: E402
                               add_loader_arguments, add_model_arguments, add_quality_arguments, embed_dataset,
                               file_safe, load_features, load_model, model_specs_from_args, prepare_output_dir,
                               quality_extras, run_cli, save_features)
from utils.evaluate_utils import evaluate_pair_set  # noqa: E402
from utils.pairsets import VAL_SET_NAMES  # noqa: E402
from utils.quality_report import (image_quality_measures, pair_list_report, print_quality_report,  # noqa: E402
                                  write_quality_report)
from utils.report import PAPER_COLUMNS, format_results_table, results_row  # noqa: E402

logger = logging.getLogger("eval_5valsets")

KIND = "5valsets"
STAGE = "test"
DEFAULT_SETS = tuple(key for key, _ in PAPER_COLUMNS)        # the paper's column order


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Verification accuracy on LFW, CFP-FP, CPLFW, CALFW, AgeDB-30",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data_root", default="", help="root folder of the data")
    parser.add_argument("--val_data_path", default="faces_emore",
                        help="folder of the pair sets (memfiles or .bin), relative to --data_root")
    parser.add_argument("--set_names", nargs="+", default=list(DEFAULT_SETS),
                        help=f"pair sets to evaluate (known: {', '.join(VAL_SET_NAMES)})")
    add_model_arguments(parser, multiple=True)
    add_device_argument(parser)
    add_loader_arguments(parser, batch_size=256, num_workers=4)
    add_fusion_arguments(parser, use_flip_default=True)
    parser.add_argument("--nrof_folds", type=int, default=10, help="folds of the verification protocol")
    parser.add_argument("--output_dir", default="result/5valsets", help="where the csv files go")
    parser.add_argument("--save_features", action="store_true",
                        help="save each model's features to <output_dir>/<model>_features.npz")
    parser.add_argument("--features_path", nargs="+", default=None,
                        help="evaluate features saved by --save_features instead of models (no data needed)")
    add_quality_arguments(parser)
    return parser


def features_of_model(args: argparse.Namespace, spec, dataset: ValidationPairDataset, device) -> FeatureSet:
    model = load_model(spec, device)
    features, norms, view_norms, sharpness = embed_dataset(model, dataset, device, args.batch_size,
                                                           args.num_workers, args.use_flip_test,
                                                           args.fusion_method, desc=spec.label, with_quality=True)
    quality_meta, quality_arrays = quality_extras(spec, view_norms, sharpness)
    names = [f"{dataset.set_names[int(k)]}/{i - int(dataset.offsets[int(k)])}"
             for i, k in enumerate(dataset.image_set)]
    arrays = {f"issame_{name}": dataset.issame(k) for k, name in enumerate(dataset.set_names)}
    return FeatureSet(features, norms, names,
                      {"kind": KIND, "model": spec.label, "arch": spec.arch, "ckpt_path": str(spec.ckpt_path),
                       "use_flip_test": bool(args.use_flip_test), "fusion_method": args.fusion_method,
                       "set_names": list(dataset.set_names), **quality_meta}, {**arrays, **quality_arrays})


def check_fold_counts(dataset: ValidationPairDataset, nrof_folds: int) -> None:
    """Every pair set must have at least ``nrof_folds`` pairs (checked before anything is embedded)."""
    small = [f"{name} ({len(dataset.issame(k))} pairs)" for k, name in enumerate(dataset.set_names)
             if len(dataset.issame(k)) < nrof_folds]
    if small:
        raise EvalInputError(f"{', '.join(small)}: fewer pairs than --nrof_folds {nrof_folds}; use a smaller "
                             f"--nrof_folds")


def set_rows(feature_set: FeatureSet, set_names: Sequence[str], source: str) -> Dict[str, np.ndarray]:
    """Per set, the rows of its images in pair order (features named ``<set>/<i>``)."""
    rows_of: Dict[str, List[int]] = {}
    for row, name in enumerate(feature_set.names):
        rows_of.setdefault(name.rpartition("/")[0], []).append(row)
    missing = [s for s in set_names if s not in rows_of or f"issame_{s}" not in feature_set.arrays]
    if missing:
        raise EvalInputError(f"{source}: holds no features of {', '.join(missing)} "
                             f"(it has {', '.join(sorted(rows_of)) or 'none'})")
    ordered = {}
    for name in set_names:
        rows = np.array(rows_of[name], dtype=np.int64)
        order = np.argsort([int(feature_set.names[r].rpartition("/")[2]) for r in rows], kind="stable")
        ordered[name] = rows[order]
    return ordered


def evaluate_sets(feature_set: FeatureSet, set_names: Sequence[str], nrof_folds: int,
                  source: str) -> Dict[str, Dict[str, float]]:
    """Per set: ``acc``, ``acc_std``, ``best_threshold`` (fractions), from features named ``<set>/<i>``."""
    return {name: evaluate_pair_set(feature_set.features[rows], feature_set.arrays[f"issame_{name}"],
                                    nrof_folds=nrof_folds)
            for name, rows in set_rows(feature_set, set_names, source).items()}


def quality_of_sets(feature_set: FeatureSet, set_names: Sequence[str], source: str) -> dict:
    """``--quality_report`` of one model: ``{set: {measure: {"FMR=..": RejectCurve}}}``."""
    measures = image_quality_measures(feature_set, source)
    return {name: pair_list_report(feature_set.features[rows], feature_set.arrays[f"issame_{name}"],
                                   {m: q[rows] for m, q in measures.items()})
            for name, rows in set_rows(feature_set, set_names, source).items()}


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, object]:
    args = build_parser().parse_args(argv)
    set_names = list(dict.fromkeys(args.set_names))
    if args.nrof_folds < 2:
        raise EvalInputError(f"--nrof_folds must be at least 2, got {args.nrof_folds}")
    output_dir = Path(args.output_dir)
    per_model: Dict[str, Dict[str, Dict[str, float]]] = {}
    quality: Dict[str, dict] = {}

    if args.features_path:
        if args.model_name or args.ckpt_path:
            raise EvalInputError("give either models (--model_name / --ckpt_path) or --features_path, not both")
        for path in args.features_path:
            saved = load_features(path, KIND)
            label = str(saved.meta.get("model") or Path(path).stem)
            if label in per_model:
                label = str(Path(path).with_suffix(""))
            if label in per_model:
                label = f"{label}#{len(per_model) + 1}"
            per_model[label] = evaluate_sets(saved, set_names, args.nrof_folds, str(path))
            if args.quality_report:
                quality[label] = quality_of_sets(saved, set_names, str(path))
    else:
        specs = model_specs_from_args(args)
        device = resolve_device(args.device)
        root = Path(args.data_root) / args.val_data_path
        ensure_pair_memfiles(root, set_names)              # one error lists every missing set
        dataset = ValidationPairDataset(root, set_names)
        check_fold_counts(dataset, args.nrof_folds)
        prepare_output_dir(output_dir, create=False)       # before any model runs
        logger.info("%d images of %d pair sets in %s", len(dataset), len(set_names), root)
        for spec in specs:
            feature_set = features_of_model(args, spec, dataset, device)
            if args.save_features:
                save_features(output_dir / f"{file_safe(spec.label)}_features.npz", feature_set)
            per_model[spec.label] = evaluate_sets(feature_set, set_names, args.nrof_folds, spec.label)
            if args.quality_report:
                quality[spec.label] = quality_of_sets(feature_set, set_names, spec.label)

    prepare_output_dir(output_dir)
    table_rows = {label: results_row({f"{s}_{STAGE}_acc": r[s]["acc"] for s in r}, set_names, STAGE)
                  for label, r in per_model.items()}
    pd.DataFrame([{"model": label, **row} for label, row in table_rows.items()]).to_csv(
        output_dir / "results.csv", index=False, float_format="%.4f")
    pd.DataFrame([{"model": label, "set": s, **values} for label, r in per_model.items()
                  for s, values in r.items()]).to_csv(output_dir / "results_detail.csv", index=False)
    print(f"\nverification accuracy (%), {args.nrof_folds}-fold (results in {output_dir}):")
    print(format_results_table(table_rows))
    for label, report in quality.items():
        paths = write_quality_report(output_dir, report, stem=f"{file_safe(label)}_quality",
                                     title=f"{label}: error versus reject")
        print_quality_report(report, paths, f"{label}, feature norm as face quality")
    return {"results": per_model, "table": table_rows, "output_dir": output_dir, "quality": quality}


if __name__ == "__main__":
    sys.exit(run_cli(main))
