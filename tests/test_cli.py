"""The real command line, end to end, on the tiny set."""
import json

from conftest import run_cli


def test_train_then_evaluate_end_to_end(tiny_data, tmp_path):
    run = tmp_path / "run"
    proc = run_cli("train", str(tiny_data), "--out", str(run), "--model", "seed", "--epochs", "1",
                   "--image-size", "32", "--batch-size", "8")
    assert proc.stdout.strip().endswith(str(run))
    assert "epoch 1/1" in proc.stderr and "accuracy" in proc.stderr
    result = json.loads(run_cli("evaluate", str(run), "--json").stdout)
    assert result["n"] == 16 and 0 <= result["accuracy"] <= 1 and result["loss"] > 0
    assert 0 <= result["roc_auc"] <= 1 and result["skipped"] == []
    assert json.loads((run / "results.json").read_text())["n"] == 16
    assert (run / "report.html").exists() and (run / "metrics.json").exists(), "train ends with the report"


def test_bad_input_is_a_clear_error_not_a_traceback(tiny_data, tmp_path):
    for args in (["train", str(tmp_path / "missing"), "--out", str(tmp_path / "r")],
                 ["evaluate", str(tmp_path / "no-run")],
                 ["train", str(tiny_data), "--epochs", "0", "--out", str(tmp_path / "r2")],
                 ["train", "--resume", str(tmp_path / "nothing")]):
        proc = run_cli(*args, check=False)
        assert proc.returncode == 2, args
        assert proc.stderr.startswith("catdog: error:") and "Traceback" not in proc.stderr, proc.stderr
