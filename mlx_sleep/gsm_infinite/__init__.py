"""GSM-Infinite (Zhou et al. 2025) in two protocols, scored by the official rules.

    by_op = load_records("medium", "8k", ops=[2, 4, 6, 8], limit=50)  # the Hub (users' machines)
    records = read_problems("medium_8k.jsonl")                          # a local file, same schema
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

    data.py     records (the Hub or a local file), selection, prompts, the fine-tuning file
    scoring.py  the official rules and exact match
    report.py   accuracy per op, intervals, AUC, the table and plot
    runner.py   the protocols, the resumable sweep over N, re-scoring, the CLI entry
"""

from .data import (
    ANSWER_CUE,
    LENGTHS,
    OFFICIAL_FILTER,
    OFFICIAL_LIMIT,
    SUBSETS,
    hub_records,
    load_records,
    messages,
    official_filter,
    paper_example,
    parse_ops,
    read_problems,
    select,
    split_files,
    write_data,
    write_training_file,
)
from .report import describe, leaderboard_auc, markdown_table, summarize, wilson, write_results
from .runner import (
    JUDGE_MAX_TOKENS,
    OFFICIAL_MAX_TOKENS,
    PAPER_MAX_TOKENS,
    PROTOCOLS,
    make_judge,
    official_generate,
    paper_generate,
    read_predictions,
    run_sweep,
    record_key,
    rescore,
    run_cli,
)
from .scoring import (
    gold_answer,
    is_symbolic,
    judge_prompt,
    paper_answer,
    realistic_answer,
    realistic_correct,
    score,
    symbolic_correct,
)
from ..finetune.adapters import load_adapter

__all__ = [
    "ANSWER_CUE",
    "JUDGE_MAX_TOKENS",
    "LENGTHS",
    "OFFICIAL_FILTER",
    "OFFICIAL_LIMIT",
    "OFFICIAL_MAX_TOKENS",
    "PAPER_MAX_TOKENS",
    "PROTOCOLS",
    "SUBSETS",
    "describe",
    "gold_answer",
    "hub_records",
    "is_symbolic",
    "judge_prompt",
    "leaderboard_auc",
    "load_adapter",
    "load_records",
    "make_judge",
    "markdown_table",
    "messages",
    "official_filter",
    "official_generate",
    "paper_answer",
    "paper_example",
    "paper_generate",
    "parse_ops",
    "read_problems",
    "run_sweep",
    "read_predictions",
    "realistic_answer",
    "realistic_correct",
    "record_key",
    "rescore",
    "run_cli",
    "score",
    "select",
    "split_files",
    "summarize",
    "symbolic_correct",
    "wilson",
    "write_data",
    "write_results",
    "write_training_file",
]
