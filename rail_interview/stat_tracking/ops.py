"""Pure tensor functions the trackers are built from: grouping, sums and statistics.

Everything here is sync-free and loop-free, on any device, so that a
tracker's ``update`` built from it can be compiled with
``torch.compile(fullgraph=True)`` and captured in a CUDA graph.

**Algorithm choices.** Ten operations have more than one algorithm, with
identical results (up to float rounding where noted), because the fastest
one depends on the batch size or the device:

=============== ======================================= ==============================
operation       algorithms                              chosen automatically
=============== ======================================= ==============================
grouping        ``"search"``, ``"counts"``, ``"scans"``, search below
                ``"runs"``                              ``LINEAR_GROUPING_MIN_SAMPLES``;
                                                        above, on a CPU counts when
                                                        P <= N, else runs outside
                                                        torch.compile; else scans
segment_sum     ``"index_add"``, ``"segment_reduce"``   index_add on a CPU,
                                                        segment_reduce elsewhere
add_at          ``"index_add"``, ``"scatter_add"``      scatter_add for float values
                                                        from ``SCATTER_ADD_MIN_SAMPLES``
                                                        on a CPU, else index_add
                                                        (``add_at_algorithm``)
sort            ``"direct"``, ``"narrow"``,             on a CPU direct below
                ``"padded"``                            ``PADDED_SORT_MIN_SAMPLES``,
                                                        padded up to
                                                        ``RADIX_SORT_MIN_SAMPLES``,
                                                        narrow from there and off
                                                        a CPU (``sort_algorithm``)
batch_stats     ``"one_pass"``, ``"two_pass"``          two_pass from
                                                        ``TWO_PASS_BATCH_STATS_MIN_SAMPLES``
group_stats     ``"dense"``, ``"sorted"``               dense on a CPU when the rows
                                                        (P + 1) are at most N, else
                                                        sorted
key_table       ``"fixed"``, ``"dynamic"``              dynamic on a CPU outside
                                                        torch.compile, else fixed
                                                        (``keys.KeyTable``)
batch_rows      ``"whole"``, ``"per_sample"``,          whole when the rows (P + 1)
                ``"distinct"``                          are at most N; above, distinct
                                                        on a CPU outside
                                                        torch.compile, else per_sample
                                                        (``batch_rows_algorithm``)
numerator       ``"subtract"``, ``"reuse"``             reuse from
                                                        ``REUSE_DEVIATION_MIN_SAMPLES``
                                                        and 2 R <= N
                                                        on a CPU outside
                                                        torch.compile, else subtract
                                                        (``numerator_algorithm``)
slot_index      ``"int64"``, ``"int32"``                int32 from
                                                        ``INT32_SLOTS_MIN_SAMPLES``
                                                        or under torch.compile
                                                        when every slot fits, else
                                                        int64 (``slot_index_dtype``)
=============== ======================================= ==============================

A path that only one device or one size takes is an untested path unless it
can be forced: ``forced_algorithms(grouping="scans", ...)`` forces any of
them on any device and size. The tests run every tracker through every
choice on small CPU batches; the CUDA tests (``tests/test_cuda.py``, run by ``benchmarks/gpu_check.py``)
forces each on CUDA under the sync-debug mode. Four read a size back to the
host by design and run only where that costs no sync, on a CPU outside
torch.compile: the ``"runs"`` grouping, the ``"distinct"`` batch rows and
the ``"reuse"`` numerator (elsewhere the scans, the per-sample rows and the
subtraction stand in, forced or not), and the ``"dynamic"`` key table (never
chosen on CUDA).

**Precision.** State may be float16 or bfloat16, but statistics are
accumulated in ``compute_dtype(dtype)``: float32 for the 16-bit dtypes (as
PyTorch's own reductions under autocast do), the dtype itself otherwise.

**Mutation notes.** Mutation testing (``benchmarks/cosmic-ray.toml``) skips
every mutant of a line marked ``# pragma: no mutate (tag)``. A line is
marked only where a mutant of it is equivalent, a change no caller can
observe, and holds little else; the tag names the reason:

* ``dim``: a dim 0 of a 1-D tensor turned into -1, the same dim (or a 0
  that -1 replaces as well, such as the floor below every group start in
  ``group_by_prompt``). The package calls the 1-D helpers ``take`` and
  ``add_at`` rather than spell ``dim=0`` at every site.
* ``fork``: the condition of a fork between paths with identical results
  (every fork of the table above, the power-of-two ``% K``, the int16 or
  int32 sort and slot arithmetic, eager ``scatter_`` against traced
  ``index_put_``, the byte order of key digests, skipping per-prompt
  statistics or the final mask where they change nothing): flipping it
  changes speed, never a result; each side is tested by forcing it or on
  its own. (Moving ``MAX_INT32_SLOTS`` up would overflow int32 slot
  indices, but only for buffers of over 2**31 slots, 8 GB, which no test
  allocates.)
* ``spare``: the spare row P of invalid samples, or a scratch column,
  made one larger: it is never reported.
* ``empty``: a shortcut for an empty batch or an empty list, where the
  general path gives the same (empty) result, or skips work that would
  change nothing.
* ``memory``: where a temporary lives (a workspace kept, a tensor
  overwritten), never what it holds.
* ``placeholder``: the initial value of something overwritten before it
  is read (the list ``all_gather_object`` fills, a buffer resized on
  first use).
* ``sentinel``: a marker that any value of its kind would do as well
  (-1 for the size of a rank whose input was refused: any negative size).
* ``sync``: ``unsafe=True`` turned off: torch then validates the offsets
  of ``segment_reduce`` with a host sync, and computes the same sums.
* ``torch``: a fallback for older torch; this torch has both names.

Dimensions: N samples in a batch, P prompts, K buffer slots per prompt.
"""

from __future__ import annotations

import contextlib
import math
from typing import Dict, Iterator, List, NamedTuple, Optional, Tuple

import torch

#: The algorithms of each operation that has more than one (see the module docstring).
ALGORITHMS: Dict[str, Tuple[str, ...]] = {
    "grouping": ("search", "counts", "scans", "runs"),
    "segment_sum": ("index_add", "segment_reduce"),
    "batch_stats": ("one_pass", "two_pass"),
    "group_stats": ("dense", "sorted"),
    "key_table": ("fixed", "dynamic"),
    "batch_rows": ("whole", "per_sample", "distinct"),
    "numerator": ("subtract", "reuse"),
    "add_at": ("index_add", "scatter_add"),
    "sort": ("direct", "narrow", "padded"),
    "slot_index": ("int64", "int32"),
}

#: From this batch size on, ``group_by_prompt`` finds group boundaries in
#: linear time; below it, with binary search (fewer ops, and at small sizes
#: the op count is what costs).
LINEAR_GROUPING_MIN_SAMPLES = 2048

#: From this batch size on, with at most half as many rows as samples, on a
#: CPU, the estimator reuses the memory's deviation as each sample's
#: numerator where no row falls back (``numerator_algorithm``): below, the
#: check's four [R] ops cost more than the two [N] passes it saves.
REUSE_DEVIATION_MIN_SAMPLES = 2048

#: From this batch size on, on a CPU, ``add_at`` adds float values with
#: ``scatter_add_`` instead of ``index_add_``: the same sums in the same order,
#: bit for bit, and faster from a few thousand samples on (``add_at_algorithm``).
SCATTER_ADD_MIN_SAMPLES = 4096

#: From this batch size on, a buffer computes where its batch goes in int32
#: when every slot index fits (half the memory traffic); below, in int64,
#: which saves the casts (``slot_index_dtype``).
INT32_SLOTS_MIN_SAMPLES = 8192

#: From this batch size on, ``batch_mean_std`` takes two passes (mean, then
#: deviations) instead of ``torch.std_mean``: more ops, each much faster.
TWO_PASS_BATCH_STATS_MIN_SAMPLES = 1024

_forced: Dict[str, str] = {}


@contextlib.contextmanager
def forced_algorithms(**choices: Optional[str]) -> Iterator[None]:
    """Forces the algorithm of some operations, whatever the size and device.

    For tests and benchmarks: every algorithm gives the same result, so this
    changes speed, not semantics. Not thread-safe (a module-level setting),
    and read when ``update`` runs or is traced, so compile inside the block.

    Args:
        **choices: operation name (a key of ``ALGORITHMS``) to algorithm
            name, or None to leave that operation automatic.

    Raises:
        ValueError: if an operation or algorithm name is unknown.

    Example:
        >>> ids = torch.tensor([2, 0, 2])
        >>> with forced_algorithms(grouping="scans"):
        ...     group_by_prompt(ids, num_prompts=3).start
        tensor([0, 1, 1])
    """
    for operation, algorithm in choices.items():
        if operation not in ALGORITHMS:
            raise ValueError(f"unknown operation {operation!r}; choose from {sorted(ALGORITHMS)}")
        if algorithm is not None and algorithm not in ALGORITHMS[operation]:
            raise ValueError(f"unknown {operation} algorithm {algorithm!r}; choose from {ALGORITHMS[operation]}")
    before = dict(_forced)
    _forced.update({op: algo for op, algo in choices.items() if algo is not None})
    for operation in [op for op, algo in choices.items() if algo is None]:
        _forced.pop(operation, None)
    try:
        yield
    finally:
        _forced.clear()
        _forced.update(before)


def forced_algorithm(operation: str, default: str) -> str:
    """The algorithm forced for ``operation`` by ``forced_algorithms``, else ``default``.

    Args:
        operation: a key of ``ALGORITHMS``.
        default: the algorithm to use when none is forced.
    """
    return _forced.get(operation, default)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype statistics are accumulated in for state of ``dtype``.

    Args:
        dtype: a floating dtype.

    Returns:
        float32 for float16 and bfloat16 (whose sums overflow or lose the
        small terms), float64 for float64, float32 otherwise.
    """
    return torch.float64 if dtype == torch.float64 else torch.float32


def cast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``tensor.to(dtype)``, without the dispatch that a no-op ``to`` costs.

    Args:
        tensor: any tensor.
        dtype: the dtype wanted.

    Returns:
        ``tensor`` itself if it already has ``dtype``, else a converted copy.
    """
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


def take(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``values[index]`` for 1-D ``values``, by ``index_select`` (no advanced-indexing overhead).

    Args:
        values: [R].
        index: int64 [N], positions in [0, R).

    Returns:
        [N], a new tensor.
    """
    return values.index_select(0, index)  # pragma: no mutate (dim)


def add_at(target: torch.Tensor, index: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``target[index] += values`` for 1-D ``target``, repeats adding up; in place.

    Each entry adds its values in batch order, with either algorithm
    (``add_at_algorithm``), so the sums are the same bit for bit; on a CPU
    that order is sequential, hence deterministic.

    Args:
        target: [R], written in place.
        index: int64 [N], positions in [0, R).
        values: [N] of ``target``'s dtype.

    Returns:
        ``target``.
    """
    # The size first: a small batch unforced takes index_add_ without the call (its dispatch is what costs).
    if values.shape[0] >= SCATTER_ADD_MIN_SAMPLES or _forced:  # pragma: no mutate (fork)
        if add_at_algorithm(values, index.device) == "scatter_add":  # pragma: no mutate (fork)
            return target.scatter_add_(0, index, values)  # pragma: no mutate (dim)
    return target.index_add_(0, index, values)  # pragma: no mutate (dim)


def add_at_algorithm(values: torch.Tensor, device: torch.device) -> str:
    """How ``add_at`` adds: forced, or by size, dtype and device.

    * ``"index_add"``: ``index_add_``. The default for small batches (one
      op's dispatch is what costs there, and ``scatter_add_``'s is longer),
      for integer values (counts, where it is the faster) and off a CPU.
    * ``"scatter_add"``: ``scatter_add_``, whose CPU kernel adds float
      values faster from a few thousand samples on (docs/performance.md,
      "Measurements behind the code's forks"). The default on a CPU for
      float values from ``SCATTER_ADD_MIN_SAMPLES``.

    Both add each entry's values in batch order: bit for bit the same sums
    for float32 and float64 (16-bit values, which the trackers never sum,
    may round differently).

    Args:
        values: the [N] values to add.
        device: the batch's device.

    Returns:
        ``"index_add"`` or ``"scatter_add"``.
    """
    large = values.shape[0] >= SCATTER_ADD_MIN_SAMPLES  # pragma: no mutate (fork)
    faster = large and values.is_floating_point() and device.type == "cpu"  # pragma: no mutate (fork)
    return _forced.get("add_at", "scatter_add" if faster else "index_add")  # pragma: no mutate (fork)


def unsort(values: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Puts 1-D values from sorted order back into batch order: ``result[order] == values``.

    Args:
        values: [N] in sorted order.
        order: int64 [N], the permutation that sorted the batch.

    Returns:
        [N] in batch order, a new tensor.
    """
    return torch.empty_like(values).scatter_(0, order, values)  # pragma: no mutate (dim)


def is_compiling() -> bool:
    """True while torch.compile traces the caller (torch.compiler.is_compiling, torch >= 2.3)."""
    check = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    if check is None:  # torch < 2.3; pragma: no mutate (torch)
        return torch._dynamo.is_compiling()  # pylint: disable=protected-access
    return check()


def write_at(state: torch.Tensor, index: torch.Tensor, values: torch.Tensor) -> None:
    """Writes ``state[index] = values`` in place, the fastest way for the mode.

    Eager, ``scatter_`` is the faster write. Under torch.compile, inductor
    updates ``index_put_`` in place but copies the whole state for
    ``scatter_``, so the traced code uses that. The compiled tests
    (``backend="eager"``) run the traced branch on a CPU.

    Args:
        state: [S] tensor, written in place.
        index: int64 [M], positions in [0, S). Which of several writes to
            one position wins is undefined (on CUDA it varies from run to
            run): give them the same value, unless the position is never
            read (a scratch slot).
        values: [M], converted to ``state``'s dtype.
    """
    values = cast(values, state.dtype)
    if is_compiling():  # pragma: no mutate (fork)
        state.index_put_((index,), values)
    else:
        state.scatter_(0, index, values)  # pragma: no mutate (dim)


class PromptGroups(NamedTuple):
    """A batch sorted by prompt, batch order kept within each prompt's group.

    Attributes:
        sorted_ids: int64 [N], the prompt ids in ascending order.
        order: int64 [N], ``sorted_ids == prompt_ids[order]``.
        start: int64 [N], for each sorted sample, the sorted position of its
            prompt's first sample in the batch.
        end: int64 [N], one past the sorted position of its prompt's last.
        position: int64 [N], ``arange(N)``, the sorted position itself.
        rows: int64 [U], the batch's distinct ids, ascending, where the
            grouping found them (the ``"runs"`` algorithm); else None.
        run: int64 [N], each sorted sample's place in ``rows``, or None.
        row_start: int64 [U], each distinct id's first sorted position, or
            None. With these a memory reads and writes its state once per
            distinct id instead of once per sample.

    Example:
        >>> groups = group_by_prompt(torch.tensor([2, 0, 2]), num_prompts=3)
        >>> groups.sorted_ids, groups.order, groups.size
        (tensor([0, 2, 2]), tensor([1, 0, 2]), tensor([1, 2, 2]))
    """

    sorted_ids: torch.Tensor
    order: torch.Tensor
    start: torch.Tensor
    end: torch.Tensor
    position: torch.Tensor
    rows: Optional[torch.Tensor] = None
    run: Optional[torch.Tensor] = None
    row_start: Optional[torch.Tensor] = None

    @property
    def size(self) -> torch.Tensor:
        """int64 [N], how many samples of the batch have this sample's prompt."""
        return self.end - self.start

    def unsort(self, values: torch.Tensor) -> torch.Tensor:
        """Puts per-sample values from sorted order back into batch order.

        Args:
            values: [N] in sorted order.

        Returns:
            [N] in batch order: ``result[order] == values``.
        """
        return unsort(values, self.order)


#: The most prompts ids are sorted as int32 for, and counted for (a [P] tensor).
MAX_INT32_PROMPTS = 2**31

#: The most prompts ids are sorted as int16 for: torch's radix sort then takes
#: two byte passes instead of four.
MAX_INT16_PROMPTS = 2**15

#: From this size on, torch's CPU sort of a 1-D integer tensor is a radix sort
#: (``at::internal::GRAIN_SIZE``, in a build with fbgemm and OpenMP); below it,
#: a comparison sort.
RADIX_SORT_MIN_SAMPLES = 32768

#: From this batch size on, on a CPU, ``sort_ids`` pads the ids to
#: ``RADIX_SORT_MIN_SAMPLES`` for torch's radix sort (``sort_algorithm``).
PADDED_SORT_MIN_SAMPLES = 8192


def sort_ids(
    prompt_ids: torch.Tensor, num_prompts: Optional[int], *, dtype: torch.dtype = torch.int64
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Stable sort of prompt ids, with the fastest of torch's sorts for the batch's size (``sort_algorithm``).

    Args:
        prompt_ids: int64 [N], ids in [0, num_prompts).
        num_prompts: P, if known; ids can be sorted as int16 when P <=
            ``MAX_INT16_PROMPTS``, as int32 when P <= ``MAX_INT32_PROMPTS``.
        dtype: the integer dtype of the sorted ids returned; it must hold P.

    Returns:
        ``dtype`` [N] sorted ids and int64 [N] ``order``, with
        ``sorted_ids == prompt_ids[order]`` and batch order kept among equal ids.
    """
    num_samples = prompt_ids.shape[0]
    algorithm = sort_algorithm(num_samples, num_prompts, prompt_ids.device)
    if algorithm == "direct":  # pragma: no mutate (fork)
        sorted_ids, order = torch.sort(prompt_ids, stable=True)  # [N]
        return cast(sorted_ids, dtype), order
    narrow = torch.int16 if num_prompts <= MAX_INT16_PROMPTS else torch.int32  # pragma: no mutate (fork)
    if algorithm == "narrow" or num_samples >= RADIX_SORT_MIN_SAMPLES:  # pragma: no mutate (fork)
        sorted_ids, order = torch.sort(prompt_ids.to(narrow), stable=True)  # [N]
        return cast(sorted_ids, dtype), order
    # "padded": the ids, then the narrow dtype's largest value up to the radix sort's size. A stable
    # sort puts every pad after every id (none is larger, and an equal one comes earlier), so the
    # first N entries are the ids' own sort, and their order is in [0, N).
    padded = torch.full((RADIX_SORT_MIN_SAMPLES,), torch.iinfo(narrow).max, dtype=narrow, device=prompt_ids.device)
    padded[:num_samples].copy_(prompt_ids)
    sorted_ids, order = torch.sort(padded, stable=True)  # [RADIX_SORT_MIN_SAMPLES]
    return cast(sorted_ids[:num_samples], dtype), order[:num_samples]


def sort_algorithm(num_samples: int, num_prompts: Optional[int], device: torch.device) -> str:
    """How ``sort_ids`` sorts a batch: forced, or by size, the number of prompts and the device.

    * ``"direct"``: ``torch.sort`` of the int64 ids. The only algorithm
      when P is unknown or above ``MAX_INT32_PROMPTS`` (forced or not); the
      default on a CPU below ``PADDED_SORT_MIN_SAMPLES``, where torch sorts
      by comparison whatever the dtype and a cast would be one op more.
    * ``"narrow"``: the ids cast to int16 (P <= ``MAX_INT16_PROMPTS``) or
      int32 first, which halves or quarters the byte passes of torch's radix
      sort. The default from ``RADIX_SORT_MIN_SAMPLES`` on a CPU, and off a
      CPU.
    * ``"padded"``: the narrow ids padded to ``RADIX_SORT_MIN_SAMPLES``
      entries, so that torch's radix sort takes them instead of its
      comparison sort, which on a CPU takes several times as long from a
      few thousand samples on. The default on a CPU in between, where torch
      has its radix sort (``radix_sort_available``). From
      ``RADIX_SORT_MIN_SAMPLES`` on it is ``"narrow"``.

    All three give the same sorted ids and order.

    Args:
        num_samples: N.
        num_prompts: P, if known.
        device: the batch's device.

    Returns:
        ``"direct"``, ``"narrow"`` or ``"padded"``.
    """
    if num_prompts is None or num_prompts > MAX_INT32_PROMPTS:  # pragma: no mutate (fork)
        return "direct"
    if device.type != "cpu" or num_samples >= RADIX_SORT_MIN_SAMPLES:  # pragma: no mutate (fork)
        default = "narrow"
    elif num_samples >= PADDED_SORT_MIN_SAMPLES and radix_sort_available():  # pragma: no mutate (fork)
        default = "padded"
    else:
        default = "direct"
    return _forced.get("sort", default)


def radix_sort_available() -> bool:
    """Whether torch's CPU sort has its radix sort for integer tensors (a build with fbgemm and OpenMP).

    The proxy of what torch checks internally (``is_radix_sort_accelerated_with_openmp``):
    where it is wrong, ``sort_algorithm`` only picks a slower sort.
    """
    return torch.backends.openmp.is_available() and "fbgemm" in torch.backends.quantized.supported_engines


def _grouping_algorithm(num_samples: int, num_prompts: Optional[int], device: torch.device) -> str:
    """The grouping algorithm for a batch: forced, or by size and device."""
    if "grouping" in _forced:
        algorithm = _forced["grouping"]
        countable = num_prompts is not None and num_prompts <= MAX_INT32_PROMPTS
        if algorithm == "counts" and not countable or algorithm == "runs" and not _reads_sizes_back(device):
            return "scans"
        return algorithm
    if num_samples < LINEAR_GROUPING_MIN_SAMPLES:
        return "search"
    if device.type != "cpu":  # pragma: no mutate (fork)
        return "scans"
    if num_prompts is not None and num_prompts <= num_samples:  # pragma: no mutate (fork)
        return "counts"
    return "runs" if _reads_sizes_back(device) else "scans"  # pragma: no mutate (fork)


def _reads_sizes_back(device: torch.device) -> bool:
    """Whether an algorithm may read a size back to the host: on a CPU (no sync), outside torch.compile."""
    return device.type == "cpu" and not is_compiling()


def group_by_prompt(prompt_ids: torch.Tensor, num_prompts: Optional[int] = None) -> PromptGroups:
    """Sorts a batch by prompt, without a loop (and, but for the ``"runs"`` on a CPU, without a host read).

    Four ways to find each group's boundaries (identical results; see
    ``forced_algorithms``):

    * ``"search"``: binary search in the sorted ids, O(N log N); the fewest
      ops, so the fastest for small batches.
    * ``"counts"``: per-prompt counts and their cumulative sum, O(N + P).
      Needs ``num_prompts`` (at most ``MAX_INT32_PROMPTS``; otherwise the
      scans stand in, forced or not); on CUDA its integer atomics are
      refused by ``torch.use_deterministic_algorithms``, so it is chosen
      automatically only on a CPU.
    * ``"scans"``: cumulative max and min scans over the sorted batch, O(N).
    * ``"runs"``: the runs of equal sorted ids (``sorted_runs``), O(N) in
      one pass, their sizes read back to the host: a third of the scans'
      time on a CPU, where that costs no sync; off a CPU and under
      torch.compile (a data-dependent size) the scans stand in, forced or
      not.

    The linear-time algorithms sort with ``sort_ids``: as int16 or int32 when
    ``num_prompts`` allows, which halves or quarters the cost of torch's
    radix sort of large batches, padded up to the radix sort's size in
    between.

    Args:
        prompt_ids: int64 [N], N >= 1, ids in [0, num_prompts).
        num_prompts: P, if known.

    Returns:
        The sorted batch and each sample's group boundaries.
    """
    num_samples = len(prompt_ids)
    device = prompt_ids.device
    algorithm = _grouping_algorithm(num_samples, num_prompts, device)
    position = torch.arange(num_samples, device=device)  # [N]
    if algorithm == "search":  # pragma: no mutate (fork)
        sorted_ids, order = torch.sort(prompt_ids, stable=True)  # [N]
        start = torch.searchsorted(sorted_ids, sorted_ids)  # [N]
        end = torch.searchsorted(sorted_ids, sorted_ids, right=True)  # [N]
        return PromptGroups(sorted_ids, order, start, end, position)
    if algorithm == "runs":
        runs = sorted_runs(prompt_ids, num_prompts)
        row_end = runs.size.cumsum(0)  # [U]; pragma: no mutate (dim)
        row_start = row_end - runs.size  # [U]
        start, end = take(row_start, runs.run), take(row_end, runs.run)  # [N], [N]
        return PromptGroups(runs.sorted_ids, runs.order, start, end, position, runs.rows, runs.run, row_start)
    sorted_ids, order = sort_ids(prompt_ids, num_prompts)  # [N]
    if algorithm == "counts":
        count = torch.zeros(num_prompts, dtype=torch.int64, device=device)  # [P], samples of each prompt
        add_at(count, prompt_ids, torch.ones_like(prompt_ids))
        end = take(count.cumsum(0), sorted_ids)  # [N]; pragma: no mutate (dim)
        return PromptGroups(sorted_ids, order, end - take(count, sorted_ids), end, position)
    first = torch.ones(num_samples, dtype=torch.bool, device=device)  # [N], first of its group
    first[1:] = sorted_ids[1:] != sorted_ids[:-1]
    last = torch.ones_like(first)  # [N], last of its group
    last[:-1] = first[1:]
    # [N], the latest group start at or before (position 0 always starts one).
    start = torch.where(first, position, 0).cummax(0).values  # pragma: no mutate (dim)
    end = torch.where(last, position + 1, num_samples).flip(0).cummin(0).values.flip(0)  # [N], earliest end after
    return PromptGroups(sorted_ids, order, start, end, position)


def segment_sum(values: torch.Tensor, groups: PromptGroups) -> torch.Tensor:
    """Sums ``values`` over each prompt group and hands every member the sum.

    Each group's sum adds only that group's values, in one fixed order, so
    its rounding error is relative to the group's own magnitudes (never to
    other groups', as differences of one cumulative sum would be) and the
    result is the same bit for bit from run to run. Two algorithms:

    * ``"index_add"``: ``index_add_`` into the group starts; on a CPU it adds
      sequentially, in sorted order. The default there.
    * ``"segment_reduce"``: ``torch.segment_reduce`` over the contiguous
      groups of the sorted batch: a segmented reduction without atomics
      (on CUDA, where ``index_add_`` on floats uses atomics and rounds
      differently from run to run). The default off a CPU.

    Args:
        values: float [N], in sorted-batch order.
        groups: the batch's grouping (``group_by_prompt``).

    Returns:
        float [N] of ``values.dtype``, the sum over the sample's group.
    """
    default = "index_add" if values.device.type == "cpu" else "segment_reduce"  # pragma: no mutate (fork)
    if _forced.get("segment_sum", default) == "index_add":  # pragma: no mutate (fork)
        return take(add_at(torch.zeros_like(values), groups.start, values), groups.start)
    # Segment i is empty unless i starts a group, then it spans the group:
    # offsets are i at a group's start and the group's end elsewhere.
    first = groups.start == groups.position  # [N]
    offsets = torch.cat([torch.where(first, groups.position, groups.end), groups.end[-1:]])  # [N + 1]
    # [N], nonzero at group starts. unsafe=True skips torch's validation of
    # the offsets, which reads them back to the host (a sync); they are valid
    # by construction.
    sums = torch.segment_reduce(
        values,
        "sum",
        offsets=offsets,
        initial=0,
        unsafe=True,  # pragma: no mutate (sync)
    )
    return take(sums, groups.start)


class DecayPowers:
    """A decay's powers for a closed-form fold over groups, read from tables kept between updates.

    Folding a group of n rewards into a moving statistic one at a time
    weighs the old statistic by ``decay ** n`` and the group's i-th reward
    (0-based, in batch order) by ``scale * decay ** (n - 1 - i)``. Both are
    read here from tables of powers: a gather each, in place of a cast and
    a ``pow`` (each about 10 us at N = 256 on a CPU).

    * **The same values whatever the history.** ``torch.pow`` on a CPU can
      differ in the last bit between its vectorised and scalar paths, which
      an element takes by its position in the call; so the powers are
      computed in calls of ``CHUNK`` entries each, and entry k is the same
      in every table, however large it grew: a tracker loaded from a state
      dict continues bit for bit as the one that saved it.
    * **Growth.** The first tables hold ``MIN_ENTRIES`` entries; a batch
      larger than that builds tables twice as large as needed, and the old
      ones are kept alive: a CUDA graph captured with them keeps reading
      valid memory. Under ``torch.compile(dynamic=False)`` a shape compiled
      before a growth recompiles once (its guard on the table's size).

    Args:
        decay: the weight kept per reward, in [0, 1].
        scale: the factor of each reward's weight (``1 - decay`` for an EMA).
        dtype: floating dtype of the weights.
        device: where the tables live.

    Example:
        >>> powers = DecayPowers(0.5, scale=1.0, dtype=torch.float32, device=torch.device("cpu"))
        >>> groups = group_by_prompt(torch.tensor([0, 1, 0, 0]), 2)
        >>> weight, kept = powers.fold_weights(groups, groups.size)
        >>> weight, kept  # sorted order: prompt 0's three rewards, then prompt 1's one
        (tensor([0.2500, 0.5000, 1.0000, 1.0000]), tensor([0.1250, 0.1250, 0.1250, 0.5000]))
    """

    #: Entries computed per ``torch.pow`` call (see the class docstring).
    CHUNK = 1024
    #: Entries of the first tables: batches of up to this many samples never grow them.
    MIN_ENTRIES = 4096

    def __init__(self, decay: float, *, scale: float, dtype: torch.dtype, device: torch.device) -> None:
        self._decay, self._scale, self._dtype, self._device = decay, scale, dtype, device
        self._retired: List[Tuple[torch.Tensor, torch.Tensor]] = []  # replaced tables, kept for captured graphs
        self._kept, self._later = self._tables(self.MIN_ENTRIES)

    def _tables(self, entries: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """``decay ** k`` [>= entries] and ``scale * decay ** (j - 1)`` [>= entries + 1], in chunks of ``CHUNK``."""
        chunks = -(-(entries + 1) // self.CHUNK)  # ceil: decay ** (j - 1) for j = 0 .. entries at least
        exponents = torch.arange(-1, chunks * self.CHUNK - 1, dtype=self._dtype, device=self._device)
        powers = torch.cat([torch.pow(self._decay, part) for part in exponents.split(self.CHUNK)])  # [J]
        return powers[1:], self._scale * powers if self._scale != 1.0 else powers

    def fold_weights(self, groups: PromptGroups, size: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Each sorted sample's weight in its group's fold, and its group's weight on the old statistic.

        Args:
            groups: the batch's grouping (N samples).
            size: int64 [N], ``groups.size`` (which the caller needs too: an op each time it is read).

        Returns:
            [N] ``scale * decay ** (n - 1 - i)`` and [N] ``decay ** n``, in
            ``dtype``, for a sample that is the i-th of its group's n.
        """
        num_samples = groups.position.shape[0]
        if self._kept.shape[0] <= num_samples:  # pragma: no mutate (memory)
            self._retired.append((self._kept, self._later))
            self._kept, self._later = self._tables(2 * num_samples)
        # n - 1 - i later rewards of the group: decay ** (n - 1 - i) is entry (end - position) of _later.
        return take(self._later, groups.end - groups.position), take(self._kept, size)


def group_stats_algorithm(num_samples: int, num_rows: int, device: torch.device) -> str:
    """How in-batch group statistics are summed: forced, or by size and device.

    ``"dense"`` adds into one row per prompt with ``index_add_``: no sort,
    O(N + R), and deterministic on a CPU, where it adds sequentially (on
    CUDA its float atomics are not). ``"sorted"`` sorts the batch and sums
    each group with ``segment_sum``: O(N log N), deterministic everywhere.

    Args:
        num_samples: N.
        num_rows: R, the rows a dense sum would fill.
        device: the batch's device.

    Returns:
        ``"dense"`` or ``"sorted"``.
    """
    default = "dense" if device.type == "cpu" and num_rows <= num_samples else "sorted"
    return _forced.get("group_stats", default)


def batch_rows_algorithm(num_samples: int, num_rows: int, device: torch.device) -> str:
    """Which rows of a memory's state an update reads: forced, or by size and device.

    * ``"whole"``: every row, once (a buffer's whole [R, K]): no per-sample
      gather of rows, so the cheapest while the rows are at most the samples.
    * ``"per_sample"``: each sample's row, in sorted-batch order (N rows,
      repeats included): fixed shapes, no host sync, so CUDA graphs and
      ``torch.compile(fullgraph=True)`` take it.
    * ``"distinct"``: the batch's U distinct rows once each
      (``sorted_runs``), U read back to the host: a CPU has no sync to pay,
      so with many more rows than samples this touches the fewest rows and
      computes the fewest statistics. Off a CPU (a sync) and under
      torch.compile (a size read back breaks the graph), ``"per_sample"``
      stands in, forced or not.

    Args:
        num_samples: N.
        num_rows: R, the memory's rows.
        device: the batch's device.

    Returns:
        ``"whole"``, ``"per_sample"`` or ``"distinct"``.
    """
    if num_rows <= num_samples:  # pragma: no mutate (fork)
        default = "whole"
    else:
        default = "distinct" if device.type == "cpu" else "per_sample"  # pragma: no mutate (fork)
    algorithm = _forced.get("batch_rows", default)
    return "per_sample" if algorithm == "distinct" and not _reads_sizes_back(device) else algorithm


def slot_index_dtype(num_samples: int, fits_int32: bool) -> torch.dtype:
    """The integer dtype a buffer computes its batch's slots in: forced, or by size.

    * ``"int64"``: the ids' own dtype and the one ``scatter_`` takes, so no
      cast: the default below ``INT32_SLOTS_MIN_SAMPLES`` eager, where an
      op's dispatch costs more than its arithmetic, and the only one when
      the slots do not fit int32 (forced or not).
    * ``"int32"``: half the memory traffic, for three casts: the default
      from ``INT32_SLOTS_MIN_SAMPLES`` on when every slot fits, and at any
      size under torch.compile, whose fused kernels have no dispatch to save
      (the compiled buffer update at N = 256 took 1.13 times as long with
      int64).

    Args:
        num_samples: N.
        fits_int32: whether every slot index of the buffer fits int32.

    Returns:
        ``torch.int64`` or ``torch.int32``.
    """
    default = (
        "int32" if num_samples >= INT32_SLOTS_MIN_SAMPLES or is_compiling() else "int64"
    )  # pragma: no mutate (fork)
    narrow = fits_int32 and _forced.get("slot_index", default) == "int32"  # pragma: no mutate (fork)
    return torch.int32 if narrow else torch.int64


def numerator_algorithm(num_samples: int, num_rows: int, device: torch.device) -> str:
    """How the estimator gets each sample's numerator from per-row statistics: forced, or by size and device.

    * ``"subtract"``: the reward minus the row's shift (its mean, or the
      fallback's center where the row falls back), gathered: two [N] passes.
    * ``"reuse"``: the memory's deviation itself (the same subtraction of
      the row's mean, bit for bit) when no row with samples falls back,
      which it reads back to the host; else ``"subtract"``. On a CPU
      outside torch.compile only (a sync elsewhere): ``"subtract"`` stands
      in there, forced or not.

    (With fallback ``"zero"`` the shift is always the mean, so the
    deviation is reused with either algorithm, with no read.)

    Args:
        num_samples: N.
        num_rows: R, the rows of the statistics (the check reads each).
        device: the batch's device.

    Returns:
        ``"subtract"`` or ``"reuse"``.
    """
    saves = num_samples >= REUSE_DEVIATION_MIN_SAMPLES and 2 * num_rows <= num_samples  # pragma: no mutate (fork)
    default = "reuse" if saves else "subtract"  # pragma: no mutate (fork)
    algorithm = _forced.get("numerator", default)
    return "reuse" if algorithm == "reuse" and _reads_sizes_back(device) else "subtract"


class SortedRuns(NamedTuple):
    """A batch sorted by prompt, as runs: its distinct ids and each sample's run.

    Attributes:
        sorted_ids: [N] ids in ascending order (of ``sort_ids``'s dtype).
        order: int64 [N], ``sorted_ids == prompt_ids[order]``, batch order
            kept among equal ids.
        rows: [U] the batch's distinct ids, ascending, of ``sorted_ids``' dtype.
        run: int64 [N], each sorted sample's place in ``rows``.
        size: int64 [U], the samples of each distinct id.

    Example:
        >>> runs = sorted_runs(torch.tensor([7, 2, 7]), 8)
        >>> runs.rows, runs.run, runs.size
        (tensor([2, 7]), tensor([0, 1, 1]), tensor([1, 2]))
    """

    sorted_ids: torch.Tensor
    order: torch.Tensor
    rows: torch.Tensor
    run: torch.Tensor
    size: torch.Tensor


def sorted_runs(
    prompt_ids: torch.Tensor, num_prompts: Optional[int], *, dtype: torch.dtype = torch.int64
) -> SortedRuns:
    """Sorts a batch by prompt and finds its runs of equal ids: O(N) after the sort.

    ``torch.unique_consecutive`` of the sorted ids, one pass, gives the
    distinct ids, each sample's run and each run's size. U is a size read
    back from the device: eager CPU code only (the ``"runs"`` grouping and
    the ``"distinct"`` batch rows).

    Args:
        prompt_ids: int64 [N], N >= 1, ids in [0, num_prompts).
        num_prompts: P, if known (the sort's own dtype, see ``sort_ids``).
        dtype: the integer dtype of the sorted ids and rows returned; it
            must hold P.

    Returns:
        The sorted batch and its runs.
    """
    sorted_ids, order = sort_ids(prompt_ids, num_prompts, dtype=dtype)  # [N]
    rows, run, size = torch.unique_consecutive(sorted_ids, return_inverse=True, return_counts=True)
    return SortedRuns(sorted_ids, order, rows, run, size)


def _batch_stats_algorithm(num_samples: int) -> str:
    """The batch statistics algorithm for N samples: forced, or by size."""
    default = "two_pass" if num_samples >= TWO_PASS_BATCH_STATS_MIN_SAMPLES else "one_pass"
    return _forced.get("batch_stats", default)


def batch_mean_std(
    rewards: torch.Tensor, valid: Optional[torch.Tensor] = None, *, ddof: int = 0
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation of a whole batch, or of its valid samples.

    Two algorithms for a batch without a mask (see ``forced_algorithms``):
    ``"one_pass"`` (``torch.std_mean``) and ``"two_pass"`` (the mean, then
    the norm of the deviations: more ops, each much faster at large N). With
    a mask, two passes over the valid samples, with no host sync.

    Args:
        rewards: float [N], N >= 1; pass them in ``compute_dtype``. With
            ``valid``, rewards of invalid samples must be 0.
        valid: bool [N], the samples that count, or None for all of them.
        ddof: the std divides the sum of squared deviations by n - ddof, n
            the number of samples that count.

    Returns:
        Two scalar tensors of ``rewards.dtype``: mean and std; the std is 0
        when n <= ddof, the mean NaN when no sample counts.
    """
    if valid is not None:
        num = valid.sum(dtype=rewards.dtype)  # n, a tensor: no host sync
        mean = rewards.sum() / num
        deviation = torch.where(valid, rewards - mean, 0)  # [N]
        # With n <= ddof the norm is 0 (no deviation, or one of exactly 0), and
        # so is the std.
        return mean, torch.linalg.vector_norm(deviation) * (num - ddof).clamp_min(1).rsqrt()
    num_samples = rewards.shape[0]
    if num_samples <= ddof:  # a shape, not a value: no host sync
        return rewards.mean(), rewards.new_zeros(())
    if _batch_stats_algorithm(num_samples) == "one_pass":
        std, mean = torch.std_mean(rewards, correction=ddof)
        return mean, std
    mean = rewards.mean()
    return mean, torch.linalg.vector_norm(rewards - mean) / math.sqrt(num_samples - ddof)


def weighted_mean_std(
    values: torch.Tensor,
    valid: Optional[torch.Tensor] = None,
    weights: Optional[torch.Tensor] = None,
    *,
    ddof: int = 0,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Mean and std over dim 0 of the samples that count, each counted ``weights`` times.

    Frequency weights: a sample of weight w counts as w copies of its value
    (a response of w tokens in a token-weighted statistic), so the mean is
    ``sum(w x) / sum(w)`` and the variance ``sum(w (x - mean)^2) / (sum(w)
    - ddof)``, centred (two passes, never E[x^2] - E[x]^2). Columns are
    independent: over [N, C] values, each of the C columns gets its own mean
    and std from its own valid entries. No host sync.

    Args:
        values: float [N] or [N, C]; entries that do not count may hold anything finite.
        valid: bool of ``values``' shape, or [N] for every column, or None
            for all.
        weights: float [N] (one weight per sample, every column), or None for ones.
        ddof: subtracted from the weights' sum before dividing.

    Returns:
        Mean and std, scalars for [N] values or [C] for [N, C] (``values``'
        dtype); the std is 0 where the weights' sum is at most ``ddof``, the
        mean NaN where nothing counts.

    Example:
        >>> weighted_mean_std(torch.tensor([1.0, 4.0]), weights=torch.tensor([2.0, 1.0]))
        (tensor(2.), tensor(1.4142))
    """
    columns = values.shape[1:]
    mass = torch.ones_like(values) if weights is None else weights.to(values.dtype).view(-1, *[1] * len(columns))
    if valid is not None:
        mask = valid if valid.shape == values.shape else valid.view(-1, *[1] * len(columns))
        mass = torch.where(mask, mass, 0).expand_as(values)
    else:
        mass = mass.expand_as(values)
    total = mass.sum(0)  # [*C]
    mean = (mass * values).sum(0) / total  # [*C]
    deviation = torch.where(mass > 0, values - mean, 0)  # [N, *C]
    return mean, frequency_std((mass * deviation.square()).sum(0), total, ddof)


def frequency_std(spread: torch.Tensor, mass: torch.Tensor, ddof: int) -> torch.Tensor:
    """The std of frequency-weighted values: ``sqrt(spread / (mass - ddof))``, 0 where ``mass <= ddof``.

    Args:
        spread: float, the weighted sum of squared deviations from the mean.
        mass: float of ``spread``'s shape, the weights' sum.
        ddof: subtracted from ``mass``.

    Returns:
        float of ``spread``'s shape.
    """
    excess = mass - ddof
    return torch.where(excess > 0, spread / excess.clamp_min(torch.finfo(spread.dtype).tiny), 0).sqrt()
