"""What a user made is never overwritten or silently mixed up: outputs that would replace inputs, runs resumed on
other data, paths relative to another folder, odd file names, and runs that cannot learn."""
from __future__ import annotations

import csv
import io
import json
import os
import shutil

import pytest

from catdog.cli import main

from conftest import make_dataset
from test_cli_errors import _fails

QUICK = ["--model", "seed", "--epochs", "1", "--image-size", "32", "--batch-size", "8", "--workers", "1",
         "--no-progress"]


def _train(*argv: str) -> int:
    return main(["train", *argv, *QUICK])


def test_predict_and_export_never_write_over_a_model_an_image_or_a_run_record(capsys, trained_runs, tiny_data,
                                                                              tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_runs["seed"], run)
    photo = tmp_path / "cat.jpg"
    shutil.copy(next((tiny_data / "test" / "cats").glob("*.jpg")), photo)
    before = {p: p.read_bytes() for p in (run / "best.pt", run / "config.json", photo)}
    for target in (run / "best.pt", run / "config.json", photo):
        err = _fails(capsys, "predict", str(run), str(photo), "--out", str(target))
        assert "would overwrite" in err and str(target) in err
    assert "not an ONNX file" in _fails(capsys, "export", str(run), "--out", str(run / "config.json"))
    assert all(p.read_bytes() == data for p, data in before.items())
    # rows of their own, and an earlier export, are replaced as asked
    assert main(["predict", str(run), str(photo), "--out", str(tmp_path / "rows.csv")]) == 0
    assert main(["predict", str(run), str(photo), "--out", str(tmp_path / "rows.csv")]) == 0
    assert main(["export", str(run), "--out", str(tmp_path / "m.onnx")]) == 0
    assert main(["export", str(run), "--out", str(tmp_path / "m.onnx")]) == 0


def test_names_that_are_not_utf8_and_dangling_links_train_and_predict(capsys, tmp_path):
    data = make_dataset(tmp_path / "data", n_train=8, n_test=2)
    cats = data / "train" / "cats"
    odd = os.path.join(os.fsencode(cats), b"\xff\xfe.jpg")  # a Latin-1 name from an old camera card
    shutil.copy(os.fsencode(next(cats.glob("*.jpg"))), odd)
    (cats / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    assert _train(str(data), "--out", str(tmp_path / "run"), "--no-eval") == 0
    skipped = (tmp_path / "run" / "skipped.csv").read_text()
    assert "gone.jpg" in skipped and "\\xff" not in skipped  # the odd name trained; the link is reported
    rows_csv = tmp_path / "rows.csv"
    for _ in range(2):  # the second pass reads the decode cache, keyed by the name's bytes
        assert main(["predict", str(tmp_path / "run"), str(cats), "--format", "csv", "--out", str(rows_csv)]) == 0
        rows = list(csv.DictReader(io.StringIO(rows_csv.read_text(errors="surrogateescape"))))
        assert len(rows) == 10 and [r["path"] for r in rows if r["error"]] == [str(cats / "gone.jpg")]


def test_a_run_names_its_data_absolutely_so_it_can_be_evaluated_from_elsewhere(tmp_path, monkeypatch):
    make_dataset(tmp_path / "data", n_train=8, n_test=2)
    monkeypatch.chdir(tmp_path)
    assert _train("data", "--out", "run", "--no-eval") == 0
    assert json.loads((tmp_path / "run" / "config.json").read_text())["data"] == str(tmp_path / "data")
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "data").mkdir(parents=True)  # a different folder of the same relative name
    monkeypatch.chdir(elsewhere)
    assert main(["evaluate", "../run"]) == 0
    assert json.loads((tmp_path / "run" / "results.json").read_text())["n"] == 4


def test_a_test_split_with_other_classes_is_refused_before_training(capsys, tmp_path):
    data = make_dataset(tmp_path / "data", n_train=8, n_test=2)
    (data / "test" / "dogs").rename(data / "test" / "birds")
    err = _fails(capsys, "train", str(data), "--out", str(tmp_path / "run"), *QUICK)
    assert "differ from the training split" in err and not (tmp_path / "run" / "history.csv").exists()


def test_a_class_without_one_readable_image_is_an_error(capsys, tmp_path):
    data = make_dataset(tmp_path / "data", n_train=8, n_test=2)
    for f in (data / "train" / "dogs").iterdir():
        f.write_bytes(b"not a picture")
    err = _fails(capsys, "train", str(data), "--out", str(tmp_path / "run"), "--no-eval", *QUICK)
    assert "no image of class 'dogs'" in err


def test_a_diverging_run_says_so_and_keeps_its_last_good_epoch(capsys, tmp_path):
    data = make_dataset(tmp_path / "data", n_train=8, n_test=2)
    err = _fails(capsys, "train", str(data), "--out", str(tmp_path / "run"), "--no-eval", *QUICK, "--lr", "1e10",
                 "--epochs", "3")  # the later --epochs wins
    assert "training diverged in epoch" in err and "lower --lr" in err
    from catdog.model import read_torch_file

    last = read_torch_file(tmp_path / "run" / "last.pt")
    assert all(v.isfinite().all() for v in last["state_dict"].values() if v.is_floating_point())


def test_a_truncated_checkpoint_is_named(capsys, trained_runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_runs["seed"], run)
    whole = (run / "best.pt").read_bytes()
    for cut in (5000, 40_000, len(whole) // 2):
        (run / "best.pt").write_bytes(whole[:cut])
        err = _fails(capsys, "export", str(run), "--out", str(tmp_path / "m.onnx"))
        assert f"{run / 'best.pt'} is not a readable catdog checkpoint" in err, (cut, err)


def test_exist_ok_removes_the_earlier_runs_onnx_model(trained_runs, tiny_data, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_runs["seed"], run)
    assert main(["export", str(run)]) == 0 and (run / "model.onnx").exists()
    assert _train(str(tiny_data), "--out", str(run), "--exist-ok", "--no-eval") == 0
    assert not (run / "model.onnx").exists()


def test_resuming_on_changed_data_is_refused(capsys, tmp_path):
    data = make_dataset(tmp_path / "data", n_train=8, n_test=2)
    run = tmp_path / "run"
    assert main(["train", str(data), "--out", str(run), "--no-eval", "--model", "seed", "--epochs", "1",
                 "--image-size", "32", "--batch-size", "8", "--workers", "1", "--no-progress"]) == 0
    cfg = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**cfg, "epochs": 2}))  # as if stopped after epoch 1 of 2
    (data / "train" / "cats" / "cat.0.jpg").rename(data / "train" / "cats" / "renamed.jpg")  # same counts
    assert "the dataset changed" in _fails(capsys, "train", "--resume", str(run))
    (data / "train" / "cats" / "renamed.jpg").rename(data / "train" / "cats" / "cat.0.jpg")
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0


def test_a_run_folder_inside_the_dataset_is_refused(capsys, tmp_path):
    data = make_dataset(tmp_path / "data", n_train=8, n_test=2)
    for out in (data, data / "train", data / "train" / "runs", data / "test" / "cats" / "run"):
        assert "is inside the dataset" in _fails(capsys, "train", str(data), "--out", str(out), *QUICK)
    assert sorted(p.name for p in (data / "train").iterdir()) == ["cats", "dogs"]


def test_a_run_that_fails_to_start_leaves_no_folder(capsys, tmp_path):
    _fails(capsys, "train", str(tmp_path / "no-such-data"), "--out", str(tmp_path / "run"), *QUICK)
    assert not (tmp_path / "run").exists()
    (tmp_path / "mine").mkdir()  # a folder the user made stays, whatever happens
    _fails(capsys, "train", str(tmp_path / "no-such-data"), "--out", str(tmp_path / "mine"), *QUICK)
    assert (tmp_path / "mine").is_dir()


def test_evaluating_a_read_only_run_still_shows_the_metrics(capsys, trained_runs, tmp_path, monkeypatch):
    import errno

    from catdog import fileio

    run = tmp_path / "run"
    shutil.copytree(trained_runs["seed"], run)

    def refuse(src, dst):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(fileio.os, "replace", refuse)
    assert main(["evaluate", str(run)]) == 1
    err = capsys.readouterr().err
    assert "accuracy" in err and f"warning: cannot write to {run} (Read-only file system)" in err, err


def test_a_file_in_the_way_of_an_output_and_a_bad_atol_are_one_line(capsys, trained_runs, tiny_data, tmp_path):
    blocker = tmp_path / "afile.txt"
    blocker.write_text("mine")
    photo = next((tiny_data / "test" / "cats").glob("*.jpg"))
    err = _fails(capsys, "predict", str(trained_runs["seed"]), str(photo), "--out", str(blocker / "x.csv"))
    assert f"a file is in the way of {blocker / 'x.csv'}" in err
    for bad in ("-1", "nan"):
        assert "--atol must be a number of 0 or more" in _fails(capsys, "export", str(trained_runs["seed"]), "--out",
                                                                 str(tmp_path / "m.onnx"), "--atol", bad)
    assert blocker.read_text() == "mine" and not (tmp_path / "m.onnx").exists()


def test_predict_table_rows_stay_one_line_and_bad_cam_or_empty_inputs_are_explained(capsys, trained_runs, tiny_data,
                                                                                    tmp_path):
    odd = tmp_path / "two\nlines.jpg"
    shutil.copy(next((tiny_data / "test" / "cats").glob("*.jpg")), odd)
    assert main(["predict", str(trained_runs["seed"]), str(odd)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and out[1].endswith("two\\nlines.jpg")  # header + one row
    blocker = tmp_path / "afile.txt"
    blocker.write_text("mine")
    assert main(["predict", str(trained_runs["seed"]), str(odd), "--cam", str(blocker)]) == 2
    refused = capsys.readouterr()
    assert "--cam" in refused.err and "is a file" in refused.err and blocker.read_text() == "mine"
    assert refused.out == ""  # refused before any row was printed
    (tmp_path / "empty").mkdir()
    assert main(["predict", str(trained_runs["seed"]), str(tmp_path / "empty")]) == 1
    assert "no image file under" in capsys.readouterr().err
