"""Output folders, temporaries, errors and JSON: nothing a user made is deleted, every failure is one line.

Issue 14: ``--out`` never replaces a folder transferkit did not write nor one of the command's inputs; a killed
atomic write's temporary is cleaned by the next write; the parser's own errors and unexpected exceptions are one
``error: …`` line; YAML alias bombs are refused quickly; JSON documents never hold NaN tokens.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from _cli import bad, ok
from transferkit import io
from transferkit.cli import app
from transferkit.errors import ConfigError


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TRANSFERKIT_CACHE", str(tmp_path / "cache"))


def _strict(text: str):
    def refuse(token):
        raise AssertionError(f"not JSON: {token}")
    return json.loads(text, parse_constant=refuse)


# ------------------------------------------------------------------------------ --out: never a foreign folder
def test_features_out_keeps_a_users_folder_and_replaces_its_own(tiny_bert_dir, sentiment_csv, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    bad(["features", "--data", sentiment_csv, "--model", tiny_bert_dir, "--out", mine], "did not write")
    assert (mine / "thesis.tex").read_text() == "years of work" and sorted(os.listdir(mine)) == ["thesis.tex"]

    out = tmp_path / "feats"
    ok(["features", "--data", sentiment_csv, "--model", tiny_bert_dir, "--out", out])
    assert (out / "features.json").is_file() and (out / io.MARKER).is_file()
    ok(["features", "--data", sentiment_csv, "--model", tiny_bert_dir, "--out", out, "--per-class", "10"])  # ours
    assert json.loads((out / "features.json").read_text())["shape"][0] == 20
    (out / "notes.txt").write_text("mine now")  # a user file in our folder: replacing would delete it
    bad(["features", "--data", sentiment_csv, "--model", tiny_bert_dir, "--out", out], "notes.txt")
    assert (out / "notes.txt").read_text() == "mine now"


def test_legacy_outputs_without_the_marker_are_still_ours(tmp_path):
    old = tmp_path / "old"
    old.mkdir()
    (old / "features.json").write_text("{}")
    (old / "features.safetensors").write_bytes(b"")
    assert io.check_out(old, names=("features.json", "features.safetensors"), replaces=True) == old
    (old / "features.json").unlink()  # only a safetensors file: not recognisably ours
    with pytest.raises(ConfigError, match="did not write"):
        io.check_out(old, names=("features.json", "features.safetensors"), replaces=True)


def _delta_run(path: Path, seed: int) -> None:
    from transferkit.delta import from_states

    g = torch.Generator().manual_seed(seed)
    body = {"w": torch.zeros(4, 3)}
    from_states(body, {"w": torch.randn(4, 3, generator=g)}, base_name="toy-base").save(path / "delta")


def test_merge_never_takes_an_input_as_its_output_and_replaces_only_its_own(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    _delta_run(a, 0)
    _delta_run(b, 1)
    models = f"{a},{b}"
    listing = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    bad(["merge", "--method", "task_arithmetic", "--models", models, "--out", a], "input")
    bad(["merge", "--method", "task_arithmetic", "--models", models, "--out", tmp_path], "holds the input")
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == listing  # run a is intact

    out = tmp_path / "m"
    ok(["merge", "--method", "task_arithmetic", "--models", models, "--out", out])
    ok(["merge", "--method", "average", "--models", models, "--out", out])  # our own output: replaced
    assert json.loads((out / "merge.json").read_text())["method"] == "average"
    assert (out / io.MARKER).is_file()


def test_tune_keeps_the_users_files_in_its_folder(tiny_bert_dir, sentiment_csv, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "README.md").write_text("my notes")
    ok(["tune", "--data", sentiment_csv, "--model", tiny_bert_dir, "--epochs", "1", "--per-class", "10",
        "--out", out])
    assert (out / "README.md").read_text() == "my notes" and (out / "metrics.json").is_file()
    assert (out / io.MARKER).is_file()


def test_check_out_writes_nothing(tmp_path):
    out = tmp_path / "new" / "deeper"
    io.check_out(out, names=("x",), replaces=True)
    assert not (tmp_path / "new").exists()


# ------------------------------------------------------------------------------ temporaries of killed writes
_KILLED_WRITER = """
import os, sys
from transferkit.io import atomic_path
with atomic_path(sys.argv[1]) as tmp:
    tmp.mkdir()
    (tmp / "half.bin").write_bytes(b"x" * 100)
    os._exit(9)  # killed mid-write
"""


def test_a_killed_atomic_write_is_cleaned_by_the_next_write(tmp_path):
    target = tmp_path / "result.json"
    subprocess.run([sys.executable, "-c", _KILLED_WRITER, str(target)], check=False)
    left = [p.name for p in tmp_path.iterdir()]
    assert len(left) == 1 and left[0].startswith(".result.json.") and left[0].endswith(".tmp")  # what it left
    io.write_json(target, {"ok": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.json"]


def test_only_dead_or_old_temporaries_of_ours_are_removed(tmp_path):
    target = tmp_path / "out"
    host = io._host()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    names = {
        "dead": f".out.tk-{host}-{dead.pid}-abc123.tmp",
        "alive": f".out.tk-{host}-{os.getppid()}-abc123.tmp",      # a writer still running
        "other_host": f".out.tk-elsewhere-{dead.pid}-abc123.tmp",  # cannot tell: keep
        "legacy_old": ".out.k2j4h5g6.tmp",
        "legacy_new": ".out.q9w8e7r6.tmp",
        "user": ".out.mine",                                       # not our pattern
        "user_tmp": ".other.k2j4h5g6.tmp",                         # our pattern, another target
    }
    for n in names.values():
        (tmp_path / n).mkdir()
    old = time.time() - 3 * 24 * 3600
    os.utime(tmp_path / names["legacy_old"], (old, old))
    os.utime(tmp_path / names["user_tmp"], (old, old))
    io.write_text(target, "hi")
    left = {p.name for p in tmp_path.iterdir()}
    assert left == {"out", *(names[k] for k in ("alive", "other_host", "legacy_new", "user", "user_tmp"))}


# ------------------------------------------------------------------------------ errors: always one line
@pytest.mark.parametrize("args,match", [
    (["tune", "--epochs", "1.5"], "--epochs"),
    (["rank", "--limit", "x"], "--limit"),
    (["merge", "--seed", "-1", "--out", "x"], "--seed"),
    (["features", "--data", "d"], "--model"),
    (["no-such-command"], "no-such-command"),
    (["tune", "--no-such-option"], "--no-such-option"),
])
def test_parse_errors_are_the_projects_one_line_error(args, match):
    line = bad(args, match)
    assert "Usage:" not in line


def test_parse_errors_from_the_installed_entry_point(tmp_path):
    res = subprocess.run([sys.executable, "-m", "transferkit.cli", "tune", "--epochs", "1.5"], capture_output=True,
                         text=True, env={**os.environ, "TRANSFERKIT_CACHE": str(tmp_path)})
    assert res.returncode == 2, res.stderr
    assert res.stderr.strip().splitlines() == [res.stderr.strip()] and res.stderr.startswith("error: ")


def test_an_unexpected_exception_is_one_line_exit_1_and_debug_shows_the_traceback(monkeypatch):
    from transferkit import assets

    def boom(name):
        raise RuntimeError("something internal\nsecond line")

    monkeypatch.setattr(assets, "entry", boom)
    runner = CliRunner()
    res = runner.invoke(app, ["fetch", "x"])
    assert res.exit_code == 1
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: internal error: RuntimeError: something internal")
    assert "TRANSFERKIT_DEBUG" in lines[0]
    monkeypatch.setenv("TRANSFERKIT_DEBUG", "1")
    res = runner.invoke(app, ["fetch", "x"])
    assert res.exit_code == 1 and "Traceback" in res.stderr and res.stderr.strip().splitlines()[-1].startswith("error:")


def test_ctrl_c_is_one_line_exit_130(monkeypatch):
    from transferkit import assets

    def interrupt(name):
        raise KeyboardInterrupt

    monkeypatch.setattr(assets, "entry", interrupt)
    res = CliRunner().invoke(app, ["fetch", "x"])
    assert res.exit_code == 130 and res.stderr.strip() == "error: interrupted"


# ------------------------------------------------------------------------------ YAML bombs, bounded messages
def _bomb(levels: int):
    x = ["lol"] * 9
    for _ in range(levels):
        x = [x] * 9
    return x


def test_error_messages_bound_what_they_repeat():
    from transferkit.pipeline.config import load_config
    from transferkit.registry import short as _short, did_you_mean

    big = _bomb(6)  # 9**7 strings once expanded
    t0 = time.perf_counter()
    assert len(_short(big)) <= 81 and did_you_mean(big, ["x"]) == ""
    with pytest.raises(ConfigError) as e:
        load_config({"name": big, "targets": ["sklearn-digits"], "models": ["digits-mnist"]})
    assert len(str(e.value)) < 300
    assert time.perf_counter() - t0 < 5


def test_yaml_alias_bombs_and_recursive_aliases_are_refused_quickly(tmp_path):
    levels = "\n".join(f"{c}: &{c} [{', '.join([f'*{p}'] * 9)}]" for p, c in zip("abcdefgh", "bcdefghi"))
    text = 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n' + levels + "\nname: *i\n"
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match="YAML aliases"):
        io.load_yaml(text, "p.yaml")
    with pytest.raises(ConfigError, match="recursive"):
        io.load_yaml("a: &a [1, *a]\n", "p.yaml")
    assert time.perf_counter() - t0 < 5
    assert io.load_yaml("a: &x [1, 2]\nb: *x\n") == {"a": [1, 2], "b": [1, 2]}  # ordinary aliases still work
    path = tmp_path / "p.yaml"
    path.write_text(text)
    from transferkit.pipeline.config import load_config

    with pytest.raises(ConfigError, match="YAML aliases"):
        load_config(path)


# ------------------------------------------------------------------------------ strict JSON
def test_json_documents_hold_no_nan(tmp_path, capsys):
    from transferkit.clitools import emit
    from transferkit.pipeline import runner

    obj = {"a": float("nan"), "b": [np.float32("inf"), 1.5], "c": np.array([np.nan, 2.0]), "d": np.int64(3)}
    io.write_json(tmp_path / "x.json", obj)
    assert _strict((tmp_path / "x.json").read_text()) == {"a": None, "b": [None, 1.5], "c": [None, 2.0], "d": 3}
    emit(obj, True, print)
    assert _strict(capsys.readouterr().out)["a"] is None
    assert runner.finite_json is io.finite_json  # one copy
