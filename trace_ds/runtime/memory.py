"""Measured memory per rank: the peak growth over a baseline taken when the stage starts.

On a GPU the figure is the CUDA caching allocator's peak of allocated bytes; on the CPU it is the process's
peak resident set (Linux VmHWM, reset through /proc/self/clear_refs so that imports and earlier stages in
the same process do not count). Set ``TRACE_DS_MEMORY_REPORT=path.json`` and every ``score``/``train``/``eval``
stage writes one record per rank there when it ends; `trace-ds bench memory` and the loading test use it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

REPORT_ENV = "TRACE_DS_MEMORY_REPORT"
MIB = 1024 * 1024


def _status_bytes(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
    if match is None:
        raise RuntimeError(f"/proc/self/status has no {field} (host memory is measured on Linux only)")
    return int(match.group(1)) * 1024


def host_rss() -> int:
    return _status_bytes("VmRSS")


def host_peak() -> int:
    return _status_bytes("VmHWM")


def lifetime_peak_rss_mib() -> float:
    """This process's peak resident set since it started (ru_maxrss, which Linux reports in KiB), in MiB."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def reset_host_peak() -> None:
    """Make VmHWM start again from the current resident set (Linux >= 4.0)."""
    Path("/proc/self/clear_refs").write_text("5")


@dataclass
class MemoryMeter:
    """Peak memory growth of this process since ``start``: host RSS on the CPU, allocated bytes on CUDA."""

    device: torch.device
    baseline: int = 0

    @classmethod
    def start(cls, device: torch.device) -> MemoryMeter:
        meter = cls(device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            meter.baseline = torch.cuda.memory_allocated(device)
        else:
            reset_host_peak()
            meter.baseline = host_rss()
        return meter

    def reset_peak(self) -> None:
        """Start a new segment: the peak restarts from the current level, the baseline stays."""
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            reset_host_peak()

    def peak(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        return host_peak()

    def record(self, **extra: Any) -> dict[str, Any]:
        peak = self.peak()
        return {
            "memory": "cuda_allocated" if self.device.type == "cuda" else "host_rss",
            "baseline_mib": self.baseline / MIB,
            "peak_mib": peak / MIB,
            "peak_growth_mib": (peak - self.baseline) / MIB,
            **extra,
        }


def report_path() -> str | None:
    return os.environ.get(REPORT_ENV) or None


def release_host_memory() -> tuple[int, int]:
    """Collect garbage and hand freed heap pages back to the system (glibc's ``malloc_trim``; CUDA's cache
    too): the stages of one launch run one after another in the same processes, and without this a later
    stage starts from what the earlier ones freed but the allocator kept. Returns the resident set (bytes)
    before and after."""
    import ctypes
    import ctypes.util
    import gc

    before = host_rss()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    libc_name = ctypes.util.find_library("c")
    if libc_name:
        libc = ctypes.CDLL(libc_name)
        if hasattr(libc, "malloc_trim"):  # glibc only (musl has none)
            libc.malloc_trim(0)
    return before, host_rss()
