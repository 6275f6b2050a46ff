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
from dataclasses import dataclass
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


@dataclass(frozen=True)
class Margin:
    """The margin of eq. 3 / eq. 6 and what it does to logits, in one place: built once from the flow's
    `loss.*` (`flows.config.LossConfig.margin()`) and handed to a head, which keeps no margin settings of its
    own. A new margin parameter is a field here, its formula below, and its key in `LossConfig` and the search
    space. The defaults are no margin at all (m1 = 1, m2 = m3 = 0: a normalised softmax), not any method's
    values; the scale S has none."""

    scale: float
    m1: float = 1.0
    m2: float = 0.0
    m3: float = 0.0
    form: str = "outside"
    focal_gamma: float = 0.0

    def __post_init__(self) -> None:
        """Refuses the first out-of-range setting as `<field>: <what is wrong>` (the config prefixes `loss.`)."""
        checks = (
            (self.scale > 0, "scale", f"must be > 0, got {self.scale}"),
            (self.m1 > 0, "m1", f"must be > 0, got {self.m1}"),
            (0 <= self.m2 < math.pi / 2, "m2", f"must be in [0, pi/2), got {self.m2}"),
            (0 <= self.m3 < 1, "m3", f"must be in [0, 1), got {self.m3}"),
            (self.form in MARGIN_FORMS, "form", f"must be 'outside' or 'angular', got {self.form!r}"),
            (self.focal_gamma >= 0, "focal_gamma", f"must be >= 0, got {self.focal_gamma}"),
        )
        for ok, name, problem in checks:
            if not ok:
                raise ValueError(f"{name}: {problem}")

    @property
    def theta_threshold(self) -> float:
        """The angle past which the target's cosine argument would pass pi (the monotonic fallback's start)."""
        return math.pi - self.m2 if self.form == "outside" else (math.pi - self.m2) / self.m1

    def target(self, cos_y: torch.Tensor) -> torch.Tensor:
        """target(theta_y) for the true-class cosines `cos_y` (any shape), with the monotonic fallback."""
        m1, m2, m3 = self.m1, self.m2, self.m3
        cos_y = cos_y.clamp(-1 + COS_CLAMP_EPS, 1 - COS_CLAMP_EPS)
        theta, theta_th = torch.acos(cos_y), self.theta_threshold
        if self.form == "outside":
            margined = m1 * torch.cos(theta + m2) - m3
            fallback = m1 * (cos_y - math.cos(theta_th) - 1) - m3
        else:
            margined = torch.cos(m1 * theta + m2) - m3
            fallback = cos_y - math.cos(theta_th) - 1 - m3
        if theta_th >= math.pi:  # the argument never passes pi on [0, pi]
            return margined
        return torch.where(theta > theta_th, fallback, margined)

    def logits(self, cos: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
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
        target = torch.where(has_target.unsqueeze(1), self.target(cos_y), cos_y)
        return work.scatter(1, index, target)

    def scaled(self, logits: torch.Tensor, quality: torch.Tensor | None) -> torch.Tensor:
        """s_i * S * logits (eq. 6); S * logits without a quality (eq. 3)."""
        if quality is not None and quality.numel() != logits.shape[0]:
            raise ValueError(
                f"quality must have one value per sample (B={logits.shape[0]}), got shape {tuple(quality.shape)}"
            )
        factor = self.scale if quality is None else self.scale * quality.to(logits.dtype).reshape(-1, 1)
        return logits * factor

    def focal(self, per_sample: torch.Tensor) -> torch.Tensor:
        """Per-sample CE weighted by (1 - p_true)^gamma (unchanged at gamma 0)."""
        if self.focal_gamma > 0:
            return (1 - torch.exp(-per_sample)).pow(self.focal_gamma) * per_sample
        return per_sample

    def cross_entropy(self, logits: torch.Tensor, labels: torch.Tensor, quality: torch.Tensor | None) -> torch.Tensor:
        """Mean CE of the scaled `logits` (from `self.logits`), focal-weighted."""
        per_sample = F.cross_entropy(self.scaled(logits, quality), labels, reduction="none")
        return self.focal(per_sample).mean()


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


class MarginHead(nn.Module):
    """Class centres + the CE of `margin`. forward(emb, labels, quality=None) -> MarginOutput.

    What a training loop needs beyond forward, the same for this head and the sharded one
    (models.partial_fc.ShardedMarginHead): `class_range`, `saved_by(rank)`, `rank_local_parameters()`,
    `top1_hits(cos, labels)`.
    """

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        margin: Margin,
    ) -> None:
        super().__init__()
        if num_classes < 1 or embedding_size < 1:
            raise ValueError(
                f"num_classes and embedding_size must be >= 1, got {num_classes}, {embedding_size}"
            )
        self.num_classes, self.embedding_size = num_classes, embedding_size
        self.margin = margin
        self.weight = nn.Parameter(torch.normal(0, 0.01, (num_classes, embedding_size)))

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, embedding_size={self.embedding_size}, margin={self.margin}"

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
            loss = self.margin.cross_entropy(self.margin.logits(cos, labels), labels, quality)
        return MarginOutput(loss, cos.detach())
