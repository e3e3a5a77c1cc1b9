"""`transferkit rank` end to end on the tiny fixtures: table, JSON, files, layers, ensembles, ground truth, errors."""

import csv
import json

import pytest
from typer.testing import CliRunner

from _cli import bad, ok
from transferkit.cli import app

runner = CliRunner()


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TRANSFERKIT_CACHE", str(tmp_path / "cache"))


def _ok(args):
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output + str(res.exception)
    return res


def _bad(args, match):
    res = runner.invoke(app, args)
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("error: ") and sum(ln.startswith("error:") for ln in lines) == 1, res.stderr
    assert "Traceback" not in res.stderr and match in lines[-1], lines[-1]
    return lines[-1]


def test_rank_prints_table_agreement_evaluation_and_writes_files(tiny_bert_dir, other_bert_dir, sentiment_csv, tmp_path):
    models = f"{tiny_bert_dir},{other_bert_dir}"
    out = tmp_path / "r"
    res = _ok(["rank", "--data", str(sentiment_csv), "--models", models, "--metrics", "logme,sfda,ncti,auto",
               "--ground-truth", "linear", "--ensemble", "2", "--out", str(out)])
    text = res.stdout
    assert "transferability of models" in text and "sorted by auto" in text
    assert "agreement between metric rankings" in text and "weighted tau" in text and "rel@1" in text
    assert "ensemble k=2 by osborn" in text and "ranking.csv" in text
    doc = json.loads((out / "ranking.json").read_text())
    assert doc["metrics"] == ["logme", "sfda", "ncti", "auto"] and doc["ground_truth"]["protocol"] == "linear"
    rows = list(csv.DictReader((out / "ranking.csv").open()))
    assert len(rows) == 2 and {"logme", "auto_rank", "measured_accuracy_linear"} <= set(rows[0])
    assert (out / "rank.json").is_file()

    # --json: the same document on stdout, nothing else
    res = _ok(["rank", "--data", str(sentiment_csv), "--models", models, "--metrics", "logme", "--json"])
    doc = json.loads(res.stdout)
    assert doc["ranking"]["logme"] and "agreement" in doc and "evaluation" not in doc


def test_rank_layers_and_finetune_ground_truth(tiny_bert_dir, other_bert_dir, sentiment_csv):
    res = _ok(["rank", "--data", str(sentiment_csv), "--models", str(tiny_bert_dir), "--layers", "auto",
               "--metrics", "logme,hscore", "--ground-truth", "linear", "--json"])
    doc = json.loads(res.stdout)
    assert doc["candidates"] == "layers" and doc["models"][-1] == "penultimate" and len(doc["models"]) == 3
    assert set(doc["ground_truth"]["accuracy"]) == set(doc["models"])

    res = _ok(["rank", "--data", str(sentiment_csv), "--models", f"{tiny_bert_dir},{other_bert_dir}", "--metrics", "logme",
               "--ground-truth", "finetune", "--epochs", "1", "--lrs", "1e-3", "--json"])
    doc = json.loads(res.stdout)
    runs = doc["ground_truth_runs"]
    assert all(r["selected"] == {"lr": 1e-3} and len(r["grid"]) == 1 for r in runs.values())
    assert "logme" in doc["evaluation"] and 0 <= doc["evaluation"]["logme"]["rel@1"] <= 1


def test_rank_errors_are_one_line(tiny_bert_dir, other_bert_dir, sentiment_csv):
    d, m = str(sentiment_csv), str(tiny_bert_dir)
    two = f"{m},{other_bert_dir}"
    _bad(["rank", "--data", d, "--models", m, "--layers", "no.such.layer"], "unknown layer 'no.such.layer'")
    _bad(["rank", "--data", d, "--models", two, "--layers", "auto"], "one model")
    _bad(["rank", "--data", d, "--models", two, "--ensemble", "3"], "exceeds the number of candidate models (2)")
    _bad(["rank", "--data", d, "--models", two, "--ensemble", "0"], "positive")
    _bad(["rank", "--data", d, "--models", two, "--ground-truth", "oracle"], "unknown --ground-truth")
    _bad(["rank", "--data", d, "--models", two, "--epochs", "2"], "only apply to --ground-truth finetune")
    _bad(["rank", "--data", d, "--models", two, "--ground-truth", "finetune", "--lrs", "fast"], "--lrs")
    _bad(["rank", "--data", d, "--models", m, "--layers", "auto", "--ground-truth", "finetune"], "finetune")
    _bad(["rank", "--data", d, "--models", two, "--metrics", "auto,nope"], "unknown metric")
    _bad(["rank", "--data", d, "--models", m, "--layers", " "], "--layers")


def test_list_is_the_registry():
    from transferkit import registry

    doc = json.loads(ok(["rank", "--list", "--json"]).stdout)
    assert list(doc) == list(registry.methods("rank"))
    assert doc["gbc"]["options"][0] == {"name": "pca", "type": "a number", "default": 0.8}
    assert doc["etran"]["kind"] == "set-level" and doc["leep"]["needs"] == ["probs"]
    text = ok(["rank", "--list"]).stdout
    assert all(name in text for name in doc) and "You et al." in text
    bad(["rank", "--data", "opencv-digits"], "rank needs --data and --models")
