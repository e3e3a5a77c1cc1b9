"""Trans-LoRA on real models: a MiniLM-L6 LoRA moved to MiniLM-L3 from a few seeds + filtered augmentations.

1. Train a LoRA on the *source* base (all-MiniLM-L6-v2) on a real task (default vader:movies) — the
   teacher; report its test accuracy.
2. Take ``--n-seed`` labelled examples per class of the training split (the only task data used
   afterwards), synthesise inputs by augmentation, filter them with a discriminator, and distil the
   teacher into a fresh LoRA on the *target* base (paraphrase-MiniLM-L3-v2):
   - ``translora``            — with the discriminator filter (top third of the pool by p_real);
   - ``translora-nofilter``   — the ablation: as many candidates drawn at random from the same pool;
   - ``seed-only``            — a target LoRA trained with cross-entropy on the seeds alone;
   - ``target-full-data``     — reference: a target LoRA trained on the whole real training split.

    .venv/bin/python benchmarks/tune_translora.py            # ~10 min on 2 busy CPU cores
    .venv/bin/python benchmarks/tune_translora.py --quick    # smoke run

Writes benchmarks/results/tune_translora.json and .md (one row per variant, with the exact command).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path


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
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-full-data", action="store_true", help="skip the target-full-data reference")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()
    if args.quick:
        args.per_class, args.n_synthetic, args.source_epochs, args.epochs = 60, 40, 1, 1

    import torch

    torch.set_num_threads(2)
    from transferkit.data import load_dataset, train_test_split
    from transferkit.data.dataset import subsample
    from transferkit.tune import tune
    from transferkit.zoo import load_model

    ds = load_dataset(args.data, per_class=args.per_class, seed=args.seed)
    train, test = train_test_split(ds, test_size=0.3, seed=args.seed)
    majority = float(max((test.y == c).mean() for c in range(len(test.classes))))
    source = load_model(args.source, max_length=args.max_length)
    target = load_model(args.target, max_length=args.max_length)
    lora = {"r": 8, "alpha": 16, "lr": args.lr, "seed": args.seed}
    rows = []

    def row(name, model, m, t, **extra):
        r = {"variant": name, "model": model, "test_accuracy": round(float(m["test_accuracy"]), 4),
             "trainable_params": m.get("trainable_params"), "seconds": round(t, 1), **extra}
        rows.append(r)
        print(json.dumps(r), file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        src_dir = Path(tmp) / "source-lora"
        t0 = time.perf_counter()
        res = tune(source, train, test, method="lora", config={**lora, "epochs": args.source_epochs},
                   out_dir=src_dir, progress=False)
        row("source LoRA (teacher)", args.source, res.metrics, time.perf_counter() - t0, data="full train split")

        tl = {**lora, "source_model": args.source, "source_lora": str(src_dir), "n_seed": args.n_seed,
              "n_synthetic": args.n_synthetic, "epochs": args.epochs, "disc_epochs": args.disc_epochs}
        keys = ("n_seed", "n_pool", "n_kept", "disc_train_accuracy", "disc_seed_p_real", "pool_p_real",
                "kept_p_real", "passed_0.5", "teacher_seed_accuracy", "test_agreement")
        for name, extra in (("translora", {}), ("translora-nofilter", {"filter": False})):
            t0 = time.perf_counter()
            res = tune(target, train, test, method="translora", config={**tl, **extra}, progress=False,
                       val_fraction=0.0)
            row(name, args.target, res.metrics, time.perf_counter() - t0,
                data=f"{args.n_seed}/class seeds + {res.metrics['n_kept']} synthetic",
                **{k: res.metrics.get(k) for k in keys if res.metrics.get(k) is not None})

        seeds = subsample(train, per_class=args.n_seed, seed=args.seed)
        t0 = time.perf_counter()
        steps_epochs = max(args.epochs, round(args.epochs * (2 * args.n_seed + args.n_synthetic) / (2 * args.n_seed)))
        res = tune(target, seeds, test, method="lora", config={**lora, "epochs": min(steps_epochs, 60),
                                                                 "batch_size": 16}, progress=False, val_fraction=0.0)
        row("seed-only LoRA", args.target, res.metrics, time.perf_counter() - t0,
            data=f"{args.n_seed}/class seeds, CE, same number of steps")
        if not args.no_full_data:
            t0 = time.perf_counter()
            res = tune(target, train, test, method="lora", config={**lora, "epochs": args.source_epochs},
                       progress=False)
            row("target-full-data LoRA (reference)", args.target, res.metrics, time.perf_counter() - t0,
                data="full train split")

    cmd = "benchmarks/tune_translora.py " + " ".join(sys.argv[1:])
    doc = {"benchmark": "tune_translora", "command": cmd.strip(), "data": args.data, "per_class": args.per_class,
           "n_train": len(train), "n_test": len(test), "majority": round(majority, 4), "source": args.source,
           "target": args.target, "max_length": args.max_length, "seed": args.seed, "rows": rows,
           "notes": "synthetic inputs are word-level augmentations of the seeds (no generative LM offline); "
                    "the filter keeps the n_synthetic most real-like of a 3x pool; the no-filter ablation keeps "
                    "as many at random from the same pool"}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "tune_translora" + ("_quick" if args.quick else "")
    (out / f"{name}.json").write_text(json.dumps(doc, indent=2) + "\n")
    lines = [(f"# tune_translora: {args.source} LoRA → {args.target} on {args.data} "
             f"({args.per_class}/class, {len(train)} train / {len(test)} test, majority {majority:.3f}, "
             f"max_length {args.max_length}, seed {args.seed})"), "",
             f"Command: `{cmd.strip()}`", "",
             "| variant | model | data used | test acc | trainable | seconds |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['model']} | {r['data']} | {r['test_accuracy']:.3f} | "
                     f"{r['trainable_params']:,} | {r['seconds']} |")
    tl_rows = [r for r in rows if r["variant"].startswith("translora")]
    if tl_rows:
        lines += ["", "Filter statistics (translora): " + ", ".join(
            f"{k} = {v}" for k, v in tl_rows[0].items() if k not in ("variant", "model", "test_accuracy",
                                                                     "trainable_params", "seconds", "data"))]
    lines += ["", doc["notes"] + "."]
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
