"""The flow's final model as an MLflow pyfunc: a float32 batch in, named "embedding" and "quality" out.

    model = mlflow.pyfunc.load_model("models:/eqface@candidate")
    out = model.predict(images)   # float32 (B, 3, S, S), RGB, (pixel - 127.5) / 127.5
    out["embedding"]              # (B, E) float32: normalise(f(x) + f(hflip(x))), as flows.score and evaluation
    out["quality"]                # (B,) float32 in [0, 1], from the unflipped image

It lives in `models/` because that package travels with the MLflow model (code_paths; the model's code
is models/mlflow_model.py): the model loads without this repository. The network itself is the artifact
"net" (net.pt, models.save_eqface_net, loaded with weights_only=True).
"""

from __future__ import annotations

import mlflow.pyfunc
import numpy as np
import torch
import torch.nn.functional as F

from models.eqface_net import load_eqface_net

NET_ARTIFACT = "net"


@torch.no_grad()
def embed_and_score(net: torch.nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(L2-normalised flip-sum embedding, quality) of float images (B, 3, H, W) in [-1, 1]."""
    embedding, quality = net(images)
    flipped, _ = net(torch.flip(images, dims=[-1]))
    return F.normalize((embedding + flipped).float(), dim=1, eps=1e-12), quality.float().reshape(-1)


class EQFacePyfunc(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper of an EQFaceNet saved as the model's artifact "net"."""

    def load_context(self, context) -> None:
        self.net = load_eqface_net(context.artifacts[NET_ARTIFACT]).eval()

    def predict(self, context, model_input: np.ndarray, params=None) -> dict[str, np.ndarray]:
        images = np.asarray(model_input, dtype=np.float32)
        size = self.net.arch["input_size"]
        if images.ndim != 4 or images.shape[1:] != (3, size, size):
            raise ValueError(f"expected a float32 batch of shape (B, 3, {size}, {size}), got {images.shape}")
        embedding, quality = embed_and_score(self.net, torch.from_numpy(np.ascontiguousarray(images)))
        return {"embedding": embedding.numpy(), "quality": quality.numpy()}
