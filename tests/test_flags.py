"""No flag is silently ignored: a flag that does nothing on the path a command takes is refused
with one line naming it (exit 2), before any work."""

import pytest
from click.testing import CliRunner

from mlx_sleep.cli import main
from mlx_sleep.cli import train as train_cli

# (command line, a flag that does nothing there, the flag named in the error)
UNUSED = [
    (["eval", "--checkpoint", "run"], ["--subset", "hard"], "--subset"),
    (["eval", "--checkpoint", "run"], ["--out", "o"], "--out"),
    (["eval", "--checkpoint", "run"], ["--adapter", "a"], "--adapter"),
    (["eval", "--checkpoint", "run"], ["--protocol", "official"], "--protocol"),
    (
        ["eval", "--model", "m", "--task", "gsm-infinite", "--out", "o"],
        ["--json", "r.json"],
        "--json",
    ),
    (
        ["eval", "--model", "m", "--task", "gsm-infinite", "--out", "o"],
        ["--plot", "p.png"],
        "--plot",
    ),
    (
        ["eval", "--model", "m", "--task", "gsm-infinite", "--out", "o"],
        ["--samples", "3"],
        "--samples",
    ),
    (["eval", "--model", "m", "--task", "gsm-infinite", "--out", "o"], ["--seed", "3"], "--seed"),
    (
        ["eval", "--model", "m", "--task", "gsm-infinite", "--out", "o"],
        ["--tolerance", "0.1"],
        "--tolerance",
    ),
    (
        ["eval", "--model", "m", "--task", "gsm-infinite", "--out", "o"],
        ["--checkpoint", "r"],
        "--checkpoint",
    ),
    (["eval", "--score", "p.jsonl"], ["--loops", "2"], "--loops"),
    (["eval", "--score", "p.jsonl"], ["--model", "m"], "--model"),
    (["eval", "--score", "p.jsonl"], ["--ops", "2"], "--ops"),
    (["convert", "--hf-path", "h", "--out", "o"], ["--q-bits", "8"], "--q-bits"),
    (["convert", "--hf-path", "h", "--out", "o"], ["--q-group-size", "32"], "--q-group-size"),
    (
        ["finetune", "--model", "m", "--data", "d", "--out", "o", "--full"],
        ["--rank", "4"],
        "--rank",
    ),
    (
        ["finetune", "--model", "m", "--data", "d", "--out", "o", "--full"],
        ["--dropout", "0.1"],
        "--dropout",
    ),
    (["finetune", "--model", "m", "--data", "d", "--out", "o"], ["--adam-lr", "1e-3"], "--adam-lr"),
    (["finetune", "--model", "m", "--data", "d", "--out", "o", "--estimate"], ["--fuse"], "--fuse"),
    (
        ["train", "--task", "rule110", "--out", "o", "--paper"],
        ["--hidden-size", "64"],
        "--hidden-size",
    ),
    (
        ["train", "--task", "rule110", "--out", "o", "--paper"],
        ["--batch-size", "8"],
        "--batch-size",
    ),
    (
        ["data", "gsm-infinite", "--out", "o.jsonl", "--data", "d.jsonl"],
        ["--subset", "hard"],
        "--subset",
    ),
    (["consolidate", "--all"], ["--max-wait", "5"], "--max-wait"),
    (["consolidate", "--all"], ["--idle-source", "load"], "--idle-source"),
]


@pytest.mark.parametrize(
    "base, extra, flag", UNUSED, ids=lambda v: " ".join(v) if isinstance(v, list) else v
)
def test_a_flag_that_does_nothing_is_refused(tmp_path, monkeypatch, base, extra, flag):
    monkeypatch.chdir(tmp_path)  # nothing may be written, and nothing here to read
    r = CliRunner().invoke(main, base + extra)
    assert r.exit_code == 2, r.output
    assert f"{flag} does nothing" in r.output and "Traceback" not in r.output, r.output
    assert list(tmp_path.iterdir()) == []


def test_every_eval_flag_belongs_to_a_path():
    """A flag added to eval must be given to a path (and so refused on the others)."""
    eval_cmd = main.commands["eval"]
    known = (
        train_cli.RUN_FLAGS
        | train_cli.GSM_FLAGS
        | train_cli.SCORE_FLAGS
        | train_cli.SLEEP_FLAGS
        | {"help"}
    )
    names = {p.name for p in eval_cmd.params}
    assert names - known == set(), names - known
    for path in (train_cli.RUN_FLAGS, train_cli.GSM_FLAGS, train_cli.SCORE_FLAGS):
        assert path <= names


def test_every_command_is_walked():
    """Each command with more than one path appears in UNUSED; a new command joins this list."""

    def commands(group, prefix=()):
        for name, cmd in group.commands.items():
            if hasattr(cmd, "commands"):
                yield from commands(cmd, prefix + (name,))
            else:
                yield " ".join(prefix + (name,))

    with_paths = {"eval", "convert", "finetune", "train", "data gsm-infinite", "consolidate"}
    one_path = {
        "demo",
        "doctor",
        "generate",
        "chat",
        "serve",
        "sessions list",
        "sessions show",
        "sessions export",
        "sessions rm",
        "schedule install",
        "schedule remove",
    }
    assert set(commands(main)) == with_paths | one_path
    walked = {" ".join(b[:2]) if b[0] == "data" else b[0] for b, _, _ in UNUSED}
    assert walked == with_paths


# -- every value checked where it enters (one type per kind of flag: cli/common.py) -------------

GEN = ["generate", "--model", "m", "-p", "hi"]
CHAT = ["chat", "--model", "m", "-s", "x"]
FT = ["finetune", "--model", "m", "--data", "d.jsonl", "--out", "o"]
GSM = ["eval", "--model", "m", "--task", "gsm-infinite", "--data", "d.jsonl"]
BAD_VALUES = [  # the list, then the rest of each kind
    (GEN, ["--temp", "-1"], "'--temp': -1 is not >= 0"),
    (GEN, ["--temp", "nan"], "'--temp': 'nan' is not a finite number"),
    (GEN, ["--temp", "inf"], "'--temp': 'inf' is not a finite number"),
    (GEN, ["--top-p", "-0.5"], "'--top-p': -0.5 is not in [0, 1]"),
    (GEN, ["--top-p", "2"], "'--top-p': 2 is not in [0, 1]"),
    (GEN, ["--top-p", "nan"], "'--top-p': 'nan' is not a finite number"),
    (GEN, ["--top-k", "-1"], "'--top-k': -1 is not in the range x>=0"),
    (GEN, ["--min-p", "-1"], "'--min-p': -1 is not in [0, 1]"),
    (GEN, ["--min-p", "2"], "'--min-p': 2 is not in [0, 1]"),
    (GEN, ["--repetition-penalty", "0"], "'--repetition-penalty': 0 is not > 0"),
    (GEN, ["--repetition-penalty", "nan"], "'--repetition-penalty': 'nan' is not a finite"),
    (GEN, ["-m", "-1"], "'--max-tokens' / '-m': -1 is not in the range x>=1"),
    (GEN, ["--max-tokens", "-5"], "'--max-tokens' / '-m': -5 is not in the range x>=1"),
    (GEN, ["--seed", "-1"], "'--seed': -1 is not in the range 0<=x<=2147483647"),
    (GEN, ["--seed", "18446744073709551616"], "'--seed': 18446744073709551616 is not in the"),
    (GEN, ["--window", "0"], "'--window' / '-L': 0 is not in the range x>=1"),
    (GEN, ["--loops", "2000"], "'--loops' / '-N': 2000 is not in the range 1<=x<=1024"),
    (CHAT, ["--history", "-1"], "'--history': -1 is not in the range 0<=x<=64"),
    (CHAT, ["--idle-fill", "-1"], "'--idle-fill': -1 is not in [0, 1]"),
    (CHAT, ["--idle-fill", "2"], "'--idle-fill': 2 is not in [0, 1]"),
    (CHAT, ["--idle-fill", "nan"], "'--idle-fill': 'nan' is not a finite number"),
    (["eval", "--checkpoint", "r"], ["--tolerance", "nan"], "'--tolerance': 'nan' is not a finite"),
    (["eval", "--checkpoint", "r"], ["--tolerance", "-1"], "'--tolerance'"),
    (CHAT, ["--idle-delay", "nan"], "'--idle-delay': 'nan' is not a finite number"),
    (CHAT, ["--idle-delay", "inf"], "'--idle-delay': 'inf' is not a finite number"),
    (FT, ["--valid-batches", "-1"], "'--valid-batches': -1 is not in the range x>=0"),
    (FT, ["--train-only", ""], "'--train-only': must not be empty"),
    (FT, ["--seed", "-1"], "'--seed': -1 is not in the range 0<=x<=2147483647"),
    (FT, ["--rank", "0"], "'--rank': 0 is not in the range x>=1"),
    (FT, ["--dropout", "1"], "'--dropout': 1 is not in [0, 0.999]"),
    (FT, ["--lr", "0"], "'--lr': 0 is not > 0"),
    (FT, ["--lora-layers", "0"], "'--lora-layers': 0 is not in the range x>=1"),
    (FT, ["--memory-bound", "layer"], "'--memory-bound': 'layer' is not one of 'chunk', 'block'"),
    (
        FT,
        ["--memory-bounded", "--memory-bound", "block"],
        "--memory-bounded is --memory-bound chunk",
    ),
    (FT, ["--no-memory-bounded", "--memory-bound", "chunk"], "--no-memory-bounded is --memory-"),
    (
        ["train", "--task", "rule110", "--out", "r"],
        ["--activation-checkpoint", "--memory-bound", "block"],
        "--activation-checkpoint is --memory-bound chunk, not block",
    ),
    (
        ["train", "--task", "rule110", "--out", "r"],
        ["--checkpoint-every", "0"],
        "'--checkpoint-every': 0 is not in the range x>=1",
    ),
    (["eval", "--checkpoint", "r"], ["--loops", "1,,"], "'1,,' is not a list of loop counts"),
    (["eval", "--checkpoint", "r"], ["--json", ""], "'--json': must be a non-empty path"),
    (["eval", "--checkpoint", "r"], ["--plot", ""], "'--plot': must be a non-empty path"),
    (
        ["data", "gsm-infinite", "--out", "o.jsonl"],
        ["--limit", "-1"],
        "'--limit': -1 is not in the range x>=0",
    ),
    (
        ["data", "gsm-infinite", "--out", "o.jsonl"],
        ["--skip", "-1"],
        "'--skip': -1 is not in the range x>=0",
    ),
    (GSM, ["--limit", "-1"], "'--limit': -1 is not in the range x>=0"),
    (GSM, ["--max-tokens", "0"], "'--max-tokens': 0 is not in the range x>=1"),
    (
        ["convert", "--hf-path", "h", "--out", "o", "-q"],
        ["--q-bits", "7"],
        "'--q-bits': '7' is not",
    ),
    (["consolidate", "--all", "--when-idle"], ["--poll", "0"], "'--poll': 0 is not > 0"),
    (["schedule", "install"], ["--interval", "5"], "'--interval': 5 is not in the range x>=60"),
    (["serve", "--model", "m"], ["--port", "70000"], "'--port': 70000 is not in the range 0<=x<="),
    (["serve", "--model", "m"], ["--queue", "-1"], "'--queue': -1 is not in the range 0<=x<="),
    (["serve", "--model", "m"], ["--max-sessions", "0"], "'--max-sessions': 0 is not in the"),
    (["serve", "--model", "m"], ["--idle-fill", "2"], "'--idle-fill': 2 is not in [0, 1]"),
    (["serve", "--model", "m"], ["--api-key", ""], "'--api-key': must not be empty"),
    (["serve", "--model", "m"], ["--temp", "nan"], "'--temp': 'nan' is not a finite number"),
]


@pytest.mark.parametrize(
    "base, extra, message", BAD_VALUES, ids=lambda v: " ".join(v) if isinstance(v, list) else None
)
def test_a_bad_value_is_one_line_naming_the_flag(tmp_path, monkeypatch, base, extra, message):
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(main, base + extra)
    lines = r.output.strip().splitlines()
    assert r.exit_code == 2 and len(lines) == 1 and lines[0].startswith("Error: "), r.output
    assert message in lines[0] and "--help' lists the flags" in lines[0], r.output
    assert list(tmp_path.iterdir()) == []


def test_values_that_need_the_model_or_stdin(tmp_path, monkeypatch):
    """--lora-layers past the model's layers and a --rank past the machine's memory are refused
    before any adapter is allocated (a 10^9 rank crashed MLX); binary stdin for -p - is one line."""
    from .tiny_models import make_model_dir

    monkeypatch.chdir(tmp_path)
    model = make_model_dir(tmp_path / "m")
    (tmp_path / "d.jsonl").write_text('{"prompt": "a b", "answer": " c"}\n' * 4)
    before = sorted(p.name for p in tmp_path.iterdir())
    for extra, message in (
        (["--lora-layers", "1000"], "more than this model's 4 decoder layers"),
        (["--rank", "1000000000"], "more than this machine's"),
        (["--rank", "1000000000", "--estimate"], "more than this machine's"),
    ):
        r = CliRunner().invoke(
            main, ["finetune", "--model", model, "--data", "d.jsonl", "--out", "o", *extra]
        )
        assert r.exit_code == 1 and r.output.count("\n") == 1 and message in r.output, r.output
    r = CliRunner().invoke(
        main, ["generate", "--model", model, "-p", "-"], input=b"\xa3\xff binary"
    )
    assert r.exit_code == 1 and "standard input is not UTF-8 text" in r.output, r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == before
