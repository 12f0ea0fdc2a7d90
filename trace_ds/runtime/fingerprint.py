"""The environment a result was produced in: CPU and its SIMD flags, threads, library versions, GPU.

The same code gives slightly different numbers on different machines (torch and oneDNN pick SIMD kernels
from the CPU's flags, thread counts change reduction orders, GPUs have their own kernels), so every
evaluation (``metrics.json``) and every report carries this record. Every field is best effort: a machine
without ``/proc/cpuinfo``, a package that is not installed or no GPU gives ``null`` for what is missing,
never an error.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

KEY_CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile")
ENV_VARS = (
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "ATEN_CPU_CAPABILITY",
    "MKL_CBWR",
    "MKL_ENABLE_INSTRUCTIONS",
    "ONEDNN_MAX_CPU_ISA",
    "CUBLAS_WORKSPACE_CONFIG",
)
PACKAGES = ("torch", "deepspeed", "transformers", "datasets", "triton", "numpy", "tokenizers")


def environment_fingerprint() -> dict[str, Any]:
    """``cpu`` (model, a short hash of the flags, the key SIMD flags, nproc, cpu_count, cgroup quota),
    ``torch`` (CPU capability, threads), ``env`` (the variables that change numerics or threading),
    ``platform``, ``python``, ``packages`` (versions, trace-ds included) and ``gpu`` (null without CUDA)."""
    model, flags = _cpu_info()
    torch = _torch()
    return {
        "cpu": {
            "model": model,
            "flags_sha256": _short_hash(" ".join(sorted(flags))) if flags is not None else None,
            "flags": {flag: flag in flags for flag in KEY_CPU_FLAGS} if flags is not None else None,
            "nproc": _safe(lambda: len(os.sched_getaffinity(0))),  # CPUs this process may run on
            "cpu_count": os.cpu_count(),
            "cgroup_cpu_quota": _safe(_cgroup_quota),
        },
        "torch": {
            "cpu_capability": _safe(lambda: torch.backends.cpu.get_cpu_capability()) if torch else None,
            "num_threads": _safe(torch.get_num_threads) if torch else None,
        },
        "env": {name: os.environ.get(name) for name in ENV_VARS},
        "platform": {
            "system": platform.system() or None,
            "release": platform.release() or None,
            "machine": platform.machine() or None,
            "platform": _safe(platform.platform),
        },
        "python": {"version": platform.python_version(), "implementation": platform.python_implementation()},
        "packages": {**{name: package_version(name) for name in PACKAGES}, "trace-ds": _trace_ds_version()},
        "gpu": _safe(lambda: _gpu(torch)) if torch else None,
    }


def fingerprint_id(fingerprint: dict[str, Any]) -> str:
    """A 12-hex-digit name for a fingerprint: equal ids mean equal environments (as far as recorded)."""
    return _short_hash(json.dumps(fingerprint, sort_keys=True, default=str))


def package_versions() -> dict[str, str | None]:
    """Versions of trace-ds, the fingerprint's packages and every package trace-ds requires (its installed
    metadata; extras such as the test tools left out), by distribution name."""
    import re
    from importlib import metadata

    names = list(PACKAGES)
    try:
        for requirement in metadata.requires("trace-ds") or []:
            if "extra ==" not in requirement:
                name = re.split(r"[\s<>=!~;\[(]", requirement.strip(), maxsplit=1)[0]
                if name and name not in names:
                    names.append(name)
    except Exception:
        pass  # not installed as a distribution: the fingerprint's list alone
    return {"trace-ds": _trace_ds_version(), **{name: package_version(name) for name in names}}


def package_version(name: str) -> str | None:
    """The installed distribution's version, else a loaded module's ``__version__``, else None."""
    from importlib import metadata

    try:
        return metadata.version(name)
    except Exception:
        module = sys.modules.get(name.replace("-", "_"))
        version = getattr(module, "__version__", None)
        return str(version) if version is not None else None


def _trace_ds_version() -> str | None:
    try:
        from trace_ds import __version__

        return __version__
    except Exception:
        return package_version("trace-ds")


def _short_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


def _safe(call: Any) -> Any:
    try:
        return call()
    except Exception:
        return None


def _cpu_info(path: str = "/proc/cpuinfo") -> tuple[str | None, set[str] | None]:
    """(model name, flags) of the first processor in ``path`` (x86 ``flags``, Arm ``Features``); None for
    what the file lacks or when there is no such file."""
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None, None
    model: str | None = None
    flags: set[str] | None = None
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key = key.strip().lower()
        if key == "model name" and model is None:
            model = value.strip() or None
        elif key in ("flags", "features") and flags is None:
            flags = set(value.split())
        if model is not None and flags is not None:
            break
    return model, flags


def _cgroup_quota() -> float | None:
    """CPUs allowed by a cgroup v2 quota (``cpu.max``), or None when unlimited or unknown."""
    quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
    return None if quota == "max" else round(int(quota) / int(period), 3)


def _torch() -> Any:
    try:
        import torch

        return torch
    except Exception:
        return None


def _gpu(torch: Any) -> dict[str, Any] | None:
    if not torch.cuda.is_available():
        return None
    devices = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        devices.append(
            {
                "name": props.name,
                "capability": f"{props.major}.{props.minor}",
                "memory_gib": round(props.total_memory / 2**30, 1),
            }
        )
    return {
        "devices": devices,
        "driver": _nvidia_driver(),
        "cuda": torch.version.cuda,
        "hip": getattr(torch.version, "hip", None),
        "cudnn": _safe(torch.backends.cudnn.version),
    }


def _nvidia_driver() -> str | None:
    """The NVIDIA kernel driver version: /proc/driver/nvidia/version, else nvidia-smi; None otherwise."""
    try:
        first = Path("/proc/driver/nvidia/version").read_text().splitlines()[0]
        words = first.split()
        for word in words:
            if word[:1].isdigit() and "." in word:
                return word
    except (OSError, IndexError):
        pass
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
        return out.splitlines()[0].strip() or None
    except (OSError, subprocess.SubprocessError, IndexError):
        return None
