"""Safe, atomic file I/O shared by every stage.

Artifacts are written to a temporary file in the destination directory and renamed into place,
so an interrupted run never leaves a half-written file that a later run would read. Weights are
read only from safetensors or with ``torch.load(..., weights_only=True)``.

Output folders: a folder a command writes carries a :data:`MARKER` file; :func:`check_out` refuses, before
any work, an ``--out`` that is a file, not writable, one of the command's inputs, or a non-empty folder
transferkit did not write (whole-folder outputs) or whose files it would overwrite. JSON is strict:
:func:`finite_json` maps NaN/inf to null in every document written or printed. YAML from users goes
through :func:`load_yaml` (alias-expanded size bounded).
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import math
import os
import re
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

from .errors import ConfigError, ModelError

MARKER = ".transferkit"  # written into every output folder a command creates: "transferkit wrote this"
STALE_LEGACY_S = 24 * 3600  # temporaries without a pid (older versions) are removed once this old


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9]", "_", socket.gethostname())[:24] or "host"


def _tmp_re(name: str) -> re.Pattern:
    return re.compile(r"^\." + re.escape(name) + r"\.(?:tk-(?P<host>[A-Za-z0-9_]*)-(?P<pid>\d+)-)?[A-Za-z0-9_]+\.tmp$")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def clean_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Remove the temporaries a killed :func:`atomic_path` left next to ``path`` (only ours, only dead ones).

    Ours are named ``.<name>.tk-<host>-<pid>-<random>.tmp``; one is removed when its process (on this host)
    is gone. A temporary of the older pattern ``.<name>.<random>.tmp`` (no pid) is removed once it is a day old.
    """
    path = Path(path)
    pattern, host, removed = _tmp_re(path.name), _host(), []
    try:
        entries = list(path.parent.iterdir())
    except OSError:
        return removed
    for e in entries:
        m = pattern.match(e.name)
        if not m or not e.is_dir() or e.is_symlink():
            continue
        if m.group("pid") is not None:
            stale = m.group("host") == host and int(m.group("pid")) != os.getpid() and not _pid_alive(int(m.group("pid")))
        else:
            try:
                stale = time.time() - e.stat().st_mtime > STALE_LEGACY_S
            except OSError:
                stale = False
        if stale:
            shutil.rmtree(e, ignore_errors=True)
            removed.append(e)
    return removed


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it onto ``path``.

    Works for files and directories. On error the temporary is removed and ``path`` is untouched.
    The temporary is named after this process (``.<name>.tk-<host>-<pid>-….tmp``), so the next write to
    the same place removes what a killed writer left (:func:`clean_stale_temporaries`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tk-{_host()}-{os.getpid()}-", suffix=".tmp", dir=path.parent))
    target = tmp / path.name
    try:
        yield target
        for attempt in range(3):
            if path.is_dir() and not path.is_symlink():
                # the old copy goes into the temporary (removed below): path is never missing for long
                with contextlib.suppress(OSError):
                    os.replace(path, tmp / f"{path.name}.old")
            try:
                os.replace(target, path)
                break
            except OSError:  # a concurrent writer (another rank) placed its copy in between
                if attempt == 2:
                    raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------------------------ output folders
def mark(folder: str | os.PathLike, command: str) -> None:
    """Record that ``folder`` is an output of transferkit's ``command`` (the :data:`MARKER` file)."""
    folder = Path(folder)
    if folder.is_dir() and not (folder / MARKER).is_file():
        with contextlib.suppress(OSError):
            (folder / MARKER).write_text(json.dumps({"written_by": "transferkit", "command": command}) + "\n")


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def is_ours(folder: str | os.PathLike, names: Iterable[str] = ()) -> bool:
    """Whether ``folder`` was written by transferkit: it has the :data:`MARKER`, or — an output of an older
    version — it holds ``names[0]`` (the command's signature artifact) and nothing but ``names`` (the artifacts
    the command writes; glob patterns allowed)."""
    folder, names = Path(folder), list(names)
    if (folder / MARKER).is_file():
        return True
    entries = [e.name for e in folder.iterdir()]
    return bool(names) and names[0] in entries and all(_matches(e, [*names, ".*.tmp"]) for e in entries)


def _under(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def _writable(folder: Path) -> bool:
    """Whether a folder can be created in ``folder``: tried (and removed at once), because permission bits
    say nothing for root and nothing about read-only or pseudo file systems."""
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".transferkit-probe-", dir=folder))
        return True
    except OSError:
        return False


def check_out(out: str | os.PathLike, *, names: Iterable[str] = (), replaces: bool = False,
              inputs: Iterable[Any] = (), what: str = "--out") -> Path:
    """Check an output folder before any work; every problem is a one-line :class:`ConfigError`.

    - ``out`` must not be a file (nor below one), and the folder it is in must be writable;
    - it must not be one of ``inputs`` (paths; non-paths are ignored), lie inside an input folder, or —
      for a command that ``replaces`` the whole folder — contain an input;
    - a command that ``replaces`` the whole folder refuses an existing non-empty folder transferkit did not
      write (:func:`is_ours`) or that holds anything but its artifacts (``names``: a file the user put there);
      any other command refuses a folder transferkit did not write that holds a file it would write.

    Nothing is left behind (writability is tried with an empty folder, removed at once). Returns ``out``
    (expanded).
    """
    out = Path(out).expanduser()
    names = list(names)
    probe = out
    while not probe.exists() and not probe.is_symlink():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        where = "is a file" if probe == out else f"is below the file {probe}"
        raise ConfigError(f"{what} {out} {where}; give a folder")
    if probe.is_symlink() and not probe.exists():
        raise ConfigError(f"{what} {out}: {probe} is a broken symbolic link")
    need = [probe] if probe != out else [out] + ([out.parent] if replaces else [])
    for d in need:
        if not _writable(d):
            raise ConfigError(f"{what} {out}: the folder {d} is not writable")
    resolved = out.resolve()
    for inp in inputs:
        if not isinstance(inp, (str, os.PathLike)):
            continue
        try:
            p = Path(inp).expanduser()
            if not p.exists():
                continue
            rp = p.resolve()
        except (OSError, ValueError):
            continue
        if resolved == rp:
            raise ConfigError(f"{what} {out} is an input of this command; give another folder")
        if p.is_dir() and _under(resolved, rp):
            raise ConfigError(f"{what} {out} is inside the input {inp}; give a folder outside it")
        if replaces and _under(rp, resolved):
            raise ConfigError(f"{what} {out} holds the input {inp} and would be replaced; give another folder")
    if out.is_dir():
        entries = sorted(e.name for e in out.iterdir())
        foreign = [e for e in entries if not _matches(e, [*names, MARKER, ".*.tmp"])]
        if replaces and entries and (foreign or not is_ours(out, names)):
            raise ConfigError(f"{what} {out} is a non-empty folder that transferkit did not write "
                              f"(it holds {(foreign or entries)[0]!r}); give a new or empty folder")
        if not replaces and entries and not is_ours(out, names):
            clash = [e for e in entries if _matches(e, names)]
            if clash:
                raise ConfigError(f"{what} {out} already holds {clash[0]!r}, which transferkit did not write; "
                                  "give a new or empty folder")
    return out


# ------------------------------------------------------------------------------------ JSON / YAML
def finite_json(obj: Any) -> Any:
    """NaN/inf (an undefined correlation, a failed score) become null, so every JSON document is strict JSON.

    Also turns numpy scalars and arrays into Python values (so nothing non-finite slips through ``default``).
    """
    if isinstance(obj, bool) or obj is None or isinstance(obj, (str, int)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    mod = type(obj).__module__
    if mod == "numpy" or mod.startswith("numpy."):
        import numpy as np

        if isinstance(obj, np.ndarray):
            return finite_json(obj.tolist())
        if isinstance(obj, np.generic):
            return finite_json(obj.item())
    return obj


def dumps_json(obj: Any, indent: int | None = 2) -> str:
    """Strict JSON text of ``obj`` (NaN/inf → null; numpy values and paths converted)."""
    return json.dumps(finite_json(obj), indent=indent, default=_json_default, allow_nan=False)


YAML_MAX_NODES = 100_000  # alias-expanded nodes a user YAML document may have


def read_yaml_file(path: str | os.PathLike, what: str = "file") -> Any:
    """The YAML document in ``path`` through :func:`load_yaml`; a missing or unreadable file is a one-line
    :class:`ConfigError`."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"{what} not found: {path}")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read {path}: {' '.join(str(e).split())[:200]}") from None
    return load_yaml(text, str(path))


def load_yaml(text: str, what: str = "YAML", max_nodes: int = YAML_MAX_NODES) -> Any:
    """``yaml.safe_load`` that refuses alias bombs: a document whose alias-expanded size is above
    ``max_nodes`` nodes, or a recursive alias, is a one-line :class:`ConfigError`; so is invalid YAML."""
    import yaml

    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _yaml_size(node, max_nodes, what)
        return loader.construct_document(node)
    except yaml.YAMLError as e:
        mark_ = getattr(e, "problem_mark", None)
        where = f" (line {mark_.line + 1}, column {mark_.column + 1})" if mark_ else ""
        problem = getattr(e, "problem", None) or _first_line(e)
        raise ConfigError(f"cannot parse {what}: invalid YAML{where}: {_first_line(problem)}") from None
    finally:
        loader.dispose()


def _yaml_size(root: Any, limit: int, what: str) -> int:
    """Alias-expanded node count of a composed YAML graph (memoised per node: linear in the document)."""
    import yaml

    sizes: dict[int, int] = {}
    on_path: set[int] = set()

    def size(node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in on_path:
            raise ConfigError(f"{what}: a recursive YAML alias is not allowed")
        on_path.add(key)
        total = 1
        if isinstance(node, yaml.SequenceNode):
            for child in node.value:
                total += size(child)
                if total > limit:
                    break
        elif isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                total += size(k) + size(v)
                if total > limit:
                    break
        on_path.discard(key)
        if total > limit:
            raise ConfigError(f"{what}: the document expands (YAML aliases) to more than {limit:,} values; "
                              "refused")
        sizes[key] = total
        return total

    import sys

    old = sys.getrecursionlimit()
    sys.setrecursionlimit(max(old, 10_000))
    try:
        return size(root)
    except RecursionError:
        raise ConfigError(f"{what}: the document is nested too deeply") from None
    finally:
        sys.setrecursionlimit(old)


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented, strict JSON (NaN/inf → null), atomically; key order is kept, so a result
    read back (on resume) iterates like the one written."""
    with atomic_path(path) as tmp:
        tmp.write_text(dumps_json(obj) + "\n")
    return Path(path)


def write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def save_safetensors(tensors: dict, path: str | os.PathLike, metadata: dict | None = None) -> Path:
    """Save a dict of tensors with safetensors, atomically (tensors made contiguous)."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={k: str(v) for k, v in (metadata or {}).items()})
    return Path(path)


def load_weights(path: str | os.PathLike) -> dict:
    """Load a state dict from a safetensors file or a pickle with ``weights_only=True``.

    Any failure (missing, truncated, corrupt, not a state dict) becomes a one-line ModelError.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise ModelError(f"weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt/truncated files raise many different types
        raise ModelError(f"cannot read weights file {path}: {type(exc).__name__}: {_first_line(exc)}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"{path} does not hold a state dict of tensors")
    return state


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else ""


def _json_default(obj: Any) -> Any:
    import numpy as np

    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
