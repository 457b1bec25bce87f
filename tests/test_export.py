"""ONNX export: metadata, parity with PyTorch (flip averaging included), dynamic batch, refusal on mismatch."""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import catdog.export as export_mod
from catdog.data import decode_image
from catdog.export import ATOL, ExportError, export_onnx
from catdog.model import load_checkpoint, predict_probs
from conftest import run_cli


def _test_images(tiny_data, size):
    return np.stack([decode_image(p, size) for p in sorted((tiny_data / "test").rglob("*.jpg"))])


@pytest.mark.parametrize("name", ["seed", "resnet"])
def test_export_matches_pytorch_and_documents_itself(trained_runs, tiny_data, tmp_path, name):
    info = export_onnx(trained_runs[name], tmp_path / "m.onnx")
    assert info["max_abs_diff"] <= ATOL
    proto = onnx.load(tmp_path / "m.onnx")
    props = {p.key: p.value for p in proto.metadata_props}
    model, meta = load_checkpoint(trained_runs[name])
    assert json.loads(props["classes"]) == ["cats", "dogs"] and props["image_size"] == "32"
    assert props["scale"] == "uint8 RGB / 255, NCHW" and props["tta"] == str(meta["tta"]).lower()
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    images = _test_images(tiny_data, 32)
    x = images.transpose(0, 3, 1, 2).astype(np.float32) / 255
    expected = predict_probs(model, images, tta=meta["tta"]).numpy()
    for batch in (1, 7, len(x)):  # the batch axis is dynamic
        probs = sess.run(["probs"], {"image": x[:batch]})[0]
        assert probs.shape == (batch, 2)
        np.testing.assert_allclose(probs.sum(1), 1, atol=1e-6)
        np.testing.assert_allclose(probs[:, 1], expected[:batch], atol=ATOL, rtol=0)


def test_flip_averaging_is_in_the_graph(trained_runs, tiny_data, tmp_path):
    model, meta = load_checkpoint(trained_runs["resnet"])
    assert meta["tta"]
    export_onnx(trained_runs["resnet"], tmp_path / "m.onnx")
    images = _test_images(tiny_data, 32)
    half = images[:, :, :16].copy()
    images[:, :, 16:] = 0  # left half only: the mirror image is a different input
    images[:, :, :16] = half
    x = images.transpose(0, 3, 1, 2).astype(np.float32) / 255
    got = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"]).run(["probs"], {"image": x})[0][:, 1]
    with torch.no_grad():
        plain = torch.sigmoid(model(torch.from_numpy(x)).squeeze(1)).numpy()
        mirrored = torch.sigmoid(model(torch.from_numpy(x).flip(3)).squeeze(1)).numpy()
    assert np.abs(plain - mirrored).max() > 10 * ATOL, "the test images must tell the two apart"
    np.testing.assert_allclose(got, (plain + mirrored) / 2, atol=ATOL, rtol=0)


def test_a_mismatch_fails_and_writes_nothing(trained_runs, tmp_path, monkeypatch):
    real = export_mod._onnx_probs
    monkeypatch.setattr(export_mod, "_onnx_probs", lambda b, im: real(b, im) + 1e-3)
    with pytest.raises(ExportError, match="differ from PyTorch"):
        export_onnx(trained_runs["seed"], tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


def test_export_cli(trained_runs, tmp_path):
    proc = run_cli("export", str(trained_runs["seed"]), "--format", "onnx", "--out", str(tmp_path / "s.onnx"))
    assert proc.stdout.strip() == str(tmp_path / "s.onnx") and "max |onnx - torch|" in proc.stderr
    proc = run_cli("export", str(tmp_path / "s.onnx"), check=False)
    assert proc.returncode == 2 and "already an ONNX file" in proc.stderr
    proc = run_cli("export", str(tmp_path / "nothing"), check=False)
    assert proc.returncode == 2 and proc.stderr.startswith("catdog: error:")


def test_onnx_input_is_the_contiguous_scaled_image():
    import numpy as np

    from catdog.predict import onnx_input

    images = np.random.default_rng(0).integers(0, 256, (5, 7, 9, 3), dtype=np.uint8)
    x = onnx_input(images)
    assert x.shape == (5, 3, 7, 9) and x.dtype == np.float32 and x.flags["C_CONTIGUOUS"]
    assert np.array_equal(x, images.transpose(0, 3, 1, 2).astype(np.float32) / 255.0)


def test_the_seed_network_exports_its_pools_as_maxpool(trained_runs, tmp_path):
    """The inference shortcut of MaxPool2x2 (strided maxima) is for PyTorch; ONNX Runtime runs MaxPool far faster."""
    export_onnx(trained_runs["seed"], tmp_path / "m.onnx")
    ops = [node.op_type for node in onnx.load(tmp_path / "m.onnx").graph.node]
    assert ops.count("MaxPool") == 2 and "Max" not in ops
