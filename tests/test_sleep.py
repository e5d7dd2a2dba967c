"""The sleep engine: Algorithm 1's pass semantics, training == inference, eviction, persistence."""

from dataclasses import replace

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_sleep import HybridLM, ModelConfig, SleepConfig, SleepEngine, sleep_forward, sleep_loss
from mlx_sleep.config import ConfigError, check_depth_losses, parse_depth_losses
from mlx_sleep.sleep import (
    chunk_bounds,
    depth_draw,
    depth_loss,
    depth_value_and_grad,
    evict,
    loss_depths,
    plan_chunks,
    run_chunk,
    sleep_value_and_grad,
    trained_at_every_depth,
)
from tests.numerics import assert_close

V = 13


def model_of(layers, seed=0, **kw):
    mx.random.seed(seed)
    cfg = ModelConfig(
        vocab_size=V,
        hidden_size=16,
        layers=layers,
        num_heads=2,
        gdn_v_heads=kw.pop("gdn_v_heads", 2),
        swa_window=kw.pop("swa_window", 3),
        **kw,
    )
    model = HybridLM(cfg)
    mx.eval(model.parameters())
    return model


def flat(tree):
    return {k: np.array(v) for k, v in tree_flatten(tree)}


def assert_trees_close(a, b, rtol=1e-5):
    """Logits, states or gradients of two computation orders: 1e-5 of each tensor's scale (float32
    through a few blocks and passes; measured <= 2.6e-6), and at least 1e-7 of the tree's."""
    assert_close(a, b, rtol=rtol, floor=rtol / 100)


def tokens(B, T, seed=0):
    return mx.array(np.random.default_rng(seed).integers(0, V, (B, T)), dtype=mx.int32)


# -- pass semantics ------------------------------------------------------------------------


def test_passes_carry_features_and_fast_weights_restart_kv_and_conv():
    """Written out by hand for attn -> gdn: pass n+1 reads pass n's features, S carries over,
    the attention KV and conv state restart from the chunk start."""
    model = model_of("attn,gdn")
    ids = tokens(2, 5)
    attn, gdn = model.layers
    start = model.initial_state(2)
    start[1]["S"] = mx.random.normal(start[1]["S"].shape)  # a non-trivial chunk-start S
    start[1]["conv"] = mx.random.normal(start[1]["conv"].shape)
    h = model.embed(ids)
    s_gdn = start[1]
    for _ in range(3):
        h, s_attn = attn(h, start[0], 7)
        h, new = gdn(h, {"conv": start[1]["conv"], "S": s_gdn["S"]}, 7)
        s_gdn = new
    h_engine, state = run_chunk(model, ids, start, 7, passes=3)
    assert_trees_close(h_engine, h)
    assert_trees_close(state, [s_attn, s_gdn])


def test_prelude_and_coda_run_once():
    model = model_of("gdn,gdn,gdn", core=(1, 2))
    ids = tokens(1, 4)
    s0 = model.initial_state(1)
    h, s_pre = model.layers[0](model.embed(ids), s0[0], 0)
    s_core = s0[1]
    for _ in range(4):
        h, s_core = model.layers[1](h, {"conv": s0[1]["conv"], "S": s_core["S"]}, 0)
    h, s_coda = model.layers[2](h, s0[2], 0)
    h_engine, state = run_chunk(model, ids, s0, 0, passes=4)
    assert_trees_close(h_engine, h)
    assert_trees_close(state, [s_pre, s_core, s_coda])


def test_chunk_bounds():
    assert chunk_bounds(10, 4) == [(0, 4), (4, 8), (8, 10)]
    rng = np.random.default_rng(0)
    b = chunk_bounds(50, 6, rng=rng, min_len=2)
    assert b[0][0] == 0 and b[-1][1] == 50
    assert all(b1 == a2 for (_, b1), (a2, _) in zip(b, b[1:]))
    assert all(1 <= y - x <= 6 for x, y in b) and len({y - x for x, y in b}) > 1


# -- (a) inference == training ---------------------------------------------------------------


@pytest.mark.parametrize("eviction", ["hard", "sliding"])
@pytest.mark.parametrize("layers", ["attn,gdn,jet,swa", "gdn,attn"])
def test_consolidated_state_equals_training_state(eviction, layers):
    model = model_of(layers)
    sleep = SleepConfig(loops=3, window=6, eviction=eviction)
    ids = tokens(2, 18)
    _, train_state = sleep_forward(model, ids, np.zeros((2, 18)), sleep)
    engine = SleepEngine(model, sleep, batch_size=2)
    for a, b in [(0, 5), (5, 6), (6, 13), (13, 18)]:  # pieces that straddle window boundaries
        engine.feed(ids[:, a:b])
    assert engine.sleeps == 2 and engine.window_len == 6
    engine.consolidate()
    assert_trees_close(engine.state, train_state)


def test_wake_logits_equal_training_answer_logits():
    """A window that holds answers takes one pass in training; the engine's wake pass is that pass."""
    model = model_of("attn,gdn,jet")
    sleep = SleepConfig(loops=4, window=5)
    ids = tokens(1, 15)
    mask = np.zeros((1, 15))
    mask[:, 11:] = 1
    answers, _ = sleep_forward(model, ids, mask, sleep)
    ((a, b, logits),) = answers
    engine = SleepEngine(model, sleep)
    out = engine.feed(ids)
    assert_trees_close(out[:, a:b], logits)


# -- (b) under hard eviction earlier windows reach later outputs only through S -----------------


def later_window_logits(model, ids, loops=2):
    mask = np.zeros(ids.shape)
    mask[:, 8:] = 1
    (answers, _) = sleep_forward(model, ids, mask, SleepConfig(loops=loops, window=4))
    return np.concatenate([np.array(l) for _, _, l in answers], axis=1)


def test_hard_eviction_isolates_pure_attention_model():
    model = model_of("attn,swa,attn")
    a = tokens(1, 12, seed=1)
    b = mx.concatenate([tokens(1, 8, seed=2), a[:, 8:]], axis=1)  # same last window, other past
    np.testing.assert_array_equal(later_window_logits(model, a), later_window_logits(model, b))


@pytest.mark.parametrize("layers", ["attn,gdn", "jet,attn"])
def test_hard_eviction_hybrid_remembers_through_fast_weights(layers):
    model = model_of(layers)
    a = tokens(1, 12, seed=1)
    b = mx.concatenate([tokens(1, 8, seed=2), a[:, 8:]], axis=1)
    assert np.abs(later_window_logits(model, a) - later_window_logits(model, b)).max() > 1e-3


@pytest.mark.parametrize("layers,reaches", [("attn,swa", False), ("attn,gdn", True), ("jet", True)])
def test_gradients_reach_evicted_tokens_only_through_fast_weights(layers, reaches):
    """Tokens 0-3 appear only in the first (evicted) window: their embedding rows get a gradient
    from the later answers only through the fast weights."""
    model = model_of(layers, tie_embeddings=False)
    ids = mx.array([[0, 1, 2, 3, 4, 5, 6, 7]])
    mask = np.zeros((1, 8))
    mask[:, 4:] = 1
    grad_fn = nn.value_and_grad(
        model, lambda m: sleep_loss(m, ids, ids, mask, SleepConfig(loops=2, window=4))[0]
    )
    _, grads = grad_fn(model)
    first_window_rows = np.abs(np.array(grads["embed_tokens"]["weight"][:4])).max()
    assert (first_window_rows > 0) == reaches


# -- (c) N = 1 is the plain hybrid with the same eviction ----------------------------------------


def test_n1_sliding_equals_plain_sliding_window_forward():
    """N = 1 with sliding eviction is exactly ordinary sliding-window attention + SSM over the
    whole sequence, with no chunking at all."""
    model = model_of("attn,gdn,attn,jet")
    L = 5
    ids = tokens(2, 23)
    h, state = model.embed(ids), model.initial_state(2)
    for layer, s in zip(model.layers, state):
        h, _ = layer(h, s, 0, window=L)
    plain = model.head(h)
    engine = SleepEngine(model, SleepConfig(loops=1, window=L, eviction="sliding"), batch_size=2)
    out = mx.concatenate([engine.feed(ids[:, a : a + 3]) for a in range(0, 23, 3)], axis=1)
    assert_trees_close(out, plain)


def test_n1_hard_equals_plain_forward_per_window():
    """N = 1 with hard eviction: each window is a plain forward that starts from the previous
    window's fast weights (and nothing else)."""
    model = model_of("attn,gdn")
    L = 4
    ids = tokens(1, 12)
    engine = SleepEngine(model, SleepConfig(loops=1, window=L))
    out = engine.feed(ids)
    state = model.initial_state(1)
    for a in range(0, 12, L):
        h = model.embed(ids[:, a : a + L])
        carried = [
            model.initial_state(1)[0],
            {"conv": mx.zeros_like(state[1]["conv"]), "S": state[1]["S"]},
        ]
        for i, layer in enumerate(model.layers):
            h, state[i] = layer(h, carried[i], a)
        assert_trees_close(out[:, a : a + L], model.head(h))


def test_engine_n1_state_equals_training_n1_state():
    model = model_of("attn,jet")
    sleep = SleepConfig(loops=1, window=4, eviction="sliding")
    ids = tokens(1, 12)
    _, train_state = sleep_forward(model, ids, np.zeros((1, 12)), sleep)
    engine = SleepEngine(model, sleep)
    engine.feed(ids)
    engine.consolidate()
    assert_trees_close(engine.state, train_state)


# -- engine behaviour --------------------------------------------------------------------------


def test_feed_token_by_token_equals_feed_at_once():
    model = model_of("attn,gdn,swa")
    sleep = SleepConfig(loops=2, window=4, eviction="sliding")
    ids = tokens(1, 10)
    e1, e2 = SleepEngine(model, sleep), SleepEngine(model, sleep)
    whole = e1.feed(ids)
    steps = mx.concatenate([e2.feed(ids[:, t : t + 1]) for t in range(10)], axis=1)
    assert_trees_close(steps, whole)
    assert_trees_close(e2.state, e1.state)


def test_cancelled_sleep_changes_nothing():
    model = model_of("attn,gdn")
    sleep = SleepConfig(loops=4, window=8)
    ids = tokens(1, 6)
    engine = SleepEngine(model, sleep)
    engine.feed(ids)
    before = flat(engine.state_dict()["arrays"]), dict(engine.state_dict()["meta"])
    passes = []
    done = engine.consolidate(
        cancel=lambda: len(passes) >= 2, on_pass=lambda n, N: passes.append(n)
    )
    assert not done and passes == [1, 2]
    after = flat(engine.state_dict()["arrays"]), engine.state_dict()["meta"]
    assert before[1] == after[1]
    for k in before[0]:
        np.testing.assert_array_equal(before[0][k], after[0][k])
    assert engine.consolidate() and engine.window_len == 0 and engine.sleeps == 1


@pytest.mark.parametrize("layers,eviction", [("attn,gdn,jet", "sliding"), ("gdn,jet,attn", "hard")])
def test_state_dict_round_trip_continues_identically(layers, eviction):
    """Also after a hard eviction, when attention layers (first or last) hold no state."""
    model = model_of(layers)
    sleep = SleepConfig(loops=2, window=5, eviction=eviction)
    ids = tokens(1, 16)
    e1 = SleepEngine(model, sleep)
    e1.feed(ids[:, :7])
    e2 = SleepEngine(model, sleep)
    e2.load_state_dict(e1.state_dict())
    assert_trees_close(e2.feed(ids[:, 7:]), e1.feed(ids[:, 7:]))
    assert e2.offset == e1.offset == 16 and e2.sleeps == e1.sleeps


def test_feed_of_no_tokens_returns_empty_logits_and_changes_nothing():
    model = model_of("attn,gdn")
    engine = SleepEngine(model, SleepConfig(loops=2, window=4))
    engine.feed(tokens(1, 3))
    before = flat(engine.state_dict()["arrays"])
    out = engine.feed(mx.zeros((1, 0), dtype=mx.int32))
    assert out.shape == (1, 0, V) and engine.offset == 3
    assert engine.feed(mx.zeros((0,), dtype=mx.int32), logits="last").shape == (1, 0, V)
    assert engine.feed([], logits=None) is None
    after = flat(engine.state_dict()["arrays"])
    assert all(np.array_equal(before[k], after[k]) for k in before)


def test_feed_returns_the_logits_asked_for():
    model = model_of("attn,gdn,swa")
    sleep = SleepConfig(loops=2, window=4, eviction="sliding")
    ids = tokens(2, 11)
    whole = SleepEngine(model, sleep, batch_size=2).feed(ids)
    last_engine, none_engine = SleepEngine(model, sleep, 2), SleepEngine(model, sleep, 2)
    last = last_engine.feed(ids, logits="last")
    assert last.shape == (2, 1, V)
    assert_trees_close(last, whole[:, -1:])
    assert none_engine.feed(ids, logits=None) is None
    assert_trees_close(none_engine.state, last_engine.state)
    with pytest.raises(ValueError, match="logits must be"):
        none_engine.feed(ids, logits="first")


@pytest.mark.parametrize("bad", [V, -1, 10**9])
def test_feed_and_model_refuse_ids_outside_the_vocabulary(bad):
    model = model_of("attn,gdn")
    engine = SleepEngine(model, SleepConfig(window=4))
    ids = mx.array([[1, 2, bad]])
    with pytest.raises(ValueError, match=f"token id {bad} is outside the vocabulary of {V}"):
        engine.feed(ids)
    assert engine.offset == 0
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model(ids)
    with pytest.raises(ValueError, match="must be integers"):
        model(mx.array([[1.0, 2.0]]))


@pytest.mark.parametrize("logits", ["all", "last"])
def test_one_feed_over_many_windows_keeps_memory_flat(logits):
    """Feeding a long prompt at once peaks at about one window's memory, not at every window's
    wake-pass intermediates (which unevaluated logits would keep alive: measured here without
    the per-window evaluation, 37 MB for 2 windows and 262 MB for 16)."""
    mx.random.seed(0)
    model = HybridLM(
        ModelConfig(
            vocab_size=16, hidden_size=256, layers="attn,gdn,jet", num_heads=4, gdn_v_heads=4
        )
    )
    mx.eval(model.parameters())

    def peak(n_windows):
        engine = SleepEngine(model, SleepConfig(loops=1, window=64), batch_size=4)
        ids = mx.array(
            np.random.default_rng(0).integers(0, 16, (4, 64 * n_windows)), dtype=mx.int32
        )
        mx.eval(ids)
        mx.reset_peak_memory()
        mx.eval(engine.feed(ids, logits=logits))
        return mx.get_peak_memory()

    peak(2)  # warm up
    assert peak(16) < 1.2 * peak(2), (peak(16) / 2**20, peak(2) / 2**20)


def test_load_state_dict_refuses_states_that_do_not_fit_and_changes_nothing():
    model = model_of("attn,gdn")
    sleep = SleepConfig(loops=2, window=5)
    saved = SleepEngine(model, sleep)
    saved.feed(tokens(1, 7))
    d = saved.state_dict()

    def refused(engine, d, match):
        engine.feed(tokens(engine.batch_size, 2, seed=4))
        before = flat(engine.state_dict()["arrays"]), engine.state_dict()["meta"]
        with pytest.raises(ValueError, match=match):
            engine.load_state_dict(d)
        after = flat(engine.state_dict()["arrays"]), engine.state_dict()["meta"]
        assert before[1] == after[1] and before[0].keys() == after[0].keys()
        assert all(np.array_equal(before[0][k], after[0][k]) for k in before[0])

    refused(SleepEngine(model, SleepConfig(loops=3, window=5)), d, "sleep settings")
    refused(SleepEngine(model, SleepConfig(loops=2, window=6)), d, "sleep settings")
    refused(
        SleepEngine(model, SleepConfig(loops=2, window=5, eviction="sliding")), d, "sleep settings"
    )
    refused(SleepEngine(model, sleep, batch_size=2), d, "batch size")
    refused(SleepEngine(model_of("attn,jet"), sleep), d, "model")
    refused(SleepEngine(model_of("attn,gdn", gdn_v_heads=4), sleep), d, "model")
    bad = {"arrays": dict(d["arrays"]), "meta": dict(d["meta"])}
    bad["arrays"]["state.1.S"] = mx.zeros((1, 2, 3, 3))
    refused(SleepEngine(model, sleep), bad, r"state layer 1 S is \(1, 2, 3, 3\)")
    bad = {"arrays": dict(d["arrays"]), "meta": dict(d["meta"], offset=9)}
    refused(SleepEngine(model, sleep), bad, "inconsistent")


ANSWERS = {
    "end": [(slice(None), slice(12, 14))],
    "middle": [(0, slice(5, 7))],
    "both": [(slice(None), slice(12, 14)), (1, slice(2, 3))],
}


def plain_value_and_grad(model, ids, targets, mask, sleep, plan=None):
    return nn.value_and_grad(model, lambda m: sleep_loss(m, ids, targets, mask, sleep, plan=plan))(
        model
    )


@pytest.mark.parametrize("answers", sorted(ANSWERS))
@pytest.mark.parametrize("loops", [1, 3])
@pytest.mark.parametrize("eviction", ["hard", "sliding"])
@pytest.mark.parametrize("layers", ["attn,gdn,jet,swa", "gdn,attn"])
def test_chunkwise_value_and_grad_equals_plain_backprop(layers, eviction, loops, answers):
    """sleep_value_and_grad (forward saving chunk-boundary states, then one chunk recomputed at a
    time under vjp) gives the loss and every gradient of backprop through the whole graph."""
    model = model_of(layers)
    sleep = SleepConfig(loops=loops, window=4, eviction=eviction)
    ids, targets = tokens(2, 14), tokens(2, 14, seed=5)
    mask = np.zeros((2, 14))
    for rows, cols in ANSWERS[answers]:
        mask[rows, cols] = 1
    (l0, n0), g0 = plain_value_and_grad(model, ids, targets, mask, sleep)
    (l1, n1), g1 = sleep_value_and_grad(model, ids, targets, mask, sleep)
    assert n1.item() == n0.item() == mask.sum()
    assert_close(l1.item(), l0.item(), rtol=1e-6, what="loss")
    assert max(np.abs(v).max() for v in flat(g0).values()) > 1e-3  # a non-trivial comparison
    assert_trees_close(g1, g0)
    # the model is left with its own parameters
    assert_close(
        sleep_loss(model, ids, targets, mask, sleep)[0].item(),
        l0.item(),
        rtol=1e-6,
        what="loss after",
    )


@pytest.mark.parametrize("eviction", ["hard", "sliding"])
@pytest.mark.parametrize("layers,core", [("attn,gdn,jet,swa", None), ("gdn,attn,gdn", (1, 2))])
def test_each_row_sleeps_on_its_own_context(layers, core, eviction):
    """Rows whose answers begin in different chunks (prompts of 3, 9 and 17 tokens, L = 4): in
    one batch each row's loss, gradient and final state are what that row gives alone, where
    a batch-wide plan would give a row's context one pass wherever another row answers."""
    model = model_of(layers, core=core)
    sleep = SleepConfig(loops=3, window=4, eviction=eviction)
    ids, targets = tokens(3, 22), tokens(3, 22, seed=7)
    mask = np.zeros((3, 22))
    for row, prompt in enumerate((3, 9, 17)):
        mask[row, prompt - 1 : prompt + 3] = 1  # the answer's 4 targets
    plan = plan_chunks(mask, sleep.window)
    assert len({rows for rows in plan[1]}) > 2  # chunks where rows differ
    answers, state = sleep_forward(model, ids, mask, sleep)
    for row in range(3):
        alone, alone_state = sleep_forward(model, ids[row : row + 1], mask[row : row + 1], sleep)
        mine = {a: logits[row : row + 1] for a, _, logits in answers}
        for a, _, logits in alone:
            assert_trees_close(mine[a], logits)
        assert_trees_close(
            [{k: v[row : row + 1] for k, v in s.items()} for s in state], alone_state
        )
    for grad_fn in (plain_value_and_grad, sleep_value_and_grad):
        (loss, n), grads = grad_fn(model, ids, targets, mask, sleep)
        summed = None
        for row in range(3):
            r = slice(row, row + 1)
            (l, k), g = grad_fn(model, ids[r], targets[r], mask[r], sleep)
            g = {name: v * k.item() for name, v in flat(g).items()}
            summed = g if summed is None else {name: summed[name] + g[name] for name in g}
        assert_trees_close({name: v * n.item() for name, v in flat(grads).items()}, summed)


@pytest.mark.parametrize("eviction", ["hard", "sliding"])
def test_depth_losses_are_the_weighted_sum_of_algorithm_1_at_each_depth(eviction):
    """loss_depths: by default Algorithm 1 at N alone (sleep_loss itself, bit for bit); with
    depth losses the objective and its gradients are the weighted sum of sleep_loss at each
    depth, in one graph (depth_loss) and memory-bounded (depth_value_and_grad), on a batch
    whose rows answer in different chunks."""
    model = model_of("gdn,attn,jet", core=(0, 2))
    sleep = SleepConfig(loops=2, window=4, eviction=eviction)
    ids, targets = tokens(2, 14), tokens(2, 14, seed=5)
    mask = np.zeros((2, 14))
    mask[0, 12:14], mask[1, 5:7] = 1, 1
    plan = plan_chunks(mask, sleep.window)
    loss, _ = depth_loss(model, ids, targets, mask, loss_depths(sleep), plan=plan)
    assert np.array_equal(np.array(loss), np.array(sleep_loss(model, ids, targets, mask, sleep)[0]))

    depths = loss_depths(sleep, check_depth_losses(((1, 0.25), (3, 1.0), (5, 0.0))))
    assert [(s.loops, w) for s, w in depths] == [(1, 0.25), (3, 1.0)]
    want_loss, want_grads = 0.0, None
    for d, w in ((1, 0.25), (3, 1.0)):
        (l_d, _), g_d = plain_value_and_grad(model, ids, targets, mask, replace(sleep, loops=d))
        want_loss += w * l_d.item()
        g_d = {k: w * v for k, v in flat(g_d).items()}
        want_grads = g_d if want_grads is None else {k: want_grads[k] + g_d[k] for k in g_d}
    one_graph = nn.value_and_grad(
        model, lambda m: depth_loss(m, ids, targets, mask, depths, plan=plan)
    )(model)
    bounded = depth_value_and_grad(model, ids, targets, mask, depths, plan=plan)
    for (l_, n_), g in (one_graph, bounded):
        assert n_.item() == mask.sum()
        assert_close(l_.item(), want_loss, rtol=1e-6, what="objective")
        assert_trees_close(flat(g), want_grads)


def test_depth_ranges_are_drawn_per_step_from_the_seed_and_the_step():
    """LO-HI entries draw one depth per step (the same for a resumed run and every process);
    a depth drawn twice is taken once with the weights added; every depth 1..N weighted makes
    a model whose stopped sleep may keep its passes."""
    sleep = SleepConfig(loops=3, window=4)
    spec = parse_depth_losses("3:1,2-5:0.5")
    assert spec == ((3, 3, 1.0), (2, 5, 0.5))
    drawn = set()
    for step in range(40):
        depths = loss_depths(sleep, spec, depth_draw(0, step))
        again = loss_depths(sleep, spec, depth_draw(0, step))
        assert [(s.loops, w) for s, w in depths] == [(s.loops, w) for s, w in again]
        if len(depths) == 1:  # drew 3: one loss at 3, weight 1.5
            assert [(s.loops, w) for s, w in depths] == [(3, 1.5)]
        drawn |= {s.loops for s, _ in depths}
    assert drawn == {2, 3, 4, 5}
    assert trained_at_every_depth(3, parse_depth_losses("1-2:0.1,3:1"))
    assert not trained_at_every_depth(3, parse_depth_losses("1:0.1,3-6:1"))
    assert not trained_at_every_depth(3, parse_depth_losses("1-2:0,3:1"))


def test_chunkwise_value_and_grad_prelude_coda_random_chunks_and_no_answers():
    model = model_of("gdn,attn,jet,gdn", core=(1, 3))
    sleep = SleepConfig(loops=2, window=5, eviction="sliding")
    ids, targets = tokens(3, 17), tokens(3, 17, seed=3)
    mask = np.zeros((3, 17))
    mask[1, 8] = mask[:, 15:] = 1
    plan = plan_chunks(mask, sleep.window, np.random.default_rng(1), min_len=2)
    assert len(set(b - a for a, b in plan[0])) > 1
    (l0, _), g0 = plain_value_and_grad(model, ids, targets, mask, sleep, plan)
    (l1, _), g1 = sleep_value_and_grad(model, ids, targets, mask, sleep, plan=plan)
    assert_close(l1.item(), l0.item(), rtol=1e-6, what="loss")
    assert_trees_close(g1, g0)
    (l0, n0), g0 = plain_value_and_grad(model, ids, targets, np.zeros((3, 17)), sleep)
    (l1, n1), g1 = sleep_value_and_grad(model, ids, targets, np.zeros((3, 17)), sleep)
    assert l1.item() == l0.item() == 0 and n1.item() == 0
    assert_trees_close(g1, g0)


def test_chunkwise_value_and_grad_puts_only_scored_positions_through_the_head(monkeypatch):
    """An answer chunk of 8 tokens scoring 2 of them (in different rows): the head sees those 2
    columns, not 8, and loss and gradients are still plain backprop's."""
    model = model_of("gdn,attn")
    sleep = SleepConfig(loops=2, window=8)
    ids, targets = tokens(2, 16), tokens(2, 16, seed=2)
    mask = np.zeros((2, 16))
    mask[0, 10] = mask[1, 13] = 1
    (l0, _), g0 = plain_value_and_grad(model, ids, targets, mask, sleep)
    widths, head = [], model.head
    monkeypatch.setattr(model, "head", lambda h: widths.append(h.shape[1]) or head(h))
    (l1, _), g1 = sleep_value_and_grad(model, ids, targets, mask, sleep)
    assert widths == [2]
    assert_close(l1.item(), l0.item(), rtol=1e-6, what="loss")
    assert_trees_close(g1, g0)


def test_chunkwise_value_and_grad_bounds_peak_memory():
    """Backprop through the whole graph holds every pass of every chunk; the chunkwise gradient
    holds about one chunk's. 12 chunks x 4 passes here: expect well under half the memory."""
    mx.random.seed(0)
    model = HybridLM(
        ModelConfig(
            vocab_size=V, hidden_size=64, layers="attn,gdn,attn,gdn", num_heads=2, gdn_v_heads=2
        )
    )
    mx.eval(model.parameters())
    sleep = SleepConfig(loops=4, window=8)
    ids = tokens(8, 96)
    mask = np.zeros((8, 96))
    mask[:, 88:] = 1

    def peak(fn):
        mx.eval(fn())  # warm up, then measure
        mx.reset_peak_memory()
        mx.eval(fn())
        return mx.get_peak_memory()

    plain = peak(lambda: plain_value_and_grad(model, ids, ids, mask, sleep))
    chunkwise = peak(lambda: sleep_value_and_grad(model, ids, ids, mask, sleep))
    assert chunkwise < 0.5 * plain, (chunkwise / 2**20, plain / 2**20)


# (layers, core, eviction, N): every layer kind, with and without prelude and coda, N = 1..4
BLOCK_CASES = [
    ("attn,gdn,jet,swa", None, "hard", 1),
    ("attn,gdn,jet,swa", None, "sliding", 4),
    ("gdn,attn,jet,gdn", (1, 3), "sliding", 2),
    ("gdn,attn,gdn", (1, 2), "hard", 3),
]


@pytest.mark.parametrize("layers,core,eviction,loops", BLOCK_CASES)
def test_block_by_block_value_and_grad_equals_plain_backprop(layers, core, eviction, loops):
    """granularity="block" (each chunk recorded block application by block application, then
    walked back one application at a time) gives the loss and every gradient of backprop
    through the whole graph, and of the chunkwise path: rows answering in different chunks
    (chunks where some rows take one pass and the others sleep on), an answer in the middle
    of a row, random chunk lengths."""
    model = model_of(layers, core=core)
    sleep = SleepConfig(loops=loops, window=4, eviction=eviction)
    ids, targets = tokens(3, 22), tokens(3, 22, seed=7)
    mask = np.zeros((3, 22))
    for row, prompt in enumerate((3, 9, 17)):
        mask[row, prompt - 1 : prompt + 3] = 1
    mask[2, 5] = 1
    plan = plan_chunks(mask, sleep.window, np.random.default_rng(loops), min_len=2)
    assert any(len(set(rows)) > 1 for rows in plan[1])  # chunks where rows differ
    (l0, n0), g0 = plain_value_and_grad(model, ids, targets, mask, sleep, plan)
    (l1, n1), g1 = sleep_value_and_grad(model, ids, targets, mask, sleep, plan=plan)
    (l2, n2), g2 = sleep_value_and_grad(
        model, ids, targets, mask, sleep, plan=plan, granularity="block"
    )
    assert n2.item() == n0.item() == mask.sum()
    assert_close(l2.item(), l0.item(), rtol=1e-6, what="loss")
    assert max(np.abs(v).max() for v in flat(g0).values()) > 1e-3  # a non-trivial comparison
    assert_trees_close(g2, g0)
    assert_trees_close(g2, g1)
    assert_close(  # the model is left with its own parameters
        sleep_loss(model, ids, targets, mask, sleep, plan=plan)[0].item(), l0.item(), rtol=1e-6
    )


def test_block_by_block_value_and_grad_bounds_peak_memory():
    """One chunk of 4 passes over 4 blocks: the chunkwise backward holds the activations of all
    16 block applications at once, the block-by-block one their inputs and one application's
    activations. Expect well under half the memory (measured 0.31), and the same gradients."""
    mx.random.seed(0)
    model = HybridLM(
        ModelConfig(
            vocab_size=V, hidden_size=32, layers="attn,gdn,attn,gdn", num_heads=2, gdn_v_heads=2
        )
    )
    mx.eval(model.parameters())
    sleep = SleepConfig(loops=4, window=32)
    ids = tokens(4, 40)
    mask = np.zeros((4, 40))
    mask[:, 32:] = 1

    def peak(granularity):
        def step():
            return sleep_value_and_grad(model, ids, ids, mask, sleep, granularity=granularity)

        mx.eval(step())  # warm up, then measure
        mx.reset_peak_memory()
        out = step()
        mx.eval(out)
        return mx.get_peak_memory(), out

    chunkwise, (_, g1) = peak("chunk")
    blockwise, (_, g2) = peak("block")
    assert blockwise < 0.5 * chunkwise, (blockwise / 2**20, chunkwise / 2**20)
    assert_trees_close(g2, g1)


def test_block_by_block_value_and_grad_keeps_only_what_a_later_step_reads():
    """Per extra pass, the block-by-block backward keeps each block application's input
    features and nothing more: an attention block's KV of a hard-evicted window is read by no
    later pass (each restarts from the chunk-start state) and is freed during the forward.
    Attention-heavy at hard eviction (as Ouro): kept, the KVs made the growth per pass 3.2x
    the features (measured); freed, 1.0x."""
    mx.random.seed(0)
    model = HybridLM(
        ModelConfig(
            vocab_size=V, hidden_size=64, layers="attn,attn,attn,gdn", num_heads=4, gdn_v_heads=4
        )
    )
    mx.eval(model.parameters())
    B, T = 2, 256
    ids = tokens(B, T + 8)
    mask = np.zeros((B, T + 8))
    mask[:, T:] = 1

    def peak(loops):
        sleep = SleepConfig(loops=loops, window=T, eviction="hard")

        def step():
            return sleep_value_and_grad(model, ids, ids, mask, sleep, granularity="block")

        mx.eval(step())  # warm up, then measure
        mx.reset_peak_memory()
        mx.eval(step())
        return mx.get_peak_memory()

    features_per_pass = 4 * B * T * 64 * 4  # 4 block applications, float32
    per_pass = (peak(4) - peak(2)) / 2
    assert 0 < per_pass < 2 * features_per_pass, per_pass / features_per_pass


def test_block_tape_holds_no_kv_under_hard_eviction():
    """After a hard-evicted window's passes are recorded, the tape holds no attention KV
    ([B, Hkv, T, D]): not the passes' (each restarts from the chunk-start state), not the last
    pass's (eviction drops it, a step without results). It holds features and fast weights."""
    from mlx_sleep.sleep import _Tape, _Weights

    model = model_of("attn,gdn")
    T = 12  # not a head dimension (8): the fast weights S are [B, H, 8, 8]
    tape = _Tape(_Weights(model), [])
    sleep = SleepConfig(loops=3, window=T, eviction="hard")
    sleep_forward(model, tokens(2, T), None, sleep, plan=([(0, T)], [False]), apply=tape.step)
    held = [a for _, _, variables, _, _ in tape.steps for a in variables]
    held += [ref() for *_, outs, _ in tape.steps for ref, _, _ in outs if ref() is not None]
    assert any(a.ndim == 3 and a.shape[1] == T for a in held)  # the features are there
    kv = [a.shape for a in held if a.ndim == 4 and a.shape[2] == T]
    assert not kv, kv


def test_value_and_grad_refuses_an_unknown_granularity():
    model = model_of("gdn,attn")
    with pytest.raises(ValueError, match="granularity must be one of chunk, block"):
        sleep_value_and_grad(
            model, tokens(1, 4), tokens(1, 4), np.ones((1, 4)), SleepConfig(), granularity="layer"
        )


def test_more_loops_change_the_answer():
    model = model_of("attn,gdn")
    ids = tokens(1, 8)
    mask = np.zeros((1, 8))
    mask[:, 4:] = 1
    l1 = sleep_loss(model, ids, ids, mask, SleepConfig(loops=1, window=4))[0].item()
    l3 = sleep_loss(model, ids, ids, mask, SleepConfig(loops=3, window=4))[0].item()
    assert abs(l1 - l3) > 1e-4


@pytest.mark.parametrize(
    "kw,msg",
    [
        (dict(loops=0), "loops"),
        (dict(window=0), "window"),
        (dict(eviction="soft"), "eviction"),
    ],
)
def test_bad_sleep_settings(kw, msg):
    with pytest.raises(ConfigError, match=msg):
        SleepConfig(**kw)


def test_evict_keeps_fast_weights():
    model = model_of("attn,gdn")
    engine = SleepEngine(model, SleepConfig(loops=1, window=4))
    engine.feed(tokens(1, 4))
    hard = evict(model, engine.state, 0)
    assert hard[0] == {}
    np.testing.assert_array_equal(np.array(hard[1]["S"]), np.array(engine.state[1]["S"]))
    assert float(mx.abs(hard[1]["conv"]).max()) == 0.0


# -- the wake pass as the first sleep pass -----------------------------------------------------


@pytest.mark.parametrize("layers,eviction", [("attn,gdn,jet,swa", "sliding"), ("gdn,attn", "hard")])
def test_sleep_reuses_a_one_piece_wake_pass_bit_for_bit(layers, eviction):
    """A window fed in one piece (a prompt's full windows) sleeps from its wake pass's features:
    N - 1 more core passes, and the state is the recomputed one (Algorithm 1) exactly; a window
    fed in pieces keeps no features and is recomputed."""
    model = model_of(layers, core=(1, 2))
    sleep = SleepConfig(loops=3, window=6, eviction=eviction)
    ids = tokens(1, 18)
    _, train_state = sleep_forward(model, ids, np.zeros((1, 18)), sleep)
    engine = SleepEngine(model, sleep)
    engine.feed(ids)  # three full windows, the last one live
    assert engine.sleeps == 2 and len(engine.window_core) == 1
    copy = SleepEngine(model, sleep)
    copy.load_state_dict(engine.state_dict())  # the wake features travel with a saved state
    passes = []
    assert not copy.consolidate(cancel=lambda: True, on_pass=lambda n, N: passes.append(n))
    assert passes == [1] and copy.window_len == 6  # cancelled after pass 1: unchanged
    for e in (engine, copy):
        assert e.consolidate()
        for a, b in zip(e.state, train_state):
            assert a.keys() == b.keys()
            for k in a:
                np.testing.assert_array_equal(np.array(a[k]), np.array(b[k]), err_msg=k)
    pieces = SleepEngine(model, sleep)
    pieces.feed(ids[:, :3])
    pieces.feed(ids[:, 3:6])
    assert pieces.window_core == [] and pieces.window_len == 6


# -- deferred sleep ----------------------------------------------------------------------


def fed_token_by_token(engine, ids, prompt=7):
    """A prompt in one piece, then one token at a time (a reply); returns the last logits."""
    out = engine.feed(ids[:, :prompt], logits="last")
    for t in range(prompt, ids.shape[1]):
        out = engine.feed(ids[:, t : t + 1], logits="last")
    return out


@pytest.mark.parametrize("eviction", ["hard", "sliding"])
@pytest.mark.parametrize("max_pending", [8, 2])
def test_deferred_sleep_catches_up_to_the_synchronous_schedule(eviction, max_pending, monkeypatch):
    """defer=True: no feed runs a sleep pass (past max_pending the oldest window is deepened);
    catch_up() then reaches the synchronous schedule's fast weights and window-start state, and
    the next token's logits, within float rounding (the live window is recomputed in one piece
    where the synchronous engine fed it token by token)."""
    import mlx_sleep.sleep as engine_module

    model = model_of("attn,gdn,jet,swa")
    sleep = SleepConfig(loops=3, window=4, eviction=eviction)
    ids = tokens(1, 19)
    sync = SleepEngine(model, sleep)
    fed_token_by_token(sync, ids)
    passes = []
    real_run_chunk = engine_module.run_chunk

    def counting(model, ids, state, offset, n, *args, **kw):
        passes.append(n)
        return real_run_chunk(model, ids, state, offset, n, *args, **kw)

    monkeypatch.setattr(engine_module, "run_chunk", counting)
    deferred = SleepEngine(model, sleep, defer=True, max_pending=max_pending)
    fed_token_by_token(deferred, ids)
    assert len(deferred.pending) == min(4, max_pending) and deferred.sleeps == 4 - len(
        deferred.pending
    )
    if max_pending >= 4:
        assert set(passes) == {1}  # not one sleep pass while tokens arrived
    assert deferred.catch_up() == min(4, max_pending) and not deferred.pending
    assert deferred.sleeps == sync.sleeps == 4
    assert_trees_close(deferred.window_start_state, sync.window_start_state)
    assert_trees_close(deferred.state, sync.state)
    nxt = tokens(1, 1, seed=9)
    assert_trees_close(deferred.feed(nxt, logits="last"), sync.feed(nxt, logits="last"))


def test_a_cancelled_catch_up_keeps_the_windows_it_deepened():
    """Cancelled after the first window: that window stays deep, the others pending and
    shallow, the engine consistent (a later catch_up ends where an uninterrupted one does);
    cancelled inside the first window: nothing changes."""
    model = model_of("gdn,attn")
    sleep = SleepConfig(loops=3, window=4)
    ids = tokens(1, 15)
    whole = SleepEngine(model, sleep, defer=True)
    fed_token_by_token(whole, ids)
    whole.catch_up()
    engine = SleepEngine(model, sleep, defer=True)
    fed_token_by_token(engine, ids)
    before = engine.state
    assert engine.catch_up(cancel=lambda: True) == 0 and engine.state is before
    assert len(engine.pending) == 3
    done = []
    assert engine.catch_up(cancel=lambda: bool(done), on_window=lambda i, n: done.append(i)) == 1
    assert len(engine.pending) == 2 and engine.sleeps == 1
    assert engine.catch_up() == 2
    assert_trees_close(engine.state, whole.state)
    assert_trees_close(engine.window_start_state, whole.window_start_state)


def test_switching_deferral_off_catches_up_before_the_next_sleep():
    """Windows deferred earlier are deepened before a window that fills without deferral
    sleeps: the order of Algorithm 1 holds, and the engine ends where the synchronous one does."""
    model = model_of("gdn,attn")
    sleep = SleepConfig(loops=2, window=4)
    ids = tokens(1, 15)
    sync = SleepEngine(model, sleep)
    fed_token_by_token(sync, ids)
    engine = SleepEngine(model, sleep, defer=True)
    engine.feed(ids[:, :9])
    assert len(engine.pending) == 2
    engine.defer = False
    for t in range(9, 15):
        engine.feed(ids[:, t : t + 1])
    assert not engine.pending and engine.sleeps == sync.sleeps == 3
    assert_trees_close(engine.state, sync.state)


def test_pending_windows_are_saved_and_restored():
    """state_dict() carries the pending windows (tokens and start states); a restored engine
    catches up to where the original does; a damaged record is refused, the engine unchanged."""
    model = model_of("gdn,attn")
    sleep = SleepConfig(loops=2, window=4)
    ids = tokens(1, 14)
    engine = SleepEngine(model, sleep, defer=True)
    fed_token_by_token(engine, ids)
    saved = engine.state_dict()
    assert saved["meta"]["pending_starts"] == [0, 4, 8] and "pending.2.ids" in saved["arrays"]
    restored = SleepEngine(model, sleep)
    restored.load_state_dict(saved)
    assert [start for _, _, start in restored.pending] == [0, 4, 8]
    engine.catch_up()
    restored.catch_up()
    assert_trees_close(restored.state, engine.state)
    for meta, arrays, message in [
        (dict(saved["meta"], pending_starts=[0, 4]), saved["arrays"], "inconsistent"),
        (dict(saved["meta"], pending_starts=[0, 5, 8]), saved["arrays"], "inconsistent"),
        (
            saved["meta"],
            dict(saved["arrays"], **{"pending.1.ids": mx.zeros((1, 3), dtype=mx.int32)}),
            "not 4 tokens",
        ),
        (
            saved["meta"],
            dict(saved["arrays"], **{"pending.1.ids": mx.full((1, 4), 99, dtype=mx.int32)}),
            "vocabulary",
        ),
    ]:
        fresh = SleepEngine(model, sleep)
        before = fresh.state
        with pytest.raises(ValueError, match=message):
            fresh.load_state_dict({"meta": meta, "arrays": arrays})
        assert fresh.state is before and not fresh.pending


def test_sleep_forward_stops_where_the_engine_would():
    """sleep_forward(tolerance=): a tolerance of 0 runs every pass (as without one); an
    infinite one stops after pass 2, the first that can be compared, which is sleeping with
    N = 2; the passes each sleeping chunk ran are reported (mixed-row chunks included)."""
    model = model_of("attn,gdn,jet,swa")
    ids = tokens(2, 14)
    mask = np.zeros((2, 14))
    mask[0, 5:7] = mask[1, 12:14] = 1
    deep, two = SleepConfig(loops=4, window=4), SleepConfig(loops=2, window=4)
    used = []
    got, _ = sleep_forward(model, ids, mask, deep, tolerance=0.0, passes_used=used)
    want, _ = sleep_forward(model, ids, mask, deep)
    assert used == [4, 4, 4, 4] and len(got) == len(want)  # every chunk: a row sleeps in each
    for (a, _, x), (_, _, y) in zip(got, want):
        assert_trees_close(x, y)
    used = []
    got, _ = sleep_forward(model, ids, mask, deep, tolerance=float("inf"), passes_used=used)
    want, _ = sleep_forward(model, ids, mask, two)
    assert used == [2, 2, 2, 2]
    for (_, _, x), (_, _, y) in zip(got, want):
        assert_trees_close(x, y)


def test_a_partial_sleep_keeps_the_passes_run_when_the_model_was_trained_for_it():
    """sleep.partial: a consolidation cancelled after pass 2 of 4 keeps the window at 2 passes
    (what N = 2 reaches), the window fed in one piece or token by token, and in catch_up;
    without it the engine is left as it was."""
    model = model_of("gdn,attn")
    ids = tokens(1, 12)
    for prompt in (4, 1):  # the window in one piece (the wake pass is pass 1) or in pieces
        engines = []
        for sleep in (SleepConfig(loops=4, window=4, partial=True), SleepConfig(loops=2, window=4)):
            engine = SleepEngine(model, sleep)
            fed_token_by_token(engine, ids[:, :4], prompt=prompt)
            engines.append(engine)
        kept, two = engines
        passes = []
        assert kept.consolidate(
            cancel=lambda: len(passes) >= 2, on_pass=lambda n, N: passes.append(n)
        )
        assert two.consolidate()
        assert kept.last_passes == 2 and kept.window_len == 0 and kept.sleeps == 1
        assert_trees_close(kept.state, two.state)
    # catch_up: a pending window stopped after pass 2 keeps it; the later one stays pending
    deferred = SleepEngine(model, SleepConfig(loops=4, window=4, partial=True), defer=True)
    fed_token_by_token(deferred, ids, prompt=4)
    assert len(deferred.pending) == 2
    passes = []
    deferred.catch_up(cancel=lambda: len(passes) >= 2, on_pass=lambda n, N: passes.append(n))
    assert len(deferred.pending) == 1 and deferred.sleeps == 1
    shallow = SleepEngine(model, SleepConfig(loops=2, window=4))
    fed_token_by_token(shallow, ids[:, :5], prompt=4)  # its first window slept 2 passes
    assert_trees_close(deferred.pending[0][1], shallow.window_start_state)
    paper = SleepEngine(model, SleepConfig(loops=4, window=4))
    paper.feed(ids[:, :4])
    before = paper.state
    assert not paper.consolidate(cancel=lambda: True) and paper.state is before
