"""Tests of face_alignment/: MTCNN networks and detector, similarity alignment, public API."""
from __future__ import annotations

import logging
import shutil
import sys

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skdata
from skimage.transform import SimilarityTransform

from face_alignment import align as fa
from face_alignment.mtcnn import MTCNN, nms, pyramid_scales, to_rgb_array
from face_alignment.nets import (INSTALL_HINT, ONet, PNet, RNet, find_weights_dir, load_nets,
                                 packaged_weights_dir)
from face_alignment.sample_images import ensure_test_images
from face_alignment.similarity import (REFERENCE_POINTS_112, align_face, estimate_similarity,
                                       transform_points)

needs_weights = pytest.mark.skipif(
    packaged_weights_dir() is None,
    reason=f"MTCNN weights absent: the facenet-pytorch wheel is not installed ({INSTALL_HINT})")

# Expected values on skimage.data.astronaut() (shared/docs/environment.md).
ASTRONAUT_BOX = np.array([181, 62, 268, 172], dtype=float)
ASTRONAUT_LANDMARKS = np.array([[205, 102], [247, 104], [225, 129], [202, 139], [245, 142]],
                               dtype=float)


@pytest.fixture(scope="module")
def sample_photos(tmp_path_factory):
    return ensure_test_images(tmp_path_factory.mktemp("face_photos"))


@pytest.fixture(scope="module")
def astronaut_detections():
    return fa.get_detector().detect(skdata.astronaut())


def _skimage_similarity(src, dst) -> np.ndarray:
    if hasattr(SimilarityTransform, "from_estimate"):
        return SimilarityTransform.from_estimate(src, dst).params
    tform = SimilarityTransform()
    assert tform.estimate(src, dst)
    return tform.params


# -- the similarity transform (no weights needed) --------------------------------------------

def test_similarity_equals_skimage_estimate(rng):
    for _ in range(50):
        n = int(rng.integers(2, 9))
        src = rng.uniform(-300, 300, size=(n, 2))
        angle, scale = rng.uniform(-np.pi, np.pi), rng.uniform(0.05, 5.0)
        rot = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        dst = src @ rot.T + rng.uniform(-100, 100, size=2) + rng.normal(0, 20, size=(n, 2))
        ours = estimate_similarity(src, dst)
        np.testing.assert_allclose(ours, _skimage_similarity(src, dst)[:2], rtol=0, atol=1e-6)
    # the face case: 5 landmarks onto the reference points
    src = ASTRONAUT_LANDMARKS + rng.normal(0, 3, size=(5, 2))
    np.testing.assert_allclose(estimate_similarity(src, REFERENCE_POINTS_112),
                               _skimage_similarity(src, REFERENCE_POINTS_112)[:2], atol=1e-6)


def test_similarity_rejects_bad_points():
    with pytest.raises(ValueError, match="coincide"):
        estimate_similarity(np.ones((5, 2)), REFERENCE_POINTS_112)
    with pytest.raises(ValueError, match="same shape"):
        estimate_similarity(np.zeros((4, 2)), REFERENCE_POINTS_112)
    for bad in (np.zeros((4, 2)), np.zeros(10)):
        with pytest.raises(ValueError, match="5 landmarks"):
            align_face(np.zeros((50, 50, 3), np.uint8), bad)


def test_align_face_undoes_a_known_similarity(rng):
    # A 112x112 face-sized pattern placed in a larger photo by a known similarity: aligning the photo
    # with the moved reference points must give the pattern back.
    pattern = cv2.GaussianBlur(rng.integers(0, 256, size=(112, 112, 3)).astype(np.uint8), (0, 0), 2)
    angle, scale = np.deg2rad(25.0), 2.3
    forward = np.array([[scale * np.cos(angle), -scale * np.sin(angle), 140.0],
                        [scale * np.sin(angle), scale * np.cos(angle), 60.0]])
    photo = cv2.warpAffine(pattern, forward, (420, 380), flags=cv2.INTER_LINEAR)
    landmarks = transform_points(forward, REFERENCE_POINTS_112)
    aligned, matrix = align_face(photo, landmarks, return_matrix=True)
    assert aligned.shape == (112, 112, 3) and aligned.dtype == np.uint8
    np.testing.assert_allclose(transform_points(matrix, landmarks), REFERENCE_POINTS_112, atol=1e-9)
    inner = (slice(8, -8), slice(8, -8))  # away from the pattern's edge
    diff = np.abs(aligned[inner].astype(int) - pattern[inner].astype(int))
    assert diff.mean() < 3.0, diff.mean()
    # PIL input gives the same crop
    np.testing.assert_array_equal(align_face(Image.fromarray(photo), landmarks), aligned)


# -- networks and weights --------------------------------------------------------------------

def test_locating_weights_does_not_import_facenet_pytorch():
    if packaged_weights_dir() is None:
        pytest.skip(f"facenet-pytorch wheel not installed ({INSTALL_HINT})")
    assert "facenet_pytorch" not in sys.modules


@needs_weights
def test_weights_load_strictly():
    folder = find_weights_dir()
    for name, net in (("pnet.pt", PNet()), ("rnet.pt", RNet()), ("onet.pt", ONet())):
        state = torch.load(folder / name, map_location="cpu", weights_only=True)
        expected = {k: tuple(v.shape) for k, v in net.state_dict().items()}
        assert {k: tuple(v.shape) for k, v in state.items()} == expected
        net.load_state_dict(state, strict=True)
    pnet, _, _ = load_nets()
    state = torch.load(folder / "pnet.pt", map_location="cpu", weights_only=True)
    torch.testing.assert_close(pnet.conv1.weight, state["conv1.weight"], rtol=0, atol=0)


@needs_weights
def test_weights_dir_errors_and_user_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="lacks onet.pt, pnet.pt, rnet.pt") as err:
        find_weights_dir(tmp_path)
    assert "pip install --no-deps facenet-pytorch==2.6.0" in str(err.value)
    for name in ("pnet.pt", "rnet.pt", "onet.pt"):
        shutil.copyfile(find_weights_dir() / name, tmp_path / name)
    assert find_weights_dir(tmp_path) == tmp_path
    load_nets(tmp_path)  # a user-given folder loads
    shutil.copyfile(tmp_path / "rnet.pt", tmp_path / "pnet.pt")  # wrong layout
    with pytest.raises(ValueError, match="pnet.pt.*does not match the pnet layout"):
        load_nets(tmp_path)


@needs_weights
def test_network_output_shapes():
    pnet, rnet, onet = load_nets()
    with torch.no_grad():
        offsets, probs = pnet(torch.zeros(2, 3, 50, 41))
        # conv3x3 -> 48x39, max-pool 2 (ceil) -> 24x20, conv3x3 -> 22x18, conv3x3 -> 20x16
        assert offsets.shape == (2, 4, 20, 16) and probs.shape == (2, 2, 20, 16)
        offsets, probs = pnet(torch.zeros(1, 3, 12, 12))
        assert offsets.shape == (1, 4, 1, 1) and probs.shape == (1, 2, 1, 1)
        offsets, probs = rnet(torch.randn(3, 3, 24, 24))
        assert offsets.shape == (3, 4) and probs.shape == (3, 2)
        torch.testing.assert_close(probs.sum(1), torch.ones(3))
        marks, offsets, probs = onet(torch.randn(3, 3, 48, 48))
        assert marks.shape == (3, 10) and offsets.shape == (3, 4) and probs.shape == (3, 2)
        torch.testing.assert_close(probs.sum(1), torch.ones(3))


# -- detector pieces -------------------------------------------------------------------------

def _nms_reference(boxes, scores, threshold, mode):
    """Plain loops: visit boxes by descending score, keep one unless it overlaps a kept box."""
    def overlap(a, b):
        iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]) + 1)
        ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]) + 1)
        area = lambda r: (r[2] - r[0] + 1) * (r[3] - r[1] + 1)  # noqa: E731
        inter = iw * ih
        return inter / (min(area(a), area(b)) if mode == "min" else area(a) + area(b) - inter)
    kept = []
    for i in sorted(range(len(scores)), key=lambda k: -scores[k]):
        if all(overlap(boxes[i], boxes[j]) <= threshold for j in kept):
            kept.append(i)
    return kept


def test_nms_matches_plain_reference(rng):
    xy = rng.uniform(0, 100, size=(60, 2))
    wh = rng.uniform(5, 40, size=(60, 2))
    boxes = np.concatenate([xy, xy + wh], axis=1)
    scores = rng.permutation(60) / 60.0
    for mode in ("union", "min"):
        for threshold in (0.3, 0.5, 0.7):
            assert nms(boxes, scores, threshold, mode).tolist() == \
                _nms_reference(boxes, scores, threshold, mode)


def test_pyramid_scales():
    scales = pyramid_scales(512, 384, min_face_size=20, factor=0.85)
    assert scales[0] == pytest.approx(12 / 20)
    np.testing.assert_allclose(np.diff(np.log(scales)), np.log(0.85))
    assert 384 * scales[-1] > 12 >= 384 * scales[-1] * 0.85
    assert pyramid_scales(19, 300) == []


def test_detector_input_checks():
    grey = np.arange(12, dtype=np.uint8).reshape(3, 4)
    rgb = to_rgb_array(grey)
    assert rgb.shape == (3, 4, 3) and np.all(rgb == grey[:, :, None])
    with pytest.raises(ValueError, match="uint8"):
        to_rgb_array(np.zeros((8, 8, 3), np.float32))
    with pytest.raises(ValueError, match=r"\(8, 8, 4\)"):
        to_rgb_array(np.zeros((8, 8, 4), np.uint8))


# -- detection on real photos ----------------------------------------------------------------

@needs_weights
def test_astronaut_one_face_box_and_landmarks(astronaut_detections):
    det = astronaut_detections
    assert len(det) == 1
    assert det.scores[0] > 0.99
    np.testing.assert_allclose(det.landmarks[0], ASTRONAUT_LANDMARKS, atol=2.0)
    # The documented box was measured with facenet-pytorch's pipeline (pyramid factor 0.709,
    # MATLAB-style box arithmetic); AdaFace's pipeline (factor 0.85, the mtcnn-pytorch box
    # arithmetic) regresses the box edges up to ~5 px differently.
    np.testing.assert_allclose(det.boxes[0], ASTRONAUT_BOX, atol=5.0)
    x1, y1, x2, y2 = det.boxes[0]
    assert np.all((det.landmarks[0] > [x1, y1]) & (det.landmarks[0] < [x2, y2]))


@needs_weights
def test_detected_landmarks_are_aligned_onto_reference(astronaut_detections):
    rgb = skdata.astronaut()
    landmarks = astronaut_detections.landmarks[0]
    aligned, matrix = align_face(rgb, landmarks, return_matrix=True)
    moved = transform_points(matrix, landmarks)
    # A least-squares fit of a real face: the eyes land within 2.5 px of the reference points and
    # no landmark is further than 6 px; the residual is the smallest any similarity achieves.
    assert np.abs(moved[:2] - REFERENCE_POINTS_112[:2]).max() < 2.5
    assert np.abs(moved - REFERENCE_POINTS_112).max() < 6.0
    best = transform_points(_skimage_similarity(landmarks, REFERENCE_POINTS_112)[:2], landmarks)
    np.testing.assert_allclose(moved, best, atol=1e-6)
    # the crop really samples the photo through that matrix
    yy, xx = np.mgrid[20:90:7, 20:90:7]
    inverse = cv2.invertAffineTransform(matrix)
    src = transform_points(inverse, np.stack([xx.ravel(), yy.ravel()], 1).astype(float))
    nearest = rgb[np.rint(src[:, 1]).astype(int), np.rint(src[:, 0]).astype(int)].astype(int)
    assert np.abs(aligned[yy.ravel(), xx.ravel()].astype(int) - nearest).mean() < 12


@needs_weights
@pytest.mark.parametrize("index", [1, 2], ids=["camera", "grace_hopper"])
def test_sample_photos_have_one_face(sample_photos, index):
    faces = fa.detect_faces(Image.open(sample_photos[index]))
    assert len(faces) == 1
    face = faces[0]
    assert face.score > 0.9 and face.landmarks.shape == (5, 2)
    assert face.aligned.size == (112, 112) and face.aligned.mode == "RGB"


@needs_weights
def test_get_aligned_face_from_path_and_pil(sample_photos):
    astronaut = sample_photos[0]
    from_path = fa.get_aligned_face(astronaut)
    assert isinstance(from_path, Image.Image)
    assert from_path.size == (112, 112) and from_path.mode == "RGB"
    from_pil = fa.get_aligned_face(None, rgb_pil_image=Image.open(astronaut))
    np.testing.assert_array_equal(np.asarray(from_pil), np.asarray(from_path))
    assert fa.get_detector() is fa.get_detector()  # built once, reused


@needs_weights
def test_no_face_returns_none_and_says_why(tmp_path, caplog):
    grey = tmp_path / "grey.png"
    Image.new("RGB", (200, 160), (128, 128, 128)).save(grey)
    coffee = tmp_path / "coffee.jpg"
    Image.fromarray(skdata.coffee()).save(coffee)
    for path in (grey, coffee):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="face_alignment.align"):
            assert fa.get_aligned_face(path) is None
        assert f"no face found in {path}" in caplog.text


@needs_weights
def test_missing_or_unreadable_file_is_a_clear_error(tmp_path):
    missing = tmp_path / "nope.jpg"
    with pytest.raises(FileNotFoundError, match="nope.jpg"):
        fa.get_aligned_face(missing)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"this is not a JPEG")
    with pytest.raises(ValueError, match="broken.jpg"):
        fa.get_aligned_face(broken)


@needs_weights
def test_align_folder_counts_found_and_missed(tmp_path, sample_photos):
    src, dst = tmp_path / "src", tmp_path / "dst"
    (src / "person").mkdir(parents=True)
    shutil.copyfile(sample_photos[0], src / "person" / "astronaut.jpg")
    Image.new("RGB", (90, 90), (30, 60, 90)).save(src / "flat.png")
    (src / "broken.jpg").write_bytes(b"\x00" * 16)
    (src / "notes.txt").write_text("not an image")
    summary = fa.align_folder(src, dst, progress=False)
    assert summary.found == 1
    assert summary.no_face == [src / "flat.png"]
    assert summary.unreadable == [src / "broken.jpg"]
    out = dst / "person" / "astronaut.jpg"
    with Image.open(out) as img:
        assert img.size == (112, 112) and img.mode == "RGB"
    assert not (dst / "flat.png").exists()
    again = fa.align_folder(src, dst, progress=False)
    assert again.skipped_existing == 1 and again.found == 0
    with pytest.raises(FileNotFoundError, match="missing_dir"):
        fa.align_folder(tmp_path / "missing_dir", dst, progress=False)


@needs_weights
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_detection_matches_cpu(astronaut_detections):
    det = MTCNN(device="cuda").detect(skdata.astronaut())
    assert len(det) == 1
    np.testing.assert_allclose(det.boxes, astronaut_detections.boxes, atol=0.5)
    np.testing.assert_allclose(det.landmarks, astronaut_detections.landmarks, atol=0.5)
