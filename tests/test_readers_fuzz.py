"""Fuzz of the readers of data files (hypothesis): GSM-Infinite problems (`--data`), predictions
to re-score (`eval --score`), a run's own predictions (resume) and fine-tuning records. Each
generated file holds a valid record with one or two fields made missing, null, of another type,
out of range, huge, nested or not text, or a line that is not JSON at all. Every file must be read
or refused with one ValueError line naming the file and the line (never another exception, never
a hang), and is never changed.

The default run reads READS files per reader (>= 2,000 in all); FUZZ_RANDOM=1 draws fresh ones."""

import copy
import hashlib
import json
import os
import signal

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mlx_sleep import gsm_infinite as gi
from mlx_sleep.finetune.data import read_records
from mlx_sleep.gsm_infinite.runner import check_prediction, read_predictions, record_key
from mlx_sleep.io import read_jsonl

READS = 520  # per reader: 4 readers
FIX = os.path.join(os.path.dirname(__file__), "fixtures", "gsm-infinite")
MEDIUM = json.loads(open(os.path.join(FIX, "medium_0.jsonl")).readline())
SYMBOLIC = json.loads(open(os.path.join(FIX, "symbolic_0.jsonl")).readline())
PREDICTION = {
    **MEDIUM,
    "output": "2",
    "correct": True,
    "parsed": 2,
    "scorer": "exact",
    "loops": 1,
    "index": 0,
    "key": record_key(MEDIUM),
    "protocol": "paper",
}
FINETUNE = [
    {"prompt": "Question: 1 + 1?", "answer": " 2"},
    {"text": "some text"},
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
]

ODD = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=6),
    st.sampled_from(
        [
            "",
            "\ud800",
            "x" * 300_000,
            2.5,
            1e400,
            -1,
            0,
            [],
            {},
            [1, 2],
            ["V1"],
            [{"a": 1}],
            {"role": "user"},
            "Answer: x.",
            "Answer: 12.",
            "V1",
        ]
    ),
    st.recursive(st.integers(0, 3), lambda inner: st.lists(inner, max_size=2), max_leaves=4),
)
COUNTS = {}


def mutated(record, data) -> str:
    """The record as one JSONL line with one or two fields deleted or replaced (nested ones
    included), or a line that is not a record."""
    how = data.draw(st.sampled_from(["field"] * 8 + ["bomb", "not json", "list", "binary"]))
    if how == "bomb":
        return "[" * data.draw(st.integers(60, 5000)) + "]" * 5
    if how == "not json":
        return json.dumps(record)[: data.draw(st.integers(0, 40))]
    if how == "list":
        return json.dumps(list(record))
    if how == "binary":
        return data.draw(st.binary(min_size=1, max_size=40)).decode("latin-1")
    record = json.loads(json.dumps(record))
    for _ in range(data.draw(st.integers(1, 2))):
        node = record
        while isinstance(node, (dict, list)) and node:
            keys = sorted(node) if isinstance(node, dict) else list(range(len(node)))
            key = data.draw(st.sampled_from(keys))
            if isinstance(node[key], (dict, list)) and node[key] and data.draw(st.booleans()):
                node = node[key]
                continue
            if isinstance(node, dict) and data.draw(st.booleans()):
                del node[key]
            else:
                node[key] = copy.deepcopy(data.draw(ODD))  # never the strategy's own object
            break
    return json.dumps(record, ensure_ascii=data.draw(st.booleans()))


class Hang(BaseException):
    pass


def read_checked(name, path, read):
    """Read; anything but a record list or one ValueError line is a failure. Never changes
    the file, never takes more than 20 s."""
    before = hashlib.sha256(open(path, "rb").read()).hexdigest()

    def expired(signum, frame):
        raise Hang(f"reading {path} took more than 20 s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(20)
    counts = COUNTS.setdefault(name, [0, 0])
    counts[0] += 1
    try:
        read(path)
    except ValueError as e:
        counts[1] += 1
        message = str(e)
        assert "\n" not in message and str(path) in message, message
        assert any(s in message for s in (" line ", "holds no records")), message
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert hashlib.sha256(open(path, "rb").read()).hexdigest() == before


READERS = {
    "problems": (lambda d: d.draw(st.sampled_from([MEDIUM, SYMBOLIC])), gi.read_problems),
    "predictions to re-score": (
        lambda d: PREDICTION,
        lambda p: read_jsonl(p, check_prediction, "prediction"),
    ),
    "a run's predictions": (lambda d: PREDICTION, read_predictions),
    "fine-tuning records": (lambda d: d.draw(st.sampled_from(FINETUNE)), read_records),
}


@pytest.mark.parametrize("name", sorted(READERS))
def test_readers_refuse_bad_records_in_one_line(tmp_path, name):
    make, read = READERS[name]

    @settings(
        max_examples=READS,
        deadline=None,
        database=None,
        derandomize="FUZZ_RANDOM" not in os.environ,
        suppress_health_check=list(HealthCheck),
    )
    @given(data=st.data())
    def one(data):
        record = make(data)
        lines = [json.dumps(record)] * data.draw(st.integers(0, 2))
        lines.insert(data.draw(st.integers(0, len(lines))), mutated(record, data))
        path = tmp_path / "records.jsonl"
        path.write_bytes(("\n".join(lines) + "\n").encode("utf-8", "surrogatepass"))
        read_checked(name, path, read)

    one()
    generated, refused = COUNTS[name]
    assert generated >= READS and 0 < refused < generated, COUNTS[name]
