"""`mlx-sleep serve` driven the way clients drive it: the real server (uvicorn on a free loopback
port, in a thread of this process) over a tiny hybrid model, the official `openai` client for
what a chat app sends, raw httpx for what no client should send, `chat` (click's runner) on the
same sessions, and the command line itself in a subprocess once. Only one server works at a
time (MLX runs one model on one thread here)."""

import contextlib
import json
import os
import re
import select
import signal
import subprocess
import sys
import threading
import time

import httpx
import mlx.core as mx
import openai
import pytest
from click.testing import CliRunner
from mlx.utils import tree_flatten

from mlx_sleep.cli import main
from mlx_sleep.cli.common import load_for_chat
from mlx_sleep.generate import chat_prompt
from mlx_sleep.serve import (
    MAX_BODY,
    MAX_MESSAGES,
    Server,
    Settings,
    host_name,
    listen,
    uvicorn_server,
)
from mlx_sleep.session import open_session, read_meta

from .tiny_models import make_model_dir

MODEL = "tiny"  # the model's id: its directory's name
ERROR_KEYS = {"message", "type", "param", "code"}


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("home"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLX_SLEEP_HOME", path)
        yield path


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    path = make_model_dir(tmp_path_factory.mktemp("models") / MODEL, "hybrid", loops=2, window=16)
    return load_for_chat(path)  # (directory, model, tokenizer)


def wait_for(condition, what, timeout=60.0):
    """Poll `condition` (no timing is asserted: the timeout only ends a hung test)."""
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.02)


@contextlib.contextmanager
def running(loaded, **settings):
    """A server on a free loopback port: (server, base url)."""
    path, model, tokenizer = loaded
    server = Server(
        model, tokenizer, path, Settings(**{"max_tokens": 12, "idle_delay": 0, **settings})
    )
    sock = listen("127.0.0.1", 0)
    uv = uvicorn_server(server)
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    wait_for(lambda: uv.started, "the server to start")
    try:
        yield server, f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        uv.should_exit = True
        thread.join(60)


@pytest.fixture(scope="module")
def plain(loaded, home):
    with running(loaded) as (server, url):
        yield server, url


def client(url, key="unused"):
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=120)


def health(url, **kw):
    return httpx.get(url + "/health", **kw).json()


def user(text):
    return {"role": "user", "content": text}


def turn(c, messages, **kw):
    """One chat turn: (the reply's text, usage, the response's X-Session header)."""
    raw = c.chat.completions.with_raw_response.create(model=MODEL, messages=messages, **kw)
    r = raw.parse()
    return r.choices[0].message.content, r.usage, raw.headers.get("x-session")


def fed(usage):
    """The prompt tokens this request fed (the rest were held from earlier turns)."""
    return usage.prompt_tokens - usage.prompt_tokens_details.cached_tokens


# -- the openai client ----------------------------------------------------------------------------


def test_the_openai_client_gets_chat_completions_models_and_health(plain, loaded):
    server, url = plain
    tokenizer = loaded[2]
    c = client(url)
    assert [m.id for m in c.models.list()] == [MODEL]
    assert c.models.retrieve(MODEL).id == MODEL
    messages = [{"role": "system", "content": "Be brief."}, user("Name a prime.")]
    r = c.chat.completions.create(model=MODEL, messages=messages, max_tokens=9)
    text, usage = r.choices[0].message.content, r.usage
    assert r.object == "chat.completion" and r.choices[0].finish_reason in ("stop", "length")
    # a new conversation: its whole rendered prompt is fed; usage counts real tokens
    assert usage.prompt_tokens == len(tokenizer.encode(chat_prompt(tokenizer, messages)))
    assert usage.prompt_tokens_details.cached_tokens == 0
    assert 1 <= usage.completion_tokens <= 9
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens

    # The same request streamed: it does not continue the first (whose memory holds the reply),
    # so it branches from it (a "regenerate") and greedy decoding gives the same reply.
    stream = c.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_completion_tokens=9,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == text
    assert chunks[-2].choices[0].finish_reason == r.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == usage.total_tokens
    assert chunks[-1].usage.completion_tokens == usage.completion_tokens
    assert all(ch.usage is None for ch in chunks[:-1])

    p = c.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=7)
    assert p.object == "text_completion" and p.usage.completion_tokens <= 7
    assert p.usage.prompt_tokens == len(tokenizer.encode("Once upon a time"))
    streamed = c.completions.create(
        model=MODEL, prompt="Once upon a time", max_tokens=7, stream=True
    )
    assert "".join(ch.choices[0].text for ch in streamed) == p.choices[0].text
    # a completion whose prompt extends the last one continues it
    more = c.completions.create(
        model=MODEL, prompt="Once upon a time" + p.choices[0].text + " The end.", max_tokens=3
    )
    assert fed(more.usage) == len(tokenizer.encode(" The end."))
    # a stop string ends the reply unseen; the next prompt goes on from what the client saw
    cut = c.completions.create(
        model=MODEL, prompt="Once upon a time", max_tokens=7, stop=[p.choices[0].text[0]]
    )
    assert cut.choices[0].text == "" and cut.choices[0].finish_reason == "stop"
    more = c.completions.create(model=MODEL, prompt="Once upon a time The end.", max_tokens=3)
    assert more.usage.prompt_tokens_details.cached_tokens == cut.usage.total_tokens
    assert fed(more.usage) == len(tokenizer.encode(" The end."))

    seeded = [
        c.chat.completions.create(
            model=MODEL, messages=[user("Roll.")], temperature=1.0, top_p=0.9, seed=7, max_tokens=8
        )
        .choices[0]
        .message.content
        for _ in range(2)
    ]
    assert seeded[0] == seeded[1]
    h = health(url)
    assert h["status"] == "ok" and h["model"] == MODEL and h["waiting"] == 0


def test_turn_k_feeds_only_its_own_tokens_and_another_history_starts_fresh(plain, loaded):
    tokenizer = loaded[2]
    c = client(plain[1])
    conversations = {"a": [user("My project is called Heron.")], "b": [user("I keep bees.")]}
    consumed = {}  # name: (the text the server's memory holds, its tokens)
    for line in ("When does it ship?", "And who works on it?", "Thanks."):
        for name, messages in conversations.items():  # two conversations, interleaved
            rendered = chat_prompt(tokenizer, messages)
            text, usage, _ = turn(c, messages)
            if name in consumed:  # it continued its own memory: only the new turn was fed
                held_text, held_tokens = consumed[name]
                assert usage.prompt_tokens_details.cached_tokens == held_tokens
                assert rendered.startswith(held_text)
                assert fed(usage) == len(tokenizer.encode(rendered[len(held_text) :]))
            else:
                assert usage.prompt_tokens_details.cached_tokens == 0
            consumed[name] = (rendered + text, usage.total_tokens)
            messages += [{"role": "assistant", "content": text}, user(line)]
    assert fed(usage) < len(tokenizer.encode(rendered)) / 2
    # An edited reply is another history: a fresh memory, never the held one.
    a = conversations["a"]
    edited = a[:1] + [{"role": "assistant", "content": "something else"}, user("Hm?")]
    _, usage, _ = turn(c, edited)
    assert usage.prompt_tokens_details.cached_tokens == 0
    # and the conversation it forked from still has its memory
    _, usage, _ = turn(c, a)
    assert usage.prompt_tokens_details.cached_tokens == consumed["a"][1]


# -- what no client should send -------------------------------------------------------------------

OK = {"model": MODEL, "messages": [user("hi")], "max_tokens": 2}
BAD = [  # (body: an object, or raw bytes; headers; status; code; param)
    (b"{bad", {}, 400, "invalid_json", None),
    (b"[1, 2]", {}, 400, "invalid_json", None),
    (b"\xff\xfe{}", {}, 400, "invalid_json", None),
    (b"", {}, 400, "invalid_json", None),
    (b"[" * 100 + b"]" * 100, {}, 400, "invalid_json", None),
    (dict(OK, model=None), {}, 400, "invalid_value", "model"),
    (dict(OK, model="gpt-4o"), {}, 404, "model_not_found", "model"),
    (dict(OK, messages="hi"), {}, 400, "invalid_value", "messages"),
    (dict(OK, messages=[]), {}, 400, "invalid_value", "messages"),
    (dict(OK, messages=[{"role": "robot", "content": "x"}]), {}, 400, "invalid_value", None),
    (dict(OK, messages=[{"role": "user", "content": 5}]), {}, 400, "invalid_value", None),
    (
        dict(OK, messages=[{"role": "user", "content": [{"type": "image_url"}]}]),
        {},
        400,
        None,
        None,
    ),
    (dict(OK, messages=[user("x")] * (MAX_MESSAGES + 1)), {}, 400, "too_many_messages", None),
    (dict(OK, max_tokens="12"), {}, 400, "invalid_value", "max_tokens"),
    (dict(OK, max_tokens=0), {}, 400, "invalid_value", "max_tokens"),
    (dict(OK, max_tokens=True), {}, 400, "invalid_value", "max_tokens"),
    (dict(OK, max_completion_tokens=10**9), {}, 400, "invalid_value", "max_completion_tokens"),
    (dict(OK, temperature="hot"), {}, 400, "invalid_value", "temperature"),
    (dict(OK, temperature=-1), {}, 400, "invalid_value", "temperature"),
    (
        b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}',
        {},
        400,
        "invalid_value",
        "temperature",
    ),
    (dict(OK, top_p=2), {}, 400, "invalid_value", "top_p"),
    (dict(OK, stop=[1]), {}, 400, "invalid_value", "stop"),
    (dict(OK, stop=["a", "b", "c", "d", "e"]), {}, 400, "invalid_value", "stop"),
    (dict(OK, seed=-1), {}, 400, "invalid_value", "seed"),
    (dict(OK, stream="yes"), {}, 400, "invalid_value", "stream"),
    (dict(OK, stream_options=[]), {}, 400, "invalid_value", "stream_options"),
    (dict(OK, n=2), {}, 400, "unsupported_parameter", "n"),
    (dict(OK, n=0), {}, 400, "unsupported_parameter", "n"),
    (dict(OK, logprobs=True), {}, 400, "unsupported_parameter", "logprobs"),
    (dict(OK, tools=[{"type": "function"}]), {}, 400, "unsupported_parameter", "tools"),
    (dict(OK, user="../evil"), {}, 400, "invalid_session_name", "user"),
    (dict(OK, user=5), {}, 400, "invalid_session_name", "user"),
    (OK, {"X-Session": "a/b"}, 400, "invalid_session_name", "user"),
    (OK, {"X-Session": ".hidden"}, 400, "invalid_session_name", "user"),
    (OK, {"X-Session": ".."}, 400, "invalid_session_name", "user"),
    (OK, {"X-Session": "x" * 65}, 400, "invalid_session_name", "user"),
]
BAD_COMPLETIONS = [
    ({"model": MODEL, "prompt": ""}, {}, 400, "invalid_value", "prompt"),
    ({"model": MODEL, "prompt": [1, 2, 3]}, {}, 400, "invalid_value", "prompt"),
    ({"model": MODEL, "prompt": "a", "echo": True}, {}, 400, "unsupported_parameter", "echo"),
    ({"model": MODEL, "prompt": "a", "best_of": 2}, {}, 400, "unsupported_parameter", "best_of"),
    ({"model": MODEL, "prompt": "a"}, {"X-Session": "s"}, 400, "unsupported_parameter", "user"),
]


def check_error(r, status, code=None, param=None):
    assert r.status_code == status, r.text
    assert "Traceback" not in r.text and r.headers["content-type"] == "application/json"
    error = r.json()["error"]
    assert set(error) == ERROR_KEYS and error["message"], error
    if code is not None:
        assert error["code"] == code, error
    if param is not None:
        assert error["param"] == param, error


def test_bad_requests_are_4xx_json_errors_and_reach_no_model(plain, home):
    server, url = plain
    requests_before = server.stats["requests"]
    store_before = sorted(os.listdir(home))
    json_body = {"Content-Type": "application/json"}
    with httpx.Client(base_url=url, timeout=60, headers=json_body) as h:
        for path, cases in (("/v1/chat/completions", BAD), ("/v1/completions", BAD_COMPLETIONS)):
            for body, headers, status, code, param in cases:
                content = body if isinstance(body, bytes) else json.dumps(body).encode()
                r = h.post(path, content=content, headers=headers)
                check_error(r, status, code, param)
        surrogate = json.dumps(OK).replace('"hi"', '"\\ud800"').encode()
        check_error(h.post("/v1/chat/completions", content=surrogate), 400, "invalid_value")
        too_big = b" " * (MAX_BODY + 1)
        check_error(h.post("/v1/chat/completions", content=too_big), 413, "request_too_large")

        def chunked():  # no Content-Length: counted as it arrives
            for _ in range(MAX_BODY // (1 << 16) + 2):
                yield b" " * (1 << 16)

        check_error(h.post("/v1/chat/completions", content=chunked()), 413, "request_too_large")
        # what a page on another site can send without asking (no CORS preflight): a "simple"
        # text/plain or form POST, and a name of its own rebound to 127.0.0.1 (DNS rebinding)
        ok = json.dumps(OK).encode()
        for kind in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data"):
            r = h.post("/v1/chat/completions", content=ok, headers={"Content-Type": kind})
            check_error(r, 415, "unsupported_media_type")
        r = h.post("/v1/chat/completions", content=ok, headers={"Host": "evil.example:8080"})
        check_error(r, 403, "invalid_host")
        check_error(h.get("/v1/models", headers={"Host": "attacker.test"}), 403, "invalid_host")
        assert h.get("/v1/models", headers={"Host": "localhost:1"}).status_code == 200
        assert [host_name(x) for x in ("[::1]:80", "127.0.0.1:8080", "localhost")] == [
            "::1",
            "127.0.0.1",
            "localhost",
        ]
        check_error(h.get("/v1/nothing"), 404, "not_found")
        check_error(h.get("/v1/chat/completions"), 405, "method_not_allowed")
        check_error(h.get("/v1/models/gpt-4o"), 404, "model_not_found")
    assert server.stats["requests"] == requests_before
    assert sorted(os.listdir(home)) == store_before  # no name reached the store
    assert not os.path.exists(os.path.join(os.path.dirname(home), "evil"))
    assert health(url)["status"] == "ok"


# -- sessions ---------------------------------------------------------------------------------


def test_a_named_session_is_chats_session_and_back(plain, loaded, home):
    server, url = plain
    tokenizer = loaded[2]
    c = client(url)
    messages = [user("Remember: the code word is heron.")]
    text, usage, header = turn(c, messages, extra_headers={"X-Session": "trip"})
    assert header == "trip" and usage.prompt_tokens_details.cached_tokens == 0
    messages += [{"role": "assistant", "content": text}, user("What is it?")]
    text, usage, _ = turn(c, messages, user="trip")  # the `user` field names it too
    assert usage.prompt_tokens_details.cached_tokens > 0
    messages.append({"role": "assistant", "content": text})
    meta = read_meta("trip")
    assert meta["transcript"]["messages"] == messages
    assert meta["engine"]["offset"] == usage.total_tokens

    r = CliRunner().invoke(
        main, ["chat", "--session", "trip", "-m", "6", "--idle-delay", "0"], input="And now?\n"
    )
    assert r.exit_code == 0, r.output
    meta = read_meta("trip")
    assert meta["transcript"]["messages"][:4] == messages
    assert meta["transcript"]["messages"][4] == user("And now?")

    # back in the server: the session chat continued is reloaded, and only the new turn is fed
    messages = meta["transcript"]["messages"] + [user("Once more?")]
    _, usage, _ = turn(c, messages, extra_headers={"X-Session": "trip"})
    assert usage.prompt_tokens_details.cached_tokens == meta["engine"]["offset"]
    rendered = chat_prompt(tokenizer, messages)
    assert fed(usage) == len(tokenizer.encode(rendered[len(meta["transcript"]["fed_text"]) :]))

    # open elsewhere (a chat holds its lock): refused, not waited on
    model = loaded[1]
    other = open_session("trip", model, loaded[0])
    try:
        r = httpx.post(
            url + "/v1/chat/completions",
            json=dict(OK, messages=messages),
            headers={"X-Session": "trip"},
        )
        check_error(r, 409, "session_in_use")
    finally:
        other.close()

    # another history under the same name, matching no point it can branch from: a fresh
    # memory (the request is what counts)
    _, usage, how = exchange(c, [user("A new topic.")], extra_headers={"X-Session": "trip"})
    assert usage.prompt_tokens_details.cached_tokens == 0 and how == "reset"
    assert read_meta("trip")["transcript"]["messages"][0] == user("A new topic.")


# -- a diverged history branches from the last point that matches -------------------------------


def exchange(c, messages, **kw):
    """One chat turn: (the reply's text, usage, what the history did: the X-History header)."""
    raw = c.chat.completions.with_raw_response.create(model=MODEL, messages=messages, **kw)
    r = raw.parse()
    return r.choices[0].message.content, r.usage, raw.headers["x-history"]


def play(c, lines, **kw):
    """A conversation of one turn per user line: (its messages, replies included, the last
    turn's usage)."""
    messages = []
    for line in lines:
        messages.append(user(line))
        text, usage, _ = exchange(c, messages, **kw)
        messages.append({"role": "assistant", "content": text})
    return messages, usage


def unnamed(server, messages):
    """The held unnamed conversation whose messages are `messages` (the most recent of those)."""
    return [h.conv for h in server.held.values() if h.conv.messages == messages][-1]


def on_worker(server, fn, *args):
    """Run fn on the server's worker thread (its arrays live on that thread's stream)."""
    return server.worker.submit(fn, *args).result()


def same_memory(a, b):
    """Two engines hold the same memory, bit for bit: positions, the tokens of the live and
    pending windows, the state the live window began with, and the fast weights once each has
    consolidated all of it. A window's wake pass fed in one piece and in several differs within
    float rounding, so the states it leads to before a sleep are compared only where a sleep
    recomputed them from the tokens: not the start states of pending windows (deferred sleep),
    and every state after consolidating. Forks: the server's engines stay as they are."""
    assert (a.offset, a.window_start, a.sleeps) == (b.offset, b.window_start, b.sleeps)
    ids = lambda e: mx.concatenate(e.window_ids, axis=1).tolist() if e.window_ids else []  # noqa: E731
    assert ids(a) == ids(b)
    assert [(i.tolist(), s) for i, _, s in a.pending] == [(i.tolist(), s) for i, _, s in b.pending]
    if not a.pending:
        assert_same_state(a.window_start_state, b.window_start_state)
    a, b = a.fork(), b.fork()
    assert a.consolidate() and b.consolidate()
    assert_same_state(a.state, b.state)


def assert_same_state(x, y):
    fx, fy = dict(tree_flatten(x)), dict(tree_flatten(y))
    assert sorted(fx) == sorted(fy)
    for k in fx:
        assert mx.array_equal(fx[k], fy[k]).item(), k


LINES = ["Hello, I am Ada.", "I write compilers.", "Mostly for DSP chips.", "Any advice?"]


def test_a_regenerated_reply_branches_from_the_live_window_start(plain, loaded):
    server, url = plain
    tokenizer = loaded[2]
    c = client(url)
    messages, _ = play(c, LINES, max_tokens=3)
    conv = unnamed(server, messages)
    held, window_start = conv.engine.offset, conv.engine.window_start
    regenerate = messages[:-1]  # what a chat app sends for "regenerate"
    prompt_end = dict((c, p) for p, c in conv.marks)[len(chat_prompt(tokenizer, regenerate))]
    assert window_start <= prompt_end < held  # the texts are chosen for this
    text, usage, how = exchange(c, regenerate, max_tokens=3)
    # rewound to the live window's start; the prompt's tokens since then are fed again
    assert how == "branched" and usage.prompt_tokens_details.cached_tokens == window_start
    assert usage.prompt_tokens == prompt_end
    branched = unnamed(server, regenerate + [{"role": "assistant", "content": text}])
    assert branched.fed_text == chat_prompt(tokenizer, regenerate) + text
    # the conversation it came from is still held as it was
    assert conv.engine.offset == held and conv.messages == messages

    # a fresh conversation fed the same history, turn by turn (named: nothing to branch from)
    reference, _ = play(c, LINES, max_tokens=3, user="regenerate-reference")
    assert reference == branched.messages
    reference_engine = server.held[("session", "regenerate-reference")].conv.engine
    on_worker(server, same_memory, branched.engine, reference_engine)
    # and it goes on like any conversation
    assert exchange(c, reference + [user("Thanks.")], max_tokens=3)[2] == "continued"


def test_an_edit_two_windows_back_branches_from_a_snapshot_and_is_saved(plain, loaded, home):
    server, url = plain
    c = client(url)
    lines = LINES + ["Which language?", "Rust, then.", "Good night."]
    messages, _ = play(c, lines, max_tokens=3, user="edited")
    session = server.held[("session", "edited")].conv
    L, window_start = session.engine.sleep.window, session.engine.window_start
    starts = [s for _, s in session.engine.snapshots]
    edited = messages[:-2] + [user("Good morning, then.")]  # "edit my last message"
    text, usage, how = exchange(c, edited, max_tokens=3, user="edited")
    point = usage.prompt_tokens_details.cached_tokens
    assert how == "branched" and point in starts and point <= window_start - 2 * L

    lines = lines[:-1] + [edited[-1]["content"]]
    reference, last = play(c, lines, max_tokens=3, user="edited-reference")
    assert reference == edited + [{"role": "assistant", "content": text}]
    assert usage.prompt_tokens == last.prompt_tokens
    ref = server.held[("session", "edited-reference")].conv
    on_worker(server, same_memory, session.engine, ref.engine)
    assert session.fed_text == ref.fed_text
    assert session.replay_ids == ref.replay_ids[len(ref.replay_ids) - len(session.replay_ids) :]

    # saved as it is held: reopened, the same memory and the same record to branch from
    meta = read_meta("edited")
    assert meta["transcript"]["messages"] == reference
    reopened = on_worker(server, open_session, "edited", loaded[1], loaded[0])
    try:
        on_worker(server, same_memory, reopened.engine, session.engine)
        assert reopened.recorded() and reopened.replay_start == session.replay_start
        assert (reopened.replay_ids, reopened.marks) == (session.replay_ids, session.marks)
    finally:
        reopened.close()
    # and the server goes on with it
    _, usage, how = exchange(c, reference + [user("Bye.")], max_tokens=3, user="edited")
    assert how == "continued"
    assert usage.prompt_tokens_details.cached_tokens == meta["engine"]["offset"]


def test_a_deferred_conversation_branches_from_a_pending_window(loaded, home):
    """--defer-sleep: an edit inside a pending window rewinds to its start, the windows before
    it still pending; the memory is what a fresh conversation fed the same text holds."""
    with running(loaded, defer=True, max_pending=16) as (server, url):
        c = client(url)
        lines = ["Notes: " + "alpha beta " * 4, "More: " + "gamma delta " * 4, "Last line."]
        messages, _ = play(c, lines, max_tokens=3)
        engine = unnamed(server, messages).engine
        assert len(engine.pending) >= 3 and engine.sleeps == 0
        edited = messages[:2] + [user("More: something else entirely.")]
        text, usage, how = exchange(c, edited, max_tokens=3)
        starts = [s for _, _, s in engine.pending]
        assert how == "branched" and usage.prompt_tokens_details.cached_tokens in starts
        branched = unnamed(server, edited + [{"role": "assistant", "content": text}])
        assert branched.engine.pending and branched.engine.sleeps == 0
        lines = [lines[0], edited[-1]["content"]]
        reference, _ = play(c, lines, max_tokens=3, user="deferred-ref")
        assert reference == branched.messages
        reference_engine = server.held[("session", "deferred-ref")].conv.engine
        on_worker(server, same_memory, branched.engine, reference_engine)


def test_an_edit_at_an_idle_sleeps_boundary_feeds_only_the_new_text(loaded, home):
    """An idle sleep between turns leaves a boundary exactly at a turn's start: an edit of that
    turn rewinds there and feeds its new text alone, and the record before it is kept."""
    with running(loaded, idle_delay=0.2, idle_fill=0.0, history=4) as (server, url):
        c = client(url)
        tokenizer = loaded[2]
        messages = []
        for line in LINES[:3]:
            messages.append(user(line))
            text, _, _ = exchange(c, messages, max_tokens=3, user="idle-edit")
            messages.append({"role": "assistant", "content": text})
            conv = server.held[("session", "idle-edit")].conv
            wait_for(lambda: conv.engine.window_len == 0, "the idle sleep")
        # the last turn began where the text held after the turn before it ends
        held_text = len(chat_prompt(tokenizer, messages[:3])) + len(messages[3]["content"])
        turn_start = dict((c, p) for p, c in conv.marks)[held_text]
        assert turn_start in conv.engine.boundaries()  # the idle sleep's
        marks_before = [m for m in conv.marks if m[0] < turn_start]
        edited = messages[:-2] + [user("I write databases.")]
        _, usage, how = exchange(c, edited, max_tokens=3, user="idle-edit")
        assert how == "branched" and usage.prompt_tokens_details.cached_tokens == turn_start
        new_text = chat_prompt(tokenizer, edited)[held_text:]
        assert fed(usage) == len(tokenizer.encode(new_text))
        assert marks_before and conv.marks[: len(marks_before)] == marks_before


def test_another_keys_conversation_is_never_branched_from(loaded, home):
    with running(loaded, api_keys=("key-one", "key-two")) as (server, url):
        one, two = client(url, "key-one"), client(url, "key-two")
        messages, _ = play(one, LINES[:3], max_tokens=3)
        regenerate = messages[:-1]
        # key two sends key one's history: a fresh memory, never key one's
        _, usage, how = exchange(two, regenerate, max_tokens=3)
        assert how == "new" and usage.prompt_tokens_details.cached_tokens == 0
        _, usage, how = exchange(one, regenerate, max_tokens=3)
        assert how == "branched" and usage.prompt_tokens_details.cached_tokens > 0


def test_api_keys_namespace_sessions_and_cors(loaded, home, plain):
    keys = ("key-one", "key-two")
    with running(loaded, api_keys=keys, cors=("http://app.example",)) as (server, url):
        for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic key-one"}):
            for r in (
                httpx.get(url + "/health", headers=headers),
                httpx.get(url + "/v1/models", headers=headers),
                httpx.post(url + "/v1/chat/completions", json=OK, headers=headers),
            ):
                check_error(r, 401, "invalid_api_key")
        with pytest.raises(openai.AuthenticationError):
            client(url, "nope").models.list()
        one, two = client(url, "key-one"), client(url, "key-two")
        messages = [user("My secret is 42.")]
        text, usage, header = turn(one, messages, user="notes")
        assert header.endswith("-notes") and header != "notes"
        messages += [{"role": "assistant", "content": text}, user("What is my secret?")]
        # key two, same session name, key one's history: nothing of key one's memory
        _, usage, header2 = turn(two, messages, user="notes")
        assert usage.prompt_tokens_details.cached_tokens == 0 and header2 != header
        _, usage, _ = turn(one, messages, user="notes")
        assert usage.prompt_tokens_details.cached_tokens > 0
        sessions = os.listdir(os.path.join(home, "sessions"))
        assert header in sessions and header2 in sessions and "notes" not in sessions
        # unnamed conversations are matched within a key only
        start = [user("Unnamed, key one.")]
        text, _, _ = turn(one, start)
        follow = start + [{"role": "assistant", "content": text}, user("Go on.")]
        assert turn(two, follow)[1].prompt_tokens_details.cached_tokens == 0
        assert turn(one, follow)[1].prompt_tokens_details.cached_tokens > 0

        preflight = {
            "Origin": "http://app.example",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        }
        r = httpx.options(url + "/v1/chat/completions", headers=preflight)
        assert r.status_code == 200
        assert r.headers["access-control-allow-origin"] == "http://app.example"
        r = httpx.options(
            url + "/v1/chat/completions", headers=dict(preflight, Origin="http://evil.example")
        )
        assert r.headers.get("access-control-allow-origin") != "http://evil.example"
    # CORS is off unless asked for
    r = httpx.options(plain[1] + "/v1/chat/completions", headers=preflight)
    assert "access-control-allow-origin" not in r.headers


# -- concurrency ---------------------------------------------------------------------------------


def test_a_full_queue_is_429_and_a_client_leaving_stops_its_reply(loaded, home):
    tokenizer = loaded[2]
    with running(loaded, queue=0) as (server, url):
        gate = threading.Event()
        server.worker.submit(gate.wait)  # the model is busy until the gate opens
        answers = []
        waiting = threading.Thread(
            target=lambda: answers.append(
                httpx.post(url + "/v1/chat/completions", json=OK, timeout=120)
            )
        )
        waiting.start()
        wait_for(lambda: health(url)["waiting"] == 1, "the first request to be queued")
        check_error(httpx.post(url + "/v1/chat/completions", json=OK), 429, "queue_full")
        assert httpx.post(url + "/v1/chat/completions", json=OK).json()["error"]["type"] == (
            "rate_limit_error"
        )
        gate.set()
        waiting.join(120)
        assert answers[0].status_code == 200, answers[0].text

        # A stream whose reader leaves after its first piece: the reply stops there, and what
        # the engine consumed is recorded, so the conversation goes on from it.
        before = dict(server.stats)
        messages = [user("Tell me a very long story.")]
        body = {"model": MODEL, "messages": messages, "max_tokens": 60000, "stream": True}
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=120) as r:
            for line in r.iter_lines():
                if '"content": "' in line and '"content": ""' not in line:
                    break
        wait_for(lambda: server.stats["interrupted"] == before["interrupted"] + 1, "the stop")
        wait_for(lambda: health(url)["waiting"] == 0, "the worker to be free")
        generated = server.stats["generated_tokens"] - before["generated_tokens"]
        assert 1 <= generated < 60000
        before = dict(server.stats)
        # A client that stops waiting for a whole (non-streamed) reply stops it too.
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url + "/v1/chat/completions", json=dict(body, stream=False), timeout=1)
        wait_for(lambda: server.stats["interrupted"] == before["interrupted"] + 1, "the stop")
        wait_for(lambda: health(url)["waiting"] == 0, "the worker to be free")

        conv = next(h.conv for h in server.held.values() if h.conv.messages[0] == messages[0])
        partial, held = conv.messages[-1]["content"], conv.engine.offset
        assert held == len(tokenizer.encode(chat_prompt(tokenizer, messages))) + generated
        _, usage, _ = turn(
            client(url), messages + [{"role": "assistant", "content": partial}, user("Go on.")]
        )
        assert usage.prompt_tokens_details.cached_tokens == held


# -- sleeping when idle ----------------------------------------------------------------------------


def test_idle_sleep_consolidates_and_a_request_cancels_it(loaded, home):
    with running(loaded, idle_delay=0.2, idle_fill=0.0) as (server, url):
        sleeping, passes = threading.Event(), []

        def hold_the_first_pass(i, n):
            """The first idle sleep waits after its first pass until a request has arrived,
            which cancels it (consolidate asks between passes)."""
            passes.append(i)
            if not sleeping.is_set():
                sleeping.set()
                wait_for(lambda: server.waiting > 0, "a request during the sleep")

        server.on_idle_pass = hold_the_first_pass
        c = client(url)
        messages = [user("Note this down.")]
        text, usage, _ = turn(c, messages, user="idle")
        held = usage.total_tokens
        wait_for(sleeping.is_set, "the idle sleep")
        messages += [{"role": "assistant", "content": text}, user("And this.")]
        text, usage, _ = turn(c, messages, user="idle")  # arrives mid-sleep
        assert server.stats["idle_cancelled"] == 1 and server.stats["idle_sleeps"] == 0
        # the cancelled sleep left the memory as it was: everything held, nothing re-fed
        assert usage.prompt_tokens_details.cached_tokens == held

        wait_for(lambda: server.stats["idle_sleeps"] == 1, "the next idle sleep")
        meta = read_meta("idle")
        engine = meta["engine"]
        assert engine["offset"] == usage.total_tokens  # nothing fed while it slept
        assert engine["window_start"] == engine["offset"]  # the window was consolidated
        assert passes[-2:] == [1, 2]
        messages += [{"role": "assistant", "content": text}, user("Last one.")]
        _, usage, _ = turn(c, messages, user="idle")
        assert usage.prompt_tokens_details.cached_tokens == engine["offset"]


def test_deferred_sleep_runs_no_pass_in_a_request_and_the_idle_sleep_deepens(loaded, home):
    """--defer-sleep: the windows a request fills wait (no consolidation in the request, the
    named session saved with them pending); the idle sleep deepens them, though the live
    window is below --idle-fill."""
    with running(loaded, idle_delay=0.3, idle_fill=1.0, defer=True, max_pending=8) as (
        server,
        url,
    ):
        passes, checked = [], threading.Event()

        def after_the_check(i, n):  # the sleep saves when done: hold it until then
            passes.append(i)
            wait_for(checked.is_set, "the saved session to be read")

        server.on_idle_pass = after_the_check
        turn(client(url), [user("A long note to keep: " + "abc " * 12)], user="deferred")
        meta = read_meta("deferred")
        checked.set()
        pending = meta["engine"]["pending_starts"]
        assert len(pending) >= 3 and meta["engine"]["sleeps"] == 0
        wait_for(lambda: server.stats["idle_sleeps"] == 1, "the idle sleep")
        meta = read_meta("deferred")
        assert "pending_starts" not in meta["engine"]
        assert meta["engine"]["sleeps"] == len(pending) and len(passes) == 2 * len(pending)


# -- the command line ------------------------------------------------------------------------------


def test_the_command_line_serves_until_ctrl_c(loaded, home):
    env = {
        **os.environ,
        "MLX_SLEEP_HOME": home,
        "MLX_SLEEP_API_KEY": "secret",
        "PYTHONUNBUFFERED": "1",
    }
    args = ["serve", "--model", loaded[0], "--port", "0", "--idle-delay", "0", "-m", "4"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlx_sleep.cli", *args],
        env=env,
        stderr=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        lines, end = [], time.monotonic() + 120
        while not any("[serving" in line for line in lines):
            assert proc.poll() is None and time.monotonic() < end, "".join(lines)
            if select.select([proc.stderr], [], [], 1)[0]:
                lines.append(proc.stderr.readline())
        line = next(line for line in lines if "[serving" in line)
        assert (
            f"[serving {MODEL} (N = 2, L = 16, hard eviction)" in line
            and "API key required" in line
        )
        url = re.search(r"(http://127\.0\.0\.1:\d+)/v1", line).group(1)
        check_error(httpx.get(url + "/v1/models"), 401, "invalid_api_key")
        text, usage, _ = turn(client(url, "secret"), [user("hi")])
        assert usage.completion_tokens <= 4
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0 and "[stopped" in err and "Traceback" not in err, err


def test_the_command_line_refuses_a_port_in_use_in_one_line(loaded, home):
    sock = listen("127.0.0.1", 0)
    port = str(sock.getsockname()[1])
    try:
        r = CliRunner().invoke(main, ["serve", "--model", loaded[0], "--port", port])
    finally:
        sock.close()
    assert r.exit_code == 1 and r.output.count("\n") == 1, r.output
    assert f"cannot listen on 127.0.0.1:{port}" in r.output


# -- SIGKILL ------------------------------------------------------------------------------------

SERVE_KILL_POINTS = 4  # in the default suite; every filesystem step with -m slow


def serve_until_done(loaded, home, at, count_file):
    """`mlx-sleep serve` in a process SIGKILLed just before its `at`-th filesystem step (0:
    never): one turn on the named session "k", its idle sleep, then Ctrl-C. Returns the exit
    status once the process has ended, however it ended."""
    from .reliability import KILLER

    env = {
        **os.environ,
        "MLX_SLEEP_HOME": home,
        "KILL_AT": str(at),
        "KILL_COUNT": str(count_file),
        "PYTHONUNBUFFERED": "1",
    }
    args = ["serve", "--model", loaded[0], "--port", "0", "-m", "4"]
    args += ["--idle-delay", "0.2", "--idle-fill", "0"]
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLER, *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        url, end = None, time.monotonic() + 120
        while url is None and proc.poll() is None:
            assert time.monotonic() < end, "the server did not start"
            if select.select([proc.stderr], [], [], 1)[0]:
                found = re.search(r"(http://127\.0\.0\.1:\d+)/v1", proc.stderr.readline())
                url = found and found.group(1)
        if url is not None:
            with contextlib.suppress(httpx.HTTPError):
                body = {"model": MODEL, "messages": [user("remember 42")], "max_tokens": 4}
                httpx.post(url + "/v1/chat/completions", json=body, headers={"X-Session": "k"})

            def slept_or_gone():
                try:
                    return health(url, timeout=5)["idle_sleeps"] >= 1
                except httpx.HTTPError:
                    return proc.poll() is not None

            wait_for(slept_or_gone, "the idle sleep", timeout=120)
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        return proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_a_killed_server_leaves_its_sessions_loadable(loaded, tmp_path, request):
    """SIGKILL at a filesystem step of the server (saving a turn, sleeping when idle, saving
    the sleep): the session is absent or opens, shows and continues in `chat`."""
    home = tmp_path / "home"
    assert serve_until_done(loaded, str(home), 0, tmp_path / "count") == 0
    steps = int((tmp_path / "count").read_text())
    assert steps >= 5, steps
    most = None if request.config.getoption("-m") == "slow" else SERVE_KILL_POINTS
    from .reliability import cli, kill_points

    killed, previous = 0, os.environ.get("MLX_SLEEP_HOME")
    for at in kill_points(steps, most):
        home = tmp_path / f"k{at}"
        status = serve_until_done(loaded, str(home), at, tmp_path / "unused")
        assert status in (-9, 0), (at, status)  # 0: this run took fewer steps than the count
        killed += status == -9
        os.environ["MLX_SLEEP_HOME"] = str(home)
        try:
            if (home / "sessions" / "k" / "session.json").exists():
                code, output = cli("sessions", "show", "k")
                assert code == 0, (at, output)
            code, output = cli("chat", "--model", loaded[0], "-s", "k", "-m", "2", input="hi\n")
            assert code == 0, (at, output)
        finally:
            if previous is None:
                del os.environ["MLX_SLEEP_HOME"]
            else:
                os.environ["MLX_SLEEP_HOME"] = previous
    assert killed >= len(kill_points(steps, most)) - 1, killed
