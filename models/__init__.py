"""EQFace networks and loss: backbones, quality branch, combined-margin head, save/load."""

from models.backbones import BACKBONE_NAMES, get_backbone
from models.eqface_net import EQFaceNet, build_eqface_net, load_eqface_net, save_eqface_net, unwrap
from models.export import export_onnx
from models.margin import Margin, MarginHead, MarginOutput
from models.partial_fc import (
    ShardedMarginHead,
    assemble_centres,
    load_sharded_centres,
    save_sharded_centres,
    shard_range,
)
from models.quality import QualityHead

__all__ = [
    "BACKBONE_NAMES",
    "EQFaceNet",
    "Margin",
    "MarginHead",
    "MarginOutput",
    "QualityHead",
    "ShardedMarginHead",
    "assemble_centres",
    "build_eqface_net",
    "export_onnx",
    "get_backbone",
    "load_eqface_net",
    "load_sharded_centres",
    "save_eqface_net",
    "save_sharded_centres",
    "shard_range",
    "unwrap",
]
