"""Synthetic task generators: Rule 110 and Depo (numpy only, fast)."""

import json

import numpy as np
import pytest

from mlx_sleep.tasks import (
    TASKS,
    Batch,
    Depo,
    Rule110,
    get_task,
    rule110_run,
    rule110_step,
    accuracy_by_difficulty,
    task_from_dict,
)
from tests.numerics import assert_close

# The rule table is the one hard-coded expectation: Wolfram's rule number 110.
RULE_TABLE = {
    (1, 1, 1): 0,
    (1, 1, 0): 1,
    (1, 0, 1): 1,
    (1, 0, 0): 0,
    (0, 1, 1): 1,
    (0, 1, 0): 1,
    (0, 0, 1): 1,
    (0, 0, 0): 0,
}


def naive_step(bits, boundary):
    n = len(bits)
    out = []
    for i in range(n):
        if boundary == "ring":
            left, right = bits[(i - 1) % n], bits[(i + 1) % n]
        else:
            left = bits[i - 1] if i > 0 else 0
            right = bits[i + 1] if i < n - 1 else 0
        out.append(RULE_TABLE[(left, bits[i], right)])
    return out


def rng(seed=0):
    return np.random.default_rng(seed)


# ---------------------------------------------------------------- Rule 110


@pytest.mark.parametrize("boundary", ["ring", "zero"])
def test_rule110_step_matches_naive(boundary):
    states = rng(1).integers(0, 2, size=(50, 11))
    for _ in range(5):
        fast = rule110_step(states, boundary)
        for row, new in zip(states, fast):
            assert list(new) == naive_step(list(row), boundary)
        states = fast


def test_rule110_run_per_row_steps():
    states = rng(2).integers(0, 2, size=(6, 9))
    steps = np.array([0, 1, 2, 3, 5, 8])
    out = rule110_run(states, steps)
    for row, t, got in zip(states, steps, out):
        want = list(row)
        for _ in range(t):
            want = naive_step(want, "ring")
        assert list(got) == want


def test_rule110_labels_match_naive_from_tokens():
    task = Rule110(n_strings=3, n_bits=10, steps_range=(0, 7))
    batch = task.sample(rng(3), 40)
    C = task.context_len
    for b in range(40):
        t = batch.difficulty[b, C]
        for i in range(3):
            bits = list(batch.inputs[b, i * 10 : (i + 1) * 10])
            for _ in range(t):
                bits = naive_step(bits, "ring")
            assert batch.targets[b, C + i] == bits[0]


def test_rule110_label_balance_and_zero_degeneracy():
    strings = rng(4).integers(0, 2, size=(4000, 24))
    ones = rule110_run(strings, 32, "ring")[:, 0].mean()
    assert 0.4 <= ones <= 0.7, ones
    for t in (8, 16, 32):
        assert rule110_run(strings, t, "zero")[:, 0].mean() >= 0.98


def test_rule110_whole_string_dependence():
    """At t=32 (> n_bits) on a ring, flipping any one input bit often changes the label."""
    n, nb, t = 2000, 24, 32
    strings = rng(5).integers(0, 2, size=(n, nb))
    flipped = np.repeat(strings[None], nb, axis=0)  # [nb, n, nb]
    flipped[np.arange(nb), :, np.arange(nb)] ^= 1
    base = rule110_run(strings, t)[:, 0]
    after = rule110_run(flipped, t)[..., 0]  # [nb, n]
    per_bit = (after != base[None]).mean(axis=1)
    assert per_bit.mean() >= 0.3, per_bit
    assert per_bit.min() > 0.1, per_bit


def test_rule110_layout_and_consistency():
    task = Rule110()
    assert (task.seq_len, task.vocab_size, task.window) == (100, 6, 24)
    assert task.eval_difficulties == (1, 2, 4, 8, 16, 32)
    batch = task.sample(rng(6), 16)
    C = 96
    assert batch.inputs.dtype == np.int32 and batch.mask.dtype == np.float32
    assert batch.inputs.shape == batch.targets.shape == batch.mask.shape == (16, 100)
    assert set(np.unique(batch.inputs[:, :C])) <= {0, 1}
    assert (batch.inputs[:, C:] == np.arange(2, 6)).all()
    assert (batch.mask[:, :C] == 0).all() and (batch.mask[:, C:] == 1).all()
    assert ((batch.difficulty == -1) == (batch.mask == 0)).all()
    assert (batch.difficulty[:, C:] == 32).all()
    assert (batch.targets[batch.mask == 0] == 0).all()
    assert set(np.unique(batch.targets[:, C:])) <= {0, 1}
    # every context window (one string) holds no answers
    for c in range(4):
        assert (batch.mask[:, c * 24 : (c + 1) * 24] == 0).all()


def test_rule110_difficulty_and_range():
    task = Rule110(n_strings=2, n_bits=8, steps=4)
    assert task.eval_difficulties == (1, 2, 4)
    b = task.sample(rng(7), 8, difficulty=3)
    assert (b.difficulty[b.mask > 0] == 3).all()
    task = Rule110(n_strings=2, n_bits=8, steps_range=(1, 6))
    b = task.sample(rng(7), 500)
    assert set(np.unique(b.difficulty[b.mask > 0])) == set(range(1, 7))
    assert task.eval_difficulties == (1, 2, 4, 6)


# ---------------------------------------------------------------- Depo


def parse_depo(task, row):
    """Read edges and queries back from tokens alone."""
    C = task.context_len
    ctx = list(row[:C])
    pads = 0
    while pads < C and ctx[pads] == 0:
        pads += 1
    body = [t for t in ctx[pads:] if t != 0]  # edge_gap: pads between edges too
    assert len(body) % 3 == 0
    edges = [(body[i], body[i + 1]) for i in range(0, len(body), 3)]
    assert all(body[i + 2] == 1 for i in range(0, len(body), 3))
    queries = [(row[p], row[p + 1] - 1) for p in range(C, task.seq_len, 2)]  # (v, k)
    return pads, edges, queries


def slow_walk(edges, v, k):
    for _ in range(k):
        nxt = [b for a, b in edges if a == v]
        assert len(nxt) == 1
        v = nxt[0]
    return v


@pytest.mark.parametrize(
    "settings",
    [
        {},
        dict(max_nodes=8, max_hops=4, window=16, context_len=32),
        dict(
            max_nodes=8, n_names=8, min_nodes=8, max_hops=8, window=12, context_len=24, n_queries=3
        ),
        dict(max_nodes=8, max_hops=4, hops=[1, 4], hop_weights=[1, 3], window=16, context_len=32),
        dict(max_nodes=8, max_hops=4, window=16, context_len=32, edge_order="forward"),
    ],
)
def test_depo_against_slow_walk(settings):
    task = Depo(**settings)
    batch = task.sample(rng(8), 24)
    C, Q = task.context_len, task.n_queries
    hop_pos = C + 1 + 2 * np.arange(Q)
    for b in range(24):
        pads, edges, queries = parse_depo(task, batch.inputs[b])
        n = len(edges)
        assert task.min_nodes <= n <= task.max_nodes
        assert pads == C - 3 * n  # left padding only
        # a permutation forming a single cycle
        heads, tails = [a for a, _ in edges], [b_ for _, b_ in edges]
        assert sorted(heads) == sorted(tails) and len(set(heads)) == n
        assert all(task.name_offset <= x < task.vocab_size for x in heads)
        seen, v = set(), heads[0]
        while v not in seen:
            seen.add(v)
            v = slow_walk(edges, v, 1)
        assert len(seen) == n
        for (v, k), p in zip(queries, hop_pos):
            assert 1 <= k <= task.max_hops and v in heads
            assert batch.targets[b, p] == slow_walk(edges, v, k)
            assert batch.difficulty[b, p] == k and batch.mask[b, p] == 1
        if n >= Q:
            assert len({v for v, _ in queries}) == Q
    scored = batch.mask > 0
    assert scored.sum() == 24 * Q
    assert ((batch.difficulty == -1) == ~scored).all()
    assert (batch.targets[~scored] == 0).all()
    # the context is whole windows with no answers; the query part is one window
    assert C % task.window == 0 and not scored[:, :C].any()
    assert task.seq_len - C <= task.window


def test_depo_defaults_and_difficulty():
    task = Depo()
    assert (task.seq_len, task.window, task.context_len) == (320, 75, 300)
    assert task.eval_difficulties == (1, 2, 4, 8, 16)
    small = Depo(max_nodes=8, max_hops=6, window=16, context_len=32)
    assert small.n_queries == 8 and small.seq_len == 48
    assert small.eval_difficulties == (1, 2, 4, 6)
    b = task.sample(rng(9), 4, difficulty=8)
    assert (b.difficulty[b.mask > 0] == 8).all()
    b = task.sample(rng(9), 200)
    assert set(np.unique(b.difficulty[b.mask > 0])) == set(range(1, 17))
    assert len(task.token_names()) == task.vocab_size


@pytest.mark.parametrize(
    "settings, words",
    [
        (dict(max_nodes=110), r"context_len must be >= 3\*max_nodes = 330"),
        (dict(context_len=301, max_nodes=10), "multiple of window"),
        (dict(n_queries=40), "n_queries must be <="),
        (
            dict(window=16, max_nodes=8, context_len=32, n_queries=10),
            r"n_queries must be <= window // 2 = 8",
        ),
        (dict(n_names=50), "n_names must be >= 75"),
        (dict(min_nodes=1), "min_nodes must be >= 2"),
        (dict(max_hops=0), "max_hops must be >= 1"),
        (dict(eviction="soft"), "eviction"),
        (dict(max_hops=4, hops=[1, 5]), r"each of hops must be <= 4 \(got 5\)"),
        (dict(max_hops=4, hops=[]), "hops must be a list"),
        (dict(max_hops=4, hops=[2, 2]), "must not repeat"),
        (dict(max_hops=4, hops=[1, 3], hop_weights=[1]), r"hop_weights must be 2 non-negative"),
        (dict(max_hops=4, hop_weights=[0, 0, 0, 0]), "not all 0"),
    ],
)
def test_depo_rejects_bad_settings(settings, words):
    with pytest.raises(ValueError, match=words):
        get_task("depo", **settings)


@pytest.mark.parametrize("order", ["forward", "reverse"])
def test_depo_edge_order(order):
    task = Depo(
        max_nodes=6,
        min_nodes=3,
        max_hops=2,
        window=18,
        context_len=18,
        n_queries=3,
        edge_order=order,
    )
    batch = task.sample(rng(5), 16)
    starts = set()
    for b in range(16):
        _, edges, _ = parse_depo(task, batch.inputs[b])
        if order == "reverse":
            edges = edges[::-1]
        # each edge continues the previous one, all the way round the cycle
        assert all(edges[i][1] == edges[i + 1][0] for i in range(len(edges) - 1))
        assert edges[-1][1] == edges[0][0]
        starts.add(len(edges))
    assert len(starts) > 1  # n still varies
    with pytest.raises(ValueError, match="edge_order must be one of"):
        Depo(edge_order="sorted")


def test_depo_edge_gap_moves_edges_apart_at_random():
    task = Depo(
        max_nodes=6,
        min_nodes=6,
        n_names=8,
        max_hops=2,
        window=30,
        context_len=30,
        n_queries=3,
        edge_order="forward",
        edge_gap=2,
    )
    batch = task.sample(rng(4), 64)
    spacings = set()
    for b in range(64):
        _, edges, queries = parse_depo(task, batch.inputs[b])
        assert all(edges[i][1] == edges[i + 1][0] for i in range(len(edges) - 1))
        for (v, k), p in zip(queries, range(task.context_len + 1, task.seq_len, 2)):
            assert batch.targets[b, p] == slow_walk(edges, v, k)
        starts = [
            i
            for i, t in enumerate(batch.inputs[b, : task.context_len])
            if t >= task.name_offset and batch.inputs[b, i + 2] == 1
        ]
        spacings.update(np.diff(starts).tolist())
    assert spacings == {3, 4, 5}  # every gap in 0..2 occurs, nothing else
    assert (
        Depo(max_nodes=6, window=18, context_len=18, n_queries=3).sample(rng(4), 8).inputs.tolist()
        == Depo(max_nodes=6, window=18, context_len=18, n_queries=3, edge_gap=0)
        .sample(rng(4), 8)
        .inputs.tolist()
    )
    with pytest.raises(
        ValueError, match=r"must be >= 5\*max_nodes = 30 .* with 0-2 <pad> before each edge"
    ):
        Depo(max_nodes=6, window=12, context_len=24, n_queries=3, edge_gap=2)


def test_depo_trained_hops_and_weights():
    task = Depo(
        max_nodes=8,
        max_hops=4,
        hops=[4, 1],
        hop_weights=[3, 1],
        window=16,
        context_len=32,
        n_queries=8,
    )
    assert (
        task.eval_difficulties == (1, 4)
        and task.vocab_size == Depo(max_nodes=8, max_hops=4, window=16, context_len=32).vocab_size
    )
    k = task.sample(rng(3), 500).difficulty
    k = k[k >= 0]
    assert set(np.unique(k)) == {1, 4}
    assert abs((k == 4).mean() - 0.75) < 0.03  # weight 3 : 1
    # without hops/hop_weights the stream is the original uniform draw over 1..max_hops
    plain = Depo(max_nodes=8, max_hops=4, window=16, context_len=32)
    assert set(np.unique(plain.sample(rng(3), 200).difficulty)) == {-1, 1, 2, 3, 4}
    d = json.loads(json.dumps(task.to_dict()))
    assert d["hops"] == [4, 1] and task_from_dict(d) == task
    assert "k in {4, 1} with weights (3, 1)" in task.describe()


# ---------------------------------------------------------------- shared


@pytest.mark.parametrize("name", sorted(TASKS))
def test_determinism_and_round_trip(name):
    task = get_task(name)
    a, b = task.sample(rng(10), 8), task.sample(rng(10), 8)
    c = task.sample(rng(11), 8)
    for f in ("inputs", "targets", "mask", "difficulty"):
        assert np.array_equal(getattr(a, f), getattr(b, f))
    assert not np.array_equal(a.inputs, c.inputs)
    d = json.loads(json.dumps(task.to_dict()))
    assert d["name"] == name and task_from_dict(d) == task
    assert len(task.token_names()) == task.vocab_size
    assert a.inputs.max() < task.vocab_size and a.targets.max() < task.vocab_size
    assert isinstance(task.describe(), str) and len(task.describe()) > 100


def test_get_task_errors():
    with pytest.raises(ValueError, match="known tasks: depo, rule110"):
        get_task("nope")
    with pytest.raises(ValueError, match="unknown setting"):
        get_task("rule110", n_bit=3)
    with pytest.raises(ValueError, match=r"n_bits must be >= 3 \(got 1\)"):
        get_task("rule110", n_bits=1)
    with pytest.raises(ValueError, match="boundary"):
        get_task("rule110", boundary="open")
    with pytest.raises(ValueError, match="n_strings must be <= n_bits"):
        get_task("rule110", n_strings=5, n_bits=4)
    with pytest.raises(ValueError, match="steps_range"):
        get_task("rule110", steps_range=(5, 2))


def test_score():
    task = Rule110(n_strings=2, n_bits=6, steps_range=(1, 2))
    batch = task.sample(rng(12), 50)
    perfect = accuracy_by_difficulty(batch, batch.targets)
    assert perfect["all"] == {"exact": 1.0, "token": 1.0, "count": 100}
    assert sum(perfect[d]["count"] for d in (1, 2)) == 100

    wrong = batch.targets.copy()
    wrong[:, -1] = 1 - wrong[:, -1]  # second query of every sequence wrong
    s = accuracy_by_difficulty(batch, wrong)
    assert s["all"]["exact"] == 0.0 and s["all"]["token"] == 0.5
    assert s[1]["token"] == 0.5 and s[2]["exact"] == 0.0

    # predictions at unscored positions don't matter
    junk = np.where(batch.mask > 0, batch.targets, 5)
    assert accuracy_by_difficulty(batch, junk)["all"]["exact"] == 1.0

    # exact counts only the sequences holding items of that difficulty
    t1 = batch.difficulty[:, -1] == 1
    only_t1_wrong = batch.targets.copy()
    only_t1_wrong[t1, -1] ^= 1
    s = accuracy_by_difficulty(batch, only_t1_wrong)
    assert s[1]["exact"] == 0.0 and s[2]["exact"] == 1.0
    assert_close(s["all"]["exact"], 1 - t1.mean(), rtol=1e-12, what="exact over all")


def test_batch_shape_check():
    x = np.zeros((2, 3), np.int32)
    with pytest.raises(ValueError, match="mask"):
        Batch(x, x, np.zeros((2, 4), np.float32), x)
