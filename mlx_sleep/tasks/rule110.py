"""Rule 110: predict the first bit of each of several random bit strings after t steps of
the Rule 110 cellular automaton, after the strings have been evicted from the KV cache.

Token layout (defaults n_strings=4, n_bits=24, so T = 4*24 + 4 = 100):

    s0[0] .. s0[23]  s1[0] .. s1[23]  s2[..]  s3[..]  ?0  ?1  ?2  ?3
    '--- chunk 0 --' '--- chunk 1 --'  ...             '- answers -'

  * token ids: 0 -> "0", 1 -> "1", 2 + i -> "?i" (vocab = 2 + n_strings = 6).
  * each string fills exactly one sleep window (window = n_bits), so with hard eviction
    every string has left the KV cache before the first query arrives; only the fast
    weights carry them.
  * the query token "?i" has its own id so the model knows which string is asked; the
    model is scored at the "?i" position against bit 0 of string i after t steps.
    There is no separate delimiter: the first query token marks the end of the context.
  * difficulty = t, one t per sequence (all queries of a sequence share it).

Boundary (the paper leaves it open): "ring" (periodic) is the default. With "zero"
(cells outside the string are 0), bit 0 always has a 0 left neighbour, and Rule 110 with
left = 0 is `center OR right`: once bit 0 is 1 it stays 1, so after a handful of steps the
label is almost always 1 (>= 98% at t >= 8) and a constant predictor scores well. The ring
keeps the labels balanced and, for t >= n_bits / 2, makes bit 0 depend on every bit of the
string (the light cone of Rule 110 grows one cell per step on each side).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..config import check_int
from .base import MAX_SIZE, Batch, Task, check_choice

RULE = 110
DEFAULT_EVAL_STEPS = (1, 2, 4, 8, 16, 32)


def rule110_step(state: np.ndarray, boundary: str = "ring") -> np.ndarray:
    """One Rule 110 update of every row of `state` (0/1 array [..., n_bits]).

    new[i] = bit (4*left + 2*center + right) of the rule number 110, i.e.
    111->0 110->1 101->1 100->0 011->1 010->1 001->1 000->0.
    """
    left = np.roll(state, 1, axis=-1)  # left[i] = state[i - 1]
    right = np.roll(state, -1, axis=-1)  # right[i] = state[i + 1]
    if boundary == "zero":
        left[..., 0] = 0
        right[..., -1] = 0
    elif boundary != "ring":
        raise ValueError(f"boundary must be 'ring' or 'zero' (got {boundary!r})")
    pattern = 4 * left + 2 * state + right
    return ((RULE >> pattern) & 1).astype(state.dtype)


def rule110_run(state: np.ndarray, steps, boundary: str = "ring") -> np.ndarray:
    """Run Rule 110 for `steps` steps. `steps` is an int or an int array broadcastable
    to state.shape[:-1] (one step count per row); rows stop updating at their own count."""
    state = np.asarray(state)
    steps = np.broadcast_to(np.asarray(steps), state.shape[:-1])
    for s in range(int(steps.max(initial=0))):
        active = (s < steps)[..., None]
        state = np.where(active, rule110_step(state, boundary), state)
    return state


@dataclass(frozen=True)
class Rule110(Task):
    """Settings of the Rule 110 task; see the module docstring for the layout."""

    n_strings: int = 4
    n_bits: int = 24
    steps: int = 32  # training t
    steps_range: tuple[int, int] | None = None  # sample t uniformly in [lo, hi] per sequence
    boundary: str = "ring"
    eval_steps: tuple[int, ...] | None = None  # None -> (1,2,4,8,16,32) up to the max train t
    eviction: str = "hard"

    name = "rule110"

    def __post_init__(self):
        check_int("n_strings", self.n_strings, 1)
        check_int("n_bits", self.n_bits, 3, MAX_SIZE)
        check_int("steps", self.steps, 0, MAX_SIZE)
        if self.n_strings > self.n_bits:
            raise ValueError(
                f"n_strings must be <= n_bits so the {self.n_strings} query tokens fit in "
                f"one window of {self.n_bits} (got n_strings={self.n_strings}, n_bits={self.n_bits})"
            )
        check_choice("boundary", self.boundary, {"ring", "zero"})
        check_choice("eviction", self.eviction, {"hard", "sliding"})
        if self.steps_range is not None:
            r = tuple(self.steps_range) if isinstance(self.steps_range, (list, tuple)) else ()
            if len(r) != 2:
                raise ValueError(f"steps_range must be (min, max) (got {self.steps_range!r})")
            check_int("steps_range[0]", r[0], 0)
            check_int("steps_range[1]", r[1], r[0], MAX_SIZE)
            object.__setattr__(self, "steps_range", (int(r[0]), int(r[1])))
        if self.eval_steps is None:
            top = self.max_steps
            ev = sorted({t for t in DEFAULT_EVAL_STEPS if t <= top} | {top})
        else:
            if not isinstance(self.eval_steps, (list, tuple)) or len(self.eval_steps) > 64:
                raise ValueError(
                    f"eval_steps must be a list of at most 64 step counts, e.g. "
                    f"[1,2,4] (got {self.eval_steps!r})"
                )
            for t in self.eval_steps:
                check_int("eval_steps entries", t, 0, MAX_SIZE)
            ev = [int(t) for t in self.eval_steps]
            if not ev:
                raise ValueError("eval_steps must not be empty")
        object.__setattr__(self, "eval_steps", tuple(ev))
        work = self.n_strings * self.n_bits * max(self.max_steps, *ev)
        if work > 1 << 24:  # cell updates to make one sequence
            raise ValueError(
                f"n_strings x n_bits x steps = {work:,} cell updates per sequence is "
                f"more than {1 << 24:,}; choose smaller settings"
            )

    @property
    def max_steps(self) -> int:
        return self.steps_range[1] if self.steps_range is not None else self.steps

    @property
    def context_len(self) -> int:
        return self.n_strings * self.n_bits

    @property
    def seq_len(self) -> int:
        return self.context_len + self.n_strings

    @property
    def vocab_size(self) -> int:
        return 2 + self.n_strings

    @property
    def window(self) -> int:
        return self.n_bits

    @property
    def eval_difficulties(self) -> tuple[int, ...]:
        return self.eval_steps

    def token_names(self) -> list[str]:
        return ["0", "1"] + [f"?{i}" for i in range(self.n_strings)]

    def labels(self, strings: np.ndarray, steps) -> np.ndarray:
        """Bit 0 of each string after `steps` steps: strings [B, n_strings, n_bits] ->
        [B, n_strings]; `steps` is an int or one int per sequence [B]."""
        steps = np.asarray(steps)
        if steps.ndim == 1:
            steps = steps[:, None]
        return rule110_run(strings, steps, self.boundary)[..., 0]

    def sample(
        self, rng: np.random.Generator, batch_size: int, difficulty: int | None = None
    ) -> Batch:
        B, n, nb = batch_size, self.n_strings, self.n_bits
        strings = rng.integers(0, 2, size=(B, n, nb), dtype=np.int32)
        if difficulty is not None:
            check_int("difficulty (Rule 110 steps t)", difficulty, 0)
            t = np.full(B, difficulty, dtype=np.int32)
        elif self.steps_range is not None:
            lo, hi = self.steps_range
            t = rng.integers(lo, hi + 1, size=B, dtype=np.int32)
        else:
            t = np.full(B, self.steps, dtype=np.int32)

        C = self.context_len
        inputs = np.empty((B, self.seq_len), dtype=np.int32)
        inputs[:, :C] = strings.reshape(B, C)
        inputs[:, C:] = 2 + np.arange(n, dtype=np.int32)

        targets = np.zeros((B, self.seq_len), dtype=np.int32)
        targets[:, C:] = self.labels(strings, t)
        mask = np.zeros((B, self.seq_len), dtype=np.float32)
        mask[:, C:] = 1.0
        diff = np.full((B, self.seq_len), -1, dtype=np.int32)
        diff[:, C:] = t[:, None]
        return Batch(inputs, targets, mask, diff)

    def describe(self) -> str:
        if self.steps_range is not None:
            t = f"t uniform in [{self.steps_range[0]}, {self.steps_range[1]}] per sequence"
        else:
            t = f"t = {self.steps}"
        return (
            f"Rule 110: {self.n_strings} random {self.n_bits}-bit strings (tokens '0'/'1') "
            f"concatenated ({self.context_len} tokens), then {self.n_strings} query tokens "
            f"'?0'..'?{self.n_strings - 1}' (one id per string, no other delimiter); T = "
            f"{self.seq_len}, vocab = {self.vocab_size}. The target at query '?i' is bit 0 of "
            f"string i after t steps of Rule 110 ({t}; one t per sequence, the difficulty), "
            f"with '{self.boundary}' boundary. Ring is the default because with zero boundary "
            f"bit 0 follows 'center OR right' and the label is almost always 1 after a few "
            f"steps; the ring keeps labels balanced and makes them depend on the whole string "
            f"once t >= n_bits/2. Window L = n_bits = {self.window}: each string is one sleep "
            f"chunk and, under {self.eviction} eviction, is gone from the KV cache before the "
            f"queries, which form the single answer chunk. Evaluated at t in {self.eval_steps}."
        )
