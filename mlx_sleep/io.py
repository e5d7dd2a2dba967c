"""Every file the tools write goes through here: what they may write where, and how.

The policy (docs/files.md):
  * An output directory belongs to mlx-sleep once it holds a marker file (`.mlx-sleep`) naming
    its owner: a training run, a converted model, a demo, a chat session. The tools write into
    a directory that is theirs of that kind, new or empty; one holding anything else is refused
    unless the user passes --force, and even then no file already there is replaced.
  * A directory is deleted (replaced) only when it is the tool's own output of that kind, and
    never when it is the source being converted, the current directory or one of its parents.
  * Only regular files are replaced. A symlink, FIFO, device or directory where a file would go
    is refused with one line; /dev/stdout and /dev/stderr (or "-") are written through.
  * Files are written to a temporary name, fsynced and renamed (a crash leaves the old or the
    new file, never half of one); their mode follows the umask. Temporary names carry the
    writer's pid, so the next run removes those whose process is gone.
  * One training (or session) per directory at a time: `lock_dir` holds a lock on its marker.
"""

import contextlib
import errno
import fcntl
import json
import os
import shutil
import stat
import sys
import tempfile

import mlx.core as mx

from .config import ConfigError, show

MARKER = ".mlx-sleep"
OWNERS = {
    "run": "a training run (mlx-sleep train)",
    "model": "a converted model (mlx-sleep convert)",
    "demo": "a demo (mlx-sleep demo)",
    "session": "a chat session",
    "results": "evaluation results (mlx-sleep eval --out)",
    "finetune": "a fine-tuning run (mlx-sleep finetune)",
}
TMP_PREFIX = ".mlx-sleep-tmp-"
STREAMS = {"-": "stdout", "/dev/stdout": "stdout", "/dev/stderr": "stderr"}


class OutputError(ConfigError):
    """Writing there could lose a user's file; the message says why and what to do."""


# -- modes and temporary names ----------------------------------------------------------------


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    return 0o666 & ~_umask()


def dir_mode() -> int:
    return 0o777 & ~_umask()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_temps(directory: str):
    """Remove the temporary files/directories a killed writer left in `directory` (their
    names carry the writer's pid; only those of processes that are gone)."""
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for name in names:
        if not name.startswith(TMP_PREFIX):
            continue
        pid = name[len(TMP_PREFIX) :].split("-", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid() or _pid_alive(int(pid)):
            continue
        path = os.path.join(directory, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                os.remove(path)


def _tmp_prefix(name: str = "") -> str:
    return f"{TMP_PREFIX}{os.getpid()}-{name}"


def fsync_dir(path):
    """Make a rename or a new entry in directory `path` durable (best effort)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- what may be written where ----------------------------------------------------------------


def file_kind(st) -> str:
    """What an lstat result is, in words ("a symlink", "a FIFO", "a regular file", ...)."""
    mode = st.st_mode
    for test, what in (
        (stat.S_ISLNK, "a symlink"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISDIR, "a directory"),
    ):
        if test(mode):
            return what
    return "a regular file" if stat.S_ISREG(mode) else "a special file"


def check_file_target(path: str) -> str:
    """Where a file is about to be written: "replace" (absent or a regular file: written
    atomically), "stream" (/dev/stdout, /dev/stderr, "-": written through). Anything else
    raises OutputError."""
    if path in STREAMS:
        return "stream"
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        parent = os.path.dirname(os.path.abspath(path))
        if os.path.exists(parent) and not os.path.isdir(parent):
            raise OutputError(f"cannot write {path}: {parent} is not a directory")
        return "replace"
    if stat.S_ISREG(st.st_mode):
        return "replace"
    raise OutputError(
        f"{path} is {file_kind(st)}; mlx-sleep only replaces regular files "
        "(it would replace it with one): name a new file path"
    )


# -- single output files (eval --json/--plot, data --out, sessions export -o) ---------------------
# A file cannot hold a marker beside it, so it carries one inside: JSON a "written_by" key (the
# first record of a JSONL file), PNG a "Software" text chunk. An existing file is replaced only
# when it carries it.
WRITTEN_BY = "mlx-sleep"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def written_by(path: str) -> bool:
    """Whether the regular file at `path` carries mlx-sleep's mark (read without following a
    symlink or blocking on a FIFO, and at most its first megabyte)."""
    try:
        fd = open_nofollow(path)
    except (OSError, ConfigError):
        return False
    with os.fdopen(fd, "rb") as f:
        head = f.read(1 << 20)
    if head.startswith(PNG_SIGNATURE):
        return _png_software(head).startswith(WRITTEN_BY)
    for text in (head, head.split(b"\n", 1)[0]):  # a JSON document, or a JSONL's first record
        try:
            doc = parse_json(text.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            continue
        mark = doc.get("written_by") if isinstance(doc, dict) else None
        return isinstance(mark, str) and mark.startswith(WRITTEN_BY)
    return False


def _png_software(data: bytes) -> str:
    """The text of a PNG's "Software" tEXt chunk ("" if none before the image data)."""
    pos = len(PNG_SIGNATURE)
    while pos + 8 <= len(data):
        length, kind = int.from_bytes(data[pos : pos + 4], "big"), data[pos + 4 : pos + 8]
        if kind in (b"IDAT", b"IEND"):
            break
        if kind == b"tEXt":
            key, _, value = data[pos + 8 : pos + 8 + length].partition(b"\x00")
            if key == b"Software":
                return value.decode("latin-1")
        pos += 12 + length
    return ""


def check_output_file(
    path: str, replace: bool = True, inputs=(), exists_hint: str = "pass --force to replace it"
) -> str:
    """Before a command writes the one file `path`: never one of its `inputs`, never inside a
    directory mlx-sleep made (a run, a model, a session: their files are theirs), an existing
    file only if mlx-sleep wrote it (and `replace`), a regular file only. Returns what
    check_file_target does ("replace" or "stream"); raises OutputError saying what to do."""
    if path in STREAMS:
        return "stream"
    for source in inputs:
        if (
            source
            and os.path.exists(source)
            and os.path.exists(path)
            and os.path.samefile(source, path)
        ):
            raise OutputError(
                f"{path} is this command's input ({source}); name another file to write"
            )
    directory = os.path.dirname(os.path.realpath(path))
    while True:
        owner = owner_of(directory)
        if owner is not None:
            raise OutputError(
                f"{path} is inside {directory}, {OWNERS[owner]}: its files are "
                "its own; write the file somewhere else"
            )
        if os.path.dirname(directory) == directory:
            break
        directory = os.path.dirname(directory)
    kind = check_file_target(path)
    if os.path.lexists(path):
        if not written_by(path):
            raise OutputError(
                f"{path} exists and was not written by mlx-sleep; leaving it "
                "(name a new file, or move it away)"
            )
        if not replace:
            raise OutputError(f"{path} exists; {exists_hint}")
    return kind


def check_regular_file(path: str, what: str = "") -> str:
    """For reading: `path` must be an existing regular file (a FIFO would block, a directory
    or device is not a file of ours)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist{what}")
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"{path} is {file_kind(st)}, not a regular file{what}")
    return path


def open_nofollow(path: str, flags: int = os.O_RDONLY, mode: int = 0o600, what: str = "") -> int:
    """os.open for a file of ours: a symlink (as the last component) or anything but a regular
    file (a FIFO, a device, a directory) is refused with a one-line ConfigError, without
    following or blocking on it. FileNotFoundError when it is absent (and not created)."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, mode)
    except FileNotFoundError:
        raise
    except OSError as e:
        try:
            kind = file_kind(os.lstat(path))
        except OSError:
            kind = None
        if e.errno == errno.ELOOP or kind not in (None, "a regular file"):
            raise ConfigError(f"{path} is {kind or 'a symlink'}, not a regular file{what}")
        raise ConfigError(f"{path}: {e.strerror}{what}")
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise ConfigError(f"{path} is {file_kind(st)}, not a regular file{what}")
    return fd


def owner_of(path: str):
    """The owner recorded in `path`'s marker (run, model, demo, session), or None. Directories
    written before markers existed are recognised by their contents."""
    marker = os.path.join(path, MARKER)
    if os.path.isfile(marker):
        try:
            owner = read_json(marker, max_bytes=1 << 20).get("owner")
            return owner if owner in OWNERS else None
        except (OSError, ValueError, AttributeError):
            return None
    config = os.path.join(path, "config.json")
    if os.path.isfile(os.path.join(path, "checkpoint", "trainer.json")) and os.path.isfile(config):
        return "run"
    if os.path.isfile(os.path.join(path, "checkpoint", "state.json")) and os.path.isfile(config):
        return "finetune"
    if (
        os.path.isfile(os.path.join(path, "results.json"))
        and owner_of(os.path.join(path, "N1")) == "run"
    ):
        return "demo"
    if os.path.isfile(config):
        try:
            if read_json(config).get("format") == "mlx-sleep":
                return "model"
        except (OSError, ValueError, AttributeError):
            return None
    return None


def _write_marker(path: str, owner: str):
    write_json(os.path.join(path, MARKER), {"owner": owner, "written_by": "mlx-sleep"})


def claim_dir(path: str, owner: str, force: bool = False, writes=()) -> str:
    """Make `path` an output directory of `owner` (see OWNERS) that the tool writes into in
    place: created if absent (mode from the umask); accepted if it is already ours of that
    kind or empty; a directory holding other files only with `force`, and even then none of
    the names in `writes` may already exist there (they would be replaced)."""
    if owner not in OWNERS:
        raise ValueError(f"unknown owner {owner!r}")
    if os.path.lexists(path) and not os.path.isdir(path):
        raise OutputError(f"{path} exists and is not a directory; name a new directory")
    if not os.path.exists(path):
        os.makedirs(path, mode=dir_mode())
        _write_marker(path, owner)
        return path
    found = owner_of(path)
    if found == owner:
        if not os.path.exists(os.path.join(path, MARKER)):
            _write_marker(path, owner)
        return path
    if found is not None:
        raise OutputError(
            f"{path} holds {OWNERS[found]}, not {OWNERS[owner]}; use another directory"
        )
    entries = sorted(n for n in os.listdir(path) if not n.startswith(TMP_PREFIX))
    if entries and not force:
        raise OutputError(
            f"{path} holds files mlx-sleep did not create ({', '.join(entries[:3])}"
            f"{' ...' if len(entries) > 3 else ''}); use a new or empty directory, "
            "or --force to write next to them"
        )
    clash = [n for n in writes if os.path.lexists(os.path.join(path, n))]
    if clash:
        raise OutputError(
            f"{path} already holds {', '.join(clash)} (not written by mlx-sleep); "
            "even with --force they are never replaced: use another directory"
        )
    _write_marker(path, owner)
    return path


def _is_within(inner: str, outer: str) -> bool:
    inner, outer = os.path.realpath(inner), os.path.realpath(outer)
    return inner == outer or inner.startswith(outer.rstrip(os.sep) + os.sep)


def check_replaceable_dir(path: str, owner: str, force: bool = False, protect=()) -> str:
    """`path` is about to be written as a whole (atomic_dir: built aside, swapped in, the old
    copy deleted). Allowed when it does not exist, or with `force` when it is the tool's own
    output of `owner` (or empty) and is not the current directory or a parent of it, nor one
    of `protect` (e.g. the conversion source) or a parent of one."""
    if os.path.islink(path):
        raise OutputError(f"{path} is a symlink; name the directory itself or a new path")
    if not os.path.lexists(path):
        parent = os.path.dirname(os.path.abspath(path))
        if os.path.exists(parent) and not os.path.isdir(parent):
            raise OutputError(f"cannot create {path}: {parent} is not a directory")
        return path
    if not os.path.isdir(path):
        raise OutputError(f"{path} exists and is not a directory; name a new directory")
    for keep in [os.getcwd(), *protect]:
        if keep is not None and _is_within(keep, path):
            what = "the current directory" if keep == os.getcwd() else keep
            raise OutputError(
                f"{path} contains (or is) {what}; it is never replaced: name a new output directory"
            )
    if not force:
        raise OutputError(f"{path} already exists; pass --force to replace it")
    if owner_of(path) != owner and os.listdir(path):
        raise OutputError(
            f"{path} is not {OWNERS[owner]}; --force replaces only mlx-sleep's own "
            "output: name a new directory"
        )
    return path


@contextlib.contextmanager
def lock_dir(path: str, what: str = "a training"):
    """Hold an exclusive lock on `path`'s marker while the block runs: a second process (or
    object) working in the same directory gets one line instead of corrupting the first."""
    fd = acquire_lock(path, what)
    try:
        yield
    finally:
        os.close(fd)


def lock_file(path: str, in_use: str, nofollow: bool = False) -> int:
    """An exclusive flock on the file `path` (created 0600 if absent): the fd holding it (close
    it to release; the kernel releases it even on SIGKILL). Held elsewhere: OutputError(in_use).
    `nofollow`: a symlink or anything but a regular file there is refused (open_nofollow)."""
    if nofollow:
        fd = open_nofollow(path, os.O_RDWR | os.O_CREAT, 0o600)
    else:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise OutputError(in_use)
    return fd


def acquire_lock(path: str, what: str = "a training") -> int:
    """The fd holding the lock on the directory's marker (close it to release); see lock_dir."""
    return lock_file(
        os.path.join(path, MARKER),
        f"{path} is in use by {what} in another process (or object); "
        "wait for it to finish or use another directory",
    )


# -- atomic writers ---------------------------------------------------------------------------


@contextlib.contextmanager
def atomic_path(path, mode=None):
    """Yield a temporary path next to `path`; on success it replaces `path` in one rename.
    `path` must be absent or a regular file (check_file_target); mode: the umask's."""
    if check_file_target(path) == "stream":
        raise OutputError(f"{path} is a stream; this file cannot be written there")
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, mode=dir_mode(), exist_ok=True)
    clean_stale_temps(directory)
    suffix = os.path.splitext(path)[1]  # mx.save_safetensors insists on the extension
    fd, tmp = tempfile.mkstemp(prefix=_tmp_prefix(), suffix=suffix, dir=directory)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, file_mode() if mode is None else mode)
        os.replace(tmp, path)
        fsync_dir(directory)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def stream(path):
    """The open text stream for /dev/stdout, /dev/stderr or "-" (written through: opening
    /dev/stdout again would truncate the file the shell redirected it to)."""
    return getattr(sys, STREAMS[path])


def write_text(path, text: str):
    """Atomically, or through when `path` is /dev/stdout, /dev/stderr or "-"."""
    if check_file_target(path) == "stream":
        stream(path).write(text)
        stream(path).flush()
        return
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            f.write(text)


def write_json(path, obj, mode=None):
    if check_file_target(path) == "stream":
        return write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")
    with atomic_path(path, mode) as tmp:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
            f.write("\n")


# Limits on what a JSON file may hold (config files, records, tokenizer files, headers): a
# deeply nested one would exhaust Python's recursion (a "JSON bomb"), a huge one the memory.
MAX_JSON_DEPTH = 64  # real configs and tokenizer.json files nest fewer than 10 levels
MAX_JSON_BYTES = 256 << 20  # the largest tokenizer.json files are ~35 MB


def json_depth(obj) -> int:
    """How deeply `obj` (parsed JSON) nests: 0 for a scalar, 1 for a flat list or object.
    Iterative, so it cannot itself run out of recursion."""
    deepest, stack = 0, [(obj, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            item = item.values()
        elif not isinstance(item, list):
            continue
        deepest = max(deepest, depth)
        stack.extend((v, depth + 1) for v in item if isinstance(v, (dict, list)))
    return deepest


def parse_json(text, where: str = "JSON", max_depth: int = MAX_JSON_DEPTH):
    """json.loads for text from outside (a file, a line of records, a header): malformed,
    nested deeper than `max_depth` or holding an unparseable number gives a ConfigError (one
    line, starting with `where`), never a RecursionError."""
    try:
        obj = json.loads(text)
    except RecursionError:
        raise ConfigError(
            f"{where} nests deeper than {max_depth} levels (arrays or objects "
            "nested too deeply to read); refusing it"
        )
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{where} is not valid JSON ({e})")
    except ValueError as e:  # e.g. an integer of more than 4300 digits
        raise ConfigError(f"{where} is not valid JSON ({str(e).split(':')[0][:100]})")
    if json_depth(obj) > max_depth:
        raise ConfigError(f"{where} nests deeper than {max_depth} levels; refusing it")
    return obj


def read_json(
    path,
    what: str = "",
    max_bytes: int = MAX_JSON_BYTES,
    max_depth: int = MAX_JSON_DEPTH,
    nofollow: bool = False,
):
    """A JSON file; errors name the file (and `what` it should be). Only a regular file is
    opened (a FIFO would block; with `nofollow` a symlink is refused too: open_nofollow); one
    larger than `max_bytes` or nested deeper than `max_depth` is refused."""
    if nofollow:
        f = os.fdopen(open_nofollow(path, what=what), "rb")
    else:
        check_regular_file(path, what)
        f = open(path, "rb")
    with f:
        size = os.fstat(f.fileno()).st_size
        if size > max_bytes:
            raise ConfigError(
                f"{path} is {size:,} bytes, more than the {max_bytes:,} a JSON "
                f"file may hold here{what}"
            )
        data = f.read(max_bytes + 1)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON ({e}){what}")
    try:
        return parse_json(text, str(path), max_depth)
    except ConfigError as e:
        raise ConfigError(f"{e}{what}") from None


def read_json_object(path, what: str = "") -> dict:
    obj = read_json(path, what)
    if not isinstance(obj, dict):
        raise ConfigError(f"{path} holds a JSON {type(obj).__name__}, not an object{what}")
    return obj


def save_arrays(path, arrays: dict, metadata: dict = None, mode=None):
    with atomic_path(path, mode) as tmp:
        mx.save_safetensors(tmp, arrays, metadata=metadata or {})


def _old_copy(path):
    """Where atomic_dir keeps the previous copy between its two renames."""
    parent, name = os.path.split(os.path.abspath(path))
    return os.path.join(parent, f".{name}.mlx-sleep-old")


@contextlib.contextmanager
def atomic_dir(path):
    """Build a directory under a temporary name; on success swap it in for `path`.

    If the process dies mid-way, `path` is either the old complete directory or the new one
    (a leftover old copy is the previous complete directory, used by `recover_dir`). The new
    directory's mode follows the umask. `path` itself must be a real directory or absent
    (a symlink there would be replaced by a directory)."""
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.islink(path):
        raise OutputError(
            f"{path} is a symlink; mlx-sleep replaces this directory on every "
            "save: make it a plain directory (or remove the link)"
        )
    if os.path.lexists(path) and not os.path.isdir(path):
        raise OutputError(f"{path} exists and is not a directory")
    os.makedirs(parent, mode=dir_mode(), exist_ok=True)
    clean_stale_temps(parent)
    tmp = tempfile.mkdtemp(prefix=_tmp_prefix(os.path.basename(path) + "-"), dir=parent)
    try:
        os.chmod(tmp, dir_mode())  # mkdtemp makes 0700
        yield tmp
        fsync_dir(tmp)
        old = _old_copy(path)
        if os.path.exists(path):
            if os.path.lexists(old):
                shutil.rmtree(old)
            os.replace(path, old)
        os.replace(tmp, path)
        fsync_dir(parent)
        if os.path.exists(old):
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def recover_dir(path):
    """After a crash between the two renames of `atomic_dir`, bring back the previous copy."""
    old = _old_copy(path)
    if not os.path.lexists(path) and os.path.isdir(old) and not os.path.islink(old):
        os.replace(old, path)
    return path


def trim_jsonl(path: str, keep):
    """Keep the lines of a JSONL log for which `keep(record)` holds (e.g. the steps up to a
    resumed checkpoint); lines cut by a kill are dropped. Rewritten atomically, only if changed."""
    if not os.path.exists(path):
        return
    check_regular_file(path)
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = f.readlines()
    kept = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and keep(record):
            kept.append(line)
    if kept != lines:
        write_text(path, "".join(kept))


# -- JSONL files (data, predictions): one reader, every line checked where it is read --------------

MAX_JSONL_LINE = 1 << 20  # bytes: a GSM-Infinite 32k problem is ~130 KB; more is not a record


def read_jsonl(
    path: str,
    check=None,
    what: str = "JSON object",
    nofollow: bool = False,
    max_line: int = MAX_JSONL_LINE,
    drop_partial_last: bool = False,
):
    """[(line number, record)] of every non-blank line of a JSONL file. The file must be a
    regular file (a FIFO would block; `nofollow`: and not a symlink, for files a run owns);
    each line at most `max_line` bytes of UTF-8 holding one JSON object (depth-limited), then
    `check(record, where)` (where = "PATH line N") raises ValueError naming the field.
    `drop_partial_last`: an unterminated last line that does not parse (an append cut short by a
    kill) is dropped. Errors are one line naming the file, the line and what is wrong."""
    try:
        fd = (
            open_nofollow(path)
            if nofollow
            else os.open(
                check_regular_file(path, f" (expected {what}s, one a line)"),
                os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC,
            )
        )
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist (expected {what}s, one a line)")
    records = []
    with os.fdopen(fd, "rb") as f:
        lines = f.read().split(b"\n")
    for n, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        where = f"{path} line {n}"
        if len(raw) > max_line:
            raise ConfigError(
                f"{where} is {len(raw):,} bytes, more than one {what} may be ({max_line:,})"
            )
        try:
            record = parse_json(raw.decode("utf-8"), where)
        except UnicodeDecodeError as e:
            raise ConfigError(f"{where} is not UTF-8 text (byte {e.start})") from None
        except ValueError:
            if drop_partial_last and n == len(lines):
                break
            raise
        if not isinstance(record, dict):
            raise ConfigError(f"{where} is a JSON {type(record).__name__}, not a {what}")
        if check is not None:
            check(record, where)
        records.append((n, record))
    return records


def check_text(
    record: dict, key: str, where: str, optional: bool = False, max_chars: int = MAX_JSONL_LINE
) -> bool:
    """`record[key]` is a string of text (no lone surrogates, which no tokenizer takes); False
    when absent and `optional`."""
    if key not in record and optional:
        return False
    value = record.get(key)
    if not isinstance(value, str):
        raise ConfigError(f'{where}: "{key}" must be a string (got {show(value)})')
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ConfigError(
            f'{where}: "{key}" holds a lone surrogate (\\ud800-\\udfff): not text'
        ) from None
    if len(value) > max_chars:
        raise ConfigError(f'{where}: "{key}" is longer than {max_chars:,} characters')
    return True
