"""utils.pretrained: the published checkpoints, their lookup, and the download hint."""
import re

import pytest

from utils.checkpoint import CheckpointError
from utils.pretrained import (DEFAULT_MODEL_OF_ARCH, PUBLISHED_MODELS, MissingCheckpointError, UnknownModelError,
                              canonical_model_name, default_checkpoint_paths, find_pretrained_checkpoint,
                              models_of_arch, published_checkpoint)


def test_published_names_and_their_spellings():
    assert canonical_model_name("ir101_webface12m") == "ir101_webface12m"
    assert canonical_model_name("ir_101_webface12m") == "ir101_webface12m"
    assert canonical_model_name("IR_50_MS1MV2") == "ir50_ms1mv2"
    assert canonical_model_name("ir50") == "ir50_ms1mv2"              # the low-quality scripts' short name
    assert PUBLISHED_MODELS["ir18_vgg2"][:2] == ("adaface_ir18_vgg2.ckpt", "ir_18")
    assert PUBLISHED_MODELS["ir101_webface12m"].readme_row == "R100 / WebFace12M"
    with pytest.raises(UnknownModelError, match="published models: ir18_casia"):
        canonical_model_name("ir50_glint")


def test_every_file_follows_the_published_naming():
    for name, model in PUBLISHED_MODELS.items():
        assert model.file_name == f"adaface_{name}.ckpt"
        assert name.startswith(model.arch.replace("_", ""))


def test_default_file_of_each_architecture():
    assert default_checkpoint_paths() == {"ir_18": "pretrained/adaface_ir18_vgg2.ckpt",
                                          "ir_50": "pretrained/adaface_ir50_ms1mv2.ckpt",
                                          "ir_101": "pretrained/adaface_ir101_webface12m.ckpt"}
    for arch, name in DEFAULT_MODEL_OF_ARCH.items():
        assert PUBLISHED_MODELS[name].arch == arch
    assert models_of_arch("ir_18") == ["ir18_vgg2", "ir18_casia", "ir18_webface4m"]


def test_readme_of_the_pretrained_folder_lists_every_file(repo_root):
    text = (repo_root / "pretrained" / "README.md").read_text()
    rows = re.findall(r"^\| `([^`]+)` \| (\S+) \| ([^|]+?) \|$", text, flags=re.M)
    assert rows == [(m.file_name, m.arch, m.training_data) for m in PUBLISHED_MODELS.values()]


def test_missing_published_checkpoint_says_what_to_download_and_where(tmp_path):
    with pytest.raises(MissingCheckpointError) as info:
        published_checkpoint("ir_101_webface12m", tmp_path)
    assert isinstance(info.value, CheckpointError) and isinstance(info.value, FileNotFoundError)
    message = str(info.value)
    path = tmp_path / "adaface_ir101_webface12m.ckpt"
    assert "Download 'adaface_ir101_webface12m.ckpt'" in message and f"save it as {path}." in message
    assert "IR-101 trained on WebFace12M" in message and "R100 / WebFace12M" in message
    assert "Pretrained Models" in message and "--pretrained_dir" in message
    path.write_bytes(b"")
    assert published_checkpoint("ir101_webface12m", tmp_path) == (path, "ir_101")


def test_find_checkpoint_prefers_default_then_other_published(tmp_path):
    with pytest.raises(MissingCheckpointError) as info:
        find_pretrained_checkpoint("ir_18", tmp_path)
    message = str(info.value)
    assert f"save it as {tmp_path / 'adaface_ir18_vgg2.ckpt'}." in message
    assert "adaface_ir18_casia.ckpt, adaface_ir18_webface4m.ckpt" in message   # the alternatives
    (tmp_path / "adaface_ir50_casia.ckpt").touch()  # another architecture: never chosen
    (tmp_path / "adaface_ir18_casia.ckpt").touch()
    assert find_pretrained_checkpoint("ir_18", tmp_path).name == "adaface_ir18_casia.ckpt"
    (tmp_path / "adaface_ir18_vgg2.ckpt").touch()
    assert find_pretrained_checkpoint("ir_18", tmp_path).name == "adaface_ir18_vgg2.ckpt"
    with pytest.raises(UnknownModelError, match="ir_34"):
        find_pretrained_checkpoint("ir_34", tmp_path)
