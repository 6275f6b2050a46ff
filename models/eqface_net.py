"""EQFaceNet = backbone (embedding + feature map) + quality branch, with rebuildable save/load."""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from models.backbones import get_backbone
from models.quality import QualityHead
from models.safe_load import UnsafeFileError, load_weights


class EQFaceNet(nn.Module):
    """forward(x (B,3,H,W) in [-1,1]) -> (embedding (B,E), quality (B,) in [0,1]).

    channels_last (default) stores the conv weights and feeds the images as NHWC: 15-25% faster
    training and inference on this CPU (benchmarks/backbone_speed.py). It changes memory layout
    only, not results or state_dict contents, so it is not part of `arch`.
    """

    def __init__(self, backbone: nn.Module, quality: QualityHead, *, channels_last: bool = True) -> None:
        super().__init__()
        self.backbone = backbone
        self.quality = quality
        self.channels_last = channels_last
        if channels_last:
            self.backbone.to(memory_format=torch.channels_last)
        self.arch: dict[str, Any] = {}  # filled by build_eqface_net; needed by save/load

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        embedding, feature_map = self.backbone(x)
        return embedding, self.quality(feature_map)


def unwrap(net: nn.Module) -> nn.Module:
    """The EQFaceNet inside DistributedDataParallel (.module) and/or torch.compile (._orig_mod)."""
    while True:
        if isinstance(net, nn.parallel.DistributedDataParallel):
            net = net.module
        elif hasattr(net, "_orig_mod") and isinstance(net._orig_mod, nn.Module):
            net = net._orig_mod
        else:
            return net


def build_eqface_net(
    *,
    backbone: str = "r50",
    input_size: int = 112,
    embedding_size: int = 512,
    width_mult: float = 1.0,
    dropout: float = 0.0,
    quality_hidden: int = 512,
    quality_pooled: bool = False,
    channels_last: bool = True,
) -> EQFaceNet:
    """Build an EQFaceNet; `net.arch` records every argument except channels_last (a layout choice)."""
    arch = {
        "backbone": backbone,
        "input_size": input_size,
        "embedding_size": embedding_size,
        "width_mult": width_mult,
        "dropout": dropout,
        "quality_hidden": quality_hidden,
        "quality_pooled": quality_pooled,
    }
    body = get_backbone(
        backbone, input_size=input_size, embedding_size=embedding_size, width_mult=width_mult, dropout=dropout
    )
    quality = QualityHead(body.feature_shape, hidden=quality_hidden, pooled=quality_pooled)
    net = EQFaceNet(body, quality, channels_last=channels_last)
    net.arch = arch
    return net


def save_eqface_net(net: nn.Module, path: str | os.PathLike) -> None:
    """Write {"arch", "state_dict"} to `path`; accepts the net wrapped in DDP and/or torch.compile."""
    net = unwrap(net)
    if not getattr(net, "arch", None):
        raise ValueError("net.arch is empty: build the net with build_eqface_net so it can be rebuilt")
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    torch.save({"arch": dict(net.arch), "state_dict": state}, path)


def load_eqface_net(
    path: str | os.PathLike, map_location: str | torch.device = "cpu", *, channels_last: bool = True
) -> EQFaceNet:
    """Rebuild the net from `arch` and load its weights; bad files raise ValueError naming `path`."""
    try:
        payload = load_weights(path, map_location=map_location)
    except (FileNotFoundError, UnsafeFileError):
        raise
    except Exception as exc:  # corrupt or foreign file
        raise ValueError(f"{path}: not a readable EQFaceNet checkpoint ({exc})") from exc
    if not isinstance(payload, dict) or "arch" not in payload or "state_dict" not in payload:
        raise ValueError(f"{path}: expected a dict with keys 'arch' and 'state_dict'")
    try:
        net = build_eqface_net(**payload["arch"], channels_last=channels_last)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path}: bad 'arch' {payload['arch']!r} ({exc})") from exc
    try:
        net.load_state_dict(payload["state_dict"])
    except RuntimeError as exc:
        raise ValueError(f"{path}: state_dict does not match arch {payload['arch']!r}: {exc}") from exc
    return net.to(map_location)
