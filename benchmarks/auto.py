"""auto vs the oracle and the baselines, on real targets, side by side on the same arms.

    OMP_NUM_THREADS=1 python benchmarks/auto.py --zoo image --seeds 0,1,2
    OMP_NUM_THREADS=1 python benchmarks/auto.py --zoo text --seeds 0,1,2

Per target and seed, on one recorded split (``--per-class`` items per class, half held out):

* **oracle** — every arm (model × method × lr) trained for all ``--epochs``; its best *test* accuracy and
  its compute (training epochs, seconds);
* **auto** — ``transferkit.auto.search`` with the LogME prior and a budget of ``--budget-share`` (10 %) of the
  oracle's epochs of backbone training (linear probes on cached features cost nothing against it);
* **auto (learned prior)** — the same with the learned ranker as the prior (trained on the stored zoo results
  without this target);
* **no prior** — the same successive halving with the arms in a seeded random order (``prior="none"``);
* **random search** — arms in a seeded random order, each trained to the end, until the same budget; the
  best validation accuracy wins. Training is deterministic, so these arms are exactly the oracle's arms and
  their accuracies are read from the oracle's table (no retraining);
* **oracle chosen on validation** — the oracle's arms judged the way the search judges them: the best
  *validation* accuracy among all arms trained to the end (ties: the mean test accuracy of the tied arms). It
  is the ceiling of any validation-based choice with unlimited compute, and measures how much of a miss is
  the validation fifth's noise rather than the budget;
* **pipeline** — today's pipeline: LogME's top-1 model + LoRA at its default lr (the oracle's arm);
* **largest + full** — the candidate with the most parameters, fully fine-tuned at the default lr.

``--oracle-from FILE`` reuses the oracle arms of an earlier results file for the same (target, seed, test
size) and trains only the arms of models it lacks (training is deterministic at one thread, so a reused arm is
the arm this run would train); their seconds are the earlier run's.

Every accuracy is on the held-out half of the per-class sample (a seeded random half; official test marks are
dropped), ≥ 500 items, with its binomial standard
error; ratios are to the oracle's best; means over seeds with 95 % t-intervals. Writes
``benchmarks/results/auto_<zoo>.{json,md}`` after every target and seed.
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
ZOOS = {
    "image": {"targets": ["opencv-digits", "sklearn-digits", "fashion-mnist"],
              "models": ["digits-mnist", "digits-usps", "digits-svhn", "mobilenet-v2"],
              "options": {"mobilenet-v2": {"size": 64}}},
    "image7": {"targets": ["opencv-digits", "sklearn-digits", "fashion-mnist"],
               "models": ["digits-mnist", "digits-usps", "digits-svhn", "mobilenet-v2", "efficientnet-lite0",
                          "efficientnet-lite1", "efficientnet-lite2"],
               "options": {m: {"size": 64} for m in ("mobilenet-v2", "efficientnet-lite0", "efficientnet-lite1",
                                                     "efficientnet-lite2")}},
    "text": {"targets": ["vader:movies", "vader:amazon", "vader:tweets"],
             "models": ["paraphrase-minilm-l3-v2", "all-minilm-l6-v2"],
             "options": {"paraphrase-minilm-l3-v2": {"max_length": 64}, "all-minilm-l6-v2": {"max_length": 64}}},
}


def _se(p: float, n: int) -> float:
    return math.sqrt(max(p * (1 - p), 0.0) / n)


def _ci(xs: list[float]) -> tuple[float, float]:
    from scipy import stats

    xs = [x for x in xs if x is not None and math.isfinite(x)]
    if len(xs) < 2:
        return (float(np.mean(xs)) if xs else float("nan"), float("nan"))
    return float(np.mean(xs)), float(stats.t.ppf(0.975, len(xs) - 1) * np.std(xs, ddof=1) / math.sqrt(len(xs)))


def random_search(orc: dict, budget_epochs: float, seed: int) -> dict:
    order = np.random.default_rng(10_000 + seed).permutation(len(orc["arms"]))
    spent, taken = 0.0, []
    for i in order:
        arm = orc["arms"][i]
        if spent + arm["cost"] > budget_epochs:
            break
        spent += arm["cost"]
        taken.append(arm)
    if not taken:
        return {"name": None, "test_accuracy": None, "cost": 0.0, "arms": 0}
    best = max(taken, key=lambda a: a["val_accuracy"])
    return {"name": best["name"], "test_accuracy": best["test_accuracy"], "cost": spent, "arms": len(taken)}


def val_best(orc: dict) -> dict:
    """The oracle's arm with the best validation accuracy; ties: the mean test accuracy of the tied arms."""
    top = max(a["val_accuracy"] for a in orc["arms"])
    tied = [a for a in orc["arms"] if a["val_accuracy"] == top]
    return {"name": " | ".join(a["name"] for a in tied), "test_accuracy": float(np.mean([a["test_accuracy"] for a in tied])),
            "cost": orc["cost"], "tied": len(tied)}


def merged_oracle(target: str, models: list[str], common: dict, reused: list[dict], n: int, say) -> dict:
    """The oracle over ``models``: the ``reused`` arms of models it has, the other models' arms trained now."""
    from transferkit.auto import oracle

    have = {a["model"] for a in reused}
    arms = [a for a in reused if a["model"] in models]
    missing = [m for m in models if m not in have]
    if missing:
        arms += oracle(target, missing, progress=say, **common)["arms"]
    arms.sort(key=lambda a: models.index(a["model"]))  # stable: make_arms' order within a model
    best = max(arms, key=lambda a: a["test_accuracy"])
    return {"arms": arms, "best": {**best, "test_se": _se(best["test_accuracy"], n)},
            "seconds": round(sum(a["seconds"] for a in arms), 3), "cost": float(sum(a["cost"] for a in arms))}


def target_data(target: str, per_class: int, seed: int):
    """The sampled target, its official train/test marks dropped: the held-out half is a seeded random half of
    the sample (Fashion-MNIST's official marks would hold out only its 1/7 test share)."""
    from transferkit.data import load_dataset

    ds = load_dataset(target, per_class=per_class, seed=seed)
    ds.is_test = None
    return ds


def one(target: str, zoo: dict, seed: int, args, say) -> dict:
    from transferkit.auto import search
    from transferkit.data.split import make_split
    from transferkit.zoo import load_model

    ds = target_data(target, args.per_class, seed)
    common = dict(methods=args.methods, epochs=args.epochs, test_size=0.5, seed=seed, model_options=zoo["options"],
                  dataset=ds)
    _, test, _ = make_split(target, sample_seed=seed, seed=seed, test_size=0.5, dataset=ds)
    n = len(test)
    t0 = time.perf_counter()
    orc = merged_oracle(target, zoo["models"], common, args.reused.get((target, seed, n), []), n, say)
    say(f"oracle: {orc['best']['name']} {orc['best']['test_accuracy']:.4f} in {time.perf_counter() - t0:.0f} s")
    budget = args.budget_share * orc["cost"]
    rows = {}
    for label, prior in (("auto", args.prior), ("auto (learned prior)", "learned"), ("no prior", "none")):
        res = search(target, zoo["models"], budget=f"{budget}ep", prior=prior, eta=args.eta, progress=say, **common)
        w = res["winner"]
        rows[label] = {"name": w["name"], "test_accuracy": w["test_accuracy"],
                       "cost": sum(a["cost"] for a in res["arms"]),
                       "seconds": sum(a["seconds"] for a in res["arms"]),
                       "arms_started": sum(a["state"] != "waiting" for a in res["arms"]),
                       "prior_order": res["prior"]["order"]}
    rows["random search"] = random_search(orc, budget, seed)
    rows["oracle chosen on validation"] = val_best(orc)
    top1 = rows["auto"]["prior_order"][0]
    # the (model, method) arm at the method's default lr: make_arms puts lr factor 1 first within a model and method
    default = lambda m, method: next(a for a in orc["arms"] if a["model"] == m and a["method"] == method)  # noqa: E731
    if "lora" in args.methods:
        a = default(top1, "lora")
        rows["pipeline (LogME top-1 + LoRA)"] = {"name": a["name"], "test_accuracy": a["test_accuracy"],
                                                 "cost": a["cost"]}
    if "full" in args.methods:
        largest = max(zoo["models"], key=lambda m: load_model(m, **zoo["options"].get(m, {})).n_params())
        a = default(largest, "full")
        rows["largest + full"] = {"name": a["name"], "test_accuracy": a["test_accuracy"], "cost": a["cost"]}
    best = orc["best"]["test_accuracy"]
    for r in rows.values():
        acc = r.get("test_accuracy")
        r["ratio"] = acc / best if acc is not None else None
        r["compute"] = r["cost"] / orc["cost"]
        r["se"] = _se(acc, n) if acc is not None else None
    return {"target": target, "seed": seed, "n_test": n, "budget_epochs": budget,
            "oracle": {"best": orc["best"], "cost": orc["cost"], "seconds": orc["seconds"],
                       "n_arms": len(orc["arms"]), "arms": orc["arms"]},
            "rows": rows}


def write(results: list[dict], args, stem: str, seconds: float, commands: list[str] | None = None) -> str:
    from transferkit.runtime import environment

    out = ROOT / "results"
    out.mkdir(exist_ok=True)
    labels = list(dict.fromkeys(k for r in results for k in r["rows"]))
    lines = [f"# auto vs oracle and baselines ({args.zoo} zoo)", "",
             *(f"Command: `{c}`" + "  " for c in commands or [" ".join(["OMP_NUM_THREADS=1", "python", *sys.argv])]),
             f"Wall time {seconds:.0f} s in all.", "",
             "Accuracy on the held-out half ÷ the oracle's best test accuracy over all its arms; compute = epochs "
             "of backbone training ÷ the oracle's (every arm to the end; linear probes on cached features cost 0). "
             "Per target: mean over seeds ± 95 % t-interval.", ""]
    header = "| target | seeds | n test | oracle best (± SE) | " + " | ".join(f"{l}: acc ratio / compute" for l in labels) + " |"
    lines += [header, "|" + "---|" * (4 + len(labels))]
    for target in dict.fromkeys(r["target"] for r in results):
        rs = [r for r in results if r["target"] == target]
        best = [r["oracle"]["best"]["test_accuracy"] for r in rs]
        cells = []
        for l in labels:
            m, h = _ci([r["rows"][l]["ratio"] for r in rs if l in r["rows"]])
            c, _ = _ci([r["rows"][l]["compute"] for r in rs if l in r["rows"]])
            cells.append(f"{m:.3f} ± {h:.3f} / {100 * c:.1f} %")
        se = np.mean([r["oracle"]["best"]["test_se"] for r in rs])
        lines.append(f"| {target} | {len(rs)} | {rs[0]['n_test']} | {np.mean(best):.4f} (± {se:.4f}) | "
                     + " | ".join(cells) + " |")
    lines += ["", "Per run (winner, test accuracy ± SE):", ""]
    for r in results:
        lines.append(f"- {r['target']} seed {r['seed']}: oracle {r['oracle']['best']['name']} "
                     f"{r['oracle']['best']['test_accuracy']:.4f}; " + "; ".join(
                         f"{l}: {v['name']} {v['test_accuracy']:.4f} ± {v['se']:.4f}" for l, v in r["rows"].items()
                         if v.get("test_accuracy") is not None))
    md = "\n".join(lines) + "\n"
    (out / f"{stem}.md").write_text(md)
    (out / f"{stem}.json").write_text(json.dumps({"command": " ".join(sys.argv), "commands": commands, "args": {k: v for k, v in vars(args).items() if k != "reused"},
                                                  "seconds": seconds, "machine": environment(),
                                                  "results": results}, indent=1, default=str))
    return md


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--zoo", choices=sorted(ZOOS), default="image")
    ap.add_argument("--targets", default=None, help="comma-separated (default: the zoo's three)")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--methods", default="linear,bitfit,lora,full")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--eta", type=int, default=3)
    ap.add_argument("--per-class", type=int, default=100)
    ap.add_argument("--budget-share", type=float, default=0.1)
    ap.add_argument("--prior", default="logme")
    ap.add_argument("--stem", default=None)
    ap.add_argument("--combine", nargs="+", type=Path, help="merge the runs of these results files (parts run in "
                    "parallel, e.g. one per seed) into --stem's .json / .md; no compute")
    ap.add_argument("--oracle-from", type=Path, default=None, help="reuse the oracle arms of this earlier results "
                    "file for the same (target, seed, test size); train only the arms of models it lacks")
    ap.add_argument("--reuse", action="store_true", help="keep the finished (target, seed) runs of the results file "
                    "(same split size), run the rest")
    args = ap.parse_args()
    args.methods = [m for m in args.methods.split(",") if m]
    zoo = ZOOS[args.zoo]
    args.reused = {}
    if args.oracle_from is not None:
        for r in json.loads(args.oracle_from.read_text())["results"]:
            args.reused[(r["target"], r["seed"], r["n_test"])] = r["oracle"]["arms"]
    targets = args.targets.split(",") if args.targets else zoo["targets"]
    stem = args.stem or f"auto_{args.zoo}"
    say = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    if args.combine:
        docs = [json.loads(p.read_text()) for p in args.combine]
        unique = {}  # a (target, seed, n_test) run reused by a later part counts once, from the first file
        for r in (r for d in docs for r in d["results"]):
            unique.setdefault((r["target"], r["seed"], r["n_test"]), r)
        runs = sorted(unique.values(), key=lambda r: (r["seed"], targets.index(r["target"]) if r["target"] in targets
                                                      else len(targets)))
        commands = [c for d in docs for c in (d.get("commands") or ["OMP_NUM_THREADS=1 python " + d["command"]])]
        print(write(runs, args, stem, sum(d["seconds"] for d in docs),
                    commands + ["OMP_NUM_THREADS=1 python " + " ".join(sys.argv)]))
        return
    t0 = time.perf_counter()
    results, earlier = [], {}
    if args.reuse and (ROOT / "results" / f"{stem}.json").is_file():  # finished (target, seed) runs of this script
        for r in json.loads((ROOT / "results" / f"{stem}.json").read_text())["results"]:
            earlier[(r["target"], r["seed"], r["n_test"])] = r
    for seed in [int(s) for s in args.seeds.split(",")]:
        for target in targets:
            from transferkit.data.split import make_split

            n = len(make_split(target, seed=seed, test_size=0.5, dataset=target_data(target, args.per_class, seed))[1])
            r = earlier.get((target, seed, n))
            results.append(r if r is not None else one(target, zoo, seed, args, say))
            md = write(results, args, stem, time.perf_counter() - t0)
    print(md)


if __name__ == "__main__":
    main()
