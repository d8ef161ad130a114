"""What a tracker remembers of each prompt between updates: nothing, a ring buffer, an EMA, or a Beta posterior.

A memory takes in a batch of (prompt id, reward) pairs and hands back, for
each sample of the batch, the statistics of its prompt that an estimator
needs (``SampleStats``): how many rewards stand behind them, the sample's
deviation from their mean, and their std (with the estimator's ``ddof``),
the current batch always included. The estimator
(``functional.prompt_advantages``) turns those into advantages; the
memory knows nothing of baselines, scales or fallbacks, and the estimator
nothing of memories. Every sample's deviation is its reward minus its
prompt's mean in the compute dtype, one subtraction, so that no precision
is lost to a later re-centring; a memory whose statistics are per row
and that does not need the deviation itself (the buffer's) leaves that
subtraction to the estimator.

* ``NoMemory``: this batch's rewards of the prompt only, as GRPO-style
  trainers use them. Keeps no state.
* ``BufferMemory``: each prompt's last K rewards, as DDPO does.
* ``EmaMemory``: exponential moving averages of each prompt's mean and
  variance.
* ``BetaMemory`` (``beta_memory.py``): discounted pass and fail counts, a
  Beta posterior of each prompt's pass rate, for rewards in [0, 1] (SPO's).

Invalid samples: the tracker maps them to one extra row, id P (their
rewards set to 0), so that every memory keeps P + 1 rows and never needs a
mask: row P takes whatever invalid samples bring and is never reported.
The state dict shows rows [0, P) only.

Dimensions: N samples in a batch, P prompts, R = P + 1 rows, K buffer slots.
"""

from __future__ import annotations

import math
from typing import Dict, Mapping, Optional, Protocol, Tuple

import torch

from rail_interview.stat_tracking.beta_memory import BetaMemory
from rail_interview.stat_tracking.ops import (
    DecayPowers,
    PromptGroups,
    add_at,
    batch_rows_algorithm,
    cast,
    compute_dtype,
    frequency_std,
    group_by_prompt,
    group_stats_algorithm,
    is_compiling,
    segment_sum,
    slot_index_dtype,
    sort_ids,
    sorted_runs,
    take,
    unsort,
    write_at,
)
from rail_interview.stat_tracking.types import Device, SampleStats
from rail_interview.stat_tracking.validation import check_count_range, check_discount, check_positive_int

#: The memories ``make_memory`` builds, by the name ``AdvantageTracker(memory=...)`` takes.
MEMORIES = ("none", "buffer", "ema", "beta")

#: The largest buffer_size: the row statistics count entries in float32,
#: which holds every integer up to 2**24 exactly.
MAX_BUFFER_SIZE = 2**24

#: Buffers with fewer slots (R * K + 1) than this may index them in int32 while
#: computing where a large batch goes (``ops.slot_index_dtype``); larger ones in int64.
MAX_INT32_SLOTS = 2**31  # pragma: no mutate (fork)


class Memory(Protocol):
    """What a tracker needs of a memory: the interface ``NoMemory``, ``BufferMemory`` and ``EmaMemory`` share.

    Every memory keeps P + 1 rows, row P for invalid samples, and is built
    from ``num_prompts`` and keyword-only ``dtype`` (of the state) and
    ``device`` (a resolved ``torch.device``).

    Example:
        >>> memory = make_memory("ema", 3, buffer_size=32, decay=0.5, dtype=torch.float32, device=torch.device("cpu"))
        >>> memory.kind, sorted(memory.state_tensors())
        ('ema', ['count', 'mean', 'var'])
    """

    #: The name ``AdvantageTracker(memory=...)`` knows this memory by.
    kind: str
    #: What ``estimate`` says of a prompt never seen (pass rate, standard error).
    unseen_estimate: Tuple[float, float]

    def fold(self, prompt_ids: torch.Tensor, rewards: torch.Tensor, *, ddof: int, own_weight: bool) -> SampleStats:
        """Takes in a batch and returns its samples' statistics, the batch included.

        No Python loop over prompts or samples and no host sync (on an eager
        CPU, where a read costs no sync, the ``"runs"`` grouping and the
        buffer's ``"distinct"`` rows read the batch's number of distinct
        prompts back: see ``ops.py``'s algorithm table).

        Args:
            prompt_ids: int64 [N], N >= 1, ids in [0, P]; id P marks an invalid
                sample, whose reward is 0.
            rewards: float [N] in the compute dtype.
            ddof: the std divides the sum of squared deviations by count -
                ddof (for the EMA: its variance is scaled by count / (count
                - ddof)).
            own_weight: whether to compute ``SampleStats.own_weight``.

        Returns:
            The batch's ``SampleStats``.
        """

    def read(self, prompt_ids: torch.Tensor, rewards: torch.Tensor, *, ddof: int) -> SampleStats:
        """Returns each sample's statistics as the memory holds them before the batch; changes nothing.

        What a baseline from the past only reads (``AdvantageTracker(include_batch=False)``),
        before ``fold`` takes the batch in.

        Args:
            prompt_ids: int64 [N], ids in [0, P].
            rewards: float [N] in the compute dtype.
            ddof: as for ``fold``.

        Returns:
            ``SampleStats`` in batch order: the prompt's count before the
            batch, ``rewards`` minus its mean then (0 where it held nothing),
            its std then (0 where count <= ddof) and ``own_weight`` 0.
        """

    def estimate(self, prompt_ids: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns the pass rate (mean reward), its standard error and the count of some prompts.

        Args:
            prompt_ids: int64 [M], ids in [0, P).

        Returns:
            ``dtype`` [M] estimates and standard errors (NaN where the
            memory holds nothing; see ``types.PromptQuery``) and int64 [M]
            counts, all new tensors.
        """

    def counts(self, prompt_ids: torch.Tensor) -> torch.Tensor:
        """Returns how many rewards stand behind each given prompt's statistics.

        Args:
            prompt_ids: int64 [M], ids in [0, P).

        Returns:
            int64 [M].
        """

    def snapshot(self, prompt_ids: Optional[torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Returns the raw state behind some prompts' statistics (may alias the state).

        Args:
            prompt_ids: int64 [M], or None for all P prompts.

        Returns:
            Tensors by name, each with the prompt dimension [M] (or [P]) first.
        """

    def stats_from_snapshot(self, snapshot: Mapping[str, torch.Tensor]) -> Tuple[torch.Tensor, ...]:
        """Computes mean, population std and count from stacked snapshots.

        Args:
            snapshot: as returned by ``snapshot``, with any leading dimensions [*B].

        Returns:
            ``dtype`` [*B, M] mean and std (NaN for prompts without rewards)
            and int64 [*B, M] count, all new tensors.
        """

    def state_tensors(self) -> Dict[str, torch.Tensor]:
        """Returns the state of rows [0, P) by name: the live tensors, or views built from them."""

    def assign_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Copies a checked state into the live state tensors, in place.

        Args:
            state: tensors by name, of the shapes and dtypes of ``state_tensors``.
        """

    def reset_rows(self, rows: torch.Tensor) -> None:
        """Forgets everything some rows hold, as if they had never seen a reward (no host sync).

        Args:
            rows: int64 [M], rows in [0, P]; repeats are allowed, and row P
                (the spare row) may pad the list.
        """

    def check_state_values(self, state: Mapping[str, torch.Tensor], name: str) -> None:
        """Raises ValueError if a candidate state breaks the memory's invariants.

        Args:
            state: tensors by name, of the right shapes and dtypes.
            name: the tracker's class name, for the messages.
        """


class NoMemory:
    """No memory: a prompt's statistics are its valid rewards in this batch (see ``Memory``).

    Two algorithms with the same results (``ops.forced_algorithms(group_stats=...)``):
    ``"dense"`` sums into one row per prompt with ``index_add_`` (no sort;
    on a CPU it adds sequentially, so it is deterministic there) and
    ``"sorted"`` sums each prompt's group of the sorted batch with
    ``ops.segment_sum`` (deterministic on every device). Both take two
    passes: the mean, then squared deviations from it.

    Args:
        num_prompts: P.
        dtype: floating dtype of the statistics reported.
        device: where tensors are allocated.

    Example:
        >>> memory = NoMemory(2, dtype=torch.float32, device=torch.device("cpu"))
        >>> stats = memory.fold(torch.tensor([0, 1, 0]), torch.tensor([1.0, 5.0, 3.0]), ddof=0, own_weight=False)
        >>> stats.std, stats.rows  # per row (the dense sums on a CPU); row 2 takes invalid samples
        (tensor([1., 0., nan]), tensor([0, 1, 0]))
        >>> stats = stats.per_sample()
        >>> stats.to_batch_order(stats.deviation), stats.to_batch_order(stats.std)
        (tensor([-1.,  0.,  1.]), tensor([1., 0., 1.]))
    """

    kind = "none"
    unseen_estimate = (math.nan, math.nan)

    def __init__(self, num_prompts: int, *, dtype: torch.dtype, device: torch.device) -> None:
        self._num_prompts = num_prompts
        self._dtype = dtype
        self._device = device
        self._one = torch.ones(1, dtype=compute_dtype(dtype), device=device)  # [1], the rewards' dtype

    def fold(
        self,
        prompt_ids: torch.Tensor,
        rewards: torch.Tensor,
        *,
        ddof: int,
        own_weight: bool,
        weights: Optional[torch.Tensor] = None,
    ) -> SampleStats:
        """The batch's groups alone: count, deviation and std (see ``Memory.fold``).

        With ``weights`` (float [N], non-negative: OPO's response lengths)
        each sample counts as ``weight`` copies of its reward in its group's
        mean and std (frequency weights: the variance divides by the weights'
        sum minus ddof, 0 where that is not positive), and its own weight in
        the mean is its share of the group's weights; the count stays the
        number of samples (verl's OPO counts them so), or 0 for a group
        whose weights sum to 0 (it has no weighted mean, so the estimator's
        fallback takes it; its mean reads 0, to keep every value finite) and,
        with ``own_weight``, for a sample holding all of its group's weight
        (no others' mean for a leave-one-out baseline).
        """
        num_rows = self._num_prompts + 1  # pragma: no mutate (spare)
        if group_stats_algorithm(prompt_ids.numel(), num_rows, rewards.device) == "sorted":  # pragma: no mutate (fork)
            groups = group_by_prompt(prompt_ids, num_rows)
            sorted_rewards = take(rewards, groups.order)  # [N]
            size = groups.size.to(rewards.dtype)  # [N]
            if weights is None:
                mean = segment_sum(sorted_rewards, groups).div_(size)  # [N]
                deviation = sorted_rewards - mean  # [N]
                std = segment_sum(deviation.square(), groups).div_(size - ddof).sqrt_()  # [N]
                weight = size.reciprocal() if own_weight else None  # [N], 1 / n
                return SampleStats(sorted_rewards, size, deviation, std, weight, groups)
            sorted_weights = take(weights, groups.order)  # [N]
            mass = segment_sum(sorted_weights, groups)  # [N]
            mean = (
                segment_sum(sorted_weights * sorted_rewards, groups).div_(mass).nan_to_num_(0.0)
            )  # [N], 0 if no weight
            deviation = sorted_rewards - mean  # [N]
            spread = segment_sum(sorted_weights * deviation.square(), groups)  # [N]
            std = frequency_std(spread, mass, ddof)  # [N]
            weight = sorted_weights / mass if own_weight else None  # [N]
            count = _weighted_count(size, mass, weight)  # [N]
            return SampleStats(sorted_rewards, count, deviation, std, weight, groups)
        # Dense rows: O(N + R) and no sort.
        # A kept one expanded to [N] (a view) is read in place of a fresh [N] tensor of ones.
        if self._one.dtype != rewards.dtype:  # pragma: no mutate (memory)
            self._one = rewards.new_ones(1)
        count = add_at(
            torch.zeros(num_rows, dtype=rewards.dtype, device=rewards.device), prompt_ids, self._one.expand_as(rewards)
        )
        if weights is None:
            mean = add_at(torch.zeros_like(count), prompt_ids, rewards).div_(count)  # [R], NaN for rows without samples
            deviation = rewards - take(mean, prompt_ids)  # [N]
            std = add_at(torch.zeros_like(count), prompt_ids, deviation.square()).div_(count - ddof).sqrt_()  # [R]
            weight = take(count.reciprocal(), prompt_ids) if own_weight else None  # [N]
            return SampleStats(rewards, count, deviation, std, weight, None, mean=mean, rows=prompt_ids)  # per row
        mass = add_at(torch.zeros_like(count), prompt_ids, weights)  # [R]
        mean = add_at(torch.zeros_like(count), prompt_ids, weights * rewards).div_(mass).nan_to_num_(0.0)  # [R]
        deviation = rewards - take(mean, prompt_ids)  # [N]
        std = frequency_std(add_at(torch.zeros_like(count), prompt_ids, weights * deviation.square()), mass, ddof)
        weight = weights / take(mass, prompt_ids) if own_weight else None  # [N]
        count = _weighted_count(take(count, prompt_ids), take(mass, prompt_ids), weight)  # [N]
        return SampleStats(rewards, count, deviation, take(std, prompt_ids), weight, None)

    def read(self, prompt_ids: torch.Tensor, rewards: torch.Tensor, *, ddof: int) -> SampleStats:
        """Nothing held: count 0, deviation the reward itself, std 0 (see ``Memory.read``)."""
        del ddof
        zero = torch.zeros_like(rewards)
        return SampleStats(rewards, torch.zeros_like(prompt_ids), rewards.clone(), zero, zero, None)

    def estimate(self, prompt_ids: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """NaN estimates and zero counts: nothing is remembered (see ``Memory.estimate``)."""
        nan = torch.full(prompt_ids.shape, float("nan"), dtype=self._dtype, device=prompt_ids.device)
        return nan, nan.clone(), torch.zeros_like(prompt_ids)

    def counts(self, prompt_ids: torch.Tensor) -> torch.Tensor:
        """Zeros: nothing is remembered (see ``Memory.counts``)."""
        return torch.zeros_like(prompt_ids)

    def snapshot(self, prompt_ids: Optional[torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Returns the per-prompt count, always zero: nothing is remembered.

        Args:
            prompt_ids: int64 [M], or None for all P prompts.

        Returns:
            ``{"count": zeros [M]}``.
        """
        size = self._num_prompts if prompt_ids is None else len(prompt_ids)
        return {"count": torch.zeros(size, dtype=torch.int64, device=self._device)}

    def stats_from_snapshot(self, snapshot: Mapping[str, torch.Tensor]) -> Tuple[torch.Tensor, ...]:
        """NaN means and stds, zero counts: nothing is remembered (see ``Memory.stats_from_snapshot``)."""
        count = snapshot["count"]
        nan = torch.full(count.shape, float("nan"), dtype=self._dtype, device=count.device)
        return nan, nan.clone(), torch.zeros_like(count)

    def state_tensors(self) -> Dict[str, torch.Tensor]:
        """No state: an empty dict."""
        return {}

    def assign_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Nothing to assign: there is no state."""
        del state

    def reset_rows(self, rows: torch.Tensor) -> None:
        """Nothing to forget: there is no state."""
        del rows

    def check_state_values(self, state: Mapping[str, torch.Tensor], name: str) -> None:
        """Accepts the (empty) state."""
        del state, name


def masked_row_mean_std(
    rows: torch.Tensor,
    count: torch.Tensor,
    *,
    ddof: int = 0,
    overwrite: bool = False,
    workspace: Optional[torch.Tensor] = None,
    positions: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of the first ``count`` entries of each row.

    Two passes (mean, then deviations from it), never E[x^2] - E[x]^2, so
    float32 keeps the std of rewards far from zero. The squared deviations
    must fit the dtype (below about 1e19 in float32). What float32 cannot
    keep is a mean finer than
    its rounding at the rewards' magnitude (about 1e-7 relative): when a
    prompt's spread is below about 1e-5 of its rewards' magnitude, use
    ``dtype=torch.float64``.

    Args:
        rows: float32 or float64 [*R, K] (accumulate 16-bit buffers in
            float32: see ``ops.compute_dtype``), K <= ``MAX_BUFFER_SIZE``;
            entries at positions >= count must be 0, as they are in
            ``BufferMemory``'s buffer.
        count: int64 [*R], entries in [0, K].
        ddof: the std divides the sum of squared deviations by count - ddof.
        overwrite: work in ``rows``' memory, which is then garbage. One
            [*R, K] temporary fewer: on a CPU, every fresh one of more than a
            few hundred KB can cost page faults.
        workspace: float [*R, K] of ``rows``' dtype to work in instead of a
            fresh temporary (ignored with ``overwrite``), or None.
        positions: ``torch.arange(K)`` in ``rows``' dtype, kept by the
            caller, or None to make it.

    Returns:
        float [*R] mean and float [*R] std; NaN where count is 0 (the std
        also where count <= ddof).
    """
    buffer_size = rows.shape[-1]
    num = count.to(rows.dtype)  # [*R]
    # 1 for the entries that count, 0 for the others, in float arithmetic:
    # several times faster than a bool mask of [*R, K] converted to float.
    # Exact while the dtype holds every integer up to K (MAX_BUFFER_SIZE).
    if positions is None:
        positions = torch.arange(buffer_size, dtype=rows.dtype, device=rows.device)  # [K]
    weight = torch.sub(num.unsqueeze(-1), positions, out=workspace).clamp_(0, 1)  # [*R, K]
    mean = rows.sum(-1) / num  # [*R], entries past count add 0
    # x - mean where x counts, 0 (= x) elsewhere: one pass, written over rows
    # if allowed, else over the weight (which is not needed after this).
    deviation = torch.addcmul(rows, mean.unsqueeze(-1), weight, value=-1, out=rows if overwrite else weight)
    std = torch.linalg.vector_norm(deviation, dim=-1).div_((num - ddof).sqrt() if ddof else num.sqrt())  # [*R]
    return mean, std


class BufferMemory:
    """Each prompt's last K valid rewards, in a ring buffer (``deque(maxlen=K)`` semantics).

    Every reward of the batch is appended to its prompt's buffer in batch
    order; a prompt seen more than K times in one batch keeps its last K
    (see ``Memory`` for the interface). State: ``rewards`` [P, K], ``count`` [P] (rewards stored, at most K) and
    ``head`` [P] (next write position); while a buffer is not full its
    rewards sit at [0, count) and head == count. Internally one int64
    counter per row, ``seen``, holds both: count = min(seen, K), head =
    seen % K.

    The fold's cost grows with N * K, not with P
    (``ops.batch_rows_algorithm``): with fewer rows than samples it counts
    the batch per row and reads the whole [R, K] buffer once; with more, it
    reads the [U, K] rows of the batch's U distinct prompts on a CPU outside
    torch.compile, and the [N, K] rows of its samples elsewhere (fixed
    shapes).

    Args:
        num_prompts: P.
        buffer_size: K, at most ``MAX_BUFFER_SIZE``.
        dtype: floating dtype of the buffer.
        device: where the state lives.

    Raises:
        ValueError: if ``buffer_size`` is not a positive int up to ``MAX_BUFFER_SIZE``.

    Example:
        >>> memory = BufferMemory(2, 2, dtype=torch.float32, device=torch.device("cpu"))
        >>> _ = memory.fold(torch.tensor([0, 0, 0]), torch.tensor([1.0, 2.0, 3.0]), ddof=0, own_weight=False)
        >>> memory.state_tensors()["rewards"][0], memory.counts(torch.tensor([0, 1]))  # 1.0 pushed out
        (tensor([3., 2.]), tensor([2, 0]))
    """

    kind = "buffer"
    unseen_estimate = (math.nan, math.nan)

    def __init__(self, num_prompts: int, buffer_size: int, *, dtype: torch.dtype, device: torch.device) -> None:
        check_positive_int("buffer_size", buffer_size)
        if buffer_size > MAX_BUFFER_SIZE:
            raise ValueError(f"buffer_size must be at most {MAX_BUFFER_SIZE}, got {buffer_size}")
        self._num_prompts, self._dtype, self._device = num_prompts, dtype, device
        self._compute_dtype = compute_dtype(dtype)
        self.buffer_size = buffer_size
        num_rows = num_prompts + 1
        # The R * K buffer slots, then one scratch slot that takes the writes of
        # rewards pushed out within their own batch (a prompt seen more than K
        # times): one scatter writes the batch, whatever the order of its writes.
        self._slots = torch.zeros(num_rows * buffer_size + 1, dtype=dtype, device=device)  # [R * K + 1]
        self._buffer = self._slots[:-1].view(num_rows, buffer_size)  # [R, K]
        self._seen = torch.zeros(num_rows, dtype=torch.int64, device=device)  # [R]
        # Where the row statistics of the whole buffer work: allocated on first
        # use, so that a tracker whose batches are smaller than P never pays it
        # (so capture a CUDA graph after a warm-up update, as torch asks anyway).
        # A fresh [R, K] temporary each update costs page faults on a CPU.
        self._workspace: Optional[torch.Tensor] = None
        # Slot arithmetic in int32 when every slot index fits and the batch is large (ops.slot_index_dtype).
        self._fits_int32 = num_rows * buffer_size < MAX_INT32_SLOTS  # pragma: no mutate (fork)
        # Kept, not made each update (an op each): the one that counts a sample, expanded to [N]
        # per batch, in either slot dtype, and the slots' positions 0..K-1 in the compute dtype
        # (masked_row_mean_std).
        self._ones = {dtype: torch.ones(1, dtype=dtype, device=device) for dtype in (torch.int32, torch.int64)}
        self._slot_positions = torch.arange(buffer_size, dtype=self._compute_dtype, device=device)  # [K]

    def _column(self, column: torch.Tensor) -> torch.Tensor:
        """``column % K`` in place, without an integer division when K is a power of two."""
        buffer_size = self.buffer_size
        if buffer_size & (buffer_size - 1) == 0:  # pragma: no mutate (fork)
            return column.bitwise_and_(buffer_size - 1)
        return column.remainder_(buffer_size)

    def _row_mean_std(
        self, rows: torch.Tensor, count: torch.Tensor, ddof: int, *, workspace: Optional[torch.Tensor] = None
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """``masked_row_mean_std`` with the kept slot positions: in ``workspace`` if given, else over ``rows``.

        Args:
            rows: float [*R, K] in the compute dtype; without ``workspace``,
                a copy of the caller's, which is then garbage.
            count: int64 [*R].
            ddof: as for ``masked_row_mean_std``.
            workspace: float [*R, K] of ``rows``' dtype to work in (``rows``
                is then the buffer itself and left as it is), or None.
        """
        return masked_row_mean_std(
            rows, count, ddof=ddof, overwrite=workspace is None, workspace=workspace, positions=self._slot_positions
        )

    def _live_buffer(self) -> torch.Tensor:
        """The [R, K] buffer, as a fresh view when traced by torch.compile.

        A write through one input (the slots) read through another that
        aliases it (the view kept from the constructor) makes inductor copy
        the whole buffer. Eager, the kept view saves taking one.
        """
        if is_compiling():  # pragma: no mutate (fork)
            return self._slots[:-1].view(self._num_prompts + 1, self.buffer_size)
        return self._buffer

    def fold(self, prompt_ids: torch.Tensor, rewards: torch.Tensor, *, ddof: int, own_weight: bool) -> SampleStats:
        """Appends the batch to the ring buffers, then reads their statistics (see ``Memory.fold``)."""
        algorithm = batch_rows_algorithm(prompt_ids.numel(), self._num_prompts + 1, prompt_ids.device)
        if algorithm == "whole":  # pragma: no mutate (fork)
            return self._fold_all_rows(prompt_ids, rewards, ddof, own_weight)
        if algorithm == "distinct":  # pragma: no mutate (fork)
            return self._fold_distinct_rows(prompt_ids, rewards, ddof, own_weight)
        return self._fold_batch_rows(prompt_ids, rewards, ddof, own_weight)

    def _fold_all_rows(
        self, prompt_ids: torch.Tensor, rewards: torch.Tensor, ddof: int, own_weight: bool
    ) -> SampleStats:
        """``fold`` for R <= N: counts the batch per row and reads the whole buffer once."""
        num_samples = prompt_ids.numel()
        num_rows, buffer_size = self._num_prompts + 1, self.buffer_size
        device, index_dtype = prompt_ids.device, slot_index_dtype(num_samples, self._fits_int32)
        batch_count = torch.zeros(num_rows, dtype=index_dtype, device=device)  # [R]
        add_at(batch_count, prompt_ids, self._ones[index_dtype].expand(num_samples))  # a view, not a fresh [N]
        narrow_ids, order = sort_ids(prompt_ids, num_rows, dtype=index_dtype)  # [N]
        pushed_out = self._write_sorted(self._seen, batch_count, narrow_ids, narrow_ids, rewards, order)  # [N]
        self._seen.add_(batch_count)
        count = self._seen.clamp_max(buffer_size)  # [R]
        buffer = self._live_buffer()
        rows = cast(buffer, self._compute_dtype)  # [R, K], the buffer itself unless 16-bit
        if rows is buffer:
            if self._workspace is None:  # pragma: no mutate (memory)
                self._workspace = torch.empty_like(buffer)
            mean, std = self._row_mean_std(rows, count, ddof, workspace=self._workspace)
        else:
            mean, std = self._row_mean_std(rows, count, ddof)
        weight = None
        if own_weight:
            weight = unsort(pushed_out, order).logical_not_() / take(count, prompt_ids).to(rewards.dtype)
        # No deviation: the estimator subtracts each row's shift (its mean, or the fallback's) itself.
        return SampleStats(rewards, count, None, std, weight, None, mean=mean, rows=prompt_ids)  # per row

    def _fold_distinct_rows(
        self, prompt_ids: torch.Tensor, rewards: torch.Tensor, ddof: int, own_weight: bool
    ) -> SampleStats:
        """``fold`` for R > N on a CPU: ``_fold_all_rows`` over the batch's U distinct rows only.

        The sorted batch's runs of equal ids (``ops.sorted_runs``) are its
        distinct rows, with each one's count in the batch: the batch is then
        ranked and written as ``_fold_all_rows`` does over all R rows, and
        only the U rows written are read back for statistics. So the cost is
        that of a batch of U prompts whatever P, plus the reads and writes of
        U rows that the memory system charges for a large P.
        """
        index_dtype = slot_index_dtype(prompt_ids.numel(), self._fits_int32)
        runs = sorted_runs(prompt_ids, self._num_prompts + 1, dtype=index_dtype)
        seen = take(self._seen, runs.rows)  # [U]
        pushed_out = self._write_sorted(seen, runs.size, runs.run, runs.sorted_ids, rewards, runs.order)  # [N]
        write_at(self._seen, runs.rows, seen.add_(runs.size))
        count = seen.clamp_max(self.buffer_size)  # [U]
        buffer = self._live_buffer().index_select(0, runs.rows)  # [U, K], a copy
        mean, std = self._row_mean_std(cast(buffer, self._compute_dtype), count, ddof)
        run = unsort(runs.run, runs.order)  # [N], each sample's run, in batch order
        weight = None
        if own_weight:
            weight = unsort(pushed_out, runs.order).logical_not_() / take(count, run).to(rewards.dtype)
        return SampleStats(rewards, count, None, std, weight, None, mean=mean, rows=run)  # per run, as _fold_all_rows

    def _write_sorted(
        self,
        seen: torch.Tensor,
        batch_count: torch.Tensor,
        group: torch.Tensor,
        sorted_rows: torch.Tensor,
        rewards: torch.Tensor,
        order: torch.Tensor,
    ) -> torch.Tensor:
        """Appends a sorted batch to its rows' ring buffers; the rows' counters are the caller's to advance.

        Sorted sample i is its group's (i - start)-th of the batch, so it goes
        to column (seen + i - start) % K: one offset per group, one gather.
        A group's samples before its last K are pushed out within the batch
        and go to the scratch slot.

        Args:
            seen: int64 [G], the rewards each group's row had seen before the batch.
            batch_count: integer [G], each group's samples in the batch.
            group: [N], each sorted sample's group, in [0, G), of the slot index dtype.
            sorted_rows: [N], each sorted sample's row, of the slot index dtype.
            rewards: float [N] in batch order.
            order: int64 [N], the permutation that sorted the batch.

        Returns:
            bool [N], in sorted order, the samples pushed out within the batch.
        """
        buffer_size = self.buffer_size
        index_dtype = sorted_rows.dtype
        # [G], one past each group's last sorted position (in its own dtype: int32 counts sum as int32).
        end = batch_count.cumsum(0, dtype=batch_count.dtype)  # pragma: no mutate (dim)
        offset = self._column((seen - end).add_(batch_count)).to(index_dtype)  # [G], (seen - start) % K
        position = torch.arange(group.numel(), dtype=index_dtype, device=group.device)  # [N]
        column = take(offset, group).add_(position)  # [N]
        # Pushed out within the batch: K later samples of the same prompt, i < end - K.
        pushed_out = position < take(end.sub_(buffer_size), group)  # [N]
        scratch = (self._num_prompts + 1) * buffer_size
        slot = self._column(column).add_(sorted_rows, alpha=buffer_size).masked_fill_(pushed_out, scratch)  # [N]
        write_at(self._slots, slot.long(), take(rewards, order))
        return pushed_out

    def _fold_batch_rows(
        self, prompt_ids: torch.Tensor, rewards: torch.Tensor, ddof: int, own_weight: bool
    ) -> SampleStats:
        """``fold`` for R > N: reads the [N, K] rows of the batch's samples, in sorted order."""
        num_rows, buffer_size = self._num_prompts + 1, self.buffer_size
        scratch = num_rows * buffer_size
        groups = group_by_prompt(prompt_ids, num_rows)
        sorted_ids = groups.sorted_ids  # [N]
        sorted_rewards = take(rewards, groups.order)  # [N]
        # Rank r of a prompt's group goes to slot (seen + r) % K. Only its last
        # K samples stay; the earlier ones go to the scratch slot.
        seen = take(self._seen, sorted_ids)  # [N]
        column = (seen + groups.position).sub_(groups.start)  # [N], rewards the prompt had seen before this one
        slot = self._column(column).add_(sorted_ids, alpha=buffer_size)  # [N]
        pushed_out = (groups.end - groups.position).gt(buffer_size)  # [N]
        write_at(self._slots, slot.masked_fill_(pushed_out, scratch), sorted_rewards)
        seen = seen.add_(groups.end).sub_(groups.start)  # [N], after this batch
        write_at(self._seen, sorted_ids, seen)
        count = seen.clamp_max(buffer_size)  # [N]
        compute = self._compute_dtype
        rows = cast(self._live_buffer().index_select(0, sorted_ids), compute)  # [N, K], a copy
        mean, std = self._row_mean_std(rows, count, ddof)
        weight = pushed_out.logical_not() / count.to(compute) if own_weight else None  # [N]
        return SampleStats(sorted_rewards, count, sorted_rewards - mean, std, weight, groups)

    def reset_rows(self, rows: torch.Tensor) -> None:
        """Empties some rows' buffers: no reward seen, every slot 0 (see ``Memory.reset_rows``)."""
        self._seen.index_fill_(0, rows, 0)
        self._live_buffer().index_fill_(0, rows, 0)

    def read(self, prompt_ids: torch.Tensor, rewards: torch.Tensor, *, ddof: int) -> SampleStats:
        """The mean and std of each sample's buffer before the batch (see ``Memory.read``); reads [N, K]."""
        count = self.counts(prompt_ids)  # [N]
        rows = cast(self._live_buffer().index_select(0, prompt_ids), self._compute_dtype)  # [N, K], a copy
        mean, std = self._row_mean_std(rows, count, ddof)
        return _past_stats(rewards, count, mean, std, ddof)

    def estimate(self, prompt_ids: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The buffer's mean, and its population std over sqrt(count) (see ``Memory.estimate``)."""
        mean, std, count = self.stats_from_snapshot(self.snapshot(prompt_ids))
        return mean, std / count.to(std.dtype).sqrt(), count

    def counts(self, prompt_ids: torch.Tensor) -> torch.Tensor:
        """Rewards in each given prompt's buffer, min(seen, K) (see ``Memory.counts``)."""
        return take(self._seen, prompt_ids).clamp_max(self.buffer_size)

    def snapshot(self, prompt_ids: Optional[torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Returns the buffer rows and counts of some prompts (may alias the state).

        Args:
            prompt_ids: int64 [M], or None for all P prompts.

        Returns:
            ``{"rewards": [M, K], "count": [M]}``.
        """
        if prompt_ids is None:
            state = self.state_tensors()
            return {"rewards": state["rewards"], "count": state["count"]}
        return {"rewards": self._buffer.index_select(0, prompt_ids), "count": self.counts(prompt_ids)}

    def stats_from_snapshot(self, snapshot: Mapping[str, torch.Tensor]) -> Tuple[torch.Tensor, ...]:
        """Row means and stds of stacked buffer snapshots (see ``Memory.stats_from_snapshot``)."""
        count = snapshot["count"]
        mean, std = masked_row_mean_std(snapshot["rewards"].to(self._compute_dtype), count)  # [*B, M, K] in
        return mean.to(self._dtype), std.to(self._dtype), count.clone()

    def state_tensors(self) -> Dict[str, torch.Tensor]:
        """``rewards`` [P, K], ``count`` [P] and ``head`` [P], derived from the live buffer and counter."""
        seen = self._seen[:-1]
        return {
            "rewards": self._buffer[:-1],
            "count": seen.clamp_max(self.buffer_size),
            "head": seen % self.buffer_size,
        }

    def assign_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Copies a checked buffer state in, zeroing slots past each count (see ``Memory.assign_state``)."""
        count, head = state["count"].to(self._device), state["head"].to(self._device)
        # Slots past count hold 0 (masked_row_mean_std relies on it), whatever
        # the state dict holds there.
        position = torch.arange(self.buffer_size, device=self._device)  # [K]
        stored = position < count.unsqueeze(-1)  # [P, K]; pragma: no mutate (dim)
        rewards = torch.where(stored, state["rewards"].to(self._device), 0)
        self._buffer[:-1].copy_(rewards)
        self._buffer[-1].zero_()
        # A full buffer has seen K + head rewards, as far as count and head can tell.
        self._seen[:-1].copy_(torch.where(count < self.buffer_size, count, self.buffer_size + head))
        self._seen[-1] = 0  # pragma: no mutate (spare)

    def check_state_values(self, state: Mapping[str, torch.Tensor], name: str) -> None:
        """Refuses counts outside [0, K], heads outside [0, K), head != count below K, non-finite rewards."""
        count, head = state["count"], state["head"]
        check_count_range(name, count, self.buffer_size)
        if ((head < 0) | (head >= self.buffer_size)).any():
            raise ValueError(f"{name} state 'head' must lie in [0, {self.buffer_size})")
        if ((count < self.buffer_size) & (head != count)).any():
            raise ValueError(f"{name} state is inconsistent: a buffer that is not full must have head == count")
        if not torch.isfinite(state["rewards"]).all():
            raise ValueError(f"{name} state 'rewards' must be finite")


class EmaMemory:
    """Exponential moving averages of each prompt's mean and variance.

    Rewards are folded in one at a time, in batch order, per prompt:

    * the first reward ever seen for a prompt: mean = r, var = 0, count = 1;
    * after that: d = r - mean; mean += (1 - decay) * d;
      var = decay * (var + (1 - decay) * d * d); count += 1.

    The fold is vectorised exactly, repeats of a prompt in one batch
    included: each step mixes the old distribution (weight ``decay``) with a
    point mass at r (weight ``1 - decay``), so n steps give the old mean and
    variance weight ``decay**n`` and the i-th of n rewards weight
    ``(1 - decay) * decay**(n - 1 - i)``. Sums are taken of rewards shifted by
    the old mean (never E[r^2] - E[r]^2), and each group's sum adds only its
    own terms in a fixed order (``ops.segment_sum``), so the state is the
    same bit for bit from run to run on CUDA too. The fold runs in float32
    for float16 and bfloat16 state.

    State: ``mean`` [P], ``var`` [P] and ``count`` [P] (rewards seen, int64).

    Args:
        num_prompts: P.
        decay: weight kept by the old statistics at each reward, in (0, 1).
        dtype: floating dtype of the state.
        device: where the state lives.

    Raises:
        ValueError: if ``decay`` is not in (0, 1).

    Example:
        >>> memory = EmaMemory(1, 0.5, dtype=torch.float32, device=torch.device("cpu"))
        >>> _ = memory.fold(torch.tensor([0, 0]), torch.tensor([1.0, 3.0]), ddof=0, own_weight=False)
        >>> memory.state_tensors()  # 1, then d = 2: mean 1 + 0.5 * 2, var 0.5 * (0 + 0.5 * 2**2)
        {'mean': tensor([2.]), 'var': tensor([1.]), 'count': tensor([2])}
    """

    kind = "ema"
    unseen_estimate = (math.nan, math.nan)

    def __init__(self, num_prompts: int, decay: float, *, dtype: torch.dtype, device: torch.device) -> None:
        self.decay = check_discount("decay", decay, allow_one=False)
        self._num_prompts, self._dtype, self._device = num_prompts, dtype, device
        self._compute_dtype = compute_dtype(dtype)
        num_rows = num_prompts + 1
        self._mean = torch.zeros(num_rows, dtype=dtype, device=device)  # [R]
        self._var = torch.zeros(num_rows, dtype=dtype, device=device)  # [R]
        self._count = torch.zeros(num_rows, dtype=torch.int64, device=device)  # [R]
        self._powers = DecayPowers(self.decay, scale=1.0 - self.decay, dtype=self._compute_dtype, device=device)

    def fold(self, prompt_ids: torch.Tensor, rewards: torch.Tensor, *, ddof: int, own_weight: bool) -> SampleStats:
        """Folds the batch into the moving averages, exactly as one reward at a time (see ``Memory.fold``)."""
        decay, compute = self.decay, self._compute_dtype
        groups = group_by_prompt(prompt_ids, self._num_prompts + 1)  # id P included; pragma: no mutate (spare)
        start = groups.start  # [N]
        sorted_rewards = take(rewards, groups.order)  # [N]

        # A prompt seen for the first time starts from its first reward with
        # variance 0; folding that same reward in again then changes nothing.
        old_count = _read_state(self._count, groups)  # [N]
        unseen = old_count == 0  # [N]
        first = take(sorted_rewards, start)  # [N]
        stored_mean = cast(_read_state(self._mean, groups), compute)  # [N]
        stored_var = cast(_read_state(self._var, groups), compute)  # [N]
        old_mean = torch.where(unseen, first, stored_mean)  # [N]
        old_var = stored_var.masked_fill_(unseen, 0.0)  # [N], a fresh gather: no 0-dim tensor for where

        # Closed form of the sequential fold, in coordinates shifted by the old mean.
        shifted = sorted_rewards - old_mean  # [N]
        size = groups.size  # [N]
        weight, old_weight = self._powers.fold_weights(groups, size)  # (1 - decay) * decay ** (n - 1 - i), decay ** n
        shift = segment_sum(weight * shifted, groups)  # [N], new mean - old mean
        spread = segment_sum(weight * (shifted - shift).square(), groups)  # [N]
        mean = old_mean + shift  # [N]
        var = old_weight * (old_var + shift.square()) + spread  # [N]
        count = old_count + size  # [N]
        _write_state(self._mean, groups, mean)
        _write_state(self._var, groups, var)
        _write_state(self._count, groups, count)
        own = None
        if own_weight:
            # A new prompt's first reward also stands in for the old mean: weight
            # decay ** n + (1 - decay) * decay ** (n - 1) = decay ** (n - 1).
            first_ever = unseen & (groups.position == start)  # [N]
            own = torch.where(first_ever, old_weight / decay, weight)  # [N]
        if ddof:
            seen = count.to(compute)  # [N]
            var = var * seen / (seen - ddof)
        return SampleStats(sorted_rewards, count, sorted_rewards - mean, var.sqrt(), own, groups)

    def reset_rows(self, rows: torch.Tensor) -> None:
        """Zeroes some rows' mean, variance and count (see ``Memory.reset_rows``)."""
        for state in (self._mean, self._var, self._count):
            state.index_fill_(0, rows, 0)

    def read(self, prompt_ids: torch.Tensor, rewards: torch.Tensor, *, ddof: int) -> SampleStats:
        """Each sample's moving mean and std before the batch (see ``Memory.read``)."""
        compute = self._compute_dtype
        count = take(self._count, prompt_ids)  # [N]
        mean = cast(take(self._mean, prompt_ids), compute)  # [N]
        var = cast(take(self._var, prompt_ids), compute)  # [N]
        if ddof:
            size = count.to(compute)
            var = var * size / (size - ddof)
        return _past_stats(rewards, count, mean, var.sqrt(), ddof)

    def estimate(self, prompt_ids: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The moving mean, and the moving std times sqrt((1 - decay) / (1 + decay)) (see ``Memory.estimate``)."""
        mean, std, count = self.stats_from_snapshot(self.snapshot(prompt_ids))
        return mean, std * ((1.0 - self.decay) / (1.0 + self.decay)) ** 0.5, count

    def counts(self, prompt_ids: torch.Tensor) -> torch.Tensor:
        """Rewards each given prompt has seen (see ``Memory.counts``)."""
        return take(self._count, prompt_ids)

    def snapshot(self, prompt_ids: Optional[torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Returns the moving mean, variance and count of some prompts (may alias the state).

        Args:
            prompt_ids: int64 [M], or None for all P prompts.

        Returns:
            ``{"mean": [M], "var": [M], "count": [M]}``.
        """
        state = self.state_tensors()
        if prompt_ids is None:
            return state
        return {name: tensor[prompt_ids] for name, tensor in state.items()}

    def stats_from_snapshot(self, snapshot: Mapping[str, torch.Tensor]) -> Tuple[torch.Tensor, ...]:
        """Moving means and stds (sqrt of the variance); NaN for prompts never seen."""
        count = snapshot["count"]
        seen = count > 0
        std = snapshot["var"].to(self._compute_dtype).sqrt().to(self._dtype)
        return torch.where(seen, snapshot["mean"], float("nan")), torch.where(seen, std, float("nan")), count.clone()

    def state_tensors(self) -> Dict[str, torch.Tensor]:
        """``mean`` [P], ``var`` [P] and ``count`` [P]: views of rows [0, P) of the live state."""
        return {"mean": self._mean[:-1], "var": self._var[:-1], "count": self._count[:-1]}

    def assign_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Copies a checked state into rows [0, P) of the live state (see ``Memory.assign_state``)."""
        for name, tensor in self.state_tensors().items():
            tensor.copy_(state[name])

    def check_state_values(self, state: Mapping[str, torch.Tensor], name: str) -> None:
        """Refuses negative counts, non-finite means or variances, and negative variances."""
        check_count_range(name, state["count"])
        if not (torch.isfinite(state["mean"]).all() and torch.isfinite(state["var"]).all()):
            raise ValueError(f"{name} state 'mean' and 'var' must be finite")
        if (state["var"] < 0).any():
            raise ValueError(f"{name} state 'var' must be non-negative")


def _read_state(state: torch.Tensor, groups: PromptGroups) -> torch.Tensor:
    """Each sorted sample's entry of a [R] state: one read per distinct id where the grouping found them.

    With many more rows than samples, the state's entries sit far apart in
    memory: reading each distinct id's once and spreading it over its
    samples from a [U] tensor misses the caches U times, not N times.
    """
    if groups.rows is None:
        return take(state, groups.sorted_ids)
    return take(take(state, groups.rows), groups.run)


def _write_state(state: torch.Tensor, groups: PromptGroups, values: torch.Tensor) -> None:
    """Writes per-sample values that are equal within each group into a [R] state (see ``_read_state``).

    Args:
        state: [R], written in place.
        groups: the batch's grouping.
        values: [N] in sorted order, equal across each group.
    """
    if groups.rows is None:
        write_at(state, groups.sorted_ids, values)
    else:
        write_at(state, groups.rows, take(values, groups.row_start))


def _weighted_count(size: torch.Tensor, mass: torch.Tensor, own: Optional[torch.Tensor]) -> torch.Tensor:
    """Each sample's count under sample weights: its group's samples, or 0 where there is no weighted mean to use.

    A group whose weights sum to 0 has no mean; a sample that holds all of its
    group's weight (``own`` == 1, asked for by a leave-one-out baseline) has
    no others' mean. Either falls back, as a prompt below ``min_count``.

    Args:
        size: float [N], the samples of each sample's group.
        mass: float [N], their weights' sum.
        own: float [N], each sample's share of that sum, or None.

    Returns:
        float [N].
    """
    usable = mass > 0 if own is None else (mass > 0) & (own < 1)
    return torch.where(usable, size, 0)


def _past_stats(
    rewards: torch.Tensor, count: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, ddof: int
) -> SampleStats:
    """``SampleStats`` of statistics read before a batch: finite where a prompt held too little, no own weight."""
    deviation = rewards - torch.where(count > 0, mean, 0.0)  # [N]
    std = torch.where(count > ddof, std, 0.0)  # [N]
    return SampleStats(rewards, count, deviation, std, torch.zeros_like(rewards), None)


def make_memory(
    kind: str,
    num_prompts: int,
    *,
    buffer_size: int,
    decay: float,
    dtype: torch.dtype,
    device: Device,
    repeats: str = "all",
) -> Memory:
    """Builds the memory that ``kind`` names.

    Args:
        kind: ``"none"``, ``"buffer"``, ``"ema"`` or ``"beta"``.
        num_prompts: P.
        buffer_size: K, for ``"buffer"``.
        decay: for ``"ema"`` and ``"beta"``.
        dtype: floating dtype of the state.
        device: a resolved device.
        repeats: for ``"beta"``: ``"all"`` or ``"last"`` (see ``BetaMemory``).

    Returns:
        The memory.

    Raises:
        ValueError: if ``kind`` is unknown, or its parameter is out of range.
    """
    if kind == "none":
        return NoMemory(num_prompts, dtype=dtype, device=device)
    if kind == "buffer":
        return BufferMemory(num_prompts, buffer_size, dtype=dtype, device=device)
    if kind == "ema":
        return EmaMemory(num_prompts, decay, dtype=dtype, device=device)
    if kind == "beta":
        return BetaMemory(num_prompts, decay, repeats=repeats, dtype=dtype, device=device)
    raise ValueError(f"memory must be one of {', '.join(map(repr, MEMORIES))}; got {kind!r}")
