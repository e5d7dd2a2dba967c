"""Text to token ids: one rule for training and inference.

A text that starts a sequence (a fine-tuning record's prompt or text, the paper protocol's
prompt, a raw `generate` prompt) gets the BOS token where the tokenizer adds one, as Hugging
Face's `encode` and mlx-lm's `generate` do (not twice when the text already begins with it);
a text that continues a sequence (an answer, the answer cue, a later chat turn, a prompt the
chat template rendered) gets no special tokens. So the ids of a {prompt, answer} record are
the same in `finetune`, in `eval --protocol paper` and from the file `data gsm-infinite` writes,
and every window boundary falls on the same token in all three.
"""

from typing import List, Tuple


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer's `encode` puts a BOS token before a text."""
    bos = getattr(tokenizer, "bos_token_id", None)
    return bos is not None and list(tokenizer.encode("a"))[:1] == [bos]


def encode_start(tokenizer, text: str) -> List[int]:
    """The ids of `text` at the start of a sequence: BOS where the tokenizer adds one, the
    text, and never a special token after it (an EOS there would end the context)."""
    ids = encode_more(tokenizer, text)
    bos_text = getattr(tokenizer, "bos_token", None)
    if adds_bos(tokenizer) and not (bos_text and text.startswith(bos_text)):
        return [tokenizer.bos_token_id] + ids
    return ids


def encode_more(tokenizer, text: str) -> List[int]:
    """The ids of `text` continuing a sequence: no special tokens."""
    return list(tokenizer.encode(text, add_special_tokens=False))


def encode_example(tokenizer, prompt: str, answer: str) -> Tuple[List[int], List[int]]:
    """(context ids, target ids) of a {prompt, answer} record: the prompt starts the sequence,
    the answer continues it and ends with EOS (where the tokenizer has one)."""
    eos = tokenizer.eos_token_id
    return encode_start(tokenizer, prompt), encode_more(tokenizer, answer) + (
        [eos] if eos is not None else []
    )
