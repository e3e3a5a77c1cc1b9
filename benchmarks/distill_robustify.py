"""Efficiently robustify (Jain et al., ICCV'23) vs the frozen student's linear probe and full fine-tuning, on
Fashion-MNIST and Fashion-MNIST-C (``transferkit.data.corrupt``: the 15 corruptions, severities 3 and 5).

Data: a stratified ``--limit`` sample of the official Fashion-MNIST *training* part (``--per-class`` items per
class, sample seed 0) to train on, and a stratified ``--test`` sample of the official *test* part to score on;
the corrupted test sets are ``corrupt(test images, name, severity, seed=0)`` (the same images for every method
and seed). Every method trains on the same 90 % ``fit`` part of the training sample (``fit_val``, the run seed;
the other 10 % is robustify's validation part, which calibrates its head-choice threshold).

Student: the ImageNet ``mobilenet-v2`` at 32×32 input (grey replicated to RGB; CPU-sized). Teacher (robustify):
the small ``digits-mnist`` CNN (0.42 M parameters, MNIST-trained), given a new head and robustified by the method
itself (``teacher_epochs`` with AugMix).

- ``probe``: the frozen student — a linear head on its frozen features (features computed once; ``--probe-epochs``,
  AdamW lr 1e-3, batch 32);
- ``full-ft``: full fine-tuning of the student (backbone + new head), cross-entropy on clean images;
- ``full-ft-augmix``: full fine-tuning with cross-entropy on each batch's clean and AugMix copies (the paper's
  "AugMix complete fine-tuning" baseline, without the JSD term);
- ``robustify``: ``transferkit.distill.distill(method="robustify")`` (defaults: AugMix, last 2 blocks of 19 tuned,
  three heads, T = 4, α = 0.1, τ at the 0.95 quantile);
- ``teacher``: the robustified teacher alone (retrained with the same seed by ``robustify_teacher``; its clean
  accuracy must equal the one robustify reports — checked).

``--epochs`` for full-ft, full-ft-augmix, robustify's student and its teacher; AdamW lr 1e-3, batch 32, the
engine's linear decay. Training time: wall seconds of the training (robustify: teacher + student; probe: its
feature pass + head), on a shared CPU with one thread (``OMP_NUM_THREADS=1``, ``nice``). Mean ± sample sd over
the seeds.

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/distill_robustify.py --test-per-class 40

Writes benchmarks/results/distill_robustify.json and .md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
METHODS = ("probe", "full-ft", "full-ft-augmix", "robustify", "teacher")
SEVERITIES = (3, 5)
SIZE, LR, BATCH = 32, 1e-3, 32


def data(per_class: int, test_per_class: int):
    from transferkit.data import load_dataset
    from transferkit.data.dataset import subsample

    ds = load_dataset("fashion-mnist")
    train = subsample(ds.subset(~ds.is_test), per_class=per_class, seed=0)
    test = subsample(ds.subset(ds.is_test), per_class=test_per_class, seed=0)
    return train, test


def corrupted_sets(test, corruptions: list[str]) -> dict[str, np.ndarray]:
    from transferkit.data.corrupt import corrupt

    sets = {"clean": np.asarray(test.X)}
    for c in corruptions:
        for s in SEVERITIES:
            sets[f"{c}:{s}"] = corrupt(np.asarray(test.X), c, s, seed=0)
    return sets


@torch.no_grad()
def scores(fn, prep, sets: dict, y: np.ndarray, batch: int = 500) -> dict[str, float]:
    """Accuracy of ``fn(inputs) -> logits`` on every set."""
    yt = torch.as_tensor(y)
    return {k: float((torch.cat([fn(prep(X[s: s + batch])) for s in range(0, len(X), batch)]).argmax(-1) == yt)
                     .double().mean()) for k, X in sets.items()}


def train_cfg(seed: int, epochs: int) -> dict:
    return {"epochs": epochs, "lr": LR, "batch_size": BATCH, "seed": seed, "progress": False}


def run_probe(zoo, fit, sets, y, seed, epochs, feats_cache):
    from transferkit.engine import train
    from transferkit.zoo import head_seed
    from transferkit.zoo.base import new_head

    t0 = time.perf_counter()
    if "fit" not in feats_cache:
        with torch.no_grad():
            feats_cache["fit"] = torch.cat([zoo.backbone(zoo.preprocess(fit.X[s: s + 500]))
                                            for s in range(0, len(fit), 500)])
    head = new_head(zoo.feature_dim, 10, head_seed(seed, list(fit.classes)))
    train(head, (feats_cache["fit"], torch.as_tensor(fit.y)), None, train_cfg(seed, epochs))
    seconds = time.perf_counter() - t0
    if "sets" not in feats_cache:  # the frozen backbone's features of every test set, once
        with torch.no_grad():
            feats_cache["sets"] = {k: torch.cat([zoo.backbone(zoo.preprocess(X[s: s + 500]))
                                                 for s in range(0, len(X), 500)]) for k, X in sets.items()}
    head.eval()
    with torch.no_grad():
        acc = {k: float((head(f).argmax(-1) == torch.as_tensor(y)).double().mean())
               for k, f in feats_cache["sets"].items()}
    return acc, seconds, {}


def run_full(zoo, fit, sets, y, seed, epochs, augment: bool):
    from transferkit.distill._common import Items, fresh_student, load_net
    from transferkit.distill.robustify import AugmentedCE, RobustifyOptions, make_collate
    from transferkit.engine import train
    from transferkit.tune._common import Pairs, make_collate as plain_collate

    module = fresh_student(load_net(zoo), list(fit.classes), seed)
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    if augment:
        train(module, Items(fit), AugmentedCE(), train_cfg(seed, epochs),
              collate_fn=make_collate(zoo.preprocess, None, RobustifyOptions()))
    else:
        train(module, Pairs(fit.X, fit.y), None, train_cfg(seed, epochs), collate_fn=plain_collate(zoo.preprocess))
    seconds = time.perf_counter() - t0
    module.eval()
    return scores(module, zoo.preprocess, sets, y), seconds, {}


def run_robustify(zoo, train_data, test, sets, y, seed, epochs):
    from transferkit.distill import distill, load_net
    from transferkit.distill.robustify import HEADS, choose_heads

    classes = list(train_data.classes)
    res = distill(["digits-mnist"], load_net(zoo, classes), train_data, test, method="robustify",
                  config={**train_cfg(seed, epochs), "teacher_epochs": epochs})
    m, module = res.metrics, res.student.eval()
    tau = float(module.kl_threshold)
    yt = torch.as_tensor(y)
    acc, heads, clean_share = {}, {}, {}
    with torch.no_grad():
        for k, X in sets.items():
            z = torch.cat([module.all_heads(zoo.preprocess(X[s: s + 500])) for s in range(0, len(X), 500)], 1)
            idx = choose_heads(z, tau)
            acc[k] = float((z[idx, torch.arange(len(yt))].argmax(-1) == yt).double().mean())
            heads[k] = {h: float((z[i].argmax(-1) == yt).double().mean()) for i, h in enumerate(HEADS)}
            clean_share[k] = float((idx == 0).double().mean())
    extra = {"teacher_s": m["teacher_s"], "student_s": m["train_s"], "kl_threshold": tau,
             "tuned_params": m["tuned_params"], "head_accuracy": heads, "clean_head_share": clean_share,
             "robust_teacher_test_accuracy": m["robust_teacher_test_accuracy"]}
    return acc, m["teacher_s"] + m["train_s"], extra


def run_teacher(train_data, sets, y, seed, epochs):
    from transferkit.distill._common import fit_val, load_net
    from transferkit.distill.robustify import RobustifyOptions, robustify_teacher
    from transferkit.engine import TrainConfig

    classes = list(train_data.classes)
    teacher = load_net("digits-mnist", classes)
    fit, val = fit_val(train_data, 0.1, seed)
    t0 = time.perf_counter()
    cfg = TrainConfig.from_dict(train_cfg(seed, epochs))
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        module = robustify_teacher(teacher, fit, val, RobustifyOptions(teacher_epochs=epochs), cfg, classes)
    seconds = time.perf_counter() - t0
    return scores(module, teacher.preprocess, sets, y), seconds, {}


def mean_sd(xs: list[float]) -> tuple[float, float]:
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def summarise(runs: dict, corruptions: list[str]) -> dict:
    out = {}
    for method, recs in runs.items():
        row = {"clean": mean_sd([r["accuracy"]["clean"] for r in recs]),
               "train_s": mean_sd([r["train_s"] for r in recs])}
        for s in SEVERITIES:
            row[f"corrupted_s{s}"] = mean_sd([statistics.mean(r["accuracy"][f"{c}:{s}"] for c in corruptions)
                                              for r in recs])
        row["per_corruption"] = {k: statistics.mean(r["accuracy"][k] for r in recs) for k in recs[0]["accuracy"]}
        out[method] = row
    return out


def write(doc: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "distill_robustify.json").write_text(json.dumps(doc, indent=1) + "\n")
    s, cs = doc["summary"], doc["corruptions"]
    lines = ["# distill: robustify vs linear probe vs full fine-tuning on Fashion-MNIST-C", "",
             f"Command: `{doc['command']}`", "",
             f"Seeds {doc['seeds']}; train {doc['n_train']} items (fit {doc['n_fit']}), test {doc['n_test']} items; "
             f"{len(cs)} corruptions × severities {list(SEVERITIES)}; student mobilenet-v2 at {SIZE}px; "
             f"epochs {doc['epochs']} (probe {doc['probe_epochs']}). Mean ± sd over seeds. Environment: "
             f"Python {doc['environment']['python']}, torch {doc['environment']['packages'].get('torch')}, "
             f"{doc['environment']['platform']}, {doc['environment']['cpu_count']} CPUs (shared), 1 thread.", "",
             "| method | clean acc | corrupted acc (sev 3) | corrupted acc (sev 5) | train s |",
             "|---|---|---|---|---|"]
    for m, r in s.items():
        cell = lambda k: f"{r[k][0]:.4f} ± {r[k][1]:.4f}"  # noqa: E731
        lines.append(f"| {m} | {cell('clean')} | {cell('corrupted_s3')} | {cell('corrupted_s5')} | "
                     f"{r['train_s'][0]:.1f} ± {r['train_s'][1]:.1f} |")
    lines += ["", "Per corruption (mean over seeds):", "",
              "| set | " + " | ".join(s) + " |", "|---|" + "---|" * len(s)]
    for k in s[next(iter(s))]["per_corruption"]:
        lines.append(f"| {k} | " + " | ".join(f"{s[m]['per_corruption'][k]:.4f}" for m in s) + " |")
    if "robustify" in doc["runs"]:
        lines += ["", "robustify's heads (mean over seeds; corrupted = mean over all corrupted sets):", "",
                  "| set | chosen | clean head | robust head | mixed head | share on clean head |",
                  "|---|---|---|---|---|---|"]
        recs = doc["runs"]["robustify"]
        for label, keys in (("clean", ["clean"]), *((f"corrupted sev {v}", [f"{c}:{v}" for c in cs])
                                                     for v in SEVERITIES)):
            avg = lambda f: statistics.mean(f(r, k) for r in recs for k in keys)  # noqa: E731
            lines.append(f"| {label} | {avg(lambda r, k: r['accuracy'][k]):.4f} | "
                         + " | ".join(f"{avg(lambda r, k, h=h: r['extra']['head_accuracy'][k][h]):.4f}"
                                      for h in ("clean", "robust", "mixed"))
                         + f" | {avg(lambda r, k: r['extra']['clean_head_share'][k]):.3f} |")
    lines += ["", doc["notes"], ""]
    (RESULTS / "distill_robustify.md").write_text("\n".join(lines))


def main() -> None:
    from transferkit.data.corrupt import CORRUPTIONS
    from transferkit.distill._common import fit_val
    from transferkit.runtime import environment
    from transferkit.zoo import load_model

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--per-class", type=int, default=100)
    p.add_argument("--test-per-class", type=int, default=40)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--probe-epochs", type=int, default=10)
    p.add_argument("--corruptions", default=",".join(CORRUPTIONS))
    p.add_argument("--methods", default=",".join(METHODS))
    a = p.parse_args()
    torch.set_num_threads(1)
    seeds = [int(s) for s in a.seeds.split(",")]
    corruptions = a.corruptions.split(",")
    methods = a.methods.split(",")
    train_data, test = data(a.per_class, a.test_per_class)
    t0 = time.perf_counter()
    sets = corrupted_sets(test, corruptions)
    print(f"{len(sets)} test sets of {len(test)} items in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    zoo = load_model("mobilenet-v2", size=SIZE)
    y = np.asarray(test.y)
    runs: dict[str, list] = {m: [] for m in methods}
    feats_cache: dict = {}
    checks: list = []
    for seed in seeds:
        fit, _ = fit_val(train_data, 0.1, seed)
        for m in methods:
            if m == "probe":
                acc, sec, extra = run_probe(zoo, fit, sets, y, seed, a.probe_epochs, feats_cache)
                feats_cache.pop("fit")  # the fit part changes with the seed
            elif m in ("full-ft", "full-ft-augmix"):
                acc, sec, extra = run_full(zoo, fit, sets, y, seed, a.epochs, m == "full-ft-augmix")
            elif m == "robustify":
                acc, sec, extra = run_robustify(zoo, train_data, test, sets, y, seed, a.epochs)
            else:
                acc, sec, extra = run_teacher(train_data, sets, y, seed, a.epochs)
            runs[m].append({"seed": seed, "accuracy": acc, "train_s": round(sec, 2), "extra": extra})
            if m == "teacher" and "robustify" in runs:  # the retrained teacher is robustify's own
                same = acc["clean"] == runs["robustify"][-1]["extra"]["robust_teacher_test_accuracy"]
                checks.append({"seed": seed, "teacher_is_robustifys": same})
            mean_c = statistics.mean(v for k, v in acc.items() if k != "clean")
            print(f"seed {seed} {m:15s} clean {acc['clean']:.4f} corrupted {mean_c:.4f} train {sec:.1f} s",
                  file=sys.stderr)
    summary = summarise(runs, corruptions)
    notes = ("Notes: the corrupted test sets are built once (corruption seed 0) from the same test items. The "
             "probe's accuracy is of a linear head on the frozen student's features. robustify's train time is "
             "its teacher's robustification plus its student's distillation.")
    doc = {"command": "OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python " + " ".join(sys.argv), "seeds": seeds,
           "n_train": len(train_data), "n_fit": len(fit_val(train_data, 0.1, seeds[0])[0]), "n_test": len(test),
           "corruptions": corruptions, "epochs": a.epochs, "probe_epochs": a.probe_epochs,
           "environment": environment(), "summary": summary, "runs": runs, "teacher_checks": checks, "notes": notes}
    write(doc)
    for m, r in summary.items():
        print(f"{m:15s} clean {r['clean'][0]:.4f} ± {r['clean'][1]:.4f}  sev3 {r['corrupted_s3'][0]:.4f} ± "
              f"{r['corrupted_s3'][1]:.4f}  sev5 {r['corrupted_s5'][0]:.4f} ± {r['corrupted_s5'][1]:.4f}  "
              f"train {r['train_s'][0]:.1f} s")


if __name__ == "__main__":
    main()
