"""Step semantics, without Ray: what each of the three steps may and may not change."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from flows.config import load_config
from flows.step_model import StepModel, build_net_and_head
from flows.train_step import learning_rate, quality_summary

NUM_CLASSES = 6


def _cfg():
    return load_config([], ["data.image_size=32", "model.width_mult=0.25", "model.embedding_size=16",
                            "model.quality_hidden=8"])


def _batch(n: int = 12, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 32, 32, generator=g) * 2 - 1, torch.arange(n) % NUM_CLASSES


def _train(model: StepModel, steps: int = 3) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    model.train()
    for i in range(steps):
        images, labels = _batch(seed=i)
        loss, _, _ = model(images, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_step1_trains_backbone_and_head_not_quality():
    torch.manual_seed(0)
    net, head = build_net_and_head(_cfg(), NUM_CLASSES)
    before = {"backbone": _state(net.backbone), "quality": _state(net.quality), "head": _state(head)}
    model = StepModel(1, net, head)
    _, _, quality = model(*_batch())
    assert quality is None  # eq. 3: s_i = 1
    _train(model)
    assert not _same(before["backbone"], _state(net.backbone))
    assert not _same(before["head"], _state(head))
    assert _same(before["quality"], _state(net.quality))


@pytest.mark.parametrize("train_centres", [False, True])
def test_step2_moves_only_the_quality_branch(train_centres):
    torch.manual_seed(0)
    net, head = build_net_and_head(_cfg(), NUM_CLASSES)
    backbone0, head0, quality0 = _state(net.backbone), _state(head), _state(net.quality)
    model = StepModel(2, net, head, train_centres=train_centres)
    _train(model, steps=4)
    # Bit-identical backbone: parameters *and* BatchNorm running statistics (it stays in eval mode).
    assert _same(backbone0, _state(net.backbone))
    assert not net.backbone.training
    assert not _same(quality0, _state(net.quality))
    assert _same(head0, _state(head)) != train_centres
    assert all(p.grad is None for p in net.backbone.parameters())


def test_step3_teacher_gives_weights_and_gets_no_gradient():
    torch.manual_seed(0)
    net, head = build_net_and_head(_cfg(), NUM_CLASSES)
    teacher = copy.deepcopy(net).eval()
    teacher0 = _state(teacher)
    model = StepModel(3, net, head, teacher=teacher)
    images, labels = _batch()
    _, _, quality = model(images, labels)
    with torch.no_grad():
        _, expected = teacher(images)
    torch.testing.assert_close(quality, expected)  # the s_i of eq. 6 are the teacher's
    assert not quality.requires_grad
    _train(model)
    assert _same(teacher0, _state(teacher))
    assert all(p.grad is None for p in teacher.parameters())
    assert not teacher.training
    with pytest.raises(ValueError, match="teacher"):
        StepModel(3, net, head, teacher=None)


def test_eq6_loss_matches_a_hand_computed_example():
    """Loss of the step model's head = CE over s_i*S*(m1*cos(theta_y+m2)-m3) and s_i*S*cos(theta_j)."""
    from models import Margin, MarginHead

    head = MarginHead(3, 2, Margin(scale=10.0, m1=0.9, m2=0.3, m3=0.1))
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]))
    angle = 0.4  # feature at 0.4 rad from class 0's centre
    x = torch.tensor([[math.cos(angle), math.sin(angle)]]) * 3.0  # norm must not matter
    s = 0.7
    out = head(x, torch.tensor([0]), torch.tensor([s]))
    target = s * 10.0 * (0.9 * math.cos(angle + 0.3) - 0.1)
    others = [s * 10.0 * math.cos(math.pi / 2 - angle), s * 10.0 * math.cos(math.pi - angle)]
    expected = -target + math.log(math.exp(target) + sum(math.exp(o) for o in others))
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)


def test_learning_rate_warms_up_then_decays_to_zero():
    lrs = [learning_rate(0.1, s, total_steps=100, warmup_steps=10) for s in range(101)]
    assert lrs[0] == pytest.approx(0.01) and lrs[9] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))
    assert lrs[100] == pytest.approx(0.0, abs=1e-12)


def test_quality_summary_percentiles():
    values = torch.linspace(0, 1, 101).numpy()
    summary = quality_summary(values)
    assert summary["quality_p05"] == pytest.approx(0.05)
    assert summary["quality_p50"] == pytest.approx(0.5)
    assert summary["quality_p95"] == pytest.approx(0.95)
    assert summary["quality_mean"] == pytest.approx(0.5)
    assert quality_summary(values[:0]) == {}


# -- precision: autocast, loss scaling, memory layout ----------------------------------------------


def test_scaling_builds_autocast_and_a_grad_scaler_for_fp16_only():
    cpu = torch.device("cpu")
    for amp, dtype, scaled in (("none", None, False), ("bf16", torch.bfloat16, False), ("fp16", torch.float16, True)):
        scaling = load_config([], [f"scaling.amp={amp}"]).scaling
        autocast = scaling.autocast(cpu)
        assert (autocast._enabled, autocast.fast_dtype if dtype else None) == (dtype is not None, dtype), amp
        assert scaling.grad_scaler(cpu).is_enabled() is scaled, amp


def test_fp16_with_grad_scaler_trains_and_skips_overflowing_steps():
    """The scaler skips exactly the steps whose scaled gradients overflow (the weights stay) and lowers its
    scale then, which is how the worker counts amp_skipped_steps; once the scale fits, steps train.
    Its first scale (2**16) overflows the gradients of this untrained net."""
    torch.manual_seed(0)
    cfg = load_config([], ["scaling.amp=fp16"])
    model = StepModel(1, *build_net_and_head(_cfg(), NUM_CLASSES))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    device = torch.device("cpu")
    scaler = cfg.scaling.grad_scaler(device)
    dropped, changed = [], []
    for i in range(10):
        before = [p.detach().clone() for p in model.net.backbone.parameters()]
        images, labels = _batch(n=6, seed=i)
        with cfg.scaling.autocast(device):
            loss, _, _ = model(images, labels)
        assert torch.isfinite(loss)
        scale = scaler.get_scale() if i else 2.0**16
        opt.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        dropped.append(scaler.get_scale() < scale)
        changed.append(any(not torch.equal(a, b) for a, b in zip(before, model.net.backbone.parameters(), strict=True)))
        if changed[-1]:
            break
    assert dropped[0], "2**16 overflows"
    assert [not c for c in changed] == dropped, "a step is skipped exactly when the scale drops"
    assert changed[-1] and scaler.get_scale() > 0


def test_step_model_feeds_nhwc_batches_to_nhwc_weights():
    model = StepModel(1, *build_net_and_head(_cfg(), NUM_CLASSES))
    first_conv = next(m for m in model.net.backbone.modules() if isinstance(m, torch.nn.Conv2d))
    assert first_conv.weight.is_contiguous(memory_format=torch.channels_last)
    seen = []
    first_conv.register_forward_pre_hook(lambda _, args: seen.append(
        args[0].is_contiguous(memory_format=torch.channels_last)))
    images, labels = _batch()
    loss, _, _ = model(images, labels)
    assert seen == [True] and torch.isfinite(loss)
