"""What ``compat="published"`` changes in photo alignment, measured (numbers for the README).

    python bench/bench_alignment_modes.py [--photo_dir DIR ...]

* faces found by each mode on the synthetic group photos (``face_alignment.sample_images``: faces
  pasted at several sizes) and on any photos under ``--photo_dir`` (e.g. the images the published
  repository ships, ``face_alignment/test_images`` and ``mtcnn_pytorch/images``; not part of
  this project);
* on the portraits (the three shipped photos and their two close-ups): the distance between the
  landmarks the two modes' detectors return, and between their crops (mean absolute difference
  in grey levels, and the face scale ratio published / default).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from prettytable import PrettyTable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from face_alignment.align import load_photo  # noqa: E402
from face_alignment.mtcnn import MTCNN  # noqa: E402
from face_alignment.sample_images import closeup_photos, group_photos, portrait_arrays  # noqa: E402
from face_alignment.similarity import align_face  # noqa: E402
from utils.image import list_images  # noqa: E402


def _scale(matrix: np.ndarray) -> float:
    return float(np.sqrt(abs(np.linalg.det(matrix[:, :2]))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photo_dir", action="append", default=[],
                        help="more photos to count faces on (repeatable)")
    args = parser.parse_args()
    detectors = {c: MTCNN(compat=c) for c in ("default", "published")}

    count = PrettyTable(["photo", "faces pasted", "default", "published"])
    for name, (rgb, pasted) in group_photos().items():
        count.add_row([name, pasted] + [len(d.detect(rgb)) for d in detectors.values()])
    for folder in args.photo_dir:
        for path in list_images(Path(folder)):
            rgb = load_photo(path, "published")
            count.add_row([path.name, "?"] + [len(d.detect(rgb)) for d in detectors.values()])
    print("faces found")
    print(count)

    diff = PrettyTable(["portrait", "landmarks |default - published| px (max)",
                        "crop mean |default - published| grey", "face scale published/default"])
    photos = dict(portrait_arrays())
    photos.update(closeup_photos())
    for name, rgb in photos.items():
        found = {c: d.detect(rgb) for c, d in detectors.items()}
        default, published = found["default"], found["published"]
        marks = (f"{np.abs(default.landmarks[0] - published.landmarks[0]).max():.2f}"
                 if len(default) and len(published) else
                 f"published finds {len(published)}, default {len(default)}")
        if len(default) == 0:
            diff.add_row([name, marks, "-", "-"])
            continue
        points = default.landmarks[0]  # the same landmarks through both transforms
        crop_d, m_d = align_face(rgb, points, return_matrix=True)
        crop_p, m_p = align_face(rgb, points, return_matrix=True, compat="published")
        mad = np.abs(crop_d.astype(np.int64) - crop_p.astype(np.int64)).mean()
        diff.add_row([name, marks, f"{mad:.1f}", f"{_scale(m_p) / _scale(m_d):.3f}"])
    print("portraits: the two modes (crops from the same landmarks, the default detector's)")
    print(diff)


if __name__ == "__main__":
    main()
