"""``presets.spo`` against ``SpoBetaTracker``, the transcription of verl's SPO recipe, over random sequences.

The reference (``tests/system_references.py``, pinned by hand in
``test_spo_reference.py``) reads each prompt's Beta state before the step,
normalises ``r - p_hat`` over the batch, then folds the rewards in with the
last sample of a repeated prompt standing. ``presets.spo`` must give the
same advantages and the same alpha and beta after every step: with a
constant rho and with the KL-adaptive rho fed as a per-sample tensor
(``functional.spo_discount``), with the offline prior set through
``set_prior``, with prompts repeated in a batch, with fractional rewards and
with hashed keys. In float64 to 1e-12; in float32 to its rounding.
"""

import random
import zlib

import pytest
import torch

from rail_interview.stat_tracking import functional, presets, prompt_keys
from system_references import SpoBetaTracker


def _offline_scores(rng: random.Random, num_prompts: int, offline_n: int):
    """Offline scores per prompt, some fewer than offline_n (missing count as failures)."""
    return {p: [rng.choice([0, 1, 0.5]) for _ in range(rng.randint(0, offline_n))] for p in range(num_prompts)}


def _prior_of(scores, offline_n: int, clip_lower: float, prompts):
    """successes, trials and strength that ``set_prior`` takes for SPO's offline prior.

    SPO counts scores > 0 as successes and divides by offline_n, however
    many scores a prompt has (at most offline_n here: no subsample).
    """
    successes = torch.tensor([sum(score > 0 for score in scores[p]) for p in prompts], dtype=torch.float64)
    return successes, torch.full((len(prompts),), float(offline_n), dtype=torch.float64), 1.0 / (1.0 - clip_lower)


def _batch(rng: random.Random, num_prompts: int, size: int, fractional: bool, repeats: bool):
    """Prompts (maybe repeated) and rewards in [0, 1] (maybe fractional)."""
    prompts = [rng.randrange(num_prompts) for _ in range(size)] if repeats else rng.sample(range(num_prompts), size)
    rewards = [rng.random() if fractional else float(rng.random() < 0.4) for _ in range(size)]
    return prompts, rewards


@pytest.mark.parametrize("rho_type", ["constant", "kl"])
@pytest.mark.parametrize("repeats", [False, True])
@pytest.mark.parametrize("fractional", [False, True])
@pytest.mark.parametrize("offline", [False, True])
def test_spo_matches_the_reference_over_random_sequences(rho_type, repeats, fractional, offline):
    # A seed of the parameters that is the same in every process (hash() of a str is not:
    # PYTHONHASHSEED), so that a failure reproduces.
    rng = random.Random(zlib.crc32(repr((rho_type, repeats, fractional, offline)).encode()))
    num_prompts, offline_n, clip_lower, rho_value = 12, 8, 0.875, 0.9
    scores = _offline_scores(rng, num_prompts, offline_n)
    reference = SpoBetaTracker(
        scores, offline_n=offline_n if offline else 0, rho_type=rho_type, rho_value=rho_value, clip_lower=clip_lower
    )
    tracker = presets.spo(num_prompts, rho=rho_value, dtype=torch.float64)
    if offline:
        ids = list(range(num_prompts))
        successes, trials, strength = _prior_of(scores, offline_n, clip_lower, ids)
        tracker.set_prior(torch.tensor(ids), successes, trials, strength=strength)
    for _ in range(25):
        prompts, rewards = _batch(rng, num_prompts, rng.randint(2, 10), fractional, repeats)
        divergence = None
        discount = None
        if rho_type == "kl":
            divergence = [rng.choice([0.0, rng.random() * 0.05, rng.random()]) for _ in prompts]
            discount = functional.spo_discount(torch.tensor(divergence, dtype=torch.float64), rho_min=clip_lower)
        expected = reference.step(prompts, rewards, divergence)
        got = tracker.update(torch.tensor(prompts), torch.tensor(rewards, dtype=torch.float64), discount=discount)
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
        state = tracker.state_dict()
        for name in ("alpha", "beta"):
            mine = state[name]
            theirs = torch.tensor([getattr(reference, name)[p] for p in range(num_prompts)], dtype=torch.float64)
            torch.testing.assert_close(mine, theirs, rtol=1e-12, atol=1e-12)


def test_spo_in_float32_is_the_reference_to_float32_rounding():
    rng = random.Random(7)
    reference = SpoBetaTracker({p: [] for p in range(16)}, offline_n=0, rho_type="constant", rho_value=0.875)
    tracker = presets.spo(16, rho=0.875)
    for _ in range(40):
        prompts, rewards = _batch(rng, 16, 8, fractional=False, repeats=True)
        expected = reference.step(prompts, rewards)
        got = tracker.update(torch.tensor(prompts), torch.tensor(rewards))
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


def test_spo_with_hashed_text_keys_matches_the_reference():
    rng = random.Random(3)
    texts = [f"prompt {i}" for i in range(10)]
    reference = SpoBetaTracker({t: [] for t in texts}, offline_n=0, rho_type="constant", rho_value=0.9)
    tracker = presets.spo(10, rho=0.9, dtype=torch.float64, keys="hashed")
    for _ in range(20):
        chosen = [rng.choice(texts) for _ in range(6)]
        rewards = [float(rng.random() < 0.5) for _ in chosen]
        expected = reference.step(chosen, rewards)
        got = tracker.update(prompt_keys(chosen), torch.tensor(rewards, dtype=torch.float64))
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    query = tracker.query(prompt_keys(texts))
    torch.testing.assert_close(query.pass_rate, torch.tensor([reference.p_hat(t) for t in texts], dtype=torch.float64))


def test_spo_batch_of_one_gets_zero_where_the_reference_gets_nan():
    reference = SpoBetaTracker({0: []}, offline_n=0, rho_type="constant", rho_value=0.9)
    with pytest.warns(UserWarning, match="degrees of freedom"):  # torch's std of one sample
        assert torch.isnan(reference.step([0], [1.0])).all()
    tracker = presets.spo(1, rho=0.9)
    assert tracker.update(torch.tensor([0]), torch.tensor([1.0])).tolist() == [0.0]
    # The state is folded as the reference folds it.
    assert tracker.state_dict()["alpha"].item() == pytest.approx(reference.alpha[0])


def test_spo_repeats_all_folds_every_sample_in_batch_order():
    tracker = presets.spo(1, rho=0.5, repeats="all", dtype=torch.float64)
    tracker.update(torch.tensor([0, 0, 0]), torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64))
    alpha, beta = 0.5, 0.5
    for reward in (1.0, 0.0, 1.0):
        alpha, beta = 0.5 * alpha + reward, 0.5 * beta + 1 - reward
    state = tracker.state_dict()
    assert state["alpha"].item() == pytest.approx(alpha, abs=1e-15)
    assert state["beta"].item() == pytest.approx(beta, abs=1e-15)
    assert state["count"].item() == 3


def test_spo_update_compiles_with_fullgraph():
    tracker = presets.spo(8, rho=0.9, check_values=False)
    eager = presets.spo(8, rho=0.9, check_values=False)
    compiled = torch.compile(tracker.update, fullgraph=True, backend="eager")
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        ids = torch.randint(0, 8, (6,), generator=generator)
        rewards = (torch.rand(6, generator=generator) < 0.5).float()
        discount = functional.spo_discount(torch.rand(6, generator=generator) * 0.1)
        torch.testing.assert_close(
            compiled(ids, rewards, discount=discount), eager.update(ids, rewards, discount=discount), rtol=0, atol=0
        )
    for name, value in eager.state_dict().items():
        torch.testing.assert_close(tracker.state_dict()[name], value, rtol=0, atol=0)
