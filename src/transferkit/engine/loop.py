"""The training loop every method uses: :func:`train` and :func:`evaluate`.

Built on Hugging Face Accelerate, which places the model, wraps it for DDP and handles mixed precision;
the loop itself keeps data order, accumulation, clipping, scheduling, evaluation, early stopping and
checkpoints, so that every method gets the same behaviour and the same files.

Determinism and resume
----------------------
Nothing in the loop depends on hidden state:

- the data order of epoch ``e`` is a permutation drawn from a generator seeded with ``(seed, e)``;
  each rank takes every ``world_size``-th index of it;
- the global torch RNG (dropout, noise in objectives) is reseeded from ``(seed, step, rank)`` before
  every optimizer step.

A run resumed from the checkpoint of step ``s`` therefore sees exactly the batches and random numbers
the uninterrupted run saw after step ``s`` and ends with the same weights and metrics.

Divergence
----------
Before each optimizer step the mean training loss of the update is checked (one scalar per step):
NaN, infinite, or more than :data:`DIVERGED` (10⁶) times the first update's loss (at least 1) stops the
run with :class:`TrainingDiverged`, a one-line ConfigError naming the step and the lr (CLI exit 2).
The step is not taken, so no non-finite weight reaches a checkpoint or the caller's artifacts.

Multi-process and multi-GPU
---------------------------
One code path for one and many processes. Each process trains on its shard of every epoch (the
shards have equal sizes: the permutation is padded by wrapping around), gradients are averaged by
DDP, evaluation sums are reduced over all processes, and only the main process writes files or shows
a progress bar. ``batch_size`` is per process: the effective batch is
``batch_size * grad_accum * world_size``. Launch::

    accelerate launch --multi_gpu --num_processes 4 my_script.py     # GPUs, one node
    torchrun --nproc_per_node 4 my_script.py                          # same, plain torch
    torchrun --nproc_per_node 2 my_script.py   # CPU (gloo), with TrainConfig(cpu=True)

(``accelerate launch --cpu --num_processes 2`` starts a single process; use torchrun on CPU.)
Checkpoints assume all processes see the same file system (one node or a shared disk).

Hooks for callers
-----------------
Two context managers for callers that train through a library function they do not own: inside
:func:`watch` every validation evaluation calls a function (which may end the run); inside
:func:`select_with` a run left on the default ``metric="accuracy"`` selects with a scorer instead, on
its validation items with the labels dropped (``auto --select-by``).

Examples
--------
>>> from transferkit.engine import train, TrainConfig, CrossEntropy
>>> result = train(model, (X_train, y_train), CrossEntropy(), TrainConfig(epochs=5, lr=1e-3),
...                val_data=(X_val, y_val), out_dir="runs/probe")            # doctest: +SKIP
>>> result.metrics["val_accuracy"]                                         # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import math
import os
import sys
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, DataError
from ..io import write_json
from .checkpoint import latest_checkpoint, load_checkpoint, load_module_state, module_state, save_checkpoint
from .config import DIVERGED, TrainConfig, TrainingDiverged, TrainResult
from .data import _ArrayData, _as_dataset, _streams, _to_batch, _collate_for, _mix, _order, _rank_batches, _to_device, _loader
from .objectives import CrossEntropy, forward
from .optim import _build_optimizer, _lr_groups, _select_trainable, lr_factor

__all__ = ["TrainConfig", "TrainResult", "TrainingDiverged", "train", "evaluate", "lr_factor", "watch",
           "select_with"]

_WATCHERS: contextvars.ContextVar[tuple[Callable[..., Any], ...]] = contextvars.ContextVar("watchers", default=())


@contextlib.contextmanager
def watch(fn: Callable[[int, int, float, dict[str, Any]], Any]) -> Iterator[None]:
    """Call ``fn(step, total, value, record)`` after every validation evaluation of every :func:`train` run
    inside the block (``value``: the selection metric, ``record``: that evaluation's history row, with
    ``epoch``); a true return ends that run as early stopping does. For callers that drive training
    through a library function they do not own (the ``auto`` search prunes arms with it)."""
    token = _WATCHERS.set((*_WATCHERS.get(), fn))
    try:
        yield
    finally:
        _WATCHERS.reset(token)


_SELECTOR: contextvars.ContextVar[Any] = contextvars.ContextVar("selector", default=None)


@contextlib.contextmanager
def select_with(scorer: Any) -> Iterator[None]:
    """Inside the block, a :func:`train` run left on the default ``metric="accuracy"`` selects with ``scorer``
    instead (best step, early stopping, the ``value`` its :func:`watch` watchers see), given only the items of
    its validation data, labels dropped: ``X`` of ``(X, y)``, ``inputs`` of ``{"inputs": X, "labels": y}``,
    ``.X`` of anything else (a Dataset, the tune methods' ``Pairs``). For callers that drive training through
    a library function they do not own (``auto --select-by`` judges arms with a label-free scorer)."""
    if isinstance(scorer, str) or _check_metric(scorer) is None:
        raise ConfigError(f"select_with needs a scorer object (name, higher_is_better, scorer(model, items)), "
                          f"got {scorer!r}")
    token = _SELECTOR.set(scorer)
    try:
        yield
    finally:
        _SELECTOR.reset(token)


def _items_only(data: Any) -> Any:
    """The items of labelled validation data, without its labels (for :func:`select_with`)."""
    if isinstance(data, Mapping) and "inputs" in data:
        return data["inputs"]
    if isinstance(data, tuple) and len(data) == 2:
        return data[0]
    if hasattr(data, "X"):
        return data.X
    raise ConfigError(f"select_with cannot drop the labels of validation data of type {type(data).__name__}; "
                      "give (X, y), {'inputs': X, 'labels': y} or a Dataset with .X")

log = logging.getLogger("transferkit.engine")

# options that may change between a run and its resume without changing the trajectory
_RESUME_FREE = {"progress", "num_workers", "checkpoint_every", "keep_checkpoints", "eval_batch_size",
                "log_every", "cpu"}

# ------------------------------------------------------------------------------------------ evaluation
def evaluate(model: nn.Module, data: Any, *, collate_fn: Callable | None = None, batch_size: int = 128,
             predictions: bool = False, accelerator: Any = None) -> dict[str, Any]:
    """Accuracy and mean cross-entropy of a classifier on ``data``.

    Parameters
    ----------
    model : called as ``forward(model, batch["inputs"])`` (see :mod:`.objectives`); returns (N, C) logits.
    data : a Dataset, ``(X, y)`` or ``{"inputs": X, "labels": y}``; without labels only predictions
        are returned (with ``predictions=True``).
    batch_size : evaluation batch size (per process).
    predictions : also return ``predictions``, the (N,) int64 numpy array of argmax classes in data order.
    accelerator : an ``accelerate.Accelerator``; when it runs several processes each evaluates a shard
        and the sums are reduced, so every process gets the metrics of the whole set.

    Returns
    -------
    dict with ``accuracy``, ``loss`` (floats), ``n`` (int) and optionally ``predictions``.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
    ds = _as_dataset(data, "evaluation data", batched=collate_fn is None)
    collate = _collate_for(ds, collate_fn)
    n = len(ds)
    if accelerator is not None:
        world, rank, device = accelerator.num_processes, accelerator.process_index, accelerator.device
        autocast = accelerator.autocast
    else:
        world, rank = 1, 0
        p = next(iter(model.parameters()), None)
        device = p.device if p is not None else torch.device("cpu")
        autocast = contextlib.nullcontext
    has_labels = "labels" in _to_batch(collate(ds.__getitems__([0]) if isinstance(ds, _ArrayData)
                                               else [ds[0]]))
    if not has_labels and not predictions:
        raise DataError("evaluation data has no labels; pass predictions=True to only predict")
    local = list(range(rank, n, world))
    batches = [local[i: i + batch_size] for i in range(0, len(local), batch_size)]
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.float64, device=device)
    preds: list[torch.Tensor] = []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), autocast():
            for raw in (_loader(ds, batches, collate, 0, 0) if batches else []):
                batch = _to_device(_to_batch(raw), device)
                logits = forward(model, batch["inputs"]).float()
                pred = logits.argmax(-1)
                if has_labels:
                    labels = batch["labels"]
                    loss_sum += F.cross_entropy(logits, labels, reduction="sum").double()
                    correct += (pred == labels).sum().double()
                if predictions:
                    preds.append(pred)
    finally:
        model.train(was_training)
    out: dict[str, Any] = {"n": n}
    if has_labels:
        sums = torch.stack([loss_sum, correct])
        if world > 1:
            sums = accelerator.reduce(sums, reduction="sum")
        out["loss"] = float(sums[0]) / n
        out["accuracy"] = float(sums[1]) / n
    if predictions:
        local_pred = torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long, device=device)
        if world > 1:
            width = -(-n // world)
            padded = torch.full((width,), -1, dtype=torch.long, device=device)
            padded[: len(local_pred)] = local_pred
            # rank r holds samples r, r+world, ...: interleave the gathered rows back into data order
            local_pred = accelerator.gather(padded).reshape(world, width).T.reshape(-1)[:n]
        out["predictions"] = local_pred.cpu().numpy().astype(np.int64)
    return out


# -------------------------------------------------------------------------------------------- training
class _Bundle(nn.Module):
    """Model + objective as one module, so DDP syncs the objective's own parameters too.

    The objective's frozen parts are not submodules here (see :func:`_frozen_parts`): DDP, the
    optimizer and the checkpoints never see them; ``train(mode)`` keeps them in eval mode.
    """

    def __init__(self, model: nn.Module, objective: Any, frozen: list[nn.Module]):
        super().__init__()
        self.model = model
        self.objective = objective
        self.frozen = frozen  # a plain list: not registered as submodules

    def forward(self, batch: Any) -> Any:
        return self.objective(self.model, batch)

    def train(self, mode: bool = True) -> _Bundle:
        self.training = mode
        self.model.train(mode)
        if isinstance(self.objective, nn.Module):
            self.objective.train(mode)
        for m in self.frozen:
            m.eval()
        return self


@contextlib.contextmanager
def _frozen_parts(objective: Any, model: nn.Module) -> Iterator[list[nn.Module]]:
    """The objective's ``frozen`` sub-modules, for the run: no grad, eval, and not submodules of it.

    They are moved out of the objective's ``_modules`` into plain attributes (``objective.teacher``
    still works), so ``parameters()``, ``module_state`` and DDP skip them; everything is put back after.
    """
    names = tuple(getattr(objective, "frozen", ()) or ())
    parts = []
    for name in names:
        m = getattr(objective, name, None)
        if not isinstance(m, nn.Module):
            raise ConfigError(f"objective declares frozen {name!r}, which is not an nn.Module "
                              f"({type(m).__name__})")
        parts.append(m)
    model_params = {id(p) for p in model.parameters()}
    if any(id(p) in model_params for m in parts for p in m.parameters()):
        raise ConfigError("a frozen part of the objective shares parameters with the model")
    flags = [[p.requires_grad for p in m.parameters()] for m in parts]
    detached = {n: objective._modules.pop(n) for n in names
                if isinstance(objective, nn.Module) and n in objective._modules}
    for n, m in detached.items():
        object.__setattr__(objective, n, m)
    try:
        for m in parts:
            m.requires_grad_(False)
            m.eval()
        yield parts
    finally:
        for n, m in detached.items():
            del objective.__dict__[n]
            objective._modules[n] = m
        for m, fl in zip(parts, flags):
            for p, f in zip(m.parameters(), fl):
                p.requires_grad_(f)


def _make_accelerator(config: TrainConfig) -> Any:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState

    # under torchrun without a GPU, accelerate needs cpu=True to form the gloo group (MULTI_CPU)
    multi_cpu = world_size() > 1 and not torch.cuda.is_available()
    kwargs = dict(cpu=config.cpu or multi_cpu, mixed_precision=config.mixed_precision)
    want_cpu = kwargs["cpu"] or not torch.cuda.is_available()
    if world_size() == 1 and PartialState._shared_state and (PartialState().device.type == "cpu") != want_cpu:
        # accelerate keeps one device per process: an earlier run with the other `cpu` setting would pin this one
        AcceleratorState._reset_state(reset_partial_state=True)
    try:
        return Accelerator(**kwargs)
    except ValueError as exc:
        # a previous train() in this process used another precision; the process group is kept
        if "already been initialized" not in str(exc):
            raise ConfigError(f"cannot set up accelerate: {exc}") from None
        AcceleratorState._reset_state()
        return Accelerator(**kwargs)


def world_size() -> int:
    """Number of processes of this launch (torchrun / accelerate set ``WORLD_SIZE``)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """True on the process that writes artifacts (global rank 0, or the only process)."""
    return int(os.environ.get("RANK", "0")) == 0


def _coerce_config(config: Any) -> TrainConfig:
    if config is None:
        return TrainConfig()
    if isinstance(config, TrainConfig):
        return config
    if isinstance(config, Mapping):
        return TrainConfig.from_dict(config)
    raise ConfigError(f"config must be a TrainConfig or a mapping, got {type(config).__name__}")


def _reseed(seed: int, device: torch.device) -> None:
    """Seed the global RNGs that a step can use (cheaper than torch.manual_seed on CPU-only builds)."""
    if device.type == "cpu":
        torch.default_generator.manual_seed(seed)
    elif device.type == "cuda":
        torch.default_generator.manual_seed(seed)
        torch.cuda.manual_seed(seed)
    else:
        torch.manual_seed(seed)


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in module_state(model).items()}


def train(model: nn.Module, train_data: Any, objective: Any = None, config: TrainConfig | Mapping | None = None,
          *, val_data: Any = None, collate_fn: Callable | None = None, out_dir: str | Path | None = None,
          resume: bool = False, trainable: Iterable[Any] | Callable[[str, nn.Parameter], bool] | None = None,
          metric: str | Callable[[nn.Module, Any], float] = "accuracy", accelerator: Any = None) -> TrainResult:
    """Train ``model`` in place with ``objective`` and return the curve and final metrics.

    Parameters
    ----------
    model : the module to train, in place; it runs on the accelerator's device and is moved back to the
        device it came on (with an objective module) when training ends, so callers keep comparing it
        with their own tensors.
    train_data : a Dataset, ``(X, y)``, ``{"inputs": X, "labels": y}``, or a mapping of named streams
        (``{"source": ..., "target": ...}``) whose batches reach the objective as
        ``{"source": batch, "target": batch}``; an epoch is one pass over the first stream, the others
        cycle with their own seeded order.
    objective : ``objective(model, batch) -> (mean loss, logs)``, or an :class:`~.objectives.Objective`
        (frozen parts, parameter groups, step hooks, per-sample outputs); default :class:`CrossEntropy`.
    config : a :class:`TrainConfig` or a mapping for :meth:`TrainConfig.from_dict`.
    val_data : evaluated with :func:`evaluate` (accuracy, loss), or given as is to a scorer ``metric``,
        for model selection / early stopping.
    collate_fn : turns a list of dataset items into a batch (default: torch's ``default_collate``;
        arrays are batched directly). A tuple batch ``(X, y)`` becomes ``{"inputs": X, "labels": y}``.
    out_dir : where ``history.json``, ``metrics.json`` and ``checkpoints/step-N/`` go (main process).
    resume : continue from the newest complete checkpoint in ``out_dir`` (from scratch if none).
    trainable : parameter names (exact or module prefixes) or parameters to optimise, or a predicate
        ``trainable(name, param) -> bool`` over the model's named parameters; the others are frozen
        for the run. Default: the parameters with ``requires_grad``. Trainable parameters of an
        ``nn.Module`` objective are always optimised (its declared ``frozen`` parts never).
    metric : validation metric for model selection: ``accuracy`` (higher is better), ``loss``, or a
        scorer ``scorer(model, val_data) -> float`` with attributes ``name`` and ``higher_is_better``
        (see :mod:`.objectives`, "Model selection"); it may be label-free. Inside a :func:`select_with`
        block the default ``accuracy`` becomes that block's scorer, given the validation items only.
    accelerator : an existing ``accelerate.Accelerator`` (default: one made from the config).

    Returns
    -------
    TrainResult
    """
    config = _coerce_config(config)
    if _SELECTOR.get() is not None and isinstance(metric, str) and metric == "accuracy" and val_data is not None:
        metric, val_data = _SELECTOR.get(), _items_only(val_data)  # see select_with: the labels stay unread
    scorer = _check_metric(metric)
    if resume and out_dir is None:
        raise ConfigError("resume=True needs an out_dir holding checkpoints")
    if config.early_stopping_patience is not None and val_data is None:
        raise ConfigError("early_stopping_patience needs val_data")
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    objective = CrossEntropy() if objective is None else objective
    if not callable(objective):
        raise ConfigError(f"objective must be callable, got {type(objective).__name__}")
    streams = _streams(train_data, batched=collate_fn is None)
    if val_data is None or scorer is not None:
        val = val_data
    else:
        val = _as_dataset(val_data, "validation data", batched=collate_fn is None)
    out = Path(out_dir) if out_dir is not None else None

    saved_flags = _select_trainable(model, trainable)
    try:
        with _frozen_parts(objective, model) as frozen:
            return _train(model, streams, objective, frozen, config, val, collate_fn, out, resume,
                          metric if scorer is None else scorer.name, scorer, accelerator)
    finally:
        for n, p in model.named_parameters():
            if n in saved_flags:
                p.requires_grad_(saved_flags[n])


def _check_metric(metric: Any) -> Any:
    """None for ``accuracy``/``loss``; the scorer itself for a scorer; a ConfigError otherwise."""
    if isinstance(metric, str):
        if metric not in ("accuracy", "loss"):
            raise ConfigError(f"metric must be 'accuracy', 'loss' or a scorer, got {metric!r}")
        return None
    name, hib = getattr(metric, "name", None), getattr(metric, "higher_is_better", None)
    if not callable(metric) or not isinstance(name, str) or not name or not isinstance(hib, bool):
        raise ConfigError("metric must be 'accuracy', 'loss' or a scorer: a callable scorer(model, val_data) "
                          "with a str `name` and a bool `higher_is_better`")
    return metric


def _score(scorer: Any, model: nn.Module, val_data: Any, acc: Any) -> float:
    """``scorer(model, val_data)`` in eval mode without gradients; rank 0's value on every rank."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            value = float(scorer(model, val_data))
    finally:
        model.train(was_training)
    if acc.num_processes > 1:
        from accelerate.utils import broadcast

        value = float(broadcast(torch.tensor([value], dtype=torch.float64, device=acc.device), from_process=0)[0])
    return value


def _gather_outputs(parts: dict[str, list[tuple[torch.Tensor, int, torch.Tensor]]], n: int, acc: Any
                    ) -> dict[str, torch.Tensor]:
    """Per-sample outputs ``{name: [(indices, step, values), ...]}`` of every rank as ``(n, ...)`` tensors.

    Rows are ordered by (step, rank, local order) and the latest visit of a sample wins; unvisited
    rows are NaN (floating outputs) or -1.
    """
    world, rank, device = acc.num_processes, acc.process_index, acc.device
    result = {}
    for name, chunks in parts.items():
        idx = torch.cat([c[0] for c in chunks])
        key = torch.cat([torch.full((len(c[0]),), c[1] * world + rank, dtype=torch.long) for c in chunks])
        val = torch.cat([c[2] for c in chunks])
        if val.dtype == torch.bool:
            val = val.long()
        if world > 1:  # every rank holds the same number of rows (equal shards, same steps)
            idx, key, val = (acc.gather(t.to(device)).cpu() for t in (idx, key, val))
        order = torch.argsort(key, stable=True)
        idx, val = idx[order], val[order]
        rev = idx.flip(0).numpy()
        uniq, first_in_rev = np.unique(rev, return_index=True)
        last = len(rev) - 1 - first_in_rev
        fill = float("nan") if val.is_floating_point() else -1
        table = torch.full((n, *val.shape[1:]), fill, dtype=val.dtype)
        table[torch.as_tensor(uniq)] = val[torch.as_tensor(last)]
        result[name] = table
    return result


def _train(model, streams, objective, frozen, config, val, collate_fn, out, resume, metric, scorer, accelerator):
    acc = accelerator if accelerator is not None else _make_accelerator(config)
    world, rank, main = acc.num_processes, acc.process_index, acc.is_main_process
    k = config.grad_accum

    params: list[nn.Parameter] = []
    seen: set[int] = set()
    modules = [model] + ([objective] if isinstance(objective, nn.Module) else [])
    for m in modules:
        for p in m.parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                params.append(p)
    if not params:
        raise ConfigError("nothing to train: no parameter requires grad")

    home = next(iter(model.parameters()), torch.empty(0)).device
    frozen_homes = [next(iter([*m.parameters(), *m.buffers()]), torch.empty(0)).device for m in frozen]
    bundle = _Bundle(model, objective, frozen)
    optimizer = _build_optimizer(config, _lr_groups(objective, model, params))
    bundle, optimizer = acc.prepare(bundle, optimizer)
    device = acc.device
    for m in frozen:
        m.to(device)
    before_step = getattr(objective, "before_step", None)
    after_step = getattr(objective, "after_step", None)

    # ---- schedule of micro-batches
    main_ds = streams[0][1]
    n_main = len(main_ds)
    nb = len(_rank_batches(torch.arange(n_main), rank, world, config.batch_size))
    steps_per_epoch = -(-nb // k)
    total = config.max_steps if config.max_steps is not None else config.epochs * steps_per_epoch
    warmup = int(config.warmup_ratio * total)
    # an objective's own schedule (DANN's annealed lr) replaces the config's scheduler and warm-up
    own_schedule = getattr(objective, "lr_factor", None)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer,
        (lambda s: own_schedule(s, total)) if own_schedule is not None
        else (lambda s: lr_factor(s, total, warmup, config.scheduler)))
    collates = [_collate_for(ds, collate_fn) for _, ds in streams]
    higher_better = scorer.higher_is_better if scorer is not None else metric != "loss"
    restore = config.restore_best or config.early_stopping_patience is not None

    # ---- state (fresh or resumed)
    step = 0
    history: list[dict[str, Any]] = []
    best = {"value": None, "step": 0, "metrics": {}}
    bad_evals = 0
    stopped = False
    best_state: dict[str, torch.Tensor] | None = None
    first_loss: float | None = None  # the first update's loss: the scale a diverged loss is judged against
    running: dict[str, torch.Tensor] = {}  # size-weighted sums of the logs since the last record
    running_n = 0
    last_eval_step = -1
    outputs: dict[str, list[tuple[torch.Tensor, int, torch.Tensor]]] = {}
    ckpt_root = out / "checkpoints" if out is not None else None
    fingerprint = {"world_size": world, "n_train": [len(ds) for _, ds in streams],
                   "streams": [name for name, _ in streams]}
    if resume and ckpt_root is not None and (path := latest_checkpoint(ckpt_root)) is not None:
        tensors, state = load_checkpoint(path)
        _check_resumable(state, config, fingerprint, path)
        load_module_state(model, tensors.get("model", {}))
        if isinstance(objective, nn.Module):
            load_module_state(objective, tensors.get("objective", {}))
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler") is not None and getattr(acc, "scaler", None) is not None:
            acc.scaler.load_state_dict(state["scaler"])
        step, history, bad_evals = state["step"], list(state["history"]), state["bad_evals"]
        best, stopped, last_eval_step = dict(state["best"]), state["stopped"], state["last_eval_step"]
        best_state = tensors.get("best")
        running = {k_: v.to(device) for k_, v in state["running"].items()}
        running_n = int(state["running_n"])
        first_loss = state.get("first_loss")
        if main:
            log.info("resumed from %s (step %d of %d)", path, step, total)

    def flush(rec: dict[str, Any]) -> None:
        nonlocal running, running_n
        if running_n == 0:  # equal on every rank: the shards have equal sizes
            return
        keys = sorted(running)
        vec = torch.stack([running[x].to(device, torch.float32) for x in keys]
                          + [torch.tensor(float(running_n), device=device)])
        if world > 1:
            vec = acc.reduce(vec, reduction="sum")
        vec = vec.double().cpu()
        for i, key in enumerate(keys):
            rec[f"train_{key}"] = float(vec[i] / vec[-1])
        running = {}
        running_n = 0

    def write_files(final_metrics: dict | None = None) -> None:
        if out is None or not main:
            return
        write_json(out / "history.json", history)
        if final_metrics is not None:
            write_json(out / "metrics.json", final_metrics)

    def checkpoint() -> None:
        if ckpt_root is None:
            return
        if main:
            tensors = {"model": module_state(model)}
            if isinstance(objective, nn.Module):
                tensors["objective"] = module_state(objective)
            if best_state is not None:
                tensors["best"] = best_state
            state = {
                "step": step, "history": history, "bad_evals": bad_evals, "best": best,
                "stopped": stopped, "last_eval_step": last_eval_step,
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": acc.scaler.state_dict() if getattr(acc, "scaler", None) is not None else None,
                "running": {x: v.detach().cpu() for x, v in running.items()},
                "running_n": running_n, "first_loss": first_loss,
                "config": config.to_dict(), "fingerprint": fingerprint, "total_steps": total,
            }
            save_checkpoint(ckpt_root, step, tensors=tensors, state=state, keep=config.keep_checkpoints)
            write_files()
        acc.wait_for_everyone()

    pbar, postfix = None, {}
    if config.progress and main:
        from tqdm.auto import tqdm

        pbar = tqdm(total=total, initial=step, file=sys.stderr, desc="train", dynamic_ncols=True,
                    leave=False)

    bundle.train()
    secondary_cache: dict[tuple[int, int], list[list[int]]] = {}

    def stream_batches(si: int, g0: int, g1: int) -> list[list[int]]:
        """Micro-batches g0..g1-1 of secondary stream ``si`` (cycles with its own epochs)."""
        ds = streams[si][1]
        per = len(_rank_batches(torch.arange(len(ds)), rank, world, config.batch_size))
        res = []
        for g in range(g0, g1):
            e, j = divmod(g, per)
            if (si, e) not in secondary_cache:
                if len(secondary_cache) > 8:
                    secondary_cache.clear()
                secondary_cache[(si, e)] = _rank_batches(
                    _order(len(ds), config.seed, si, e, config.shuffle), rank, world, config.batch_size)
            res.append(secondary_cache[(si, e)][j])
        return res

    try:
        while step < total and not stopped:
            epoch, done_in_epoch = divmod(step, steps_per_epoch)
            main_batches = _rank_batches(_order(n_main, config.seed, 0, epoch, config.shuffle),
                                         rank, world, config.batch_size)
            j0 = done_in_epoch * k
            steps_here = min(steps_per_epoch - done_in_epoch, total - step)
            j1 = min(nb, j0 + steps_here * k)
            per_stream = [main_batches[j0:j1]] + [stream_batches(si, epoch * nb + j0, epoch * nb + j1)
                                                 for si in range(1, len(streams))]
            loaders = [_loader(ds, b, c, config.num_workers, _mix(config.seed, 7, si, epoch, j0))
                       for si, ((_, ds), b, c) in enumerate(zip(streams, per_stream, collates))]
            it = zip(*loaders)
            for g_start in range(j0, j1, k):
                group = main_batches[g_start: min(g_start + k, j1)]
                sizes = [len(b) for b in group]
                group_n = sum(sizes)
                if before_step is not None:
                    before_step(step, total)
                _reseed(_mix(config.seed, 1, step, rank), device)
                step_loss = torch.zeros((), dtype=torch.float64, device=device)
                for i, size in enumerate(sizes):
                    raws = next(it)
                    if streams[0][0] is None:
                        batch = _to_batch(raws[0])
                    else:
                        batch = {name: _to_batch(r) for (name, _), r in zip(streams, raws)}
                    batch = _to_device(batch, device)
                    sync = contextlib.nullcontext() if i == len(sizes) - 1 else acc.no_sync(bundle)
                    with sync:
                        res = bundle(batch)
                        if not isinstance(res, (tuple, list)) or len(res) not in (2, 3) \
                                or not isinstance(res[0], torch.Tensor) or res[0].ndim != 0:
                            raise ConfigError("objective must return a scalar loss tensor, a dict of logs and "
                                              "optionally a dict of per-sample outputs")
                        loss, logs = res[0], res[1]
                        step_loss = step_loss + loss.detach().double() * (size / group_n)
                        acc.backward(loss * (size / group_n))
                    for key, value in (res[2] if len(res) == 3 else {}).items():
                        if not isinstance(value, torch.Tensor) or value.ndim == 0 or len(value) != size:
                            raise ConfigError(f"per-sample output {key!r} must be a tensor with one row per "
                                              f"sample of the batch ({size})")
                        outputs.setdefault(key, []).append(
                            (torch.as_tensor(group[i], dtype=torch.long), step, value.detach().cpu()))
                    for key, value in {"loss": loss, **(logs or {})}.items():
                        v = value.detach().float().reshape(()) if isinstance(value, torch.Tensor) \
                            else torch.tensor(float(value), device=device)
                        running[key] = running[key] + v * size if key in running else v * size
                    running_n += size
                lr = optimizer.param_groups[0]["lr"] / optimizer.param_groups[0].get("lr_scale", 1.0)
                if world > 1:  # every rank sees the same mean loss and stops together
                    step_loss = acc.reduce(step_loss, reduction="mean")
                value = float(step_loss)
                if first_loss is None:
                    first_loss = value
                if not math.isfinite(value) or abs(value) > DIVERGED * max(1.0, abs(first_loss)):
                    # before the step: no NaN reaches the weights, the checkpoints or a Delta
                    raise TrainingDiverged(f"training diverged: the training loss is {value:.3g} at step {step + 1} of "
                                           f"{total} (it started at {first_loss:.3g}; lr {lr:.3g}); lower the "
                                           "learning rate")
                if config.max_grad_norm is not None:
                    acc.clip_grad_norm_(params, config.max_grad_norm)
                optimizer.step()
                if not acc.optimizer_step_was_skipped:
                    scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                if after_step is not None and after_step(step, total, model):
                    stopped = True
                step += 1

                end_of_epoch = g_start + k >= nb
                do_eval = val is not None and (
                    step == total or stopped
                    or (config.eval_every is not None and step % config.eval_every == 0)
                    or (config.eval_every is None and end_of_epoch))
                rec: dict[str, Any] = {}
                if step % config.log_every == 0 or do_eval or step == total or end_of_epoch:
                    flush(rec)
                if do_eval:
                    if scorer is None:
                        ev = evaluate(model, val, collate_fn=collate_fn, batch_size=config.eval_batch_size,
                                      accelerator=acc)
                        rec.update({f"val_{x}": v for x, v in ev.items() if x != "n"})
                        value = ev[metric]
                    else:
                        value = _score(scorer, model, val, acc)
                        rec[f"val_{metric}"] = value
                    bundle.train()
                    last_eval_step = step
                    improved = best["value"] is None or (
                        value > best["value"] if higher_better else value < best["value"])
                    if improved:
                        best = {"value": value, "step": step, "metrics": dict(rec)}
                        bad_evals = 0
                        if restore:
                            best_state = _snapshot(model)
                    else:
                        bad_evals += 1
                        if config.early_stopping_patience is not None and bad_evals >= config.early_stopping_patience:
                            stopped = True
                if rec:
                    rec = {"step": step, "epoch": round(step / steps_per_epoch, 4), "lr": lr, **rec}
                    history.append(rec)
                    if do_eval and any([w(step, total, value, rec) for w in _WATCHERS.get()]):
                        stopped = True
                    if pbar is not None:
                        postfix.update({x: f"{v:.4g}" for x, v in rec.items()
                                        if x in ("train_loss", f"val_{metric}")})
                        pbar.set_postfix(postfix, refresh=False)
                if pbar is not None:
                    pbar.update(1)
                if config.checkpoint_every is not None and (
                        step % config.checkpoint_every == 0 or step == total or stopped):
                    checkpoint()
                if stopped:
                    break
    finally:
        if pbar is not None:
            pbar.close()

    # ---- finish
    restored = False
    if restore and best_state is not None and best["step"] != step:
        load_module_state(model, best_state)
        restored = True
    train_recs = [r for r in history if "train_loss" in r]
    metrics: dict[str, Any] = {}
    if val is not None:
        src = best["metrics"] if restored else next(
            (r for r in reversed(history) if r["step"] == last_eval_step), {})
        metrics.update({x: v for x, v in src.items() if x.startswith("val_")})
    metrics.update({
        "train_loss": train_recs[-1]["train_loss"] if train_recs else None,
        "steps": step,
        "best_step": best["step"] if val is not None else step,
        "stopped_early": stopped,
        "restored_best": restored,
        "world_size": world,
    })
    write_files(metrics)
    gathered = _gather_outputs(outputs, n_main, acc)
    acc.wait_for_everyone()
    bundle.train()
    if device != home:
        for m in modules:
            m.to(home)
    for m, h in zip(frozen, frozen_homes):
        m.to(h)
    if accelerator is None:  # drop the accelerator's references to the wrapped model and optimizer
        for attr in ("_models", "_optimizers", "_schedulers", "_dataloaders"):
            if isinstance(getattr(acc, attr, None), list):
                getattr(acc, attr).clear()
    return TrainResult(metrics=metrics, history=history, best_step=metrics["best_step"], steps=step,
                       out_dir=out, stopped_early=stopped, outputs=gathered)


def _check_resumable(state: dict, config: TrainConfig, fingerprint: dict, path: Path) -> None:
    old = state.get("config", {})
    new = config.to_dict()
    changed = sorted(x for x in set(old) | set(new) if x not in _RESUME_FREE and old.get(x) != new.get(x))
    if changed:
        x = changed[0]
        raise ConfigError(f"cannot resume from {path}: option {x} was {old.get(x)!r}, now {new.get(x)!r}")
    for key, value in fingerprint.items():
        if state.get("fingerprint", {}).get(key) != value:
            raise ConfigError(f"cannot resume from {path}: {key} was {state['fingerprint'].get(key)!r}, "
                              f"now {value!r}")
