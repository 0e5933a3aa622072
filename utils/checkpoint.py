"""The one place that loads a backbone from a checkpoint.

Training (``--start_from_model_statedict``), every evaluation script and inference import this
module. It reads the published AdaFace Lightning checkpoints (``state_dict`` with ``model.*``
backbone keys and ``head.*`` margin-head keys, pickled training arguments in
``hyper_parameters``), bare backbone state dicts, ``model.``-prefixed state dicts and DDP
(``module.``) or ``torch.compile`` (``_orig_mod.``) prefixed ones. A checkpoint that does not fit
the backbone is refused with the missing, unexpected and mis-shaped keys named, and, when its keys
are those of another architecture, with that architecture's name.

Every file is read by :func:`read_checkpoint`, with the safe unpickler unless the user trusts the
file (``--trust_checkpoint``, ``trust=True``): a pickle that references anything but the types
real Lightning / AdaFace checkpoints hold is refused before any of it runs.
:func:`check_checkpoint_flags` checks ``main.py``'s checkpoint flags before any work starts.
"""
from __future__ import annotations

import argparse
import collections
import functools
import logging
import pickle
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from net import ARCHITECTURE_CONFIG, ARCHITECTURES, SMALL_ARCHITECTURE_CONFIG, build_model, unit_specs
from utils.errors import UserError
from utils.messages import name_some

logger = logging.getLogger(__name__)

PathLike = Union[str, Path]

MODEL_PREFIX = 'model.'
HEAD_PREFIX = 'head.'
# Wrapper prefixes removed when every key carries them: DDP / DataParallel and torch.compile.
_WRAPPER_PREFIXES = ('module.', '_orig_mod.')


class CheckpointError(UserError, RuntimeError):
    """A checkpoint file is missing, unreadable, or does not fit the backbone."""


class UntrustedCheckpointError(CheckpointError):
    """The safe loader refused a checkpoint: its pickle references a type outside the allowlist."""


#: How to load a refused file anyway (the command-line flag and the Python argument).
TRUST_HINT = "--trust_checkpoint (trust=True in Python)"


class _AsDict:
    """Stands in for Lightning's ``AttributeDict`` (a ``dict`` subclass) while unpickling: the safe
    unpickler fills only plain dicts, so the hyper-parameters arrive as a ``dict``."""

    def __new__(cls, *args: Any) -> dict:  # type: ignore[misc]
        return dict(*args)


class _LegacyModelCheckpointKey:
    """Stands in for the ``ModelCheckpoint`` class that Lightning < 1.5 used as the key of its
    state in ``checkpoint['callbacks']``; :func:`read_checkpoint` puts the real class back."""


def _numpy_globals() -> list:
    """numpy scalars, arrays and dtypes, under numpy 2's ``numpy._core`` and numpy 1's ``numpy.core``."""
    import numpy as np
    reconstruct, scalar = np.ndarray.__reduce__(np.zeros(1))[0], np.float64(0).__reduce__()[0]
    allowed: list = [np.ndarray, np.dtype]
    for module in ('numpy.core.multiarray', 'numpy._core.multiarray'):
        allowed += [(reconstruct, f'{module}._reconstruct'), (scalar, f'{module}.scalar')]
    # numpy >= 1.25 gives each dtype its own class; unpickling a dtype sets the state of one
    allowed += sorted({type(np.dtype(c)) for c in '?bBhHiIlLqQefdg'} - {np.dtype}, key=str)
    return allowed


@functools.lru_cache(maxsize=None)
def _allowed_globals() -> tuple:
    """What the safe loader may rebuild beyond torch's own allowlist (tensors, ``OrderedDict``,
    ``Counter``, ...): exactly the types found in real Lightning / AdaFace checkpoints. The
    published files were written by pytorch-lightning 1.x: training arguments as a dict,
    ``argparse.Namespace`` or Lightning's ``AttributeDict`` (moved between modules over the
    versions), numpy scalars among callback scores, ``collections.Counter`` as the scheduler's
    milestones, and, before Lightning 1.5, the ``ModelCheckpoint`` class as a dictionary key."""
    attribute_dict = [(_AsDict, f'{module}.AttributeDict') for module in (
        'pytorch_lightning.utilities.parsing', 'lightning_fabric.utilities.data',
        'lightning.pytorch.utilities.parsing', 'lightning.fabric.utilities.data',
        'lightning_lite.utilities.data')]
    legacy_key = [(_LegacyModelCheckpointKey, f'{module}.ModelCheckpoint') for module in (
        'pytorch_lightning.callbacks.model_checkpoint', 'lightning.pytorch.callbacks.model_checkpoint')]
    return tuple([argparse.Namespace, collections.Counter, collections.OrderedDict,
                  *attribute_dict, *legacy_key, *_numpy_globals()])


def read_checkpoint(path: PathLike, trust: bool = False, mmap: bool = False) -> dict:
    """Load a checkpoint file on the CPU and return its top-level dict.

    By default only the safe unpickler runs (``torch.load(weights_only=True)`` allowing the
    types of :func:`_allowed_globals`): a file whose pickle references anything else (code to
    run, an unknown class) is refused with an :class:`UntrustedCheckpointError` that names the
    file and the types, before any of it is unpickled. ``trust=True`` (``--trust_checkpoint``)
    uses the full unpickler instead; only for files from a source you trust. ``mmap=True`` maps
    the tensors' storage instead of reading it (cheap inspection of a large file).
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint file not found")
    if not path.is_file():
        raise CheckpointError(f"{path}: not a file")
    mmap = mmap and zipfile.is_zipfile(path)  # only the zip format (torch >= 1.6) can be mapped
    try:
        if trust:
            checkpoint = torch.load(path, map_location='cpu', weights_only=False, mmap=mmap)
        else:
            with torch.serialization.safe_globals(list(_allowed_globals())):
                checkpoint = torch.load(path, map_location='cpu', weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        refused = _refused_types(path, exc)
        if refused is None:
            raise CheckpointError(f"{path}: not a readable PyTorch checkpoint "
                                  f"({type(exc).__name__}: {_first_line(exc)})") from exc
        raise UntrustedCheckpointError(
            f"{path}: not loaded: its pickle references {refused}, which is not among the types "
            f"that checkpoints hold (unpickling it could run code); if you trust the file's "
            f"source, pass {TRUST_HINT}") from None
    except Exception as exc:  # noqa: BLE001 - any failure means: not a readable checkpoint
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint "
                              f"({type(exc).__name__}: {_first_line(exc)})") from exc
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(f"{path}: not a checkpoint: it holds a {type(checkpoint).__name__}, "
                              f"not a dict of tensors or a Lightning checkpoint dict")
    return _restore_legacy_keys(dict(checkpoint))


def _refused_types(path: Path, exc: BaseException) -> Optional[str]:
    """The types the safe loader refused in ``path`` (read statically from the pickle), or
    ``None`` when ``exc`` is not a refusal but a damaged file."""
    text = str(exc)
    if 'Weights only load failed' not in text:
        return None
    names: list[str] = []
    if zipfile.is_zipfile(path):
        try:
            with torch.serialization.safe_globals(list(_allowed_globals())):
                names = sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))
        except Exception:  # noqa: BLE001 - fall back to the unpickler's own words
            names = []
    if not names:
        names = re.findall(r'GLOBAL (\S+)', text)[:1]
    if names:
        return ', '.join(names)
    reasons = [line.strip() for line in text.splitlines() if 'Unpickler error' in line]
    return reasons[0].split('error:', 1)[-1].strip() if reasons else 'an object outside the allowlist'


def _restore_legacy_keys(checkpoint: dict) -> dict:
    """Put Lightning's ``ModelCheckpoint`` class back where Lightning < 1.5 keyed its state by it."""
    callbacks = checkpoint.get('callbacks')
    if isinstance(callbacks, dict) and _LegacyModelCheckpointKey in callbacks:
        from pytorch_lightning.callbacks import ModelCheckpoint
        checkpoint['callbacks'] = {ModelCheckpoint if k is _LegacyModelCheckpointKey else k: v
                                   for k, v in callbacks.items()}
    return checkpoint


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else repr(exc)


def _strip_common_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove wrapper prefixes (``module.``, ``_orig_mod.``) that every key carries."""
    changed = True
    while changed and state:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in state):
                state = {k[len(prefix):]: v for k, v in state.items()}
                changed = True
    return state


def extract_backbone_state_dict(checkpoint_or_state_dict: Mapping, source: str = '<dict>') -> dict:
    """Return the backbone's state dict (keys as in ``net.py``) from any supported layout.

    Accepts a Lightning checkpoint (``state_dict`` with ``model.*`` and ``head.*`` keys), a bare
    backbone state dict, or a bare state dict whose keys carry the ``model.`` prefix; ``module.``
    and ``_orig_mod.`` wrapper prefixes are removed; ``head.*`` and other non-backbone keys are
    dropped. ``source`` names the file in error messages.
    """
    if not isinstance(checkpoint_or_state_dict, Mapping):
        raise CheckpointError(f"{source}: expected a checkpoint dict or a state dict, "
                              f"got {type(checkpoint_or_state_dict).__name__}")
    if 'state_dict' in checkpoint_or_state_dict:
        state = checkpoint_or_state_dict['state_dict']
        if not isinstance(state, Mapping) or not state:
            raise CheckpointError(f"{source}: its 'state_dict' entry is an empty or non-dict "
                                  f"{type(state).__name__}, not a dict of tensors")
        not_tensors = [str(k) for k, v in state.items() if not torch.is_tensor(v)]
        if not_tensors:
            raise CheckpointError(f"{source}: its 'state_dict' holds {len(not_tensors)} non-tensor "
                                  f"entries ({name_some(not_tensors)})")
    else:
        state = checkpoint_or_state_dict
        if not state or not all(torch.is_tensor(v) for v in state.values()):
            raise CheckpointError(f"{source}: neither a Lightning checkpoint (no 'state_dict' entry) nor "
                                  f"a state dict of tensors (top-level keys: {name_some(state, 10) or 'none'})")
    state = _strip_common_prefixes({str(k): v for k, v in state.items()})

    if any(k.startswith(MODEL_PREFIX) for k in state):
        backbone = {k[len(MODEL_PREFIX):]: v for k, v in state.items() if k.startswith(MODEL_PREFIX)}
        dropped = [k for k in state if not k.startswith(MODEL_PREFIX)]
    else:
        backbone = {k: v for k, v in state.items() if not k.startswith(HEAD_PREFIX)}
        dropped = [k for k in state if k.startswith(HEAD_PREFIX)]
    if dropped:
        logger.debug("%s: ignoring %d non-backbone keys (%s)", source, len(dropped),
                     name_some(dropped))
    backbone = _strip_common_prefixes(backbone)
    if not backbone:
        raise CheckpointError(f"{source}: holds no backbone weights (only {name_some(dropped)})")
    return backbone


@functools.lru_cache(maxsize=None)
def _architecture_signature(arch: str) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """Names and shapes of an architecture's state dict, built on the meta device (no memory)."""
    with torch.device('meta'):
        model = build_model(arch)
    return tuple((k, tuple(v.shape)) for k, v in model.state_dict().items())


def _signature(state_dict: Mapping) -> tuple[tuple[str, tuple[int, ...]], ...]:
    return tuple((k, tuple(v.shape)) for k, v in state_dict.items())


#: Every backbone name a checkpoint can be recognised as: the published ones and the demo ones.
KNOWN_ARCHITECTURES: tuple[str, ...] = ARCHITECTURES + tuple(SMALL_ARCHITECTURE_CONFIG)


def _units_and_se(arch: str) -> tuple[int, bool]:
    """Number of body units and whether they hold SE blocks, from the configuration tables."""
    if arch in ARCHITECTURE_CONFIG:
        num_layers, use_se = ARCHITECTURE_CONFIG[arch]
    else:
        num_layers, use_se = SMALL_ARCHITECTURE_CONFIG[arch][:2]
    return len(unit_specs(num_layers)), use_se


def guess_architecture(state_dict: Mapping) -> Optional[str]:
    """The name in ``KNOWN_ARCHITECTURES`` (the published backbones and ``ir_tiny``) whose backbone
    keys and shapes equal those of ``state_dict``.

    Any layout ``extract_backbone_state_dict`` accepts works; returns ``None`` when none fits.
    """
    try:
        backbone = extract_backbone_state_dict(state_dict)
    except CheckpointError:
        return None
    # The number of body units and the presence of SE blocks single out one candidate; its full
    # name/shape signature (built once, on the meta device) must then match exactly.
    units = {int(k.split('.')[1]) for k in backbone if k.startswith('body.') and k.split('.')[1].isdigit()}
    has_se = any('.se_block.' in k for k in backbone)
    candidates = [a for a in KNOWN_ARCHITECTURES if _units_and_se(a) == (len(units), has_se)]
    wanted = sorted(_signature(backbone))
    for arch in candidates:
        if sorted(_architecture_signature(arch)) == wanted:
            return arch
    return None


def _fmt_shape(shape) -> str:
    return 'x'.join(map(str, shape)) if len(shape) else 'scalar'


def load_backbone_weights(model: nn.Module, checkpoint: Union[PathLike, Mapping], strict: bool = True,
                          source: Optional[str] = None, trust: bool = False) -> None:
    """Copy backbone weights from ``checkpoint`` (a file path or an already loaded dict) into ``model``.

    A path is read with :func:`read_checkpoint` (``trust``: see there).

    With ``strict=True`` any missing key, unexpected key or shape mismatch raises a
    ``CheckpointError`` that names the file, the offending keys, and, when the checkpoint's keys
    are those of another architecture, that architecture. With ``strict=False`` the matching keys
    are loaded and the rest is logged as a warning.
    """
    if isinstance(checkpoint, (str, Path)):
        source = source or str(checkpoint)
        checkpoint = read_checkpoint(checkpoint, trust=trust)
    source = source or '<dict>'
    loaded = extract_backbone_state_dict(checkpoint, source)
    expected = model.state_dict()
    problems, mismatched = _backbone_problems(loaded, {k: tuple(v.shape) for k, v in expected.items()})

    if not problems:
        model.load_state_dict(loaded, strict=True)
        logger.info("%s: loaded %d backbone tensors", source, len(loaded))
        return

    model_arch = getattr(model, 'arch', None) or guess_architecture(expected) or type(model).__name__
    checkpoint_arch = guess_architecture(loaded)
    hint = ''
    if checkpoint_arch is not None and checkpoint_arch != model_arch:
        hint = f"this looks like an {checkpoint_arch} checkpoint, but the model is {model_arch}. "
    message = (f"{source}: {hint}The checkpoint does not fit the {model_arch} backbone: "
               + '; '.join(problems))
    if strict:
        raise CheckpointError(message)
    usable = {k: v for k, v in loaded.items() if k in expected and k not in mismatched}
    model.load_state_dict(usable, strict=False)
    logger.warning("%s (strict=False: loaded the %d matching tensors)", message, len(usable))


def _backbone_problems(loaded: Mapping, expected: Mapping[str, tuple]) -> tuple[list[str], list[str]]:
    """What keeps ``loaded`` (a backbone state dict) from fitting ``expected`` (key -> shape): the
    missing, unexpected and mis-shaped keys, described; and the mis-shaped keys."""
    missing = [k for k in expected if k not in loaded]
    unexpected = [k for k in loaded if k not in expected]
    mismatched = [k for k in expected if k in loaded and tuple(loaded[k].shape) != tuple(expected[k])]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s): {name_some(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): {name_some(unexpected)}")
    if mismatched:
        details = [f"{k} (checkpoint {_fmt_shape(loaded[k].shape)}, model {_fmt_shape(expected[k])})"
                   for k in mismatched]
        problems.append(f"{len(mismatched)} shape mismatch(es): {name_some(details)}")
    return problems, mismatched


def architecture_of(checkpoint: Mapping, source: str = '<dict>') -> str:
    """The backbone architecture of a loaded checkpoint: its training arguments'
    ``hyper_parameters.arch``, else the architecture whose keys and shapes it holds
    (:func:`guess_architecture`). Raises ``CheckpointError`` (asking for ``--arch``) when neither
    tells."""
    hparams = checkpoint.get('hyper_parameters') if isinstance(checkpoint, Mapping) else None
    arch = hparams.get('arch') if isinstance(hparams, Mapping) else getattr(hparams, 'arch', None)
    if isinstance(arch, str) and arch:
        return arch
    guessed = guess_architecture(checkpoint)
    if guessed is None:
        raise CheckpointError(f"{source}: cannot tell the backbone architecture (no "
                              f"hyper_parameters.arch, and its keys fit none of "
                              f"{', '.join(KNOWN_ARCHITECTURES)}); pass --arch")
    logger.info("%s: recognised an %s checkpoint", source, guessed)
    return guessed


def load_pretrained_backbone(arch: Optional[str], ckpt_path: PathLike,
                             device: Union[str, torch.device] = 'cpu', trust: bool = False) -> nn.Module:
    """Build ``arch`` (a name in ``net.ARCHITECTURES``; ``None``: :func:`architecture_of` the
    checkpoint), load ``ckpt_path`` strictly, move it to ``device`` and return it in eval mode.
    ``trust=True`` reads a file that the safe loader refuses (see :func:`read_checkpoint`)."""
    checkpoint = read_checkpoint(ckpt_path, trust=trust)
    model = build_model(arch or architecture_of(checkpoint, str(ckpt_path)))
    load_backbone_weights(model, checkpoint, strict=True, source=str(ckpt_path))
    return model.to(device).eval()


def _cpu_state(obj: Union[nn.Module, Mapping]) -> dict[str, torch.Tensor]:
    state = obj.state_dict() if isinstance(obj, nn.Module) else obj
    return {k: v.detach().cpu().clone() for k, v in state.items()}


def save_lightning_style_checkpoint(path: PathLike, model: Union[nn.Module, Mapping],
                                    head_state: Union[nn.Module, Mapping, None] = None,
                                    hyper_parameters: Any = None, **extra: Any) -> Path:
    """Write a checkpoint in the published Lightning layout and return its path.

    ``state_dict`` holds ``model.<key>`` for the backbone (a module or its state dict) and
    ``head.<key>`` for ``head_state`` (e.g. AdaFace's ``kernel``, ``t``, ``batch_mean``,
    ``batch_std``); ``hyper_parameters`` is stored as given (the published files hold an
    ``argparse.Namespace``); ``extra`` adds or overrides top-level entries.
    """
    path = Path(path)
    state = {MODEL_PREFIX + k: v for k, v in _cpu_state(model).items()}
    if head_state is not None:
        state.update({HEAD_PREFIX + k: v for k, v in _cpu_state(head_state).items()})
    checkpoint: dict[str, Any] = {
        'epoch': 0,
        'global_step': 0,
        'pytorch-lightning_version': _lightning_version(),
        'state_dict': state,
    }
    if hyper_parameters is not None:
        checkpoint['hyper_parameters'] = hyper_parameters
    checkpoint.update(extra)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, path)
    return path


def _lightning_version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version('pytorch-lightning')
    except PackageNotFoundError:
        return 'unknown'


# -- main.py's checkpoint flags, checked before any data is read or folder created ------------------

def check_checkpoint_flags(args: argparse.Namespace) -> None:
    """Check ``--resume_from_checkpoint`` and ``--start_from_model_statedict`` against the other
    flags of ``main.py``, before any data is read or folder created; raise a
    :class:`CheckpointError` (one line naming the flag, the file and what to do) when a file is
    missing, refused by the safe loader (``--trust_checkpoint``), not a Lightning training
    checkpoint (for resume), of another architecture than ``--arch``, or (for resume) of another
    head than ``--head`` or ``--custom_num_class``. Each file is mapped (``mmap``), not read: only
    its pickle is, so checking a large checkpoint costs little."""
    trust = bool(getattr(args, 'trust_checkpoint', False))
    if args.resume_from_checkpoint:
        flag = f"--resume_from_checkpoint {args.resume_from_checkpoint}"
        checkpoint = _read_for_flag(flag, args.resume_from_checkpoint, trust)
        _check_resumable(flag, checkpoint)
        _check_backbone(flag, checkpoint, args.arch)
        _check_head(flag, checkpoint, args.head, getattr(args, 'custom_num_class', -1))
    if args.start_from_model_statedict:
        flag = f"--start_from_model_statedict {args.start_from_model_statedict}"
        _check_backbone(flag, _read_for_flag(flag, args.start_from_model_statedict, trust), args.arch)


def check_resume_classes(path: PathLike, num_classes: int, trust: bool = False) -> None:
    """Raise a :class:`CheckpointError` unless the margin head of the checkpoint at ``path``
    (``--resume_from_checkpoint``) has ``num_classes`` classes, as this run's head: the count of
    the training data is known once the data is indexed, before any folder is created. The file
    is mapped, not read (see :func:`check_checkpoint_flags`)."""
    flag = f"--resume_from_checkpoint {path}"
    kernel = _read_for_flag(flag, path, trust).get('state_dict', {}).get(HEAD_PREFIX + 'kernel')
    if torch.is_tensor(kernel) and kernel.ndim == 2 and kernel.shape[1] != num_classes:
        raise CheckpointError(f"{flag} holds a head of {kernel.shape[1]} classes, the training data has "
                              f"{num_classes}: resume with the training data of that run")


def _read_for_flag(flag: str, path: PathLike, trust: bool) -> dict:
    try:
        return read_checkpoint(path, trust=trust, mmap=True)
    except CheckpointError as exc:
        raise type(exc)(f"{flag.split()[0]} {exc}") from exc


def _check_resumable(flag: str, checkpoint: Mapping) -> None:
    """A Lightning training checkpoint: weights, Lightning's version and the optimiser state."""
    if 'pytorch-lightning_version' not in checkpoint or 'state_dict' not in checkpoint:
        tensors = bool(checkpoint) and all(torch.is_tensor(v) for v in checkpoint.values())
        held = ('a bare state dict' if tensors else
                f"a dict of {name_some([str(k) for k in checkpoint], 6) or 'nothing'}")
        raise CheckpointError(f"{flag}: not a Lightning training checkpoint (it holds {held}); "
                              f"resume from a last.ckpt written by main.py, or start from these "
                              f"weights with --start_from_model_statedict")
    if 'optimizer_states' not in checkpoint:
        raise CheckpointError(f"{flag}: holds the weights only, without the optimiser state that "
                              f"resuming needs; start from these weights with "
                              f"--start_from_model_statedict instead")


def _check_backbone(flag: str, checkpoint: Mapping, arch: str) -> None:
    """The checkpoint's backbone has the keys and shapes of ``arch``, else name what it holds."""
    backbone = extract_backbone_state_dict(checkpoint, flag)
    problems, _ = _backbone_problems(backbone, dict(_architecture_signature(arch)))
    if not problems:
        return
    held = guess_architecture(backbone)
    if held is not None:
        raise CheckpointError(f"{flag} holds {held}, --arch says {arch}: pass --arch {held}")
    raise CheckpointError(f"{flag} does not fit --arch {arch}: " + '; '.join(problems))


def _check_head(flag: str, checkpoint: Mapping, head: str, custom_num_class: int) -> None:
    """The resumed head is of the type of ``--head`` (AdaFace keeps norm statistics, the others
    do not) and, when ``--custom_num_class`` is given, of that many classes."""
    state = checkpoint['state_dict']
    kernel = state.get(HEAD_PREFIX + 'kernel')
    if not torch.is_tensor(kernel) or kernel.ndim != 2:
        raise CheckpointError(f"{flag}: holds no margin head ({HEAD_PREFIX}kernel), so training cannot "
                              f"resume from it; start from its weights with --start_from_model_statedict")
    hparams = checkpoint.get('hyper_parameters')
    trained = hparams.get('head') if isinstance(hparams, Mapping) else getattr(hparams, 'head', None)
    adaface = HEAD_PREFIX + 'batch_mean' in state
    if not isinstance(trained, str) or (trained == 'adaface') != adaface:
        trained = 'adaface' if adaface else 'arcface or cosface'
    if head not in trained.split(' or '):
        raise CheckpointError(f"{flag} holds a head trained with --head {trained}, this run says "
                              f"--head {head}: pass --head {trained}")
    if custom_num_class not in (None, -1) and kernel.shape[1] != custom_num_class:
        raise CheckpointError(f"{flag} holds a head of {kernel.shape[1]} classes, --custom_num_class "
                              f"says {custom_num_class}")
