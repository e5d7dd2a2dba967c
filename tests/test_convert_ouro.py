"""Ouro: convert the tiny original-layout checkpoint and match what the ORIGINAL PyTorch code
produced (tests/fixtures/ouro-tiny, from ../shared/reference): the default forward (the last
loop under the default threshold 1.0), every loop's logits, features and exit-gate values,
exit by threshold 0.8, the weighted exit, and incremental decoding with per-loop KV caches.
Then the paper's recipe: Jet layers inserted into the stack leave the outputs unchanged.

Tolerance 3e-5 of the largest |value| (fp32; tests/numerics.py) on logits, features and
exit-gate values (logit std 2.1, |logit| up to ~10; the original's own incremental and full
paths differ by up to 1.2e-5 and an independent re-implementation by 1.7e-5; measured here at
most 3.7e-6 of the scale under every BLAS setting of tests/check_tolerances.py). Exit-step choices at
threshold 0.8 must be identical (the closest cumulative probability is 9.7e-4 from 0.8).
"""

import json
import os

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_sleep import SleepConfig, SleepEngine, load_model, sleep_forward
from mlx_sleep.convert import convert
from mlx_sleep.models.ouro import insert_jet_layers

from . import parity
from .numerics import assert_close

FIX = os.path.join(os.path.dirname(__file__), "fixtures", "ouro-tiny")
TOL = 3e-5  # of the compared values' scale
MEASURED = parity.table("Ouro vs original")


def check(name, got, want, rtol=TOL):
    MEASURED[name] = float(mx.abs(got.astype(mx.float32) - want).max())
    assert_close(got, want, rtol=rtol, what=name)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return load_model(convert(FIX, str(tmp_path_factory.mktemp("ouro") / "m")))


@pytest.fixture(scope="module")
def ref():
    r = mx.load(os.path.join(FIX, "reference.safetensors"))
    r["input_ids"] = r["input_ids"].astype(mx.int32)
    return r


def test_config_mapping(model):
    c = model.config
    assert (c.num_layers, c.total_ut_steps, c.head_dim, c.early_exit_threshold) == (3, 4, 16, 1.0)
    assert len(model.layers) == 3  # the real blocks, once
    assert len(model.sleep_blocks()) == 12  # 4 loops x 3 blocks, as the original's 12 cache entries
    assert all(b.layer is model.layers[k % 3] for k, b in enumerate(model.sleep_blocks()))
    assert model.core == (0, 12)  # default: the whole unrolled stack sleeps


def test_default_forward_is_last_loop(model, ref):
    check("default", model(ref["input_ids"]), ref["logits_default"])


def test_every_loop(model, ref):
    hidden, _ = model.loop_hidden_states(ref["input_ids"])
    for u in range(4):
        check(
            f"per_ut_step[{u}]",
            model(ref["input_ids"], exit_at_step=u),
            ref["logits_per_ut_step"][u],
        )
        check(f"hidden[{u}]", hidden[u], ref["hidden_per_ut_step"][u])
        check(f"gate[{u}]", model.early_exit_gate(hidden[u])[..., 0], ref["gate_logits"][u])
    check("exit_pdf", model.exit_pdf(hidden), ref["exit_pdf"])


def test_exit_threshold(model, ref):
    ids = ref["input_ids"]
    hidden, _ = model.loop_hidden_states(ids)
    assert np.array_equal(
        np.array(model.exit_steps(hidden, 0.8)), np.array(ref["exit_steps_threshold_0p8"])
    )
    check("threshold_0.8", model(ids, exit_threshold=0.8), ref["logits_exit_threshold_0p8"])


def test_weighted_exit_follows_original_priority(model, ref):
    ids = ref["input_ids"]
    # The config's threshold (1.0) wins over use_weighted_exit, as in the original...
    check("weighted_ignored", model(ids, use_weighted_exit=True), ref["logits_default"])
    # ...so the weighted exit needs the config threshold unset.
    model.config.early_exit_threshold = None
    try:
        check("weighted_exit", model(ids, use_weighted_exit=True), ref["logits_weighted_exit"])
        check("no_exit_rule", model(ids), ref["logits_default"])  # nothing set: the last loop
        # A fixed exit step beats everything.
        check(
            "step_wins",
            model(ids, exit_at_step=1, use_weighted_exit=True),
            ref["logits_per_ut_step"][1],
        )
    finally:
        model.config.early_exit_threshold = 1.0


def test_incremental_with_per_loop_caches(model, ref):
    """Prefill 30 tokens, then one at a time: each loop attends to its own loop's cached KV."""
    ids, P = ref["input_ids"], 30
    engine = SleepEngine(model, SleepConfig(loops=1, window=64), batch_size=2)
    check("prefill", engine.feed(ids[:, :P]), ref["logits_prefill"])
    steps = mx.concatenate([engine.feed(ids[:, t : t + 1]) for t in range(P, 40)], axis=1)
    check("steps", steps, ref["logits_steps"])
    assert all(s["keys"].shape[2] == 40 for s in engine.state)  # 12 caches, 40 positions each
    # The same through the model's own loop API, every loop's logits.
    hidden, state = model.loop_hidden_states(ids[:, :P])
    per_step = [[h] for h in hidden]
    for t in range(P, 40):
        hidden, state = model.loop_hidden_states(ids[:, t : t + 1], state, offset=t)
        for u, h in enumerate(hidden):
            per_step[u].append(h)
    for u in range(4):
        check(
            f"incremental_per_ut_step[{u}]",
            model.head(mx.concatenate(per_step[u], axis=1)),
            ref["logits_incremental_per_ut_step"][u],
        )


def test_insert_jet_layers_keeps_outputs(model, ref, tmp_path):
    """The paper's Ouro + Jet recipe: K MLP-free Jet layers, zero o_proj: outputs unchanged
    (exactly: x + 0), the Jet layers still compute and hold state, and they are really wired in
    (a non-zero o_proj changes the outputs)."""
    ids = ref["input_ids"]
    base = model(ids)
    jet = insert_jet_layers(model, 2)
    assert [k for k, _ in jet.config.stack].count("jet") == 2
    assert jet.config.stack == [("ouro", 0), ("jet", 0), ("ouro", 1), ("ouro", 2), ("jet", 1)]
    assert np.array_equal(np.array(jet(ids)), np.array(base))
    n_base = sum(v.size for _, v in tree_flatten(model.parameters()))
    n_jet = sum(v.size for _, v in tree_flatten(jet.parameters()))
    assert n_jet > n_base
    hidden, state = jet.loop_hidden_states(ids)
    jet_states = [s for s in state if "S" in s]
    assert len(jet_states) == 8 and all(float(mx.abs(s["S"]).max()) > 0 for s in jet_states)

    # Through the converter, saved and reloaded.
    out = convert(FIX, str(tmp_path / "jet"), insert_jet_layers=2, loops=2)
    reloaded = load_model(out)
    assert json.load(open(os.path.join(out, "config.json")))["model"]["jet_after"] == [0, 2]
    assert np.array_equal(np.array(reloaded(ids)), np.array(base))
    check("insert_jet_layers", reloaded(ids), ref["logits_default"])

    first_jet = reloaded.layers[1]  # the stack is ouro 0, jet 0, ouro 1, ouro 2, jet 1
    first_jet.mixer.o_proj.weight = mx.ones_like(first_jet.mixer.o_proj.weight) * 0.1
    assert float(mx.abs(reloaded(ids) - base).max()) > 1e-2


def test_ouro_with_jet_sleeps(model, ref):
    """N = 2 on Ouro + Jet: the engine equals Algorithm 1, and the Jet fast weights after
    sleeping differ from a single pass (sleep refines them)."""
    jet = insert_jet_layers(model, 1)
    ids = ref["input_ids"][:, :24]
    mask = np.zeros((2, 24), np.float32)
    mask[:, 16:] = 1
    results = {}
    for loops in (1, 2):
        sleep = SleepConfig(loops=loops, window=8)
        (answer,), state = sleep_forward(jet, ids, mask, sleep)
        engine = SleepEngine(jet, sleep, batch_size=2)
        engine.feed(ids[:, :16])
        logits = engine.feed(ids[:, 16:])
        assert_close(logits, answer[2], rtol=1e-5, what=f"N = {loops} logits")
        results[loops] = [s["S"] for s in state if "S" in s]
    assert max(float(mx.abs(a - b).max()) for a, b in zip(results[1], results[2])) > 1e-4


def test_quantized_jet_insertion_keeps_zero_output(tmp_path, ref):
    """Quantization must not turn the zero o_proj into noise."""
    ids = ref["input_ids"]
    plain = load_model(convert(FIX, str(tmp_path / "q"), quantize=True, q_bits=8))
    jet = load_model(
        convert(FIX, str(tmp_path / "qj"), quantize=True, q_bits=8, insert_jet_layers=2)
    )
    assert float(mx.abs(plain(ids) - jet(ids)).max()) == 0.0


def test_build_converts_hugging_face_dirs_in_memory_and_load_model_refuses_them(ref):
    """build converts an unconverted checkpoint in memory (nothing written); load_model, which
    opens model directories, says to convert it first (tests/test_untrusted_models.py)."""
    from mlx_sleep.convert import build

    model = build(FIX)[0]
    check("load_unconverted", model(ref["input_ids"]), ref["logits_default"])
    with pytest.raises(ValueError, match="Hugging Face checkpoint.*convert it first"):
        load_model(FIX)


def test_unsupported_ouro_settings(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    cfg = json.load(open(os.path.join(FIX, "config.json")))
    cfg.update(use_sliding_window=True, sliding_window=8)
    (src / "config.json").write_text(json.dumps(cfg))
    os.symlink(os.path.join(FIX, "model.safetensors"), src / "model.safetensors")
    with pytest.raises(ValueError, match="sliding-window Ouro layers are not supported"):
        convert(str(src), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
