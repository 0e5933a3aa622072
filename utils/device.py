"""Choosing the torch device from a ``--device`` value (inference and the evaluation scripts)."""
from __future__ import annotations

from typing import Union

import torch


def resolve_device(name: Union[str, torch.device]) -> torch.device:
    """``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (cuda when available, else cpu) as a device.

    A device that is not there (no CUDA, an index past the GPU count) or any other kind raises
    ``ValueError`` with a message that names the ``--device`` value and what to use instead.
    """
    text = str(name).strip().lower()
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except RuntimeError as exc:
        raise ValueError(f"--device {text!r} is not a device (use cpu, cuda, cuda:N or auto)") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {text}: CUDA is not available on this machine (this PyTorch "
                             f"{torch.__version__} sees no CUDA GPU); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {text}: only {torch.cuda.device_count()} CUDA device(s) present")
    elif device.type != "cpu":
        raise ValueError(f"--device {text!r}: use cpu, cuda, cuda:N or auto")
    return device
