#!/usr/bin/env python3
"""TinyFace evaluation: closed-set rank-1 / rank-5 / rank-20 identification.

The protocol of the published ``validation_lq/validate_tinyface.py`` (its ``TinyFaceTest``):

* the probes, the gallery matches and the gallery distractors are the image files of the
  release's ``tinyface/Testing_Set/{Probe,Gallery_Match,Gallery_Distractor}``; each is evaluated
  through its aligned copy (``<data_root>/<aligned_dir_name>/...``, 112x112), found by the file
  name without extension;
* the identity is the file name before the first ``_``; distractors have no identity (-100);
* the gallery is the matches followed by the distractors; a probe's scores are the inner products
  of its (flip-fused, ``pre_norm_vector_add`` by default) feature with the gallery's;
* ``DIR_FAR`` (:mod:`utils.identification`) in closed-set mode gives rank-1/5/20 over the probes.

Without ``tinyface/Testing_Set`` the aligned folder's own listing defines the protocol (a warning
says that images lost in alignment cannot be detected then). Outputs go to ``--output_dir``
(default ``result/TinyFace/<model>``): ``result.csv`` and, with ``--save_features``, ``features.npz``.
``--quality_report`` rejects the probes of lowest quality (feature norm, AdaFace's indicator, the
image baseline; :mod:`utils.quality`) and writes ``quality_pauc.csv``, ``quality_evrc.csv`` and
``quality_evrc.png`` (1 - rank-1 of the remaining probes against the fraction rejected; the gallery
is kept whole) and prints the pAUC table.

Example::

    python validation_lq/validate_tinyface.py --data_root /data/tinyface_root --model_name ir101_webface4m
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from prettytable import PrettyTable  # noqa: E402

from utils.eval_common import (EvalInputError, ImageListDataset, MissingFilesError,  # noqa: E402
                               add_device_argument, add_feature_arguments, add_fusion_arguments,
                               add_loader_arguments, add_model_arguments, add_quality_arguments, check_paths_exist,
                               compute_or_load_features, file_safe, model_specs_from_args,
                               prepare_output_dir, run_cli, run_label)
from utils.device import resolve_device  # noqa: E402
from utils.identification import rank_rates  # noqa: E402
from utils.image import list_images  # noqa: E402
from utils.messages import name_some  # noqa: E402
from utils.quality_report import (identification_report, image_quality_measures, print_quality_report,  # noqa: E402
                                  write_quality_report)

logger = logging.getLogger("validate_tinyface")

SUBSETS = ("Probe", "Gallery_Match", "Gallery_Distractor")
DISTRACTOR_LABEL = -100
RANKS = (1, 5, 20)
KIND = "TinyFace"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="TinyFace rank-1/5/20 identification",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data_root", required=True,
                        help="folder holding tinyface/Testing_Set/ and the aligned copy")
    parser.add_argument("--aligned_dir_name", default="aligned_pad_0.1_pad_high",
                        help="aligned 112x112 copy of Testing_Set under --data_root")
    parser.add_argument("--protocol_dir", default=None,
                        help="the release's Testing_Set folder (default: <data_root>/tinyface/Testing_Set)")
    add_model_arguments(parser)
    add_device_argument(parser)
    add_loader_arguments(parser, batch_size=32, num_workers=4)
    add_fusion_arguments(parser, use_flip_default=True)
    parser.add_argument("--output_dir", default=None, help="default: result/TinyFace/<model>")
    add_feature_arguments(parser)
    add_quality_arguments(parser)
    return parser


def file_key(path: Path) -> str:
    """The published index key: the file name without extension."""
    return path.stem


def identity_label(path: Path) -> int:
    prefix = path.name.split("_")[0]
    try:
        return int(prefix)
    except ValueError:
        raise EvalInputError(f"{path}: the identity (file name before the first '_') must be an integer, "
                             f"found {prefix!r}; rename or remove the file (TinyFace names are "
                             f"<identity>_<n>.jpg)") from None


def read_protocol(data_root: Path, aligned_dir: Path, protocol_dir: Optional[Path]
                  ) -> Tuple[List[str], np.ndarray, np.ndarray, np.ndarray]:
    """``(aligned images to embed, probe rows, gallery rows, labels of probes + gallery)``.

    Rows index the returned image list; labels are probes' then the gallery's (matches, then
    distractors with -100). One error lists every missing folder, another the protocol images
    without an aligned copy.
    """
    protocol_dir = protocol_dir or data_root / "tinyface" / "Testing_Set"
    check_paths_exist([aligned_dir / s for s in SUBSETS], "TinyFace aligned folders")
    if not protocol_dir.is_dir():
        logger.warning("%s not found: using the listing of %s as the protocol (images lost in alignment "
                       "cannot be detected)", protocol_dir, aligned_dir)
        protocol_dir = aligned_dir
    else:
        check_paths_exist([protocol_dir / s for s in SUBSETS], "TinyFace protocol folders")
    listing = {s: list_images(protocol_dir / s) for s in SUBSETS}
    empty = [s for s in ("Probe", "Gallery_Match") if not listing[s]]
    if empty:
        raise EvalInputError(f"{protocol_dir}: no images in {', '.join(empty)}")

    aligned_of: Dict[str, List[Path]] = {}
    for path in list_images(aligned_dir):
        aligned_of.setdefault(file_key(path), []).append(path)
    wanted = [p for s in SUBSETS for p in listing[s]]
    missing = [str(p.relative_to(protocol_dir)) for p in wanted if file_key(p) not in aligned_of]
    if missing:
        raise MissingFilesError(f"{len(missing)} of {len(wanted)} TinyFace images have no aligned copy (same "
                                f"name without extension) under {aligned_dir}: {name_some(missing)}")
    ambiguous = sorted({file_key(p) for p in wanted if len(aligned_of[file_key(p)]) > 1})
    if ambiguous:
        raise EvalInputError(f"{aligned_dir}: {len(ambiguous)} image names occur more than once (the protocol "
                             f"finds images by name): {name_some(ambiguous)}")

    names: List[str] = []
    row_of: Dict[str, int] = {}
    rows: Dict[str, List[int]] = {s: [] for s in SUBSETS}
    for subset in SUBSETS:
        for path in listing[subset]:
            rel = aligned_of[file_key(path)][0].relative_to(aligned_dir).as_posix()
            if rel not in row_of:
                row_of[rel] = len(names)
                names.append(rel)
            rows[subset].append(row_of[rel])
    probe_labels = [identity_label(p) for p in listing["Probe"]]
    match_labels = [identity_label(p) for p in listing["Gallery_Match"]]
    if not set(probe_labels).intersection(match_labels):
        raise EvalInputError(f"{protocol_dir}: no identity of Probe has an image in Gallery_Match, so no rank "
                             f"can be measured; check that both folders come from the same TinyFace release")
    labels = probe_labels + match_labels + [DISTRACTOR_LABEL] * len(listing["Gallery_Distractor"])
    probe_rows = np.array(rows["Probe"], dtype=np.int64)
    gallery_rows = np.array(rows["Gallery_Match"] + rows["Gallery_Distractor"], dtype=np.int64)
    return names, probe_rows, gallery_rows, np.array(labels, dtype=np.int64)


def tinyface_identification(features: np.ndarray, probe_rows: np.ndarray, gallery_rows: np.ndarray,
                            labels: np.ndarray, ranks: Sequence[int] = RANKS) -> Dict[str, float]:
    """Closed-set rank-k identification rates (fractions) of the probes against matches + distractors."""
    probe_labels, gallery_labels = labels[:len(probe_rows)], labels[len(probe_rows):]
    scores = features[probe_rows] @ features[gallery_rows].T
    return rank_rates(scores, probe_labels[:, None] == gallery_labels[None, :], ranks)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, object]:
    args = build_parser().parse_args(argv)
    data_root = Path(args.data_root)
    aligned_dir = data_root / args.aligned_dir_name
    spec = None if args.features_path else model_specs_from_args(args)[0]
    if not args.features_path:
        resolve_device(args.device)
    names, probe_rows, gallery_rows, labels = read_protocol(
        data_root, aligned_dir, Path(args.protocol_dir) if args.protocol_dir else None)
    label = run_label(args, spec)
    output_dir = prepare_output_dir(args.output_dir or Path("result") / KIND / file_safe(label))
    dataset = None if args.features_path else ImageListDataset([aligned_dir / n for n in names]).check_first()

    feature_set = compute_or_load_features(args, KIND, names, lambda: dataset, spec, output_dir,
                                           desc="TinyFace images")
    results = tinyface_identification(feature_set.features, probe_rows, gallery_rows, labels)

    mated = int(np.isin(labels[:len(probe_rows)], labels[len(probe_rows):]).sum())
    table = PrettyTable(["model", *[f"rank-{r} (%)" for r in RANKS], "probes", "gallery", "distractors"])
    table.add_row([label, *[f"{100 * results[f'rank-{r}']:.2f}" for r in RANKS], len(probe_rows),
                   len(gallery_rows), int(np.sum(labels[len(probe_rows):] == DISTRACTOR_LABEL))])
    print(f"\nTinyFace identification (results in {output_dir}):")
    print(table)
    if mated < len(probe_rows):
        logger.warning("%d of %d probes have no match in the gallery; the rates are over the %d that do",
                       len(probe_rows) - mated, len(probe_rows), mated)
    pd.DataFrame({"rank": list(RANKS), "values": [100 * results[f"rank-{r}"] for r in RANKS]}).to_csv(
        output_dir / "result.csv", index=False)
    quality = None
    if args.quality_report:
        measures = image_quality_measures(feature_set, KIND)
        scores = feature_set.features[probe_rows] @ feature_set.features[gallery_rows].T
        probe_labels, gallery_labels = labels[:len(probe_rows)], labels[len(probe_rows):]
        quality = {KIND: identification_report(scores, probe_labels[:, None] == gallery_labels[None, :],
                                               {m: q[probe_rows] for m, q in measures.items()})}
        paths = write_quality_report(output_dir, quality, title=f"{label} on TinyFace: error versus reject")
        print_quality_report(quality, paths, f"{label} on TinyFace, probes rejected by quality")
    return {"results": results, "output_dir": output_dir, "quality": quality}


if __name__ == "__main__":
    sys.exit(run_cli(main))
