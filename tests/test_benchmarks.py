"""The benchmark scripts run end to end on a tiny set (their real runs are `make bench`, never the suite)."""
import subprocess
import sys

from conftest import REPO


def test_accuracy_benchmark_runs_on_a_tiny_set(tiny_data, tmp_path):
    out = tmp_path / "accuracy.md"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks/accuracy.py"), "--data", str(tiny_data), "--seeds",
                           "0", "1", "--epochs", "1", "--image-size", "32", "--ablation", "--out", str(out)],
                          capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = out.read_text()
    assert text.count("\n| 0 | 32 | 1 |") == 1 and text.count("\n| 1 | 32 | 1 |") == 1
    assert "over 2 seeds" in text and "| no mixup/cutmix |" in text
