"""Ouro (ByteDance, model_type "ouro"): a looped ("universal") transformer, optionally with
MLP-free Jet layers inserted into its stack (the paper's Ouro 1.4B + Jet recipe).

    x = embed(ids)
    for ut in range(total_ut_steps):            # the same weights every loop, same positions
        for block in stack:                     # Ouro blocks, with Jet layers interleaved
            x = block(x)
        x = norm(x)                             # the final norm runs after EVERY loop
        hidden[ut] = x;  gate[ut] = early_exit_gate(x)
    logits = lm_head(hidden[chosen step])

Ouro blocks use sandwich norms (input_layernorm -> attn -> input_layernorm_2, then
post_attention_layernorm -> mlp -> post_attention_layernorm_2). Inserted Jet layers are plain
pre-norm residual blocks without an MLP, x + o_proj(jet(norm(x))), whose o_proj starts at zero
so the model's outputs are unchanged until fine-tuned. (No post-norm on them: an RMSNorm of a
zero output has a gradient of 1/sqrt(eps), which would blow up the first fine-tuning step.)

`layers` is one loop's stack, the real modules (Ouro blocks with the Jet layers interleaved, in
order). Each loop has its own KV cache (and its own Jet fast weights), as Ouro's
UniversalTransformerCache (indexed ut * num_layers + layer), so the sleep engine sees the loops
unrolled: `sleep_blocks()` is total_ut_steps x len(stack) views that share the layers' weights,
the last view of each loop applying the final norm. By default the whole unrolled stack is the
looped core, so one sleep pass is one full Ouro forward and N = 1 is the stock model.
"""

from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..config import ConfigError, ModelConfigBase
from ..layers import Attention, JetBlock, SwiGLU
from .base import SleepModel


@dataclass
class OuroConfig(ModelConfigBase):
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    num_kv_heads: Optional[int] = None  # default: num_heads
    head_dim: Optional[int] = None  # default: hidden_size // num_heads
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    total_ut_steps: int = 4
    early_exit_threshold: Optional[float] = 1.0
    early_exit_step: Optional[int] = None
    tie_embeddings: bool = False
    # Inserted MLP-free Jet layers: Jet layer j sits right after Ouro block jet_after[j]
    # (-1: before the first); sizes default to the attention's heads and head_dim.
    jet_after: List[int] = field(default_factory=list)
    jet_heads: Optional[int] = None
    jet_head_k_dim: Optional[int] = None
    jet_head_v_dim: Optional[int] = None
    jet_conv_size: int = 4
    jet_generator_reduction: int = 8
    jet_norm_eps: float = 1e-5
    core: Optional[Tuple[int, int]] = None  # over the unrolled stack; None = all of it

    core_what = " (total_ut_steps x blocks per loop)"

    def __post_init__(self):
        self.jet_after = list(self.jet_after)
        super().__post_init__()

    @property
    def stack(self) -> List[Tuple[str, int]]:
        """One loop's blocks in order: ("ouro", i) and ("jet", j)."""
        out = [("jet", j) for j, a in enumerate(self.jet_after) if a == -1]
        for i in range(self.num_layers):
            out.append(("ouro", i))
            out += [("jet", j) for j, a in enumerate(self.jet_after) if a == i]
        return out

    @property
    def num_unrolled(self) -> int:
        return self.total_ut_steps * len(self.stack)

    @property
    def num_sleep_blocks(self) -> int:
        return self.num_unrolled

    def resolved(self, name):
        v = getattr(self, name)
        if v is not None:
            return v
        return {
            "num_kv_heads": lambda: self.num_heads,
            "head_dim": lambda: self.hidden_size // self.num_heads,
            "jet_heads": lambda: self.num_heads,
            "jet_head_k_dim": lambda: self.resolved("head_dim"),
            "jet_head_v_dim": lambda: self.resolved("jet_head_k_dim"),
        }[name]()

    def validate(self):
        def need(ok, msg):
            if not ok:
                raise ConfigError(msg)

        need(self.num_layers >= 1, f"num_layers must be >= 1 (got {self.num_layers})")
        need(self.total_ut_steps >= 1, f"total_ut_steps must be >= 1 (got {self.total_ut_steps})")
        kv = self.resolved("num_kv_heads")
        need(
            kv >= 1 and self.num_heads % kv == 0,
            f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({kv})",
        )
        need(
            all(-1 <= a < self.num_layers for a in self.jet_after),
            f"jet_after entries must be in -1..{self.num_layers - 1} (got {self.jet_after})",
        )
        if self.early_exit_step is not None:
            need(
                0 <= self.early_exit_step < self.total_ut_steps,
                f"early_exit_step must be in 0..{self.total_ut_steps - 1}",
            )
        super().validate()


class OuroBlock(nn.Module):
    """Ouro's decoder layer with sandwich norms around the attention and the MLP."""

    def __init__(self, c: OuroConfig):
        super().__init__()
        eps, d = c.norm_eps, c.hidden_size
        self.input_layernorm = nn.RMSNorm(d, eps=eps)
        self.mixer = Attention(
            d, c.num_heads, c.resolved("num_kv_heads"), c.resolved("head_dim"), c.rope_theta
        )
        self.input_layernorm_2 = nn.RMSNorm(d, eps=eps)
        self.post_attention_layernorm = nn.RMSNorm(d, eps=eps)
        self.mlp = SwiGLU(d, c.intermediate_size)
        self.post_attention_layernorm_2 = nn.RMSNorm(d, eps=eps)

    def __call__(self, x, state, offset=0, window=None):
        h, state = self.mixer(self.input_layernorm(x), state, offset, window)
        x = x + self.input_layernorm_2(h)
        x = x + self.post_attention_layernorm_2(self.mlp(self.post_attention_layernorm(x)))
        return x, state


class JetLayer(nn.Module):
    """An inserted MLP-free Jet layer: x + jet(norm(x)), o_proj zero at insertion."""

    def __init__(self, c: OuroConfig):
        super().__init__()
        heads, dk, dv = (
            c.resolved("jet_heads"),
            c.resolved("jet_head_k_dim"),
            c.resolved("jet_head_v_dim"),
        )
        self.input_layernorm = nn.RMSNorm(c.hidden_size, eps=c.norm_eps)
        self.mixer = JetBlock(
            c.hidden_size,
            heads,
            heads,
            dk,
            dv,
            c.jet_conv_size,
            c.jet_norm_eps,
            c.jet_generator_reduction,
        )

    def __call__(self, x, state, offset=0, window=None):
        h, state = self.mixer(self.input_layernorm(x), state, offset, window)
        return x + h, state


class _Unrolled:
    """One layer at one loop, for the sleep engine: shares the layer's weights, has its own
    state; the last layer of a loop applies the final norm. Not an nn.Module, so the shared
    weights are registered once (under `layers`)."""

    def __init__(self, layer, norm=None):
        self.layer, self.mixer, self.norm = layer, layer.mixer, norm

    def __call__(self, x, state, offset=0, window=None):
        x, state = self.layer(x, state, offset, window)
        return (self.norm(x) if self.norm is not None else x), state


class Model(SleepModel):
    model_type = "ouro"

    def __init__(self, config: OuroConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = [
            OuroBlock(config) if kind == "ouro" else JetLayer(config) for kind, _ in config.stack
        ]
        for layer in self.layers:
            if isinstance(layer, JetLayer):
                layer.mixer.o_proj.weight = mx.zeros_like(layer.mixer.o_proj.weight)
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.early_exit_gate = nn.Linear(config.hidden_size, 1, bias=True)
        if not config.tie_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def sleep_blocks(self) -> list:
        """The unrolled stack (total_ut_steps x len(layers)), rebuilt on each call so it always
        reflects the current modules (e.g. after quantization or LoRA)."""
        n = len(self.layers)
        return [
            _Unrolled(self.layers[k % n], self.norm if k % n == n - 1 else None)
            for k in range(self.config.total_ut_steps * n)
        ]

    def head(self, h):
        """Logits of features that already went through the final norm (every loop ends in it)."""
        return self.embed_tokens.as_linear(h) if self.tie_embeddings else self.lm_head(h)

    def keep_unquantized(self, path: str) -> bool:
        return path.startswith("early_exit_gate")  # it decides which loop answers: keep it exact

    # -- Ouro's own forward ----------------------------------------------------------------
    def loop_hidden_states(self, ids, state=None, offset: int = 0):
        """All loops. Returns ([h after loop u, post-norm] for each u, new state)."""
        layers = self.sleep_blocks()
        state = list(self.initial_state(ids.shape[0]) if state is None else state)
        per_loop = len(layers) // self.config.total_ut_steps
        h, hidden = self.embed(ids), []
        for k, layer in enumerate(layers):
            h, state[k] = layer(h, state[k], offset)
            if k % per_loop == per_loop - 1:
                hidden.append(h)
        return hidden, state

    def exit_pdf(self, hidden) -> mx.array:
        """[B, T, U]: p_u = lambda_u * prod_{j<u} (1 - lambda_j), the last step takes what is left."""
        remaining, pdf = None, []
        for u, h in enumerate(hidden):
            lam = mx.sigmoid(self.early_exit_gate(h)[..., 0].astype(mx.float32))
            if remaining is None:
                remaining = mx.ones_like(lam)
            if u < len(hidden) - 1:
                pdf.append(lam * remaining)
                remaining = remaining * (1 - lam)
            else:
                pdf.append(remaining)
        return mx.stack(pdf, axis=-1)

    def exit_steps(self, hidden, threshold: float) -> mx.array:
        """[B, T]: per token the first loop whose cumulative exit probability reaches
        `threshold`, or the last loop if none does."""
        reached = mx.cumsum(self.exit_pdf(hidden), axis=-1) >= threshold
        first = mx.argmax(reached.astype(mx.int32), axis=-1)
        return mx.where(reached.any(axis=-1), first, len(hidden) - 1)

    def __call__(
        self,
        ids,
        state=None,
        offset: int = 0,
        exit_at_step: Optional[int] = None,
        exit_threshold: Optional[float] = None,
        use_weighted_exit: bool = False,
        cache=None,
    ):
        """Logits [B, T, V] (a plain forward: all loops run). Which loop's logits, in the
        original's priority order:
          1. exit_at_step, else config.early_exit_step, if set: that loop;
          2. else exit_threshold, else config.early_exit_threshold, if set: per token the first
             loop whose cumulative exit probability reaches it (the default, 1.0, gives the last
             loop); note that exit_threshold=None falls back to the config value, as in the
             original, so weighted exit needs config.early_exit_threshold = None;
          3. else use_weighted_exit: the exit-probability-weighted mix of every loop's logits;
          4. else the last loop.
        With `cache` (mlx-lm's protocol, for its generation utilities) it continues a cached
        sequence and returns the last loop's logits, the default exit of a stock config."""
        if cache is not None:
            return super().__call__(ids, cache=cache)
        self.check_ids(ids)
        hidden, _ = self.loop_hidden_states(ids, state, offset)
        return self.exit_logits(hidden, exit_at_step, exit_threshold, use_weighted_exit)

    def exit_logits(self, hidden, exit_at_step=None, exit_threshold=None, use_weighted_exit=False):
        c = self.config
        step = exit_at_step if exit_at_step is not None else c.early_exit_step
        if step is not None:
            return self.head(hidden[step])
        threshold = exit_threshold if exit_threshold is not None else c.early_exit_threshold
        if threshold is not None:
            steps = self.exit_steps(hidden, threshold)
            logits = None
            for u in np.unique(np.array(steps)).tolist():  # only the loops some token exits at
                lu = self.head(hidden[u])
                logits = lu if logits is None else mx.where((steps == u)[..., None], lu, logits)
            return logits
        if use_weighted_exit:
            pdf = self.exit_pdf(hidden)
            return sum(pdf[..., u : u + 1] * self.head(h) for u, h in enumerate(hidden))
        return self.head(hidden[-1])


def insert_jet_layers(model: Model, k: int, after: Optional[List[int]] = None, **sizes) -> Model:
    """A copy of `model` with `k` MLP-free Jet layers inserted, outputs unchanged (zero o_proj).

    By default Jet layer j goes after Ouro block (j + 1) * n // k - 1, spreading them evenly
    (Ouro 1.4B, 24 blocks, k = 6: after blocks 3, 7, 11, 15, 19, 23). `sizes` overrides the Jet
    sizes (jet_heads, jet_head_k_dim, ...). The looped core is reset to the whole stack."""
    c = model.config
    if c.jet_after:
        raise ConfigError("this model already has inserted Jet layers")
    if k < 1:
        raise ConfigError(f"the number of Jet layers to insert must be >= 1 (got {k})")
    n = c.num_layers
    after = list(after) if after is not None else [(j + 1) * n // k - 1 for j in range(k)]
    if len(after) != k:
        raise ConfigError(f"{k} Jet layers but {len(after)} positions")
    new = Model(OuroConfig.from_dict({**c.to_dict(), "jet_after": after, "core": None, **sizes}))
    # Reuse the trained modules themselves (works for quantized ones too).
    trained = iter(model.layers)
    new.layers = [
        next(trained) if kind == "ouro" else layer
        for (kind, _), layer in zip(new.config.stack, new.layers)
    ]
    new.update_modules(
        dict(
            embed_tokens=model.embed_tokens,
            norm=model.norm,
            early_exit_gate=model.early_exit_gate,
            **({} if c.tie_embeddings else {"lm_head": model.lm_head}),
        )
    )
    return new
