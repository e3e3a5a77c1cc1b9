"""Text domain adaptation through the package's frozen-backbone options: source-only vs DANN vs ParetoDA (vs UDA)
on VADER shifts, and the speed-up of DANN's feature cache.

    nice -n 10 env OMP_NUM_THREADS=1 .venv/bin/python benchmarks/adapt_text.py

``--pairs`` (positions in ``PAIRS``) runs a part and ``--out`` names its .json; ``--combine A.json B.json ...``
merges parts (runs, each with its ``--limit``, and the speed record) into ``results/adapt_text.{json,md}``;
``--uda-budget 0`` skips UDA (the 1000-item parts that repeat adapt_shift's size were run so).

Model ``paraphrase-minilm-l3-v2`` (384-d pooled sentence features), **frozen** (``freeze_backbone: true``) with a
trainable ``bottleneck`` Linear(384, 256) → BatchNorm1d → ReLU and a linear head: the setting that
``benchmarks/adapt_shift.py`` had to build inside its script, here through ``transferkit.adapt.adapt``. DANN and
ParetoDA compute the encoder's features once per item and run; UDA augments words, so its encoder runs on every
step (measured on a few steps; run only when a whole run is predicted under ``--uda-budget`` seconds).
Source-only: the same module (same seeded bottleneck and head start) trained on the labelled source alone with
cross-entropy, AdamW lr 1e-3, batch 64, for the same epochs (the source model of adapt_shift / adapt_digits),
on cached features through the package's ``adapted_classifier`` / ``training_inputs``. DANN and ParetoDA at
their defaults otherwise (SGD 0.01, momentum 0.9, the paper's λ_p and annealed lr, batch 64 per domain).

Per pair and seed: at most ``--limit`` items of each domain (stratified, seeded), the target split 70 / 30
(``make_split``); the target's training part without labels, accuracy on the held-out 30 %. Mean ± sd over seeds.
VADER amazon → ``finefood`` is checked: its classes (great / other) are not VADER's (negative / positive), so it
is skipped with that reason recorded.

Speed: on tweets → nyt (seed 0), DANN for ``--speed-epochs`` epochs with the feature cache and with the frozen
encoder run on every step (``dann.run(..., cache_features=False)``), same options; wall seconds of each.
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
MODEL = "paraphrase-minilm-l3-v2"
PAIRS = [("vader:tweets", "vader:nyt"), ("vader:nyt", "vader:tweets"), ("vader:amazon", "vader:movies"),
         ("vader:movies", "vader:amazon"), ("vader:amazon", "finefood"),
         # the other 8 ordered pairs of the four VADER domains
         ("vader:tweets", "vader:movies"), ("vader:movies", "vader:tweets"), ("vader:tweets", "vader:amazon"),
         ("vader:amazon", "vader:tweets"), ("vader:nyt", "vader:movies"), ("vader:movies", "vader:nyt"),
         ("vader:nyt", "vader:amazon"), ("vader:amazon", "vader:nyt")]
ARMS = ["source-only", "dann", "paretoda", "uda"]
FROZEN = {"freeze_backbone": True, "bottleneck": 256}
COMMAND = "nice -n 10 env OMP_NUM_THREADS=1 .venv/bin/python benchmarks/adapt_text.py"


def load_pair(source: str, target: str, seed: int, limit: int):
    from transferkit.data import load_dataset
    from transferkit.data.split import make_split

    src = load_dataset(source, limit=limit, seed=seed)
    train, test, split = make_split(target, limit=limit, sample_seed=seed, seed=seed, test_size=0.3)
    return src, train, test, split


def source_only(model, src, test, epochs: int, seed: int) -> float:
    """The frozen encoder + bottleneck + head trained on the labelled source alone (AdamW 1e-3, batch 64)."""
    from transferkit.adapt._common import BackboneOptions, adapted_classifier, predict_logits, training_inputs
    from transferkit.engine import CrossEntropy, TrainConfig, train
    from transferkit.tune._common import Pairs, make_collate

    clf = adapted_classifier(model, src.classes, BackboneOptions(**FROZEN), seed)
    module, X, pre = training_inputs(clf, model.preprocess, {"source": src.X})
    cfg = TrainConfig(epochs=epochs, lr=1e-3, batch_size=64, seed=seed, progress=False)
    train(module, Pairs(X["source"], src.y), CrossEntropy(), cfg, collate_fn=make_collate(pre))
    return float((predict_logits(clf, test.X, model.preprocess).argmax(-1).numpy() == test.y).mean())


def uda_step_seconds(model, src, train, test, seed: int) -> float:
    """Seconds per step of UDA (frozen encoder, bottleneck) over 2 steps (128 source items, one epoch)."""
    from transferkit.adapt import adapt

    r = adapt(model, src.subset(np.arange(128)), train, test.subset(np.arange(8)), method="uda",
              options={**FROZEN, "epochs": 1}, seed=seed)
    return r.metrics["seconds"] / r.metrics["steps"]


def one(model, source: str, target: str, seed: int, args, log) -> dict:
    from transferkit.adapt import adapt

    src, train, test, split = load_pair(source, target, seed, args.limit)
    rec = {"source": source, "target": target, "seed": seed, "limit": args.limit, "n_source": len(src),
           "n_target_train": len(train), "n_test": len(test), "test_sha256": split.test_sha256,
           "accuracy": {}, "seconds": {}}
    if src.classes != test.classes:
        rec["skipped"] = f"classes differ: {src.classes} vs {test.classes}"
        return rec
    t0 = time.perf_counter()
    rec["accuracy"]["source-only"] = source_only(model, src, test, args.epochs, seed)
    rec["seconds"]["source-only"] = round(time.perf_counter() - t0, 1)
    for method in ("dann", "paretoda"):
        m = adapt(model, src, train, test, method=method, options={**FROZEN, "epochs": args.epochs}, seed=seed).metrics
        rec["accuracy"][method], rec["seconds"][method] = m["accuracy"], m["seconds"]
        log(f"  {method}: {m['accuracy']:.3f} in {m['seconds']:.0f} s")
    if args.uda_budget <= 0:  # UDA neither measured nor run
        return rec
    step = uda_step_seconds(model, src, train, test, seed)
    steps = args.epochs * math.ceil(len(src) / 64)
    rec["uda_step_seconds"], rec["uda_predicted_seconds"] = round(step, 2), round(step * steps, 1)
    if step * steps <= args.uda_budget:
        m = adapt(model, src, train, test, method="uda", options={**FROZEN, "epochs": args.epochs}, seed=seed).metrics
        rec["accuracy"]["uda"], rec["seconds"]["uda"] = m["accuracy"], m["seconds"]
    return rec


def speed(model, args) -> dict:
    from transferkit.adapt import dann
    from transferkit.adapt._common import unlabelled

    src, train, test, _ = load_pair(*PAIRS[0], 0, args.limit)
    opts = dann.DannOptions(**FROZEN, epochs=args.speed_epochs)
    out = {"pair": f"{PAIRS[0][0]}->{PAIRS[0][1]}", "epochs": args.speed_epochs, "n_source": len(src),
           "n_target_train": len(train), "n_test": len(test)}
    for cache in (True, False):
        t0 = time.perf_counter()
        f = dann.run(model, src, unlabelled(train), test.X, options=opts, seed=0, cache_features=cache)
        out["cached" if cache else "encoder_every_step"] = {
            "seconds": round(time.perf_counter() - t0, 1), "steps": f.extra["steps"],
            "accuracy": float((f.predictions["adapted"] == test.y).mean())}
    out["speedup"] = round(out["encoder_every_step"]["seconds"] / out["cached"]["seconds"], 1)
    return out


def mean_sd(xs) -> tuple[float, float]:
    a = np.asarray(xs, dtype=float)
    return float(a.mean()), (float(a.std(ddof=1)) if len(a) > 1 else float("nan"))


def table(runs: list[dict], arms: list[str]) -> list[str]:
    lines = ["| shift | source | target train / held out | " + " | ".join(arms) + " |",
             "|---|---|---|" + "---|" * len(arms)]
    means = {a: [] for a in arms}
    for source, target in PAIRS:
        rs = [r for r in runs if (r["source"], r["target"]) == (source, target)]
        if not rs:
            continue
        cells = []
        for a in arms:
            vals = [r["accuracy"][a] for r in rs if a in r["accuracy"]]
            if len(vals) == len(rs):
                m, sd = mean_sd(vals)
                means[a].append(m)
                cells.append(f"{100 * m:.1f} ± {100 * sd:.1f}")
            else:
                cells.append("not run")
        lines.append(f"| {source} → {target} | {rs[0]['n_source']} | {rs[0]['n_target_train']} / "
                     f"{rs[0]['n_test']} | " + " | ".join(cells) + " |")
    n = max(len(v) for v in means.values())
    if n > 1:
        lines.append(f"| mean of {n} shifts | | | " + " | ".join(
            f"{100 * np.mean(v):.1f}" if len(v) == n else "" for v in means.values()) + " |")
    return lines


def shift_table() -> list[str]:
    """adapt_shift's text numbers (the frozen setting built inside that script), from its .json."""
    path = ROOT / "results" / "adapt_shift.json"
    if not path.is_file():
        return []
    shift = json.loads(path.read_text())
    summary, args = shift["summary"]["text"], shift["args"]
    lines = [f"`benchmarks/results/adapt_shift.json` (text part: the same frozen encoder + 256-wide bottleneck built "
             f"inside that script, its own bottleneck initialisation; {args['text_limit']} items per domain, "
             f"{args['text_epochs']} epochs, seeds {args['seeds']}):", "",
             "| shift | source-only | dann | paretoda |", "|---|---|---|---|"]
    for key, arms in summary.items():
        lines.append(f"| {key.replace('->', ' → ')} | " + " | ".join(
            f"{100 * arms[a][0]:.1f} ± {100 * arms[a][1]:.1f}" for a in ("source-only", "dann", "paretoda")) + " |")
    return lines


def same_as_shift(runs: list[dict]) -> list[str]:
    """How many (pair, seed, arm) accuracies equal adapt_shift's run on the same held-out items (split sha256)."""
    path = ROOT / "results" / "adapt_shift.json"
    if not path.is_file():
        return []
    theirs = {(r["source"], r["target"], r["seed"]): r for r in json.loads(path.read_text())["runs"]
              if r.get("kind") == "text"}
    pairs = [(r["accuracy"][a], t["accuracy"][a]) for r in runs
             if (t := theirs.get((r["source"], r["target"], r["seed"]))) and t["test_sha256"] == r["test_sha256"]
             and r["limit"] == 1000 for a in ("source-only", "dann", "paretoda") if a in r["accuracy"]]
    if not pairs:
        return []
    same = sum(abs(a - b) < 1e-12 for a, b in pairs)
    return [f"- At 1000 items (adapt_shift's size, epochs, seeds and held-out items), {same} of {len(pairs)} "
            "per-seed accuracies (source-only, DANN, ParetoDA) are exactly adapt_shift's: the package's "
            "`freeze_backbone` + `bottleneck` reproduce the setting that script built by hand (same bottleneck "
            "and head initialisation: `torch.manual_seed(seed)` then Linear, BN; the head from `head_seed`). At 500 "
            "items the pattern is the same: DANN and ParetoDA lose on tweets ↔ nyt (class-prior shift), are within "
            "a few pp on amazon ↔ movies."]


def report(doc: dict) -> str:
    runs = [r for r in doc["runs"] if "skipped" not in r]
    limits = sorted({r["limit"] for r in runs})
    env = doc["environment"]
    lines = ["# Text domain adaptation with a frozen encoder, through the package", "",
             *[f"`{c}`" + "  " for c in doc["commands"]], "",
             f"Seeds {doc['seeds']}; held-out target accuracy (%), mean ± sd over seeds (ddof 1). Model `{MODEL}` "
             "frozen (`freeze_backbone: true`), trained: `bottleneck: 256` (Linear(384, 256) → BN → ReLU) + linear "
             f"head, {doc['epochs']} epochs, target split 70 / 30; DANN and ParetoDA at their defaults otherwise, "
             "through `transferkit.adapt.adapt`; source-only = the same module (same start) trained on the source "
             f"alone (AdamW 1e-3, batch 64). Environment: python {env['python']}, torch {env['packages']['torch']}, "
             "1 thread, `nice -n 10`, CPU shared with other jobs (load 6–7 on 2 cores)."]
    for limit in limits:
        lines += ["", f"## At most {limit} items per domain", ""]
        lines += table([r for r in runs if r["limit"] == limit], ARMS if limit == doc["limit"] else ARMS[:3])
    lines += ["", "## adapt_shift's text numbers, for comparison", "", *shift_table(), "", "## Notes", ""]
    for r in doc["runs"]:
        if "skipped" in r and r["seed"] == doc["seeds"][0]:
            lines.append(f"- {r['source']} → {r['target']}: skipped, {r['skipped']}: adapt() refuses a target whose "
                         "classes are not the source's, and finefood's great / other scores are not a "
                         "negative / positive split (no label map is made up here).")
    uda = [r for r in runs if "uda_step_seconds" in r]
    if uda:
        s = [r["uda_step_seconds"] for r in uda]
        p = [r["uda_predicted_seconds"] for r in uda]
        lines.append(f"- UDA (frozen encoder, no cache: every source, clean and augmented target item goes through "
                     f"the encoder on every step): {np.mean(s):.1f} s/step measured on 2 steps (range "
                     f"{min(s):.1f}–{max(s):.1f}), a whole run predicted at {min(p):.0f}–{max(p):.0f} s; runs "
                     f"predicted over {doc['uda_budget']:.0f} s were not run (`not run` above).")
    if doc.get("speed"):
        sp = doc["speed"]
        c, e = sp["cached"], sp["encoder_every_step"]
        lines.append(f"- Feature cache (DANN, {sp['pair']}, {sp['n_source']} source items, {sp['epochs']} epochs, "
                     f"{c['steps']} steps, seed 0): {c['seconds']:.1f} s with the features computed once per item "
                     f"vs {e['seconds']:.1f} s with the frozen encoder run on every step: {sp['speedup']}× faster "
                     "(both include the encoder pass over the held-out items). The gap grows with the epochs: the "
                     "cached run encodes each item once, the other 2 × 64 items per step. Accuracy "
                     f"{100 * c['accuracy']:.1f} vs {100 * e['accuracy']:.1f} %: not the same run on text, because "
                     "token batches of the two domains have different lengths and go through the backbone "
                     "(here encoder + bottleneck) separately, so the bottleneck's BatchNorm normalises each domain "
                     "on its own; on cached features (or on images) source and target are one concatenated batch, "
                     "as DANN's docstring describes (equal runs on images: tests/test_adapt_frozen.py).")
    lines += same_as_shift(runs)
    lines.append("- Per-run seconds are in the .json (`seconds`). They include encoding every item once per run "
                 "(each `adapt()` call builds its own cache); adapt_shift kept one cache on disk for all its runs.")
    return "\n".join(lines) + "\n"


def write(doc: dict, out: Path) -> None:
    out.with_suffix(".json").write_text(json.dumps(doc, indent=1))
    out.with_suffix(".md").write_text(report(doc))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", default=None, help="positions in PAIRS, e.g. 0,1 (default: all)")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--limit", type=int, default=500)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--uda-budget", type=float, default=300.0, help="seconds; 0: UDA neither measured nor run")
    ap.add_argument("--speed-epochs", type=int, default=2)
    ap.add_argument("--no-speed", action="store_true")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "adapt_text.json")
    ap.add_argument("--combine", nargs="+", type=Path)
    args = ap.parse_args()
    if args.combine:
        parts = [json.loads(p.read_text()) for p in args.combine]
        doc = {**parts[0], "runs": [{**r, "limit": r.get("limit", p["limit"])} for p in parts for r in p["runs"]],
               "commands": [c for p in parts for c in p["commands"]] + [f"{COMMAND} --combine "
                                                                         + " ".join(map(str, args.combine))],
               "speed": next((p["speed"] for p in parts if p.get("speed")), None)}
        write(doc, args.out)
        print(report(doc))
        return

    from transferkit.runtime import environment
    from transferkit.zoo import load_model

    pairs = [PAIRS[int(i)] for i in args.pairs.split(",")] if args.pairs else PAIRS
    seeds = [int(s) for s in args.seeds.split(",")]
    doc = {"commands": [COMMAND + " " + " ".join(sys.argv[1:])], "seeds": seeds, "limit": args.limit,
           "epochs": args.epochs, "uda_budget": args.uda_budget, "environment": environment(), "runs": [],
           "speed": None}
    model = load_model(MODEL)
    log = lambda s: print(s, flush=True)  # noqa: E731
    for source, target in pairs:
        for seed in seeds:
            log(f"{source} -> {target} seed {seed}")
            doc["runs"].append(one(model, source, target, seed, args, log))
            log(f"  {doc['runs'][-1].get('accuracy')} {doc['runs'][-1].get('skipped', '')}")
            if "skipped" in doc["runs"][-1]:
                break
        write(doc, args.out)
    if not args.no_speed:
        doc["speed"] = speed(model, args)
        log(f"speed {doc['speed']}")
        write(doc, args.out)
    print(report(doc))


if __name__ == "__main__":
    main()
