"""`mlx-sleep finetune`: data, learning, exact resume (also after a real kill), fuse, --estimate,
--train-only, --hard-warmup and data-parallel training over `mlx.launch --backend ring`."""

import json
import re
import os
import random
import signal
import socket
import subprocess
import sys
import time

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner
from mlx.utils import tree_flatten

import mlx_sleep
from mlx_sleep.cli import main
from mlx_sleep.finetune import (
    DataError,
    Finetune,
    FinetuneConfig,
    load_examples,
    make_batch,
    read_records,
    summed_loss_and_grads,
    tokenize_record,
)
from mlx_sleep.sleep import loss_depths, plan_chunks, plan_rows
from mlx_sleep.generate import generate, stream_generate
from tests.numerics import assert_close
from tests.tiny_models import make_model_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KINDS = ("jet_nemotron", "ouro_jet", "qwen3_5")


def write_jsonl(path, records):
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return str(path)


def recall_records(n, seed):
    """Prompts longer than a window (L = 16) whose answer repeats their first digits."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        digits = "".join(rng.choice("0123456789") for _ in range(24))
        out.append({"prompt": f"keep {digits} first:", "answer": digits[:4]})
    return out


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune")
    for kind in KINDS:
        make_model_dir(root / kind, kind, loops=2, window=16)
    write_jsonl(root / "train.jsonl", recall_records(48, 0))
    write_jsonl(root / "valid.jsonl", recall_records(8, 1))
    return root


class Killed(Exception):
    pass


def assert_killed_run_resumes_to(straight, run_of, out, killed_at, checkpoint):
    """`run_of(out)` killed at step `killed_at` resumes from its step-`checkpoint` checkpoint
    and ends with the finished `straight` run's weights bit for bit."""

    def die(step):
        if step == killed_at:
            raise Killed

    with pytest.raises(Killed):
        run_of(out).run(on_step=die)
    resumed = run_of(out)
    assert resumed.step == checkpoint
    resumed.run()
    a, b = params(straight.model), params(resumed.model)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def finetune(
    workdir, kind, out, fine_tune_type="lora", steps=8, sleep=None, resume_adapters=None, **kw
):
    settings = dict(
        steps=steps,
        batch_size=4,
        fine_tune_type=fine_tune_type,
        lr=3e-3 if fine_tune_type == "full" else 1e-2,
        adam_lr=1e-3,
        warmup=1,
        valid_every=0,
        checkpoint_every=4,
        log_every=1,
    )
    settings.update(kw)
    return Finetune(
        str(workdir / kind),
        str(workdir / "train.jsonl"),
        str(out),
        FinetuneConfig(**settings),
        sleep=sleep,
        valid=str(workdir / "valid.jsonl"),
        progress=False,
        resume_adapters=resume_adapters,
    )


def params(model):
    return {k: np.array(v) for k, v in tree_flatten(model.parameters())}


# -- data -------------------------------------------------------------------------------------


def test_malformed_records_are_named_by_line(tmp_path, workdir):
    good = json.dumps({"prompt": "a", "answer": "b"})
    cases = {
        "{not json": "is not valid JSON",
        '["a"]': "is a JSON list",
        '{"prompt": "a"}': ': "answer" must be a string',
        '{"question": "a"}': "keys found: question",
        '{"messages": [{"role": "user", "content": "hi"}]}': "no assistant turn",
        '{"text": 3}': ': "text" must be a string (got 3)',
        '{"prompt": "\\ud800", "answer": "b"}': '"prompt" holds a lone surrogate',
        "[" * 100 + "]" * 100: "nests deeper than 64 levels",
        json.dumps({"prompt": "x" * 300_000, "answer": "b"}): "more than one",
    }
    for bad, says in cases.items():
        path = tmp_path / "d.jsonl"
        path.write_text(f"{good}\n\n{bad}\n")
        with pytest.raises(DataError, match=f"d.jsonl line 3.*{re.escape(says)}"):
            read_records(str(path))
    path.write_bytes(f"{good}\n\xff\xfe\n".encode("latin-1"))
    with pytest.raises(DataError, match="d.jsonl line 2 is not UTF-8"):
        read_records(str(path))
    result = CliRunner().invoke(
        main,
        [
            "finetune",
            "--model",
            str(workdir / "jet_nemotron"),
            "--data",
            str(path),
            "--out",
            str(tmp_path / "o"),
        ],
    )
    assert result.exit_code == 1 and "d.jsonl line 2" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "o").exists()


def test_loss_masks_follow_the_record_form(workdir):
    _, tok = mlx_sleep.load(str(workdir / "jet_nemotron"))

    def scored_text(rec):
        ids, scored = tokenize_record(rec, tok)
        return tok.decode([i for i, s in zip(ids, scored) if s]), tok.decode(ids)

    assert scored_text({"prompt": "Q: 2+2?", "answer": " 4"}) == (
        " 4<|im_end|>",
        "Q: 2+2? 4<|im_end|>",
    )
    assert scored_text({"text": "all of it"})[0] == "all of it<|im_end|>"
    chat = {
        "messages": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "yo"},
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": "ok"},
        ]
    }
    scored, whole = scored_text(chat)
    assert scored == "yo<|im_end|>\nok<|im_end|>\n"
    assert whole == tok.apply_chat_template(chat["messages"], tokenize=False)


def test_out_of_vocabulary_tokens_are_refused(tmp_path, workdir):
    _, tok = mlx_sleep.load(str(workdir / "jet_nemotron"))
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "fine"}, {"text": "also fine"}])
    with pytest.raises(DataError, match=r"d.jsonl:1: token id \d+ is outside"):
        load_examples(path, tok, vocab_size=100)  # bytes of "fine" are ids >= 100


# -- learning, resume, fuse -------------------------------------------------------------------

# Learning rates that lower the loss in 6 steps (Ouro runs its blocks 4 times per pass: lower).
LR = {
    ("jet_nemotron", "lora"): 1e-2,
    ("jet_nemotron", "full"): 3e-3,
    ("qwen3_5", "lora"): 1e-2,
    ("qwen3_5", "full"): 3e-3,
    ("ouro_jet", "lora"): 1e-3,
    ("ouro_jet", "full"): 3e-3,
}


@pytest.mark.parametrize(
    "kind,fine_tune_type",
    [
        ("jet_nemotron", "lora"),
        ("jet_nemotron", "full"),
        ("qwen3_5", "lora"),
        ("qwen3_5", "full"),
        ("ouro_jet", "lora"),
        # Ouro's 20 unrolled blocks make this one ~1 minute here; jet_nemotron-full covers it
        pytest.param("ouro_jet", "full", marks=pytest.mark.slow),
    ],
)
def test_finetune_learns_resumes_exactly_and_fuses(tmp_path, workdir, kind, fine_tune_type):
    """N = 2: the validation loss falls; a run stopped after its step-3 checkpoint (at step 4)
    and re-run ends with the same weights bit for bit; the fused directory loads and generates
    what the trained model generates."""

    def run_of(out):
        return finetune(
            workdir,
            kind,
            out,
            fine_tune_type,
            steps=6,
            checkpoint_every=3,
            lr=LR[kind, fine_tune_type],
        )

    straight = run_of(tmp_path / "a")
    before = straight.validate()
    straight.run()
    after = straight.validate()
    assert after < before - 0.3, (before, after)

    assert_killed_run_resumes_to(straight, run_of, tmp_path / "b", killed_at=4, checkpoint=3)

    ids = mx.array([[ord(c) for c in "keep 123 first:"]])
    trained_logits = straight.model(ids)
    prompt = [ord(c) for c in "keep 12"]
    trained_tokens = list(
        stream_generate(mlx_sleep.SleepEngine(straight.model, straight.sleep), prompt, 6)
    )
    generated = mx.array([prompt + trained_tokens])
    trained_engine_logits = mlx_sleep.SleepEngine(straight.model, straight.sleep).feed(generated)
    fused_dir = straight.fuse()
    model, tok = mlx_sleep.load(fused_dir)
    assert model.sleep_config == straight.sleep and model.model_type == straight.model.model_type
    # W + BA merged rounds otherwise than W x + B(A x): 3e-5 of the logits' scale (measured
    # <= 5.3e-6 through N = 2 passes). Logits, not greedy tokens: a near-tie may flip.
    assert_close(model(ids), trained_logits, rtol=3e-5, what="fused logits")
    assert_close(
        mlx_sleep.SleepEngine(model).feed(generated),
        trained_engine_logits,
        rtol=3e-5,
        what="fused engine logits",
    )
    assert len(list(stream_generate(mlx_sleep.SleepEngine(model), prompt, 6))) == 6
    assert isinstance(generate(mlx_sleep.SleepEngine(model), tok, prompt, 3), str)


@pytest.mark.parametrize("fine_tune_type", ["lora", "dora"])
def test_adapters_on_a_quantized_model_learn_and_fuse_back_quantized(
    tmp_path, workdir, fine_tune_type
):
    """`convert -q` then LoRA / DoRA (mlx-lm's quantized adapters): the loss falls, --full is
    refused, and the fused model stays 4-bit and answers as the trained model does, up to the
    re-quantization of the merged weights."""
    import mlx.nn as nn

    make_model_dir(
        tmp_path / "q", "jet_nemotron", loops=2, window=16, quantize=True, q_group_size=32
    )
    qdir = tmp_path / "q"

    def run(out, kind=fine_tune_type, **kw):
        return Finetune(
            str(qdir),
            str(workdir / "train.jsonl"),
            str(out),
            FinetuneConfig(
                steps=6,
                batch_size=4,
                fine_tune_type=kind,
                lr=1e-2,
                warmup=1,
                valid_every=0,
                checkpoint_every=6,
                **kw,
            ),
            valid=str(workdir / "valid.jsonl"),
            progress=False,
        )

    ft = run(tmp_path / "a")
    ids = mx.array([[ord(c) for c in "keep 123 first:"]])
    untrained = np.array(ft.model(ids))
    before = ft.validate()
    ft.run()
    assert ft.validate() < before - 0.3
    with pytest.raises(ValueError, match="quantized"):
        run(tmp_path / "b", "full")
    trained = np.array(ft.model(ids))
    model, _ = mlx_sleep.load(ft.fuse())
    assert any(isinstance(m, nn.QuantizedLinear) for _, m in model.named_modules())
    fused = np.array(model(ids))
    # measured: mean |fused - trained| 0.18 (LoRA) / 0.07 (DoRA) where training moved 1-2
    assert np.abs(fused - trained).mean() < 0.25 * np.abs(trained - untrained).mean()
    assert (fused.argmax(-1) == trained.argmax(-1)).mean() >= 0.7  # LoRA 0.8, DoRA 1.0


def test_core_override_trains_and_is_kept_by_the_fused_model(tmp_path, workdir):
    """--core START:STOP picks the looped blocks for fine-tuning and the fused model keeps it;
    a range outside the model is one clear error."""

    def run(out, core):
        return Finetune(
            str(workdir / "jet_nemotron"),
            str(workdir / "train.jsonl"),
            str(out),
            FinetuneConfig(steps=2, batch_size=4, warmup=1, valid_every=0, checkpoint_every=2),
            core=core,
            progress=False,
        )

    ft = run(tmp_path / "a", (1, 2))
    assert ft.model.core == (1, 2) and ft.settings["core"] == [1, 2]
    ft.run()
    model, _ = mlx_sleep.load(ft.fuse())
    assert model.core == (1, 2)
    with pytest.raises(ValueError, match="core"):
        run(tmp_path / "b", (1, 99))


def test_adapters_carry_the_sleep_settings_they_were_trained_with(tmp_path, workdir):
    """The adapter directory records N, L, eviction and the core; `eval --adapter` runs with
    them (the base model says N = 2, L = 16, hard) and says so; flags still override; a damaged
    record is one line."""
    sleep = {"loops": 3, "window": 24, "eviction": "sliding"}
    ft = finetune(workdir, "jet_nemotron", tmp_path / "run", steps=1, sleep=sleep)
    ft.run()
    adapters = tmp_path / "run" / "checkpoint"
    saved = json.loads((adapters / "adapter_config.json").read_text())
    assert saved["sleep"] == sleep and saved["core"] == list(ft.model.core)
    data = os.path.join(ROOT, "tests", "fixtures", "gsm-infinite", "medium_0.jsonl")
    base = ["eval", "--task", "gsm-infinite", "--model", str(workdir / "jet_nemotron"), "--data"]
    base += [data, "--ops", "2", "--limit", "1", "--max-tokens", "2", "--adapter", str(adapters)]
    r = CliRunner().invoke(main, base + ["--out", str(tmp_path / "e1")])
    assert r.exit_code == 0, r.output
    assert "N = 3, L = 24, sliding eviction" in r.output and "| N = 3 |" in r.output
    run = json.loads((tmp_path / "e1" / "run.json").read_text())
    assert (run["window"], run["eviction"]) == (24, "sliding"), run
    r = CliRunner().invoke(main, base + ["--out", str(tmp_path / "e2"), "-N", "1", "-L", "16"])
    assert r.exit_code == 0 and "| N = 1 |" in r.output, r.output
    assert json.loads((tmp_path / "e2" / "run.json").read_text())["window"] == 16
    saved["sleep"]["loops"] = 0
    (adapters / "adapter_config.json").write_text(json.dumps(saved))
    r = CliRunner().invoke(main, base + ["--out", str(tmp_path / "e3")])
    assert r.exit_code == 1 and r.output.count("\n") == 1, r.output
    assert "adapter_config.json: loops (N) must be an integer >= 1 (got 0)" in r.output


def test_a_run_extends_and_another_starts_from_its_adapters(tmp_path, workdir):
    """--steps beyond a finished run continues it; --resume-adapters starts a new run from a
    run's adapters (fresh optimizer, step 0); adapters of another shape are one clear error."""
    from mlx_sleep.weights import read_safetensors

    a = finetune(workdir, "jet_nemotron", tmp_path / "a", steps=2)
    a.run()
    # as a run from before --memory-bound saved it (memory_bounded: true); the bound may change
    config_path = tmp_path / "a" / "config.json"
    config = json.loads(config_path.read_text())
    del config["finetune"]["memory_bound"]
    config["finetune"]["memory_bounded"] = True
    config_path.write_text(json.dumps(config))
    longer = finetune(workdir, "jet_nemotron", tmp_path / "a", steps=3, memory_bound="block")
    assert longer.step == 2
    longer.run()
    assert longer.step == 3
    assert json.loads(config_path.read_text())["finetune"]["memory_bound"] == "block"
    saved = read_safetensors(str(tmp_path / "a" / "checkpoint" / "adapters.safetensors"))
    b = finetune(
        workdir,
        "jet_nemotron",
        tmp_path / "b",
        steps=1,
        resume_adapters=str(tmp_path / "a" / "checkpoint"),
    )
    assert b.step == 0 and b.settings["resume_adapters"]["path"].endswith("checkpoint")
    start = dict(tree_flatten(b.model.trainable_parameters()))
    assert sorted(start) == sorted(saved)
    for k in saved:
        assert_close(start[k], saved[k], rtol=0, atol=0, what=k)
    b.run()
    with pytest.raises(ValueError, match="do not fit this run .* use the --rank"):
        finetune(
            workdir,
            "jet_nemotron",
            tmp_path / "c",
            steps=1,
            rank=4,
            resume_adapters=str(tmp_path / "a" / "checkpoint"),
        )


def test_the_console_output_in_the_docs_is_what_finetune_prints(tmp_path, workdir, monkeypatch):
    """docs/finetune.md shows a run's console lines; the same command prints the same lines
    (digits masked: losses and speeds differ between machines)."""
    text = open(os.path.join(ROOT, "docs", "finetune.md")).read()
    block = re.search(r"```text\n\$ (mlx-sleep finetune .*?)\n(.*?)```", text, re.S)
    command, shown = block.group(1).split(), block.group(2).splitlines()
    monkeypatch.chdir(tmp_path)
    os.symlink(workdir / "jet_nemotron", "m")
    write_jsonl("train.jsonl", recall_records(16, 0))
    write_jsonl("valid.jsonl", recall_records(4, 1))
    r = CliRunner().invoke(main, command[1:])
    assert r.exit_code == 0, r.output

    def masked(lines):  # numbers of any width: "452" and "1,044" tokens/s alike
        return [re.sub(r"\d+(?:[.,]\d+)*", "#", line) for line in lines]

    assert masked(r.output.splitlines()) == masked(shown)


def test_rerun_with_other_settings_is_refused(tmp_path, workdir):
    finetune(workdir, "jet_nemotron", tmp_path, steps=1).run()
    with pytest.raises(ValueError, match="other settings .*finetune"):
        finetune(workdir, "jet_nemotron", tmp_path, steps=1, rank=4)


def test_a_killed_run_resumes_from_its_last_checkpoint(tmp_path, workdir):
    """A real SIGKILL mid-run: re-running the command (now with --fuse) finishes with the weights
    of a run that was never interrupted, and fuses."""
    STEPS = 12

    def command(out):
        return [
            sys.executable,
            "-m",
            "mlx_sleep.cli",
            "finetune",
            "--model",
            str(workdir / "jet_nemotron"),
            "--data",
            str(workdir / "train.jsonl"),
            "--out",
            str(out),
            "--steps",
            str(STEPS),
            "--batch-size",
            "2",
            "--lr",
            "1e-2",
            "--warmup",
            "1",
            "--checkpoint-every",
            "2",
            "--valid-every",
            "0",
        ]

    proc = subprocess.Popen(
        command(tmp_path / "b"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT
    )
    state = tmp_path / "b" / "checkpoint" / "state.json"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if state.exists() and json.loads(state.read_text())["step"] >= 2:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = json.loads(state.read_text())["step"]
    assert killed_at < STEPS, "the run finished before it could be killed"
    subprocess.run(command(tmp_path / "b") + ["--fuse"], check=True, capture_output=True, cwd=ROOT)
    assert mlx_sleep.load_model(str(tmp_path / "b" / "fused")).sleep_config.loops == 2
    # the fused model chats: two turns through the real command line, then a resumed session
    home = {**os.environ, "MLX_SLEEP_HOME": str(tmp_path / "home")}
    for turns in ("keep 1\n/sleep\n", "keep 2\n"):
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "mlx_sleep.cli",
                "chat",
                "--model",
                str(tmp_path / "b" / "fused"),
                "-s",
                "fused",
                "-m",
                "4",
            ],
            input=turns,
            capture_output=True,
            text=True,
            cwd=ROOT,
            env=home,
        )
        assert r.returncode == 0, r.stderr
    saved = json.loads((tmp_path / "home" / "sessions" / "fused" / "session.json").read_text())
    assert [m["role"] for m in saved["transcript"]["messages"]] == ["user", "assistant"] * 2
    assert saved["engine"]["sleeps"] >= 1
    # The same run never interrupted, in this process, from the settings the command recorded.
    saved = json.load(open(tmp_path / "b" / "config.json"))
    straight = Finetune(
        str(workdir / "jet_nemotron"),
        str(workdir / "train.jsonl"),
        str(tmp_path / "a"),
        FinetuneConfig.from_dict(saved["finetune"]),
        sleep=mlx_sleep.SleepConfig.from_dict(saved["sleep"]),
        progress=False,
    )
    straight.run()
    a = dict(tree_flatten(straight.model.trainable_parameters()))
    b = mx.load(str(tmp_path / "b" / "checkpoint" / "adapters.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(np.array(a[k]), np.array(b[k]), err_msg=k)


# -- what trains ------------------------------------------------------------------------------


def test_train_only_jet_changes_only_the_jet_layers(tmp_path, workdir):
    ft = finetune(workdir, "ouro_jet", tmp_path, "full", steps=2, train_only="jet")
    before = params(ft.model)
    ft.run()
    after = params(ft.model)
    changed = {k for k in before if not np.array_equal(before[k], after[k])}
    jet_layers = {
        f"layers.{i}."
        for i, layer in enumerate(ft.model.layers)
        if type(layer).__name__ == "JetLayer"
    }
    assert changed and all(".mixer." in k and k[:9] in jet_layers for k in changed), changed
    with pytest.raises(ValueError, match="has no such layers"):
        finetune(workdir, "qwen3_5", tmp_path / "x", train_only="jet")


def test_hard_warmup_switches_to_sliding(tmp_path, workdir):
    ft = finetune(
        workdir, "jet_nemotron", tmp_path, steps=3, hard_warmup=2, sleep={"eviction": "sliding"}
    )
    ft.run()
    logged = [json.loads(l) for l in open(tmp_path / "metrics.jsonl") if '"loss"' in l]
    assert [r["eviction"] for r in logged] == ["hard", "hard", "sliding"]


# -- --estimate -------------------------------------------------------------------------------

ESTIMATE_CHECK = """
import gc, json, pathlib, sys
import mlx.core as mx
from tests.test_finetune import finetune
from mlx_sleep.finetune import estimate_step
workdir, kind, out, fine_tune_type, memory_bound = sys.argv[1:6]
baseline = mx.get_active_memory()
ft = finetune(pathlib.Path(workdir), kind, pathlib.Path(out), fine_tune_type, steps=3,
              batch_size=8, memory_bound=memory_bound)
est = estimate_step(ft)
gc.collect()
mx.clear_cache()
mx.reset_peak_memory()
for _ in range(3):
    ft.train_step()
print(json.dumps({"estimate": est["peak_bytes"], "seconds": est["seconds_per_step"],
                  "measured": mx.get_peak_memory() - baseline}))
"""


@pytest.mark.parametrize(
    "kind,fine_tune_type,memory_bound",
    [
        ("jet_nemotron", "lora", "chunk"),
        ("jet_nemotron", "full", "block"),
        ("jet_nemotron", "lora", "none"),
    ],
)
def test_estimate_is_within_30_percent_of_the_measured_peak(
    tmp_path, workdir, kind, fine_tune_type, memory_bound
):
    """The memory-bounded paths (chunk, the default, and block) within 30%. Without a bound
    (none) the estimate adds up every chunk's activations with their backward temporaries, an
    upper bound (measured 1.4x over here): it must not be under the measured peak, nor more
    than 1.6x over. Measured in a fresh process, so that no other test's arrays move the
    peak."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run(
        [
            sys.executable,
            "-c",
            ESTIMATE_CHECK,
            str(workdir),
            kind,
            str(tmp_path / "o"),
            fine_tune_type,
            memory_bound,
        ],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    est, measured = got["estimate"], got["measured"]
    if memory_bound != "none":
        assert abs(est - measured) <= 0.3 * measured, (est, measured)
    else:
        assert measured <= est <= 1.6 * measured, (est, measured)
    assert got["seconds"] > 0


def test_estimate_cli_prints_and_writes_nothing(tmp_path, workdir):
    result = CliRunner().invoke(
        main,
        [
            "finetune",
            "--model",
            str(workdir / "jet_nemotron"),
            "--data",
            str(workdir / "train.jsonl"),
            "--out",
            str(tmp_path / "o"),
            "--estimate",
            "-N",
            "4",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "expected peak memory" in result.output and "N = 4" in result.output
    # both bounds estimated, and one named for this machine (a tiny model fits either)
    assert "--memory-bound chunk: " in result.output
    assert "--memory-bound block: " in result.output
    assert re.search(r"usable here: run with --memory-bound (chunk|block)", result.output)
    assert not (tmp_path / "o").exists()


def test_estimate_chooses_the_bound_that_fits(tmp_path, workdir):
    """--estimate's choice: the faster bound when both fit, the one that fits when one does
    (the block bound's peak is lower), none when neither; the run's own bound is left as it
    was."""
    from mlx_sleep.finetune import choose_memory_bound, format_choice
    from mlx_sleep.finetune.estimate import pick_bound

    ft = finetune(workdir, "jet_nemotron", tmp_path / "o", batch_size=8, sleep={"loops": 4})
    got = choose_memory_bound(ft, usable=10**15)
    chunk, block = (got["estimates"][b] for b in ("chunk", "block"))
    assert block["peak_bytes"] < chunk["peak_bytes"]
    faster = min(("chunk", "block"), key=lambda b: got["estimates"][b]["seconds_per_step"])
    assert got["choice"] == faster and ft.cfg.memory_bound == "chunk"
    between = (block["peak_bytes"] + chunk["peak_bytes"]) // 2
    assert pick_bound(got["estimates"], between)["choice"] == "block"
    neither = pick_bound(got["estimates"], block["peak_bytes"] // 2)
    assert neither["choice"] is None and "neither fits" in format_choice(neither)


# -- several processes ------------------------------------------------------------------------


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("depth_losses", [None, ((2, 2, 1.0), (4, 4, 0.5))])
def test_rank_slices_sum_to_the_global_batch(tmp_path, workdir, depth_losses):
    """The data-parallel step in one process: each rank's slice of the global batch, run under
    its rows' chunk plans, gives summed losses, counts and gradients that add up to the global
    batch's (what the all-reduce adds; the ring test below runs the real thing)."""
    ft = finetune(workdir, "jet_nemotron", tmp_path, "full", steps=1)
    inputs, targets, mask = make_batch(ft.train_examples[:4], ft.pad_id)
    plan = plan_chunks(mask, ft.sleep.window)
    depths = loss_depths(ft.sleep, depth_losses)
    ce, n, grads = summed_loss_and_grads(ft.model, inputs, targets, mask, depths, plan, True)
    parts = [
        summed_loss_and_grads(
            ft.model, inputs[r], targets[r], mask[r], depths, plan_rows(plan, r), True
        )
        for r in (slice(0, 2), slice(2, 4))
    ]
    assert_close(sum(p[0].item() for p in parts), ce.item(), rtol=1e-5, what="summed loss")
    assert n.item() == sum(p[1].item() for p in parts) == mask.sum()
    whole, halves = dict(tree_flatten(grads)), [dict(tree_flatten(p[2])) for p in parts]
    # float32 sums over the batch in another order: 1e-4 of each gradient's scale, and at least
    # 1e-6 of the largest gradient (a small gradient can be a sum of large cancelling terms)
    assert_close({k: halves[0][k] + halves[1][k] for k in whole}, whole, rtol=1e-4, floor=1e-6)


# (kind, fine-tune type, N): the converted architectures, LoRA (with dropout) and full
BLOCK_CASES = [("jet_nemotron", "lora", 3), ("ouro_jet", "full", 2), ("qwen3_5", "lora", 3)]


@pytest.mark.parametrize("kind,fine_tune_type,loops", BLOCK_CASES)
def test_block_memory_bound_gives_the_chunkwise_loss_and_gradients(
    tmp_path, workdir, kind, fine_tune_type, loops
):
    """--memory-bound block (one block application's activations) gives the summed loss and
    the gradients of --memory-bound chunk on every converted architecture (Jet-Nemotron, Ouro
    with Jet layers: an unrolled loop sharing its layers, Qwen3.5 under the mlx-lm adapter),
    LoRA and full, rows answering in different windows, sliding eviction. With LoRA dropout
    0.5 both equal the one-graph backward too: a recomputed chunk or block application draws
    the masks its forward drew."""
    dropout = 0.5 if fine_tune_type == "lora" else 0.0
    ft = finetune(
        workdir,
        kind,
        tmp_path,
        fine_tune_type,
        steps=1,
        dropout=dropout,
        sleep={"loops": loops, "eviction": "sliding"},
    )
    inputs, targets, mask = make_batch(ft.train_examples[:3], ft.pad_id)
    mask = np.zeros_like(mask)  # rows answering in windows 1, 2 and 3 (L = 16)
    mask[0, 10:12] = mask[1, 20:24] = mask[2, -4:] = 1
    plan = plan_chunks(mask, ft.sleep.window)
    assert len(set(plan[1])) == 3
    results = {}
    for bound in ("none", "chunk", "block") if dropout else ("chunk", "block"):
        mx.random.seed(7)
        results[bound] = summed_loss_and_grads(
            ft.model, inputs, targets, mask, ft.sleep, plan, bound
        )
    ce, n, grads = results["chunk"]
    for bound, (ce_b, n_b, grads_b) in results.items():
        assert n_b.item() == n.item() == mask.sum()
        assert_close(ce_b.item(), ce.item(), rtol=1e-5, what=f"{bound}: summed loss")
        assert_close(grads_b, grads, rtol=1e-4, floor=1e-6, what=f"{bound}: gradients")
    assert max(np.abs(v).max() for _, v in tree_flatten(grads)) > 1e-3


# In the default run (15-70 s here, three Python processes on 2 cores): the distributed path is
# what several Macs run, and nothing else covers it end to end.
def test_two_ring_processes_match_one_process_on_the_global_batch(tmp_path, workdir):
    """`mlx.launch --backend ring -n 2` on loopback, 3 steps of LoRA and of full fine-tuning:
    both processes hold identical weights; the first step's gradient (summed over the processes)
    and every step's loss and gradient norm equal one process's on the same global batch."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from distributed_finetune import FINE_TUNE_TYPES, config, record_gradients

    args = [
        str(workdir / "jet_nemotron"),
        str(workdir / "train.jsonl"),
        str(tmp_path / "run"),
        str(tmp_path / "weights"),
        "3",
        str(workdir / "valid.jsonl"),
    ]
    launch = [
        sys.executable,
        "-c",
        "from mlx._distributed_utils.launch import main; main()",
        "--backend",
        "ring",
        "-n",
        "2",
        "-p",
        str(_free_port()),
        "--",
        sys.executable,
        os.path.join(ROOT, "tests", "distributed_finetune.py"),
        *args,
    ]
    done = subprocess.run(launch, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    for kind in FINE_TUNE_TYPES:
        rank0 = mx.load(str(tmp_path / "weights" / f"{kind}-rank0.safetensors"))
        rank1 = mx.load(str(tmp_path / "weights" / f"{kind}-rank1.safetensors"))
        assert json.load(open(tmp_path / "run" / kind / "config.json"))["processes"] == 2
        single = Finetune(
            str(workdir / "jet_nemotron"),
            str(workdir / "train.jsonl"),
            str(tmp_path / "single" / kind),
            config(kind, 3),
            valid=str(workdir / "valid.jsonl"),
            progress=False,
        )
        initial = params(single.model)
        single_grads = record_gradients(single)
        single.run()
        one = params(single.model)
        assert one.keys() == rank0.keys()
        for k, v in one.items():
            np.testing.assert_array_equal(np.array(rank0[k]), np.array(rank1[k]), err_msg=k)
        # Not the weights: Adam turns the rounding noise of a near-zero gradient entry (the
        # processes sum in another order) into an update of up to lr, and later gradients are
        # taken at those weights. So: the first step's gradients (same weights, float32 sums in
        # another order), and every step's loss and gradient norm and the final validation
        # loss, which move with those updates only to second order (they sit where g ~ 0).
        grads = mx.load(str(tmp_path / "weights" / f"{kind}-grads-rank0.safetensors"))
        assert grads.keys() == single_grads.keys()
        assert len(grads) == 3 * len(tree_flatten(single.model.trainable_parameters()))
        first = sorted(k for k in single_grads if k.startswith("step0."))
        assert_close(
            {k: grads[k] for k in first}, {k: single_grads[k] for k in first}, rtol=1e-4, floor=1e-6
        )  # as test_rank_slices_sum_to_the_global_batch
        logged = [
            [json.loads(l) for l in open(tmp_path / run / kind / "metrics.jsonl")]
            for run in ("run", "single")
        ]
        for name, rtol in (("loss", 1e-5), ("valid_loss", 1e-5), ("grad_norm", 1e-4)):
            ring, alone = ([r[name] for r in log if name in r] for log in logged)
            assert len(ring) == len(alone) == (3 if name != "valid_loss" else 2), (
                name
            )  # valid: start, end
            assert_close(ring, alone, rtol=rtol, what=name)
        assert max(np.abs(one[k] - initial[k]).max() for k in one) > 1e-4  # it did train


def test_evaluation_is_deterministic_with_lora_dropout(tmp_path, workdir):
    """Dropout 0.5 on the adapters: validation and a loaded adapter run in evaluation mode, so
    two evaluations agree bit for bit; training draws dropout (two training-mode calls differ)."""
    from mlx_sleep.finetune import load_adapter
    from mlx_sleep.loading import load

    ft = finetune(workdir, "jet_nemotron", tmp_path / "run", steps=2, dropout=0.5)
    ft.run()
    assert ft.validate() == ft.validate()
    ids = mx.array([[ord(c) for c in "keep 123 first:"]])
    ft.model.train()
    assert not mx.array_equal(ft.model(ids), ft.model(ids))  # dropout is really on in training

    model, _ = load(str(workdir / "jet_nemotron"))
    model = load_adapter(model, str(tmp_path / "run" / "checkpoint"))
    assert mx.array_equal(model(ids), model(ids))


def test_depth_losses_switch_on_at_their_step_and_resume_exactly(tmp_path, workdir, monkeypatch):
    """--depth-losses 1:0.5,3:1 --depth-losses-from 2 (N = 2): steps 0-1 take the loss at N,
    later ones at depths 1 and 3; a run killed after its step-2 checkpoint resumes to the
    straight run's adapters bit for bit, and the run's config records the setting."""
    import mlx_sleep.sleep as sleep_mod

    seen = []
    real = sleep_mod.sleep_value_and_grad
    monkeypatch.setattr(
        sleep_mod,
        "sleep_value_and_grad",
        lambda m, x, y, w, sleep, **k: seen.append(sleep.loops) or real(m, x, y, w, sleep, **k),
    )

    def run_of(out):
        return finetune(
            workdir,
            "jet_nemotron",
            out,
            steps=4,
            checkpoint_every=2,
            depth_losses=((1, 0.5), (3, 1.0)),
            depth_losses_from=2,
        )

    straight = run_of(tmp_path / "a")
    straight.run()
    assert seen == [2, 2, 1, 3, 1, 3], seen

    assert_killed_run_resumes_to(straight, run_of, tmp_path / "b", killed_at=3, checkpoint=2)
    saved = json.load(open(tmp_path / "b" / "config.json"))
    assert saved["finetune"]["depth_losses"] == [[1, 1, 0.5], [3, 3, 1.0]], saved
