"""Running a model on GSM-Infinite: the two protocols, a sweep over N that resumes, re-scoring
a predictions file, and `mlx-sleep eval --task gsm-infinite`."""

import hashlib
import json
import os
from typing import Callable, Dict, List, Optional, Sequence

import mlx.core as mx

from ..config import ConfigError, SleepConfig
from ..generate import generate, stream_text
from ..io import atomic_path, claim_dir, read_json_object, write_json
from ..loop import refuse_other_settings
from ..loading import load_with_path
from ..sleep import SleepEngine
from ..finetune.adapters import load_adapter
from .data import ANSWER_CUE, load_records, messages, paper_example, parse_ops, read_jsonl
from .report import PREDICTIONS, describe, markdown_table, summarize, write_results
from .scoring import is_symbolic, score

PROTOCOLS = ("paper", "official")
PAPER_MAX_TOKENS = 24  # a number and an end
PAPER_MAX_TOKENS_SYMBOLIC = 256  # a list of variable names: ~4 tokens each, up to op of them
OFFICIAL_MAX_TOKENS = 4096  # upstream pred.py
JUDGE_MAX_TOKENS = 2048  # upstream eval_symbolic.py
RUN_FILE = "run.json"


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
        except (json.JSONDecodeError, RecursionError):
            if n != len(lines) - 1:
                raise ValueError(f"{path} line {n + 1} is not valid JSON: not a predictions file")
            partial = True
    if partial:
        with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(p, ensure_ascii=False) + "\n" for p in out)
    return out


def _open_run(out: str, settings: dict):
    """Create the run directory, or check that the one there holds this very run (resume)."""
    run_file = os.path.join(out, RUN_FILE)
    if os.path.exists(run_file):
        saved = read_json_object(run_file, " (a GSM-Infinite run's settings)")
        loops = saved.get("loops")
        if not (isinstance(loops, list) and all(type(n) is int and n >= 1 for n in loops)):
            raise ConfigError(f"{run_file}: loops must be a list of integers >= 1; it was not "
                              "written by mlx-sleep: pass another --out")
        refuse_other_settings(out, saved, settings, ignore=("loops",))
        settings = {**settings, "loops": sorted(set(loops) | set(settings["loops"]))}
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


def run_cli(model_path, loops, window, eviction, subset, length, ops, limit, data, protocol,
            max_tokens, judge_model, judge_max_tokens, adapter, out, score_path,
            echo=print) -> dict:
    """`mlx-sleep eval --task gsm-infinite ...` (and `--score FILE`)."""
    judge = None
    if judge_model is not None:
        _, judge_model_, judge_tokenizer = load_with_path(judge_model)
        judge = make_judge(judge_model_, judge_tokenizer, max_tokens=judge_max_tokens)
    if score_path is not None:
        return rescore(score_path, protocol, judge, out, echo=echo)
    if model_path is None or out is None:
        raise ValueError("--task gsm-infinite needs --model DIR and --out DIR (or --score FILE)")
    if judge is not None and (protocol != "official" or subset != "symbolic"):
        raise ValueError("--judge-model is for --subset symbolic --protocol official")
    path, model, tokenizer = load_with_path(model_path)
    if adapter is not None:
        model = load_adapter(model, adapter)
    sweep = sorted(set(loops or [model.sleep_config.loops]))
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
