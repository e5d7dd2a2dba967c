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
    (["eval", "--model", "m", "--task", "gsm-infinite", "--out", "o"], ["--json", "r.json"], "--json"),
    (["eval", "--model", "m", "--task", "gsm-infinite", "--out", "o"], ["--plot", "p.png"], "--plot"),
    (["eval", "--model", "m", "--task", "gsm-infinite", "--out", "o"], ["--samples", "3"], "--samples"),
    (["eval", "--model", "m", "--task", "gsm-infinite", "--out", "o"], ["--seed", "3"], "--seed"),
    (["eval", "--model", "m", "--task", "gsm-infinite", "--out", "o"], ["--checkpoint", "r"], "--checkpoint"),
    (["eval", "--score", "p.jsonl"], ["--loops", "2"], "--loops"),
    (["eval", "--score", "p.jsonl"], ["--model", "m"], "--model"),
    (["eval", "--score", "p.jsonl"], ["--ops", "2"], "--ops"),
    (["convert", "--hf-path", "h", "--out", "o"], ["--q-bits", "8"], "--q-bits"),
    (["convert", "--hf-path", "h", "--out", "o"], ["--q-group-size", "32"], "--q-group-size"),
    (["finetune", "--model", "m", "--data", "d", "--out", "o", "--full"], ["--rank", "4"], "--rank"),
    (["finetune", "--model", "m", "--data", "d", "--out", "o", "--full"], ["--dropout", "0.1"], "--dropout"),
    (["finetune", "--model", "m", "--data", "d", "--out", "o"], ["--adam-lr", "1e-3"], "--adam-lr"),
    (["finetune", "--model", "m", "--data", "d", "--out", "o", "--estimate"], ["--fuse"], "--fuse"),
    (["train", "--task", "rule110", "--out", "o", "--paper"], ["--hidden-size", "64"], "--hidden-size"),
    (["train", "--task", "rule110", "--out", "o", "--paper"], ["--batch-size", "8"], "--batch-size"),
    (["data", "gsm-infinite", "--out", "o.jsonl", "--data", "d.jsonl"], ["--subset", "hard"], "--subset"),
    (["consolidate", "--all"], ["--max-wait", "5"], "--max-wait"),
    (["consolidate", "--all"], ["--idle-source", "load"], "--idle-source"),
]


@pytest.mark.parametrize("base, extra, flag", UNUSED, ids=lambda v: " ".join(v) if isinstance(v, list) else v)
def test_a_flag_that_does_nothing_is_refused(tmp_path, monkeypatch, base, extra, flag):
    monkeypatch.chdir(tmp_path)  # nothing may be written, and nothing here to read
    r = CliRunner().invoke(main, base + extra)
    assert r.exit_code == 2, r.output
    assert f"{flag} does nothing" in r.output and "Traceback" not in r.output, r.output
    assert list(tmp_path.iterdir()) == []


def test_every_eval_flag_belongs_to_a_path():
    """A flag added to eval must be given to a path (and so refused on the others)."""
    eval_cmd = main.commands["eval"]
    known = (train_cli.RUN_FLAGS | train_cli.GSM_FLAGS | train_cli.SCORE_FLAGS
             | train_cli.SLEEP_FLAGS | {"help"})
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
    one_path = {"demo", "doctor", "generate", "chat", "sessions list", "sessions show",
                "sessions export", "sessions rm", "schedule install", "schedule remove"}
    assert set(commands(main)) == with_paths | one_path
    walked = {" ".join(b[:2]) if b[0] == "data" else b[0] for b, _, _ in UNUSED}
    assert walked == with_paths
