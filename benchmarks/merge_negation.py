"""Benchmark: task negation (forgetting) measured on large held-out sets (transferkit.merge.negate).

``benchmarks/merge_text.py`` merges four full fine-tunes of all-MiniLM-L6-v2 (VADER tweets,
SpamAssassin, fine-food, VADER nyt; 250 examples/class per task and seed) and forgets one task
(spam) from the task-arithmetic merge: θ = θ_TA − λ_neg·τ_spam. Its test sets hold 99–150 items
per task (1 item = 0.67–1 pp) and its validation sets 70–80, so both the choice of λ_neg and the
"others move < 2 pp" check sit at the resolution of the data. This script redoes only the
negation, on large held-out sets, with merge_text's cached fine-tunes (nothing is trained).

Protocol, per seed:

1. The seed's 500 sampled items per task (merge_text's train + val + test) are rebuilt with
   ``merge_text.load_task``. The held-out pool is the whole dataset minus every item whose text is
   one of those 500, de-duplicated by text (a text seen with two labels is dropped). For finefood
   the package's official train/test flag is ignored here: every unsampled review is unseen by the
   fine-tunes. The pool is split, seeded and class-balanced, into a validation half and a test half
   of ``min(--cap, ⌊smallest class / 2⌋)`` items per class each (``--cap`` 300 by default: one
   forward pass over ~2400 items takes ~25 s on one CPU thread and a seed needs 17 such passes).
2. Reference: task arithmetic with the λ merge_text chose on its validation split for that seed
   (read from ``benchmarks/results/merge_text.json``; as a check, it is re-evaluated on
   merge_text's own test split and must reproduce the stored accuracies). Each task is scored
   with its own head (``merge.attach_head``). The individual fine-tunes are scored too.
3. For each λ_neg in the grid: accuracy of every task on the large validation and test halves.
4. λ_neg is chosen on validation only, by two rules declared before the run:
   (a) Ilharco et al. (ICLR'23), as in merge_text: the lowest validation target accuracy with every
   control task ≥ 95 % of its validation accuracy before negation;
   (b) strict, matching the target: the lowest validation target accuracy with every control
   task's validation accuracy within ±1 pp of its value before negation (none → smallest λ_neg).
   Ties go to the smaller λ_neg. Reported on test: target drop, each control's change, the largest
   |change|, the largest fall, with a 95 % paired bootstrap interval (and paired standard error)
   over test items for each change.

Target (issue): "negation drops the negated task by > 20 pp while the others move < 2 pp" — judged
per seed and rule on the test half, |change| of every control < 2 pp (gains count as moves).

Usage::

    OMP_NUM_THREADS=1 python benchmarks/merge_negation.py --seeds 0,1,2   # writes benchmarks/results/merge_negation.{json,md}
    python benchmarks/merge_negation.py --quick                            # tiny smoke run, written to /tmp (not a result)
    python benchmarks/merge_negation.py --render benchmarks/results/merge_negation.json --notes notes.md
                                                  # re-render the markdown from the JSON (no evaluation)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import merge_text as mt

ROOT = mt.ROOT
RESULTS = mt.RESULTS
SHORT = {"vader:tweets": "tweets", "vader:nyt": "nyt"}


def log(*a):
    print(f"[{time.strftime('%H:%M:%S')}]", *a, file=sys.stderr, flush=True)


def short(t: str) -> str:
    return SHORT.get(t, t)


# ---------------------------------------------------------------------------------------- data
def held_out(name: str, sampled, cap: int, seed: int):
    """(val, test, info): balanced halves of the items of ``name`` whose text is not in ``sampled``."""
    from transferkit.data import load_dataset

    full = load_dataset(name)
    seen = {str(x) for x in sampled.X}
    labels: dict[str, set] = {}
    first: dict[str, int] = {}
    for i, (x, y) in enumerate(zip(full.X, full.y)):
        s = str(x)
        labels.setdefault(s, set()).add(int(y))
        first.setdefault(s, i)
    keep = [i for s, i in first.items() if s not in seen and len(labels[s]) == 1]
    conflicting = sum(1 for s in first if s not in seen and len(labels[s]) > 1)
    keep = np.asarray(sorted(keep))
    y = full.y[keep]
    avail = [int((y == c).sum()) for c in range(len(full.classes))]
    n = min(cap, min(a // 2 for a in avail))
    rng = np.random.default_rng([seed, 7919])
    val_idx, test_idx = [], []
    for c in range(len(full.classes)):
        ix = rng.permutation(keep[y == c])
        val_idx.append(ix[:n])
        test_idx.append(ix[n : 2 * n])
    val = full.subset(np.sort(np.concatenate(val_idx)))
    test = full.subset(np.sort(np.concatenate(test_idx)))
    info = {
        "dataset_items": len(full.y),
        "pool_after_dropping_sampled_and_duplicates": len(keep),
        "pool_per_class": dict(zip(full.classes, avail)),
        "dropped_conflicting_label_texts": conflicting,
        "per_class_per_split": n,
        "val": len(val.y),
        "test": len(test.y),
    }
    assert not ({str(x) for x in val.X} & {str(x) for x in test.X})
    assert not ({str(x) for x in test.X} | {str(x) for x in val.X}) & seen
    return val, test, info


@torch.no_grad()
def correct(clf, batches: mt.Batches) -> np.ndarray:
    """Per-item correctness (in the batches' length-sorted order; same order for every model)."""
    clf.eval()
    out = []
    for x, y in batches.batches:
        out.append((clf(x).argmax(-1) == y).numpy())
    return np.concatenate(out)


def paired(before: np.ndarray, after: np.ndarray, n_boot: int, seed: int) -> dict:
    """Change after − before in pp, paired standard error and 95 % paired bootstrap interval."""
    d = after.astype(np.float64) - before.astype(np.float64)
    n = len(d)
    rng = np.random.default_rng(seed)
    boots = np.empty(n_boot)
    for s in range(0, n_boot, 500):
        idx = rng.integers(0, n, size=(min(500, n_boot - s), n))
        boots[s : s + len(idx)] = d[idx].mean(1)
    lo, hi = np.percentile(boots, [2.5, 97.5])
    return {
        "change_pp": round(100 * float(d.mean()), 4),
        "se_pp": round(100 * float(d.std(ddof=1) / np.sqrt(n)), 4),
        "ci95_pp": [round(100 * float(lo), 4), round(100 * float(hi), 4)],
        "items_changed": int((d != 0).sum()),
        "n": n,
    }


# ---------------------------------------------------------------------------------------- run
def run_seed(seed: int, args, zm, ref_run: dict) -> dict:
    from transferkit.data import load_dataset
    from transferkit.delta import Delta
    from transferkit.merge import attach_head, negate, task_arithmetic

    tasks = args.tasks
    lam_ta = float(ref_run["selection"]["task arithmetic"]["chosen"])
    target = tasks.index(args.negate)
    cfg = {"epochs": args.epochs, "lr": args.lr, "batch_size": 16}
    deltas, sizes, small_test, vals, tests = [], {}, [], [], []
    for i, t in enumerate(tasks):
        train, val, test = mt.load_task(t, args.per_class, seed)
        run_dir = args.cache / f"{t.replace(':', '_')}-s{seed}"
        if not (run_dir / "delta" / "delta.json").is_file():
            raise SystemExit(
                f"no cached fine-tune at {run_dir}: this script never trains (run merge_text first)"
            )
        d, _ = mt.finetune(zm, t, train, seed, cfg, args.cache, "per-task", i)
        d.meta["name"] = t
        deltas.append(d)
        sampled = load_dataset(
            t, per_class=args.per_class, seed=seed
        )  # what load_task split
        assert len(sampled.y) == len(train.y) + len(val.y) + len(test.y)
        hv, ht, info = held_out(t, sampled, args.cap, seed)
        sizes[t] = {
            "merge_text": {
                "train": len(train.y),
                "val": len(val.y),
                "test": len(test.y),
            },
            **info,
        }
        small_test.append(mt.Batches(zm, test))
        vals.append(mt.Batches(zm, hv))
        tests.append(mt.Batches(zm, ht))
        log(
            f"seed {seed} {t}: held-out val {len(hv.y)}, test {len(ht.y)} ({info['per_class_per_split']}/class)"
        )
    ev = mt.Evaluator(zm)

    def score(body, which):
        bs = {"val": vals, "test": tests, "small": small_test}[which]
        return [correct(ev.load(attach_head(body, d)), b) for d, b in zip(deltas, bs)]

    out: dict = {
        "seed": seed,
        "lambda_ta": lam_ta,
        "lambda_ta_source": "merge_text.json runs[].selection",
        "sizes": sizes,
    }
    t0 = time.perf_counter()
    ta = task_arithmetic(deltas, lam_ta)
    check = [float(c.mean()) for c in score(ta, "small")]
    stored = [ref_run["methods"]["task arithmetic"]["acc"][t] for t in tasks]
    out["check_merge_text_test"] = {
        "recomputed": dict(zip(tasks, check)),
        "stored": dict(zip(tasks, stored)),
        "match": bool(np.allclose(check, stored, atol=1e-9)),
    }
    log(
        f"seed {seed} check on merge_text's test split: recomputed {np.round(check, 4)} stored {np.round(stored, 4)}"
    )
    if not out["check_merge_text_test"]["match"]:
        log(
            "WARNING: task-arithmetic reference does not reproduce merge_text's stored accuracies"
        )
    t1 = time.perf_counter()
    ref_val, ref_test = score(ta, "val"), score(ta, "test")
    out["seconds_one_eval_val+test"] = round(time.perf_counter() - t1, 1)
    log(
        f"seed {seed} one evaluation (val+test, 4 tasks): {out['seconds_one_eval_val+test']} s"
    )
    indiv = [correct(ev.load(d), b) for d, b in zip(deltas, tests)]
    zero = Delta(deltas[0].base, "full", {}, {})
    pre = score(zero, "test")
    out["individual_test"] = {t: float(c.mean()) for t, c in zip(tasks, indiv)}
    out["pretrained_body_test"] = {t: float(c.mean()) for t, c in zip(tasks, pre)}
    out["reference"] = {
        "val": {t: float(c.mean()) for t, c in zip(tasks, ref_val)},
        "test": {t: float(c.mean()) for t, c in zip(tasks, ref_test)},
    }
    by = {}
    for lam in args.neg_grid:
        body = task_arithmetic([ta, negate(deltas[target], lam)], 1.0)
        by[str(lam)] = v = grid_row(score(body, "val"), score(body, "test"), out["reference"]["val"], ref_test,
                                    tasks, args.negate, args.n_boot, seed)
        val_acc, test_change = v["val_acc"], v["test_change"]
        log(
            f"seed {seed} λ_neg={lam}: val "
            + " ".join(f"{short(t)} {val_acc[t]:.3f}" for t in tasks)
            + " | test Δpp "
            + " ".join(f"{short(t)} {test_change[t]['change_pp']:+.1f}" for t in tasks)
        )
    out["by_lambda"] = by
    out["chosen"] = choose(by, args)
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def grid_row(cv, ct, ref_val: dict, ref_test, tasks, target: str, n_boot: int, seed: int) -> dict:
    """One edited model's record: per-item correctness ``cv``/``ct`` (per task) against the model before.

    ``ref_val`` holds validation accuracies before the edit, ``ref_test`` the per-item test correctness.
    """
    val_acc = {t: float(c.mean()) for t, c in zip(tasks, cv)}
    val_change = {t: 100 * (val_acc[t] - ref_val[t]) for t in tasks}
    test_change = {t: paired(r, c, n_boot, seed) for t, r, c in zip(tasks, ref_test, ct)}
    controls = [t for t in tasks if t != target]
    return {
        "val_acc": val_acc,
        "test_acc": {t: float(c.mean()) for t, c in zip(tasks, ct)},
        "val_change_pp": val_change,
        "test_change": test_change,
        "val_control_retained_min": min(val_acc[t] / ref_val[t] for t in controls),
        "val_control_max_abs_change_pp": max(abs(val_change[t]) for t in controls),
        "test_target_drop_pp": -test_change[target]["change_pp"],
        "test_others_max_abs_change_pp": max(abs(test_change[t]["change_pp"]) for t in controls),
        "test_others_largest_fall_pp": max(0.0, max(-test_change[t]["change_pp"] for t in controls)),
    }


def choose(by: dict, args) -> dict:
    grid = [float(g) for g in by]

    def lowest(ok):
        return min(ok, key=lambda g: (by[str(g)]["val_acc"][args.negate], g))

    ok_a = [
        g
        for g in grid
        if by[str(g)]["val_control_retained_min"] >= args.neg_keep - 1e-12
    ]
    ok_b = [
        g
        for g in grid
        if by[str(g)]["val_control_max_abs_change_pp"] <= args.strict_pp + 1e-9
    ]
    return {
        "ilharco": {
            "lambda": lowest(ok_a) if ok_a else min(grid),
            "qualifying": ok_a,
            "fallback": not ok_a,
        },
        "strict": {
            "lambda": lowest(ok_b) if ok_b else min(grid),
            "qualifying": ok_b,
            "fallback": not ok_b,
        },
    }


RULES = {
    "ilharco": "(a) Ilharco: lowest val target acc with every control ≥ {keep:g} × its val acc before",
    "strict": "(b) strict: lowest val target acc with every control's val acc within ±{pp:g} pp of before "
    "(none → smallest λ_neg)",
}


def verdicts(runs: list[dict], negate_task: str) -> dict:
    out = {}
    for rule in RULES:
        per_seed = []
        for r in runs:
            lam = r["chosen"][rule]["lambda"]
            v = r["by_lambda"][str(lam)]
            drop = round(
                v["test_target_drop_pp"], 6
            )  # no float noise deciding a threshold
            moved = round(v["test_others_max_abs_change_pp"], 6)
            per_seed.append(
                {
                    "seed": r["seed"],
                    "lambda": lam,
                    "drop_pp": drop,
                    "others_max_abs_pp": moved,
                    "largest_fall_pp": round(v["test_others_largest_fall_pp"], 6),
                    "met": bool(drop > 20 and moved < 2),
                    "fallback": r["chosen"][rule]["fallback"],
                }
            )
        drop_m = float(np.mean([p["drop_pp"] for p in per_seed]))
        moved_m = float(np.mean([p["others_max_abs_pp"] for p in per_seed]))
        out[rule] = {
            "per_seed": per_seed,
            "seeds_met": sum(p["met"] for p in per_seed),
            "mean_drop_pp": round(drop_m, 4),
            "mean_others_max_abs_pp": round(moved_m, 4),
            "met_on_mean": bool(round(drop_m, 6) > 20 and round(moved_m, 6) < 2),
        }
    return out


# ---------------------------------------------------------------------------------------- report
def ci(c: dict) -> str:
    return f"{c['change_pp']:+.1f} [{c['ci95_pp'][0]:+.1f}, {c['ci95_pp'][1]:+.1f}]"


def markdown(result: dict) -> str:
    tasks, neg = result["tasks"], result["negate"]
    controls = [t for t in tasks if t != neg]
    L = [
        f"# merge_negation: forgetting {neg} from the task-arithmetic merge, on large held-out sets",
        "",
        f"Command: `{result['command']}`  ",
        (
            f"Seeds: {result['seeds']}; wall time {result['seconds']:.0f} s; model {result['model']}; "
            f"fine-tunes: merge_text's cache `{result['cache']}` (none retrained). {result['notes']}"
        ),
        "",
        (
            "λ_neg is chosen on the held-out **validation** half only; every number below marked *test* is on "
            "the disjoint held-out **test** half. Rules:"
        ),
        "",
    ]
    L += [
        f"- {RULES[k].format(keep=result['settings']['neg_keep'], pp=result['settings']['strict_pp'])}"
        for k in RULES
    ]
    L += [
        "",
        "## Held-out sizes (items per split; class-balanced)",
        "",
        (
            "| seed | task | dataset | pool (unsampled, deduplicated) | pool per class | per class per split | "
            "val | test | merge_text val / test |"
        ),
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["runs"]:
        for t in tasks:
            s = r["sizes"][t]
            pc = ", ".join(f"{k} {v}" for k, v in s["pool_per_class"].items())
            L.append(
                f"| {r['seed']} | {short(t)} | {s['dataset_items']} | "
                f"{s['pool_after_dropping_sampled_and_duplicates']} | {pc} | {s['per_class_per_split']} | "
                f"{s['val']} | {s['test']} | {s['merge_text']['val']} / {s['merge_text']['test']} |"
            )
    L += [
        "",
        '## Summary: target "drop > 20 pp, others move < 2 pp" (test half)',
        "",
        "| rule | seed | λ_neg | target drop (pp) [95 % CI] | "
        + " | ".join(f"{short(t)} Δ (pp) [95 % CI]" for t in controls)
        + " | max abs change | largest fall | met? |",
        "|---|---|---|---|" + "---|" * len(controls) + "---|---|---|",
    ]
    for rule in RULES:
        for r in result["runs"]:
            lam = r["chosen"][rule]["lambda"]
            v = r["by_lambda"][str(lam)]
            tc = v["test_change"]
            d = tc[neg]
            drop = f"{-d['change_pp']:.1f} [{-d['ci95_pp'][1]:.1f}, {-d['ci95_pp'][0]:.1f}]"
            met = next(
                p
                for p in result["verdicts"][rule]["per_seed"]
                if p["seed"] == r["seed"]
            )
            fb = " (fallback)" if r["chosen"][rule]["fallback"] else ""
            L.append(
                f"| {rule} | {r['seed']} | {lam:g}{fb} | {drop} | "
                + " | ".join(ci(tc[t]) for t in controls)
                + f" | {v['test_others_max_abs_change_pp']:.1f} | {v['test_others_largest_fall_pp']:.1f} | "
                f"**{'met' if met['met'] else 'missed'}** |"
            )
    L.append("")
    for rule, v in result["verdicts"].items():
        L.append(
            f"- rule {rule}: met in **{v['seeds_met']} of {len(v['per_seed'])}** seeds; mean over seeds: "
            f"drop {v['mean_drop_pp']:.1f} pp, others' max |change| {v['mean_others_max_abs_pp']:.1f} pp "
            f"(**{'met' if v['met_on_mean'] else 'missed'}** on the mean)"
        )
    L += [
        "",
        (
            "Paired 95 % bootstrap intervals over test items "
            f"({result['settings']['n_boot']} resamples); the paired standard errors are in the JSON."
        ),
        "",
    ]
    L += [
        "## Reference levels (test half)",
        "",
        "| seed | model | " + " | ".join(short(t) for t in tasks) + " |",
        "|---|---|" + "---|" * len(tasks),
    ]
    for r in result["runs"]:
        rows = [
            ("pre-trained body + task heads", r["pretrained_body_test"]),
            ("individual fine-tune", r["individual_test"]),
            (
                f"task arithmetic λ = {r['lambda_ta']:g} (before negation)",
                r["reference"]["test"],
            ),
        ]
        for name, acc in rows:
            L.append(
                f"| {r['seed']} | {name} | "
                + " | ".join(f"{acc[t]:.3f}" for t in tasks)
                + " |"
            )
    L += [
        "",
        "Check: the task-arithmetic reference re-evaluated on merge_text's own (small) test split "
        "reproduces merge_text.json's stored accuracies: "
        + ", ".join(
            f"seed {r['seed']} {'yes' if r['check_merge_text_test']['match'] else 'NO'}"
            for r in result["runs"]
        )
        + ".",
        "",
    ]
    L += [
        "## Per-seed λ_neg grid",
        "",
        (
            "Val columns: target accuracy and each control's change vs before negation (pp); test columns: target "
            "drop and each control's change (pp). Row of λ chosen by rule (a) Ilharco in **bold**, by rule (b) "
            "strict marked †(both: bold + †)."
        ),
        "",
    ]
    for r in result["runs"]:
        ref_v, ref_t = r["reference"]["val"], r["reference"]["test"]
        L += [
            f"### seed {r['seed']} (task arithmetic λ = {r['lambda_ta']:g}; before negation val "
            + ", ".join(f"{short(t)} {ref_v[t]:.3f}" for t in tasks)
            + "; test "
            + ", ".join(f"{short(t)} {ref_t[t]:.3f}" for t in tasks)
            + ")",
            "",
            "| λ_neg | val: target acc | "
            + " | ".join(f"val: {short(t)} Δ" for t in controls)
            + " | val: control kept (min) | test: target acc | test: target drop | "
            + " | ".join(f"test: {short(t)} Δ" for t in controls)
            + " | test: max abs Δ |",
            "|---|---|"
            + "---|" * len(controls)
            + "---|---|---|"
            + "---|" * len(controls)
            + "---|",
        ]
        for lam, v in r["by_lambda"].items():
            a = float(lam) == r["chosen"]["ilharco"]["lambda"]
            b = float(lam) == r["chosen"]["strict"]["lambda"]
            bo = "**" if a else ""
            mark = "†" if b else ""
            cells = [f"{bo}{float(lam):g}{mark}{bo}", f"{v['val_acc'][neg]:.3f}"]
            cells += [f"{v['val_change_pp'][t]:+.1f}" for t in controls]
            cells += [
                f"{v['val_control_retained_min']:.3f}",
                f"{v['test_acc'][neg]:.3f}",
                f"{bo}{v['test_target_drop_pp']:.1f}{bo}",
            ]
            cells += [f"{v['test_change'][t]['change_pp']:+.1f}" for t in controls]
            cells += [f"{bo}{v['test_others_max_abs_change_pp']:.1f}{bo}"]
            L.append("| " + " | ".join(cells) + " |")
        L.append("")
    L += ["## Resolvability of the control changes (test half, chosen λ_neg)", ""]
    for rule in RULES:
        for r in result["runs"]:
            lam = r["chosen"][rule]["lambda"]
            tc = r["by_lambda"][str(lam)]["test_change"]
            parts = []
            for t in controls:
                c = tc[t]
                lo, hi = c["ci95_pp"]
                sig = "gain" if lo > 0 else "fall" if hi < 0 else "not resolved"
                parts.append(
                    f"{short(t)} {c['change_pp']:+.1f} ± {1.96 * c['se_pp']:.1f} "
                    f"(SE {c['se_pp']:.2f}; {c['items_changed']}/{c['n']} items flip; {sig})"
                )
            L.append(
                f"- rule {rule}, seed {r['seed']}, λ_neg {lam:g}: " + "; ".join(parts)
            )
    L += [
        "",
        "'gain'/'fall': the 95 % paired bootstrap interval excludes 0; ± is 1.96 × the paired SE.",
        "",
    ]
    if result.get("notes_md"):
        L += ["## Notes", "", result["notes_md"].strip(), ""]
    return "\n".join(L) + "\n"


# ---------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", default=",".join(mt.TASKS))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--negate", default="spamassassin")
    ap.add_argument("--neg-grid", default="0.25,0.5,0.75,1.0,1.25,1.5,2.0")
    ap.add_argument(
        "--neg-keep",
        type=float,
        default=0.95,
        help="rule (a): controls keep ≥ this fraction (val)",
    )
    ap.add_argument(
        "--strict-pp",
        type=float,
        default=1.0,
        help="rule (b): controls within ± this many pp (val)",
    )
    ap.add_argument(
        "--cap",
        type=int,
        default=300,
        help="at most this many items per class per held-out split",
    )
    ap.add_argument("--n-boot", type=int, default=2000)
    ap.add_argument(
        "--reference",
        type=Path,
        default=RESULTS / "merge_text.json",
        help="merge_text result whose task-arithmetic λ per seed is reused",
    )
    ap.add_argument(
        "--per-class",
        type=int,
        default=250,
        help="merge_text's sample size (to find its cache)",
    )
    ap.add_argument("--max-length", type=int, default=48)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument(
        "--cache",
        type=Path,
        default=Path.home() / ".cache" / "transferkit" / "derived" / "merge_text",
    )
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--notes", type=Path, help="markdown file appended under 'Notes' in the report"
    )
    ap.add_argument(
        "--quick",
        action="store_true",
        help="tiny smoke run, written to /tmp, not a result",
    )
    ap.add_argument(
        "--render",
        type=Path,
        help="re-render this result JSON and its markdown (with --notes), no evaluation",
    )
    args = ap.parse_args(argv)
    from transferkit.io import write_text

    if args.render:
        result = json.loads(args.render.read_text())
        result["verdicts"] = verdicts(result["runs"], result["negate"])
        if args.notes:
            result["notes_md"] = args.notes.read_text()
        write_text(args.render, json.dumps(result, indent=2, default=str) + "\n")
        write_text(args.render.with_suffix(".md"), markdown(result))
        return 0

    args.tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    args.neg_grid = [float(x) for x in args.neg_grid.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.quick:
        seeds, args.cap, args.neg_grid, args.n_boot = seeds[:1], 10, [0.5, 1.0], 200
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    reference = json.loads(args.reference.read_text())
    ref_runs = {r["seed"]: r for r in reference["runs"]}
    if (
        reference["settings"].get("heads") != "per-task"
        or reference["tasks"] != args.tasks
    ):
        raise SystemExit(
            "reference merge_text result is not the per-task-heads run over these tasks"
        )
    args.cache = (
        args.cache
        / f"pc{args.per_class}-ml{args.max_length}-e{args.epochs}-lr{args.lr:g}-per-task"
    )
    from transferkit.zoo import load_model

    t0 = time.perf_counter()
    zm = load_model(mt.MODEL, max_length=args.max_length)
    runs = [run_seed(s, args, zm, ref_runs[s]) for s in seeds]
    result = {
        "benchmark": "merge_negation",
        "model": mt.MODEL,
        "tasks": args.tasks,
        "negate": args.negate,
        "seeds": seeds,
        "cache": str(args.cache).replace(str(Path.home()), "~"),
        "command": "OMP_NUM_THREADS=1 python benchmarks/merge_negation.py "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "settings": {
            k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
        },
        "notes": (
            f"Held-out halves: at most {args.cap}/class/split, seeded, class-balanced, no text of the seed's "
            f"{2 * args.per_class} sampled items; λ of task arithmetic from {args.reference.name}."
        ),
        "runs": runs,
        "seconds": time.perf_counter() - t0,
    }
    result["verdicts"] = verdicts(runs, args.negate)
    if args.notes:
        result["notes_md"] = args.notes.read_text()
    md = markdown(result)
    dest = Path("/tmp") if args.quick else RESULTS
    name = "merge_negation_quick" if args.quick else "merge_negation"
    write_text(dest / f"{name}.json", json.dumps(result, indent=2, default=str) + "\n")
    write_text(dest / f"{name}.md", md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
