"""Stale locks of torch's JIT extension builds (DeepSpeed's CPU ops), removed before a launch waits on them.

DeepSpeed JIT-builds its shared-memory communication op on first use through
``torch.utils.cpp_extension.load``, which takes ``<build folder>/lock`` (``FileBaton``) for the build and every
later load. A process killed while it holds that lock leaves the file behind, and every later launch then
waits on it forever, printing nothing. The builder keeps the lock file open for as long as it builds, so a
lock that no live process holds open is stale.
"""

from __future__ import annotations

import os
import time
import warnings
from pathlib import Path

# A lock whose holders cannot all be seen (another user's processes) is stale only when older than this.
UNSEEN_HOLDER_AGE_S = 1800.0


def extensions_root() -> Path:
    """Where torch builds JIT extensions: ``TORCH_EXTENSIONS_DIR``, else torch's default build root."""
    explicit = os.environ.get("TORCH_EXTENSIONS_DIR")
    if explicit:
        return Path(explicit)
    from torch.utils.cpp_extension import get_default_build_root

    return Path(get_default_build_root())


def build_locks(root: Path) -> list[Path]:
    """The ``lock`` files of every extension build folder under ``root`` (``root/NAME`` or
    ``root/pyXY_cu/NAME``, the layouts torch uses)."""
    if not root.is_dir():
        return []
    return sorted(p for pattern in ("*/lock", "*/*/lock") for p in root.glob(pattern) if p.is_file())


def lock_holders(lock: Path) -> tuple[list[int], bool]:
    """Processes that hold ``lock`` open, and whether every process's open files could be read."""
    target = os.path.realpath(lock)
    holders, complete = [], True
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            for fd in (entry / "fd").iterdir():
                if os.path.realpath(fd) == target:
                    holders.append(int(entry.name))
                    break
        except FileNotFoundError:  # the process ended while we looked
            continue
        except PermissionError:  # another user's, or a protected one (an init process, even for root)
            if _may_build(entry):
                complete = False
    return holders, complete


def _may_build(process: Path) -> bool:
    """Whether a process whose open files cannot be read could be a JIT build: the build holds its lock in the
    Python process that calls torch's loader, so a process whose command line shows no Python cannot."""
    try:
        return b"python" in (process / "cmdline").read_bytes()
    except OSError:
        return True


def clear_stale_build_locks(root: Path | None = None) -> list[Path]:
    """Remove every build lock under ``root`` (default :func:`extensions_root`) that no live process holds;
    each removal is warned about with the file's path. Returns the removed locks. Does nothing where
    ``/proc`` is not available."""
    if not Path("/proc/self/fd").is_dir():
        return []
    removed = []
    for lock in build_locks(root or extensions_root()):
        holders, complete = lock_holders(lock)
        if holders:
            continue
        try:
            age = time.time() - lock.stat().st_mtime
        except FileNotFoundError:
            continue
        if not complete and age < UNSEEN_HOLDER_AGE_S:
            continue
        try:
            lock.unlink()
        except FileNotFoundError:  # another rank removed it first
            continue
        removed.append(lock)
        warnings.warn(
            f"removed a stale JIT-build lock {lock} (no live process holds it; left by a killed build), "
            "which would have made this launch wait forever",
            stacklevel=2,
        )
    return removed
