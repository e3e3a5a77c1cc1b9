"""Benchmark the out-of-core merge (transferkit.merge.streaming) on 110M-parameter checkpoints.

    .venv/bin/python benchmarks/merge_streaming.py [--n-models 2] [--methods average,task_arithmetic,ties,dare_linear]
                                                   [--mergekit /tmp/mk/bin] [--threads 1] [--verify]

Checkpoints: the all-mpnet-base-v2 body (``transferkit.zoo.load_model``, 110M parameters, float32)
as the base, and ``--n-models`` fake fine-tunes made by adding seeded Gaussian noise (σ = 1e-3) to
every float tensor (no real fine-tunes of it are available offline). If the model cannot be loaded,
a generated 110M-parameter checkpoint of BERT-base shapes is used instead (``--synthetic`` forces it).

Each merge runs in a fresh subprocess; its peak RSS is the child's own ``VmHWM`` (from
``/proc/self/status``; ``ru_maxrss`` would survive fork+exec from this big parent) and is reported raw, minus the peak of a subprocess that only imports the same
modules (the interpreter baseline), and as a ratio of that difference to one checkpoint's size.
mergekit (a separate venv, ``pip install mergekit``; never imported here) runs side by side on the
same files with ``mergekit-pytorch`` for the methods both have (linear, task_arithmetic, ties, dare_linear), with the same
thread count (``OMP_NUM_THREADS``). Results: ``benchmarks/results/merge_streaming.json``.

Method parameters, identical for both tools: linear/average uniform weights; task_arithmetic λ = 1
per model (mergekit ``weight: 1``); ties k = 0.2 (mergekit ``density: 0.2``) per tensor, disjoint mean,
λ = 1; dare_linear p = 0.9 (mergekit ``density: 0.1``; mergekit rescales by the L1 norm, not exactly
1/(1−p), so its DARE output differs by design).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
SIGMA = 1e-3


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def make_checkpoints(work: Path, n_models: int, synthetic: bool) -> dict:
    import torch
    from safetensors.torch import save_file

    work.mkdir(parents=True, exist_ok=True)
    info_path = work / "checkpoints.json"
    if info_path.exists():
        info = json.loads(info_path.read_text())
        if info["n_models"] >= n_models and info["synthetic"] == synthetic:
            return info
    source = "synthetic BERT-base shapes"
    state = None
    if not synthetic:
        try:
            from transferkit.zoo import load_model

            zm = load_model("all-mpnet-base-v2")
            state = {k: v.detach().clone().contiguous() for k, v in zm.backbone.state_dict().items()}
            source = "all-mpnet-base-v2 (transferkit.zoo) + Gaussian perturbations"
        except Exception as exc:  # no asset offline: fall back to generated weights
            _log(f"all-mpnet-base-v2 unavailable ({type(exc).__name__}: {exc}); using synthetic weights")
    if state is None:
        g = torch.Generator().manual_seed(0)
        state = {"embeddings.word_embeddings.weight": torch.randn(30527, 768, generator=g) * 0.02,
                 "embeddings.position_ids": torch.arange(514).unsqueeze(0)}
        for i in range(12):
            p = f"encoder.layer.{i}."
            for name, shape in (("attention.q.weight", (768, 768)), ("attention.k.weight", (768, 768)),
                                ("attention.v.weight", (768, 768)), ("attention.o.weight", (768, 768)),
                                ("intermediate.dense.weight", (3072, 768)), ("output.dense.weight", (768, 3072)),
                                ("output.LayerNorm.weight", (768,)), ("output.LayerNorm.bias", (768,))):
                state[p + name] = torch.randn(*shape, generator=g) * 0.02
    save_file(state, str(work / "base.safetensors"))
    n_params = sum(v.numel() for v in state.values() if v.is_floating_point())
    for j in range(n_models):
        g = torch.Generator().manual_seed(100 + j)
        ft = {k: (v + SIGMA * torch.randn(v.shape, generator=g)) if v.is_floating_point() else v
              for k, v in state.items()}
        save_file(ft, str(work / f"ft{j}.safetensors"))
        del ft
    info = {"source": source, "n_models": n_models, "synthetic": state is None or synthetic,
            "n_params": n_params, "n_tensors": len(state),
            "checkpoint_bytes": (work / "base.safetensors").stat().st_size}
    info_path.write_text(json.dumps(info, indent=2))
    return info


def run_measured(cmd: list[str], env: dict, timeout: float = 3600) -> tuple[float, int, int, str]:
    """(wall seconds, peak RSS bytes of the child, return code, tail of stderr)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    wall = time.perf_counter() - t0
    # The child prints its own peak, VmHWM from /proc/self/status (KiB). Not ru_maxrss: that survives
    # fork+exec, so a child of a big parent would report the parent's peak.
    peak = 0
    for line in reversed(out.strip().splitlines()):
        if line.startswith("PEAK_KB "):
            peak = int(line.split()[1]) * 1024
            break
    return wall, peak, proc.returncode, err[-2000:]


_TK_SNIPPET = """
import json, sys, time
import torch
from transferkit.merge.streaming import stream_merge
args = json.loads(sys.argv[1])
if args.get("method"):
    t = time.perf_counter()
    res = stream_merge(args["base"], args["models"], args["out"], args["method"], **args["params"])
    print("MERGE_S", time.perf_counter() - t, res.passes)
print("PEAK_KB", [l.split()[1] for l in open("/proc/self/status") if l.startswith("VmHWM")][0])
"""

# mergekit's CLI runs in its own interpreter; report that interpreter's peak with a wrapper that
# execs the entry point in-process and prints ru_maxrss at exit.
_MK_SNIPPET = """
import atexit, runpy, sys
atexit.register(lambda: print("PEAK_KB", [l.split()[1] for l in open("/proc/self/status") if l.startswith("VmHWM")][0],
                              flush=True))
entry = sys.argv[1]
sys.argv = [entry] + sys.argv[2:]
if entry == "--baseline":
    import torch, mergekit  # noqa: F401
else:
    from importlib.metadata import entry_points
    ep = [e for e in entry_points(group="console_scripts") if e.name == entry][0]
    try:
        ep.load()()
    except SystemExit as exc:
        if exc.code not in (0, None):
            raise
"""

MK_METHOD = {"average": "linear", "task_arithmetic": "task_arithmetic", "ties": "ties", "dare_linear": "dare_linear"}


def mergekit_config(method: str, n_models: int, work: Path) -> str:
    lines = [f"merge_method: {MK_METHOD[method]}"]
    if method != "average":
        lines.append(f"base_model: {work / 'base.safetensors'}")
    lines.append("models:")
    for j in range(n_models):
        params = {"average": "weight: 1.0", "task_arithmetic": "weight: 1.0",
                  "ties": "weight: 1.0, density: 0.2", "dare_linear": "weight: 1.0, density: 0.1"}[method]
        lines += [f"  - model: {work / f'ft{j}.safetensors'}", f"    parameters: {{{params}}}"]
    if method == "ties":
        lines.append("parameters: {normalize: true}")
    lines.append("dtype: float32")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default="/tmp/tk-merge-bench")
    ap.add_argument("--n-models", type=int, default=2)
    ap.add_argument("--methods", default="average,task_arithmetic,ties,dare_linear")
    ap.add_argument("--mergekit", default="/tmp/mk/bin", help="bin folder of a venv with mergekit installed")
    ap.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS for every merge (both tools)")
    ap.add_argument("--synthetic", action="store_true")
    ap.add_argument("--verify", action="store_true", help="compare task_arithmetic with the in-memory merge")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "merge_streaming.json"))
    args = ap.parse_args()

    work = Path(args.work)
    info = make_checkpoints(work, args.n_models, args.synthetic)
    ckpt = info["checkpoint_bytes"]
    _log(f"checkpoints: {info['source']}, {info['n_params'] / 1e6:.1f}M params, {ckpt / 2**20:.0f} MiB each")
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               PYTHONPATH=str(ROOT / "src"))
    py = sys.executable
    models = [str(work / f"ft{j}.safetensors") for j in range(args.n_models)]
    results: dict = {"checkpoints": info, "threads": args.threads, "host": platform.platform(),
                     "cpu_count": os.cpu_count(), "load_avg_start": os.getloadavg(), "transferkit": {}, "mergekit": {}}

    _, base_peak, rc, err = run_measured([py, "-c", _TK_SNIPPET, json.dumps({})], env)
    results["transferkit_baseline_peak_bytes"] = base_peak
    params = {"average": {}, "task_arithmetic": {"lam": 1.0}, "ties": {"k": 0.2, "scope": "per_tensor"},
              "dare_linear": {"p": 0.9, "seed": 0, "lam": 1.0}}
    for method in args.methods.split(","):
        out = work / f"tk-{method}"
        spec = {"base": str(work / "base.safetensors"), "models": models, "out": str(out), "method": method,
                "params": params.get(method, {})}
        wall, peak, rc, err = run_measured([py, "-c", _TK_SNIPPET, json.dumps(spec)], env)
        row = {"wall_s": round(wall, 2), "peak_rss_bytes": peak, "peak_above_baseline_bytes": peak - base_peak,
               "peak_above_baseline_over_checkpoint": round((peak - base_peak) / ckpt, 3), "rc": rc}
        if rc != 0:
            row["error"] = err
        results["transferkit"][method] = row
        _log(f"transferkit {method}: {row}")
        if args.verify and method == "task_arithmetic" and rc == 0:
            results["verify_task_arithmetic_max_abs_diff"] = _verify(work, models, out)

    mk_bin = Path(args.mergekit)
    mk_py = mk_bin / "python"
    if not (mk_bin / "mergekit-pytorch").exists():
        results["mergekit"] = {"status": f"not run: no mergekit-pytorch in {mk_bin} "
                                         "(python3 -m venv /tmp/mk && /tmp/mk/bin/pip install mergekit)"}
    else:
        mk_env = dict(env)
        mk_env.pop("PYTHONPATH", None)
        _, mk_base, rc, err = run_measured([str(mk_py), "-c", _MK_SNIPPET, "--baseline"], mk_env)
        results["mergekit_baseline_peak_bytes"] = mk_base
        try:
            version = subprocess.run([str(mk_py), "-c", "import importlib.metadata as m; print(m.version('mergekit'))"],
                                     capture_output=True, text=True).stdout.strip()
        except OSError:
            version = "?"
        results["mergekit_version"] = version
        for method in args.methods.split(","):
            if method not in MK_METHOD:
                continue
            cfg = work / f"mk-{method}.yml"
            cfg.write_text(mergekit_config(method, args.n_models, work))
            out = work / f"mk-{method}"
            shutil.rmtree(out, ignore_errors=True)
            cmd = [str(mk_py), "-c", _MK_SNIPPET, "mergekit-pytorch", str(cfg), str(out), "--lazy-unpickle", "--quiet"]
            wall, peak, rc, err = run_measured(cmd, mk_env)
            if rc != 0 and "--lazy-unpickle" in err:
                cmd.remove("--lazy-unpickle")
                wall, peak, rc, err = run_measured(cmd, mk_env)
            row = {"wall_s": round(wall, 2), "peak_rss_bytes": peak, "peak_above_baseline_bytes": peak - mk_base,
                   "peak_above_baseline_over_checkpoint": round((peak - mk_base) / ckpt, 3), "rc": rc,
                   "command": " ".join(cmd[3:])}
            if rc != 0:
                row["error"] = err
            elif (work / f"tk-{method}").exists():
                row["max_abs_diff_vs_transferkit"] = _max_diff(work / f"tk-{method}", out)
            results["mergekit"][method] = row
            _log(f"mergekit {method}: {row}")
            shutil.rmtree(out, ignore_errors=True)
    for method in args.methods.split(","):
        shutil.rmtree(work / f"tk-{method}", ignore_errors=True)
    results["load_avg_end"] = os.getloadavg()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    from transferkit.io import write_json

    write_json(args.out, results)
    print(json.dumps(results, indent=2))


def _max_diff(a: Path, b: Path) -> float | str:
    """Largest |a − b| over the float tensors of two checkpoints, read one tensor at a time."""
    from transferkit.merge.streaming import Checkpoint

    ca, cb = Checkpoint(a), Checkpoint(b)
    if set(ca.info) != set(cb.info):
        return f"different tensor names: {sorted(set(ca.info) ^ set(cb.info))[:3]}"
    diff = 0.0
    for k in ca.info:
        x, y = ca.get(k), cb.get(k)
        if x.is_floating_point() and x.numel():
            diff = max(diff, float((x.double() - y.double()).abs().max()))
    return diff


def _verify(work: Path, models: list[str], out: Path) -> float:
    import torch
    from safetensors.torch import load_file

    from transferkit.delta import from_states
    from transferkit.merge import task_arithmetic
    from transferkit.merge.streaming import load_merged

    base = load_file(str(work / "base.safetensors"))
    deltas = [from_states(base, load_file(m), base_name="b") for m in models]
    merged = task_arithmetic(deltas, 1.0)
    got = load_merged(out)
    diff = 0.0
    for k, v in base.items():
        want = v + merged.tensors[k] if k in merged.tensors else v
        diff = max(diff, float((got[k].double() - want.double()).abs().max()) if v.numel() else 0.0)
    del base, deltas, merged, got
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return diff


if __name__ == "__main__":
    main()
