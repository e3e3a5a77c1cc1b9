"""The engine under torchrun with 2 CPU processes (gloo): sharding, reduction, rank-0-only files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
SCRIPT = Path(__file__).with_name("_engine_script.py")


def test_two_process_training_with_torchrun(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(SCRIPT), "ddp", str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    errors = "\n".join(line for line in proc.stderr.splitlines() if not line.startswith("INFO"))
    assert proc.returncode == 0, errors[-4000:]

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
