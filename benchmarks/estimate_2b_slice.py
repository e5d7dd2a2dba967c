"""`--estimate`'s numbers for a 4-block slice of the Jet-Nemotron 2B shape (1 prelude, 2 looped,
1 coda block; bf16; random weights; full vocabulary), LoRA, L = 2000, batch 1 (the recipe's, with
gradient accumulation), for N in {1, 2, 4, 6} and L in {512, 1000, 2000} (hard eviction), on a
GSM-Infinite-shaped record: a prompt of three windows and a 100-token scored answer. The full
model has 7x the blocks of each part. The probes (up to 256 tokens) are the same for every L.
docs/finetune.md quotes the result (benchmarks/results/estimate_2b_slice.jsonl, from this
machine's CPU backend; ~10 minutes on 2 cores: the probes run a 2B-wide block stack on 64-256
tokens).

    python benchmarks/estimate_2b_slice.py > benchmarks/results/estimate_2b_slice.jsonl
    python benchmarks/estimate_2b_slice.py --probes benchmarks/results/estimate_2b_slice.jsonl
        # the estimates again from recorded probes (seconds instead of minutes)
"""

import json
import os
import sys
import types

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import mlx_sleep  # noqa: E402,F401  (BLAS first)
import mlx.core as mx, numpy as np
from mlx_sleep.config import ModelConfig, SleepConfig
from mlx_sleep.models.hybrid import HybridLM
from mlx_sleep.finetune import FinetuneConfig, prepare_model, estimate_step
from mlx_sleep.finetune import estimate as F
from mlx_sleep.loop import World

cfg_m = ModelConfig(
    vocab_size=151936,
    hidden_size=1536,
    layers="jet,jet,attn,jet",
    intermediate_size=8960,
    num_heads=12,
    num_kv_heads=2,
    head_dim=128,
    attention_bias=True,
    rope_theta=1e6,
    gdn_k_heads=12,
    gdn_v_heads=12,
    gdn_head_k_dim=96,
    gdn_head_v_dim=192,
    gdn_norm_eps=1e-5,
    core=(1, 3),
    tie_embeddings=True,
)
model = HybridLM(cfg_m)
model.set_dtype(mx.bfloat16)
mx.eval(model.parameters())
cfg = FinetuneConfig(batch_size=1, fine_tune_type="lora")
prepare_model(model, cfg)
ft = types.SimpleNamespace(model=model, cfg=cfg, sleep_at=lambda s: sleep, world=World())
cache, probe = {}, F._probe
if sys.argv[1:2] == ["--probes"]:  # reuse the probes an earlier run printed
    for line in open(sys.argv[2]):
        r = json.loads(line)
        if "probe" in r:
            cache[tuple(r["probe"])] = (r["peak_bytes"], r["seconds"])


def memo(model, s, batch, length, passes, scored, mb):
    key = (batch, length, passes, scored, mb)
    if key not in cache:
        cache[key] = probe(model, s, batch, length, passes, scored, mb)
        print(
            json.dumps({"probe": key, "peak_bytes": cache[key][0], "seconds": cache[key][1]}),
            flush=True,
        )
    return cache[key]


F._probe = memo
for L in (2000, 1000, 512):
    scored = np.zeros(3 * L + 101, bool)
    scored[-100:] = True
    ft.train_examples = [(np.zeros(3 * L + 101, np.int32), scored)]
    for n in (1, 2, 4, 6):
        sleep = SleepConfig(loops=n, window=L, eviction="hard")
        e = estimate_step(ft)
        print(
            json.dumps(
                {
                    "L": L,
                    "N": n,
                    "B": 1,
                    **e["parts"],
                    "peak": e["peak_bytes"],
                    "seconds": e["seconds_per_step"],
                }
            ),
            flush=True,
        )
