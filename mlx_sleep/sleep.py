"""The sleep engine: Algorithm 1 of "Language Models Need Sleep", in one place.

Everything that sleeps goes through `run_chunk` (prelude once, core N times, coda once) and
`evict`: the training loss (`sleep_loss`, and `sleep_value_and_grad`, its memory-bounded gradient
that recomputes one chunk, or one block application, at a time), evaluation (`sleep_forward`)
and incremental inference (`SleepEngine`). That is what makes inference equal training: a consolidated window's state is
computed by the same function, from the same chunk-start state, as in training.

Algorithm 1, for a sequence split into chunks of length <= L:

    S <- 0
    for each chunk c:
        h <- Embed(c)
        if c holds no scored targets:   repeat N times: h, S <- Blocks(h, S)     (sleep)
        else:                           h, S <- Blocks(h, S); loss += CE(Head(h))  (one pass)
        evict the chunk's KV (hard: all of it; sliding: all but the last L-1 tokens)

Within the N passes over a chunk, pass n+1 takes pass n's output features; the fast weights S
(every state entry a layer lists in `carried`) carry over from pass to pass, while the attention
KV and the short-conv state restart from their chunk-start values (same tokens, same positions).
"""

import weakref
from dataclasses import replace
from typing import Callable, List, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from .config import MAX_PENDING, SleepConfig

State = List[dict]  # one dict of arrays per layer


def chunk_bounds(
    length: int, window: int, rng: Optional[np.random.Generator] = None, min_len: int = 1
) -> List[Tuple[int, int]]:
    """Split [0, length) into chunks of at most `window` tokens.

    Without `rng` the chunks are the fixed grid 0, L, 2L, ... With `rng` each chunk length is drawn
    uniformly from [min_len, L], so a model trained that way also works when inference sleeps
    before a window is full (an idle sleep)."""
    if window < 1:
        raise ValueError(f"window must be >= 1 (got {window})")
    bounds, start = [], 0
    while start < length:
        size = window if rng is None else int(rng.integers(min(min_len, window), window + 1))
        bounds.append((start, min(start + size, length)))
        start += size
    return bounds


def call(fn, *args):
    """Run one step of a chunk (the embedding, a block, the head, an eviction): `fn(*args)`."""
    return fn(*args)


def restart(mixer, chunk_start: dict, current: dict) -> dict:
    """The state a layer starts a sleep pass with: chunk-start state, fast weights carried."""
    return {**chunk_start, **{name: current[name] for name in mixer.carried}}


def run_chunk(
    model,
    ids,
    state: State,
    offset: int,
    passes: int,
    window: Optional[int] = None,
    after_pass: Optional[Callable[[int, State], None]] = None,
    core_out: Optional[list] = None,
    apply: Callable = call,
):
    """Run one chunk: prelude blocks once, core blocks `passes` times, coda blocks once.

    ids [B, T] at global positions offset..offset+T-1; `window` bounds attention (sliding
    eviction). `after_pass(n, state)` is called after core pass n (used to evaluate and cancel
    between passes). `core_out`, a list, receives the core's output features after the first
    pass (what `continue_passes` needs). `after_pass` returning True stops the core after that
    pass (a stopping rule: `converged`); the coda runs on that pass's features. `apply(fn,
    *args)` runs each step (the embedding, each block): `call` by default, a `_Tape`'s `step`
    to record them for `sleep_value_and_grad`'s block-by-block backward. Returns
    (features h [B, T, D], new state)."""
    layers = model.sleep_blocks()
    start, stop = model.core
    state = list(state)
    h = apply(model.embed, ids)
    for i in range(start):
        h, state[i] = apply(layers[i], h, state[i], offset, window)
    chunk_start = state[start:stop]
    for n in range(passes):
        for i in range(start, stop):
            s = state[i] if n == 0 else restart(layers[i].mixer, chunk_start[i - start], state[i])
            h, state[i] = apply(layers[i], h, s, offset, window)
        if n == 0 and core_out is not None:
            core_out.append(h)
        if after_pass is not None and after_pass(n, state):
            break
    for i in range(stop, len(layers)):
        h, state[i] = apply(layers[i], h, state[i], offset, window)
    return h, state


def continue_passes(
    model,
    core_h,
    first_state: State,
    chunk_start: State,
    offset: int,
    passes: int,
    window: Optional[int] = None,
    after_pass: Optional[Callable[[int, State], None]] = None,
    apply: Callable = call,
) -> State:
    """`run_chunk(model, ids, chunk_start, offset, passes)`'s state, given its first pass
    already run (the wake pass): `core_h` the core's output features of that pass and
    `first_state` the state after it. The prelude ran once already, the core runs passes
    2..N carrying the fast weights on, the coda runs once from its chunk-start state on the
    last pass's features. It saves one pass of the N + 1 a window otherwise costs (wake, then
    sleep); the result is the recomputed one bit for bit when the wake pass ran the window in
    one piece (benchmarks/chat.py (e) measures both). `apply`: as in `run_chunk`."""
    layers = model.sleep_blocks()
    start, stop = model.core
    state, h = list(first_state), core_h
    for n in range(1, passes):
        for i in range(start, stop):
            s = restart(layers[i].mixer, chunk_start[i], state[i])
            h, state[i] = apply(layers[i], h, s, offset, window)
        if after_pass is not None and after_pass(n, state):
            break
    for i in range(stop, len(layers)):
        h, state[i] = apply(layers[i], h, chunk_start[i], offset, window)
    return state


def fast_weight_change(model, before: State, after: State) -> float:
    """||S_after - S_before|| / ||S_before|| over every carried entry of the looped core (the
    fast weights a sleep pass refines); inf when there is nothing to compare against."""
    start, stop = model.core
    diff = total = 0.0
    for block, a, b in zip(model.sleep_blocks()[start:stop], before[start:stop], after[start:stop]):
        for name in block.mixer.carried:
            x, y = a[name].astype(mx.float32), b[name].astype(mx.float32)
            diff += float(mx.sum(mx.square(y - x)))
            total += float(mx.sum(mx.square(x)))
    return (diff / total) ** 0.5 if total > 0 else float("inf")


def converged(model, start: State, tolerance: float) -> Callable[[int, State], bool]:
    """A stopping rule for `after_pass`: True once pass n (n >= 2) changed the fast weights by
    less than `tolerance` (relative norm of S_n - S_(n-1), `fast_weight_change`), the fixed
    point a deeper sleep would not move. `start`: the state before pass 1."""
    previous = [start]

    def stop(n: int, state: State) -> bool:
        change = fast_weight_change(model, previous[0], state) if n > 0 else float("inf")
        previous[0] = list(state)
        return change < tolerance

    return stop


def evict_layer(mixer, state: dict, keep: int) -> dict:
    return mixer.evict(state, keep)


def evict(model, state: State, keep: int, apply: Callable = call) -> State:
    """Clear the KV of everything but the last `keep` tokens; fast weights stay. One step per
    layer (see `run_chunk`): a layer that keeps nothing (attention under hard eviction) is a
    step without results, which a tape need not keep its KV for."""
    return [
        apply(evict_layer, block.mixer, s, keep) for block, s in zip(model.sleep_blocks(), state)
    ]


def plan_chunks(mask, window: int, rng: Optional[np.random.Generator] = None, min_len: int = 1):
    """Chunk bounds and, per chunk and row, whether the row scores a target in it (an answer
    chunk of that row: one pass) or not (a context chunk: sleep). mask [B, T] numpy. Each row
    has its own plan: in a batch of prompts of different lengths, a row's context is slept on
    even where another row's answer has begun. Per chunk a tuple of B bools (hashable: a
    compiled step is cached by its plan); `sleep_forward` also takes one bool for all rows."""
    mask = np.asarray(mask)
    bounds = chunk_bounds(mask.shape[1], window, rng, min_len)
    return bounds, [tuple(bool(x) for x in mask[:, a:b].any(axis=1)) for a, b in bounds]


def answer_rows(answer, batch_size: int) -> np.ndarray:
    """A plan entry (one bool, or one per row) as a bool per row."""
    return np.broadcast_to(np.asarray(answer, dtype=bool), (batch_size,))


def plan_rows(plan, rows: slice):
    """The plan of a slice of the batch's rows (a data-parallel process's share)."""
    bounds, is_answer = plan
    return bounds, [a if isinstance(a, bool) else tuple(a[rows]) for a in is_answer]


def select_rows(rows: np.ndarray, if_true: State, if_false: State) -> State:
    """Per row, one state or the other (every state array is batch-first)."""
    pick = mx.array(rows)
    return [
        {
            k: mx.where(pick.reshape((-1,) + (1,) * (v.ndim - 1)), v, if_false[i][k])
            for k, v in layer.items()
        }
        for i, layer in enumerate(if_true)
    ]


def sleep_forward(
    model,
    inputs,
    mask,
    sleep: SleepConfig,
    *,
    plan=None,
    state: Optional[State] = None,
    offset: int = 0,
    columns=None,
    tolerance: Optional[float] = None,
    passes_used: Optional[list] = None,
    apply: Callable = call,
):
    """Algorithm 1's forward over a batch of sequences.

    inputs [B, T] tokens; mask [B, T] nonzero where a target is scored. `plan` = (bounds,
    is_answer) from `plan_chunks` (computed from the mask when not given; pass it explicitly
    under mx.compile, where the mask is not concrete). A row's answer chunks get one pass, its
    context chunks `sleep.loops` passes; a chunk where rows differ runs pass 1 for all, and the
    sleeping rows go on from there (`continue_passes`), so each row is what it would be alone. Returns (answers, state): answers is a list of
    (start, stop, logits [B, stop-start, V]) for the answer chunks, state the final state.
    `columns`: one entry per answer chunk, the chunk-local positions whose logits are wanted
    (logits [B, len, V] then; None: all): the head of a 150k-word vocabulary over a 2,000-token
    chunk is gigabytes, and a loss needs only the scored positions.
    `tolerance`: sleep as deep as it helps, at most `sleep.loops` passes: a chunk's passes stop
    once one changes the fast weights (of the whole batch) by less than that (`converged`);
    `passes_used`, a list, receives the passes each sleeping chunk ran. `apply` runs every step
    that makes arrays (embedding, blocks, head, row selection, eviction): see `run_chunk`."""
    B, T = inputs.shape
    bounds, is_answer = plan if plan is not None else plan_chunks(mask, sleep.window)
    if bounds[-1][1] != T:
        raise ValueError(f"chunk plan covers {bounds[-1][1]} tokens, inputs have {T}")
    state = model.initial_state(B) if state is None else state
    window, keep = sleep.attention_window, sleep.keep_after_eviction
    answers = []
    for (a, b), answer in zip(bounds, is_answer):
        rows = answer_rows(answer, B)
        stop = converged(model, state, tolerance) if tolerance is not None else None
        ran = [0]

        def after_pass(n, new):
            ran[0] = n + 1
            return stop is not None and stop(n, new)

        ids = inputs[:, a:b]
        if rows.all() or not rows.any() or sleep.loops == 1:
            passes = 1 if rows.any() else sleep.loops
            h, state = run_chunk(
                model, ids, state, offset + a, passes, window, after_pass, apply=apply
            )
        else:  # some rows answer here (one pass), the others sleep: pass 1 is shared
            core = []
            h, first = run_chunk(
                model, ids, state, offset + a, 1, window, core_out=core, apply=apply
            )
            after_pass(0, first)
            slept = continue_passes(
                model, core[0], first, state, offset + a, sleep.loops, window, after_pass, apply
            )
            state = apply(select_rows, rows, first, slept)
        if passes_used is not None and not rows.all():
            passes_used.append(ran[0])
        if rows.any():
            cols = None if columns is None else columns[len(answers)]
            answers.append((a, b, apply(head_of_columns, model, h, cols)))
        state = evict(model, state, keep, apply)
    return answers, state


def head_of_columns(model, h, columns=None):
    """Logits of the features at `columns` (chunk-local positions; None: all of them)."""
    return model.head(h if columns is None else h[:, columns])


def _float_mask(mask) -> mx.array:
    return mask if isinstance(mask, mx.array) else mx.array(np.asarray(mask, dtype=np.float32))


def _ce_sum(logits, targets, mask) -> mx.array:
    """Summed masked cross-entropy of one answer chunk."""
    ce = nn.losses.cross_entropy(logits.astype(mx.float32), targets, reduction="none")
    return (ce * mask).sum()


def sleep_loss(model, inputs, targets, mask, sleep: SleepConfig, *, plan=None):
    """Masked cross-entropy of Algorithm 1, averaged over scored positions.

    targets[:, p] is what position p must predict (not shifted). Returns (loss, n_scored).
    For training with memory bounded to one chunk, use `sleep_value_and_grad` (wrapping chunks
    in mx.checkpoint does not bound it: one mx.eval of the whole graph keeps the forward
    intermediates alive; docs/training.md)."""
    if plan is None:
        plan = plan_chunks(mask, sleep.window)
    answers, _ = sleep_forward(model, inputs, None, sleep, plan=plan)
    mask = _float_mask(mask)
    total = mx.array(0.0)
    for a, b, logits in answers:
        total = total + _ce_sum(logits, targets[:, a:b], mask[:, a:b])
    n_scored = mask.sum()
    return total / mx.maximum(n_scored, 1.0), n_scored


def _flat_state(state: State):
    """(keys, arrays) of a state; keys (layer, name) rebuild it, empty dicts included."""
    keys = [(i, name) for i, s in enumerate(state) for name in sorted(s)]
    return keys, [state[i][name] for i, name in keys]


def _unflat_state(keys, arrays, n_layers: int) -> State:
    state = [{} for _ in range(n_layers)]
    for (i, name), a in zip(keys, arrays):
        state[i][name] = a
    return state


def _random_key() -> int:
    """MLX's global random key as one integer (dropout draws from it)."""
    hi, lo = mx.random.state[0].tolist()
    return (hi << 32) | lo


def _set_random_key(key: int):
    """Put the random key back: a recomputation then draws the dropout masks it drew before."""
    mx.random.seed(key)


def _arrays(tree) -> list:
    """The arrays of a step's arguments or results, in order: inside lists, tuples and dicts
    (not inside a module: a model passed to a step is a constant)."""
    if isinstance(tree, mx.array):
        return [tree]
    if isinstance(tree, nn.Module):
        return []
    if isinstance(tree, (list, tuple)):
        return [a for x in tree for a in _arrays(x)]
    if isinstance(tree, dict):
        return [a for x in tree.values() for a in _arrays(x)]
    return []


def _replace_arrays(tree, new: dict):
    """`tree` with each array whose id is in `new` replaced by new[id]."""
    if isinstance(tree, mx.array):
        return new.get(id(tree), tree)
    if isinstance(tree, nn.Module):
        return tree
    if isinstance(tree, (list, tuple)):
        return type(tree)(_replace_arrays(x, new) for x in tree)
    if isinstance(tree, dict):
        return {k: _replace_arrays(x, new) for k, x in tree.items()}
    return tree


class _Weights:
    """The model's trainable weights as one flat list (model.trainable_parameters()), put into
    the model by position (mx.vjp's tracers, then the arrays back) and found by the step that
    reads them."""

    def __init__(self, model):
        self.names, self.arrays = map(list, zip(*tree_flatten(model.trainable_parameters())))
        self.slots = []  # (module or list holding the weight, its key there)
        for name in self.names:
            *path, key = name.split(".")
            parent = model
            for part in path:
                parent = parent[int(part)] if isinstance(parent, list) else parent[part]
            self.slots.append((parent, int(key) if isinstance(parent, list) else key))
        self.cache = {}

    def set(self, positions, arrays):
        for k, a in zip(positions, arrays):
            parent, key = self.slots[k]
            parent[key] = a

    def read_by(self, fn) -> List[int]:
        """Positions of the weights step `fn` reads: a block's own (the block, or the modules a
        block wrapper holds: Ouro's unrolled blocks, the mlx-lm adapters' blocks), none for the
        state bookkeeping (select_rows, a layer's eviction, the loss), all for anything else (the
        embedding, the head)."""
        if any(fn is f for f in (select_rows, evict_layer, _ce_sum)):
            return []
        if isinstance(fn, nn.Module):
            modules = [fn]
        else:
            modules = [m for m in getattr(fn, "__dict__", {}).values() if isinstance(m, nn.Module)]
        if not modules:
            return list(range(len(self.arrays)))
        key = tuple(id(m) for m in modules)
        if key not in self.cache:
            ids = {id(a) for m in modules for _, a in tree_flatten(m.trainable_parameters())}
            self.cache[key] = [k for k, a in enumerate(self.arrays) if id(a) in ids]
        return self.cache[key]


class _Tape:
    """One chunk's forward, recorded step by step (embedding, each block application, head,
    row selection, eviction, loss), and its backward one step at a time.

    `step(fn, *args)` is the `apply` of run_chunk / continue_passes / sleep_forward: it runs
    fn(*args), evaluates the result and records (fn, args), so what stays alive is what passes
    between steps (features [B, T, D] and layer states), never what is inside a block.
    `backward` walks the steps in reverse, recomputing each under mx.vjp with respect to the
    weights it reads and the arrays it was given, and evaluates before the next: only one block
    application's activations are alive at a time.

    Cotangents are kept per array, by identity (id(); an array the tape tracks is alive, so its
    id is not reused). That is all the routing there is: `restart` hands pass n + 1 the very
    arrays of the chunk-start state (KV, conv) and of pass n's fast weights, evict passes S on
    unchanged, so each array's cotangent gathers from every step that read it. An argument
    array the tape did not see made (token ids, targets, the mask, columns) is a constant.

    A step's outputs are held weakly until the backward: one that nothing reads any more (an
    attention block's KV of a pass the next pass restarts from the chunk-start state, of a
    hard-evicted window) is freed during the forward, and takes a zero cotangent. Held
    strongly, those KVs were most of what an attention-heavy model (Ouro) kept per pass."""

    def __init__(self, weights: _Weights, inputs: list):
        self.weights = weights
        self.inputs = inputs  # the chunk-start state's arrays
        self.made = {id(a) for a in inputs}  # ids of the live arrays the tape tracks
        self.steps = []

    def step(self, fn, *args):
        key = _random_key()
        out = fn(*args)
        mx.eval(out)
        if not _arrays(out):  # nothing to differentiate (a layer's hard eviction)
            return out
        variables = [a for a in _arrays(args) if id(a) in self.made]
        made = self.made  # the callback holds the set, not the tape (no reference cycle)
        outs = [
            (weakref.ref(a, lambda _, i=id(a): made.discard(i)), a.shape, a.dtype)
            for a in _arrays(out)
        ]
        self.steps.append((fn, args, variables, outs, key))
        self.made.update(id(a) for a in _arrays(out))
        return out

    def backward(self, outputs: list, cotangents: list):
        """(gradients of the weights, cotangents of the inputs), given the cotangents of
        `outputs` (arrays the steps made)."""
        weights, ct = self.weights, {}

        def add(a, g):
            ct[id(a)] = g if id(a) not in ct else ct[id(a)] + g

        for a, g in zip(outputs, cotangents):
            add(a, g)
        grads = [None] * len(weights.arrays)
        # From here on the tape holds what is left strongly: a cotangent is keyed by its
        # array's id, which must not be reused while the cotangent waits.
        self.steps = [
            (fn, args, variables, [(ref(), shape, dtype) for ref, shape, dtype in outs], key)
            for fn, args, variables, outs, key in self.steps
        ]
        while self.steps:
            fn, args, variables, outs, key = self.steps.pop()
            # An array returned twice takes its cotangent once; one the step passed through
            # unchanged (evict's S) takes it here and hands it back below.
            # (A freed output, None here, was read by nothing.)
            out_ct, taken = [], set()
            for a, _, _ in outs:
                g = None
                if a is not None and id(a) not in taken:
                    g = ct.pop(id(a), None)
                    taken.add(id(a))
                out_ct.append(g)
            if all(g is None for g in out_ct):
                continue  # nothing after this step reaches the loss
            out_ct = [
                mx.zeros(shape, dtype) if g is None else g
                for g, (_, shape, dtype) in zip(out_ct, outs)
            ]
            read = weights.read_by(fn)
            n = len(read)

            def recompute(*arrays):
                weights.set(read, arrays[:n])
                new = {id(a): x for a, x in zip(variables, arrays[n:])}
                return _arrays(fn(*_replace_arrays(args, new)))

            _set_random_key(key)
            try:
                _, vjps = mx.vjp(recompute, [weights.arrays[k] for k in read] + variables, out_ct)
            finally:
                weights.set(read, [weights.arrays[k] for k in read])
            for k, g in zip(read, vjps[:n]):
                grads[k] = g if grads[k] is None else grads[k] + g
            for a, g in zip(variables, vjps[n:]):
                add(a, g)
            mx.eval([g for g in grads if g is not None], list(ct.values()))
        grads = [mx.zeros_like(p) if g is None else g for p, g in zip(weights.arrays, grads)]
        # An input listed twice is one array: its cotangent goes to the first place it has.
        input_ct = []
        for a in self.inputs:
            g = ct.pop(id(a), None)
            input_ct.append(mx.zeros_like(a) if g is None else g)
        return grads, input_ct


GRANULARITIES = ("chunk", "block")


def sleep_value_and_grad(
    model, inputs, targets, mask, sleep: SleepConfig, *, plan=None, granularity: str = "chunk"
):
    """`nn.value_and_grad(model, sleep_loss)` with activation checkpointing that really bounds
    memory: returns ((loss, n_scored), grads over model.trainable_parameters()).

    granularity "chunk": peak memory is about one chunk's activations (all its passes) plus the
    chunk-boundary states:
      1. forward, chunk by chunk, evaluating and keeping only the (evicted) state at each chunk
         boundary, up to the last answer chunk (later chunks cannot change the loss);
      2. backward, chunks in reverse: recompute each chunk from its saved start state under
         mx.vjp of (params, state_in) -> (its summed CE if an answer chunk, state_out), with
         cotangents 1/n_scored for the CE and the state cotangent the later chunk handed back;
         accumulate the parameter gradients, pass the state cotangent on, evaluate.
    granularity "block": the same, one level down: in step 2 each chunk is run forward once more
    keeping only what enters each block application (features and layer state; `_Tape`), then
    walked back one block application at a time. Peak memory is then one block application's
    activations plus those inputs (N x blocks features per chunk, of two chunks at most) plus
    the chunk-boundary states, for one more forward per chunk except the last two (the chunk
    before the last answer chunk is recorded in step 1 already).
    Each chunk is one call of `sleep_forward` (run_chunk + evict), so this is Algorithm 1 itself.
    It evaluates as it goes, so it cannot run under mx.compile. Token ids, targets and mask are
    constants; the loss is the same mean over scored positions as `sleep_loss`. Dropout draws
    the same masks when a chunk or block is recomputed (the random key is put back)."""
    if granularity not in GRANULARITIES:
        raise ValueError(
            f"granularity must be one of {', '.join(GRANULARITIES)} (got {granularity!r})"
        )
    if plan is None:
        plan = plan_chunks(mask, sleep.window)
    bounds, is_answer = plan
    if bounds[-1][1] != inputs.shape[1]:
        raise ValueError(f"chunk plan covers {bounds[-1][1]} tokens, inputs have {inputs.shape[1]}")
    mask = _float_mask(mask)
    n_scored = mask.sum()
    denom = mx.maximum(n_scored, 1.0)
    weights = _Weights(model)
    names, params = weights.names, weights.arrays
    n_params, n_layers = len(params), len(model.sleep_blocks())

    def set_params(arrays):
        weights.set(range(n_params), arrays)

    # The positions of each answer chunk that any row scores: only they go through the head.
    scored = np.asarray(mask).any(axis=0)
    columns = {
        c: mx.array(np.nonzero(scored[a:b])[0].astype(np.int32))
        for c, (a, b) in enumerate(bounds)
        if answer_rows(is_answer[c], inputs.shape[0]).any()
    }

    def chunk(c, state, apply=call):
        """Chunk c of the plan from `state`: (answers, evicted state), Algorithm 1 as is."""
        (a, b), answer = bounds[c], is_answer[c]
        return sleep_forward(
            model,
            inputs[:, a:b],
            None,
            sleep,
            plan=([(0, b - a)], [answer]),
            state=state,
            offset=a,
            columns=[columns.get(c)],
            apply=apply,
        )

    answer_chunks = list(columns)
    if not answer_chunks:
        return (mx.array(0.0), n_scored), tree_unflatten(
            list(zip(names, [mx.zeros_like(p) for p in params]))
        )
    last = answer_chunks[-1]

    def chunk_outputs(c, state, apply=call):
        """What chunk c hands on: its summed CE if it is an answer chunk, then its final state's
        arrays unless it is the last answer chunk (whose state reaches no loss); and that
        state."""
        answers, state = chunk(c, state, apply)
        out = []
        if c in columns:
            ((_, _, logits),) = answers  # chunk-local bounds; bounds[c] are global
            cols = columns[c] + bounds[c][0]
            out.append(apply(_ce_sum, logits, targets[:, cols], mask[:, cols]))
        if c < last:
            out += _flat_state(state)[1]
        return out, state

    # 1. Forward: the state at the start of every chunk up to the last answer chunk, and the
    # random key there (so a recomputed chunk draws the dropout masks this forward drew). By
    # blocks, the chunk before the last answer chunk runs on a tape: the backward comes to it
    # second and takes the tape as it is (one chunk's forward fewer; two tapes alive at most).
    starts, keys, taped = [model.initial_state(inputs.shape[0])], [_random_key()], {}
    for c in range(last):
        if granularity == "block" and c == last - 1:
            tape = _Tape(weights, _flat_state(starts[c])[1])
            outs, state = chunk_outputs(c, starts[c], tape.step)
            taped[c] = tape, outs
        else:
            state = chunk(c, starts[c])[1]
        starts.append(state)
        mx.eval(starts[-1])
        keys.append(_random_key())

    # 2. Backward, recomputing one chunk (or one block application) at a time.
    grads, state_ct, total = None, None, mx.array(0.0)
    try:
        for c in reversed(range(last + 1)):
            keys_in, state_in = _flat_state(starts[c])
            answer = c in columns
            cotangents = ([(1.0 / denom).astype(mx.float32)] if answer else []) + (
                state_ct if c < last else []
            )
            _set_random_key(keys[c])
            if granularity == "chunk":

                def fn(*arrays, c=c, keys_in=keys_in):
                    set_params(arrays[:n_params])
                    state = _unflat_state(keys_in, arrays[n_params:], n_layers)
                    return chunk_outputs(c, state)[0]

                outs, vjps = mx.vjp(fn, params + state_in, cotangents)
                g, state_ct = vjps[:n_params], vjps[n_params:]
            else:
                if c not in taped:
                    tape = _Tape(weights, state_in)
                    taped[c] = tape, chunk_outputs(c, starts[c], tape.step)[0]
                tape, outs = taped.pop(c)
                g, state_ct = tape.backward(outs, cotangents)
            if answer:
                total = total + outs[0]
            grads = g if grads is None else [x + y for x, y in zip(grads, g)]
            mx.eval(grads, state_ct, total)
            starts[c] = None
    finally:
        set_params(params)
    return (total / denom, n_scored), tree_unflatten(list(zip(names, grads)))


# -- the objective over depths ------------------------------------------------------------


def loss_depths(sleep: SleepConfig, depth_losses=None, draw=None) -> list:
    """[(sleep settings, weight)]: where the training loss is taken. Algorithm 1 takes it at N
    passes alone; `depth_losses` ((lo, hi, weight), ...) takes it at each depth (every context
    window slept that many passes), drawn from lo..hi by the seeded generator `draw` where
    lo < hi, weighted (the weights of a depth drawn twice add): a model trained to answer at
    several depths (a depth dial, docs/training.md)."""
    if not depth_losses:
        return [(sleep, 1.0)]
    weights = {}
    for lo, hi, w in depth_losses:
        if w > 0:
            d = lo if lo == hi else int(draw.integers(lo, hi + 1))
            weights[d] = weights.get(d, 0.0) + w
    return [(replace(sleep, loops=d), w) for d, w in sorted(weights.items())]


def depth_draw(seed: int, step: int) -> np.random.Generator:
    """The generator of a step's drawn depths: from the run's seed and the step alone, so a
    resumed run and every data-parallel process draw the same."""
    return np.random.default_rng([seed, 20, step])


def trained_at_every_depth(loops: int, depth_losses) -> bool:
    """Depth losses that weigh every depth 1..N: the model answers from the memory of any pass,
    so a stopped sleep may keep its passes (SleepConfig.partial)."""
    weighted = {d for lo, hi, w in depth_losses or () if w > 0 for d in range(lo, hi + 1)}
    return set(range(1, loops + 1)) <= weighted


def depth_loss(model, inputs, targets, mask, depths, *, plan=None):
    """sum of weight * sleep_loss over `depths` (loss_depths): (objective, n_scored)."""
    total = None
    for sleep, weight in depths:
        loss, n_scored = sleep_loss(model, inputs, targets, mask, sleep, plan=plan)
        term = loss if weight == 1 else weight * loss
        total = term if total is None else total + term
    return total, n_scored


def depth_value_and_grad(model, inputs, targets, mask, depths, *, plan=None, **kw):
    """depth_loss's value and gradients with memory bounded as `sleep_value_and_grad` bounds
    it (`kw` go to it): one depth at a time, the weighted sum accumulated."""
    total = grads = None
    for sleep, weight in depths:
        (loss, n_scored), g = sleep_value_and_grad(
            model, inputs, targets, mask, sleep, plan=plan, **kw
        )
        if weight != 1:
            loss, g = weight * loss, tree_map(lambda a: (weight * a).astype(a.dtype), g)
        total = loss if total is None else total + loss
        grads = g if grads is None else tree_map(mx.add, grads, g)
        mx.eval(total, grads)
    return (total, n_scored), grads


class SleepCancelled(Exception):
    """A consolidation stopped between passes; the engine is as it was before it."""


class SleepEngine:
    """Incremental inference with sleep, on the same code as training.

    Tokens fed while a window is live get one ordinary ("wake") pass each, which is what
    generation needs. `consolidate()` sleeps on the live window: Algorithm 1's N passes for that
    chunk from the state saved at the window's start (when the window was fed in one piece, its
    wake pass is the first of them: same tokens, same start state), then evicts and starts a new
    window. `feed` consolidates on its own when the window is full (a forced sleep); the
    caller may consolidate earlier (an idle sleep). A cancelled consolidation changes nothing.
    `on_forced_sleep()`, when set, is called as a forced sleep starts and returns
    consolidate()'s keyword arguments for it (`cancel=`, `on_pass=`): a chat shows each pass
    and lets Ctrl-C stop it, and feed() then raises SleepCancelled with the window still full.

        engine = SleepEngine(model, SleepConfig(loops=4, window=256))
        logits = engine.feed(prompt_ids)      # [B, T, V]
        engine.consolidate()                  # e.g. while the user is idle
    """

    def __init__(
        self,
        model,
        sleep: Optional[SleepConfig] = None,
        batch_size: int = 1,
        defer: bool = False,
        max_pending: int = 4,
    ):
        """`sleep` defaults to the settings a converted model carries (`model.sleep_config`).
        `defer`: a window that fills is evicted after its wake pass alone and kept pending (its
        tokens and start state) until `catch_up()` deepens it, so no feed waits for a sleep; at
        most `max_pending` wait, past that the oldest is deepened in the feed."""
        if sleep is None:
            sleep = getattr(model, "sleep_config", None) or SleepConfig()
        if (
            isinstance(max_pending, bool)
            or not isinstance(max_pending, int)
            or not 1 <= max_pending <= MAX_PENDING
        ):
            raise ValueError(
                f"max_pending must be an integer in 1..{MAX_PENDING} (got {max_pending!r})"
            )
        self.model, self.sleep, self.batch_size = model, sleep, batch_size
        self.defer, self.max_pending = defer, max_pending
        self.on_forced_sleep: Optional[Callable[[], dict]] = None
        self.reset()

    def reset(self):
        """Forget everything: fast weights, KV and the live window."""
        self.state = self.model.initial_state(self.batch_size)
        self.window_start_state = self.state
        self.window_start = 0  # global position of the live window's first token
        self.window_ids: List[mx.array] = []
        self.window_core: List[mx.array] = []  # the wake pass's core output, if one piece
        self.offset = 0  # global position of the next token
        self.sleeps = 0  # completed consolidations
        self.last_passes = 0  # passes the last consolidation ran (a stopping rule may cut N)
        self.answering = False  # begin_answer(): full windows take one pass
        # defer: windows evicted after their wake pass, oldest first: (ids, start state, start)
        self.pending: List[Tuple[mx.array, State, int]] = []

    @property
    def window_len(self) -> int:
        return self.offset - self.window_start

    def feed(self, ids, logits: Optional[str] = "all", sampled: bool = False) -> Optional[mx.array]:
        """Run tokens [B, T] (or [T]) through one wake pass. Sleeps first whenever the window is
        full (L tokens) and more tokens arrive. Returns the logits the caller asks for:
        "all" [B, T, V], "last" [B, 1, V] (all a generator needs) or None. `sampled`: the ids
        were sampled from this model's logits, so they are in the vocabulary by construction and
        may still be lazy (checking them would wait for them: a pipelined decoder's next step).

        A feed that spans several windows evaluates window by window, so its peak memory is one
        window's, not the whole prompt's (unevaluated logits would keep every window's wake-pass
        intermediates alive); ask for "last" or None to keep the logits small too."""
        if logits not in ("all", "last", None):
            raise ValueError(f"logits must be 'all', 'last' or None (got {logits!r})")
        ids = mx.array(ids) if not isinstance(ids, mx.array) else ids
        if ids.ndim == 1:
            ids = ids[None]
        if ids.ndim != 2 or ids.shape[0] != self.batch_size:
            raise ValueError(
                f"ids must be [batch, tokens] with batch {self.batch_size} "
                f"(got shape {tuple(ids.shape)})"
            )
        if not sampled:
            self.model.check_ids(ids)
        T, L = ids.shape[1], self.sleep.window
        if T == 0:
            empty = mx.zeros((self.batch_size, 0, self.model.vocab_size))
            return None if logits is None else empty
        out, pos = [], 0
        while pos < T:
            if self.window_len == L and self.answering:
                self._evict(self.state)  # an answer's window: its wake pass is its one pass
            elif self.window_len == L and self.defer:
                window = mx.concatenate(self.window_ids, axis=1)
                self.pending.append((window, self.window_start_state, self.window_start))
                self._evict(self.state)  # shallow until catch_up() deepens it
                if len(self.pending) > self.max_pending:  # the oldest, deepened here
                    self.catch_up(windows=len(self.pending) - self.max_pending)
            elif self.window_len == L:
                hooks = self.on_forced_sleep() if self.on_forced_sleep is not None else {}
                if not self.consolidate(**hooks):
                    raise SleepCancelled(
                        f"the forced sleep was cancelled after {pos} of {T} "
                        "tokens; the window is still full"
                    )
            piece = ids[:, pos : pos + L - self.window_len]
            # Keep the wake pass's core features while the window is one piece (a prompt's full
            # windows): its sleep then reuses them as pass 1, bit for bit what recomputing gives.
            # A window fed in several pieces (generation) is recomputed: reusing its pieces
            # differs within float rounding, and saves little next to L one-token steps.
            one_piece = self.window_len == 0 and self.sleep.loops > 1
            self.window_core = []
            h, self.state = run_chunk(
                self.model,
                piece,
                self.state,
                self.offset,
                1,
                self.sleep.attention_window,
                core_out=self.window_core if one_piece else None,
            )
            self.window_ids.append(piece)
            self.offset += piece.shape[1]
            pos += piece.shape[1]
            if logits == "all":
                out.append(self.model.head(h))
            elif logits == "last" and pos == T:
                out.append(self.model.head(h[:, -1:]))
            if pos < T:  # more windows follow: free this one's intermediates now (the wake
                # pass is sleep pass 1 of a window fed in one piece: it is needed anyway)
                mx.eval(self.state, self.window_core, out)
        if logits is None:
            return None
        return mx.concatenate(out, axis=1) if len(out) > 1 else out[0]

    def mark(self):
        """A point `undo` can return to, as long as no sleep happens in between (a decoder's
        speculative step on a token that may turn out to be a stop token)."""
        return (
            self.state,
            len(self.window_ids),
            self.window_core,
            self.offset,
            (self.window_start, self.sleeps),
        )

    def undo(self, mark):
        """Take back the feeds since `mark` (arrays are immutable: this is bookkeeping)."""
        state, pieces, core, offset, window = mark
        if window != (self.window_start, self.sleeps):
            raise RuntimeError(
                "undo across a consolidation: only feeds within one window can be taken back"
            )
        self.state, self.window_core, self.offset = state, core, offset
        del self.window_ids[pieces:]

    def consolidate(
        self,
        cancel: Optional[Callable[[], bool]] = None,
        on_pass: Optional[Callable[[int, int], None]] = None,
        max_passes: Optional[int] = None,
        tolerance: Optional[float] = None,
    ) -> bool:
        """Sleep on the live window: N passes from its start state, then evict. Windows still
        pending (defer=True) are deepened first (`catch_up`): the live window sleeps on top of
        the memory the synchronous schedule would have.

        `cancel()` is polled between passes; if it returns True the engine is left as it was
        (but for pending windows deepened before it) and False is returned; with
        `sleep.partial` the window keeps the passes run instead (True). `on_pass(n, N)`
        reports progress. Returns True when done. `max_passes` replaces N; `tolerance` stops
        earlier, once a pass changes the fast weights by less than that (relative norm,
        `converged`): sleep as deep as it helps. The passes run are in `self.last_passes`."""
        if self.pending:
            todo = len(self.pending)
            if self.catch_up(cancel, on_pass) < todo:
                return False
        if self.window_len == 0:
            return True
        loops = self.sleep.loops if max_passes is None else max_passes
        if isinstance(loops, bool) or not isinstance(loops, int) or loops < 1:
            raise ValueError(f"max_passes must be an integer >= 1 (got {loops!r})")
        ran = [1]  # passes run (the wake pass is the one pass when N = 1)
        stop = (
            converged(self.model, self.window_start_state, tolerance)
            if tolerance is not None
            else None
        )

        def after_pass(n, state):
            mx.eval(state)
            ran[0] = n + 1
            if on_pass is not None:
                on_pass(n + 1, loops)
            done = stop is not None and stop(n, state)
            if cancel is not None and n + 1 < loops and not done and cancel():
                return self._stop_partway()
            return done

        window = self.sleep.attention_window
        try:
            if loops == 1:
                state = self.state  # the wake pass was the one pass
            elif self.window_core and after_pass(0, self.state):  # the wake pass is pass 1
                state = self.state  # stopped there (partial sleep)
            elif self.window_core:  # the window was fed in one piece
                state = continue_passes(
                    self.model,
                    mx.concatenate(self.window_core, axis=1),
                    self.state,
                    self.window_start_state,
                    self.window_start,
                    loops,
                    window,
                    after_pass,
                )
            else:  # fed in pieces: recompute all N passes
                ids = mx.concatenate(self.window_ids, axis=1)
                _, state = run_chunk(
                    self.model,
                    ids,
                    self.window_start_state,
                    self.window_start,
                    loops,
                    window,
                    after_pass,
                )
        except SleepCancelled:
            return False
        self._slept(self.window_start_state, self.window_start)
        self._evict(state)
        self.sleeps += 1
        self.last_passes = ran[0]
        return True

    def catch_up(
        self,
        cancel: Optional[Callable[[], bool]] = None,
        on_pass: Optional[Callable[[int, int], None]] = None,
        on_window: Optional[Callable[[int, int], None]] = None,
        windows: Optional[int] = None,
    ) -> int:
        """Deepen the pending windows (defer=True), oldest first: each gets Algorithm 1's N
        passes from its start state (exact: every window before it is deep by then); then what
        came after is recomputed on the deeper state, the windows still pending with their one
        pass and the live window with its wake pass. The engine then holds what the synchronous
        schedule reaches on the same tokens (the live window's wake pass, recomputed in one
        piece, within float rounding of one fed in pieces).

        `windows`: deepen at most that many. `cancel()` is polled between passes: a window
        interrupted mid-way is left pending as it was (with `sleep.partial`: it keeps the
        passes run), the ones deepened before it stay deep.
        `on_pass(n, N)` reports each pass, `on_window(i, n)` each window deepened. Returns how
        many were deepened."""
        if not self.pending:
            return 0
        todo = len(self.pending) if windows is None else min(windows, len(self.pending))
        loops, window, keep = (
            self.sleep.loops,
            self.sleep.attention_window,
            self.sleep.keep_after_eviction,
        )

        def after_pass(n, state):
            mx.eval(state)
            if on_pass is not None:
                on_pass(n + 1, loops)
            if cancel is not None and n + 1 < loops and cancel():
                return self._stop_partway()

        state, deepened = self.pending[0][1], 0
        try:
            for ids, _, start in self.pending[:todo]:
                _, deep = run_chunk(self.model, ids, state, start, loops, window, after_pass)
                self._slept(state, start)
                state = evict(self.model, deep, keep)
                mx.eval(state)
                deepened += 1
                if on_window is not None:
                    on_window(deepened, todo)
                if deepened < todo and cancel is not None and cancel():
                    break
        except SleepCancelled:
            if deepened == 0:
                return 0
        # What follows the deepened windows, recomputed on their state: one pass each.
        rest = []
        for ids, _, start in self.pending[deepened:]:
            rest.append((ids, state, start))
            _, shallow = run_chunk(self.model, ids, state, start, 1, window)
            state = evict(self.model, shallow, keep)
        self.pending = rest
        self.window_start_state = state
        if self.window_ids:
            core = []
            _, state = run_chunk(
                self.model,
                mx.concatenate(self.window_ids, axis=1),
                state,
                self.window_start,
                1,
                window,
                core_out=core if loops > 1 else None,
            )
            self.window_ids = [mx.concatenate(self.window_ids, axis=1)]
            self.window_core = core
        mx.eval(state)
        self.state = state
        self.sleeps += deepened
        return deepened

    def begin_answer(self):
        """From here on the tokens fed are an answer (until reset()): a window that fills is
        evicted after its wake pass, without sleeping, because Algorithm 1 gives a chunk
        holding answers one pass. Call it once the prompt is fed: the prompt's last token
        predicts the answer's first, so training counts its window as an answer chunk too,
        and with it every prompt length (a full last window included) sees the passes in
        inference that it saw in training."""
        self.answering = True

    def _stop_partway(self) -> bool:
        """A sleep cancelled between passes: with `sleep.partial` (a model trained at every
        depth) the window keeps the passes run (True stops run_chunk there); otherwise it is
        undone (SleepCancelled)."""
        if self.sleep.partial:
            return True
        raise SleepCancelled

    def _slept(self, start_state: State, start: int):
        """A window that began at `start` with `start_state` has just been consolidated (a hook:
        SessionEngine keeps these for /forget)."""

    def _evict(self, state: State):
        """Close the live window with `state` (after its passes): evict, start the next."""
        state = evict(self.model, state, self.sleep.keep_after_eviction)
        mx.eval(state)
        self.state = self.window_start_state = state
        self.window_start, self.window_ids, self.window_core = self.offset, [], []

    # -- persistence (sessions build on these) ---------------------------------------------
    def state_dict(self) -> dict:
        """Everything needed to resume: flat {name: array} plus metadata (positions, the sleep
        settings, the batch size and the model's fingerprint, which loading checks)."""
        arrays = dict(
            tree_flatten({"state": self.state, "window_start_state": self.window_start_state})
        )
        if self.window_ids:
            arrays["window_ids"] = mx.concatenate(self.window_ids, axis=1)
        if self.window_core:
            arrays["window_core"] = mx.concatenate(self.window_core, axis=1)
        pending = [{"ids": ids, "start": start} for ids, start, _ in self.pending]
        arrays.update(tree_flatten({"pending": pending}))
        meta = {
            "offset": self.offset,
            "window_start": self.window_start,
            "sleeps": self.sleeps,
            "batch_size": self.batch_size,
            "sleep": self.sleep.to_dict(),
            "model": self.model.fingerprint(),
        }
        if self.pending:  # only then: a session file (which holds none yet) keeps its keys
            meta["pending_starts"] = [start for _, _, start in self.pending]
        return {"arrays": arrays, "meta": meta}

    def load_state_dict(self, d: dict):
        """Restore a `state_dict()`. A state saved with other sleep settings, another batch size
        or another model (fingerprint), or whose arrays do not fit this model, is refused with
        a ValueError naming what differs; the engine is then left unchanged."""
        if not (
            isinstance(d, dict)
            and isinstance(d.get("meta"), dict)
            and isinstance(d.get("arrays"), dict)
        ):
            raise ValueError(
                "not a saved engine state: expected engine.state_dict()'s "
                "{'meta': {...}, 'arrays': {...}}"
            )
        meta, arrays = d["meta"], dict(d["arrays"])
        for key in ("offset", "window_start", "sleeps"):
            if not (key == "sleeps" and key not in meta) and (
                type(meta.get(key)) is not int or meta[key] < 0
            ):
                raise ValueError(
                    f"saved state is inconsistent: meta {key!r} must be an integer "
                    f">= 0 (got {meta.get(key)!r})"
                )
        if not all(isinstance(v, mx.array) for v in arrays.values()):
            raise ValueError("saved state is inconsistent: its arrays must be mx.array")
        mine = {
            "sleep settings": self.sleep.to_dict(),
            "batch size": self.batch_size,
            "model": self.model.fingerprint(),
        }
        saved = {
            "sleep settings": meta.get("sleep"),
            "batch size": meta.get("batch_size"),
            "model": meta.get("model"),
        }
        differ = [f"{k} {saved[k]} (this engine: {mine[k]})" for k in mine if saved[k] != mine[k]]
        if differ:
            raise ValueError("saved state does not fit this engine: " + "; ".join(differ))
        window_ids = arrays.pop("window_ids", None)
        window_core = arrays.pop("window_core", None)
        pending = self._saved_pending(meta, arrays)
        tree = tree_unflatten(list(arrays.items()))
        fresh = self.model.initial_state(self.batch_size)
        # Layers whose state is empty (attention right after eviction) are absent from the flat dict.
        state = fill_state(fresh, tree.get("state", []))
        start_state = fill_state(fresh, tree.get("window_start_state", []))
        for name, s in (("state", state), ("window_start_state", start_state)):
            check_state(name, s, fresh)
        offset, window_start = int(meta["offset"]), int(meta["window_start"])
        n_live = window_ids.shape[1] if window_ids is not None else 0
        if (
            not 0 <= window_start <= offset
            or offset - window_start != n_live
            or n_live > self.sleep.window
        ):
            raise ValueError(
                f"saved state is inconsistent: window {window_start}..{offset} "
                f"with {n_live} live tokens (window L = {self.sleep.window})"
            )
        if window_ids is not None:
            self.model.check_ids(window_ids)
        if window_core is not None and (
            window_core.ndim != 3 or window_core.shape[:2] != (self.batch_size, n_live)
        ):
            raise ValueError(
                f"saved wake features are {tuple(window_core.shape)}, the window "
                f"holds {n_live} tokens"
            )
        self.state, self.window_start_state = state, start_state
        self.offset, self.window_start = offset, window_start
        self.sleeps = int(meta.get("sleeps", 0))
        self.window_ids = [window_ids] if window_ids is not None else []
        self.window_core = [window_core] if window_core is not None else []
        self.pending = pending

    def _saved_pending(self, meta: dict, arrays: dict) -> list:
        """The deferred windows of a saved state (popped from `arrays`), checked: full windows
        of L tokens in the vocabulary, one after another up to the live window, each with a
        start state that fits the model."""
        starts = meta.get("pending_starts", [])  # states saved before deferral: none
        names = [k for k in arrays if k.startswith("pending.")]
        saved = tree_unflatten([(k, arrays.pop(k)) for k in names])["pending"] if names else []
        L, window_start = self.sleep.window, meta["window_start"]
        if not (
            isinstance(starts, list)
            and isinstance(saved, list)
            and all(type(a) is int for a in starts)
            and len(saved) == len(starts)
            and all(b - a == L for a, b in zip(starts, starts[1:] + [window_start]))
            and (not starts or starts[0] >= 0)
        ):
            raise ValueError(
                f"saved state is inconsistent: pending windows at {starts!r} with "
                f"{len(saved)} saved, before the live window at {window_start} (L = {L})"
            )
        fresh, pending = self.model.initial_state(self.batch_size), []
        for j, (start, window) in enumerate(zip(starts, saved)):
            ids = window.get("ids") if isinstance(window, dict) else None
            if not isinstance(ids, mx.array) or ids.shape != (self.batch_size, L):
                raise ValueError(f"saved pending window {j} is not {L} tokens")
            self.model.check_ids(ids)
            state = fill_state(fresh, window.get("start", []))
            check_state(f"pending window {j} start state", state, fresh)
            pending.append((ids, state, start))
        return pending


def fill_state(fresh: State, loaded) -> State:
    """tree_unflatten pads missing leading layers with {} but stops at the last saved one."""
    loaded = list(loaded) + [{}] * (len(fresh) - len(loaded))
    return [l if l else f for f, l in zip(fresh, loaded)]


def check_state(name: str, state: State, fresh: State):
    """Every saved entry is one the model has, with its shape (the KV length may differ)."""
    if len(state) != len(fresh):
        raise ValueError(f"saved {name} has {len(state)} layers, the model {len(fresh)}")
    for i, (s, f) in enumerate(zip(state, fresh)):
        for key, a in s.items():
            want = f.get(key)
            if want is None and key not in ("keys", "values"):
                raise ValueError(f"saved {name} layer {i} has an entry {key!r} the model lacks")
            if want is not None and tuple(a.shape) != tuple(want.shape):
                raise ValueError(
                    f"saved {name} layer {i} {key} is {tuple(a.shape)}, the model "
                    f"needs {tuple(want.shape)}"
                )
