"""Per-prompt statistics as exponential moving averages: O(P) state."""

from __future__ import annotations

from typing import Dict, Mapping, Optional

import torch

from rail_interview.stat_tracking.base import (
    Device,
    PerPromptStatTracker,
    TrackerStats,
    batch_mean_std,
    check_count_range,
    group_by_prompt,
    write_at,
)


def segment_sum(values: torch.Tensor, start: torch.Tensor, end: torch.Tensor, *, scan: bool) -> torch.Tensor:
    """Sums ``values`` over each prompt group and hands every member the sum.

    Two algorithms, the same result up to float rounding:

    * ``scan=False``: ``index_add_`` into the group starts. On a CPU it adds
      sequentially, so it is deterministic, and it is the fewer ops.
    * ``scan=True``: differences of a float64 cumulative sum (the groups are
      contiguous in sorted order). No atomics, so deterministic on CUDA too,
      where ``index_add_`` rounds differently from run to run.

    Args:
        values: float [N], in sorted-batch order.
        start: int64 [N], each sample's group start (``PromptGroups.start``).
        end: int64 [N], one past each sample's group end (``PromptGroups.end``).
        scan: which algorithm.

    Returns:
        float [N] of ``values.dtype``, the sum over the sample's group.
    """
    if not scan:
        return torch.zeros_like(values).index_add_(0, start, values).index_select(0, start)
    running = torch.zeros(values.shape[0] + 1, dtype=torch.float64, device=values.device)  # [N + 1]
    torch.cumsum(values.to(torch.float64), 0, out=running[1:])
    return (running.index_select(0, end) - running.index_select(0, start)).to(values.dtype)


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
    magnitude, use ``dtype=torch.float64``. No
    Python loop over prompts or samples, no host sync (with ``check_values``
    off); cost grows with N, not with P. Group sums avoid float atomics on
    CUDA, so the state is the same bit for bit from run to run there too.

    State, allocated once on ``device``: ``mean`` [P], ``var`` [P] and
    ``count`` [P] (rewards seen, int64).

    Args:
        num_prompts: P, the number of distinct prompt ids.
        decay: weight kept by the old statistics at each reward, in (0, 1).
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
        >>> tracker = EmaStatTracker(num_prompts=2, decay=0.5, min_count=2)
        >>> tracker.update(torch.tensor([0, 0, 1]), torch.tensor([1.0, 3.0, 10.0]))
        tensor([-1.0000,  1.0000,  1.3822])
        >>> stats = tracker.stats()
        >>> stats.mean, stats.std, stats.count
        (tensor([ 2., 10.]), tensor([1., 0.]), tensor([2, 1]))
    """

    def __init__(
        self,
        num_prompts: int,
        decay: float = 0.9,
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
        if prompt_ids.shape[0] == 0:
            return rewards.clone()
        decay = self._decay
        groups = group_by_prompt(prompt_ids, self._num_prompts)
        sorted_ids, start = groups.sorted_ids, groups.start  # [N], [N]
        sorted_rewards = rewards.index_select(0, groups.order)  # [N]

        # A prompt seen for the first time starts from its first reward with
        # variance 0; folding that same reward in again then changes nothing.
        old_count = self._count.index_select(0, sorted_ids)  # [N]
        unseen = old_count == 0  # [N]
        old_mean = torch.where(unseen, sorted_rewards.index_select(0, start), self._mean.index_select(0, sorted_ids))
        old_var = torch.where(unseen, 0.0, self._var.index_select(0, sorted_ids))  # [N]

        # Closed form of the sequential fold, in coordinates shifted by the old mean.
        shifted = sorted_rewards - old_mean  # [N]
        weight = (1.0 - decay) * torch.pow(decay, (groups.end - 1 - groups.position).to(rewards.dtype))  # [N]
        scan = rewards.is_cuda  # deterministic sums where index_add_ is not
        shift = segment_sum(weight * shifted, start, groups.end, scan=scan)  # [N], new mean - old mean
        spread = segment_sum(weight * (shifted - shift).square(), start, groups.end, scan=scan)  # [N]
        old_weight = torch.pow(decay, groups.size.to(rewards.dtype))  # [N], decay ** n
        mean = old_mean + shift  # [N]
        var = old_weight * (old_var + shift.square()) + spread  # [N]
        count = old_count + groups.size  # [N]
        write_at(self._mean, sorted_ids, mean)
        write_at(self._var, sorted_ids, var)
        write_at(self._count, sorted_ids, count)

        center, scale = self._center_and_scale(count, mean, var.sqrt(), *batch_mean_std(rewards))  # [N], [N]
        return groups.unsort((sorted_rewards - center).div_(scale))

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
        return TrackerStats(
            mean=torch.where(seen, snapshot["mean"], float("nan")),
            std=torch.where(seen, snapshot["var"].sqrt(), float("nan")),
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
