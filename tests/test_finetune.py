"""Fine-tuning at the evaluation size: the last epochs train on whole images at the size the model is scored at."""
from __future__ import annotations

import csv
import dataclasses
import json

import pytest
import torch

from catdog.augment import flip_batch
from catdog.config import FINETUNE_LR_SHARE, TrainConfig
from catdog.train import finetune_lr, fit
from conftest import stop_after_epoch


def _history(run):
    return list(csv.DictReader(open(run / "history.csv")))


def test_the_last_epochs_train_at_the_evaluation_size_and_the_ramp_spans_the_others():
    cfg = TrainConfig.for_model("resnet", image_size=96, eval_scale=1.15, epochs=100, progressive=0.5, finetune=0.1)
    sizes = [cfg.train_size_at(e) for e in range(1, 101)]
    assert sizes[90:] == [112] * 10 and cfg.main_epochs == 90
    assert sizes[0] == 48 and sizes[89] == 96 and sizes[:90] == sorted(sizes[:90])
    assert sizes[:90] == [TrainConfig.for_model("resnet", image_size=96, epochs=90, progressive=0.5).train_size_at(e)
                          for e in range(1, 91)]  # the main epochs grow as a run of 90 epochs would


def test_a_share_too_small_for_the_epochs_fine_tunes_none_and_old_configs_load_without_it():
    small, off = TrainConfig.for_model("resnet", finetune=0.01, epochs=40), TrainConfig.for_model("resnet", epochs=40)
    assert small.finetune_epochs == 0 and small.main_epochs == 40
    assert [small.train_size_at(e) for e in range(1, 41)] == [off.train_size_at(e) for e in range(1, 41)]
    fields = dataclasses.asdict(TrainConfig.for_model("resnet", finetune=0.2))
    del fields["finetune"]
    assert TrainConfig.from_json(json.dumps(fields)).finetune == 0


@pytest.mark.parametrize("bad", [-0.1, 0.6, float("nan")])
def test_bad_settings_are_refused(bad):
    with pytest.raises(ValueError, match="finetune"):
        TrainConfig.for_model("resnet", finetune=bad)


def test_the_learning_rate_warms_up_then_decays_to_zero():
    cfg = TrainConfig.for_model("resnet", lr=3e-3)
    lrs = [finetune_lr(cfg, s, 100) for s in range(100)]
    peak = 3e-3 * FINETUNE_LR_SHARE
    assert lrs[:10] == sorted(lrs[:10]) and lrs[9] == pytest.approx(peak)
    assert lrs[9:] == sorted(lrs[9:], reverse=True) and lrs[-1] < peak / 100
    assert finetune_lr(cfg, 0, 1) == pytest.approx(peak)  # a one-step phase is all warm-up


def test_flip_mirrors_about_half_the_images_and_nothing_else():
    x = torch.rand(64, 3, 8, 8)
    out = flip_batch(x, torch.Generator().manual_seed(0))
    flipped = [bool(torch.equal(o, xi.flip(2))) for o, xi in zip(out, x)]
    kept = [bool(torch.equal(o, xi)) for o, xi in zip(out, x)]
    assert all(f != k for f, k in zip(flipped, kept)) and 16 < sum(flipped) < 48
    assert out.is_contiguous(memory_format=torch.channels_last)


def _cfg(data, out, **kw):
    return TrainConfig.for_model("resnet", data=str(data), out=str(out), epochs=3, finetune=0.34, image_size=32,
                                 eval_scale=1.25, batch_size=8, workers=1, threads=1, **kw)


def test_a_run_fine_tunes_its_last_epoch_at_the_evaluation_size(tiny_data, tmp_path):
    out = tmp_path / "run"
    cfg = _cfg(tiny_data, out)
    fit(cfg, progress=False, log=lambda m: None)
    rows = _history(out)
    assert [int(r["input_px"]) for r in rows][-1] == cfg.eval_size == 40
    assert all(int(r["input_px"]) < 40 for r in rows[:-1])
    assert float(rows[-1]["lr"]) < cfg.lr * FINETUNE_LR_SHARE  # the fine-tuning schedule's, decaying
    assert float(rows[-2]["lr"]) < cfg.lr / 10  # the one-cycle schedule annealed over the main epochs
    assert torch.load(out / "best.pt", weights_only=False)["epoch"] == 3  # chosen among the fine-tuning epochs


def test_resume_into_the_fine_tuning_epochs_gives_the_same_result(tiny_data, tmp_path):
    fit(_cfg(tiny_data, tmp_path / "full"), progress=False, log=lambda m: None)
    part = tmp_path / "part"
    with pytest.raises(KeyboardInterrupt):
        fit(_cfg(tiny_data, part), progress=False, log=stop_after_epoch(2))
    fit(TrainConfig.load(part / "config.json"), resume=True, progress=False, log=lambda m: None)
    a = torch.load(tmp_path / "full" / "last.pt", weights_only=False)["state_dict"]
    b = torch.load(part / "last.pt", weights_only=False)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _history(tmp_path / "full")[-1]["val_loss"] == _history(part)[-1]["val_loss"]


def test_the_epochs_before_fine_tuning_are_those_of_a_run_without_it(tiny_data, tmp_path):
    """A run of N + k epochs whose last k fine-tune trains its first N exactly as a run of N epochs does."""
    plain = tmp_path / "plain"
    fit(dataclasses.replace(_cfg(tiny_data, plain), epochs=2, finetune=0.0), progress=False, log=lambda m: None)
    fine = tmp_path / "fine"
    fit(_cfg(tiny_data, fine), progress=False, log=lambda m: None)
    drop = lambda rows: [{k: v for k, v in r.items() if k != "epoch_s"} for r in rows]
    assert drop(_history(fine)[:2]) == drop(_history(plain))
