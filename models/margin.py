"""Combined-margin softmax loss with EQFace quality scaling (paper eq. 3 and eq. 6).

    logit_j = s_i * S * cos(theta_j)                        for j != y
    logit_y = s_i * S * target(theta_y)                     (s_i = 1 gives eq. 3)
    "outside" form (paper text): target = m1 * cos(theta + m2) - m3
    "angular" form (SphereFace):  target = cos(m1 * theta + m2) - m3

Monotonic fallback. Both targets stop decreasing once their cosine argument passes pi, i.e. past
    theta_th = pi - m2          ("outside")
    theta_th = (pi - m2) / m1   ("angular")
Beyond theta_th we continue linearly in cos(theta) from the value reached at theta_th:
    "outside": target = m1 * (cos(theta) - cos(theta_th) - 1) - m3
    "angular": target =       cos(theta) - cos(theta_th) - 1  - m3
which is continuous at theta_th and strictly decreasing on [0, pi] (the generalisation of
insightface's "easy margin off" rule, cos(theta) - m2*sin(m2), without its jump).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

MARGIN_FORMS = ("outside", "angular")
COS_CLAMP_EPS = 1e-7  # keeps acos finite and differentiable; representable next to 1 in float32
NORM_EPS = 1e-6  # zero-vector features normalise to 0 (cos = 0) with a finite gradient


class MarginOutput(NamedTuple):
    loss: torch.Tensor  # scalar, float32 (float64 for float64 inputs)
    cos: torch.Tensor  # (B, C) cos(theta_j) before any margin, detached


def margin_problems(
    scale: float, m1: float, m2: float, m3: float, form: str = "outside", focal_gamma: float = 0.0
) -> list[tuple[str, str]]:
    """(argument, what is wrong) for every out-of-range margin setting: the one rule that the heads and the
    flow's config (`loss.*`) both apply."""
    problems = []
    if not scale > 0:
        problems.append(("scale", f"must be > 0, got {scale}"))
    if not m1 > 0:
        problems.append(("m1", f"must be > 0, got {m1}"))
    if not 0 <= m2 < math.pi / 2:
        problems.append(("m2", f"must be in [0, pi/2), got {m2}"))
    if not 0 <= m3 < 1:
        problems.append(("m3", f"must be in [0, 1), got {m3}"))
    if form not in MARGIN_FORMS:
        problems.append(("form", f"must be 'outside' or 'angular', got {form!r}"))
    if not focal_gamma >= 0:
        problems.append(("focal_gamma", f"must be >= 0, got {focal_gamma}"))
    return problems


def check_margins(
    scale: float, m1: float, m2: float, m3: float, form: str = "outside", focal_gamma: float = 0.0
) -> None:
    problems = margin_problems(scale, m1, m2, m3, form, focal_gamma)
    if problems:
        name, problem = problems[0]
        raise ValueError(f"{name}: {problem}")


def margin_target(
    cos_y: torch.Tensor, m1: float, m2: float, m3: float, form: str = "outside"
) -> torch.Tensor:
    """target(theta_y) for the true-class cosines `cos_y` (any shape), with the monotonic fallback."""
    cos_y = cos_y.clamp(-1 + COS_CLAMP_EPS, 1 - COS_CLAMP_EPS)
    theta = torch.acos(cos_y)
    if form == "outside":
        theta_th = math.pi - m2
        margined = m1 * torch.cos(theta + m2) - m3
        fallback = m1 * (cos_y - math.cos(theta_th) - 1) - m3
    elif form == "angular":
        theta_th = (math.pi - m2) / m1
        margined = torch.cos(m1 * theta + m2) - m3
        fallback = cos_y - math.cos(theta_th) - 1 - m3
    else:
        raise ValueError(f"form must be one of {MARGIN_FORMS}, got form={form!r}")
    if theta_th >= math.pi:  # the argument never passes pi on [0, pi]
        return margined
    return torch.where(theta > theta_th, fallback, margined)


def normalize_rows(x: torch.Tensor) -> torch.Tensor:
    """L2-normalise rows for any norm: dividing by the (detached) row max first keeps the norm from
    overflowing (|x| > 1e19 in float32) or vanishing below NORM_EPS; it does not change the result
    or its gradient, since normalisation is scale invariant. An all-zero row stays zero."""
    row_max = x.detach().abs().amax(dim=1, keepdim=True)
    row_max = torch.where(row_max > 0, row_max, torch.ones_like(row_max))
    return F.normalize(x / row_max, dim=1, eps=NORM_EPS)


def cosine_to_centres(unit_embeddings: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """cos (B, C) between unit-norm embeddings and the class centres `weight` (C, E).

    Divides the (B, C) product by the centre norms instead of normalising the (C, E) centres: the
    same value and gradient, without a normalised copy of the centres (2 GB at 1M x 512 float32)
    kept for backward. Centre norms stay near their init (0.01 * sqrt(E)), so no overflow guard.
    """
    inverse_norm = torch.linalg.vector_norm(weight, dim=1).clamp_min(NORM_EPS).reciprocal()
    return F.linear(unit_embeddings, weight) * inverse_norm


def combined_margin_logits(
    cos: torch.Tensor, labels: torch.Tensor, m1: float, m2: float, m3: float, form: str = "outside"
) -> torch.Tensor:
    """Unscaled logits: cos with the true-class entry of each row replaced by target(theta_y).

    cos (B, C), labels (B,) int in [0, C); a label of -1 means "no true class in this row" (used by
    the sharded head) and leaves the row unchanged. Computed in float32 (float64 if cos is float64)
    so half/bfloat16 inputs do not lose the clamp. Other entries are cos unchanged (unclamped).
    """
    if cos.dim() != 2 or labels.shape != cos.shape[:1]:
        raise ValueError(
            f"expected cos (B, C) and labels (B,), got {tuple(cos.shape)} and {tuple(labels.shape)}"
        )
    if labels.numel():
        low, high = int(labels.min()), int(labels.max())
        if low < -1 or high >= cos.shape[1]:
            raise ValueError(f"labels must be in [0, {cos.shape[1]}) (or -1), got min={low} max={high}")
    work = cos if cos.dtype == torch.float64 else cos.float()
    has_target = labels >= 0
    index = labels.clamp(min=0).long().unsqueeze(1)
    cos_y = work.gather(1, index)
    target = margin_target(cos_y, m1, m2, m3, form)
    target = torch.where(has_target.unsqueeze(1), target, cos_y)
    return work.scatter(1, index, target)


def quality_scaled_cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    scale: float,
    quality: torch.Tensor | None,
    focal_gamma: float = 0.0,
) -> torch.Tensor:
    """Mean CE of quality[:, None] * scale * logits, optionally focal-weighted by (1-p)^gamma."""
    if quality is not None and quality.numel() != logits.shape[0]:
        raise ValueError(
            f"quality must have one value per sample (B={logits.shape[0]}), got shape {tuple(quality.shape)}"
        )
    factor = scale if quality is None else scale * quality.to(logits.dtype).reshape(-1, 1)
    per_sample = F.cross_entropy(logits * factor, labels, reduction="none")
    if focal_gamma > 0:
        p_true = torch.exp(-per_sample)
        per_sample = (1 - p_true).pow(focal_gamma) * per_sample
    return per_sample.mean()


class MarginHead(nn.Module):
    """Class centres + combined-margin CE. forward(emb, labels, quality=None) -> MarginOutput.

    What a training loop needs beyond forward, the same for this head and the sharded one
    (models.partial_fc.ShardedMarginHead): `class_range`, `saved_by(rank)`, `rank_local_parameters()`,
    `top1_hits(cos, labels)`.
    """

    def __init__(
        self,
        num_classes: int,
        embedding_size: int = 512,
        *,
        scale: float = 64.0,
        m1: float = 1.0,
        m2: float = 0.5,
        m3: float = 0.0,
        form: str = "outside",
        focal_gamma: float = 0.0,
    ) -> None:
        super().__init__()
        check_margins(scale, m1, m2, m3, form, focal_gamma)
        if num_classes < 1 or embedding_size < 1:
            raise ValueError(
                f"num_classes and embedding_size must be >= 1, got {num_classes}, {embedding_size}"
            )
        self.num_classes, self.embedding_size = num_classes, embedding_size
        self.scale, self.m1, self.m2, self.m3, self.form = scale, m1, m2, m3, form
        self.focal_gamma = focal_gamma
        self.weight = nn.Parameter(torch.normal(0, 0.01, (num_classes, embedding_size)))

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, embedding_size={self.embedding_size}, scale={self.scale}, "
            f"m1={self.m1}, m2={self.m2}, m3={self.m3}, form={self.form!r}, focal_gamma={self.focal_gamma}"
        )

    @property
    def class_range(self) -> tuple[int, int]:
        """[start, end) of the classes whose centres this process holds: all of them."""
        return 0, self.num_classes

    def saved_by(self, rank: int) -> bool:
        """Whether `rank` writes this head's centres into a checkpoint: every rank holds the same, so rank 0."""
        return rank == 0

    def rank_local_parameters(self) -> list[str]:
        """Parameters that differ between ranks (DDP must neither broadcast nor average them): none."""
        return []

    def top1_hits(self, cos: torch.Tensor, labels: torch.Tensor) -> int:
        """How many of the batch's samples have their own class as the nearest centre."""
        return int((cos.argmax(dim=1) == labels).sum())

    def forward(
        self, embeddings: torch.Tensor, labels: torch.Tensor, quality: torch.Tensor | None = None
    ) -> MarginOutput:
        # The whole head runs in float32 (float64 for float64 inputs), also under autocast: the
        # margin and the CE need the precision.
        dtype = torch.float64 if embeddings.dtype == torch.float64 else torch.float32
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            cos = cosine_to_centres(normalize_rows(embeddings.to(dtype)), self.weight.to(dtype))
            logits = combined_margin_logits(cos, labels, self.m1, self.m2, self.m3, self.form)
            loss = quality_scaled_cross_entropy(logits, labels, self.scale, quality, self.focal_gamma)
        return MarginOutput(loss, cos.detach())
