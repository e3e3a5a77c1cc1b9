"""The tune stage on two processes through the pipeline: torchrun --nproc_per_node 2 on CPU (gloo)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_pipeline_tune_stage_runs_on_two_processes(tmp_path, tiny_bert_dir, sentiment_csv):
    other = tmp_path / "tiny-bert-b"
    other.symlink_to(tiny_bert_dir, target_is_directory=True)
    cfg = tmp_path / "p.yaml"
    cfg.write_text(f"targets: [{sentiment_csv}]\nmodels: [{tiny_bert_dir}, {other}]\nmetrics: [logme]\n"
                   "tune: {method: lora, top_k: 1, config: {epochs: 2}, ground_truth: false}\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRANSFERKIT_CACHE": str(tmp_path / "cache")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "transferkit.cli",
           "run", str(cfg), "--out", str(tmp_path / "run"), "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout)  # exactly one JSON document: only rank 0 prints
    assert summary["tune"]["chosen"]
    metrics = list((tmp_path / "run" / "tune").rglob("metrics.json"))
    assert metrics and all(json.loads(m.read_text())["train_world_size"] == 2 for m in metrics)
    assert (tmp_path / "run" / "report.html").is_file()
    assert not list(Path(tmp_path / "run").rglob("*.tmp"))
