"""Teacher choice: DistillNearest / DistillWeighted vs a random teacher and the largest model.

Source pool: the zoo's digit CNNs ``digits-mnist``, ``digits-usps``, ``digits-svhn`` (the largest, 815 k
parameters). Student: ``digits-usps`` with a new head. Each target (``--targets``, a stratified ``--limit``
sample split by ``make_split``, seed 0) keeps ``--labelled`` labels per class of its training part (the rest is
used unlabelled); each teacher is a source backbone with a logistic-regression probe fitted on those labelled
items; distillation: KD (T = 4, α = 0.1, CE on the labelled items only), ``--epochs`` epochs, AdamW lr 1e-3.

- nearest: the source LogME ranks first; weighted: the softmax(z-scored LogME / τ = 1) mixture of all three;
- random: one source drawn per seed; largest: digits-svhn.

Test accuracy on the held-out part, mean ± standard error over ``--seeds`` (the seed also picks the labelled
items and the random teacher).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/distill_teacher.py     # ~6 min at one thread

Writes benchmarks/results/distill_teacher.json and .md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
POOL = ("digits-mnist", "digits-usps", "digits-svhn")
LARGEST = "digits-svhn"
CHOICES = ("nearest", "weighted", "random", "largest")


def one(choice: str, nets: dict, student, train, test, seed: int) -> dict:
    from transferkit.distill import distill

    cfg = {"epochs": ARGS.epochs, "seed": seed, "labelled": ARGS.labelled}
    if choice in ("nearest", "weighted"):
        pool, method = list(nets.values()), choice
    else:
        name = LARGEST if choice == "largest" else POOL[np.random.default_rng(seed).integers(len(POOL))]
        pool, method = [nets[name]], "nearest"  # a pool of one: that source's probe is the teacher
    m = distill(pool, student, train, test, method=method, config=cfg).metrics
    return {"accuracy": m["test_accuracy"], "distilled_from": m["distilled_from"], "weights": m["teacher_weights"],
            "scores": m["scores"]}


def main() -> None:
    from transferkit.data.split import make_split
    from transferkit.distill import load_net

    t0 = time.perf_counter()
    seeds = [int(s) for s in ARGS.seeds.split(",")]
    out = {}
    for target in ARGS.targets.split(","):
        train, test, _ = make_split(target, limit=ARGS.limit, sample_seed=0, seed=0)
        nets = {m: load_net(m, train.classes) for m in POOL}
        student = load_net("digits-usps", train.classes)
        rows = {}
        for choice in CHOICES:
            recs = [one(choice, nets, student, train, test, s) for s in seeds]
            accs = [r["accuracy"] for r in recs]
            rows[choice] = {"accuracy": statistics.mean(accs),
                            "se": statistics.stdev(accs) / len(accs) ** 0.5 if len(accs) > 1 else 0.0, "runs": recs}
            print(f"{target} {choice}: {rows[choice]['accuracy'] * 100:.2f}", file=sys.stderr)
        out[target] = {"n_train": len(train), "n_test": len(test), "choices": rows}
    command = "OMP_NUM_THREADS=1 .venv/bin/python benchmarks/distill_teacher.py " + " ".join(sys.argv[1:])
    result = {"command": command.strip(), "pool": list(POOL), "student": "digits-usps", "labelled": ARGS.labelled,
              "epochs": ARGS.epochs, "seeds": seeds, "targets": out, "seconds": round(time.perf_counter() - t0, 1)}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "distill_teacher.json").write_text(json.dumps(result, indent=1) + "\n")
    rows = "\n".join(f"| {t} ({r['n_train']}/{r['n_test']}) | " + " | ".join(
        f"{r['choices'][c]['accuracy'] * 100:.2f} ± {r['choices'][c]['se'] * 100:.2f}" for c in CHOICES) + " | "
        + ", ".join(sorted({x for run in r['choices']['nearest']['runs'] for x in run['distilled_from']})) + " |"
        for t, r in out.items())
    md = (f"# Teacher choice: DistillNearest / DistillWeighted vs random and largest teacher\n\n`{command.strip()}`\n\n"
          f"Pool {', '.join(POOL)} → student digits-usps (new head); {ARGS.labelled} labels per class, the rest "
          f"unlabelled; KD T = 4, α = 0.1, {ARGS.epochs} epochs; test accuracy % (mean ± s.e., seeds "
          f"{ARGS.seeds}).\n\n| target (train/test) | nearest | weighted | random | largest | nearest picked |\n"
          "|---|---|---|---|---|---|\n"
          + rows + "\n")
    (RESULTS / "distill_teacher.md").write_text(md)
    print(md)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--targets", default="sklearn-digits,opencv-digits,mnist")
    p.add_argument("--limit", type=int, default=2000)
    p.add_argument("--labelled", type=int, default=10)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--seeds", default="0,1,2")
    ARGS = p.parse_args()
    main()
