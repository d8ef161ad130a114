"""The ddpo-pytorch drop-in against a transcription of ddpo-pytorch's own tracker."""

import random

import numpy as np
import pytest

from rail_interview.stat_tracking import prompt_keys
from rail_interview.stat_tracking.ddpo_compat import PerPromptStatTracker
from system_references import DdpoPerPromptStatTracker


@pytest.mark.parametrize("dtype, tolerance", [(np.float64, 1e-12), (np.float32, 2e-6)])
def test_drop_in_matches_ddpo_pytorch(dtype, tolerance):
    rng = random.Random(0)
    prompts = [f"a photo of {animal}" for animal in ("a cat", "a dog", "an otter", "a hedgehog", "a crab")]
    ours, theirs = PerPromptStatTracker(8, 4), DdpoPerPromptStatTracker(8, 4)
    for _ in range(15):
        batch = np.array([rng.choice(prompts) for _ in range(rng.randint(1, 12))])
        rewards = np.array([rng.gauss(3, 2) for _ in batch], dtype=dtype)
        got, want = ours.update(batch, rewards), theirs.update(batch, rewards)
        assert got.dtype == dtype
        np.testing.assert_allclose(got, want, rtol=tolerance, atol=tolerance)
    stats = ours.get_stats()
    assert set(stats) == set(theirs.stats)
    for prompt, rewards in theirs.stats.items():
        assert stats[prompt]["count"] == len(rewards)
        assert stats[prompt]["mean"] == pytest.approx(np.mean(rewards), rel=1e-12)
        assert stats[prompt]["std"] == pytest.approx(np.std(rewards), rel=1e-12, abs=1e-12)


def test_drop_in_takes_lists_and_integer_rewards_and_forgets_the_oldest():
    tracker = PerPromptStatTracker(4, 2, num_prompts=2)
    advantages = tracker.update(["x", "y", "x"], [1, 2, 3])
    assert advantages.dtype == np.float64
    for step in range(6):
        tracker.update([f"new {step}"], [1.0])
    assert set(tracker.get_stats()) == {"new 4", "new 5"}
    assert len(tracker._prompts) <= 4
    with pytest.raises(ValueError, match="one length"):
        tracker.update(["x", "y"], [1.0])


def test_get_stats_after_a_restore_names_unseen_prompts_by_key_until_seen_again():
    stat_tracker = PerPromptStatTracker(16, 2, num_prompts=8)
    stat_tracker.update(["a cat", "a dog", "a cat"], np.array([1.0, 2.0, 3.0]))
    resumed = PerPromptStatTracker(16, 2, num_prompts=8)
    resumed.tracker.load_state_dict(stat_tracker.tracker.state_dict())
    cat_key, dog_key = prompt_keys(["a cat", "a dog"]).tolist()
    stats = resumed.get_stats()
    assert stats[f"<prompt key {cat_key}>"] == stat_tracker.get_stats()["a cat"]
    resumed.update(["a dog"], np.array([4.0]))
    stats = resumed.get_stats()
    assert set(stats) == {f"<prompt key {cat_key}>", "a dog"} and stats["a dog"]["count"] == 2
