"""Trackers that reproduce public trainers' advantages exactly, by name.

Each preset is a function of ``num_prompts`` and keyword options that
returns an ``AdvantageTracker`` whose ``update(prompt_ids, rewards)`` gives
the advantages the named system gives for the same samples grouped by
prompt id, whatever the order of the samples in the batch (groups need not
be contiguous, nor of one size). Every preset takes ``dtype=``, ``device=``
and ``check_values=``, and passes any other keyword to ``AdvantageTracker``:
``trl_grpo(P, memory="buffer", buffer_size=32)`` is TRL's estimator over
each prompt's last 32 rewards instead of its group alone.

=================== ========== ================ ============ ===== ===== =========== ========
preset              memory     baseline         scale        ddof  eps   min_count   fallback
=================== ========== ================ ============ ===== ===== =========== ========
``ddpo``            buffer     prompt_mean      prompt_std   0     1e-6  16          batch
``trl_grpo``        none       prompt_mean      per option   1     1e-4  2           zero
``verl_grpo``       none       prompt_mean      prompt_std   1     1e-6  2           raw
``verl_rloo``       none       leave_one_out    none         0     --    2           raw
``flow_grpo``       none       prompt_mean      batch_std    0     1e-4  2           zero
=================== ========== ================ ============ ===== ===== =========== ========

The tests compare each preset with a plain transcription of the system's
code (``tests/system_references.py``) on random batches with singletons,
zero-variance groups and interleaved groups, in float64 to 1e-9.
"""

from __future__ import annotations

from typing import Any

import torch

from rail_interview.stat_tracking.base import Device
from rail_interview.stat_tracking.tracker import AdvantageTracker

__all__ = ["ddpo", "flow_grpo", "trl_grpo", "verl_grpo", "verl_rloo"]

_TRL_SCALES = {"group": "prompt_std", "batch": "batch_std", "none": "none"}


def _build(num_prompts: int, options: dict, overrides: dict) -> AdvantageTracker:
    """An ``AdvantageTracker`` of a preset's options, updated by the caller's keywords."""
    return AdvantageTracker(num_prompts, **{**options, **overrides})


def ddpo(
    num_prompts: int,
    buffer_size: int = 32,
    min_count: int = 16,
    *,
    dtype: torch.dtype = torch.float32,
    device: Device = None,
    check_values: bool = True,
    **options: Any,
) -> AdvantageTracker:
    """ddpo-pytorch's ``PerPromptStatTracker`` (``ddpo_pytorch/stat_tracking.py``).

    Per prompt, a ``deque(maxlen=buffer_size)`` extended with the batch's
    rewards in batch order; a prompt with fewer than ``min_count`` rewards
    (the batch included) is normalised with the whole batch's mean and
    ``np.std`` (population), others with their buffer's; eps 1e-6 is added
    to the std. Same results as ``BufferStatTracker``.

    Departures: ddpo-pytorch returns advantages in the rewards' dtype
    (``np.empty_like(rewards)``), so integer rewards give truncated integer
    advantages; here they are ``dtype``. It computes in float64 when given
    float64 NumPy rewards; pass ``dtype=torch.float64`` for that.

    Args:
        num_prompts: P, ids in [0, P).
        buffer_size: K, rewards kept per prompt.
        min_count: rewards a prompt needs before its own statistics are used.
        dtype: floating dtype of the state and the advantages.
        device: where the state lives.
        check_values: check ids and rewards in ``update`` (a host sync on a GPU).
        **options: other ``AdvantageTracker`` keywords.

    Returns:
        The tracker.
    """
    return _build(
        num_prompts,
        dict(
            memory="buffer",
            buffer_size=buffer_size,
            baseline="prompt_mean",
            scale="prompt_std",
            ddof=0,
            eps=1e-6,
            min_count=min_count,
            fallback="batch",
            dtype=dtype,
            device=device,
            check_values=check_values,
        ),
        options,
    )


def trl_grpo(
    num_prompts: int,
    scale_rewards: str = "group",
    *,
    dtype: torch.dtype = torch.float32,
    device: Device = None,
    check_values: bool = True,
    **options: Any,
) -> AdvantageTracker:
    """TRL ``GRPOTrainer``'s advantages with one reward function (``_generate_and_score_completions``).

    advantage = (r - group mean) / (std + 1e-4), with the std
    ``scale_rewards="group"``: the group's sample std (ddof 1);
    ``"batch"``: the sample std of every valid reward of the batch;
    ``"none"``: no division (Dr. GRPO). A NaN reward marks an unscorable
    sample: it is left out of the group's mean and std and of the batch's
    std, and gets advantage 0; a group with one valid sample gets 0.

    Departures: TRL's default aggregation sums reward functions with
    ``nansum``, which turns a lone function's NaN into a reward of 0 that
    then counts; here it is left out, as TRL does for each function in its
    ``normalize_then_sum`` aggregation (``nanmean``, ``nanstd``). TRL needs
    groups of ``num_generations`` contiguous samples; here any grouping by
    id works. TRL gives a group of one sample a NaN std (``torch.std``); here
    such a group gets 0.

    Args:
        num_prompts: P, ids in [0, P).
        scale_rewards: ``"group"``, ``"batch"`` or ``"none"``.
        dtype: floating dtype of the advantages.
        device: where the tracker lives.
        check_values: check ids and rewards in ``update`` (a host sync on a GPU).
        **options: other ``AdvantageTracker`` keywords (``memory=...``, ...).

    Returns:
        The tracker.

    Raises:
        ValueError: if ``scale_rewards`` is not one of the three.
    """
    if scale_rewards not in _TRL_SCALES:
        raise ValueError(f"scale_rewards must be 'group', 'batch' or 'none'; got {scale_rewards!r}")
    return _build(
        num_prompts,
        dict(
            memory="none",
            baseline="prompt_mean",
            scale=_TRL_SCALES[scale_rewards],
            ddof=1,
            eps=1e-4,
            min_count=2,
            fallback="zero",
            nan_rewards="invalid",
            dtype=dtype,
            device=device,
            check_values=check_values,
        ),
        options,
    )


def verl_grpo(
    num_prompts: int,
    norm_adv_by_std: bool = True,
    *,
    dtype: torch.dtype = torch.float32,
    device: Device = None,
    check_values: bool = True,
    **options: Any,
) -> AdvantageTracker:
    """verl's ``compute_grpo_outcome_advantage`` (``verl/trainer/ppo/core_algos.py``).

    advantage = (r - group mean) / (group sample std + 1e-6), or
    r - group mean with ``norm_adv_by_std=False`` (Dr. GRPO); a group of one
    sample gets mean 0 and std 1: r / (1 + 1e-6), or r. Groups are samples
    of one id (verl's ``index``).

    verl computes in the scores' dtype (float32) and returns token-level
    advantages (the score times the response mask); this returns one
    advantage per sample. verl builds a singleton's mean and std as float32
    tensors, so with float64 scores its 1 + 1e-6 is rounded to float32
    (1.00000095); here it is computed in ``dtype``, a relative difference
    of 5e-8.

    Args:
        num_prompts: P, ids in [0, P).
        norm_adv_by_std: divide by the group's std (verl's ``norm_adv_by_std_in_grpo``).
        dtype: floating dtype of the advantages.
        device: where the tracker lives.
        check_values: check ids and rewards in ``update`` (a host sync on a GPU).
        **options: other ``AdvantageTracker`` keywords.

    Returns:
        The tracker.
    """
    return _build(
        num_prompts,
        dict(
            memory="none",
            baseline="prompt_mean",
            scale="prompt_std" if norm_adv_by_std else "none",
            ddof=1,
            eps=1e-6,
            min_count=2,
            fallback="raw",
            dtype=dtype,
            device=device,
            check_values=check_values,
        ),
        options,
    )


def verl_rloo(
    num_prompts: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: Device = None,
    check_values: bool = True,
    **options: Any,
) -> AdvantageTracker:
    """verl's ``compute_rloo_outcome_advantage`` (``verl/trainer/ppo/core_algos.py``).

    advantage = r * n / (n - 1) - mean * n / (n - 1) for a group of n >= 2
    samples, that is r minus the mean of the group's other samples; a group
    of one keeps its raw reward. Computed as (r - mean) / (1 - 1/n), equal up
    to rounding.

    Args:
        num_prompts: P, ids in [0, P).
        dtype: floating dtype of the advantages.
        device: where the tracker lives.
        check_values: check ids and rewards in ``update`` (a host sync on a GPU).
        **options: other ``AdvantageTracker`` keywords.

    Returns:
        The tracker.
    """
    return _build(
        num_prompts,
        dict(
            # ddof only shapes a std, which RLOO does not use.
            memory="none",
            baseline="leave_one_out",
            scale="none",
            ddof=0,
            min_count=2,
            fallback="raw",  # pragma: no mutate
            dtype=dtype,
            device=device,
            check_values=check_values,
        ),
        options,
    )


def flow_grpo(
    num_prompts: int,
    global_std: bool = True,
    *,
    dtype: torch.dtype = torch.float32,
    device: Device = None,
    check_values: bool = True,
    **options: Any,
) -> AdvantageTracker:
    """flow_grpo's ``PerPromptStatTracker`` (``flow_grpo/stat_tracking.py``), cleared after every update.

    Its trainers call ``clear()`` after each ``update``, so a prompt's
    statistics are its group in the batch: advantage = (r - group mean) /
    (std + 1e-4), with ``np.std`` (population) of the whole batch when
    ``global_std``, else of the group. A group of one gets 0 (its reward
    minus itself), as there.

    Args:
        num_prompts: P, ids in [0, P).
        global_std: scale by the batch's std instead of the group's.
        dtype: floating dtype of the advantages.
        device: where the tracker lives.
        check_values: check ids and rewards in ``update`` (a host sync on a GPU).
        **options: other ``AdvantageTracker`` keywords.

    Returns:
        The tracker.
    """
    return _build(
        num_prompts,
        dict(
            memory="none",
            baseline="prompt_mean",
            scale="batch_std" if global_std else "prompt_std",
            ddof=0,
            eps=1e-4,
            min_count=2,
            fallback="zero",
            dtype=dtype,
            device=device,
            check_values=check_values,
        ),
        options,
    )
