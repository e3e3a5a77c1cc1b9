"""Side networks vs LoRA vs full fine-tuning: accuracy, trainable parameters, time and peak training memory.

all-MiniLM-L6-v2 on a small sample of a real built-in text task; one fresh subprocess per method so that
the peak RSS (``VmHWM`` from /proc/self/status) belongs to that method alone. Two memory numbers:
``peak_rss_mb`` — the process high-water mark at the end; ``train_peak_mb`` — that mark minus the mark
just before training (model and data loaded, libraries imported), i.e. what training itself added.

    .venv/bin/python benchmarks/tune_side.py                      # ~6-10 min on 2 shared CPU cores
    .venv/bin/python benchmarks/tune_side.py --methods unipt,lora --per-class 60 --epochs 2

Writes benchmarks/results/tune_side.json and .md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, sys, time
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
from transferkit.data import load_dataset, train_test_split
from transferkit.tune import tune
from transferkit.zoo import load_model
args = json.loads(sys.argv[1])
ds = load_dataset(args["data"], per_class=args["per_class"], seed=args["seed"])
train, test = train_test_split(ds, test_size=0.3, seed=args["seed"])
model = load_model(args["model"], max_length=args["max_length"])
# import what tune() imports lazily (Accelerate, PEFT, the method modules) so that it is not counted as training
import accelerate, peft, transferkit.engine.loop, transferkit.tune.side, transferkit.tune.peft_methods  # noqa: E401,F401
accelerate.Accelerator(cpu=True)
before = hwm()
config = {"epochs": args["epochs"], "seed": args["seed"], **args["config"]}
res = tune(model, train, test, method=args["method"], config=config, progress=False)
m = res.metrics
peak = hwm()
print(json.dumps({"method": args["method"], "test_accuracy": m.get("test_accuracy"),
                  "val_accuracy": m.get("val_accuracy"), "trainable_params": m["trainable_params"],
                  "total_params": m["total_params"], "trainable_pct": m["trainable_pct"],
                  "seconds": m["seconds"], "peak_rss_mb": round(peak, 1), "baseline_rss_mb": round(before, 1),
                  "train_peak_mb": round(peak - before, 1), "n_train": len(train), "n_test": len(test),
                  "majority": float(max((test.y == c).mean() for c in range(len(test.classes))))}))
"""

# per-method options for this benchmark (method defaults otherwise)
CONFIG = {
    "full": {"lr": 5e-5},
    "lora": {"r": 8, "alpha": 16, "lr": 5e-4},
    "unipt": {"r": 96, "lr": 3e-3},
    "sherl": {"r": 96, "late_layers": 1, "lr": 3e-3},
    "r2": {"r": 128, "n_layers": 4, "lr": 3e-3},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="all-minilm-l6-v2")
    ap.add_argument("--data", default="vader:movies")
    ap.add_argument("--per-class", type=int, default=80)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--max-length", type=int, default=48)
    ap.add_argument("--methods", default="lora,unipt,sherl,r2,full")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "tune_side.json")
    a = ap.parse_args()
    rows = []
    for method in a.methods.split(","):
        cfg = dict(CONFIG.get(method, {}))
        args = {"model": a.model, "data": a.data, "per_class": a.per_class, "seed": a.seed, "max_length": a.max_length,
                "epochs": a.epochs, "method": method, "config": cfg}
        proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(args)], capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"{method}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
            rows.append({"method": method, "error": proc.stderr.strip().splitlines()[-1] if proc.stderr else "failed"})
            continue
        row = json.loads(proc.stdout.strip().splitlines()[-1]) | {"config": cfg}
        rows.append(row)
        print(f"{method:8s} acc={row['test_accuracy']:.3f} trainable={row['trainable_params']:>10,d} "
              f"({row['trainable_pct']:.2f}%) {row['seconds']:7.1f}s peak={row['peak_rss_mb']:.0f} MB "
              f"train+={row['train_peak_mb']:.0f} MB", file=sys.stderr, flush=True)
    ref = next((r for r in rows if r.get("method") == "lora" and "error" not in r), None)
    for r in rows:
        if ref and "error" not in r:
            r["train_peak_vs_lora"] = round(r["train_peak_mb"] / max(ref["train_peak_mb"], 1e-9), 3)
            r["peak_vs_lora"] = round(r["peak_rss_mb"] / ref["peak_rss_mb"], 3)
            r["acc_minus_lora_pp"] = round(100 * (r["test_accuracy"] - ref["test_accuracy"]), 1)
    doc = {"model": a.model, "data": a.data, "per_class": a.per_class, "max_length": a.max_length, "seed": a.seed,
           "epochs": a.epochs, "command": ".venv/bin/python benchmarks/tune_side.py " + " ".join(sys.argv[1:]),
           "memory": "VmHWM of a fresh process per method; train_peak = VmHWM at the end − VmHWM before tune()",
           "rows": rows}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(doc, indent=2) + "\n")
    lines = [f"# tune_side: {a.model} on {a.data} ({a.per_class}/class, {a.epochs} epochs, max_length "
             f"{a.max_length}, seed {a.seed})", "", f"Command: `{doc['command']}`", "",
             "Peak RSS = VmHWM of a fresh process per method; 'train +MB' = VmHWM after tune() minus VmHWM before "
             "it (model, data and libraries loaded). Ratios are against LoRA.", "",
             "| method | test acc | Δ vs LoRA (pp) | trainable | % | seconds | peak RSS MB | train +MB | train +MB / LoRA |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | error: {r['error']} | | | | | | | |")
        else:
            lines.append(f"| {r['method']} | {r['test_accuracy']:.3f} | {r.get('acc_minus_lora_pp', '')} | "
                         f"{r['trainable_params']:,} | {r['trainable_pct']:.2f} | {r['seconds']:.1f} | "
                         f"{r['peak_rss_mb']:.0f} | {r['train_peak_mb']:.0f} | {r.get('train_peak_vs_lora', '')} |")
    if rows and "error" not in rows[0]:
        lines += ["", f"Test set: {rows[0]['n_test']} samples, majority-class accuracy {rows[0]['majority']:.3f}."]
    a.out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
