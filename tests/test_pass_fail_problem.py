"""The pass/fail toy problem: its sampling, its closed-form pass probability, sharing and learning."""

import pytest
import torch

from rail_interview.problems.pass_fail import PassFailProblem, SharedLinearPolicy, make_pass_fail_problem
from rail_interview.stat_tracking import presets


def _problem(seed=0, **options):
    return make_pass_fail_problem(
        num_prompts=64, num_features=8, generator=torch.Generator().manual_seed(seed), **options
    )


def test_one_seed_one_instance():
    (a, _), (b, _), (c, _) = _problem(0), _problem(0), _problem(1)
    assert a.prompt_names == b.prompt_names and torch.equal(a.labels, b.labels) and torch.equal(a.sigmas, b.sigmas)
    assert not torch.equal(a.labels, c.labels)


def test_groups_are_distinct_prompts_repeated_contiguously():
    problem, _ = _problem()
    ids = problem.sample_groups(16, 4, torch.Generator().manual_seed(3))
    groups = ids.view(16, 4)
    assert (groups == groups[:, :1]).all() and len(set(groups[:, 0].tolist())) == 16
    with pytest.raises(ValueError, match="num_groups <= 64"):
        problem.sample_groups(65, 2, torch.Generator())


def test_pass_probability_is_the_monte_carlo_pass_rate():
    problem, policy = _problem()
    policy.params.normal_(generator=torch.Generator().manual_seed(4)).mul_(6)
    generator = torch.Generator().manual_seed(5)
    ids = torch.arange(problem.num_prompts).repeat(20_000)
    passed = problem.rewards(ids, policy.sample(ids, generator)).view(20_000, -1).mean(0)
    expected = problem.pass_probability(policy.means())
    tolerance = 4 * (expected * (1 - expected) / 20_000).sqrt() + 1e-3
    assert ((passed - expected).abs() <= tolerance).all()
    assert set(problem.rewards(ids[:100], policy.sample(ids[:100], generator)).tolist()) <= {0.0, 1.0}


def test_the_ceiling_is_reached_at_the_hidden_weights_and_prompts_start_far_below_it():
    problem, policy = _problem()
    start = problem.pass_probability(policy.means())
    assert float(start.median()) < 0.15 and float(start.mean()) < 0.25 * problem.ceiling()
    best = problem.best_pass_probability()
    assert 0.2 < float(best.min()) < float(best.max()) < 0.95  # a spread of difficulty
    hidden = torch.linalg.lstsq(problem.features, problem.labels.unsqueeze(1)).solution.squeeze(1)
    policy.params.copy_(hidden)
    torch.testing.assert_close(problem.pass_probability(policy.means()), best, atol=1e-4, rtol=0)


def test_a_step_on_one_prompt_moves_the_others():
    problem, policy = _problem()
    before = problem.pass_probability(policy.means())
    ids = torch.tensor([0, 0, 0, 0])
    answers = problem.labels[ids] + torch.tensor([-0.5, 0.2, 3.0, -4.0])
    policy.update(ids, answers, problem.rewards(ids, answers) - 0.5)
    moved = (problem.pass_probability(policy.means()) - before).abs()
    assert moved[0] > 0 and (moved[1:] > 1e-6).sum() > 30


@pytest.mark.parametrize(
    "make", [lambda p: presets.trl_grpo(p), lambda p: presets.trl_grpo(p, memory="buffer", buffer_size=16, min_count=4)]
)
def test_grpo_learns_it(make):
    problem, policy = _problem()
    tracker, generator = make(problem.num_prompts), torch.Generator().manual_seed(7)
    start = float(problem.pass_probability(policy.means()).mean())
    for _ in range(300):
        ids = problem.sample_groups(16, 4, generator)
        answers = policy.sample(ids, generator)
        policy.update(ids, answers, tracker.update(ids, problem.rewards(ids, answers)), learning_rate=5.0)
    end = float(problem.pass_probability(policy.means()).mean())
    assert end > start + 0.3 * (problem.ceiling() - start)


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="must be positive"):
        PassFailProblem.create(num_prompts=0, num_features=2, generator=torch.Generator())
    with pytest.raises(ValueError, match="min_sigma <= max_sigma"):
        PassFailProblem.create(num_prompts=2, num_features=2, generator=torch.Generator(), min_sigma=2, max_sigma=1)
    assert SharedLinearPolicy(
        PassFailProblem.create(num_prompts=2, num_features=3, generator=torch.Generator())
    ).params.shape == (3,)


def test_metrics_are_the_true_pass_rate_and_the_share_of_groups_without_signal():
    problem, policy = _problem(group_size=4)
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0])  # mixed, all pass, all fail
    ids = torch.tensor([5] * 4 + [9] * 4 + [2] * 4)
    pass_rate, zero_variance = problem.metrics(policy, ids, rewards).tolist()
    assert zero_variance == pytest.approx(2 / 3)
    assert pass_rate == float(problem.pass_probability(policy.means()).mean())
    assert problem.metric_names == ("pass_rate", "zero_variance_frac")


def test_ranks_drawing_alike_get_distinct_prompts_and_one_process_draws_sample_groups():
    problem, _ = _problem(group_size=4)
    state = torch.Generator().manual_seed(7).get_state()

    def draw(**ranks):
        return problem.sample_prompt_ids(32, torch.Generator().set_state(state), **ranks)

    alone, first, second = draw(), draw(rank=0, world_size=2), draw(rank=1, world_size=2)
    assert torch.equal(alone, problem.sample_groups(8, 4, torch.Generator().set_state(state)))
    assert torch.equal(first, alone)  # rank 0 keeps the first slice of the same order
    assert not set(first.tolist()) & set(second.tolist()) and len(set(second.tolist())) == 8
    with pytest.raises(ValueError, match="at most 64 groups across 9 process"):
        draw(rank=0, world_size=9)
    with pytest.raises(ValueError, match="rank 2 is not in"):
        draw(rank=2, world_size=2)
    with pytest.raises(ValueError, match="multiple of the group size 4"):
        problem.sample_prompt_ids(30, torch.Generator())
