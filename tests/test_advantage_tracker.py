"""ReferenceAdvantageTracker by hand and against the older references; AdvantageTracker against it.

The reference is the specification (API.md) in plain Python: its own tests
check it with hand-computed cases, with the older per-memory references it
generalises, and with leave-one-out computed directly (the mean of the
other rewards; for the EMA, the weight of a reward found by perturbing it).
The tensor tracker is then compared with it, in float64, over every memory x
baseline x scale x ddof x fallback, on sequences of updates with valid masks
and NaN rewards.
"""

import copy
import math
import random
from typing import Dict, Iterator, List, Optional, Tuple

import pytest
import torch

from rail_interview.stat_tracking import AdvantageTracker, presets
from rail_interview.stat_tracking.reference import (
    ReferenceAdvantageTracker,
    ReferenceBufferStatTracker,
    ReferenceEmaStatTracker,
    mean_std,
)

NUM_PROMPTS = 5
NAN = float("nan")
BASELINES = ["prompt_mean", "leave_one_out", "batch_mean"]
SCALES = ["prompt_std", "batch_std", "none"]
FALLBACKS = ["batch", "raw", "zero"]

#: memory name -> (memory, its options): every memory, and buffers of 1, odd and even sizes.
MEMORIES: Dict[str, Tuple[str, Dict[str, float]]] = {
    "none": ("none", {}),
    "buffer_K1": ("buffer", dict(buffer_size=1)),
    "buffer_K3": ("buffer", dict(buffer_size=3)),
    "buffer_K4": ("buffer", dict(buffer_size=4)),
    "ema_0.7": ("ema", dict(decay=0.7)),
}

Step = Tuple[List[int], List[float], Optional[List[bool]]]  # prompts, rewards, valid


def _rounded(values: List[float], digits: int = 4) -> List[float]:
    return [round(v, digits) + 0.0 for v in values]  # + 0.0: -0.0 prints as 0.0


def _estimators(baseline: str) -> Iterator[Dict[str, object]]:
    """Every scale x ddof x fallback with ``baseline``, at the lowest allowed min_count and at 3."""
    for scale in SCALES:
        for ddof in (0, 1):
            for fallback in FALLBACKS:
                lowest = 2 if baseline == "leave_one_out" else ddof + 1
                for min_count in sorted({lowest, 3}):
                    yield dict(baseline=baseline, scale=scale, ddof=ddof, fallback=fallback, min_count=min_count)


def _sequence(seed: int, *, nan: bool = False) -> List[Step]:
    """Updates with singletons, repeats beyond the buffer, equal rewards, invalid samples and (if asked) NaNs."""
    rng = random.Random(seed)
    steps = []
    for size in (7, 1, 12, 9, 20, 3):
        weights = [rng.random() ** 3 for _ in range(NUM_PROMPTS)]
        prompts = rng.choices(range(NUM_PROMPTS), weights, k=size)
        if rng.random() < 0.5:  # pass/fail rewards: zero-variance groups
            rewards = [float(rng.random() < 0.5) for _ in prompts]
        else:
            rewards = [rng.gauss(0.0, 2.0) + 3 * prompt for prompt in prompts]
        valid = None if rng.random() < 0.3 else [rng.random() < 0.8 for _ in prompts]
        if nan:
            rewards = [NAN if rng.random() < 0.2 else r for r in rewards]
        steps.append((prompts, rewards, valid))
    return steps


# -- The reference by hand -----------------------------------------------------------------------------------------


def test_hand_computed_buffer_case():
    # K = 2: prompt "a" keeps [2, 4] (1 is pushed out): mean 3, population std 1. Prompt "b" has one
    # reward: the batch's mean 17/4 and population std sqrt(48.75 / 4) = 3.4911.
    tracker = ReferenceAdvantageTracker("buffer", buffer_size=2, min_count=2, eps=0.0)
    ids, rewards = ["a", "a", "a", "b"], [1.0, 2.0, 4.0, 10.0]
    assert _rounded(tracker.update(ids, rewards)) == [-2.0, -1.0, 1.0, 1.6471]
    # Leave-one-out: 1 is no longer in the buffer (weight 0): 1 - 3; the others: 2 - 4 and 4 - 2.
    tracker = ReferenceAdvantageTracker("buffer", buffer_size=2, baseline="leave_one_out", scale="none", fallback="raw")
    assert _rounded(tracker.update(ids, rewards)) == [-2.0, -2.0, 2.0, 10.0]


def test_hand_computed_ema_case():
    # decay 0.5: [2, 4] folds to mean 3, var 0.5 * (0 + 0.5 * 2**2) = 1; each reward has weight 0.5.
    tracker = ReferenceAdvantageTracker("ema", decay=0.5, baseline="leave_one_out", scale="none", fallback="raw")
    assert _rounded(tracker.update(["a", "a", "b"], [2.0, 4.0, 5.0])) == [-2.0, 2.0, 5.0]
    # 7 then folds to mean 5, var 0.5 * (1 + 0.5 * 4**2) = 4.5; the mean of the others is the old mean, 3.
    assert _rounded(tracker.update(["a"], [7.0])) == [4.0]
    assert tracker.stats()["a"] == (5.0, math.sqrt(4.5), 3)


def test_hand_computed_ddof_and_scales():
    # One prompt [1, 3] and one [5, 9]: prompt std with ddof 1 sqrt(2) and sqrt(8); batch mean 4.5, sample std
    # sqrt(((-3.5)**2 + 1.5**2 + 0.5**2 + 4.5**2) / 3) = sqrt(35 / 3).
    ids, rewards = [0, 1, 0, 1], [1.0, 5.0, 3.0, 9.0]
    prompt_std = ReferenceAdvantageTracker(ddof=1, eps=0.0)
    assert _rounded(prompt_std.update(ids, rewards)) == _rounded([-1 / 2**0.5, -2 / 8**0.5, 1 / 2**0.5, 2 / 8**0.5])
    batch_std = ReferenceAdvantageTracker(ddof=1, eps=0.0, scale="batch_std")
    assert _rounded(batch_std.update(ids, rewards)) == _rounded([d / (35 / 3) ** 0.5 for d in (-1, -2, 1, 2)])
    batch_mean = ReferenceAdvantageTracker(baseline="batch_mean", scale="none")
    assert batch_mean.update(ids, rewards) == [-3.5, 0.5, -1.5, 4.5]


def test_report_of_a_hand_checked_batch():
    tracker = ReferenceAdvantageTracker(nan_rewards="invalid", fallback="zero")
    # a: two equal rewards; b: one reward; c: two different; d: only NaN; e: one valid, one masked.
    ids = ["a", "a", "b", "c", "c", "d", "e", "e"]
    rewards = [1.0, 1.0, 2.0, 3.0, 4.0, NAN, 6.0, 7.0]
    report = tracker.update_with_report(ids, rewards, [True] * 7 + [False])
    assert report.valid == [True, True, True, True, True, False, True, False]
    assert report.fallback == [False, False, True, False, False, False, True, False]
    assert report.zero_variance == [True, True, True, False, False, False, True, False]
    assert report.zero_variance_fraction == 3 / 4  # a, b and e of the four prompts with a valid reward
    assert report.advantages == pytest.approx([0.0, 0.0, 0.0, -0.5 / (0.5 + 1e-6), 0.5 / (0.5 + 1e-6), 0.0, 0.0, 0.0])


def test_empty_and_all_invalid_batches():
    tracker = ReferenceAdvantageTracker("buffer", nan_rewards="invalid")
    assert tracker.update_with_report([], []) == ([], [], [], [], 0.0)
    report = tracker.update_with_report([1, 2], [NAN, 3.0], [True, False])
    assert report == ([0.0, 0.0], [False, False], [False, False], [False, False], 0.0)
    assert tracker.buffers == {}


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(memory="ring"), "memory"),
        (dict(baseline="median"), "baseline"),
        (dict(scale="mad"), "scale"),
        (dict(fallback="skip"), "fallback"),
        (dict(nan_rewards="zero"), "nan_rewards"),
        (dict(ddof=2), "ddof"),
        (dict(memory="buffer", buffer_size=0), "buffer_size"),
        (dict(memory="ema", decay=1.0), "decay"),
        (dict(ddof=1, min_count=1), "min_count"),
        (dict(baseline="leave_one_out", min_count=1), "leave_one_out"),
    ],
)
def test_reference_refuses_bad_options(options, message):
    with pytest.raises(ValueError, match=message):
        ReferenceAdvantageTracker(**options)


def test_reference_refuses_non_finite_rewards():
    with pytest.raises(ValueError, match="NaN"):
        ReferenceAdvantageTracker().update([0, 0], [1.0, NAN])
    for nan_rewards in ("refuse", "invalid"):
        with pytest.raises(ValueError, match="finite"):
            ReferenceAdvantageTracker(nan_rewards=nan_rewards).update([0, 0], [1.0, -math.inf])


# -- The reference against the older references and direct leave-one-out -------------------------------------------


@pytest.mark.parametrize("buffer_size, min_count", [(4, 2), (3, 1), (2, 5)])
def test_buffer_memory_is_the_older_buffer_reference(buffer_size, min_count):
    tracker = ReferenceAdvantageTracker("buffer", buffer_size=buffer_size, min_count=min_count)
    older = ReferenceBufferStatTracker(buffer_size, min_count)
    for prompts, rewards, _ in _sequence(buffer_size) * 2:
        assert tracker.update(prompts, rewards) == pytest.approx(older.update(prompts, rewards), rel=1e-12, abs=1e-12)
    assert tracker.stats() == older.stats()


@pytest.mark.parametrize("decay, min_count", [(0.7, 2), (0.9, 4), (0.5, 1)])
def test_ema_memory_is_the_older_ema_reference(decay, min_count):
    tracker = ReferenceAdvantageTracker("ema", decay=decay, min_count=min_count)
    older = ReferenceEmaStatTracker(decay, min_count)
    for prompts, rewards, _ in _sequence(min_count) * 2:
        assert tracker.update(prompts, rewards) == pytest.approx(older.update(prompts, rewards), rel=1e-12, abs=1e-12)
    assert tracker.moments == older.moments


def test_batch_mean_and_std_is_whole_batch_normalisation():
    tracker = ReferenceAdvantageTracker(baseline="batch_mean", scale="batch_std", eps=1e-7)
    for prompts, rewards, _ in _sequence(1):
        mean, std = mean_std(rewards)
        assert tracker.update(prompts, rewards) == pytest.approx([(r - mean) / (std + 1e-7) for r in rewards])


@pytest.mark.parametrize("memory", sorted(MEMORIES))
def test_leave_one_out_is_the_reward_minus_the_mean_of_the_others(memory):
    kind, options = MEMORIES[memory]
    tracker = ReferenceAdvantageTracker(kind, **options, baseline="leave_one_out", scale="none", fallback="zero")
    for prompts, rewards, valid in _sequence(2):
        before = copy.deepcopy(tracker)
        report = tracker.update_with_report(prompts, rewards, valid)
        for i, (prompt, reward) in enumerate(zip(prompts, rewards)):
            if not report.valid[i] or report.fallback[i]:
                continue
            if kind == "ema":  # the weight of reward i in the mean, from the change of the mean when it moves
                moved = copy.deepcopy(before)
                moved.update(prompts, [r + 1.0 if j == i else r for j, r in enumerate(rewards)], valid)
                mean = tracker.moments[prompt][0]
                weight = moved.moments[prompt][0] - mean
                others = (mean - weight * reward) / (1 - weight)
            else:
                kept = (
                    list(tracker.buffers[prompt])
                    if kind == "buffer"
                    else [r for p, r, v in zip(prompts, rewards, report.valid) if p == prompt and v]
                )
                same_batch = [j for j, (p, v) in enumerate(zip(prompts, report.valid)) if p == prompt and v]
                rank_from_end = len(same_batch) - same_batch.index(i)  # 1 for the prompt's last valid sample
                if rank_from_end <= len(kept):  # reward i is still among the kept rewards
                    kept.pop(len(kept) - rank_from_end)
                others = math.fsum(kept) / len(kept)
            assert report.advantages[i] == pytest.approx(reward - others, rel=1e-9, abs=1e-9), (i, prompts, rewards)


@pytest.mark.parametrize("memory", sorted(MEMORIES))
def test_invalid_samples_get_zero_and_leave_memory_as_if_absent(memory):
    kind, options = MEMORIES[memory]
    masked = ReferenceAdvantageTracker(kind, **options, nan_rewards="invalid")
    absent = ReferenceAdvantageTracker(kind, **options)
    for prompts, rewards, valid in _sequence(3, nan=True):
        report = masked.update_with_report(prompts, rewards, valid)
        kept = [i for i in range(len(prompts)) if report.valid[i]]
        assert report.valid == [(valid is None or valid[i]) and not math.isnan(rewards[i]) for i in range(len(prompts))]
        expected = absent.update([prompts[i] for i in kept], [rewards[i] for i in kept])
        assert [report.advantages[i] for i in kept] == expected
        assert all(report.advantages[i] == 0.0 for i in range(len(prompts)) if not report.valid[i])
        assert masked.buffers == absent.buffers and masked.moments == absent.moments


# -- The tensor tracker against the reference ----------------------------------------------------------------------


def _advantage_tracker_class():
    return AdvantageTracker


def _tensors(step: Step, dtype: torch.dtype = torch.float64):
    prompts, rewards, valid = step
    return (
        torch.tensor(prompts, dtype=torch.int64),
        torch.tensor(rewards, dtype=dtype),
        None if valid is None else torch.tensor(valid, dtype=torch.bool),
    )


def _assert_report_matches(report, expected, label: str) -> None:
    assert report.valid.tolist() == expected.valid, label
    assert report.fallback.tolist() == expected.fallback, label
    assert report.zero_variance.tolist() == expected.zero_variance, label
    assert report.zero_variance_fraction.dim() == 0, label
    assert float(report.zero_variance_fraction) == pytest.approx(expected.zero_variance_fraction, abs=1e-6), label


def _check_sequence(memory: str, options: Dict[str, object], steps: List[Step]) -> None:
    """One tracker and one reference through ``steps``: update on even steps, update_with_report on odd ones."""
    kind, memory_options = MEMORIES[memory]
    tracker = _advantage_tracker_class()(NUM_PROMPTS, kind, **memory_options, **options, dtype=torch.float64)
    reference = ReferenceAdvantageTracker(kind, **memory_options, **options)
    for number, step in enumerate(steps):
        label = f"{memory} {options} step {number}: {step}"
        expected = reference.update_with_report(*step)
        if number % 2:
            report = tracker.update_with_report(*_tensors(step))
            _assert_report_matches(report, expected, label)
            advantages = report.advantages
        else:
            advantages = tracker.update(*_tensors(step))
        assert advantages.dtype == torch.float64 and advantages.shape == (len(step[0]),), label
        torch.testing.assert_close(
            advantages,
            torch.tensor(expected.advantages, dtype=torch.float64),
            rtol=1e-9,
            atol=1e-9,
            msg=lambda default: f"{label}\n{default}",
        )


@pytest.mark.parametrize("baseline", BASELINES)
@pytest.mark.parametrize("memory", sorted(MEMORIES))
def test_tensor_tracker_matches_the_reference(memory, baseline):
    for seed, options in enumerate(_estimators(baseline)):
        _check_sequence(memory, options, _sequence(seed))


@pytest.mark.parametrize("memory", sorted(MEMORIES))
def test_tensor_tracker_takes_nan_as_invalid(memory):
    for seed, baseline in enumerate(BASELINES):
        options = dict(baseline=baseline, ddof=1, fallback=FALLBACKS[seed], nan_rewards="invalid")
        _check_sequence(memory, options, _sequence(100 + seed, nan=True))


@pytest.mark.parametrize("memory", sorted(MEMORIES))
def test_tensor_tracker_invalid_samples_get_zero_and_leave_state_unchanged(memory):
    kind, options = MEMORIES[memory]
    tracker_class = _advantage_tracker_class()
    masked = tracker_class(NUM_PROMPTS, kind, **options, nan_rewards="invalid", dtype=torch.float64)
    absent = tracker_class(NUM_PROMPTS, kind, **options, dtype=torch.float64)
    for number, (prompts, rewards, valid) in enumerate(_sequence(7, nan=True)):
        is_valid = [(valid is None or valid[i]) and not math.isnan(r) for i, r in enumerate(rewards)]
        kept = [i for i, v in enumerate(is_valid) if v]
        advantages = masked.update(*_tensors((prompts, rewards, valid)))
        expected = absent.update(
            torch.tensor([prompts[i] for i in kept], dtype=torch.int64),
            torch.tensor([rewards[i] for i in kept], dtype=torch.float64),
        )
        torch.testing.assert_close(advantages[kept], expected, rtol=1e-12, atol=1e-12, msg=f"step {number}")
        assert advantages[[not v for v in is_valid]].eq(0).all(), f"step {number}"
        torch.testing.assert_close(masked.state_dict(), absent.state_dict(), rtol=1e-12, atol=1e-12)
    # A batch with no valid sample changes nothing at all.
    before = copy.deepcopy(masked.state_dict())
    report = masked.update_with_report(
        torch.tensor([0, 1, 1]), torch.tensor([NAN, 2.0, 3.0], dtype=torch.float64), torch.tensor([True, False, False])
    )
    assert report.advantages.tolist() == [0.0, 0.0, 0.0] and not report.valid.any() and not report.fallback.any()
    assert float(report.zero_variance_fraction) == 0.0
    after = masked.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[key], after[key]) for key in before)


@pytest.mark.parametrize("memory", sorted(MEMORIES))
def test_tensor_tracker_empty_batch(memory):
    kind, options = MEMORIES[memory]
    tracker = _advantage_tracker_class()(NUM_PROMPTS, kind, **options, dtype=torch.float64)
    report = tracker.update_with_report(torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.float64))
    assert report.advantages.shape == (0,) and float(report.zero_variance_fraction) == 0.0
    _check_sequence(memory, {}, [([], [], None)] + _sequence(5))


@pytest.mark.parametrize("memory", ["none", "buffer", "ema"])
@pytest.mark.parametrize("scale", ["prompt_std", "batch_std"])
def test_invalid_samples_get_exactly_zero_with_eps_zero(memory, scale):
    # The spare row of invalid samples has std 0: with eps 0 they must still get 0, not 0 / 0.
    tracker = AdvantageTracker(3, memory, scale=scale, eps=0.0, fallback="zero", min_count=2)
    advantages = tracker.update(
        torch.tensor([0, 0, 1, 1]), torch.tensor([1.0, 2.0, 5.0, 7.0]), torch.tensor([True, True, False, False])
    )
    assert advantages[2:].tolist() == [0.0, 0.0] and torch.isfinite(advantages).all()


# -- Options, defaults and refusals of the tensor tracker and the presets -----------------------------------------


def test_tracker_defaults_and_read_only_options():
    tracker = AdvantageTracker(3, "buffer")
    assert tracker.state_dict()["rewards"].shape == (3, 32)  # buffer_size 32
    assert tracker.check_values is True
    assert (
        tracker.memory,
        tracker.baseline,
        tracker.scale,
        tracker.ddof,
        tracker.min_count,
        tracker.fallback,
        tracker.nan_rewards,
    ) == ("buffer", "prompt_mean", "prompt_std", 0, 2, "batch", "refuse")


@pytest.mark.parametrize(
    "make, options",
    [
        (lambda: presets.ddpo(3), ("buffer", "prompt_mean", "prompt_std", 0, 16, "batch", "refuse")),
        (lambda: presets.trl_grpo(3), ("none", "prompt_mean", "prompt_std", 1, 2, "zero", "invalid")),
        (lambda: presets.verl_grpo(3), ("none", "prompt_mean", "prompt_std", 1, 2, "raw", "refuse")),
        (lambda: presets.verl_rloo(3), ("none", "leave_one_out", "none", 0, 2, "raw", "refuse")),
        (lambda: presets.flow_grpo(3), ("none", "prompt_mean", "batch_std", 0, 2, "zero", "refuse")),
    ],
    ids=["ddpo", "trl_grpo", "verl_grpo", "verl_rloo", "flow_grpo"],
)
def test_preset_defaults(make, options):
    tracker = make()
    assert tracker.check_values is True and tracker.dtype == torch.float32
    assert (
        tracker.memory,
        tracker.baseline,
        tracker.scale,
        tracker.ddof,
        tracker.min_count,
        tracker.fallback,
        tracker.nan_rewards,
    ) == options
    if tracker.memory == "buffer":
        assert tracker.state_dict()["rewards"].shape == (3, 32)


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(ddof=2), "ddof must be 0 or 1, got 2"),
        (dict(ddof=True), "ddof must be 0 or 1, got True"),
        (
            dict(ddof=1, min_count=1),
            r"min_count must be at least ddof \+ 1 = 2: a std with ddof=1 needs 2 rewards; got 1",
        ),
        (dict(baseline="leave_one_out", min_count=1), "leave_one_out needs min_count >= 2"),
        (dict(baseline="median"), "baseline must be one of 'prompt_mean', 'leave_one_out', 'batch_mean'; got 'median'"),
        (dict(scale="mad"), "scale must be one of"),
        (dict(fallback="skip"), "fallback must be one of"),
        (dict(nan_rewards="zero"), "nan_rewards must be one of"),
        (dict(memory="lstm"), "memory must be one of 'none', 'buffer', 'ema', 'beta'; got 'lstm'"),
        (dict(memory="ema", decay=True), "decay must lie in"),
        (dict(memory="ema", decay=1.0), "decay must lie in"),
        (dict(memory="buffer", buffer_size=0), "buffer_size must be a positive int"),
    ],
    ids=lambda value: str(value) if isinstance(value, dict) else "",
)
def test_tracker_refuses_bad_options(options, message):
    with pytest.raises(ValueError, match=message):
        AdvantageTracker(3, **options)


def test_empty_batch_report_is_empty():
    report = AdvantageTracker(3, "buffer").update_with_report(torch.tensor([], dtype=torch.int64), torch.tensor([]))
    assert all(field.shape == (0,) for field in report[:4]) and report.zero_variance_fraction.item() == 0.0


@pytest.mark.parametrize("memory", ["none", "buffer", "ema"])
def test_report_counts_only_prompts_with_valid_samples(memory):
    # Prompt 2's samples are all invalid (their shared rewards of 0 are not a zero-variance group of the batch).
    tracker = AdvantageTracker(4, memory, fallback="zero")
    report = tracker.update_with_report(
        torch.tensor([0, 0, 1, 1, 2, 2]),
        torch.tensor([1.0, 1.0, 2.0, 3.0, 5.0, 5.0]),
        torch.tensor([True, True, True, True, False, False]),
    )
    assert report.zero_variance.tolist() == [True, True, False, False, False, False]
    assert report.zero_variance_fraction.item() == 0.5  # 1 of the 2 prompts with valid samples


@pytest.mark.parametrize("fallback", ["raw", "zero"])
def test_invalid_samples_stay_zero_when_rewards_are_pushed_out_within_a_batch(fallback):
    # More rows than samples (the batch-rows fold), a prompt seen more than K times (its earliest rewards go to the
    # scratch slot), and invalid samples: the scratch slot must not be their row's, whose mean must stay 0.
    tracker = AdvantageTracker(20, "buffer", buffer_size=2, min_count=2, fallback=fallback)
    # One invalid sample per batch: its writes to the spare row's two slots alternate, so they cannot hide a
    # pushed-out reward written there.
    ids, rewards = torch.tensor([3, 3, 3, 3, 5, 5, 7]), torch.tensor([9.0, 8.0, 7.0, 6.0, 4.0, 4.0, 1.0])
    valid = torch.tensor([True, True, True, True, False, True, True])
    for _ in range(4):
        advantages = tracker.update(ids, rewards, valid)
        assert advantages[4].item() == 0.0


@pytest.mark.parametrize("grouping", ["search", "counts", "scans"])
@pytest.mark.parametrize("memory", ["none", "buffer", "ema"])
def test_invalid_samples_under_every_grouping_algorithm(memory, grouping):
    # Invalid samples take the spare row, id P: every grouping algorithm must count P + 1 rows.
    from rail_interview.stat_tracking import ops

    generator = random.Random(3)
    reference = ReferenceAdvantageTracker(memory, buffer_size=3, decay=0.6, fallback="batch")
    tracker = AdvantageTracker(4, memory, buffer_size=3, decay=0.6, fallback="batch", dtype=torch.float64)
    with ops.forced_algorithms(grouping=grouping, group_stats="sorted"):
        for _ in range(5):
            prompts = [generator.randrange(4) for _ in range(9)]
            rewards = [generator.gauss(0.0, 1.0) for _ in range(9)]
            valid = [generator.random() < 0.7 for _ in range(9)]
            expected = reference.update(prompts, rewards, valid)
            got = tracker.update(torch.tensor(prompts), torch.tensor(rewards, dtype=torch.float64), torch.tensor(valid))
            assert got.tolist() == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize("memory", ["none", "buffer", "ema"])
@pytest.mark.parametrize("keys", ["ids", "hashed"])
def test_zero_variance_means_exactly_equal_rewards(memory, keys):
    # Two rewards 2**-20 apart carry signal: a tolerance (isclose) would call them equal.
    tracker = AdvantageTracker(1, memory, ddof=1, fallback="zero", keys=keys)
    report = tracker.update_with_report(torch.tensor([0, 0]), torch.tensor([1.0, 1.0 + 2**-20]))
    assert not report.zero_variance.any()
    assert report.zero_variance_fraction.item() == 0.0
    equal = tracker.update_with_report(torch.tensor([0, 0]), torch.tensor([1.0, 1.0]))
    assert equal.zero_variance.all() and equal.zero_variance_fraction.item() == 1.0


CPU = torch.device("cpu")


@pytest.mark.parametrize("memory", ["none", "buffer", "ema"])
@pytest.mark.parametrize("grouping", ["search", "counts", "scans"])
@pytest.mark.parametrize("group_stats", ["dense", "sorted"])
def test_every_memory_hands_the_estimator_one_layout(memory, grouping, group_stats):
    # Per-sample statistics in one output order that to_batch_order undoes; the
    # deviation is the reward minus the prompt's mean, which stats() reports.
    from rail_interview.stat_tracking import ops
    from rail_interview.stat_tracking.memory import make_memory

    ids = torch.tensor([2, 0, 2, 1, 2, 0, 5])  # 5: the spare row of invalid samples
    rewards = torch.tensor([1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 0.0], dtype=torch.float64)
    for num_prompts in (5, 40):  # fewer rows than samples, and more
        spare = torch.where(ids == 5, num_prompts, ids)
        with ops.forced_algorithms(grouping=grouping, group_stats=group_stats):
            kept = make_memory(memory, num_prompts, buffer_size=4, decay=0.5, dtype=torch.float64, device=CPU)
            stats = kept.fold(spare, rewards, ddof=0, own_weight=True)
        if stats.rows is not None:  # per-row statistics, expanded for any reader but the estimator
            assert stats.count.shape == stats.std.shape == stats.mean.shape and stats.rows.shape == (7,)
            # The deviation, when the memory computed it, is that very subtraction; per_sample makes it if not.
            expected = stats.rewards - stats.mean[stats.rows]
            assert stats.deviation is None if memory == "buffer" else torch.equal(stats.deviation, expected)
            stats = stats.per_sample()
            assert torch.equal(stats.deviation, expected)
        for field in ("rewards", "count", "deviation", "std", "own_weight"):
            assert getattr(stats, field).shape == (7,), field
        assert torch.equal(stats.to_batch_order(stats.rewards), rewards)
        if memory != "none":
            mean, std, count = kept.stats_from_snapshot(kept.snapshot(ids[:-1]))
            assert torch.equal(stats.to_batch_order(stats.deviation)[:-1], rewards[:-1] - mean)
            assert torch.equal(stats.to_batch_order(stats.count)[:-1], count)
            torch.testing.assert_close(stats.to_batch_order(stats.std)[:-1], std)


@pytest.mark.parametrize("baseline", ["prompt_mean", "batch_mean"])
@pytest.mark.parametrize("scale", ["prompt_std", "batch_std", "none"])
@pytest.mark.parametrize("fallback", ["batch", "raw", "zero"])
@pytest.mark.parametrize("eps_rule", ["add", "max", "nonzero", "variance"])
@pytest.mark.parametrize("numerator", ["subtract", "reuse"])
def test_the_estimator_gives_per_row_statistics_the_per_sample_answer_bit_for_bit(
    baseline, scale, fallback, eps_rule, numerator
):
    # Memories that count per row hand the estimator [R] statistics and each
    # sample's row; it decides per row and gathers once. Same operations on
    # the same values: torch.equal with the expanded, per-sample statistics,
    # whether the numerator is subtracted again or the deviation reused (the
    # last batch of each memory leaves no row of the batch falling back).
    from rail_interview.stat_tracking import ops
    from rail_interview.stat_tracking.functional import prompt_advantages
    from rail_interview.stat_tracking.memory import make_memory

    generator = torch.Generator().manual_seed(7)
    for memory, num_prompts in (("none", 6), ("buffer", 6), ("buffer", 60)):
        kept = make_memory(memory, num_prompts, buffer_size=3, decay=0.5, dtype=torch.float32, device=CPU)
        for step in range(5):
            ids = torch.randint(num_prompts + 1, (20,), generator=generator)  # row P: the spare row
            if step == 4:  # no row of the batch below min_count (none at all without memory, P = 6)
                ids = torch.arange(20) % 5
            rewards = torch.randn(20, generator=generator) * 3 + 1
            rewards[:4] = 2.5  # a group of equal rewards somewhere, std 0 for "nonzero"
            stats = kept.fold(ids, rewards, ddof=1, own_weight=False)
            assert stats.rows is not None
            options = dict(
                baseline=baseline,
                scale=scale,
                eps=1e-4,
                min_count=3,
                fallback=fallback,
                batch_mean=rewards.mean(),
                batch_std=rewards.std(),
                report=True,
                eps_rule=eps_rule,
            )
            with ops.forced_algorithms(numerator=numerator):
                per_row = prompt_advantages(stats, **options)
            per_sample = prompt_advantages(stats.per_sample(), **options)
            assert torch.equal(per_row[0], per_sample[0]) and torch.equal(per_row[1], per_sample[1])


@pytest.mark.parametrize("fallback", ["batch", "raw", "zero"])
def test_the_reuse_numerator_takes_the_deviation_exactly_where_no_row_of_the_batch_falls_back(fallback):
    # Statistics that break the per-row promise (deviation != rewards - mean[rows])
    # show which numerator the estimator took: the deviation's, or a subtraction.
    from rail_interview.stat_tracking import ops
    from rail_interview.stat_tracking.functional import prompt_advantages
    from rail_interview.stat_tracking.types import SampleStats

    rewards = torch.tensor([1.0, 3.0, 5.0, 9.0])
    mean = torch.tensor([2.0, 7.0, 0.0])  # rows 0 and 1 hold the samples; row 2 none
    rows = torch.tensor([0, 0, 1, 1])
    marked = rewards - mean[rows] + 100.0  # not the subtraction: only a reuse yields it
    options = dict(baseline="prompt_mean", scale="prompt_std", eps=0.0, fallback=fallback, eps_rule="add")
    options.update(batch_mean=torch.tensor(4.5), batch_std=torch.tensor(1.0), report=False)
    for counts, row_falls_back in (([2.0, 2.0, 0.0], False), ([2.0, 1.0, 0.0], True), ([2.0, 2.0, 1.0], True)):
        # The last: a row without samples in this batch but with a count that falls back (a memory's
        # history); the check cannot tell it from a row with samples, and stays on the safe side.
        stats = SampleStats(rewards, torch.tensor(counts), marked, torch.ones(3), None, None, mean=mean, rows=rows)
        for numerator in ("subtract", "reuse"):
            with ops.forced_algorithms(numerator=numerator):
                advantages, _ = prompt_advantages(stats, min_count=2, **options)
            reused = fallback == "zero" or (numerator == "reuse" and not row_falls_back)
            assert bool((advantages[:2] > 50).all()) == reused, (counts, numerator)
    with ops.forced_algorithms(numerator="reuse"):  # a read back: off a CPU and compiled, the subtraction
        assert ops.numerator_algorithm(10**6, 10, torch.device("meta")) == "subtract"
    smallest = ops.REUSE_DEVIATION_MIN_SAMPLES
    assert ops.numerator_algorithm(smallest - 1, 10, CPU) == "subtract"
    assert ops.numerator_algorithm(smallest, smallest // 2, CPU) == "reuse"
    assert ops.numerator_algorithm(smallest, smallest // 2 + 1, CPU) == "subtract"  # the check would cost more


def test_repr_names_the_class_and_its_options():
    from rail_interview.stat_tracking import BatchStatTracker, BufferStatTracker, EmaStatTracker

    assert repr(AdvantageTracker(64, "buffer", min_count=16)) == (
        "AdvantageTracker(num_prompts=64, memory='buffer', buffer_size=32, baseline='prompt_mean', "
        "scale='prompt_std', ddof=0, eps=1e-06, min_count=16, fallback='batch', nan_rewards='refuse', keys='ids', "
        "dtype=torch.float32, device=cpu)"
    )
    assert repr(AdvantageTracker(3, "ema", decay=0.9, baseline="leave_one_out", keys="hashed")) == (
        "AdvantageTracker(num_prompts=3, memory='ema', decay=0.9, baseline='leave_one_out', scale='prompt_std', "
        "ddof=0, eps=1e-06, min_count=2, fallback='batch', nan_rewards='refuse', keys='hashed', "
        "dtype=torch.float32, device=cpu)"
    )
    assert repr(presets.trl_grpo(4, dtype=torch.float64)).startswith(
        "AdvantageTracker(num_prompts=4, memory='none', baseline='prompt_mean', scale='prompt_std', ddof=1, eps=0.0001"
    )
    assert repr(BufferStatTracker(64)) == (
        "BufferStatTracker(num_prompts=64, buffer_size=32, min_count=16, eps=1e-06, keys='ids', "
        "dtype=torch.float32, device=cpu)"
    )
    assert repr(EmaStatTracker(8, 0.9, 4, eps=1e-3, dtype=torch.float64, keys="hashed")) == (
        "EmaStatTracker(num_prompts=8, decay=0.9, min_count=4, eps=0.001, keys='hashed', dtype=torch.float64, "
        "device=cpu)"
    )
    assert repr(BatchStatTracker(2, dtype=torch.bfloat16)) == (
        "BatchStatTracker(num_prompts=2, eps=1e-07, keys='ids', dtype=torch.bfloat16, device=cpu)"
    )


@pytest.mark.parametrize("group_stats", [None, "dense", "sorted"])
@pytest.mark.parametrize("num_rewards", [1, 2])
def test_leave_one_out_std_depends_on_the_groups_not_on_how_many_prompts_there_are(group_stats, num_rewards):
    # Without memory only the batch's groups matter: ids spread over 5,000
    # prompts give what the same groups numbered 0..9 give, bit for bit.
    # With more rows than samples the groups are labelled in O(N), not by
    # their rows (an O(P) sum per update).
    from rail_interview.stat_tracking import ops

    generator = torch.Generator().manual_seed(num_rewards)
    options = dict(scale="leave_one_out_std", num_rewards=num_rewards, dtype=torch.float64, min_count=2)
    with ops.forced_algorithms(group_stats=group_stats):
        few, many = AdvantageTracker(10, **options), AdvantageTracker(5000, **options)
        for _ in range(4):
            ids = torch.randint(10, (24,), generator=generator)
            rewards = torch.randn(24, num_rewards, generator=generator).squeeze(1)
            assert torch.equal(few.update(ids, rewards), many.update(ids * 499 + 7, rewards))


def _mean_and_std_advantages(stats, fallback, *, batch_mean, **options):
    """``prompt_advantages`` by each prompt's mean and std (eps 0, min_count 2, batch std 2): the advantages."""
    from rail_interview.stat_tracking.functional import prompt_advantages

    advantages, _ = prompt_advantages(
        stats,
        baseline="prompt_mean",
        scale="prompt_std",
        eps=0.0,
        min_count=2,
        fallback=fallback,
        batch_mean=torch.tensor(batch_mean),
        batch_std=torch.tensor(2.0),
        **options,
    )
    return advantages


@pytest.mark.parametrize("fallback", ["zero", "raw", "batch"])
def test_the_estimator_leaves_the_statistics_it_reads_as_they_were(fallback):
    # A caller may read SampleStats again after prompt_advantages: the
    # division goes into the function's own temporary, never the deviation.
    from rail_interview.stat_tracking.types import SampleStats

    stats = SampleStats(
        torch.tensor([1.0, 3.0, 5.0]),
        torch.tensor([2, 2, 1]),
        torch.tensor([-1.0, 1.0, 0.0]),
        torch.tensor([0.5, 0.5, 0.0]),
        None,
        None,
    )
    before = [tensor.clone() for tensor in stats[:4]]
    advantages = _mean_and_std_advantages(stats, fallback, batch_mean=3.0)
    assert torch.equal(advantages[:2], torch.tensor([-2.0, 2.0]))
    assert all(torch.equal(after, kept) for after, kept in zip(stats[:4], before))


@pytest.mark.parametrize("fallback", ["zero", "raw", "batch"])
@pytest.mark.parametrize("overwrite", [False, True])
def test_per_row_statistics_keep_their_deviation_unless_the_caller_lets_it_be_overwritten(fallback, overwrite):
    # The reuse numerator divides the deviation itself: into a new tensor, or,
    # with overwrite (a tracker's own temporaries), in place.
    from rail_interview.stat_tracking import ops
    from rail_interview.stat_tracking.types import SampleStats

    rewards, mean, rows = torch.tensor([1.0, 3.0, 4.0, 8.0]), torch.tensor([2.0, 6.0]), torch.tensor([0, 0, 1, 1])
    deviation = rewards - mean[rows]
    stats = SampleStats(
        rewards, torch.tensor([2, 2]), deviation, torch.tensor([0.5, 2.0]), None, None, mean=mean, rows=rows
    )
    before = deviation.clone()
    with ops.forced_algorithms(numerator="reuse"):
        advantages = _mean_and_std_advantages(stats, fallback, batch_mean=4.0, overwrite=overwrite)
    assert torch.equal(advantages, torch.tensor([-2.0, 2.0, -1.0, 1.0]))
    assert (advantages.data_ptr() == deviation.data_ptr()) == overwrite
    assert torch.equal(stats.deviation, advantages if overwrite else before)
