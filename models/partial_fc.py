"""Class centres sharded over torch.distributed ranks (insightface "partial FC"), with EQFace quality.

    head = ShardedMarginHead(num_classes, 512, Margin(scale=64.0, m2=0.5), sample_rate=1.0)
    loss, cos = head(embeddings, labels, quality)     # same call as MarginHead

Each rank holds the contiguous class range [head.class_start, head.class_end) (sizes differ by at
most one). A forward all-gathers the embeddings, qualities s_i and labels of every rank (autograd
flows back to each rank's own embeddings and qualities), computes cos against the local centres,
applies the combined margin to true classes that live on this rank, scales by s_i * S, and takes a
softmax cross-entropy whose max and denominator are all-reduced over ranks. The loss is the mean
over the whole gathered batch, identical on every rank, and equal to MarginHead on the
concatenated batch (with sample_rate=1).

sample_rate r < 1: each step keeps int(r * local classes) centres per rank, always including the
classes present in the gathered batch (the rest chosen at random), as insightface partial FC v2.
Only the kept rows get gradients. `head.last_class_ids` holds the global class ids of the columns
of the returned `cos` (B_total, kept local classes); batches may differ in size between ranks.

Gradients and DDP: the centres must NOT be wrapped in DistributedDataParallel (each rank owns
different rows); their gradients are exact. The backbone usually is DDP-wrapped, and DDP averages
its gradient over ranks; with backbone_in_ddp=True (default) the gradient returned to each rank's
embeddings and qualities is multiplied by world_size to cancel that average, so the backbone gets
exactly the gradient of the global mean loss. backbone_in_ddp=False returns the plain gradient
d(loss)/d(local embeddings), equal to MarginHead's on the concatenated batch. Every rank must call
forward and backward the same number of times (they are collectives), and pass quality on all
ranks or on none.

Checkpoints that survive a change of world size:
    save_sharded_centres(head, directory)   # each rank writes centres_<start>_<end>.pt
    load_sharded_centres(head, directory)   # any rank/world (or a plain MarginHead) takes its rows
    assemble_centres(directory)             # -> (num_classes, E) tensor
Both save and load accept a MarginHead (one shard covering every class), so 2 -> 1 and 1 -> 2
workers both work. Optimizer state (momentum) of the centres is not resharded.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from models.margin import Margin, MarginHead, MarginOutput, cosine_to_centres, normalize_rows
from models.safe_load import UnsafeFileError, load_weights

SHARD_FILE = re.compile(r"^centres_(\d+)_(\d+)\.pt$")


def shard_range(num_classes: int, rank: int, world_size: int) -> tuple[int, int]:
    """Contiguous [start, end) of the classes owned by `rank` (the first num_classes % world get one more)."""
    base, extra = divmod(num_classes, world_size)
    start = base * rank + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def _distributed(group: dist.ProcessGroup | None) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def _all_gather_rows(x: torch.Tensor, sizes: list[int], group: dist.ProcessGroup | None) -> torch.Tensor:
    """Concatenate every rank's `x` (rows may differ in number: padded to the largest for the collective)."""
    padded = x.new_zeros((max(sizes), *x.shape[1:]))
    padded[: x.shape[0]] = x
    buffers = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(buffers, padded, group=group)
    return torch.cat([buffer[:n] for buffer, n in zip(buffers, sizes, strict=True)])


class _GatherWithGrad(torch.autograd.Function):
    """all-gather rows; backward sums the gathered gradient over ranks and returns this rank's rows."""

    @staticmethod
    def forward(ctx, x, sizes, rank, group, grad_scale):  # type: ignore[override]
        ctx.sizes, ctx.rank, ctx.group, ctx.grad_scale = sizes, rank, group, grad_scale
        return _all_gather_rows(x.contiguous(), sizes, group)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        start = sum(ctx.sizes[: ctx.rank])
        own = grad[start : start + ctx.sizes[ctx.rank]]
        return own * ctx.grad_scale if ctx.grad_scale != 1 else own, None, None, None, None


class _ShardedCrossEntropy(torch.autograd.Function):
    """Per-sample softmax CE over logits split column-wise across ranks.

    logits (N, n_local) of this rank's classes; local_labels (N,) column of the true class on this
    rank, or -1 when it lives elsewhere. Returns (N,) losses, identical on every rank.
    """

    @staticmethod
    def forward(ctx, logits, local_labels, group):  # type: ignore[override]
        distributed = _distributed(group)
        if logits.shape[1]:
            row_max = logits.max(dim=1).values
        else:  # sampling kept no centre here: contribute nothing to the max and the sum
            row_max = logits.new_full(logits.shape[:1], -torch.inf)
        if distributed:
            dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
        probs = (logits - row_max[:, None]).exp_()
        denominator = probs.sum(dim=1)
        has_target = local_labels >= 0
        rows = has_target.nonzero().squeeze(1)
        target = logits.new_zeros(logits.shape[0])
        target[rows] = logits[rows, local_labels[rows]] - row_max[rows]
        if distributed:
            dist.all_reduce(denominator, op=dist.ReduceOp.SUM, group=group)
            dist.all_reduce(target, op=dist.ReduceOp.SUM, group=group)
        probs.div_(denominator[:, None])
        ctx.save_for_backward(probs, local_labels)
        return denominator.log() - target

    @staticmethod
    def backward(ctx, grad_loss):  # type: ignore[override]
        probs, local_labels = ctx.saved_tensors
        rows = (local_labels >= 0).nonzero().squeeze(1)
        grad = probs.clone()
        grad[rows, local_labels[rows]] -= 1
        return grad.mul_(grad_loss[:, None]), None, None


class ShardedMarginHead(nn.Module):
    """MarginHead whose centres are split over ranks; see the module docstring."""

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        margin: Margin,
        *,
        sample_rate: float = 1.0,
        backbone_in_ddp: bool = True,
        group: dist.ProcessGroup | None = None,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        super().__init__()
        if not 0 < sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1], got sample_rate={sample_rate}")
        initialized = dist.is_available() and dist.is_initialized()
        self.rank = rank if rank is not None else (dist.get_rank(group) if initialized else 0)
        self.world_size = (
            world_size if world_size is not None else (dist.get_world_size(group) if initialized else 1)
        )
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank must be in [0, world_size={self.world_size}), got rank={self.rank}")
        if num_classes < self.world_size:
            raise ValueError(f"num_classes={num_classes} must be >= world_size={self.world_size}")
        self.num_classes, self.embedding_size = num_classes, embedding_size
        self.margin, self.sample_rate = margin, sample_rate
        self.backbone_in_ddp, self.group = backbone_in_ddp, group
        self.class_start, self.class_end = shard_range(num_classes, self.rank, self.world_size)
        self.num_local = self.class_end - self.class_start
        self.weight = nn.Parameter(torch.normal(0, 0.01, (self.num_local, embedding_size)))
        self.last_class_ids: torch.Tensor | None = None

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, local=[{self.class_start}, {self.class_end}), "
            f"embedding_size={self.embedding_size}, margin={self.margin}, sample_rate={self.sample_rate}, "
            f"rank={self.rank}/{self.world_size}"
        )

    @property
    def class_range(self) -> tuple[int, int]:
        """[start, end) of the classes whose centres this rank holds."""
        return self.class_start, self.class_end

    def saved_by(self, rank: int) -> bool:
        """Every rank writes its own shard of the centres into a checkpoint."""
        return True

    def rank_local_parameters(self) -> list[str]:
        """Each rank owns different centres: DDP must neither broadcast nor average them."""
        return [name for name, _ in self.named_parameters()]

    def top1_hits(self, cos: torch.Tensor, labels: torch.Tensor) -> int:
        """Top-1 hits among this rank's samples. `cos` (from the last forward) covers the gathered batch but only
        this rank's (sampled) centres, so the best class is found across ranks first."""
        values, columns = cos.max(dim=1)
        ids = self.last_class_ids[columns]
        if self.world_size > 1:
            all_values = [torch.empty_like(values) for _ in range(self.world_size)]
            all_ids = [torch.empty_like(ids) for _ in range(self.world_size)]
            dist.all_gather(all_values, values, group=self.group)
            dist.all_gather(all_ids, ids, group=self.group)
            best = torch.stack(all_values).argmax(dim=0, keepdim=True)
            ids = torch.stack(all_ids).gather(0, best)[0]
            n = labels.numel()  # equal per rank: batches are dropped to full size
            ids = ids[self.rank * n:(self.rank + 1) * n]
        return int((ids == labels).sum())

    def _sample_centres(self, local_labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Columns to keep this step (None = all) and the labels remapped to those columns."""
        num_sample = max(1, int(self.sample_rate * self.num_local))
        if self.sample_rate >= 1 or not self.training or num_sample >= self.num_local:
            return local_labels, None
        has_target = local_labels >= 0
        positive = torch.unique(local_labels[has_target])
        if positive.numel() >= num_sample:
            keep = positive
        else:
            score = torch.rand(self.num_local, device=local_labels.device)
            score[positive] = 2.0  # positives always win the top-k
            keep = torch.topk(score, k=num_sample).indices.sort().values
        remapped = local_labels.clone()
        remapped[has_target] = torch.searchsorted(keep, local_labels[has_target])
        return remapped, keep

    def forward(
        self, embeddings: torch.Tensor, labels: torch.Tensor, quality: torch.Tensor | None = None
    ) -> MarginOutput:
        if embeddings.shape[0] != labels.shape[0] or (
            quality is not None and quality.numel() != labels.shape[0]
        ):
            raise ValueError(
                f"embeddings {tuple(embeddings.shape)}, labels {tuple(labels.shape)} and quality "
                f"{None if quality is None else tuple(quality.shape)} must share the batch size"
            )
        if self.world_size > 1 and not _distributed(self.group):
            raise RuntimeError(
                f"ShardedMarginHead built for world_size={self.world_size}, "
                "but torch.distributed is not initialised"
            )
        dtype = torch.float64 if embeddings.dtype == torch.float64 else torch.float32
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            embeddings = embeddings.to(dtype)
            quality = None if quality is None else quality.to(dtype).reshape(-1)
            labels = labels.long()
            if _distributed(self.group):
                count = torch.tensor([labels.shape[0]], device=labels.device)
                counts = [torch.empty_like(count) for _ in range(self.world_size)]
                dist.all_gather(counts, count, group=self.group)
                sizes = [int(c) for c in counts]
                grad_scale = float(self.world_size) if self.backbone_in_ddp else 1.0
                embeddings = _GatherWithGrad.apply(embeddings, sizes, self.rank, self.group, grad_scale)
                if quality is not None:
                    quality = _GatherWithGrad.apply(quality, sizes, self.rank, self.group, grad_scale)
                labels = _all_gather_rows(labels, sizes, self.group)
            if labels.numel():
                low, high = int(labels.min()), int(labels.max())
                if low < 0 or high >= self.num_classes:
                    raise ValueError(f"labels must be in [0, {self.num_classes}), got min={low} max={high}")
            in_shard = (labels >= self.class_start) & (labels < self.class_end)
            local_labels = torch.where(in_shard, labels - self.class_start, torch.full_like(labels, -1))
            local_labels, keep = self._sample_centres(local_labels)
            weight = self.weight if keep is None else self.weight[keep]
            cos = cosine_to_centres(normalize_rows(embeddings), weight.to(dtype))
            logits = self.margin.scaled(self.margin.logits(cos, local_labels), quality)
            loss = self.margin.focal(_ShardedCrossEntropy.apply(logits, local_labels, self.group)).mean()
        ids = torch.arange(self.class_start, self.class_end, device=labels.device)
        self.last_class_ids = ids if keep is None else ids[keep]
        return MarginOutput(loss, cos.detach())


def save_sharded_centres(head: MarginHead | ShardedMarginHead, directory: str | os.PathLike) -> Path:
    """Write this head's centres as `directory/centres_<start>_<end>.pt`; call on every rank."""
    start, end = head.class_range
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"centres_{start:09d}_{end:09d}.pt"
    payload = {
        "num_classes": head.num_classes,
        "embedding_size": head.embedding_size,
        "class_start": start,
        "class_end": end,
        "weight": head.weight.detach().cpu().contiguous(),
    }
    torch.save(payload, path)
    return path


def _shard_files(directory: Path) -> list[tuple[int, int, Path]]:
    shards = []
    for path in sorted(directory.glob("centres_*.pt")):
        match = SHARD_FILE.match(path.name)
        if match:
            shards.append((int(match.group(1)), int(match.group(2)), path))
    if not shards:
        raise FileNotFoundError(f"{directory}: no centres_<start>_<end>.pt shard files")
    return shards


def _read_shard(path: Path, start: int, end: int) -> dict:
    try:
        payload = load_weights(path, mmap=True)
    except UnsafeFileError:
        raise
    except Exception as exc:
        raise ValueError(f"{path}: not a readable centre shard ({exc})") from exc
    weight = payload.get("weight") if isinstance(payload, dict) else None
    if weight is None or (payload.get("class_start"), payload.get("class_end")) != (start, end):
        raise ValueError(f"{path}: expected class range [{start}, {end}) and a 'weight' tensor")
    if weight.shape[0] != end - start:
        raise ValueError(f"{path}: weight has {weight.shape[0]} rows for class range [{start}, {end})")
    return payload


def _check_tiling(directory: Path, shards: list[tuple[int, int, Path]]) -> None:
    """The shard files must cover [0, num_classes) exactly once (stale files from another run would not)."""
    expected = 0
    for start, end, path in shards:
        if start != expected:
            raise ValueError(
                f"{directory}: shard files do not tile the classes: {path.name} starts at {start}, "
                f"expected {expected} (stale shards from another run?)"
            )
        expected = end


def load_sharded_centres(head: MarginHead | ShardedMarginHead, directory: str | os.PathLike) -> None:
    """Fill `head.weight` with its class rows from the shards in `directory`, whatever world wrote them."""
    directory = Path(directory)
    shards = _shard_files(directory)
    _check_tiling(directory, shards)
    want_start, want_end = head.class_range
    total = shards[-1][1]
    if total != head.num_classes:
        raise ValueError(f"{directory}: shards hold {total} classes, the head has {head.num_classes}")
    with torch.no_grad():
        for start, end, path in shards:
            low, high = max(start, want_start), min(end, want_end)
            if low >= high:
                continue  # no overlap: not even opened
            payload = _read_shard(path, start, end)
            if payload["weight"].shape[1] != head.embedding_size:
                raise ValueError(
                    f"{path}: embedding size {payload['weight'].shape[1]}, the head has {head.embedding_size}"
                )
            rows = payload["weight"][low - start : high - start]
            head.weight[low - want_start : high - want_start].copy_(rows)


def assemble_centres(directory: str | os.PathLike) -> torch.Tensor:
    """All class centres (num_classes, E) from the shard files in `directory`."""
    directory = Path(directory)
    shards = _shard_files(directory)
    _check_tiling(directory, shards)
    return torch.cat([_read_shard(path, start, end)["weight"] for start, end, path in shards])
