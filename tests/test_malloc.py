"""Process-wide CPU settings catdog makes for training: malloc thresholds (catdog/malloc.py), denormal flushing."""
from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt exists on Linux only")
def test_training_sets_the_thresholds_once(tiny_data, tmp_path):
    # a fresh interpreter: nothing is set at import; fit() applies the settings; a second call changes nothing
    code = ("import sys, catdog.malloc as m; from catdog.config import TrainConfig; from catdog.train import fit; "
            "assert m._applied is None; "
            "fit(TrainConfig.for_model('seed', data=sys.argv[1], out=sys.argv[2], epochs=1, image_size=32, "
            "workers=1, threads=1), progress=False, log=lambda s: None); "
            "print(m._applied, m.keep_freed_memory())")
    out = subprocess.run([sys.executable, "-c", code, str(tiny_data), str(tmp_path / "run")], capture_output=True,
                         text=True, check=True).stdout
    assert out.split() == ["True", "True"]


def test_a_refused_setting_reports_false(monkeypatch):
    import catdog.malloc as m

    class FakeLibc:
        @staticmethod
        def mallopt(param, value):
            return 0  # glibc's answer to a value out of range

    monkeypatch.setattr(m, "_applied", None)
    monkeypatch.setattr(m.ctypes, "CDLL", lambda name: FakeLibc())
    FakeLibc.mallopt.argtypes = FakeLibc.mallopt.restype = None
    assert m.keep_freed_memory() is False


def test_training_flushes_denormals(tiny_data, tmp_path):
    # a denormal float times one stays itself by default, and reads as zero once fit() has started
    import torch

    code = ("import sys, torch; from catdog.config import TrainConfig; from catdog.train import fit; "
            "d = lambda: float(torch.tensor([1e-39], dtype=torch.float32) * 1.0); before = d(); seen = []; "
            "fit(TrainConfig.for_model('seed', data=sys.argv[1], out=sys.argv[2], epochs=1, image_size=32, "
            "workers=1, threads=1), progress=False, log=lambda s: seen.append(d())); "
            "print(before > 0, bool(seen) and all(v == 0 for v in seen))")
    if not torch.set_flush_denormal(False):
        pytest.skip("this CPU cannot flush denormal floats")
    out = subprocess.run([sys.executable, "-c", code, str(tiny_data), str(tmp_path / "run")], capture_output=True,
                         text=True, check=True).stdout
    assert out.split() == ["True", "True"]
