"""`transferkit merge`: YAML and short form, Delta run folders and safetensors checkpoints, errors."""

import json
from pathlib import Path

import pytest
import torch
import yaml

from _cli import bad as _bad
from _cli import ok as _ok
from transferkit.delta import NEW, Delta, from_states
from transferkit.merge import average, dare_merge, task_arithmetic, ties
from transferkit.merge.command import value_for

@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TRANSFERKIT_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def base_state(tiny_bert_dir):
    from transferkit.zoo import load_model

    zm = load_model(str(tiny_bert_dir))
    clf = zm.classifier(2)
    return {k: v.detach().clone() for k, v in clf.state_dict().items()}


def _run_folder(path: Path, base_state, base_name: str, seed: int, scale: float = 0.01) -> Delta:
    """A `transferkit tune`-shaped run folder with a synthetic task vector and a 2-way head."""
    g = torch.Generator().manual_seed(seed)
    tuned = {k: (v + scale * torch.randn(v.shape, generator=g) if v.is_floating_point() and not k.startswith("head.")
                 else v.clone()) for k, v in base_state.items() if not k.startswith("head.")}
    tuned["head.weight"] = torch.randn(2, base_state["head.weight"].shape[1], generator=g)
    tuned["head.bias"] = torch.zeros(2)
    body = {k: v for k, v in base_state.items() if not k.startswith("head.")}
    delta = from_states(body, tuned, base_name=base_name)
    delta.save(path / "delta")
    return delta


@pytest.fixture()
def runs(tmp_path, base_state, tiny_bert_dir):
    return [(tmp_path / f"run{i}", _run_folder(tmp_path / f"run{i}", base_state, str(tiny_bert_dir), seed=i))
            for i in range(3)]


def _body(d: Delta) -> dict:
    return {k: v for k, v in d.tensors.items() if not k.startswith(NEW)}


def _same(a: dict, b: dict):
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ------------------------------------------------------------------------------ Deltas in memory
def test_short_form_ties_equals_the_library_and_writes_a_report(runs, tiny_bert_dir, tmp_path):
    out = tmp_path / "merged"
    res = _ok(["merge", "--method", "ties", "--base", str(tiny_bert_dir), "--models", ",".join(str(p) for p, _ in runs),
               "--param", "k=0.3", "--param", "scope=per_tensor", "--out", str(out), "--json"])
    report = json.loads(res.stdout)
    assert report["method"] == "ties" and report["n_models"] == 3 and report["output"]["format"] == "delta"
    p = report["parameters"]
    assert p["k"] == 0.3 and p["trim_scope"] == "per_tensor" and p["aggregate"] == "mean" and p["lam"] == 1.0
    assert p["heads_dropped"] == ["new.head.bias", "new.head.weight"]
    assert json.loads((out / "merge.json").read_text())["method"] == "ties"
    merged = Delta.load(out / "delta")
    _same(merged.tensors, ties([d for _, d in runs], k=0.3, scope="per_tensor").tensors)


def test_yaml_mergekit_style_with_weights_and_aliases(runs, tiny_bert_dir, tmp_path):
    cfg = {"merge_method": "linear", "base_model": str(tiny_bert_dir),
           "models": [{"model": str(runs[0][0]), "parameters": {"weight": 3.0}},
                      {"model": str(runs[1][0]), "parameters": {"weight": 1.0}}]}
    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump(cfg))
    _ok(["merge", str(path), "--out", str(tmp_path / "o")])
    merged = Delta.load(tmp_path / "o" / "delta")
    _same(merged.tensors, average([runs[0][1], runs[1][1]], [3.0, 1.0]).tensors)


def test_per_layer_lambda_gradient_and_filters(runs, tmp_path):
    deltas = [d for _, d in runs[:2]]
    cfg = {"merge_method": "task_arithmetic", "models": [str(p) for p, _ in runs[:2]],
           "parameters": {"lambda": [0.0, 1.0]}}
    path = tmp_path / "ta.yaml"
    path.write_text(yaml.safe_dump(cfg))
    report = json.loads(_ok(["merge", str(path), "--out", str(tmp_path / "o"), "--json"]).stdout)
    assert report["parameters"]["per_layer"] is True and report["parameters"]["n_layers"] == 2
    merged = Delta.load(tmp_path / "o" / "delta").tensors
    full = task_arithmetic(deltas, 1.0).tensors
    l0 = "backbone.model.encoder.layer.0.attention.self.query.weight"
    l1 = "backbone.model.encoder.layer.1.attention.self.query.weight"
    emb = "backbone.model.embeddings.word_embeddings.weight"
    assert torch.count_nonzero(merged[l0]) == 0 and torch.count_nonzero(merged[emb]) == 0   # λ = 0 at layer 0, embeddings
    assert torch.allclose(merged[l1], full[l1])                                                # λ = 1 at the last layer
    # filters: first match wins, entry without filter is the default
    spec = [{"filter": "attention", "value": 0.5}, {"value": 2.0}]
    assert value_for(spec, l0, 2) == 0.5 and value_for(spec, emb, 2) == 2.0
    assert value_for([0.0, 1.0, 0.0], "x.layer.2.y", 5) == 1.0 and value_for([0, 1], "x.layer.1.w", 5) == 0.25


@pytest.mark.filterwarnings("ignore:DARE on large deltas")
def test_dare_density_p0_is_task_arithmetic_and_negation(runs, tmp_path):
    models = ",".join(str(p) for p, _ in runs[:2])
    _ok(["merge", "--method", "dare_linear", "--models", models, "--param", "density=1.0", "--param", "lambda=0.5",
         "--out", str(tmp_path / "d")])
    _same(Delta.load(tmp_path / "d" / "delta").tensors, task_arithmetic([d for _, d in runs[:2]], 0.5).tensors)
    report = json.loads(_ok(["merge", "--method", "dare_ties", "--models", models, "--param", "p=0.5",
                             "--param", "seed=3", "--out", str(tmp_path / "dt"), "--json"]).stdout)
    assert report["parameters"]["dare_p"] == 0.5 and report["parameters"]["k"] == 1.0   # no extra trim by default
    _same(Delta.load(tmp_path / "dt" / "delta").tensors,
          dare_merge([d for _, d in runs[:2]], 0.5, 3, merge="ties", k=1.0).tensors)
    _ok(["merge", "--method", "negate", "--models", str(runs[0][0]), "--param", "lambda=0.5", "--out", str(tmp_path / "n")])
    neg = Delta.load(tmp_path / "n" / "delta").tensors
    for k, v in _body(runs[0][1]).items():
        assert torch.allclose(neg[k], -0.5 * v)


def test_tune_then_merge_with_evaluate_and_fisher(tiny_bert_dir, sentiment_csv, tmp_path):
    for i in range(2):
        _ok(["tune", "--data", str(sentiment_csv), "--model", str(tiny_bert_dir), "--method", "full", "--epochs", "1",
             "--seed", str(i), "--out", str(tmp_path / f"t{i}")])
    t0, t1, data = str(tmp_path / "t0"), str(tmp_path / "t1"), str(sentiment_csv)
    # one model, weight 1: the merged body is the fine-tuned body, so normalized accuracy is exactly 1
    rep = json.loads(_ok(["merge", "--method", "average", "--models", t0, "--evaluate", data, "--out",
                          str(tmp_path / "m1"), "--json"]).stdout)
    row = rep["evaluation"]["tasks"][0]
    assert row["merged"] == row["individual"] and rep["evaluation"]["normalized_avg"] == 1.0
    rep = json.loads(_ok(["merge", "--method", "fisher", "--models", f"{t0},{t1}", "--evaluate", f"{data},{data}",
                          "--param", "n_examples=6", "--out", str(tmp_path / "mf"), "--json"]).stdout)
    assert rep["parameters"]["method"] == "fisher" and len(rep["evaluation"]["tasks"]) == 2
    assert 0 <= rep["evaluation"]["merged_avg"] <= 1
    res = _ok(["merge", "--method", "ties", "--models", f"{t0},{t1}", "--evaluate", f"{data},{data}",
               "--out", str(tmp_path / "mt")])
    assert "normalized" in res.stdout


# ------------------------------------------------------------------------------ checkpoints (streaming)
def _ckpts(tmp_path, shapes_b=None):
    from safetensors.torch import save_file

    torch.manual_seed(0)

    def state(shift, shape=(8, 4)):
        return {"fc1.weight": torch.randn(*shape) * 0.1 + shift, "fc1.bias": torch.randn(shape[0]),
                "bn.running_mean": torch.randn(shape[0]), "bn.num_batches_tracked": torch.tensor(3),
                "fc2.weight": torch.randn(2, shape[0])}
    base = state(0.0)
    paths = []
    for i, st in enumerate([base, {k: (v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v)
                                   for k, v in base.items()},
                            {k: (v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v)
                             for k, v in base.items()}]):
        p = tmp_path / f"ck{i}.safetensors"
        save_file(st, str(p))
        paths.append(p)
    return paths, base


def test_checkpoints_stream_bit_exact_with_in_memory(tmp_path):
    from safetensors.torch import load_file

    from transferkit.merge.streaming import load_merged

    (base, a, b), base_state = _ckpts(tmp_path)
    cfg = {"merge_method": "ties", "base_model": str(base), "models": [{"model": str(a)}, {"model": str(b)}],
           "parameters": {"density": 0.5, "scope": "global", "lambda": 0.8}}
    path = tmp_path / "ck.yaml"
    path.write_text(yaml.safe_dump(cfg))
    rep = json.loads(_ok(["merge", str(path), "--out", str(tmp_path / "o"), "--json"]).stdout)
    assert rep["output"]["format"] == "safetensors shards" and (tmp_path / "o" / "merge.json").is_file()
    merged = load_merged(tmp_path / "o")
    deltas = [from_states(base_state, load_file(str(p)), base_name="b") for p in (a, b)]
    ref = ties(deltas, k=0.5, lam=0.8, scope="global")
    for k, v in base_state.items():
        want = (v + ref.tensors[k]) if k in ref.tensors else v
        assert torch.equal(merged[k], want.to(v.dtype)), k


def test_incompatible_checkpoints_name_the_first_tensor_and_leave_nothing(tmp_path):
    from safetensors.torch import load_file, save_file

    (base, a, b), _ = _ckpts(tmp_path)
    st = load_file(str(b))
    st["fc2.weight"] = torch.zeros(3, 8)
    save_file(st, str(b))
    out = tmp_path / "o"
    _bad(["merge", "--method", "task_arithmetic", "--base", str(base), "--models", f"{a},{b}", "--out", str(out)],
         "'fc2.weight'")
    assert not out.exists()


def test_corrupt_or_truncated_safetensors_is_a_clear_error(tmp_path):
    (base, a, b), _ = _ckpts(tmp_path)
    raw = b.read_bytes()
    b.write_bytes(raw[: len(raw) // 2])
    out = tmp_path / "o"
    err = _bad(["merge", "--method", "average", "--base", str(base), "--models", f"{a},{b}", "--out", str(out)],
               "cannot read")
    assert str(b.name) in err and not out.exists()
    assert not any(p.name.startswith(".o.") for p in tmp_path.iterdir())   # no temporary left either


def test_bad_inputs_are_one_line_errors(runs, tmp_path, tiny_bert_dir):
    models = ",".join(str(p) for p, _ in runs[:2])
    out = str(tmp_path / "o")
    _bad(["merge", "--method", "slerpy", "--models", models, "--out", out], "unknown merge method 'slerpy'")
    _bad(["merge", "--method", "ties", "--models", models, "--param", "rescale=true", "--out", out],
         "unknown parameter 'rescale' for merge method 'ties'")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"merge_method": "ties", "models": [str(runs[0][0])], "tokenizer_source": "base"}))
    _bad(["merge", str(cfg), "--out", out], "unknown key 'tokenizer_source'")
    _bad(["merge", "--method", "ties", "--base", "other-model", "--models", models, "--out", out], "not from the base")
    _bad(["merge", "--method", "ties", "--models", f"{models},{tmp_path / 'missing'}", "--out", out], "model not found")
    _bad(["merge", "--method", "fisher", "--models", models, "--out", out], "fisher needs each model's training data")
    _bad(["merge", "--method", "ties", "--models", models], "--out")
    assert not Path(out).exists()
    other = _run_folder(tmp_path / "other", {"backbone.w": torch.zeros(3), "head.weight": torch.zeros(2, 4),
                                             "head.bias": torch.zeros(2)}, "another-base", 0)
    assert other.base == "another-base"
    _bad(["merge", "--method", "average", "--models", f"{runs[0][0]},{tmp_path / 'other'}", "--out", out],
         "incompatible models")


def test_list_methods_json():
    methods = json.loads(_ok(["merge", "--list", "--json"]).stdout)
    assert {"average", "task_arithmetic", "ties", "dare_linear", "dare_ties", "fisher", "lora"} <= set(methods)
