"""Fractional GPU resources pack several trials on one GPU: the path `resources: {gpu: 0.5}` takes.

The local Ray declares one GPU (Ray schedules by declared resources; none is used: the trainable only
records when it ran and which GPU Ray handed it), and trials go through the orchestrator's own
`tuner`, as an ablation's do.
"""
import time

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]

# long against what separates two trial actors' starts: a few 100 ms idle, 2 s seen with two busy loops
# on both cores of a 2-core machine
HOLD_S = 6.0


def _make_record(hold_s: float):
    # a closure is pickled by value: Ray workers cannot import this test module
    def record(config):
        import ray
        from ray import tune

        start = time.time()
        time.sleep(hold_s)
        tune.report({"start": start, "end": time.time(), "gpu_ids": ",".join(map(str, ray.get_gpu_ids()))})

    return record


def _run(tmp_path, gpu: float) -> list[dict]:
    from ray import tune

    from orchestrator.runner import tuner

    tc = tune.TuneConfig(max_concurrent_trials=2)
    grid = tuner(_make_record(HOLD_S), f"share-{gpu}", tmp_path, {"i": tune.grid_search([0, 1])}, tc,
                  {"cpu": 1, "gpu": gpu}, 0, False).fit()
    assert not grid.errors, grid.errors
    return [r.metrics for r in grid]


def _overlap(a: dict, b: dict) -> float:
    return min(a["end"], b["end"]) - max(a["start"], b["start"])


def test_half_a_gpu_per_trial_runs_two_trials_at_once_on_one_gpu(tmp_path):
    import ray

    from orchestrator import ray_env

    ray_env.init_local(2, num_gpus=1, log_to_driver=False)  # our own Ray on loopback, as start_ray
    try:
        shared = _run(tmp_path / "tune", 0.5)
        whole = _run(tmp_path / "tune", 1.0)
    finally:
        ray.shutdown()
    assert [m["gpu_ids"] for m in shared] == ["0", "0"]
    # both trials held the GPU at the same time (how long depends on how fast a loaded machine starts the
    # second actor; one after the other would give no overlap at all)
    assert _overlap(*shared) > 0.5
    # a whole GPU per trial: one after the other
    assert [m["gpu_ids"] for m in whole] == ["0", "0"]
    assert _overlap(*whole) <= 0
