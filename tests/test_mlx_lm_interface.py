"""mlx-lm's generation utilities drive our models through the cache protocol."""

import os

import mlx.core as mx
import pytest
from mlx_lm.generate import generate_step

from mlx_sleep import HybridLM, ModelConfig, SleepConfig, SleepEngine
from mlx_sleep.convert import build
from tests.numerics import assert_close


def test_generate_step_matches_the_sleep_engine_without_eviction():
    mx.random.seed(3)
    model = HybridLM(
        ModelConfig(
            vocab_size=50, hidden_size=32, layers="attn,gdn,jet,swa", swa_window=4, num_heads=2
        )
    )
    prompt = mx.array([1, 2, 3, 4, 5, 6, 7])
    steps = list(generate_step(prompt, model, max_tokens=6))
    engine = SleepEngine(model, SleepConfig(window=100))
    logits = engine.feed(prompt[None])[:, -1]
    for token, logprobs in steps:
        expected = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        assert_close(logprobs, expected[0], rtol=1e-5, what="log-probabilities")
        # greedy: the token's logit is the largest, up to rounding (a near-tie may go either way)
        assert_close(
            logits[0, int(token)],
            logits[0].max(),
            rtol=1e-5,
            scale=float(mx.abs(logits).max()),
            what="greedy token's logit",
        )
        logits = engine.feed(mx.array([[int(token)]]))[:, -1]


def test_cache_reports_its_size():
    model = HybridLM(ModelConfig(vocab_size=20, hidden_size=16, num_heads=2))
    cache = model.make_cache()
    assert all(c.empty() for c in cache)
    model(mx.array([[1, 2, 3]]), cache=cache)
    assert cache[0].size() == 3 and cache[0].nbytes > 0 and not cache[1].empty()


def check_generate_step(model, prompt, n=4):
    """Each generated step's log-probabilities equal a plain full forward over the sequence."""
    seq = list(prompt)
    for token, logprobs in generate_step(mx.array(prompt), model, max_tokens=n):
        logits = model(mx.array([seq]))[0, -1]
        expected = logits - mx.logsumexp(logits)
        assert_close(logprobs, expected, rtol=1e-5, what="log-probabilities")  # measured <= 2.6e-7
        seq.append(int(token))


@pytest.mark.parametrize("fixture", ["jet-nemotron-tiny", "ouro-tiny"])
def test_generate_step_drives_converted_models(fixture):
    model = build(os.path.join(os.path.dirname(__file__), "fixtures", fixture))[0]  # in memory
    check_generate_step(model, [5, 17, 300, 42, 9, 101])
