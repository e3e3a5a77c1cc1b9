"""Pipeline stage ``distill``: YAML checks, a run on real digits (tuned winner → smaller student) with its
report section, the recorded split, and resume."""

import json

import pytest

from transferkit.errors import ConfigError
from transferkit.pipeline import load_config, run_pipeline


def _cfg(**distill):
    return {"name": "d", "targets": [{"data": "sklearn-digits", "limit": 600}],
            "models": ["digits-mnist", "digits-svhn"], "metrics": ["logme"], "tune": {"method": "full", "top_k": 1, "config": {"epochs": 2, "lr": 1e-3}},
            "distill": distill, "seeds": [0]}


@pytest.mark.parametrize("distill, message", [
    ({"studnt": "digits-usps"}, "unknown key 'studnt' in distill"),
    ({"method": "kd"}, "distill needs a student"),
    ({"student": "digits-usps", "method": "kdd"}, "unknown distill method 'kdd'"),
    ({"student": "digits-usps", "config": {"temperature": 0}}, "temperature"),
])
def test_bad_yaml_is_one_line(distill, message):
    with pytest.raises(ConfigError, match=message):
        load_config(_cfg(**distill))


def test_absent_key_skips_the_stage():
    cfg = _cfg()
    del cfg["distill"]
    assert load_config(cfg).section("distill") is None


@pytest.mark.assets
def test_distils_each_targets_tuned_winner_with_report_and_resume(tmp_path):
    out = tmp_path / "run"
    s = run_pipeline(_cfg(student="digits-usps", config={"epochs": 8}), out, progress=False)
    run = s["distill"]["runs"]["sklearn-digits"]
    chosen = s["tune"]["chosen"]["sklearn-digits"]
    assert run["teacher"] == chosen["label"] and run["teacher_accuracy"] == chosen["accuracy"]
    assert run["student_params"] < run["teacher_params"] and run["accuracy"] > run["teacher_accuracy"] - 0.1
    unit = out / run["dir"]
    # trained and scored on the pipeline's recorded split, nothing else
    recorded = json.loads((out / "splits" / "sklearn-digits.json").read_text())
    assert json.loads((unit / "split.json").read_text()) == recorded
    html = (out / "report.html").read_text()
    assert 'id="stage-distill"' in html and "Distillation (kd)" in html
    assert (out / "report" / "distill-accuracy.png").is_file()
    # resume after a kill in the distill stage: the finished unit is read back, not trained again
    state = json.loads((out / "state.json").read_text())
    for stage in ("distill", "report"):
        state["stages"].pop(stage)
    (out / "state.json").write_text(json.dumps(state))
    stamp = (unit / "unit.json").stat().st_mtime_ns
    again = run_pipeline(_cfg(student="digits-usps", config={"epochs": 8}), out, resume=True, progress=False)
    assert again["distill"] == s["distill"] and (unit / "unit.json").stat().st_mtime_ns == stamp
