"""Backbones, quality branch and EQFaceNet: shapes, ranges, precision, save/load."""

import pytest
import torch

from models import (
    BACKBONE_NAMES,
    QualityHead,
    build_eqface_net,
    get_backbone,
    load_eqface_net,
    save_eqface_net,
)


@pytest.mark.parametrize("name", BACKBONE_NAMES)
def test_every_backbone_at_112_and_a_small_input(name):
    torch.manual_seed(0)
    for size, side, batch in ((112, 7, 1), (48, 3, 2)):
        backbone = get_backbone(name, input_size=size, embedding_size=64).eval()
        with torch.no_grad():
            embedding, feature_map = backbone(torch.rand(batch, 3, size, size) * 2 - 1)
        assert embedding.shape == (batch, 64)
        assert backbone.feature_shape == (512, side, side)
        assert feature_map.shape == (batch, *backbone.feature_shape)
        assert torch.isfinite(embedding).all()


@pytest.mark.parametrize(("size", "side"), [(56, 4), (64, 4), (16, 1), (100, 7)])
def test_flatten_size_follows_the_input(size, side):
    for name in ("r18", "mobilefacenet"):
        backbone = get_backbone(name, input_size=size, width_mult=0.25, embedding_size=32).eval()
        with torch.no_grad():
            embedding, feature_map = backbone(torch.zeros(2, 3, size, size))
        assert feature_map.shape[2:] == (side, side) == backbone.feature_shape[1:]
        assert embedding.shape == (2, 32)


def test_iresnet_feature_map_is_what_the_fc_consumes():
    backbone = get_backbone("r18", input_size=48, width_mult=0.25, embedding_size=16).eval()
    with torch.no_grad():
        embedding, feature_map = backbone(torch.randn(3, 3, 48, 48))
        again = backbone.features(backbone.fc(feature_map.flatten(1)))
    assert torch.allclose(embedding, again, atol=1e-5)


def test_width_mult_scales_channels_and_parameters():
    full = get_backbone("r18", input_size=48)
    half = get_backbone("r18", input_size=48, width_mult=0.5)
    assert half.feature_shape == (256, 3, 3)
    assert sum(p.numel() for p in half.parameters()) < 0.3 * sum(p.numel() for p in full.parameters())
    assert get_backbone("mobilefacenet", width_mult=0.25).feature_shape == (128, 7, 7)


def test_bad_backbone_arguments_raise():
    with pytest.raises(ValueError, match="r18, r34, r50, r100, mobilefacenet"):
        get_backbone("resnet18")
    with pytest.raises(ValueError, match="input_size"):
        get_backbone("r18", input_size=8)
    with pytest.raises(ValueError, match="width_mult"):
        get_backbone("mobilefacenet", width_mult=0)


@pytest.mark.parametrize("pooled", [False, True])
def test_quality_head_outputs_one_value_in_unit_interval(pooled):
    torch.manual_seed(1)
    head = QualityHead((8, 3, 3), hidden=16, pooled=pooled)
    quality = head(torch.randn(5, 8, 3, 3) * 100)  # saturating inputs stay in [0, 1]
    assert quality.shape == (5,)
    assert ((quality >= 0) & (quality <= 1)).all()
    expected_in = 8 if pooled else 72
    assert head.fc1.in_features == expected_in
    with pytest.raises(ValueError, match="feature maps of shape"):
        head(torch.randn(5, 8, 4, 4))


def test_eqface_net_bf16_autocast_forward_backward_is_finite():
    torch.manual_seed(2)
    net = build_eqface_net(backbone="mobilefacenet", input_size=48, width_mult=0.25, embedding_size=32)
    x = torch.rand(4, 3, 48, 48) * 2 - 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        embedding, quality = net(x)
    assert embedding.shape == (4, 32) and quality.shape == (4,)
    assert ((quality >= 0) & (quality <= 1)).all()
    (embedding.float().pow(2).mean() + quality.float().mean()).backward()
    grads = [p.grad for p in net.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_save_and_load_rebuild_the_same_network(tmp_path):
    torch.manual_seed(3)
    net = build_eqface_net(
        backbone="r18", input_size=48, width_mult=0.25, embedding_size=16, quality_pooled=True
    )
    net.train()
    net(torch.randn(4, 3, 48, 48))  # move BN running stats away from their init
    net.eval()
    path = tmp_path / "net.pt"
    save_eqface_net(net, path)
    loaded = load_eqface_net(path).eval()
    assert (
        loaded.arch
        == net.arch
        == {
            "backbone": "r18",
            "input_size": 48,
            "embedding_size": 16,
            "width_mult": 0.25,
            "dropout": 0.0,
            "quality_hidden": 512,
            "quality_pooled": True,
        }
    )
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        for a, b in zip(net(x), loaded(x), strict=True):
            assert torch.equal(a, b)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit notices raised by importing dynamo
def test_save_unwraps_torch_compile_and_layout_does_not_change_results(tmp_path):
    torch.manual_seed(4)
    net = build_eqface_net(backbone="mobilefacenet", input_size=48, width_mult=0.25, embedding_size=16).eval()
    assert net.backbone.body[0][0].weight.is_contiguous(memory_format=torch.channels_last)
    save_eqface_net(torch.compile(net), tmp_path / "compiled.pt")  # wrapper only; nothing is compiled
    state = torch.load(tmp_path / "compiled.pt", weights_only=True)["state_dict"]
    assert not any(key.startswith("_orig_mod") for key in state)
    plain = load_eqface_net(tmp_path / "compiled.pt", channels_last=False).eval()
    assert not plain.backbone.body[0][0].weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(3, 3, 48, 48)
    with torch.no_grad():
        for a, b in zip(net(x), plain(x), strict=True):
            assert torch.allclose(a, b, atol=1e-5)


def test_load_rejects_foreign_files_naming_the_path(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, path)
    with pytest.raises(ValueError, match="other.pt"):
        load_eqface_net(path)
    path.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="other.pt"):
        load_eqface_net(path)
    torch.save({"arch": {"backbone": "vgg"}, "state_dict": {}}, path)
    with pytest.raises(ValueError, match="other.pt.*bad 'arch'"):
        load_eqface_net(path)
