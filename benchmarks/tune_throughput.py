"""Training-step throughput of the transferkit engine vs a bare PEFT + torch loop on the same LoRA model.

Both sides train the same PEFT LoRA model (all-MiniLM-L6-v2 + linear head, r=8 on query/value, built by
``transferkit.tune.peft_methods.wrap``, each round starting from the same initial weights) on the same
batches (the engine's seeded epoch order, reproduced for the bare loop with the same tokenising collate
function) with the same optimisation: AdamW (lr 5e-4, no weight decay), linear schedule, gradient clipping
at norm 1.0, batch 16, fp32 on the CPU.

- engine: ``transferkit.engine.train(pm, data, CrossEntropy(), TrainConfig(...), collate_fn=...)`` — the
  Accelerate-based loop with its per-step bookkeeping (RNG reseed, loss logs, scheduler);
- bare: ``for batch in DataLoader(...): loss = F.cross_entropy(pm(**inputs), y); loss.backward();
  clip_grad_norm_; opt.step(); sched.step(); opt.zero_grad()``.

Steps/s is measured between per-step timestamps (the engine's through the objective's ``before_step`` hook, the
bare loop's at the top of each iteration), skipping the first ``--warmup`` steps, so set-up (Accelerate,
optimizer creation) and the end-of-training evaluation are excluded. Engine and bare runs alternate for
``--rounds`` rounds in one process (the CPUs are shared with other jobs, so interleaving keeps both sides
under the same load); per round steps/s = 1 / the median step time; the reported ratio is the median over rounds of
engine / bare (paired: the same load within a round).

    .venv/bin/python benchmarks/tune_throughput.py                # ~3 min on 2 shared CPU cores
    .venv/bin/python benchmarks/tune_throughput.py --steps 8 --rounds 2 --per-class 60

Writes benchmarks/results/tune_throughput.json and .md.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="all-minilm-l6-v2")
    ap.add_argument("--data", default="vader:movies")
    ap.add_argument("--per-class", type=int, default=160)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--steps", type=int, default=12, help="optimizer steps per timed run")
    ap.add_argument("--warmup", type=int, default=2, help="first steps of each run not timed")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "tune_throughput.json")
    a = ap.parse_args()

    import torch
    import torch.nn.functional as F

    from transferkit.data import load_dataset
    from transferkit.engine import CrossEntropy, TrainConfig, train
    from transferkit.engine.data import _order, _rank_batches
    from transferkit.tune._common import Pairs, make_collate
    from transferkit.tune.peft_methods import wrap
    from transferkit import registry
    from transferkit.zoo import load_model

    if a.threads:
        torch.set_num_threads(a.threads)
    ds = load_dataset(a.data, per_class=a.per_class, seed=0)
    model = load_model(a.model, max_length=a.max_length)
    n_classes = len(ds.classes)
    opts = registry.get("tune", "lora").defaults() | {"dropout": 0.0}  # no dropout: identical maths on both sides
    pm0, _ = wrap(model, n_classes, "lora", opts, seed=0)
    init = copy.deepcopy(pm0.state_dict())
    data = Pairs(ds.X, ds.y)
    collate = make_collate(model.preprocess)
    lr, seed, bs, total = 5e-4, 0, a.batch_size, a.steps
    n_trainable = sum(p.numel() for p in pm0.parameters() if p.requires_grad)

    def fresh():
        pm0.load_state_dict(init)
        pm0.train()
        return pm0

    def rate(stamps: list[float]) -> list[float]:
        """Durations of the timed steps (the first ``warmup`` steps of the run are skipped)."""
        s = stamps[a.warmup:]
        return [t1 - t0 for t0, t1 in zip(s, s[1:])]

    class Timed(CrossEntropy):
        def __init__(self):
            super().__init__()
            self.stamps: list[float] = []

        def before_step(self, step, total_steps):
            self.stamps.append(time.perf_counter())

    def run_engine() -> tuple[list[float], float]:
        obj = Timed()
        cfg = TrainConfig(max_steps=total + 1, batch_size=bs, lr=lr, weight_decay=0.0, optimizer="adamw",
                          scheduler="linear", warmup_ratio=0.0, max_grad_norm=1.0, seed=seed, cpu=True,
                          progress=False, log_every=10)
        res = train(fresh(), data, obj, cfg, collate_fn=collate)
        return rate(obj.stamps), float(res.metrics.get("train_loss", float("nan")))

    def run_bare() -> tuple[list[float], float]:
        pm = fresh()
        params = [p for p in pm.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        steps = total + 1
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1.0 - s / steps))
        stamps, step, epoch, loss = [], 0, 0, torch.zeros(())
        while step < steps:  # the engine's epoch order and batches
            batches = _rank_batches(_order(len(data), seed, 0, epoch, True), 0, 1, bs)
            loader = torch.utils.data.DataLoader(data, batch_sampler=batches, collate_fn=collate)
            for batch in loader:
                if step >= steps:
                    break
                stamps.append(time.perf_counter())
                loss = F.cross_entropy(pm(**batch["inputs"]), batch["labels"])
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                step += 1
            epoch += 1
        return rate(stamps), float(loss.detach())

    eng, bare, eng_loss, bare_loss = [], [], [], []  # per round: steps/s from the median step time
    eng_steps, bare_steps = [], []  # every timed step duration
    t0 = time.perf_counter()
    run_bare()  # warm-up of the kernels and the tokenizer
    for r in range(a.rounds):
        order = (("engine", run_engine, eng, eng_loss, eng_steps), ("bare", run_bare, bare, bare_loss, bare_steps))
        for name, fn, acc, losses, all_steps in (order if r % 2 == 0 else order[::-1]):
            durations, loss = fn()
            all_steps += durations
            acc.append(1.0 / statistics.median(durations))
            losses.append(loss)
            print(f"round {r} {name:6s} {acc[-1]:.3f} steps/s (median step {1000 * statistics.median(durations):.0f} "
                  f"ms, mean {1000 * statistics.mean(durations):.0f} ms; last loss {loss:.4f})",
                  file=sys.stderr, flush=True)
    # the load from other jobs changes between rounds (1-2x here), so the ratio is taken per round (engine and
    # bare back to back under the same load) and the median of the per-round ratios is reported
    per_round = [e / b for e, b in zip(eng, bare)]
    ratio = statistics.median(per_round)
    eng_sps, bare_sps = 1.0 / statistics.median(eng_steps), 1.0 / statistics.median(bare_steps)
    ratio_pooled = eng_sps / bare_sps
    ratio_mean = statistics.mean(bare_steps) / statistics.mean(eng_steps)
    cmd = ".venv/bin/python benchmarks/tune_throughput.py " + " ".join(sys.argv[1:])
    machine = (f"{platform.machine()}, {os.cpu_count()} CPU cores shared with other jobs (load avg "
               f"{os.getloadavg()[0]:.1f} at the end), no GPU, torch {torch.__version__}, "
               f"{torch.get_num_threads()} torch threads")
    doc = {"model": a.model, "data": a.data, "n_train": len(data), "max_length": a.max_length, "batch_size": bs,
           "steps": total, "warmup": a.warmup, "rounds": a.rounds, "trainable_params": n_trainable,
           "engine_steps_per_s": eng, "bare_steps_per_s": bare, "engine_median": eng_sps,
           "bare_median": bare_sps, "ratio": round(ratio, 3), "ratio_from_mean_step_time": round(ratio_mean, 3),
           "ratio_pooled_median_step": round(ratio_pooled, 3),
           "engine_step_s": eng_steps, "bare_step_s": bare_steps,
           "ratio_per_round": [round(x, 3) for x in per_round], "target": 0.9, "met": bool(ratio >= 0.9),
           "engine_last_loss": eng_loss, "bare_last_loss": bare_loss, "command": cmd.strip(), "machine": machine,
           "wall_s": round(time.perf_counter() - t0, 1)}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(doc, indent=1) + "\n")
    lines = [f"# tune_throughput: engine vs bare PEFT + torch loop ({a.model}, LoRA r=8, batch {bs}, "
             f"max_length {a.max_length})", "", f"Command: `{doc['command']}`", "",
             f"Machine: {machine}.", "",
             f"Same PEFT LoRA model ({n_trainable:,} trainable), same initial weights, same batches (engine "
             f"order), AdamW lr {lr}, linear schedule, clip 1.0; {total} steps per run, first {a.warmup} not "
             f"timed; engine and bare runs alternate (order swapped every round), {a.rounds} rounds. Per round, "
             f"steps/s = 1 / median step time; the load from the other jobs on these cores changes between "
             f"rounds, so the ratio is the median of the per-round (paired) ratios. Pooled over all steps: "
             f"{ratio_pooled:.3f} from the median step times, {ratio_mean:.3f} from the mean step times.", "",
             "| round | engine steps/s | bare steps/s | engine / bare |", "|---|---|---|---|"]
    lines += [f"| {i} | {e:.3f} | {b:.3f} | {e / b:.3f} |" for i, (e, b) in enumerate(zip(eng, bare))]
    lines += [f"| all steps (pooled) | {eng_sps:.3f} | {bare_sps:.3f} | {ratio_pooled:.3f} |",
              f"| **median of rounds** | | | **{ratio:.3f}** |", "",
              f"Target (issue 4): engine ≥ 0.9 × bare → **{'met' if doc['met'] else 'NOT met'}** "
              f"(ratio {ratio:.3f}).", "",
              f"Last training loss of the last round: engine {eng_loss[-1]:.4f}, bare {bare_loss[-1]:.4f} (not "
              f"bit-identical: the engine reseeds the RNG per step, so the encoder's dropout masks differ)."]
    a.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
