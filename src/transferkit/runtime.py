"""Run-time utilities every stage and benchmark shares: progress lines with an ETA, peak-memory sampling,
and the environment a result depends on."""

from __future__ import annotations

import math
import os
import sys
import threading
import time
from typing import Any

__all__ = ["Progress", "PeakMemory", "environment", "fmt_seconds", "max_rss"]


def fmt_seconds(s: float | None) -> str:
    if s is None or not math.isfinite(s):
        return "?"
    s = int(round(s))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class Progress:
    """One line per unit of work on stderr: stage, target, model, elapsed and the stage's ETA.

    The ETA is the stage's remaining work at the pace measured so far, each unit weighted by its
    model's expected cost (see :func:`transferkit.pipeline.runner.unit_weight`), so a zoo that mixes small and large models
    is not estimated from the small ones alone.
    """

    def __init__(self, enabled: bool, stream=None):
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.t0 = time.perf_counter()

    def line(self, text: str) -> None:
        if self.enabled:
            print(f"[transferkit] {text}", file=self.stream, flush=True)

    def unit(self, stage: str, i: int, n: int, what: str, eta: float | None) -> None:
        self.line(f"{stage} {i}/{n} | {what} | elapsed {fmt_seconds(time.perf_counter() - self.t0)} | ETA {fmt_seconds(eta)}")


class PeakMemory:
    """Peak resident memory of this process while the block runs (sampled by a thread with psutil).

    ``peak_rss_mb`` is the highest RSS seen, ``delta_mb`` its rise over the RSS at entry; on CUDA
    also ``cuda_peak_mb`` (``torch.cuda.max_memory_allocated``). Falls back to ``ru_maxrss`` (the
    process' lifetime high-water mark) where psutil is missing.
    """

    def __init__(self, interval: float = 0.02):
        self.interval = interval
        self.start = self.peak = 0
        self.cuda_peak: int | None = None

    def _rss(self) -> int:
        return self._proc.memory_info().rss if self._proc is not None else max_rss()

    def __enter__(self) -> "PeakMemory":
        try:
            import psutil

            self._proc = psutil.Process()
        except ImportError:  # pragma: no cover
            self._proc = None
        self.start = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
        except Exception:  # pragma: no cover
            pass
        return self

    def _poll(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())
        try:
            import torch

            if torch.cuda.is_available():
                self.cuda_peak = int(torch.cuda.max_memory_allocated())
        except Exception:  # pragma: no cover
            pass

    def as_dict(self) -> dict[str, float]:
        out = {"peak_rss_mb": round(self.peak / 2**20, 1), "delta_rss_mb": round((self.peak - self.start) / 2**20, 1)}
        if self.cuda_peak is not None:
            out["cuda_peak_mb"] = round(self.cuda_peak / 2**20, 1)
        return out


def max_rss() -> int:
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024


def environment() -> dict[str, Any]:
    """Versions and hardware that a result depends on."""
    import platform
    from importlib import metadata

    pkgs = {}
    for p in ("transferkit", "torch", "transformers", "peft", "accelerate", "numpy", "scikit-learn", "safetensors"):
        try:
            pkgs[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            pkgs[p] = None
    env: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform(),
                           "cpu_count": os.cpu_count(), "packages": pkgs}
    try:
        env["affinity_cpus"] = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        pass
    try:
        import torch

        env["torch_threads"] = torch.get_num_threads()
        env["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:  # pragma: no cover
        pass
    return env
