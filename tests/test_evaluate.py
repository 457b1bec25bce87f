"""Metrics against hand-checked cases, the validation threshold, and the files an evaluation writes."""
import csv
import json
import math
import shutil

import numpy as np
import pytest
import torch

from catdog.evaluate import choose_threshold, compute_metrics, evaluate, write_evaluation
from catdog.train import RunError

# Six images, classes ["cats", "dogs"]; probs are P(dogs).
#   i      0    1    2    3    4    5
#   y      0    0    0    0    1    1
#   p     .1   .2   .3   .8   .4   .9
#   pred   0    0    0    1    0    1     (p > 0.5)
# TN = 3 (0, 1, 2), FP = 1 (3), FN = 1 (4), TP = 1 (5): confusion [[3, 1], [1, 1]]
Y = [0, 0, 0, 0, 1, 1]
P = [0.1, 0.2, 0.3, 0.8, 0.4, 0.9]
CLASSES = ["cats", "dogs"]


def test_metrics_match_the_hand_checked_case():
    m = compute_metrics(Y, P, 0.5, CLASSES)
    assert m["confusion_matrix"] == [[3, 1], [1, 1]]
    assert np.allclose(m["confusion_matrix_normalized"], [[3 / 4, 1 / 4], [1 / 2, 1 / 2]])
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["balanced_accuracy"] == pytest.approx((3 / 4 + 1 / 2) / 2)  # mean recall = 0.625
    # dogs: precision TP/(TP+FP) = 1/2, recall TP/(TP+FN) = 1/2, F1 = 1/2
    assert m["per_class"]["dogs"] == pytest.approx({"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2})
    # cats: precision TN/(TN+FN) = 3/4, recall TN/(TN+FP) = 3/4, F1 = 3/4
    assert m["per_class"]["cats"] == pytest.approx({"precision": 0.75, "recall": 0.75, "f1": 0.75, "support": 4})
    # AUC: of the 2 x 4 (dog, cat) pairs, 0.4 beats .1 .2 .3 but not .8; 0.9 beats all four: 7/8
    assert m["roc_auc"] == pytest.approx(7 / 8)
    # AP: ranked .9 (dog) .8 (cat) .4 (dog) ...: precision 1/1 at recall 1/2, 2/3 at recall 1
    assert m["average_precision"] == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    # log loss: the mean of -ln P(true class) = -ln of .9 .8 .7 .2 .4 .9
    assert m["loss"] == pytest.approx(-sum(map(math.log, [0.9, 0.8, 0.7, 0.2, 0.4, 0.9])) / 6)
    assert m["n"] == 6 and m["threshold"] == 0.5


def test_metrics_at_another_threshold():
    # at 0.35, image 4 (p = .4, a dog) becomes right: TN 3, FP 1, FN 0, TP 2
    m = compute_metrics(Y, P, 0.35, CLASSES)
    assert m["confusion_matrix"] == [[3, 1], [0, 2]] and m["accuracy"] == pytest.approx(5 / 6)
    assert m["per_class"]["dogs"]["recall"] == 1.0 and m["per_class"]["dogs"]["precision"] == pytest.approx(2 / 3)
    assert m["roc_auc"] == pytest.approx(7 / 8), "ranking metrics do not depend on the threshold"


def test_one_class_subset_has_no_auc_but_no_crash():
    m = compute_metrics([1, 1, 1], [0.2, 0.7, 0.9], 0.5, CLASSES)
    assert m["roc_auc"] is None and m["average_precision"] is None
    assert m["accuracy"] == pytest.approx(2 / 3) and m["confusion_matrix"] == [[0, 0], [1, 2]]
    assert m["per_class"]["cats"]["support"] == 0


def test_threshold_maximises_accuracy_ties_closest_to_half():
    # accuracy is 5/6 for t in [.3, .4) and in [.8, .9), 4/6 at 0.5: the midpoint .35 is closer to 0.5 than .85
    t, acc = choose_threshold(Y, P)
    assert t == pytest.approx(0.35) and acc == pytest.approx(5 / 6)
    # when 0.5 is among the best, it is kept exactly
    assert choose_threshold([0, 0, 1, 1], [0.1, 0.3, 0.7, 0.9]) == (0.5, 1.0)
    # all one class: a threshold below every probability calls everything class 1
    t, acc = choose_threshold([1, 1], [0.2, 0.3])
    assert t < 0.2 and acc == 1.0


def test_evaluate_reports_both_thresholds_and_writes_files(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    result = evaluate(run, with_arrays=True)
    assert result["n"] == 16 and set(result["per_class"]) == {"cats", "dogs"}
    val = result["val_threshold"]
    data = json.loads((run / "data.json").read_text())
    assert 0 < val["threshold"] < 1 and val["n_val"] == sum(data["val"].values()) == 4  # round(10 % of 24) per class
    # the split is the one training validated on: same accuracy at 0.5 as the checkpoint recorded
    assert val["val_accuracy_at_0.5"] == pytest.approx(torch.load(run / "best.pt", weights_only=False)["val_acc"], abs=1e-5)
    assert val["val_accuracy_at_threshold"] >= val["val_accuracy_at_0.5"]
    at = result["at_val_threshold"]
    assert at["threshold"] == val["threshold"]
    # the test metrics at the chosen threshold are what compute_metrics gives on the same probabilities
    again = compute_metrics(result["_set"].labels, result["_probs"], val["threshold"], CLASSES)
    assert at["accuracy"] == again["accuracy"] and at["confusion_matrix"] == again["confusion_matrix"]

    write_evaluation(run, result)
    saved = json.loads((run / "metrics.json").read_text())
    assert saved["accuracy"] == result["accuracy"] and "_probs" not in saved
    rows = list(csv.DictReader(open(run / "predictions.csv")))
    assert len(rows) == 16 and {"path", "true", "predicted", "prob_cats", "prob_dogs"} <= set(rows[0])
    assert all(abs(float(r["prob_cats"]) + float(r["prob_dogs"]) - 1) < 1e-5 for r in rows)
    assert sum(r["true"] == r["predicted"] for r in rows) == round(result["accuracy"] * 16)
    mistakes = list(csv.DictReader(open(run / "mistakes.csv")))
    assert len(mistakes) == 16 - round(result["accuracy"] * 16)
    losses = [float(r["loss"]) for r in mistakes]
    assert losses == sorted(losses, reverse=True), "worst first"


def test_no_validation_split_means_no_validation_threshold(tiny_run, tmp_path):
    ckpt = torch.load(tiny_run / "best.pt", weights_only=False)
    ckpt["config"]["val_fraction"] = 0.0
    torch.save(ckpt, tmp_path / "noval.pt")
    result = evaluate(tmp_path / "noval.pt")
    assert result["val_threshold"]["threshold"] is None and "no validation split" in result["val_threshold"]["reason"]
    assert result["at_val_threshold"] is None and result["accuracy"] is not None


def test_a_run_moved_from_its_training_data_still_evaluates(tiny_run, tiny_data, tmp_path):
    ckpt = torch.load(tiny_run / "best.pt", weights_only=False)
    ckpt["config"]["data"] = str(tmp_path / "gone")
    torch.save(ckpt, tmp_path / "moved.pt")
    result = evaluate(tmp_path / "moved.pt", tiny_data)
    assert result["n"] == 16 and result["val_threshold"]["threshold"] is None
    assert "cannot be read" in result["val_threshold"]["reason"]


def test_a_run_whose_data_has_no_test_split_is_not_scored_on_its_training_images(tiny_run, tiny_data, tmp_path):
    ckpt = torch.load(tiny_run / "best.pt", weights_only=False)
    ckpt["config"]["data"] = str(tiny_data / "train")  # DATA/<class>/...: no test/ folder under it
    torch.save(ckpt, tmp_path / "plain.pt")
    with pytest.raises(RunError, match="no test/ folder"):
        evaluate(tmp_path / "plain.pt")
    assert evaluate(tmp_path / "plain.pt", tiny_data / "test")["n"] == 16, "a folder given explicitly is used as is"
