"""Tests of the whole-batch baseline tracker and of the shared input checks."""

import pytest
import torch

from rail_interview.stat_tracking import BatchStatTracker


def test_literal_example():
    tracker = BatchStatTracker(num_prompts=3)
    rewards = torch.tensor([1.0, 2.0, 3.0, 6.0])
    # mean 3, population std sqrt((4 + 1 + 0 + 9) / 4) = sqrt(3.5)
    expected = (rewards - 3.0) / (3.5**0.5 + 1e-7)
    advantages = tracker.update(torch.tensor([0, 2, 2, 1]), rewards)
    torch.testing.assert_close(advantages, expected)
    assert advantages.dtype == torch.float32


def test_integer_rewards_are_converted_not_truncated():
    tracker = BatchStatTracker(num_prompts=2)
    advantages = tracker.update(torch.tensor([0, 1]), torch.tensor([0, 1]))
    torch.testing.assert_close(advantages, torch.tensor([-1.0, 1.0]), rtol=0, atol=1e-6)


def test_single_sample_and_empty_batch():
    tracker = BatchStatTracker(num_prompts=2)
    assert tracker.update(torch.tensor([1]), torch.tensor([5.0])).tolist() == [0.0]
    assert tracker.update(torch.tensor([], dtype=torch.int64), torch.tensor([])).shape == (0,)


def test_stats_and_fallback_say_nothing_is_tracked():
    tracker = BatchStatTracker(num_prompts=4)
    tracker.update(torch.tensor([0, 1]), torch.tensor([1.0, 2.0]))
    stats = tracker.stats()
    assert stats.mean.isnan().all() and stats.std.isnan().all()
    assert stats.count.tolist() == [0, 0, 0, 0] and stats.fallback.all()
    assert tracker.fallback_mask(torch.tensor([0, 3])).tolist() == [True, True]
    assert tracker.state_dict() == {}


@pytest.mark.parametrize(
    "ids, rewards, error, match",
    [
        ([0, 1], torch.tensor([1.0, 2.0]), TypeError, "must be torch tensors"),
        (torch.tensor([0, 1]), torch.tensor([1.0]), ValueError, "1-D tensors of one length"),
        (torch.tensor([[0, 1]]), torch.tensor([[1.0, 2.0]]), ValueError, "1-D"),
        (torch.tensor([0.0, 1.0]), torch.tensor([1.0, 2.0]), TypeError, "integer tensor"),
        (torch.tensor([0, 1]), torch.tensor([True, False]), TypeError, "floating or integer"),
        (torch.tensor([0, 3]), torch.tensor([1.0, 2.0]), ValueError, r"lie in \[0, 3\)"),
        (torch.tensor([-1, 0]), torch.tensor([1.0, 2.0]), ValueError, r"lie in \[0, 3\)"),
        (torch.tensor([0, 1]), torch.tensor([1.0, float("nan")]), ValueError, "finite"),
        (torch.tensor([0, 1]), torch.tensor([float("inf"), 1.0]), ValueError, "finite"),
    ],
)
def test_bad_input_is_refused_with_a_clear_message(ids, rewards, error, match):
    with pytest.raises(error, match=match):
        BatchStatTracker(num_prompts=3).update(ids, rewards)


def test_value_checks_can_be_switched_off():
    tracker = BatchStatTracker(num_prompts=3, check_values=False)
    out = tracker.update(torch.tensor([0, 1]), torch.tensor([1.0, float("nan")]))
    assert out.isnan().all()


@pytest.mark.parametrize(
    "kwargs", [dict(num_prompts=0), dict(num_prompts=2, eps=-1.0), dict(num_prompts=2, dtype=torch.int64)]
)
def test_bad_constructor_arguments(kwargs):
    with pytest.raises(ValueError):
        BatchStatTracker(**kwargs)


def test_eps_is_added_to_the_std_not_under_the_root():
    # A spread near sqrt(eps) tells (r - mean) / (std + eps) from
    # (r - mean) / sqrt(std**2 + eps): 0.99 against 0.71 here.
    tracker = BatchStatTracker(num_prompts=1, eps=1e-5, dtype=torch.float64)
    advantages = tracker.update(torch.tensor([0, 0]), torch.tensor([5 - 1e-3, 5 + 1e-3], dtype=torch.float64))
    torch.testing.assert_close(advantages, torch.tensor([-1e-3, 1e-3], dtype=torch.float64) / (1e-3 + 1e-5))


def test_float16_batches_are_normalised_in_float32():
    # The sum of these float16 rewards overflows float16; the advantages fit.
    rewards = torch.tensor([30000.0, 30000.0, 30016.0, 30016.0])
    advantages = BatchStatTracker(num_prompts=1, dtype=torch.float16).update(torch.zeros(4, dtype=torch.int64), rewards)
    assert advantages.dtype == torch.float16 and advantages.tolist() == [-1.0, -1.0, 1.0, 1.0]
