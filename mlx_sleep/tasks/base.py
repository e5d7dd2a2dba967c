"""The shared shape of a synthetic task: a `Batch` of tokens plus what is scored, a
`Task` base class, and `accuracy_by_difficulty` for turning predictions into accuracies.

Everything here is numpy only, so data generation never touches the accelerator and
stays bit-for-bit reproducible from a seed.

Conventions (others code against these):
  * `targets[:, p]` is the token the model must predict *at* position p, i.e. it is
    scored against the logits produced at p. Nothing is shifted.
  * `mask[:, p] == 1.0` exactly where `targets[:, p]` is scored. Where the mask is 0,
    `targets` is 0 and `difficulty` is -1.
  * `difficulty[:, p]` is the difficulty of the item scored at p (Rule 110: the number of
    steps t; Depo: the hop count k). Evaluation reports accuracy per difficulty.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Batch:
    inputs: np.ndarray  # int32 [B, T] tokens fed to the model
    targets: np.ndarray  # int32 [B, T] token to predict at each position (not shifted)
    mask: np.ndarray  # float32 [B, T] 1.0 where targets are scored
    difficulty: np.ndarray  # int32 [B, T] difficulty of the scored item, -1 elsewhere

    def __post_init__(self):
        shape = self.inputs.shape
        for name in ("targets", "mask", "difficulty"):
            if getattr(self, name).shape != shape:
                raise ValueError(
                    f"Batch.{name} has shape {getattr(self, name).shape}, expected {shape}"
                )

    @property
    def batch_size(self) -> int:
        return self.inputs.shape[0]

    @property
    def seq_len(self) -> int:
        return self.inputs.shape[1]


class Task:
    """Base class of the synthetic tasks. Subclasses are frozen dataclasses whose fields are
    the task's settings; `to_dict` / `task_from_dict` round-trip them through JSON."""

    name: str = ""
    # Also provided by every subclass (as a setting or a property):
    #   window: int                       default sleep window L (chunk length)
    #   eviction: str                     default eviction mode ("hard" or "sliding")
    #   eval_difficulties: tuple[int,...] difficulties `mlx-sleep eval` reports by

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    @property
    def seq_len(self) -> int:
        raise NotImplementedError

    def sample(
        self, rng: np.random.Generator, batch_size: int, difficulty: int | None = None
    ) -> Batch:
        raise NotImplementedError

    def token_names(self) -> list[str]:
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError

    def to_dict(self) -> dict:
        d = {"name": self.name}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            d[f.name] = list(v) if isinstance(v, tuple) else v
        return d

    def decode(self, tokens) -> str:
        """Tokens as a space-separated string of names, for printing examples."""
        names = self.token_names()
        return " ".join(names[int(t)] for t in tokens)


MAX_SIZE = 1 << 14  # the largest count/length a task setting takes (bounds data-generation time)
MAX_SEQ_LEN = 1 << 16  # the longest sequence a task may make


def check_choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {sorted(allowed)} (got {value!r})")


def accuracy_by_difficulty(batch: Batch, predictions: np.ndarray) -> dict:
    """Accuracy of `predictions` (int [B, T], e.g. argmax of logits) per difficulty.

    Returns {difficulty: {"exact", "token", "count"}, ..., "all": {...}} where
      exact: fraction of sequences whose scored items of that difficulty are all right
             (sequences with no item of that difficulty don't count for it),
      token: per-item accuracy,
      count: number of scored items.
    """
    predictions = np.asarray(predictions)
    if predictions.shape != batch.targets.shape:
        raise ValueError(
            f"predictions have shape {predictions.shape}, expected {batch.targets.shape}"
        )
    scored = batch.mask > 0
    correct = predictions == batch.targets

    def summarize(items: np.ndarray) -> dict:
        count = int(items.sum())
        if count == 0:
            return {"exact": 0.0, "token": 0.0, "count": 0}
        has_item = items.any(axis=1)
        all_right = (correct | ~items).all(axis=1)
        return {
            "exact": float(all_right[has_item].mean()),
            "token": float(correct[items].mean()),
            "count": count,
        }

    out = {}
    for d in np.unique(batch.difficulty[scored]):
        out[int(d)] = summarize(scored & (batch.difficulty == d))
    out["all"] = summarize(scored)
    return out
