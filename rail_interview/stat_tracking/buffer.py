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
)
from rail_interview.stat_tracking.ops import (
    batch_mean_std,
    cast,
    group_by_prompt,
    is_compiling,
    write_at,
)

#: The largest buffer_size: the row statistics count entries in float32,
#: which holds every integer up to 2**24 exactly.
MAX_BUFFER_SIZE = 2**24


def masked_row_mean_std(
    rows: torch.Tensor, count: torch.Tensor, *, overwrite: bool = False
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Mean and population std of the first ``count`` entries of each row.

    Two passes (mean, then deviations from it), never E[x^2] - E[x]^2, so
    float32 keeps the std of rewards far from zero; the std is a norm, so
    squares cannot overflow. What float32 cannot keep is a mean finer than
    its rounding at the rewards' magnitude (about 1e-7 relative): when a
    prompt's spread is below about 1e-5 of its rewards' magnitude, use
    ``dtype=torch.float64``.

    Args:
        rows: float32 or float64 [*R, K] (accumulate 16-bit buffers in
            float32: see ``ops.compute_dtype``), K <= ``MAX_BUFFER_SIZE``;
            entries at positions >= count must be 0, as they are in
            ``BufferStatTracker``'s buffer.
        count: int64 [*R], entries in [0, K].
        overwrite: work in ``rows``' memory, which is then garbage. One
            [*R, K] temporary fewer: on a CPU, every fresh one of more than a
            few hundred KB can cost page faults.

    Returns:
        float [*R] mean and float [*R] std; NaN where count is 0.
    """
    buffer_size = rows.shape[-1]
    num = count.to(rows.dtype)  # [*R]
    # 1 for the entries that count, 0 for the others, in float arithmetic:
    # several times faster than a bool mask of [*R, K] converted to float.
    # Exact while the dtype holds every integer up to K (MAX_BUFFER_SIZE).
    slot = torch.arange(buffer_size, dtype=rows.dtype, device=rows.device)  # [K]
    weight = (num.unsqueeze(-1) - slot).clamp_(0, 1)  # [*R, K]
    mean = rows.sum(-1) / num  # [*R], entries past count add 0
    # x - mean where x counts, 0 (= x) elsewhere: one pass, written over rows
    # if allowed, else over the weight (which is not needed after this).
    deviation = torch.addcmul(rows, mean.unsqueeze(-1), weight, value=-1, out=rows if overwrite else weight)
    std = torch.linalg.vector_norm(deviation, dim=-1).div_(num.sqrt())  # [*R]
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
    [0, count) and head == count. Internally one int64 [P] counter,
    ``seen``, holds both: count = min(seen, K) and head = seen % K.

    ``update`` is built from tensor ops (sort, searchsorted or scans, gather,
    scatter, elementwise arithmetic): no Python loop over prompts or samples
    and no host sync (with ``check_values`` off), so it can be captured in a
    CUDA graph or compiled with ``torch.compile(fullgraph=True)``. Its cost
    grows with N * K, not with P: it reads the [N, K] buffer rows of the
    batch's samples, or the whole [P, K] buffer once when P <= N, which is
    then less work.

    Args:
        num_prompts: P, the number of distinct prompt ids.
        buffer_size: K, rewards kept per prompt, at most ``MAX_BUFFER_SIZE``.
        min_count: rewards a prompt needs before its own statistics are used.
            If larger than ``buffer_size`` they never are (a warning says so).
        eps: added to the standard deviation before dividing.
        device: where the state lives; inputs must be on it.
        dtype: floating dtype of the buffer and of the advantages. Rewards
            are stored in it; statistics are accumulated in float32 for
            float16 and bfloat16 (see the ``base`` module for what each
            dtype can represent).
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
        if buffer_size > MAX_BUFFER_SIZE:
            raise ValueError(f"buffer_size must be at most {MAX_BUFFER_SIZE}, got {buffer_size}")
        if buffer_size < min_count:
            warnings.warn(
                f"buffer_size {buffer_size} < min_count {min_count}: no prompt can ever reach min_count, "
                "so every advantage will use whole-batch statistics",
                stacklevel=2,
            )
        self._buffer_size = buffer_size
        # The P * K buffer slots, then one scratch slot that takes the writes of
        # rewards pushed out within their own batch (a prompt seen more than K
        # times): one scatter writes the batch, whatever the order of its writes.
        self._slots = torch.zeros(num_prompts * buffer_size + 1, dtype=dtype, device=self._device)  # [P * K + 1]
        self._rewards = self._slots[:-1].view(num_prompts, buffer_size)  # [P, K]
        self._seen = torch.zeros(num_prompts, dtype=torch.int64, device=self._device)  # [P]

    @property
    def buffer_size(self) -> int:
        """K, the number of rewards kept per prompt."""
        return self._buffer_size

    def _update(self, prompt_ids: torch.Tensor, rewards: torch.Tensor) -> torch.Tensor:
        num_samples = len(prompt_ids)
        if num_samples == 0:
            return rewards.clone()
        num_prompts, buffer_size = self._num_prompts, self._buffer_size
        groups = group_by_prompt(prompt_ids, num_prompts)
        sorted_ids = groups.sorted_ids  # [N]
        sorted_rewards = rewards.index_select(0, groups.order)  # [N]; pragma: no mutate (1-D: dim 0 is dim -1)

        # Rank r of a prompt's group goes to slot (seen + r) % K. Only its last
        # K samples stay; the earlier ones go to the scratch slot.
        # In-place arithmetic where a temporary is not needed again: at large N
        # every fresh [N] tensor is memory that malloc may hand back and fault in.
        seen = self._seen.index_select(0, sorted_ids)  # [N]; pragma: no mutate (1-D: dim 0 is dim -1)
        column = (seen + groups.position).sub_(groups.start)  # [N], rewards the prompt had seen before this one
        if buffer_size & (buffer_size - 1) == 0:  # pragma: no mutate (speed only: both sides give % K)
            column &= buffer_size - 1  # % K for a power of two, without an integer division
        else:
            column %= buffer_size
        slot = column.add_(sorted_ids * buffer_size)  # [N]
        pushed_out = (groups.end - groups.position).gt(buffer_size)  # [N], bool
        write_at(self._slots, slot.masked_fill_(pushed_out, num_prompts * buffer_size), sorted_rewards)
        seen = seen.add_(groups.end).sub_(groups.start)  # [N], after this batch
        write_at(self._seen, sorted_ids, seen)

        # Under torch.compile, a [P, K] view taken here: a write through one
        # input (the slots) read through another that aliases it (the view kept
        # from the constructor) makes inductor copy the whole buffer. Eager,
        # the kept view saves the 2 us that taking one costs.
        if is_compiling():  # pragma: no mutate (speed only: both hold the same values)
            buffer = self._slots[:-1].view(num_prompts, buffer_size)  # [P, K]
        else:
            buffer = self._rewards  # [P, K]
        # Statistics in float32 or float64 (a no-op conversion unless the state is 16-bit).
        compute = self._compute_dtype
        rewards = cast(rewards, compute)  # [N]
        batch_mean, batch_std = batch_mean_std(rewards)
        if num_prompts <= num_samples:  # pragma: no mutate (speed only: both paths give the same)
            # Few prompts: one pass over the whole [P, K] buffer is less work
            # than one over the [N, K] rows of the batch.
            count = self._seen.clamp_max(buffer_size)  # [P]
            rows = cast(buffer, compute)  # [P, K], the buffer itself unless 16-bit
            center, scale = self._center_and_scale(
                count, *masked_row_mean_std(rows, count, overwrite=rows is not buffer), batch_mean, batch_std
            )  # [P], [P]
            advantages = (rewards - center.index_select(0, prompt_ids)).div_(scale.index_select(0, prompt_ids))
            return cast(advantages, self._dtype)
        # Many prompts: the rows of the batch's prompts, read in sorted order.
        count = seen.clamp_max(buffer_size)  # [N]
        rows = cast(buffer.index_select(0, sorted_ids), compute)  # [N, K], a copy
        row_mean, row_std = masked_row_mean_std(rows, count, overwrite=True)  # pragma: no mutate (memory only)
        center, scale = self._center_and_scale(count, row_mean, row_std, batch_mean, batch_std)  # [N], [N]
        return groups.unsort(cast((cast(sorted_rewards, compute) - center).div_(scale), self._dtype))

    def _prompt_counts(self, prompt_ids: torch.Tensor) -> torch.Tensor:
        return self._seen.index_select(0, prompt_ids).clamp_max(self._buffer_size)  # pragma: no mutate (1-D)

    def stats_snapshot(self, prompt_ids: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """Returns the buffer rows and counts of some prompts (may alias the state).

        Args:
            prompt_ids: int64 [M], or None for all P prompts.

        Returns:
            ``{"rewards": [M, K], "count": [M]}``.
        """
        if prompt_ids is None:
            return {"rewards": self._rewards, "count": self._seen.clamp_max(self._buffer_size)}
        return {"rewards": self._rewards.index_select(0, prompt_ids), "count": self._prompt_counts(prompt_ids)}

    def stats_from_snapshot(self, snapshot: Mapping[str, torch.Tensor]) -> TrackerStats:
        """Computes buffer means and stds; NaN for prompts never seen.

        Args:
            snapshot: ``{"rewards": [*B, M, K], "count": [*B, M]}``.

        Returns:
            TrackerStats of [*B, M] tensors.
        """
        count = snapshot["count"]
        rows = snapshot["rewards"].to(self._compute_dtype)  # [*B, M, K]
        mean, std = masked_row_mean_std(rows, count)
        return TrackerStats(mean=mean.to(self._dtype), std=std.to(self._dtype), count=count.clone(),
                            fallback=count < self._min_count)

    def _state_tensors(self) -> dict[str, torch.Tensor]:
        seen = self._seen
        return {"rewards": self._rewards, "count": seen.clamp_max(self._buffer_size), "head": seen % self._buffer_size}

    def _assign_state(self, state: Mapping[str, torch.Tensor]) -> None:
        count, head = state["count"].to(self._device), state["head"].to(self._device)
        # Slots past count hold 0 (masked_row_mean_std relies on it), whatever
        # the state dict holds there.
        position = torch.arange(self._buffer_size, device=self._device)  # [K]
        self._rewards.copy_(torch.where(position < count.unsqueeze(-1), state["rewards"].to(self._device), 0))
        # A full buffer has seen K + head rewards, as far as count and head can tell.
        self._seen.copy_(torch.where(count < self._buffer_size, count, self._buffer_size + head))

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
