"""Chat sessions on disk: a sleep engine's memory that outlives the process.

    $MLX_SLEEP_HOME/sessions/NAME/          (default ~/.mlx_sleep; directories 0700, files 0600)
        session.json                         format version, model fingerprint, sleep settings,
                                             engine positions, transcript, state file + sha256
        state-000012.safetensors             fast weights, the live window (its KV and tokens),
                                             the window-start state, the /forget snapshots
        lock                                 flock'ed by the one process writing the session

A save writes a new state file (temporary name, fsync, rename), then session.json the same way,
and only then removes the previous state file: whatever moment a process is killed at,
session.json names a complete state file whose checksum it holds. The live window is stored as
its KV (not re-prefilled on load): loading is a copy, and resuming continues bit for bit
(benchmarks/chat.py measures both).

A session belongs to one model: the architecture fingerprint (`model.fingerprint()`) and a hash
of the weights (`weights_hash`: every safetensors file's header and size and samples of its
data, cheap for any model size) must both match to load it.
"""

import contextlib
import glob
import hashlib
import os
import re
import struct
import time
from typing import List, Optional

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from .config import ConfigError, SleepConfig
from .io import OutputError, lock_file, read_json, save_arrays, write_json
from .sleep import SleepEngine, _check_state, _fill, run_chunk

FORMAT = 1  # bump when session.json or the state file changes incompatibly
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class SessionError(ValueError):
    """A session cannot be opened or written; the message says why and what to do."""


def home() -> str:
    return os.path.expanduser(os.environ.get("MLX_SLEEP_HOME") or "~/.mlx_sleep")


def sessions_dir() -> str:
    return os.path.join(home(), "sessions")


def session_path(name: str) -> str:
    if not NAME_RE.match(name or ""):
        raise SessionError(f"{name!r} is not a session name: use letters, digits, '.', '_', '-' "
                           "(at most 64, starting with a letter or digit)")
    return os.path.join(sessions_dir(), name)


def private_dir(path: str):
    """Create the home, the sessions directory and `path` under it, owner-only (0700); a
    directory that already exists keeps its mode (it may not be ours)."""
    os.makedirs(os.path.dirname(home()), exist_ok=True)
    for p in dict.fromkeys([home(), sessions_dir(), path]):
        if not os.path.isdir(p):
            os.mkdir(p, 0o700)
            os.chmod(p, 0o700)  # whatever the umask


def list_sessions() -> List[str]:
    root = sessions_dir()
    if not os.path.isdir(root):
        return []
    return sorted(n for n in os.listdir(root)
                  if NAME_RE.match(n) and os.path.isfile(os.path.join(root, n, "session.json")))


# -- the model a session belongs to ------------------------------------------------------------

SAMPLE_BLOCKS, BLOCK = 64, 1 << 16


def weights_hash(model_dir: str) -> str:
    """sha256 over each safetensors file's name, size, header and 64 evenly spaced 64 KiB blocks
    of its data (all of it below 4 MiB): other weights of the same shapes (a fine-tune, another
    quantization) differ in every block, and it reads at most 4 MiB per file."""
    files = sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))
    if not files:
        return "none"
    h = hashlib.sha256()
    for path in files:
        size = os.path.getsize(path)
        h.update(f"{os.path.basename(path)}:{size}\n".encode())
        with open(path, "rb") as f:
            if size <= SAMPLE_BLOCKS * BLOCK:
                h.update(f.read())
                continue
            (n,) = struct.unpack("<Q", f.read(8))
            h.update(f.read(min(n, size - 8)))
            start = 8 + n
            step = max(1, (size - start - BLOCK) // (SAMPLE_BLOCKS - 1))
            for i in range(SAMPLE_BLOCKS):
                f.seek(min(start + i * step, size - BLOCK))
                h.update(f.read(BLOCK))
    return h.hexdigest()[:16]


def model_identity(model, model_dir: str) -> dict:
    return {"path": os.path.abspath(model_dir), "fingerprint": model.fingerprint(),
            "weights": weights_hash(model_dir)}


# -- the engine a session runs -----------------------------------------------------------------

class SessionEngine(SleepEngine):
    """A SleepEngine that keeps, for /forget, the state before each of its last `history`
    consolidated windows, and calls `on_full()` when a full window forces a sleep in feed()."""

    def __init__(self, model, sleep: Optional[SleepConfig] = None, history: int = 3):
        self.history, self.on_full = history, None
        super().__init__(model, sleep)

    def reset(self):
        super().reset()
        self.snapshots = []  # [(state before the window, the window's first position)]

    def consolidate(self, cancel=None, on_pass=None) -> bool:
        if self.window_len == 0:
            return True
        if cancel is None and on_pass is None and self.on_full is not None:
            self.on_full()  # feed() forcing a sleep (the others pass progress / cancel)
        before = (self.window_start_state, self.window_start)
        done = super().consolidate(cancel, on_pass)
        if done and self.history > 0:
            self.snapshots = (self.snapshots + [before])[-self.history:]
        return done

    def forget(self) -> bool:
        """Roll back the last consolidation: the fast weights return to what they were before
        that window, which is gone; the live window (tokens since) is re-run on top, at the same
        positions. False when there is nothing to roll back."""
        if not self.snapshots:
            return False
        state, _ = self.snapshots.pop()
        self.window_start_state = self.state = state
        if self.window_ids:
            live, self.window_core = mx.concatenate(self.window_ids, axis=1), []
            _, self.state = run_chunk(self.model, live, state, self.window_start, 1,
                                      self.sleep.attention_window,
                                      core_out=self.window_core if self.sleep.loops > 1 else None)
            self.window_ids = [live]
        mx.eval(self.state, self.window_core)
        self.sleeps -= 1
        return True

    def arrays_and_meta(self):
        d = self.state_dict()
        arrays = dict(d["arrays"])
        for i, (s, _) in enumerate(self.snapshots):
            arrays.update(tree_flatten(s, prefix=f".snapshots.{i}"))
        meta = dict(d["meta"], snapshot_starts=[a for _, a in self.snapshots])
        return arrays, meta

    def load_arrays_and_meta(self, arrays: dict, meta: dict):
        snap = {k: v for k, v in arrays.items() if k.startswith("snapshots.")}
        rest = {k: v for k, v in arrays.items() if not k.startswith("snapshots.")}
        starts = meta.get("snapshot_starts", [])
        tree = tree_unflatten(list(snap.items())).get("snapshots", []) if snap else []
        fresh = self.model.initial_state(self.batch_size)
        snapshots = []
        for i, start in enumerate(starts):
            s = _fill(fresh, tree[i] if i < len(tree) else [])
            _check_state(f"snapshot {i}", s, fresh)
            snapshots.append((s, int(start)))
        self.load_state_dict({"arrays": rest, "meta": meta})  # checks, or leaves all unchanged
        self.snapshots = snapshots[-self.history:] if self.history > 0 else []


# -- a session: engine + transcript + files ----------------------------------------------------

def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_meta(name: str) -> dict:
    """session.json of `name`, checked for format; SessionError with one line otherwise."""
    path = session_path(name)
    meta_path = os.path.join(path, "session.json")
    if not os.path.isfile(meta_path):
        raise SessionError(f"no session {name!r} in {sessions_dir()} (mlx-sleep sessions list)")
    try:
        meta = read_json(meta_path)
    except ConfigError as e:  # not valid JSON, or not a regular file
        raise SessionError(f"session {name!r} is corrupt ({e}); "
                           f"remove it with `mlx-sleep sessions rm {name}` or use another name")
    if not isinstance(meta, dict) or not isinstance(meta.get("format"), int):
        raise SessionError(f"session {name!r} is corrupt ({meta_path} has no format version)")
    if meta["format"] > FORMAT:
        raise SessionError(f"session {name!r} was written by a newer mlx-sleep (format "
                           f"{meta['format']}, this one reads {FORMAT}): upgrade mlx-sleep")
    for key in ("model", "sleep", "engine", "state_file", "state_sha256", "transcript"):
        if key not in meta:
            raise SessionError(f"session {name!r} is corrupt (session.json lacks {key!r})")
    return meta


class Session:
    """One named session: `engine` (a SessionEngine), `messages` (the chat so far), `fed_text`
    (the text the engine has consumed), saved with `save()`. Open it with `open_session`."""

    def __init__(self, name, engine, identity, messages=None, fed_text="", meta=None):
        self.name, self.engine, self.identity = name, engine, identity
        self.path = session_path(name)
        self.messages = messages or []
        self.fed_text = fed_text
        self.meta = meta or {"created": time.time(), "generation": 0}
        self._lock = None

    # Only one process writes a session: flock, released by the kernel even on SIGKILL.
    def lock(self):
        private_dir(self.path)
        try:
            self._lock = lock_file(os.path.join(self.path, "lock"),
                                   f"session {self.name!r} is in use by another mlx-sleep "
                                   "process; close it first")
        except OutputError as e:
            raise SessionError(str(e))

    def close(self):
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    def save(self) -> int:
        """Write the session (see the module docstring for why this order); returns bytes."""
        arrays, engine_meta = self.engine.arrays_and_meta()
        generation = self.meta.get("generation", 0) + 1
        state_file = f"state-{generation:06d}.safetensors"
        state_path = os.path.join(self.path, state_file)
        private_dir(self.path)
        save_arrays(state_path, arrays, mode=0o600)
        meta = dict(self.meta, format=FORMAT, name=self.name, saved=time.time(),
                    generation=generation, model=self.identity,
                    sleep=self.engine.sleep.to_dict(), history=self.engine.history,
                    engine=engine_meta, state_file=state_file,
                    state_sha256=_sha256_file(state_path),
                    state_bytes=os.path.getsize(state_path),
                    transcript={"messages": self.messages, "fed_text": self.fed_text})
        write_json(os.path.join(self.path, "session.json"), meta, mode=0o600)
        self.meta = meta
        # Older state files and temporaries a killed save left behind (all ours by name).
        for path in glob.glob(os.path.join(self.path, "state-*.safetensors")) + \
                glob.glob(os.path.join(self.path, ".tmp-*")):
            if os.path.basename(path) != state_file:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(path)
        return meta["state_bytes"]


def check_model(name: str, meta: dict, identity: dict):
    saved = meta["model"]
    for key, what in (("fingerprint", "architecture"), ("weights", "weights")):
        if saved.get(key) != identity[key]:
            raise SessionError(
                f"session {name!r} belongs to another model ({what} differ: it was saved with "
                f"{saved.get('path')}); resume it with --model {saved.get('path')} or start a "
                "new --session")


def open_session(name: str, model, model_dir: str, sleep: Optional[SleepConfig] = None,
                 history: int = 3, system_prompt: Optional[str] = None, create: bool = True,
                 lock: bool = True) -> Session:
    """Open (or create) session `name` for `model` (loaded from `model_dir`).

    `sleep` overrides the model's settings for a new session; an existing one keeps its own and
    refuses different ones. Every check runs before anything is written: a session that cannot be
    opened is left byte for byte as it was."""
    path = session_path(name)
    identity = model_identity(model, model_dir)
    if not os.path.exists(os.path.join(path, "session.json")):
        if not create:
            raise SessionError(f"no session {name!r} in {sessions_dir()} (mlx-sleep sessions list)")
        if os.path.exists(path) and os.listdir(path) not in ([], ["lock"]):
            raise SessionError(f"{path} exists but holds no session.json; remove it or use "
                               "another name")
        engine = SessionEngine(model, sleep or model.sleep_config, history)
        messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
        session = Session(name, engine, identity, messages)
        private_dir(sessions_dir())
        if lock:
            session.lock()
        return session

    meta = read_meta(name)
    check_model(name, meta, identity)
    saved_sleep = SleepConfig.from_dict(meta["sleep"])
    if sleep is not None and sleep != saved_sleep:
        raise SessionError(f"session {name!r} sleeps with {saved_sleep.to_dict()}; resume it "
                           "without --window/--loops/--eviction, or start a new --session")
    state_path = os.path.join(path, os.path.basename(meta["state_file"]))
    if not os.path.isfile(state_path):
        raise SessionError(f"session {name!r} is corrupt: its state file {meta['state_file']} "
                           "is missing")
    if os.path.getsize(state_path) != meta.get("state_bytes") or \
            _sha256_file(state_path) != meta["state_sha256"]:
        raise SessionError(f"session {name!r} is corrupt: {meta['state_file']} does not match "
                           "its checksum (truncated or modified)")
    engine = SessionEngine(model, saved_sleep, int(meta.get("history", history)))
    try:
        arrays = mx.load(state_path)
        engine.load_arrays_and_meta(arrays, meta["engine"])
    except (ValueError, RuntimeError, KeyError, TypeError) as e:
        raise SessionError(f"session {name!r} cannot be loaded: {str(e).splitlines()[0]}")
    transcript = meta["transcript"]
    session = Session(name, engine, identity, list(transcript.get("messages", [])),
                      transcript.get("fed_text", ""), meta)
    if lock:
        session.lock()
    return session


def remove_session(name: str) -> List[str]:
    """Delete a session's files (only those a session consists of) and its directory."""
    path = session_path(name)
    if not os.path.isdir(path):
        raise SessionError(f"no session {name!r} in {sessions_dir()}")
    probe = Session(name, None, None)
    probe.lock()  # not while another process has it open
    try:
        ours = [os.path.join(path, f) for f in os.listdir(path)
                if f in ("session.json", "lock") or f.startswith(".tmp-")
                or re.fullmatch(r"state-\d+\.safetensors", f)]
        others = sorted(set(os.listdir(path)) - {os.path.basename(p) for p in ours})
        if others:
            raise SessionError(f"{path} holds files mlx-sleep did not write ({', '.join(others)}); "
                               "remove them first")
        for p in sorted(ours, key=lambda p: p.endswith("session.json"), reverse=True):
            os.remove(p)  # session.json first: a half-removed session is no longer listed
        os.rmdir(path)
    finally:
        probe.close()
    return ours


# -- consolidating saved sessions outside the chat ---------------------------------------------

def consolidate_sessions(names, min_fill: float = 0.5, idle=None, poll: float = 30.0,
                         max_wait: Optional[float] = None, echo=print) -> dict:
    """Sleep on each named session's live window (if at least `min_fill` of L), one at a time.

    With `idle` (an idle source, see idle.py) it first waits until the machine is idle (polling
    every `poll` seconds, at most `max_wait` seconds), and yields as soon as it is not: the
    running consolidation is cancelled between passes and nothing half-done is saved. Sessions
    open in a chat (locked) are skipped. Returns {name: "consolidated" | "skipped: why" |
    "yielded"}."""
    from .loading import load_model
    from .weights import resolve_source

    results, models = {}, {}
    waited_since = time.monotonic()
    for name in names:
        meta = read_meta(name)
        L = meta["sleep"]["window"]
        live = meta["engine"]["offset"] - meta["engine"]["window_start"]
        if live == 0 or live < min_fill * L:
            results[name] = f"skipped: window {live}/{L} is below {min_fill:.0%} full"
            echo(f"{name}: {results[name]}")
            continue
        if idle is not None:
            while True:
                ok, why = idle()
                if ok:
                    break
                if max_wait is not None and time.monotonic() - waited_since >= max_wait:
                    echo(f"not idle ({why}); stopping")
                    results.update({n: "skipped: not idle" for n in names if n not in results})
                    return results
                echo(f"waiting for the machine to be idle: {why}")
                time.sleep(poll)
        path = meta["model"]["path"]
        if path not in models:
            models[path] = load_model(resolve_source(path))
        try:
            session = open_session(name, models[path], path, create=False)
        except SessionError as e:
            results[name] = f"skipped: {e}"
            echo(f"{name}: {results[name]}")
            continue
        try:
            cancel = None if idle is None else (lambda: not idle()[0])
            done = session.engine.consolidate(
                cancel=cancel, on_pass=lambda i, n: echo(f"{name}: pass {i}/{n}"))
            if done:
                session.save()
            results[name] = "consolidated" if done else "yielded"
            echo(f"{name}: {results[name]}" + ("" if done else " (the user came back; unchanged)"))
        finally:
            session.close()
        if not done:
            results.update({n: "skipped: yielded" for n in names if n not in results})
            return results
    return results
