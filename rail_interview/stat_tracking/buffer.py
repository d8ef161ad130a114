"""DDPO's tracker: per-prompt statistics over each prompt's last K rewards, in a ring buffer."""

from __future__ import annotations

from typing import Any

from rail_interview.stat_tracking.memory import MAX_BUFFER_SIZE, masked_row_mean_std
from rail_interview.stat_tracking.tracker import COMMON_OPTIONS, AdvantageTracker, only_options
from rail_interview.stat_tracking.validation import warn_at_caller

__all__ = ["BufferStatTracker", "MAX_BUFFER_SIZE", "masked_row_mean_std"]


class BufferStatTracker(AdvantageTracker):
    """Normalises rewards with the mean and std of each prompt's last K rewards.

    The semantics are DDPO's (``deque(maxlen=K)`` per prompt), vectorised;
    it is ``AdvantageTracker(memory="buffer")`` with DDPO's estimator, and
    ``presets.ddpo`` builds the same:

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

    Signature: ``BufferStatTracker(num_prompts, buffer_size=32, min_count=16,
    *, eps=1e-6, device=None, dtype=torch.float32, check_values=True,
    process_group=None, keys="ids")``.

    Args:
        num_prompts: P, the number of distinct prompt ids.
        buffer_size: K, rewards kept per prompt, at most ``MAX_BUFFER_SIZE``.
        min_count: rewards a prompt needs before its own statistics are used.
            If larger than ``buffer_size`` they never are (a warning says so).
        **options: keyword-only: ``eps`` (added to the standard deviation
            before dividing, default 1e-6), ``device``, ``dtype`` (of the
            buffer and the advantages: rewards are stored in it),
            ``check_values``, ``process_group`` and ``keys``, as for
            ``AdvantageTracker``.

    Raises:
        ValueError: if ``buffer_size`` or another argument is out of range.

    Example:
        >>> import torch
        >>> tracker = BufferStatTracker(num_prompts=2, buffer_size=4, min_count=2)
        >>> ids = torch.tensor([0, 0, 1])
        >>> tracker.update(ids, torch.tensor([1.0, 3.0, 10.0]))  # prompt 1 falls back to the batch
        tensor([-1.0000,  1.0000,  1.3822])
        >>> tracker.stats().count
        tensor([2, 1])
        >>> tracker
        BufferStatTracker(num_prompts=2, buffer_size=4, min_count=2, eps=1e-06, keys='ids', dtype=torch.float32, \
device=cpu)
    """

    _repr_options = ("num_prompts", "buffer_size", "min_count", "eps", "keys", "dtype", "device")

    def __init__(self, num_prompts: int, buffer_size: int = 32, min_count: int = 16, **options: Any) -> None:
        options = only_options(type(self).__name__, options, ("eps", *COMMON_OPTIONS))
        super().__init__(num_prompts, "buffer", buffer_size=buffer_size, min_count=min_count, **options)
        if buffer_size < min_count:
            warn_at_caller(
                f"buffer_size {buffer_size} < min_count {min_count}: no prompt can ever reach min_count, "
                "so every advantage will use whole-batch statistics"
            )

    @property
    def buffer_size(self) -> int:
        """K, the number of rewards kept per prompt."""
        return self._memory.buffer_size
