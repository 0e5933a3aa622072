"""Tests of net.py: published state_dict layout, forward contract, unit maths and initialisation."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from net import ARCHITECTURES, BasicBlockIR, BottleneckIR, IResNet, SEModule, build_model

KEYS_DIR = Path(__file__).resolve().parent / 'data' / 'net_keys'
BUFFER_SUFFIXES = ('running_mean', 'running_var', 'num_batches_tracked')


def read_key_file(arch: str) -> list[tuple[str, str, str]]:
    """(name, shape, dtype) rows of tests/data/net_keys/<arch>.txt, in order."""
    rows = []
    for line in (KEYS_DIR / f'{arch}.txt').read_text().splitlines():
        if line and not line.startswith('#'):
            name, shape, dtype = line.split('\t')
            rows.append((name, shape, dtype))
    return rows


def shape_text(t: torch.Tensor) -> str:
    return 'x'.join(map(str, t.shape)) if t.dim() else 'scalar'


@pytest.fixture(scope='module', params=ARCHITECTURES)
def arch_and_model(request):
    """Each architecture built once per module, in eval mode (tests share it read-only)."""
    torch.manual_seed(0)
    model = build_model(request.param).eval()
    yield request.param, model
    del model


def test_architecture_names():
    assert ARCHITECTURES == ('ir_18', 'ir_34', 'ir_50', 'ir_101', 'ir_152', 'ir_200',
                             'ir_se_50', 'ir_se_101', 'ir_se_152', 'ir_se_200')


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError) as info:
        build_model('ir_51')
    message = str(info.value)
    assert 'ir_51' in message
    for name in ARCHITECTURES:
        assert name in message


def test_state_dict_matches_published_keys(arch_and_model):
    arch, model = arch_and_model
    got = [(k, shape_text(v), str(v.dtype).replace('torch.', '')) for k, v in model.state_dict().items()]
    expected = read_key_file(arch)
    assert len(got) == len(expected)
    for i, (g, e) in enumerate(zip(got, expected)):
        assert g == e, f"{arch}: entry {i} differs: got {g}, published {e}"
    assert model.arch == arch


def test_parameter_count_matches_key_file(arch_and_model):
    arch, model = arch_and_model
    expected = sum(math.prod(int(d) for d in shape.split('x'))
                   for name, shape, _ in read_key_file(arch)
                   if not name.endswith(BUFFER_SUFFIXES))
    assert sum(p.numel() for p in model.parameters()) == expected


def test_forward_contract(arch_and_model):
    arch, model = arch_and_model
    captured = {}
    hook = model.output_layer.register_forward_hook(lambda m, i, o: captured.__setitem__('raw', o))
    try:
        x = torch.randn(2, 3, 112, 112)
        with torch.no_grad():
            embedding, norm = model(x)
    finally:
        hook.remove()
    raw = captured['raw']
    assert embedding.shape == (2, 512) and norm.shape == (2, 1)
    assert embedding.dtype == torch.float32 and norm.dtype == torch.float32
    assert torch.isfinite(embedding).all() and torch.isfinite(norm).all()
    torch.testing.assert_close(embedding.norm(dim=1), torch.ones(2), rtol=0, atol=1e-5)
    torch.testing.assert_close(norm, raw.norm(dim=1, keepdim=True), rtol=1e-5, atol=0)
    torch.testing.assert_close(embedding * norm, raw, rtol=1e-5, atol=1e-5 * raw.abs().max().item())
    # The two images are different, so are their embeddings.
    assert (embedding[0] @ embedding[1]).item() < 0.999


@pytest.fixture(scope='module')
def ir18_with_stats():
    """ir_18 in eval mode with non-trivial BatchNorm statistics and PReLU slopes."""
    torch.manual_seed(1)
    model = build_model('ir_18')
    _randomise_norm_layers(model)
    return model.eval()


def _randomise_norm_layers(model: torch.nn.Module) -> None:
    g = torch.Generator().manual_seed(7)
    for m in model.modules():
        if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.BatchNorm1d)):
            n = m.running_mean.numel()
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            if m.affine:
                m.weight.data.copy_(torch.rand(n, generator=g) * 0.5 + 0.5)
                m.bias.data.copy_(torch.randn(n, generator=g) * 0.1)
        elif isinstance(m, torch.nn.PReLU):
            m.weight.data.copy_(torch.rand(m.weight.numel(), generator=g) * 0.5)


def test_channels_last_gives_same_result(ir18_with_stats):
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        ref_e, ref_n = ir18_with_stats(x)
        model_cl = build_model('ir_18')
        model_cl.load_state_dict(ir18_with_stats.state_dict())
        model_cl = model_cl.eval().to(memory_format=torch.channels_last)
        cl_e, cl_n = model_cl(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(cl_e, ref_e, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(cl_n, ref_n, rtol=1e-4, atol=0)


def test_autocast_bfloat16_close_to_float32(ir18_with_stats):
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        ref_e, ref_n = ir18_with_stats(x)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            e, n = ir18_with_stats(x)
    assert e.dtype == torch.float32 and n.dtype == torch.float32
    torch.testing.assert_close(e.norm(dim=1), torch.ones(2), rtol=0, atol=1e-5)
    cosine = (e * ref_e).sum(dim=1)
    assert (cosine > 0.99).all(), cosine
    torch.testing.assert_close(n, ref_n, rtol=0.05, atol=0)


def test_training_step_updates_weights():
    torch.manual_seed(2)
    model = build_model('ir_18').train()
    x = torch.randn(4, 3, 112, 112)
    before = model.output_layer[3].weight.detach().clone()
    embedding, norm = model(x)
    loss = -(embedding[:, 0].sum()) + norm.mean() * 1e-3
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    assert not torch.equal(before, model.output_layer[3].weight)
    # Training mode updates the BatchNorm running statistics.
    assert model.input_layer[1].num_batches_tracked.item() == 1


# ---- one unit against a straightforward functional reference of the published equations ----

def _bn(x, bn):
    # eps written out (the published BatchNorm2d default), not read from the module under test
    return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, 1e-5)


def _prelu(x, p):
    return torch.where(x >= 0, x, x * p.weight.view(1, -1, 1, 1))


def _se(x, se: SEModule):
    gate = x.mean(dim=(2, 3), keepdim=True)
    gate = torch.sigmoid(F.conv2d(torch.relu(F.conv2d(gate, se.fc1.weight)), se.fc2.weight))
    return x * gate


def _shortcut(x, unit, stride):
    if isinstance(unit.shortcut_layer, torch.nn.MaxPool2d):
        return x[:, :, ::stride, ::stride]
    conv, bn = unit.shortcut_layer
    return _bn(F.conv2d(x, conv.weight, stride=stride), bn)


def reference_basic(x, unit: BasicBlockIR, stride: int, se: bool):
    r = unit.res_layer
    y = _bn(x, r[0])
    y = F.conv2d(y, r[1].weight, stride=1, padding=1)
    y = _prelu(_bn(y, r[2]), r[3])
    y = F.conv2d(y, r[4].weight, stride=stride, padding=1)  # the stride sits on the second 3x3 conv
    y = _bn(y, r[5])
    if se:
        y = _se(y, r.se_block)
    return y + _shortcut(x, unit, stride)


def reference_bottleneck(x, unit: BottleneckIR, stride: int, se: bool):
    r = unit.res_layer
    y = _bn(x, r[0])
    y = _prelu(_bn(F.conv2d(y, r[1].weight), r[2]), r[3])
    y = _prelu(_bn(F.conv2d(y, r[4].weight, padding=1), r[5]), r[6])
    y = _bn(F.conv2d(y, r[7].weight, stride=stride), r[8])  # the stride sits on the last 1x1 conv
    if se:
        y = _se(y, r.se_block)
    return y + _shortcut(x, unit, stride)


@pytest.mark.parametrize('cls,reference', [(BasicBlockIR, reference_basic),
                                           (BottleneckIR, reference_bottleneck)])
@pytest.mark.parametrize('in_channel,depth,stride', [(32, 64, 2), (64, 64, 2), (64, 64, 1)])
@pytest.mark.parametrize('se', [False, True])
def test_unit_matches_reference(cls, reference, in_channel, depth, stride, se):
    torch.manual_seed(3)
    unit = cls(in_channel, depth, stride, use_se=se)
    _randomise_norm_layers(unit)
    unit.eval()
    x = torch.randn(2, in_channel, 14, 14)
    with torch.no_grad():
        got = unit(x)
        expected = reference(x, unit, stride, se)
    assert got.shape == (2, depth, 14 // stride, 14 // stride)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_bottleneck_reduction_width():
    unit = BottleneckIR(256, 512, 2)
    assert unit.res_layer[1].weight.shape == (128, 256, 1, 1)
    assert unit.res_layer[7].weight.shape == (512, 128, 1, 1)


def test_published_initialisation():
    torch.manual_seed(4)
    model = build_model('ir_se_50')
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            assert torch.all(module.weight == 1) and torch.all(module.bias == 0), name
    # Kaiming normal, fan_out, relu gain: std = sqrt(2 / fan_out); biases zero.
    checks = {
        'input_layer.0': model.input_layer[0],
        'body.23.res_layer.4': model.body[23].res_layer[4],
        'body.23.res_layer.se_block.fc1': model.body[23].res_layer.se_block.fc1,
        'output_layer.3': model.output_layer[3],
    }
    for name, module in checks.items():
        w = module.weight
        fan_out = w.shape[0] * (w[0, 0].numel() if w.dim() == 4 else 1)
        expected_std = math.sqrt(2.0 / fan_out)
        tolerance = 4 * expected_std / math.sqrt(2 * w.numel()) + 1e-3 * expected_std
        assert abs(w.std().item() - expected_std) < tolerance, (name, w.std().item(), expected_std)
        assert abs(w.mean().item()) < 4 * expected_std / math.sqrt(w.numel()), name
    assert torch.all(model.output_layer[3].bias == 0)


def test_iresnet_rejects_unknown_depth():
    with pytest.raises(ValueError, match='num_layers'):
        IResNet(42)
