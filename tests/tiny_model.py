"""A tiny untrained EQFaceNet for the CLI tests (evaluate, score): seconds to build, 32 px input."""

from pathlib import Path

import torch

from models import build_eqface_net, save_eqface_net


def tiny_model(path: Path) -> Path:
    """Saved to `path` (net.pt). Its quality branch is spread so that images get different scores: BatchNorm
    statistics from random inputs, a wide output layer."""
    torch.manual_seed(0)
    net = build_eqface_net(
        backbone="mobilefacenet", input_size=32, width_mult=0.25, embedding_size=16, quality_hidden=8
    ).eval()
    with torch.no_grad():
        _, feature_map = net.backbone(torch.rand(64, 3, 32, 32) * 2 - 1)
        hidden = net.quality.fc1(torch.flatten(feature_map, 1))
        net.quality.bn.running_mean.copy_(hidden.mean(0))
        net.quality.bn.running_var.copy_(hidden.var(0))
        net.quality.fc2.weight.normal_(0, 1.5)
        net.quality.fc2.bias.zero_()
    save_eqface_net(net, path)
    return path
