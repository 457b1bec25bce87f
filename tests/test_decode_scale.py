"""decode_scale: training images decoded larger than the training input, so random crops keep their detail."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from catdog.config import TrainConfig
from catdog.data import load_folder, split_indices
from catdog.model import load_checkpoint, predict_probs
from catdog.train import bce, fit, source_images


def test_the_decode_size_and_each_epochs_source_size():
    cfg = TrainConfig.for_model("resnet", image_size=96, decode_scale=4 / 3)
    assert cfg.decode_size == 128
    # each progressive size samples an image about decode_scale times its side, never more than the decoded one
    assert [cfg.source_size_at(s) for s in (48, 64, 96)] == [64, 88, 128]
    assert cfg.source_size_at(120) == 128
    # at scale 1 (the default) every epoch crops from the images as decoded, whatever its size: the recipe's runs
    # train exactly as they did before decode_scale existed
    plain = TrainConfig.for_model("resnet", image_size=96, decode_scale=1.0, progressive=0.5)
    assert plain.decode_size == 96
    assert {plain.source_size_at(plain.train_size_at(e)) for e in range(1, plain.epochs + 1)} == {96}


def test_bad_values_are_refused_and_old_runs_load_at_scale_1():
    for bad in (0.5, 2.5, float("nan")):
        with pytest.raises(ValueError, match="decode_scale"):
            TrainConfig.for_model("resnet", decode_scale=bad)
    fields = dataclasses.asdict(TrainConfig.for_model("resnet", decode_scale=1.5))
    del fields["decode_scale"]
    assert TrainConfig.from_json(json.dumps(fields)).decode_scale == 1.0
    assert TrainConfig.for_model("seed").decode_scale == 1.0


def test_source_images_resize_with_antialiasing_and_reuse_what_they_can():
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (3, 16, 16, 3), dtype=torch.uint8, generator=gen)
    assert source_images(images, 16, None) is images
    half = source_images(images, 8, None)
    assert half.shape == (3, 8, 8, 3) and half.dtype == torch.uint8 and half.is_contiguous()
    nchw = images.permute(0, 3, 1, 2).float()
    smooth = F.interpolate(nchw, size=(8, 8), mode="bilinear", antialias=True).permute(0, 2, 3, 1)
    assert (half.float() - smooth).abs().max() <= 1  # the float result, rounded
    # on noise, antialiasing averages many pixels into each one; plain bilinear would keep most of the variance
    quarter = source_images(images, 4, None).float()
    aliased = F.interpolate(nchw, size=(4, 4), mode="bilinear").permute(0, 2, 3, 1)
    assert quarter.std() < 0.6 * aliased.std()
    assert source_images(images, 8, half) is half
    assert source_images(images, 12, half).shape == (3, 12, 12, 3)


def test_a_run_trains_on_larger_decodes_and_validates_at_the_evaluation_size(tiny_data, tmp_path):
    out = tmp_path / "run"
    cfg = TrainConfig.for_model("resnet", data=str(tiny_data), out=str(out), epochs=2, image_size=32, batch_size=8,
                                eval_scale=1.0, decode_scale=1.5, workers=1, threads=1)
    summary = fit(cfg, progress=False, log=lambda m: None)
    model, meta = load_checkpoint(out)
    assert meta["image_size"] == 32 and meta["config"]["decode_scale"] == 1.5
    # validation saw its images decoded at 32 px (what predict will give the model), not at the 48 px of training
    train = load_folder(tiny_data / "train", 32, cache=False, workers=1)
    _, val_idx = split_indices(train.labels, cfg.val_fraction, cfg.seed)
    y = torch.from_numpy(train.labels[val_idx])
    best = max(summary["history"], key=lambda r: (r["val_acc"], -r["val_loss"]))
    assert meta["epoch"] == best["epoch"]
    probs = predict_probs(model, train.images[val_idx], tta=True, bf16=cfg.bf16)
    assert bce(probs, y) == pytest.approx(best["val_loss"], abs=2e-5)
    large = load_folder(tiny_data / "train", 48, cache=False, workers=1)
    assert np.asarray(large.images).shape[1] == 48
    at_48 = bce(predict_probs(model, large.images[val_idx], tta=True, bf16=cfg.bf16), y)
    assert at_48 != pytest.approx(best["val_loss"], abs=2e-5)
