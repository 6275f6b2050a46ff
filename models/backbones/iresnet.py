"""IResNet backbones as in insightface arcface_torch (r18/r34/r50/r100).

Block: BN -> Conv3x3 -> BN -> PReLU -> Conv3x3 (stride here) -> BN, plus a (1x1 conv + BN) shortcut
when the shape changes. Stem: Conv3x3 s1 -> BN -> PReLU. Four stride-2 stages, so the last map is
ceil(input_size / 16) pixels wide (7 at 112). Output: BN -> dropout -> flatten -> FC -> BN1d.
"""

from __future__ import annotations

import torch
from torch import nn

IRESNET_LAYERS: dict[str, list[int]] = {
    "r18": [2, 2, 2, 2],
    "r34": [3, 4, 6, 3],
    "r50": [3, 4, 14, 3],
    "r100": [3, 13, 30, 3],
}


def scaled_channels(channels: int, width_mult: float, divisor: int = 8) -> int:
    """Channels * width_mult rounded to a multiple of `divisor` (never below it)."""
    return max(divisor, round(channels * width_mult / divisor) * divisor)


def strided_size(size: int, num_stride2: int) -> int:
    """Spatial size after `num_stride2` stride-2 convs with kernel 3 / padding 1 (or 1x1, padding 0)."""
    for _ in range(num_stride2):
        size = (size + 1) // 2
    return size


def check_input_size(input_size: int) -> None:
    if not isinstance(input_size, int) or isinstance(input_size, bool) or input_size < 16:
        raise ValueError(f"input_size must be an integer >= 16 (e.g. 112, 64, 56, 48), got {input_size!r}")


class IBasicBlock(nn.Module):
    def __init__(self, in_channels: int, channels: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels, eps=1e-5)
        self.conv1 = nn.Conv2d(in_channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels, eps=1e-5)
        self.prelu = nn.PReLU(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, stride, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(channels, eps=1e-5)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride, bias=False),
                nn.BatchNorm2d(channels, eps=1e-5),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        identity = x if self.downsample is None else self.downsample(x)
        return out + identity


class IResNet(nn.Module):
    """forward(x (B,3,H,W) in [-1,1]) -> (embedding (B,E), feature_map (B,C,h,w))."""

    def __init__(
        self,
        layers: list[int],
        *,
        input_size: int = 112,
        embedding_size: int = 512,
        width_mult: float = 1.0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        check_input_size(input_size)
        if width_mult <= 0:
            raise ValueError(f"width_mult must be > 0, got {width_mult}")
        widths = [scaled_channels(c, width_mult) for c in (64, 128, 256, 512)]
        stem = widths[0]
        self.conv1 = nn.Conv2d(3, stem, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem, eps=1e-5)
        self.prelu = nn.PReLU(stem)
        in_channels = stem
        stages = []
        for width, depth in zip(widths, layers, strict=True):
            blocks = [IBasicBlock(in_channels, width, stride=2)]
            blocks += [IBasicBlock(width, width) for _ in range(depth - 1)]
            stages.append(nn.Sequential(*blocks))
            in_channels = width
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        side = strided_size(input_size, 4)
        self.feature_shape: tuple[int, int, int] = (in_channels, side, side)
        self.bn2 = nn.BatchNorm2d(in_channels, eps=1e-5)
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(in_channels * side * side, embedding_size)
        self.features = nn.BatchNorm1d(embedding_size, eps=1e-5)
        self._init_weights()

    def _init_weights(self) -> None:
        # As arcface_torch: N(0, 0.1) convs, unit BN, and a frozen unit scale on the embedding BN
        # (only its shift is learned). Plus arcface_torch's zero_init_residual option, on here:
        # each block starts as its shortcut, so an untrained net in eval mode (BN running stats
        # still 0/1) gives finite outputs; without it r50 reaches 1e26 and r100 NaN at init.
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0, 0.1)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.constant_(module.weight, 1)
                nn.init.constant_(module.bias, 0)
        for module in self.modules():
            if isinstance(module, IBasicBlock):
                nn.init.constant_(module.bn3.weight, 0)
        nn.init.constant_(self.features.weight, 1.0)
        self.features.weight.requires_grad = False

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        feature_map = self.bn2(x)
        flat = torch.flatten(self.dropout(feature_map), 1)
        embedding = self.features(self.fc(flat))
        return embedding, feature_map


def iresnet(
    name: str,
    *,
    input_size: int = 112,
    embedding_size: int = 512,
    width_mult: float = 1.0,
    dropout: float = 0.0,
) -> IResNet:
    return IResNet(
        IRESNET_LAYERS[name],
        input_size=input_size,
        embedding_size=embedding_size,
        width_mult=width_mult,
        dropout=dropout,
    )
