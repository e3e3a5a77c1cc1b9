"""Novel class discovery: the UNO baseline vs class-relation KD (Gu et al. ICCV'23), ``transferkit distill
--method ncd``.

Target ``--target`` (default OpenCV's digits, all 5,000; a stratified ``--limit`` sample split once by
``make_split``, seed 0, 20 % held out): classes 0–4 are known (labelled), 5–9 novel (their training labels hidden
before anything trains). Base model ``digits-usps`` (the known-class model and the learner). Baseline: ``alpha 0``
(UNO's swapped prediction with Sinkhorn–Knopp pseudo-labels); relation KD: ``alpha 0.1`` (the paper's value), all
other options the method's defaults (5 epochs of the known-class model, 10 of discovery, AdamW lr 1e-3, batch 256,
4 novel heads). Seeds change the training only (same split), so the two arms are paired.

Metric: clustering accuracy (Hungarian assignment) of the best head — chosen by training loss, no label — on the
held-out novel items; also the mean over the heads, known-class accuracy and task-agnostic accuracy on all
held-out items. Mean ± standard error over ``--seeds``; the paired difference (KD − baseline) likewise.

Caveat: ``digits-usps`` was trained on USPS digits 0–9, so its backbone has seen the novel digit classes (of
another dataset); ``--target fashion-mnist`` is a setting whose novel classes no backbone saw (use ``--limit
7100`` for ≥ 500 held-out novel items: its held-out part follows the official split).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/distill_ncd.py     # ~5 min at one thread

Writes benchmarks/results/distill_ncd.json and .md (``--name`` another stem, e.g. distill_ncd_fashion).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
ARMS = {"baseline": 0.0, "relation_kd": 0.1}
KEYS = ("novel_cluster_accuracy", "novel_heads_mean", "known_test_accuracy", "test_accuracy")


def _mse(xs: list[float]) -> tuple[float, float]:
    return statistics.mean(xs), (statistics.stdev(xs) / len(xs) ** 0.5 if len(xs) > 1 else 0.0)


def main() -> None:
    from transferkit.data.split import make_split
    from transferkit.distill import distill, load_net

    t0 = time.perf_counter()
    seeds = [int(s) for s in ARGS.seeds.split(",")]
    train, test, _ = make_split(ARGS.target, limit=ARGS.limit, sample_seed=0, seed=0)
    net = load_net(ARGS.model, train.classes)
    known = train.classes[:5]
    runs: dict[str, list[dict]] = {arm: [] for arm in ARMS}
    for seed in seeds:
        for arm, alpha in ARMS.items():
            t = time.perf_counter()
            m = distill([net], net, train, test, method="ncd",
                        config={"alpha": alpha, "seed": seed, "known_classes": known}).metrics
            rec = {"seed": seed, **{k: m[k] for k in KEYS if k in m},
                   "novel_heads_mean": statistics.mean(m["novel_cluster_accuracy_heads"]),
                   "heads": m["novel_cluster_accuracy_heads"], "best_head": m["best_head"],
                   "known_model_accuracy": next(iter(m["teacher_test_accuracy"].values())),
                   "seconds": round(time.perf_counter() - t, 1)}
            runs[arm].append(rec)
            print(f"seed {seed} {arm}: novel {rec['novel_cluster_accuracy'] * 100:.2f} ({rec['seconds']} s)",
                  file=sys.stderr, flush=True)
    n_novel = m["n_test_novel"]
    summary = {arm: {k: dict(zip(("mean", "se"), _mse([r[k] for r in rs]))) for k in KEYS} for arm, rs in runs.items()}
    diff = [k["novel_cluster_accuracy"] - b["novel_cluster_accuracy"] for b, k in zip(runs["baseline"],
                                                                                     runs["relation_kd"])]
    paired = dict(zip(("mean", "se"), _mse(diff)))
    command = ("OMP_NUM_THREADS=1 .venv/bin/python benchmarks/distill_ncd.py " + " ".join(sys.argv[1:])).strip()
    result = {"command": command, "target": ARGS.target, "model": ARGS.model, "known_classes": known,
              "novel_classes": train.classes[5:], "n_train": len(train), "n_test": len(test), "n_test_novel": n_novel,
              "seeds": seeds, "arms": {a: {"alpha": ARMS[a], "summary": summary[a], "runs": runs[a]} for a in ARMS},
              "paired_novel_difference": paired, "seconds": round(time.perf_counter() - t0, 1)}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{ARGS.name}.json").write_text(json.dumps(result, indent=1) + "\n")

    def cell(arm, key):
        s = summary[arm][key]
        return f"{s['mean'] * 100:.2f} ± {s['se'] * 100:.2f}"

    rows = "\n".join(f"| {a} (α = {ARMS[a]}) | " + " | ".join(cell(a, k) for k in KEYS) + " |" for a in ARMS)
    md = (f"# Novel class discovery: UNO baseline vs class-relation KD (ncd)\n\n`{command}`\n\n"
          f"{ARGS.target}: {len(train)} train / {len(test)} held-out items; known {', '.join(known)} (labelled), "
          f"novel {', '.join(train.classes[5:])} (labels hidden); base model {ARGS.model}; method defaults (known-class"
          f" model 5 epochs, discovery 10 epochs, 4 heads, T = 4, τ = 0.1). Held-out accuracy %, mean ± s.e. over "
          f"seeds {ARGS.seeds} (same split, training seed varies). Novel: clustering accuracy (Hungarian) of the "
          f"best-by-training-loss head on the {n_novel} held-out novel items.\n\n"
          "| arm | novel (best head) | novel (mean of heads) | known | all (task-agnostic) |\n|---|---|---|---|---|\n"
          + rows + f"\n\nPaired difference on novel (KD − baseline): {paired['mean'] * 100:+.2f} ± "
          f"{paired['se'] * 100:.2f} pp. Total {result['seconds']} s.\n")
    (RESULTS / f"{ARGS.name}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", default="opencv-digits")
    p.add_argument("--model", default="digits-usps")
    p.add_argument("--limit", type=int, default=5000)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--name", default="distill_ncd", help="results file stem under benchmarks/results/")
    ARGS = p.parse_args()
    main()
