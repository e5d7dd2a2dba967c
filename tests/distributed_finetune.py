"""Run by tests/test_finetune.py under `mlx.launch --backend ring -n 2`: fine-tune with LoRA and
with all weights, then every process writes the weights it holds to
WEIGHTS_DIR/<lora|full>-rank<r>.safetensors and the gradient of every step (what the optimizer
was given: summed over the processes, normalised, clipped) to
WEIGHTS_DIR/<lora|full>-grads-rank<r>.safetensors.

    python tests/distributed_finetune.py MODEL_DIR DATA OUT WEIGHTS_DIR STEPS VALID
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import mlx_sleep  # noqa: E402,F401  (loads the fast BLAS before mlx.core)
from mlx_sleep.finetune import Finetune, FinetuneConfig  # noqa: E402

FINE_TUNE_TYPES = ("lora", "full")


def config(fine_tune_type: str, steps: int) -> FinetuneConfig:
    """Global batch 4 (2 per process), 2 micro-batches per step. Small learning rates: Adam
    turns a gradient's rounding noise into an update of up to lr, and the processes sum in
    another order than one process. LoRA takes the chunkwise backward, full the block-by-block
    one (--memory-bound), so the data-parallel step runs through both."""
    return FinetuneConfig(
        memory_bound="chunk" if fine_tune_type == "lora" else "block",
        steps=steps,
        batch_size=4,
        grad_accum=2,
        fine_tune_type=fine_tune_type,
        lr=2e-4 if fine_tune_type == "lora" else 1e-3,
        adam_lr=1e-4,
        warmup=1,
        valid_every=0,
        checkpoint_every=2,
        log_every=1,
    )


def record_gradients(ft) -> dict:
    """{"step<i>.<name>": gradient} of every optimizer step `ft` takes from now on."""
    from mlx.utils import tree_flatten

    grads, update = {}, ft.optimizer.update

    def recording(model, gradients):
        step = len({k.split(".")[0] for k in grads})
        grads.update({f"step{step}.{k}": g for k, g in tree_flatten(gradients)})
        return update(model, gradients)

    ft.optimizer.update = recording
    return grads


def main(model_dir, data, out, weights_dir, steps, valid):
    import mlx.core as mx
    from mlx.utils import tree_flatten

    for kind in FINE_TUNE_TYPES:
        ft = Finetune(
            model_dir,
            data,
            os.path.join(out, kind),
            config(kind, int(steps)),
            valid=valid,
            progress=False,
        )
        grads = record_gradients(ft)
        ft.run()
        os.makedirs(weights_dir, exist_ok=True)
        mx.save_safetensors(
            os.path.join(weights_dir, f"{kind}-rank{ft.world.rank}.safetensors"),
            dict(tree_flatten(ft.model.parameters())),
        )
        mx.save_safetensors(
            os.path.join(weights_dir, f"{kind}-grads-rank{ft.world.rank}.safetensors"), grads
        )


if __name__ == "__main__":
    main(*sys.argv[1:7])
