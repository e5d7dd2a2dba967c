"""One clear line for every bad input (issue 8): flags, task options, config files, checkpoints,
runs and API misuse are checked where they enter; absurd sizes are refused before they hang or
take the machine's memory; token ids never index outside a table."""

import contextlib
import json
import os

import mlx.core as mx
import numpy as np
import pytest

from mlx_sleep.config import ConfigError, ModelConfig, SleepConfig
from mlx_sleep.tasks import get_task
from mlx_sleep.train import TrainConfig, load_run
from tests.reliability import (
    TINY_TRAIN,
    assert_one_clear_line,
    bounded_work,
    cli,
    copy_run,
    fifo_never_opened,
    make_hf_checkpoint,
    snapshot,
    train_tiny_run,
)
from tests.tiny_models import FIXTURES, make_model_dir


def train(tmp_path, *extra):
    return cli("train", *TINY_TRAIN, "--out", tmp_path / "run", *extra)


# -- 5 and 6: flags and task options ------------------------------------------------------------


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--loops", "1000000"], "1000000 is not in the range 1<=x<=1024"),
        (["-o", "steps=1000000000"], "steps must be <= 16384"),
        (["-o", "eval_steps=5"], "eval_steps must be a list"),
        (["-o", "name=depo"], "unknown setting(s) name"),
        (["-o", "n_bits=[1,2]"], "n_bits must be an integer"),
        (["--seed", "-1"], "-1 is not in the range 0<=x<=2147483647"),
        (["--steps", "1e20"], "'1e20' is not a valid integer"),
        (["--steps", "100000000000000000000"], "is not in the range 1<=x<=1000000000"),
        (["--eval-samples", "0"], "'--eval-samples': 0 is not in the range x>=1"),
        (["--eval-every", "-1"], "'--eval-every': -1 is not in the range x>=0"),
        (["--weight-decay", "-0.1"], "'--weight-decay': -0.1 is not >= 0"),
        (["--lr", "nan"], "'--lr': 'nan' is not a finite number"),
        (["--lr", "inf"], "'--lr': 'inf' is not a finite number"),
        (["--hidden-size", "4000000"], "more than this machine's"),
        (["--hidden-size", "10000000"], "intermediate_size must be <= 16777216"),
        (["--hidden-size", "64", "--heads", "16777216"], "head_dim is 0"),
        (["--hidden-size", "1.5"], "'1.5' is not a valid integer"),
        (["--heads", "0"], "'--heads': 0 is not in the range x>=1"),
        (["--layers", "attn," * 5000 + "gdn"], "the most one pass runs"),
        (["--window", "2000000"], "window (L) must be <= 1048576"),
        (["--batch-size", "0"], "'--batch-size': 0 is not in the range 1<=x<=1048576"),
    ],
)
def test_bad_train_flags(tmp_path, extra, message):
    with bounded_work():  # refused up front: no model built, no training step taken
        code, output = train(tmp_path, *extra)
    assert_one_clear_line(code, output, message)
    assert not (tmp_path / "run").exists()  # nothing written for a refused command


def _without_dac_override():
    """preexec_fn for root: drop CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH from the bounding set
    (prctl PR_CAPBSET_DROP), so that the command it execs is bound by file modes, as any user
    is, while it still owns (and can read) what root owns."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        if libc.prctl(24, cap, 0, 0, 0) != 0:
            os._exit(97)


def test_unwritable_output(tmp_path):
    """The real command in a directory it cannot write into (mode 0500): the kernel's "Permission
    denied", in one line. As root (CI runs as root) the command runs without the capability
    that lets root write anywhere; where that capability cannot be dropped, a probe says so."""
    import subprocess
    import sys

    (tmp_path / "ro").mkdir(mode=0o500)
    preexec = _without_dac_override if os.geteuid() == 0 else None
    probe = subprocess.run(
        [sys.executable, "-c", f"import os; os.mkdir({str(tmp_path / 'ro' / 'p')!r})"],
        capture_output=True,
        text=True,
        preexec_fn=preexec,
    )
    if probe.returncode == 97 or "PermissionError" not in probe.stderr:
        pytest.skip(f"cannot make a directory unwritable here (probe: {probe.returncode})")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "mlx_sleep.cli",
            "train",
            *TINY_TRAIN,
            "--out",
            str(tmp_path / "ro" / "run"),
        ],
        capture_output=True,
        text=True,
        preexec_fn=preexec,
        cwd=os.path.dirname(os.path.dirname(__file__)),
    )
    assert_one_clear_line(r.returncode, r.stdout + r.stderr, "ro/run: Permission denied")
    assert os.listdir(tmp_path / "ro") == []


def test_unwritable_output_reported_in_one_line(tmp_path, monkeypatch):
    """(As root nothing is unwritable: the OSError a user would get is raised by hand.)"""
    import mlx_sleep.io

    def denied(path, *a, **k):
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(mlx_sleep.io.os, "makedirs", denied)
    assert_one_clear_line(
        *cli("train", *TINY_TRAIN, "--out", tmp_path / "ro" / "run"), "ro/run: Permission denied"
    )


def test_output_under_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    assert_one_clear_line(*cli("train", *TINY_TRAIN, "--out", tmp_path / "file" / "run"))
    assert_one_clear_line(
        *cli(
            "convert",
            "--hf-path",
            make_hf_checkpoint(tmp_path / "c"),
            "--out",
            tmp_path / "file" / "m",
        ),
        "not a directory",
    )
    assert (tmp_path / "file").read_text() == "x"


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--batch-size", "0"], "'--batch-size': 0 is not in the range 1<=x<=1048576"),
        (["--samples", "0"], "'--samples': 0 is not in the range 1<=x<=16777216"),
        (["--seed", "-5"], "-5 is not in the range 0<=x<=2147483647"),
        (["--loops", "0"], "is not a list of loop counts in 1..1024"),
    ],
)
def test_bad_eval_flags(run, extra, message):
    assert_one_clear_line(*cli("eval", "--checkpoint", run, *extra), message)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return train_tiny_run(tmp_path_factory, "bad")


# -- runs whose files are broken -----------------------------------------------------------------


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda c: c.pop("model"), "has no 'model' settings"),
        (lambda c: c.pop("task"), "has no 'task' settings"),
        (lambda c: c["model"].update(hidden_size=1.5), "hidden_size must be an integer"),
        (lambda c: c["model"].update(vocab_size=10**12), "vocab_size must be an integer"),
        (lambda c: c["model"].update(vocab_size=2**31 - 1), "vocab_size must be <= 16777216"),
        (
            lambda c: c["model"].update(vocab_size=2**24, hidden_size=2**14),
            "more than this machine's",
        ),
        (lambda c: c.update(model_type=["hybrid"]), "unsupported model_type"),
        (lambda c: c["task"].update(n_strings=3), "do not fit the model's vocabulary"),
        (lambda c: c["sleep"].update(loops="2"), "loops (N) must be an integer"),
        (lambda c: c.update(task=[1]), "has no 'task' settings"),
    ],
)
def test_a_run_whose_settings_are_broken(tmp_path, run, edit, message):
    out = copy_run(run, tmp_path / "run")
    config = json.loads((out / "config.json").read_text())
    edit(config)
    (out / "config.json").write_text(json.dumps(config))
    assert_one_clear_line(*cli("eval", "--checkpoint", out, "--samples", "2"), message)


@pytest.mark.parametrize(
    "damage,message",
    [
        ("corrupt json", "config.json is not valid JSON"),
        ("list json", "holds a JSON list, not an object"),
        ("truncated weights", "truncated"),
        ("weights a directory", "is a directory, not a regular file"),
        ("weights a fifo", "is a FIFO, not a regular file"),
    ],
)
def test_a_run_whose_files_are_broken(tmp_path, run, damage, message):
    out = copy_run(run, tmp_path / "run")
    weights = out / "checkpoint" / "model.safetensors"
    if damage == "corrupt json":
        (out / "config.json").write_text('{"model": ')
    elif damage == "list json":
        (out / "config.json").write_text("[1, 2]")
    elif damage == "truncated weights":
        weights.write_bytes(weights.read_bytes()[:100])
    elif damage == "weights a directory":
        weights.unlink()
        weights.mkdir()
    else:
        weights.unlink()
        os.mkfifo(weights)
    assert_one_clear_line(*cli("eval", "--checkpoint", out, "--samples", "2"), message)


# -- convert inputs ---------------------------------------------------------------------------


def broken_checkpoint(tmp_path, edit=None, raw=None):
    src = make_hf_checkpoint(tmp_path / "src")
    path = os.path.join(src, "config.json")
    if raw is not None:
        open(path, "w").write(raw)
    else:
        config = json.load(open(path))
        edit(config)
        json.dump(config, open(path, "w"))
    return src


@pytest.mark.parametrize(
    "raw,message",
    [
        ("[1, 2]", "holds a JSON list, not an object"),
        ('"jet"', "holds a JSON str, not an object"),
        ("{", "config.json is not valid JSON"),
    ],
)
def test_convert_config_of_the_wrong_shape(tmp_path, raw, message):
    src = broken_checkpoint(tmp_path, raw=raw)
    before = snapshot(tmp_path)
    assert_one_clear_line(*cli("convert", "--hf-path", src, "--out", tmp_path / "m"), message)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda c: c.update(model_type=["jet_nemotron"]), "unsupported architecture"),
        (lambda c: c.update(num_attention_heads=0), "config.json:"),
        (lambda c: c.update(vocab_size=10**12), "config.json:"),
        (lambda c: c.update(vocab_size=2**20), "config.json disagrees with the weights"),
        (lambda c: c.update(hidden_size=1.5), "config.json:"),
        (lambda c: c.update(num_hidden_layers=100000), "config.json:"),
    ],
)
def test_convert_config_values(tmp_path, edit, message):
    src = broken_checkpoint(tmp_path, edit)
    with bounded_work():
        result = cli("convert", "--hf-path", src, "--out", tmp_path / "m")
    assert_one_clear_line(*result, message)
    assert not (tmp_path / "m").exists()


def test_convert_ouro_absurd_loops_and_jet_layers(tmp_path):
    import shutil

    src = tmp_path / "ouro"
    shutil.copytree(FIXTURES / "ouro-tiny", src)
    assert_one_clear_line(
        *cli(
            "convert", "--hf-path", src, "--out", tmp_path / "m", "--insert-jet-layers", "1000000"
        ),
        "--insert-jet-layers must be in",
    )
    config = json.load(open(src / "config.json"))
    config["total_ut_steps"] = 10**9
    json.dump(config, open(src / "config.json", "w"))
    with bounded_work():  # not 10**9 loops unrolled
        result = cli("convert", "--hf-path", src, "--out", tmp_path / "m")
    assert_one_clear_line(*result)


@pytest.mark.parametrize(
    "damage,message",
    [
        ("index a list", "not a valid shard index"),
        ("index names a path", "not a valid shard index"),
        ("weights a directory", "is a directory, not a regular file"),
        ("weights a fifo", "is a FIFO, not a regular file"),
        ("config a directory", "is a directory, not a regular file"),
        ("truncated weights", "truncated"),
        ("empty weights", "truncated"),
    ],
)
def test_convert_checkpoint_files(tmp_path, damage, message):
    src = make_hf_checkpoint(tmp_path / "src")
    weights = os.path.join(src, "model.safetensors")
    if damage.startswith("index"):
        wm = ["model.safetensors"] if damage == "index a list" else {"x": "../../etc/passwd"}
        json.dump({"weight_map": wm}, open(os.path.join(src, "model.safetensors.index.json"), "w"))
    elif damage == "weights a directory":
        os.remove(weights)
        os.mkdir(weights)
    elif damage == "weights a fifo":
        os.remove(weights)
        os.mkfifo(weights)
    elif damage == "config a directory":
        os.remove(os.path.join(src, "config.json"))
        os.mkdir(os.path.join(src, "config.json"))
    elif damage == "truncated weights":
        data = open(weights, "rb").read()
        open(weights, "wb").write(data[: len(data) // 2])
    else:
        open(weights, "wb").close()
    before = snapshot(tmp_path)
    with (
        bounded_work(),
        fifo_never_opened(weights) if damage == "weights a fifo" else contextlib.nullcontext(),
    ):
        result = cli("convert", "--hf-path", src, "--out", tmp_path / "m")
    assert_one_clear_line(*result, message)
    assert snapshot(tmp_path) == before


def test_loading_a_model_whose_weights_are_a_fifo_does_not_hang(tmp_path):
    from mlx_sleep import load_model

    path = make_model_dir(tmp_path / "m", "hybrid")
    os.remove(os.path.join(path, "model.safetensors"))
    os.mkfifo(os.path.join(path, "model.safetensors"))
    with pytest.raises(ValueError, match="FIFO"):
        load_model(path)


# -- 3. token ids at every entry point -------------------------------------------------------


def test_training_batch_ids_are_checked(tmp_path):
    from mlx_sleep.tasks import Batch
    from tests.test_train import TASK, trainer

    t = trainer(tmp_path, steps=2)
    good = TASK.sample(np.random.default_rng(0), 4)
    for name, value in (("targets", t.model.vocab_size), ("inputs", -1)):
        arrays = {k: getattr(good, k).copy() for k in ("inputs", "targets", "mask", "difficulty")}
        arrays[name][0, 0] = value
        with pytest.raises(ValueError, match=f"batch {name}: token id {value} is outside"):
            t.train_step(Batch(**arrays))
    t.close()


def test_a_task_larger_than_the_model_is_refused(tmp_path):
    from mlx_sleep.train import Trainer

    task = get_task("rule110", n_strings=4, n_bits=8, steps=1)
    with pytest.raises(ConfigError, match="vocab_size 4 < the task's 6"):
        Trainer(
            str(tmp_path / "r"),
            ModelConfig(vocab_size=4, hidden_size=8, num_heads=2),
            SleepConfig(window=8),
            task,
            TrainConfig(steps=1),
            progress=False,
        )
    assert not (tmp_path / "r").exists()


def test_a_tokenizer_larger_than_the_model_is_refused(tmp_path):
    import mlx_sleep
    from tests.tiny_models import write_tokenizer

    path = make_model_dir(tmp_path / "m", "hybrid")
    write_tokenizer(path, 1024)  # the model has 512 embeddings
    with pytest.raises(ConfigError, match="tokenizer has 1024 tokens but the model's vocabulary"):
        mlx_sleep.load(path)
    config = json.load(open(os.path.join(path, "config.json")))
    write_tokenizer(path, 512)
    config["eos_token_id"] = 600
    json.dump(config, open(os.path.join(path, "config.json"), "w"))
    with pytest.raises(ConfigError, match="eos_token_id 600 is outside"):
        mlx_sleep.load(path)


def test_model_and_engine_ids_are_checked():
    from mlx_sleep.models import HybridLM
    from mlx_sleep.sleep import SleepEngine

    model = HybridLM(ModelConfig(vocab_size=8, hidden_size=8, num_heads=2))
    for bad in (8, -1, 2**31 - 1):
        with pytest.raises(ValueError, match=f"token id {bad} is outside the vocabulary of 8"):
            model(mx.array([[1, bad]]))
        with pytest.raises(ValueError, match=f"token id {bad}"):
            SleepEngine(model, SleepConfig(window=4)).feed(mx.array([[bad]]))


# -- settings objects and saved engine state ---------------------------------------------------


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda: SleepConfig(loops=True), "loops (N) must be an integer"),
        (lambda: SleepConfig(loops=2.0), "loops (N) must be an integer"),
        (lambda: SleepConfig(window=10**9), "window (L) must be <="),
        (lambda: SleepConfig(eviction=["hard"]), "eviction must be one of"),
        (lambda: ModelConfig(vocab_size=8, hidden_size=True), "hidden_size must be an integer"),
        (lambda: ModelConfig(vocab_size=8, norm_eps=-1.0), "norm_eps must be > 0"),
        (lambda: ModelConfig(vocab_size=8, rope_theta=float("nan")), "rope_theta must be a finite"),
        (lambda: ModelConfig(vocab_size=8, core=[0, 1, 2]), "core must be"),
        (lambda: ModelConfig.from_dict([1]), "must be a JSON object"),
        (lambda: TrainConfig(steps=0), "steps must be in 1.."),
        (lambda: TrainConfig(lr=-1.0), "lr must be > 0"),
        (lambda: TrainConfig(min_lr_ratio=2.0), "min_lr_ratio must be in"),
        (lambda: TrainConfig(batch_size=2.5), "batch_size must be an integer"),
        (lambda: TrainConfig(compile="yes"), "compile must be true or false"),
    ],
)
def test_settings_objects_check_what_enters(make, message):
    with pytest.raises(ConfigError) as e:
        make()
    assert message in str(e.value) and "\n" not in str(e.value)


def test_ouro_config_bounds():
    from mlx_sleep.models import model_from_config
    from mlx_sleep.models.ouro import OuroConfig

    base = dict(vocab_size=8, hidden_size=8, num_layers=2, num_heads=2, intermediate_size=8)
    with pytest.raises(ConfigError, match="cannot be built|more than this machine"):
        model_from_config(
            "ouro", {**base, "num_heads": 1 << 16, "num_kv_heads": 1 << 16, "head_dim": 1 << 16}
        )
    with pytest.raises(ConfigError, match="total_ut_steps must be <="):
        OuroConfig(**base, total_ut_steps=10**9)
    with pytest.raises(ConfigError, match="more than 4096"):
        OuroConfig(**base, total_ut_steps=5000)
    with pytest.raises(ConfigError, match="jet_after must be"):
        OuroConfig(**base, jet_after=[0.5])


@pytest.mark.parametrize(
    "damage,message",
    [
        (lambda d: d.pop("meta"), "not a saved engine state"),
        (lambda d: d["meta"].update(offset="3"), "meta 'offset' must be an integer"),
        (lambda d: d["meta"].update(window_start=-1), "meta 'window_start' must be"),
        (lambda d: d["arrays"].update(x=[1, 2]), "arrays must be mx.array"),
        (lambda d: d["meta"].update(sleep={"loops": 9}), "sleep settings"),
    ],
)
def test_load_state_dict_checks_what_enters(damage, message):
    from mlx_sleep.models import HybridLM
    from mlx_sleep.sleep import SleepEngine

    model = HybridLM(ModelConfig(vocab_size=8, hidden_size=8, num_heads=2))
    engine = SleepEngine(model, SleepConfig(window=4))
    engine.feed(mx.array([[1, 2, 3, 4, 5]]))
    saved = engine.state_dict()
    d = {"meta": dict(saved["meta"]), "arrays": dict(saved["arrays"])}
    damage(d)
    with pytest.raises(ValueError, match=message):
        engine.load_state_dict(d)
    assert engine.offset == 5


def test_load_run_on_a_run_missing_keys(tmp_path, run):
    out = copy_run(run, tmp_path / "run")
    (out / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match="has no 'model' settings"):
        load_run(str(out))


@pytest.mark.parametrize(
    "damage,message",
    [
        ("trainer.json missing step", "is damaged (KeyError"),
        ("trainer.json step a string", "must be integers >= 0"),
        ("trainer.json a list", "not an object"),
        ("trainer.json random state out of range", "is damaged (OverflowError"),
        ("optimizer truncated", "truncated"),
        ("optimizer of another model", "is damaged"),
        ("optimizer missing", "does not exist"),
    ],
)
def test_resuming_from_a_damaged_checkpoint(tmp_path, run, damage, message):
    from mlx_sleep.io import save_arrays

    out = copy_run(run, tmp_path / "run")
    ckpt = out / "checkpoint"
    meta = json.loads((ckpt / "trainer.json").read_text())
    if damage == "trainer.json missing step":
        meta.pop("step")
    elif damage == "trainer.json step a string":
        meta["step"] = "2"
    elif damage == "trainer.json random state out of range":  # found by the fuzz
        meta["loops_rng"]["uinteger"] = -1
    if damage == "trainer.json a list":
        (ckpt / "trainer.json").write_text("[]")
    else:
        (ckpt / "trainer.json").write_text(json.dumps(meta))
    opt = ckpt / "optimizer.safetensors"
    if damage == "optimizer truncated":
        opt.write_bytes(opt.read_bytes()[:-10])
    elif damage == "optimizer of another model":
        arrays = mx.load(str(opt))
        save_arrays(str(opt), {k: mx.zeros((3,) + v.shape) for k, v in arrays.items()})
    elif damage == "optimizer missing":
        opt.unlink()
    before = snapshot(out)
    code, output = cli("train", *TINY_TRAIN, "--out", out)
    assert_one_clear_line(code, output, message)
    assert snapshot(out) == before
