"""The pipeline: YAML validation, a full tiny run (rank → ground truth → tune → merge → report), resume."""

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest

from transferkit import pipeline as pl
from transferkit.errors import ConfigError
from transferkit import registry
from transferkit.pipeline import DEFAULT_PIPELINE, default_pipeline, load_config, run_pipeline
from transferkit.pipeline.stages import merge as merge_stage
from transferkit.pipeline.stages import tune as tune_stage

STAGES = [s.name for s in pl.stages()]

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------- fixtures


def _tiny_bert(path: Path, seed: int, layers: int) -> Path:
    import torch
    from transformers import BertConfig, BertModel, BertTokenizer

    words = ["good", "great", "fine", "bad", "awful", "poor", "movie", "food", "the", "was", "very", "not"]
    path.mkdir(parents=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words
    # ``vocab=`` (not ``vocab_file=``, which transformers 5 silently ignores: every word would be [UNK])
    tok = BertTokenizer(vocab={w: i for i, w in enumerate(vocab)})
    assert tok("good movie")["input_ids"][1:3] == [vocab.index("good"), vocab.index("movie")]
    tok.save_pretrained(path)
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=17, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64)
    BertModel(cfg, add_pooling_layer=False).save_pretrained(path)
    return path


def _csv(path: Path, noun: str, seed: int, n: int = 60) -> Path:
    rng = np.random.default_rng(seed)
    rows = ["text,label"]
    for i in range(n):
        label = i % 2
        words = rng.choice(["good", "great", "fine"] if label else ["bad", "awful", "poor"], 3).tolist() + ["the", noun, "was"]
        rng.shuffle(words)
        rows.append(f"{' '.join(words)},{'positive' if label else 'negative'}")
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """Two tiny random BERTs (different depth) and two small text targets (movies, food)."""
    d = tmp_path_factory.mktemp("pipeline-assets")
    return {"models": [str(_tiny_bert(d / "bert-a", 0, 2)), str(_tiny_bert(d / "bert-b", 1, 1))],
            "targets": [str(_csv(d / "movies.csv", "movie", 0)), str(_csv(d / "food.csv", "food", 1))],
            "cache": d / "cache"}


@pytest.fixture
def cache(assets, monkeypatch):
    monkeypatch.setenv("TRANSFERKIT_CACHE", str(assets["cache"]))


TUNE_METHOD = pl.default_method()  # lora (PEFT) when available: its deltas go through the merge stage


def tiny_config(assets, **over):
    cfg = {
        "name": "tiny",
        "targets": [assets["targets"][0], {"data": assets["targets"][1], "name": "food", "limit": 50}],
        "models": assets["models"],
        "metrics": ["logme", "hscore"],
        "tune": {"method": TUNE_METHOD, "top_k": 2, "config": {"epochs": 1, "lr": 5e-3, "batch_size": 8},
                 "ground_truth": True, "ground_truth_method": "linear",
                 "ground_truth_config": {"epochs": 10, "lr": 0.05, "batch_size": 8}},
        "merge": {"method": "ties", "options": {"k": 0.5}},
        "seeds": [0],
    }
    cfg.update(over)
    return cfg


@pytest.fixture(scope="module")
def tiny_run(assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny-run")
    err = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stderr(err):
        mp.setenv("TRANSFERKIT_CACHE", str(assets["cache"]))
        summary = run_pipeline(tiny_config(assets), out, command="transferkit run tiny.yaml --out OUT")
    return {"out": out, "summary": summary, "stderr": err.getvalue()}


# ---------------------------------------------------------------------------------------------- config

GOOD = {"targets": ["opencv-digits"], "models": ["mobilenet-v2", "digits-mnist"], "metrics": ["logme"],
        "tune": {"method": "full"}}


def _with(**changes):
    cfg = json.loads(json.dumps(GOOD))
    for key, value in changes.items():
        *path, last = key.split("__")
        d = cfg
        for p in path:
            d = d.setdefault(p, {})
        if value is _DROP:
            d.pop(last, None)
        else:
            d[last] = value
    return cfg


_DROP = object()


@pytest.mark.parametrize("cfg, message", [
    (_with(modles=["x"]), "unknown key 'modles' in pipeline (did you mean 'models'?)"),
    (_with(targets=_DROP), "missing 'targets'"),
    (_with(targets=[]), "'targets' is empty"),
    (_with(targets=[{"dat": "opencv-digits"}]), "unknown key 'dat' in targets[0] (did you mean 'data'?)"),
    (_with(targets=["opencv-digitz"]), "unknown dataset 'opencv-digitz' (did you mean 'opencv-digits'?)"),
    (_with(targets=["no/such/file.csv"]), "unknown dataset 'no/such/file.csv'"),
    (_with(models=_DROP), "missing 'models'"),
    (_with(models=["mobilenet-v3"]), "unknown model 'mobilenet-v3' (did you mean 'mobilenet-v2'?)"),
    (_with(models=["digits-mnist", "digits-mnist"]), "listed twice"),
    (_with(metrics=["logmee"]), "unknown metric 'logmee' in metrics (did you mean 'logme'?)"),
    (_with(tune__method="lorax"), "unknown tune method 'lorax'"),
    (_with(tune__top_k=3), "tune.top_k is 3 but there are only 2 candidate model(s)"),
    (_with(tune__top_k="2"), "tune.top_k must be an integer"),
    (_with(tune__top_k=0), "tune.top_k must be ≥ 1"),
    (_with(tune__ground_truth="yes"), "tune.ground_truth must be true or false"),
    (_with(tune__select_by="leep"), "tune.select_by 'leep' is not one of the metrics"),
    (_with(tune__config={"epochz": 2}), "tune.config: unknown"),
    (_with(tune__config={"epochs": "two"}), "tune.config:"),
    (_with(tune__config=[1]), "tune.config must be a mapping"),
    (_with(tune__topk=1), "unknown key 'topk' in tune (did you mean 'top_k'?)"),
    (_with(merge={"method": "tie"}), "unknown merge method 'tie' (did you mean 'ties'?)"),
    (_with(merge={"method": "ties", "options": {"kk": 0.2}}), "unknown option 'kk' for merge method 'ties'"),
    (_with(seeds=[0.5]), "seeds[0] must be an integer"),
    (_with(seeds=[1, 1]), "seeds must be distinct"),
    (_with(limits={"time": -1}), "limits.time must be a positive number"),
    (_with(limits={"epoch": 1}), "unknown key 'epoch' in limits (did you mean 'epochs'?)"),
    (_with(targets=[{"data": "opencv-digits", "test_size": 1.5}]), "test_size must be a fraction"),
    ([1, 2], "a pipeline must be a mapping"),
    (_with(model_options={"mobilenet-v3": {"size": 96}}), "model_options: 'mobilenet-v3' is not one of the models (did you mean 'mobilenet-v2'?)"),
    (_with(model_options={"mobilenet-v2": {"sise": 96}}), "unknown option 'sise' in model_options.mobilenet-v2 (did you mean 'size'?)"),
    (_with(model_options={"mobilenet-v2": {"size": "96"}}), "model_options.mobilenet-v2.size must be of the type of the catalogue default 224"),
    (_with(model_options={"mobilenet-v2": {"size": 0}}), "model_options.mobilenet-v2.size must be"),
    (_with(model_options={"mobilenet-v2": 96}), "model_options.mobilenet-v2 must be a mapping"),
])
def test_config_errors_are_one_line(cfg, message):
    with pytest.raises(ConfigError) as e:
        load_config(cfg)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="pipeline file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("targets: [a\nmodels: x\n")
    with pytest.raises(ConfigError, match=r"invalid YAML \(line"):
        load_config(bad)


def test_config_defaults_paths_and_round_trip(tmp_path, assets):
    (tmp_path / "data").mkdir()
    _csv(tmp_path / "data" / "t.csv", "movie", 0)
    y = tmp_path / "p.yaml"
    y.write_text(f"targets: [data/t.csv]\nmodels: [{assets['models'][0]}, digits-mnist]\n")
    cfg = load_config(y)  # relative paths resolve against the YAML's folder
    assert cfg.targets[0].data == str(tmp_path / "data" / "t.csv") and cfg.targets[0].name == "t"
    tune = cfg.section("tune")
    assert cfg.section("rank") == ["logme"] and tune.top_k == 1 and tune.select_by == "logme"
    assert tune.method == pl.default_method() and cfg.section("merge") is None and cfg.seeds == [0]
    assert cfg.name == "p" and cfg.source == str(y)
    again = load_config(cfg.to_dict())
    assert again.fingerprint() == cfg.fingerprint()
    every = load_config(_with(metrics="all")).section("rank")
    assert every[0] in ("gbc", "logme") and len(every) > 5
    assert load_config(_with(merge="average")).section("merge").method == "average"


def test_default_pipelines_and_example_validate():
    full, quick = load_config(DEFAULT_PIPELINE), load_config(default_pipeline(quick=True))
    for cfg in (full, quick):
        assert len(cfg.models) == 7 and [t.data for t in cfg.targets] == ["opencv-digits", "sklearn-digits"]
        # ground truth = a real fine-tune of every candidate (not a probe on frozen features)
        tune = cfg.section("tune")
        assert tune.ground_truth and tune.ground_truth_method == "full"
        assert tune.method == "lora" and tune.top_k == 2
        assert cfg.section("merge") is not None and cfg.section("merge").method == "ties"
        # the ImageNet CNNs run at a reduced size in every stage; the digit CNNs keep their own input size
        assert set(cfg.model_options) == {"mobilenet-v2", "efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2"}
    assert {o["size"] for o in full.model_options.values()} == {64}
    assert {o["size"] for o in quick.model_options.values()} == {32}
    assert all(q.per_class < f.per_class for q, f in zip(quick.targets, full.targets))
    assert load_config(full.to_dict()).fingerprint() == full.fingerprint()  # model_options round-trips
    ex = load_config(ROOT / "examples" / "pipeline.yaml")
    assert [t.data for t in ex.targets][:2] == ["vader:movies", "vader:amazon"]
    assert ex.models == ["all-minilm-l6-v2", "paraphrase-minilm-l3-v2", "all-mpnet-base-v2"]


def test_model_options_reach_every_stage(assets, cache, tmp_path, monkeypatch):
    import transferkit.zoo as zoo

    real, calls = zoo.load_model, []

    def spy(spec, **opts):
        calls.append((str(spec), opts))
        return real(spec, **opts)

    monkeypatch.setattr(zoo, "load_model", spy)
    a, b = assets["models"]
    cfg = tiny_config(assets, model_options={a: {"max_length": 4}},
                      tune={"method": "full", "top_k": 2, "config": {"epochs": 1, "batch_size": 8},
                            "ground_truth": True, "ground_truth_method": "linear", "ground_truth_config": {"epochs": 2}})
    assert load_config(cfg).model_options == {a: {"max_length": 4}}
    s = run_pipeline(cfg, tmp_path / "run", progress=False)
    assert s["merge"]["groups"]
    # rank (2 targets) + ground truth (2) + tune (2) + merge (1 group): every load of model a has the option
    assert [o for m, o in calls if m == a] == [{"max_length": 4}] * 7
    assert all(o == {} for m, o in calls if m == b)
    assert s["config"]["model_options"] == {a: {"max_length": 4}}


def _merge_stage(tuned: dict, merge: dict | None = None):
    """Run only the merge stage on a fake run whose tune stage tuned ``tuned`` ({target: [models]})."""
    targets = [pl.Target(t, t) for t in tuned]
    cfg = pl.PipelineConfig(targets=targets, models=sorted({m for ms in tuned.values() for m in ms}),
                            sections={"rank": ["logme"], "tune": pl.TuneSpec("full"),
                                      "merge": pl.MergeSpec("ties", merge or {})})
    run = pl.Run(cfg, Path("/nonexistent"), False, False)
    run.results["tune"] = {"runs": {t: {m: {} for m in ms} for t, ms in tuned.items()}}
    return run


def test_merge_stage_says_why_it_did_not_merge(monkeypatch):
    stage = registry.get("pipeline", "merge").fn
    out = stage.run(_merge_stage({"digits-a": ["m1"], "digits-b": ["m2"]}))
    assert out["skipped"].startswith("no base model was tuned on 2 or more targets")
    assert "tuned per target: digits-a: m1; digits-b: m2" in out["skipped"] and "tune.top_k" in out["skipped"]
    assert out["tuned"] == {"digits-a": ["m1"], "digits-b": ["m2"]}
    out = stage.run(_merge_stage({"only": ["m1", "m2"]}))
    assert out["skipped"].startswith("there is one target")
    # a shared base is merged; the bases tuned on one target only are listed as not merged
    merged = []
    monkeypatch.setattr(merge_stage, "_merge_group",
                        lambda run, spec, base, ts: merged.append((base, ts)) or {"base": base, "tasks": []})
    out = stage.run(_merge_stage({"digits-a": ["m1", "m2"], "digits-b": ["m2", "m3"]}))
    assert merged == [("m2", ["digits-a", "digits-b"])] and "skipped" not in out
    assert out["not_merged"] == ["m1 (tuned on digits-a only)", "m3 (tuned on digits-b only)"]


def test_peak_memory_sees_an_allocation():
    from transferkit.runtime import PeakMemory

    import time

    # Hold the allocation until the sampling thread has run (bounded): on a loaded 2-core CI machine a
    # fixed 0.1 s hold was once too short for the thread to be scheduled at all.
    with PeakMemory(interval=0.01) as mem:
        a = np.ones(64 * 2**20 // 8)  # 64 MiB, touched
        deadline = time.monotonic() + 10
        while mem.peak - mem.start < 40 * 2**20 and time.monotonic() < deadline:
            time.sleep(0.02)
        del a
    assert mem.as_dict()["delta_rss_mb"] >= 40
    assert mem.as_dict()["peak_rss_mb"] >= mem.as_dict()["delta_rss_mb"]


# ---------------------------------------------------------------------------------------------- full run


def test_tiny_run_writes_everything(tiny_run, assets):
    out, s = tiny_run["out"], tiny_run["summary"]
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["stages"] == s["stages"]
    assert [k for k in s["stages"]] == list(STAGES)
    for k, v in s["stages"].items():  # every stage ran; the ones this config does not set say so
        assert v["status"] == "done" or s[k]["skipped"].endswith("is not configured"), (k, s[k])
    assert all(s["stages"][k]["status"] == "done" for k in ("rank", "ground_truth", "tune", "merge", "report"))
    state = json.loads((out / "state.json").read_text())
    assert set(state["stages"]) == set(STAGES)
    for stage in STAGES:
        assert (out / stage / "result.json").is_file()
    assert (out / "pipeline.yaml").is_file() and load_config(out / "pipeline.yaml").fingerprint() == load_config(tiny_config(assets)).fingerprint()
    # rank: every model scored with every metric on both targets
    assert set(s["rank"]) == {"movies", "food"}
    for r in s["rank"].values():
        assert set(r["scores"]) == set(assets["models"]) and set(r["ranking"]) == {"logme", "hscore"}
    assert s["rank"]["food"]["n_train"] + s["rank"]["food"]["n_test"] == 50  # per-target limit
    # ground truth: every candidate measured; τ_w and rel@1 per metric
    gt = s["ground_truth"]
    for t in ("movies", "food"):
        assert set(gt["accuracy"][t]) == set(assets["models"])
        for metric in ("logme", "hscore"):
            ev = gt["evaluation"][t][metric]
            assert {"weighted_tau", "rel@1", "selected"} <= set(ev) and 0 < ev["rel@1"] <= 1
            if len(set(gt["accuracy"][t].values())) > 1 and len({s["rank"][t]["scores"][m][metric] for m in assets["models"]}) > 1:
                assert -1 <= ev["weighted_tau"] <= 1
    # tune: top-2 of each target, chosen with accuracy, params, time and peak memory
    for t in ("movies", "food"):
        assert set(s["tune"]["selected"][t]) == set(assets["models"])
        c = s["tune"]["chosen"][t]
        assert c["method"] == TUNE_METHOD and 0 <= c["accuracy"] <= 1 and c["trainable_params"] > 0
        assert c["seconds"] > 0 and c["peak_rss_mb"] > 50
        assert s["tune"]["runs"][t][c["model"]]["history"]
        # the pick is the argmax of validation accuracy (ties: the better-ranked), never of the test accuracy
        runs, order = s["tune"]["runs"][t], s["tune"]["selected"][t]
        best_val = max(runs[m]["val_accuracy"] for m in order)
        assert c["model"] == next(m for m in order if runs[m]["val_accuracy"] == best_val)
    # merge: both bases were tuned on both targets → one group each; each task is scored on the held-out part
    # recorded by the tune run, so re-scoring the unmerged delta there gives the accuracy tune measured
    groups = s["merge"]["groups"]
    assert {g["base"] for g in groups} == set(assets["models"])
    for g in groups:
        assert [x["target"] for x in g["tasks"]] == ["movies", "food"]
        for x in g["tasks"]:
            n_test = s["rank"][x["target"]]["n_test"]
            tuned = s["tune"]["runs"][x["target"]][g["base"]]["accuracy"]
            assert abs(x["individual"] - tuned) <= 1 / n_test + 1e-9
        assert (out / "merge" / Path(g["base"]).name / "delta" / "delta.safetensors").is_file()
    assert s["environment"]["packages"]["torch"] and s["environment"]["cpu_count"] >= 1
    assert s["command"] == "transferkit run tiny.yaml --out OUT"
    # progress on stderr: stage, target/model and ETA
    err = tiny_run["stderr"]
    n = len(STAGES)
    assert f"stage 1/{n} rank" in err and f"stage {STAGES.index('merge') + 1}/{n} merge" in err
    assert "| ETA " in err and "bert-b" in err


def test_tiny_run_report_has_every_section(tiny_run):
    from test_report import check_full_report

    html = (tiny_run["out"] / "report.html").read_text()
    check_full_report(html, ["movies", "food"], ["logme", "hscore"], merged=True)
    assert sorted(p.name for p in (tiny_run["out"] / "report").glob("*.png")) == [
        "curves-food.png", "curves-movies.png", "merge.png", "scatter-food.png", "scatter-movies.png"]


# ---------------------------------------------------------------------------------------------- resume


class _Count:
    def __init__(self, fn):
        self.fn, self.n = fn, 0

    def __call__(self, *a, **k):
        self.n += 1
        return self.fn(*a, **k)


def _linear_config(assets):
    return tiny_config(assets, tune={"method": "linear", "top_k": 2, "config": {"epochs": 2}, "ground_truth": True})


def test_resume_skips_finished_stages(assets, cache, tmp_path, monkeypatch):
    import transferkit.rank.runner as runner

    cfg, out = _linear_config(assets), tmp_path / "run"

    def boom(run):
        raise RuntimeError("killed during merge")

    with monkeypatch.context() as m:
        m.setattr(merge_stage.MergeStage, "run", lambda self, run: boom(run))
        with pytest.raises(RuntimeError, match="killed"):
            run_pipeline(cfg, out, progress=False)
    state = json.loads((out / "state.json").read_text())
    assert set(state["stages"]) == set(STAGES[:STAGES.index("merge")])  # every stage before merge finished
    assert not (out / "summary.json").exists()

    rank_calls, tune_calls = _Count(runner.rank_models), _Count(tune_stage.tune_unit)
    monkeypatch.setattr(runner, "rank_models", rank_calls)
    monkeypatch.setattr(tune_stage, "tune_unit", tune_calls)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        s = run_pipeline(cfg, out, resume=True)
    assert rank_calls.n == 0 and tune_calls.n == 0  # rank, ground truth and tune were not recomputed
    assert "rank: finished earlier, skipped (resume)" in err.getvalue()
    assert all(v["status"] == "done" or s[k]["skipped"].endswith("is not configured")
               for k, v in s["stages"].items()) and (out / "report.html").is_file()
    assert len(s["merge"]["groups"]) >= 1

    # a second resume redoes nothing at all; a changed config refuses to resume
    s2 = run_pipeline(cfg, out, resume=True, progress=False)
    assert s2["stages"] == s["stages"] and rank_calls.n == 0
    with pytest.raises(ConfigError, match="different pipeline config"):
        run_pipeline({**cfg, "seeds": [1]}, out, resume=True, progress=False)
    # without --resume the folder starts over
    run_pipeline(cfg, out, progress=False)
    assert rank_calls.n == len(cfg["models"]) * len(cfg["targets"])


def test_resume_inside_a_stage_reuses_finished_units(assets, cache, tmp_path, monkeypatch):
    cfg, out = _linear_config(assets), tmp_path / "run"
    cfg["merge"] = None
    real = tune_stage.tune_unit
    calls = []

    def flaky(run, stage, target, model, *a):
        calls.append((stage, target.name, model))
        if len(calls) == 3:
            raise KeyboardInterrupt  # the run is killed in the middle of the ground-truth stage
        return real(run, stage, target, model, *a)

    monkeypatch.setattr(tune_stage, "tune_unit", flaky)
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(cfg, out, progress=False)
    monkeypatch.setattr(tune_stage, "tune_unit", real)
    trained = _Count(__import__("transferkit.tune", fromlist=["tune"]).tune)
    monkeypatch.setattr("transferkit.tune.tune", trained)
    s = run_pipeline(cfg, out, resume=True, progress=False)
    # 4 ground-truth units (2 finished before the kill); the 4 top-2 tune units are reused from ground truth
    assert trained.n == 2
    assert s["merge"]["skipped"] == "merge is not configured" and s["stages"]["merge"]["status"] == "skipped"
    assert all(r["reused_from"] == "ground_truth" for t in s["tune"]["runs"].values() for r in t.values())


def test_time_limit_skips_remaining_ground_truth(assets, cache, tmp_path):
    cfg = _linear_config(assets)
    cfg["limits"] = {"time": 1e-6}
    s = run_pipeline(cfg, tmp_path / "run", progress=False)
    gt = s["ground_truth"]
    assert len(gt["skipped_units"]) == 4 and "time limit" in gt["skipped_units"][0]["reason"]
    assert all("error" in ev for t in gt["evaluation"].values() for ev in t.values())
    assert set(s["tune"]["chosen"]) == {"movies", "food"}  # the required stages still ran
    assert (tmp_path / "run" / "report.html").is_file()


# ---------------------------------------------------------------------------------------------- real assets


@pytest.mark.assets
def test_lora_tunes_an_efficientnet(tmp_path):
    """The demo's LoRA stage can pick an EfficientNet-Lite (LogME ranks one 2nd on sklearn-digits at 64 px):
    its "SAME" convs and its ``_conv_head`` (loaded as ``_conv_top``) must work with PEFT, exactly."""
    import copy

    import torch

    from transferkit.data import load_dataset, train_test_split
    from transferkit.delta import apply
    from transferkit.tune import tune
    from transferkit.zoo import load_model

    train, test = train_test_split(load_dataset("sklearn-digits", per_class=6, seed=0), test_size=0.3, seed=0)
    zm = load_model("efficientnet-lite0", size=32)
    res = tune(zm, train, test, method="lora", config={"epochs": 1, "lr": 5e-3}, progress=False)
    assert res.metrics["trainable_params"] < 0.1 * res.metrics["total_params"]
    clf = copy.deepcopy(zm.classifier(len(train.classes))).eval()
    apply(clf, res.delta)
    x = zm.preprocess(np.asarray(test.X[:4]))
    with torch.no_grad():
        assert torch.allclose(clf(x), res.module.eval()(x), atol=1e-4)


@pytest.mark.assets
@pytest.mark.slow
def test_quick_default_pipeline_end_to_end(tmp_path):
    from test_report import check_full_report

    s = run_pipeline(default_pipeline(quick=True), tmp_path, progress=False)
    targets = ["opencv-digits", "sklearn-digits"]
    assert [t["name"] for t in s["targets"]] == targets
    gt = s["ground_truth"]
    assert gt["method"] == "full" and not gt["skipped_units"]
    for t in targets:
        # ground truth: every candidate really fine-tuned end to end (backbone + head), not a frozen-feature probe
        runs = gt["runs"][t]
        assert set(runs) == set(pl.DEMO_MODELS)
        assert all(r["method"] == "full" and r["trainable_params"] > 0.9 * r["total_params"] for r in runs.values())
        ev = gt["evaluation"][t]["logme"]
        assert ev["n_models"] == 7 and -1 <= ev["weighted_tau"] <= 1 and ev["rel@1"] > 0.5
        chosen = s["tune"]["chosen"][t]
        assert chosen["accuracy"] > 0.5 and chosen["model"] in s["tune"]["selected"][t]
        assert len(s["tune"]["selected"][t]) == 2
    # the top-2 of both targets share a base model: its two per-target deltas are merged
    merge = s["merge"]
    assert "skipped" not in merge and merge["groups"]
    for g in merge["groups"]:
        assert g["targets"] == targets and all(g["base"] in s["tune"]["selected"][t] for t in targets)
        assert [x["target"] for x in g["tasks"]] == targets
        for x in g["tasks"]:
            assert 0 < x["merged"] <= 1 and 0 < x["individual"] <= 1
    check_full_report((tmp_path / "report.html").read_text(), targets, ["logme", "leep", "nce", "transrate"], merged=True)
