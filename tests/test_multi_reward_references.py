"""The transcriptions of ``tests/system_references_multi.py`` pinned on hand-computed cases and on the real packages.

TRL's advantages with several reward functions (both aggregation orders,
every ``scale_rewards``, NaN rewards), verl's ``gdpo`` (GRPO per key, a
weighted sum, token-weighted whitening), verl's ``opo`` (a length-weighted
baseline) and verl's vectorised GRPO before and after PR #6348. Every
expected number is worked out in the comment beside it. Where TRL or verl
is installed the transcriptions are also held to the packages' own code on
random batches (those tests skip without the package, and fail under CI).
"""

import inspect
import math
import random
import textwrap
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from integration_imports import require
from system_references_multi import (
    trl_grpo_multi_advantages,
    trl_grpo_multi_raw_advantages,
    trl_nanstd,
    verl_gdpo_advantages,
    verl_grpo_vectorized_advantages,
    verl_masked_whiten,
    verl_opo_advantages,
)

NAN = float("nan")
# TRL's epsilon and verl's: written where each expected advantage is divided.
TRL_EPS = 1e-4
VERL_EPS = 1e-6


def trl_bessel(count: int) -> float:
    """TRL's ``nanstd`` Bessel factor: ``count / (count - 1)`` of two int64 tensors, a float32 division.

    Exact for counts 2, 3, 5, 9, 17, ...; 4 / 3 becomes 1.33333337 even for float64 rewards.
    """
    return float(np.float32(count) / np.float32(count - 1))


def _close(actual: torch.Tensor, expected, atol: float = 1e-12) -> None:
    expected = torch.as_tensor(expected, dtype=actual.dtype)
    torch.testing.assert_close(actual, expected, rtol=0, atol=atol, equal_nan=True)


# TRL: nanstd ---------------------------------------------------------------------------------------


def test_trl_nanstd_bessel_and_nan():
    # [1, 3, NaN]: mean 2, squared deviations 1 and 1, population variance 1, times 2 / 1: std sqrt(2).
    assert trl_nanstd(torch.tensor([1.0, 3.0, NAN], dtype=torch.float64)).item() == pytest.approx(math.sqrt(2))
    # One non-NaN value: the Bessel factor is NaN. None: NaN too.
    assert math.isnan(trl_nanstd(torch.tensor([5.0, NAN], dtype=torch.float64)).item())
    assert math.isnan(trl_nanstd(torch.tensor([NAN, NAN], dtype=torch.float64)).item())
    # Per column with keepdim: [[0, 1], [2, NaN]]: column 0 std sqrt(2), column 1 NaN.
    std = trl_nanstd(torch.tensor([[0.0, 1.0], [2.0, NAN]], dtype=torch.float64), dim=0, keepdim=True)
    assert std.shape == (1, 2)
    _close(std, [[math.sqrt(2), NAN]])


# TRL: sum_then_normalize -------------------------------------------------------------------------

# Two interleaved groups, two reward functions, weights [1, 0.5]:
#   a: [1, 2] -> 2, [0, None] -> 0 (None adds 0), [None, None] -> unscorable (NaN), [3, 0] -> 3
#   b: [5, None] -> 5, [None, None] -> unscorable
PROMPTS = ["a", "b", "a", "a", "b", "a"]
REWARDS = [[1.0, 2.0], [5.0, NAN], [0.0, NAN], [NAN, NAN], [NAN, NAN], [3.0, 0.0]]
WEIGHTS = [1.0, 0.5]
# Group a's scorable sums [2, 0, 3]: mean 5/3, deviations [1/3, -5/3, 4/3], squares 42/9, Bessel
# variance 42/9 / 2 = 7/3.
MEAN_A = 5 / 3
STD_A = math.sqrt(7 / 3)


def test_trl_sum_then_normalize_group_by_hand():
    raw = trl_grpo_multi_raw_advantages(PROMPTS, REWARDS, WEIGHTS, "group", "sum_then_normalize")
    # a: (sum - 5/3) / (sqrt(7/3) + 1e-4); b has one scorable row: nanstd NaN, so NaN; unscorable rows NaN.
    expected_raw = [
        (2 - MEAN_A) / (STD_A + TRL_EPS),
        NAN,
        (0 - MEAN_A) / (STD_A + TRL_EPS),
        NAN,
        NAN,
        (3 - MEAN_A) / (STD_A + TRL_EPS),
    ]
    _close(raw, expected_raw)
    # nan_to_num: every NaN becomes 0.
    advantages = trl_grpo_multi_advantages(PROMPTS, REWARDS, WEIGHTS, "group", "sum_then_normalize")
    _close(advantages, [0.0 if math.isnan(x) else x for x in expected_raw])
    assert advantages.dtype == torch.float64


def test_trl_sum_then_normalize_batch_by_hand():
    raw = trl_grpo_multi_raw_advantages(PROMPTS, REWARDS, WEIGHTS, "batch")
    # Batch std over the scorable sums [2, 5, 0, 3]: mean 2.5, deviations [-0.5, 2.5, -2.5, 0.5],
    # squares 13, population variance 13 / 4, times TRL's float32 Bessel factor 4 / 3 = 1.33333337 (not
    # 13 / 3 exactly: 1.5e-8 relative). The baseline is still the group's mean: b's 5 - 5 = 0, not NaN.
    std = math.sqrt(13 / 4 * trl_bessel(4))
    expected = [
        (2 - MEAN_A) / (std + TRL_EPS),
        0.0,
        (0 - MEAN_A) / (std + TRL_EPS),
        NAN,
        NAN,
        (3 - MEAN_A) / (std + TRL_EPS),
    ]
    _close(raw, expected)


def test_trl_sum_then_normalize_none_by_hand():
    advantages = trl_grpo_multi_advantages(PROMPTS, REWARDS, WEIGHTS, "none")
    # Sum minus the group's mean, no division: a [1/3, -5/3, 4/3], b's lone row 0, unscorable rows 0.
    _close(advantages, [1 / 3, 0.0, -5 / 3, 0.0, 0.0, 4 / 3])


def test_trl_default_weights_and_a_zero_weight():
    # Weights None are ones: [1, 2] -> 3, [3, 0] -> 3: zero variance, (3 - 3) / (0 + 1e-4) = 0.
    advantages = trl_grpo_multi_advantages(["p", "p"], [[1.0, 2.0], [3.0, 0.0]])
    _close(advantages, [0.0, 0.0])
    # Weight 0 on a None channel: NaN * 0 is NaN, and nansum drops it: sums [1, 3], mean 2, std sqrt(2).
    advantages = trl_grpo_multi_advantages(["p", "p"], [[1.0, NAN], [3.0, 7.0]], [1.0, 0.0])
    _close(advantages, [-1 / (math.sqrt(2) + TRL_EPS), 1 / (math.sqrt(2) + TRL_EPS)])


def test_trl_float64_bessel_factor_is_float32():
    # The group [1, 0, 2, 1] with one function: mean 1, population variance 0.5. TRL's nanstd
    # multiplies by count / (count - 1) computed in float32, 4 / 3 = 1.33333337, so even with float64
    # rewards (0 - 1) / (sqrt(0.5 * 1.33333337) + 1e-4) = -1.2245948715149, where the exact Bessel
    # variance 2/3 gives -1.2245948897605 (1.5e-8 relative; a float32 eps, 9.99999975e-05, moves it by
    # only 4e-12).
    advantages = trl_grpo_multi_advantages(["p"] * 4, [[1.0], [0.0], [2.0], [1.0]])
    assert advantages[1].item() == pytest.approx(-1 / (math.sqrt(0.5 * trl_bessel(4)) + 1e-4), abs=1e-15)
    assert advantages[1].item() == pytest.approx(-1.2245948715149, abs=1e-12)
    assert -1 / (math.sqrt(2 / 3) + 1e-4) == pytest.approx(-1.2245948897605, abs=1e-12)


def test_trl_singletons_and_zero_variance_give_zero():
    prompts = ["s", "z", "z", "z", "t"]
    rewards = [[4.0, 1.0], [1.0, 1.0], [2.0, 0.0], [0.0, 2.0], [NAN, 3.0]]
    for aggregation in ("sum_then_normalize", "normalize_then_sum"):
        for scale in ("group", "batch", "none"):
            advantages = trl_grpo_multi_advantages(prompts, rewards, None, scale, aggregation)
            if aggregation == "sum_then_normalize":
                # Groups of one: r - r = 0. Group z: sums [2, 2, 2], zero variance: 0 / (0 + 1e-4) = 0.
                _close(advantages, [0.0] * 5)
            else:
                # Singletons: (r - r) / (0 + 1e-4) = 0 per channel. z's channels have variance:
                # channel 0 [1, 2, 0] and channel 1 [1, 0, 2]: mean 1, Bessel std 1 each, so the
                # normalised rows are [0, 0], [1, -1] / (1 + 1e-4), [-1, 1] / (1 + 1e-4): sums all 0.
                # Every row 0: batch std 0, advantages 0 / 1e-4 = 0.
                _close(advantages, [0.0] * 5)


def test_trl_all_nan_rows_and_batches():
    # An all-None batch: every row unscorable, NaN raw, 0 after nan_to_num, in both orders.
    for aggregation in ("sum_then_normalize", "normalize_then_sum"):
        raw = trl_grpo_multi_raw_advantages(["p", "p"], [[NAN, NAN], [NAN, NAN]], None, "group", aggregation)
        assert torch.isnan(raw).all()
        _close(trl_grpo_multi_advantages(["p", "p"], [[NAN, NAN], [NAN, NAN]], None, "group", aggregation), [0.0, 0.0])
    # "batch" with one scorable row in the batch: nanstd NaN, so every advantage NaN, then 0 (even the
    # group's own deviation, which is 0 here anyway).
    raw = trl_grpo_multi_raw_advantages(["p", "p", "q"], [[1.0], [NAN], [NAN]], None, "batch")
    assert torch.isnan(raw).all()


# TRL: normalize_then_sum -------------------------------------------------------------------------


def test_trl_normalize_then_sum_by_hand():
    raw = trl_grpo_multi_raw_advantages(PROMPTS, REWARDS, WEIGHTS, "group", "normalize_then_sum")
    # Group a, channel 0: [1, 0, None, 3] -> [1, 0, 3]: mean 4/3, Bessel variance (1/9 + 16/9 + 25/9) / 2 = 7/3.
    # Group a, channel 1: [2, None, None, 0] -> [2, 0]: mean 1, Bessel variance 2.
    s0, s1 = math.sqrt(7 / 3) + TRL_EPS, math.sqrt(2) + TRL_EPS
    a0 = (1 - 4 / 3) / s0 + 0.5 * (2 - 1) / s1
    a1 = (0 - 4 / 3) / s0  # channel 1 is NaN: nansum adds 0
    a3 = (3 - 4 / 3) / s0 + 0.5 * (0 - 1) / s1
    # Group b: channel 0 [5, None] has one value (nanstd NaN) and channel 1 none (nanmean NaN): b's
    # first row is NaN in both channels yet scorable, so its sum is 0, not NaN; the second row is unscorable.
    b0 = 0.0
    # Over the batch: the rows [a0, b0, a1, a3] (the unscorable ones are NaN), their mean and Bessel
    # std (population variance times TRL's float32 4 / 3).
    values = [a0, b0, a1, a3]
    mean = sum(values) / 4
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / 4 * trl_bessel(4))
    expected = [(a0 - mean) / (std + TRL_EPS), (b0 - mean) / (std + TRL_EPS), (a1 - mean) / (std + TRL_EPS)]
    expected += [NAN, NAN, (a3 - mean) / (std + TRL_EPS)]
    _close(raw, expected)
    # scale_rewards has no effect in this order.
    for scale in ("batch", "none"):
        _close(trl_grpo_multi_raw_advantages(PROMPTS, REWARDS, WEIGHTS, scale, "normalize_then_sum"), expected)


def test_trl_orders_differ_when_one_reward_has_a_larger_scale():
    # One group of three, rewards [0, 0], [1, 100], [1, 10], weights ones.
    rewards = [[0.0, 0.0], [1.0, 100.0], [1.0, 10.0]]
    summed = trl_grpo_multi_advantages(["p"] * 3, rewards)
    # Summed first: [0, 101, 11]: mean 112/3, deviations [-112/3, 191/3, -79/3], squares
    # (12544 + 36481 + 6241) / 9 = 55266 / 9, Bessel variance 55266 / 18 = 3070.33 (3 / 2 is exact in float32).
    std = math.sqrt(55266 / 18)
    _close(summed, [(-112 / 3) / (std + TRL_EPS), (191 / 3) / (std + TRL_EPS), (-79 / 3) / (std + TRL_EPS)])
    normalised = trl_grpo_multi_advantages(["p"] * 3, rewards, None, "group", "normalize_then_sum")
    # Normalised first. Channel 0 [0, 1, 1]: mean 2/3, variance (4/9 + 1/9 + 1/9) / 2 = 1/3.
    # Channel 1 [0, 100, 10]: mean 110/3, deviations [-110/3, 190/3, -80/3], variance
    # (12100 + 36100 + 6400) / 9 / 2 = 54600 / 18.
    c0 = math.sqrt(1 / 3) + TRL_EPS
    c1 = math.sqrt(54600 / 18) + TRL_EPS
    row = [(-2 / 3) / c0 + (-110 / 3) / c1, (1 / 3) / c0 + (190 / 3) / c1, (1 / 3) / c0 + (-80 / 3) / c1]
    # Then over the batch (3 rows: Bessel 3 / 2, exact).
    mean = sum(row) / 3
    std = math.sqrt(sum((v - mean) ** 2 for v in row) / 2)
    _close(normalised, [(v - mean) / (std + TRL_EPS) for v in row])
    # The third sample: below the mean when summed (-0.48: channel 1's scale decides), above it when
    # normalised first (row 0.577 - 0.484 = +0.093 before the batch step, whose mean is about 0).
    assert summed[2] < -0.4
    assert normalised[2] > 0.05


def test_trl_interleaved_groups_equal_contiguous_ones():
    # The same batch in two orders: the advantages follow their samples.
    generator = torch.Generator().manual_seed(0)
    prompts = [p for p in range(4) for _ in range(3)]
    rewards = torch.randint(0, 3, (12, 2), generator=generator).double()
    rewards[torch.rand(12, 2, generator=generator) < 0.25] = NAN
    order = torch.randperm(12, generator=generator)
    for aggregation in ("sum_then_normalize", "normalize_then_sum"):
        for scale in ("group", "batch", "none"):
            plain = trl_grpo_multi_advantages(prompts, rewards.tolist(), [1.0, 0.3], scale, aggregation)
            shuffled = trl_grpo_multi_advantages(
                [prompts[i] for i in order], rewards[order].tolist(), [1.0, 0.3], scale, aggregation
            )
            _close(shuffled, plain[order], atol=1e-12)


def test_trl_float32():
    advantages = trl_grpo_multi_advantages(["p"] * 4, [[1.0], [0.0], [2.0], [1.0]], dtype=torch.float32)
    assert advantages.dtype == torch.float32
    # -1 / (sqrt(2/3) + 1e-4) = -1.22459489 to float32's rounding.
    assert advantages[1].item() == pytest.approx(-1.224594889761, abs=1e-6)


# TRL: against TRL's own code ----------------------------------------------------------------------


def _trl_own_advantages(trl, rewards_per_func, num_generations, weights, scale_rewards, aggregation):
    """Runs TRL's own lines, from ``unscorable_mask = ...`` to ``nan_to_num``, cut from the installed source.

    ``GRPOTrainer._generate_and_score_completions`` generates before it
    scores, so it cannot run without a model; its advantage block needs
    only ``rewards_per_func``, ``num_generations``, ``device``, ``nanstd``
    and four attributes of ``self``. The block is exec'd as it is in the
    package: if TRL rewrites it, the markers fail to match here.
    """
    source = textwrap.dedent(inspect.getsource(trl.GRPOTrainer._generate_and_score_completions))
    lines = source.splitlines()
    start = next(i for i, line in enumerate(lines) if "unscorable_mask = torch.isnan(rewards_per_func)" in line)
    end = next(i for i, line in enumerate(lines) if "advantages = torch.nan_to_num(advantages, nan=0.0)" in line)
    block = textwrap.dedent("\n".join(lines[start : end + 1]))
    from trl.trainer.utils import nanstd

    namespace = {
        "torch": torch,
        "nanstd": nanstd,
        "rewards_per_func": rewards_per_func,
        "num_generations": num_generations,
        "device": rewards_per_func.device,
        "self": SimpleNamespace(
            multi_objective_aggregation=aggregation,
            reward_weights=weights,
            scale_rewards=scale_rewards,
            reward_funcs=[None] * rewards_per_func.shape[1],
        ),
    }
    exec(block, namespace)
    return namespace["advantages"]


@pytest.mark.parametrize("aggregation", ["sum_then_normalize", "normalize_then_sum"])
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("dtype, atol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
def test_trl_multi_equals_trl_own_code(aggregation, scale, dtype, atol):
    trl = require("trl", "trl")
    from trl.trainer.utils import nanstd

    generator = torch.Generator().manual_seed(1)
    for trial in range(20):
        groups, generations, funcs = 1 + trial % 5, [1, 2, 4][trial % 3], 1 + trial % 3
        size = groups * generations
        # Small integers make zero-variance groups common; a quarter NaN; some whole rows None.
        rewards = torch.randint(0, 3, (size, funcs), generator=generator).to(dtype) * 0.7
        rewards[torch.rand(size, funcs, generator=generator) < 0.25] = NAN
        rewards[torch.rand(size, generator=generator) < 0.15] = NAN
        weights = (torch.rand(funcs, generator=generator) * 2 - 0.5).to(dtype)
        prompts = [i // generations for i in range(size)]
        ours = trl_grpo_multi_advantages(prompts, rewards.tolist(), weights.tolist(), scale, aggregation, dtype)
        theirs = _trl_own_advantages(trl, rewards.clone(), generations, weights, scale, aggregation)
        torch.testing.assert_close(ours, theirs, rtol=0, atol=atol)
        # TRL's nanstd against the transcription's.
        torch.testing.assert_close(trl_nanstd(rewards, dim=0), nanstd(rewards, dim=0), rtol=0, atol=0, equal_nan=True)


# verl: GDPO ----------------------------------------------------------------------------------------


def _mask(lengths, width):
    return torch.tensor([[1 if t < length else 0 for t in range(width)] for length in lengths])


def test_verl_gdpo_by_hand():
    # Groups a, a, b, b; key 0 [1, 0, 1, 1], key 1 [0, 2, 1, 3]; weights [1, 0.5]; lengths [3, 1, 2, 3] (9 tokens).
    mask = _mask([3, 1, 2, 3], 3)
    advantages = verl_gdpo_advantages(["a", "a", "b", "b"], [[1, 0], [0, 2], [1, 1], [1, 3]], mask, [1.0, 0.5])
    # Key 0: a [1, 0]: mean 0.5, Bessel std sqrt(0.5): +-0.5 / (sqrt(0.5) + 1e-6); b [1, 1]: std 0, so 0 / 1e-6 = 0.
    # Key 1: a [0, 2] and b [1, 3]: mean 1 and 2, std sqrt(2): -+1 / (sqrt(2) + 1e-6).
    k0 = 0.5 / (math.sqrt(0.5) + VERL_EPS)
    k1 = 1 / (math.sqrt(2) + VERL_EPS)
    x = [k0 - 0.5 * k1, -k0 + 0.5 * k1, -0.5 * k1, 0.5 * k1]  # about [0.354, -0.354, -0.354, 0.354]
    # Token-weighted over the 9 tokens: mean sum(l x) / 9 (the int mask's 9 + 1e-8 is 9.0 in float32),
    # variance sum(l (x - mean)^2) / 9 * 9 / 8 (Bessel over tokens; 9 / 8 exact in float32).
    lengths = [3, 1, 2, 3]
    mean = sum(length * v for length, v in zip(lengths, x)) / 9
    var = sum(length * (v - mean) ** 2 for length, v in zip(lengths, x)) / 8
    per_sample = [(v - mean) / math.sqrt(var + 1e-8) for v in x]
    expected = torch.tensor(per_sample, dtype=torch.float64).unsqueeze(-1) * mask
    _close(advantages, expected)
    # Token weighting matters: the mean is (2 p + q) / 9 = 0.1179 here (p, q about 0.3536), not the per-sample mean 0.
    assert mean == pytest.approx(0.1178509357536, abs=1e-12)
    # Zero outside the mask.
    assert (advantages[mask == 0] == 0).all()


def test_verl_gdpo_singleton_keeps_raw_scores_before_whitening():
    # Group c has one sample: each key's advantage is its raw score / (1 + 1e-6); with a, a as above.
    mask = _mask([1, 1, 1], 1)
    advantages = verl_gdpo_advantages(["a", "a", "c"], [[1, 0], [0, 2], [4, 2]], mask)
    # Weights ones. a: key 0 +-0.5 / (sqrt(0.5) + 1e-6), key 1 -+1 / (sqrt(2) + 1e-6); c: (4 + 2) / (1 + 1e-6).
    k0 = 0.5 / (math.sqrt(0.5) + VERL_EPS)
    k1 = 1 / (math.sqrt(2) + VERL_EPS)
    x = [k0 - k1, -k0 + k1, 6 / (1 + VERL_EPS)]
    mean = sum(x) / 3
    var = sum((v - mean) ** 2 for v in x) / 2  # 3 tokens, Bessel 3 / 2 (exact)
    _close(advantages[:, 0], [(v - mean) / math.sqrt(var + 1e-8) for v in x])


def test_verl_gdpo_nan_poisons_the_batch_and_one_token_raises():
    mask = _mask([2, 2, 1, 1], 2)
    advantages = verl_gdpo_advantages(["a", "a", "b", "b"], [[1, 0], [NAN, 2], [1, 1], [0, 3]], mask)
    # The NaN makes a's mean NaN, then the whitening's mean and variance: all NaN, masked tokens too.
    assert torch.isnan(advantages).all()
    with pytest.raises(ValueError, match="sum of the mask is one"):
        verl_gdpo_advantages(["a", "b"], [[1], [0]], _mask([1, 0], 1))


def test_verl_masked_whiten_float_mask_keeps_its_1e_8():
    # values [1, 2, 3] on a float64 mask of 3: mean 6 / (3 + 1e-8) (the 1e-8 stays in float64), so the
    # whitened middle value is 2 - 6 / (3 + 1e-8) = 2e-8 / 3 (about 6.7e-9) times rsqrt(var + 1e-8),
    # not 0 as with an int mask (3 + 1e-8 is 3.0 in float32).
    values = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    float_mask = torch.ones(3, dtype=torch.float64)
    assert verl_masked_whiten(values, float_mask)[1].item() != 0.0
    assert verl_masked_whiten(values, torch.ones(3, dtype=torch.int64))[1].item() == 0.0


def _verl_gdpo_own(core_algos, index, rewards, mask, weights):
    """verl's ``compute_gdpo_outcome_advantage`` called as ``ray_trainer.compute_advantage`` calls it."""
    size, width = mask.shape
    prompt_length = 2
    keys = [f"key{c}" for c in range(rewards.shape[1])]
    config = {"gdpo_reward_keys": keys, "gdpo_reward_weights": weights}
    non_tensor_batch = {key: rewards[:, c].numpy() for c, key in enumerate(keys)}
    batch = {
        "prompts": torch.zeros(size, prompt_length, dtype=torch.int64),
        "attention_mask": torch.cat([torch.ones(size, prompt_length, dtype=torch.int64), mask], dim=1),
    }
    advantages, returns = core_algos.compute_gdpo_outcome_advantage(
        token_level_rewards=torch.zeros(size, width),
        response_mask=mask,
        index=np.array(index, dtype=object),
        config=config,
        non_tensor_batch=non_tensor_batch,
        batch=batch,
    )
    assert torch.equal(advantages, returns)
    return advantages


def _random_grouped_batch(rng, trial, singletons=True):
    groups = 1 + trial % 4
    sizes = [rng.choice([1, 2, 3, 5]) if singletons else rng.choice([2, 3, 5]) for _ in range(groups)]
    index = [f"g{g}" for g, size in enumerate(sizes) for _ in range(size)]
    rng.shuffle(index)  # interleaved
    while len(index) < 2:
        index.append("extra")
    lengths = [rng.randint(1, 6) for _ in index]
    return index, lengths


def test_verl_gdpo_equals_verl_own_code():
    core_algos = require("verl.trainer.ppo.core_algos", "verl")
    rng = random.Random(2)
    for trial in range(30):
        index, lengths = _random_grouped_batch(rng, trial)
        mask = _mask(lengths, 6)
        keys = 1 + trial % 3
        # Rewards and weights exactly representable in float32 (verl casts both to float32).
        rewards = torch.tensor([[rng.randint(0, 8) / 8 for _ in range(keys)] for _ in index], dtype=torch.float64)
        weights = [rng.choice([0.25, 0.5, 1.0, 2.0]) for _ in range(keys)]
        theirs = _verl_gdpo_own(core_algos, index, rewards, mask, weights)
        assert theirs.dtype == torch.float32
        # In float32 the transcription computes what verl does, in verl's order.
        ours32 = verl_gdpo_advantages(index, rewards.tolist(), mask, weights, dtype=torch.float32)
        torch.testing.assert_close(ours32, theirs, rtol=0, atol=1e-6)
        # In float64, to float32's rounding.
        ours64 = verl_gdpo_advantages(index, rewards.tolist(), mask, weights)
        torch.testing.assert_close(ours64, theirs.double(), rtol=0, atol=2e-5)


def test_verl_gdpo_float64_equals_verl_one_key():
    # Without gdpo_reward_keys verl's GDPO takes token_level_rewards as its one key: float64 throughout
    # but for the singletons' float32 constants, so groups of 2 or more here.
    core_algos = require("verl.trainer.ppo.core_algos", "verl")
    rng = random.Random(3)
    for trial in range(20):
        index, lengths = _random_grouped_batch(rng, trial, singletons=False)
        mask = _mask(lengths, 6)
        scores = [rng.gauss(0, 1) for _ in index]
        token_level_rewards = torch.zeros(len(index), 6, dtype=torch.float64)
        last = torch.tensor(lengths) - 1
        token_level_rewards[torch.arange(len(index)), last] = torch.tensor(scores, dtype=torch.float64)
        theirs, _ = core_algos.compute_gdpo_outcome_advantage(token_level_rewards, mask, np.array(index, dtype=object))
        ours = verl_gdpo_advantages(index, [[s] for s in scores], mask)
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-12)


# verl: OPO -----------------------------------------------------------------------------------------


def test_verl_opo_by_hand():
    # Group a: rewards [1, 0, 1], lengths [2, 4, 2]: baseline (2 + 0 + 2) / 8 = 0.5 (the plain mean is 2/3).
    # Group b, one sample of reward 3: baseline 0, advantage 3. Interleaved.
    mask = _mask([2, 3, 4, 2], 4)
    advantages = verl_opo_advantages(["a", "b", "a", "a"], [1.0, 3.0, 0.0, 1.0], mask)
    expected = torch.tensor([0.5, 3.0, -0.5, 0.5], dtype=torch.float64).unsqueeze(-1) * mask
    _close(advantages, expected)


def test_verl_opo_equal_lengths_is_the_group_mean_and_empty_groups_are_nan():
    # Equal lengths [3, 3]: baseline (3 * 1 + 3 * 4) / 6 = 2.5, the plain mean.
    advantages = verl_opo_advantages(["a", "a"], [1.0, 4.0], _mask([3, 3], 3))
    _close(advantages[:, 0], [-1.5, 1.5])
    # Two empty responses: baseline 0 / 0 = NaN, and NaN * 0 stays NaN on every token.
    advantages = verl_opo_advantages(["e", "e", "b"], [1.0, 0.0, 5.0], _mask([0, 0, 2], 2))
    assert torch.isnan(advantages[:2]).all()
    _close(advantages[2], [5.0, 5.0])


def test_verl_opo_equals_verl_own_code():
    core_algos = require("verl.trainer.ppo.core_algos", "verl")
    rng = random.Random(4)
    for trial in range(30):
        index, lengths = _random_grouped_batch(rng, trial)
        mask = _mask(lengths, 6)
        scores = [rng.gauss(0, 1) for _ in index]
        token_level_rewards = torch.zeros(len(index), 6, dtype=torch.float64)
        token_level_rewards[:, 0] = torch.tensor(scores, dtype=torch.float64)
        theirs, _ = core_algos.compute_opo_outcome_advantage(token_level_rewards, mask, np.array(index, dtype=object))
        torch.testing.assert_close(verl_opo_advantages(index, scores, mask), theirs, rtol=0, atol=1e-12)


# verl: vectorised GRPO, PR #6348 -----------------------------------------------------------------


def test_verl_vectorized_grpo_low_variance_trap():
    # PR #6348's case: groups [1.0, 1.00001] and [2.0, 2.00001]. With u = 2^-23, in float32 1.00001 is
    # 1 + 84 u and 2.00001 is 2 + 42 (2 u) = 2 + 84 u: both groups have half-gap h = 42 u = 5.0067901611e-06.
    index = ["a", "a", "b", "b"]
    rewards = [1.0, 1.00001, 2.0, 2.00001]
    h = 42 * 2**-23
    # Centred (the fix, verl 0.9.1): Bessel std sqrt(2) h = 7.0806e-06; h / (sqrt(2) h + 1e-6) = 0.6196008.
    fixed = verl_grpo_vectorized_advantages(index, rewards)
    assert fixed.dtype == torch.float32
    _close(fixed, [-0.6196008324623108, 0.6196008324623108] * 2, atol=1e-6)
    assert fixed[1].item() == pytest.approx(h / (math.sqrt(2) * h + 1e-6), rel=1e-6)
    # Before the fix: in float32, group a's s1 = 2 + 84 u, s2 = 1 + (1 + 84 u)^2 rounds to 2 + 168 u (its
    # 7056 u^2 is below half an ulp, u), s1^2 to 4 + 336 u, so s2 - s1^2 / 2 = 0 (b likewise); the
    # variance is floored at eps = 1e-6, std sqrt(1e-6) = 1e-3, and
    # h / (1e-3 + 1e-6) = 0.0050018: the PR's -0.005001788027584553.
    buggy = verl_grpo_vectorized_advantages(index, rewards, before_6348=True)
    _close(buggy, [-0.005001788027584553, 0.005001788027584553] * 2, atol=1e-9)
    assert buggy[1].item() == pytest.approx(h / (1e-3 + 1e-6), rel=1e-6)
    # The advantages shrank by a factor of 124.
    assert fixed[1].item() / buggy[1].item() == pytest.approx(123.9, abs=0.1)


def test_verl_vectorized_grpo_floor_shrinks_even_when_centred():
    # The floor alone shrinks too: rewards 0 and 1e-4 (variance 5e-9 < 1e-6) give h / (sqrt(2) h + 1e-6)
    # = 0.7021 with the fix, and h / (1e-3 + 1e-6) = 0.0500 before it (h = 5e-5 rounded to float32).
    h = float(torch.tensor(1e-4, dtype=torch.float32)) / 2
    fixed = verl_grpo_vectorized_advantages(["a", "a"], [0.0, 1e-4])
    buggy = verl_grpo_vectorized_advantages(["a", "a"], [0.0, 1e-4], before_6348=True)
    assert fixed[1].item() == pytest.approx(h / (math.sqrt(2) * h + 1e-6), rel=1e-5)
    assert buggy[1].item() == pytest.approx(h / (1e-3 + 1e-6), rel=1e-5)


def test_verl_vectorized_grpo_fixed_equals_verl_own_code():
    core_algos = require("verl.trainer.ppo.core_algos", "verl")
    rng = random.Random(5)
    for trial in range(20):
        index, _ = _random_grouped_batch(rng, trial)
        rewards = [1.0 + rng.randint(0, 3) * 1e-5 if trial % 2 else rng.gauss(0, 1) for _ in index]
        token_level_rewards = torch.tensor(rewards, dtype=torch.float32).unsqueeze(-1)
        theirs, _ = core_algos.compute_grpo_vectorized_outcome_advantage(
            token_level_rewards, torch.ones(len(index), 1), np.array(index, dtype=object)
        )
        ours = verl_grpo_vectorized_advantages(index, rewards)
        torch.testing.assert_close(ours, theirs[:, 0], rtol=0, atol=1e-6)
        # And the canonical loop (compute_grpo_outcome_advantage) agrees with the fixed form.
        canonical, _ = core_algos.compute_grpo_outcome_advantage(
            token_level_rewards, torch.ones(len(index), 1), np.array(index, dtype=object)
        )
        torch.testing.assert_close(ours, canonical[:, 0], rtol=0, atol=1e-5)
