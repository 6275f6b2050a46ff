"""EQFace quality branch: feature map -> FC -> BN1d -> ReLU -> FC(1) -> Sigmoid (paper figure 2)."""

from __future__ import annotations

import torch
from torch import nn


class QualityHead(nn.Module):
    """forward(feature_map (B,C,h,w)) -> quality (B,) in [0, 1].

    pooled=False flattens the whole map (as in the paper); pooled=True global-average-pools first,
    which makes the first FC C x hidden instead of C*h*w x hidden.
    """

    def __init__(self, feature_shape: tuple[int, int, int], hidden: int = 512, pooled: bool = False) -> None:
        super().__init__()
        channels, height, width = feature_shape
        self.feature_shape = tuple(feature_shape)
        self.pooled = pooled
        in_features = channels if pooled else channels * height * width
        self.fc1 = nn.Linear(in_features, hidden, bias=False)
        self.bn = nn.BatchNorm1d(hidden)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Linear(hidden, 1)

    def forward(self, feature_map: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_tracing() and tuple(feature_map.shape[1:]) != self.feature_shape:
            raise ValueError(
                f"QualityHead expects feature maps of shape (B, *{self.feature_shape}), "
                f"got {tuple(feature_map.shape)}"
            )
        x = feature_map.mean(dim=(2, 3)) if self.pooled else torch.flatten(feature_map, 1)
        return torch.sigmoid(self.fc2(self.relu(self.bn(self.fc1(x))))).squeeze(1)
