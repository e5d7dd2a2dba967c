"""mlx-lm's generation utilities drive our models through the cache protocol."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.generate import generate_step

from mlx_sleep import HybridLM, ModelConfig, SleepConfig, SleepEngine


def test_generate_step_matches_the_sleep_engine_without_eviction():
    mx.random.seed(3)
    model = HybridLM(ModelConfig(vocab_size=50, hidden_size=32, layers="attn,gdn,jet,swa",
                                 swa_window=4, num_heads=2))
    prompt = mx.array([1, 2, 3, 4, 5, 6, 7])
    steps = list(generate_step(prompt, model, max_tokens=6))
    engine = SleepEngine(model, SleepConfig(window=100))
    logits = engine.feed(prompt[None])[:, -1]
    for token, logprobs in steps:
        expected = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        np.testing.assert_allclose(np.array(logprobs), np.array(expected[0]), atol=1e-4)
        assert int(token) == int(mx.argmax(logits[0]))
        logits = engine.feed(mx.array([[int(token)]]))[:, -1]


def test_cache_reports_its_size():
    model = HybridLM(ModelConfig(vocab_size=20, hidden_size=16, num_heads=2))
    cache = model.make_cache()
    assert all(c.empty() for c in cache)
    model(mx.array([[1, 2, 3]]), cache=cache)
    assert cache[0].size() == 3 and cache[0].nbytes > 0 and not cache[1].empty()
