"""training.step: one step with its hooks, the piece every run takes."""

import pytest
import torch

from rail_interview import distributed, stat_tracking
from rail_interview.configs import default
from rail_interview.training.state import TrainingState
from rail_interview.training.step import Samples, step


def _state(context=None):
    config = default.get_config()
    config.problem.num_prompts, config.problem.num_params = 8, 16
    tracker = stat_tracking.BufferStatTracker(8, buffer_size=4, min_count=2)
    return TrainingState.create(config, tracker, device=torch.device("cpu"), context=context)


def test_a_step_draws_scores_estimates_and_updates_as_written_out_by_hand():
    by_step, by_hand = _state(), _state()
    batch = step(by_step, batch_size=32, learning_rate=0.5)
    ids = by_hand.problem.sample_prompt_ids(32, by_hand.generators.prompts)
    answers = by_hand.policy.sample(ids, by_hand.generators.answers)
    rewards = by_hand.problem.rewards(ids, answers)
    advantages = by_hand.tracker.update(ids, rewards)
    by_hand.policy.update(ids, answers, advantages, 0.5)
    assert torch.equal(batch.prompt_ids, ids) and torch.equal(batch.advantages, advantages)
    assert torch.equal(by_step.policy.params, by_hand.policy.params)
    assert by_step.tracker.state_dict().keys() == by_hand.tracker.state_dict().keys()
    for name, value in by_step.tracker.state_dict().items():
        assert torch.equal(value, by_hand.tracker.state_dict()[name]), name


def test_the_hooks_replace_the_draw_and_the_estimate():
    state = _state()
    fixed = Samples(torch.tensor([0, 0, 1]), torch.tensor([1.0, 2.0, 3.0]), torch.tensor([-1.0, 0.0, -2.0]))
    seen = []

    def estimate(tracker, samples):
        seen.append(samples)
        return torch.ones_like(samples.rewards)

    batch = step(state, batch_size=3, learning_rate=1.0, draw=lambda s, n: fixed, estimate=estimate)
    assert seen == [fixed] and batch.local is fixed and batch.advantages.tolist() == [1.0, 1.0, 1.0]
    assert state.tracker.stats().count.sum() == 0  # the estimate hook did not update the tracker


def test_an_empty_draw_changes_nothing_in_one_process_and_is_refused_across_ranks():
    state = _state()
    params, tracker_state = state.policy.params.clone(), state.tracker.state_dict()
    empty = Samples(torch.zeros(0, dtype=torch.int64), torch.zeros(0), torch.zeros(0))
    batch = step(state, batch_size=4, learning_rate=1.0, draw=lambda s, n: empty)
    assert batch.prompt_ids.numel() == 0 and torch.equal(state.policy.params, params)
    assert all(torch.equal(v, tracker_state[k]) for k, v in state.tracker.state_dict().items())
    ranks = _state(distributed.DistributedContext(rank=1, world_size=2))
    with pytest.raises(ValueError, match="rank 1 drew no samples; every rank must join the tracker's update"):
        step(ranks, batch_size=4, learning_rate=1.0, draw=lambda s, n: empty)


def test_a_tracker_with_fewer_ids_than_the_problem_has_prompts_is_refused():
    config = default.get_config()
    config.problem.num_prompts, config.problem.num_params = 8, 16
    with pytest.raises(ValueError, match="the tracker knows 4 prompts, the problem has 8"):
        TrainingState.create(config, stat_tracking.BufferStatTracker(4), device=torch.device("cpu"))
