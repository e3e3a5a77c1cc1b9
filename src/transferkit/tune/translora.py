"""Trans-LoRA: move a LoRA from one base model to another without the original training data.

Seed paper: Wang et al., "Trans-LoRA: towards data-free Transferable Parameter Efficient Finetuning",
NeurIPS 2024 (arXiv:2405.17258). Given a source base S with a trained LoRA (the *teacher*), a target
base T and only a handful of labelled *seed* examples of the task:

1. **Synthesise** task inputs from the seeds. The paper prompts an LLM with the seeds; no generative
   language model is available offline here, so transferkit *augments* the seed texts instead
   (:func:`augment`): word dropout, word swaps, recombination (the head of one seed + the tail of
   another), insertion of seed-vocabulary words and span crops, 1 to ``max_ops`` operations per
   sample. This is the main departure from the paper: the synthetic inputs stay close to the seeds
   (less diversity than an LLM gives), and the discriminator has to learn augmentation artefacts.
2. **Filter** with a discriminator (:class:`Discriminator`): a small LoRA (or a linear probe on
   frozen features) trained to tell the real seed inputs from a first round of synthetic ones
   (class-balanced cross-entropy). A fresh candidate pool (``pool_factor × n_synthetic``) is then
   scored and the ``n_synthetic`` candidates the discriminator finds most real-like are kept
   (:func:`select`; by default the top third of the pool). The paper keeps what the discriminator
   classifies as real (``threshold=0.5`` here); with a fixed augmenter instead of an LLM that can be
   re-prompted, a calibrated discriminator rejects almost every candidate (on the tiny test models
   1 of 180 passed 0.5), so transferkit ranks by default and offers the threshold (with a
   ``min_keep`` floor) as an option. ``filter=False`` is the paper's ablation: ``n_synthetic``
   candidates drawn at random from the same pool — same count, so the comparison isolates the filter.
3. **Label** the kept inputs and the seeds with the teacher (source base + source LoRA) logits.
4. **Distil** into a fresh LoRA on the target base (:class:`KDObjective`: Hinton KD
   ``T²·KL(softmax(z_t/T) ‖ softmax(z_s/T))`` plus ``hard_weight`` × cross-entropy on the seeds' true
   labels), trained with transferkit's engine; saved in PEFT's format (``out_dir/peft``, loadable with
   ``PeftModel.from_pretrained(peft_base(target, C, "lora"), path)`` or
   :func:`transferkit.tune.load_peft`) and as a ``lora`` Delta.

Where the discriminator lives: the paper trains it with the source LoRA; here it is trained at
transfer time on the seeds, on the source base when one is given (``disc_base="source"``) else on
the target base.

Data use: only ``n_seed`` labelled examples per class of the training data are read (nothing else,
no validation split); the test data only measures.

>>> res = trans_lora(teacher, teacher_prep, target, seeds, n_classes=2, test=test)    # doctest: +SKIP
>>> res.metrics["test_accuracy"], res.metrics["kept_fraction"]                       # doctest: +SKIP

CLI (target base = ``--model``; the source LoRA is a ``--method lora`` run folder)::

    transferkit tune --data vader:movies --model paraphrase-minilm-l3-v2 --method translora \\
        --config cfg.yaml      # source_model: all-minilm-l6-v2, source_lora: runs/lora-l6
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError
from ..engine.objectives import KDObjective, kd_loss
from ._common import Fitted, Pairs, count_trainable, make_collate
from .peft_methods import LoraCore
from .registry import PEFT_TRAIN, STAGE
from .. import registry
from ..registry import option

__all__ = [
    "AUGMENT_OPS",
    "Discriminator",
    "KDObjective",
    "TransLoRAResult",
    "augment",
    "kd_loss",
    "load_teacher",
    "predict_logits",
    "run",
    "select",
    "trans_lora",
]

AUGMENT_OPS = ("dropout", "swap", "recombine", "insert", "crop")


# ------------------------------------------------------------------------------------- synthesis
def _op(words: list[str], op: str, rng: np.random.Generator, others: list[list[str]], vocab: list[str],
        p_drop: float) -> list[str]:
    n = len(words)
    if op == "dropout" and n > 1:
        keep = [w for w in words if rng.random() >= p_drop]
        return keep or [words[int(rng.integers(n))]]
    if op == "swap" and n > 1:
        words = list(words)
        for _ in range(max(1, n // 8)):
            i, j = rng.choice(n, 2, replace=False)
            words[i], words[j] = words[j], words[i]
        return words
    if op == "recombine" and others:
        other = others[int(rng.integers(len(others)))]
        i = int(rng.integers(1, n + 1)) if n > 1 else n
        j = int(rng.integers(0, len(other)))
        return words[:i] + other[j:]
    if op == "insert" and vocab:
        words = list(words)
        words.insert(int(rng.integers(n + 1)), vocab[int(rng.integers(len(vocab)))])
        return words
    if op == "crop" and n > 3:
        length = int(rng.integers(max(2, math.ceil(n / 2)), n + 1))
        start = int(rng.integers(0, n - length + 1))
        return words[start:start + length]
    return list(words)


def augment(texts: Sequence[str], n: int, *, ops: Sequence[str] = AUGMENT_OPS, max_ops: int = 2,
            p_drop: float = 0.15, seed: int = 0, exclude: Sequence[str] = ()) -> list[str]:
    """``n`` synthetic texts made from the seed ``texts`` by random word-level edits.

    Each sample starts from a random seed and applies 1 to ``max_ops`` operations drawn from ``ops``
    (:data:`AUGMENT_OPS`: ``dropout`` of each word with probability ``p_drop``, ``swap`` of word pairs,
    ``recombine`` a prefix with the suffix of another seed, ``insert`` a seed-vocabulary word,
    ``crop`` a contiguous span of at least half the words). Samples equal to a seed, to an entry of
    ``exclude`` or to an earlier sample are redrawn (up to 20 tries each), so the result may be
    shorter than ``n`` for tiny seed sets. Deterministic in ``seed``.
    """
    bad = sorted(set(ops) - set(AUGMENT_OPS))
    if bad or not ops:
        raise ConfigError(f"unknown augmentation op {bad[0] if bad else None!r}; known: {', '.join(AUGMENT_OPS)}")
    if not texts:
        raise ConfigError("augment needs at least one seed text")
    if int(max_ops) < 1:
        raise ConfigError(f"max_ops must be >= 1, got {max_ops}")
    rng = np.random.default_rng(seed)
    split = [str(t).split() or [str(t)] for t in texts]
    vocab = sorted({w for ws in split for w in ws})
    seen = {" ".join(ws) for ws in split} | set(exclude)
    out: list[str] = []
    for _ in range(int(n)):
        for _try in range(20):
            k = int(rng.integers(len(split)))
            words = split[k]
            others = [ws for i, ws in enumerate(split) if i != k]
            for op in rng.choice(list(ops), int(rng.integers(1, int(max_ops) + 1))):
                words = _op(words, str(op), rng, others, vocab, p_drop)
            text = " ".join(words)
            if text not in seen:
                seen.add(text)
                out.append(text)
                break
    return out


# ------------------------------------------------------------------------------------- helpers
class _Rows(torch.utils.data.Dataset):
    def __init__(self, rows: list[tuple]):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple:
        return self.rows[i]


@torch.no_grad()
def predict_logits(module: nn.Module, preprocess: Callable[[Any], Any], texts: Sequence[str],
                   batch_size: int = 64) -> torch.Tensor:
    """Logits (N, C) of ``module`` on raw ``texts`` (eval mode, CPU result)."""
    from ..engine import forward

    was = module.training
    module.eval()
    device = next(module.parameters()).device
    out = []
    try:
        for i in range(0, len(texts), batch_size):
            inputs = preprocess(list(texts[i:i + batch_size]))
            inputs = {k: v.to(device) for k, v in inputs.items()} if isinstance(inputs, dict) else inputs.to(device)
            out.append(forward(module, inputs).float().cpu())
    finally:
        module.train(was)
    return torch.cat(out) if out else torch.zeros(0, 0)


def _lora_options(options: dict[str, Any]) -> dict[str, Any]:
    r = options.get("r", 8)
    if not isinstance(r, (int, np.integer)) or int(r) < 1:
        raise ConfigError(f"translora option r must be an integer >= 1, got {r!r}")
    return {"r": int(r), "alpha": float(options.get("alpha", 16)), "dropout": float(options.get("dropout", 0.05)),
            "target_modules": options.get("target_modules"), "use_rslora": False, "use_dora": False, "bias": "none"}


# ------------------------------------------------------------------------------------- discriminator
class Discriminator:
    """Real (seed) vs synthetic text classifier on a ZooModel; :meth:`p_real` scores new texts.

    Parameters
    ----------
    model : text ZooModel the discriminator is built on.
    kind : ``"lora"`` (a PEFT LoRA of rank ``r`` + 2-class head, trained with the engine) or
        ``"probe"`` (a linear head on frozen mean-pooled features).
    epochs, lr, batch_size, seed : training options (class-balanced cross-entropy).
    """

    def __init__(self, model, kind: str = "lora", *, r: int = 4, epochs: int = 5, lr: float | None = None,
                 batch_size: int = 16, seed: int = 0):
        if kind not in ("lora", "probe"):
            raise ConfigError(f"translora option discriminator must be 'lora' or 'probe', got {kind!r}")
        self.model, self.kind, self.r, self.epochs = model, kind, int(r), int(epochs)
        self.lr = float(lr) if lr is not None else (5e-3 if kind == "lora" else 1e-2)
        self.batch_size, self.seed = int(batch_size), int(seed)
        self.module: nn.Module | None = None
        self.train_accuracy: float | None = None

    def fit(self, real: Sequence[str], fake: Sequence[str]) -> Discriminator:
        from ..engine import CrossEntropy, TrainConfig, evaluate, train

        if not real or not fake:
            raise ConfigError("the discriminator needs real and synthetic texts")
        texts = list(real) + list(fake)
        y = np.array([1] * len(real) + [0] * len(fake))
        n = len(y)
        weight = [n / (2.0 * len(fake)), n / (2.0 * len(real))]  # class 0 = synthetic, 1 = real
        cfg = TrainConfig(epochs=self.epochs, lr=self.lr, batch_size=self.batch_size, seed=self.seed,
                          progress=False, scheduler="linear", warmup_ratio=0.1, weight_decay=0.0)
        if self.kind == "lora":
            from .peft_methods import wrap

            with torch.random.fork_rng(devices=[]):  # LoRA init independent of the caller's RNG state
                torch.manual_seed(self.seed)
                module, _ = wrap(self.model, 2, "lora", _lora_options({"r": self.r, "alpha": 2 * self.r,
                                                                       "dropout": 0.0}), seed=self.seed)
            collate = make_collate(self.model.preprocess)
            data = Pairs(np.array(texts, dtype=object), y)
        else:
            feats = self._features(texts)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed)
                module = nn.Linear(feats.shape[1], 2)
            collate = lambda items: {"inputs": torch.stack([x for x, _ in items]),
                                     "labels": torch.tensor([t for _, t in items], dtype=torch.long)}
            data = Pairs(feats, y)
        train(module, data, CrossEntropy(class_weight=weight), cfg, collate_fn=collate)
        module.eval()
        self.module = module
        self.train_accuracy = float(evaluate(module, data, collate_fn=collate)["accuracy"])
        return self

    @torch.no_grad()
    def _features(self, texts: Sequence[str]) -> torch.Tensor:
        out = [self.model.features(self.model.preprocess(list(texts[i:i + 64]))) for i in range(0, len(texts), 64)]
        return torch.cat(out).float()

    @torch.no_grad()
    def p_real(self, texts: Sequence[str]) -> np.ndarray:
        """Probability that each text is a real task input (N,)."""
        if self.module is None:
            raise ConfigError("fit the discriminator before scoring")
        if not len(texts):
            return np.zeros(0)
        if self.kind == "lora":
            logits = predict_logits(self.module, self.model.preprocess, texts)
        else:
            logits = self.module(self._features(texts))
        return torch.softmax(logits.float(), -1)[:, 1].numpy()


def select(p_real: np.ndarray, *, n_keep: int, threshold: float | None = None, min_keep: int = 0) -> np.ndarray:
    """Indices of the kept candidates, most real-like first, at most ``n_keep``.

    ``threshold=None`` (default): the ``n_keep`` highest ``p_real``. With a threshold: those with
    ``p_real ≥ threshold``, at least ``min(min_keep, n_keep)`` (topped up with the next most real-like).
    """
    p = np.asarray(p_real, dtype=float)
    order = np.argsort(-p, kind="stable")
    if threshold is None:
        return order[: int(n_keep)]
    passed = order[p[order] >= float(threshold)][: int(n_keep)]
    floor = min(int(min_keep), int(n_keep), len(p))
    return passed if len(passed) >= floor else order[:floor]


# ------------------------------------------------------------------------------------- distillation
# ------------------------------------------------------------------------------------- pipeline
def load_teacher(source, lora: Any, n_classes: int | None = None) -> tuple[nn.Module, Callable[[Any], Any]]:
    """``(module, preprocess)`` of the source model + its LoRA.

    ``lora`` is a transferkit PEFT folder (``out_dir/peft`` of ``--method lora``), a run folder
    holding one, or an ``nn.Module`` (used as is).
    """
    if isinstance(lora, nn.Module):
        return lora.eval(), source.preprocess
    path = Path(lora)
    if (path / "peft" / "adapter_config.json").is_file():
        path = path / "peft"
    if not (path / "adapter_config.json").is_file():
        raise ConfigError(f"source_lora {str(lora)!r}: no PEFT adapter there (expected the run folder of "
                          "`transferkit tune --method lora` or its peft/ folder)")
    from .peft_methods import load_peft

    module = load_peft(source, path, n_classes)
    for p in module.parameters():
        p.requires_grad_(False)
    return module, source.preprocess


@dataclass
class TransLoRAResult:
    module: nn.Module  # the target PeftModel (target base + distilled LoRA + head), eval mode
    delta: Any  # lora Delta relative to the target base
    metrics: dict[str, Any]
    history: list[dict] = field(default_factory=list)
    synthetic: list[str] = field(default_factory=list)  # the kept synthetic inputs
    scores: np.ndarray | None = None  # p_real of the candidate pool (None without the filter)
    train_metrics: dict[str, Any] = field(default_factory=dict)
    test_metrics: dict[str, Any] = field(default_factory=dict)


def trans_lora(teacher: nn.Module, teacher_preprocess: Callable[[Any], Any], target, seeds, *, n_classes: int,
               test=None, source=None, n_synthetic: int = 200, pool_factor: float = 3.0, filter: bool = True,
               threshold: float | None = None, min_keep: int | None = None, discriminator: str = "lora",
               disc_base: str = "source", disc_epochs: int = 5, disc_fake: int | None = None,
               augment_ops: Sequence[str] = AUGMENT_OPS, max_ops: int = 2, temperature: float = 2.0,
               hard_weight: float = 0.5, lora: dict[str, Any] | None = None, config: Any = None,
               init_seed: int | None = None, out_dir: Any = None, resume: bool = False) -> TransLoRAResult:
    """Transfer ``teacher`` (source base + LoRA) to a fresh LoRA on ``target`` (see the module docstring).

    Parameters
    ----------
    teacher, teacher_preprocess : the source model + LoRA (logits) and its preprocessing
        (:func:`load_teacher`).
    target : the target text ZooModel.
    seeds : a Dataset of the labelled seed examples (the only task data used).
    n_classes : C of the task (the teacher's output size).
    test : optional Dataset, only for the reported metrics (teacher and student accuracy).
    source : the source ZooModel (discriminator base when ``disc_base="source"``).
    n_synthetic : synthetic inputs to keep; ``pool_factor`` × as many candidates are generated.
    filter : score candidates with the discriminator (False: random ``n_synthetic`` of the pool).
    threshold, min_keep : :func:`select` (default: rank, keep the ``n_synthetic`` most real-like;
        with a threshold, ``min_keep`` defaults to ``n_synthetic // 4``).
    discriminator, disc_base, disc_epochs, disc_fake : :class:`Discriminator` kind, base
        (``"source"``/``"target"``), epochs, number of round-1 synthetic texts (default 8 × seeds, ≥ 64).
    augment_ops, max_ops : :func:`augment`.
    temperature, hard_weight : :class:`KDObjective`.
    lora : target LoRA options (``r``, ``alpha``, ``dropout``, ``target_modules``).
    config : :class:`~transferkit.engine.TrainConfig` (or mapping) of the distillation.
    init_seed : seed of the student's new head and LoRA initialisation (default ``config.seed``);
        ``tune(method="translora")`` passes :func:`transferkit.zoo.head_seed` (seed, class names), the
        start every other method's head gets for that label set.
    """
    from ..engine import TrainConfig, evaluate, train
    from .peft_methods import delta_of, wrap

    cfg = config if isinstance(config, TrainConfig) else TrainConfig.from_dict(config)
    if int(n_synthetic) < 0:
        raise ConfigError(f"translora option n_synthetic must be >= 0, got {n_synthetic}")
    if not float(pool_factor) >= 1:
        raise ConfigError(f"translora option pool_factor must be >= 1, got {pool_factor}")
    if disc_base not in ("source", "target"):
        raise ConfigError(f"translora option disc_base must be 'source' or 'target', got {disc_base!r}")
    seed_texts = [str(t) for t in seeds.X]
    seed_y = np.asarray(seeds.y, dtype=int)
    if not seed_texts:
        raise ConfigError("translora needs at least one seed example")
    n_syn = int(n_synthetic)
    pool = augment(seed_texts, math.ceil(n_syn * float(pool_factor)), ops=augment_ops, max_ops=max_ops,
                   seed=cfg.seed + 1)
    metrics: dict[str, Any] = {"n_seed": len(seed_texts), "n_pool": len(pool), "filter": bool(filter)}
    scores = None
    if filter and n_syn > 0 and pool:
        n_fake = int(disc_fake) if disc_fake else max(64, 8 * len(seed_texts))
        fake = augment(seed_texts, n_fake, ops=augment_ops, max_ops=max_ops, seed=cfg.seed + 2, exclude=pool)
        base = source if (disc_base == "source" and source is not None) else target
        disc = Discriminator(base, discriminator, epochs=disc_epochs, seed=cfg.seed).fit(seed_texts, fake)
        scores = disc.p_real(pool)
        keep = select(scores, n_keep=n_syn, threshold=threshold,
                      min_keep=n_syn // 4 if min_keep is None else int(min_keep))
        kept_mask = np.zeros(len(pool), bool)
        kept_mask[keep] = True
        metrics.update({"disc_train_accuracy": round(disc.train_accuracy, 4),
                        "disc_seed_p_real": round(float(disc.p_real(seed_texts).mean()), 4),
                        "pool_p_real": round(float(scores.mean()), 4),
                        "kept_p_real": round(float(scores[kept_mask].mean()), 4) if kept_mask.any() else None,
                        "passed_0.5": int((scores >= 0.5).sum())})
    else:
        keep = np.random.default_rng(cfg.seed + 3).permutation(len(pool))[:n_syn]
    synthetic = [pool[i] for i in keep]
    metrics.update({"n_kept": len(synthetic), "kept_fraction": round(len(synthetic) / max(len(pool), 1), 4)})

    texts = seed_texts + synthetic
    t_logits = predict_logits(teacher, teacher_preprocess, texts)
    if t_logits.shape[1] != int(n_classes):
        raise ConfigError(f"the teacher has {t_logits.shape[1]} outputs but the task has {n_classes} classes")
    labels = list(seed_y) + [-1] * len(synthetic)
    rows = [(t, int(y), t_logits[i]) for i, (t, y) in enumerate(zip(texts, labels))]
    metrics["teacher_seed_accuracy"] = round(float((t_logits[:len(seed_y)].argmax(-1).numpy() == seed_y).mean()), 4)

    def collate(items):
        return {"inputs": target.preprocess([it[0] for it in items]),
                "labels": torch.tensor([it[1] for it in items], dtype=torch.long),
                "teacher_logits": torch.stack([it[2] for it in items])}

    start = cfg.seed if init_seed is None else int(init_seed)
    with torch.random.fork_rng(devices=[]):  # LoRA init independent of the caller's RNG state
        torch.manual_seed(start)
        pm, base_state = wrap(target, int(n_classes), "lora", _lora_options(lora or {}), seed=start)
    trainable = count_trainable(pm)
    result = train(pm, _Rows(rows), KDObjective(temperature, hard_weight), cfg, collate_fn=collate,
                   out_dir=out_dir, resume=resume)
    pm.eval()
    test_metrics: dict[str, Any] = {}
    if test is not None:
        test_collate = make_collate(target.preprocess)
        test_metrics = evaluate(pm, Pairs(test.X, test.y), collate_fn=test_collate)
        metrics["test_accuracy"] = test_metrics.get("accuracy")
        t_test = predict_logits(teacher, teacher_preprocess, [str(x) for x in test.X]).argmax(-1).numpy()
        s_test = predict_logits(pm, target.preprocess, [str(x) for x in test.X]).argmax(-1).numpy()
        metrics["teacher_test_accuracy"] = round(float((t_test == np.asarray(test.y)).mean()), 4)
        metrics["test_agreement"] = round(float((t_test == s_test).mean()), 4)
    metrics["trainable_params"] = trainable
    delta = delta_of(pm, base_state, "lora", target.name)
    delta.meta["translora"] = {k: v for k, v in metrics.items() if isinstance(v, (int, float, bool, str))}
    return TransLoRAResult(pm, delta, metrics, result.history, synthetic, scores, result.metrics, test_metrics)


def run(model, fit, val, test, *, n_classes, method, options, cfg, out_dir, resume, init_seed, **_) -> Fitted:
    """``tune(method="translora")``: ``model`` is the target base; the source comes from the options."""
    from ..data.dataset import subsample
    from ..zoo import load_model
    from .peft_methods import save

    if not options.get("source_model") or not options.get("source_lora"):
        raise ConfigError("translora needs options source_model (the source base, a zoo name or path) and "
                          "source_lora (a `transferkit tune --method lora` run folder on that base)")
    source = options["source_model"]
    if isinstance(source, (str, Path)):
        max_len = getattr(model.preprocess, "max_length", None)
        source = load_model(str(source), **({"max_length": max_len} if max_len else {}))
    teacher, prep = load_teacher(source, options["source_lora"], n_classes)
    n_seed = int(options["n_seed"])
    if n_seed < 1:
        raise ConfigError(f"translora option n_seed must be >= 1, got {n_seed}")
    seeds = subsample(fit, per_class=n_seed, seed=cfg.seed)
    ops = options.get("augment_ops") or AUGMENT_OPS
    res = trans_lora(teacher, prep, model, seeds, n_classes=n_classes, test=test, source=source,
                     n_synthetic=int(options["n_synthetic"]), pool_factor=float(options["pool_factor"]),
                     filter=bool(options["filter"]),
                     threshold=None if options.get("threshold") is None else float(options["threshold"]),
                     min_keep=options.get("min_keep"), discriminator=options["discriminator"],
                     disc_base=options["disc_base"], disc_epochs=int(options["disc_epochs"]),
                     augment_ops=[ops] if isinstance(ops, str) else list(ops), max_ops=int(options["max_ops"]),
                     temperature=float(options["temperature"]), hard_weight=float(options["hard_weight"]),
                     lora=options, config=cfg, init_seed=init_seed, out_dir=out_dir, resume=resume)
    if out_dir is not None:
        save(res.module, Path(out_dir) / "peft", model=model, n_classes=n_classes, method="lora")
    head = sum(p.numel() for n, p in res.module.named_parameters() if p.requires_grad and "modules_to_save" in n)
    extra = {k: v for k, v in res.metrics.items() if k not in ("test_accuracy", "trainable_params")}
    extra.update({"added_params": res.metrics["trainable_params"], "head_params": head,
                  "source_model": getattr(source, "name", str(source))})
    return Fitted(res.delta, res.train_metrics, res.history, res.test_metrics, res.metrics["trainable_params"],
                  res.module, extra)


# ------------------------------------------------------------------------------------- registry
@dataclass
class TransLoRAOptions(LoraCore):
    """The source (teacher), the synthetic data and its filter, the distillation; r … target_modules: the
    student LoRA on ``--model``."""

    source_model: str | None = option(None, help="the source base (a zoo name or path); required")
    source_lora: str | None = option(None, help="a `transferkit tune --method lora` run folder on that base; required")
    n_seed: int = option(5, low=1, help="labelled seed examples per class (the only task data used)")
    n_synthetic: int = option(200, low=0, help="synthetic inputs kept for the distillation")
    pool_factor: float = option(3.0, low=1.0, help="candidates generated = pool_factor × n_synthetic")
    filter: bool = option(True, help="keep the candidates the discriminator finds most real-like")
    threshold: float | None = option(None, low=0.0, high=1.0, help="keep those with p_real ≥ threshold "
                                     "(null: the n_synthetic most real-like)")
    min_keep: int | None = option(None, low=0, help="with a threshold, keep at least this many "
                                  "(null: n_synthetic // 4)")
    discriminator: str = option("lora", choices=("lora", "probe"), help="real-vs-synthetic classifier")
    disc_base: str = option("source", choices=("source", "target"), help="the model it is built on")
    disc_epochs: int = option(5, low=1, help="its training epochs")
    augment_ops: list[str] | str | None = option(None, choices=AUGMENT_OPS, help="word-level edits that make "
                                                 "candidates (null: all)")
    max_ops: int = option(2, low=1, help="at most this many edits per candidate")
    temperature: float = option(2.0, low=0.0, low_open=True, help="distillation temperature T")
    hard_weight: float = option(0.5, low=0.0, help="weight of the seed labels' cross-entropy")


registry.register(
    STAGE, "translora", fn=run, options=TransLoRAOptions, family="native", modality=["text"],
    train={**PEFT_TRAIN, "lr": 1e-3},
    summary="Trans-LoRA: distil a source base + LoRA (options source_model, source_lora) into a new LoRA on "
            "--model from n_seed examples/class + augmented inputs filtered by a discriminator.",
    paper="Wang et al. Trans-LoRA: towards data-free Transferable Parameter Efficient Finetuning, NeurIPS 2024 "
          "(arXiv:2405.17258)")
