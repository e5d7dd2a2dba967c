"""The one way the tests compare floating-point results: a bound relative to the reference's
scale, like mlx_sleep/kernels.py's `_compare`.

    assert_close(actual, expected, rtol, atol=0.0, what="")

passes when max|actual - expected| <= rtol * max|expected| + atol, per tensor. Rounding errors of
float32 sums taken in another order (another BLAS, thread count, chunking, process split) are a
fraction of the magnitudes summed, i.e. of the tensor's scale, not of each element: a small
entry of a large tensor can carry an error far above rtol times itself. So per-element bounds
(np.allclose) fail on machines that sum in another order; this one does not.

Picking rtol: float32 accumulations ~1e-5..1e-4 (more for long sums and deep graphs), float16
~2e-3, bfloat16 ~2e-2. atol is a floor for references that can be all (near) zero.

With MLX_SLEEP_TOLERANCE_LOG=path set, every call appends one JSON line to path: the test
(pytest's PYTEST_CURRENT_TEST), `what`, the error, the tolerance and margin = error / tolerance.
tests/check_tolerances.py runs the tests that use this under several BLAS settings and fails
when a margin exceeds 0.5 (docs/tests.md).
"""

import json
import math
import os

import numpy as np


def _leaves(tree):
    """[(key, float64 numpy array)] of an array, a scalar or a dict/list/tuple tree of them."""
    from mlx.utils import tree_flatten

    import mlx.core as mx

    out = []
    for key, leaf in tree_flatten(tree) if isinstance(tree, (dict, list, tuple)) else [("", tree)]:
        if isinstance(leaf, mx.array):
            leaf = np.array(leaf.astype(mx.float32) if leaf.dtype == mx.bfloat16 else leaf)
        out.append((key, np.asarray(leaf, dtype=np.float64)))
    return out


def _log(record):
    path = os.environ.get("MLX_SLEEP_TOLERANCE_LOG")
    if not path:
        return
    test = os.environ.get("PYTEST_CURRENT_TEST", "")
    record = {"test": test.rsplit(" (", 1)[0], **record}
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def assert_close(actual, expected, rtol, atol=0.0, what="", scale=None, floor=0.0):
    """Assert max|actual - expected| <= rtol * scale + atol + floor * tree_scale for every tensor
    (leaf of a tree); scale is max|expected| of that tensor, or the number given, or with
    scale="tree" tree_scale, the largest |expected| of the whole tree. `floor` is for trees of
    gradients: a small gradient can be a sum of large cancelling terms, and its rounding error
    then follows those. Returns the worst margin (error / tolerance)."""
    a_leaves, b_leaves = _leaves(actual), _leaves(expected)
    assert [k for k, _ in a_leaves] == [k for k, _ in b_leaves], (
        f"{what}: keys {[k for k, _ in a_leaves]} vs {[k for k, _ in b_leaves]}"
    )
    tree_scale = max((float(np.abs(b).max()) for _, b in b_leaves if b.size), default=0.0)
    if scale == "tree":
        scale = tree_scale
    atol = atol + floor * tree_scale
    worst = None
    for (key, a), (_, b) in zip(a_leaves, b_leaves):
        assert a.shape == b.shape, f"{what} {key}: shapes {a.shape} vs {b.shape}"
        err = float(np.abs(a - b).max()) if a.size else 0.0
        if a.size and (np.isnan(a).any() or np.isnan(b).any()):
            err = math.nan
        s = (float(np.abs(b).max()) if b.size else 0.0) if scale is None else float(scale)
        tol = rtol * s + atol
        if err != err or math.isinf(err):
            margin = math.inf
        elif tol == 0:
            margin = 0.0 if err == 0 else math.inf
        else:
            margin = err / tol
        if worst is None or margin > worst[0]:
            worst = (margin, key, err, tol, s)
    if worst is None:
        return 0.0
    margin, key, err, tol, s = worst
    name = f"{what} {key}".strip()
    _log(
        {
            "what": name,
            "error": err,
            "tolerance": tol,
            "scale": s,
            "rtol": rtol,
            "atol": atol,
            "margin": margin if math.isfinite(margin) else "inf",
        }
    )
    assert margin <= 1.0, (
        f"{name}: max |actual - expected| {err:.3g} > tolerance {tol:.3g} "
        f"(rtol {rtol:g} x scale {s:.3g} + atol {atol:g}): "
        f"margin {margin:.3g}"
    )
    return margin
