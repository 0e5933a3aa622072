"""Tests of utils/onnx_export.py and ``inference.py --export_onnx``: dynamic batch, both outputs,
parity with PyTorch through onnxruntime."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

import onnx  # noqa: E402

import inference  # noqa: E402
from net import build_model  # noqa: E402
from utils.checkpoint import save_lightning_style_checkpoint  # noqa: E402
from utils.onnx_export import (EXPORT_BATCH_SIZE, OnnxExportError, check_onnx_parity,  # noqa: E402
                               export_and_check, export_onnx, load_onnx_session, run_onnx)

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def _trained_looking(model: torch.nn.Module) -> torch.nn.Module:
    """Give BatchNorm running statistics away from (0, 1) so that eval mode differs from train."""
    generator = torch.Generator().manual_seed(3)
    for module in model.modules():
        if isinstance(module, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
            n = module.num_features
            module.running_mean.copy_(torch.randn(n, generator=generator) * 0.1)
            module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
    return model.eval()


@pytest.fixture(scope="module")
def model():
    return _trained_looking(build_model("ir_tiny"))


@pytest.fixture(scope="module")
def exported(model, tmp_path_factory):
    return export_onnx(model, tmp_path_factory.mktemp("onnx") / "ir_tiny.onnx")


def _dims(value_info):
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


def test_graph_has_dynamic_batch_and_both_outputs(exported):
    graph = onnx.load(str(exported)).graph
    assert [i.name for i in graph.input] == ["input"]
    assert _dims(graph.input[0]) == ["batch", 3, 112, 112]
    assert {o.name: _dims(o) for o in graph.output} == {"embedding": ["batch", 512],
                                                         "norm": ["batch", 1]}


@pytest.mark.parametrize("batch_size", [1, 5])
def test_onnxruntime_matches_pytorch_on_other_batch_sizes(model, exported, batch_size):
    assert batch_size != EXPORT_BATCH_SIZE
    images = torch.rand(batch_size, 3, 112, 112) * 2 - 1
    with torch.no_grad():
        ref_embedding, ref_norm = model(images)
    embedding, norm = run_onnx(load_onnx_session(exported), images)
    assert embedding.shape == (batch_size, 512) and norm.shape == (batch_size, 1)
    np.testing.assert_allclose(embedding, ref_embedding.numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(norm, ref_norm.numpy(), rtol=1e-4, atol=0)
    np.testing.assert_allclose(np.linalg.norm(embedding, axis=1), 1.0, atol=1e-5)


def test_parity_check_catches_a_different_model(model, exported):
    report = check_onnx_parity(model, exported)
    assert report.ok and report.batch_size != EXPORT_BATCH_SIZE
    assert report.max_embedding_abs_diff <= 1e-4 and report.max_norm_rel_diff <= 1e-4
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.output_layer[3].weight.mul_(1.01)  # the final linear layer, 1% larger
    with pytest.raises(OnnxExportError, match="disagrees with PyTorch"):
        check_onnx_parity(other, exported)
    assert not check_onnx_parity(other, exported, raise_on_failure=False).ok


def test_export_uses_eval_mode_and_leaves_the_model_alone(model, tmp_path):
    model.train()
    try:
        path = export_onnx(model, tmp_path / "from_train_mode.onnx")
        assert model.training  # the caller's model keeps its mode
    finally:
        model.eval()
    images = torch.rand(3, 3, 112, 112) * 2 - 1
    with torch.no_grad():
        ref_embedding, _ = model(images)  # eval mode: running statistics
    embedding, _ = run_onnx(load_onnx_session(path), images)
    np.testing.assert_allclose(embedding, ref_embedding.numpy(), atol=1e-4)


def test_errors_name_the_file(model, tmp_path):
    with pytest.raises(OnnxExportError, match="not found"):
        load_onnx_session(tmp_path / "missing.onnx")
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a model")
    with pytest.raises(OnnxExportError, match="garbage.onnx"):
        load_onnx_session(garbage)
    with pytest.raises(OnnxExportError, match="is a folder"):
        export_onnx(model, tmp_path)
    with pytest.raises(ValueError, match="must differ"):
        export_and_check(model, tmp_path / "x.onnx", example_batch_size=4, check_batch_size=4)


def test_cli_export_onnx(model, tmp_path, capsys):
    ckpt = save_lightning_style_checkpoint(tmp_path / "tiny.ckpt", model)
    out_path = tmp_path / "exported" / "tiny.onnx"
    assert inference.main(["--ckpt_path", str(ckpt), "--arch", "ir_tiny",
                           "--export_onnx", str(out_path)]) == 0
    out = capsys.readouterr().out
    assert f"wrote {out_path}" in out and "embedding" in out and "norm" in out
    images = torch.rand(4, 3, 112, 112) * 2 - 1
    with torch.no_grad():
        ref_embedding, ref_norm = model(images)
    embedding, norm = run_onnx(load_onnx_session(out_path), images)
    np.testing.assert_allclose(embedding, ref_embedding.numpy(), atol=1e-4)
    np.testing.assert_allclose(norm, ref_norm.numpy(), rtol=1e-4)
