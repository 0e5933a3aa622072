"""Tests of utils/checkpoint.py: reading, extracting, strict loading and its error messages."""
from __future__ import annotations

import argparse
import logging
import pathlib

import pytest
import torch

from net import build_model
from utils.checkpoint import (
    CheckpointError,
    UntrustedCheckpointError,
    architecture_of,
    extract_backbone_state_dict,
    guess_architecture,
    load_backbone_weights,
    load_pretrained_backbone,
    read_checkpoint,
    save_lightning_style_checkpoint,
)


def adaface_head_state(num_classes: int = 10) -> dict[str, torch.Tensor]:
    """The published AdaFace head's state: kernel (512 x classes) and its norm statistics buffers."""
    return {
        'kernel': torch.randn(512, num_classes),
        't': torch.zeros(1),
        'batch_mean': torch.ones(1) * 20,
        'batch_std': torch.ones(1) * 100,
    }


def published_hparams() -> argparse.Namespace:
    return argparse.Namespace(arch='ir_18', head='adaface', m=0.4, h=0.333, s=64.0, t_alpha=0.01,
                              lr=0.1, lr_milestones='12,20,24', data_root='/data', use_mxrecord=True)


@pytest.fixture(scope='module')
def trained_ir18():
    """An ir_18 whose every tensor differs from a fresh build (weights and BatchNorm statistics)."""
    torch.manual_seed(11)
    model = build_model('ir_18')
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if tensor.is_floating_point():
                tensor.add_(torch.randn_like(tensor) * 0.01)
                if name.endswith('running_var'):
                    tensor.abs_().add_(0.5)
            else:
                tensor.fill_(1234)
    return model.eval()


@pytest.fixture(scope='module')
def lightning_ckpt(tmp_path_factory, trained_ir18):
    path = tmp_path_factory.mktemp('ckpt') / 'adaface_ir18_test.ckpt'
    save_lightning_style_checkpoint(path, trained_ir18, head_state=adaface_head_state(),
                                    hyper_parameters=published_hparams())
    return path


def test_saved_layout_is_published_lightning_layout(lightning_ckpt, trained_ir18):
    raw = torch.load(lightning_ckpt, map_location='cpu', weights_only=False)
    keys = list(raw['state_dict'])
    backbone_keys = [f'model.{k}' for k in trained_ir18.state_dict()]
    assert keys[:len(backbone_keys)] == backbone_keys
    assert keys[len(backbone_keys):] == ['head.kernel', 'head.t', 'head.batch_mean', 'head.batch_std']
    assert isinstance(raw['hyper_parameters'], argparse.Namespace)
    assert raw['hyper_parameters'].arch == 'ir_18'


def test_read_checkpoint_accepts_namespace_with_the_safe_loader(lightning_ckpt, caplog):
    with caplog.at_level(logging.WARNING, logger='utils.checkpoint'):
        checkpoint = read_checkpoint(lightning_ckpt)
    assert caplog.records == []  # no fallback to the unsafe loader was needed
    assert checkpoint['hyper_parameters'] == published_hparams()
    torch.testing.assert_close(checkpoint['state_dict']['head.batch_mean'], torch.tensor([20.0]))


def test_round_trip_strict_gives_identical_outputs(lightning_ckpt, trained_ir18):
    model = load_pretrained_backbone('ir_18', lightning_ckpt)
    assert not model.training
    for key, value in trained_ir18.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        expected_e, expected_n = trained_ir18(x)
        got_e, got_n = model(x)
    assert torch.equal(got_e, expected_e) and torch.equal(got_n, expected_n)


@pytest.mark.parametrize('layout', ['lightning', 'bare', 'model_prefix', 'ddp', 'ddp_lightning'])
def test_extract_accepts_every_layout(layout, trained_ir18):
    backbone = trained_ir18.state_dict()
    head = {f'head.{k}': v for k, v in adaface_head_state().items()}
    if layout == 'lightning':
        given = {'state_dict': {**{f'model.{k}': v for k, v in backbone.items()}, **head}, 'epoch': 3}
    elif layout == 'bare':
        given = dict(backbone)
    elif layout == 'model_prefix':
        given = {**{f'model.{k}': v for k, v in backbone.items()}, **head}
    elif layout == 'ddp':
        given = {f'module.{k}': v for k, v in backbone.items()}
    else:
        given = {'state_dict': {f'module.model.{k}': v for k, v in backbone.items()}}
    extracted = extract_backbone_state_dict(given)
    assert list(extracted) == list(backbone)
    assert all(extracted[k] is backbone[k] for k in backbone)
    fresh = build_model('ir_18')
    load_backbone_weights(fresh, given, strict=True)
    assert torch.equal(fresh.output_layer[3].weight, trained_ir18.output_layer[3].weight)


def test_extract_drops_head_of_bare_state_dict(trained_ir18):
    given = {**trained_ir18.state_dict(), 'head.kernel': torch.zeros(512, 3)}
    assert 'head.kernel' not in extract_backbone_state_dict(given)


def test_guess_architecture(trained_ir18):
    state = trained_ir18.state_dict()
    assert guess_architecture(state) == 'ir_18'
    assert guess_architecture({'state_dict': {f'model.{k}': v for k, v in state.items()}}) == 'ir_18'
    wrong_shape = dict(state)
    wrong_shape['output_layer.3.weight'] = torch.zeros(512, 10)
    assert guess_architecture(wrong_shape) is None
    missing_one = dict(state)
    del missing_one['body.7.res_layer.5.running_var']
    assert guess_architecture(missing_one) is None
    assert guess_architecture({'foo': torch.zeros(1)}) is None
    assert guess_architecture(build_model('ir_se_50').state_dict()) == 'ir_se_50'


def test_architecture_of_reads_training_arguments_then_keys(trained_ir18, tmp_path):
    backbone = {f'model.{k}': v for k, v in trained_ir18.state_dict().items()}
    assert architecture_of({'state_dict': backbone, 'hyper_parameters': published_hparams()}) == 'ir_18'
    assert architecture_of({'state_dict': {}, 'hyper_parameters': {'arch': 'ir_tiny'}}) == 'ir_tiny'
    assert architecture_of({'state_dict': backbone, 'hyper_parameters': {'lr': 0.1}}) == 'ir_18'  # keys
    with pytest.raises(CheckpointError, match=r'tiny\.ckpt: cannot tell .*pass --arch'):
        architecture_of({'state_dict': {'model.x': torch.zeros(1)}}, 'tiny.ckpt')
    # load_pretrained_backbone without an architecture reads the file once and recognises it
    path = save_lightning_style_checkpoint(tmp_path / 'bare.ckpt', trained_ir18)
    model = load_pretrained_backbone(None, path)
    assert model.arch == 'ir_18' and not model.training
    assert torch.equal(model.output_layer[3].weight, trained_ir18.output_layer[3].weight)


def _error(model, checkpoint, **kwargs) -> str:
    with pytest.raises(CheckpointError) as info:
        load_backbone_weights(model, checkpoint, **kwargs)
    return str(info.value)


def test_missing_keys_are_named(tmp_path, trained_ir18):
    state = dict(trained_ir18.state_dict())
    removed = ['body.7.res_layer.5.running_var', 'output_layer.3.bias']
    for key in removed:
        del state[key]
    path = save_lightning_style_checkpoint(tmp_path / 'missing.ckpt', state)
    message = _error(build_model('ir_18'), path)
    assert str(path) in message
    assert '2 missing key(s)' in message
    for key in removed:
        assert key in message
    assert 'unexpected' not in message and 'looks like' not in message


def test_unexpected_keys_are_named(tmp_path, trained_ir18):
    state = {**trained_ir18.state_dict(), 'qaconv.weight': torch.zeros(3), 'body.99.extra': torch.zeros(1)}
    path = save_lightning_style_checkpoint(tmp_path / 'extra.ckpt', state)
    message = _error(build_model('ir_18'), path)
    assert str(path) in message and '2 unexpected key(s)' in message
    assert 'qaconv.weight' in message and 'body.99.extra' in message


def test_many_missing_keys_are_summarised(trained_ir18):
    state = {k: v for k, v in trained_ir18.state_dict().items() if not k.startswith('body.')}
    model = build_model('ir_18')
    n_missing = sum(1 for k in model.state_dict() if k.startswith('body.'))
    message = _error(model, state, source='partial.pth')
    assert message.startswith('partial.pth: ')
    assert f'{n_missing} missing key(s)' in message
    assert f'and {n_missing - 5} more' in message


def test_shape_mismatch_is_named(tmp_path, trained_ir18):
    state = dict(trained_ir18.state_dict())
    state['output_layer.3.weight'] = torch.zeros(256, 25088)
    path = save_lightning_style_checkpoint(tmp_path / 'shape.ckpt', state)
    message = _error(build_model('ir_18'), path)
    assert '1 shape mismatch(es)' in message
    assert 'output_layer.3.weight (checkpoint 256x25088, model 512x25088)' in message


def test_wrong_architecture_is_recognised(tmp_path):
    path = save_lightning_style_checkpoint(tmp_path / 'ir34.ckpt', build_model('ir_34'),
                                           head_state=adaface_head_state(),
                                           hyper_parameters=published_hparams())
    model = build_model('ir_18')
    before = {k: v.clone() for k, v in model.state_dict().items()}
    message = _error(model, path)
    assert str(path) in message
    assert 'this looks like an ir_34 checkpoint, but the model is ir_18' in message.lower()
    assert 'missing key(s)' in message and 'unexpected key(s)' in message
    assert 'body.3.shortcut_layer' in message
    # A refused checkpoint leaves the model untouched.
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_non_strict_loads_the_matching_part(trained_ir18, caplog):
    state = dict(trained_ir18.state_dict())
    del state['output_layer.3.bias']
    state['output_layer.3.weight'] = torch.zeros(3, 3)
    state['extra.key'] = torch.zeros(1)
    model = build_model('ir_18')
    fresh_weight = model.output_layer[3].weight.detach().clone()
    with caplog.at_level(logging.WARNING, logger='utils.checkpoint'):
        load_backbone_weights(model, state, strict=False, source='partial.pth')
    assert torch.equal(model.input_layer[0].weight, trained_ir18.input_layer[0].weight)
    assert torch.equal(model.output_layer[3].weight, fresh_weight)
    text = caplog.text
    assert 'partial.pth' in text and 'output_layer.3.bias' in text and 'extra.key' in text


def test_missing_file(tmp_path):
    path = tmp_path / 'nope.ckpt'
    with pytest.raises(CheckpointError, match='not found') as info:
        read_checkpoint(path)
    assert str(path) in str(info.value)
    with pytest.raises(CheckpointError, match='nope.ckpt'):
        load_pretrained_backbone('ir_18', path)


def test_directory_is_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match='not a file'):
        read_checkpoint(tmp_path)


@pytest.mark.parametrize('content', [b'hello, this is not a checkpoint\n', b'PK\x03\x04 truncated zip', b''])
def test_non_checkpoint_file(tmp_path, content):
    path = tmp_path / 'junk.ckpt'
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match='not a readable PyTorch checkpoint') as info:
        read_checkpoint(path)
    assert str(path) in str(info.value)


def test_pickle_of_non_dict_is_refused(tmp_path):
    path = tmp_path / 'list.pt'
    torch.save([torch.zeros(2)], path)
    with pytest.raises(CheckpointError, match='holds a list'):
        read_checkpoint(path)


def test_dict_without_tensors_is_refused(tmp_path):
    path = tmp_path / 'meta.pt'
    torch.save({'epoch': 3, 'note': 'no weights here'}, path)
    with pytest.raises(CheckpointError) as info:
        load_backbone_weights(build_model('ir_18'), path)
    message = str(info.value)
    assert str(path) in message and "no 'state_dict' entry" in message and 'epoch' in message


def test_state_dict_with_non_tensors_is_refused():
    given = {'state_dict': {'model.input_layer.0.weight': torch.zeros(64, 3, 3, 3), 'model.note': 'text'}}
    expected = r"bad\.ckpt: its 'state_dict' holds 1 non-tensor entries \(model\.note\)"
    with pytest.raises(CheckpointError, match=expected):
        extract_backbone_state_dict(given, source='bad.ckpt')
    with pytest.raises(CheckpointError, match="empty"):
        extract_backbone_state_dict({'state_dict': {}}, source='bad.ckpt')


def test_head_only_checkpoint_is_refused():
    given = {'state_dict': {f'head.{k}': v for k, v in adaface_head_state().items()}}
    with pytest.raises(CheckpointError, match='no backbone weights'):
        extract_backbone_state_dict(given, source='head_only.ckpt')


def test_unlisted_objects_are_refused_unless_trusted(tmp_path, trained_ir18, caplog):
    hparams = published_hparams()
    hparams.output_dir = pathlib.PurePosixPath('/experiments/run1')  # a harmless class, not allowlisted
    path = save_lightning_style_checkpoint(tmp_path / 'unlisted.ckpt', trained_ir18, hyper_parameters=hparams)
    with pytest.raises(UntrustedCheckpointError) as info:
        read_checkpoint(path)
    message = str(info.value)
    assert message.startswith(f'{path}: not loaded: its pickle references pathlib.PurePosixPath')
    assert '--trust_checkpoint' in message and 'trust=True' in message and '\n' not in message
    with caplog.at_level(logging.WARNING, logger='utils.checkpoint'):
        checkpoint = read_checkpoint(path, trust=True)
    assert caplog.records == []
    assert checkpoint['hyper_parameters'].output_dir == pathlib.PurePosixPath('/experiments/run1')
    model = load_pretrained_backbone('ir_18', path, trust=True)
    assert torch.equal(model.body[0].res_layer[1].weight, trained_ir18.body[0].res_layer[1].weight)
