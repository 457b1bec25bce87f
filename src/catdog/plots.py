"""Evaluation plots: each function takes arrays and returns a matplotlib Figure; `save_png` writes one atomically.

Figures are built with the object-oriented API on the Agg canvas, never pyplot, so nothing global changes and no
display is needed.
"""
from __future__ import annotations

import functools
import io
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from sklearn import metrics as skm

from catdog import fileio

RIGHT, WRONG = "#1a9850", "#d73027"
TRAIN, VAL = "#3b6fb6", "#e08214"


def _plain_text(draw):
    """Draw with every text shown as written: file and class names may hold '$', which matplotlib would otherwise
    read as the start of a formula (and fail on, or typeset)."""
    @functools.wraps(draw)
    def wrapper(*args, **kwargs):
        with matplotlib.rc_context({"text.parse_math": False}):
            return draw(*args, **kwargs)
    return wrapper


def _figure(w: float, h: float) -> Figure:
    fig = Figure(figsize=(w, h), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def png_bytes(fig: Figure, dpi: int = 100) -> bytes:
    """The figure as PNG bytes."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, facecolor="white")
    return buf.getvalue()


def save_png(fig: Figure, path: str | Path, dpi: int = 100) -> Path:
    """Write the figure as a PNG, atomically."""
    fileio.write_bytes(path, png_bytes(fig, dpi))
    return Path(path)


@_plain_text
def training_curves(epochs, train_loss, val_loss, train_acc, val_acc, marked_epoch: int | None = None,
                    marked_label: str = "checkpoint") -> Figure:
    """Loss and accuracy per epoch, train vs validation (validation left out where it is missing/NaN); a dashed
    vertical line at marked_epoch (the epoch of the evaluated checkpoint), when given."""
    fig = _figure(10, 3.8)
    ax_loss, ax_acc = fig.subplots(1, 2)
    epochs = np.asarray(epochs)
    # a marker per epoch while they can be told apart; over long runs they would hide the lines
    few = len(epochs) <= 40
    style = dict(ms=4) if few else dict(lw=1.0)
    for ax, tr, va, name in ((ax_loss, train_loss, val_loss, "loss"), (ax_acc, train_acc, val_acc, "accuracy")):
        ax.plot(epochs, tr, "o-" if few else "-", color=TRAIN, label=f"train {name}", **style)
        va = np.asarray(va, dtype=float)
        if np.isfinite(va).any():
            ax.plot(epochs, va, "s-" if few else "-", color=VAL, label=f"validation {name}", **style)
        if marked_epoch is not None:
            ax.axvline(marked_epoch, color="0.35", ls="--", lw=1, label=f"{marked_label} (epoch {marked_epoch})")
        ax.set_xlabel("epoch")
        ax.set_ylabel(name)
        ax.set_title(f"{name.capitalize()} per epoch")
        ax.grid(alpha=0.3)
        ax.legend()
        if len(epochs) <= 20:  # few epochs: one tick each (a locator would add fractional ones)
            ax.set_xticks(epochs)
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if len(epochs):
            ax.set_xlim(epochs.min() - 0.5, epochs.max() + 0.5)
    return fig


@_plain_text
def confusion_matrices(cm, classes: list[str], threshold: float = 0.5) -> Figure:
    """The confusion matrix in counts and normalised per true class, side by side."""
    cm = np.asarray(cm, dtype=float)
    norm = np.divide(cm, cm.sum(1, keepdims=True), out=np.zeros_like(cm), where=cm.sum(1, keepdims=True) > 0)
    fig = _figure(9, 4)
    for ax, m, title, fmt in zip(fig.subplots(1, 2), (cm, norm), ("counts", "normalised per true class"),
                                 ("{:.0f}", "{:.1%}")):
        vmax = m.max() if m.max() > 0 else 1
        ax.imshow(m, cmap="Blues", vmin=0, vmax=vmax)
        for i in range(m.shape[0]):
            for j in range(m.shape[1]):
                ax.text(j, i, fmt.format(m[i, j]), ha="center", va="center", fontsize=13,
                        color="white" if m[i, j] > vmax / 2 else "black")
        ax.set_xticks(range(len(classes)), classes)
        ax.set_yticks(range(len(classes)), classes)
        ax.set_xlabel("predicted class")
        ax.set_ylabel("true class")
        ax.set_title(f"Confusion matrix, {title}")
    fig.suptitle(f"Predicted class = {classes[1]} when P({classes[1]}) > {threshold:.3g}", fontsize=10)
    return fig


@_plain_text
def roc_curve(labels, probs, classes: list[str]) -> Figure:
    """The ROC curve of P(classes[1]), with its AUC and the chance diagonal."""
    fig, ax = _square_axes()
    fpr, tpr, _ = skm.roc_curve(labels, probs)
    auc = skm.roc_auc_score(labels, probs)
    ax.plot(fpr, tpr, color=TRAIN, lw=2, label=f"model (AUC = {auc:.3f})")
    ax.plot([0, 1], [0, 1], "--", color="grey", label="chance (AUC = 0.5)")
    _unit_square(ax, f"false positive rate ({classes[0]} called {classes[1]})", f"true positive rate ({classes[1]} found)",
                 f"ROC curve, positive class: {classes[1]}", top=1.01, legend="lower right")
    return fig


def _square_axes():
    """The figure and axes of the ROC and precision-recall plots."""
    fig = _figure(5, 4.6)
    return fig, fig.subplots()


def _unit_square(ax, xlabel: str, ylabel: str, title: str, top: float, legend: str) -> None:
    """Labels, limits, grid and legend shared by the ROC and precision-recall plots."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, top)
    ax.set_aspect("equal")
    ax.grid(alpha=0.3)
    ax.legend(loc=legend)


@_plain_text
def pr_curve(labels, probs, classes: list[str]) -> Figure:
    """The precision-recall curve of P(classes[1]), with its average precision and the base rate."""
    fig, ax = _square_axes()
    precision, recall, _ = skm.precision_recall_curve(labels, probs)
    ap = skm.average_precision_score(labels, probs)
    base = float(np.mean(np.asarray(labels) == 1))
    ax.step(recall, precision, where="post", color=TRAIN, lw=2, label=f"model (AP = {ap:.3f})")
    ax.axhline(base, ls="--", color="grey", label=f"base rate ({base:.1%} {classes[1]})")
    _unit_square(ax, f"recall ({classes[1]})", f"precision ({classes[1]})",
                 f"Precision-recall curve, positive class: {classes[1]}", top=1.05, legend="lower left")
    return fig


@_plain_text
def probability_histogram(labels, probs, classes: list[str], threshold: float = 0.5,
                          val_threshold: float | None = None) -> Figure:
    """Histograms of P(classes[1]) per true class, with the threshold (and the validation one) marked."""
    fig = _figure(7, 4)
    ax = fig.subplots()
    labels, probs = np.asarray(labels), np.asarray(probs)
    bins = np.linspace(0, 1, 26)
    for i, (name, colour) in enumerate(zip(classes, (TRAIN, VAL))):
        ax.hist(probs[labels == i], bins=bins, alpha=0.6, color=colour, label=f"true {name} (n={int((labels == i).sum())})")
    ax.axvline(threshold, color="black", lw=1.5, label=f"threshold {threshold:.2f}")
    if val_threshold is not None and abs(val_threshold - threshold) > 1e-9:
        ax.axvline(val_threshold, color="black", lw=1.5, ls=":", label=f"validation threshold {val_threshold:.3f}")
    ax.set_xlabel(f"P({classes[1]})")
    ax.set_ylabel("images")
    ax.set_title(f"Predicted probability of {classes[1]}, per true class")
    ax.set_xlim(0, 1)
    ax.legend()
    return fig


def _label(ax, text: str, ok: bool | None) -> None:
    colour = "black" if ok is None else (RIGHT if ok else WRONG)
    ax.set_title(text, fontsize=9, color=colour)
    ax.set_xticks([])
    ax.set_yticks([])
    if ok is not None:
        for s in ax.spines.values():
            s.set_color(colour)
            s.set_linewidth(3)


@_plain_text
def prediction_grid(images: list, labels, probs, classes: list[str], threshold: float = 0.5, cols: int = 6) -> Figure:
    """Images with their predicted class and its probability, framed green when right, red when wrong."""
    n = len(images)
    rows = max(1, -(-n // cols))
    fig = _figure(2 * cols, 2.25 * rows)
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    for ax in axes[n:]:
        ax.axis("off")
    for ax, img, y, p in zip(axes, images, labels, probs):
        pred = int(p > threshold)
        ax.imshow(np.asarray(img))
        _label(ax, f"{classes[pred]} {max(p, 1 - p):.0%}\n(true: {classes[int(y)]})", pred == int(y))
    fig.suptitle(f"Sample predictions: green right, red wrong (threshold {threshold:.2f})")
    return fig


@_plain_text
def cam_gallery(images: list, overlays: list, captions: list[str], oks: list[bool | None], title: str,
                cols: int = 4, map_captions: list[str] | None = None) -> Figure:
    """Pairs of image and class-activation overlay, each pair captioned (green right, red wrong)."""
    map_captions = map_captions or ["class activation map"] * len(images)
    n = len(images)
    rows = max(1, -(-n // cols))
    fig = _figure(4.2 * cols, 2.5 * rows)
    axes = np.atleast_2d(fig.subplots(rows, 2 * cols))
    for ax in axes.ravel()[2 * n:]:
        ax.axis("off")
    for k, (img, ov, cap, ok, map_cap) in enumerate(zip(images, overlays, captions, oks, map_captions)):
        a, b = axes[k // cols, 2 * (k % cols)], axes[k // cols, 2 * (k % cols) + 1]
        a.imshow(np.asarray(img))
        b.imshow(np.asarray(ov))
        _label(a, cap, ok)
        _label(b, map_cap, None)
    fig.suptitle(title)
    return fig
