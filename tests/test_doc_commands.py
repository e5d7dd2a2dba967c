"""Every mlx-sleep command in the README and docs/ runs as written, offline, on tiny models.

Each page's fenced bash blocks (and its inline commands with flags) are read in order and run
through the real CLI in this process. Block by block: a fresh working directory per block (a
block is a recipe of its own), one MLX_SLEEP_HOME per page (the session commands of one block
see the chat of the one before). What a command names and the block does not make is put there
first: `jet-2b` is a tiny converted Jet-Nemotron, `train.jsonl` a few GSM-Infinite records, and
so on. Hub ids are answered from tests/fixtures by a stand-in for huggingface_hub.

Only sizes change (SMALLER: steps, problem counts, a tiny model's block range) and every
command either runs and exits 0 or is in SKIPPED with the reason; a command added to the docs
is run by this test the day it is written."""

import json
import os
import re
import shlex
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from mlx_sleep.cli import main

from .tiny_models import FIXTURES, make_model_dir, write_tokenizer

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# Commands the docs show that cannot run here, each with why (and what covers it instead).
SKIPPED = {
    "pip install -e . && mlx-sleep demo": "the README's set-up command (about 26 minutes; test_demo)",
    "mlx-sleep demo --seed 5": "five seeds of the demo, about 26 minutes (test_demo runs it shortened)",
    "mlx-sleep demo [--steps K] [-N 1 -N 4]": "a synopsis, not a command",
    "mlx-sleep convert -N -L --eviction --core": "a list of flags, not a command",
    "mlx-sleep eval --task gsm-infinite": "names the task, not a command",
    "mlx-sleep consolidate --all --when-idle": "waits for an idle machine (test_chat's idle tests)",
    "mlx-sleep schedule install": "installs into the user's launchd/systemd (test_chat, fake home)",
    "mlx-sleep schedule remove": "removes from the user's launchd/systemd (test_chat, fake home)",
    "mlx-sleep finetune --model jet-2b ... --full --lr 1e-3 --adam-lr 5e-5": "elides its flags",
    "--paper": "the paper's full model and batch: a Mac GPU's memory (test_train checks the settings)",
    "mlx-sleep serve --model": "serves until Ctrl-C (test_serve drives the real server with openai)",
    "mlx-sleep chat --session NAME": "prose naming a placeholder",
    "mlx.launch": "several processes or machines (test_finetune runs the two-process ring)",
}

# Sizes for two CPU cores: (pattern, replacement), applied in order to every command.
SMALLER = [
    (r"--steps \d+", "--steps 2"),
    (r"--hard-warmup \d+", "--hard-warmup 1"),
    (r"--limit \d+", "--limit 1"),
    (r"--grad-accum \d+", "--grad-accum 2"),
    (r"--ops 2-30", "--ops 2"),  # 29 op counts of the hard subset
    (r"--protocol official --subset (hard|medium)", r"\g<0> --limit 20"),  # the least it takes
    (r"--ops 1-10", "--ops 1-2"),
    (r"--core 4:24", "--core 1:5"),  # the tiny Jet-Nemotron has 6 blocks
    (r"--insert-jet-layers 6", "--insert-jet-layers 2"),  # the tiny Ouro has 3
]
# Added where the command leaves a size at its default.
DEFAULT_SIZES = {
    "train": ["--steps", "2", "--batch-size", "4", "--eval-samples", "8"],
    "finetune": ["--steps", "2"],
    "eval --checkpoint": ["--samples", "8", "--batch-size", "8"],
    "eval --model": ["--limit", "1", "--max-tokens", "4", "--judge-max-tokens", "4"],
    "generate": ["--max-tokens", "4"],
    "chat": ["--max-tokens", "4"],
}


def page_blocks(page: Path):
    """[(line, [command, ...])] for each fenced bash block, then the inline `mlx-sleep ...`
    commands with flags, one block each. Continuations are joined, comments dropped; a
    `for v in a b; do ...; done` loop is unrolled."""
    text = page.read_text()
    blocks = []
    for m in re.finditer(r"^```(?:bash|sh|console)\n(.*?)^```", text, re.S | re.M):
        line = text[: m.start()].count("\n") + 1
        body = m.group(1).replace("\\\n", " ")
        commands, loop = [], None
        for raw in body.splitlines():
            command = re.sub(r"\s+#.*$|^\s*#.*$", "", raw).strip()
            if not command:
                continue
            head = re.fullmatch(r"for (\w+) in ([^;]+); do", command)
            if head:
                loop = (head.group(1), head.group(2).split(), [])
            elif command == "done":
                name, values, body_commands = loop
                commands += [c.replace(f"${name}", v) for v in values for c in body_commands]
                loop = None
            else:
                (loop[2] if loop else commands).append(command)
        blocks.append((line, commands))
    prose = re.sub(r"^```.*?^```", lambda m: "\n" * m.group(0).count("\n"), text, flags=re.S | re.M)
    for m in re.finditer(r"`([^`\n]*mlx-sleep [^`\n]*-[^`\n]*)`", prose):
        if "written_by" not in m.group(1):  # a JSON field quoted in docs/files.md
            blocks.append((prose[: m.start()].count("\n") + 1, [m.group(1)]))
    return blocks


def skip_reason(command: str):
    return next((why for key, why in SKIPPED.items() if key in command), None)


# -- the machine the docs assume ---------------------------------------------------------------


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    """What a doc command may name without making it: tiny models, adapters, data, a Hub."""
    root = tmp_path_factory.mktemp("library")
    hub = root / "hub"
    for repo, fixture in [
        ("jet-ai/Jet-Nemotron-2B", "jet-nemotron-tiny"),
        ("ByteDance/Ouro-1.4B", "ouro-tiny"),
    ]:
        shutil.copytree(FIXTURES / fixture, hub / repo)
        write_tokenizer(hub / repo)
    made = root / "made"
    make_model_dir(made / "jet-2b", "jet_nemotron", window=64)
    make_model_dir(made / "ouro-jet", "ouro_jet", window=64)
    make_model_dir(made / "qwen-judge", "qwen3_5", window=64)
    shutil.copytree(FIXTURES / "jet-nemotron-tiny", made / "local-checkpoint")
    write_tokenizer(made / "local-checkpoint")
    gsm = {
        kind: [json.loads(l) for l in open(FIXTURES / "gsm-infinite" / f"{kind}_0.jsonl")]
        for kind in ("medium", "symbolic")
    }  # the short problems (length 0), shortened again: the last 200 characters of each text
    for rows in gsm.values():
        for r in rows:
            r["problem"] = r["problem"][-200:]
            r["messages"] = [dict(m, content=m["content"][-200:]) for m in r["messages"]]
    train = [{"prompt": r["question"], "answer": str(r["solution"])[:20]} for r in gsm["medium"]]
    for name in ("train.jsonl", "valid.jsonl", "gsm-train.jsonl", "gsm-valid.jsonl"):
        (made / name).write_text("".join(json.dumps(r) + "\n" for r in train))
    for model, adapters in [("jet-2b", "jet-2b-gsm"), ("ouro-jet", "ouro-jet-gsm")]:
        run = root / f"{model}-run"
        args = ["finetune", "--model", made / model, "--data", made / "train.jsonl"]
        assert cli(*args, "--out", run, "--steps", "1", "--valid-every", "0").exit_code == 0
        shutil.copytree(run / "checkpoint", made / adapters)
        for n in (1, 4, 6):
            shutil.copytree(run / "checkpoint", made / f"{adapters}-n{n}")
    eval_run = root / "eval-run"
    r = cli(
        "eval",
        "--model",
        made / "jet-2b",
        "--task",
        "gsm-infinite",
        "--data",
        FIXTURES / "gsm-infinite" / "medium_0.jsonl",
        "--ops",
        "2",
        "--limit",
        "1",
        "--out",
        eval_run,
    )
    assert r.exit_code == 0, r.output
    shutil.copy(eval_run / "predictions.jsonl", made / "their_predictions.jsonl")
    return dict(hub=hub, made=made, **gsm)


@pytest.fixture
def offline_hub(library, monkeypatch):
    """huggingface_hub answered from tests/fixtures: models by id; GSM-Infinite datasets as
    parquet splits of 201 rows for any op count (the fixture's short problems relabelled; the
    parquet reader stands in for pyarrow, which the tests do not install)."""
    import sys
    import types

    import huggingface_hub

    def snapshot_download(repo_id, **kw):
        path = library["hub"] / repo_id
        if not path.is_dir():
            raise FileNotFoundError(f"{repo_id} is not in the test's hub")
        return str(path)

    def hf_hub_download(repo_id, filename, repo_type=None, **kw):
        if repo_type == "dataset":
            return f"{repo_id}/{filename}"
        return os.path.join(snapshot_download(repo_id), filename)

    def read_table(path):
        symbolic = "symbolic" in path
        rows = library["symbolic" if symbolic else "medium"]
        op = int(re.search(r"ops_(\d+)", path).group(1))
        # 201 rows: `data gsm-infinite` leaves out the first 200 (the evaluation's)
        split = [dict(rows[i % len(rows)], op=op, id=i) for i in range(201)]
        return types.SimpleNamespace(to_pylist=lambda: split)

    class HfApi:
        def list_repo_files(self, repo, repo_type=None):
            return [f"data/ops_{op}.parquet" for op in range(1, 41)]

    parquet = types.ModuleType("pyarrow.parquet")
    parquet.read_table = read_table
    monkeypatch.setitem(sys.modules, "pyarrow", types.ModuleType("pyarrow"))
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", parquet)
    monkeypatch.setattr(huggingface_hub, "HfApi", HfApi)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)


def cli(*args, input=None):
    return CliRunner().invoke(main, [str(a) for a in args], input=input)


def prepared(command: str):
    """(argv after `mlx-sleep`, stdin) of a doc command, at test sizes."""
    stdin = None
    piped = re.fullmatch(r"printf '([^']*)' \| (.*)", command)
    if piped:
        stdin = piped.group(1).encode().decode("unicode_escape")
        command = piped.group(2)
    for pattern, replacement in SMALLER:
        command = re.sub(pattern, replacement, command)
    argv = shlex.split(command)
    assert argv[0] == "mlx-sleep", command
    argv = argv[1:]
    for prefix, sizes in DEFAULT_SIZES.items():
        if " ".join(argv).startswith(prefix):
            for flag, value in zip(sizes[::2], sizes[1::2]):
                if flag not in argv:
                    argv += [flag, value]
    if argv[0] == "chat" and stdin is None:
        stdin = "hello\n"
    return argv, stdin


def provide(argv, made: Path, home: Path):
    """Copy into the working directory every library item the command names that the block has
    not made; a session that `consolidate` or `sessions` names is first chatted into being."""
    cwd = Path.cwd()
    for flag, word in zip([""] + argv, argv):
        name = word.rstrip("/").removeprefix("./")
        if flag in ("--out", "-o"):  # what the command makes
            continue
        if flag in ("--session", "-s") and argv[0] != "chat":
            if not (home / "sessions" / name).exists():
                shutil.copytree(made / "jet-2b", cwd / "jet-2b", dirs_exist_ok=True)
                args = ["chat", "--model", cwd / "jet-2b", "-s", name, "-m", "2"]
                assert cli(*args, input="hello\n").exit_code == 0
        if (made / name).exists() and not (cwd / name).exists():
            if (made / name).is_dir():
                shutil.copytree(made / name, cwd / name)
            else:
                shutil.copy(made / name, cwd / name)


BLOCKS = [(page, line, commands) for page in PAGES for line, commands in page_blocks(page)]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_doc_command_runs_as_written(page, library, offline_hub, tmp_path, monkeypatch):
    monkeypatch.setenv("MLX_SLEEP_HOME", str(tmp_path / "home"))
    ran = 0
    for i, (line, commands) in enumerate(page_blocks(page)):
        (tmp_path / f"block{i}").mkdir()
        monkeypatch.chdir(tmp_path / f"block{i}")
        for command in commands:
            if skip_reason(command):
                continue
            if command.startswith("python -c "):
                exec(shlex.split(command)[2], {})
                ran += 1
                continue
            if "mlx-sleep" not in command:
                continue
            argv, stdin = prepared(command)
            provide(argv, library["made"], tmp_path / "home")
            r = cli(*argv, input=stdin)
            assert r.exit_code == 0, f"{page.name}:{line}: {command}\n{r.output}"
            ran += 1
    assert ran or all(skip_reason(c) for _, cs in page_blocks(page) for c in cs if "mlx-sleep" in c)


def test_every_skip_still_names_a_doc_command():
    """A stale entry would hide nothing, but it would claim a reason for a command that is gone."""
    commands = [c for _, _, cs in BLOCKS for c in cs]
    for key in SKIPPED:
        assert any(key in c for c in commands), f"no doc command contains {key!r} any more"


def test_the_reader_finds_blocks_loops_and_inline_commands(tmp_path):
    page = tmp_path / "p.md"
    page.write_text(
        "Run `mlx-sleep generate --model m -p hi` now.\n\n```bash\n"
        "mlx-sleep a --x 1 \\\n    --y 2   # comment\n# only a comment\n"
        "for n in 1 6; do\n  mlx-sleep eval -N $n\ndone\n```\n"
    )
    assert page_blocks(page) == [
        (3, ["mlx-sleep a --x 1      --y 2", "mlx-sleep eval -N 1", "mlx-sleep eval -N 6"]),
        (1, ["mlx-sleep generate --model m -p hi"]),
    ]
