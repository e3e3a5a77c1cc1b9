"""Helper run in subprocesses by the engine tests (not collected by pytest).

    python tests/_engine_script.py resume OUT [--resume] [--slow SECONDS]
        trains a small dropout MLP with checkpoints; writes OUT/final.safetensors
    torchrun --standalone --nproc_per_node 2 tests/_engine_script.py ddp OUT
        trains on 2 gloo ranks; each rank writes OUT/rank-<r>.json
    torchrun --standalone --nproc_per_node 2 tests/_engine_script.py frozen OUT
        distils from a frozen BatchNorm teacher on 2 gloo ranks, with per-sample outputs;
        each rank writes OUT/frozen-rank-<r>.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import torch
from torch import nn

from transferkit.engine import CrossEntropy, KDObjective, TrainConfig, evaluate, latest_checkpoint, train


def toy(n: int, d: int = 8, c: int = 3, seed: int = 0):
    centers = torch.randn(c, d, generator=torch.Generator().manual_seed(42)) * 3
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % c
    x = centers[y] + torch.randn(n, d, generator=g)
    return x, y


def mlp(d: int = 8, c: int = 3, dropout: float = 0.2) -> nn.Module:
    torch.manual_seed(123)
    return nn.Sequential(nn.Linear(d, 32), nn.ReLU(), nn.Dropout(dropout), nn.Linear(32, c))


class SlowCE(CrossEntropy):
    """CrossEntropy that sleeps, so a test can kill the run between checkpoints."""

    def __init__(self, delay: float):
        super().__init__()
        self.delay = delay

    def forward(self, model, batch):
        time.sleep(self.delay)
        return super().forward(model, batch)


def run_resume(out: Path, resume: bool, slow: float) -> None:
    torch.set_num_threads(1)
    x, y = toy(300)
    xv, yv = toy(90, seed=1)
    model = mlp()
    cfg = TrainConfig(epochs=4, batch_size=16, grad_accum=2, lr=3e-3, weight_decay=0.01, scheduler="cosine",
                      warmup_ratio=0.1, eval_every=7, restore_best=True, checkpoint_every=5, log_every=3,
                      seed=5, progress=False)
    result = train(model, (x, y), SlowCE(slow), cfg, val_data=(xv, yv), out_dir=out, resume=resume)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "final.safetensors"))
    print(json.dumps(result.metrics))


class Recording(torch.utils.data.Dataset):
    """A dataset that remembers which indices this process read."""

    def __init__(self, x, y):
        self.x, self.y, self.seen = x, y, []

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        self.seen.append(int(i))
        return self.x[i], self.y[i]


def run_ddp(out: Path) -> None:
    from accelerate import Accelerator

    import transferkit.engine.loop as loop

    torch.set_num_threads(1)
    acc = Accelerator(cpu=True)
    rank = acc.process_index
    writes: list[str] = []
    original = loop.write_json

    def counting_write_json(path, obj):
        writes.append(Path(path).name)
        return original(path, obj)

    loop.write_json = counting_write_json
    x, y = toy(400)
    xv, yv = toy(150, seed=1)
    ds = Recording(x, y)
    model = mlp(dropout=0.0)
    cfg = TrainConfig(epochs=6, batch_size=20, lr=1e-2, checkpoint_every=10, eval_every=10, progress=False, cpu=True)
    result = train(model, ds, CrossEntropy(), cfg, val_data=(xv, yv), out_dir=out, accelerator=acc)
    ev = evaluate(model, (xv, yv), accelerator=acc, predictions=True, batch_size=16)
    digest = float(sum(p.detach().double().sum() * (i + 1) for i, p in enumerate(model.parameters())))
    report = {
        "rank": rank,
        "world_size": acc.num_processes,
        "distributed_type": str(acc.distributed_type),
        "metrics": result.metrics,
        "eval_accuracy": ev["accuracy"],
        "predictions": ev["predictions"].tolist(),
        "seen_epoch0": sorted(ds.seen[: len(ds) // acc.num_processes]),
        "writes": writes,
        "param_digest": digest,
        "steps": result.steps,
    }
    (out / f"rank-{rank}.json").write_text(json.dumps(report))
    acc.wait_for_everyone()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    # torch 2.13 + gloo sometimes aborts in C++ teardown at interpreter exit ("terminate called without
    # an active exception") after all work is done; leave without running those destructors
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


class KDWithOutputs(KDObjective):
    """KD from a frozen teacher that also returns per-sample outputs and records the teacher's mode."""

    def __init__(self, teacher):
        super().__init__(temperature=2.0, hard_weight=0.5, teacher=teacher)
        self.teacher_modes: list[bool] = []

    def forward(self, model, batch):
        self.teacher_modes.append(self.teacher.training)
        loss, logs = super().forward(model, batch)
        return loss, logs, {"x0": batch["inputs"][:, 0]}


def run_frozen(out: Path) -> None:
    from accelerate import Accelerator
    from safetensors.torch import load_file

    torch.set_num_threads(1)
    acc = Accelerator(cpu=True)
    rank = acc.process_index
    x, y = toy(201)  # odd: the second shard is padded by wrapping around
    torch.manual_seed(7)
    teacher = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
    with torch.no_grad():
        teacher(x)  # non-trivial running statistics; the teacher is left in train mode on purpose
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    obj = KDWithOutputs(teacher)
    model = mlp(dropout=0.0)
    cfg = TrainConfig(epochs=2, batch_size=16, lr=1e-2, checkpoint_every=5, progress=False, cpu=True)
    result = train(model, (x, y), obj, cfg, out_dir=out, accelerator=acc)
    after = teacher.state_dict()
    ckpt = latest_checkpoint(out / "checkpoints")
    report = {
        "rank": rank,
        "world_size": acc.num_processes,
        "steps": result.steps,
        "teacher_unchanged": sorted(k for k in before if torch.equal(before[k], after[k])),
        "teacher_keys": sorted(before),
        "teacher_modes": sorted(set(obj.teacher_modes)),
        "objective_ckpt_keys": sorted(load_file(str(ckpt / "objective.safetensors"))),
        "model_ckpt_keys": sorted(load_file(str(ckpt / "model.safetensors"))),
        "outputs_in_order": bool(torch.equal(result.outputs["x0"], x[:, 0])),
        "param_digest": float(sum(p.detach().double().sum() * (i + 1) for i, p in enumerate(model.parameters()))),
    }
    (out / f"frozen-rank-{rank}.json").write_text(json.dumps(report))
    acc.wait_for_everyone()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["resume", "ddp", "frozen"])
    ap.add_argument("out", type=Path)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--slow", type=float, default=0.0)
    a = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if a.mode == "resume":
        run_resume(a.out, a.resume, a.slow)
    elif a.mode == "ddp":
        run_ddp(a.out)
    else:
        run_frozen(a.out)
