"""A peer library's own venv for a side-by-side benchmark (never a dependency of the package)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def peer_python(venv: Path, packages: list[str]) -> Path:
    """The python of ``venv``, made once: ``pip install --no-deps packages`` into it, and the project's
    site-packages (torch, scikit-learn, transferkit, …) visible through a ``.pth`` file, so the peer runs on
    the same torch build without installing it again."""
    py = Path(venv) / "bin" / "python"
    if not py.is_file():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        site = subprocess.run([str(py), "-c", "import site; print(site.getsitepackages()[0])"], check=True,
                              capture_output=True, text=True).stdout.strip()
        ours = [p for p in sys.path if p.endswith("site-packages")][0]
        Path(site, "project.pth").write_text(f"import site; site.addsitedir({ours!r})\n")
        subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", *packages], check=True)
    return py
