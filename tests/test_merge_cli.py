"""`transferkit merge`: YAML and short form, Delta run folders and safetensors checkpoints, errors."""

import json
from pathlib import Path

import pytest
import torch
import yaml

from _cli import bad as _bad
from _cli import ok as _ok
from transferkit import registry
from transferkit.data.split import make_split
from transferkit.delta import NEW, Delta, from_states, to_dense
from transferkit.merge import average, dare_merge, task_arithmetic, ties
from transferkit.merge.layers import value_for

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


def _record_split(run: Path, data, seed: int) -> dict:
    """Make sure the run's Delta records the split `transferkit tune --seed SEED` made (write it if tune does not)."""
    d = Delta.load(run / "delta")
    if "split" not in d.meta:
        d.meta["split"] = make_split(data, seed=seed, sample_seed=seed)[2].to_dict()
        d.save(run / "delta")
    return d.meta["split"]


def test_tune_then_merge_with_evaluate_and_fisher(tiny_bert_dir, sentiment_csv, tmp_path):
    for i in range(2):
        _ok(["tune", "--data", str(sentiment_csv), "--model", str(tiny_bert_dir), "--method", "full", "--epochs", "1",
             "--seed", str(i), "--out", str(tmp_path / f"t{i}")])
        _record_split(tmp_path / f"t{i}", sentiment_csv, i)
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
         "unknown option 'rescale' for merge method 'ties'")
    _bad(["merge", "--method", "ties", "--models", models, "--param", "k=1.5", "--out", out],
         "option k of merge method 'ties' must be")                       # ranges come from the registry
    _bad(["merge", "--method", "ties", "--models", models, "--param", "k=0.2", "--param", "density=0.3",
          "--out", out], "either k or density")
    _bad(["merge", "--method", "uniform_soup", "--models", models, "--weights", "1,2", "--out", out],
         "takes no per-model weights")
    _bad(["merge", "--method", "negation", "--models", models, "--out", out], "exactly 1 model")
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
    assert list(methods) == list(registry.methods("merge"))               # --list is the registry
    assert methods["ties"] == json.loads(json.dumps(registry.describe(registry.get("merge", "ties"))))
    assert {o["name"] for o in methods["ties"]["options"]} >= {"k", "density", "lam", "scope", "agg", "exclude"}
    text = _ok(["merge", "--list"]).stdout
    assert all(name in text for name in methods) and "Yadav" in text


def test_registry_info_replaces_the_method_tables():
    from transferkit.merge.streaming import METHODS as STREAM_METHODS

    ms = registry.methods("merge")
    assert [n for n, m in ms.items() if m.info["streamable"]] == ["average", "task_arithmetic", "ties",
                                                                   "dare_linear", "dare_ties"]
    assert set(n for n, m in ms.items() if m.info["streamable"]) == set(STREAM_METHODS)   # what stream_merge runs
    assert {n for n, m in ms.items() if m.info["per_layer"]} == {"average", "task_arithmetic", "ties", "dare_linear",
                                                                  "dare_ties", "negation"}
    # one options shape grown by inheritance (mergekit's generalized task arithmetic): no field written twice
    from transferkit.merge import DareOptions, DareTiesOptions, TaskArithmeticOptions, TiesOptions

    assert issubclass(TiesOptions, TaskArithmeticOptions) and issubclass(DareTiesOptions, DareOptions)
    assert ms["dare_ties"].options is DareTiesOptions and ms["ties"].options is TiesOptions
    # option defaults stay as they were
    assert ms["ties"].parse({}).kwargs() == {"exclude": (), "lam": 1.0, "k": 0.2, "agg": "mean", "scope": "global",
                                             "tie_break": "majority"}
    assert ms["ties"].parse({"normalize": False}).kwargs(checkpoint=True)["lam"] == 0.3
    assert ms["dare_ties"].parse({"density": 0.25}).kwargs() == {
        "exclude": (), "lam": 1.0, "k": 1.0, "agg": "mean", "scope": "global", "tie_break": "majority", "p": 0.75,
        "seed": 0}
    assert ms["dare_linear"].parse({}).kwargs() == {"exclude": (), "lam": 1.0, "p": 0.9, "seed": 0}
    assert ms["fisher"].defaults() == {"exclude": [], "n_examples": 256, "batch_size": 4, "empirical": False,
                                            "floor": 1e-6, "favor_target": True, "normalize": True}


# ------------------------------------------------------------------------------ recorded splits (issue 13)
@pytest.fixture(scope="module")
def unique_csv(tmp_path_factory):
    """50 two-class texts, every one different (so a scored item can be told apart from a training one)."""
    rows = ["text,label"] + [f"{'good great' if i % 2 else 'bad awful'} movie number{i},{'pos' if i % 2 else 'neg'}"
                             for i in range(50)]
    path = tmp_path_factory.mktemp("unique") / "unique.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


def _spy_evaluate(monkeypatch) -> list:
    """Record the items every evaluation scores (and skip the forward passes)."""
    import transferkit.engine

    scored = []

    def fake(model, data, **kw):
        scored.append([str(x) for x in data.X])
        return {"accuracy": 0.5, "loss": 0.0, "n": len(data)}

    monkeypatch.setattr(transferkit.engine, "evaluate", fake)
    return scored


def test_merge_evaluate_scores_exactly_the_recorded_held_out_items(tiny_bert_dir, unique_csv, tmp_path, monkeypatch):
    """Defect 1 of issue 13: merge --evaluate re-split the data on its own terms (seed 0 here) and scored
    items the tune run had trained on. It must score exactly the run's recorded held-out items."""
    from transferkit.tune import tune
    from transferkit.zoo import load_model

    train, test, record = make_split(unique_csv, seed=1)          # the tune run's split (seed 1)
    run = tmp_path / "run"
    tune(load_model(str(tiny_bert_dir)), train, test, method="full", config={"epochs": 1, "seed": 1},
         out_dir=run, progress=False)
    d = Delta.load(run / "delta")
    d.meta["split"] = record.to_dict()
    d.save(run / "delta")
    scored = _spy_evaluate(monkeypatch)
    rep = json.loads(_ok(["merge", "--method", "average", "--models", run, "--evaluate", unique_csv,
                          "--out", tmp_path / "m", "--json"]).stdout)
    held, trained = {str(x) for x in test.X}, {str(x) for x in train.X}
    assert len(scored) == 2                                       # the merged model and the individual one
    for items in scored:
        assert sorted(items) == sorted(held)
        assert not set(items) & trained
    row = rep["evaluation"]["tasks"][0]
    assert row["n"] == len(record.test_ids) == len(held)
    assert row["test_sha256"] == record.test_sha256


def test_merge_evaluate_refuses_other_or_changed_data_and_unrecorded_runs(runs, unique_csv, sentiment_csv, tmp_path):
    data = tmp_path / "data.csv"
    data.write_text(unique_csv.read_text())
    split = make_split(data, seed=1)[2].to_dict()
    recorded = []
    for path, d in runs[:2]:
        d.meta["split"] = split
        d.save(path / "delta")
        recorded.append(str(path))
    out = tmp_path / "o"
    err = _bad(["merge", "--method", "ties", "--models", ",".join(recorded), "--evaluate", f"{data},{sentiment_csv}",
                "--out", out], "was trained on")
    assert str(sentiment_csv) in err and not out.exists()
    _bad(["merge", "--method", "ties", "--models", f"{recorded[0]},{runs[2][0]}", "--evaluate", f"{data},{data}",
          "--out", out], "records no held-out split")                   # a run from before splits were recorded
    data.write_text(data.read_text().replace("number7,", "number 7,"))   # the data changed since the run
    _bad(["merge", "--method", "ties", "--models", ",".join(recorded), "--evaluate", f"{data},{data}",
          "--out", out], "changed since it was split")
    assert not out.exists()


def test_fisher_uses_only_the_recorded_training_part(runs, unique_csv, tmp_path, monkeypatch):
    import transferkit.merge.tasks as tasks

    train, test, record = make_split(unique_csv, seed=3)
    for path, d in runs[:2]:
        d.meta["split"] = record.to_dict()
        d.save(path / "delta")
    seen = []

    def fake_fishers(deltas, train_sets, base, options, **kw):
        seen.extend(train_sets)
        return [{k: torch.ones_like(v) for k, v in to_dense(d).items()} for d in deltas]

    monkeypatch.setattr(tasks, "task_fishers", fake_fishers)
    rep = json.loads(_ok(["merge", "--method", "fisher", "--models", ",".join(str(p) for p, _ in runs[:2]),
                          "--out", tmp_path / "f", "--json"]).stdout)      # no data given: the recorded data
    assert rep["parameters"]["method"] == "fisher" and len(seen) == 2
    held, trained = {str(x) for x in test.X}, {str(x) for x in train.X}
    for part in seen:
        assert {str(x) for x in part.X} == trained and not {str(x) for x in part.X} & held


def test_python_api_reuses_recorded_splits_or_takes_explicit_data(runs, unique_csv, tiny_bert_dir, tmp_path,
                                                                   monkeypatch):
    import transferkit.merge.tasks as tasks
    from transferkit.errors import DataError
    from transferkit.merge import evaluate_merged, merge_deltas

    train, test, record = make_split(unique_csv, seed=2)
    deltas = [d for _, d in runs[:2]]
    with pytest.raises(DataError, match="records no held-out split.*train_sets"):
        merge_deltas("fisher", deltas)
    for d in deltas:
        d.meta["split"] = record.to_dict()
    seen = []
    monkeypatch.setattr(tasks, "task_fishers", lambda ds, sets, base, opts, **kw: seen.extend(sets) or
                        [{k: torch.ones_like(v) for k, v in to_dense(d).items()} for d in ds])
    merge_deltas("fisher", deltas, {"n_examples": 8})
    assert [sorted(map(str, s.X)) for s in seen] == [sorted(map(str, train.X))] * 2
    merged = merge_deltas("linear", deltas, {}, weights=[1.0, 3.0])        # aliases resolve through the spec
    _same(merged.tensors, average(deltas, [1.0, 3.0]).tensors)
    scored = _spy_evaluate(monkeypatch)
    ev = evaluate_merged(merged, deltas, base=str(tiny_bert_dir))           # tasks=None: the recorded data
    assert [r["test_sha256"] for r in ev["tasks"]] == [record.test_sha256] * 2
    assert all(sorted(s) == sorted(map(str, test.X)) for s in scored)
    other = make_split(unique_csv, seed=5)[1]
    scored.clear()
    ev = evaluate_merged(merged, deltas, base=str(tiny_bert_dir), test_sets=[other, other])   # explicit test sets
    assert ev["split"] == "given test sets" and all(sorted(s) == sorted(map(str, other.X)) for s in scored)
    # YAML `evaluate: true`: each run's recorded data, no dataset named
    cfg = tmp_path / "m.yaml"
    for (path, _), d in zip(runs[:2], deltas):
        d.save(path / "delta")
    cfg.write_text(yaml.safe_dump({"merge_method": "ties", "models": [str(p) for p, _ in runs[:2]],
                                   "evaluate": True}))
    scored.clear()
    rep = json.loads(_ok(["merge", cfg, "--out", tmp_path / "o", "--json"]).stdout)
    assert [t["data"] for t in rep["evaluation"]["tasks"]] == [record.data] * 2 and len(scored) == 4
