"""The pipeline report: every section, table and figure present; self-contained; renders in Chromium."""

import os
import shutil
import subprocess

import numpy as np
import pytest

from _report_html import PNG_MAGIC, assert_pngs, parse_report, tables
from transferkit.report import SECTIONS, figures, render_report, write_report

MODELS = ["mobilenet-v2", "digits-mnist", "/some/dir/tiny-bert"]


def _history(n=6, seed=0):
    rng = np.random.default_rng(seed)
    return [{"step": 5 * (i + 1), "epoch": i + 1, "train_loss": float(2.0 / (i + 1) + rng.random() * 0.1),
             "val_accuracy": float(0.5 + 0.07 * i)} for i in range(n)]


def _run(model, acc, method="lora", label=None):
    return {"model": model, "label": label or model.rsplit("/", 1)[-1], "method": method, "accuracy": acc,
            "accuracy_std": 0.01, "val_accuracy": acc - 0.02, "trainable_params": 1234, "total_params": 3_500_000,
            "seconds": 12.5, "peak_rss_mb": 812.0, "delta_rss_mb": 40.0, "history": _history(),
            "seeds": {"0": {"accuracy": acc}}, "dir": "tune/x", "delta_kind": "lora"}


def synthetic_summary(*, merged=True, ground_truth=True):
    scores = {"mobilenet-v2": {"logme": 1.2, "leep": -1.0}, "digits-mnist": {"logme": 0.4, "leep": None},
              "/some/dir/tiny-bert": {"logme": -0.3, "leep": -2.0}}
    accs = {"mobilenet-v2": 0.91, "digits-mnist": 0.84, "/some/dir/tiny-bert": 0.55}
    rank = {t: {"data": t, "n_train": 140, "n_test": 60, "classes": [str(i) for i in range(10)], "models": MODELS,
                "metrics": ["logme", "leep"], "scores": scores,
                "ranking": {"logme": ["mobilenet-v2", "digits-mnist", "/some/dir/tiny-bert"],
                            "leep": ["mobilenet-v2", "/some/dir/tiny-bert"]}, "notes": []}
            for t in ("digits-a", "digits-b")}
    ev = {"weighted_tau": 0.8, "kendall_tau": 0.66, "rel@1": 1.0, "rel@3": 1.0, "regret": 0.0,
          "selected": "mobilenet-v2", "n_models": 3}
    gt = ({"method": "linear", "runs": {t: {m: _run(m, a, "linear") for m, a in accs.items()} for t in rank},
           "accuracy": {t: accs for t in rank}, "evaluation": {t: {"logme": ev, "leep": {**ev, "n_models": 2}} for t in rank},
           "skipped_units": []} if ground_truth else {"skipped": "tune.ground_truth is false"})
    tune = {"method": "lora", "config": {"epochs": 1}, "top_k": 1, "select_by": "logme",
            "selected": {t: ["mobilenet-v2"] for t in rank},
            "runs": {t: {"mobilenet-v2": _run("mobilenet-v2", 0.93)} for t in rank},
            "chosen": {t: {"target": t, **{k: v for k, v in _run("mobilenet-v2", 0.93).items() if k != "history"}} for t in rank}}
    merge = ({"method": "ties", "options": {"k": 0.2}, "mean_normalized": 0.97,
              "groups": [{"base": "mobilenet-v2", "label": "mobilenet-v2", "targets": list(rank), "tasks": [
                  {"target": "digits-a", "individual": 0.93, "merged": 0.9, "normalized": 0.9677},
                  {"target": "digits-b", "individual": 0.93, "merged": 0.91, "normalized": 0.978}]}]}
             if merged else {"skipped": "needs at least 2 targets tuned from one base model"})
    return {
        "name": "synthetic", "out": "/tmp/x", "config": {"targets": list(rank), "models": MODELS},
        "command": "transferkit run pipeline.yaml --out runs/x <&>", "reproduce": "transferkit run runs/x/pipeline.yaml --out NEW_DIR",
        "environment": {"python": "3.11.2", "platform": "Linux", "cpu_count": 2, "torch_threads": 2, "cuda": None,
                        "packages": {"torch": "2.13.0", "transformers": "4.57", "peft": "0.17", "accelerate": "1.15"}},
        "rank": rank, "ground_truth": gt, "tune": tune, "merge": merge,
        "stages": {s: {"status": "done", "seconds": 1.5, "peak_rss_mb": 700.0} for s in ("rank", "ground_truth", "tune", "merge")},
        "seconds": 99.0, "peak_rss_mb": 900.0, "started": "2025-01-01T00:00:00+00:00",
    }


def check_full_report(html: str, targets: list[str], metrics: list[str], *, merged: bool = True) -> None:
    """Every section, table and figure a complete run's report must have (used by test_pipeline too)."""
    p = parse_report(html)
    assert set(SECTIONS) <= set(p.sections), f"missing sections: {set(SECTIONS) - set(p.sections)}"
    assert not p.external, f"report references external resources: {p.external}"
    ranking = tables(p, "ranking", "ranking")
    assert len(ranking) == len(targets)
    for t in ranking:
        header = t["rows"][0]
        assert all(any(m in h for h in header) for m in metrics) and "measured accuracy" in header[-1]
        assert all(r[-1].endswith("%") or "%" in r[-1] for r in t["rows"][1:]), "measured accuracy missing"
    quality = tables(p, "ranking", "quality")
    assert len(quality) == len(targets)
    for t in quality:
        assert "τw" in t["rows"][0][1] and t["rows"][0][3] == "rel@1"
        assert {r[0] for r in t["rows"][1:]} == set(metrics)
    assert_pngs([i for i in p.sections["ranking"]["images"] if "scatter" in i["class"]], len(targets))
    chosen = tables(p, "chosen", "chosen")[0]
    assert chosen["rows"][0][:4] == ["target", "model", "method", "test accuracy"]
    assert {"trainable params", "time", "peak RSS"} <= set(chosen["rows"][0])
    assert len(chosen["rows"]) == 1 + len(targets)
    assert tables(p, "chosen", "tuned")
    assert_pngs([i for i in p.sections["chosen"]["images"] if "curves" in i["class"]], 1)
    if merged:
        m = tables(p, "merge", "merge")[0]
        assert m["rows"][0] == ["base model", "task", "individual", "merged", "normalized"]
        assert len(m["rows"]) >= 1 + 2
        assert_pngs(p.sections["merge"]["images"], 1)
    env = dict(r[:2] for r in tables(p, "environment", "environment")[0]["rows"])
    assert {"python", "torch", "transformers", "peft", "CPU count"} <= set(env)
    text = " ".join(p.text)
    assert "transferkit run" in text and "NEW_DIR" in text


def test_report_has_every_section_table_and_figure(tmp_path):
    path = write_report(synthetic_summary(), tmp_path, figures_dir=tmp_path / "figs")
    assert path == tmp_path / "report.html"
    html = path.read_text()
    check_full_report(html, ["digits-a", "digits-b"], ["logme", "leep"])
    assert "&lt;&amp;&gt;" in html  # the command is escaped, not injected
    assert sorted(f.name for f in (tmp_path / "figs").iterdir()) == [
        "curves-digits-a.png", "curves-digits-b.png", "merge.png", "scatter-digits-a.png", "scatter-digits-b.png"]


def test_report_values():
    p = parse_report(render_report(synthetic_summary()))
    rows = tables(p, "ranking", "ranking")[0]["rows"]
    assert rows[1][0].startswith("mobilenet-v2") and "★" in rows[1][0]  # sorted by measured accuracy, chosen marked
    assert rows[1][-1].startswith("91.0%")
    assert rows[3][0] == "tiny-bert"  # a path shows as its folder name
    assert rows[2][2] == "—"  # a metric that could not score the model
    q = tables(p, "ranking", "quality")[0]["rows"]
    assert q[1][:4] == ["logme", "0.8", "0.66", "1"]
    merge = tables(p, "merge", "merge")[0]["rows"]
    assert merge[1] == ["mobilenet-v2", "digits-a", "93.0%", "90.0%", "0.968"]


def test_report_without_ground_truth_or_merge():
    html = render_report(synthetic_summary(merged=False, ground_truth=False))
    p = parse_report(html)
    assert set(SECTIONS) <= set(p.sections)
    assert not tables(p, "ranking", "quality") and not tables(p, "merge", "merge")
    assert "needs at least 2 targets" in html and "tune.ground_truth is false" in html
    assert "set <code>tune.ground_truth: true</code>" in html
    assert_pngs(p.sections["ranking"]["images"], 2)  # tuned candidates' accuracies are still plotted


def test_report_says_which_bases_were_not_merged():
    s = synthetic_summary()
    s["merge"]["not_merged"] = ["digits-mnist (tuned on digits-a only)"]
    text = " ".join(parse_report(render_report(s)).text)
    assert "Not merged" in text and "digits-mnist (tuned on digits-a only)" in text
    s = synthetic_summary(merged=False)
    s["merge"] = {"skipped": "no base model was tuned on 2 or more targets (tuned per target: a: m1; b: m2)"}
    text = " ".join(parse_report(render_report(s)).text)
    assert "Merging did not run: no base model was tuned on 2 or more targets (tuned per target: a: m1; b: m2)" in text


def test_report_minimal_summary_renders():
    html = render_report({"name": "empty"})
    assert set(SECTIONS) <= set(parse_report(html).sections)


def test_figures_are_pngs():
    s = synthetic_summary()
    r = s["rank"]["digits-a"]
    png = figures.scatter_png(r["scores"], {m: 0.5 for m in MODELS}, ["logme", "leep"], {}, highlight="mobilenet-v2")
    assert png.startswith(PNG_MAGIC)
    assert figures.curves_png({"a": _history(), "b": [{"step": 1, "loss": 1.0}]}).startswith(PNG_MAGIC)
    assert figures.curves_png({"a": []}) is None
    assert figures.merge_png(s["merge"]["groups"]).startswith(PNG_MAGIC)
    assert figures.merge_png([]) is None


CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")
def test_report_renders_in_headless_chromium(tmp_path):
    from PIL import Image

    path = write_report(synthetic_summary(), tmp_path)
    shot = tmp_path / "shot.png"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
           f"--screenshot={shot}", "--window-size=1200,2000", path.as_uri()]
    subprocess.run(cmd, capture_output=True, timeout=120, check=False)
    assert shot.is_file(), "chromium wrote no screenshot"
    img = np.asarray(Image.open(shot).convert("RGB"))
    assert img.shape[:2] == (2000, 1200)
    assert (img < 250).any(axis=2).mean() > 0.02, "the screenshot is (almost) blank"
    # the figures were decoded and painted: colour (not only black text on white) is present
    rgb = img.astype(int)
    assert ((abs(rgb[..., 0] - rgb[..., 2]) > 60).mean()) > 1e-4
