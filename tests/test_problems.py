"""Problems as plugins: a third problem registered from this file alone trains through train()."""

import csv
import dataclasses
import os
from typing import List

import ml_collections
import pytest
import torch

from rail_interview import problems, training
from rail_interview.configs import default


@dataclasses.dataclass
class TargetProblem:
    """Each prompt has a target number; the reward is minus the squared distance of the answer to it."""

    prompt_names: List[str]
    targets: torch.Tensor  # float32 [P]
    metric_names = ("mean_error",)
    shares_prompt_draws = False

    @property
    def num_prompts(self) -> int:
        """P."""
        return len(self.prompt_names)

    def sample_prompt_ids(self, batch_size, generator, *, rank=0, world_size=1):
        """Prompts uniformly with replacement."""
        return torch.randint(self.num_prompts, (batch_size,), generator=generator)

    def rewards(self, prompt_ids, answers):
        """``-(answer - target)**2``."""
        return -((answers - self.targets[prompt_ids]) ** 2)

    def metrics(self, policy, prompt_ids, rewards):
        """The mean distance of the policy's means to the targets."""
        return (policy.params - self.targets).abs().mean().reshape(1)


class MeanPolicy:
    """One Gaussian mean per prompt, std 1."""

    def __init__(self, num_prompts: int) -> None:
        self.params = torch.zeros(num_prompts)

    def sample(self, prompt_ids, generator):
        """``Normal(params[p], 1)``."""
        return self.params[prompt_ids] + torch.randn(prompt_ids.shape, generator=generator)

    def update(self, prompt_ids, answers, advantages, learning_rate):
        """REINFORCE on the means, averaged per prompt."""
        steps = advantages * (answers - self.params[prompt_ids])
        total = torch.zeros_like(self.params).index_add_(0, prompt_ids, steps)
        count = torch.zeros_like(self.params).index_add_(0, prompt_ids, torch.ones_like(steps))
        self.params.add_(total / count.clamp_min(1), alpha=learning_rate)


def _make(config, generator):
    targets = (torch.rand(config.num_prompts, generator=generator) * 2 - 1) * config.target_scale
    problem = TargetProblem([f"prompt-{i}" for i in range(config.num_prompts)], targets)
    return problem, MeanPolicy(config.num_prompts)


def _check(config, world_size):
    problems.check_positive("problem.target_scale", config.problem.target_scale, integer=False)


@pytest.fixture
def target_problem(monkeypatch):
    """The problem, registered for one test (the registry is restored afterwards)."""
    monkeypatch.setattr(problems, "_REGISTRY", dict(problems._REGISTRY))  # pylint: disable=protected-access
    return problems.register(
        problems.ProblemSpec(
            name="target", options=("num_prompts", "target_scale"), make=_make, bad_final_reward=-4.0, check=_check
        )
    )


def _config():
    config = default.get_config()
    config.problem = ml_collections.ConfigDict({"name": "target", "num_prompts": 8, "target_scale": 3.0})
    config.device, config.num_epochs, config.log_every, config.checkpoint_every = "cpu", 150, 50, 50
    config.sample_batch_size, config.learning_rate = 32, 0.5
    config.stat_tracking.buffer_size, config.stat_tracking.min_count = 8, 4
    return config


def test_a_third_problem_registered_here_trains_through_train(target_problem, tmp_path):
    assert "target" in problems.names() and problems.bad_final_reward("target") == -4.0
    summary = training.train(_config(), str(tmp_path))
    with open(os.path.join(summary["run_dir"], "metrics.csv"), newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["epoch", "reward_mean", "reward_std", "fallback_frac", "mean_error"]
    assert summary["problem"] == "target" and summary["final_mean_error"] < 0.5 < float(rows[0]["mean_error"])
    assert summary["final_reward"] > problems.bad_final_reward("target")
    resumed = training.train(
        training.load_run_config(summary["run_dir"], {"num_epochs": 200}), summary["run_dir"], resume=True
    )
    assert resumed["resumed_at_epoch"] == 150 and resumed["num_epochs"] == 200


def test_its_fields_and_checks_come_from_its_spec(target_problem):
    config = _config()
    config.problem.target_scale = -1.0
    with pytest.raises(training.ConfigError, match="config.problem.target_scale must be a number > 0"):
        training.validate_config(config)
    del config.problem["target_scale"]
    with pytest.raises(training.ConfigError, match="config.problem.target_scale is missing"):
        training.validate_config(config)
    config.problem.target_scale, config.problem.num_params = 1.0, 4
    with pytest.raises(training.ConfigError, match="not a field of problem 'target'"):
        training.validate_config(config)


def test_the_registry_refuses_unknown_names_and_second_registrations(target_problem):
    config = _config()
    config.problem.name = "nope"
    with pytest.raises(training.ConfigError, match="unknown config.problem.name 'nope'; choose from 'distance', "):
        training.validate_config(config)
    with pytest.raises(ValueError, match="registered already"):
        problems.register(target_problem)
    with pytest.raises(ValueError, match="must name num_prompts"):
        problems.register(dataclasses.replace(target_problem, name="other", options=("size",)))
