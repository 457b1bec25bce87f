"""Progressive resizing: early epochs train on smaller inputs, growing to the image size."""
from __future__ import annotations

import csv

import pytest
import torch

from catdog.augment import augment_batch
from catdog.config import PROGRESSIVE_RAMP, TrainConfig
from catdog.train import fit


def test_the_size_grows_from_the_start_share_to_the_image_size():
    cfg = TrainConfig.for_model("resnet", image_size=96, epochs=100, progressive=2 / 3)
    sizes = [cfg.train_size_at(e) for e in range(1, 101)]
    assert sizes[0] == 64 and sizes[-1] == 96
    assert sizes == sorted(sizes) and all(s % 8 == 0 for s in sizes)
    assert set(sizes) == {64, 72, 80, 88, 96}
    assert sizes.index(96) < round(PROGRESSIVE_RAMP * 100)  # the last epochs train at the full size
    assert all(s == 96 for s in sizes[round(PROGRESSIVE_RAMP * 100):])


@pytest.mark.parametrize("progressive", [0.0, 1.0])
def test_off_means_the_image_size_throughout(progressive):
    cfg = TrainConfig.for_model("resnet", image_size=96, epochs=10, progressive=progressive)
    assert {cfg.train_size_at(e) for e in range(1, 11)} == {96}


def test_the_ramp_ends_at_the_image_size_even_off_the_8px_grid():
    cfg = TrainConfig.for_model("resnet", image_size=100, epochs=10, progressive=0.5)
    sizes = [cfg.train_size_at(e) for e in range(1, 11)]
    assert sizes[0] == 48 and sizes[-2:] == [100, 100] and sizes == sorted(sizes)
    assert TrainConfig.for_model("resnet", image_size=32, epochs=1, progressive=0.5).train_size_at(1) == 32


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="progressive"):
        TrainConfig.for_model("resnet", progressive=0.3)
    with pytest.raises(ValueError, match="progressive"):
        TrainConfig.for_model("resnet", progressive=1.5)
    with pytest.raises(ValueError, match="cannot train progressively"):
        TrainConfig.for_model("seed", progressive=0.5)


def test_augment_resizes_to_the_requested_size():
    x = torch.rand(4, 3, 32, 32)
    gen = torch.Generator().manual_seed(0)
    out = augment_batch(x, gen, shear=0.0, zoom=0.0, flip=False, size=16)
    assert out.shape == (4, 3, 16, 16)
    # without a random transform, halving the side samples between each 2x2 block of pixels: their mean
    assert torch.allclose(out, torch.nn.functional.avg_pool2d(x, 2), atol=1e-5)


def test_a_progressive_run_records_its_sizes_and_keeps_the_image_size(tiny_data, tmp_path):
    out = tmp_path / "run"
    cfg = TrainConfig.for_model("resnet", data=str(tiny_data), out=str(out), epochs=4, image_size=32, batch_size=8,
                                eval_scale=1.0, progressive=0.5, workers=1, threads=1)
    fit(cfg, progress=False, log=lambda m: None)
    sizes = [int(r["input_px"]) for r in csv.DictReader(open(out / "history.csv"))]
    assert sizes == [cfg.train_size_at(e) for e in range(1, 5)] and sizes[0] == 16 and sizes[-1] == 32


def test_a_config_written_before_progressive_existed_loads_without_it():
    import dataclasses
    import json

    fields = dataclasses.asdict(TrainConfig.for_model("resnet"))
    del fields["progressive"]
    assert TrainConfig.from_json(json.dumps(fields)).progressive == 0.0
    assert TrainConfig.for_model("seed").progressive == 0.0
