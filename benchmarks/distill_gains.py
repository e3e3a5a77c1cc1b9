"""Fantastic Gains in miniature: complementary knowledge and transfer between the digit CNNs of the zoo.

Every ordered pair (student, teacher) of ``digits-mnist``, ``digits-usps`` and ``digits-svhn`` — each with its
own pretrained 0–9 head, no tuning — on a stratified sample of ``--data`` split 80/20 by ``make_split``
(seed 0; the 20 % held out is the test set):

- flips of the teacher over the student on the test set (positive: student wrong, teacher right; negative:
  the reverse), :func:`transferkit.distill.flips`;
- transfer delta (student test accuracy after − before) of plain KD (T²·KL to the teacher, α = 0, starting from
  the pretrained student), KL+DP supervised and KL+DP label-free (``kl_dp``), each ``--epochs`` epochs at
  AdamW lr 1e-4, T = 1, batch 32, for each seed of ``--seeds``.

The paper's finding to check: KL+DP's delta ≥ 0 for (nearly) every pair while plain KD's is negative for many.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/distill_gains.py      # ~5 min at one thread

Writes benchmarks/results/distill_gains.json and .md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from itertools import permutations
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
MODELS = ("digits-mnist", "digits-usps", "digits-svhn")
METHODS = ("kd", "kl_dp", "kl_dp_label_free")


def transfer(student, teacher, train, test, method: str, seed: int, epochs: int) -> float:
    """Transfer delta of one run (after − before, test accuracy)."""
    from transferkit.distill import distill
    from transferkit.distill._common import accuracy, fit_val, start_student, train_student
    from transferkit.distill.kd import KDOptions, kd_objective
    from transferkit.engine import TrainConfig

    if method == "kd":  # plain KD into the pretrained student (its own head), no hard-label term
        module = start_student(student, train.classes)
        before = accuracy(module, student, test)
        fit, val = fit_val(train, 0.1, seed)
        cfg = TrainConfig(epochs=epochs, lr=1e-4, batch_size=32, seed=seed, progress=False)
        train_student(module, student, [teacher], kd_objective(KDOptions(temperature=1.0, alpha=0.0)), fit, val,
                      cfg, cache=True)
        return accuracy(module, student, test) - before
    res = distill([teacher], student, train, test, method="kl_dp",
                  config={"epochs": epochs, "seed": seed, "supervised": method == "kl_dp"})
    return res.metrics["transfer_delta"]


def main() -> None:
    import numpy as np

    from transferkit.data.split import make_split
    from transferkit.distill import flips, load_net
    from transferkit.distill._common import accuracy, predictions

    t0 = time.perf_counter()
    train, test, split = make_split(ARGS.data, limit=ARGS.limit, sample_seed=0, seed=0)
    nets = {m: load_net(m, train.classes) for m in MODELS}
    acc = {m: accuracy(n.module, n, test) for m, n in nets.items()}
    preds = {m: predictions(n.module, n, test) for m, n in nets.items()}
    seeds = [int(s) for s in ARGS.seeds.split(",")]
    pairs = []
    for s_name, t_name in permutations(MODELS, 2):
        f = flips(preds[s_name], preds[t_name], test.y, len(train.classes))
        row = {"student": s_name, "teacher": t_name, "student_accuracy": acc[s_name], "teacher_accuracy": acc[t_name],
               "positive_flips": f["positive"], "negative_flips": f["negative"], "top20_share": f["top_p_share"]}
        for method in METHODS:
            deltas = [transfer(nets[s_name], nets[t_name], train, test, method, seed, ARGS.epochs) for seed in seeds]
            row[method] = {"delta": statistics.mean(deltas),
                           "se": statistics.stdev(deltas) / len(deltas) ** 0.5 if len(deltas) > 1 else 0.0,
                           "deltas": deltas}
            print(f"{s_name} ← {t_name} {method}: {row[method]['delta'] * 100:+.2f} pp", file=sys.stderr)
        pairs.append(row)
    share = {m: float(np.mean([p[m]["delta"] >= 0 for p in pairs])) for m in METHODS}
    command = "OMP_NUM_THREADS=1 .venv/bin/python benchmarks/distill_gains.py " + " ".join(sys.argv[1:])
    result = {"command": command.strip(), "data": ARGS.data, "n_train": len(train), "n_test": len(test),
              "epochs": ARGS.epochs, "seeds": seeds, "pairs": pairs, "share_delta_nonnegative": share,
              "seconds": round(time.perf_counter() - t0, 1)}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "distill_gains.json").write_text(json.dumps(result, indent=1) + "\n")
    pp = lambda d: f"{d['delta'] * 100:+.2f} ± {d['se'] * 100:.2f}"  # noqa: E731
    rows = "\n".join(
        f"| {p['student']} | {p['teacher']} | {p['student_accuracy'] * 100:.1f} | {p['teacher_accuracy'] * 100:.1f} | "
        f"{p['positive_flips'] * 100:.1f} | {p['negative_flips'] * 100:.1f} | {pp(p['kd'])} | {pp(p['kl_dp'])} | "
        f"{pp(p['kl_dp_label_free'])} |" for p in pairs)
    md = (f"# Fantastic Gains: flips and transfer delta between the digit CNNs\n\n`{result['command']}`\n\n"
          f"{ARGS.data}: {len(train)} training, {len(test)} test items; {ARGS.epochs} epochs, AdamW lr 1e-4, T = 1, "
          f"seeds {ARGS.seeds}; transfer delta = student test accuracy after − before (pp, mean ± s.e.).\n\n"
          "| student | teacher | student acc. % | teacher acc. % | positive flips % | negative flips % | "
          "KD delta | KL+DP delta | KL+DP label-free delta |\n|---|---|---|---|---|---|---|---|---|\n" + rows +
          f"\n\nShare of pairs with delta ≥ 0: KD {share['kd'] * 100:.0f} %, KL+DP {share['kl_dp'] * 100:.0f} %, "
          f"KL+DP label-free {share['kl_dp_label_free'] * 100:.0f} %.\n")
    (RESULTS / "distill_gains.md").write_text(md)
    print(md)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="mnist")
    p.add_argument("--limit", type=int, default=2500)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--seeds", default="0,1,2")
    ARGS = p.parse_args()
    main()
