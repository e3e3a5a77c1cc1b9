"""rank/runner.py and rank/groundtruth.py on the tiny fixtures: candidates, layers, ensembles, ground truth."""

import csv
import json

import numpy as np
import pytest

from transferkit.errors import ConfigError, DataError, ModelError
from transferkit.rank import groundtruth as gt
from transferkit.rank.runner import (
    agreement,
    auto_layers,
    evaluation,
    parse_metrics,
    rank_models,
    resolve_layers,
)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TRANSFERKIT_CACHE", str(tmp_path / "cache"))


def test_parse_metrics_expands_all_auto_and_set_level():
    from transferkit.rank import METRICS
    from transferkit.rank.auto import DEFAULT_METRICS

    shown, per_model, set_level = parse_metrics("all,etran")
    assert shown == [*METRICS, "etran"] and per_model == list(METRICS) and set_level == ["etran"]
    shown, per_model, _ = parse_metrics("auto")
    assert shown == [*DEFAULT_METRICS, "auto"] and set(per_model) == set(DEFAULT_METRICS)
    shown, per_model, _ = parse_metrics(["logme", "auto"])
    assert shown == ["logme", "auto"] and set(per_model) == {"logme", *DEFAULT_METRICS}
    with pytest.raises(ConfigError, match="unknown metric"):
        parse_metrics("logme,nope")
    with pytest.raises(ConfigError, match="no metric"):
        parse_metrics(" , ")


def test_agreement_and_evaluation_on_known_cases():
    a = {"m1": 1.0, "m2": 2.0, "m3": 3.0}
    res = agreement({"x": a, "same": {k: 10 * v for k, v in a.items()}, "rev": {k: -v for k, v in a.items()},
                     "const": {k: 0.0 for k in a}, "one": {"m1": 1.0}})
    tau = res["kendall_tau"]
    assert tau["x"]["same"] == pytest.approx(1.0) and tau["x"]["rev"] == pytest.approx(-1.0)
    assert tau["x"]["const"] is None and tau["x"]["one"] is None and tau["same"]["x"] == tau["x"]["same"]
    assert res["mean"]["x"] == pytest.approx(0.0) and res["mean"]["one"] is None

    notes = []
    acc = {"m1": 0.5, "m2": 0.6, "m3": 0.9}
    ev = evaluation({"good": a, "bad": {k: -v for k, v in a.items()}, "lonely": {"m1": 1.0}}, acc, notes)
    assert ev["good"]["weighted_tau"] == pytest.approx(1.0) and ev["good"]["rel@1"] == 1.0 and ev["good"]["regret"] == 0
    assert ev["bad"]["weighted_tau"] == pytest.approx(-1.0) and ev["bad"]["selected"] == "m1"
    assert ev["bad"]["regret"] == pytest.approx(0.4) and ev["bad"]["rel@1"] == pytest.approx(0.5 / 0.9)
    assert "lonely" not in ev and any("lonely" in n for n in notes)


def test_rank_models_with_ground_truth_ensemble_and_outputs(tiny_bert_dir, other_bert_dir, sentiment_csv, tmp_path):
    models = [str(tiny_bert_dir), str(other_bert_dir)]
    out = tmp_path / "r"
    res = rank_models(sentiment_csv, models, "logme,hscore,etran,auto", ground_truth="linear", ensemble=2,
                      out_dir=out, progress=False)
    assert res["candidates"] == "models" and res["models"] == models
    assert res["metrics"] == ["logme", "hscore", "etran", "auto"]
    assert res["n"] + res["n_test"] == 80 and res["n_test"] == 24
    for m in models:
        assert all(isinstance(res["scores"][m][k], float) for k in ("logme", "hscore", "etran", "auto"))
    assert sorted(res["ranking"]["logme"]) == sorted(models)
    assert res["agreement"]["kendall_tau"]["logme"]["hscore"] in (-1.0, 1.0)
    acc = res["ground_truth"]["accuracy"]
    assert set(acc) == set(models) and all(0.0 <= v <= 1.0 for v in acc.values())
    assert set(res["evaluation"]) == {"logme", "hscore", "etran", "auto"}
    assert res["evaluation"]["logme"]["selected"] == res["ranking"]["logme"][0]
    ens = res["ensemble"]
    assert ens["k"] == 2 and sorted(ens["methods"]["osborn"]["selected"]) == sorted(models)
    assert 0 <= ens["methods"]["osborn"]["accuracy"] <= 1 and "best" in ens
    assert any("ms-leep skipped" in n for n in res["notes"])  # text models have no source head

    doc = json.loads((out / "ranking.json").read_text())
    assert doc["scores"] == res["scores"] and json.loads((out / "rank.json").read_text()) == doc
    rows = list(csv.DictReader((out / "ranking.csv").open()))
    assert [r["candidate"] for r in rows] == models
    assert float(rows[0]["logme"]) == pytest.approx(res["scores"][models[0]]["logme"])
    assert {r["logme_rank"] for r in rows} == {"1", "2"}
    assert float(rows[1]["measured_accuracy_linear"]) == pytest.approx(acc[models[1]])
    assert not list(out.glob(".*tmp"))  # atomic writes leave no temporaries
    # the ground truth's split is the one split function's, recorded: reloading it gives the scored/held-out parts
    from transferkit.data import load_dataset
    from transferkit.data.split import held_out, read_split

    split = read_split(out)
    assert split.test_sha256 == res["ground_truth"]["split"]["test_sha256"] and len(split.test_ids) == res["n_test"]
    train, test = held_out(split, sentiment_csv)
    assert len(train) == res["n"] and len(test) == res["n_test"]
    full = load_dataset(sentiment_csv)
    assert list(test.X) == [full.X[i] for i in split.test_ids]
    assert list(train.X) == [x for i, x in enumerate(full.X) if i not in set(split.test_ids)]


def test_ground_truth_is_cached_on_disk(tiny_bert_dir, sentiment_csv, monkeypatch):
    from transferkit.data import load_dataset, train_test_split

    train, test = train_test_split(load_dataset(sentiment_csv), test_size=0.3, seed=0)
    first = gt.measure(str(tiny_bert_dir), train, test, protocol="linear")
    assert first["cached"] is False and first["test_probs"].shape == (len(test), 2)
    assert first["selected"]["C"] in gt.LINEAR_CS and len(first["grid"]) == len(gt.LINEAR_CS)
    assert first["oracle_accuracy"] >= first["accuracy"]
    monkeypatch.setattr(gt, "_linear", lambda *a, **k: (_ for _ in ()).throw(AssertionError("recomputed")))
    again = gt.measure(str(tiny_bert_dir), train, test, protocol="linear")
    assert again["cached"] is True and again["accuracy"] == first["accuracy"]
    np.testing.assert_allclose(again["test_probs"], first["test_probs"], atol=1e-6)
    # a different grid is a different cache entry
    with pytest.raises(AssertionError, match="recomputed"):
        gt.measure(str(tiny_bert_dir), train, test, protocol="linear", cs=[1.0])


def test_finetune_ground_truth_uses_tune_full_and_caches(tiny_bert_dir, sentiment_csv, monkeypatch):
    import transferkit.tune as tune_pkg
    from transferkit.data import load_dataset, train_test_split

    train, test = train_test_split(load_dataset(sentiment_csv), test_size=0.3, seed=0)
    calls = []
    real = tune_pkg.tune

    def spy(*a, **k):
        calls.append(k["method"])
        return real(*a, **k)

    monkeypatch.setattr(tune_pkg, "tune", spy)
    res = gt.measure(str(tiny_bert_dir), train, test, protocol="finetune", config={"epochs": 1}, lrs=[1e-3, 1e-4])
    assert calls == ["full", "full"] and res["selected"]["lr"] in (1e-3, 1e-4)
    assert 0 <= res["accuracy"] <= 1 and res["test_probs"].shape == (len(test), 2)
    np.testing.assert_allclose(res["test_probs"].sum(1), 1.0, atol=1e-5)
    again = gt.measure(str(tiny_bert_dir), train, test, protocol="finetune", config={"epochs": 1}, lrs=[1e-3, 1e-4])
    assert again["cached"] and calls == ["full", "full"]
    (note,) = gt.grid_edge_notes({"m": res})  # a 2-value grid: the choice is always at an edge
    assert note.startswith("ground truth: 1 of 1 candidates chose the ") and "lr of the grid (0.0001, 0.001): m" in note
    with pytest.raises(ConfigError, match="unknown ground truth"):
        gt.measure(str(tiny_bert_dir), train, test, protocol="nope")
    with pytest.raises(ConfigError, match="layers"):
        gt.measure(str(tiny_bert_dir), train, test, protocol="finetune", tap="model.encoder.layer.0")


def test_grid_edge_notes_name_the_candidates_at_each_edge():
    def run(param, value, grid):
        return {"selected": {param: value}, "grid": [{param: g} for g in grid]}

    lrs = (3e-3, 1e-3, 3e-4)
    runs = {"a": run("lr", 3e-4, lrs), "b": run("lr", 1e-3, lrs), "c": run("lr", 3e-4, lrs), "d": run("lr", 3e-3, lrs),
            "e": run("C", 10.0, (0.1, 1.0, 10.0)), "f": run("lr", 1e-3, (1e-3,))}  # f: a 1-value grid, no edge
    notes = gt.grid_edge_notes(runs)
    assert len(notes) == 3
    assert "2 of 4 candidates chose the smallest lr of the grid (0.0003, 0.001, 0.003): a, c — the best setting " \
           "may lie below it; widen --lrs" in notes[0]
    assert "1 of 4 candidates chose the largest lr" in notes[1] and ": d —" in notes[1] and "above" in notes[1]
    assert "1 of 1 candidates chose the largest C (inverse L2 strength)" in notes[2] and ": e —" in notes[2]
    assert gt.grid_edge_notes({"b": runs["b"], "f": runs["f"]}) == []  # interior choice: nothing to say


def test_layers_rank_taps_of_one_model(tiny_bert_dir, sentiment_csv):
    from transferkit.zoo import load_model

    model = load_model(str(tiny_bert_dir))
    assert auto_layers(model) == ["model.encoder.layer.0", "model.encoder.layer.1", "penultimate"]
    assert resolve_layers(model, "auto") == auto_layers(model)
    assert resolve_layers(model, "model.embeddings, penultimate") == ["model.embeddings", "penultimate"]
    with pytest.raises(ModelError, match="unknown layer 'nope'"):
        resolve_layers(model, "nope")
    with pytest.raises(ConfigError, match="twice"):
        resolve_layers(model, "penultimate,penultimate")
    res = rank_models(sentiment_csv, [str(tiny_bert_dir)], "logme,hscore", layers="model.embeddings,model.encoder.layer.1",
                      ground_truth="linear", progress=False)
    assert res["candidates"] == "layers" and res["model"] == str(tiny_bert_dir)
    assert res["models"] == ["model.embeddings", "model.encoder.layer.1"]
    assert set(res["ground_truth"]["accuracy"]) == set(res["models"])
    # features at different taps differ, so the scores differ
    assert res["scores"]["model.embeddings"]["logme"] != res["scores"]["model.encoder.layer.1"]["logme"]


def test_runner_rejects_bad_combinations(tiny_bert_dir, other_bert_dir, sentiment_csv):
    one, two = [str(tiny_bert_dir)], [str(tiny_bert_dir), str(other_bert_dir)]
    with pytest.raises(ConfigError, match="one model"):
        rank_models(sentiment_csv, two, "logme", layers="auto", progress=False)
    with pytest.raises(ConfigError, match="finetune"):
        rank_models(sentiment_csv, one, "logme", layers="auto", ground_truth="finetune", progress=False)
    with pytest.raises(ConfigError, match="exceeds"):
        rank_models(sentiment_csv, two, "logme", ensemble=3, progress=False)
    with pytest.raises(ConfigError, match="positive"):
        rank_models(sentiment_csv, two, "logme", ensemble=0, progress=False)
    with pytest.raises(ConfigError, match="ground truth"):
        rank_models(sentiment_csv, two, "logme", ground_truth="oracle", progress=False)
    with pytest.raises(ModelError, match="twice"):
        rank_models(sentiment_csv, [str(tiny_bert_dir)] * 2, "logme", progress=False)
    with pytest.raises(DataError):
        rank_models(sentiment_csv.parent / "missing.csv", one, "logme", progress=False)
