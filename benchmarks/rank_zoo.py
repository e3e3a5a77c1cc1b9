"""How well do transferability metrics rank real model zoos? Measured against real fine-tuning.

Zoos (all real, from ../shared/ASSETS.md):

* images — MobileNetV2, EfficientNet-Lite0/1/2 (ImageNet) and the MNIST/USPS/SVHN digit CNNs on
  OpenCV digits, sklearn digits and Fashion-MNIST (``--image-targets``; MNIST is available too);
* text — all-MiniLM-L6-v2, paraphrase-MiniLM-L3-v2, all-mpnet-base-v2, plus MiniLM checkpoints that
  this benchmark fine-tunes itself on *other* real text tasks (VADER tweets / Amazon / NYT
  domains — intermediate-task transfer, a realistic hub zoo) on VADER movies, SpamAssassin and
  fine-food reviews.

Per target: a stratified sample (``--image-per-class`` / ``--text-per-class``) split in half; every
metric scores the training half (features cached); the ground truth is each model's measured test
accuracy after (a) full fine-tuning with a small lr grid (``tune(method="full")``, lr chosen on
tune's validation split) and (b) a linear probe on frozen features (C chosen on a validation split).
Both are cached under the transferkit cache, so re-runs only redo the cheap parts. Reported: τ_w
(``scipy.stats.weightedtau``), Pearson, rel@1 and regret per metric and target, and the mean τ_w.
Two auto-ranker rows aggregate the rankings of ``DEFAULT_METRICS`` (``transferkit.rank.auto``):
``auto`` (mean normalised rank) and ``auto_consensus`` (weights learned without labels from the
metrics' agreement, Parisi et al., PNAS 2014); the report compares both with the best single metric.

CPU budget: on the shared 2-core machine the ImageNet CNNs run at ``--image-size`` (default 96 px
instead of 224/240/260 — about 5× cheaper to extract and fine-tune; the choice applies to metrics
and both ground truths alike, so the comparison is consistent, but the ImageNet CNNs are weaker at
96 px than at their native sizes); ``--image-size 0`` keeps the native sizes. Text is truncated to
``--max-length`` tokens (default 64). Use ``OMP_NUM_THREADS=1`` on a loaded machine: with 2 BLAS
threads competing with other jobs the metrics ran ~10× slower (thread oversubscription).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/rank_zoo.py              # ≈ 25 min cold, ≈ 3 min cached
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/rank_zoo.py --quick      # smaller, for a smoke run

Writes benchmarks/results/rank_zoo.json and rank_zoo.md. ``--report-only`` re-reads ``<out>/rank_zoo.json``,
recomputes both auto rows from the stored per-metric scores (no features, no training) and rewrites both files.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

IMAGE_MODELS = ["mobilenet-v2", "efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2",
                "digits-mnist", "digits-usps", "digits-svhn"]
IMAGENET = {"mobilenet-v2", "efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2"}
TEXT_MODELS = ["all-minilm-l6-v2", "paraphrase-minilm-l3-v2", "all-mpnet-base-v2"]
# intermediate-task checkpoints: (name, base model, source task)
CHECKPOINTS = [("minilm-l6@vader-tweets", "all-minilm-l6-v2", "vader:tweets"),
               ("minilm-l6@vader-amazon", "all-minilm-l6-v2", "vader:amazon"),
               ("minilm-l6@vader-nyt", "all-minilm-l6-v2", "vader:nyt"),
               ("minilm-l3@vader-tweets", "paraphrase-minilm-l3-v2", "vader:tweets")]
SET_LEVEL = ["etran", "ncti"]
AUTO_ROWS = {"auto": "mean_rank", "auto_consensus": "consensus"}  # row name -> aggregate_ranks method


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------ models
def image_model(name: str, size: int):
    from transferkit.zoo import load_model

    return load_model(name, size=size) if (size and name in IMAGENET) else load_model(name)


def text_model(spec: str, max_length: int, name: str | None = None):
    from transferkit.zoo import load_model

    return load_model(spec, max_length=max_length, **({"name": name} if name else {}))


def build_checkpoints(args) -> dict[str, object]:
    """Fine-tune the intermediate-task checkpoints once (cached as HF directories) and load them."""
    from transferkit.assets import cache_dir
    from transferkit.data import load_dataset, train_test_split
    from transferkit.tune import tune

    out = {}
    root = cache_dir() / "rank_zoo" / "checkpoints"
    for name, base, task in CHECKPOINTS[: args.checkpoints]:
        tag = f"{name}-pc{args.ckpt_per_class}-e{args.ckpt_epochs}-len{args.max_length}"
        path = root / tag
        info_path = path / "transferkit_checkpoint.json"
        if not info_path.is_file():
            t0 = time.perf_counter()
            log(f"checkpoint {name}: fine-tuning {base} on {task}")
            ds = load_dataset(task, per_class=args.ckpt_per_class, seed=1)
            tr, te = train_test_split(ds, test_size=0.2, seed=1)
            model = text_model(base, args.max_length)
            res = tune(model, tr, te, method="full", config={"epochs": args.ckpt_epochs, "lr": 1e-4, "batch_size": 16},
                       progress=False)
            from transferkit.io import atomic_path

            with atomic_path(path) as tmp:
                tmp.mkdir()
                res.module.backbone.model.save_pretrained(tmp)
                model.preprocess.tokenizer.save_pretrained(tmp)
                (tmp / "transferkit_checkpoint.json").write_text(json.dumps({
                    "name": name, "base": base, "task": task, "source_accuracy": res.metrics["test_accuracy"],
                    "seconds": round(time.perf_counter() - t0, 1)}))
        info = json.loads(info_path.read_text())
        log(f"checkpoint {name}: source-task accuracy {info['source_accuracy']:.3f}")
        out[name] = text_model(str(path), args.max_length, name=name)
        out[name].meta["checkpoint"] = info
    return out


# -------------------------------------------------------------------------------------------- auto rows
def auto_rows(scores: dict[str, dict], models: list[str]) -> tuple[dict[str, dict], dict[str, dict]]:
    """The auto-ranker rows from the per-metric scores of ``DEFAULT_METRICS``: ({row: {model: score}},
    {row: {"method", "weights", "weights_note", "skipped"}})."""
    from transferkit.rank.auto import DEFAULT_METRICS, aggregate_ranks

    missing = [k for k in DEFAULT_METRICS if k not in scores]
    if missing:
        raise SystemExit(f"rank_zoo: no per-model scores for {', '.join(missing)}; cannot compute the auto rows")
    rows, info = {}, {}
    for row, method in AUTO_ROWS.items():
        agg = aggregate_ranks({k: scores[k] for k in DEFAULT_METRICS}, list(models), method=method)
        rows[row] = {m: v for m, v in agg["scores"].items() if math.isfinite(v)}
        info[row] = {"method": method, "weights": agg["weights"], "weights_note": agg["weights_note"],
                     "skipped": agg["skipped"]}
    return rows, info


def recompute_auto(doc: dict) -> list[str]:
    """``--report-only``: recompute the auto rows and their evaluation from the stored per-metric scores and
    ground truth. Returns reproduction problems: the stored ``auto`` row differing from the recomputed one."""
    from transferkit.rank.auto import DEFAULT_METRICS
    from transferkit.rank.groundtruth import grid_edge_notes
    from transferkit.rank.runner import evaluation

    problems = []
    for zoo, z in doc["zoos"].items():
        for r in z["targets"]:
            rows, info = auto_rows(r["scores"], z["models"])
            old = r["scores"].get("auto")
            if old is not None and (set(old) != set(rows["auto"])
                                    or max(abs(old[m] - rows["auto"][m]) for m in old) > 1e-12):
                problems.append(f"{zoo}/{r['target']}: stored auto scores differ from the recomputed ones")
            old_ev = {p: r["evaluation"][p].get("auto") for p in doc["ground_truth"]}
            r["scores"].update(rows)
            r["auto_rows"] = info
            secs = r.get("seconds", {}).get("metrics")
            if secs is not None:
                for row in rows:
                    secs[row] = sum(secs.get(k, 0.0) for k in DEFAULT_METRICS)
            notes: list[str] = []
            for p in doc["ground_truth"]:
                ev = evaluation(rows, r["ground_truth"][p], notes)
                if old_ev[p] is not None and ev.get("auto") != old_ev[p]:
                    problems.append(f"{zoo}/{r['target']}/{p}: stored auto evaluation differs from the recomputed one")
                r["evaluation"][p].update(ev)
            notes += [f"{r['target']} / {p}: {n}" for p in doc["ground_truth"]
                      for n in grid_edge_notes(r["ground_truth_runs"][p])]
            r["notes"] = sorted(set(r["notes"]) | set(notes))
    return problems


def best_single(s: dict) -> str | None:
    """The single metric (not an auto row) with the best mean τ_w in one ground truth's summary."""
    single = {k: v["mean_tau_w"] for k, v in s.items() if k not in AUTO_ROWS and v["mean_tau_w"] is not None}
    return max(single, key=lambda k: single[k]) if single else None


# -------------------------------------------------------------------------------------------- one target
def timed_features(model, ds):
    """Features (cached) and the seconds their extraction took (measured once, remembered on disk)."""
    from transferkit.features import cache_path, extract, fingerprint

    path = cache_path(fingerprint(model, ds, "penultimate"), model.name)
    tfile = path.parent / (path.name + ".seconds")
    t0 = time.perf_counter()
    hit = (path / "features.json").is_file()
    f = extract(model, ds, progress=False)
    sec = time.perf_counter() - t0
    if not hit:
        tfile.write_text(str(sec))
    elif tfile.is_file():
        sec = float(tfile.read_text())
    return f, sec


def run_target(target: str, models: dict, args, per_class: int, ft_cfg: dict, lrs: list[float]) -> dict:
    from transferkit.data import load_dataset, train_test_split
    from transferkit.rank import METRICS, rank_features
    from transferkit.rank.auto import DEFAULT_METRICS
    from transferkit.rank.groundtruth import grid_edge_notes, measure
    from transferkit.rank.runner import _set_level

    n_train = per_class // 2 if args.test_per_class else per_class - per_class // 2
    n_test = args.test_per_class or per_class // 2
    ds = load_dataset(target, per_class=n_train + n_test, seed=args.seed)
    ds.is_test = None  # split the sample ourselves even where the source has an official split (Fashion-MNIST)
    train, test = train_test_split(ds, test_size=n_test / (n_train + n_test), seed=args.seed)
    log(f"{target}: {len(train)} train / {len(test)} test, {len(ds.classes)} classes, {len(models)} models")
    feats, feat_s = {}, {}
    for name, m in models.items():
        feats[name], feat_s[name] = timed_features(m, train)
    metrics = list(METRICS)
    ranked = rank_features(feats, metrics, seed=args.seed)
    scores = {k: dict(ranked["scores"][k]) for k in metrics}
    metric_s = {k: float(sum(ranked["time_s"][k].values())) for k in metrics}
    notes = sorted({f"{s['metric']}: {s['reason']}" for s in ranked["skipped"]})
    for k in SET_LEVEL:
        scores[k], metric_s[k] = _set_level(k, feats, args.seed, notes, {})
    rows, auto_info = auto_rows(scores, list(models))
    scores.update(rows)
    for row in rows:
        metric_s[row] = sum(metric_s[k] for k in DEFAULT_METRICS)
    probs: dict[str, dict] = {"finetune": {}, "linear": {}}
    truth: dict[str, dict] = {"finetune": {}, "linear": {}}
    gt_s: dict[str, dict] = {"finetune": {}, "linear": {}}
    runs: dict[str, dict] = {"finetune": {}, "linear": {}}
    for proto in args.ground_truth:
        for name, m in models.items():
            t0 = time.perf_counter()
            res = measure(m, train, test, protocol=proto, config=ft_cfg if proto == "finetune" else None,
                          lrs=lrs if proto == "finetune" else None, seed=args.seed)
            truth[proto][name] = res["accuracy"]
            probs[proto][name] = res["test_probs"]
            gt_s[proto][name] = res["seconds"]
            runs[proto][name] = {k: res[k] for k in ("accuracy", "oracle_accuracy", "selected", "grid", "seconds")}
            log(f"{target}: {proto:8s} {name:26s} acc {res['accuracy']:.3f} "
                f"({'cached' if res['cached'] else f'{time.perf_counter() - t0:.0f}s'})")
    evals = {}
    from transferkit.rank.runner import evaluation

    for proto in args.ground_truth:
        evals[proto] = evaluation(scores, truth[proto], notes)
        notes += [f"{target} / {proto}: {n}" for n in grid_edge_notes(runs[proto])]
    ensembles = {}
    if "finetune" in args.ground_truth:
        from transferkit.rank.ensemble import ensemble_accuracy
        from transferkit.rank.runner import _ensemble, _evaluate_ensemble

        for k in (2, 3):
            ens = _ensemble(feats, k, args.seed, notes)
            _evaluate_ensemble(ens, probs["finetune"], test.y, k)
            top = sorted(scores["logme"], key=lambda m: -scores["logme"][m])[:k]  # naive: the k best by LogME
            ens["top_k_by_logme"] = {"members": top, "accuracy": ensemble_accuracy(probs["finetune"], test.y, top)}
            ensembles[str(k)] = ens
            log(f"{target}: ensemble k={k}: " + "; ".join(f"{m} {r['selected']} acc {r['accuracy']:.3f}"
                                                           for m, r in ens["methods"].items())
                + f"; best {ens['best']['members']} {ens['best']['accuracy']:.3f}")
    majority = float(max(np.mean(test.y == c) for c in range(len(test.classes))))
    correct = {proto: {m: "".join("1" if ok else "0" for ok in np.argmax(p, 1) == test.y) for m, p in probs[proto].items()}
               for proto in args.ground_truth}
    return {"target": target, "correct": correct, "n_train": len(train), "n_test": len(test), "classes": len(ds.classes),
            "majority": majority, "scores": scores, "ground_truth": truth, "ground_truth_runs": runs,
            "evaluation": evals, "ensembles": ensembles, "seconds": {"features": feat_s, "metrics": metric_s, "ground_truth": gt_s},
            "auto_rows": auto_info, "notes": notes}


# ------------------------------------------------------------------------------------------------ report
BOOTSTRAP = 1000


def tau_draws(r: dict, proto: str, draws: int = BOOTSTRAP, seed: int = 0) -> dict[str, np.ndarray] | None:
    """τ_w of every metric on ``draws`` bootstrap resamples of the target's test items (the same resamples for
    every metric; the candidates' accuracies are recomputed from their stored per-item correctness). None when
    the run stored no per-item correctness. A draw where a metric's τ_w is undefined is NaN."""
    from scipy import stats

    correct = (r.get("correct") or {}).get(proto)
    if not correct:
        return None
    models = sorted(correct)
    C = np.array([[c == "1" for c in correct[m]] for m in models], dtype=float)  # models × items
    n = C.shape[1]
    rng = np.random.default_rng(seed)
    counts = np.stack([np.bincount(rng.integers(0, n, n), minlength=n) for _ in range(draws)], 1)  # items × draws
    acc = C @ counts / n  # models × draws
    out = {}
    for k, sc in r["scores"].items():
        keep = [i for i, m in enumerate(models) if sc.get(m) is not None and np.isfinite(sc[m])]
        if len(keep) < 2:
            continue
        s = np.array([sc[models[i]] for i in keep], dtype=float)
        out[k] = np.array([stats.weightedtau(s, acc[keep, b]).statistic if np.ptp(s) > 0 else np.nan
                           for b in range(draws)])
    return out


def interval(x: np.ndarray) -> list[float] | None:
    """The 95 % percentile interval of the finite draws (None when fewer than half are finite)."""
    x = x[np.isfinite(x)]
    return [float(np.percentile(x, 2.5)), float(np.percentile(x, 97.5))] if x.size >= BOOTSTRAP // 2 else None


def summarise(zoo: str, results: list[dict], protos: list[str]) -> dict:
    """Per-target τ_w and the means. A metric whose scores tie across all candidates (e.g. SFDA saturating
    at 1.0 when N < D) has an undefined τ_w: shown as None per target and counted as 0 (no information)
    in the mean; ``undefined`` counts those targets."""
    metrics = list(results[0]["scores"])
    out = {}
    for proto in protos:
        draws = [tau_draws(r, proto) for r in results]
        table = {}
        for k in metrics:
            evs = [r["evaluation"][proto].get(k) for r in results]
            if all(e is None for e in evs):  # never applicable (e.g. LEEP/NCE without a source head)
                table[k] = {"per_target": {r["target"]: None for r in results}, "mean_tau_w": None, "undefined": 0,
                            "mean_pearson": None, "mean_rel@1": None, "mean_regret": None, "applicable": False}
                continue
            evs = [e or {} for e in evs]
            taus = [e.get("weighted_tau") for e in evs]
            rel = [e.get("rel@1") for e in evs if e.get("rel@1") is not None]
            reg = [e.get("regret") for e in evs if e.get("regret") is not None]
            pea = [e.get("pearson") for e in evs]
            table[k] = {"per_target": dict(zip([r["target"] for r in results], taus)),
                        "mean_tau_w": float(np.mean([t if t is not None else 0.0 for t in taus])),
                        "undefined": sum(t is None for t in taus),
                        "mean_pearson": float(np.mean([p if p is not None else 0.0 for p in pea])),
                        "mean_rel@1": float(np.mean(rel)) if rel else None,
                        "mean_regret": float(np.mean(reg)) if reg else None, "applicable": True}
            if all(d is not None for d in draws):  # 95 % bootstrap intervals over the test items, per target and of the mean
                per = [np.nan_to_num(d[k], nan=0.0) if k in d else np.zeros(BOOTSTRAP) for d in draws]
                table[k]["ci"] = {r["target"]: interval(d[k]) if k in d else None for r, d in zip(results, draws)}
                table[k]["mean_ci"] = interval(np.mean(per, 0))
        out[proto] = table
    return out


def fmt(v, nd=3) -> str:
    return "—" if v is None else f"{v:.{nd}f}"


def fmt_ci(ci) -> str:
    return f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else ""


def acc_se(r: dict, proto: str, m: str) -> str:
    """A measured accuracy with its binomial standard error on the target's test set."""
    a = r["ground_truth"].get(proto, {}).get(m)
    return "—" if a is None else f"{a:.3f} ± {math.sqrt(a * (1 - a) / r['n_test']):.3f}"


def markdown(doc: dict) -> str:
    lines = ["# rank_zoo: transferability metrics vs measured transfer on real zoos", "",
             f"Command: `{doc['command']}`", "",
             f"Machine: {doc['machine']}. Wall time of this run {doc['seconds_total']:.0f} s"
             + (f" (ground truth and features from the cache; the cold run took {doc['seconds_cold_run']:.0f} s)"
                if doc.get("seconds_cold_run") else "") + ".", ""]
    for zoo, z in doc["zoos"].items():
        lines += [f"## {zoo} zoo", "", "Models: " + ", ".join(z["models"]), ""]
        for r in z["targets"]:
            lines.append(f"- **{r['target']}**: {r['n_train']} train / {r['n_test']} test, {r['classes']} classes, "
                         f"majority {r['majority']:.2f}. Measured accuracy (fine-tune | linear probe): " +
                         "; ".join(f"{m} {acc_se(r, 'finetune', m)} | {acc_se(r, 'linear', m)}" for m in z["models"]))
        lines.append("")
        lines.append("Noise floor of the ground truth (binomial standard error of one test accuracy vs the spread of the "
                     "measured accuracies over the zoo):")
        for r in z["targets"]:
            for proto in doc["ground_truth"]:
                acc = np.array(list(r["ground_truth"][proto].values()))
                se = float(np.sqrt(acc.mean() * (1 - acc.mean()) / r["n_test"]))
                lines.append(f"- {r['target']} / {proto}: spread {acc.max() - acc.min():.3f}, std {acc.std():.3f}, "
                             f"SE of one accuracy ≈ {se:.3f}")
        lines.append("")
        for proto in doc["ground_truth"]:
            s = z["summary"][proto]
            targets = [r["target"] for r in z["targets"]]
            lines += [f"### τ_w against {'fine-tuning' if proto == 'finetune' else 'linear-probe'} accuracy", "",
                      "| metric | " + " | ".join(targets) + " | mean τ_w | mean Pearson | mean rel@1 | mean regret |",
                      "|---|" + "---|" * (len(targets) + 4)]
            order = sorted(s, key=lambda k: -(s[k]["mean_tau_w"] if s[k]["mean_tau_w"] is not None else -9))
            for k in order:
                if not s[k].get("applicable", True):
                    lines.append(f"| {k} | " + " | ".join("n/a" for _ in targets) + " | n/a | n/a | n/a | n/a |")
                    continue
                ci = s[k].get("ci") or {}
                lines.append(f"| {k} | " + " | ".join(fmt(s[k]["per_target"][t]) + fmt_ci(ci.get(t)) for t in targets) +
                             f" | **{fmt(s[k]['mean_tau_w'])}**{fmt_ci(s[k].get('mean_ci'))} | {fmt(s[k]['mean_pearson'])} | "
                             f"{fmt(s[k]['mean_rel@1'])} | {fmt(s[k]['mean_regret'])} |")
            lines += ["", "— = undefined (the metric gave every candidate the same score), counted as 0 in the mean; "
                      "n/a = not applicable to this zoo (needs a source head)."
                      + (f" [lo, hi] = 95 % bootstrap interval over the test items ({BOOTSTRAP} resamples; the "
                         "ground-truth accuracies recomputed from each candidate's stored per-item correctness; the "
                         "mean's interval resamples every target's test set in the same draw; percentile intervals, and "
                         "τ_w is bounded, so a value near ±1 can sit at its interval's edge). Two metrics whose "
                         "intervals overlap are not told apart by this ground truth."
                         if any(s[k].get("ci") for k in s) else ""), ""]
        lines += auto_section(doc, z)
    for zoo, z in doc["zoos"].items():
        rows = []
        for r in z["targets"]:
            for k, ens in (r.get("ensembles") or {}).items():
                picks = {f"{m} (greedy)": v for m, v in ens["methods"].items()}
                picks["top-k by LogME"] = ens["top_k_by_logme"]
                picks["top-k by measured accuracy (oracle)"] = ens["top_k_by_accuracy"]
                for name, v in picks.items():
                    rows.append(f"| {r['target']} | {k} | {name} | {', '.join(v['members'] if 'members' in v else v['selected'])} | "
                                f"{v['accuracy']:.3f} | {ens['best']['accuracy']:.3f} | {ens['mean_subset_accuracy']:.3f} |")
        if rows:
            lines += [f"## Ensemble selection, {zoo} zoo (measured: averaged probabilities of the fine-tuned members)", "",
                      "| target | k | selection | members | measured acc | best k-subset | mean k-subset |",
                      "|---|---|---|---|---|---|---|", *rows, ""]
    lines += ["## Notes", ""] + [f"- {n}" for n in doc.get("notes", [])]
    return "\n".join(lines) + "\n"


def auto_section(doc: dict, z: dict) -> list[str]:
    """Markdown: the auto rows vs the best single metric (by mean τ_w) per ground truth, and the consensus
    weights per target."""
    targets = [r["target"] for r in z["targets"]]
    rows = []
    for proto in doc["ground_truth"]:
        s = z["summary"][proto]
        best = best_single(s)
        gt = "fine-tune" if proto == "finetune" else "linear probe"
        for k, label in [*((row, f"{row} ({method})") for row, method in AUTO_ROWS.items()),
                         (best, f"best single metric: {best}")]:
            if k in s and s[k].get("applicable", True):
                rows.append(f"| {gt} | {label} | " + " | ".join(fmt(s[k]["per_target"][t]) for t in targets) +
                            f" | **{fmt(s[k]['mean_tau_w'])}** |")
    if not rows:
        return []
    lines = ["### Auto ranker vs the best single metric (τ_w)", "",
             ("The best single metric is the one with the best mean τ_w over these targets for that ground truth "
              "(chosen with the labels, so it is an upper reference, not a pick the user could make)."), "",
             "| ground truth | row | " + " | ".join(targets) + " | mean τ_w |", "|---|---|" + "---|" * (len(targets) + 1), *rows, ""]
    infos = [(r["target"], (r.get("auto_rows") or {}).get("auto_consensus")) for r in z["targets"]]
    if all(i is not None for _, i in infos):
        from transferkit.rank.auto import DEFAULT_METRICS

        lines += [("Consensus weights (learned without labels from the Spearman correlations of the metrics over "
                   f"the {len(z['models'])} models; — = not in the consensus):"), "",
                  "| target | " + " | ".join(DEFAULT_METRICS) + " | note |", "|---|" + "---|" * (len(DEFAULT_METRICS) + 1)]
        for t, i in infos:
            notes = [i["weights_note"]] if i["weights_note"] else []
            notes += [f"{s['metric']}: {s['reason']}" for s in i["skipped"]]
            lines.append(f"| {t} | " + " | ".join(fmt(i["weights"].get(k)) for k in DEFAULT_METRICS) +
                         f" | {'; '.join(notes) or '—'} |")
        lines.append("")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--zoos", default="image,text")
    ap.add_argument("--image-targets", default="opencv-digits,sklearn-digits,fashion-mnist")
    ap.add_argument("--text-targets", default="vader:movies,spamassassin,finefood")
    ap.add_argument("--image-per-class", type=int, default=20)
    ap.add_argument("--text-per-class", type=int, default=60)
    ap.add_argument("--image-size", type=int, default=96, help="input size of the ImageNet CNNs (0: native)")
    ap.add_argument("--test-per-class", type=int, default=0,
                    help="test examples per class; the train part stays half of --*-per-class "
                         "(0: split --*-per-class 50/50, the smaller legacy test sets)")
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=3, help="fine-tuning epochs of the ground truth")
    ap.add_argument("--image-lrs", default="3e-3,1e-3")
    ap.add_argument("--text-lrs", default="3e-4,1e-4")
    ap.add_argument("--ground-truth", default="finetune,linear")
    ap.add_argument("--checkpoints", type=int, default=4, help="how many intermediate-task text checkpoints (0-4)")
    ap.add_argument("--ckpt-per-class", type=int, default=100)
    ap.add_argument("--ckpt-epochs", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="smoke run: 2 targets per zoo, fewer samples, 1 epoch")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--report-only", action="store_true", help="re-summarise an existing rank_zoo.json, no compute")
    args = ap.parse_args()
    if args.report_only:
        from transferkit.io import write_json, write_text

        doc = json.loads((args.out / "rank_zoo.json").read_text())
        problems = recompute_auto(doc)
        for msg in problems:
            log(f"WARNING: {msg}")
        for z in doc["zoos"].values():
            z["summary"] = summarise("", z["targets"], doc["ground_truth"])
        doc["notes"] = sorted({n for z in doc["zoos"].values() for r in z["targets"] for n in r["notes"]})
        md = markdown(doc)
        prev = args.out / "rank_zoo.md"
        if prev.is_file() and "\n## Notes" in prev.read_text():  # keep the hand-written notes of the old file
            generated = set(md[md.index("\n## Notes"):].splitlines())
            kept = [ln for ln in prev.read_text().split("\n## Notes", 1)[1].splitlines() if ln not in generated]
            md = md.rstrip("\n") + "\n" + "\n".join(ln for ln in kept if ln.strip()) + "\n"
        write_json(args.out / "rank_zoo.json", doc)
        write_text(args.out / "rank_zoo.md", md)
        print(md)
        return
    if args.quick:
        args.image_targets = ",".join(args.image_targets.split(",")[:2])
        args.text_targets = ",".join(args.text_targets.split(",")[:2])
        args.image_per_class, args.text_per_class, args.epochs, args.checkpoints = 10, 30, 1, min(args.checkpoints, 2)
        args.ckpt_per_class = 50
    args.ground_truth = [g.strip() for g in args.ground_truth.split(",") if g.strip()]
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    from transferkit.io import write_json, write_text

    t_start = time.perf_counter()
    doc = {"command": "OMP_NUM_THREADS=" + os.environ.get("OMP_NUM_THREADS", "?") + " .venv/bin/python benchmarks/rank_zoo.py "
                      + " ".join(sys.argv[1:]),
           "machine": f"{os.cpu_count()} CPU cores (shared), torch threads {torch.get_num_threads()}",
           "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
           "ground_truth": args.ground_truth, "zoos": {}, "notes": []}
    zoos = [z.strip() for z in args.zoos.split(",") if z.strip()]
    ft = {"epochs": args.epochs, "batch_size": 16, "scheduler": "constant", "warmup_ratio": 0.0}
    for zoo in zoos:
        if zoo == "image":
            models = {n: image_model(n, args.image_size) for n in IMAGE_MODELS}
            targets, pc, lrs = args.image_targets.split(","), args.image_per_class, [float(x) for x in args.image_lrs.split(",")]
        else:
            models = {n: text_model(n, args.max_length) for n in TEXT_MODELS}
            models.update(build_checkpoints(args))
            targets, pc, lrs = args.text_targets.split(","), args.text_per_class, [float(x) for x in args.text_lrs.split(",")]
        results = []
        for t in targets:
            results.append(run_target(t, models, args, pc, {**ft, "batch_size": 8} if zoo == "text" else ft, lrs))
            doc["zoos"][zoo] = {"models": list(models), "targets": results,
                                "summary": summarise(zoo, results, args.ground_truth),
                                "checkpoints": {n: m.meta.get("checkpoint") for n, m in models.items() if m.meta.get("checkpoint")}}
            doc["seconds_total"] = time.perf_counter() - t_start
            write_json(args.out / "rank_zoo.json", doc)  # partial results survive an interruption
        s = doc["zoos"][zoo]["summary"]
        for proto in args.ground_truth:
            print(f"\n{zoo} zoo — mean weighted tau vs {proto} ground truth")
            for k, v in sorted(s[proto].items(), key=lambda kv: -(kv[1]["mean_tau_w"] if kv[1]["mean_tau_w"] is not None else -9)):
                print(f"  {k:18s} " + "  ".join(fmt(x) for x in v["per_target"].values()) + f"   mean {fmt(v['mean_tau_w'])}")
            best = best_single(s[proto])
            print("  " + ", ".join(f"{row} {fmt(s[proto][row]['mean_tau_w'])}" for row in AUTO_ROWS if row in s[proto])
                  + (f" vs best single metric {best} {fmt(s[proto][best]['mean_tau_w'])}" if best else ""))
    doc["seconds_total"] = time.perf_counter() - t_start
    doc["notes"] = sorted({n for z in doc["zoos"].values() for r in z["targets"] for n in r["notes"]})
    write_json(args.out / "rank_zoo.json", doc)
    write_text(args.out / "rank_zoo.md", markdown(doc))
    log(f"done in {doc['seconds_total']:.0f} s; wrote {args.out / 'rank_zoo.json'} and rank_zoo.md")


if __name__ == "__main__":
    main()
