"""The GDPO transcriptions (tests/system_references_gdpo.py) pinned on hand-computed cases.

NeMo-RL's ``GDPOAdvantageEstimator`` and Flow-Factory's ``compute_gdpo``: several
rewards per sample, each normalised within its prompt's group, summed with
weights, then normalised over the batch. The cases test the transcriptions
themselves: channels of different scales, leave-one-out baselines and stds,
zero-variance groups, singletons, interleaved groups, weights, NaNs, and the
float32 behaviour upstream runs with. Every expected number is worked out in
the comment beside it.
"""

import math

import numpy as np
import pytest
import torch
from system_references_gdpo import (
    FlowFactoryAdvantageProcessor,
    flow_factory_gdpo_advantages,
    nemo_rl_calculate_baseline_and_std_per_prompt,
    nemo_rl_gdpo_advantages,
)

# NeMo-RL adds this to a component's std before dividing; Flow-Factory floors stds at it.
EPS = 1e-6


def _t(values):
    return torch.tensor(values, dtype=torch.float64)


def _close(actual, expected, atol=1e-12):
    torch.testing.assert_close(actual, _t(expected), rtol=0, atol=atol)


def _batch_norm_bessel(values):
    """(x - mean) / std, std Bessel-corrected: NeMo-RL's last step, written out."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((x - mean) ** 2 for x in values) / (n - 1))
    return [(x - mean) / std for x in values]


def _batch_norm_population(values):
    """(x - mean) / max(population std, 1e-6): Flow-Factory's last step, written out."""
    n = len(values)
    mean = sum(values) / n
    std = max(math.sqrt(sum((x - mean) ** 2 for x in values) / n), EPS)
    return [(x - mean) / std for x in values]


# NeMo-RL: the per-prompt helper ------------------------------------------------------------------


def _helper(rewards, leave_one_out):
    prompts = torch.zeros(len(rewards), 1, dtype=torch.int64)
    return nemo_rl_calculate_baseline_and_std_per_prompt(
        prompts, _t(rewards), torch.ones(len(rewards), dtype=torch.float64), leave_one_out
    )


def test_nemo_helper_mean_and_bessel_std_without_leave_one_out():
    # [0, 1, 0, 1]: mean 0.5; E[r^2] = 0.5, minus 0.25 = 0.25, times 4/3: var 1/3, std 0.57735.
    baseline, std = _helper([0.0, 1.0, 0.0, 1.0], leave_one_out=False)
    _close(baseline, [0.5] * 4)
    _close(std, [math.sqrt(1 / 3)] * 4)


def test_nemo_helper_leave_one_out_std_is_per_sample():
    # [1, 0, 0], leave one out:
    # sample 0: the others [0, 0]: baseline 0, variance (0 - 0) * 2 = 0, std 0;
    # samples 1, 2: the others [1, 0]: baseline 0.5, (0.5 - 0.25) * 2 / 1 = 0.5, std 0.70711.
    baseline, std = _helper([1.0, 0.0, 0.0], leave_one_out=True)
    _close(baseline, [0.0, 0.5, 0.5])
    _close(std, [0.0, math.sqrt(0.5), math.sqrt(0.5)])


def test_nemo_helper_leave_one_out_pair_has_std_zero():
    # Two samples: num_valid = 1, so the factor 1 / (1 - 1) is inf; (r^2 - r^2) * inf = NaN,
    # and nan_to_num(0) makes the std 0. Baselines: the other sample's reward.
    baseline, std = _helper([1.0, 4.0], leave_one_out=True)
    _close(baseline, [4.0, 1.0])
    _close(std, [0.0, 0.0])


def test_nemo_helper_singleton_baseline_is_its_reward():
    # One valid sample: baseline = its reward, std 0 (its advantage r - baseline is 0).
    baseline, std = _helper([7.0], leave_one_out=True)
    _close(baseline, [7.0])
    _close(std, [0.0])


def test_nemo_helper_uncentred_variance_trap_float64():
    # [0.3, 0.3, 0.3, 0], leave one out. Sample 3's others are three 0.3: their true variance is 0,
    # but E[r^2] = (0.09 + 0.09 + 0.09) / 3 comes out one ulp of 0.09 (2^-56) above E[r]^2 = 0.3^2,
    # so the std is sqrt(2^-56 * 3 / 2) = 2^-28 * sqrt(1.5) = 4.5625e-9 instead of 0.
    # Samples 0-2: others [0.3, 0.3, 0]: mean 0.2, E[r^2] = 0.06, var (0.06 - 0.04) * 1.5 = 0.03.
    baseline, std = _helper([0.3, 0.3, 0.3, 0.0], leave_one_out=True)
    _close(baseline, [0.2, 0.2, 0.2, 0.3])
    assert std[3].item() == pytest.approx(2**-28 * math.sqrt(1.5), rel=1e-12)
    _close(std[:3], [math.sqrt(0.03)] * 3)


def test_nemo_helper_uncentred_variance_trap_float32():
    # Upstream's dtype. [11.775] * 3 + [0], leave one out; sample 3's others are three 11.775.
    # float32: 3 * 11.775 rounds so that the mean is one ulp (2^-20) low, 11.7749987; E[r^2] =
    # 138.65062 and the squared mean differ by 2 ulps of 138.65 (2^-15), so the std is
    # sqrt(2^-15 * 1.5) = 0.0067658 instead of 0 (float64 gives 0 here).
    prompts = torch.zeros(4, 1, dtype=torch.int64)
    rewards = torch.tensor([11.775] * 3 + [0.0], dtype=torch.float32)
    baseline, std = nemo_rl_calculate_baseline_and_std_per_prompt(prompts, rewards, torch.ones(4), True)
    assert baseline[3].item() == np.float32(11.775) - 2**-20
    assert std[3].item() == pytest.approx(math.sqrt(2**-15 * 1.5), rel=1e-6)
    _, std64 = _helper([11.775] * 3 + [0.0], leave_one_out=True)
    assert std64[3].item() == 0.0


# NeMo-RL: GDPOAdvantageEstimator -----------------------------------------------------------------


def test_nemo_upstream_unit_case():
    # NeMo-RL's own test_gdpo_advantage_estimator_multiple_rewards, no leave-one-out, one prompt of 2.
    # correctness [1, 1]: std 0, advantage 0. format [1, 0]: mean 0.5, Bessel std sqrt(0.5):
    # +-0.5 / (0.70711 + 1e-6). integer [1, -1]: mean 0, std sqrt(2): +-1 / (1.41421 + 1e-6).
    # Sum [s, -s], s = 1.41421; Bessel std of [s, -s] is s * sqrt(2): +-1 / sqrt(2) = +-0.70711.
    rewards = {"reward/correctness": [1.0, 1.0], "reward/integer": [1.0, -1.0], "reward/format": [1.0, 0.0]}
    advantages = nemo_rl_gdpo_advantages([0, 0], rewards, use_leave_one_out_baseline=False)
    _close(advantages, [1 / math.sqrt(2), -1 / math.sqrt(2)])
    assert advantages.dtype == torch.float64 and advantages.shape == (2,)


def test_nemo_scales_do_not_drown_without_leave_one_out():
    # One prompt, 4 samples. A = [0, 1, 0, 1]: mean 0.5, std sqrt(1/3): a = 0.5 / (0.57735 + 1e-6) = 0.86603.
    # B = [3000, 1000, 2000, 2000], 1000 times A's scale: mean 2000, std sqrt(2e6 / 3) = 816.5:
    # b = 1000 / (816.5 + 1e-6) = 1.22474.
    a = 0.5 / (math.sqrt(1 / 3) + EPS)
    b = 1000.0 / (math.sqrt(2e6 / 3) + EPS)
    # Sum [-a + b, a - b, -a, a] = [0.35872, -0.35872, -0.86603, 0.86603]; mean 0;
    # Bessel std sqrt(2 * (0.12868 + 0.75) / 3) = 0.76537: [0.46869, -0.46869, -1.13151, 1.13151].
    expected = _batch_norm_bessel([-a + b, a - b, -a, a])
    rewards = [[0.0, 3000.0], [1.0, 1000.0], [0.0, 2000.0], [1.0, 2000.0]]
    advantages = nemo_rl_gdpo_advantages(["p"] * 4, rewards, use_leave_one_out_baseline=False)
    _close(advantages, expected)
    # Samples 2 and 3 tie on B; A alone orders them, at the same magnitude as B's effect.
    assert advantages[3] > 1.0 > -1.0 > advantages[2]


def test_nemo_scales_with_leave_one_out():
    # A = [0, 1, 0, 1], leave one out: sample 0's others [1, 0, 1]: mean 2/3, E[r^2] 2/3,
    # var (2/3 - 4/9) * 3/2 = 1/3; sample 1's others [0, 0, 1]: mean 1/3, var (1/3 - 1/9) * 3/2 = 1/3.
    # a = (2/3) / (0.57735 + 1e-6) = 1.15470: A gives [-a, a, -a, a].
    a = (2 / 3) / (math.sqrt(1 / 3) + EPS)
    # B = [3, 1, 2, 2] * 1000. Sample 0's others [1, 2, 2] * 1000: mean 5000/3, var 1e6 / 3;
    # sample 1's others [3, 2, 2] * 1000: mean 7000/3, var 1e6 / 3; samples 2, 3: others [3, 1, 2] * 1000:
    # mean 2000 = their reward, var 1e6. b = (4000/3) / (577.35 + 1e-6) = 2.30940: B gives [b, -b, 0, 0].
    b = (4000 / 3) / (math.sqrt(1e6 / 3) + EPS)
    # Sum [b - a, a - b, -a, a], about +-1.1547 each: normalised, about +-0.86603.
    expected = _batch_norm_bessel([b - a, a - b, -a, a])
    rewards = [[0.0, 3000.0], [1.0, 1000.0], [0.0, 2000.0], [1.0, 2000.0]]
    _close(nemo_rl_gdpo_advantages(["p"] * 4, rewards), expected, atol=1e-9)
    assert expected[0] == pytest.approx(math.sqrt(3) / 2, abs=1e-5)


def test_nemo_normalize_rewards_off_lets_the_large_scale_drown():
    # normalize_rewards=False: no per-component division, the batch normalisation still runs.
    # A = [0, 10, 20, 30] - 15 = [-15, -5, 5, 15]; B = [1, 0, 0, 1] - 0.5 = [0.5, -0.5, -0.5, 0.5].
    # Sum [-14.5, -5.5, 4.5, 15.5], mean 0, Bessel var (210.25 + 30.25 + 20.25 + 240.25) / 3 = 167:
    # [-1.12205, -0.42560, 0.34822, 1.19943]. B changes the order of nothing.
    rewards = [[0.0, 1.0], [10.0, 0.0], [20.0, 0.0], [30.0, 1.0]]
    off = nemo_rl_gdpo_advantages([0] * 4, rewards, normalize_rewards=False, use_leave_one_out_baseline=False)
    _close(off, [x / math.sqrt(167) for x in [-14.5, -5.5, 4.5, 15.5]])
    # On: A's std sqrt(500 / 3) = 12.910, B's sqrt(1 / 3) = 0.57735; each component has unit scale:
    # A / 12.910 = [-1.16190, -0.38730, 0.38730, 1.16190], B = [0.86603, -0.86603, -0.86603, 0.86603].
    sa, sb = math.sqrt(500 / 3) + EPS, math.sqrt(1 / 3) + EPS
    combined = [-15 / sa + 0.5 / sb, -5 / sa - 0.5 / sb, 5 / sa - 0.5 / sb, 15 / sa + 0.5 / sb]
    on = nemo_rl_gdpo_advantages([0] * 4, rewards, use_leave_one_out_baseline=False)
    _close(on, _batch_norm_bessel(combined))


def test_nemo_zero_std_is_left_unscaled_not_zeroed():
    # Prompt "a" = 3 samples, leave one out. A = [1, 0, 0]: sample 0's others [0, 0] have std 0,
    # so its advantage is 1 - 0 = 1, unscaled; samples 1, 2: (0 - 0.5) / (0.70711 + 1e-6) = -0.70711.
    # B = [5, 5, 5]: r - baseline = 0 everywhere (std 0, unscaled, 0).
    # Sum [1, -k, -k], k = 0.70711 (it does not sum to 0): mean (1 - 2k) / 3 = -0.13807;
    # centred [1.13807, -0.56904, -0.56904], Bessel std 0.98559: [1.15470, -0.57735, -0.57735].
    k = 0.5 / (math.sqrt(0.5) + EPS)
    advantages = nemo_rl_gdpo_advantages(["a"] * 3, [[1.0, 5.0], [0.0, 5.0], [0.0, 5.0]])
    _close(advantages, _batch_norm_bessel([1.0, -k, -k]))
    # A leave-one-out pair has std 0 too: [3, 1] gives [3 - 1, 1 - 3] = [2, -2] unscaled;
    # with B = [0, 0]: sum [2, -2], Bessel std 2 * sqrt(2): [0.70711, -0.70711].
    _close(nemo_rl_gdpo_advantages(["a"] * 2, [[3.0, 0.0], [1.0, 0.0]]), [1 / math.sqrt(2), -1 / math.sqrt(2)])


def test_nemo_singleton_gets_minus_the_batch_mean():
    # Prompts a, a, a, b (leave one out). A = [1, 0, 0, 5]: a's part is [1, -k, -k] as above; the
    # singleton b has baseline = its reward: 0. B = [0, 0, 0, 3]: 0 everywhere.
    # Sum [1, -k, -k, 0], k = 0.70711: mean -0.10355; centred [1.10355, -0.60355, -0.60355, 0.10355];
    # Bessel var 1.95711 / 3, std 0.80769: [1.36630, -0.74726, -0.74726, 0.12821].
    # The singleton's advantage is not 0: the batch mean moves it.
    k = 0.5 / (math.sqrt(0.5) + EPS)
    expected = _batch_norm_bessel([1.0, -k, -k, 0.0])
    advantages = nemo_rl_gdpo_advantages(["a", "a", "a", "b"], [[1.0, 0.0], [0.0, 0.0], [0.0, 0.0], [5.0, 3.0]])
    _close(advantages, expected)
    assert advantages[3].item() == pytest.approx(0.12821, abs=1e-5)


def test_nemo_zero_variance_batch_and_batch_of_one():
    # Every group constant: every component advantage 0, the sum 0, its std 0 (not > 0): a - mean = 0.
    advantages = nemo_rl_gdpo_advantages(["a", "a", "b", "b"], [[1.0, 2.0], [1.0, 2.0], [0.0, 9.0], [0.0, 9.0]])
    _close(advantages, [0.0] * 4)
    # One sample: a singleton (0); torch.std of one value is NaN with a warning, NaN > 0 is False: 0.
    with pytest.warns(UserWarning, match="degrees of freedom"):
        one = nemo_rl_gdpo_advantages(["a"], [[1.0, 2.0]])
    _close(one, [0.0])


def test_nemo_interleaved_groups():
    # Prompts a, b, a, b, no leave-one-out. A: a = [1, 0] -> [+-0.5 / (sqrt(0.5) + 1e-6)] = +-k;
    # b = [4, 0] -> mean 2, std sqrt(8): +-2 / (2.82843 + 1e-6) = +-k' (k, k' both 0.70711 less a 1e-6 share).
    # B: a = [0, 0] -> 0; b = [0, 10] -> -+5 / (sqrt(50) + 1e-6) = -+k''.
    k = 0.5 / (math.sqrt(0.5) + EPS)
    k2 = 2.0 / (math.sqrt(8.0) + EPS)
    k3 = 5.0 / (math.sqrt(50.0) + EPS)
    # Sum in batch order [k, k2 - k3, -k, -k2 + k3] (b's two parts cancel to about 2e-7).
    expected = _batch_norm_bessel([k, k2 - k3, -k, -k2 + k3])
    interleaved = nemo_rl_gdpo_advantages(["a", "b", "a", "b"], [[1, 0], [4, 0], [0, 0], [0, 10]], None, True, False)
    _close(interleaved, expected)
    # The same samples in contiguous order give the same advantages, permuted.
    contiguous = nemo_rl_gdpo_advantages(["a", "a", "b", "b"], [[1, 0], [0, 0], [4, 0], [0, 10]], None, True, False)
    _close(contiguous[[0, 2, 1, 3]], expected)


def test_nemo_weights_follow_sorted_names():
    # Names sorted: "reward/a" then "reward/z", whatever the mapping's order; weights [w_a, w_z] = [3, 1].
    # No leave-one-out, prompts [p, p]. a = [1, 0] -> +-k, z = [0, 1] -> -+k, k = 0.5 / (sqrt(0.5) + 1e-6).
    # Weighted: [3k - k, -3k + k] = [2k, -2k]: normalised +-0.70711.
    rewards = {"reward/z": [0.0, 1.0], "reward/a": [1.0, 0.0], "other": [9.0, 9.0]}
    weighted = nemo_rl_gdpo_advantages(["p", "p"], rewards, [3.0, 1.0], use_leave_one_out_baseline=False)
    _close(weighted, [1 / math.sqrt(2), -1 / math.sqrt(2)])
    # Weights [1, 3]: z wins: [-0.70711, 0.70711]. ("other" is not a reward/ key and is ignored.)
    swapped = nemo_rl_gdpo_advantages(["p", "p"], rewards, [1.0, 3.0], use_leave_one_out_baseline=False)
    _close(swapped, [-1 / math.sqrt(2), 1 / math.sqrt(2)])


def test_nemo_weights_change_the_mix():
    # Three samples of one prompt, no leave-one-out. A = [1, 0, 0]: mean 1/3, std sqrt(1/3):
    # A' = [2/3, -1/3, -1/3] / (0.57735 + 1e-6). B = [0, 0, 6]: mean 2, std sqrt(12):
    # B' = [-2, -2, 4] / (3.46410 + 1e-6). Weights [2, 0.5]: sum 2 A' + 0.5 B'.
    sa, sb = math.sqrt(1 / 3) + EPS, math.sqrt(12.0) + EPS
    a = [2 / 3 / sa, -1 / 3 / sa, -1 / 3 / sa]
    b = [-2 / sb, -2 / sb, 4 / sb]
    expected = _batch_norm_bessel([2 * x + 0.5 * y for x, y in zip(a, b)])
    got = nemo_rl_gdpo_advantages([0, 0, 0], [[1, 0], [0, 0], [0, 6]], [2.0, 0.5], use_leave_one_out_baseline=False)
    _close(got, expected)
    # A uniform factor on the weights cancels in the batch normalisation.
    _close(
        nemo_rl_gdpo_advantages([0, 0, 0], [[1, 0], [0, 0], [0, 6]], [8.0, 2.0], use_leave_one_out_baseline=False),
        expected,
    )


def test_nemo_refuses_one_component_and_wrong_weights():
    with pytest.raises(ValueError, match="multiple reward components"):
        nemo_rl_gdpo_advantages([0, 0], {"reward/only": [1.0, 0.0]})
    with pytest.raises(ValueError, match="reward_weights has 1 entries"):
        nemo_rl_gdpo_advantages([0, 0], [[1.0, 0.0], [0.0, 1.0]], [1.0])


def test_nemo_nan_poisons_the_batch():
    # A NaN reward reaches its group's baselines; the sum's std is NaN (not > 0), a - mean is NaN everywhere,
    # other prompts included.
    advantages = nemo_rl_gdpo_advantages(
        ["a", "a", "b", "b"], [[1.0, 0.0], [float("nan"), 1.0], [0.0, 1.0], [1.0, 0.0]]
    )
    assert torch.isnan(advantages).all()


def test_nemo_float32_mode_shows_the_trap():
    # [11.775] * 3 + [0] in A (leave one out), B = [0, 0, 0, 1].
    # float64: sample 3's A std is 0, so A' = [3.925 / s, 3.925 / s, 3.925 / s, -11.775] with the others'
    # std s = 6.79830 (others [11.775, 11.775, 0]: var 11.775^2 / 3); B: sample 3's others [0, 0, 0] std 0:
    # B' = [-1/3 / s', -1/3 / s', -1/3 / s', 1], s' = sqrt(1/3) (others [0, 0, 1]).
    rewards = [[11.775, 0.0], [11.775, 0.0], [11.775, 0.0], [0.0, 1.0]]
    s = math.sqrt(11.775**2 / 3) + EPS
    s2 = math.sqrt(1 / 3) + EPS
    x = (11.775 - 7.85) / s - (1 / 3) / s2
    expected64 = _batch_norm_bessel([x, x, x, -11.775 + 1.0])
    _close(nemo_rl_gdpo_advantages(["p"] * 4, rewards), expected64, atol=1e-9)
    # float32 (upstream): sample 3's A std is 0.0067658 (see the helper test), so A' = -11.775 / 0.0067668
    # = -1740: the sum is [x, x, x, -1739], whose normalisation gives +-0.5 and -1.5: [0.5, 0.5, 0.5, -1.5].
    got32 = nemo_rl_gdpo_advantages(["p"] * 4, rewards, dtype=torch.float32)
    assert got32.dtype == torch.float32
    a3 = (0.0 - (np.float32(11.775) - 2**-20)) / (math.sqrt(2**-15 * 1.5) + EPS)
    expected32 = _batch_norm_bessel([x, x, x, a3 + 1.0])
    torch.testing.assert_close(got32.double(), _t(expected32), rtol=0, atol=1e-4)
    assert expected32[3] == pytest.approx(-1.5, abs=2e-3)


# Flow-Factory: compute_gdpo -----------------------------------------------------------------------


@pytest.mark.parametrize("sampler_type", ["group_contiguous", "distributed_k_repeat"])
def test_flow_factory_scales_do_not_drown(sampler_type):
    # One prompt, 4 samples. A = [0, 1, 0, 1]: mean 0.5, population std 0.5: A' = [-1, 1, -1, 1].
    # B = [3000, 1000, 2000, 2000]: mean 2000, population std sqrt(2e6 / 4) = 707.107: B' = [1.41421, -1.41421, 0, 0].
    # Sum [0.41421, -0.41421, -1, 1]: mean 0, population std sqrt((2 * 0.17157 + 2) / 4) = 0.76537:
    # [0.54120, -0.54120, -1.30656, 1.30656].
    b = 1000.0 / math.sqrt(2e6 / 4)
    expected = _batch_norm_population([-1 + b, 1 - b, -1.0, 1.0])
    rewards = [[0.0, 3000.0], [1.0, 1000.0], [0.0, 2000.0], [1.0, 2000.0]]
    _close(flow_factory_gdpo_advantages(["p"] * 4, rewards, sampler_type=sampler_type), expected)


def test_flow_factory_zero_variance_singleton_and_interleaved():
    # Prompts a, b, a, c (c a singleton), rewards A = [2, 7, 4, 9], B = [5, 0, 5, 3].
    # a: A [2, 4] -> mean 3, pop std 1: [-1, 1]; B [5, 5] -> std max(0, 1e-6): (5 - 5) / 1e-6 = 0.
    # b: A [7] -> 0, B [0] -> 0 (a singleton passes, no group-size check). c: 0, 0.
    # Sum in batch order [-1, 0, 1, 0]: mean 0, pop std sqrt(2 / 4) = 0.70711: [-1.41421, 0, 1.41421, 0].
    rewards = [[2.0, 5.0], [7.0, 0.0], [4.0, 5.0], [9.0, 3.0]]
    advantages = flow_factory_gdpo_advantages(["a", "b", "a", "c"], rewards)
    _close(advantages, [-math.sqrt(2), 0.0, math.sqrt(2), 0.0])


def test_flow_factory_std_floor_below_1e6():
    # A group whose std is below 1e-6 is divided by 1e-6: A = [1, 1 + 2e-7] -> mean 1 + 1e-7,
    # pop std 1e-7, floored to 1e-6: [-1e-7, 1e-7] / 1e-6 = [-0.1, 0.1] (a plain GRPO would give +-1).
    # B zeros. Batch [-0.1, 0.1]: pop std 0.1: [-1, 1] (the batch normalisation restores the scale).
    # With a second prompt [0, 1] in A (+-1), the floor shows: sum [-0.1, 0.1, -1, 1], mean 0,
    # pop std sqrt((0.02 + 2) / 4) = 0.71063: [-0.14072, 0.14072, -1.40720, 1.40720].
    d = (1 + 2e-7) - 1.0  # 2e-7 as float64 holds it (1.9999999989e-7)
    rewards = [[1.0, 0.0], [1.0 + 2e-7, 0.0], [0.0, 0.0], [1.0, 0.0]]
    got = flow_factory_gdpo_advantages(["p", "p", "q", "q"], rewards)
    _close(got, _batch_norm_population([-d / 2 / EPS, d / 2 / EPS, -1.0, 1.0]), atol=1e-9)


def test_flow_factory_weights_by_name():
    # Weights by name; the rewards' order does not matter. Prompts [p, p, p]:
    # x = [1, 0, 0]: mean 1/3, pop std sqrt(2) / 3:
    # x' = [2/3, -1/3, -1/3] * 3 / sqrt(2) = [1.41421, -0.70711, -0.70711].
    # y = [0, 0, 1]: y' = [-0.70711, -0.70711, 1.41421]. Weights x 2, y 0.5:
    # [2.82843 - 0.35355, -1.41421 - 0.35355, -1.41421 + 0.70711] = [2.47487, -1.76777, -0.70711];
    # mean 0; pop std sqrt((6.125 + 3.125 + 0.5) / 3) = 1.80278: [1.37281, -0.98058, -0.39223].
    r = 1 / math.sqrt(2)
    expected = _batch_norm_population([2 * 2 * r - 0.5 * r, -2 * r - 0.5 * r, -2 * r + 0.5 * 2 * r])
    rewards = {"y": [0.0, 0.0, 1.0], "x": [1.0, 0.0, 0.0]}
    got = flow_factory_gdpo_advantages(["p"] * 3, rewards, {"x": 2.0, "y": 0.5})
    _close(got, expected)
    # [N, C] with [C] weights: columns r0 = x, r1 = y.
    _close(flow_factory_gdpo_advantages(["p"] * 3, [[1, 0], [0, 0], [0, 1]], [2.0, 0.5]), expected)
    with pytest.raises(KeyError):
        flow_factory_gdpo_advantages(["p"] * 3, rewards, {"x": 2.0})
    with pytest.raises(ValueError):
        flow_factory_gdpo_advantages(["p"] * 3, [[1, 0], [0, 0], [0, 1]], [2.0])


def test_flow_factory_global_std_is_ignored_by_gdpo():
    # global_std only switches the "sum" aggregation; GDPO divides by each group's std either way.
    # Prompts a, a, b, b; A = [0, 2, 0, 20]: each group [-1, 1] (pop std 1 and 10). B = [1, 0, 0, 0]:
    # a: [1, -1]; b: [0, 0] -> 0. Sum [0, 0, -1, 1]: pop std sqrt(2 / 4): [0, 0, -1.41421, 1.41421].
    rewards = [[0.0, 1.0], [2.0, 0.0], [0.0, 0.0], [20.0, 0.0]]
    for global_std in (True, False):
        got = flow_factory_gdpo_advantages(["a", "a", "b", "b"], rewards, global_std=global_std)
        _close(got, [0.0, 0.0, -math.sqrt(2), math.sqrt(2)])


def test_flow_factory_all_zero_and_single_sample():
    # Every group constant: each reward 0, the sum 0; batch std max(0, 1e-6): 0 / 1e-6 = 0.
    for sampler_type in ("group_contiguous", "distributed_k_repeat"):
        got = flow_factory_gdpo_advantages(["a", "a", "b"], [[1, 5], [1, 5], [3, 3]], sampler_type=sampler_type)
        _close(got, [0.0, 0.0, 0.0])
        _close(flow_factory_gdpo_advantages(["a"], [[1.0, 2.0]], sampler_type=sampler_type), [0.0])


def test_flow_factory_nan_poisons_the_batch():
    # np.mean / np.std of a group with a NaN are NaN, max(nan, 1e-6) is nan, and the batch mean is NaN.
    got = flow_factory_gdpo_advantages(["a", "a", "b", "b"], [[1.0, 0.0], [float("nan"), 1.0], [0.0, 1.0], [1.0, 0.0]])
    assert torch.isnan(got).all()


def test_flow_factory_uncentred_batch_std_of_group_contiguous():
    # "group_contiguous" takes std = sqrt(ss / n - mean^2), "distributed_k_repeat" np.std: both population
    # stds, equal up to rounding (the sum's mean is 0 by construction, so the uncentred form loses nothing).
    # Prompts a, a, a; A = [0, 0, 3]: mean 1, pop std sqrt(2): [-0.70711, -0.70711, 1.41421]; B = [0, 0, 0]: 0.
    # ss / n = (0.5 + 0.5 + 2) / 3 = 1, mean 0: std 1, so the sum is unchanged: [-0.70711, -0.70711, 1.41421].
    r = 1 / math.sqrt(2)
    for sampler_type in ("group_contiguous", "distributed_k_repeat"):
        got = flow_factory_gdpo_advantages(["a"] * 3, [[0, 0], [0, 0], [3, 0]], sampler_type=sampler_type)
        _close(got, [-r, -r, 2 * r])


def test_flow_factory_float32_zero_variance_group():
    # Upstream with float32 rewards: group a = three 1.892 in A; float32 np.mean is one ulp (2^-23) low and
    # np.std is 2^-23 = 1.19e-7, floored to 1e-6: each sample gets 2^-23 / 1e-6 = 0.11921 (float64: 0).
    # Group b: A = [0, 1] -> [-1, 1]. B zeros. Sum [k, k, k, -1, 1], k = 0.11921.
    k = 2**-23 / EPS
    for sampler_type in ("group_contiguous", "distributed_k_repeat"):
        processor = FlowFactoryAdvantageProcessor(
            {"A": 1.0, "B": 1.0}, group_size=0, sampler_type=sampler_type, upstream_float32=True
        )
        rewards = {"A": [1.892, 1.892, 1.892, 0.0, 1.0], "B": [0.0] * 5}
        got = processor.compute_gdpo(["a", "a", "a", "b", "b"], rewards)
        # The float32 batch reduction of "group_contiguous" rounds at about 1e-7.
        torch.testing.assert_close(got, _t(_batch_norm_population([k, k, k, -1.0, 1.0])), rtol=0, atol=1e-6)
        exact = flow_factory_gdpo_advantages(["a", "a", "a", "b", "b"], rewards, sampler_type=sampler_type)
        _close(exact, _batch_norm_population([0.0, 0.0, 0.0, -1.0, 1.0]), atol=1e-9)
