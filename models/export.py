"""ONNX export of an EQFaceNet: input "images" (B,3,S,S) in [-1,1], i.e. (RGB pixel - 127.5) / 127.5.

Three files from one call:
    eqface.onnx            -> "embedding" (B,E), "quality" (B,)
    eqface-embedding.onnx  -> "embedding" only: what insightface's model_zoo loads as a recognition model
                              (its ArcFaceONNX needs exactly one output; with no Sub/Mul among the first
                              nodes it feeds (BGR->RGB pixel - 127.5) / 127.5, which is this input)
    eqface-quality.onnx    -> "quality" only
insightface routes a model to recognition by its input: square, at least 112 and a multiple of 16 (older
releases: exactly 112), so a net trained at 56 px exports fine but model_zoo.get_model returns None for it.
Keep only the embedding model in an insightface model folder: it loads every .onnx file there.

Uses the TorchScript-based exporter (dynamo=False): the dynamo exporter needs the onnxscript
package, which this environment does not have. The batch axis is dynamic; the image size is fixed
(the flattened FC depends on it).
"""

from __future__ import annotations

import copy
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from models.eqface_net import EQFaceNet

OPSET_VERSION = 17
OUTPUTS = ("embedding", "quality")
# file suffix -> the outputs that file has
VARIANTS = {"": OUTPUTS, "-embedding": ("embedding",), "-quality": ("quality",)}


class _Outputs(nn.Module):
    """The net with only the named outputs, so each exported file has exactly those."""

    def __init__(self, net: nn.Module, names: tuple[str, ...]) -> None:
        super().__init__()
        self.net, self.indices = net, [OUTPUTS.index(n) for n in names]

    def forward(self, x: torch.Tensor):
        out = self.net(x)
        return tuple(out[i] for i in self.indices) if len(self.indices) > 1 else out[self.indices[0]]


def onnx_paths(path: str | os.PathLike) -> dict[tuple[str, ...], Path]:
    """{outputs: file} of the three files `export_onnx(net, path, ...)` writes."""
    path = Path(path)
    return {names: path.with_name(f"{path.stem}{suffix}{path.suffix or '.onnx'}")
            for suffix, names in VARIANTS.items()}


def export_onnx(net: EQFaceNet, path: str | os.PathLike, input_size: int) -> dict[tuple[str, ...], Path]:
    """Write `net` (in eval mode, on CPU, float32) as the three ONNX files above; returns onnx_paths(path)."""
    expected = getattr(net, "arch", {}).get("input_size")
    if expected is not None and expected != input_size:
        raise ValueError(f"input_size={input_size} but the net was built for input_size={expected}")
    # Export a CPU float32 eval-mode copy so the caller's net keeps its mode and device.
    model = copy.deepcopy(net).float().cpu().eval()
    dummy = torch.zeros(2, 3, input_size, input_size)
    paths = onnx_paths(path)
    for names, file in paths.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter's notice
            torch.onnx.export(
                _Outputs(model, names),
                (dummy,),
                os.fspath(file),
                dynamo=False,
                input_names=["images"],
                output_names=list(names),
                dynamic_axes={"images": {0: "batch"}, **{n: {0: "batch"} for n in names}},
                opset_version=OPSET_VERSION,
            )
    return paths
