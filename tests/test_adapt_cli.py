"""`transferkit adapt`: bad input is one `error:` line with exit 2 and nothing written; real digit runs end to
end (CLI and pipeline stage)."""

import json

import numpy as np
import pytest
import yaml
from _cli import bad, ok


@pytest.fixture
def npz(tmp_path):
    def make(name, n=40, classes=3, size=8):
        rng = np.random.default_rng(len(name))
        path = tmp_path / f"{name}.npz"
        np.savez(path, X=rng.integers(0, 255, (n, size, size)).astype(np.uint8), y=np.arange(n) % classes)
        return path
    return make


def test_list_shows_methods_and_scorers():
    out = ok(["adapt", "--list", "--json"]).stdout
    listed = json.loads(out)
    assert {"dann", "bn", "tent", "cotta", "reset", "entropy", "snd", "transfer_score"} <= set(listed)
    assert listed["snd"]["kind"] == "scorer" and listed["dann"]["kind"] == "training"


@pytest.mark.parametrize("args, match", [
    (["--method", "dan"], "did you mean 'dann'"),
    (["--method", "snd"], "is a model-selection scorer"),
    (["--method", "tmv-zsl"], "is a zero-shot method"),
    (["--test-size", "1.5"], "--test-size must be a fraction"),
    (["--seed", "-1"], "--seed"),
])
def test_bad_options_fail_before_anything_is_loaded(args, match, tmp_path):
    bad(["adapt", "--source", "nope", "--target", "nope", "--model", "nope", "--out", tmp_path / "o", *args], match)
    assert not (tmp_path / "o").exists()


def test_bad_config_values_and_missing_inputs(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"batch_size": 1}))
    bad(["adapt", "--method", "tent", "--config", cfg, "--out", tmp_path / "o"],
        "batch_size of adapt method 'tent' must be >= 2")
    cfg.write_text(yaml.safe_dump({"epoch": 1}))
    bad(["adapt", "--config", cfg, "--out", tmp_path / "o"], "did you mean 'epochs'")
    bad(["adapt", "--source", "mnist", "--out", tmp_path / "o"], "adapt needs --source, --target and --model")
    assert not (tmp_path / "o").exists()


@pytest.mark.assets
def test_bad_data_is_one_line_and_writes_nothing(npz, tmp_path):
    from transferkit.data.split import make_split

    out = tmp_path / "o"
    base = ["adapt", "--model", "digits-usps", "--out", out]
    bad([*base, "--source", npz("src3"), "--target", npz("tgt4", classes=4)], "label map")
    bad([*base, "--source", npz("src"), "--target", tmp_path / "missing.npz"], "missing.npz")
    target = npz("t40")
    _, test, _ = make_split(str(target), test_size=0.3)
    cfg = tmp_path / "c.yaml"  # the held-out stream ends with a one-item batch
    cfg.write_text(yaml.safe_dump({"batch_size": len(test) - 1, "source_epochs": 0}))
    bad([*base, "--source", npz("src"), "--target", target, "--method", "tent", "--config", cfg], "one-item batch")
    cfg.write_text(yaml.safe_dump({"source_epochs": 0}))
    bad([*base, "--source", npz("src"), "--target", target, "--method", "bn", "--config", cfg], "own head")
    assert not out.exists()


@pytest.mark.assets
@pytest.mark.parametrize("method, options", [("tent", {"source_epochs": 1, "batch_size": 100}),
                                             ("dann", {"epochs": 1, "batch_size": 32, "hidden": 64})])
def test_real_digits_end_to_end(method, options, tmp_path):
    """sklearn-digits (8×8) → OpenCV digits (20×20) with the USPS CNN; the target's labels score only the
    recorded held-out part."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(options))
    out = tmp_path / "run"
    res = ok(["adapt", "--source", "sklearn-digits", "--target", "opencv-digits", "--model", "digits-usps",
              "--method", method, "--config", cfg, "--limit", "600", "--out", out, "--json"])
    m = json.loads(res.stdout)
    split = json.loads((out / "split.json").read_text())
    preds = json.loads((out / "predictions.json").read_text())
    assert m["n_test"] == m["n_scored"] == len(split["test_ids"]) == len(preds["adapted"]) == 180
    assert m["target_labels_ignored"] == 420 and "not used for adaptation" in res.stderr
    assert m["accuracy"] > 0.5  # ten classes: far above chance
    if method == "tent":
        assert "source_only_accuracy" in m
    assert (out / "model.safetensors").is_file() and json.loads((out / "metrics.json").read_text()) == \
        {k: v for k, v in m.items() if k != "out"}
    # a second run into the same folder replaces it (the folder is ours)
    ok(["adapt", "--source", "sklearn-digits", "--target", "opencv-digits", "--model", "digits-usps",
        "--method", method, "--config", cfg, "--limit", "600", "--out", out])


@pytest.mark.assets
def test_pipeline_stage_adapts_each_target_with_a_source(tmp_path):
    from transferkit.pipeline import run_pipeline

    cfg = {"name": "ad", "targets": [{"data": "opencv-digits", "per_class": 20},
                                     {"data": "sklearn-digits", "per_class": 20}],
           "models": ["digits-usps"], "metrics": ["logme"],
           "tune": {"method": "linear", "top_k": 1, "config": {"epochs": 1}}, "merge": None,
           "adapt": {"method": "bn", "sources": {"opencv-digits": "mnist"},
                     "options": {"source_epochs": 1, "batch_size": 20}}}
    s = run_pipeline(cfg, tmp_path / "run", progress=False)
    (rec,) = s["adapt"]["runs"]
    assert s["adapt"]["skipped_targets"] == ["sklearn-digits"]
    assert rec["target"] == "opencv-digits" and rec["model"] == "digits-usps" and 0 <= rec["accuracy"] <= 1
    unit = tmp_path / "run" / rec["dir"]
    assert json.loads((unit / "split.json").read_text()) == json.loads(
        (tmp_path / "run" / "splits" / "opencv-digits.json").read_text())  # the pipeline's recorded split
    html = (tmp_path / "run" / "report.html").read_text()
    assert 'id="stage-adapt"' in html and (tmp_path / "run" / "report" / "adapt-accuracy.png").is_file()


@pytest.mark.parametrize("section, match", [
    ({"method": "snd", "sources": {"opencv-digits": "mnist"}}, "is a model-selection scorer"),
    ({"method": "bn", "sources": {"opencv-digit": "mnist"}}, "did you mean 'opencv-digits'"),
    ({"method": "bn", "sources": {}}, "adapt.sources is empty"),
    ({"method": "bn", "sources": {"opencv-digits": "mnistt"}}, "unknown dataset"),
    ({"method": "tent", "sources": {"opencv-digits": "mnist"}, "options": {"lr": -1}}, "lr of adapt method"),
    ({"method": "bn", "source": {"opencv-digits": "mnist"}}, "unknown key 'source' in adapt"),
])
def test_pipeline_adapt_section_is_checked_at_load_time(section, match):
    from transferkit.errors import ConfigError
    from transferkit.pipeline import load_config

    with pytest.raises(ConfigError, match=match):
        load_config({"targets": ["opencv-digits"], "models": ["digits-usps"], "adapt": section})
