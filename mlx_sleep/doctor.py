"""`mlx-sleep doctor`: what this machine gives mlx-sleep."""

import platform
import time

from . import _blas


def _matmul_gflops(n=1024, repeats=3):
    import mlx.core as mx

    a = mx.random.normal((n, n))
    mx.eval(a @ a)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        mx.eval(a @ a)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def _blas_in_process():
    try:
        with open("/proc/self/maps") as f:
            libs = {line.split()[-1] for line in f if "blas" in line.lower() and "/" in line}
        return sorted(libs)
    except OSError:
        return []


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def platform_summary() -> dict:
    """What a learning result depends on beyond the seed (results differ across BLAS builds and
    instruction sets): for results files."""
    import os

    import mlx.core as mx

    blas = _blas.status["library"] or (
        "Accelerate" if platform.system() == "Darwin" else "reference BLAS"
    )
    return {
        "mlx": mx.__version__,
        "device": str(mx.default_device()),
        "blas": blas,
        "cpu": _cpu_name(),
        "cores": os.cpu_count(),
        "machine": platform.machine(),
        "system": platform.system(),
        "python": platform.python_version(),
    }


def report() -> str:
    import mlx.core as mx

    from . import __version__

    lines = [
        f"mlx-sleep   {__version__}",
        f"python      {platform.python_version()} ({platform.machine()}, {platform.system()})",
        f"mlx         {mx.__version__}",
        f"device      {mx.default_device()}",
        f"metal       {'available' if mx.metal.is_available() else 'not available (CPU backend)'}",
    ]
    try:
        import mlx_lm

        lines.append(f"mlx-lm      {mlx_lm.__version__}")
    except ImportError:
        lines.append("mlx-lm      not installed")
    if platform.system() == "Linux":
        st = _blas.status
        lines.append(f"blas        {st['library'] or 'reference BLAS (slow)'}: {st['reason']}")
        libs = _blas_in_process()
        if libs:
            lines.append(f"            mapped: {', '.join(libs)}")
        lines.append(
            "            opt out with MLX_SLEEP_BLAS=0, choose one with MLX_SLEEP_BLAS=/path"
        )
    lines.append(f"matmul      {_matmul_gflops():.1f} GFLOP/s (1024^3 float32, best of 3)")
    try:
        from .kernels import kernel_report
    except ImportError:
        lines.append("kernels     (no custom Metal kernels in this build)")
    else:
        lines.extend(kernel_report())
    return "\n".join(lines)
