"""The published AdaFace checkpoints: names, files, architectures, training data, where they go.

The one registry that ``inference.py`` (``load_pretrained_model('ir_50')``, ``--architecture``) and
the evaluation scripts (``--model_name ir101_webface12m``) read. The repository ships no weights:
users download the files linked from the "Pretrained Models" table of the AdaFace README and save
them in ``pretrained/`` under the names below (``pretrained/README.md`` lists them). A file that
is not there raises :class:`MissingCheckpointError`, whose message names the file to download,
the README row that links it, and the exact path to save it as.
"""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

from utils.checkpoint import CheckpointError
from utils.errors import UserError

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

REPO_ROOT = Path(__file__).resolve().parent.parent
PRETRAINED_DIR = REPO_ROOT / "pretrained"
PRETRAINED_MODELS_URL = "https://github.com/mk-minchul/AdaFace#pretrained-models"


class PublishedModel(NamedTuple):
    """One row of the README's "Pretrained Models" table."""

    file_name: str       # the published file name, looked for in pretrained/
    arch: str            # the backbone in net.py
    training_data: str   # the training set, as the README names it

    @property
    def readme_row(self) -> str:
        """How the README's table names this row, e.g. ``R100 / WebFace12M``."""
        return f"{_README_ARCH[self.arch]} / {self.training_data}"

    @property
    def description(self) -> str:
        """E.g. ``IR-101 trained on WebFace12M``."""
        return f"{self.arch.upper().replace('_', '-')} trained on {self.training_data}"


_README_ARCH = {"ir_18": "R18", "ir_50": "R50", "ir_101": "R100"}

#: Every published checkpoint: model name -> (file in pretrained/, architecture, training data).
PUBLISHED_MODELS: Dict[str, PublishedModel] = {
    "ir18_casia": PublishedModel("adaface_ir18_casia.ckpt", "ir_18", "CASIA-WebFace"),
    "ir18_vgg2": PublishedModel("adaface_ir18_vgg2.ckpt", "ir_18", "VGGFace2"),
    "ir18_webface4m": PublishedModel("adaface_ir18_webface4m.ckpt", "ir_18", "WebFace4M"),
    "ir50_casia": PublishedModel("adaface_ir50_casia.ckpt", "ir_50", "CASIA-WebFace"),
    "ir50_ms1mv2": PublishedModel("adaface_ir50_ms1mv2.ckpt", "ir_50", "MS1MV2"),
    "ir50_webface4m": PublishedModel("adaface_ir50_webface4m.ckpt", "ir_50", "WebFace4M"),
    "ir101_ms1mv2": PublishedModel("adaface_ir101_ms1mv2.ckpt", "ir_101", "MS1MV2"),
    "ir101_ms1mv3": PublishedModel("adaface_ir101_ms1mv3.ckpt", "ir_101", "MS1MV3"),
    "ir101_webface4m": PublishedModel("adaface_ir101_webface4m.ckpt", "ir_101", "WebFace4M"),
    "ir101_webface12m": PublishedModel("adaface_ir101_webface12m.ckpt", "ir_101", "WebFace12M"),
}

#: Short names of the published low-quality scripts (``ir50`` is the MS1MV2 IR-50 there).
MODEL_ALIASES: Dict[str, str] = {"ir50": "ir50_ms1mv2"}

#: The model each architecture loads by default: the published inference.py loads the IR-50
#: MS1MV2 file, its Cog predictor the IR-18 VGGFace2 and IR-101 WebFace12M files.
DEFAULT_MODEL_OF_ARCH: Dict[str, str] = {
    "ir_18": "ir18_vgg2",
    "ir_50": "ir50_ms1mv2",
    "ir_101": "ir101_webface12m",
}
DEFAULT_ARCH = "ir_50"


class UnknownModelError(UserError, ValueError):
    """A model name or architecture that has no published checkpoint."""


class MissingCheckpointError(CheckpointError, FileNotFoundError):
    """A published checkpoint is not in the pretrained folder; the message says what to download
    and where to save it."""


def canonical_model_name(name: str) -> str:
    """The published model name for ``name`` (``ir_101_webface12m`` -> ``ir101_webface12m``,
    ``ir50`` -> ``ir50_ms1mv2``); raises :class:`UnknownModelError` for any other name."""
    key = re.sub(r"^ir_(\d+)", r"ir\1", str(name).strip().lower())
    key = MODEL_ALIASES.get(key, key)
    if key not in PUBLISHED_MODELS:
        raise UnknownModelError(f"unknown --model_name {name!r}; published models: "
                                f"{', '.join(PUBLISHED_MODELS)} (or pass --ckpt_path and --arch)")
    return key


def models_of_arch(arch: str) -> List[str]:
    """The published models of ``arch``, its default first; raises :class:`UnknownModelError`
    when none is published."""
    if arch not in DEFAULT_MODEL_OF_ARCH:
        raise UnknownModelError(f"no published AdaFace checkpoint for {arch!r}; published "
                                f"architectures: {', '.join(DEFAULT_MODEL_OF_ARCH)} (for any other "
                                f"checkpoint pass ckpt_path / --ckpt_path)")
    default = DEFAULT_MODEL_OF_ARCH[arch]
    return [default] + [name for name, model in PUBLISHED_MODELS.items()
                        if model.arch == arch and name != default]


def default_checkpoint_paths() -> Dict[str, str]:
    """``{architecture: 'pretrained/<file>'}`` of the default models (``inference.adaface_models``)."""
    return {arch: f"pretrained/{PUBLISHED_MODELS[name].file_name}"
            for arch, name in DEFAULT_MODEL_OF_ARCH.items()}


def missing_checkpoint_message(name: str, folder: PathLike, others: Sequence[str] = ()) -> str:
    """What to download and where to save it, for the published model ``name`` absent from
    ``folder``; ``others`` names the other published files that would serve as well."""
    model = PUBLISHED_MODELS[name]
    folder = Path(folder).absolute()
    path = folder / model.file_name
    lines = [f"{path} not found: no '{model.file_name}' ({model.description}) in {folder}/.",
             f"Download '{model.file_name}' (the {model.readme_row} row of the 'Pretrained Models' "
             f"table in the AdaFace README links it: {PRETRAINED_MODELS_URL}) and save it as {path}."]
    if others:
        lines.append(f"Any other published {model.arch} checkpoint works too under its published "
                     f"name ({', '.join(PUBLISHED_MODELS[o].file_name for o in others)}).")
    lines.append("Or point --pretrained_dir at the folder that holds it, or pass a checkpoint file "
                 "with --ckpt_path (and --arch).")
    return "\n".join(lines)


def _folder(pretrained_dir: Optional[PathLike]) -> Path:
    return Path(pretrained_dir) if pretrained_dir is not None else PRETRAINED_DIR


def published_checkpoint(name: str, pretrained_dir: Optional[PathLike] = None) -> Tuple[Path, str]:
    """``(file, architecture)`` of the published model ``name`` in ``pretrained_dir`` (default
    ``pretrained/``); raises :class:`MissingCheckpointError` when the file is not there."""
    key = canonical_model_name(name)
    model = PUBLISHED_MODELS[key]
    path = _folder(pretrained_dir) / model.file_name
    if not path.is_file():
        raise MissingCheckpointError(missing_checkpoint_message(key, path.parent))
    return path, model.arch


def find_pretrained_checkpoint(arch: str = DEFAULT_ARCH, pretrained_dir: Optional[PathLike] = None) -> Path:
    """The published checkpoint of ``arch`` in ``pretrained_dir`` (default ``pretrained/``): its
    default file (:data:`DEFAULT_MODEL_OF_ARCH`) if present, else the first other published file
    of that architecture. Raises :class:`MissingCheckpointError` saying which file to download and
    where to put it, :class:`UnknownModelError` for an architecture without published files."""
    default, *others = models_of_arch(arch)
    folder = _folder(pretrained_dir)
    for name in [default, *others]:
        path = folder / PUBLISHED_MODELS[name].file_name
        if path.is_file():
            if name != default:
                logger.info("%s is absent; using %s", folder / PUBLISHED_MODELS[default].file_name, path)
            return path
    raise MissingCheckpointError(missing_checkpoint_message(default, folder, others))
