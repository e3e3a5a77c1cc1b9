"""The engine under torchrun with 2 CPU processes (gloo): sharding, reduction, rank-0-only files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
SCRIPT = Path(__file__).with_name("_engine_script.py")


def _torchrun(mode, out):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(SCRIPT), mode, str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    errors = "\n".join(line for line in proc.stderr.splitlines() if not line.startswith("INFO"))
    assert proc.returncode == 0, errors[-4000:]


def test_two_process_training_with_torchrun(tmp_path):
    _torchrun("ddp", tmp_path)

    reports = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert [r["rank"] for r in reports] == [0, 1]
    assert all(r["world_size"] == 2 and r["distributed_type"].endswith("MULTI_CPU") for r in reports)

    # each rank trained on its own half of epoch 0
    a, b = (set(r["seen_epoch0"]) for r in reports)
    assert len(a) == len(b) == 200 and not a & b and a | b == set(range(400))

    # DDP kept the replicas identical and the metrics are those of the whole validation set
    assert reports[0]["param_digest"] == reports[1]["param_digest"]
    assert reports[0]["metrics"] == reports[1]["metrics"]
    assert reports[0]["metrics"]["world_size"] == 2
    assert reports[0]["metrics"]["val_accuracy"] >= 0.9
    assert reports[0]["steps"] == 6 * 10  # 400 samples / 2 ranks / batch 20 = 10 steps per epoch
    assert reports[0]["predictions"] == reports[1]["predictions"] and len(reports[0]["predictions"]) == 150

    # only rank 0 wrote files
    assert reports[1]["writes"] == [] and "metrics.json" in reports[0]["writes"]
    assert (tmp_path / "metrics.json").is_file() and (tmp_path / "history.json").is_file()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-50", "step-60"]
    history = json.loads((tmp_path / "history.json").read_text())
    assert history[-1]["step"] == 60 and "val_accuracy" in history[-1]


def test_two_process_frozen_teacher_and_per_sample_outputs(tmp_path):
    # a KD objective holding a BatchNorm teacher: DDP must not see the teacher (no "Expected to have
    # finished reduction"), the teacher stays in eval mode and unchanged, and is not checkpointed
    _torchrun("frozen", tmp_path)
    reports = [json.loads((tmp_path / f"frozen-rank-{r}.json").read_text()) for r in (0, 1)]
    for r in reports:
        assert r["world_size"] == 2 and r["steps"] == 2 * 7  # 201 samples -> 101 per rank -> 7 batches of 16
        assert r["teacher_unchanged"] == r["teacher_keys"] and "1.running_var" in r["teacher_keys"]
        assert r["teacher_modes"] == [False]
        assert r["objective_ckpt_keys"] == [] and not any("teacher" in k for k in r["model_ckpt_keys"])
        assert r["outputs_in_order"]  # gathered from both ranks, back in data order
    assert reports[0]["param_digest"] == reports[1]["param_digest"]
