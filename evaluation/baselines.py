"""Baseline face-quality scores to compare a learned quality against.

random (seeded), feature norm of the unnormalised embedding, image sharpness (variance of the
Laplacian) and SER-FIQ (Terhörst et al., CVPR 2020): the robustness of the embedding under
random dropout subnetworks, for any model through a callable.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from evaluation.verification import as_numpy, check_embeddings, check_finite, l2_normalize

_LUMA = np.array([0.299, 0.587, 0.114])


# ----------------------------------------------------------------------------- image formats


def _images_numpy(images: Any) -> np.ndarray:
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu().numpy()
    arr = np.asarray(images)
    if arr.size == 0:
        raise ValueError("images: empty batch")
    return arr


def images_to_gray(images: Any) -> np.ndarray:
    """(N, H, W) float64 greyscale on a 0..255 scale.

    Accepts uint8 (N, H, W) or (N, H, W, C) with C in {1, 3}, or float (N, C, H, W) / (N, H, W)
    in [-1, 1] (the model's input range).
    """
    arr = _images_numpy(images)
    if arr.dtype == np.uint8:
        x = arr.astype(np.float64)
        if x.ndim == 4 and x.shape[-1] in (1, 3):
            x = x @ _LUMA if x.shape[-1] == 3 else x[..., 0]
        elif x.ndim != 3:
            raise ValueError(f"images: uint8 images must be (N, H, W) or (N, H, W, 1|3), got {arr.shape}")
        return x
    if not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"images: expected uint8 HWC or float CHW in [-1, 1], got dtype {arr.dtype}")
    x = (arr.astype(np.float64) + 1.0) * 127.5
    if x.ndim == 4 and x.shape[1] in (1, 3):
        x = np.einsum("nchw,c->nhw", x, _LUMA) if x.shape[1] == 3 else x[:, 0]
    elif x.ndim != 3:
        raise ValueError(
            f"images: float images must be (N, C, H, W) with C in {{1, 3}} or (N, H, W), got {arr.shape}"
        )
    check_finite(x.reshape(x.shape[0], -1), "images")
    return x


def as_uint8_hwc(images: Any) -> np.ndarray:
    """(N, H, W, 3) uint8 from the same inputs as `images_to_gray` (greyscale is repeated to 3 channels)."""
    arr = _images_numpy(images)
    if arr.dtype == np.uint8:
        x = arr
    elif np.issubdtype(arr.dtype, np.floating):
        if arr.ndim == 4 and arr.shape[1] in (1, 3):
            arr = arr.transpose(0, 2, 3, 1)
        elif arr.ndim != 3:
            raise ValueError(f"images: float images must be (N, C, H, W) or (N, H, W), got {arr.shape}")
        x = np.clip(np.round((arr.astype(np.float64) + 1.0) * 127.5), 0, 255).astype(np.uint8)
    else:
        raise ValueError(f"images: expected uint8 HWC or float CHW in [-1, 1], got dtype {arr.dtype}")
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise ValueError(f"images: expected (N, H, W, 1|3) after conversion, got {x.shape}")
    return np.repeat(x, 3, axis=-1) if x.shape[-1] == 1 else x


# ----------------------------------------------------------------------------- simple baselines


def random_quality(n: int, seed: int = 0) -> np.ndarray:
    """Uniform [0, 1) scores: the chance level any useful quality must beat."""
    return np.random.default_rng(seed).random(n)


def feature_norm_quality(emb: Any) -> np.ndarray:
    """L2 norm of the unnormalised embedding (a quality proxy under margin losses, cf. MagFace)."""
    return np.linalg.norm(check_embeddings(emb, "emb"), axis=1)


def laplacian_variance(images: Any) -> np.ndarray:
    """Sharpness per image: variance of the 4-neighbour Laplacian of the greyscale image (0..255 scale)."""
    g = images_to_gray(images)
    if g.shape[1] < 3 or g.shape[2] < 3:
        raise ValueError(f"images: need at least 3x3 pixels for a Laplacian, got {g.shape[1:]}")
    lap = g[:, :-2, 1:-1] + g[:, 2:, 1:-1] + g[:, 1:-1, :-2] + g[:, 1:-1, 2:] - 4.0 * g[:, 1:-1, 1:-1]
    return lap.reshape(lap.shape[0], -1).var(axis=1)


# ----------------------------------------------------------------------------- SER-FIQ


def serfiq_quality(
    stochastic_embed_fn: Callable[[Any], Any],
    images: Any,
    m: int = 10,
    batch_size: int | None = None,
    seed: int | None = 0,
) -> np.ndarray:
    """SER-FIQ: q = 2 * sigmoid(-mean pairwise euclidean distance of m normalised stochastic embeddings).

    `stochastic_embed_fn(images) -> embeddings (B, E)` (or (embeddings, ...)) must differ from call
    to call, e.g. a model with dropout active (see `stochastic_embed_fn_from_module`). The mean is
    over the m(m-1)/2 pairs, as in the authors' code. q is in (0, 1]; 1 means perfectly stable.
    `seed` seeds torch's RNG for these passes (restored afterwards) so they repeat.
    """
    if m < 2:
        raise ValueError(f"serfiq_quality: m={m}, needs at least 2 stochastic passes")
    n = len(images)
    if n == 0:
        raise ValueError("images: empty batch")
    step = batch_size or n
    i, j = np.triu_indices(m, k=1)
    out = []
    # fork_rng: seed the passes without changing the caller's global torch RNG state.
    with torch.random.fork_rng(enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        for start in range(0, n, step):
            batch = images[start : start + step]
            passes = []
            for _ in range(m):
                emb = stochastic_embed_fn(batch)
                emb = emb[0] if isinstance(emb, (tuple, list)) else emb
                passes.append(l2_normalize(check_embeddings(emb, "stochastic embedding")))
            x = np.stack(passes, axis=1)  # (B, m, E)
            mean_dist = np.linalg.norm(x[:, i] - x[:, j], axis=-1).mean(axis=1)
            out.append(2.0 / (1.0 + np.exp(mean_dist)))
    return np.concatenate(out)


def _dropout_layers(model: nn.Module) -> list[nn.Module]:
    return [mod for mod in model.modules() if isinstance(mod, nn.modules.dropout._DropoutNd)]


@contextmanager
def dropout_only_train_mode(model: nn.Module, p: float | None = None) -> Iterator[nn.Module]:
    """Model in eval mode except its Dropout layers (optionally with rate p); everything restored on exit.

    BatchNorm and other layers keep eval behaviour, so only the dropout subnetworks vary. Dropout
    done with `F.dropout(..., training=self.training)` inside a custom module is not reached.
    """
    dropouts = _dropout_layers(model)
    if not dropouts:
        raise ValueError(
            f"{type(model).__name__} has no nn.Dropout layer; SER-FIQ needs one on the embedding path"
        )
    modes = [(mod, mod.training) for mod in model.modules()]
    rates = [d.p for d in dropouts]
    model.eval()
    for d in dropouts:
        d.train()
        if p is not None:
            d.p = p
    try:
        yield model
    finally:
        for mod, was_training in modes:
            mod.training = was_training
        for d, rate in zip(dropouts, rates, strict=True):
            d.p = rate


def stochastic_embed_fn_from_module(model: nn.Module, p: float | None = None) -> Callable[[Any], np.ndarray]:
    """Callable for `serfiq_quality`: embeddings of `model` with only its Dropout layers active.

    The model's first output is taken as the embedding (EQFaceNet returns (embedding, quality)).
    Use p (e.g. 0.5 as in SER-FIQ) when the model's own dropout rate is 0.
    """
    if not _dropout_layers(model):  # fail now rather than at the first call
        raise ValueError(
            f"{type(model).__name__} has no nn.Dropout layer; SER-FIQ needs one on the embedding path"
        )

    def embed(images: Any) -> np.ndarray:
        param = next(model.parameters(), None)
        x = torch.as_tensor(
            as_numpy(images, "images", np.float32) if not isinstance(images, torch.Tensor) else images
        )
        if param is not None:
            x = x.to(device=param.device, dtype=param.dtype)
        with torch.no_grad(), dropout_only_train_mode(model, p):
            out = model(x)
        emb = out[0] if isinstance(out, (tuple, list)) else out
        return emb.detach().float().cpu().numpy()

    return embed


SERFIQ_PASSES = 10
SERFIQ_DROPOUT = 0.5  # the rate of the SER-FIQ paper, used when the model's own dropout is 0


def serfiq_scores(net: nn.Module, images: np.ndarray, batch_size: int = 64, progress: bool = False,
                  seed: int = 0) -> np.ndarray:
    """SER-FIQ quality of each image for a face model (`net(x)[0]` is the embedding): SERFIQ_PASSES dropout
    subnetworks, at the model's own dropout rate or SERFIQ_DROPOUT where that is 0."""
    rate = None if any(m.p > 0 for m in _dropout_layers(net)) else SERFIQ_DROPOUT
    embed_fn = stochastic_embed_fn_from_module(net, p=rate)
    return np.concatenate([
        serfiq_quality(embed_fn, torch.from_numpy(images[start:start + batch_size]), m=SERFIQ_PASSES,
                       seed=seed + start)
        for start in tqdm(range(0, len(images), batch_size), desc="SER-FIQ", unit="batch", disable=not progress)
    ])
