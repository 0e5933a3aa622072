"""Lightning's own checkpoint reads, made safe: a ``CheckpointIO`` plugin that reads every file
through :func:`utils.checkpoint.read_checkpoint`.

``main.py`` gives it to ``pl.Trainer``, so resuming (``trainer.fit(ckpt_path=...)``) and testing
the best checkpoint (``trainer.test(ckpt_path=...)``) unpickle with the same allowlist as every
other entry point and refuse anything else unless ``--trust_checkpoint`` was given. (Lightning
alone would hand the file to ``torch.load`` with ``weights_only=None``, which
``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` turns into the full unpickler.) Writing is Lightning's own.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

from utils.checkpoint import PathLike, read_checkpoint


class SafeCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose loads go through :func:`read_checkpoint` (on the CPU; Lightning
    moves the state to the model's device); ``trust=True`` allows the full unpickler."""

    def __init__(self, trust: bool = False) -> None:
        super().__init__()
        self.trust = trust

    def load_checkpoint(self, path: PathLike, map_location: Optional[Callable] = None,
                        weights_only: Optional[bool] = None) -> dict[str, Any]:
        """Read ``path`` safely; ``map_location`` and ``weights_only`` are Lightning's and ignored:
        files are read to the CPU, and whether to trust them is this plugin's ``trust``."""
        return read_checkpoint(path, trust=self.trust)
