"""The examples run as a user would run them (tiny sizes)."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(script, *args, cwd=ROOT):
    r = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", script), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


def test_sleep_engine_example():
    out = run("sleep_engine.py")
    assert "resumed engine continues identically: True" in out
    assert "after a cancelled sleep: 16 tokens still live" in out


def test_train_example(tmp_path):
    out = run("train_rule110.py", "--loops", "2", "--steps", "3", "--out", str(tmp_path / "run"))
    assert "| t (steps) | N = 2 |" in out
