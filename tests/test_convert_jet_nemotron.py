"""Jet-Nemotron: convert the tiny original-layout checkpoints and match the logits the ORIGINAL
PyTorch code produced (tests/fixtures/jet-nemotron-tiny, copied from ../shared/reference; its
README documents how they were made). Also the converter's bad-input handling.

Tolerances (fp32, tests/numerics.py): 3e-5 of the largest |value| (logits reach ~10: 3e-4)
for logits, features and states, short and long fixtures alike (T > 64: the original's full
forward and prefill use the chunked delta-rule algorithm, which differs from the recurrent one by
up to 1.1e-4 in its own code; ours is recurrent). Measured: at most 6.5e-6 of the scale (6.3e-5)
under every BLAS setting of tests/check_tolerances.py.
"""

import json
import os
import shutil
import struct

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_sleep import SleepConfig, SleepEngine, load, load_model, sleep_forward
from mlx_sleep.convert import ConversionError, convert
from mlx_sleep.config import middle_half_core as default_core

from . import parity
from .numerics import assert_close

FIX = os.path.join(os.path.dirname(__file__), "fixtures", "jet-nemotron-tiny")
CHECKPOINTS = {"main": FIX, "expand_v": os.path.join(FIX, "variant_expand_v")}
TOL = {"reference_short": 3e-5, "reference_long": 3e-5}  # of the logits' scale
MEASURED = parity.table("Jet-Nemotron vs original")


def max_diff(a, b):
    return float(mx.abs(a.astype(mx.float32) - b.astype(mx.float32)).max())


def check(name, got, want, rtol):
    MEASURED[name] = max_diff(got, want)
    assert_close(got, want, rtol=rtol, what=name)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("jet")
    return {k: load_model(convert(src, str(root / k))) for k, src in CHECKPOINTS.items()}


def ref(ckpt, name):
    d, meta = mx.load(os.path.join(CHECKPOINTS[ckpt], name + ".safetensors"), return_metadata=True)
    d["input_ids"] = d["input_ids"].astype(mx.int32)
    return d, int(meta["prefill_len"])


@pytest.mark.parametrize("ckpt", list(CHECKPOINTS))
@pytest.mark.parametrize("fixture", list(TOL))
def test_full_forward_matches_original(converted, ckpt, fixture):
    r, _ = ref(ckpt, fixture)
    check(f"{ckpt}/{fixture}/full", converted[ckpt](r["input_ids"]), r["logits_full"], TOL[fixture])


@pytest.mark.parametrize("ckpt", list(CHECKPOINTS))
@pytest.mark.parametrize("fixture", list(TOL))
def test_incremental_decoding_matches_original(converted, ckpt, fixture):
    """Prefill P tokens, then one token at a time, through the sleep engine with N = 1 and a
    window that never fills (so nothing is evicted): our state is the KV / conv / S cache."""
    r, P = ref(ckpt, fixture)
    ids = r["input_ids"]
    engine = SleepEngine(converted[ckpt], SleepConfig(loops=1, window=ids.shape[1]), batch_size=2)
    prefill = engine.feed(ids[:, :P])
    steps = mx.concatenate([engine.feed(ids[:, t : t + 1]) for t in range(P, ids.shape[1])], axis=1)
    check(f"{ckpt}/{fixture}/prefill", prefill, r["logits_prefill"], TOL[fixture])
    check(f"{ckpt}/{fixture}/steps", steps, r["logits_steps"], TOL[fixture])


def test_hidden_states_match_original(converted):
    """Per-layer features (index 0 the embeddings, 6 the final norm's output)."""
    r, _ = ref("main", "reference_short")
    model = converted["main"]
    h = model.embed(r["input_ids"])
    state = model.initial_state(2)
    hidden = [h]
    for layer, s in zip(model.layers, state):
        h, _ = layer(h, s)
        hidden.append(h)
    hidden[-1] = model.norm(h)
    for i, h in enumerate(hidden):
        assert_close(h, r["hidden_states_full"][i], rtol=3e-5, what=f"hidden {i}")


@pytest.mark.parametrize("ckpt", list(CHECKPOINTS))
def test_state_after_prefill_matches_original_cache(converted, ckpt):
    """The original's cache in our layouts: S [B,H,K,V] -> ours [B,H,V,K]; conv [B,C,W] (last
    W raw v_proj outputs) -> ours [B,W-1,C]; SWA keeps 16 keys there, 15 here (window - 1: the
    most the next query can see besides itself)."""
    r, P = ref(ckpt, "reference_short")
    cache = mx.load(os.path.join(CHECKPOINTS[ckpt], "cache_after_prefill_short.safetensors"))
    model = converted[ckpt]
    engine = SleepEngine(model, SleepConfig(loops=1, window=64), batch_size=2)
    engine.feed(r["input_ids"][:, :P])
    # 3e-5 of each state's scale (entries reach |x| ~ 4): float32 sums in another order than
    # the original's, a few ulps (at most 2.7e-6 of the scale measured)
    tol = 3e-5
    for i, (layer, s) in enumerate(zip(model.layers, engine.state)):
        if layer.layer_type == "jet":
            assert_close(
                s["S"],
                cache[f"layer{i}.recurrent_state"].transpose(0, 1, 3, 2),
                rtol=tol,
                what=f"layer {i} S",
            )
            assert_close(
                s["conv"],
                cache[f"layer{i}.conv_state"][..., 1:].transpose(0, 2, 1),
                rtol=tol,
                what=f"layer {i} conv",
            )
        else:
            k, v = cache[f"layer{i}.key_cache"], cache[f"layer{i}.value_cache"]
            n = s["keys"].shape[2]
            assert n == (min(P, 15) if layer.layer_type == "swa" else P)
            assert_close(s["keys"], k[:, :, k.shape[2] - n :], rtol=tol, what=f"layer {i} keys")
            assert_close(s["values"], v[:, :, v.shape[2] - n :], rtol=tol, what=f"layer {i} values")


def test_converted_model_sleeps_with_n_above_one(converted):
    """A converted Jet-Nemotron under the sleep engine with N = 2 (default core: the middle
    half): incremental feed / consolidate equals Algorithm 1's sleep_forward, and sleeping
    changes the answer (the core really loops)."""
    model = converted["main"]
    assert model.core == default_core(6) == (1, 4)
    r, _ = ref("main", "reference_short")
    ids = r["input_ids"][:, :24]
    mask = np.zeros((2, 24), np.float32)
    mask[:, 16:] = 1  # the last window is scored: two context windows sleep first
    out = {}
    for loops in (1, 2):
        sleep = SleepConfig(loops=loops, window=8, eviction="hard")
        (answer,), _ = sleep_forward(model, ids, mask, sleep)
        engine = SleepEngine(model, sleep, batch_size=2)
        engine.feed(ids[:, :16])
        logits = engine.feed(ids[:, 16:])
        assert engine.sleeps == 2
        assert_close(logits, answer[2], rtol=1e-5, what=f"N = {loops} logits")
        out[loops] = logits
    assert max_diff(out[1], out[2]) > 1e-3


def test_sleep_settings_and_defaults_stored(tmp_path):
    out = convert(FIX, str(tmp_path / "m"), loops=4, window=16, eviction="sliding", core=(2, 5))
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["model_type"] == "jet_nemotron" and cfg["format"] == "mlx-sleep"
    assert cfg["sleep"] == {"loops": 4, "window": 16, "eviction": "sliding"}
    assert cfg["model"]["core"] == [2, 5]
    assert cfg["model"]["gdn_norm_eps"] == 1e-5 and cfg["model"]["norm_eps"] == 1e-6
    model = load_model(out)
    assert model.core == (2, 5) and model.sleep_config.loops == 4
    assert default_core(28) == (7, 21)  # the paper's middle 14 of 28 (2B)


def close_enough(got, want):
    """Lossy weights (bf16, 8-bit): not parity, but the same model. Measured on this fixture:
    mean |diff| 0.08 (bf16) / 0.10 (q8) at logit std 2.1; top-1 agreement 94%."""
    got = got.astype(mx.float32)
    assert float(mx.abs(got - want).mean()) < 0.2
    assert float((got.argmax(-1) == want.argmax(-1)).mean()) > 0.85


def test_dtype_and_quantization(tmp_path):
    r, _ = ref("main", "reference_short")
    m16 = load_model(convert(FIX, str(tmp_path / "bf16"), dtype="bfloat16"))
    assert m16.embed_tokens.weight.dtype == mx.bfloat16
    close_enough(m16(r["input_ids"]), r["logits_full"])
    q = convert(FIX, str(tmp_path / "q8"), quantize=True, q_bits=8, q_group_size=64)
    assert json.load(open(os.path.join(q, "config.json")))["quantization"]["bits"] == 8
    mq = load_model(q)
    assert any(k.endswith(".scales") for k, _ in tree_flatten(mq.parameters()))
    close_enough(mq(r["input_ids"]), r["logits_full"])


def test_sharded_checkpoint_with_index(tmp_path):
    src = tmp_path / "sharded"
    src.mkdir()
    shutil.copy(os.path.join(FIX, "config.json"), src)
    weights = mx.load(os.path.join(FIX, "model.safetensors"))
    names = sorted(weights)
    shards = {
        "model-00001-of-00002.safetensors": names[:40],
        "model-00002-of-00002.safetensors": names[40:],
    }
    for f, ks in shards.items():
        mx.save_safetensors(str(src / f), {k: weights[k].astype(mx.bfloat16) for k in ks})
    (src / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {k: f for f, ks in shards.items() for k in ks}})
    )
    model = load_model(convert(str(src), str(tmp_path / "out"), dtype="float32"))
    r, _ = ref("main", "reference_short")
    close_enough(model(r["input_ids"]), r["logits_full"])  # bf16 weights
    os.remove(src / "model-00002-of-00002.safetensors")
    with pytest.raises(ConversionError, match="missing: model-00002-of-00002"):
        convert(str(src), str(tmp_path / "out2"))


def test_load_with_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    src = tmp_path / "src"
    shutil.copytree(FIX, src, ignore=shutil.ignore_patterns("variant*", "reference*", "cache*"))
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(512)}, unk_token="w1"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(src / "tokenizer.json"))
    (src / "tokenizer_config.json").write_text(
        json.dumps(
            {"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "w1", "eos_token": "w0"}
        )
    )
    model, tokenizer = load(convert(str(src), str(tmp_path / "out")))
    ids = tokenizer.encode("w5 w7 w9")
    assert ids == [5, 7, 9]
    assert model(mx.array([ids])).shape == (1, 3, 512)


def test_convert_without_tokenizer_warns_and_generate_says_what_to_do(tmp_path):
    """A checkpoint without tokenizer files converts (with a warning); generate then says how to
    add one in one line, not a Python hint."""
    from click.testing import CliRunner

    from mlx_sleep.cli import main

    src = tmp_path / "src"
    shutil.copytree(FIX, src, ignore=shutil.ignore_patterns("variant*", "reference*", "cache*"))
    out = str(tmp_path / "out")
    r = CliRunner().invoke(main, ["convert", "--hf-path", str(src), "--out", out])
    assert r.exit_code == 0, r.output
    assert "warning:" in r.stderr and "copy them from the original checkpoint" in r.stderr
    r = CliRunner().invoke(main, ["generate", "--model", out, "-p", "hi"])
    assert r.exit_code == 1 and r.output.count("\n") == 1, r.output
    assert "has no tokenizer files" in r.output and "docs/models.md" in r.output


def test_pytorch_bin_is_read_with_weights_only(tmp_path):
    torch = pytest.importorskip("torch")
    src = tmp_path / "bin"
    src.mkdir()
    shutil.copy(os.path.join(FIX, "config.json"), src)
    w = mx.load(os.path.join(FIX, "model.safetensors"))
    torch.save({k: torch.from_numpy(np.array(v)) for k, v in w.items()}, src / "pytorch_model.bin")
    model = load_model(convert(str(src), str(tmp_path / "first")))
    r, _ = ref("main", "reference_short")
    assert_close(model(r["input_ids"]), r["logits_full"], rtol=3e-5, what=".bin logits")
    # A pickle that would run code is refused, not executed.
    torch.save({"x": _RunsCode()}, src / "pytorch_model.bin")
    expect_error(tmp_path, str(src), "could not be read safely")


class _RunsCode:
    def __reduce__(self):
        return (print, ("this must never run",))


# -- bad input: one clear line (a ValueError), nothing left behind ---------------------------


def broken_copy(tmp_path, config_edit=None, weights_edit=None, name="src"):
    src = tmp_path / name
    src.mkdir()
    cfg = json.load(open(os.path.join(FIX, "config.json")))
    if config_edit:
        config_edit(cfg)
    (src / "config.json").write_text(json.dumps(cfg))
    w = mx.load(os.path.join(FIX, "model.safetensors"))
    if weights_edit:
        weights_edit(w)
    mx.save_safetensors(str(src / "model.safetensors"), w)
    return str(src)


def expect_error(tmp_path, src, match, **kw):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=match) as e:
        convert(src, str(out), **kw)
    assert "\n" not in str(e.value)
    assert not out.exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp")]
    return str(e.value)


def test_unknown_architecture_lists_supported(tmp_path):
    src = broken_copy(tmp_path, config_edit=lambda c: c.update(model_type="llama"))
    msg = expect_error(tmp_path, src, "unsupported architecture 'llama'")
    assert "jet_nemotron" in msg and "ouro" in msg


def test_missing_tensor_named_with_shape(tmp_path):
    src = broken_copy(
        tmp_path, weights_edit=lambda w: w.pop("model.layers.0.self_attn.q_proj.weight")
    )
    expect_error(
        tmp_path,
        src,
        r"missing tensor\(s\): model\.layers\.0\.self_attn\.q_proj\.weight \[32, 64\]",
    )


def test_unexpected_tensor_named_with_shape(tmp_path):
    src = broken_copy(
        tmp_path,
        weights_edit=lambda w: w.update(
            {"model.layers.2.self_attn.extra.weight": mx.zeros((3, 5))}
        ),
    )
    expect_error(
        tmp_path,
        src,
        r"unexpected tensor\(s\): model\.layers\.2\.self_attn\.extra\.weight \[3, 5\]",
    )
    src = broken_copy(
        tmp_path, weights_edit=lambda w: w.update({"vision.proj": mx.zeros((2,))}), name="src2"
    )
    expect_error(tmp_path, src, r"unexpected tensor\(s\): vision\.proj \[2\]")


def test_mis_shaped_tensor_config_disagrees(tmp_path):
    src = broken_copy(tmp_path, config_edit=lambda c: c.update(intermediate_size=96))
    expect_error(
        tmp_path,
        src,
        r"config.json disagrees with the weights: model\.layers\.0\.mlp\."
        r"\w+\.weight is \[\d+, \d+\], config.json implies",
    )
    src = broken_copy(
        tmp_path,
        config_edit=lambda c: c["efficient_attention_config"]["jet"].update(expand_v=3.0),
        name="src2",
    )
    expect_error(tmp_path, src, "config.json disagrees with the weights")
    src = broken_copy(tmp_path, config_edit=lambda c: c.update(num_hidden_layers=5), name="src3")
    expect_error(tmp_path, src, "layer_types has 6 entries but num_hidden_layers is 5")


def test_tied_head_that_differs_is_an_error(tmp_path):
    src = broken_copy(
        tmp_path,
        weights_edit=lambda w: w.update(
            {"lm_head.weight": mx.ones_like(w["model.embed_tokens.weight"])}
        ),
    )
    expect_error(tmp_path, src, "tie_word_embeddings but lm_head.weight differs")


def test_truncated_and_corrupt_safetensors(tmp_path):
    src = broken_copy(tmp_path)
    path = os.path.join(src, "model.safetensors")
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    expect_error(tmp_path, src, "model.safetensors is truncated")
    open(path, "wb").write(struct.pack("<Q", 40) + b"{not json" + b"\0" * 100)
    expect_error(tmp_path, src, "model.safetensors is corrupt")
    open(path, "wb").write(b"\x01\x02")
    expect_error(tmp_path, src, "truncated")


def test_existing_output_needs_force(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(ValueError, match="already exists; pass --force"):
        convert(FIX, str(out))
    assert (out / "keep.txt").exists()
    with pytest.raises(ValueError, match="not a converted model"):  # --force: only our own
        convert(FIX, str(out), force=True)
    assert (out / "keep.txt").exists()
    mine = tmp_path / "mine"
    convert(FIX, str(mine))
    (mine / "stale.txt").write_text("x")  # inside our own output: replaced with it
    convert(FIX, str(mine), force=True)
    assert not (mine / "stale.txt").exists() and (mine / "model.safetensors").exists()


def test_bad_options(tmp_path):
    expect_error(tmp_path, FIX, "Ouro models", insert_jet_layers=2)
    expect_error(tmp_path, FIX, "--core", core=(3, 9))
    expect_error(tmp_path, FIX, "loops", loops=0)
    expect_error(tmp_path, str(tmp_path / "nowhere"), "no such directory")


def test_cli_convert(tmp_path):
    from click.testing import CliRunner

    from mlx_sleep.cli import main

    out = str(tmp_path / "m")
    args = ["convert", "--hf-path", FIX, "--out", out, "--loops", "2", "--core", "1:5"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    assert load_model(out).core == (1, 5)
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 1 and res.output.strip().count("\n") == 0
    assert "already exists" in res.output
