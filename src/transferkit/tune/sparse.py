"""LT-SFT: composable sparse fine-tuning (Ansell, Ponti, Korhonen, Vulić; ACL 2022, arXiv:2110.07560).

1. Phase 1: full fine-tuning from θ0 → θ1.
2. Mask M = the K entries with the largest |θ1 − θ0|, chosen **globally** over the maskable body
   parameters (every floating-point backbone parameter unless ``exclude`` names it).
3. Reset the body to θ0 (and the new head to its initial value); phase 2 trains again with every
   body gradient multiplied by M (gradient masking, tensor hooks), so entries outside M never move.
   Phase 2 runs with ``weight_decay = 0``: decoupled weight decay would shrink every entry, masked
   or not (the reference code regularises with an optional L1 pull toward θ0 instead, not implemented
   here). With zero gradient and zero decay AdamW leaves an entry bitwise unchanged.
4. φ = θ2 − θ0 restricted to M is a Delta of kind ``sparse`` (``<name>.indices`` flat positions +
   ``<name>.values``, ``meta["shapes"]``), with at most K stored entries.

Head handling: the classification head is new (it has no pretrained value), so it is not maskable
and does not count in K; it is trained densely in both phases (reset to its initialisation before
phase 2) and stored as ``new.head.*`` tensors.

Composition (:func:`compose`): sparse Deltas add — ``θ = θ0 + φ_domain + φ_task``; the result holds the
union of the index sets with summed values, is order-independent, and ``to_dense(compose(a, b)) ==
to_dense(a) + to_dense(b)``. A *domain* SFT comes from masked-LM LT-SFT on unlabeled in-domain text
(:func:`domain_sft`, objective :class:`MaskedLM`, BERT-style encoders); as in the paper's recipe the
task SFT is then trained on top of the domain-adapted body and the two are composed
(``tune(..., method="sparse", config={"domain_mlm": True})`` does both and returns the composition).

>>> res = tune(model, train, test, method="sparse", config={"density": 0.01})          # doctest: +SKIP
>>> dom = domain_sft(model, unlabeled_texts, density=0.01)                              # doctest: +SKIP
>>> both = compose(dom, res.delta)                                                      # doctest: +SKIP
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from ..delta import NEW, SPARSE_IDX, SPARSE_VAL, Delta, apply
from ..engine import CrossEntropy, TrainConfig, train
from ..engine.objectives import MaskedLM
from ..errors import ConfigError, ModelError
from ..zoo.base import Classifier
from ._common import Fitted, Pairs, make_collate, require_text_hf
from .registry import PEFT_TRAIN, STAGE
from .. import registry
from ..registry import option

__all__ = ["MaskedLM", "SparseFit", "lt_sft", "topk_masks", "sparse_delta", "compose", "nnz", "domain_sft",
           "resolve_k", "run"]


# ------------------------------------------------------------------------------------------- pieces
def resolve_k(n_maskable: int, k: int | None = None, density: float | None = None) -> int:
    """K from an explicit count or a density (fraction of the maskable entries)."""
    if k is not None:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k <= 0:
            raise ConfigError(f"sparse option k must be a positive integer, got {k!r}")
        return int(min(k, n_maskable))
    if density is None or not 0 < float(density) <= 1:
        raise ConfigError(f"sparse option density must be in (0, 1], got {density!r}")
    return max(1, int(round(float(density) * n_maskable)))


def topk_masks(diffs: Mapping[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """Boolean masks selecting the ``k`` entries of largest ``|diff|``, globally over all tensors."""
    names = list(diffs)
    flat = torch.cat([diffs[n].detach().abs().reshape(-1).float() for n in names])
    k = min(int(k), flat.numel())
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    keep[torch.topk(flat, k, sorted=False).indices] = True
    out, start = {}, 0
    for n in names:
        size = diffs[n].numel()
        out[n] = keep[start:start + size].view(diffs[n].shape)
        start += size
    return out


def sparse_delta(base: Mapping[str, torch.Tensor], tuned: Mapping[str, torch.Tensor],
                 masks: Mapping[str, torch.Tensor], *, base_name: str, prefix: str = "",
                 new: Mapping[str, torch.Tensor] | None = None, meta: dict | None = None) -> Delta:
    """The ``sparse`` Delta ``(tuned − base)`` on the entries of ``masks`` (names get ``prefix``).

    Every mask entry is stored (a zero change is kept as a zero value), so the index set is the mask.
    """
    tensors: dict[str, torch.Tensor] = {}
    shapes: dict[str, list[int]] = {}
    for name, m in masks.items():
        idx = torch.nonzero(m.reshape(-1), as_tuple=False).reshape(-1).to(torch.int64)
        if idx.numel() == 0:
            continue
        diff = (tuned[name].detach() - base[name].detach()).reshape(-1)
        tensors[prefix + name + SPARSE_IDX] = idx
        tensors[prefix + name + SPARSE_VAL] = diff[idx].clone()
        shapes[prefix + name] = list(m.shape)
    for name, value in (new or {}).items():
        tensors[NEW + name] = value.detach().clone()
    info = dict(meta or {})
    info["shapes"] = shapes
    info["nnz"] = sum(t.numel() for n, t in tensors.items() if n.endswith(SPARSE_IDX) and not n.startswith(NEW))
    return Delta(base_name, "sparse", tensors, info)


def nnz(delta: Delta) -> int:
    """Stored entries of a sparse Delta (new tensors excluded); ≥ its number of non-zero values."""
    if delta.kind != "sparse":
        raise ModelError(f"expected a sparse delta, got kind {delta.kind!r}")
    return sum(t.numel() for n, t in delta.tensors.items() if n.endswith(SPARSE_IDX) and not n.startswith(NEW))


def compose(*deltas: Delta) -> Delta:
    """The sum of sparse Deltas on the same base: union of the index sets, values added.

    Order-independent for the additive part; new tensors (heads) are taken from the deltas in order,
    a later one replacing an earlier one of the same name.
    """
    if not deltas:
        raise ConfigError("compose needs at least one delta")
    base = deltas[0].base
    for d in deltas:
        if d.kind != "sparse":
            raise ModelError(f"compose adds sparse deltas; got kind {d.kind!r}")
        if d.base != base:
            raise ModelError(f"cannot compose deltas of different bases: {base!r} and {d.base!r}")
    shapes: dict[str, list[int]] = {}
    parts: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    new: dict[str, torch.Tensor] = {}
    for d in deltas:
        for name, t in d.tensors.items():
            if name.startswith(NEW):
                new[name] = t
            elif name.endswith(SPARSE_IDX):
                target = name[: -len(SPARSE_IDX)]
                shape = list(d.meta["shapes"][target])
                if shapes.setdefault(target, shape) != shape:
                    raise ModelError(f"tensor {target!r} has shape {shapes[target]} in one delta and {shape} in another")
                parts.setdefault(target, []).append((t.reshape(-1).long(), d.tensors[target + SPARSE_VAL].reshape(-1)))
    tensors: dict[str, torch.Tensor] = {}
    for target in sorted(parts):
        idx = torch.cat([i for i, _ in parts[target]])
        uniq = torch.unique(idx, sorted=True)
        dtype = parts[target][0][1].dtype
        vals = torch.zeros(uniq.numel(), dtype=dtype)
        for i, v in parts[target]:  # summed one delta at a time: a + b == b + a exactly for two deltas
            pos = torch.searchsorted(uniq, i)
            vals.index_add_(0, pos, v.to(dtype))
        tensors[target + SPARSE_IDX] = uniq
        tensors[target + SPARSE_VAL] = vals
    tensors.update(new)
    meta = {"shapes": {t: shapes[t] for t in sorted(parts)},
            "components": [{"method": d.meta.get("method"), "nnz": nnz(d), "objective": d.meta.get("objective")}
                           for d in deltas]}
    meta["nnz"] = sum(tensors[t + SPARSE_IDX].numel() for t in parts)
    return Delta(base, "sparse", tensors, meta)


# ------------------------------------------------------------------------------------------- MLM objective
# ------------------------------------------------------------------------------------------- LT-SFT
@dataclass
class SparseFit:
    """What :func:`lt_sft` hands back: θ0 of the body, the masks, and both phases' results."""

    theta0: dict[str, torch.Tensor]
    masks: dict[str, torch.Tensor]
    k: int
    phase1: Any
    phase2: Any
    extra: dict[str, Any] = field(default_factory=dict)


def lt_sft(module: nn.Module, data: Any, objective: Any, config: TrainConfig, *, body: Mapping[str, nn.Parameter],
           k: int | None = None, density: float | None = 0.01, collate_fn: Callable | None = None,
           val_data: Any = None, phase1_config: TrainConfig | None = None, out_dir: str | Path | None = None,
           resume: bool = False) -> SparseFit:
    """Run LT-SFT on ``module`` in place; afterwards the body holds θ0 + φ (φ zero outside the mask).

    Parameters
    ----------
    module : the model the engine trains (its trainable parameters: ``body`` + e.g. a new head).
    body : ``{name: parameter}`` — the maskable parameters (θ0 = their current values).
    k, density : mask size: ``k`` entries, or ``density`` × the number of body entries.
    phase1_config : training options of phase 1 (default ``config``); phase 2 uses ``config`` with
        ``weight_decay = 0``.
    """
    body = dict(body)
    n_body = sum(p.numel() for p in body.values())
    K = resolve_k(n_body, k, density)
    theta0 = {n: p.detach().clone() for n, p in body.items()}
    body_ids = {id(p) for p in body.values()}
    others = {n: p for n, p in module.named_parameters() if p.requires_grad and id(p) not in body_ids}
    others0 = {n: p.detach().clone() for n, p in others.items()}
    for p in body.values():
        p.requires_grad_(True)
    out_dir = Path(out_dir) if out_dir else None
    r1 = train(module, data, objective, phase1_config or config, val_data=val_data, collate_fn=collate_fn,
               out_dir=out_dir / "phase1" if out_dir else None, resume=resume)
    with torch.no_grad():
        masks = topk_masks({n: body[n].detach() - theta0[n] for n in body}, K)
        for n, p in body.items():
            p.copy_(theta0[n])
        for n, p in others.items():
            p.copy_(others0[n])
    handles = []
    for n, p in body.items():
        m = masks[n]
        if not bool(m.any()):
            p.requires_grad_(False)
            continue
        mf = m.to(p.dtype)
        handles.append(p.register_hook(lambda g, mf=mf: g * mf.to(g.device, g.dtype)))
    try:
        cfg2 = dataclasses.replace(config, weight_decay=0.0)
        r2 = train(module, data, objective, cfg2, val_data=val_data, collate_fn=collate_fn, out_dir=out_dir,
                   resume=resume)
    finally:
        for h in handles:
            h.remove()
    return SparseFit(theta0, masks, K, r1, r2, {"n_body": n_body})


def _body_params(module: nn.Module, prefix: str, exclude: list[str]) -> dict[str, nn.Parameter]:
    if isinstance(exclude, str):
        exclude = [exclude]
    out = {}
    for n, p in module.named_parameters():
        if p.is_floating_point() and not any(e in n for e in exclude):
            out[prefix + n] = p
    if not out:
        raise ConfigError(f"sparse: no maskable parameter left after exclude={exclude}")
    return out


# ------------------------------------------------------------------------------------------- domain SFT
def _mlm_model(hf: nn.Module) -> nn.Module:
    from transformers import AutoModelForMaskedLM

    try:
        mlm = AutoModelForMaskedLM.from_config(hf.config)
    except (ValueError, KeyError) as exc:
        raise ConfigError(f"no masked-LM head for {type(hf).__name__}: {exc}") from None
    missing, unexpected = mlm.base_model.load_state_dict(hf.state_dict(), strict=False)
    bad = [k for k in list(missing) + list(unexpected) if "pooler" not in k and "position_ids" not in k]
    if bad:
        raise ConfigError(f"masked-LM body does not match the encoder ({bad[0]!r}); domain SFT needs a BERT-style model")
    mlm.tie_weights()
    return mlm


def domain_sft(model, texts: Any, *, k: int | None = None, density: float | None = 0.01,
               config: TrainConfig | Mapping | None = None, phase1_config: TrainConfig | Mapping | None = None,
               probability: float = 0.15, exclude: list[str] | None = None, base_delta: Delta | None = None,
               out_dir: str | Path | None = None) -> Delta:
    """A domain sparse Delta: LT-SFT with the masked-LM objective on unlabeled ``texts``.

    ``model`` is a text ZooModel with a BERT-style Hugging Face encoder; a masked-LM head is built on
    a copy of it (decoder tied to the word embeddings, transform freshly initialised unless the
    checkpoint has one) and trained with the body; only the body's sparse difference is kept, named
    like the tune Deltas (``backbone.model.<param>``), so it applies to ``model.classifier(C)`` and
    composes with a task SFT. ``base_delta`` (sparse) is applied to the copy first.
    """
    hf = require_text_hf(model, "sparse (domain_mlm)")
    tok = getattr(model.preprocess, "tokenizer", None)
    if tok is None or tok.mask_token_id is None:
        raise ConfigError("domain masked-LM needs a tokenizer with a [MASK] token")
    mlm = _mlm_model(hf)
    if base_delta is not None:
        wrapped = Classifier(copy.deepcopy(model.backbone), model.feature_dim, 1)
        apply(wrapped, Delta(base_delta.base, base_delta.kind,
                             {n: t for n, t in base_delta.tensors.items() if not n.startswith(NEW)}, base_delta.meta))
        mlm.base_model.load_state_dict(wrapped.backbone.model.state_dict(), strict=False)
    cfg = config if isinstance(config, TrainConfig) else TrainConfig.from_dict({"epochs": 3, "lr": 1e-4, **(config or {})})
    cfg1 = phase1_config if isinstance(phase1_config, TrainConfig) or phase1_config is None \
        else TrainConfig.from_dict(phase1_config)
    for p in mlm.parameters():
        p.requires_grad_(True)
    body = _body_params(mlm.base_model, "", exclude or [])
    objective = MaskedLM(tok.mask_token_id, int(hf.config.vocab_size), tok.all_special_ids, probability)
    texts = [str(t) for t in (texts.X if hasattr(texts, "X") else texts)]
    collate = make_collate(model.preprocess)
    fit = lt_sft(mlm, Pairs(np.asarray(texts, dtype=object), np.zeros(len(texts), dtype=np.int64)), objective, cfg,
                 body=body, k=k, density=density, collate_fn=collate, phase1_config=cfg1, out_dir=out_dir)
    tuned = {n: p.detach() for n, p in body.items()}
    delta = sparse_delta(fit.theta0, tuned, fit.masks, base_name=model.name, prefix="backbone.model.",
                         meta={"objective": "mlm", "k": fit.k, "n_body": fit.extra["n_body"],
                               "mlm_accuracy": fit.phase2.metrics.get("train_mlm_accuracy")})
    if base_delta is not None:  # the values are relative to base + base_delta: return the composition
        delta = compose(base_delta, delta)
    return delta


# ------------------------------------------------------------------------------------------- tune() runner
def run(model, fit, val, test, *, n_classes, options, cfg, out_dir, resume, init_seed, progress=True, **_) -> Fitted:
    from ..data import load_dataset

    exclude = options.get("exclude") or []
    domain: Delta | None = None
    if options.get("domain_delta"):
        domain = Delta.load(options["domain_delta"])
        if domain.kind != "sparse":
            raise ConfigError(f"domain_delta must be a sparse delta, got kind {domain.kind!r}")
    if options.get("domain_mlm"):
        texts = load_dataset(options["domain_data"]).X if options.get("domain_data") else fit.X
        dcfg = {**{k: v for k, v in cfg.to_dict().items() if k not in ("weight_decay",)}}
        if options.get("domain_epochs"):
            dcfg["epochs"] = int(options["domain_epochs"])
        new_domain = domain_sft(model, texts, k=None,
                                density=options.get("domain_density") or options.get("density"),
                                config=dcfg, probability=float(options.get("mlm_probability", 0.15)),
                                exclude=exclude, base_delta=domain,
                                out_dir=Path(out_dir) / "domain" if out_dir else None)
        domain = new_domain
    clf = Classifier(copy.deepcopy(model.backbone), model.feature_dim, n_classes, init_seed)
    if domain is not None:
        apply(clf, Delta(domain.base, "sparse", {n: t for n, t in domain.tensors.items() if not n.startswith(NEW)},
                         domain.meta))
    for p in clf.parameters():
        p.requires_grad_(True)
    body = _body_params(clf.backbone, "backbone.", exclude)
    cfg1 = cfg
    if options.get("full_epochs") or options.get("full_lr"):
        cfg1 = dataclasses.replace(cfg, **({"epochs": int(options["full_epochs"])} if options.get("full_epochs") else {}),
                                   **({"lr": float(options["full_lr"])} if options.get("full_lr") else {}))
    collate = make_collate(model.preprocess)
    sf = lt_sft(clf, Pairs(fit.X, fit.y), CrossEntropy(), cfg, body=body, k=options.get("k"),
                density=options.get("density"), collate_fn=collate,
                val_data=Pairs(val.X, val.y) if val is not None else None, phase1_config=cfg1,
                out_dir=out_dir, resume=resume)
    clf.eval()
    from ..engine import evaluate

    test_metrics = evaluate(clf, Pairs(test.X, test.y), collate_fn=collate) if test is not None else {}
    tuned = {n: p.detach() for n, p in body.items()}
    head = {"head." + n: v for n, v in clf.head.state_dict().items()}
    task = sparse_delta(sf.theta0, tuned, sf.masks, base_name=model.name, new=head,
                        meta={"objective": "cross_entropy", "k": sf.k, "n_body": sf.extra["n_body"]})
    delta = compose(domain, task) if domain is not None else task
    delta.meta.update({"k": sf.k, "n_body": sf.extra["n_body"], "task_nnz": nnz(task),
                       "domain_nnz": nnz(domain) if domain is not None else 0})
    n_head = sum(p.numel() for p in clf.head.parameters())
    p1 = {f"phase1_{k}": v for k, v in sf.phase1.metrics.items() if k.startswith("val_")}
    return Fitted(delta, sf.phase2.metrics, sf.phase2.history, test_metrics, nnz(task) + n_head, clf,
                  {"added_params": n_head, "head_params": n_head, "k": sf.k, "nnz": nnz(delta), **p1})


# ------------------------------------------------------------------------------------------- registry
@dataclass
class SparseOptions:
    """LT-SFT's K (``k`` or ``density``), phase 1, and the optional masked-LM domain SFT first."""

    density: float | None = option(0.01, low=0.0, high=1.0, low_open=True,
                                   help="K as a fraction of the maskable body entries (when k is null)")
    k: int | None = option(None, low=1, help="K, the body entries that may change (overrides density)")
    full_epochs: int | None = option(None, low=1, help="phase-1 (full fine-tuning) epochs (null: epochs)")
    full_lr: float | None = option(None, low=0.0, low_open=True, help="phase-1 lr (null: lr)")
    exclude: list[str] | str = option([], help="body parameters (name substrings) that never change")
    domain_mlm: bool = option(False, help="first a masked-LM domain SFT, composed with the task SFT")
    domain_data: str | None = option(None, help="its unlabeled text (a dataset; null: the training texts)")
    domain_delta: str | None = option(None, help="a sparse domain Delta to start from (folder)")
    domain_density: float | None = option(None, low=0.0, high=1.0, low_open=True,
                                          help="the domain SFT's density (null: density)")
    domain_epochs: int | None = option(None, low=1, help="the domain SFT's epochs (null: epochs)")
    mlm_probability: float = option(0.15, low=0.0, high=1.0, low_open=True, high_open=True,
                                    help="fraction of tokens masked by the domain SFT")


registry.register(
    STAGE, "sparse", fn=run, options=SparseOptions, family="native", modality=["image", "text"],
    train={**PEFT_TRAIN, "lr": 5e-4},
    summary="LT-SFT sparse fine-tuning: full FT, mask = top-K |Δθ|, reset, masked FT; sparse Delta, composable "
            "by addition (optional masked-LM domain SFT first).",
    paper="Ansell et al. Composable Sparse Fine-Tuning for Cross-Lingual Transfer, ACL 2022 (arXiv:2110.07560)")
