"""Speed of transferability estimation: metrics at N=2000, D=1280, LogME vs thuml/LogME, ranking vs fine-tuning.

Three measurements, side by side in one run:

1. **All per-model metrics for one model** on N = 2000 samples, D = 1280 features (class-conditional
   Gaussians, 10 classes, plus 1000-way source-head probabilities for LEEP/NCE), excluding feature
   extraction: seconds per metric and the total (best of ``--repeats``).
2. **LogME vs the public reference** (thuml/LogME ``LogME.py``, MIT, *not* vendored: pass its
   checkout with ``--thuml DIR``; it needs numba, e.g. ``pip install --target /tmp/thuml_deps numba`` and
   ``--thuml-pythonpath /tmp/thuml_deps``). It runs in a subprocess on the same arrays with the same thread
   count; values must agree within 1e-6 for N ≥ D (for N < D they differ by design: the reference omits
   (D − k)·log α, thuml/LogME issue #23). Timings exclude the reference's numba JIT warm-up (done at import).
3. **Whole-zoo ranking vs fine-tuning every candidate**, from ``benchmarks/results/rank_zoo.json``:
   ranking cost = feature extraction + scoring (LogME alone, and all metrics); fine-tuning cost =
   the measured ground-truth fine-tuning runs (every lr of the grid) of every candidate.

    git clone https://github.com/thuml/LogME /tmp/thuml_logme   # or any checkout holding LogME.py
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/rank_speed.py --thuml /tmp/thuml_logme \
        --thuml-pythonpath /tmp/thuml_deps

Writes rank_speed.json and rank_speed.md to ``--out`` (default benchmarks/results). The pass is timed
twice per repeat, interleaved: sequential (``workers=1``) and concurrent (``--workers``, default 2: what
``rank_features`` does by default on ≥ 2 cores); each reports CPU and wall seconds, with the load
average before and after, since wall seconds mean little on a loaded machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

CHILD = r"""
import json, sys, time
import numpy as np
sys.path.insert(0, sys.argv[1])
from LogME import LogME          # the public reference; its numba JIT warm-up runs at import
out = []
for path in sys.argv[2:]:
    d = np.load(path)
    f, y = d["X"], d["y"]
    best, val = float("inf"), None
    for _ in range(int(d["repeats"])):
        t0 = time.perf_counter()
        val = LogME(regression=False).fit(f, y)
        best = min(best, time.perf_counter() - t0)
    out.append({"value": float(val), "seconds": best})
print(json.dumps(out))
"""


def gaussian(n: int, d: int, c: int, seed: int, sep: float = 1.0):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % c
    rng.shuffle(y)
    means = rng.normal(size=(c, d)) * sep / np.sqrt(min(d, 64))
    X = rng.normal(size=(n, d)) + means[y] * np.sqrt(min(d, 64))
    logits = rng.normal(size=(n, 1000))
    logits[np.arange(n), y * 7] += 4.0  # a source head that partly predicts the target
    P = np.exp(logits - logits.max(1, keepdims=True))
    return X.astype(np.float32), y, P / P.sum(1, keepdims=True)


def _clock():
    return time.perf_counter(), time.process_time()


def _since(t):
    return time.perf_counter() - t[0], time.process_time() - t[1]


def time_metrics(X, y, P, repeats: int, workers: int) -> dict:
    """CPU s per metric called on its own, and per metric / whole pass of ``rank_features`` (sequential and concurrent).

    The pass is what ``transferkit rank`` runs: inputs validated once, and the centred
    eigendecomposition / PCA computed once and shared (charged to the first metric that needs it).
    ``seq``: ``workers=1``, per-metric wall seconds; ``con``: ``workers`` threads (the default on
    ≥ 2 cores), per-metric CPU seconds of the worker thread. For each pass mode the whole pass's CPU
    seconds (``time.process_time``, all threads of the process: the contention-robust number on a
    shared machine) and wall seconds are the best of ``repeats`` each; the per-metric times come from
    the run with the least CPU.
    """
    from transferkit.features import Features
    from transferkit.rank import METRICS, rank_features

    alone = {}
    for name, m in METRICS.items():
        best = (float("inf"), float("inf"))
        for _ in range(repeats):
            t = _clock()
            m(X, y, probs=P if "probs" in m.needs else None, seed=0)
            best = min(best, _since(t), key=lambda wc: wc[1])
        alone[name] = best
    feats = {"model": Features(X=X, y=y, probs=P)}
    out = {"alone": alone}
    modes = {"seq": 1, "con": workers} if workers > 1 else {"seq": 1}
    runs: dict[str, list] = {k: [] for k in modes}
    for _ in range(repeats):  # interleaved, so both modes see the same machine load
        for mode, w in modes.items():
            t = _clock()
            res = rank_features(feats, "all", seed=0, workers=w)
            wall, cpu = _since(t)
            runs[mode].append((wall, cpu, {k: v["model"] for k, v in res["time_s"].items()}))
    for mode, rs in runs.items():
        best_cpu = min(rs, key=lambda r: r[1])
        out[mode] = {"workers": modes[mode], "wall_s": min(r[0] for r in rs), "cpu_s": best_cpu[1],
                     "per_metric_s": best_cpu[2], "runs_wall_cpu_s": [[r[0], r[1]] for r in rs]}
    return out


def logme_side_by_side(cases, thuml: Path | None, pythonpath: str | None, repeats: int) -> list[dict]:
    from transferkit.rank import logme

    rows = []
    for n, d, seed in cases:
        X, y, _ = gaussian(n, d, 10, seed)
        f64 = X.astype(np.float64)
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            ours = logme(f64, y)
            best = min(best, time.perf_counter() - t0)
        rows.append({"N": n, "D": d, "ours": ours, "ours_seconds": best,
                     "ours_unpadded": logme(f64, y, pad_logdet=False)})
    if thuml is None:
        return rows
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i, (n, d, seed) in enumerate(cases):
            X, y, _ = gaussian(n, d, 10, seed)
            p = Path(tmp) / f"case{i}.npz"
            np.savez(p, X=X.astype(np.float64), y=y, repeats=repeats)
            paths.append(str(p))
        env = dict(os.environ)
        if pythonpath:
            env["PYTHONPATH"] = pythonpath + os.pathsep + env.get("PYTHONPATH", "")
        proc = subprocess.run([sys.executable, "-c", CHILD, str(thuml), *paths], capture_output=True, text=True, env=env,
                              check=False)
        if proc.returncode != 0:
            raise SystemExit(f"thuml/LogME failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr else proc.returncode}")
        ref = json.loads(proc.stdout.strip().splitlines()[-1])
    for row, r in zip(rows, ref):
        row.update({"thuml": r["value"], "thuml_seconds": r["seconds"], "abs_diff": abs(row["ours"] - r["value"]),
                    "abs_diff_unpadded": abs(row["ours_unpadded"] - r["value"])})
    return rows


def real_features(args):
    """Real (N, D) features: the zoo model's penultimate layer on ``N / 10`` images per class of the dataset (cached)."""
    from transferkit.data import load_dataset
    from transferkit.features import extract

    f = extract(args.real, load_dataset(args.real_data, per_class=args.n // 10, seed=0), progress=False)
    if f.probs is None:
        raise SystemExit(f"{args.real} gives no source-head probabilities; choose a classifier")
    return f.X.astype(np.float64), f.y, f.probs.astype(np.float64)


def zoo_costs(path: Path) -> dict | None:
    if not path.is_file():
        return None
    doc = json.loads(path.read_text())
    out = {}
    for zoo, z in doc["zoos"].items():
        feat = sum(sum(t["seconds"]["features"].values()) for t in z["targets"])
        logme_s = sum(t["seconds"]["metrics"].get("logme", 0.0) for t in z["targets"])
        per_model = [k for k in z["targets"][0]["seconds"]["metrics"] if not k.startswith("auto")]  # auto rows re-sum members
        all_s = sum(sum(t["seconds"]["metrics"][k] for k in per_model) for t in z["targets"])
        ft = sum(sum(t["seconds"]["ground_truth"]["finetune"].values()) for t in z["targets"])
        lin = sum(sum(t["seconds"]["ground_truth"]["linear"].values()) for t in z["targets"])
        n_models, n_targets = len(z["models"]), len(z["targets"])
        out[zoo] = {"models": n_models, "targets": n_targets, "features_s": feat, "logme_s": logme_s,
                    "all_metrics_s": all_s, "finetune_s": ft, "linear_probe_s": lin,
                    "ratio_logme": ft / (feat + logme_s) if feat + logme_s > 0 else None,
                    "ratio_all_metrics": ft / (feat + all_s) if feat + all_s > 0 else None,
                    "ratio_logme_scoring_only": ft / logme_s if logme_s > 0 else None}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--d", type=int, default=1280)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--thuml", type=Path, default=None, help="directory holding thuml/LogME's LogME.py")
    ap.add_argument("--thuml-pythonpath", default=None, help="extra PYTHONPATH for the reference (numba)")
    ap.add_argument("--real", default="mobilenet-v2", help="zoo model for the real-features case ('' skips it)")
    ap.add_argument("--real-data", default="fashion-mnist")
    ap.add_argument("--zoo", type=Path, default=ROOT / "benchmarks" / "results" / "rank_zoo.json")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results",
                    help="directory for rank_speed.json / rank_speed.md (e.g. /tmp for trial runs)")
    ap.add_argument("--workers", type=int, default=2,
                    help="threads of the concurrent pass timed next to the sequential one (1: sequential only)")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    from transferkit.io import write_json, write_text

    X, y, P = gaussian(args.n, args.d, 10, 0)
    from transferkit.rank import logme

    logme(X[:50], y[:50])  # warm imports
    cases_m = {f"synthetic Gaussians, 10 classes (N = {args.n}, D = {args.d})": (X, y, P)}
    if args.real:
        cases_m[f"{args.real} penultimate features on {args.real_data} ({args.n // 10} per class)"] = real_features(args)
    load0 = os.getloadavg()
    timings = {name: time_metrics(*c, args.repeats, args.workers) for name, c in cases_m.items()}
    load1 = os.getloadavg()
    threads = os.environ.get("OMP_NUM_THREADS", "?")
    cases = [(args.n, args.d, 0), (1000, 64, 1), (2000, 512, 2), (200, 512, 3), (100, 2048, 4)]
    side = logme_side_by_side(cases, args.thuml, args.thuml_pythonpath, args.repeats)
    zoo = zoo_costs(args.zoo)
    from transferkit.rank import available_cores

    doc = {"command": f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '?')} .venv/bin/python benchmarks/rank_speed.py "
                      + " ".join(sys.argv[1:]),
           "machine": f"{os.cpu_count()} CPU cores, {available_cores()} usable (shared with other jobs; 1/5/15-min load "
                      f"average {' '.join(f'{v:.2f}' for v in load0)} before the metric timings, "
                      f"{' '.join(f'{v:.2f}' for v in load1)} after), OMP_NUM_THREADS={threads}",
           "loadavg_before": list(load0), "loadavg_after": list(load1),
           "N": args.n, "D": args.d,
           "metrics": {name: {"alone_wall_cpu_s": t["alone"], "total_alone_wall_cpu_s":
                              [sum(v[0] for v in t["alone"].values()), sum(v[1] for v in t["alone"].values())],
                              **{mode: t[mode] for mode in ("seq", "con") if mode in t}}
                       for name, t in timings.items()},
           "logme_vs_thuml": side, "zoo_costs": zoo}
    write_json(args.out / "rank_speed.json", doc)

    con = args.workers > 1
    lines = ["# rank_speed", "", f"Command: `{doc['command']}`", "", f"Machine: {doc['machine']}.", "",
             f"## All per-model metrics, one model, N = {args.n}, D = {args.d} (best of {args.repeats})", "",
             "`alone`: each metric called on its own (validation and every decomposition included), CPU seconds. "
             "`seq`: `rank_features(..., \"all\", workers=1)` — inputs validated once, the centred "
             "eigendecomposition / PCA computed once and charged to the first metric that uses it; per-metric wall seconds. "
             + (f"`con`: the same pass on {args.workers} worker threads (the default on ≥ 2 cores, what `transferkit rank` runs), "
                "BLAS limited to one thread per worker; per-metric CPU seconds of the worker thread. " if con else "")
             + "Totals: the whole pass's CPU seconds (`time.process_time()` of the process, all threads: robust to other jobs "
             "on the machine) and wall seconds (not robust to them: compare with the load average).", ""]
    names = list(timings)
    cols = ["alone CPU s", "seq s"] + (["con CPU s"] if con else [])
    lines += ["| metric | " + " | ".join(f"{n}: {c}" for n in names for c in cols) + " |",
              "|---|" + "---|" * (len(cols) * len(names))]
    first = timings[names[0]]["alone"]
    for k in sorted(first, key=lambda m: -first[m][1]):
        cells = []
        for t in timings.values():
            cells += [f"{t['alone'][k][1]:.3f}", f"{t['seq']['per_metric_s'].get(k, float('nan')):.3f}"]
            if con:
                cells.append(f"{t['con']['per_metric_s'].get(k, float('nan')):.3f}")
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    cells = []
    for t in timings.values():
        cells += [f"**{sum(v[1] for v in t['alone'].values()):.2f}**",
                  f"**{t['seq']['cpu_s']:.2f} CPU s, {t['seq']['wall_s']:.2f} wall s**"]
        if con:
            cells.append(f"**{t['con']['cpu_s']:.2f} CPU s, {t['con']['wall_s']:.2f} wall s**")
    lines += ["| **total** | " + " | ".join(cells) + " |", "", "## LogME vs thuml/LogME (same arrays, same process settings)", "",
              "| N | D | ours | thuml | abs diff | ours s | thuml s | ours without the (D−k)·log α term |", "|---|---|---|---|---|---|---|---|"]
    for r in side:
        lines.append(f"| {r['N']} | {r['D']} | {r['ours']:.8f} | {r.get('thuml', float('nan')):.8f} | "
                     f"{r.get('abs_diff', float('nan')):.2e} | {r['ours_seconds']:.4f} | {r.get('thuml_seconds', float('nan')):.4f} | "
                     f"{r['ours_unpadded']:.6f} |")
    if zoo:
        lines += ["", "## Whole-zoo ranking vs fine-tuning every candidate (timings of rank_zoo)", "",
                  "| zoo | models × targets | features s | LogME s | all metrics s | fine-tuning s | ratio (features+LogME) | ratio (features+all) |",
                  "|---|---|---|---|---|---|---|---|"]
        for name, z in zoo.items():
            lines.append(f"| {name} | {z['models']} × {z['targets']} | {z['features_s']:.1f} | {z['logme_s']:.2f} | "
                         f"{z['all_metrics_s']:.1f} | {z['finetune_s']:.0f} | {z['ratio_logme']:.0f}× | {z['ratio_all_metrics']:.1f}× |")
    write_text(args.out / "rank_speed.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
