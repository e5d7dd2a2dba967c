"""Chat sessions on disk: a sleep engine's memory that outlives the process.

    $MLX_SLEEP_HOME/sessions/NAME/          (default ~/.mlx_sleep; directories 0700, files 0600)
        session.json                         format version, model fingerprint, sleep settings,
                                             engine positions, transcript, state file + sha256
        state-000012.safetensors             fast weights, the live window (its KV and tokens),
                                             the window-start state, the /forget snapshots,
                                             windows pending a deferred sleep (tokens, start
                                             state)
        lock                                 flock'ed by the one process writing the session

A save writes a new state file (temporary name, fsync, rename), then session.json the same way,
and only then removes the previous state file: whatever moment a process is killed at,
session.json names a complete state file whose checksum it holds. The live window is stored as
its KV (not re-prefilled on load): loading is a copy, and resuming continues bit for bit
(benchmarks/chat.py measures both).

A session belongs to one model: the architecture fingerprint (`model.fingerprint()`) and a hash
of the weights (`weights_hash`: every safetensors file's header and size and samples of its
data, cheap for any model size) must both match to load it.

A session on disk is untrusted input (edited by hand, written by another tool, a link planted in
the store). Names are plain names resolved only inside the store, and no symlink is followed at
any level below the home (the sessions directory, a session's directory, its files). Every read
checks session.json against SESSION_JSON (types, ranges, no unknown fields, nesting depth) and
CONSISTENT; opening a session with its model checks the state file against `state_schema` (the
arrays' names, dtypes and shapes from the model, finite values, token ids in the vocabulary)
before anything is loaded into the engine. Whatever fails is refused with one line naming the
field, and the files stay as they were.
"""

import contextlib
import copy
import glob
import hashlib
import json
import os
import re
import stat
import struct
import time
from typing import List, Optional

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from .config import (
    EVICTION_MODES,
    MAX_INT,
    MAX_LOOPS,
    MAX_PENDING,
    MAX_WINDOW,
    ConfigError,
    SleepConfig,
    show,
)
from .io import (
    TMP_PREFIX,
    OutputError,
    fsync_dir,
    file_kind,
    clean_stale_temps,
    lock_file,
    open_nofollow,
    read_json,
    save_arrays,
    write_json,
)
from .sleep import SleepEngine, check_state, fill_state, run_chunk

FORMAT = 1  # bump when session.json or the state file changes incompatibly
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # fullmatch: no '/', no leading '.'
STATE_FILE_RE = re.compile(r"state-[0-9]{6,10}\.safetensors")
MAX_HISTORY = 64  # /forget snapshots: each is a full copy of the fast weights
MAX_META_BYTES = 256 << 20
MAX_MARKS = 1 << 20  # (position, chars) points a branch can resume at: a few per turn
MAX_JSON_DEPTH = 8  # session.json nests 4 deep (transcript.messages[i].role)


class SessionError(ValueError):
    """A session cannot be opened or written; the message says why and what to do."""


class SessionInUse(SessionError):
    """Another process holds the session's lock."""


class SchemaError(ValueError):
    """A field of a session does not fit its schema; the message names the field."""


# -- what a session may hold --------------------------------------------------------------------
# session.json, field by field. A spec is an object ({field: spec}: exactly these fields) or
# (kind, ...): ("int", lo, hi), ("number", lo, hi), ("text", regex or None, what it is),
# ("one of", values), ("list", item spec, at most). `conform` is the one checker.


def Int(lo, hi):
    return ("int", lo, hi)


def Number(lo, hi):
    return ("number", lo, hi)


def Text(regex=None, what=None):
    return ("text", regex, what)


def OneOf(*values):
    return ("one of", values)


def ListOf(item, most):
    return ("list", item, most)


def Bool():
    return ("bool",)


def MayLack(spec):
    """A field that may be absent (one added after sessions were first written)."""
    return ("optional", spec)


TIME = Number(0, 32503680000)  # seconds since 1970, before the year 3000
POS = Int(0, MAX_INT)  # token positions and counts (MLX indexes with 32 bits)
HEX16 = Text(r"[0-9a-f]{16}", "16 hex digits")
SLEEP = {
    "loops": Int(1, MAX_LOOPS),
    "window": Int(1, MAX_WINDOW),
    "eviction": OneOf(*EVICTION_MODES),
    "partial": MayLack(Bool()),
}
SESSION_JSON = {
    "format": Int(1, FORMAT),
    "name": Text(NAME_RE.pattern, "a session name"),
    "created": TIME,
    "saved": TIME,
    "generation": Int(1, 10**9),
    "model": {
        "path": Text(r"/[^\x00]{0,4095}", "an absolute path"),
        "fingerprint": HEX16,
        "weights": Text(r"[0-9a-f]{16}|none", "16 hex digits or 'none'"),
    },
    "sleep": SLEEP,
    "history": Int(0, MAX_HISTORY),
    "engine": {
        "offset": POS,
        "window_start": POS,
        "sleeps": POS,
        "batch_size": Int(1, 1),
        "sleep": SLEEP,
        "model": HEX16,
        "snapshot_starts": ListOf(POS, MAX_HISTORY),
        "pending_starts": MayLack(ListOf(POS, MAX_PENDING)),
    },
    "state_file": Text(STATE_FILE_RE.pattern, "a state file name (state-NNNNNN.safetensors)"),
    "state_sha256": Text(r"[0-9a-f]{64}", "64 hex digits"),
    "state_bytes": Int(8, 1 << 40),
    "transcript": {
        "messages": ListOf(
            {"role": OneOf("system", "user", "assistant"), "content": Text()}, 1 << 20
        ),
        "fed_text": Text(),
        # what a diverging history can branch from (absent in sessions saved before branching)
        "replay_start": MayLack(POS),
        "marks": MayLack(ListOf({"offset": POS, "chars": POS}, MAX_MARKS)),
    },
}
# What the fields of a conforming session.json must agree on.
CONSISTENT = [
    (
        lambda m: m["engine"]["window_start"] <= m["engine"]["offset"],
        "engine.window_start must be <= engine.offset",
    ),
    (
        lambda m: m["engine"]["offset"] - m["engine"]["window_start"] <= m["sleep"]["window"],
        "the live window (engine.offset - engine.window_start) must be <= sleep.window",
    ),
    (lambda m: m["engine"]["sleep"] == m["sleep"], "engine.sleep must equal sleep"),
    (
        lambda m: m["engine"]["model"] == m["model"]["fingerprint"],
        "engine.model must equal model.fingerprint",
    ),
    (
        lambda m: len(m["engine"]["snapshot_starts"]) <= min(m["history"], m["engine"]["sleeps"]),
        "engine.snapshot_starts may hold at most history and engine.sleeps entries",
    ),
    (
        lambda m: (
            m["engine"]["snapshot_starts"] == sorted(m["engine"]["snapshot_starts"])
            and all(a <= m["engine"]["window_start"] for a in m["engine"]["snapshot_starts"])
        ),
        "engine.snapshot_starts must ascend, up to engine.window_start",
    ),
    (
        lambda m: all(
            b - a == m["sleep"]["window"]
            for a, b in zip(
                pending_starts(m), pending_starts(m)[1:] + [m["engine"]["window_start"]]
            )
        ),
        "engine.pending_starts must be windows of sleep.window tokens, one after another up to "
        "engine.window_start",
    ),
    (
        lambda m: all(
            a <= (pending_starts(m) or [m["engine"]["window_start"]])[0]
            for a in m["engine"]["snapshot_starts"]
        ),
        "engine.snapshot_starts must come before the first of engine.pending_starts",
    ),
    (
        lambda m: replay_start(m) <= m["engine"]["offset"],
        "transcript.replay_start must be <= engine.offset",
    ),
    (
        lambda m: marks_fit(m),
        "transcript.marks must ascend, from transcript.replay_start up to engine.offset, and "
        "their chars up to the length of transcript.fed_text",
    ),
    (
        lambda m: m["state_file"] == state_file_name(m["generation"]),
        "state_file must be state-<generation>.safetensors",
    ),
]


def replay_start(meta) -> int:
    """Where the recorded ids of a branch begin (sessions saved before branching: nothing
    recorded, so at engine.offset)."""
    return meta["transcript"].get("replay_start", meta["engine"]["offset"])


def marks(meta) -> list:
    return meta["transcript"].get("marks", [])


def marks_fit(meta) -> bool:
    """The marks ascend (positions strictly) inside the recorded ids, their chars inside
    fed_text."""
    points = [(a["offset"], a["chars"]) for a in marks(meta)]
    end, chars = meta["engine"]["offset"], len(meta["transcript"]["fed_text"])
    return all(replay_start(meta) <= p <= end and c <= chars for p, c in points) and all(
        p < q and c <= d for (p, c), (q, d) in zip(points, points[1:])
    )


def pending_starts(meta) -> list:
    """The deferred windows' first positions (absent in sessions saved with none)."""
    return meta["engine"].get("pending_starts", [])


_SURROGATE = re.compile("[\ud800-\udfff]")


def conform(spec, value, field: str = ""):
    """`value` fits `spec` (see SESSION_JSON), or SchemaError naming the first field that does
    not. Recurses only as deep as the spec (a value nested deeper is refused by its type)."""
    where = field or "the top level"
    if isinstance(spec, dict):
        if type(value) is not dict:
            raise SchemaError(f"{where} must be an object (got {show(value)})")
        for key in value:
            if key not in spec:
                raise SchemaError(f"{where} has an unknown field {show(key)}")
        for key, sub in spec.items():
            if key in value:
                conform(sub, value[key], f"{field}.{key}" if field else key)
            elif not (isinstance(sub, tuple) and sub[0] == "optional"):
                raise SchemaError(f"{where} lacks the field {key!r}")
        return
    kind = spec[0]
    if kind == "optional":
        return conform(spec[1], value, field)
    if kind == "list":
        if type(value) is not list or len(value) > spec[2]:
            raise SchemaError(f"{where} must be a list of at most {spec[2]} (got {show(value)})")
        for i, item in enumerate(value):
            conform(spec[1], item, f"{field}[{i}]")
        return
    if kind == "int":
        ok, want = (
            type(value) is int and spec[1] <= value <= spec[2],
            f"an integer in {spec[1]}..{spec[2]}",
        )
    elif kind == "number":  # NaN and the infinities fail the comparison
        ok, want = (
            type(value) in (int, float) and spec[1] <= value <= spec[2],
            f"a number in {spec[1]}..{spec[2]}",
        )
    elif kind == "bool":
        ok, want = type(value) is bool, "true or false"
    elif kind == "one of":
        ok, want = type(value) is str and value in spec[1], "one of " + ", ".join(spec[1])
    else:  # text: a string (valid Unicode), matching the regex if any
        ok = (
            type(value) is str
            and not _SURROGATE.search(value)
            and (spec[1] is None or re.fullmatch(spec[1], value) is not None)
        )
        want = spec[2] or "a string"
    if not ok:
        raise SchemaError(f"{where} must be {want} (got {show(value)})")


def check_meta(meta):
    """session.json's content: SESSION_JSON, then CONSISTENT; SchemaError otherwise."""
    conform(SESSION_JSON, meta)
    for test, rule in CONSISTENT:
        if not test(meta):
            raise SchemaError(rule)


def state_file_name(generation: int) -> str:
    return f"state-{generation:06d}.safetensors"


# -- the store: plain names, real directories, no symlinks ----------------------------------------


def home() -> str:
    """The home may be anywhere the user puts it (a link to another disk included); nothing
    below it is followed through a symlink."""
    return os.path.expanduser(os.environ.get("MLX_SLEEP_HOME") or "~/.mlx_sleep")


def sessions_dir() -> str:
    return os.path.join(home(), "sessions")


def check_name(name) -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise SessionError(
            f"{show(name)} is not a session name: use letters, digits, '.', '_', "
            "'-' (at most 64, starting with a letter or digit)"
        )
    return name


def session_path(name: str) -> str:
    """Where session `name` lives (the name checked; nothing on disk is)."""
    return os.path.join(sessions_dir(), check_name(name))


def _real_dir(path: str, create: bool) -> bool:
    """`path` is a directory of ours, not a symlink (created 0700 if absent and `create`):
    True; absent: False; anything else: SessionError."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        if not create:
            return False
        with contextlib.suppress(FileExistsError):  # a concurrent creator: checked below
            os.mkdir(path, 0o700)
            os.chmod(path, 0o700)  # whatever the umask
        st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        raise SessionError(
            f"{path} is a symlink; sessions are kept only in real directories "
            f"under {home()}: replace the link with a directory (or remove it)"
        )
    if not stat.S_ISDIR(st.st_mode):
        raise SessionError(f"{path} is not a directory; move it away")
    if st.st_uid != os.geteuid():
        raise SessionError(
            f"{path} belongs to another user; mlx-sleep keeps sessions only in directories of yours"
        )
    return True


def store(create: bool = False) -> Optional[str]:
    """The sessions directory (None when absent and not `create`d)."""
    if create and not os.path.isdir(home()):
        os.makedirs(os.path.dirname(os.path.abspath(home())), exist_ok=True)
        with contextlib.suppress(FileExistsError):
            os.mkdir(home(), 0o700)
            os.chmod(home(), 0o700)
    if not os.path.isdir(home()):
        if create or os.path.lexists(home()):
            raise SessionError(
                f"{home()} (MLX_SLEEP_HOME) is not a directory; point MLX_SLEEP_HOME at a directory"
            )
        return None
    return sessions_dir() if _real_dir(sessions_dir(), create) else None


def session_dir(name: str, create: bool = False) -> Optional[str]:
    """Session `name`'s directory, a real directory inside the store (None when absent)."""
    path = session_path(name)
    if store(create) is None:
        return None
    return path if _real_dir(path, create) else None


def list_sessions() -> List[str]:
    root = store()
    if root is None:
        return []
    return sorted(
        n
        for n in os.listdir(root)
        if NAME_RE.fullmatch(n) and os.path.lexists(os.path.join(root, n, "session.json"))
    )


def report_sessions(echo=print):
    """`mlx-sleep sessions list`: one line per session (for one that cannot be read, why), then
    SessionError naming those that cannot be read, if any (exit status 1)."""
    import datetime

    names, unreadable = list_sessions(), []
    if not names:
        echo(f"no sessions in {sessions_dir()}")
    for name in names:
        try:
            meta = read_meta(name)
        except SessionError as e:
            echo(f"{name}: {e}")
            unreadable.append(name)
            continue
        e, L = meta["engine"], meta["sleep"]["window"]
        saved = datetime.datetime.fromtimestamp(meta["saved"]).strftime("%Y-%m-%d %H:%M")
        pending = len(pending_starts(meta))
        echo(
            f"{name}: {e['offset']} tokens, window {e['offset'] - e['window_start']}/{L}, "
            f"{e['sleeps']} consolidations{f' ({pending} pending)' if pending else ''}, "
            f"{len(meta['transcript']['messages'])} messages, "
            f"{meta['state_bytes'] / (1 << 20):.1f} MiB, saved {saved}, "
            f"model {os.path.basename(meta['model']['path'])}"
        )
    if unreadable:
        raise SessionError(
            f"{len(unreadable)} of {len(names)} sessions cannot be read "
            f"({', '.join(unreadable)}): see above"
        )


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
    return {
        "path": os.path.abspath(model_dir),
        "fingerprint": model.fingerprint(),
        "weights": weights_hash(model_dir),
    }


# -- the engine a session runs -----------------------------------------------------------------


class SessionEngine(SleepEngine):
    """A SleepEngine that keeps, for /forget, the state before each of its last `history`
    consolidated windows."""

    def __init__(
        self,
        model,
        sleep: Optional[SleepConfig] = None,
        history: int = 3,
        defer: bool = False,
        max_pending: int = 4,
    ):
        self.history = history
        super().__init__(model, sleep, defer=defer, max_pending=max_pending)

    def reset(self):
        super().reset()
        self.snapshots = []  # [(state before the window, the window's first position)]

    def _slept(self, start_state, start: int):
        if self.history > 0:
            self.snapshots = (self.snapshots + [(start_state, start)])[-self.history :]

    def forget(self) -> bool:
        """Roll back the last consolidation: the fast weights return to what they were before
        that window, which is gone; the live window (tokens since) is re-run on top, at the same
        positions. Pending windows are deepened first (the last window evicted is then the last
        consolidated). False when there is nothing to roll back."""
        self.catch_up()
        if not self.snapshots:
            return False
        state, _ = self.snapshots.pop()
        self.window_start_state = self.state = state
        if self.window_ids:
            live, self.window_core = mx.concatenate(self.window_ids, axis=1), []
            _, self.state = run_chunk(
                self.model,
                live,
                state,
                self.window_start,
                1,
                self.sleep.attention_window,
                core_out=self.window_core if self.sleep.loops > 1 else None,
            )
            self.window_ids = [live]
        mx.eval(self.state, self.window_core)
        self.sleeps -= 1
        return True

    def boundaries(self) -> List[int]:
        """The positions `rewind` can return to, ascending: the first position of each
        /forget snapshot's window, of each pending window, and of the live window."""
        return (
            [s for _, s in self.snapshots] + [s for _, _, s in self.pending] + [self.window_start]
        )

    def rewind(self, position: int):
        """Return to what the engine held at `position` (one of `boundaries()`), as if nothing
        after it had been fed: the live window's start state, a pending window's start state
        (the windows before it stay pending), or a snapshot (the consolidations since are
        undone). The next feed continues at `position`."""
        starts = [s for _, _, s in self.pending]
        if position == self.window_start:
            state = self.window_start_state
        elif position in starts:
            j = starts.index(position)
            state, self.pending = self.pending[j][1], self.pending[:j]
        else:
            k = [s for _, s in self.snapshots].index(position)  # ValueError: not a boundary
            state, undone = self.snapshots[k][0], len(self.snapshots) - k
            self.snapshots, self.pending = self.snapshots[:k], []
            self.sleeps -= undone
        self.state = self.window_start_state = state
        self.window_start = self.offset = position
        self.window_ids, self.window_core = [], []

    def fork(self) -> "SessionEngine":
        """A second engine holding the same memory (arrays are immutable: nothing is copied);
        feeding one leaves the other as it was."""
        other = copy.copy(self)
        other.window_ids, other.window_core = list(self.window_ids), list(self.window_core)
        other.pending, other.snapshots = list(self.pending), list(self.snapshots)
        other.on_forced_sleep = None
        return other

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
            s = fill_state(fresh, tree[i] if i < len(tree) else [])
            check_state(f"snapshot {i}", s, fresh)
            snapshots.append((s, int(start)))
        self.load_state_dict({"arrays": rest, "meta": meta})  # checks, or leaves all unchanged
        self.snapshots = snapshots[-self.history :] if self.history > 0 else []


# -- the state file: what its arrays must be for the model ---------------------------------------

ST_DTYPES = {
    "F32": (mx.float32, 4),
    "F16": (mx.float16, 2),
    "BF16": (mx.bfloat16, 2),
    "F64": (mx.float64, 8),
    "I64": (mx.int64, 8),
    "I32": (mx.int32, 4),
    "I16": (mx.int16, 2),
    "I8": (mx.int8, 1),
    "U64": (mx.uint64, 8),
    "U32": (mx.uint32, 4),
    "U16": (mx.uint16, 2),
    "U8": (mx.uint8, 1),
    "BOOL": (mx.bool_, 1),
}
ST_NAME = {dtype: name for name, (dtype, _) in ST_DTYPES.items()}
# The little-endian numpy dtype holding each one's bytes (bf16 as its 16 bits, then viewed)
ST_NUMPY = dict(
    F32="<f4", F16="<f2", BF16="<u2", F64="<f8", I64="<i8", I32="<i4", I16="<i2", I8="i1",
    U64="<u8", U32="<u4", U16="<u2", U8="u1", BOOL="?",
)  # fmt: skip
TOKEN_DTYPES = frozenset({"I32", "I64", "U32"})


def state_schema(model, meta: dict) -> dict:
    """{array name: (dtypes, shape, required)} that the state file of `meta` (a checked
    session.json) may hold for `model`, and nothing else. A shape entry (lo, hi) is a range: the
    token axis of the KV, at most min(window L, the tokens before that state). The dtypes and
    shapes come from the model itself: its fresh state, and that state after one token (MLX is
    lazy: nothing is computed, only shapes are)."""
    e, L = meta["engine"], meta["sleep"]["window"]
    sleep = SleepConfig.from_dict(meta["sleep"])
    fresh, core = model.initial_state(1), []
    _, after = run_chunk(
        model, mx.zeros((1, 1), dtype=mx.int32), fresh, 0, 1, sleep.attention_window, core_out=core
    )

    def layers(prefix, tokens):
        out = {}
        for i, (f, a) in enumerate(zip(fresh, after)):
            for key in dict(f, **a):
                if key in f:  # a fixed size: fast weights, conv inputs
                    dtypes = {ST_NAME[x[key].dtype] for x in (f, a) if key in x}
                    out[f"{prefix}.{i}.{key}"] = (dtypes, tuple(f[key].shape), key in a)
                elif min(L, tokens) > 0:  # grows with the tokens: the KV [B, H, T, D], or none
                    shape = list(a[key].shape)
                    shape[2] = (1, min(L, tokens))
                    out[f"{prefix}.{i}.{key}"] = ({ST_NAME[a[key].dtype]}, tuple(shape), False)
        return out

    spec = {**layers("state", e["offset"]), **layers("window_start_state", e["window_start"])}
    for j, start in enumerate(e["snapshot_starts"]):
        spec.update(layers(f"snapshots.{j}", start))
    for j, start in enumerate(pending_starts(meta)):
        spec[f"pending.{j}.ids"] = (TOKEN_DTYPES, (1, L), True)
        spec.update(layers(f"pending.{j}.start", start))
    if e["offset"] > replay_start(meta):
        spec["replay_ids"] = (TOKEN_DTYPES, (1, e["offset"] - replay_start(meta)), True)
    live = e["offset"] - e["window_start"]
    if live:
        spec["window_ids"] = (TOKEN_DTYPES, (1, live), True)
        spec["window_core"] = ({ST_NAME[core[0].dtype]}, (1, live, core[0].shape[-1]), False)
    return spec


def _shape_text(shape) -> str:
    return (
        "[" + ", ".join(f"{s[0]}..{s[1]}" if isinstance(s, tuple) else str(s) for s in shape) + "]"
    )


def conform_arrays(spec: dict, found: dict, where: str):
    """The arrays `found` ({name: (dtype, shape)}, a safetensors header) are those of `spec`
    (state_schema): each required one there, no other, dtypes and shapes in range, and the
    optional arrays of one layer (keys, values) all there or none, of one shape."""
    for name in found:
        if name not in spec:
            raise SchemaError(
                f"{where} holds an array {show(name)} that this model's sessions do not have"
            )
    groups = {}
    for name, (dtypes, shape, required) in spec.items():
        if name not in found:
            if required:
                raise SchemaError(f"{where} lacks the array {name}")
            continue
        dtype, got, _ = found[name]
        if dtype not in dtypes:
            raise SchemaError(
                f"{where} {name} is {dtype}; the model needs {' or '.join(sorted(dtypes))}"
            )
        if len(got) != len(shape) or not all(
            lo_hi[0] <= g <= lo_hi[1] if isinstance(lo_hi, tuple) else g == lo_hi
            for g, lo_hi in zip(got, shape)
        ):
            raise SchemaError(
                f"{where} {name} is {_shape_text(got)}; the model needs {_shape_text(shape)}"
            )
        if not required:
            groups.setdefault(name.rsplit(".", 1)[0], set()).add(name)
    for group, names in groups.items():
        want = {n for n in spec if n.rsplit(".", 1)[0] == group and not spec[n][2]}
        if names != want or len({found[n][1] for n in names}) != 1:
            raise SchemaError(
                f"{where} {group} must hold {' and '.join(sorted(want))} of one "
                "shape, or none of them"
            )


def safetensors_header(data: bytes, where: str) -> dict:
    """{name: (dtype, shape, offset)} of a safetensors file's bytes, every entry checked against
    them (offset: where its data starts in `data`)."""
    if len(data) < 8 or struct.unpack("<Q", data[:8])[0] > len(data) - 8:
        raise SchemaError(f"{where} is not a safetensors file (truncated header)")
    n = struct.unpack("<Q", data[:8])[0]
    try:
        header = json.loads(data[8 : 8 + n])
    except (ValueError, RecursionError):
        raise SchemaError(f"{where} is not a safetensors file (its header is not JSON)")
    if not isinstance(header, dict):
        raise SchemaError(f"{where} is not a safetensors file (its header is not an object)")
    header.pop("__metadata__", None)
    out, spans = {}, []
    for name, info in header.items():
        try:
            dtype, shape, (a, b) = info["dtype"], info["shape"], info["data_offsets"]
            ok = (
                dtype in ST_DTYPES
                and type(shape) is list
                and len(shape) <= 8
                and all(type(x) is int and 0 <= x <= MAX_INT for x in shape)
                and all(type(x) is int for x in (a, b))
                and 0 <= a <= b <= len(data) - 8 - n
            )
            count = 1
            for x in shape if ok else ():
                count *= x
            ok = ok and b - a == count * ST_DTYPES[dtype][1]
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise SchemaError(f"{where} has a bad header entry for {show(name)}")
        out[name] = (dtype, tuple(shape), 8 + n + a)
        spans.append((a, b))
    spans.sort()
    if any(b > c for (_, b), (c, _) in zip(spans, spans[1:])):
        raise SchemaError(f"{where} has overlapping arrays")
    return out


def arrays_from_safetensors(data: bytes, header: dict) -> dict:
    """The arrays of a safetensors file's bytes, from its checked header. Not mx.load on a file
    object: MLX reads one from its own threads, and a process that exits with such arrays
    unread (a session refused at its first bad array) can abort ("terminate called without an
    active exception"; 1 exit in 2 on a loaded 2-core machine, MLX 0.32.4)."""
    out = {}
    for key, (dtype, shape, offset) in header.items():
        count = int(np.prod(shape, dtype=np.int64))
        raw = np.frombuffer(data, ST_NUMPY[dtype], count, offset).reshape(shape)
        if dtype == "BF16":
            out[key] = mx.array(raw).view(mx.bfloat16)
        else:
            out[key] = mx.array(raw, dtype=ST_DTYPES[dtype][0])
    return out


def max_state_bytes(spec: dict) -> int:
    """The largest state file `spec` allows (its header included, generously)."""
    total = 1 << 20
    for dtypes, shape, _ in spec.values():
        count = 1
        for s in shape:
            count *= s[1] if isinstance(s, tuple) else s
        total += count * max(ST_DTYPES[d][1] for d in dtypes)
    return total


def read_state(path: str, meta: dict, model) -> dict:
    """The arrays of a session's state file, checked: a regular file (no symlink) of the size
    and sha256 session.json records, a header that fits state_schema(model, meta), finite
    floating-point values and token ids in the vocabulary. SchemaError otherwise."""
    name = meta["state_file"]
    spec = state_schema(model, meta)
    if meta["state_bytes"] > max_state_bytes(spec):
        raise SchemaError(
            f"state_bytes {meta['state_bytes']} is larger than a state of this "
            f"model can be ({max_state_bytes(spec)})"
        )
    try:
        with os.fdopen(open_nofollow(path), "rb") as f:
            data = f.read(meta["state_bytes"] + 1)
    except FileNotFoundError:
        raise SchemaError(f"its state file {name} is missing")
    except ConfigError as e:
        raise SchemaError(str(e))
    if len(data) != meta["state_bytes"] or hashlib.sha256(data).hexdigest() != meta["state_sha256"]:
        raise SchemaError(f"{name} does not match its checksum (truncated or modified)")
    header = safetensors_header(data, name)
    conform_arrays(spec, header, name)
    arrays = arrays_from_safetensors(data, header)
    for key, a in sorted(arrays.items()):
        if mx.issubdtype(a.dtype, mx.floating) and not mx.all(mx.isfinite(a)).item():
            raise SchemaError(f"{name} {key} holds NaN or infinite values")
    for key in sorted(arrays):
        if key in ("window_ids", "replay_ids") or key.endswith(".ids"):  # and pending windows'
            model.check_ids(arrays[key])
    return arrays


# -- a session: engine + transcript + files ----------------------------------------------------


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with os.fdopen(open_nofollow(path), "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _corrupt(name: str, why) -> SessionError:
    return SessionError(
        f"session {name!r} is corrupt ({why}); remove it with `mlx-sleep "
        f"sessions rm {name}` or use another name"
    )


def read_meta(name: str) -> dict:
    """session.json of `name`, checked (check_meta), and its state file present as a regular
    file of the recorded size; SessionError with one line otherwise. Reads nothing through a
    symlink."""
    path = session_dir(name)
    meta_path = os.path.join(path or session_path(name), "session.json")
    if path is None or not os.path.lexists(meta_path):
        raise SessionError(f"no session {name!r} in {sessions_dir()} (mlx-sleep sessions list)")
    try:
        if os.lstat(meta_path).st_size > MAX_META_BYTES:
            raise ConfigError(f"session.json is larger than {MAX_META_BYTES >> 20} MiB")
        meta = read_json(meta_path, max_depth=MAX_JSON_DEPTH, nofollow=True)
    except ConfigError as e:  # not valid JSON, too deep, a symlink, not a regular file
        raise _corrupt(name, e)
    if isinstance(meta, dict) and type(meta.get("format")) is int and meta["format"] > FORMAT:
        raise SessionError(
            f"session {name!r} was written by a newer mlx-sleep (format "
            f"{meta['format']}, this one reads {FORMAT}): upgrade mlx-sleep"
        )
    try:
        check_meta(meta)
    except SchemaError as e:
        raise _corrupt(name, f"session.json: {e}")
    state_path = os.path.join(path, meta["state_file"])
    try:
        st = os.lstat(state_path)
    except FileNotFoundError:
        raise _corrupt(name, f"its state file {meta['state_file']} is missing")
    if not stat.S_ISREG(st.st_mode):
        raise _corrupt(
            name, f"its state file {meta['state_file']} is {file_kind(st)}, not a regular file"
        )
    if st.st_size != meta["state_bytes"]:
        raise _corrupt(
            name, f"{meta['state_file']} does not match its checksum (truncated or modified)"
        )
    return meta


class Conversation:
    """What a conversation holds: `engine` (a SessionEngine), `messages` (the chat so far),
    `fed_text` (the text the engine has consumed), and what lets a history that diverges from
    it resume from an earlier point instead of from nothing (`branch_point`):

    - `replay_ids`: the token ids fed since position `replay_start`, the oldest point the
      engine can still rewind to (its boundaries: snapshots, pending windows, the live window);
      bounded by those windows, not by the conversation.
    - `marks`: [(position, chars)], ascending: the tokens fed before `position` are exactly
      the text `fed_text[:chars]` (turn starts, prompt ends, turn ends). A window boundary
      usually falls inside a turn, where no text position matches a token position (the
      tokenization of a prefix is not a prefix of the tokenization), so a branch rewinds to a
      boundary and re-feeds the recorded ids up to a mark: the tokens are the ones first fed."""

    def __init__(self, engine, messages=None, fed_text=""):
        self.engine, self.messages, self.fed_text = engine, list(messages or []), fed_text
        offset = engine.offset if engine is not None else 0
        self.replay_start, self.replay_ids = offset, []
        self.marks = [(0, 0)] if offset == 0 and not fed_text else []

    def clear(self, messages=()):
        """Forget everything (the engine too): a fresh memory for `messages`."""
        self.engine.reset()
        self.messages, self.fed_text = list(messages), ""
        self.replay_start, self.replay_ids, self.marks = 0, [], [(0, 0)]

    def recorded(self, offset: Optional[int] = None) -> bool:
        """The replay record describes the engine at `offset` (default: where it is): every
        token since replay_start, marks inside it (false when the engine or fed_text was
        changed without `record_turn`)."""
        end = self.replay_start + len(self.replay_ids)
        offset = self.engine.offset if offset is None else offset
        return end == offset and all(
            self.replay_start <= p <= end and c <= len(self.fed_text) for p, c in self.marks
        )

    def record_turn(self, start: int, fed, fed_text: str, kept, marks, rewound=False):
        """A turn fed the token ids `fed` from position `start` (the engine is now past them)
        and the conversation's text is `fed_text`. `kept` (position, chars): the marks up to it
        still hold (the text before it is unchanged); `marks`: the turn's new ones. `rewound`:
        the engine was rewound to `start` (a branch_point, taken while the record held)."""
        if not (rewound or self.recorded(start)) or start < self.replay_start:
            self.replay_start, self.replay_ids, self.marks = start, [], []
        self.replay_ids = self.replay_ids[: start - self.replay_start] + [int(t) for t in fed]
        p, c = kept
        self.marks = [m for m in self.marks if m[0] <= p and m[1] <= c]
        for m in marks:
            if not self.marks or (m[0] > self.marks[-1][0] and m[1] >= self.marks[-1][1]):
                self.marks.append(m)
        self.fed_text = fed_text
        oldest = self.engine.boundaries()[0]  # what nothing can rewind to any more: dropped
        if oldest > self.replay_start:
            self.replay_ids = self.replay_ids[oldest - self.replay_start :]
            self.replay_start = oldest
            self.marks = [m for m in self.marks if m[0] >= oldest]

    def branch_point(self, text: str):
        """Where a history whose text is `text` can resume in this conversation: (boundary,
        the ids to re-feed from it, mark position, mark chars) for the latest mark whose text is
        a prefix of `text`, at the latest boundary before it that leaves something to feed
        (generation needs the last token's logits); None when nothing but position 0 is."""
        if not self.recorded():
            return None
        common = len(os.path.commonprefix([text, self.fed_text]))
        bounds = [b for b in self.engine.boundaries() if 0 < b and b >= self.replay_start]
        for p, c in reversed(self.marks):
            usable = [b for b in bounds if b < p or (b == p and c < len(text))]
            if c <= common and usable:
                b = usable[-1]
                ids = self.replay_ids[b - self.replay_start : p - self.replay_start]
                return b, ids, p, c
        return None


class Session(Conversation):
    """One named session: a Conversation on disk, saved with `save()`. Open it with
    `open_session`."""

    def __init__(self, name, engine, identity, messages=None, fed_text="", meta=None):
        super().__init__(engine, messages, fed_text)
        self.name, self.identity = name, identity
        self.path = session_path(name)
        self.meta = meta or {"created": time.time(), "generation": 0}
        self._lock = None

    # Only one process writes a session: flock, released by the kernel even on SIGKILL.
    def lock(self, create: bool = True):
        """Take the session's lock (SessionInUse when another process holds it); `create`: make
        the directory of a new session, else it must still be there."""
        gone = SessionError(
            f"session {self.name!r} was removed while it was being opened; try again"
        )
        path = session_dir(self.name, create)
        if path is None:
            raise gone
        lock_path = os.path.join(path, "lock")
        try:
            fd = lock_file(
                lock_path,
                f"session {self.name!r} is in use by another mlx-sleep process; close it first",
                nofollow=True,
            )
        except OutputError as e:
            raise SessionInUse(str(e))
        except FileNotFoundError:
            raise gone
        except ConfigError as e:  # a symlink or not a regular file
            raise _corrupt(self.name, e)
        # `sessions rm` renames the directory away while it holds the lock: a lock taken on
        # the file it moved is no lock on this session.
        try:
            same = os.path.samestat(os.fstat(fd), os.lstat(lock_path))
        except FileNotFoundError:
            same = False
        if not same:
            os.close(fd)
            raise gone
        self._lock = fd

    def close(self):
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    def save(self) -> int:
        """Write the session (see the module docstring for why this order); returns bytes."""
        arrays, engine_meta = self.engine.arrays_and_meta()
        if (
            not self.recorded()
        ):  # fed outside record_turn: nothing to branch from until the next turn
            self.replay_start, self.replay_ids, self.marks = self.engine.offset, [], []
        if self.replay_ids:
            arrays["replay_ids"] = mx.array([self.replay_ids], dtype=mx.int32)
        generation = self.meta.get("generation", 0) + 1
        state_file = state_file_name(generation)
        path = session_dir(self.name, create=True)  # still a real directory in the store
        state_path = os.path.join(path, state_file)
        save_arrays(state_path, arrays, mode=0o600)
        meta = dict(
            self.meta,
            format=FORMAT,
            name=self.name,
            saved=time.time(),
            generation=generation,
            model=self.identity,
            sleep=self.engine.sleep.to_dict(),
            history=self.engine.history,
            engine=engine_meta,
            state_file=state_file,
            state_sha256=_sha256_file(state_path),
            state_bytes=os.lstat(state_path).st_size,
            transcript={
                "messages": self.messages,
                "fed_text": self.fed_text,
                "replay_start": self.replay_start,
                "marks": [{"offset": p, "chars": c} for p, c in self.marks],
            },
        )
        write_json(os.path.join(path, "session.json"), meta, mode=0o600)
        self.meta = meta
        # Older state files and temporaries a killed save left behind (all ours by name).
        for old in glob.glob(os.path.join(path, "state-*.safetensors")) + glob.glob(
            os.path.join(path, TMP_PREFIX + "*")
        ):
            if os.path.basename(old) != state_file:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(old)
        return meta["state_bytes"]


def check_model(name: str, meta: dict, identity: dict):
    saved = meta["model"]
    for key, what in (("fingerprint", "architecture"), ("weights", "weights")):
        if saved.get(key) != identity[key]:
            raise SessionError(
                f"session {name!r} belongs to another model ({what} differ: it was saved with "
                f"{saved.get('path')}); resume it with --model {saved.get('path')} or start a "
                "new --session"
            )


def unfinished_file(name: str) -> bool:
    """What a session's first save leaves before its session.json: the lock, a state file, a
    temporary (every one named by us)."""
    return name == "lock" or bool(STATE_FILE_RE.fullmatch(name)) or name.startswith(TMP_PREFIX)


def open_session(
    name: str,
    model,
    model_dir: str,
    sleep: Optional[SleepConfig] = None,
    history: int = 3,
    system_prompt: Optional[str] = None,
    create: bool = True,
    lock: bool = True,
    defer: bool = False,
    max_pending: int = 4,
) -> Session:
    """Open (or create) session `name` for `model` (loaded from `model_dir`).

    `sleep` overrides the model's settings for a new session; an existing one keeps its own and
    refuses different ones. `defer`, `max_pending`: the engine's deferred sleep (a session
    saved with pending windows opens without it too: its next sleep deepens them). The lock is taken first, then every check runs before anything is
    written: a session that cannot be opened is left byte for byte as it was."""
    if type(history) is not int or not 0 <= history <= MAX_HISTORY:
        raise SessionError(
            f"--history must be an integer in 0..{MAX_HISTORY} (got {show(history)})"
        )
    path = session_dir(name)
    identity = model_identity(model, model_dir)
    if path is None or not os.path.lexists(os.path.join(path, "session.json")):
        if not create:
            raise SessionError(f"no session {name!r} in {sessions_dir()} (mlx-sleep sessions list)")
        # A first save killed before session.json was written leaves the lock, a state file
        # and temporaries: ours by name, replaced by this session's first save.
        others = [] if path is None else [f for f in os.listdir(path) if not unfinished_file(f)]
        if others:
            raise SessionError(
                f"{path} exists but holds no session.json (it has "
                f"{', '.join(sorted(others)[:3])}); remove it or use another name"
            )
        engine = SessionEngine(model, sleep or model.sleep_config, history, defer, max_pending)
        messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
        session = Session(name, engine, identity, messages)
        clean_stale_temps(store(create=True))  # what a killed `sessions rm` left
        if lock:
            session.lock()
        return session

    session = Session(name, None, identity)
    if lock:
        session.lock(create=False)
    try:
        meta = read_meta(name)
        check_model(name, meta, identity)
        saved_sleep = SleepConfig.from_dict(meta["sleep"])
        if sleep is not None and sleep != saved_sleep:
            raise SessionError(
                f"session {name!r} sleeps with {saved_sleep.to_dict()}; resume "
                "it without --window/--loops/--eviction, or start a new --session"
            )
        try:
            arrays = read_state(os.path.join(path, meta["state_file"]), meta, model)
            replay = arrays.pop("replay_ids", None)
            engine = SessionEngine(model, saved_sleep, meta["history"], defer, max_pending)
            engine.load_arrays_and_meta(arrays, meta["engine"])
        except (SchemaError, ValueError, RuntimeError, KeyError, TypeError) as e:
            raise _corrupt(name, str(e).splitlines()[0] if str(e) else type(e).__name__)
    except BaseException:
        session.close()
        raise
    transcript = meta["transcript"]
    session.engine, session.meta = engine, meta
    session.messages, session.fed_text = list(transcript["messages"]), transcript["fed_text"]
    session.replay_start = replay_start(meta)
    session.replay_ids = [] if replay is None else replay[0].tolist()
    session.marks = [(m["offset"], m["chars"]) for m in marks(meta)]
    return session


def remove_session(name: str) -> List[str]:
    """Delete a session's files (only those a session consists of) and its directory, holding
    its lock (a session open in a chat or a consolidation is refused). The directory first
    leaves the store in one rename, so a process killed at any moment leaves the session whole
    or gone; the next write to the store removes what it left. Nothing is followed through a
    symlink (a link among its files is unlinked, its target untouched); the content is not
    read (a corrupt session stays removable)."""
    path = session_dir(name)
    if path is None:
        raise SessionError(f"no session {name!r} in {sessions_dir()}")
    root = sessions_dir()
    clean_stale_temps(root)
    probe = Session(name, None, None)
    probe.lock(create=False)  # not while another process has it open
    try:
        names = sorted(os.listdir(path))
        others = []
        for f in names:
            ours = (
                f in ("session.json", "lock")
                or f.startswith(TMP_PREFIX)
                or STATE_FILE_RE.fullmatch(f)
            )
            mode = os.lstat(os.path.join(path, f)).st_mode
            if not ours:
                others.append(f)
            elif stat.S_ISDIR(mode):  # unlinking anything else (a link too) is safe
                others.append(f"{f} (a directory)")
        if others:
            raise SessionError(
                f"{path} holds files mlx-sleep did not write ({', '.join(others)}); "
                "remove them first"
            )
        trash = os.path.join(root, f"{TMP_PREFIX}{os.getpid()}-rm-{name}")
        os.rename(path, trash)  # the step that removes it: before, all there; after, gone
        fsync_dir(root)
        for f in names:
            os.remove(os.path.join(trash, f))
        os.rmdir(trash)
    finally:
        probe.close()
    return [os.path.join(path, f) for f in names]


# -- consolidating saved sessions outside the chat ---------------------------------------------


def consolidate_sessions(
    names,
    min_fill: float = 0.5,
    idle=None,
    poll: float = 30.0,
    max_wait: Optional[float] = None,
    echo=print,
) -> dict:
    """Sleep on each named session's live window (if at least `min_fill` of L), one at a time.

    With `idle` (an idle source, see idle.py) it first waits until the machine is idle (polling
    every `poll` seconds, at most `max_wait` seconds), and yields as soon as it is not: the
    running consolidation is cancelled between passes and nothing half-done is saved. Sessions
    open in a chat (locked) are skipped. Returns {name: "consolidated" | "skipped: why" |
    "yielded"}. A session that cannot be read (corrupt, another model, a symlink) is left as it
    is and the others go on; then SessionError names every such session, in one line."""
    refused = []
    results = _consolidate(names, min_fill, idle, poll, max_wait, echo, refused)
    if refused:
        raise SessionError("; ".join(refused))
    return results


WAIT_NOTICE_EVERY = 600  # seconds between "still waiting" lines: a poll every 30 s is noise


def _wait_until_idle(idle, poll, max_wait, since, echo) -> bool:
    """Poll `idle` until it says idle (True) or `max_wait` seconds from `since` have passed."""
    last_notice = None
    while True:
        ok, why = idle()
        if ok:
            return True
        now = time.monotonic()
        if max_wait is not None and now - since >= max_wait:
            echo(f"not idle after {max_wait:g} s ({why}); stopping")
            return False
        if last_notice is None or now - last_notice >= WAIT_NOTICE_EVERY:
            limit = "" if max_wait is None else f" (up to {max_wait:g} s)"
            echo(f"waiting for the machine to be idle{limit}: {why}")
            last_notice = now
        time.sleep(poll if max_wait is None else max(0.0, min(poll, since + max_wait - now)))


def _consolidate(names, min_fill, idle, poll, max_wait, echo, refused) -> dict:
    from .loading import load_model
    from .weights import resolve_source

    results, models = {}, {}
    waited_since = time.monotonic()
    for name in names:
        try:
            meta = read_meta(name)
        except SessionError as e:
            results[name] = "refused"
            refused.append(str(e))
            continue
        L = meta["sleep"]["window"]
        live = meta["engine"]["offset"] - meta["engine"]["window_start"]
        if live == 0 or live < min_fill * L:
            results[name] = f"skipped: window {live}/{L} is below {min_fill:.0%} full"
            echo(f"{name}: {results[name]}")
            continue
        if idle is not None and not _wait_until_idle(idle, poll, max_wait, waited_since, echo):
            results.update({n: "skipped: not idle" for n in names if n not in results})
            return results
        path = meta["model"]["path"]
        if path not in models:
            models[path] = load_model(resolve_source(path))
        try:
            session = open_session(name, models[path], path, create=False)
        except SessionInUse as e:
            results[name] = f"skipped: {e}"
            echo(f"{name}: {results[name]}")
            continue
        except SessionError as e:
            results[name] = "refused"
            refused.append(str(e))
            continue
        try:
            cancel = None if idle is None else (lambda: not idle()[0])
            done = session.engine.consolidate(
                cancel=cancel, on_pass=lambda i, n: echo(f"{name}: pass {i}/{n}")
            )
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
