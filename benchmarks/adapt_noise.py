"""Noise as source (Yao et al., arXiv 2502.13573) on real digits: the knowledge-transfer framework with a real
heterogeneous source, with class-conditional Gaussian noise as the source, and the target-only baseline.

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/adapt_noise.py --seeds 0,1,2

Target: a digit set seen through the USPS digit CNN of the zoo (``digits-usps``, frozen, 128-d penultimate
features), split once (``make_split``, 30 % held out), ``--labels`` labelled items per class drawn from the
training part (the rest of it unlabelled), the held-out part only scored. Arms (``transferkit adapt --method
noise``, every other option at its default: 600 full-batch Adam steps, β 0.1, μ 0.1, τ 0.05):

- ``target-only`` (``source: none``): the same projector + classifier on the few target labels;
- ``real source`` (``source: pixels``): MNIST's raw pixels (16 × 16 after resizing to the model's input, 256-d,
  an unrelated feature space), labelled;
- ``noise source`` (``source: noise``): 500 items per class of N(μ_k, I), μ_k ~ N(0, I), 256-d.

Per target and seed the three arms share the split, the labelled items and the initialisation seed. Mean ±
sample standard deviation over seeds. Writes ``benchmarks/results/adapt_noise.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent
MODEL = "digits-usps"
SOURCE = "mnist"
TARGETS = ["sklearn-digits", "opencv-digits"]
ARMS = {"target-only": "none", "real source": "pixels", "noise source": "noise"}


def one(target: str, seed: int, limit: int, labels: int) -> dict:
    from transferkit.adapt import adapt
    from transferkit.data import load_dataset
    from transferkit.data.split import make_split
    from transferkit.zoo import load_model

    model = load_model(MODEL)
    src = load_dataset(SOURCE, limit=limit, seed=seed)
    train, test, split = make_split(target, limit=limit, sample_seed=seed, seed=seed, test_size=0.3)
    acc, secs, used = {}, {}, None
    for arm, source in ARMS.items():
        t0 = time.perf_counter()
        m = adapt(model, src, train, test, method="noise", options={"source": source, "labelled_per_class": labels},
                  seed=seed).metrics
        secs[arm] = round(time.perf_counter() - t0, 1)
        acc[arm] = m["accuracy"]
        assert used is None or used == m["target_labels_used"]  # the same few labels in every arm
        used = m["target_labels_used"]
    return {"target": target, "seed": seed, "n_source": len(src), "n_target_train": len(train),
            "n_test": len(test), "n_labelled": len(used), "test_sha256": split.test_sha256, "accuracy": acc,
            "seconds": secs}


def write(runs: list[dict], args, command: str, out: Path) -> None:
    from transferkit.runtime import environment

    summary = {}
    for target in TARGETS:
        rs = [r for r in runs if r["target"] == target]
        if rs:
            summary[target] = {a: [float(np.mean([r["accuracy"][a] for r in rs])),
                                   float(np.std([r["accuracy"][a] for r in rs], ddof=1)) if len(rs) > 1 else None]
                               for a in ARMS}
    doc = {"command": command, "model": MODEL, "source": SOURCE, "limit": args.limit,
           "labels_per_class": args.labels, "seeds": args.seeds, "environment": environment(), "summary": summary, "runs": runs}
    (out / "adapt_noise.json").write_text(json.dumps(doc, indent=1) + "\n")

    def cell(m, s):
        return f"{100 * m:.1f} ± {100 * s:.1f}" if s is not None else f"{100 * m:.1f}"

    lines = ["# Noise as source: semi-supervised heterogeneous DA on real digits", "", f"`{command}`", "",
             f"Target features: `{MODEL}` (frozen, 128-d); {args.labels} labelled target items per class from the "
             f"training part (the rest unlabelled), 30 % held out and only scored; at most {args.limit} items per set "
             f"(stratified, seeded); real source: {SOURCE} raw pixels (256-d); noise: 500 per class of N(μ_k, I), "
             f"256-d. Held-out accuracy (%), mean ± sd over {len(args.seeds)} seeds ({', '.join(map(str, args.seeds))}).",
             "", "| target | train / held-out items | labelled | " + " | ".join(ARMS) + " |",
             "|---|---|---|" + "---|" * len(ARMS)]
    for target, s in summary.items():
        r = next(r for r in runs if r["target"] == target)
        lines.append(f"| {target} | {r['n_target_train']} / {r['n_test']} | {r['n_labelled']} | "
                     + " | ".join(cell(*s[a]) for a in ARMS) + " |")
    lines += ["", "Seconds per run (mean): " + ", ".join(
        f"{a} {np.mean([r['seconds'][a] for r in runs]):.1f}" for a in ARMS) + ".", "",
        "Per seed: " + "; ".join(f"{r['target']} seed {r['seed']}: " + ", ".join(
            f"{a} {100 * r['accuracy'][a]:.1f}" for a in ARMS) for r in runs) + "."]
    (out / "adapt_noise.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--limit", type=int, default=2000)
    p.add_argument("--labels", type=int, default=3, help="labelled target items per class")
    p.add_argument("--out", type=Path, default=ROOT / "results")
    args = p.parse_args()
    args.seeds = [int(s) for s in args.seeds.split(",")]
    command = " ".join(["OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/adapt_noise.py", *sys.argv[1:]])
    runs = []
    for target in TARGETS:
        for seed in args.seeds:
            runs.append(one(target, seed, args.limit, args.labels))
            print(json.dumps(runs[-1]), flush=True)
            write(runs, args, command, args.out)


if __name__ == "__main__":
    main()
