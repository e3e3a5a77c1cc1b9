"""Issue 13: every tune method registers once, where it lives, with typed options checked at the entry.

The defect these tests pin: ``tune`` accepted ``r="eight"``, ``alpha=-3``, ``dropout=7`` and failed later
with a Python traceback (or trained), and the string ``"false"`` became True. Now every option is typed
and range-checked before anything runs (ConfigError; on the CLI ``error: …``, exit 2), with a
did-you-mean for a misspelt option or method. Also: the run's train/test split is recorded
(``split.json`` = the Delta's ``meta["split"]``) and ``--resume`` refuses a folder of another split.
"""

import dataclasses
import json

import numpy as np
import pytest
from _cli import bad, ok
from test_tune_common import image_data, image_model

from transferkit import registry
from transferkit.errors import ConfigError, DataError

_PEFT = {"epochs": 3, "batch_size": 16, "weight_decay": 0.01, "scheduler": "linear", "warmup_ratio": 0.1}
_ADAPTER = {"bottleneck": 64, "dropout": 0.0, "init": "zero", "position": "ffn"}
_SIDE = {"r": 96, "layers": "all", "taps": None, "grid": 4, "cache": False}
_SCALEARN = ({"sources": None, "omega_init": 2.0, "omega_std": 0.001, "omega_dropout": 0.3},
             {**_PEFT, "weight_decay": 0.0, "lr": 0.005})
# (options, train) of every method before issue 13 (the README's numbers were measured with them)
DEFAULTS = {
    "linear": ({}, {"epochs": 30, "lr": 0.01, "batch_size": 64, "weight_decay": 0.0001, "scheduler": "cosine"}),
    "full": ({}, {**_PEFT, "lr": 5e-05}),
    "lora": ({"r": 8, "alpha": 16, "dropout": 0.05, "target_modules": None, "use_rslora": False, "use_dora": False,
              "bias": "none"}, {**_PEFT, "lr": 0.002}),
    "ia3": ({"target_modules": None, "feedforward_modules": None}, {**_PEFT, "lr": 0.003}),
    "prefix": ({"num_virtual_tokens": 20, "prefix_projection": False, "encoder_hidden_size": None},
               {**_PEFT, "lr": 0.01}),
    "prompt": ({"num_virtual_tokens": 20, "init": "random"}, {**_PEFT, "lr": 0.03}),
    "bitfit": ({"bias_terms": "all"}, {**_PEFT, "weight_decay": 0.0, "lr": 0.005}),
    "adapter": (_ADAPTER, {**_PEFT, "lr": 0.001}),
    "parallel-adapter": ({**_ADAPTER, "scale": 1.0, "learnable_scale": False}, {**_PEFT, "lr": 0.001}),
    "scaled-parallel-adapter": ({**_ADAPTER, "scale": 4.0, "learnable_scale": False}, {**_PEFT, "lr": 0.001}),
    "mam": ({"prefix_length": 30, "prefix_hidden": 512, "bottleneck": 512, "scale": 4.0, "learnable_scale": False,
             "dropout": 0.0, "init": "zero"}, {**_PEFT, "lr": 0.0001}),
    "unipt": (_SIDE, {**_PEFT, "lr": 0.002}),
    "sherl": ({**_SIDE, "late_layers": 1, "late_tune": "frozen"}, {**_PEFT, "lr": 0.002}),
    "r2": ({**_SIDE, "r": 128, "n_layers": 4, "heads": 4, "dropout": 0.1}, {**_PEFT, "lr": 0.002}),
    "sparse": ({"density": 0.01, "k": None, "full_epochs": None, "full_lr": None, "exclude": [], "domain_mlm": False,
                "domain_data": None, "domain_delta": None, "domain_density": None, "domain_epochs": None,
                "mlm_probability": 0.15}, {**_PEFT, "lr": 0.0005}),
    "scalearn": _SCALEARN,
    "scalearn-uniform": _SCALEARN,
    "scalearn++": _SCALEARN,
    "scalearn-uniform++": _SCALEARN,
    "adapterfusion": ({"sources": None, "temperature": 50.0, "anneal_steps": None},
                      {**_PEFT, "weight_decay": 0.0, "lr": 0.0005}),
    "shared-adapter": ({"tasks": None, "task_per_class": None, "task_name": "task0", "share": "all", "bottleneck": 64,
                        "position": "ffn", "mode": "sequential", "scale": 1.0, "dropout": 0.0, "task_prompts": True},
                       {**_PEFT, "lr": 0.001}),
    "translora": ({"source_model": None, "source_lora": None, "n_seed": 5, "n_synthetic": 200, "pool_factor": 3.0,
                   "filter": True, "threshold": None, "min_keep": None, "discriminator": "lora", "disc_base": "source",
                   "disc_epochs": 5, "augment_ops": None, "max_ops": 2, "temperature": 2.0, "hard_weight": 0.5, "r": 8,
                   "alpha": 16, "dropout": 0.05, "target_modules": None}, {**_PEFT, "lr": 0.001}),
}
HOME = {"baselines": ["linear", "full"], "peft_methods": ["lora", "ia3", "prefix", "prompt"], "bitfit": ["bitfit"],
        "adapters": ["adapter", "parallel-adapter", "scaled-parallel-adapter", "mam"],
        "side": ["unipt", "sherl", "r2"], "sparse": ["sparse"],
        "scalearn": ["scalearn", "scalearn-uniform", "scalearn++", "scalearn-uniform++", "adapterfusion",
                     "shared-adapter"], "translora": ["translora"]}


# ------------------------------------------------------------------------------------------- registry
def test_every_method_registers_once_where_it_lives_with_todays_defaults():
    methods = registry.methods("tune")
    assert list(methods) == list(DEFAULTS)  # complete, in the listing's order
    for module, names in HOME.items():
        for name in names:
            m = methods[name]
            assert m.module == f"transferkit.tune.{module}", name  # dispatch: registry.get("tune", name).fn
            options, train = DEFAULTS[name]
            assert m.defaults() == options and m.info["train"] == train, name
            assert m.info["family"] in ("baseline", "peft", "native") and set(m.info["modality"]) <= {"image", "text"}
            assert (m.options is None) == (not options), name
    doc = json.loads(json.dumps({n: registry.describe(m) for n, m in methods.items()}))  # JSON-able as is
    for name, d in doc.items():
        assert {o["name"]: o["default"] for o in d["options"]} == DEFAULTS[name][0], name
        assert all(o["type"] for o in d["options"]), name
    lora = {o["name"]: o for o in doc["lora"]["options"]}
    assert lora["r"]["type"] == "an integer" and lora["r"]["low"] == 1
    assert lora["bias"]["choices"] == ["none", "all", "lora_only"] and lora["dropout"]["high_open"]


def test_shared_option_shapes_are_one_dataclass():
    from transferkit.tune import adapters, peft_methods, scalearn, side, translora

    assert issubclass(translora.TransLoRAOptions, peft_methods.LoraCore)
    assert issubclass(peft_methods.LoraOptions, peft_methods.LoraCore)
    assert issubclass(adapters.ScaledParallelAdapterOptions, adapters.ParallelAdapterOptions)
    assert issubclass(adapters.MamOptions, adapters.AdapterCore)
    assert issubclass(scalearn.SharedAdapterOptions, adapters.Bottleneck)
    assert issubclass(side.R2Options, side.SideOptions) and issubclass(side.SherlOptions, side.SideOptions)
    tune = registry.methods("tune")
    assert {tune[n].options for n in ("scalearn", "scalearn-uniform", "scalearn++", "scalearn-uniform++")} == \
        {scalearn.ScaLearnOptions}


# --------------------------------------------------------------------------- typed options, Python API
BAD = [
    ("lora", {"r": "eight"}, "option r of tune method 'lora' must be an integer, got 'eight'"),
    ("lora", {"r": 1.5}, "option r of tune method 'lora' must be an integer"),
    ("lora", {"r": 0}, "option r of tune method 'lora' must be >= 1"),
    ("lora", {"alpha": -3}, "option alpha of tune method 'lora' must be > 0"),
    ("lora", {"dropout": 7}, "option dropout of tune method 'lora' must be >= 0.0 and < 1.0, got 7"),
    ("lora", {"use_dora": "false"}, "option use_dora of tune method 'lora' must be true or false, got 'false'"),
    ("lora", {"options": {"use_rslora": "no"}}, "use_rslora"),
    ("lora", {"bias": "lora_onyl"}, "did you mean 'lora_only'"),
    ("lora", {"target_modules": 3}, "target_modules"),
    ("prompt", {"init": "text"}, "one of random, sample_vocab"),
    ("adapter", {"position": "middle"}, "one of attn, ffn, both"),
    ("mam", {"prefix_length": 0}, "prefix_length"),
    ("sparse", {"density": 0}, "density"),
    ("sparse", {"mlm_probability": 1.0}, "mlm_probability"),
    ("sherl", {"late_tune": "half"}, "late_tune"),
    ("unipt", {"layers": "some"}, "option layers must be 'all'"),
    ("scalearn", {"sources": "runs/a"}, "option sources of tune method 'scalearn' must be a list"),
    ("translora", {"augment_ops": ["swap", "twist"]}, "twist"),
    ("lora", {"epochs": "3"}, "train option epochs must be an int"),
    ("lora", {"lr": -1.0}, "train option lr"),
    ("lora", {"options": {"epochs": 3}}, "'epochs' is a train option"),
]


@pytest.mark.parametrize("method,config,match", BAD, ids=[f"{m}-{list(c)[0]}" for m, c, _ in BAD])
def test_bad_options_are_one_line_config_errors_before_anything_runs(method, config, match, tmp_path, monkeypatch):
    import transferkit.tune.baselines as baselines
    from transferkit.tune import tune

    def started(*a, **k):
        raise AssertionError("tune() went past its entry checks")

    monkeypatch.setattr(baselines, "split_mask", started)  # the first step after the checks
    tr, te = image_data()
    with pytest.raises(ConfigError) as err:
        tune(image_model(), tr, te, method=method, config=config, out_dir=tmp_path / "run", progress=False)
    assert match in str(err.value) and "\n" not in str(err.value), str(err.value)
    assert not (tmp_path / "run").exists()


def test_misspelt_options_and_methods_get_a_did_you_mean():
    from transferkit.tune import split_config, tune

    with pytest.raises(ConfigError, match=r"unknown option 'alpah' for tune method 'lora' \(did you mean 'alpha'\?\)"):
        split_config("lora", {"alpah": 32})
    with pytest.raises(ConfigError, match="did you mean 'epochs'"):
        split_config("lora", {"epohcs": 3})
    with pytest.raises(ConfigError, match="did you mean 'bottleneck'"):
        split_config("adapter", {"options": {"botleneck": 8}})
    tr, te = image_data()
    with pytest.raises(ConfigError, match=r"unknown tune method 'lroa' \(did you mean 'lora'\?\)"):
        tune(image_model(), tr, te, method="lroa", progress=False)


def test_valid_options_are_typed():
    from transferkit.tune import split_config

    opts, cfg = split_config("lora", {"alpha": 32, "r": 4.0, "use_dora": True, "target_modules": ["0"]})
    assert opts.alpha == 32.0 and isinstance(opts.alpha, float) and opts.r == 4 and isinstance(opts.r, int)
    assert opts.use_dora is True and opts.target_modules == ["0"] and cfg["lr"] == 2e-3
    assert dataclasses.asdict(opts)["bias"] == "none"
    opts, _ = split_config("unipt", {"layers": [0, 2]})
    assert opts.layers == [0, 2]
    opts, _ = split_config("bitfit", {"bias_terms": ["query"]})
    assert opts.bias_terms == ["query"]


# --------------------------------------------------------------------------------- the recorded split
def test_tune_records_its_split_in_the_delta_and_the_run_folder(tmp_path):
    from transferkit.data import make_dataset
    from transferkit.data.split import held_out, make_split, read_split
    from transferkit.delta import Delta
    from transferkit.tune import tune

    tr0, te0 = image_data()
    ds = make_dataset("blobs", np.concatenate([tr0.X, te0.X]), np.concatenate([tr0.y, te0.y]))
    train, test, split = make_split(ds, dataset=ds, seed=3)
    res = tune(image_model(), train, test, method="linear", config={"epochs": 1}, out_dir=tmp_path / "run",
               split=split, progress=False)
    record = split.to_dict()
    assert read_split(tmp_path / "run").to_dict() == record
    assert Delta.load(tmp_path / "run" / "delta").meta["split"] == record == res.delta.meta["split"]
    # test_accuracy was measured on exactly the recorded held-out items, none of which was trained on
    assert res.metrics["test_n"] == len(record["test_ids"]) == len(test)
    again_train, again_test = held_out(record, dataset=ds)
    np.testing.assert_array_equal(again_test.X, test.X)
    np.testing.assert_array_equal(again_train.X, train.X)
    assert not {x.tobytes() for x in train.X} & {x.tobytes() for x in test.X}
    # a record that does not describe the data, or a resumed folder of another split, is refused
    _, _, other = make_split(ds, dataset=ds, seed=4)
    with pytest.raises(DataError, match="another split"):
        tune(image_model(), train, test, method="linear", config={"epochs": 1}, out_dir=tmp_path / "run",
             resume=True, split=other, progress=False)
    with pytest.raises(DataError, match="does not describe"):
        tune(image_model(), train, test.subset(np.arange(len(test)) > 0), method="linear", split=split,
             progress=False)


# ----------------------------------------------------------------------------------------------- CLI
def _tune(sentiment_csv, model, *args):
    return ["tune", "--data", sentiment_csv, "--model", model, *args]


@pytest.mark.parametrize("text,match", [
    ("r: eight\n", "option r of tune method 'lora' must be an integer, got 'eight'"),
    ("alpha: -3\n", "option alpha of tune method 'lora' must be > 0"),
    ("dropout: 7\n", "option dropout of tune method 'lora' must be >= 0.0 and < 1.0"),
    ("use_dora: 'false'\n", "option use_dora of tune method 'lora' must be true or false"),
    ("alpah: 32\n", "did you mean 'alpha'"),
    ("options: {r: 0}\n", "must be >= 1"),
])
def test_cli_bad_option_is_error_exit_2_before_loading_anything(text, match, tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text)
    # neither the data nor the model exist: the options are checked first
    bad(_tune(tmp_path / "missing.csv", "no-such-model", "--method", "lora", "--config", cfg), match)


def test_cli_misspelt_method(sentiment_csv, tiny_bert_dir):
    bad(_tune(sentiment_csv, tiny_bert_dir, "--method", "lroa"), "did you mean 'lora'")


def test_cli_list_derives_from_the_registry():
    doc = json.loads(ok(["tune", "--list", "--json"]).stdout)
    assert doc == json.loads(json.dumps({n: registry.describe(m) for n, m in registry.methods("tune").items()}))
    text = ok(["tune", "--list"]).stdout
    assert "r: an integer, default 8, >= 1" in text
    assert "bias: a string, default 'none', one of none, all, lora_only" in text
    for name, d in doc.items():
        assert name in text and d["paper"] in text
        for o in d["options"]:
            assert f"{o['name']}: {o['type']}, default {o['default']!r}" in text, (name, o["name"])


def test_cli_records_the_split_and_resume_refuses_another(sentiment_csv, tiny_bert_dir, tmp_path, monkeypatch):
    from transferkit.data import load_dataset
    from transferkit.data.split import held_out
    from transferkit.delta import Delta

    monkeypatch.setenv("TRANSFERKIT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    args = _tune(sentiment_csv, tiny_bert_dir, "--method", "linear", "--epochs", "1", "--seed", "1", "--out", out)
    m = json.loads(ok([*args, "--json"]).stdout)
    record = json.loads((out / "split.json").read_text())
    assert Delta.load(out / "delta").meta["split"] == record
    assert record["seed"] == 1 and record["sample_seed"] == 1 and record["n"] == len(load_dataset(str(sentiment_csv)))
    train, test = held_out(record)
    assert m["test_n"] == len(test) == len(record["test_ids"]) and len(train) + len(test) == record["n"]
    ids = record["test_ids"]
    assert len(set(ids)) == len(ids) and 0 <= min(ids) and max(ids) < record["n"]
    ok([*args, "--resume"])  # the same split: resumes
    bad([*args, "--resume", "--per-class", "10"], "another split")
    bad(_tune(sentiment_csv, tiny_bert_dir, "--method", "linear", "--seed", "2", "--out", out, "--resume"),
        "another split")
