"""Layers against the naive references (forward and gradients), and incremental == full sequence."""

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten

import mlx_sleep  # noqa: F401  (loads the BLAS before mlx.core is used)
from mlx_sleep.layers import Attention, GatedDeltaNet, JetBlock

from . import naive
from .numerics import assert_close  # float32, O(1) values: 1e-5 of the scale (measured <= 1.3e-6)


def make_gdn(kind, Hk=2, Hv=4, Dk=8, Dv=6, W=4, D=16, seed=0):
    mx.random.seed(seed)
    if kind == "jet":
        layer = JetBlock(D, Hk, Hv, Dk, Dv, W, norm_eps=1e-5, generator_reduction=4)
    else:
        layer = GatedDeltaNet(D, Hk, Hv, Dk, Dv, W, norm_eps=1e-5)
    # Random norm weights and non-trivial gates so every parameter matters.
    layer.o_norm.weight = mx.random.uniform(0.5, 1.5, layer.o_norm.weight.shape)
    layer.A_log = mx.random.normal(layer.A_log.shape) * 0.5
    layer.dt_bias = mx.random.normal(layer.dt_bias.shape) * 0.5
    return layer


GDN_SHAPES = [
    dict(Hk=2, Hv=2, Dk=8, Dv=8, W=4),  # plain MHA-style heads
    dict(Hk=1, Hv=4, Dk=8, Dv=6, W=4),  # GVA: 4 value heads share one key head
    dict(Hk=2, Hv=4, Dk=4, Dv=10, W=2),  # short conv
]


@pytest.mark.parametrize("kind", ["gdn", "jet"])
@pytest.mark.parametrize("shape", GDN_SHAPES)
def test_gdn_forward_matches_naive(kind, shape):
    layer = make_gdn(kind, **shape)
    x = mx.random.normal((2, 7, 16))
    state = layer.initial_state(2)
    state["S"] = mx.random.normal(state["S"].shape) * 0.3
    state["conv"] = mx.random.normal(state["conv"].shape)
    y, new = layer(x, state)
    y_ref, S_ref = naive.gdn(layer, x, state["conv"], state["S"], jet=kind == "jet")
    assert_close(y, y_ref, rtol=1e-5, what="output")
    assert_close(new["S"], S_ref, rtol=1e-5, what="state")


@pytest.mark.parametrize("kind", ["gdn", "jet"])
def test_gdn_gradients_match_naive(kind):
    layer = make_gdn(kind, Hk=1, Hv=2, Dk=4, Dv=4, W=3, D=8)
    x = mx.random.normal((2, 5, 8))
    S0 = mx.random.normal((2, 2, 4, 4)) * 0.3
    conv0 = layer.initial_state(2)["conv"]
    w = mx.random.normal((2, 5, 8))

    def loss_fast(params, x, S0):
        layer.update(params)
        y, st = layer(x, {"conv": conv0, "S": S0})
        return (y * w).sum() + (st["S"] ** 2).sum()

    def loss_naive(params, x, S0):
        layer.update(params)
        y, S = naive.gdn(layer, x, conv0, S0, jet=kind == "jet")
        return (y * w).sum() + (S**2).sum()

    params = layer.trainable_parameters()
    g_fast = mx.grad(loss_fast, argnums=(0, 1, 2))(params, x, S0)
    g_naive = mx.grad(loss_naive, argnums=(0, 1, 2))(params, x, S0)
    layer.update(params)
    for (name, a), (_, b) in zip(tree_flatten(g_fast), tree_flatten(g_naive)):
        assert_close(a, b, rtol=1e-5, what=f"grad {name}")
    assert len(tree_flatten(g_fast[0])) == len(tree_flatten(params))


@pytest.mark.parametrize("kind", ["gdn", "jet"])
def test_gdn_incremental_equals_full(kind):
    layer = make_gdn(kind)
    x = mx.random.normal((2, 9, 16))
    y_full, s_full = layer(x, layer.initial_state(2))
    state, ys = layer.initial_state(2), []
    for a, b in [(0, 1), (1, 2), (2, 6), (6, 9)]:  # single tokens, and pieces shorter than the conv
        y, state = layer(x[:, a:b], state)
        ys.append(y)
    assert_close(mx.concatenate(ys, axis=1), y_full, rtol=1e-5, what="output")
    assert_close(state["S"], s_full["S"], rtol=1e-5, what="S")
    assert_close(state["conv"], s_full["conv"], rtol=1e-5, what="conv state")


def make_attention(H=4, Hkv=2, D=8, window=None, seed=1):
    mx.random.seed(seed)
    return Attention(16, H, Hkv, D, rope_theta=10000.0, bias=True, window=window)


@pytest.mark.parametrize("H,Hkv", [(4, 4), (4, 2), (4, 1)])
@pytest.mark.parametrize("window", [None, 3])
def test_attention_matches_naive(H, Hkv, window):
    layer = make_attention(H, Hkv, window=window)
    x = mx.random.normal((2, 8, 16))
    offset = 5  # global positions continue across windows
    y, _ = layer(x, layer.initial_state(2), offset)
    y_ref = naive.attention(layer, x, mx.arange(offset, offset + 8), window)
    assert_close(y, y_ref, rtol=1e-5, what="attention")


def test_attention_gradients_match_naive():
    layer = make_attention(4, 2, window=4)
    x = mx.random.normal((2, 6, 16))
    pos = mx.arange(3, 9)

    def fast(params, x):
        layer.update(params)
        return (layer(x, {}, 3)[0] ** 2).sum()

    def ref(params, x):
        layer.update(params)
        return (naive.attention(layer, x, pos, 4) ** 2).sum()

    params = layer.trainable_parameters()
    ga = mx.grad(fast, argnums=(0, 1))(params, x)
    gb = mx.grad(ref, argnums=(0, 1))(params, x)
    for (name, a), (_, b) in zip(tree_flatten(ga), tree_flatten(gb)):
        assert_close(a, b, rtol=1e-5, what=name)


@pytest.mark.parametrize("window", [None, 3])
def test_attention_incremental_equals_full(window):
    layer = make_attention(window=window)
    x = mx.random.normal((1, 10, 16))
    y_full, _ = layer(x, {}, 0)
    state, ys, pos = {}, [], 0
    for n in (1, 4, 1, 3, 1):
        y, state = layer(x[:, pos : pos + n], state, pos)
        ys.append(y)
        pos += n
    assert_close(mx.concatenate(ys, axis=1), y_full, rtol=1e-5, what="incremental")
    if window is not None:
        assert state["keys"].shape[2] == window - 1  # keys nobody can see again are dropped


def test_attention_call_time_window_tightens_layer_window():
    layer = make_attention(window=6)
    x = mx.random.normal((1, 9, 16))
    y, _ = layer(x, {}, 0, window=2)
    y_ref = naive.attention(layer, x, mx.arange(9), 2)
    assert_close(y, y_ref, rtol=1e-5)


def test_a_bf16_model_stays_bf16_from_a_fresh_state():
    """A fresh state's conv inputs are float32 zeros; they must not promote a bf16 model's
    residual stream (and every matmul after it, and the head over the whole vocabulary) to
    float32, which makes float32 copies of the bf16 weights on every call."""
    from mlx_sleep import HybridLM, ModelConfig
    from mlx_sleep.sleep import run_chunk

    model = HybridLM(
        ModelConfig(
            vocab_size=64, hidden_size=32, layers="gdn,jet,attn", num_heads=2, gdn_v_heads=2
        )
    )
    model.set_dtype(mx.bfloat16)
    ids = mx.array([[1, 2, 3, 4, 5]])
    h, state = run_chunk(model, ids, model.initial_state(1), 0, 2, None)
    assert h.dtype == mx.bfloat16 and model(ids).dtype == mx.bfloat16
    assert all(s["conv"].dtype == mx.bfloat16 for s in state if "conv" in s)
    assert all(s["S"].dtype == mx.float32 for s in state if "S" in s)  # fast weights stay float32
