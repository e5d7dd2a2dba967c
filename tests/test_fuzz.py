"""Property-style fuzz (hypothesis) of what users hand the tools: run config files, Hugging Face
config files, safetensors headers and command-line flags. Every generated input must end with
exit status 0 or one clear error line (no traceback), within its time limit, and leave every
file that existed before byte-for-byte the same.

The default suite runs a small, fixed (derandomized) sample of each property; `-m slow` runs the
same properties on >= 1,000 generated inputs in all and prints the counts."""

import contextlib
import json
import math
import os
import shutil
import signal
import struct
import tempfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.reliability import (TINY_TRAIN, assert_one_clear_line, cli, make_hf_checkpoint, snapshot,
                               train_tiny_run)

FAST, SLOW = 12, 250  # examples per property: default suite, -m slow
TIME_LIMIT = 60  # seconds one input may take (tiny models: a hang shows up as this)
COUNTS = {}  # property -> [generated, refused]


def fuzz_settings(n):
    # FUZZ_RANDOM=1: fresh random inputs each run (the default is a fixed, reproducible sample)
    return settings(max_examples=n, deadline=None, derandomize="FUZZ_RANDOM" not in os.environ,
                    database=None,
                    suppress_health_check=list(HealthCheck))


class Hang(BaseException):
    """Not an Exception: nothing in the tool may catch it and call it a clean error."""


@contextlib.contextmanager
def time_limit(what):
    """Fail (instead of hanging the suite) when one input runs past TIME_LIMIT."""
    def expired(signum, frame):
        raise Hang(f"still running after {TIME_LIMIT} s: {what}")
    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(TIME_LIMIT)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def check(name, root, args, must_fail=False):
    """Run the CLI; the properties every input must keep."""
    before = snapshot(root)
    with time_limit(args):
        code, output = cli(*args)
    counts = COUNTS.setdefault(name, [0, 0])
    counts[0] += 1
    if code != 0 or must_fail:
        assert_one_clear_line(code, output)
        counts[1] += 1
    else:
        assert "Traceback" not in output
    after = snapshot(root)
    assert {k: v for k, v in after.items() if k in before} == before, args
    return code


# -- values a careless or hostile user might write ---------------------------------------------

ODD_NUMBERS = st.sampled_from([0, -1, 1, 2, -(2**31), 2**31, 2**63, 10**20, 1e20, -1e-9, 0.5,
                               1.5, math.inf, -math.inf, math.nan, 1e308, True, False])
JSON_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-(2**64), 2**64), ODD_NUMBERS,
                         st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8))
JSON_VALUES = st.recursive(JSON_SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)),
    max_leaves=6)


def mutate(config: dict, draw) -> dict:
    """Replace, delete or retype one or two settings (nested objects included)."""
    config = json.loads(json.dumps(config))
    for _ in range(draw(st.integers(1, 2))):
        node = config
        while True:
            keys = sorted(node) if isinstance(node, dict) else []
            if not keys:
                break
            key = draw(st.sampled_from(keys))
            if isinstance(node[key], dict) and draw(st.booleans()):
                node = node[key]
                continue
            action = draw(st.sampled_from(["replace", "replace", "delete"]))
            if action == "delete":
                del node[key]
            else:
                node[key] = draw(JSON_VALUES)
            break
    return config


def write_config(path, config, draw):
    """The config as JSON, or (sometimes) as bytes that are not quite JSON."""
    text = json.dumps(config)
    how = draw(st.sampled_from(["json"] * 6 + ["cut", "bytes", "scalar"]))
    if how == "cut":
        text = text[: draw(st.integers(0, len(text) - 1))]
    elif how == "scalar":
        text = json.dumps(draw(JSON_SCALARS))
    if how == "bytes":
        open(path, "wb").write(draw(st.binary(max_size=64)))
    else:
        open(path, "w").write(text)


# -- fixtures ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return train_tiny_run(tmp_path_factory, "fuzzrun")


def fresh(tmp_path):
    return tempfile.mkdtemp(dir=tmp_path)


# -- the properties ---------------------------------------------------------------------------

def run_config_property(tmp_path, run, data):
    """A run's config.json, mutated, read by `eval`."""
    root = fresh(tmp_path)
    out = shutil.copytree(run, os.path.join(root, "run"))
    config = json.load(open(os.path.join(run, "config.json")))
    write_config(os.path.join(out, "config.json"), mutate(config, data.draw), data.draw)
    check("run config.json", root, ["eval", "--checkpoint", out, "--samples", "2",
                                    "--batch-size", "2"])


def hf_config_property(tmp_path, data):
    """A Hugging Face config.json, mutated, converted."""
    root = fresh(tmp_path)
    src = make_hf_checkpoint(os.path.join(root, "src"))
    config = json.load(open(os.path.join(src, "config.json")))
    write_config(os.path.join(src, "config.json"), mutate(config, data.draw), data.draw)
    check("hf config.json", root, ["convert", "--hf-path", src, "--out",
                                   os.path.join(root, "out")])


def safetensors_property(tmp_path, run, data):
    """A run's model.safetensors with a mutated header (or length prefix, or data size)."""
    root = fresh(tmp_path)
    out = shutil.copytree(run, os.path.join(root, "run"))
    path = os.path.join(out, "checkpoint", "model.safetensors")
    raw = open(path, "rb").read()
    (n,) = struct.unpack("<Q", raw[:8])
    header, body = json.loads(raw[8:8 + n]), raw[8 + n:]
    how = data.draw(st.sampled_from(["entry", "entry", "header", "prefix", "body", "bytes"]))
    if how == "entry":
        name = data.draw(st.sampled_from(sorted(k for k in header if k != "__metadata__")))
        field = data.draw(st.sampled_from(["dtype", "shape", "data_offsets", None]))
        if field is None:
            header[name] = data.draw(JSON_VALUES)
        else:
            header[name][field] = data.draw(st.one_of(
                JSON_VALUES, st.lists(st.integers(-(2**40), 2**40), max_size=4),
                st.sampled_from(["F32", "F64", "I8", "BOOL", "F8", "f32"])))
    elif how == "header":
        header = data.draw(JSON_VALUES)
    blob = json.dumps(header).encode()
    prefix = struct.pack("<Q", len(blob))
    if how == "prefix":
        prefix = struct.pack("<Q", data.draw(st.sampled_from(
            [0, 1, len(blob) - 1, len(blob) + 1, 2**63, 2**64 - 1, len(raw)])))
    if how == "body":
        body = body[: data.draw(st.integers(0, max(0, len(body) - 1)))]
    content = prefix + blob + body
    if how == "bytes":
        content = data.draw(st.binary(max_size=96))
    open(path, "wb").write(content)
    check("safetensors header", root, ["eval", "--checkpoint", out, "--samples", "2",
                                       "--batch-size", "2"])


BAD_SIZES = st.sampled_from(["0", "-1", "-5", "1.5", "1e20", "10000000000", "2147483648",
                             "abc", "", "nan", " 3", "0x10", "1000000001"])
ANY_NUMBER = st.one_of(BAD_SIZES, st.sampled_from(["1", "2", "3", "0.01", "1e-3", "inf", "-inf",
                                                   "1e308", "-0.0", "5e-324"]))
TRAIN_FLAGS = {  # flag -> values (sizes that would train for long only from the bad pool)
    "--steps": BAD_SIZES, "--batch-size": BAD_SIZES, "--eval-samples": BAD_SIZES,
    "--hidden-size": BAD_SIZES, "--heads": st.one_of(BAD_SIZES, st.sampled_from(["1", "3"])),
    "--loops": st.one_of(BAD_SIZES, st.sampled_from(["1", "2", "257", "1000000"])),
    "--window": ANY_NUMBER, "--lr": ANY_NUMBER, "--adam-lr": ANY_NUMBER,
    "--weight-decay": ANY_NUMBER, "--warmup": ANY_NUMBER, "--grad-clip": ANY_NUMBER,
    "--seed": ANY_NUMBER, "--eval-every": ANY_NUMBER, "--checkpoint-every": ANY_NUMBER,
    "--kv-heads": ANY_NUMBER, "--core": st.sampled_from(["0:1", "1:0", "0:9", "a:b", "-1:2", ":",
                                                         "0:1:2", ""]),
    "--layers": st.sampled_from(["", ",", "attn", "gdn,swa", "lstm", "attn," * 5000 + "gdn",
                                 "jet,jet"]),
    "--eviction": st.sampled_from(["hard", "sliding", "soft", ""]),
    "-o": st.sampled_from(["n_bits=1", "n_bits=100000", "steps=1000000000", "eval_steps=5",
                           "eval_steps=[]", "eval_steps=[1,-1]", "name=depo", "boundary=x",
                           "steps_range=[3,1]", "steps_range=7", "x", "=", "n_strings=1.5",
                           "n_strings=null", 'n_bits="8"', "steps=[1]"]),
}


def train_flags_property(tmp_path, data):
    root = fresh(tmp_path)
    open(os.path.join(root, "notes.txt"), "w").write("the user's")
    flags = data.draw(st.lists(st.sampled_from(sorted(TRAIN_FLAGS)), min_size=1, max_size=3,
                               unique=True))
    args = [a for f in flags for a in (f, data.draw(TRAIN_FLAGS[f]))]
    check("train flags", root, ["train", *TINY_TRAIN, "--out", os.path.join(root, "run"), *args])


CONVERT_FLAGS = {"--q-bits": ANY_NUMBER, "--q-group-size": ANY_NUMBER, "--loops": ANY_NUMBER,
                 "--window": ANY_NUMBER, "--core": TRAIN_FLAGS["--core"],
                 "--insert-jet-layers": ANY_NUMBER, "--dtype": st.sampled_from(["float8", ""]),
                 "--eviction": TRAIN_FLAGS["--eviction"]}
EVAL_FLAGS = {"--loops": st.one_of(BAD_SIZES, st.sampled_from(["2"])), "--window": ANY_NUMBER,
              "--samples": BAD_SIZES, "--batch-size": BAD_SIZES, "--seed": ANY_NUMBER,
              "--eviction": TRAIN_FLAGS["--eviction"],
              "--json": st.sampled_from(["/dev/null", "{root}", "{root}/notes.txt/x", "{root}/link"]),
              "--plot": st.sampled_from(["/dev/zero", "{root}", "{root}/link"])}


def convert_and_eval_flags_property(tmp_path, run, data):
    root = fresh(tmp_path)
    open(os.path.join(root, "notes.txt"), "w").write("the user's")
    os.symlink(os.path.join(root, "notes.txt"), os.path.join(root, "link"))
    if data.draw(st.booleans()):
        src = make_hf_checkpoint(os.path.join(root, "src"))
        table, base = CONVERT_FLAGS, ["convert", "--hf-path", src, "--out",
                                      data.draw(st.sampled_from([os.path.join(root, "out"), root,
                                                                 src, "."]))]
        if data.draw(st.booleans()):
            base.append("--force")
    else:
        table, base = EVAL_FLAGS, ["eval", "--checkpoint", run, "--samples", "2"]
    flags = data.draw(st.lists(st.sampled_from(sorted(table)), min_size=1, max_size=3, unique=True))
    args = [a for f in flags for a in (f, data.draw(table[f]).replace("{root}", root))]
    check("convert/eval flags", root, [*base, *args])


def trainer_json_property(tmp_path, run, data):
    """A run's checkpoint/trainer.json, mutated, resumed by `train`."""
    root = fresh(tmp_path)
    out = shutil.copytree(run, os.path.join(root, "run"))
    path = os.path.join(out, "checkpoint", "trainer.json")
    write_config(path, mutate(json.load(open(path)), data.draw), data.draw)
    before = snapshot(os.path.join(out, "checkpoint"))
    if check("trainer.json", root, ["train", *TINY_TRAIN, "--out", out]) != 0:
        assert snapshot(os.path.join(out, "checkpoint")) == before  # refused: untouched


def model_config_property(tmp_path, model_dir, data):
    """A converted model's config.json, mutated, opened with mlx_sleep.load: a one-line
    ValueError / OSError or a model, never anything else; the directory unchanged."""
    import mlx_sleep

    root = fresh(tmp_path)
    path = shutil.copytree(model_dir, os.path.join(root, "m"))
    config = json.load(open(os.path.join(path, "config.json")))
    write_config(os.path.join(path, "config.json"), mutate(config, data.draw), data.draw)
    before = snapshot(root)
    counts = COUNTS.setdefault("model config.json", [0, 0])
    counts[0] += 1
    try:
        with time_limit(path):
            mlx_sleep.load(path)
    except (ValueError, OSError) as e:
        counts[1] += 1
        assert "\n" not in str(e) and len(str(e)) > 10, repr(e)
    assert snapshot(root) == before


PROPERTIES = {
    "run_config": (run_config_property, True),
    "hf_config": (hf_config_property, False),
    "safetensors": (safetensors_property, True),
    "train_flags": (train_flags_property, False),
    "convert_eval_flags": (convert_and_eval_flags_property, True),
    "trainer_json": (trainer_json_property, True),
    "model_config": (model_config_property, "model"),
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from tests.tiny_models import make_model_dir
    return make_model_dir(tmp_path_factory.mktemp("fuzzmodel") / "m", "hybrid")


def _test(name, n):
    prop, needs = PROPERTIES[name]

    @fuzz_settings(n)
    @given(data=st.data())
    def inner(tmp_path, run, model_dir, data):
        extra = {True: (run,), False: (), "model": (model_dir,)}[needs]
        prop(tmp_path, *extra, data)
    return inner


@pytest.mark.parametrize("name", sorted(PROPERTIES))
def test_fuzz(tmp_path, run, model_dir, name, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _test(name, FAST)(tmp_path, run, model_dir)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(PROPERTIES))
def test_fuzz_large(tmp_path, run, model_dir, name, monkeypatch):
    monkeypatch.chdir(tmp_path)
    COUNTS.clear()
    _test(name, SLOW)(tmp_path, run, model_dir)
    generated, refused = next(iter(COUNTS.values()))
    print(f"\nfuzz {name}: {generated} inputs, {refused} refused with one line")
    assert generated >= 200
