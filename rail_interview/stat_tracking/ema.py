"""Per-prompt statistics as exponential moving averages: O(P) state."""

from __future__ import annotations

from typing import Dict, Mapping, Optional

import torch

from rail_interview.stat_tracking.base import Device, PerPromptStatTracker, TrackerStats, check_count_range
from rail_interview.stat_tracking.ops import batch_mean_std, cast, group_by_prompt, segment_sum, write_at


class EmaStatTracker(PerPromptStatTracker):
    """Normalises rewards with per-prompt exponential moving averages.

    Rewards are folded in one at a time, in batch order, per prompt:

    * the first reward ever seen for a prompt: mean = r, var = 0, count = 1;
    * after that: d = r - mean; mean += (1 - decay) * d;
      var = decay * (var + (1 - decay) * d * d); count += 1.

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

    Args:
        num_prompts: P, the number of distinct prompt ids.
        decay: weight kept by the old statistics at each reward, in (0, 1).
            The default, 0.7, is the best of the toy problem's sweep (see
            the README).
        min_count: rewards a prompt needs before its own statistics are used.
        eps: added to the standard deviation before dividing.
        device: where the state lives; inputs must be on it.
        dtype: floating dtype of the state and of the advantages.
        check_values: check ids and rewards (a host sync on a GPU); see
            ``StatTracker``.
        process_group: share statistics across ``torch.distributed`` ranks;
            see ``StatTracker``.

    Raises:
        ValueError: if ``decay`` is not in (0, 1) or another argument is out
            of range.

    Example:
        >>> tracker = EmaStatTracker(num_prompts=2, decay=0.75, min_count=2)
        >>> # Prompt 0: mean 1 + 0.25 * 4 = 2, var 0.75 * (0.25 * 4**2) = 3.
        >>> # Prompt 1 falls back to the batch's mean and std.
        >>> tracker.update(torch.tensor([0, 0, 1]), torch.tensor([1.0, 5.0, 10.0]))
        tensor([-0.5773,  1.7320,  1.2675])
        >>> stats = tracker.stats()
        >>> stats.mean, stats.std, stats.count
        (tensor([ 2., 10.]), tensor([1.7321, 0.0000]), tensor([2, 1]))
    """

    def __init__(
        self,
        num_prompts: int,
        decay: float = 0.7,
        min_count: int = 16,
        *,
        eps: float = 1e-6,
        device: Device = None,
        dtype: torch.dtype = torch.float32,
        check_values: bool = True,
        process_group: Optional["torch.distributed.ProcessGroup"] = None,
    ) -> None:
        super().__init__(
            num_prompts, min_count=min_count, eps=eps, device=device, dtype=dtype, check_values=check_values,
            process_group=process_group,
        )
        if not 0.0 < decay < 1.0:
            raise ValueError(f"decay must lie in (0, 1), got {decay!r}")
        self._decay = float(decay)
        self._mean = torch.zeros(num_prompts, dtype=dtype, device=self._device)  # [P]
        self._var = torch.zeros(num_prompts, dtype=dtype, device=self._device)  # [P]
        self._count = torch.zeros(num_prompts, dtype=torch.int64, device=self._device)  # [P]

    @property
    def decay(self) -> float:
        """Weight kept by the old statistics at each reward."""
        return self._decay

    def _update(self, prompt_ids: torch.Tensor, rewards: torch.Tensor) -> torch.Tensor:
        if len(prompt_ids) == 0:  # pragma: no mutate (an empty batch also passes the general path)
            return rewards.clone()
        decay = self._decay
        compute = self._compute_dtype  # float32 for 16-bit state
        groups = group_by_prompt(prompt_ids, self._num_prompts)
        sorted_ids, start = groups.sorted_ids, groups.start  # [N], [N]
        rewards = cast(rewards, compute)  # [N]
        sorted_rewards = rewards.index_select(0, groups.order)  # [N]; pragma: no mutate (1-D: dim 0 is dim -1)

        # A prompt seen for the first time starts from its first reward with
        # variance 0; folding that same reward in again then changes nothing.
        old_count = self._count.index_select(0, sorted_ids)  # [N]; pragma: no mutate (1-D: dim 0 is dim -1)
        unseen = old_count == 0  # [N]
        old_mean = torch.where(  # pragma: no mutate (1-D: dim 0 is dim -1)
            unseen, sorted_rewards.index_select(0, start), cast(self._mean.index_select(0, sorted_ids), compute)
        )  # [N]
        old_var = torch.where(unseen, 0.0, cast(self._var.index_select(0, sorted_ids), compute))  # [N]

        # Closed form of the sequential fold, in coordinates shifted by the old mean.
        shifted = sorted_rewards - old_mean  # [N]
        weight = (1.0 - decay) * torch.pow(decay, (groups.end - 1 - groups.position).to(compute))  # [N]
        shift = segment_sum(weight * shifted, groups)  # [N], new mean - old mean
        spread = segment_sum(weight * (shifted - shift).square(), groups)  # [N]
        old_weight = torch.pow(decay, groups.size.to(compute))  # [N], decay ** n
        mean = old_mean + shift  # [N]
        var = old_weight * (old_var + shift.square()) + spread  # [N]
        count = old_count + groups.size  # [N]
        write_at(self._mean, sorted_ids, mean)
        write_at(self._var, sorted_ids, var)
        write_at(self._count, sorted_ids, count)

        center, scale = self._center_and_scale(count, mean, var.sqrt(), *batch_mean_std(rewards))  # [N], [N]
        return groups.unsort(cast((sorted_rewards - center).div_(scale), self._dtype))

    def stats_snapshot(self, prompt_ids: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """Returns the moving mean, variance and count of some prompts (may alias the state).

        Args:
            prompt_ids: int64 [M], or None for all P prompts.

        Returns:
            ``{"mean": [M], "var": [M], "count": [M]}``.
        """
        state = self._state_tensors()
        if prompt_ids is None:
            return state
        return {name: tensor[prompt_ids] for name, tensor in state.items()}

    def stats_from_snapshot(self, snapshot: Mapping[str, torch.Tensor]) -> TrackerStats:
        """Computes stds from variances; NaN for prompts never seen.

        Args:
            snapshot: ``{"mean": [*B, M], "var": [*B, M], "count": [*B, M]}``.

        Returns:
            TrackerStats of [*B, M] tensors.
        """
        count = snapshot["count"]
        seen = count > 0
        std = snapshot["var"].to(self._compute_dtype).sqrt().to(self._dtype)
        return TrackerStats(
            mean=torch.where(seen, snapshot["mean"], float("nan")),
            std=torch.where(seen, std, float("nan")),
            count=count.clone(),
            fallback=count < self._min_count,
        )

    def _state_tensors(self) -> dict[str, torch.Tensor]:
        return {"mean": self._mean, "var": self._var, "count": self._count}

    def _check_state_values(self, state: Mapping[str, torch.Tensor]) -> None:
        name = type(self).__name__
        check_count_range(name, state["count"])
        if not (torch.isfinite(state["mean"]).all() and torch.isfinite(state["var"]).all()):
            raise ValueError(f"{name} state 'mean' and 'var' must be finite")
        if (state["var"] < 0).any():
            raise ValueError(f"{name} state 'var' must be non-negative")
