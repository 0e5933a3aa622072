"""IResNet and IR-SE face-recognition backbones (the AdaFace paper's IR-18 ... IR-200).

The module tree, and therefore every ``state_dict`` key, shape and dtype, matches the published
AdaFace ``net.py`` so that its Lightning checkpoints (keys ``model.<key>``) load with
``strict=True``; ``tests/data/net_keys/<arch>.txt`` lists those keys and the tests compare against
them. Only 112x112 input is supported (the body reduces it to 7x7).

``model(x)`` takes BGR images in [-1, 1] of shape ``(B, 3, 112, 112)`` and returns
``(embedding, norm)``: the L2-normalised 512-d feature and its norm before normalisation,
shape ``(B, 1)`` (AdaFace's image-quality proxy).
"""
from __future__ import annotations

import logging
from typing import NamedTuple

import torch
from torch import nn

logger = logging.getLogger(__name__)

EMBEDDING_SIZE = 512
INPUT_SIZE = 112
_FINAL_SPATIAL = 7  # four stride-2 stages: 112 -> 56 -> 28 -> 14 -> 7


class UnitSpec(NamedTuple):
    """One residual unit: input channels, output channels, stride."""
    in_channel: int
    depth: int
    stride: int


def _stage(in_channel: int, depth: int, num_units: int) -> list[UnitSpec]:
    """A stage: the first unit changes channels and halves the resolution, the rest keep both."""
    return [UnitSpec(in_channel, depth, 2)] + [UnitSpec(depth, depth, 1)] * (num_units - 1)


# Channels (in_channel, depth) of the four stages, and units per stage for each published ``num_layers``.
_BASIC_CHANNELS = ((64, 64), (64, 128), (128, 256), (256, 512))
_BOTTLENECK_CHANNELS = ((64, 256), (256, 512), (512, 1024), (1024, 2048))
_UNITS_PER_STAGE = {
    18: (2, 2, 2, 2),
    34: (3, 4, 6, 3),
    50: (3, 4, 14, 3),
    100: (3, 13, 30, 3),
    152: (3, 8, 36, 3),
    200: (3, 24, 36, 3),
}

# Public name -> (published num_layers, SE variant). "101" is the published num_layers=100 network.
ARCHITECTURE_CONFIG = {
    'ir_18': (18, False),
    'ir_34': (34, False),
    'ir_50': (50, False),
    'ir_101': (100, False),
    'ir_152': (152, False),
    'ir_200': (200, False),
    'ir_se_50': (50, True),
    'ir_se_101': (100, True),
    'ir_se_152': (152, True),
    'ir_se_200': (200, True),
}
ARCHITECTURES: tuple[str, ...] = tuple(ARCHITECTURE_CONFIG)

# Not published: narrow networks (IR-18 layout at a quarter of the channels) for the CPU demo and
# quick tests. Name -> (num_layers, SE variant, width of the first stage).
SMALL_ARCHITECTURE_CONFIG = {
    'ir_tiny': (18, False, 16),
}


def num_units(model_name: str) -> int:
    """Number of residual units in the body of a named architecture."""
    return len(unit_specs(ARCHITECTURE_CONFIG[model_name][0]))


def uses_bottleneck(num_layers: int) -> bool:
    """Depth 152 and 200 use bottleneck units (and 2048 output channels); shallower ones basic units."""
    return num_layers > 100


def unit_specs(num_layers: int, width: int = 64) -> list[UnitSpec]:
    """All residual units of the body, in order, for a published ``num_layers`` value.

    ``width`` is the channel count of the input layer (64 in every published network); the stage
    channels scale with it.
    """
    if num_layers not in _UNITS_PER_STAGE:
        raise ValueError(f"num_layers must be one of {sorted(_UNITS_PER_STAGE)}, got {num_layers}")
    channels = _BOTTLENECK_CHANNELS if uses_bottleneck(num_layers) else _BASIC_CHANNELS
    specs: list[UnitSpec] = []
    for (in_channel, depth), units in zip(channels, _UNITS_PER_STAGE[num_layers]):
        specs.extend(_stage(in_channel * width // 64, depth * width // 64, units))
    return specs


def _conv(in_channels: int, out_channels: int, kernel: int, stride: int = 1) -> nn.Conv2d:
    """Bias-free convolution with 'same' padding for odd kernels."""
    return nn.Conv2d(in_channels, out_channels, kernel, stride, padding=kernel // 2, bias=False)


class SEModule(nn.Module):
    """Squeeze-and-excitation gate: ``x * sigmoid(fc2(relu(fc1(avgpool(x)))))``."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = _conv(channels, channels // reduction, 1)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = _conv(channels // reduction, channels, 1)
        self.sigmoid = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.sigmoid(self.fc2(self.relu(self.fc1(self.avg_pool(x)))))
        return x * gate


def _shortcut(in_channel: int, depth: int, stride: int) -> nn.Module:
    """Identity (a 1x1 max-pool that only subsamples) or a projection when channels change."""
    if in_channel == depth:
        return nn.MaxPool2d(1, stride)
    return nn.Sequential(_conv(in_channel, depth, 1, stride), nn.BatchNorm2d(depth))


class BasicBlockIR(nn.Module):
    """Improved-residual basic unit: BN-Conv3x3-BN-PReLU-Conv3x3(stride)-BN plus shortcut."""

    def __init__(self, in_channel: int, depth: int, stride: int, use_se: bool = False) -> None:
        super().__init__()
        self.shortcut_layer = _shortcut(in_channel, depth, stride)
        self.res_layer = nn.Sequential(
            nn.BatchNorm2d(in_channel),
            _conv(in_channel, depth, 3),
            nn.BatchNorm2d(depth),
            nn.PReLU(depth),
            _conv(depth, depth, 3, stride),
            nn.BatchNorm2d(depth),
        )
        if use_se:
            self.res_layer.add_module('se_block', SEModule(depth, 16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res_layer(x) + self.shortcut_layer(x)


class BottleneckIR(nn.Module):
    """Improved-residual bottleneck unit (width ``depth // 4``), stride on the last 1x1 conv."""

    def __init__(self, in_channel: int, depth: int, stride: int, use_se: bool = False) -> None:
        super().__init__()
        width = depth // 4
        self.shortcut_layer = _shortcut(in_channel, depth, stride)
        self.res_layer = nn.Sequential(
            nn.BatchNorm2d(in_channel),
            _conv(in_channel, width, 1),
            nn.BatchNorm2d(width),
            nn.PReLU(width),
            _conv(width, width, 3),
            nn.BatchNorm2d(width),
            nn.PReLU(width),
            _conv(width, depth, 1, stride),
            nn.BatchNorm2d(depth),
        )
        if use_se:
            self.res_layer.add_module('se_block', SEModule(depth, 16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res_layer(x) + self.shortcut_layer(x)


def initialize_weights(modules) -> None:
    """Published initialisation: Kaiming-normal (fan_out, relu) convs and linears with zero bias,
    BatchNorm2d scale 1 and shift 0. Everything else keeps PyTorch's defaults."""
    for m in modules:
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class IResNet(nn.Module):
    """IResNet / IR-SE backbone for 112x112 faces, returning ``(embedding, norm)``.

    ``num_layers`` is the published value (18, 34, 50, 100, 152, 200; "IR-101" is 100);
    ``width`` the input layer's channels (64 as published; smaller for the demo networks).
    """

    def __init__(self, num_layers: int, use_se: bool = False, width: int = 64) -> None:
        super().__init__()
        specs = unit_specs(num_layers, width)
        bottleneck = uses_bottleneck(num_layers)
        unit_cls = BottleneckIR if bottleneck else BasicBlockIR
        out_channels = specs[-1].depth
        self.arch: str | None = None  # set by build_model
        self.num_layers = num_layers
        self.use_se = use_se
        # Attribute order fixes the state_dict order: input_layer, output_layer, body (as published).
        self.input_layer = nn.Sequential(_conv(3, width, 3), nn.BatchNorm2d(width), nn.PReLU(width))
        self.output_layer = nn.Sequential(
            nn.BatchNorm2d(out_channels),
            nn.Dropout(0.4),
            nn.Flatten(),  # reshape-based, so channels_last feature maps flatten in NCHW order too
            nn.Linear(out_channels * _FINAL_SPATIAL * _FINAL_SPATIAL, EMBEDDING_SIZE),
            nn.BatchNorm1d(EMBEDDING_SIZE, affine=False),
        )
        self.body = nn.Sequential(*(unit_cls(s.in_channel, s.depth, s.stride, use_se) for s in specs))
        initialize_weights(self.modules())

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.input_layer(x)
        x = self.body(x)
        x = self.output_layer(x)
        # The norm is taken in float32 (as autocast does for torch.norm on CUDA), so the returned
        # embedding and norm are float32 under mixed precision too.
        x = x.float()
        norm = torch.norm(x, 2, 1, True)
        return torch.div(x, norm), norm


def build_model(model_name: str = 'ir_50') -> IResNet:
    """Build a backbone by name for 112x112 input: one of ``ARCHITECTURES`` (published) or of
    ``SMALL_ARCHITECTURE_CONFIG`` (demo networks). The returned module carries its name in ``model.arch``.
    """
    if model_name in ARCHITECTURE_CONFIG:
        num_layers, use_se = ARCHITECTURE_CONFIG[model_name]
        model = IResNet(num_layers, use_se)
    elif model_name in SMALL_ARCHITECTURE_CONFIG:
        num_layers, use_se, width = SMALL_ARCHITECTURE_CONFIG[model_name]
        model = IResNet(num_layers, use_se, width)
    else:
        raise ValueError(f"unknown backbone {model_name!r}; valid names: {', '.join(ARCHITECTURES)} "
                         f"(and the small demo network{'s' if len(SMALL_ARCHITECTURE_CONFIG) > 1 else ''} "
                         f"{', '.join(SMALL_ARCHITECTURE_CONFIG)})")
    model.arch = model_name
    return model
