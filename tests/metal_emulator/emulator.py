"""CPU emulator for ``mx.fast.metal_kernel``.

Metal kernels cannot execute on Linux CI machines.  This module runs the
*same kernel source strings* on the CPU: :func:`metal_kernel` has the
signature of ``mx.fast.metal_kernel`` and returns a callable with the same
keyword arguments, which returns a list of ``mx.array``.  It can therefore be
monkeypatched in place of ``mx.fast.metal_kernel``.

Code generation mirrors MLX
---------------------------
MLX (``mlx/backend/common/metal_kernel.cpp``) only sees the *body* of a
kernel and writes the function around it.  The emulator writes the same
function, as C++20:

* ``template <typename T, int N, bool B>`` from the ``template=`` argument,
  in order (dtypes become ``typename`` parameters, ints ``int``, bools
  ``bool``); the kernel is instantiated with the given values, so they are
  compile-time constants exactly as on the GPU.
* one parameter per input, in order: ``const device T* name`` (or
  ``const constant T* name`` when the array has fewer than 8 elements, and
  ``const constant T& name`` for a 0-d array / Python scalar; ints become
  int32, floats float32).  For inputs with ``ndim > 0`` MLX adds
  ``const constant int* name_shape``, ``const constant int64_t*
  name_strides`` and ``const constant int& name_ndim`` -- each only if that
  text occurs in the source.  With ``ensure_row_contiguous=True`` inputs are
  copied to row-contiguous layout first; with ``False`` the strides of a
  numpy input are passed through unchanged (``mx.array`` inputs are always
  passed row-contiguous, which a stride-aware kernel cannot tell apart).
* one ``device T* name`` per output (``device atomic<T>* name`` with
  ``atomic_outputs=True``).
* the thread-position attributes MLX knows (``thread_position_in_grid``,
  ``thread_position_in_threadgroup``, ``threadgroup_position_in_grid``,
  ``threads_per_threadgroup``, ``threadgroups_per_grid``,
  ``threads_per_grid``, ``thread_index_in_threadgroup``,
  ``thread_index_in_simdgroup``, ``simdgroup_index_in_threadgroup``,
  ``simdgroups_per_threadgroup``, ``threads_per_simdgroup``,
  ``thread_execution_width``, the quadgroup ones, ``grid_size``,
  ``grid_origin`` and the ``dispatch_*`` ones), each added only if its name
  occurs in the source text, with MLX's types (``uint`` / ``uint3``).
* ``grid`` counts threads (``dispatchThreads``), the threadgroup is
  ``min(threadgroup, grid)`` per axis, edge threadgroups may be partial
  (``threads_per_threadgroup`` is then the partial size), and a threadgroup
  larger than 1024 threads is rejected as MLX does.
* outputs are filled with ``init_value`` when given; otherwise with 0xFF
  bytes (NaN for floats, -1 for ints), so an element a kernel forgets to
  write is visible.  Guard bytes on each side of every output detect
  writes out of bounds; array inputs are copied between 0xFF guard regions, so an
  out-of-bounds read gives NaN (or -1). Guards are 4x the buffer (64 KiB to 4 MiB).
* every access is bounds-checked: pointers into ``device`` / ``constant`` /
  ``threadgroup`` memory (the signature's and the kernel's own, in headers too) are
  rewritten into checked pointers (``mtl_rt::cptr`` / ``mptr`` in ``metal_shim.h``)
  that carry the buffer they point into, and threadgroup arrays into views of their
  declared size (``mtl_rt::tg_view``; a 2-D array checks each index). Indexing or
  dereferencing outside the buffer or array raises ``MetalEmulatorRuntimeError``
  naming it, the element and the thread -- also when the value read is discarded
  afterwards (``x = q[d]; y = d < Dk ? x : 0``), and a threadgroup array sized by the
  wrong constant that would spill into its neighbour.  Pointer arithmetic itself is
  free; ``&buf[n]`` (one past the end) counts as an access; a pointer to memory that
  is no buffer of the launch (a program-scope constant array) is not checked;
  ``sizeof`` of a threadgroup array is the view's, not the array's.

``verbose=True`` prints the Metal source MLX would generate.

Execution model
---------------
The generated unit (``metal_shim.h`` + header + the function above + a
small launcher) is compiled with g++ (C++20, ``-O1``; one g++ at a time)
into a shared library cached by a hash of its text, in
``$MLX_METAL_EMULATOR_CACHE``, else ``$XDG_CACHE_HOME`` or ``~/.cache``,
under ``mlx_metal_emulator``.  The shim is precompiled once (PCH) and the
scheduler (``metal_runtime.cpp``) is built once into ``libmtl_runtime.so``,
so a new kernel compiles in about 0.3 s.  Everything is called through
ctypes.  Metal-only spellings are handled by line-preserving rewrites:
``threadgroup`` declarations become references into the group's shared
arena, swizzles ``.xy`` become ``.template swz<0,1>()``, ``1.0h`` half
literals become ``_Float16`` casts, ``#include <metal_stdlib>`` is dropped,
and the address-space keywords ``device`` / ``constant`` / ``thread`` /
``threadgroup`` are empty macros.  ``#line`` directives make g++ report
errors as ``kernel_source:LINE`` / ``kernel_header:LINE``.

Every Metal thread of a threadgroup is a fiber (on x86-64 a register-and-stack switch, elsewhere
ucontext, whose signal-mask system calls halve the speed) so the threads of a group really
interleave: a fiber runs until it reaches ``threadgroup_barrier``,
``simdgroup_barrier`` or a SIMD collective and resumes when every live
thread of that scope has arrived.  Threadgroup memory is shared per group and
filled with 0xFF bytes at the start of each group, so a kernel that reads
data produced by other threads without a barrier reads NaN / garbage.
Every launch runs under ``$MLX_METAL_EMULATOR_SCHEDULES`` thread schedules
(default 3): lowest thread index first, highest first, then random orders
that also hold back one random simdgroup per barrier phase until no other
thread can run (a slow warp).  Their outputs must agree bitwise (except with
``atomic_outputs``), else ``MetalEmulatorRuntimeError``: a missing barrier
or a race fails deterministically.  Memory flags are honoured for
threadgroup memory: a kernel with a barrier whose flags lack
``mem_threadgroup`` runs with a private view of threadgroup memory per
thread, which only barriers with that flag publish and refresh.  SIMD groups are
32 lanes (``thread_index_in_threadgroup / 32``); lanes exchange values
through a per-simdgroup scratch area.  Threadgroups are distributed over
``$MLX_METAL_EMULATOR_WORKERS`` OS threads (default: up to 2), so device
atomics are real atomics.

Supported: scalar types (``float``, ``half``/``float16_t``,
``bfloat16_t``/``bfloat``, all integer types, ``bool``), 2/3/4-vectors with
``.x/.y/.z/.w`` / ``.rgba`` access, read-only swizzles (``.xy``, ``.zyx`` ...)
and elementwise operators, ``metal::`` / ``precise::`` / ``fast::`` math,
``as_type``, ``numeric_limits``, MLX's ``Limits`` and ``elem_to_loc``,
``threadgroup`` arrays and scalars, ``threadgroup_barrier``,
``simdgroup_barrier``, ``simd_``/``quad_`` sum, product, max, min, and, or,
xor, prefix sums/products, shuffle, shuffle_up/down/xor/rotate, broadcast,
broadcast_first, all, any, is_first, and ``atomic<T>`` with the
``atomic_*_explicit`` functions.

``simdgroup_matrix<T, 8, 8>`` (``simdgroup_float8x8`` / ``half`` / ``bfloat``)
with ``simdgroup_load`` / ``simdgroup_store`` (stride, origin, transpose),
``simdgroup_multiply(_accumulate)``, ``thread_elements()`` and
``make_filled_simdgroup_matrix``, in Apple's lane layout (lane l holds row
(l/4 & 4) + (l/2) % 4, columns (l/4 & 2) * 2 + (l % 2) * 2 and the next).

Refused (``UnsupportedMetalConstruct`` names the construct and the line):
SIMD-group matrices of other sizes, textures and samplers, imageblocks / tile memory, ballots and votes,
``simd_shuffle_and_fill_*``, async copies, ray tracing, function tables,
Metal 4 tensors, and ``float64`` / ``complex64`` arrays.  At run time a
deadlock (a barrier or collective reached by only part of the threads) and
lanes of one simdgroup calling different collectives raise
``MetalEmulatorRuntimeError``; g++ errors raise ``MetalEmulatorCompileError``
with the location in the kernel source (``kernel_source:LINE``) or header.

Known differences from a GPU: floating point follows IEEE single precision
without fast-math and without FMA contraction; half arithmetic may keep
float intermediates; kernels that rely on implicit SIMD lock-step (no
barrier between lanes of one simdgroup communicating through memory) and
spin-waits on other threads are not supported; a crash in the kernel
(e.g. integer division by zero, wild pointer) crashes the process.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Any, Sequence

import mlx.core as mx
import numpy as np

__all__ = [
    "metal_kernel",
    "MetalEmulatorError",
    "MetalEmulatorCompileError",
    "MetalEmulatorRuntimeError",
    "UnsupportedMetalConstruct",
]

_HERE = Path(__file__).resolve().parent
_SHIM = _HERE / "metal_shim.h"
_RUNTIME = _HERE / "metal_runtime.cpp"

_CXXFLAGS = [
    "-std=c++20",
    "-O1",
    "-fPIC",
    "-shared",
    "-pthread",
    "-w",  # kernel code is not ours; errors are still reported
    "-fsingle-precision-constant",  # Metal has no double: 1.0 is a float
    "-ffp-contract=off",
    "-fno-strict-aliasing",
]

_MAX_CONSTANT_ARRAY_SIZE = 8  # MLX: smaller inputs go to the constant space
# Guard regions around every buffer, four times as large as the buffer (at least 64 KiB, at most
# 4 MiB), so that an index overrun by whole rows or tokens still lands in them: around outputs 0xA5 (a
# write there is reported), around array inputs 0xFF (a read there gives NaN / -1).


def _guard(nbytes: int) -> int:
    return max(1 << 16, min(4 * nbytes, 1 << 22))


_INPUT, _OUTPUT, _ARGUMENT = 0, 1, 3  # metal_shim.h RegionKind

_BARRIER = re.compile(r"\b(?:threadgroup|simdgroup)_barrier\s*\(([^()]*(?:\([^()]*\))?[^()]*)\)")


def _schedules() -> int:
    """How many thread schedules every launch runs (their outputs must agree bitwise)."""
    return max(1, int(os.environ.get("MLX_METAL_EMULATOR_SCHEDULES", "3")))


def _needs_private_threadgroup_memory(text: str) -> bool:
    """A kernel with threadgroup memory and a barrier that does not order it (no
    mem_threadgroup flag) runs with per-thread views of threadgroup memory."""
    blank = _blank_comments(text)
    return bool(_TG_DECL.search(blank)) and any(
        "mem_threadgroup" not in m.group(1) for m in _BARRIER.finditer(blank)
    )


class MetalEmulatorError(RuntimeError):
    """Base class of the emulator's errors."""


class MetalEmulatorCompileError(MetalEmulatorError):
    """g++ rejected the generated translation unit."""


class MetalEmulatorRuntimeError(MetalEmulatorError):
    """The kernel deadlocked, diverged, or wrote out of bounds."""


class UnsupportedMetalConstruct(MetalEmulatorError, NotImplementedError):
    """The kernel uses a Metal feature the emulator does not implement."""


# --------------------------------------------------------------------- dtypes
# mx dtype -> (MLX type string, numpy storage dtype)
_DTYPES = {
    mx.float32: ("float", np.float32),
    mx.float16: ("float16_t", np.float16),
    mx.bfloat16: ("bfloat16_t", np.uint16),
    mx.bool_: ("bool", np.bool_),
    mx.int8: ("int8_t", np.int8),
    mx.int16: ("int16_t", np.int16),
    mx.int32: ("int32_t", np.int32),
    mx.int64: ("int64_t", np.int64),
    mx.uint8: ("uint8_t", np.uint8),
    mx.uint16: ("uint16_t", np.uint16),
    mx.uint32: ("uint32_t", np.uint32),
    mx.uint64: ("uint64_t", np.uint64),
}
_NP_TO_MX = {
    np.dtype(np.float32): mx.float32,
    np.dtype(np.float16): mx.float16,
    np.dtype(np.bool_): mx.bool_,
    np.dtype(np.int8): mx.int8,
    np.dtype(np.int16): mx.int16,
    np.dtype(np.int32): mx.int32,
    np.dtype(np.int64): mx.int64,
    np.dtype(np.uint8): mx.uint8,
    np.dtype(np.uint16): mx.uint16,
    np.dtype(np.uint32): mx.uint32,
    np.dtype(np.uint64): mx.uint64,
}


def _as_mx_dtype(dt: Any, what: str) -> mx.Dtype:
    if isinstance(dt, mx.Dtype):
        mdt = dt
    else:
        try:
            mdt = _NP_TO_MX[np.dtype(dt)]
        except (TypeError, KeyError):
            raise UnsupportedMetalConstruct(
                f"metal_emulator: unsupported dtype {dt!r} for {what}"
            ) from None
    if mdt not in _DTYPES:
        raise UnsupportedMetalConstruct(
            f"metal_emulator: unsupported dtype {mdt} for {what} "
            "(Metal kernels have no float64 / complex64)"
        )
    return mdt


# ------------------------------------------------------------ source checks
_UNSUPPORTED = [
    (
        r"\bsimdgroup_(?:float|half|bfloat)(?!8x8\b)\d+x\d+\b"
        r"|\bsimdgroup_matrix\s*<[^<>;]*,\s*(?!8\s*,\s*8\s*>)\d+\s*,\s*\d+\s*>",
        "SIMD-group matrices other than 8x8",
    ),
    (r"\b(?:texture(?:1d|2d|3d|cube|buffer)?(?:_array)?|depth2d|sampler)\b", "textures / samplers"),
    (r"\b(?:imageblock|threadgroup_imageblock)\b|\[\[\s*color\s*\(", "imageblocks / tile memory"),
    (
        r"\b(?:simd_ballot|simd_vote|quad_ballot|quad_vote"
        r"|simd_active_threads_mask|quad_active_threads_mask)\b",
        "SIMD ballots / votes",
    ),
    (r"\b(?:simd|quad)_shuffle_and_fill_(?:up|down)\b", "simd_shuffle_and_fill"),
    (
        r"\b(?:simdgroup_event|async_copy|wait_for_events)\b",
        "asynchronous copies (simdgroup_event)",
    ),
    (
        r"\b(?:intersector|acceleration_structure|intersection_function_table"
        r"|visible_function_table|raytracing)\b",
        "ray tracing / function tables",
    ),
    (
        r"\bmetal::tensor\b|\btensor_ops\b|\bmpp::|\btensor_inline\b",
        "Metal 4 tensors / performance primitives",
    ),
    (r"\b(?:object_data|ray_data)\b", "object / ray payload data"),
    (r"\bdouble\b", "double precision (not available in Metal)"),
]

# Thread attributes known to MLX, with their types (in MLX's order).
_METAL_ATTRIBUTES = [
    ("dispatch_quadgroups_per_threadgroup", "uint"),
    ("dispatch_simdgroups_per_threadgroup", "uint"),
    ("dispatch_threads_per_threadgroup", "uint3"),
    ("grid_origin", "uint3"),
    ("grid_size", "uint3"),
    ("quadgroup_index_in_threadgroup", "uint"),
    ("quadgroups_per_threadgroup", "uint"),
    ("simdgroup_index_in_threadgroup", "uint"),
    ("simdgroups_per_threadgroup", "uint"),
    ("thread_execution_width", "uint"),
    ("thread_index_in_quadgroup", "uint"),
    ("thread_index_in_simdgroup", "uint"),
    ("thread_index_in_threadgroup", "uint"),
    ("thread_position_in_grid", "uint3"),
    ("thread_position_in_threadgroup", "uint3"),
    ("threadgroup_position_in_grid", "uint3"),
    ("threadgroups_per_grid", "uint3"),
    ("threads_per_grid", "uint3"),
    ("threads_per_simdgroup", "uint"),
    ("threads_per_threadgroup", "uint3"),
]


def _blank_comments(src: str) -> str:
    """Replace comments (and string literal contents) by spaces, keeping lines."""
    out = []
    i, n = 0, len(src)
    while i < n:
        c = src[i]
        if src.startswith("//", i):
            j = src.find("\n", i)
            j = n if j < 0 else j
            out.append(" " * (j - i))
            i = j
        elif src.startswith("/*", i):
            j = src.find("*/", i + 2)
            j = n if j < 0 else j + 2
            out.append(re.sub(r"[^\n]", " ", src[i:j]))
            i = j
        elif c == '"':
            j = i + 1
            while j < n and src[j] != '"':
                j += 2 if src[j] == "\\" else 1
            out.append('"' + " " * (min(j, n) - i - 1) + ('"' if j < n else ""))
            i = j + 1
        else:
            out.append(c)
            i += 1
    return "".join(out)


def _check_supported(kernel: str, text: str, where: str) -> None:
    blank = _blank_comments(text)
    lines = text.splitlines()
    for pattern, what in _UNSUPPORTED:
        m = re.search(pattern, blank)
        if m:
            line = blank.count("\n", 0, m.start()) + 1
            code = lines[line - 1].strip() if line - 1 < len(lines) else ""
            raise UnsupportedMetalConstruct(
                f"metal_emulator cannot run kernel '{kernel}': unsupported Metal "
                f"construct '{m.group(0)}' ({what}) at {where} line {line}: "
                f"`{code}`"
            )


# ------------------------------------------------------------ source rewrite
_TG_DECL = re.compile(
    r"(?<![\w:.])threadgroup\s+"
    r"(?P<type>(?:const\s+)?[A-Za-z_][\w:]*(?:\s*<[^;<>]*(?:<[^;<>]*>[^;<>]*)*>)?)"
    r"\s+(?P<name>[A-Za-z_]\w*)\s*(?P<dims>(?:\[[^\]\[;]+\]\s*)*);"
)
# a pointer into device / constant / threadgroup memory: `const device T*`, `device const T *`,
# `threadgroup T*`, `constant T*` (the generated signature's parameters too)
_PTR = re.compile(
    r"(?<![\w:.])(?:(?P<c1>const)\s+)?(?P<space>device|constant|threadgroup)\s+"
    r"(?:(?P<c2>const)\s+)?"
    r"(?P<type>[A-Za-z_][\w:]*(?:\s*<[^;<>]*(?:<[^;<>]*>[^;<>]*)*>)?)"
    r"\s*(?P<c3>const\s*)?\*"
)
_PTR_CAST = re.compile(
    r"\b(?:reinterpret_cast|static_cast|const_cast)\s*<\s*(?=::mtl_rt::[cm]ptr<)"
)
_SWIZZLE = re.compile(r"\.(?P<s>[xyzw]{2,4}|[rgba]{2,4})\b(?!\s*\()")
_HALF_LIT = re.compile(r"(?<![\w.])((?:\d+\.\d*|\.\d+|\d+)(?:[eE][+-]?\d+)?)[hH]\b")
_METAL_INCLUDE = re.compile(r"^\s*#\s*include\s*<metal_\w+>.*$", re.M)


class _Rewriter:
    """Line-preserving rewrites that turn Metal into C++ for the shim."""

    def __init__(self) -> None:
        self.slot = 0

    def __call__(self, text: str) -> str:
        blank = _blank_comments(text)
        # work on a copy where comments are blank, but keep them in the output
        pieces = []
        last = 0
        for m in _TG_DECL.finditer(blank):
            ty, name, dims = m.group("type"), m.group("name"), m.group("dims")
            dims = re.sub(r"\s+", " ", dims.strip())
            slot = f'::mtl_rt::tg_slot({self.slot}, sizeof({ty}{dims}), alignof({ty}), "{name}")'
            if dims:  # an array: a view of its declared size, every index checked
                sizes = ", ".join(f"({d})" for d in re.findall(r"\[([^\]\[]+)\]", dims))
                repl = f'auto {name} = ::mtl_rt::tg_view<{ty}, {sizes}>({slot}, "{name}");'
            else:
                repl = f"auto& {name} = *reinterpret_cast<{ty}*>({slot});"
            repl += "\n" * m.group(0).count("\n")
            self.slot += 1
            pieces.append(text[last : m.start()])
            pieces.append(repl)
            last = m.end()
        pieces.append(text[last:])
        text = "".join(pieces)
        text = _METAL_INCLUDE.sub("", text)
        text = rewrite_pointers(text)

        def swz(m: re.Match) -> str:
            idx = {"x": 0, "y": 1, "z": 2, "w": 3, "r": 0, "g": 1, "b": 2, "a": 3}
            return ".template swz<" + ",".join(str(idx[c]) for c in m.group("s")) + ">()"

        text = _SWIZZLE.sub(swz, text)
        text = _HALF_LIT.sub(r"((_Float16)\1f)", text)
        return text


def rewrite_pointers(text: str) -> str:
    """Pointers into device, constant and threadgroup memory become bounds-checked pointers
    (metal_shim.h: mtl_rt::cptr for read-only ones, mtl_rt::mptr), casts to them ptr_cast."""

    def ptr(m: re.Match) -> str:
        const = m.group("c1") or m.group("c2") or m.group("c3") or m.group("space") == "constant"
        ty = m.group("type").strip()
        return f"::mtl_rt::{'cptr' if const else 'mptr'}<{ty}>"

    return _PTR_CAST.sub("::mtl_rt::ptr_cast<", _PTR.sub(ptr, text))


# ------------------------------------------------------------- compilation
def _cache_dir() -> Path:
    d = os.environ.get("MLX_METAL_EMULATOR_CACHE")
    if d:
        p = Path(d)
    else:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        p = Path(base) / "mlx_metal_emulator"
    p.mkdir(parents=True, exist_ok=True)
    return p


_LIB_CACHE: dict[str, Any] = {}
_LIB_LOCK = threading.Lock()
_COMPILE_LOCK = threading.Lock()  # never run two g++ at once


def _format_compile_error(kernel: str, stderr: str, header: str, source: str) -> str:
    # the shim was precompiled in a temporary directory: show its real name
    stderr = re.sub(r"\S*/tmp\w+/metal_shim\.h", str(_SHIM), stderr)
    files = {"kernel_source": source.splitlines(), "kernel_header": header.splitlines()}
    msgs = []
    for line in stderr.splitlines():
        m = re.match(
            r"(kernel_source|kernel_header|generated_signature):(\d+):(\d+): (error|fatal error): (.*)",
            line,
        )
        if m:
            f, ln = m.group(1), int(m.group(2))
            code = ""
            if f in files and 0 < ln <= len(files[f]):
                code = files[f][ln - 1].strip()
            msgs.append(f"  {f}:{ln}: {m.group(5)}" + (f"\n      `{code}`" if code else ""))
    if not msgs:  # errors inside the shim (template instantiation etc.)
        msgs = ["  " + l for l in stderr.splitlines() if "error" in l][:10]
    tail = "\n".join(stderr.splitlines()[:60])
    return (
        f"metal_emulator: g++ could not compile kernel '{kernel}':\n"
        + "\n".join(msgs[:10])
        + f"\n--- g++ output (first lines) ---\n{tail}"
    )


def _flags_key() -> str:
    return " ".join(_CXXFLAGS) + " " + os.environ.get("CXX", "g++")


def _run_gxx(args: list[str]) -> subprocess.CompletedProcess:
    cmd = [os.environ.get("CXX", "g++"), *_CXXFLAGS, *args]
    with _COMPILE_LOCK:
        return subprocess.run(cmd, capture_output=True, text=True)


def _support_dir() -> Path:
    """Cache dir with a copy of the shim, its precompiled header and the
    runtime library; named after a hash of their sources and flags."""
    shim = _SHIM.read_text()
    runtime = _RUNTIME.read_text()
    key = hashlib.sha256((shim + "\0" + runtime + "\0" + _flags_key()).encode()).hexdigest()[:16]
    d = _cache_dir() / f"support_{key}"
    if (d / "done").exists():
        return d
    with tempfile.TemporaryDirectory(dir=_cache_dir()) as tmp:
        t = Path(tmp)
        (t / "metal_shim.h").write_text(shim)
        (t / "metal_runtime.cpp").write_text(runtime)
        r = _run_gxx(
            ["-x", "c++-header", str(t / "metal_shim.h"), "-o", str(t / "metal_shim.h.gch")]
        )
        if r.returncode != 0:
            raise MetalEmulatorCompileError(f"metal_emulator: shim does not compile:\n{r.stderr}")
        r = _run_gxx(
            ["-shared", f"-I{t}", str(t / "metal_runtime.cpp"), "-o", str(t / "libmtl_runtime.so")]
        )
        if r.returncode != 0:
            raise MetalEmulatorCompileError(
                f"metal_emulator: runtime does not compile:\n{r.stderr}"
            )
        (t / "done").write_text("")
        try:
            os.rename(t, d)
        except OSError:  # another process won the race
            pass
        t.mkdir(exist_ok=True)  # TemporaryDirectory cleanup expects it
    return d


_RUNTIME_LIB: Any = None


def _runtime():
    """Load the runtime library (RTLD_GLOBAL: kernels resolve symbols in it)."""
    global _RUNTIME_LIB
    with _LIB_LOCK:
        if _RUNTIME_LIB is None:
            d = _support_dir()
            lib = ctypes.CDLL(str(d / "libmtl_runtime.so"), mode=ctypes.RTLD_GLOBAL)
            fn = lib.mtl_launch
            fn.restype = ctypes.c_int
            fn.argtypes = [
                ctypes.c_void_p,
                ctypes.POINTER(ctypes.c_void_p),
                ctypes.POINTER(ctypes.c_long),
                ctypes.c_int,
                ctypes.c_long,
                ctypes.c_int,
                ctypes.c_int,
                ctypes.POINTER(ctypes.c_void_p),  # the launch's regions: start,
                ctypes.POINTER(ctypes.c_long),  # bytes,
                ctypes.POINTER(ctypes.c_char_p),  # name,
                ctypes.POINTER(ctypes.c_int),  # kind (metal_shim.h RegionKind)
                ctypes.c_int,
                ctypes.c_char_p,
                ctypes.c_int,
            ]
            _RUNTIME_LIB = (d, lib, fn)
        return _RUNTIME_LIB


def _compile(tu: str, kernel: str, header: str, source: str):
    """Compile (or fetch from the cache) a kernel unit; returns its body pointer."""
    support, _, _ = _runtime()
    key = hashlib.sha256((tu + "\0" + support.name).encode()).hexdigest()[:32]
    with _LIB_LOCK:
        if key in _LIB_CACHE:
            return _LIB_CACHE[key]
    cache = _cache_dir()
    so = cache / f"k_{key}.so"
    if not so.exists():
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            cpp = Path(tmp) / "kernel.cpp"
            cpp.write_text(tu)
            out = Path(tmp) / "kernel.so"
            r = _run_gxx(["-shared", f"-I{support}", str(cpp), "-o", str(out)])
            if r.returncode != 0:
                raise MetalEmulatorCompileError(
                    _format_compile_error(kernel, r.stderr, header, source)
                )
            os.replace(out, so)
    lib = ctypes.CDLL(str(so))
    body = ctypes.cast(lib.mtl_body, ctypes.c_void_p).value
    with _LIB_LOCK:
        _LIB_CACHE[key] = (lib, body)
    return lib, body


# ---------------------------------------------------------------- inputs
class _Input:
    """An input as passed to the kernel: storage + MLX dtype + layout."""

    def __init__(self, value: Any, name: str, ensure_row_contiguous: bool):
        if isinstance(value, bool):
            arr, dt = np.array(value, dtype=np.bool_), mx.bool_
        elif isinstance(value, int):
            arr, dt = np.array(value, dtype=np.int32), mx.int32
        elif isinstance(value, float):
            arr, dt = np.array(value, dtype=np.float32), mx.float32
        elif isinstance(value, mx.array):
            dt = _as_mx_dtype(value.dtype, f"input '{name}'")
            if dt == mx.bfloat16:
                arr = np.array(value.view(mx.uint16))
            else:
                arr = np.array(value)
        elif isinstance(value, np.ndarray):
            dt = _as_mx_dtype(value.dtype, f"input '{name}'")
            arr = value
        else:
            raise TypeError(
                f"metal_emulator: input '{name}' must be an mx.array, np.ndarray "
                f"or Python scalar, got {type(value).__name__}"
            )
        itemsize = arr.dtype.itemsize
        if (ensure_row_contiguous or any(s % itemsize for s in arr.strides)) and (
            not arr.flags.c_contiguous
        ):
            arr = np.ascontiguousarray(arr)  # (0-d arrays never get here)
        self.arr = arr
        self.dtype = dt
        self.ndim = arr.ndim
        self.size = arr.size
        self.shape = np.array(arr.shape, dtype=np.int32)
        self.strides = np.array([s // itemsize for s in arr.strides], dtype=np.int64)
        self.ndim_buf = np.array(arr.ndim, dtype=np.int32)

    @property
    def type_string(self) -> str:
        return _DTYPES[self.dtype][0]


# ------------------------------------------------------------------ kernel
class EmulatedMetalKernel:
    """What :func:`metal_kernel` returns; call it like the MLX kernel."""

    def __init__(
        self, name, input_names, output_names, source, header, ensure_row_contiguous, atomic_outputs
    ):
        if not output_names:
            raise ValueError("[metal_kernel] Must specify at least one output.")
        self.name = name
        self.input_names = list(input_names)
        self.output_names = list(output_names)
        self.source = source
        self.header = header
        self.ensure_row_contiguous = ensure_row_contiguous
        self.atomic_outputs = atomic_outputs
        # MLX: plain substring search of the source text
        self.shape_infos = [
            (f"{n}_shape" in source, f"{n}_strides" in source, f"{n}_ndim" in source)
            for n in self.input_names
        ]
        self.attributes = [(a, t) for a, t in _METAL_ATTRIBUTES if a in source]
        self._checked = False

    # -- code generation -------------------------------------------------
    def _kernel_name(self, inputs, output_dtypes, template):
        kname = "custom_kernel_" + self.name
        if template:
            tdef = self._template_def(template, cxx=False)
            h = tdef.replace("<", "_").replace(">", "_").replace(", ", "_")
            kname += "_" + h[:-1]
        for x in inputs:
            kname += "_" + x.type_string
            if x.ndim == 0:
                kname += "s"
            elif x.size < _MAX_CONSTANT_ARRAY_SIZE:
                kname += "c"
        for dt in output_dtypes:
            kname += "_" + _DTYPES[dt][0]
        return kname

    @staticmethod
    def _template_value(v, cxx):
        if isinstance(v, bool):
            return ("true" if v else "false") if cxx else str(int(v))
        if isinstance(v, (int, np.integer)):
            return str(int(v))
        return _DTYPES[_as_mx_dtype(v, "template argument")][0]

    def _template_def(self, template, cxx):
        return "<" + ", ".join(self._template_value(v, cxx) for _, v in template) + ">"

    def _signature(self, kname, inputs, output_dtypes, template, metal: bool):
        """The kernel function head, as MLX writes it (``[[...]]`` kept)."""
        s = ""
        if template:
            parts = []
            for n, v in template:
                if isinstance(v, bool):
                    parts.append(f"bool {n}")
                elif isinstance(v, (int, np.integer)):
                    parts.append(f"int {n}")
                else:
                    parts.append(f"typename {n}")
            s += "template <" + ", ".join(parts) + ">\n"
        s += f"[[kernel]] void {kname}(\n"
        params = []
        index = 0
        for x, n, info in zip(inputs, self.input_names, self.shape_infos):
            loc = "constant" if x.size < _MAX_CONSTANT_ARRAY_SIZE else "device"
            ref = "&" if x.ndim == 0 else "*"
            params.append(f"  const {loc} {x.type_string}{ref} {n} [[buffer({index})]]")
            index += 1
            if x.ndim > 0:
                if info[0]:
                    params.append(f"  const constant int* {n}_shape [[buffer({index})]]")
                    index += 1
                if info[1]:
                    params.append(f"  const constant int64_t* {n}_strides [[buffer({index})]]")
                    index += 1
                if info[2]:
                    params.append(f"  const constant int& {n}_ndim [[buffer({index})]]")
                    index += 1
        for n, dt in zip(self.output_names, output_dtypes):
            t = _DTYPES[dt][0]
            if self.atomic_outputs:
                t = f"atomic<{t}>"
            params.append(f"  device {t}* {n} [[buffer({index})]]")
            index += 1
        for a, t in self.attributes:
            params.append(f"  {t} {a} [[{a}]]")
        s += ",\n".join(params) + ") {\n"
        return s

    def metal_source(self, inputs, output_dtypes, template) -> str:
        """The Metal source MLX would generate for this call."""
        kname = self._kernel_name(inputs, output_dtypes, template)
        src = self.header + self._signature(kname, inputs, output_dtypes, template, True)
        src += self.source + "\n}\n"
        if template:
            tdef = kname + self._template_def(template, cxx=False)
            src += f'\ntemplate [[host_name("{kname}")]] [[kernel]] decltype({tdef}) {tdef};\n'
        return src

    def _translation_unit(self, inputs, output_dtypes, template):
        kname = self._kernel_name(inputs, output_dtypes, template)
        rw = _Rewriter()
        header = rw(self.header)
        body = rw(self.source)
        sig = self._signature(kname, inputs, output_dtypes, template, False)
        tu = [
            '#include "metal_shim.h"',
            "#define device",
            "#define constant",
            "#define thread",
            "#define threadgroup",
            "#define kernel",
            '#line 1 "kernel_header"',
            header,
            '#line 1 "generated_signature"',
            rewrite_pointers(sig.rstrip("\n")),
            '#line 1 "kernel_source"',
            body,
            "}",
            '#line 1 "generated_launcher"',
            "#undef device",
            "#undef constant",
            "#undef thread",
            "#undef threadgroup",
            "#undef kernel",
        ]
        # the launcher: unpack the argument array and call the instantiation
        args = []
        k = 0
        for x, info in zip(inputs, self.shape_infos):
            t = x.type_string
            args.append(f"*(const {t}*)a[{k}]" if x.ndim == 0 else f"(const {t}*)a[{k}]")
            k += 1
            if x.ndim > 0:
                if info[0]:
                    args.append(f"(const int*)a[{k}]")
                    k += 1
                if info[1]:
                    args.append(f"(const int64_t*)a[{k}]")
                    k += 1
                if info[2]:
                    args.append(f"*(const int*)a[{k}]")
                    k += 1
        for dt in output_dtypes:
            t = _DTYPES[dt][0]
            if self.atomic_outputs:
                t = f"metal::atomic<{t}>"
            args.append(f"({t}*)a[{k}]")
            k += 1
        for a, _ in self.attributes:
            args.append(f"at.{a}")
        inst = kname + (self._template_def(template, cxx=True) if template else "")
        tu.append('extern "C" void mtl_body(void** a, const mtl_rt::Attrs& at) {')
        tu.append(f"  {inst}(\n      " + ",\n      ".join(args) + ");")
        tu.append("}")
        return "\n".join(tu) + "\n"

    # -- call ------------------------------------------------------------
    def __call__(
        self,
        *,
        inputs: Sequence[Any],
        output_shapes,
        output_dtypes,
        grid,
        threadgroup,
        template=None,
        init_value=None,
        verbose=False,
        stream=None,
    ):
        def check_size(actual, expected, what):
            if actual != expected:
                raise ValueError(
                    f"[metal_kernel] Expected `{what}` to have size {expected} "
                    f"but got size {actual}."
                )

        check_size(len(inputs), len(self.input_names), "inputs")
        check_size(len(output_shapes), len(self.output_names), "output_shapes")
        check_size(len(output_dtypes), len(self.output_names), "output_dtypes")
        if not self._checked:
            _check_supported(self.name, self.header, "header")
            _check_supported(self.name, self.source, "source")
            self._checked = True
        template = [(n, v) for n, v in (template or [])]
        for n, v in template:
            if not isinstance(v, (bool, int, np.integer)):
                _as_mx_dtype(v, f"template argument '{n}'")
        ins = [_Input(x, n, self.ensure_row_contiguous) for x, n in zip(inputs, self.input_names)]
        out_dts = [
            _as_mx_dtype(d, f"output '{n}'") for d, n in zip(output_dtypes, self.output_names)
        ]
        grid = tuple(int(g) for g in grid)
        tg = tuple(int(t) for t in threadgroup)
        if len(grid) != 3 or len(tg) != 3:
            raise ValueError("grid and threadgroup must have 3 entries")
        if tg[0] * tg[1] * tg[2] > 1024:
            raise ValueError(
                f"Thread group size ({tg[0] * tg[1] * tg[2]}) is greater than "
                "the maximum allowed threads per threadgroup (1024)."
            )
        if min(tg) <= 0:
            raise ValueError("threadgroup sizes must be positive")

        if verbose:
            print(
                f"Generated source code for `{self.name}`:\n```\n"
                f"{self.metal_source(ins, out_dts, template)}\n```"
            )

        tu = self._translation_unit(ins, out_dts, template)
        _, body_fn = _compile(tu, self.name, self.header, self.source)

        private_tg = _needs_private_threadgroup_memory(self.header + "\n" + self.source)
        runs = [
            self._launch(
                body_fn, ins, output_shapes, out_dts, grid, tg, init_value, schedule, private_tg
            )
            for schedule in range(_schedules())
        ]
        if not self.atomic_outputs:  # atomics may legitimately add in any order
            for schedule, outs in enumerate(runs[1:], 1):
                for a, b, n in zip(runs[0], outs, self.output_names):
                    if not np.array_equal(
                        np.array(a.view(_bits(a.dtype))), np.array(b.view(_bits(b.dtype)))
                    ):
                        raise MetalEmulatorRuntimeError(
                            f"metal_emulator: kernel '{self.name}': output '{n}' depends on "
                            f"the order in which threads run (schedule 0 vs {schedule}): a "
                            f"missing barrier, or threads racing on the same memory"
                        )
        return runs[0]

    def _launch(
        self, body_fn, ins, output_shapes, out_dts, grid, tg, init_value, schedule, private_tg
    ):
        """One run of the grid under one thread schedule; returns the outputs."""
        launch = _runtime()[2]
        # outputs with guard bytes on both sides
        outs = []
        for shape, dt in zip(output_shapes, out_dts):
            shape = tuple(int(s) for s in shape)
            np_dt = np.dtype(_DTYPES[dt][1])
            count = int(np.prod(shape, dtype=np.int64))
            nbytes = count * np_dt.itemsize
            raw = np.empty(nbytes + 2 * _guard(nbytes) + 64, dtype=np.uint8)
            off = (-raw.ctypes.data) % 64 + _guard(nbytes)
            raw[:] = 0xA5
            body = raw[off : off + count * np_dt.itemsize]
            if init_value is None:
                body[:] = 0xFF
            else:
                fill = mx.full((1,), init_value, dtype=dt)
                if dt == mx.bfloat16:
                    fill = fill.view(mx.uint16)
                body.view(np_dt)[:] = np.array(fill)[0]
            outs.append((raw, off, body, shape, dt, np_dt))

        ptrs: list[int] = []
        keep: list[Any] = []
        guarded = []
        regions = []  # (start, bytes, name, kind): every access through a pointer is checked

        def region(ptr, nbytes, name, kind):
            regions.append((ptr, nbytes, name, kind))
            return ptr

        for x, n, info in zip(ins, self.input_names, self.shape_infos):
            if x.ndim > 0 and x.arr.flags.c_contiguous:
                # a copy between 0xFF guard bytes: an out-of-bounds read gives NaN (floats) or
                # -1 (ints), which the comparison with a reference then shows
                nbytes = x.arr.nbytes
                raw = np.full(nbytes + 2 * _guard(nbytes) + 64, 0xFF, dtype=np.uint8)
                off = (-raw.ctypes.data) % 64 + _guard(nbytes)
                raw[off : off + nbytes] = x.arr.reshape(-1).view(np.uint8)
                guarded.append((raw, off, nbytes))
                ptrs.append(region(raw.ctypes.data + off, nbytes, n, _INPUT))
                keep.append(raw)
            else:
                ptrs.append(x.arr.ctypes.data)
                keep.append(x.arr)
                if x.ndim > 0:  # strided: the bytes its strides reach
                    lo = sum(min(0, (d - 1) * s) for d, s in zip(x.arr.shape, x.arr.strides))
                    hi = sum(max(0, (d - 1) * s) for d, s in zip(x.arr.shape, x.arr.strides))
                    size = 0 if x.arr.size == 0 else hi - lo + x.arr.itemsize
                    region(x.arr.ctypes.data + lo, size, n, _INPUT)
            if x.ndim > 0:
                if info[0]:
                    ptrs.append(
                        region(x.shape.ctypes.data, x.shape.nbytes, f"{n}_shape", _ARGUMENT)
                    )
                if info[1]:
                    ptrs.append(
                        region(x.strides.ctypes.data, x.strides.nbytes, f"{n}_strides", _ARGUMENT)
                    )
                if info[2]:
                    ptrs.append(x.ndim_buf.ctypes.data)
        for (raw, off, body, *_), n in zip(outs, self.output_names):
            ptrs.append(region(body.ctypes.data, body.size, n, _OUTPUT))
        names = [r[2].encode() for r in regions]
        nreg = max(1, len(regions))
        reg_lo = (ctypes.c_void_p * nreg)(*[r[0] for r in regions])
        reg_bytes = (ctypes.c_long * nreg)(*[r[1] for r in regions])
        reg_names = (ctypes.c_char_p * nreg)(*names)
        reg_kinds = (ctypes.c_int * nreg)(*[r[3] for r in regions])
        argv = (ctypes.c_void_p * max(1, len(ptrs)))(*ptrs)
        dims = (ctypes.c_long * 6)(*grid, *tg)
        workers = int(os.environ.get("MLX_METAL_EMULATOR_WORKERS", min(2, os.cpu_count() or 1)))
        stack = int(os.environ.get("MLX_METAL_EMULATOR_STACK", 256 * 1024))
        err = ctypes.create_string_buffer(4096)
        rc = launch(
            body_fn,
            argv,
            dims,
            workers,
            stack,
            schedule,
            int(private_tg),
            reg_lo,
            reg_bytes,
            reg_names,
            reg_kinds,
            len(regions),
            err,
            len(err),
        )
        for (raw, off, nbytes), n in zip(
            guarded,
            [n for x, n in zip(ins, self.input_names) if x.ndim > 0 and x.arr.flags.c_contiguous],
        ):
            if (raw[:off] != 0xFF).any() or (raw[off + nbytes :] != 0xFF).any():
                raise MetalEmulatorRuntimeError(
                    f"metal_emulator: kernel '{self.name}' wrote outside the bounds of input '{n}'"
                )
        del keep
        if rc != 0:
            raise MetalEmulatorRuntimeError(
                f"metal_emulator: kernel '{self.name}' failed: "
                + err.value.decode(errors="replace")
            )

        results = []
        for (raw, off, body, shape, dt, np_dt), n in zip(outs, self.output_names):
            if (raw[:off] != 0xA5).any() or (raw[off + body.size :] != 0xA5).any():
                raise MetalEmulatorRuntimeError(
                    f"metal_emulator: kernel '{self.name}' wrote outside the bounds of output '{n}'"
                )
            arr = body.view(np_dt).reshape(shape).copy()
            a = mx.array(arr)
            if dt == mx.bfloat16:
                a = a.view(mx.bfloat16)
            results.append(a)
        return results


def _bits(dt: mx.Dtype) -> mx.Dtype:
    return {1: mx.uint8, 2: mx.uint16, 4: mx.uint32, 8: mx.uint64}[dt.size]


def metal_kernel(
    name: str,
    input_names: Sequence[str],
    output_names: Sequence[str],
    source: str,
    header: str = "",
    ensure_row_contiguous: bool = True,
    atomic_outputs: bool = False,
) -> EmulatedMetalKernel:
    """Drop-in replacement for ``mx.fast.metal_kernel`` that runs on the CPU."""
    return EmulatedMetalKernel(
        name, input_names, output_names, source, header, ensure_row_contiguous, atomic_outputs
    )
