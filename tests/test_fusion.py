"""Flip fusion: every method against hand-computed values, on torch tensors and numpy arrays."""
import math

import numpy as np
import pytest
import torch

from utils.fusion import FUSION_METHODS, fuse_features

# e1 = (1, 0) with norm 2, its flip e2 = (0, 1) with norm 1; a second row e1 = (0.6, 0.8), e2 = (0.8, 0.6)
E1 = [[1.0, 0.0], [0.6, 0.8]]
N1 = [[2.0], [1.0]]
E2 = [[0.0, 1.0], [0.8, 0.6]]
N2 = [[1.0], [3.0]]
S5, S2 = math.sqrt(5.0), math.sqrt(2.0)
# row 2: 1*(0.6, 0.8) + 3*(0.8, 0.6) = (3.0, 2.6), norm sqrt(15.76)
R2 = math.sqrt(3.0 ** 2 + 2.6 ** 2)
EXPECTED = {
    "pre_norm_vector_add": ([[2 / S5, 1 / S5], [3.0 / R2, 2.6 / R2]], [[S5], [R2]]),
    # weights n_i / sum: (2/3, 1/3) and (1/4, 3/4) -> same directions, norm = mean of the norms
    "norm_weighted_avg": ([[2 / S5, 1 / S5], [3.0 / R2, 2.6 / R2]], [[1.5], [2.0]]),
    "average": ([[1 / S2, 1 / S2], [S2 / 2, S2 / 2]], [[1.5], [2.0]]),
    "concat": ([[1.0, 0.0, 0.0, 1.0], [0.6, 0.8, 0.8, 0.6]], [[1.5], [2.0]]),
    "none": (E1, N1),
}


def _inputs(kind):
    arrays = [np.array(x, dtype=np.float32) for x in (E1, N1, E2, N2)]
    return [torch.from_numpy(a) for a in arrays] if kind == "torch" else arrays


@pytest.mark.parametrize("kind", ["torch", "numpy"])
@pytest.mark.parametrize("method", list(EXPECTED))
def test_methods_match_hand_computed_values(kind, method):
    e1, n1, e2, n2 = _inputs(kind)
    feats, norms = fuse_features(e1, n1, e2, n2, method=method)
    assert isinstance(feats, torch.Tensor if kind == "torch" else np.ndarray)
    assert isinstance(norms, torch.Tensor if kind == "torch" else np.ndarray)
    want_feats, want_norms = EXPECTED[method]
    np.testing.assert_allclose(np.asarray(feats), want_feats, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(norms), want_norms, rtol=1e-6)
    assert tuple(norms.shape) == (2, 1)


def test_none_means_no_flip_and_ignores_flip_inputs():
    e1, n1, e2, n2 = _inputs("torch")
    for method in (None, "none", "None"):
        feats, norms = fuse_features(e1, n1, e2, n2, method=method)
        assert feats is e1 and torch.equal(norms, n1)
    feats, _ = fuse_features(e1, n1, method=None)
    assert feats is e1


@pytest.mark.parametrize("method", ["pre_norm_vector_add", "norm_weighted_avg", "average", "concat"])
def test_torch_and_numpy_agree_on_random_data(method):
    rng = np.random.default_rng(3)
    raw1, raw2 = rng.normal(size=(16, 512)), rng.normal(size=(16, 512))
    n1, n2 = np.linalg.norm(raw1, axis=1, keepdims=True), np.linalg.norm(raw2, axis=1, keepdims=True)
    args = [raw1 / n1, n1, raw2 / n2, n2]
    f_np, n_np = fuse_features(*args, method=method)
    f_t, n_t = fuse_features(*[torch.from_numpy(a) for a in args], method=method)
    np.testing.assert_allclose(f_t.numpy(), f_np, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(n_t.numpy(), n_np, rtol=1e-12)
    if method != "concat":
        np.testing.assert_allclose(np.linalg.norm(f_np, axis=1), 1.0, rtol=1e-12)
    if method == "pre_norm_vector_add":   # the fused norm is that of the un-normalised sum
        np.testing.assert_allclose(n_np, np.linalg.norm(raw1 + raw2, axis=1, keepdims=True), rtol=1e-12)


def test_one_dimensional_norms_are_accepted():
    e1, n1, e2, n2 = _inputs("numpy")
    feats, norms = fuse_features(e1, n1[:, 0], e2, n2[:, 0], method="pre_norm_vector_add")
    np.testing.assert_allclose(feats, EXPECTED["pre_norm_vector_add"][0], rtol=1e-6)
    assert norms.shape == (2, 1)


def test_average_and_concat_work_without_norms():
    e1, _, e2, _ = _inputs("torch")
    feats, norms = fuse_features(e1, None, e2, None, method="average")
    np.testing.assert_allclose(feats.numpy(), EXPECTED["average"][0], rtol=1e-6)
    assert torch.equal(norms, torch.ones(2, 1))


def test_bad_inputs_raise_clear_errors():
    e1, n1, e2, n2 = _inputs("numpy")
    with pytest.raises(ValueError, match="pre_norm_vector_add.*norm_weighted_avg.*average.*concat"):
        fuse_features(e1, n1, e2, n2, method="max")
    with pytest.raises(ValueError, match="needs flip_emb"):
        fuse_features(e1, n1, method="average")
    with pytest.raises(ValueError, match="needs norm"):
        fuse_features(e1, None, e2, None, method="norm_weighted_avg")
    with pytest.raises(TypeError, match="not a mix"):
        fuse_features(torch.from_numpy(e1), n1, torch.from_numpy(e2), torch.from_numpy(n2))
    with pytest.raises(ValueError, match="shape"):
        fuse_features(e1, n1[:1], e2, n2)
    assert FUSION_METHODS == ("pre_norm_vector_add", "norm_weighted_avg", "average", "concat", "none")
