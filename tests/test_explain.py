"""Class activation maps: sigmoid-aware, never NaN or blank, CAM only where the model allows it."""
import numpy as np
import pytest
import torch
from torch import nn

from catdog.explain import METHODS, CamUnavailable, compute_cams, overlay, two_class_view
from catdog.model import build_model


class HalfMask(nn.Module):
    """Channel 0 keeps only the left half of the map, channel 1 only the right half."""

    def forward(self, f):
        w = f.shape[-1]
        mask = torch.zeros_like(f)
        mask[:, 0, :, : w // 2] = 1
        mask[:, 1, :, w // 2:] = 1
        return f * mask


class HalfModel(nn.Module):
    """Red on the left is evidence for class 1, red on the right for class 0 (a GAP + linear head)."""

    cam_layer = "features"

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 2, 1), nn.ReLU(), HalfMask())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2, 1)
        with torch.no_grad():
            self.features[0].weight.zero_()
            self.features[0].weight[:, 0] = 1.0  # both channels copy the red channel
            self.features[0].bias.zero_()
            self.fc.weight.copy_(torch.tensor([[1.0, -1.0]]))
            self.fc.bias.zero_()

    def forward(self, x):
        return self.fc(self.pool(self.features(x)).flatten(1))


def test_two_class_view_softmax_equals_sigmoid():
    torch.manual_seed(0)
    model = build_model("resnet").eval()
    x = torch.rand(4, 3, 32, 32)
    p1 = torch.sigmoid(model(x).squeeze(1))
    p2 = torch.softmax(two_class_view(model)(x), 1)[:, 1]
    assert torch.allclose(p1, p2, atol=1e-6)


@pytest.mark.parametrize("name", ["seed", "resnet"])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_maps_are_finite_unit_range_and_not_blank(name, method):
    torch.manual_seed(0)
    model = build_model(name, 64).eval()
    x = torch.rand(3, 3, 64, 64)
    if method == "cam" and name == "seed":
        with pytest.raises(CamUnavailable, match="global average pooling"):
            compute_cams(model, x, method)
        return
    cams, probs, cls = compute_cams(model, x, method)
    assert cams.shape == (3, 64, 64) and np.isfinite(cams).all()
    assert cams.min() >= 0 and np.allclose(cams.max(axis=(1, 2)), 1.0), "each map spans up to 1"
    assert cls == [int(p > 0.5) for p in probs]


@pytest.mark.parametrize("method", ["gradcam", "cam", "layercam"])
def test_a_class_0_prediction_is_explained_as_class_0(method):
    model = HalfModel().eval()
    x = torch.zeros(2, 3, 16, 16)
    x[0, 0, :, :8] = 1.0  # red on the left: logit > 0, class 1
    x[1, 0, :, 8:] = 1.0  # red on the right: logit < 0, class 0
    cams, probs, cls = compute_cams(model, x, method)
    assert cls == [1, 0]
    assert cams[0][:, :8].mean() > cams[0][:, 8:].mean(), "class 1 evidence is on the left"
    assert cams[1][:, 8:].mean() > cams[1][:, :8].mean(), "class 0 evidence is on the right, not blank"


def test_overlay_keeps_the_image_size():
    img = np.zeros((30, 50, 3), np.uint8)
    out = overlay(img, np.random.default_rng(0).random((8, 8)).astype(np.float32))
    assert out.size == (50, 30) and out.mode == "RGB"


def test_explain_command_writes_overlays_and_reports_bad_paths(tiny_run, tiny_data, tmp_path):
    import json

    from PIL import Image

    from conftest import run_cli

    good = [tiny_data / "test" / "cats" / "cat.0.jpg", tiny_data / "test" / "dogs" / "dog.0.jpg"]
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    proc = run_cli("explain", str(tiny_run), *map(str, good), str(tmp_path / "missing.jpg"), str(broken),
                   "--out", str(tmp_path / "cams"), "--method", "gradcampp", "--json")
    result = json.loads(proc.stdout)
    assert [w["path"] for w in result["written"]] == list(map(str, good))
    assert result["layer"] == "features.4", "the seed model's own CAM layer, found automatically"
    for w in result["written"]:
        with Image.open(w["out"]) as img:
            assert img.format == "PNG" and img.size == (40, 32), "the overlay keeps the image's own size"
            assert len(np.unique(np.asarray(img).reshape(-1, 3), axis=0)) > 50, "a heatmap, not a flat image"
        assert w["explained"] == w["predicted"] and w["predicted"] in ("cats", "dogs")
    assert {f["path"]: f["reason"] for f in result["failed"]} == {
        str(tmp_path / "missing.jpg"): "no such file", str(broken): "not an image (unrecognised format)"}
    assert "catdog: skipped" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("args, message", [
    (["--method", "cam"], "global average pooling"),
    (["--layer", "nope"], "nope"),
    (["--method", "gradcam", "MISSING"], "no image could be explained"),
])
def test_explain_command_errors_are_clear(tiny_run, tiny_data, tmp_path, capsys, args, message):
    from catdog.cli import main

    images = [str(tmp_path / "missing.jpg")] if "MISSING" in args else [str(tiny_data / "test" / "cats" / "cat.0.jpg")]
    code = main(["explain", str(tiny_run), *images, "--out", str(tmp_path / "o"), *[a for a in args if a != "MISSING"]])
    err = capsys.readouterr().err
    assert code == 2 and err.splitlines()[-1].startswith("catdog: error:") and message in err
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())
