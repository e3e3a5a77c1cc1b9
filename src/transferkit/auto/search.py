"""The ``auto`` search: which source model and which tuning method for a target, within a budget.

What it does, in order:

1. **Split once.** The target is split by :func:`~transferkit.data.split.make_split` (recorded in
   ``split.json``); the held-out part is scored once, at the end, for the winner only. Inside the training
   part every arm uses the same validation fifth (``val_fraction`` 0.2, seeded), and every decision of the
   search — pruning, the winner — is made on it.
2. **Rank** every candidate with a transferability metric on the training part (``prior``, default LogME;
   features come from the shared cache). This is the prior. ``prior="learned"`` combines the metrics with
   the weights :mod:`transferkit.rank.learned` learned on the project's measured zoos (leave-one-target-out:
   τ_w 0.35, between the best single metric and auto — ``benchmarks/results/rank_learned.md``); ``prior="none"`` is
   the ablation without one:
   the arms start in a seeded random order.
3. **Arms** = model × method × learning rate (the method's default lr times ``lr_factors``, default
   ×1, ×1/3, ×3; full fine-tuning of image models centres on 1e-3 instead of the text default 5e-5,
   ``BASE_LR``). They start in the prior's order: an arm's position is the sum of its model's rank, its
   method's position in ``methods`` and its lr's position in ``lr_factors`` (ties: better model first), so
   the best-ranked model with the first method and the default lr starts first, and a model ranked low is
   reached only if the budget allows.
4. **Successive halving** (Li et al., "Hyperband", JMLR 2018; asynchronous form: Li et al.,
   "A System for Massively Parallel Hyperparameter Tuning" (ASHA), MLSys 2020) with Optuna's
   :class:`~optuna.pruners.SuccessiveHalvingPruner`. The resource is the share of an arm's schedule in units
   of ``epochs`` (default 9): a method that trains the backbone runs ``epochs`` epochs; the linear probe, a
   head on cached features, runs its own schedule (30 epochs), so its resource after e of them is
   e·``epochs``/30. At resource 1, η, η², … (η = ``eta``, default 3) an arm continues only if it is in the
   top 1/η of the arms that reached that rung so far. Because the prior orders the arms, the strong arms
   set the bar early and weak ones stop after their first rung.
5. **Budget**: wall-clock (the ranking included) or epochs of backbone training summed over the arms
   (:mod:`.budget`; a linear probe's head epochs on cached features cost nothing against an epoch budget,
   its seconds count against a wall-clock one). It is a cap, checked at every evaluation (once per epoch):
   an arm stops ("budget") when its next epoch would not fit in what is left — one epoch under an epoch
   budget, the arm's mean epoch so far under a wall-clock one — and an arm whose first epoch would not fit
   is not started ("no budget"; a head-only arm after it still runs, it costs no epochs). An epoch budget
   is never exceeded; a wall-clock one can be, by an arm's first epoch (untimed when it starts) or by an
   epoch slower than that arm's mean.
6. **Winner**: the best validation accuracy (or ``select_by`` score, below) among the arms that kept their
   model — those that finished and those the budget stopped (ties: more training, then the earlier arm);
   pruned arms are discarded. Its Delta (and PEFT folder) is kept in ``arms/<arm>/``; its test accuracy is
   measured once on the recorded held-out split.

Storage, resume and workers. The search is an Optuna study: an embedded SQLite database
``OUT/study.db`` by default. Every arm is enqueued once, in prior order, as a trial; a worker takes the
next waiting trial. ``resume=True`` continues a killed run: the arm that was training is re-run from its
start (training is deterministic, so it reports the same values; its earlier pruning decisions are
replayed from the study) and the remaining arms follow in the same order — with an epoch budget the
winner is the uninterrupted run's winner. A study records a fingerprint of the split, the arms and every
setting; resuming with another target, other settings or another version of this module is refused.
Several processes (or machines) share one study through ``storage`` (a database URL): the first creates
and enqueues it, the others pass ``join=True``; the budget is shared, decisions are asynchronous (ASHA),
so with several workers the result depends on timing. The last worker to finish writes the result.

Related systems: Quick-Tune (Arango et al., ICLR 2024) learns which model and hyperparameters to try from
learning curves of other datasets; zero-shot AutoML (Öztürk et al., ICML 2022) picks a pipeline from
meta-features. Here the prior is a transferability metric and the allocation is plain successive
halving — no meta-learned curve model.

Label-free selection. ``select_by`` names a label-free scorer of the ``adapt`` registry (``entropy``,
``snd``, ``transfer_score``, ``mixval``, ``mano``): every rung judgment and the winner then use that score of
the arm's model on the validation fifth's items, whose labels are never read (the engine's
:func:`~transferkit.engine.select_with`), instead of the validation accuracy — for a target with few
trustworthy labels. The pruner and the winner follow the scorer's ``higher_is_better`` (the study's
direction). The held-out test accuracy is still measured once for the winner. Refused before any work:
scorers that need labelled source items (``iwv``, ``dev``, ``circular``), the linear probe (it trains a head
on cached features, not on the items a scorer is given), ``transfer_score`` with ``lora``/``ia3`` (it reads
a plain linear head; PEFT wraps it) and ``mixval`` with text models (it mixes float inputs). The setting is
part of the study's fingerprint: a study is resumed only with the same ``select_by``.

Supported methods: those whose Delta applies to the base classifier (``SUPPORTED``); methods that add
modules needing their own rebuild (adapters, prefixes, side networks) are refused with a one-line error.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .. import registry
from ..errors import ConfigError, DataError
from ..registry import short
from .budget import Budget, parse_budget

SEARCH_VERSION = 2  # bump when a change would make an old study's arms or decisions mean something else
DEFAULT_METHODS = ("linear", "bitfit", "lora", "full")
SUPPORTED = ("linear", "full", "lora", "bitfit", "ia3")
LR_FACTORS = (1.0, 1 / 3, 3.0)
# the centre of the lr grid where a method's default (set for text encoders) is wrong for a modality: full
# fine-tuning of the ImageNet / digit CNNs chose 3e-4 … 1e-3 in the rank benchmark's grid
# (benchmarks/results/rank_zoo_image60_lr4.md); 5e-5 barely moves them in a few epochs
BASE_LR = {("full", "image"): 1e-3}
VAL_FRACTION = 0.2
HEAD_ONLY = ("linear",)  # trains a head on cached features: its own schedule, no cost against an epoch budget
STUDY = "transferkit-auto"
PEFT_WRAPPED = ("lora", "ia3")  # the head is PEFT's modules_to_save wrapper, not a plain linear head


@dataclass(frozen=True)
class Arm:
    index: int
    model: str
    method: str
    lr: float
    model_rank: int

    @property
    def name(self) -> str:
        return f"{self.model} + {self.method} @ lr {self.lr:.3g}"

    @property
    def slug(self) -> str:
        return f"{self.index:03d}-{self.model}-{self.method}-{self.lr:.3g}".replace("/", "_").replace(" ", "_")


def _methods(methods: Sequence[str] | str) -> list[str]:
    names = [m.strip() for m in (methods.split(",") if isinstance(methods, str) else methods) if str(m).strip()]
    if not names:
        raise ConfigError("auto needs at least one method")
    known = registry.methods("tune")
    for m in names:
        if m not in known:
            raise ConfigError(f"unknown tune method {short(m)}{registry.did_you_mean(m, known)}")
        if m not in SUPPORTED:
            raise ConfigError(f"auto cannot search {m!r}: its Delta needs its own rebuild; supported: "
                              f"{', '.join(SUPPORTED)}")
    if len(set(names)) != len(names):
        raise ConfigError(f"methods repeat: {', '.join(names)}")
    return names


def _select_by(name: str | None, methods: Sequence[str]) -> tuple[str, bool] | None:
    """``(name, higher_is_better)`` of a label-free scorer auto can judge ``methods`` with; None for accuracy."""
    if name is None:
        return None
    from ..adapt.scorers import make_scorer

    found = {n: m for n, m in registry.methods("adapt").items() if m.info.get("kind") == "scorer"}
    needs = {n: make_scorer(n, None).needs for n in found}
    usable = [n for n in found if needs[n] not in ("source", "domains")]
    if name not in found:
        raise ConfigError(f"unknown scorer {short(name)}{registry.did_you_mean(name, found)}; "
                          f"auto can select by: {', '.join(usable)}")
    if name not in usable:
        raise ConfigError(f"scorer {name!r} needs labelled source items, which auto does not have; "
                          f"auto can select by: {', '.join(usable)}")
    if "linear" in methods:
        raise ConfigError(f"select_by {name!r} cannot judge the linear probe (it trains a head on cached features, "
                          "not on the items a scorer is given); search methods without linear")
    if needs[name] == "head" and any(m in PEFT_WRAPPED for m in methods):
        raise ConfigError(f"select_by {name!r} reads a plain linear head, which {'/'.join(PEFT_WRAPPED)} wrap; "
                          "search methods without them")
    return name, bool(found[name].info["higher_is_better"])


def _lr_factors(factors: Sequence[float] | str) -> list[float]:
    try:
        vals = [float(f) for f in (factors.split(",") if isinstance(factors, str) else factors)]
    except (TypeError, ValueError):
        raise ConfigError(f"lr factors must be numbers, got {short(factors)}") from None
    if not vals or any(not (0 < v < 1e4) for v in vals) or len(set(vals)) != len(vals):
        raise ConfigError(f"lr factors must be distinct numbers in (0, 1e4), got {short(factors)}")
    return vals


def make_arms(prior_order: Sequence[str], methods: Sequence[str], lr_factors: Sequence[float],
              modality: dict[str, str]) -> list[Arm]:
    """Every (model, method, lr) a model's modality allows, in start order (see the module docstring)."""
    from ..tune.registry import train_defaults

    cells = []
    for r, model in enumerate(prior_order):
        for j, method in enumerate(methods):
            if modality[model] not in registry.get("tune", method).info.get("modality", ()):
                continue
            base = BASE_LR.get((method, modality[model]), float(train_defaults(method).get("lr", 1e-3)))
            for k, f in enumerate(lr_factors):
                cells.append((r + j + k, r, j, k, model, method, base * f))
    cells.sort(key=lambda c: c[:4])
    return [Arm(i, c[4], c[5], c[6], c[1]) for i, c in enumerate(cells)]


def _fingerprint(**parts: Any) -> str:
    return hashlib.sha256(json.dumps({"version": SEARCH_VERSION, **parts}, sort_keys=True, default=str)
                          .encode()).hexdigest()


def _open_study(storage: str, fingerprint: str, arms: list[Arm], eta: int, *, resume: bool, join: bool,
                fresh_db: bool, maximize: bool = True):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    pruner = optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=eta,
                                                   min_early_stopping_rate=0)
    names = [s.study_name for s in optuna.get_all_study_summaries(storage)] if not fresh_db else []
    if STUDY in names:
        study = optuna.load_study(study_name=STUDY, storage=storage, pruner=pruner)
        if study.user_attrs.get("fingerprint") != fingerprint:
            raise ConfigError(f"the study in {storage} was made for another target, other settings or another "
                              "version of transferkit's auto search; use a new --out (or storage)")
        if not (resume or join):
            raise ConfigError(f"{storage} already holds this search; pass --resume to continue it, or use a new --out")
        return study
    if join:
        raise ConfigError(f"no auto search to join in {storage}; start the first worker without --join")
    if resume:
        raise ConfigError(f"nothing to resume in {storage}; run without --resume")
    study = optuna.create_study(study_name=STUDY, storage=storage, direction="maximize" if maximize else "minimize",
                                pruner=pruner)
    study.set_user_attr("fingerprint", fingerprint)
    for arm in arms:
        study.enqueue_trial({"arm": arm.index})
    study.set_user_attr("enqueued", len(arms))
    return study


def _frozen(study, number: int):
    return next(t for t in study.get_trials(deepcopy=False) if t.number == number)


def _spent(study, budget: Budget) -> float:
    key = "cost" if budget.kind == "epochs" else "seconds"
    used = sum(float(t.user_attrs.get(key, 0.0)) for t in study.get_trials(deepcopy=False))
    return used + (float(study.user_attrs.get("rank_seconds", 0.0)) if budget.kind == "seconds" else 0.0)


def search(data: Any, models: Sequence[str] | str, *, methods: Sequence[str] | str = DEFAULT_METHODS,
           budget: str | float | Budget = "10m", epochs: int = 9, eta: int = 3,
           lr_factors: Sequence[float] | str = LR_FACTORS, prior: str = "logme", limit: int | None = None,
           per_class: int | None = None, test_size: float = 0.3, seed: int = 0,
           model_options: dict[str, dict[str, Any]] | None = None, out: str | Path | None = None,
           resume: bool = False, storage: str | None = None, join: bool = False,
           progress: Callable[[str], None] | None = None, dataset: Any = None,
           split: tuple | None = None, select_by: str | None = None) -> dict[str, Any]:
    """Search model × method × lr for ``data`` within ``budget``; see the module docstring.

    Returns a JSON-able dict: ``winner`` (arm, validation and test accuracy, epochs), ``arms`` (every arm:
    state ``complete`` | ``pruned`` (at a rung) | ``budget`` | ``diverged`` (its loss blew up: the arm ends,
    the search goes on) | ``no budget`` (its first epoch would not have fit: never started) | ``waiting``, the epochs it reached and its
    validation curve), ``prior`` (metric scores and order), ``budget`` (given and spent), ``split``.
    ``dataset``: the already loaded target (then ``data`` only labels it); ``split``: its recorded
    ``(train, test, Split)`` (a pipeline's), used as is instead of splitting. ``select_by``: a label-free
    scorer that judges the arms instead of the validation accuracy (module docstring); the rows' and the
    winner's ``val_score`` is then its value and their ``val_accuracy`` None.
    """
    from ..data.split import make_split, write_split
    from ..rank.runner import rank_models
    from ..zoo import load_model

    say = progress or (lambda line: None)
    methods = _methods(methods)
    selection = _select_by(select_by, methods)
    factors = _lr_factors(lr_factors)
    budget = parse_budget(budget)
    if isinstance(epochs, bool) or not isinstance(epochs, int) or not 1 <= epochs <= 1000:
        raise ConfigError(f"epochs must be an integer in 1..1000, got {short(epochs)}")
    if isinstance(eta, bool) or not isinstance(eta, int) or not 2 <= eta <= 10:
        raise ConfigError(f"eta must be an integer in 2..10, got {short(eta)}")
    if budget.kind == "epochs" and budget.amount < 1:
        raise ConfigError(f"a budget of {budget} cannot train one arm for its first epoch; give at least 1ep")
    names = [m.strip() for m in (models.split(",") if isinstance(models, str) else models) if str(m).strip()]
    if not names or len(set(names)) != len(names):
        raise ConfigError(f"auto needs distinct candidate models, got {short(models)}")
    if join and (storage is None or out is None):
        raise ConfigError("join needs the first worker's storage URL and the same --out folder")
    opts = model_options or {}
    out = Path(out) if out is not None else None
    t_start = time.perf_counter()

    train, test, split = split or make_split(data, limit=limit, per_class=per_class, sample_seed=seed, seed=seed,
                                             test_size=test_size, dataset=dataset)
    zms = {n: load_model(n, **opts.get(n, {})) for n in names}
    if select_by == "mixval" and any(zm.modality == "text" for zm in zms.values()):
        raise ConfigError("select_by 'mixval' mixes float inputs and cannot judge text models; choose another scorer")
    scores: dict[str, Any] = {n: None for n in names}
    if prior == "learned":  # the metrics it combines, then the learned weights (transferkit.rank.learned)
        from ..rank.learned import learned_scores, needed_metrics

        say(f"rank: {len(names)} candidates with the learned ranker on {len(train)} training items")
        ranked = rank_models(train, list(zms.values()), needed_metrics(), seed=seed, progress=False)
        # never trained on the target it ranks: its records (any protocol) are left out of the fit
        scores = learned_scores({n: ranked["scores"].get(n, {}) for n in names}, exclude_targets=(split.data,))
    elif prior != "none":
        say(f"rank: {len(names)} candidates with {prior} on {len(train)} training items")
        ranked = rank_models(train, list(zms.values()), [prior], seed=seed, progress=False)
        scores = {n: ranked["scores"].get(n, {}).get(prior) for n in names}
    if prior == "none":  # the ablation without a prior: models and arms in a seeded random order
        order = [names[i] for i in np.random.default_rng(seed).permutation(len(names))]
    else:
        order = sorted(names, key=lambda n: (not _finite(scores[n]), -(scores[n] if _finite(scores[n]) else 0.0), n))
    arms = make_arms(order, methods, factors, {n: zms[n].modality for n in names})
    if prior == "none":
        arms = [Arm(i, a.model, a.method, a.lr, a.model_rank)
                for i, a in enumerate(arms[j] for j in np.random.default_rng(seed + 1).permutation(len(arms)))]
    if not arms:
        raise ConfigError(f"none of the methods {', '.join(methods)} supports the models' modality")
    rank_seconds = time.perf_counter() - t_start

    fp = _fingerprint(split=split.to_dict(), arms=[asdict(a) for a in arms], epochs=epochs, eta=eta,
                      budget=asdict(budget), seed=seed, prior=prior, val_fraction=VAL_FRACTION, options=opts,
                      **({"select_by": select_by} if selection else {}))  # absent: older studies still resume
    fresh_db = False
    if storage is None:
        if out is None:
            storage, fresh_db = "sqlite:///:memory:", True
        else:
            db = out / "study.db"
            fresh_db = not db.exists()
            storage = f"sqlite:///{db}"
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        if not join:
            write_split(out, split)
    study = _open_study(storage, fp, arms, eta, resume=resume, join=join, fresh_db=fresh_db,
                        maximize=selection is None or selection[1])
    if not join and "rank_seconds" not in study.user_attrs:
        study.set_user_attr("rank_seconds", rank_seconds)
    if budget.kind == "seconds" and _spent(study, budget) >= budget.amount:
        raise ConfigError(f"a budget of {budget} is used up by the ranking alone ({rank_seconds:.0f} s); give more")

    runner = _ArmRunner(study, arms, zms, train, budget, epochs, out, seed, say, select_by)
    if resume:
        import optuna

        # arms a killed run had taken (popped, perhaps not yet started): re-run from their start, in order
        stale = sorted(t.number for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
                       if "arm" in t.params or "arm" in t.system_attrs.get("fixed_params", {}))
        for number in stale:
            runner.run(optuna.trial.Trial(study, _frozen(study, number)._trial_id))
    while (trial := _next_trial(study)) is not None:
        runner.run(trial)
    if runner.trained == 0 and not _finished_any(study):
        raise ConfigError(f"a budget of {budget} is too small to train one arm for one epoch; give more")
    return _result(study, arms, zms, test, split, scores, order, prior, budget, out, storage, say,
                   selection=selection, deltas=runner.deltas, seconds=time.perf_counter() - t_start)


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def _next_trial(study):
    """The next waiting arm (atomic across workers), or None when every arm has been taken."""
    import optuna

    while study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,)):
        trial = study.ask()
        if "arm" in _frozen(study, trial.number).system_attrs.get("fixed_params", {}):
            return trial
        study.tell(trial, state=optuna.trial.TrialState.FAIL)  # another worker took the last one first
    return None


def _finished_any(study) -> bool:
    return any(t.user_attrs.get("curve") for t in study.get_trials(deepcopy=False))


class _ArmRunner:
    """Trains one arm (an Optuna trial) through ``transferkit.tune`` with the pruning and budget watcher."""

    def __init__(self, study, arms, zms, train, budget: Budget, epochs: int, out: Path | None, seed: int,
                 say: Callable[[str], None], select_by: str | None = None) -> None:
        self.study, self.arms, self.zms, self.train, self.select_by = study, arms, zms, train, select_by
        self.budget, self.epochs, self.out, self.seed, self.say = budget, epochs, out, seed, say
        self.trained = 0
        self.deltas: dict[int, Any] = {}  # without an out folder, the deltas that may win stay in memory

    def run(self, trial) -> None:
        import optuna

        from contextlib import nullcontext

        from ..adapt.scorers import make_scorer
        from ..engine import TrainingDiverged, select_with, watch
        from ..tune import tune

        arm = self.arms[trial.suggest_categorical("arm", list(range(len(self.arms))))]
        before = _frozen(self.study, trial.number)
        decided = {k: v for k, v in before.user_attrs.items() if k.startswith("decision_")}
        reported = set(before.intermediate_values)
        spent0 = _spent(self.study, self.budget) - float(before.user_attrs.get(
            "cost" if self.budget.kind == "epochs" else "seconds", 0.0))
        arm_epochs = arm_schedule(arm.method, self.epochs)
        first = arm_cost(arm.method, 1.0) if self.budget.kind == "epochs" else 0.0
        if not reported and (spent0 + first > self.budget.amount + 1e-9 or
                             (self.budget.kind == "seconds" and spent0 >= self.budget.amount)):
            trial.set_user_attr("stopped", "no budget")  # its first epoch would not fit: never started
            self.study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            return
        state = {"stop": None, "curve": [], "epochs": 0.0, "rung": 0}
        t0 = time.perf_counter()

        def watcher(step: int, total: int, value: float, rec: dict[str, Any]) -> bool:
            epoch = float(rec["epoch"])
            resource = epoch * self.epochs / arm_epochs
            state["curve"].append([epoch, float(value)])
            state["epochs"] = epoch
            cost = arm_cost(arm.method, epoch)
            trial.set_user_attr("epochs", epoch)
            trial.set_user_attr("cost", cost)
            trial.set_user_attr("seconds", time.perf_counter() - t0)
            trial.set_user_attr("curve", state["curve"])
            rung = int(math.floor(resource + 1e-9))
            if rung > state["rung"] and step < total:  # a new whole unit of resource before the end: decide
                state["rung"] = rung
                key = f"decision_{rung}"
                if key in decided:  # replayed from the study (a resumed run)
                    pruned = decided[key]
                else:
                    if rung not in reported:
                        trial.report(float(value), rung)
                    pruned = bool(trial.should_prune())
                    trial.set_user_attr(key, pruned)
                if pruned:
                    state["stop"] = "pruned"
                    return True
            if self.budget.kind == "epochs":
                used, upcoming = cost, arm_cost(arm.method, epoch + 1) - cost
            else:
                used = time.perf_counter() - t0
                upcoming = used / max(epoch, 1e-9)
            if step < total and spent0 + used + upcoming > self.budget.amount + 1e-9:  # the next epoch would not fit
                state["stop"] = "budget"
                return True
            return False

        arm_dir = self.out / "arms" / arm.slug if self.out is not None else None
        if arm_dir is not None and arm_dir.exists():
            shutil.rmtree(arm_dir)  # a half-written arm of a killed run (ours): trained again from its start
        config = {"lr": arm.lr, "epochs": arm_epochs, "seed": self.seed}
        self.say(f"arm {arm.index + 1}/{len(self.arms)}: {arm.name}")
        selecting = nullcontext() if self.select_by is None else select_with(
            make_scorer(self.select_by, self.zms[arm.model].preprocess, seed=self.seed))
        try:
            with watch(watcher), selecting:
                res = tune(self.zms[arm.model], self.train, None, method=arm.method, config=config,
                           out_dir=arm_dir, val_fraction=VAL_FRACTION, progress=False)
        except TrainingDiverged as exc:  # an lr too large for this arm: the arm ends, the search goes on
            state["stop"] = "diverged"
            self.say(f"  {arm.name}: {exc}")
        self.trained += 1
        trial.set_user_attr("seconds", time.perf_counter() - t0)
        trial.set_user_attr("stopped", state["stop"] or "complete")
        last = state["curve"][-1][1] if state["curve"] else float("nan")
        if state["stop"] in ("pruned", "diverged"):
            if arm_dir is not None:
                shutil.rmtree(arm_dir, ignore_errors=True)
            self.study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        else:
            if arm_dir is None:
                self.deltas[arm.index] = res.delta
            if state["stop"] == "budget":
                self.study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            else:
                self.study.tell(trial, last)
        self.say(f"  {arm.name}: {state['stop'] or 'complete'} after {state['epochs']:g} epochs, "
                 f"validation {self.select_by or 'accuracy'} {last:.4f}")


def arm_schedule(method: str, epochs: int) -> int:
    """Epochs an arm of ``method`` trains if never stopped: ``epochs``, or the linear probe's own default."""
    from ..tune.registry import train_defaults

    return int(train_defaults(method)["epochs"]) if method in HEAD_ONLY else epochs


def arm_cost(method: str, epochs_trained: float) -> float:
    """What ``epochs_trained`` epochs of an arm cost against an epoch budget (head-only methods: nothing)."""
    return 0.0 if method in HEAD_ONLY else float(epochs_trained)


def _arm_rows(study, arms: list[Arm], by_accuracy: bool = True) -> list[dict[str, Any]]:
    by_arm: dict[int, Any] = {}
    for t in study.get_trials(deepcopy=False):
        if "arm" in t.params and t.state.name != "FAIL":
            by_arm[int(t.params["arm"])] = t
    rows = []
    for arm in arms:
        t = by_arm.get(arm.index)
        curve = t.user_attrs.get("curve", []) if t is not None else []
        stopped = t.user_attrs.get("stopped") if t is not None else None
        state = stopped if t is not None and t.state.name in ("COMPLETE", "PRUNED") else (
            "running" if t is not None and t.state.name == "RUNNING" else "waiting")
        rows.append({"arm": arm.index, "name": arm.name, "model": arm.model, "method": arm.method, "lr": arm.lr,
                     "model_rank": arm.model_rank, "state": state,
                     "epochs": float(t.user_attrs.get("epochs", 0.0)) if t is not None else 0.0,
                     "cost": float(t.user_attrs.get("cost", 0.0)) if t is not None else 0.0,
                     "seconds": round(float(t.user_attrs.get("seconds", 0.0)), 3) if t is not None else 0.0,
                     "val_score": curve[-1][1] if curve else None,
                     "val_accuracy": curve[-1][1] if curve and by_accuracy else None, "curve": curve,
                     "slug": arm.slug})
    return rows


def _result(study, arms, zms, test, split, scores, order, prior, budget: Budget, out: Path | None, storage: str,
            say, *, deltas: dict[int, Any], seconds: float, selection: tuple[str, bool] | None = None
            ) -> dict[str, Any]:
    from ..io import atomic_path, write_json

    metric, higher = selection or ("accuracy", True)
    rows = _arm_rows(study, arms, by_accuracy=selection is None)
    running = [r for r in rows if r["state"] == "running"]
    done = [r for r in rows if r["state"] in ("complete", "budget") and _finite(r["val_score"])]
    result: dict[str, Any] = {
        "data": split.data, "split": {"n_train": split.n - len(split.test_ids), "n_test": len(split.test_ids),
                                      "test_sha256": split.to_dict().get("test_sha256")},
        "prior": {"metric": prior, "scores": scores, "order": order},
        "select_by": {"metric": metric, "higher_is_better": higher},
        "budget": {"kind": budget.kind, "given": budget.amount, "spent": round(_spent(study, budget), 3)},
        "storage": storage, "arms": rows, "seconds": round(seconds, 3),
    }
    if running:  # another worker is still training: it writes the result when it finishes
        result["winner"] = None
        result["note"] = f"{len(running)} arm(s) still running in other workers; the last worker writes the result"
        return result
    if not done:
        raise ConfigError(f"no arm trained long enough to choose one within {budget}; give a larger budget")
    sign = 1.0 if higher else -1.0
    best = max(done, key=lambda r: (sign * r["val_score"], r["state"] == "complete", r["epochs"], -r["arm"]))
    arm = arms[best["arm"]]
    delta = _winner_delta(arm, out, deltas)
    test_acc = evaluate_delta(zms[arm.model], delta, test)
    result["winner"] = {**{k: best[k] for k in ("arm", "name", "model", "method", "lr", "epochs", "state",
                                                 "val_score", "val_accuracy")},
                        "test_accuracy": test_acc, "n_test": len(test),
                        "test_se": math.sqrt(max(test_acc * (1 - test_acc), 0.0) / max(len(test), 1)),
                        "folder": str(out / "arms" / arm.slug) if out is not None else None}
    say(f"auto chose {arm.name}: validation {metric} {best['val_score']:.4f}, test {test_acc:.4f} "
        f"(n = {len(test)}), {result['budget']['spent']:.1f} of {budget.amount:g} "
        f"{'epochs' if budget.kind == 'epochs' else 's'}")
    if out is not None:
        for r in rows:  # keep the winner's folder only; every other arm folder is ours to remove
            if r["arm"] != arm.index and (out / "arms" / r["slug"]).exists():
                shutil.rmtree(out / "arms" / r["slug"], ignore_errors=True)
        write_json(out / "auto.json", result)
        from .figures import plot_trace

        png = plot_trace(rows, best["arm"], result["select_by"]["metric"])
        if png is not None:
            with atomic_path(out / "trace.png") as tmp:
                tmp.write_bytes(png)
    return result


def _winner_delta(arm: Arm, out: Path | None, deltas: dict[int, Any]):
    from ..delta import Delta

    if out is None:
        if arm.index not in deltas:
            raise DataError(f"the winning arm ({arm.name}) was trained by another worker; give every worker the "
                            "same --out to collect the winner")
        return deltas[arm.index]
    path = out / "arms" / arm.slug / "delta"
    if not path.exists():
        raise DataError(f"the winning arm's Delta is missing ({path}); run the search again with a new --out")
    return Delta.load(path)


def evaluate_delta(zm, delta, test) -> float:
    """Accuracy of ``zm`` tuned by ``delta`` (a tune Delta with a ``new.head``) on the Dataset ``test``."""
    from ..engine import evaluate
    from ..merge.tasks import _classifier, _head_classes
    from ..tune._common import Pairs, make_collate

    clf = _classifier(zm, delta, _head_classes(delta, zm.name))
    return float(evaluate(clf, Pairs(test.X, test.y), collate_fn=make_collate(zm.preprocess))["accuracy"])
