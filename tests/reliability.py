"""Helpers for the reliability tests: run the CLI the way a user does, and prove that files which
existed before a command are byte-for-byte the same after it."""

import contextlib
import hashlib
import os
import stat
import sys
import threading

from click.testing import CliRunner

from mlx_sleep.cli import main

# A tiny training run (seconds on a CPU).
TINY_TRAIN = [
    "--task",
    "rule110",
    "-o",
    "n_strings=2",
    "-o",
    "n_bits=4",
    "-o",
    "steps=1",
    "--hidden-size",
    "16",
    "--heads",
    "2",
    "--steps",
    "2",
    "--batch-size",
    "4",
    "--eval-samples",
    "4",
    "--checkpoint-every",
    "1",
]


def cli(*args, input=None):
    """(exit code, output) of `mlx-sleep ARGS` (stdin: `input`); exceptions are caught as the
    shell would show them (a traceback in the output), so a test sees what a user sees."""
    r = CliRunner().invoke(main, [str(a) for a in args], input=input)
    output = r.output
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        import traceback

        output += "Traceback (most recent call last):\n" + "".join(
            traceback.format_exception(type(r.exception), r.exception, r.exception.__traceback__)
        )
    return r.exit_code, output


def assert_one_clear_line(code, output, expect=None):
    """Failed (exit 1 for our errors, 2 for click's usage errors), no traceback, and the error
    itself on one line that says something (`expect` when given)."""
    assert code in (1, 2), (code, output)
    assert "Traceback" not in output, output
    errors = [l for l in output.splitlines() if l.startswith("Error:")]
    assert len(errors) == 1, output
    assert output.strip() == errors[0], output  # nothing but that line
    assert len(errors[0]) > len("Error: ") + 10, output
    if expect is not None:
        assert expect in output, output


def snapshot(root) -> dict:
    """{relative path: (kind, content hash or link target, mode)} of everything under `root`
    (without following symlinks)."""
    out = {}
    root = str(root)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            rel = os.path.relpath(path, root)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(path), None)
            elif stat.S_ISREG(st.st_mode):
                with open(path, "rb") as f:
                    out[rel] = (
                        "file",
                        hashlib.sha256(f.read()).hexdigest(),
                        stat.S_IMODE(st.st_mode),
                    )
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", None, stat.S_IMODE(st.st_mode))
            else:
                out[rel] = ("special", None, stat.S_IMODE(st.st_mode))
    return out


def make_hf_checkpoint(path):
    """A Hugging Face style checkpoint directory (the tiny Jet-Nemotron fixture, copied)."""
    import shutil
    from tests.tiny_models import FIXTURES

    shutil.copytree(FIXTURES / "jet-nemotron-tiny", path)
    return str(path)


def train_tiny_run(tmp_path_factory, name: str):
    """A finished tiny training run (`train` with TINY_TRAIN) in a fresh temporary directory."""
    out = tmp_path_factory.mktemp(name) / "run"
    code, output = cli("train", *TINY_TRAIN, "--out", out)
    assert code == 0, output
    return out


def copy_run(run, dest):
    """A copy of a run to damage (links copied as links)."""
    import shutil

    shutil.copytree(run, dest, symlinks=True)
    return dest


class TooMuchWork(Exception):
    pass


@contextlib.contextmanager
def bounded_work(calls: int = 100_000, mlx_bytes: int = 16 << 20):
    """Asserts that the block did little work, whatever the machine's speed: at most `calls`
    Python function calls (counted by a profiler, which raises TooMuchWork past the bound, so
    a loop that would hang fails instead) and at most `mlx_bytes` of MLX memory at its peak.
    "Refused up front" in numbers that no slow or busy machine changes (measured: the refused
    commands of test_bad_input.py make at most ~6,400 calls and allocate at most ~1.3 kB)."""
    import mlx.core as mx

    count = [0]

    def profile(frame, event, arg):
        if event == "call":
            count[0] += 1
            if count[0] > calls:
                sys.setprofile(None)
                raise TooMuchWork(f"more than {calls} Python calls")

    mx.reset_peak_memory()
    active = mx.get_active_memory()
    previous = sys.getprofile()
    sys.setprofile(profile)
    try:
        yield count
    finally:
        sys.setprofile(previous)
    peak = mx.get_peak_memory() - active
    assert count[0] <= calls, f"{count[0]} Python calls > {calls}"
    assert peak <= mlx_bytes, f"{peak} bytes of MLX memory > {mlx_bytes}"


@contextlib.contextmanager
def fifo_never_opened(path):
    """Asserts that nothing in the block opened the FIFO at `path`. A writer waits on it; a
    reader that opened it would meet that writer (and read an empty file rather than hang)."""
    opened, done = threading.Event(), threading.Event()

    def writer():
        fd = os.open(path, os.O_WRONLY)  # blocks until someone opens the FIFO to read
        if not done.is_set():
            opened.set()
        os.close(fd)

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # lets the writer go
        thread.join()
        os.close(fd)
    assert not opened.is_set(), f"{path}, a FIFO, was opened"


# -- SIGKILL at a chosen filesystem step ----------------------------------------------------------

# The CLI with every call that changes the file system (and the array writer) counted; the
# KILL_AT-th is preceded by SIGKILL. KILL_AT=0 only counts (written to KILL_COUNT at exit).
KILLER = """
import atexit, os, signal, sys
from mlx_sleep.cli import main  # first: it picks the BLAS mlx.core uses (the same as `run`)
import mlx.core as mx
at, count = int(os.environ["KILL_AT"]), [0]
def wrap(module, name):
    real = getattr(module, name)
    def step(*args, **kwargs):
        count[0] += 1
        if count[0] == at:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)
    setattr(module, name, step)
for name in ("open", "write", "fsync", "replace", "rename", "remove", "unlink", "rmdir", "mkdir",
             "chmod", "ftruncate"):
    wrap(os, name)
wrap(mx, "save_safetensors")
atexit.register(lambda: open(os.environ["KILL_COUNT"], "w").write(str(count[0])))
sys.argv[0] = "mlx-sleep"
main()
"""


def run_killed(at, count_file, *args, env=None, input=None):
    """`mlx-sleep ARGS` in a new process, SIGKILLed just before its `at`-th filesystem step
    (0: never; the number of steps is then written to `count_file`)."""
    import subprocess
    import sys

    return subprocess.run(
        [sys.executable, "-c", KILLER, *map(str, args)],
        capture_output=True,
        text=True,
        input=input,
        timeout=600,
        env={**os.environ, **(env or {}), "KILL_AT": str(at), "KILL_COUNT": str(count_file)},
    )


def kill_points(steps: int, most: int = None):
    """Every step 1..steps, or `most` of them evenly spread (first and last included)."""
    if most is None or steps <= most:
        return list(range(1, steps + 1))
    return sorted({1 + round(i * (steps - 1) / (most - 1)) for i in range(most)})
