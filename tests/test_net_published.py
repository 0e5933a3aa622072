"""net.py's published constants, written out here and checked by what the layers do.

The published values come from mk-minchul/AdaFace ``net.py``: every ``BatchNorm1d``/``BatchNorm2d``
is built with PyTorch's defaults (``eps=1e-5``, ``momentum=0.1``, affine and tracking running
statistics) except the output ``BatchNorm1d(512, affine=False)``; the output layer is
``BatchNorm2d, Dropout(0.4), Flatten, Linear(C*7*7, 512), BatchNorm1d(512, affine=False)``; every
``PReLU(c)`` has one slope per channel, initialised to PyTorch's 0.25.

None of these values is read from the module under test: a model built with ``momentum=0.9`` (the
MXNet convention), ``eps=2e-5`` (insightface's value) or without its dropout fails here, by its
attributes and by its behaviour (running statistics after one step, normalisation, dropout mask).
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from net import BasicBlockIR, BottleneckIR, build_model

# ---- the published values, written out ----------------------------------------------------------
BN_EPS = 1e-5
BN_MOMENTUM = 0.1
DROPOUT_P = 0.4
PRELU_INIT = 0.25
EMBEDDING = 512
# published get_blocks(): units per stage, and the stage depths of basic (<= 100) and bottleneck units
UNITS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 14, 3), 100: (3, 13, 30, 3),
         152: (3, 8, 36, 3), 200: (3, 24, 36, 3)}
BASIC_DEPTHS = (64, 128, 256, 512)
BOTTLENECK_DEPTHS = (256, 512, 1024, 2048)
# published build_model names (and the IR_* constructors) -> (num_layers, SE)
PUBLISHED = {'ir_18': (18, False), 'ir_34': (34, False), 'ir_50': (50, False), 'ir_101': (100, False),
             'ir_152': (152, False), 'ir_200': (200, False), 'ir_se_50': (50, True),
             'ir_se_101': (100, True), 'ir_se_152': (152, True), 'ir_se_200': (200, True)}


def expected_prelu_sizes(num_layers: int) -> list[int]:
    """PReLU channel counts in module order: the input layer's 64, then per unit (basic: depth;
    bottleneck: depth // 4 twice)."""
    sizes = [64]
    bottleneck = num_layers > 100
    depths = BOTTLENECK_DEPTHS if bottleneck else BASIC_DEPTHS
    for units, depth in zip(UNITS[num_layers], depths):
        sizes += ([depth // 4, depth // 4] if bottleneck else [depth]) * units
    return sizes


def batch_norms(model: nn.Module):
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@pytest.fixture(scope='module')
def meta_models():
    """Published architectures built on the meta device: every module and attribute, no weights
    (seconds instead of minutes for the deep ones)."""
    cache = {}

    def get(arch):
        if arch not in cache:
            with torch.device('meta'):
                cache[arch] = build_model(arch)
        return cache[arch]
    return get


# ---- the constants, architecture by architecture -------------------------------------------------
@pytest.mark.parametrize('arch', list(PUBLISHED))
def test_every_batchnorm_has_the_published_eps_momentum_and_affinity(arch, meta_models):
    model = meta_models(arch)
    norms = batch_norms(model)
    assert len(norms) > 3
    for name, bn in norms:
        assert bn.eps == BN_EPS, f"{arch} {name}: eps {bn.eps}, published {BN_EPS}"
        assert bn.momentum == BN_MOMENTUM, f"{arch} {name}: momentum {bn.momentum}, published {BN_MOMENTUM}"
        assert bn.track_running_stats, name
        assert bn.affine == (name != 'output_layer.4'), f"{arch} {name}: affine={bn.affine}"
    out_bn = model.output_layer[4]
    assert type(out_bn) is nn.BatchNorm1d and out_bn.num_features == EMBEDDING and not out_bn.affine


@pytest.mark.parametrize('arch', list(PUBLISHED))
def test_output_layer_and_dropout_are_published(arch, meta_models):
    num_layers, _ = PUBLISHED[arch]
    channels = 2048 if num_layers > 100 else 512
    model = meta_models(arch)
    out = model.output_layer
    assert len(out) == 5
    assert type(out[0]) is nn.BatchNorm2d and out[0].num_features == channels
    assert type(out[1]) is nn.Dropout and out[1].p == DROPOUT_P and not out[1].inplace
    assert type(out[3]) is nn.Linear
    assert (out[3].in_features, out[3].out_features) == (channels * 7 * 7, EMBEDDING)
    assert out[3].bias is not None
    dropouts = [(name, m.p) for name, m in model.named_modules() if isinstance(m, nn.modules.dropout._DropoutNd)]
    assert dropouts == [('output_layer.1', DROPOUT_P)]


@pytest.mark.parametrize('arch', list(PUBLISHED))
def test_prelu_sizes_are_published(arch, meta_models):
    num_layers, use_se = PUBLISHED[arch]
    model = meta_models(arch)
    got = [m.num_parameters for m in model.modules() if isinstance(m, nn.PReLU)]
    assert got == expected_prelu_sizes(num_layers)
    se_blocks = [m for m in model.modules() if type(m).__name__ == 'SEModule']
    assert len(se_blocks) == (sum(UNITS[num_layers]) if use_se else 0)


def test_expected_prelu_sizes_helper_is_right_for_ir_18_and_ir_152():
    # written out in full for the two unit kinds, so the helper itself is checked
    assert expected_prelu_sizes(18) == [64, 64, 64, 128, 128, 256, 256, 512, 512]
    assert expected_prelu_sizes(152)[:9] == [64, 64, 64, 64, 64, 64, 64, 128, 128]
    assert len(expected_prelu_sizes(152)) == 1 + 2 * (3 + 8 + 36 + 3)


def test_prelu_slopes_start_at_0_25():
    torch.manual_seed(0)
    model = build_model('ir_tiny')
    slopes = [m.weight for m in model.modules() if isinstance(m, nn.PReLU)]
    assert len(slopes) == 9
    for w in slopes:
        assert torch.all(w == PRELU_INIT)
    # and act as published: x for x >= 0, 0.25 x below
    prelu = model.input_layer[2]
    x = torch.tensor([-2.0, -0.5, 0.0, 3.0]).view(1, 1, 2, 2).repeat(1, prelu.num_parameters, 1, 1)
    expected = torch.tensor([-0.5, -0.125, 0.0, 3.0]).view(1, 1, 2, 2).expand_as(x)
    torch.testing.assert_close(prelu(x), expected, rtol=0, atol=0)


# ---- behaviour: running statistics, normalisation, dropout ---------------------------------------
def _capture_batchnorm_io(model: nn.Module):
    """Hooks that record (input, output) of every BatchNorm; returns (records, handles)."""
    records, handles = {}, []
    for name, bn in batch_norms(model):
        def hook(module, inputs, output, name=name):
            records[name] = (inputs[0].detach().clone(), output.detach().clone())
        handles.append(bn.register_forward_hook(hook))
    return records, handles


def test_one_train_step_updates_running_statistics_with_momentum_0_1():
    """After one train-mode forward from fresh statistics (mean 0, var 1), every BatchNorm holds
    ``0.9 * 0 + 0.1 * batch mean`` and ``0.9 * 1 + 0.1 * unbiased batch variance``, and its output is
    the batch normalised with the biased variance and eps 1e-5 (then scaled and shifted)."""
    torch.manual_seed(3)
    model = build_model('ir_tiny').train()
    records, handles = _capture_batchnorm_io(model)
    x = torch.randn(2, 3, 112, 112)
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    assert len(records) == len(batch_norms(model)) == 30
    for name, bn in batch_norms(model):
        inp, out = records[name]
        dims = [0] + list(range(2, inp.dim()))
        shape = [1, -1] + [1] * (inp.dim() - 2)
        mean = inp.mean(dims)
        var_unbiased = inp.var(dims, unbiased=True)
        var_biased = inp.var(dims, unbiased=False)
        torch.testing.assert_close(bn.running_mean, 0.9 * 0.0 + 0.1 * mean, rtol=1e-4, atol=1e-6,
                                   msg=lambda m: f"{name} running_mean: {m}")
        torch.testing.assert_close(bn.running_var, 0.9 * 1.0 + 0.1 * var_unbiased, rtol=1e-4,
                                   atol=1e-6, msg=lambda m: f"{name} running_var: {m}")
        assert bn.num_batches_tracked.item() == 1, name
        normalised = (inp - mean.view(shape)) / torch.sqrt(var_biased.view(shape) + 1e-5)
        if bn.affine:
            normalised = normalised * bn.weight.view(shape) + bn.bias.view(shape)
        error = (out - normalised).abs().max().item()
        assert error < 1e-4 * max(1.0, normalised.abs().max().item()), f"{name} output off by {error}"
    # the output BatchNorm1d: a hand-made batch of two gives known numbers
    bn = build_model('ir_tiny').output_layer[4].train()
    feats = torch.zeros(2, EMBEDDING)
    feats[0, 0], feats[1, 0] = 1.0, 3.0       # feature 0: mean 2, unbiased var 2, biased var 1
    y = bn(feats)
    assert bn.running_mean[0].item() == pytest.approx(0.2)        # 0.9 * 0 + 0.1 * 2
    assert bn.running_var[0].item() == pytest.approx(1.1)         # 0.9 * 1 + 0.1 * 2
    assert bn.running_mean[1].item() == 0.0 and bn.running_var[1].item() == pytest.approx(0.9)
    assert y[0, 0].item() == pytest.approx(-1 / math.sqrt(1 + 1e-5), rel=1e-6)
    assert y[1, 0].item() == pytest.approx(1 / math.sqrt(1 + 1e-5), rel=1e-6)


def test_every_batchnorm_normalises_with_eps_1e_5():
    """Eval-mode BatchNorm with a tiny running variance (1e-6), where eps dominates: every BatchNorm
    of ir_tiny and of a bottleneck-SE unit gives ``x / sqrt(1e-6 + 1e-5)``; with eps 2e-5 it would
    be ``x / sqrt(2.1e-5)``, 30% smaller."""
    torch.manual_seed(5)
    modules = {'ir_tiny': build_model('ir_tiny'), 'basic': BasicBlockIR(16, 32, 2),
               'basic_se': BasicBlockIR(32, 32, 1, use_se=True),
               'bottleneck_se': BottleneckIR(16, 64, 2, use_se=True)}
    checked = 0
    for owner, module in modules.items():
        for name, bn in batch_norms(copy.deepcopy(module)):
            bn.eval()
            bn.running_mean.zero_()
            bn.running_var.fill_(1e-6)
            if bn.affine:
                nn.init.ones_(bn.weight)
                nn.init.zeros_(bn.bias)
            x = torch.randn(2, bn.num_features, 3, 3) if isinstance(bn, nn.BatchNorm2d) \
                else torch.randn(2, bn.num_features)
            with torch.no_grad():
                y = bn(x)
            torch.testing.assert_close(y, x / math.sqrt(1e-6 + 1e-5), rtol=1e-5, atol=0,
                                       msg=lambda m: f"{owner} {name}: {m}")
            checked += 1
    assert checked == 30 + 4 + 3 + 5


def test_dropout_0_4_acts_in_training_only():
    """Train mode: the output layer drops 40% of the BatchNorm2d outputs and scales the rest by
    1 / 0.6, so two forwards of the same batch differ; eval mode: no dropout, forwards agree."""
    torch.manual_seed(6)
    model = build_model('ir_tiny')
    seen = {}
    model.output_layer[0].register_forward_hook(lambda m, i, o: seen.__setitem__('bn', o.detach().clone()))
    model.output_layer[3].register_forward_hook(lambda m, i, o: seen.__setitem__('linear_in', i[0].detach().clone()))
    x = torch.randn(2, 3, 112, 112)

    model.train()
    e1, n1 = model(x)
    before, after = seen['bn'].flatten(1), seen['linear_in']
    dropped = after == 0
    fraction = dropped.float().mean().item()
    assert abs(fraction - 0.4) < 0.02, fraction          # 2 * 128 * 49 elements: 4.5 sigma
    kept = ~dropped & (before != 0)
    torch.testing.assert_close(after[kept], before[kept] / 0.6, rtol=1e-6, atol=0)
    e2, n2 = model(x)
    assert (e1 - e2).abs().max().item() > 1e-3
    assert not torch.equal(n1, n2)

    model.eval()
    with torch.no_grad():
        e3, n3 = model(x)
        assert torch.equal(seen['linear_in'], seen['bn'].flatten(1))
        e4, n4 = model(x)
    assert torch.equal(e3, e4) and torch.equal(n3, n4)
