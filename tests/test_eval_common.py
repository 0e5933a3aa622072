"""utils.eval_common: model names, devices, input checks, image loading and saved features."""
import argparse

import numpy as np
import pytest
import torch

from face_alignment.similarity import REFERENCE_POINTS_112
from net import build_model
from utils.checkpoint import CheckpointError, save_lightning_style_checkpoint
from utils.eval_common import (EvalInputError, FeatureSet, ImageListDataset, MissingFilesError, ModelSpec,
                               add_model_arguments, check_files_exist, file_safe, load_features, load_model,
                               model_specs_from_args, run_cli, save_features, select_by_names, str2bool)
from utils.pretrained import MissingCheckpointError
from utils.image import encode_png, rgb_to_tensor


def _parse(argv, multiple=False):
    parser = argparse.ArgumentParser()
    add_model_arguments(parser, multiple=multiple)
    return parser.parse_args(argv)


def test_model_specs_from_the_command_line(tmp_path):
    a, b = tmp_path / "x" / "last.ckpt", tmp_path / "y" / "last.ckpt"
    for p in (a, b):
        p.parent.mkdir()
        p.write_bytes(b"")
    specs = model_specs_from_args(_parse(["--ckpt_path", str(a), str(b), "--arch", "ir_50"], multiple=True))
    assert [s.arch for s in specs] == ["ir_50", "ir_50"]
    assert specs[0].label != specs[1].label and all("last" in s.label for s in specs)
    twice = model_specs_from_args(_parse(["--ckpt_path", str(a), str(a)], multiple=True))
    assert twice[0].label != twice[1].label and twice[0].arch is None
    assert file_safe(specs[0].label).count("/") == 0
    pretrained = tmp_path / "pretrained"
    pretrained.mkdir()
    (pretrained / "adaface_ir50_ms1mv2.ckpt").write_bytes(b"")
    named = model_specs_from_args(_parse(["--model_name", "ir50", "--pretrained_dir", str(pretrained)]))
    assert named == [ModelSpec("ir50_ms1mv2", pretrained / "adaface_ir50_ms1mv2.ckpt", "ir_50")]
    with pytest.raises(MissingCheckpointError, match="save it as .*adaface_ir101_webface12m.ckpt"):
        model_specs_from_args(_parse(["--model_name", "ir_101_webface12m", "--pretrained_dir", str(pretrained)]))
    with pytest.raises(EvalInputError, match="not both"):
        model_specs_from_args(_parse(["--model_name", "ir50", "--ckpt_path", str(a)]))
    with pytest.raises(EvalInputError, match="--features_path"):
        model_specs_from_args(_parse([]))
    with pytest.raises(MissingFilesError, match="nothere.ckpt"):
        model_specs_from_args(_parse(["--ckpt_path", str(tmp_path / "nothere.ckpt")]))
    with pytest.raises(EvalInputError, match="one --arch for all"):
        model_specs_from_args(_parse(["--ckpt_path", str(a), str(b), str(a), "--arch", "ir_18", "ir_50"],
                                     multiple=True))


def test_load_model_reads_the_architecture_from_the_checkpoint(tmp_path):
    torch.manual_seed(1)
    reference = build_model("ir_tiny").eval()
    path = save_lightning_style_checkpoint(tmp_path / "t.ckpt", reference, hyper_parameters={"arch": "ir_tiny"})
    spec = ModelSpec("t", path)
    model = load_model(spec, "cpu")
    assert spec.arch == "ir_tiny" and not model.training
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        torch.testing.assert_close(model(x)[0], reference(x)[0])
    bare = save_lightning_style_checkpoint(tmp_path / "bare.ckpt", reference)  # recognised from its keys
    assert load_model(ModelSpec("bare", bare), "cpu").arch == "ir_tiny"
    partial = {k: v for k, v in reference.state_dict().items() if k != "output_layer.3.bias"}
    unknown = save_lightning_style_checkpoint(tmp_path / "unknown.ckpt", partial)
    with pytest.raises(CheckpointError, match="pass --arch"):
        load_model(ModelSpec("unknown", unknown), "cpu")


def test_str2bool():
    assert str2bool("True") and str2bool("1") and not str2bool("false")
    with pytest.raises(argparse.ArgumentTypeError):
        str2bool("maybe")


def test_missing_files_are_listed_once_with_a_count(tmp_path):
    (tmp_path / "a").mkdir()
    for name in ("1.jpg", "2.jpg"):
        (tmp_path / "a" / name).write_bytes(b"x")
    check_files_exist(tmp_path, ["a/1.jpg", "a/2.jpg"])
    wanted = ["a/1.jpg"] + [f"a/{i}.jpg" for i in range(3, 11)] + ["b/1.jpg"]
    with pytest.raises(MissingFilesError) as info:
        check_files_exist(tmp_path, wanted, "faces")
    message = str(info.value)
    assert message.startswith(f"9 of 10 faces missing under {tmp_path}: a/3.jpg, a/4.jpg")
    assert ", ... and 4 more" in message and "a/10.jpg" not in message


def test_image_list_dataset_aligns_with_landmarks(tmp_path):
    rng = np.random.default_rng(0)
    face = rng.integers(0, 256, size=(112, 112, 3), dtype=np.uint8)
    (tmp_path / "aligned.png").write_bytes(encode_png(face))
    canvas = np.zeros((200, 240, 3), np.uint8)
    canvas[30:142, 50:162] = face                           # the face shifted by (50, 30)
    (tmp_path / "loose.png").write_bytes(encode_png(canvas))
    plain = ImageListDataset([tmp_path / "aligned.png"])
    image, index = plain[0]
    assert index == 0 and torch.equal(image, rgb_to_tensor(face))
    shifted = ImageListDataset([tmp_path / "loose.png"], REFERENCE_POINTS_112[None] + [50.0, 30.0])
    torch.testing.assert_close(shifted[0][0], rgb_to_tensor(face), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="loose.png: expected an aligned 112x112"):
        ImageListDataset([tmp_path / "loose.png"])[0]


def test_features_round_trip_and_name_checks(tmp_path):
    rng = np.random.default_rng(0)
    feature_set = FeatureSet(rng.normal(size=(4, 8)).astype(np.float32), rng.random((4, 1)).astype(np.float32),
                             ["a.jpg", "b.jpg", "c.jpg", "d.jpg"], {"kind": "IJBC", "fusion_method": "average"},
                             {"extra": np.arange(3)})
    path = save_features(tmp_path / "f.npz", feature_set)
    loaded = load_features(path, "IJBC")
    np.testing.assert_array_equal(loaded.features, feature_set.features)
    np.testing.assert_array_equal(loaded.norms, feature_set.norms)
    assert loaded.names == feature_set.names and loaded.fusion_method == "average"
    np.testing.assert_array_equal(loaded.arrays["extra"], np.arange(3))
    picked = select_by_names(loaded, ["c.jpg", "a.jpg"], "f.npz")
    np.testing.assert_array_equal(picked.features, feature_set.features[[2, 0]])
    with pytest.raises(EvalInputError, match="2 of the 3 images .* no saved feature: x.jpg, y.jpg"):
        select_by_names(loaded, ["a.jpg", "x.jpg", "y.jpg"], "f.npz")
    with pytest.raises(EvalInputError, match="holds 'IJBC' features, not 'TinyFace'"):
        load_features(path, "TinyFace")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(EvalInputError, match="junk.npz"):
        load_features(tmp_path / "junk.npz")


def test_run_cli_turns_input_errors_into_one_line(capsys):
    def failing(argv):
        raise MissingFilesError("3 of 9 images missing under /x: a, b, c")
    assert run_cli(failing, []) == 2
    assert capsys.readouterr().err.strip() == "error: 3 of 9 images missing under /x: a, b, c"

    def buggy(argv):
        raise KeyError("a bug")
    with pytest.raises(KeyError):
        run_cli(buggy, [])
