"""The demo's multi-seed summary: means, spreads and the verdict, from hand-made results."""

from mlx_sleep.demo import combine_seeds, conclude, seed_tables
from tests.numerics import assert_close


def fake(token_by_seed):
    return {
        s: {
            1: {"token": 1.0, "exact": 1.0, "count": 8},
            2: {"token": t, "exact": t / 2, "count": 8},
        }
        for s, t in token_by_seed.items()
    }


def test_combine_and_verdict():
    by_seed = {"N = 1": fake({0: 0.5, 1: 0.6, 2: 0.4}), "N = 3": fake({0: 0.7, 1: 0.75, 2: 0.5})}
    results, spread = combine_seeds(by_seed, [0, 1, 2])
    assert_close(results["N = 3"][2]["token"], 0.65, rtol=1e-12, what="mean over seeds")
    assert results["N = 3"][2]["count"] == 24 and spread["N = 1"][2] == (0.4, 0.6)
    assert results["N = 1"][2]["token_by_seed"] == [0.5, 0.6, 0.4]
    verdict = conclude(results, [0, 1, 2], "k (hops)")
    assert "N = 3 - N = 1 at k = 2: mean +0.150, min +0.100" in verdict
    assert "ahead by >= 0.10 on every seed" in verdict and "at k = 1: mean +0.000" in verdict
    table = seed_tables(results, by_seed, [0, 1, 2], "k (hops)")
    assert "| 2 | 0.500 [0.400, 0.600] | 0.650 [0.500, 0.750] |" in table
    assert "| 1 | 1.000 | 1.000 | 0.600 | 0.750 |" in table  # seed 1's row


def test_verdict_against_the_compute_matched_baseline_too():
    by_seed = {
        "N = 1": fake({0: 0.5, 1: 0.6}),
        "N = 3": fake({0: 0.9, 1: 0.95}),
        "N = 1, 3x steps": fake({0: 0.85, 1: 0.7}),
    }
    verdict = conclude(combine_seeds(by_seed, [0, 1])[0], [0, 1], "k (hops)")
    assert "N = 3 - N = 1 at k = 2: mean +0.375" in verdict
    assert "N = 3 - N = 1, 3x steps at k = 2: mean +0.150, min +0.050" in verdict
    assert "ahead on every seed, but not by the margin everywhere" in verdict
    assert "N = 1, 3x steps - N = 1" not in verdict  # baselines are not compared to each other


def test_verdict_when_mixed_or_behind():
    mixed = {"N = 1": fake({0: 0.5, 1: 0.6}), "N = 2": fake({0: 0.7, 1: 0.5})}
    assert "ahead on 1 of 2 seeds: the evidence points towards sleep" in conclude(
        combine_seeds(mixed, [0, 1])[0], [0, 1], "k (hops)"
    )
    behind = {"N = 1": fake({0: 0.5, 1: 0.6}), "N = 2": fake({0: 0.4, 1: 0.5})}
    assert "behind on every seed" in conclude(combine_seeds(behind, [0, 1])[0], [0, 1], "k")


def test_depth_curriculum_switches_hop_mix(tmp_path):
    import json

    from mlx_sleep.demo import DEMO, run_demo

    def evaluated(out, **changes):
        """(step, hop counts evaluated) of a 4-step N = 1 demo run with these settings."""
        settings = {
            **DEMO,
            "train": {**DEMO["train"], "eval_samples": 16, "batch_size": 8},
            "model": {**DEMO["model"], "hidden_size": 16},
            **changes,
        }
        run_demo(
            str(out), steps=4, loops=(1,), seeds=1, settings=settings, echo=lambda *a: None,
            progress=False,
        )  # fmt: skip
        metrics = [json.loads(l) for l in open(out / "seed0" / "N1" / "metrics.jsonl")]
        return [(m["step"], sorted(m["eval"])) for m in metrics if "eval" in m]

    # k = 1 only up to the switch (its checkpoint evaluates that task), then the full mix
    one = evaluated(tmp_path / "one", curriculum={"fraction": 0.5, "hops": [1]})
    assert one == [(2, ["1"]), (4, ["1", "2"])]
    # staged (k = 1, then 1-2, then the full 1-3), each phase ending at its own fraction
    staged = evaluated(
        tmp_path / "staged",
        task={**DEMO["task"], "max_hops": 3},
        curriculum=[{"fraction": 0.25, "hops": [1]}, {"fraction": 0.5, "hops": [1, 2]}],
    )
    assert staged == [(1, ["1"]), (2, ["1", "2"]), (4, ["1", "2", "3"])]
