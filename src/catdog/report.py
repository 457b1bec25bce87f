"""One self-contained HTML report per run: config, data, training curves, metrics, plots, predictions, CAMs.

`evaluate_run` evaluates a run's test split and writes metrics, predictions, plots (plots/*.png) and report.html;
`render_report` builds the HTML from the run folder's files alone, images embedded as base64 data URIs.
"""
from __future__ import annotations

import base64
import csv
import html
import json
from pathlib import Path

import numpy as np

from catdog import fileio, plots
from catdog.config import scaled_size
from catdog.train import RunError

METHOD_NAMES = {"gradcam": "Grad-CAM", "gradcampp": "Grad-CAM++", "layercam": "LayerCAM", "scorecam": "Score-CAM",
                "cam": "CAM"}
PLOTS = [  # file in plots/, heading, what it shows
    ("curves.png", "Training curves", "Loss and accuracy per epoch on the training and validation splits; the dashed "
                                      "line marks the epoch of the evaluated checkpoint."),
    ("confusion.png", "Confusion matrix", "Rows: true class; columns: predicted class (threshold 0.5)."),
    ("roc.png", "ROC curve", "True vs false positive rate over all thresholds; the diagonal is chance."),
    ("pr.png", "Precision-recall curve", "Precision vs recall over all thresholds; the dashed line is the base rate."),
    ("histogram.png", "Predicted probabilities", "How confident the model is, per true class, with the threshold(s)."),
    ("samples.png", "Sample predictions", "A fixed random sample of test images: green right, red wrong."),
    ("cams.png", "Class activation maps", "Where the model looks (Grad-CAM for the predicted class) on sample test images."),
    ("mistakes.png", "Worst mistakes", "The wrong predictions with the highest loss, with their class activation maps."),
]


# --- evaluation, files and plots --------------------------------------------------------------------------

def has_test_split(data: str | Path) -> bool:
    """True when the dataset has a separate DATA/test folder to evaluate on."""
    return Path(data, "test").is_dir()


def _read_history(run: Path) -> list[dict]:
    path = run / "history.csv"
    return list(csv.DictReader(path.open(encoding="utf-8"))) if path.exists() else []


def _float(v) -> float:
    return float(v) if v not in ("", None) else float("nan")


def write_plots(run: str | Path, result: dict, n_samples: int = 18, n_cams: int = 6, n_mistakes: int = 6,
                method: str = "gradcam") -> list[Path]:
    """Every evaluation plot of `result` (from evaluate(..., with_arrays=True)) into RUN/plots/."""
    from catdog.explain import CamUnavailable, cams_for_images, display_image, overlay
    from catdog.model import load_checkpoint

    run, out = Path(run), Path(run) / "plots"
    ds, probs, classes = result["_set"], result["_probs"], result["classes"]
    y = ds.labels
    val_t = result["val_threshold"]["threshold"]
    written = []
    history = _read_history(run)
    model, meta = load_checkpoint(result["checkpoint"])
    if history:
        col = lambda k: [_float(r[k]) for r in history]
        epoch = meta.get("epoch")  # the evaluated checkpoint's epoch (best.pt: the best on validation)
        marked = int(epoch) if isinstance(epoch, int) and epoch >= 1 and epoch in col("epoch") else None
        written.append(plots.save_png(plots.training_curves(col("epoch"), col("train_loss"), col("val_loss"),
                                                            col("train_acc"), col("val_acc"), marked,
                                                            Path(result["checkpoint"]).name), out / "curves.png"))
    written.append(plots.save_png(plots.confusion_matrices(result["confusion_matrix"], classes), out / "confusion.png"))
    if result["roc_auc"] is not None:
        written.append(plots.save_png(plots.roc_curve(y, probs, classes), out / "roc.png"))
        written.append(plots.save_png(plots.pr_curve(y, probs, classes), out / "pr.png"))
    written.append(plots.save_png(plots.probability_histogram(y, probs, classes, 0.5, val_t), out / "histogram.png"))

    # a fixed sample (seeded, so reports of the same run agree), shown at a readable size from the files
    rng = np.random.default_rng(0)
    sample = np.sort(rng.permutation(len(y))[:n_samples])
    shown = [display_image(ds.paths[i], 192) for i in sample]
    written.append(plots.save_png(plots.prediction_grid(shown, y[sample], probs[sample], classes), out / "samples.png"))

    per_class = [rng.permutation(np.flatnonzero(y == c))[:n_cams // 2] for c in range(len(classes))]
    picks = {"cams.png": (np.sort(np.concatenate(per_class)), "Class activation maps (Grad-CAM) on sample test images"),
             "mistakes.png": (np.argsort(-_losses(y, probs))[:min(n_mistakes, int(((probs > 0.5) != y).sum()))],
                              "Worst mistakes (highest loss) and where the model looked")}
    for name, (idx, title) in picks.items():
        if len(idx) == 0:
            continue
        try:
            cams, _, explained = cams_for_images(model, ds.images[idx], method)
        except CamUnavailable:
            continue
        images = [display_image(ds.paths[i], 192) for i in idx]
        overlays = [overlay(img, cam) for img, cam in zip(images, cams)]
        captions = [f"{Path(ds.paths[i]).name}\n{classes[int(probs[i] > 0.5)]} {max(probs[i], 1 - probs[i]):.0%}"
                    f" (true: {classes[y[i]]})" for i in idx]
        oks = [bool((probs[i] > 0.5) == y[i]) for i in idx]
        map_captions = [f"{METHOD_NAMES.get(method, method)}: evidence for {classes[k]}" for k in explained]
        written.append(plots.save_png(plots.cam_gallery(images, overlays, captions, oks, title, cols=3,
                                                        map_captions=map_captions), out / name))
    return written


def _losses(y: np.ndarray, probs: np.ndarray) -> np.ndarray:
    p_true = np.clip(np.where(y == 1, probs, 1 - probs), 1e-7, 1 - 1e-7)
    return -np.log(p_true)


def evaluate_run(run: str | Path, workers: int = 0, progress: bool = False, device: str = "auto") -> dict:
    """Evaluate a run folder on its test split; write results.json, metrics.json, the CSVs, plots and report.html."""
    from catdog.evaluate import evaluate, write_evaluation

    run = Path(run)
    if not run.is_dir():
        raise RunError(f"run folder not found: {run}")
    result = evaluate(run, None, workers=workers, progress=progress, with_arrays=True, device=device)
    public = {k: v for k, v in result.items() if not k.startswith("_")}
    try:
        fileio.write_text(run / "results.json", json.dumps(public, indent=2))
        write_evaluation(run, result)
        write_plots(run, result)
        write_report(run)
    except OSError as e:  # a read-only or full run folder: the metrics are still worth showing
        public["not_saved"] = f"cannot write to {run} ({e.strerror or e}): these results were not saved"
    return public


# --- the HTML ---------------------------------------------------------------------------------------------

CSS = """
body{font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1d2733;background:#f4f6f9}
header{background:#1f3a5f;color:#fff;padding:24px 40px}
header h1{margin:0 0 4px;font-size:28px} header p{margin:0;opacity:.85}
.cards{display:flex;gap:16px;flex-wrap:wrap;margin-top:18px}
.card{background:rgba(255,255,255,.12);border-radius:8px;padding:10px 18px;min-width:130px}
.card b{display:block;font-size:30px;line-height:1.2} .card span{font-size:13px;opacity:.85}
nav{padding:10px 40px;background:#fff;border-bottom:1px solid #dde3ea;position:sticky;top:0}
nav a{margin-right:16px;color:#1f3a5f;text-decoration:none;font-weight:600}
main{padding:10px 40px 40px;max-width:1200px}
section{background:#fff;border-radius:8px;padding:8px 24px 20px;margin:18px 0;box-shadow:0 1px 3px rgba(0,0,0,.08)}
h2{border-bottom:2px solid #e6ebf1;padding-bottom:4px} h3{margin-bottom:6px}
table{border-collapse:collapse;margin:8px 0} td,th{border:1px solid #dde3ea;padding:4px 10px;text-align:left}
th{background:#f0f3f7} td.n{text-align:right;font-variant-numeric:tabular-nums}
img{max-width:100%;height:auto;display:block;margin:8px 0} .note{color:#5b6673;font-size:14px}
.grid{display:flex;gap:24px;flex-wrap:wrap} .grid figure{margin:0} code{background:#f0f3f7;padding:0 4px}
"""


def _e(v) -> str:
    return html.escape(str(v))


def _num(v, pct: bool = False) -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "–"
    return f"{v:.1%}" if pct else (f"{v:.4f}" if isinstance(v, float) else str(v))


def _numeric(v) -> bool:
    if isinstance(v, bool):
        return False
    try:
        float(str(v).rstrip("%"))
        return True
    except ValueError:
        return False


def _table(header: list, rows: list[list]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td{' class=n' if _numeric(c) else ''}>{_e(c)}</td>" for c in r) + "</tr>"
                   for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _img(path: Path, alt: str, width: int | None = None) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    w = f' style="width:{width}px"' if width else ""
    return f'<img src="data:image/png;base64,{data}" alt="{_e(alt)}"{w}>'


def load_json(path: Path) -> dict | None:
    """A run's JSON file, None when it is missing; a ValueError naming it when it is damaged."""
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is damaged ({e})") from None


def _metrics_section(m: dict) -> str:
    at = m.get("at_val_threshold")
    vt = m.get("val_threshold") or {}
    cols = ["metric", "threshold 0.5 (default)"] + ([f"threshold {at['threshold']:.3f} (chosen on validation)"] if at else [])
    rows = []
    for key, label, pct in (("accuracy", "accuracy", True), ("balanced_accuracy", "balanced accuracy", True),
                            ("loss", "log loss", False), ("roc_auc", "ROC AUC", False),
                            ("average_precision", "average precision", False)):
        rows.append([label, _num(m.get(key), pct)] + ([_num(at.get(key), pct)] if at else []))
    per = []
    sources = [("0.5", m)] + ([(f"{at['threshold']:.3f}", at)] if at else [])
    for name, src in sources:
        for c, v in src["per_class"].items():
            per.append([c, name, _num(v["precision"]), _num(v["recall"]), _num(v["f1"]), v["support"]])
    note = (f"Validation threshold: {vt['threshold']:.3f} — {vt['reason']}; validation accuracy "
            f"{_num(vt.get('val_accuracy_at_threshold'), True)} there vs {_num(vt.get('val_accuracy_at_0.5'), True)} "
            f"at 0.5, on {vt.get('n_val')} images." if vt.get("threshold") is not None
            else f"No validation threshold: {vt.get('reason', 'not computed')}.")
    return (f"<p class='note'>Test split <code>{_e(m['data'])}</code>, {m['n']} images; checkpoint "
            f"<code>{_e(Path(m.get('checkpoint', '')).name)}</code>. ROC AUC, average precision and log loss do "
            f"not depend on the threshold. {_e(note)}</p>" + _table(cols, rows)
            + "<h3>Per class</h3>" + _table(["class", "threshold", "precision", "recall", "F1", "support"], per))


def _dataset_section(data: dict | None, m: dict | None, skipped: list[dict]) -> str:
    if not data:
        return "<p class='note'>No data.json in this run.</p>"
    classes = data["classes"]
    test = {c: v["support"] for c, v in m["per_class"].items()} if m else {}
    rows = [[c, data["train"].get(c, 0), data["val"].get(c, 0), test.get(c, "–")] for c in classes]
    rows.append(["total", sum(data["train"].values()), sum(data["val"].values()), sum(test.values()) if test else "–"])
    out = f"<p>Dataset <code>{_e(data['root'])}</code>; classes: {_e(', '.join(classes))}.</p>"
    out += _table(["class", "train", "validation", "test"], rows)
    test_skipped = (m or {}).get("skipped", [])
    all_skipped = [("train", s) for s in skipped] + [("test", s) for s in test_skipped]
    if not all_skipped:
        return out + "<p class='note'>No file was skipped.</p>"
    shown = all_skipped[:50]
    out += f"<h3>Skipped files ({len(all_skipped)})</h3>"
    out += _table(["split", "file", "reason"], [[sp, s["path"], s["reason"]] for sp, s in shown])
    if len(all_skipped) > len(shown):
        out += f"<p class='note'>… and {len(all_skipped) - len(shown)} more in skipped.csv / metrics.json.</p>"
    return out


def render_report(run: str | Path) -> str:
    """The report of a run folder as one self-contained HTML string (no external resource)."""
    run = Path(run)
    cfg = load_json(run / "config.json") or {}
    data = load_json(run / "data.json")
    m = load_json(run / "metrics.json")
    skipped = list(csv.DictReader((run / "skipped.csv").open(encoding="utf-8"))) if (run / "skipped.csv").exists() else []
    history = _read_history(run)
    name = run.resolve().name

    cards = []
    if m:
        cards += [(_num(m["accuracy"], True), "test accuracy"), (_num(m["roc_auc"]), "test ROC AUC"),
                  (_num(m["average_precision"]), "average precision"), (str(m["n"]), "test images")]
    if history:
        cards.append((str(len(history)), "epochs trained"))
    card_html = "".join(f"<div class='card'><b>{_e(v)}</b><span>{_e(k)}</span></div>" for v, k in cards)
    epochs = cfg.get("epochs", "?")
    size = f"{cfg.get('image_size', '?')} px"
    if cfg.get("eval_scale", 1) != 1 and isinstance(cfg.get("image_size"), int):
        size += f" (evaluated at {scaled_size(cfg['image_size'], cfg['eval_scale'])} px)"
    subtitle = f"model {cfg.get('model', '?')} · {size} · {epochs} epoch{'' if epochs == 1 else 's'}"

    sections = []
    if m:
        sections.append(("metrics", "Test metrics", _metrics_section(m)))
    else:
        sections.append(("metrics", "Test metrics", "<p class='note'>This run has not been evaluated on a test split "
                         "(run <code>catdog evaluate RUN</code>).</p>"))
    sections.append(("data", "Dataset", _dataset_section(data, m, skipped)))
    plot_dir = run / "plots"
    figures = {f: (title, text) for f, title, text in PLOTS if (plot_dir / f).exists()}
    if "curves.png" in figures:
        table = _table(["epoch", "train loss", "train acc", "val loss", "val acc", "lr", "train px", "seconds"],
                       [[r["epoch"], r["train_loss"], r["train_acc"], r["val_loss"] or "–", r["val_acc"] or "–",
                         r["lr"], r.get("input_px") or "–", r["epoch_s"]] for r in history])
        sections.append(("curves", "Training curves", f"<p class='note'>{_e(figures['curves.png'][1])}</p>"
                         + _img(plot_dir / "curves.png", "training curves", 1000)
                         + f"<details><summary>history.csv</summary>{table}</details>"))
    evaluation = [(f, *figures[f]) for f in ("confusion.png", "roc.png", "pr.png", "histogram.png") if f in figures]
    if evaluation:
        body = "<div class='grid'>" + "".join(
            f"<figure><h3>{_e(t)}</h3><p class='note'>{_e(d)}</p>{_img(plot_dir / f, t)}</figure>"
            for f, t, d in evaluation) + "</div>"
        sections.append(("plots", "Evaluation plots", body))
    for f, anchor in (("samples.png", "samples"), ("cams.png", "cams"), ("mistakes.png", "mistakes")):
        title, text = next((t, d) for name, t, d in PLOTS if name == f)
        body = f"<p class='note'>{_e(text)}</p>" + _img(plot_dir / f, title, 1100) if f in figures else ""
        if f == "mistakes.png" and m:
            body += _mistakes_table(run, m)
        if body:
            sections.append((anchor, title, body))
    sections.append(("config", "Configuration", _table(["field", "value"], [[k, v] for k, v in cfg.items()])))

    nav = "".join(f"<a href='#{a}'>{_e(t)}</a>" for a, t, _ in sections)
    body = "".join(f"<section id='{a}'><h2>{_e(t)}</h2>{b}</section>" for a, t, b in sections)
    return ("<!doctype html><html lang='en'><head><meta charset='utf-8'>"
            "<meta name='viewport' content='width=device-width,initial-scale=1'>"
            f"<link rel='icon' href='data:,'><title>catdog report: {_e(name)}</title><style>{CSS}</style></head><body>"
            f"<header><h1>{_e(name)}</h1><p>{_e(subtitle)}</p><div class='cards'>{card_html}</div></header>"
            f"<nav>{nav}</nav><main>{body}<p class='note'>Files in this run folder: metrics.json, predictions.csv, "
            "mistakes.csv, history.csv, config.json, data.json, skipped.csv, plots/.</p></main></body></html>")


def _mistakes_table(run: Path, m: dict | None, limit: int = 20) -> str:
    path = run / "mistakes.csv"
    if not path.exists() or not m:
        return ""
    rows = list(csv.DictReader(path.open(encoding="utf-8")))
    if not rows:
        return "<p class='note'>No mistakes on the test split.</p>"
    p1 = f"prob_{m['classes'][1]}"
    table = _table(["file", "true", "predicted", f"P({m['classes'][1]})", "loss"],
                   [[Path(r["path"]).name, r["true"], r["predicted"], r[p1], r["loss"]] for r in rows[:limit]])
    return f"<h3>{len(rows)} mistakes (threshold 0.5), worst first</h3>{table}"


def write_report(run: str | Path) -> Path:
    """Write RUN/report.html atomically; returns its path."""
    path = Path(run) / "report.html"
    fileio.write_text(path, render_report(run))
    return path
