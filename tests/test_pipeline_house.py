"""The pipeline as a house: a stage added from outside runs with resume and report; identities of a run;
resume after a kill in any stage gives the same results; every registered merge method is a pipeline method."""

import json

import numpy as np
import pytest
import yaml
from _cli import bad, ok
from test_pipeline import assets, tiny_config  # noqa: F401  (fixture)

from transferkit import pipeline as pl
from transferkit import registry
from transferkit.pipeline import load_config, run_pipeline
from transferkit.pipeline.config import integer, mapping

STAGE_NAMES = [s.name for s in pl.stages()]


@pytest.fixture
def cache(assets, monkeypatch):  # noqa: F811
    monkeypatch.setenv("TRANSFERKIT_CACHE", str(assets["cache"]))


def _fast(assets, **over):  # noqa: F811
    """Linear probes only: the whole run takes seconds."""
    return tiny_config(assets, **{"tune": {"method": "linear", "top_k": 2, "config": {"epochs": 2},
                                           "ground_truth": True}, **over})


# ------------------------------------------------------------------------------------------ a new stage


class Toy(pl.Stage):
    """Counts each target's training items times a factor (one unit per target)."""

    name, order, key = "toy", 45, "toy"
    calls: list = []

    def parse(self, raw, cfg):
        raw = mapping(raw, "toy")
        unknown = set(raw) - {"factor"}
        if unknown:
            raise pl.config.ConfigError(f"unknown key {sorted(unknown)[0]!r} in toy")
        return {"factor": integer(raw.get("factor", 2), "toy.factor", optional=False)}

    def run(self, run):
        from transferkit.io import write_json

        factor = run.cfg.section("toy")["factor"]

        def one(target):
            path = run.out / "toy" / f"{target.name}.json"
            if run.resume and path.is_file():
                return {**json.loads(path.read_text()), "resumed": True}
            Toy.calls.append(target.name)
            if Toy.calls == ["movies", "food"] and Toy.kill:  # killed after its first unit
                raise KeyboardInterrupt
            train, _ = run.data(target)
            rec = {"target": target.name, "count": factor * len(train)}
            write_json(path, rec)
            return rec

        recs, _ = run.units("toy", [(t,) for t in run.cfg.targets], one)
        return {"counts": {r["target"]: r["count"] for r in recs}}

    def report(self, result, summary, figure):
        import io

        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(3, 2))
        ax.bar(list(result["counts"]), list(result["counts"].values()))
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        plt.close(fig)
        return {"title": "Toy counts", "text": ["items × factor per target"],
                "tables": [{"header": ["target", "count"], "rows": [[t, c] for t, c in result["counts"].items()]}],
                "figures": [figure("counts", buf.getvalue())]}


@pytest.fixture
def toy(monkeypatch):
    monkeypatch.setitem(registry._REGISTRY, "pipeline", dict(registry._REGISTRY["pipeline"]))
    Toy.calls, Toy.kill = [], True
    pl.register_stage(Toy())
    return Toy


def test_a_stage_registered_outside_runs_through_the_cli_with_resume_and_report(toy, assets, cache, tmp_path):  # noqa: F811
    cfg = _fast(assets, merge=None, toy={"factor": 3})
    cfg["tune"]["ground_truth"] = False
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "run"
    # killed inside the toy stage, after its first unit
    from typer.testing import CliRunner

    from transferkit.cli import app

    res = CliRunner().invoke(app, ["run", str(path), "--out", str(out)])
    assert isinstance(res.exception, KeyboardInterrupt) or res.exit_code != 0
    state = json.loads((out / "state.json").read_text())
    assert "toy" not in state["stages"] and state["stages"]["tune"]["status"] == "done"
    toy.kill = False
    ok(["run", path, "--out", out, "--resume", "--json"])
    assert toy.calls == ["movies", "food", "food"]  # movies was not redone
    summary = json.loads((out / "summary.json").read_text())
    train_sizes = {t["name"]: t["n_train"] for t in summary["targets"]}
    assert summary["toy"] == {"counts": {t: 3 * n for t, n in train_sizes.items()}}
    assert summary["stages"]["toy"]["status"] == "done" and list(summary["stages"])[-2:] == ["toy", "report"]
    html = (out / "report.html").read_text()
    assert 'id="stage-toy"' in html and "Toy counts" in html and f"<td>{3 * train_sizes['food']}</td>" in html
    assert (out / "report" / "toy-counts.png").is_file()
    # its YAML key is validated by its own parse
    broken = tmp_path / "broken.yaml"
    broken.write_text(yaml.safe_dump({**cfg, "toy": {"factr": 3}}))
    bad(["run", broken, "--out", tmp_path / "b"], "unknown key 'factr' in toy")


def test_stages_are_registered_in_the_one_registry():
    import importlib
    import pkgutil

    stage_modules = importlib.import_module("transferkit.pipeline.stages")  # the package (pipeline.stages is a function)

    built_in = ["rank", "ground_truth", "tune", "merge", "report"]
    assert [n for n in STAGE_NAMES if n in built_in] == built_in  # in run order
    assert STAGE_NAMES[-1] == "report"
    # one module, one stage: every module of pipeline/stages registered itself, nothing else did
    modules = {m.name for m in pkgutil.iter_modules(stage_modules.__path__) if not m.name.startswith("_")}
    assert set(registry.methods("pipeline")) == set(STAGE_NAMES) == modules


# ------------------------------------------------------------------------------------------ identities


def test_merging_a_delta_with_itself_gives_normalized_one(assets, cache, tmp_path):  # noqa: F811
    """Two targets with the same data and seed give the same delta; their average is that delta, so every
    task keeps exactly its individual accuracy."""
    data = assets["targets"][0]
    cfg = tiny_config(assets, targets=[{"data": data, "name": "a"}, {"data": data, "name": "b"}],
                      models=[assets["models"][0]],
                      tune={"method": "full", "top_k": 1, "config": {"epochs": 1, "batch_size": 8}},
                      merge={"method": "average"})
    s = run_pipeline(cfg, tmp_path / "run", progress=False)
    (group,) = s["merge"]["groups"]
    assert [t["target"] for t in group["tasks"]] == ["a", "b"]
    for task in group["tasks"]:
        assert task["merged"] == task["individual"] and task["normalized"] == 1.0


_MULTI_TASK = [n for n, m in registry.methods("merge").items()
               if m.info.get("n_models") is None and m.info.get("heads") != "averaged"]


@pytest.mark.parametrize("method", _MULTI_TASK)
def test_every_registered_multi_task_merge_method_is_a_pipeline_method(method):
    """Defect: the pipeline kept its own list of three merge methods and rejected dare_ties, dare_linear, fisher."""
    cfg = load_config({"targets": ["opencv-digits"], "models": ["mobilenet-v2", "digits-mnist"],
                       "tune": {"method": "full"}, "merge": {"method": method}})
    assert cfg.section("merge").method == method


def test_the_pipeline_takes_the_registrys_merge_methods_and_explains_the_rest():
    assert {"dare_ties", "dare_linear", "fisher", "ties", "task_arithmetic", "average"} <= set(_MULTI_TASK)
    for method in set(registry.methods("merge")) - set(_MULTI_TASK):  # negation: one model; uniform_soup: one task
        with pytest.raises(pl.config.ConfigError, match="does not merge the deltas of several targets"):
            load_config({"targets": ["opencv-digits"], "models": ["mobilenet-v2", "digits-mnist"],
                         "tune": {"method": "full"}, "merge": {"method": method}})


def test_merge_options_are_checked_by_the_methods_typed_options():
    base = {"targets": ["opencv-digits"], "models": ["mobilenet-v2", "digits-mnist"], "tune": {"method": "full"}}
    with pytest.raises(pl.config.ConfigError, match="did you mean 'k'"):
        load_config({**base, "merge": {"method": "ties", "options": {"kk": 0.2}}})
    with pytest.raises(pl.config.ConfigError, match="ties"):
        load_config({**base, "merge": {"method": "ties", "options": {"k": "a lot"}}})


# ------------------------------------------------------------------------------------------ resume


def _results(summary: dict) -> dict:
    """What a run computed: the stage results without times, memory and resume markers."""
    drop = {"seconds", "peak_rss_mb", "delta_rss_mb", "cuda_peak_mb", "resumed", "time_s", "pass_s"}

    def strip(obj):
        if isinstance(obj, dict):
            return {k: strip(v) for k, v in obj.items() if k not in drop}
        if isinstance(obj, list):
            return [strip(v) for v in obj]
        return obj

    return strip({k: summary[k] for k in ("targets", "rank", "ground_truth", "tune", "merge")})


@pytest.fixture(scope="module")
def reference(assets, tmp_path_factory):  # noqa: F811
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRANSFERKIT_CACHE", str(assets["cache"]))
        cfg = _fast(assets, merge={"method": "average"})
        return cfg, run_pipeline(cfg, tmp_path_factory.mktemp("reference"), progress=False)


def test_a_second_run_gives_identical_results(reference, cache, tmp_path):
    """At one torch thread count a run is repeatable bit for bit (README: what the thread count changes)."""
    import torch

    cfg, ref = reference
    again = run_pipeline(cfg, tmp_path / "again", progress=False)
    assert _results(again) == _results(ref)
    assert again["environment"]["torch_threads"] == torch.get_num_threads()


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["rank", "ground_truth", "tune", "merge", "report"])
def test_resume_after_a_kill_in_any_stage_gives_the_same_results(stage, reference, cache, tmp_path, monkeypatch):
    cfg, ref = reference
    real_units = pl.Run.units

    def killing_units(self, name, units, fn, **kw):
        if name != stage:
            return real_units(self, name, units, fn, **kw)

        def first_then_kill(*unit):
            if getattr(self, "_done_one", False):
                raise KeyboardInterrupt
            self._done_one = True
            return fn(*unit)
        return real_units(self, name, units, first_then_kill, **kw)

    def killing_report(*a, **k):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(pl.Run, "units", killing_units)
        m.setattr("transferkit.report.write_report", killing_report)
        with pytest.raises(KeyboardInterrupt):
            run_pipeline(cfg, tmp_path / "run", progress=False)
    resumed = run_pipeline(cfg, tmp_path / "run", resume=True, progress=False)
    assert _results(resumed) == _results(ref)
    assert all(v["status"] in ("done", "skipped") for v in resumed["stages"].values())


def test_the_split_is_recorded_once_and_reused(assets, cache, tmp_path):  # noqa: F811
    """Every stage uses the one recorded split; a resumed run reloads it and checks the data is unchanged."""
    cfg = _fast(assets, merge=None)
    cfg["tune"]["ground_truth"] = False
    out = tmp_path / "run"
    s = run_pipeline(cfg, out, progress=False)
    record = json.loads((out / "splits" / "movies.json").read_text())
    assert len(record["test_ids"]) == s["rank"]["movies"]["n_test"]
    assert s["targets"][0]["split"]["test_sha256"] == record["test_sha256"]
    # the delta of every tune unit records the same held-out ids
    from transferkit.delta import Delta

    for model, r in s["tune"]["runs"]["movies"].items():
        delta = Delta.load(out / r["dir"] / "delta")
        assert delta.meta["split"]["test_ids"] == record["test_ids"]
    # the data changed under a resumed run: refused, not silently re-split
    csv = assets["targets"][0]
    original = open(csv).read()
    try:
        open(csv, "w").write(original.replace("good", "fine", 1))
        (out / "state.json").unlink()
        with pytest.raises(Exception, match="changed since it was split"):
            run_pipeline(cfg, out, resume=True, progress=False)
    finally:
        open(csv, "w").write(original)
    assert np.asarray(record["test_ids"]).max() < record["n"]
