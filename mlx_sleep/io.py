"""Files written so that a crash never leaves half of them: temporary file, fsync, rename."""

import contextlib
import json
import os
import shutil
import tempfile

import mlx.core as mx


def _fsync_dir(path):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path, mode=0o644):
    """Yield a temporary path next to `path`; on success it replaces `path` in one rename."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    suffix = os.path.splitext(path)[1]  # mx.save_safetensors insists on the extension
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=suffix, dir=directory)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
        _fsync_dir(directory)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def write_json(path, obj, mode=0o644):
    with atomic_path(path, mode) as tmp:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
            f.write("\n")


def read_json(path):
    with open(path) as f:
        return json.load(f)


def save_arrays(path, arrays: dict, metadata: dict = None, mode=0o644):
    with atomic_path(path, mode) as tmp:
        mx.save_safetensors(tmp, arrays, metadata=metadata or {})


@contextlib.contextmanager
def atomic_dir(path):
    """Build a directory under a temporary name; on success swap it in for `path`.

    If the process dies mid-way, `path` is either the old complete directory or the new one
    (a leftover `path.old` is the previous complete copy, used by `recover_dir`)."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-" + os.path.basename(path) + "-", dir=parent)
    try:
        yield tmp
        _fsync_dir(tmp)
        old = path + ".old"
        if os.path.exists(path):
            if os.path.exists(old):
                shutil.rmtree(old)
            os.replace(path, old)
        os.replace(tmp, path)
        _fsync_dir(parent)
        if os.path.exists(old):
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def recover_dir(path):
    """After a crash between the two renames of `atomic_dir`, bring back the previous copy."""
    old = path + ".old"
    if not os.path.exists(path) and os.path.exists(old):
        os.replace(old, path)
    return path
