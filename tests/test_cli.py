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
                 ["train", "--resume", str(tmp_path / "nothing")],
                 ["train", str(tiny_data), "--model", "seed", "--eval-scale", "1.25", "--out", str(tmp_path / "r3")],
                 ["train", str(tiny_data), "--eval-scale", "5", "--out", str(tmp_path / "r4")],
                 ["train", str(tiny_data), "--progressive", "0.1", "--out", str(tmp_path / "r5")],
                 ["train", str(tiny_data), "--decode-scale", "3", "--out", str(tmp_path / "r6")],
                 ["train", str(tiny_data), "--finetune", "0.7", "--out", str(tmp_path / "r7")]):
        proc = run_cli(*args, check=False)
        assert proc.returncode == 2, args
        assert proc.stderr.startswith("catdog: error:") and "Traceback" not in proc.stderr, proc.stderr


def test_eval_scale_and_progressive_flags_reach_the_run(tiny_data, tmp_path):
    run = tmp_path / "run"
    run_cli("train", str(tiny_data), "--out", str(run), "--epochs", "1", "--image-size", "32", "--batch-size", "8",
            "--eval-scale", "1.5", "--progressive", "0.5", "--decode-scale", "1.25", "--finetune", "0.25", "--no-eval")
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["eval_scale"] == 1.5 and cfg["progressive"] == 0.5 and cfg["decode_scale"] == 1.25
    assert cfg["finetune"] == 0.25
    from catdog.model import load_checkpoint

    _, meta = load_checkpoint(run)
    assert meta["image_size"] == 48 and meta["train_size"] == 32
