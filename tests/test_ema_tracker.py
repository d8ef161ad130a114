"""EmaStatTracker against the one-reward-at-a-time reference, and hand-checked cases."""

import math
import random

import pytest
import torch

from rail_interview.stat_tracking import EmaStatTracker, ReferenceEmaStatTracker


def _check_step(tracker, reference, ids, rewards, *, rtol, atol):
    advantages = tracker.update(ids, rewards)
    expected = torch.tensor(reference.update(ids, rewards), dtype=torch.float64)
    torch.testing.assert_close(advantages.double(), expected, rtol=rtol, atol=atol)
    stats, ref_stats = tracker.stats(), reference.stats()
    for prompt in range(tracker.num_prompts):
        if prompt not in ref_stats:
            assert stats.count[prompt] == 0 and math.isnan(stats.mean[prompt].item())
            continue
        mean, std, count = ref_stats[prompt]
        assert stats.count[prompt].item() == count
        assert stats.mean[prompt].item() == pytest.approx(mean, rel=rtol, abs=atol)
        assert stats.std[prompt].item() == pytest.approx(std, rel=rtol, abs=atol)
        assert stats.fallback[prompt].item() == (count < tracker.min_count)


@pytest.mark.parametrize(
    "num_prompts, decay, min_count, max_batch",
    [
        (1, 0.9, 3, 30),  # one prompt, many repeats in each batch, first appearance inside a batch
        (6, 0.5, 2, 40),
        (64, 0.9, 16, 256),  # the toy problem's setting
        (64, 0.99, 16, 256),
        (300, 0.8, 2, 100),  # more prompts than samples
        (5, 0.01, 1, 20),  # almost no memory
    ],
)
def test_random_sequences_match_the_sequential_reference(num_prompts, decay, min_count, max_batch):
    rng = random.Random(num_prompts + int(decay * 100))
    generator = torch.Generator().manual_seed(rng.randrange(2**31))
    tracker = EmaStatTracker(num_prompts, decay, min_count, dtype=torch.float64)
    reference = ReferenceEmaStatTracker(decay, min_count)
    for _ in range(25):
        batch = rng.randint(1, max_batch)
        weights = torch.rand(num_prompts, generator=generator) ** 4
        ids = torch.multinomial(weights, batch, replacement=True, generator=generator)
        rewards = torch.randn(batch, generator=generator, dtype=torch.float64) * 20 - 100
        _check_step(tracker, reference, ids, rewards, rtol=1e-9, atol=1e-9)


def test_decay_power_tables_grow_with_the_batch():
    # The fold reads decay ** k from tables built for the largest batch so far:
    # a batch larger than every one before (one prompt taking all of it) must
    # rebuild them, and a smaller one after it must read the larger tables.
    generator = torch.Generator().manual_seed(3)
    tracker = EmaStatTracker(2, decay=0.7, min_count=2, dtype=torch.float64)
    reference = ReferenceEmaStatTracker(0.7, 2)
    for batch in (2, 1, 40, 3, 41, 7):
        ids = torch.zeros(batch, dtype=torch.int64)
        ids[::3] = 1
        rewards = torch.randn(batch, generator=generator, dtype=torch.float64)
        _check_step(tracker, reference, ids, rewards, rtol=1e-9, atol=1e-9)


def test_float32_is_stable_for_rewards_far_from_zero():
    # Rewards around -100 with a spread of 0.05: E[r^2] - E[r]^2 in float32 would
    # lose the variance entirely; shifted sums keep it.
    generator = torch.Generator().manual_seed(0)
    tracker = EmaStatTracker(8, decay=0.9, min_count=4)
    reference = ReferenceEmaStatTracker(0.9, 4)
    for _ in range(200):
        ids = torch.randint(8, (48,), generator=generator)
        rewards = -100.0 + 0.05 * torch.randn(48, generator=generator)
        advantages = tracker.update(ids, rewards)
        expected = torch.tensor(reference.update(ids, rewards.double()), dtype=torch.float64)
        torch.testing.assert_close(advantages.double(), expected, rtol=2e-3, atol=2e-3)
    ref_std = torch.tensor([reference.stats()[p][1] for p in range(8)], dtype=torch.float64)
    torch.testing.assert_close(tracker.stats().std.double(), ref_std, rtol=1e-3, atol=1e-6)


def test_hand_computed_case():
    # decay 0.75, not 0.5: a swap of decay and 1 - decay must show.
    tracker = EmaStatTracker(num_prompts=2, decay=0.75, min_count=3)
    # Prompt 0 sees 4, 8, 0: mean 4 -> 4 + 0.25 * 4 = 5 -> 5 - 0.25 * 5 = 3.75;
    # var 0 -> 0.75 * (0 + 0.25 * 16) = 3 -> 0.75 * (3 + 0.25 * 25) = 6.9375.
    # Count 3 reaches min_count: own statistics.
    # Prompt 1 sees 2 once: count 1, batch statistics over [4, 2, 8, 0].
    advantages = tracker.update(torch.tensor([0, 1, 0, 0]), torch.tensor([4.0, 2.0, 8.0, 0.0]))
    own_std = math.sqrt(6.9375) + 1e-6
    batch_std = math.sqrt(35 / 4) + 1e-6  # mean 3.5: deviations 0.5, -1.5, 4.5, -3.5
    torch.testing.assert_close(
        advantages, torch.tensor([0.25 / own_std, -1.5 / batch_std, 4.25 / own_std, -3.75 / own_std])
    )
    stats = tracker.stats()
    torch.testing.assert_close(stats.mean, torch.tensor([3.75, 2.0]))
    torch.testing.assert_close(stats.std, torch.tensor([math.sqrt(6.9375), 0.0]))
    assert stats.count.tolist() == [3, 1] and stats.fallback.tolist() == [False, True]


def test_same_rewards_in_one_batch_or_in_many_give_the_same_state():
    one_batch = EmaStatTracker(num_prompts=3, decay=0.8, min_count=1, dtype=torch.float64)
    many = EmaStatTracker(num_prompts=3, decay=0.8, min_count=1, dtype=torch.float64)
    ids = torch.tensor([2, 0, 2, 2, 1, 0, 2])
    rewards = torch.tensor([5.0, -1.0, 7.0, 6.0, 3.0, 2.0, 10.0], dtype=torch.float64)
    one_batch.update(ids, rewards)
    for i in range(len(ids)):
        many.update(ids[i : i + 1], rewards[i : i + 1])
    for name, tensor in one_batch.state_dict().items():
        torch.testing.assert_close(tensor, many.state_dict()[name], rtol=1e-12, atol=1e-12)


def test_integer_rewards_are_converted_not_truncated():
    tracker = EmaStatTracker(num_prompts=1, decay=0.5, min_count=1)
    tracker.update(torch.tensor([0, 0]), torch.tensor([1, 2]))
    assert tracker.stats().mean.item() == 1.5


@pytest.mark.parametrize("decay", [0.0, 1.0, -0.5, 1.5, float("nan")])
def test_decay_outside_the_open_unit_interval_is_refused(decay):
    with pytest.raises(ValueError, match="decay"):
        EmaStatTracker(num_prompts=2, decay=decay)


def test_negative_variance_in_a_state_is_refused():
    tracker = EmaStatTracker(num_prompts=2)
    state = tracker.state_dict()
    state["var"] = torch.tensor([0.0, -1.0])
    with pytest.raises(ValueError, match="non-negative"):
        tracker.load_state_dict(state)


@pytest.mark.parametrize("num_prompts", [300, 5000])
def test_large_batches_match_the_reference(num_prompts):
    # From 2048 samples on, groups come from per-prompt counts (P <= N) or
    # from linear scans (P > N).
    generator = torch.Generator().manual_seed(3)
    tracker = EmaStatTracker(num_prompts, 0.9, 4, dtype=torch.float64)
    reference = ReferenceEmaStatTracker(0.9, 4)
    for _ in range(3):
        ids = torch.randint(num_prompts, (3000,), generator=generator)
        rewards = torch.randn(3000, generator=generator, dtype=torch.float64) * 20 - 100
        _check_step(tracker, reference, ids, rewards, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("algorithm", ["index_add", "segment_reduce"])
def test_group_sums_take_no_rounding_from_other_prompts(algorithm):
    # R2 1/5 repro 1: differences of one float64 running sum over the sorted
    # batch (once CUDA's algorithm) gave prompt 1 std 0.05 and advantages +-2.
    from rail_interview.stat_tracking import ops

    tracker = EmaStatTracker(2, decay=0.5, min_count=1)
    with ops.forced_algorithms(segment_sum=algorithm):
        advantages = tracker.update(torch.tensor([0, 0, 1, 1]), torch.tensor([0.0, 1e8, 0.0, 0.2]))
    torch.testing.assert_close(tracker.stats().std[1], torch.tensor(0.1))
    torch.testing.assert_close(advantages[2:], torch.tensor([-1.0, 1.0]), rtol=1e-5, atol=1e-5)


def test_bfloat16_decay_weights_are_computed_in_float32():
    # R2 1/5 repro 3: 0.999 rounds to 1.0 in bfloat16, so decay ** k was 1 and
    # the variance grew without bound (std 5.66 after 1000 batches).
    generator = torch.Generator().manual_seed(0)
    stds = {}
    for dtype in (torch.float32, torch.bfloat16):
        tracker = EmaStatTracker(1, decay=0.999, min_count=2, dtype=dtype)
        generator.manual_seed(0)
        for _ in range(1000):
            tracker.update(torch.zeros(64, dtype=torch.int64), torch.randn(64, generator=generator))
        stds[dtype] = tracker.stats().std.item()
    assert abs(stds[torch.float32] - 1.0) < 0.05
    assert abs(stds[torch.bfloat16] - stds[torch.float32]) < 0.02  # bfloat16 holds about 3 digits


@pytest.mark.parametrize("one_batch", [True, False])
def test_float16_squares_deviations_in_float32(one_batch):
    # R2 1/5 repro 4: a deviation of 300 squared overflows float16 although
    # the variance, 0.9 * 0.1 * 300**2 = 8100, fits: std 90, advantage 3.
    tracker = EmaStatTracker(1, decay=0.9, min_count=2, dtype=torch.float16)
    ids, rewards = torch.tensor([0, 0]), torch.tensor([0.0, 300.0])
    if one_batch:
        advantages = tracker.update(ids, rewards)
    else:
        tracker.update(ids[:1], rewards[:1])
        advantages = tracker.update(ids[1:], rewards[1:])
    assert tracker.stats().std.tolist() == [90.0] and advantages[-1].item() == 3.0


@pytest.mark.parametrize("name, value", [("mean", float("nan")), ("mean", float("inf")), ("var", float("inf"))])
def test_state_with_non_finite_moments_is_refused(name, value):
    tracker = EmaStatTracker(num_prompts=2)
    tracker.update(torch.tensor([0, 1]), torch.tensor([1.0, 2.0]))
    before = tracker.state_dict()
    state = tracker.state_dict()
    state[name][1] = value
    with pytest.raises(ValueError, match="'mean' and 'var' must be finite"):
        tracker.load_state_dict(state)
    assert all(torch.equal(tracker.state_dict()[key], before[key]) for key in before)


def test_default_decay_is_the_one_the_readme_recommends():
    from rail_interview.configs import default

    assert EmaStatTracker(num_prompts=1).decay == default.get_config().stat_tracking.ema_decay == 0.7
    assert ReferenceEmaStatTracker().decay == 0.7


def test_state_with_zero_or_small_variance_is_accepted():
    # The variance check refuses negative values only.
    tracker = EmaStatTracker(num_prompts=3, min_count=2)
    state = {
        "mean": torch.tensor([1.0, 2.0, 3.0]),
        "var": torch.tensor([0.0, 0.25, 4.0]),
        "count": torch.tensor([1, 5, 9]),
    }
    tracker.load_state_dict(state)
    assert tracker.stats().std.tolist() == [0.0, 0.5, 2.0]


def test_a_tracker_loaded_from_a_state_dict_continues_bit_for_bit_after_a_large_batch():
    # The decay powers come from tables whose entries do not depend on how large
    # they grew (torch.pow's last bit can depend on an element's place in a call):
    # a tracker that saw a batch larger than the first tables and a fresh one
    # loaded from its state dict give the same bits from then on.
    generator = torch.Generator().manual_seed(11)
    tracker = EmaStatTracker(50, decay=0.9, min_count=2)
    tracker.update(torch.randint(50, (5000,), generator=generator), torch.randn(5000, generator=generator))
    resumed = EmaStatTracker(50, decay=0.9, min_count=2)
    resumed.load_state_dict(tracker.state_dict())
    for _ in range(20):
        ids = torch.randint(5, (40,), generator=generator)  # groups of about 8: weights from entries 1 to 20
        rewards = torch.randn(40, generator=generator)
        assert torch.equal(tracker.update(ids, rewards), resumed.update(ids, rewards))
    for name, tensor in tracker.state_dict().items():
        assert torch.equal(tensor, resumed.state_dict()[name]), name


def test_decay_power_tables_keep_their_entries_and_their_old_memory_when_they_grow(monkeypatch):
    from rail_interview.stat_tracking.ops import DecayPowers, group_by_prompt

    monkeypatch.setattr(DecayPowers, "MIN_ENTRIES", 8)
    monkeypatch.setattr(DecayPowers, "CHUNK", 4)
    powers = DecayPowers(0.37, scale=0.63, dtype=torch.float32, device=torch.device("cpu"))
    first = (powers._kept, powers._later)  # pylint: disable=protected-access
    groups = group_by_prompt(torch.zeros(30, dtype=torch.int64), 1)  # one group of 30: entries up to 30
    weight, kept = powers.fold_weights(groups, groups.size)
    grown = powers._kept  # pylint: disable=protected-access
    assert grown.shape[0] > 30 and powers._retired == [first]  # pylint: disable=protected-access
    assert torch.equal(grown[: first[0].shape[0]], first[0])  # the same entries, bit for bit
    exponent = torch.arange(30, dtype=torch.float32)
    torch.testing.assert_close(kept, torch.full((30,), 0.37**30))
    torch.testing.assert_close(weight, 0.63 * torch.pow(0.37, 29 - exponent))
