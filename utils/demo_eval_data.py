"""Small synthetic evaluation sets in the real layouts: IJB-B / IJB-C, TinyFace and IJB-S.

``python -m utils.demo_eval_data --out DIR --kind ijbc|ijbb|tinyface|ijbs`` writes, deterministically
from ``--seed``, faces of the demo renderer (:mod:`utils.demo_data`) in the layout that the
evaluation scripts read from the real releases; ``--data_root DIR`` then points a script at it.

``ijbc`` / ``ijbb`` (InsightFace's IJB release)::

    DIR/IJBC/loose_crop/<n>.jpg                    loose crops (face at a random scale, angle, place)
    DIR/IJBC/meta/ijbc_name_5pts_score.txt         image x1 y1 ... x5 y5 faceness (true landmarks)
    DIR/IJBC/meta/ijbc_face_tid_mid.txt            image template_id media_id
    DIR/IJBC/meta/ijbc_template_pair_label.txt     template1 template2 label (enrolment x probe)
    DIR/IJBC/meta/ijbc_1N_gallery_G1.csv, _G2.csv  TEMPLATE_ID,SUBJECT_ID,FILENAME,SIGHTING_ID
    DIR/IJBC/meta/ijbc_1N_probe_mixed.csv          (IJBB: IJBB/, ijbb_ and galleries S1/S2)

  Every subject has one enrolment template (stills, one media each) in G1 (even subjects) or G2
  (odd subjects) and probe templates: a still plus a video (frames sharing one media id), and a
  still alone. Aligning a loose crop with its 5 landmarks gives back the rendered 112x112 face.

``tinyface``::

    DIR/tinyface/Testing_Set/{Probe,Gallery_Match,Gallery_Distractor}/<id>_<k>.jpg
                                                   tiny originals (16-32 px), identity before '_'
    DIR/aligned_pad_0.1_pad_high/{Probe,Gallery_Match,Gallery_Distractor}/<id>_<k>.jpg
                                                   the same faces aligned, 112x112

``ijbs`` (the published IJB-S evaluation reads the protocol csv columns by position)::

    DIR/protocols/cs6_metadata.csv                 SUBJECT_ID,FILENAME,FRAME (videos/<v>.mp4, img/<i>.jpg)
    DIR/protocols/cs6_surveillance_to_single-booking_probe.csv, cs6_surveillance_to_surveillance_probe.csv
                                                   FILENAME (one probe video per line)
    DIR/protocols/galleries/cs6_surveillance_to_{single,booking,surveillance}_g{1,2}.csv
                                                   TEMPLATE_ID,SUBJECT_ID,FILENAME
    DIR/aligned/<subject>/videos_<v>_<frame>.jpg, DIR/aligned/<subject>/img_<i>.jpg
                                                   aligned 112x112 frames and stills

  One probe video shows two subjects; the frames of one (subject, video) are left out, as frames
  where alignment failed are in the real data (its template has no image).
"""
from __future__ import annotations

import argparse
import logging
import math
import shutil
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import cv2
import numpy as np
from prettytable import PrettyTable

from face_alignment.similarity import REFERENCE_POINTS_112, transform_points
from utils.cli import run_cli
from utils.demo_data import PAIR_VARIATION, IdentityBank, Quality, draw_quality, render_identity_image
from utils.image import INPUT_SIZE, encode_jpeg

logger = logging.getLogger(__name__)

PathLike = Union[str, Path]
KINDS = ("ijbc", "ijbb", "tinyface", "ijbs")
JPEG_QUALITY = 95
TINYFACE_ALIGNED_DIR = "aligned_pad_0.1_pad_high"
TINYFACE_SUBSETS = ("Probe", "Gallery_Match", "Gallery_Distractor")
IJBS_PROBE_FILES = ("cs6_surveillance_to_single-booking_probe.csv", "cs6_surveillance_to_surveillance_probe.csv")
IJBS_GALLERIES = ("single", "booking", "surveillance")


@dataclass
class DemoEvalSet:
    """What was written: the ``--data_root`` to use, the images (as the script names them) and subjects."""

    root: Path
    kind: str
    image_names: List[str] = field(default_factory=list)
    image_subjects: List[int] = field(default_factory=list)
    counts: Dict[str, int] = field(default_factory=dict)
    details: Dict[str, object] = field(default_factory=dict)


def _rng(seed: int, name: str, *numbers: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(
        [int(seed), zlib.crc32(name.encode("utf-8")), *[int(n) for n in numbers]]))


def _write_jpeg(path: Path, rgb: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode_jpeg(rgb, JPEG_QUALITY))


def _prepare(out_dir: Path, owned: Sequence[str], overwrite: bool) -> None:
    """Refuse to write over existing folders unless ``overwrite`` (then they are removed)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    existing = [out_dir / name for name in owned if (out_dir / name).exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{', '.join(map(str, existing))} already exist(s); pass overwrite=True "
                              f"(--force) to replace them")
    for path in existing:
        shutil.rmtree(path) if path.is_dir() else path.unlink()


# ----------------------------------------------------------------------------------------------
# rendering
# ----------------------------------------------------------------------------------------------
def render_loose_crop(aligned_rgb: np.ndarray, rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
    """Place an aligned 112x112 face in a larger photo at a random scale, angle and position.

    Returns ``(rgb, landmarks (5, 2))``: the landmarks are the 112x112 reference points carried by
    the same similarity transform, so :func:`face_alignment.similarity.align_face` recovers the face.
    """
    scale = float(rng.uniform(0.9, 1.6))
    angle = math.radians(float(rng.uniform(-15.0, 15.0)))
    width = int(round(INPUT_SIZE * scale + rng.uniform(24, 64)))
    height = int(round(INPUT_SIZE * scale + rng.uniform(24, 64)))
    a, b = scale * math.cos(angle), scale * math.sin(angle)
    centre = np.array([width / 2 + rng.uniform(-6, 6), height / 2 + rng.uniform(-6, 6)])
    offset = centre - np.array([[a, -b], [b, a]]) @ np.array([INPUT_SIZE / 2, INPUT_SIZE / 2])
    matrix = np.array([[a, -b, offset[0]], [b, a, offset[1]]])
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    colours = rng.uniform(30, 220, size=(3, 3)).astype(np.float32)
    background = (colours[0] + (xx / width)[..., None] * (colours[1] - colours[0]) +
                  (yy / height)[..., None] * (colours[2] - colours[0]) * 0.5)
    warped = cv2.warpAffine(aligned_rgb.astype(np.float32), matrix, (width, height), flags=cv2.INTER_LINEAR,
                            borderMode=cv2.BORDER_CONSTANT, borderValue=(0, 0, 0))
    mask = cv2.warpAffine(np.ones(aligned_rgb.shape[:2], np.float32), matrix, (width, height),
                          flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)[..., None]
    photo = warped + (1.0 - mask) * background
    landmarks = transform_points(matrix, REFERENCE_POINTS_112).astype(np.float32)
    return np.clip(np.rint(photo), 0, 255).astype(np.uint8), landmarks


def _render(bank: IdentityBank, namespace: str, subject_index: int, rng: np.random.Generator,
            low_quality_fraction: float, min_scale: float = 0.2, quality: Optional[Quality] = None) -> np.ndarray:
    identity = bank.get(namespace, subject_index)
    quality = quality or draw_quality(rng, low_quality_fraction=low_quality_fraction, min_scale=min_scale)
    return render_identity_image(identity, rng, quality, PAIR_VARIATION)


# ----------------------------------------------------------------------------------------------
# IJB-B / IJB-C
# ----------------------------------------------------------------------------------------------
def generate_ijb(out_dir: PathLike, dataset_name: str = "IJBC", seed: int = 0, num_subjects: int = 6,
                 gallery_images: int = 2, frames_per_video: int = 2, overwrite: bool = False) -> DemoEvalSet:
    """An IJB-B/C-style set under ``out_dir/<IJBB|IJBC>/`` (see the module docstring)."""
    name = dataset_name.upper()
    if name not in ("IJBB", "IJBC"):
        raise ValueError(f"dataset_name must be IJBB or IJBC, got {dataset_name!r}")
    if num_subjects < 2 or gallery_images < 1 or frames_per_video < 1:
        raise ValueError("need num_subjects >= 2, gallery_images >= 1 and frames_per_video >= 1")
    out_dir = Path(out_dir)
    _prepare(out_dir, [name], overwrite)
    prefix = name.lower()
    galleries = ("G1", "G2") if name == "IJBC" else ("S1", "S2")
    base = out_dir / name
    crop_dir, meta_dir = base / "loose_crop", base / "meta"
    crop_dir.mkdir(parents=True)
    meta_dir.mkdir(parents=True)
    bank = IdentityBank(seed)

    lines_5pts: List[str] = []
    lines_tid_mid: List[str] = []
    csv_rows: Dict[str, List[str]] = {galleries[0]: [], galleries[1]: [], "probe": []}
    image_names: List[str] = []
    image_subjects: List[int] = []
    gallery_templates: List[Tuple[int, int]] = []            # (template id, subject id)
    probe_templates: List[Tuple[int, int]] = []
    template_id, media_id = 0, 1000

    def add_image(subject_index: int, subject_id: int, tid: int, mid: int, high_quality: bool, kind: str,
                  rows: List[str]) -> None:
        number = len(image_names) + 1
        rng = _rng(seed, f"{name}-image", number)
        face = _render(bank, name, subject_index, rng, 0.1 if high_quality else 0.7)
        photo, landmarks = render_loose_crop(face, rng)
        image = f"{number}.jpg"
        _write_jpeg(crop_dir / image, photo)
        faceness = float(rng.uniform(0.6, 1.0))
        lines_5pts.append(" ".join([image] + [f"{v:.3f}" for v in landmarks.reshape(-1)] + [f"{faceness:.4f}"]))
        lines_tid_mid.append(f"{image} {tid} {mid}")
        source = f"img/{number}.jpg" if kind == "still" else f"frames/{mid}_{number}.png"
        rows.append(f"{tid},{subject_id},{source},{mid}")
        image_names.append(image)
        image_subjects.append(subject_id)

    for k in range(num_subjects):
        subject_id = 100 + 7 * k
        gallery = galleries[k % 2]
        # enrolment template: stills, one media each
        template_id += 3
        for _ in range(gallery_images):
            media_id += 1
            add_image(k, subject_id, template_id, media_id, True, "still", csv_rows[gallery])
        gallery_templates.append((template_id, subject_id))
        # probe template 1: a still and a video (its frames share one media id)
        template_id += 3
        media_id += 1
        add_image(k, subject_id, template_id, media_id, False, "still", csv_rows["probe"])
        media_id += 1
        for _ in range(frames_per_video):
            add_image(k, subject_id, template_id, media_id, False, "frame", csv_rows["probe"])
        probe_templates.append((template_id, subject_id))
        # probe template 2: one still
        template_id += 3
        media_id += 1
        add_image(k, subject_id, template_id, media_id, False, "still", csv_rows["probe"])
        probe_templates.append((template_id, subject_id))

    pairs = [f"{g} {p} {int(gs == ps)}" for g, gs in gallery_templates for p, ps in probe_templates]
    (meta_dir / f"{prefix}_name_5pts_score.txt").write_text("\n".join(lines_5pts) + "\n")
    (meta_dir / f"{prefix}_face_tid_mid.txt").write_text("\n".join(lines_tid_mid) + "\n")
    (meta_dir / f"{prefix}_template_pair_label.txt").write_text("\n".join(pairs) + "\n")
    header = "TEMPLATE_ID,SUBJECT_ID,FILENAME,SIGHTING_ID"
    for key, file_name in ((galleries[0], f"{prefix}_1N_gallery_{galleries[0]}.csv"),
                           (galleries[1], f"{prefix}_1N_gallery_{galleries[1]}.csv"),
                           ("probe", f"{prefix}_1N_probe_mixed.csv")):
        (meta_dir / file_name).write_text("\n".join([header] + csv_rows[key]) + "\n")
    counts = {"subjects": num_subjects, "images": len(image_names),
              "templates": len(gallery_templates) + len(probe_templates), "pairs": len(pairs),
              "genuine_pairs": sum(p.endswith(" 1") for p in pairs)}
    logger.info("%s demo set: %s", name, counts)
    return DemoEvalSet(out_dir, name.lower(), image_names, image_subjects, counts,
                       {"gallery_templates": gallery_templates, "probe_templates": probe_templates})


# ----------------------------------------------------------------------------------------------
# TinyFace
# ----------------------------------------------------------------------------------------------
def generate_tinyface(out_dir: PathLike, seed: int = 0, num_subjects: int = 6, probes_per_subject: int = 2,
                      num_distractors: int = 8, overwrite: bool = False) -> DemoEvalSet:
    """A TinyFace-style set: tiny originals under ``tinyface/Testing_Set`` and aligned 112x112 copies."""
    if num_subjects < 1 or probes_per_subject < 1 or num_distractors < 0:
        raise ValueError("need num_subjects >= 1, probes_per_subject >= 1 and num_distractors >= 0")
    out_dir = Path(out_dir)
    _prepare(out_dir, ["tinyface", TINYFACE_ALIGNED_DIR], overwrite)
    bank = IdentityBank(seed)
    image_names: List[str] = []
    image_subjects: List[int] = []

    def add(subset: str, file_name: str, namespace: str, index: int, subject: int) -> None:
        rng = _rng(seed, f"tinyface-{subset}", len(image_names))
        side = int(rng.integers(16, 33))
        quality = Quality(scale=round(side / INPUT_SIZE, 4), blur_sigma=round(float(rng.uniform(0, 0.8)), 4))
        aligned = _render(bank, namespace, index, rng, 1.0, quality=quality)
        original = cv2.resize(aligned, (side, side), interpolation=cv2.INTER_AREA)
        _write_jpeg(out_dir / "tinyface" / "Testing_Set" / subset / file_name, original)
        _write_jpeg(out_dir / TINYFACE_ALIGNED_DIR / subset / file_name, aligned)
        image_names.append(f"{subset}/{file_name}")
        image_subjects.append(subject)

    for k in range(num_subjects):
        subject = k + 1
        for j in range(probes_per_subject):
            add("Probe", f"{subject}_{j + 1}.jpg", "tinyface", k, subject)
        add("Gallery_Match", f"{subject}_{probes_per_subject + 1}.jpg", "tinyface", k, subject)
    for d in range(num_distractors):
        add("Gallery_Distractor", f"{9000 + d}_1.jpg", "tinyface-distractor", d, -100)
    counts = {"subjects": num_subjects, "probes": num_subjects * probes_per_subject,
              "gallery_match": num_subjects, "distractors": num_distractors, "images": len(image_names)}
    logger.info("TinyFace demo set: %s", counts)
    return DemoEvalSet(out_dir, "tinyface", image_names, image_subjects, counts)


# ----------------------------------------------------------------------------------------------
# IJB-S
# ----------------------------------------------------------------------------------------------
def generate_ijbs(out_dir: PathLike, seed: int = 0, num_subjects: int = 6, frames_per_video: int = 2,
                  booking_images: int = 2, overwrite: bool = False) -> DemoEvalSet:
    """An IJB-S-style set: protocol csv files under ``protocols/`` and aligned frames under ``aligned/``."""
    if num_subjects < 4 or frames_per_video < 1 or booking_images < 1:
        raise ValueError("need num_subjects >= 4, frames_per_video >= 1 and booking_images >= 1")
    out_dir = Path(out_dir)
    _prepare(out_dir, ["protocols", "aligned"], overwrite)
    proto_dir, image_dir = out_dir / "protocols", out_dir / "aligned"
    (proto_dir / "galleries").mkdir(parents=True)
    image_dir.mkdir(parents=True)
    bank = IdentityBank(seed)
    subjects = [k + 1 for k in range(num_subjects)]
    metadata: List[str] = []
    image_names: List[str] = []
    image_subjects: List[int] = []
    next_image, next_video = 100000, 5000
    booking: Dict[int, List[str]] = {}
    gallery_video: Dict[int, str] = {}
    probe_videos: List[str] = []
    dropped: List[Tuple[int, str]] = []

    def add_frames(k: int, subject: int, video: str, write: bool = True) -> None:
        for f in range(frames_per_video):
            frame = 20000 + 37 * f
            metadata.append(f"{subject},{video},{frame}")
            if not write:
                continue
            rng = _rng(seed, "ijbs-frame", subject, int(video.split("/")[1].split(".")[0]), f)
            name = f"{subject}/videos_{Path(video).stem}_{frame}.jpg"
            _write_jpeg(image_dir / name, _render(bank, "ijbs", k, rng, 0.9, min_scale=0.15))
            image_names.append(name)
            image_subjects.append(subject)

    for k, subject in enumerate(subjects):
        booking[subject] = []
        for _ in range(booking_images):
            next_image += 1
            still = f"img/{next_image}.jpg"
            metadata.append(f"{subject},{still},")
            rng = _rng(seed, "ijbs-still", next_image)
            name = f"{subject}/img_{next_image}.jpg"
            _write_jpeg(image_dir / name, _render(bank, "ijbs", k, rng, 0.0))
            image_names.append(name)
            image_subjects.append(subject)
            booking[subject].append(still)
        next_video += 1
        gallery_video[subject] = f"videos/{next_video}.mp4"
        add_frames(k, subject, gallery_video[subject])
        next_video += 1
        probe = f"videos/{next_video}.mp4"
        probe_videos.append(probe)
        lost = k == num_subjects - 1               # alignment "failed" on every frame of this one
        add_frames(k, subject, probe, write=not lost)
        if lost:
            dropped.append((subject, probe))
    # one probe video showing the first two subjects
    next_video += 1
    shared = f"videos/{next_video}.mp4"
    probe_videos.append(shared)
    for k in (0, 1):
        add_frames(k, subjects[k], shared)

    (proto_dir / "cs6_metadata.csv").write_text("\n".join(["SUBJECT_ID,FILENAME,FRAME"] + metadata) + "\n")
    for file_name in IJBS_PROBE_FILES:
        (proto_dir / file_name).write_text("\n".join(["FILENAME"] + probe_videos) + "\n")
    header = "TEMPLATE_ID,SUBJECT_ID,FILENAME"
    for g in (1, 2):
        members = subjects[g - 1::2]                # G1: odd subject ids, G2: even
        rows = {"single": [f"{10 * s + 1},{s},{booking[s][0]}" for s in members],
                "booking": [f"{10 * s + 2},{s},{still}" for s in members for still in booking[s]],
                "surveillance": [f"{10 * s + 3},{s},{gallery_video[s]}" for s in members]}
        for gallery in IJBS_GALLERIES:
            path = proto_dir / "galleries" / f"cs6_surveillance_to_{gallery}_g{g}.csv"
            path.write_text("\n".join([header] + rows[gallery]) + "\n")
    counts = {"subjects": num_subjects, "images": len(image_names), "probe_videos": len(probe_videos),
              "probe_templates": num_subjects + 2, "templates_without_frames": len(dropped)}
    logger.info("IJB-S demo set: %s", counts)
    return DemoEvalSet(out_dir, "ijbs", image_names, image_subjects, counts, {"dropped": dropped})


# ----------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------
def generate_demo_eval_data(out_dir: PathLike, kind: str, seed: int = 0, num_subjects: int = 6,
                            overwrite: bool = False) -> DemoEvalSet:
    """Write the demo set of ``kind`` (one of :data:`KINDS`) under ``out_dir``."""
    kind = kind.lower()
    if kind in ("ijbc", "ijbb"):
        return generate_ijb(out_dir, kind.upper(), seed, num_subjects, overwrite=overwrite)
    if kind == "tinyface":
        return generate_tinyface(out_dir, seed, num_subjects, overwrite=overwrite)
    if kind == "ijbs":
        return generate_ijbs(out_dir, seed, num_subjects, overwrite=overwrite)
    raise ValueError(f"unknown kind {kind!r}; choose from {', '.join(KINDS)}")


_SCRIPTS = {"ijbc": "validation_mixed/validate_IJB_BC.py --dataset_name IJBC",
            "ijbb": "validation_mixed/validate_IJB_BC.py --dataset_name IJBB",
            "tinyface": "validation_lq/validate_tinyface.py",
            "ijbs": "validation_lq/validate_IJB_S.py"}


def main(argv: Optional[Sequence[str]] = None) -> DemoEvalSet:
    parser = argparse.ArgumentParser(
        prog="python -m utils.demo_eval_data",
        description="Write a small synthetic IJB-B/C, TinyFace or IJB-S style evaluation set in the "
                    "layout of the real release.")
    parser.add_argument("--out", required=True, help="output folder (the --data_root of the script)")
    parser.add_argument("--kind", required=True, choices=KINDS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num_subjects", type=int, default=6)
    parser.add_argument("--force", action="store_true", help="replace an earlier demo set of this kind")
    args = parser.parse_args(argv)
    result = generate_demo_eval_data(args.out, args.kind, args.seed, args.num_subjects, overwrite=args.force)
    table = PrettyTable(["item", "value"])
    table.align = "l"
    table.add_row(["folder (--data_root)", str(result.root)])
    for key, value in result.counts.items():
        table.add_row([key, value])
    table.add_row(["evaluate with", f"python {_SCRIPTS[args.kind]} --data_root {result.root} "
                                    f"--ckpt_path <ckpt> --arch <arch>"])
    print(table)
    return result


if __name__ == "__main__":
    sys.exit(run_cli(main))
