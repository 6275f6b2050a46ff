"""ONNX export runs in onnxruntime and matches PyTorch; its embedding-only model loads in insightface."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from models import build_eqface_net
from models.export import export_onnx, onnx_paths


def calibrated_net(backbone: str, input_size: int = 48) -> torch.nn.Module:
    """A small net whose BN running statistics come from data, so outputs are O(1), not ~0."""
    torch.manual_seed(0)
    net = build_eqface_net(backbone=backbone, input_size=input_size, width_mult=0.25, embedding_size=32)
    for module in net.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.momentum = None  # cumulative average over the calibration batches
    net.train()
    with torch.no_grad():
        for _ in range(3):
            net(torch.rand(16, 3, input_size, input_size) * 2 - 1)
    return net.eval()


def session(path) -> ort.InferenceSession:
    onnx.checker.check_model(onnx.load(path))
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("backbone", ["mobilefacenet", "r18"])
def test_the_three_onnx_models_match_pytorch_with_a_dynamic_batch(backbone, tmp_path):
    net = calibrated_net(backbone)
    paths = export_onnx(net, tmp_path / "eqface.onnx", 48)
    assert paths == onnx_paths(tmp_path / "eqface.onnx")
    assert {p.name for p in paths.values()} == {"eqface.onnx", "eqface-embedding.onnx", "eqface-quality.onnx"}
    for names, path in paths.items():
        sess = session(path)
        assert [o.name for o in sess.get_outputs()] == list(names)
        assert [i.name for i in sess.get_inputs()] == ["images"]
        for batch in (1, 5):
            images = torch.rand(batch, 3, 48, 48) * 2 - 1
            got = dict(zip(names, sess.run(None, {"images": images.numpy()}), strict=True))
            with torch.no_grad():
                want = dict(zip(("embedding", "quality"), (t.numpy() for t in net(images)), strict=True))
            assert np.abs(want["embedding"]).max() > 0.5  # a real signal, not all ~0
            for name in names:
                assert got[name].shape == want[name].shape == ((batch, 32) if name == "embedding" else (batch,))
                np.testing.assert_allclose(got[name], want[name], atol=1e-4, rtol=0)


def test_export_keeps_the_callers_mode_and_checks_the_size(tmp_path):
    net = build_eqface_net(backbone="mobilefacenet", input_size=48, width_mult=0.25, embedding_size=16)
    net.train()
    export_onnx(net, tmp_path / "a.onnx", 48)
    assert net.training
    with pytest.raises(ValueError, match="input_size=48"):
        export_onnx(net, tmp_path / "b.onnx", 56)


@pytest.fixture(scope="module")
def exported_112(tmp_path_factory):
    """A 112 px net (insightface routes recognition models by a square input >= 112, a multiple of 16)."""
    net = calibrated_net("mobilefacenet", input_size=112)
    return net, export_onnx(net, tmp_path_factory.mktemp("onnx") / "eqface.onnx", 112)


def bgr_crops(n: int) -> np.ndarray:
    """uint8 (n, 112, 112, 3) BGR images, as insightface hands its recognition model aligned crops."""
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(n, 112, 112, 3), dtype=np.uint8)


def torch_embedding(net, bgr: np.ndarray) -> np.ndarray:
    """Our own preprocessing (data.pipeline.normalise of RGB pixels) and the torch net."""
    from data.pipeline import normalise

    with torch.no_grad():
        return net(torch.from_numpy(normalise(bgr[..., ::-1])))[0].numpy()


def test_embedding_model_meets_insightface_model_zoo_conditions(exported_112):
    """What insightface 2.1's model_zoo.ModelRouter.get_model and ArcFaceONNX.__init__ check (read from its
    source): fewer than 5 outputs (else SCRFD), input not 192/96 px nor two 128 px inputs (landmark, attribute,
    inswapper), a square input >= 112 and a multiple of 16 (0.7.x: exactly 112) -> ArcFaceONNX, which asserts
    exactly one output and takes input mean/std 127.5 unless the first 8 nodes have names starting with
    Sub/_minus and Mul/_mul (MXNet models, mean 0 / std 1)."""
    _, paths = exported_112
    for names in (("embedding",), ("quality",)):
        model = onnx.load(paths[names])
        sess = session(paths[names])
        inputs, outputs = sess.get_inputs(), sess.get_outputs()
        assert len(inputs) == 1 and len(outputs) == 1
        shape = inputs[0].shape
        assert shape[1:] == [3, 112, 112] and shape[2] == shape[3] and shape[2] >= 112 and shape[2] % 16 == 0
        first = [node.name for node in model.graph.node[:8]]
        assert not any(n.startswith(("Sub", "_minus")) for n in first)  # so mean/std 127.5: our [-1, 1]
    assert len(session(paths[("embedding", "quality")]).get_outputs()) == 2  # the one ArcFaceONNX refuses


def test_insightface_model_zoo_loads_the_embedding_model(exported_112):
    """The real insightface (tests extra; skipped without it): get_model routes the embedding-only file to
    ArcFaceONNX, whose own preprocessing (cv2.dnn.blobFromImages, BGR->RGB, (x - 127.5) / 127.5) gives our
    torch embedding; the two-output model is refused by its one-output assertion."""
    model_zoo = pytest.importorskip("insightface.model_zoo")
    net, paths = exported_112
    model = model_zoo.get_model(str(paths[("embedding",)]), providers=["CPUExecutionProvider"])
    assert type(model).__name__ == "ArcFaceONNX" and model.taskname == "recognition"
    assert (model.input_mean, model.input_std, model.input_size) == (127.5, 127.5, (112, 112))
    crops = bgr_crops(3)
    got = model.get_feat(list(crops))
    want = torch_embedding(net, crops)
    assert np.abs(want).max() > 0.5
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    with pytest.raises(AssertionError):
        model_zoo.get_model(str(paths[("embedding", "quality")]), providers=["CPUExecutionProvider"])
