"""Prompt keys: stable 64-bit keys for prompts, and the table that maps them to tracker rows.

Trackers index their state by row. With ``keys="ids"`` (the default) the
caller numbers prompts 0 .. P - 1 itself (``PromptIndex`` does it for
strings). With ``keys="hashed"`` a tracker takes any int64 keys and a
``KeyTable`` of P rows maps them to rows, forgetting the least recently
seen keys when new ones need room. That serves prompt streams larger than
memory, open-ended ones, and several ranks (the table needs no collective:
every rank updates it with the same gathered batch).

Two key functions, both stable across processes, runs and machines:

* ``prompt_keys(strings)``: BLAKE2b of the UTF-8 text, on the host
  (about 0.4 us per prompt).
* ``token_keys(token_ids, attention_mask)``: a hash of the kept tokens, on
  the tensors' device with no host sync; padding, left or right, does not
  change the key.

Collisions: two different prompts share a key with probability about
2**-64 per pair, so among n distinct prompts about n**2 / 2**65 pairs
collide (n = 10**7: about 3e-6). Prompts that collide are one prompt to the
tracker: they share statistics. Neither function is cryptographic: keys
can be forced to collide on purpose.

Integer arithmetic: the hashes multiply and add int64 tensors, relying on
two's complement wrap-around, which torch's CPU and CUDA kernels both do
(the tests pin keys to fixed values; the GPU check compares the devices).

Dimensions: N samples, L tokens per sample, P rows (``capacity``), W slots
per bucket of the table's hash index.
"""

from __future__ import annotations

import hashlib
import struct
import sys
from typing import Dict, Mapping, NamedTuple, Optional, Sequence

import torch

from rail_interview.stat_tracking.base import Device, check_positive_int, is_integer_dtype, resolve_device
from rail_interview.stat_tracking.ops import forced_algorithm, is_compiling, write_at

__all__ = ["KeyTable", "KeyAssignment", "mix64", "prompt_keys", "token_keys"]


def _signed(value: int) -> int:
    """A 64-bit unsigned constant as the int64 with the same bits."""
    return value - (1 << 64) if value >= 1 << 63 else value


# splitmix64's finalizer (Steele, Lea and Flood, 2014): a bijection of 64-bit words.
_MIX_1 = _signed(0xBF58476D1CE4E5B9)
_MIX_2 = _signed(0x94D049BB133111EB)
# Constants that separate the roles of the values token_keys mixes.
_GOLDEN = _signed(0x9E3779B97F4A7C15)
_TOKEN_SEED = _signed(0x2545F4914F6CDD1D)
_LENGTH_SEED = _signed(0x27BB2EE687B0B0FD)


def _shift_right(value: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical (unsigned) right shift of int64 words: the arithmetic shift, sign bits cleared."""
    return (value >> bits) & ((1 << (64 - bits)) - 1)


def mix64(value: torch.Tensor) -> torch.Tensor:
    """Scrambles int64 words with splitmix64's finalizer, a bijection on 64 bits.

    Distinct inputs give distinct outputs, and nearby inputs (0, 1, 2, ...)
    give outputs that look independent, so any bits of the result can pick
    a hash bucket.

    Args:
        value: int64 [*], on any device.

    Returns:
        int64 [*], on the same device.

    Example:
        >>> mix64(torch.tensor([0, 1]))
        tensor([                  0, 6238072747940578789])
    """
    value = value ^ _shift_right(value, 30)
    value = value * _MIX_1
    value = value ^ _shift_right(value, 27)
    value = value * _MIX_2
    return value ^ _shift_right(value, 31)


def prompt_keys(prompts: Sequence[str], *, device: Device = None) -> torch.Tensor:
    """Stable 64-bit keys of prompt strings: the same on every process, run and machine.

    Each key is the first 8 bytes of the BLAKE2b digest of the prompt's
    UTF-8 bytes, read as a little-endian int64 (unlike Python's ``hash``,
    which is salted per process). Equal strings get equal keys; for the
    chance that different ones do, see the module docstring.

    Args:
        prompts: [N] prompt strings.
        device: where to put the keys (computed on the host).

    Returns:
        int64 [N] keys on ``device``.

    Raises:
        TypeError: if ``prompts`` is a single string or holds a non-string.

    Example:
        >>> prompt_keys(["a cat", "a dog", "a cat"])
        tensor([-6711169336525982361, -4081912340589182210, -6711169336525982361])
    """
    if isinstance(prompts, str):
        raise TypeError(f"prompts must be a sequence of strings, got the single string {prompts!r}")
    digests = bytearray()
    count = 0
    for prompt in prompts:
        if not isinstance(prompt, str):
            raise TypeError(f"prompts must be strings, got {type(prompt).__name__}: {prompt!r}")
        digests += hashlib.blake2b(prompt.encode("utf-8"), digest_size=8).digest()
        count += 1
    if count == 0:
        keys = torch.zeros(0, dtype=torch.int64)
    elif sys.byteorder == "little":  # pragma: no mutate (both read the same little-endian words)
        keys = torch.frombuffer(digests, dtype=torch.int64)
    else:
        keys = torch.tensor(struct.unpack(f"<{count}q", bytes(digests)), dtype=torch.int64)
    return keys.to(resolve_device(device))


def token_keys(token_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Keys of token sequences, on their device with no host sync; padding does not count.

    Only the tokens the mask keeps count, each with its position among the
    kept tokens, so a sequence padded on the left, on the right or not at
    all gets the same key. A GPU trainer can key prompts by their token ids
    without decoding them to strings. The key mixes every (token, position)
    pair with ``mix64``, sums them, and mixes the sum with the length.

    Args:
        token_ids: integer [N, L], the prompts' token ids.
        attention_mask: [N, L] of 0/1 or bool on the same device, 1 where the
            token belongs to the prompt, or None to keep every token.

    Returns:
        int64 [N] keys on ``token_ids``' device.

    Raises:
        TypeError: if ``token_ids`` is not an integer tensor, or the mask is
            not integer or bool.
        ValueError: if ``token_ids`` is not 2-D or the mask's shape or device differs.

    Example:
        >>> right = token_keys(torch.tensor([[5, 6, 0]]), torch.tensor([[1, 1, 0]]))
        >>> left = token_keys(torch.tensor([[0, 5, 6]]), torch.tensor([[0, 1, 1]]))
        >>> bool(right == left), bool(right == token_keys(torch.tensor([[5, 6]])))
        (True, True)
    """
    if not isinstance(token_ids, torch.Tensor) or not is_integer_dtype(token_ids.dtype):
        kind = token_ids.dtype if isinstance(token_ids, torch.Tensor) else type(token_ids).__name__
        raise TypeError(f"token_ids must be an integer tensor, got {kind}")
    if token_ids.ndim != 2:
        raise ValueError(f"token_ids must be 2-D [N, L], got shape {tuple(token_ids.shape)}")
    tokens = token_ids.long()
    if attention_mask is None:
        keep = torch.ones_like(tokens, dtype=torch.bool)
    else:
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.dtype.is_floating_point \
                or attention_mask.dtype.is_complex:
            kind = attention_mask.dtype if isinstance(attention_mask, torch.Tensor) else type(attention_mask).__name__
            raise TypeError(f"attention_mask must be an integer or bool tensor, got {kind}")
        if attention_mask.shape != token_ids.shape or attention_mask.device != token_ids.device:
            raise ValueError(
                f"attention_mask must have token_ids' shape {tuple(token_ids.shape)} and device "
                f"{token_ids.device}, got {tuple(attention_mask.shape)} on {attention_mask.device}"
            )
        keep = attention_mask != 0
    position = keep.long().cumsum(1)  # [N, L], 1 + the token's position among the kept ones
    pair = mix64(mix64(tokens ^ _TOKEN_SEED) + position * _GOLDEN)  # [N, L]
    total = torch.where(keep, pair, 0).sum(1)  # [N], wraps around
    length = keep.sum(1)  # [N]
    return mix64(total ^ mix64(length + _LENGTH_SEED))


class KeyAssignment(NamedTuple):
    """Where a batch's samples go, as ``KeyTable.assign`` decided.

    Attributes:
        rows: int64 [N], each sample's row in [0, P), or P (the spare row)
            for samples that are invalid or overflow.
        overflow: bool [N], valid samples whose key got no row: the batch
            brought more distinct keys than the table holds, and this key
            was not among the P seen last (see ``KeyTable``).
        fresh: int64 [F], rows given to keys new to the table, whose
            statistics must start over; P pads it (reset the spare row too,
            or skip it).
        group: int64 [N], each sample's key as an index in [0, N) into the
            batch's distinct keys (samples with equal keys share it), or N
            for an invalid sample.
    """

    rows: torch.Tensor
    overflow: torch.Tensor
    fresh: torch.Tensor
    group: torch.Tensor


class KeyTable:
    """Maps any int64 keys to P rows, evicting the least recently seen keys when full.

    **Semantics** (``ReferenceKeyTable`` in ``reference.py`` is the plain
    version the tests compare with). Each key holds a row while it is among
    the P keys seen most recently. Recency is by sample: an update of N
    samples orders its keys by their last occurrence in the batch, after
    every key of earlier updates. So after each update the table holds the
    P most recently seen distinct keys (fewer until P have been seen):

    * a key already in the table keeps its row;
    * a key new to the table takes the row of the least recently seen key
      (or a never used row), whose statistics start over: an evicted prompt
      that comes back starts from nothing, with the tracker's fallback;
    * a batch with more than P distinct keys keeps the P seen last in it;
      the others' samples *overflow*: they get no row, the tracker gives
      them its fallback, and they are forgotten after the update. Build the
      table with at least as many rows as distinct prompts per batch.

    Invalid samples (``valid`` False) are not seen: they neither add nor
    refresh a key.

    **Hash index.** Rows are found through an index of 2**k >= 4 P slots in
    buckets of W = ``BUCKET_SLOTS``, keyed by ``mix64(key)``. A key whose
    bucket already holds W keys cannot be indexed: it keeps its row for
    this update and is forgotten after it, as if evicted. With at most P
    keys in at least P / 8 buckets (mean load 8 of 32) that has a chance
    below 1e-10 per new key (about 3e-4 over ten million new keys); the
    table counts it in ``index_overflows``.

    **Speed.** An update costs O(N log N) (a sort of the batch's keys) plus
    the choice of rows to evict. Two algorithms give the same rows (see
    ``ops.forced_algorithms(eviction=...)``):

    * ``"topk"``: the oldest rows by ``torch.topk`` over all P rows, every
      update: O(P), no host sync and fixed shapes (on CUDA, and whenever
      torch.compile traces the update);
    * ``"queue"``: a queue of the oldest rows, sorted once by that same
      top-k and then consumed, rebuilt when it runs out: O(N) per update
      plus an occasional O(P) rebuild. It reads a few counts back to
      decide, free on a CPU, so it is the CPU default outside torch.compile.

    State, on ``device``: ``keys`` int64 [P] (the key in each row),
    ``last_seen`` int64 [P] (the clock value when the key was last seen,
    -1 for an unused row) and ``clock`` int64 [] (samples seen so far). The
    hash index and the queue are rebuilt from them on load.

    Args:
        capacity: P, the rows.
        device: where the table lives.

    Example:
        >>> table = KeyTable(2)
        >>> table.assign(torch.tensor([7, 9, 7])).rows
        tensor([1, 0, 1])
        >>> table.assign(torch.tensor([5])).rows  # 9 was last seen before 7: 5 takes its row
        tensor([0])
        >>> table.lookup(torch.tensor([9, 7, 5]))
        tensor([-1,  1,  0])
    """

    #: Slots per bucket of the hash index.
    BUCKET_SLOTS = 32

    def __init__(self, capacity: int, *, device: Device = None) -> None:
        check_positive_int("capacity", capacity)
        self._capacity = capacity
        self._device = device = resolve_device(device)
        num_slots = max(2 * self.BUCKET_SLOTS, 1 << (4 * capacity - 1).bit_length())
        self._num_slots = num_slots
        self._num_buckets = num_slots // self.BUCKET_SLOTS
        # Bucket = the top bits of mix64(key), so sorting by it sorts by bucket.
        self._bucket_shift = 64 - (self._num_buckets.bit_length() - 1)
        rows = capacity + 1  # row P: a scratch row for masked writes
        self._row_key = torch.zeros(rows, dtype=torch.int64, device=device)  # [P + 1]
        # Unused rows are older than any key: stamps -P .. -1 (oldest first), then >= 0.
        self._row_stamp = torch.arange(-capacity, 1, dtype=torch.int64, device=device)  # [P + 1]
        self._row_slot = torch.full((rows,), num_slots, dtype=torch.int64, device=device)  # [P + 1]
        self._slot_key = torch.zeros(num_slots + 1, dtype=torch.int64, device=device)  # slot S: scratch
        self._slot_row = torch.full((num_slots + 1,), -1, dtype=torch.int64, device=device)  # -1: empty
        self._clock = torch.zeros((), dtype=torch.int64, device=device)
        self._index_overflows = torch.zeros((), dtype=torch.int64, device=device)
        # The eviction queue (algorithm "queue"): rows by increasing stamp, as
        # they were when it was built, consumed from _queue_head.
        self._queue_rows = torch.zeros(0, dtype=torch.int64, device=device)
        self._queue_stamps = torch.zeros(0, dtype=torch.int64, device=device)
        self._queue_head = 0

    @property
    def capacity(self) -> int:
        """P, the rows of the table."""
        return self._capacity

    @property
    def index_overflows(self) -> torch.Tensor:
        """int64 scalar: keys that found their index bucket full (see the class docstring)."""
        return self._index_overflows

    def _bucket(self, mixed: torch.Tensor) -> torch.Tensor:
        """The index bucket of mixed keys: their top bits, so increasing with ``mixed``."""
        return (mixed >> self._bucket_shift) + self._num_buckets // 2

    def _probe(self, mixed: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """Rows of keys in the index, -1 where absent (int64 [M] in, [M] out)."""
        slots = self._bucket(mixed).mul_(self.BUCKET_SLOTS).unsqueeze(1) + torch.arange(
            self.BUCKET_SLOTS, device=self._device)  # [M, W]
        rows = self._slot_row[slots]  # [M, W]
        match = (self._slot_key[slots] == keys.unsqueeze(1)) & (rows >= 0)  # [M, W]
        return torch.where(match, rows, -1).amax(1)  # [M]

    def lookup(self, keys: torch.Tensor) -> torch.Tensor:
        """Rows of keys in the table, changing nothing.

        Args:
            keys: int64 [M] on ``device``.

        Returns:
            int64 [M], the row of each key, or -1 for a key not in the table.
        """
        if keys.shape[0] == 0:  # pragma: no mutate (shapes only)
            return keys.clone()
        return self._probe(mix64(keys), keys)

    def keys(self) -> "tuple[torch.Tensor, torch.Tensor]":
        """The key in each row, and which rows hold one.

        Returns:
            int64 [P] keys (0 in unused rows) and bool [P], True for rows
            that hold a key; new tensors.
        """
        return self._row_key[:-1].clone(), self._row_stamp[:-1] >= 0

    def assign(self, keys: torch.Tensor, valid: Optional[torch.Tensor] = None) -> KeyAssignment:
        """Gives each sample's key a row, new keys evicting the least recently seen.

        No Python loop over samples or keys; with the ``"topk"`` algorithm no
        host sync either, and fixed shapes.

        Args:
            keys: int64 [N], N >= 1, on ``device``.
            valid: bool [N], or None for all valid; invalid samples' keys
                are ignored.

        Returns:
            The ``KeyAssignment``.
        """
        num_samples, capacity, device = keys.shape[0], self._capacity, self._device
        position = torch.arange(num_samples, device=device)  # [N]
        # 1. The batch's distinct keys, sorted by mixed key (hence by bucket).
        mixed = mix64(keys)  # [N]
        sorted_mixed, order = torch.sort(mixed, stable=True)  # [N]
        first = torch.ones(num_samples, dtype=torch.bool, device=device)  # [N]
        first[1:] = sorted_mixed[1:] != sorted_mixed[:-1]
        sorted_group = first.cumsum(0).sub_(1)  # [N], distinct key index, in sorted order
        group = torch.empty_like(sorted_group).scatter_(0, order, sorted_group)  # [N], batch order
        # Per distinct key g in [0, N) (entries past the number of keys are padding):
        group_mixed = torch.zeros_like(mixed).scatter_(0, sorted_group, sorted_mixed)  # [N]
        group_key = torch.zeros_like(keys).scatter_(0, group, keys)  # [N]
        seen_at = position if valid is None else torch.where(valid, position, -1)  # [N]
        last = torch.full_like(position, -1).scatter_reduce_(0, group, seen_at, "amax")  # [N], -1: not seen
        seen = last >= 0  # [N], keys this update sees
        # 2. Recency: the batch's keys are newer than every earlier one, by last occurrence.
        before = self._clock.clone()  # stamps of this update are >= before
        stamp = before + last  # [N]
        self._clock.add_(num_samples)
        # Keys with P or more keys seen after them in this batch overflow.
        is_last = torch.zeros(num_samples + 1, dtype=torch.int64, device=device)  # [N + 1]
        is_last.scatter_(0, torch.where(seen, last, num_samples), 1)
        newer = is_last[:-1].flip(0).cumsum(0).flip(0) - is_last[:-1]  # [N], later last occurrences
        kept = seen & (newer.index_select(0, last.clamp_min(0)) < capacity)  # [N]
        # 3. Keys already in the table keep their rows (kept ones get the new stamp).
        found_row = self._probe(group_mixed, group_key)  # [N]
        hit = kept & (found_row >= 0)  # [N]
        write_at(self._row_stamp, torch.where(hit, found_row, capacity), stamp)
        new = kept & (found_row < 0)  # [N]
        # 4. New keys take the oldest rows, in the order of their mixed keys.
        new_rank = new.cumsum(0).sub_(1)  # [N], among new keys
        victims = self._oldest_rows(new.sum(), min(num_samples, capacity), before)  # [V], increasing stamp
        row = torch.where(hit, found_row, capacity)  # [N]
        victim = victims.index_select(0, new_rank.clamp(0, victims.shape[0] - 1))  # [N]
        victim = torch.where(new, victim, capacity)  # [N]
        row = torch.where(new, victim, row)
        # 5. Evicted keys leave the index; new keys enter it.
        write_at(self._slot_row, self._row_slot.index_select(0, victim), torch.full_like(victim, -1))
        # Buckets of the distinct keys, non-decreasing (padding entries past them: the last + 1).
        padding = position > sorted_group[-1]  # [N]
        bucket = torch.where(padding, self._num_buckets, self._bucket(group_mixed))  # [N]
        slot = self._free_slots(bucket, new, new_rank)  # [N], num_slots where none
        write_at(self._slot_key, slot, group_key)
        write_at(self._slot_row, slot, torch.where(slot < self._num_slots, victim, -1))
        write_at(self._row_slot, victim, slot)
        write_at(self._row_key, victim, group_key)
        write_at(self._row_stamp, victim, stamp)
        self._index_overflows.add_((new & (slot == self._num_slots)).sum())
        # 6. Per sample.
        sample_row = row.index_select(0, group)  # [N]
        sample_seen = seen.index_select(0, group) if valid is None else valid  # [N]
        overflow = sample_seen & (sample_row == capacity)  # [N]
        if valid is not None:
            sample_row = torch.where(valid, sample_row, capacity)
            group = torch.where(valid, group, num_samples)
        return KeyAssignment(sample_row, overflow, victim, group)

    def _oldest_rows(self, needed: torch.Tensor, most: int, before: torch.Tensor) -> torch.Tensor:
        """The rows of least stamp, oldest first: at least the ``needed`` oldest.

        Args:
            needed: int64 scalar, the rows wanted (at most ``most``).
            most: a bound on ``needed`` known on the host.
            before: int64 scalar, the clock when this update began: rows
                with a stamp from it on were seen by this update.

        Returns:
            int64 [V] rows in increasing stamp; its first ``needed`` entries
            are the ``needed`` rows of least stamp.
        """
        if _eviction_algorithm(self._device) == "topk":
            return torch.topk(self._row_stamp[:-1], most, largest=False, sorted=True).indices
        wanted = int(needed)  # a CPU tensor: reading it costs no sync
        if wanted == 0:
            return torch.zeros(1, dtype=torch.int64, device=self._device)
        rows = self._take_from_queue(wanted)
        if rows is None:
            size = min(self._capacity, max(16 * most, 4096))
            stamps, rows = torch.topk(self._row_stamp[:-1], size, largest=False, sorted=True)
            # Only rows this update has not seen: every row left out must be
            # newer than every row kept, and this update's stamps interleave.
            older = int(torch.searchsorted(stamps, before))
            self._queue_rows, self._queue_stamps, self._queue_head = rows[:older], stamps[:older], 0
            rows = self._take_from_queue(wanted)
        return rows

    def _take_from_queue(self, wanted: int) -> Optional[torch.Tensor]:
        """The ``wanted`` oldest rows from the queue, or None if it holds fewer.

        The queue's entries whose row still has the stamp it had when the
        queue was built are the oldest rows of the table, in order: every
        row outside the queue was newer then, and a row only ever gets newer.
        """
        entries = self._queue_rows[self._queue_head:]
        if entries.shape[0] < wanted:
            return None
        stamps = self._queue_stamps[self._queue_head:]
        # Stale entries (rows seen since) are skipped: look a little past the
        # wanted count first, then at the whole rest.
        for length in (min(entries.shape[0], 2 * wanted + 64), entries.shape[0]):
            unchanged = self._row_stamp.index_select(0, entries[:length]) == stamps[:length]
            count = unchanged.cumsum(0)
            if int(count[-1]) >= wanted:
                end = int(torch.searchsorted(count, wanted)) + 1  # one past the wanted-th unchanged entry
                self._queue_head += end
                return entries[:end][unchanged[:end]]
        return None

    def _free_slots(self, bucket: torch.Tensor, new: torch.Tensor, new_rank: torch.Tensor) -> torch.Tensor:
        """Index slots for new keys: the r-th free slot of its bucket for the r-th new key there.

        Args:
            bucket: int64 [N], non-decreasing: the bucket of each new key,
                any value (up to ``num_buckets``) for the others.
            new: bool [N], the keys to place.
            new_rank: int64 [N], each new key's rank among the new keys.

        Returns:
            int64 [N], a free slot for each new key, or the scratch slot
            ``num_slots`` for the others and for keys whose bucket is full.
        """
        width = self.BUCKET_SLOTS
        # Rank within the bucket: new keys before this one, less those before the bucket.
        earlier = new_rank + 1 - new.long()  # [N], new keys before this entry
        start = torch.searchsorted(bucket, bucket)  # [N], the bucket's first entry
        rank = earlier - earlier.index_select(0, start)  # [N]
        bucket = bucket.clamp_max(self._num_buckets - 1)
        slots = bucket.mul(width).unsqueeze(1) + torch.arange(width, device=self._device)  # [N, W]
        free = self._slot_row[slots] < 0  # [N, W]
        free_rank = free.cumsum(1).sub_(1)  # [N, W]
        choice = free & (free_rank == rank.unsqueeze(1))  # [N, W], at most one True
        found = choice.any(1) & new  # [N]
        slot = slots.gather(1, choice.long().argmax(1, keepdim=True)).squeeze(1)  # [N]
        return torch.where(found, slot, self._num_slots)

    def reset(self) -> None:
        """Forgets every key."""
        self._row_key.zero_()
        self._row_stamp.copy_(torch.arange(-self._capacity, 1, device=self._device))
        self._row_slot.fill_(self._num_slots)
        self._slot_row.fill_(-1)
        self._slot_key.zero_()
        self._clock.zero_()
        self._index_overflows.zero_()
        self._clear_queue()

    def _clear_queue(self) -> None:
        self._queue_rows = self._queue_rows[:0]
        self._queue_stamps = self._queue_stamps[:0]
        self._queue_head = 0

    def state_tensors(self) -> Dict[str, torch.Tensor]:
        """``keys`` [P], ``last_seen`` [P] (-1 for unused rows) and ``clock`` [], as new tensors."""
        stamp = self._row_stamp[:-1]
        return {
            "keys": torch.where(stamp >= 0, self._row_key[:-1], 0),
            "last_seen": stamp.clamp_min(-1),
            "clock": self._clock.clone(),
        }

    def check_state_values(self, state: Mapping[str, torch.Tensor], name: str) -> None:
        """Raises ValueError unless a candidate state is one a table could reach.

        Args:
            state: ``keys``, ``last_seen`` and ``clock`` of the right shapes and dtypes.
            name: the tracker's name, for the messages.
        """
        last_seen, clock, keys = state["last_seen"], state["clock"], state["keys"]
        if int(clock) < 0:
            raise ValueError(f"{name} state 'clock' must be >= 0, got {int(clock)}")
        if ((last_seen < -1) | (last_seen >= clock)).any():
            raise ValueError(f"{name} state 'last_seen' must lie in [-1, clock) = [-1, {int(clock)})")
        used = last_seen >= 0
        if torch.unique(last_seen[used]).numel() != int(used.sum()):
            raise ValueError(f"{name} state 'last_seen' must differ between the rows that hold keys")
        if torch.unique(keys[used]).numel() != int(used.sum()):
            raise ValueError(f"{name} state 'keys' must not hold one key in two rows")

    def load(self, state: Mapping[str, torch.Tensor]) -> None:
        """Replaces the table with a checked state, rebuilding the hash index.

        Args:
            state: as returned by ``state_tensors``, on any device.
        """
        keys = state["keys"].to(self._device)
        last_seen = state["last_seen"].to(self._device)
        used = last_seen >= 0
        position = torch.arange(self._capacity, device=self._device)
        self.reset()
        self._clock.copy_(state["clock"])
        self._row_key[:-1].copy_(torch.where(used, keys, 0))
        # Unused rows stay older than every key, in row order.
        self._row_stamp[:-1].copy_(torch.where(used, last_seen, position - self._capacity))
        if not bool(used.any()):
            return
        mixed = mix64(keys)
        # Index the keys in increasing mixed order, as assign does.
        sorted_mixed, order = torch.sort(torch.where(used, mixed, torch.iinfo(torch.int64).max), stable=True)
        new = used.index_select(0, order)
        rank = new.cumsum(0).sub_(1)
        slot = self._free_slots(self._bucket(sorted_mixed), new, rank)
        row = order
        write_at(self._slot_key, slot, keys.index_select(0, order))
        write_at(self._slot_row, slot, torch.where(slot < self._num_slots, row, -1))
        write_at(self._row_slot, torch.where(new, row, self._capacity), slot)
        self._index_overflows.add_((new & (slot == self._num_slots)).sum())


def _eviction_algorithm(device: torch.device) -> str:
    """``"topk"`` on CUDA and under torch.compile (where ``"queue"`` cannot run), else
    ``"queue"`` unless forced."""
    if is_compiling() or device.type != "cpu":
        return "topk"
    return forced_algorithm("eviction", "queue")
