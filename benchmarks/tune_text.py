"""Parameter-efficient tuning of all-MiniLM-L6-v2 on real text tasks: accuracy, parameters, time, memory, inference.

Every (task, method, seed) runs in a fresh subprocess, one after the other, so that the memory numbers belong
to that run alone:

- ``peak_mb``  — the process high-water mark (``VmHWM`` from /proc/self/status) after training;
- ``train_mb`` — ``peak_mb`` minus the high-water mark just before ``tune()`` (libraries imported, model
  and data loaded): what training itself added (backbone copy, activations kept for backward, gradients,
  optimizer state).

Inference overhead: after training, the adapted model (``TuneResult.module`` as trained, i.e. LoRA
*unmerged*, side networks with their backbone pass) and the base model (backbone + linear head) are timed on
the same pre-tokenised test batches under ``torch.inference_mode`` (min of 5 passes, interleaved);
``infer_ratio`` = adapted / base time per example. The linear probe *is* the base model (ratio 1).

Finished runs are cached as one JSON per (task, method, seed) under ``benchmarks/results/tune_text.runs/``;
a re-run skips them (``--fresh`` ignores the cache). Learning rates are the registry defaults unless
``CONFIG`` below says otherwise.

    .venv/bin/python benchmarks/tune_text.py                                   # the README table
    .venv/bin/python benchmarks/tune_text.py --tasks vader:movies --seeds 0 --methods linear,lora --per-class 60

Writes benchmarks/results/tune_text.json and .md (mean ± std over seeds, the targets, the exact command).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

# what both child scripts start with: the task's data split, the model, and the inference timing helper
_SETUP = r"""
import json, sys, time
from pathlib import Path
import numpy as np
import torch
from transferkit.data import load_dataset, train_test_split
from transferkit.data.dataset import split_mask
from transferkit.engine.objectives import forward
from transferkit.tune import tune
from transferkit.zoo import load_model
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
args = json.loads(sys.argv[1])
if args.get("threads"):
    torch.set_num_threads(args["threads"])
ds = load_dataset(args["data"], per_class=args["per_class"], seed=args["seed"])
train, test = train_test_split(ds, test_size=args["test_size"], seed=args["seed"])
model = load_model(args["model"], **args.get("load", {}))
n_classes = len(train.classes)
base = model.classifier(n_classes, seed=0).eval()
n_inf = min(len(test), args.get("n_infer", 64))
batches = [model.preprocess(test.X[i:i + 32] if isinstance(test.X, list) else np.asarray(test.X[i:i + 32]))
           for i in range(0, n_inf, 32)]
def infer_times(adapted, reps):  # seconds for the test batches, base vs adapted: min of reps interleaved passes
    def timed(mod):
        t = time.perf_counter()
        with torch.inference_mode():
            for b in batches:
                forward(mod, b)
        return time.perf_counter() - t
    timed(base); timed(adapted)
    tb, ta = [], []
    for _ in range(reps):  # interleaved; the minimum is the least disturbed by other jobs
        tb.append(timed(base)); ta.append(timed(adapted))
    return min(tb), min(ta)
"""

CHILD = _SETUP + r"""
# what tune() imports lazily is imported now, so that it is not counted as training memory
import accelerate, peft, transferkit.engine.loop, transferkit.tune.side, transferkit.tune.peft_methods  # noqa
import transferkit.tune.adapters, transferkit.tune.bitfit, transferkit.tune.sparse, transferkit.tune.scalearn  # noqa
accelerate.Accelerator(cpu=True)
before = hwm()
# one training per learning rate of the grid (one lr: the config's); memory is that of the first training
# (same shapes at every lr), the later ones reuse the freed memory
grid, res, peak = [], None, None
for lr in args.get("lrs") or [None]:
    config = {"epochs": args["epochs"], "seed": args["seed"], **args["config"], **({"lr": lr} if lr else {})}
    res = None
    res = tune(model, train, test, method=args["method"], config=config, progress=False,
               val_fraction=args.get("val_fraction", 0.1))
    peak = peak or hwm()
    g = res.metrics
    grid.append({"lr": lr, "test_accuracy": g.get("test_accuracy"), "seconds": g["seconds"],
                 **{k: g[k] for k in ("val_accuracy", "val_loss") if k in g}})
m = res.metrics

# ---- inference: adapted module vs base classifier, same batches
adapted = res.module.eval() if res.module is not None else base
tb, ta = infer_times(adapted, args.get("infer_reps", 5))
print(json.dumps({"method": args["method"], "test_accuracy": m.get("test_accuracy"),
                  "val_accuracy": m.get("val_accuracy"), "trainable_params": m["trainable_params"],
                  "total_params": m["total_params"], "trainable_pct": m["trainable_pct"],
                  "seconds": m["seconds"], "steps": m.get("train_steps", m.get("steps")),
                  "peak_mb": round(peak, 1), "before_mb": round(before, 1), "train_mb": round(peak - before, 1),
                  "infer_ms_base": round(1000 * tb / n_inf, 3), "infer_ms": round(1000 * ta / n_inf, 3),
                  "infer_ratio": round(ta / tb, 3), "n_train": len(train), "n_test": len(test),
                  "majority": float(max((test.y == c).mean() for c in range(n_classes))),
                  "grid": grid, "n_val": int(split_mask(train, args.get("val_fraction", 0.1), args["seed"]).sum())}))
if args.get("out_dir"):  # a source adapter for the composition methods
    res.delta.save(args["out_dir"])
"""

# several methods of one (task, seed) in one process (saves the ~10 s start-up per run): accuracy, parameters,
# time and, on request, the inference ratio; no memory numbers (those come from the fresh-process memory runs).
# Each finished method is written to its cache file at once.
CHILD_BATCH = _SETUP + r"""
vf = args["val_fraction"]
for item in args["items"]:
    try:
        grid, res = [], None
        for lr in item["lrs"]:
            config = {"epochs": args["epochs"], "seed": args["seed"], **item["config"], **({"lr": lr} if lr else {})}
            res = None
            res = tune(model, train, test, method=item["method"], config=config, progress=False, val_fraction=vf)
            g = res.metrics
            grid.append({"lr": lr, "test_accuracy": g.get("test_accuracy"), "seconds": g["seconds"],
                         **{k: g[k] for k in ("val_accuracy", "val_loss") if k in g}})
        m = res.metrics
        row = {"method": item["method"], "test_accuracy": m.get("test_accuracy"), "val_accuracy": m.get("val_accuracy"),
               "trainable_params": m["trainable_params"], "total_params": m["total_params"],
               "trainable_pct": m["trainable_pct"], "seconds": m["seconds"],
               "steps": m.get("train_steps", m.get("steps")), "n_train": len(train), "n_test": len(test),
               "n_val": int(split_mask(train, vf, args["seed"]).sum()),
               "majority": float(max((test.y == c).mean() for c in range(n_classes))), "grid": grid}
        if args.get("infer"):
            adapted = res.module.eval() if res.module is not None else base
            tb, ta = infer_times(adapted, 3)
            row.update({"infer_ms_base": round(1000 * tb / n_inf, 3), "infer_ms": round(1000 * ta / n_inf, 3),
                        "infer_ratio": round(ta / tb, 3)})
        res = None
    except Exception as e:  # one failing method does not lose the others
        import traceback; traceback.print_exc()
        row = {"method": item["method"], "error": f"{type(e).__name__}: {e}"}
    row["args"] = item["key"]
    Path(item["cache"]).parent.mkdir(parents=True, exist_ok=True)
    if "error" not in row:
        Path(item["cache"]).write_text(json.dumps(row, indent=1) + "\n")
    print(json.dumps(row), flush=True)
"""


def batch_run(common: dict, items: list[tuple[tuple, dict, Path]], fresh: bool) -> dict:
    """Run ``items`` ((key, per-method args, cache)) of one (task, seed) in one child; ``{key: row}``."""
    out, todo = {}, []
    for key, args, cache in items:
        if cache.exists() and not fresh:
            row = json.loads(cache.read_text())
            if row.get("args") == args:
                out[key] = row | {"cached": True}
                continue
        todo.append((key, args, cache))
    if todo:
        payload = {**common, "items": [{"method": a["method"], "config": a["config"], "lrs": a["lrs"],
                                        "key": a, "cache": str(c)} for _, a, c in todo]}
        proc = subprocess.run([sys.executable, "-c", CHILD_BATCH, json.dumps(payload)], capture_output=True,
                              text=True, check=False)
        got = {}
        for line in proc.stdout.splitlines():
            if line.startswith("{"):
                r = json.loads(line)
                got[r["method"]] = r
        if proc.returncode != 0 or any("error" in r for r in got.values()):
            print(f"  child stderr: {proc.stderr[-1500:]}", file=sys.stderr)
        for key, args, _ in todo:
            out[key] = got.get(args["method"], {"method": args["method"],
                                                "error": f"no result (child exit {proc.returncode})"})
    return out


# per-method options of this benchmark (registry defaults otherwise). Every method: batch 8, validation only at
# the end of training (it picks the learning rate; no early stopping, no best-checkpoint restore).
_B = {"batch_size": 8, "eval_every": 1_000_000}
# linear probe: 100 epochs on cached features at its registry batch 64 (cheap; 30 epochs are too few updates)
CONFIG = {
    "linear": {"epochs": 100},
    "full": dict(_B),
    "lora": {"r": 8, "alpha": 16, **_B},
    **{m: dict(_B) for m in ("ia3", "prefix", "prompt", "bitfit", "adapter", "parallel-adapter",
                              "scaled-parallel-adapter", "mam", "sparse", "r2")},
    "unipt": {"r": 96, **_B},
    "sherl": {"r": 96, "late_layers": 1, **_B},
    # composition over frozen source adapters (sources / tasks are filled in by main())
    **{m: dict(_B) for m in ("scalearn", "scalearn-uniform", "scalearn++", "scalearn-uniform++", "adapterfusion")},
    "shared-adapter": {"task_per_class": 50, **_B},
}
SIDE = ("unipt", "sherl", "r2")
COMPOSE = ("scalearn", "scalearn-uniform", "scalearn++", "scalearn-uniform++", "adapterfusion")


def child_run(args: dict, cache: Path, fresh: bool) -> dict:
    if cache.exists() and not fresh:
        row = json.loads(cache.read_text())
        if row.get("args") == args:
            return row | {"cached": True}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(args)], capture_output=True, text=True,
                          check=False)
    if proc.returncode != 0:
        err = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"
        print(f"  failed: {proc.stderr[-1500:]}", file=sys.stderr)
        return {"method": args["method"], "error": err}
    row = json.loads(proc.stdout.strip().splitlines()[-1]) | {"args": args,
                                                               "wall_s": round(time.perf_counter() - t0, 1)}
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(row, indent=1) + "\n")
    return row


def report(key: str, row: dict) -> None:
    if "error" in row:
        print(f"{key:48s} ERROR {row['error']}", file=sys.stderr, flush=True)
        return
    grid = " ".join(f"lr {g['lr']:.2g}: val {g.get('val_accuracy') or float('nan'):.3f} test "
                    f"{g['test_accuracy']:.3f}" for g in row.get("grid", []) if g.get("lr"))
    mem = f" peak={row['peak_mb']:.0f}MB train+={row['train_mb']:.0f}MB" if "peak_mb" in row else ""
    inf = f" infer x{row['infer_ratio']:.2f}" if "infer_ratio" in row else ""
    print(f"{key:48s} acc={row['test_accuracy']:.3f} trainable={row['trainable_params']:>10,d} "
          f"({row['trainable_pct']:.2f}%) {row['seconds']:6.1f}s{mem}{inf} {grid}"
          f"{' (cached)' if row.get('cached') else ''}", file=sys.stderr, flush=True)


def choose_lr(rows: list[dict]) -> int:
    """Index of the grid lr with the best mean validation accuracy over ``rows`` (ties: lower val loss)."""
    ok = [r for r in rows if "error" not in r and r.get("grid")]
    n = len(ok[0]["grid"])

    def score(i):
        acc = statistics.mean(r["grid"][i].get("val_accuracy", 0.0) for r in ok)
        loss = statistics.mean(r["grid"][i].get("val_loss", 0.0) for r in ok)
        return (round(acc, 9), -loss)
    return max(range(n), key=score)


def ms(values: list[float], fmt: str = ".3f") -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return format(values[0], fmt)
    return f"{format(statistics.mean(values), fmt)} ± {format(statistics.stdev(values), fmt)}"


def aggregate(rows: list[dict]) -> dict:
    ok = [r for r in rows if "error" not in r]
    agg = {"n_seeds": len(ok), "errors": [r["error"] for r in rows if "error" in r]}
    if not ok:
        return agg
    for k in ("test_accuracy", "val_accuracy", "seconds", "peak_mb", "train_mb", "infer_ms", "infer_ms_base",
              "infer_ratio"):
        vals = [float(r[k]) for r in ok if r.get(k) is not None]
        if not vals:
            continue
        agg[k] = statistics.mean(vals)
        agg[k + "_std"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
        agg[k + "_all"] = vals
    agg["trainable_params"] = ok[0]["trainable_params"]
    agg["trainable_pct"] = ok[0]["trainable_pct"]
    agg["lr"] = ok[0].get("lr")
    agg["n_train"], agg["n_test"], agg["majority"] = ok[0]["n_train"], ok[0]["n_test"], ok[0]["majority"]
    agg["n_val"] = ok[0].get("n_val")
    return agg


def targets(per_task: dict[str, dict[str, dict]], overall: dict[str, dict]) -> list[dict]:
    """The issue's LoRA target per task and on the mean over tasks; the side-network targets per task."""
    out = []
    rows = [(task, methods.get("lora"), methods.get("full")) for task, methods in per_task.items()]
    if "lora" in overall and "full" in overall:
        rows.append(("mean over tasks", overall["lora"], overall["full"]))
    for task, lora, full in rows:
        if lora and full and "test_accuracy" in lora and "test_accuracy" in full:
            rel = lora["test_accuracy"] / full["test_accuracy"]
            out.append({"task": task, "target": "LoRA ≥ 98 % of full FT accuracy at ≤ 1 % trainable",
                        "value": f"{100 * rel:.1f} % of full ({lora['test_accuracy']:.3f} vs "
                                 f"{full['test_accuracy']:.3f}) at {lora['trainable_pct']:.2f} %",
                        "met": bool(rel >= 0.98 and lora["trainable_pct"] <= 1.0)})
    for task, methods in per_task.items():
        lora = methods.get("lora")
        for side in SIDE:
            s = methods.get(side)
            if lora and s and "test_accuracy" in s and "test_accuracy" in lora and "train_mb" in s and \
                    "train_mb" in lora:
                mem = s["train_mb"] / max(lora["train_mb"], 1e-9)
                pk = s["peak_mb"] / lora["peak_mb"]
                dpp = 100 * (s["test_accuracy"] - lora["test_accuracy"])
                out.append({"task": task,
                            "target": f"{side}: training memory ≤ 50 % of LoRA's at acc ≥ LoRA − 2 pp",
                            "value": f"train +MB {100 * mem:.0f} % of LoRA's (process peak {100 * pk:.0f} %), "
                                     f"acc {dpp:+.1f} pp", "met": bool(mem <= 0.5 and dpp >= -2.0),
                            "train_mem_ratio": round(mem, 3), "peak_ratio": round(pk, 3), "acc_pp": round(dpp, 1)})
    return out


def _short(args: dict) -> str:
    import hashlib

    return hashlib.sha1(json.dumps(args, sort_keys=True).encode()).hexdigest()[:8]


def main(argv: list[str] | None = None, *, name: str = "tune_text", model: str = "all-minilm-l6-v2",
         tasks: str = "vader:movies,spamassassin,finefood",
         methods: str = "linear,full,lora,bitfit,scaled-parallel-adapter,ia3,sherl,unipt",
         per_class: int = 60, test_size: float = 0.4, epochs: int = 3, size_opt: str = "max_length", size: int = 32,
         config: dict | None = None, seeds: str = "0,1,2", doc: str | None = None, notes: str = "",
         mem_task: str = "spamassassin", mem_methods: str = "lora,full,sherl,unipt", mem_batch: int = 32,
         mem_size: int = 128, val_fraction: float = 0.1, lr_grid: str = "", compose_methods: str = "",
         source_tasks: str = "", jobs: int = 1) -> None:
    """The benchmark driver (``tune_vision.py`` reuses it with image defaults: no lr grid, no composition)."""
    config = CONFIG if config is None else config
    runs_dir = Path(__file__).parent / "results" / f"{name}.runs"
    ap = argparse.ArgumentParser(description=(doc or __doc__).splitlines()[0])
    ap.add_argument("--model", default=model)
    ap.add_argument("--tasks", default=tasks)
    ap.add_argument("--methods", default=methods)
    ap.add_argument("--seeds", default=seeds)
    ap.add_argument("--per-class", type=int, default=per_class)
    ap.add_argument("--test-size", type=float, default=test_size)
    ap.add_argument("--val-fraction", type=float, default=val_fraction,
                    help="fraction of the training split held out for validation (lr selection)")
    ap.add_argument("--epochs", type=int, default=epochs)
    ap.add_argument("--lr-grid", default=lr_grid,
                    help="multipliers of each method's default lr, tried on the first seed; the lr with the best "
                         "mean validation accuracy over the tasks is used for every seed ('' : defaults only)")
    ap.add_argument("--compose-methods", default=compose_methods,
                    help="adapter-composition methods, over frozen adapters trained on --source-tasks")
    ap.add_argument("--source-tasks", default=source_tasks)
    ap.add_argument("--" + size_opt.replace("_", "-"), type=int, default=size, dest="size")
    ap.add_argument("--threads", type=int, default=0, help="torch threads per child (0: torch default)")
    ap.add_argument("--jobs", type=int, default=jobs, help="child processes at a time")
    ap.add_argument("--fresh", action="store_true", help="ignore cached runs")
    ap.add_argument("--mem-task", default=mem_task, help="task of the memory-at-scale runs")
    ap.add_argument("--mem-methods", default=mem_methods, help="methods of the memory-at-scale runs ('' : none)")
    ap.add_argument("--mem-batch", type=int, default=mem_batch)
    ap.add_argument("--mem-size", type=int, default=mem_size, help=f"{size_opt} of the memory-at-scale runs")
    ap.add_argument("--mem-steps", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / f"{name}.json")
    a = ap.parse_args(argv)
    from transferkit.tune import train_defaults

    tasks_l, main_l = a.tasks.split(","), [m for m in a.methods.split(",") if m]
    comp_l = [m for m in a.compose_methods.split(",") if m]
    src_l = [t for t in a.source_tasks.split(",") if t]
    methods_l = main_l + comp_l
    seeds_l = [int(s) for s in a.seeds.split(",")]
    mults = [float(x) for x in a.lr_grid.split(",") if x]
    t_start = time.perf_counter()

    def base_args(task, method, seed, cfg):
        args = {"model": a.model, "data": task, "per_class": a.per_class, "test_size": a.test_size,
                "seed": seed, "epochs": a.epochs, "method": method, "config": cfg,
                "load": {size_opt: a.size}, "threads": a.threads}
        if a.val_fraction != 0.1:
            args["val_fraction"] = a.val_fraction
        return args

    def default_lr(method):
        return float({**train_defaults(method), **config.get(method, {})}["lr"])

    def cache_path(task, method, seed, args):
        tag = f"__{_short(args)}" if (mults or "val_fraction" in args) else ""
        return runs_dir / f"{task.replace(':', '_')}__{method}__s{seed}{tag}.json"

    # ---- source adapters for the composition methods: one `adapter` run per source task (first seed, default lr)
    src_dirs, src_rows, sources_root = [], {}, None
    if comp_l:
        from transferkit.assets import cache_dir

        src_args = [base_args(t, "adapter", seeds_l[0], config.get("adapter", {})) for t in src_l]
        sources_root = cache_dir() / "benchmarks" / f"{name}-sources-{_short(src_args)}"
        jobs_src = []
        for t, args in zip(src_l, src_args):
            d = sources_root / t.replace(":", "_")
            args = args | {"out_dir": str(d)}
            src_dirs.append(str(d))
            cache = runs_dir / f"source__{t.replace(':', '_')}__{_short(args)}.json"
            if not (d / "delta.json").is_file() and cache.exists():
                cache.unlink()  # the cached row's adapter is gone: train it again
            jobs_src.append((f"source {t} adapter", args, cache))
    else:
        jobs_src = []

    def method_cfg(method):
        cfg = dict(config.get(method, {}))
        if method in COMPOSE:
            cfg["sources"] = src_dirs
        if method == "shared-adapter":
            cfg["tasks"] = src_l
        return cfg

    def batches(ms_, seeds_, lrs_of):
        """One child per (task, seed) running ``ms_`` one after the other (first seed: + inference timing)."""
        out = []
        for seed in seeds_:
            for task in tasks_l:
                items = []
                for method in ms_:
                    args = base_args(task, method, seed, method_cfg(method)) | {"lrs": lrs_of(method)}
                    items.append(((task, method, seed), args, cache_path(task, method, seed, args)))
                common = {"model": a.model, "data": task, "per_class": a.per_class, "test_size": a.test_size,
                          "seed": seed, "epochs": a.epochs, "load": {size_opt: a.size}, "threads": a.threads,
                          "val_fraction": a.val_fraction, "infer": seed == seeds_l[0]}
                if items:
                    out.append((f"{task} s{seed} ({len(items)} methods)", common, items))
        return out

    def mem_jobs():
        out = []
        for method in [m for m in a.mem_methods.split(",") if m]:
            cfg = {**config.get(method, {}), "batch_size": a.mem_batch, "max_steps": a.mem_steps,
                   **({"epochs": 1} if "epochs" in config.get(method, {}) else {})}
            args = {"model": a.model, "data": a.mem_task, "per_class": a.per_class, "test_size": a.test_size,
                    "seed": 0, "epochs": 1, "method": method, "config": cfg,
                    "load": {size_opt: a.mem_size}, "threads": a.threads, "n_infer": 8, "infer_reps": 1}
            cache = runs_dir / f"mem__{a.mem_task.replace(':', '_')}__{method}__b{a.mem_batch}_{a.mem_size}.json"
            out.append((("mem", method), args, cache))
        return out

    def run(singles, batch_list=()):
        """Batches first (in order), then single fresh-process runs, ``a.jobs`` at a time; ``{key: row}``."""
        from concurrent.futures import ThreadPoolExecutor

        def one(job):
            if job[0] == "batch":
                _, _label, common, items = job
                got = batch_run(common, items, a.fresh)
                for k, r in got.items():
                    report(" ".join(map(str, k)), r)
                return got
            _, key, args, cache = job
            row = child_run(args, cache, a.fresh)
            report(" ".join(map(str, key)) if isinstance(key, tuple) else key, row)
            return {key: row}

        work = [("batch", *b) for b in batch_list] + [("single", *j) for j in singles]
        rows_ = {}
        with ThreadPoolExecutor(max(1, a.jobs)) as pool:
            for got in pool.map(one, work):
                rows_.update(got)
        return rows_

    chosen: dict[str, float] = {}
    selection: dict[str, dict] = {}

    def select(ms_, rows):
        for method in ms_:
            mrows = [rows[(t, method, seeds_l[0])] for t in tasks_l]
            ok = [r for r in mrows if "error" not in r]
            if not mults or not ok:
                continue
            i = choose_lr(ok)
            chosen[method] = ok[0]["grid"][i]["lr"]
            selection[method] = {"lrs": [g["lr"] for g in ok[0]["grid"]], "chosen": chosen[method],
                                 "mean_val": [statistics.mean(r["grid"][j].get("val_accuracy", 0.0) for r in ok)
                                              for j in range(len(ok[0]["grid"]))]}
            for r in ok:  # the first seed reports the run at the chosen lr
                g = r["grid"][i]
                r.update({"test_accuracy": g["test_accuracy"], "val_accuracy": g.get("val_accuracy"),
                          "seconds": g["seconds"]})
        for r in rows.values():
            if "error" not in r and r.get("grid"):
                r.setdefault("lr", r["grid"][0]["lr"])
                if mults and r["args"]["method"] in chosen:
                    r["lr"] = chosen[r["args"]["method"]]

    # pipeline: (sources + main methods on the first seed, over the lr grid) → lr choice → (main methods on the
    # other seeds at the chosen lr, memory runs, composition methods at their default lr on every seed)
    grid_lrs = (lambda m: [round(default_lr(m) * k, 10) for k in mults]) if mults else (lambda m: [None])
    rows: dict = {}
    rows.update(run(jobs_src, batches(main_l, seeds_l[:1], grid_lrs)))
    src_rows = {t: rows.pop(f"source {t} adapter") for t in src_l} if comp_l else {}
    select(main_l, rows)
    rows.update(run(mem_jobs(), batches(main_l, seeds_l[1:], lambda m: [chosen[m]] if m in chosen else [None])))
    rows.update(run([], batches(comp_l, seeds_l, lambda m: [None])))
    select([], rows)
    mem = [rows[("mem", m)] for m in [m for m in a.mem_methods.split(",") if m]]
    raw = {t: {m: [rows[(t, m, s)] for s in seeds_l] for m in methods_l} for t in tasks_l}

    ref = next((r for r in mem if r.get("method") == "lora" and "error" not in r), None)
    for r in mem:
        if ref and "error" not in r:
            r["train_vs_lora"] = round(r["train_mb"] / max(ref["train_mb"], 1e-9), 3)
            r["peak_vs_lora"] = round(r["peak_mb"] / ref["peak_mb"], 3)
    per_task = {t: {m: aggregate(raw[t][m]) for m in methods_l} for t in tasks_l}
    overall = {}
    for m in methods_l:
        accs = [per_task[t][m]["test_accuracy"] for t in tasks_l if "test_accuracy" in per_task[t][m]]
        if len(accs) == len(tasks_l):
            overall[m] = {"test_accuracy": statistics.mean(accs),
                          "trainable_pct": statistics.mean(per_task[t][m]["trainable_pct"] for t in tasks_l),
                          "trainable_params": per_task[tasks_l[0]][m]["trainable_params"],
                          "infer_ratio": statistics.mean(per_task[t][m].get("infer_ratio", float("nan")) for t in tasks_l),
                          "seconds": statistics.mean(per_task[t][m]["seconds"] for t in tasks_l)}
    if "full" in overall:
        for m, o in overall.items():
            o["of_full"] = o["test_accuracy"] / overall["full"]["test_accuracy"]
    tg = targets(per_task, overall)
    for r in mem:  # the side-network memory target at scale, with the accuracy difference averaged over tasks
        if r.get("method") in SIDE and "train_vs_lora" in r and r["method"] in overall and "lora" in overall:
            dpp = 100 * (overall[r["method"]]["test_accuracy"] - overall["lora"]["test_accuracy"])
            tg.append({"task": f"all (memory: {a.mem_task}, batch {a.mem_batch}, {size_opt} {a.mem_size})",
                       "target": f"{r['method']}: training memory ≤ 50 % of LoRA's at acc ≥ LoRA − 2 pp",
                       "value": f"train +MB {100 * r['train_vs_lora']:.0f} % of LoRA's (process peak "
                                f"{100 * r['peak_vs_lora']:.0f} %), acc {dpp:+.1f} pp (mean over tasks)",
                       "met": bool(r["train_vs_lora"] <= 0.5 and dpp >= -2.0)})
    cmd = f".venv/bin/python benchmarks/{name}.py " + " ".join(sys.argv[1:] if argv is None else argv)
    machine = (f"{platform.machine()}, {os.cpu_count()} CPU cores shared with other jobs (load avg "
               f"{os.getloadavg()[0]:.1f} at the end), no GPU; torch threads per run: {a.threads or 'default'}, "
               f"{a.jobs} run(s) at a time")
    out = {"model": a.model, "tasks": tasks_l, "methods": main_l, "compose_methods": comp_l,
           "source_tasks": src_l, "seeds": seeds_l, "per_class": a.per_class, "test_size": a.test_size,
           "val_fraction": a.val_fraction, "epochs": a.epochs, "lr_grid": mults, size_opt: a.size,
           "config": config, "command": cmd.strip(), "machine": machine,
           "wall_s": round(time.perf_counter() - t_start, 1), "lr_selection": selection,
           "per_task": per_task, "overall": overall, "targets": tg,
           "sources": {t: {k: r.get(k) for k in ("test_accuracy", "val_accuracy", "n_train", "n_test", "error")}
                       for t, r in src_rows.items()},
           "memory_at_scale": {"task": a.mem_task, "batch_size": a.mem_batch, size_opt: a.mem_size,
                               "steps": a.mem_steps, "rows": mem},
           "runs": {t: {m: raw[t][m] for m in methods_l} for t in tasks_l}}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(out, indent=1) + "\n")
    memd = {r["method"]: r for r in mem if "error" not in r}

    def pct(x):
        return f"{100 * x:.1f} %"

    any_ok = next((per_task[t][m] for t in tasks_l for m in methods_l if "test_accuracy" in per_task[t][m]), {})
    n_val = any_ok.get("n_val")
    lr_txt = (f"learning rate per method from the grid {{{', '.join(f'{k:g}' for k in mults)}}} × the method's "
              f"registry default, chosen by the mean validation accuracy over the {len(tasks_l)} tasks on seed "
              f"{seeds_l[0]} (ties: lower validation loss) and then used for every seed; the test split never "
              f"enters the choice" if mults else "learning rates: registry defaults unless the options say otherwise")
    lines = [f"# {name}: {a.model} on {len(tasks_l)} real tasks", "",
             f"Command: `{out['command']}`", "",
             f"Protocol (the same for every method): {a.per_class} examples per class sampled per seed, "
             f"{round(100 * a.test_size)} % of them the test split, {round(100 * a.val_fraction)} % "
             f"of the rest the validation split ({n_val} examples per task) and the remainder the training data; "
             f"{size_opt} {a.size}; {a.epochs} epochs at batch 8 (linear probe: 100 epochs at batch 64 on cached "
             f"features), AdamW with the registry's weight decay, linear schedule and warm-up; {lr_txt}; seeds "
             f"{a.seeds}. Method/train options: `{json.dumps(config)}`.", "",
             f"Machine: {machine}. Wall time of this invocation: {out['wall_s'] / 60:.1f} min "
             f"(cached runs count 0).", ""]
    if notes:
        lines += [notes, ""]
    if overall:
        lines += ["## Headline: mean over the tasks", "",
                  "accuracy = mean over tasks of the 3-seed mean test accuracy; % of full = that / full "
                  "fine-tuning's; trainable = parameters trained, % of the tuned model; train +MB = what training "
                  f"added to the process memory at batch {a.mem_batch} × {size_opt} {a.mem_size} (the memory table "
                  "below, one fresh process per method, same task and batches); infer × base = inference time of "
                  "the adapted model / base model (accuracy runs, mean over tasks).", "",
                  "| method | accuracy | % of full | trainable | trainable % | train +MB (peak MB) at scale | "
                  "train +MB / LoRA | infer × base | lr |", "|---|---|---|---|---|---|---|---|---|"]
        for m in methods_l:
            if m not in overall:
                continue
            o, r = overall[m], memd.get(m)
            memc = (f"{r['train_mb']:.0f} ({r['peak_mb']:.0f})", f"{r.get('train_vs_lora', '')}") if r else ("–", "–")
            lr = per_task[tasks_l[0]][m].get("lr") or default_lr(m)
            lines.append(f"| {m}{' (composition)' if m in comp_l else ''} | {o['test_accuracy']:.3f} | "
                         f"{pct(o.get('of_full', float('nan')))} | {o['trainable_params']:,} | "
                         f"{o['trainable_pct']:.2f} | {memc[0]} | {memc[1]} | {o['infer_ratio']:.2f} | {lr:.3g} |")
        lines.append("")
    lines += ["## Targets (issue 4), on the seed means", "", "| task | target | value | met |", "|---|---|---|---|"]
    lines += [f"| {x['task']} | {x['target']} | {x['value']} | {'yes' if x['met'] else 'NO'} |" for x in tg]
    lines.append("")
    if selection:
        lines += ["## Learning-rate selection (validation accuracy, mean over tasks, seed "
                  f"{seeds_l[0]})", "", "| method | " + " | ".join(f"× {k:g}" for k in mults) + " | chosen lr |",
                  "|---|" + "---|" * (len(mults) + 1)]
        for m in methods_l:
            if m in selection:
                s = selection[m]
                cells = [f"{v:.3f} (lr {lr:.3g})" for v, lr in zip(s["mean_val"], s["lrs"])]
                lines.append(f"| {m} | " + " | ".join(cells) + f" | {s['chosen']:.3g} |")
        lines.append("")
    if comp_l:
        lines += ["## Adapter composition (separate protocol: frozen source adapters)", "",
                  f"Sources: one sequential (Pfeiffer, FFN, bottleneck 64) `adapter` per source task "
                  f"({', '.join(src_l)}), trained once with the same data protocol on seed {seeds_l[0]} at the "
                  "adapter's default lr and frozen (their own test accuracy: "
                  + ", ".join(f"{t} {src_rows[t]['test_accuracy']:.3f}" for t in src_l if "error" not in src_rows[t])
                  + f"). ScaLearn variants and AdapterFusion learn only how to combine the {len(src_l)} frozen source "
                  "adapters "
                  f"(+ a new head) on each target task; shared-adapter trains one adapter shared by the target task "
                  f"and the {len(src_l)} source tasks ({config.get('shared-adapter', {}).get('task_per_class')} "
                  "examples per class each, task prompts, one head per task) and is scored on the target task. "
                  "Epochs and target data are those of the main table, but each composition method trains at its "
                  "registry default lr on every seed (no lr grid: CPU budget); `adapter` (trained on the target "
                  "itself, lr from the grid) is the reference.", "",
                  "| method | " + " | ".join(tasks_l) + " | mean | % of full | trainable | trainable % |",
                  "|---|" + "---|" * (len(tasks_l) + 4)]
        for m in (["adapter"] if "adapter" in main_l else []) + comp_l:
            cells = [f"{per_task[t][m]['test_accuracy']:.3f} ± {per_task[t][m]['test_accuracy_std']:.3f}"
                     if "test_accuracy" in per_task[t][m] else "error" for t in tasks_l]
            o = overall.get(m)
            tail = (f"{o['test_accuracy']:.3f} | {pct(o.get('of_full', float('nan')))} | {o['trainable_params']:,}"
                    f" | {o['trainable_pct']:.2f}") if o else "– | – | – | –"
            lines.append(f"| {m} | " + " | ".join(cells) + f" | {tail} |")
        lines.append("")
    lines += ['Per-task columns: accuracy = mean ± std over seeds of test accuracy; val = validation accuracy at the chosen lr; trainable = parameters trained (% of the tuned model); time = tune() wall seconds at the chosen lr (noisy: shared CPUs, several runs at a time); inference = ms per example of the adapted model as trained (LoRA unmerged) and its ratio to the base model timed on the same batches in the same process (seed 0 runs, batch 32, min of 3 interleaved passes).', ""]
    for t in tasks_l:
        ok = next((per_task[t][m] for m in methods_l if "test_accuracy" in per_task[t][m]), None)
        head = f"## {t}"
        if ok:
            head += (f" ({ok['n_train'] - (ok.get('n_val') or 0)} train + {ok.get('n_val')} val / {ok['n_test']} "
                     f"test, majority class {ok['majority']:.3f}, {ok['n_seeds']} seed(s))")
        lines += [head, "", "| method | accuracy | val | trainable | % | time s | infer ms/ex | infer × base | lr |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for m in methods_l:
            g = per_task[t][m]
            lr = g.get("lr") or default_lr(m)
            if "test_accuracy" not in g:
                lines.append(f"| {m} | error: {'; '.join(g['errors'])[:120]} | | | | | | | {lr:.3g} |")
                continue
            val = f"{g['val_accuracy']:.3f}" if "val_accuracy" in g else "–"
            lines.append(f"| {m} | {g['test_accuracy']:.3f} ± {g['test_accuracy_std']:.3f} | {val} | "
                         f"{g['trainable_params']:,} | {g['trainable_pct']:.2f} | {g['seconds']:.0f} ± "
                         f"{g['seconds_std']:.0f} | {g.get('infer_ms', float('nan')):.2f} | "
                         f"{g.get('infer_ratio', float('nan')):.2f} | {lr:.3g} |")
        lines.append("")
    lines += ["## Mean test accuracy over tasks", "", "| method | " + " | ".join(tasks_l) + " | mean |",
              "|---|" + "---|" * (len(tasks_l) + 1)]
    for m in methods_l:
        cells = [f"{per_task[t][m]['test_accuracy']:.3f}" if "test_accuracy" in per_task[t][m] else "–"
                 for t in tasks_l]
        mean = f"{overall[m]['test_accuracy']:.3f}" if m in overall else "–"
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {mean} |")
    if mem:
        lines += ["", f"## Peak training memory side by side ({a.mem_task}, batch {a.mem_batch}, "
                      f"{size_opt} {a.mem_size}, {a.mem_steps} optimizer steps at the default lr, one fresh "
                      "process each)", "",
                  "The accuracy runs use small batches and inputs (CPU budget), where the fixed part of the "
                  "training memory (the tuned copy of the backbone, optimizer, allocator) dominates; activation "
                  "memory — what side networks save — grows with batch × input size. Same columns:", "",
                  "| method | peak MB | train +MB | train +MB / LoRA | peak / LoRA |", "|---|---|---|---|---|"]
        for r in mem:
            if "error" in r:
                lines.append(f"| {r['method']} | error: {r['error'][:100]} | | | |")
            else:
                lines.append(f"| {r['method']} | {r['peak_mb']:.0f} | {r['train_mb']:.0f} | "
                             f"{r.get('train_vs_lora', '')} | {r.get('peak_vs_lora', '')} |")
    a.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


NOTES = (
    "Reading the numbers: one test example is 1.3 pp of a task's accuracy (75 test examples per task and "
    'seed) and the seed std is several pp, so differences of 1–2 pp between methods are within noise. '
    "'trainable' for full fine-tuning = every backbone parameter + the head; for LT-SFT (`sparse`) the "
    'non-zeros of its sparse Delta + the head. The accuracy runs train several methods in one process, so '
    'they report no memory; the side-network memory target uses the memory table (batch 32 × 128 tokens, one '
    'fresh process per method) with the accuracy difference taken from the accuracy runs. MAM: its registry lr was 5e-4, at which '
    'it stayed at chance (vader:movies, 200/class, 4 epochs: 0.50; 1e-4: 0.74; 5e-5: 0.72); the default is now '
    '1e-4, so its grid is {1e-4, 3e-4}; validation picks 3e-4 by 0.006, which is still unstable on vader:movies '
    'and finefood (seed std 8–11 pp). ScaLearn and ScaLearn++ give the same test accuracy in all 9 runs: in 64 steps at '
    'lr 5e-3 ω hardly moves from its start 2/N = 0.667 (a probe rerun of finefood seed 0 at the default max_length: '
    'mean |Δω| 0.022 / 0.023, max 0.095 / 0.094 for ScaLearn / ++; test 0.875 / 0.900), and both start from the same '
    'function (ω = 2/N everywhere, std 0.001), so the new head does the learning and the two variants differ by '
    'ω noise only (val loss 0.5940 vs 0.5940 in the benchmark run). Not a defect: ScaLearn trains ω for '
    'thousands of steps in the paper.')

ALL = ("linear,full,lora,bitfit,ia3,prefix,prompt,adapter,parallel-adapter,scaled-parallel-adapter,mam,sparse,"
       "unipt,sherl,r2")

if __name__ == "__main__":
    main(notes=NOTES, methods=ALL, per_class=100, test_size=0.375, val_fraction=0.2, epochs=4, lr_grid="1,3",
         compose_methods="scalearn,scalearn-uniform,scalearn++,scalearn-uniform++,adapterfusion,shared-adapter",
         source_tasks="vader:tweets,vader:nyt,vader:amazon", mem_methods=ALL.replace("linear,", ""), jobs=3)
