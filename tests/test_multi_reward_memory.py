"""Several rewards per sample, sample weights, eps rules and the leave-one-out std: the tracker against the reference.

What is tested: ``AdvantageTracker`` with ``num_rewards=C`` (C = 1, 2, 3),
``reward_weights``, both ``aggregation`` orders, ``update(..., weights=...)``
with ``weighted_stats`` and ``weighted_normalize``, ``eps_rule``,
``normalize_eps_rule``, ``normalize_ddof`` and ``scale="leave_one_out_std"``,
against ``ReferenceAdvantageTracker`` (plain loops over samples and reward
functions, its class docstring the specification), which is pinned first on
hand-computed cases. Random sequences run every memory (none, buffer, EMA,
Beta with rewards in [0, 1]) x both orders x C, mixing valid masks, NaN
rewards in some columns (``nan_rewards="invalid"``), prompts repeated within a
batch, hashed keys in tables of one to three rows (evictions, overflow),
``include_batch=False``, the three fallbacks, every eps rule, sample weights,
per-sample discounts and Beta priors, ``state_dict`` round trips mid-sequence;
after each step the advantages, the ``update_with_report`` fields, ``query``
and the memory's state ([P, C, ...] with a memory per reward function, read
back row by row against the reference's dicts) are compared. Then: C = 1
given as [N] is bit-identical to a tracker built without the new options;
C = 2 with weights (1, 0) equals a one-reward tracker fed column 0 (where
that is an identity); ``torch.compile(fullgraph=True)``; two gloo ranks;
refusals, which must leave the state as it was; and planted bugs, which these
checks must catch. Four tracker bugs this file found (the batch's statistics
per reward function reaching the wrong samples, ``fallback_mask`` of a
memory per reward function, a weighted reward folded into the Beta memory,
NaN from a weightless prompt's "zero" fallback) are fixed; ``test_fixed_*``
keeps each reproduction.

Rewards are multiples of 1/16 (up to 4 in magnitude) and reward weights are
dyadic, so weighted sums are exact in float32 and float64: whether rewards are
"all equal" (zero variance, streaks, the leave-one-out std's exact zero) is
decided on the same numbers by both.

Tolerances (``_tolerances``), as in ``test_pass_rate_memory.py``: an
advantage a = num / D computed with unit roundoff u is off by about
u (1 + |a| + |r|) / D per reward function (the numerator's error, the std's,
and with ``"sum_then_normalize"`` the weighted sum's, over the divisor D the
reference reports per sample and reward), times a count of the terms and
steps behind it; the weighted sum of C of them is off by the weighted sum of
their errors; a whitened one ``(a - mean) / d(std)`` by the raw advantages'
worst error over d(std), times (1 + |result|). In float64 (u = 2.2e-16)
that is about 1e-12 for divisors near 1; in float32 (u = 1.2e-7) about
1e-4 at the first step, growing with the steps as errors in the stored
state do. Measured over the random sequences (about 12000 float64 and 700
float32 advantages): float64 at most 6e-14 relative (|got - want| /
max(1, |want|)), and 6e-13 absolute wherever the tolerance is below 1e-4
(larger absolute differences, up to 3e-8, are on advantages near 1e6
divided by an eps, or on a lone valid sample whitened with an eps of
1e-8, where the reference's mean of one weighted value is off by an ulp);
float32 at most 1.7e-6 relative; every difference below 1% of its
tolerance.
"""

import collections
import copy
import math
import random
from typing import Dict, List, Optional, Tuple

import pytest
import torch
import torch.distributed as dist

from rail_interview.stat_tracking import AdvantageTracker, ops
from rail_interview.stat_tracking import functional as functional_module
from rail_interview.stat_tracking import memory as memory_module
from rail_interview.stat_tracking import tracker as tracker_module
from rail_interview.stat_tracking.reference import ReferenceAdvantageTracker, ReferenceUpdateReport
from spawned_ranks import run_ranks

# Past-only baselines with a buffer or EMA std are drawn on purpose (test_pass_rate_memory tests the warning).
pytestmark = pytest.mark.filterwarnings("ignore:include_batch=False with a prompt std:UserWarning")

NAN = float("nan")
F64 = dict(dtype=torch.float64)
MEMORIES = ("none", "buffer", "ema", "beta")
AGGREGATIONS = ("sum_then_normalize", "normalize_then_sum")
EPS_RULES = ("add", "max", "nonzero", "variance")
#: Hashed keys: large, far apart, nowhere near the ids 0..P-1.
KEY_BASE = 10**12
#: Reward weights: dyadic, so that weighted sums of rewards on the 1/16 grid are exact.
REWARD_WEIGHTS = (1.0, 0.5, 2.0, -1.0, 0.0, 0.25, 1.5)
#: Sample weights (token counts, lengths): positive, exact in every dtype.
SAMPLE_WEIGHTS = (1.0, 2.0, 3.0, 0.5, 7.0, 16.0)
#: The memory's state tensors, each [P, C, ...] with a memory per reward function.
MEMORY_STATE = {"none": (), "buffer": ("rewards", "count", "head"), "ema": ("mean", "var", "count")}
MEMORY_STATE["beta"] = ("alpha", "beta", "count")


# -- The reference by hand -----------------------------------------------------------------------------------------


def test_reference_sum_then_normalize_skips_nan_rewards_and_reports_per_reward():
    # a: [1, 2] -> 1 + 0.5 * 2 = 2; [3, NaN] -> 3 (NaN adds nothing); b: [NaN, NaN] -> invalid.
    tracker = ReferenceAdvantageTracker(
        num_rewards=2, reward_weights=(1.0, 0.5), nan_rewards="invalid", scale="none", fallback="zero"
    )
    report = tracker.update_with_report(["a", "a", "b"], [[1.0, 2.0], [3.0, NAN], [NAN, NAN]])
    assert report.advantages == [-0.5, 0.5, 0.0]  # a's mean 2.5
    assert report.valid == [True, True, False] and report.fallback == [False, False, False]
    assert report.zero_variance == [False, False, False] and report.zero_variance_fraction == 0.0
    # Reward 0 of a: [1, 3], not equal; reward 1 of a: [2] alone, equal. b has no reward that counts.
    assert report.channel_zero_variance_fraction == [0.0, 1.0]
    assert report.parts == [[-0.5], [0.5], [0.0]] and report.divisors == [[1.0], [1.0], [1.0]]
    assert report == (report.advantages, report.valid, report.fallback, report.zero_variance, 0.0)  # a 5-tuple
    one = ReferenceAdvantageTracker().update_with_report([0], [1.0])
    assert one.channel_zero_variance_fraction is None and one.parts == [[0.0]]


def test_reference_normalize_then_sum_runs_each_reward_on_its_own():
    tracker = ReferenceAdvantageTracker(
        "buffer", buffer_size=4, num_rewards=2, aggregation="normalize_then_sum", nan_rewards="invalid",
        scale="none", fallback="raw", min_count=2, track_streaks=True,
    )  # fmt: skip
    # Reward 0 of a: [1, 3] -> [-1, 1]; reward 1 of a: [5] only (count 1 < 2): raw fallback 5.
    report = tracker.update_with_report(["a", "a"], [[1.0, NAN], [3.0, 5.0]])
    assert report.advantages == [-1.0, 6.0]
    assert report.parts == [[-1.0, 0.0], [1.0, 5.0]]
    assert report.fallback == [False, True]  # the second sample fell back in one of its rewards
    assert report.zero_variance == [False, False] and report.channel_zero_variance_fraction == [0.0, 1.0]
    assert tracker.stats() == {("a", 0): (2.0, 1.0, 2), ("a", 1): (5.0, 0.0, 1)}
    query = tracker.query(["a", "b"])
    assert query.count == [[2, 1], [0, 0]] and query.pass_rate[0] == [2.0, 5.0] and query.streak == [0, 0]
    # Every reward function's rewards equal in the batch (reward 1 has none): a zero-variance visit.
    report = tracker.update_with_report(["a", "a"], [[2.0, NAN], [2.0, NAN]])
    assert report.zero_variance == [True, True] and tracker.streaks() == {"a": 1}
    # Reward 0 then holds [3, 2, 2, 2] (K = 4), reward 1 [5, 7]: (2 - 2.25) + (7 - 6).
    assert tracker.update(["a"], [[2.0, 7.0]]) == [0.75]
    with pytest.raises(ValueError, match="one pass rate per prompt"):
        ReferenceAdvantageTracker("beta", num_rewards=2, aggregation="normalize_then_sum").set_prior([0], [1], [2])


def test_reference_eviction_forgets_every_reward_function():
    tracker = ReferenceAdvantageTracker("ema", num_rewards=2, aggregation="normalize_then_sum", capacity=1)
    tracker.update(["a", "a"], [[1.0, 2.0], [3.0, 4.0]])
    assert set(tracker.moments) == {("a", 0), ("a", 1)}
    tracker.update(["b"], [[0.0, 0.0]])  # a evicted: both its reward functions forgotten
    assert set(tracker.moments) == {("b", 0), ("b", 1)}


def test_reference_sample_weights_are_frequency_weights():
    # OPO: one prompt, rewards [0, 4] of lengths [1, 3]: mean (0 + 12) / 4 = 3.
    opo = ReferenceAdvantageTracker(baseline="prompt_mean", scale="none", weighted_stats=True)
    assert opo.update([0, 0], [0.0, 4.0], weights=[1, 3]) == [-3.0, 1.0]
    # Leave-one-out: own weights 1/4 and 3/4, so r minus the other's reward: -4 and 4.
    loo = ReferenceAdvantageTracker(baseline="leave_one_out", scale="none", weighted_stats=True)
    assert loo.update([0, 0], [0.0, 4.0], weights=[1, 3]) == [-4.0, 4.0]
    # The std with ddof 1: (1 * 9 + 3 * 1) / (4 - 1) = 4, std 2.
    std = ReferenceAdvantageTracker(ddof=1, eps=0.0, weighted_stats=True)
    assert std.update([0, 0], [0.0, 4.0], weights=[1, 3]) == [-1.5, 0.5]
    # Weights of at most ddof in all: std 0, divided by eps alone.
    light = ReferenceAdvantageTracker(ddof=1, eps=0.5, baseline="batch_mean", weighted_stats=True)
    assert light.update([0, 0], [0.0, 4.0], weights=[0.5, 0.5]) == [-4.0, 4.0]
    # The whitening: advantages [-1, 1, 5] (b falls back raw) of weights [1, 1, 2]: mean 10 / 4, variance
    # (12.25 + 2.25 + 2 * 6.25) / 4 = 6.75 (normalize_ddof 0), divided by sqrt(6.75 + 0) (rule "variance").
    whiten = ReferenceAdvantageTracker(
        scale="none", fallback="raw", normalize="batch", normalize_eps=0.0, normalize_eps_rule="variance",
        normalize_ddof=0, ddof=1, weighted_normalize=True,
    )  # fmt: skip
    got = whiten.update(["a", "a", "b"], [0.0, 2.0, 5.0], weights=[1, 1, 2])
    assert got == pytest.approx([(a - 2.5) / math.sqrt(6.75) for a in (-1.0, 1.0, 5.0)], abs=1e-15)
    with pytest.raises(ValueError, match="pass them"):
        opo.update([0], [1.0])
    with pytest.raises(ValueError, match="without weighted_stats"):
        ReferenceAdvantageTracker().update([0], [1.0], weights=[1.0])
    # A weight of 0 leaves a sample out of the statistics and gives it advantage 0: prompt 0's mean is 4; prompt 1
    # weighs nothing, so it has no mean and falls back (its one sample weighs 0: advantage 0 all the same).
    report = opo.update_with_report([0, 0, 1], [0.0, 4.0, 5.0], weights=[0.0, 2.0, 0.0])
    assert report.advantages == [0.0, 0.0, 0.0] and report.fallback == [False, False, True]
    # Prompt 0's mean of 4 and 2 (weights 1 and 3) is 2.5; its weightless sample (9) gets 0, not 6.5, and with a
    # std scale not (9 - 2.5) / (std + eps) either. The count stays the samples (verl's OPO counts them so).
    report = opo.update_with_report([0, 0, 0], [4.0, 2.0, 9.0], weights=[1.0, 3.0, 0.0])
    assert report.advantages == [1.5, -0.5, 0.0] and report.fallback == [False, False, False]
    got = AdvantageTracker(1, baseline="prompt_mean", scale="none", weighted_stats=True).update_with_report(
        torch.tensor([0, 0, 0]), torch.tensor([4.0, 2.0, 9.0]), weights=torch.tensor([1.0, 3.0, 0.0])
    )
    assert got.advantages.tolist() == [1.5, -0.5, 0.0] and got.fallback.tolist() == [False, False, False]
    scaled = AdvantageTracker(1, weighted_stats=True).update(
        torch.tensor([0, 0]), torch.tensor([1.0, 0.0]), weights=torch.tensor([1.0, 0.0])
    )
    assert scaled.tolist() == [0.0, 0.0]  # not -1e6: the weightless sample's deviation over a std of 0
    with pytest.raises(ValueError, match="all 0"):  # no batch mean to fall back to either: refused
        opo.update([0, 1], [1.0, 2.0], weights=[0.0, 0.0])
    with pytest.raises(ValueError, match="all 0"):
        AdvantageTracker(2, baseline="prompt_mean", scale="none", weighted_stats=True).update(
            torch.tensor([0, 1]), torch.tensor([1.0, 2.0]), weights=torch.tensor([0.0, 0.0])
        )
    with pytest.raises(ValueError, match="finite and non-negative"):
        opo.update([0, 1], [1.0, 2.0], weights=[1.0, -1.0])
    assert opo.update([0, 1], [1.0, 2.0], [True, False], weights=[1.0, -1.0]) == [0.0, 0.0]  # masked out: unread
    with pytest.raises(ValueError, match="all 0"):
        whiten.update([0, 1], [1.0, 2.0], weights=[0.0, 0.0])


def test_weighted_leave_one_out_without_others_falls_back():
    # Prompt 0's samples weigh [0, 3, 0]: its mean is 2. Samples 0 and 2 (own weight 0): r - 2. Sample 1 holds
    # all the weight, so its others have no weighted mean: it falls back (to the batch's weighted mean, 2); samples 0
    # and 2 weigh nothing: advantage 0.
    options = dict(weighted_stats=True, baseline="leave_one_out", scale="none")
    want = ReferenceAdvantageTracker(**options).update([0, 0, 0], [1.0, 2.0, 4.0], weights=[0.0, 3.0, 0.0])
    assert want == [0.0, 0.0, 0.0]
    report = AdvantageTracker(1, dtype=torch.float64, **options).update_with_report(
        torch.tensor([0, 0, 0]), torch.tensor([1.0, 2.0, 4.0], **F64), weights=torch.tensor([0.0, 3.0, 0.0], **F64)
    )
    assert report.advantages.tolist() == want and report.fallback.tolist() == [False, True, False]


@pytest.mark.parametrize(
    "rule, want",
    [
        ("add", [-1.0, -1.0, -0.6, 1.0]),  # -0.5 / 0.5; -1.5 / 2.5; 2.5 / 2.5
        ("max", [-1.0, -1.0, -0.75, 1.25]),  # -0.5 / 0.5; -1.5 / 2; 2.5 / 2
        ("nonzero", [-0.5, -0.5, -0.6, 1.0]),  # a's std 0: unscaled
        ("variance", [-0.5 / math.sqrt(0.5)] * 2 + [-1.5 / math.sqrt(4.5), 2.5 / math.sqrt(4.5)]),
    ],
)
def test_reference_eps_rules(rule, want):
    # a: [1, 1] (std 0), b: [0, 4] (std 2); the batch's mean 1.5 is the baseline, each prompt's std the scale.
    tracker = ReferenceAdvantageTracker(baseline="batch_mean", eps=0.5, eps_rule=rule)
    assert tracker.update(["a", "a", "b", "b"], [1.0, 1.0, 0.0, 4.0]) == pytest.approx(want, abs=1e-15)


def test_reference_leave_one_out_std_is_exactly_zero_for_equal_others():
    # [0, 0, 0, 1] with ddof 1: the 1's others are all 0 (std exactly 0: unscaled by "nonzero"); each 0's
    # others [0, 0, 1] have std sqrt(1/3). Baseline the group's mean 0.25.
    tracker = ReferenceAdvantageTracker(scale="leave_one_out_std", ddof=1, eps=0.0, eps_rule="nonzero")
    report = tracker.update_with_report([0, 0, 0, 0], [0.0, 0.0, 0.0, 1.0])
    assert report.advantages == pytest.approx([-0.25 / math.sqrt(1 / 3)] * 3 + [0.75], abs=1e-15)
    assert report.divisors[3] == [1.0]
    # Two rewards with ddof 1: one other, fewer than ddof + 1: std 0.
    pair = ReferenceAdvantageTracker(scale="leave_one_out_std", ddof=1, eps=1e-3)
    assert pair.update([0, 0], [0.0, 1.0]) == pytest.approx([-500.0, 500.0])


def test_reference_beta_takes_what_enters_its_memory_in_unit_range():
    beta = ReferenceAdvantageTracker(
        "beta", decay=0.5, num_rewards=2, aggregation="normalize_then_sum", nan_rewards="invalid"
    )
    beta.update([0, 0], [[1.0, NAN], [0.0, 0.5]])
    # Reward 0: 1 then 0 from the prior (0.5, 0.5) at rho 0.5: (1.25, 0.25), then (0.625, 1.125); reward 1: 0.5 once.
    assert beta.betas == {(0, 0): [0.625, 1.125, 2], (0, 1): [0.75, 0.75, 1]}
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        beta.update([0], [[0.5, 1.5]])
    # One reward of weight 2 summed first would put 2 r into the memory: refused when built.
    with pytest.raises(ValueError, match="weighted other than 1"):
        ReferenceAdvantageTracker("beta", reward_weights=(2.0,))


@pytest.mark.parametrize(
    "options",
    [
        dict(memory="beta", num_rewards=2),  # a weighted sum is not a pass rate
        dict(memory="beta", reward_weights=(0.5,)),  # nor is a weighted reward
        dict(weighted_normalize=True),  # no whitening to weigh
        dict(memory="buffer", weighted_stats=True),
        dict(memory="ema", scale="leave_one_out_std"),
        dict(scale="leave_one_out_std", weighted_stats=True),
        dict(scale="leave_one_out_std", min_count=1),
        dict(num_rewards=2, reward_weights=(1.0, 2.0, 3.0)),
        dict(num_rewards=2, reward_weights=(1.0, NAN)),
        dict(reward_weights=(True,)),
        dict(num_rewards=0),
        dict(aggregation="sum"),
        dict(eps_rule="floor"),
        dict(normalize_eps_rule="floor"),
        dict(normalize_ddof=2),
    ],
    ids=str,
)
def test_both_refuse_bad_options(options):
    with pytest.raises(ValueError):
        AdvantageTracker(3, **options)
    with pytest.raises(ValueError):
        ReferenceAdvantageTracker(**options)


# -- Drawing random sequences --------------------------------------------------------------------------------------


def _pool(keys: str, num_prompts: int) -> List[int]:
    """The prompts a sequence draws from: every id, or two more hashed keys than the table has rows."""
    if keys == "ids":
        return list(range(num_prompts))
    return [KEY_BASE + 7919 * k for k in range(num_prompts + 2)]


def _draw_options(rng: random.Random, memory: str, aggregation: str, num_rewards: int) -> dict:
    """Any valid combination of the options with a memory, an order and C reward functions."""
    options: Dict[str, object] = dict(memory=memory, aggregation=aggregation, num_rewards=num_rewards)
    options["nan_rewards"] = "invalid" if rng.random() < 0.85 else "refuse"
    if memory == "beta":
        options.update(decay=rng.choice([0.5, 0.875, 1.0]), repeats=rng.choice(["all", "last"]))
    elif memory == "buffer":
        options["buffer_size"] = rng.choice([1, 2, 4])
    elif memory == "ema":
        options["decay"] = rng.choice([0.6, 0.9])
    if memory != "none":
        options["include_batch"] = rng.random() < 0.7
    options["baseline"] = baseline = rng.choice(["prompt_mean", "leave_one_out", "batch_mean"])
    scales = ["prompt_std", "none", "batch_std"]
    options["scale"] = scale = rng.choice(scales + (["leave_one_out_std"] * 2 if memory == "none" else []))
    options["ddof"] = ddof = rng.choice([0, 1])
    options["fallback"] = rng.choice(["raw", "zero", "batch"])
    weighted_stats = memory == "none" and scale != "leave_one_out_std" and rng.random() < 0.5
    options["weighted_stats"] = weighted_stats
    pairs = baseline == "leave_one_out" or scale == "leave_one_out_std"
    lowest = 0 if memory == "beta" else max(ddof + 1, 2 if pairs else 1)
    options["min_count"] = rng.randint(lowest, lowest + 2)
    options["eps"] = rng.choice([1e-6, 1e-3, 0.1])
    options["eps_rule"] = rng.choice(EPS_RULES)
    options["normalize"] = normalize = rng.choice(["none", "batch"])
    if normalize == "batch":
        options["normalize_eps"] = rng.choice([1e-8, 1e-4])
        options["normalize_eps_rule"] = rng.choice(EPS_RULES)
        options["normalize_ddof"] = rng.choice([None, 0, 1])
        options["weighted_normalize"] = rng.random() < 0.5
    if memory == "beta" and aggregation == "sum_then_normalize":  # what enters the memory stays in [0, 1]
        options["reward_weights"] = rng.choice([None, (1.0,)])
    elif rng.random() < 0.6:
        options["reward_weights"] = tuple(rng.choice(REWARD_WEIGHTS) for _ in range(num_rewards))
    options["track_streaks"] = rng.random() < 0.5
    return options


def _keeps_rows(options: dict) -> bool:
    """Whether the tracker keeps anything per prompt (and so, with hashed keys, a table whose rows can overflow).

    A tracker without memory, with a batch baseline, no prompt std and ``min_count`` 1 keeps nothing per prompt
    (``AdvantageTracker``'s docstring: it needs no table, only to accept any key): its reference has no capacity.
    """
    batch_only = options["memory"] == "none" and options["baseline"] == "batch_mean"
    batch_only = batch_only and options["scale"] != "prompt_std" and options["min_count"] <= 1
    return not batch_only or options.get("track_streaks", False)


def _pair(num_prompts: int, keys: str, dtype: torch.dtype, options: dict, **tracker_options):
    """A tensor tracker and the reference built with the same options."""
    tracker = AdvantageTracker(num_prompts, keys=keys, dtype=dtype, **options, **tracker_options)
    capacity = num_prompts if keys == "hashed" and _keeps_rows(options) else None
    return tracker, ReferenceAdvantageTracker(**options, capacity=capacity)


def _draw_reward(rng: random.Random, unit: bool, channel: int, nan: bool) -> float:
    """A reward on the 1/16 grid: in [0, 1] (pass/fail likely) for the Beta memory, else up to 2**channel in size."""
    if nan and rng.random() < 0.15:
        return NAN
    if unit:
        return rng.choice([0.0, 1.0, rng.randint(0, 16) / 16])
    return rng.choice([0.0, 1.0, rng.randint(-16, 16) / 16 * 2**channel])


def _draw_batch(rng: random.Random, pool: list, options: dict, size: Optional[int] = None):
    """(prompts, rewards [N] or [N][C], valid or None, discount or None, weights or None)."""
    size = rng.randint(0, 10) if size is None else size
    prompts = [rng.choice(pool) for _ in range(size)]
    unit, nan = options["memory"] == "beta", options["nan_rewards"] == "invalid"
    rows = [[_draw_reward(rng, unit, c, nan) for c in range(options["num_rewards"])] for _ in prompts]
    rewards = rows if options["num_rewards"] > 1 else [row[0] for row in rows]
    valid = None if rng.random() < 0.4 else [rng.random() < 0.85 for _ in prompts]
    discount = None
    if unit and rng.random() < 0.5:
        discount = [rng.choice([0.5, 0.875, 0.96, 1.0, rng.randint(50, 1000) / 1000]) for _ in prompts]
    weights = None
    if options.get("weighted_stats") or options.get("weighted_normalize"):
        kept = [True] * size if valid is None else valid
        # A weight of 0 leaves a sample out of the weighted statistics (a prompt of no weight, or a leave-one-out
        # sample whose others weigh nothing, falls back); a masked-out sample's weight is never read.
        weights = [rng.choice(SAMPLE_WEIGHTS) if rng.random() < 0.85 else 0.0 for _ in kept]
        weights = [q if v else rng.choice([q, -1.0, NAN]) for q, v in zip(weights, kept)]
        # Weighted batch statistics need some weight among the rewards that count (refused otherwise), per
        # reward function where each has its own: give one counting reward of each column a weight.
        for column in range(options["num_rewards"]):
            counting = [v and not math.isnan(row[column]) for v, row in zip(kept, rows)]
            if any(counting) and not any(q > 0 for q, c in zip(weights, counting) if c):
                weights[counting.index(True)] = 1.0
    return prompts, rewards, valid, discount, weights


def _tensor_step(step, dtype: torch.dtype, num_rewards: int = 1):
    """The step as the tracker takes it, and as the reference does (rewards and discounts as the dtype holds them)."""
    prompts, rewards, valid, discount, weights = step
    ids = torch.tensor(prompts, dtype=torch.int64)
    values = torch.tensor(rewards, dtype=torch.float64).to(dtype)
    if num_rewards > 1:
        values = values.reshape(len(prompts), num_rewards)  # [0, C] too
    mask = None if valid is None else torch.tensor(valid, dtype=torch.bool)
    rho = None if discount is None else torch.tensor(discount, dtype=torch.float64).to(dtype)
    masses = None if weights is None else torch.tensor(weights, dtype=torch.float64).to(dtype)
    seen = (
        prompts,
        values.double().tolist(),
        valid,
        None if rho is None else rho.double().tolist(),
        None if masses is None else masses.double().tolist(),
    )
    extra = {name: value for name, value in (("discount", rho), ("weights", masses)) if value is not None}
    return (ids, values, mask, extra), seen


# -- Comparing -----------------------------------------------------------------------------------------------------


def _weighted_spread(values: List[float], masses: Optional[List[float]], ddof: int) -> float:
    """The std the whitening divides by (before its eps rule), as the reference computes it."""
    masses = [1.0] * len(values) if masses is None else masses
    total = math.fsum(masses)
    if not values or total <= ddof:
        return 0.0
    mean = math.fsum(q * v for q, v in zip(masses, values)) / total
    return math.sqrt(math.fsum(q * (v - mean) ** 2 for q, v in zip(masses, values)) / (total - ddof))


def _divisor(std: float, eps: float, rule: str) -> float:
    return {"add": std + eps, "max": max(std, eps), "nonzero": std + eps if std > 0 else 1.0}.get(
        rule, math.sqrt(std * std + eps)
    )


def _tolerances(
    options: dict, seen, expected: ReferenceUpdateReport, *, roundoff: float, out_eps: float, terms: int
) -> List[float]:
    """Per sample, how far the tracker's advantage may be from the reference's (see the module docstring)."""
    _, rewards, _, _, masses = seen
    per_reward = options["aggregation"] == "normalize_then_sum"
    lambdas = list(options.get("reward_weights") or [1.0] * options["num_rewards"]) if per_reward else [1.0]
    magnitude = max([abs(r) for row in rewards for r in (row if isinstance(row, list) else [row]) if r == r] + [0.0])
    magnitude *= sum(abs(w) for w in options.get("reward_weights") or [1.0] * options["num_rewards"])
    raw, raw_tolerances = [], []
    for parts, divisors in zip(expected.parts, expected.divisors):
        errors = [terms * roundoff * (1.0 + abs(a) + magnitude) / d for a, d in zip(parts, divisors)]
        combined = math.fsum(w * a for w, a in zip(lambdas, parts))
        raw.append(combined)
        raw_tolerances.append(math.fsum(abs(w) * e for w, e in zip(lambdas, errors)) + terms * roundoff * abs(combined))
    if options.get("normalize", "none") == "none":
        return [t + out_eps * abs(a) for t, a in zip(raw_tolerances, expected.advantages)]
    kept = [i for i, v in enumerate(expected.valid) if v]
    if not kept:
        return [0.0] * len(raw)
    ddof = options.get("normalize_ddof")
    ddof = options.get("ddof", 0) if ddof is None else ddof
    weights = [masses[i] for i in kept] if options.get("weighted_normalize") else None
    spread = _weighted_spread([raw[i] for i in kept], weights, ddof)
    divisor = _divisor(spread, options.get("normalize_eps", 1e-8), options.get("normalize_eps_rule", "add"))
    worst = max(raw_tolerances[i] for i in kept) + terms * roundoff * max(abs(raw[i]) for i in kept)
    whitening = 2 * worst / divisor
    return [out_eps * abs(a) + (1.0 + abs(a)) * whitening for a in expected.advantages]


def _assert_close_list(got: List[float], want: List[float], tolerances: List[float], label: str) -> float:
    """Each got within its tolerance of want (NaN where want is NaN); returns the largest difference."""
    assert len(got) == len(want), label
    worst = 0.0
    for i, (g, w, t) in enumerate(zip(got, want, tolerances)):
        if math.isnan(w):
            assert math.isnan(g), (label, i, g, w)
            continue
        assert abs(g - w) <= t, (label, i, g, w, t)
        worst = max(worst, abs(g - w))
    return worst


def _assert_report(got, want: ReferenceUpdateReport, num_rewards: int, label: str) -> None:
    assert got.valid.tolist() == want.valid, label
    assert got.fallback.tolist() == want.fallback, label
    assert got.zero_variance.tolist() == want.zero_variance, label
    assert float(got.zero_variance_fraction) == pytest.approx(want.zero_variance_fraction, abs=1e-6), label
    if num_rewards == 1:
        assert got.channel_zero_variance_fraction is None and want.channel_zero_variance_fraction is None, label
    else:
        fractions = got.channel_zero_variance_fraction
        assert fractions.shape == (num_rewards,) and fractions.dtype == torch.float32, label
        assert fractions.tolist() == pytest.approx(want.channel_zero_variance_fraction, abs=1e-6), label


def _held_memory(tracker: AdvantageTracker, options: dict) -> Dict[object, list]:
    """The tracker's memory read back row by row, keyed as the reference keys its dicts (float64 values).

    A buffer: its rewards oldest first; an EMA: [mean, var, count]; a Beta memory: [alpha, beta, count]. Rows
    that hold nothing (count 0) are left out, but for the Beta memory, whose rows always hold a state.
    """
    state = {k: v.double() if v.is_floating_point() else v for k, v in tracker.state_dict().items()}
    channels = options["num_rewards"] if options["aggregation"] == "normalize_then_sum" else 1
    if options["keys"] == "ids":
        owners = list(range(tracker.num_prompts))
    else:
        keys, used = tracker.table_keys()
        owners = [int(k) if u else None for k, u in zip(keys.tolist(), used.tolist())]
    held = {}
    for row, owner in enumerate(owners):
        for channel in range(channels):
            key = owner if channels == 1 else (owner, channel)
            at = (row,) if channels == 1 else (row, channel)
            count = int(state["count"][at])
            if options["memory"] == "beta":
                alpha, beta = float(state["alpha"][at]), float(state["beta"][at])
                if owner is None:  # a row no key holds: the prior, count 0
                    assert (alpha, beta, count) == (0.5, 0.5, 0), (row, channel)
                else:
                    held[key] = [alpha, beta, count]
            elif count and options["memory"] == "ema":
                assert owner is not None, (row, channel)
                held[key] = [float(state["mean"][at]), float(state["var"][at]), count]
            elif count:
                assert owner is not None, (row, channel)
                size, head = options.get("buffer_size", 32), int(state["head"][at])
                values = state["rewards"][at].tolist()
                held[key] = values[:count] if count < size else values[head:] + values[:head]
    return held


def _assert_state(tracker: AdvantageTracker, reference: ReferenceAdvantageTracker, options: dict, tolerance: float):
    """The state's layout ([P, C, ...] per reward function) and its contents against the reference's dicts."""
    memory, num_prompts = options["memory"], tracker.num_prompts
    channels = options["num_rewards"] if options["aggregation"] == "normalize_then_sum" else 1
    state = tracker.state_dict()
    for name in MEMORY_STATE[memory]:
        assert state[name].shape[: 1 + (channels > 1)] == ((num_prompts, channels) if channels > 1 else (num_prompts,))
    if options.get("track_streaks"):
        assert state["streak"].shape == (num_prompts,)
    if memory == "none":
        return
    held = _held_memory(tracker, options)
    if memory == "buffer":
        assert held == {key: list(values) for key, values in reference.buffers.items()}
    elif memory == "ema":
        assert held.keys() == reference.moments.keys()
        for key, (mean, var, count) in reference.moments.items():
            got_mean, got_var, got_count = held[key]
            assert got_count == count and abs(got_mean - mean) <= tolerance * (1 + abs(mean)), (key, held[key])
            assert abs(got_var - var) <= tolerance * (1 + var + mean * mean), (key, held[key], var)
    else:
        for key, (alpha, beta, count) in held.items():
            want = reference.betas.get(key, [0.5, 0.5, 0])
            assert count == want[2], (key, held[key], want)
            assert abs(alpha - want[0]) <= tolerance * (1 + want[0]), (key, held[key], want)
            assert abs(beta - want[1]) <= tolerance * (1 + want[1]), (key, held[key], want)
        assert set(reference.betas) <= set(held)


def _assert_query(tracker: AdvantageTracker, reference, pool: list, options: dict, tolerance: float, label: str):
    """``query`` and ``stats`` of every prompt of the pool against the reference's ([M, C] per reward function)."""
    asked = torch.tensor(pool, dtype=torch.int64)
    got, want = tracker.query(asked), reference.query(pool)
    assert got.count.tolist() == want.count, label
    assert (got.streak is None) == (not options.get("track_streaks")), label
    if got.streak is not None:
        assert got.streak.tolist() == want.streak, label
    flat_rates = [v for row in want.pass_rate for v in (row if isinstance(row, list) else [row])]
    flat_spreads = [v for row in want.uncertainty for v in (row if isinstance(row, list) else [row])]
    rates, spreads = got.pass_rate.double().flatten().tolist(), got.uncertainty.double().flatten().tolist()
    _assert_close_list(rates, flat_rates, [tolerance * (1 + abs(w)) for w in flat_rates], f"{label} rate")
    squares, wanted = [s * s for s in spreads], [w * w for w in flat_spreads]
    _assert_close_list(squares, wanted, [tolerance * (1 + w) for w in wanted], f"{label} spread")
    stats = tracker.stats(asked)
    assert stats.count.shape == got.count.shape and torch.equal(stats.count, got.count), label


#: Largest differences seen (float64, float32), for the record; the tests assert tolerances, not these.
WORST: Dict[str, float] = collections.defaultdict(float)


def _check_step(tracker, reference, options: dict, step, number: int, label: str, pool: list, report: bool):
    """One update of both, compared (``update_with_report`` if ``report``), then state and queries.

    Returns:
        The reference's report.
    """
    dtype = tracker.dtype
    (ids, values, mask, extra), seen = _tensor_step(step, dtype, options["num_rewards"])
    expected = reference.update_with_report(*seen)
    if report:
        got = tracker.update_with_report(ids, values, mask, **extra)
        _assert_report(got, expected, options["num_rewards"], label)
        advantages = got.advantages
    else:
        advantages = tracker.update(ids, values, mask, **extra)
    assert advantages.dtype == dtype and advantages.shape == ids.shape, label
    roundoff = max(torch.finfo(dtype).eps, 2.0**-52)
    terms = 16 * (number + 2) * (len(ids) + 8)
    tolerances = _tolerances(options, seen, expected, roundoff=roundoff, out_eps=torch.finfo(dtype).eps, terms=terms)
    worst = _assert_close_list(advantages.double().tolist(), expected.advantages, tolerances, label)
    WORST[str(dtype)] = max(WORST[str(dtype)], worst)
    _assert_state(tracker, reference, options, terms * roundoff)
    _assert_query(tracker, reference, pool, options, terms * roundoff, label)
    return expected


def _run_sequence(
    rng: random.Random, options: dict, keys: str, num_prompts: int, dtype: torch.dtype, steps: int
) -> Tuple[int, int]:
    """A tracker and the reference side by side over ``steps`` random batches, compared after each.

    Returns:
        The valid samples, and those that fell back in none of their rewards.
    """
    pool = _pool(keys, num_prompts)
    tracker, reference = _pair(num_prompts, keys, dtype, options)
    options = dict(options, keys=keys)
    per_reward = options["aggregation"] == "normalize_then_sum" and options["num_rewards"] > 1
    valid = own = 0
    for number in range(steps):
        label = f"{options} P={num_prompts} {dtype} step {number}"
        if rng.random() < 0.25:  # a resumed tracker continues identically
            resumed = AdvantageTracker(num_prompts, dtype=dtype, **options)
            resumed.load_state_dict(tracker.state_dict())
            for name, value in tracker.state_dict().items():
                assert torch.equal(resumed.state_dict()[name], value), (label, name)
            tracker = resumed
        if options["memory"] == "beta" and not per_reward and rng.random() < 0.2:
            prompts = rng.sample(pool, rng.randint(1, num_prompts))
            trials = [rng.randint(0, 8) for _ in prompts]
            successes = [rng.randint(0, n) for n in trials]
            tracker.set_prior(torch.tensor(prompts), torch.tensor(successes), torch.tensor(trials), strength=8.0)
            reference.set_prior(prompts, successes, trials, strength=8.0)
        step = _draw_batch(rng, pool, options)
        expected = _check_step(tracker, reference, options, step, number, label, pool, report=rng.random() < 0.6)
        valid += sum(expected.valid)
        own += sum(v and not fell for v, fell in zip(expected.valid, expected.fallback))
    return valid, own


def _run_case(
    memory: str, aggregation: str, num_rewards: int, dtype: torch.dtype, seed: int, sequences: int
) -> Tuple[int, int]:
    """``sequences`` seeded random sequences of options drawn for a memory, an order and C (see ``_run_sequence``).

    Returns:
        The valid samples over all of them, and those that fell back in none of their rewards.
    """
    rng = random.Random(f"{memory} {aggregation} {num_rewards} {dtype} {seed}")
    valid = own = 0
    for _ in range(sequences):
        options = _draw_options(rng, memory, aggregation, num_rewards)
        keys = rng.choice(["ids", "hashed"])
        num_prompts = 3 if keys == "ids" else rng.randint(1, 3)
        counts = _run_sequence(rng, options, keys, num_prompts, dtype, steps=rng.randint(3, 8))
        valid, own = valid + counts[0], own + counts[1]
    return valid, own


# -- Random sequences: the tensor tracker against the reference ----------------------------------------------------


@pytest.mark.parametrize("num_rewards", [1, 2, 3])
@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("memory", MEMORIES)
def test_random_sequences_match_the_reference_in_float64(memory, aggregation, num_rewards):
    if memory == "beta" and aggregation == "sum_then_normalize" and num_rewards > 1:
        for make in (AdvantageTracker, ReferenceAdvantageTracker):
            args = (3,) if make is AdvantageTracker else ()
            with pytest.raises(ValueError, match="normalize_then_sum"):
                make(*args, memory="beta", num_rewards=num_rewards, aggregation=aggregation)
        return
    valid, own = _run_case(memory, aggregation, num_rewards, torch.float64, seed=0, sequences=20)
    assert valid >= 300 and own >= 60  # enough samples, and some read their own statistics (more: OWN_STATISTICS)


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("memory", MEMORIES)
def test_random_sequences_match_the_reference_in_float32(memory, aggregation):
    num_rewards = 1 if memory == "beta" and aggregation == "sum_then_normalize" else 3
    _run_case(memory, aggregation, num_rewards, torch.float32, seed=1, sequences=4)


#: Options under which (nearly) every sample reads its own statistics, over long sequences of ids.
OWN_STATISTICS = [
    dict(memory="buffer", buffer_size=4, baseline="leave_one_out", ddof=1, eps_rule="variance"),
    dict(memory="ema", decay=0.6, include_batch=False, eps_rule="max", eps=1e-3),
    dict(memory="beta", decay=0.875, min_count=0, baseline="leave_one_out", eps_rule="nonzero"),
    dict(memory="none", scale="leave_one_out_std", ddof=1, eps_rule="nonzero", eps=0.0),
    dict(memory="none", weighted_stats=True, baseline="leave_one_out", ddof=1, eps_rule="add"),
]


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("options", OWN_STATISTICS, ids=lambda o: "-".join(str(v) for v in o.values()))
def test_own_statistics_over_long_sequences(options, aggregation):
    num_rewards = 1 if options["memory"] == "beta" and aggregation == "sum_then_normalize" else 3
    options = dict(
        options, aggregation=aggregation, num_rewards=num_rewards, nan_rewards="invalid", track_streaks=True,
        normalize="batch", normalize_ddof=1, weighted_normalize=True, reward_weights=(1.0, 0.5, 2.0)[:num_rewards],
    )  # fmt: skip
    options.setdefault("min_count", 2)
    tracker, reference = _pair(3, "ids", torch.float64, options)
    rng = random.Random(str(options))
    valid = own = 0
    for number in range(12):
        step = _draw_batch(rng, [0, 1, 2], options, size=10)
        expected = _check_step(
            tracker, reference, dict(options, keys="ids"), step, number, f"{options} {number}", [0, 1, 2], True
        )
        valid += sum(expected.valid)
        own += sum(v and not f for v, f in zip(expected.valid, expected.fallback))
    assert own >= valid // 2 and own >= 40


# -- One reward as before, and weights (1, 0) as one reward ---------------------------------------------------------


def _assert_identical(got, want, label: str) -> None:
    """Two tensors, or two reports, equal bit for bit."""
    if isinstance(got, torch.Tensor):
        assert got.dtype == want.dtype and torch.equal(got, want), (label, got, want)
        return
    for field, value in want._asdict().items():
        if value is None:
            assert getattr(got, field) is None, (label, field)
        else:
            assert torch.equal(getattr(got, field), value), (label, field, getattr(got, field), value)


@pytest.mark.parametrize("memory", MEMORIES)
def test_one_reward_given_as_n_is_bit_identical_to_a_tracker_without_the_new_options(memory):
    rng = random.Random(memory)
    for sequence in range(6):
        options = _draw_options(rng, memory, "sum_then_normalize", 1)
        for name in ("num_rewards", "aggregation", "reward_weights", "eps_rule", "weighted_stats"):
            options.pop(name, None)
        for name in ("normalize_eps_rule", "normalize_ddof", "weighted_normalize"):
            options.pop(name, None)
        if options["scale"] == "leave_one_out_std":
            options["scale"] = "prompt_std"
        explicit = dict(
            num_rewards=1,
            reward_weights=rng.choice([None, (1.0,), [1]]),
            aggregation=AGGREGATIONS[sequence % 2],
            eps_rule="add",
            normalize_eps_rule="add",
            normalize_ddof=options["ddof"] if sequence % 3 else None,
            weighted_stats=False,
            weighted_normalize=False,
        )
        keys = rng.choice(["ids", "hashed"])
        num_prompts = 3 if keys == "ids" else 2
        plain = AdvantageTracker(num_prompts, keys=keys, dtype=torch.float64, **options)
        new = AdvantageTracker(num_prompts, keys=keys, dtype=torch.float64, **options, **explicit)
        pool = _pool(keys, num_prompts)
        for number in range(6):
            label = f"{options} {explicit} step {number}"
            (ids, values, mask, extra), _ = _tensor_step(
                _draw_batch(rng, pool, dict(options, num_rewards=1)), torch.float64
            )
            method = "update_with_report" if number % 2 else "update"
            _assert_identical(
                getattr(new, method)(ids, values, mask, **extra),
                getattr(plain, method)(ids, values, mask, **extra),
                label,
            )
            for name, value in plain.state_dict().items():
                assert torch.equal(new.state_dict()[name], value), (label, name)
            asked = torch.tensor(pool)
            for field, value in plain.query(asked)._asdict().items():
                if value is not None:
                    assert torch.equal(getattr(new.query(asked), field).nan_to_num(7.0), value.nan_to_num(7.0)), label


def test_weights_one_and_zero_equal_one_reward_fed_column_zero():
    # normalize_then_sum with reward weights (1, 0) is a one-reward tracker fed column 0, whitening included,
    # where column 0 counts wherever column 1 does (no NaN in it): the same samples are valid, the same keys seen,
    # and 0 * a_1 = 0 (a_1 finite: eps > 0). Not otherwise: a sample whose reward 0 is NaN but reward 1 is not
    # stays valid (advantage 0 before the whitening, which it enters), and keeps its key in the table.
    # Not bit for bit: the memory holds 2P + 1 rows instead of P + 1, so its sums may take another algorithm
    # (ops.group_stats_algorithm) and another order.
    rng = random.Random(10)
    for sequence in range(24):
        memory = MEMORIES[sequence % 4]
        options = _draw_options(rng, memory, "normalize_then_sum", 2)  # no per-reward batch statistics: see there
        options.update(reward_weights=(1.0, 0.0), nan_rewards="invalid")
        keys = rng.choice(["ids", "hashed"])
        num_prompts = 3 if keys == "ids" else rng.randint(1, 3)
        pool = _pool(keys, num_prompts)
        pair = AdvantageTracker(num_prompts, keys=keys, dtype=torch.float64, **options)
        one_options = dict(options, num_rewards=1, reward_weights=None)
        one = AdvantageTracker(num_prompts, keys=keys, dtype=torch.float64, **one_options)
        for number in range(6):
            prompts, rewards, valid, discount, weights = _draw_batch(rng, pool, options)
            rewards = [[0.5 if math.isnan(r0) else r0, r1] for r0, r1 in rewards]
            (ids, values, mask, extra), _ = _tensor_step((prompts, rewards, valid, discount, weights), torch.float64, 2)
            got = pair.update(ids, values, mask, **extra)
            want = one.update(ids, values[:, 0].contiguous(), mask, **extra)
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, msg=f"{options} step {number}")
            if len(got):
                WORST["weights (1, 0)"] = max(WORST["weights (1, 0)"], float((got - want).abs().max()))
        state = pair.state_dict()
        for name, value in one.state_dict().items():
            if name in MEMORY_STATE[memory]:
                torch.testing.assert_close(state[name][:, 0], value, rtol=1e-12, atol=1e-12, msg=name)
    # Reward 0 NaN, reward 1 not: that sample stays valid and enters the whitening as 0. Before it: [-1, 1, 3, 0]
    # (prompt 1 falls back raw) against [-1, 1, 3] and an invalid sample.
    options = dict(num_rewards=2, aggregation="normalize_then_sum", reward_weights=(1.0, 0.0), nan_rewards="invalid")
    options.update(normalize="batch", scale="none", fallback="raw", dtype=torch.float64)
    ids, rewards = torch.tensor([0, 0, 1, 2]), torch.tensor([[0.0, 1.0], [2.0, 0.0], [3.0, 0.0], [NAN, 5.0]])
    got = AdvantageTracker(3, **options).update(ids, rewards.double())
    want = AdvantageTracker(3, **dict(options, num_rewards=1, reward_weights=None)).update(ids, rewards[:, 0].double())
    assert got[3] != 0 and want[3] == 0 and not torch.allclose(got[:3], want[:3])


# -- Bugs this file found in the tracker, each kept as its reproduction -------------------------------------------


@pytest.mark.parametrize("memory", ["none", "buffer", "ema"])
def test_fixed_per_reward_batch_statistics_reach_the_wrong_samples(memory):
    # One prompt, two samples, two rewards; r - the batch's mean of that reward: reward 0 [0, 1] (mean 0.5) gives
    # [-0.5, 0.5], reward 1 [10, 20] (mean 15) gives [-5, 5]: sum [-5.5, 5.5]. The tracker gives [9, -9]: its pairs
    # sorted by memory row are (s0, r0), (s1, r0), (s0, r1), (s1, r1), and each is paired with the batch mean of
    # the reward at its *batch-order* position: 1 - 15 = -14 for (s1, r0), 10 - 0.5 for (s0, r1). With
    # ops.forced_algorithms(group_stats="dense") and memory="none" (batch order kept) it gives [-5.5, 5.5].
    # Every per-reward use of the batch's statistics is hit: baseline="batch_mean", scale="batch_std",
    # fallback="batch".
    options = dict(num_rewards=2, aggregation="normalize_then_sum", baseline="batch_mean", scale="none")
    rewards = [[0.0, 10.0], [1.0, 20.0]]
    want = ReferenceAdvantageTracker(memory, **options).update([0, 0], rewards)
    assert want == [-5.5, 5.5]
    got = AdvantageTracker(3, memory, dtype=torch.float64, **options).update(
        torch.tensor([0, 0]), torch.tensor(rewards, dtype=torch.float64)
    )
    assert got.tolist() == want


def test_fixed_fallback_mask_per_reward():
    # Documented: bool [N, C] per reward function with normalize_then_sum. Prompt 2 holds two rewards of each
    # function: it does not fall back; prompts 0 and 1 hold none. The tracker returns [True, True, True]: [N],
    # read from memory rows 0, 1, 2 (prompt 0's two rewards and prompt 1's first), not rows 2 * C + c.
    tracker = AdvantageTracker(3, "buffer", buffer_size=4, num_rewards=2, aggregation="normalize_then_sum")
    tracker.update(torch.tensor([2, 2]), torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    assert tracker.query(torch.tensor([0, 1, 2])).count.tolist() == [[0, 0], [0, 0], [2, 2]]
    assert tracker.fallback_mask(torch.tensor([0, 1, 2])).tolist() == [[True, True], [True, True], [False, False]]


def test_fixed_beta_takes_a_weighted_reward_outside_unit_range():
    # sum_then_normalize with reward_weights=(2.0,) puts 2 r into the Beta posterior: after r = 1, 1 (rho 0.9)
    # beta = -1.495, the pass rate 1.55, its uncertainty NaN and the advantages 4.5e5. The reference refuses what
    # it would fold outside [0, 1] (0.5 <= r <= 1 here), as the tracker refuses such rewards themselves.
    for build in (ReferenceAdvantageTracker, lambda *a, **k: AdvantageTracker(2, *a, **k)):
        with pytest.raises(ValueError, match="weighted other than 1"):
            build("beta", reward_weights=(2.0,), decay=0.9)
    # Weighted after normalising, the memory takes the rewards themselves.
    AdvantageTracker(2, "beta", reward_weights=(2.0,), decay=0.9, aggregation="normalize_then_sum")


def test_fixed_weightless_prompt_zero_fallback():
    # weighted_stats: prompt 1's only sample weighs 0, so it has no weighted mean and falls back (documented); the
    # "zero" fallback gives it 0. The tracker gives NaN: prompt_advantages takes the deviation r - m (m = 0 / 0)
    # as the numerator and relies on an infinite divisor to make it 0, which NaN / inf is not. The "raw" and
    # "batch" fallbacks give the reference's values.
    options = dict(weighted_stats=True, fallback="zero")
    want = ReferenceAdvantageTracker(**options).update([0, 0, 1], [1.0, 2.0, 3.0], weights=[1.0, 1.0, 0.0])
    assert want[2] == 0.0
    got = AdvantageTracker(2, dtype=torch.float64, **options).update(
        torch.tensor([0, 0, 1]), torch.tensor([1.0, 2.0, 3.0], **F64), weights=torch.tensor([1.0, 1.0, 0.0], **F64)
    )
    assert got.tolist() == want


# -- torch.compile -------------------------------------------------------------------------------------------------

#: Options compiled with fullgraph=True, C = 3, one per order.
COMPILED = {
    "sum_then_normalize": dict(
        memory="ema", decay=0.8, baseline="leave_one_out", eps_rule="max", eps=1e-3, normalize="batch",
        normalize_eps_rule="variance", normalize_ddof=1, weighted_normalize=True, track_streaks=True,
    ),
    "normalize_then_sum": dict(
        memory="buffer", buffer_size=3, include_batch=False, fallback="raw", eps_rule="nonzero", normalize="batch",
        weighted_normalize=True, track_streaks=True,
    ),
}  # fmt: skip


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_compiled_update_matches_eager(aggregation):
    options = dict(
        COMPILED[aggregation], aggregation=aggregation, num_rewards=3, reward_weights=(1.0, -0.5, 2.0),
        nan_rewards="invalid", keys="hashed", check_values=False, dtype=torch.float64,
    )  # fmt: skip
    torch._dynamo.reset()
    eager, compiled_tracker = AdvantageTracker(4, **options), AdvantageTracker(4, **options)
    compiled = torch.compile(compiled_tracker.update, fullgraph=True, backend="eager")
    rng = random.Random(aggregation)
    pool = _pool("hashed", 4)
    for step in range(4):  # one shape: one compilation
        batch = _draw_batch(rng, pool, dict(options, memory="buffer"), size=12)
        (ids, values, mask, extra), _ = _tensor_step(batch, torch.float64, 3)
        mask = torch.ones(12, dtype=torch.bool) if mask is None else mask  # the same graph every step
        want = eager.update(ids, values, mask, **extra)
        torch.testing.assert_close(compiled(ids, values, mask, **extra), want, rtol=1e-12, atol=1e-12, msg=str(step))
    for key, value in eager.state_dict().items():
        assert torch.equal(compiled_tracker.state_dict()[key], value), key


# -- Several ranks ---------------------------------------------------------------------------------------------------

WORLD_SIZE = 2

#: (options, keys) run across ranks, each with [N, C] rewards (and sample weights where the options take them).
RANK_CASES = [
    (
        dict(
            memory="none", num_rewards=2, reward_weights=(1.0, 0.5), weighted_stats=True, baseline="leave_one_out",
            ddof=1, normalize="batch", weighted_normalize=True, normalize_eps_rule="variance",
        ),
        "ids",
    ),
    (
        dict(
            memory="buffer", buffer_size=3, num_rewards=3, aggregation="normalize_then_sum", min_count=1,
            reward_weights=(1.0, -1.0, 0.5), normalize="batch", weighted_normalize=True, normalize_ddof=1,
            eps_rule="variance", track_streaks=True,
        ),
        "hashed",
    ),
    (
        dict(
            memory="beta", decay=0.9, num_rewards=2, aggregation="normalize_then_sum", min_count=0,
            include_batch=False, scale="none", normalize="batch", track_streaks=True,
        ),
        "ids",
    ),
]  # fmt: skip


def _rank_scenarios(rank: int) -> None:
    """Every rank's tracker equals one process fed the batches in rank order, and that one the reference."""
    group = dist.group.WORLD
    rng = random.Random(11)  # the same stream on every rank
    for options, keys in RANK_CASES:
        options = dict(options, nan_rewards="invalid")
        shared = AdvantageTracker(3, keys=keys, dtype=torch.float64, process_group=group, **options)
        single, reference = _pair(3, keys, torch.float64, options)
        pool = _pool(keys, 3)
        for step in range(5):
            local = rng.randint(1, 5)
            batch = _draw_batch(rng, pool, options, size=WORLD_SIZE * local)
            (ids, values, mask, extra), seen = _tensor_step(batch, torch.float64, options["num_rewards"])
            expected = single.update_with_report(ids, values, mask, **extra)
            want = reference.update_with_report(*seen)
            torch.testing.assert_close(expected.advantages.tolist(), want.advantages, rtol=1e-9, atol=1e-9)
            mine = slice(rank * local, (rank + 1) * local)
            local_extra = {name: value[mine] for name, value in extra.items()}
            got = shared.update_with_report(
                ids[mine], values[mine], None if mask is None else mask[mine], **local_extra
            )
            label = (options, step)
            assert torch.equal(got.advantages, expected.advantages[mine]), label
            for field in ("valid", "fallback", "zero_variance"):
                assert torch.equal(getattr(got, field), getattr(expected, field)[mine]), (label, field)
            assert torch.equal(got.zero_variance_fraction, expected.zero_variance_fraction), label
            assert torch.equal(got.channel_zero_variance_fraction, expected.channel_zero_variance_fraction), label
        for name, value in single.state_dict().items():
            assert torch.equal(shared.state_dict()[name], value), (options, name)
    # Whether some weight is positive is the gathered batch's question: rank 1's samples all weigh 0, rank 0's
    # do not, and both ranks accept it, as one process does; a gathered batch of no weight is refused on both.
    options = dict(memory="none", num_rewards=2, normalize="batch", weighted_normalize=True)
    shared = AdvantageTracker(3, dtype=torch.float64, process_group=group, **options)
    rewards = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    ids = torch.tensor([0, 0])
    local_weights = torch.tensor([[2.0, 1.0], [0.0, 0.0]], dtype=torch.float64)[rank]
    got = shared.update(ids[rank : rank + 1], rewards[rank : rank + 1], weights=local_weights[:1])
    want = AdvantageTracker(3, dtype=torch.float64, **options).update(
        ids, rewards, weights=torch.tensor([2.0, 0.0], dtype=torch.float64)
    )
    assert torch.equal(got, want[rank : rank + 1])
    with pytest.raises(ValueError, match="all 0"):
        shared.update(ids[rank : rank + 1], rewards[rank : rank + 1], weights=torch.zeros(1, dtype=torch.float64))


def test_ranks_match_one_process_and_the_reference(tmp_path):
    run_ranks(_rank_scenarios, WORLD_SIZE, str(tmp_path / "init"), timeout=120)


# -- Refusals, which change nothing --------------------------------------------------------------------------------

SUMMED = dict(memory="buffer", buffer_size=4, num_rewards=2, nan_rewards="refuse")
PER_REWARD = dict(memory="ema", decay=0.9, num_rewards=2, aggregation="normalize_then_sum", nan_rewards="invalid")
WEIGHTED = dict(memory="buffer", buffer_size=4, num_rewards=2, normalize="batch", weighted_normalize=True)
BETAS = dict(memory="beta", decay=0.9, num_rewards=2, aggregation="normalize_then_sum")

#: name -> (options, rewards, extra inputs, error, message, whether the reference refuses it too).
REFUSED_UPDATES = {
    "rewards [N] for two reward functions": (SUMMED, [0.5, 1.0], {}, ValueError, r"\[N, 2\]", True),
    "rewards [N, 3] for two": (PER_REWARD, [[0.5, 1.0, 0.0]] * 2, {}, ValueError, r"\[N, 2\]", True),
    "rewards [N, 1] for one": (dict(memory="ema"), [[0.5], [1.0]], {}, ValueError, "1-D", True),
    "rewards of three samples for two": (SUMMED, [[0.5, 1.0]] * 3, {}, ValueError, r"\[N, 2\]", True),
    "weights to a tracker that ignores them": (SUMMED, [[0.5, 1.0]] * 2, {"weights": [1.0, 2.0]}, ValueError,
                                               "would ignore them", True),
    "weights missing": (WEIGHTED, [[0.5, 1.0]] * 2, {}, ValueError, "pass weights", True),
    "a negative weight": (WEIGHTED, [[0.5, 1.0]] * 2, {"weights": [1.0, -2.0]}, ValueError, "finite", True),
    "weights all 0 for the whitening": (WEIGHTED, [[0.5, 1.0]] * 2, {"weights": [0.0, 0.0]}, ValueError, "all 0", True),
    "a NaN weight": (WEIGHTED, [[0.5, 1.0]] * 2, {"weights": [NAN, 2.0]}, ValueError, "finite", True),
    "an infinite weight": (WEIGHTED, [[0.5, 1.0]] * 2, {"weights": [1.0, math.inf]}, ValueError, "finite", True),
    "weights of another length": (WEIGHTED, [[0.5, 1.0]] * 2, {"weights": [1.0]}, ValueError, "shape", True),
    "weights a list": (WEIGHTED, [[0.5, 1.0]] * 2, {"weights": "list"}, TypeError, "tensor", False),
    "a reward above 1 in column 1 (Beta)": (BETAS, [[0.5, 1.5], [0.0, 1.0]], {}, ValueError, r"\[0, 1\]", True),
    "an infinite reward in column 1": (PER_REWARD, [[0.5, math.inf], [NAN, NAN]], {}, ValueError, "infinite", True),
    "a NaN reward refused": (SUMMED, [[NAN, 1.0], [0.0, 1.0]], {}, ValueError, "finite", True),
}  # fmt: skip


def _assert_state_unchanged(tracker: AdvantageTracker, before: Dict[str, torch.Tensor]) -> None:
    after = tracker.state_dict()
    assert after.keys() == before.keys()
    for name, value in before.items():
        assert torch.equal(after[name], value), name


def _with_history(options: dict, keys: str = "ids"):
    """A float64 tracker and its reference after two updates (state that a refusal could spoil)."""
    options = dict(options, track_streaks=True)
    tracker, reference = _pair(3, keys, torch.float64, options)
    pool = _pool(keys, 3)
    rng = random.Random(3)
    for _ in range(2):
        batch = _draw_batch(rng, pool, dict(options, nan_rewards="refuse"), size=6)
        (ids, values, mask, extra), seen = _tensor_step(batch, torch.float64, options["num_rewards"])
        tracker.update(ids, values, mask, **extra)
        reference.update(*seen)
    return tracker, reference


@pytest.mark.parametrize("name", sorted(REFUSED_UPDATES))
def test_refused_updates_change_nothing(name):
    options, rewards, extra, error, message, reference_refuses = REFUSED_UPDATES[name]
    options = dict(options, num_rewards=options.get("num_rewards", 1))
    tracker, reference = _with_history(options)
    before, reference_before = tracker.state_dict(), copy.deepcopy(reference)
    weights = extra.get("weights")
    tensor_weights = [1.0, 1.0] if weights == "list" else None if weights is None else torch.tensor(weights, **F64)
    ids = torch.tensor([0, 2])
    for method in (tracker.update, tracker.update_with_report):
        with pytest.raises(error, match=message):
            method(ids, torch.tensor(rewards, **F64), **({} if weights is None else {"weights": tensor_weights}))
        _assert_state_unchanged(tracker, before)
    if reference_refuses:
        with pytest.raises(ValueError):
            reference.update([0, 2], rewards, weights=weights)
        assert vars(reference) == vars(reference_before)


def test_set_prior_on_a_memory_per_reward_function_is_refused():
    tracker, reference = _with_history(BETAS)
    before, reference_before = tracker.state_dict(), copy.deepcopy(reference)
    assert before["alpha"].shape == (3, 2)
    with pytest.raises(ValueError, match="keeps 2 per prompt"):
        tracker.set_prior(torch.tensor([0]), torch.tensor([1]), torch.tensor([2]))
    _assert_state_unchanged(tracker, before)
    with pytest.raises(ValueError, match="one pass rate per prompt"):
        reference.set_prior([0], [1], [2])
    assert vars(reference) == vars(reference_before)


# -- Planted bugs: the checks above must catch each ----------------------------------------------------------------


def _check_options(options: dict, keys: str = "ids", sequences: int = 3, steps: int = 6) -> None:
    """Runs ``sequences`` seeded random sequences of ``options`` against the reference (AssertionError if not equal)."""
    rng = random.Random(str(options))
    for _ in range(sequences):
        _run_sequence(rng, dict(options), keys, 3, torch.float64, steps)


def _wrap_init(monkeypatch, change) -> None:
    """Plants ``change(tracker)`` after every ``AdvantageTracker.__init__``."""
    real = AdvantageTracker.__init__

    def planted(self, *args, **kwargs):
        real(self, *args, **kwargs)
        change(self)

    monkeypatch.setattr(AdvantageTracker, "__init__", planted)


def _plant_max_rule_adds(monkeypatch):
    real = functional_module.scale_divisor
    monkeypatch.setattr(
        functional_module,
        "scale_divisor",
        lambda std, eps, rule, *, in_place=False: real(std, eps, "add" if rule == "max" else rule, in_place=in_place),
    )


def _plant_nan_spoils_its_row(monkeypatch):
    def weighted_sum(self, rewards):
        return (rewards.to(self._compute_dtype) * self._reward_weights).sum(1)  # sum, not nansum

    monkeypatch.setattr(AdvantageTracker, "_weighted_sum", weighted_sum)


def _plant_weighted_std_without_ddof(monkeypatch):
    real = memory_module.frequency_std
    monkeypatch.setattr(memory_module, "frequency_std", lambda spread, mass, ddof: real(spread, mass, 0))


def _plant_leave_one_out_std_without_ddof(monkeypatch):
    real = tracker_module.leave_one_out_std
    monkeypatch.setattr(tracker_module, "leave_one_out_std", lambda *args, ddof: real(*args, ddof=0))


def _plant_channel_fraction_over_every_group(monkeypatch):
    def fractions(self, equal, present):
        return (equal & present).sum(0).float() / max(equal.shape[0], 1)

    monkeypatch.setattr(AdvantageTracker, "_channel_fractions", fractions)


def _plant_reward_weights_positive(monkeypatch):
    def change(tracker):
        if tracker._reward_weights is not None:
            tracker._reward_weights = tracker._reward_weights.abs()

    _wrap_init(monkeypatch, change)


def _plant_unweighted_whitening(monkeypatch):
    real = tracker_module.normalized_advantages
    monkeypatch.setattr(
        tracker_module, "normalized_advantages", lambda *args, weights=None, **kwargs: real(*args, **kwargs)
    )


def _plant_eviction_forgets_reward_zero_only(monkeypatch):
    def reset_rows(self, rows):
        self._memory.reset_rows(rows * self._channels)  # the first reward function's row of each prompt only
        if self._streak is not None:
            self._streak.index_fill_(0, rows, 0)

    monkeypatch.setattr(AdvantageTracker, "_reset_rows", reset_rows)


PER3 = dict(num_rewards=3, aggregation="normalize_then_sum", nan_rewards="invalid", fallback="raw")
SUM3 = dict(num_rewards=3, aggregation="sum_then_normalize", nan_rewards="invalid")
#: name -> (the plant, options it shows under, keys).
PLANTED = {
    "max rule adds": (_plant_max_rule_adds, dict(PER3, memory="none", eps_rule="max", eps=0.1), "ids"),
    "a NaN spoils its row": (_plant_nan_spoils_its_row, dict(SUM3, memory="ema", decay=0.6), "ids"),
    "weighted std without ddof": (
        _plant_weighted_std_without_ddof, dict(SUM3, memory="none", weighted_stats=True, ddof=1), "ids"
    ),
    "leave-one-out std without ddof": (
        _plant_leave_one_out_std_without_ddof, dict(PER3, memory="none", scale="leave_one_out_std", ddof=1), "ids"
    ),
    "channel fractions over every group": (
        _plant_channel_fraction_over_every_group, dict(SUM3, memory="buffer"), "ids"
    ),
    "reward weights made positive": (
        _plant_reward_weights_positive, dict(PER3, memory="buffer", reward_weights=(1.0, -1.0, 0.5)), "ids"
    ),
    "whitening unweighted": (
        _plant_unweighted_whitening, dict(SUM3, memory="none", normalize="batch", weighted_normalize=True), "ids"
    ),
    "eviction forgets reward 0 only": (_plant_eviction_forgets_reward_zero_only, dict(PER3, memory="ema"), "hashed"),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(PLANTED))
def test_planted_bugs_are_caught(name, monkeypatch):
    plant, options, keys = PLANTED[name]
    _check_options(options, keys)  # the real tracker passes
    plant(monkeypatch)
    with pytest.raises(AssertionError):
        _check_options(options, keys)


def test_leave_one_out_std_of_an_outlier_keeps_its_precision():
    # The downdate SS - d^2 n / (n - 1) cancels for a sample holding most of its group's spread; the others'
    # squares are summed again for it. [-10, 0.8, 0.801, 0.802]: the first sample's others have std 0.001.
    rewards = [-10.0, 0.8, 0.801, 0.802]
    options = dict(scale="leave_one_out_std", baseline="leave_one_out", ddof=1, eps=1e-6, eps_rule="nonzero")
    want = ReferenceAdvantageTracker(**options).update([0] * 4, rewards)
    got = AdvantageTracker(1, dtype=torch.float64, **options).update(
        torch.zeros(4, dtype=torch.int64), torch.tensor(rewards, **F64)
    )
    torch.testing.assert_close(got, torch.tensor(want, **F64), rtol=1e-12, atol=0)
    assert want[0] == pytest.approx(-10790.2098, rel=1e-8)
    got32 = AdvantageTracker(1, **options).update(torch.zeros(4, dtype=torch.int64), torch.tensor(rewards))
    # float32 holds 0.801 to about 3e-8 of 1, so a spread of 0.001 to about 1e-4 of itself.
    torch.testing.assert_close(got32.double(), torch.tensor(want, **F64), rtol=1e-4, atol=0)


@pytest.mark.parametrize("algorithm", ["dense", "sorted"])
@pytest.mark.parametrize("baseline", ["prompt_mean", "leave_one_out"])
def test_weighted_statistics_agree_with_the_reference_under_either_group_algorithm(algorithm, baseline):
    # NoMemory's weighted sums have a dense and a sorted branch (ops.group_stats_algorithm picks by size and
    # device): each, forced, equals the reference, with a sample of weight 0, one holding all of its prompt's
    # weight, and a prompt of no weight.
    options = dict(baseline=baseline, ddof=1, min_count=2, fallback="batch", weighted_stats=True)
    prompts = [0, 0, 0, 1, 1, 2, 2, 3]
    rewards = [1.0, 0.5, 3.0, 2.0, -1.0, 0.25, 4.0, 1.5]
    weights = [2.0, 0.0, 1.0, 3.0, 0.0, 0.0, 0.0, 5.0]
    want = ReferenceAdvantageTracker(**options).update_with_report(prompts, rewards, weights=weights)
    with ops.forced_algorithms(group_stats=algorithm):
        got = AdvantageTracker(4, dtype=torch.float64, **options).update_with_report(
            torch.tensor(prompts), torch.tensor(rewards, **F64), weights=torch.tensor(weights, **F64)
        )
    torch.testing.assert_close(got.advantages, torch.tensor(want.advantages, **F64), rtol=1e-12, atol=1e-12)
    assert got.fallback.tolist() == want.fallback
