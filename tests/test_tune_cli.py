"""`transferkit tune --method <PEFT method>` end to end through the CLI (tiny BERT)."""

import json

import pytest
from typer.testing import CliRunner

from transferkit.cli import app

runner = CliRunner()


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TRANSFERKIT_CACHE", str(tmp_path / "cache"))


@pytest.mark.parametrize("method", ["lora", "ia3", "prefix", "prompt", "bitfit", "adapter", "parallel-adapter", "mam"])
def test_cli_tune_methods(tiny_bert_dir, sentiment_csv, tmp_path, method):
    out = tmp_path / method
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text({"mam": "prefix_length: 2\nprefix_hidden: 8\nbottleneck: 4\n",
                    "prefix": "num_virtual_tokens: 2\n", "prompt": "num_virtual_tokens: 2\n",
                    "lora": "r: 2\n"}.get(method, "{}\n"))
    res = runner.invoke(app, ["tune", "--data", str(sentiment_csv), "--model", str(tiny_bert_dir), "--method", method,
                              "--epochs", "1", "--config", str(cfg), "--out", str(out), "--json"])
    assert res.exit_code == 0, res.output + str(res.exception)
    m = json.loads(res.stdout)
    assert m["method"] == method and 0 <= m["test_accuracy"] <= 1 and 0 < m["trainable_pct"] < 100
    for f in ("delta/delta.safetensors", "delta/delta.json", "metrics.json", "history.json", "curve.png"):
        assert (out / f).is_file(), f
    assert (out / "peft" / "adapter_config.json").is_file() == (method in ("lora", "ia3", "prefix", "prompt"))


def test_cli_tune_list_and_bad_option(tiny_bert_dir, sentiment_csv, tmp_path):
    res = runner.invoke(app, ["tune", "--list", "--json"])
    doc = json.loads(res.stdout)
    r = {o["name"]: o for o in doc["lora"]["options"]}["r"]
    assert r["default"] == 8 and r["type"] == "an integer" and r["low"] == 1 and "He et al." in doc["mam"]["paper"]
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("rank: 4\n")
    res = runner.invoke(app, ["tune", "--data", str(sentiment_csv), "--model", str(tiny_bert_dir), "--method", "lora",
                              "--config", str(cfg)])
    assert res.exit_code == 2 and "rank" in res.stderr.strip().splitlines()[-1]
