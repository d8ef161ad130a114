"""Whole-batch normalisation: the baseline that per-prompt tracking beats."""

from __future__ import annotations

from typing import Any

from rail_interview.stat_tracking.tracker import COMMON_OPTIONS, AdvantageTracker, only_options


class BatchStatTracker(AdvantageTracker):
    """Normalises every reward with the mean and std of its whole batch.

    It keeps no state, so every prompt always "falls back" to batch
    statistics. It exists so that a trainer treats every method alike. It is
    ``AdvantageTracker(memory="none", baseline="batch_mean", scale="batch_std",
    min_count=1)``.

    Signature: ``BatchStatTracker(num_prompts, *, eps=1e-7, device=None,
    dtype=torch.float32, check_values=True, process_group=None, keys="ids")``.

    Args:
        num_prompts: P, the number of distinct prompt ids (ids are checked
            against it, otherwise unused).
        **options: keyword-only: ``eps`` (added to the standard deviation
            before dividing, default 1e-7), ``device`` (where inputs are
            expected), ``dtype`` (of the advantages; statistics are computed
            in float32 for float16 and bfloat16), ``check_values``,
            ``process_group`` and ``keys``, as for ``AdvantageTracker``.

    Example:
        >>> import torch
        >>> tracker = BatchStatTracker(num_prompts=2)
        >>> tracker.update(torch.tensor([0, 0, 1, 1]), torch.tensor([1.0, 3.0, 5.0, 7.0]))
        tensor([-1.3416, -0.4472,  0.4472,  1.3416])
        >>> tracker
        BatchStatTracker(num_prompts=2, eps=1e-07, keys='ids', dtype=torch.float32, device=cpu)
    """

    _repr_options = ("num_prompts", "eps", "keys", "dtype", "device")

    def __init__(self, num_prompts: int, **options: Any) -> None:
        options = {"eps": 1e-7, **only_options(type(self).__name__, options, ("eps", *COMMON_OPTIONS))}
        super().__init__(num_prompts, "none", baseline="batch_mean", scale="batch_std", min_count=1, **options)
