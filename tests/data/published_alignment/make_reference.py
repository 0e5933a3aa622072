"""Record what the published AdaFace photo pipeline outputs on the project's real photos.

Not run by the tests (it needs the published code, which the project does not ship); it wrote
``reference.npz`` once. To regenerate::

    git --git-dir=<AdaFace mirror> archive HEAD face_alignment | tar x -C /tmp/published
    sed -i "s/device='cuda:0'/device='cpu'/" /tmp/published/face_alignment/align.py
    cp -r /tmp/published /tmp/published_fixed      # then, in the copy only, P-Net's softmax:
    sed -i "0,/a = F.softmax(a, dim=-1)/s//a = F.softmax(a, dim=1)/" \\
        /tmp/published_fixed/face_alignment/mtcnn_pytorch/src/get_nets.py
    python tests/data/published_alignment/make_reference.py /tmp/published /tmp/published_fixed

The published code is run unmodified apart from those two lines: its ``align.mtcnn_model``
(``MTCNN(device='cpu', crop_size=(112, 112))``) detects with ``detect_faces`` and crops with
``align_multi`` (``warp_and_crop_face``), from the same RGB arrays the tests build
(``face_alignment.sample_images.portrait_arrays``, ``closeup_photos`` and ``group_photos``).

Stored: ``<variant>/transforms`` (the published ``get_similarity_transform_for_cv2`` of each
of ``LANDMARK_SETS`` onto its 112x112 reference points); per photo ``<name>``, for ``pub`` (published as is) and ``fix`` (softmax axis fixed):
``<variant>/<name>/boxes`` (n, 5: x1, y1, x2, y2, score, the published order),
``<variant>/<name>/landmarks`` (n, 10: x1..x5, y1..y5) and, for ``pub`` only,
``pub/<name>/crops`` (n, 112, 112, 3) uint8 — plus ``image/<name>/mean`` (mean pixel of the
input, to tell a decoder change from a pipeline change).
"""
from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
VARIANTS = {"pub": 0, "fix": 1}  # argv position of the published copy


def _worker(published_root: str, images_npz: str, out_npz: str) -> None:
    """Runs inside the published code's folder (its ``face_alignment`` package shadows ours)."""
    sys.path.insert(0, published_root)
    from PIL import Image

    from face_alignment import align  # the published module; builds MTCNN on import

    from face_alignment.mtcnn_pytorch.src.matlab_cp2tform import get_similarity_transform_for_cv2

    images = np.load(images_npz)
    out = {}
    reference = np.float32(align.mtcnn_model.refrence)
    out["transforms"] = np.stack([
        get_similarity_transform_for_cv2(np.float32(points), reference.copy())
        for points in images["_landmark_sets"]])
    for name in images.files:
        if name.startswith("_"):
            continue
        pil = Image.fromarray(images[name])
        model = align.mtcnn_model
        boxes, landmarks = model.detect_faces(pil, model.min_face_size, model.thresholds,
                                              model.nms_thresholds, model.factor)
        _, faces = model.align_multi(pil)
        out[f"{name}/boxes"] = np.asarray(boxes, dtype=np.float64).reshape(-1, 5)
        out[f"{name}/landmarks"] = np.asarray(landmarks, dtype=np.float64).reshape(-1, 10)
        out[f"{name}/crops"] = np.stack([np.asarray(f) for f in faces]) if faces \
            else np.zeros((0, 112, 112, 3), np.uint8)
    np.savez(out_npz, **out)


#: 5-point landmark sets (x, y) for the transform alone: a portrait's, the same mirrored (the
#: reflective candidate wins), and two where the published in-place mirroring flips the choice
#: (an honest comparison would pick the other candidate): reflective chosen, then direct chosen.
LANDMARK_SETS = np.array([
    [[205.0, 102.0], [247.0, 104.0], [225.0, 129.0], [202.0, 139.0], [245.0, 142.0]],
    [[307.0, 102.0], [265.0, 104.0], [287.0, 129.0], [310.0, 139.0], [267.0, 142.0]],
    [[214.5, 89.5], [222.3, 96.4], [219.5, 119.5], [213.1, 132.7], [199.8, 153.6]],
    [[235.0, 97.4], [216.6, 88.7], [237.1, 122.9], [217.8, 142.3], [232.1, 162.4]],
])


def photos() -> dict:
    """The reference photos by name: the three portraits and the synthetic group photos."""
    from face_alignment.sample_images import closeup_photos, group_photos, portrait_arrays

    named = dict(portrait_arrays())
    named.update(closeup_photos())
    named.update({name: arr for name, (arr, _) in group_photos().items()})
    return named


def main(published: str, published_fixed: str) -> None:
    sys.path.insert(0, str(HERE.parents[2]))
    named = photos()
    stored = {f"image/{k}/mean": np.float64(v.mean()) for k, v in named.items()}
    with tempfile.TemporaryDirectory() as tmp:
        images = Path(tmp) / "images.npz"
        np.savez(images, _landmark_sets=LANDMARK_SETS, **named)
        for variant, root in (("pub", published), ("fix", published_fixed)):
            result = Path(tmp) / f"{variant}.npz"
            subprocess.run([sys.executable, __file__, "--worker", root, str(images), str(result)],
                           check=True, cwd=root)
            with np.load(result) as found:
                for key in found.files:
                    if variant == "fix" and key.endswith("/crops"):
                        continue
                    stored[f"{variant}/{key}"] = found[key]
    np.savez_compressed(HERE / "reference.npz", **stored)
    for key in sorted(stored):
        if key.endswith("/boxes"):
            print(key, len(stored[key]), "faces")


if __name__ == "__main__":
    if sys.argv[1] == "--worker":
        _worker(*sys.argv[2:5])
    else:
        main(sys.argv[1], sys.argv[2])
