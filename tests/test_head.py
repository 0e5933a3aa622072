"""head.py against the dense re-statement of the published formulas (tests/reference_heads.py)."""
from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.nn.functional as F

from head import AdaFace, ArcFace, CosFace, HEAD_TYPES, build_head
from tests.reference_heads import adaface_dense, arcface_dense, cosface_dense

E, C = 16, 37


def _unit(x):
    return x / x.norm(dim=1, keepdim=True)


def _batch(batch_size, seed, norm_range=(5.0, 40.0)):
    g = torch.Generator().manual_seed(seed)
    raw = torch.randn(batch_size, E, generator=g)
    norms = torch.empty(batch_size, 1).uniform_(*norm_range, generator=g)
    labels = torch.randint(0, C, (batch_size,), generator=g)
    return _unit(raw), norms, labels


def _grads_of(logits_fn, embeddings, kernel, labels, upstream):
    """Logits and the gradients of (CE + <upstream, logits>) w.r.t. embeddings and kernel."""
    emb = embeddings.clone().requires_grad_(True)
    ker = kernel.clone().requires_grad_(True)
    logits = logits_fn(emb, ker)
    loss = F.cross_entropy(logits, labels) + (logits * upstream).sum() * 1e-3
    loss.backward()
    return logits.detach(), emb.grad, ker.grad


def _compare_head(head, dense_fn, batches, atol_logit=2e-4, atol_grad=2e-5):
    """Run successive batches through our head and the float64 dense reference."""
    stats = {"batch_mean": torch.ones(1, dtype=torch.float64) * 20,
             "batch_std": torch.ones(1, dtype=torch.float64) * 100}
    kernel0 = head.kernel.detach().clone()
    for embeddings, norms, labels in batches:
        upstream = torch.randn(embeddings.shape[0], C)
        # ours (float32), gradients via .grad of the parameter and of the input
        emb = embeddings.clone().requires_grad_(True)
        head.zero_grad()
        logits = head(emb, norms, labels)
        loss = F.cross_entropy(logits, labels) + (logits * upstream).sum() * 1e-3
        loss.backward()
        ours = (logits.detach(), emb.grad, head.kernel.grad.clone())

        def ref_fn(e, k):
            if dense_fn is adaface_dense:
                return adaface_dense(e, norms.double(), labels, k, stats, m=head.m, h=head.h,
                                     s=head.s, t_alpha=head.t_alpha)
            return dense_fn(e, norms.double(), labels, k, m=head.m, s=head.s)

        ref = _grads_of(ref_fn, embeddings.double(), kernel0.double(), labels, upstream.double())
        torch.testing.assert_close(ours[0].double(), ref[0], atol=atol_logit, rtol=1e-5)
        torch.testing.assert_close(ours[1].double(), ref[1], atol=atol_grad, rtol=1e-4)
        torch.testing.assert_close(ours[2].double(), ref[2], atol=atol_grad, rtol=1e-4)
        if isinstance(head, AdaFace):
            torch.testing.assert_close(head.batch_mean.double(), stats["batch_mean"].reshape(1),
                                       atol=1e-5, rtol=1e-6)
            torch.testing.assert_close(head.batch_std.double(), stats["batch_std"].reshape(1),
                                       atol=1e-5, rtol=1e-6)
    return stats


@pytest.mark.parametrize("t_alpha", [1.0, 0.01, 0.3])
def test_adaface_matches_dense_reference_over_successive_batches(t_alpha):
    head = AdaFace(embedding_size=E, classnum=C, m=0.4, h=0.333, s=64., t_alpha=t_alpha)
    batches = [_batch(8, seed) for seed in range(4)]
    stats = _compare_head(head, adaface_dense, batches)
    # the running statistics really moved away from their initial values
    assert abs(float(stats["batch_mean"]) - 20.0) > 1e-3
    assert abs(float(stats["batch_std"]) - 100.0) > 1e-3


def test_arcface_and_cosface_match_dense_reference():
    for head, dense in ((ArcFace(embedding_size=E, classnum=C, s=64., m=0.5), arcface_dense),
                        (CosFace(embedding_size=E, classnum=C, s=64., m=0.4), cosface_dense)):
        _compare_head(head, dense, [_batch(8, seed) for seed in range(3)])


@pytest.mark.parametrize("norm_value", [1e-4, 200.0])
def test_adaface_extreme_norms_are_clipped_like_published(norm_value):
    head = AdaFace(embedding_size=E, classnum=C, t_alpha=0.5)
    emb, norms, labels = _batch(6, 11)
    norms[:3] = norm_value  # half extreme, half ordinary
    _compare_head(head, adaface_dense, [(emb, norms, labels), _batch(6, 12)])


def _boundary_batch(head):
    """Embeddings exactly on a class centre (cos = +1) and opposite to one (cos = -1)."""
    kernel = head.kernel.detach()
    centres = _unit(kernel.t())  # (C, E)
    emb = torch.stack([centres[3], -centres[5], centres[7], -centres[9]])
    labels = torch.tensor([3, 5, 2, 9])  # targets at +1, -1, a non-target at +1, target at -1
    norms = torch.tensor([[10.0], [30.0], [20.0], [25.0]])
    return emb, norms, labels


@pytest.mark.parametrize("head_type", HEAD_TYPES)
def test_cosines_at_plus_minus_one(head_type):
    head = build_head(head_type, E, C, m=0.4, t_alpha=1.0, h=0.333, s=64.)
    dense = {"adaface": adaface_dense, "arcface": arcface_dense, "cosface": cosface_dense}[head_type]
    _compare_head(head, dense, [_boundary_batch(head)])
    emb, norms, labels = _boundary_batch(head)
    logits = head(emb, norms, labels).detach()
    eps, s = head.eps, 64.
    # a non-target class at cos = +1 is clamped to 1 - eps
    torch.testing.assert_close(logits[2, 7], torch.tensor(s * (1 - eps)))
    import math
    expected_target = {"cosface": s * ((1 - eps) - 0.4),
                       "arcface": s * math.cos(math.acos(1 - eps) + 0.4)}
    if head_type in expected_target:
        torch.testing.assert_close(logits[0, 3], torch.tensor(expected_target[head_type],
                                                              dtype=torch.float32), rtol=1e-5, atol=1e-4)


def test_batch_of_one_keeps_std_and_matches_reference(caplog):
    head = AdaFace(embedding_size=E, classnum=C, t_alpha=0.1)
    with caplog.at_level(logging.WARNING, logger="head"):
        stats = _compare_head(head, adaface_dense, [_batch(5, 1), _batch(1, 2), _batch(3, 3)])
    assert any("batch of one" in r.message for r in caplog.records)
    assert torch.isfinite(head.batch_std).all() and torch.isfinite(stats["batch_std"]).all()


def test_published_state_dict_names_and_kernel_init():
    head = AdaFace(embedding_size=E, classnum=C)
    sd = head.state_dict()
    assert list(sd) == ["kernel", "t", "batch_mean", "batch_std"]
    assert sd["kernel"].shape == (E, C)
    assert float(sd["batch_mean"]) == 20.0 and float(sd["batch_std"]) == 100.0 and float(sd["t"]) == 0
    column_norms = sd["kernel"].norm(dim=0)
    torch.testing.assert_close(column_norms, torch.ones(C), atol=1e-5, rtol=0)
    assert sd["kernel"].abs().max() <= 1.0 + 1e-6
    for cls in (ArcFace, CosFace):
        assert list(cls(embedding_size=E, classnum=C).state_dict()) == ["kernel"]
    # a published-style head state loads strictly into ours
    other = AdaFace(embedding_size=E, classnum=C)
    other.load_state_dict(copy.deepcopy(sd), strict=True)
    assert torch.equal(other.kernel, head.kernel)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_head_computes_in_float32_under_autocast(dtype):
    head = AdaFace(embedding_size=E, classnum=C)
    twin = copy.deepcopy(head)
    emb, norms, labels = _batch(8, 5)
    emb_low, norms_low = emb.to(dtype), norms.to(dtype)
    with torch.autocast(device_type="cpu", dtype=dtype):
        got = head(emb_low, norms_low, labels)
    assert got.dtype == torch.float32
    # equal to a float32 run on the same (rounded) inputs: nothing inside ran in low precision
    expected = twin(emb_low.float(), norms_low.float(), labels)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-6)


def test_published_readme_usage_runs():
    adaface = AdaFace(embedding_size=512, classnum=100, m=0.4, h=0.333, s=64., t_alpha=0.01)
    emb, norms = torch.randn(4, 512), torch.rand(4, 1) * 30
    emb = _unit(emb)
    labels = torch.tensor([0, 5, 99, 42])
    logits = adaface(emb, norms, labels)
    loss = torch.nn.CrossEntropyLoss()(logits, labels)
    assert logits.shape == (4, 100) and torch.isfinite(loss)


def test_unknown_head_type_names_the_valid_ones():
    with pytest.raises(ValueError, match="adaface, arcface, cosface"):
        build_head("sphereface", 8, 4, m=0.4, t_alpha=1.0, h=0.333, s=64.)


@pytest.mark.parametrize("bad", [[0, 4], [-1, 2]])
def test_labels_out_of_range_are_rejected(bad):
    head = CosFace(embedding_size=E, classnum=4)
    emb = _unit(torch.randn(2, E))
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        head(emb, None, torch.tensor(bad))


def test_wrong_shapes_are_rejected():
    head = AdaFace(embedding_size=E, classnum=C)
    with pytest.raises(ValueError, match="embeddings must have shape"):
        head(torch.randn(2, E + 1), torch.ones(2, 1), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="one class index per embedding"):
        head(_unit(torch.randn(2, E)), torch.ones(2, 1), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="needs the feature norms"):
        head(_unit(torch.randn(2, E)), None, torch.tensor([0, 1]))


def test_in_place_logits_are_protected_against_later_in_place_edits():
    head = ArcFace(embedding_size=E, classnum=C)
    emb, _, labels = _batch(4, 9)
    emb.requires_grad_(True)
    logits = head(emb, None, labels)
    logits.add_(1.0)  # modifying the saved output must be caught by autograd, not give wrong grads
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        logits.sum().backward()


def _near_centres(head, labels, sign, spread, seed):
    """Unit embeddings close to (sign = 1) or opposite to (sign = -1) their own class centres."""
    g = torch.Generator().manual_seed(seed)
    centres = _unit(head.kernel.detach().t())[labels]
    return _unit(sign * centres + spread * torch.randn(len(labels), E, generator=g))


def test_angle_clip_at_both_ends_matches_reference():
    labels = torch.arange(16) % C
    # AdaFace: a high-norm outlier near its centre -> z_hat = 1 and theta - m < eps (clipped at eps);
    # then a low-norm outlier -> z_hat saturates at -1
    ada = AdaFace(embedding_size=E, classnum=C, m=0.4, h=0.333, t_alpha=1.0)
    high = torch.cat([torch.full((15, 1), 10.0), torch.full((1, 1), 100.0)])
    low = torch.cat([torch.full((15, 1), 30.0), torch.full((1, 1), 0.001)])
    emb = _near_centres(ada, labels, 1.0, 0.05, 0)
    _compare_head(ada, adaface_dense, [(emb, high, labels), (emb, low, labels)])
    for norms, end in ((high, 1.0), (low, -1.0)):
        z_hat = torch.clip((norms - norms.mean()) / (norms.std() + 1e-3) * 0.333, -1, 1)
        assert z_hat[-1, 0] == end  # the scaler saturates
    theta = (emb[-1] * _unit(ada.kernel.detach().t())[labels[-1]]).sum().clamp(-1, 1).acos()
    assert theta - 0.4 < 1e-3  # the angular margin pushes the target angle below eps
    # ArcFace: samples opposite their centre -> theta + m > pi - eps (clipped at pi - eps)
    arc = ArcFace(embedding_size=E, classnum=C, m=0.5)
    emb = _near_centres(arc, labels, -1.0, 0.05, 1)
    _compare_head(arc, arcface_dense, [(emb, torch.ones(16, 1), labels)])


def _run_head(head_type, embeddings, norms, labels, upstream):
    torch.manual_seed(3)
    head = build_head(head_type, E, C, m=0.4, t_alpha=0.5, h=0.333, s=64.)
    emb = embeddings.clone().requires_grad_(True)
    logits = head(emb, norms, labels)
    (F.cross_entropy(logits, labels) + (logits * upstream).sum() * 1e-3).backward()
    return logits.detach(), emb.grad, head.kernel.grad


@pytest.mark.parametrize("head_type", HEAD_TYPES)
def test_cuda_branch_forced_on_cpu_gives_the_cpu_numbers(head_type, monkeypatch):
    """head.DEVICE_BRANCH runs the CUDA code path (unconditional clamp, asynchronous label check)
    on CPU tensors: same logits and gradients as the CPU path, with and without cosines at +-1,
    and both equal the float64 dense reference."""
    import head as head_module
    torch.manual_seed(3)  # the kernel _run_head builds, so the boundary batch sits at +-1
    probe = build_head(head_type, E, C, m=0.4, t_alpha=0.5, h=0.333, s=64.)
    batches = [_batch(8, seed=21), _boundary_batch(probe)]
    for embeddings, norms, labels in batches:
        upstream = torch.randn(embeddings.shape[0], C)
        results = {}
        for branch in ("cpu", "cuda"):
            monkeypatch.setattr(head_module, "DEVICE_BRANCH", branch)
            results[branch] = _run_head(head_type, embeddings, norms, labels, upstream)
            dense = {"adaface": adaface_dense, "arcface": arcface_dense,
                     "cosface": cosface_dense}[head_type]
            torch.manual_seed(3)
            fresh = build_head(head_type, E, C, m=0.4, t_alpha=0.5, h=0.333, s=64.)
            _compare_head(fresh, dense, [(embeddings, norms, labels)])
        for ours, theirs in zip(results["cpu"], results["cuda"]):
            torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-6)


def test_cuda_branch_label_check_fails_asynchronously_on_cpu(monkeypatch):
    import head as head_module
    head = CosFace(embedding_size=E, classnum=4)
    emb = _unit(torch.randn(2, E))
    monkeypatch.setattr(head_module, "DEVICE_BRANCH", "cuda")
    with pytest.raises(RuntimeError, match=r"labels must lie in \[0, 4\)"):
        head(emb, None, torch.tensor([0, 4]))
    head(emb, None, torch.tensor([0, 3]))  # in range: no error
    monkeypatch.setattr(head_module, "DEVICE_BRANCH", "gpu")
    with pytest.raises(ValueError, match="DEVICE_BRANCH"):
        head(emb, None, torch.tensor([0, 3]))
