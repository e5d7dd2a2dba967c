"""A session on disk is untrusted input (issue 18): every field of session.json and every array of
the state file edited by hand, a symlink at every level of the store, `sessions rm` while a chat
holds the session, and SIGKILL at every filesystem step of `consolidate` and `sessions rm`.

Each refused case runs the real command line (the installed `mlx-sleep`, a process per command)
and must end with exit status 1, one line (`Error: ...` naming the field), no traceback, and
every file under the test's directory byte for byte as it was (tests.reliability.snapshot: file
contents, modes, link targets)."""

import json
import os
import shutil
import signal
import struct
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pexpect
import pytest

import mlx_sleep
from mlx_sleep.session import open_session
from tests.reliability import run_killed, snapshot
from tests.tiny_models import make_model_dir

_SCRIPT = os.path.join(os.path.dirname(sys.executable), "mlx-sleep")
CLI = [_SCRIPT] if os.path.exists(_SCRIPT) else [sys.executable, "-m", "mlx_sleep.cli"]
NAME = "x"


def run(home, *args):
    """The installed command in a process of its own, with stdin empty."""
    return subprocess.run(
        CLI + [str(a) for a in args],
        input="",
        capture_output=True,
        text=True,
        env={**os.environ, "MLX_SLEEP_HOME": str(home)},
        timeout=300,
    )


class Result:
    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def run_here(home, *args):
    """The same command line (mlx_sleep.cli.main) in this process: cheaper than a process, for
    the long tables; stdin is /dev/null at the descriptor too (the chat reads fd 0)."""
    from click.testing import CliRunner

    from mlx_sleep.cli import main

    saved, null = os.dup(0), os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("MLX_SLEEP_HOME", str(home))
            r = CliRunner().invoke(main, [str(a) for a in args], input="")
    finally:
        os.dup2(saved, 0)
        os.close(saved)
    stderr = r.stderr
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        import traceback

        stderr += "Traceback (most recent call last):\n" + "".join(
            traceback.format_exception(type(r.exception), r.exception, r.exception.__traceback__)
        )
    return Result(r.exit_code, r.stdout, stderr)


def refused(r, *expect):
    """Exit 1, one line `Error: ...` (containing each of `expect`), nothing else, no traceback."""
    out = r.stdout + r.stderr
    assert r.returncode == 1, out
    assert "Traceback" not in out, out
    lines = out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), out
    for e in expect:
        assert e in lines[0], out


@pytest.fixture(scope="module")
def golden(tmp_path_factory):
    """A tiny model and a saved session of it holding every kind of array: a consolidated window
    (a /forget snapshot), a live window of 8 tokens (KV, token ids, wake features)."""
    root = tmp_path_factory.mktemp("untrusted")
    model_dir = make_model_dir(root / "model", "hybrid", loops=2, window=16)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLX_SLEEP_HOME", str(root / "home"))
        model, _ = mlx_sleep.load(model_dir)
        s = open_session(NAME, model, model_dir)
        s.engine.feed(mx.array([list(range(40, 64))]))
        s.messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
        s.fed_text = "<|im_start|>user\nhi<|im_end|>\n"
        s.save()
        s.close()
    path = str(root / "home" / "sessions" / NAME)
    arrays = mx.load(
        os.path.join(path, json.load(open(os.path.join(path, "session.json")))["state_file"])
    )
    assert {"window_ids", "window_core", "state.0.keys", "snapshots.0.1.S"} <= set(arrays)
    return model_dir, path


def install(golden, tmp_path, where=None):
    """A copy of the golden session as `NAME` in a fresh home under tmp_path (or at `where`)."""
    home = tmp_path / "home"
    dest = where or home / "sessions" / NAME
    shutil.copytree(golden[1], dest)
    for p in (home, home / "sessions"):
        if p.is_dir() and not p.is_symlink():
            p.chmod(0o700)
    return home, str(dest)


def meta_of(path):
    with open(os.path.join(path, "session.json")) as f:
        return json.load(f)


def write_meta(path, meta=None, text=None):
    with open(os.path.join(path, "session.json"), "w") as f:
        f.write(text if text is not None else json.dumps(meta, indent=2))


# -- session.json edited by hand --------------------------------------------------------------------


def setting(field, value):
    """An edit of session.json: `field` (dotted; [i] for a list item) set to `value`, or removed
    when value is DELETE."""

    def edit(meta):
        *parents, last = field.replace("[", ".").replace("]", "").split(".")
        node = meta
        for p in parents:
            node = node[int(p)] if isinstance(node, list) else node[p]
        if value is DELETE:
            del node[last]
        else:
            node[int(last) if isinstance(node, list) else last] = value

    return edit


DELETE = object()
BOMB = "[" * 100_000 + "]" * 100_000


def replaced(text_of):
    return lambda meta: ("text", text_of(meta))


ISSUE_JSON_CASES = [
    # the issue's list: each gave a traceback
    ("model a string", setting("model", "jet-2b"), "model must be an object"),
    ("model.path a list", setting("model.path", ["/m"]), "model.path must be an absolute path"),
    ("engine a list", setting("engine", [29]), "engine must be an object"),
    ("engine.offset a string", setting("engine.offset", "24"), "engine.offset must be an integer"),
    ("transcript a list", setting("transcript", ["hi"]), "transcript must be an object"),
    (
        "messages of ints",
        setting("transcript.messages", [1, 2]),
        "transcript.messages[0] must be an object",
    ),
    (
        "a message without role",
        setting("transcript.messages[0].role", DELETE),
        "transcript.messages[0] lacks the field 'role'",
    ),
    ("state_file an int", setting("state_file", 2), "state_file must be a state file name"),
    ("saved a string", setting("saved", "yesterday"), "saved must be a number"),
    ("saved huge", setting("saved", 1e300), "saved must be a number in"),
    ("generation a string", setting("generation", "2"), "generation must be an integer"),
    (
        "a nested-array JSON bomb",
        replaced(lambda m: json.dumps(m)[:-1] + ', "z": ' + BOMB + "}"),
        "too deeply",
    ),
    # the issue's list: each was accepted and the session rewritten
    ("format -1", setting("format", -1), "format must be an integer in 1..1"),
    ("format true", setting("format", True), "format must be an integer"),
    (
        "state_file path traversal",
        setting("state_file", "../y/state-000002.safetensors"),
        "state_file must be a state file name",
    ),
    ("state_file absolute", setting("state_file", "/etc/passwd"), "state_file must be"),
    ("history 1e9", setting("history", 1e9), "history must be an integer in 0..64"),
    ("history 10**9", setting("history", 10**9), "history must be an integer in 0..64"),
    (
        "50 snapshot_starts",
        setting("engine.snapshot_starts", list(range(50))),
        "engine.snapshot_starts may hold at most",
    ),
    ("unknown top-level key", setting("extra", 1), "has an unknown field 'extra'"),
    ("unknown engine key", setting("engine.extra", 1), "engine has an unknown field 'extra'"),
    (
        "unknown message key",
        setting("transcript.messages[1].tool", "x"),
        "transcript.messages[1] has an unknown field 'tool'",
    ),
]


def both(*edits):
    def edit(meta):
        for e in edits:
            e(meta)

    return edit


MORE_JSON_CASES = [
    (
        "replay_start after offset",
        setting("transcript.replay_start", 25),
        "transcript.replay_start must be <= engine.offset",
    ),
    (
        "a mark past offset",
        setting("transcript.marks", [{"offset": 30, "chars": 0}]),
        "transcript.marks must ascend",
    ),
    (
        "marks descending",
        setting("transcript.marks", [{"offset": 24, "chars": 3}, {"offset": 24, "chars": 1}]),
        "transcript.marks must ascend",
    ),
    (
        "a mark's chars past fed_text",
        setting("transcript.marks", [{"offset": 24, "chars": 10**6}]),
        "transcript.marks must ascend",
    ),
    (
        "a mark a list",
        setting("transcript.marks", [[24, 0]]),
        "transcript.marks[0] must be an object",
    ),
    ("sleep.partial a string", setting("sleep.partial", "yes"), "sleep.partial must be true or"),
    (
        "partial in one sleep only",
        setting("engine.sleep.partial", True),
        "engine.sleep must equal sleep",
    ),
    (
        "pending_starts not whole windows",
        setting("engine.pending_starts", [3]),
        "engine.pending_starts must be windows of sleep.window tokens",
    ),
    (
        "pending_starts a string",
        setting("engine.pending_starts", "0"),
        "engine.pending_starts must be a list",
    ),
    (
        "65 pending_starts",
        setting("engine.pending_starts", list(range(65))),
        "engine.pending_starts must be a list of at most 64",
    ),
    (
        "a snapshot after a pending window",
        both(setting("engine.pending_starts", [0]), setting("engine.snapshot_starts", [16])),
        "engine.snapshot_starts must come before the first of engine.pending_starts",
    ),
    (
        "pending_starts without their arrays",
        setting("engine.pending_starts", [0]),
        "lacks",
    ),
    ("top level an array", replaced(lambda m: json.dumps([m])), "the top level must be an object"),
    ("top level null", replaced(lambda m: "null"), "the top level must be an object"),
    ("not JSON", replaced(lambda m: json.dumps(m)[:100]), "not valid JSON"),
    ("empty file", replaced(lambda m: ""), "not valid JSON"),
    (
        "nested 9 deep",
        setting("transcript.messages[0].content", [[[[[["a"]]]]]]),
        "deeper than 8 levels",
    ),
    ("format newer", setting("format", 99), "newer mlx-sleep (format 99"),
    ("format a string", setting("format", "1"), "format must be an integer"),
    ("format missing", setting("format", DELETE), "lacks the field 'format'"),
    ("created missing", setting("created", DELETE), "lacks the field 'created'"),
    ("saved NaN", setting("saved", float("nan")), "saved must be a number"),
    ("saved negative", setting("saved", -5), "saved must be a number"),
    ("generation 0", setting("generation", 0), "generation must be an integer in 1.."),
    (
        "generation of another state file",
        setting("generation", 7),
        "state_file must be state-<generation>.safetensors",
    ),
    ("name with a slash", setting("name", "../x"), "name must be a session name"),
    ("model.path relative", setting("model.path", "model"), "model.path must be an absolute path"),
    ("model.path a Hub id", setting("model.path", "evil/model"), "model.path must be"),
    ("model.fingerprint not hex", setting("model.fingerprint", "zz"), "model.fingerprint must be"),
    ("model.weights a number", setting("model.weights", 5), "model.weights must be"),
    ("sleep.loops 0", setting("sleep.loops", 0), "sleep.loops must be an integer in 1..1024"),
    ("sleep.window a string", setting("sleep.window", "16"), "sleep.window must be an integer"),
    ("sleep.eviction unknown", setting("sleep.eviction", "soft"), "sleep.eviction must be one of"),
    ("engine.sleep differs", setting("engine.sleep.loops", 3), "engine.sleep must equal sleep"),
    ("engine.model differs", setting("engine.model", "0" * 16), "engine.model must equal"),
    ("engine.offset negative", setting("engine.offset", -1), "engine.offset must be an integer"),
    ("engine.offset a float", setting("engine.offset", 24.0), "engine.offset must be an integer"),
    ("engine.offset beyond 32 bits", setting("engine.offset", 2**40), "engine.offset must be"),
    (
        "window_start after offset",
        setting("engine.window_start", 25),
        "engine.window_start must be <= engine.offset",
    ),
    ("live window beyond L", setting("engine.window_start", 0), "the live window"),
    ("engine.batch_size 2", setting("engine.batch_size", 2), "engine.batch_size must be"),
    ("engine.sleeps a list", setting("engine.sleeps", [1]), "engine.sleeps must be an integer"),
    (
        "snapshot_starts past window_start",
        setting("engine.snapshot_starts", [20]),
        "engine.snapshot_starts must ascend",
    ),
    (
        "snapshot_starts a dict",
        setting("engine.snapshot_starts", {"0": 0}),
        "engine.snapshot_starts must be a list",
    ),
    ("history below the snapshots", setting("history", 0), "engine.snapshot_starts may hold"),
    (
        "role unknown",
        setting("transcript.messages[0].role", "root"),
        "transcript.messages[0].role must be one of system, user, assistant",
    ),
    (
        "content an int",
        setting("transcript.messages[0].content", 3),
        "transcript.messages[0].content must be a string",
    ),
    (
        "content a lone surrogate",
        setting("transcript.messages[0].content", "a\ud800"),
        "transcript.messages[0].content must be a string",
    ),
    ("fed_text null", setting("transcript.fed_text", None), "transcript.fed_text must be a string"),
    ("state_sha256 not hex", setting("state_sha256", "x" * 64), "state_sha256 must be"),
    ("state_bytes negative", setting("state_bytes", -1), "state_bytes must be"),
    ("state_bytes another size", setting("state_bytes", 1000), "does not match its checksum"),
    (
        "state_sha256 another file's",
        setting("state_sha256", "0" * 64),
        "does not match its checksum",
    ),
]
SESSION_JSON_CASES = [(*c, True) for c in ISSUE_JSON_CASES] + [(*c, False) for c in MORE_JSON_CASES]


@pytest.mark.parametrize("case", SESSION_JSON_CASES, ids=[c[0] for c in SESSION_JSON_CASES])
def test_an_edited_session_json_is_refused_by_every_command(golden, tmp_path, case):
    """The issue's cases run show, chat and consolidate as processes of the installed command;
    the rest, and export and list, run the same `main` in this process."""
    name, edit, expect, issue = case
    home, path = install(golden, tmp_path)
    meta = meta_of(path)
    out = edit(meta)
    if isinstance(out, tuple):
        write_meta(path, text=out[1])
    else:
        write_meta(path, meta)
    before = snapshot(tmp_path)
    # show, export, list read session.json alone: no checksum, no state file
    reads_only_json = name in ("state_sha256 another file's", "pending_starts without their arrays")
    for args in (
        ["sessions", "show", NAME],
        ["chat", "-s", NAME],
        ["consolidate", "-s", NAME, "--min-fill", "0"],
        ["sessions", "export", NAME],
    ):
        r = (run if issue and args[1] != "export" else run_here)(home, *args)
        if reads_only_json and args[0] == "sessions":
            assert r.returncode == 0, r.stdout + r.stderr
            continue
        refused(r, f"session '{NAME}'", expect)
    r = run_here(home, "sessions", "list")  # the session's line says why
    assert "Traceback" not in r.stdout + r.stderr and r.stdout.startswith(f"{NAME}: "), r.stdout
    assert len(r.stdout.splitlines()) == 1 and (expect in r.stdout or reads_only_json), r.stdout
    assert snapshot(tmp_path) == before


def test_a_corrupt_session_stays_removable(golden, tmp_path):
    home, path = install(golden, tmp_path)
    write_meta(path, text=BOMB)
    r = run(home, "sessions", "rm", NAME)
    assert r.returncode == 0 and r.stdout == f"removed session {NAME}\n", r.stdout + r.stderr
    assert os.listdir(home / "sessions") == []


def test_the_session_list_names_each_unreadable_session_and_fails(golden, tmp_path, monkeypatch):
    """session.report_sessions, what `sessions list` is to call: the command's lines, then an
    error naming the sessions that cannot be read."""
    from mlx_sleep.session import SessionError, report_sessions

    home, path = install(golden, tmp_path)
    shutil.copytree(path, home / "sessions" / "y")
    monkeypatch.setenv("MLX_SLEEP_HOME", str(home))
    lines = []
    report_sessions(lines.append)
    assert lines == run_here(home, "sessions", "list").stdout.splitlines() and len(lines) == 2
    write_meta(str(home / "sessions" / "y"), text="[]")
    lines = []
    with pytest.raises(SessionError, match=r"^1 of 2 sessions cannot be read \(y\): see above$"):
        report_sessions(lines.append)
    assert lines[0].startswith("x: 24 tokens, window 8/16") and lines[1].startswith(
        "y: session 'y' is corrupt (session.json: the top level must be"
    )


# -- the state file edited (its checksum and size updated in session.json, so they pass) ----------

ST = {mx.float32: "F32", mx.float16: "F16", mx.int32: "I32", mx.uint32: "U32", mx.int64: "I64"}


def safetensors_bytes(arrays: dict, header_edit=None) -> bytes:
    """A safetensors file, written here byte by byte (so a test can write what MLX would not)."""
    header, blobs, offset = {}, [], 0
    for name, a in sorted(arrays.items()):
        data = np.array(a).tobytes()
        header[name] = {
            "dtype": ST[a.dtype],
            "shape": list(a.shape),
            "data_offsets": [offset, offset + len(data)],
        }
        blobs.append(data)
        offset += len(data)
    if header_edit:
        header_edit(header)
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + b"".join(blobs)


def arrays_edit(fn):
    def edit(arrays):
        fn(arrays)
        return safetensors_bytes(arrays)

    return edit


def header_edit(fn):
    return lambda arrays: safetensors_bytes(arrays, fn)


def set_array(name, make):
    def fn(arrays):
        arrays[name] = make(arrays[name])

    return arrays_edit(fn)


def drop(*names):
    def fn(arrays):
        for n in names:
            del arrays[n]

    return arrays_edit(fn)


def nan_at(a):
    return mx.array(np.where(np.arange(a.size).reshape(a.shape) == 3, np.nan, np.array(a)))


STATE_CASES = [
    # the issue's list: each was accepted and the session rewritten
    (
        "fast weights float16",
        set_array("state.1.S", lambda a: a.astype(mx.float16)),
        "state.1.S is F16; the model needs F32",
    ),
    (
        "fast weights int32",
        set_array("state.1.S", lambda a: a.astype(mx.int32)),
        "state.1.S is I32; the model needs F32",
    ),
    ("fast weights NaN", set_array("state.1.S", nan_at), "state.1.S holds NaN or infinite"),
    (
        "KV of another head size",
        arrays_edit(
            lambda d: d.update({k: d[k][..., :8] for k in ("state.0.keys", "state.0.values")})
        ),
        "state.0.keys is [1, 2, 8, 8]; the model needs [1, 2, 1..16, 16]",
    ),
    (
        "KV 100k tokens long",
        arrays_edit(
            lambda d: d.update(
                {k: mx.zeros((1, 2, 100_000, 16)) for k in ("state.0.keys", "state.0.values")}
            )
        ),
        "state_bytes",
    ),
    # more
    (
        "fast weights infinite",
        set_array("state.3.S", lambda a: a + float("inf")),
        "state.3.S holds NaN or infinite",
    ),
    (
        "fast weights another shape",
        set_array("state.1.S", lambda a: a[:, :1]),
        "state.1.S is [1, 1, 16, 16]; the model needs [1, 2, 16, 16]",
    ),
    (
        "conv state NaN in a snapshot",
        set_array("snapshots.0.1.conv", nan_at),
        "snapshots.0.1.conv holds NaN",
    ),
    (
        "snapshot of another shape",
        set_array("snapshots.0.3.S", lambda a: a[..., :4]),
        "snapshots.0.3.S is",
    ),
    (
        "a fast weight missing",
        drop("window_start_state.3.S"),
        "lacks the array window_start_state.3.S",
    ),
    (
        "a snapshot missing",
        drop("snapshots.0.1.S", "snapshots.0.1.conv", "snapshots.0.3.S", "snapshots.0.3.conv"),
        "lacks the array snapshots.0.1",
    ),
    (
        "an unknown array",
        arrays_edit(lambda d: d.update({"state.1.extra": mx.zeros((2,))})),
        "holds an array 'state.1.extra'",
    ),
    (
        "an extra snapshot",
        arrays_edit(
            lambda d: d.update(
                {
                    k.replace("snapshots.0", "snapshots.1"): v
                    for k, v in list(d.items())
                    if k.startswith("snapshots.0")
                }
            )
        ),
        "holds an array 'snapshots.1.",
    ),
    ("keys without values", drop("state.0.values"), "must hold state.0.keys and state.0.values"),
    (
        "keys and values of two lengths",
        set_array("state.0.values", lambda a: a[:, :, :4]),
        "state.0.keys and state.0.values of one shape",
    ),
    (
        "KV in a state with no tokens before it",
        arrays_edit(
            lambda d: d.update(
                {
                    "snapshots.0.0.keys": d["state.0.keys"],
                    "snapshots.0.0.values": d["state.0.values"],
                }
            )
        ),
        "holds an array 'snapshots.0.0.keys'",
    ),
    (
        "token ids outside the vocabulary",
        set_array("window_ids", lambda a: a + 100_000),
        "token id 100056 is outside the vocabulary",
    ),
    (
        "token ids float",
        set_array("window_ids", lambda a: a.astype(mx.float32)),
        "window_ids is F32",
    ),
    (
        "token ids of another length",
        set_array("window_ids", lambda a: a[:, :5]),
        "window_ids is [1, 5]; the model needs [1, 8]",
    ),
    (
        "wake features of another width",
        set_array("window_core", lambda a: a[..., :7]),
        "window_core is [1, 8, 7]; the model needs [1, 8, 32]",
    ),
    (
        "header not JSON",
        lambda d: struct.pack("<Q", 5) + b"{oops" + b"\0" * 64,
        "is not a safetensors file",
    ),
    (
        "header longer than the file",
        lambda d: struct.pack("<Q", 1 << 40) + b"{}",
        "is not a safetensors file",
    ),
    (
        "header shape a string",
        header_edit(lambda h: h["state.1.S"].update(shape="big")),
        "bad header entry for 'state.1.S'",
    ),
    (
        "header offsets past the end",
        header_edit(lambda h: h["state.1.S"].update(data_offsets=[10**9, 10**9 + 2048])),
        "bad header entry for 'state.1.S'",
    ),
    (
        "header offsets overlapping",
        header_edit(lambda h: h["window_ids"].update(data_offsets=[0, 32])),
        "overlapping arrays",
    ),
    (
        "header a nested bomb",
        lambda d: struct.pack("<Q", len(BOMB)) + BOMB.encode(),
        "is not a safetensors file",
    ),
]


def test_a_state_file_is_read_from_its_bytes_as_mx_load_reads_it(tmp_path):
    """The session loader builds a state file's arrays from its checked bytes (not mx.load on a
    file object, whose unread arrays can abort the process at exit): every safetensors dtype,
    0-d and empty arrays, bit for bit what mx.load reads from the file."""
    from mlx_sleep.session import ST_DTYPES, arrays_from_safetensors, safetensors_header

    rng = np.random.default_rng(0)
    arrays = {
        name: mx.array(rng.normal(size=(3, 5)) * 100).astype(dtype)
        for name, (dtype, _) in ST_DTYPES.items()
        if dtype != mx.float64  # mx.save_safetensors writes no float64 on every build
    }
    arrays.update(scalar=mx.array(7, mx.int32), empty=mx.zeros((0, 4), mx.bfloat16))
    path = str(tmp_path / "s.safetensors")
    mx.save_safetensors(path, arrays)
    data = open(path, "rb").read()
    got, want = arrays_from_safetensors(data, safetensors_header(data, "s")), mx.load(path)
    assert sorted(got) == sorted(want) == sorted(arrays)
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape, k
        bits = [np.array(a.reshape(-1).view(mx.uint8)) for a in (got[k], want[k])]
        assert np.array_equal(*bits), k


@pytest.mark.parametrize("case", STATE_CASES, ids=[c[0] for c in STATE_CASES])
def test_an_edited_state_file_is_refused_when_opened(golden, tmp_path, case):
    name, edit, expect = case
    home, path = install(golden, tmp_path)
    meta = meta_of(path)
    state = os.path.join(path, meta["state_file"])
    data = edit(dict(mx.load(state)))
    with open(state, "wb") as f:
        f.write(data)
    import hashlib

    meta.update(state_bytes=len(data), state_sha256=hashlib.sha256(data).hexdigest())
    write_meta(path, meta)
    before = snapshot(tmp_path)
    refused(run(home, "consolidate", "-s", NAME, "--min-fill", "0"), f"session '{NAME}'", expect)
    refused(run_here(home, "chat", "-s", NAME), f"session '{NAME}'", expect)
    assert snapshot(tmp_path) == before


# -- names and symlinks ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["../x", "..", ".x", "a/b", "x" * 65, "x\n", "", "_x", "x y"])
def test_a_session_name_is_a_plain_name(golden, tmp_path, name):
    home, _ = install(golden, tmp_path)
    before = snapshot(tmp_path)
    refused(run(home, "sessions", "show", name), "is not a session name")
    for args in (
        ["sessions", "export", name],
        ["sessions", "rm", name],
        ["chat", "-s", name],
        ["chat", "--model", golden[0], "-s", name],
        ["consolidate", "-s", name],
    ):
        refused(run_here(home, *args), "is not a session name")
    assert snapshot(tmp_path) == before


def all_commands(home, model_dir):
    """(runner, args): each command as a process, but a chat that loads the tokenizer first
    (--model) in this process."""
    return [
        (run, ["sessions", "show", NAME]),
        (run, ["sessions", "export", NAME]),
        (run, ["sessions", "rm", NAME]),
        (run, ["chat", "-s", NAME]),
        (run, ["consolidate", "-s", NAME, "--min-fill", "0"]),
        (run_here, ["chat", "--model", model_dir, "-s", NAME]),
    ]


def test_a_symlinked_sessions_directory_is_refused(golden, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    home, _ = install(golden, tmp_path, where=outside / "sessions" / NAME)
    home.mkdir()
    (home / "sessions").symlink_to(outside / "sessions")
    before = snapshot(tmp_path)
    for runner, args in all_commands(home, golden[0]) + [
        (run, ["sessions", "list"]),
        (run, ["consolidate", "--all"]),
    ]:
        refused(runner(home, *args), f"{home / 'sessions'} is a symlink")
    assert snapshot(tmp_path) == before


def test_a_symlinked_session_directory_is_refused_and_its_target_untouched(golden, tmp_path):
    """The issue: `sessions rm s2` deleted the files in the target; chat and consolidate wrote
    outside the store."""
    outside = tmp_path / "outside"
    outside.mkdir()
    home, target = install(golden, tmp_path, where=outside / NAME)
    (home / "sessions").mkdir(parents=True)
    os.chmod(home, 0o700)
    (home / "sessions" / NAME).symlink_to(target)
    before = snapshot(tmp_path)
    for runner, args in all_commands(home, golden[0]) + [(run, ["consolidate", "--all"])]:
        refused(runner(home, *args), f"{home / 'sessions' / NAME} is a symlink")
    r = run(home, "sessions", "list")  # exit 1 once cli.py calls report_sessions
    assert (
        r.returncode in (0, 1) and r.stdout.startswith(f"{NAME}: ") and "is a symlink" in r.stdout
    )
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("which", ["session.json", "state file", "lock", "dangling lock"])
def test_a_symlinked_file_in_a_session_is_refused(golden, tmp_path, which):
    home, path = install(golden, tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    meta = meta_of(path)
    name = {"session.json": "session.json", "state file": meta["state_file"]}.get(which, "lock")
    if which == "dangling lock":
        target = outside / "created-through-the-link"
        os.remove(os.path.join(path, name))
    else:
        target = outside / name
        shutil.move(os.path.join(path, name), target)
    os.symlink(target, os.path.join(path, name))
    before = snapshot(tmp_path)
    commands = [["chat", "-s", NAME], ["consolidate", "-s", NAME, "--min-fill", "0"]]
    if "lock" in which:
        commands.append(["sessions", "rm", NAME])
    else:
        commands += [["sessions", "show", NAME], ["sessions", "export", NAME]]
    for args in commands:  # a chat reaching the lock has loaded the tokenizer: in this process
        runner = run_here if args[0] == "chat" and "lock" in which else run
        refused(runner(home, *args), f"session '{NAME}' is corrupt", "is a symlink")
    assert snapshot(tmp_path) == before and not os.path.lexists(
        outside / "created-through-the-link"
    )
    if "lock" not in which:  # rm unlinks the link, never what it points to
        r = run(home, "sessions", "rm", NAME)
        assert r.returncode == 0, r.stdout + r.stderr
        assert not os.path.exists(path) and snapshot(outside) == before_outside(before)


def before_outside(before):
    return {k[len("outside/") :]: v for k, v in before.items() if k.startswith("outside/")}


def test_a_fifo_as_the_state_file_is_refused_without_blocking(golden, tmp_path):
    home, path = install(golden, tmp_path)
    state = os.path.join(path, meta_of(path)["state_file"])
    os.remove(state)
    os.mkfifo(state, 0o600)
    before = snapshot(tmp_path)
    refused(run(home, "consolidate", "-s", NAME, "--min-fill", "0"), "not a regular file")
    assert snapshot(tmp_path) == before


def test_the_home_may_be_a_symlink(golden, tmp_path):
    """The home (MLX_SLEEP_HOME) is where the user puts it; nothing below it is followed."""
    real, _ = install(golden, tmp_path)
    link = tmp_path / "link"
    link.symlink_to(real)
    r = run(link, "sessions", "show", NAME)
    assert r.returncode == 0 and "user: hi" in r.stdout, r.stdout + r.stderr


def test_io_readers_refuse_links_fifos_and_deep_nesting(tmp_path):
    from mlx_sleep.config import ConfigError
    from mlx_sleep.io import lock_file, open_nofollow, read_json

    (tmp_path / "ok.json").write_text('{"a": [[1]]}')
    (tmp_path / "link.json").symlink_to(tmp_path / "ok.json")
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "bomb.json").write_text(BOMB)
    assert read_json(tmp_path / "ok.json", max_depth=3, nofollow=True) == {"a": [[1]]}
    assert read_json(tmp_path / "link.json") == {"a": [[1]]}  # the old behaviour by default
    for path, flags, match in (
        ("ok.json", {"max_depth": 2}, "deeper than 2 levels"),
        ("bomb.json", {}, "too deeply"),
        ("link.json", {"nofollow": True}, "is a symlink"),
        ("fifo", {"nofollow": True}, "is a FIFO"),
    ):
        with pytest.raises(ConfigError, match=match):
            read_json(tmp_path / path, **flags)
    with pytest.raises(ConfigError, match="is a symlink"):
        lock_file(str(tmp_path / "link.json"), "busy", nofollow=True)
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="is a symlink"):
        open_nofollow(str(tmp_path / "dangling"), os.O_RDWR | os.O_CREAT)
    assert not os.path.lexists(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="is a directory"):
        open_nofollow(str(tmp_path))


# -- the lock ----------------------------------------------------------------------------------------


def test_rm_while_a_chat_holds_the_session_is_refused(golden, tmp_path):
    home, path = install(golden, tmp_path)
    chat = pexpect.spawn(
        CLI[0],
        CLI[1:] + ["chat", "-s", NAME, "--idle-delay", "0"],
        env={**os.environ, "MLX_SLEEP_HOME": str(home), "PROMPT_TOOLKIT_NO_CPR": "1"},
        encoding="utf-8",
        timeout=120,
    )
    chat.expect_exact(">>>")
    before = snapshot(tmp_path)
    refused(run(home, "sessions", "rm", NAME), "in use by another mlx-sleep process")
    r = run(home, "consolidate", "-s", NAME, "--min-fill", "0")  # skipped, as documented
    assert r.returncode == 0 and "skipped: session 'x' is in use" in r.stdout, r.stdout + r.stderr
    assert snapshot(tmp_path) == before
    chat.sendline("/quit")
    chat.expect(pexpect.EOF)
    r = run(home, "sessions", "rm", NAME)
    assert r.returncode == 0 and not os.path.exists(path), r.stdout + r.stderr


def test_history_flag_is_bounded(golden, tmp_path):
    home, _ = install(golden, tmp_path)
    r = run_here(home, "chat", "--model", golden[0], "-s", "new", "--history", "1000000000")
    out = (r.stdout + r.stderr).strip()
    assert r.returncode == 2 and len(out.splitlines()) == 1, out  # a usage error: one line
    assert "'--history': 1000000000 is not in the range 0<=x<=64" in out, out
    assert not os.path.exists(home / "sessions" / "new")


# -- SIGKILL at every filesystem step ---------------------------------------------------------------


def killed_run(home, at, count_file, *args):
    return run_killed(at, count_file, *args, env={"MLX_SLEEP_HOME": str(home)})


def loads(golden, home):
    """The session opens with its model (every check) and what its state holds."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLX_SLEEP_HOME", str(home))
        model, _ = mlx_sleep.load(golden[0])
        s = open_session(NAME, model, golden[0], create=False, lock=False)
        return s.meta["state_sha256"], s.engine.sleeps


def test_sigkill_at_every_step_of_consolidate_leaves_the_session_loadable(golden, tmp_path):
    home, path = install(golden, tmp_path / "ref")
    args = ("consolidate", "-s", NAME, "--min-fill", "0")
    r = killed_run(home, 0, tmp_path / "n", *args)
    assert r.returncode == 0 and f"{NAME}: consolidated" in r.stdout, r.stdout + r.stderr
    steps = int((tmp_path / "n").read_text())
    old = (meta_of(golden[1])["state_sha256"], 1)
    new = loads(golden, home)
    assert new[0] != old[0] and new[1] == 2 and steps >= 10
    seen = []
    for at in range(1, steps + 1):
        home, path = install(golden, tmp_path / str(at))
        r = killed_run(home, at, tmp_path / "unused", *args)
        assert r.returncode == -signal.SIGKILL, (at, r.stdout + r.stderr)
        seen.append(loads(golden, home))  # loadable: the old session or the new one
        assert seen[-1] in (old, new), at
        mask = os.umask(0)
        try:
            r = run_here(home, *args)  # and the next run completes it
        finally:
            os.umask(mask)
        assert r.returncode == 0 and loads(golden, home) == new, (at, r.stdout + r.stderr)
        left = set(os.listdir(path)) - {
            "lock",
            "session.json",
            "state-000001.safetensors",
            "state-000002.safetensors",
        }
        assert all(f.startswith(".mlx-sleep-tmp-") for f in left), (at, left)
        for f in os.listdir(path):  # owner-only, whatever the umask
            assert os.lstat(os.path.join(path, f)).st_mode & 0o777 == 0o600, (at, f)
        assert os.lstat(path).st_mode & 0o777 == 0o700
    assert old in seen and new in seen, seen  # kills landed before and after the switch


def test_sigkill_at_every_step_of_rm_leaves_the_session_whole_or_gone(golden, tmp_path):
    home, path = install(golden, tmp_path / "ref")
    r = killed_run(home, 0, tmp_path / "n", "sessions", "rm", NAME)
    assert r.returncode == 0 and not os.path.exists(path), r.stdout + r.stderr
    steps = int((tmp_path / "n").read_text())
    assert steps >= 4
    outcomes = []
    for at in range(1, steps + 1):
        home, path = install(golden, tmp_path / str(at))
        whole = snapshot(path)
        r = killed_run(home, at, tmp_path / "unused", "sessions", "rm", NAME)
        assert r.returncode == -signal.SIGKILL, (at, r.stdout + r.stderr)
        if os.path.exists(path):  # whole: every file as it was, and it loads
            assert snapshot(path) == whole, at
            assert loads(golden, home)[0] == meta_of(golden[1])["state_sha256"]
            outcomes.append("whole")
        else:  # gone: not listed, not shown; the next write to the store removes the rest
            refused(run_here(home, "sessions", "show", NAME), f"no session '{NAME}'")
            assert run_here(home, "sessions", "list").stdout.startswith("no sessions")
            shutil.copytree(golden[1], home / "sessions" / "y")
            assert run_here(home, "sessions", "rm", "y").returncode == 0
            assert os.listdir(home / "sessions") == [], at
            outcomes.append("gone")
    assert "whole" in outcomes and "gone" in outcomes, outcomes
