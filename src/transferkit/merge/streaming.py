"""Out-of-core merging: merge safetensors checkpoints tensor by tensor, streaming sharded output.

>>> from transferkit.merge.streaming import stream_merge
>>> stream_merge("base.safetensors", ["ft_a.safetensors", "ft_b/"], "merged/", method="ties",
...              k=0.2, scope="per_tensor")                                     # doctest: +SKIP

Inputs are **full checkpoints** (a ``.safetensors`` file, or a directory holding ``*.safetensors``
files, optionally with a Hugging Face ``*.safetensors.index.json``) of one architecture; ``base`` is
the pre-trained model θ0 (it may also appear among ``models``, as a zero task vector). The result is
the model θ0 + merged(τ_1..τ_T) with τ_t = θ_t − θ0, written as
``model-0000i-of-0000N.safetensors`` shards plus ``model.safetensors.index.json`` (HF layout, whose
``metadata`` also records the merge method and parameters), atomically: on any error no output
folder is left behind.

Memory. Nothing is loaded whole. Tensors are read one at a time with ``safetensors.safe_open``
(lazy, memory-mapped). A handle is re-opened for each read because the pages a mapping has touched
stay in the process's resident set until it is unmapped: one long-lived handle per input would grow
RSS by the size of every input file. Output shards are written by a small streaming safetensors
writer: the header (names, dtypes, shapes, offsets) is known from the base before any merging, so
each merged tensor is written to disk as soon as it is computed and released. The working set is
about one name's tensors: ≈ 4 × the largest tensor (compute dtype) for the linear methods (base,
accumulator, the current τ, the output), ≈ (T + 4) × for TIES, whose element-wise steps run in
column blocks of ``CHUNK`` entries and whose per-tensor top-k threshold on large tensors is found by
a chunked radix select (``kthvalue`` would copy the row and allocate int64 indices). Measured on
all-mpnet-base-v2 (418 MiB per checkpoint): see ``benchmarks/merge_streaming.py``.

Methods (same semantics, defaults and bit-for-bit results as the in-memory functions on Deltas made
by :func:`transferkit.delta.from_states` from the same float32 inputs):

================  ==========================================================================
``average``        :func:`~transferkit.merge.average` (``weights``, normalised)
``task_arithmetic`` :func:`~transferkit.merge.task_arithmetic` (``lam``, one or one per model)
``ties``           :func:`~transferkit.merge.ties` (``k``, ``lam``, ``scope``, ``agg``, ``tie_break``)
``dare_linear``    :func:`~transferkit.merge.dare_merge` with task arithmetic (``p``, ``seed``, ``lam``)
``dare_ties``      :func:`~transferkit.merge.dare_merge` with TIES
================  ==========================================================================

TIES trim scope. ``scope="per_tensor"`` (default here, as mergekit/PEFT) needs one pass: the top-k
threshold of a tensor depends only on that tensor. ``scope="global"`` (the paper) needs, per task,
the k-quantile of |τ_t| over the *whole* model, which is unknown until every tensor has been seen, so
it cannot be done in one streaming pass. It is done exactly, not estimated, with a radix select over
the IEEE bit patterns of |τ| (for non-negative floats the integer view is monotone in the value):
pass 1 histograms the top 16 bits of every |τ_t| entry per task (65 536 counters), which fixes the
bin holding the k-th largest; pass 2 histograms the low 16 bits inside that bin, which gives the
exact threshold (float64 inputs need 4 counting passes). A final pass merges and writes. So global
TIES reads every input 3 times (float32) and holds only histograms between passes; the result
equals in-memory global TIES bit for bit. With ``tie_break="majority"`` the global fill sign for
zero-mass coordinates is the sign of Σ γ over the model; it is only known after the final pass, so
that pass is repeated in the rare case that the sign differs from the +1 assumed *and* some
coordinate needed it.

Tensors. Integer/bool tensors (``num_batches_tracked``, position ids) are buffers, never merged:
copied from the base, as are tensors named in ``exclude`` (names or prefixes ending in ``.``; these
may be absent from the fine-tunes). Buffer rule for inputs that disagree: an integer/bool tensor
that is not in *every* input (base and models) is skipped — not written, listed in the output's
``skipped_buffers`` — because such a tensor is a non-persistent buffer that some library version
saved and another did not (``embeddings.position_ids`` in a BERT saved by transformers < 4.31 next to
fine-tunes saved by a later one), and a model that loads from the inputs that lack it rebuilds it
itself. A *float* tensor missing from an input still means a different model (an error, unless
``exclude`` names it).

Hugging Face models. When the base (or, if the base is a file, the first model) is a directory
holding a ``config.json`` (a ``save_pretrained`` folder), its other non-weight files (``config.json``,
``generation_config.json``, tokenizer and processor files, custom code) are copied into the output,
so the merge of HF models is an HF model directory: ``AutoModel.from_pretrained(out)`` loads it
(the shards + ``model.safetensors.index.json`` are the HF sharded layout). The files copied are listed
in the index metadata (``copied_files``). Every float tensor keeps the
base's dtype; fp16/bf16 inputs are upcast and merged in float32 (float64 if any input is float64)
and cast back once. Tied/shared tensors: a checkpoint written by ``safetensors.torch.save_model``
stores each shared tensor once and records ``{dropped_name: kept_name}`` in its metadata; those
entries are carried to the output metadata, so ``load_model`` re-ties them. Checkpoints that store
both names can declare ``tied={alias: source}``: the alias is not merged on its own but written as a
copy of the merged source (so the two stay equal), and models may omit it. Any other difference in
tensor names or shapes between inputs is a one-line :class:`~transferkit.errors.ConfigError` naming
the first mismatching tensor; an unreadable/corrupt/truncated input is a one-line
:class:`~transferkit.errors.ModelError`.

DARE: masks come from the same per-tensor generators as :func:`~transferkit.merge.dare` (seed
``seed + i`` for model i, keyed by tensor name), so streaming and in-memory DARE drop the same
entries; the large-delta warning is emitted after the merge (the mean |δ| is only known then).
"""

from __future__ import annotations

import json
import math
import os
import struct
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from ..errors import ConfigError, ModelError
from ..io import atomic_path
from ._common import _excluded, as_weights
from .dare import LargeDeltaWarning, _generator, drop_and_rescale
from .ties import check_options as check_ties_options
from .ties import disjoint_merge

METHODS = ("average", "task_arithmetic", "ties", "dare_linear", "dare_ties")
_ALIASES = {"linear": "average", "dare": "dare_linear", "ta": "task_arithmetic"}

_ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"), ("U16", "uint16"),
                     ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _attr):
        _ST_DTYPES[_name] = getattr(torch, _attr)
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}

INDEX_NAME = "model.safetensors.index.json"
DEFAULT_SHARD_SIZE = 2 * 1024**3


# ----------------------------------------------------------------------------------------- reading
@dataclass
class _Info:
    dtype: str
    shape: tuple[int, ...]

    @property
    def torch_dtype(self) -> torch.dtype:
        return _ST_DTYPES[self.dtype]

    @property
    def is_float(self) -> bool:
        return self.torch_dtype.is_floating_point

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * _itemsize(self.torch_dtype)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


class Checkpoint:
    """A lazily read safetensors checkpoint: one file, or a directory of (indexed) shards."""

    def __init__(self, path: str | os.PathLike):
        from safetensors import safe_open

        self.path = Path(path)
        files = self._files()
        self.file_of: dict[str, Path] = {}
        self.info: dict[str, _Info] = {}
        self.metadata: dict[str, str] = {}
        for f in files:
            try:
                with safe_open(str(f), "pt") as h:
                    meta = h.metadata() or {}
                    for key in h.keys():
                        sl = h.get_slice(key)
                        dtype = sl.get_dtype()
                        if dtype not in _ST_DTYPES:
                            raise ModelError(f"tensor {key!r} in {f} has unsupported dtype {dtype}")
                        if key in self.file_of:
                            raise ModelError(f"tensor {key!r} appears in both {self.file_of[key]} and {f}")
                        self.file_of[key] = f
                        self.info[key] = _Info(dtype, tuple(int(s) for s in sl.get_shape()))
            except ModelError:
                raise
            except Exception as exc:  # SafetensorError, OSError, …: corrupt or truncated file
                raise ModelError(f"cannot read checkpoint {f}: {type(exc).__name__}: {_first_line(exc)}") from None
            self.metadata.update(meta)
        if not self.info:
            raise ModelError(f"checkpoint {self.path} holds no tensors")

    def _files(self) -> list[Path]:
        p = self.path
        if p.is_file():
            return [p]
        if not p.is_dir():
            raise ModelError(f"checkpoint not found: {p}")
        indexes = sorted(p.glob("*.safetensors.index.json"))
        if indexes:
            try:
                weight_map = json.loads(indexes[0].read_text())["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise ModelError(f"cannot read index {indexes[0]}: {_first_line(exc)}") from None
            files = [p / f for f in dict.fromkeys(weight_map.values())]
            missing = [f for f in files if not f.is_file()]
            if missing:
                raise ModelError(f"index {indexes[0].name} names a missing shard: {missing[0]}")
            return files
        files = sorted(p.glob("*.safetensors"))
        if not files:
            raise ModelError(f"no .safetensors files in {p}")
        return files

    def tied(self) -> dict[str, str]:
        """``{dropped_name: kept_name}`` recorded by ``safetensors.torch.save_model``."""
        return {k: v for k, v in self.metadata.items() if k not in self.info and v in self.info}

    def get(self, key: str) -> torch.Tensor:
        """Read one tensor (a fresh handle each time, so no mapping outlives the read)."""
        from safetensors import safe_open

        try:
            with safe_open(str(self.file_of[key]), "pt") as h:
                return h.get_tensor(key)
        except Exception as exc:
            raise ModelError(f"cannot read tensor {key!r} from {self.file_of[key]}: "
                             f"{type(exc).__name__}: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:200] if lines else ""


# ----------------------------------------------------------------------------------------- writing
class _ShardWriter:
    """Writes a planned list of tensors into safetensors shards, one tensor at a time."""

    def __init__(self, folder: Path, shards: list[list[tuple[str, _Info]]], metadata: dict[str, str]):
        self.folder = folder
        self.shards = shards
        self.metadata = metadata
        n = len(shards)
        self.names = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self.order = [(si, name, info) for si, shard in enumerate(shards) for name, info in shard]
        self.pos = 0
        self.fh = None
        self.shard = -1

    def _open(self, si: int) -> None:
        if self.fh is not None:
            self.fh.close()
        header: dict[str, Any] = {"__metadata__": self.metadata}
        offset = 0
        for name, info in self.shards[si]:
            header[name] = {"dtype": info.dtype, "shape": list(info.shape), "data_offsets": [offset, offset + info.nbytes]}
            offset += info.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.fh = open(self.folder / self.names[si], "wb")
        self.fh.write(struct.pack("<Q", len(raw)))
        self.fh.write(raw)
        self.shard = si

    def write(self, name: str, tensor: torch.Tensor) -> None:
        si, expected, info = self.order[self.pos]
        if name != expected or tuple(tensor.shape) != info.shape or tensor.dtype != info.torch_dtype:
            raise RuntimeError(f"writer expected {expected} {info}, got {name} {tuple(tensor.shape)} {tensor.dtype}")
        if si != self.shard:
            self._open(si)
        t = tensor.detach().contiguous().cpu()
        if t.numel():
            self.fh.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        self.pos += 1

    def close(self) -> None:
        if self.pos != len(self.order):
            raise RuntimeError(f"writer closed after {self.pos} of {len(self.order)} tensors")
        if self.fh is not None:
            self.fh.close()
            self.fh = None
        for si in range(len(self.shards)):  # shards with only empty tensors were never opened
            if not (self.folder / self.names[si]).exists():
                self._open(si)
                self.fh.close()
                self.fh = None

    def abort(self) -> None:
        if self.fh is not None:
            self.fh.close()
            self.fh = None

    def index(self, extra: dict[str, Any]) -> dict[str, Any]:
        total = sum(info.nbytes for shard in self.shards for _, info in shard)
        weight_map = {name: self.names[si] for si, name, _ in self.order}
        return {"metadata": {"total_size": total, **extra}, "weight_map": weight_map}


def _plan_shards(items: list[tuple[str, _Info]], shard_size: int) -> list[list[tuple[str, _Info]]]:
    shards: list[list[tuple[str, _Info]]] = [[]]
    size = 0
    for name, info in items:
        if shards[-1] and size + info.nbytes > shard_size:
            shards.append([])
            size = 0
        shards[-1].append((name, info))
        size += info.nbytes
    return shards


def parse_size(size: int | str) -> int:
    """``2GB``/``500MB``/``5e9``/int → bytes (decimal units, as mergekit's ``--out-shard-size``)."""
    if isinstance(size, (int, float)):
        value = int(size)
    else:
        s = str(size).strip().upper().replace("IB", "B")
        units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "K": 10**3, "M": 10**6, "G": 10**9, "B": 1}
        for unit, mult in units.items():
            if s.endswith(unit):
                try:
                    value = int(float(s[: -len(unit)]) * mult)
                except ValueError:
                    raise ConfigError(f"cannot parse shard size {size!r}") from None
                break
        else:
            try:
                value = int(float(s))
            except ValueError:
                raise ConfigError(f"cannot parse shard size {size!r}") from None
    if value <= 0:
        raise ConfigError(f"shard size must be positive, got {size!r}")
    return value


# ----------------------------------------------------------------------------------------- merging
@dataclass
class StreamMergeResult:
    """What :func:`stream_merge` wrote."""

    path: Path
    shards: list[str]
    n_tensors: int
    total_bytes: int
    passes: int
    seconds: float
    meta: dict[str, Any] = field(default_factory=dict)


def stream_merge(base: str | os.PathLike, models: Sequence[str | os.PathLike], out: str | os.PathLike,
                 method: str = "task_arithmetic", *, weights: Sequence[float] | None = None,
                 lam: float | Sequence[float] | None = None, k: float = 0.2, scope: str = "per_tensor",
                 agg: str = "mean", tie_break: str = "majority", p: float = 0.9, seed: int = 0,
                 exclude: Sequence[str] = (), tied: dict[str, str] | None = None,
                 shard_size: int | str = DEFAULT_SHARD_SIZE, warn_above: float | None = 0.005,
                 progress: Callable[[str, int, int], None] | None = None) -> StreamMergeResult:
    """Merge full checkpoints ``models`` (relative to ``base``) into ``out`` without loading them whole.

    Parameters
    ----------
    base : the pre-trained checkpoint θ0 (file or directory).
    models : the fine-tuned checkpoints θ_t (at least one).
    out : output directory (replaced atomically).
    method : ``average`` | ``task_arithmetic`` | ``ties`` | ``dare_linear`` | ``dare_ties``.
    weights : ``average`` weights (normalised; default uniform).
    lam : λ (task arithmetic / DARE-linear: default 1.0, per model allowed; TIES: default by ``agg``).
    k, scope, agg, tie_break : TIES options (see :func:`~transferkit.merge.ties`); ``scope`` defaults
        to ``per_tensor`` here (one pass); ``global`` runs the exact multi-pass threshold search.
    p, seed, warn_above : DARE options (see :func:`~transferkit.merge.dare`).
    exclude : tensor names / prefixes (ending in ``.``) copied from the base.
    tied : ``{alias: source}`` for checkpoints that store a tied tensor under both names.
    shard_size : maximum output shard size (bytes or ``"2GB"``).
    progress : optional ``callback(stage, done, total)``.
    """
    t0 = time.perf_counter()
    method = _ALIASES.get(method, method)
    if method not in METHODS:
        raise ConfigError(f"stream_merge: method must be one of {', '.join(METHODS)}, got {method!r}")
    models = list(models)
    if not models:
        raise ConfigError("stream_merge needs at least one model checkpoint")
    T = len(models)
    params: dict[str, Any] = {"method": method, "n_models": T}
    if method == "average":
        w = as_weights(weights, T, "average", 1.0)
        if sum(w) == 0:
            raise ConfigError("average: the weights sum to 0")
        coefs = [x / sum(w) for x in w]
        params["weights"] = coefs
    elif method in ("task_arithmetic", "dare_linear"):
        coefs = as_weights(1.0 if lam is None else lam, T, method, 1.0)
        params["lam"] = coefs if isinstance(lam, Sequence) else coefs[0]
    else:
        coefs = []
        scope, lam = check_ties_options(k, scope, agg, tie_break, lam)
        params.update(k=float(k), lam=lam, trim_scope=scope, aggregate=agg, tie_break=tie_break)
    dare = method.startswith("dare")
    if dare:
        if not (isinstance(p, (int, float)) and 0 <= p < 1):
            raise ConfigError(f"dare: drop probability p must be in [0, 1), got {p!r}")
        params.update(dare_p=float(p), dare_seed=int(seed))
    shard_bytes = parse_size(shard_size)

    base_ck = Checkpoint(base)
    cks = [Checkpoint(m) for m in models]
    tied = dict(tied or {})
    for alias, source in tied.items():
        if source not in base_ck.info:
            raise ConfigError(f"tied: source tensor {source!r} (of {alias!r}) is not in the base checkpoint")
        if alias in base_ck.info and base_ck.info[alias].shape != base_ck.info[source].shape:
            raise ConfigError(f"tied: {alias!r} and {source!r} have different shapes in the base")
    exclude = tuple(exclude)
    skipped = _partial_buffers(base_ck, cks)
    optional = set(tied) | skipped | {n for n in base_ck.info if _excluded(n, exclude)}
    _check_compatible(base_ck, cks, models, optional)

    names = [n for n in base_ck.info if n not in tied and n not in skipped]
    names.sort()
    merged_names = [n for n in names if base_ck.info[n].is_float and not _excluded(n, exclude)]
    merged_set = set(merged_names)
    cdtype = torch.float32
    for ck in [base_ck, *cks]:
        for n in merged_names:
            if n in ck.info:
                cdtype = torch.promote_types(cdtype, ck.info[n].torch_dtype)
    params["compute_dtype"] = str(cdtype).replace("torch.", "")

    # write order: each tied alias right after its source
    aliases_of: dict[str, list[str]] = {}
    for alias, source in tied.items():
        if alias in base_ck.info:
            aliases_of.setdefault(source, []).append(alias)
    items: list[tuple[str, _Info]] = []
    for n in names:
        items.append((n, base_ck.info[n]))
        items += [(a, base_ck.info[a]) for a in sorted(aliases_of.get(n, []))]
    shards = _plan_shards(items, shard_bytes)
    file_meta = {"format": "pt"}
    file_meta.update(base_ck.tied())

    stats = {"abs_sum": [0.0] * T, "n": [0] * T}

    def taus(name: str, record: bool = False) -> Iterator[torch.Tensor]:
        """τ_t for each model in the compute dtype (DARE applied), one at a time.

        ``record`` accumulates the mean |τ| statistics of the DARE large-delta warning.
        """
        b = base_ck.get(name).to(cdtype)
        for i, ck in enumerate(cks):
            tau = _sub_(ck.get(name), b, cdtype)
            if dare:
                if record and bool((tau != 0).any()):
                    stats["abs_sum"][i] += float(tau.abs().double().sum())
                    stats["n"][i] += tau.numel()
                tau = drop_and_rescale(tau, float(p), _generator(seed + i, name, tau.device))
            yield tau
            del tau
        del b

    thresholds: list[torch.Tensor] | None = None
    kept = torch.zeros(T)
    total_d = 0
    passes = 1
    if method in ("ties", "dare_ties") and scope == "global":
        thresholds, total_d, n_count = _global_thresholds(merged_names, taus, T, float(k), cdtype, progress)
        passes += n_count

    fill_box = {"fill": 1.0}

    def merge_one(name: str) -> torch.Tensor:
        nonlocal total_d
        if method in ("average", "task_arithmetic", "dare_linear"):
            acc = None
            for c, tau in zip(coefs, taus(name, record=True)):
                term = tau.mul_(c)  # in place, same bits as c * τ; summed in the in-memory order
                acc = term if acc is None else acc.add_(term)
                del tau, term
            return acc
        rows = [t.reshape(-1) for t in taus(name, record=True)]
        shape = base_ck.info[name].shape
        if not any(bool((r != 0).any()) for r in rows):
            return torch.zeros(shape, dtype=cdtype)  # absent from every Delta in memory: left at θ0
        if thresholds is None:
            total_d += rows[0].numel()
        out, kept_t, g_sum, n_amb = _ties_tensor(rows, float(k), thresholds, tie_break, agg, lam,
                                                 None if thresholds is None else fill_box["fill"])
        kept.add_(kept_t)
        gsum[0] += g_sum
        ambiguous[0] += n_amb
        return out.reshape(shape)

    gsum, ambiguous = [0.0], [0]
    out = Path(out)
    with atomic_path(out) as tmp:
        tmp.mkdir()
        writer = _write_pass(tmp, shards, file_meta, items, base_ck, tied, merged_set, merge_one, progress)
        if (thresholds is not None and tie_break == "majority" and ambiguous[0] > 0
                and gsum[0] < 0):  # the global majority fill is −1, not the +1 assumed: redo
            fill_box["fill"] = -1.0
            kept.zero_()
            gsum[0], ambiguous[0] = 0.0, 0
            stats["abs_sum"], stats["n"] = [0.0] * T, [0] * T
            for f in tmp.iterdir():
                f.unlink()
            writer = _write_pass(tmp, shards, file_meta, items, base_ck, tied, merged_set, merge_one, progress)
            passes += 1
        if method in ("ties", "dare_ties"):
            params["kept_fraction"] = [float(x) / total_d if total_d else 0.0 for x in kept]
            if thresholds is not None:
                params["global_fill_sign"] = fill_box["fill"]
        params.update(excluded=sorted(n for n in names if n not in merged_set and base_ck.info[n].is_float),
                      copied_from_base=sorted(n for n in names if not base_ck.info[n].is_float),
                      skipped_buffers=sorted(skipped),
                      tied=dict(sorted({**tied, **base_ck.tied()}.items())), passes=passes)
        if dare:
            params["mean_abs_delta"] = [s / n if n else 0.0 for s, n in zip(stats["abs_sum"], stats["n"])]
        side = _copy_hf_files(base, models, tmp)
        if side:
            params["copied_files"] = side
        index = writer.index({"transferkit_merge": params})
        (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    if dare and warn_above is not None:
        for i, mean_abs in enumerate(params["mean_abs_delta"]):
            if mean_abs > warn_above:
                warnings.warn(f"DARE on large deltas (model {i}: mean |δ| = {mean_abs:.3g} > {warn_above}): random "
                              "dropping is only harmless for small deltas (≲ 0.005); expect degradation",
                              LargeDeltaWarning, stacklevel=2)
    return StreamMergeResult(out, writer.names, len(items), sum(i.nbytes for _, i in items), passes,
                             time.perf_counter() - t0, params)


CHUNK = 1 << 16  # columns per block of the element-wise TIES steps (bounds the temporaries)


def _ties_tensor(rows: list[torch.Tensor], k: float, thresholds: list[torch.Tensor] | None, tie_break: str,
                 agg: str, lam: float, fill: float | None) -> tuple[torch.Tensor, torch.Tensor, float, int]:
    """TIES on one tensor given as T flat rows, in column blocks; same bits as :func:`ties`.

    ``thresholds`` None: per-tensor trim (threshold = the in-memory ``trim_mask``'s kthvalue, per row)
    and per-tensor majority fill; else the global thresholds and the given global ``fill``.
    Returns (merged flat tensor, kept count per task, Σ sign(mass), #zero-mass coordinates that a
    fill decides).
    """
    T, n = len(rows), rows[0].numel()
    dtype = rows[0].dtype
    if n == 0:
        return torch.zeros(0, dtype=dtype), torch.zeros(T), 0.0, 0
    if thresholds is None:
        n_keep = min(n, max(1, math.ceil(k * n - 1e-9)))
        thr = torch.stack([_kth_smallest_abs(r, n - n_keep + 1) for r in rows]).unsqueeze(1)
    else:
        thr = torch.stack(thresholds).to(dtype).unsqueeze(1)

    def trimmed(s: int) -> tuple[torch.Tensor, torch.Tensor]:
        blk = torch.stack([r[s:s + CHUNK] for r in rows])
        m = (blk.abs() >= thr) & (blk != 0)
        return torch.where(m, blk, torch.zeros_like(blk)), m

    kept = torch.zeros(T)
    gamma = torch.empty(n, dtype=torch.int8)  # elected signs, compactly
    n_amb = 0
    for s in range(0, n, CHUNK):
        tr, m = trimmed(s)
        kept += m.sum(dim=1).float()
        g = torch.sign(tr.sum(dim=0))
        n_amb += int(((g == 0) & m.any(dim=0)).sum())
        gamma[s:s + CHUNK] = g.to(torch.int8)
        del tr, m, g
    g_sum = float(gamma.sum(dtype=torch.int64))
    if fill is None:  # per-tensor scope: elect_sign's rule
        fill = 1.0
        if tie_break == "majority" and g_sum < 0:
            fill = -1.0
    if n_amb:
        gamma = torch.where(gamma == 0, torch.tensor(int(fill), dtype=torch.int8), gamma)
    out = torch.empty(n, dtype=dtype)
    for s in range(0, n, CHUNK):
        tr, _ = trimmed(s)
        out[s:s + CHUNK] = lam * disjoint_merge(tr, gamma[s:s + CHUNK].to(dtype), agg)
        del tr
    return out, kept, g_sum, n_amb


def _kth_smallest_abs(row: torch.Tensor, j: int) -> torch.Tensor:
    """The j-th smallest |row| (1-based), the value ``row.abs().kthvalue(j)`` returns.

    Small rows use ``kthvalue``; large ones a chunked radix select over the float bit patterns, which
    needs no full-size temporaries (``kthvalue`` copies the row and allocates int64 indices: ~4× it).
    """
    itype = {torch.float32: torch.int32, torch.float64: torch.int64}.get(row.dtype)
    if row.numel() <= CHUNK or itype is None:
        return row.abs().kthvalue(j).values
    bits = 32 if itype == torch.int32 else 64
    prefix, rank = 0, j
    for level in range(bits // 16):
        shift = bits - 16 * (level + 1)
        hist = torch.zeros(1 << 16, dtype=torch.int64)
        for s in range(0, row.numel(), CHUNK):
            iv = row[s:s + CHUNK].abs().view(itype)
            if level > 0:
                iv = iv[(iv >> (shift + 16)) == prefix]
            hist += torch.bincount(((iv >> shift) & 0xFFFF).long(), minlength=1 << 16)
        prefix, rank = _pick_digit(hist, rank, prefix)
    return _from_bits(prefix, itype, row.dtype)


def _pick_digit(hist: torch.Tensor, rank: int, prefix: int) -> tuple[int, int]:
    """The digit whose bucket holds the rank-th smallest entry; the rank within that bucket."""
    cum = torch.cumsum(hist, 0)
    digit = int(torch.searchsorted(cum, torch.tensor(rank), side="left"))
    below = int(cum[digit - 1]) if digit > 0 else 0
    return (prefix << 16) | digit, rank - below


def _from_bits(v: int, itype: torch.dtype, dtype: torch.dtype) -> torch.Tensor:
    bits = 32 if itype == torch.int32 else 64
    if v >= 1 << (bits - 1):
        v -= 1 << bits
    return torch.tensor([v], dtype=itype).view(dtype)[0]


def _sub_(x: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x.to(dtype) − b, in place when the cast already made a fresh tensor of that dtype."""
    x = x.to(dtype)
    return x.sub_(b)


def _write_pass(folder, shards, file_meta, items, base_ck, tied, merged_set, merge_one, progress) -> _ShardWriter:
    writer = _ShardWriter(folder, shards, file_meta)
    sources = set(tied.values())
    source_value = None  # the merged source of the tied aliases written right after it
    try:
        for i, (name, info) in enumerate(items):
            if name in tied:
                value = source_value.to(info.torch_dtype)
            else:
                if name in merged_set:
                    b = base_ck.get(name)
                    delta = merge_one(name)
                    value = delta.add_(b.to(delta.dtype)).to(info.torch_dtype)  # θ0 + δ (same bits)
                    del b, delta
                else:
                    value = base_ck.get(name)
                source_value = value if name in sources else None
            writer.write(name, value)
            del value
            if progress is not None:
                progress("write", i + 1, len(items))
        writer.close()
    except BaseException:
        writer.abort()
        raise
    return writer


def _global_thresholds(names: list[str], taus: Callable[[str], Iterator[torch.Tensor]], T: int, k: float,
                       cdtype: torch.dtype, progress) -> tuple[list[torch.Tensor], int, int]:
    """Exact per-task global top-k thresholds of |τ_t| by radix select over the float bit patterns."""
    itype = {torch.float32: torch.int32, torch.float64: torch.int64}.get(cdtype)
    if itype is None:
        raise ConfigError(f"global TIES streaming supports float32/float64 compute, got {cdtype}")
    bits = 32 if itype == torch.int32 else 64
    n_digits = bits // 16
    active: list[str] | None = None
    prefix = [0] * T          # value of the already fixed high digits
    rank = [0] * T            # 1-based rank (ascending) sought within the current prefix
    d = 0
    for level in range(n_digits):
        shift = bits - 16 * (level + 1)
        hist = torch.zeros(T, 1 << 16, dtype=torch.int64)
        todo = names if active is None else active
        seen_active: list[str] = []
        for j, name in enumerate(todo):
            ts = list(taus(name))
            if active is None:
                if not any(bool((t != 0).any()) for t in ts):
                    continue
                seen_active.append(name)
            for t_i, tau in enumerate(ts):
                iv = tau.abs().reshape(-1).view(itype)
                if level > 0:
                    iv = iv[(iv >> (shift + 16)) == prefix[t_i]]
                digit = ((iv >> shift) & 0xFFFF).long()
                hist[t_i] += torch.bincount(digit, minlength=1 << 16)
            del ts
            if progress is not None:
                progress(f"threshold-pass-{level + 1}", j + 1, len(todo))
        if active is None:
            active = seen_active
            d = int(hist[0].sum())  # entries of the tensors some model changes (as in memory)
            if d == 0:
                return [torch.tensor(float("inf"))] * T, 0, 1
            n_keep = min(d, max(1, math.ceil(k * d - 1e-9)))
            rank = [d - n_keep + 1] * T
        for t_i in range(T):
            prefix[t_i], rank[t_i] = _pick_digit(hist[t_i], rank[t_i], prefix[t_i])
    return [_from_bits(v, itype, cdtype) for v in prefix], d, n_digits


_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".gguf", ".index.json")


def _copy_hf_files(base, models: Sequence, out: Path) -> dict[str, list[str]] | None:
    """Copy the non-weight files of the HF directory of ``base`` (else of the first model) into ``out``."""
    import shutil

    for src in [Path(base), *(Path(m) for m in models[:1])]:
        if src.is_dir() and (src / "config.json").is_file():
            copied = []
            for f in sorted(src.iterdir()):
                if f.is_file() and not f.name.startswith(".") and not f.name.endswith(_WEIGHT_SUFFIXES) \
                        and not (out / f.name).exists():
                    shutil.copy2(f, out / f.name)
                    copied.append(f.name)
            return {"from": str(src), "files": copied}
    return None


def _partial_buffers(base: Checkpoint, cks: list[Checkpoint]) -> set[str]:
    """Integer/bool tensors that some input lacks (non-persistent buffers saved by some versions only)."""
    everyone = [base, *cks]
    names = set().union(*(ck.info for ck in everyone))
    out = set()
    for n in names:
        infos = [ck.info[n] for ck in everyone if n in ck.info]
        if len(infos) < len(everyone) and not any(i.is_float for i in infos):
            out.add(n)
    return out


def _check_compatible(base: Checkpoint, cks: list[Checkpoint], paths: Sequence, optional: set[str]) -> None:
    """Same tensor names and shapes everywhere; else name the first.

    ``optional`` names are not compared (tied aliases, skipped buffers, excluded tensors of the base,
    which are copied from it) and may be missing from the models.
    """
    want = {n: i for n, i in base.info.items() if n not in optional}
    for ck, path in zip(cks, paths):
        have = {n: i for n, i in ck.info.items() if n not in optional}
        for name in sorted(set(want) | set(have)):
            if name not in have:
                raise ConfigError(f"incompatible checkpoints: tensor {name!r} is in the base but not in {path} "
                                  "(exclude it to keep the base's)")
            if name not in want:
                raise ConfigError(f"incompatible checkpoints: tensor {name!r} is in {path} but not in the base")
            if have[name].shape != want[name].shape:
                raise ConfigError(f"incompatible checkpoints: tensor {name!r} has shape {list(have[name].shape)} in "
                                  f"{path} but {list(want[name].shape)} in the base")
            if have[name].is_float != want[name].is_float:
                raise ConfigError(f"incompatible checkpoints: tensor {name!r} is {have[name].dtype} in {path} but "
                                  f"{want[name].dtype} in the base")


def load_merged(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a merged (sharded) output folder back into one state dict (for tests and small models)."""
    from safetensors.torch import load_file

    ck = Checkpoint(path)
    out: dict[str, torch.Tensor] = {}
    for f in dict.fromkeys(ck.file_of.values()):
        out.update(load_file(str(f)))
    return out


__all__ = ["stream_merge", "StreamMergeResult", "Checkpoint", "load_merged", "parse_size", "METHODS"]
