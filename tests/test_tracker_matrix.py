"""Every tracker x dtype x forced algorithm x awkward case, against a float64 reference.

The reference is rebuilt from the tracker's own state before every update,
so each step is checked on its own: the tolerance is that of one step's
rounding in the tracker's dtype, never an error grown over many steps. Per
sample it is scaled by the magnitudes that enter that sample's statistics
(its prompt's, or the batch's when it falls back), so an error that leaks
from one prompt's magnitudes into another's (as differences of one running
sum over the sorted batch did) fails.

Long exact sequences in float64 are in the per-tracker test files; the
property-based test at the end draws random sequences over every dimension.
"""

import collections
import functools
import math
from typing import Callable, Dict, List, Tuple

import hypothesis
import pytest
import torch
from algorithm_choices import ALGORITHM_CHOICES
from hypothesis import strategies as st

from rail_interview.stat_tracking import (
    BatchStatTracker,
    BufferStatTracker,
    EmaStatTracker,
    ReferenceBufferStatTracker,
    ReferenceEmaStatTracker,
    StatTracker,
    ops,
)
from rail_interview.stat_tracking.reference import mean_std

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


TrackerFactory = Callable[..., StatTracker]  # (dtype=, device=) -> tracker

#: Sizes chosen to reach every branch: K a power of two, even but not one
#: (6), and 1; P <= N (one pass over the whole buffer) and P > N (rows).
TRACKERS: Dict[str, TrackerFactory] = {
    "buffer_K4_P5": functools.partial(BufferStatTracker, 5, buffer_size=4, min_count=2),
    "buffer_K6_P50": functools.partial(BufferStatTracker, 50, buffer_size=6, min_count=3),
    "buffer_K1_P3": functools.partial(BufferStatTracker, 3, buffer_size=1, min_count=1),
    "ema_0.7_P5": functools.partial(EmaStatTracker, 5, decay=0.7, min_count=2),
    "ema_0.95_P50": functools.partial(EmaStatTracker, 50, decay=0.95, min_count=3),
    "batch_P5": functools.partial(BatchStatTracker, 5),
}


class _ReferenceBatch:
    """Whole-batch normalisation in Python floats, for ``BatchStatTracker``."""

    def __init__(self, eps: float) -> None:
        self.eps = eps

    def update(self, prompts: list, rewards: List[float]) -> List[float]:
        if not rewards:
            return []
        mean, std = mean_std(rewards)
        return [(r - mean) / (std + self.eps) for r in rewards]


def _reference_from(tracker: StatTracker):
    """A plain reference tracker holding exactly the tracker's current state (in float64)."""
    state = {
        name: tensor.double() if tensor.is_floating_point() else tensor for name, tensor in tracker.state_dict().items()
    }
    if isinstance(tracker, BufferStatTracker):
        reference = ReferenceBufferStatTracker(tracker.buffer_size, tracker.min_count, eps=tracker.eps)
        for prompt in range(tracker.num_prompts):
            count, head = int(state["count"][prompt]), int(state["head"][prompt])
            row = state["rewards"][prompt].tolist()
            if count:
                oldest_first = row[:count] if count < tracker.buffer_size else row[head:] + row[:head]
                reference.buffers[prompt] = collections.deque(oldest_first, maxlen=tracker.buffer_size)
        return reference
    if isinstance(tracker, EmaStatTracker):
        reference = ReferenceEmaStatTracker(tracker.decay, tracker.min_count, eps=tracker.eps)
        for prompt in range(tracker.num_prompts):
            count = int(state["count"][prompt])
            if count:
                reference.moments[prompt] = [float(state["mean"][prompt]), float(state["var"][prompt]), count]
        return reference
    return _ReferenceBatch(tracker.eps)


def _center_spread_magnitude(tracker, reference, prompts, rewards) -> List[Tuple[float, float, float]]:
    """Per sample: the reference's center and std, and the largest magnitude behind them."""
    batch_mean, batch_std = mean_std(rewards)
    batch_magnitude = max(abs(r) for r in rewards)
    out = []
    for prompt, reward in zip(prompts, rewards):
        if isinstance(reference, ReferenceBufferStatTracker) and len(reference.buffers[prompt]) >= tracker.min_count:
            values = reference.buffers[prompt]
            mean, std = mean_std(values)
            out.append((mean, std, max(abs(v) for v in values)))
        elif isinstance(reference, ReferenceEmaStatTracker) and reference.moments[prompt][2] >= tracker.min_count:
            mean, var, _ = reference.moments[prompt]
            group = [r for p, r in zip(prompts, rewards) if p == prompt]
            out.append((mean, math.sqrt(var), max(abs(mean), *(abs(r) for r in group)) + math.sqrt(var)))
        else:
            out.append((batch_mean, batch_std, batch_magnitude))
    return out


def _check_step(tracker: StatTracker, ids: torch.Tensor, rewards: torch.Tensor) -> None:
    """One update of ``tracker`` against a float64 reference that starts from its state."""
    reference = _reference_from(tracker)
    prompts = ids.tolist()
    seen = rewards.to(tracker.dtype).double().tolist()  # the rewards as the tracker's dtype holds them
    advantages = tracker.update(ids.to(tracker.device), rewards.to(tracker.device)).cpu()
    assert advantages.dtype == tracker.dtype and advantages.shape == ids.shape
    expected = reference.update(prompts, seen)
    if not prompts:
        return
    out_eps = torch.finfo(tracker.dtype).eps
    out_max = torch.finfo(tracker.dtype).max
    compute_eps = torch.finfo(ops.compute_dtype(tracker.dtype)).eps
    terms = len(prompts) + getattr(tracker, "buffer_size", 0) + 4
    stats = _center_spread_magnitude(tracker, reference, prompts, seen)
    for i, (got, want, (_, std, magnitude)) in enumerate(zip(advantages.double().tolist(), expected, stats)):
        if abs(want) > out_max:  # the answer does not fit the dtype: an infinity of the right sign
            assert got == math.copysign(math.inf, want), (i, got, want)
            continue
        tolerance = 2 * out_eps * abs(want) + 4 * terms * compute_eps * magnitude / (std + tracker.eps) + 1e-12
        assert math.isfinite(got) and abs(got - want) <= tolerance, (i, got, want, tolerance)
    _check_state(tracker, reference, out_eps, compute_eps * 4 * terms)


def _check_state(tracker: StatTracker, reference, out_eps: float, compute_tolerance: float) -> None:
    """The tracker's state after the update against the reference's."""
    after = _reference_from(tracker)
    subnormal_step = torch.finfo(tracker.dtype).smallest_normal * out_eps  # absolute rounding near 0
    if isinstance(tracker, BufferStatTracker):
        # Rewards are stored as given (rounded to the dtype), in order: exactly.
        assert {p: list(d) for p, d in after.buffers.items()} == {p: list(d) for p, d in reference.buffers.items()}
    elif isinstance(tracker, EmaStatTracker):
        assert after.moments.keys() == reference.moments.keys()
        for prompt, (mean, var, count) in reference.moments.items():
            got_mean, got_var, got_count = after.moments[prompt]
            magnitude = abs(mean) + math.sqrt(var) + 1e-30
            assert got_count == count
            mean_tolerance = out_eps * abs(mean) + compute_tolerance * magnitude + subnormal_step
            var_tolerance = 2 * out_eps * var + 4 * compute_tolerance * magnitude**2 + subnormal_step
            assert abs(got_mean - mean) <= mean_tolerance, (prompt, got_mean, mean)
            assert abs(got_var - var) <= var_tolerance, (prompt, got_var, var)


def _scale_for(dtype: torch.dtype, value: float) -> float:
    """``value``, or the largest magnitude the dtype comfortably holds if smaller."""
    return min(value, torch.finfo(dtype).max / 4)


def _cases(num_prompts: int, buffer_size: int, dtype: torch.dtype, seed: int):
    """Named sequences of batches: (ids [N], rewards float64 [N]) lists."""
    generator = torch.Generator().manual_seed(seed)

    def ids(size, high=num_prompts):
        return torch.randint(high, (size,), generator=generator)

    def noise(size):
        return torch.randn(size, generator=generator, dtype=torch.float64)

    sizes = [1, 7, 20, 3, 40]
    # float16 holds variances up to 65504, so a std of at most about 255.
    widest = 64.0 if dtype == torch.float16 else 1e8
    many = 3 * buffer_size + 2
    return {
        "random": [(ids(n), noise(n) * 10 - 50) for n in sizes],
        "huge_offset": [(ids(n), _scale_for(dtype, 1e7) + noise(n)) for n in sizes],
        "constant": [(ids(n), torch.full((n,), 3.7, dtype=torch.float64)) for n in sizes],
        "one_prompt": [(torch.zeros(n, dtype=torch.int64), noise(n) * 3 + 1) for n in (1, many, 2)],
        "repeated_more_than_K": [
            (
                torch.cat([ids(5), torch.full((many,), num_prompts - 1)])[
                    torch.randperm(5 + many, generator=generator)
                ],
                noise(5 + many) * 100,
            )
            for _ in range(3)
        ],
        "spread_near_sqrt_eps": [(ids(n), 5 + 1e-3 * noise(n)) for n in sizes],
        # Prompts whose spreads differ by orders of magnitude, the widest
        # sorted first: an error that scales with other prompts' rewards shows.
        "mixed_magnitudes": [(i, noise(n) * widest * 1e-3 ** (i % 4)) for n in sizes for i in [ids(n)]],
        "empty_then_one": [(ids(0), noise(0)), (ids(1), noise(1))],
    }


def _check_every_case(kind: str, dtype: torch.dtype, device: str) -> None:
    """Runs every case of ``_cases`` through a fresh tracker of ``kind``, step by step."""
    num_prompts = TRACKERS[kind](dtype=dtype).num_prompts
    for name, batches in _cases(num_prompts, 6, dtype, seed=len(kind)).items():
        tracker = TRACKERS[kind](dtype=dtype, device=device)
        for step, (ids, rewards) in enumerate(batches):
            try:
                _check_step(tracker, ids, rewards)
            except AssertionError as error:
                raise AssertionError(f"case {name!r}, step {step}: {error}") from error


@pytest.mark.filterwarnings("ignore:min_count=1")
@pytest.mark.parametrize("algorithms", ALGORITHM_CHOICES, ids=lambda c: "-".join(c.values()))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", sorted(TRACKERS))
def test_every_tracker_dtype_and_algorithm_matches_the_reference(kind, dtype, algorithms):
    with ops.forced_algorithms(**algorithms):
        _check_every_case(kind, dtype, "cpu")


@pytest.mark.filterwarnings("ignore:min_count=1")
@hypothesis.settings(max_examples=60, deadline=None, derandomize=True)
@hypothesis.given(data=st.data())
def test_random_sequences_over_every_dimension(data):
    kind = data.draw(st.sampled_from(sorted(TRACKERS)), label="tracker")
    dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
    algorithms = data.draw(st.sampled_from(ALGORITHM_CHOICES), label="algorithms")
    tracker = TRACKERS[kind](dtype=dtype)
    magnitude = data.draw(st.sampled_from([1e-3, 1.0, 100.0, 3e4]), label="magnitude")
    if dtype == torch.float16 and isinstance(tracker, EmaStatTracker):
        magnitude = min(magnitude, 100.0)  # its stored variance must stay below 65504 (documented)
    for _ in range(data.draw(st.integers(1, 6), label="steps")):
        size = data.draw(st.integers(0, 30), label="size")
        ids = data.draw(st.lists(st.integers(0, tracker.num_prompts - 1), min_size=size, max_size=size))
        rewards = data.draw(st.lists(st.floats(-1, 1), min_size=size, max_size=size))
        offset = data.draw(st.sampled_from([0.0, magnitude]), label="offset")
        ids = torch.tensor(ids, dtype=torch.int64)
        # Per prompt, magnitudes from 1 down to 1e-6 of the largest.
        per_prompt = data.draw(st.booleans(), label="per-prompt magnitudes")
        scale = magnitude * torch.tensor(0.01, dtype=torch.float64) ** (ids % 4) if per_prompt else magnitude
        with ops.forced_algorithms(**algorithms):
            _check_step(tracker, ids, torch.tensor(rewards, dtype=torch.float64) * scale + offset)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.filterwarnings("ignore:min_count=1")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", sorted(TRACKERS))
def test_cuda_matches_the_reference(kind, dtype):
    # The algorithms CUDA picks by itself (segment_reduce, scans), on CUDA.
    _check_every_case(kind, dtype, "cuda")
