"""mlx-lm's cache protocol over the sleep engine's per-layer state, so that mlx-lm's generation
utilities (`mlx_lm.generate.generate_step`, `stream_generate`) can drive our models.

This is a plain forward: one pass per token and no eviction (mlx-lm knows nothing of sleep).
For generation with sleep use `SleepEngine`, which runs the same layers.
"""

from mlx.utils import tree_flatten

from .sleep import run_chunk


class LayerStateCache:
    """One layer's state dict (attention KV, or conv state and fast weights S), with the methods
    of mlx-lm's cache protocol that its generation uses. mlx-lm checks the protocol, not the
    class, so this does not import mlx-lm (importing it pulls in transformers and torch)."""

    def __init__(self):
        self.layer_state = None  # made on the first call, when the batch size is known
        self.offset = 0

    @property
    def state(self):
        return [a for _, a in tree_flatten(self.layer_state or {})]

    @state.setter
    def state(self, v):
        raise NotImplementedError("mlx-sleep caches cannot be restored from mlx-lm prompt-cache "
                                  "files; use SleepEngine.state_dict() / load_state_dict()")

    def is_trimmable(self):
        return False

    def size(self):
        return self.offset

    def empty(self):
        return self.layer_state is None

    @property
    def nbytes(self):
        return sum(a.nbytes for a in self.state)


def make_cache(model) -> list:
    return [LayerStateCache() for _ in model.layers]


def plain_forward(model, ids, state=None, offset: int = 0, cache=None):
    """A plain forward: one pass over every block, no eviction. Returns logits [B, T, V].
    From `state` at `offset`, or continuing the sequence held in an mlx-lm style `cache`."""
    if cache is not None:
        return forward_with_cache(model, ids, cache)
    state = model.initial_state(ids.shape[0]) if state is None else state
    h, _ = run_chunk(model, ids, state, offset, passes=1)
    return model.head(h)


def forward_with_cache(model, ids, cache: list):
    """Logits [B, T, V] for ids continuing the sequence held in `cache` (updated in place)."""
    if len(cache) != len(model.layers):
        raise ValueError(f"cache has {len(cache)} entries, the model {len(model.layers)} layers")
    if cache[0].layer_state is None:
        for c, s in zip(cache, model.initial_state(ids.shape[0])):
            c.layer_state = s
    h, states = run_chunk(model, ids, [c.layer_state for c in cache], cache[0].offset, passes=1)
    for c, s in zip(cache, states):
        c.layer_state = s
        c.offset += ids.shape[1]
    return model.head(h)
