"""What every model that sleeps shares, written once.

A sleep model is an nn.Module with, from its architecture file:
  layers            the decoder-layer modules (mlx-lm's meaning: its LoRA, quantization
                    predicates, fuse and checkpointing walk them)
  config            a config with `core_range` (see config.py) and `to_dict()`
  embed_tokens, norm, lm_head (or tied embeddings)
and, from this class:
  sleep_blocks()    the sleep engine's view of the stack: callables
                    (h, state, offset, window) -> (h, state), each with a `mixer` that names its
                    fast weights (`carried`), makes its `initial_state` and `evict`s it.
                    By default the layers themselves; Ouro unrolls its loops here (views that
                    share the real layers' weights), the mlx-lm adapters wrap mlx-lm's layers.
  core              (start, stop): the looped range of sleep_blocks()
  embed(ids), head(h), initial_state(batch_size)
  model(ids)        a plain forward (one pass per block, no eviction), or with `cache`
                    (`make_cache()`, mlx-lm's protocol) a continued one, for mlx-lm's generation
  matrix_weights(), keep_unquantized(path)   what the trainer (Muon or AdamW) and the
                    converter (quantize or not) ask the model
  fingerprint()     what a saved state must match to be loaded into this model
"""

import hashlib
import json

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..cache import LayerStateCache
from ..sleep import run_chunk


def check_token_ids(ids, vocab_size: int):
    """Raise ValueError naming the first id outside [0, vocab_size). MLX does not bounds-check
    a gather: an id past the embedding table reads other memory (or crashes)."""
    ids = ids if isinstance(ids, mx.array) else mx.array(ids)
    if ids.size == 0:
        return
    if not mx.issubdtype(ids.dtype, mx.integer):
        raise ValueError(f"token ids must be integers (got {ids.dtype})")
    bad = (ids < 0) | (ids >= vocab_size)
    if bad.any().item():
        first = ids.reshape(-1)[mx.argmax(bad.reshape(-1))].item()
        raise ValueError(
            f"token id {first} is outside the vocabulary of {vocab_size} "
            f"(ids must be in 0..{vocab_size - 1}); was it made by another "
            "tokenizer or task?"
        )


class SleepModel(nn.Module):
    model_type = "hybrid"  # the key of models.MODEL_TYPES that rebuilds it from its config

    # -- what an architecture may override ---------------------------------------------------
    def sleep_blocks(self) -> list:
        return list(self.layers)

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def tie_embeddings(self) -> bool:
        return self.config.tie_embeddings

    def embed(self, ids):
        return self.embed_tokens(ids)

    def head(self, h):
        h = self.norm(h)
        return self.embed_tokens.as_linear(h) if self.tie_embeddings else self.lm_head(h)

    def keep_unquantized(self, path: str) -> bool:
        """Weights that quantization must leave exact (e.g. a gate deciding control flow)."""
        return False

    # -- shared ------------------------------------------------------------------------------
    @property
    def core(self):
        return self.config.core_range

    def initial_state(self, batch_size: int) -> list:
        return [block.mixer.initial_state(batch_size) for block in self.sleep_blocks()]

    def make_cache(self) -> list:
        return [LayerStateCache() for _ in self.sleep_blocks()]

    def check_ids(self, ids):
        check_token_ids(ids, self.vocab_size)

    def __call__(self, ids, state=None, offset: int = 0, cache=None):
        """A plain forward: one pass over every block, no eviction. Returns logits [B, T, V].
        From `state` at `offset`, or continuing the sequence held in an mlx-lm style `cache`
        (updated in place)."""
        self.check_ids(ids)
        if cache is None:
            state = self.initial_state(ids.shape[0]) if state is None else state
            h, _ = run_chunk(self, ids, state, offset, passes=1)
            return self.head(h)
        if len(cache) != len(self.sleep_blocks()):
            raise ValueError(
                f"cache has {len(cache)} entries, the model "
                f"{len(self.sleep_blocks())} blocks; make it with model.make_cache()"
            )
        if cache[0].layer_state is None:
            for c, s in zip(cache, self.initial_state(ids.shape[0])):
                c.layer_state = s
        h, states = run_chunk(self, ids, [c.layer_state for c in cache], cache[0].offset, passes=1)
        for c, s in zip(cache, states):
            c.layer_state = s
            c.offset += ids.shape[1]
        return self.head(h)

    def matrix_weights(self) -> set:
        """Paths of the weights Muon takes: every nn.Linear weight inside the decoder layers.
        Embeddings, the head, norms, conv kernels, gates and biases go to AdamW (as in the
        paper and Muon's authors); so do LoRA adapters (LoRALinear is not an nn.Linear)."""
        inside = {id(m) for layer in self.layers for _, m in layer.named_modules()}
        return {
            f"{name}.weight"
            for name, m in self.named_modules()
            if type(m) is nn.Linear and id(m) in inside
        }

    def fingerprint(self) -> str:
        """A hash of the architecture: model class, config and every parameter's name, shape
        and dtype (not the values). A saved sleep state only fits a model with the same one."""
        shapes = [(k, list(v.shape), str(v.dtype)) for k, v in tree_flatten(self.parameters())]
        blob = json.dumps([type(self).__module__, self.config.to_dict(), shapes], sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]
