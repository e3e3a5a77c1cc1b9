"""Fisher-weighted averaging with a per-example diagonal Fisher.

Matena & Raffel, "Merging Models with Fisher-Weighted Averaging", NeurIPS 2022 (reference code:
mmatena/model_merging, ``fisher.py`` and ``merging.py``, TensorFlow).

**Fisher** (:func:`compute_fisher`). The diagonal of the model's Fisher information,

    F = (1/N) Σ_x Σ_y p_θ(y|x) · (∇_θ log p_θ(y|x))²          (default, "true"/expected Fisher)
    F = (1/N) Σ_x (∇_θ log p_θ(y_x|x))²                          (``empirical=True``, gold labels)

with **per-example** gradients: the square is taken per example (and per class), then summed — never
the square of a batch gradient, which keeps the cross-example terms and is not the diagonal Fisher
(the defect of a popular port, yule-BUAA/MergeLM). Gradients come from ``torch.func.vmap(grad(...))``
(``method="vmap"``, default) or an explicit per-example ``autograd.grad`` loop (``method="loop"``,
for models torch.func cannot trace). p_θ(y|x) is the model's own predicted distribution (a constant
weight, not differentiated); the expectation is exact (one gradient per class, cost ∝ #classes); the
sampled variant is not implemented. The model runs in ``eval()`` mode (no dropout; BatchNorm uses
running statistics) and must return logits of shape (batch, classes) (a tensor, ``.logits`` or
``["logits"]``). Defaults of the reference: N = 4096 training examples, batch 2.

**Merge** (:func:`fisher_merge`). θ* = Σ_i λ_i F_i ⊙ θ_i / Σ_i λ_i F_i, element-wise. Model 0 is the
*target*. Defaults follow the reference: ``weights`` λ uniform; ``normalize=True`` divides each model's
Fisher by its global L2 norm; ``floor=1e-6`` applied to the target's Fisher only
(``favor_target=True``) so that coordinates where every Fisher vanishes **fall back to the target
model** (with ``favor_target=False`` every Fisher is floored, giving the λ-average there).
``meta["fallback_fraction"]`` reports the share of coordinates where all Fishers were 0.

Deviation: the reference applies the floor to the raw Fisher and divides the *coefficient* by the norm,
so its effective floor is ``floor/‖F_0‖``; here the floor applies to the normalised Fisher, so its
meaning does not depend on the Fisher's scale (identical when ``normalize=False``).

Inputs may be Deltas of one base (→ a ``full`` Delta: by linearity Fisher-merging models equals
Fisher-merging their task vectors) or models/state dicts (→ a state dict). Only the body is merged:
Delta heads (``new.``) are dropped (restore one with :func:`~transferkit.merge.attach_head`); for
state dicts, tensors named in ``exclude`` (name or prefix ending in ``.``), non-float tensors, and
tensors whose shape differs or that some model lacks are taken from the target. Float tensors without
a Fisher (BatchNorm running statistics) get the λ-weighted plain average (``meta["no_fisher"]``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import nn

from ..delta import Delta
from ..errors import ConfigError, DataError
from ..registry import option, register
from ._common import MergeOptions, _excluded, as_weights, check_deltas, first, get, make_delta, stack_bodies

# ----------------------------------------------------------------------------------------------
# Fisher estimation


def _split_batch(batch: Any) -> tuple[Any, torch.Tensor | None]:
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, Mapping):
        inputs = dict(batch)
        labels = inputs.pop("labels", inputs.pop("label", None))
        return inputs, labels
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    raise DataError("compute_fisher: each batch must be a tensor, an (inputs, labels) pair, or a dict "
                    "of model inputs (optionally with 'labels')")


def _batch_len(inputs: Any) -> int:
    if isinstance(inputs, torch.Tensor):
        return inputs.shape[0]
    return next(iter(inputs.values())).shape[0]


def _slice(inputs: Any, n: int) -> Any:
    if isinstance(inputs, torch.Tensor):
        return inputs[:n]
    return {k: v[:n] for k, v in inputs.items()}


def _unsqueeze(inputs: Any) -> Any:
    if isinstance(inputs, torch.Tensor):
        return inputs.unsqueeze(0)
    return {k: v.unsqueeze(0) for k, v in inputs.items()}


def _logits(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        logits = out
    elif isinstance(out, Mapping) and "logits" in out:
        logits = out["logits"]
    elif hasattr(out, "logits"):
        logits = out.logits
    else:
        raise DataError(f"compute_fisher: the model returned {type(out).__name__}, not logits")
    if logits.dim() != 2:
        raise DataError(f"compute_fisher: logits must be (batch, classes), got shape {tuple(logits.shape)}")
    return logits


def _call(model: nn.Module, inputs: Any) -> Any:
    return model(**inputs) if isinstance(inputs, Mapping) else model(inputs)


def compute_fisher(model: nn.Module, batches: Iterable[Any], *, empirical: bool = False,
                   n_examples: int | None = None, method: str = "vmap",
                   params: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    """Diagonal Fisher of ``model`` from per-example gradients (see the module docstring).

    Parameters
    ----------
    model : classifier returning logits (batch, classes).
    batches : iterable (e.g. a DataLoader) of input tensors, ``(inputs, labels)`` pairs, or dicts of
        keyword inputs (``labels`` taken out). Labels are needed only with ``empirical=True``.
    empirical : use the gold label (empirical Fisher) instead of the expectation over p_θ(y|x).
    n_examples : stop after this many examples (default: all).
    method : ``"vmap"`` (torch.func per-example gradients) or ``"loop"`` (one backward per example).
    params : names of the parameters to compute (default: every parameter with ``requires_grad``).

    Returns
    -------
    ``{parameter name: Fisher diagonal}`` (float32, same shapes), averaged over the examples.
    """
    if method not in ("vmap", "loop"):
        raise ConfigError(f"compute_fisher: method must be 'vmap' or 'loop', got {method!r}")
    named = dict(model.named_parameters())
    names = list(params) if params is not None else [n for n, p in named.items() if p.requires_grad]
    missing = [n for n in names if n not in named]
    if missing:
        raise ConfigError(f"compute_fisher: unknown parameter(s) {missing[:3]}")
    if not names:
        raise ConfigError("compute_fisher: no parameters to compute a Fisher for")
    fisher = {n: torch.zeros(named[n].shape, dtype=torch.float32, device=named[n].device) for n in names}
    was_training = model.training
    model.eval()
    seen = 0
    try:
        for batch in batches:
            inputs, labels = _split_batch(batch)
            b = _batch_len(inputs)
            if n_examples is not None:
                b = min(b, n_examples - seen)
                if b <= 0:
                    break
                inputs = _slice(inputs, b)
                labels = labels[:b] if labels is not None else None
            if empirical and labels is None:
                raise DataError("compute_fisher: empirical=True needs labels in every batch")
            if method == "vmap":
                _accumulate_vmap(model, names, inputs, labels, empirical, fisher)
            else:
                _accumulate_loop(model, names, inputs, labels, empirical, fisher)
            seen += b
            if n_examples is not None and seen >= n_examples:
                break
    finally:
        model.train(was_training)
    if seen == 0:
        raise DataError("compute_fisher: no examples")
    return {n: f / seen for n, f in fisher.items()}


def _accumulate_vmap(model, names, inputs, labels, empirical, fisher) -> None:
    from torch.func import functional_call, grad, vmap

    trainable = {n: p.detach() for n, p in model.named_parameters() if n in fisher}
    frozen = {n: p.detach() for n, p in model.named_parameters() if n not in fisher}
    frozen.update({n: b.detach() for n, b in model.named_buffers()})

    def log_prob(p, x, c):
        if isinstance(x, Mapping):
            out = functional_call(model, {**frozen, **p}, (), _unsqueeze(x))
        else:
            out = functional_call(model, {**frozen, **p}, (_unsqueeze(x),))
        lp = torch.log_softmax(_logits(out).float(), dim=-1).squeeze(0)
        return lp.gather(0, c.reshape(1)).squeeze(0)

    per_example = vmap(grad(log_prob), in_dims=(None, 0, 0))
    b = _batch_len(inputs)
    if empirical:
        g = per_example(trainable, inputs, labels.long())
        for n in names:
            fisher[n] += g[n].float().pow(2).sum(0)
        return
    with torch.no_grad():
        probs = torch.softmax(_logits(_call(model, inputs)).float(), dim=-1)
    for c in range(probs.shape[1]):
        cls = torch.full((b,), c, dtype=torch.long, device=probs.device)
        g = per_example(trainable, inputs, cls)
        w = probs[:, c]
        for n in names:
            gn = g[n].float()
            fisher[n] += (w.view(-1, *([1] * (gn.dim() - 1))) * gn.pow(2)).sum(0)


def _accumulate_loop(model, names, inputs, labels, empirical, fisher) -> None:
    named = dict(model.named_parameters())
    params = [named[n] for n in names]
    for i in range(_batch_len(inputs)):
        x = _slice_one(inputs, i)
        lp = torch.log_softmax(_logits(_call(model, x)).float(), dim=-1)[0]
        classes = [int(labels[i])] if empirical else range(lp.shape[0])
        probs = lp.detach().exp()
        for c in classes:
            grads = torch.autograd.grad(lp[c], params, retain_graph=True, allow_unused=True)
            w = 1.0 if empirical else probs[c]
            for n, g in zip(names, grads):
                if g is not None:
                    fisher[n] += w * g.float().pow(2)


def _slice_one(inputs: Any, i: int) -> Any:
    if isinstance(inputs, torch.Tensor):
        return inputs[i:i + 1]
    return {k: v[i:i + 1] for k, v in inputs.items()}


# ----------------------------------------------------------------------------------------------
# Fisher-weighted merge


def fisher_merge(models_or_deltas: Sequence[Delta] | Sequence[nn.Module] | Sequence[Mapping[str, torch.Tensor]],
                 fishers: Sequence[Mapping[str, torch.Tensor]], *, weights: Sequence[float] | None = None,
                 floor: float = 1e-6, favor_target: bool = True, normalize: bool = True,
                 exclude: Sequence[str] = ()) -> Delta | dict[str, torch.Tensor]:
    """Fisher-weighted average; model/delta 0 is the target (see the module docstring).

    Parameters
    ----------
    models_or_deltas : Deltas of one base (→ Delta) or ``nn.Module``s / state dicts (→ state dict).
    fishers : one ``{name: diagonal Fisher}`` per input (e.g. from :func:`compute_fisher`).
    weights : merging coefficients λ_i (default uniform 1/n; the reference searches a grid).
    floor : minimum Fisher value (ε), applied to the target only when ``favor_target``.
    favor_target : floor only the target's Fisher, so vanishing coordinates fall back to it.
    normalize : divide each Fisher by its global L2 norm first.
    exclude : names or prefixes (ending in ``.``) not merged (left at base / taken from the target).
    """
    items = list(models_or_deltas)
    if not items:
        raise ConfigError("fisher_merge needs at least one model or delta")
    fishers = list(fishers)
    if len(fishers) != len(items):
        raise ConfigError(f"fisher_merge: {len(fishers)} Fishers for {len(items)} models")
    lams = as_weights(weights, len(items), "fisher_merge", 1.0 / len(items))
    if floor < 0:
        raise ConfigError("fisher_merge: floor must be >= 0")
    norms = [_global_norm(f) if normalize else 1.0 for f in fishers]
    norms = [n if n > 0 else 1.0 for n in norms]
    stats = {"coords": 0, "fallback": 0, "no_fisher": set()}

    def merge_tensor(name: str, values: list[torch.Tensor]) -> torch.Tensor:
        dtype = values[0].dtype
        fs = [f.get(name) for f in fishers]
        if any(f is None for f in fs):
            stats["no_fisher"].add(name)
            total = sum(lams)
            if total == 0:
                return values[0]
            return sum(l * v for l, v in zip(lams, values)) / total
        for f, v in zip(fs, values):
            if f.shape != v.shape:
                raise ConfigError(f"fisher_merge: Fisher of {name!r} has shape {tuple(f.shape)}, "
                                  f"tensor has {tuple(v.shape)}")
        fs = [f.to(device=values[0].device, dtype=dtype) / nrm for f, nrm in zip(fs, norms)]
        vanished = torch.stack([f <= 0 for f in fs]).all(dim=0)
        stats["coords"] += vanished.numel()
        stats["fallback"] += int(vanished.sum())
        num = torch.zeros_like(values[0])
        den = torch.zeros_like(values[0])
        for j, (f, v, lam) in enumerate(zip(fs, values, lams)):
            if not favor_target or j == 0:
                f = f.clamp(min=floor)
            w = lam * f
            num += w * v
            den += w
        return torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), values[0])

    if all(isinstance(x, Delta) for x in items):
        deltas = check_deltas(items, "fisher_merge")
        names, bodies, meta = stack_bodies(deltas, exclude)
        out = {}
        for name in names:
            like = first(bodies, name)
            out[name] = merge_tensor(name, [get(b, name, like) for b in bodies])
        result: Delta | dict = make_delta(deltas[0].base, out, meta)
        meta = result.meta
    elif any(isinstance(x, Delta) for x in items):
        raise ConfigError("fisher_merge: pass either Deltas or models/state dicts, not a mix")
    else:
        states = [x.state_dict() if isinstance(x, nn.Module) else dict(x) for x in items]
        result, meta = {}, {"n_models": len(states)}
        exclude = tuple(exclude)
        for name, target in states[0].items():
            others = [s.get(name) for s in states]
            mergeable = (target.is_floating_point() and not _excluded(name, exclude)
                         and all(o is not None and o.shape == target.shape for o in others))
            if not mergeable:
                result[name] = target.detach().clone()
                continue
            dtype = torch.promote_types(target.dtype, torch.float32)
            merged = merge_tensor(name, [o.detach().to(device=target.device, dtype=dtype) for o in others])
            result[name] = merged.to(target.dtype)
    meta.update(method="fisher", weights=lams, floor=float(floor), favor_target=bool(favor_target),
                normalize=bool(normalize), no_fisher=sorted(stats["no_fisher"]),
                fallback_fraction=stats["fallback"] / stats["coords"] if stats["coords"] else 0.0)
    return result


def _global_norm(fisher: Mapping[str, torch.Tensor]) -> float:
    return float(sum(f.double().pow(2).sum() for f in fisher.values()) ** 0.5) if fisher else 0.0


@dataclass
class FisherOptions(MergeOptions):
    """Options of the ``fisher`` merge method: Fisher estimation (first four) and :func:`fisher_merge`."""

    n_examples: int = option(256, low=1, help="training examples per model for its Fisher")
    batch_size: int = option(4, low=1, help="batch size of the Fisher estimation")
    empirical: bool = option(False, help="empirical Fisher (gold labels) instead of the expected one")
    floor: float = option(1e-6, low=0.0, help="minimum Fisher value (the target's only, with favor_target)")
    favor_target: bool = option(True, help="floor only model 0's Fisher: vanishing coordinates fall back to it")
    normalize: bool = option(True, help="divide each Fisher by its global L2 norm first")

    def kwargs(self, *, checkpoint: bool = False) -> dict[str, Any]:
        return {**super().kwargs(checkpoint=checkpoint), "floor": float(self.floor),
                "favor_target": bool(self.favor_target), "normalize": bool(self.normalize)}


register("merge", "fisher", fn=fisher_merge, options=FisherOptions,
         paper="Matena & Raffel, Merging Models with Fisher-Weighted Averaging, NeurIPS 2022",
         summary="Fisher-weighted averaging, per-example diagonal Fisher on each model's training data",
         streamable=False, per_layer=False, weights="kwarg", needs_data=True)
