"""Out-of-core merge: equals the in-memory merges bit for bit, shards/index, dtypes, ties, errors, memory."""

import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file, save_model

from transferkit.delta import from_states
from transferkit.errors import ConfigError, ModelError
from transferkit.merge import average, dare_merge, task_arithmetic, ties
from transferkit.merge.streaming import Checkpoint, load_merged, parse_size, stream_merge


pytestmark = pytest.mark.usefixtures("one_thread")


def _states(n_models=3, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = {
        "emb.weight": torch.randn(20, 8, generator=g),
        "layer.0.weight": torch.randn(8, 8, generator=g),
        "layer.0.bias": torch.randn(8, generator=g),
        "layer.1.weight": torch.randn(6, 8, generator=g),
        "frozen.weight": torch.randn(5, generator=g),       # unchanged by every fine-tune
        "pos_ids": torch.arange(7),                          # integer buffer
        "scalar": torch.tensor(0.5),
    }
    base = {k: v.to(dtype) if v.is_floating_point() else v for k, v in base.items()}
    models = []
    for i in range(n_models):
        m = {}
        for k, v in base.items():
            if not v.is_floating_point() or k == "frozen.weight":
                m[k] = v.clone()
                continue
            scale = 0.01 if k == "emb.weight" else 0.1 * (i + 1)   # tensors of different scales
            m[k] = (v.float() + scale * torch.randn(v.shape, generator=g)).to(dtype)
        m["pos_ids"] = torch.arange(7) + i   # integer buffers are never merged: base is kept
        models.append(m)
    return base, models


def _write(tmp_path, base, models):
    bp = tmp_path / "base.safetensors"
    save_file(base, str(bp))
    paths = []
    for i, m in enumerate(models):
        p = tmp_path / f"ft{i}.safetensors"
        save_file(m, str(p))
        paths.append(p)
    return bp, paths


def _in_memory(base, models, fn, **kw):
    up = lambda s: {k: v.float() if v.is_floating_point() else v for k, v in s.items()}  # noqa: E731
    deltas = [from_states(up(base), up(m), base_name="b") for m in models]
    merged = fn(deltas, **kw)
    out = {}
    for k, v in base.items():
        if k in merged.tensors:
            out[k] = (v.float() + merged.tensors[k]).to(v.dtype)
        else:
            out[k] = v
    return out


def _assert_equal(got, want, exact=True):
    assert set(got) == set(want)
    for k in want:
        assert got[k].dtype == want[k].dtype, k
        if exact:
            assert torch.equal(got[k], want[k]), k
        else:
            assert torch.allclose(got[k].float(), want[k].float(), atol=2e-3, rtol=1e-2), k


CASES = [
    ("average", average, {"weights": [1.0, 2.0, 3.0]}, {"weights": [1.0, 2.0, 3.0]}),
    ("task_arithmetic", task_arithmetic, {"lam": [0.3, 0.5, 0.7]}, {"lam": [0.3, 0.5, 0.7]}),
    ("ties", ties, {"k": 0.3, "scope": "per_tensor"}, {"k": 0.3, "scope": "per_tensor"}),
    ("ties", ties, {"k": 0.2, "scope": "global", "lam": 0.8}, {"k": 0.2, "scope": "global", "lam": 0.8}),
    ("ties", ties, {"k": 0.5, "scope": "global", "agg": "sum"}, {"k": 0.5, "scope": "global", "agg": "sum"}),
    ("dare_linear", dare_merge, {"p": 0.5, "seed": 3, "lam": 0.5},
     {"p": 0.5, "seed": 3, "lam": 0.5, "merge": "task_arithmetic", "warn_above": None}),
    ("dare_ties", dare_merge, {"p": 0.3, "seed": 1, "k": 0.4, "scope": "global"},
     {"p": 0.3, "seed": 1, "k": 0.4, "scope": "global", "merge": "ties", "warn_above": None}),
]


@pytest.mark.parametrize("method,fn,skw,mkw", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_stream_merge_equals_in_memory_bit_for_bit(tmp_path, method, fn, skw, mkw):
    base, models = _states()
    bp, paths = _write(tmp_path, base, models)
    if method.startswith("dare"):
        skw = dict(skw, warn_above=None)
    res = stream_merge(bp, paths, tmp_path / "out", method, **skw)
    want = _in_memory(base, models, fn, **mkw)
    got = load_merged(res.path)
    _assert_equal(got, want, exact=True)
    assert torch.equal(got["pos_ids"], base["pos_ids"]) and torch.equal(got["frozen.weight"], base["frozen.weight"])
    if "scope" in skw:
        assert res.meta["trim_scope"] == skw["scope"]
        assert res.passes == (3 if skw["scope"] == "global" else 1)
        mem = fn([from_states(base, m, base_name="b") for m in models], **mkw)
        assert res.meta["kept_fraction"] == pytest.approx(mem.meta["kept_fraction"])


@pytest.mark.parametrize("scope", ["per_tensor", "global"])
def test_chunked_ties_blocks_give_the_same_bits(tmp_path, monkeypatch, scope):
    import transferkit.merge.streaming as streaming

    monkeypatch.setattr(streaming, "CHUNK", 7)  # 160-entry tensors -> many column blocks
    base, models = _states()
    bp, paths = _write(tmp_path, base, models)
    res = stream_merge(bp, paths, tmp_path / "out", "ties", k=0.3, scope=scope)
    _assert_equal(load_merged(res.path), _in_memory(base, models, ties, k=0.3, scope=scope))


def test_dare_streaming_warns_on_large_deltas(tmp_path):
    from transferkit.merge import LargeDeltaWarning

    base, models = _states(2)
    bp, paths = _write(tmp_path, base, models)
    with pytest.warns(LargeDeltaWarning, match="large deltas") as rec:
        res = stream_merge(bp, paths, tmp_path / "out", "dare_linear", p=0.5)
    assert sorted(str(w.message).split(":")[0] for w in rec) == ["DARE on large deltas (model 0", "DARE on large deltas (model 1"]
    assert res.meta["dare_p"] == 0.5 and len(res.meta["mean_abs_delta"]) == 2


def test_global_ties_majority_fill_redo_matches_in_memory(tmp_path):
    # coordinate 0 of "w": trimmed entries cancel (zero mass) -> filled with the model-wide majority
    # sign, which is negative here: the streaming merge must redo its final pass with fill = -1.
    base = {"w": torch.zeros(6), "v": torch.zeros(4)}
    models = [{"w": torch.tensor([1.0, -2.0, -3.0, -1.0, 0.0, 0.0]), "v": torch.tensor([-1.0, 0.0, -2.0, 0.0])},
              {"w": torch.tensor([-1.0, -1.0, -2.0, 0.0, 0.0, 0.0]), "v": torch.tensor([-2.0, -1.0, 0.0, 0.0])}]
    bp, paths = _write(tmp_path, base, models)
    res = stream_merge(bp, paths, tmp_path / "out", "ties", k=1.0, scope="global")
    want = _in_memory(base, models, ties, k=1.0, scope="global")
    _assert_equal(load_merged(res.path), want)
    assert res.meta["global_fill_sign"] == -1.0 and res.passes == 4
    assert load_merged(res.path)["w"][0] == -1.0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_keep_dtype_and_accumulate_in_fp32(tmp_path, dtype):
    base, models = _states(2, dtype)
    bp, paths = _write(tmp_path, base, models)
    res = stream_merge(bp, paths, tmp_path / "out", "task_arithmetic", lam=0.5)
    assert res.meta["compute_dtype"] == "float32"
    _assert_equal(load_merged(res.path), _in_memory(base, models, task_arithmetic, lam=0.5), exact=False)


def test_shards_and_hf_index(tmp_path):
    base, models = _states(2)
    bp, paths = _write(tmp_path, base, models)
    res = stream_merge(bp, paths, tmp_path / "out", "average", shard_size=700)
    files = sorted(p.name for p in res.path.glob("*.safetensors"))
    assert len(files) > 1 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    index = json.loads((res.path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(base) and set(index["weight_map"].values()) == set(files)
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in base.values())
    assert index["metadata"]["transferkit_merge"]["method"] == "average"
    for f in files:  # every shard is a valid safetensors file on its own, "format": "pt"
        assert load_file(str(res.path / f))
    # a sharded output folder is itself a valid input checkpoint
    again = stream_merge(res.path, [res.path], tmp_path / "again", "average")
    _assert_equal(load_merged(again.path), load_merged(res.path))
    assert parse_size("2GB") == 2 * 10**9 and parse_size("500MB") == 5 * 10**8 and parse_size(1024) == 1024


class _Tied(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(10, 4)
        self.body = torch.nn.Linear(4, 4)
        self.head = torch.nn.Linear(4, 10, bias=False)
        self.head.weight = self.emb.weight


def test_tied_tensors_from_save_model_metadata_and_explicit_aliases(tmp_path):
    torch.manual_seed(0)
    mods = [_Tied() for _ in range(3)]
    for m in mods[1:]:
        m.load_state_dict(mods[0].state_dict())
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.1 * torch.randn_like(p))
    paths = []
    for i, m in enumerate(mods):
        save_model(m, str(tmp_path / f"m{i}.safetensors"))
        paths.append(tmp_path / f"m{i}.safetensors")
    assert Checkpoint(paths[0]).tied()  # one of the two names was dropped and recorded
    res = stream_merge(paths[0], paths[1:], tmp_path / "out", "task_arithmetic", lam=0.5)
    from safetensors.torch import load_model

    merged = _Tied()
    load_model(merged, str(next(res.path.glob("*.safetensors"))))
    assert merged.head.weight.data_ptr() == merged.emb.weight.data_ptr()
    sd0, sd1, sd2 = (m.state_dict() for m in mods)
    want = sd0["emb.weight"] + 0.5 * ((sd1["emb.weight"] - sd0["emb.weight"]) + (sd2["emb.weight"] - sd0["emb.weight"]))
    assert torch.allclose(merged.emb.weight, want)

    # checkpoints storing both names (duplicated): declare the alias; models may omit it
    states = [{k: v.clone() for k, v in m.state_dict().items()} for m in mods]
    save_file(states[0], str(tmp_path / "b.safetensors"))
    save_file(states[1], str(tmp_path / "a.safetensors"))
    states[2].pop("head.weight")
    save_file(states[2], str(tmp_path / "c.safetensors"))
    res = stream_merge(tmp_path / "b.safetensors", [tmp_path / "a.safetensors", tmp_path / "c.safetensors"],
                       tmp_path / "out2", "task_arithmetic", lam=0.5, tied={"head.weight": "emb.weight"})
    got = load_merged(res.path)
    assert torch.equal(got["head.weight"], got["emb.weight"]) and torch.allclose(got["emb.weight"], want)


def test_incompatible_and_corrupt_inputs_fail_cleanly(tmp_path):
    base, models = _states(2)
    bp, paths = _write(tmp_path, base, models)
    out = tmp_path / "out"
    bad = dict(models[1])
    bad["layer.1.weight"] = torch.zeros(7, 8)
    save_file(bad, str(tmp_path / "badshape.safetensors"))
    with pytest.raises(ConfigError, match="'layer.1.weight' has shape"):
        stream_merge(bp, [paths[0], tmp_path / "badshape.safetensors"], out)
    missing = {k: v for k, v in models[1].items() if k != "layer.0.bias"}
    save_file(missing, str(tmp_path / "missing.safetensors"))
    with pytest.raises(ConfigError, match="'layer.0.bias' is in the base but not in"):
        stream_merge(bp, [tmp_path / "missing.safetensors"], out)
    raw = paths[1].read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(raw[: len(raw) - 100])
    with pytest.raises(ModelError, match="cannot read checkpoint"):
        stream_merge(bp, [paths[0], tmp_path / "trunc.safetensors"], out)
    (tmp_path / "junk.safetensors").write_bytes(b"\x00not a safetensors file at all")
    with pytest.raises(ModelError):
        stream_merge(bp, [tmp_path / "junk.safetensors"], out)
    with pytest.raises(ConfigError, match="method"):
        stream_merge(bp, paths, out, "slerp")
    assert not out.exists() and not any(p.name.startswith(".out") for p in tmp_path.iterdir())


_PEAK = textwrap.dedent("""
    import sys, torch
    from pathlib import Path
    from transferkit.merge.streaming import stream_merge
    # VmHWM, not ru_maxrss: ru_maxrss survives fork+exec and would start at the pytest process's peak
    hwm = lambda: int([l.split()[1] for l in open("/proc/self/status") if l.startswith("VmHWM")][0])
    warm = Path(sys.argv[3])  # a tiny merge first: lazy imports and allocator pools count as baseline
    for method in ("ties", "task_arithmetic"):
        stream_merge(warm / "base.safetensors", [warm / f"ft{i}.safetensors" for i in range(3)], warm / method, method)
    peaks = [hwm()]
    for d, method in ((Path(sys.argv[2]), "ties"), (Path(sys.argv[1]), "task_arithmetic")):
        res = stream_merge(d / "base.safetensors", [d / f"ft{i}.safetensors" for i in range(3)], d / method, method,
                           k=0.2, shard_size="40MB")
        peaks.append(hwm())
    print(*peaks)
""")


def _big_checkpoints(folder, n_tensors, shape):
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    base = {f"t{i:02d}": torch.randn(*shape, generator=g) for i in range(n_tensors)}
    save_file(base, str(folder / "base.safetensors"))
    for j in range(3):
        save_file({k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()},
                  str(folder / f"ft{j}.safetensors"))
    return n_tensors * math.prod(shape) * 4 // 1024  # KiB of one checkpoint


def test_peak_memory_of_streaming_merge_in_subprocess(tmp_path):
    # task arithmetic on 4 checkpoints x 64 MB (16 tensors of 4 MB) and TIES (heavier, slower) on
    # 4 x 16 MB (16 x 1 MB): the peak RSS above the interpreter's baseline stays <= 1.5 x one checkpoint
    # (the merge holds a few tensors, never a checkpoint).
    kb64 = _big_checkpoints(tmp_path / "c64", 16, (1024, 1024))
    kb16 = _big_checkpoints(tmp_path / "c16", 16, (512, 512))
    _big_checkpoints(tmp_path / "warm", 2, (16, 16))
    env = dict(os.environ, OMP_NUM_THREADS="1")  # the CPUs are shared: no thread oversubscription
    out = subprocess.run([sys.executable, "-c", _PEAK, str(tmp_path / "c64"), str(tmp_path / "c16"), str(tmp_path / "warm")],
                         capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr
    baseline, after_ties, after_ta = map(int, out.stdout.split())  # high-water marks, TIES first
    assert after_ties - baseline <= 1.5 * kb16, (baseline, after_ties)
    assert after_ta - baseline <= 0.5 * kb64, (baseline, after_ta)
