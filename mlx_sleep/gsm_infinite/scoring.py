"""Scoring a reply by the official rules: the keyword rule of eval_realistic.py for medium /
hard, the LLM-judge step of eval_symbolic.py (or a regex fallback) for symbolic, exact match
for the paper protocol."""

import re
from typing import Callable, Optional


def is_symbolic(record: dict) -> bool:
    return "answer_list" in record


def gold_answer(record: dict):
    """The reference answer: an int (medium / hard, as upstream parses `solution`) or the sorted
    list of variable names (symbolic)."""
    if is_symbolic(record):
        return sorted(record["answer_list"])
    solution = record["solution"]
    start = solution.find("Answer: ")
    if start < 0:
        raise ValueError(
            f"solution has no 'Answer: ' (op {record.get('op')}, id "
            f"{record.get('id')}); is this a GSM-Infinite record?"
        )
    end = solution.find(".", start)
    return int(solution[start + len("Answer: ") : end if end >= 0 else None])


# (keyword, which occurrence, where the candidate ends): eval_realistic.criteriaoutput, in order.
# None: the run of digits right after the keyword.
KEYWORDS = [
    ("answer: ", "first", "."),
    ("solution: ", "first", "."),
    ("oxed{", "last", "}"),
    ("**answer:** ", "first", "."),
    ("**answer: ", "first", "**"),
    ("final answer: answer: ", "first", "."),
    ("\nanswer: ", "first", "."),
    ("\\text{answer: } ", "first", None),
    ("is ", "last", "."),
    ("answer: ", "first", "\n"),
]


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
    return (
        f"\n    Carefully read the input text below and extract the variable names that are "
        f"mentioned as being equal to {q}. If multiple variables are listed, separate them "
        f"with commas.\n    \n    If value {q} is not mentioned, you can safely assume that "
        f"they are all equal to {q}. If there are no such variables, just output None.\n\n"
        f"    Only output the variable names, not the values or any other text.\n    \n"
        f'    Examples:\n    1. input: "V0, V3, V4", output: "V0, V3, V4"\n'
        f"    2. input: \"Variable V2 is equal to {q} in the assignment statement 'assign V2 "
        f'= V1 - 1.\'.", output: "V2"\n    3. input: "The answer is: V1, V2.", output: '
        f'"V1, V2"\n    4. input: "There are no variables equal to {q}.", output: '
        f'"None"\n\n    Input:\n    {strip_reasoning(reply)}\n\n    Output:\n    '
    )


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


def score(
    record: dict, output: str, protocol: str, judge: Optional[Callable[[str], str]] = None
) -> dict:
    """{"correct", "parsed", "scorer"} for one output under a protocol's rule."""
    if protocol == "paper":
        parsed = paper_answer(record, output)
        return {"correct": parsed == gold_answer(record), "parsed": parsed, "scorer": "exact"}
    if is_symbolic(record):
        correct, found, judged = symbolic_correct(record, output, judge)
        return {
            "correct": correct,
            "parsed": found,
            "judge_output": judged,
            "scorer": "judge" if judge is not None else "regex-fallback",
        }
    return {
        "correct": realistic_correct(record["solution"], output),
        "parsed": realistic_answer(output),
        "scorer": "keyword",
    }
