"""Face-recognition backbones: get_backbone(name, ...) -> module returning (embedding, feature_map)."""

from __future__ import annotations

from torch import nn

from models.backbones.iresnet import IRESNET_LAYERS, IResNet, iresnet
from models.backbones.mobilefacenet import MobileFaceNet

BACKBONE_NAMES: tuple[str, ...] = (*IRESNET_LAYERS, "mobilefacenet")


def get_backbone(
    name: str,
    *,
    input_size: int = 112,
    embedding_size: int = 512,
    width_mult: float = 1.0,
    dropout: float = 0.0,
) -> nn.Module:
    """Build a backbone by name; it has `feature_shape` = (C, h, w) of the map it returns."""
    kwargs = {
        "input_size": input_size,
        "embedding_size": embedding_size,
        "width_mult": width_mult,
        "dropout": dropout,
    }
    if name in IRESNET_LAYERS:
        return iresnet(name, **kwargs)
    if name == "mobilefacenet":
        return MobileFaceNet(**kwargs)
    raise ValueError(f"unknown backbone {name!r}; valid names: {', '.join(BACKBONE_NAMES)}")


__all__ = ["BACKBONE_NAMES", "IResNet", "MobileFaceNet", "get_backbone"]
