"""Export a face-recognition backbone to ONNX and check the file against PyTorch.

The exported graph takes the network input of ``utils/image.py`` (``input``: float32
``(batch, 3, 112, 112)``, BGR, in [-1, 1]) and returns both outputs of ``net.py``'s backbones:
``embedding`` ``(batch, 512)`` (L2-normalised) and ``norm`` ``(batch, 1)`` (the feature norm before
normalisation, AdaFace's quality score). The batch axis is dynamic.

The TorchScript-based exporter (``torch.onnx.export(..., dynamo=False)`` with ``dynamic_axes``) is
used: it needs only the ``onnx`` package, whereas the dynamo exporter that torch >= 2.9 uses by
default also needs ``onnxscript``. The parity check runs the file with onnxruntime on a batch whose
size differs from the export's, so that a batch size baked into the graph would be caught.
"""
from __future__ import annotations

import copy
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Tuple, Union

import numpy as np
import torch
from prettytable import PrettyTable
from torch import nn

from utils.errors import UserError
from utils.image import INPUT_SIZE

logger = logging.getLogger(__name__)

INPUT_NAME = "input"
OUTPUT_NAMES = ("embedding", "norm")
BATCH_AXIS = "batch"
DEFAULT_OPSET = 17
EXPORT_BATCH_SIZE = 2
CHECK_BATCH_SIZE = 3
EMBEDDING_ATOL = 1e-4
NORM_RTOL = 1e-4
_INSTALL_HINT = "pip install onnx onnxruntime"


class OnnxExportError(UserError, RuntimeError):
    """Export failed, a needed package is missing, or the exported file disagrees with PyTorch."""


def _import_onnx():
    try:
        import onnx
    except ImportError as exc:
        raise OnnxExportError(f"ONNX export needs the onnx package ({_INSTALL_HINT})") from exc
    return onnx


def _import_onnxruntime():
    try:
        import onnxruntime
    except ImportError as exc:
        raise OnnxExportError(f"checking an ONNX file needs onnxruntime ({_INSTALL_HINT})") from exc
    return onnxruntime


def _cpu_eval_copy(model: nn.Module) -> nn.Module:
    """A float32 CPU copy of ``model`` in eval mode (the caller's model keeps its device and mode)."""
    return copy.deepcopy(model).float().cpu().eval()


def _example_input(batch_size: int, seed: int = 0) -> torch.Tensor:
    """Uniform values in [-1, 1], the range of real network input."""
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch_size, 3, INPUT_SIZE, INPUT_SIZE, generator=generator) * 2 - 1


def export_onnx(model: nn.Module, path: Union[str, Path], opset_version: int = DEFAULT_OPSET,
                example_batch_size: int = EXPORT_BATCH_SIZE) -> Path:
    """Write ``model`` (a ``net.py`` backbone) to ``path`` as ONNX with a dynamic batch axis.

    The export traces a float32 CPU copy in eval mode (BatchNorm uses its running statistics) on
    an example batch of ``example_batch_size`` images; the graph is validated with
    ``onnx.checker``. Returns the path.
    """
    onnx = _import_onnx()
    path = Path(path)
    if path.is_dir():
        raise OnnxExportError(f"{path}: is a folder; give the path of the .onnx file to write")
    path.parent.mkdir(parents=True, exist_ok=True)
    cpu_model = _cpu_eval_copy(model)
    example = _example_input(example_batch_size)
    with torch.no_grad():
        outputs = cpu_model(example)
    if not (isinstance(outputs, (tuple, list)) and len(outputs) == len(OUTPUT_NAMES)):
        raise OnnxExportError(f"the model must return (embedding, norm); it returned "
                              f"{type(outputs).__name__}")
    dynamic_axes = {name: {0: BATCH_AXIS} for name in (INPUT_NAME, *OUTPUT_NAMES)}
    try:
        with warnings.catch_warnings():
            # torch >= 2.9 flags the TorchScript exporter as deprecated; it is still the one that
            # needs no onnxscript, and the parity check below guards its output.
            warnings.simplefilter("ignore", category=DeprecationWarning)
            warnings.simplefilter("ignore", category=FutureWarning)
            torch.onnx.export(cpu_model, (example,), str(path), dynamo=False,
                              input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES),
                              dynamic_axes=dynamic_axes, opset_version=opset_version,
                              do_constant_folding=True)
    except Exception as exc:  # noqa: BLE001 - re-raised with the target named
        raise OnnxExportError(f"{path}: ONNX export failed ({type(exc).__name__}: {exc})") from exc
    try:
        onnx.checker.check_model(str(path))
    except Exception as exc:  # noqa: BLE001
        raise OnnxExportError(f"{path}: the exported graph is not valid ONNX ({exc})") from exc
    logger.info("exported %s to %s (opset %d, dynamic batch axis)",
                getattr(model, "arch", type(model).__name__), path, opset_version)
    return path


def load_onnx_session(path: Union[str, Path]):
    """An onnxruntime CPU ``InferenceSession`` for an exported backbone; errors name the file."""
    ort = _import_onnxruntime()
    path = Path(path)
    if not path.is_file():
        raise OnnxExportError(f"{path}: ONNX file not found")
    try:
        return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001
        raise OnnxExportError(f"{path}: onnxruntime cannot load it ({exc})") from exc


def run_onnx(session, images: Union[np.ndarray, torch.Tensor]) -> Tuple[np.ndarray, np.ndarray]:
    """Run an exported backbone on network input ``(B, 3, 112, 112)``: ``(embedding, norm)``."""
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu().numpy()
    images = np.ascontiguousarray(images, dtype=np.float32)
    embedding, norm = session.run(list(OUTPUT_NAMES), {INPUT_NAME: images})
    return embedding, norm


@dataclass
class ParityReport:
    """How far onnxruntime's outputs are from PyTorch's on one random batch."""

    path: Path
    batch_size: int
    max_embedding_abs_diff: float
    max_norm_rel_diff: float
    embedding_atol: float = EMBEDDING_ATOL
    norm_rtol: float = NORM_RTOL

    @property
    def ok(self) -> bool:
        return (self.max_embedding_abs_diff <= self.embedding_atol
                and self.max_norm_rel_diff <= self.norm_rtol)

    def table(self) -> PrettyTable:
        table = PrettyTable(["output", "batch", "max difference", "tolerance", "ok"])
        table.add_row(["embedding", self.batch_size, f"{self.max_embedding_abs_diff:.2e} (abs)",
                       f"{self.embedding_atol:.0e}",
                       self.max_embedding_abs_diff <= self.embedding_atol])
        table.add_row(["norm", self.batch_size, f"{self.max_norm_rel_diff:.2e} (rel)",
                       f"{self.norm_rtol:.0e}", self.max_norm_rel_diff <= self.norm_rtol])
        return table


def check_onnx_parity(model: nn.Module, path: Union[str, Path], batch_size: int = CHECK_BATCH_SIZE,
                      embedding_atol: float = EMBEDDING_ATOL, norm_rtol: float = NORM_RTOL,
                      seed: int = 1, raise_on_failure: bool = True) -> ParityReport:
    """Compare the ONNX file at ``path`` with ``model`` (float32 CPU, eval mode) on a random batch.

    The embedding is compared in absolute terms (it is unit length), the norm relative to its
    value (float32 keeps about 7 significant digits whatever the norm's size). Raises
    ``OnnxExportError`` when a difference exceeds its tolerance, unless ``raise_on_failure`` is
    False.
    """
    session = load_onnx_session(path)
    images = _example_input(batch_size, seed=seed)
    with torch.no_grad():
        ref_embedding, ref_norm = _cpu_eval_copy(model)(images)
    embedding, norm = run_onnx(session, images)
    ref_embedding, ref_norm = ref_embedding.numpy(), ref_norm.numpy()
    if embedding.shape != ref_embedding.shape or norm.shape != ref_norm.shape:
        raise OnnxExportError(f"{path}: ONNX output shapes {embedding.shape}, {norm.shape} differ "
                              f"from PyTorch's {ref_embedding.shape}, {ref_norm.shape}")
    report = ParityReport(
        path=Path(path), batch_size=batch_size,
        max_embedding_abs_diff=float(np.max(np.abs(embedding - ref_embedding))),
        max_norm_rel_diff=float(np.max(np.abs(norm - ref_norm) / np.maximum(np.abs(ref_norm), 1e-12))),
        embedding_atol=embedding_atol, norm_rtol=norm_rtol)
    if not report.ok and raise_on_failure:
        raise OnnxExportError(
            f"{path}: onnxruntime disagrees with PyTorch on a batch of {batch_size}: embedding "
            f"max abs difference {report.max_embedding_abs_diff:.3g} (tolerance {embedding_atol:g}), "
            f"norm max relative difference {report.max_norm_rel_diff:.3g} (tolerance {norm_rtol:g})")
    logger.info("%s: onnxruntime matches PyTorch (embedding %.2e abs, norm %.2e rel, batch %d)",
                path, report.max_embedding_abs_diff, report.max_norm_rel_diff, batch_size)
    return report


def export_and_check(model: nn.Module, path: Union[str, Path], opset_version: int = DEFAULT_OPSET,
                     example_batch_size: int = EXPORT_BATCH_SIZE,
                     check_batch_size: int = CHECK_BATCH_SIZE) -> ParityReport:
    """:func:`export_onnx`, then :func:`check_onnx_parity` on a batch of another size."""
    if check_batch_size == example_batch_size:
        raise ValueError("check_batch_size must differ from example_batch_size, so that the "
                         "check exercises the dynamic batch axis")
    export_onnx(model, path, opset_version=opset_version, example_batch_size=example_batch_size)
    return check_onnx_parity(model, path, batch_size=check_batch_size)
