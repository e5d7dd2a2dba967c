"""Fine-tuning data: JSONL records, checked where they are read, tokenized and batched.

One JSON object per line:
    {"prompt": ..., "answer": ...}   loss on the answer (and eos); the prompt is the context the
                                     model consolidates window by window
    {"text": ...}                    loss on every token
    {"messages": [{"role", "content"}, ...]}   the tokenizer's chat template; loss on assistant turns
"""

from functools import lru_cache
from typing import List, Tuple

import numpy as np

from ..io import check_text, read_jsonl
from ..tokens import encode_example


class DataError(ValueError):
    """A data file is unreadable or a record malformed; the message names the file and line."""


FORMS = 'a {"prompt", "answer"}, {"text"} or {"messages"} object'
MAX_RECORD_BYTES = 256 << 10  # a GSM-Infinite 32k record is ~130 KB; one step trains a record


def read_records(path: str) -> List[Tuple[int, dict]]:
    """(line number, record) for every non-blank line of a JSONL file, each checked."""
    try:
        records = read_jsonl(path, check_record, FORMS, max_line=MAX_RECORD_BYTES)
    except FileNotFoundError:
        raise DataError(f"{path} does not exist; pass a JSONL file of {FORMS}s") from None
    except ValueError as e:
        raise DataError(str(e)) from None
    if not records:
        raise DataError(f"{path} holds no records")
    return records


def check_record(rec: dict, where: str):
    if "messages" in rec:
        msgs = rec["messages"]
        if not (isinstance(msgs, list) and msgs and all(isinstance(m, dict) for m in msgs)):
            raise DataError(
                f'{where}: "messages" must be a non-empty list of {{"role": str, "content": str}}'
            )
        for i, m in enumerate(msgs):
            check_text(m, "role", f"{where} message {i}")
            check_text(m, "content", f"{where} message {i}")
        if not any(m["role"] == "assistant" for m in msgs):
            raise DataError(f'{where}: "messages" has no assistant turn to learn')
    elif "prompt" in rec or "answer" in rec:
        check_text(rec, "prompt", where)
        check_text(rec, "answer", where)
        if not rec["answer"]:
            raise DataError(f'{where}: "answer" is empty; there is nothing to learn')
    elif "text" in rec:
        check_text(rec, "text", where)
        if not rec["text"]:
            raise DataError(f'{where}: "text" is empty; there is nothing to learn')
    else:
        raise DataError(
            f"{where}: expected {FORMS} (keys found: {', '.join(sorted(rec)) or 'none'})"
        )


def tokenize_record(rec: dict, tokenizer) -> Tuple[List[int], List[bool]]:
    """(token ids, scored) where scored[i] says token i is a target the loss counts. Prompts
    and texts start a sequence (BOS where the tokenizer adds one: tokens.py, as evaluation
    encodes them); chat records are the template's own ids."""
    if "messages" in rec:
        if not getattr(tokenizer, "chat_template", None):
            raise DataError(
                '{"messages"} records need a tokenizer with a chat template; '
                "this model's tokenizer_config.json has none"
            )
        msgs, ids, scored = rec["messages"], [], []

        def extend(upto, score):
            if upto[: len(ids)] != ids:
                raise DataError(
                    "the chat template renders earlier turns differently once later "
                    'ones are added; use {"prompt", "answer"} records instead'
                )
            scored.extend([score] * (len(upto) - len(ids)))
            ids.extend(upto[len(ids) :])

        for i, msg in enumerate(msgs):
            if msg["role"] == "assistant":  # its header is context, its content the target
                extend(
                    list(
                        tokenizer.apply_chat_template(
                            msgs[:i], tokenize=True, add_generation_prompt=True
                        )
                    ),
                    False,
                )
            extend(
                list(tokenizer.apply_chat_template(msgs[: i + 1], tokenize=True)),
                msg["role"] == "assistant",
            )
        return ids, scored
    if "text" in rec:
        context, ids = encode_example(tokenizer, "", rec["text"])
        return context + ids, [False] * len(context) + [True] * len(ids)
    prompt, answer = encode_example(tokenizer, rec["prompt"], rec["answer"])
    return prompt + answer, [False] * len(prompt) + [True] * len(answer)


def load_examples(path: str, tokenizer, vocab_size: int) -> List[Tuple[np.ndarray, np.ndarray]]:
    """Every record of `path` tokenized: (ids int32, scored bool), checked against the model."""
    examples = []
    for lineno, rec in read_records(path):
        where = f"{path}:{lineno}"
        try:
            ids, scored = tokenize_record(rec, tokenizer)
        except DataError as e:
            raise DataError(f"{where}: {e}") from None
        if len(ids) < 2 or not any(scored[1:]):
            raise DataError(
                f"{where}: the record tokenizes to {len(ids)} token(s) with nothing "
                "to predict; give it more text"
            )
        ids = np.asarray(ids, dtype=np.int64)
        if ids.min() < 0 or ids.max() >= vocab_size:
            raise DataError(
                f"{where}: token id {int(ids.max())} is outside the model's "
                f"vocabulary of {vocab_size}; is the tokenizer the model's?"
            )
        examples.append((ids.astype(np.int32), np.asarray(scored, dtype=bool)))
    return examples


def make_batch(examples, pad_id: int):
    """inputs, targets, mask [B, T-1] (numpy), right-padded to the longest sequence."""
    T = max(len(ids) for ids, _ in examples)
    ids = np.full((len(examples), T), pad_id, dtype=np.int32)
    scored = np.zeros((len(examples), T), dtype=bool)
    for i, (x, s) in enumerate(examples):
        ids[i, : len(x)], scored[i, : len(s)] = x, s
    return ids[:, :-1], ids[:, 1:], scored[:, 1:].astype(np.float32)


@lru_cache(maxsize=4)
def _epoch_order(seed: int, n: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


def batch_indices(seed: int, n: int, start: int, size: int) -> List[int]:
    """Examples start..start+size-1 of the training stream: a fresh shuffle every epoch, a pure
    function of the position, so a resumed run reads exactly what the first run would have."""
    return [int(_epoch_order(seed, n, i // n)[i % n]) for i in range(start, start + size)]
