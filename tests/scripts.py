"""The evaluation scripts as modules, for tests: their folders are not packages, so each script is
loaded once from its path (and registered in ``sys.modules``, where dataclasses look it up)."""
from __future__ import annotations

import functools
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parent.parent


@functools.lru_cache(maxsize=None)
def load_script(rel_path: str) -> ModuleType:
    """The script at ``rel_path`` (relative to the repository) as a module."""
    spec = importlib.util.spec_from_file_location(f"script_{Path(rel_path).stem}", REPO / rel_path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
