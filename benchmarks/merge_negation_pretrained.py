"""Benchmark: task negation as Ilharco et al. run it — forgetting from the *pre-trained* model.

"Editing Models with Task Arithmetic" (Ilharco et al., ICLR'23, Table 1) forgets a task by editing the
pre-trained model, θ = θ_pre − λ·τ_target, with every task read through a head that is **frozen**
during fine-tuning (CLIP's zero-shot text heads), so the task vector lives in the one body that all
heads read. The control is the pre-trained model on other tasks, which must keep ≥ 95 % of its
accuracy. ``benchmarks/merge_negation.py`` measures a harder variant (forgetting from the four-task
merge, with heads trained jointly with each body); this script is the paper's setting transposed to
all-MiniLM-L6-v2 and the same four text tasks, on the same held-out halves.

Protocol, per seed (declared before the run):

1. Data: merge_text's 500 sampled items per task and split (``merge_text.load_task``); held-out val
   and test halves as in ``merge_negation.held_out`` (≤ ``--cap`` per class per split, none seen).
2. Heads (the analogue of zero-shot heads): a linear probe per task on the frozen pre-trained body,
   trained on the task's train split (``tune`` method ``linear``, 100 epochs — the LP step of
   merge_text's ``--heads lp-ft``). "Before negation" = pre-trained body + each task's probe.
3. τ_target: the body fine-tuned on the target's train split under its frozen probe head (LP-FT,
   merge_text's ``--heads lp-ft``: 2 epochs, lr 1e-4, batch 16). No control task is fine-tuned.
4. For each λ in the grid: θ_pre − λ·τ_target, each task scored with its own probe, on both halves.
   Also, at the λ chosen by rule (a), Ilharco's random-vector control: a Gaussian vector with each
   tensor's norm equal to τ_target's, subtracted the same way.
5. aTLAS negation (Zhang et al., NeurIPS'24, ``transferkit.merge.fit_negation``; ``--methods atlas``):
   one coefficient per tensor of τ_target, from 0, trained on the validation halves (target and the
   pooled controls, 16 + 16 per step) by gradient ascent on the target's cross-entropy and descent on
   the controls', AdamW lr 5e-3, weight decay 0.1, clipping 1, 10 epochs; the epoch kept is the one
   with the lowest validation target accuracy whose every control keeps ≥ 95 % (the reference's rule,
   which also trains and selects on validation). Reported on the test half like the λ grid.
6. λ is chosen on validation by merge_negation's two rules: (a) Ilharco, every control ≥ 95 % of its
   validation accuracy before; (b) strict, every control within ±1 pp. Reported on test: target drop
   vs before, each control's change with a 95 % paired bootstrap interval.

Target (issue 5): "negation drops the negated task by > 20 pp while the others move < 2 pp" — per seed
and on the mean, |change| of every control < 2 pp (gains count as moves).

Usage::

    OMP_NUM_THREADS=1 python benchmarks/merge_negation_pretrained.py --seeds 0 --out /tmp/neg_s0.json
    python benchmarks/merge_negation_pretrained.py --combine /tmp/neg_s0.json /tmp/neg_s1.json ...
                                        # → benchmarks/results/merge_negation_pretrained.{json,md}
    python benchmarks/merge_negation_pretrained.py --quick        # smoke run in /tmp (not a result)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import merge_negation as mn
import merge_text as mt

RESULTS = mt.RESULTS
short, log = mn.short, mn.log


def probe(zm, name: str, train, seed: int, run: Path):
    """The task's linear-probe head on the frozen pre-trained body (cached in ``run/lp``)."""
    from transferkit.delta import Delta
    from transferkit.tune import tune

    if (run / "lp" / "delta" / "delta.json").is_file():
        return Delta.load(run / "lp" / "delta")
    log(f"linear probe {name} (seed {seed}, {len(train.y)} examples)")
    res = tune(zm, train, None, method="linear", config={"epochs": 100, "seed": seed}, out_dir=run / "lp",
               progress=False)
    return res.delta


def random_like(delta, seed: int):
    """Ilharco's control: a Gaussian Delta whose every body tensor has the norm of ``delta``'s."""
    from transferkit.delta import NEW, Delta

    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for k, v in delta.tensors.items():
        if k.startswith(NEW) or not v.is_floating_point():
            continue
        r = torch.randn(v.shape, generator=g, dtype=torch.float64)
        tensors[k] = (r * (v.double().norm() / r.norm())).to(v.dtype)
    return Delta(delta.base, "full", tensors, {"name": "random"})


def atlas_negation(zm, tau, probes, val_sets, target: int, args, seed: int, score, row) -> dict:
    """aTLAS negation on the validation halves (protocol step 5); returns the test row and the history."""
    import copy

    from transferkit.delta import NEW, Delta
    from transferkit.merge import AnisotropicScaling, fit_negation

    pre = "backbone."
    body = Delta(tau.base, "full", {k[len(pre):]: v for k, v in tau.tensors.items() if k.startswith(pre)}, {})
    heads = []
    for p in probes:
        h = torch.nn.Linear(zm.feature_dim, 2)
        h.load_state_dict({"weight": p.tensors[NEW + "head.weight"], "bias": p.tensors[NEW + "head.bias"]})
        heads.append(h.requires_grad_(False))

    def data(tasks):
        texts = [str(x) for t in tasks for x in val_sets[t].X]
        ids = [t for t in tasks for _ in val_sets[t].y]
        enc = zm.preprocess(texts)
        return {**enc, "task": torch.tensor(ids)}, torch.as_tensor(np.concatenate([val_sets[t].y for t in tasks]))

    controls = [t for t in range(len(probes)) if t != target]
    composer = AnisotropicScaling(copy.deepcopy(zm.backbone), [body], blockwise=True)

    def as_body(delta):
        return Delta(tau.base, "full", {pre + k: v for k, v in delta.tensors.items()}, {})

    def evaluate(comp):
        accs = [float(c.mean()) for c in score(as_body(comp.merged_delta()), "val")]
        log(f"seed {seed} aTLAS epoch: val " + " ".join(f"{short(t)} {a:.3f}" for t, a in zip(args.tasks, accs)))
        return accs[target], {args.tasks[t]: accs[t] for t in controls}

    t0 = time.perf_counter()
    res = fit_negation(composer, data([target]), data(controls), mt._HeadsObjective(heads), evaluate,
                       epochs=args.atlas_epochs, lr=args.atlas_lr, batch_size=16, seed=seed)
    lam = res.coefficients["task_0"]
    return {"epoch": res.epoch, "history": res.history, "seconds": round(time.perf_counter() - t0, 1),
            "coef_min": min(lam.values()), "coef_max": max(lam.values()), "coef_mean": float(np.mean(list(lam.values()))),
            "n_coef": len(lam), **row(as_body(res.delta))}


def run_seed(seed: int, args, zm) -> dict:
    from transferkit.data import load_dataset
    from transferkit.delta import NEW, Delta
    from transferkit.merge import attach_head, negate

    tasks, target = args.tasks, args.tasks.index(args.negate)
    cfg = {"epochs": args.epochs, "lr": args.lr, "batch_size": 16}
    probes, vals, tests, sizes, val_sets = [], [], [], {}, []
    for i, t in enumerate(tasks):
        train, _, _ = mt.load_task(t, args.per_class, seed)
        run = args.cache / f"{t.replace(':', '_')}-s{seed}"
        if i == target:  # LP-FT: probe, then the body under the frozen probe
            tau, fit = mt._fit(zm, train, seed, cfg, run, "lp-ft", 1000 * (seed + 1) + i)
        probes.append(probe(zm, t, train, seed, run))
        sampled = load_dataset(t, per_class=args.per_class, seed=seed)
        hv, ht, info = mn.held_out(t, sampled, args.cap, seed)
        sizes[t] = info
        val_sets.append(hv)
        vals.append(mt.Batches(zm, hv))
        tests.append(mt.Batches(zm, ht))
    ev = mt.Evaluator(zm)

    def score(body, which):
        return [mn.correct(ev.load(attach_head(body, p)), b) for p, b in zip(probes, vals if which == "val" else tests)]

    zero = Delta(probes[0].base, "full", {}, {})
    t0 = time.perf_counter()
    pre_val, pre_test = score(zero, "val"), score(zero, "test")
    log(f"seed {seed} one evaluation (val+test, {len(tasks)} tasks): {time.perf_counter() - t0:.1f} s")
    ft_test = mn.correct(ev.load(tau), tests[target])  # τ with its own (probe) head
    out = {
        "seed": seed,
        "sizes": sizes,
        "target_finetune": {"metrics": fit, "test_acc": float(ft_test.mean()),
                            "tau_norm": float(torch.sqrt(sum((v.double() ** 2).sum() for k, v in tau.tensors.items()
                                                              if not k.startswith(NEW)))),
                            "probe_head_changed": bool(any(k.startswith(NEW) and not torch.equal(v, probes[target].tensors[k])
                                                           for k, v in tau.tensors.items()))},
        "reference": {"val": {t: float(c.mean()) for t, c in zip(tasks, pre_val)},
                      "test": {t: float(c.mean()) for t, c in zip(tasks, pre_test)}},
    }

    def row(body):
        return mn.grid_row(score(body, "val"), score(body, "test"), out["reference"]["val"], pre_test, tasks,
                           args.negate, args.n_boot, seed)

    if "atlas" in args.methods:
        out["atlas"] = atlas_negation(zm, tau, probes, val_sets, target, args, seed, score, row)
    if "grid" not in args.methods:
        out["seconds"] = round(time.perf_counter() - t0, 1)
        return out
    out["by_lambda"] = {}
    for lam in args.neg_grid:
        r = out["by_lambda"][str(lam)] = row(negate(tau, lam))
        log(f"seed {seed} λ={lam}: val " + " ".join(f"{short(t)} {r['val_acc'][t]:.3f}" for t in tasks)
            + " | test Δpp " + " ".join(f"{short(t)} {r['test_change'][t]['change_pp']:+.1f}" for t in tasks))
    out["chosen"] = mn.choose(out["by_lambda"], args)
    lam_a = out["chosen"]["ilharco"]["lambda"]
    out["random_vector"] = {"lambda": lam_a, **row(negate(random_like(tau, seed), lam_a))}
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def markdown(result: dict) -> str:
    tasks, neg = result["tasks"], result["negate"]
    controls = [t for t in tasks if t != neg]
    s = result["settings"]
    L = [
        f"# merge_negation_pretrained: forgetting {neg} from the pre-trained model (Ilharco et al.'s setting)",
        "",
        f"Commands: {', '.join(f'`{c}`' for c in result['commands'])}  ",
        f"Seeds: {result['seeds']}; wall time {result['seconds']:.0f} s (sum over processes); model {result['model']}; "
        f"cache `{result['cache']}`.",
        "",
        f"θ = θ_pre − λ·τ_{neg}; every task is read through its linear-probe head on the frozen pre-trained body, "
        f"and τ_{neg} is the body fine-tuned under {neg}'s frozen probe (LP-FT, {s['epochs']} epochs, lr {s['lr']:g}). "
        f"\"Before\" is the pre-trained body with the probes. λ is chosen on the held-out validation half; "
        f"numbers marked test are on the disjoint test half (≤ {s['cap']} per class per split). Rules:",
        "",
    ]
    L += [f"- {mn.RULES[k].format(keep=s['neg_keep'], pp=s['strict_pp'])}" for k in mn.RULES]
    L += ["", '## Summary: target "drop > 20 pp, others move < 2 pp" (test half)', "",
          "| rule | seed | λ | target drop (pp) [95 % CI] | " + " | ".join(f"{short(t)} Δ (pp) [95 % CI]" for t in controls)
          + " | max abs change | met? |", "|---|---|---|---|" + "---|" * len(controls) + "---|---|"]
    for rule in mn.RULES:
        for r in result["runs"]:
            lam = r["chosen"][rule]["lambda"]
            v = r["by_lambda"][str(lam)]
            d = v["test_change"][neg]
            met = next(p for p in result["verdicts"][rule]["per_seed"] if p["seed"] == r["seed"])["met"]
            fb = " (fallback)" if r["chosen"][rule]["fallback"] else ""
            L.append(f"| {rule} | {r['seed']} | {lam:g}{fb} | {-d['change_pp'] + 0.0:.1f} [{-d['ci95_pp'][1] + 0.0:.1f}, "
                     f"{-d['ci95_pp'][0] + 0.0:.1f}] | " + " | ".join(mn.ci(v["test_change"][t]) for t in controls)
                     + f" | {v['test_others_max_abs_change_pp']:.1f} | **{'met' if met else 'missed'}** |")
    L.append("")
    for rule, v in result["verdicts"].items():
        L.append(f"- rule {rule}: met in **{v['seeds_met']} of {len(v['per_seed'])}** seeds; mean over seeds: drop "
                 f"{v['mean_drop_pp']:.1f} pp, others' max |change| {v['mean_others_max_abs_pp']:.1f} pp "
                 f"(**{'met' if v['met_on_mean'] else 'missed'}** on the mean)")
    atlas = [r for r in result["runs"] if "atlas" in r]
    if atlas:
        L += ["", f"## aTLAS negation (learned coefficient per tensor, {atlas[0]['atlas']['n_coef']} "
              f"tensors; trained and selected on validation, scored on test)", "",
              "| seed | epoch kept | λ min / mean / max | target drop (pp) [95 % CI] | "
              + " | ".join(f"{short(t)} Δ (pp) [95 % CI]" for t in controls) + " | max abs change | met? |",
              "|---|---|---|---|" + "---|" * len(controls) + "---|---|"]
        for r in atlas:
            a = r["atlas"]
            d = a["test_change"][neg]
            L.append(f"| {r['seed']} | {a['epoch']} | {a['coef_min']:.2f} / {a['coef_mean']:.2f} / {a['coef_max']:.2f} | "
                     f"{-d['change_pp'] + 0.0:.1f} [{-d['ci95_pp'][1] + 0.0:.1f}, {-d['ci95_pp'][0] + 0.0:.1f}] | "
                     + " | ".join(mn.ci(a["test_change"][t]) for t in controls)
                     + f" | {a['test_others_max_abs_change_pp']:.1f} | **{'met' if atlas_met(a) else 'missed'}** |")
        drop = np.mean([r["atlas"]["test_target_drop_pp"] for r in atlas])
        moved = np.mean([r["atlas"]["test_others_max_abs_change_pp"] for r in atlas])
        L += ["", f"- aTLAS: met in **{sum(atlas_met(r['atlas']) for r in atlas)} of {len(atlas)}** seeds; mean over seeds: "
              f"drop {drop:.1f} pp, others' max |change| {moved:.1f} pp (**{'met' if drop > 20 and moved < 2 else 'missed'}** "
              "on the mean)", "", "Validation accuracy per epoch (epoch 0 = before; training stops at the first epoch a "
              "control keeps < 95 %):", ""]
        for r in atlas:
            L.append(f"- seed {r['seed']}: " + "; ".join(
                f"{h['epoch']}: {neg} {h['target_acc']:.3f}, "
                + ", ".join(f"{short(k)} {v:.3f}" for k, v in h["control_acc"].items())
                for h in r["atlas"]["history"]))
    L += ["", "## Reference levels and the random-vector control (test half)", "",
          "| seed | model | " + " | ".join(short(t) for t in tasks) + " |", "|---|---|" + "---|" * len(tasks)]
    for r in result["runs"]:
        L.append(f"| {r['seed']} | pre-trained body + probes (before) | "
                 + " | ".join(f"{r['reference']['test'][t]:.3f}" for t in tasks) + " |")
        lam = r["chosen"]["ilharco"]["lambda"]
        for name, v in ((f"− λ·τ_{neg}, λ = {lam:g} (rule a)", r["by_lambda"][str(lam)]),
                        (f"− λ·random (same tensor norms), λ = {lam:g}", r["random_vector"])):
            L.append(f"| {r['seed']} | {name} | " + " | ".join(f"{v['test_acc'][t]:.3f}" for t in tasks) + " |")
        L.append(f"| {r['seed']} | LP-FT fine-tune on {neg} (its probe head) | "
                 + " | ".join(f"{r['target_finetune']['test_acc']:.3f}" if t == neg else "" for t in tasks) + " |")
    L += ["", "‖τ‖ per seed: " + ", ".join(f"{r['seed']}: {r['target_finetune']['tau_norm']:.3f}" for r in result["runs"])
          + ". The probe head stays frozen during LP-FT: "
          + ("yes" if not any(r["target_finetune"]["probe_head_changed"] for r in result["runs"]) else "NO") + ".", ""]
    L += ["## Per-seed λ grid", "",
          "Val: target accuracy and the smallest control retention; test: target drop and each control's change (pp). "
          "Rule (a)'s λ in **bold**, rule (b)'s marked †.", ""]
    for r in result["runs"]:
        L += [f"### seed {r['seed']}", "",
              "| λ | val: target acc | val: control kept (min) | test: target acc | test: target drop | "
              + " | ".join(f"test: {short(t)} Δ" for t in controls) + " | test: max abs Δ |",
              "|---|---|---|---|---|" + "---|" * len(controls) + "---|"]
        for lam, v in r["by_lambda"].items():
            a = float(lam) == r["chosen"]["ilharco"]["lambda"]
            b = "†" if float(lam) == r["chosen"]["strict"]["lambda"] else ""
            L.append(f"| {'**' if a else ''}{float(lam):g}{'**' if a else ''}{b} | {v['val_acc'][neg]:.3f} | "
                     f"{v['val_control_retained_min']:.3f} | {v['test_acc'][neg]:.3f} | {v['test_target_drop_pp']:.1f} | "
                     + " | ".join(f"{v['test_change'][t]['change_pp']:+.1f}" for t in controls)
                     + f" | {v['test_others_max_abs_change_pp']:.1f} |")
        L.append("")
    if result.get("notes_md"):
        L += ["## Notes", "", result["notes_md"].rstrip(), ""]
    return "\n".join(L) + "\n"


def atlas_met(a: dict) -> bool:
    return round(a["test_target_drop_pp"], 6) > 20 and round(a["test_others_max_abs_change_pp"], 6) < 2


def render(result: dict, dest: Path, stem: str) -> str:
    from transferkit.io import write_text

    result["verdicts"] = mn.verdicts(result["runs"], result["negate"])
    md = markdown(result)
    write_text(dest / f"{stem}.json", json.dumps(result, indent=2, default=str) + "\n")
    write_text(dest / f"{stem}.md", md)
    return md


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", default=",".join(mt.TASKS))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--negate", default="spamassassin")
    ap.add_argument("--neg-grid", default="0.25,0.5,0.75,1.0,1.25,1.5,2.0,3.0,4.0")
    ap.add_argument("--neg-keep", type=float, default=0.95, help="rule (a): controls keep ≥ this fraction (val)")
    ap.add_argument("--strict-pp", type=float, default=1.0, help="rule (b): controls within ± this many pp (val)")
    ap.add_argument("--cap", type=int, default=300, help="at most this many items per class per held-out split")
    ap.add_argument("--n-boot", type=int, default=2000)
    ap.add_argument("--per-class", type=int, default=250)
    ap.add_argument("--max-length", type=int, default=48)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "transferkit" / "derived" / "merge_text")
    ap.add_argument("--methods", default="grid,atlas", help="grid (λ grid + random vector) and/or atlas")
    ap.add_argument("--atlas-epochs", type=int, default=10)
    ap.add_argument("--atlas-lr", type=float, default=5e-3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, help="write this process's runs here (JSON) instead of the results folder")
    ap.add_argument("--combine", type=Path, nargs="+", help="join per-process JSONs into the result, no evaluation")
    ap.add_argument("--notes", type=Path, help="markdown appended under 'Notes'")
    ap.add_argument("--quick", action="store_true", help="tiny smoke run, written to /tmp, not a result")
    args = ap.parse_args(argv)

    if args.combine:
        parts = [json.loads(p.read_text()) for p in args.combine]
        by_seed: dict[int, dict] = {}
        for r in (r for p in parts for r in p["runs"]):  # a seed's grid and atlas may come from two processes
            by_seed.setdefault(r["seed"], {}).update(r)
        result = dict(parts[0], runs=[by_seed[k] for k in sorted(by_seed)], seeds=sorted(by_seed),
                      commands=[c for p in parts for c in p["commands"]], seconds=sum(p["seconds"] for p in parts))
        if args.notes:
            result["notes_md"] = args.notes.read_text()
        print(render(result, RESULTS, "merge_negation_pretrained"))
        return 0

    args.methods = sorted({m.strip() for m in args.methods.split(",")})
    args.tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    args.neg_grid = [float(x) for x in args.neg_grid.split(",")]
    seeds = [int(x) for x in args.seeds.split(",")]
    if args.quick:
        seeds, args.cap, args.neg_grid, args.n_boot, args.atlas_epochs = seeds[:1], 10, [0.5, 2.0], 200, 2
    torch.set_num_threads(args.threads)
    args.cache = args.cache / f"pc{args.per_class}-ml{args.max_length}-e{args.epochs}-lr{args.lr:g}-lp-ft"
    from transferkit.zoo import load_model

    t0 = time.perf_counter()
    zm = load_model(mt.MODEL, max_length=args.max_length)
    runs = [run_seed(s, args, zm) for s in seeds]
    result = {
        "benchmark": "merge_negation_pretrained",
        "model": mt.MODEL,
        "tasks": args.tasks,
        "negate": args.negate,
        "seeds": seeds,
        "cache": str(args.cache).replace(str(Path.home()), "~"),
        "commands": ["OMP_NUM_THREADS=1 python benchmarks/merge_negation_pretrained.py "
                     + " ".join(sys.argv[1:] if argv is None else argv)],
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "runs": runs,
        "seconds": time.perf_counter() - t0,
    }
    if args.out:
        from transferkit.io import write_json

        write_json(args.out, result)
        return 0
    print(render(result, Path("/tmp") if args.quick else RESULTS,
                 "merge_negation_pretrained_quick" if args.quick else "merge_negation_pretrained"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
