"""Prediction: the Python API on every input kind, the streaming CLI, ONNX without torch, flat memory."""
from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from catdog.data import SkipImage, decode_image
from catdog.export import export_onnx
from catdog.model import load_checkpoint, predict_probs
from catdog.predict import Classifier, ModelError, predict_stream
from conftest import REPO, run_cli


@pytest.fixture(scope="module")
def onnx_model(trained_runs, tmp_path_factory):
    return export_onnx(trained_runs["resnet"], tmp_path_factory.mktemp("onnx") / "model.onnx")["out"]


@pytest.fixture(scope="module")
def mixed_folder(tiny_data, tmp_path_factory):
    """Readable photos in nested folders, plus an empty file, a text file named .jpg, a truncated JPEG."""
    root = tmp_path_factory.mktemp("mixed")
    (root / "sub" / "deeper").mkdir(parents=True)
    photos = sorted((tiny_data / "test" / "cats").glob("*.jpg"))[:2] + sorted((tiny_data / "test" / "dogs").glob("*.jpg"))[:2]
    for i, p in enumerate(photos):
        (root / ("sub/deeper" if i % 2 else "sub") / f"ok_{i}_é.jpg").write_bytes(p.read_bytes())
    (root / "empty.png").write_bytes(b"")
    (root / "notes.jpg").write_text("not a picture")
    data = photos[0].read_bytes()
    (root / "sub" / "cut.jpg").write_bytes(data[: len(data) // 2])
    (root / "readme.txt").write_text("ignored: not an image extension")
    return root


def test_paths_bytes_pil_and_arrays_give_the_same_prediction(trained_runs, tiny_data):
    clf = Classifier.load(trained_runs["resnet"])
    path = sorted((tiny_data / "test" / "dogs").glob("*.jpg"))[0]
    pil = Image.open(path)
    inputs = [path, str(path), path.read_bytes(), pil, np.asarray(pil.convert("RGB"))]
    preds = clf.predict(inputs)
    assert len(preds) == 5 and len({json.dumps(p.to_dict(), sort_keys=True) for p in preds}) == 1
    assert clf.predict(path)[0] == preds[0], "a single image works without a list"
    assert set(preds[0].probabilities) == {"cats", "dogs"}
    assert sum(preds[0].probabilities.values()) == pytest.approx(1, abs=1e-5)


@pytest.mark.parametrize("name", ["seed", "resnet"])
def test_probabilities_are_the_models_with_its_tta(trained_runs, tiny_data, name):
    model, meta = load_checkpoint(trained_runs[name])
    paths = sorted((tiny_data / "test").rglob("*.jpg"))
    images = np.stack([decode_image(p, meta["image_size"]) for p in paths])
    expected = predict_probs(model, images, tta=meta["tta"]).numpy()
    got = np.array([p.probabilities["dogs"] for p in Classifier.load(trained_runs[name]).predict(paths)])
    np.testing.assert_allclose(got, expected, atol=1e-6)
    assert meta["tta"] == (name == "resnet")


def test_threshold_moves_the_decision(trained_runs, tiny_data):
    path = sorted((tiny_data / "test" / "cats").glob("*.jpg"))[0]
    p_dogs = Classifier.load(trained_runs["seed"]).predict(path)[0].probabilities["dogs"]
    assert Classifier.load(trained_runs["seed"], threshold=max(p_dogs - 0.01, 0.001)).predict(path)[0].label == "dogs"
    assert Classifier.load(trained_runs["seed"], threshold=min(p_dogs + 0.01, 0.999)).predict(path)[0].label == "cats"
    with pytest.raises(ValueError, match="threshold"):
        Classifier.load(trained_runs["seed"], threshold=1.5)


def test_unreadable_input_and_missing_model_are_clear_errors(trained_runs, tmp_path):
    clf = Classifier.load(trained_runs["seed"])
    with pytest.raises(SkipImage, match="not an image"):
        clf.predict(b"definitely not a picture")
    with pytest.raises(SkipImage, match=r"\(H, W"):
        clf.predict(np.zeros((4, 4, 2), np.uint8))
    with pytest.raises(ModelError, match="no model"):
        Classifier.load(tmp_path)


def test_cli_streams_files_folders_and_globs_reporting_unreadable_ones(trained_runs, mixed_folder, tiny_data):
    glob = str(tiny_data / "test" / "dogs" / "dog.1*.jpg")
    proc = run_cli("predict", str(trained_runs["resnet"]), str(mixed_folder), glob, str(mixed_folder / "missing.jpg"),
                   "--format", "csv", "--no-progress")
    rows = list(csv.DictReader(io.StringIO(proc.stdout)))
    by_name = {r["path"].rsplit("/", 1)[-1]: r for r in rows}
    assert len([n for n in by_name if n.startswith("ok_")]) == 4, "nested folders are walked"
    assert "readme.txt" not in by_name, "non-image extensions inside folders are ignored"
    assert {"dog.1.jpg"} <= set(by_name), "globs expand"
    assert "empty file" in by_name["empty.png"]["error"]
    assert "not an image" in by_name["notes.jpg"]["error"]
    assert "truncated" in by_name["cut.jpg"]["error"]
    assert "no such file" in by_name["missing.jpg"]["error"]
    for r in rows:
        if not r["error"]:
            assert r["class"] in ("cats", "dogs")
            assert float(r["p_cats"]) + float(r["p_dogs"]) == pytest.approx(1, abs=1e-5)
    assert "predicted 5 image(s), 4 unreadable" in proc.stderr


def test_cli_json_and_table_formats_and_out_file(trained_runs, mixed_folder, tmp_path):
    out = tmp_path / "rows" / "pred.json"
    proc = run_cli("predict", str(trained_runs["seed"]), str(mixed_folder), "--format", "json", "--out", str(out))
    rows = json.loads(out.read_text())
    assert proc.stdout == "" and len(rows) == 7
    assert sum(r["error"] is None for r in rows) == 4 and all(r["probabilities"] is None for r in rows if r["error"])
    assert not [p for p in out.parent.iterdir() if p.name != "pred.json"], "no temp file left"
    table = run_cli("predict", str(trained_runs["seed"]), str(mixed_folder)).stdout.splitlines()
    assert "P(cats)" in table[0] and len(table) == 8
    assert sum("unreadable" in line for line in table) == 3


def test_cli_exit_codes(trained_runs, mixed_folder, tmp_path, onnx_model):
    proc = run_cli("predict", str(trained_runs["seed"]), str(mixed_folder / "notes.jpg"), str(mixed_folder / "empty.png"),
                   "--format", "csv", check=False)
    assert proc.returncode == 1, "nothing readable"
    assert len(list(csv.DictReader(io.StringIO(proc.stdout)))) == 2, "the reasons are still written"
    for args in (["predict", str(tmp_path / "no-run"), str(mixed_folder)],
                 ["predict", str(trained_runs["seed"]), str(mixed_folder), "--threshold", "2"],
                 ["predict", str(trained_runs["seed"]), str(mixed_folder), "--out", str(tmp_path)],
                 ["predict", onnx_model, str(mixed_folder), "--bf16"]):
        proc = run_cli(*args, check=False)
        assert proc.returncode == 2 and proc.stderr.startswith("catdog: error:"), proc.stderr
        assert "Traceback" not in proc.stderr


def test_cli_cam_writes_overlays(trained_runs, mixed_folder, tmp_path, onnx_model):
    cams = tmp_path / "cams"
    proc = run_cli("predict", str(trained_runs["resnet"]), str(mixed_folder), "--format", "csv", "--cam", str(cams))
    rows = [r for r in csv.DictReader(io.StringIO(proc.stdout)) if not r["error"]]
    assert len(rows) == 4 and len(list(cams.iterdir())) == 4
    for r in rows:
        src, cam = Image.open(r["path"]), Image.open(r["cam"])
        assert cam.format == "PNG" and cam.size == src.size, "overlay at the photo's size (small photos kept)"
        assert np.asarray(cam).std() > 5, "not a flat image"
    proc = run_cli("predict", onnx_model, str(mixed_folder), "--cam", str(tmp_path / "c2"), check=False)
    assert proc.returncode == 2 and "PyTorch checkpoint" in proc.stderr


BLOCK_TORCH = textwrap.dedent("""
    import importlib.abc, sys

    class NoTorch(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "torchcam", "torchvision"):
                raise ImportError(f"{name} is blocked in this test")

    sys.meta_path.insert(0, NoTorch())
    from catdog.cli import main
    rc = main(sys.argv[1:])
    loaded = sorted(m for m in sys.modules if m.split(".")[0] == "torch")
    print("TORCH_MODULES", loaded, file=sys.stderr)
    sys.exit(rc if not loaded else 99)
""")


def test_onnx_predict_never_imports_torch(onnx_model, trained_runs, mixed_folder, tmp_path):
    out = tmp_path / "onnx.json"
    proc = subprocess.run([sys.executable, "-c", BLOCK_TORCH, "predict", onnx_model, str(mixed_folder), "--format",
                           "json", "--out", str(out), "--no-progress"], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert "TORCH_MODULES []" in proc.stderr
    rows = {r["path"]: r for r in json.loads(out.read_text()) if r["error"] is None}
    torch_clf = Classifier.load(trained_runs["resnet"])
    for path, row in rows.items():
        assert row["probabilities"]["dogs"] == pytest.approx(torch_clf.predict(path)[0].probabilities["dogs"], abs=1e-5)
    # errors are reported the same way without torch
    proc = subprocess.run([sys.executable, "-c", BLOCK_TORCH, "predict", str(tmp_path / "x.onnx"), "a.jpg"],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2 and "catdog: error: model not found" in proc.stderr


MEASURE_RSS = textwrap.dedent("""
    import resource, sys
    from catdog.cli import main
    rc = main(sys.argv[1:])
    print("MAXRSS_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)
    sys.exit(rc)
""")


def _tiny_pngs(root, n: int, per_folder: int = 1000) -> None:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(buf, "PNG")
    for i in range(n):
        d = root / f"part{i // per_folder:03d}"
        if i % per_folder == 0:
            d.mkdir(parents=True)
        (d / f"{i:06d}.png").write_bytes(buf.getvalue())


def test_memory_stays_flat_as_the_file_count_grows(onnx_model, tmp_path):
    peaks = {}
    for n in (1000, 8000):
        _tiny_pngs(tmp_path / str(n), n)
        out = tmp_path / f"{n}.csv"
        proc = subprocess.run([sys.executable, "-c", MEASURE_RSS, "predict", onnx_model, str(tmp_path / str(n)),
                               "--format", "csv", "--out", str(out), "--no-progress"],
                              capture_output=True, text=True, cwd=REPO)
        assert proc.returncode == 0, proc.stderr
        assert sum(1 for _ in open(out)) == n + 1
        peaks[n] = int(proc.stderr.split("MAXRSS_KB")[1].split()[0])
    # measured here: +2 MB streamed; keeping the decoded 32x32 images of 7000 more files would add 21 MB
    # (keeping just the rows adds ~4 MB, which the laziness test below catches exactly)
    assert peaks[8000] - peaks[1000] < 8 * 1024, peaks


def test_predict_stream_reads_one_chunk_ahead_of_the_rows_at_most(trained_runs, tiny_data):
    clf = Classifier.load(trained_runs["seed"])
    path = str(sorted((tiny_data / "test" / "cats").glob("*.jpg"))[0])
    consumed = []

    def endless():
        while True:
            consumed.append(1)
            yield path, None

    rows = predict_stream(clf, endless(), chunk=16)
    first = [next(rows) for _ in range(20)]
    assert len(consumed) == 48, "rows 17-20 come from the second chunk of 16 while the third decodes, no more"
    assert all(r["class"] == first[0]["class"] and r["error"] is None for r in first)


@pytest.mark.parametrize("name", ["seed", "resnet"])
def test_bf16_predictions_stay_close_to_float32(trained_runs, tiny_data, name, tmp_path):
    paths = sorted((tiny_data / "test").rglob("*.jpg"))
    fp32 = Classifier.load(trained_runs[name])
    bf16 = Classifier.load(trained_runs[name], bf16=True)
    assert (fp32.info()["precision"], bf16.info()["precision"]) == ("float32", "bfloat16")
    a = np.array([p.probabilities["dogs"] for p in fp32.predict(paths)])
    b = np.array([p.probabilities["dogs"] for p in bf16.predict(paths)])
    assert not np.array_equal(a, b), "the forward pass really ran in bf16"
    np.testing.assert_allclose(b, a, atol=2e-2)
    out = tmp_path / "p.csv"
    run_cli("predict", str(trained_runs[name]), str(tiny_data / "test"), "--bf16", "--format", "csv", "--out", str(out),
            "--no-cache")
    cli = {Path(r["path"]).name: float(r["p_dogs"]) for r in csv.DictReader(open(out))}
    assert np.allclose([cli[p.name] for p in paths], b, atol=1e-6), "the CLI's --bf16 is the API's"


def test_predict_stream_scores_on_spare_cores_while_decoding_and_restores_threads(trained_runs, tiny_data, tmp_path):
    import torch

    from catdog.store import DecodeStore

    clf = Classifier.load(trained_runs["seed"])
    before = torch.get_num_threads()
    calls = []
    limit = clf.runner.limit_threads
    clf.runner.limit_threads = lambda n: (calls.append(n), limit(n))
    paths = [(str(p), None) for p in sorted((tiny_data / "test").rglob("*.jpg"))]
    parts = -(-len(paths) // 4)
    assert parts >= 3
    store = DecodeStore(clf.image_size, path=tmp_path / "d.sqlite")
    cold = list(predict_stream(clf, iter(paths), chunk=4, threads=2, store=store))
    spare = max(1, (os.cpu_count() or 1) // 2)
    # the last call restores the thread count
    assert calls == [spare] * (parts - 1) + [None, None], "limited while the next part decodes, not for the last"
    calls.clear()
    warm = list(predict_stream(clf, iter(paths), chunk=4, threads=2, store=store))
    assert calls == [None] * (parts + 1), "parts read from the store need no decoding"
    assert torch.get_num_threads() == before
    assert [r["probabilities"] for r in cold] == [r["probabilities"] for r in warm]


def test_cams_explain_the_class_decided_with_tta_and_threshold(trained_runs, tiny_data):
    from catdog.augment import to_tensor
    from catdog.explain import compute_cams

    run = trained_runs["resnet"]
    path = sorted((tiny_data / "test" / "cats").glob("*.jpg"))[0]
    p_dogs = Classifier.load(run).predict(path)[0].probabilities["dogs"]
    says_dogs = Classifier.load(run, threshold=max(p_dogs - 0.01, 0.001))
    says_cats = Classifier.load(run, threshold=min(p_dogs + 0.01, 0.999))
    x = says_dogs.decode(path)[None]
    model = says_dogs.runner.model
    for clf, idx in ((says_dogs, 1), (says_cats, 0)):
        assert clf.predict(path)[0].label == ["cats", "dogs"][idx]
        expected = compute_cams(model, to_tensor(x.copy()), class_idx=[idx])[0]
        np.testing.assert_allclose(clf.cams(x), expected, atol=1e-6)
    assert not np.allclose(says_dogs.cams(x), says_cats.cams(x)), "the two classes have different evidence"
