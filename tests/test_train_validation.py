"""Training-time validation measures what the evaluation scripts measure.

``train_val.Trainer.validation_step`` (run by Lightning's ``trainer.validate`` on the module and
DataModule that ``main.py`` builds from its flags, the backbone loaded with
``--start_from_model_statedict``) must embed every pair-set image with the flip test and
``pre_norm_vector_add`` fusion, exactly as ``utils.features`` and ``validation_hq/eval_5valsets``
do; otherwise the ``val_acc`` that picks the best checkpoint silently stops matching the paper's
table. The reference fusion is written out here: ``f = normalize(e1 n1 + e2 n2)``, norm
``|e1 n1 + e2 n2|``, with ``(e2, n2)`` the embedding of the horizontally mirrored image.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import main as main_module
from data import DataModule, ValidationPairDataset
from net import build_model
from tests.scripts import load_script
from utils.checkpoint import read_checkpoint
from utils.config import get_args
from utils.demo_data import generate_demo_data
from utils.features import extract_features

REPO = Path(__file__).resolve().parent.parent
SETS = ['cfp_fp', 'lfw']   # two sets, so the set offsets matter
PAIRS = 6                  # pairs per set; training validation then uses 6 folds (min(10, pairs))
IMAGES = 2 * PAIRS * len(SETS)
BATCH = 8


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
    """Tiny data (two identities to train on, two pair sets) and an ir_tiny checkpoint in the
    published Lightning layout with non-trivial BatchNorm statistics."""
    work = tmp_path_factory.mktemp('train_validation')
    root = generate_demo_data(work / 'data', seed=5, num_train_ids=2, imgs_per_id=2, num_val_ids=6,
                              pairs_per_set=PAIRS, set_names=SETS, show_progress=False)['root']
    torch.manual_seed(11)
    model = build_model('ir_tiny')
    g = torch.Generator().manual_seed(12)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    model.eval()
    ckpt = work / 'weights.ckpt'
    torch.save({'state_dict': {f'model.{k}': v for k, v in model.state_dict().items()},
                'hyper_parameters': {'arch': 'ir_tiny'}}, ckpt)
    return root, ckpt, work


@pytest.fixture(scope='module')
def validated(setup):
    """Lightning's validate on the module and DataModule built from main.py's flags."""
    module, trainer, dm = _build_from_flags(*setup, 'run')
    trainer.validate(module, datamodule=dm, verbose=False)
    return module


def _build_from_flags(root: Path, ckpt: Path, work: Path, output: str):
    """The module, trainer and DataModule main.py builds for ``ir_tiny`` started from ``ckpt``."""
    args = get_args(['--data_root', str(root), '--train_data_path', '.', '--val_data_path', '.', '--gpus', '0',
                     '--arch', 'ir_tiny', '--batch_size', str(BATCH), '--num_workers', '0',
                     '--output_dir', str(work / output), '--start_from_model_statedict', str(ckpt)])
    dm = DataModule.from_args(args, seed=args.seed, val_set_names=SETS, label_cache_dir=work / 'labels')
    module = main_module.build_module(args, dm)
    trainer = main_module.build_trainer(args, callbacks=[], loggers=[])
    return module, trainer, dm


def _reference_features(ckpt: Path, images: torch.Tensor):
    """The checkpoint's backbone (loaded by hand) and the flip fusion written out."""
    state = read_checkpoint(ckpt)['state_dict']  # the safe loader; the backbone is copied by hand
    model = build_model('ir_tiny')
    model.load_state_dict({k[len('model.'):]: v for k, v in state.items() if k.startswith('model.')})
    model.eval()
    with torch.no_grad():
        e1, n1 = model(images)
        e2, n2 = model(torch.flip(images, dims=[3]))
    v = e1 * n1 + e2 * n2
    norm = v.norm(dim=1, keepdim=True)
    return (v / norm).numpy(), norm.numpy(), e1.numpy(), model


def test_validation_embeds_with_flip_and_pre_norm_vector_add(setup, validated):
    root, ckpt, _ = setup
    dataset = ValidationPairDataset(root, SETS)
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    assert images.shape == (IMAGES, 3, 112, 112)
    want, want_norm, unflipped, model = _reference_features(ckpt, images)

    out = validated.last_embeddings
    assert out['image_index'].tolist() == list(range(IMAGES))
    assert out['dataname'].tolist() == [0] * (2 * PAIRS) + [1] * (2 * PAIRS)
    np.testing.assert_allclose(out['output'], want, rtol=0, atol=2e-5)
    np.testing.assert_allclose(out['norm'], want_norm, rtol=2e-5, atol=0)

    # the same numbers as utils.features with flip and pre_norm_vector_add on the same weights
    loader = [(images[i:i + BATCH],) for i in range(0, IMAGES, BATCH)]
    features, norms = extract_features(model, loader, use_flip=True, fusion_method='pre_norm_vector_add')
    np.testing.assert_allclose(out['output'], features, rtol=0, atol=2e-5)
    np.testing.assert_allclose(out['norm'], norms, rtol=2e-5, atol=0)

    # and the flip matters for this network: without it the features are clearly different
    assert np.abs(unflipped - want).max() > 1e-2


def test_validation_accuracy_equals_eval_5valsets(setup, validated, tmp_path):
    root, ckpt, _ = setup
    hq_script = load_script('validation_hq/eval_5valsets.py')
    result = hq_script.main(['--data_root', str(root), '--val_data_path', '.', '--set_names', *SETS,
                             '--ckpt_path', str(ckpt), '--arch', 'ir_tiny', '--device', 'cpu',
                             '--num_workers', '0', '--batch_size', str(BATCH), '--nrof_folds', str(PAIRS),
                             '--output_dir', str(tmp_path)])
    script = result['results']['weights']
    got = validated.last_results
    for name in SETS:
        assert got[f'{name}_val_acc'] == pytest.approx(script[name]['acc'], abs=1e-12), name
        assert got[f'{name}_val_best_threshold'] == pytest.approx(script[name]['best_threshold'], abs=1e-12)
        assert got[f'{name}_num_val_samples'] == 2 * PAIRS
    assert got['val_acc'] == pytest.approx(np.mean([script[n]['acc'] for n in SETS]), abs=1e-12)


def test_logged_metric_names_include_the_published_ones(setup, validated):
    """The names the published train_val.py logs (validation_epoch_end / test_epoch_end), written
    out here: ``{set}_val_acc``, ``{set}_best_threshold``, ``{set}_num_val_samples``, ``val_acc``,
    ``epoch``; at test ``{set}_test_acc``, ``{set}_test_best_threshold``,
    ``{set}_num_test_samples``, ``test_acc``, ``epoch``."""
    root, ckpt, work = setup
    logged = validated.trainer.callback_metrics
    for name in SETS:
        for key in (f'{name}_val_acc', f'{name}_best_threshold', f'{name}_num_val_samples'):
            assert key in logged, key
        assert float(logged[f'{name}_best_threshold']) == pytest.approx(
            validated.last_results[f'{name}_val_best_threshold'], abs=1e-6)
    assert 'val_acc' in logged and float(logged['epoch']) == 0.0

    module, trainer, dm = _build_from_flags(root, ckpt, work, 'run_test')
    trainer.test(module, datamodule=dm, verbose=False)
    logged = trainer.callback_metrics
    for name in SETS:
        for key in (f'{name}_test_acc', f'{name}_test_best_threshold', f'{name}_num_test_samples'):
            assert key in logged, key
    assert 'test_acc' in logged and 'epoch' in logged


@pytest.mark.parametrize('order', ['before_model', 'published'])
def test_seed_order(setup, order):
    """``--seed_order before_model`` (default): the initial weights follow --seed, whatever the
    generator's state before. ``published`` (the published main.py seeds after building): they
    follow the state before, and the generator is seeded by --seed afterwards either way."""
    root, ckpt, work = setup
    args = get_args(['--data_root', str(root), '--train_data_path', '.', '--val_data_path', '.', '--gpus', '0',
                     '--arch', 'ir_tiny', '--batch_size', str(BATCH), '--num_workers', '0',
                     '--output_dir', str(work / f'run_{order}'), '--seed', '7', '--seed_order', order])
    built, after = [], []
    for prior in (1, 2):
        torch.manual_seed(prior)
        _, module = main_module.build_seeded(args)
        built.append(module.model.state_dict()['input_layer.0.weight'].clone())
        after.append(torch.rand(3))
    torch.testing.assert_close(after[0], after[1])  # seeded by --seed afterwards in both orders
    same = torch.equal(built[0], built[1])
    assert same == (order == 'before_model')
