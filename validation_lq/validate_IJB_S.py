#!/usr/bin/env python3
"""IJB-S evaluation: Surveillance-to-Single, Surveillance-to-Booking and Surveillance-to-Surveillance.

The protocol of the published ``validation_lq/validate_IJB_S.py`` and its IJB-S helper (from the
Probabilistic Face Embeddings code):

* templates are built from the release's csv files, read by column position as the helper does:
  ``cs6_metadata.csv`` (subject id, file name ``videos/<v>.mp4`` or ``img/<i>.jpg``, ...) gives one
  video template per (subject, video); the probe lists ``cs6_surveillance_to_single-booking_probe.csv``
  and ``cs6_surveillance_to_surveillance_probe.csv`` (one video per line) select the probe templates;
  ``galleries/cs6_surveillance_to_single_g{1,2}.csv`` (template id, subject id, image) give one
  template per image, ``..._booking_g{1,2}.csv`` one template per subject with all its images, and
  ``..._surveillance_g{1,2}.csv`` (template id, subject id, video) the gallery video templates;
* frames are the MTCNN-aligned crops ``<subject>/videos_<v>_<frame>.jpg`` and stills
  ``<subject>/img_<i>.jpg``; a template takes every frame of its subject and video. Frames where
  alignment failed are absent: a template left without any image keeps a zero feature (it scores
  0 against everything), as in the published code;
* image features (no flip test by default, as published) are multiplied by their norms
  (``pre_norm_vector_add``, the published ``pre_norm_vector_add_cos``), averaged per template and
  L2-normalised; scores are inner products;
* per protocol: closed-set rank-1/5/10 over the two galleries together, and open-set TPIR at FPIR
  0.01 and 0.1 computed per gallery and averaged, with ``DIR_FAR`` of :mod:`utils.identification`.
  (That ``DIR_FAR`` rounds the number of false alarms ``FPIR x non-mated probes``; the published
  IJB-S helper truncates it and adds 1e-8 instead of 1e-5 above the top score when it is 0, so
  TPIR can differ where the product is not a whole number.)

Layout: ``--data_root`` holds ``protocols/`` (the csv files) and ``aligned/`` (the frames);
``--protocol_dir`` / ``--image_dir`` point elsewhere, ``--image_list`` takes the published image
list (a csv with a ``path`` column relative to the image folder) instead of scanning the folder.
Outputs (``--output_dir``, default ``result/IJBS/<model>``): ``result.csv`` and, with
``--save_features``, ``features.npz``.

Example::

    python validation_lq/validate_IJB_S.py --data_root /data/IJB-S --model_name ir101_webface12m --device cuda
"""
from __future__ import annotations

import argparse
import csv
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from prettytable import PrettyTable  # noqa: E402

from utils.eval_common import (EvalInputError, ImageListDataset, MissingFilesError,  # noqa: E402
                               add_device_argument, add_feature_arguments, add_fusion_arguments,
                               add_loader_arguments, add_model_arguments, check_files_exist, check_paths_exist,
                               compute_or_load_features, file_safe, load_features, model_specs_from_args,
                               prepare_output_dir, run_cli, run_label)
from utils.device import resolve_device  # noqa: E402
from utils.identification import rank_rates, tpir_at_fpir  # noqa: E402
from utils.ijb import image2template_feature, image_features_for_templates  # noqa: E402
from utils.image import is_image_file  # noqa: E402
from utils.messages import name_some  # noqa: E402
from utils.meta_files import FIX_HINT, fail, line_of_row, read_csv_table  # noqa: E402

logger = logging.getLogger("validate_IJB_S")

KIND = "IJBS"
RANKS = (1, 5, 10)
FPIRS = (0.01, 0.1)
METADATA = "cs6_metadata.csv"
VIDEO_TO_IMAGE_PROBES = "cs6_surveillance_to_single-booking_probe.csv"
VIDEO_TO_VIDEO_PROBES = "cs6_surveillance_to_surveillance_probe.csv"
#: protocol -> (probe set, gallery 1, gallery 2)
PROTOCOLS: Dict[str, Tuple[str, str, str]] = {
    "Surveillance-to-Single": ("video2image_probe", "single_g1", "single_g2"),
    "Surveillance-to-Booking": ("video2image_probe", "booking_g1", "booking_g2"),
    "Surveillance-to-Surveillance": ("video2video_probe", "surveillance_g1", "surveillance_g2"),
}


def protocol_files(protocol_dir: Path) -> Dict[str, Path]:
    files = {"metadata": protocol_dir / METADATA, "video2image_probe": protocol_dir / VIDEO_TO_IMAGE_PROBES,
             "video2video_probe": protocol_dir / VIDEO_TO_VIDEO_PROBES}
    for gallery in ("single", "booking", "surveillance"):
        for g in (1, 2):
            files[f"{gallery}_g{g}"] = protocol_dir / "galleries" / f"cs6_surveillance_to_{gallery}_g{g}.csv"
    return files


@dataclass
class Template:
    subject: int
    keys: List[str]                     # "<subject>_videos_<v>" / "<subject>_img_<i>"
    rows: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))   # its images


@dataclass
class Protocol:
    templates: List[Template]
    sets: Dict[str, np.ndarray]          # probe / gallery name -> template indices


def _rows(path: Path, min_columns: int) -> List[Tuple[int, List[str]]]:
    """``(line number, columns)`` of a csv file after its header line (split on commas, as published)."""
    rows = []
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, start=1):
            if number == 1 or not line.strip():
                continue
            columns = [c.strip() for c in line.strip().split(",")]
            if len(columns) < min_columns:
                raise fail(path, number, f"expected at least {min_columns} comma-separated columns, found "
                                         f"{len(columns)}: {line.strip()[:120]!r}")
            rows.append((number, columns))
    return rows


def _subject(path: Path, number: int, text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise fail(path, number, f"the subject id must be an integer, found {text!r}") from None


def media_key(subject: int, file_name: str, source: str, kind: Optional[str] = None) -> str:
    """``<subject>_videos_<v>`` for ``videos/<v>.mp4``, ``<subject>_img_<i>`` for ``img/<i>.jpg``;
    ``kind`` (``'videos'`` or ``'img'``) is the folder the file name must have."""
    parts = file_name.split("/")
    if len(parts) != 2 or not parts[1] or (kind is not None and parts[0] != kind):
        want = {"videos": "videos/<id>.mp4", "img": "img/<id>.jpg"}.get(kind, "videos/<id>.mp4 or img/<id>.jpg")
        raise EvalInputError(f"{source}: expected a file name like {want}, found {file_name!r}; {FIX_HINT}")
    return f"{subject}_{parts[0]}_{os.path.splitext(parts[1])[0]}"


def image_key(rel_path: str) -> Optional[str]:
    """The template key of an aligned image ``<subject>/videos_<v>_<frame>.jpg`` or ``<subject>/img_<i>.jpg``."""
    subject, _, name = rel_path.replace("\\", "/").rpartition("/")
    subject = subject.rpartition("/")[2]
    if name.startswith("videos"):
        parts = name.split("_")
        return f"{subject}_{parts[0]}_{parts[1]}" if len(parts) >= 3 else None
    if name.startswith("img"):
        return f"{subject}_{os.path.splitext(name)[0]}"
    return None


def _read_metadata(path: Path) -> List[Tuple[int, str]]:
    """The sorted (subject, video) pairs of ``cs6_metadata.csv`` (columns by position, as published).

    Read with pandas and checked on arrays (every line's subject id an integer, video file names
    ``videos/<v>.mp4``); the line-by-line reader runs only to name a line that lacks columns."""
    try:
        table = pd.read_csv(path, header=None, skiprows=1, usecols=[0, 1], dtype=str, keep_default_na=False,
                            quoting=csv.QUOTE_NONE, engine="c")
    except pd.errors.EmptyDataError:
        return []
    except (pd.errors.ParserError, ValueError):
        table = None
    if table is None or (table[1] == "").any():
        _rows(path, 2)                                   # names the short line, if there is one
    if table is None:
        raise fail(path, None, "cannot be read as comma-separated columns SUBJECT_ID,FILENAME,...")
    subjects = pd.to_numeric(table[0].str.strip(), errors="coerce").to_numpy(dtype=np.float64)
    files = table[1].str.strip()
    bad = ~np.isfinite(subjects) | (subjects % 1 != 0)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        _subject(path, line_of_row(path, row, header=True), table[0].iloc[row].strip())
    video = files.str.startswith("videos").to_numpy()
    odd = video & ~files.str.fullmatch(r"videos/[^/]+").to_numpy()
    if odd.any():
        row = int(np.flatnonzero(odd)[0])
        media_key(0, files.iloc[row], f"{path}, line {line_of_row(path, row, header=True)}", "videos")
    pairs = pd.DataFrame({"s": subjects[video].astype(np.int64), "v": files[video].to_numpy()}).drop_duplicates()
    return sorted(zip(pairs["s"].tolist(), pairs["v"].tolist()))


def _check_galleries(files: Dict[str, Path], protocol: "Protocol", lines: Dict[str, List[int]]) -> None:
    """Each gallery has a mated probe, and one template per probe subject (open-set identification)."""
    for probe_set, gallery_1, gallery_2 in PROTOCOLS.values():
        probe_subjects = {protocol.templates[i].subject for i in protocol.sets[probe_set]}
        for gallery in (gallery_1, gallery_2):
            subjects = [protocol.templates[i].subject for i in protocol.sets[gallery]]
            if not probe_subjects.intersection(subjects):
                raise fail(files[gallery], None, f"no subject of this gallery has a probe in {files[probe_set].name}",
                           "use the protocol files of one release")
            seen = set()
            for line, subject in zip(lines[gallery], subjects):
                if subject in seen and subject in probe_subjects:
                    raise fail(files[gallery], line, f"subject {subject} has a second template in this gallery; "
                                                     f"open-set identification needs one per subject and gallery")
                seen.add(subject)


def read_protocol(files: Dict[str, Path]) -> Protocol:
    """Templates and their probe / gallery sets (see the module docstring).

    Every file is parsed completely and checked before anything is embedded: column counts, integer
    subject ids, file-name forms, probe videos and gallery (subject, video) pairs known to
    ``cs6_metadata.csv``, a mated probe in each gallery and one template per probe subject and gallery.
    Problems raise :class:`utils.meta_files.MetaFileError` naming the file and line.
    """
    meta_path = files["metadata"]
    videos = _read_metadata(meta_path)
    templates = [Template(s, [media_key(s, v, str(meta_path))]) for s, v in videos]
    video_index = {sv: i for i, sv in enumerate(videos)}
    known_videos = {v for _, v in videos}
    sets: Dict[str, np.ndarray] = {}
    lines: Dict[str, List[int]] = {}
    for probe_set in ("video2image_probe", "video2video_probe"):
        path = files[probe_set]
        listed = set()
        for number, columns in _rows(path, 1):
            if columns[0] not in known_videos:
                raise fail(path, number, f"probe video {columns[0]!r} is not a video of {meta_path.name}",
                           "use the protocol files of one release")
            listed.add(columns[0])
        sets[probe_set] = np.array([i for i, (_, v) in enumerate(videos) if v in listed], dtype=np.int64)
    for g in (1, 2):
        path = files[f"surveillance_g{g}"]
        first_line: Dict[Tuple[int, str], int] = {}
        for number, columns in _rows(path, 3):
            pair = (_subject(path, number, columns[1]), columns[2])
            if pair not in video_index:
                raise fail(path, number, f"(subject {pair[0]}, video {pair[1]!r}) is not in {meta_path.name}",
                           "use the protocol files of one release")
            first_line.setdefault(pair, number)
        pairs = sorted(first_line)
        sets[f"surveillance_g{g}"] = np.array([video_index[p] for p in pairs], dtype=np.int64)
        lines[f"surveillance_g{g}"] = [first_line[p] for p in pairs]

        path = files[f"single_g{g}"]
        start = len(templates)
        rows = _rows(path, 3)
        for n, c in rows:
            subject = _subject(path, n, c[1])
            templates.append(Template(subject, [media_key(subject, c[2], f"{path}, line {n}", "img")]))
        sets[f"single_g{g}"] = np.arange(start, len(templates), dtype=np.int64)
        lines[f"single_g{g}"] = [n for n, _ in rows]

        path = files[f"booking_g{g}"]
        images: Dict[int, List[str]] = {}
        booking_line: Dict[int, int] = {}
        for n, c in _rows(path, 3):
            subject = _subject(path, n, c[1])
            images.setdefault(subject, []).append(media_key(subject, c[2], f"{path}, line {n}", "img"))
            booking_line.setdefault(subject, n)
        start = len(templates)
        templates += [Template(s, images[s]) for s in sorted(images)]
        sets[f"booking_g{g}"] = np.arange(start, len(templates), dtype=np.int64)
        lines[f"booking_g{g}"] = [booking_line[s] for s in sorted(images)]
    empty = [name for name, indices in sets.items() if len(indices) == 0]
    if empty:
        raise EvalInputError(f"{meta_path.parent}: the protocol has no templates for {', '.join(empty)} "
                             f"(empty files?); restore the protocol files from the dataset release")
    protocol = Protocol(templates, sets)
    _check_galleries(files, protocol, lines)
    return protocol


def list_aligned_images(image_dir: Path, image_list: Optional[Path]) -> List[str]:
    """Relative paths of the aligned images: the published csv list (column ``path``) or a folder scan."""
    if image_list is not None:
        if not image_list.is_file():
            raise MissingFilesError(f"{image_list}: image list not found")
        paths = [str(p) for p in read_csv_table(image_list, (("path", "str"),))["path"]]
        check_files_exist(image_dir, paths, "IJB-S images of the image list")
        return paths
    if not image_dir.is_dir():
        raise MissingFilesError(f"{image_dir}: IJB-S image folder not found (aligned frames "
                                f"<subject>/videos_<video>_<frame>.jpg and <subject>/img_<id>.jpg)")
    paths = []
    for subject in sorted(e.name for e in os.scandir(image_dir) if e.is_dir()):
        paths += [f"{subject}/{f}" for f in sorted(os.listdir(image_dir / subject))
                  if is_image_file(f)]
    return paths


def attach_images(protocol: Protocol, paths: Sequence[str]) -> List[str]:
    """Give every template its images; return the images used by some template (the ones to embed)."""
    by_key: Dict[str, List[int]] = {}
    for i, path in enumerate(paths):
        key = image_key(path)
        if key is not None:
            by_key.setdefault(key, []).append(i)
    used = sorted({i for t in protocol.templates for k in t.keys for i in by_key.get(k, [])})
    new_row = {old: new for new, old in enumerate(used)}
    for template in protocol.templates:
        template.rows = np.array([new_row[i] for k in template.keys for i in by_key.get(k, [])], dtype=np.int64)
    return [paths[i] for i in used]


def template_features(protocol: Protocol, img_feats: np.ndarray) -> np.ndarray:
    """Mean of each template's image features, L2-normalised; zeros for templates without images."""
    members = [(t, r) for t, template in enumerate(protocol.templates) for r in template.rows]
    feats = np.zeros((len(protocol.templates), img_feats.shape[1]), dtype=np.float32)
    if members:
        template_ids = np.array([t for t, _ in members], dtype=np.int64)
        rows = np.array([r for _, r in members], dtype=np.int64)
        # one media per membership: the sum over the template's images, then L2 normalisation
        aggregated, unique = image2template_feature(img_feats[rows], template_ids, np.arange(len(rows)))
        feats[unique] = aggregated
    return feats


def evaluate_protocol(protocol: Protocol, feats: np.ndarray, probe_set: str, gallery_1: str,
                      gallery_2: str) -> Dict[str, float]:
    """Closed-set rank-k over both galleries; open-set TPIR@FPIR per gallery, averaged."""
    probes = protocol.sets[probe_set]
    probe_feats = feats[probes]
    probe_subjects = np.array([protocol.templates[i].subject for i in probes])
    scores, labels = [], []
    for gallery in (gallery_1, gallery_2):
        members = protocol.sets[gallery]
        subjects = np.array([protocol.templates[i].subject for i in members])
        scores.append(probe_feats @ feats[members].T)
        labels.append(probe_subjects[:, None] == subjects[None, :])
    result = rank_rates(np.hstack(scores), np.hstack(labels), RANKS)
    open_sets = [tpir_at_fpir(s, lab, FPIRS) for s, lab in zip(scores, labels)]
    for fpir in FPIRS:
        key = f"TPIR@FPIR={fpir:g}"
        result[key] = float(np.mean([o[key] for o in open_sets]))
    result["probes"] = int(len(probes))
    result["probes_without_images"] = int(sum(len(protocol.templates[i].rows) == 0 for i in probes))
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="IJB-S surveillance identification (rank-1/5/10, TPIR@FPIR)",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data_root", required=True, help="folder holding protocols/ and aligned/")
    parser.add_argument("--protocol_dir", default=None, help="default: <data_root>/protocols")
    parser.add_argument("--image_dir", default=None, help="aligned frames; default: <data_root>/aligned")
    parser.add_argument("--image_list", default=None,
                        help="csv with a 'path' column (relative to the image folder) listing the images to use")
    add_model_arguments(parser)
    add_device_argument(parser)
    add_loader_arguments(parser, batch_size=512, num_workers=8)
    add_fusion_arguments(parser, use_flip_default=False)
    parser.add_argument("--output_dir", default=None, help="default: result/IJBS/<model>")
    add_feature_arguments(parser)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, object]:
    args = build_parser().parse_args(argv)
    data_root = Path(args.data_root)
    protocol_dir = Path(args.protocol_dir) if args.protocol_dir else data_root / "protocols"
    image_dir = Path(args.image_dir) if args.image_dir else data_root / "aligned"
    spec = None if args.features_path else model_specs_from_args(args)[0]
    if not args.features_path:
        resolve_device(args.device)
    files = protocol_files(protocol_dir)
    check_paths_exist(files.values(), "IJB-S protocol files")
    protocol = read_protocol(files)
    if args.features_path and not image_dir.is_dir() and args.image_list is None:
        all_paths = load_features(args.features_path, KIND).names       # the images come with the features
    else:
        all_paths = list_aligned_images(image_dir, Path(args.image_list) if args.image_list else None)
    names = attach_images(protocol, all_paths)
    if not names:
        raise MissingFilesError(f"{image_dir}: none of the {len(all_paths)} images belongs to a template of the "
                                f"protocol (expected <subject>/videos_<video>_<frame>.jpg and "
                                f"<subject>/img_<id>.jpg)")
    empty = [protocol.templates[i] for i in sorted({int(i) for s in protocol.sets.values() for i in s})
             if len(protocol.templates[i].rows) == 0]
    if empty:
        logger.warning("%d templates of the protocol have no aligned image (alignment failures?); they keep "
                       "a zero feature, as in the published code: %s", len(empty),
                       name_some([", ".join(t.keys) for t in empty]))
    label = run_label(args, spec)
    output_dir = prepare_output_dir(args.output_dir or Path("result") / KIND / file_safe(label))
    dataset = None if args.features_path else ImageListDataset([image_dir / n for n in names]).check_first()

    feature_set = compute_or_load_features(args, KIND, names, lambda: dataset, spec, output_dir,
                                           desc="IJB-S images")
    img_feats = image_features_for_templates(feature_set.features, feature_set.norms, feature_set.fusion_method)
    feats = template_features(protocol, img_feats)

    results = {name: evaluate_protocol(protocol, feats, *sets) for name, sets in PROTOCOLS.items()}
    columns = [f"rank-{r}" for r in RANKS] + [f"TPIR@FPIR={f:g}" for f in FPIRS]
    table = PrettyTable(["protocol"] + [f"{c} (%)" for c in columns] + ["probes", "probes without images"])
    for name, row in results.items():
        table.add_row([name] + [f"{100 * row[c]:.2f}" for c in columns] + [row["probes"],
                                                                             row["probes_without_images"]])
    print(f"\nIJB-S identification, model {label} ({len(names)} images; results in {output_dir}):")
    print(table)
    pd.DataFrame([{"protocol": k, **{c: 100 * v[c] for c in columns}, "probes": v["probes"],
                   "probes_without_images": v["probes_without_images"]} for k, v in results.items()]).to_csv(
        output_dir / "result.csv", index=False)
    return {"results": results, "output_dir": output_dir, "num_images": len(names)}


if __name__ == "__main__":
    sys.exit(run_cli(main))
