"""MobileFaceNet (Chen et al., 2018, Table 1) with a width multiplier.

conv3x3 s2 -> depthwise 3x3 -> bottlenecks (t, c, n, s) -> conv1x1 512 [= feature_map]
-> linear GDConv (depthwise over the whole map) -> BN -> dropout -> flatten -> FC -> BN1d.
Total stride 16, so the last map is ceil(input_size / 16) wide (7 at 112).
"""

from __future__ import annotations

import torch
from torch import nn

from models.backbones.iresnet import check_input_size, scaled_channels, strided_size

# (expansion t, output channels c, repeats n, first stride s), from the paper.
BOTTLENECK_SETTINGS = [(2, 64, 5, 2), (4, 128, 1, 2), (2, 128, 6, 1), (4, 128, 1, 2), (2, 128, 2, 1)]


def conv_bn(
    in_ch: int, out_ch: int, kernel: int, stride: int = 1, groups: int = 1, act: bool = True
) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(in_ch, out_ch, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_ch),
    ]
    if act:
        layers.append(nn.PReLU(out_ch))
    return nn.Sequential(*layers)


class Bottleneck(nn.Module):
    """Inverted residual: 1x1 expand -> depthwise 3x3 (stride) -> linear 1x1 project (+ identity)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = in_ch * expansion
        self.block = nn.Sequential(
            conv_bn(in_ch, hidden, 1),
            conv_bn(hidden, hidden, 3, stride, groups=hidden),
            conv_bn(hidden, out_ch, 1, act=False),
        )
        self.residual = stride == 1 and in_ch == out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return x + out if self.residual else out


class MobileFaceNet(nn.Module):
    """forward(x (B,3,H,W) in [-1,1]) -> (embedding (B,E), feature_map (B,C,h,w))."""

    def __init__(
        self,
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
        stem = scaled_channels(64, width_mult)
        layers: list[nn.Module] = [conv_bn(3, stem, 3, 2), conv_bn(stem, stem, 3, groups=stem)]
        in_ch = stem
        for expansion, channels, repeats, stride in BOTTLENECK_SETTINGS:
            out_ch = scaled_channels(channels, width_mult)
            for i in range(repeats):
                layers.append(Bottleneck(in_ch, out_ch, stride if i == 0 else 1, expansion))
                in_ch = out_ch
        last = scaled_channels(512, width_mult)
        layers.append(conv_bn(in_ch, last, 1))
        self.body = nn.Sequential(*layers)
        side = strided_size(input_size, 4)
        self.feature_shape: tuple[int, int, int] = (last, side, side)
        # Global depthwise conv: a learned per-channel spatial weighting instead of average pooling.
        self.gdconv = nn.Conv2d(last, last, side, groups=last, bias=False)
        self.gdconv_bn = nn.BatchNorm2d(last)
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(last, embedding_size, bias=False)
        self.features = nn.BatchNorm1d(embedding_size)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0, 0.01)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feature_map = self.body(x)
        pooled = self.gdconv_bn(self.gdconv(feature_map))
        embedding = self.features(self.fc(torch.flatten(self.dropout(pooled), 1)))
        return embedding, feature_map
