"""Qwen3.5 (dense and MoE), Qwen3-Next and OLMo Hybrid: mlx-lm's model files under the sleep
engine, checked against Hugging Face transformers' own PyTorch implementations (torch is a
test-only dependency: these tests skip without it).

Each case builds a tiny random transformers model (4 layers, mixed GDN / attention, hidden 32,
vocab 100), re-draws its weights so logits have std ~1 (the stock 0.02 init would make almost any
model match), saves it, converts it with our converter and compares logits.

Tolerance: 3e-5 of the largest |logit| (fp32 on both sides; tests/numerics.py). Measured
differences are <= 8.6e-6 of it (<= 4.6e-5 absolute) under every BLAS setting of
tests/check_tolerances.py; they come from transformers' chunked delta rule (ours is recurrent)
and summation order. Any structural error (a norm's 1 + w, a layer of the wrong kind, RoPE,
beta's range) moves logits by > 1e-2.
"""

import json
import math
import os

import mlx.core as mx
import numpy as np
import pytest

from mlx_sleep import SleepConfig, SleepEngine, load_model, sleep_forward
from mlx_sleep.convert import ConversionError, build, convert
from mlx_sleep.config import middle_half_core as default_core
from mlx_sleep.models.mlx_lm_adapters import FULL, LINEAR

from . import parity
from .numerics import assert_close
from .tiny_models import LINEAR_HYBRID_SIZES

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TOL = 3e-5  # of the logits' scale
T, P = 13, 6  # sequence length; prefill length of the incremental check
MEASURED = parity.table("mlx-lm hybrids vs transformers")
L, F = LINEAR, FULL
SIZES = dict(vocab_size=100, **LINEAR_HYBRID_SIZES)
# name -> (config class, model class, settings). Layer patterns are irregular on purpose:
# mlx-lm's Qwen files would put attention at layer 3 only (full_attention_interval 4).
CASES = {
    "qwen3_5": (
        "Qwen3_5TextConfig",
        "Qwen3_5ForCausalLM",
        dict(layer_types=[L, F, L, L], tie_word_embeddings=True),
    ),
    # MLX's CPU backend runs MoE gathers in float32 only (as everything here)
    "qwen3_5_moe": (
        "Qwen3_5MoeTextConfig",
        "Qwen3_5MoeForCausalLM",
        dict(
            layer_types=[F, L, L, F],
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=24,
        ),
    ),
    "qwen3_next": (
        "Qwen3NextConfig",
        "Qwen3NextForCausalLM",
        dict(
            layer_types=[L, F, L, F],
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=24,
        ),
    ),
    "qwen3_next_dense": (
        "Qwen3NextConfig",
        "Qwen3NextForCausalLM",
        dict(
            layer_types=[F, L, L, L],
            num_experts=4,
            num_experts_per_tok=2,
            mlp_only_layers=[0, 1, 2, 3],
        ),
    ),
    "olmo_hybrid": (
        "OlmoHybridConfig",
        "OlmoHybridForCausalLM",
        dict(layer_types=[L, L, F, L], pad_token_id=0, eos_token_id=1),
    ),
    # released OLMo Hybrid checkpoints have no RoPE
    "olmo_hybrid_norope": (
        "OlmoHybridConfig",
        "OlmoHybridForCausalLM",
        dict(layer_types=[L, F, L, F], pad_token_id=0, eos_token_id=1, no_rope=True),
    ),
}


def randomize(model):
    """Weights at a scale where logits have std ~1 and every part of the model matters."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "conv1d" in name:
                p.normal_(0, 0.5)
            elif name.endswith("A_log"):
                p.uniform_(0, math.log(16))
            elif name.endswith("dt_bias"):
                p.normal_(0, 0.5)
            elif p.ndim >= 2:
                p.normal_(0, 1.0 if "embed" in name else p.shape[-1] ** -0.5)
            else:  # norms: their stored value plus noise (Qwen's are zero-centred)
                p.add_(torch.randn_like(p) * 0.1)


def make_hf(case, path, **overrides):
    """Save a tiny random transformers model of `case` to `path`; returns the torch model."""
    config_cls, model_cls, settings = CASES[case]
    torch.manual_seed(sorted(CASES).index(case))
    settings = {**SIZES, **settings, **overrides}
    no_rope = settings.pop("no_rope", False)
    config = getattr(transformers, config_cls)(**settings)
    if no_rope:  # the constructor fills in default RoPE; released checkpoints say null
        config.rope_parameters = None
    model = getattr(transformers, model_cls)(config).eval()
    assert no_rope == (getattr(model.model, "rotary_emb", 0) is None)
    randomize(model)
    model.save_pretrained(str(path))
    return model


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    """case -> (converted model, input ids, transformers' logits, hf dir)."""
    root = tmp_path_factory.mktemp("hybrids")
    ids = np.random.default_rng(0).integers(0, SIZES["vocab_size"], (2, T))
    out = {}
    for case in CASES:
        hf = make_hf(case, root / case)
        with torch.no_grad():
            want = hf(torch.tensor(ids)).logits.numpy()
        model = load_model(convert(str(root / case), str(root / (case + "-mlx"))))
        out[case] = (model, mx.array(ids.astype(np.int32)), mx.array(want), root / case)
    return out


def check(name, got, want):
    MEASURED[name] = float(mx.abs(got.astype(mx.float32) - want).max())
    assert_close(got, want, rtol=TOL, what=name)


@pytest.mark.parametrize("case", list(CASES))
def test_full_forward_matches_transformers(cases, case):
    model, ids, want, _ = cases[case]
    assert float(want.std()) > 0.5  # the check is not trivially passed
    check(f"{case}/full", model(ids), want)


@pytest.mark.parametrize("case", list(CASES))
def test_incremental_decoding_matches_transformers(cases, case):
    """Prefill, then one token at a time through the sleep engine (N = 1, a window that never
    fills): our per-layer state is mlx-lm's cache, RoPE at global positions."""
    model, ids, want, _ = cases[case]
    engine = SleepEngine(model, SleepConfig(loops=1, window=T), batch_size=2)
    got = [engine.feed(ids[:, :P])] + [engine.feed(ids[:, t : t + 1]) for t in range(P, T)]
    check(f"{case}/incremental", mx.concatenate(got, axis=1), want)


@pytest.mark.parametrize("case", list(CASES))
def test_mlx_lm_generation_drives_the_adapter(cases, case):
    """mlx-lm's generate_step through our cache protocol: each step's log-probabilities equal
    transformers' logits at that position (teacher-forced on the fixture's tokens)."""
    from mlx_lm.generate import generate_step

    model, ids, want, _ = cases[case]
    cache = model.make_cache()
    logits = model(ids[:1, :P], cache=cache)
    for t in range(P, T):
        check(f"{case}/mlx-lm cache", logits[:, -1], want[:1, t - 1])
        logits = model(ids[:1, t : t + 1], cache=cache)
    steps = list(generate_step(ids[0, :P], model, max_tokens=2))
    # greedy: transformers' logit for that token is its largest, up to rounding
    assert_close(
        want[0, P - 1, int(steps[0][0])],
        want[0, P - 1].max(),
        rtol=TOL,
        scale=float(mx.abs(want[0, P - 1]).max()),
        what="greedy token's logit",
    )


@pytest.mark.parametrize("case", list(CASES))
def test_layer_types_of_the_checkpoint_are_honoured(cases, case):
    model, _, _, src = cases[case]
    types = json.load(open(os.path.join(src, "config.json")))["layer_types"]
    assert [b.kind for b in model.sleep_blocks()] == types == CASES[case][2]["layer_types"]
    for layer, block, kind in zip(model.layers, model.sleep_blocks(), types):
        assert block.layer is layer and ("linear_attn" in layer) == (kind == LINEAR)
    state = model.initial_state(2)
    for s, kind in zip(state, types):
        assert (s["S"].shape == (2, 4, 8, 16)) if kind == LINEAR else s == {}
    assert model.core == default_core(4) == (1, 3)


@pytest.mark.parametrize("case", ["qwen3_5", "qwen3_5_moe", "qwen3_next", "olmo_hybrid"])
@pytest.mark.parametrize("eviction", ["hard", "sliding"])
def test_converted_model_sleeps_with_n_above_one(cases, case, eviction):
    """N = 3 on the default core: incremental feed / consolidate equals Algorithm 1's
    sleep_forward, and sleeping changes the answer (the core really loops)."""
    model, ids, _, _ = cases[case]
    mask = np.zeros((2, T), np.float32)
    mask[:, 10:] = 1  # two context windows of 5 sleep, the last one is scored
    out = {}
    for loops in (1, 3):
        sleep = SleepConfig(loops=loops, window=5, eviction=eviction)
        (answer,), _ = sleep_forward(model, ids, mask, sleep)
        engine = SleepEngine(model, sleep, batch_size=2)
        engine.feed(ids[:, :10])
        logits = engine.feed(ids[:, 10:])
        assert engine.sleeps == 2
        assert_close(logits, answer[2], rtol=1e-5, what=f"N = {loops} logits")
        for block, s in zip(model.sleep_blocks(), engine.state):
            if block.kind == FULL:  # hard: only the live window's 3; sliding: the last L - 1
                assert s["keys"].shape[2] == (3 if eviction == "hard" else 4)
        out[loops] = logits
    assert float(mx.abs(out[1] - out[3]).max()) > 1e-3


def test_unconverted_checkpoint_loads_and_bf16_keeps_A_log(cases, tmp_path):
    model, ids, want, src = cases["qwen3_next"]
    direct = build(str(src))[0]  # a Hugging Face directory, converted in memory
    assert_close(direct(ids), want, rtol=TOL, what="unconverted logits")
    # (Qwen3.5: MLX's CPU backend runs MoE gathers in float32 only)
    model, ids, want, src = cases["qwen3_5"]
    m16 = load_model(convert(str(src), str(tmp_path / "bf16"), dtype="bfloat16"))
    la = m16.model.layers[0].linear_attn
    assert m16.model.embed_tokens.weight.dtype == mx.bfloat16 and la.A_log.dtype == mx.float32
    got = m16(ids).astype(mx.float32)
    assert float((got.argmax(-1) == want.argmax(-1)).mean()) > 0.85


def test_qwen3_5_moe_released_layout(cases, tmp_path):
    """Released Qwen3.5 MoE checkpoints are multimodal: model.language_model.* names, fused
    experts (gate_up_proj [E, 2I, H], down_proj [E, H, I]), the text config under text_config.
    transformers saves a text-only model one tensor per expert (the CASES entry); both load."""
    from safetensors.numpy import load_file, save_file

    _, ids, want, src = cases["qwen3_5_moe"]
    w = load_file(os.path.join(src, "model.safetensors"))
    fused = {}
    for k in list(w):
        if ".mlp.experts.0.gate_proj." in k:
            pre = k.split(".experts.")[0]
            E = CASES["qwen3_5_moe"][2]["num_experts"]
            get = lambda n: np.stack([w.pop(f"{pre}.experts.{e}.{n}.weight") for e in range(E)])
            fused[f"{pre}.experts.gate_up_proj"] = np.concatenate(
                [get("gate_proj"), get("up_proj")], axis=1
            )
            fused[f"{pre}.experts.down_proj"] = get("down_proj")
    w.update(fused)
    w = {
        k.replace("model.", "model.language_model.", 1) if k.startswith("model.") else k: v
        for k, v in w.items()
    }
    w["model.visual.patch_embed.proj.weight"] = np.zeros((4, 3), np.float32)  # dropped
    os.makedirs(tmp_path / "vl")
    save_file(w, str(tmp_path / "vl" / "model.safetensors"))
    text = json.load(open(os.path.join(src, "config.json")))
    cfg = {
        "model_type": "qwen3_5_moe",
        "architectures": ["Qwen3_5MoeForConditionalGeneration"],
        "tie_word_embeddings": False,
        "text_config": text,
        "vision_config": {"depth": 1},
    }
    json.dump(cfg, open(tmp_path / "vl" / "config.json", "w"))
    model = build(str(tmp_path / "vl"))[0]
    check("qwen3_5_moe/released layout", model(ids), want)


def test_quantized_moe_keeps_routers(cases, tmp_path):
    model, ids, want, src = cases["qwen3_next"]
    q8 = load_model(
        convert(str(src), str(tmp_path / "q8"), quantize=True, q_bits=8, q_group_size=32)
    )
    mlp = q8.model.layers[0].mlp
    assert "scales" in mlp.switch_mlp.up_proj and "scales" not in mlp.gate
    got = q8(ids).astype(mx.float32)
    assert float((got.argmax(-1) == want.argmax(-1)).mean()) > 0.85


def test_sleep_settings_stored(cases, tmp_path):
    _, _, _, src = cases["olmo_hybrid"]
    out = convert(
        str(src), str(tmp_path / "m"), loops=4, window=16, eviction="sliding", core=(0, 2)
    )
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["model_type"] == "olmo_hybrid" and cfg["sleep"]["loops"] == 4
    assert cfg["model"]["core"] == [0, 2] and cfg["model"]["args"]["layer_types"] == [L, L, F, L]
    assert load_model(out).core == (0, 2)


# -- bad input ------------------------------------------------------------------------------------


def edit_config(src, dst, **changes):
    """A copy of checkpoint `src` at `dst` with config.json keys changed (None: removed)."""
    os.makedirs(dst)
    for f in os.listdir(src):
        os.symlink(os.path.join(src, f), os.path.join(dst, f))
    cfg = json.load(open(os.path.join(src, "config.json")))
    for k, v in changes.items():
        cfg.pop(k, None) if v is None else cfg.__setitem__(k, v)
    os.remove(os.path.join(dst, "config.json"))
    json.dump(cfg, open(os.path.join(dst, "config.json"), "w"))
    return str(dst)


@pytest.mark.parametrize(
    "case,changes,message",
    [
        (
            "qwen3_5",
            dict(layer_types=[L, F, L]),
            "layer_types has 3 entries but num_hidden_layers is 4",
        ),
        (
            "qwen3_5",
            dict(layer_types=[L, F, "sliding_attention", L]),
            "unsupported layer type(s) ['sliding_attention']",
        ),
        ("qwen3_5", dict(linear_key_head_dim=None), "lacks linear_key_head_dim"),
        ("qwen3_next", dict(num_experts=None), "lacks num_experts"),
        ("qwen3_5_moe", dict(moe_intermediate_size=None), "lacks moe_intermediate_size"),
        (
            "olmo_hybrid",
            dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}),
            "rope type 'yarn' is not supported",
        ),
        ("olmo_hybrid", dict(hidden_act="gelu"), "hidden_act 'gelu' is not supported"),
    ],
)
def test_bad_config_is_one_line(cases, tmp_path, case, changes, message):
    src = edit_config(str(cases[case][3]), tmp_path / "bad", **changes)
    with pytest.raises(ConversionError) as e:
        convert(src, str(tmp_path / "out"))
    assert message in str(e.value) and "\n" not in str(e.value)
    assert not os.path.exists(tmp_path / "out")


def test_config_that_disagrees_with_weights(cases, tmp_path):
    src = edit_config(str(cases["qwen3_5"][3]), tmp_path / "bad", linear_value_head_dim=16)
    with pytest.raises(
        ConversionError,
        match=r"config.json disagrees with the weights: "
        r"model.layers.0.linear_attn.\S+ is \[",
    ):
        convert(src, str(tmp_path / "out"))


def rewrite_weights(src, dst, edit):
    from safetensors.numpy import load_file, save_file

    os.makedirs(dst)
    weights = load_file(os.path.join(src, "model.safetensors"))
    edit(weights)
    save_file(weights, os.path.join(dst, "model.safetensors"))
    os.symlink(os.path.join(src, "config.json"), os.path.join(dst, "config.json"))
    return str(dst)


def test_missing_tensor_named_in_the_checkpoints_own_names(cases, tmp_path):
    """OLMo Hybrid's pre-norm is attention_layer_norm on disk (input_layernorm in mlx-lm)."""
    src = rewrite_weights(
        str(cases["olmo_hybrid"][3]),
        tmp_path / "bad",
        lambda w: w.pop("model.layers.1.attention_layer_norm.weight"),
    )
    with pytest.raises(
        ConversionError,
        match=r"missing tensor\(s\): model.layers.1.attention_layer_norm.weight \[32\]",
    ):
        convert(src, str(tmp_path / "out"))


def test_unexpected_tensor_and_untied_head(cases, tmp_path):
    def extra(w):
        w["model.layers.0.linear_attn.extra.weight"] = np.zeros((3, 5), np.float32)

    src = rewrite_weights(str(cases["qwen3_next"][3]), tmp_path / "extra", extra)
    with pytest.raises(
        ConversionError,
        match=r"unexpected tensor\(s\): "
        r"model.layers.0.linear_attn.extra.weight \[3, 5\]",
    ):
        convert(src, str(tmp_path / "out"))

    def differing_head(w):
        w["lm_head.weight"] = w["model.embed_tokens.weight"] + 1

    src = rewrite_weights(str(cases["qwen3_5"][3]), tmp_path / "head", differing_head)
    with pytest.raises(ConversionError, match="lm_head.weight differs"):
        convert(src, str(tmp_path / "out"))


def test_unknown_architecture_lists_the_hybrids(cases, tmp_path):
    src = edit_config(str(cases["qwen3_5"][3]), tmp_path / "bad", model_type="kimi_linear")
    with pytest.raises(
        ConversionError,
        match="unsupported architecture 'kimi_linear'; supported: "
        ".*olmo_hybrid.*qwen3_5, qwen3_5_moe, "
        "qwen3_5_moe_text, qwen3_5_text, qwen3_next",
    ):
        convert(src, str(tmp_path / "out"))
