"""The pass-rate paths of ``AdvantageTracker`` against ``ReferenceAdvantageTracker``, over random sequences.

What is tested: the Beta memory (``repeats="all"`` and ``"last"``, a
constant ``decay`` below 1 and equal to 1, and per-sample ``discount``
tensors), baselines from the past only (``include_batch=False`` over the
Beta, buffer and EMA memories), ``normalize="batch"``, ``track_streaks``,
``set_prior`` and ``query``. Random sequences mix them with valid masks, NaN
rewards (``nan_rewards="invalid"``), prompts repeated within a batch,
fractional rewards in [0, 1], hashed keys in tables of one to three rows
(so that keys are evicted and overflow), ``state_dict`` round trips
mid-sequence, ``update`` and ``update_with_report``; seeded long sequences
in which most samples read their own prompt's statistics (random ones spend
much of their time in fallbacks and evictions). Then: every dtype (a
reference rebuilt from the tracker's state before each step, so that each
step is held to its own rounding, as in ``test_tracker_matrix.py``), two gloo
ranks, ``torch.compile(fullgraph=True)``, and the refusals, each of which
must leave the state as it was. Two tracker bugs found here have their own
tests (``test_hashed_batch_only_tracker_*``).

Why: each of these options composes with every older one (keys, masks,
fallbacks, estimators, ranks, compilation), and the reference, plain Python
loops over dicts, is the specification (its class docstring). The reference
itself is pinned first: on hand-computed cases, and against
``SpoBetaTracker``, an independent transcription of SPO's code.

Tolerances (``_advantage_tolerances``): an advantage ``num / D`` computed
with unit roundoff u is off by about ``u * (1 + |advantage|) / D`` (the
numerator's error, and the std's, over the denominator D, which the
reference gives per sample), times a count of the terms and steps behind it;
a normalised one ``(a - mean) / (std + normalize_eps)`` is off by the raw
advantages' worst error over ``std + normalize_eps``. In float64 that is
about 1e-12 for denominators near 1.
"""

import collections
import copy
import math
import random
import warnings
from typing import Dict, List, Optional, Sequence, Tuple

import hypothesis
import pytest
import torch
import torch.distributed as dist
from hypothesis import strategies as st

from rail_interview.stat_tracking import AdvantageTracker
from rail_interview.stat_tracking.reference import ReferenceAdvantageTracker, ReferenceUpdateReport
from spawned_ranks import run_ranks
from system_references import SpoBetaTracker

# Past-only baselines with a buffer or EMA std are exercised on purpose; test_past_only_prompt_std_warns tests it.
pytestmark = pytest.mark.filterwarnings("ignore:include_batch=False with a prompt std:UserWarning")

NAN = float("nan")
BASELINES = ("prompt_mean", "leave_one_out", "batch_mean")
SCALES = ("prompt_std", "batch_std", "none")
FALLBACKS = ("batch", "raw", "zero")
#: Hashed keys: large, far apart, nowhere near the ids 0..P-1.
KEY_BASE = 10**12


# -- Helpers -------------------------------------------------------------------------------------------------------


def _pool(keys: str, num_prompts: int) -> List[int]:
    """The prompts a sequence draws from: every id, or two more hashed keys than the table has rows."""
    if keys == "ids":
        return list(range(num_prompts))
    return [KEY_BASE + 7919 * k for k in range(num_prompts + 2)]


def _pair(num_prompts: int, keys: str, dtype: torch.dtype, options: dict, **tracker_options):
    """A tensor tracker and the reference built with the same options."""
    tracker = AdvantageTracker(num_prompts, keys=keys, dtype=dtype, **options, **tracker_options)
    reference = ReferenceAdvantageTracker(**options, capacity=num_prompts if keys == "hashed" else None)
    return tracker, reference


def _mean_std(values: Sequence[float], ddof: int) -> Tuple[float, float]:
    """Mean (0 when empty) and std with ``ddof`` (0 when at most ``ddof`` values)."""
    mean = math.fsum(values) / len(values) if values else 0.0
    if len(values) <= ddof:
        return mean, 0.0
    return mean, math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (len(values) - ddof))


def _denominators(
    options: dict,
    before: ReferenceAdvantageTracker,
    after: ReferenceAdvantageTracker,
    step: Tuple[list, List[float]],
    report: ReferenceUpdateReport,
) -> List[float]:
    """Per sample, what the reference divided its advantage by (1 where nothing: invalid, ``"zero"`` fallback)."""
    prompts, rewards = step
    ddof, eps, scale = options.get("ddof", 0), options.get("eps", 1e-6), options.get("scale", "prompt_std")
    memory = options.get("memory", "none")
    _, batch_std = _mean_std([r for r, v in zip(rewards, report.valid) if v], ddof)
    held = (after if options.get("include_batch", True) else before).stats()
    out = []
    for i, prompt in enumerate(prompts):
        fallback = options.get("fallback", "batch")
        if not report.valid[i] or scale == "none" or (report.fallback[i] and fallback == "zero"):
            out.append(1.0)
        elif scale == "batch_std" or (report.fallback[i] and fallback == "batch"):
            out.append(batch_std + eps)
        elif report.fallback[i]:  # "raw"
            out.append(1.0 + eps)
        elif memory == "none":
            group = [r for p, r, v in zip(prompts, rewards, report.valid) if p == prompt and v]
            out.append(_mean_std(group, ddof)[1] + eps)
        elif memory == "beta":
            out.append(held.get(prompt, (0.5, 0.5, 0))[1] + eps)  # sqrt(p (1 - p)); the prior's if never seen
        else:
            _, std, count = held[prompt]
            out.append(std * math.sqrt(count / (count - ddof)) + eps)
    return out


def _advantage_tolerances(
    options: dict,
    before: ReferenceAdvantageTracker,
    step: Tuple[list, List[float], Optional[List[bool]], Optional[List[float]]],
    expected: ReferenceUpdateReport,
    after: ReferenceAdvantageTracker,
    *,
    roundoff: float,
    out_eps: float,
    terms: int,
) -> List[float]:
    """Per sample, how far the tracker's advantage may be from the reference's (see the module docstring).

    Args:
        options: the trackers' options.
        before: a copy of the reference before the step.
        step: the step's prompts, rewards (as the tracker's dtype holds them), valid flags and discounts.
        expected: the reference's report of the step.
        after: the reference after the step.
        roundoff: the unit roundoff of the tracker's arithmetic (and state).
        out_eps: the eps of the advantages' dtype (their final rounding).
        terms: a bound on the operations behind a value, in units of roundoff.
    """
    prompts, rewards, valid, discount = step
    denominators = _denominators(options, before, after, (prompts, rewards), expected)
    if options.get("normalize", "none") == "none":
        raw = expected.advantages
    else:  # the advantages before the whitening, from a copy without it (the state does not depend on it)
        unnormalized = copy.deepcopy(before)
        unnormalized.normalize = "none"
        raw = unnormalized.update_with_report(prompts, rewards, valid, discount).advantages
    raw_tolerances = [terms * roundoff * (1.0 + abs(a)) / d for a, d in zip(raw, denominators)]
    if options.get("normalize", "none") == "none":
        return [t + out_eps * abs(a) for t, a in zip(raw_tolerances, raw)]
    kept = [i for i, v in enumerate(expected.valid) if v]
    if not kept:
        return [0.0] * len(prompts)
    _, spread = _mean_std([raw[i] for i in kept], options.get("ddof", 0))
    worst = max(raw_tolerances[i] for i in kept) + terms * roundoff * max(abs(raw[i]) for i in kept)
    whitening = 2 * worst / (spread + options.get("normalize_eps", 1e-8))
    return [out_eps * abs(a) + (1.0 + abs(a)) * whitening for a in expected.advantages]


def _assert_close_list(
    got: Sequence[float], want: Sequence[float], tolerances: Sequence[float], label: str, largest: float = math.inf
) -> None:
    """Each got within its tolerance of want, NaN where want is NaN, +-inf where want exceeds ``largest``."""
    assert len(got) == len(want), label
    for i, (g, w, t) in enumerate(zip(got, want, tolerances)):
        if math.isnan(w):
            assert math.isnan(g), (label, i, g, w)
        elif abs(w) > largest:  # beyond the dtype's range: an infinity of the right sign (documented)
            assert g == math.copysign(math.inf, w), (label, i, g, w)
        else:
            assert abs(g - w) <= t, (label, i, g, w, t)


def _assert_report(got, want: ReferenceUpdateReport, label: str) -> None:
    assert got.valid.tolist() == want.valid, label
    assert got.fallback.tolist() == want.fallback, label
    assert got.zero_variance.tolist() == want.zero_variance, label
    assert float(got.zero_variance_fraction) == pytest.approx(want.zero_variance_fraction, abs=1e-6), label


def _assert_query(tracker: AdvantageTracker, reference, prompts: list, options: dict, tolerance: float, label: str):
    """``query`` of every prompt of the pool against the reference's: counts and streaks exactly."""
    got = tracker.query(torch.tensor(prompts, dtype=torch.int64))
    want = reference.query(prompts)
    assert got.count.dtype == torch.int64 and got.count.tolist() == want.count, label
    if options.get("track_streaks", False):
        assert got.streak.dtype == torch.int64 and got.streak.tolist() == want.streak, label
    else:
        assert got.streak is None, label
    rates = got.pass_rate.double().tolist()
    _assert_close_list(rates, want.pass_rate, [tolerance * (1 + abs(w)) for w in want.pass_rate], f"{label} rate")
    spreads = got.uncertainty.double().tolist()
    if options["memory"] == "beta":
        _assert_close_list(spreads, want.uncertainty, [tolerance * (1 + w) for w in want.uncertainty], label)
    else:  # a std of near-equal rewards: compare variances, which carry the roundoff linearly
        squares = [s * s for s in spreads]
        _assert_close_list(squares, [w * w for w in want.uncertainty], [tolerance] * len(squares), f"{label} spread")


# -- The reference by hand -----------------------------------------------------------------------------------------


def test_reference_beta_folds_every_repeat_or_keeps_the_last():
    # Prior 0.5 / 0.5; rewards 1 then 0.25 of one prompt, discounts 0.5 then 0.8.
    every = ReferenceAdvantageTracker("beta", min_count=0, track_streaks=True)
    every.update(["a", "a"], [1.0, 0.25], discount=[0.5, 0.8])
    # alpha = 0.8 * (0.5 * 0.5 + 1) + 0.25 = 1.25; beta = 0.8 * (0.5 * 0.5 + 0) + 0.75 = 0.95.
    assert every.betas["a"] == pytest.approx([1.25, 0.95, 2], abs=1e-15)
    last = ReferenceAdvantageTracker("beta", repeats="last", min_count=0)
    last.update(["a", "a"], [1.0, 0.25], discount=[0.5, 0.8])
    # Only the last sample's update, from the prior: alpha = 0.8 * 0.5 + 0.25, beta = 0.8 * 0.5 + 0.75; count 2.
    assert last.betas["a"] == pytest.approx([0.65, 1.15, 2], abs=1e-15)
    # decay=1: plain counts of successes and failures on top of the prior.
    counting = ReferenceAdvantageTracker("beta", decay=1.0)
    counting.update([0, 0, 0, 1], [1.0, 1.0, 0.0, 0.5])
    assert counting.betas == {0: [2.5, 1.5, 3], 1: [1.0, 1.0, 1]}
    assert every.query(["a", "never"]).count == [2, 0]


def test_reference_beta_leave_one_out_is_the_reward_minus_the_others_share():
    # Weight of each reward in alpha: the product of the later discounts (0.8, then 1); over alpha + beta = 2.2.
    tracker = ReferenceAdvantageTracker("beta", baseline="leave_one_out", scale="none", min_count=0)
    advantages = tracker.update(["a", "a"], [1.0, 0.25], discount=[0.5, 0.8])
    alpha, beta, _ = tracker.betas["a"]
    for reward, weight, advantage in zip([1.0, 0.25], [0.8, 1.0], advantages):
        others = (alpha - weight * reward) / (alpha + beta - weight)  # the pass rate without this reward
        assert advantage == pytest.approx(reward - others, abs=1e-12)


def test_reference_past_only_baselines_read_the_memory_before_the_batch():
    spo = ReferenceAdvantageTracker("beta", decay=0.5, include_batch=False, scale="none", min_count=0)
    assert spo.update(["a", "a", "b"], [1.0, 0.0, 1.0]) == [0.5, -0.5, 0.5]  # every sample reads the prior 0.5
    # Now a: alpha = 0.5 * (0.5 * 0.5 + 1) + 0 = 0.625, beta = 0.5 * (0.25 + 0) + 1 = 1.125: p = 0.625 / 1.75.
    assert spo.update(["a"], [1.0]) == pytest.approx([1.0 - 0.625 / 1.75], abs=1e-15)
    buffer = ReferenceAdvantageTracker("buffer", buffer_size=2, include_batch=False, min_count=2, fallback="raw")
    assert buffer.update([0, 0], [1.0, 3.0]) == pytest.approx([1.0, 3.0], rel=1e-5)  # nothing before: raw fallback
    assert buffer.update([0], [5.0]) == pytest.approx([(5.0 - 2.0) / (1.0 + 1e-6)])  # the buffer [1, 3] before
    assert buffer.stats()[0] == (4.0, 1.0, 2)  # then the batch went in: [3, 5]
    with pytest.raises(ValueError, match="include_batch=False needs a memory"):
        ReferenceAdvantageTracker(include_batch=False)


def test_reference_normalizes_the_valid_advantages_last():
    tracker = ReferenceAdvantageTracker(scale="none", fallback="raw", normalize="batch", ddof=1, normalize_eps=0.0)
    report = tracker.update_with_report([0, 0, 1, 2], [1.0, 3.0, 7.0, 100.0], [True, True, True, False])
    assert report.advantages[3] == 0.0  # invalid: stays 0
    kept = report.advantages[:3]  # before: -1, 1 (prompt 0), 7 (prompt 1's raw fallback)
    assert math.fsum(kept) == pytest.approx(0.0, abs=1e-12)
    assert _mean_std(kept, 1)[1] == pytest.approx(1.0, abs=1e-12)
    lone = ReferenceAdvantageTracker(scale="none", fallback="raw", normalize="batch", ddof=1)
    assert lone.update([0], [5.0]) == [0.0]  # one valid sample: its own mean removed, std 0 (ddof=1)


def test_reference_streaks_count_visits_with_equal_rewards():
    tracker = ReferenceAdvantageTracker("beta", track_streaks=True, nan_rewards="invalid")
    visits = [
        ([0, 0, 1], [1.0, 1.0, 0.5], None, {0: 1, 1: 1}),
        ([0, 0], [0.0, 0.0], None, {0: 2, 1: 1}),  # 1 not visited: unchanged
        ([0, 1, 1], [NAN, 0.5, 0.5], None, {0: 2, 1: 2}),  # 0's only sample invalid: not a visit
        ([0, 0, 1], [0.0, 1.0, 0.5], [True, True, False], {0: 0, 1: 2}),  # differing rewards reset 0
    ]
    for prompts, rewards, valid, streaks in visits:
        tracker.update(prompts, rewards, valid)
        assert {p: tracker.streaks().get(p, 0) for p in (0, 1)} == streaks
    tracker.set_prior([1], [2], [3])
    assert tracker.query([0, 1, 2]).streak == [0, 0, 0]


def test_reference_query_and_set_prior():
    beta = ReferenceAdvantageTracker("beta", decay=0.9)
    query = beta.query(["new"])
    assert (query.pass_rate, query.uncertainty, query.count) == ([0.5], [math.sqrt(0.25 / 2)], [0])
    beta.set_prior(["a", "b"], [3, 0], [4, 0], strength=None)  # a: 3.5 / 1.5; b: 0.5 / 0.5
    beta.set_prior(["c"], [3], [4], strength=8.0)  # 8 * 3.5 / 5, 8 * 1.5 / 5
    assert beta.betas == {"a": [3.5, 1.5, 0], "b": [0.5, 0.5, 0], "c": [5.6, 2.4, 0]}
    query = beta.query(["a", "c"])
    assert query.pass_rate == pytest.approx([0.7, 0.7])
    assert query.uncertainty == pytest.approx([math.sqrt(3.5 * 1.5 / (25 * 6)), math.sqrt(5.6 * 2.4 / (64 * 9))])
    buffer = ReferenceAdvantageTracker("buffer", buffer_size=4)
    buffer.update([0, 0, 1], [1.0, 0.0, 1.0])
    query = buffer.query([0, 2])
    assert query.pass_rate[0] == 0.5 and query.uncertainty[0] == pytest.approx(0.5 / math.sqrt(2))
    assert math.isnan(query.pass_rate[1]) and math.isnan(query.uncertainty[1]) and query.count == [2, 0]
    assert query.streak is None
    ema = ReferenceAdvantageTracker("ema", decay=0.6)
    ema.update([0, 0], [1.0, 0.0])  # mean 0.6, var 0.6 * 0.4 * 1 = 0.24
    assert ema.query([0]).uncertainty == pytest.approx([math.sqrt(0.24) * math.sqrt(0.4 / 1.6)])
    assert math.isnan(ReferenceAdvantageTracker().query([0]).pass_rate[0])


def test_reference_eviction_forgets_the_beta_state_and_streak():
    tracker = ReferenceAdvantageTracker("beta", capacity=1, track_streaks=True)
    tracker.set_prior(["a"], [5], [5])
    tracker.update(["a"], [1.0])
    assert tracker.query(["a"]).streak == [1]
    tracker.update(["b"], [0.0])  # a evicted
    query = tracker.query(["a", "b"])
    assert (query.pass_rate[0], query.count, query.streak) == (0.5, [0, 1], [0, 1])
    with pytest.raises(ValueError, match="capacity"):
        tracker.set_prior(["a", "b"], [0, 0], [1, 1])


@pytest.mark.parametrize("rho", [0.875, 1.0])
def test_spo_configuration_matches_spo_code(rho):
    # SPO: the Beta memory, its last repeat, r - p from before the batch, whitened (ddof 1, eps 1e-8).
    options = dict(decay=rho, repeats="last", include_batch=False, scale="none", min_count=0, normalize="batch")
    options.update(ddof=1, normalize_eps=1e-8)
    prompts = list("abcde")
    spo = SpoBetaTracker({p: [] for p in prompts}, offline_n=0, rho_type="constant", rho_value=rho)
    reference = ReferenceAdvantageTracker("beta", **options)
    tracker = AdvantageTracker(5, "beta", **options, dtype=torch.float64)
    rng = random.Random(4)
    for _ in range(12):
        batch = [rng.choice(prompts) for _ in range(rng.randint(2, 9))]
        rewards = [rng.choice([0.0, 1.0, rng.random()]) for _ in batch]
        want = spo.step(batch, rewards).tolist()
        assert reference.update(batch, rewards) == pytest.approx(want, abs=1e-9)
        ids = torch.tensor([prompts.index(p) for p in batch])
        got = tracker.update(ids, torch.tensor(rewards, dtype=torch.float64))
        assert got.tolist() == pytest.approx(want, abs=1e-9)
    for prompt in prompts:
        assert reference.betas.get(prompt, [0.5, 0.5])[:2] == pytest.approx([spo.alpha[prompt], spo.beta[prompt]])


# -- Random sequences: the tensor tracker against the reference ----------------------------------------------------


def _draw_options(data) -> dict:
    """Any valid combination of the new options with a memory and an estimator."""
    memory = data.draw(st.sampled_from(["beta", "beta", "buffer", "ema", "none"]), label="memory")
    options: Dict[str, object] = dict(memory=memory, nan_rewards="invalid")
    if memory == "beta":
        options["decay"] = data.draw(st.sampled_from([0.5, 0.875, 1.0]), label="decay")
        options["repeats"] = data.draw(st.sampled_from(["all", "last"]), label="repeats")
    elif memory == "buffer":
        options["buffer_size"] = data.draw(st.sampled_from([2, 4]), label="buffer_size")
    elif memory == "ema":
        options["decay"] = data.draw(st.sampled_from([0.6, 0.9]), label="decay")
    if memory != "none":
        options["include_batch"] = data.draw(st.booleans(), label="include_batch")
    options["baseline"] = baseline = data.draw(st.sampled_from(BASELINES), label="baseline")
    options["scale"] = data.draw(st.sampled_from(SCALES), label="scale")
    options["ddof"] = ddof = data.draw(st.sampled_from([0, 1]), label="ddof")
    options["fallback"] = data.draw(st.sampled_from(FALLBACKS), label="fallback")
    lowest = 0 if memory == "beta" else max(ddof + 1, 2 if baseline == "leave_one_out" else 1)
    options["min_count"] = data.draw(st.integers(lowest, lowest + 2), label="min_count")
    options["normalize"] = data.draw(st.sampled_from(["none", "batch"]), label="normalize")
    options["track_streaks"] = data.draw(st.booleans(), label="track_streaks")
    return options


#: Rewards: pass/fail, NaN (unscorable) and fractions on a grid (spreads of at least 1e-3, or exactly 0).
REWARDS = st.one_of(st.sampled_from([0.0, 1.0, 1.0, NAN]), st.integers(0, 1000).map(lambda k: k / 1000))
DISCOUNTS = st.one_of(st.sampled_from([0.5, 0.875, 0.96, 1.0]), st.integers(50, 1000).map(lambda k: k / 1000))


def _draw_batch(data, pool: list, beta: bool):
    """Prompts (repeats likely), rewards, an optional valid mask and (Beta memory) an optional discount."""
    size = data.draw(st.integers(0, 10), label="size")
    prompts = data.draw(st.lists(st.sampled_from(pool), min_size=size, max_size=size), label="prompts")
    rewards = data.draw(st.lists(REWARDS, min_size=size, max_size=size), label="rewards")
    valid = data.draw(st.none() | st.lists(st.booleans(), min_size=size, max_size=size), label="valid")
    discount = None
    if beta and data.draw(st.booleans(), label="per-sample discount"):
        discount = data.draw(st.lists(DISCOUNTS, min_size=size, max_size=size), label="discount")
    return prompts, rewards, valid, discount


def _draw_prior(data, pool: list, num_prompts: int):
    """Distinct prompts (at most the table's rows) with successes, trials and a strength for ``set_prior``."""
    prompts = data.draw(st.lists(st.sampled_from(pool), min_size=1, max_size=num_prompts, unique=True), label="prior")
    trials = [data.draw(st.integers(0, 8), label="trials") for _ in prompts]
    successes = [data.draw(st.integers(0, n), label="successes") for n in trials]
    strength = data.draw(st.sampled_from([None, 8.0, "tensor"]), label="strength")
    if strength == "tensor":
        strength = [data.draw(st.sampled_from([0.5, 2.0, 30.0]), label="strengths") for _ in prompts]
    return prompts, successes, trials, strength


def _tensor_step(step, dtype: torch.dtype):
    """The step as the tracker takes it, and the rewards and discounts as its dtype holds them."""
    prompts, rewards, valid, discount = step
    ids = torch.tensor(prompts, dtype=torch.int64)
    values = torch.tensor(rewards, dtype=torch.float64).to(dtype)
    mask = None if valid is None else torch.tensor(valid, dtype=torch.bool)
    rho = None if discount is None else torch.tensor(discount, dtype=torch.float64).to(dtype)
    seen = (prompts, values.double().tolist(), valid, None if rho is None else rho.double().tolist())
    return (ids, values, mask, rho), seen


def _note_events(options, keys, num_prompts, before, after, seen, expected) -> None:
    """Names what a step exercised, for ``pytest --hypothesis-show-statistics``."""
    prompts, _, _, discount = seen
    hypothesis.event(f"memory={options['memory']} include_batch={options.get('include_batch', True)}")
    batch_keys = {p for p, v in zip(prompts, expected.valid) if v}
    if keys == "hashed" and len(batch_keys) > num_prompts:
        hypothesis.event("hashed: overflow")
    if keys == "hashed" and set(before.recent) - set(after.recent) - batch_keys:
        hypothesis.event("hashed: eviction")
    if discount is not None and len(prompts) > len(set(prompts)):
        hypothesis.event(f"discount with repeats={options.get('repeats', 'all')}")
    if any(s > 1 for s in after.streak.values()):
        hypothesis.event("a streak above 1")
    if options["scale"] == "prompt_std" and not all(f for f, v in zip(expected.fallback, expected.valid) if v):
        past = not options.get("include_batch", True)
        hypothesis.event(f"own std: memory={options['memory']} ddof={options['ddof']} from the past only={past}")


def _run_sequence(data, dtype: torch.dtype) -> None:
    """One random sequence: a tracker and the reference side by side, everything compared after each step."""
    options = _draw_options(data)
    keys = data.draw(st.sampled_from(["ids", "hashed"]), label="keys")
    num_prompts = 3 if keys == "ids" else data.draw(st.integers(1, 3), label="table rows")
    pool = _pool(keys, num_prompts)
    tracker, reference = _pair(num_prompts, keys, dtype, options)
    for number in range(data.draw(st.integers(2, 10), label="steps")):
        label = f"{options} keys={keys} step {number}"
        if data.draw(st.booleans(), label="round trip"):  # a resumed tracker continues identically
            resumed = AdvantageTracker(num_prompts, keys=keys, dtype=dtype, **options)
            resumed.load_state_dict(tracker.state_dict())
            for name, value in tracker.state_dict().items():
                assert torch.equal(resumed.state_dict()[name], value), (label, name)
            tracker = resumed
        if options["memory"] == "beta" and data.draw(st.integers(0, 3), label="set prior") == 0:
            prompts, successes, trials, strength = _draw_prior(data, pool, num_prompts)
            tensor_strength = torch.tensor(strength, dtype=torch.float64) if isinstance(strength, list) else strength
            tracker.set_prior(
                torch.tensor(prompts), torch.tensor(successes), torch.tensor(trials), strength=tensor_strength
            )
            reference.set_prior(prompts, successes, trials, strength=strength)
        step = _draw_batch(data, pool, options["memory"] == "beta")
        expected, before = _check_step(tracker, reference, options, step, number, label, pool)
        _note_events(options, keys, num_prompts, before, reference, step, expected)


def _check_step(tracker, reference, options: dict, step, number: int, label: str, pool: list):
    """One update of both (``update_with_report`` on odd steps), compared, then ``query`` of every prompt of the pool.

    Returns:
        The reference's report and a copy of the reference from before the step.
    """
    dtype = tracker.dtype
    (ids, values, mask, rho), seen = _tensor_step(step, dtype)
    before = copy.deepcopy(reference)
    expected = reference.update_with_report(*seen)
    extra = {} if rho is None else {"discount": rho}
    if number % 2:
        report = tracker.update_with_report(ids, values, mask, **extra)
        _assert_report(report, expected, label)
        advantages = report.advantages
    else:
        advantages = tracker.update(ids, values, mask, **extra)
    assert advantages.dtype == dtype and advantages.shape == ids.shape, label
    roundoff = max(torch.finfo(dtype).eps, 2.0**-52)
    terms = 16 * (number + 2) * (len(ids) + 8)
    tolerances = _advantage_tolerances(
        options, before, seen, expected, reference, roundoff=roundoff, out_eps=torch.finfo(dtype).eps, terms=terms
    )
    _assert_close_list(advantages.double().tolist(), expected.advantages, tolerances, label)
    _assert_query(tracker, reference, pool, options, terms * roundoff, label)
    return expected, before


@hypothesis.settings(max_examples=300, deadline=None, derandomize=True)
@hypothesis.given(data=st.data())
def test_random_sequences_match_the_reference_in_float64(data):
    _run_sequence(data, torch.float64)


@hypothesis.settings(max_examples=40, deadline=None, derandomize=True)
@hypothesis.given(data=st.data())
def test_random_sequences_match_the_reference_in_float32(data):
    _run_sequence(data, torch.float32)


#: The estimators that read a prompt's own statistics, under every memory that keeps them (ids, long sequences):
#: random sequences spend many steps in fallbacks and evictions, these almost none.
OWN_STATISTICS = [
    dict(memory=memory, include_batch=include_batch, ddof=ddof, baseline=baseline, **extra)
    for memory, extra in [
        ("beta", dict(decay=0.875)),
        ("beta", dict(decay=1.0, repeats="last", min_count=0)),
        ("buffer", dict(buffer_size=4)),
        ("ema", dict(decay=0.6)),
    ]
    for include_batch in (True, False)
    for ddof in (0, 1)
    for baseline in ("prompt_mean", "leave_one_out")
]


@pytest.mark.parametrize("options", OWN_STATISTICS, ids=lambda o: "-".join(str(v) for v in o.values()))
def test_own_statistics_over_long_sequences(options):
    options = dict(options, nan_rewards="invalid", track_streaks=True, normalize="batch" if options["ddof"] else "none")
    tracker, reference = _pair(3, "ids", torch.float64, options)
    rng = random.Random(str(options))
    own = 0
    for number in range(14):
        prompts = [rng.randrange(3) for _ in range(10)]
        rewards = [rng.choice([0.0, 1.0, NAN, rng.random()]) for _ in prompts]
        valid = [rng.random() < 0.9 for _ in prompts]
        discount = [rng.uniform(0.4, 1.0) for _ in prompts] if options["memory"] == "beta" and number % 3 else None
        label = f"{options} step {number}"
        expected, _ = _check_step(
            tracker, reference, options, (prompts, rewards, valid, discount), number, label, [0, 1, 2]
        )
        own += sum(v and not f for v, f in zip(expected.valid, expected.fallback))
    assert own >= 60  # most samples read their own statistics


def test_hashed_batch_only_tracker_reports():
    # memory none, baseline batch_mean, no prompt std, min_count 1: no fold, so no key table; the report
    # groups the batch's keys itself (it once indexed its groups by the keys: index 100 out of bounds).
    tracker = AdvantageTracker(1, "none", baseline="batch_mean", scale="batch_std", min_count=1, keys="hashed")
    report = tracker.update_with_report(torch.tensor([100]), torch.tensor([0.0]))
    assert report.zero_variance.tolist() == [True]


def test_hashed_batch_only_tracker_reports_overflow_as_fallback():
    # With track_streaks the same tracker keeps a table of one row: key 100 overflows. Documented (and the
    # reference's): overflow samples count as fallen back (it once reported [False, False]).
    options = dict(baseline="batch_mean", scale="batch_std", min_count=1, track_streaks=True)
    tracker = AdvantageTracker(1, "none", keys="hashed", **options)
    report = tracker.update_with_report(torch.tensor([100, 200]), torch.tensor([0.0, 1.0]))
    want = ReferenceAdvantageTracker("none", capacity=1, **options).update_with_report([100, 200], [0.0, 1.0])
    assert want.fallback == [True, False]
    assert report.fallback.tolist() == want.fallback


# -- Every dtype, one step at a time -------------------------------------------------------------------------------


def _reference_from(tracker: AdvantageTracker, options: dict) -> ReferenceAdvantageTracker:
    """A reference holding exactly the tracker's state (ids), in float64."""
    reference = ReferenceAdvantageTracker(**options)
    state = {k: v.double() if v.is_floating_point() else v for k, v in tracker.state_dict().items()}
    for prompt in range(tracker.num_prompts):
        count = int(state["count"][prompt])
        if options["memory"] == "beta":
            reference.betas[prompt] = [float(state["alpha"][prompt]), float(state["beta"][prompt]), count]
        elif options["memory"] == "ema" and count:
            reference.moments[prompt] = [float(state["mean"][prompt]), float(state["var"][prompt]), count]
        elif options["memory"] == "buffer" and count:
            size, head = reference.buffer_size, int(state["head"][prompt])
            row = state["rewards"][prompt].tolist()
            oldest_first = row[:count] if count < size else row[head:] + row[:head]
            reference.buffers[prompt] = collections.deque(oldest_first, maxlen=size)
    if "streak" in state:
        reference.streak = {p: int(s) for p, s in enumerate(state["streak"].tolist()) if s}
    return reference


def _assert_state_matches(tracker: AdvantageTracker, reference, options: dict, tolerance: float, label: str) -> None:
    """The tracker's state after a step against the reference's (started from the same state)."""
    out_eps = torch.finfo(tracker.dtype).eps
    held = _reference_from(tracker, options)
    assert held.streak == {p: s for p, s in reference.streak.items() if s}, label
    if options["memory"] == "beta":
        for prompt in range(tracker.num_prompts):
            got, want = held.betas[prompt], reference.betas.get(prompt, [0.5, 0.5, 0])
            assert got[2] == want[2], (label, prompt)
            for g, w in zip(got[:2], want[:2]):
                assert abs(g - w) <= (out_eps + tolerance) * w, (label, prompt, got, want)
    elif options["memory"] == "buffer":
        assert {p: list(d) for p, d in held.buffers.items()} == {p: list(d) for p, d in reference.buffers.items()}
    else:
        assert held.moments.keys() == reference.moments.keys(), label
        for prompt, (mean, var, count) in reference.moments.items():
            got_mean, got_var, got_count = held.moments[prompt]
            assert got_count == count, label
            assert abs(got_mean - mean) <= out_eps * abs(mean) + tolerance, (label, prompt, got_mean, mean)
            assert abs(got_var - var) <= 2 * out_eps * var + 4 * tolerance, (label, prompt, got_var, var)


@hypothesis.settings(max_examples=60, deadline=None, derandomize=True)
@hypothesis.given(data=st.data())
def test_every_dtype_one_step_at_a_time(data):
    # Half-precision state carries 1e-3 of rounding per step, so the reference restarts from the
    # tracker's own state before each step: each step is held to its own rounding.
    dtype = data.draw(st.sampled_from([torch.float16, torch.bfloat16, torch.float32, torch.float64]), label="dtype")
    options = _draw_options(data)
    if options["memory"] == "none":
        options.update(memory="beta", decay=0.875, min_count=0)
    tracker = AdvantageTracker(4, dtype=dtype, **options)
    compute_eps = torch.finfo(torch.float32 if torch.finfo(dtype).bits < 32 else dtype).eps
    out_eps = torch.finfo(dtype).eps
    for number in range(data.draw(st.integers(1, 5), label="steps")):
        label = f"{dtype} {options} step {number}"
        reference = _reference_from(tracker, options)
        (ids, values, mask, rho), seen = _tensor_step(
            _draw_batch(data, list(range(4)), options["memory"] == "beta"), dtype
        )
        before = copy.deepcopy(reference)
        expected = reference.update_with_report(*seen)
        report = tracker.update_with_report(ids, values, mask, **({} if rho is None else {"discount": rho}))
        _assert_report(report, expected, label)
        terms = 16 * (len(ids) + 8)
        tolerances = _advantage_tolerances(
            options, before, seen, expected, reference, roundoff=compute_eps, out_eps=out_eps, terms=terms
        )
        largest = torch.finfo(dtype).max
        _assert_close_list(report.advantages.double().tolist(), expected.advantages, tolerances, label, largest)
        _assert_state_matches(tracker, reference, options, terms * compute_eps, label)
        # query reads the state as stored: against a reference rebuilt from it, to the query's own rounding.
        _assert_query(tracker, _reference_from(tracker, options), list(range(4)), options, 4 * out_eps, label)


# -- Several ranks ---------------------------------------------------------------------------------------------------

WORLD_SIZE = 2

#: (options, keys, whether steps pass a per-sample discount) run across ranks.
RANK_CASES = [
    (
        dict(memory="beta", decay=0.9, include_batch=False, normalize="batch", track_streaks=True, min_count=0),
        "hashed",
        True,
    ),
    (dict(memory="beta", repeats="last", baseline="leave_one_out", min_count=0, track_streaks=True), "ids", True),
    (
        dict(memory="buffer", buffer_size=3, include_batch=False, normalize="batch", ddof=1, track_streaks=True),
        "ids",
        False,
    ),
]


def _rank_scenarios(rank: int) -> None:
    """Every rank's tracker equals one process fed the batches in rank order, and that one the reference."""
    group = dist.group.WORLD
    rng = random.Random(9)  # the same stream on every rank
    for options, keys, discounted in RANK_CASES:
        options = dict(options, nan_rewards="invalid")
        shared = AdvantageTracker(3, keys=keys, dtype=torch.float64, process_group=group, **options)
        single, reference = _pair(3, keys, torch.float64, options)
        pool = _pool(keys, 3)
        if options["memory"] == "beta":  # the same call on every rank: each sets its own copy
            for tracker in (shared, single):
                tracker.set_prior(torch.tensor(pool[:2]), torch.tensor([1, 4]), torch.tensor([4, 4]), strength=6.0)
            reference.set_prior(pool[:2], [1, 4], [4, 4], strength=6.0)
        for step in range(6):
            local = rng.randint(1, 5)
            prompts = [rng.choice(pool) for _ in range(WORLD_SIZE * local)]
            rewards = [rng.choice([0.0, 1.0, NAN, rng.random()]) for _ in prompts]
            valid = [rng.random() < 0.85 for _ in prompts]
            discount = [rng.uniform(0.3, 1.0) for _ in prompts] if discounted else None
            (ids, values, mask, rho), seen = _tensor_step((prompts, rewards, valid, discount), torch.float64)
            expected = single.update_with_report(ids, values, mask, **({} if rho is None else {"discount": rho}))
            want = reference.update_with_report(*seen)
            torch.testing.assert_close(expected.advantages.tolist(), want.advantages, rtol=1e-9, atol=1e-9)
            mine = slice(rank * local, (rank + 1) * local)
            extra = {} if rho is None else {"discount": rho[mine]}
            got = shared.update_with_report(ids[mine], values[mine], mask[mine], **extra)
            torch.testing.assert_close(got.advantages, expected.advantages[mine], rtol=0, atol=0)
            for field in ("valid", "fallback", "zero_variance"):
                assert torch.equal(getattr(got, field), getattr(expected, field)[mine]), (options, step, field)
        for name, value in single.state_dict().items():
            assert torch.equal(shared.state_dict()[name], value), (options, name)
        _assert_query(shared, reference, pool, options, 1e-12, str(options))

    # A refused discount or reward on one rank raises on every rank; no rank's state changes.
    tracker = AdvantageTracker(3, "beta", process_group=group, track_streaks=True)
    tracker.update(torch.tensor([0, 1]), torch.tensor([1.0, 0.0]))
    before = tracker.state_dict()
    theirs = r"rank\(s\) \[1\] refused"
    with pytest.raises(ValueError, match="discount must lie in" if rank == 1 else theirs):
        tracker.update(
            torch.tensor([0, 2]), torch.tensor([1.0, 0.0]), discount=torch.tensor([0.9, 1.5 if rank else 0.9])
        )
    with pytest.raises(ValueError, match=r"\[0, 1\]" if rank == 1 else theirs):
        tracker.update(torch.tensor([0, 2]), torch.tensor([1.0, 2.0 if rank else 0.0]))
    # A discount on some ranks only is refused on every rank (it once broke the gather).
    with pytest.raises(ValueError, match=r"discount must be passed on every rank or on none; .* \[0\]"):
        extra = {"discount": torch.tensor([0.5, 0.5], dtype=torch.float64)} if rank == 0 else {}
        tracker.update(torch.tensor([0, 2]), torch.tensor([1.0, 0.0]), **extra)
    _assert_state_unchanged(tracker, before)
    # Discounts of different float dtypes on different ranks are gathered in the tracker's dtype.
    discount = torch.tensor([0.5, 0.5], dtype=torch.float64 if rank == 0 else torch.float32)
    tracker.update(torch.tensor([0, 2]), torch.tensor([1.0, 0.0]), discount=discount)
    alpha = tracker.state_dict()["alpha"]
    gathered = [torch.empty_like(alpha) for _ in range(WORLD_SIZE)]
    dist.all_gather(gathered, alpha)
    assert torch.equal(gathered[0], gathered[1])


def test_ranks_match_one_process_and_the_reference(tmp_path):
    run_ranks(_rank_scenarios, WORLD_SIZE, str(tmp_path / "init"), timeout=120)


# -- torch.compile ---------------------------------------------------------------------------------------------------

#: (options, keys, whether steps pass a per-sample discount) compiled with fullgraph=True.
COMPILED = {
    "beta_all_discount_hashed": (
        dict(memory="beta", decay=0.9, baseline="leave_one_out", min_count=0, track_streaks=True),
        "hashed",
        True,
    ),
    "beta_last_past_normalized": (
        dict(memory="beta", repeats="last", include_batch=False, scale="none", min_count=0, normalize="batch", ddof=1),
        "ids",
        True,
    ),
    "buffer_past_normalized_hashed": (
        dict(memory="buffer", buffer_size=3, include_batch=False, normalize="batch", track_streaks=True),
        "hashed",
        False,
    ),
    "ema_past": (
        dict(memory="ema", decay=0.8, include_batch=False, baseline="leave_one_out", fallback="zero"),
        "ids",
        False,
    ),
}


@pytest.mark.parametrize("name", sorted(COMPILED))
def test_compiled_update_and_query_match_eager(name):
    options, keys, discounted = COMPILED[name]
    torch._dynamo.reset()
    eager = AdvantageTracker(4, keys=keys, check_values=False, nan_rewards="invalid", **options)
    compiled_tracker = AdvantageTracker(4, keys=keys, check_values=False, nan_rewards="invalid", **options)
    compiled = torch.compile(compiled_tracker.update, fullgraph=True, backend="eager")
    rng = random.Random(len(name))
    pool = _pool(keys, 4)
    for step in range(4):  # one shape: one compilation
        ids = torch.tensor([rng.choice(pool) for _ in range(12)])
        rewards = torch.tensor([rng.choice([0.0, 1.0, NAN, rng.random()]) for _ in range(12)])
        valid = torch.tensor([rng.random() < 0.9 for _ in range(12)])
        extra = {"discount": torch.tensor([rng.uniform(0.5, 1.0) for _ in range(12)])} if discounted else {}
        want = eager.update(ids, rewards, valid, **extra)
        torch.testing.assert_close(compiled(ids, rewards, valid, **extra), want, rtol=1e-6, atol=1e-6, msg=str(step))
    for key, value in eager.state_dict().items():
        torch.testing.assert_close(compiled_tracker.state_dict()[key], value, rtol=1e-6, atol=1e-6, msg=key)
    asked = torch.tensor(pool if keys == "ids" else pool + [pool[-1] + 1])  # a hashed key never seen too
    got = torch.compile(compiled_tracker.query, fullgraph=True, backend="eager")(asked)
    for field, value in eager.query(asked)._asdict().items():
        if value is None:
            assert getattr(got, field) is None, field
        else:
            torch.testing.assert_close(getattr(got, field), value, rtol=1e-6, atol=1e-6, equal_nan=True, msg=field)


# -- Refusals, which change nothing --------------------------------------------------------------------------------


def _assert_state_unchanged(tracker: AdvantageTracker, before: Dict[str, torch.Tensor]) -> None:
    after = tracker.state_dict()
    assert after.keys() == before.keys()
    for name, value in before.items():
        assert torch.equal(after[name], value), name


def _with_history(memory: str, keys: str = "ids", **options):
    """A float64 tracker and its reference after two updates (state that a refusal could spoil)."""
    memory_options = dict(decay=0.9) if memory in ("beta", "ema") else {}
    options = dict(memory=memory, track_streaks=True, **memory_options, **options)
    tracker, reference = _pair(3, keys, torch.float64, options)
    pool = _pool(keys, 3)
    for prompts, rewards in (([0, 0, 1], [1.0, 0.0, 1.0]), ([1, 2, 2], [0.5, 0.25, 0.25])):
        keyed = [pool[p] for p in prompts]
        tracker.update(torch.tensor(keyed), torch.tensor(rewards, dtype=torch.float64))
        reference.update(keyed, rewards)
    return tracker, reference


F64 = dict(dtype=torch.float64)

#: name -> (memory, rewards, discount as a tensor maker, error, message, whether the reference refuses it too).
REFUSED_UPDATES = {
    "reward above 1": ("beta", [0.5, 1.5], None, ValueError, r"\[0, 1\]", True),
    "negative reward": ("beta", [-0.25, 0.5], None, ValueError, r"\[0, 1\]", True),
    "discount with a buffer": ("buffer", [0.5, 1.0], lambda: torch.tensor([0.9, 0.9], **F64), ValueError, "beta", True),
    "discount with an EMA": ("ema", [0.5, 1.0], lambda: torch.tensor([0.9, 0.9], **F64), ValueError, "beta", True),
    "discount too long": ("beta", [0.5, 1.0], lambda: torch.full((3,), 0.9, **F64), ValueError, "1-D tensor", True),
    "discount 2-D": ("beta", [0.5, 1.0], lambda: torch.full((2, 1), 0.9, **F64), ValueError, "1-D tensor", False),
    "discount on meta": ("beta", [0.5, 1.0], lambda: torch.full((2,), 0.9, device="meta"), ValueError, "meta", False),
    "integer discount": ("beta", [0.5, 1.0], lambda: torch.tensor([1, 1]), TypeError, "floating tensor", False),
    "discount a list": ("beta", [0.5, 1.0], lambda: [0.9, 0.9], TypeError, "floating tensor", False),
    "discount 0": ("beta", [0.5, 1.0], lambda: torch.tensor([0.9, 0.0], **F64), ValueError, r"\(0, 1\]", True),
    "discount above 1": ("beta", [0.5, 1.0], lambda: torch.tensor([1.5, 0.9], **F64), ValueError, r"\(0, 1\]", True),
    "NaN discount": ("beta", [0.5, 1.0], lambda: torch.tensor([NAN, 0.9], **F64), ValueError, r"\(0, 1\]", True),
}


@pytest.mark.parametrize("name", sorted(REFUSED_UPDATES))
def test_refused_updates_change_nothing(name):
    memory, rewards, make_discount, error, message, reference_refuses = REFUSED_UPDATES[name]
    tracker, reference = _with_history(memory)
    before, reference_before = tracker.state_dict(), copy.deepcopy(reference)
    discount = None if make_discount is None else make_discount()
    extra = {} if discount is None else {"discount": discount}
    for method in (tracker.update, tracker.update_with_report):
        with pytest.raises(error, match=message):
            method(torch.tensor([0, 2]), torch.tensor(rewards, dtype=torch.float64), **extra)
        _assert_state_unchanged(tracker, before)
    if reference_refuses:
        with pytest.raises(ValueError):
            reference.update([0, 2], rewards, discount=None if discount is None else discount.tolist())
        assert vars(reference) == vars(reference_before)


def test_invalid_samples_rewards_are_not_range_checked():
    # An invalid sample's reward is never read: outside [0, 1] it is accepted, and changes nothing.
    tracker, reference = _with_history("beta", include_batch=False, normalize="batch")
    ids, valid = torch.tensor([0, 2, 1]), torch.tensor([True, False, True])
    rewards = [1.0, 7.0, 0.0]
    got = tracker.update_with_report(ids, torch.tensor(rewards, dtype=torch.float64), valid)
    want = reference.update_with_report(ids.tolist(), rewards, valid.tolist())
    assert got.advantages.tolist() == pytest.approx(want.advantages, abs=1e-12) and got.advantages[1] == 0.0
    _assert_query(tracker, reference, [0, 1, 2], dict(memory="beta", track_streaks=True), 1e-12, "invalid")


#: name -> (memory, keys, prompts, successes, trials, strength, error, message, whether the reference refuses it).
REFUSED_PRIORS = {
    "on a buffer": ("buffer", "ids", [0], [1], [2], None, ValueError, "memory='beta'", True),
    "on an EMA": ("ema", "ids", [0], [1], [2], None, ValueError, "memory='beta'", True),
    "successes above trials": ("beta", "ids", [0, 1], [1, 3], [2, 2], None, ValueError, "successes", True),
    "negative successes": ("beta", "ids", [0], [-1], [2], None, ValueError, "successes", True),
    "NaN successes": ("beta", "ids", [0], [NAN], [2.0], None, ValueError, "successes", True),
    "negative trials": ("beta", "ids", [0], [0], [-1], None, ValueError, "trials", True),
    "infinite trials": ("beta", "ids", [0], [0.0], [math.inf], None, ValueError, "trials", True),
    "a prompt twice": ("beta", "ids", [1, 1], [1, 1], [2, 2], None, ValueError, "distinct", True),
    "id out of range": ("beta", "ids", [3], [1], [2], None, ValueError, r"\[0, 3\)", False),
    "more keys than rows": ("beta", "hashed", [0, 1, 2, 3], [0] * 4, [1] * 4, None, ValueError, "rows", True),
    "zero strength": ("beta", "ids", [0], [1], [2], 0.0, ValueError, "strength", True),
    "infinite strength": ("beta", "ids", [0], [1], [2], math.inf, ValueError, "strength", True),
    "a negative strength": ("beta", "ids", [0, 1], [1, 1], [2, 2], [1.0, -1.0], ValueError, "strength", True),
    "successes of another length": ("beta", "ids", [0, 1], [1], [2, 2], None, ValueError, "shape", True),
    "successes a list": ("beta", "ids", [0], "list", [2], None, TypeError, "tensor", False),
    "boolean trials": ("beta", "ids", [0], [1], "bool", None, TypeError, "tensor", False),
}


@pytest.mark.parametrize("name", sorted(REFUSED_PRIORS))
def test_refused_priors_change_nothing(name):
    memory, keys, prompts, successes, trials, strength, error, message, reference_refuses = REFUSED_PRIORS[name]
    tracker, reference = _with_history(memory, keys)
    keyed = prompts if keys == "ids" else [_pool(keys, 3)[p] for p in prompts]
    before, reference_before = tracker.state_dict(), copy.deepcopy(reference)
    as_tensor = {"list": lambda: [1], "bool": lambda: torch.tensor([True])}
    tensor_successes = as_tensor[successes]() if isinstance(successes, str) else torch.tensor(successes)
    tensor_trials = as_tensor[trials]() if isinstance(trials, str) else torch.tensor(trials)
    tensor_strength = torch.tensor(strength, **F64) if isinstance(strength, list) else strength
    with pytest.raises(error, match=message):
        tracker.set_prior(torch.tensor(keyed), tensor_successes, tensor_trials, strength=tensor_strength)
    _assert_state_unchanged(tracker, before)
    if reference_refuses:
        with pytest.raises(ValueError):
            reference.set_prior(keyed, successes, trials, strength=strength)
        assert vars(reference) == vars(reference_before)


@pytest.mark.parametrize("memory", ["buffer", "ema", "beta"])
@pytest.mark.parametrize("scale", ["prompt_std", "none"])
def test_past_only_prompt_std_warns(memory, scale):
    # A pass after a run of fails meets a buffer's or EMA's std of 0, or a Beta memory's sqrt(p (1 - p)) near 0
    # (exactly 0 once p rounds to 0 or 1: after 50 steps of four passes at rho 0.9 in float32, a fail gets -1e6).
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        AdvantageTracker(3, memory, include_batch=False, scale=scale)
    warned = [w for w in caught if "include_batch=False with a prompt std" in str(w.message)]
    assert len(warned) == (scale == "prompt_std")
    assert all(w.filename == __file__ for w in warned)  # it points at the caller


@pytest.mark.parametrize(
    "options",
    [
        dict(memory="none", include_batch=False),
        dict(memory="buffer", min_count=0),
        dict(memory="beta", decay=0.0),
        dict(memory="beta", decay=1.5),
        dict(memory="ema", decay=1.0),
        dict(memory="beta", repeats="first"),
        dict(memory="beta", min_count=-1),
        dict(normalize="group"),
        dict(normalize="batch", normalize_eps=-1e-8),
    ],
    ids=str,
)
def test_both_refuse_bad_options(options):
    with pytest.raises(ValueError):
        AdvantageTracker(3, **options)
    with pytest.raises(ValueError):
        ReferenceAdvantageTracker(**options)


def test_a_beta_state_rounded_to_zero_reloads_and_a_prior_that_overflows_is_refused():
    # rho 0.5 and a long run of passes round beta to exactly 0 (alpha + beta stays >= 1): the tracker's own
    # state dict must load back, so that such a checkpoint resumes.
    tracker = AdvantageTracker(2, "beta", decay=0.5, min_count=0)
    for _ in range(200):
        tracker.update(torch.tensor([0, 1]), torch.tensor([1.0, 0.0]))
    state = tracker.state_dict()
    assert state["beta"][0] == 0 and state["alpha"][1] == 0
    resumed = AdvantageTracker(2, "beta", decay=0.5, min_count=0)
    resumed.load_state_dict(state)
    assert all(torch.equal(resumed.state_dict()[name], value) for name, value in state.items())
    broken = dict(state, alpha=torch.zeros(2), beta=torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="'alpha' \\+ 'beta' must be positive"):
        resumed.load_state_dict(broken)
    # A prior whose alpha or beta overflows a float16 state is refused, the state untouched.
    half = AdvantageTracker(2, "beta", decay=0.9, dtype=torch.float16)
    before = half.state_dict()
    with pytest.raises(ValueError, match="overflows torch.float16"):
        half.set_prior(torch.tensor([0, 1]), torch.tensor([70000.0, 0.0]), torch.tensor([70000.0, 1e9]))
    _assert_state_unchanged(half, before)


def test_a_zero_discount_forgets_its_prompt_without_reaching_the_others():
    # Unchecked, a discount of 0 keeps only the rewards from it on; the other prompts' groups stay finite.
    tracker = AdvantageTracker(3, "beta", decay=0.9, check_values=False, dtype=torch.float64)
    ids, rewards = torch.tensor([0, 1, 1, 2]), torch.tensor([1.0, 1.0, 0.0, 1.0], dtype=torch.float64)
    tracker.update(ids, rewards, discount=torch.tensor([0.9, 0.0, 0.5, 0.9], dtype=torch.float64))
    state = tracker.state_dict()
    assert torch.isfinite(state["alpha"]).all() and torch.isfinite(state["beta"]).all()
    # Prompt 1: rho 0 forgets the prior, then r = 1; then rho 0.5 and r = 0: alpha 0.5 * 1, beta 0.5 * 0 + 1.
    torch.testing.assert_close(state["alpha"], torch.tensor([1.45, 0.5, 1.45], dtype=torch.float64))
    torch.testing.assert_close(state["beta"], torch.tensor([0.45, 1.0, 0.45], dtype=torch.float64))


def test_normalize_eps_must_be_positive():
    with pytest.raises(ValueError, match="normalize_eps must be a positive number"):
        AdvantageTracker(3, "beta", normalize="batch", normalize_eps=0.0)
