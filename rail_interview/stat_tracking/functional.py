"""The estimators of the GRPO family as pure tensor functions: statistics in, advantages out.

Each function takes tensors and option values and keeps no state, so it
can be read, tested and compiled on its own. ``AdvantageTracker`` calls
them with the statistics a memory handed over (``SampleStats``); they are
blind to which memory produced them.

An estimator is a baseline, a scale and a fallback:

* baseline: ``"prompt_mean"`` (r - m), ``"leave_one_out"`` (r minus the
  mean of the prompt's other rewards, (r - m) / (1 - w) with w the weight of
  r in m) or ``"batch_mean"`` (r - B_m);
* scale: ``"prompt_std"`` (S + eps, S the prompt's std), ``"batch_std"``
  (B_s + eps), ``"leave_one_out_std"`` (the std of the prompt's other
  rewards in the batch, NeMo-RL's) or ``"none"`` (1); how eps enters is
  the ``eps_rule`` (``scale_divisor``): added to the std, a floor under it,
  added only to a nonzero std (a zero one leaves the sample unscaled), or
  added to the variance;
* fallback, for a prompt with fewer than ``min_count`` rewards: its (mean,
  std) become the batch's (B_m, B_s) with ``"batch"``, (0, 1) with
  ``"raw"``, and with ``"zero"`` its advantages are 0;
* and, at the end, an optional normalisation of the advantages over the
  batch (``"batch"``: ``normalized_advantages``, as SPO does).

``spo_discount`` is SPO's KL-adaptive discount, for the Beta memory.
``channel_zero_variance`` tells, per reward function, which groups carry
no signal, for trackers of several rewards.

Dimensions: N samples in a batch, R groups of a batch (the spare one of
invalid samples included).
"""

from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch

from rail_interview.stat_tracking.ops import (
    add_at,
    batch_mean_std,
    numerator_algorithm,
    take,
    weighted_mean_std,
    write_at,
)
from rail_interview.stat_tracking.types import SampleStats, UpdateReport

#: The choices of each estimator option.
BASELINES = ("prompt_mean", "leave_one_out", "batch_mean")
SCALES = ("prompt_std", "batch_std", "leave_one_out_std", "none")
FALLBACKS = ("batch", "raw", "zero")
NORMALIZE = ("none", "batch")
#: How eps enters a division by a std s (``scale_divisor``): s + eps, max(s, eps),
#: s + eps where s > 0 else 1 (unscaled), sqrt(s^2 + eps).
EPS_RULES = ("add", "max", "nonzero", "variance")

#: A scalar tensor, or a Python number standing for one.
Scalar = Union[torch.Tensor, float]


def scale_divisor(std: torch.Tensor, eps: float, rule: str, *, in_place: bool = False) -> torch.Tensor:
    """What an advantage is divided by, from a std and eps, by the rule of ``EPS_RULES``.

    * ``"add"``: ``std + eps`` (GRPO's, TRL's, DDPO's);
    * ``"max"``: ``max(std, eps)``, a floor (Flow-Factory's GDPO);
    * ``"nonzero"``: ``std + eps`` where std > 0, else 1: a zero std leaves
      the advantage unscaled (NeMo-RL's, whose eps is 1e-6 per reward and 0
      for the batch);
    * ``"variance"``: ``sqrt(std^2 + eps)``, eps added to the variance
      (verl's ``masked_whiten``, ``rsqrt(var + 1e-8)``).

    Args:
        std: float tensor of any shape.
        eps: a number >= 0.
        rule: one of ``EPS_RULES``.
        in_place: the ``"add"`` rule may write into ``std`` (a temporary).

    Returns:
        A float tensor of ``std``'s shape.

    Example:
        >>> std = torch.tensor([0.0, 2.0])
        >>> [scale_divisor(std, 0.5, rule).tolist() for rule in EPS_RULES]
        [[0.5, 2.5], [0.5, 2.0], [1.0, 2.5], [0.7071067690849304, 2.1213202476501465]]
    """
    if rule == "add":
        return std.add_(eps) if in_place else std + eps
    if rule == "max":
        return std.clamp_min(eps)
    if rule == "nonzero":
        return torch.where(std > 0, std + eps, 1.0)
    return (std.square() + eps).sqrt()


def prompt_advantages(
    stats: SampleStats,
    *,
    baseline: str,
    scale: str,
    eps: float,
    min_count: int,
    fallback: str,
    batch_mean: Optional[torch.Tensor],
    batch_std: Optional[torch.Tensor],
    report: bool = False,
    eps_rule: str = "add",
    overwrite: bool = False,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Advantages from each sample's prompt statistics, by the estimator the options name.

    Args:
        stats: the statistics of the batch's samples, from a memory.
        baseline: one of ``BASELINES``.
        scale: one of ``SCALES``.
        eps: enters the division by the std as ``eps_rule`` says.
        min_count: rewards a prompt needs for its own statistics.
        fallback: one of ``FALLBACKS``.
        batch_mean: scalar (or [N], each sample's own, for several
            rewards), the valid samples' mean, or None when neither the
            baseline nor the fallback uses it.
        batch_std: scalar (or [N]), their std, or None when unused.
        report: whether to say which samples fell back.
        eps_rule: how eps enters the division (``scale_divisor``).
        overwrite: the advantages may be computed in ``stats.deviation``'s
            memory, which is then garbage (a tracker's own temporary: one
            fresh [N] tensor fewer, which on a CPU can cost page faults).
            False leaves ``stats`` as it was.

    Returns:
        float [N], the advantages in batch order in the statistics' dtype,
        and bool [N], the samples whose prompt fell back (in batch order),
        or None without ``report``.

    Example:
        >>> stats = SampleStats(
        ...     rewards=torch.tensor([1.0, 3.0, 5.0]), count=torch.tensor([2, 2, 1]),
        ...     deviation=torch.tensor([-1.0, 1.0, 0.0]), std=torch.tensor([1.0, 1.0, 0.0]),
        ...     own_weight=None, groups=None)
        >>> prompt_advantages(stats, baseline="prompt_mean", scale="prompt_std", eps=0.0, min_count=2,
        ...                   fallback="zero", batch_mean=None, batch_std=None)
        (tensor([-1.,  1.,  0.]), None)
    """
    per_row_batch = batch_mean is None or batch_mean.ndim == 0
    if stats.rows is not None and baseline != "leave_one_out" and scale != "leave_one_out_std" and per_row_batch:
        return _row_advantages(
            stats,
            baseline=baseline,
            scale=scale,
            eps=eps,
            min_count=min_count,
            fallback=fallback,
            batch_mean=batch_mean,
            batch_std=batch_std,
            report=report,
            eps_rule=eps_rule,
            overwrite=overwrite,
        )
    stats = stats.per_sample()
    own = stats.count >= min_count  # [N]
    center, spread = (batch_mean, batch_std) if fallback == "batch" else (0.0, 1.0)
    if baseline == "batch_mean":
        numerator = stats.rewards - torch.where(own, batch_mean, center)  # [N]
    elif fallback == "zero":
        numerator = stats.deviation  # [N]; samples that fall back get an infinite scale below
    elif fallback == "raw":
        numerator = torch.where(own, stats.deviation, stats.rewards)  # [N], raw: center 0
    else:
        numerator = torch.where(own, stats.deviation, stats.rewards - center)  # [N]
    if baseline == "leave_one_out":
        numerator = numerator / torch.where(own, 1.0 - stats.own_weight, 1.0)
    divisor: Optional[torch.Tensor] = None
    if scale in ("prompt_std", "leave_one_out_std"):
        divisor = scale_divisor(torch.where(own, stats.std, spread), eps, eps_rule, in_place=True)  # [N]
    elif scale == "batch_std":
        divisor = scale_divisor(batch_std, eps, eps_rule)  # scalar
    if fallback == "zero":
        # A finite numerator over an infinite scale: advantage 0.
        divisor = torch.where(own, 1.0 if divisor is None else divisor, math.inf)  # [N]
    if divisor is not None:
        # In place only into this function's own temporary, never into the caller's deviation.
        in_place = divisor.ndim and numerator is not stats.deviation
        numerator = numerator.div_(divisor) if in_place else numerator / divisor
    return stats.to_batch_order(numerator), stats.to_batch_order(~own) if report else None


def _row_advantages(
    stats: SampleStats,
    *,
    baseline: str,
    scale: str,
    eps: float,
    min_count: int,
    fallback: str,
    batch_mean: Optional[torch.Tensor],
    batch_std: Optional[torch.Tensor],
    report: bool,
    eps_rule: str,
    overwrite: bool,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``prompt_advantages`` from per-row statistics: each choice made per row, then one gather per sample.

    Every sample's advantage is its reward minus its row's center, divided
    by its row's divisor, the same operations on the same values as the
    per-sample path (whose numerator for a sample that keeps its prompt's
    statistics is ``rewards - mean[rows]``, the deviation itself), so the
    result is the same bit for bit; but the fallback's choices and the eps
    rule run over R rows instead of N samples, and the N-sized work is a
    gather, a subtraction, a gather and a division (a gather and a division
    where the memory's deviation is reused: ``_numerator_is_deviation``).
    """
    rows = stats.rows
    falls_back = stats.count < min_count  # [R]
    # masked_fill with a number, not where: no 0-dim tensor made for it, one op fewer.
    center, spread = (batch_mean, batch_std) if fallback == "batch" else (0.0, 1.0)
    divisor: Optional[torch.Tensor] = None
    if scale == "prompt_std":
        if fallback == "batch":
            chosen = torch.where(falls_back, spread, stats.std)  # [R]
        else:
            chosen = stats.std.masked_fill(falls_back, spread)  # [R]
        divisor = scale_divisor(chosen, eps, eps_rule, in_place=True)  # [R]
    elif scale == "batch_std":
        divisor = scale_divisor(batch_std, eps, eps_rule)  # scalar
    if fallback == "zero":
        if divisor is None or divisor.ndim == 0:
            divisor = torch.where(falls_back, math.inf, 1.0 if divisor is None else divisor)  # [R]
        else:
            divisor = divisor.masked_fill_(falls_back, math.inf)  # [R], a temporary of this function
    # Reused only into a division: without one, the advantages would be the memory's own tensor.
    if divisor is not None and baseline != "batch_mean" and _numerator_is_deviation(stats, falls_back, fallback):
        row_divisor = take(divisor, rows) if divisor.ndim else divisor
        numerator = stats.deviation.div_(row_divisor) if overwrite else stats.deviation / row_divisor  # [N]
    else:
        if baseline == "batch_mean":
            shift = torch.where(falls_back, center, batch_mean)  # [R]
        elif fallback == "zero":
            shift = stats.mean  # [R]; rows that fall back get an infinite scale
        elif fallback == "batch":
            shift = torch.where(falls_back, center, stats.mean)  # [R]
        else:
            shift = stats.mean.masked_fill(falls_back, center)  # [R]
        numerator = stats.rewards - take(shift, rows)  # [N]
        if divisor is not None:
            numerator = numerator.div_(take(divisor, rows) if divisor.ndim else divisor)
    return stats.to_batch_order(numerator), stats.to_batch_order(take(falls_back, rows)) if report else None


def _numerator_is_deviation(stats: SampleStats, falls_back: torch.Tensor, fallback: str) -> bool:
    """Whether each sample's reward minus its row's shift is the memory's deviation, bit for bit.

    A row's shift is its mean unless the row falls back (with fallback
    ``"zero"`` even then), and per-row statistics promise that the
    deviation is ``rewards - mean[rows]``, that very subtraction. So the
    [N] gather and subtraction of the shift can be skipped: always with
    fallback ``"zero"``; otherwise where no row with samples (count >= 1,
    as per-row statistics promise) falls back, which the ``"reuse"``
    numerator algorithm reads back on a CPU (``ops.numerator_algorithm``).
    Never where the memory left the deviation None (it did not need it, so
    the subtraction is made here once either way).

    Args:
        stats: per-row statistics (``rows`` set).
        falls_back: bool [R], the rows below ``min_count``.
        fallback: one of ``FALLBACKS``.
    """
    if stats.deviation is None:  # the memory did not compute it: subtracting the shift costs the same
        return False
    if fallback == "zero":
        return True
    if numerator_algorithm(stats.rewards.shape[0], falls_back.shape[0], stats.rewards.device) != "reuse":
        return False
    return not bool(falls_back.logical_and(stats.count > 0).any())


def fallback_advantages(
    rewards: torch.Tensor,
    *,
    scale: str,
    eps: float,
    fallback: str,
    batch_mean: Optional[torch.Tensor],
    batch_std: Optional[torch.Tensor],
    eps_rule: str = "add",
) -> torch.Tensor:
    """The advantage of every sample as if its prompt had no statistics: the fallback's.

    Args:
        rewards: float [N] in the compute dtype.
        scale: one of ``SCALES``.
        eps: enters the division by the std as ``eps_rule`` says.
        fallback: one of ``FALLBACKS``.
        batch_mean: scalar (or [N]), the valid samples' mean, or None if unused.
        batch_std: scalar (or [N]), their std, or None if unused.
        eps_rule: how eps enters the division (``scale_divisor``).

    Returns:
        float [N]: (r - center) / scale with the fallback's center (B_m for
        ``"batch"``, 0 for ``"raw"``) and the estimator's scale (the
        fallback's std + eps, B_s + eps or 1), or 0 for ``"zero"``.
    """
    if fallback == "zero":
        return torch.zeros_like(rewards)
    center, spread = (batch_mean, batch_std) if fallback == "batch" else (0.0, 1.0)
    numerator = rewards - center
    if scale in ("prompt_std", "leave_one_out_std"):
        spread = spread if isinstance(spread, torch.Tensor) else torch.tensor(spread, dtype=rewards.dtype)
        return numerator / scale_divisor(spread, eps, eps_rule)
    if scale == "batch_std":
        return numerator / scale_divisor(batch_std, eps, eps_rule)
    return numerator


def batch_advantages(
    rewards: torch.Tensor,
    *,
    scale: str,
    eps: float,
    batch_mean: torch.Tensor,
    batch_std: Optional[torch.Tensor],
    eps_rule: str = "add",
) -> torch.Tensor:
    """Whole-batch normalisation: (r - B_m) / (B_s + eps), or r - B_m without a scale.

    What ``prompt_advantages`` gives with a batch baseline, no prompt std and
    no prompt that can fall back, without any per-prompt statistics.

    Args:
        rewards: float [N], invalid samples' set to 0.
        scale: ``"batch_std"`` or ``"none"``.
        eps: enters the division by the std as ``eps_rule`` says.
        batch_mean: scalar (or [N]), the valid samples' mean.
        batch_std: scalar (or [N]), their std, or None without a scale.
        eps_rule: how eps enters the division (``scale_divisor``).

    Returns:
        float [N].

    Example:
        >>> mean, std = torch.tensor(2.0), torch.tensor(1.0)
        >>> batch_advantages(torch.tensor([1.0, 3.0]), scale="batch_std", eps=0.0, batch_mean=mean, batch_std=std)
        tensor([-1.,  1.])
    """
    advantages = rewards - batch_mean  # [N]
    if scale == "batch_std":
        advantages = advantages / scale_divisor(batch_std, eps, eps_rule)
    return advantages


def normalized_advantages(
    advantages: torch.Tensor,
    valid: Optional[torch.Tensor],
    *,
    ddof: int,
    eps: float,
    eps_rule: str = "add",
    weights: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Whitens advantages over the batch's valid samples: ``(a - mean) / (std + eps)``, invalid ones 0.

    SPO's last step (``(a - a.mean()) / (a.std() + 1e-8)``, with ``ddof=1``),
    TRL's after ``normalize_then_sum``, and the last step of every GDPO. The
    std is 0 when at most ``ddof`` samples are valid (torch's std of one
    sample is NaN: here that sample's advantage is 0, with a positive eps).
    With ``weights`` (token counts: verl's ``masked_whiten`` over response
    tokens) the mean and variance are frequency-weighted (see
    ``ops.weighted_mean_std``), ddof subtracted from the weights' sum, and a
    sample of weight 0 gets 0 (verl's token mask gives its tokens 0).

    Args:
        advantages: float [N] in the compute dtype; invalid samples' must be 0.
        valid: bool [N], or None for all valid.
        ddof: the std divides by n - ddof, n the valid samples (or their weights' sum).
        eps: enters the division by the std as ``eps_rule`` says (``scale_divisor``).
        eps_rule: one of ``EPS_RULES``; ``"add"`` by default.
        weights: float [N], each sample's weight, or None.

    Returns:
        float [N].

    Example:
        >>> normalized_advantages(torch.tensor([1.0, 3.0, 0.0]), torch.tensor([True, True, False]), ddof=1, eps=0.0)
        tensor([-0.7071,  0.7071,  0.0000])
    """
    if weights is None:
        mean, std = batch_mean_std(advantages, valid, ddof=ddof)
    else:
        mean, std = weighted_mean_std(advantages, valid, weights, ddof=ddof)
    whitened = (advantages - mean) / scale_divisor(std, eps, eps_rule)
    if weights is not None:  # a sample of weight 0 (no tokens) is out of the whitening: advantage 0
        valid = weights > 0 if valid is None else valid & (weights > 0)
    return whitened if valid is None else torch.where(valid, whitened, 0)


def spo_discount(
    divergence: torch.Tensor, *, rho_min: float = 0.875, rho_max: float = 0.96, half_life: float = 0.06
) -> torch.Tensor:
    """SPO's KL-adaptive discount: ``clamp(2 ** (-D / half_life), rho_min, rho_max)`` per sample.

    ``RayPPOTrainer._get_spo_rho`` in verl's ``recipe/spo/spo_ray_trainer.py``
    (``rho.type: kl``; ``rho_min`` is its ``rho.clip_lower``), with D the
    mean over response tokens of ``|log pi_then(y) - log pi_now(y)|`` for the
    response y stored at the prompt's previous visit (0 at its first): the
    more the policy moved on that prompt, the less of its old pass count is
    kept. Pass the result to ``update(..., discount=...)``.

    Args:
        divergence: float [N], D >= 0.
        rho_min: the lower clamp.
        rho_max: the upper clamp (0.96 in SPO).
        half_life: the D at which rho halves before clamping (0.06 in SPO).

    Returns:
        float [N] of ``divergence``'s dtype.

    Example:
        >>> spo_discount(torch.tensor([0.0, 0.01, 1.0]))
        tensor([0.9600, 0.8909, 0.8750])
    """
    return torch.pow(2.0, -divergence / half_life).clamp(min=rho_min, max=rho_max)


def equal_groups(group_ids: torch.Tensor, num_groups: int, rewards: torch.Tensor) -> torch.Tensor:
    """Tells, per group, whether all its rewards are exactly equal (O(N + R), no host sync).

    Args:
        group_ids: int64 [N], each sample's group in [0, R).
        num_groups: R.
        rewards: float [N].

    Returns:
        bool [R]: True for groups whose rewards are all equal, and for empty groups.

    Example:
        >>> equal_groups(torch.tensor([0, 0, 1, 1]), 3, torch.tensor([1.0, 1.0, 0.0, 1.0]))
        tensor([ True, False,  True])
    """
    # A group is all equal when no reward differs from one of them (any one:
    # whichever write wins, the answer is the same).
    reference = torch.zeros(num_groups, dtype=rewards.dtype, device=rewards.device)  # [R]
    write_at(reference, group_ids, rewards)
    differs = rewards != take(reference, group_ids)  # [N]
    differing = add_at(torch.zeros(num_groups, dtype=torch.int64, device=rewards.device), group_ids, differs.long())
    return differing == 0


def leave_one_out_std(
    rows: torch.Tensor,
    num_rows: int,
    rewards: torch.Tensor,
    count: torch.Tensor,
    deviation: torch.Tensor,
    std: torch.Tensor,
    *,
    ddof: int,
) -> torch.Tensor:
    """The std of each sample's prompt's *other* rewards in the batch (NeMo-RL's leave-one-out std).

    From the group's sum of squared deviations SS = std^2 (n - ddof), the
    others' is SS - d^2 n / (n - 1) (d the sample's deviation from the
    group's mean), over n - 1 - ddof. That downdate cancels for a sample
    that holds most of SS (d^2 > SS / 2, at most one per group): for it the
    others' squares are summed again, centred on their own mean. When the
    others are all equal, float rounding could still leave a tiny positive
    std (and an advantage divided by about 1e-6): that case is detected
    exactly, from each group's minimum, maximum and their counts, and gets
    std 0. O(N + R), no host sync.

    Args:
        rows: int64 [N], each sample's group in [0, R); invalid samples in a
            group of their own that is never read.
        num_rows: R.
        rewards: float [N] in the compute dtype.
        count: [N], the samples of each sample's group, n.
        deviation: float [N], the reward minus its group's mean.
        std: float [N], the group's std with ``ddof``.
        ddof: 0 or 1.

    Returns:
        float [N]: the others' std with ``ddof``; 0 where they are fewer than
        ddof + 1 or all equal.

    Example:
        >>> rewards = torch.tensor([0.0, 0.0, 0.0, 1.0])
        >>> mean = rewards.mean()
        >>> leave_one_out_std(torch.zeros(4, dtype=torch.int64), 1, rewards, torch.full((4,), 4), rewards - mean,
        ...                   torch.full((4,), rewards.std().item()), ddof=1)
        tensor([0.5774, 0.5774, 0.5774, 0.0000])
    """
    size = count.to(rewards.dtype)  # [N]
    others = size - 1  # [N]
    total = std.square() * (size - ddof)  # [N], the group's sum of squared deviations
    squares = total - deviation.square() * size / others  # [N], the others' (downdated)
    # The downdate cancels for a sample that holds most of its group's spread (an outlier): for it, at most one
    # per group, the others' squares are summed again around their own mean.
    dominant = deviation.square() > 0.5 * total  # [N]
    zeros = torch.zeros(num_rows, dtype=rewards.dtype, device=rewards.device)
    peers = (take(add_at(zeros.clone(), rows, dominant.to(rewards.dtype)), rows) > 0) & ~dominant  # [N]
    centre = take(add_at(zeros.clone(), rows, torch.where(peers, rewards, 0)), rows) / others  # [N], their mean
    around = torch.where(peers, rewards - centre, 0).square()  # [N]
    squares = torch.where(dominant, take(add_at(zeros.clone(), rows, around), rows), squares)  # [N]
    variance = squares.clamp_min(0) / (others - ddof)  # [N]
    # The others are all equal when the group holds one value, or two with
    # this sample the only one of its value.
    highest = torch.full((num_rows,), -math.inf, dtype=rewards.dtype, device=rewards.device)
    lowest = torch.full((num_rows,), math.inf, dtype=rewards.dtype, device=rewards.device)
    high = take(highest.scatter_reduce_(0, rows, rewards, "amax"), rows)  # [N]
    low = take(lowest.scatter_reduce_(0, rows, rewards, "amin"), rows)  # [N]
    at_high, at_low = rewards == high, rewards == low  # [N]
    counts = torch.zeros(num_rows, dtype=torch.int64, device=rows.device)
    num_high = take(add_at(counts.clone(), rows, at_high.long()), rows)  # [N]
    num_low = take(add_at(counts, rows, at_low.long()), rows)  # [N]
    count = count.to(torch.int64)
    alone_high = at_high & (num_high == 1) & (num_low == count - 1)  # [N]
    alone_low = at_low & (num_low == 1) & (num_high == count - 1)  # [N]
    equal_others = (high == low) | alone_high | alone_low  # [N]
    keep = (others - ddof > 0) & ~equal_others  # [N]
    return torch.where(keep, variance, 0).sqrt()


def channel_zero_variance(
    group_ids: torch.Tensor, num_groups: int, rewards: torch.Tensor, valid: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per group and reward function: whether its valid rewards are all equal, and whether it has any.

    Args:
        group_ids: int64 [N], each sample's group in [0, G); invalid samples in group G - 1.
        num_groups: G, the spare group included.
        rewards: float [N, C], C reward functions.
        valid: bool [N, C], the rewards that count.

    Returns:
        bool [G - 1, C] ``equal`` (True for empty groups too) and bool
        [G - 1, C] ``present``, without the spare group.

    Example:
        >>> equal, present = channel_zero_variance(
        ...     torch.tensor([0, 0, 1]), 3, torch.tensor([[1.0, 0.0], [1.0, 1.0], [5.0, 2.0]]),
        ...     torch.tensor([[True, True], [True, True], [True, False]]))
        >>> equal, present
        (tensor([[ True, False],
                [ True,  True]]), tensor([[ True,  True],
                [ True, False]]))
    """
    num_channels = rewards.shape[1]
    channel = torch.arange(num_channels, device=group_ids.device)  # [C]
    spare = (num_groups - 1) * num_channels
    virtual = torch.where(valid, group_ids.unsqueeze(-1) * num_channels + channel, spare).reshape(-1)  # [N * C]
    values = torch.where(valid, rewards, 0).reshape(-1)  # [N * C]
    equal = equal_groups(virtual, spare + 1, values)[:-1].view(num_groups - 1, num_channels)
    present = add_at(
        torch.zeros(spare + 1, dtype=torch.int64, device=group_ids.device), virtual, valid.reshape(-1).long()
    )
    return equal, present[:-1].view(num_groups - 1, num_channels) > 0


def update_report(
    group_ids: torch.Tensor,
    num_groups: int,
    rewards: torch.Tensor,
    valid: Optional[torch.Tensor],
    advantages: torch.Tensor,
    fallback: Optional[torch.Tensor],
) -> UpdateReport:
    """Builds the ``UpdateReport`` of a batch, in O(N + R) tensor ops and no host sync.

    A group is zero-variance when its valid rewards are all *exactly*
    equal: rewards that differ in their last bit carry signal.

    Args:
        group_ids: int64 [N], each sample's group in [0, R - 1); invalid
            samples in the spare group R - 1.
        num_groups: R, the groups, the spare one included.
        rewards: float [N], invalid samples' set to 0.
        valid: bool [N] or None for all valid.
        advantages: ``dtype`` [N].
        fallback: bool [N], samples whose prompt fell back, or None if none can.

    Returns:
        The report.

    Example:
        >>> report = update_report(torch.tensor([0, 0, 1]), 3, torch.tensor([1.0, 1.0, 2.0]), None,
        ...                        torch.zeros(3), None)
        >>> report.zero_variance, report.zero_variance_fraction
        (tensor([True, True, True]), tensor(1.))
    """
    # A copy: the report must not change when the caller reuses its mask.
    valid = torch.ones_like(group_ids, dtype=torch.bool) if valid is None else valid.clone()
    equal = equal_groups(group_ids, num_groups, rewards)  # [R]
    present = add_at(torch.zeros(num_groups, dtype=torch.int64, device=rewards.device), group_ids, valid.long())
    present = present[:-1] > 0  # [R - 1]
    zero_variance = take(equal, group_ids) & valid  # [N]
    groups = present.sum().clamp_min(1).float()
    fraction = (equal[:-1] & present).sum().float() / groups
    fallback = torch.zeros_like(valid) if fallback is None else fallback & valid
    return UpdateReport(advantages, valid, fallback, zero_variance, fraction)
