"""GSM-Infinite records: the Hub or a local JSONL in the dataset's schema, the official
selection, op lists, the paper-format prompt, and the fine-tuning file (`mlx-sleep data`)."""

import json
import math
import re
from typing import Dict, Iterable, List, Optional, Sequence

from ..config import check_int, show
from ..io import WRITTEN_BY, atomic_path, check_output_file, check_text
from ..io import read_jsonl
from .scoring import gold_answer

SUBSETS = ("symbolic", "medium", "hard")
LENGTHS = ("0", "8k", "16k", "32k")
# Upstream's selection of medium / hard rows per split (config.sh filter_config): of the first
# `limit` rows, these fractions per (template, mode), rows taken in split order.
OFFICIAL_FILTER = {"crazy_zootopia": 0.4, "movie_festival_awards": 0.05, "teachers_in_school": 0.05}
OFFICIAL_LIMIT = {"symbolic": 100, "medium": 200, "hard": 200}

ANSWER_CUE = "Answer:"


MAX_OP = 10_000  # upstream's ops go to 40; a bigger one is not a record
RECORD = "GSM-Infinite record"


def check_record(record: dict, where: str):
    """One GSM-Infinite record as the dataset has it: problem, question (text), op (an
    integer), solution (text with "Answer: N") or answer_list (symbolic: a list of variable
    names); the optional fields of their types. Raises a one-line ValueError naming the field."""
    check_text(record, "problem", where)
    check_text(record, "question", where)
    check_int(f'{where}: "op"', record.get("op"), 1, MAX_OP)
    for key in ("id", "d", "n", "answer_q"):
        if key in record:
            check_int(f'{where}: "{key}"', record[key], 0, 2**53)
    for key in ("template", "mode"):
        check_text(record, key, where, optional=True)
    if not isinstance(record.get("length", ""), (str, int)) or isinstance(
        record.get("length"), bool
    ):
        raise ValueError(
            f'{where}: "length" must be a string or an integer (got {show(record["length"])})'
        )  # "8k" in medium / hard, 0 in symbolic
    if "answer_list" in record:
        names = record["answer_list"]
        if not (
            isinstance(names, list)
            and names
            and len(names) <= 10_000
            and all(isinstance(n, str) and 0 < len(n) <= 100 for n in names)
        ):
            raise ValueError(
                f'{where}: "answer_list" must be a non-empty list of variable '
                f"names (strings; got {show(names)})"
            )
        check_int(f'{where}: "answer_q"', record.get("answer_q"), 0, 2**53)  # the judge asks it
    elif check_text(record, "solution", where, optional=True):
        try:
            gold_answer(record)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
    else:
        raise ValueError(
            f'{where}: has neither "solution" nor "answer_list": nothing to score an answer against'
        )
    if "messages" in record:
        msgs = record["messages"]
        if not (isinstance(msgs, list) and all(isinstance(m, dict) for m in msgs)):
            raise ValueError(f'{where}: "messages" must be a list of objects')
        for i, m in enumerate(msgs):
            check_text(m, "role", f"{where} message {i}")
            check_text(m, "content", f"{where} message {i}")


def read_problems(path: str) -> List[dict]:
    """The records of a JSONL file in the dataset's schema, each checked (check_record)."""
    return [r for _, r in read_jsonl(path, check_record, RECORD)]


def select(
    records: Sequence[dict], ops: Optional[Sequence[int]] = None, limit: Optional[int] = None
) -> Dict[int, List[dict]]:
    """{op: the first `limit` records with that op}, ops in increasing order."""
    by_op: Dict[int, List[dict]] = {}
    for r in records:
        op = int(r["op"])
        if ops is None or op in ops:
            by_op.setdefault(op, []).append(r)
    if ops is not None:
        absent = sorted(set(ops) - set(by_op))
        if absent:
            have = ", ".join(str(o) for o in sorted({int(r["op"]) for r in records})) or "none"
            raise ValueError(
                f"no records with op {', '.join(map(str, absent))} (ops present: {have})"
            )
    return {op: by_op[op][:limit] for op in sorted(by_op)}


def official_filter(split: Sequence[dict], limit: int) -> List[dict]:
    """Upstream's row selection of a medium / hard split: total = min(limit, len(split)); for
    each (template, mode) the first int(total * fraction) rows with it."""
    total = min(limit, len(split))
    out = []
    for mode in ("normalforward", "forwardreverse"):
        for template, fraction in OFFICIAL_FILTER.items():
            rows = [r for r in split if r.get("template") == template and r.get("mode") == mode]
            out += rows[: int(total * fraction)]
    return out


def hub_records(subset: str, length: str, ops: Sequence[int]) -> List[dict]:
    """The rows of InfiniAILab/gsm_infinite_{subset}_{length}, splits ops_{N}, downloaded with
    huggingface_hub (parquet, read with pyarrow). Users' machines only; tests use local files."""
    if subset not in SUBSETS or length not in LENGTHS:
        raise ValueError(
            f"subset must be one of {', '.join(SUBSETS)} and length one of "
            f"{', '.join(LENGTHS)} (got {subset}, {length})"
        )
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError(
            "reading the Hub's parquet files needs pyarrow: pip install pyarrow "
            "or 'mlx-sleep[gsm-infinite]' (or pass --data FILE.jsonl)"
        ) from None
    from huggingface_hub import HfApi, hf_hub_download

    repo = f"InfiniAILab/gsm_infinite_{subset}_{length}"
    try:
        files = HfApi().list_repo_files(repo, repo_type="dataset")
        records = []
        for op in ops:
            names = split_files(files, op)
            if not names:
                raise ValueError(f"{repo} has no split ops_{op}")
            for name in names:
                path = hf_hub_download(repo, name, repo_type="dataset")
                rows = pq.read_table(path).to_pylist()
                for i, row in enumerate(rows):  # the Hub's files are checked as local ones are
                    check_record(row, f"{repo} {name} row {i}")
                records += rows
    except ValueError:
        raise
    except Exception as e:  # network, auth, missing repo: one line either way
        raise ValueError(
            f"could not read {repo} from the Hugging Face Hub: {type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}"
        ) from None
    return records


def split_files(files: Iterable[str], op: int) -> List[str]:
    """The parquet shards of split ops_{op} in a dataset repository's file list."""
    pattern = re.compile(rf"(^|/)ops_{op}(-\d+-of-\d+)?\.parquet$")
    return sorted(f for f in files if pattern.search(f))


def load_records(
    subset: str,
    length: str,
    ops: Sequence[int],
    limit: Optional[int] = None,
    data: Optional[str] = None,
    official: bool = False,
) -> Dict[int, List[dict]]:
    """{op: records}: from `data` (a local JSONL, taken in file order) or the Hub, where the
    official protocol selects rows as upstream does (see `official_filter`)."""
    if data is not None:
        return select(read_problems(data), ops, limit)
    by_op = select(hub_records(subset, length, ops), ops)
    if official and subset != "symbolic":
        picked = {
            op: official_filter(rows, limit or OFFICIAL_LIMIT[subset]) for op, rows in by_op.items()
        }
        empty = [op for op, rows in picked.items() if not rows]
        if empty:  # upstream takes whole shares of the limit per template, the smallest 5 %
            raise ValueError(
                f"the official protocol selects no problem for op {', '.join(map(str, empty))} "
                f"with --limit {limit}: it takes a share of the limit per template (5 % for two "
                f"of them), so pass --limit {math.ceil(1 / min(OFFICIAL_FILTER.values()))} or more"
            )
        return picked
    return {op: rows[: limit or OFFICIAL_LIMIT[subset]] for op, rows in by_op.items()}


def parse_ops(text: str) -> List[int]:
    """ "2,4,6,8", "2-8" or "2-8:2" (a range, inclusive, with a step) -> sorted op counts."""
    ops = set()
    try:
        for part in text.split(","):
            part = part.strip()
            if "-" in part:
                span, _, step = part.partition(":")
                a, b = (int(x) for x in span.split("-"))
                ops.update(range(a, b + 1, int(step or 1)))
            else:
                ops.add(int(part))
    except ValueError:
        raise ValueError(
            f"--ops {text!r}: expected op counts like 2,4,6,8 or a range 2-8 "
            "(2-8:2 for every second)"
        ) from None
    if not ops or min(ops) < 1:
        raise ValueError(f"--ops {text!r}: op counts are integers >= 1")
    return sorted(ops)


def paper_example(record: dict) -> dict:
    """The paper-protocol example of a record: {"prompt": question, then the context;
    "answer": the cue and the answer alone}. Evaluation and fine-tuning data both use it."""
    gold = gold_answer(record)
    answer = ", ".join(gold) if isinstance(gold, list) else str(gold)
    return {
        "prompt": f"Question: {record['question'].strip()}\n\n"
        f"Context: {record['problem'].strip()}\n",
        "answer": f"{ANSWER_CUE} {answer}",
    }


def messages(record: dict) -> List[dict]:
    """The record's chat, as the official run sends it."""
    m = record.get("messages")
    if isinstance(m, str):  # some exports store it as a JSON string
        m = json.loads(m)
    if not isinstance(m, list) or not m:
        raise ValueError(
            f"record (op {record.get('op')}, id {record.get('id')}) has no "
            "`messages`; the official protocol needs them (or use --protocol paper)"
        )
    return m


def write_training_file(path: str, by_op: Dict[int, List[dict]]) -> int:
    """The paper-format fine-tuning file: one {"prompt", "answer", "op"} a line; returns rows."""
    rows = [{**paper_example(r), "op": op} for op, rs in by_op.items() for r in rs]
    if rows:  # the first record carries the mark io.written_by looks for
        rows[0] = {**rows[0], "written_by": f"{WRITTEN_BY} data gsm-infinite"}
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    return len(rows)


def write_data(
    out: str,
    subset: str,
    length: str,
    ops: Optional[str],
    limit: Optional[int],
    skip: Optional[int],
    data: Optional[str],
    force: bool,
    echo=print,
) -> int:
    """`mlx-sleep data gsm-infinite`: the paper-format training file, from the problems after
    the first `skip` of each op (default: from the Hub, the 200 that `eval` uses by default; from
    a local file, none), so training and test problems stay apart."""
    check_output_file(out, replace=force, inputs=(data,))
    ops = parse_ops(ops) if ops is not None else (None if data is not None else parse_ops("2-8"))
    records = read_problems(data) if data is not None else hub_records(subset, length, ops)
    skip = (0 if data is not None else OFFICIAL_LIMIT[subset]) if skip is None else skip
    by_op = {op: rows[skip:][:limit] for op, rows in select(records, ops).items()}
    if not any(by_op.values()):  # an empty training file would only fail later, in finetune
        raise ValueError(
            f"no problems left after skipping the first {skip} of each op (the evaluation's); "
            "pass --skip 0 to use them anyway, or a file with more problems"
        )
    n = write_training_file(out, by_op)
    echo(
        f"wrote {n} examples ({', '.join(f'op {op}: {len(r)}' for op, r in by_op.items())}"
        f"{f'; the first {skip} of each op skipped' if skip else ''}) to {out}"
    )
    return n
