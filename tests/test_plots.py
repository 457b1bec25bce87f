"""Every plot renders to a valid PNG of a sensible size, with something drawn on it."""
import numpy as np
import pytest
from matplotlib.colors import to_rgb
from PIL import Image

from catdog import plots

CLASSES = ["cats", "dogs"]
RNG = np.random.default_rng(0)
Y = np.array([0] * 20 + [1] * 20)
P = np.clip(Y * 0.4 + RNG.random(40) * 0.6, 0, 1)
IMAGES = [RNG.integers(0, 255, (40 + i, 32, 3), dtype=np.uint8) for i in range(6)]

FIGURES = {
    "curves": lambda: plots.training_curves([1, 2, 3], [0.7, 0.6, 0.5], [0.69, 0.65, float("nan")],
                                            [0.5, 0.6, 0.7], [0.55, 0.6, float("nan")]),
    "confusion": lambda: plots.confusion_matrices([[15, 5], [3, 17]], CLASSES),
    "roc": lambda: plots.roc_curve(Y, P, CLASSES),
    "pr": lambda: plots.pr_curve(Y, P, CLASSES),
    "histogram": lambda: plots.probability_histogram(Y, P, CLASSES, 0.5, 0.42),
    "samples": lambda: plots.prediction_grid(IMAGES, Y[:6], P[:6], CLASSES, cols=4),
    "gallery": lambda: plots.cam_gallery(IMAGES[:3], IMAGES[3:], ["a", "b", "c"], [True, False, None], "title"),
}


@pytest.mark.parametrize("name", sorted(FIGURES))
def test_plot_is_a_valid_png_with_content(name, tmp_path):
    path = plots.save_png(FIGURES[name](), tmp_path / "sub" / f"{name}.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        w, h = img.size
        assert 300 <= w <= 2500 and 200 <= h <= 2500, img.size
        gray = np.asarray(img.convert("L"))
    assert (gray < 200).mean() > 0.01, "more than a blank canvas"
    assert [p.name for p in path.parent.iterdir()] == [f"{name}.png"], "no temp file left behind"


def test_confusion_matrix_shows_class_names_and_counts():
    fig = plots.confusion_matrices([[15, 5], [3, 17]], CLASSES)
    texts = {t.get_text() for ax in fig.axes for t in ax.texts}
    ticks = {t.get_text() for ax in fig.axes for t in ax.get_xticklabels()}
    assert {"15", "5", "3", "17", "75.0%", "85.0%"} <= texts and ticks == set(CLASSES)


def test_sample_grid_frames_right_green_and_wrong_red():
    labels, probs = np.array([0, 1]), np.array([0.2, 0.3])  # the first right (cats), the second wrong
    fig = plots.prediction_grid(IMAGES[:2], labels, probs, CLASSES, cols=2)
    colours = [ax.spines["top"].get_edgecolor()[:3] for ax in fig.axes[:2]]
    assert np.allclose(colours[0], to_rgb(plots.RIGHT)) and np.allclose(colours[1], to_rgb(plots.WRONG))
    assert fig.axes[0].get_title().startswith("cats 80%") and fig.axes[1].get_title().startswith("cats 70%")


def test_training_curves_mark_the_checkpoint_epoch_and_drop_markers_on_long_runs():
    n = 60
    epochs, falling = list(range(1, n + 1)), list(np.linspace(0.7, 0.3, n))
    fig = plots.training_curves(epochs, falling, falling, falling, falling, marked_epoch=42, marked_label="best.pt")
    for ax in fig.axes:
        labels = [line.get_label() for line in ax.get_lines()]
        assert "best.pt (epoch 42)" in labels
        marker = next(line for line in ax.get_lines() if line.get_label() == "best.pt (epoch 42)")
        assert list(marker.get_xdata()) == [42, 42]
        curves = [line for line in ax.get_lines() if line.get_label().startswith(("train", "validation"))]
        assert len(curves) == 2 and all(line.get_marker() in ("None", "", None) for line in curves)
    short = plots.training_curves([1, 2, 3], [0.7, 0.6, 0.5], [0.69, 0.65, 0.6], [0.5, 0.6, 0.7], [0.5, 0.6, 0.7])
    assert all(line.get_marker() in ("o", "s") for ax in short.axes for line in ax.get_lines())


def test_dollar_signs_in_names_are_shown_as_written(tmp_path):
    captions = ["cat$}$.jpg\ncats 80%", "a $x^2$ dog.jpg", "plain.jpg"]
    fig = plots.cam_gallery(IMAGES[:3], IMAGES[3:], captions, [True, False, None], "title $")
    plots.save_png(fig, tmp_path / "gallery.png")  # a formula parser would fail on the first caption
    titles = [ax.get_title() for ax in fig.axes]
    assert "cat$}$.jpg\ncats 80%" in titles and all(not t.get_parse_math() for ax in fig.axes for t in [ax.title])
    grid = plots.prediction_grid(IMAGES[:2], Y[:2], P[:2], ["c$a$ts", "d$}$gs"], cols=2)
    plots.save_png(grid, tmp_path / "grid.png")
    assert not [t for ax in grid.axes for t in [ax.title, *ax.texts] if t.get_parse_math()]
    for fig in (plots.confusion_matrices([[1, 2], [3, 4]], ["c$a$ts", "d$}$gs"]),
                plots.roc_curve(Y, P, ["c$a$ts", "d$}$gs"]), plots.probability_histogram(Y, P, ["c$}$", "d"])):
        plots.save_png(fig, tmp_path / "f.png")
