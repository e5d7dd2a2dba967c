"""SIGKILL at a filesystem step of `train`, `finetune` and a piped `chat`: whatever the step,
what is left loads (the run, the fine-tune, the session), and running the same command again
finishes with what an uninterrupted command leaves (bit for bit: resume is exact).

Each command is first run with every filesystem call counted (KILL_AT=0); then killed just before
call k, for k spread over all of them (KILL_POINTS by default, every one with `-m slow`).
`consolidate` and `sessions rm` are killed at every step in test_sessions_untrusted.py."""

import os

import mlx.core as mx
import pytest

import mlx_sleep
from tests.reliability import TINY_TRAIN, cli, kill_points, run_killed
from tests.tiny_models import make_model_dir

KILL_POINTS = 8  # per command in the default suite
KILLS = {}  # command -> kills made (printed by the slow run)


def arrays(path):
    return {k: v for k, v in mx.load(str(path)).items()}


def assert_same_arrays(got, want, what):
    assert set(got) == set(want), what
    for k in want:
        assert got[k].dtype == want[k].dtype and mx.array_equal(got[k], want[k]).item(), (what, k)


def no_stray_files(root, allowed=()):
    """Only the command's own files: temporaries carry the .mlx-sleep-tmp- prefix."""
    for dirpath, _, files in os.walk(root):
        for f in files:
            assert not f.endswith(".tmp") and (
                not f.startswith(".") or f in (".mlx-sleep",) or f.startswith(".mlx-sleep-tmp-")
            ), os.path.join(dirpath, f)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("killmodel")
    path = make_model_dir(root / "m", "hybrid", loops=2, window=16)
    (root / "ft.jsonl").write_text('{"prompt": "a b c d e f", "answer": " g h"}\n' * 8)
    return path, str(root / "ft.jsonl")


def train_args(out):
    return ["train", *TINY_TRAIN, "--out", out]


def finetune_args(model, out):
    path, data = model
    return [
        "finetune",
        "--model",
        path,
        "--data",
        data,
        "--out",
        out,
        "--steps",
        "2",
        "--batch-size",
        "2",
        "--checkpoint-every",
        "1",
        "--valid-every",
        "0",
        "--lr",
        "1e-2",
        "--warmup",
        "1",
    ]


CHAT_INPUT = "hello there\n/sleep\nand more\n"
DEFERRED_CHAT_INPUT = "hello there\nand more\n/sleep\nthe end\n"


def chat_args(model):
    return ["chat", "--model", model[0], "-s", "k", "-m", "6", "--idle-delay", "0"]


def kills(command, tmp_path, run_args, check, most, env=None, input=None):
    """Count the command's steps, then for each kill point: a fresh directory, the command
    killed there, `check(directory)` on what is left."""
    ref = tmp_path / "reference"
    r = run_killed(0, tmp_path / "count", *run_args(ref), env=env and env(ref), input=input)
    assert r.returncode == 0, r.stdout + r.stderr
    steps = int((tmp_path / "count").read_text())
    assert steps >= 5, steps
    points = kill_points(steps, most)
    for at in points:
        where = tmp_path / f"k{at}"
        r = run_killed(
            at, tmp_path / "unused", *run_args(where), env=env and env(where), input=input
        )
        assert r.returncode == -9, (at, r.stdout + r.stderr)
        check(where, ref, at)
    KILLS[command] = KILLS.get(command, 0) + len(points)
    return points


def check_train(out, ref, at):
    code, output = cli(*train_args(out))  # the same command again resumes or starts over
    assert code == 0, (at, output)
    assert_same_arrays(
        arrays(out / "checkpoint" / "model.safetensors"),
        arrays(ref / "checkpoint" / "model.safetensors"),
        f"train killed at {at}",
    )
    no_stray_files(out)


def check_finetune(model):
    def check(out, ref, at):
        code, output = cli(*finetune_args(model, out))
        assert code == 0, (at, output)
        assert_same_arrays(
            arrays(out / "checkpoint" / "adapters.safetensors"),
            arrays(ref / "checkpoint" / "adapters.safetensors"),
            f"finetune killed at {at}",
        )
        no_stray_files(out)

    return check


def check_chat(model):
    def check(home, ref, at):
        os.environ["MLX_SLEEP_HOME"] = str(home)
        try:
            path = home / "sessions" / "k"
            if (path / "session.json").exists():  # saved at least once: it loads and resumes
                code, output = cli("sessions", "show", "k")
                assert code == 0, (at, output)
                m, tok = mlx_sleep.load(model[0])
                from mlx_sleep.session import open_session

                s = open_session("k", m, model[0], create=False)
                s.close()
                code, output = cli(
                    "chat", "-s", "k", "-m", "2", "--idle-delay", "0", input="again\n"
                )
                assert code == 0, (at, output)
            else:  # killed before the first save: a new chat starts
                code, output = cli(*chat_args(model), input="hi\n")
                assert code == 0, (at, output)
            no_stray_files(home)
        finally:
            del os.environ["MLX_SLEEP_HOME"]

    return check


def chat_env(home):
    return {"MLX_SLEEP_HOME": str(home)}


COMMANDS = ["train", "finetune", "chat", "chat --defer-sleep"]


@pytest.mark.parametrize("command", COMMANDS)
def test_sigkill_at_any_step_leaves_what_loads_and_resumes(tmp_path, model, command):
    # deferred sleep: the same saves as chat's, with pending windows in them (fewer points)
    run(tmp_path, model, command, KILL_POINTS // 2 if "defer" in command else KILL_POINTS)


@pytest.mark.slow
@pytest.mark.parametrize("command", COMMANDS)
def test_sigkill_at_every_step(tmp_path, model, command):
    points = run(tmp_path, model, command, None)
    print(f"\n{command}: killed at each of {len(points)} filesystem steps")


def run(tmp_path, model, command, most):
    if command == "train":
        return kills(command, tmp_path, train_args, check_train, most)
    if command == "finetune":
        return kills(
            command, tmp_path, lambda out: finetune_args(model, out), check_finetune(model), most
        )
    defer = command.split()[1:]  # windows fill in the turns and wait: saves hold them
    return kills(
        command,
        tmp_path,
        lambda home: chat_args(model) + defer,
        check_chat(model),
        most,
        env=chat_env,
        input=DEFERRED_CHAT_INPUT if defer else CHAT_INPUT,
    )
