"""Shared fixtures: a tiny synthetic folder-per-class dataset that a CNN can learn in one epoch."""
from __future__ import annotations

import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def _make_image(kind: str, rng: np.random.Generator, size=(40, 32)) -> Image.Image:
    """'cats' are reddish with horizontal stripes, 'dogs' bluish with vertical ones, plus noise."""
    w, h = size
    arr = rng.integers(0, 60, (h, w, 3)).astype(np.int16)
    if kind == "cats":
        arr[::4, :, 0] += 180
        arr[:, :, 0] += 40
    else:
        arr[:, ::4, 2] += 180
        arr[:, :, 2] += 40
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def make_dataset(root: Path, n_train: int = 24, n_test: int = 8, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        for kind in ("cats", "dogs"):
            d = root / split / kind
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                _make_image(kind, rng).save(d / f"{kind[:-1]}.{i}.jpg", quality=90)
    return root


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Each test session decodes into its own cache folder, never the user's."""
    monkeypatch.setenv("CATDOG_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """DATA/{train,test}/{cats,dogs}/*.jpg: 24 + 8 images per class, 40x32 px."""
    return make_dataset(tmp_path_factory.mktemp("tiny"))


def unimplemented_dds() -> bytes:
    """A DDS header with a pixel format Pillow does not implement: its plugin raises NotImplementedError."""
    header = struct.pack("<7I", 124, 0x1007, 8, 8, 0, 0, 0) + bytes(44) + struct.pack("<2I", 32, 0x4) + b"XXXX"
    return b"DDS " + header + bytes(40) + bytes(256)


def stop_after_epoch(n: int):
    """A fit() log function that interrupts training, as Ctrl-C would, once epoch n is logged (and saved)."""
    def log(line: str) -> None:
        if line.startswith(f"epoch {n}/"):
            raise KeyboardInterrupt
    return log


stop_after_epoch_1 = stop_after_epoch(1)


def run_cli(*args: str, check: bool = True, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run `python -m catdog ARGS` as a user would, with stdin closed."""
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "catdog", *args], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, env=full_env, timeout=timeout, cwd=REPO)
    if check and proc.returncode != 0:
        raise AssertionError(f"catdog {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="session")
def tiny_run(tiny_data, tmp_path_factory) -> Path:
    """A seed model trained for 2 epochs on the tiny set at 32 px (not evaluated): copy it before changing it."""
    from catdog.config import TrainConfig
    from catdog.train import fit

    out = tmp_path_factory.mktemp("tiny-run") / "run"
    cfg = TrainConfig.for_model("seed", data=str(tiny_data), out=str(out), epochs=2, image_size=32, batch_size=8,
                                lr=3e-3, workers=1, threads=1)
    fit(cfg, progress=False, log=lambda m: None)
    return out


@pytest.fixture(scope="session")
def trained_runs(tiny_data, tmp_path_factory) -> dict[str, Path]:
    """One-epoch runs of each model on the tiny set at 32 px, trained once per session: {"seed": RUN, "resnet": RUN}."""
    from catdog.config import TrainConfig
    from catdog.evaluate import evaluate
    from catdog.fileio import write_text
    from catdog.train import fit
    import json

    runs = {}
    for model in ("seed", "resnet"):
        out = tmp_path_factory.mktemp(f"run-{model}")
        # evaluated at the training size; tests/test_eval_size.py covers runs evaluated at a larger one
        cfg = TrainConfig.for_model(model, data=str(tiny_data), out=str(out), epochs=1, image_size=32, batch_size=8,
                                    eval_scale=1.0, workers=1)
        fit(cfg, exist_ok=True, progress=False, log=lambda m: None)
        write_text(out / "results.json", json.dumps(evaluate(out)))
        runs[model] = out
    return runs


CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def launch_chromium(playwright):
    """Debian's Chromium through Playwright; skipped when missing locally, a failure when missing under CI."""
    if not os.path.exists(CHROMIUM):
        if os.environ.get("CI") == "true":
            pytest.fail(f"Chromium is missing at {CHROMIUM}; CI must install Debian's chromium")
        pytest.skip(f"Chromium is not installed at {CHROMIUM}")
    return playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)

