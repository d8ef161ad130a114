"""Prompt keys and hashed trackers: key functions, the LRU key table, trackers with keys="hashed".

The table is compared with an ``OrderedDict`` LRU, and hashed trackers with
``ReferenceAdvantageTracker(capacity=...)`` (an LRU-ordered dict of deques or
EMAs) on streams whose prompts drift, so that keys come, go and come back;
both eviction algorithms must give the same state bit for bit.
"""

import collections
import hashlib
import os
import random
import subprocess
import sys

import pytest
import torch

from rail_interview.stat_tracking import AdvantageTracker, BatchStatTracker, BufferStatTracker, PromptIndex, presets
from rail_interview.stat_tracking.keys import KeyTable, mix64, prompt_keys, token_keys
from rail_interview.stat_tracking.ops import forced_algorithms
from rail_interview.stat_tracking.reference import ReferenceAdvantageTracker

MASK64 = (1 << 64) - 1
EVICTIONS = ("fixed", "dynamic")


def _mix_python(value: int) -> int:
    """splitmix64's finalizer on Python ints: the specification of mix64."""
    value &= MASK64
    value ^= value >> 30
    value = (value * 0xBF58476D1CE4E5B9) & MASK64
    value ^= value >> 27
    value = (value * 0x94D049BB133111EB) & MASK64
    value ^= value >> 31
    return value - (1 << 64) if value >> 63 else value


def _unmix_python(value: int) -> int:
    """The inverse of ``_mix_python``: a key whose mixed value is ``value``."""

    def unshift(word: int, bits: int) -> int:
        result = word
        for _ in range(64 // bits + 1):
            result = word ^ (result >> bits)
        return result

    value &= MASK64
    value = unshift(value, 31)
    value = (value * pow(0x94D049BB133111EB, -1, 1 << 64)) & MASK64
    value = unshift(value, 27)
    value = (value * pow(0xBF58476D1CE4E5B9, -1, 1 << 64)) & MASK64
    value = unshift(value, 30)
    return value - (1 << 64) if value >> 63 else value


def _drifting_keys(rng: random.Random, base: int, spread: int, size: int) -> list:
    """Keys around a moving base, far from 0 and from each other's bits."""
    return [rng.randint(base, base + spread) * 7919 - 10**15 for _ in range(size)]


# --- key functions -----------------------------------------------------------------------------


def test_mix64_is_splitmix64_with_twos_complement_wraparound():
    rng = random.Random(0)
    values = [0, 1, -1, 2**63 - 1, -(2**63)] + [rng.randint(-(2**63), 2**63 - 1) for _ in range(200)]
    got = mix64(torch.tensor(values)).tolist()
    assert got == [_mix_python(v) for v in values]
    assert [_unmix_python(v) for v in got] == values


def test_prompt_keys_are_blake2b_and_ignore_pythonhashseed():
    prompts = ["a cat", "a dog", "", "naïve café", "a cat"]
    expected = [
        int.from_bytes(hashlib.blake2b(p.encode(), digest_size=8).digest(), "little", signed=True) for p in prompts
    ]
    assert prompt_keys(prompts).tolist() == expected
    assert prompt_keys(prompts).dtype == torch.int64
    script = (
        "from rail_interview.stat_tracking import prompt_keys; "
        "print(prompt_keys(['a cat', 'a dog', 'naïve café']).tolist())"
    )
    outputs = set()
    for seed in ("1", "2", "random"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        outputs.add(
            subprocess.run([sys.executable, "-c", script], env=env, check=True, capture_output=True, text=True).stdout
        )
    assert len(outputs) == 1
    assert outputs.pop().strip() == str(prompt_keys(["a cat", "a dog", "naïve café"]).tolist())


def test_prompt_keys_inputs():
    assert prompt_keys([]).shape == (0,)
    assert prompt_keys(iter(["x"])).shape == (1,)
    with pytest.raises(TypeError, match="single string"):
        prompt_keys("a cat")
    with pytest.raises(TypeError, match="must be strings, got int"):
        prompt_keys(["a", 3])


def test_token_keys_ignore_padding_and_see_order():
    plain = token_keys(torch.tensor([[5, 6, 7]]))
    right = token_keys(torch.tensor([[5, 6, 7, 0, 0]]), torch.tensor([[1, 1, 1, 0, 0]]))
    left = token_keys(torch.tensor([[9, 9, 5, 6, 7]]), torch.tensor([[False, False, True, True, True]]))
    assert plain.item() == right.item() == left.item()
    others = token_keys(torch.tensor([[7, 6, 5], [5, 6, 8], [5, 6, 7]]), torch.tensor([[1, 1, 1]] * 2 + [[1, 1, 0]]))
    assert len(set(others.tolist()) | {plain.item()}) == 4
    # Pinned, so that a change of the hash (or of integer wrap-around) shows.
    assert plain.item() == -5193616730892468060
    assert token_keys(torch.zeros(0, 4, dtype=torch.int32)).shape == (0,)


def test_token_keys_collide_rarely_on_many_sequences():
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 50, (20000, 6), generator=generator)
    mask = torch.rand(20000, 6, generator=generator) < 0.8
    keys = token_keys(tokens, mask)
    sequences = {tuple(t[m].tolist()) for t, m in zip(tokens, mask)}
    assert len(set(keys.tolist())) == len(sequences)


def test_token_keys_compile_without_graph_breaks():
    compiled = torch.compile(token_keys, fullgraph=True, backend="eager")
    tokens = torch.randint(0, 100, (8, 5))
    mask = torch.rand(8, 5) < 0.7
    assert torch.equal(compiled(tokens, mask), token_keys(tokens, mask))


@pytest.mark.parametrize(
    "tokens, mask, error, message",
    [
        (torch.zeros(2, 3), None, TypeError, "integer tensor"),
        ([[1, 2]], None, TypeError, "integer tensor, got list"),
        (torch.zeros(3, dtype=torch.int64), None, ValueError, "2-D"),
        (torch.zeros(2, 3, dtype=torch.int64), torch.ones(2, 3), TypeError, "integer or bool"),
        (torch.zeros(2, 3, dtype=torch.int64), torch.ones(2, 4, dtype=torch.bool), ValueError, "shape"),
    ],
)
def test_token_keys_refuse_bad_input(tokens, mask, error, message):
    with pytest.raises(error, match=message):
        token_keys(tokens, mask)


# --- the key table -----------------------------------------------------------------------------


class _LruSpec:
    """The table's semantics on an OrderedDict: the P keys seen last, by last valid occurrence."""

    def __init__(self, capacity):
        self.capacity, self.keys = capacity, collections.OrderedDict()

    def see(self, keys, valid):
        last = {key: i for i, (key, ok) in enumerate(zip(keys, valid)) if ok}
        batch = sorted(last, key=last.get)
        kept = batch[-self.capacity :]
        for key in kept:
            self.keys.pop(key, None)
        while self.keys and len(self.keys) + len(kept) > self.capacity:
            self.keys.popitem(last=False)
        for key in kept:
            self.keys[key] = None
        return set(batch) - set(kept)


@pytest.mark.parametrize("eviction", EVICTIONS)
@pytest.mark.parametrize("capacity", [1, 2, 3, 7, 40])
def test_table_holds_the_keys_seen_last(eviction, capacity):
    for seed in range(4):
        rng = random.Random(seed)
        table, spec, base = KeyTable(capacity), _LruSpec(capacity), 0
        for step in range(40):
            base += rng.choice([0, 1, 3, capacity])
            keys = _drifting_keys(rng, base, capacity + 4, rng.randint(1, 3 * capacity + 2))
            valid = [rng.random() > 0.15 for _ in keys]
            with forced_algorithms(key_table=eviction):
                assignment = table.assign(torch.tensor(keys), torch.tensor(valid))
            overflow = spec.see(keys, valid)
            held, used = table.keys()
            assert set(held[used].tolist()) == set(spec.keys), (seed, step)
            rows = assignment.rows.tolist()
            overflows = [False] * len(keys) if assignment.overflow is None else assignment.overflow.tolist()
            # None where no key can overflow: N <= P, or (algorithm "dynamic") every valid key was in the table.
            all_found = eviction == "dynamic" and assignment.fresh.numel() == 0 and not overflow
            assert assignment.overflow is not None or len(keys) <= capacity or all_found
            for key, ok, row, over in zip(keys, valid, rows, overflows):
                assert over == (ok and key in overflow)
                assert (row == capacity) == (not ok or key in overflow)
            # Equal keys share a row; rows of distinct kept keys differ.
            by_key = {}
            for key, ok, row in zip(keys, valid, rows):
                if ok and key not in overflow:
                    assert by_key.setdefault(key, row) == row
            assert len(set(by_key.values())) == len(by_key)
            found = table.lookup(torch.tensor(list(spec.keys) + [123456789]))
            assert found[-1] == -1 and (found[:-1] >= 0).all()
            assert torch.equal(
                found[:-1],
                torch.tensor([by_key.get(k, -2) for k in spec.keys]).where(
                    torch.tensor([k in by_key for k in spec.keys]), found[:-1]
                ),
            )
        assert int(table.index_overflows) == 0


def test_eviction_algorithms_give_the_same_state():
    rng = random.Random(3)
    tables = {eviction: KeyTable(50) for eviction in EVICTIONS}
    base = 0
    for _ in range(60):
        base += rng.choice([0, 5, 20])
        keys = torch.tensor(_drifting_keys(rng, base, 70, rng.randint(1, 90)))
        for eviction, table in tables.items():
            with forced_algorithms(key_table=eviction):
                table.assign(keys)
    states = [table.state_tensors() for table in tables.values()]
    assert all(torch.equal(states[0][name], states[1][name]) for name in states[0])
    assert torch.equal(tables["fixed"]._row_key, tables["dynamic"]._row_key)  # the same rows, too


def test_a_full_bucket_forgets_the_key_after_its_update():
    table = KeyTable(64)  # 256 index slots: 32 buckets of 8
    width, buckets, shift = KeyTable.BUCKET_SLOTS, 32, 64 - 5
    assert table._num_buckets == buckets
    # Nine keys whose two buckets are both bucket 5 (top and bottom bits), built by inverting mix64.
    keys = [_unmix_python(((5 - buckets // 2) << shift) + (i << 16) + 5) for i in range(width + 1)]
    assignment = table.assign(torch.tensor(keys))
    assert assignment.overflow is None and len(set(assignment.rows.tolist())) == width + 1
    assert int(table.index_overflows) == 1
    found = table.lookup(torch.tensor(keys))
    assert int((found < 0).sum()) == 1  # the last in mixed order
    assert found[-1] == -1
    # Forgotten: it comes back as a new key, with a fresh row, and is counted again.
    again = table.assign(torch.tensor(keys[-1:]))
    assert int(table.index_overflows) == 2 and again.fresh.numel() == 1


def _batch_around(rng, pool, held, capacity):
    """Keys and a valid mask (or None): all held (N above or below P), some new, or more than P distinct."""
    held = held or pool[:capacity]
    kind = rng.choice(["held, N > P", "held, N <= P", "held, invalid new", "some new", "too many"])
    if kind == "held, N > P":
        keys = [rng.choice(held) for _ in range(rng.randint(capacity + 1, 3 * capacity))]
    elif kind == "held, N <= P":
        keys = [rng.choice(held) for _ in range(rng.randint(1, capacity))]
    elif kind == "held, invalid new":  # the new keys' samples are invalid: every valid key is held
        keys = [rng.choice(held) for _ in range(2 * capacity)] + rng.sample(pool, 5)
    elif kind == "some new":
        keys = [rng.choice(held) for _ in range(rng.randint(0, 2 * capacity))] + rng.sample(pool, 3)
    else:
        keys = rng.sample(pool, capacity + 3) * 2
    rng.shuffle(keys)
    if kind == "held, invalid new":
        return keys, [key in held for key in keys]
    return keys, None if rng.random() < 0.5 else [rng.random() > 0.2 for _ in keys]


@pytest.mark.parametrize("capacity", [1, 4, 16])
def test_the_all_found_path_gives_the_state_and_rows_of_the_general_one(capacity):
    # "dynamic" takes the all-found path whenever every valid key is in the table; "fixed" never
    # does. Both must leave the same table and give the same rows, through hits, misses,
    # evictions and overflow, with and without invalid samples.
    rng = random.Random(capacity)
    pool = [rng.randint(-(2**62), 2**62) for _ in range(4 * capacity + 8)]
    tables = {algorithm: KeyTable(capacity) for algorithm in EVICTIONS}
    took_it = {"N > P": 0, "N <= P": 0}
    for _ in range(40):
        held, used = tables["dynamic"].keys()
        before = held[used].tolist()
        keys, valid = _batch_around(rng, pool, before, capacity)
        keys_t = torch.tensor(keys)
        valid_t = None if valid is None else torch.tensor(valid)
        got = {}
        for algorithm, table in tables.items():
            with forced_algorithms(key_table=algorithm):
                got[algorithm] = table.assign(keys_t, valid_t)
        fixed, dynamic = got["fixed"], got["dynamic"]
        assert torch.equal(fixed.rows, dynamic.rows)
        fixed_overflow = fixed.overflow if fixed.overflow is not None else torch.zeros(len(keys), dtype=torch.bool)
        if dynamic.overflow is not None:
            assert torch.equal(fixed_overflow, dynamic.overflow)
        else:
            assert not fixed_overflow.any()
        assert torch.equal(fixed.fresh[fixed.fresh < capacity].sort().values, dynamic.fresh.sort().values)
        states = [table.state_tensors() for table in tables.values()]
        assert all(torch.equal(states[0][name], states[1][name]) for name in states[0])
        assert torch.equal(tables["fixed"]._row_key[:-1], tables["dynamic"]._row_key[:-1])
        assert torch.equal(tables["fixed"].lookup(torch.tensor(pool)), tables["dynamic"].lookup(torch.tensor(pool)))
        counted = [key for key, ok in zip(keys, valid or [True] * len(keys)) if ok]
        if counted and set(counted) <= set(before):
            # Every valid key held: nothing new, nothing overflows, groups are rows.
            took_it["N > P" if len(keys) > capacity else "N <= P"] += 1
            assert dynamic.overflow is None and dynamic.fresh.numel() == 0
            assert torch.equal(dynamic.group, dynamic.rows) and dynamic.num_groups == capacity + 1
    assert all(count > 0 for count in took_it.values()), took_it
    assert all(int(table.index_overflows) == 0 for table in tables.values())


@pytest.mark.parametrize("algorithm", EVICTIONS)
def test_a_key_forgotten_by_a_full_bucket_is_new_in_a_batch_of_held_keys(algorithm):
    table = KeyTable(64)  # 32 buckets of 8
    width, buckets, shift = KeyTable.BUCKET_SLOTS, 32, 64 - 5
    keys = torch.tensor([_unmix_python(((5 - buckets // 2) << shift) + (i << 16) + 5) for i in range(width + 1)])
    with forced_algorithms(key_table=algorithm):
        table.assign(keys)
        assert int(table.index_overflows) == 1
        # Eight of the keys are held; the ninth was forgotten: not found, so new again (N > P).
        again = table.assign(keys.repeat(8))
    assert again.fresh[again.fresh < 64].numel() == 1
    assert int(table.index_overflows) == 2


class _CrowdedCuckoo(KeyTable):
    """A table whose cuckoo table has one slot per row (8 at least): loads near 1, long kick chains, keys left out."""

    MIN_CUCKOO_BITS = 3
    CUCKOO_SLOTS_PER_ROW = 1


class _OneRoundCuckoo(_CrowdedCuckoo):
    """A crowded cuckoo table that gives up after one displacement round: many keys are left to the index."""

    CUCKOO_ROUNDS = 1


def _cuckoo_routes(table, keys):
    """How many of keys the cuckoo table holds in their first slot, in their second, and not at all."""
    first, second = table._cuckoo_slots(keys)
    at_first = table._cuckoo_key[first] == keys
    at_second = ~at_first & (table._cuckoo_key[second] == keys)
    return int(at_first.sum()), int(at_second.sum()), int((~at_first & ~at_second).sum())


def _check_cuckoo(table):
    """The cuckoo table is exact: each filled slot holds a key of the index, at its row, in one of the key's
    two slots, no key twice; each empty slot s holds s ^ X, which neither of its slots is s. Returns the
    keys of the index that the cuckoo table lacks."""
    slot_keys, slot_rows = table._cuckoo_key[:-1], table._cuckoo_row[:-1].long()
    slots = torch.arange(slot_keys.shape[0])
    filled = slot_rows >= 0
    empty_keys = slot_keys[~filled]
    assert torch.equal(empty_keys, slots[~filled] ^ table._cuckoo_empty)
    assert not any((slot == slots[~filled]).any() for slot in table._cuckoo_slots(empty_keys))
    held, rows, at = slot_keys[filled], slot_rows[filled], slots[filled]
    first, second = table._cuckoo_slots(held)
    assert ((first == at) | (second == at)).all()
    assert torch.equal(table.lookup(held), rows)
    assert torch.equal(table._row_key[rows], held)
    assert len(set(held.tolist())) == held.shape[0]
    row_keys, used = table.keys()
    indexed = row_keys[used][table.lookup(row_keys[used]) >= 0]
    return set(indexed.tolist()) - set(held.tolist())


def _assert_same_assignment(got, want, capacity):
    assert torch.equal(got.rows, want.rows)
    no_overflow = torch.zeros(len(want.rows), dtype=torch.bool)
    overflow = [no_overflow if a.overflow is None else a.overflow for a in (got, want)]
    assert torch.equal(overflow[0], overflow[1])
    assert torch.equal(got.fresh[got.fresh < capacity].sort().values, want.fresh[want.fresh < capacity].sort().values)


def _assert_same_table(table, reference, pool):
    states = [table.state_tensors(), reference.state_tensors()]
    assert all(torch.equal(states[0][name], states[1][name]) for name in states[0])
    assert torch.equal(table._row_key[:-1], reference._row_key[:-1])
    assert int(table.index_overflows) == int(reference.index_overflows)
    assert torch.equal(table.lookup(torch.tensor(pool)), reference.lookup(torch.tensor(pool)))


@pytest.mark.parametrize("capacity", [4, 16, 64])
def test_cuckoo_lookups_give_the_rows_of_the_probe_through_crowded_slots(capacity):
    # Three "dynamic" tables (a cuckoo table of the usual size, a crowded one that kicks keys along
    # chains and leaves some out, and one that gives up after one round) against "fixed", which
    # never reads it: the same rows, overflow, fresh rows and state, bit for bit, through batches
    # that mix keys in their first slot, in their second, keys only the index finds, new keys and
    # invalid samples, N > P and N <= P. After every batch each cuckoo table is exact.
    rng = random.Random(capacity)
    pool = [rng.randint(-(2**62), 2**62) for _ in range(3 * capacity)]
    # Keys that share low bits (the first cuckoo slot) with pool keys.
    pool += [key + (i + 1) * (1 << 20) for i, key in enumerate(pool[: capacity // 2])]
    tables = {
        "fixed": KeyTable(capacity),
        "dynamic": KeyTable(capacity),
        "crowded": _CrowdedCuckoo(capacity),
        "one round": _OneRoundCuckoo(capacity),
    }
    routes = [0, 0, 0]
    for step in range(60):
        held, used = tables["fixed"].keys()
        keys, valid = _batch_around(rng, pool, held[used].tolist(), capacity)
        keys_t, valid_t = torch.tensor(keys), None if valid is None else torch.tensor(valid)
        routes = [a + b for a, b in zip(routes, _cuckoo_routes(tables["one round"], keys_t))]
        got = {}
        for name, table in tables.items():
            with forced_algorithms(key_table="fixed" if name == "fixed" else "dynamic"):
                got[name] = table.assign(keys_t, valid_t)
        for name in ("dynamic", "crowded", "one round"):
            _assert_same_assignment(got[name], got["fixed"], capacity)
            _assert_same_table(tables[name], tables["fixed"], pool)
        for name, table in tables.items():
            assert not _check_cuckoo(table) or name in ("crowded", "one round")
    assert all(count > 0 for count in routes), routes  # every route taken: first slot, second slot, index
    assert tables["dynamic"]._cuckoo_unplaced == 0 and tables["one round"]._cuckoo_unplaced > 0


def _keys_with_slots(table, first, second=None, count=1, start=0):
    """``count`` keys whose first cuckoo slot is ``first`` (and second ``second``, if given): first + j H."""
    size = table._cuckoo_mask + 1
    candidates = first + torch.arange(start, start + 1_000_000) * size
    if second is not None:
        candidates = candidates[table._cuckoo_slots(candidates)[1] == second]
    return candidates[:count].tolist()


def test_colliding_keys_kick_each_other_along_a_chain_and_stay_exact():
    table, reference = KeyTable(64), KeyTable(64)  # H = 4096
    # a sits in slot 5; c in b's second slot; b's two slots are then both full, so b takes slot 5
    # and kicks a to its second slot.
    (a,) = _keys_with_slots(table, 5)
    (b,) = _keys_with_slots(table, 5, start=1)
    b_second = int(table._cuckoo_slots(torch.tensor([b]))[1])
    (c,) = _keys_with_slots(table, b_second)
    a_second = int(table._cuckoo_slots(torch.tensor([a]))[1])
    assert len({5, b_second, a_second}) == 3
    batches = [[a, c], [b], [c, a, b, a]]
    for keys in batches:
        with forced_algorithms(key_table="dynamic"):
            got = table.assign(torch.tensor(keys))
        with forced_algorithms(key_table="fixed"):
            want = reference.assign(torch.tensor(keys))
        _assert_same_assignment(got, want, 64)
    rows = table.lookup(torch.tensor([a, b, c]))
    assert int(table._cuckoo_row[5]) == rows[1] and int(table._cuckoo_key[5]) == b
    assert int(table._cuckoo_key[a_second]) == a and int(table._cuckoo_row[a_second]) == rows[0]
    assert int(table._cuckoo_key[b_second]) == c
    assert _cuckoo_routes(table, torch.tensor([a, b, c])) == (2, 1, 0)
    assert not _check_cuckoo(table) and table._cuckoo_unplaced == 0
    _assert_same_table(table, reference, [a, b, c])


def test_a_key_without_a_cuckoo_slot_is_found_through_the_index():
    # Three keys with the same two slots: the third has nowhere to go after the rounds; the index
    # finds it, batch after batch, until one of the others leaves and frees a slot for a new key.
    table, reference = KeyTable(3), KeyTable(3)
    first = 77
    second = int(table._cuckoo_slots(torch.tensor([first]))[1])
    crowd = [first] + _keys_with_slots(table, first, second, count=2, start=1)
    assert len(crowd) == 3
    other = 123456789
    batches = [crowd, crowd[::-1] * 2, [crowd[2], other], [other, crowd[0]] * 3, crowd]
    for step, keys in enumerate(batches):
        with forced_algorithms(key_table="dynamic"):
            got = table.assign(torch.tensor(keys))
        with forced_algorithms(key_table="fixed"):
            want = reference.assign(torch.tensor(keys))
        _assert_same_assignment(got, want, 3)
        _assert_same_table(table, reference, crowd + [other])
        missing = _check_cuckoo(table)
        if step < 2:
            assert len(missing) == 1 and missing <= set(crowd)
    assert table._cuckoo_unplaced >= 1


def test_keys_that_leave_the_index_leave_the_cuckoo_table():
    # Eviction: b takes a's row, and a's slot is emptied; a comes back new.
    a = 12345
    b = a + (1 << 40)  # the same first slot
    table, reference = KeyTable(1), KeyTable(1)
    with forced_algorithms(key_table="dynamic"):
        assert table.assign(torch.tensor([a])).rows.tolist() == [0]
        evicted = table.assign(torch.tensor([b]))
        assert evicted.fresh.tolist() == [0] and table.lookup(torch.tensor([a, b])).tolist() == [-1, 0]
        assert _cuckoo_routes(table, torch.tensor([a, b]))[2] == 1 and not _check_cuckoo(table)
        back = table.assign(torch.tensor([a, a]))
        assert back.fresh.tolist() == [0] and back.rows.tolist() == [0, 0]
    with forced_algorithms(key_table="fixed"):
        for keys in ([a], [b], [a, a]):
            reference.assign(torch.tensor(keys))
    _assert_same_table(table, reference, [a, b])
    assert int((table._cuckoo_row[:-1] >= 0).sum()) == 1

    # A full index bucket: the key that gets a row but no index slot never enters the cuckoo table,
    # and leaves nothing behind when its row goes to another key.
    table, reference = KeyTable(64), KeyTable(64)
    width, buckets, shift = KeyTable.BUCKET_SLOTS, 32, 64 - 5
    crowded = [_unmix_python(((5 - buckets // 2) << shift) + (i << 16) + 5) for i in range(width + 1)]
    fresh = [1000 + i for i in range(64)]
    for keys in (crowded, crowded[:2] * 3, fresh, crowded):
        with forced_algorithms(key_table="dynamic"):
            got = table.assign(torch.tensor(keys))
        with forced_algorithms(key_table="fixed"):
            want = reference.assign(torch.tensor(keys))
        _assert_same_assignment(got, want, 64)
        _assert_same_table(table, reference, crowded + fresh)
        assert not _check_cuckoo(table)
    assert int(table.index_overflows) == 2

    # Reset: every slot empty again, in place.
    table = KeyTable(8)
    keys = torch.tensor([a, b, 7, 9])
    pointers = [table._cuckoo_key.data_ptr(), table._cuckoo_row.data_ptr()]
    with forced_algorithms(key_table="dynamic"):
        first = table.assign(keys)
        table.reset()
        assert (table._cuckoo_row[:-1] == -1).all() and not _check_cuckoo(table)
        assert (table.lookup(keys) == -1).all()
        again = table.assign(keys)
    assert torch.equal(again.rows, first.rows) and again.fresh.numel() == 4
    assert [table._cuckoo_key.data_ptr(), table._cuckoo_row.data_ptr()] == pointers

    # Load: a table whose cuckoo table holds other keys takes a state in place and holds its keys.
    source, target = KeyTable(8), KeyTable(8)
    with forced_algorithms(key_table="dynamic"):
        source.assign(torch.tensor([1, 2, 3, 4, 5]))
        target.assign(torch.tensor([4 + (1 << 40), 3 + (1 << 40), 2 + (1 << 40), 9, 10, 11, 12, 13]))
        pointers = [target._cuckoo_key.data_ptr(), target._cuckoo_row.data_ptr()]
        target.load(source.state_tensors())
        assert [target._cuckoo_key.data_ptr(), target._cuckoo_row.data_ptr()] == pointers
        assert not _check_cuckoo(target) and _cuckoo_routes(target, torch.tensor([1, 2, 3, 4, 5]))[2] == 0
        _assert_same_table(target, source, [1, 2, 3, 4, 5, 9, 4 + (1 << 40)])
        batch = torch.tensor([5, 4 + (1 << 40), 1, 9, 2])
        _assert_same_assignment(target.assign(batch), source.assign(batch), 8)
    _assert_same_table(target, source, [1, 2, 3, 4, 5, 9, 4 + (1 << 40)])


def test_a_stream_of_new_keys_keeps_the_cuckoo_table_exact():
    # Every batch brings new keys only (N <= P, then N > P with repeats): each evicts old keys,
    # whose slots empty, and enters the cuckoo table, with no key left out at a load of 1/4.
    table, reference = KeyTable(256), KeyTable(256)
    rng = random.Random(5)
    for step in range(12):
        size = 200 if step % 2 else 300
        keys = torch.tensor([rng.randint(-(2**63), 2**63 - 1) for _ in range(size // 2)] * 2)
        with forced_algorithms(key_table="dynamic"):
            got = table.assign(keys)
        with forced_algorithms(key_table="fixed"):
            want = reference.assign(keys)
        _assert_same_assignment(got, want, 256)
        assert not _check_cuckoo(table)
        assert _cuckoo_routes(table, keys.unique())[2] == 0
    assert table._cuckoo_unplaced == 0 and int((table._cuckoo_row[:-1] >= 0).sum()) == 256


def test_a_compiled_update_leaves_the_cuckoo_table_exact():
    # Traced ("fixed"), the table empties the slots of keys that leave but places no new key in the
    # cuckoo table (that would need host reads): eager lookups find those through the index.
    table, reference = KeyTable(6), KeyTable(6)
    assign = torch.compile(table.assign, fullgraph=True, backend="eager")
    rng = random.Random(6)
    pool = [rng.randint(-(2**62), 2**62) for _ in range(12)]
    for step in range(8):
        keys = torch.tensor(rng.sample(pool, 5))
        with forced_algorithms(key_table="dynamic"):
            got = assign(keys) if step in (2, 3, 5) else table.assign(keys)
        with forced_algorithms(key_table="fixed"):
            want = reference.assign(keys)
        _assert_same_assignment(got, want, 6)
        _assert_same_table(table, reference, pool)
        _check_cuckoo(table)


def test_the_cuckoo_table_is_derived_cpu_state_kept_in_place():
    table = KeyTable(100)
    # At least 3 slots per row and 4096 in all; int32 rows.
    assert table._cuckoo_key.shape[0] == table._cuckoo_row.shape[0] == 4096 + 1
    assert table._cuckoo_key.dtype == torch.int64 and table._cuckoo_row.dtype == torch.int32
    assert KeyTable(5000)._cuckoo_key.shape[0] == 16384 + 1
    # Of 4096 random keys in 4096 rows (a load of 1/4), most sit in their first slot, all in one.
    rng = random.Random(4)
    keys = torch.tensor([rng.randint(-(2**63), 2**63 - 1) for _ in range(4096)])
    table = KeyTable(4096)
    with forced_algorithms(key_table="dynamic"):
        table.assign(keys)
    first, second, neither = _cuckoo_routes(table, keys)
    assert first > 0.8 * 4096 and second > 0 and neither == 0, (first, second, neither)  # 3479, 617, 0
    # Identity keys 0 .. P - 1 never share a first slot.
    table = KeyTable(1000)
    with forced_algorithms(key_table="dynamic"):
        table.assign(torch.arange(1000))
    assert _cuckoo_routes(table, torch.arange(1000)) == (1000, 0, 0)
    tracker = presets.ddpo(100, buffer_size=4, min_count=2, keys="hashed")
    tracker.update(torch.tensor([3, 1 << 50, 3]), torch.tensor([1.0, 0.0, 0.5]))
    assert {"keys", "last_seen", "clock"} <= set(tracker.state_dict())
    assert not any("cuckoo" in name for name in tracker.state_dict())
    pointers = [tracker._table._cuckoo_key.data_ptr(), tracker._table._cuckoo_row.data_ptr()]
    rows = tracker._table.lookup(torch.tensor([3, 1 << 50]))
    assert sorted(rows.tolist()) == [0, 1]
    tracker.load_state_dict(tracker.state_dict())  # in place, so that captured CUDA graphs stay valid
    assert [tracker._table._cuckoo_key.data_ptr(), tracker._table._cuckoo_row.data_ptr()] == pointers
    assert torch.equal(tracker._table.lookup(torch.tensor([3, 1 << 50])), rows)
    assert _cuckoo_routes(tracker._table, torch.tensor([3, 1 << 50]))[2] == 0
    assert KeyTable(4, device="meta")._cuckoo_key is None  # off the CPU the "fixed" algorithm never reads it


# --- hashed trackers ---------------------------------------------------------------------------

ESTIMATORS = [
    dict(),
    dict(fallback="raw", ddof=1, min_count=2),
    dict(fallback="zero", baseline="leave_one_out", scale="none"),
    dict(scale="batch_std", min_count=3),
    dict(baseline="batch_mean", fallback="raw"),
]


@pytest.mark.parametrize("eviction", EVICTIONS)
@pytest.mark.parametrize("memory", ["none", "buffer", "ema"])
@pytest.mark.parametrize("capacity", [1, 3, 6])
def test_hashed_tracker_matches_the_lru_reference_on_drifting_streams(memory, capacity, eviction):
    for seed, options in enumerate(ESTIMATORS):
        rng = random.Random(seed)
        tracker = AdvantageTracker(capacity, memory, keys="hashed", buffer_size=4, dtype=torch.float64, **options)
        reference = ReferenceAdvantageTracker(memory, capacity=capacity, buffer_size=4, **options)
        base = 0
        for step in range(25):
            base += rng.choice([0, 1, 2, 5])
            keys = _drifting_keys(rng, base, capacity + 3, rng.randint(1, 12))
            rewards = [rng.choice([0.0, 1.0, rng.gauss(0, 1)]) for _ in keys]
            valid = [rng.random() > 0.15 for _ in keys]
            with forced_algorithms(key_table=eviction):
                got = tracker.update_with_report(
                    torch.tensor(keys), torch.tensor(rewards, dtype=torch.float64), torch.tensor(valid)
                )
            want = reference.update_with_report(keys, rewards, valid)
            where = (options, step)
            torch.testing.assert_close(
                got.advantages, torch.tensor(want.advantages, dtype=torch.float64), rtol=1e-9, atol=1e-9, msg=str(where)
            )
            assert got.fallback.tolist() == want.fallback, where
            assert got.zero_variance.tolist() == want.zero_variance, where
            assert float(got.zero_variance_fraction) == pytest.approx(want.zero_variance_fraction)
            held, used = tracker.table_keys()
            assert set(held[used].tolist()) == set(reference.recent), where
            remembered = reference.stats()
            if remembered:
                stats = tracker.stats(torch.tensor(list(remembered)))
                assert stats.count.tolist() == [count for _, _, count in remembered.values()], where
                torch.testing.assert_close(
                    stats.mean,
                    torch.tensor([m for m, _, _ in remembered.values()], dtype=torch.float64),
                    msg=str(where),
                )


@pytest.mark.parametrize(
    "make",
    [
        lambda keys: presets.ddpo(30, buffer_size=8, min_count=3, keys=keys),
        lambda keys: presets.trl_grpo(30, keys=keys),
        lambda keys: presets.verl_rloo(30, memory="ema", keys=keys),
        lambda keys: BufferStatTracker(30, 8, 3, keys=keys),
    ],
)
def test_hashed_tracker_with_room_for_every_prompt_equals_the_id_tracker(make):
    rng = random.Random(1)
    prompts = [f"prompt {i}" for i in range(30)]
    hashed, by_id, index = make("hashed"), make("ids"), PromptIndex(30)
    for _ in range(20):
        batch = [rng.choice(prompts[: rng.randint(1, 30)]) for _ in range(rng.randint(1, 40))]
        rewards = torch.randn(len(batch), generator=torch.Generator().manual_seed(rng.randint(0, 99)))
        expected = by_id.update(index.ids(batch), rewards)
        torch.testing.assert_close(hashed.update(prompt_keys(batch), rewards), expected, rtol=0, atol=0)
    seen = [p for p in prompts if p in index]
    got, want = hashed.stats(prompt_keys(seen)), by_id.stats(index.ids(seen))
    for name in ("mean", "std", "count", "fallback"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=0, atol=0, equal_nan=True)
    assert torch.equal(hashed.fallback_mask(prompt_keys(seen)), by_id.fallback_mask(index.ids(seen)))


def test_overflow_keys_get_the_fallback_and_are_forgotten():
    tracker = AdvantageTracker(2, "buffer", keys="hashed", min_count=1, fallback="batch", eps=1e-6)
    keys = torch.tensor([10, 11, 12, 12, 13])  # four distinct keys, two rows: 10 and 11 overflow
    rewards = torch.tensor([1.0, 2.0, 3.0, 5.0, 9.0])
    report = tracker.update_with_report(keys, rewards)
    batch_mean, batch_std = rewards.mean(), rewards.std(unbiased=False)
    torch.testing.assert_close(report.advantages[:2], (rewards[:2] - batch_mean) / (batch_std + 1e-6))
    torch.testing.assert_close(report.advantages[2:], torch.tensor([-1.0, 1.0, 0.0]) / (1 + 1e-6))
    assert report.fallback.tolist() == [True, True, False, False, False]
    assert report.zero_variance.tolist() == [True, True, False, False, True]
    assert tracker.stats(keys).count.tolist() == [0, 0, 2, 2, 1]
    assert tracker.fallback_mask(keys).tolist() == [True, True, False, False, False]


@pytest.mark.parametrize("memory", ["none", "buffer", "ema"])
def test_hashed_update_compiles_without_graph_breaks(memory):
    eager = AdvantageTracker(5, memory, keys="hashed", check_values=False, buffer_size=4)
    compiled_tracker = AdvantageTracker(5, memory, keys="hashed", check_values=False, buffer_size=4)
    compiled = torch.compile(compiled_tracker.update_with_report, fullgraph=True, backend="eager")
    rng = random.Random(0)
    for step in range(6):
        keys = torch.tensor(_drifting_keys(rng, 2 * step, 8, 12))
        rewards = torch.randn(12, generator=torch.Generator().manual_seed(step))
        valid = torch.rand(12, generator=torch.Generator().manual_seed(step + 9)) < 0.9
        want, got = eager.update_with_report(keys, rewards, valid), compiled(keys, rewards, valid)
        for name in got._fields:
            torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=0, atol=0)
    for name, value in eager.state_dict().items():
        assert torch.equal(compiled_tracker.state_dict()[name], value), name


def test_state_dict_round_trip_is_exact_and_bad_states_are_refused():
    rng = random.Random(2)
    tracker = presets.ddpo(8, buffer_size=4, min_count=2, keys="hashed")
    for step in range(12):
        tracker.update(torch.tensor(_drifting_keys(rng, step, 12, 10)), torch.randn(10))
    state = tracker.state_dict()
    assert {"keys", "last_seen", "clock", "rewards", "count", "head"} == set(state)
    copy = presets.ddpo(8, buffer_size=4, min_count=2, keys="hashed")
    copy.load_state_dict(state)
    for name, value in copy.state_dict().items():
        assert torch.equal(value, state[name]), name
    for step in range(12, 24):  # both continue identically, evictions included
        keys, rewards = torch.tensor(_drifting_keys(rng, step, 12, 10)), torch.randn(10)
        assert torch.equal(copy.update(keys, rewards), tracker.update(keys, rewards))
    for name, value in copy.state_dict().items():
        assert torch.equal(value, tracker.state_dict()[name]), name

    before = copy.state_dict()
    used = int((before["last_seen"] >= 0).nonzero()[0])
    other = int((before["last_seen"] >= 0).nonzero()[1])
    bad = {
        "one key in two rows": {
            "keys": before["keys"].clone().index_fill_(0, torch.tensor([other]), int(before["keys"][used]))
        },
        "'last_seen' must lie": {"last_seen": before["last_seen"].clone().fill_(int(before["clock"]))},
        "must differ": {
            "last_seen": before["last_seen"]
            .clone()
            .index_fill_(0, torch.tensor([other]), int(before["last_seen"][used]))
        },
        "'clock' must be >= 0": {"clock": torch.tensor(-1)},
    }
    for message, change in bad.items():
        with pytest.raises(ValueError, match=message):
            copy.load_state_dict({**before, **change})
        for name, value in copy.state_dict().items():
            assert torch.equal(value, before[name]), (message, name)


def test_keys_option_is_checked_and_hashed_keys_take_any_int64():
    with pytest.raises(ValueError, match="keys must be one of 'ids', 'hashed'"):
        AdvantageTracker(4, keys="strings")
    tracker = AdvantageTracker(4, "ema", keys="hashed")
    keys = torch.tensor([-(2**63), 2**63 - 1, -5, 10**18])
    tracker.update(keys, torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert tracker.keys == "hashed"
    assert tracker.stats(keys).count.tolist() == [1, 1, 1, 1]
    with pytest.raises(ValueError, match=r"lie in \[0, 4\)"):
        AdvantageTracker(4, "ema").update(keys, torch.ones(4))
    with pytest.raises(ValueError, match="needs keys='hashed'"):
        AdvantageTracker(4, "ema").table_keys()
    absent = tracker.stats(torch.tensor([7, 8]))
    assert absent.count.tolist() == [0, 0] and absent.mean.isnan().all() and absent.fallback.all()
    # A tracker that keeps nothing per prompt takes any key and needs no table.
    batch = BatchStatTracker(3, keys="hashed")
    batch.update(keys, torch.ones(4))
    assert not batch.table_keys()[1].any()


def test_the_library_imports_none_of_the_training_extras():
    script = (
        "import sys, rail_interview.stat_tracking, rail_interview.stat_tracking.presets; "
        "print(sorted(m for m in ('absl', 'ml_collections', 'matplotlib') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("algorithm", EVICTIONS)
def test_keys_past_a_crowded_first_bucket_are_found_in_their_second(algorithm):
    table = KeyTable(64)  # 32 buckets of 8
    shift = 64 - 5
    # Eight keys whose first bucket is 5 and whose second buckets differ. A batch places its keys
    # by the loads before it: six fill bucket 5, and the two of the next batch spill to their second.
    keys = torch.tensor([_unmix_python(((5 - 16) << shift) + (i << 16) + 10 + i) for i in range(8)])
    with forced_algorithms(key_table=algorithm):
        rows = torch.cat([table.assign(keys[:6]).rows, table.assign(keys[6:]).rows])
        assert table._index[5, 1].ge(0).sum() == KeyTable.FIRST_BUCKET_LOAD
        assert [int(table._index[10 + i, 1].ge(0).sum()) for i in (6, 7)] == [1, 1]
        again = table.assign(keys.flip(0))  # all found, none new
    assert again.fresh.numel() == 0 or (again.fresh == 64).all()
    assert torch.equal(again.rows, rows.flip(0))
    assert torch.equal(table.lookup(keys), rows)


@pytest.mark.parametrize("algorithm", EVICTIONS)
def test_batches_that_replace_every_key_fit_the_index(algorithm):
    table = KeyTable(512)  # each batch brings 512 new keys for 512 rows: every bucket refilled at once
    with forced_algorithms(key_table=algorithm):
        for step in range(20):
            keys = torch.arange(step * 512, (step + 1) * 512) * 7919 + 13
            table.assign(keys)
            assert torch.equal(table.lookup(keys).sort().values, torch.arange(512))
    assert int(table.index_overflows) == 0


def test_canonical_text_of_chat_messages_ignores_field_order_and_takes_numpy_values():
    import numpy as np

    from rail_interview.stat_tracking import canonical_text

    one = [{"role": "user", "content": "2 + 2?"}]
    other = [{"content": "2 + 2?", "role": "user"}]
    assert canonical_text(one) == canonical_text(other) == '[{"content":"2 + 2?","role":"user"}]'
    assert canonical_text("a cat") == "a cat"
    assert canonical_text({"ids": np.array([1, 2]), "n": np.int64(3)}) == '{"ids":[1,2],"n":3}'
    assert canonical_text([{"content": "é"}]) == '[{"content":"é"}]'  # UTF-8, not \\u escapes
    with pytest.raises(TypeError, match="no stable text form"):
        canonical_text([{"content": object()}])


def test_identity_keys_keep_integers_and_hash_everything_else_by_its_canonical_text():
    import numpy as np

    from rail_interview.stat_tracking import canonical_text, identity_keys

    messages = [{"role": "user", "content": "a cat"}]
    keys = identity_keys([7, np.int64(-3), "a cat", messages])
    assert keys.dtype == torch.int64
    assert keys[:2].tolist() == [7, -3]
    assert keys[2:].tolist() == prompt_keys(["a cat", canonical_text(messages)]).tolist()
    assert identity_keys([True]).tolist() == prompt_keys(["true"]).tolist()  # a bool is not an id
    with pytest.raises(ValueError, match="prompt 1's key 9223372036854775808 does not fit int64"):
        identity_keys([0, 2**63])
    with pytest.raises(ValueError, match="prompt 0 cannot be keyed"):
        identity_keys([[{"content": object()}]])


def test_memory_bytes_counts_every_tensor_once_and_matches_the_documented_range():
    for capacity in (1_000, 4_096, 100_000):
        table = KeyTable(capacity)
        per_row = table.memory_bytes() / capacity
        # The class docstring: 88 to 152 bytes per row, the CPU's cuckoo table 36 to 72 more
        # (at least 48 KB), the queue up to 16 more; small tables pay the minimum sizes.
        assert 88 + 36 <= per_row <= 152 + 72 + 16 + 49_152 / capacity, (capacity, per_row)
        total = table.memory_bytes()
        table.extra_view = table._index.view(-1)  # pylint: disable=protected-access  # another view: counted once
        assert table.memory_bytes() == total
