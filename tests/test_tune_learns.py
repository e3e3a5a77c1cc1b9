"""Every single-task tune method trains a tiny BERT above chance on generated text (the words decide the label)."""

import pytest

from transferkit.data import load_dataset, train_test_split
from transferkit.zoo import load_model

METHODS = ["linear", "full", "lora", "ia3", "prefix", "prompt", "bitfit", "adapter", "parallel-adapter",
           "scaled-parallel-adapter", "mam", "unipt", "sherl", "r2", "sparse"]


@pytest.fixture(scope="module")
def split(sentiment_csv):
    return train_test_split(load_dataset(str(sentiment_csv)), seed=0)


@pytest.mark.parametrize("method", METHODS)
def test_method_learns_above_chance(method, split, tiny_bert_dir, tmp_path, monkeypatch):
    from transferkit.tune import tune

    monkeypatch.setenv("TRANSFERKIT_CACHE", str(tmp_path / "cache"))
    train, test = split
    res = tune(load_model(str(tiny_bert_dir)), train, test, method=method,
               config={"epochs": 10, "lr": 1e-2, "batch_size": 8}, progress=False)
    assert res.metrics["test_accuracy"] >= 0.8, res.metrics  # chance is 0.5 (balanced, 16 test items)
