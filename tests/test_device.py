"""utils.device: the --device values of inference and the evaluation scripts."""
import pytest
import torch

from utils.device import resolve_device


def test_devices():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    assert resolve_device(" CPU ") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="--device cuda: CUDA is not available.*use --device cpu"):
            resolve_device("cuda")
    with pytest.raises(ValueError, match="--device 'tpu7' is not a device"):
        resolve_device("tpu7")
    with pytest.raises(ValueError, match="--device 'meta': use cpu, cuda"):
        resolve_device("meta")
