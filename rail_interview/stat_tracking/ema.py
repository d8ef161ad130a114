"""Per-prompt statistics as exponential moving averages: O(P) state."""

from __future__ import annotations

from typing import Any

from rail_interview.stat_tracking.tracker import COMMON_OPTIONS, AdvantageTracker, only_options


class EmaStatTracker(AdvantageTracker):
    """Normalises rewards with per-prompt exponential moving averages.

    Rewards are folded in one at a time, in batch order, per prompt:

    * the first reward ever seen for a prompt: mean = r, var = 0, count = 1;
    * after that: d = r - mean; mean += (1 - decay) * d;
      var = decay * (var + (1 - decay) * d * d); count += 1.

    It is ``AdvantageTracker(memory="ema")`` with DDPO's estimator.
    Then advantage = (reward - mean) / (sqrt(var) + eps) with the updated
    statistics, or with the whole batch's mean and std while the prompt's
    count is below ``min_count``. A reward's weight halves about every
    ``0.69 / (1 - decay)`` rewards of its prompt.

    The update is vectorised exactly, repeats of a prompt in one batch
    included: each step mixes the old distribution (weight ``decay``) with a
    point mass at r (weight ``1 - decay``), so n steps give the old mean and
    variance weight ``decay**n`` and the i-th of n rewards weight
    ``(1 - decay) * decay**(n - 1 - i)``. Sums are taken of rewards shifted by
    the old mean (never E[r^2] - E[r]^2), so float32 keeps the variance of
    rewards far from zero; for spreads below about 1e-5 of the rewards'
    magnitude, use ``dtype=torch.float64``. No Python loop over prompts or
    samples, no host sync (with ``check_values`` off); cost grows with N,
    not with P. Group sums add each group's own terms in a fixed order
    (``ops.segment_sum``), so the state is the same bit for bit from run to
    run on CUDA too.

    Low precision: the state is stored in ``dtype``, but the fold runs in
    float32 for float16 and bfloat16 (decay weights, deviations and their
    squares). What remains is the rounding of the stored state to about 3
    significant digits after each update: with ``decay`` close to 1 and few
    rewards of a prompt per batch, a change of the mean or variance smaller
    than about 2**-8 of its value (bfloat16; 2**-11 in float16) is rounded
    away, so prefer float32 state for ``decay`` above about 0.99. float16
    state also caps the variance at 65504 (a std of about 255): scale
    rewards below that or use bfloat16.

    State, allocated once on ``device``: ``mean`` [P], ``var`` [P] and
    ``count`` [P] (rewards seen, int64).

    Signature: ``EmaStatTracker(num_prompts, decay=0.7, min_count=16, *,
    eps=1e-6, device=None, dtype=torch.float32, check_values=True,
    process_group=None, keys="ids")``.

    Args:
        num_prompts: P, the number of distinct prompt ids.
        decay: weight kept by the old statistics at each reward, in (0, 1).
        min_count: rewards a prompt needs before its own statistics are used.
        **options: keyword-only: ``eps`` (added to the standard deviation
            before dividing, default 1e-6), ``device``, ``dtype`` (of the
            state and the advantages), ``check_values``, ``process_group``
            and ``keys``, as for ``AdvantageTracker``.

    Raises:
        ValueError: if ``decay`` is not in (0, 1) or another argument is out
            of range.

    Example:
        >>> import torch
        >>> tracker = EmaStatTracker(num_prompts=2, decay=0.75, min_count=2)
        >>> # Prompt 0: mean 1 + 0.25 * 4 = 2, var 0.75 * (0.25 * 4**2) = 3.
        >>> # Prompt 1 falls back to the batch's mean and std.
        >>> tracker.update(torch.tensor([0, 0, 1]), torch.tensor([1.0, 5.0, 10.0]))
        tensor([-0.5773,  1.7320,  1.2675])
        >>> stats = tracker.stats()
        >>> stats.mean, stats.std, stats.count
        (tensor([ 2., 10.]), tensor([1.7321, 0.0000]), tensor([2, 1]))
        >>> tracker
        EmaStatTracker(num_prompts=2, decay=0.75, min_count=2, eps=1e-06, keys='ids', dtype=torch.float32, device=cpu)
    """

    _repr_options = ("num_prompts", "decay", "min_count", "eps", "keys", "dtype", "device")

    def __init__(self, num_prompts: int, decay: float = 0.7, min_count: int = 16, **options: Any) -> None:
        options = only_options(type(self).__name__, options, ("eps", *COMMON_OPTIONS))
        super().__init__(num_prompts, "ema", decay=decay, min_count=min_count, **options)

    @property
    def decay(self) -> float:
        """Weight kept by the old statistics at each reward."""
        return self._memory.decay
