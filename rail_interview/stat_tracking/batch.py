"""Whole-batch normalisation: the baseline that per-prompt tracking beats."""

from __future__ import annotations

from typing import Dict, Mapping, Optional

import torch

from rail_interview.stat_tracking.base import Device, StatTracker, TrackerStats
from rail_interview.stat_tracking.ops import batch_mean_std, cast


class BatchStatTracker(StatTracker):
    """Normalises every reward with the mean and std of its whole batch.

    This is what the toy problem did before per-prompt tracking: it keeps no
    state, so every prompt always "falls back" to batch statistics. It exists
    so that a trainer treats every method alike.

    Args:
        num_prompts: P, the number of distinct prompt ids (ids are checked
            against it, otherwise unused).
        eps: added to the standard deviation before dividing. The default,
            1e-7, is the original toy problem's.
        device: where inputs are expected.
        dtype: floating dtype of the advantages (statistics are computed in
            float32 for float16 and bfloat16).
        check_values: see ``StatTracker``.
        process_group: share statistics across ``torch.distributed`` ranks;
            see ``StatTracker``.

    Example:
        >>> tracker = BatchStatTracker(num_prompts=2)
        >>> tracker.update(torch.tensor([0, 0, 1, 1]), torch.tensor([1.0, 3.0, 5.0, 7.0]))
        tensor([-1.3416, -0.4472,  0.4472,  1.3416])
    """

    def __init__(
        self,
        num_prompts: int,
        *,
        eps: float = 1e-7,
        device: Device = None,
        dtype: torch.dtype = torch.float32,
        check_values: bool = True,
        process_group: Optional["torch.distributed.ProcessGroup"] = None,
    ) -> None:
        super().__init__(num_prompts, eps=eps, device=device, dtype=dtype, check_values=check_values,
                         process_group=process_group)

    def _update(self, prompt_ids: torch.Tensor, rewards: torch.Tensor) -> torch.Tensor:
        if rewards.numel() == 0:
            return rewards.clone()
        rewards = cast(rewards, self._compute_dtype)  # [N], float32 for 16-bit dtypes
        mean, std = batch_mean_std(rewards)
        return cast((rewards - mean) / (std + self._eps), self._dtype)

    def stats_snapshot(self, prompt_ids: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """Returns the per-prompt count, always zero: nothing is tracked.

        Args:
            prompt_ids: int64 [M], or None for all P prompts.

        Returns:
            ``{"count": zeros [M]}``.
        """
        size = self._num_prompts if prompt_ids is None else len(prompt_ids)
        return {"count": torch.zeros(size, dtype=torch.int64, device=self._device)}

    def stats_from_snapshot(self, snapshot: Mapping[str, torch.Tensor]) -> TrackerStats:
        """Returns NaN means and stds, zero counts and fallback everywhere.

        Args:
            snapshot: ``{"count": [*B, M]}``.

        Returns:
            TrackerStats of [*B, M] tensors.
        """
        count = snapshot["count"]
        nan = torch.full(count.shape, float("nan"), dtype=self._dtype, device=count.device)
        return TrackerStats(mean=nan, std=nan.clone(), count=torch.zeros_like(count),
                            fallback=torch.ones_like(count, dtype=torch.bool))

    def _fallback_mask(self, prompt_ids: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(prompt_ids, dtype=torch.bool)

    def _state_tensors(self) -> dict[str, torch.Tensor]:
        return {}
