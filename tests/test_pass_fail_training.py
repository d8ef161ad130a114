"""The pass/fail training loop: reproducible runs, learning, dynamic sampling and the summary's metrics."""

import math

import pytest
import torch

from rail_interview.problems.pass_fail import PassFailProblem
from rail_interview.studies.pass_fail_runs import PassFailRun, build_tracker, summarize, train_pass_fail


def test_one_seed_one_run():
    run = PassFailRun(num_steps=40)
    assert train_pass_fail(run) == train_pass_fail(run)
    assert train_pass_fail(run)["pass_rate"] != train_pass_fail(PassFailRun(num_steps=40, seed=1))["pass_rate"]


@pytest.mark.parametrize("method", ["grpo", "dr_grpo", "rloo"])
@pytest.mark.parametrize("memory", ["none", "buffer", "ema"])
def test_every_estimator_and_memory_learns(method, memory):
    learning_rate = 5.0 if method == "grpo" else 10.0
    result = train_pass_fail(PassFailRun(method=method, memory=memory, num_steps=300, learning_rate=learning_rate))
    start, ceiling = result["pass_rate"][0], result["ceiling"]
    assert max(result["pass_rate"]) > start + 0.3 * (ceiling - start), (method, memory)
    assert len(result["pass_rate"]) == 301 and len(result["zero_variance"]) == 300
    assert all(samples == 64 for samples in result["samples"])


def test_small_groups_have_many_zero_variance_groups():
    small = summarize(train_pass_fail(PassFailRun(group_size=2, num_groups=32, num_steps=60)))
    large = summarize(train_pass_fail(PassFailRun(group_size=16, num_groups=4, num_steps=60)))
    assert small["zero_variance"] > large["zero_variance"] > 0


def test_dynamic_sampling_spends_more_samples_on_groups_with_signal():
    result = train_pass_fail(PassFailRun(dynamic_sampling=True, num_steps=60))
    assert all(64 <= samples <= 4 * 64 for samples in result["samples"]) and sum(result["samples"]) > 60 * 64
    assert 0 < summarize(result)["zero_variance"] < 1


def test_dynamic_sampling_counts_the_groups_without_signal_it_drew(monkeypatch):
    """Three groups in four have signal: two draws of B fill the step, and a quarter of the 2B drawn had none."""

    def rewards(problem, ids, answers):
        pattern = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0])  # G = 2: groups (1,0) (1,0) (1,0) (0,0)
        return pattern.repeat(len(ids) // len(pattern))

    monkeypatch.setattr(PassFailProblem, "rewards", rewards)
    result = train_pass_fail(PassFailRun(dynamic_sampling=True, group_size=2, num_groups=32, num_steps=3))
    assert result["samples"] == [128, 128, 128] and result["zero_variance"] == [0.25, 0.25, 0.25]


def test_summary_metrics():
    result = {
        "pass_rate": [0.0, 0.2, 0.4, 0.4],
        "zero_variance": [0.5, 0.25, 0.0],
        "samples": [8, 8, 16],
        "ceiling": 0.5,
        "settings": {"num_groups": 4, "group_size": 2},
    }
    metrics = summarize(result, threshold=0.75)
    assert metrics["area"] == pytest.approx((0.2 + 0.4 + 0.4) / 3 / 0.5)
    # 24 samples at 8 a step: the first two steps weigh 8 each, the third's 16 are cut to 8.
    assert metrics["area_same_samples"] == pytest.approx(metrics["area"])
    result["samples"] = [16, 16, 16]  # dynamic sampling: the budget is spent in the first 1.5 steps
    assert summarize(result)["area_same_samples"] == pytest.approx((0.2 * 16 + 0.4 * 8) / 24 / 0.5)
    assert metrics["final"] == pytest.approx(0.8) and metrics["steps_to_threshold"] == 2
    assert metrics["zero_variance"] == pytest.approx(0.25) and metrics["samples"] == 32
    assert math.isinf(summarize(result, threshold=0.9)["steps_to_threshold"])


def test_unknown_settings_are_refused():
    with pytest.raises(ValueError, match="method must be one of"):
        build_tracker(PassFailRun(method="ppo"))
    with pytest.raises(ValueError, match="memory must be one of"):
        build_tracker(PassFailRun(memory="lstm"))


@pytest.mark.parametrize(
    "ablation, memory",
    [("zero_variance_only", "buffer"), ("group_mean_memory_std", "ema"), ("oracle", "none")],
)
def test_every_ablation_runs_and_learns(ablation, memory):
    result = train_pass_fail(PassFailRun(ablation=ablation, memory=memory, num_steps=300, learning_rate=5.0))
    start, ceiling = result["pass_rate"][0], result["ceiling"]
    assert max(result["pass_rate"]) > start + 0.3 * (ceiling - start)
    assert 0 <= summarize(result)["zero_variance"] < 1


def test_ablations_are_checked():
    with pytest.raises(ValueError, match="ablation must be one of"):
        train_pass_fail(PassFailRun(ablation="magic", num_steps=1))
    with pytest.raises(ValueError, match="needs a memory"):
        train_pass_fail(PassFailRun(ablation="zero_variance_only", num_steps=1))
