"""Tests of the CPU Metal-kernel emulator (tests/metal_emulator).

The emulator has to be trusted before it is used to test the project's
kernels, so this file checks it on kernels whose answer is known (numpy),
shows that threads of a threadgroup really interleave (a missing barrier
gives a wrong answer), runs mlx-lm's own Gated DeltaNet kernels against
MLX's ops implementation, and checks that unsupported constructs and broken
kernels are refused with clear messages.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

import mlx.core as mx

from tests.metal_emulator import (
    MetalEmulatorCompileError,
    MetalEmulatorRuntimeError,
    UnsupportedMetalConstruct,
    metal_kernel,
)
from tests.numerics import assert_close


def _np(a: mx.array) -> np.ndarray:
    return np.array(a.astype(mx.float32))


# ----------------------------------------------------------------- basics
EXP_SOURCE = """
    uint elem = thread_position_in_grid.x;
    T tmp = inp[elem];
    out[elem] = metal::exp(tmp);
"""


@pytest.mark.parametrize(  # 4 units of rounding of each dtype (float32: ~17, for Metal's exp)
    "dtype,tol", [(mx.float32, 1e-6), (mx.float16, 2**-9), (mx.bfloat16, 2**-6)]
)
def test_elementwise_exp_template_dtype(dtype, tol):
    k = metal_kernel("myexp", ["inp"], ["out"], EXP_SOURCE)
    x = mx.random.normal((4, 40), key=mx.random.key(0)).astype(dtype)
    (out,) = k(
        inputs=[x],
        template=[("T", dtype)],
        grid=(x.size, 1, 1),
        threadgroup=(64, 1, 1),  # 160 threads: the last group is partial
        output_shapes=[x.shape],
        output_dtypes=[dtype],
    )
    assert isinstance(out, mx.array) and out.dtype == dtype and out.shape == x.shape
    ref = np.exp(_np(x))
    # the result is the exact-exp rounded to dtype: compare each element's relative error
    # (an elementwise op: no sum, so the bound is per element, through out / ref vs 1)
    assert_close(_np(out) / ref, np.ones_like(ref), rtol=tol, what="exp / exact exp")
    # same rounding as MLX
    assert_close(_np(out) / _np(mx.exp(x)), np.ones_like(ref), rtol=tol, what="exp / mx.exp")


def test_generated_signature_mirrors_mlx(capsys):
    src = """
        uint i = thread_position_in_grid.x;
        out[i] = a[i] * s + (a_ndim > 0 ? a_shape[0] : 0) + flag;
    """
    k = metal_kernel("sig", ["a", "s"], ["out"], src)
    a = mx.arange(10, dtype=mx.float32)
    (out,) = k(
        inputs=[a, 2.0],
        template=[("flag", True), ("N", 3), ("T", mx.float32)],
        grid=(10, 1, 1),
        threadgroup=(32, 1, 1),
        output_shapes=[(10,)],
        output_dtypes=[mx.float32],
        verbose=True,
    )
    text = capsys.readouterr().out
    assert "template <bool flag, int N, typename T>" in text
    assert "const device float* a [[buffer(0)]]" in text
    assert "const constant int* a_shape [[buffer(1)]]" in text
    assert "a_strides" not in text  # only added when the source uses it
    assert "const constant int& a_ndim [[buffer(2)]]" in text
    assert "const constant float& s [[buffer(3)]]" in text  # Python float: 0-d
    assert "device float* out [[buffer(4)]]" in text
    assert "uint3 thread_position_in_grid [[thread_position_in_grid]]" in text
    assert "custom_kernel_sig__1_3_float_float_floats_float" in text
    np.testing.assert_array_equal(np.array(out), np.arange(10) * 2.0 + 10 + 1)


def test_outputs_start_as_garbage_or_init_value():
    src = """
        uint i = thread_position_in_grid.x;
        if (i % 2 == 0) { out[i] = 1.0f; }
    """
    k = metal_kernel("half_writer", ["inp"], ["out"], src)
    args = dict(
        inputs=[mx.zeros((8,))],
        grid=(8, 1, 1),
        threadgroup=(8, 1, 1),
        output_shapes=[(8,)],
        output_dtypes=[mx.float32],
    )
    (garbage,) = k(**args)
    g = np.array(garbage)
    assert (g[::2] == 1).all() and np.isnan(g[1::2]).all()
    (init,) = k(**args, init_value=5)
    np.testing.assert_array_equal(np.array(init), [1, 5] * 4)


def test_strided_input_with_elem_to_loc():
    # the example from MLX's custom_metal_kernels docs
    src = """
        uint elem = thread_position_in_grid.x;
        // Utils from `mlx/backend/metal/kernels/utils.h` are automatically included
        uint loc = elem_to_loc(elem, inp_shape, inp_strides, inp_ndim);
        T tmp = inp[loc];
        out[elem] = metal::exp(tmp);
    """
    k = metal_kernel("myexp_strided", ["inp"], ["out"], src, ensure_row_contiguous=False)
    x = np.random.default_rng(0).standard_normal((5, 7)).astype(np.float32).T
    assert not x.flags.c_contiguous
    (out,) = k(
        inputs=[x],
        template=[("T", mx.float32)],
        grid=(x.size, 1, 1),
        threadgroup=(16, 1, 1),
        output_shapes=[x.shape],
        output_dtypes=[mx.float32],
    )
    assert_close(np.array(out) / np.exp(x), np.ones_like(x), rtol=1e-6, what="exp / exact exp")


def test_vectors_swizzles_half_literals_and_atomics():
    src = """
        uint i = thread_position_in_grid.x;
        float4 v = float4(inp[4 * i], inp[4 * i + 1], inp[4 * i + 2], inp[4 * i + 3]);
        float2 lo = v.xy;
        float3 rev = v.zyx;
        half h = static_cast<half>(v.w) * 2.0h;
        // atomic_outputs=True makes every output `device atomic<T>*` (as in MLX)
        atomic_store_explicit(&out[i], dot(lo, lo) + rev.x + float(h) + metal::max(v, 0.0f).w,
                              memory_order_relaxed);
        atomic_fetch_add_explicit(&total[0], 1, memory_order_relaxed);
    """
    k = metal_kernel("vecs", ["inp"], ["out", "total"], src, atomic_outputs=True)
    x = np.arange(32, dtype=np.float32) - 10
    out, total = k(
        inputs=[x],
        grid=(8, 1, 1),
        threadgroup=(8, 1, 1),
        output_shapes=[(8,), (1,)],
        output_dtypes=[mx.float32, mx.float32],
        init_value=0,
    )
    v = x.reshape(8, 4)
    ref = v[:, 0] ** 2 + v[:, 1] ** 2 + v[:, 2] + 2 * v[:, 3] + np.maximum(v[:, 3], 0)
    assert_close(out, ref, rtol=1e-7, what="vector arithmetic")
    assert np.array(total)[0] == 8


# ------------------------------------------------ threadgroup memory / simd
REDUCE_SOURCE = """
    threadgroup float buf[256];
    uint tid = thread_position_in_threadgroup.x;
    uint n = threads_per_threadgroup.x;
    buf[tid] = inp[thread_position_in_grid.x];
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (uint s = n / 2; s > 0; s >>= 1) {
        if (tid < s) {
            buf[tid] += buf[tid + s];
        }
        BARRIER
    }
    if (tid == 0) {
        out[threadgroup_position_in_grid.x] = buf[0];
    }
"""


def _reduce(barrier: str, x: np.ndarray, tg: int = 256):
    k = metal_kernel(
        "tg_reduce" + ("_racy" if not barrier else ""),
        ["inp"],
        ["out"],
        REDUCE_SOURCE.replace("BARRIER", barrier),
    )
    (out,) = k(
        inputs=[x],
        grid=(x.size, 1, 1),
        threadgroup=(tg, 1, 1),
        output_shapes=[(x.size // tg,)],
        output_dtypes=[mx.float32],
    )
    return np.array(out)


def test_threadgroup_memory_reduction():
    x = np.random.default_rng(1).standard_normal(4 * 256).astype(np.float32)
    out = _reduce("threadgroup_barrier(mem_flags::mem_threadgroup);", x)
    assert_close(out, x.reshape(4, 256).sum(1), rtol=1e-5, what="threadgroup sums")


def test_simd_sum_reduction():
    src = """
        threadgroup float partial[32];
        uint lane = thread_index_in_simdgroup;
        uint sg = simdgroup_index_in_threadgroup;
        float v = simd_sum(inp[thread_position_in_grid.x]);
        if (lane == 0) { partial[sg] = v; }
        threadgroup_barrier(mem_flags::mem_threadgroup);
        if (sg == 0) {
            float p = lane < simdgroups_per_threadgroup ? partial[lane] : 0.0f;
            p = simd_sum(p);
            if (lane == 0) { out[threadgroup_position_in_grid.x] = p; }
        }
    """
    k = metal_kernel("simd_reduce", ["inp"], ["out"], src)
    x = np.random.default_rng(2).standard_normal(3 * 1024).astype(np.float32)
    (out,) = k(
        inputs=[x],
        grid=(x.size, 1, 1),
        threadgroup=(1024, 1, 1),
        output_shapes=[(3,)],
        output_dtypes=[mx.float32],
    )
    assert_close(out, x.reshape(3, 1024).sum(1), rtol=1e-5, what="simd sums")


def test_simd_lane_operations():
    src = """
        uint i = thread_position_in_grid.x;
        float v = inp[i];
        out[6 * i + 0] = simd_prefix_inclusive_sum(v);
        out[6 * i + 1] = simd_prefix_exclusive_sum(v);
        out[6 * i + 2] = simd_shuffle_xor(v, 5);
        out[6 * i + 3] = simd_shuffle_down(v, 3);
        out[6 * i + 4] = simd_max(v) + simd_broadcast(v, 7);
        out[6 * i + 5] = quad_sum(v);
    """
    k = metal_kernel("simd_lanes", ["inp"], ["out"], src)
    x = np.arange(64, dtype=np.float32) ** 1.5 % 17
    (out,) = k(
        inputs=[x],
        grid=(64, 1, 1),
        threadgroup=(64, 1, 1),
        output_shapes=[(64 * 6,)],
        output_dtypes=[mx.float32],
    )
    got = np.array(out).reshape(64, 6)
    lanes = x.reshape(2, 32)
    lane = np.arange(32)
    ref = np.stack(
        [
            np.cumsum(lanes, 1),
            np.cumsum(lanes, 1) - lanes,
            lanes[:, lane ^ 5],
            np.where(lane + 3 < 32, lanes[:, np.minimum(lane + 3, 31)], lanes),
            lanes.max(1, keepdims=True) + lanes[:, 7:8] + 0 * lanes,
            lanes.reshape(2, 8, 4).sum(2).repeat(4, 1),
        ],
        axis=-1,
    ).reshape(64, 6)
    assert_close(got, ref, rtol=1e-6, what="lane operations")


# ------------------------------------------------- threads run concurrently
BARRIER_SOURCE = """
    threadgroup float buf[64];
    uint i = thread_position_in_threadgroup.x;
    buf[i] = inp[thread_position_in_grid.x] * 2.0f;
    BARRIER
    out[thread_position_in_grid.x] = buf[(i + 1) % threads_per_threadgroup.x];
"""


def _neighbour(barrier: str):
    k = metal_kernel(
        "neighbour" + ("" if barrier else "_racy"),
        ["inp"],
        ["out"],
        BARRIER_SOURCE.replace("BARRIER", barrier),
    )
    x = np.arange(128, dtype=np.float32)
    (out,) = k(
        inputs=[x],
        grid=(128, 1, 1),
        threadgroup=(64, 1, 1),
        output_shapes=[(128,)],
        output_dtypes=[mx.float32],
    )
    ref = 2 * np.roll(x.reshape(2, 64), -1, axis=1).ravel()
    return np.array(out), ref


def test_barrier_makes_neighbour_exchange_correct():
    out, ref = _neighbour("threadgroup_barrier(mem_flags::mem_threadgroup);")
    np.testing.assert_array_equal(out, ref)


def test_missing_barrier_gives_wrong_answer(monkeypatch):
    # thread i reads what thread i+1 wrote; without the barrier it reads
    # threadgroup memory that was not written yet (NaN garbage) in one schedule
    # and the right value in another: every launch runs several schedules and
    # their outputs must agree bitwise.
    with pytest.raises(
        MetalEmulatorRuntimeError, match="depends on the order in which threads run"
    ):
        _neighbour("")
    x = np.random.default_rng(3).standard_normal(2 * 256).astype(np.float32)
    with pytest.raises(MetalEmulatorRuntimeError, match="depends on the order"):
        _reduce("", x)
    # one schedule (lowest thread index first): the answer itself is wrong
    monkeypatch.setenv("MLX_METAL_EMULATOR_SCHEDULES", "1")
    out, ref = _neighbour("")
    assert not np.array_equal(out, ref)
    assert np.isnan(out).any()
    racy = _reduce("", x)
    assert not np.allclose(racy, x.reshape(2, 256).sum(1), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("flags", ["mem_flags::mem_none", "mem_flags::mem_device"])
def test_barrier_without_threadgroup_flag_does_not_order_threadgroup_memory(flags):
    # an execution barrier whose flags leave out mem_threadgroup: on a GPU the
    # neighbour's write need not be visible; here it never is (NaN), whatever the schedule
    out, ref = _neighbour(f"threadgroup_barrier({flags});")
    assert np.isnan(out).all()
    both = _neighbour(f"threadgroup_barrier({flags} | mem_flags::mem_threadgroup);")
    np.testing.assert_array_equal(*both)


def test_schedules_differ_and_a_race_is_reported(monkeypatch):
    # every thread writes its index to one threadgroup variable: which write lands last
    # depends on the schedule (0: lowest index first, 1: highest first, 2+: random)
    src = """
        threadgroup uint last;
        last = thread_index_in_threadgroup;
        threadgroup_barrier(mem_flags::mem_threadgroup);
        out[thread_position_in_grid.x] = last;
    """
    k = metal_kernel("last_writer", ["inp"], ["out"], src)
    args = dict(
        inputs=[np.zeros(1, np.float32)],
        grid=(64, 1, 1),
        threadgroup=(64, 1, 1),
        output_shapes=[(64,)],
        output_dtypes=[mx.uint32],
    )
    with pytest.raises(MetalEmulatorRuntimeError, match="output 'out' depends on the order"):
        k(**args)
    monkeypatch.setenv("MLX_METAL_EMULATOR_SCHEDULES", "1")
    assert (np.array(k(**args)[0]) == 63).all()


# ------------------------------------------------ bounds of every access
def _run1(src, inputs, n_out=4, tg=4, header="", template=None, name="oob"):
    k = metal_kernel(name, ["inp"], ["out"], src, header=header)
    return k(
        inputs=inputs,
        grid=(n_out, 1, 1),
        threadgroup=(tg, 1, 1),
        template=template,
        output_shapes=[(n_out,)],
        output_dtypes=[mx.float32],
    )[0]


@pytest.mark.parametrize(
    "src,what",
    [
        (
            "out[thread_position_in_grid.x] = inp[thread_position_in_grid.x + 1];",
            "input 'inp': element 4 of 4",
        ),
        (
            "out[thread_position_in_grid.x] = inp[int(thread_position_in_grid.x) - 1];",
            "input 'inp': element -1 of 4",
        ),
        # read, then masked: the value is thrown away, the read is still reported
        (
            "uint i = thread_position_in_grid.x; float x = inp[i + 1]; out[i] = i < 3 ? x : 0.0f;",
            "input 'inp': element 4 of 4",
        ),
        # through a pointer offset into the buffer, and through a helper taking `const device T*`
        (
            "auto p = inp + 2; out[thread_position_in_grid.x] = p[thread_position_in_grid.x];",
            "input 'inp': element 4 of 4",
        ),
        (
            "out[thread_position_in_grid.x] = second(inp + thread_position_in_grid.x);",
            "input 'inp': element 4 of 4",
        ),
        # a vector view of the buffer (a cast keeps its bounds)
        (
            "auto v = reinterpret_cast<const device float2*>(inp);"
            " out[thread_position_in_grid.x] = v[thread_position_in_grid.x].x;",
            "input 'inp': element 2 of 2 (8-byte elements)",
        ),
    ],
)
def test_out_of_bounds_read_is_reported(src, what):
    header = "template <typename T> float second(const device T* p) { return p[1]; }"
    with pytest.raises(
        MetalEmulatorRuntimeError, match=r"out-of-bounds read of " + re.escape(what)
    ):
        _run1(src, [np.arange(4, dtype=np.float32)], header=header)


def test_reads_in_bounds_pass_and_guards_stay_garbage():
    src = """uint i = thread_position_in_grid.x;
             auto v = (const device float2*)(inp);
             out[i] = i < 2 ? v[i].y : second(inp + i - 1);"""
    header = "template <typename T> float second(const device T* p) { return p[1]; }"
    out = _run1(src, [np.arange(4, dtype=np.float32)], header=header)
    np.testing.assert_array_equal(np.array(out), [1, 3, 2, 3])


@pytest.mark.parametrize(
    "src,what",
    [
        # an array sized by the wrong constant: thread 4.. writes past it (into `b` in memory)
        (
            "threadgroup float a[N]; threadgroup float b[N]; uint i = thread_position_in_threadgroup.x;"
            " a[i] = 1; b[i] = 2; threadgroup_barrier(mem_flags::mem_threadgroup);"
            " out[thread_position_in_grid.x] = a[0] + b[0];",
            r"threadgroup array 'a': element 4 of 4",
        ),
        # a read past it whose value is masked afterwards
        (
            "threadgroup float a[N]; uint i = thread_position_in_threadgroup.x;"
            " if (i < N) a[i] = 1; threadgroup_barrier(mem_flags::mem_threadgroup);"
            " float x = a[i]; out[thread_position_in_grid.x] = i < N ? x : 0.0f;",
            r"threadgroup array 'a': element [4-7] of 4",
        ),
        # through a pointer into it, and through the address of an element
        (
            "threadgroup float a[N]; threadgroup float* p = a + 2; a[thread_position_in_threadgroup.x % N] = 0;"
            " threadgroup_barrier(mem_flags::mem_threadgroup); out[thread_position_in_grid.x] = p[2];",
            r"threadgroup array 'a': element 4 of 4",
        ),
        (
            "threadgroup float a[N]; threadgroup float* p = &a[1]; a[thread_position_in_threadgroup.x % N] = 0;"
            " threadgroup_barrier(mem_flags::mem_threadgroup); out[thread_position_in_grid.x] = p[3];",
            r"threadgroup array 'a': element 4 of 4",
        ),
        # a row of a two-dimensional array
        (
            "threadgroup float m[2][N]; m[thread_position_in_threadgroup.x % 2][thread_position_in_threadgroup.x / 2 + 1] = 0;"
            " threadgroup_barrier(mem_flags::mem_threadgroup); out[thread_position_in_grid.x] = m[0][0];",
            r"threadgroup array 'm': element 4 of 4",
        ),  # of the row
        (
            "threadgroup float m[2][N]; m[thread_position_in_threadgroup.x % N][0] = 0;"
            " threadgroup_barrier(mem_flags::mem_threadgroup); out[thread_position_in_grid.x] = m[0][0];",
            r"threadgroup array 'm': element [23] of 2 \(16-byte elements\)",
        ),  # rows
        # the private threadgroup-memory mode (a barrier without mem_threadgroup) checks too
        (
            "threadgroup float a[N]; a[thread_position_in_threadgroup.x] = 1;"
            " threadgroup_barrier(mem_flags::mem_none); out[thread_position_in_grid.x] = 0;",
            r"threadgroup array 'a': element 4 of 4",
        ),
    ],
)
def test_threadgroup_memory_is_bounds_checked(src, what):
    # `what` is a regular expression (which thread trips first depends on the schedule)
    with pytest.raises(MetalEmulatorRuntimeError, match=r"out-of-bounds access to " + what):
        _run1(src, [np.zeros(4, np.float32)], n_out=8, tg=8, template=[("N", 4)], name="tg_oob")


def test_threadgroup_arrays_in_bounds_pass():
    src = """
        threadgroup float a[N];
        threadgroup float m[2][N];
        uint i = thread_position_in_threadgroup.x;
        a[i] = inp[i];
        m[i % 2][i / 2] = 2 * inp[i];
        threadgroup_barrier(mem_flags::mem_threadgroup);
        threadgroup float* p = &a[1];
        out[thread_position_in_grid.x] = p[(i + 1) % 3] + m[1][N / 2 - 1];
    """
    x = np.arange(4, dtype=np.float32)
    out = _run1(src, [x], n_out=4, tg=4, template=[("N", 4)], name="tg_ok")
    np.testing.assert_array_equal(np.array(out), [2 + 6, 3 + 6, 1 + 6, 2 + 6])


def test_divergent_collectives_and_deadlock_are_reported():
    div = metal_kernel(
        "divergent",
        ["inp"],
        ["out"],
        """
        uint i = thread_position_in_grid.x;
        float v = inp[i];
        if (thread_index_in_simdgroup < 16) { v = simd_sum(v); } else { v = simd_max(v); }
        out[i] = v;
        """,
    )
    args = dict(
        inputs=[np.ones(32, np.float32)],
        grid=(32, 1, 1),
        threadgroup=(32, 1, 1),
        output_shapes=[(32,)],
        output_dtypes=[mx.float32],
    )
    with pytest.raises(MetalEmulatorRuntimeError, match="divergent SIMD-group collectives"):
        div(**args)
    dead = metal_kernel(
        "deadlock",
        ["inp"],
        ["out"],
        """
        uint i = thread_position_in_grid.x;
        float v = inp[i];
        if (thread_index_in_simdgroup < 16) { v = simd_sum(v); }
        threadgroup_barrier(mem_flags::mem_none);
        out[i] = v;
        """,
    )
    with pytest.raises(MetalEmulatorRuntimeError, match="deadlock"):
        dead(**args)


# ------------------------------------------------------------ simdgroup matrices
def _apple_lane_layout():
    """(row, col) of each lane's two elements in an 8x8 simdgroup matrix (Apple's layout)."""
    rows, cols = [], []
    for lane in range(32):
        q = lane // 4
        r, c = (q & 4) + (lane // 2) % 4, (q & 2) * 2 + (lane % 2) * 2
        rows += [r, r]
        cols += [c, c + 1]
    return np.array(rows), np.array(cols)


def test_simdgroup_matrix_lane_layout():
    src = """
        simdgroup_float8x8 m;
        simdgroup_load(m, inp, 8);
        uint lane = thread_index_in_simdgroup;
        out[2 * lane] = m.thread_elements()[0];
        out[2 * lane + 1] = m.thread_elements()[1];
    """
    k = metal_kernel("mma_layout", ["inp"], ["out"], src)
    x = np.arange(64, dtype=np.float32)
    (out,) = k(
        inputs=[x],
        grid=(32, 1, 1),
        threadgroup=(32, 1, 1),
        output_shapes=[(64,)],
        output_dtypes=[mx.float32],
    )
    rows, cols = _apple_lane_layout()
    np.testing.assert_array_equal(np.array(out), rows * 8 + cols)
    # every element is held by exactly one lane
    assert len(set(zip(rows, cols))) == 64


MMA_SOURCE = """
    // D = A B + C for an 8x8 block of a [16, 16] A (origin x=8, y=0) and a B loaded
    // transposed (B = Bt^T), in T; D stored at origin (0, 8) of a [16, 8] output
    simdgroup_matrix<T, 8, 8> a, b, c, d;
    simdgroup_load(a, A, 16, ulong2(8, 0));
    simdgroup_load(b, Bt, 8, ulong2(0, 0), true);
    simdgroup_load(c, C, 8);
    simdgroup_multiply_accumulate(d, a, b, c);
    simdgroup_store(d, D, 8, ulong2(0, 8));
    simdgroup_matrix<T, 8, 8> e = make_filled_simdgroup_matrix<T, 8, 8>(T(0));
    simdgroup_multiply(e, a, simdgroup_matrix<T, 8, 8>(T(2)));  // A times 2 I
    simdgroup_store(e, D, 8, ulong2(0, 0));
"""


@pytest.mark.parametrize(
    "dtype,tol",
    [
        (mx.float32, 1e-5),
        (mx.float16, 2**-8),  # 4 ulps
        (mx.bfloat16, 2**-5),
    ],
)
def test_simdgroup_multiply_accumulate_matches_numpy(dtype, tol):
    rng = np.random.default_rng(5)
    A, Bt, C = (rng.standard_normal(s).astype(np.float32) for s in ((16, 16), (8, 8), (8, 8)))
    k = metal_kernel("mma", ["A", "Bt", "C"], ["D"], MMA_SOURCE)
    ins = [mx.array(x).astype(dtype) for x in (A, Bt, C)]
    (D,) = k(
        inputs=ins,
        template=[("T", dtype)],
        grid=(32, 1, 1),
        threadgroup=(32, 1, 1),
        output_shapes=[(16, 8)],
        output_dtypes=[dtype],
    )
    assert D.dtype == dtype  # a half / bfloat16 output
    a, bt, c = (_np(x) for x in ins)
    ref = np.concatenate([2 * a[0:8, 8:16], a[0:8, 8:16] @ bt.T + c])
    assert_close(D, ref, rtol=tol, what="simdgroup matrices")


def test_simdgroup_multiply_needs_every_lane():
    src = """
        simdgroup_float8x8 a, d;
        simdgroup_load(a, inp, 8);
        if (thread_index_in_simdgroup < 16) { simdgroup_multiply(d, a, a); }
        out[thread_index_in_simdgroup] = 0;
    """
    k = metal_kernel("mma_divergent", ["inp"], ["out"], src)
    with pytest.raises(MetalEmulatorRuntimeError, match="only some lanes"):
        k(
            inputs=[np.zeros(64, np.float32)],
            grid=(32, 1, 1),
            threadgroup=(32, 1, 1),
            output_shapes=[(32,)],
            output_dtypes=[mx.float32],
        )


# ------------------------------------------------------------ refusals
def test_unsupported_construct_is_refused():
    src = """
        simdgroup_matrix<float, 16, 16> a;
        simdgroup_load(a, inp, 16);
        out[0] = 0;
    """
    k = metal_kernel("mma", ["inp"], ["out"], src)
    with pytest.raises(UnsupportedMetalConstruct) as e:
        k(
            inputs=[np.zeros(64, np.float32)],
            grid=(32, 1, 1),
            threadgroup=(32, 1, 1),
            output_shapes=[(1,)],
            output_dtypes=[mx.float32],
        )
    msg = str(e.value)
    assert "simdgroup_matrix" in msg and "line 2" in msg and "'mma'" in msg


def test_compile_error_points_at_kernel_source_line():
    src = """
        uint i = thread_position_in_grid.x;
        out[i] = undefined_thing(inp[i]);
    """
    k = metal_kernel("broken", ["inp"], ["out"], src)
    with pytest.raises(MetalEmulatorCompileError) as e:
        k(
            inputs=[np.zeros(4, np.float32)],
            grid=(4, 1, 1),
            threadgroup=(4, 1, 1),
            output_shapes=[(4,)],
            output_dtypes=[mx.float32],
        )
    msg = str(e.value)
    assert "kernel_source:3" in msg and "undefined_thing" in msg


def test_out_of_bounds_write_is_reported():
    k = metal_kernel("oob", ["inp"], ["out"], "out[thread_position_in_grid.x + 1] = inp[0];")
    with pytest.raises(
        MetalEmulatorRuntimeError, match="out-of-bounds access to output 'out': element 4 of 4"
    ):
        k(
            inputs=[np.zeros(4, np.float32)],
            grid=(4, 1, 1),
            threadgroup=(4, 1, 1),
            output_shapes=[(4,)],
            output_dtypes=[mx.float32],
        )


# ---------------------------------------------------- mlx-lm GDN kernels
gd = pytest.importorskip("mlx_lm.models.gated_delta")


@pytest.fixture
def emulated_gdn(monkeypatch):
    """mlx-lm's gated_delta module with its Metal kernels built by the
    emulator (the builders only run when Metal is available)."""
    monkeypatch.setattr(mx.metal, "is_available", lambda: True)
    monkeypatch.setattr(mx.fast, "metal_kernel", metal_kernel)
    built = {
        "_gated_delta_kernel": gd._make_gated_delta_kernel(has_mask=False, vectorized=False),
        "_gated_delta_kernel_masked": gd._make_gated_delta_kernel(has_mask=True, vectorized=False),
        "_gated_delta_kernel_vec": gd._make_gated_delta_kernel(has_mask=False, vectorized=True),
        "_gated_delta_kernel_vec_masked": gd._make_gated_delta_kernel(
            has_mask=True, vectorized=True
        ),
    }
    if hasattr(gd, "_make_gated_delta_packed_kernel"):
        built["_gated_delta_kernel_packed"] = gd._make_gated_delta_packed_kernel()
    if hasattr(gd, "_make_gated_delta_kernel_xtree"):
        built["_gated_delta_kernel_xtree"] = gd._make_gated_delta_kernel_xtree()
    for name, kern in built.items():
        assert kern is not None
        monkeypatch.setattr(gd, name, kern)
    # the kernels are used on the CPU, whatever the module decides
    monkeypatch.setattr(mx.metal, "is_available", lambda: False)
    return gd


def _gdn_inputs(B, T, Hk, Hv, Dk, Dv, dtype, vectorized=False, masked=False, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, T, Hk, Dk)).astype(np.float32) / np.sqrt(Dk)
    k = rng.standard_normal((B, T, Hk, Dk)).astype(np.float32)
    k /= np.linalg.norm(k, axis=-1, keepdims=True)
    v = rng.standard_normal((B, T, Hv, Dv)).astype(np.float32)
    gshape = (B, T, Hv, Dk) if vectorized else (B, T, Hv)
    g = rng.uniform(0.5, 1.0, gshape).astype(np.float32)
    beta = rng.uniform(0.0, 1.0, (B, T, Hv)).astype(np.float32)
    state = rng.standard_normal((B, Hv, Dv, Dk)).astype(np.float32)
    mask = mx.array(rng.uniform(size=(B, T)) > 0.3) if masked else None
    cast = lambda a: mx.array(a).astype(dtype)  # noqa: E731
    return cast(q), cast(k), cast(v), mx.array(g), cast(beta), mx.array(state), mask


GDN_CASES = [
    # name, Dk, dtype, variant
    ("plain_f32_dk32", 32, mx.float32, "plain"),
    ("plain_bf16_dk32", 32, mx.bfloat16, "plain"),
    ("plain_f32_dk128", 128, mx.float32, "plain"),
    ("masked_f32_dk32", 32, mx.float32, "masked"),
    ("vec_f32_dk32", 32, mx.float32, "vec"),
    ("packed_f32_dk128", 128, mx.float32, "packed"),
    ("packed_bf16_dk128", 128, mx.bfloat16, "packed"),
]


@pytest.mark.parametrize("case,Dk,dtype,variant", GDN_CASES, ids=[c[0] for c in GDN_CASES])
def test_mlx_lm_gdn_kernel_matches_mlx_ops(emulated_gdn, case, Dk, dtype, variant):
    if variant == "packed" and not hasattr(emulated_gdn, "_make_gated_delta_packed_kernel"):
        pytest.skip("this mlx-lm has no packed GDN kernel")
    B, T, Hk, Hv, Dv = 2, 5, 2, 4, 16
    q, k, v, g, beta, state, mask = _gdn_inputs(
        B, T, Hk, Hv, Dk, Dv, dtype, vectorized=variant == "vec", masked=variant == "masked"
    )
    if variant == "packed":  # Dk == 128, scalar gate: mlx-lm picks the packed kernel
        y, st = emulated_gdn.gated_delta_kernel(q, k, v, g, beta, state)
    else:
        fn = getattr(emulated_gdn, "gated_delta_kernel_unpacked", emulated_gdn.gated_delta_kernel)
        y, st = fn(q, k, v, g, beta, state, mask)
    assert y.dtype == dtype and st.dtype == mx.float32
    # Reference 1: mlx-lm's ops loop (same float32 arithmetic as the kernel;
    # for masked steps it still computes y, which the kernel sets to 0).
    y_ops, st_ops = emulated_gdn.gated_delta_ops(q, k, v, g, beta, state, mask)
    # Reference 2: MLX's fused op on the CPU (scalar gates only; it rounds
    # some intermediates to the input dtype, hence the looser bf16 bound).
    if variant == "vec":
        y_fast, st_fast = y_ops, st_ops
    else:
        y_fast, st_fast = mx.fast.gated_delta_update(q, k, v, g, beta, state, mask)

    def maxdiff(a, b):
        return float(np.abs(_np(a) - _np(b)).max())

    dy_ops = None if mask is not None else maxdiff(y, y_ops)
    ds_ops = maxdiff(st, st_ops)
    dy_fast, ds_fast = maxdiff(y, y_fast), maxdiff(st, st_fast)
    print(
        f"\n[GDN {case}] vs ops loop: max|dy|={dy_ops} max|dstate|={ds_ops:.3g}; "
        f"vs mx.fast.gated_delta_update: max|dy|={dy_fast:.3g} max|dstate|={ds_fast:.3g}"
    )
    ytol = 1e-2 if dtype == mx.bfloat16 else 1e-5  # y is rounded to dtype
    assert_close(st, st_ops, rtol=1e-5, what="state vs ops")
    if dy_ops is not None:
        assert_close(y, y_ops, rtol=ytol, what="y vs ops")
    fast_tol = 2e-2 if dtype == mx.bfloat16 else 1e-5
    assert_close(y, y_fast, rtol=fast_tol, what="y vs mx.fast")
    assert_close(st, st_fast, rtol=fast_tol, what="state vs mx.fast")


def test_mlx_lm_packed_gdn_is_bitwise_equal_to_xtree(emulated_gdn):
    if not hasattr(emulated_gdn, "gated_delta_kernel_xtree"):
        pytest.skip("this mlx-lm has no explicit-tree GDN comparator")
    q, k, v, g, beta, state, _ = _gdn_inputs(2, 5, 2, 4, 128, 16, mx.float32, seed=1)
    y_p, st_p = emulated_gdn.gated_delta_kernel(q, k, v, g, beta, state)
    y_x, st_x = emulated_gdn.gated_delta_kernel_xtree(q, k, v, g, beta, state)
    np.testing.assert_array_equal(np.array(y_p), np.array(y_x))
    np.testing.assert_array_equal(np.array(st_p), np.array(st_x))
