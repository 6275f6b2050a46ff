"""ShardedMarginHead over 2 gloo processes equals MarginHead; centre checkpoints reshard 2 <-> 1."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from models import (
    Margin,
    MarginHead,
    ShardedMarginHead,
    assemble_centres,
    load_sharded_centres,
    save_sharded_centres,
    shard_range,
)

NUM_CLASSES, EMBEDDING, MARGIN = 11, 6, Margin(scale=8.0, m1=0.9, m2=0.4, m3=0.1, focal_gamma=1.0)
RANK_ROWS = [(0, 5), (5, 8)]  # unequal per-rank batches: 5 and 3 rows


def global_inputs():
    generator = torch.Generator().manual_seed(0)
    embeddings = torch.randn(8, EMBEDDING, generator=generator, dtype=torch.float64)
    embeddings[2] = 0  # a zero-vector feature in the batch
    labels = torch.tensor([0, 10, 4, 4, 7, 5, 9, 2])  # classes on both shards, a repeated one
    quality = torch.rand(8, generator=generator, dtype=torch.float64) * 0.9 + 0.05
    centres = torch.randn(NUM_CLASSES, EMBEDDING, generator=generator, dtype=torch.float64)
    return embeddings, labels, quality, centres


def single_process_reference():
    embeddings, labels, quality, centres = global_inputs()
    head = MarginHead(NUM_CLASSES, EMBEDDING, MARGIN).double()
    head.weight.data.copy_(centres)
    embeddings.requires_grad_()
    quality.requires_grad_()
    loss = head(embeddings, labels, quality).loss
    loss.backward()
    return loss.detach(), embeddings.grad, head.weight.grad, quality.grad


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        embeddings, labels, quality, centres = global_inputs()
        lo, hi = RANK_ROWS[rank]
        results = {}
        for backbone_in_ddp in (False, True):
            head = ShardedMarginHead(NUM_CLASSES, EMBEDDING, MARGIN, backbone_in_ddp=backbone_in_ddp)
            head = head.double()
            head.weight.data.copy_(centres[head.class_start : head.class_end])
            own_embeddings = embeddings[lo:hi].clone().requires_grad_()
            own_quality = quality[lo:hi].clone().requires_grad_()
            loss = head(own_embeddings, labels[lo:hi], own_quality).loss
            loss.backward()
            results[backbone_in_ddp] = {
                "loss": loss.detach(),
                "embedding_grad": own_embeddings.grad,
                "quality_grad": own_quality.grad,
                "centre_grad": head.weight.grad,
                "class_range": (head.class_start, head.class_end),
            }
        # Under DDP, the backbone (here one Linear) gets the single-process gradient of the global loss.
        torch.manual_seed(0)
        backbone = torch.nn.Linear(EMBEDDING, EMBEDDING).double()
        ddp = torch.nn.parallel.DistributedDataParallel(backbone)
        head = ShardedMarginHead(NUM_CLASSES, EMBEDDING, MARGIN).double()
        head.weight.data.copy_(centres[head.class_start : head.class_end])
        head(ddp(embeddings[lo:hi]), labels[lo:hi], quality[lo:hi]).loss.backward()
        results["ddp_backbone_grad"] = backbone.weight.grad
        # Reshard 2 -> 1: each rank writes its shard; the parent reloads them into a MarginHead.
        save_sharded_centres(head, os.path.join(out_dir, "two_shards"))
        # Reshard 1 -> 2: the parent wrote a single shard; each rank takes its rows.
        reloaded = ShardedMarginHead(NUM_CLASSES, EMBEDDING, MARGIN).double()
        load_sharded_centres(reloaded, os.path.join(out_dir, "one_shard"))
        with torch.no_grad():
            results["reloaded_loss"] = reloaded(embeddings[lo:hi], labels[lo:hi], quality[lo:hi]).loss
        # Sampling r < 1 keeps every positive class of the gathered batch.
        sampled = ShardedMarginHead(NUM_CLASSES, EMBEDDING, MARGIN, sample_rate=0.3).double()
        out = sampled(embeddings[lo:hi].clone().requires_grad_(), labels[lo:hi], quality[lo:hi])
        out.loss.backward()
        results["sampled"] = {
            "loss": out.loss.detach(),
            "class_ids": sampled.last_class_ids,
            "cos_shape": tuple(out.cos.shape),
            "rows_with_grad": sampled.weight.grad.abs().sum(1).nonzero().squeeze(1) + sampled.class_start,
        }
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("partial_fc")
    _, _, _, centres = global_inputs()
    single = MarginHead(NUM_CLASSES, EMBEDDING, MARGIN).double()
    single.weight.data.copy_(centres)
    save_sharded_centres(single, out_dir / "one_shard")
    mp.spawn(worker, args=(2, free_port(), str(out_dir)), nprocs=2, join=True)
    return out_dir, [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(2)]


def test_sharded_loss_and_gradients_equal_single_process(two_rank_results):
    _, ranks = two_rank_results
    loss, embedding_grad, centre_grad, quality_grad = single_process_reference()
    assert [r[False]["class_range"] for r in ranks] == [(0, 6), (6, 11)]
    for rank, (lo, hi) in zip(ranks, RANK_ROWS, strict=True):
        plain, ddp = rank[False], rank[True]
        assert plain["loss"].item() == pytest.approx(loss.item(), abs=1e-5)
        assert torch.allclose(plain["embedding_grad"], embedding_grad[lo:hi], atol=1e-5)
        assert torch.allclose(plain["quality_grad"], quality_grad[lo:hi], atol=1e-5)
        start, end = plain["class_range"]
        assert torch.allclose(plain["centre_grad"], centre_grad[start:end], atol=1e-5)
        # backbone_in_ddp: embedding/quality gradients x world to cancel DDP's averaging; centres exact.
        assert ddp["loss"].item() == pytest.approx(loss.item(), abs=1e-5)
        assert torch.allclose(ddp["embedding_grad"], 2 * embedding_grad[lo:hi], atol=1e-5)
        assert torch.allclose(ddp["quality_grad"], 2 * quality_grad[lo:hi], atol=1e-5)
        assert torch.allclose(ddp["centre_grad"], centre_grad[start:end], atol=1e-5)


def test_ddp_backbone_gets_the_single_process_gradient(two_rank_results):
    _, ranks = two_rank_results
    embeddings, labels, quality, centres = global_inputs()
    torch.manual_seed(0)
    backbone = torch.nn.Linear(EMBEDDING, EMBEDDING).double()
    head = MarginHead(NUM_CLASSES, EMBEDDING, MARGIN).double()
    head.weight.data.copy_(centres)
    head(backbone(embeddings), labels, quality).loss.backward()
    for rank in ranks:
        assert torch.allclose(rank["ddp_backbone_grad"], backbone.weight.grad, atol=1e-5)


def test_resharding_two_to_one_and_one_to_two_reproduces_the_loss(two_rank_results):
    out_dir, ranks = two_rank_results
    embeddings, labels, quality, centres = global_inputs()
    loss, *_ = single_process_reference()
    assert sorted(p.name for p in (out_dir / "two_shards").iterdir()) == [
        "centres_000000000_000000006.pt",
        "centres_000000006_000000011.pt",
    ]
    merged = MarginHead(NUM_CLASSES, EMBEDDING, MARGIN).double()
    load_sharded_centres(merged, out_dir / "two_shards")
    assert torch.equal(merged.weight.detach(), centres)
    assert torch.equal(assemble_centres(out_dir / "two_shards"), centres)
    assert merged(embeddings, labels, quality).loss.item() == pytest.approx(loss.item(), abs=1e-5)
    for rank in ranks:
        assert rank["reloaded_loss"].item() == pytest.approx(loss.item(), abs=1e-5)


def test_sampling_keeps_positive_classes(two_rank_results):
    _, ranks = two_rank_results
    _, labels, _, _ = global_inputs()
    kept = torch.cat([rank["sampled"]["class_ids"] for rank in ranks])
    assert set(labels.tolist()) <= set(kept.tolist())
    for rank in ranks:
        sampled = rank["sampled"]
        assert torch.isfinite(sampled["loss"])
        assert sampled["cos_shape"] == (8, len(sampled["class_ids"]))
        assert set(sampled["rows_with_grad"].tolist()) <= set(sampled["class_ids"].tolist())
    assert ranks[0]["sampled"]["loss"].item() == pytest.approx(ranks[1]["sampled"]["loss"].item())


def test_world_of_one_equals_margin_head_and_sampling_keeps_positives():
    embeddings, labels, quality, centres = global_inputs()
    single = MarginHead(NUM_CLASSES, EMBEDDING, MARGIN).double()
    sharded = ShardedMarginHead(NUM_CLASSES, EMBEDDING, MARGIN).double()
    single.weight.data.copy_(centres)
    sharded.weight.data.copy_(centres)
    assert sharded(embeddings, labels, quality).loss.item() == pytest.approx(
        single(embeddings, labels, quality).loss.item(), rel=1e-12
    )
    torch.manual_seed(1)
    big = ShardedMarginHead(1000, EMBEDDING, MARGIN, sample_rate=0.1)
    batch_labels = torch.tensor([0, 999, 500, 500, 17])
    out = big(embeddings[:5].float(), batch_labels)
    assert big.last_class_ids.numel() == 100 and out.cos.shape == (5, 100)
    assert set(batch_labels.tolist()) <= set(big.last_class_ids.tolist())
    big.eval()  # no sampling at evaluation time
    assert big(embeddings[:5].float(), batch_labels).cos.shape == (5, 1000)


def test_shard_ranges_tile_the_classes_and_bad_arguments_raise(tmp_path):
    ranges = [shard_range(10, r, 3) for r in range(3)]
    assert ranges == [(0, 4), (4, 7), (7, 10)]
    with pytest.raises(ValueError, match="sample_rate"):
        ShardedMarginHead(10, 4, MARGIN, sample_rate=0.0)
    with pytest.raises(ValueError, match="num_classes"):
        ShardedMarginHead(2, 4, MARGIN, rank=0, world_size=3)
    with pytest.raises(RuntimeError, match="not initialised"):
        ShardedMarginHead(10, 4, MARGIN, rank=0, world_size=2)(torch.randn(2, 4), torch.tensor([0, 1]))
    with pytest.raises(FileNotFoundError, match="no centres"):
        load_sharded_centres(MarginHead(10, 4, MARGIN), tmp_path)
    save_sharded_centres(ShardedMarginHead(10, 4, MARGIN, rank=0, world_size=2), tmp_path)
    with pytest.raises(ValueError, match="hold 5 classes"):
        load_sharded_centres(MarginHead(10, 4, MARGIN), tmp_path)
    save_sharded_centres(ShardedMarginHead(10, 4, MARGIN, rank=1, world_size=3), tmp_path)  # stale, overlapping
    with pytest.raises(ValueError, match="do not tile"):
        assemble_centres(tmp_path)
