"""The values a tracker hands around: its device, what it reports, and what a memory gives the estimator.

Dimensions: N samples in a batch, P prompts, M prompts asked about.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Union

import torch

from rail_interview.stat_tracking.ops import PromptGroups

#: Anything ``torch.device`` accepts, or None for the CPU.
Device = Union[str, torch.device, None]


def resolve_device(device: Device) -> torch.device:
    """Returns a concrete device: ``None`` means CPU, ``"cuda"`` gets its index.

    Args:
        device: anything ``torch.device`` accepts, or None.

    Returns:
        The device that tensors allocated on ``device`` end up on, so that it
        compares equal to ``tensor.device`` (``cuda`` becomes ``cuda:0``).

    Example:
        >>> resolve_device(None)
        device(type='cpu')
    """
    return torch.empty(0, device=device).device


class TrackerStats(NamedTuple):
    """Per-prompt statistics held by a tracker, as returned by ``stats()``.

    Attributes:
        mean: float [M], the mean reward the tracker holds for each prompt;
            NaN for a prompt it holds nothing for.
        std: float [M], the matching population standard deviation (eps not
            added); NaN for a prompt it holds nothing for.
        count: int64 [M], how many rewards stand behind ``mean`` and ``std``.
        fallback: bool [M], True for prompts that hold fewer than
            ``min_count`` rewards. Right after ``update`` of a tracker with
            memory, it tells which prompts of that batch got the fallback
            (the batch is counted before the choice is made); without
            memory, True everywhere (see ``UpdateReport.fallback``).

    Example:
        >>> from rail_interview.stat_tracking import BufferStatTracker
        >>> tracker = BufferStatTracker(2, buffer_size=4, min_count=2)
        >>> _ = tracker.update(torch.tensor([0, 0]), torch.tensor([1.0, 3.0]))
        >>> stats = tracker.stats()
        >>> stats.mean, stats.std, stats.count, stats.fallback
        (tensor([2., nan]), tensor([1., nan]), tensor([2, 0]), tensor([False,  True]))
    """

    mean: torch.Tensor
    std: torch.Tensor
    count: torch.Tensor
    fallback: torch.Tensor


class UpdateReport(NamedTuple):
    """What one update did to each sample, as returned by ``update_with_report``.

    Every field is a tensor on the tracker's device, computed without a host
    sync, so a trainer can log it every step and read it back when it logs.

    Attributes:
        advantages: ``dtype`` [N], as ``update`` returns them.
        valid: bool [N], the samples that counted: not masked out by
            ``valid`` and, with ``nan_rewards="invalid"``, not NaN.
        fallback: bool [N], valid samples whose prompt held fewer than
            ``min_count`` rewards (this batch included), so that the
            tracker's fallback set their advantage.
        zero_variance: bool [N], valid samples whose prompt's valid rewards
            in this batch are all exactly equal (a prompt with one valid
            sample included): the groups that carry no signal within the
            batch, which DAPO-style trainers drop.
        zero_variance_fraction: float32 scalar, the fraction of the batch's
            prompts (those with at least one valid sample) whose valid
            rewards are all equal; 0 when no sample is valid.
        channel_zero_variance_fraction: float32 [C] with several rewards
            (``num_rewards=C``): per reward function, the fraction of the
            prompts with a valid reward of it whose valid rewards of it are
            all equal; None with one reward. With several rewards
            ``zero_variance`` is of the combined reward
            (``aggregation="sum_then_normalize"``) or of every reward
            function at once (``"normalize_then_sum"``), and ``fallback``
            says a sample fell back in at least one of its valid rewards.

    Example:
        >>> from rail_interview.stat_tracking import presets
        >>> report = presets.verl_grpo(2).update_with_report(torch.tensor([0, 0, 1]), torch.tensor([1.0, 1.0, 2.0]))
        >>> report.fallback, report.zero_variance, report.zero_variance_fraction
        (tensor([False, False,  True]), tensor([True, True, True]), tensor(1.))
    """

    advantages: torch.Tensor
    valid: torch.Tensor
    fallback: torch.Tensor
    zero_variance: torch.Tensor
    zero_variance_fraction: torch.Tensor
    channel_zero_variance_fraction: Optional[torch.Tensor] = None

    def local(self, samples: slice) -> "UpdateReport":
        """Returns the report of some samples; the fraction stays the whole batch's.

        Args:
            samples: the samples to keep, such as one rank's part of a gathered batch.
        """
        return UpdateReport(
            self.advantages[samples],
            self.valid[samples],
            self.fallback[samples],
            self.zero_variance[samples],
            self.zero_variance_fraction,
            self.channel_zero_variance_fraction,
        )


class PromptQuery(NamedTuple):
    """What a tracker's memory says of some prompts, as returned by ``AdvantageTracker.query``.

    Read-only and on the tracker's device: ``query`` changes no state and
    costs no host sync, so a prompt sampler can read it every step.

    Attributes:
        pass_rate: float [M], the memory's estimate of the prompt's mean
            reward (its pass rate, with pass/fail rewards): the Beta
            memory's ``alpha / (alpha + beta)`` (its prior's before any
            reward), the buffer's mean, the EMA's mean; NaN where the memory
            holds nothing for the prompt (always, without memory).
        uncertainty: float [M], the standard error of that estimate: the
            Beta posterior's std ``sqrt(alpha * beta / ((alpha + beta)**2
            (alpha + beta + 1)))``, the buffer's population std over
            ``sqrt(count)``, the EMA's std times ``sqrt((1 - decay) / (1 +
            decay))`` (the std of a moving average of independent rewards);
            NaN where ``pass_rate`` is. The buffer's and EMA's are 0 after
            one reward (a std of one sample): read them with ``count``.
        count: int64 [M], the rewards behind the estimate (at most K for a
            buffer; for the Beta memory, the valid samples seen, those whose
            reward ``repeats="last"`` discards included; 0 without memory).
        streak: int64 [M], how many of the prompt's latest visits in a row
            (updates where it had a valid sample) had all its valid rewards
            exactly equal: 0 after a visit with differing rewards; or None
            when the tracker does not track streaks (``track_streaks``).

    Example:
        >>> from rail_interview.stat_tracking import AdvantageTracker
        >>> tracker = AdvantageTracker(2, "beta", decay=1.0, track_streaks=True)
        >>> _ = tracker.update(torch.tensor([0, 0]), torch.tensor([1.0, 1.0]))
        >>> query = tracker.query(torch.tensor([0, 1]))
        >>> query.pass_rate, query.count, query.streak  # the prior: alpha = beta = 0.5
        (tensor([0.8333, 0.5000]), tensor([2, 0]), tensor([1, 0]))
    """

    pass_rate: torch.Tensor
    uncertainty: torch.Tensor
    count: torch.Tensor
    streak: Optional[torch.Tensor]


class SampleStats(NamedTuple):
    """What a memory hands the estimator: each sample's prompt statistics, the batch included.

    One layout for every memory: per-sample tensors, all in one *output
    order*, which is batch order when ``groups`` is None and the sorted
    order of ``groups`` otherwise (``to_batch_order`` undoes it), or, for
    ``count`` and ``std``, per-row ones (below). The estimator
    (``functional.prompt_advantages``) reads nothing else, so it is blind to
    which memory produced them.

    A memory that computes its statistics per row may hand them over per
    row: ``count``, ``std`` and ``mean`` of [R] rows, with ``rows`` mapping
    each sample to its row. The estimator then decides per row and gathers
    once, where per-sample statistics would take a gather each and the
    decisions N-sized ops; ``per_sample`` expands them for any other reader.

    Attributes:
        rewards: float [N] in the compute dtype, the batch's rewards.
        count: [N] (or [R] when ``rows`` is set), the rewards behind the
            sample's (the row's) prompt's statistics: int64, or
            integer-valued floats of the compute dtype.
        deviation: float [N], the sample's reward minus its prompt's mean;
            or None with per-row statistics whose memory did not need it
            for itself (``per_sample`` then computes it: ``rewards -
            mean[rows]``), so that no estimator that subtracts the row's
            shift anyway pays for it twice.
        std: float [N] (or [R] when ``rows`` is set), the prompt's std with
            the ``ddof`` asked for (meaningless where count <= ddof).
        own_weight: float [N], the weight of the sample's own reward in its
            prompt's mean (0 if the memory does not hold it), or None when
            not asked for.
        groups: the batch's grouping when the output order is sorted, else
            None.
        mean: float [R], each row's mean, when the statistics are per row
            (the deviation is then ``rewards - mean[rows]``, that very
            subtraction); else None.
        rows: int64 [N], each sample's row, in output order, when
            ``count``, ``std`` and ``mean`` are per row ([R]); else None.
            A row that holds a sample then has a count of at least 1 (the
            estimator reads no other row's count to know that none of the
            batch's rows falls back).

    Example:
        >>> from rail_interview.stat_tracking.ops import group_by_prompt
        >>> groups = group_by_prompt(torch.tensor([1, 0, 1]), 2)  # sorted: samples 1, 0, 2
        >>> rewards = torch.tensor([1.0, 2.0, 5.0])[groups.order]  # [2., 1., 5.]
        >>> deviation = rewards - torch.tensor([2.0, 3.0, 3.0])  # minus each prompt's mean
        >>> stats = SampleStats(rewards, groups.size, deviation, torch.zeros(3), None, groups)
        >>> stats.to_batch_order(stats.deviation)
        tensor([-2.,  0.,  2.])
    """

    rewards: torch.Tensor
    count: torch.Tensor
    deviation: Optional[torch.Tensor]
    std: torch.Tensor
    own_weight: Optional[torch.Tensor]
    groups: Optional[PromptGroups]
    mean: Optional[torch.Tensor] = None
    rows: Optional[torch.Tensor] = None

    def per_sample(self) -> "SampleStats":
        """The same statistics with ``count`` and ``std`` per sample ([N]), ``mean`` and ``rows`` None.

        The deviation is computed (``rewards - mean[rows]``) if the memory left it None.

        Example:
            >>> rewards, mean = torch.tensor([1.0, 3.0]), torch.tensor([2.0])  # one row of two samples
            >>> stats = SampleStats(rewards, torch.tensor([2.0]), rewards - mean[0], torch.tensor([1.0]), None, None,
            ...                     mean=mean, rows=torch.tensor([0, 0]))
            >>> stats.per_sample().count, stats.per_sample().std
            (tensor([2., 2.]), tensor([1., 1.]))
        """
        if self.rows is None:
            return self
        rows = self.rows
        count, std = self.count.index_select(0, rows), self.std.index_select(0, rows)
        deviation = self.deviation
        if deviation is None:
            assert self.mean is not None, "per-row statistics without a deviation need their rows' mean"
            deviation = self.rewards - self.mean.index_select(0, rows)  # [N]
        return self._replace(count=count, deviation=deviation, std=std, mean=None, rows=None)

    def to_batch_order(self, values: torch.Tensor) -> torch.Tensor:
        """Puts per-sample values from output order into batch order.

        Args:
            values: [N] in output order.

        Returns:
            [N] in batch order.
        """
        return values if self.groups is None else self.groups.unsort(values)
