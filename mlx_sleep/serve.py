"""`mlx-sleep serve`: an OpenAI-compatible local server over the sleep engine (docs/serve.md).

    POST /v1/chat/completions   messages in, the assistant's reply out (stream: server-sent events)
    POST /v1/completions        a prompt in, its continuation out
    GET  /v1/models             the one model served
    GET  /health                the server's counters

Clients resend the whole conversation every turn. The server holds conversations in memory
(their engine and the text it consumed) and matches each request to the one it continues: a
request that names a session (`X-Session` header or the `user` field) gets that on-disk session,
the same one `chat --session` opens; any other request continues the held conversation whose
messages are the longest prefix of its own. Only what is new is fed (turn k costs its own
tokens). A history that does not continue the held one (a regenerated reply, an edited message)
branches from the latest point held whose text is a prefix of its own, or else starts a fresh
memory, so no request is ever answered from memory of text it does not hold; the response's
X-History header says which (continued, branched, new, reset).

One model, one worker thread: every request and every idle sleep runs on it, one at a time, so
the event loop never waits on the model. At most `queue` requests wait behind the running one;
more get 429. A request arriving during an idle sleep cancels it between two passes.
"""

import asyncio
import concurrent.futures
import contextlib
import copy
import hashlib
import hmac
import json
import os
import socket
import sys
import threading
import time
import traceback
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional

import mlx.core as mx

from .chat import idle_sleep_due, live_window_due, record_turn, sleep_when_idle
from .config import ConfigError, SleepConfig, show
from .generate import Reply, chat_prompt, make_sampling, stream_reply
from .io import parse_json
from .session import (
    Conversation,
    SessionEngine,
    SessionError,
    SessionInUse,
    check_name,
    open_session,
    read_meta,
)

MAX_BODY = 4 << 20  # bytes in a request body (413 above)
MAX_MESSAGES = 1024  # messages in one chat request
MAX_TOKENS = 1 << 16  # the most a request may ask to generate
MAX_STOPS = 4  # OpenAI's limit on stop strings
MAX_DEPTH = 16  # JSON nesting of a request (a chat request nests 4 deep)
SEED_MAX = 2**63 - 1
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
# Parameters OpenAI defines that this server cannot honour: refused when given a value that
# would change the answer (a client must not believe it got what it asked for).
UNSUPPORTED = {
    "logprobs": lambda v: v not in (None, False, 0),
    "top_logprobs": lambda v: v not in (None, 0),
    "logit_bias": lambda v: v not in (None, {}),
    "presence_penalty": lambda v: v not in (None, 0),
    "frequency_penalty": lambda v: v not in (None, 0),
    "tools": lambda v: v not in (None, []),
    "functions": lambda v: v not in (None, []),
    "tool_choice": lambda v: v not in (None, "none", "auto"),
    "response_format": lambda v: v not in (None, {"type": "text"}),
    "echo": lambda v: v not in (None, False),
    "best_of": lambda v: v not in (None, 1),
    "suffix": lambda v: v not in (None, ""),
}


@dataclass
class Settings:
    """What `mlx-sleep serve`'s flags set: request defaults, sleep settings and limits."""

    max_tokens: int = 512
    temp: float = 0.0
    top_p: float = 0.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: Optional[float] = None
    stop: tuple = ()
    system_prompt: Optional[str] = None  # for requests that carry no system message
    sleep: Optional[SleepConfig] = None  # overrides the model's, for new conversations
    history: int = 3  # /forget snapshots of a named session (as chat keeps them)
    idle_delay: float = 60.0  # 0: never sleep when idle
    idle_fill: float = 0.5
    defer: bool = False  # deferred sleep: no reply waits for a window's passes
    max_pending: int = 4
    max_sessions: int = 8  # conversations held in memory
    queue: int = 8  # requests that may wait behind the running one
    api_keys: tuple = ()
    cors: tuple = ()
    # The names a request's Host header may carry (None: any, when listening beyond loopback):
    # a web page that rebinds its own name to 127.0.0.1 is refused (DNS rebinding).
    hosts: Optional[tuple] = ("127.0.0.1", "localhost", "::1")


class ApiError(Exception):
    """A refused request: its HTTP status and OpenAI's error body."""

    def __init__(self, status, message, code=None, param=None, kind="invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.kind = (
            status,
            message,
            code,
            param,
            kind,
        )

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        }


# -- reading a request ---------------------------------------------------------------------------


def bad(param, message, code="invalid_value"):
    return ApiError(400, f"'{param}' {message}", code, param)


def get_int(body, name, lo, hi, default=None):
    v = body.get(name)
    if v is None:
        return default
    if type(v) is not int or not lo <= v <= hi:
        raise bad(name, f"must be an integer in {lo}..{hi} (got {show(v)})")
    return v


def get_number(body, name, lo, hi, default=None):
    v = body.get(name)
    if v is None:
        return default
    if type(v) not in (int, float) or not lo <= v <= hi:  # NaN fails the comparison
        raise bad(name, f"must be a number in {lo:g}..{hi:g} (got {show(v)})")
    return float(v)


def get_bool(body, name, default=False):
    v = body.get(name)
    if v is None:
        return default
    if type(v) is not bool:
        raise bad(name, f"must be true or false (got {show(v)})")
    return v


def check_text(value, param) -> str:
    """A string that is Unicode text (JSON's \\ud800 escapes give lone surrogates, which no
    tokenizer takes)."""
    if type(value) is not str:
        raise bad(param, f"must be a string (got {show(value)})")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise bad(param, "is not valid Unicode text (a lone surrogate)")
    return value


def get_stop(body, default):
    v = body.get("stop")
    if v is None:
        return list(default)
    stops = [v] if type(v) is str else v
    if type(stops) is not list or len(stops) > MAX_STOPS:
        raise bad("stop", f"must be a string or a list of at most {MAX_STOPS} strings")
    return [check_text(s, "stop") for s in stops if s != ""]


def check_unsupported(body):
    for name, given in UNSUPPORTED.items():
        if name in body and given(body[name]):
            raise ApiError(
                400,
                f"'{name}' is not supported by mlx-sleep serve (got {show(body[name])})",
                "unsupported_parameter",
                name,
            )
    n = body.get("n")
    if n is not None and n != 1:
        raise ApiError(400, f"'n' must be 1 (got {show(n)})", "unsupported_parameter", "n")


def message_content(content, where) -> str:
    """A message's content: a string, or a list of text parts (what newer clients send)."""
    if type(content) is str:
        return check_text(content, where)
    if type(content) is list:
        texts = []
        for j, part in enumerate(content):
            if type(part) is not dict or part.get("type") != "text":
                raise bad(f"{where}[{j}]", "must be a text part ({'type': 'text', 'text': ...})")
            texts.append(check_text(part.get("text"), f"{where}[{j}].text"))
        return "".join(texts)
    raise bad(where, f"must be a string or a list of text parts (got {show(content)})")


def parse_messages(value) -> list:
    if type(value) is not list or not value:
        raise bad("messages", "must be a non-empty list of messages")
    if len(value) > MAX_MESSAGES:
        raise ApiError(
            400,
            f"'messages' holds {len(value)} messages; at most {MAX_MESSAGES} are accepted",
            "too_many_messages",
            "messages",
        )
    messages = []
    for i, m in enumerate(value):
        where = f"messages[{i}]"
        if type(m) is not dict:
            raise bad(where, f"must be an object (got {show(m)})")
        role = m.get("role")
        if role not in ROLES:
            raise bad(f"{where}.role", f"must be one of {', '.join(ROLES)} (got {show(role)})")
        if m.get("tool_calls") or m.get("function_call"):
            raise ApiError(400, "tool calls are not supported", "unsupported_parameter", f"{where}")
        content = message_content(m.get("content"), f"{where}.content")
        messages.append({"role": ROLES[role], "content": content})
    return messages


class Job:
    """One request on its way through the worker: what it asks for, `cancelled` (the client
    left, or the server stops) and the events the worker sends back to the event loop:
    ("start", None), ("piece", text), ("done", result) or ("error", ApiError)."""

    def __init__(self, kind, namespace):
        self.kind, self.namespace = kind, namespace  # "chat" or "completion"
        self.messages = self.prompt = self.session = None
        self.stream = self.include_usage = False
        self.max_tokens, self.temp, self.top_p, self.stop, self.seed = 0, 0.0, 0.0, [], None
        self.cancelled = threading.Event()
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.loop, self.events = None, None
        self.checked = time.monotonic()  # when the client was last seen connected
        self.history = None  # what its history did to the memory: "continued", "branched", ...

    def emit(self, kind, value=None):
        with contextlib.suppress(RuntimeError):  # the loop is gone: the server stopped
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))


def parse_request(kind, body, namespace, model_id, settings, session_header) -> Job:
    """A validated Job from a request body (an ApiError names the first bad field)."""
    model = body.get("model")
    if type(model) is not str:
        raise bad("model", f"must be the model's id, {model_id!r} (got {show(model)})")
    if model != model_id:
        raise ApiError(
            404,
            f"model {model!r} is not served here; this server serves {model_id!r} (GET /v1/models)",
            "model_not_found",
            "model",
        )
    check_unsupported(body)
    job = Job(kind, namespace)
    if kind == "chat":
        job.messages = parse_messages(body.get("messages"))
        if settings.system_prompt and job.messages[0]["role"] != "system":
            job.messages.insert(0, {"role": "system", "content": settings.system_prompt})
    else:
        prompt = body.get("prompt")
        if type(prompt) is list and len(prompt) == 1:
            prompt = prompt[0]
        if type(prompt) is not str or not prompt:
            raise bad("prompt", f"must be a non-empty string (got {show(prompt)})")
        job.prompt = check_text(prompt, "prompt")
    job.stream = get_bool(body, "stream")
    options = body.get("stream_options")
    if options is not None:
        if type(options) is not dict:
            raise bad("stream_options", f"must be an object (got {show(options)})")
        job.include_usage = get_bool(options, "include_usage")
    limit = get_int(body, "max_completion_tokens", 1, MAX_TOKENS)
    if limit is None:
        limit = get_int(body, "max_tokens", 1, MAX_TOKENS, settings.max_tokens)
    job.max_tokens = limit
    job.temp = get_number(body, "temperature", 0, 2, settings.temp)
    job.top_p = get_number(body, "top_p", 0, 1, settings.top_p)
    job.stop = get_stop(body, settings.stop)
    job.seed = get_int(body, "seed", 0, SEED_MAX)
    name = session_header if session_header is not None else body.get("user")
    if name == "" and session_header is None:  # clients send user: "" for no user
        name = None
    if name is not None:
        if kind != "chat":
            raise ApiError(
                400,
                "a named session is a chat: name it on /v1/chat/completions",
                "unsupported_parameter",
                "user",
            )
        job.session = session_name(name, namespace)
    return job


def session_name(name, namespace: str) -> str:
    """The on-disk name of the session a request names: a plain name (as `chat --session`
    takes) behind the API key's namespace prefix; never a path."""
    try:
        check_name(name)
        return check_name(namespace + name)
    except SessionError as e:
        raise ApiError(400, f"session: {e}", "invalid_session_name", "user")


def digest(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def namespace_of(key: str) -> str:
    """The prefix of the sessions one API key reaches: a hash of the key, so one key never
    names another's sessions and the key itself is never written to disk."""
    return "k" + hashlib.sha256(key.encode()).hexdigest()[:12] + "-"


# -- conversations held in memory -------------------------------------------------------------


class Unnamed(Conversation):
    """A conversation held only in memory (no name, nothing on disk): what a Session has."""

    name = None

    def __init__(self, engine):
        super().__init__(engine)
        self.shown = ""  # a completion's prompt and reply as the client saw them

    def fork(self) -> "Unnamed":
        """Another conversation holding the same memory (nothing is copied until one of them
        is fed)."""
        other = copy.copy(self)
        other.engine, other.messages = self.engine.fork(), list(self.messages)
        other.replay_ids, other.marks = list(self.replay_ids), list(self.marks)
        return other

    def save(self):
        pass

    def close(self):
        pass


class Held:
    def __init__(self, kind, namespace, conv):
        self.kind, self.namespace, self.conv = kind, namespace, conv


def continues(held: Held, job: Job) -> bool:
    """Whether `job` is the next turn of `held`: a chat's messages extend the held ones (role
    and content equal); a completion's prompt extends the last prompt and its reply as the
    client saw them (without a stop string the engine consumed)."""
    conv = held.conv
    if job.kind == "chat":
        n = len(conv.messages)
        return n < len(job.messages) and job.messages[:n] == conv.messages
    return len(job.prompt) > len(conv.shown) and job.prompt.startswith(conv.shown)


class Server:
    """The model, the conversations it holds and the one worker thread that runs them."""

    def __init__(self, model, tokenizer, model_dir: str, settings: Settings, note=None):
        self.model, self.tokenizer, self.model_dir = model, tokenizer, model_dir
        self.model_id = os.path.basename(os.path.normpath(model_dir))
        self.settings = settings
        self.note = note or (lambda text: print(text, file=sys.stderr, flush=True))
        # keys by digest: comparing digests takes the same time whatever the key's length
        self.keys = {digest(k.encode()): namespace_of(k) for k in settings.api_keys}
        self.held = OrderedDict()  # key -> Held, least recently used first
        self.unnamed = 0  # a counter naming the unnamed conversations' keys
        self.worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="mlx-sleep")
        self.waiting = 0  # requests admitted and not finished (changed on the event loop only)
        self.last_activity = time.monotonic()
        self.slept_since_activity = False
        self.closing = threading.Event()
        self.on_idle_pass = None  # tests: called as each idle sleep pass ends, (i, N)
        self.stats = dict.fromkeys(
            (
                "requests",
                "prompt_tokens",
                "cached_tokens",
                "generated_tokens",
                "interrupted",
                "branched",
                "idle_sleeps",
                "idle_cancelled",
            ),
            0,
        )

    # -- on the event loop ---------------------------------------------------------------------
    def namespace_for(self, authorization: Optional[bytes]) -> Optional[str]:
        """The session namespace of a request's `Authorization: Bearer KEY` ("" when no key
        is required); None when the key is missing or wrong. Constant-time comparison."""
        if not self.keys:
            return ""
        scheme, _, given = (authorization or b"").partition(b" ")
        given, found = digest(given.strip()), None
        for key, namespace in self.keys.items():  # every key compared: no early exit
            if hmac.compare_digest(given, key) and scheme.lower() == b"bearer":
                found = namespace
        return found

    def health(self) -> dict:
        return {
            "status": "ok",
            "model": self.model_id,
            "sessions": len(self.held),
            "waiting": self.waiting,
            **self.stats,
        }

    async def respond(self, request, job: Job):
        """Run `job` on the worker; the response (JSON, or an event stream) once it starts."""
        from fastapi.responses import JSONResponse, StreamingResponse

        if self.waiting > self.settings.queue:
            raise ApiError(
                429,
                f"the server is busy ({self.waiting} requests ahead, --queue "
                f"{self.settings.queue}); try again shortly",
                "queue_full",
                kind="rate_limit_error",
            )
        loop = asyncio.get_running_loop()
        job.loop, job.events = loop, asyncio.Queue()
        self.waiting += 1
        self.activity()
        future = loop.run_in_executor(self.worker, self.answer, job)
        future.add_done_callback(lambda _: self.finished())
        try:
            kind, value = await self.next_event(request, job)
        except BaseException:
            job.cancelled.set()
            raise
        if kind == "error":
            raise value
        headers = {"X-History": job.history}
        if job.session:
            headers["X-Session"] = job.session
        if job.stream:
            headers["Cache-Control"] = "no-cache"
            return StreamingResponse(
                self.event_stream(job), media_type="text/event-stream", headers=headers
            )
        pieces = []
        while True:
            kind, value = await self.next_event(request, job)
            if kind == "piece":
                pieces.append(value)
            elif kind == "error":
                raise value
            else:
                return JSONResponse(self.whole(job, "".join(pieces), value), headers=headers)

    def activity(self):
        self.last_activity, self.slept_since_activity = time.monotonic(), False

    def finished(self):
        self.waiting -= 1
        self.activity()

    async def next_event(self, request, job):
        """The worker's next event; meanwhile (every half second, pieces arriving or not), a
        client that left cancels its job."""
        while True:
            now = time.monotonic()
            if now - job.checked >= 0.5:
                job.checked = now
                if not job.cancelled.is_set() and await request.is_disconnected():
                    job.cancelled.set()
            try:
                return await asyncio.wait_for(job.events.get(), 0.5)
            except asyncio.TimeoutError:
                pass

    def chunk(self, job, text=None, finish=None):
        """One event of a stream: a piece of text, or the end (finish_reason)."""
        if job.kind == "chat":
            delta = {} if text is None else {"content": text}
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            obj = "chat.completion.chunk"
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            obj = "text_completion"
        out = {
            "id": job.id,
            "object": obj,
            "created": job.created,
            "model": self.model_id,
            "choices": [choice],
        }
        if job.include_usage:
            out["usage"] = None
        return out

    async def event_stream(self, job):
        """Server-sent events; a client that leaves cancels the job (Starlette cancels this
        generator when the connection closes), which stops at its next token."""

        def event(obj):
            return f"data: {json.dumps(obj)}\n\n"

        try:
            if job.kind == "chat":
                first = self.chunk(job)
                first["choices"][0]["delta"] = {"role": "assistant", "content": ""}
                yield event(first)
            while True:
                kind, value = await job.events.get()
                if kind == "piece":
                    yield event(self.chunk(job, value))
                elif kind == "error":
                    yield event(value.body())
                    return
                else:
                    yield event(self.chunk(job, finish=value["finish_reason"]))
                    if job.include_usage:
                        last = self.chunk(job)
                        last["choices"], last["usage"] = [], value["usage"]
                        yield event(last)
                    yield "data: [DONE]\n\n"
                    return
        finally:
            job.cancelled.set()

    def whole(self, job, text, result) -> dict:
        choice = {"index": 0, "logprobs": None, "finish_reason": result["finish_reason"]}
        if job.kind == "chat":
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        return {
            "id": job.id,
            "object": "chat.completion" if job.kind == "chat" else "text_completion",
            "created": job.created,
            "model": self.model_id,
            "choices": [choice],
            "usage": result["usage"],
        }

    # -- on the worker thread ------------------------------------------------------------------
    def answer(self, job: Job):
        """One request, start to end: find (or open) its conversation, feed what is new,
        stream the reply, record what the engine consumed, save a named session."""
        if job.cancelled.is_set() or self.closing.is_set():
            job.emit("error", ApiError(503, "the request was cancelled", "cancelled"))
            return
        try:
            rendered = self.render(job)
            held, job.history, branch = self.conversation(job, rendered)
        except ApiError as e:
            job.emit("error", e)
            return
        conv = held.conv
        try:
            self.generate(job, held, rendered, branch)
        except Exception as e:  # the engine may be half-way: drop the conversation
            self.drop(held)
            self.note(f"[error: {type(e).__name__}: {e}]")
            traceback.print_exc(file=sys.stderr)
            job.emit(
                "error", ApiError(500, "internal error", "internal_error", kind="server_error")
            )
        finally:
            conv.close()  # a named session's lock: chat may open it between requests

    def render(self, job: Job) -> str:
        """The prompt as text: the chat template over the messages, or the prompt itself."""
        if job.kind != "chat":
            return job.prompt
        try:
            return chat_prompt(self.tokenizer, job.messages)
        except Exception as e:  # jinja's errors: the template refuses these messages
            raise ApiError(
                400, f"the model's chat template refused these messages ({e})", "template_error"
            )

    def conversation(self, job: Job, rendered: str):
        """(the Held conversation `job` continues or starts, how: "continued", "branched",
        "new" or "reset", the branch point or None).

        A history that does not continue what a conversation holds (a regenerated reply, an
        edited message) branches from the latest point whose text is a prefix of `rendered`
        (conv.branch_point): the engine rewinds to a boundary and re-feeds from there. A named
        session branches in place (or is reset when no point matches); an unnamed conversation
        is forked, so the one it came from keeps its memory (two chats that begin alike never
        take each other's). Only conversations of the request's own key are looked at."""
        if job.session is not None:
            held = self.open_named(job.session, job.namespace, create=True)
            conv = held.conv
            if continues(held, job):
                return held, "continued" if conv.messages else "new", None
            branch = conv.branch_point(rendered)
            if branch is not None:
                conv.engine.rewind(branch[0])
                return held, "branched", branch
            # Another history under this name: its memory is not this conversation's.
            conv.clear()
            return held, "reset", None
        mine = [
            (i, key, h)
            for i, (key, h) in enumerate(self.held.items())
            if h.conv.name is None and h.kind == job.kind and h.namespace == job.namespace
        ]
        matches = [  # (how much of the request it holds, recency, key)
            (len(h.conv.messages) if job.kind == "chat" else len(h.conv.shown), i, key)
            for i, key, h in mine
            if continues(h, job)
        ]
        if matches:
            key = max(matches)[2]  # the longest prefix; of equals, the most recently used
            self.held.move_to_end(key)
            return self.held[key], "continued", None
        branches = [  # (tokens kept, recency, the point, the conversation)
            (point[0], i, point, h.conv)
            for i, _, h in mine
            for point in [h.conv.branch_point(rendered)]
            if point is not None
        ]
        self.unnamed += 1
        key = ("memory", self.unnamed)
        if branches:  # the fewest tokens to feed again; of equals, the most recently used
            _, _, branch, conv = max(branches, key=lambda b: b[:2])
            fork = conv.fork()
            fork.engine.rewind(branch[0])
            return self.hold(key, Held(job.kind, job.namespace, fork)), "branched", branch
        s = self.settings
        engine = SessionEngine(
            self.model, s.sleep or self.model.sleep_config, 0, s.defer, s.max_pending
        )
        return self.hold(key, Held(job.kind, job.namespace, Unnamed(engine))), "new", None

    def hold(self, key, held):
        self.held[key] = held
        self.held.move_to_end(key)
        while len(self.held) > self.settings.max_sessions:
            self.held.popitem(last=False)  # a named one is on disk; an unnamed one is gone
        return held

    def drop(self, held):
        for key, h in list(self.held.items()):
            if h is held:
                del self.held[key]

    def open_named(self, name: str, namespace: str, create: bool) -> Optional[Held]:
        """Session `name`, locked: the held copy when the files on disk are still the ones it
        saved (chat may have continued it since), else opened from disk (or created, when
        `create`). None when absent and not `create`."""
        key = ("session", name)
        held = self.held.get(key)
        try:
            if held is not None:
                try:
                    held.conv.lock(create=False)
                    meta = read_meta(name)
                    fresh = all(
                        meta[k] == held.conv.meta.get(k) for k in ("generation", "state_sha256")
                    )
                except SessionInUse:
                    raise
                except SessionError:  # removed, or damaged, since: drop what we held
                    fresh = False
                if fresh:
                    self.held.move_to_end(key)
                    return held
                held.conv.close()
                del self.held[key]
            if not create:
                return None
            s = self.settings
            conv = open_session(
                name,
                self.model,
                self.model_dir,
                s.sleep,
                s.history,
                defer=s.defer,
                max_pending=s.max_pending,
            )
        except SessionInUse as e:
            raise ApiError(409, str(e), "session_in_use", "user")
        except SessionError as e:
            raise ApiError(409, str(e), "session_unavailable", "user")
        return self.hold(key, Held("chat", namespace, conv))

    def stop_now(self, job):
        return job.cancelled.is_set() or self.closing.is_set()

    def generate(self, job: Job, held: Held, rendered: str, branch=None):
        conv, tokenizer = held.conv, self.tokenizer
        engine = conv.engine
        if branch is not None:  # rewound: the recorded ids up to the mark, then the text after it
            _, replay, _, chars = branch
            common = rendered[:chars]
        else:
            # Feed what the engine has not seen (as chat does): with a template that renders
            # earlier turns the same way, what it consumed is a prefix of the new prompt.
            replay, common = [], os.path.commonprefix([rendered, conv.fed_text])
        delta = rendered[len(common) :]
        ids = tokenizer.encode(delta, add_special_tokens=False) if delta else []
        if not replay and not ids:
            job.emit("error", bad("messages", "holds nothing new to answer"))
            return
        job.emit("start")
        start, sleeps = engine.offset, engine.sleeps
        # A client that leaves stops a forced sleep, but not one inside the replayed ids: the
        # turn then ends at a mark or after it, where its text is known.
        engine.on_forced_sleep = lambda: {
            "cancel": lambda: engine.offset >= start + len(replay) and self.stop_now(job)
        }
        if job.seed is not None:
            mx.random.seed(job.seed)
        s = self.settings
        sampler, processors = make_sampling(
            job.temp, job.top_p, s.top_k, s.min_p, s.repetition_penalty
        )
        reply = Reply()
        mx.reset_peak_memory()
        try:
            for piece in stream_reply(
                engine,
                tokenizer,
                replay + ids,
                job.max_tokens,
                job.stop,
                lambda: self.stop_now(job),
                reply,
                sampler=sampler,
                logits_processors=processors,
            ):
                job.emit("piece", piece)
        finally:
            engine.on_forced_sleep = None
        record_turn(conv, tokenizer, start, common, delta, ids, reply, replay if branch else None)
        if job.kind == "chat":
            conv.messages = job.messages + [{"role": "assistant", "content": reply.text}]
        else:
            conv.shown = rendered + reply.text
        conv.save()
        conv.close()  # unlocked before the client has its reply: it may open the session at once
        prompt = len(replay) + len(ids)
        usage = {
            "prompt_tokens": start + prompt,
            "completion_tokens": len(reply.tokens),
            "total_tokens": start + prompt + len(reply.tokens),
            "prompt_tokens_details": {"cached_tokens": start},
        }
        for k, v in (
            ("requests", 1),
            ("prompt_tokens", prompt),
            ("cached_tokens", start),
            ("generated_tokens", len(reply.tokens)),
            ("interrupted", reply.stopped == "interrupted"),
            ("branched", job.history == "branched"),
        ):
            self.stats[k] += int(v)
        finish = "length" if reply.stopped == "max_tokens" else "stop"
        job.emit("done", {"finish_reason": finish, "usage": usage})
        where = f"session {conv.name}" if conv.name else job.kind
        how = {
            "reset": "another history: memory reset",
            "branched": f"another history: branched, {len(replay)} tokens fed again",
        }.get(job.history, job.history)
        slept = engine.sleeps - sleeps
        self.note(
            f"[{where} ({how}, {start} tokens held): {reply.speed(prompt)}"
            f"{f', slept {slept}x' if slept else ''}, stopped: {reply.stopped}]"
        )

    # -- sleeping when idle --------------------------------------------------------------------
    def wanted(self) -> bool:
        """Something needs the worker: a request arrived, or the server stops."""
        return self.waiting > 0 or self.closing.is_set()

    def idle_sleep(self):
        """On the worker: consolidate each held conversation whose window is due (chat's idle
        rule), most recently used first, until a request arrives (it cancels the running sleep
        between two passes, leaving that conversation as it was)."""
        s = self.settings
        for key, held in reversed(list(self.held.items())):
            if self.wanted():
                return
            if not idle_sleep_due(held.conv.engine, s.idle_delay, s.idle_fill):
                continue
            if held.conv.name is not None:
                try:
                    held = self.open_named(held.conv.name, held.namespace, create=False)
                except ApiError as e:  # open in chat, or damaged: leave it
                    self.note(f"[idle: skipped session {key[1]}: {e.message}]")
                    continue
                if held is None or not idle_sleep_due(held.conv.engine, s.idle_delay, s.idle_fill):
                    if held is not None:
                        held.conv.close()
                    continue
            conv = held.conv
            where = f"session {conv.name}" if conv.name else "a conversation"
            pending = len(conv.engine.pending)
            n = conv.engine.window_len if live_window_due(conv.engine, s.idle_fill) else 0

            def on_pass(i, N):
                self.note(f"[idle sleep ({where}): pass {i}/{N}]")
                if self.on_idle_pass is not None:
                    self.on_idle_pass(i, N)

            try:
                done = sleep_when_idle(conv.engine, s.idle_fill, self.wanted, on_pass)
                deepened = pending - len(conv.engine.pending)
                if done or deepened:
                    conv.save()
                if done:
                    self.stats["idle_sleeps"] += 1
                    what = f"deepened {deepened} pending windows, " if deepened else ""
                    self.note(f"[idle sleep ({where}): {what}consolidated {n} tokens]")
                else:
                    self.stats["idle_cancelled"] += 1
                    self.note(f"[idle sleep ({where}): cancelled by a request; unchanged]")
                    return
            finally:
                conv.close()

    async def idle_loop(self):
        loop = asyncio.get_running_loop()
        delay = self.settings.idle_delay
        while not self.closing.is_set():
            wait = self.last_activity + delay - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
                continue
            if self.waiting == 0 and not self.slept_since_activity:
                self.slept_since_activity = True
                try:
                    await loop.run_in_executor(self.worker, self.idle_sleep)
                except Exception as e:
                    self.note(f"[idle sleep failed: {type(e).__name__}: {e}]")
            await asyncio.sleep(min(delay, 1.0))

    @contextlib.asynccontextmanager
    async def lifespan(self, app):
        idle = asyncio.create_task(self.idle_loop()) if self.settings.idle_delay > 0 else None
        try:
            yield
        finally:
            self.closing.set()  # a running reply or sleep stops at its next token or pass
            if idle is not None:
                idle.cancel()
            await asyncio.get_running_loop().run_in_executor(None, self.worker.shutdown)


# -- the HTTP application --------------------------------------------------------------------


class Guard:
    """Before any route: the API key (401) and the declared body size (413), as plain ASGI so
    that streamed responses pass through untouched."""

    def __init__(self, app, server: Server):
        self.app, self.server = app, server

    async def __call__(self, scope, receive, send):
        from fastapi.responses import JSONResponse

        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        namespace = self.server.namespace_for(headers.get(b"authorization"))
        if namespace is None:
            error = ApiError(
                401,
                "missing or wrong API key: send the header 'Authorization: Bearer KEY'",
                "invalid_api_key",
            )
            response = JSONResponse(
                error.body(), 401, headers={"WWW-Authenticate": 'Bearer realm="mlx-sleep"'}
            )
            return await response(scope, receive, send)
        host = host_name(headers.get(b"host", b"").decode("latin-1"))
        hosts = self.server.settings.hosts
        if hosts is not None and host not in hosts:
            error = ApiError(
                403,
                f"this server answers for {', '.join(hosts)} only (the request named "
                f"{show(host)}): start it with --host to listen elsewhere",
                "invalid_host",
            )
            return await JSONResponse(error.body(), 403)(scope, receive, send)
        kind = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
        if scope["method"] == "POST" and kind != b"application/json":
            # a page on any site may POST text/plain here without asking (no CORS preflight)
            error = ApiError(
                415,
                "send the body as JSON, with the header 'Content-Type: application/json'",
                "unsupported_media_type",
            )
            return await JSONResponse(error.body(), 415)(scope, receive, send)
        length = headers.get(b"content-length", b"0")
        if not length.isdigit() or int(length) > MAX_BODY:
            response = JSONResponse(too_large().body(), 413)
            return await response(scope, receive, send)
        scope.setdefault("state", {})["namespace"] = namespace
        await self.app(scope, receive, send)


def host_name(header: str) -> str:
    """The name in a Host header, without its port ("[::1]:8080" -> "::1")."""
    if header.startswith("["):
        return header[1:].split("]", 1)[0]
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def too_large():
    return ApiError(
        413, f"the request body is larger than {MAX_BODY >> 20} MB", "request_too_large"
    )


async def read_body(request) -> dict:
    """The JSON object a request carries, read at most MAX_BODY bytes far (a chunked body
    declares no length)."""
    data, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY:
            raise too_large()
        data.append(chunk)
    try:
        body = parse_json(b"".join(data).decode("utf-8"), "the request body", MAX_DEPTH)
    except UnicodeDecodeError:
        raise ApiError(400, "the request body is not UTF-8 text", "invalid_json")
    except ConfigError as e:
        raise ApiError(400, str(e), "invalid_json")
    if type(body) is not dict:
        raise ApiError(
            400, f"the request body must be a JSON object (got {show(body)})", "invalid_json"
        )
    return body


def create_app(server: Server):
    """The FastAPI application over `server` (create it inside the process that serves)."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.middleware.cors import CORSMiddleware
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None, lifespan=server.lifespan)
    app.add_middleware(Guard, server=server)
    if server.settings.cors:  # outermost: a browser's preflight carries no key
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(server.settings.cors),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type", "X-Session"],
            expose_headers=["X-Session", "X-History"],
        )

    @app.exception_handler(ApiError)
    async def api_error(request, e: ApiError):
        return JSONResponse(e.body(), e.status)

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return JSONResponse(ApiError(e.status_code, str(e.detail), code).body(), e.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, e):
        return JSONResponse(ApiError(400, "invalid request", "invalid_value").body(), 400)

    @app.exception_handler(Exception)
    async def internal_error(request, e):
        server.note(f"[error: {type(e).__name__}: {e}]")
        error = ApiError(500, "internal error", "internal_error", kind="server_error")
        return JSONResponse(error.body(), 500)

    def model_card():
        return {"id": server.model_id, "object": "model", "created": 0, "owned_by": "mlx-sleep"}

    @app.get("/health")
    async def health():
        return server.health()

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id != server.model_id:
            raise ApiError(404, f"model {model_id!r} is not served here", "model_not_found")
        return model_card()

    async def complete(request: Request, kind: str):
        body = await read_body(request)
        job = parse_request(
            kind,
            body,
            request.state.namespace,
            server.model_id,
            server.settings,
            request.headers.get("x-session"),
        )
        return await server.respond(request, job)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await complete(request, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await complete(request, "completion")

    return app


def listen(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: a free one), IPv4 or IPv6 as `host` is."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, port), family=family, backlog=128)


def uvicorn_server(server: Server, log_level: str = "warning"):
    """uvicorn over create_app(server); `.run(sockets=[listen(...)])` serves until Ctrl-C."""
    import uvicorn

    config = uvicorn.Config(
        create_app(server),
        log_level=log_level,
        access_log=False,
        timeout_graceful_shutdown=5,
        lifespan="on",
    )
    return uvicorn.Server(config)
