"""The CLI contract: --json documents on stdout, one-line errors with exit code 2."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from _cli import bad as _bad
from _cli import ok as _ok


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TRANSFERKIT_CACHE", str(tmp_path / "cache"))


def test_help_shows_examples():
    for cmd in (["--help"], ["rank", "--help"], ["tune", "--help"], ["features", "--help"], ["demo", "--help"],
                ["run", "--help"], ["merge", "--help"], ["fetch", "--help"], ["zoo", "list", "--help"]):
        res = _ok(cmd)
        if cmd != ["--help"]:
            assert "Example:" in res.stdout


def test_zoo_list_json_has_the_ten_real_models():
    res = _ok(["zoo", "list", "--json"])
    rows = json.loads(res.stdout)
    names = {r["name"] for r in rows}
    assert {"all-minilm-l6-v2", "paraphrase-minilm-l3-v2", "all-mpnet-base-v2", "mobilenet-v2", "efficientnet-lite0",
            "efficientnet-lite1", "efficientnet-lite2", "digits-mnist", "digits-usps", "digits-svhn"} <= names
    assert all(r["cached"] is False for r in rows)  # fresh cache


def test_features_rank_and_tune_on_a_tiny_model(tiny_bert_dir, sentiment_csv, tmp_path):
    res = _ok(["features", "--data", str(sentiment_csv), "--model", str(tiny_bert_dir), "--json"])
    info = json.loads(res.stdout)
    assert info["n"] == 80 and info["dim"] == 32 and info["source_probs"] is None

    other = tmp_path / "other-bert"
    shutil.copytree(tiny_bert_dir, other)
    res = _ok(["rank", "--data", str(sentiment_csv), "--models", f"{tiny_bert_dir},{other}",
               "--metrics", "logme,linear_probe", "--out", str(tmp_path / "r"), "--json"])
    doc = json.loads(res.stdout)
    assert set(doc["ranking"]) == {"logme", "linear_probe"}
    assert all(isinstance(doc["scores"][m]["logme"], float) for m in doc["models"])
    assert json.loads((tmp_path / "r" / "rank.json").read_text())["scores"] == doc["scores"]

    for method in ("linear", "full"):
        out = tmp_path / f"tune-{method}"
        res = _ok(["tune", "--data", str(sentiment_csv), "--model", str(tiny_bert_dir), "--method", method,
                   "--epochs", "2", "--out", str(out), "--json"])
        m = json.loads(res.stdout)
        assert 0.0 <= m["test_accuracy"] <= 1.0 and m["trainable_params"] > 0
        for f in ("delta/delta.safetensors", "delta/delta.json", "metrics.json", "history.json", "curve.png"):
            assert (out / f).is_file(), f
    assert json.loads(_ok(["tune", "--list", "--json"]).stdout).keys() >= {"linear", "full"}


def test_bad_inputs_give_one_line_errors(tmp_path, tiny_bert_dir, sentiment_csv):
    m = str(tiny_bert_dir)
    _bad(["features", "--data", str(tmp_path / "missing.csv"), "--model", m], "not found")
    _bad(["features", "--data", "no-such-dataset", "--model", m], "no-such-dataset")
    _bad(["rank", "--data", str(sentiment_csv), "--models", "no-such-model"], "unknown model 'no-such-model'")
    _bad(["rank", "--data", str(sentiment_csv), "--models", m, "--metrics", "nope"], "unknown metric")
    _bad(["tune", "--data", str(sentiment_csv), "--model", m, "--method", "nope"], "unknown tune method")
    empty = tmp_path / "empty.csv"
    empty.write_text("text,label\n")
    _bad(["features", "--data", str(empty), "--model", m], "empty")
    single = tmp_path / "single.csv"
    single.write_text("text,label\ngood movie,1\nbad movie,1\n")
    _bad(["features", "--data", str(single), "--model", m], "class")
    np.savez(tmp_path / "float_labels.npz", X=np.zeros((4, 3)), y=np.array([0.5, 1.5, 0.5, 1.5]))
    _bad(["features", "--data", str(tmp_path / "float_labels.npz"), "--model", m], "label")
    np.savez(tmp_path / "nan.npz", X=np.array([[np.nan, 1.0]] * 4), y=np.array([0, 1, 0, 1]))
    _bad(["features", "--data", str(tmp_path / "nan.npz"), "--model", m], "NaN")
    np.savez(tmp_path / "mismatch.npz", X=np.zeros((4, 3)), y=np.array([0, 1, 0]))
    _bad(["features", "--data", str(tmp_path / "mismatch.npz"), "--model", m], "4")
    (tmp_path / "imgs" / "cat").mkdir(parents=True)
    (tmp_path / "imgs" / "dog").mkdir(parents=True)
    _bad(["features", "--data", str(tmp_path / "imgs"), "--model", m], "image")
    corrupt = tmp_path / "corrupt-bert"
    shutil.copytree(tiny_bert_dir, corrupt)
    w = corrupt / "model.safetensors"
    w.write_bytes(w.read_bytes()[:1000])
    _bad(["features", "--data", str(sentiment_csv), "--model", str(corrupt)], "corrupt-bert")
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("epochs: [1\n")
    _bad(["tune", "--data", str(sentiment_csv), "--model", m, "--config", str(cfg)], "cannot parse")
    _bad(["run", str(tmp_path / "missing.yaml")], "pipeline file not found")
    cfg.write_text("epohcs: 3\n")
    _bad(["tune", "--data", str(sentiment_csv), "--model", m, "--config", str(cfg)], "epohcs")


def test_checksum_mismatch_via_fetch(monkeypatch):
    from transferkit import assets

    bad = {"kind": "dataset", "name": "tk-bad", "licence": "x",
           "sources": [{"registry": "npm", "name": "is-number", "version": "7.0.0", "sha256": "0" * 64}]}
    monkeypatch.setattr(assets, "catalogue", lambda: {"tk-bad": bad})

    def fake_download(src, dest):
        (dest / "x.tgz").write_bytes(b"not it")
        return dest / "x.tgz"

    monkeypatch.setattr(assets, "_download", fake_download)
    _bad(["fetch", "tk-bad"], "checksum mismatch")
    _bad(["fetch", "nope"], "unknown asset 'nope'")


def test_entry_point_exit_code(tmp_path):
    exe = Path(sys.executable).parent / "transferkit"
    proc = subprocess.run([str(exe), "rank", "--data", str(tmp_path / "x.csv"), "--models", "digits-mnist"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error:") and proc.stdout == ""
