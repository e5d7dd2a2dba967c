"""One model interface for every architecture: `model.layers` are the decoder-layer modules
(mlx-lm's tools work on them), `sleep_blocks()` is the engine's view, and any model trains with
the Muon/AdamW split it declares."""

import json
import os

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.tuner.lora import LoRALinear, LoRASwitchLinear
from mlx_lm.tuner.utils import linear_to_lora_layers

from mlx_sleep import HybridLM, ModelConfig, SleepConfig, sleep_value_and_grad
from mlx_sleep.convert import build
from mlx_sleep.convert.mlx_lm_hybrids import HYBRIDS
from mlx_sleep.models import model_from_config
from mlx_sleep.models.mlx_lm_adapters import FULL, LINEAR
from mlx_sleep.models.ouro import insert_jet_layers
from mlx_sleep.tasks import get_task
from mlx_sleep.train import TrainConfig, Trainer

from .tiny_models import LINEAR_HYBRID_SIZES

FIX = os.path.join(os.path.dirname(__file__), "fixtures")
L, F = LINEAR, FULL
ADAPTER_SIZES = dict(
    vocab_size=100,
    **LINEAR_HYBRID_SIZES,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    max_position_embeddings=4096,
)
MOE = dict(
    num_experts=4,
    num_experts_per_tok=2,
    moe_intermediate_size=16,
    shared_expert_intermediate_size=24,
)
ADAPTERS = {
    "qwen3_5": dict(layer_types=[L, F, L, L]),
    "qwen3_5_moe": dict(layer_types=[F, L, L, F], **MOE),
    "qwen3_next": dict(layer_types=[L, F, L, F], partial_rotary_factor=0.25, **MOE),
    "olmo_hybrid": dict(layer_types=[L, L, F, L]),
}
ARCHITECTURES = ["hybrid", "jet_nemotron", "ouro+jet", *ADAPTERS]


def tiny_model(name):
    """A tiny model of each architecture, with random (or fixture) weights."""
    mx.random.seed(0)
    if name == "hybrid":
        return HybridLM(
            ModelConfig(
                vocab_size=64,
                hidden_size=32,
                layers="attn,gdn,jet,swa",
                swa_window=4,
                num_heads=2,
                core=(1, 3),
            )
        )
    if name == "jet_nemotron":  # the original's checkpoint, converted in memory
        return build(os.path.join(FIX, "jet-nemotron-tiny"))[0]
    if name == "ouro+jet":
        return insert_jet_layers(build(os.path.join(FIX, "ouro-tiny"))[0], 2)
    config = HYBRIDS[name].from_hf_config({**ADAPTER_SIZES, **ADAPTERS[name], "model_type": name})
    return model_from_config(name, config.to_dict())


def batch(model, T=12, B=2, seed=0):
    rng = np.random.default_rng(seed)
    ids = mx.array(rng.integers(0, min(model.vocab_size, 64), (B, T)), dtype=mx.int32)
    targets = mx.array(rng.integers(0, min(model.vocab_size, 64), (B, T)), dtype=mx.int32)
    mask = np.zeros((B, T), np.float32)
    mask[:, -4:] = 1  # the last window is scored, the two before it sleep
    return ids, targets, mask


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_layers_are_the_decoder_layer_modules(name):
    model = tiny_model(name)
    blocks = model.sleep_blocks()
    assert all(hasattr(layer, "apply_to_modules") for layer in model.layers)
    # every sleep block runs one of the real layers; Ouro's loops share them (not duplicated)
    n = len(model.layers)
    loops = len(blocks) // n
    assert len(blocks) == loops * n and (loops == 1 or name == "ouro+jet")
    names = [k for k, _ in tree_flatten(model.parameters())]
    assert len(names) == len(set(names))
    per_layer = sum(1 for k in names if ".layers." in f".{k}")
    assert per_layer == sum(len(tree_flatten(layer.parameters())) for layer in model.layers)


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_mlx_lm_lora_applies_to_every_architecture(name):
    model = tiny_model(name)
    ids, targets, mask = batch(model)
    before = model(ids)
    model.freeze()
    linear_to_lora_layers(model, len(model.layers), {"rank": 4, "scale": 10.0, "dropout": 0.0})
    for i, layer in enumerate(model.layers):
        lora = [
            k for k, m in layer.named_modules() if isinstance(m, (LoRALinear, LoRASwitchLinear))
        ]
        assert lora, f"layer {i} got no LoRA layers"
    assert float(mx.abs(model(ids) - before).max()) == 0.0  # LoRA starts as the identity
    trainable = [k for k, _ in tree_flatten(model.trainable_parameters())]
    assert trainable and all(".lora_" in k for k in trainable)

    sleep = SleepConfig(loops=2, window=4)
    (loss, _), grads = sleep_value_and_grad(model, ids, targets, mask, sleep)
    assert np.isfinite(loss.item())
    assert sum(float(mx.abs(g).sum()) for _, g in tree_flatten(grads)) > 0
    optim.Adam(learning_rate=1e-2).update(model, grads)
    assert float(mx.abs(model(ids) - before).max()) > 1e-4


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_models_declare_their_matrix_and_unquantized_weights(name):
    model = tiny_model(name)
    matrices = model.matrix_weights()
    params = dict(tree_flatten(model.parameters()))
    assert matrices and matrices <= set(params)
    assert all(params[p].ndim == 2 and ".layers." in f".{p}" for p in matrices)
    assert not any("embed" in p or "norm" in p or p.startswith("lm_head") for p in matrices)
    if name == "ouro+jet":
        assert model.keep_unquantized("early_exit_gate")
    if name in ("qwen3_5_moe", "qwen3_next"):
        assert model.keep_unquantized("model.layers.0.mlp.gate")


def test_fingerprint_tells_architectures_apart():
    a, b = tiny_model("hybrid"), tiny_model("hybrid")
    assert a.fingerprint() == b.fingerprint()  # shapes and config, not values
    c = HybridLM(
        ModelConfig(
            vocab_size=64,
            hidden_size=32,
            layers="attn,gdn,jet,swa",
            swa_window=4,
            num_heads=2,
            core=(0, 4),
        )
    )
    assert c.fingerprint() != a.fingerprint()


def test_trainer_trains_a_converted_jet_nemotron_with_sleep(tmp_path):
    """N = 2 through the memory-bounded path (sleep_value_and_grad); Muon takes the Linear
    weights the model declares, AdamW the rest; the loss falls; the run reloads."""
    from mlx_sleep.train import load_run

    task = get_task("rule110", n_strings=2, n_bits=4, steps=1)
    model = tiny_model("jet_nemotron")
    t = Trainer(
        str(tmp_path),
        model,
        SleepConfig(loops=2, window=task.window),
        task,
        TrainConfig(
            steps=40,
            batch_size=16,
            warmup=2,
            lr=1e-2,
            adam_lr=3e-3,
            eval_samples=16,
            checkpoint_every=40,
            log_every=1,
            activation_checkpoint=True,
        ),
        progress=False,
    )
    muon, adamw = t.optimizer.optimizers
    t.run()
    muon_keys = {k for k, _ in tree_flatten(muon.state)}
    adamw_keys = {k for k, _ in tree_flatten(adamw.state)}
    assert "layers.0.mixer.q_proj.weight.v" in muon_keys
    assert "embed_tokens.weight.m" in adamw_keys and "layers.0.mixer.A_log.m" in adamw_keys
    assert not any(k.startswith("embed_tokens") for k in muon_keys)
    losses = [json.loads(l)["loss"] for l in open(tmp_path / "metrics.jsonl") if '"loss"' in l]
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.05
    settings = json.load(open(tmp_path / "config.json"))
    assert settings["model_type"] == "hybrid" and settings["model"]["core"] == [1, 4]
    reloaded, _, _, _ = load_run(str(tmp_path))
    ids = mx.array([[1, 2, 3, 4]])
    assert float(mx.abs(reloaded(ids) - t.model(ids)).max()) == 0.0


@pytest.mark.parametrize("name", list(ADAPTERS))
def test_adapters_run_their_gdn_layers_through_our_op(name, monkeypatch):
    from mlx_sleep import kernels

    model = tiny_model(name)
    ids, _, _ = batch(model)
    want = model(ids)
    calls = []

    def spy(*args, **kw):
        calls.append(args[0].shape)
        return real(*args, **kw)

    real = kernels.gated_delta
    monkeypatch.setattr(kernels, "gated_delta", spy)
    got = model(ids)
    n_gdn = ADAPTERS[name]["layer_types"].count(L)
    assert len(calls) == n_gdn
    assert float(mx.abs(got - want).max()) == 0.0
