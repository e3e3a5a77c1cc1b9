"""distill: DistillNearest / DistillWeighted — the label budget, the documented weighting rule, the probe,
and that the source the rank metric prefers is the one distilled from."""

import numpy as np
import pytest
import torch
from test_distill_kd import digits, toy_zoo, trained_teacher

from transferkit.distill import Net, distill
from transferkit.distill.nearest import fit_probe, keep_labels, similarity_weights
from transferkit.errors import ConfigError


def test_keep_labels_keeps_the_budget_per_class_and_hides_the_rest():
    train, _ = digits()
    kept = keep_labels(train, 3, seed=0)
    assert np.bincount(kept.y[kept.labelled], minlength=10).tolist() == [3] * 10
    assert (kept.y[kept.labelled] == train.y[kept.labelled]).all() and (kept.y[~kept.labelled] == -1).all()
    assert keep_labels(train, None, 0) is train


def test_similarity_weights_are_a_softmax_of_standardised_scores():
    s = [0.1, 0.4, 0.2]
    z = (np.array(s) - np.mean(s)) / np.std(s)
    assert similarity_weights(s, 0.5) == pytest.approx(list(np.exp(z / 0.5) / np.exp(z / 0.5).sum()))
    # the metric's scale does not matter (z-scores), equal scores are uniform, a small τ is the nearest
    assert similarity_weights([10 * x - 3 for x in s], 0.5) == pytest.approx(similarity_weights(s, 0.5))
    assert similarity_weights([2.0, 2.0], 1.0) == [0.5, 0.5]
    assert similarity_weights(s, 1e-3) == pytest.approx([0, 1, 0], abs=1e-6)


@pytest.mark.parametrize("n_classes", [2, 4])
def test_probe_puts_each_class_in_its_own_row(n_classes):
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(n_classes), 20)
    X = rng.normal(size=(len(y), 5)) + 4 * np.eye(5)[y]
    head = fit_probe(X.astype(np.float32), y, n_classes)
    pred = head(torch.from_numpy(X.astype(np.float32))).argmax(-1).numpy()
    assert (pred == y).mean() > 0.95


def _pool(train):
    """A source whose features separate the digits (a trained net's backbone) and one with random features."""
    good = trained_teacher(train)
    return [Net("random", toy_zoo("random", hidden=32, seed=7), None, ["a", "b"]),
            Net("trained", good.zoo, None, ["x", "y"])]


def test_nearest_distils_from_the_source_the_metric_ranks_first(tmp_path, monkeypatch):
    monkeypatch.setenv("TRANSFERKIT_CACHE", str(tmp_path))
    train, test = digits(n=600)
    pool = _pool(train)
    student = Net("student", toy_zoo("student", hidden=16, seed=2), None, None)
    res = distill(pool, student, train, test, method="nearest", config={"epochs": 10, "lr": 1e-2, "labelled": 10})
    m = res.metrics
    assert m["scores"]["trained"] > m["scores"]["random"] and m["distilled_from"] == ["trained"]
    assert m["n_labelled"] == 100
    assert m["teacher_test_accuracy"]["trained"] > m["teacher_test_accuracy"]["random"]
    w = distill(pool, student, train, test, method="weighted",
                config={"epochs": 1, "labelled": 10, "tau": 0.5}).metrics
    assert w["distilled_from"] == ["random", "trained"]
    scores = [w["scores"]["random"], w["scores"]["trained"]]
    assert w["teacher_weights"] == pytest.approx(similarity_weights(scores, 0.5))


def test_nearest_needs_a_features_only_metric():
    train, test = digits()
    pool = [Net("random", toy_zoo("random"), None, None)]
    student = Net("student", toy_zoo("student"), None, None)
    with pytest.raises(ConfigError, match="features-only"):
        distill(pool, student, train, test, method="nearest", config={"metric": "leep", "epochs": 1})
