"""Fantastic Gains in miniature: complementary knowledge and transfer between every pair of a zoo.

Zoos (``--zoos``; every ordered pair (student, teacher) of the zoo's models):

- ``digits``: ``digits-mnist``, ``digits-usps`` and ``digits-svhn`` on MNIST, each with its own pretrained 0–9
  head, no tuning;
- ``fashion``: the image zoo on Fashion-MNIST — the three digit CNNs, ``mobilenet-v2`` and ``efficientnet-lite0``
  (both at 32×32 input: CPU time; Lite1/2 left out for the same reason). No head predicts the fashion
  classes, so each model is first linear-probed on the training part (``transferkit tune --method linear``,
  its defaults, seed 0; a frozen backbone and a new head), and that probe is the pretrained model of the study;
  the transfer keeps the student's BatchNorm layers in eval mode (``freeze_bn``): the probe's head was fitted on
  the backbone's eval-mode features, and statistics re-estimated from batches of 32 at 32 px no longer fit it
  (mobilenet-v2 fell from 76.7 % to chance at lr ≈ 0 in train mode). The paper trains its students in train mode
  at their native resolution on the data their statistics come from, which costs too much CPU time here;
- ``text``: the text zoo (``paraphrase-minilm-l3-v2``, ``all-minilm-l6-v2``, ``all-mpnet-base-v2``, 32 tokens)
  on ``vader:movies``, linear-probed the same way.

The data is a stratified ``limit`` sample split by ``make_split`` (seed 0; the share ``test`` held out is the
test set). Per pair:

- flips of the teacher over the student on the test set (positive: student wrong, teacher right; negative:
  the reverse), :func:`transferkit.distill.flips`;
- transfer delta (student test accuracy after − before) of plain KD (T²·KL to the teacher, α = 0, starting from
  the pretrained student), KL+DP supervised and (``digits`` only) KL+DP label-free (``kl_dp``), each for the
  zoo's epochs at AdamW lr 1e-4, T = 1, batch 32, for each seed of ``--seeds``. The whole student trains
  (BatchNorm statistics frozen in the probed zoos, see above).

The paper's finding to check: KL+DP's delta ≥ 0 for (nearly) every pair while plain KD's is negative for many.

``--lr`` sets the AdamW lr of every transfer (default 1e-4; another lr is its own section ``<zoo>, lr <lr>``).
``--self-control also|only`` adds (or runs only) the control pairs student ← a frozen copy of itself: both
methods then fit the student's own initial predictions, so there is nothing to gain and the delta is what the
training alone (optimiser steps, dropout) does to the student at that lr; the report then also gives the share of
pairs whose delta is at least the student's control delta.

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/distill_gains.py --zoos digits,fashion,text

Writes benchmarks/results/distill_gains.json and .md after each pair (other zoos' earlier results are kept).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from itertools import permutations
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DIGITS = ("digits-mnist", "digits-usps", "digits-svhn")
SMALL, TEXT = {"size": 32}, {"max_length": 32}
CONTROL = "itself (control)"
# a delta is a mean of accuracy differences (multiples of 1 / n_test): +x and −x over the seeds sum to ±1e-17, no loss
TOL = 1e-9
ZOOS = {
    "digits": {"data": "mnist", "limit": 2500, "test": 0.2, "probe": False, "freeze_bn": False, "epochs": 5,
               "models": {m: {} for m in DIGITS}, "methods": ("kd", "kl_dp", "kl_dp_label_free")},
    "fashion": {"data": "fashion-mnist", "limit": 1500, "test": 0.2, "probe": True, "freeze_bn": True, "epochs": 1,
                "models": {**{m: {} for m in DIGITS}, "mobilenet-v2": SMALL, "efficientnet-lite0": SMALL},
                "methods": ("kd", "kl_dp")},
    "text": {"data": "vader:movies", "limit": 200, "test": 0.5, "probe": True, "freeze_bn": True, "epochs": 1,
             "models": {"paraphrase-minilm-l3-v2": TEXT, "all-minilm-l6-v2": TEXT, "all-mpnet-base-v2": TEXT},
             "methods": ("kd", "kl_dp")},
}


def transfer(student, teacher, train, test, method: str, seed: int, epochs: int, freeze_bn: bool,
             lr: float) -> float:
    """Transfer delta of one run (after − before, test accuracy)."""
    from transferkit.distill import distill
    from transferkit.distill._common import accuracy, fit_val, start_student, train_student
    from transferkit.distill.kd import KDOptions, kd_objective
    from transferkit.engine import TrainConfig

    if method == "kd":  # plain KD into the pretrained student (its own head), no hard-label term
        module = start_student(student, train.classes)
        before = accuracy(module, student, test)
        fit, val = fit_val(train, 0.1, seed)
        cfg = TrainConfig(epochs=epochs, lr=lr, batch_size=32, seed=seed, progress=False)
        train_student(module, student, [teacher], kd_objective(KDOptions(temperature=1.0, alpha=0.0)), fit, val,
                      cfg, cache=True, freeze_bn=freeze_bn)
        return accuracy(module, student, test) - before
    res = distill([teacher], student, train, test, method="kl_dp",
                  config={"epochs": epochs, "seed": seed, "supervised": method == "kl_dp", "freeze_bn": freeze_bn,
                          "lr": lr})
    return res.metrics["transfer_delta"]


def nets(zoo: dict, train, test, split, work: Path) -> dict:
    """The zoo's nets over the data's classes: catalogue heads, or linear probes tuned once (cached in ``work``)."""
    from transferkit.distill import load_net
    from transferkit.tune import tune
    from transferkit.zoo import load_model

    out = {}
    for name, opts in zoo["models"].items():
        load = lambda n, o=opts: load_model(n, **o)  # noqa: E731
        if not zoo["probe"]:
            out[name] = load_net(load(name), train.classes)
            continue
        run = work / name
        if not (run / "metrics.json").is_file():
            tune(load(name), train, test, method="linear", config={"seed": 0}, out_dir=run, split=split,
                 progress=False)
        out[name] = load_net(str(run), train.classes, load=load)
    return out


def run_zoo(name: str, seeds: list[int], work: Path, save, lr: float, self_control: str | None) -> dict:
    import numpy as np

    from transferkit.data.split import make_split
    from transferkit.distill import flips
    from transferkit.distill._common import accuracy, predictions

    zoo = ZOOS[name]
    t0 = time.perf_counter()
    train, test, split = make_split(zoo["data"], limit=zoo["limit"], sample_seed=0, seed=0, test_size=zoo["test"])
    models = nets(zoo, train, test, split, work / name)
    acc = {m: accuracy(n.module, n, test) for m, n in models.items()}
    preds = {m: predictions(n.module, n, test) for m, n in models.items()}
    pairs = []
    # the self-control pairs (a student taught by a frozen copy of itself: no knowledge to gain, so any delta is
    # what the training itself does to the model at this lr) come first
    order = [(m, m) for m in models if self_control]
    order += [] if self_control == "only" else list(permutations(models, 2))
    for s_name, t_name in order:
        f = flips(preds[s_name], preds[t_name], test.y, len(train.classes))
        row = {"student": s_name, "teacher": t_name if t_name != s_name else CONTROL,
               "student_accuracy": acc[s_name], "teacher_accuracy": acc[t_name],
               "positive_flips": f["positive"], "negative_flips": f["negative"], "top20_share": f["top_p_share"]}
        for method in zoo["methods"]:
            deltas = [transfer(models[s_name], models[t_name], train, test, method, seed, zoo["epochs"],
                               zoo["freeze_bn"], lr) for seed in seeds]
            row[method] = {"delta": statistics.mean(deltas),
                           "se": statistics.stdev(deltas) / len(deltas) ** 0.5 if len(deltas) > 1 else 0.0,
                           "deltas": deltas}
            print(f"{name}: {s_name} ← {t_name} {method}: {row[method]['delta'] * 100:+.2f} pp", file=sys.stderr)
        pairs.append(row)
        share = nonnegative_share(pairs, zoo["methods"])
        result = {**zoo, "lr": lr, "n_train": len(train), "n_test": len(test), "seeds": seeds, "pairs": pairs,
                  "pairs_total": len(order), "share_delta_nonnegative": share,
                  "seconds": round(time.perf_counter() - t0, 1)}
        save(result)  # after each pair: a partial zoo says how many of its pairs it holds
    return result


def write(results: dict) -> None:
    from transferkit.runtime import environment

    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "distill_gains.json").write_text(json.dumps({"environment": environment(), "zoos": results},
                                                           indent=1) + "\n")
    pp = lambda d: f"{d['delta'] * 100:+.2f} ± {d['se'] * 100:.2f}"  # noqa: E731
    names = {"kd": "KD delta", "kl_dp": "KL+DP delta", "kl_dp_label_free": "KL+DP label-free delta"}
    parts = ["# Fantastic Gains: flips and transfer delta between the models of a zoo\n\nOne CPU thread "
             "(`OMP_NUM_THREADS=1`); AdamW, T = 1, batch 32 (lr per section, 1e-4 unless said); transfer delta = student test accuracy after "
             "− before (pp, mean ± s.e. over the seeds); flips of the teacher over the student on the test set.\n"]
    for zoo, r in sorted(results.items()):  # a zoo's sections (other lrs, controls) follow it
        methods = r["methods"]
        rows = "\n".join(
            f"| {p['student']} | {p['teacher']} | {p['student_accuracy'] * 100:.1f} | "
            f"{p['teacher_accuracy'] * 100:.1f} | {p['positive_flips'] * 100:.1f} | {p['negative_flips'] * 100:.1f} | "
            + " | ".join(pp(p[m]) for m in methods) + " |" for p in r["pairs"])
        start = "linear probes tuned on the training part" if r["probe"] else "their pretrained heads"
        if r.get("freeze_bn"):
            start += ("; `freeze_bn` on (the text models have no BatchNorm: no effect)" if zoo.startswith("text")
                      else "; the students' BatchNorm layers stay in eval mode (`freeze_bn`)")
        share = ", ".join(f"{names[m].removesuffix(' delta')} {v * 100:.0f} %"
                          for m, v in nonnegative_share(r["pairs"], methods).items())
        parts.append(
            f"## {zoo}: {r['data']}\n\n`{r['command']}`\n\n{r['n_train']} training, {r['n_test']} test items "
            f"(stratified sample of {r['limit']}); the models start from {start}; {r['epochs']} epoch{'s' if r['epochs'] != 1 else ''}; seeds "
            f"{', '.join(map(str, r['seeds']))}; lr {r.get('lr', 1e-4):g}; {r['seconds']:.0f} s"
            + ("" if len(r["pairs"]) == r["pairs_total"] else
               f"; **partial: {len(r['pairs'])} of {r['pairs_total']} pairs** (stopped for time)") + ".\n\n"
            "| student | teacher | student acc. % | teacher acc. % | positive flips % | negative flips % | "
            + " | ".join(names[m] for m in methods) + " |\n|" + "---|" * (6 + len(methods)) + "\n" + rows
            + ("\n" if "nan" in share else f"\n\nShare of pairs with delta ≥ 0: {share}.\n") + _over_control(r))
    (RESULTS / "distill_gains.md").write_text("\n".join(parts))


def nonnegative_share(pairs: list[dict], methods) -> dict[str, float]:
    """Share of the teacher pairs (self-controls left out) whose mean delta is ≥ 0, per method."""
    real = [p for p in pairs if p["teacher"] != CONTROL]
    return {m: sum(p[m]["delta"] >= -TOL for p in real) / len(real) if real else float("nan") for m in methods}


def _over_control(r: dict) -> str:
    """With self-control rows: the share of teacher pairs whose delta is at least the student's own control's."""
    control = {p["student"]: p for p in r["pairs"] if p["teacher"] == CONTROL}
    real = [p for p in r["pairs"] if p["teacher"] != CONTROL and p["student"] in control]
    if not real:
        return ""
    names = {"kd": "KD", "kl_dp": "KL+DP", "kl_dp_label_free": "KL+DP label-free"}
    share = {m: sum(p[m]["delta"] >= control[p["student"]][m]["delta"] - TOL for p in real) / len(real)
             for m in r["methods"]}
    shares = ", ".join(f"{names[m]} {v * 100:.0f} %" for m, v in share.items())
    return (f"Share of pairs with delta ≥ the student's self-control delta (what training at this lr does to the "
            f"student with nothing to learn): {shares}.\n")


def main() -> None:
    old = RESULTS / "distill_gains.json"
    seeds = [int(s) for s in ARGS.seeds.split(",")]
    command = "OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/distill_gains.py " + " ".join(sys.argv[1:])
    for name in [z.strip() for z in ARGS.zoos.split(",") if z.strip()]:
        key = name if ARGS.lr == 1e-4 and not ARGS.self_control else \
            f"{name}, lr {ARGS.lr:g}" + {None: "", "also": ", with self-control", "only": ", self-control only"}[
                ARGS.self_control]

        def save(partial, key=key):
            # re-read on every save: runs of different zoos in parallel keep each other's sections
            results = json.loads(old.read_text()).get("zoos", {}) if old.is_file() else {}
            results[key] = {"command": command.strip(), **partial}
            write(results)

        run_zoo(name, seeds, Path(ARGS.work), save, ARGS.lr, ARGS.self_control)
    print((RESULTS / "distill_gains.md").read_text())


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--zoos", default=",".join(ZOOS), help=f"comma-separated, of {', '.join(ZOOS)}")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--work", default=str(Path("/tmp") / "transferkit-distill-gains"))
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW lr of every transfer; a section per zoo and lr")
    p.add_argument("--self-control", choices=("also", "only"),
                   help="teach each student with a frozen copy of itself too (or only): the optimisation-damage "
                        "control")
    ARGS = p.parse_args()
    main()
