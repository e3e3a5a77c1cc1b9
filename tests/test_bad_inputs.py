"""Bad input to every command: exit code 2, one ``error: …`` line (the last on stderr), and ``--out`` unchanged.

Each case runs in a work folder holding the inputs (a small CSV, a one-class CSV, run folders, YAML files) and a
user's own file; the whole folder (and the tiny model) is hashed before and after: a refused command changes
nothing — no ``--out`` created, no user file touched, no temporary left behind.
"""

import hashlib
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from _cli import bad

BOMB = "\n".join([
    'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]',
    *(f"{c}: &{c} [{', '.join([f'*{p}'] * 9)}]" for p, c in zip("abcdefgh", "bcdefghi")),
])


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TRANSFERKIT_CACHE", str(tmp_path / "cache"))


def _delta_run(path: Path, base: str, seed: int) -> None:
    from transferkit.delta import from_states

    g = torch.Generator().manual_seed(seed)
    body = {"w": torch.zeros(4, 3), "b": torch.zeros(4)}
    tuned = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in body.items()}
    from_states(body, tuned, base_name=base).save(path / "delta")


@pytest.fixture()
def work(tmp_path, tiny_bert_dir, sentiment_csv):
    """The inputs of every case, and a user's file, in one folder that no case may change (one per case: a
    command that wrecks it cannot fail the next cases)."""
    w = tmp_path / "work"
    w.mkdir()
    (w / "notes.txt").write_text("the user's own file\n")
    shutil.copy(sentiment_csv, w / "good.csv")
    (w / "one.csv").write_text("text,label\n" + "".join(f"good movie {i},positive\n" for i in range(20)))
    (w / "empty.csv").write_text("text,label\n")
    (w / "nolabel.csv").write_text("words\n" + "".join(f"w{i}\n" for i in range(10)))
    rng = np.random.default_rng(0)
    X = rng.normal(size=(20, 4)).astype(np.float32)
    X[3, 1] = np.nan
    np.savez(w / "nan.npz", X=X, y=np.arange(20) % 2)
    np.savez(w / "floaty.npz", X=rng.normal(size=(20, 4)).astype(np.float32), y=np.linspace(0, 1, 20))
    (w / "a-file").write_text("not a folder\n")
    (w / "bomb.yaml").write_text(BOMB + "\nname: *i\n")
    (w / "bomb-config.yaml").write_text(BOMB + "\nr: *i\n")
    (w / "broken.yaml").write_text("r: [1, 2\n  lr: : :\n")
    (w / "list.yaml").write_text("- 1\n- 2\n")
    (w / "r-eight.yaml").write_text("r: eight\n")
    model = w / "model"
    shutil.copytree(tiny_bert_dir, model)
    (w / "broken-model").mkdir()
    (w / "broken-model" / "config.json").write_text("{not json")
    _delta_run(w / "runA", str(model), 0)
    _delta_run(w / "runB", str(model), 1)
    _delta_run(w / "runC", "another-base", 2)
    # a folder the user made, holding files whose names transferkit writes
    for sub, name in (("mine-rank", "ranking.json"), ("mine-tune", "metrics.json"), ("mine-run", "pipeline.yaml")):
        (w / sub).mkdir()
        (w / sub / name).write_text("the user's own\n")
        (w / sub / "notes.txt").write_text("the user's notes\n")
    (w / "mine").mkdir()
    (w / "mine" / "data.txt").write_text("precious\n")
    good = f"targets: [{w / 'good.csv'}]\nmodels: [{model}]\nmetrics: [logme]\n"
    (w / "p-one-class.yaml").write_text(good.replace("good.csv", "one.csv"))
    (w / "p-two-targets-one-bad.yaml").write_text(
        f"targets: [{w / 'good.csv'}, {w / 'one.csv'}]\nmodels: [{model}]\nmetrics: [logme]\n")
    (w / "p-unknown-key.yaml").write_text(good + "epochz: 3\n")
    (w / "p-unknown-data.yaml").write_text(good.replace(str(w / "good.csv"), "no-such-dataset"))
    (w / "p-bad-seed.yaml").write_text(good + "seeds: [-1]\n")
    (w / "p-bad-metric.yaml").write_text(good.replace("[logme]", "[logmee]"))
    (w / "p-not-mapping.yaml").write_text("- just\n- a list\n")
    (w / "p-good.yaml").write_text(good)
    if os.name == "posix" and hasattr(os, "geteuid") and os.geteuid() != 0:
        (w / "locked").mkdir()
        os.chmod(w / "locked", 0o555)
    return w


def _snapshot(*roots: Path) -> dict:
    snap = {}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            rel = os.path.relpath(dirpath, root)
            snap[(str(root), rel)] = sorted(dirnames + filenames)
            for f in filenames:
                snap[(str(root), os.path.join(rel, f))] = hashlib.sha256(Path(dirpath, f).read_bytes()).hexdigest()
    return snap


R, T, M, F = "rank", "tune", "merge", "features"
D, MD = "{w}/good.csv", "{w}/model"
CASES = [
    # --- rank
    ("rank-no-models", [R, "--data", D, "--out", "{w}/out"], "rank needs --data and --models"),
    ("rank-unknown-metric", [R, "--data", D, "--models", MD, "--metrics", "logmee", "--out", "{w}/out"], "unknown metric"),
    ("rank-seed-negative", [R, "--data", D, "--models", MD, "--seed", "-1", "--out", "{w}/out"], "--seed"),
    ("rank-seed-too-big", [R, "--data", D, "--models", MD, "--seed", str(2**40), "--out", "{w}/out"], "--seed"),
    ("rank-test-size", [R, "--data", D, "--models", MD, "--test-size", "2", "--out", "{w}/out"], "--test-size"),
    ("rank-epochs-float", [R, "--data", D, "--models", MD, "--epochs", "1.5"], "--epochs"),
    ("rank-limit-text", [R, "--data", D, "--models", MD, "--limit", "many"], "--limit"),
    ("rank-ground-truth", [R, "--data", D, "--models", MD, "--ground-truth", "oracle", "--out", "{w}/out"],
     "unknown --ground-truth"),
    ("rank-out-is-file", [R, "--data", D, "--models", MD, "--out", "{w}/a-file"], "is a file"),
    ("rank-out-below-file", [R, "--data", D, "--models", MD, "--out", "{w}/a-file/sub"], "below the file"),
    ("rank-out-user-files", [R, "--data", D, "--models", MD, "--out", "{w}/mine-rank"], "did not write"),
    ("rank-out-is-model", [R, "--data", D, "--models", MD, "--out", "{w}/model"], "input"),
    ("rank-missing-data", [R, "--data", "{w}/nope.csv", "--models", MD, "--out", "{w}/out"], "nope.csv"),
    ("rank-missing-model", [R, "--data", D, "--models", "{w}/no-model", "--out", "{w}/out"], "no-model"),
    ("rank-unknown-option", [R, "--data", D, "--models", MD, "--metric", "logme"], "--metric"),
    # --- tune
    ("tune-no-data", [T, "--model", MD, "--out", "{w}/out"], "tune needs --data and --model"),
    ("tune-unknown-method", [T, "--data", D, "--model", MD, "--method", "lorra", "--out", "{w}/out"], "lorra"),
    ("tune-epochs-float", [T, "--data", D, "--model", MD, "--epochs", "1.5", "--out", "{w}/out"], "--epochs"),
    ("tune-lr-text", [T, "--data", D, "--model", MD, "--lr", "fast", "--out", "{w}/out"], "--lr"),
    ("tune-seed-negative", [T, "--data", D, "--model", MD, "--seed", "-1", "--out", "{w}/out"], "--seed"),
    ("tune-config-bomb", [T, "--data", D, "--model", MD, "--method", "lora", "--config", "{w}/bomb-config.yaml",
                          "--out", "{w}/out"], "YAML aliases"),
    ("tune-config-broken", [T, "--data", D, "--model", MD, "--config", "{w}/broken.yaml", "--out", "{w}/out"],
     "cannot parse"),
    ("tune-config-list", [T, "--data", D, "--model", MD, "--config", "{w}/list.yaml", "--out", "{w}/out"],
     "must hold a mapping"),
    ("tune-config-missing", [T, "--data", D, "--model", MD, "--config", "{w}/nope.yaml", "--out", "{w}/out"],
     "config file not found"),
    ("tune-config-r-eight", [T, "--data", D, "--model", MD, "--method", "lora", "--config", "{w}/r-eight.yaml",
                             "--out", "{w}/out"], "'eight'"),
    ("tune-out-is-file", [T, "--data", D, "--model", MD, "--out", "{w}/a-file"], "is a file"),
    ("tune-out-user-files", [T, "--data", D, "--model", MD, "--out", "{w}/mine-tune"], "did not write"),
    ("tune-out-is-model", [T, "--data", D, "--model", MD, "--out", "{w}/model"], "input"),
    ("tune-out-inside-model", [T, "--data", D, "--model", MD, "--out", "{w}/model/run"], "inside the input"),
    ("tune-one-class", [T, "--data", "{w}/one.csv", "--model", MD, "--out", "{w}/out"], "class"),
    ("tune-empty-data", [T, "--data", "{w}/empty.csv", "--model", MD, "--out", "{w}/out"], "empty.csv"),
    ("tune-no-label-column", [T, "--data", "{w}/nolabel.csv", "--model", MD, "--out", "{w}/out"], "nolabel.csv"),
    ("tune-nan-features", [T, "--data", "{w}/nan.npz", "--model", MD, "--out", "{w}/out"], "finite"),
    ("tune-missing-model", [T, "--data", D, "--model", "{w}/no-model", "--out", "{w}/out"], "no-model"),
    ("tune-broken-model", [T, "--data", D, "--model", "{w}/broken-model", "--out", "{w}/out"], "broken-model"),
    # --- merge
    ("merge-no-out", [M, "--method", "ties", "--models", "{w}/runA,{w}/runB"], "merge needs --out"),
    ("merge-unknown-method", [M, "--method", "tiez", "--models", "{w}/runA,{w}/runB", "--out", "{w}/out"],
     "unknown merge method"),
    ("merge-out-is-input", [M, "--method", "ties", "--models", "{w}/runA,{w}/runB", "--out", "{w}/runA"], "input"),
    ("merge-out-inside-input", [M, "--method", "ties", "--models", "{w}/runA,{w}/runB", "--out", "{w}/runB/m"],
     "inside the input"),
    ("merge-out-holds-inputs", [M, "--method", "ties", "--models", "{w}/runA,{w}/runB", "--out", "{w}"],
     "holds the input"),
    ("merge-out-foreign", [M, "--method", "ties", "--models", "{w}/runA,{w}/runB", "--out", "{w}/mine"],
     "did not write"),
    ("merge-out-is-file", [M, "--method", "ties", "--models", "{w}/runA,{w}/runB", "--out", "{w}/a-file"],
     "is a file"),
    ("merge-missing-model", [M, "--method", "ties", "--models", "{w}/runA,{w}/nope", "--out", "{w}/out"],
     "model not found"),
    ("merge-other-bases", [M, "--method", "ties", "--models", "{w}/runA,{w}/runC", "--out", "{w}/out"],
     "incompatible models"),
    ("merge-param-no-value", [M, "--method", "ties", "--models", "{w}/runA,{w}/runB", "--param", "k",
                              "--out", "{w}/out"], "KEY=VALUE"),
    ("merge-param-range", [M, "--method", "ties", "--models", "{w}/runA,{w}/runB", "--param", "k=7",
                           "--out", "{w}/out"], "k"),
    ("merge-weights-count", [M, "--method", "task_arithmetic", "--models", "{w}/runA,{w}/runB", "--weights", "1",
                             "--out", "{w}/out"], "weight"),
    ("merge-seed-negative", [M, "--method", "ties", "--models", "{w}/runA,{w}/runB", "--seed", "-1",
                             "--out", "{w}/out"], "--seed"),
    ("merge-config-bomb", [M, "{w}/bomb.yaml", "--out", "{w}/out"], "YAML aliases"),
    ("merge-config-missing", [M, "{w}/nope.yaml", "--out", "{w}/out"], "config file not found"),
    # --- features
    ("features-seed-negative", [F, "--data", D, "--model", MD, "--seed", "-1", "--out", "{w}/out"], "--seed"),
    ("features-out-is-file", [F, "--data", D, "--model", MD, "--out", "{w}/a-file"], "is a file"),
    ("features-out-foreign", [F, "--data", D, "--model", MD, "--out", "{w}/mine"], "did not write"),
    ("features-out-is-model", [F, "--data", D, "--model", MD, "--out", "{w}/model"], "input"),
    ("features-out-holds-data", [F, "--data", D, "--model", MD, "--out", "{w}"], "holds the input"),
    ("features-missing-data", [F, "--data", "{w}/nope.csv", "--model", MD, "--out", "{w}/out"], "nope.csv"),
    ("features-missing-model", [F, "--data", D, "--model", "{w}/no-model", "--out", "{w}/out"], "no-model"),
    ("features-batch-size-text", [F, "--data", D, "--model", MD, "--batch-size", "big"], "--batch-size"),
    ("features-no-model", [F, "--data", D], "--model"),
    # --- fetch
    ("fetch-unknown", ["fetch", "no-such-asset"], "no-such-asset"),
    ("fetch-no-name", ["fetch"], "names"),
    ("fetch-unknown-option", ["fetch", "vader", "--verbose"], "--verbose"),
    # --- run / demo
    ("run-missing-file", ["run", "{w}/nope.yaml", "--out", "{w}/out"], "pipeline file not found"),
    ("run-bomb", ["run", "{w}/bomb.yaml", "--out", "{w}/out"], "YAML aliases"),
    ("run-broken-yaml", ["run", "{w}/broken.yaml", "--out", "{w}/out"], "invalid YAML"),
    ("run-not-mapping", ["run", "{w}/p-not-mapping.yaml", "--out", "{w}/out"], "mapping"),
    ("run-unknown-key", ["run", "{w}/p-unknown-key.yaml", "--out", "{w}/out"], "epochz"),
    ("run-unknown-data", ["run", "{w}/p-unknown-data.yaml", "--out", "{w}/out"], "unknown dataset"),
    ("run-bad-seed", ["run", "{w}/p-bad-seed.yaml", "--out", "{w}/out"], "seeds[0]"),
    ("run-bad-metric", ["run", "{w}/p-bad-metric.yaml", "--out", "{w}/out"], "logmee"),
    ("run-one-class-target", ["run", "{w}/p-one-class.yaml", "--out", "{w}/out"], "class"),
    ("run-second-target-bad", ["run", "{w}/p-two-targets-one-bad.yaml", "--out", "{w}/out"], "class"),
    ("run-out-is-file", ["run", "{w}/p-good.yaml", "--out", "{w}/a-file"], "is a file"),
    ("run-out-user-pipeline", ["run", "{w}/p-good.yaml", "--out", "{w}/mine-run"], "did not write"),
    ("run-out-is-model", ["run", "{w}/p-good.yaml", "--out", "{w}/model"], "input"),
    ("demo-out-is-file", ["demo", "--out", "{w}/a-file"], "is a file"),
]


def test_at_least_forty_cases_over_every_command():
    assert len(CASES) >= 40
    assert {c[1][0] for c in CASES} >= {"rank", "tune", "merge", "features", "fetch", "run"}
    assert len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("args,match", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_changes_nothing(work, args, match):
    before = _snapshot(work)
    bad([a.format(w=work) for a in args], match)
    assert _snapshot(work) == before
    assert not (work / "out").exists()


def _locked(work: Path) -> Path:
    """A folder nobody can create anything in: chmod 555 for a user; for root (who ignores permission bits)
    a pseudo file system that refuses new folders."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return work / "locked"
    try:
        os.rmdir(Path("/sys/transferkit-probe").mkdir() or "/sys/transferkit-probe")
    except OSError:
        return Path("/sys")
    pytest.skip("no folder here refuses root")


@pytest.mark.parametrize("cmd", [[R, "--data", D, "--models", MD], [T, "--data", D, "--model", MD],
                                 [F, "--data", D, "--model", MD], [M, "--method", "ties", "--models", "{w}/runA,{w}/runB"],
                                 ["run", "{w}/p-good.yaml"]], ids=["rank", "tune", "features", "merge", "run"])
def test_out_in_a_read_only_folder_is_refused_before_any_work(work, cmd):
    before = _snapshot(work)
    bad([a.format(w=work) for a in cmd] + ["--out", str(_locked(work) / "out")], "not writable")
    assert _snapshot(work) == before
