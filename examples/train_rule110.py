"""Train a small hybrid on Rule 110 with N sleep loops from Python, then evaluate by t.

python examples/train_rule110.py --loops 2 --steps 200
"""

import argparse

import mlx_sleep  # noqa: F401  (first on Linux: loads a fast BLAS before mlx.core)
from mlx_sleep.config import ModelConfig, SleepConfig
from mlx_sleep.eval import evaluate, format_table
from mlx_sleep.tasks import get_task
from mlx_sleep.train import TrainConfig, Trainer

p = argparse.ArgumentParser()
p.add_argument("--loops", type=int, default=2)
p.add_argument("--steps", type=int, default=200)
p.add_argument("--out", default="runs/example-rule110")
args = p.parse_args()

task = get_task("rule110", n_strings=2, n_bits=8, steps=2, steps_range=(1, 2))
trainer = Trainer(
    args.out,
    ModelConfig(vocab_size=task.vocab_size, hidden_size=64, num_heads=4),
    SleepConfig(loops=args.loops, window=task.window),
    task,
    TrainConfig(steps=args.steps, batch_size=32, lr=2e-2, adam_lr=3e-3, warmup=20),
)
model = trainer.run()
results = evaluate(model, task, trainer.sleep, samples=256)
print(format_table({f"N = {args.loops}": results}, "t (steps)", "token"))
