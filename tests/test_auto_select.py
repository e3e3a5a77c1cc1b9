"""auto --select-by: the engine's select_with, a label-free scorer judging rungs and the winner, refusals, the
CLI, the pipeline key and resume."""

import json

import numpy as np
import pytest
import torch

import transferkit.auto as auto
from _cli import bad, ok
from test_auto import models  # noqa: F401  (the two tiny BERTs)
from transferkit.errors import ConfigError

ONE = dict(methods=["full"], epochs=3, eta=3, lr_factors=[1.0, 3.0])  # 2 models × 2 lrs = 4 arms


class Spy:
    """A scorer that ranks the arms by the order they were built in and records what it is given."""

    def __init__(self, name, higher_is_better, value, seen):
        self.name, self.higher_is_better, self.value, self.seen = name, higher_is_better, value, seen

    def __call__(self, model, data):
        self.seen.append(data)
        return self.value


@pytest.fixture
def spy_scorers(monkeypatch):
    """make_scorer returns, for the k-th arm built, a Spy of value k (the real scorer for _select_by's look-up)."""
    import transferkit.adapt.scorers as scorers

    real, seen, built = scorers.make_scorer, [], []

    def fake(name, preprocess, **kw):
        if preprocess is None:
            return real(name, preprocess, **kw)
        s = real(name, preprocess, **kw)
        built.append(Spy(name, s.higher_is_better, float(len(built)), seen))
        return built[-1]

    monkeypatch.setattr(scorers, "make_scorer", fake)
    return seen


# ----------------------------------------------------------------------------- the engine


def test_select_with_scores_the_items_only_and_follows_the_direction():
    from transferkit.engine import TrainConfig, select_with, train, watch

    torch.manual_seed(0)
    X, y = torch.randn(64, 5), torch.randint(0, 2, (64,))
    seen, values = [], iter([3.0, 1.0, 2.0])

    class Lower:
        name, higher_is_better = "lower", False

        def __call__(self, model, data):
            seen.append(data)
            return next(values)

    watched = []
    cfg = TrainConfig(epochs=3, batch_size=16, lr=0.1, progress=False)
    with select_with(Lower()), watch(lambda step, total, value, rec: watched.append(value)):
        res = train(torch.nn.Linear(5, 2), (X, y), config=cfg, val_data=(X, y))
        # an explicit metric is left alone: the loss, by evaluate on the labelled items
        by_loss = train(torch.nn.Linear(5, 2), (X, y), config=cfg, val_data=(X, y), metric="loss")
    assert all(d is X for d in seen) and len(seen) == 3  # the items, never the labels
    assert watched[:3] == [3.0, 1.0, 2.0] and "val_loss" in by_loss.metrics
    assert [h["val_lower"] for h in res.history if "val_lower" in h] == [3.0, 1.0, 2.0]
    assert "val_accuracy" not in res.metrics and res.best_step == 8  # the minimum, at the end of epoch 2
    from transferkit.tune._common import Pairs

    seen.clear()
    values = iter([0.5])
    with select_with(Lower()):
        train(torch.nn.Linear(5, 2), Pairs(X, y), config=TrainConfig(epochs=1, batch_size=64, progress=False),
              val_data=Pairs(X, y), collate_fn=lambda items: (torch.stack([a for a, _ in items]),
                                                             torch.tensor([b for _, b in items])))
    assert seen == [X]
    with pytest.raises(ConfigError, match="scorer"):
        with select_with("entropy"):
            pass


# ----------------------------------------------------------------------------- the search


def test_the_scorer_decides_and_its_direction_flips_the_choice(models, sentiment_csv,  # noqa: F811
                                                               spy_scorers, monkeypatch, one_thread):
    import transferkit.engine.loop as loop

    by_accuracy = auto(sentiment_csv, models, budget="40ep", **ONE)
    spy_scorers.clear()

    def no_labels(*a, **kw):
        raise AssertionError("the validation labels were evaluated")

    monkeypatch.setattr(loop, "evaluate", no_labels)  # training never evaluates the labelled validation items
    up = auto(sentiment_csv, models, budget="40ep", select_by="snd", **ONE)  # higher is better: the last arm
    down = auto(sentiment_csv, models, budget="40ep", select_by="entropy", **ONE)  # lower is better: the first
    n = len(up["arms"])
    assert n == 4 and up["winner"]["arm"] == n - 1 and down["winner"]["arm"] == 0
    assert by_accuracy["winner"]["arm"] != n - 1  # the scorer, not the accuracy, chose
    assert up["select_by"] == {"metric": "snd", "higher_is_better": True}
    assert down["select_by"] == {"metric": "entropy", "higher_is_better": False}
    assert all(a["state"] == "complete" and a["val_score"] == a["arm"] for a in up["arms"])  # each new arm leads
    # minimising: every later arm is worse than arm 0 at its first rung and is pruned there (η = 3)
    assert [a["state"] for a in down["arms"]] == ["complete"] + ["pruned"] * (n - 1)
    for res in (up, down):
        assert res["winner"]["val_accuracy"] is None and all(a["val_accuracy"] is None for a in res["arms"])
        assert 0.0 <= res["winner"]["test_accuracy"] <= 1.0  # the held-out part is still scored, once
    n_train = up["split"]["n_train"]
    assert spy_scorers and all(isinstance(d, list) and all(isinstance(x, str) for x in d) for d in spy_scorers)
    assert {len(d) for d in spy_scorers} == {round(0.2 * n_train)}  # the validation fifth's items, no labels


def test_a_real_scorer_end_to_end_and_resume_with_another_select_by_is_refused(models,  # noqa: F811
                                                                              sentiment_csv, tmp_path, one_thread):
    kw = dict(methods=["bitfit"], epochs=1, lr_factors=[1.0])
    res = auto(sentiment_csv, models, budget="4ep", select_by="entropy", out=tmp_path / "s", **kw)
    kept = [a for a in res["arms"] if a["state"] in ("complete", "budget")]
    assert res["winner"]["val_score"] == min(a["val_score"] for a in kept) and res["winner"]["val_score"] >= 0
    assert res["winner"]["val_score"] <= np.log(2) + 1e-9  # a mean entropy of two classes, in nats
    assert json.loads((tmp_path / "s" / "auto.json").read_text())["select_by"]["metric"] == "entropy"
    for other in ("mano", None):
        with pytest.raises(ConfigError, match="other settings"):
            auto(sentiment_csv, models, budget="4ep", select_by=other, out=tmp_path / "s", resume=True, **kw)
    again = auto(sentiment_csv, models, budget="4ep", select_by="entropy", out=tmp_path / "s", resume=True, **kw)
    assert again["winner"]["val_score"] == res["winner"]["val_score"]


@pytest.mark.parametrize("kw,match", [
    (dict(select_by="entropi"), "did you mean 'entropy'"),
    (dict(select_by="iwv", methods=["full"]), "auto can select by: entropy, snd, transfer_score, mixval, mano"),
    (dict(select_by="dev", methods=["full"]), "needs labelled source items"),
    (dict(select_by="circular", methods=["full"]), "needs labelled source items"),
    (dict(select_by="entropy"), "linear probe"),  # the default methods include it
    (dict(select_by="snd", methods=["full", "linear"]), "linear probe"),
    (dict(select_by="transfer_score", methods=["full", "lora"]), "lora/ia3"),
    (dict(select_by="mixval", methods=["full"]), "text models"),
])
def test_combinations_auto_cannot_judge_are_refused_before_any_work(models, sentiment_csv,  # noqa: F811
                                                                    tmp_path, kw, match, monkeypatch):
    import transferkit.tune as tune_pkg

    monkeypatch.setattr(tune_pkg, "tune", lambda *a, **k: pytest.fail("an arm was trained"))
    with pytest.raises(ConfigError, match=match) as exc:
        auto(sentiment_csv, models, budget="4ep", out=tmp_path / "x", **kw)
    assert "\n" not in str(exc.value) and not (tmp_path / "x").exists()


# ----------------------------------------------------------------------------- the CLI and the pipeline


def test_cli_select_by(models, sentiment_csv, tmp_path, one_thread):  # noqa: F811
    common = ["auto", "--data", sentiment_csv, "--models", ",".join(models), "--methods", "full", "--epochs", "1",
              "--lr-factors", "1", "--budget", "2ep"]
    bad([*common, "--select-by", "entropi", "--out", tmp_path / "bad"], "did you mean 'entropy'")
    assert not (tmp_path / "bad").exists()
    bad([*common[:5], "--select-by", "snd", "--out", tmp_path / "bad"], "linear probe")  # default methods
    assert not (tmp_path / "bad").exists()
    res = ok([*common, "--select-by", "mano", "--out", tmp_path / "c"])
    assert "val mano" in res.stdout and "validation mano" in res.stdout
    assert json.loads((tmp_path / "c" / "auto.json").read_text())["select_by"]["metric"] == "mano"


def test_pipeline_key(models, sentiment_csv, tmp_path, one_thread):  # noqa: F811
    from transferkit.pipeline import load_config, run_pipeline

    base = {"targets": [str(sentiment_csv)], "models": models}
    cfg = load_config({**base, "auto": {"methods": ["full", "bitfit"], "select_by": "snd"}})
    assert cfg.section("auto").select_by == "snd" and cfg.to_dict()["auto"]["select_by"] == "snd"
    plain = load_config({**base, "auto": {"methods": ["full"]}})
    assert plain.section("auto").select_by is None and "select_by" not in plain.to_dict()["auto"]
    for section, match in [({"methods": ["full"], "select_by": "entropi"}, "did you mean 'entropy'"),
                           ({"select_by": "entropy"}, "linear probe"),
                           ({"methods": ["full"], "select_by": 3}, "auto.select_by"),
                           ({"methods": ["full"], "select_by": "dev"}, "auto can select by")]:
        with pytest.raises(ConfigError, match=match):
            load_config({**base, "auto": section})
    raw = {**base, "name": "select", "metrics": ["logme"],
           "auto": {"methods": ["full"], "select_by": "entropy", "budget": "2ep", "epochs": 1, "lr_factors": [1]}}
    rec = run_pipeline(load_config(raw), tmp_path / "run", progress=False)["auto"]["targets"][0]
    assert rec["select_by"] == {"metric": "entropy", "higher_is_better": False}
    assert rec["winner"]["val_accuracy"] is None and rec["winner"]["val_score"] >= 0
    assert "validation entropy" in (tmp_path / "run" / "report.html").read_text()
