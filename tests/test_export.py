"""ONNX export runs in onnxruntime and matches PyTorch."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from models import build_eqface_net
from models.export import export_onnx


def calibrated_net(backbone: str) -> torch.nn.Module:
    """A small net whose BN running statistics come from data, so outputs are O(1), not ~0."""
    torch.manual_seed(0)
    net = build_eqface_net(backbone=backbone, input_size=48, width_mult=0.25, embedding_size=32)
    for module in net.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.momentum = None  # cumulative average over the calibration batches
    net.train()
    with torch.no_grad():
        for _ in range(3):
            net(torch.rand(16, 3, 48, 48) * 2 - 1)
    return net.eval()


@pytest.mark.parametrize("backbone", ["mobilefacenet", "r18"])
def test_onnx_matches_pytorch_with_a_dynamic_batch(backbone, tmp_path):
    net = calibrated_net(backbone)
    path = tmp_path / "eqface.onnx"
    export_onnx(net, path, 48)
    onnx.checker.check_model(onnx.load(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["embedding", "quality"]
    for batch in (1, 5):
        images = torch.rand(batch, 3, 48, 48) * 2 - 1
        embedding, quality = session.run(None, {"images": images.numpy()})
        with torch.no_grad():
            expected_embedding, expected_quality = net(images)
        assert embedding.shape == (batch, 32) and quality.shape == (batch,)
        assert expected_embedding.abs().max().item() > 0.5  # a real signal, not all ~0
        np.testing.assert_allclose(embedding, expected_embedding.numpy(), atol=1e-4, rtol=0)
        np.testing.assert_allclose(quality, expected_quality.numpy(), atol=1e-4, rtol=0)


def test_export_keeps_the_callers_mode_and_checks_the_size(tmp_path):
    net = build_eqface_net(backbone="mobilefacenet", input_size=48, width_mult=0.25, embedding_size=16)
    net.train()
    export_onnx(net, tmp_path / "a.onnx", 48)
    assert net.training
    with pytest.raises(ValueError, match="input_size=48"):
        export_onnx(net, tmp_path / "b.onnx", 56)
