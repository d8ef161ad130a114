"""Tests of the toy problem: determinism, shapes, and the update rule."""

import math

import pytest
import torch

from rail_interview.problems.distance import GaussianPolicy, ToyProblem, make_prompt_names, make_toy_problem


def _draw(seed: int, num_prompts: int = 64, num_params: int = 1024):
    generator = torch.Generator().manual_seed(seed)
    problem, policy = make_toy_problem(num_prompts=num_prompts, num_params=num_params, generator=generator)
    ids = problem.sample_prompt_ids(256, generator)
    samples = policy.sample(ids, generator)
    return problem, policy, ids, samples


def test_same_seed_same_instance_and_samples():
    a, b = _draw(0), _draw(0)
    assert a[0].prompt_names == b[0].prompt_names
    for x, y in [
        (a[0].slots, b[0].slots),
        (a[0].sigmas, b[0].sigmas),
        (a[0].labels, b[0].labels),
        (a[1].params, b[1].params),
        (a[2], b[2]),
        (a[3], b[3]),
    ]:
        assert torch.equal(x, y)


def test_different_seeds_differ():
    a, b = _draw(0), _draw(1)
    assert a[0].prompt_names != b[0].prompt_names
    assert not torch.equal(a[0].labels, b[0].labels)
    assert not torch.equal(a[1].params, b[1].params)


def test_shapes_dtypes_ranges_and_device():
    problem, policy, ids, samples = _draw(3)
    device = torch.device("cpu")
    assert len(problem.prompt_names) == 64 == len(set(problem.prompt_names))
    assert all(len(name.split("-")) == 2 for name in problem.prompt_names)
    for tensor, dtype, shape in [
        (problem.slots, torch.int64, (64,)),
        (problem.sigmas, torch.float32, (64,)),
        (problem.labels, torch.float32, (64,)),
        (policy.params, torch.float32, (1024,)),
        (ids, torch.int64, (256,)),
        (samples, torch.float32, (256,)),
        (problem.rewards(ids, samples), torch.float32, (256,)),
    ]:
        assert tensor.dtype == dtype and tuple(tensor.shape) == shape and tensor.device == device
    assert problem.slots.min() >= 0 and problem.slots.max() < 1024
    assert problem.sigmas.min() >= 0 and problem.sigmas.max() < 4
    assert torch.equal(problem.labels, problem.labels.round())
    assert problem.labels.min() >= 0 and problem.labels.max() < 256
    assert policy.params.min() >= 0 and policy.params.max() < 256
    assert ids.min() >= 0 and ids.max() < 64
    assert (problem.rewards(ids, samples) <= 0).all()


@pytest.mark.parametrize("num_prompts", [1, 2, 7, 64])
def test_sampling_draws_every_prompt_in_range_about_equally_often(num_prompts):
    generator = torch.Generator().manual_seed(0)
    problem = ToyProblem.create(num_prompts=num_prompts, num_params=1024, generator=generator)
    draws_per_prompt = 2000
    ids = problem.sample_prompt_ids(num_prompts * draws_per_prompt, generator)
    assert ids.dtype == torch.int64 and ids.shape == (num_prompts * draws_per_prompt,)
    assert ids.min() >= 0 and ids.max() < num_prompts
    counts = torch.bincount(ids, minlength=num_prompts)
    # Uniform: 2000 +- 45 draws per prompt; +-15% is more than 6 standard deviations.
    assert counts.min() > 0.85 * draws_per_prompt and counts.max() < 1.15 * draws_per_prompt, counts.tolist()


def test_slot_collisions_happen_at_the_expected_rate():
    # 64 prompts in 1024 slots share about 64 * 63 / 2 / 1024 ~ 2 pairs of slots.
    collisions = [64 - len(set(_draw(seed)[0].slots.tolist())) for seed in range(40)]
    assert 1.0 < sum(collisions) / len(collisions) < 3.0


def test_names_beyond_the_word_pairs_get_a_suffix_and_stay_distinct():
    names = make_prompt_names(5000, torch.Generator().manual_seed(0))
    assert len(set(names)) == 5000
    assert any(name.count("-") == 2 for name in names)


def test_samples_follow_the_policy_mean_and_sigma():
    generator = torch.Generator().manual_seed(0)
    problem = ToyProblem.create(num_prompts=2, num_params=4, generator=generator)
    policy = GaussianPolicy(problem, generator=generator)
    ids = torch.zeros(200_000, dtype=torch.int64)
    samples = policy.sample(ids, generator)
    mean = policy.params[problem.slots[0]]
    assert samples.mean().item() == pytest.approx(mean.item(), abs=0.05)
    assert samples.std().item() == pytest.approx(problem.sigmas[0].item(), abs=0.05)


def test_reward_is_minus_absolute_error():
    generator = torch.Generator().manual_seed(0)
    problem = ToyProblem.create(num_prompts=3, num_params=8, generator=generator)
    ids = torch.tensor([0, 1, 2])
    samples = problem.labels + torch.tensor([2.0, -3.0, 0.0])
    torch.testing.assert_close(problem.rewards(ids, samples), torch.tensor([-2.0, -3.0, 0.0]))


def test_update_averages_samples_that_share_a_slot():
    problem = ToyProblem(
        prompt_names=["a", "b", "c"],
        slots=torch.tensor([5, 5, 1]),
        sigmas=torch.ones(3),
        labels=torch.zeros(3),
        num_params=8,
    )
    policy = GaussianPolicy(problem, generator=torch.Generator().manual_seed(0))
    policy.params = torch.arange(8, dtype=torch.float32) * 10  # slot 5 holds 50, slot 1 holds 10
    ids = torch.tensor([0, 1, 2])  # prompts a and b share slot 5
    samples = torch.tensor([54.0, 40.0, 13.0])
    advantages = torch.tensor([1.0, 0.5, -2.0])
    policy.update(ids, samples, advantages, learning_rate=1.0)
    # Slot 5: mean of 1.0 * (54 - 50) and 0.5 * (40 - 50) = (4 - 5) / 2 = -0.5.
    # Slot 1: -2.0 * (13 - 10) = -6. Other slots are untouched.
    expected = torch.arange(8, dtype=torch.float32) * 10
    expected[5] = 49.5
    expected[1] = 4.0
    torch.testing.assert_close(policy.params, expected)


def test_expected_reward_at_the_optimum_matches_the_floor():
    # With the mean on the label, E|sample - label| = sigma * sqrt(2 / pi).
    generator = torch.Generator().manual_seed(0)
    problem = ToyProblem.create(num_prompts=1, num_params=1, generator=generator)
    policy = GaussianPolicy(problem, generator=generator)
    policy.params[:] = problem.labels[0]
    ids = torch.zeros(400_000, dtype=torch.int64)
    reward = problem.rewards(ids, policy.sample(ids, generator)).mean().item()
    assert reward == pytest.approx(-problem.sigmas[0].item() * math.sqrt(2 / math.pi), rel=0.02, abs=1e-3)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_everything_lives_on_the_generator_device():
    generator = torch.Generator(device="cuda").manual_seed(0)
    problem, policy = make_toy_problem(num_prompts=8, num_params=16, generator=generator)
    ids = problem.sample_prompt_ids(32, generator)
    samples = policy.sample(ids, generator)
    for tensor in (
        problem.slots,
        problem.sigmas,
        problem.labels,
        policy.params,
        ids,
        samples,
        problem.rewards(ids, samples),
    ):
        assert tensor.device.type == "cuda"
