"""Hinton KD in transferkit vs torchdistill, side by side: same teacher, student, data, epochs and seeds.

Setup (once, in ``--work``): a stratified ``--limit`` sample of ``--data`` split by
``transferkit.data.split.make_split`` (seed 0; the dataset's official test items in the sample are the test
set, or 20 % when it has none), and the teacher: the
``digits-mnist`` CNN fine-tuned on the training part (``transferkit tune``, method full, 2 epochs, lr 1e-3).
The student is the smaller ``digits-usps`` CNN with a new head. Every side distils for ``--epochs`` epochs
with T = 4, α = 0.1 (α·CE + (1 − α)·T²·KL), batch 32, AdamW lr 1e-3 without weight decay, a linear decay
and gradient clipping at norm 1.0, on the same training items (transferkit's 90 % fit part; the other 10 %
is its validation part, which transferkit scores after each epoch) and scores the test set only.

- ``transferkit`` (cached): ``transferkit.distill.distill(method="kd")``, the teacher's logits computed
  once over the training data;
- ``transferkit-live``: the same with ``cache: false`` (the teacher runs on every batch);
- ``torchdistill``: torchdistill's ``KDLoss`` on logits captured by its ``ForwardHookManager`` (teacher and
  student heads), in a plain torch loop with the same optimiser, schedule, clipping and batch size, the
  teacher in eval mode under ``no_grad`` on every batch. torchdistill is installed into a separate venv
  made here (``--work/tdvenv``, ``pip install --no-deps torchdistill==1.1.5``; it sees the project's torch
  through a ``.pth`` file, so no other torch is pulled); it is never a dependency of transferkit.
  Its YAML ``DistillationBox`` is not used: the loss and hooks are torchdistill's, the loop is ours.
  torchvision is not installed (PyPI has no build for the project's CPU torch), so the package
  ``torchdistill.core`` is registered without running its ``__init__`` (which imports torchdistill's model
  zoo); ``forward_hook.py`` and ``losses/mid_level.py`` are imported unchanged.

Each (side, seed) runs in its own process, sides interleaved per seed. Memory: the process's peak RSS
(data and model loading included, the same for every side) and the rise of RSS during the distillation
(``transferkit.runtime.PeakMemory``: sampled peak over the RSS at its start). Time per epoch = the
distillation's wall time (teacher-logit pass included) / epochs. Accuracy: mean ± standard error over the seeds.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/distill_kd.py        # ~5 min at one thread

Writes benchmarks/results/distill_kd.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
TORCHDISTILL = "torchdistill==1.1.5"
T, ALPHA, LR, BATCH = 4.0, 0.1, 1e-3, 32
SIDES = ("transferkit", "transferkit-live", "torchdistill")


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _data(work: Path):
    from transferkit.data.split import held_out, read_split

    return held_out(read_split(work / "teacher"))


def worker_transferkit(work: Path, seed: int, epochs: int, cache: bool) -> dict:
    from transferkit.distill import distill

    from transferkit.runtime import PeakMemory

    train, test = _data(work)
    t0 = time.perf_counter()
    with PeakMemory() as mem:
        res = distill([str(work / "teacher")], "digits-usps", train, test, method="kd",
                      config={"epochs": epochs, "seed": seed, "temperature": T, "alpha": ALPHA, "lr": LR,
                              "batch_size": BATCH, "cache": cache})
    seconds = time.perf_counter() - t0
    m = res.metrics
    return {"accuracy": m["test_accuracy"], "n_test": m["n_test"], "n_train": len(train),
            "distill_s": m["cache_s"] + m["train_s"], "total_s": seconds, "peak_rss_mb": _peak_mb(),
            "distill_rss_rise_mb": mem.as_dict()["delta_rss_mb"]}


def worker_torchdistill(work: Path, seed: int, epochs: int) -> dict:
    import types

    import numpy as np
    import torch
    import torchdistill

    # torchdistill.core's __init__ imports its model zoo, hence torchvision, which has no PyPI build for the
    # project's CPU torch: register the package without running that __init__ and import the hook module as is
    core = types.ModuleType("torchdistill.core")
    core.__path__ = [str(Path(torchdistill.__file__).parent / "core")]
    sys.modules["torchdistill.core"] = core
    from torchdistill.core.forward_hook import ForwardHookManager
    from torchdistill.losses.mid_level import KDLoss

    from transferkit.distill import load_net
    from transferkit.distill._common import accuracy, fit_val, fresh_student
    from transferkit.runtime import PeakMemory

    train, test = _data(work)
    teacher = load_net(str(work / "teacher"), train.classes)
    student = load_net("digits-usps", train.classes)
    mem = PeakMemory().__enter__()
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    module = fresh_student(student, list(train.classes), seed).train()
    fit, _ = fit_val(train, 0.1, seed)
    t_model = teacher.module.eval().requires_grad_(False)
    device = torch.device("cpu")
    hooks_s, hooks_t = ForwardHookManager(device), ForwardHookManager(device)
    hooks_s.add_hook(module, "head", requires_input=False, requires_output=True)
    hooks_t.add_hook(t_model, "head", requires_input=False, requires_output=True)
    criterion = KDLoss("head", "output", "head", "output", temperature=T, alpha=ALPHA)
    opt = torch.optim.AdamW(module.parameters(), lr=LR, weight_decay=0.0)
    n = len(fit)
    steps = -(-n // BATCH)
    total = steps * epochs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (total - s) / total)
    for epoch in range(epochs):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch)).numpy()
        for b in range(steps):
            idx = order[b * BATCH:(b + 1) * BATCH]
            raw = np.stack([fit.X[i] for i in idx])
            y = torch.as_tensor(fit.y[idx], dtype=torch.long)
            with torch.no_grad():
                t_model(teacher.preprocess(raw))
            module(student.preprocess(raw))
            loss = criterion(hooks_s.pop_io_dict(), hooks_t.pop_io_dict(), y)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
            opt.step()
            sched.step()
    seconds = time.perf_counter() - t0
    mem.__exit__(None, None, None)
    module.eval()
    return {"accuracy": accuracy(module, student, test), "n_test": len(test), "distill_s": seconds,
            "total_s": seconds, "peak_rss_mb": _peak_mb(), "distill_rss_rise_mb": mem.as_dict()["delta_rss_mb"],
            "torchdistill": torchdistill.__version__}


def setup(work: Path) -> dict:
    """The split and the teacher (once), and the torchdistill venv (once)."""
    from transferkit.data.split import make_split
    from transferkit.tune import tune
    from transferkit.zoo import load_model

    info = {}
    if not (work / "teacher" / "metrics.json").is_file():
        train, test, split = make_split(ARGS.data, limit=ARGS.limit, sample_seed=0, seed=0)
        tune(load_model("digits-mnist"), train, test, method="full",
             config={"epochs": 2, "lr": 1e-3, "seed": 0}, out_dir=work / "teacher", split=split, progress=False)
    info["teacher"] = json.loads((work / "teacher" / "metrics.json").read_text())
    venv = work / "tdvenv"
    py = venv / "bin" / "python"
    if not py.is_file():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        site = subprocess.run([str(py), "-c", "import site; print(site.getsitepackages()[0])"], check=True,
                              capture_output=True, text=True).stdout.strip()
        ours = [p for p in sys.path if p.endswith("site-packages")][0]
        # the project's torch (and transferkit, for the data and models) without installing them again
        Path(site, "project.pth").write_text(f"import site; site.addsitedir({ours!r})\n")
        subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", TORCHDISTILL], check=True)
    info["torchdistill_python"] = str(py)
    return info


def run_side(side: str, seed: int, work: Path, td_python: str) -> dict:
    py = td_python if side == "torchdistill" else sys.executable
    cmd = [py, __file__, "--worker", side, "--seed", str(seed), "--epochs", str(ARGS.epochs), "--work", str(work)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def mean_se(xs: list[float]) -> tuple[float, float]:
    return statistics.mean(xs), (statistics.stdev(xs) / len(xs) ** 0.5 if len(xs) > 1 else 0.0)


def main() -> None:
    work = Path(ARGS.work)
    if ARGS.worker:
        if ARGS.worker == "torchdistill":
            rec = worker_torchdistill(work, ARGS.seed, ARGS.epochs)
        else:
            rec = worker_transferkit(work, ARGS.seed, ARGS.epochs, cache=ARGS.worker == "transferkit")
        print(json.dumps(rec))
        return
    work.mkdir(parents=True, exist_ok=True)
    info = setup(work)
    seeds = [int(s) for s in ARGS.seeds.split(",")]
    runs: dict[str, list[dict]] = {s: [] for s in SIDES}
    for seed in seeds:
        for side in SIDES:
            rec = run_side(side, seed, work, info["torchdistill_python"])
            runs[side].append({"seed": seed, **rec})
            print(f"{side:17s} seed {seed}: acc {rec['accuracy']:.4f}, {rec['distill_s'] / ARGS.epochs:.2f} s/epoch, "
                  f"peak {rec['peak_rss_mb']:.0f} MB", file=sys.stderr)
    summary = {}
    for side, recs in runs.items():
        acc, se = mean_se([r["accuracy"] for r in recs])
        epoch_s = [r["distill_s"] / ARGS.epochs for r in recs]
        summary[side] = {"accuracy": acc, "accuracy_se": se, "epoch_s": statistics.mean(epoch_s),
                         "epoch_s_se": mean_se(epoch_s)[1], "peak_rss_mb": max(r["peak_rss_mb"] for r in recs),
                         "distill_rss_rise_mb": max(r["distill_rss_rise_mb"] for r in recs)}
    command = "OMP_NUM_THREADS=1 .venv/bin/python benchmarks/distill_kd.py " + " ".join(sys.argv[1:])
    result = {"command": command.strip(), "data": ARGS.data, "limit": ARGS.limit, "epochs": ARGS.epochs,
              "seeds": seeds, "teacher": "digits-mnist (tune full, 2 epochs, lr 1e-3)", "student": "digits-usps",
              "teacher_test_accuracy": info["teacher"].get("test_accuracy"), "kd": {"T": T, "alpha": ALPHA, "lr": LR,
              "batch_size": BATCH}, "torchdistill": runs["torchdistill"][0].get("torchdistill"),
              "n_train": runs["transferkit"][0]["n_train"], "n_test": runs["transferkit"][0]["n_test"],
              "summary": summary, "runs": runs,
              "machine": {"python": platform.python_version(), "cpu_threads": 1, "platform": platform.platform()}}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "distill_kd.json").write_text(json.dumps(result, indent=1) + "\n")
    rows = "\n".join(f"| {side} | {s['accuracy'] * 100:.2f} ± {s['accuracy_se'] * 100:.2f} | "
                     f"{s['epoch_s']:.2f} ± {s['epoch_s_se']:.2f} | {s['peak_rss_mb']:.0f} | "
                     f"{s['distill_rss_rise_mb']:.0f} |"
                     for side, s in summary.items())
    md = (f"# KD: transferkit vs torchdistill\n\n`{result['command']}`\n\n"
          f"{ARGS.data} (stratified sample of {ARGS.limit}: {result['n_train']} training, {result['n_test']} "
          f"held-out test items); teacher "
          f"{result['teacher']} (test accuracy {result['teacher_test_accuracy'] * 100:.2f} %) → student digits-usps; "
          f"T = {T}, α = {ALPHA}, {ARGS.epochs} epochs, batch {BATCH}, AdamW lr {LR}; seeds {ARGS.seeds}; "
          f"one CPU thread; torchdistill {result['torchdistill']}.\n\n"
          "| side | test accuracy % (mean ± s.e.) | s / epoch | peak RSS MB | RSS rise in distillation MB |\n"
          "|---|---|---|---|---|\n" + rows + "\n")
    (RESULTS / "distill_kd.md").write_text(md)
    print(md)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="fashion-mnist")
    p.add_argument("--limit", type=int, default=5000)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--work", default=str(Path("/tmp") / "transferkit-distill-kd"))
    p.add_argument("--worker", choices=SIDES)
    p.add_argument("--seed", type=int, default=0)
    ARGS = p.parse_args()
    main()
