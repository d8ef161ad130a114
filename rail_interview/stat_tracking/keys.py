"""Prompt keys: stable 64-bit keys for prompts, and the table that maps them to tracker rows.

Trackers index their state by row. With ``keys="ids"`` (the default) the
caller numbers prompts 0 .. P - 1 itself (``PromptIndex`` does it for
strings). With ``keys="hashed"`` a tracker takes any int64 keys and a
``KeyTable`` of P rows maps them to rows, forgetting the least recently
seen keys when new ones need room. That serves prompt streams larger than
memory, open-ended ones, and several ranks (the table needs no collective:
every rank updates it with the same gathered batch).

Two key functions, both stable across processes, runs and machines:

* ``prompt_keys(strings)``: BLAKE2b of the UTF-8 text, on the host.
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
per bucket of the table's hash index, H slots of its cuckoo table.
"""

from __future__ import annotations

import hashlib
import json
import struct
import sys
from typing import Any, Dict, Mapping, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch

from rail_interview.stat_tracking.ops import forced_algorithm, is_compiling, write_at
from rail_interview.stat_tracking.types import Device, resolve_device
from rail_interview.stat_tracking.validation import check_positive_int, is_integer_dtype

__all__ = ["KeyTable", "KeyAssignment", "canonical_text", "identity_keys", "mix64", "prompt_keys", "token_keys"]

_INT64 = np.iinfo(np.int64)


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
# The odd multiplier of the key table's second cuckoo slot (Fibonacci hashing: the product's top bits).
_CUCKOO_MULTIPLIER = _GOLDEN


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


def _json_value(value: Any) -> Any:
    """NumPy values as JSON values, for ``canonical_text``; anything else has no stable text form."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"a {type(value).__name__} has no stable text form")


def canonical_text(prompt: Any) -> str:
    """The text a prompt is keyed by: a string as it is, anything else (chat messages) as canonical JSON.

    Chat messages (lists of ``{"role": ..., "content": ...}`` dicts, as TRL's
    and verl's datasets hold them) become JSON with sorted keys, no spaces
    and UTF-8 text, so equal messages give equal text whatever the order of
    their dicts' fields, and ``prompt_keys`` of it gives the same key in
    every trainer (the TRL and verl integrations both key chat prompts so).

    Args:
        prompt: a string, or any JSON-serialisable value (NumPy arrays and
            scalars included).

    Returns:
        The text.

    Raises:
        TypeError: if the prompt holds a value without a JSON form (an image).
        ValueError: for a value JSON cannot write (a circular reference).

    Example:
        >>> canonical_text([{"role": "user", "content": "2+2?"}])
        '[{"content":"2+2?","role":"user"}]'
    """
    if isinstance(prompt, str):
        return prompt
    return json.dumps(prompt, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=_json_value)


def identity_keys(values: Sequence[Any], *, device: Device = None) -> torch.Tensor:
    """Stable int64 keys of a column of prompt identities: integers as they are, anything else by its text.

    What a trainer integration keys prompts by when they come as a dataset
    column: an integer (a prompt id, Python or NumPy, not a bool) is its own
    key; anything else gets ``prompt_keys`` of its ``canonical_text``
    (strings as they are, chat messages as canonical JSON), so the TRL and
    verl integrations give one prompt one key.

    Args:
        values: [B] integers, strings or JSON-serialisable values.
        device: where to put the keys (computed on the host).

    Returns:
        int64 [B] keys on ``device``.

    Raises:
        ValueError: for an integer outside int64, or a value without a
            text form (an image); the message names the prompt's position.

    Example:
        >>> identity_keys([7, "a cat", [{"role": "user", "content": "a cat"}]])[:2]
        tensor([                   7, -6711169336525982361])
    """
    keys = np.zeros(len(values), dtype=np.int64)
    texts, positions = [], []
    for position, value in enumerate(values):  # host work, once per prompt
        if isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)):
            if not _INT64.min <= int(value) <= _INT64.max:
                raise ValueError(f"prompt {position}'s key {value} does not fit int64")
            keys[position] = int(value)
            continue
        try:
            texts.append(canonical_text(value))
        except (TypeError, ValueError) as error:
            raise ValueError(f"prompt {position} cannot be keyed ({error})") from None
        positions.append(position)
    if texts:
        keys[positions] = prompt_keys(texts).numpy()
    return torch.from_numpy(keys).to(resolve_device(device))


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
    elif sys.byteorder == "little":  # pragma: no mutate (fork)
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
        if (
            not isinstance(attention_mask, torch.Tensor)
            or attention_mask.dtype.is_floating_point
            or attention_mask.dtype.is_complex
        ):
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
            was not among the P seen last (see ``KeyTable``); or None when
            no key can overflow: N <= P, or (algorithm ``"dynamic"``) every
            valid key was in the table already.
        fresh: int64 [F], rows given to keys new to the table, whose
            statistics must start over; P may pad it (reset the spare row
            too, or skip it).
        group: int64 [N], each sample's key as a group index in
            [0, num_groups - 1): samples share it exactly when they share a
            key; invalid samples get num_groups - 1.
        num_groups: the groups, the invalid samples' one included: N + 1
            (groups index the batch's distinct keys) or P + 1 (groups are
            rows, when no key overflows).
    """

    rows: torch.Tensor
    overflow: torch.Tensor
    fresh: torch.Tensor
    group: torch.Tensor
    num_groups: int


class KeyTable:
    """Maps any int64 keys to P rows, evicting the least recently seen keys when full.

    **Semantics** (``ReferenceAdvantageTracker(capacity=...)`` in
    ``reference.py`` is the plain version the tests compare with). Each key
    holds a row while it is among the P keys seen most recently. Recency is
    by sample: an update of N samples orders its keys by their last
    occurrence in the batch, after every key of earlier updates. So after
    each update the table holds the P most recently seen distinct keys
    (fewer until P have been seen):

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
    buckets of W = ``BUCKET_SLOTS``; each key has two buckets (the top and
    the bottom bits of ``mix64(key)``) and enters the first while it holds
    fewer than ``FIRST_BUCKET_LOAD`` keys, else the second, else the rest of
    the first (two-choice hashing, Azar et al. 1999, tilted to the first
    bucket; the keys of one batch are placed in rounds that see each other):
    the mean load is at most 2 of 8, so most keys are in their first
    bucket, and the second choice keeps the fullest bucket near the mean. A
    key whose two buckets are both full cannot be indexed: it keeps its row
    for this update and is forgotten after it, as if evicted;
    ``index_overflows`` counts it (it stayed 0 in every test and benchmark,
    ten million keys included).

    **Cuckoo table** (on a CPU, for the ``"dynamic"`` algorithm). Comparing
    a key with its bucket takes [N, W]-shaped ops, which PyTorch runs about
    five times slower per element than flat ones, after ``mix64``. So an
    exact two-choice cuckoo table (Pagh and Rodler, 2004) holds each key of
    the index with its row, in one of its two slots: of H (the power of two
    >= max(3 P, 4096)), the key's low bits and the top bits of its product
    with an odd constant. A lookup reads both slots for every sample in flat
    [N] ops, with no ``mix64`` and no subset; a slot holding the key gives
    its row, and an empty slot s holds a key neither of whose slots is s,
    so it matches no lookup. Keys enter it when they enter the index, in
    displacement rounds over all of them at once (at most
    ``CUCKOO_ROUNDS``; at a load of at most 1/3 a few do); they leave it when
    they leave the index (eviction, reset, load), so a hit is always right.
    A key the rounds leave without a slot (none in the tests and benchmarks
    at the usual size), or one placed while torch.compile traces the update,
    is found through the index instead: slower, never wrong.

    **Algorithms** (``ops.forced_algorithms(key_table=...)``; both give the
    same rows, bit for bit):

    * ``"fixed"``: fixed shapes and no host sync, for CUDA graphs and
      torch.compile: every step works on all N samples, and the rows to
      evict come from ``torch.topk`` over all P rows' stamps, O(P). Used on
      CUDA and whenever torch.compile traces the update.
    * ``"dynamic"``: reads counts back to the host, which costs nothing on
      a CPU. Every sample looks its key up first, in the cuckoo table; when
      every valid key is found (training's steady state) that is all: the
      rows come from the lookup and each row's stamp is a max over its
      samples' positions, with no ``mix64``, no sort, no insertion and no
      eviction. Otherwise it works only on the
      batch's distinct keys (sorted, when N > P) and its new ones; the rows
      to evict come from a queue of the oldest rows (sorted once by that
      same top-k, then consumed; rebuilt when it runs out), O(1) per
      evicted key plus an occasional O(P) rebuild. The CPU default outside
      torch.compile.

    State, on ``device``: ``keys`` int64 [P] (the key in each row),
    ``last_seen`` int64 [P] (the clock value when the key was last seen,
    -1 for an unused row) and ``clock`` int64 [] (samples seen so far). The
    hash index, the cuckoo table and the queue are derived from them:
    rebuilt on load, never saved. Memory: about 88 to 152 bytes per row (the
    index 64 to 128, as 4 P rounds up to a power of two; the rows 24); on a
    CPU, the cuckoo table 36 to 72 more (H slots of an int64 key and an
    int32 row, 12 bytes, as 3 P rounds up to H; at least 48 KB in all), and
    the queue up to 16 more.

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
    BUCKET_SLOTS = 8
    #: A new key goes to its first bucket while that holds fewer keys than this.
    FIRST_BUCKET_LOAD = 6
    #: Cuckoo slots per row, at least (H, a power of two): a load of at most 1/3, where two-choice
    #: cuckoo hashing places keys in a few rounds (it breaks down near 1/2).
    CUCKOO_SLOTS_PER_ROW = 3
    #: log2 of the fewest cuckoo slots.
    MIN_CUCKOO_BITS = 12
    #: Displacement rounds of a batch of keys entering the cuckoo table, at most.
    CUCKOO_ROUNDS = 32

    def __init__(self, capacity: int, *, device: Device = None) -> None:
        check_positive_int("capacity", capacity)
        self._capacity = capacity
        self._device = device = resolve_device(device)
        num_slots = max(2 * self.BUCKET_SLOTS, 1 << (4 * capacity - 1).bit_length())
        self._num_slots = num_slots
        self._num_buckets = num_buckets = num_slots // self.BUCKET_SLOTS
        # A key's two buckets: the top and the bottom bits of mix64(key).
        self._bucket_shift = 64 - (num_buckets.bit_length() - 1)
        # An empty slot holds its bucket's sentinel: a key whose two buckets are
        # both the next one, which no probe of this bucket can ask for. (One
        # more for the scratch slot.)
        following = torch.arange(1, num_buckets + 2, device=device) % num_buckets  # [B + 1]
        top = (following - num_buckets // 2) * (1 << (self._bucket_shift - 1)) * 2
        self._sentinel = _unmix64(top + following)  # [B + 1]
        rows = capacity + 1  # row P: a scratch row for masked writes
        self._row_key = torch.zeros(rows, dtype=torch.int64, device=device)  # [P + 1]
        # Unused rows are older than any key: stamps -P .. -1 (oldest first), then >= 0.
        self._row_stamp = torch.arange(-capacity, 1, dtype=torch.int64, device=device)  # [P + 1]
        self._row_slot = torch.full((rows,), num_slots, dtype=torch.int64, device=device)  # [P + 1]
        # Each bucket's W keys, then their W rows (-1: empty), side by side so that
        # one gather of a bucket reads both; bucket B holds the scratch slot S.
        self._index = torch.empty(num_buckets + 1, 2, self.BUCKET_SLOTS, dtype=torch.int64, device=device)
        self._blocks = self._index.view(num_buckets + 1, 2 * self.BUCKET_SLOTS)  # [B + 1, 2W], one row per bucket
        self._clear_index()
        # The cuckoo table (see the class docstring), on a CPU only, where the
        # "dynamic" algorithm reads it: each slot's key, int64 [H + 1], and row,
        # int32 (int64 past 2**31 rows) [H + 1]; slot H is a scratch slot for
        # masked writes. An empty slot s holds the key s ^ X (X from
        # _cuckoo_empty_mask) and row -1.
        bits = max(self.MIN_CUCKOO_BITS, (self.CUCKOO_SLOTS_PER_ROW * capacity - 1).bit_length())
        self._cuckoo_mask = (1 << bits) - 1  # H - 1
        self._cuckoo_shift = 64 - bits
        self._cuckoo_key: Optional[torch.Tensor] = None  # int64 [H + 1]
        self._cuckoo_row: Optional[torch.Tensor] = None  # int32 [H + 1]
        self._cuckoo_empty = 0  # X
        self._cuckoo_unplaced = 0  # keys the displacement rounds left without a slot
        if device.type == "cpu":
            self._cuckoo_empty = self._cuckoo_empty_mask()
            self._cuckoo_key = torch.empty(self._cuckoo_mask + 2, dtype=torch.int64)
            row_dtype = torch.int32 if capacity < 2**31 else torch.int64  # pragma: no mutate (fork)
            self._cuckoo_row = torch.empty(self._cuckoo_mask + 2, dtype=row_dtype)
            self._clear_cuckoo()
        # Constants, made once: a Python scalar in torch.where costs an op per call.
        self._minus_one = torch.tensor(-1, device=device)  # int64 []
        self._no_bucket = torch.tensor(num_buckets, device=device)  # int64 [], bucket B (the scratch slot's)
        self._scratch_slot = torch.tensor(num_slots, device=device)  # int64 [], slot S
        self._cuckoo_scratch = torch.tensor(self._cuckoo_mask + 1, device=device)  # int64 [], slot H
        self._scratch_key = self._sentinel[-1]  # int64 [], what the scratch slot holds
        self._columns = torch.arange(self.BUCKET_SLOTS, device=device)  # int64 [W]
        self._bucket_rows = self._index[:, 1]  # [B + 1, W], a view: each bucket's rows
        self._spare_row = torch.tensor(capacity, device=device)  # int64 [], row P
        self._no_rows = torch.zeros(0, dtype=torch.int64, device=device)  # int64 [0]
        self._clock = torch.zeros((), dtype=torch.int64, device=device)
        self._index_overflows = torch.zeros((), dtype=torch.int64, device=device)
        # The eviction queue (algorithm "dynamic"): rows by increasing stamp, as
        # they were when it was built, consumed from _queue_head.
        self._queue_rows = torch.zeros(0, dtype=torch.int64, device=device)
        self._queue_stamps = torch.zeros(0, dtype=torch.int64, device=device)
        self._queue_head = 0
        self._positions = torch.arange(0, device=device)  # int64 [>= N], 0, 1, ... (algorithm "dynamic")

    @property
    def capacity(self) -> int:
        """P, the rows of the table."""
        return self._capacity

    @property
    def index_overflows(self) -> torch.Tensor:
        """int64 scalar: keys that found their index bucket full (see the class docstring)."""
        return self._index_overflows

    def _buckets(self, mixed: torch.Tensor) -> torch.Tensor:
        """int64 [M, 2]: the two index buckets of mixed keys [M] (their top and bottom bits)."""
        return torch.stack([(mixed >> self._bucket_shift) + self._num_buckets // 2, mixed & (self._num_buckets - 1)], 1)

    def _clear_index(self) -> None:
        """Empties every slot: its bucket's sentinel key, row -1."""
        self._index[:, 0].copy_(self._sentinel.unsqueeze(1).expand(-1, self.BUCKET_SLOTS))
        self._index[:, 1].fill_(-1)

    def _cuckoo_slots(self, keys: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """int64 [M] twice: keys' two cuckoo slots, their low bits and the top bits of a product.

        The product with an odd constant mixes every bit of the key into its
        top bits, so keys that share their low bits (small integers times a
        power of two) still get different second slots.
        """
        mask = self._cuckoo_mask
        # In place on the product: one [M] temporary fewer each, which at N = 32768 the caches feel.
        return keys & mask, (keys * _CUCKOO_MULTIPLIER).bitwise_right_shift_(self._cuckoo_shift).bitwise_and_(mask)

    def _cuckoo_empty_mask(self) -> int:
        """X, the first of a fixed sequence with which every empty slot s's key s ^ X has both slots other than s.

        Its low bits are not all 0, so the first slot of s ^ X is not s; the
        second is checked for all H slots (about one in e candidates passes).
        """
        slots = torch.arange(self._cuckoo_mask + 1)  # [H]
        for attempt in range(1, 1000):  # pragma: no branch
            candidate = _signed((_TOKEN_SEED + attempt * _GOLDEN) % (1 << 64))
            if candidate & self._cuckoo_mask and not bool((self._cuckoo_slots(slots ^ candidate)[1] == slots).any()):
                return candidate
        raise AssertionError("no empty-slot key found")  # pragma: no cover

    def _clear_cuckoo(self) -> None:
        """Empties every cuckoo slot, in place: slot s holds the key s ^ X and row -1."""
        torch.arange(self._cuckoo_mask + 2, out=self._cuckoo_key).bitwise_xor_(self._cuckoo_empty)
        self._cuckoo_row.fill_(-1)
        self._cuckoo_unplaced = 0

    def _cuckoo_find(self, keys: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Keys' rows in the cuckoo table, in flat [M] ops: no subset, no host read.

        Args:
            keys: int64 [M].

        Returns:
            int64 [M], each key's row where it is in the cuckoo table (else
            another key's row, or -1), and int64 [M], the key in the slot
            that row came from: equal to the key exactly where it is in
            the cuckoo table.
        """
        first, second = self._cuckoo_slots(keys)  # [M] each
        # [M], written over the second slots (this function's own temporary).
        slot = torch.where(self._cuckoo_key.index_select(0, first) == keys, first, second, out=second)
        return self._cuckoo_row.index_select(0, slot).long(), self._cuckoo_key.index_select(0, slot)

    def _cuckoo_remove(self, keys: torch.Tensor, indexed: torch.Tensor) -> None:
        """Empties the cuckoo slots of keys leaving the index, where the cuckoo table holds them.

        Args:
            keys: int64 [M], the keys rows held (anything for a row that held none).
            indexed: bool [M], True for the keys the index holds: only they
                can be in the cuckoo table, at their own row.
        """
        first, second = self._cuckoo_slots(keys)  # [M] each
        slot = torch.where(self._cuckoo_key.index_select(0, first) == keys, first, second)  # [M]
        held = indexed & (self._cuckoo_key.index_select(0, slot) == keys)  # [M]
        slot = torch.where(held, slot, self._cuckoo_scratch)  # [M]
        write_at(self._cuckoo_key, slot, slot ^ self._cuckoo_empty)
        write_at(self._cuckoo_row, slot, self._minus_one.expand_as(slot))

    def _cuckoo_insert(self, keys: torch.Tensor, rows: torch.Tensor) -> None:
        """Puts keys new to the cuckoo table in it, in displacement rounds over all the keys at once.

        Each key aims at an empty one of its two slots (the first if both
        are, or neither). In each round every key in flight claims its
        slot; the first in order wins it (a max over claims, so no write
        order matters), and whoever it displaced, or a key that lost the
        claim, flies on to its other slot. Keys still in flight after
        ``CUCKOO_ROUNDS`` rounds stay out of the table (``_cuckoo_unplaced``
        counts them): the index finds them, slower but right.

        Args:
            keys: int64 [M], distinct, none in the cuckoo table.
            rows: int64 [M], their rows.
        """
        if not keys.shape[0]:  # pragma: no mutate (empty)
            return
        first, second = self._cuckoo_slots(keys)  # [M] each
        empty_first = self._cuckoo_row.index_select(0, first) < 0
        target = torch.where(empty_first | (self._cuckoo_row.index_select(0, second) >= 0), first, second)  # [M]
        for _ in range(self.CUCKOO_ROUNDS):
            old_key = self._cuckoo_key.index_select(0, target)  # [M]
            old_row = self._cuckoo_row.index_select(0, target)  # [M], -1: empty
            claim = -2 - self._positions_from(keys.shape[0])  # [M], < -1, the first key's the largest
            claim = claim.to(self._cuckoo_row.dtype)
            self._cuckoo_row.scatter_reduce_(0, target, claim, "amax", include_self=False)
            won = self._cuckoo_row.index_select(0, target) == claim  # [M]
            at = torch.where(won, target, self._cuckoo_scratch)
            write_at(self._cuckoo_key, at, keys)
            write_at(self._cuckoo_row, at, rows)
            # In flight next, to their other slot: the keys the winners displaced, and the losers.
            flying = (~won | (old_row >= 0)).nonzero().squeeze(1)  # [M'], host-sized
            if not flying.shape[0]:  # pragma: no mutate (empty)
                return
            won, target = won.index_select(0, flying), target.index_select(0, flying)
            keys = torch.where(won, old_key.index_select(0, flying), keys.index_select(0, flying))
            rows = torch.where(won, old_row.index_select(0, flying), rows.index_select(0, flying))
            first, second = self._cuckoo_slots(keys)
            target = torch.where(first == target, second, first)
        self._cuckoo_unplaced += keys.shape[0]

    def _positions_from(self, count: int) -> torch.Tensor:
        """int64 [count]: 0, 1, ..., kept between updates (an arange per update costs an op)."""
        if self._positions.shape[0] < count:  # pragma: no mutate (memory)
            self._positions = torch.arange(count, device=self._device)
        return self._positions if self._positions.shape[0] == count else self._positions[:count]

    def _write_slots(self, slot: torch.Tensor, keys: torch.Tensor, rows: torch.Tensor) -> None:
        """Writes keys and rows into index slots [M] (int64 [M] each)."""
        width = self.BUCKET_SLOTS
        position = slot + (slot // width) * width  # [M], the key's place in the flat index
        flat = self._index.view(-1)
        write_at(flat, position, keys)
        write_at(flat, position + width, rows)

    def _probe(self, mixed: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """Rows of keys in the index, -1 where absent (int64 [M] in, [M] out): both buckets read."""
        width, num_keys = self.BUCKET_SLOTS, keys.shape[0]
        block = self._blocks.index_select(0, self._buckets(mixed).view(-1)).view(num_keys, 2, 2 * width)  # [M, 2, 2W]
        match = block.narrow(2, 0, width) == keys.view(num_keys, 1, 1)  # [M, 2, W]
        # At most one slot matches; an empty slot's row is -1, so the max is the row or -1.
        return torch.where(match, block.narrow(2, width, width), self._minus_one).amax((1, 2))

    def lookup(self, keys: torch.Tensor) -> torch.Tensor:
        """Rows of keys in the table, changing nothing.

        Args:
            keys: int64 [M] on ``device``.

        Returns:
            int64 [M], the row of each key, or -1 for a key not in the table.
        """
        if keys.shape[0] == 0:  # pragma: no mutate (empty)
            return keys.clone()
        return self._probe(mix64(keys), keys)

    def keys(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """The key in each row, and which rows hold one.

        Returns:
            int64 [P] keys (0 in unused rows) and bool [P], True for rows
            that hold a key; new tensors.
        """
        used = self._row_stamp[:-1] >= 0
        return torch.where(used, self._row_key[:-1], 0), used

    def assign(self, keys: torch.Tensor, valid: Optional[torch.Tensor] = None) -> KeyAssignment:
        """Gives each sample's key a row, new keys evicting the least recently seen.

        No Python loop over samples or keys; with the ``"fixed"`` algorithm
        no host sync either, and fixed shapes.

        Args:
            keys: int64 [N], N >= 1, on ``device``.
            valid: bool [N], or None for all valid; invalid samples' keys
                are ignored.

        Returns:
            The ``KeyAssignment``.
        """
        if _table_algorithm(self._device) == "fixed":
            return self._assign_sorted(keys, mix64(keys), valid, None)
        found_row, placed, placed_mixed = self._find(keys, valid)  # [N], [M], [M]
        if not placed.shape[0]:
            # Every valid key is in the table, training's steady state: no key is
            # new and none overflows, so there is nothing to sort, place or evict.
            return self._assign_found(found_row, valid)
        if keys.shape[0] <= self._capacity:
            return self._assign_unsorted(keys, placed_mixed, found_row, placed, valid)
        return self._assign_sorted(keys, mix64(keys), valid, found_row)

    def _find(
        self, keys: torch.Tensor, valid: Optional[torch.Tensor]
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Each sample's row, and where the valid samples whose key is not in the table are (algorithm "dynamic").

        Every sample reads its key's two cuckoo slots in flat [N] ops,
        without ``mix64``; the samples the cuckoo table misses (keys new to
        the table, or one it left out) probe the index, both buckets, in a
        tensor sized on the host.

        Args:
            keys: int64 [N].
            valid: bool [N], or None for all valid.

        Returns:
            int64 [N], each sample's row or -1 where its key is absent;
            int64 [M], the positions of the valid samples whose key is
            absent, increasing; and int64 [M], their keys' ``mix64``.
        """
        found_row, held = self._cuckoo_find(keys)  # [N], [N]
        if torch.equal(held, keys):  # every sample found, in one op: training's steady state
            return found_row, self._no_rows, self._no_rows
        absent = (held != keys).nonzero().squeeze(1)  # [M'], host-sized
        absent_keys = keys.index_select(0, absent)  # [M']
        absent_mixed = mix64(absent_keys)  # [M']
        second = self._probe(absent_mixed, absent_keys)  # [M']
        found_row.index_put_((absent,), second)
        missing = second < 0 if valid is None else (second < 0) & valid.index_select(0, absent)  # [M']
        return found_row, absent[missing], absent_mixed[missing]

    def _assign_found(self, found_row: torch.Tensor, valid: Optional[torch.Tensor]) -> KeyAssignment:
        """``assign`` when every valid sample's key is in the table (algorithm "dynamic").

        Each key keeps its row, whose stamp becomes the clock plus the key's
        last valid position in the batch: a max over its samples, so no
        sort and no unique. Equal to what the other paths give, as no key
        is new and, with at most P distinct keys, none overflows.

        Args:
            found_row: int64 [N], each sample's row (-1 only for invalid samples).
            valid: bool [N], or None for all valid.
        """
        num_samples = found_row.shape[0]
        row = found_row if valid is None else torch.where(valid, found_row, self._spare_row)  # [N]
        stamp = self._clock + self._positions_from(num_samples)  # [N]
        self._row_stamp.scatter_reduce_(0, row, stamp, "amax")  # the stamps before are all older
        self._clock.add_(num_samples)
        return KeyAssignment(row, None, self._no_rows, row, self._capacity + 1)

    def _assign_sorted(
        self,
        keys: torch.Tensor,
        mixed: torch.Tensor,
        valid: Optional[torch.Tensor],
        sample_found: Optional[torch.Tensor],
    ) -> KeyAssignment:
        """``assign`` through the batch's distinct keys, sorted: N > P on a CPU, and the ``"fixed"`` algorithm.

        Args:
            keys: int64 [N].
            mixed: int64 [N], their ``mix64``.
            valid: bool [N], or None for all valid.
            sample_found: int64 [N], each sample's row or -1 from ``_find``
                (algorithm "dynamic"), or None to probe the index here
                (algorithm "fixed").
        """
        num_samples, capacity, device = keys.shape[0], self._capacity, self._device
        dynamic = sample_found is not None
        position = torch.arange(num_samples, device=device)  # [N]
        # 1. The batch's distinct keys, in increasing mixed key.
        sorted_mixed, order = torch.sort(mixed, stable=True)  # [N]
        first = torch.ones(num_samples, dtype=torch.bool, device=device)  # [N]
        first[1:] = sorted_mixed[1:] != sorted_mixed[:-1]
        sorted_group = first.cumsum(0).sub_(1)  # [N], distinct key index, in sorted order
        group = torch.empty_like(sorted_group).scatter_(0, order, sorted_group)  # [N], batch order
        # Per distinct key, [G]: G = N (fixed shapes; entries past the keys pad) or their number.
        size = int(sorted_group[-1]) + 1 if dynamic else num_samples
        group_mixed = mixed.new_zeros(size).scatter_(0, sorted_group, sorted_mixed)  # [G]
        group_key = keys.new_zeros(size).scatter_(0, group, keys)  # [G]
        seen_at = position if valid is None else torch.where(valid, position, self._minus_one)  # [N]
        last = position.new_full((size,), -1).scatter_reduce_(0, group, seen_at, "amax")  # [G], -1: unseen
        seen = last >= 0  # [G], keys this update sees
        # 2. Recency: the batch's keys are newer than every earlier one, by last occurrence.
        before = self._clock.clone()  # this update's stamps are >= before
        stamp = before + last  # [G]
        self._clock.add_(num_samples)
        kept = seen if dynamic and size <= capacity else seen & self._within_capacity(last, seen, num_samples)
        # 3. Keys already in the table keep their rows (kept ones get the new stamp).
        if dynamic:  # the samples' rows, found already: one per key (equal keys write equal rows)
            found_row = sample_found.new_empty(size).scatter_(0, group, sample_found)  # [G]
        else:
            found_row = self._probe(group_mixed, group_key)  # [G]
        hit = kept & (found_row >= 0)  # [G]
        row = torch.where(hit, found_row, self._spare_row)  # [G]
        write_at(self._row_stamp, row, stamp)
        new = kept & (found_row < 0)  # [G]
        # 4. New keys take the oldest rows, in increasing mixed key; then they enter the index.
        if dynamic:
            placed = new.nonzero().squeeze(1)  # [M]
            fresh = self._queued_rows(placed.shape[0], before)  # [M]
            row.index_put_((placed,), fresh)
            if placed.shape[0]:  # pragma: no mutate (empty)
                self._place(
                    group_mixed.index_select(0, placed),
                    group_key.index_select(0, placed),
                    fresh,
                    stamp.index_select(0, placed),
                    None,
                )
        else:
            rank = new.cumsum(0).sub_(1)  # [G], among the new keys
            oldest = torch.topk(self._row_stamp[:-1], min(num_samples, capacity), largest=False).indices  # [V]
            fresh = torch.where(new, oldest.index_select(0, rank.clamp(0, oldest.shape[0] - 1)), self._spare_row)
            row = torch.where(new, fresh, row)
            self._place(group_mixed, group_key, fresh, stamp, new)
        # 5. Per sample.
        sample_row = row.index_select(0, group)  # [N]
        overflow = sample_row == capacity  # [N]
        if valid is not None:
            overflow &= valid
            sample_row = torch.where(valid, sample_row, self._spare_row)
            group = torch.where(valid, group, num_samples)
        return KeyAssignment(sample_row, overflow, fresh, group, num_samples + 1)

    def _assign_unsorted(
        self,
        keys: torch.Tensor,
        placed_mixed: torch.Tensor,
        found_row: torch.Tensor,
        placed: torch.Tensor,
        valid: Optional[torch.Tensor],
    ) -> KeyAssignment:
        """``assign`` for N <= P (no key can overflow) with new keys (algorithm "dynamic"): no sort of the batch.

        Found keys take their stamp by a max over their samples' positions;
        only the samples whose key is new are sorted, to give each new key
        one row (the same rows, in the same order, as ``_assign_sorted``).

        Args:
            keys: int64 [N].
            placed_mixed: int64 [M], the ``mix64`` of the keys at ``placed``.
            found_row: int64 [N], each sample's row or -1, from ``_find``.
            placed: int64 [M], M >= 1, the positions of the valid samples
                whose key is new, increasing.
            valid: bool [N], or None for all valid.
        """
        num_samples, capacity, device = keys.shape[0], self._capacity, self._device
        position = torch.arange(num_samples, device=device)  # [N]
        counted = found_row >= 0 if valid is None else valid & (found_row >= 0)  # [N]
        row = torch.where(counted, found_row, self._spare_row)  # [N]
        before = self._clock.clone()  # this update's stamps are >= before
        self._row_stamp.scatter_reduce_(0, row, before + position, "amax")
        self._clock.add_(num_samples)
        sorted_mixed, order = torch.sort(placed_mixed, stable=True)  # [M]
        at = placed.index_select(0, order)  # [M], batch positions in sorted order
        first = torch.ones_like(at, dtype=torch.bool)
        first[1:] = sorted_mixed[1:] != sorted_mixed[:-1]
        new_group = first.cumsum(0).sub_(1)  # [M], the new key's index
        num_new = int(new_group[-1]) + 1
        last = at.new_full((num_new,), -1).scatter_reduce_(0, new_group, at, "amax")  # [U]
        fresh = self._queued_rows(num_new, before)  # [U]
        self._place(sorted_mixed[first], keys.index_select(0, at[first]), fresh, before + last, None)
        row.index_put_((at,), fresh.index_select(0, new_group))
        return KeyAssignment(row, None, fresh, row, capacity + 1)

    def _within_capacity(self, last: torch.Tensor, seen: torch.Tensor, num_samples: int) -> torch.Tensor:
        """bool [G]: keys with fewer than P of the batch's keys last seen after them.

        Args:
            last: int64 [G], each key's last valid position in the batch.
            seen: bool [G], keys with a valid sample.
            num_samples: N.
        """
        is_last = last.new_zeros(num_samples + 1)  # [N + 1], 1 at each key's last occurrence
        is_last.scatter_(0, torch.where(seen, last, num_samples), 1)
        later = is_last[:-1].flip(0).cumsum(0).flip(0) - is_last[:-1]  # [N], keys last seen after
        return later.index_select(0, last.clamp_min(0)) < self._capacity

    def _place(
        self,
        mixed: torch.Tensor,
        keys: torch.Tensor,
        rows: torch.Tensor,
        stamps: torch.Tensor,
        new: Optional[torch.Tensor],
    ) -> None:
        """Gives keys their rows: the rows' old keys leave the index, the keys enter it.

        Keys fill their first bucket up to ``FIRST_BUCKET_LOAD`` keys, then
        their second, then the rest of their first, in three rounds that
        each see the slots taken before; keys of one bucket in one round take
        its free slots in their order.

        Args:
            mixed: int64 [M], the keys' ``mix64``.
            keys: int64 [M].
            rows: int64 [M], each key's row (P where not ``new``).
            stamps: int64 [M], each key's stamp.
            new: bool [M], the keys to place, or None for all.
        """
        width, num_buckets = self.BUCKET_SLOTS, self._num_buckets
        old_slot = self._row_slot.index_select(0, rows)  # [M]
        if self._cuckoo_key is not None:
            self._cuckoo_remove(self._row_key.index_select(0, rows), old_slot < self._num_slots)
        self._write_slots(old_slot, self._sentinel.index_select(0, old_slot // width), torch.full_like(old_slot, -1))
        buckets = self._buckets(mixed)  # [M, 2]
        pending = torch.ones_like(keys, dtype=torch.bool) if new is None else new.clone()  # [M]
        slot = torch.full_like(keys, self._num_slots)  # [M]
        position = torch.arange(1, keys.shape[0] + 1, device=self._device)  # [M], 1 + the key's position
        # Three rounds, each seeing the slots the rounds before took: the first
        # bucket up to FIRST_BUCKET_LOAD keys (so that most keys are found
        # there with one read), then the second bucket, then the first one full.
        for choice, limit in ((0, self.FIRST_BUCKET_LOAD), (1, width), (0, width)):
            bucket = torch.where(pending, buckets[:, choice], self._no_bucket)  # [M], B: not placed in this round
            free = self._bucket_rows.index_select(0, bucket.clamp_max(num_buckets - 1)) < 0  # [M, W]
            # 1 + the rank among this round's keys of the same bucket, in their order.
            sorted_bucket, order = torch.sort(bucket, stable=True)  # [M]
            start = torch.searchsorted(sorted_bucket, sorted_bucket)  # [M]
            rank = torch.empty_like(start).scatter_(0, order, position - start)  # [M], from 1
            # The bucket's load (W - free) plus the rank (from 0) stays below the limit.
            fits = pending & (rank - free.sum(1) <= limit - width)  # [M]
            pick = free & (free.cumsum(1) == rank.unsqueeze(1))  # [M, W], at most one True
            column = torch.where(pick, self._columns, self._minus_one).amax(1)  # [M]
            taken = torch.where(fits, bucket * width + column, self._scratch_slot)  # [M]
            self._write_slots(
                taken, torch.where(fits, keys, self._scratch_key), torch.where(fits, rows, self._minus_one)
            )
            slot = torch.where(fits, taken, slot)
            pending &= ~fits
        write_at(self._row_slot, rows, slot)
        write_at(self._row_key, rows, keys)
        write_at(self._row_stamp, rows, stamps)
        self._index_overflows.add_(pending.sum())
        if self._cuckoo_key is not None and not is_compiling():  # traced: the index finds these keys
            indexed = (slot < self._num_slots).nonzero().squeeze(1)  # [M'], host-sized
            self._cuckoo_insert(keys.index_select(0, indexed), rows.index_select(0, indexed))

    def _queued_rows(self, wanted: int, before: torch.Tensor) -> torch.Tensor:
        """The ``wanted`` rows of least stamp, oldest first, from the queue (rebuilt if it runs out).

        Args:
            wanted: how many rows.
            before: int64 scalar, the clock when this update began: rows
                with a stamp from it on were seen by this update.

        Returns:
            int64 [wanted] rows.
        """
        if wanted == 0:
            return self._queue_rows[:0]
        rows = self._take_from_queue(wanted)
        if rows is None:
            size = min(self._capacity, max(16 * wanted, 4096))
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
        entries = self._queue_rows[self._queue_head :]
        stamps = self._queue_stamps[self._queue_head :]
        # Stale entries (rows seen since) are skipped: look a little past the
        # wanted count first, then at the whole rest.
        for length in (min(entries.shape[0], 2 * wanted + 64), entries.shape[0]):
            unchanged = self._row_stamp.index_select(0, entries[:length]) == stamps[:length]
            count = unchanged.cumsum(0)
            if length and int(count[-1]) >= wanted:
                end = int(torch.searchsorted(count, wanted)) + 1  # one past the wanted-th unchanged entry
                self._queue_head += end
                return entries[:end][unchanged[:end]]
        return None

    def memory_bytes(self) -> int:
        """Bytes of every tensor the table keeps (state, hash index, cuckoo table, queue), each storage once.

        Returns:
            The sum of the distinct storages' sizes, views counted once.
        """
        storages = {}
        for value in vars(self).values():
            if isinstance(value, torch.Tensor):
                storage = value.untyped_storage()
                storages[(storage.data_ptr(), storage.nbytes())] = storage.nbytes()
        return sum(storages.values())

    def reset(self) -> None:
        """Forgets every key."""
        self._row_key.zero_()
        self._row_stamp.copy_(torch.arange(-self._capacity, 1, device=self._device))
        self._row_slot.fill_(self._num_slots)
        self._clear_index()
        if self._cuckoo_key is not None:
            self._clear_cuckoo()
        self._clock.zero_()
        self._index_overflows.zero_()
        self._queue_rows, self._queue_stamps, self._queue_head = self._queue_rows[:0], self._queue_stamps[:0], 0

    def state_tensors(self) -> Dict[str, torch.Tensor]:
        """``keys`` [P], ``last_seen`` [P] (-1 for unused rows) and ``clock`` [], as new tensors."""
        return {"keys": self.keys()[0], "last_seen": self._row_stamp[:-1].clamp_min(-1), "clock": self._clock.clone()}

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
        self.reset()
        self._clock.copy_(state["clock"])
        rows = (last_seen >= 0).nonzero().squeeze(1)  # [M]
        mixed = mix64(keys.index_select(0, rows))
        sorted_mixed, order = torch.sort(mixed)  # distinct: mix64 is a bijection
        rows = rows.index_select(0, order)
        self._place(sorted_mixed, keys.index_select(0, rows), rows, last_seen.index_select(0, rows), None)


def _unxorshift(value: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverts ``value ^ (value >>> bits)`` (a logical shift) on int64 words."""
    result = value
    for _ in range(64 // bits + 1):
        result = value ^ _shift_right(result, bits)
    return result


def _unmix64(value: torch.Tensor) -> torch.Tensor:
    """The inverse of ``mix64``: the words whose mix is ``value``."""
    value = _unxorshift(value, 31)
    value = value * _signed(pow(_MIX_2 % (1 << 64), -1, 1 << 64))
    value = _unxorshift(value, 27)
    value = value * _signed(pow(_MIX_1 % (1 << 64), -1, 1 << 64))
    return _unxorshift(value, 30)


def _table_algorithm(device: torch.device) -> str:
    """``"fixed"`` on CUDA and under torch.compile (where ``"dynamic"`` cannot run), else
    ``"dynamic"`` unless forced."""
    if is_compiling() or device.type != "cpu":
        return "fixed"
    return forced_algorithm("key_table", "dynamic")
