"""Use an optimized BLAS with MLX's CPU backend on Linux.

The Linux `mlx[cpu]` wheel links the reference (netlib) BLAS: a 2048^3 float32 matmul runs at
a few GFLOP/s. Loading an optimized library that exports the standard BLAS symbols into the
global symbol namespace *before* `mlx.core` is imported makes MLX resolve `sgemm_` and friends
to it instead (docs/linux-cpu.md has the speed-up and the accuracy).

This module must be imported before anything imports `mlx.core`; `mlx_sleep/__init__.py` does
that first. Opt out with `MLX_SLEEP_BLAS=0`; point at a specific library with
`MLX_SLEEP_BLAS=/path/to/libopenblas.so.0`. macOS uses Accelerate and needs none of this.
"""

import ctypes
import glob
import os
import sys

# Debian/Ubuntu (libopenblas0-pthread / -openmp), Fedora, Arch, and pip's scipy-openblas wheels.
CANDIDATES = [
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/openblas-openmp/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-openmp/libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
]

# What happened, for `mlx-sleep doctor`.
status = {"library": None, "reason": "not attempted"}


def _find():
    for path in CANDIDATES:
        if os.path.exists(path):
            return path
    for path in sorted(
        glob.glob(
            os.path.join(
                sys.prefix,
                "lib",
                "python3*",
                "site-packages",
                "scipy_openblas*",
                "lib",
                "libscipy_openblas*.so",
            )
        )
    ):
        return path
    return None


def load():
    """Load an optimized BLAS globally if possible; never raises."""
    if status["reason"] != "not attempted":
        return status
    if not sys.platform.startswith("linux"):
        status.update(reason="not needed on this platform")
        return status
    choice = os.environ.get("MLX_SLEEP_BLAS", "1")
    if choice == "0":
        status.update(reason="disabled by MLX_SLEEP_BLAS=0")
        return status
    if "mlx.core" in sys.modules:
        status.update(reason="mlx.core was imported before mlx_sleep; import mlx_sleep first")
        return status
    path = choice if choice not in ("1", "") else _find()
    if path is None:
        status.update(
            reason="no optimized BLAS found (Debian/Ubuntu: apt-get install libopenblas0-pthread)"
        )
        return status
    try:
        ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    except OSError as e:
        status.update(reason=f"could not load {path}: {e}")
        return status
    status.update(library=path, reason="loaded")
    return status
