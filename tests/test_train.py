"""Training loop: run folder, atomic checkpoints, determinism, exact resume, refusing to overwrite."""
from __future__ import annotations

import csv

import pytest
import torch

from catdog.config import TrainConfig
from catdog.data import DataError
from catdog.train import RunError, fit
from conftest import stop_after_epoch_1


def _cfg(data, out, **kw) -> TrainConfig:
    fields = dict(data=str(data), out=str(out), epochs=2, image_size=32, batch_size=8, workers=1, threads=1)
    return TrainConfig.for_model(kw.pop("model", "seed"), **{**fields, **kw})


def _weights(path):
    return torch.load(path, weights_only=False)["state_dict"]


def test_fit_writes_a_complete_run_folder(tiny_data, tmp_path):
    out = tmp_path / "run"
    summary = fit(_cfg(tiny_data, out), progress=False, log=lambda m: None)
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "data.json", "history.csv", "best.pt", "last.pt", "skipped.csv"} <= names
    assert not [n for n in names if n.endswith(".tmp")], "no temp file left behind"
    rows = list(csv.DictReader(open(out / "history.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2] and len(summary["history"]) == 2
    assert all(0 <= float(r["val_acc"]) <= 1 and float(r["train_loss"]) > 0 for r in rows)
    assert TrainConfig.load(out / "config.json").epochs == 2


@pytest.mark.parametrize("model", ["seed", "resnet"])
def test_same_seed_same_weights(tiny_data, tmp_path, model):
    fit(_cfg(tiny_data, tmp_path / "a", model=model), progress=False, log=lambda m: None)
    fit(_cfg(tiny_data, tmp_path / "b", model=model), progress=False, log=lambda m: None)
    fit(_cfg(tiny_data, tmp_path / "c", model=model, seed=1), progress=False, log=lambda m: None)
    a, b, c = (_weights(tmp_path / x / "last.pt") for x in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


@pytest.mark.parametrize("model", ["seed", "resnet"])
def test_resume_continues_to_the_same_result(tiny_data, tmp_path, model):
    full = tmp_path / "full"
    fit(_cfg(tiny_data, full, model=model, epochs=3), progress=False, log=lambda m: None)

    part = tmp_path / "part"
    with pytest.raises(KeyboardInterrupt):
        fit(_cfg(tiny_data, part, model=model, epochs=3), progress=False, log=stop_after_epoch_1)
    assert [r["epoch"] for r in csv.DictReader(open(part / "history.csv"))] == ["1"]
    fit(TrainConfig.load(part / "config.json"), resume=True, progress=False, log=lambda m: None)
    a, b = _weights(full / "last.pt"), _weights(part / "last.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert list(csv.DictReader(open(full / "history.csv")))[-1]["val_loss"] == \
        list(csv.DictReader(open(part / "history.csv")))[-1]["val_loss"]


def test_an_existing_run_is_not_overwritten(tiny_data, tmp_path):
    out = tmp_path / "run"
    fit(_cfg(tiny_data, out, epochs=1), progress=False, log=lambda m: None)
    with pytest.raises(RunError, match="already holds a run"):
        fit(_cfg(tiny_data, out, epochs=1), progress=False, log=lambda m: None)
    fit(_cfg(tiny_data, out, epochs=1), exist_ok=True, progress=False, log=lambda m: None)


def test_overwriting_a_run_clears_its_old_results(tiny_data, tmp_path):
    out = tmp_path / "run"
    fit(_cfg(tiny_data, out, epochs=1), progress=False, log=lambda m: None)
    (out / "plots").mkdir()
    old = ("metrics.json", "results.json", "predictions.csv", "report.html", "plots/roc.png")
    for name in old:
        (out / name).write_text("the old run's")
    (out / "notes.txt").write_text("mine")
    (out / "plots" / "my_figure.png").write_text("mine")
    # a re-run that cannot start (no such data) leaves the old run as it was
    with pytest.raises(DataError):
        fit(_cfg(tmp_path / "no-such-data", out, epochs=1), exist_ok=True, progress=False, log=lambda m: None)
    assert all((out / n).exists() for n in old + ("best.pt",))
    fit(_cfg(tiny_data, out, epochs=1, val_fraction=0.0), exist_ok=True, progress=False, log=lambda m: None)
    assert not [n for n in old if (out / n).exists()], "nothing of the old run's evaluation is left to pass as the new one's"
    assert (out / "notes.txt").read_text() == "mine" and (out / "plots" / "my_figure.png").read_text() == "mine"
    assert (out / "best.pt").exists()


def test_the_plots_a_new_run_clears_are_the_ones_the_report_writes():
    from catdog import report, train

    assert set(train.PLOT_FILES) == {name for name, _, _ in report.PLOTS}


def test_a_folder_of_other_files_is_not_overwritten_without_asking(tiny_data, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "history.csv").write_text("my own history")
    (out / ".draft.tmp").write_text("my draft")
    with pytest.raises(RunError, match="would overwrite its history.csv"):
        fit(_cfg(tiny_data, out, epochs=1), progress=False, log=lambda m: None)
    assert (out / "history.csv").read_text() == "my own history" and (out / ".draft.tmp").exists()
    (out / "history.csv").unlink()
    fit(_cfg(tiny_data, out, epochs=1), progress=False, log=lambda m: None)  # other files are no obstacle
    assert (out / ".draft.tmp").read_text() == "my draft"


def test_learns_the_tiny_set(tiny_data, tmp_path):
    summary = fit(_cfg(tiny_data, tmp_path / "run", epochs=6, lr=3e-3), progress=False, log=lambda m: None)
    assert summary["history"][-1]["val_acc"] >= 0.75


def test_without_validation_best_is_the_last_epoch_written_at_the_end(tiny_data, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        fit(_cfg(tiny_data, out, val_fraction=0.0), progress=False, log=stop_after_epoch_1)
    assert (out / "last.pt").exists() and not (out / "best.pt").exists()
    fit(_cfg(tiny_data, out, val_fraction=0.0), resume=True, progress=False, log=lambda m: None)
    best, last = torch.load(out / "best.pt", weights_only=False), torch.load(out / "last.pt", weights_only=False)
    assert best["epoch"] == last["epoch"] == 2
    assert all(torch.equal(best["state_dict"][k], last["state_dict"][k]) for k in best["state_dict"])
