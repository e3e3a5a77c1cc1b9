"""Benchmark: merging fine-tunes of all-MiniLM-L6-v2 on four real text tasks (transferkit.merge).

Each task (VADER tweets sentiment, SpamAssassin spam/ham, fine-food great/other, VADER nyt sentiment)
is fine-tuned separately (the recipe of ``transferkit.tune`` method ``full``: body + a new 2-way head)
from the same pre-trained body. Each task's head is drawn from its own seed (``--heads per-task``):
``tune`` seeded the head from the run seed (until it switched to :func:`transferkit.zoo.head_seed`,
which hashes the seed with the class names), so with one seed every task's head started from the *same*
matrix; the heads barely move in a short fine-tune (cosine ≥ 0.999 to their start), so every body
then writes its class-1 evidence onto one shared feature direction and merging adds up unrelated
label meanings ("positive" tweet = "other" fine-food review = spam). ``--heads shared-seed`` keeps
that old behaviour for comparison; ``--heads lp-ft`` uses a frozen linear-probe head instead. The bodies' task vectors are merged with every method of
:mod:`transferkit.merge`; the merged body is evaluated on each task with that task's own head
(:func:`transferkit.merge.attach_head`). Reported: absolute accuracy per task, **normalized accuracy**
(merged ÷ individual fine-tune) per task and on average, the pre-trained body with the task heads
(λ = 0, lower reference) and a multitask-trained model (one body, one 8-way head whose per-task
2-logit block is read for each task; upper reference).

Hyper-parameters (λ of task arithmetic and TIES, λ_neg of negation) are chosen on a held-out
validation split (never the test split). Fine-tunes are cached on disk (``--cache``), so reruns only redo the merges.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/merge_text.py                # writes benchmarks/results/merge_text.{json,md}
    python benchmarks/merge_text.py --quick                          # tiny smoke run (not a result)
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
TASKS = ["vader:tweets", "spamassassin", "finefood", "vader:nyt"]
MODEL = "all-minilm-l6-v2"
# What was found and tried (appended to the markdown; numbers here were measured, see the text)
NOTES = """
## What was wrong before, and what was tried (issue 5)

**Root cause of finefood < chance (a benchmark bug, not a merge bug).** The previous run (`--heads shared-seed`,
plain `tune(method="full")`: TIES per-tensor 0.851, TA 0.844, average 0.807; finefood 0.38–0.42 after every merge)
gave every task's new head the *same* initial matrix, because `tune` seeds the head from the run seed. In 38
steps at lr 1e-4 the heads hardly move: for all 12 fine-tunes, cos(w₁ − w₀, its initial value) ≥ 0.9996 and
‖ΔW‖/‖W₀‖ = 0.016–0.022, so the four heads read one shared feature direction (pairwise cos ≥ 0.999). Each body
therefore learned to push its *class 1* along that direction: "positive" for the VADER tasks, "spam", and
"other" (= not great, the negative side) for finefood, whose label order is the reverse of VADER's
(classes `["great", "other"]` vs `["negative", "positive"]`). Merging adds the sentiment tasks' "positive → +u"
to finefood's "negative → +u", and the two VADER tasks win. Measured on seed 0 (shared-seed): finefood test
accuracy with the finefood head on θ₀ + λτ_tweets is 0.343 / 0.303 at λ = 0.5 / 1 (τ_nyt 0.444 / 0.444,
τ_spam 0.475 / 0.495), and τ_finefood alone turns tweets to 0.353 / 0.320 with the tweets head; after task
arithmetic (λ = 0.5) the class separation along the finefood head flips sign (mean feature difference
other − great · head direction: +1.68 under finefood's own fine-tune, −1.08 merged) and 92 of 99 test reviews
are predicted "other" (all 50 "great" ones wrong). Task-vector size is *not* the cause: ‖τ‖ = 1.47–1.68 for the
four tasks, pairwise cosines −0.04…0.18.

**Fix.** `--heads per-task` (now the default): the same recipe as `tune` method `full` (optimiser, schedule,
data order, validation split), but task i's head is drawn from seed 1000·(seed+1)+i. On seed 0 the head
directions' pairwise cosines are then −0.12…0.16, the cosine τ_tweets·τ_finefood goes from −0.029 to +0.056,
and θ₀ + λτ_tweets with the finefood head gives 0.606 / 0.747 (λ = 0.5 / 1) instead of 0.343 / 0.303.
The multitask reference has one head (nothing to collide) and is the same cached run as before.

**Also tried: LP-FT** (`--heads lp-ft`: a linear probe, 100 epochs, then the body fine-tuned under the frozen
probe head, as task arithmetic freezes its zero-shot heads). On finefood seed 0 alone it fine-tuned worse than
plain full fine-tuning: test 0.646 / 0.636 / 0.616 at lr 1e-4 / 3e-5 / 1e-5 vs 0.616 for the probe alone and
0.747 for full fine-tuning (the probe head has row norms ≈ 7.6 and the fine-tune overfits under it). It was
not pursued and no merge was run with it. (Those individual fine-tunes were judged on their test accuracy; no
merge setting was chosen with the test split.)

**Grids.** TA λ ∈ {0.2 … 1.0}, TIES λ ∈ {0.6 … 2.6} (the old TIES grid stopped at 1.4, its most frequent
choice); TIES now picks λ = 1.0 in every seed, inside the grid. λ_neg ∈ {0.25 … 2.0} chosen on validation by the
rule in the negation section (Ilharco et al.'s 95 % control criterion, applied to each control task).

**Negation, honestly.** With λ_neg chosen on validation, spam drops 47–76 pp but the other tasks move 2.0–6.0 pp
(largest *drop* 2.0 / 3.0 / 2.7 pp for seeds 0 / 1 / 2; the largest moves are *gains* on tweets, +6.0 and
+5.3 pp in seeds 1 and 2, because removing spam's task vector also removes its interference). Test sets are
small (150 items, finefood 99: 1 item = 0.67–1 pp), so the < 2 pp target is at the resolution of the data.

Note: finefood's test split is the package's official test items within the 500 sampled (99 reviews), because
`train_test_split` honours a dataset's `is_test`; the other tasks use a random 30 % (150).

**DARE λ (fixed in a later session).** DARE-linear and DARE-TIES used to reuse the λ chosen for task
arithmetic and TIES. DARE-TIES then scored 0.944 normalized, the weakest method. DARE rescales the survivors
by 1/(1−p) = 10, and TIES's disjoint mean averages only over the survivors. So on seed 0, at λ = 1, the
DARE-TIES vector had norm 9.35 against TIES's 2.15. TIES's λ = 1 over-scaled it: validation 0.753, against
0.822 at λ = 0.6. Each DARE variant now picks its own λ on validation: DARE-linear on the TA grid,
DARE-TIES on the union of both grids. They reach 0.979 and 0.977 (λ = 0.5 / 0.6 / 0.5 and 0.6 / 0.7 / 0.6).
No other method changed, except aTLAS. Its 16-shot training is not bit-reproducible on this CPU build: it
differs by one test item on 4 of 12 task-seeds, and its mean stays 0.982.
"""


def log(*a):
    print(f"[{time.strftime('%H:%M:%S')}]", *a, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------- data
def load_task(name: str, per_class: int, seed: int):
    from transferkit.data import load_dataset, train_test_split

    ds = load_dataset(name, per_class=per_class, seed=seed)
    rest, test = train_test_split(ds, test_size=0.3, seed=seed)
    train, val = train_test_split(rest, test_size=0.2, seed=seed)
    return train, val, test


class Batches:
    """Pre-tokenised, length-sorted evaluation batches of one split (tokenised once, reused)."""

    def __init__(self, zm, ds, batch_size: int = 64):
        order = np.argsort([len(str(t)) for t in ds.X])
        self.batches = []
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            self.batches.append((zm.preprocess([ds.X[i] for i in idx]), torch.as_tensor(ds.y[idx]).long()))
        self.n = len(ds.y)


@torch.no_grad()
def accuracy(clf, batches: Batches, block: slice | None = None) -> float:
    clf.eval()
    correct = 0
    for x, y in batches.batches:
        logits = clf(x)
        if block is not None:
            logits = logits[:, block]
        correct += int((logits.argmax(-1) == y).sum())
    return correct / batches.n


# ---------------------------------------------------------------------------------------- models
class Evaluator:
    """One working classifier whose weights are reset to base + Delta for every evaluation."""

    def __init__(self, zm, n_classes: int = 2):
        from transferkit.zoo import Classifier

        self.clf = Classifier(copy.deepcopy(zm.backbone), zm.feature_dim, n_classes)
        self.base = {k: v.clone() for k, v in self.clf.state_dict().items()}

    def load(self, delta, scale: float = 1.0):
        from transferkit.delta import apply

        self.clf.load_state_dict(self.base)
        apply(self.clf, delta, scale)
        return self.clf

    def task_acc(self, body, task_delta, batches: Batches) -> float:
        from transferkit.merge import attach_head

        return accuracy(self.load(attach_head(body, task_delta)), batches)


def _fit(zm, ds, seed, cfg, run: Path, heads: str, head_seed: int | None = None):
    """Fine-tune on ``ds`` into the run folder ``run``; returns ``(Delta, metrics)`` (cached on disk).

    ``head_seed=None``: :func:`transferkit.tune.tune` method ``full`` (backbone + a fresh head as tune
    draws it, trained end to end). Otherwise the same recipe (optimiser, schedule, data order,
    validation split: those of ``full``) with the head drawn from ``head_seed``; with
    ``heads="lp-ft"`` the head is instead a linear probe on the frozen pre-trained body, kept frozen
    while the body is fine-tuned (LP-FT, Kumar et al. ICLR'22, with the head frozen as task
    arithmetic freezes its zero-shot heads).
    """
    from transferkit.data.dataset import split_mask
    from transferkit.delta import Delta, from_states
    from transferkit.engine import TrainConfig
    from transferkit.io import write_json
    from transferkit.tune import tune
    from transferkit.tune._common import fit_and_evaluate
    from transferkit.tune.registry import split_config

    if (run / "delta" / "delta.json").is_file():
        return Delta.load(run / "delta"), json.loads((run / "metrics.json").read_text())
    log(f"fine-tuning {ds.name} (seed {seed}, {len(ds.y)} examples, heads {heads}, head seed {head_seed})")
    if head_seed is None:
        res = tune(zm, ds, None, method="full", config={**cfg, "seed": seed}, out_dir=run, progress=False)
        return res.delta, res.metrics
    t0 = time.perf_counter()
    clf = zm.classifier(len(ds.classes), seed=head_seed)
    clf.backbone = copy.deepcopy(zm.backbone)
    clf.requires_grad_(True)
    if heads == "lp-ft":
        lp = tune(zm, ds, None, method="linear", config={"epochs": 100, "seed": seed}, out_dir=run / "lp",
                  progress=False)
        clf.head.load_state_dict({k[len("new.head."):]: v for k, v in lp.delta.tensors.items()})
        clf.head.requires_grad_(False)
    base_state = {"backbone." + k: v.detach().clone() for k, v in zm.backbone.state_dict().items()}
    _, train_opts = split_config("full", {**cfg, "seed": seed})
    tcfg = TrainConfig.from_dict({**train_opts, "progress": False})
    val_mask = split_mask(ds, 0.1, tcfg.seed)  # the split tune() makes for method "full"
    result, _ = fit_and_evaluate(clf, zm, ds.subset(~val_mask), ds.subset(val_mask), None, tcfg, run, False)
    tuned = {"backbone." + k: v for k, v in clf.backbone.state_dict().items()}
    tuned.update({"head." + k: v for k, v in clf.head.state_dict().items()})
    delta = from_states(base_state, tuned, base_name=zm.name, meta={"method": f"full ({heads} head)"})
    metrics = {"method": f"full ({heads} head)", "head_seed": head_seed, "seconds": round(time.perf_counter() - t0, 2),
               **{(k if k.startswith(("val_", "train_")) else f"train_{k}"): v for k, v in result.metrics.items()}}
    delta.save(run / "delta")
    write_json(run / "metrics.json", metrics)
    return delta, metrics


def finetune(zm, name, train, seed, cfg, cache: Path, heads: str, index: int):
    """Fine-tune on task number ``index`` (cached run folder); returns ``(Delta, metrics)``.

    ``heads="shared-seed"``: every task's head starts from the same matrix (seeded by ``seed``) — what
    ``tune`` did before it seeded new heads from (seed, class names) (:func:`transferkit.zoo.head_seed`);
    its cached runs were made by ``tune(method="full")`` then. ``"per-task"`` draws each task's head
    from its own seed.
    """
    head_seed = seed if heads == "shared-seed" else 1000 * (seed + 1) + index
    return _fit(zm, train, seed, cfg, cache / f"{name.replace(':', '_')}-s{seed}", heads, head_seed)


def multitask(zm, tasks, trains, seed, cfg, cache: Path):
    """One body + one 2T-way head trained on the union (task t owns logits 2t, 2t+1); ``tune`` method ``full``."""
    from transferkit.data import make_dataset

    X, y, classes = [], [], []
    for t, (name, tr) in enumerate(zip(tasks, trains)):
        X += [str(x) for x in tr.X]
        y += [len(classes) + int(c) for c in tr.y]
        classes += [f"{t}:{c}" for c in tr.classes]
    ds = make_dataset("multitask", X, y, classes=classes, modality="text")
    return _fit(zm, ds, seed, cfg, cache / f"multitask-s{seed}", "shared-seed")[0]


# ---------------------------------------------------------------------------------------- fisher
def fisher_of(ev: Evaluator, zm, task_delta, train, n: int, seed: int):
    from transferkit.merge import compute_fisher

    clf = ev.load(task_delta)
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(train.y), size=min(n, len(train.y)), replace=False)
    batches = [zm.preprocess([train.X[i] for i in idx[s:s + 4]]) for s in range(0, len(idx), 4)]
    params = [k for k, p in clf.named_parameters() if k.startswith("backbone.")]
    for p in clf.parameters():
        p.requires_grad_(True)
    try:
        return compute_fisher(clf, batches, params=params, method="vmap"), "vmap"
    except Exception as exc:  # torch.func cannot trace every HF attention path
        log(f"vmap Fisher failed ({type(exc).__name__}: {str(exc)[:80]}); per-example loop instead")
        return compute_fisher(clf, batches, params=params, method="loop"), "loop"


# ---------------------------------------------------------------------------------------- aTLAS
class _HeadsObjective:
    """Cross-entropy of the composed body + the frozen head of each example's task."""

    def __init__(self, heads):
        self.heads = heads

    def __call__(self, model, batch):
        inputs = dict(batch["inputs"])
        task = inputs.pop("task")
        feats = model(inputs)
        loss = 0.0
        for t, head in enumerate(self.heads):
            m = task == t
            if m.any():
                loss = loss + torch.nn.functional.cross_entropy(head(feats[m]), batch["labels"][m], reduction="sum")
        loss = loss / len(task)
        return loss, {"loss": float(loss.detach())}


def atlas_merge(zm, deltas, trains, shots: int, seed: int, init: float, epochs: int, lr: float):
    """aTLAS few-shot: learn one coefficient per task per tensor of the body on ``shots`` per class."""
    from transferkit.delta import NEW, Delta
    from transferkit.merge import AnisotropicScaling, few_shot, fit_atlas

    pre = "backbone."
    body_deltas = [Delta(d.base, "full", {k[len(pre):]: v for k, v in d.tensors.items() if k.startswith(pre)}, {})
                   for d in deltas]
    heads = []
    for d in deltas:
        h = torch.nn.Linear(zm.feature_dim, 2)
        h.load_state_dict({"weight": d.tensors[NEW + "head.weight"], "bias": d.tensors[NEW + "head.bias"]})
        h.requires_grad_(False)
        heads.append(h)
    texts, labels, tasks = [], [], []
    for t, tr in enumerate(trains):
        idx, y = few_shot(np.arange(len(tr.y)), tr.y, shots, seed=seed)
        texts += [tr.X[i] for i in idx.tolist()]
        labels += y.tolist()
        tasks += [t] * len(idx)
    enc = zm.preprocess(texts)  # padded to the longest (≤ max_length): tensors index by example
    X = {**{k: v for k, v in enc.items()}, "task": torch.tensor(tasks)}
    backbone = copy.deepcopy(zm.backbone)
    composer = AnisotropicScaling(backbone, body_deltas, blockwise=True, init=init, seed=seed)
    res = fit_atlas(composer, (X, torch.tensor(labels)), _HeadsObjective(heads), epochs=epochs, lr=lr,
                    batch_size=32, seed=seed)
    merged = Delta(deltas[0].base, "full", {pre + k: v for k, v in res.delta.tensors.items()},
                   {"method": "atlas", "n_trainable": composer.n_trainable, "shots": shots, "init": init})
    return merged, composer.n_trainable, res.history


# ---------------------------------------------------------------------------------------- main
def run_seed(seed: int, args, zm, cache: Path) -> dict:
    from transferkit.delta import Delta
    from transferkit.merge import (
        average,
        dare_merge,
        fisher_merge,
        negate,
        task_arithmetic,
        ties,
    )

    tasks = args.tasks
    splits = [load_task(t, args.per_class, seed) for t in tasks]
    trains = [s[0] for s in splits]
    val_b = [Batches(zm, s[1]) for s in splits]
    test_b = [Batches(zm, s[2]) for s in splits]
    sizes = {t: {"train": len(s[0].y), "val": len(s[1].y), "test": len(s[2].y)} for t, s in zip(tasks, splits)}
    cfg = {"epochs": args.epochs, "lr": args.lr, "batch_size": 16}
    deltas, ft_metrics = [], {}
    for t, tr in zip(tasks, trains):
        d, m = finetune(zm, t, tr, seed, cfg, cache, args.heads, len(deltas))
        d.meta["name"] = t
        deltas.append(d)
        ft_metrics[t] = {"seconds": m.get("seconds")}
    ev = Evaluator(zm)
    out: dict = {"seed": seed, "sizes": sizes, "methods": {}, "selection": {}, "timing": {}}

    def score(body, which="test"):
        bs = test_b if which == "test" else val_b
        return [ev.task_acc(body, d, b) for d, b in zip(deltas, bs)]

    def record(name, body, extra=None, t0=None):
        accs = score(body)
        out["methods"][name] = {"acc": dict(zip(tasks, accs)), **(extra or {})}
        if t0 is not None:
            out["timing"][name] = round(time.perf_counter() - t0, 1)
        log(f"seed {seed} {name}: " + " ".join(f"{a:.3f}" for a in accs))
        return accs

    def pick(name, make, grid):
        """Choose the grid value with the best mean validation accuracy; record it on test."""
        t0 = time.perf_counter()
        vals = {}
        for g in grid:
            vals[g] = float(np.mean(score(make(g), "val")))
        best = max(grid, key=lambda g: (vals[g], -abs(g - 1)))
        out["selection"][name] = {"grid": {str(g): round(v, 4) for g, v in vals.items()}, "chosen": best}
        record(name, make(best), {"param": best}, t0)
        return best

    # individual fine-tunes and the pre-trained body (λ = 0) with each task's head
    indiv = [accuracy(ev.load(d), b) for d, b in zip(deltas, test_b)]
    out["methods"]["individual"] = {"acc": dict(zip(tasks, indiv))}
    log(f"seed {seed} individual: " + " ".join(f"{a:.3f}" for a in indiv))
    zero = Delta(deltas[0].base, "full", {}, {})
    record("pre-trained body + task heads", zero)
    mt = multitask(zm, tasks, trains, seed, cfg, args.cache / args.base_key)
    mt_ev = Evaluator(zm, n_classes=2 * len(tasks))
    clf = mt_ev.load(mt)
    out["methods"]["multitask (upper ref.)"] = {"acc": {t: accuracy(clf, b, slice(2 * i, 2 * i + 2))
                                                        for i, (t, b) in enumerate(zip(tasks, test_b))}}
    log(f"seed {seed} multitask: {out['methods']['multitask (upper ref.)']['acc']}")

    t0 = time.perf_counter()
    record("average", average(deltas), t0=t0)
    lam_ta = pick("task arithmetic", lambda g: task_arithmetic(deltas, g), args.ta_grid)
    pick("TIES global", lambda g: ties(deltas, k=0.2, lam=g, scope="global"), args.ties_grid)
    pick("TIES per-tensor", lambda g: ties(deltas, k=0.2, lam=g, scope="per_tensor"), args.ties_grid)
    # DARE rescales the survivors by 1/(1−p): under TIES's disjoint mean (survivors only) the merged
    # vector is ~4× TIES's in norm, so DARE-TIES needs its own λ (TIES's λ = 1 over-scales it). Each DARE
    # variant picks λ on validation like the others: DARE-linear on TA's grid, DARE-TIES on both grids.
    dare_grid = sorted(set(args.ta_grid) | set(args.ties_grid))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pick(f"DARE-linear (p={args.dare_p})", lambda g: dare_merge(deltas, p=args.dare_p, seed=seed, lam=g),
             args.ta_grid)
        pick(f"DARE-TIES (p={args.dare_p}, global)",
             lambda g: dare_merge(deltas, p=args.dare_p, seed=seed, merge="ties", k=0.2, lam=g, scope="global"),
             dare_grid)
    out["mean_abs_delta"] = {t: float(sum(v.abs().sum() for k, v in d.tensors.items() if not k.startswith("new."))
                                      / sum(v.numel() for k, v in d.tensors.items() if not k.startswith("new.")))
                             for t, d in zip(tasks, deltas)}

    t0 = time.perf_counter()
    fishers, how = [], None
    for d, tr in zip(deltas, trains):
        f, how = fisher_of(ev, zm, d, tr, args.fisher_n, seed)
        fishers.append(f)
    record(f"Fisher ({args.fisher_n} ex./task, {how})", fisher_merge(deltas, fishers), t0=t0)
    del fishers

    t0 = time.perf_counter()
    merged, n_coef, hist = atlas_merge(zm, deltas, trains, args.shots, seed, lam_ta, args.atlas_epochs, args.atlas_lr)
    record(f"aTLAS ({args.shots}-shot/class, blockwise)", merged,
           {"n_trainable": n_coef, "final_train_loss": hist[-1]["train_loss"] if hist else None}, t0)

    # negation: forget one task from the task-arithmetic merge. λ_neg is chosen on validation with the
    # criterion of Ilharco et al. (ICLR'23): the lowest target accuracy such that control accuracy stays
    # ≥ neg_keep (95%) of what it was before negating — here for *each* control task (the other tasks).
    target = tasks.index(args.negate)
    ta = task_arithmetic(deltas, lam_ta)
    ref, ref_val = score(ta), score(ta, "val")
    neg = {}
    for lam in args.neg_grid:
        body = task_arithmetic([ta, negate(deltas[target], lam)], 1.0)
        accs, vals = score(body), score(body, "val")
        others = [100 * (a - r) for i, (a, r) in enumerate(zip(accs, ref)) if i != target]
        neg[str(lam)] = {"acc": dict(zip(tasks, accs)),
                         "target_drop_pp": 100 * (ref[target] - accs[target]),
                         "others_max_abs_change_pp": max(abs(o) for o in others),
                         "others_mean_change_pp": float(np.mean(others)),
                         "val_target_acc": vals[target],
                         "val_control_retained_min": min(v / r for i, (v, r) in enumerate(zip(vals, ref_val))
                                                         if i != target)}
        log(f"seed {seed} negate {args.negate} λ={lam}: {neg[str(lam)]}")
    ok = [g for g in args.neg_grid if neg[str(g)]["val_control_retained_min"] >= args.neg_keep] or [min(args.neg_grid)]
    chosen = min(ok, key=lambda g: (neg[str(g)]["val_target_acc"], g))
    out["negation"] = {"target": args.negate, "from": f"task arithmetic (λ={lam_ta})", "reference": dict(zip(tasks, ref)),
                       "by_lambda": neg, "chosen": chosen,
                       "rule": f"lowest val target acc with every control task ≥ {args.neg_keep:g} × its val acc before"}
    out["fine_tune"] = ft_metrics
    return out


def summarise(runs: list[dict], tasks: list[str]) -> dict:
    methods = list(runs[0]["methods"])
    table = {}
    for m in methods:
        per_seed_abs = [[r["methods"][m]["acc"][t] for t in tasks] for r in runs]
        per_seed_norm = [[r["methods"][m]["acc"][t] / r["methods"]["individual"]["acc"][t] for t in tasks] for r in runs]
        a, n = np.array(per_seed_abs), np.array(per_seed_norm)
        table[m] = {"abs": dict(zip(tasks, a.mean(0).round(4).tolist())),
                    "norm": dict(zip(tasks, n.mean(0).round(4).tolist())),
                    "abs_avg": round(float(a.mean()), 4), "norm_avg": round(float(n.mean()), 4),
                    "norm_avg_std_over_seeds": round(float(n.mean(1).std()), 4) if len(runs) > 1 else None}
    return table


def markdown(result: dict) -> str:
    tasks, table = result["tasks"], result["table"]
    short = [t.replace("vader:", "") for t in tasks]
    lines = [f"# merge_text: merging {len(tasks)} full fine-tunes of {MODEL}", "",
             f"Command: `{result['command']}`  ", f"Seeds: {result['seeds']}; wall time {result['seconds']:.0f} s; "
             f"{result['notes']}", "",
             "| method | " + " | ".join(f"{s} acc (norm)" for s in short) + " | avg acc | **avg normalized** |",
             "|---|" + "---|" * (len(tasks) + 2)]
    for m, row in table.items():
        cells = [f"{row['abs'][t]:.3f} ({row['norm'][t]:.2f})" for t in tasks]
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {row['abs_avg']:.3f} | **{row['norm_avg']:.3f}** |")
    lines += ["", "Normalized accuracy = merged ÷ individual fine-tune on the same test split (per task, then "
              "averaged). λ chosen on the validation split:"]
    for r in result["runs"]:
        for m, sel in r["selection"].items():
            lines.append(f"- seed {r['seed']} {m}: grid {sel['grid']} → λ = {sel['chosen']}")
    lines += ["", "## Negation (forget one task from the task-arithmetic merge)", "",
              f"λ_neg chosen on validation: {result['runs'][0]['negation']['rule']} (chosen row in bold).", "",
              ("| seed | λ_neg | target task | val: target acc | val: control kept (min) | target drop (pp) | "
               "others: max abs change (pp) | others: mean change (pp) |"),
              "|---|---|---|---|---|---|---|---|"]
    for r in result["runs"]:
        neg = r["negation"]
        for lam, v in neg["by_lambda"].items():
            b = "**" if lam == str(neg["chosen"]) else ""
            lines.append(f"| {r['seed']} | {b}{lam}{b} | {neg['target']} | {v['val_target_acc']:.3f} | "
                         f"{v['val_control_retained_min']:.3f} | {b}{v['target_drop_pp']:.1f}{b} | "
                         f"{b}{v['others_max_abs_change_pp']:.1f}{b} | {v['others_mean_change_pp']:+.1f} |")
    lines += ["", "## Targets (issue 5)", ""]
    for k, v in result["targets"].items():
        lines.append(f"- {k}: **{'met' if v['met'] else 'missed'}** ({v['detail']})")
    lines += ["", NOTES.strip()] if NOTES.strip() else []
    return "\n".join(lines) + "\n"


def targets(table: dict, runs: list[dict]) -> dict:
    def norm(prefix):
        return max((v["norm_avg"] for k, v in table.items() if k.startswith(prefix)), default=float("nan"))

    ties_n, ta_n, avg_n = norm("TIES"), table["task arithmetic"]["norm_avg"], table["average"]["norm_avg"]
    fisher_n = norm("Fisher")
    merged = {k: v["norm_avg"] for k, v in table.items() if k not in ("individual", "multitask (upper ref.)",
                                                                       "pre-trained body + task heads")}
    best = max(merged, key=merged.get)
    chosen = [r["negation"]["by_lambda"][str(r["negation"]["chosen"])] for r in runs]
    # rounded: a move of 3/150 test items is 2.0 pp, not 1.99999… (float noise must not meet the target)
    drop = round(float(np.mean([v["target_drop_pp"] for v in chosen])), 6)
    moved = round(float(np.mean([v["others_max_abs_change_pp"] for v in chosen])), 6)
    falls = [max(0.0, max(100 * (r["negation"]["reference"][t] - a) for t, a in v["acc"].items()
                          if t != r["negation"]["target"])) for r, v in zip(runs, chosen)]
    fall = float(np.mean(falls))
    return {
        "TIES > task arithmetic > average": {"met": bool(ties_n > ta_n > avg_n),
                                             "detail": f"best TIES {ties_n:.3f}, TA {ta_n:.3f}, average {avg_n:.3f}"},
        "best method ≥ 90% normalized": {"met": bool(merged[best] >= 0.9), "detail": f"{best}: {merged[best]:.3f}"},
        "Fisher ≥ average": {"met": bool(fisher_n >= avg_n), "detail": f"Fisher {fisher_n:.3f}, average {avg_n:.3f}"},
        "negation (λ_neg chosen on val): target drop > 20 pp, others < 2 pp": {
            "met": bool(drop > 20 and moved < 2),
            "detail": f"mean over seeds: drop {drop:.1f} pp, others' largest move {moved:.1f} pp (largest fall "
                      f"{fall:.1f} pp); per seed: " + "; ".join(
                f"seed {r['seed']} λ={r['negation']['chosen']}: drop {v['target_drop_pp']:.1f}, others max "
                f"{v['others_max_abs_change_pp']:.1f}" for r, v in zip(runs, chosen))},
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--per-class", type=int, default=250)
    ap.add_argument("--max-length", type=int, default=48)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--heads", choices=["per-task", "shared-seed", "lp-ft"], default="per-task",
                    help="per-task: each task's new head drawn from its own seed; shared-seed: every "
                         "task's head starts from the same matrix (tune's old behaviour); lp-ft: "
                         "linear-probe head, frozen while the body is fine-tuned")
    ap.add_argument("--ta-grid", default="0.2,0.3,0.4,0.5,0.6,0.7,0.8,1.0")
    ap.add_argument("--ties-grid", default="0.6,1.0,1.4,1.8,2.2,2.6")
    ap.add_argument("--dare-p", type=float, default=0.9)
    ap.add_argument("--fisher-n", type=int, default=64)
    ap.add_argument("--shots", type=int, default=16)
    ap.add_argument("--atlas-epochs", type=int, default=8)
    ap.add_argument("--atlas-lr", type=float, default=1e-2)
    ap.add_argument("--negate", default="spamassassin")
    ap.add_argument("--neg-grid", default="0.25,0.5,0.75,1.0,1.5,2.0")
    ap.add_argument("--neg-keep", type=float, default=0.95, help="control tasks keep ≥ this fraction (val)")
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "transferkit" / "derived" / "merge_text")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="tiny smoke run, written to /tmp, not a result")
    ap.add_argument("--render", type=Path, help="recompute the targets and rewrite this result JSON and its markdown (no training)")
    args = ap.parse_args(argv)
    from transferkit.io import write_text

    if args.render:
        result = json.loads(args.render.read_text())
        result["targets"] = targets(result["table"], result["runs"])
        write_text(args.render, json.dumps(result, indent=2, default=str) + "\n")
        write_text(args.render.with_suffix(".md"), markdown(result))
        return 0
    args.tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    for k in ("ta_grid", "ties_grid", "neg_grid"):
        setattr(args, k, [float(x) for x in getattr(args, k).split(",")])
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.quick:
        args.per_class, args.epochs, args.fisher_n, args.shots, args.atlas_epochs = 20, 1, 4, 2, 1
        args.ta_grid, args.ties_grid, args.neg_grid = [0.5], [1.0], [1.0]
        args.cache = Path("/tmp/merge_text_quick")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from transferkit.zoo import load_model

    t0 = time.perf_counter()
    zm = load_model(MODEL, max_length=args.max_length)
    args.base_key = f"pc{args.per_class}-ml{args.max_length}-e{args.epochs}-lr{args.lr:g}"
    cache = args.cache / (args.base_key + ("" if args.heads == "shared-seed" else f"-{args.heads}"))
    runs = [run_seed(s, args, zm, cache) for s in seeds]
    table = summarise(runs, args.tasks)
    result = {
        "benchmark": "merge_text", "model": MODEL, "tasks": args.tasks, "seeds": seeds,
        "command": "OMP_NUM_THREADS=1 python benchmarks/merge_text.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "notes": (f"full fine-tunes ({args.epochs} epochs, lr {args.lr:g}, batch 16, max_length {args.max_length}, "
                  f"heads: {args.heads}); "
                  f"{args.per_class}/class sampled per task, split 70/30 train+val/test, val = 20% of train+val. "
                  + ("ONE seed only (CPU budget): no spread over seeds." if len(seeds) == 1 else "")),
        "table": table, "runs": runs, "seconds": time.perf_counter() - t0,
    }
    result["targets"] = targets(table, runs)
    md = markdown(result)
    dest = Path("/tmp") if args.quick else RESULTS
    dest.mkdir(parents=True, exist_ok=True)
    write_text(dest / "merge_text.json", json.dumps(result, indent=2, default=str) + "\n")
    write_text(dest / "merge_text.md", md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
