"""The benchmark scripts run end to end on a tiny set (their real runs are `make bench`, never the suite)."""
import json
import os
import re
import subprocess
import sys

from conftest import REPO


def test_accuracy_benchmark_runs_on_a_tiny_set(tiny_data, tmp_path):
    out = tmp_path / "accuracy.md"
    out.write_text("# old table\n\n## How the recipe was chosen\n\nnotes written by hand\n")

    def bench(*args):
        proc = subprocess.run([sys.executable, str(REPO / "benchmarks/accuracy.py"), "--data", str(tiny_data),
                               "--epochs", "1", "--image-size", "32", "--out", str(out), *args],
                              capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return out.read_text()

    bench("--seeds", "0", "1")
    # a later invocation adds ablation rows to the same tables; the hand-written section is kept
    text = bench("--seeds", "--ablation", "default recipe", "no mixup/cutmix", "--threads", "1")
    assert len(re.findall(r"\n\| 0 \| 32 \| \d+ \| 1 \|", text)) == 1
    assert len(re.findall(r"\n\| 1 \| 32 \| \d+ \| 1 \|", text)) == 1
    assert "over 2 seeds" in text and "| no mixup/cutmix |" in text and "| default recipe |" in text
    # a row trained with fewer threads than there are cores says so beside its wall time
    assert re.search(r"\| no mixup/cutmix \|.*\(1 thread\) \|", text) or os.cpu_count() == 1
    assert "old table" not in text and text.rstrip().endswith("notes written by hand")
    results = json.loads(out.with_suffix(".json").read_text())
    assert set(results["seeds"]) == {"0", "1"} and set(results["ablation"]) == {"default recipe", "no mixup/cutmix"}
    assert results["ablation"]["default recipe"]["val_acc"] == results["seeds"]["0"]["val_acc"]

    proc = subprocess.run([sys.executable, str(REPO / "benchmarks/accuracy.py"), "--seeds", "--ablation", "no such row",
                           "--out", str(out)], capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=60)
    assert proc.returncode == 2 and "unknown ablation row" in proc.stderr


def test_speed_benchmark_runs_on_a_tiny_set(tiny_data, tmp_path):
    md, js = tmp_path / "speed.md", tmp_path / "speed.json"
    profile = tmp_path / "breakdown.md"
    profile.write_text("# Profile: where the time goes\n\n| variant | img/s |\n\n## File → prediction\n")
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks/speed.py"), "--data", str(tiny_data), "--repeats",
                           "1", "--epochs", "1", "--latency-n", "5", "--keras-python", str(tmp_path / "no-keras"),
                           "--out", str(md), "--json", str(js), "--profile", str(profile)],
                          capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(js.read_text())["summary"][str(tiny_data)]
    assert summary["catdog_train_img_per_s"]["median"] > 0 and 0 <= summary["catdog_acc"]["median"] <= 1
    assert summary["catdog_onnx_predict_img_per_s"]["median"] > 0 and summary["catdog_torch_p99_ms"]["median"] > 0
    assert summary["catdog_torch_cached_img_per_s"]["median"] > 0
    assert "| training img/s |" in md.read_text() and "| same files again (decode cache), ONNX Runtime |" in md.read_text()
    assert md.read_text().rstrip().endswith("| variant | img/s |\n\n### File → prediction")


def test_breakdown_runs_on_a_tiny_set(tiny_data, tmp_path):
    out = tmp_path / "breakdown.md"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks/breakdown.py"), "--data", str(tiny_data), "--epochs",
                           "1", "--repeats", "1", "--out", str(out)],
                          capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = out.read_text()
    for row in ("| fp32, NCHW, batch 32 (the plain PyTorch loop) |", "| glibc default |", "| raised (catdog train) |",
                "| computed with (torch default) |", "| flushed to zero (catdog train) |",
                "| decode cache hit"):
        assert row in text


def test_recipe_profile_runs_on_a_tiny_set(tiny_data, tmp_path):
    out = tmp_path / "recipe_profile.md"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks/recipe_profile.py"), "--data", str(tiny_data),
                           "--image-size", "32", "--steps", "1", "--out", str(out)],
                          capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = out.read_text()
    # one row per input size of the recipe's progressive schedule, with the epochs it spends at each
    from catdog.config import TrainConfig

    cfg = TrainConfig.for_model("resnet", image_size=32)
    sizes = [(cfg.train_size_at(e), cfg.is_finetune(e)) for e in range(1, cfg.epochs + 1)]
    rows = re.findall(r"\n\| (\d+)( \(fine-tuning\))? \| (\d+) \|(?: [\d.]+ \|){6} \d+% \|", text)
    assert [(int(s), bool(f), int(n)) for s, f, n in rows] == [(s, f, sizes.count((s, f))) for s, f in sorted(set(sizes))]
    assert len(rows) > 1  # the schedule grows, so its smaller sizes are profiled too
    assert re.search(r"\| `aten::\w+` \| \d+\.\d% \|", text)
