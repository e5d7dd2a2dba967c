"""Helpers for the reliability tests: run the CLI the way a user does, and prove that files which
existed before a command are byte-for-byte the same after it."""

import hashlib
import os
import stat

from click.testing import CliRunner

from mlx_sleep.cli import main

# A tiny training run (seconds on a CPU).
TINY_TRAIN = ["--task", "rule110", "-o", "n_strings=2", "-o", "n_bits=4", "-o", "steps=1",
              "--hidden-size", "16", "--heads", "2", "--steps", "2", "--batch-size", "4",
              "--eval-samples", "4", "--checkpoint-every", "1"]


def cli(*args):
    """(exit code, output) of `mlx-sleep ARGS`; exceptions are caught as the shell would show
    them (a traceback in the output), so a test sees what a user sees."""
    r = CliRunner().invoke(main, [str(a) for a in args])
    output = r.output
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        import traceback
        output += "Traceback (most recent call last):\n" + "".join(
            traceback.format_exception(type(r.exception), r.exception, r.exception.__traceback__))
    return r.exit_code, output


def assert_one_clear_line(code, output, expect=None):
    """Failed (exit 1 for our errors, 2 for click's usage errors), no traceback, and the error
    itself on one line that says something (`expect` when given)."""
    assert code in (1, 2), (code, output)
    assert "Traceback" not in output, output
    errors = [l for l in output.splitlines() if l.startswith("Error:")]
    assert len(errors) == 1, output
    if code == 1:
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
                    out[rel] = ("file", hashlib.sha256(f.read()).hexdigest(),
                                stat.S_IMODE(st.st_mode))
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
