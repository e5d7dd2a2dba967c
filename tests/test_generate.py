"""Generation over the sleep engine: greedy tokens are an independent reference's greedy choices
(a plain forward without eviction; Algorithm 1 over the whole prefix with forced sleeps), on
every tiny model kind."""

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.sample_utils import make_logits_processors, make_sampler

import mlx_sleep
from mlx_sleep import SleepConfig, SleepEngine, sleep_forward
from mlx_sleep.generate import generate, stream_generate, stream_text

from .numerics import assert_close
from .tiny_models import KINDS, make_model_dir


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {k: mlx_sleep.load(make_model_dir(root / k, k)) for k in KINDS}


PROMPT = [72, 101, 108, 108, 111, 44, 32, 119, 111, 114, 108, 100]


def reference_logits(model, seq, sleep):
    """The next token's logits from a fresh Algorithm 1 run over the whole prefix: fixed-grid
    windows, every completed window slept on (N passes) and evicted, the live one in one pass."""
    mask = np.zeros((1, len(seq)), bool)
    mask[0, -1] = True
    answers, _ = sleep_forward(model, mx.array([seq]), mask, sleep)
    return answers[-1][2][0, -1]


def assert_greedy(got, prompt, next_logits):
    """Each generated token has the reference's largest logit after its prefix (teacher-forced),
    up to rounding: 1e-5 of the logits' scale, as another computation order may break a near-tie
    the other way."""
    for i, token in enumerate(got):
        logits = next_logits(list(prompt) + list(got[:i]))
        assert_close(
            logits[token],
            logits.max(),
            rtol=1e-5,
            scale=float(mx.abs(logits).max()),
            what=f"logit of generated token {i} vs the largest",
        )


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_without_eviction_equals_plain_forward(tiny, kind):
    model, _ = tiny[kind]
    engine = SleepEngine(model, SleepConfig(loops=1, window=64))
    got = list(stream_generate(engine, PROMPT, 8))
    assert len(got) == 8
    assert_greedy(got, PROMPT, lambda seq: model(mx.array([seq]))[0, -1])
    assert engine.offset == len(PROMPT) + 8 and engine.sleeps == 0


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("eviction", ["hard", "sliding"])
def test_greedy_with_forced_sleeps_equals_algorithm_1(tiny, kind, eviction):
    model, _ = tiny[kind]
    sleep = SleepConfig(loops=3, window=5, eviction=eviction)
    engine = SleepEngine(model, sleep)
    got = list(stream_generate(engine, PROMPT, 6))
    assert engine.sleeps == (len(PROMPT) + 6 - 1) // 5  # it slept whenever the window filled
    assert len(got) == 6
    assert_greedy(got, PROMPT, lambda seq: reference_logits(model, seq, sleep))


def test_stop_ids_sampler_and_logits_processors(tiny):
    model, tokenizer = tiny["hybrid"]
    sleep = SleepConfig(loops=2, window=6)
    greedy = list(stream_generate(SleepEngine(model, sleep), PROMPT, 6))
    stopped = list(stream_generate(SleepEngine(model, sleep), PROMPT, 6, stop_ids=[greedy[3]]))
    assert stopped == greedy[: greedy.index(greedy[3])]
    # mlx-lm's samplers and processors plug in: a temperature-0 sampler is greedy, a large
    # logit bias forces its token every time
    assert (
        list(stream_generate(SleepEngine(model, sleep), PROMPT, 6, sampler=make_sampler(temp=0.0)))
        == greedy
    )
    forced = next(t for t in range(65, 91) if t not in greedy)
    biased = stream_generate(
        SleepEngine(model, sleep),
        PROMPT,
        4,
        logits_processors=make_logits_processors(logit_bias={forced: 1e4}),
    )
    assert list(biased) == [forced] * 4
    # a sampler sees log-probabilities: sampling at temperature 1 from a fixed seed is
    # reproducible, and differs from greedy on a random model over 20 tokens
    runs = []
    for _ in range(2):
        mx.random.seed(5)
        runs.append(
            list(
                stream_generate(
                    SleepEngine(model, sleep), PROMPT, 20, sampler=make_sampler(temp=1.0)
                )
            )
        )
    assert runs[0] == runs[1]
    assert runs[0] != list(stream_generate(SleepEngine(model, sleep), PROMPT, 20))


def test_engine_consumes_the_prompt_and_every_yielded_token(tiny):
    model, _ = tiny["jet_nemotron"]
    engine = SleepEngine(model, SleepConfig(loops=2, window=7))
    tokens = list(stream_generate(engine, PROMPT, 5))
    assert len(tokens) == 5 and engine.offset == len(PROMPT) + 5
    early = SleepEngine(model, SleepConfig(loops=2, window=7))
    for _ in zip(range(2), stream_generate(early, PROMPT, 5)):
        pass  # the caller stops after two tokens: both were fed before they were yielded
    assert early.offset == len(PROMPT) + 2


def step_by_step(model, sleep, n, stop=()):
    """The decode loop without pipelining: read each token, then feed it (the reference)."""
    engine = SleepEngine(model, sleep)
    logits, tokens = engine.feed(mx.array([PROMPT]), logits="last"), []
    for _ in range(n):
        token = int(mx.argmax(logits[0, -1]).item())
        if token in stop:
            break
        tokens.append(token)
        logits = engine.feed(mx.array([[token]]), logits="last")
    return engine, tokens


def assert_same_engine(got, want):
    assert (got.offset, got.sleeps, got.window_start) == (
        want.offset,
        want.sleeps,
        want.window_start,
    )
    assert mx.array_equal(
        mx.concatenate(got.window_ids, axis=1), mx.concatenate(want.window_ids, axis=1)
    )
    for (name, a), (_, b) in zip(tree_flatten(got.state), tree_flatten(want.state)):
        assert_close(a, b, rtol=1e-5, what=name)


@pytest.mark.parametrize("stop_at", [None, 0, 2, 3, 4, 7])
def test_pipelined_decode_is_the_step_by_step_loop_and_a_stop_token_is_taken_back(tiny, stop_at):
    """mx.async_eval queues the step after each token before the token is read; the tokens, the
    sleeps and the engine state are the step-by-step loop's. A stop token, whether its step was
    queued ahead (taken back with engine.undo) or waited for at a full window, is never fed."""
    model, _ = tiny["hybrid"]
    sleep = SleepConfig(loops=2, window=5)  # the 12-token prompt leaves 2 in the window: full
    # after 3 generated tokens, so steps 0-2 run ahead, step 3 waits, and so on
    _, greedy = step_by_step(model, sleep, 9)
    stop = () if stop_at is None else (greedy[stop_at],)
    want, want_tokens = step_by_step(model, sleep, 9, stop)
    engine = SleepEngine(model, sleep)
    assert list(stream_generate(engine, PROMPT, 9, stop_ids=stop)) == want_tokens
    assert_same_engine(engine, want)


def test_undo_takes_back_feeds_within_a_window_and_refuses_across_a_sleep(tiny):
    model, _ = tiny["hybrid"]
    engine = SleepEngine(model, SleepConfig(loops=2, window=5))
    engine.feed(mx.array([PROMPT[:3]]))
    before = engine.mark()
    engine.feed(mx.array([PROMPT[3:5]]))
    engine.undo(before)
    want = SleepEngine(model, SleepConfig(loops=2, window=5))
    want.feed(mx.array([PROMPT[:3]]))
    assert_same_engine(engine, want)
    engine.feed(mx.array([PROMPT[3:8]]))  # fills the window and sleeps
    with pytest.raises(RuntimeError, match="across a consolidation"):
        engine.undo(before)


def test_text_is_the_detokenized_tokens(tiny):
    model, tokenizer = tiny["ouro_jet"]
    prompt = tokenizer.encode(
        tokenizer.apply_chat_template(
            [{"role": "user", "content": "2 + 2 = ?"}], add_generation_prompt=True, tokenize=False
        ),
        add_special_tokens=False,
    )
    sleep = SleepConfig(loops=2, window=16)
    tokens = list(
        stream_generate(SleepEngine(model, sleep), prompt, 12, stop_ids=tokenizer.eos_token_ids)
    )
    pieces = list(stream_text(SleepEngine(model, sleep), tokenizer, prompt, 12))
    assert "".join(pieces) == tokenizer.decode(tokens)
    assert generate(SleepEngine(model, sleep), tokenizer, prompt, 12) == "".join(pieces)


def test_bad_prompts_give_one_clear_line(tiny):
    model, _ = tiny["hybrid"]
    with pytest.raises(ValueError, match="token id 512 is outside the vocabulary of 512"):
        next(stream_generate(SleepEngine(model), [1, 512], 3))
    with pytest.raises(ValueError, match="prompt is empty"):
        next(stream_generate(SleepEngine(model), [], 3))
