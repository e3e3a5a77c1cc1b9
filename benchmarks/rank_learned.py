"""Leave-one-target-out evaluation of the learned ranker (:mod:`transferkit.rank.learned`) on the stored zoos.

Input: the packaged training table ``src/transferkit/rank/zoo_results.json`` (built from
``benchmarks/results/rank_zoo*.json`` by ``scripts/learned_ranker_table.py``): 6 targets (3 image,
3 text, 7 candidate models each), each measured under several protocols (result files): one record per
(result file, target).

For every record, the learned ranker is trained on the records of the **other** targets only
(``exclude_targets=(target,)`` drops the target from every result file) and ranks the record's
candidates from their stored metric scores; τ_w (``scipy.stats.weightedtau``, as in
``benchmarks/rank_zoo.py``) and rel@1 are computed against the measured fine-tuning accuracy. Side by
side on the same records: every single metric, ``auto`` (mean normalised rank of ``DEFAULT_METRICS``)
and ``auto_consensus`` (spectral weights) recomputed from the stored scores exactly as rank_zoo does,
and ``loo_best_single``: the single metric with the best mean τ_w on the training targets (a fair
baseline: it is chosen without the target, as the learned weights are). ``learned`` is the
shipped default (z-scores). That default was chosen by comparing ``learned`` with ``learned_rank``
(ranks instead of z-scores) on these same targets, so its row is optimistic by that one choice; the
honest estimate of the whole procedure is ``learned_nested``, which picks the normalisation by an inner
leave-one-target-out on the 5 training targets only, so the choice never sees the held-out target.
``learned_same_zoo`` (trained only on the other targets of the same zoo) is a sensitivity check.

A τ_w that is undefined (constant scores) counts as 0 in a mean, as in rank_zoo. Intervals: 95 %
percentile bootstrap over candidates — each replicate resamples the 7 candidate models of every
record with replacement (scores fixed, as computed on the full candidate set), recomputes each τ_w and
the means; differences are paired (same resample for both rankers), so an interval that excludes 0
marks a difference that is not explained by which candidates happened to be in the zoo. The rows
"best single metric" are chosen **in hindsight** on these same records (which favours them).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/rank_learned.py      # ≈ 1 min on 1 core

Writes benchmarks/results/rank_learned.json and rank_learned.md.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
from scipy.stats import weightedtau

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from transferkit.io import write_json, write_text  # noqa: E402
from transferkit.rank.auto import DEFAULT_METRICS, aggregate_ranks  # noqa: E402
from transferkit.rank.evaluate import rel_at_k, weighted_tau  # noqa: E402
from transferkit.rank.learned import NORMALISE, learned_fit, load_table  # noqa: E402

LEARNED = {"learned": {}, "learned_rank": {"normalise": "rank"}, "learned_same_zoo": {}}
AUTO_ROWS = {"auto": "mean_rank", "auto_consensus": "consensus"}
GT = "finetune"
COMPARED = ("learned_nested", "learned")  # rows whose differences with the baselines are bootstrapped


def tau(s: np.ndarray, a: np.ndarray) -> float:
    """τ_w, 0 where undefined (constant scores or accuracies), as rank_zoo counts it in a mean."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = float(weightedtau(s, a).statistic)
    return t if math.isfinite(t) else 0.0


def rid(r: dict) -> str:
    return f"{r['source']}/{r['zoo']}/{r['target']}"


def per_model(r: dict) -> dict[str, dict[str, float]]:
    return {m: {j: sc[m] for j, sc in r["scores"].items() if m in sc} for m in r["models"]}


def single_taus(records: list[dict], metric: str) -> list[float] | None:
    """τ_w of one metric on each record, None if it did not score every candidate of some record."""
    out = []
    for r in records:
        sc = r["scores"].get(metric, {})
        if set(sc) != set(r[GT]):
            return None
        out.append(weighted_tau(sc, r[GT]) if np.ptp(list(sc.values())) > 0 else 0.0)
    return out


def inner_loo_tau(table: dict, normalise: str) -> float:
    """Mean τ_w of the learned ranker under leave-one-target-out within ``table`` (the training targets only)."""
    taus = []
    for r in table["records"]:
        sc = learned_fit(per_model(r), exclude_targets=(r["target"],), table=table, normalise=normalise)["scores"]
        taus.append(tau(np.array([sc[m] for m in r["models"]]), np.array([r[GT][m] for m in r["models"]])))
    return float(np.mean(taus))


def rankings(table: dict, r: dict, metrics: list[str]) -> tuple[dict[str, dict], dict]:
    """{ranker: {model: score}} for one record, and the learned weights / choices made for it."""
    rows: dict[str, dict] = {j: r["scores"][j] for j in metrics if set(r["scores"].get(j, {})) == set(r[GT])}
    for row, method in AUTO_ROWS.items():
        agg = aggregate_ranks({k: r["scores"].get(k, {}) for k in DEFAULT_METRICS}, r["models"], method=method)
        rows[row] = agg["scores"]
    info = {}
    for row, opts in LEARNED.items():
        tab = table
        if row == "learned_same_zoo":
            tab = {**table, "records": [x for x in table["records"] if x["zoo"] == r["zoo"]]}
        fit = learned_fit(per_model(r), exclude_targets=(r["target"],), table=tab, **opts)
        assert not any(t.endswith("/" + r["target"]) for t in fit["trained_on"]), "leave-one-target-out leaked"
        rows[row] = fit["scores"]
        info[row] = {"weights": {j: w for j, w in fit["weights"].items() if w > 0}, "trained_on": len(fit["trained_on"])}
    others = [x for x in table["records"] if x["target"] != r["target"]]
    inner = {how: inner_loo_tau({**table, "records": others}, how) for how in NORMALISE}
    pick = max(NORMALISE, key=lambda how: inner[how])
    rows["learned_nested"] = learned_fit(per_model(r), exclude_targets=(r["target"],), table=table, normalise=pick)["scores"]
    info["learned_nested"] = {"normalise": pick, "inner_mean_tau_w": inner}
    train_tau = {j: np.mean(t) for j in metrics if j in rows and (t := single_taus(others, j)) is not None}
    best = max(train_tau, key=lambda j: train_tau[j])
    rows["loo_best_single"] = rows[best]
    info["loo_best_single"] = best
    return rows, info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--boot", type=int, default=1000, help="bootstrap replicates")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args()
    t0 = time.perf_counter()
    table = load_table()
    records = table["records"]
    metrics = list(table["metrics"])
    groups = {"all": records} | {src: [r for r in records if r["source"] == src] for src in dict.fromkeys(r["source"] for r in records)}

    rows, info = {}, {}
    for r in records:
        rows[rid(r)], info[rid(r)] = rankings(table, r, metrics)
    names = [*LEARNED, "learned_nested", "loo_best_single", *AUTO_ROWS, *metrics]

    # point estimates per record
    point: dict[str, dict[str, dict]] = {n: {} for n in names}
    for r in records:
        for n in names:
            sc = rows[rid(r)].get(n)
            if sc is not None:
                s = np.array([sc[m] for m in r["models"]])
                point[n][rid(r)] = {"tau_w": tau(s, np.array([r[GT][m] for m in r["models"]])),
                                    "rel@1": rel_at_k(sc, r[GT], 1)}

    # bootstrap over candidates: one index draw per (replicate, record), shared by every ranker
    rng = np.random.default_rng(args.seed)
    boot = {n: np.full((args.boot, len(records)), np.nan) for n in names}
    for i, r in enumerate(records):
        a = np.array([r[GT][m] for m in r["models"]])
        S = {n: np.array([rows[rid(r)][n][m] for m in r["models"]]) for n in names if n in rows[rid(r)]}
        for b in range(args.boot):
            idx = rng.integers(0, len(a), len(a))
            for n, s in S.items():
                boot[n][b, i] = tau(s[idx], a[idx])

    def summary(n: str, members: list[int]) -> dict | None:
        if np.isnan(boot[n][:, members]).any():
            return None  # not applicable to every record of the group
        ids = [rid(records[i]) for i in members]
        dist = boot[n][:, members].mean(1)
        return {"mean_tau_w": float(np.mean([point[n][k]["tau_w"] for k in ids])),
                "ci95": [float(x) for x in np.percentile(dist, [2.5, 97.5])],
                "mean_rel@1": float(np.mean([point[n][k]["rel@1"] for k in ids]))}

    index = {g: [i for i, r in enumerate(records) if any(r is x for x in rs)] for g, rs in groups.items()}
    table_out = {g: {n: summary(n, idx) for n in names} for g, idx in index.items()}
    diffs: dict[str, dict] = {row: {} for row in COMPARED}
    for g, idx in index.items():
        single = {j: v["mean_tau_w"] for j, v in table_out[g].items() if j in metrics and v is not None}
        best = max(single, key=lambda j: single[j])
        for row in COMPARED:
            diffs[row][g] = {}
            for other in ("best_single_in_hindsight", "loo_best_single", *AUTO_ROWS):
                o = best if other == "best_single_in_hindsight" else other
                lo, hi = np.percentile(boot[row][:, idx].mean(1) - boot[o][:, idx].mean(1), [2.5, 97.5])
                diffs[row][g][other] = {"vs": o, "diff": table_out[g][row]["mean_tau_w"] - table_out[g][o]["mean_tau_w"],
                                        "ci95": [float(lo), float(hi)], "real": bool(lo > 0 or hi < 0)}

    doc = {"command": ("OMP_NUM_THREADS=" + os.environ.get("OMP_NUM_THREADS", "?") + " .venv/bin/python benchmarks/rank_learned.py "
                      + " ".join(sys.argv[1:])).strip(),
           "ground_truth": GT, "boot": args.boot, "seed": args.seed, "table_version": table["version"],
           "table_sources": table["sources"], "records": [rid(r) for r in records],
           "per_record": {n: point[n] for n in names}, "per_record_info": info, "summary": table_out, "learned_vs": diffs,
           "weights_all_targets": {z: {j: w for j, w in learned_fit(per_model(r))["weights"].items() if w > 0}
                                   for z, r in {r["zoo"]: r for r in records}.items()},
           "seconds": round(time.perf_counter() - t0, 1)}
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "rank_learned.json", doc)
    md = markdown(doc, list(groups), names)
    write_text(args.out / "rank_learned.md", md)
    print(md)


def word(v: dict) -> str:
    return ("above" if v["diff"] > 0 else "below") + (" (a real difference)" if v["real"] else " (not a real difference)")


def fmt(v: dict | None) -> str:
    return "n/a" if v is None else f"{v['mean_tau_w']:.3f} [{v['ci95'][0]:.2f}, {v['ci95'][1]:.2f}]"


def markdown(doc: dict, groups: list[str], names: list[str]) -> str:
    s, d = doc["summary"], doc["learned_vs"]
    cols = [g if g == "all" else g.removeprefix("rank_zoo").removesuffix(".json").strip("_") or "rank_zoo" for g in groups]
    lines = ["# rank_learned: the learned ranker, leave-one-target-out, vs every single metric and auto", "",
             f"Command: `{doc['command']}` ({doc['seconds']:.0f} s)", "",
             f"Ground truth: measured {doc['ground_truth']} accuracy. Training table: `src/transferkit/rank/zoo_results.json` "
             f"v{doc['table_version']}, built from " + ", ".join(f"`{x['file']}`" for x in doc["table_sources"])
             + f" ({len(doc['records'])} records = 6 targets × 3 protocols). Every record is ranked by a model trained on "
             "the other 5 targets only (all their records; the target is dropped from every file).", "",
             f"Mean τ_w over the records of each result file (3 targets each; `all` = the {len(doc['records'])} records), with the 95 % "
             f"bootstrap interval over candidates ({doc['boot']} replicates); last column: mean rel@1 over all records. "
             "n/a = the metric does not score every candidate of those records (LEEP/NCE need a source head).", "",
             "| ranker | " + " | ".join(cols) + " | mean rel@1 |", "|---" * (len(cols) + 2) + "|"]
    order = sorted(names, key=lambda n: (s["all"][n] is None, -(s["all"][n] or {"mean_tau_w": 0})["mean_tau_w"]))
    for n in order:
        rel = s["all"][n]["mean_rel@1"] if s["all"][n] else None
        label = f"**{n}**" if n in ("learned_nested", "auto", "auto_consensus", "loo_best_single") else n
        lines.append(f"| {label} | " + " | ".join(fmt(s[g][n]) for g in groups) + f" | {'n/a' if rel is None else f'{rel:.3f}'} |")
    for row in COMPARED:
        lines += ["", f"`{row}` minus another ranker (mean τ_w difference, paired bootstrap 95 % interval; **real** = "
                  "the interval excludes 0):", "", "| vs | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
        for other in ("best_single_in_hindsight", "loo_best_single", *AUTO_ROWS):
            cells = []
            for g in groups:
                x = d[row][g][other]
                tag = f"{x['vs']}: " if other == "best_single_in_hindsight" else ""
                cells.append(f"{tag}{x['diff']:+.3f} [{x['ci95'][0]:+.2f}, {x['ci95'][1]:+.2f}]" + (" **real**" if x["real"] else ""))
            lines.append(f"| {other} | " + " | ".join(cells) + " |")
    lines += ["", f"Verdict (all {len(doc['records'])} records):"]
    for row in COMPARED:
        x, y = d[row]["all"]["best_single_in_hindsight"], d[row]["all"]["loo_best_single"]
        lines.append(f"- `{row}` ({s['all'][row]['mean_tau_w']:.3f}) is {word(x)} the best single metric in hindsight, "
                     f"{x['vs']} ({s['all'][x['vs']]['mean_tau_w']:.3f}), and {word(y)} the single metric chosen on the "
                     f"training targets ({s['all']['loo_best_single']['mean_tau_w']:.3f}).")
    lines += ["- The intervals resample candidates within each record; with only 6 targets the variation between "
              "targets is larger and is not in them (per record below)."]
    lines += ["", "Per record: τ_w of learned_nested (normalisation it picked) | learned | auto | loo_best_single (metric "
              "it picked); weights > 0 of the learned fold:", ""]
    for k in doc["records"]:
        p, inf = doc["per_record"], doc["per_record_info"][k]
        w = ", ".join(f"{j} {v:.2f}" for j, v in sorted(inf["learned"]["weights"].items(), key=lambda kv: -kv[1]))
        lines.append(f"- {k}: {p['learned_nested'][k]['tau_w']:.3f} ({inf['learned_nested']['normalise']}) | "
                     f"{p['learned'][k]['tau_w']:.3f} | {p['auto'][k]['tau_w']:.3f} | "
                     f"{p['loo_best_single'][k]['tau_w']:.3f} ({inf['loo_best_single']}); weights: {w}")
    lines += ["", "Weights of the shipped model (trained on all 6 targets; metrics not listed have weight 0):"]
    for zoo, ws in doc["weights_all_targets"].items():
        lines.append(f"- {zoo} zoo (metrics it has): " + ", ".join(f"{j} {v:.3f}" for j, v in sorted(ws.items(), key=lambda kv: -kv[1])))
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
