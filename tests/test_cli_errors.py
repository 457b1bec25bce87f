"""Bad input to any command is one clear line on stderr and a non-zero exit, never a traceback."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from catdog.cli import main

from conftest import REPO


def _fails(capsys, *argv: str, code: int = 2) -> str:
    """Run `catdog ARGV` in this process; it must exit with `code` and say why on one line."""
    try:
        rc = main(list(argv))
    except SystemExit as e:  # argparse's usage errors
        rc = e.code
    err = capsys.readouterr().err
    assert rc == code, (argv, rc, err)
    assert "Traceback" not in err and err.strip(), err
    return err


@pytest.fixture
def junk_checkpoint(tmp_path):
    path = tmp_path / "model.pt"
    path.write_text("this is not a checkpoint")
    return path


def test_a_file_that_is_not_a_checkpoint_is_named_by_every_command(capsys, junk_checkpoint, tiny_data, tmp_path):
    photo = next((tiny_data / "test" / "cats").glob("*.jpg"))
    for argv in (["predict", str(junk_checkpoint), str(photo)], ["evaluate", str(junk_checkpoint), str(tiny_data)],
                 ["explain", str(junk_checkpoint), str(photo), "--out", str(tmp_path / "cams")],
                 ["export", str(junk_checkpoint), "--out", str(tmp_path / "m.onnx")]):
        err = _fails(capsys, *argv)
        assert str(junk_checkpoint) in err and "checkpoint" in err, err
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(junk_checkpoint, run / "last.pt")
    from catdog.config import TrainConfig

    (run / "config.json").write_text(TrainConfig(out=str(run)).to_json())
    assert "not a readable catdog checkpoint" in _fails(capsys, "train", "--resume", str(run))
    (run / "config.json").write_text("{}")  # every run writes its model, epochs, sizes, lr and seed
    assert "config.json is damaged (no 'model', 'epochs'" in _fails(capsys, "train", "--resume", str(run))


@pytest.mark.parametrize("damage, fragment", [
    ({"weights": float("nan")}, "not finite"),
    ({"classes": ["cats"]}, "two different names"),
    ({"classes": ["cats", "dogs", "birds"]}, "two different names"),
    ({"classes": None}, "two different names"),
    ({"image_size": 0}, "input size"),
    ({"image_size": "big"}, "input size"),
])
def test_a_hand_edited_checkpoint_is_refused_by_every_command(capsys, trained_runs, tiny_data, tmp_path, damage,
                                                              fragment):
    """A checkpoint that loads but could not be used (NaN weights, not two classes, no input size) is refused up
    front, by name, instead of failing on every image or answering with a wrong set of classes."""
    import torch

    ckpt = torch.load(trained_runs["seed"] / "best.pt", weights_only=False)
    for key, value in damage.items():
        if key == "weights":
            next(iter(ckpt["state_dict"].values())).fill_(value)
        else:
            ckpt[key] = value
    path = tmp_path / "edited.pt"
    torch.save(ckpt, path)
    photo = next((tiny_data / "test" / "cats").glob("*.jpg"))
    for argv in (["predict", str(path), str(photo)], ["evaluate", str(path), str(tiny_data)],
                 ["explain", str(path), str(photo), "--out", str(tmp_path / "cams")],
                 ["export", str(path), "--out", str(tmp_path / "m.onnx")], ["serve", str(path), "--port", "0"]):
        err = _fails(capsys, *argv)
        assert str(path) in err and fragment in err, (argv, err)
    assert not (tmp_path / "m.onnx").exists()


def test_an_onnx_file_where_a_checkpoint_is_needed_says_so(capsys, tiny_data, tmp_path):
    onnx = tmp_path / "model.onnx"
    onnx.write_bytes(b"\x08\x07onnx-ish bytes")
    assert "ONNX model" in _fails(capsys, "evaluate", str(onnx), str(tiny_data))


def test_an_output_path_under_a_file_is_an_error_not_a_traceback(capsys, trained_runs, tiny_data, tmp_path):
    blocker = tmp_path / "afile"
    blocker.write_text("mine")
    photo = next((tiny_data / "test" / "cats").glob("*.jpg"))
    err = _fails(capsys, "predict", str(trained_runs["seed"]), str(photo), "--out", str(blocker / "x.csv"))
    assert str(blocker) in err
    _fails(capsys, "export", str(trained_runs["seed"]), "--out", str(blocker / "m.onnx"))
    assert blocker.read_text() == "mine"


def test_export_refuses_to_overwrite_its_own_checkpoint(capsys, trained_runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_runs["seed"], run)
    before = (run / "best.pt").read_bytes()
    assert "checkpoint" in _fails(capsys, "export", str(run), "--out", str(run / "best.pt"))
    assert (run / "best.pt").read_bytes() == before


@pytest.mark.parametrize("argv, flag", [
    (["serve", "x.onnx", "--port", "70000"], "--port"),
    (["serve", "x.onnx", "--port", "-1"], "--port"),
    (["serve", "x.onnx", "--max-mb", "inf"], "--max-mb"),
    (["serve", "x.onnx", "--max-mb", "nan"], "--max-mb"),
    (["data", "check", ".", "--image-size", "0"], "--image-size"),
    (["train", "--threads", "-1"], "--threads"),
    (["train", "--seed", "-1"], "--seed"),
    (["train", "--workers", "-2"], "--workers"),
])
def test_out_of_range_flags_are_usage_errors_naming_the_flag(capsys, argv, flag):
    assert flag in _fails(capsys, *argv)


def test_an_infinite_learning_rate_is_refused_before_the_run_folder_is_made(capsys, tiny_data, tmp_path):
    assert "lr" in _fails(capsys, "train", str(tiny_data), "--lr", "inf", "--out", str(tmp_path / "r"))
    assert not (tmp_path / "r").exists()


def test_a_closed_pipe_ends_predict_quietly(trained_runs, tiny_data, tmp_path):
    """`catdog predict ... | head -1`: the reader leaves early, and that is not an error worth a traceback."""
    photo = next((tiny_data / "test" / "cats").glob("*.jpg"))
    for i in range(1500):  # rows enough to fill the pipe (64 KiB) after head has gone
        os.link(photo, tmp_path / f"photo_with_a_long_enough_name_{i:05d}.jpg")
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    cmd = (f"{sys.executable} -m catdog predict {trained_runs['seed']} {tmp_path} --format csv --no-cache "
           f"| head -c 1")
    proc = subprocess.run(["bash", "-c", f"set -o pipefail; {cmd}"], capture_output=True, text=True, env=env,
                          stdin=subprocess.DEVNULL, timeout=120)
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr
    assert proc.returncode in (0, 141), (proc.returncode, proc.stderr)  # 141: catdog's own exit on a closed pipe


def test_a_file_name_that_is_not_utf8_is_predicted_and_written_back_as_its_bytes(trained_runs, tiny_data, tmp_path):
    photo = next((tiny_data / "test" / "cats").glob("*.jpg"))
    folder = tmp_path / "photos"
    folder.mkdir()
    raw = os.fsencode(folder) + b"/chat_\xe9.jpg"  # Latin-1, as old cameras and zip files name them
    with open(raw, "wb") as f:
        f.write(photo.read_bytes())
    # a strict stdout, as under en_US.UTF-8 (this machine's C.UTF-8 locale escapes on its own)
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "PYTHONIOENCODING": "utf-8:strict"}
    for out in (None, tmp_path / "rows.csv"):
        args = ["predict", str(trained_runs["seed"]), str(folder), "--format", "csv", "--no-cache"]
        args += ["--out", str(out)] if out else []
        proc = subprocess.run([sys.executable, "-m", "catdog", *args], capture_output=True, env=env,
                              stdin=subprocess.DEVNULL, timeout=120)
        assert proc.returncode == 0, proc.stderr.decode(errors="replace")
        written = out.read_bytes() if out else proc.stdout
        assert raw in written, written


def test_inputs_with_the_longest_names_get_their_maps_written(capsys, trained_runs, tiny_data, tmp_path):
    photo = next((tiny_data / "test" / "cats").glob("*.jpg"))
    long_ascii, long_cjk = tmp_path / ("a" * 250 + ".jpg"), tmp_path / ("猫" * 83 + ".jpg")  # 254 and 253 bytes
    for p in (long_ascii, long_cjk):
        p.write_bytes(photo.read_bytes())
    assert main(["explain", str(trained_runs["seed"]), str(long_ascii), str(long_cjk), "--out", str(tmp_path / "o")]) == 0
    assert len(list((tmp_path / "o").glob("*.png"))) == 2
    assert main(["predict", str(trained_runs["seed"]), str(long_cjk), "--cam", str(tmp_path / "c"),
                 "--out", str(tmp_path / "rows.csv")]) == 0
    assert len(list((tmp_path / "c").glob("*.png"))) == 1
    capsys.readouterr()


def test_explaining_a_layer_without_a_spatial_map_is_a_clear_error(capsys, trained_runs, tiny_data, tmp_path):
    photo = next((tiny_data / "test" / "cats").glob("*.jpg"))
    for layer in ("classifier.3", "classifier.1"):  # the output layer and the dense layer: (B, n) activations
        err = _fails(capsys, "explain", str(trained_runs["seed"]), str(photo), "--out", str(tmp_path / "o"),
                     "--layer", layer)
        assert "no spatial map" in err, err


def test_a_damaged_config_json_is_named(capsys, trained_runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_runs["seed"], run)
    (run / "config.json").write_text('{"model": "seed",')  # cut short
    for argv in (["train", "--resume", str(run)], ["report", str(run)]):
        assert f"{run / 'config.json'} is damaged" in _fails(capsys, *argv)


def test_version_and_a_unicode_bug_is_an_internal_error(capsys, monkeypatch):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    from catdog import __version__

    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"catdog {__version__}"
    import catdog.cli as cli

    def broken(args):
        "x\udcff".encode("utf-8")  # what a surrogate-escaped file name does to a careless encode

    monkeypatch.setattr(cli, "_evaluate", broken)
    monkeypatch.delenv("CATDOG_DEBUG", raising=False)
    assert main(["evaluate", "somewhere"]) == 1  # a bug, not the user's bad input (which exits 2)
    assert "catdog: internal error: UnicodeEncodeError" in capsys.readouterr().err
