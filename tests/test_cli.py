"""The command line: train -> eval round trip, the demo at a tiny size, doctor, clear errors."""

import json
import os

import pytest
from click.testing import CliRunner

from mlx_sleep.cli import main
from tests.numerics import assert_close

TINY = [
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
    "3",
    "--batch-size",
    "8",
    "--eval-samples",
    "16",
]


def run(*args):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_train_then_eval(tmp_path):
    out = tmp_path / "run"
    r = run("train", *TINY, "--loops", "2", "--out", str(out))
    assert r.exit_code == 0, r.output
    r = run(
        "eval",
        "--checkpoint",
        str(out),
        "--samples",
        "16",
        "--json",
        str(tmp_path / "r.json"),
        "--plot",
        str(tmp_path / "r.png"),
    )
    assert r.exit_code == 0, r.output
    assert "| t (steps) | N = 2 exact |" in r.output
    saved = json.load(open(tmp_path / "r.json"))
    assert saved["sleep"]["loops"] == 2 and set(saved["results"]) == {"1"}
    assert (tmp_path / "r.png").stat().st_size > 1000
    r = run("eval", "--checkpoint", str(out), "--samples", "8", "--loops", "4")
    assert r.exit_code == 0 and "N = 4" in r.output
    # --tolerance: sleep as deep as it helps, at most --loops; 0 never stops early, a huge one
    # stops after pass 2 (the first that can be compared), and each says how deep it slept
    for tolerance, passes in (("0", "4.00"), ("1e6", "2.00")):
        r = run(
            "eval", "--checkpoint", str(out), "--samples", "8", "-N", "4", "--tolerance", tolerance
        )
        assert r.exit_code == 0 and f"| N = 4 | {passes} |" in r.output, r.output


def test_sampled_loops_then_eval_at_several_n(tmp_path):
    out = tmp_path / "run"
    r = run("train", *TINY, "--loops-sample", "1:3", "--out", str(out))
    assert r.exit_code == 0, r.output
    saved = json.load(open(out / "config.json"))
    assert saved["train"]["loops_sample"] == [1, 3] and saved["sleep"]["loops"] == 3
    r = run(
        "eval",
        "--checkpoint",
        str(out),
        "--samples",
        "16",
        "--loops",
        "1,2,4",
        "--json",
        str(tmp_path / "r.json"),
        "--plot",
        str(tmp_path / "n.png"),
    )
    assert r.exit_code == 0, r.output
    assert "| t (steps) | N = 1 | N = 2 | N = 4 |" in r.output
    saved = json.load(open(tmp_path / "r.json"))
    assert saved["loops"] == [1, 2, 4] and set(saved["results"]) == {"N = 1", "N = 2", "N = 4"}
    assert set(saved["results"]["N = 4"]) == {"1"}
    assert (tmp_path / "n.png").stat().st_size > 1000
    for bad, says in (
        ("0,1", "is not a list of loop counts in 1..1024"),
        ("a", "is not a list of loop counts"),
    ):
        r = CliRunner().invoke(main, ["eval", "--checkpoint", str(out), "--loops", bad])
        assert r.exit_code != 0 and says in r.output


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--loops-sample", "3:1"], "loops_sample must be LO:HI with 1 <= LO <= HI"),
        (["--loops-sample", "x"], "'x' is not A:B"),
        (["--loops", "0"], "'--loops' / '-N': 0 is not in the range 1<=x<=1024"),
        (["--window", "0"], "'--window' / '-L': 0 is not in the range x>=1"),
        (["--window", "1000"], "larger than the task's sequence length"),
        (["-o", "n_bits=1"], "n_bits must be >= 3"),
        (["-o", "nonsense"], "is not KEY=VALUE"),
        (["--layers", "attn,lstm"], "unknown layer type"),
        (["--core", "3:1"], "core must be START:STOP"),
        (["--core", "x"], "is not START:STOP"),
    ],
)
def test_bad_settings_give_one_clear_line(tmp_path, extra, message):
    r = CliRunner().invoke(main, ["train", *TINY, "--out", str(tmp_path / "o"), *extra])
    assert r.exit_code != 0
    assert message in r.output, r.output
    assert "Traceback" not in r.output


def test_eval_of_a_directory_that_is_not_a_run(tmp_path):
    r = CliRunner().invoke(main, ["eval", "--checkpoint", str(tmp_path)])
    assert r.exit_code == 1 and "not a training run" in r.output
    assert "Traceback" not in r.output


def test_demo_at_a_tiny_size(tmp_path):
    r = run(
        "demo",
        "--out",
        str(tmp_path),
        "--steps",
        "2",
        "-N",
        "1",
        "-N",
        "2",
        "--seed",
        "3",
        "--seeds",
        "2",
    )
    assert r.exit_code == 0, r.output
    assert "| k (hops) | N = 1 | N = 2 |" in r.output and "| 4 |" in r.output  # seed rows 3, 4
    assert "N = 2 - N = 1 at k = 2: mean" in r.output
    assert "N = 2 - N = 1, 2x steps at k = 2: mean" in r.output  # compute-matched
    results = json.load(open(tmp_path / "results.json"))
    assert results["seeds"] == [3, 4] and {"mlx", "blas", "cpu"} <= set(results["platform"])
    assert set(results["results"]) == {"N = 1", "N = 2", "N = 1, 2x steps"}
    trained = json.load(open(tmp_path / "seed4" / "N1x2" / "config.json"))
    assert trained["train"]["steps"] == 4 and trained["sleep"]["loops"] == 1
    cell = results["results"]["N = 2"]["2"]
    assert {"token", "exact", "count"} <= set(cell) and len(cell["token_by_seed"]) == 2
    assert_close(cell["token"], sum(cell["token_by_seed"]) / 2, rtol=1e-12, what="mean over seeds")
    assert (tmp_path / "accuracy.png").exists()
    assert sorted(os.listdir(tmp_path / "seed4")) == ["N1", "N1x2", "N2"]


def test_doctor():
    r = run("doctor")
    assert r.exit_code == 0
    assert "mlx " in r.output and "matmul" in r.output
