"""Pinning what makes CPU numerics differ between machines, for runs whose digits must reproduce elsewhere.

A seeded CPU run repeats bit for bit on one machine, but another machine picks other kernels: torch's own
vectorised kernels follow the CPU's SIMD flags (AVX2 vs AVX-512), MKL and oneDNN dispatch on them too, and
the thread count changes how reductions are split. TRACE's weights clamp scores at 0, so a last-digit change
of a score near 0 switches a pair on or off and the realigned model differs visibly. Pinning the thread
count and the instruction set (AVX2, which nearly every x86-64 server has) removes these differences at a
small cost in speed. The environment variables must be set before torch is imported, and they reach every
process a launch starts.
"""

from __future__ import annotations

import os
import sys

from trace_ds.io import TraceError

# Per instruction set: torch's own kernels, MKL's conditional numerical reproducibility (same code path on
# every processor that supports it), and oneDNN's cap.
CPU_ISA_ENV = {
    "avx2": {
        "ATEN_CPU_CAPABILITY": "avx2",
        "MKL_CBWR": "AVX2,STRICT",
        "MKL_ENABLE_INSTRUCTIONS": "AVX2",
        "ONEDNN_MAX_CPU_ISA": "AVX2",
    }
}
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def cpu_numerics_env(threads: int | None, cpu_isa: str | None) -> dict[str, str]:
    """The environment that pins ``threads`` per process and the ``cpu_isa`` kernels (None: leave as is)."""
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise TraceError(f"threads {threads!r}: a whole number of threads per process, at least 1 (or null)")
    if cpu_isa is not None and cpu_isa not in CPU_ISA_ENV:
        raise TraceError(
            f"cpu_isa {cpu_isa!r}: one of {', '.join(CPU_ISA_ENV)} (or null for the machine's best)"
        )
    env = {name: str(threads) for name in THREAD_ENV} if threads is not None else {}
    return {**env, **(CPU_ISA_ENV[cpu_isa] if cpu_isa is not None else {})}


def pin_cpu_numerics(threads: int | None, cpu_isa: str | None) -> dict[str, str]:
    """Set :func:`cpu_numerics_env` in this process (and so in every process it launches); returns it.

    Refuses to change the instruction set once torch is imported (it would apply to launched processes
    only, and this process would compute with other kernels than they do)."""
    env = cpu_numerics_env(threads, cpu_isa)
    if "torch" in sys.modules:
        changed = [k for k, v in env.items() if k not in THREAD_ENV and os.environ.get(k) != v]
        if changed:
            raise TraceError(
                f"cpu_isa must be set before torch is imported ({', '.join(changed)}); "
                "set it in the config's launch section, which trace-ds reads first"
            )
    os.environ.update(env)
    if threads is not None and "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)
    return env
