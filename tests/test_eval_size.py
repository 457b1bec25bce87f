"""Evaluation at a larger input than training (eval_scale): validation, checkpoint, predict, export and CAMs agree."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from catdog.config import TrainConfig, scaled_size
from catdog.data import decode_image, load_folder, split_indices
from catdog.model import load_checkpoint, predict_probs
from catdog.train import bce, fit
from conftest import stop_after_epoch_1


@pytest.mark.parametrize("size, scale, expected", [(96, 1.0, 96), (96, 1.17, 112), (96, 1.25, 120), (32, 1.25, 40),
                                                   (64, 1.25, 80), (20, 0.5, 16)])
def test_eval_size_rounds_to_a_multiple_of_8(size, scale, expected):
    assert scaled_size(size, scale) == expected


def test_the_seed_network_cannot_change_its_input_size():
    with pytest.raises(ValueError, match="eval_scale"):
        TrainConfig.for_model("seed", eval_scale=1.25)
    with pytest.raises(ValueError, match="eval_scale"):
        TrainConfig(eval_scale=3.0)


@pytest.fixture(scope="module")
def scaled_run(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("scaled") / "run"
    cfg = TrainConfig.for_model("resnet", data=str(tiny_data), out=str(out), epochs=2, image_size=32, batch_size=8,
                                eval_scale=1.25, workers=1, threads=1)
    summary = fit(cfg, progress=False, log=lambda m: None)
    return out, cfg, summary


def test_validation_and_checkpoint_use_the_evaluation_size(scaled_run, tiny_data):
    out, cfg, summary = scaled_run
    model, meta = load_checkpoint(out)
    assert meta["image_size"] == 40 and meta["train_size"] == 32
    # the recorded validation accuracy is that of the validation images decoded at 40 px, not 32
    train = load_folder(tiny_data / "train", 40, cache=False, workers=1)
    _, val_idx = split_indices(train.labels, cfg.val_fraction, cfg.seed)
    y = torch.from_numpy(train.labels[val_idx])
    probs = predict_probs(model, train.images[val_idx], tta=True, bf16=cfg.bf16)
    best = max(summary["history"], key=lambda r: (r["val_acc"], -r["val_loss"]))
    assert meta["epoch"] == best["epoch"]
    assert bce(probs, y) == pytest.approx(best["val_loss"], abs=2e-5)  # a loss tells the two sizes apart
    small = load_folder(tiny_data / "train", 32, cache=False, workers=1)
    at_32 = bce(predict_probs(model, small.images[val_idx], tta=True, bf16=cfg.bf16), y)
    assert at_32 != pytest.approx(best["val_loss"], abs=2e-5)


@pytest.mark.parametrize("model", ["seed", "resnet"])
def test_a_run_made_before_eval_scale_resumes_at_its_own_size(tiny_data, tmp_path, model):
    import json

    out = tmp_path / "old"
    with pytest.raises(KeyboardInterrupt):
        fit(TrainConfig.for_model(model, data=str(tiny_data), out=str(out), epochs=2, image_size=32, batch_size=8,
                                  eval_scale=1.0, workers=1, threads=1), progress=False, log=stop_after_epoch_1)
    cfg = json.loads((out / "config.json").read_text())
    del cfg["eval_scale"]  # as config.json was written before the field existed
    (out / "config.json").write_text(json.dumps(cfg))
    resumed = TrainConfig.load(out / "config.json")
    assert resumed.eval_scale == 1.0
    fit(resumed, resume=True, progress=False, log=lambda m: None)
    _, meta = load_checkpoint(out / "last.pt")
    assert meta["epoch"] == 2 and meta["image_size"] == 32


def test_a_64px_model_evaluated_above_64px_keeps_its_stem(tiny_data, tmp_path):
    # the resnet's stem stride is set by the training size (stride 1 up to 64 px): the checkpoint must rebuild it so
    cfg = TrainConfig.for_model("resnet", data=str(tiny_data), out=str(tmp_path / "r"), epochs=1, image_size=64,
                                batch_size=8, eval_scale=1.25, workers=1, threads=1)
    fit(cfg, progress=False, log=lambda m: None)
    model, meta = load_checkpoint(tmp_path / "r")
    assert meta["image_size"] == 80 and model.stem[0].stride == (1, 1)


def test_predict_export_and_cams_work_at_the_evaluation_size(scaled_run, tiny_data, tmp_path):
    from catdog.explain import explain_files
    from catdog.export import export_onnx
    from catdog.predict import Classifier

    out, _, _ = scaled_run
    files = sorted((tiny_data / "test").rglob("*.jpg"))[:6]
    torch_clf = Classifier.load(out)
    assert torch_clf.image_size == 40
    info = export_onnx(out, tmp_path / "m.onnx")
    assert info["image_size"] == 40
    import onnx

    props = {p.key: p.value for p in onnx.load(tmp_path / "m.onnx").metadata_props}
    assert props["image_size"] == "40" and props["train_size"] == "32"
    onnx_clf = Classifier.load(tmp_path / "m.onnx")
    a = np.array([p.probabilities["dogs"] for p in torch_clf.predict(files)])
    b = np.array([p.probabilities["dogs"] for p in onnx_clf.predict(files)])
    np.testing.assert_allclose(a, b, atol=1e-3)
    model, meta = load_checkpoint(out)
    direct = predict_probs(model, np.stack([decode_image(f, 40) for f in files]), tta=True).numpy()
    np.testing.assert_allclose(a, direct, atol=1e-5)
    written = explain_files(out, files[:2], tmp_path / "cams")
    assert len(written["written"]) == 2 and not written["failed"]


def test_the_report_names_both_sizes(scaled_run, tiny_run):
    from catdog.report import render_report

    out, _, _ = scaled_run
    assert "32 px (evaluated at 40 px)" in render_report(out)
    assert "evaluated at" not in render_report(tiny_run)  # the seed model: one size
