"""The run report: every file and plot written, one self-contained HTML page, rendered by a real browser."""
import json
import os
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image

from catdog.report import PLOTS, evaluate_run, render_report
from conftest import REPO, launch_chromium, run_cli


class _Refs(HTMLParser):
    """Every src/href attribute, and every tag, of a page."""

    def __init__(self):
        super().__init__()
        self.refs, self.tags = [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.refs += [(tag, k, v or "") for k, v in attrs if k in ("src", "href")]


@pytest.fixture(scope="module")
def evaluated_run(tiny_run, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("report") / "tiny & <run>"  # a name that must be escaped in the page
    shutil.copytree(tiny_run, run)
    evaluate_run(run, workers=1)
    return run


def test_evaluation_writes_every_file_and_plot(evaluated_run):
    names = {p.name for p in evaluated_run.iterdir()}
    assert {"metrics.json", "results.json", "predictions.csv", "mistakes.csv", "report.html"} <= names
    m = json.loads((evaluated_run / "metrics.json").read_text())
    expected = {f for f, _, _ in PLOTS} - ({"mistakes.png"} if m["accuracy"] == 1 else set())
    assert {p.name for p in (evaluated_run / "plots").iterdir()} == expected
    for png in (evaluated_run / "plots").iterdir():
        with Image.open(png) as img:
            assert img.format == "PNG" and min(img.size) >= 200


def test_report_is_self_contained_and_complete(evaluated_run):
    page = (evaluated_run / "report.html").read_text(encoding="utf-8")
    parser = _Refs()
    parser.feed(page)
    srcs = [v for tag, k, v in parser.refs if k == "src"]
    assert srcs and all(v.startswith("data:image/png;base64,") for v in srcs), "images are embedded"
    assert not [v for _, _, v in parser.refs if v.startswith(("http:", "https:", "//"))], "no external resource"
    assert "script" not in parser.tags and "url(" not in page
    assert len(srcs) == len(list((evaluated_run / "plots").iterdir())), "every plot is in the page"
    m = json.loads((evaluated_run / "metrics.json").read_text())
    for text in ("Test metrics", "Dataset", "Training curves", "Confusion matrix", "ROC curve", "Sample predictions",
                 "Class activation maps", "Configuration", f"{m['accuracy']:.1%}", "chosen on validation"):
        assert text in page, text
    assert "tiny &amp; &lt;run&gt;" in page and "<run>" not in page, "the run name is escaped"


def test_report_without_metrics_still_renders(tiny_run):
    page = render_report(tiny_run)  # trained, never evaluated
    assert "has not been evaluated" in page and "Configuration" in page


def test_report_and_evaluate_commands(tiny_run, tmp_path, capsys):
    from catdog.cli import main

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    proc = run_cli("report", str(run))  # no metrics.json yet: it evaluates first
    assert proc.stdout.strip() == str(run / "report.html") and (run / "plots" / "roc.png").exists()
    (run / "report.html").unlink()
    assert main(["evaluate", str(run), "--json"]) == 0 and (run / "report.html").exists()
    result = json.loads(capsys.readouterr().out)  # still exactly one JSON object on stdout
    assert {"n", "accuracy", "loss", "roc_auc", "skipped"} <= set(result), "the keys it always had"
    assert {"balanced_accuracy", "average_precision", "per_class", "confusion_matrix", "confusion_matrix_normalized",
            "val_threshold", "at_val_threshold", "threshold"} <= set(result)
    assert main(["report", str(tmp_path / "nothing")]) == 2
    assert capsys.readouterr().err.startswith("catdog: error: not a run folder")


def test_report_evaluate_says_when_there_is_no_test_split(tiny_run, tmp_path, capsys):
    from catdog.cli import main

    run, flat = tmp_path / "run", tmp_path / "flat"
    shutil.copytree(tiny_run, run)
    flat.mkdir()  # a folder-per-class set with no test/ folder
    cfg = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**cfg, "data": str(flat)}))
    assert main(["report", str(run), "--evaluate"]) == 0
    assert f"{flat} has no test split to evaluate" in capsys.readouterr().err
    assert (run / "report.html").exists() and not (run / "metrics.json").exists()


@pytest.mark.browser
def test_report_renders_in_chromium(evaluated_run):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = launch_chromium(p)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            errors, requests = [], []
            page.on("console", lambda msg: msg.type == "error" and errors.append(msg.text))
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.on("request", lambda req: requests.append(req.url))
            page.goto((evaluated_run / "report.html").as_uri(), wait_until="load")
            sizes = page.eval_on_selector_all("img", "imgs => imgs.map(i => [i.complete, i.naturalWidth, i.width])")
            assert sizes and all(done and natural > 0 and shown > 100 for done, natural, shown in sizes), sizes
            assert errors == []
            assert all(u.startswith(("file:", "data:")) for u in requests), requests
            assert page.title().startswith("catdog report")
            out = REPO / "test-artifacts" / "report.png"
            out.parent.mkdir(exist_ok=True)
            page.screenshot(path=str(out), full_page=True)
        finally:
            browser.close()
    with Image.open(out) as shot:
        assert shot.size[0] == 1280 and shot.size[1] > 2000, "the whole page, not just the first screen"


def test_report_lists_skipped_files(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    (run / "skipped.csv").write_text('path,reason\n/d/cats/<x>.jpg,"not an image (unrecognised format)"\n')
    page = render_report(run)
    assert "Skipped files (1)" in page and "/d/cats/&lt;x&gt;.jpg" in page and "not an image" in page
