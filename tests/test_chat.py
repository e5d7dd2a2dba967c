"""Chat, sessions and idle consolidation, driven through the real command line (a pty via pexpect
for the interactive chat, pipes for scripted chats, click's runner for the one-shot commands),
on a tiny hybrid model with a byte-level tokenizer and a ChatML template built here."""

import hashlib
import io
import json
import os
import re
import signal
import stat
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pexpect
import pytest
from click.testing import CliRunner

import mlx_sleep
from mlx_sleep.chat import Chat
from mlx_sleep.cli import main
from mlx_sleep.generate import Reply, generate_text, stream_reply
from mlx_sleep.idle import (
    file_source,
    idle_source,
    launchd_plist,
    on_ac_power,
    systemd_units,
    thermally_throttled,
)
from mlx_sleep.session import SessionError, open_session, weights_hash

from .numerics import assert_close
from .test_sleep import assert_trees_close
from .tiny_models import make_model_dir

CLI = [sys.executable, "-m", "mlx_sleep.cli"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {
        "small": make_model_dir(root / "small", "hybrid", loops=2, window=16),
        "other": make_model_dir(root / "other", "qwen3_5", loops=2, window=16),
    }


@pytest.fixture
def home(tmp_path, monkeypatch):
    path = str(tmp_path / "home")
    monkeypatch.setenv("MLX_SLEEP_HOME", path)
    return path


def env_with(home):
    # a pty under pexpect answers no cursor-position request: prompt_toolkit is told not to ask
    return {
        **os.environ,
        "MLX_SLEEP_HOME": home,
        "PYTHONUNBUFFERED": "1",
        "PROMPT_TOOLKIT_NO_CPR": "1",
    }


def cli(home, *args, input=None, timeout=300):
    return subprocess.run(
        CLI + list(args),
        input=input,
        capture_output=True,
        text=True,
        env=env_with(home),
        timeout=timeout,
    )


def spawn(home, *args):
    return pexpect.spawn(
        CLI[0],
        CLI[1:] + list(args),
        env=env_with(home),
        encoding="utf-8",
        codec_errors="replace",
        timeout=120,
        dimensions=(50, 400),
        logfile=open(os.environ["CHAT_LOG"], "a") if "CHAT_LOG" in os.environ else None,
    )


def snapshot_files(path):
    """{file: (sha256, mode)} of a directory tree: 'untouched' means this is unchanged."""
    out = {}
    for root, _, files in os.walk(path):
        for f in files:
            p = os.path.join(root, f)
            out[os.path.relpath(p, path)] = (
                hashlib.sha256(open(p, "rb").read()).hexdigest(),
                os.stat(p).st_mode,
            )
    return out


def load(models, name, kind="small"):
    model, _ = mlx_sleep.load(models[kind])
    return open_session(name, model, models[kind], create=False, lock=False)


def chat_here(models, name, lines, max_tokens=10):
    """The chat loop in this process (what the CLI runs), on a pipe: cheaper than a process."""
    model, tokenizer = mlx_sleep.load(models["small"])
    session = open_session(name, model, models["small"])
    r, w = os.pipe()
    os.write(w, ("\n".join(lines) + "\n").encode())
    os.close(w)
    Chat(session, tokenizer, out=io.StringIO(), max_tokens=max_tokens, idle_delay=0).run(fd=r)
    os.close(r)
    session.close()


def saved_arrays(home, name):
    meta = json.load(open(os.path.join(home, "sessions", name, "session.json")))
    return meta, mx.load(os.path.join(home, "sessions", name, meta["state_file"]))


# -- generation ---------------------------------------------------------------------------------


def test_generate_cli_streams_the_python_functions_greedy_reply(models, home):
    r = cli(home, "generate", "--model", models["small"], "-p", "Hello there", "-m", "24")
    assert r.returncode == 0, r.stderr
    model, tokenizer = mlx_sleep.load(models["small"])
    expected = generate_text(model, tokenizer, "Hello there", max_tokens=24)
    assert r.stdout == expected + "\n"
    assert re.search(
        r"\[\d+ prompt tokens at [\d.]+ tok/s, 24 generated at [\d.]+ tok/s, "
        r"peak memory [\d.]+ [MG]B, stopped: max_tokens, \d+ consolidations?\]",
        r.stderr,
    ), r.stderr
    assert "Traceback" not in r.stderr


def test_stop_flags_take_escapes_as_typed_in_a_shell():
    """docs/chat.md's `--stop "\\n\\n"`: the shell passes a backslash and an n."""
    from mlx_sleep.cli.common import unescape_stops

    typed = ("\\n\\n", "a\\\\n", "\\t|\\x", "é\\r")
    assert unescape_stops(None, None, typed) == ("\n\n", "a\\n", "\t|\\x", "é\r")


def test_stop_strings_and_interruption(models):
    model, tokenizer = mlx_sleep.load(models["small"])
    full = generate_text(model, tokenizer, "abc", max_tokens=30, chat_template=False)
    stop = full[10:13]  # a string the greedy reply contains
    cut = generate_text(model, tokenizer, "abc", max_tokens=30, chat_template=False, stop=[stop])
    assert cut == full[: full.find(stop)]
    # interrupted after 5 tokens: 5 tokens kept, all 5 fed (each is fed before it is yielded)
    engine = mlx_sleep.SleepEngine(model)
    reply = Reply()
    ids = tokenizer.encode("abc", add_special_tokens=False)
    text = "".join(
        stream_reply(
            engine, tokenizer, ids, 30, interrupted=lambda: len(reply.tokens) >= 5, reply=reply
        )
    )
    assert reply.stopped == "interrupted" and len(reply.tokens) == 5
    assert engine.offset == len(ids) + 5 and text == tokenizer.decode(reply.tokens)
    # seeded sampling through mlx-lm's sampler is reproducible
    runs = [
        generate_text(model, tokenizer, "abc", max_tokens=12, temp=1.0, top_p=0.9, seed=3)
        for _ in range(2)
    ]
    assert runs[0] == runs[1]


# -- the interactive chat -----------------------------------------------------------------------


def test_chat_commands_forced_sleep_ctrl_c_idle_sleep_and_sigkill_in_a_reply(models, home):
    chat = spawn(
        home,
        "chat",
        "--model",
        models["small"],
        "-s",
        "a",
        "-m",
        "100000",
        "--idle-delay",
        "3",
        # any token in the window makes it due: where the Ctrl-C below lands (in a forced sleep,
        # or after it, a few tokens into the next window) depends on the machine's speed
        "--idle-fill",
        "0.05",
    )
    chat.expect_exact(f"model {os.path.abspath(models['small'])}: N = 2, L = 16, hard eviction")
    chat.expect("/help for commands")
    chat.expect_exact(">>>")
    chat.sendline("hello")
    chat.expect_exact("[window full (16 tokens): sleeping, 2 passes; Ctrl-C stops]")  # forced
    chat.expect_exact("[sleeping: pass 2/2]")  # a line per pass
    chat.sendintr()  # Ctrl-C stops the reply (or a later forced sleep), not the session
    chat.expect_exact("[stopped]")
    chat.expect(r"\[slept \d+ times? during this turn")
    chat.expect(
        r"\[\d+ prompt tokens at [\d.]+ tok/s, \d+ generated at [\d.]+ tok/s, "
        r"peak memory [\d.]+ [MG]B\]"
    )
    chat.expect_exact(">>>")
    chat.sendline("/status")
    chat.expect(r"(\d+) tokens seen, window (\d+)/16 .* (\d+) consolidations?")
    seen, sleeps = int(chat.match.group(1)), int(chat.match.group(3))
    assert seen > 16 and sleeps >= 1
    chat.expect("fast weights .* process .* resident")
    chat.sendline("/sleep")
    chat.expect(r"\[sleeping: pass 2/2\]|nothing to consolidate")
    chat.sendline("/forget")
    chat.expect_exact("[forgot the last consolidation")
    chat.sendline("/save")
    chat.expect_exact("[saved session a")
    chat.sendline("/help")
    chat.expect_exact("/forget   roll back")
    chat.sendline("/bogus")
    chat.expect_exact("unknown command /bogus; /help lists them")
    chat.sendline("/reset")
    chat.expect_exact("[memory cleared")
    chat.sendline("/status")
    chat.expect_exact("session a: 0 tokens seen, window 0/16 (0%), 0 consolidations")
    # idle sleep: the window is not empty and nothing is typed for 3 s
    chat.sendline("again")
    chat.expect_exact("[window full")
    chat.sendintr()
    chat.expect_exact("[stopped]")
    chat.expect_exact("[idle: sleeping on the live window]", timeout=60)
    chat.expect_exact("[idle sleep: pass 2/2]")
    chat.expect(r"\[consolidated \d+ tokens; (\d+) consolidations? so far\]")
    chat.sendline("/status")
    chat.expect(r"(\d+) tokens seen, window 0/16 .* (\d+) consolidations?")
    seen, sleeps = int(chat.match.group(1)), int(chat.match.group(2))
    # SIGKILL during a reply: the session saved after the idle sleep loads as it was
    chat.sendline("more")
    chat.expect_exact("[window full")
    os.kill(chat.pid, signal.SIGKILL)
    chat.expect(pexpect.EOF)
    session = load(models, "a")
    assert (session.engine.offset, session.engine.sleeps) == (seen, sleeps)
    assert session.messages[-1]["role"] == "assistant"


def test_idle_sleep_cancelled_by_typing_then_completed_and_sigkill_in_a_sleep(models, home):
    chat = spawn(
        home,
        "chat",
        "--model",
        models["small"],
        "-s",
        "b",
        "-m",
        "6",
        "-N",
        "256",
        "-L",
        "1024",
        "--idle-delay",
        "1",
        "--idle-fill",
        "0.1",
    )
    chat.expect_exact(">>>")
    chat.sendline("hi " * 200)
    chat.expect_exact(">>>")
    chat.expect_exact("[idle sleep: pass 1/256]", timeout=60)
    # typed during the sleep (which is long, so that a loaded machine still types into it):
    # it cancels the sleep between passes and then runs
    chat.sendline("/status")
    chat.expect_exact(
        "[sleep cancelled; the session is as it was, and the next sleep starts again from pass 1]"
    )
    chat.expect(r"(\d+) tokens seen, window (\d+)/1024 \(\d+%\), 0 consolidations")
    seen = int(chat.match.group(1))
    assert int(chat.match.group(2)) == seen
    chat.expect_exact("[idle sleep: pass 256/256]", timeout=900)  # quiet again: it completes
    chat.expect_exact(f"[consolidated {seen} tokens; 1 consolidation so far]")
    chat.sendline("yo " * 50)  # over --idle-fill (10% of L) again
    chat.expect_exact(">>>")
    chat.expect_exact("[idle sleep: pass 1/256]", timeout=60)
    os.kill(chat.pid, signal.SIGKILL)  # during a sleep
    chat.expect(pexpect.EOF)
    session = load(models, "b")
    assert session.engine.sleeps == 1 and session.engine.window_len > 0
    assert session.engine.offset > seen and len(session.messages) == 4


def test_ctrl_c_stops_a_forced_sleep_between_passes_and_the_input_editor(models, home):
    """A forced sleep prints each pass and Ctrl-C stops it between two (the window stays full,
    nothing consolidated); a 10,000-character paste arrives whole; Up recalls the session's own
    turns; Alt-Enter and a triple-quote block give one multi-line turn."""
    chat = spawn(
        home,
        "chat",
        "--model",
        models["small"],
        "-s",
        "t",
        "-m",
        "100000",
        "-N",
        "600",
        "-L",
        "16",
        "--idle-delay",
        "0",
    )
    chat.expect_exact(">>>")
    chat.sendline("hello")
    chat.expect_exact("[sleeping: pass 3/600]")
    chat.sendintr()
    chat.expect_exact("[stopped]")
    chat.expect_exact(">>>")
    chat.sendline("/status")
    chat.expect_exact("window 16/16 (100%), 0 consolidations")
    chat.sendline("/quit")
    chat.expect(pexpect.EOF)
    session = load(models, "t")
    assert (session.engine.window_len, session.engine.sleeps) == (16, 0)
    assert session.messages[-2] == {"role": "user", "content": "hello"}

    chat = spawn(
        home,
        "chat",
        "--model",
        models["small"],
        "-s",
        "t2",
        "-m",
        "1",
        "-N",
        "1",
        "-L",
        "512",
        "--idle-delay",
        "0",
    )
    chat.expect_exact(">>>")
    chat.sendline("hello")
    chat.expect("peak memory")
    chat.expect_exact(">>>")
    chat.send("\x04")
    chat.expect(pexpect.EOF)
    chat = spawn(home, "chat", "-s", "t2", "-m", "1", "--idle-delay", "0")  # resumed
    chat.expect_exact(">>>")
    pasted = "".join(chr(ord("a") + i % 26) for i in range(10_000))
    chat.send(f"\x1b[200~{pasted}\x1b[201~\r")  # a bracketed paste, as terminals send one
    chat.expect(r"peak memory", timeout=300)
    chat.expect_exact(">>>")
    chat.send("\x1b[A\x1b[A\r")  # Up twice: the turn before the paste, from the saved session
    chat.expect("peak memory")
    chat.expect_exact(">>>")
    chat.send("first\x1b\rsecond\r")  # Alt-Enter (Esc, Enter) then Enter
    chat.expect("peak memory")
    chat.expect_exact(">>>")
    chat.send('"""\rone\rtwo"""\r')
    chat.expect("peak memory")
    chat.expect_exact(">>>")
    chat.send("\x04")  # Ctrl-D: saved on a line of its own
    chat.expect(r"\r\n\[saved session t2\]")
    chat.expect(pexpect.EOF)
    users = [m["content"] for m in load(models, "t2").messages if m["role"] == "user"]
    assert users == ["hello", pasted, "hello", "first\nsecond", "one\ntwo"]


def test_a_piped_chat_keeps_notices_off_stdout_and_stops_quietly_when_the_reader_leaves(
    models, home
):
    lines = '"""\nline one\n\nline three"""\nhello again\n/status\n'
    r = cli(home, "chat", "--model", models["small"], "-s", "p", "-m", "40", input=lines)
    assert r.returncode == 0, r.stderr
    assert "[" not in r.stdout and "window full" in r.stderr, (r.stdout, r.stderr)
    assert "tok/s" in r.stderr and "[saved session p]" in r.stderr
    users = [m["content"] for m in load(models, "p").messages if m["role"] == "user"]
    assert users == ["line one\n\nline three", "hello again"]
    # `... | head -1`: the reader leaves; the chat stops without an error, the session saved
    proc = subprocess.Popen(
        CLI + ["chat", "-s", "p", "-m", "40"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env_with(home),
    )
    proc.stdout.close()
    _, err = proc.communicate(b"/status\nhi\n", timeout=300)
    assert proc.returncode == 141 and b"Error" not in err and b"Traceback" not in err, err
    assert load(models, "p").messages[-1]["role"] == "assistant"


# -- resume, files, errors ---------------------------------------------------------------------

TURNS = ["one", "two", "three"]


def test_resume_continues_exactly(models, home):
    """Three greedy turns in one process == two, quit, resume, the third: same text, same state
    (the window L = 16 fills, so sleeps happen inside turns and across the quit)."""
    chat_here(models, "whole", TURNS)

    for turns in (TURNS[:2], TURNS[2:]):
        out = cli(
            home,
            "chat",
            "--model",
            models["small"],
            "-s",
            "split",
            "-m",
            "10",
            "--idle-delay",
            "0",
            input="\n".join(turns) + "\n",
        )
        assert out.returncode == 0, out.stderr
    meta_w, arrays_w = saved_arrays(home, "whole")
    meta_s, arrays_s = saved_arrays(home, "split")
    assert meta_s["transcript"] == meta_w["transcript"]
    assert [m["role"] for m in meta_s["transcript"]["messages"]] == ["user", "assistant"] * 3
    assert meta_s["engine"] == meta_w["engine"] and meta_s["engine"]["sleeps"] >= 2
    assert sorted(arrays_s) == sorted(arrays_w)
    for k in arrays_w:
        assert np.array_equal(np.array(arrays_s[k]), np.array(arrays_w[k])), k
    # owner-only permissions
    base = os.path.join(home, "sessions")
    for d in (home, base, os.path.join(base, "split")):
        assert stat.S_IMODE(os.stat(d).st_mode) == 0o700, d
    for f in os.listdir(os.path.join(base, "split")):
        assert stat.S_IMODE(os.stat(os.path.join(base, "split", f)).st_mode) == 0o600, f


KILL_SAVE = """
import os, signal, sys
import mlx_sleep
from mlx_sleep.session import open_session
path, point = sys.argv[1], int(sys.argv[2])
model, _ = mlx_sleep.load(path)
session = open_session("k", model, path)
session.engine.feed([[1, 2, 3, 4, 5]])
real, calls = os.replace, [0]
def replace(a, b):
    calls[0] += 1
    if calls[0] == point:
        os.kill(os.getpid(), signal.SIGKILL)
    real(a, b)
os.replace = replace
session.save()
"""


@pytest.mark.parametrize("point", [1, 2])  # before the state file's rename; before session.json's
def test_sigkill_during_a_save_leaves_the_last_session(models, home, point):
    model, _ = mlx_sleep.load(models["small"])
    session = open_session("k", model, models["small"])
    session.engine.feed([[7, 8, 9]])
    session.save()
    session.close()
    before = snapshot_files(os.path.join(home, "sessions", "k"))
    r = subprocess.run(
        [sys.executable, "-c", KILL_SAVE, models["small"], str(point)],
        env=env_with(home),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == -signal.SIGKILL, r.stderr
    left = set(os.listdir(os.path.join(home, "sessions", "k"))) - set(before)
    assert left  # the killed save left a temporary or an unreferenced state file behind
    session = open_session("k", model, models["small"], create=False)
    assert session.engine.offset == 3  # the last consistent session
    session.save()  # and the next save cleans up what the killed one left
    assert sorted(os.listdir(session.path)) == ["lock", "session.json", "state-000002.safetensors"]


def test_wrong_model_and_truncated_sessions_fail_in_one_line_leaving_files_untouched(models, home):
    chat_here(models, "w", ["hi"], 4)
    path = os.path.join(home, "sessions", "w")
    before = snapshot_files(path)
    r = cli(home, "chat", "--model", models["other"], "-s", "w", input="hi\n")
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert "belongs to another model" in r.stderr and f"--model {models['small']}" in r.stderr
    assert snapshot_files(path) == before
    meta = json.load(open(os.path.join(path, "session.json")))
    state = os.path.join(path, meta["state_file"])
    with open(state, "r+b") as f:
        f.truncate(os.path.getsize(state) - 100)
    before = snapshot_files(path)
    r = cli(home, "chat", "-s", "w", input="hi\n")  # the model comes from the session
    assert r.returncode == 1 and r.stderr.count("\n") == 1
    assert "is corrupt" in r.stderr and "checksum" in r.stderr
    assert snapshot_files(path) == before


def test_corrupt_newer_and_other_weights_sessions_are_refused(models, home, tmp_path):
    model, _ = mlx_sleep.load(models["small"])
    session = open_session("c", model, models["small"])
    session.engine.feed([[1, 2, 3]])
    session.save()
    session.close()
    path = os.path.join(home, "sessions", "c")
    meta_path = os.path.join(path, "session.json")
    good = open(meta_path).read()

    def refused(text, match):
        with open(meta_path, "w") as f:
            f.write(text)
        before = snapshot_files(path)
        with pytest.raises(SessionError, match=match) as e:
            open_session("c", model, models["small"])
        assert "\n" not in str(e.value) and snapshot_files(path) == before

    refused(good[: len(good) // 2], "is corrupt .*not valid JSON")
    refused(json.dumps({**json.loads(good), "format": 99}), "newer mlx-sleep .*format 99")
    refused(
        json.dumps({**json.loads(good), "state_sha256": "0" * 64}), "does not match its checksum"
    )
    with open(meta_path, "w") as f:
        f.write(good)
    # the same architecture with other weights
    other = make_model_dir(tmp_path / "tuned", "hybrid", loops=2, window=16)
    weights = mx.load(os.path.join(other, "model.safetensors"))
    weights = {k: v + 0.01 for k, v in weights.items()}
    mx.save_safetensors(os.path.join(other, "model.safetensors"), weights)
    assert weights_hash(other) != weights_hash(models["small"])
    tuned, _ = mlx_sleep.load(other)
    assert tuned.fingerprint() == model.fingerprint()
    with pytest.raises(SessionError, match="weights differ"):
        open_session("c", tuned, other)
    # other sleep settings than the session's, and a second writer
    with pytest.raises(SessionError, match="resume it without --window"):
        open_session("c", model, models["small"], mlx_sleep.SleepConfig(loops=3, window=16))
    first = open_session("c", model, models["small"])
    with pytest.raises(SessionError, match="in use by another"):
        open_session("c", model, models["small"])
    first.close()


def test_forget_rolls_back_exactly_and_history_is_bounded(models, home):
    from mlx_sleep.session import SessionEngine

    model, _ = mlx_sleep.load(models["small"])
    sleep = mlx_sleep.SleepConfig(loops=2, window=8)
    engine = SessionEngine(model, sleep, history=2)
    engine.feed(mx.array([list(range(30, 38))]))  # window 1 (full, not yet consolidated)
    engine.feed(mx.array([[50, 51, 52]]))  # consolidates window 1, window 2 live
    assert engine.sleeps == 1
    # reference: window 1 never happened; window 2's tokens at the same positions
    ref = mlx_sleep.SleepEngine(model, sleep)
    ref.offset = ref.window_start = 8
    ref.feed(mx.array([[50, 51, 52]]))
    assert engine.forget() and engine.sleeps == 0 and not engine.forget()
    for a, b in zip(engine.state, ref.state):
        for k in a:
            assert_close(a[k], b[k], rtol=1e-5, what=k)
    for _ in range(4):
        engine.feed(mx.array([list(range(60, 68))]))
    assert len(engine.snapshots) == 2


def test_sessions_commands(models, home):
    chat_here(models, "s1", ["hi"], 4)
    run = CliRunner().invoke
    r = run(main, ["sessions", "list"])
    assert r.exit_code == 0 and re.match(r"s1: \d+ tokens, window \d+/16", r.output), r.output
    r = run(main, ["sessions", "show", "s1"])
    assert "user: hi" in r.output and "assistant:" in r.output
    r = run(main, ["sessions", "export", "s1"])
    assert json.loads(r.output)["messages"][0] == {"role": "user", "content": "hi"}
    r = run(main, ["sessions", "show", "nope"])
    assert r.exit_code == 1 and "no session 'nope'" in r.output
    r = run(main, ["sessions", "show", "../etc"])
    assert r.exit_code == 1 and "not a session name" in r.output
    stray = os.path.join(home, "sessions", "s1", "notes.txt")
    open(stray, "w").write("mine")
    r = run(main, ["sessions", "rm", "s1"])
    assert r.exit_code == 1 and "did not write (notes.txt)" in r.output
    os.remove(stray)
    r = run(main, ["sessions", "rm", "s1"])
    assert r.exit_code == 0 and not os.path.exists(os.path.join(home, "sessions", "s1"))


# -- consolidation outside the chat ---------------------------------------------------------------


def test_consolidate_when_idle_waits_yields_and_completes(models, home, tmp_path):
    model, _ = mlx_sleep.load(models["small"])
    for name, loops in (("q", 300),):
        s = open_session(
            name, model, models["small"], mlx_sleep.SleepConfig(loops=loops, window=64)
        )
        s.engine.feed(mx.array([list(range(40, 80))]))
        s.save()
        s.close()
    path = os.path.join(home, "sessions", "q")
    before = snapshot_files(path)
    flag = tmp_path / "idle"
    flag.write_text("busy")
    args = [
        "consolidate",
        "-s",
        "q",
        "--when-idle",
        "--idle-source",
        f"file:{flag}",
        "--poll",
        "0.1",
    ]
    proc = spawn(home, *args)
    proc.expect_exact(f"waiting for the machine to be idle (up to 3600 s): {flag} says busy")
    flag.write_text("idle")
    proc.expect_exact("q: pass 1/300")
    flag.write_text("busy")  # the user is back: it yields between passes, saving nothing
    proc.expect_exact("q: yielded (the user came back; unchanged)")
    proc.expect(pexpect.EOF)
    assert snapshot_files(path) == before
    flag.write_text("idle")
    r = cli(home, *args)
    assert r.returncode == 0 and "q: consolidated" in r.stdout, r.stdout + r.stderr
    assert load(models, "q").engine.sleeps == 1 and load(models, "q").engine.window_len == 0
    # without --when-idle, and the fill threshold
    r = CliRunner().invoke(main, ["consolidate", "--all"])
    assert r.exit_code == 0 and "q: skipped: window 0/64" in r.output, r.output


def test_consolidate_gives_up_with_status_1_when_never_idle(models, home, tmp_path):
    """A machine that stays busy: one waiting line, then exit status 1 after --max-wait and
    the session unchanged (it once waited forever, printing a line per poll)."""
    model, _ = mlx_sleep.load(models["small"])
    s = open_session("busy", model, models["small"], mlx_sleep.SleepConfig(loops=2, window=64))
    s.engine.feed(mx.array([list(range(40, 80))]))
    s.save()
    s.close()
    before = snapshot_files(os.path.join(home, "sessions", "busy"))
    flag = tmp_path / "idle"
    flag.write_text("busy")
    r = CliRunner().invoke(
        main,
        [
            "consolidate",
            "-s",
            "busy",
            "--when-idle",
            "--idle-source",
            f"file:{flag}",
            "--poll",
            "0.01",
            "--max-wait",
            "0.2",
        ],
    )
    assert r.exit_code == 1, r.output
    assert r.output.count("waiting for the machine to be idle") == 1, r.output
    assert "not idle within --max-wait 0.2 s" in r.output.splitlines()[-1], r.output
    assert snapshot_files(os.path.join(home, "sessions", "busy")) == before


def test_schedule_carries_the_session_store_into_the_unit_and_agent(tmp_path, monkeypatch):
    """The scheduled job runs outside the user's shell: MLX_SLEEP_HOME (made absolute) goes into
    the systemd unit and the launchd agent, quoted for systemd."""
    import plistlib

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLX_SLEEP_HOME", "my store/$x%y")
    monkeypatch.delenv("HF_HOME", raising=False)
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    store = str(tmp_path / "my store/$x%y")
    unit = systemd_units(["mlx-sleep", "consolidate"], 600)
    escaped = store.replace("%", "%%").replace("$", "$$")
    assert f'Environment="MLX_SLEEP_HOME={escaped}"' in unit, unit
    agent = plistlib.loads(launchd_plist(["mlx-sleep", "consolidate"], 600))
    assert agent["EnvironmentVariables"] == {"MLX_SLEEP_HOME": store}
    monkeypatch.delenv("MLX_SLEEP_HOME")
    assert "Environment=" not in systemd_units(["mlx-sleep"], 600)
    assert "EnvironmentVariables" not in plistlib.loads(launchd_plist(["mlx-sleep"], 600))


def test_idle_sources_and_schedule():
    assert on_ac_power("Now drawing from 'AC Power'\n -InternalBattery-0 (id=1) 100%")
    assert not on_ac_power("Now drawing from 'Battery Power'\n -InternalBattery-0 80%")
    assert thermally_throttled("CPU_Scheduler_Limit \t= 100\nCPU_Speed_Limit \t= 70\n")
    assert not thermally_throttled(
        "Note: No thermal warning level has been recorded\nCPU_Speed_Limit \t= 100\n"
    )
    assert file_source("/nonexistent/flag")() == (False, "/nonexistent/flag says nothing")
    ok, why = idle_source("load", max_load=1e9)()
    assert ok and "per core" in why
    with pytest.raises(ValueError, match="unknown idle source"):
        idle_source("bogus")
    import plistlib

    agent = plistlib.loads(launchd_plist(["/bin/mlx-sleep", "consolidate", "--all"], 900))
    assert agent["ProcessType"] == "Background" and agent["StartInterval"] == 900
    assert agent["ProgramArguments"][1:] == ["consolidate", "--all"]
    assert "OnUnitActiveSec=900s" in systemd_units(["mlx-sleep", "consolidate"], 900)
    if sys.platform != "darwin":
        r = CliRunner().invoke(main, ["schedule", "install", "--interval", "600"])
        assert r.exit_code == 0 and "consolidate --all --when-idle" in r.output


def test_mac_idle_source_decides_from_input_power_and_heat(monkeypatch):
    """The macOS rule, driven through its two inputs (CoreGraphics' idle time and pmset)."""
    from mlx_sleep import idle

    state = {
        "quiet": 10.0,
        "batt": "Now drawing from 'AC Power'\n",
        "therm": "Note: No thermal warning level has been recorded\n",
    }
    monkeypatch.setattr(idle, "seconds_since_input", lambda: state["quiet"])
    monkeypatch.setattr(
        idle, "_pmset", lambda *a: state["batt" if a == ("-g", "batt") else "therm"]
    )
    source = idle.idle_source("mac", idle_seconds=300)
    ok, why = source()
    assert not ok and "input 10 s ago" in why
    state["quiet"] = 400.0
    assert source() == (True, "no input for 400 s, on AC power")
    state["batt"] = "Now drawing from 'Battery Power'\n -InternalBattery-0 (id=1)\t80%; discharging"
    assert source() == (False, "on battery")
    state["batt"] = "Now drawing from 'AC Power'\n"
    state["therm"] = "CPU_Scheduler_Limit \t= 100\nCPU_Speed_Limit \t= 60\n"
    assert source() == (False, "thermally throttled")


def test_seconds_since_input_calls_coregraphics_with_the_any_event_type(monkeypatch):
    """The ctypes call as macOS expects it: double f(int32 state, uint32 event type), called
    with the combined session state (0) and kCGAnyInputEventType (~0)."""
    import ctypes

    from mlx_sleep import idle

    calls, loaded = [], []

    class FakeFunction:
        def __call__(self, *args):
            assert self.restype is ctypes.c_double
            assert self.argtypes == [ctypes.c_int32, ctypes.c_uint32]
            calls.append(args)
            return 42.5

    class FakeLibrary:
        CGEventSourceSecondsSinceLastEventType = FakeFunction()

    monkeypatch.setattr(
        ctypes.cdll, "LoadLibrary", lambda name: loaded.append(name) or FakeLibrary()
    )
    assert idle.seconds_since_input() == 42.5
    assert calls == [(0, 0xFFFFFFFF)] and "ApplicationServices" in loaded[0]


def test_schedule_on_macos_writes_loads_and_removes_only_its_agent(tmp_path, monkeypatch):
    """The macOS branch of `schedule install|remove`, run here with launchctl recorded."""
    import plistlib
    import subprocess as sp

    ran = []
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setattr(sys, "platform", "darwin")
    monkeypatch.setattr(
        sp, "run", lambda cmd, **kw: ran.append(cmd) or sp.CompletedProcess(cmd, 0, "", "")
    )
    agent = tmp_path / "Library" / "LaunchAgents" / "com.mlx-sleep.consolidate.plist"
    r = CliRunner().invoke(main, ["schedule", "install", "--interval", "900"])
    assert r.exit_code == 0 and f"installed {agent}" in r.output, r.output
    written = plistlib.loads(agent.read_bytes())
    assert written["ProcessType"] == "Background" and written["StartInterval"] == 900
    assert written["ProgramArguments"][1:4] == ["consolidate", "--all", "--when-idle"]
    assert [c[:2] for c in ran] == [["launchctl", "bootout"], ["launchctl", "bootstrap"]]
    assert ran[1][3] == str(agent)
    # installing again replaces our own agent; remove unloads and deletes it
    assert CliRunner().invoke(main, ["schedule", "install"]).exit_code == 0
    r = CliRunner().invoke(main, ["schedule", "remove"])
    assert r.exit_code == 0 and not agent.exists() and ran[-1][:2] == ["launchctl", "bootout"]
    # an agent of the same name that we did not write is never replaced or removed
    agent.write_bytes(plistlib.dumps({"Label": "someone.else"}))
    for args in (["schedule", "install"], ["schedule", "remove"]):
        r = CliRunner().invoke(main, args)
        assert r.exit_code != 0 and "not written by mlx-sleep" in r.output, r.output
    assert plistlib.loads(agent.read_bytes()) == {"Label": "someone.else"}


# -- deferred sleep (--defer-sleep) -----------------------------------------------------------


def fed_as_a_reply(engine, ids, prompt=10):
    """A prompt in one piece, then one token at a time, as a reply is fed."""
    engine.feed(ids[:, :prompt], logits=None)
    for t in range(prompt, ids.shape[1]):
        engine.feed(ids[:, t : t + 1], logits=None)


def test_a_deferred_session_saves_its_pending_windows_and_catches_up_like_a_synchronous_one(
    models, home
):
    """Pending windows (tokens and start states) survive a save and a reopen without deferral;
    its next sleep deepens them first, and the session then holds what the synchronous
    schedule reaches on the same tokens: fast weights, window-start state, /forget snapshots,
    and the state a /forget returns to."""
    model, _ = mlx_sleep.load(models["small"])  # N = 2, L = 16
    ids = mx.array(np.random.default_rng(0).integers(0, model.vocab_size, (1, 75)))
    sync = open_session("sync", model, models["small"])
    fed_as_a_reply(sync.engine, ids)
    deferred = open_session("d", model, models["small"], defer=True, max_pending=8)
    fed_as_a_reply(deferred.engine, ids)
    assert len(deferred.engine.pending) == 4 and deferred.engine.sleeps == 0
    deferred.save()
    deferred.close()
    r = CliRunner().invoke(main, ["sessions", "show", "d"])
    assert r.exit_code == 0 and "0 consolidations, 4 windows pending" in r.output, r.output
    r = CliRunner().invoke(main, ["sessions", "list"])
    assert "0 consolidations (4 pending)" in r.output, r.output

    reopened = open_session("d", model, models["small"], create=False)
    assert [start for _, _, start in reopened.engine.pending] == [0, 16, 32, 48]
    assert reopened.engine.consolidate() and not reopened.engine.pending
    assert sync.engine.consolidate()
    a, b = reopened.engine, sync.engine
    assert a.sleeps == b.sleeps == 5
    assert [s for _, s in a.snapshots] == [s for _, s in b.snapshots] == [32, 48, 64]
    for (x, _), (y, _) in zip(a.snapshots, b.snapshots):
        assert_trees_close(x, y)
    assert_trees_close(a.state, b.state)
    assert a.forget() and b.forget()
    assert_trees_close(a.state, b.state)
    reopened.close()
    sync.close()


def test_chat_with_deferred_sleep_runs_no_pass_in_a_reply_and_sleep_deepens_later(models, home):
    """`chat --defer-sleep`: windows that fill during the turns are not slept on there (no
    "window full" notice, no consolidation); /status reports them; /sleep deepens them and the
    saved session then holds none."""
    out = cli(
        home,
        "chat",
        "--model",
        models["small"],
        "-s",
        "d",
        "-m",
        "10",
        "--idle-delay",
        "0",
        "--defer-sleep",
        "--max-pending",
        "8",
        input="\n".join(TURNS + ["/status", "/sleep", "/status"]) + "\n",
    )
    assert out.returncode == 0, out.stderr
    assert "window full" not in out.stderr and "[slept" not in out.stderr, out.stderr
    assert "waiting to be slept on (deferred sleep)" in out.stderr, out.stderr
    pending = re.findall(r"deferred sleep: (\d+) windows? pending", out.stdout)
    assert len(pending) == 2 and int(pending[0]) >= 2 and pending[1] == "0", out.stdout
    assert re.search(rf"deepened {pending[0]} pending windows", out.stderr), out.stderr
    meta, _ = saved_arrays(home, "d")
    assert "pending_starts" not in meta["engine"] and meta["engine"]["sleeps"] >= int(pending[0])


def test_idle_sleep_deepens_pending_windows_whatever_the_live_window_holds(models):
    """Pending windows make an idle sleep due however empty the live window is; that sleep
    deepens them and leaves a live window below --idle-fill alone."""
    from mlx_sleep.chat import idle_sleep_due, sleep_when_idle
    from mlx_sleep.sleep import SleepEngine

    model, _ = mlx_sleep.load(models["small"])
    engine = SleepEngine(model, defer=True)
    fed_as_a_reply(engine, mx.array([list(range(40, 75))]))  # 2 windows pending, 3 tokens live
    assert len(engine.pending) == 2 and engine.window_len == 3
    assert idle_sleep_due(engine, 60, 0.5) and not idle_sleep_due(engine, 0, 0.5)
    assert sleep_when_idle(engine, 0.5) and not engine.pending and engine.window_len == 3
    assert engine.sleeps == 2 and not idle_sleep_due(engine, 60, 0.5)
