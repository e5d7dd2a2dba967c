"""Running a model on GSM-Infinite: the two protocols, a sweep over N that resumes, re-scoring
a predictions file, and `mlx-sleep eval --task gsm-infinite`."""

import hashlib
import json
import os
from typing import Callable, Dict, List, Optional, Sequence

import mlx.core as mx

from ..config import MAX_LOOPS, ConfigError, SleepConfig, check_int, show
from ..generate import generate, stream_text
from ..io import atomic_path, check_text, claim_dir, read_json_object, read_jsonl, write_json
from ..loop import refuse_other_settings
from ..loading import load_with_path
from ..sleep import SleepEngine
from ..finetune.adapters import load_adapter
from ..tokens import encode_more, encode_start
from .data import ANSWER_CUE, check_record, load_records, messages, paper_example, parse_ops
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

    The prompt starts the sequence and the cue continues it (tokens.py), as fine-tuning
    encodes the same record: the ids fed here are a prefix of the ids it trains on."""
    engine.reset()
    prompt = encode_start(tokenizer, paper_example(record)["prompt"])
    engine.feed(mx.array([prompt]), logits=None)  # the context: no logits needed
    engine.begin_answer()  # windows from the prompt's last on take one pass, as in training
    cue = encode_more(tokenizer, ANSWER_CUE)
    text = ""
    if max_tokens is None:
        max_tokens = PAPER_MAX_TOKENS_SYMBOLIC if is_symbolic(record) else PAPER_MAX_TOKENS
    for piece in stream_text(engine, tokenizer, cue, max_tokens):
        text += piece
        if "\n" in text.strip():  # the answer is one line
            break
    return text.strip()


def official_generate(
    engine, tokenizer, record: dict, max_tokens: int = OFFICIAL_MAX_TOKENS
) -> str:
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
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True
        )
        return generate(engine, tokenizer, ids, max_tokens).strip()

    return judge


def content_digest(path: str) -> str:
    """sha256 over a model directory's config.json and weight files (names and bytes)."""
    h = hashlib.sha256()
    names = sorted(f for f in os.listdir(path) if f == "config.json" or f.endswith(".safetensors"))
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


def check_prediction(record: dict, where: str):
    """A line of a predictions file to re-score: a GSM-Infinite record and the model's output."""
    check_record(record, where)
    check_text(record, "output", where)


def check_run_prediction(record: dict, where: str):
    """A line of a run's own predictions.jsonl: also where it belongs in the sweep."""
    check_prediction(record, where)
    check_int(f'{where}: "loops"', record.get("loops"), 1, MAX_LOOPS)
    check_int(f'{where}: "index"', record.get("index"), 0, 2**31)
    key = record.get("key")
    if not (isinstance(key, str) and len(key) == 16 and all(c in "0123456789abcdef" for c in key)):
        raise ValueError(f'{where}: "key" must be 16 hex digits (got {show(key)})')
    if record.get("protocol") not in PROTOCOLS:
        raise ValueError(f'{where}: "protocol" must be one of {", ".join(PROTOCOLS)}')


def read_predictions(path: str):
    """(the complete, checked lines of a run's predictions file, whether its last line was cut
    short): a kill during an append leaves at most a partial last line, dropped here and
    rewritten away once the run is known to be this one (drop_partial)."""
    if not os.path.lexists(path):
        return [], False
    records = [
        r
        for _, r in read_jsonl(
            path, check_run_prediction, "prediction", nofollow=True, drop_partial_last=True
        )
    ]
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        end = f.tell()
        if end:
            f.seek(end - 1)
        partial = end > 0 and f.read(1) != b"\n"
    return records, partial


def drop_partial(path: str, records: List[dict]):
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(p, ensure_ascii=False) + "\n" for p in records)


def _open_run(out: str, settings: dict):
    """Create the run directory, or check that the one there holds this very run (resume)."""
    run_file = os.path.join(out, RUN_FILE)
    if os.path.exists(run_file):
        saved = read_json_object(run_file, " (a GSM-Infinite run's settings)")
        loops = saved.get("loops")
        if not (isinstance(loops, list) and all(type(n) is int and n >= 1 for n in loops)):
            raise ConfigError(
                f"{run_file}: loops must be a list of integers >= 1; it was not "
                "written by mlx-sleep: pass another --out"
            )
        refuse_other_settings(out, saved, settings, ignore=("loops",))
        settings = {**settings, "loops": sorted(set(loops) | set(settings["loops"]))}
    elif os.path.isdir(out) and os.listdir(out):
        raise ValueError(
            f"{out} exists and is not a GSM-Infinite run directory; pass a new or empty --out"
        )
    claim_dir(out, "results")
    write_json(run_file, settings)
    return settings


def run_sweep(
    model,
    tokenizer,
    by_op: Dict[int, List[dict]],
    out: str,
    *,
    loops: Sequence[int],
    window: int,
    eviction: str,
    protocol: str,
    settings: dict,
    max_tokens: Optional[int] = None,
    judge: Optional[Callable[[str], str]] = None,
    progress: bool = True,
    echo=print,
) -> dict:
    """Run every record at every N in `loops`, appending predictions to OUT/predictions.jsonl
    (records already there are skipped: rerunning resumes), then write the results of the whole
    run (with N values run earlier into `out`); returns them."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)} (got {protocol!r})")
    path = os.path.join(out, PREDICTIONS)
    done, partial = read_predictions(path)  # checked before run.json is touched
    settings = _open_run(
        out,
        {
            **settings,
            "loops": sorted(set(loops)),
            "window": window,
            "eviction": eviction,
            "protocol": protocol,
        },
    )
    if partial:
        drop_partial(path, done)
    seen = {(p["loops"], p["op"], p["index"]): p["key"] for p in done}
    todo = []
    for n in loops:
        for op, records in by_op.items():
            for i, r in enumerate(records):
                key = record_key(r)
                if (n, op, i) in seen:
                    if seen[(n, op, i)] != key:
                        raise ValueError(
                            f"{path} has another problem at op {op} #{i}: the data "
                            "changed since; pass another --out"
                        )
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
                engines[n] = SleepEngine(
                    model, SleepConfig(loops=n, window=window, eviction=eviction)
                )
            output = run_one(engines[n], tokenizer, record, max_tokens)
            verdict = score(record, output, protocol, judge)
            f.write(
                json.dumps(
                    {
                        **record,
                        "output": output,
                        **verdict,
                        "loops": n,
                        "op": op,
                        "index": i,
                        "key": key,
                        "protocol": protocol,
                    },
                    ensure_ascii=False,
                )
                + "\n"
            )
            f.flush()
            os.fsync(f.fileno())
            if bar is not None:
                bar.update(1)
                bar.set_postfix_str(f"N={n} op={op}")
    if bar is not None:
        bar.close()
    # the whole run: N values of earlier calls into the same directory too
    wanted = {
        (n, op, i) for n in settings["loops"] for op, rs in by_op.items() for i in range(len(rs))
    }
    predictions = [
        p for p in read_predictions(path)[0] if (p["loops"], p["op"], p["index"]) in wanted
    ]
    summary = summarize(predictions)
    echo(describe(settings))
    echo(write_results(out, summary, settings))
    if protocol == "official" and any(p.get("scorer") == "regex-fallback" for p in predictions):
        echo(
            "symbolic answers scored by the regex fallback (no --judge-model): not the "
            "official judge's numbers"
        )
    return summary


def rescore(
    path: str,
    protocol: str,
    judge: Optional[Callable[[str], str]] = None,
    out: Optional[str] = None,
    settings: Optional[dict] = None,
    echo=print,
) -> dict:
    """Score a predictions file (records with the dataset's fields plus `output`) with the
    protocol's rule, without a model; results to `out` when given."""
    records = [r for _, r in read_jsonl(path, check_prediction, "prediction")]
    scored = [{**r, **score(r, r["output"], protocol, judge)} for r in records]
    summary = summarize(scored)
    settings = {
        "subset": "symbolic" if scored and is_symbolic(scored[0]) else "medium/hard",
        "length": "?",
        "protocol": protocol,
        "scored_file": os.path.basename(path),
        **(settings or {}),
    }
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


def run_cli(
    model_path,
    loops,
    window,
    eviction,
    subset,
    length,
    ops,
    limit,
    data,
    protocol,
    max_tokens,
    judge_model,
    judge_max_tokens,
    adapter,
    out,
    score_path,
    echo=print,
) -> dict:
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
        model = load_adapter(model, adapter)  # with the sleep settings it was trained with
        s = model.sleep_config
        echo(
            f"adapter {adapter}: N = {s.loops}, L = {s.window}, {s.eviction} eviction, core "
            f"{':'.join(map(str, model.core))} (--loops / -L / --eviction override them)"
        )
    sweep = sorted(set(loops or [model.sleep_config.loops]))
    by_op = load_records(subset, length, parse_ops(ops), limit, data, protocol == "official")
    settings = {
        "model": os.path.basename(os.path.normpath(model_path)),
        "model_digest": content_digest(path),
        "adapter": os.path.basename(os.path.normpath(adapter)) if adapter else None,
        "adapter_digest": content_digest(adapter) if adapter else None,
        "subset": subset,
        "length": length,
        "ops": sorted(by_op),
        "limit": limit,
        "data": (os.path.basename(data) if data else f"InfiniAILab/gsm_infinite_{subset}_{length}"),
        "max_tokens": max_tokens,
        "judge": (
            os.path.basename(os.path.normpath(judge_model))
            if judge_model
            else ("regex-fallback" if subset == "symbolic" and protocol == "official" else None)
        ),
    }
    return run_sweep(
        model,
        tokenizer,
        by_op,
        out,
        loops=sweep,
        window=window or model.sleep_config.window,
        eviction=eviction or model.sleep_config.eviction,
        protocol=protocol,
        settings=settings,
        max_tokens=max_tokens,
        judge=judge,
        echo=echo,
    )
