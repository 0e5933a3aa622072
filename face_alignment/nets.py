"""The three MTCNN networks (P-Net, R-Net, O-Net) and the loading of their weights.

Layer names and shapes match the weight files that the ``facenet-pytorch`` 2.6.0 wheel (MIT licence)
ships as ``facenet_pytorch/data/{pnet,rnet,onet}.pt``; they are plain state dicts and load strictly.
Only those data files are used: facenet-pytorch's code is never imported (its declared requirements
conflict with ours, so it is installed with ``pip install --no-deps facenet-pytorch==2.6.0``).

Conventions of these weights (inherited from the original Caffe models):

* input: RGB, ``(pixel - 127.5) * 0.0078125``, shape ``(B, 3, H, W)``;
* max-pooling rounds up (``ceil_mode=True``);
* before a dense layer the ``(B, C, H, W)`` feature map is flattened in Caffe's order,
  i.e. after ``permute(0, 3, 2, 1)``;
* face probabilities are a softmax over two channels (channel 1 = face);
* O-Net's landmarks are five x values followed by five y values, relative to the box.
"""
from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Optional, Tuple, Union

import torch
from torch import nn

logger = logging.getLogger(__name__)

WEIGHT_FILES = {"pnet": "pnet.pt", "rnet": "rnet.pt", "onet": "onet.pt"}
WEIGHTS_PACKAGE = "facenet_pytorch"
INSTALL_HINT = "pip install --no-deps facenet-pytorch==2.6.0"


def _caffe_flatten(x: torch.Tensor) -> torch.Tensor:
    """Flatten ``(B, C, H, W)`` in the order the Caffe-trained dense layers expect."""
    return x.permute(0, 3, 2, 1).reshape(x.shape[0], -1)


class PNet(nn.Module):
    """Proposal network: fully convolutional, 12x12 receptive field, stride 2.

    ``forward`` returns ``(offsets (B, 4, h, w), probs (B, 2, h, w))``. ``softmax_dim`` is the
    axis of the face/non-face softmax: 1, the two channels (default); -1 reproduces the published
    ``get_nets.py``, whose softmax runs over the image columns instead (``compat="published"``).
    """

    def __init__(self, softmax_dim: int = 1) -> None:
        super().__init__()
        if softmax_dim not in (1, -1):
            raise ValueError(f"softmax_dim must be 1 (channels) or -1 (published), got {softmax_dim}")
        self.softmax_dim = softmax_dim
        self.conv1 = nn.Conv2d(3, 10, kernel_size=3)
        self.prelu1 = nn.PReLU(10)
        self.pool1 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(10, 16, kernel_size=3)
        self.prelu2 = nn.PReLU(16)
        self.conv3 = nn.Conv2d(16, 32, kernel_size=3)
        self.prelu3 = nn.PReLU(32)
        self.conv4_1 = nn.Conv2d(32, 2, kernel_size=1)
        self.conv4_2 = nn.Conv2d(32, 4, kernel_size=1)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.prelu2(self.conv2(x))
        x = self.prelu3(self.conv3(x))
        return self.conv4_2(x), torch.softmax(self.conv4_1(x), dim=self.softmax_dim)


class RNet(nn.Module):
    """Refinement network on 24x24 crops; returns ``(offsets (B, 4), probs (B, 2))``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 28, kernel_size=3)
        self.prelu1 = nn.PReLU(28)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(28, 48, kernel_size=3)
        self.prelu2 = nn.PReLU(48)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3 = nn.Conv2d(48, 64, kernel_size=2)
        self.prelu3 = nn.PReLU(64)
        self.dense4 = nn.Linear(576, 128)
        self.prelu4 = nn.PReLU(128)
        self.dense5_1 = nn.Linear(128, 2)
        self.dense5_2 = nn.Linear(128, 4)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.prelu3(self.conv3(x))
        x = self.prelu4(self.dense4(_caffe_flatten(x)))
        return self.dense5_2(x), torch.softmax(self.dense5_1(x), dim=1)


class ONet(nn.Module):
    """Output network on 48x48 crops.

    Returns ``(landmarks (B, 10), offsets (B, 4), probs (B, 2))``; landmarks are x1..x5, y1..y5 as
    fractions of the box width and height.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, kernel_size=3)
        self.prelu1 = nn.PReLU(32)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(32, 64, kernel_size=3)
        self.prelu2 = nn.PReLU(64)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3 = nn.Conv2d(64, 64, kernel_size=3)
        self.prelu3 = nn.PReLU(64)
        self.pool3 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv4 = nn.Conv2d(64, 128, kernel_size=2)
        self.prelu4 = nn.PReLU(128)
        self.dense5 = nn.Linear(1152, 256)
        self.prelu5 = nn.PReLU(256)
        self.dense6_1 = nn.Linear(256, 2)
        self.dense6_2 = nn.Linear(256, 4)
        self.dense6_3 = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.pool3(self.prelu3(self.conv3(x)))
        x = self.prelu4(self.conv4(x))
        x = self.prelu5(self.dense5(_caffe_flatten(x)))
        return self.dense6_3(x), self.dense6_2(x), torch.softmax(self.dense6_1(x), dim=1)


def packaged_weights_dir() -> Optional[Path]:
    """The ``data`` folder of the installed facenet-pytorch wheel, or None if it is not installed.

    Uses ``importlib.util.find_spec`` on the top-level package, which locates it without running
    its ``__init__`` (nothing of facenet-pytorch is imported).
    """
    try:
        spec = importlib.util.find_spec(WEIGHTS_PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "data"
        if candidate.is_dir():
            return candidate
    return None


def find_weights_dir(weights_dir: Union[str, Path, None] = None) -> Path:
    """The folder holding ``pnet.pt``, ``rnet.pt`` and ``onet.pt``.

    ``weights_dir`` (a user-given folder) wins; otherwise the facenet-pytorch wheel's data folder
    is used. Raises ``FileNotFoundError`` saying what to install or where to put the files.
    """
    names = sorted(WEIGHT_FILES.values())
    if weights_dir is not None:
        folder = Path(weights_dir)
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise FileNotFoundError(
                f"MTCNN weights folder {folder} lacks {', '.join(missing)}; it must hold "
                f"{', '.join(names)} (the files of facenet_pytorch/data/ in the facenet-pytorch "
                f"2.6.0 wheel, installed with `{INSTALL_HINT}`)")
        return folder
    folder = packaged_weights_dir()
    if folder is None:
        raise FileNotFoundError(
            "MTCNN weights not found: the facenet-pytorch wheel is not installed. Install its "
            f"weight files with `{INSTALL_HINT}` (only its data files are used), or pass a folder "
            f"holding {', '.join(names)} as weights_dir (--mtcnn_weights)")
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise FileNotFoundError(
            f"MTCNN weights folder {folder} of the installed facenet-pytorch lacks "
            f"{', '.join(missing)}; reinstall it with `{INSTALL_HINT}` or pass a folder holding "
            f"{', '.join(names)} as weights_dir (--mtcnn_weights)")
    return folder


def load_state_dict(path: Path) -> dict:
    """Read one weight file (a plain state dict) with a clear error if it is not one."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - re-raised with the file named
        raise ValueError(f"{path}: cannot be read as an MTCNN state dict ({exc})") from exc
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict, found {type(state).__name__}")
    return state


def load_nets(weights_dir: Union[str, Path, None] = None,
              device: Union[str, torch.device] = "cpu") -> Tuple[PNet, RNet, ONet]:
    """P-Net, R-Net and O-Net with their weights loaded strictly, on ``device``, in eval mode."""
    folder = find_weights_dir(weights_dir)
    nets = []
    for key, net in (("pnet", PNet()), ("rnet", RNet()), ("onet", ONet())):
        path = folder / WEIGHT_FILES[key]
        try:
            net.load_state_dict(load_state_dict(path), strict=True)
        except RuntimeError as exc:
            raise ValueError(f"{path}: does not match the {key} layout ({exc})") from exc
        nets.append(net.to(device).eval())
    logger.debug("loaded MTCNN weights from %s onto %s", folder, device)
    return nets[0], nets[1], nets[2]
