"""Margin (the combined-margin logits) and MarginHead: hand-computed values, monotonicity, gradients, robustness."""

import math

import pytest
import torch
import torch.nn.functional as F

from models import Margin, MarginHead

ARCFACE = Margin(scale=64.0, m2=0.5)  # insightface's ArcFace settings


def one_row(cos_values, label, m1, m2, m3, form="outside"):
    cos = torch.tensor([cos_values], dtype=torch.float64)
    return Margin(1.0, m1, m2, m3, form).logits(cos, torch.tensor([label]))[0]


@pytest.mark.parametrize(
    ("m1", "m2", "m3", "form", "expected"),
    [
        (1.0, 0.5, 0.0, "outside", math.cos(math.pi / 3 + 0.5)),  # ArcFace
        (1.0, 0.0, 0.35, "outside", 0.5 - 0.35),  # CosFace
        (1.0, 0.5, 0.0, "angular", math.cos(math.pi / 3 + 0.5)),  # both forms agree at m1 = 1
        (0.9, 0.3, 0.1, "outside", 0.9 * math.cos(math.pi / 3 + 0.3) - 0.1),
        (2.0, 0.3, 0.1, "angular", math.cos(2 * math.pi / 3 + 0.3) - 0.1),
        (1.35, 0.2, 0.05, "outside", 1.35 * math.cos(math.pi / 3 + 0.2) - 0.05),
    ],
)
def test_target_logit_hand_computed(m1, m2, m3, form, expected):
    row = one_row([0.5, 0.2, -0.1], 0, m1, m2, m3, form)  # cos 0.5 <=> theta = pi/3
    assert row[0].item() == pytest.approx(expected, abs=1e-9)
    assert row[1:].tolist() == [0.2, -0.1]  # other classes untouched


def test_fallback_region_outside_form():
    # theta = acos(-0.95) = 2.824 > pi - 0.5 = 2.642: linear-in-cos continuation.
    row = one_row([0.1, -0.95], 1, 1.0, 0.5, 0.0)
    assert row[1].item() == pytest.approx(-0.95 + math.cos(0.5) - 1, abs=1e-9)  # -1.07242
    row = one_row([0.1, -0.95], 1, 0.8, 0.5, 0.2)
    assert row[1].item() == pytest.approx(0.8 * (-0.95 + math.cos(0.5) - 1) - 0.2, abs=1e-9)


def test_fallback_region_angular_form():
    # m1 = 2, m2 = 0.3: theta_th = (pi - 0.3) / 2 = 1.4208 < theta = pi/2.
    row = one_row([0.0, 0.3], 0, 2.0, 0.3, 0.1, "angular")
    assert row[0].item() == pytest.approx(0.0 - math.cos((math.pi - 0.3) / 2) - 1 - 0.1, abs=1e-9)
    # m1 = 0.5: the argument never reaches pi, no fallback even at theta ~ pi.
    row = one_row([-0.99, 0.3], 0, 0.5, 0.3, 0.0, "angular")
    assert row[0].item() == pytest.approx(math.cos(0.5 * math.acos(-0.99) + 0.3), abs=1e-9)


@pytest.mark.parametrize(
    ("m1", "m2", "m3", "form"),
    [
        (1.0, 0.5, 0.0, "outside"),
        (1.0, 1.2, 0.0, "outside"),
        (0.9, 0.3, 0.2, "outside"),
        (1.5, 0.5, 0.1, "outside"),
        (1.0, 0.5, 0.0, "angular"),
        (2.0, 0.3, 0.1, "angular"),
        (4.0, 0.0, 0.0, "angular"),
        (0.5, 0.3, 0.0, "angular"),
        (1.0, 0.0, 0.35, "outside"),
    ],
)
def test_target_is_continuous_and_strictly_decreasing_in_theta(m1, m2, m3, form):
    theta = torch.linspace(1e-3, math.pi - 1e-3, 4001, dtype=torch.float64)
    target = Margin(1.0, m1, m2, m3, form).target(torch.cos(theta))
    steps = target.diff()
    assert (steps < 0).all()
    # No jump: each step is bounded by the largest slope (max(m1, 1)) times the grid spacing.
    assert steps.abs().max().item() <= max(m1, 1.0) * (theta[1] - theta[0]).item() * 1.01


def test_forms_agree_when_m1_is_one():
    cos = torch.rand(64, 1, dtype=torch.float64) * 2 - 1
    outside = Margin(1.0, 1.0, 0.4, 0.2, "outside").target(cos)
    assert torch.allclose(outside, Margin(1.0, 1.0, 0.4, 0.2, "angular").target(cos))


def test_ignore_label_leaves_row_unchanged_and_bad_labels_raise():
    cos = torch.tensor([[0.5, 0.1], [0.3, 0.2]])
    out = ARCFACE.logits(cos, torch.tensor([-1, 1]))
    assert torch.equal(out[0], cos[0])
    with pytest.raises(ValueError, match="labels must be in"):
        ARCFACE.logits(cos, torch.tensor([0, 2]))


@pytest.mark.parametrize(("form", "m1"), [("outside", 0.9), ("angular", 2.0)])
def test_margin_logits_gradcheck(form, m1):
    torch.manual_seed(0)
    cos = (torch.rand(3, 4, dtype=torch.float64) * 1.8 - 0.9).requires_grad_()
    labels = torch.tensor([0, 3, 1])
    margin = Margin(1.0, m1, 0.3, 0.1, form)
    assert torch.autograd.gradcheck(lambda c: margin.logits(c, labels), (cos,))


def manual_loss(emb, weight, labels, quality, scale, m1, m2, m3):
    cos = F.normalize(emb, dim=1) @ F.normalize(weight, dim=1).T
    logits = cos.clone()
    for i, y in enumerate(labels.tolist()):
        logits[i, y] = m1 * math.cos(math.acos(cos[i, y].item()) + m2) - m3
    return F.cross_entropy(quality[:, None] * scale * logits, labels)


def test_head_loss_matches_paper_equation_6():
    torch.manual_seed(1)
    head = MarginHead(5, 8, Margin(scale=16.0, m1=0.9, m2=0.3, m3=0.1)).double()
    emb, labels = torch.randn(4, 8, dtype=torch.float64), torch.tensor([0, 4, 2, 2])
    quality = torch.rand(4, dtype=torch.float64)
    out = head(emb, labels, quality)
    expected = manual_loss(emb, head.weight.detach(), labels, quality, 16.0, 0.9, 0.3, 0.1)
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-9)
    assert out.cos.shape == (4, 5) and not out.cos.requires_grad
    # quality None == quality of ones (eq. 3); quality q == scale q * S.
    ones, halves = torch.ones(4, dtype=torch.float64), torch.full((4,), 0.5, dtype=torch.float64)
    assert head(emb, labels).loss.item() == pytest.approx(head(emb, labels, ones).loss.item())
    half = MarginHead(5, 8, Margin(scale=8.0, m1=0.9, m2=0.3, m3=0.1)).double()
    half.weight.data.copy_(head.weight.data)
    assert head(emb, labels, halves).loss.item() == pytest.approx(half(emb, labels).loss.item())


def test_focal_reweighting():
    torch.manual_seed(2)
    head = MarginHead(6, 8, Margin(scale=10.0, m2=0.5, focal_gamma=2.0)).double()
    plain = MarginHead(6, 8, Margin(scale=10.0, m2=0.5)).double()
    plain.weight.data.copy_(head.weight.data)
    emb, labels = torch.randn(5, 8, dtype=torch.float64), torch.tensor([0, 1, 2, 3, 5])
    logits = plain.margin.logits(plain(emb, labels).cos, labels) * 10.0
    ce = F.cross_entropy(logits, labels, reduction="none")
    expected = ((1 - torch.exp(-ce)) ** 2 * ce).mean()
    assert head(emb, labels).loss.item() == pytest.approx(expected.item(), rel=1e-9)


def test_head_gradcheck_wrt_embeddings_centres_and_quality():
    torch.manual_seed(3)
    head = MarginHead(4, 5, Margin(scale=4.0, m1=0.9, m2=0.3, m3=0.1, focal_gamma=1.0)).double()
    labels = torch.tensor([1, 3, 0])
    emb = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    quality = (torch.rand(3, dtype=torch.float64) * 0.8 + 0.1).requires_grad_()
    weight = head.weight.detach().clone().requires_grad_()

    def loss_fn(e, w, q):
        return torch.func.functional_call(head, {"weight": w}, (e, labels, q)).loss

    assert torch.autograd.gradcheck(loss_fn, (emb, weight, quality))


def test_zero_vector_features_and_extreme_norms_are_finite():
    torch.manual_seed(6)
    head = MarginHead(7, 16, ARCFACE)
    base = torch.randn(5, 16)
    emb = base.clone()
    emb[0] = 0
    emb[1] *= 1e30  # squared norm overflows float32
    emb[2] *= 1e-30  # norm far below the normalisation eps
    emb.requires_grad_()
    out = head(emb, torch.tensor([0, 1, 2, 6, 3]), torch.tensor([0.0, 1.0, 0.5, 1e-6, 1.0]))
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert torch.isfinite(emb.grad).all() and torch.isfinite(head.weight.grad).all()
    assert out.cos[0].abs().max().item() == 0
    reference = head(base, torch.zeros(5, dtype=torch.long)).cos
    assert torch.allclose(out.cos[1:], reference[1:], atol=1e-6)  # the norm does not change cos


def test_bf16_autocast_forward_backward_is_finite_and_float32():
    torch.manual_seed(4)
    head = MarginHead(11, 16, Margin(scale=64.0, m1=0.9, m2=0.5, m3=0.1))
    linear = torch.nn.Linear(8, 16)
    x, labels = torch.randn(6, 8), torch.tensor([0, 1, 2, 3, 4, 10])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        emb = linear(x)
        assert emb.dtype == torch.bfloat16
        out = head(emb, labels, torch.sigmoid(emb[:, 0]))
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    out.loss.backward()
    assert torch.isfinite(linear.weight.grad).all() and torch.isfinite(head.weight.grad).all()


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"m1": 0.0}, "m1"),
        ({"m2": math.pi / 2}, "m2"),
        ({"m2": -0.1}, "m2"),
        ({"m3": 1.0}, "m3"),
        ({"m3": -0.1}, "m3"),
        ({"scale": 0.0}, "scale"),
        ({"form": "inside"}, "form"),
        ({"focal_gamma": -1.0}, "focal_gamma"),
    ],
)
def test_bad_margins_raise_naming_the_value(kwargs, name):
    with pytest.raises(ValueError, match=f"^{name}: "):
        Margin(**{"scale": 64.0, **kwargs})


def test_weight_init_and_quality_shape_check():
    torch.manual_seed(5)
    head = MarginHead(1000, 64, ARCFACE)
    assert head.weight.shape == (1000, 64)
    assert head.weight.std().item() == pytest.approx(0.01, rel=0.05)
    with pytest.raises(ValueError, match="quality"):
        head(torch.randn(3, 64), torch.tensor([0, 1, 2]), torch.rand(4))
