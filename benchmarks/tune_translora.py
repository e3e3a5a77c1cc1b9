"""Trans-LoRA on real models: a MiniLM-L6 LoRA moved to MiniLM-L3 from a few seeds + filtered augmentations.

For every seed of ``--seeds`` (each with its own data sample, train/test split, source LoRA and runs):

1. Train a LoRA on the *source* base (all-MiniLM-L6-v2) on a real task (default vader:movies) — the
   teacher; report its test accuracy.
2. Take ``--n-seed`` labelled examples per class of the training split (the only task data used
   afterwards), synthesise inputs by augmentation, filter them with a discriminator, and distil the
   teacher into a fresh LoRA on the *target* base (paraphrase-MiniLM-L3-v2):
   - ``translora``            — with the discriminator filter (top third of the pool by p_real);
   - ``translora-nofilter``   — the ablation: as many candidates drawn at random from the same pool;
   - ``seed-only``            — a target LoRA trained with cross-entropy on the seeds alone;
   - ``target-full-data``     — reference: a target LoRA trained on the whole real training split.

Then report the mean ± sd over seeds of every variant's test accuracy, the paired differences
translora − translora-nofilter and translora − seed-only, and translora as a percentage of the
target-full-data LoRA.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/tune_translora.py --seeds 0,1,2   # ~5 min (95-112 s a seed, 1 thread)
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/tune_translora.py --quick --seeds 0,1   # smoke run (~50 s)

Finished seeds are cached (one JSON per seed under ``--cache``, keyed by the arguments that change
results), so a rerun resumes; ``--fresh`` ignores the cache. Writes
benchmarks/results/tune_translora.json and .md (``_quick`` with ``--quick``), atomically.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from transferkit.io import write_text

CACHE_VERSION = 1
# arguments that change a seed's results (the cache key); --seeds, --out, --cache, --threads do not
KEY_ARGS = ("data", "per_class", "source", "target", "max_length", "n_seed", "n_synthetic", "source_epochs",
            "epochs", "lr", "disc_epochs", "no_full_data")
FILTER_KEYS = ("n_seed", "n_pool", "n_kept", "disc_train_accuracy", "disc_seed_p_real", "pool_p_real",
               "kept_p_real", "passed_0.5", "teacher_seed_accuracy", "test_agreement")
TEACHER, TL, NOFILTER, SEED_ONLY, FULL = ("source LoRA (teacher)", "translora", "translora-nofilter",
                                          "seed-only LoRA", "target-full-data LoRA (reference)")


def cache_file(args, seed: int) -> Path:
    cfg = {"version": CACHE_VERSION, **{k: getattr(args, k) for k in KEY_ARGS}}
    key = hashlib.sha1(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:12]
    return Path(args.cache).expanduser() / f"{key}-seed{seed}.json"


def run_seed(seed: int, args, source, target) -> dict:
    """The whole protocol for one seed: data sample/split, source LoRA, every variant."""
    from transferkit.data import load_dataset, train_test_split
    from transferkit.data.dataset import subsample
    from transferkit.tune import tune

    t_seed = time.perf_counter()
    ds = load_dataset(args.data, per_class=args.per_class, seed=seed)
    train, test = train_test_split(ds, test_size=0.3, seed=seed)
    majority = float(max((test.y == c).mean() for c in range(len(test.classes))))
    lora = {"r": 8, "alpha": 16, "lr": args.lr, "seed": seed}
    rows = []

    def row(name, model, m, t, **extra):
        r = {"variant": name, "model": model, "test_accuracy": round(float(m["test_accuracy"]), 4),
             "trainable_params": m.get("trainable_params"), "seconds": round(t, 1), **extra}
        rows.append(r)
        print(json.dumps({"seed": seed, **r}), file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        src_dir = Path(tmp) / "source-lora"
        t0 = time.perf_counter()
        res = tune(source, train, test, method="lora", config={**lora, "epochs": args.source_epochs},
                   out_dir=src_dir, progress=False)
        row(TEACHER, args.source, res.metrics, time.perf_counter() - t0, data="full train split")

        tl = {**lora, "source_model": args.source, "source_lora": str(src_dir), "n_seed": args.n_seed,
              "n_synthetic": args.n_synthetic, "epochs": args.epochs, "disc_epochs": args.disc_epochs}
        for name, extra in ((TL, {}), (NOFILTER, {"filter": False})):
            t0 = time.perf_counter()
            res = tune(target, train, test, method="translora", config={**tl, **extra}, progress=False,
                       val_fraction=0.0)
            row(name, args.target, res.metrics, time.perf_counter() - t0,
                data=f"{args.n_seed}/class seeds + {res.metrics['n_kept']} synthetic",
                **{k: res.metrics.get(k) for k in FILTER_KEYS if res.metrics.get(k) is not None})

        seeds = subsample(train, per_class=args.n_seed, seed=seed)
        t0 = time.perf_counter()
        steps_epochs = max(args.epochs, round(args.epochs * (2 * args.n_seed + args.n_synthetic) / (2 * args.n_seed)))
        res = tune(target, seeds, test, method="lora", config={**lora, "epochs": min(steps_epochs, 60),
                                                                 "batch_size": 16}, progress=False, val_fraction=0.0)
        row(SEED_ONLY, args.target, res.metrics, time.perf_counter() - t0,
            data=f"{args.n_seed}/class seeds, CE, same number of steps")
        if not args.no_full_data:
            t0 = time.perf_counter()
            res = tune(target, train, test, method="lora", config={**lora, "epochs": args.source_epochs},
                       progress=False)
            row(FULL, args.target, res.metrics, time.perf_counter() - t0, data="full train split")
    return {"seed": seed, "n_train": len(train), "n_test": len(test), "majority": round(majority, 4),
            "threads": args.threads, "seconds": round(time.perf_counter() - t_seed, 1), "rows": rows}


def mean_sd(xs: list[float]) -> dict:
    return {"mean": statistics.fmean(xs), "sd": statistics.stdev(xs) if len(xs) > 1 else None, "values": xs}


def fmt(ms: dict, scale: float = 1.0, nd: int = 3, sign: str = "") -> str:
    s = f"{ms['mean'] * scale:{sign}.{nd}f}"
    return s + (f" ± {ms['sd'] * scale:.{nd}f}" if ms["sd"] is not None else "")


def aggregate(runs: list[dict]) -> dict:
    acc = {r["variant"]: [] for r in runs[0]["rows"]}
    for run in runs:
        for r in run["rows"]:
            acc[r["variant"]].append(r["test_accuracy"])
    variants = []
    for r0 in runs[0]["rows"]:
        v = r0["variant"]
        rs = [next(r for r in run["rows"] if r["variant"] == v) for run in runs]
        variants.append({"variant": v, "model": r0["model"], "data": " / ".join(dict.fromkeys(r["data"] for r in rs)),
                         "test_accuracy": mean_sd(acc[v]), "trainable_params": r0["trainable_params"],
                         "mean_seconds": round(statistics.fmean(r["seconds"] for r in rs), 1)})
    paired = {}
    for other in (NOFILTER, SEED_ONLY):
        if TL in acc and other in acc:
            paired[f"{TL} − {other}"] = mean_sd([round(a - b, 4) for a, b in zip(acc[TL], acc[other], strict=True)])
    pct = None
    if TL in acc and FULL in acc:
        pct = {"per_seed": mean_sd([round(100 * a / b, 2) for a, b in zip(acc[TL], acc[FULL], strict=True)]),
               "of_means": round(100 * statistics.fmean(acc[TL]) / statistics.fmean(acc[FULL]), 2)}
    return {"variants": variants, "paired_differences": paired, "translora_pct_of_full_data": pct}


def markdown(doc: dict) -> str:
    runs, agg, seeds = doc["per_seed"], doc["aggregate"], doc["seeds"]
    n = len(seeds)
    r0 = runs[0]
    lines = [(f"# tune_translora: {doc['source']} LoRA → {doc['target']} on {doc['data']} "
              f"({doc['per_class']}/class, {r0['n_train']} train / {r0['n_test']} test per seed, "
              f"max_length {doc['max_length']}, seeds {', '.join(map(str, seeds))})"), "",
             f"Command: `{doc['command']}`", "",
             f"Machine: {doc['machine']}. Wall time of this invocation: {doc['wall_seconds']:.0f} s"
             + (f" (seeds {', '.join(map(str, doc['cached_seeds']))} read from the cache)" if doc["cached_seeds"]
                else "") + "; per-seed compute: " + ", ".join(f"seed {r['seed']} {r['seconds']:.0f} s" for r in runs)
             + ".", "",
             f"## Test accuracy — mean ± sd over {n} seed{'s' if n > 1 else ''}", "",
             "| variant | model | data used | test acc (mean ± sd) | " + " | ".join(f"seed {s}" for s in seeds)
             + " | trainable | mean seconds |",
             "|---|---|---|---|" + "---|" * n + "---|---|"]
    for v in agg["variants"]:
        a = v["test_accuracy"]
        lines.append(f"| {v['variant']} | {v['model']} | {v['data']} | {fmt(a)} | "
                     + " | ".join(f"{x:.3f}" for x in a["values"])
                     + f" | {v['trainable_params']:,} | {v['mean_seconds']} |")
    lines += ["", "Majority-class test accuracy per seed: " + ", ".join(f"{r['majority']:.3f}" for r in runs) + "."]
    if agg["paired_differences"]:
        lines += ["", "## Paired differences (same seed, test accuracy in percentage points)", "",
                  "| difference | mean ± sd (pp) | " + " | ".join(f"seed {s}" for s in seeds) + " |",
                  "|---|---|" + "---|" * n]
        for k, d in agg["paired_differences"].items():
            lines.append(f"| {k} | {fmt(d, 100, 1, '+')} | " + " | ".join(f"{100 * x:+.1f}" for x in d["values"]) + " |")
    if pct := agg["translora_pct_of_full_data"]:
        lines += ["", f"translora reaches **{fmt(pct['per_seed'], 1, 1)} %** of the target-full-data LoRA's test "
                      f"accuracy (mean ± sd of the per-seed ratios: "
                      + ", ".join(f"{x:.1f} %" for x in pct["per_seed"]["values"])
                      + f"; ratio of the means: {pct['of_means']:.1f} %)."]
    keys = [k for k in FILTER_KEYS if any(k in r for run in runs for r in run["rows"] if r["variant"] == TL)]
    if keys:
        lines += ["", "## Filter statistics (translora) per seed", "",
                  "| seed | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
        for run in runs:
            r = next(r for r in run["rows"] if r["variant"] == TL)
            lines.append(f"| {run['seed']} | " + " | ".join(str(r.get(k, "")) for k in keys) + " |")
    if n > 1:
        lines += ["", "± = sample standard deviation over seeds (n − 1)."]
    lines += ["", doc["notes"] + "."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="vader:movies")
    ap.add_argument("--per-class", type=int, default=150)
    ap.add_argument("--source", default="all-minilm-l6-v2")
    ap.add_argument("--target", default="paraphrase-minilm-l3-v2")
    ap.add_argument("--max-length", type=int, default=48)
    ap.add_argument("--n-seed", type=int, default=5, help="labelled seed examples per class")
    ap.add_argument("--n-synthetic", type=int, default=150)
    ap.add_argument("--source-epochs", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=4, help="distillation epochs")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--disc-epochs", type=int, default=3)
    ap.add_argument("--seeds", "--seed", default="0,1,2", help="comma-separated seeds (--seed N = one seed)")
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    ap.add_argument("--no-full-data", action="store_true", help="skip the target-full-data reference")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--cache", default=str(Path.home() / ".cache" / "transferkit" / "benchmarks" / "tune_translora"),
                    help="per-seed result cache (a rerun resumes from it)")
    ap.add_argument("--fresh", action="store_true", help="ignore (and overwrite) cached seeds")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()
    if args.quick:
        args.per_class, args.n_synthetic, args.source_epochs, args.epochs = 60, 40, 1, 1
    seeds = [int(s) for s in str(args.seeds).split(",") if s.strip()]

    import torch

    torch.set_num_threads(args.threads)
    from transferkit.zoo import load_model

    t_start = time.perf_counter()
    load_start = os.getloadavg()[0]
    source = target = None
    runs, cached = [], []
    for seed in seeds:
        cf = cache_file(args, seed)
        if cf.exists() and not args.fresh:
            run = json.loads(cf.read_text())
            cached.append(seed)
            print(f"seed {seed}: cached ({cf})", file=sys.stderr, flush=True)
        else:
            if source is None:
                source = load_model(args.source, max_length=args.max_length)
                target = load_model(args.target, max_length=args.max_length)
            run = run_seed(seed, args, source, target)
            write_text(cf, json.dumps(run, indent=2) + "\n")
        runs.append(run)

    env = [f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}"] if "OMP_NUM_THREADS" in os.environ else []
    cmd = " ".join([*env, "python", "benchmarks/tune_translora.py", *sys.argv[1:]])
    machine = (f"CPU, torch.set_num_threads({args.threads}), {os.cpu_count()} logical cores shared with other jobs "
               f"(1-min load average {load_start:.1f} at start, {os.getloadavg()[0]:.1f} at end)")
    doc = {"benchmark": "tune_translora", "command": cmd, "data": args.data, "per_class": args.per_class,
           "source": args.source, "target": args.target, "max_length": args.max_length, "seeds": seeds,
           "config": {k: getattr(args, k) for k in KEY_ARGS}, "machine": machine,
           "wall_seconds": round(time.perf_counter() - t_start, 1), "cached_seeds": cached,
           "aggregate": aggregate(runs), "per_seed": runs,
           "notes": "synthetic inputs are word-level augmentations of the seeds (no generative LM offline); "
                    "the filter keeps the n_synthetic most real-like of a 3x pool; the no-filter ablation keeps "
                    "as many at random from the same pool; each seed draws its own data sample and train/test "
                    "split and trains its own source LoRA"}
    out = Path(args.out)
    name = "tune_translora" + ("_quick" if args.quick else "")
    md = markdown(doc)
    write_text(out / f"{name}.json", json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
    write_text(out / f"{name}.md", md)
    print(md)


if __name__ == "__main__":
    main()
