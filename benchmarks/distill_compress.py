"""Compression by learned architecture: N2N and TAS vs magnitude pruning, on a real digit CNN.

Target: the ``digits-mnist`` CNN (MNISTNet, 421 642 parameters, trained on MNIST) with a new head, fully
fine-tuned (``--teacher-epochs`` 8, AdamW lr 1e-3, batch 32, seed 0) on the training part of a stratified
``--limit`` sample of ``--data`` (default Fashion-MNIST: the teacher has not seen the test images, unlike its own
MNIST), split by ``make_split`` (seed 0, 20 % held out). Every method compresses the same teacher and
is then trained for ``--epochs`` epochs with the same KD objective from it (T = 4, α = 0.1, AdamW lr 1e-3,
batch 32, on transferkit's 90 % fit part); accuracy is measured on the held-out test items.

- ``n2n``: ``distill(method="n2n")`` with its defaults (5 + 5 REINFORCE episodes × 3 students, 60 KD steps
  each), no size constraint;
- ``tas@0.5`` / ``tas@0.3``: ``distill(method="tas")`` at its default FLOP target (50 %) and at 30 %, with a
  shorter search for the shared CPU: ``--tas-steps`` (150) steps of batch 32 instead of 300 of batch 64;
- ``l1-unstructured``: ``torch.nn.utils.prune.global_unstructured`` (L1) over every conv / linear weight of
  the teacher, removing as many weights as make its *nonzero* parameter count (weights, biases, batch norm)
  equal to the ``tas@0.3`` student's parameter count of the same seed; the dense shapes stay, so its FLOPs
  (dense multiply-accumulates) are the teacher's; the mask stays applied during the KD fine-tuning;
- ``l1-structured``: L1-norm filter pruning — each layer's output channels ranked by the L1 norm of their
  weights, the same fraction kept in every layer but the head, that fraction set (bisection) to the largest
  network with at most the ``tas@0.3`` student's parameters; the kept channels are built as a smaller dense
  network (:mod:`transferkit.distill.arch`), so its parameters and FLOPs are real.

``l1-body``: as ``l1-unstructured`` but the classifier head is not pruned (global magnitude pruning can
remove a whole small layer: the fine-tuned teacher's new head has small weights). ``l1-unstructured@n2n`` /
``l1-structured@n2n`` / ``l1-body@n2n``: the same, matched to the ``n2n`` student instead. "Equal
parameter count" is thus matched per seed (exactly, in nonzeros, for unstructured; at most, in dense
parameters, for structured). ``--add-missing`` adds the baselines an earlier results file lacks (re-making
the same teacher, checked by its test accuracy). Seeds change the training (search, sampling, initialisation of
any fresh layer, batch order), not the split. Mean ± sd over the seeds; accuracy drop = teacher − student in
percentage points on the same test items.

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/distill_compress.py

Writes benchmarks/results/distill_compress.json and .md.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import prune

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
CLASSES = [str(c) for c in range(10)]
BASELINES = ("l1-unstructured", "l1-structured", "l1-unstructured@n2n", "l1-structured@n2n", "l1-body", "l1-body@n2n")
METHODS = ("n2n", "tas@0.5", "tas@0.3", *BASELINES)


def nonzeros(module: nn.Module) -> int:
    """Nonzero entries of the effective parameters (a pruned weight counts through its mask)."""
    state = {n: p for n, p in module.named_parameters()}
    total = 0
    for name, p in state.items():
        if name.endswith("_orig"):
            owner = module.get_submodule(name.rsplit(".", 1)[0])
            p = getattr(owner, name.rsplit(".", 1)[1][: -len("_orig")])
        total += int((p != 0).sum())
    return total


def unstructured(teacher: nn.Module, target: int, head: bool = True) -> nn.Module:
    """Global L1 magnitude pruning of the conv / linear weights (the classifier head's too when ``head``) down to
    ``target`` nonzero parameters."""
    m = copy.deepcopy(teacher).requires_grad_(True)
    weights = [(mod, "weight") for mod in m.modules() if isinstance(mod, (nn.Conv2d, nn.Linear))
               and (head or mod is not m.head)]
    total = sum(p.numel() for p in m.parameters())
    prune.global_unstructured(weights, pruning_method=prune.L1Unstructured, amount=int(total - target))
    return m


@torch.no_grad()
def sort_channels(teacher: nn.Module) -> nn.Module:
    """A copy of ``teacher`` with each layer's output channels in descending L1 norm (the function is kept:
    the next layer's inputs are permuted the same way), so the first channels are the ones L1 keeps."""
    from transferkit.distill import arch as A

    m = copy.deepcopy(teacher)
    arch, mods = A.describe(m)
    sizes = A.spatial_sizes(arch)
    for i in arch.compute[:-1]:
        layer, nxt = arch.layers[i], arch.compute[arch.compute.index(i) + 1]
        conv = mods[i][0] if layer.kind == "conv" else mods[i]
        order = conv.weight.flatten(1).abs().sum(1).argsort(descending=True)
        conv.weight.copy_(conv.weight[order])
        conv.bias.copy_(conv.bias[order])
        if layer.kind == "conv" and mods[i][1] is not None:
            bn = mods[i][1]
            for name in ("weight", "bias", "running_mean", "running_var"):
                getattr(bn, name).copy_(getattr(bn, name)[order])
        follow = mods[nxt][0] if arch.layers[nxt].kind == "conv" else mods[nxt]
        w = follow.weight
        if arch.layers[nxt].kind == "fc" and layer.kind == "conv":  # flattened (C, H, W) inputs
            w.copy_(w.reshape(w.shape[0], layer.out, sizes[nxt] ** 2)[:, order].reshape(w.shape[0], -1))
        else:
            w.copy_(w[:, order])
    return m


def structured(teacher: nn.Module, target: int, seed: int) -> nn.Module:
    from transferkit.distill import arch as A

    arch, _ = A.describe(teacher)

    def widths(r):
        return [max(1, round(l.out * r)) for l in arch.layers[:-1]] + [arch.layers[-1].out]

    lo, hi = 0.0, 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if A.count(A.derive(arch, None, widths(mid))[0])[0] <= target else (lo, mid)
    return A.from_teacher(sort_channels(teacher), widths=widths(lo), seed=seed)


def fine_tuned_teacher(data: str, limit: int, epochs: int):
    """``(net, train, test)``: ``digits-mnist`` with a new head, fully fine-tuned on the training part (seed 0)."""
    import copy as _copy

    from transferkit.data.split import make_split
    from transferkit.distill import Net
    from transferkit.engine import train as fit
    from transferkit.tune._common import Pairs, make_collate
    from transferkit.zoo import head_seed, load_model

    train, test, _ = make_split(data, limit=limit, seed=0)
    zoo = load_model("digits-mnist")
    clf = zoo.classifier(len(train.classes), seed=head_seed(0, train.classes))
    clf.backbone = _copy.deepcopy(zoo.backbone)
    fit(clf.requires_grad_(True), Pairs(train.X, train.y), None, {"epochs": epochs, "lr": 1e-3, "progress": False},
        collate_fn=make_collate(zoo.preprocess))
    return Net(f"digits-mnist tuned on {data}", zoo, clf.eval(), list(train.classes)), train, test


def run_seed(seed: int, teacher, train, test, epochs: int, tas_steps: int) -> dict:
    from transferkit.distill import arch as A
    from transferkit.distill import distill
    from transferkit.distill._common import accuracy

    t_module = teacher.module.eval()
    t_params, t_flops = A.count(A.describe(t_module)[0])
    t_acc = accuracy(t_module, teacher, test)
    out = {"teacher": {"accuracy": t_acc, "params": t_params, "flops": t_flops, "n_test": len(test)}}
    train_cfg = {"epochs": epochs, "lr": 1e-3, "batch_size": 32, "seed": seed}
    for method in ("n2n", "tas@0.5", "tas@0.3"):
        t0 = time.perf_counter()
        extra = {}
        if method.startswith("tas"):
            extra = {"flop_ratio": float(method[4:]), "search_steps": tas_steps, "search_batch_size": 32}
        res = distill([teacher], teacher, train, test, method=method.split("@")[0], config={**train_cfg, **extra})
        m = res.metrics
        out[method] = {"accuracy": m["test_accuracy"], "params": m["architecture"]["params"],
                       "flops": m["architecture"]["flops"], "seconds": round(time.perf_counter() - t0, 1),
                       "layers": m["architecture"]["layers"]}
        print(f"seed {seed} {method}: {out[method]}", flush=True)
    for method in BASELINES:
        out[method] = baseline(method, out, teacher, train, test, epochs, seed)
        print(f"seed {seed} {method}: {out[method]}", flush=True)
    return out


def baseline(method: str, run: dict, teacher, train, test, epochs: int, seed: int) -> dict:
    """A magnitude-pruning baseline at the parameter count of the run's ``tas@0.3`` (or ``…@n2n``: n2n) student."""
    from transferkit.distill import arch as A
    from transferkit.distill._common import accuracy, fit_val, train_student
    from transferkit.distill.kd import KDOptions, kd_objective
    from transferkit.engine import TrainConfig

    t0 = time.perf_counter()
    t_module = teacher.module.eval()
    target = run["n2n" if method.endswith("@n2n") else "tas@0.3"]["params"]
    fit, val = fit_val(train, 0.1, seed)
    cfg = TrainConfig.from_dict({"epochs": epochs, "lr": 1e-3, "batch_size": 32, "seed": seed, "progress": False})
    torch.manual_seed(seed)
    sparse = not method.startswith("l1-structured")
    if sparse:
        module = unstructured(t_module, target, head=not method.startswith("l1-body"))
    else:
        module = structured(t_module, target, seed)
    train_student(module, teacher, [teacher], kd_objective(KDOptions()), fit, val, cfg, cache=True)
    params, flops = (nonzeros(module), run["teacher"]["flops"]) if sparse else A.count(module.arch)
    out = {"accuracy": accuracy(module.eval(), teacher, test), "params": params, "flops": flops,
           "seconds": round(time.perf_counter() - t0, 1)}
    if sparse:  # the weights each layer keeps (global pruning can empty a layer)
        out["kept_weights"] = {n: int(m.weight_mask.sum()) for n, m in module.named_modules()
                               if hasattr(m, "weight_mask")}
    return out


def summary(runs: list[dict]) -> dict:
    def ms(xs):
        return [statistics.mean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0]

    table = {}
    for method in METHODS:
        rows = [r for r in runs if method in r]
        if rows:
            table[method] = {
                "params_x": ms([r["teacher"]["params"] / r[method]["params"] for r in rows]),
                "flops_x": ms([r["teacher"]["flops"] / r[method]["flops"] for r in rows]),
                "accuracy": ms([r[method]["accuracy"] for r in rows]),
                "drop_pp": ms([100 * (r["teacher"]["accuracy"] - r[method]["accuracy"]) for r in rows]),
                "seconds": ms([r[method]["seconds"] for r in rows]), "n": len(rows)}
    return table


def write(doc: dict) -> None:
    from transferkit.io import write_json

    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json(RESULTS / "distill_compress.json", doc)
    t = doc["table"]
    lines = ["# distill: compression by learned architecture (N2N, TAS) vs magnitude pruning", "",
             f"Command: `{doc['command']}`", "",
             f"Target: digits-mnist (MNISTNet) fully fine-tuned on {doc['data']} ({doc['teacher_epochs']} epochs), "
             f"limit {doc['limit']} (20 % held out: "
             f"{doc['n_test']} test items), seeds {doc['seeds']}, {doc['epochs']} KD epochs after compression, "
             f"TAS search {doc['tas_steps']} steps of batch 32. "
             f"Teacher test accuracy {100 * doc['teacher_accuracy']:.2f} %, {doc['teacher_params']} parameters, "
             f"{doc['teacher_flops']} FLOPs (multiply-accumulates).", "",
             "| method | parameters × fewer | FLOPs × fewer | test accuracy (%) | drop (pp) | seconds |",
             "|---|---|---|---|---|---|"]
    for method, r in t.items():
        lines.append(f"| {method} | {r['params_x'][0]:.2f} ± {r['params_x'][1]:.2f} | {r['flops_x'][0]:.2f} ± "
                     f"{r['flops_x'][1]:.2f} | {100 * r['accuracy'][0]:.2f} ± {100 * r['accuracy'][1]:.2f} | "
                     f"{r['drop_pp'][0]:.2f} ± {r['drop_pp'][1]:.2f} | {r['seconds'][0]:.0f} |")
    lines += ["", "Mean ± sd over the seeds. Parameters for `l1-unstructured` and `l1-body` (the same without "
              "pruning the head) are nonzeros (dense shapes, so their FLOPs are the teacher's); their nonzeros and "
              "`l1-structured`'s parameters are matched to the tas@0.3 "
              "student of the same seed, or to the n2n student for the `@n2n` rows (see the script's docstring). "
              "A negative drop: the student, trained for further KD epochs on the teacher's training items, beats "
              "the teacher (itself fine-tuned for a few epochs only). `kept_weights` in the JSON lists what global "
              "pruning leaves in each layer.", "",
              "Environment: " + json.dumps(doc["environment"]), ""]
    (RESULTS / "distill_compress.md").write_text("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--data", default="fashion-mnist")
    ap.add_argument("--limit", type=int, default=10000)
    ap.add_argument("--teacher-epochs", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--tas-steps", type=int, default=150)
    ap.add_argument("--add-missing", action="store_true", help="add the baselines missing from the recorded "
                    "results (same data and teacher settings) instead of a new run")
    args = ap.parse_args()
    from transferkit.distill._common import accuracy
    from transferkit.runtime import environment

    command = "OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/distill_compress.py " + " ".join(sys.argv[1:])

    seeds = [int(s) for s in args.seeds.split(",")]
    teacher, train, test = fine_tuned_teacher(args.data, args.limit, args.teacher_epochs)
    if args.add_missing:  # finish an earlier run: the baselines its runs lack, on the same (re-made) teacher
        doc = json.loads((RESULTS / "distill_compress.json").read_text())
        for run, seed in zip(doc["runs"], doc["seeds"]):
            if run["teacher"]["accuracy"] != accuracy(teacher.module.eval(), teacher, test):
                raise SystemExit("the re-made teacher differs from the recorded one")
            for method in BASELINES:
                if method not in run:
                    run[method] = baseline(method, run, teacher, train, test, doc["epochs"], seed)
                    print(f"seed {seed} {method}: {run[method]}", flush=True)
        doc["command"] += " && " + command
        doc["table"] = summary(doc["runs"])
        write(doc)
        seeds = []
    runs = []
    for seed in seeds:
        runs.append(run_seed(seed, teacher, train, test, args.epochs, args.tas_steps))
        first = runs[0]["teacher"]
        doc = {"command": command, "seeds": seeds[: len(runs)], "data": args.data, "limit": args.limit,
               "teacher_epochs": args.teacher_epochs, "epochs": args.epochs, "tas_steps": args.tas_steps,
               "n_test": first["n_test"], "teacher_accuracy": first["accuracy"],
               "teacher_params": first["params"], "teacher_flops": first["flops"], "environment": environment(),
               "table": summary(runs), "runs": runs}
        write(doc)
    print((RESULTS / "distill_compress.md").read_text())


if __name__ == "__main__":
    main()
