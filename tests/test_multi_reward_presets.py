"""The presets of several rewards per sample against their systems' transcriptions, on random batches.

Issue 24's presets (``rail_interview.stat_tracking.presets``) and the plain
transcriptions of the systems they reproduce (``tests/system_references_multi.py``
and ``tests/system_references_gdpo.py``, each tested there against the real
package where it is installed):

* ``trl_grpo`` with C = 1, 2, 3 reward functions and random weights, both
  ``multi_objective_aggregation`` orders times ``scale_rewards`` group, batch
  and none: TRL 1.16's ``GRPOTrainer``;
* ``verl_gdpo`` (C = 1, 2, 3) and ``verl_opo``, whose ``update`` takes the
  response lengths as ``weights``: verl's ``gdpo`` and ``opo``, compared as
  ``advantages.unsqueeze(-1) * response_mask`` with verl's [N, T];
* ``nemo_rl_gdpo`` (C = 2, 3; NeMo-RL refuses one reward) with both of its
  flags: NeMo-RL's ``GDPOAdvantageEstimator``;
* ``flow_factory_gdpo`` (C = 1, 2, 3): Flow-Factory's ``compute_gdpo``, with
  ``sampler_type`` ``"distributed_k_repeat"`` and ``"group_contiguous"``.

The random batches have singletons, zero-variance groups, groups of unequal
sizes spread over the batch (non-contiguous), unequal response lengths and,
for TRL (the one system that handles them), NaN rewards and all-NaN rows.
Each preset equals its system in float64 to 1e-9 and in float32 to a
tolerance justified where it is defined. Where a system's float64 code keeps
a float32 constant (TRL's and verl's Bessel factors) the float64 comparison
uses the transcription's ``exact_bessel=True``, and the faithful one is held
to the bound that constant implies. Then: the known departures (NeMo-RL's
uncentred variance), verl's low-variance trap of PR #6348, C = 1, and
``update_with_report`` and hashed keys giving ``update``'s advantages.

Dimensions: N samples, C reward functions, T response tokens, P prompts.
"""

import dataclasses
import math
import random
from typing import Callable, List, Sequence, Tuple

import numpy as np
import pytest
import torch
from system_references_gdpo import (
    flow_factory_gdpo_advantages,
    nemo_rl_calculate_baseline_and_std_per_prompt,
    nemo_rl_gdpo_advantages,
)
from system_references_multi import (
    trl_grpo_multi_advantages,
    verl_gdpo_advantages,
    verl_group_mean_std,
    verl_grpo_vectorized_advantages,
    verl_masked_whiten,
    verl_opo_advantages,
)

from rail_interview.stat_tracking import AdvantageTracker, presets
from system_references import verl_grpo_scores

NUM_PROMPTS = 16  # P: ids are drawn from [0, P), so the groups' ids are not 0, 1, 2, ...
WIDTH = 8  # T: response lengths are 1 to T tokens
GROUP_SIZES = (1, 2, 3, 4, 5, 7)  # singletons, pairs (a leave-one-out corner), odd sizes
BATCHES_PER_C = 12  # random batches per (preset, dtype, C)
#: Hashed keys far from [0, P): prompt p becomes HASH_OFFSET + p * HASH_STRIDE.
HASH_OFFSET, HASH_STRIDE = 3 * 2**52 + 12345, 1_000_003

# -- Tolerances -----------------------------------------------------------------------------------------------------

#: float64: the presets equal the transcriptions to 1e-9 (measured: 1e-14 at worst, NeMo-RL's leave-one-out std).
FLOAT64_TOL = 1e-9
#: float32, absolute and relative (of max(1, |advantage|)). Both sides round in float32, in different
#: orders. On these batches the rewards (a grid of 0.5 in [-2, 3]) and their weighted sums (weights
#: multiples of 1/8) are exact in float32, so only a mean, a std and the division round: a mean off by
#: 2^-24 |m| moves (r - m) / (s + eps) by 2^-24 |m| / s, at most 6e-8 * 100 = 6e-6 here (|m| / s <= 100
#: on these batches), and a std off by about (n + 3) 2^-25 (n <= 7) moves it by 3e-7 |A| <= 1e-6. One
#: normalisation in a group and one over the batch in series: about 1.4e-5 at the very worst; measured
#: 4e-7 over every preset and seed (verl's gdpo adds its whitening's term: ``float32_tolerance``).
FLOAT32_TOL = 2e-5
#: float32 for NeMo-RL: its variance E[r^2] - E[r]^2 (upstream's, in float32) loses E[r^2] / var of
#: float32's 2^-24 in the subtraction: up to 9 / 0.04 = 225 times here (rewards up to 3, the smallest
#: nonzero variance of a group's others on the grid), so 4e-5 relative in a variance, 2e-5 in a std, and,
#: once the batch normalisation has scaled the largest advantages to about 3, about 6e-5 (measured: 3e-6).
NEMO_FLOAT32_TOL = 1e-4
#: TRL's ``nanstd`` and verl's ``masked_var`` (integer mask) take n / (n - 1) as a float32 division even
#: for float64 values: that factor is off by at most half an ulp, 2^-24 relative, so a std (its square
#: root) by 2^-25 = 3.0e-8, and an advantage divided by it by as much. TRL's ``normalize_then_sum`` has
#: two such stds in series (each reward's in its group, then the batch's): 2^-24 of the largest advantage.
FLOAT32_BESSEL = 2**-25


# -- Random batches -------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Batch:
    """A batch of N samples: prompt ids, C rewards each, and response lengths.

    Attributes:
        ids: [N] prompt ids in [0, P), the groups in shuffled positions.
        rewards: [N, C] rewards (NaN where a TRL reward function returned None).
        lengths: [N] response lengths in [1, T].
    """

    ids: List[int]
    rewards: List[List[float]]
    lengths: List[int]

    @property
    def mask(self) -> torch.Tensor:
        """int64 [N, T] response mask, as verl's ``response_mask`` (from the attention mask) is."""
        return (torch.arange(WIDTH).unsqueeze(0) < torch.tensor(self.lengths).unsqueeze(-1)).long()

    def column(self, channel: int) -> List[float]:
        """[N] rewards of one reward function."""
        return [row[channel] for row in self.rewards]


def _grid_reward(rng: random.Random) -> float:
    """A reward on a grid of 0.5 in [-2, 3]: exact in float32, sums and squares too."""
    return rng.randint(-4, 6) / 2


def random_batch(rng: random.Random, num_rewards: int, *, nan: bool) -> Batch:
    """A random batch of 1 to 6 groups of sizes from ``GROUP_SIZES``, in shuffled positions.

    A quarter of the groups have every row equal (zero variance in every
    reward and in their sum), a fifth more have one reward function constant.
    With ``nan``, a tenth of the rows are NaN throughout (unscorable) and
    15 % of the other rewards are NaN.

    Args:
        rng: the random source.
        num_rewards: C.
        nan: put NaN rewards in.

    Returns:
        The batch; a batch of one sample has 2 or more tokens (verl's
        whitening needs two).
    """
    prompts = rng.sample(range(NUM_PROMPTS), rng.randint(1, 6))
    ids: List[int] = []
    rewards: List[List[float]] = []
    for prompt in prompts:
        kind = rng.random()
        base = [_grid_reward(rng) for _ in range(num_rewards)]
        constant = rng.randrange(num_rewards)
        for _ in range(rng.choice(GROUP_SIZES)):
            row = list(base) if kind < 0.25 else [_grid_reward(rng) for _ in range(num_rewards)]
            if 0.25 <= kind < 0.45:
                row[constant] = base[constant]
            ids.append(prompt)
            rewards.append(row)
    if nan:
        for row in rewards:
            if rng.random() < 0.1:
                row[:] = [math.nan] * num_rewards
            else:
                row[:] = [math.nan if rng.random() < 0.15 else reward for reward in row]
    order = list(range(len(ids)))
    rng.shuffle(order)
    lengths = [rng.randint(1, WIDTH) for _ in ids]
    if len(ids) == 1:
        lengths = [rng.randint(2, WIDTH)]
    return Batch([ids[i] for i in order], [rewards[i] for i in order], lengths)


def random_weights(rng: random.Random, num_rewards: int, dtype: torch.dtype) -> List[float]:
    """C reward weights: any floats in [-1, 2] for float64; nonzero multiples of 1/8 in [-1, 2] for float32.

    In float32 a weighted sum with an arbitrary weight is rounded, and a
    group of equal sums can then have a mean one ulp off, which an eps of
    1e-4 turns into an advantage of about 1e-3 whose value depends on the
    order of summation: rounding noise of the dtype, not a property of the
    preset. Multiples of 1/8 keep the weighted sums of grid rewards exact.
    """
    if dtype == torch.float64:
        return [rng.uniform(-1.0, 2.0) for _ in range(num_rewards)]
    return [rng.choice([k for k in range(-8, 17) if k]) / 8 for _ in range(num_rewards)]


# -- The presets and their systems ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Case:
    """One preset with fixed options, and the transcription of the system it reproduces.

    Attributes:
        name: the test id.
        build: ``(num_rewards, reward_weights, dtype, **keywords) -> tracker``.
        system: ``(batch, reward_weights, dtype) -> advantages``, [N], or
            [N, T] with ``tokens``; float64-exact in float64, the system's own
            float32 computation in float32.
        num_rewards: the C to test.
        tokens: ``update`` takes ``weights`` (response lengths) and the
            system returns [N, T].
        nan: the system takes NaN rewards (TRL).
        float32_tol: the float32 tolerance.
    """

    name: str
    build: Callable[..., AdvantageTracker]
    system: Callable[[Batch, List[float], torch.dtype], torch.Tensor]
    num_rewards: Tuple[int, ...]
    tokens: bool = False
    nan: bool = False
    float32_tol: float = FLOAT32_TOL


def _trl_case(aggregation: str, scale: str) -> Case:
    """TRL's ``GRPOTrainer`` with ``multi_objective_aggregation`` and ``scale_rewards``."""

    def build(num_rewards: int, weights: List[float], dtype: torch.dtype, **keywords) -> AdvantageTracker:
        """``trl_grpo`` with C weights (C = 1: one reward function of weight w, rewards [N])."""
        return presets.trl_grpo(
            NUM_PROMPTS, scale, multi_objective_aggregation=aggregation, reward_weights=weights, dtype=dtype, **keywords
        )

    def system(batch: Batch, weights: List[float], dtype: torch.dtype) -> torch.Tensor:
        """TRL's advantages, its float32 Bessel factor made exact (see ``test_trl_faithful_bessel_factor``)."""
        return trl_grpo_multi_advantages(
            batch.ids, batch.rewards, weights, scale, aggregation, dtype, exact_bessel=True
        )

    return Case(f"trl_grpo-{aggregation}-{scale}", build, system, (1, 2, 3), nan=True)


def _verl_gdpo_build(num_rewards: int, weights: List[float], dtype: torch.dtype, **keywords) -> AdvantageTracker:
    """``verl_gdpo`` with C reward keys and their weights."""
    return presets.verl_gdpo(NUM_PROMPTS, num_rewards, reward_weights=weights, dtype=dtype, **keywords)


def _verl_gdpo_system(batch: Batch, weights: List[float], dtype: torch.dtype) -> torch.Tensor:
    """verl's ``gdpo`` [N, T] on an int64 mask (its 1e-8 in ``masked_mean`` then vanishes), exact Bessel factor."""
    return verl_gdpo_advantages(batch.ids, batch.rewards, batch.mask, weights, dtype=dtype, exact_bessel=True)


def _verl_opo_build(num_rewards: int, weights: List[float], dtype: torch.dtype, **keywords) -> AdvantageTracker:
    """``verl_opo`` (one reward, no weights of rewards)."""
    return presets.verl_opo(NUM_PROMPTS, dtype=dtype, **keywords)


def _verl_opo_system(batch: Batch, weights: List[float], dtype: torch.dtype) -> torch.Tensor:
    """verl's ``opo`` [N, T]."""
    return verl_opo_advantages(batch.ids, batch.column(0), batch.mask, dtype=dtype)


def _nemo_case(normalize_rewards: bool, leave_one_out: bool) -> Case:
    """NeMo-RL's ``GDPOAdvantageEstimator`` with its two flags."""

    def build(num_rewards: int, weights: List[float], dtype: torch.dtype, **keywords) -> AdvantageTracker:
        """``nemo_rl_gdpo`` with C components."""
        return presets.nemo_rl_gdpo(
            NUM_PROMPTS,
            num_rewards,
            reward_weights=weights,
            normalize_rewards=normalize_rewards,
            use_leave_one_out_baseline=leave_one_out,
            dtype=dtype,
            **keywords,
        )

    def system(batch: Batch, weights: List[float], dtype: torch.dtype) -> torch.Tensor:
        """NeMo-RL's advantages; on grid rewards its uncentred variance is exact in float64."""
        return nemo_rl_gdpo_advantages(batch.ids, batch.rewards, weights, normalize_rewards, leave_one_out, dtype)

    name = f"nemo_rl_gdpo-normalize_{normalize_rewards}-loo_{leave_one_out}"
    return Case(name, build, system, (2, 3), float32_tol=NEMO_FLOAT32_TOL)


def _flow_factory_case(sampler_type: str) -> Case:
    """Flow-Factory's ``compute_gdpo`` with one of its two batch reductions.

    ``"group_contiguous"`` takes the batch's std uncentred, sqrt(E[a^2] -
    E[a]^2), where ``"distributed_k_repeat"`` calls ``np.std``. It needs no
    looser tolerance here: every group's normalised rewards sum to 0, so the
    weighted sum's batch mean is 0 up to rounding (about 1e-16 of the
    advantages), and E[a]^2 is about 1e-32 of E[a^2]: the subtraction
    cancels nothing (measured in float64: 8.9e-16, as ``np.std``). In float32
    upstream reduces (count, sum, sum of squares) as a float32 tensor,
    2^-24 relative on the variance, within ``FLOAT32_TOL``.
    """

    def build(num_rewards: int, weights: List[float], dtype: torch.dtype, **keywords) -> AdvantageTracker:
        """``flow_factory_gdpo`` with C reward models."""
        return presets.flow_factory_gdpo(NUM_PROMPTS, num_rewards, reward_weights=weights, dtype=dtype, **keywords)

    def system(batch: Batch, weights: List[float], dtype: torch.dtype) -> torch.Tensor:
        """Flow-Factory's advantages, from float32 rewards and reductions when ``dtype`` is float32."""
        upstream_float32 = dtype == torch.float32
        return flow_factory_gdpo_advantages(
            batch.ids, batch.rewards, weights, sampler_type=sampler_type, upstream_float32=upstream_float32
        )

    return Case(f"flow_factory_gdpo-{sampler_type}", build, system, (1, 2, 3))


CASES = {
    case.name: case
    for case in [
        *(_trl_case(a, s) for a in ("sum_then_normalize", "normalize_then_sum") for s in ("group", "batch", "none")),
        Case("verl_gdpo", _verl_gdpo_build, _verl_gdpo_system, (1, 2, 3), tokens=True),
        Case("verl_opo", _verl_opo_build, _verl_opo_system, (1,), tokens=True),
        *(_nemo_case(normalize, loo) for normalize in (True, False) for loo in (True, False)),
        _flow_factory_case("distributed_k_repeat"),
        _flow_factory_case("group_contiguous"),
    ]
}


def _inputs(batch: Batch, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """int64 [N] ids and ``dtype`` rewards, [N, C], or [N] with one reward (as a tracker of one takes them)."""
    rewards = torch.tensor(batch.rewards, dtype=dtype)  # [N, C]
    return torch.tensor(batch.ids, dtype=torch.int64), rewards if rewards.shape[1] > 1 else rewards[:, 0]


def run_preset(case: Case, tracker: AdvantageTracker, batch: Batch, dtype: torch.dtype, *, report: bool = False):
    """One update of ``tracker`` on ``batch``, shaped as the case's system returns advantages.

    Args:
        case: the preset's case.
        tracker: a fresh tracker of the case.
        batch: the batch.
        dtype: the tracker's dtype.
        report: call ``update_with_report`` and take its advantages.

    Returns:
        ``dtype`` [N] advantages, or [N, T] (times the response mask) for verl's token-level systems.
    """
    ids, rewards = _inputs(batch, dtype)
    keywords = dict(weights=torch.tensor(batch.lengths)) if case.tokens else {}
    if report:
        advantages = tracker.update_with_report(ids, rewards, **keywords).advantages
    else:
        advantages = tracker.update(ids, rewards, **keywords)
    assert advantages.dtype == dtype and advantages.shape == (len(batch.ids),)
    return advantages.unsqueeze(-1) * batch.mask if case.tokens else advantages


def worst_difference(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max(1, |want|), elementwise, in float64: the error ``FLOAT64_TOL`` and co. bound."""
    got, want = got.double(), want.double()
    return ((got - want).abs() / want.abs().clamp_min(1.0)).max().item()


def _assert_close(got: torch.Tensor, want: torch.Tensor, tol: float, message: str) -> None:
    """``|got - want| <= tol * max(1, |want|)`` elementwise, in float64, with ``message`` on failure."""
    torch.testing.assert_close(
        got.double(), want.double(), rtol=tol, atol=tol, msg=lambda default: f"{message}\n{default}"
    )


def _verl_whitening_gain(batch: Batch, weights: Sequence[float]) -> float:
    """max |x| / sqrt(var + 1e-8) for verl's summed per-reward advantages x, before its token whitening (float64).

    In float32 verl's token mean of x carries roundings of about 2^-24 of
    max |x| per token added, and the whitening multiplies an error in the
    mean by 1 / sqrt(var + 1e-8): up to 1e4 when every x is equal (a batch of
    one sample: x - mean is rounding noise, 7e-5 for x = 0.086 over 8
    tokens, where the preset's weighted mean gives exactly 0).
    """
    combined = torch.zeros(len(batch.ids), dtype=torch.float64)
    for channel, weight in enumerate(weights):
        scores = torch.tensor(batch.column(channel), dtype=torch.float64)
        combined += weight * verl_grpo_scores(scores, batch.ids, 1e-6, True)
    lengths = torch.tensor(batch.lengths, dtype=torch.float64)
    mean = (lengths * combined).sum() / lengths.sum()
    variance = (lengths * (combined - mean) ** 2).sum() / (lengths.sum() - 1)
    return (combined.abs().max() / (variance + 1e-8).sqrt()).item()


def float32_tolerance(case: Case, batch: Batch, weights: Sequence[float]) -> float:
    """The case's float32 tolerance; for verl's ``gdpo`` plus its token mean's roundings times the whitening's gain.

    torch sums the N T <= 336 tokens pairwise: about log2(336) = 9
    roundings of 2^-24 of max |x| each, 16 with a margin, which the
    whitening multiplies by ``_verl_whitening_gain / max |x|``.
    """
    if case.build is _verl_gdpo_build:
        return case.float32_tol + 16 * 2**-24 * _verl_whitening_gain(batch, weights)
    return case.float32_tol


def case_batches(case: Case, dtype: torch.dtype, seed: int) -> List[Tuple[Batch, List[float]]]:
    """``BATCHES_PER_C`` random batches with reward weights for each C of the case, reproducibly."""
    rng = random.Random(f"{case.name}-{dtype}-{seed}")
    return [
        (random_batch(rng, num_rewards, nan=case.nan), random_weights(rng, num_rewards, dtype))
        for num_rewards in case.num_rewards
        for _ in range(BATCHES_PER_C)
    ]


# -- Each preset is its system ----------------------------------------------------------------------------------------


#: NeMo-RL's batch of one sample: ``advantages.std()`` warns before giving NaN (the advantage is then 0).
ONE_SAMPLE_STD_WARNING = r"ignore:std\(\). degrees of freedom:UserWarning"


@pytest.mark.filterwarnings(ONE_SAMPLE_STD_WARNING)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_preset_equals_its_system(name, dtype):
    case = CASES[name]
    for step, (batch, weights) in enumerate(case_batches(case, dtype, seed=0)):
        num_rewards = len(batch.rewards[0])
        got = run_preset(case, case.build(num_rewards, weights, dtype), batch, dtype)
        want = case.system(batch, weights, dtype)
        tol = FLOAT64_TOL if dtype == torch.float64 else float32_tolerance(case, batch, weights)
        _assert_close(got, want, tol, f"{name} {dtype} batch {step}: C={num_rewards} weights {weights} {batch}")


def test_random_batches_cover_the_awkward_cases():
    # Across the batches the tests use: singletons, zero-variance groups, groups of several sizes in
    # non-contiguous positions, unequal lengths; with NaN, unscorable rows and single NaN rewards.
    batches = [batch for case in CASES.values() for batch, _ in case_batches(case, torch.float64, seed=0)]
    sizes, zero_variance, scattered = set(), 0, 0
    for batch in batches:
        for prompt in set(batch.ids):
            positions = [i for i, p in enumerate(batch.ids) if p == prompt]
            sizes.add(len(positions))
            rows = [batch.rewards[i] for i in positions]
            zero_variance += len(positions) > 1 and all(np.array_equal(row, rows[0], equal_nan=True) for row in rows)
            scattered += positions[-1] - positions[0] + 1 > len(positions)
    assert sizes == set(GROUP_SIZES)
    assert zero_variance > 20 and scattered > 100
    assert any(len(set(batch.lengths)) > 2 for batch in batches)
    rows = [row for batch in batches for row in batch.rewards]
    assert sum(all(math.isnan(r) for r in row) for row in rows) > 20
    assert sum(any(math.isnan(r) for r in row) and not all(math.isnan(r) for r in row) for row in rows) > 20
    assert all(max(batch.ids) > len(set(batch.ids)) for batch in batches if len(set(batch.ids)) > 3)


@pytest.mark.filterwarnings(ONE_SAMPLE_STD_WARNING)
@pytest.mark.parametrize("name", sorted(CASES))
def test_update_with_report_and_hashed_keys_give_update_advantages(name):
    case = CASES[name]
    for batch, weights in case_batches(case, torch.float64, seed=1)[:: BATCHES_PER_C // 4]:
        num_rewards = len(batch.rewards[0])
        plain = run_preset(case, case.build(num_rewards, weights, torch.float64), batch, torch.float64)
        reported = run_preset(case, case.build(num_rewards, weights, torch.float64), batch, torch.float64, report=True)
        torch.testing.assert_close(reported, plain, rtol=0, atol=0)
        # The same batch under int64 keys far from [0, P), through a KeyTable of P rows.
        hashed_batch = dataclasses.replace(batch, ids=[HASH_OFFSET + p * HASH_STRIDE for p in batch.ids])
        hashed = case.build(num_rewards, weights, torch.float64, keys="hashed")
        torch.testing.assert_close(run_preset(case, hashed, hashed_batch, torch.float64), plain, rtol=0, atol=0)
        torch.testing.assert_close(plain, case.system(batch, weights, torch.float64), rtol=1e-9, atol=1e-9)


# -- The float32 constants of TRL's and verl's float64 code ---------------------------------------------------------


@pytest.mark.parametrize("aggregation", ["sum_then_normalize", "normalize_then_sum"])
def test_trl_faithful_bessel_factor(aggregation):
    # TRL's own code (exact_bessel=False) in float64: its n / (n - 1) is a float32 division, so it is off
    # from the preset's exact float64 by up to 2^-25 per std (FLOAT32_BESSEL; two stds in series for
    # normalize_then_sum), and by more than 1e-9 somewhere (n = 4, 6 and 7 occur: their factors are
    # inexact in float32); with the exact factor, 1e-9 (test_preset_equals_its_system).
    stds = 1 if aggregation == "sum_then_normalize" else 2
    gaps = []
    for scale in ("group", "batch", "none"):
        case = CASES[f"trl_grpo-{aggregation}-{scale}"]
        for batch, weights in case_batches(case, torch.float64, seed=2):
            num_rewards = len(batch.rewards[0])
            got = run_preset(case, case.build(num_rewards, weights, torch.float64), batch, torch.float64)
            trl = trl_grpo_multi_advantages(batch.ids, batch.rewards, weights, scale, aggregation)
            bound = stds * FLOAT32_BESSEL * max(1.0, trl.abs().max().item()) + 1e-12
            assert (got - trl).abs().max().item() <= bound, (scale, batch, weights)
            gaps.append((got - trl).abs().max().item())
    assert max(gaps) > 1e-9


def test_verl_gdpo_faithful_bessel_factor():
    # verl's own masked_var on the int64 mask takes tokens / (tokens - 1) in float32: the advantages are
    # off by up to 2^-25 relative (one std), and by more than 1e-9 on some batch.
    gaps = []
    for batch, weights in case_batches(CASES["verl_gdpo"], torch.float64, seed=3):
        num_rewards = len(batch.rewards[0])
        got = run_preset(
            CASES["verl_gdpo"], _verl_gdpo_build(num_rewards, weights, torch.float64), batch, torch.float64
        )
        verl = verl_gdpo_advantages(batch.ids, batch.rewards, batch.mask, weights)
        bound = FLOAT32_BESSEL * max(1.0, verl.abs().max().item()) + 1e-12
        assert (got - verl).abs().max().item() <= bound, (batch, weights)
        gaps.append((got - verl).abs().max().item())
    assert max(gaps) > 1e-9


def test_verl_gdpo_float_mask_keeps_its_1e_8():
    # With a float64 mask verl's masked_mean divides by tokens + 1e-8 (an int64 mask's sum + 1e-8 is a
    # float32 tensor, where the 1e-8 is lost; the Bessel factor of a float64 mask is float64): the mean
    # and the variance shrink by 1e-8 / L relative (L the batch's tokens), which moves an advantage by at
    # most 1e-8 / L times (max|x| / sqrt(var + 1e-8) + |advantage|), about 1e-10 here, and never to 0.
    rng = random.Random(4)
    gaps = []
    for _ in range(6):
        batch, weights = random_batch(rng, 2, nan=False), random_weights(rng, 2, torch.float64)
        got = run_preset(CASES["verl_gdpo"], _verl_gdpo_build(2, weights, torch.float64), batch, torch.float64)
        verl = verl_gdpo_advantages(batch.ids, batch.rewards, batch.mask.double(), weights)
        gain = _verl_whitening_gain(batch, weights)
        bound = 1e-8 / sum(batch.lengths) * (gain + verl.abs().max().item()) + 1e-12
        gaps.append((got - verl).abs().max().item())
        assert gaps[-1] <= bound, (gaps[-1], bound, batch)
    assert max(gaps) > 1e-13


# -- One reward -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_one_reward_is_the_system_with_one_function(dtype):
    rng = random.Random(5)
    tol = FLOAT64_TOL if dtype == torch.float64 else FLOAT32_TOL
    for step in range(6):
        batch = random_batch(rng, 1, nan=False)
        ids, rewards = _inputs(batch, dtype)  # rewards [N]
        lengths = torch.tensor(batch.lengths)
        # verl_gdpo(P, 1): verl's gdpo with one key (weights ones), and with one weight.
        for weights in (None, random_weights(rng, 1, dtype)):
            tracker = presets.verl_gdpo(NUM_PROMPTS, 1, reward_weights=weights, dtype=dtype)
            got = tracker.update(ids, rewards, weights=lengths)
            verl = verl_gdpo_advantages(batch.ids, batch.rewards, batch.mask, weights, dtype=dtype, exact_bessel=True)
            tol_here = tol if dtype == torch.float64 else float32_tolerance(CASES["verl_gdpo"], batch, weights or [1.0])
            _assert_close(got.unsqueeze(-1) * batch.mask, verl, tol_here, f"verl_gdpo C=1 {weights} {batch}")
        # trl_grpo(P, ..., reward_weights=[w]) on rewards [N]: TRL with one reward function of weight w;
        # reward_weights=None is TRL's default weight 1.
        for weights in (None, random_weights(rng, 1, dtype)):
            for aggregation in ("sum_then_normalize", "normalize_then_sum"):
                for scale in ("group", "batch", "none"):
                    tracker = presets.trl_grpo(
                        NUM_PROMPTS, scale, multi_objective_aggregation=aggregation, reward_weights=weights, dtype=dtype
                    )
                    got = tracker.update(ids, rewards)
                    trl = trl_grpo_multi_advantages(
                        batch.ids, batch.rewards, weights, scale, aggregation, dtype, exact_bessel=True
                    )
                    _assert_close(got, trl, tol, f"trl C=1 {weights} {scale} {aggregation} step {step}")


# -- NeMo-RL's uncentred variance: a departure ------------------------------------------------------------------------


def _bessel_normalised(values: Sequence[float]) -> List[float]:
    """(x - mean) / std with Bessel's std: NeMo-RL's batch normalisation, written out."""
    mean = sum(values) / len(values)
    std = math.sqrt(sum((x - mean) ** 2 for x in values) / (len(values) - 1))
    return [(x - mean) / std for x in values]


@pytest.mark.parametrize("dtype, equal_reward", [(torch.float64, 0.3), (torch.float32, 11.775)])
def test_nemo_rl_uncentred_variance_departure(dtype, equal_reward):
    # Prompt a: rewards A = [v, v, v, 0], prompt b: A = [0, 1, 0, 1] (interleaved); B = 0 everywhere (its
    # part is 0). Leave-one-out: sample a3's others are three equal v, whose variance is 0. NeMo-RL's
    # E[r^2] - E[r]^2 leaves a rounding residue there: in float64 for v = 0.3 one ulp of 0.09, std
    # 2^-28 sqrt(1.5) = 4.6e-9; in float32 (upstream's dtype) for v = 11.775 two ulps of 138.65, std
    # 6.8e-3. So NeMo-RL divides a3's -v by about 1e-6 (float64) or 6.8e-3 and makes it an outlier.
    v = equal_reward
    ids = ["a", "b", "a", "b", "a", "b", "a", "b"]
    rewards = [[v, 0.0], [0.0, 0.0], [v, 0.0], [1.0, 0.0], [v, 0.0], [0.0, 0.0], [0.0, 0.0], [1.0, 0.0]]
    prompt_numbers = torch.tensor([0, 1, 0, 1, 0, 1, 0, 1])
    tracker = presets.nemo_rl_gdpo(2, 2, dtype=dtype)
    got = tracker.update(prompt_numbers, torch.tensor(rewards, dtype=dtype)).double()
    nemo = nemo_rl_gdpo_advantages(ids, rewards, dtype=dtype).double()

    # NeMo-RL's std of a3's others (its helper, on prompt a alone) is positive:
    a_rewards = torch.tensor([v, v, v, 0.0], dtype=dtype)
    _, nemo_std = nemo_rl_calculate_baseline_and_std_per_prompt(
        torch.zeros(4, 1, dtype=torch.int64), a_rewards, torch.ones(4, dtype=dtype), True
    )
    expected_residue = 2**-28 * math.sqrt(1.5) if dtype == torch.float64 else math.sqrt(2**-15 * 1.5)
    assert nemo_std[3].item() == pytest.approx(expected_residue, rel=1e-5)

    # The centred answer, by hand. a0..a2: others [v, v, 0]: mean 2v/3, Bessel variance v^2/3:
    # (v - 2v/3) / (v / sqrt(3) + 1e-6). a3: others all v, std 0, unscaled: 0 - v = -v.
    # b: a reward 0 has others [1, 0, 1] (mean 2/3, variance 1/3), a reward 1 has [0, 0, 1] (mean 1/3,
    # variance 1/3): -+(2/3) / (sqrt(1/3) + 1e-6). Then over the batch: (x - mean) / std, Bessel, no eps.
    k = (v / 3) / (v / math.sqrt(3) + 1e-6)
    b = (2 / 3) / (math.sqrt(1 / 3) + 1e-6)
    combined = [k, -b, k, b, k, -b, -v, b]
    expected = torch.tensor(_bessel_normalised(combined), dtype=torch.float64)
    _assert_close(got, expected, FLOAT64_TOL if dtype == torch.float64 else FLOAT32_TOL, "preset, centred")

    # NeMo-RL: a3's part is -v / (residue + 1e-6): -2.9e5 in float64, -1.7e3 in float32. After the batch
    # normalisation a3 is the lone outlier, (N - 1) / sqrt(N) = 2.47 in magnitude, and the seven others
    # all about 1 / sqrt(8) = 0.354: prompt b's signal is drowned (b1 - b0 is 2.3 / 615 = 0.004 in
    # float32, where the preset keeps 2.3 / 4.4 = 0.53; in float64 2e-5 against 2.46).
    outlier = -v / (expected_residue + 1e-6)
    assert outlier < -1e3
    nemo_combined = [k, -b, k, b, k, -b, outlier, b]
    torch.testing.assert_close(
        nemo, torch.tensor(_bessel_normalised(nemo_combined), dtype=torch.float64), rtol=1e-4, atol=1e-4
    )
    assert nemo[6].item() == pytest.approx(-7 / math.sqrt(8), abs=2e-3)
    others = torch.cat([nemo[:6], nemo[7:]])
    assert (others - 1 / math.sqrt(8)).abs().max() < 5e-3
    assert nemo[3] - nemo[1] < 0.01
    assert got[3] - got[1] > 0.5


# -- verl's low-variance trap (PR #6348) ------------------------------------------------------------------------------

# PR #6348's groups: [1.0, 1.00001] and [2.0, 2.00001], in float32 each a half-gap h = 42 * 2^-23 around
# its mean (1.00001 is 1 + 84 ulps of 1, 2.00001 is 2 + 42 ulps of 2). Centred, the Bessel std is sqrt(2) h;
# the uncentred s2 - s1^2 / n of verl before #6348 cancels to 0 in float32.
TRAP_IDS = [0, 0, 1, 1]
TRAP_REWARDS = [1.0, 1.00001, 2.0, 2.00001]
TRAP_HALF_GAP = 42 * 2**-23


def test_verl_grpo_low_variance_group_is_centred():
    got = presets.verl_grpo(2).update(torch.tensor(TRAP_IDS), torch.tensor(TRAP_REWARDS))
    after = verl_grpo_vectorized_advantages(TRAP_IDS, TRAP_REWARDS)
    before = verl_grpo_vectorized_advantages(TRAP_IDS, TRAP_REWARDS, before_6348=True)
    # h / (sqrt(2) h + 1e-6) = 0.6196 with a centred std; before the fix 0.0050.
    centred = TRAP_HALF_GAP / (math.sqrt(2) * TRAP_HALF_GAP + 1e-6)
    assert got[1].item() == pytest.approx(centred, rel=1e-5)
    torch.testing.assert_close(got, after, rtol=0, atol=1e-6)
    assert (got - before).abs().min().item() > 0.6


def test_verl_gdpo_low_variance_reward_is_centred():
    # Reward 0 is the trap, reward 1 = [0, 1, 1, 0] ([-+0.707] per group): the trap's part is 0.62 next
    # to reward 1's 0.71 (centred) or 0.005 (before #6348), which the whitening does not undo.
    rewards = [[r, s] for r, s in zip(TRAP_REWARDS, [0.0, 1.0, 1.0, 0.0])]
    lengths = [2, 3, 1, 4]
    batch = Batch(TRAP_IDS, rewards, lengths)
    got = presets.verl_gdpo(2, 2).update(torch.tensor(TRAP_IDS), torch.tensor(rewards), weights=torch.tensor(lengths))
    got = got.unsqueeze(-1) * batch.mask

    def whitened(before_6348: bool) -> torch.Tensor:
        """verl's gdpo with the vectorised GRPO per reward, before or after #6348 (float32)."""
        combined = sum(
            verl_grpo_vectorized_advantages(TRAP_IDS, batch.column(c), before_6348=before_6348) for c in range(2)
        )
        return verl_masked_whiten(combined.unsqueeze(-1) * batch.mask, batch.mask) * batch.mask

    torch.testing.assert_close(got, whitened(False), rtol=0, atol=1e-5)
    torch.testing.assert_close(
        got, verl_gdpo_advantages(TRAP_IDS, rewards, batch.mask, dtype=torch.float32), rtol=0, atol=1e-5
    )
    assert (got - whitened(True)).abs().max().item() > 0.1


def test_trl_grpo_low_variance_group_is_centred():
    # TRL's group statistics are verl's group_mean_std's with eps 0 (no floor): centred after #6348, std
    # sqrt(2) h, so h / (sqrt(2) h + 1e-4) = 0.0467; the uncentred numerator of before #6348 is 0 in
    # float32, std 0, h / 1e-4 = 0.0501.
    got = presets.trl_grpo(2).update(torch.tensor(TRAP_IDS), torch.tensor(TRAP_REWARDS))
    trl = trl_grpo_multi_advantages(TRAP_IDS, [[r] for r in TRAP_REWARDS], dtype=torch.float32)
    centred = TRAP_HALF_GAP / (math.sqrt(2) * TRAP_HALF_GAP + 1e-4)
    assert got[1].item() == pytest.approx(centred, rel=1e-5)
    torch.testing.assert_close(got, trl, rtol=0, atol=1e-6)
    scores, groups = torch.tensor(TRAP_REWARDS), torch.tensor(TRAP_IDS)

    def grpo(centered: bool) -> torch.Tensor:
        """(r - mean) / (std + 1e-4) from verl's group_mean_std, centred (after #6348) or not (before)."""
        mean, std, _ = verl_group_mean_std(scores, groups, eps=0.0, centered=centered)
        return (scores - mean[groups]) / (std[groups] + 1e-4)

    torch.testing.assert_close(got, grpo(True), rtol=0, atol=1e-6)
    assert grpo(False)[1].item() == pytest.approx(TRAP_HALF_GAP / 1e-4, rel=1e-5)
    assert (got - grpo(False)).abs().min().item() > 3e-3
