"""mlx-lm's cache protocol over the sleep engine's per-layer state, so that mlx-lm's generation
utilities (`mlx_lm.generate.generate_step`, `stream_generate`) can drive our models.

A model's `make_cache()` gives one LayerStateCache per sleep block, and `model(ids, cache=...)`
(models/base.py) runs a plain forward that continues it: one pass per token and no eviction
(mlx-lm knows nothing of sleep). For generation with sleep use `SleepEngine`.
"""

from mlx.utils import tree_flatten


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
        raise NotImplementedError(
            "mlx-sleep caches cannot be restored from mlx-lm prompt-cache "
            "files; use SleepEngine.state_dict() / load_state_dict()"
        )

    def is_trimmable(self):
        return False

    def size(self):
        return self.offset

    def empty(self):
        return self.layer_state is None

    @property
    def nbytes(self):
        return sum(a.nbytes for a in self.state)
