"""Shared pytest fixtures.

Module-specific fixtures live in their own test files; only fixtures that several
test modules use belong here.
"""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
TEST_DATA = Path(__file__).resolve().parent / "data"


@pytest.fixture(autouse=True)
def _deterministic_seed():
    """Every test starts from the same random state."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def test_data_dir() -> Path:
    return TEST_DATA


@pytest.fixture(scope="module")
def single_torch_thread():
    """Run a test module with one torch thread (restored afterwards). Small-op workloads (MTCNN,
    ONNX tracing) ran 10-40x slower with two threads on the shared 2-core build machine
    (bench/README.md, bench_inference.py)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
