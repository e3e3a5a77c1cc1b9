"""Hinton KD in transferkit vs torchdistill, side by side: same teacher, student, data, epochs and seeds.

Pairs (``--pairs``; each has its own work folder ``--work/<pair>``):

- ``digits``: ``digits-mnist`` fine-tuned on Fashion-MNIST → the smaller ``digits-usps`` CNN;
- ``fashion``: the ImageNet ``mobilenet-v2`` fine-tuned on Fashion-MNIST at 32×32 input → the digit-sized
  ``digits-mnist`` CNN (28×28 grey, a new head);
- ``movies`` / ``spam``: ``all-mpnet-base-v2`` tuned on ``vader:movies`` / ``spamassassin`` →
  ``paraphrase-minilm-l3-v2``; both text models truncate at 32 tokens (VADER snippets have a median of 18
  words; e-mails are cut after their Subject line and first words) and the MPNet teacher is fully fine-tuned
  (``tune --method full``, 4 epochs at its default lr 5e-5, batch 16, linear decay with 10 % warm-up).

Setup (once per pair, cached in its work folder): a stratified ``limit`` sample of the data split by
``transferkit.data.split.make_split`` (seed 0; the share ``test`` held out) and the teacher: ``transferkit
tune`` on the training part (method and settings in ``PAIRS``). The student is a catalogue model
with a new head. Every side distils for the pair's ``epochs`` with T = 4, α = 0.1 (α·CE + (1 − α)·T²·KL),
batch 32, AdamW at the pair's lr without weight decay, a linear decay and gradient clipping at norm 1.0, on
the same training items (transferkit's 90 % fit part; the other 10 % is its validation part, which transferkit
scores after each epoch), and the student is scored on the held-out test items (after the timing).

- ``transferkit`` (cached): ``transferkit.distill.distill(method="kd")``, the teacher's logits computed
  once over the training data;
- ``transferkit-live``: the same with ``cache: false`` (the teacher runs on every batch);
- ``torchdistill``: torchdistill's ``KDLoss`` on logits captured by its ``ForwardHookManager`` (teacher and
  student heads), in a plain torch loop with the same optimiser, schedule, clipping and batch size, the
  teacher in eval mode under ``no_grad`` on every batch (live, as torchdistill runs it). torchdistill is
  installed into a separate venv made here (``--work/tdvenv``, ``pip install --no-deps torchdistill==1.1.5``;
  it sees the project's torch through a ``.pth`` file, so no other torch is pulled); it is never a dependency
  of transferkit. Its YAML ``DistillationBox`` is not used: the loss and hooks are torchdistill's, the loop
  is ours. torchvision is not installed (PyPI has no build for the project's CPU torch), so the package
  ``torchdistill.core`` is registered without running its ``__init__`` (which imports torchdistill's model
  zoo); ``forward_hook.py`` and ``losses/mid_level.py`` are imported unchanged.

Each (side, seed) runs in its own process, sides interleaved per seed. Memory: the process's peak RSS
(data and model loading included, the same for every side) and the rise of RSS during the distillation
(``transferkit.runtime.PeakMemory``: sampled peak over the RSS at its start). Time per epoch = the
distillation's wall time (teacher-logit pass included) / epochs. Accuracy: mean ± standard error over the
seeds. Results are written after each pair (the other pairs' earlier results are kept).

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/distill_kd.py --pairs digits,fashion,movies,spam

Writes benchmarks/results/distill_kd.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
TORCHDISTILL = "torchdistill==1.1.5"
T, ALPHA, BATCH = 4.0, 0.1, 32
SIDES = ("transferkit", "transferkit-live", "torchdistill")
TEXT = {"max_length": 32}
PAIRS = {
    "digits": {"data": "fashion-mnist", "limit": 5000, "test": 0.2, "teacher": "digits-mnist", "teacher_opts": {},
               "tune": {"method": "full", "epochs": 2, "lr": 1e-3}, "student": "digits-usps", "student_opts": {},
               "epochs": 5, "lr": 1e-3},
    "fashion": {"data": "fashion-mnist", "limit": 3000, "test": 0.2, "teacher": "mobilenet-v2",
                "teacher_opts": {"size": 32}, "tune": {"method": "full", "epochs": 3, "lr": 1e-3},
                "student": "digits-mnist", "student_opts": {}, "epochs": 5, "lr": 1e-3},
    "movies": {"data": "vader:movies", "limit": 400, "test": 0.5, "teacher": "all-mpnet-base-v2",
               "teacher_opts": TEXT, "tune": {"method": "full", "epochs": 4, "lr": 5e-5}, "student": "paraphrase-minilm-l3-v2",
               "student_opts": TEXT, "epochs": 3, "lr": 2e-4},
    "spam": {"data": "spamassassin", "limit": 400, "test": 0.5, "teacher": "all-mpnet-base-v2",
             "teacher_opts": TEXT, "tune": {"method": "full", "epochs": 4, "lr": 5e-5}, "student": "paraphrase-minilm-l3-v2",
             "student_opts": TEXT, "epochs": 3, "lr": 2e-4},
}


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _nets(work: Path, pair: dict):
    """``(train, test, teacher, student)``: the recorded split and the two nets with the pair's model options."""
    from transferkit.data.split import held_out, read_split
    from transferkit.distill import load_net
    from transferkit.zoo import load_model

    train, test = held_out(read_split(work / "teacher"))
    teacher = load_net(str(work / "teacher"), train.classes, load=lambda n: load_model(n, **pair["teacher_opts"]))
    student = load_net(load_model(pair["student"], **pair["student_opts"]), train.classes)
    return train, test, teacher, student


def worker_transferkit(work: Path, pair: dict, seed: int, cache: bool) -> dict:
    from transferkit.distill import distill
    from transferkit.distill._common import accuracy
    from transferkit.runtime import PeakMemory

    train, test, teacher, student = _nets(work, pair)
    t0 = time.perf_counter()
    with PeakMemory() as mem:
        res = distill([teacher], student, train, None, method="kd",
                      config={"epochs": pair["epochs"], "seed": seed, "temperature": T, "alpha": ALPHA,
                              "lr": pair["lr"], "batch_size": BATCH, "cache": cache})
    seconds = time.perf_counter() - t0
    m = res.metrics
    return {"accuracy": accuracy(res.student, student, test), "n_test": len(test), "n_train": len(train),
            "distill_s": m["cache_s"] + m["train_s"], "total_s": seconds, "peak_rss_mb": _peak_mb(),
            "distill_rss_rise_mb": mem.as_dict()["delta_rss_mb"]}


def worker_torchdistill(work: Path, pair: dict, seed: int) -> dict:
    import types

    import torch
    import torchdistill

    # torchdistill.core's __init__ imports its model zoo, hence torchvision, which has no PyPI build for the
    # project's CPU torch: register the package without running that __init__ and import the hook module as is
    core = types.ModuleType("torchdistill.core")
    core.__path__ = [str(Path(torchdistill.__file__).parent / "core")]
    sys.modules["torchdistill.core"] = core
    from torchdistill.core.forward_hook import ForwardHookManager
    from torchdistill.losses.mid_level import KDLoss

    from transferkit.distill._common import _raw, accuracy, fit_val, fresh_student
    from transferkit.engine.objectives import forward
    from transferkit.runtime import PeakMemory

    train, test, teacher, student = _nets(work, pair)
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
    opt = torch.optim.AdamW(module.parameters(), lr=pair["lr"], weight_decay=0.0)
    n, epochs = len(fit), pair["epochs"]
    steps = -(-n // BATCH)
    total = steps * epochs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (total - s) / total)
    for epoch in range(epochs):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch)).numpy()
        for b in range(steps):
            idx = order[b * BATCH:(b + 1) * BATCH]
            raw = _raw([fit.X[i] for i in idx])
            y = torch.as_tensor(fit.y[idx], dtype=torch.long)
            with torch.no_grad():
                forward(t_model, teacher.preprocess(raw))
            forward(module, student.preprocess(raw))
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


def setup_teacher(work: Path, pair: dict) -> dict:
    """The split and the fine-tuned teacher of one pair (once)."""
    from transferkit.data.split import make_split
    from transferkit.tune import tune
    from transferkit.zoo import load_model

    if not (work / "teacher" / "metrics.json").is_file():
        train, test, split = make_split(pair["data"], limit=pair["limit"], sample_seed=0, seed=0,
                                        test_size=pair["test"])
        config = {k: v for k, v in pair["tune"].items() if k != "method"}
        tune(load_model(pair["teacher"], **pair["teacher_opts"]), train, test, method=pair["tune"]["method"],
             config={**config, "seed": 0}, out_dir=work / "teacher", split=split, progress=False)
    return json.loads((work / "teacher" / "metrics.json").read_text())


def setup_torchdistill(work: Path) -> str:
    """The torchdistill venv (once); its python."""
    from _peer import peer_python

    return str(peer_python(work / "tdvenv", [TORCHDISTILL]))


def run_side(side: str, pair: str, seed: int, work: Path, td_python: str) -> dict:
    py = td_python if side == "torchdistill" else sys.executable
    cmd = [py, __file__, "--worker", side, "--pairs", pair, "--seed", str(seed), "--work", str(work)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def mean_se(xs: list[float]) -> tuple[float, float]:
    return statistics.mean(xs), (statistics.stdev(xs) / len(xs) ** 0.5 if len(xs) > 1 else 0.0)


def run_pair(name: str, work: Path, td_python: str, seeds: list[int], sides: list[str]) -> dict:
    pair = PAIRS[name]
    teacher = setup_teacher(work / name, pair)
    runs: dict[str, list[dict]] = {s: [] for s in sides}
    for seed in seeds:
        for side in sides:
            rec = run_side(side, name, seed, work, td_python)
            runs[side].append({"seed": seed, **rec})
            print(f"{name} {side:17s} seed {seed}: acc {rec['accuracy']:.4f}, "
                  f"{rec['distill_s'] / pair['epochs']:.2f} s/epoch, peak {rec['peak_rss_mb']:.0f} MB", file=sys.stderr)
    summary = {}
    for side, recs in runs.items():
        acc, se = mean_se([r["accuracy"] for r in recs])
        epoch_s = [r["distill_s"] / pair["epochs"] for r in recs]
        summary[side] = {"accuracy": acc, "accuracy_se": se, "epoch_s": statistics.mean(epoch_s),
                         "epoch_s_se": mean_se(epoch_s)[1], "peak_rss_mb": max(r["peak_rss_mb"] for r in recs),
                         "distill_rss_rise_mb": max(r["distill_rss_rise_mb"] for r in recs)}
    first = runs[sides[0]][0]
    return {**pair, "seeds": seeds, "teacher_tune": ", ".join(f"{k} {v}" for k, v in pair["tune"].items()),
            "teacher_test_accuracy": teacher.get("test_accuracy"), "n_train": first.get("n_train"),
            "n_test": first["n_test"], "kd": {"T": T, "alpha": ALPHA, "batch_size": BATCH}, "summary": summary,
            "runs": runs}


def write(results: dict) -> None:
    from transferkit.runtime import environment

    RESULTS.mkdir(parents=True, exist_ok=True)
    doc = {"torchdistill": TORCHDISTILL, "environment": environment(), "pairs": results}
    (RESULTS / "distill_kd.json").write_text(json.dumps(doc, indent=1) + "\n")
    parts = ["# KD: transferkit vs torchdistill\n\nOne CPU thread per process (`OMP_NUM_THREADS=1`, `nice -n 10`, "
             f"a shared 2-core machine); {TORCHDISTILL}; T = {T}, α = {ALPHA}, batch {BATCH}, AdamW without weight "
             "decay, linear decay, clipping at 1.0; accuracy on the held-out test items, mean ± s.e. over the seeds; "
             "s / epoch = distillation wall time (teacher-logit pass included) / epochs.\n"]
    for name, r in results.items():
        opts = lambda o: f" ({', '.join(f'{k} {v}' for k, v in o.items())})" if o else ""  # noqa: E731
        rows = "\n".join(f"| {side} | {s['accuracy'] * 100:.2f} ± {s['accuracy_se'] * 100:.2f} | "
                         f"{s['epoch_s']:.2f} ± {s['epoch_s_se']:.2f} | {s['peak_rss_mb']:.0f} | "
                         f"{s['distill_rss_rise_mb']:.0f} |" for side, s in r["summary"].items())
        parts.append(
            f"## {name}: {r['teacher']}{opts(r['teacher_opts'])} → {r['student']}{opts(r['student_opts'])}\n\n"
            f"`{r['command']}`\n\n{r['data']}: stratified sample of {r['limit']}, {r['n_train']} training and "
            f"{r['n_test']} held-out test items; teacher tuned ({r['teacher_tune']}), test accuracy "
            f"{r['teacher_test_accuracy'] * 100:.2f} %; {r['epochs']} epochs at lr {r['lr']}; seeds "
            f"{', '.join(map(str, r['seeds']))}.\n\n"
            "| side | test accuracy % (mean ± s.e.) | s / epoch | peak RSS MB | RSS rise in distillation MB |\n"
            "|---|---|---|---|---|\n" + rows + "\n")
    (RESULTS / "distill_kd.md").write_text("\n".join(parts))


def main() -> None:
    work = Path(ARGS.work)
    names = [p.strip() for p in ARGS.pairs.split(",") if p.strip()]
    if ARGS.worker:
        pair = PAIRS[names[0]]
        if ARGS.worker == "torchdistill":
            rec = worker_torchdistill(work / names[0], pair, ARGS.seed)
        else:
            rec = worker_transferkit(work / names[0], pair, ARGS.seed, cache=ARGS.worker == "transferkit")
        print(json.dumps(rec))
        return
    work.mkdir(parents=True, exist_ok=True)
    td_python = setup_torchdistill(work)
    old = RESULTS / "distill_kd.json"
    results = json.loads(old.read_text()).get("pairs", {}) if old.is_file() else {}
    seeds = [int(s) for s in ARGS.seeds.split(",")]
    sides = [s.strip() for s in ARGS.sides.split(",")]
    command = "OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/distill_kd.py " + " ".join(sys.argv[1:])
    for name in names:
        results[name] = {"command": command.strip(), **run_pair(name, work, td_python, seeds, sides)}
        write(results)  # after each pair
    print((RESULTS / "distill_kd.md").read_text())


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", default=",".join(PAIRS), help=f"comma-separated, of {', '.join(PAIRS)}")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--sides", default=",".join(SIDES))
    p.add_argument("--work", default=str(Path("/tmp") / "transferkit-distill-kd"))
    p.add_argument("--worker", choices=SIDES)
    p.add_argument("--seed", type=int, default=0)
    ARGS = p.parse_args()
    main()
