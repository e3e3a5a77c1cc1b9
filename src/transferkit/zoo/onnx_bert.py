"""Exact conversion of a sentence-transformers BERT exported to ONNX back into a HF ``BertModel``.

The ONNX export of paraphrase-MiniLM-L3-v2 keeps the embedding tables, LayerNorms and biases as
named initializers (``model.0.auto_model.<BertModel key>``) but stores the 18 linear weight matrices
as unnamed ``onnx::MatMul_<n>`` initializers, transposed (``x @ W`` instead of ``x @ W.T``). Each
such MatMul feeds an ``Add`` whose other input is a named bias, so the graph itself says which
Linear a matrix belongs to: ``<...>.bias`` → ``<...>.weight`` = matrix transposed. (The numeric
order of ``n`` — query, key, value, attention output, intermediate, output per layer — agrees and
is used only as a cross-check.) There is no pooler in the export.

The converted model is saved once, atomically, as ``model.safetensors`` + ``config.json`` under
``assets.derived_dir(name)/bert``; later loads read that directory directly.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import assets
from ..errors import ModelError
from ..io import atomic_path, sha256_file, write_json

PREFIX = "model.0.auto_model."
_SLOTS = ["attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
          "intermediate.dense", "output.dense"]


def onnx_to_bert_state(onnx_path: str | Path, num_layers: int) -> dict[str, torch.Tensor]:
    """State dict of a HF ``BertModel`` (no pooler) read from a sentence-transformers ONNX export."""
    import onnx
    from onnx import numpy_helper

    try:
        model = onnx.load(str(onnx_path))
    except Exception as exc:
        raise ModelError(f"cannot read ONNX file {onnx_path}: {type(exc).__name__}: "
                         f"{(str(exc).splitlines() or [''])[0][:200]}") from None
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    state: dict[str, torch.Tensor] = {}
    for name, arr in inits.items():
        if name.startswith(PREFIX):
            state[name[len(PREFIX):]] = torch.from_numpy(np.array(arr, dtype=np.float32))

    # Graph-based mapping: MatMul(x, W) -> Add(·, <prefix>.bias)
    consumers: dict[str, list[Any]] = {}
    for node in model.graph.node:
        for inp in node.input:
            consumers.setdefault(inp, []).append(node)
    matrices = {}
    for node in model.graph.node:
        if node.op_type != "MatMul" or len(node.input) != 2 or node.input[1] not in inits:
            continue
        w = node.input[1]
        if w.startswith(PREFIX):
            continue
        for nxt in consumers.get(node.output[0], []):
            if nxt.op_type != "Add":
                continue
            bias = [i for i in nxt.input if i.startswith(PREFIX) and i.endswith(".bias")]
            if bias:
                matrices[bias[0][len(PREFIX):-len(".bias")] + ".weight"] = w
    expected = [f"encoder.layer.{i}.{slot}.weight" for i in range(num_layers) for slot in _SLOTS]
    if sorted(matrices) != sorted(expected):
        raise ModelError(f"{onnx_path}: found {len(matrices)} linear weight matrices in the ONNX graph, "
                         f"expected {len(expected)} for {num_layers} BERT layers")
    # Cross-check with the numeric order of the anonymous initializers.
    by_number = sorted(matrices.values(), key=lambda n: int(re.sub(r"\D", "", n) or -1))
    if by_number != [matrices[k] for k in expected]:
        raise ModelError(f"{onnx_path}: ONNX MatMul initializers are not in the expected layer order")
    for key, init_name in matrices.items():
        state[key] = torch.from_numpy(np.ascontiguousarray(inits[init_name].T, dtype=np.float32))
    return state


def converted_dir(name: str, onnx_path: str | Path, config: dict[str, Any]) -> Path:
    """Directory holding the converted ``BertModel`` (config.json + model.safetensors); built once."""
    from safetensors.torch import save_file
    from transformers import BertConfig, BertModel

    out = assets.derived_dir(name) / "bert"
    if assets.derived_intact(out):
        return out
    cfg = BertConfig(**config)
    state = onnx_to_bert_state(onnx_path, cfg.num_hidden_layers)
    model = BertModel(cfg, add_pooling_layer=False)
    from .archs import load_state_strict

    own = model.state_dict()
    # position_ids / token_type_ids are non-persistent or buffers: take the model's own values.
    for k in own:
        if k not in state and k.endswith(("position_ids", "token_type_ids")):
            state[k] = own[k]
    load_state_strict(model, state, f"{name} (BertModel from ONNX)")
    with atomic_path(out) as tmp:
        tmp.mkdir()
        model.config.save_pretrained(str(tmp))
        save_file({k: v.contiguous() for k, v in model.state_dict().items()
                   if not k.endswith(("position_ids", "token_type_ids"))},
                  str(tmp / "model.safetensors"), metadata={"format": "pt"})
        write_json(tmp / "conversion.json", {"source": str(onnx_path), "source_sha256": sha256_file(onnx_path),
                                             "method": "onnx initializers, MatMul->Add bias mapping, transposed"})
    assets.seal_derived(out)
    return out
