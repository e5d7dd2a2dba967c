"""Training: optimizer split, learning, exact resume, run directories, clear errors."""

import json
import os

import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_sleep.config import ConfigError, ModelConfig, SleepConfig
from mlx_sleep.tasks import get_task
from mlx_sleep.train import TrainConfig, Trainer, build_model, load_run
from tests.numerics import assert_close

TASK = get_task("rule110", n_strings=2, n_bits=4, steps=1)


def trainer(out, steps=6, loops=2, **kw):
    return Trainer(
        str(out),
        ModelConfig(vocab_size=TASK.vocab_size, hidden_size=32, num_heads=2),
        SleepConfig(loops=loops, window=TASK.window),
        TASK,
        TrainConfig(
            steps=steps,
            batch_size=16,
            warmup=2,
            lr=2e-2,
            adam_lr=3e-3,
            eval_samples=32,
            checkpoint_every=3,
            log_every=1,
            **kw,
        ),
        progress=False,
    )


def assert_resumes_exactly(tmp_path, steps=6, between=None, **kw):
    """The run straight through, and stopped after step 3 then resumed (`between(dir)` edits
    what the stopped run left): the same weights bit for bit. Returns the resumed trainer."""
    straight = trainer(tmp_path / "a", steps=steps, **kw)
    straight.run()
    half = trainer(tmp_path / "b", steps=steps, **kw)
    half.cfg.steps = 3
    half.run()
    if between is not None:
        between(tmp_path / "b")
    resumed = trainer(tmp_path / "b", steps=steps, **kw)
    assert resumed.step == 3
    resumed.run()
    a = dict(tree_flatten(straight.model.parameters()))
    b = dict(tree_flatten(resumed.model.parameters()))
    for k in a:
        np.testing.assert_array_equal(np.array(a[k]), np.array(b[k]), err_msg=k)
    return resumed


def test_muon_takes_block_matrices_and_adamw_the_rest():
    model = build_model(
        ModelConfig(
            vocab_size=8, hidden_size=16, layers="attn,gdn,jet", num_heads=2, tie_embeddings=False
        ),
        0,
    )
    matrices = model.matrix_weights()
    split = {p: p in matrices for p, _ in tree_flatten(model.parameters())}
    assert split["layers.0.mixer.q_proj.weight"] and split["layers.1.mlp.down_proj.weight"]
    assert split["layers.2.mixer.kernel_generator.w1.weight"]
    for p in (
        "embed_tokens.weight",
        "lm_head.weight",
        "layers.1.mixer.conv_weight",
        "layers.1.mixer.A_log",
        "layers.0.input_layernorm.weight",
        "layers.2.mixer.kernel_generator.w2.bias",
    ):
        assert not split[p], p


def test_training_lowers_the_loss(tmp_path):
    t = trainer(tmp_path, steps=40, loops=1)
    t.run()
    losses = [json.loads(l)["loss"] for l in open(tmp_path / "metrics.jsonl") if '"loss"' in l]
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.05


@pytest.mark.parametrize("activation_checkpoint", [False, True])
def test_resume_is_exact(tmp_path, activation_checkpoint):
    def as_before_memory_bound(run):  # activation_checkpoint true / false, as runs saved it
        config = json.loads((run / "config.json").read_text())
        del config["train"]["memory_bound"]
        config["train"]["activation_checkpoint"] = activation_checkpoint
        (run / "config.json").write_text(json.dumps(config))

    assert_resumes_exactly(
        tmp_path, between=as_before_memory_bound, activation_checkpoint=activation_checkpoint
    )


@pytest.mark.parametrize("memory_bound,compile", [("chunk", False), ("block", True)])
def test_a_memory_bound_trains_like_plain_backprop(tmp_path, monkeypatch, memory_bound, compile):
    """--memory-bound chunk / block routes the step through sleep_value_and_grad (chunk by
    chunk, so never under mx.compile, even when compile is asked for) and takes the same
    steps."""
    import mlx_sleep.sleep as sleep_mod

    calls = []
    real = sleep_mod.sleep_value_and_grad
    monkeypatch.setattr(
        sleep_mod,
        "sleep_value_and_grad",
        lambda *a, **k: calls.append(k["granularity"]) or real(*a, **k),
    )
    plain = trainer(tmp_path / "a", steps=3, loops=3)
    chunked = trainer(tmp_path / "b", steps=3, loops=3, memory_bound=memory_bound, compile=compile)
    batches = [TASK.sample(np.random.default_rng(i), 16) for i in range(3)]
    for batch in batches:
        l0, n0 = plain.train_step(batch)
        l1, n1 = chunked.train_step(batch)
        assert_close(l1, l0, rtol=1e-5, what="loss")  # measured <= 2e-7 of it
        assert_close(n1, n0, rtol=1e-5, what="gradient norm")
    assert calls == [memory_bound] * 3
    a, b = (
        dict(tree_flatten(plain.model.parameters())),
        dict(tree_flatten(chunked.model.parameters())),
    )
    for k in a:
        # on the scale of the learning rates, not float32's: Adam turns a rounding difference in a
        # near-zero gradient entry into an update of up to lr (1e-4 = 3% of one AdamW step)
        assert_close(b[k], a[k], rtol=0, atol=1e-4, what=k)


def test_run_directory_and_load_run(tmp_path):
    trainer(tmp_path, steps=3).run()
    assert sorted(os.listdir(tmp_path / "checkpoint")) == [
        "model.safetensors",
        "optimizer.safetensors",
        "trainer.json",
    ]
    records = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
    assert any("eval" in r for r in records) and any("tokens_per_s" in r for r in records)
    model, sleep, task, _ = load_run(str(tmp_path / "checkpoint"))  # either dir works
    assert sleep.loops == 2 and task == TASK


def test_other_settings_in_same_directory_refused(tmp_path):
    trainer(tmp_path, steps=2).run()
    with pytest.raises(ConfigError, match="other settings"):
        trainer(tmp_path, steps=2, loops=3)


def test_window_larger_than_sequence_refused(tmp_path):
    with pytest.raises(ConfigError, match="larger than"):
        Trainer(
            str(tmp_path),
            ModelConfig(vocab_size=8),
            SleepConfig(window=500),
            TASK,
            TrainConfig(steps=1),
            progress=False,
        )


def test_load_run_on_a_non_run_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a training run"):
        load_run(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_run(str(tmp_path / "missing"))


def record_depths(monkeypatch) -> list:
    """The N of every loss the training steps take, in order (one-graph and memory-bounded)."""
    import mlx_sleep.sleep as sleep_mod

    seen = []
    for name in ("sleep_loss", "sleep_value_and_grad"):
        real = getattr(sleep_mod, name)

        def recording(m, x, y, w, sleep, real=real, **k):
            seen.append(sleep.loops)
            return real(m, x, y, w, sleep, **k)

        monkeypatch.setattr(sleep_mod, name, recording)
    return seen


def test_loops_sample_draws_n_per_batch_seeded(tmp_path, monkeypatch):
    """--loops-sample A:B: each step runs with N drawn from its own seeded generator (the data
    stream stays the fixed-N run's); (2, 2) is exactly the fixed N = 2 run."""
    seen = record_depths(monkeypatch)
    sampled = trainer(tmp_path / "s", steps=8, loops=3, loops_sample=(1, 3))
    sampled.run()
    drawn = seen[:]
    assert set(drawn) == {1, 2, 3}  # 8 draws from 1..3 with this seed
    expect = np.random.default_rng([0, 1]).integers(1, 4, size=8)
    assert drawn == [int(n) for n in expect]
    fixed, same = (
        trainer(tmp_path / "f", steps=4, loops=2),
        trainer(tmp_path / "p", steps=4, loops=2, loops_sample=(2, 2)),
    )
    fixed.run()
    same.run()
    a, b = dict(tree_flatten(fixed.model.parameters())), dict(tree_flatten(same.model.parameters()))
    for k in a:
        np.testing.assert_array_equal(np.array(a[k]), np.array(b[k]), err_msg=k)


def test_loops_sample_resume_is_exact(tmp_path):
    assert_resumes_exactly(tmp_path, loops_sample=(1, 3))
    saved = json.load(open(tmp_path / "b" / "config.json"))
    assert TrainConfig.from_dict(saved["train"]).loops_sample == (1, 3)
    with pytest.raises(ConfigError, match="loops_sample must be LO:HI"):
        TrainConfig(loops_sample=(3, 1))


@pytest.mark.parametrize("memory_bound", ["none", "block"])
def test_depth_losses_take_the_loss_at_each_depth_from_their_step(
    tmp_path, monkeypatch, memory_bound
):
    """--depth-losses 1:0.5,3-4:1 --depth-losses-from 2: steps 0-1 take Algorithm 1's loss at
    N = 2 alone, later steps at depth 1 and at a depth drawn from 3..4 (the objective is their
    weighted sum, tests/test_sleep.py); a resumed run across the switch ends where the straight
    one does (the draw comes from the seed and the step)."""
    seen = record_depths(monkeypatch)
    kw = dict(
        depth_losses=((1, 0.5), (3, 4, 1.0)),
        depth_losses_from=2,
        memory_bound=memory_bound,
    )
    assert_resumes_exactly(tmp_path, steps=4, **kw)
    drawn = [s for s in seen[2:6] if s != 1]  # the straight run's steps 2 and 3
    assert seen[:3] == [2, 2, 1] and set(drawn) <= {3, 4} and len(drawn) == 2, seen
    saved = json.load(open(tmp_path / "b" / "config.json"))
    assert TrainConfig.from_dict(saved["train"]).depth_losses == ((1, 1, 0.5), (3, 4, 1.0))
    # depth 2 = N is not among them: a stopped sleep of this model is undone, as in the paper
    assert "partial" not in saved["sleep"] and not load_run(str(tmp_path / "b"))[1].partial
    every = trainer(tmp_path / "c", steps=1, depth_losses=((1, 0.2), (2, 1.0), (4, 0.5)))
    assert every.sleep.partial and every.settings["sleep"]["partial"] is True


@pytest.mark.parametrize(
    "value, message",
    [
        (((3, 0.0),), "one > 0"),
        (((4, 3, 1.0),), "LO-HI"),
        (((0, 1.0),), "depths in 1.."),
        (((2, -1.0),), "weights finite and >= 0"),
        (((2, float("nan")),), "weights finite"),
        ("3:1", "DEPTH:WEIGHT or LO-HI:WEIGHT"),
    ],
)
def test_bad_depth_losses_are_refused(value, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(depth_losses=value)
    with pytest.raises(ConfigError, match="cannot be combined"):
        TrainConfig(depth_losses=((2, 1.0),), loops_sample=(1, 3))
