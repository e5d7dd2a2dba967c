"""Property-style fuzz (hypothesis) of what users hand the tools: run config files, Hugging Face
config files, safetensors headers, every command's flags (train, eval, convert, generate, chat,
finetune, data) with odd places to write, and the session store (edited session.json, cut state
files, symlinks) under every command that reads it. Every generated input must end with
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

from tests.reliability import (
    TINY_TRAIN,
    assert_one_clear_line,
    cli,
    make_hf_checkpoint,
    snapshot,
    train_tiny_run,
)

FAST, SLOW = 12, 250  # examples per property: default suite, -m slow
TIME_LIMIT = 60  # seconds one input may take (tiny models: a hang shows up as this)
COUNTS = {}  # property -> [generated, refused]


def fuzz_settings(n):
    # FUZZ_RANDOM=1: fresh random inputs each run (the default is a fixed, reproducible sample)
    return settings(
        max_examples=n,
        deadline=None,
        derandomize="FUZZ_RANDOM" not in os.environ,
        database=None,
        suppress_health_check=list(HealthCheck),
    )


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


def check(name, root, args, must_fail=False, input=None, may_change=False):
    """Run the CLI; the properties every input must keep. `may_change`: a command that
    rewrites what it reads (a chat saves its session) may change files when it succeeds; a
    refusal never does."""
    before = snapshot(root)
    with time_limit(args):
        code, output = cli(*args, input=input)
    counts = COUNTS.setdefault(name, [0, 0])
    counts[0] += 1
    if (code != 0 or must_fail) and (
        args[:2] in (["sessions", "list"], ["consolidate", "--all"])
        or args[0] in ("train", "finetune")
        and code == 1
    ):
        # commands over many sessions report each, and a training that fails mid-run (a loss
        # that became nan) reports its steps: then one error line ends the output
        assert code == 1 and "Traceback" not in output, output
        assert [l for l in output.splitlines() if l.startswith("Error:")] == [
            output.strip().splitlines()[-1]
        ], output
        counts[1] += 1
    elif code != 0 or must_fail:
        assert_one_clear_line(code, output)
        counts[1] += 1
    else:
        assert "Traceback" not in output, output
    if code != 0 or not may_change:
        after = snapshot(root)
        assert {k: v for k, v in after.items() if k in before} == before, args
    return code


@contextlib.contextmanager
def session_home(home):
    """MLX_SLEEP_HOME for the commands run in this process."""
    previous = os.environ.get("MLX_SLEEP_HOME")
    os.environ["MLX_SLEEP_HOME"] = home
    try:
        yield
    finally:
        if previous is None:
            del os.environ["MLX_SLEEP_HOME"]
        else:
            os.environ["MLX_SLEEP_HOME"] = previous


# -- values a careless or hostile user might write ---------------------------------------------

ODD_NUMBERS = st.sampled_from(
    [
        0,
        -1,
        1,
        2,
        -(2**31),
        2**31,
        2**63,
        10**20,
        1e20,
        -1e-9,
        0.5,
        1.5,
        math.inf,
        -math.inf,
        math.nan,
        1e308,
        True,
        False,
    ]
)
JSON_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**64), 2**64),
    ODD_NUMBERS,
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)


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
    check(
        "run config.json",
        root,
        ["eval", "--checkpoint", out, "--samples", "2", "--batch-size", "2"],
    )


def hf_config_property(tmp_path, data):
    """A Hugging Face config.json, mutated, converted."""
    root = fresh(tmp_path)
    src = make_hf_checkpoint(os.path.join(root, "src"))
    config = json.load(open(os.path.join(src, "config.json")))
    write_config(os.path.join(src, "config.json"), mutate(config, data.draw), data.draw)
    check("hf config.json", root, ["convert", "--hf-path", src, "--out", os.path.join(root, "out")])


def safetensors_property(tmp_path, run, data):
    """A run's model.safetensors with a mutated header (or length prefix, or data size)."""
    root = fresh(tmp_path)
    out = shutil.copytree(run, os.path.join(root, "run"))
    path = os.path.join(out, "checkpoint", "model.safetensors")
    raw = open(path, "rb").read()
    (n,) = struct.unpack("<Q", raw[:8])
    header, body = json.loads(raw[8 : 8 + n]), raw[8 + n :]
    how = data.draw(st.sampled_from(["entry", "entry", "header", "prefix", "body", "bytes"]))
    if how == "entry":
        name = data.draw(st.sampled_from(sorted(k for k in header if k != "__metadata__")))
        field = data.draw(st.sampled_from(["dtype", "shape", "data_offsets", None]))
        if field is None:
            header[name] = data.draw(JSON_VALUES)
        else:
            header[name][field] = data.draw(
                st.one_of(
                    JSON_VALUES,
                    st.lists(st.integers(-(2**40), 2**40), max_size=4),
                    st.sampled_from(["F32", "F64", "I8", "BOOL", "F8", "f32"]),
                )
            )
    elif how == "header":
        header = data.draw(JSON_VALUES)
    blob = json.dumps(header).encode()
    prefix = struct.pack("<Q", len(blob))
    if how == "prefix":
        prefix = struct.pack(
            "<Q",
            data.draw(
                st.sampled_from([0, 1, len(blob) - 1, len(blob) + 1, 2**63, 2**64 - 1, len(raw)])
            ),
        )
    if how == "body":
        body = body[: data.draw(st.integers(0, max(0, len(body) - 1)))]
    content = prefix + blob + body
    if how == "bytes":
        content = data.draw(st.binary(max_size=96))
    open(path, "wb").write(content)
    check(
        "safetensors header",
        root,
        ["eval", "--checkpoint", out, "--samples", "2", "--batch-size", "2"],
    )


BAD_SIZES = st.sampled_from(
    [
        "0",
        "-1",
        "-5",
        "1.5",
        "1e20",
        "10000000000",
        "2147483648",
        "abc",
        "",
        "nan",
        " 3",
        "0x10",
        "1000000001",
    ]
)
ANY_NUMBER = st.one_of(
    BAD_SIZES,
    st.sampled_from(["1", "2", "3", "0.01", "1e-3", "inf", "-inf", "1e308", "-0.0", "5e-324"]),
)
TRAIN_FLAGS = {  # flag -> values (sizes that would train for long only from the bad pool)
    "--steps": BAD_SIZES,
    "--batch-size": BAD_SIZES,
    "--eval-samples": BAD_SIZES,
    "--hidden-size": BAD_SIZES,
    "--heads": st.one_of(BAD_SIZES, st.sampled_from(["1", "3"])),
    "--loops": st.one_of(BAD_SIZES, st.sampled_from(["1", "2", "257", "1000000"])),
    "--window": ANY_NUMBER,
    "--lr": ANY_NUMBER,
    "--adam-lr": ANY_NUMBER,
    "--weight-decay": ANY_NUMBER,
    "--warmup": ANY_NUMBER,
    "--grad-clip": ANY_NUMBER,
    "--seed": ANY_NUMBER,
    "--eval-every": ANY_NUMBER,
    "--checkpoint-every": ANY_NUMBER,
    "--kv-heads": ANY_NUMBER,
    "--core": st.sampled_from(["0:1", "1:0", "0:9", "a:b", "-1:2", ":", "0:1:2", ""]),
    "--layers": st.sampled_from(
        ["", ",", "attn", "gdn,swa", "lstm", "attn," * 5000 + "gdn", "jet,jet"]
    ),
    "--eviction": st.sampled_from(["hard", "sliding", "soft", ""]),
    "-o": st.sampled_from(
        [
            "n_bits=1",
            "n_bits=100000",
            "steps=1000000000",
            "eval_steps=5",
            "eval_steps=[]",
            "eval_steps=[1,-1]",
            "name=depo",
            "boundary=x",
            "steps_range=[3,1]",
            "steps_range=7",
            "x",
            "=",
            "n_strings=1.5",
            "n_strings=null",
            'n_bits="8"',
            "steps=[1]",
        ]
    ),
}


def train_flags_property(tmp_path, data):
    root = fresh(tmp_path)
    open(os.path.join(root, "notes.txt"), "w").write("the user's")
    flags = data.draw(
        st.lists(st.sampled_from(sorted(TRAIN_FLAGS)), min_size=1, max_size=3, unique=True)
    )
    args = [a for f in flags for a in (f, data.draw(TRAIN_FLAGS[f]))]
    check("train flags", root, ["train", *TINY_TRAIN, "--out", os.path.join(root, "run"), *args])


CONVERT_FLAGS = {
    "--q-bits": ANY_NUMBER,
    "--q-group-size": ANY_NUMBER,
    "--loops": ANY_NUMBER,
    "--window": ANY_NUMBER,
    "--core": TRAIN_FLAGS["--core"],
    "--insert-jet-layers": ANY_NUMBER,
    "--dtype": st.sampled_from(["float8", ""]),
    "--eviction": TRAIN_FLAGS["--eviction"],
}
EVAL_FLAGS = {
    "--loops": st.one_of(BAD_SIZES, st.sampled_from(["2"])),
    "--window": ANY_NUMBER,
    "--samples": BAD_SIZES,
    "--batch-size": BAD_SIZES,
    "--seed": ANY_NUMBER,
    "--eviction": TRAIN_FLAGS["--eviction"],
    "--json": st.sampled_from(["/dev/null", "{root}", "{root}/notes.txt/x", "{root}/link"]),
    "--plot": st.sampled_from(["/dev/zero", "{root}", "{root}/link"]),
}


def convert_and_eval_flags_property(tmp_path, run, data):
    root = fresh(tmp_path)
    open(os.path.join(root, "notes.txt"), "w").write("the user's")
    os.symlink(os.path.join(root, "notes.txt"), os.path.join(root, "link"))
    if data.draw(st.booleans()):
        src = make_hf_checkpoint(os.path.join(root, "src"))
        table, base = (
            CONVERT_FLAGS,
            [
                "convert",
                "--hf-path",
                src,
                "--out",
                data.draw(st.sampled_from([os.path.join(root, "out"), root, src, "."])),
            ],
        )
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


# -- generation, chat, fine-tuning, data and the session store ---------------------------------

ANY_FLOAT = st.one_of(ANY_NUMBER, st.sampled_from(["0.5", "1", "2", "-0.5", "0.999"]))
GEN_FLAGS = {  # the sampling flags generate and chat share, and chat's own
    # (a valid huge -m is a long reply by request, not a hang: only invalid or small ones)
    "-m": st.sampled_from(["0", "-1", "1.5", "1e20", "abc", "", "nan", "0x10", "1", "3"]),
    "--temp": ANY_FLOAT,
    "--top-p": ANY_FLOAT,
    "--top-k": ANY_NUMBER,
    "--min-p": ANY_FLOAT,
    "--repetition-penalty": ANY_FLOAT,
    "--seed": ANY_NUMBER,
    "--window": st.one_of(BAD_SIZES, st.sampled_from(["4", "16"])),
    "--loops": st.one_of(BAD_SIZES, st.sampled_from(["1", "2", "2000"])),
    "--eviction": TRAIN_FLAGS["--eviction"],
    "--stop": st.sampled_from(["", "\\n", "\\", "x" * 1000, "\x00"]),
    "--system-prompt": st.sampled_from(["", "x" * 5000, "\udcff"]),
}
CHAT_FLAGS = {
    **GEN_FLAGS,
    "--history": ANY_NUMBER,
    "--idle-delay": ANY_FLOAT,
    "--idle-fill": ANY_FLOAT,
    "-s": st.sampled_from(["../x", "a/b", ".hidden", "", "x" * 300, "ok", "-", "s p"]),
}


def generate_chat_flags_property(tmp_path, model_dir, data):
    root = fresh(tmp_path)
    open(os.path.join(root, "notes.txt"), "w").write("the user's")
    chat = data.draw(st.booleans())
    table = CHAT_FLAGS if chat else GEN_FLAGS
    flags = data.draw(st.lists(st.sampled_from(sorted(table)), min_size=1, max_size=3, unique=True))
    args = [a for f in flags for a in (f, data.draw(table[f]))]
    with session_home(os.path.join(root, "home")):
        if chat:
            check(
                "generate/chat flags",
                root,
                ["chat", "--model", model_dir, "-m", "2", *args],
                input="hello\n/status\n",
                may_change=True,
            )
        else:
            check(
                "generate/chat flags",
                root,
                ["generate", "--model", model_dir, "-p", "hi", "-m", "2", *args],
            )


FINETUNE_FLAGS = {
    "--steps": BAD_SIZES,
    "--batch-size": BAD_SIZES,
    "--grad-accum": BAD_SIZES,
    "--lr": ANY_NUMBER,
    "--weight-decay": ANY_NUMBER,
    "--warmup": ANY_NUMBER,
    "--grad-clip": ANY_NUMBER,
    "--seed": ANY_NUMBER,
    "--rank": st.one_of(BAD_SIZES, st.sampled_from(["1000000000", "4"])),
    "--scale": ANY_FLOAT,
    "--dropout": ANY_FLOAT,
    "--lora-layers": st.one_of(BAD_SIZES, st.sampled_from(["1000"])),
    "--train-only": st.sampled_from(["", ",", "gdn", "lstm", "jet,attn"]),
    "--valid-batches": ANY_NUMBER,
    "--valid-every": ANY_NUMBER,
    "--checkpoint-every": ANY_NUMBER,
    "--log-every": ANY_NUMBER,
    "--loops": st.one_of(BAD_SIZES, st.sampled_from(["2"])),
    "--window": ANY_NUMBER,
    "--core": TRAIN_FLAGS["--core"],
    "--hard-warmup": ANY_NUMBER,
    "--out": st.sampled_from(["{root}", "{model}", "{root}/notes.txt", ".", "{run}"]),
    "--data": st.sampled_from(["{root}/notes.txt", "{root}", "/dev/zero", "{root}/nope"]),
}


def finetune_flags_property(tmp_path, run, model_dir, data):
    """finetune with odd values and odd places to write (a model, a run, a user's folder):
    refused in one line, or (when every value is fine) one step trained into a new directory."""
    root = fresh(tmp_path)
    open(os.path.join(root, "notes.txt"), "w").write("the user's")
    model = shutil.copytree(model_dir, os.path.join(root, "m"))
    with open(os.path.join(root, "ft.jsonl"), "w") as f:
        f.write('{"prompt": "a b", "answer": " c"}\n' * 4)
    flags = data.draw(
        st.lists(st.sampled_from(sorted(FINETUNE_FLAGS)), min_size=1, max_size=3, unique=True)
    )
    args = [
        a
        for f in flags
        for a in (f, data.draw(FINETUNE_FLAGS[f]).format(root=root, model=model, run=run))
    ]
    check(
        "finetune flags",
        root,
        [
            "finetune",
            "--model",
            model,
            "--data",
            os.path.join(root, "ft.jsonl"),
            "--out",
            os.path.join(root, "ft"),
            "--steps",
            "1",
            "--batch-size",
            "2",
            *args,
        ],
    )


DATA_FLAGS = {
    "--ops": st.sampled_from(["", "2", "2-8", "8-2", "2,,4", "a", "0", "-2", "2-8:0", "1" * 400]),
    "--limit": ANY_NUMBER,
    "--skip": ANY_NUMBER,
    "--subset": st.sampled_from(["hard", "x"]),
    "--out": st.sampled_from(
        [
            "{data}",
            "{root}/notes.txt",
            "{model}/config.json",
            "{root}",
            "{root}/link",
            "{root}/new.jsonl",
            "/dev/null",
        ]
    ),
    "--force": None,
}


def data_flags_property(tmp_path, model_dir, data):
    """data gsm-infinite: never over its input, a model's files or a user's file."""
    root = fresh(tmp_path)
    open(os.path.join(root, "notes.txt"), "w").write("the user's")
    os.symlink(os.path.join(root, "notes.txt"), os.path.join(root, "link"))
    model = shutil.copytree(model_dir, os.path.join(root, "m"))
    source = shutil.copy(
        os.path.join(os.path.dirname(__file__), "fixtures", "gsm-infinite", "medium_0.jsonl"),
        os.path.join(root, "g.jsonl"),
    )
    flags = data.draw(
        st.lists(st.sampled_from(sorted(DATA_FLAGS)), min_size=1, max_size=3, unique=True)
    )
    args = []
    for f in flags:
        args.append(f)
        if DATA_FLAGS[f] is not None:
            args.append(data.draw(DATA_FLAGS[f]).format(root=root, model=model, data=source))
    if "--out" not in flags:
        args += ["--out", os.path.join(root, "out.jsonl")]
    check("data flags", root, ["data", "gsm-infinite", "--data", source, *args])


SESSION_COMMANDS = [
    ["sessions", "show", "x"],
    ["sessions", "list"],
    ["sessions", "export", "x", "-o", "{root}/export.json"],
    ["sessions", "rm", "x"],
    ["consolidate", "-s", "x", "--min-fill", "0"],
    ["consolidate", "--all"],
    ["chat", "-s", "x", "-m", "2"],
]


def session_store_property(tmp_path, session, data):
    """A saved session with session.json edited (a field replaced, retyped or deleted), its
    state file cut or replaced, or a symlink at some level, read by every command that reads
    sessions: each refuses in one line leaving every file as it was, or works."""
    root = fresh(tmp_path)
    home = os.path.join(root, "home")
    path = shutil.copytree(session, os.path.join(home, "sessions", "x"))
    os.chmod(home, 0o700)
    os.chmod(os.path.join(home, "sessions"), 0o700)
    meta_path = os.path.join(path, "session.json")
    meta = json.load(open(meta_path))
    how = data.draw(st.sampled_from(["meta"] * 4 + ["state", "link", "store_link", "extra"]))
    if how == "meta":
        write_config(meta_path, mutate(meta, data.draw), data.draw)
    elif how == "state":
        state = os.path.join(path, meta["state_file"])
        raw = open(state, "rb").read()
        open(state, "wb").write(
            data.draw(
                st.one_of(
                    st.binary(max_size=64), st.just(raw[: data.draw(st.integers(0, len(raw) - 1))])
                )
            )
        )
    elif how == "link":  # the session directory is a symlink to one outside the store
        outside = shutil.move(path, os.path.join(root, "outside"))
        os.symlink(outside, path)
    elif how == "store_link":  # the sessions directory itself is a symlink
        store = os.path.join(home, "sessions")
        shutil.move(store, os.path.join(root, "store"))
        os.symlink(os.path.join(root, "store"), store)
    else:
        open(os.path.join(path, data.draw(st.sampled_from(["notes.txt", "lock.bak"]))), "w").write(
            "the user's"
        )
    args = [a.format(root=root) for a in data.draw(st.sampled_from(SESSION_COMMANDS))]
    with session_home(home):
        check("session store", root, args, input="hello\n", may_change=True)


PROPERTIES = {
    "generate_chat_flags": (generate_chat_flags_property, "model"),
    "finetune_flags": (finetune_flags_property, "run+model"),
    "data_flags": (data_flags_property, "model"),
    "session_store": (session_store_property, "session"),
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


@pytest.fixture(scope="module")
def session(tmp_path_factory, model_dir):
    """A saved session of the tiny model: a consolidated window and a live one."""
    import mlx.core as mx

    import mlx_sleep
    from mlx_sleep.session import open_session

    home = str(tmp_path_factory.mktemp("fuzzsessions") / "home")
    with session_home(home):
        model, _ = mlx_sleep.load(model_dir)
        s = open_session("x", model, model_dir, mlx_sleep.SleepConfig(loops=2, window=16))
        s.engine.feed(mx.array([list(range(40, 64))]))
        s.messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
        s.save()
        s.close()
    return os.path.join(home, "sessions", "x")


def _test(name, n):
    prop, needs = PROPERTIES[name]

    @fuzz_settings(n)
    @given(data=st.data())
    def inner(tmp_path, run, model_dir, session, data):
        extra = {
            True: (run,),
            False: (),
            "model": (model_dir,),
            "run+model": (run, model_dir),
            "session": (session,),
        }[needs]
        prop(tmp_path, *extra, data)

    return inner


@pytest.mark.parametrize("name", sorted(PROPERTIES))
def test_fuzz(tmp_path, run, model_dir, session, name, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _test(name, FAST)(tmp_path, run, model_dir, session)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(PROPERTIES))
def test_fuzz_large(tmp_path, run, model_dir, session, name, monkeypatch):
    monkeypatch.chdir(tmp_path)
    COUNTS.clear()
    _test(name, SLOW)(tmp_path, run, model_dir, session)
    generated, refused = next(iter(COUNTS.values()))
    print(f"\nfuzz {name}: {generated} inputs, {refused} refused with one line")
    assert generated >= 200
