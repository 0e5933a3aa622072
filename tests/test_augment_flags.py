"""Each ``--*_augmentation_prob`` flag reaches its own augmentation, main.py's way.

The flags are parsed by ``utils.config.get_args`` and the DataModule is built by
``data.DataModule.from_args``, as ``main.py`` does; the three probabilities are distinct (0.1, 0.5,
0.9), so exchanging any two of them anywhere between the command line and the augmenter (the
``Augmenter`` takes them positionally) shows. Behaviour, not attributes: the training set's real
``__getitem__`` is run and each augmentation's calls are counted.
"""
from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import pytest

from data import DataModule
from utils.config import get_args
from utils.demo_data import generate_demo_data

PROBS = {'low_res': 0.1, 'crop': 0.5, 'photometric': 0.9}
DRAWS = 400


@pytest.fixture(scope='module')
def tiny_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp('augment_flags')
    generate_demo_data(root, seed=4, num_train_ids=2, imgs_per_id=2, num_val_ids=2, pairs_per_set=2,
                       show_progress=False)
    return root


def _datamodule(root: Path, out: Path, probs: dict) -> DataModule:
    argv = ['--data_root', str(root), '--train_data_path', '.', '--val_data_path', '.', '--gpus', '0',
            '--arch', 'ir_tiny', '--batch_size', '2', '--num_workers', '0', '--output_dir', str(out)]
    for kind, p in probs.items():
        argv += [f'--{kind}_augmentation_prob', str(p)]
    args = get_args(argv)
    return DataModule.from_args(args, seed=args.seed, label_cache_dir=out / 'label_cache')


def _count_augmentations(dataset, draws: int) -> Counter:
    """Run the dataset's ``__getitem__`` ``draws`` times, counting the augmenter's three steps."""
    counts: Counter = Counter()
    augmenter = dataset.augmenter
    for kind in ('crop', 'low_res', 'photometric'):
        real = getattr(augmenter, f'{kind}_augment')

        def spy(rgb, *args, real=real, kind=kind, **kwargs):
            counts[kind] += 1
            return real(rgb, *args, **kwargs)
        setattr(augmenter, f'{kind}_augment', spy)   # the instance attribute shadows the method
    for k in range(draws):
        dataset[k % len(dataset)]
    return counts


def test_each_augmentation_flag_sets_its_own_probability(tiny_root, tmp_path):
    dm = _datamodule(tiny_root, tmp_path / 'run', PROBS)
    dm.setup('fit')
    counts = _count_augmentations(dm.train_dataset, DRAWS)
    for kind, p in PROBS.items():
        sigma = math.sqrt(p * (1 - p) / DRAWS)
        rate = counts[kind] / DRAWS
        assert abs(rate - p) < 4.5 * sigma, (f"--{kind}_augmentation_prob {p}: the {kind} augmentation "
                                             f"ran in {rate:.3f} of {DRAWS} samples; counts {dict(counts)}")
    augmenter = dm.train_dataset.augmenter
    assert (augmenter.low_res_augmentation_prob, augmenter.crop_augmentation_prob,
            augmenter.photometric_augmentation_prob) == (0.1, 0.5, 0.9)


@pytest.mark.parametrize('kind', list(PROBS))
def test_one_flag_alone_turns_on_only_its_augmentation(tiny_root, tmp_path, kind):
    dm = _datamodule(tiny_root, tmp_path / 'run', {k: (1.0 if k == kind else 0.0) for k in PROBS})
    dm.setup('fit')
    counts = _count_augmentations(dm.train_dataset, 8)
    assert dict(counts) == {kind: 8}
