"""Crash safety: SIGKILL then --resume, Ctrl-C, concurrent runs, full disk, read-only folders, --device."""
from __future__ import annotations

import csv
import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from catdog import cli, fileio
from catdog.config import TrainConfig
from catdog.train import RunError, autocast_dtype, fit, resolve_device
from conftest import REPO, run_cli, stop_after_epoch_1

EPOCHS = 30  # long enough that a kill after the first epochs lands mid-run even on a fast machine


def _args(data, out, epochs=EPOCHS) -> list[str]:
    return [str(data), "--out", str(out), "--model", "seed", "--epochs", str(epochs), "--image-size", "32",
            "--batch-size", "8", "--threads", "1", "--workers", "1", "--no-progress", "--no-eval"]


def _cfg(data, out, epochs=EPOCHS, **kw) -> TrainConfig:
    return TrainConfig.for_model("seed", data=str(data), out=str(out), epochs=epochs, image_size=32, batch_size=8,
                                 threads=1, workers=1, **kw)


def _start(*args: str) -> subprocess.Popen:
    """`python -m catdog ARGS` in the background, with Ctrl-C's default meaning even if ours ignores it."""
    return subprocess.Popen([sys.executable, "-m", "catdog", *args], cwd=REPO, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _epochs_done(run: Path) -> int:
    try:
        return len(list(csv.DictReader(open(run / "history.csv"))))
    except FileNotFoundError:
        return 0


def _wait_for_epochs(proc: subprocess.Popen, run: Path, k: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while _epochs_done(run) < k:
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"training ended (exit {proc.returncode}) before epoch {k}:\n{out}\n{err}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"no epoch {k} after {timeout} s")
        time.sleep(0.02)


def _check_every_file_loads(run: Path) -> None:
    for p in run.iterdir():
        if p.name.endswith(".tmp") or p.name == ".lock":
            continue  # a temp file a kill interrupted is never read, and is removed by the next run
        if p.suffix == ".json":
            json.loads(p.read_text())
        elif p.suffix == ".csv":
            list(csv.DictReader(open(p)))
        elif p.suffix == ".pt":
            torch.load(p, weights_only=False)
        else:
            pytest.fail(f"unexpected file {p.name}")


def _temp_files(run: Path) -> list[str]:
    return [n for n in os.listdir(run) if n.endswith(".tmp")]


def test_sigkill_then_resume_ends_as_an_uninterrupted_run(tiny_data, tmp_path):
    run = tmp_path / "killed"
    proc = _start("train", *_args(tiny_data, run))
    _wait_for_epochs(proc, run, 2)
    time.sleep(random.uniform(0, 0.2))  # somewhere in the next epoch or its writes
    proc.kill()
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL, "the run must be killed mid-way, not finished"
    done = torch.load(run / "last.pt", weights_only=False)["epoch"]
    assert 2 <= done < EPOCHS
    _check_every_file_loads(run)

    proc = run_cli("train", "--resume", str(run), "--no-progress", "--no-eval")
    assert f"resuming {run} after epoch {done}/{EPOCHS}" in proc.stderr
    assert not _temp_files(run)
    full = tmp_path / "full"
    fit(_cfg(tiny_data, full), progress=False, log=lambda m: None)

    a = torch.load(full / "last.pt", weights_only=False)
    b = torch.load(run / "last.pt", weights_only=False)
    assert a["epoch"] == b["epoch"] == EPOCHS
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    rows_a, rows_b = (list(csv.DictReader(open(r / "history.csv"))) for r in (full, run))
    assert [r["epoch"] for r in rows_b] == [str(e) for e in range(1, EPOCHS + 1)]
    drop = lambda r: {k: v for k, v in r.items() if k != "epoch_s"}
    assert [drop(r) for r in rows_a] == [drop(r) for r in rows_b]


def test_ctrl_c_stops_cleanly_and_a_concurrent_run_refuses(tiny_data, tmp_path):
    run = tmp_path / "run"
    epochs = 1000  # the interrupt must land mid-run however slowly the checks below go on a loaded machine
    proc = _start("train", *_args(tiny_data, run, epochs))
    _wait_for_epochs(proc, run, 1)
    # while the first run is still going, a second into the same folder refuses, even with --exist-ok
    for kw in (dict(exist_ok=True), dict(resume=True)):
        with pytest.raises(RunError, match="in use by another catdog train"):
            fit(_cfg(tiny_data, run, epochs), progress=False, log=lambda m: None, **kw)
    assert proc.poll() is None, "the first run must still be going for this check to mean anything"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    assert f"catdog train --resume {run}" in err and "Traceback" not in err
    last = torch.load(run / "last.pt", weights_only=False)
    assert 1 <= last["epoch"] < epochs and f"holds epoch {last['epoch']}/{epochs}" in err
    _check_every_file_loads(run)
    assert not _temp_files(run)
    # once it has stopped, the folder is free again
    fit(_cfg(tiny_data, run, epochs=last["epoch"] + 1), resume=True, progress=False, log=lambda m: None)


def test_a_moved_run_resumes_where_it_now_is_and_keeps_its_recipe(tiny_data, tmp_path):
    made, moved = tmp_path / "made", tmp_path / "moved"
    epochs = 1000  # the interrupt below must land mid-run
    with pytest.raises(KeyboardInterrupt):
        fit(_cfg(tiny_data, made, epochs), progress=False, log=stop_after_epoch_1)
    made.rename(moved)
    refused = run_cli("train", "--resume", str(moved), "--epochs", "5", "--lr", "0.1", check=False)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "--epochs, --lr cannot be combined with --resume" in refused.stderr
    proc = _start("train", "--resume", str(moved), "--threads", "1", "--no-progress", "--no-eval")
    _wait_for_epochs(proc, moved, 2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    assert f"resuming {moved} after epoch 1/{epochs}" in err
    assert f"resume with: catdog train --resume {moved}" in err and "Traceback" not in err
    assert not made.exists(), "nothing is written where the run used to be"
    assert torch.load(moved / "last.pt", weights_only=False)["epoch"] >= 2
    assert TrainConfig.load(moved / "config.json").epochs == epochs


class _FullDisk:
    """A file whose writes fail with ENOSPC after a few kilobytes, as on a full disk."""

    def __init__(self, f):
        self.f, self.n = f, 0

    def write(self, b):
        self.n += len(b)
        if self.n > 4096:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self.f.write(b)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self.f.__exit__(*exc)


def _fill_disk_on_second_last_pt(monkeypatch, how: str) -> None:
    """From epoch 1's last.pt on, writes fail (how="write") or the final rename does (how="rename")."""
    real_replace, real_mkstemp, real_fdopen = os.replace, fileio.tempfile.mkstemp, os.fdopen
    seen, doomed = [], set()

    def mkstemp(*args, **kw):
        fd, tmp = real_mkstemp(*args, **kw)
        if ".last.pt." in tmp:
            seen.append(tmp)
            if len(seen) > 1:  # the epoch-0 checkpoint goes through
                doomed.add(fd)
        return fd, tmp

    def fdopen(fd, *args, **kw):
        f = real_fdopen(fd, *args, **kw)
        return _FullDisk(f) if how == "write" and fd in doomed else f

    def replace(src, dst):
        if how == "rename" and Path(dst).name == "last.pt" and len(seen) > 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_replace(src, dst)

    monkeypatch.setattr(fileio.tempfile, "mkstemp", mkstemp)
    monkeypatch.setattr(fileio.os, "fdopen", fdopen)
    monkeypatch.setattr(fileio.os, "replace", replace)


@pytest.mark.parametrize("how", ["write", "rename"])
def test_disk_full_is_a_clear_error_and_leaves_no_half_file(tiny_data, tmp_path, monkeypatch, how):
    run = tmp_path / "run"
    with monkeypatch.context() as m:
        _fill_disk_on_second_last_pt(m, how)
        with pytest.raises(RunError, match=r"No space left on device; its files are complete as of epoch 0.*--resume"):
            fit(_cfg(tiny_data, run, epochs=2), progress=False, log=lambda m: None)
    assert not _temp_files(run)
    assert torch.load(run / "last.pt", weights_only=False)["epoch"] == 0
    _check_every_file_loads(run)

    # the disk has room again: resume finishes as an uninterrupted run does
    fit(_cfg(tiny_data, run, epochs=2), resume=True, progress=False, log=lambda m: None)
    fit(_cfg(tiny_data, tmp_path / "full", epochs=2), progress=False, log=lambda m: None)
    a, b = (torch.load(r / "last.pt", weights_only=False)["state_dict"] for r in (run, tmp_path / "full"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_disk_full_at_the_start_is_a_clear_cli_error(tiny_data, tmp_path, monkeypatch, capsys):
    def replace(src, dst):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(fileio.os, "replace", replace)
    run = tmp_path / "run"
    assert cli.main(["train", *_args(tiny_data, run, epochs=1)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"catdog: error: cannot write to {run}: No space left on device"), err
    assert not run.exists()  # no temp file left, and the folder it made for the run is gone again


def test_read_only_output_folder_is_a_clear_error(tiny_data, tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        try:
            (ro / "probe").touch()
            (ro / "probe").unlink()
            pytest.skip("running as root: chmod 0o555 does not stop writes here (disk-full tests cover the path)")
        except PermissionError:
            pass
        for out in (ro, ro / "run"):
            assert cli.main(["train", *_args(tiny_data, out, epochs=1)]) == 2
            err = capsys.readouterr().err
            assert err.startswith("catdog: error: cannot ") and "Permission denied" in err, err
        assert os.listdir(ro) == []
    finally:
        ro.chmod(0o755)


def test_resume_clears_the_temp_files_of_a_killed_run(tiny_data, tmp_path):
    run = tmp_path / "run"
    fit(_cfg(tiny_data, run, epochs=1), progress=False, log=lambda m: None)
    (run / ".last.pt.x1y2.catdog.tmp").write_bytes(b"half a checkpoint")
    (run / ".notes.tmp").write_text("the user's own file")
    fit(_cfg(tiny_data, run, epochs=1), resume=True, progress=False, log=lambda m: None)
    assert _temp_files(run) == [".notes.tmp"], "only catdog's own temp files are removed"


def test_device_resolution(monkeypatch):
    assert resolve_device("cpu") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == "cpu"
    with pytest.raises(RunError, match="no CUDA device"):
        resolve_device("cuda")
    assert autocast_dtype("cpu", False) is None and autocast_dtype("cpu", True) is torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == "cuda" and resolve_device("cuda") == "cuda"
    for bf16_ok, dtype in ((True, torch.bfloat16), (False, torch.float16)):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: bf16_ok)
        assert autocast_dtype("cuda:1", False) is dtype  # mixed precision is always on with CUDA


def test_device_cuda_without_a_gpu_is_a_clear_error(tiny_data, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert cli.main(["train", *_args(tiny_data, tmp_path / "r", epochs=1), "--device", "cuda"]) == 2
    assert "no CUDA device is available" in capsys.readouterr().err
