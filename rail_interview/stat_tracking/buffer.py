"""Per-prompt statistics over each prompt's last K rewards, in a ring buffer."""

from __future__ import annotations

import warnings
from typing import Dict, Mapping, Optional, Tuple

import torch

from rail_interview.stat_tracking.base import (
    Device,
    PerPromptStatTracker,
    TrackerStats,
    check_count_range,
    check_positive_int,
    group_by_prompt,
)


def masked_row_mean_std(rows: torch.Tensor, count: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Mean and population std of the first ``count`` entries of each row.

    Two passes (mean, then squared deviations from it), never
    E[x^2] - E[x]^2, so float32 keeps the std of rewards far from zero. What
    float32 cannot keep is a mean finer than its rounding at the rewards'
    magnitude (about 1e-7 relative): when a prompt's spread is below about
    1e-5 of its rewards' magnitude, use ``dtype=torch.float64``.

    Args:
        rows: float [*R, K].
        count: int64 [*R], entries in [0, K]; entries at positions >= count
            are ignored (they must be finite).

    Returns:
        float [*R] mean and float [*R] std; NaN where count is 0.
    """
    slot = torch.arange(rows.shape[-1], device=rows.device)  # [K]
    weight = (slot < count.unsqueeze(-1)).to(rows.dtype)  # [*R, K], 1 for the entries that count
    num = count.to(rows.dtype)  # [*R]
    mean = torch.linalg.vecdot(rows, weight) / num  # [*R]
    deviation = rows - mean.unsqueeze(-1)  # [*R, K]
    std = (torch.linalg.vecdot(deviation.square(), weight) / num).sqrt()  # [*R]
    return mean, std


class BufferStatTracker(PerPromptStatTracker):
    """Normalises rewards with the mean and std of each prompt's last K rewards.

    The semantics are DDPO's (``deque(maxlen=K)`` per prompt), vectorised:

    1. Every reward of the batch is appended to its prompt's buffer, in batch
       order; a prompt seen more than K times in one batch keeps its last K.
    2. A prompt with fewer than ``min_count`` rewards (the batch included) is
       normalised with the whole batch's mean and std, others with their
       buffer's (population std, ddof 0).
    3. advantage = (reward - mean) / (std + eps).

    State, allocated once on ``device``: ``rewards`` [P, K] ring buffer,
    ``count`` [P] (rewards stored, at most K) and ``head`` [P] (next write
    position). While a buffer is not full, its rewards sit at positions
    [0, count) and head == count.

    ``update`` uses sort, searchsorted, gather and index_put only: no Python
    loop over prompts or samples and no host sync (with ``check_values``
    off), so it can be captured in a CUDA graph or compiled with
    ``torch.compile(fullgraph=True)``. Its cost grows with N * K, not with P
    (when P <= N it reads the whole [P, K] buffer once instead, which is then
    less work).

    Args:
        num_prompts: P, the number of distinct prompt ids.
        buffer_size: K, rewards kept per prompt.
        min_count: rewards a prompt needs before its own statistics are used.
            If larger than ``buffer_size`` they never are (a warning says so).
        eps: added to the standard deviation before dividing.
        device: where the state lives; inputs must be on it.
        dtype: floating dtype of the buffer and of the advantages.
        check_values: check ids and rewards (a host sync on a GPU); see
            ``StatTracker``.
        process_group: share statistics across ``torch.distributed`` ranks;
            see ``StatTracker``.

    Raises:
        ValueError: if ``buffer_size`` or another argument is out of range.

    Example:
        >>> tracker = BufferStatTracker(num_prompts=2, buffer_size=4, min_count=2)
        >>> ids = torch.tensor([0, 0, 1])
        >>> tracker.update(ids, torch.tensor([1.0, 3.0, 10.0]))  # prompt 1 falls back to the batch
        tensor([-1.0000,  1.0000,  1.3822])
        >>> tracker.stats().count
        tensor([2, 1])
    """

    def __init__(
        self,
        num_prompts: int,
        buffer_size: int = 32,
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
        check_positive_int("buffer_size", buffer_size)
        if buffer_size < min_count:
            warnings.warn(
                f"buffer_size {buffer_size} < min_count {min_count}: no prompt can ever reach min_count, "
                "so every advantage will use whole-batch statistics",
                stacklevel=2,
            )
        self._buffer_size = buffer_size
        self._rewards = torch.zeros((num_prompts, buffer_size), dtype=dtype, device=self._device)  # [P, K]
        self._count = torch.zeros(num_prompts, dtype=torch.int64, device=self._device)  # [P]
        self._head = torch.zeros(num_prompts, dtype=torch.int64, device=self._device)  # [P]

    @property
    def buffer_size(self) -> int:
        """K, the number of rewards kept per prompt."""
        return self._buffer_size

    def _update(self, prompt_ids: torch.Tensor, rewards: torch.Tensor) -> torch.Tensor:
        num_samples = prompt_ids.shape[0]
        if num_samples == 0:
            return rewards.clone()
        buffer_size = self._buffer_size

        groups = group_by_prompt(prompt_ids)
        sorted_ids = groups.sorted_ids  # [N]
        rank = groups.rank  # [N]

        # Rank r writes slot (head + r) % K. If a prompt repeats more than K times,
        # ranks r + K, r + 2K, ... land on the same slot and the last one must win,
        # so every writer of a slot writes the value of that last one: the result
        # does not depend on the order in which duplicate writes are applied.
        last = groups.end - 1  # [N], sorted position of the prompt's last sample
        winner = last - (last - groups.position) % buffer_size  # [N]
        values = rewards[groups.order[winner]]  # [N]
        head = self._head[sorted_ids]  # [N]
        self._rewards.view(-1)[sorted_ids * buffer_size + (head + rank) % buffer_size] = values
        group_size = groups.size  # [N]
        self._head[sorted_ids] = (head + group_size) % buffer_size
        self._count[sorted_ids] = (self._count[sorted_ids] + group_size).clamp_max(buffer_size)

        if self._num_prompts <= num_samples:
            # Few prompts: one pass over the whole [P, K] buffer is less work
            # than one over the [N, K] rows of the batch.
            prompt_mean, prompt_std = masked_row_mean_std(self._rewards, self._count)  # [P]
            mean, std = prompt_mean[prompt_ids], prompt_std[prompt_ids]  # [N]
        else:
            mean, std = masked_row_mean_std(self._rewards[prompt_ids], self._count[prompt_ids])  # [N]
        return self._advantages(rewards, self._count[prompt_ids], mean, std)

    def stats_snapshot(self, prompt_ids: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """Returns the buffer rows and counts of some prompts (may alias the state).

        Args:
            prompt_ids: int64 [M], or None for all P prompts.

        Returns:
            ``{"rewards": [M, K], "count": [M]}``.
        """
        if prompt_ids is None:
            return {"rewards": self._rewards, "count": self._count}
        return {"rewards": self._rewards[prompt_ids], "count": self._count[prompt_ids]}

    def stats_from_snapshot(self, snapshot: Mapping[str, torch.Tensor]) -> TrackerStats:
        """Computes buffer means and stds; NaN for prompts never seen.

        Args:
            snapshot: ``{"rewards": [*B, M, K], "count": [*B, M]}``.

        Returns:
            TrackerStats of [*B, M] tensors.
        """
        count = snapshot["count"]
        mean, std = masked_row_mean_std(snapshot["rewards"], count)
        return TrackerStats(mean=mean, std=std, count=count.clone(), fallback=count < self._min_count)

    def _state_tensors(self) -> dict[str, torch.Tensor]:
        return {"rewards": self._rewards, "count": self._count, "head": self._head}

    def _check_state_values(self, state: Mapping[str, torch.Tensor]) -> None:
        name = type(self).__name__
        count, head = state["count"], state["head"]
        check_count_range(name, count, self._buffer_size)
        if ((head < 0) | (head >= self._buffer_size)).any():
            raise ValueError(f"{name} state 'head' must lie in [0, {self._buffer_size})")
        if ((count < self._buffer_size) & (head != count)).any():
            raise ValueError(f"{name} state is inconsistent: a buffer that is not full must have head == count")
        if not torch.isfinite(state["rewards"]).all():
            raise ValueError(f"{name} state 'rewards' must be finite")
