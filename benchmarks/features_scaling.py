"""Feature extraction scaling: time and peak memory for N, 2N, 4N; cache hit vs miss.

Each measurement runs in a fresh subprocess so peak RSS (``VmHWM``) belongs to that run alone.
"Extra peak" is the peak RSS (VmHWM) during extraction minus the RSS just before it (model and data
already loaded): memory flat in N means it stays about constant while N grows.

    .venv/bin/python benchmarks/features_scaling.py            # full table
    .venv/bin/python benchmarks/features_scaling.py --quick    # smaller N

Writes benchmarks/results/features_scaling.json and .md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

CASES = {  # model, dataset, base N
    "image": ("mobilenet-v2", "fashion-mnist", 256),
    "text": ("all-minilm-l6-v2", "vader:movies", 512),
}

CHILD = r"""
import json, shutil, sys, time, psutil
from transferkit.data import load_dataset
from transferkit.features import cache_path, extract, fingerprint
from transferkit.zoo import load_model
model, data, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
ds = load_dataset(data, limit=n, seed=0)
zm = load_model(model)
zm.encode(zm.preprocess(ds.X[:8]))  # warm up
shutil.rmtree(cache_path(fingerprint(zm, ds, "penultimate"), zm.name), ignore_errors=True)  # force a miss
rss0 = psutil.Process().memory_info().rss
t0 = time.perf_counter(); extract(zm, ds, progress=False); miss = time.perf_counter() - t0
# VmHWM is this process's own high-water mark (ru_maxrss would include the parent's at fork)
peak = int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) * 1024
t0 = time.perf_counter(); extract(zm, ds, progress=False); hit = time.perf_counter() - t0
print(json.dumps({"n": len(ds), "miss_s": miss, "hit_s": hit, "extra_peak_mb": max(0, peak - rss0) / 2**20,
                  "peak_mb": peak / 2**20}))
"""


def measure(model: str, data: str, n: int) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, model, data, str(n)], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    rows = []
    for modality, (model, data, n0) in CASES.items():
        n0 = n0 // 4 if args.quick else n0
        base = None
        for mult in (1, 2, 4):
            r = measure(model, data, n0 * mult)
            base = base or r
            rows.append({"modality": modality, "model": model, "data": data, **r,
                         "time_ratio": r["miss_s"] / base["miss_s"], "n_ratio": mult})
    print(f"{'model':18s} {'N':>5s} {'miss s':>8s} {'hit s':>7s} {'t/t(N)':>7s} {'extra peak MB':>14s} {'peak MB':>8s}")
    for r in rows:
        print(f"{r['model']:18s} {r['n']:5d} {r['miss_s']:8.2f} {r['hit_s']:7.3f} {r['time_ratio']:7.2f} "
              f"{r['extra_peak_mb']:14.1f} {r['peak_mb']:8.0f}")
    res = Path(__file__).parent / "results"
    res.mkdir(exist_ok=True)
    (res / "features_scaling.json").write_text(json.dumps(rows, indent=2) + "\n")
    md = ["| model | N | miss (s) | hit (s) | time ÷ time(N) | extra peak RSS (MB) | peak RSS (MB) |", "|---|---|---|---|---|---|---|"]
    md += [f"| {r['model']} | {r['n']} | {r['miss_s']:.2f} | {r['hit_s']:.3f} | {r['time_ratio']:.2f} | {r['extra_peak_mb']:.1f} | {r['peak_mb']:.0f} |" for r in rows]
    (res / "features_scaling.md").write_text("\n".join(md) + "\n")


if __name__ == "__main__":
    main()
