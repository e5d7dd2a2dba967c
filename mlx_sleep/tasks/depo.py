"""Depo (from Physics of Language Models Part 4.1, as "Language Models Need Sleep" uses it):
a directed cycle given as shuffled edges, evicted before queries "k-th successor of v".

Token layout (defaults: max_nodes=75, context_len=300, n_queries=10, so T = 320):

    PAD .. PAD  a b ;  a b ;  ...  a b ;   v +k  v +k  ...  v +k
    '---- context_len tokens, left-padded ---'  '- 2*n_queries -'

  * token ids: 0 PAD "<pad>", 1 ";" (end of edge), 2 .. 1+max_hops the hop tokens
    "+1" .. "+{max_hops}", then n_names node names "n0", "n1", ...
    (vocab = 2 + max_hops + n_names = 146 by default).
  * a cycle of n nodes (n uniform in [min_nodes, max_nodes] per sequence) has n edges
    "a b ;" meaning b is the successor of a; their order is a random permutation. Each
    sequence draws n distinct random names from the n_names pool, so no graph can be
    memorised and the edges must be read from the context.
  * the edge list (3n tokens) is left-padded with PAD to context_len, so the queries always
    start at the same position and context_len is a multiple of the window: every context
    chunk is all-context (it sleeps) and is evicted (hard) before the queries arrive.
  * each query is two tokens [v, +k]; the model is scored at the "+k" position against the
    k-th successor of v (k can exceed n: the walk goes round the cycle). difficulty = k.
    Query nodes are distinct within a sequence when n >= n_queries. The whole query part
    (2*n_queries tokens) is one chunk holding answers, so it must fit in one window; the
    default n_queries is therefore min(10, window // 2) (10 at the paper's L = 75).
  * T = context_len + 2*n_queries = 320 with the defaults. The paper's T = 360 presumably
    counts longer query/answer encodings; ours keeps the paper's <= 300 left-padded edge
    tokens, 10 queries and L = 75 (4 context chunks, then the answer chunk).

Choices the paper leaves open: single-token node names (Physics of LM also has multi-token
names), the ";" edge terminator, the name pool of 128, n uniform in [3, max_nodes].
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..config import check_int
from .base import MAX_SIZE, Batch, Task, check_choice

PAD, SEP, HOP0 = 0, 1, 2  # HOP0 + (k - 1) is the token for "+k"
EDGE_TOKENS = 3  # "a b ;"
DEFAULT_EVAL_HOPS = (1, 2, 4, 8, 16)
DEFAULT_QUERIES = 10  # the paper's; fewer when the window is too small to hold them
ORDER_WORDS = {
    "shuffled": "in random order",
    "forward": "in cycle order from a random node (a b ; b c ; ...)",
    "reverse": "in reverse cycle order from a random node (.. b c ; a b ;)",
}


@dataclass(frozen=True)
class Depo(Task):
    """Settings of the Depo task; see the module docstring for the layout."""

    max_nodes: int = 75
    min_nodes: int = 3  # n is uniform in [min_nodes, max_nodes] per sequence
    n_names: int = 128  # node-name vocabulary, >= max_nodes
    max_hops: int = 16  # hop tokens "+1" .. "+max_hops"; training k uniform in [1, max_hops]
    hops: tuple[int, ...] | None = None  # trained hop counts (None: 1 .. max_hops); also evaluated
    hop_weights: tuple[float, ...] | None = None  # relative frequency of each of `hops` in training
    n_queries: int | None = None  # None -> min(10, window // 2): the answer chunk fits a window
    window: int = 75  # sleep window L
    context_len: int = 300  # edges + left padding; a multiple of window
    eviction: str = "hard"
    # Order of the edges in the context: "shuffled" (the paper's), "forward" (following the cycle
    # from a random node: every edge is written before the edge that continues it) or "reverse".
    edge_order: str = "shuffled"
    # Up to this many <pad> tokens before each edge (uniform per edge): edges no longer sit at
    # fixed distances, so "the node two edges further on" is not a position a pass can read off.
    edge_gap: int = 0

    name = "depo"

    def __post_init__(self):
        if self.n_queries is None:
            object.__setattr__(self, "n_queries", min(DEFAULT_QUERIES, self.window // 2))
        check_int("max_nodes", self.max_nodes, 2, MAX_SIZE)
        check_int("min_nodes", self.min_nodes, 2, self.max_nodes)
        check_int("n_names", self.n_names, self.max_nodes, MAX_SIZE)
        check_int("max_hops", self.max_hops, 1, MAX_SIZE)
        check_int("n_queries", self.n_queries, 1)
        check_int("window", self.window, 1, MAX_SIZE)
        check_int("context_len", self.context_len, 1, MAX_SIZE)
        check_choice("eviction", self.eviction, {"hard", "sliding"})
        check_choice("edge_order", self.edge_order, {"shuffled", "forward", "reverse"})
        check_int("edge_gap", self.edge_gap, 0, MAX_SIZE)
        self._check_hops()
        need = (EDGE_TOKENS + self.edge_gap) * self.max_nodes
        if self.context_len < need:
            raise ValueError(
                f"context_len must be >= {EDGE_TOKENS + self.edge_gap}*max_nodes = {need} to "
                f"hold the edge list ('a b ;' per edge{self._describe_gap()}); raise "
                f"context_len or lower max_nodes (got context_len={self.context_len}, "
                f"max_nodes={self.max_nodes})"
            )
        if self.context_len % self.window != 0:
            raise ValueError(
                f"context_len must be a multiple of window so every context chunk is evicted "
                f"before the queries (got context_len={self.context_len}, window={self.window})"
            )
        if 2 * self.n_queries > self.window:
            raise ValueError(
                f"n_queries must be <= window // 2 = {self.window // 2} so the "
                f"2*n_queries query tokens form one answer chunk (got {self.n_queries})"
            )

    def _check_hops(self):
        if self.hops is not None:
            if (
                isinstance(self.hops, (str, bytes))
                or not hasattr(self.hops, "__len__")
                or len(self.hops) == 0
            ):
                raise ValueError(
                    f"hops must be a list of hop counts, e.g. [1, 3] (got {self.hops!r})"
                )
            for k in self.hops:
                check_int("each of hops", k, 1, self.max_hops)
            if len(set(self.hops)) != len(self.hops):
                raise ValueError(f"hops must not repeat a hop count (got {list(self.hops)})")
            object.__setattr__(self, "hops", tuple(int(k) for k in self.hops))
        if self.hop_weights is not None:
            n = len(self.train_hops)
            w = self.hop_weights
            if (
                isinstance(w, (str, bytes))
                or not hasattr(w, "__len__")
                or len(w) != n
                or not all(isinstance(x, (int, float)) and x >= 0 for x in w)
                or sum(w) <= 0
            ):
                raise ValueError(
                    f"hop_weights must be {n} non-negative numbers, one per trained "
                    f"hop count {list(self.train_hops)}, not all 0 (got {w!r})"
                )
            object.__setattr__(self, "hop_weights", tuple(float(x) for x in w))

    @property
    def train_hops(self) -> tuple[int, ...]:
        """The hop counts k drawn for training items."""
        return self.hops if self.hops is not None else tuple(range(1, self.max_hops + 1))

    @property
    def seq_len(self) -> int:
        return self.context_len + 2 * self.n_queries

    @property
    def vocab_size(self) -> int:
        return HOP0 + self.max_hops + self.n_names

    @property
    def name_offset(self) -> int:
        """Token id of node name 0."""
        return HOP0 + self.max_hops

    @property
    def eval_difficulties(self) -> tuple[int, ...]:
        if self.hops is not None:
            return tuple(sorted(self.hops))
        return tuple(sorted({min(k, self.max_hops) for k in DEFAULT_EVAL_HOPS}))

    def hop_token(self, k: int) -> int:
        return HOP0 + k - 1

    def token_names(self) -> list[str]:
        return (
            ["<pad>", ";"]
            + [f"+{k}" for k in range(1, self.max_hops + 1)]
            + [f"n{j}" for j in range(self.n_names)]
        )

    def sample(
        self, rng: np.random.Generator, batch_size: int, difficulty: int | None = None
    ) -> Batch:
        if difficulty is not None:
            check_int("difficulty (Depo hop count k)", difficulty, 1, self.max_hops)
        B, C, Q = batch_size, self.context_len, self.n_queries
        T = self.seq_len
        inputs = np.full((B, T), PAD, dtype=np.int32)
        targets = np.zeros((B, T), dtype=np.int32)
        mask = np.zeros((B, T), dtype=np.float32)
        diff = np.full((B, T), -1, dtype=np.int32)
        hop_pos = C + 1 + 2 * np.arange(Q)  # position of each "+k" token

        for b in range(B):
            n = int(rng.integers(self.min_nodes, self.max_nodes + 1))
            # names in cycle order: node names[i] -> names[(i + 1) % n]
            names = self.name_offset + rng.choice(self.n_names, size=n, replace=False)
            if self.edge_order == "shuffled":
                order = rng.permutation(n)
            else:
                order = (int(rng.integers(n)) + np.arange(n)) % n
                if self.edge_order == "reverse":
                    order = order[::-1]
            edges = np.stack([names[order], names[(order + 1) % n], np.full(n, SEP)], axis=1)
            if self.edge_gap:
                gaps = rng.integers(0, self.edge_gap + 1, size=n)
                edges = [np.concatenate([np.full(g, PAD), e]) for g, e in zip(gaps, edges)]
                edges = np.concatenate(edges)
            edges = edges.reshape(-1)
            inputs[b, C - len(edges) : C] = edges

            start = rng.choice(n, size=Q, replace=n < Q)
            if difficulty is None:
                k = self._draw_hops(rng, Q)
            else:
                k = np.full(Q, difficulty)
            inputs[b, hop_pos - 1] = names[start]
            inputs[b, hop_pos] = HOP0 + k - 1
            targets[b, hop_pos] = names[(start + k) % n]
            mask[b, hop_pos] = 1.0
            diff[b, hop_pos] = k
        return Batch(inputs, targets, mask, diff)

    def _draw_hops(self, rng: np.random.Generator, size: int) -> np.ndarray:
        if self.hops is None and self.hop_weights is None:
            return rng.integers(1, self.max_hops + 1, size=size)  # the original stream, unchanged
        p = None
        if self.hop_weights is not None:
            p = np.asarray(self.hop_weights) / sum(self.hop_weights)
        return rng.choice(np.asarray(self.train_hops), size=size, p=p)

    def _describe_hops(self) -> str:
        if self.hops is None and self.hop_weights is None:
            return f"k uniform in [1, {self.max_hops}] for training"
        ks = ", ".join(str(k) for k in self.train_hops)
        if self.hop_weights is None:
            return f"k uniform in {{{ks}}} for training"
        w = ", ".join(f"{x:g}" for x in self.hop_weights)
        return f"k in {{{ks}}} with weights ({w}) for training"

    def _describe_gap(self) -> str:
        return f" with 0-{self.edge_gap} <pad> before each edge" if self.edge_gap else ""

    def describe(self) -> str:
        return (
            f"Depo: a directed cycle of n nodes (n uniform in [{self.min_nodes}, "
            f"{self.max_nodes}]; each sequence draws n distinct names from a pool of "
            f"{self.n_names} single-token names) written as its n edges 'a b ;' (b follows a) "
            f"{ORDER_WORDS[self.edge_order]}{self._describe_gap()}, left-padded with <pad> to "
            f"{self.context_len} tokens, then "
            f"{self.n_queries} queries 'v +k', each scored at the '+k' token against the k-th "
            f"successor of v ({self._describe_hops()}; k may exceed n, "
            f"the walk wraps; query nodes distinct when n >= {self.n_queries}). T = "
            f"{self.seq_len} (the paper says 360; our query encoding is 2 tokens per query), "
            f"vocab = {self.vocab_size}. Window L = {self.window}: the context is "
            f"{self.context_len // self.window} sleep chunks, all evicted ({self.eviction}) "
            f"before the single answer chunk of {2 * self.n_queries} tokens. Evaluated at k in "
            f"{self.eval_difficulties}."
        )
