"""utils/column_sgd.py: the kept kernel gradient of the sharded head and its fused SGD step,
against torch.optim.SGD with the same gradient as a dense tensor (zeros where none is given)."""
from __future__ import annotations

import pytest
import torch

import utils.column_sgd as column_sgd
from utils.column_sgd import ColumnGradient, add_column_grad, column_grad, sgd_step_, take_column_grad

E, C, B = 16, 1000, 5
OPTIONS = {"momentum": dict(momentum=0.9, dampening=0.0, nesterov=False, weight_decay=5e-4),
           "dampening": dict(momentum=0.9, dampening=0.1, nesterov=False, weight_decay=5e-4),
           "nesterov": dict(momentum=0.9, dampening=0.0, nesterov=True, weight_decay=5e-4),
           "no_momentum": dict(momentum=0.0, dampening=0.0, nesterov=False, weight_decay=5e-4),
           "no_decay": dict(momentum=0.9, dampening=0.0, nesterov=False, weight_decay=0.0)}


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    """Blocks of 4 KiB: the tiny tensors here are stepped in many row and column blocks."""
    monkeypatch.setattr(column_sgd, "_CPU_BLOCK_BYTES", 4096)


def _gradient(form: str, param: torch.Tensor, seed: int):
    """A ColumnGradient of ``form`` and the same gradient as a dense tensor."""
    g = torch.Generator().manual_seed(seed)
    if form == "columns":
        index = torch.randperm(C, generator=g)[:97].sort().values
        values = torch.randn(E, 97, generator=g)
        return ColumnGradient.columns(index, values.clone()), torch.zeros(E, C).index_copy_(1, index, values)
    if form == "dense":
        values = torch.randn(E, C, generator=g)
        return ColumnGradient.columns(None, values.clone()), values
    index = torch.randperm(C, generator=g)[:97].sort().values if form == "kept" else None
    width = C if index is None else index.numel()
    embeddings, grad_logits = torch.randn(B, E, generator=g), torch.randn(B, width, generator=g)
    scale = torch.randn(width, generator=g)
    columns = param.detach() if index is None else param.detach()[:, index]
    values = torch.mm(embeddings.t(), grad_logits).addcmul_(columns, scale.unsqueeze(0), value=-1.0)
    dense = values if index is None else torch.zeros(E, C).index_copy_(1, index, values)
    return ColumnGradient.factored(embeddings, grad_logits, scale, index), dense


FORMS = ["columns", "dense", "factored", "kept"]   # kept: factored, some columns only


def _assert_same(got: torch.Tensor, want: torch.Tensor, form: str) -> None:
    if form in ("factored", "kept"):   # blockwise products: BLAS may round a block differently from the whole
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    else:                    # the same elementwise operations in the same order: bit for bit
        assert torch.equal(got, want), float((got - want).abs().max())


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    """Equal up to float32 rounding at the tensor's scale (closed-form pending steps and blockwise
    products round differently from torch's step-by-step arithmetic)."""
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6 * float(want.abs().max()))


def _up_to_date(param: torch.Tensor, state: dict):
    """Copies of ``param`` and its momentum with the steps they owe applied (the originals keep
    owing them, as in training)."""
    weights = param.detach().clone()
    buf = state.get("momentum_buffer")
    buf = None if buf is None else buf.clone()
    pending = column_sgd.pending_steps(param)
    if pending is not None:
        pending.bring_up_to_date_(weights.t(), None if buf is None else buf.t(), pending.last)
    return weights, buf


def _param(initial: torch.Tensor, layout: str) -> torch.nn.Parameter:
    return torch.nn.Parameter(column_sgd.class_major(initial.clone()) if layout == "class-major"
                              else initial.clone())


@pytest.mark.parametrize("layout", ["row-major", "class-major"])
@pytest.mark.parametrize("options", sorted(OPTIONS))
@pytest.mark.parametrize("form", FORMS)
def test_fused_step_equals_torch_sgd(form, options, layout):
    """Five steps (the first creates the momentum buffer) and a learning-rate change. A gradient of
    some columns (``columns``, ``kept``) leaves the others' steps pending: compared with them applied."""
    opts = OPTIONS[options]
    initial = torch.randn(E, C, generator=torch.Generator().manual_seed(99))
    ref, ours = torch.nn.Parameter(initial.clone()), _param(initial, layout)
    opt = torch.optim.SGD([ref], lr=0.1, **opts)
    state: dict = {}
    for step in range(5):
        lr = 0.1 if step < 3 else 0.01
        opt.param_groups[0]["lr"] = lr
        grad, dense = _gradient(form, ref, seed=step)
        ref.grad = dense
        opt.step()
        sgd_step_(ours, grad, state, lr=lr, **opts)
        weights, buf = _up_to_date(ours, state)
        assert weights.stride() == ours.stride()
        sampled = form in ("columns", "kept") and (opts["momentum"] or opts["weight_decay"])
        if sampled:
            assert column_sgd.pending_steps(ours) is not None      # the other columns wait
            _close(weights, ref.detach())
        else:
            assert column_sgd.pending_steps(ours) is None
            _assert_same(weights, ref.detach(), form)
        if opts["momentum"]:
            assert state["momentum_buffer"].stride() == ours.stride()
            if sampled:
                _close(buf, opt.state[ref]["momentum_buffer"])
            else:
                _assert_same(buf, opt.state[ref]["momentum_buffer"], form)
        else:
            assert "momentum_buffer" not in state
    column_sgd.flush_pending_(ours)
    assert column_sgd.pending_steps(ours) is None
    _close(ours.detach(), ref.detach())
    assert not torch.equal(ours.detach(), initial)


@pytest.mark.parametrize("options", sorted(OPTIONS))
def test_pending_steps_over_a_long_run_equal_torch_sgd(options):
    """60 steps, each with a gradient of 3 % of the columns (most columns owe tens of steps when
    next read), read back through :func:`current_rows` as the head reads them; a learning-rate
    change at step 40 applies what is owed under the old rate first."""
    opts = OPTIONS[options]
    initial = torch.randn(E, C, generator=torch.Generator().manual_seed(5))
    ref, ours = torch.nn.Parameter(initial.clone()), _param(initial, "class-major")
    opt = torch.optim.SGD([ref], lr=0.1, **opts)
    state: dict = {}
    g = torch.Generator().manual_seed(6)
    most_owed, tables = 0, []
    for step in range(60):
        lr = 0.1 if step < 40 else 0.02
        opt.param_groups[0]["lr"] = lr
        index = torch.randperm(C, generator=g)[:30].sort().values
        pending = column_sgd.pending_steps(ours)
        if pending is not None:
            most_owed = max(most_owed, int((pending.clock - pending.last).max()))
            table = pending._power_table(ours.device)             # grown by doubling, not per step
            if not tables or tables[-1] is not table:
                tables.append(table)
            rows = column_sgd.current_rows(ours, index)             # what the head's forward does
            _close(rows, ref.detach()[:, index].t())
        values = torch.randn(E, 30, generator=g)
        ref.grad = torch.zeros(E, C).index_copy_(1, index, values)
        opt.step()
        sgd_step_(ours, ColumnGradient.columns(index, values), state, lr=lr, **opts)
    column_sgd.flush_pending_(ours)
    _close(ours.detach(), ref.detach())
    if opts["momentum"] or opts["weight_decay"]:
        assert most_owed >= 30
        assert len(tables) <= 10        # two records (the learning-rate change), ~log2(40) tables each
    if opts["momentum"]:
        _close(state["momentum_buffer"], opt.state[ref]["momentum_buffer"])


@pytest.mark.parametrize("first,second", [("columns", "columns"), ("columns", "dense"), ("dense", "columns"),
                                          ("factored", "columns"), ("columns", "factored"),
                                          ("factored", "factored"), ("kept", "kept"), ("kept", "factored")])
def test_accumulation_equals_the_sum(first, second):
    """Two micro-batches' gradients kept for one parameter add up as autograd's ``grad += new`` would."""
    param = torch.nn.Parameter(torch.randn(E, C))
    grad1, dense1 = _gradient(first, param, seed=1)
    grad2, dense2 = _gradient(second, param, seed=2)
    add_column_grad(param, grad1)
    add_column_grad(param, grad2)
    kept = take_column_grad(param)
    assert column_grad(param) is None and param.grad is None
    _assert_same(kept.to_dense(param.detach()), dense1 + dense2,
                 "factored" if {"factored", "kept"} & {first, second} else "columns")
    if first == second and first in ("columns", "kept"):   # overlapping columns: one sorted set
        assert kept.index is not None and torch.equal(kept.index, kept.index.unique())
        assert kept.index.numel() == int((dense1 + dense2).abs().sum(0).gt(0).sum())


@pytest.mark.parametrize("form", FORMS)
def test_norm_and_scaling_for_clipping(form):
    param = torch.nn.Parameter(torch.randn(E, C))
    grad, dense = _gradient(form, param, seed=3)
    torch.testing.assert_close(grad.square_norm(param.detach()), dense.pow(2).sum(), rtol=1e-5, atol=0)
    grad.mul_(torch.tensor(0.25))
    _assert_same(grad.to_dense(param.detach()), dense * 0.25, form)


def test_training_sgd_steps_kept_gradients_and_falls_back_where_needed():
    """train_val.SGD: a kept gradient is stepped as torch steps the dense one; zero_grad clears it;
    with a dense ``.grad`` present too, or a group option the fused step lacks (``maximize``), it
    becomes ``.grad`` and torch's step runs."""
    from train_val import SGD

    for maximize, with_dense in ((False, False), (False, True), (True, False)):
        initial = torch.randn(E, C)
        ref, ours = torch.nn.Parameter(initial.clone()), torch.nn.Parameter(initial.clone())
        opt_ref = torch.optim.SGD([ref], lr=0.1, momentum=0.9, weight_decay=5e-4, maximize=maximize)
        opt = SGD([ours], lr=0.1, momentum=0.9, weight_decay=5e-4, maximize=maximize)
        for step in range(3):
            grad, dense = _gradient("columns", ref, seed=10 + step)
            extra = torch.randn(E, C) if with_dense else torch.zeros(E, C)
            ref.grad = dense + extra
            opt_ref.step()
            opt.zero_grad()
            add_column_grad(ours, grad)
            if with_dense:
                ours.grad = extra.clone()
            opt.step()
            assert column_grad(ours) is None
            _close(_up_to_date(ours, opt.state[ours])[0], ref.detach())
        add_column_grad(ours, _gradient("columns", ref, seed=0)[0])
        opt.zero_grad()
        assert column_grad(ours) is None
    assert set(opt.state[ours]) == {"momentum_buffer"} and opt.state[ours]["momentum_buffer"].shape == (E, C)


def test_training_sgd_state_dict_applies_pending_steps_and_load_lays_out_the_momentum():
    """``train_val.SGD.state_dict`` (what a checkpoint holds) applies the steps a sampled kernel
    owes; loading a row-major momentum (the published layout) into a class-major kernel's
    optimizer lays it out like the kernel, and the run goes on as the one that was saved."""
    from train_val import SGD

    initial = torch.randn(E, C, generator=torch.Generator().manual_seed(8))
    ref = torch.nn.Parameter(initial.clone())
    opt_ref = torch.optim.SGD([ref], lr=0.1, momentum=0.9, weight_decay=5e-4)
    ours = _param(initial, "class-major")
    opt = SGD([ours], lr=0.1, momentum=0.9, weight_decay=5e-4)
    for step in range(4):
        grad, dense = _gradient("columns", ref, seed=20 + step)
        ref.grad = dense
        opt_ref.step()
        add_column_grad(ours, grad)
        opt.step()
    assert column_sgd.pending_steps(ours) is not None
    saved = opt.state_dict()
    assert column_sgd.pending_steps(ours) is None
    _close(ours.detach(), ref.detach())
    _close(saved["state"][0]["momentum_buffer"], opt_ref.state[ref]["momentum_buffer"])
    row_major = {"state": {0: {"momentum_buffer": saved["state"][0]["momentum_buffer"].contiguous()}},
                 "param_groups": saved["param_groups"]}
    twin = _param(ours.detach().contiguous(), "class-major")
    opt_twin = SGD([twin], lr=0.1, momentum=0.9, weight_decay=5e-4)
    opt_twin.load_state_dict(row_major)
    assert opt_twin.state[twin]["momentum_buffer"].stride() == twin.stride() == ours.stride()
    for param, optimizer in ((ours, opt), (twin, opt_twin)):
        add_column_grad(param, _gradient("columns", ref, seed=30)[0])
        optimizer.step()
        optimizer.state_dict()
    assert torch.equal(twin.detach(), ours.detach())
    assert torch.equal(opt_twin.state[twin]["momentum_buffer"], opt.state[ours]["momentum_buffer"])
