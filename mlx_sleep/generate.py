"""Token generation over the sleep engine: one ordinary (wake) pass per token.

    engine = SleepEngine(model)                        # the model's stored sleep settings
    for token in stream_generate(engine, prompt_ids, max_tokens=64,
                                 stop_ids=tokenizer.eos_token_ids):
        ...
    text = generate(engine, tokenizer, prompt_ids, max_tokens=64)

The engine sleeps on its own when the window fills (a forced sleep), so a long prompt or a long
answer is consolidated window by window exactly as in training. Greedy by default; pass
`sampler=mlx_lm.sample_utils.make_sampler(temp=0.7, top_p=0.9)` and mlx-lm logits processors
(e.g. `make_logits_processors(repetition_penalty=1.1)`) for anything else.
"""

from typing import Callable, Iterable, Iterator, Optional, Sequence

import mlx.core as mx


def last_logits(engine, ids: Sequence[int]) -> mx.array:
    """Feed `ids` (at least one) and return the logits [1, V] after the last of them."""
    return engine.feed(mx.array([list(ids)]), logits="last")[:, -1, :]


def stream_generate(engine, prompt_ids: Sequence[int], max_tokens: int,
                    sampler: Optional[Callable[[mx.array], mx.array]] = None,
                    logits_processors: Optional[Iterable[Callable]] = None,
                    stop_ids: Iterable[int] = ()) -> Iterator[int]:
    """Feed the prompt to `engine`, then yield up to `max_tokens` generated token ids.

    Stops before yielding a token in `stop_ids` (the stop token itself is neither yielded nor
    fed). When the generator is exhausted, the engine has consumed the prompt and every yielded
    token; when the caller stops early, all but the last yielded token. `sampler` takes
    log-probabilities [1, V] (mlx-lm's convention); logits processors take (tokens so far,
    logits)."""
    prompt = [int(t) for t in prompt_ids]
    engine.model.check_ids(mx.array(prompt, dtype=mx.int32))
    if not prompt:
        raise ValueError("the prompt is empty: generation needs at least one token")
    stop = {int(t) for t in stop_ids}
    processors = list(logits_processors or [])
    history = mx.array(prompt)
    logits = last_logits(engine, prompt)
    for _ in range(max_tokens):
        for process in processors:
            logits = process(history, logits)
        if sampler is None:
            token = int(mx.argmax(logits, axis=-1).item())
        else:
            token = int(sampler(logits - mx.logsumexp(logits, axis=-1, keepdims=True)).item())
        if token in stop:
            return
        yield token
        if processors:
            history = mx.concatenate([history, mx.array([token])])
        logits = last_logits(engine, [token])


def stream_text(engine, tokenizer, prompt_ids: Sequence[int], max_tokens: int,
                stop_ids: Optional[Iterable[int]] = None, **kwargs) -> Iterator[str]:
    """`stream_generate` as text pieces, through the tokenizer's streaming detokenizer (pieces
    end on whole characters). `stop_ids` defaults to the tokenizer's eos ids."""
    stop_ids = tokenizer.eos_token_ids if stop_ids is None else stop_ids
    detokenizer = tokenizer.detokenizer
    detokenizer.reset()
    for token in stream_generate(engine, prompt_ids, max_tokens, stop_ids=stop_ids, **kwargs):
        detokenizer.add_token(token)
        piece = detokenizer.last_segment  # reading it consumes it
        if piece:
            yield piece
    detokenizer.finalize()
    piece = detokenizer.last_segment
    if piece:
        yield piece


def generate(engine, tokenizer, prompt_ids: Sequence[int], max_tokens: int, **kwargs) -> str:
    """The generated text (see `stream_text`)."""
    return "".join(stream_text(engine, tokenizer, prompt_ids, max_tokens, **kwargs))
