"""Incremental inference with sleep: feed tokens, let the engine consolidate windows into its
fast weights, save the state and resume it.

    python examples/sleep_engine.py
"""

import mlx_sleep  # noqa: F401  (first on Linux: loads a fast BLAS before mlx.core)
import mlx.core as mx

from mlx_sleep import HybridLM, ModelConfig, SleepConfig, SleepEngine

mx.random.seed(0)
model = HybridLM(ModelConfig(vocab_size=256, hidden_size=64, layers="attn,gdn,attn,gdn"))
engine = SleepEngine(model, SleepConfig(loops=3, window=32, eviction="hard"))

prompt = mx.random.randint(0, 256, (1, 80))
logits = engine.feed(prompt)  # two full windows slept on by themselves, 16 tokens live
print(
    f"fed {engine.offset} tokens: {engine.sleeps} sleeps, {engine.window_len} tokens in the live window"
)

# An idle sleep, cancelled after the first pass: the engine is left exactly as it was.
engine.consolidate(cancel=lambda: True, on_pass=lambda n, N: print(f"  sleep pass {n}/{N}"))
print(f"after a cancelled sleep: {engine.window_len} tokens still live")
engine.consolidate(on_pass=lambda n, N: print(f"  sleep pass {n}/{N}"))
print(f"after sleeping: {engine.window_len} tokens live; only the fast weights remember them")

# Greedy generation continues from the fast weights.
token, generated = int(mx.argmax(logits[0, -1])), []
for _ in range(8):
    generated.append(token)
    token = int(mx.argmax(engine.feed(mx.array([[token]]))[0, -1]))
print("generated:", generated)

# Save and resume (a session store would write these arrays atomically).
saved = engine.state_dict()
resumed = SleepEngine(model, engine.sleep)
resumed.load_state_dict(saved)
same = mx.allclose(resumed.feed(mx.array([[token]])), engine.feed(mx.array([[token]]))).item()
print("resumed engine continues identically:", same)
