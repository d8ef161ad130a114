"""``sampling``: the weighting rules against plain-Python transcriptions, and ``PromptSampler``'s draws.

The draws are held to their stated distributions by chi-square
goodness-of-fit tests at fixed seeds: with replacement, the counts of one
long draw against the weights; without replacement, the ordered pairs of
many draws against successive sampling's exact probabilities. The p-value
comes from ``chi2_sf`` below (the regularized upper incomplete gamma
function), itself pinned against tabled critical values, since SciPy is not
a dependency. A test with a wrong distribution shows that the test rejects.

Also: the RNG against a Python transcription of its specification, exact
resume from a state dict, ``torch.compile(fullgraph=True)``, refusals that
leave the state alone, and trackers' ``query`` as the source of weights.
"""

import math
from typing import List, Sequence

import pytest
import torch

from rail_interview.stat_tracking import AdvantageTracker, PromptSampler, prompt_weights
from rail_interview.stat_tracking.sampling import RULES, _uniforms
from rail_interview.stat_tracking.types import PromptQuery

MASK64 = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15
NAN = float("nan")

#: The least p-value a fixed-seed goodness-of-fit test must reach. The seeds are fixed, so a test
#: passes or fails the same way every run; at 1e-3 a correct sampler fails one seed in a thousand.
MIN_P_VALUE = 1e-3


# Chi-square -------------------------------------------------------------------------------------


def chi2_sf(statistic: float, df: int) -> float:
    """P(X >= statistic) for X chi-square with ``df`` degrees of freedom: Q(df / 2, statistic / 2).

    The regularized upper incomplete gamma function, by its series below
    a + 1 and by its continued fraction (modified Lentz) above, to about
    1e-14 relative.
    """
    a, x = df / 2.0, statistic / 2.0
    if x <= 0:
        return 1.0
    log_prefix = a * math.log(x) - x - math.lgamma(a)
    if x < a + 1:  # lower series: P(a, x) = x**a e**-x / Gamma(a + 1) * sum x**n / ((a + 1) ... (a + n))
        term = total = 1.0 / a
        n = 0
        while abs(term) > abs(total) * 1e-16:
            n += 1
            term *= x / (a + n)
            total += term
        return 1.0 - total * math.exp(log_prefix)
    tiny = 1e-300
    b = x + 1.0 - a
    c, d = 1.0 / tiny, 1.0 / b
    fraction = d
    for i in range(1, 10_000):
        an = -i * (i - a)
        b += 2.0
        d = an * d + b
        d = tiny if abs(d) < tiny else d
        c = b + an / c
        c = tiny if abs(c) < tiny else c
        d = 1.0 / d
        step = d * c
        fraction *= step
        if abs(step - 1.0) < 1e-16:
            break
    return math.exp(log_prefix) * fraction


def chi_square(counts: Sequence[int], probs: Sequence[float]) -> tuple:
    """Pearson's statistic of ``counts`` against ``probs``, its degrees of freedom and p-value.

    Cells of probability 0 must be empty and are left out.
    """
    total = sum(counts)
    statistic, cells = 0.0, 0
    for count, prob in zip(counts, probs):
        if prob == 0:
            assert count == 0, "a cell of probability 0 was drawn"
            continue
        expected = total * prob
        statistic += (count - expected) ** 2 / expected
        cells += 1
    return statistic, cells - 1, chi2_sf(statistic, cells - 1)


@pytest.mark.parametrize(
    "statistic, df, p_value",
    [
        (3.841458820694124, 1, 0.05),  # tabled critical values
        (6.634896601021214, 1, 0.01),
        (15.08627246938899, 5, 0.01),
        (18.30703805327515, 10, 0.05),
        (19.67513757268249, 11, 0.05),
        (0.1148318018991938, 3, 0.99),
    ],
)
def test_chi2_sf_matches_tabled_critical_values(statistic, df, p_value):
    assert chi2_sf(statistic, df) == pytest.approx(p_value, rel=1e-9)


def test_chi2_sf_closed_forms():
    for x in (0.01, 0.5, 2.0, 7.5, 40.0):
        assert chi2_sf(x, 2) == pytest.approx(math.exp(-x / 2), rel=1e-12)  # df = 2: exp(-x / 2)
        assert chi2_sf(x, 1) == pytest.approx(math.erfc(math.sqrt(x / 2)), rel=1e-12)  # df = 1: erfc(sqrt(x / 2))
    for df in (4, 10, 30, 60):  # even df = 2k: the Poisson tail, exp(-x / 2) * sum_{i < k} (x / 2)**i / i!
        for x in (0.3, 5.0, 29.0, 59.7, 120.0):
            poisson = math.exp(-x / 2) * sum((x / 2) ** i / math.factorial(i) for i in range(df // 2))
            assert chi2_sf(x, df) == pytest.approx(poisson, rel=1e-11)
    assert chi2_sf(0.0, 4) == 1.0


# Rules against plain-Python transcriptions ------------------------------------------------------


def spo_weight(p: float, epsilon: float) -> float:
    """verl recipe/spo: ``sqrt(p_hat * (1 - p_hat)) + epsilon``; unknown: the largest, 0.5 + epsilon."""
    if math.isnan(p):
        return 0.5 + epsilon
    p = min(max(p, 0.0), 1.0)
    return math.sqrt(p * (1.0 - p)) + epsilon


def failure_rate_weight(p: float, epsilon: float) -> float:
    """Kimi k1.5's prioritized sampling, 1 - s_i, plus epsilon; unknown: 1 + epsilon."""
    if math.isnan(p):
        return 1.0 + epsilon
    return 1.0 - min(max(p, 0.0), 1.0) + epsilon


def greso_keep(trace: Sequence[float], p_easy: float, p_hard: float) -> float:
    """GRESO's keep probability of a prompt from its trace of mean rewards, one per visit, oldest first.

    Transcribes ``DataProfiler.filter_examples_all_probabilistic`` of
    Infini-AI-Lab/GRESO ``verl/trainer/ttis/presampling_selector.py``: the
    prompt is skipped if ``easy_probabilistic_skip`` says so, else if
    ``hard_probabilistic_skip`` does, each skipping with probability
    ``1 - max(p ** count, 0.01)``; so it is kept with the product of the
    two keep probabilities.
    """
    if not trace:
        return 1.0
    easy = 0
    for reward in reversed(trace):
        if reward < 0.98:
            break
        easy += 1
    keep = max(p_easy**easy, 0.01)
    if trace[-1] <= 0.11:
        hard = 0
        for reward in reversed(trace):
            if reward > 0.11:
                break
            hard += 1
        keep *= max(p_hard**hard, 0.01)
    return keep


def greso_weight(p: float, streak: int, p_easy: float, p_hard: float, min_keep: float) -> float:
    """This package's reading of GRESO: ``max(p_side ** streak, min_keep)``, the side from the pass rate."""
    side = p_easy if p > 0.5 else p_hard if p < 0.5 else max(p_easy, p_hard)  # NaN and 0.5: the larger
    return max(side**streak, min_keep)


PASS_RATES = [0.0, 1e-6, 0.1, 0.25, 0.5, 0.7, 0.999, 1.0, NAN, -0.5, 1.5]
STREAKS = [0, 1, 2, 3, 5, 8, 0, 30, 4, 2, 1]
UNKNOWN = [math.isnan(p) for p in PASS_RATES].index(True)


def _query(pass_rates: Sequence[float], streaks=None, dtype=torch.float32) -> PromptQuery:
    """A hand-built query; uncertainty and count are not read by the rules."""
    pass_rate = torch.tensor(pass_rates, dtype=dtype)
    streak = None if streaks is None else torch.tensor(streaks, dtype=torch.int64)
    return PromptQuery(pass_rate, torch.zeros_like(pass_rate), torch.zeros(len(pass_rates), dtype=torch.int64), streak)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("epsilon", [0.0, 0.05, 0.3])
def test_spo_and_failure_rate_match_their_transcriptions(dtype, epsilon):
    query = _query(PASS_RATES, dtype=dtype)
    for rule, reference in (("spo", spo_weight), ("failure_rate", failure_rate_weight)):
        weights = prompt_weights(query, rule, epsilon=epsilon)
        assert weights.dtype == dtype and weights.shape == (len(PASS_RATES),)
        expected = torch.tensor([reference(p, epsilon) for p in PASS_RATES], dtype=torch.float64)
        tolerance = 1e-6 if dtype == torch.float32 else 1e-15
        torch.testing.assert_close(weights.double(), expected, rtol=tolerance, atol=tolerance)
        # An unknown prompt gets the rule's largest weight.
        assert weights[UNKNOWN] == weights.max()


def test_spo_weight_is_spo_upstreams_on_known_prompts():
    # tests/test_spo_reference.py pins SPO's weights: p_hat = 0.5 -> 0.55, p_hat = 1/6 -> sqrt(5/36) + 0.05.
    weights = prompt_weights(_query([0.5, 1 / 6], dtype=torch.float64), "spo")
    torch.testing.assert_close(weights, torch.tensor([0.55, math.sqrt(5 / 36) + 0.05], dtype=torch.float64))


def test_uniform_is_one_everywhere():
    weights = prompt_weights(_query(PASS_RATES), "uniform")
    assert torch.equal(weights, torch.ones(len(PASS_RATES)))


@pytest.mark.parametrize(
    "p_easy, p_hard, min_keep", [(0.5, 0.5, 0.01), (0.8, 0.3, 0.01), (0.3, 0.9, 0.0), (1.0, 0.5, 0.2)]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_greso_matches_its_transcription(p_easy, p_hard, min_keep, dtype):
    weights = prompt_weights(
        _query(PASS_RATES, STREAKS, dtype), "greso", p_easy=p_easy, p_hard=p_hard, min_keep=min_keep
    )
    expected = [greso_weight(p, z, p_easy, p_hard, min_keep) for p, z in zip(PASS_RATES, STREAKS)]
    # float32 p_side carries its rounding (3e-8 relative) to the power 30: 1e-6 relative.
    rtol = 4e-6 if dtype == torch.float32 else 1e-14
    torch.testing.assert_close(weights.double(), torch.tensor(expected, dtype=torch.float64), rtol=rtol, atol=0)
    assert weights.dtype == dtype


GRESO_TRACES = {
    # Mean reward per visit (8 rollouts, binary rewards), oldest first; where GRESO and the tracker agree.
    "never visited": [],
    "mixed last": [1.0, 1.0, 0.5],
    "easy twice": [0.25, 1.0, 1.0],
    "easy four times": [1.0, 1.0, 1.0, 1.0],
    "hard once": [0.5, 0.0],
    "hard three times": [0.125, 0.0, 0.0, 0.0],
    "hard at the floor": [0.0] * 9,
}


@pytest.mark.parametrize("p_easy, p_hard", [(0.5, 0.5), (0.7, 0.35)])
def test_greso_equals_gresos_own_rule_on_binary_rewards(p_easy, p_hard):
    # The query a tracker gives after these visits: streak = trailing visits with all 8 rewards equal,
    # pass rate on the side of that streak (here, the mean of all rewards).
    rates, streaks, expected = [], [], []
    for trace in GRESO_TRACES.values():
        streak = 0
        for mean in reversed(trace):
            if mean not in (0.0, 1.0):
                break
            streak += 1
        rates.append(sum(trace) / len(trace) if trace else NAN)
        streaks.append(streak)
        expected.append(greso_keep(trace, p_easy, p_hard))
    weights = prompt_weights(_query(rates, streaks, torch.float64), "greso", p_easy=p_easy, p_hard=p_hard)
    torch.testing.assert_close(weights, torch.tensor(expected, dtype=torch.float64), rtol=1e-15, atol=0)


def test_greso_departs_where_a_streak_changes_sides():
    # All-pass, then all-fail: GRESO counts one hard visit (0.3); the tracker's streak is 2, and the
    # side comes from the pass rate (0.5: undecided, the larger probability, 0.6): 0.6 ** 2.
    assert greso_keep([1.0, 0.0], 0.6, 0.3) == pytest.approx(0.3)
    weights = prompt_weights(_query([0.5], [2], torch.float64), "greso", p_easy=0.6, p_hard=0.3)
    assert weights.item() == pytest.approx(0.36)


def test_greso_without_streaks_names_track_streaks():
    with pytest.raises(ValueError, match=r"track_streaks=True"):
        prompt_weights(_query([0.5, 0.1]), "greso")


@pytest.mark.parametrize(
    "options, match",
    [
        ({"rule": "thompson"}, "rule must be one of"),
        ({"epsilon": -0.1}, "epsilon must be a number in"),
        ({"epsilon": float("inf")}, "epsilon"),
        ({"epsilon": True}, "epsilon"),
        ({"p_easy": 0.0}, r"p_easy must be a number in \(0.0, 1.0\]"),
        ({"p_hard": 1.5}, "p_hard"),
        ({"min_keep": -0.01}, "min_keep"),
    ],
)
def test_prompt_weights_refuses_bad_options(options, match):
    rule = options.pop("rule", "greso")
    with pytest.raises(ValueError, match=match):
        prompt_weights(_query([0.5], [1]), rule, **options)


def test_prompt_weights_refuses_bad_queries():
    with pytest.raises(TypeError, match="PromptQuery"):
        prompt_weights((torch.zeros(2), torch.zeros(2), torch.zeros(2), None), "spo")
    with pytest.raises(ValueError, match="pass_rate must be a 1-D floating tensor"):
        prompt_weights(PromptQuery(torch.zeros(2, 2), torch.zeros(2), torch.zeros(2), None), "spo")
    with pytest.raises(ValueError, match="pass_rate must be a 1-D floating tensor"):
        prompt_weights(PromptQuery(torch.zeros(2, dtype=torch.int64), torch.zeros(2), torch.zeros(2), None), "uniform")
    with pytest.raises(ValueError, match="streak must be an integer tensor"):
        prompt_weights(_query([0.5, 0.5])._replace(streak=torch.zeros(3, dtype=torch.int64)), "greso")
    with pytest.raises(ValueError, match="streak must be an integer tensor"):
        prompt_weights(_query([0.5, 0.5])._replace(streak=torch.zeros(2)), "greso")


def test_rules_are_the_documented_ones():
    assert RULES == ("uniform", "spo", "failure_rate", "greso")


# The RNG -----------------------------------------------------------------------------------------


def _mix(value: int) -> int:
    """splitmix64's finalizer on unsigned Python ints (``keys.mix64``'s specification)."""
    value &= MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & MASK64
    return value ^ (value >> 31)


def uniforms_spec(seed: int, counter: int, num: int) -> List[float]:
    """The module docstring's RNG: SplitMix64 from ``mix64(mix64(seed) + counter * G)``, top 53 bits."""
    start = _mix(_mix(seed) + counter * GOLDEN)
    return [(_mix(start + (i + 1) * GOLDEN) >> 11) / 2.0**53 for i in range(num)]


@pytest.mark.parametrize("seed, counter", [(0, 0), (0, 1), (1, 0), (-5, 3), (2**63 - 1, 2**40), (-(2**63), 7)])
def test_uniforms_follow_their_specification_bit_for_bit(seed, counter):
    got = _uniforms(torch.tensor(seed), torch.tensor(counter), 64)
    assert got.dtype == torch.float64
    assert got.tolist() == uniforms_spec(seed, counter, 64)
    assert ((got >= 0) & (got < 1)).all()


def test_uniforms_are_pinned():
    # Fixed values: a change to the stream changes every sampler's draws, and must be deliberate.
    assert _uniforms(torch.tensor(0), torch.tensor(0), 3).tolist() == [
        0.8833108082136426,
        0.43152799704850997,
        0.026433771592597743,
    ]
    assert _uniforms(torch.tensor(-5), torch.tensor(3), 2).tolist() == [0.7969723487043201, 0.9317809912371523]


def test_uniforms_look_uniform():
    # 100 bins of 200_000 uniforms of one stream, and the first uniform of 20_000 streams (counters).
    values = _uniforms(torch.tensor(11), torch.tensor(0), 200_000)
    counts = torch.histc(values, bins=100, min=0.0, max=1.0).long().tolist()
    assert chi_square(counts, [0.01] * 100)[2] > MIN_P_VALUE
    firsts = torch.tensor([uniforms_spec(11, counter, 1)[0] for counter in range(20_000)])
    counts = torch.histc(firsts, bins=20, min=0.0, max=1.0).long().tolist()
    assert chi_square(counts, [0.05] * 20)[2] > MIN_P_VALUE


# Distributions of draws -------------------------------------------------------------------------

WEIGHTS = [0.1, 0.5, 1.0, 0.0, 2.0, 0.4]


def test_with_replacement_counts_fit_the_weights():
    sampler = PromptSampler(torch.arange(len(WEIGHTS)), replacement=True, seed=1234)
    positions = sampler.draw(torch.tensor(WEIGHTS), 60_000)
    assert positions.dtype == torch.int64 and positions.shape == (60_000,)
    counts = torch.bincount(positions, minlength=len(WEIGHTS)).tolist()
    total = sum(WEIGHTS)
    statistic, df, p_value = chi_square(counts, [w / total for w in WEIGHTS])  # the zero weight: never drawn
    assert df == 4
    assert p_value > MIN_P_VALUE, (statistic, counts)
    # The same test rejects a wrong distribution: these counts against uniform probabilities.
    assert chi_square([c for c in counts if c], [0.2] * 5)[2] < 1e-100


def _successive_probability(weights: Sequence[float], order: Sequence[int]) -> float:
    """P(the draws come out in ``order``) under successive sampling proportional to weight."""
    remaining, prob = sum(weights), 1.0
    for position in order:
        prob *= weights[position] / remaining
        remaining -= weights[position]
    return prob


def test_without_replacement_ordered_pairs_fit_successive_sampling():
    weights = [1.0, 2.0, 3.0, 4.0]
    sampler = PromptSampler(torch.arange(4), check_values=False, seed=99)
    pairs = [(i, j) for i in range(4) for j in range(4) if i != j]
    counts = dict.fromkeys(pairs, 0)
    tensor = torch.tensor(weights)
    for _ in range(8_000):
        first, second = sampler.draw(tensor, 2).tolist()
        counts[(first, second)] += 1
    probs = [_successive_probability(weights, pair) for pair in pairs]
    assert sum(probs) == pytest.approx(1.0)
    statistic, df, p_value = chi_square([counts[pair] for pair in pairs], probs)
    assert df == 11
    assert p_value > MIN_P_VALUE, (statistic, counts)
    # Draws without replacement are not draws with replacement: the pairs' products w_i w_j / W**2 reject.
    independent = [weights[i] * weights[j] / 100.0 for i, j in pairs]
    norm = sum(independent)
    assert chi_square([counts[pair] for pair in pairs], [p / norm for p in independent])[2] < 1e-6


def test_without_replacement_full_permutations_of_three_fit():
    weights = [0.2, 1.0, 3.0]
    sampler = PromptSampler(torch.tensor([7, 8, 9]), check_values=False, seed=5)
    orders = [(0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0)]
    counts = dict.fromkeys(orders, 0)
    tensor = torch.tensor(weights, dtype=torch.float64)
    for _ in range(4_000):
        counts[tuple(sampler.draw(tensor, 3).tolist())] += 1
    statistic, df, p_value = chi_square(
        [counts[o] for o in orders], [_successive_probability(weights, o) for o in orders]
    )
    assert p_value > MIN_P_VALUE, (statistic, counts)


def test_zero_weights_come_last_without_replacement():
    sampler = PromptSampler(torch.arange(5), seed=3)
    weights = torch.tensor([0.0, 1.0, 0.0, 2.0, 0.0])
    seen_third = [0] * 5
    for _ in range(600):
        assert sorted(sampler.draw(weights, 2).tolist()) == [1, 3]
        full = sampler.draw(weights, 5).tolist()
        assert sorted(full[:2]) == [1, 3] and sorted(full[2:]) == [0, 2, 4]
        seen_third[full[2]] += 1
    # The zero-weight prompts fill the draw uniformly.
    assert chi_square([seen_third[i] for i in (0, 2, 4)], [1 / 3] * 3)[2] > MIN_P_VALUE


def test_zero_weights_are_never_drawn_with_replacement_unless_all_are_zero():
    sampler = PromptSampler(torch.arange(4), replacement=True, seed=8)
    positions = sampler.draw(torch.tensor([0.0, 1e-30, 0.0, 1e-30]), 5_000)
    assert set(positions.tolist()) == {1, 3}
    # The last weights zero: draws stay on the positive ones (even where u * total rounds up to total).
    assert set(sampler.draw(torch.tensor([3.0, 1.0, 0.0, 0.0]), 5_000).tolist()) == {0, 1}
    # All zero: uniform over the pool.
    counts = torch.bincount(sampler.draw(torch.zeros(4), 8_000), minlength=4).tolist()
    assert chi_square(counts, [0.25] * 4)[2] > MIN_P_VALUE


def test_subnormal_totals_stay_on_positive_weights():
    # With a subnormal total, u * total rounds up to total for u near 1, past the last cumulative weight.
    weights = torch.tensor([5e-324, 0.0, 0.0], dtype=torch.float64)
    uniforms = torch.tensor([0.0, 0.5, 1.0 - 2.0**-53], dtype=torch.float64)
    assert (uniforms[2] * 5e-324).item() == 5e-324
    assert PromptSampler._draw_with_replacement(weights, uniforms).tolist() == [0, 0, 0]  # pylint: disable=protected-access


def test_all_zero_weights_give_uniform_orders_without_replacement():
    sampler = PromptSampler(torch.arange(3), seed=21)
    counts = [0, 0, 0]
    for _ in range(1_500):
        counts[sampler.draw(torch.zeros(3), 3)[0].item()] += 1
    assert chi_square(counts, [1 / 3] * 3)[2] > MIN_P_VALUE


def test_tiny_and_huge_weights_keep_their_order():
    # Positive weights across float64's range still beat zero weights, and the largest wins.
    sampler = PromptSampler(torch.arange(4), seed=2)
    weights = torch.tensor([0.0, 5e-324, 1e300, 1e-300], dtype=torch.float64)
    for _ in range(50):
        draw = sampler.draw(weights, 4).tolist()
        assert draw[0] == 2 and draw[3] == 0


def test_keep_frequencies_fit_the_weights():
    levels = [0.0, 0.05, 0.3, 0.5, 0.9, 1.0, 1.7]
    size = 20_000
    sampler = PromptSampler(torch.arange(size * len(levels)), "greso", seed=17)
    weights = torch.tensor(levels).repeat_interleave(size)
    kept = sampler.keep(weights).view(len(levels), size)
    assert kept.dtype == torch.bool
    assert not kept[0].any() and kept[5].all() and kept[6].all()  # 0: never; 1 and more: always
    # Each level's count is binomial(size, level): the sum of squared z-scores is chi-square, 4 df.
    statistic = 0.0
    for level, row in zip(levels[1:5], kept[1:5]):
        count = row.sum().item()
        statistic += (count - size * level) ** 2 / (size * level * (1 - level))
    assert chi2_sf(statistic, 4) > MIN_P_VALUE


# Determinism and state ---------------------------------------------------------------------------


def _draws(sampler: PromptSampler, weights: torch.Tensor, calls: int = 4) -> List[List[int]]:
    return [sampler.draw(weights, 3).tolist() for _ in range(calls)]


@pytest.mark.parametrize("replacement", [False, True])
def test_same_seed_same_draws_other_seed_other_draws(replacement):
    weights = torch.rand(20, generator=torch.Generator().manual_seed(0))
    first = _draws(PromptSampler(torch.arange(20), replacement=replacement, seed=42), weights)
    assert first == _draws(PromptSampler(torch.arange(20), replacement=replacement, seed=42), weights)
    assert first != _draws(PromptSampler(torch.arange(20), replacement=replacement, seed=43), weights)
    assert len({tuple(draw) for draw in first}) > 1  # the counter moves on between calls


def test_float32_and_float64_weights_draw_alike():
    values = [0.5, 1.25, 2.0, 0.75, 0.0, 3.5]  # exact in both dtypes
    for replacement in (False, True):
        single = PromptSampler(torch.arange(6), replacement=replacement, seed=6)
        double = PromptSampler(torch.arange(6), replacement=replacement, seed=6)
        assert _draws(single, torch.tensor(values, dtype=torch.float32), 10) == _draws(
            double, torch.tensor(values, dtype=torch.float64), 10
        )


@pytest.mark.parametrize("replacement", [False, True])
def test_resume_from_a_state_dict_gives_the_same_later_draws(replacement):
    weights = torch.tensor([0.3, 0.1, 0.9, 0.4, 0.0, 0.2])
    sampler = PromptSampler(torch.arange(6), replacement=replacement, seed=31)
    _draws(sampler, weights, 3)
    sampler.keep(weights)
    state = sampler.state_dict()
    assert set(state) == {"seed", "draws"} and state["draws"].item() == 4 and state["seed"].item() == 31
    later = _draws(sampler, weights, 5) + [sampler.keep(weights).tolist()]
    resumed = PromptSampler(torch.arange(6), replacement=replacement, seed=0)
    seed, draws = resumed.state_dict()["seed"], resumed.state_dict()["draws"]
    resumed.load_state_dict(state)
    assert _draws(resumed, weights, 5) + [resumed.keep(weights).tolist()] == later
    # State dicts are copies; loading copies in place.
    state["draws"].fill_(1000)
    assert resumed.state_dict()["draws"].item() == 10
    live = resumed._draws  # pylint: disable=protected-access
    resumed.load_state_dict({"seed": seed, "draws": draws})
    assert resumed._draws is live and live.item() == 0  # pylint: disable=protected-access


def _state_items(sampler: PromptSampler) -> dict:
    return {name: tensor.item() for name, tensor in sampler.state_dict().items()}


@pytest.mark.parametrize(
    "state, error, match",
    [
        ([("seed", torch.tensor(1))], TypeError, "expects a mapping"),
        ({"seed": torch.tensor(1)}, ValueError, r"expects keys \['draws', 'seed'\]"),
        ({"seed": torch.tensor(1), "draws": torch.tensor(2), "extra": torch.tensor(0)}, ValueError, "expects keys"),
        ({"seed": torch.tensor(1), "draws": 2}, TypeError, "'draws' must be a tensor"),
        ({"seed": torch.tensor([1]), "draws": torch.tensor(2)}, ValueError, "'seed' must have shape"),
        ({"seed": torch.tensor(1), "draws": torch.tensor(2.0)}, ValueError, "dtype torch.int64"),
        ({"seed": torch.tensor(1), "draws": torch.tensor(-1)}, ValueError, "'draws' must be >= 0"),
    ],
)
def test_refused_states_leave_the_sampler_untouched(state, error, match):
    sampler = PromptSampler(torch.arange(3), seed=4)
    sampler.draw(torch.ones(3), 1)
    before = _state_items(sampler)
    with pytest.raises(error, match=match):
        sampler.load_state_dict(state)
    assert _state_items(sampler) == before


# Refusals ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "weights, match",
    [
        ([1.0, -0.5, 1.0], "1 negative, NaN or infinite of 3, first at position 1"),
        ([1.0, 1.0, NAN], "first at position 2"),
        ([float("inf"), 1.0, 1.0], "first at position 0"),
    ],
)
@pytest.mark.parametrize("method", ["draw", "keep"])
def test_bad_weights_are_refused_and_the_counter_stays(weights, match, method):
    sampler = PromptSampler(torch.arange(3), seed=4)
    call = (lambda w: sampler.draw(w, 2)) if method == "draw" else sampler.keep
    with pytest.raises(ValueError, match=match):
        call(torch.tensor(weights))
    assert _state_items(sampler) == {"seed": 4, "draws": 0}
    sampler.check_values = False  # unchecked, they are drawn without a sync (and without a meaning)
    call(torch.tensor(weights))
    assert _state_items(sampler)["draws"] == 1


def test_draw_refuses_bad_counts_before_drawing():
    sampler = PromptSampler(torch.arange(3))
    with pytest.raises(ValueError, match="cannot draw 4 prompts without replacement from a pool of 3"):
        sampler.draw(torch.ones(3), 4)
    for num in (-1, 1.0, True):
        with pytest.raises(ValueError, match="num must be an int >= 0"):
            sampler.draw(torch.ones(3), num)
    assert _state_items(sampler)["draws"] == 0
    assert sampler.draw(torch.ones(3), 0).shape == (0,)
    with_replacement = PromptSampler(torch.arange(3), replacement=True)
    assert with_replacement.draw(torch.ones(3), 10).shape == (10,)


def test_sources_of_the_wrong_kind_are_refused():
    sampler = PromptSampler(torch.arange(3), "spo")
    with pytest.raises(ValueError, match=r"must be \[M\] = \(3,\)"):
        sampler.draw(torch.ones(4), 1)
    with pytest.raises(ValueError, match="query the tracker with sampler.pool"):
        sampler.draw(_query([0.5, 0.5]), 1)
    with pytest.raises(TypeError, match="weights must be a floating tensor"):
        sampler.draw(torch.ones(3, dtype=torch.int64), 1)
    with pytest.raises(TypeError, match="source must be a tracker"):
        sampler.draw([1.0, 1.0, 1.0], 1)
    with pytest.raises(ValueError, match="track_streaks=True"):
        PromptSampler(torch.arange(3), "greso").draw(_query([0.5, 0.5, 0.5]), 1)
    with pytest.raises(ValueError, match="on the pool's device cpu, got shape \\(3,\\) on meta"):
        sampler.draw(torch.ones(3, device="meta"), 1)
    assert _state_items(sampler)["draws"] == 0


@pytest.mark.parametrize(
    "pool, options, error, match",
    [
        ([0, 1], {}, TypeError, "pool must be an integer tensor"),
        (torch.tensor([0.0, 1.0]), {}, TypeError, "pool must be an integer tensor"),
        (torch.tensor([], dtype=torch.int64), {}, ValueError, "non-empty 1-D"),
        (torch.zeros(2, 2, dtype=torch.int64), {}, ValueError, "non-empty 1-D"),
        (torch.arange(3), {"seed": 2**63}, ValueError, "int64's range"),
        (torch.arange(3), {"seed": 1.0}, TypeError, "seed must be an int"),
        (torch.arange(3), {"replacement": 1}, TypeError, "replacement must be a bool"),
        (torch.arange(3), {"rule": "ucb"}, ValueError, "rule must be one of"),
        (torch.arange(3), {"epsilon": -1}, ValueError, "epsilon"),
        (torch.arange(3), {"p_easy": 0}, ValueError, "p_easy"),
    ],
)
def test_constructor_refusals(pool, options, error, match):
    with pytest.raises(error, match=match):
        PromptSampler(pool, **options)


def test_properties_repr_and_the_pool_copy():
    ids = torch.tensor([5, 9, 2], dtype=torch.int32)
    sampler = PromptSampler(ids, "greso", replacement=True, p_easy=0.7, p_hard=0.4, min_keep=0.02, epsilon=0.1)
    ids[0] = 100  # the sampler keeps its own int64 copy
    assert sampler.pool.tolist() == [5, 9, 2] and sampler.pool.dtype == torch.int64
    assert (sampler.num_prompts, sampler.rule, sampler.replacement) == (3, "greso", True)
    assert (sampler.epsilon, sampler.p_easy, sampler.p_hard, sampler.min_keep) == (0.1, 0.7, 0.4, 0.02)
    assert sampler.device == torch.device("cpu") and sampler.check_values
    assert repr(sampler) == (
        "PromptSampler(num_prompts=3, rule='greso', replacement=True, p_easy=0.7, p_hard=0.4, min_keep=0.02, "
        "device=cpu)"
    )
    assert (
        repr(PromptSampler(ids))
        == "PromptSampler(num_prompts=3, rule='spo', replacement=False, epsilon=0.05, device=cpu)"
    )
    assert (
        repr(PromptSampler(ids, "uniform"))
        == "PromptSampler(num_prompts=3, rule='uniform', replacement=False, device=cpu)"
    )


def test_weights_from_a_query_follow_the_rule_and_options():
    sampler = PromptSampler(torch.arange(3), "failure_rate", epsilon=0.2)
    query = _query([0.25, NAN, 1.0])
    torch.testing.assert_close(sampler.weights(query), prompt_weights(query, "failure_rate", epsilon=0.2))
    # Given weights are returned as they are.
    weights = torch.tensor([1.0, 2.0, 3.0])
    assert sampler.weights(weights) is weights


# torch.compile -----------------------------------------------------------------------------------


@pytest.mark.parametrize("replacement", [False, True])
def test_draw_and_keep_compile_with_fullgraph_and_match_eager(replacement):
    torch._dynamo.reset()  # pylint: disable=protected-access
    query = _query([0.1, 0.9, NAN, 0.5, 0.0], [0, 2, 0, 1, 4])
    compiled_sampler = PromptSampler(torch.arange(5), "greso", replacement=replacement, seed=12, check_values=False)
    eager_sampler = PromptSampler(torch.arange(5), "greso", replacement=replacement, seed=12, check_values=False)

    def step(source):
        return compiled_sampler.draw(source, 3), compiled_sampler.keep(source)

    compiled = torch.compile(step, fullgraph=True, backend="eager")
    for _ in range(3):
        positions, kept = compiled(query)
        assert torch.equal(positions, eager_sampler.draw(query, 3))
        assert torch.equal(kept, eager_sampler.keep(query))
    assert _state_items(compiled_sampler) == _state_items(eager_sampler) == {"seed": 12, "draws": 6}


def test_compiling_with_value_checks_on_is_refused_clearly():
    torch._dynamo.reset()  # pylint: disable=protected-access
    sampler = PromptSampler(torch.arange(3))
    compiled = torch.compile(lambda weights: sampler.draw(weights, 2), fullgraph=True, backend="eager")
    with pytest.raises(Exception) as caught:  # dynamo wraps the ValueError
        compiled(torch.ones(3))
    message = f"{caught.value} {caught.value.__cause__}"
    assert "PromptSampler.draw cannot be compiled with check_values=True" in message
    assert "sampler.check_values = False" in message
    assert _state_items(sampler)["draws"] == 0


# With real trackers ------------------------------------------------------------------------------


def test_draws_from_a_buffer_tracker_follow_its_pass_rates():
    tracker = AdvantageTracker(6, "buffer", buffer_size=8)
    # Prompts 0-4 seen with pass rates 0, 0.25, 0.5, 0.75, 1; prompt 5 never.
    ids = torch.arange(5).repeat_interleave(4)
    rewards = torch.tensor([0, 0, 0, 0, 1, 0, 0, 0, 1, 1, 0, 0, 1, 1, 1, 0, 1, 1, 1, 1], dtype=torch.float32)
    tracker.update(ids, rewards)
    pool = torch.tensor([4, 5, 0, 2, 1, 3])
    sampler = PromptSampler(pool, "failure_rate", replacement=True, seed=3, epsilon=0.0)
    expected = torch.tensor([0.0, 1.0, 1.0, 0.5, 0.75, 0.25])  # 1 - pass rate; unknown prompt 5: 1
    torch.testing.assert_close(sampler.weights(tracker), expected)
    # A tracker and its query give the same draws.
    twin = PromptSampler(pool, "failure_rate", replacement=True, seed=3, epsilon=0.0)
    positions = sampler.draw(tracker, 40_000)
    assert torch.equal(positions, twin.draw(tracker.query(pool), 40_000))
    counts = torch.bincount(positions, minlength=6).tolist()
    assert chi_square(counts, (expected / expected.sum()).tolist())[2] > MIN_P_VALUE


def test_greso_from_a_beta_tracker_with_streaks_equals_gresos_rule():
    # Each prompt's visits as 8 binary rewards; the traces of GRESO_TRACES, one prompt each.
    traces = list(GRESO_TRACES.values())
    tracker = AdvantageTracker(len(traces), "beta", decay=1.0, track_streaks=True)
    for visit in range(max(len(trace) for trace in traces)):
        ids, rewards = [], []
        for prompt, trace in enumerate(traces):
            if visit < len(trace):
                passed = round(trace[visit] * 8)
                ids += [prompt] * 8
                rewards += [1.0] * passed + [0.0] * (8 - passed)
        tracker.update(torch.tensor(ids), torch.tensor(rewards))
    pool = torch.arange(len(traces))
    for p_easy, p_hard in ((0.5, 0.5), (0.7, 0.35)):
        sampler = PromptSampler(pool, "greso", p_easy=p_easy, p_hard=p_hard)
        expected = torch.tensor([greso_keep(trace, p_easy, p_hard) for trace in traces])
        torch.testing.assert_close(sampler.weights(tracker), expected, rtol=1e-6, atol=0)


def test_greso_from_a_tracker_without_streaks_names_track_streaks():
    tracker = AdvantageTracker(3, "beta", decay=0.9)
    with pytest.raises(ValueError, match="track_streaks=True"):
        PromptSampler(torch.arange(3), "greso").draw(tracker, 1)


def test_spo_from_a_beta_tracker_and_hashed_keys():
    # SPO's own memory: unseen prompts read the Beta prior (pass rate 0.5), so they weigh 0.55 anyway.
    tracker = AdvantageTracker(4, "beta", decay=0.875, keys="hashed")
    keys = torch.tensor([10**12, -7, 3])
    tracker.update(keys.repeat_interleave(2), torch.tensor([1.0, 1.0, 0.0, 0.0, 1.0, 0.0]))
    pool = torch.cat([keys, torch.tensor([42])])  # 42: never seen
    sampler = PromptSampler(pool, "spo", seed=1)
    query = tracker.query(pool)
    expected = [spo_weight(p, 0.05) for p in query.pass_rate.tolist()]
    torch.testing.assert_close(sampler.weights(tracker).double(), torch.tensor(expected, dtype=torch.float64))
    assert sampler.weights(tracker)[3].item() == pytest.approx(0.55)
    assert sorted(sampler.draw(tracker, 4).tolist()) == [0, 1, 2, 3]


def test_a_compiled_step_reads_the_tracker_without_graph_breaks():
    torch._dynamo.reset()  # pylint: disable=protected-access
    tracker = AdvantageTracker(5, "beta", decay=0.9, track_streaks=True, check_values=False)
    tracker.update(torch.tensor([0, 0, 1, 1]), torch.tensor([1.0, 1.0, 0.0, 1.0]))
    pool = torch.arange(5)
    compiled_sampler = PromptSampler(pool, "greso", seed=2, check_values=False)
    eager_sampler = PromptSampler(pool, "greso", seed=2, check_values=False)
    compiled = torch.compile(lambda: compiled_sampler.draw(tracker, 4), fullgraph=True, backend="eager")
    for _ in range(2):
        assert torch.equal(compiled(), eager_sampler.draw(tracker, 4))


# On a GPU ----------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("replacement", [False, True])
def test_cuda_draws_equal_cpu_draws(replacement):
    weights = torch.rand(1000, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    weights[::7] = 0.0
    cpu = PromptSampler(torch.arange(1000), replacement=replacement, seed=77, check_values=False)
    cuda = PromptSampler(torch.arange(1000, device="cuda"), replacement=replacement, seed=77, check_values=False)
    for _ in range(20):
        assert torch.equal(cpu.draw(weights, 500), cuda.draw(weights.cuda(), 500).cpu())
        assert torch.equal(cpu.keep(weights), cuda.keep(weights.cuda()).cpu())
    assert torch.equal(
        _uniforms(torch.tensor(5), torch.tensor(9), 4096),
        _uniforms(torch.tensor(5, device="cuda"), torch.tensor(9, device="cuda"), 4096).cpu(),
    )
    with torch.cuda.device(0):
        torch.cuda.set_sync_debug_mode("error")
        try:
            cuda.draw(weights.cuda(), 500)
            cuda.keep(weights.cuda())
        finally:
            torch.cuda.set_sync_debug_mode("default")
