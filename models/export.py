"""ONNX export of an EQFaceNet: input "images" (B,3,S,S) in [-1,1] -> "embedding" (B,E), "quality" (B,).

Uses the TorchScript-based exporter (dynamo=False): the dynamo exporter needs the onnxscript
package, which this environment does not have. The batch axis is dynamic; the image size is fixed
(the flattened FC depends on it).
"""

from __future__ import annotations

import copy
import os
import warnings

import torch

from models.eqface_net import EQFaceNet

OPSET_VERSION = 17


def export_onnx(net: EQFaceNet, path: str | os.PathLike, input_size: int) -> None:
    """Write `net` (in eval mode, on CPU, float32) to an ONNX file at `path`."""
    expected = getattr(net, "arch", {}).get("input_size")
    if expected is not None and expected != input_size:
        raise ValueError(f"input_size={input_size} but the net was built for input_size={expected}")
    # Export a CPU float32 eval-mode copy so the caller's net keeps its mode and device.
    model = copy.deepcopy(net).float().cpu().eval()
    dummy = torch.zeros(2, 3, input_size, input_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter's notice
        torch.onnx.export(
            model,
            (dummy,),
            os.fspath(path),
            dynamo=False,
            input_names=["images"],
            output_names=["embedding", "quality"],
            dynamic_axes={"images": {0: "batch"}, "embedding": {0: "batch"}, "quality": {0: "batch"}},
            opset_version=OPSET_VERSION,
        )
