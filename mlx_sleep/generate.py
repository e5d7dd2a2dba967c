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

import time
from typing import Callable, Iterable, Iterator, List, Optional, Sequence

import mlx.core as mx

from .report import show_bytes
from .sleep import SleepCancelled
from .tokens import encode_more, encode_start


def last_logits(engine, ids: Sequence[int]) -> mx.array:
    """Feed `ids` (at least one) and return the logits [1, V] after the last of them."""
    return engine.feed(mx.array([list(ids)]), logits="last")[:, -1, :]


def stream_generate(
    engine,
    prompt_ids: Sequence[int],
    max_tokens: int,
    sampler: Optional[Callable[[mx.array], mx.array]] = None,
    logits_processors: Optional[Iterable[Callable]] = None,
    stop_ids: Iterable[int] = (),
) -> Iterator[int]:
    """Feed the prompt to `engine`, then yield up to `max_tokens` generated token ids.

    Stops before yielding a token in `stop_ids` (the stop token itself is neither yielded nor
    fed). Every yielded token has been fed to the engine, so wherever the caller stops, the
    engine holds the prompt and what it was given. `sampler` takes log-probabilities [1, V]
    (mlx-lm's convention); logits processors take (tokens so far, logits).

    Pipelined like mlx-lm's generate_step: the step after token n is queued (mx.async_eval) on
    the still-lazy token n before token n is read, so the model computes while the caller
    handles token n. If token n turns out to be a stop id, that step is taken back
    (engine.undo). A step that must first sleep (the window is full) waits for its token
    instead: a sleep cannot be taken back."""
    prompt = [int(t) for t in prompt_ids]
    engine.model.check_ids(mx.array(prompt, dtype=mx.int32))
    if not prompt:
        raise ValueError("the prompt is empty: generation needs at least one token")
    stop = {int(t) for t in stop_ids}
    processors = list(logits_processors or [])
    history = mx.array(prompt)

    def sample(logits):
        for process in processors:
            logits = process(history, logits)
        if sampler is None:
            return mx.argmax(logits, axis=-1)
        return sampler(logits - mx.logsumexp(logits, axis=-1, keepdims=True))

    def feed_and_queue(token, last: bool):
        """Feed `token` [1] (maybe lazy); unless it is the last, queue the next token."""
        nonlocal history
        if processors:
            history = mx.concatenate([history, token])
        logits = engine.feed(token[None], logits=None if last else "last", sampled=True)
        if last:
            return None
        following = sample(logits[:, -1, :])
        mx.async_eval(following)
        return following

    if max_tokens <= 0:
        engine.feed(mx.array([prompt]), logits=None)
        return
    token = sample(last_logits(engine, prompt))
    mx.async_eval(token)
    for n in range(max_tokens):
        last = n + 1 == max_tokens
        ahead = engine.window_len < engine.sleep.window  # no sleep before this feed
        if ahead:
            mark = engine.mark()
            following = feed_and_queue(token, last)
        value = token.item()
        if value in stop:
            if ahead:
                engine.undo(mark)
            return
        if not ahead:
            following = feed_and_queue(token, last)
        yield value
        token = following


def stream_text(
    engine,
    tokenizer,
    prompt_ids: Sequence[int],
    max_tokens: int,
    stop_ids: Optional[Iterable[int]] = None,
    **kwargs,
) -> Iterator[str]:
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


# -- replies: text with stop strings, interruption and timing ------------------------------------


class Reply:
    """What `stream_reply` produced: token ids (all fed to the engine), the text shown, why it
    stopped ("eos", "max_tokens", "stop" or "interrupted": by the caller, or a forced sleep
    cancelled), and the seconds to the first token (the prompt's wake pass, and any sleep it
    forced) and from there to the last."""

    def __init__(self):
        self.tokens, self.text, self.stopped = [], "", None
        self.prompt_seconds = self.generation_seconds = 0.0

    def speed(self, prompt_tokens: int) -> str:
        """ "12 prompt tokens at 240.1 tok/s, 40 generated at 31.2 tok/s, peak memory 1.21 GB"
        (mlx_lm's numbers; the peak since the caller's mx.reset_peak_memory())."""

        def rate(n, seconds):
            return f"{n / seconds:.1f} tok/s" if seconds > 0 else "- tok/s"

        generated, peak = len(self.tokens), mx.get_peak_memory()
        return (
            f"{prompt_tokens} prompt tokens at {rate(prompt_tokens, self.prompt_seconds)}, "
            f"{generated} generated at {rate(max(0, generated - 1), self.generation_seconds)}, "
            f"peak memory {show_bytes(peak)}"
        )


def make_sampling(temp=0.0, top_p=0.0, top_k=0, min_p=0.0, repetition_penalty=None):
    """(sampler, logits_processors) from mlx-lm's own constructors; temp 0 is greedy."""
    from mlx_lm.sample_utils import make_logits_processors, make_sampler

    sampler = make_sampler(temp=temp, top_p=top_p, top_k=top_k, min_p=min_p) if temp > 0 else None
    return sampler, make_logits_processors(repetition_penalty=repetition_penalty)


def stream_reply(
    engine,
    tokenizer,
    prompt_ids: Sequence[int],
    max_tokens: int,
    stop_strings: Sequence[str] = (),
    interrupted: Callable[[], bool] = lambda: False,
    reply: Optional[Reply] = None,
    **kwargs,
) -> Iterator[str]:
    """`stream_text` that also stops at any of `stop_strings` (not shown; text that could
    begin one is held back until it cannot) and when `interrupted()` turns true (checked
    between tokens). Fills `reply` as it goes."""
    reply = Reply() if reply is None else reply
    stop_strings = [s for s in stop_strings if s]
    hold = max((len(s) for s in stop_strings), default=1) - 1
    detokenizer = tokenizer.detokenizer
    detokenizer.reset()
    shown, full = 0, ""
    tokens = stream_generate(
        engine, prompt_ids, max_tokens, stop_ids=tokenizer.eos_token_ids, **kwargs
    )
    reply.stopped = "max_tokens"
    start = first = time.perf_counter()
    try:
        for token in tokens:
            if not reply.tokens:
                first = time.perf_counter()
            reply.tokens.append(token)
            detokenizer.add_token(token)
            full += detokenizer.last_segment
            cut = min(
                (i for i in (full.find(s, max(0, shown - hold)) for s in stop_strings) if i >= 0),
                default=-1,
            )
            if cut >= 0:
                reply.stopped, full = "stop", full[:cut]
                break
            if interrupted():
                reply.stopped = "interrupted"
                break
            if len(full) - hold > shown:
                yield full[shown : len(full) - hold]
                shown = len(full) - hold
        else:
            if len(reply.tokens) < max_tokens:
                reply.stopped = "eos"
    except SleepCancelled:  # a forced sleep stopped by the caller: the window is still full
        reply.stopped = "interrupted"
    end = time.perf_counter()
    if not reply.tokens:
        first = end
    reply.prompt_seconds, reply.generation_seconds = first - start, end - first
    if reply.stopped != "stop":
        detokenizer.finalize()
        full += detokenizer.last_segment
    if len(full) > shown:
        yield full[shown:]
    reply.text = full


def chat_prompt(tokenizer, messages) -> str:
    """The conversation rendered by the tokenizer's chat template, ready for the assistant;
    without a template, the messages as plain lines."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "


def prompt_ids(
    tokenizer, prompt: str, system_prompt: Optional[str] = None, chat_template: bool = True
) -> List[int]:
    """The ids of one user prompt: through the chat template (with the system prompt; the
    template writes its own BOS), or raw, starting the sequence (tokens.py)."""
    if not chat_template:
        return encode_start(tokenizer, prompt)
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return encode_more(
        tokenizer, chat_prompt(tokenizer, system + [{"role": "user", "content": prompt}])
    )


def generate_text(
    model,
    tokenizer,
    prompt: str,
    max_tokens: int = 256,
    sleep=None,
    system_prompt: Optional[str] = None,
    chat_template: bool = True,
    stop: Sequence[str] = (),
    seed: Optional[int] = None,
    **sampling,
) -> str:
    """One prompt in, the reply out: the chat template (unless `chat_template=False`), a fresh
    SleepEngine with the model's sleep settings (or `sleep`), mlx-lm sampling (`temp`, `top_p`,
    `top_k`, `min_p`, `repetition_penalty`; greedy by default)."""
    from .sleep import SleepEngine

    if seed is not None:
        mx.random.seed(seed)
    ids = prompt_ids(tokenizer, prompt, system_prompt, chat_template)
    sampler, processors = make_sampling(**sampling)
    engine = SleepEngine(model, sleep)
    return "".join(
        stream_reply(
            engine, tokenizer, ids, max_tokens, stop, sampler=sampler, logits_processors=processors
        )
    )
