"""Registry, score(), rank_features(), input validation and properties shared by every metric."""

import numpy as np
import pytest
import torch

from transferkit import registry
from transferkit.errors import ConfigError, DataError
from transferkit.features import Features
from transferkit.rank import METRICS, rank_features, resolve_metrics, score

EXPECTED = {"logme", "linear_probe", "leep", "nce", "nleep", "hscore", "shrinkage_hscore", "transrate", "gbc", "parc", "sfda", "tmi", "ped"}
# metrics whose value is a function of the source head's probabilities, not of the features
PROBS_METRICS = {"leep", "nce"}


def make(shift, n=240, d=16, c=4, seed=0):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % c
    rng.shuffle(y)
    M = np.random.default_rng(123).normal(size=(c, d))
    X = rng.normal(size=(n, d)) + shift * M[y]
    W = np.random.default_rng(7).normal(size=(c, 10))
    logits = 2.0 * shift * W[y] + rng.normal(size=(n, 10))
    p = np.exp(logits - logits.max(1, keepdims=True))
    return X, y, p / p.sum(1, keepdims=True)


def test_registry_contents_and_metadata():
    assert EXPECTED <= set(METRICS)
    for name, m in METRICS.items():
        assert m.name == name and m.citation and m.higher_is_better
        assert m.needs <= {"features", "probs"} and m.needs
    assert METRICS["leep"].needs == {"probs"} and METRICS["logme"].needs == {"features"}
    assert resolve_metrics("all") == list(METRICS)
    assert resolve_metrics("logme, leep,logme") == ["logme", "leep"]
    with pytest.raises(ConfigError, match="unknown metric 'nope'"):
        resolve_metrics(["nope"])


@pytest.mark.parametrize("name", sorted(EXPECTED - {"tmi"}))
def test_more_class_separation_scores_higher(name):
    """TMI is excluded on purpose: it measures within-class spread, which class shifts do not change
    (tested in test_rank_metrics.test_tmi_tracks_intra_class_variance_not_separation)."""
    vals = [METRICS[name](*make(s)[:2], probs=make(s)[2]) for s in (0.15, 0.6, 1.5)]
    assert vals[0] < vals[1] < vals[2], vals


@pytest.mark.parametrize("name", sorted(EXPECTED - {"linear_probe"}))
def test_label_relabelling_invariance(name):
    X, y, p = make(0.6)
    perm = np.array([2, 3, 1, 0])
    a = METRICS[name](X, y, probs=p)
    b = METRICS[name](X, 5 * perm[y] - 3, probs=p)  # permuted, non-contiguous ids
    assert b == pytest.approx(a, rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("name", sorted(EXPECTED - {"linear_probe", "nleep"}))
def test_sample_permutation_invariance(name):
    X, y, p = make(0.6)
    idx = np.random.default_rng(1).permutation(len(y))
    a = METRICS[name](X, y, probs=p)
    assert METRICS[name](X[idx], y[idx], probs=p[idx]) == pytest.approx(a, rel=1e-6, abs=1e-9)


def test_seeded_metrics_are_reproducible():
    X, y, _ = make(0.6)
    for name in ("nleep", "linear_probe", "parc"):
        assert METRICS[name](X, y, seed=3) == METRICS[name](X, y, seed=3)


def test_validation_errors_are_one_line_data_errors():
    X, y, p = make(0.6)
    cases = [
        (lambda: METRICS["logme"](X[:-1], y), "rows"),
        (lambda: METRICS["logme"](X, np.zeros_like(y)), "at least 2 classes"),
        (lambda: METRICS["hscore"](np.where(np.arange(X.size).reshape(X.shape) == 5, np.nan, X), y), "NaN"),
        (lambda: METRICS["leep"](X, y), "needs source-head probabilities"),
        (lambda: METRICS["leep"](X, y, probs=np.log(p)), "not logits"),
        (lambda: METRICS["leep"](X, y, probs=p[:-1]), "probs must be"),
        (lambda: METRICS["gbc"](X[:, 0], y), "2-D"),
        (lambda: METRICS["logme"](X, y + 0.5), "integer"),
        (lambda: METRICS["ped"](X, y, base="leep"), "base"),
    ]
    for fn, msg in cases:
        with pytest.raises(DataError, match=msg) as e:
            fn()
        assert "\n" not in str(e.value)


def test_torch_and_float32_inputs_accepted():
    X, y, p = make(0.6)
    a = METRICS["logme"](X, y)
    assert METRICS["logme"](torch.from_numpy(X), torch.from_numpy(y)) == pytest.approx(a)
    assert METRICS["logme"](X.astype(np.float32), y) == pytest.approx(a, rel=1e-5)


def test_score_and_rank_features_with_skips():
    feats = {}
    for model, s in (("weak", 0.15), ("mid", 0.6), ("strong", 1.5)):
        X, y, p = make(s)
        feats[model] = Features(X, y, probs=p, fingerprint={"model": model})
    X, y, _ = make(0.05)
    feats["noprobs"] = Features(X, y)
    assert score(feats["strong"], "logme") == pytest.approx(METRICS["logme"](feats["strong"].X, y), rel=1e-12)
    with pytest.raises(DataError, match="leep: needs source-head probabilities"):
        score(feats["noprobs"], "leep")
    out = rank_features(feats, ["logme", "leep", "hscore"])
    assert set(out) >= {"scores", "ranking", "time_s", "skipped", "metrics"}
    assert out["ranking"]["logme"] == ["strong", "mid", "weak", "noprobs"]
    assert out["ranking"]["leep"] == ["strong", "mid", "weak"]
    assert out["skipped"] == [{"model": "noprobs", "metric": "leep", "reason": out["skipped"][0]["reason"]}]
    assert "probabilities" in out["skipped"][0]["reason"]
    assert all(t >= 0 for t in out["time_s"]["hscore"].values()) and len(out["time_s"]["hscore"]) == 4
    assert out["metrics"]["leep"]["needs"] == ["probs"]


def test_rank_features_rejects_mismatched_targets_and_empty():
    X, y, _ = make(0.6)
    X2, y2, _ = make(0.6, seed=5)
    with pytest.raises(DataError, match="different target labels"):
        rank_features({"a": Features(X, y), "b": Features(X2, y2)}, ["logme"])
    with pytest.raises(DataError, match="no models"):
        rank_features({}, ["logme"])


def test_rank_features_records_metric_data_errors_as_skips():
    X, y, _ = make(0.6, n=40)
    out = rank_features({"a": Features(X, y)}, ["parc", "logme"], options={"parc": {"max_samples": 1}})
    assert "a" in out["scores"]["logme"] and "a" not in out["scores"]["parc"]
    assert out["skipped"][0]["metric"] == "parc"


def test_unlabelled_rows_are_refused_not_scored_as_a_class():
    """-1 marks an unlabelled item (Dataset/Features convention): a metric must not take it for a class."""
    import numpy as np
    import pytest

    from transferkit.errors import DataError
    from transferkit.rank import logme

    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(30, 4)), np.repeat([0, 1, -1], 10)
    with pytest.raises(DataError, match="unlabelled"):
        logme(X, y)
    assert np.isfinite(logme(X[y >= 0], y[y >= 0]))


def test_import_methods_registers_every_module_first_ones_first(tmp_path, monkeypatch):
    """A stage package's new method module registers by existing: no import line to add anywhere."""
    pkg = tmp_path / "toystage_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    for name in ("zeta", "alpha", "beta", "command", "_private"):
        (pkg / f"{name}.py").write_text(
            "from transferkit import registry\n"
            f"registry.register('toystage_pkg', '{name}', paper='p', summary='s', fn=lambda: None)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    registry.import_methods("toystage_pkg", [str(pkg)], first=("zeta",), skip=("command",))
    try:
        assert list(registry.methods("toystage_pkg")) == ["zeta", "alpha", "beta"]
    finally:
        registry._REGISTRY.pop("toystage_pkg", None)
