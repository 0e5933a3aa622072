"""head.py's published defaults, written out here, and the logits they give on hand-made inputs.

Published (mk-minchul/AdaFace ``head.py`` and ``config.py``):

* ``AdaFace(embedding_size=512, classnum=70722, m=0.4, h=0.333, s=64., t_alpha=1.0)``, ``eps = 1e-3``,
  buffers ``t = 0``, ``batch_mean = 20``, ``batch_std = 100``;
* ``ArcFace(embedding_size=512, classnum=51332, s=64., m=0.5)``, ``eps = 1e-4``;
* ``CosFace(embedding_size=512, classnum=51332, s=64., m=0.4)``, ``eps = 1e-4``;
* ``build_head(head_type, embedding_size, class_num, m, t_alpha, h, s)`` (this positional order);
* command-line defaults ``--head adaface --m 0.5 --h 0.0 --s 64.0 --t_alpha 0.01``.

``tests/test_head.py`` compares the heads with a dense re-statement of the formulas *given the
head's own m, h, s, t_alpha*; a changed default passes there. Here the expected logits are computed
from the literal published numbers.
"""
from __future__ import annotations

import inspect
import math
from types import SimpleNamespace

import pytest
import torch

import main as main_module
from head import AdaFace, ArcFace, CosFace, build_head
from utils.config import get_args

# Two samples, three classes, kernel columns along the first three axes (scaled: the head
# normalises them). Sample 0 lies at 0.6 rad from class 0 (its label) and 0.6 rad from pi/2 to
# class 1; sample 1 (label 0) coincides with class 2, a non-target cosine of exactly 1.
ANGLE = 0.6
LABELS = torch.tensor([0, 0])


def _inputs():
    kernel = torch.zeros(4, 3)
    kernel[0, 0], kernel[1, 1], kernel[2, 2] = 2.0, 0.5, 3.0
    embeddings = torch.tensor([[math.cos(ANGLE), math.sin(ANGLE), 0.0, 0.0],
                               [0.0, 0.0, 1.0, 0.0]])
    return kernel, embeddings


def _head_with_kernel(cls, **kwargs):
    head = cls(embedding_size=4, classnum=3, **kwargs)
    kernel, embeddings = _inputs()
    with torch.no_grad():
        head.kernel.copy_(kernel)
    return head, embeddings


def _defaults(fn):
    return {name: p.default for name, p in inspect.signature(fn).parameters.items()
            if p.default is not inspect.Parameter.empty}


def test_constructor_defaults_are_published():
    assert _defaults(AdaFace.__init__) == dict(embedding_size=512, classnum=70722, m=0.4, h=0.333, s=64.0,
                                               t_alpha=1.0)
    assert _defaults(ArcFace.__init__) == dict(embedding_size=512, classnum=51332, s=64.0, m=0.5)
    assert _defaults(CosFace.__init__) == dict(embedding_size=512, classnum=51332, s=64.0, m=0.4)
    assert list(inspect.signature(build_head).parameters) == ['head_type', 'embedding_size', 'class_num',
                                                              'm', 't_alpha', 'h', 's']
    ada = AdaFace(embedding_size=4, classnum=3)
    assert (ada.m, ada.h, ada.s, ada.t_alpha, ada.eps) == (0.4, 0.333, 64.0, 1.0, 1e-3)
    assert ada.t.tolist() == [0.0] and ada.batch_mean.tolist() == [20.0] and ada.batch_std.tolist() == [100.0]
    arc, cos = ArcFace(embedding_size=4, classnum=3), CosFace(embedding_size=4, classnum=3)
    assert (arc.m, arc.s, arc.eps) == (0.5, 64.0, 1e-4)
    assert (cos.m, cos.s, cos.eps) == (0.4, 64.0, 1e-4)


def test_adaface_defaults_give_the_published_logits():
    """m 0.4, h 0.333, s 64, t_alpha 1 (the batch statistics replace the initial 20 / 100 at once),
    eps 1e-3 (the cosine of 1 is clamped to 0.999)."""
    head, embeddings = _head_with_kernel(AdaFace)
    norms = torch.tensor([[10.0], [30.0]])
    logits = head(embeddings, norms, LABELS)
    mean, std = 20.0, math.sqrt(200.0)                       # of [10, 30], unbiased std
    assert head.batch_mean.item() == pytest.approx(mean) and head.batch_std.item() == pytest.approx(std)
    scaler = [0.333 * (n - mean) / (std + 1e-3) for n in (10.0, 30.0)]   # within [-1, 1]
    target0 = math.cos(ANGLE - 0.4 * scaler[0]) - (0.4 + 0.4 * scaler[0])
    target1 = math.cos(math.pi / 2 - 0.4 * scaler[1]) - (0.4 + 0.4 * scaler[1])
    expected = 64.0 * torch.tensor([[target0, math.sin(ANGLE), 0.0],
                                    [target1, 0.0, 1.0 - 1e-3]])
    torch.testing.assert_close(logits.detach(), expected, rtol=1e-5, atol=1e-4)


def test_adaface_running_statistics_start_at_20_and_100_and_move_by_t_alpha():
    head, embeddings = _head_with_kernel(AdaFace, t_alpha=0.01)
    head(embeddings, torch.tensor([[10.0], [20.0]]), LABELS)
    assert head.batch_mean.item() == pytest.approx(0.01 * 15.0 + 0.99 * 20.0, rel=1e-6)
    assert head.batch_std.item() == pytest.approx(0.01 * math.sqrt(50.0) + 0.99 * 100.0, rel=1e-6)


def test_arcface_defaults_give_the_published_logits():
    """m 0.5, s 64, eps 1e-4."""
    head, embeddings = _head_with_kernel(ArcFace)
    logits = head(embeddings, None, LABELS)
    expected = 64.0 * torch.tensor([[math.cos(ANGLE + 0.5), math.sin(ANGLE), 0.0],
                                    [math.cos(math.pi / 2 + 0.5), 0.0, 1.0 - 1e-4]])
    torch.testing.assert_close(logits.detach(), expected, rtol=1e-5, atol=1e-4)


def test_cosface_defaults_give_the_published_logits():
    """m 0.4, s 64, eps 1e-4."""
    head, embeddings = _head_with_kernel(CosFace)
    logits = head(embeddings, None, LABELS)
    expected = 64.0 * torch.tensor([[math.cos(ANGLE) - 0.4, math.sin(ANGLE), 0.0],
                                    [0.0 - 0.4, 0.0, 1.0 - 1e-4]])
    torch.testing.assert_close(logits.detach(), expected, rtol=1e-5, atol=1e-4)


def test_build_head_takes_the_published_positional_order():
    # build_head(head_type, embedding_size, class_num, m, t_alpha, h, s): four distinct values
    ada = build_head('adaface', 4, 3, 0.1, 0.2, 0.3, 30.0)
    assert type(ada) is AdaFace and ada.kernel.shape == (4, 3)
    assert (ada.m, ada.t_alpha, ada.h, ada.s) == (0.1, 0.2, 0.3, 30.0)
    arc = build_head('arcface', 4, 3, 0.1, 0.2, 0.3, 30.0)
    cos = build_head('cosface', 4, 3, 0.1, 0.2, 0.3, 30.0)
    assert type(arc) is ArcFace and (arc.m, arc.s) == (0.1, 30.0)
    assert type(cos) is CosFace and (cos.m, cos.s) == (0.1, 30.0)
    # and the values act: CosFace with m 0.1, s 30 on the hand-made inputs
    kernel, embeddings = _inputs()
    with torch.no_grad():
        cos.kernel.copy_(kernel)
    torch.testing.assert_close(cos(embeddings, None, LABELS)[:, 0].detach(),
                               30.0 * torch.tensor([math.cos(ANGLE) - 0.1, -0.1]), rtol=1e-5, atol=1e-4)


def test_command_line_defaults_and_flags_reach_the_head(tmp_path):
    args = get_args(['--output_dir', str(tmp_path)])
    assert (args.head, args.m, args.h, args.s, args.t_alpha) == ('adaface', 0.5, 0.0, 64.0, 0.01)
    args = get_args(['--output_dir', str(tmp_path), '--arch', 'ir_tiny', '--m', '0.3', '--h', '0.2',
                     '--s', '50', '--t_alpha', '0.05'])
    module = main_module.build_module(args, SimpleNamespace(num_classes=3, val_set_names=['lfw']))
    head = module.head
    assert type(head) is AdaFace and head.kernel.shape == (512, 3)
    assert (head.m, head.h, head.s, head.t_alpha) == (0.3, 0.2, 50.0, 0.05)
