"""Tests of inference.py: checkpoint lookup, the align -> embed -> compare pipeline, the CLI."""
from __future__ import annotations

import argparse
import dataclasses
import re
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

import inference
import utils.image
from face_alignment.align import get_aligned_face
from face_alignment.nets import INSTALL_HINT, packaged_weights_dir
from face_alignment.sample_images import ensure_test_images
from net import build_model
from tests.reference_image import published_input
from utils.checkpoint import CheckpointError, save_lightning_style_checkpoint
from utils.image import encode_jpeg, encode_png, load_image_file

needs_weights = pytest.mark.skipif(
    packaged_weights_dir() is None,
    reason=f"MTCNN weights absent: the facenet-pytorch wheel is not installed ({INSTALL_HINT})")

# MTCNN runs many small ops, which two threads slow down badly on a busy 2-core machine.
pytestmark = pytest.mark.usefixtures("single_torch_thread")


def _save_checkpoint(path, model):
    """A checkpoint in the published Lightning layout: model.*, AdaFace head.*, Namespace args."""
    head = {"kernel": torch.randn(512, 7), "t": torch.zeros(1),
            "batch_mean": torch.ones(1) * 20, "batch_std": torch.ones(1) * 100}
    return save_lightning_style_checkpoint(path, model, head_state=head,
                                           hyper_parameters=argparse.Namespace(arch=model.arch, m=0.4))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """An ir_tiny backbone with random weights (eval mode) and its checkpoint file."""
    model = build_model("ir_tiny").eval()
    path = _save_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.ckpt", model)
    return model, path


@pytest.fixture(scope="module")
def ir18_pretrained_dir(tmp_path_factory):
    """A pretrained/ folder holding a random ir_18 under a published (non-default) file name."""
    folder = tmp_path_factory.mktemp("pretrained")
    model = build_model("ir_18").eval()
    _save_checkpoint(folder / "adaface_ir18_webface4m.ckpt", model)
    return folder, model


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory):
    """astronaut.jpg (full size) and a half-size grace_hopper, a flat image, a broken JPEG."""
    samples = ensure_test_images(tmp_path_factory.mktemp("samples"))
    folder = tmp_path_factory.mktemp("photos")
    (folder / "astronaut.jpg").write_bytes(samples[0].read_bytes())
    hopper = load_image_file(samples[2])
    small = cv2.resize(hopper, (hopper.shape[1] // 2, hopper.shape[0] // 2),
                       interpolation=cv2.INTER_AREA)
    (folder / "people").mkdir()
    (folder / "people" / "hopper_small.jpg").write_bytes(encode_jpeg(small))
    (folder / "flat.png").write_bytes(encode_png(np.full((160, 160, 3), 128, np.uint8)))
    (folder / "broken.jpg").write_bytes(b"this is not a JPEG")
    return folder


@pytest.fixture(scope="module")
def result(tiny, photo_dir):
    return inference.run_inference(tiny[0], photo_dir, progress=False)


def _model_output(model, pil_image, flip=False):
    x = utils.image.to_input(pil_image)
    if flip:
        x = torch.flip(x, dims=[3])
    with torch.no_grad():
        emb, norm = model(x)
    return emb[0].numpy().astype(np.float64), float(norm[0, 0])


# -- checkpoints ------------------------------------------------------------------------------

def test_published_checkpoint_names():
    assert inference.adaface_models == {"ir_18": "pretrained/adaface_ir18_vgg2.ckpt",
                                        "ir_50": "pretrained/adaface_ir50_ms1mv2.ckpt",
                                        "ir_101": "pretrained/adaface_ir101_webface12m.ckpt"}


def test_missing_checkpoint_message(tmp_path):
    with pytest.raises(CheckpointError) as info:
        inference.load_pretrained_model("ir_101", pretrained_dir=tmp_path)
    message = str(info.value)
    assert "adaface_ir101_webface12m.ckpt" in message
    assert str(tmp_path / "adaface_ir101_webface12m.ckpt") in message
    assert "README" in message and "R100 / WebFace12M" in message


def test_cli_without_checkpoint_exits_nonzero_without_traceback(tmp_path, repo_root):
    proc = subprocess.run([sys.executable, "inference.py", "--pretrained_dir", str(tmp_path)],
                          cwd=repo_root, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "Download 'adaface_ir50_ms1mv2.ckpt'" in proc.stderr
    assert f"save it as {tmp_path / 'adaface_ir50_ms1mv2.ckpt'}" in proc.stderr
    assert "Pretrained Models" in proc.stderr
    assert proc.stdout == ""


def test_load_from_pretrained_dir_and_guess_architecture(ir18_pretrained_dir):
    folder, reference = ir18_pretrained_dir
    for model in (inference.load_pretrained_model("ir_18", pretrained_dir=folder),
                  inference.load_pretrained_model(ckpt_path=folder / "adaface_ir18_webface4m.ckpt")):
        assert model.arch == "ir_18" and not model.training
        for key, value in reference.state_dict().items():
            assert torch.equal(model.state_dict()[key], value), key


def test_checkpoint_of_another_architecture_is_refused(tiny, tmp_path, capsys):
    with pytest.raises(CheckpointError, match="does not fit the ir_18 backbone"):
        inference.load_pretrained_model("ir_18", ckpt_path=tiny[1])
    # the architecture comes from the training arguments, else from the keys
    assert inference.load_pretrained_model(ckpt_path=tiny[1]).arch == "ir_tiny"
    bare = save_lightning_style_checkpoint(tmp_path / "bare.ckpt", tiny[0])
    assert inference.load_pretrained_model(ckpt_path=bare).arch == "ir_tiny"
    partial = {k: v for k, v in tiny[0].state_dict().items() if k != "output_layer.3.bias"}
    unknown = save_lightning_style_checkpoint(tmp_path / "unknown.ckpt", partial)
    with pytest.raises(CheckpointError, match="--arch"):
        inference.load_pretrained_model(ckpt_path=unknown)
    with pytest.raises(ValueError, match="--device .tpu. is not a device"):
        inference.load_pretrained_model(ckpt_path=tiny[1], device="tpu")
    assert inference.main(["--ckpt_path", str(tiny[1]), "--arch", "ir_50"]) == 2
    err = capsys.readouterr().err
    assert str(tiny[1]) in err and "Traceback" not in err


def test_to_input_is_the_published_convention(rng):
    assert inference.to_input is utils.image.to_input
    rgb = rng.integers(0, 256, size=(112, 112, 3), dtype=np.uint8)
    tensor = inference.to_input(Image.fromarray(rgb))
    assert tensor.shape == (1, 3, 112, 112) and tensor.dtype == torch.float32
    np.testing.assert_allclose(tensor[0].numpy(), published_input(rgb), atol=1e-6)


def test_cosine_similarity_matrix():
    sims = inference.cosine_similarity_matrix(np.array([[2.0, 0.0], [1.0, 1.0], [0.0, -3.0]]))
    r = np.sqrt(0.5)
    np.testing.assert_allclose(sims, [[1, r, 0], [r, 1, -r], [0, -r, 1]], atol=1e-12)
    with pytest.raises(ValueError, match="all zeros"):
        inference.cosine_similarity_matrix(np.zeros((2, 4)))


# -- the pipeline on real photos ----------------------------------------------------------------

@needs_weights
def test_similarity_matrix_symmetric_with_unit_diagonal(result):
    assert result.names == ["astronaut.jpg", "people/hopper_small.jpg"]
    sims = result.similarity
    assert sims.shape == (2, 2)
    assert np.array_equal(sims, sims.T)
    np.testing.assert_allclose(np.diag(sims), 1.0, atol=1e-6)
    assert -1.0 <= sims[0, 1] < 0.999  # two different photos
    assert result.features.shape == (2, 512) and np.all(result.norms > 0)


@needs_weights
def test_astronaut_aligns_exactly_one_face(result, photo_dir):
    astronaut = result.faces[0]
    assert astronaut.name == "astronaut.jpg" and astronaut.faces_in_photo == 1
    assert astronaut.detection_score > 0.99
    assert astronaut.aligned.size == (112, 112) and astronaut.aligned.mode == "RGB"
    # the same crop as the published API returns
    reference = get_aligned_face(photo_dir / "astronaut.jpg")
    assert np.array_equal(np.asarray(astronaut.aligned), np.asarray(reference))


@needs_weights
def test_features_and_norms_equal_the_backbone_on_to_input(result, tiny):
    model = tiny[0]
    for face in result.faces:
        emb, norm = _model_output(model, face.aligned)
        np.testing.assert_allclose(face.feature, emb, atol=1e-5)
        assert face.norm == pytest.approx(norm, rel=1e-5)
    e0, e1 = (_model_output(model, f.aligned)[0] for f in result.faces)
    assert result.similarity[0, 1] == pytest.approx(e0 @ e1 / np.linalg.norm(e0) / np.linalg.norm(e1),
                                                    abs=1e-5)


@needs_weights
def test_skipped_images_are_listed_with_the_reason(result, photo_dir):
    reasons = {path.name: reason for path, reason in result.skipped}
    assert set(reasons) == {"flat.png", "broken.jpg"}
    assert reasons["flat.png"] == "no face found"
    assert reasons["broken.jpg"].startswith("unreadable")
    assert str(photo_dir / "broken.jpg") in reasons["broken.jpg"]


@needs_weights
def test_flip_fusion_uses_the_mirrored_face(result, tiny):
    copy = inference.InferenceResult(faces=[dataclasses.replace(f) for f in result.faces])
    inference.embed_faces(tiny[0], copy, fusion_method="pre_norm_vector_add")
    for face in copy.faces:
        e1, n1 = _model_output(tiny[0], face.aligned)
        e2, n2 = _model_output(tiny[0], face.aligned, flip=True)
        fused = e1 * n1 + e2 * n2
        assert face.norm == pytest.approx(np.linalg.norm(fused), rel=1e-5)
        np.testing.assert_allclose(face.feature, fused / np.linalg.norm(fused), atol=1e-5)
    with pytest.raises(ValueError, match="fusion_method"):
        inference.embed_faces(tiny[0], copy, fusion_method="max")


def _indicator(norm, mean=20.0, std=100.0, h=0.333):
    """The published AdaFace head's scaler with the fixture checkpoint's statistics (20, 100) and
    the published default h (the checkpoint's arguments do not record one), eps 1e-3."""
    return min(max((min(max(norm, 0.001), 100.0) - mean) / (std + 1e-3) * h, -1.0), 1.0)


@needs_weights
def test_quality_indicator_per_face_and_min_quality(result, tiny):
    stats = inference.load_norm_statistics(ckpt_path=tiny[1])
    assert (stats.batch_mean, stats.batch_std, stats.h) == (20.0, 100.0, 0.333)
    copy = inference.InferenceResult(faces=[dataclasses.replace(f) for f in result.faces])
    inference.embed_faces(tiny[0], copy, statistics=stats)
    for face in copy.faces:
        assert face.image_norm == pytest.approx(_model_output(tiny[0], face.aligned)[1], rel=1e-5)
        assert face.quality == pytest.approx(_indicator(face.image_norm), abs=1e-7)
    np.testing.assert_allclose(copy.qualities, [f.quality for f in copy.faces])
    # with the flip test the indicator uses the mean of the two views' norms, not the fused norm
    flipped = inference.InferenceResult(faces=[dataclasses.replace(f) for f in result.faces])
    inference.embed_faces(tiny[0], flipped, fusion_method="pre_norm_vector_add", statistics=stats)
    face = flipped.faces[0]
    mean_norm = (_model_output(tiny[0], face.aligned)[1] + _model_output(tiny[0], face.aligned, flip=True)[1]) / 2
    assert face.quality == pytest.approx(_indicator(mean_norm), abs=1e-7)
    # the random backbone's norms lie above the head's clip at 100: both faces sit at the clip,
    # (100 - 20) / (100 + 1e-3) * 0.333
    assert all(f.image_norm > 100 for f in copy.faces)
    np.testing.assert_allclose(copy.qualities, 80 / 100.001 * 0.333, rtol=1e-6)
    # --min_quality: faces below it move to the skipped list with the reason, the others stay
    copy.faces[0].quality, copy.faces[1].quality = -0.2, 0.3
    low, high = copy.faces
    inference.filter_by_quality(copy, 0.0)
    assert [f.name for f in copy.faces] == [high.name]
    path, reason = copy.skipped[-1]
    assert path == low.path and reason.startswith("quality indicator -0.200 below --min_quality 0")
    # without statistics there is no indicator to filter on: one clear error
    with pytest.raises(inference.QualityError, match="no AdaFace norm statistics"):
        inference.filter_by_quality(inference.InferenceResult(faces=[dataclasses.replace(result.faces[0])]), 0.0)


@needs_weights
def test_cli_prints_matrix_and_norms(tiny, tmp_path, capsys):
    photos = ensure_test_images(tmp_path / "samples")
    folder = tmp_path / "photos"
    folder.mkdir()
    for path in (photos[1], photos[2]):  # camera, grace_hopper at half size
        rgb = load_image_file(path)
        half = cv2.resize(rgb, (rgb.shape[1] // 2, rgb.shape[0] // 2), interpolation=cv2.INTER_AREA)
        (folder / path.name).write_bytes(encode_jpeg(half))
    (folder / "empty.png").write_bytes(encode_png(np.zeros((120, 120, 3), np.uint8)))

    assert inference.main(["--image_dir", str(folder), "--ckpt_path", str(tiny[1]),
                           "--arch", "ir_tiny", "--no_progress"]) == 0
    out = capsys.readouterr().out
    assert f"skipped {folder / 'empty.png'}: no face found" in out
    header = next(line for line in out.splitlines()
                  if "camera.jpg" in line and "grace_hopper.jpg" in line)
    assert header.index("camera.jpg") < header.index("grace_hopper.jpg")
    rows = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 3 and cells[0] in ("camera.jpg", "grace_hopper.jpg"):
            rows[cells[0]] = [float(c) for c in cells[1:]]
    matrix = np.array([rows["camera.jpg"], rows["grace_hopper.jpg"]])
    assert np.array_equal(matrix, matrix.T) and np.all(np.diag(matrix) == 1.0)
    norms = re.findall(r"\|\s*(camera\.jpg|grace_hopper\.jpg)\s*\|\s*([0-9.]+)\s*\|\s*1\s*\|", out)
    assert [name for name, _ in norms] == ["camera.jpg", "grace_hopper.jpg"]
    assert all(float(value) > 0 for _, value in norms)
    # the quality indicator column, from the checkpoint's statistics
    quality = re.findall(r"\|\s*(camera\.jpg|grace_hopper\.jpg)\s*\|\s*([0-9.]+)\s*\|\s*1\s*\|\s*[0-9.]+\s*\|"
                         r"\s*([-+][0-9.]+)\s*\|", out)
    assert [(n, round(_indicator(float(v)), 3)) for n, v, _ in quality] == [(n, float(q)) for n, _, q in quality]
    assert len(quality) == 2

    # --min_quality above every face: all listed as skipped, then one error line
    assert inference.main(["--image_dir", str(folder), "--ckpt_path", str(tiny[1]), "--arch", "ir_tiny",
                           "--no_progress", "--min_quality", "0.9"]) == 2
    captured = capsys.readouterr()
    assert f"skipped {folder / 'camera.jpg'}: quality indicator" in captured.out
    assert "no face under" in captured.err and "--min_quality 0.9" in captured.err


def test_cli_reports_bad_image_folder(tiny, tmp_path, capsys):
    args = ["--ckpt_path", str(tiny[1]), "--arch", "ir_tiny"]
    assert inference.main(args + ["--image_dir", str(tmp_path / "missing")]) == 2
    assert "image folder not found" in capsys.readouterr().err
    (tmp_path / "notes.txt").write_text("no images here")
    assert inference.main(args + ["--image_dir", str(tmp_path)]) == 2
    assert "no image files" in capsys.readouterr().err
