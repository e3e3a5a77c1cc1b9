"""LoRA, IA3, prefix tuning and prompt tuning through Hugging Face PEFT.

transferkit builds the PEFT configuration, trains with its own engine, and saves the adapter in
PEFT's format into ``out_dir/peft/``, so that PEFT itself loads it::

    from peft import PeftModel
    from transferkit.tune import peft_base
    base = peft_base(zoo_model, n_classes, method="lora")        # what the adapter was trained on
    model = PeftModel.from_pretrained(base, "runs/lora/peft")     # same logits as transferkit's run

The folder ``out_dir/peft/`` holds
- ``adapter_config.json`` + ``adapter_model.safetensors``: PEFT's own files (the head in ``modules_to_save``);
- ``transferkit.json``: model, method, number of classes (what :func:`load_peft` needs);
- for ``lora`` / ``ia3`` on a Hugging Face text encoder also ``head.safetensors`` (``weight`` (C, D),
  ``bias`` (C,)) and ``README.md``. There the adapter tensors carry the **encoder's own names**
  (``base_model.model.encoder.layer.0.attention.self.query.lora_A.weight``), so plain transformers + PEFT
  load it onto the base encoder, with the LoRA/IA3 weights applied::

      encoder = PeftModel.from_pretrained(AutoModel.from_pretrained(base), "runs/lora/peft")
      head = safetensors.torch.load_file("runs/lora/peft/head.safetensors")
      logits = mean_pool(encoder(**batch).last_hidden_state, batch["attention_mask"]) @ head["weight"].T + head["bias"]

  No standard ``AutoModelFor…`` class reproduces transferkit's text classifier: these encoders are
  sentence-transformers models read with attention-masked *mean* pooling, while
  ``AutoModelForSequenceClassification`` (BERT) classifies the pooled ``[CLS]`` token through a
  pooler layer. Hence the encoder adapter + a separate head (the README shows the full snippet).

Which base
----------
- ``lora`` / ``ia3`` on a Hugging Face text encoder: :class:`PooledClassifier` (the encoder's modules
  under their own names + mean pooling + new head; default targets: ``query``/``value`` for LoRA;
  key, value and the FFN output projection for IA3). Folders written by older versions (adapter
  names ``backbone.model.…``) are still read by :func:`load_peft`.
- ``lora`` / ``ia3`` on any other ZooModel: the :class:`~transferkit.zoo.base.Classifier` (backbone +
  new linear head) — plain torch models (default targets: every ``nn.Linear`` and non-grouped
  ``nn.Conv2d`` of the backbone, e.g. MobileNetV2's 1×1 convolutions).
- ``prefix`` / ``prompt``: :class:`PromptClassifier`, the Hugging Face encoder + mean pooling + head
  in the form PEFT's prompt learning needs (a ``config``, keyword inputs). Text models only.

New modules (LoRA's ``lora_A``, prompt and prefix embeddings) are drawn from the global torch RNG
seeded with the run's ``init_seed`` (:func:`~transferkit.zoo.head_seed`), so one seed gives one run.

The new classification head is always in PEFT's ``modules_to_save`` (``["head"]``): it is trained
and saved with the adapter. (Left out, PEFT would save only the adapter and a reload would come
with a randomly initialised head — the most reported PEFT pitfall.)

Virtual tokens and pooling
--------------------------
Prompt tuning prepends ``num_virtual_tokens`` embeddings to the input and PEFT grows the attention
mask accordingly; prefix tuning adds keys/values only (the output keeps the input length).
:class:`PromptClassifier` mean-pools over the **real** tokens only: the outputs at virtual
positions are dropped and the original attention mask is used. For prefix tuning the real tokens
keep their positions ``0..T-1`` (the encoder would otherwise shift absolute position embeddings by
the prefix length, since it takes the prefix for a KV cache). Token type ids are not passed (PEFT
drops them for prompt learning; for single sentences they are all zero anyway).

Delta
-----
- ``lora`` (Linear targets, no DoRA): kind ``lora`` — factors ``<module>.lora_A`` / ``.lora_B`` with
  per-module ``meta["scaling"]`` plus the ``new.head.*`` tensors; ``to_dense`` gives ``s·B@A``.
- ``lora`` with DoRA or Conv2d targets, ``ia3``: kind ``full`` — the exact merged weight
  difference (``merge_and_unload``) plus ``new.head.*``.
- ``prefix`` / ``prompt`` (not mergeable): kind ``head`` holding the new tensors
  (``new.peft.<name>``, ``new.head.*``); ``meta["requires"] = "peft"``: reload with PEFT.

Options: :class:`LoraOptions`, :class:`IA3Options`, :class:`PrefixOptions`, :class:`PromptOptions`
(registered at the end of this module; ``transferkit tune --list`` shows them with their ranges).
"""

from __future__ import annotations

import copy
import inspect
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import registry
from ..delta import NEW, Delta, from_states
from ..engine import is_main_process
from ..errors import ConfigError
from ..registry import option
from ..zoo.base import Classifier, MeanPooledEncoder, new_head, pool
from ._common import Fitted, count_trainable, fit_and_evaluate, require_text_hf
from .registry import PEFT_TRAIN, STAGE

__all__ = ["PromptClassifier", "PooledClassifier", "peft_base", "peft_config", "wrap", "load_peft", "delta_of", "run", "Targets",
           "LoraCore", "LoraOptions", "IA3Options", "VirtualTokens", "PrefixOptions", "PromptOptions"]

PEFT_DIR = "peft"
HEAD = "head"


# ----------------------------------------------------------------------------------- options
@dataclass
class Targets:
    """The layers a PEFT method adapts."""

    target_modules: list[str] | str | None = option(None, help="names of the layers to adapt, or a regex "
                                                    "(default: chosen per model, see default_targets)")


@dataclass
class LoraCore(Targets):
    """A LoRA update s·BA of each target layer (``lora`` and Trans-LoRA's student)."""

    r: int = option(8, low=1, help="rank of the update")
    alpha: float = option(16.0, low=0.0, low_open=True, help="scale numerator: s = alpha / r (alpha / sqrt(r) "
                          "with use_rslora)")
    dropout: float = option(0.05, low=0.0, high=1.0, high_open=True, help="dropout on the input of the update")


@dataclass
class LoraOptions(LoraCore):
    use_rslora: bool = option(False, help="rank-stabilised scale alpha / sqrt(r) (Kalajdzievski 2023)")
    use_dora: bool = option(False, help="weight-decomposed LoRA (DoRA, Liu et al. 2024)")
    bias: str = option("none", choices=("none", "all", "lora_only"), help="which biases train")


@dataclass
class IA3Options(Targets):
    feedforward_modules: list[str] | str | None = option(None, help="targets whose input (not output) is "
                                                         "rescaled (default: the FFN output projection)")


@dataclass
class VirtualTokens:
    num_virtual_tokens: int = option(20, low=1, help="length of the learned prefix / prompt")


@dataclass
class PrefixOptions(VirtualTokens):
    prefix_projection: bool = option(False, help="reparameterise the prefix by an MLP")
    encoder_hidden_size: int | None = option(None, low=1, help="width of that MLP (default: the hidden size)")


@dataclass
class PromptOptions(VirtualTokens):
    init: str = option("random", choices=("random", "sample_vocab"), help="initial prompt embeddings")


# ----------------------------------------------------------------------------------- prompt base
class PromptClassifier(nn.Module):
    """Hugging Face encoder → masked mean pooling over the real tokens → linear head.

    The base model PEFT's prompt-learning methods wrap (``task_type="FEATURE_EXTRACTION"``): it has
    the encoder's ``config``, takes keyword inputs (``input_ids``, ``attention_mask``,
    ``inputs_embeds``, ``past_key_values``) and returns logits (B, C).

    Parameters
    ----------
    model : the Hugging Face encoder (``MeanPooledEncoder.model``).
    head : ``nn.Linear(D, C)``.
    num_virtual_tokens : n, the number of positions PEFT prepends (mask and, for prompt tuning,
        embeddings); they are excluded from pooling.
    """

    def __init__(self, model: nn.Module, head: nn.Module, num_virtual_tokens: int = 0):
        super().__init__()
        self.model = model
        self.head = head
        self.config = model.config
        self.num_virtual_tokens = int(num_virtual_tokens)
        params = inspect.signature(model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._positions = "position_ids" in params

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, past_key_values=None,
                **kwargs: Any) -> torch.Tensor:
        kwargs = {k: v for k, v in kwargs.items() if v is not None and k not in
                  ("output_attentions", "output_hidden_states", "return_dict", "token_type_ids", "cache")}
        n = self.num_virtual_tokens
        ref = input_ids if input_ids is not None else inputs_embeds
        if attention_mask is None:
            attention_mask = torch.ones(ref.shape[:2], dtype=torch.long, device=ref.device)
        if past_key_values is not None:  # prefix tuning: mask is [prefix | real], output is real only
            T = ref.shape[1]
            if self._positions:
                kwargs["position_ids"] = torch.arange(T, device=ref.device).unsqueeze(0).expand(ref.shape[0], -1)
            kwargs[self._cache_kw] = past_key_values
            out = self.model(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                             **kwargs).last_hidden_state
            real_mask = attention_mask[:, -T:]
        else:
            out = self.model(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                             **kwargs).last_hidden_state
            # PEFT's prompt tuning calls with inputs_embeds = [prompt | text] and the grown mask
            skip = n if (input_ids is None and inputs_embeds is not None and attention_mask.shape[1] > n) else 0
            out, real_mask = out[:, skip:], attention_mask[:, skip:]
        return self.head(pool(out, real_mask))


# ----------------------------------------------------------------------------------- encoder base
class PooledClassifier(nn.Module):
    """A Hugging Face encoder → masked mean pooling → linear head, with the **encoder's own** parameter names.

    The base that ``lora`` / ``ia3`` wrap for a Hugging Face text encoder. Its children are the encoder's
    children themselves (``embeddings``, ``encoder``, …, shared objects) plus ``head``, so PEFT names the
    adapter tensors as it would for ``AutoModel.from_pretrained(base)`` (``base_model.model.encoder.layer.0
    .attention.self.query.lora_A.weight``): the saved adapter applies to the plain encoder. The forward
    pass is :class:`~transferkit.zoo.base.MeanPooledEncoder` + head, so the logits equal the
    :class:`~transferkit.zoo.base.Classifier` with the same weights (:meth:`as_classifier`).
    """

    def __init__(self, hf: nn.Module, feature_dim: int, n_classes: int, seed: int = 0):
        super().__init__()
        for name, child in hf.named_children():
            self.add_module(name, child)
        object.__setattr__(self, "encoder_model", hf)  # not a submodule: its children are ours
        self.head = new_head(feature_dim, n_classes, seed)

    def forward(self, inputs: Any = None, **named: torch.Tensor) -> torch.Tensor:
        x = named if inputs is None else inputs
        return self.head(pool(self.encoder_model(**x).last_hidden_state, x["attention_mask"]))

    def as_classifier(self) -> Classifier:
        """The same module as a :class:`Classifier` (``backbone.model.*`` + ``head``), sharing the weights."""
        clf = Classifier(MeanPooledEncoder(self.encoder_model), self.head.in_features, self.head.out_features)
        clf.head = self.head
        return clf


_BACKBONE = "backbone.model."  # where a PooledClassifier's parameters sit in the Classifier / the Delta


def _tk_name(base: nn.Module, name: str) -> str:
    """A parameter name of the PEFT base as transferkit's Classifier (and Delta) names it."""
    if isinstance(base, PooledClassifier) and not name.startswith(HEAD + "."):
        return _BACKBONE + name
    return name


# ----------------------------------------------------------------------------------- configs
def _is_hf_text(model) -> bool:
    from ..zoo.base import MeanPooledEncoder

    return isinstance(model.backbone, MeanPooledEncoder) and getattr(model.backbone.model, "config", None) is not None


def _attention_names(module: nn.Module) -> tuple[str, str, str] | None:
    """(query, key, value) Linear names of a BERT-like (query/key/value) or MPNet-like (q/k/v) encoder."""
    leaves = {n.rsplit(".", 1)[-1] for n, m in module.named_modules() if isinstance(m, nn.Linear)}
    for names in (("query", "key", "value"), ("q", "k", "v"), ("q_proj", "k_proj", "v_proj")):
        if set(names) <= leaves:
            return names
    return None


def _plain_targets(clf: nn.Module) -> list[str]:
    """Every Linear and non-grouped Conv2d of the backbone, by full name."""
    out = []
    for name, m in clf.named_modules():
        if not name.startswith("backbone."):
            continue
        if isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.groups == 1):
            out.append(name)
    return out


def default_targets(model, clf: nn.Module, method: str) -> tuple[Any, Any]:
    """``(target_modules, feedforward_modules)`` defaults for ``method`` on ``model``."""
    if _is_hf_text(model):
        names = _attention_names(clf)
        if names is None:
            raise ConfigError(f"cannot guess {method} target modules for {model.name!r}; "
                              "set target_modules (names of Linear layers)")
        q, k, v = names
        if method == "lora":
            return [q, v], None
        # IA3 (Liu et al.): keys, values and the input of the FFN down-projection (layer.N.output.dense)
        ff = r".*\.layer\.\d+\.output\.dense"
        return rf".*\.({k}|{v})|{ff}", ff
    targets = _plain_targets(clf)
    if not targets:
        raise ConfigError(f"{model.name!r} has no Linear or Conv2d layer to adapt; set target_modules")
    return targets, ([] if method == "ia3" else None)


def peft_config(method: str, options: dict[str, Any], model=None, clf: nn.Module | None = None):
    """The PEFT config object for ``method`` with transferkit ``options`` (a dict of :class:`LoraOptions`, …)."""
    import peft

    if isinstance(clf, PooledClassifier):  # full names given as in the Classifier (backbone.model.…)
        options = {k: ([t[len(_BACKBONE):] if t.startswith(_BACKBONE) else t for t in v] if isinstance(v, list) else v)
                   for k, v in options.items()}
    if method == "lora":
        targets = options.get("target_modules")
        if targets is None:
            targets, _ = default_targets(model, clf, "lora")
        if options.get("bias", "none") not in ("none", "all", "lora_only"):
            raise ConfigError(f"lora option bias must be none, all or lora_only, got {options['bias']!r}")
        return peft.LoraConfig(r=int(options["r"]), lora_alpha=float(options["alpha"]),
                               lora_dropout=float(options["dropout"]), target_modules=targets,
                               use_rslora=bool(options["use_rslora"]), use_dora=bool(options["use_dora"]),
                               bias=options.get("bias", "none"), modules_to_save=[HEAD])
    if method == "ia3":
        targets, ff = options.get("target_modules"), options.get("feedforward_modules")
        if targets is None:
            targets, default_ff = default_targets(model, clf, "ia3")
            ff = default_ff if ff is None else ff
        return peft.IA3Config(target_modules=targets, feedforward_modules=ff if ff is not None else [],
                              modules_to_save=[HEAD])
    if method == "prefix":
        kw = {}
        if options.get("encoder_hidden_size"):
            kw["encoder_hidden_size"] = int(options["encoder_hidden_size"])
        return peft.PrefixTuningConfig(task_type="FEATURE_EXTRACTION",
                                       num_virtual_tokens=int(options["num_virtual_tokens"]),
                                       prefix_projection=bool(options["prefix_projection"]),
                                       modules_to_save=[HEAD], **kw)
    if method == "prompt":
        init = str(options.get("init", "random")).upper()
        if init not in ("RANDOM", "SAMPLE_VOCAB"):
            raise ConfigError(f"prompt option init must be 'random' or 'sample_vocab', got {options['init']!r}")
        return peft.PromptTuningConfig(task_type="FEATURE_EXTRACTION",
                                       num_virtual_tokens=int(options["num_virtual_tokens"]),
                                       prompt_tuning_init=init, modules_to_save=[HEAD])
    raise ConfigError(f"{method!r} is not a PEFT method here")


def peft_base(model, n_classes: int, method: str = "lora", seed: int = 0, num_virtual_tokens: int | None = None) -> nn.Module:
    """A fresh base module for ``method`` (copy of ``model``'s backbone + new head) for PEFT to wrap.

    ``PeftModel.from_pretrained(peft_base(model, C, method), run_dir / "peft")`` reloads a run.
    For prefix/prompt, ``num_virtual_tokens`` is read from the adapter config when loading through
    :func:`load_peft`; pass it here when calling PEFT directly (default: the method's default).
    """
    clf = model.classifier(n_classes, seed=seed)
    if method in ("prefix", "prompt"):
        hf = require_text_hf(model, method)
        if num_virtual_tokens is None:
            num_virtual_tokens = VirtualTokens().num_virtual_tokens
        return PromptClassifier(copy.deepcopy(hf), clf.head, num_virtual_tokens)
    if _is_hf_text(model):
        return PooledClassifier(copy.deepcopy(model.backbone.model), model.feature_dim, n_classes, seed)
    return Classifier(copy.deepcopy(model.backbone), model.feature_dim, n_classes, seed)


def wrap(model, n_classes: int, method: str, options: dict[str, Any], seed: int = 0):
    """``(peft_model, base_state)``: a PEFT-wrapped fresh copy of ``model`` + the base tensors by name."""
    import peft

    if method in ("prefix", "prompt"):
        require_text_hf(model, method)
        if method == "prefix" and _cache_unsupported(model.backbone.model):
            raise ConfigError(f"prefix tuning needs an encoder that accepts a key/value cache; "
                              f"{type(model.backbone.model).__name__} does not")
    base = peft_base(model, n_classes, method, seed, num_virtual_tokens=options.get("num_virtual_tokens"))
    base_state = {_tk_name(base, k): v.detach().clone() for k, v in base.state_dict().items()}
    config = peft_config(method, options, model, base)
    with warnings.catch_warnings(), torch.random.fork_rng(devices=_cuda_devices()):
        warnings.simplefilter("ignore")
        torch.manual_seed(int(seed))  # PEFT draws lora_A / prompt embeddings from the global RNG: seed it
        try:
            pm = peft.get_peft_model(base, config)
        except (ValueError, TypeError, KeyError) as exc:
            raise ConfigError(f"PEFT rejected the {method} configuration: {str(exc).splitlines()[0]}") from None
    _check_head_only_saved(pm)
    return pm, base_state


def _cuda_devices() -> list[int]:
    """The CUDA devices whose RNG :func:`torch.random.fork_rng` must save (none on a CPU-only machine)."""
    return list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []


def _cache_unsupported(hf: nn.Module) -> bool:
    params = inspect.signature(hf.forward).parameters
    return "cache" not in params and "past_key_values" not in params


def _check_head_only_saved(pm) -> None:
    from peft.utils import ModulesToSaveWrapper

    wrapped = [n for n, m in pm.named_modules() if isinstance(m, ModulesToSaveWrapper)]
    if len(wrapped) != 1 or not wrapped[0].endswith(HEAD):
        raise ConfigError(f"expected PEFT to wrap only the new head in modules_to_save, got {wrapped}")


def load_peft(model, path: str | Path, n_classes: int | None = None) -> nn.Module:
    """Load a transferkit PEFT run folder (``out_dir/peft``) onto a fresh copy of ``model``; eval mode."""
    from peft import PeftConfig, PeftModel

    path = Path(path)
    info = json.loads((path / "transferkit.json").read_text()) if (path / "transferkit.json").is_file() else {}
    n_classes = n_classes or info.get("n_classes")
    if n_classes is None:
        raise ConfigError(f"{path}: pass n_classes (no transferkit.json)")
    cfg = PeftConfig.from_pretrained(str(path))
    method = info.get("method") or {"LORA": "lora", "IA3": "ia3", "PREFIX_TUNING": "prefix",
                                    "PROMPT_TUNING": "prompt"}[str(cfg.peft_type.value if hasattr(cfg.peft_type, "value") else cfg.peft_type)]
    base = peft_base(model, int(n_classes), method, num_virtual_tokens=getattr(cfg, "num_virtual_tokens", None))
    if isinstance(base, PooledClassifier) and _legacy_names(path):
        # a folder written before adapters were saved under the encoder's names (backbone.model.…)
        base = Classifier(copy.deepcopy(model.backbone), model.feature_dim, int(n_classes))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PeftModel.from_pretrained(base, str(path)).eval()


def _legacy_names(path: Path) -> bool:
    from safetensors import safe_open

    f = path / "adapter_model.safetensors"
    if not f.is_file():
        return False
    with safe_open(str(f), "pt") as st:
        return any(k.startswith("base_model.model." + _BACKBONE) for k in st.keys())


# ----------------------------------------------------------------------------------- delta
def _head_state(pm) -> dict[str, torch.Tensor]:
    active = pm.get_base_model().head.modules_to_save["default"]
    return {f"{HEAD}.{k}": v.detach().clone() for k, v in active.state_dict().items()}


def delta_of(pm, base_state: dict[str, torch.Tensor], method: str, base_name: str) -> Delta:
    """The transferkit :class:`Delta` of a trained PEFT model (see the module docstring)."""
    from peft.tuners.lora import LoraLayer

    head = {NEW + k: v for k, v in _head_state(pm).items()}
    cfg = pm.peft_config[pm.active_adapter]
    if method in ("prefix", "prompt"):
        from peft.utils import get_peft_model_state_dict

        state = get_peft_model_state_dict(pm)
        tensors = {NEW + "peft." + k: v.detach().clone() for k, v in state.items() if "modules_to_save" not in k
                   and not k.startswith(HEAD + ".")}
        tensors.update(head)
        return Delta(base_name, "head", tensors, {"requires": "peft", "peft_type": str(cfg.peft_type.value),
                                                  "num_virtual_tokens": int(cfg.num_virtual_tokens)})
    inner = pm.get_base_model()
    lora_layers = {_tk_name(inner, n): m for n, m in inner.named_modules()
                   if isinstance(m, LoraLayer) and "default" in m.lora_A}
    factored = method == "lora" and not cfg.use_dora and cfg.bias == "none" and all(
        m.lora_A["default"].weight.dim() == 2 for m in lora_layers.values())
    if factored:
        tensors, scaling = {}, {}
        for name, m in lora_layers.items():
            tensors[name + ".lora_A"] = m.lora_A["default"].weight.detach().clone()
            tensors[name + ".lora_B"] = m.lora_B["default"].weight.detach().clone()
            scaling[name] = float(m.scaling["default"])
        tensors.update(head)
        return Delta(base_name, "lora", tensors, {"scaling": scaling, "r": int(cfg.r), "lora_alpha": float(cfg.lora_alpha),
                                                  "use_rslora": bool(cfg.use_rslora)})
    merged = merged_copy(pm)
    tuned = {k: v for k, v in merged.state_dict().items() if not k.startswith(HEAD + ".")}
    tuned.update(_head_state(pm))
    base = {k: v for k, v in base_state.items() if not k.startswith(HEAD + ".")}
    delta = from_states(base, tuned, base_name=base_name, meta={"merged_from": str(cfg.peft_type.value)})
    return delta


def merged_copy(pm) -> nn.Module:
    """``merge_and_unload`` of a deep copy: a plain module with the adapter folded into the weights.

    A :class:`PooledClassifier` base comes back as the equivalent :class:`Classifier`.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = copy.deepcopy(pm).merge_and_unload(safe_merge=True).eval()
    return merged.as_classifier().eval() if isinstance(merged, PooledClassifier) else merged


# ----------------------------------------------------------------------------------- runner
def run(model, fit, val, test, *, n_classes, method, options, cfg, out_dir, resume, init_seed, **_) -> Fitted:
    pm, base_state = wrap(model, n_classes, method, options, seed=init_seed)
    trainable = count_trainable(pm)
    head_params = sum(v.numel() for v in _head_state(pm).values())
    added = sum(p.numel() for n, p in pm.named_parameters() if p.requires_grad and any(
        t in n for t in ("lora_", "ia3_", "modules_to_save", "prompt_encoder")))
    drop = ("token_type_ids",) if method in ("prefix", "prompt") else ()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(past_key_values|Position ids|Token type ids).*")
        result, test_metrics = fit_and_evaluate(pm, model, fit, val, test, cfg, out_dir, resume, drop=drop)
    delta = delta_of(pm, base_state, method, model.name)
    if out_dir is not None and is_main_process():
        save(pm, Path(out_dir) / PEFT_DIR, model=model, n_classes=n_classes, method=method)
    return Fitted(delta, result.metrics, result.history, test_metrics, trainable, pm,
                  {"added_params": added, "head_params": head_params})


def save(pm, path: Path, *, model, n_classes: int, method: str) -> Path:
    """``pm.save_pretrained(path)`` plus ``transferkit.json`` (model, method, classes) for :func:`load_peft`."""
    from ..io import write_json

    path.mkdir(parents=True, exist_ok=True)
    cfg = pm.peft_config[pm.active_adapter]
    cfg.base_model_name_or_path = str(model.name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.save_pretrained(str(path))
    info = {"model": model.name, "method": method, "n_classes": int(n_classes),
            "base": "transferkit.tune.peft_base(model, n_classes, method)"}
    if isinstance(pm.get_base_model(), PooledClassifier):
        from ..io import save_safetensors

        save_safetensors({k[len(HEAD) + 1:]: v.contiguous() for k, v in _head_state(pm).items()}, path / HEAD_FILE)
        hub = (model.meta or {}).get("hub_id") or str(model.name)
        info.update({"encoder": "transformers.AutoModel", "pooling": "attention-masked mean of last_hidden_state",
                     "head": HEAD_FILE})
        (path / "README.md").write_text(_README.format(base=hub, n=int(n_classes), dim=model.feature_dim,
                                                       max_length=getattr(model.preprocess, "max_length", 128)))
    write_json(path / "transferkit.json", info)
    return path


HEAD_FILE = "head.safetensors"
_README = """# transferkit adapter

Base encoder: `{base}` (mean pooling over the real tokens, then a linear head: {dim} → {n} classes).

Without transferkit — transformers + PEFT only:

```python
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModel, AutoTokenizer

encoder = PeftModel.from_pretrained(AutoModel.from_pretrained("{base}"), "THIS_FOLDER").eval()
head = load_file("THIS_FOLDER/head.safetensors")                   # weight ({n}, {dim}), bias ({n},)
batch = AutoTokenizer.from_pretrained("{base}")(texts, padding=True, truncation=True, max_length={max_length},
                                               return_tensors="pt")
with torch.no_grad():
    h = encoder(**batch).last_hidden_state
    m = batch["attention_mask"].unsqueeze(-1).to(h.dtype)
    logits = ((h * m).sum(1) / m.sum(1).clamp(min=1e-9)) @ head["weight"].T + head["bias"]
```

With transferkit: `transferkit.tune.load_peft(load_model("{base}"), "THIS_FOLDER")` (the whole classifier).
"""


# ----------------------------------------------------------------------------------- registry
_ANY, _TEXT = ["image", "text"], ["text"]
registry.register(
    STAGE, "lora", fn=run, options=LoraOptions, family="peft", modality=_ANY, train={**PEFT_TRAIN, "lr": 2e-3},
    summary="LoRA via HF PEFT: low-rank updates s·BA on target Linear/Conv2d layers (+ new head).",
    paper="Hu et al. LoRA: Low-Rank Adaptation of Large Language Models, ICLR 2022 (arXiv:2106.09685)")
registry.register(
    STAGE, "ia3", fn=run, options=IA3Options, family="peft", modality=_ANY, train={**PEFT_TRAIN, "lr": 3e-3},
    summary="IA3 via HF PEFT: learned vectors rescale keys, values and the FFN activation (+ new head).",
    paper="Liu et al. Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context Learning, "
          "NeurIPS 2022 (arXiv:2205.05638)")
registry.register(
    STAGE, "prefix", fn=run, options=PrefixOptions, family="peft", modality=_TEXT, train={**PEFT_TRAIN, "lr": 1e-2},
    summary="Prefix tuning via HF PEFT: learned key/value prefixes in every attention layer (+ new head).",
    paper="Li & Liang. Prefix-Tuning: Optimizing Continuous Prompts for Generation, ACL 2021 (arXiv:2101.00190)")
registry.register(
    STAGE, "prompt", fn=run, options=PromptOptions, family="peft", modality=_TEXT, train={**PEFT_TRAIN, "lr": 3e-2},
    summary="Prompt tuning via HF PEFT: learned input embeddings prepended to the text (+ new head).",
    paper="Lester, Al-Rfou, Constant. The Power of Scale for Parameter-Efficient Prompt Tuning, EMNLP 2021 "
          "(arXiv:2104.08691)")
