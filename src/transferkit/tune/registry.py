"""The tune method registry: one entry per method with its paper, method options and training defaults.

``METHODS[name]`` is a dict (JSON-able, printed by ``transferkit tune --list --json``)::

    {"summary": ..., "paper": ..., "family": "baseline" | "peft" | "native",
     "modality": ["image", "text"], "options": {method option: default}, "train": {TrainConfig defaults}}

``str(METHODS[name])`` is its one-line summary (what ``transferkit tune --list`` prints).

A ``config`` passed to :func:`transferkit.tune.tune` mixes both kinds of keys: keys listed in the
method's ``options`` configure the method (rank, bottleneck, ...), every other key is a
:class:`~transferkit.engine.TrainConfig` option (epochs, lr, ...). :func:`split_config` does the split.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ..errors import ConfigError


class MethodInfo(dict):
    """A registry entry: a plain dict whose ``str()`` is the one-line summary and paper."""

    def __str__(self) -> str:
        paper = f" [{self['paper']}]" if self.get("paper") else ""
        return f"{self['summary']}{paper}"

    __format__ = lambda self, spec: format(str(self), spec)  # noqa: E731  (f"{info:8s}")


def _m(summary: str, paper: str, family: str, modality: tuple[str, ...], options: dict, train: dict) -> MethodInfo:
    return MethodInfo(summary=summary, paper=paper, family=family, modality=list(modality),
                      options=dict(options), train=dict(train))


_TEXT, _ANY = ("text",), ("image", "text")
_PEFT_TRAIN = {"epochs": 3, "batch_size": 16, "weight_decay": 0.01, "scheduler": "linear", "warmup_ratio": 0.1}
_ADAPTER = {"bottleneck": 64, "dropout": 0.0, "init": "zero"}

METHODS: dict[str, MethodInfo] = {
    "linear": _m("Linear probe: frozen backbone, new linear head trained on cached features.",
                 "Kornblith, Shlens, Le. Do Better ImageNet Models Transfer Better? CVPR 2019", "baseline", _ANY,
                 {}, {"epochs": 30, "lr": 1e-2, "batch_size": 64, "weight_decay": 1e-4, "scheduler": "cosine"}),
    "full": _m("Full fine-tuning: every backbone parameter and a new linear head.",
               "Howard & Ruder. Universal Language Model Fine-tuning (ULMFiT), ACL 2018", "baseline", _ANY,
               {}, {"epochs": 3, "lr": 5e-5, "batch_size": 16, "weight_decay": 0.01, "scheduler": "linear",
                    "warmup_ratio": 0.1}),
    "lora": _m("LoRA via HF PEFT: low-rank updates s·BA on target Linear/Conv2d layers (+ new head).",
               "Hu et al. LoRA: Low-Rank Adaptation of Large Language Models, ICLR 2022 (arXiv:2106.09685)",
               "peft", _ANY,
               {"r": 8, "alpha": 16, "dropout": 0.05, "target_modules": None, "use_rslora": False,
                "use_dora": False, "bias": "none"},
               {**_PEFT_TRAIN, "lr": 2e-3}),
    "ia3": _m("IA3 via HF PEFT: learned vectors rescale keys, values and the FFN activation (+ new head).",
              "Liu et al. Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context "
              "Learning, NeurIPS 2022 (arXiv:2205.05638)", "peft", _ANY,
              {"target_modules": None, "feedforward_modules": None},
              {**_PEFT_TRAIN, "lr": 3e-3}),
    "prefix": _m("Prefix tuning via HF PEFT: learned key/value prefixes in every attention layer (+ new head).",
                 "Li & Liang. Prefix-Tuning: Optimizing Continuous Prompts for Generation, ACL 2021 "
                 "(arXiv:2101.00190)", "peft", _TEXT,
                 {"num_virtual_tokens": 20, "prefix_projection": False, "encoder_hidden_size": None},
                 {**_PEFT_TRAIN, "lr": 1e-2}),
    "prompt": _m("Prompt tuning via HF PEFT: learned input embeddings prepended to the text (+ new head).",
                 "Lester, Al-Rfou, Constant. The Power of Scale for Parameter-Efficient Prompt Tuning, "
                 "EMNLP 2021 (arXiv:2104.08691)", "peft", _TEXT,
                 {"num_virtual_tokens": 20, "init": "random"},
                 {**_PEFT_TRAIN, "lr": 3e-2}),
    "bitfit": _m("BitFit: only the bias terms of the backbone (+ new head) are trained.",
                 "Ben Zaken, Ravfogel, Goldberg. BitFit: Simple Parameter-efficient Fine-tuning for "
                 "Transformer-based Masked Language-models, ACL 2022 (arXiv:2106.10199)", "native", _ANY,
                 {"bias_terms": "all"},
                 {**_PEFT_TRAIN, "lr": 5e-3, "weight_decay": 0.0}),
    "adapter": _m("Sequential bottleneck adapter h ← h + f(h W_down) W_up after the FFN (Pfeiffer) or both "
                  "sublayers (Houlsby, position='both').",
                  "Houlsby et al. Parameter-Efficient Transfer Learning for NLP, ICML 2019 (arXiv:1902.00751); "
                  "Pfeiffer et al. AdapterFusion, EACL 2021 (arXiv:2005.00247)", "native", _TEXT,
                  {**_ADAPTER, "position": "ffn"},
                  {**_PEFT_TRAIN, "lr": 1e-3}),
    "parallel-adapter": _m("Parallel adapter h ← h + s·f(x W_down) W_up next to the FFN (or attention) sublayer.",
                           "He et al. Towards a Unified View of Parameter-Efficient Transfer Learning, "
                           "ICLR 2022 (arXiv:2110.04366)", "native", _TEXT,
                           {**_ADAPTER, "position": "ffn", "scale": 1.0, "learnable_scale": False},
                           {**_PEFT_TRAIN, "lr": 1e-3}),
    "scaled-parallel-adapter": _m("Scaled parallel adapter (s = 4) on the FFN, the unified view's best single "
                                  "modification.",
                                  "He et al. Towards a Unified View of Parameter-Efficient Transfer Learning, "
                                  "ICLR 2022 (arXiv:2110.04366)", "native", _TEXT,
                                  {**_ADAPTER, "position": "ffn", "scale": 4.0, "learnable_scale": False},
                                  {**_PEFT_TRAIN, "lr": 1e-3}),
    "mam": _m("MAM adapter: prefix tuning on attention (l = 30) + scaled parallel adapter (s = 4) on the FFN.",
              "He et al. Towards a Unified View of Parameter-Efficient Transfer Learning, ICLR 2022 "
              "(arXiv:2110.04366)", "native", _TEXT,
              {"prefix_length": 30, "prefix_hidden": 512, "bottleneck": 512, "scale": 4.0,
               "learnable_scale": False, "dropout": 0.0, "init": "zero"},
              # lr 1e-4: at 5e-4 the 512-wide, s = 4 FFN adapter keeps MiniLM at chance (measured on
              # vader:movies, 200/class, 4 epochs: 5e-4 → 0.50, 1e-4 → 0.74, 5e-5 → 0.72)
              {**_PEFT_TRAIN, "lr": 1e-4}),
}

# side networks (tune/side.py) and sparse fine-tuning (tune/sparse.py)
_SIDE = {"r": 96, "layers": "all", "taps": None, "grid": 4, "cache": False}
_SIDE_TRAIN = {**_PEFT_TRAIN, "lr": 2e-3}
METHODS.update({
    "unipt": _m("UniPT side network: frozen backbone under no_grad; parallel interaction + confidence "
                "aggregation of all layers' features (+ new head).",
                "Diao et al. UniPT: Universal Parallel Tuning for Transfer Learning with Efficient Parameter "
                "and Memory, CVPR 2024 (arXiv:2308.14316)", "native", _ANY, dict(_SIDE), _SIDE_TRAIN),
    "sherl": _m("SHERL side network: anti-redundancy aggregation of early layers merged (tanh gate, 0 at "
                "start) into the last pre-trained layer(s); backprop only through the late layers.",
                "Diao et al. SHERL: Synthesizing High Accuracy and Efficient Memory for Resource-Limited "
                "Transfer Learning, ECCV 2024 (arXiv:2407.07523)", "native", _ANY,
                {**_SIDE, "late_layers": 1, "late_tune": "frozen"}, _SIDE_TRAIN),
    "r2": _m("R²-Tuning's reversed recurrent block as a side network: one shared block over the last "
             "layers, deepest first (+ new head).",
             "Liu et al. R²-Tuning: Efficient Image-to-Video Transfer Learning for Video Temporal Grounding, "
             "ECCV 2024 (arXiv:2404.00801)", "native", _ANY,
             {**_SIDE, "r": 128, "n_layers": 4, "heads": 4, "dropout": 0.1}, _SIDE_TRAIN),
    "sparse": _m("LT-SFT sparse fine-tuning: full FT, mask = top-K |Δθ|, reset, masked FT; sparse Delta, "
                 "composable by addition (optional masked-LM domain SFT first).",
                 "Ansell et al. Composable Sparse Fine-Tuning for Cross-Lingual Transfer, ACL 2022 "
                 "(arXiv:2110.07560)", "native", _ANY,
                 {"density": 0.01, "k": None, "full_epochs": None, "full_lr": None, "exclude": [],
                  "domain_mlm": False, "domain_data": None, "domain_delta": None, "domain_density": None,
                  "domain_epochs": None, "mlm_probability": 0.15},
                 {**_PEFT_TRAIN, "lr": 5e-4}),
})

# adapter composition (tune/scalearn.py) and Trans-LoRA (tune/translora.py)
_SCALEARN_PAPER = ("Frohmann et al. ScaLearn: Simple and Highly Parameter-Efficient Task Transfer by Learning to "
                   "Scale, Findings of ACL 2024 (arXiv:2310.01217)")
_SCALEARN = {"sources": None, "omega_init": 2.0, "omega_std": 0.001, "omega_dropout": 0.3}
_SCALEARN_TRAIN = {**_PEFT_TRAIN, "lr": 5e-3, "weight_decay": 0.0}
METHODS.update({
    "scalearn": _m("ScaLearn: h + Σ_i ω_i ⊙ a_i(h) over frozen source adapters (option sources: adapter run "
                   "folders), ω ∈ R^{N×d} per site; L·N·d parameters (+ head).", _SCALEARN_PAPER, "native", _TEXT,
                   dict(_SCALEARN), _SCALEARN_TRAIN),
    "scalearn-uniform": _m("ScaLearnUniform: one scalar ω_i per source per site; L·N parameters (+ head).",
                           _SCALEARN_PAPER, "native", _TEXT, dict(_SCALEARN), _SCALEARN_TRAIN),
    "scalearn++": _m("ScaLearn++: one ω ∈ R^{N×d} shared by all layers; N·d parameters (+ head).",
                     _SCALEARN_PAPER, "native", _TEXT, dict(_SCALEARN), _SCALEARN_TRAIN),
    "scalearn-uniform++": _m("ScaLearnUniform++: one scalar per source shared by all layers; N parameters (+ head).",
                             _SCALEARN_PAPER, "native", _TEXT, dict(_SCALEARN), _SCALEARN_TRAIN),
    "adapterfusion": _m("AdapterFusion: per-site attention (query h, keys/values W·a_i) over frozen source "
                        "adapters, temperature annealed 50 → 1; 3(d²+d) per site (+ head).",
                        "Pfeiffer et al. AdapterFusion: Non-Destructive Task Composition for Transfer Learning, "
                        "EACL 2021 (arXiv:2005.00247)", "native", _TEXT,
                        {"sources": None, "temperature": 50.0, "anneal_steps": None},
                        {**_PEFT_TRAIN, "lr": 5e-4, "weight_decay": 0.0}),
    "shared-adapter": _m("VL-Adapter-style sharing: one bottleneck adapter shared by the --data task and the "
                         "option tasks (datasets), task prompts, one head per task, multi-task training.",
                         "Sung, Cho, Bansal. VL-Adapter: Parameter-Efficient Transfer Learning for "
                         "Vision-and-Language Tasks, CVPR 2022 (arXiv:2112.06825)", "native", _TEXT,
                         {"tasks": None, "task_per_class": None, "task_name": "task0", "share": "all",
                          "bottleneck": 64, "position": "ffn", "mode": "sequential", "scale": 1.0,
                          "dropout": 0.0, "task_prompts": True},
                         {**_PEFT_TRAIN, "lr": 1e-3}),
    "translora": _m("Trans-LoRA: distil a source base + LoRA (options source_model, source_lora) into a new "
                    "LoRA on --model from n_seed examples/class + augmented inputs filtered by a discriminator.",
                    "Wang et al. Trans-LoRA: towards data-free Transferable Parameter Efficient Finetuning, "
                    "NeurIPS 2024 (arXiv:2405.17258)", "native", _TEXT,
                    {"source_model": None, "source_lora": None, "n_seed": 5, "n_synthetic": 200,
                     "pool_factor": 3.0, "filter": True, "threshold": None, "min_keep": None,
                     "discriminator": "lora", "disc_base": "source", "disc_epochs": 5, "augment_ops": None,
                     "max_ops": 2, "temperature": 2.0, "hard_weight": 0.5, "r": 8, "alpha": 16,
                     "dropout": 0.05, "target_modules": None},
                    {**_PEFT_TRAIN, "lr": 1e-3}),
})

# the historical name kept by baselines
DEFAULTS = {name: info["train"] for name, info in METHODS.items()}


def check_method(method: str) -> MethodInfo:
    if method not in METHODS:
        raise ConfigError(f"unknown tune method {method!r}; available: {', '.join(METHODS)}")
    return METHODS[method]


def split_config(method: str, config: dict | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(method options, train options)`` of ``config`` for ``method``, each merged over its defaults.

    Unknown keys raise a one-line :class:`ConfigError` that lists both kinds of known keys.
    """
    from ..engine import TrainConfig

    info = check_method(method)
    config = dict(config or {})
    nested = config.pop("options", None) or {}
    if not isinstance(nested, dict):
        raise ConfigError(f"tune option 'options' must be a mapping, got {type(nested).__name__}")
    train_keys = {f.name for f in dataclasses.fields(TrainConfig)}
    opts, train = dict(info["options"]), dict(info["train"])
    for key, value in {**config, **nested}.items():
        if key in info["options"]:
            opts[key] = value
        elif key in train_keys and key not in nested:
            train[key] = value
        else:
            known = sorted(info["options"]) + sorted(train_keys)
            raise ConfigError(f"unknown option {key!r} for tune method {method!r} (known: {', '.join(known)})")
    return opts, train
