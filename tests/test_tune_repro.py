"""Issue 14: one seed gives one tune run (LoRA too, across processes and across a kill + resume); the CLI
checkpoints by default and says when a resume starts from scratch; absurd training options, data of the
wrong modality and a diverged run are one-line errors before anything is written."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from test_pipeline import assets, tiny_config  # noqa: F401  (fixture)
from test_tune_common import image_data, image_model, text_data, text_model
from typer.testing import CliRunner

from transferkit.cli import app
from transferkit.engine import TrainConfig
from transferkit.errors import ConfigError, DataError
from transferkit.tune import tune

runner = CliRunner()


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TRANSFERKIT_CACHE", str(tmp_path / "cache"))


# ------------------------------------------------------------------------------- 1. seeded initialisation
ONE_RUN = textwrap.dedent("""
    import sys
    sys.path.insert(0, sys.argv[4])
    from test_tune_common import text_data, text_model
    from transferkit.tune import tune

    bert, csv, out = sys.argv[1:4]
    tr, te = text_data(csv)
    tune(text_model(bert), tr, te, method=sys.argv[5], config={"epochs": 1, "r": 2, "seed": 3}, out_dir=out,
         progress=False)
""")


@pytest.mark.parametrize("method", ["lora", "prompt"])
def test_two_processes_give_bitwise_equal_deltas(tiny_bert_dir, sentiment_csv, tmp_path, method):
    """Defect: peft.get_peft_model drew lora_A (and prompt embeddings) from the unseeded global RNG."""
    from pathlib import Path

    from transferkit.delta import Delta

    script = tmp_path / "one.py"
    script.write_text(ONE_RUN if method == "lora" else ONE_RUN.replace('"r": 2, ', '"num_virtual_tokens": 2, '))
    tests = str(Path(__file__).parent)
    deltas = []
    for i in range(2):
        out = tmp_path / f"run{i}"
        res = subprocess.run([sys.executable, str(script), str(tiny_bert_dir), str(sentiment_csv), str(out), tests,
                              method], capture_output=True, text=True, timeout=300,
                             env={**__import__("os").environ, "PYTHONHASHSEED": str(i)})
        assert res.returncode == 0, res.stderr[-3000:]
        deltas.append(Delta.load(out / "delta"))
    a, b = deltas
    assert set(a.tensors) == set(b.tensors) and a.tensors
    for k in a.tensors:
        assert torch.equal(a.tensors[k], b.tensors[k]), k


@pytest.mark.parametrize("method", ["lora", "adapter"])
def test_initialisation_does_not_depend_on_the_callers_rng(tiny_bert_dir, sentiment_csv, method):
    model = text_model(tiny_bert_dir)
    tr, te = text_data(sentiment_csv)
    cfg = {"epochs": 1, "lr": 1e-12, **({"r": 2} if method == "lora" else {"bottleneck": 4})}
    runs = []
    for s in (1, 2):
        torch.manual_seed(s)
        state = torch.get_rng_state()
        runs.append(tune(model, tr, te, method=method, config=cfg, progress=False).delta)
        assert torch.equal(torch.get_rng_state(), state)  # and the caller's RNG is left as it was
    for k in runs[0].tensors:
        assert torch.equal(runs[0].tensors[k], runs[1].tensors[k]), k


def test_a_killed_and_resumed_lora_pipeline_equals_the_uninterrupted_one(assets, tmp_path, monkeypatch):  # noqa: F811
    """Killed inside the tune stage, during the second LoRA unit's training; `run --resume` finishes it."""
    from test_pipeline_house import _results

    import transferkit.tune._common as common
    from transferkit.pipeline import run_pipeline

    monkeypatch.setenv("TRANSFERKIT_CACHE", str(assets["cache"]))
    cfg = tiny_config(assets, merge={"method": "average"},
                      tune={"method": "lora", "top_k": 2, "config": {"epochs": 2, "lr": 5e-3, "batch_size": 8}})
    reference = run_pipeline(cfg, tmp_path / "reference", progress=False)
    assert reference["tune"]["runs"] and all(
        r["delta_kind"] == "lora" for runs in reference["tune"]["runs"].values() for r in runs.values())

    real_train, calls = common.train, []

    def killing_train(module, data, objective, *a, **kw):
        calls.append(1)
        if len(calls) < 2:
            return real_train(module, data, objective, *a, **kw)
        steps = []

        def dies_at_step_3(model, batch):
            steps.append(1)
            if len(steps) == 3:
                raise KeyboardInterrupt
            return objective(model, batch)
        return real_train(module, data, dies_at_step_3, *a, **kw)

    with monkeypatch.context() as m:
        m.setattr(common, "train", killing_train)
        with pytest.raises(KeyboardInterrupt):
            run_pipeline(cfg, tmp_path / "run", progress=False)
    assert len(calls) == 2
    # another process would have consumed the global RNG differently before resuming
    torch.manual_seed(12345)
    torch.rand(7)
    resumed = run_pipeline(cfg, tmp_path / "run", resume=True, progress=False)
    assert _results(resumed) == _results(reference)


# ------------------------------------------------------------------------------- 2. checkpoints by default
def test_cli_checkpoints_without_resume_and_says_when_a_resume_starts_fresh(tiny_bert_dir, sentiment_csv, tmp_path):
    out = tmp_path / "run"
    base = ["tune", "--data", str(sentiment_csv), "--model", str(tiny_bert_dir), "--method", "full", "--epochs", "1",
            "--out", str(out)]
    res = runner.invoke(app, base + ["--resume"])
    assert res.exit_code == 0, res.output
    assert f"resume: no checkpoint in {out}, starting from scratch" in res.stderr.strip().splitlines()
    # a first run *without* --resume leaves a checkpoint to resume from
    out2 = tmp_path / "run2"
    res = runner.invoke(app, base[:-1] + [str(out2)])
    assert res.exit_code == 0, res.output
    assert list((out2 / "checkpoints").glob("step-*")), "no checkpoint written by default"
    res = runner.invoke(app, base[:-1] + [str(out2), "--resume"])
    assert res.exit_code == 0 and "starting from scratch" not in res.stderr


# ------------------------------------------------------------------------------- 3. sane maxima
@pytest.mark.parametrize("option,value", [("epochs", 10**12), ("max_steps", 10**9), ("batch_size", 2**21),
                                          ("grad_accum", 2**17)])
def test_absurd_training_options_are_refused(option, value):
    with pytest.raises(ConfigError, match=rf"^train option {option} must be at most [\d_]+, got [\d_]+$"):
        TrainConfig(**{option: value})
    TrainConfig(epochs=100_000, max_steps=10**8, batch_size=2**20)  # the maxima themselves are fine


def test_cli_refuses_a_trillion_epochs_in_one_line(tiny_bert_dir, sentiment_csv, tmp_path, monkeypatch):
    def started(*a, **k):
        raise AssertionError("a run of 10^12 epochs was started")

    monkeypatch.setattr("transferkit.tune.baselines.tune", started)
    res = runner.invoke(app, ["tune", "--data", str(sentiment_csv), "--model", str(tiny_bert_dir), "--epochs",
                              "1000000000000", "--out", str(tmp_path / "r")])
    assert res.exit_code == 2 and len(res.stderr.strip().splitlines()) == 1 and "epochs" in res.stderr
    assert not (tmp_path / "r").exists()


# ------------------------------------------------------------------------------- 4. modality of the data
@pytest.mark.parametrize("method", ["linear", "full", "lora", "ia3", "bitfit"])
def test_text_data_into_an_image_model_is_refused_by_every_method(sentiment_csv, tmp_path, method):
    tr, te = text_data(sentiment_csv)
    with pytest.raises(DataError, match="takes image inputs but .* is text data"):
        tune(image_model(), tr, te, method=method, config={"epochs": 1}, out_dir=tmp_path / "r", progress=False)
    assert not (tmp_path / "r" / "delta").exists()


def test_image_data_into_a_text_model_is_refused(tiny_bert_dir):
    tr, te = image_data()
    with pytest.raises(DataError, match="takes text inputs but .* is image data"):
        tune(text_model(tiny_bert_dir), tr, te, method="full", progress=False)


# ------------------------------------------------------------------------------- 5. divergence
@pytest.mark.parametrize("method", ["linear", "full", "lora"])
def test_a_diverged_run_stops_with_one_line_and_writes_no_delta(tiny_bert_dir, sentiment_csv, tmp_path, method):
    from transferkit.engine.loop import TrainingDiverged

    tr, te = text_data(sentiment_csv)
    out = tmp_path / "r"
    with pytest.raises(TrainingDiverged, match=r"training diverged: .* at step \d+ of \d+ .*lr") as e:
        tune(text_model(tiny_bert_dir), tr, te, method=method, config={"epochs": 2, "lr": 1e30}, out_dir=out,
             progress=False)
    assert "\n" not in str(e.value)
    assert not (out / "delta").exists() and not (out / "peft").exists() and not (out / "metrics.json").exists()


def test_cli_diverged_run_exits_2(tiny_bert_dir, sentiment_csv, tmp_path):
    res = runner.invoke(app, ["tune", "--data", str(sentiment_csv), "--model", str(tiny_bert_dir), "--lr", "1e30",
                              "--epochs", "2", "--out", str(tmp_path / "r")])
    assert res.exit_code == 2
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("error: training diverged") and "lr" in last
    assert not (tmp_path / "r" / "delta").exists()


def test_divergence_check_keeps_ordinary_runs_and_resume_exact(tmp_path):
    """A healthy run is untouched; the first loss is checkpointed, so a resumed run judges against the same scale."""
    from transferkit.engine import train

    torch.manual_seed(0)
    X, y = torch.randn(64, 4), (torch.randn(64) > 0).long()
    cfg = TrainConfig(epochs=4, lr=1e-2, batch_size=8, checkpoint_every=5, progress=False)
    m1 = torch.nn.Linear(4, 2)
    m2 = torch.nn.Linear(4, 2)
    m2.load_state_dict(m1.state_dict())
    train(m1, (X, y), None, cfg, out_dir=tmp_path / "a")
    from transferkit.engine.checkpoint import load_checkpoint, latest_checkpoint

    _, state = load_checkpoint(latest_checkpoint(tmp_path / "a" / "checkpoints"))
    assert isinstance(state["first_loss"], float) and state["first_loss"] > 0
    json.dumps(state["first_loss"])
