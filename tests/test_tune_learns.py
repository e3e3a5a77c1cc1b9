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


@pytest.mark.assets
@pytest.mark.slow
def test_mam_learns_a_real_task_at_its_default_lr(tmp_path):
    """Regression: the MAM default lr was 5e-4, at which its 512-wide, s = 4 FFN adapter kept MiniLM at chance."""
    from transferkit.tune import tune

    ds = load_dataset("vader:movies", per_class=200, seed=0)
    train, test = train_test_split(ds, test_size=0.375, seed=0)
    res = tune(load_model("all-minilm-l6-v2", max_length=32), train, test, method="mam",
               config={"epochs": 4, "batch_size": 8}, progress=False)
    assert res.metrics["test_accuracy"] >= 0.65, res.metrics  # chance 0.5 (150 balanced test items); 5e-4 gave 0.50
