"""GSM-Infinite (Zhou et al. 2025) in two protocols, scored by the official rules.

    by_op = load_records("medium", "8k", ops=[2, 4, 6, 8], limit=50)  # the Hub (users' machines)
    records = read_jsonl("medium_8k.jsonl")                          # a local file, same schema
    example = paper_example(records[0])          # {"prompt", "answer"}: fine-tuning data and eval
    correct = realistic_correct(records[0]["solution"], "The answer is 30.")  # the keyword rule

Protocols:
  paper     The paper's setting. The prompt is the question, then the context (no chain of
            thought), then the cue "Answer:"; the sequence is split into windows of L from its
            start (Algorithm 1, as fine-tuning splits it): every window of context alone is
            consolidated (N passes) and evicted, the window holding the answer (with the
            prompt's tail) takes one ordinary pass per token.
            Exact match (an integer; for symbolic problems the set of variable names).
  official  The benchmark's own run: the record's `messages` through the chat template, greedy
            generation (the engine sleeps whenever its window fills), and the official scorer:
            the keyword rule of eval_realistic.py for medium / hard; for symbolic the LLM-judge
            step of eval_symbolic.py with a judge model the user names, or, without one, a
            regex fallback (reported as such; not the official number).

The fine-tuning data (`mlx-sleep data gsm-infinite`) is `paper_example` of each record, so what a
model is fine-tuned on is what it is evaluated on. Its contract for a trainer: prompt + answer split
into windows of L from the start (Algorithm 1); windows without answer tokens sleep, the others
take one pass and are scored on the answer.
"""

import hashlib
import json
import math
import os
import re
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import mlx.core as mx
import numpy as np

from .config import SleepConfig
from .eval import save_accuracy_plot
from .generate import generate, stream_text
from .io import atomic_path, check_file_target, claim_dir, read_json, write_json
from .loading import load
from .weights import resolve_source
from .sleep import SleepEngine

SUBSETS = ("symbolic", "medium", "hard")
LENGTHS = ("0", "8k", "16k", "32k")
PROTOCOLS = ("paper", "official")
ANSWER_CUE = "Answer:"
PAPER_MAX_TOKENS = 24  # a number and an end
PAPER_MAX_TOKENS_SYMBOLIC = 256  # a list of variable names: ~4 tokens each, up to op of them
OFFICIAL_MAX_TOKENS = 4096  # upstream pred.py
JUDGE_MAX_TOKENS = 2048  # upstream eval_symbolic.py
# Upstream's selection of medium / hard rows per split (config.sh filter_config): of the first
# `limit` rows, these fractions per (template, mode), rows taken in split order.
OFFICIAL_FILTER = {"crazy_zootopia": 0.4, "movie_festival_awards": 0.05, "teachers_in_school": 0.05}
OFFICIAL_LIMIT = {"symbolic": 100, "medium": 200, "hard": 200}


# -- data -------------------------------------------------------------------------------------

def is_symbolic(record: dict) -> bool:
    return "answer_list" in record


def read_jsonl(path: str, required=("problem", "question", "op")) -> List[dict]:
    """Records of a JSONL file in the dataset's schema (one JSON object a line)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    records = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} line {n} is not valid JSON ({e.msg}); expected one "
                                 "GSM-Infinite record per line")
            missing = [k for k in required if k not in record] if isinstance(record, dict) else []
            if not isinstance(record, dict) or missing:
                raise ValueError(f"{path} line {n} lacks {', '.join(missing) or 'fields'}: not a "
                                 "GSM-Infinite record (problem, question, op, solution or "
                                 "answer_list, messages)")
            records.append(record)
    return records


def select(records: Sequence[dict], ops: Optional[Sequence[int]] = None,
           limit: Optional[int] = None) -> Dict[int, List[dict]]:
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
            raise ValueError(f"no records with op {', '.join(map(str, absent))} "
                             f"(ops present: {have})")
    return {op: by_op[op][:limit] for op in sorted(by_op)}


def official_filter(split: Sequence[dict], limit: int) -> List[dict]:
    """Upstream's row selection of a medium / hard split: total = min(limit, len(split)); for
    each (template, mode) the first int(total * fraction) rows with it."""
    total = min(limit, len(split))
    out = []
    for mode in ("normalforward", "forwardreverse"):
        for template, fraction in OFFICIAL_FILTER.items():
            rows = [r for r in split if r.get("template") == template and r.get("mode") == mode]
            out += rows[:int(total * fraction)]
    return out


def hub_records(subset: str, length: str, ops: Sequence[int]) -> List[dict]:
    """The rows of InfiniAILab/gsm_infinite_{subset}_{length}, splits ops_{N}, downloaded with
    huggingface_hub (parquet, read with pyarrow). Users' machines only; tests use local files."""
    if subset not in SUBSETS or length not in LENGTHS:
        raise ValueError(f"subset must be one of {', '.join(SUBSETS)} and length one of "
                         f"{', '.join(LENGTHS)} (got {subset}, {length})")
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError("reading the Hub's parquet files needs pyarrow: pip install pyarrow "
                         "or 'mlx-sleep[gsm-infinite]' (or pass --data FILE.jsonl)") from None
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
                records += pq.read_table(path).to_pylist()
    except ValueError:
        raise
    except Exception as e:  # network, auth, missing repo: one line either way
        raise ValueError(f"could not read {repo} from the Hugging Face Hub: {type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}") from None
    return records


def split_files(files: Iterable[str], op: int) -> List[str]:
    """The parquet shards of split ops_{op} in a dataset repository's file list."""
    pattern = re.compile(rf"(^|/)ops_{op}(-\d+-of-\d+)?\.parquet$")
    return sorted(f for f in files if pattern.search(f))


def load_records(subset: str, length: str, ops: Sequence[int], limit: Optional[int] = None,
                 data: Optional[str] = None, official: bool = False) -> Dict[int, List[dict]]:
    """{op: records}: from `data` (a local JSONL, taken in file order) or the Hub, where the
    official protocol selects rows as upstream does (see `official_filter`)."""
    if data is not None:
        return select(read_jsonl(data), ops, limit)
    by_op = select(hub_records(subset, length, ops), ops)
    if official and subset != "symbolic":
        return {op: official_filter(rows, limit or OFFICIAL_LIMIT[subset])
                for op, rows in by_op.items()}
    return {op: rows[:limit or OFFICIAL_LIMIT[subset]] for op, rows in by_op.items()}


def parse_ops(text: str) -> List[int]:
    """"2,4,6,8", "2-8" or "2-8:2" (a range, inclusive, with a step) -> sorted op counts."""
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
        raise ValueError(f"--ops {text!r}: expected op counts like 2,4,6,8 or a range 2-8 "
                         "(2-8:2 for every second)") from None
    if not ops or min(ops) < 1:
        raise ValueError(f"--ops {text!r}: op counts are integers >= 1")
    return sorted(ops)


# -- prompts ----------------------------------------------------------------------------------

def gold_answer(record: dict):
    """The reference answer: an int (medium / hard, as upstream parses `solution`) or the sorted
    list of variable names (symbolic)."""
    if is_symbolic(record):
        return sorted(record["answer_list"])
    solution = record["solution"]
    start = solution.find("Answer: ")
    if start < 0:
        raise ValueError(f"solution has no 'Answer: ' (op {record.get('op')}, id "
                         f"{record.get('id')}); is this a GSM-Infinite record?")
    end = solution.find(".", start)
    return int(solution[start + len("Answer: "):end if end >= 0 else None])


def paper_example(record: dict) -> dict:
    """The paper-protocol example of a record: {"prompt": question, then the context;
    "answer": the cue and the answer alone}. Evaluation and fine-tuning data both use it."""
    gold = gold_answer(record)
    answer = ", ".join(gold) if isinstance(gold, list) else str(gold)
    return {"prompt": f"Question: {record['question'].strip()}\n\n"
                      f"Context: {record['problem'].strip()}\n",
            "answer": f"{ANSWER_CUE} {answer}"}


def messages(record: dict) -> List[dict]:
    """The record's chat, as the official run sends it."""
    m = record.get("messages")
    if isinstance(m, str):  # some exports store it as a JSON string
        m = json.loads(m)
    if not isinstance(m, list) or not m:
        raise ValueError(f"record (op {record.get('op')}, id {record.get('id')}) has no "
                         "`messages`; the official protocol needs them (or use --protocol paper)")
    return m


# -- scoring ----------------------------------------------------------------------------------

# (keyword, which occurrence, where the candidate ends): eval_realistic.criteriaoutput, in order.
# None: the run of digits right after the keyword.
KEYWORDS = [("answer: ", "first", "."), ("solution: ", "first", "."), ("oxed{", "last", "}"),
            ("**answer:** ", "first", "."), ("**answer: ", "first", "**"),
            ("final answer: answer: ", "first", "."), ("\nanswer: ", "first", "."),
            ("\\text{answer: } ", "first", None), ("is ", "last", "."), ("answer: ", "first", "\n")]


def _as_int(text: str) -> Optional[int]:
    try:
        return int(text)  # Python's int(), as upstream: whitespace, sign, _, Unicode digits
    except ValueError:
        return None


def realistic_answer(reply: str) -> Optional[int]:
    """The integer the official medium / hard rule reads from a reply (None: none found).

    One deliberate difference: upstream raises IndexError when keyword 8's digits run to the
    very end of the reply; here the digits are the candidate."""
    text = re.sub(".\x08", "b", reply).lower()
    for keyword, occurrence, end in KEYWORDS:
        begin = text.rfind(keyword) if occurrence == "last" else text.find(keyword)
        if begin < 0:
            continue
        start = begin + len(keyword)
        if end is None:
            stop = start
            while stop < len(text) and text[stop].isdigit():
                stop += 1
        else:
            stop = text.find(end, start)
            stop = len(text) if stop < 0 else stop
        value = _as_int(text[start:stop])
        if value is not None:
            return value
    return None


def realistic_correct(solution: str, reply: str) -> bool:
    """The official verdict for a medium / hard reply."""
    return realistic_answer(reply) == gold_answer({"solution": solution})


def strip_reasoning(reply: str) -> str:
    """eval_symbolic: keep only the text after the last </think>."""
    return reply.split("</think>")[-1].strip() if "</think>" in reply else reply


def judge_prompt(reply: str, answer_q) -> str:
    """Upstream eval_symbolic.get_prompt: what the official judge is asked."""
    q = str(answer_q)
    return (f"\n    Carefully read the input text below and extract the variable names that are "
            f"mentioned as being equal to {q}. If multiple variables are listed, separate them "
            f"with commas.\n    \n    If value {q} is not mentioned, you can safely assume that "
            f"they are all equal to {q}. If there are no such variables, just output None.\n\n"
            f"    Only output the variable names, not the values or any other text.\n    \n"
            f"    Examples:\n    1. input: \"V0, V3, V4\", output: \"V0, V3, V4\"\n"
            f"    2. input: \"Variable V2 is equal to {q} in the assignment statement 'assign V2 "
            f"= V1 - 1.'.\", output: \"V2\"\n    3. input: \"The answer is: V1, V2.\", output: "
            f"\"V1, V2\"\n    4. input: \"There are no variables equal to {q}.\", output: "
            f"\"None\"\n\n    Input:\n    {strip_reasoning(reply)}\n\n    Output:\n    ")


VARIABLE = re.compile(r"\bV\d+\b")


def variables(text: str) -> set:
    return set(VARIABLE.findall(text))


def fallback_variables(reply: str) -> set:
    """Without a judge: the variable names of the reply's conclusion, i.e. the text after its
    last "answer" (any case) if it has one, else its last non-empty line."""
    text = strip_reasoning(reply)
    at = text.lower().rfind("answer")
    if at >= 0:
        return variables(text[at:])
    lines = [line for line in text.splitlines() if line.strip()]
    return variables(lines[-1]) if lines else set()


def symbolic_correct(record: dict, reply: str, judge: Optional[Callable[[str], str]] = None):
    """(correct, extracted variables, judge output or None) for a symbolic reply: through the
    judge (a function prompt -> text) as upstream, or the regex fallback without one."""
    if judge is None:
        found = fallback_variables(reply)
        return found == set(record["answer_list"]), sorted(found), None
    out = judge(judge_prompt(reply, record["answer_q"]))
    found = variables(out)
    return found == set(record["answer_list"]), sorted(found), out


def paper_answer(record: dict, output: str):
    """What a paper-protocol output answers: the integer it starts with (medium / hard) or the
    set of variable names on its first line (symbolic); None when there is none."""
    first = output.strip().split("\n")[0]
    if is_symbolic(record):
        return sorted(variables(first)) or None
    m = re.match(r"[+-]?\d+", first.strip())
    return int(m.group()) if m else None


def score(record: dict, output: str, protocol: str,
          judge: Optional[Callable[[str], str]] = None) -> dict:
    """{"correct", "parsed", "scorer"} for one output under a protocol's rule."""
    if protocol == "paper":
        parsed = paper_answer(record, output)
        return {"correct": parsed == gold_answer(record), "parsed": parsed, "scorer": "exact"}
    if is_symbolic(record):
        correct, found, judged = symbolic_correct(record, output, judge)
        return {"correct": correct, "parsed": found, "judge_output": judged,
                "scorer": "judge" if judge is not None else "regex-fallback"}
    return {"correct": realistic_correct(record["solution"], output),
            "parsed": realistic_answer(output), "scorer": "keyword"}


# -- results ----------------------------------------------------------------------------------

def wilson(correct: int, n: int, z: float = 1.96):
    """95% Wilson score interval of a proportion."""
    if n == 0:
        return (0.0, 1.0)
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def leaderboard_auc(accuracy: Dict[int, float]) -> float:
    """The leaderboard's summary: np.trapz(acc, ops) * 100 with ops sorted."""
    ops = sorted(accuracy)
    trapezoid = getattr(np, "trapezoid", None) or np.trapz  # numpy 2 renamed it
    return float(trapezoid([accuracy[o] for o in ops], ops) * 100)


def summarize(predictions: Iterable[dict]) -> Dict[str, dict]:
    """{"N = n": {"ops": {op: {n, correct, accuracy, ci}}, "auc"}} from prediction records."""
    counts: Dict[int, Dict[int, List[int]]] = {}
    for p in predictions:
        c = counts.setdefault(int(p.get("loops", 1)), {}).setdefault(int(p["op"]), [0, 0])
        c[0] += bool(p["correct"])
        c[1] += 1
    out = {}
    for loops in sorted(counts):
        ops = {op: {"n": n, "correct": k, "accuracy": k / n, "ci95": list(wilson(k, n))}
               for op, (k, n) in sorted(counts[loops].items())}
        auc = (leaderboard_auc({op: r["accuracy"] for op, r in ops.items()})
               if len(ops) > 1 else None)
        out[f"N = {loops}"] = {"loops": loops, "ops": ops, "auc": auc}
    return out


def markdown_table(summary: Dict[str, dict]) -> str:
    """Accuracy [95% CI] per op (rows) and N (columns), then the AUC."""
    runs = list(summary)
    ops = sorted({op for r in summary.values() for op in r["ops"]})
    lines = ["| op | " + " | ".join(runs) + " |", "|---|" + "---|" * len(runs)]
    for op in ops:
        cells = []
        for run in runs:
            r = summary[run]["ops"].get(op)
            cells.append(f"{r['accuracy']:.3f} [{r['ci95'][0]:.2f}, {r['ci95'][1]:.2f}] "
                         f"(n={r['n']})" if r else "-")
        lines.append(f"| {op} | " + " | ".join(cells) + " |")
    aucs = [f"{summary[r]['auc']:.1f}" if summary[r]["auc"] is not None else "-" for r in runs]
    lines.append("| AUC | " + " | ".join(aucs) + " |")
    return "\n".join(lines)


def plot(summary: Dict[str, dict], path: str, title: str = ""):
    """PNG of accuracy against op count, one line per N, with the 95% intervals shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for run, r in summary.items():
        ops = sorted(r["ops"])
        acc = [r["ops"][o]["accuracy"] for o in ops]
        label = run + (f" (AUC {r['auc']:.1f})" if r["auc"] is not None else "")
        line, = ax.plot(ops, acc, marker="o", label=label)
        ax.fill_between(ops, [r["ops"][o]["ci95"][0] for o in ops],
                        [r["ops"][o]["ci95"][1] for o in ops], color=line.get_color(), alpha=0.15)
    ax.set_xlabel("operations (op)")
    save_accuracy_plot(fig, ax, path, title, "accuracy")


# -- running a model --------------------------------------------------------------------------

def paper_generate(engine, tokenizer, record: dict, max_tokens: Optional[int] = None) -> str:
    """The paper protocol on one record: feed the prompt (every full window sleeps and is
    evicted as the next arrives), then answer after the cue in the live window.

    The prompt is encoded as `tokenizer.encode(prompt)` (special tokens as the tokenizer adds
    them), the cue without special tokens: fine-tuning encodes the JSONL the same way."""
    engine.reset()
    prompt = tokenizer.encode(paper_example(record)["prompt"])
    engine.feed(mx.array([prompt]), logits=None)  # the context: no logits needed
    cue = tokenizer.encode(ANSWER_CUE, add_special_tokens=False)
    text = ""
    if max_tokens is None:
        max_tokens = PAPER_MAX_TOKENS_SYMBOLIC if is_symbolic(record) else PAPER_MAX_TOKENS
    for piece in stream_text(engine, tokenizer, cue, max_tokens):
        text += piece
        if "\n" in text.strip():  # the answer is one line
            break
    return text.strip()


def official_generate(engine, tokenizer, record: dict,
                      max_tokens: int = OFFICIAL_MAX_TOKENS) -> str:
    """The official protocol on one record: its messages through the chat template, greedy."""
    engine.reset()
    prompt = tokenizer.apply_chat_template(messages(record), add_generation_prompt=True)
    return generate(engine, tokenizer, prompt, max_tokens).strip()


def make_judge(model, tokenizer, max_tokens: int = JUDGE_MAX_TOKENS) -> Callable[[str], str]:
    """A judge function (prompt -> reply) over a loaded model: one user message, greedy, as the
    official judge call (temperature 0)."""
    engine = SleepEngine(model)

    def judge(prompt: str) -> str:
        engine.reset()
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                            add_generation_prompt=True)
        return generate(engine, tokenizer, ids, max_tokens).strip()

    return judge


def fingerprint(path: str) -> str:
    """sha256 over a model directory's config.json and weight files (names and bytes)."""
    h = hashlib.sha256()
    names = sorted(f for f in os.listdir(path)
                   if f == "config.json" or f.endswith(".safetensors"))
    for name in names:
        h.update(name.encode() + b"\0")
        with open(os.path.join(path, name), "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                h.update(block)
    return h.hexdigest()


def record_key(record: dict) -> str:
    """Identifies a record in a predictions file (medium / hard ids are not unique)."""
    text = json.dumps([record.get("problem"), record.get("question"), record.get("op")])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# -- a run: sweep, resume, results ------------------------------------------------------------

RUN_FILE, PREDICTIONS, RESULTS_JSON, RESULTS_MD, PLOT = (
    "run.json", "predictions.jsonl", "results.json", "results.md", "accuracy.png")


def read_predictions(path: str) -> List[dict]:
    """The complete lines of a predictions file (an interrupted write leaves at most a partial
    last line, which is dropped and rewritten away)."""
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    out, partial = [], False
    for n, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            if n != len(lines) - 1:
                raise ValueError(f"{path} line {n + 1} is not valid JSON: not a predictions file")
            partial = True
    if partial:
        with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(p, ensure_ascii=False) + "\n" for p in out)
    return out


def write_results(out: str, summary: dict, settings: dict) -> str:
    """results.json, results.md and accuracy.png in `out`; returns the markdown table."""
    table = markdown_table(summary)
    write_json(os.path.join(out, RESULTS_JSON), {"settings": settings, "results": summary,
                                                  "predictions": PREDICTIONS})
    with atomic_path(os.path.join(out, RESULTS_MD)) as tmp, open(tmp, "w") as f:
        f.write(f"{describe(settings)}\n\n{table}\n")
    plot(summary, os.path.join(out, PLOT), describe(settings))
    return table


def describe(settings: dict) -> str:
    s = settings
    data = s.get("data") or f"{s['subset']} {s['length']}"
    return (f"GSM-Infinite ({data}), {s['protocol']} protocol, "
            f"{s.get('eviction', '?')} eviction, L = {s.get('window', '?')}")


def _open_run(out: str, settings: dict):
    """Create the run directory, or check that the one there holds this very run (resume)."""
    run_file = os.path.join(out, RUN_FILE)
    if os.path.exists(run_file):
        saved = read_json(run_file)
        differ = sorted(k for k in set(saved) | set(settings)
                        if k != "loops" and saved.get(k) != settings.get(k))
        if differ:
            raise ValueError(f"{out} holds a run with other settings ({', '.join(differ)}); "
                             "pass another --out to start a new one")
        settings = {**settings, "loops": sorted(set(saved["loops"]) | set(settings["loops"]))}
    elif os.path.isdir(out) and os.listdir(out):
        raise ValueError(f"{out} exists and is not a GSM-Infinite run directory; pass a new "
                         "or empty --out")
    claim_dir(out, "results")
    write_json(run_file, settings)
    return settings


def evaluate(model, tokenizer, by_op: Dict[int, List[dict]], out: str, *, loops: Sequence[int],
             window: int, eviction: str, protocol: str, settings: dict,
             max_tokens: Optional[int] = None, judge: Optional[Callable[[str], str]] = None,
             progress: bool = True, echo=print) -> dict:
    """Run every record at every N in `loops`, appending predictions to OUT/predictions.jsonl
    (records already there are skipped: rerunning resumes), then write the results of the whole
    run (with N values run earlier into `out`); returns them."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)} (got {protocol!r})")
    settings = _open_run(out, {**settings, "loops": sorted(set(loops)), "window": window,
                               "eviction": eviction, "protocol": protocol})
    path = os.path.join(out, PREDICTIONS)
    done = read_predictions(path)
    seen = {(p["loops"], p["op"], p["index"]): p["key"] for p in done}
    todo = []
    for n in loops:
        for op, records in by_op.items():
            for i, r in enumerate(records):
                key = record_key(r)
                if (n, op, i) in seen:
                    if seen[(n, op, i)] != key:
                        raise ValueError(f"{path} has another problem at op {op} #{i}: the data "
                                         "changed since; pass another --out")
                    continue
                todo.append((n, op, i, r, key))
    if max_tokens is None and protocol == "official":
        max_tokens = OFFICIAL_MAX_TOKENS
    run_one = paper_generate if protocol == "paper" else official_generate
    bar = None
    if progress and todo:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(todo), unit="problem", desc="gsm-infinite", dynamic_ncols=True)
    engines = {}
    with open(path, "a", encoding="utf-8") as f:
        for n, op, i, record, key in todo:
            if n not in engines:
                engines[n] = SleepEngine(model, SleepConfig(loops=n, window=window,
                                                            eviction=eviction))
            output = run_one(engines[n], tokenizer, record, max_tokens)
            verdict = score(record, output, protocol, judge)
            f.write(json.dumps({**record, "output": output, **verdict, "loops": n, "op": op,
                                "index": i, "key": key, "protocol": protocol},
                               ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
            if bar is not None:
                bar.update(1)
                bar.set_postfix_str(f"N={n} op={op}")
    if bar is not None:
        bar.close()
    # the whole run: N values of earlier calls into the same directory too
    wanted = {(n, op, i) for n in settings["loops"] for op, rs in by_op.items()
              for i in range(len(rs))}
    predictions = [p for p in read_predictions(path) if (p["loops"], p["op"], p["index"]) in wanted]
    summary = summarize(predictions)
    echo(describe(settings))
    echo(write_results(out, summary, settings))
    if protocol == "official" and any(p.get("scorer") == "regex-fallback" for p in predictions):
        echo("symbolic answers scored by the regex fallback (no --judge-model): not the "
             "official judge's numbers")
    return summary


def rescore(path: str, protocol: str, judge: Optional[Callable[[str], str]] = None,
            out: Optional[str] = None, settings: Optional[dict] = None, echo=print) -> dict:
    """Score a predictions file (records with the dataset's fields plus `output`) with the
    protocol's rule, without a model; results to `out` when given."""
    records = read_jsonl(path, required=("problem", "question", "op", "output"))
    scored = [{**r, **score(r, r["output"], protocol, judge)} for r in records]
    summary = summarize(scored)
    settings = {"subset": "symbolic" if scored and is_symbolic(scored[0]) else "medium/hard",
                "length": "?", "protocol": protocol, "scored_file": os.path.basename(path),
                **(settings or {})}
    if out is not None:
        if os.path.exists(os.path.join(out, PREDICTIONS)):
            raise ValueError(f"{out} already holds predictions; pass another --out")
        claim_dir(out, "results", writes=(PREDICTIONS,))
        with atomic_path(os.path.join(out, PREDICTIONS)) as tmp, open(tmp, "w") as f:
            f.writelines(json.dumps(p, ensure_ascii=False) + "\n" for p in scored)
        echo(write_results(out, summary, settings))
    else:
        echo(markdown_table(summary))
    return summary


def write_training_file(path: str, by_op: Dict[int, List[dict]]) -> int:
    """The paper-format fine-tuning file: one {"prompt", "answer", "op"} a line; returns rows."""
    rows = [{**paper_example(r), "op": op} for op, rs in by_op.items() for r in rs]
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    return len(rows)


# -- the command line's entry points (mlx-sleep eval --task gsm-infinite, mlx-sleep data) -----

def load_adapter(model, path: str):
    """Apply a fine-tune's adapter directory (mlx-lm's layout: adapter_config.json and
    adapters.safetensors) to `model`."""
    if not os.path.isfile(os.path.join(path, "adapter_config.json")):
        raise FileNotFoundError(f"{path} has no adapter_config.json: not an adapter directory")
    from mlx_lm.tuner.utils import load_adapters

    try:
        return load_adapters(model, path)
    except (KeyError, AttributeError, TypeError) as e:
        raise ValueError(f"{path}: the adapter does not fit this model ({type(e).__name__}: {e})")


def load_with_tokenizer(path_or_id: str):
    """(model, tokenizer, local path)."""
    path = resolve_source(path_or_id)
    model, tokenizer = load(path)
    return model, tokenizer, path


def run_cli(model_path, loops, window, eviction, subset, length, ops, limit, data, protocol,
            max_tokens, judge_model, judge_max_tokens, adapter, out, score_path,
            echo=print) -> dict:
    """`mlx-sleep eval --task gsm-infinite ...` (and `--score FILE`)."""
    judge = None
    if judge_model is not None:
        judge_model_, judge_tokenizer, _ = load_with_tokenizer(judge_model)
        judge = make_judge(judge_model_, judge_tokenizer, max_tokens=judge_max_tokens)
    if score_path is not None:
        return rescore(score_path, protocol, judge, out, echo=echo)
    if model_path is None or out is None:
        raise ValueError("--task gsm-infinite needs --model DIR and --out DIR (or --score FILE)")
    if judge is not None and (protocol != "official" or subset != "symbolic"):
        raise ValueError("--judge-model is for --subset symbolic --protocol official")
    model, tokenizer, path = load_with_tokenizer(model_path)
    if adapter is not None:
        model = load_adapter(model, adapter)
    sweep = parse_loops(loops, model.sleep_config.loops)
    by_op = load_records(subset, length, parse_ops(ops), limit, data, protocol == "official")
    settings = {"model": os.path.basename(os.path.normpath(model_path)),
                "model_fingerprint": fingerprint(path),
                "adapter": os.path.basename(os.path.normpath(adapter)) if adapter else None,
                "adapter_fingerprint": fingerprint(adapter) if adapter else None,
                "subset": subset, "length": length, "ops": sorted(by_op), "limit": limit,
                "data": (os.path.basename(data) if data
                         else f"InfiniAILab/gsm_infinite_{subset}_{length}"),
                "max_tokens": max_tokens,
                "judge": (os.path.basename(os.path.normpath(judge_model)) if judge_model
                          else ("regex-fallback" if subset == "symbolic" and protocol == "official"
                                else None))}
    return evaluate(model, tokenizer, by_op, out, loops=sweep,
                    window=window or model.sleep_config.window,
                    eviction=eviction or model.sleep_config.eviction, protocol=protocol,
                    settings=settings, max_tokens=max_tokens, judge=judge, echo=echo)


def parse_loops(text, default: int) -> List[int]:
    """"1,2,4" -> [1, 2, 4]; None -> [default]."""
    if text is None:
        return [default]
    try:
        loops = sorted({int(x) for x in str(text).split(",")})
    except ValueError:
        loops = []
    if not loops or loops[0] < 1:
        raise ValueError(f"--loops {text!r}: expected N >= 1 or a list like 1,2,4")
    return loops


def write_data(out: str, subset: str, length: str, ops: str, limit: Optional[int],
               skip: Optional[int], data: Optional[str], force: bool, echo=print) -> int:
    """`mlx-sleep data gsm-infinite`: the paper-format training file, from the problems after
    the first `skip` of each op (default: from the Hub, the 200 that `eval` uses by default; from
    a local file, none), so training and test problems stay apart."""
    if os.path.exists(out) and not force:
        raise ValueError(f"{out} already exists; pass --force to replace it")
    check_file_target(out)  # --force replaces a regular file only
    ops = parse_ops(ops)
    records = read_jsonl(data) if data is not None else hub_records(subset, length, ops)
    skip = (0 if data is not None else OFFICIAL_LIMIT[subset]) if skip is None else skip
    by_op = {op: rows[skip:][:limit] for op, rows in select(records, ops).items()}
    n = write_training_file(out, by_op)
    echo(f"wrote {n} examples ({', '.join(f'op {op}: {len(r)}' for op, r in by_op.items())}; "
         f"the first {skip} of each op skipped) to {out}")
    return n
