"""Seeded synthetic tasks (numpy only): Rule 110 and Depo.

task = get_task("rule110", n_strings=2, n_bits=8, steps=4)
batch = task.sample(np.random.default_rng(0), batch_size=32)
metrics = accuracy_by_difficulty(batch, predictions)
"""

from __future__ import annotations

import dataclasses

from .base import MAX_SEQ_LEN, Batch, Task, accuracy_by_difficulty
from .depo import Depo
from .rule110 import Rule110, rule110_run, rule110_step

TASKS = {"rule110": Rule110, "depo": Depo}


def get_task(name: str, /, **settings) -> Task:
    """Build a task by name. Unknown names or settings raise a one-line ValueError."""
    if not isinstance(name, str) or name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}")
    cls = TASKS[name]
    allowed = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(settings) - set(allowed))  # "name" too: it is the task, not a setting
    if unknown:
        raise ValueError(
            f"unknown setting(s) {', '.join(unknown)} for task {name!r}; "
            f"settings: {', '.join(allowed)}"
        )
    try:
        task = cls(**settings)
    except TypeError as e:  # e.g. a number where a list belongs
        raise ValueError(f"task {name!r}: a setting has the wrong type ({e})")
    if task.seq_len > MAX_SEQ_LEN:
        raise ValueError(
            f"task {name!r} makes sequences of {task.seq_len} tokens, more than "
            f"{MAX_SEQ_LEN}; choose smaller settings"
        )
    return task


def task_from_dict(d: dict) -> Task:
    """Inverse of Task.to_dict()."""
    if not isinstance(d, dict):
        raise ValueError(f"task settings must be a JSON object (got {type(d).__name__})")
    d = dict(d)
    if "name" not in d:
        raise ValueError("task dict has no 'name'")
    return get_task(d.pop("name"), **d)


__all__ = [
    "Batch",
    "Task",
    "accuracy_by_difficulty",
    "Rule110",
    "Depo",
    "TASKS",
    "get_task",
    "task_from_dict",
    "rule110_step",
    "rule110_run",
]
