"""auto: budgets, arm order, successive halving through the engine's watcher, honest evaluation, resume,
study checks, two workers, the CLI's errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import transferkit.auto as auto
from _cli import bad, ok
from transferkit.auto.budget import parse_budget
from transferkit.errors import ConfigError

FAST = dict(methods=["linear", "full"], epochs=3, eta=3, lr_factors=[1.0, 3.0])


@pytest.fixture
def models(tiny_bert_dir, other_bert_dir):
    return [str(tiny_bert_dir), str(other_bert_dir)]


# ----------------------------------------------------------------------------- budgets and arms


@pytest.mark.parametrize("text,kind,amount", [("90s", "seconds", 90), ("10m", "seconds", 600),
                                              ("1h30m", "seconds", 5400), ("2.5m", "seconds", 150),
                                              (45, "seconds", 45), ("40ep", "epochs", 40), ("12 epochs", "epochs", 12)])
def test_budgets(text, kind, amount):
    b = parse_budget(text)
    assert (b.kind, b.amount) == (kind, amount)


@pytest.mark.parametrize("text", ["ten minutes", "10x", "-5m", "0ep", "1m1x", True, [1], "99999999h"])
def test_bad_budgets_are_one_line_errors(text):
    with pytest.raises(ConfigError) as exc:
        parse_budget(text)
    assert "\n" not in str(exc.value)


def test_arms_follow_the_prior_and_skip_what_a_modality_cannot_do():
    arms = auto.make_arms(["b", "a"], ["linear", "prefix"], [1.0, 3.0], {"a": "text", "b": "image"})
    assert [a.index for a in arms] == list(range(len(arms)))
    assert all(not (a.model == "b" and a.method == "prefix") for a in arms)  # prefix tuning is text only
    first = arms[0]
    assert (first.model, first.method, first.model_rank) == ("b", "linear", 0)
    # sum of positions, then the better model: b/linear/x1 (0), b/linear/x3 (1), a/linear/x1 (1), …
    assert [(a.model, a.method) for a in arms[:3]] == [("b", "linear"), ("b", "linear"), ("a", "linear")]
    assert arms[1].lr == pytest.approx(3 * arms[0].lr)
    full_image = auto.make_arms(["b"], ["full"], [1.0], {"b": "image"})[0]
    full_text = auto.make_arms(["a"], ["full"], [1.0], {"a": "text"})[0]
    assert (full_image.lr, full_text.lr) == (1e-3, 5e-5)


# ----------------------------------------------------------------------------- the engine's watcher


def test_watch_sees_every_evaluation_and_can_stop_a_run():
    from transferkit.engine import TrainConfig, train, watch

    torch.manual_seed(0)
    X, y = torch.randn(64, 5), torch.randint(0, 2, (64,))
    seen = []

    def stop_at_two(step, total, value, rec):
        seen.append((rec["epoch"], value))
        return rec["epoch"] >= 2

    model = torch.nn.Linear(5, 2)
    with watch(stop_at_two):
        res = train(model, (X, y), config=TrainConfig(epochs=5, batch_size=16, lr=0.1, progress=False),
                    val_data=(X, y))
    assert [e for e, _ in seen] == [1.0, 2.0]
    assert res.stopped_early and max(h["epoch"] for h in res.history) == 2.0
    assert seen[-1][1] == pytest.approx(res.metrics["val_accuracy"])
    res = train(torch.nn.Linear(5, 2), (X, y), config=TrainConfig(epochs=3, batch_size=16, progress=False),
                val_data=(X, y))  # outside the block nothing watches
    assert len(seen) == 2 and not res.stopped_early


# ----------------------------------------------------------------------------- the search


def test_search_prunes_by_rung_spends_the_budget_and_scores_only_the_held_out_part(models, sentiment_csv, tmp_path,
                                                                                  monkeypatch, one_thread):
    import transferkit.tune as tune_pkg

    seen_tests = []
    real = tune_pkg.tune

    def spy(model, train, test=None, **kw):
        seen_tests.append(test)
        return real(model, train, test, **kw)

    monkeypatch.setattr(tune_pkg, "tune", spy)
    res = auto(sentiment_csv, models, budget="7ep", out=tmp_path / "a", **FAST)
    assert seen_tests and all(t is None for t in seen_tests)  # no arm ever sees the held-out part
    arms = res["arms"]
    assert res["budget"]["spent"] == pytest.approx(sum(a["cost"] for a in arms))
    assert res["budget"]["spent"] <= 7  # a cap: no epoch starts that would not fit
    for a in arms:
        if a["method"] == "linear":  # a head on cached features: its own 30 epochs, no cost against the budget
            assert a["cost"] == 0 and a["epochs"] == (10.0 if a["state"] == "pruned" else 30.0)
        elif a["state"] == "pruned":  # pruned exactly at its rung (epoch 1; an arm that reaches the end is kept)
            assert a["epochs"] == 1.0 and a["cost"] == 1.0
    assert any(a["state"] == "pruned" for a in arms)
    kept = [a for a in arms if a["state"] in ("complete", "budget")]
    w = res["winner"]
    assert w["val_accuracy"] == max(a["val_accuracy"] for a in kept)
    split = json.loads((tmp_path / "a" / "split.json").read_text())
    assert w["n_test"] == len(split["test_ids"])
    # the test accuracy is the winner's kept Delta on exactly the recorded held-out items
    from transferkit.data.split import held_out
    from transferkit.delta import Delta
    from transferkit.zoo import load_model

    _, test = held_out(split)
    delta = Delta.load(Path(w["folder"]) / "delta")
    assert auto.evaluate_delta(load_model(w["model"]), delta, test) == w["test_accuracy"]
    kept = sorted(p.name for p in (tmp_path / "a" / "arms").iterdir())
    assert kept == [Path(w["folder"]).name]  # every other arm folder was removed
    assert (tmp_path / "a" / "trace.png").read_bytes()[:4] == b"\x89PNG"


def _interrupt_after(monkeypatch, n_evaluations):
    """Make the engine raise KeyboardInterrupt at its n-th evaluation (a kill in the middle of an arm)."""
    from transferkit.engine import loop

    count = {"n": 0}
    real = loop.evaluate

    def evaluate(*a, **kw):
        count["n"] += 1
        if count["n"] == n_evaluations:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(loop, "evaluate", evaluate)


def _trace(res):
    return [(a["name"], a["state"], a["epochs"], a["val_accuracy"]) for a in res["arms"]], res["winner"]


def test_a_killed_search_resumes_to_the_same_winner(models, sentiment_csv, tmp_path, monkeypatch, one_thread):
    whole = auto(sentiment_csv, models, budget="9ep", out=tmp_path / "whole", **FAST)
    with monkeypatch.context() as m:
        _interrupt_after(m, 6)  # inside the third arm
        with pytest.raises(KeyboardInterrupt):
            auto(sentiment_csv, models, budget="9ep", out=tmp_path / "killed", **FAST)
    with pytest.raises(ConfigError, match="--resume"):  # an existing study is never silently restarted
        auto(sentiment_csv, models, budget="9ep", out=tmp_path / "killed", **FAST)
    resumed = auto(sentiment_csv, models, budget="9ep", out=tmp_path / "killed", resume=True, **FAST)
    (arms_w, win_w), (arms_r, win_r) = _trace(whole), _trace(resumed)
    assert arms_r == arms_w
    assert {k: v for k, v in win_r.items() if k != "folder"} == {k: v for k, v in win_w.items() if k != "folder"}


def test_a_study_of_another_target_or_setting_is_refused(models, sentiment_csv, tmp_path, one_thread):
    auto(sentiment_csv, models, budget="3ep", out=tmp_path / "s", **FAST)
    other = tmp_path / "other.csv"
    lines = Path(sentiment_csv).read_text().splitlines()
    other.write_text("\n".join(lines[:-2]) + "\n")  # two items fewer: another target
    with pytest.raises(ConfigError, match="another target"):
        auto(other, models, budget="3ep", out=tmp_path / "s", resume=True, **FAST)
    with pytest.raises(ConfigError, match="another target"):
        auto(sentiment_csv, models, budget="3ep", out=tmp_path / "s", resume=True, **{**FAST, "eta": 2})
    with pytest.raises(ConfigError, match="nothing to resume"):
        auto(sentiment_csv, models, budget="3ep", out=tmp_path / "new", resume=True, **FAST)


def test_budgets_too_small_to_train_one_arm(models, sentiment_csv, tmp_path):
    with pytest.raises(ConfigError, match="cannot train one arm"):
        auto(sentiment_csv, models, budget="0.5ep", **FAST)
    with pytest.raises(ConfigError, match="used up by the ranking"):
        auto(sentiment_csv, models, budget="0.001s", **FAST)


def test_two_workers_share_one_study(models, sentiment_csv, tmp_path):
    db = f"sqlite:///{tmp_path / 'shared.db'}"
    out = tmp_path / "run"
    code = ("import sys, json, transferkit.auto as a; r = a(sys.argv[1], sys.argv[2].split(','), budget='40ep', "
            "methods=['linear', 'full'], epochs=3, lr_factors=[1.0, 3.0], out=sys.argv[3], storage=sys.argv[4], "
            "join=sys.argv[5] == '1'); print(json.dumps(r.get('winner')))")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = [sentiment_csv, ",".join(models), out, db]
    first = subprocess.Popen([sys.executable, "-c", code, *map(str, args), "0"], stdout=subprocess.PIPE, env=env)
    import optuna

    for _ in range(600):  # the second worker joins once the first has enqueued the arms
        try:
            if optuna.load_study(study_name="transferkit-auto", storage=db).user_attrs.get("enqueued"):
                break
        except KeyError:
            pass
        import time

        time.sleep(0.1)
    second = subprocess.run([sys.executable, "-c", code, *map(str, args), "1"], stdout=subprocess.PIPE, env=env,
                            timeout=600)
    first_out, _ = first.communicate(timeout=600)
    assert first.returncode == 0 and second.returncode == 0
    study = optuna.load_study(study_name="transferkit-auto", storage=db)
    taken = [t.params["arm"] for t in study.get_trials() if "arm" in t.params and t.state.name != "FAIL"]
    assert sorted(taken) == sorted(set(taken)) == list(range(8))  # every arm exactly once, across both workers
    winners = [json.loads(o.decode().strip().splitlines()[-1]) for o in (first_out, second.stdout)]
    assert any(w is not None for w in winners)
    final = json.loads((out / "auto.json").read_text())["winner"]
    assert final is not None and Path(final["folder"]).exists()


# ----------------------------------------------------------------------------- the command line


def test_cli_runs_and_reports_against_the_oracle(models, sentiment_csv, tmp_path, one_thread):
    res = ok(["auto", "--data", sentiment_csv, "--models", ",".join(models), "--methods", "linear,full",
              "--budget", "4ep", "--epochs", "3", "--lr-factors", "1,3", "--out", tmp_path / "c", "--oracle",
              "--json"])
    doc = json.loads(res.stdout)
    orc = doc["oracle"]
    assert len(orc["arms"]) == 8 and orc["cost"] == 12  # 4 full arms × 3 epochs; linear probes cost nothing
    assert orc["compute_ratio_epochs"] == pytest.approx(sum(a["cost"] for a in doc["arms"]) / 12)
    assert orc["accuracy_ratio"] == pytest.approx(doc["winner"]["test_accuracy"] / orc["best"]["test_accuracy"])
    # training is deterministic: an arm the search finished is the oracle's arm, to the last digit
    w = doc["winner"]
    if w["state"] == "complete":
        same = next(a for a in orc["arms"] if a["name"] == w["name"])
        assert same["test_accuracy"] == w["test_accuracy"]
    assert (tmp_path / "c" / "oracle.json").is_file() and (tmp_path / "c" / ".transferkit").is_file()


@pytest.mark.parametrize("extra,match", [
    (["--methods", "lorra"], "did you mean 'lora'"),
    (["--methods", "adapter"], "cannot search 'adapter'"),
    (["--budget", "soon"], "not a duration"),
    (["--budget", "0.2ep"], "cannot train one arm"),
    (["--eta", "1"], "eta must be"),
    (["--lr-factors", "1,x"], "lr factors"),
])
def test_cli_bad_input(models, sentiment_csv, tmp_path, extra, match):
    bad(["auto", "--data", sentiment_csv, "--models", ",".join(models), "--out", tmp_path / "x", *extra], match)


def test_cli_bad_target_and_models(models, sentiment_csv, tmp_path):
    one = tmp_path / "one.csv"
    one.write_text("text,label\n" + "\n".join(f"good movie {i},positive" for i in range(20)) + "\n")
    bad(["auto", "--data", one, "--models", ",".join(models), "--out", tmp_path / "x"], "class")
    bad(["auto", "--data", sentiment_csv, "--models", "mobilenet-v3", "--out", tmp_path / "y"], "mobilenet")
    bad(["auto", "--data", sentiment_csv, "--models", f"{models[0]},{models[0]}", "--out", tmp_path / "z"],
        "distinct")


# ----------------------------------------------------------------------------- the pipeline stage


def test_pipeline_stage_reports_the_search_and_the_oracle(models, sentiment_csv, tmp_path, one_thread):
    from transferkit.pipeline import load_config, run_pipeline

    raw = {"name": "auto-test", "targets": [str(sentiment_csv)], "models": models, "metrics": ["logme"],
           "auto": {"methods": ["linear", "full"], "budget": "4ep", "epochs": 3, "lr_factors": [1, 3],
                    "oracle": True}}
    s = run_pipeline(load_config(raw), tmp_path / "run", progress=False)
    rec = s["auto"]["targets"][0]
    split = json.loads((tmp_path / "run" / "splits" / f"{rec['target']}.json").read_text())
    assert rec["winner"]["n_test"] == len(split["test_ids"])  # the pipeline's one recorded split
    assert rec["oracle"]["accuracy_ratio"] == pytest.approx(rec["winner"]["test_accuracy"]
                                                            / rec["oracle"]["best"]["test_accuracy"])
    html = (tmp_path / "run" / "report.html").read_text()
    assert "Auto: model × method within a budget" in html and "auto chose" in html
    assert list((tmp_path / "run" / "report").glob("auto-*.png"))
    again = run_pipeline(load_config(raw), tmp_path / "run", resume=True, progress=False)
    assert again["auto"]["targets"][0]["winner"] == rec["winner"]


@pytest.mark.parametrize("section,match", [({"budget": "soon"}, "not a duration"), ({"methods": ["lorra"]}, "lora"),
                                           ({"eta": 1}, "auto.eta"), ({"oracel": True}, "oracle")])
def test_pipeline_section_is_checked_at_load(models, sentiment_csv, section, match):
    from transferkit.pipeline import load_config

    with pytest.raises(ConfigError, match=match):
        load_config({"targets": [str(sentiment_csv)], "models": models, "auto": section})


def test_a_diverging_arm_ends_and_the_search_goes_on(models, sentiment_csv, monkeypatch, one_thread):
    import transferkit.tune as tune_pkg
    from transferkit.engine import TrainingDiverged

    real = tune_pkg.tune

    def blow_up_full(model, train, test=None, *, method, config, **kw):
        if method == "full" and config["lr"] > 1e-4:  # the ×3 lr of full fine-tuning
            raise TrainingDiverged(f"training diverged at step 3 (lr {config['lr']:g})")
        return real(model, train, test, method=method, config=config, **kw)

    monkeypatch.setattr(tune_pkg, "tune", blow_up_full)
    res = auto(sentiment_csv, models, budget="40ep", **FAST)
    states = {a["name"]: a["state"] for a in res["arms"]}
    assert {n for n, st in states.items() if st == "diverged"} == {
        a["name"] for a in res["arms"] if a["method"] == "full" and a["lr"] > 1e-4}
    assert "waiting" not in states.values() and res["winner"]["state"] == "complete"



@pytest.mark.parametrize("budget", ["1ep", "3.5ep"])
def test_an_epoch_budget_is_a_cap_and_free_arms_still_run_after_one_that_does_not_fit(models, sentiment_csv, budget,
                                                                                      one_thread):
    res = auto(sentiment_csv, models, budget=budget, **FAST)
    amount = parse_budget(budget).amount
    arms = res["arms"]
    spent = sum(a["cost"] for a in arms)
    assert spent == res["budget"]["spent"] <= amount
    states = [a["state"] for a in arms]
    assert "waiting" not in states  # every arm was either run or found not to fit
    skipped = [i for i, s in enumerate(states) if s == "no budget"]
    assert skipped and all(arms[i]["method"] == "full" and arms[i]["epochs"] == 0 for i in skipped)
    assert spent + 1 > amount  # an arm was left out only because one more epoch would not fit
    # the linear probes (no epochs of backbone training) ordered after the first skipped arm still ran
    assert all(a["state"] in ("complete", "pruned") for a in arms[skipped[0]:] if a["method"] == "linear")
    if budget == "1ep":  # the order: other full ×1 (1 epoch, pruned), tiny linear, other full ×3 (skipped), tiny linear
        assert [a["method"] for a in arms[skipped[0]:]].count("linear") == 1
