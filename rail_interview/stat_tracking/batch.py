"""Whole-batch normalisation: the baseline that per-prompt tracking beats."""

from __future__ import annotations

from typing import Optional

import torch

from rail_interview.stat_tracking.base import Device
from rail_interview.stat_tracking.tracker import AdvantageTracker


class BatchStatTracker(AdvantageTracker):
    """Normalises every reward with the mean and std of its whole batch.

    This is what the toy problem did before per-prompt tracking: it keeps no
    state, so every prompt always "falls back" to batch statistics. It exists
    so that a trainer treats every method alike. It is
    ``AdvantageTracker(memory="none", baseline="batch_mean", scale="batch_std",
    min_count=1)``.

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
        keys: ``"ids"`` (ids in [0, P)) or ``"hashed"`` (any int64 keys, an
            LRU table of P rows; see ``AdvantageTracker``).

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
        keys: str = "ids",
    ) -> None:
        super().__init__(
            num_prompts,
            "none",
            baseline="batch_mean",
            scale="batch_std",
            ddof=0,
            eps=eps,
            min_count=1,
            fallback="batch",
            device=device,
            dtype=dtype,
            check_values=check_values,
            process_group=process_group,
            keys=keys,
        )
