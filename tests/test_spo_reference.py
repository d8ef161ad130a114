"""``SpoBetaTracker`` (tests/system_references.py) pinned on hand-computed cases.

The reference transcribes SPO's per-prompt Beta tracker from verl's
``recipe/spo/spo_ray_trainer.py``; these cases test the transcription itself:
the prior with and without offline data, one step's advantages and update,
a prompt repeated in a batch, the KL-adaptive discount and the sampling
weights. Every expected number is worked out in the comment beside it.
"""

import math
import random

import numpy as np
import pytest
import torch

from system_references import SpoBetaTracker

# The normalisation's epsilon, written where each expected advantage is divided.
EPS = 1e-8


# Prior -------------------------------------------------------------------------------------------


def test_prior_from_offline_scores_with_the_default_config():
    # offline_N = 8, clip_lower = 0.875: N_init = 1 / 0.125 = 8.
    tracker = SpoBetaTracker(
        {
            # Scores > 0 count as successes (0.3 too): s = 4; alpha = beta = 8 * 4.5 / 9 = 4.
            "half": [1, 1, 0, 0.3, 0, 0, 0, 1],
            # s = 0: alpha = 8 * 0.5 / 9, beta = 8 * 8.5 / 9.
            "none": [0] * 8,
            # Two scores, fewer than offline_N: the formula still uses 8, so the
            # six missing count as failures: alpha = 8 * 2.5 / 9, beta = 8 * 6.5 / 9.
            "short": [1, 1],
        }
    )
    assert tracker.alpha["half"] == pytest.approx(4.0, abs=1e-12)
    assert tracker.beta["half"] == pytest.approx(4.0, abs=1e-12)
    assert tracker.alpha["none"] == pytest.approx(4 / 9, abs=1e-12)
    assert tracker.beta["none"] == pytest.approx(68 / 9, abs=1e-12)
    assert tracker.alpha["short"] == pytest.approx(20 / 9, abs=1e-12)
    assert tracker.beta["short"] == pytest.approx(52 / 9, abs=1e-12)
    assert tracker.p_hat("short") == pytest.approx(2.5 / 9, abs=1e-12)
    # alpha + beta = N_init for every prompt.
    for prompt in tracker.prompts:
        assert tracker.alpha[prompt] + tracker.beta[prompt] == pytest.approx(8.0, abs=1e-12)


def test_prior_other_offline_n_and_clip_lower():
    # offline_N = 1, clip_lower = 0.5: N_init = 2; s = 1: alpha = 2 * 1.5 / 2 = 1.5, beta = 2 * 0.5 / 2 = 0.5.
    tracker = SpoBetaTracker({"pass": [1], "fail": [0]}, offline_n=1, clip_lower=0.5)
    assert (tracker.alpha["pass"], tracker.beta["pass"]) == pytest.approx((1.5, 0.5), abs=1e-12)
    assert (tracker.alpha["fail"], tracker.beta["fail"]) == pytest.approx((0.5, 1.5), abs=1e-12)
    assert tracker.p_hat("pass") == pytest.approx(0.75, abs=1e-12)


def test_prior_subsamples_offline_scores_beyond_offline_n():
    # Five binary scores, offline_N = 2: random.sample(scores, 2) of the given generator is kept.
    scores = [1, 1, 1, 0, 0]
    kept = random.Random(3).sample(scores, 2)
    tracker = SpoBetaTracker({"p": scores}, offline_n=2, rng=random.Random(3))
    s = sum(kept)
    # N_init = 8 (clip_lower 0.875); alpha = 8 * (s + 0.5) / 3.
    assert tracker.alpha["p"] == pytest.approx(8 * (s + 0.5) / 3, abs=1e-12)
    assert tracker.beta["p"] == pytest.approx(8 * (2 - s + 0.5) / 3, abs=1e-12)


def test_prior_without_offline_data_is_half_half():
    # offline_N = 0: alpha = beta = 0.5 whatever the scores, with no N_init factor.
    tracker = SpoBetaTracker({"a": [1, 1, 1], "b": []}, offline_n=0)
    assert tracker.alpha == {"a": 0.5, "b": 0.5}
    assert tracker.beta == {"a": 0.5, "b": 0.5}
    assert tracker.p_hat("a") == 0.5


# One step ----------------------------------------------------------------------------------------


def test_one_step_by_hand_constant_rho():
    tracker = SpoBetaTracker({p: [] for p in "abcd"}, offline_n=0, rho_type="constant", rho_value=0.5)
    advantages = tracker.step(["a", "b", "c", "d"], [1.0, 0.0, 1.0, 1.0])
    # p_hat = 0.5 for all: a = [0.5, -0.5, 0.5, 0.5], mean 0.25, deviations
    # [0.25, -0.75, 0.25, 0.25], unbiased variance (3 * 0.0625 + 0.5625) / 3 = 0.25, std 0.5.
    expected = torch.tensor([0.25, -0.75, 0.25, 0.25], dtype=torch.float64) / (0.5 + EPS)
    torch.testing.assert_close(advantages, expected, rtol=0, atol=1e-12)
    assert advantages.dtype == torch.float64
    # alpha = 0.5 * 0.5 + r, beta = 0.5 * 0.5 + (1 - r).
    assert tracker.alpha == pytest.approx({"a": 1.25, "b": 0.25, "c": 1.25, "d": 1.25}, abs=1e-12)
    assert tracker.beta == pytest.approx({"a": 0.25, "b": 1.25, "c": 0.25, "d": 0.25}, abs=1e-12)
    assert dict(tracker.sampled_number) == {"a": 1, "b": 1, "c": 1, "d": 1}


def test_advantages_use_the_prior_before_the_step_and_batch_std():
    # p_hat(pass) = 0.75, p_hat(fail) = 0.25 (N_init = 2, as above).
    tracker = SpoBetaTracker({"pass": [1], "fail": [0]}, offline_n=1, clip_lower=0.5, rho_type="constant")
    advantages = tracker.advantages(["pass", "fail"], [1.0, 0.0])
    # a = [0.25, -0.25], mean 0, unbiased std sqrt(2 * 0.0625 / 1) = sqrt(0.125).
    expected = torch.tensor([0.25, -0.25], dtype=torch.float64) / (math.sqrt(0.125) + EPS)
    torch.testing.assert_close(advantages, expected, rtol=0, atol=1e-12)
    # advantages() alone leaves the state alone.
    assert tracker.alpha == {"pass": 1.5, "fail": 0.5}
    assert not tracker.sampled_number


def test_fractional_reward():
    tracker = SpoBetaTracker({"a": []}, offline_n=0, rho_type="constant", rho_value=0.5)
    tracker.update(["a"], [0.3])
    # alpha = 0.25 + 0.3, beta = 0.25 + 0.7.
    assert tracker.alpha["a"] == pytest.approx(0.55, abs=1e-12)
    assert tracker.beta["a"] == pytest.approx(0.95, abs=1e-12)


def test_constant_rho_at_clip_lower_keeps_the_prior_strength():
    # Prior strength N_init = 8 is the fixed point of n -> 0.875 * n + 1.
    tracker = SpoBetaTracker({"a": [1, 0], "b": [0]}, rho_type="constant", rho_value=0.875)
    tracker.update(["a", "b"], [1.0, 0.4])
    for prompt in "ab":
        assert tracker.alpha[prompt] + tracker.beta[prompt] == pytest.approx(8.0, abs=1e-12)


def test_batch_of_one_gives_nan():
    # torch.std with one element (unbiased) is NaN, and so is the advantage.
    tracker = SpoBetaTracker({"a": []}, offline_n=0)
    with pytest.warns(UserWarning, match="degrees of freedom"):
        advantages = tracker.advantages(["a"], [1.0])
    assert torch.isnan(advantages).all()


# A prompt twice in one batch ---------------------------------------------------------------------


@pytest.mark.parametrize("rewards, final", [((1.0, 0.0), (0.25, 1.25)), ((0.0, 1.0), (1.25, 0.25))])
def test_repeated_prompt_last_sample_wins(rewards, final):
    tracker = SpoBetaTracker({"a": [], "b": []}, offline_n=0, rho_type="constant", rho_value=0.5)
    advantages = tracker.step(["a", "b", "a"], [rewards[0], 0.5, rewards[1]])
    # Both samples of "a" read p_hat = 0.5: a = [r0 - 0.5, 0, r1 - 0.5] = [+-0.5, 0, -+0.5]:
    # mean 0, unbiased std sqrt(0.5 / 2) = 0.5.
    sign = 1.0 if rewards[0] == 1.0 else -1.0
    expected = torch.tensor([sign * 0.5, 0.0, -sign * 0.5], dtype=torch.float64) / (0.5 + EPS)
    torch.testing.assert_close(advantages, expected, rtol=0, atol=1e-12)
    # Each sample's update starts from (0.5, 0.5); the last one written stays:
    # 0.25 + r1, 0.25 + (1 - r1). The first sample's reward is lost.
    assert (tracker.alpha["a"], tracker.beta["a"]) == pytest.approx(final, abs=1e-12)
    assert tracker.sampled_number["a"] == 2
    # The next step reads the last sample's state.
    assert tracker.p_hat("a") == pytest.approx(final[0] / 1.5, abs=1e-12)


def test_repeated_prompt_last_sample_wins_with_its_own_rho():
    tracker = SpoBetaTracker({"a": []}, offline_n=0)
    # D = 0 -> rho 0.96 for the first sample, D = 0.06 -> rho 0.5 clamped to 0.875 for the second.
    tracker.update(["a", "a"], [1.0, 1.0], divergences=[0.0, 0.06])
    assert tracker.alpha["a"] == pytest.approx(0.875 * 0.5 + 1.0, abs=1e-12)
    assert tracker.beta["a"] == pytest.approx(0.875 * 0.5, abs=1e-12)


# KL-adaptive rho ---------------------------------------------------------------------------------


def test_adaptive_rho_clamp():
    tracker = SpoBetaTracker({}, clip_lower=0.875)
    rho = tracker.rho(6, [0.0, 0.003, 0.006, 0.012, 0.06, 1.0])
    expected = [
        0.96,  # D = 0 (a first-sampled prompt): 2 ** 0 = 1, clamped to 0.96.
        0.96,  # 2 ** -0.05 = 0.9659, clamped to 0.96.
        2**-0.1,  # 0.9330, inside the clamp.
        0.875,  # 2 ** -0.2 = 0.8706, clamped to clip_lower.
        0.875,  # D = the half-life 0.06: 0.5, clamped.
        0.875,
    ]
    torch.testing.assert_close(rho, torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-12)
    # A lower clip_lower lets the half-life show: D = 0.06 -> 0.5.
    low = SpoBetaTracker({}, clip_lower=0.1).rho(2, [0.06, 0.12])
    torch.testing.assert_close(low, torch.tensor([0.5, 0.25], dtype=torch.float64), rtol=0, atol=1e-12)


def test_adaptive_rho_is_per_sample_in_update():
    tracker = SpoBetaTracker({"a": [], "b": []}, offline_n=0)
    tracker.update(["a", "b"], [1.0, 0.0], divergences=[0.006, 0.0])
    rho_a = 2**-0.1
    assert tracker.alpha["a"] == pytest.approx(rho_a * 0.5 + 1.0, abs=1e-12)
    assert tracker.beta["a"] == pytest.approx(rho_a * 0.5, abs=1e-12)
    assert tracker.alpha["b"] == pytest.approx(0.96 * 0.5, abs=1e-12)
    assert tracker.beta["b"] == pytest.approx(0.96 * 0.5 + 1.0, abs=1e-12)


def test_kl_rho_needs_divergences():
    tracker = SpoBetaTracker({"a": []}, offline_n=0)
    with pytest.raises(ValueError):
        tracker.update(["a"], [1.0])
    with pytest.raises(ValueError):
        tracker.update(["a"], [1.0], divergences=[0.0, 0.0])
    with pytest.raises(ValueError):
        SpoBetaTracker({}, rho_type="ema")


def test_divergence_is_masked_mean_abs_log_ratio():
    old = torch.tensor([[0.0, -1.0, -2.0], [-0.5, -0.5, -0.5]], dtype=torch.float64)
    cur = torch.tensor([[0.1, -1.2, -5.0], [-0.5, -0.5, -0.5]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]], dtype=torch.float64)
    # Row 0: (0.1 + 0.2) / (2 + 1e-8), the masked token's 3.0 left out; row 1: 0.
    d = SpoBetaTracker.divergence(old, cur, mask)
    torch.testing.assert_close(d, torch.tensor([0.3 / (2 + 1e-8), 0.0], dtype=torch.float64), rtol=0, atol=1e-12)


# Sampling ----------------------------------------------------------------------------------------


def test_sampling_weights_and_probs():
    # offline_N = 2, clip_lower = 0.5: N_init = 2.
    # half: s = 1: alpha = 2 * 1.5 / 3 = 1, beta = 1, p_hat = 0.5.
    # fail: s = 0 (the missing score a failure): alpha = 2 * 0.5 / 3, beta = 2 * 2.5 / 3, p_hat = 1 / 6.
    tracker = SpoBetaTracker({"fail": [0], "half": [1, 0]}, offline_n=2, clip_lower=0.5)
    weights = tracker.sampling_weights(["half", "fail", "unknown"])
    p_fail = 1 / 6
    expected = np.array([0.5 + 0.05, math.sqrt(p_fail * (1 - p_fail)) + 0.05, 0.0])
    np.testing.assert_allclose(weights, expected, rtol=0, atol=1e-12)
    probs = tracker.sampling_probs(["half", "fail", "unknown"])
    np.testing.assert_allclose(probs, expected / expected.sum(), rtol=0, atol=1e-12)
    # All unknown: uniform.
    np.testing.assert_allclose(tracker.sampling_probs(["x", "y"]), [0.5, 0.5], rtol=0, atol=0)


def test_sampling_weight_is_smallest_at_certain_prompts():
    # p_hat = 0 is unreachable, but a p_hat near 0 or 1 weighs about 0.05; p_hat = 0.5 weighs 0.55.
    tracker = SpoBetaTracker({"mid": [1, 0]}, offline_n=2, clip_lower=0.5)
    tracker.alpha["sure"], tracker.beta["sure"] = 1e6, 1e-6
    weights = tracker.sampling_weights(["mid", "sure"])
    assert weights[0] == pytest.approx(0.55, abs=1e-12)
    assert weights[1] == pytest.approx(0.05, abs=1e-5)


def test_sample_replacement_only_when_batch_is_short():
    tracker = SpoBetaTracker({p: [] for p in "abcd"}, offline_n=0)
    prompts = ["a", "b", "c", "d", "zero-weight"]
    kept = tracker.sample(prompts, 4, np.random.RandomState(0))
    # 4 <= 5: without replacement; the zero-weight position is never drawn.
    assert sorted(kept) == [0, 1, 2, 3]
    many = tracker.sample(prompts, 9, np.random.RandomState(0))
    # 9 > 5: with replacement, so prompts repeat (and then the last-sample rule applies).
    assert len(many) == 9 and len(set(many)) < 9 and 4 not in many
