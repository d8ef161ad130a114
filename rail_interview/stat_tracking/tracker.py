"""One tracker, composed: a memory, per-prompt statistics, then an estimator.

``AdvantageTracker`` is every tracker of this package. What differs between
DDPO's per-prompt buffer, GRPO's in-batch groups, RLOO's leave-one-out
baseline or Dr. GRPO's unscaled advantages is a choice of parts:

1. **Memory** (``memory.py``): what a prompt's statistics describe. ``"none"``:
   its samples in this batch (GRPO); ``"buffer"``: its last K rewards
   (DDPO); ``"ema"``: exponential moving averages. The current batch is
   always included.
2. **Statistics** per prompt of the batch: count n, mean m and population
   std, from the memory; the batch's mean and std from the valid samples.
3. **Estimator**: a baseline (the prompt's mean, leave-one-out, or the
   batch's mean), a scale (the prompt's std, the batch's, or none), ``ddof``
   and ``eps``, and what a prompt with fewer than ``min_count`` rewards gets
   (the batch's statistics, its raw reward, or zero).

A valid mask flows through all of it: invalid samples never enter memory
or statistics and get advantage 0. ``presets`` names the combinations that
reproduce public trainers; ``BufferStatTracker``, ``EmaStatTracker`` and
``BatchStatTracker`` are thin classes over this one.

Dimensions: N samples in a batch, P prompts, R = P + 1 rows, K buffer slots.
"""

from __future__ import annotations

import math
import warnings
from typing import Dict, Mapping, Optional, Tuple, Union

import torch

from rail_interview.stat_tracking.base import (
    Device,
    StatTracker,
    TrackerStats,
    UpdateReport,
    check_positive_int,
)
from rail_interview.stat_tracking.keys import KeyTable
from rail_interview.stat_tracking.memory import Fold, Memory, make_memory
from rail_interview.stat_tracking.ops import batch_mean_std, cast

#: The choices of each estimator option.
BASELINES = ("prompt_mean", "leave_one_out", "batch_mean")
SCALES = ("prompt_std", "batch_std", "none")
FALLBACKS = ("batch", "raw", "zero")
NAN_REWARDS = ("refuse", "invalid")
KEYS = ("ids", "hashed")


def _check_choice(name: str, value: object, choices: Tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")


class AdvantageTracker(StatTracker):
    """Turns rewards into advantages from a prompt's memory and an estimator of choice.

    For one ``update(prompt_ids, rewards, valid)``:

    1. The memory takes in the batch's valid samples and gives, for each
       prompt of the batch, count n, mean m and population variance v (the
       batch included), and for each sample the weight w of its own reward
       in m (``"none"``: 1/n; ``"buffer"``: 1/n, or 0 for a reward pushed
       out within its batch; ``"ema"``: the reward's decay weight).
    2. The batch's mean B_m and std B_s (dividing by n_valid - ddof; 0 when
       n_valid <= ddof) come from the valid samples.
    3. A prompt with n < ``min_count`` falls back: its (mean, std) become
       (B_m, B_s) with ``fallback="batch"``, (0, 1) with ``"raw"``, and with
       ``"zero"`` its advantages are 0. Otherwise its std is
       S = sqrt(v * n / (n - ddof)).
    4. advantage = numerator / scale, with numerator r - m
       (``baseline="prompt_mean"``), r - B_m (``"batch_mean"``) or
       (r - m) / (1 - w) (``"leave_one_out"``: r minus the mean of the other
       rewards, ``(r - m) * n / (n - 1)`` when weights are equal; not applied
       on fallback), and scale S + eps (``scale="prompt_std"``), B_s + eps
       (``"batch_std"``) or 1 (``"none"``).
    5. Invalid samples (``valid`` False, or NaN rewards with
       ``nan_rewards="invalid"``) get advantage 0 and change no state.

    **Keys.** With ``keys="ids"`` prompts are ids in [0, P). With
    ``keys="hashed"`` they are any int64 keys (``prompt_keys``,
    ``token_keys``) in ``update``, ``stats`` and ``fallback_mask``: a
    ``KeyTable`` of P rows on the device maps them to memory rows, and when
    a batch brings new keys to a full table the least recently seen keys
    are evicted, their rows reset, so that a prompt that comes back starts
    over with the fallback. A batch with more than P distinct keys keeps
    the P seen last in it; the others' samples overflow: they get the
    fallback's advantage (computed from their own reward, as for a prompt
    with no statistics), count as fallen back in the report, and are
    forgotten. The table's ``keys``, ``last_seen`` and ``clock`` join the
    state dict; ``stats()`` without keys then reports rows, and
    ``table_keys()`` says which key each row holds.

    ``update`` is built from tensor ops: no Python loop over prompts or
    samples and no host sync (with ``check_values`` off), so it can be
    captured in a CUDA graph or compiled with ``torch.compile(fullgraph=True)``.
    ``update_with_report`` also says which samples were valid, fell back,
    or belong to a zero-variance group (all valid rewards of the prompt in
    this batch exactly equal), with the fraction of such groups, all on the
    device. State dicts hold the memory's state (nothing for ``"none"``).

    Args:
        num_prompts: P, the number of distinct prompt ids, ids in [0, P).
        memory: ``"none"``, ``"buffer"`` or ``"ema"``.
        buffer_size: K, rewards kept per prompt by ``memory="buffer"``.
        decay: weight kept by the old statistics at each reward, for
            ``memory="ema"``, in (0, 1).
        baseline: ``"prompt_mean"``, ``"leave_one_out"`` or ``"batch_mean"``.
        scale: ``"prompt_std"``, ``"batch_std"`` or ``"none"``.
        ddof: 0 (population std) or 1 (sample std), for the prompt's std and
            the batch's.
        eps: added to the std before dividing.
        min_count: rewards a prompt needs (this batch's included) before its
            own statistics are used; at least ddof + 1, and 2 with
            ``leave_one_out``.
        fallback: what a prompt below ``min_count`` gets: ``"batch"``,
            ``"raw"`` or ``"zero"`` (see above).
        nan_rewards: ``"refuse"``: a NaN reward is bad input (refused with
            ``check_values``); ``"invalid"``: a NaN reward marks an
            unscorable sample, treated as ``valid`` False.
        device: where the state lives; inputs must be on it.
        dtype: floating dtype of the state and of the advantages; statistics
            are accumulated in float32 for float16 and bfloat16 (see the
            ``base`` module for what each dtype can represent).
        check_values: check ids and rewards in ``update`` (a host sync on a
            GPU); see ``StatTracker``.
        process_group: share statistics across ``torch.distributed`` ranks;
            see ``StatTracker``. With hashed keys the ranks need no
            collective beyond the tracker's own gather: each updates its
            table with the same gathered batch.
        keys: ``"ids"`` or ``"hashed"`` (see above).

    Raises:
        ValueError: if an option is unknown or out of range, or the options
            contradict each other.

    Example:
        >>> # GRPO's group-normalised advantages (sample std), groups interleaved:
        >>> tracker = AdvantageTracker(2, "none", ddof=1, fallback="zero")
        >>> tracker.update(torch.tensor([0, 1, 0, 1]), torch.tensor([1.0, 0.0, 0.0, 0.0]))
        tensor([ 0.7071,  0.0000, -0.7071,  0.0000])
        >>> report = tracker.update_with_report(torch.tensor([0, 0, 1]), torch.tensor([1.0, 1.0, 5.0]))
        >>> report.zero_variance, report.zero_variance_fraction
        (tensor([True, True, True]), tensor(1.))
    """

    def __init__(
        self,
        num_prompts: int,
        memory: str = "none",
        *,
        buffer_size: int = 32,
        decay: float = 0.7,
        baseline: str = "prompt_mean",
        scale: str = "prompt_std",
        ddof: int = 0,
        eps: float = 1e-6,
        min_count: int = 2,
        fallback: str = "batch",
        nan_rewards: str = "refuse",
        device: Device = None,
        dtype: torch.dtype = torch.float32,
        check_values: bool = True,
        process_group: Optional["torch.distributed.ProcessGroup"] = None,
        keys: str = "ids",
    ) -> None:
        super().__init__(
            num_prompts, eps=eps, device=device, dtype=dtype, check_values=check_values, process_group=process_group
        )
        _check_choice("keys", keys, KEYS)
        _check_choice("baseline", baseline, BASELINES)
        _check_choice("scale", scale, SCALES)
        _check_choice("fallback", fallback, FALLBACKS)
        _check_choice("nan_rewards", nan_rewards, NAN_REWARDS)
        if ddof not in (0, 1) or isinstance(ddof, bool):
            raise ValueError(f"ddof must be 0 or 1, got {ddof!r}")
        check_positive_int("min_count", min_count)
        if min_count < ddof + 1:
            raise ValueError(
                f"min_count must be at least ddof + 1 = {ddof + 1}: a std with ddof={ddof} needs "
                f"{ddof + 1} rewards; got {min_count}"
            )
        if baseline == "leave_one_out" and min_count < 2:
            raise ValueError(f"leave_one_out needs min_count >= 2 (a lone reward has no others); got {min_count}")
        self._memory: Memory = make_memory(
            memory, num_prompts, buffer_size=buffer_size, decay=decay, dtype=dtype, device=self._device
        )
        if memory != "none" and scale == "prompt_std" and min_count < 2:
            warnings.warn(
                f"min_count={min_count}: a prompt's own statistics are used from its first reward, when its "
                "std is 0 or rests on one or two rewards, so advantages can reach |reward - mean| / eps "
                "(about 1e6 times the reward spread; +-inf in float16). Use min_count >= 2, better 8 or more.",
                stacklevel=3,
            )
        self._baseline, self._scale, self._ddof = baseline, scale, ddof
        self._min_count, self._fallback, self._nan_rewards = min_count, fallback, nan_rewards
        # With a batch baseline and no prompt std, and no prompt that can fall
        # back, an in-batch tracker needs no per-prompt statistics at all.
        # (Speed only: the fold would give the same advantages.)
        self._needs_fold = not (
            memory == "none"
            and baseline == "batch_mean"  # pragma: no mutate (speed only)
            and scale != "prompt_std"
            and min_count <= 1
        )  # pragma: no mutate (speed only)
        self._needs_batch = baseline == "batch_mean" or scale == "batch_std" or fallback == "batch"
        self._keys = keys
        # A tracker that keeps nothing per prompt needs no table, only to accept any key.
        self._table = KeyTable(num_prompts, device=self._device) if keys == "hashed" and self._needs_fold else None
        # Invalid samples sit in row P with reward 0, whose mean is 0 in every
        # memory, so their advantage is 0 / scale, exactly 0, unless the batch's
        # mean enters it (a batch baseline or fallback) or the scale can be 0
        # (a std with eps 0): only then are they masked at the end.
        self._mask_invalid = (
            baseline == "batch_mean" or fallback == "batch" or (scale != "none" and self._eps == 0)
        )  # pragma: no mutate (masking more is exact)

    # Options, read-only: changing one would change what the state means.

    @property
    def memory(self) -> str:
        """``"none"``, ``"buffer"`` or ``"ema"``."""
        return self._memory.kind

    @property
    def baseline(self) -> str:
        """``"prompt_mean"``, ``"leave_one_out"`` or ``"batch_mean"``."""
        return self._baseline

    @property
    def scale(self) -> str:
        """``"prompt_std"``, ``"batch_std"`` or ``"none"``."""
        return self._scale

    @property
    def ddof(self) -> int:
        """0 (population std) or 1 (sample std)."""
        return self._ddof

    @property
    def min_count(self) -> int:
        """Rewards a prompt needs before its own statistics are used."""
        return self._min_count

    @property
    def fallback(self) -> str:
        """What a prompt below ``min_count`` gets: ``"batch"``, ``"raw"`` or ``"zero"``."""
        return self._fallback

    @property
    def nan_rewards(self) -> str:
        """``"refuse"`` or ``"invalid"``: what a NaN reward is."""
        return self._nan_rewards

    @property
    def keys(self) -> str:
        """``"ids"`` (ids in [0, P)) or ``"hashed"`` (any int64 keys, through a ``KeyTable``)."""
        return self._keys

    def table_keys(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """With hashed keys, the key each row holds: the rows of ``stats()`` without keys.

        Returns:
            int64 [P] keys and bool [P], True for rows that hold a key
            (rows never used, or a tracker that keeps nothing per prompt:
            False).

        Raises:
            ValueError: if the tracker takes ids.
        """
        if self._keys != "hashed":
            raise ValueError("table_keys needs keys='hashed'; with ids, row i is prompt i")
        if self._table is None:
            return (
                torch.zeros(self._num_prompts, dtype=torch.int64, device=self._device),
                torch.zeros(self._num_prompts, dtype=torch.bool, device=self._device),
            )
        return self._table.keys()

    def _check_id_range(self, prompt_ids: torch.Tensor) -> None:
        if self._keys == "ids":
            super()._check_id_range(prompt_ids)

    def update_with_report(
        self, prompt_ids: torch.Tensor, rewards: torch.Tensor, valid: Optional[torch.Tensor] = None
    ) -> UpdateReport:
        """``update``, and what it did to each sample (see ``UpdateReport``).

        The report costs O(N + P) more work than ``update`` and no host sync.

        Args:
            prompt_ids: as for ``update``.
            rewards: as for ``update``.
            valid: as for ``update``.

        Returns:
            The ``UpdateReport``; with a process group, of this rank's samples
            (the fraction is the whole gathered batch's).

        Raises:
            TypeError, ValueError: as ``update``.
        """
        return self._dispatch(prompt_ids, rewards, valid, report=True)

    def _check_reward_values(self, rewards: torch.Tensor) -> None:
        if self._nan_rewards == "refuse":
            super()._check_reward_values(rewards)
        elif torch.isinf(rewards).any():
            raise ValueError(
                f"rewards must not be infinite in {self._dtype} (NaN marks an unscorable sample), "
                f"got {int(torch.isinf(rewards).sum())} infinite value(s)"
            )

    def _update(
        self, prompt_ids: torch.Tensor, rewards: torch.Tensor, valid: Optional[torch.Tensor], report: bool
    ) -> Union[torch.Tensor, UpdateReport]:
        if self._nan_rewards == "invalid":
            scorable = rewards == rewards  # [N], False exactly where NaN
            valid = scorable if valid is None else valid & scorable
        if prompt_ids.shape[0] == 0:  # pragma: no mutate (shapes only: nothing to compute)
            empty = torch.zeros(0, dtype=torch.bool, device=self._device)
            advantages = rewards.clone()
            return (
                UpdateReport(advantages, empty, empty, empty, torch.zeros((), device=self._device))
                if report
                else advantages
            )
        rewards = cast(rewards, self._compute_dtype)  # [N], float32 for 16-bit dtypes
        if valid is not None:
            rewards = torch.where(valid, rewards, 0)  # [N]
        groups = overflow = None
        in_memory = valid  # samples that go into a row of the memory
        if self._table is not None:
            assignment = self._table.assign(prompt_ids, valid)
            if assignment.fresh.shape[0]:  # pragma: no mutate (resetting no row is a no-op)
                self._memory.reset_rows(assignment.fresh)
            prompt_ids, overflow, groups = assignment.rows, assignment.overflow, assignment.group
            num_groups = assignment.num_groups
            if overflow is not None:
                in_memory = ~overflow if valid is None else valid & ~overflow
        memory_rewards = rewards
        if in_memory is not None:
            # Invalid (and overflow) samples go to the spare row P with reward 0:
            # no mask needed past here.
            prompt_ids = torch.where(in_memory, prompt_ids, self._num_prompts)  # [N]
            if overflow is not None:
                memory_rewards = torch.where(in_memory, rewards, 0)  # [N]
        batch_mean = batch_std = None
        if self._needs_batch:
            batch_mean, batch_std = batch_mean_std(rewards, valid, ddof=self._ddof)
        if not self._needs_fold:
            advantages = rewards - batch_mean  # [N]
            if self._scale == "batch_std":
                advantages = advantages / (batch_std + self._eps)
            fallback = None
        else:
            fold = self._memory.fold(
                prompt_ids, memory_rewards, ddof=self._ddof, own_weight=self._baseline == "leave_one_out"
            )
            advantages, fallback = self._estimate(fold, batch_mean, batch_std, report)
        if overflow is not None:
            # Keys beyond the table's rows: the fallback, from their own rewards.
            advantages = torch.where(overflow, self._fallback_advantages(rewards, batch_mean, batch_std), advantages)
            fallback = None if fallback is None else fallback | overflow
        if valid is not None and self._mask_invalid:
            advantages = torch.where(valid, advantages, 0)
        advantages = cast(advantages, self._dtype)
        if not report:
            return advantages
        if groups is None:
            return self._report(prompt_ids, self._num_prompts + 1, memory_rewards, valid, advantages, fallback)
        return self._report(groups, num_groups, rewards, valid, advantages, fallback)

    def _fallback_advantages(
        self, rewards: torch.Tensor, batch_mean: Optional[torch.Tensor], batch_std: Optional[torch.Tensor]
    ) -> torch.Tensor:
        """The advantage of every sample as if its prompt had no statistics: the fallback's.

        Args:
            rewards: float [N] in the compute dtype.
            batch_mean: scalar, the valid samples' mean, or None if unused.
            batch_std: scalar, their std, or None if unused.

        Returns:
            float [N]: (r - center) / scale with the fallback's center (B_m for
            ``"batch"``, 0 for ``"raw"``) and the estimator's scale (the
            fallback's std + eps, B_s + eps or 1), or 0 for ``"zero"``.
        """
        if self._fallback == "zero":
            return torch.zeros_like(rewards)
        center, spread = (batch_mean, batch_std) if self._fallback == "batch" else (0.0, 1.0)
        numerator = rewards - center
        if self._scale == "prompt_std":
            return numerator / (spread + self._eps)
        if self._scale == "batch_std":
            return numerator / (batch_std + self._eps)
        return numerator

    def _estimate(
        self, fold: Fold, batch_mean: Optional[torch.Tensor], batch_std: Optional[torch.Tensor], report: bool
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Applies the estimator to a memory's statistics.

        Args:
            fold: the memory's statistics of the batch.
            batch_mean: scalar, the valid samples' mean, or None if unused.
            batch_std: scalar, their std (with ``ddof``), or None if unused.
            report: whether to say which samples fell back.

        Returns:
            The advantages, float [N] in batch order in the compute dtype, and
            bool [N], the samples whose prompt fell back (in batch order), or
            None without ``report``.
        """
        own = fold.count >= self._min_count  # [R]
        if self._fallback == "batch":
            fallback_mean, fallback_std = batch_mean, batch_std
        else:
            fallback_mean, fallback_std = 0.0, 1.0
        baseline, fallback = self._baseline, self._fallback
        wants_own_sample = (
            report
            or baseline == "leave_one_out"  # pragma: no mutate (computing more is harmless)
            or (fold.deviation is not None and fallback == "raw")
        )  # pragma: no mutate (as above)
        own_sample = fold.per_sample(own) if wants_own_sample else None  # [N]
        # The numerator, reward - center, from the memory's deviations where it has them.
        if baseline == "batch_mean":
            numerator = fold.rewards - fold.per_sample(torch.where(own, batch_mean, fallback_mean))  # [N]
        elif fold.deviation is not None and fallback == "zero":
            numerator = fold.deviation  # [N]; samples that fall back get an infinite scale below
        elif fold.deviation is not None and fallback == "raw":
            numerator = torch.where(own_sample, fold.deviation, fold.rewards)  # [N], raw: center 0
        else:
            numerator = fold.rewards - fold.per_sample(torch.where(own, fold.mean, fallback_mean))  # [N]
        if baseline == "leave_one_out":
            numerator = numerator / torch.where(own_sample, 1.0 - fold.own_weight, 1.0)
        if self._scale == "prompt_std":
            scale = torch.where(own, fold.std, fallback_std).add_(self._eps)  # [R]
        elif self._scale == "batch_std":
            scale = batch_std + self._eps  # scalar
        else:
            scale = None
        if fallback == "zero":
            # A finite numerator over an infinite scale: advantage 0.
            scale = torch.where(own, 1.0 if scale is None else scale, math.inf)  # [R]
        if scale is not None:
            numerator = numerator.div_(fold.per_sample(scale)) if scale.ndim else numerator / scale
        advantages = fold.to_batch_order(numerator)
        return advantages, fold.to_batch_order(~own_sample) if report else None

    def _report(
        self,
        prompt_ids: torch.Tensor,
        num_rows: int,
        rewards: torch.Tensor,
        valid: Optional[torch.Tensor],
        advantages: torch.Tensor,
        fallback: Optional[torch.Tensor],
    ) -> UpdateReport:
        """Builds the ``UpdateReport`` of a batch, in O(N + R) tensor ops.

        Args:
            prompt_ids: int64 [N], each sample's group in [0, R - 1); invalid
                samples in the spare group R - 1.
            num_rows: R, the groups, the spare one included.
            rewards: float [N], invalid samples' set to 0.
            valid: bool [N] or None.
            advantages: ``dtype`` [N].
            fallback: bool [N], samples whose prompt fell back, or None if none can.
        """
        # A copy: the report must not change when the caller reuses its mask.
        valid = torch.ones_like(prompt_ids, dtype=torch.bool) if valid is None else valid.clone()
        # A group is all equal when no reward differs from one of them (any one:
        # whichever the scatter keeps, the answer is the same).
        reference = torch.zeros(num_rows, dtype=rewards.dtype, device=rewards.device)  # [R]
        reference.scatter_(0, prompt_ids, rewards)  # pragma: no mutate (1-D: dim 0 is dim -1)
        differs = rewards != reference.index_select(0, prompt_ids)  # [N]; pragma: no mutate (1-D)
        differing = torch.zeros(num_rows, dtype=torch.int64, device=rewards.device)  # [R]
        differing.index_add_(0, prompt_ids, differs.long())  # pragma: no mutate (1-D)
        present = torch.zeros_like(differing).index_add_(0, prompt_ids, valid.long())  # [R]; pragma: no mutate (1-D)
        present = present[:-1] > 0  # [P]
        equal = differing == 0  # [R]
        zero_variance = equal.index_select(0, prompt_ids) & valid  # [N]; pragma: no mutate (1-D)
        groups = present.sum().clamp_min(1).float()
        fraction = (equal[:-1] & present).sum().float() / groups
        fallback = torch.zeros_like(valid) if fallback is None else fallback & valid
        return UpdateReport(advantages, valid, fallback, zero_variance, fraction)

    def _fallback_mask(self, prompt_ids: torch.Tensor) -> torch.Tensor:
        if not self._needs_fold:
            return torch.ones_like(prompt_ids, dtype=torch.bool)
        if self._table is None:
            return self._memory.counts(prompt_ids) < self._min_count
        rows = self._table.lookup(prompt_ids)  # [N], -1 for keys not in the table
        counts = self._memory.counts(rows.clamp_min(0))
        return (rows < 0) | (counts < self._min_count)

    def stats_snapshot(self, prompt_ids: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """Returns the raw memory behind ``stats`` for some prompts (may alias the state).

        Args:
            prompt_ids: int64 [M] on ``device`` (keys, with hashed keys), or
                None for all P prompts (rows, with hashed keys).

        Returns:
            Tensors by name, each with the prompt dimension [M] (or [P]) first:
            ``{"rewards": [M, K], "count": [M]}`` for a buffer,
            ``{"mean", "var", "count"}`` for an EMA, ``{"count"}`` (zeros)
            without memory. A key not in the table gets count 0 (and zero
            rewards).
        """
        if self._table is None or prompt_ids is None:
            return self._memory.snapshot(prompt_ids)
        rows = self._table.lookup(prompt_ids)  # [M], -1 for keys not in the table
        absent = rows < 0
        snapshot = self._memory.snapshot(rows.clamp_min(0))
        return {
            name: torch.where(absent.view(-1, *[1] * (tensor.ndim - 1)), 0, tensor) for name, tensor in snapshot.items()
        }

    def stats_from_snapshot(self, snapshot: Mapping[str, torch.Tensor]) -> TrackerStats:
        """Computes ``stats`` from snapshots, stacked along any leading dimensions.

        Args:
            snapshot: as returned by ``stats_snapshot``, each tensor with
                extra leading dimensions [*B] if several were stacked.

        Returns:
            TrackerStats of new [*B, M] tensors; NaN means and stds for
            prompts the memory holds nothing for.
        """
        mean, std, count = self._memory.stats_from_snapshot(snapshot)
        fallback = count < self._min_count if self._needs_fold else torch.ones_like(count, dtype=torch.bool)
        return TrackerStats(mean=mean, std=std, count=count, fallback=fallback)

    def _state_tensors(self) -> Dict[str, torch.Tensor]:
        state = self._memory.state_tensors()
        if self._table is not None:
            state.update(self._table.state_tensors())
        return state

    def _assign_state(self, state: Mapping[str, torch.Tensor]) -> None:
        self._memory.assign_state(state)
        if self._table is not None:
            self._table.load(state)

    def _check_state_values(self, state: Mapping[str, torch.Tensor]) -> None:
        self._memory.check_state_values(state, type(self).__name__)
        if self._table is not None:
            self._table.check_state_values(state, type(self).__name__)
