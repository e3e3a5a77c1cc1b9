"""Parameter-efficient tuning of a real sentence encoder on a real text task.

all-MiniLM-L6-v2 (22.7M parameters) on a small sample of a built-in dataset; one fresh subprocess per
method, so that peak RSS (``ru_maxrss``) belongs to that method alone. Reports test accuracy,
trainable parameters (count and % of the tuned model), wall time and peak RSS.

    .venv/bin/python benchmarks/tune_text.py --quick          # ~3 min on 2 CPU cores
    .venv/bin/python benchmarks/tune_text.py --data finefood --per-class 200 --epochs 3 \
        --methods linear,full,lora,ia3,bitfit,adapter,parallel-adapter,mam

Writes benchmarks/results/tune_text.json and .md (one row per method, with the exact command).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
from transferkit.data import load_dataset, train_test_split
from transferkit.tune import tune
from transferkit.zoo import load_model
args = json.loads(sys.argv[1])
ds = load_dataset(args["data"], per_class=args["per_class"], seed=args["seed"])
train, test = train_test_split(ds, test_size=0.3, seed=args["seed"])
model = load_model(args["model"], max_length=args["max_length"])
config = {"epochs": args["epochs"], "seed": args["seed"], **args["config"]}
res = tune(model, train, test, method=args["method"], config=config, progress=False)
m = res.metrics
print(json.dumps({"method": args["method"], "test_accuracy": m.get("test_accuracy"),
                  "val_accuracy": m.get("val_accuracy"), "trainable_params": m["trainable_params"],
                  "total_params": m["total_params"], "trainable_pct": m["trainable_pct"],
                  "seconds": m["seconds"], "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "n_train": len(train), "n_test": len(test), "majority": float(max(
                      (test.y == c).mean() for c in range(len(test.classes))))}))
"""

# per-method training options for this benchmark (method defaults otherwise)
CONFIG = {
    "linear": {"epochs": 30},
    "full": {"lr": 5e-5},
    "lora": {"r": 8, "alpha": 16},
    "mam": {"prefix_length": 30, "prefix_hidden": 512, "bottleneck": 512},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="all-minilm-l6-v2")
    ap.add_argument("--data", default="vader:movies")
    ap.add_argument("--per-class", type=int, default=150)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--methods", default="linear,full,lora,ia3,bitfit,adapter,parallel-adapter,scaled-parallel-adapter,mam")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="60 per class, 2 epochs, linear/lora/bitfit/adapter")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "tune_text.json")
    a = ap.parse_args()
    if a.quick:
        a.per_class, a.epochs, a.methods = 60, 2, "linear,lora,bitfit,adapter"
    rows = []
    for method in a.methods.split(","):
        cfg = dict(CONFIG.get(method, {}))
        epochs = cfg.pop("epochs", a.epochs)
        args = {"model": a.model, "data": a.data, "per_class": a.per_class, "seed": a.seed, "max_length": a.max_length,
                "epochs": epochs, "method": method, "config": cfg}
        proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(args)], capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"{method}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
            rows.append({"method": method, "error": proc.stderr.strip().splitlines()[-1] if proc.stderr else "failed"})
            continue
        row = json.loads(proc.stdout.strip().splitlines()[-1]) | {"epochs": epochs, "config": cfg}
        rows.append(row)
        print(f"{method:24s} acc={row['test_accuracy']:.3f} trainable={row['trainable_params']:>9,d} "
              f"({row['trainable_pct']:.2f}%) {row['seconds']:7.1f}s peak={row['peak_rss_mb']:.0f} MB", file=sys.stderr)
    doc = {"model": a.model, "data": a.data, "per_class": a.per_class, "max_length": a.max_length, "seed": a.seed,
           "command": "benchmarks/tune_text.py " + " ".join(sys.argv[1:]), "rows": rows}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(doc, indent=2) + "\n")
    lines = [f"# tune_text: {a.model} on {a.data} ({a.per_class}/class, max_length {a.max_length}, seed {a.seed})", "",
             f"Command: `{doc['command']}`", "",
             "| method | test acc | trainable | % | seconds | peak RSS MB |", "|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | error: {r['error']} | | | | |")
        else:
            lines.append(f"| {r['method']} | {r['test_accuracy']:.3f} | {r['trainable_params']:,} | "
                         f"{r['trainable_pct']:.2f} | {r['seconds']:.1f} | {r['peak_rss_mb']:.0f} |")
    a.out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
