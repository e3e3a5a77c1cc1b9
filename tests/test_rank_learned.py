"""Learned ranker: leave-one-target-out really excludes the target, a perfect metric is learned, missing
metrics are handled explicitly, the packaged table is current, and the registered ranker runs from the CLI."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from transferkit.errors import ConfigError, DataError
from transferkit.rank import learned_fit, learned_scores
from transferkit.features import Features
from transferkit.rank.learned import fit_weights, learned_rank, load_table, needed_metrics

ROOT = Path(__file__).resolve().parents[1]
MODELS = [f"m{i}" for i in range(7)]


def record(target, acc, scores, source="a.json", zoo="z"):
    return {"source": source, "zoo": zoo, "target": target, "models": MODELS, "scores": scores,
            "finetune": dict(zip(MODELS, acc)), "linear": dict(zip(MODELS, acc))}


def col(values):
    return dict(zip(MODELS, map(float, values)))


def test_leave_one_target_out_excludes_the_target_from_every_file():
    """Target T (stored in 3 result files) says metric A is right and B is noise; the 2 other targets say
    the opposite. Ranking T with T excluded must follow B and equal a fit on a table without any of T's
    records; a fit that kept T (or any one of its copies) gives A weight and other scores."""
    rng = np.random.default_rng(0)
    acc = rng.permutation(7) / 10
    recs = [record("T", acc, {"A": col(acc), "B": col(rng.normal(size=7))}, source=s) for s in ("a.json", "b.json", "c.json")]
    for t in ("U", "V"):
        a = rng.permutation(7) / 10
        recs.append(record(t, a, {"A": col(rng.normal(size=7)), "B": col(a)}))
    table = {"metrics": ["A", "B"], "records": recs}
    scores = {m: {"A": float(acc[i]), "B": float(-acc[i])} for i, m in enumerate(MODELS)}
    loo = learned_fit(scores, exclude_targets=("T",), table=table)
    assert loo["trained_on"] == ["a.json/z/U", "a.json/z/V"]
    assert loo["weights"]["A"] < 0.2 * loo["weights"]["B"]
    assert loo["ranking"] == sorted(MODELS, key=lambda m: acc[MODELS.index(m)])  # B's order: the worst first
    removed = learned_fit(scores, table={**table, "records": recs[3:]})
    assert loo["scores"] == removed["scores"] and loo["weights"] == removed["weights"]
    for kept in range(3):  # any single copy of T left in the fit changes it
        one = learned_fit(scores, table={**table, "records": [recs[kept], *recs[3:]]})
        assert one["weights"]["A"] > loo["weights"]["A"] + 0.1 and one["scores"] != loo["scores"]
    assert learned_fit(scores, table=table)["weights"]["A"] > 0.1  # all of T in: A weighted too


def test_weights_recover_the_perfect_metric_among_noise():
    rng = np.random.default_rng(1)
    recs = []
    for t in range(8):
        acc = rng.uniform(0.5, 0.9, 7)
        recs.append(record(f"t{t}", acc, {"perfect": col(np.log(acc) * 3 + t), "noise1": col(rng.normal(size=7)),
                                          "noise2": col(rng.normal(size=7))}))
    table = {"metrics": ["noise1", "noise2", "perfect"], "records": recs}
    w = fit_weights(recs, table["metrics"])
    assert w["perfect"] > 5 * max(w["noise1"], w["noise2"])
    acc = rng.uniform(0.5, 0.9, 7)  # a new target: the learned order is the true order
    scores = {m: {"perfect": float(a ** 2), "noise1": float(rng.normal()), "noise2": float(rng.normal())}
              for m, a in zip(MODELS, acc)}
    res = learned_fit(scores, table=table)
    assert res["ranking"] == sorted(MODELS, key=lambda m: -acc[MODELS.index(m)])
    assert set(learned_scores(scores, table=table)) == set(MODELS)


def test_missing_metric_is_skipped_and_the_weights_refitted():
    table = load_table()
    r = next(x for x in table["records"] if x["zoo"] == "image")
    full = {m: {j: sc[m] for j, sc in r["scores"].items()} for m in r["models"]}
    # LEEP missing (None / NaN) for some candidates, as for a model without a source head
    partial = {m: {**s, "leep": (float("nan") if i % 2 else s["leep"])} for i, (m, s) in enumerate(full.items())}
    partial[r["models"][0]].pop("leep")
    res = learned_fit(partial, exclude_targets=(r["target"],))
    assert "leep" not in res["used"] and "leep" not in res["weights"]
    assert any(s["metric"] == "leep" and "of 7 candidates" in s["reason"] for s in res["skipped"])
    without = learned_fit({m: {j: v for j, v in s.items() if j != "leep"} for m, s in full.items()},
                          exclude_targets=(r["target"],))
    assert res["scores"] == without["scores"]  # exactly the model fitted without LEEP: nothing imputed
    with_leep = learned_fit(full, exclude_targets=(r["target"],))
    assert with_leep["weights"]["leep"] > 0 and with_leep["scores"] != res["scores"]
    # text records carry no LEEP at all (no source head): training on them still works (x = 0 there)
    assert any("leep" not in x["scores"] for x in table["records"])
    # an unknown metric is reported, not used
    odd = learned_fit({m: {**s, "mystery": 1.0} for m, s in full.items()})
    assert {"metric": "mystery", "reason": "not in the learned ranker's training table"} in odd["skipped"]


def test_bad_input_is_a_one_line_error():
    with pytest.raises(ConfigError, match="none of the metrics it was trained on") as e:
        learned_scores({"a": {"mystery": 1.0}, "b": {"mystery": 2.0}})
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="no computed metric has a positive learned weight"):
        learned_scores({"a": {"transrate": 1.0}, "b": {"transrate": 2.0}})  # transrate's weight is 0
    with pytest.raises(DataError, match="at least 2 candidate"):
        learned_scores({"a": {"logme": 1.0}})
    with pytest.raises(ConfigError, match="unknown ground truth"):
        learned_scores({"a": {"logme": 1.0}, "b": {"logme": 2.0}}, ground_truth="oracle")


def test_packaged_table_is_current_and_records_its_sources():
    table = load_table()
    assert table["version"] == 1 and len(table["records"]) == 21
    assert {s["file"] for s in table["sources"]} == {f"benchmarks/results/{r['source']}" for r in table["records"]}
    assert all(s["command"] and len(s["sha256"]) == 64 for s in table["sources"])
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "learned_ranker_table.py"), "--check"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_needed_metrics_give_the_same_ranking_as_all_of_them():
    """learned_rank computes only the metrics with a positive weight; on features with and without source
    probabilities that gives the scores of computing every metric of the table."""
    rng = np.random.default_rng(0)
    n, c, d = 150, 3, 10
    y = np.arange(n) % c
    M, W = rng.normal(size=(c, d)), rng.normal(size=(c, 5))
    zoo = {}
    for i, s in enumerate((0.2, 0.6, 1.0, 1.6)):
        logits = 2 * s * W[y] + rng.normal(size=(n, 5))
        p = np.exp(logits - logits.max(1, keepdims=True))
        zoo[f"s{s}"] = Features(rng.normal(size=(n, d)) + s * M[y], y, p / p.sum(1, keepdims=True))
    assert {"leep", "linear_probe"} <= set(needed_metrics()) < set(load_table()["metrics"])
    for feats in (zoo, {m: Features(f.X, f.y) for m, f in zoo.items()}):
        few, every = learned_rank(feats), learned_rank(feats, metrics="all")
        assert few == pytest.approx(every, abs=1e-9)
    assert max(few, key=few.get) == "s1.6"  # the most separable candidate
    with pytest.raises(ConfigError, match="metrics must be"):
        learned_rank(zoo, metrics="logme,bogus")


@pytest.fixture
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TRANSFERKIT_CACHE", str(tmp_path / "cache"))


def test_cli_rank_with_learned(_cache, tiny_bert_dir, other_bert_dir, sentiment_csv):
    from _cli import bad, ok

    models = f"{tiny_bert_dir},{other_bert_dir}"
    res = ok(["rank", "--data", sentiment_csv, "--models", models, "--metrics", "logme,leep,learned", "--json"])
    doc = json.loads(res.stdout)
    assert doc["metrics"] == ["logme", "leep", "learned"]
    learned = {m: s["learned"] for m, s in doc["scores"].items()}
    assert all(v is not None for v in learned.values()) and len(set(learned.values())) == 2
    assert len(doc["ranking"]["learned"]) == 2
    assert "learned" in ok(["rank", "--list"]).stdout
    bad(["rank", "--data", sentiment_csv, "--models", models, "--metrics", "logme,learnd"], "learned")
