"""Trackers across torch.distributed ranks: two gloo processes on the CPU.

Every rank's state must equal a single-process tracker's fed the concatenated
batches in rank order, and each rank's advantages its slice of that tracker's;
a refused input on one rank raises on every rank, with the state unchanged.
With hashed keys each rank brings its own strings and no index collective is
needed.
"""

import random

import pytest
import torch
import torch.distributed as dist

from rail_interview.stat_tracking import BatchStatTracker, BufferStatTracker, EmaStatTracker, presets, prompt_keys
from spawned_ranks import run_ranks

WORLD_SIZE = 2
TRACKERS = {
    "buffer": lambda **kw: BufferStatTracker(num_prompts=7, buffer_size=4, min_count=3, **kw),
    "ema": lambda **kw: EmaStatTracker(num_prompts=7, decay=0.6, min_count=3, **kw),
    "batch": lambda **kw: BatchStatTracker(num_prompts=7, **kw),
}


def _scenarios(rank: int) -> None:
    group = dist.group.WORLD
    generator = torch.Generator().manual_seed(0)  # the same stream on every rank
    for name, make in TRACKERS.items():
        shared, single = make(process_group=group), make()
        for _ in range(12):
            local = int(torch.randint(1, 9, (1,), generator=generator))
            ids = torch.randint(7, (WORLD_SIZE * local,), generator=generator)
            rewards = torch.randn(WORLD_SIZE * local, generator=generator) * 10 - 40
            expected = single.update(ids, rewards)
            mine = slice(rank * local, (rank + 1) * local)
            torch.testing.assert_close(shared.update(ids[mine], rewards[mine]), expected[mine], msg=name)
        for key, value in single.state_dict().items():
            assert torch.equal(shared.state_dict()[key], value), (name, key)

    # Valid masks and NaN rewards travel with the batch; the report is each rank's slice.
    shared, single = presets.trl_grpo(7, memory="buffer", process_group=group), presets.trl_grpo(7, memory="buffer")
    for _ in range(6):
        local = int(torch.randint(1, 9, (1,), generator=generator))
        ids = torch.randint(7, (WORLD_SIZE * local,), generator=generator)
        rewards = (torch.rand(WORLD_SIZE * local, generator=generator) < 0.3).float()
        rewards[torch.rand(WORLD_SIZE * local, generator=generator) < 0.1] = float("nan")
        valid = torch.rand(WORLD_SIZE * local, generator=generator) < 0.8
        expected = single.update_with_report(ids, rewards, valid)
        mine = slice(rank * local, (rank + 1) * local)
        got = shared.update_with_report(ids[mine], rewards[mine], valid[mine])
        torch.testing.assert_close(got.advantages, expected.advantages[mine])
        assert torch.equal(got.zero_variance, expected.zero_variance[mine])
        assert torch.equal(got.zero_variance_fraction, expected.zero_variance_fraction)
    for key, value in single.state_dict().items():
        assert torch.equal(shared.state_dict()[key], value), key
    with pytest.raises(ValueError, match=r"valid must be passed on every rank or on none; ranks that passed it: \[0\]"):
        mask = torch.tensor([True, False]) if rank == 0 else None
        shared.update(torch.tensor([1, 2]), torch.tensor([1.0, 0.0]), mask)

    buffer = TRACKERS["buffer"](process_group=group)
    before = buffer.state_dict()
    with pytest.raises(ValueError, match=r"same size on every rank, got sizes \[3, 4\]"):
        buffer.update(torch.zeros(3 + rank, dtype=torch.int64), torch.zeros(3 + rank))
    bad_id = 99 if rank == 1 else 0  # only rank 1's input is bad; rank 0 must not hang
    with pytest.raises(ValueError, match=r"\[0, 7\)" if rank == 1 else r"rank\(s\) \[1\] refused"):
        buffer.update(torch.tensor([bad_id, 1]), torch.tensor([1.0, 2.0]))
    for key, value in buffer.state_dict().items():
        assert torch.equal(value, before[key])
    # An empty batch on every rank is a batch like any other, not a refusal.
    empty = buffer.update(torch.tensor([], dtype=torch.int64), torch.tensor([]))
    assert empty.shape == (0,)


def test_two_gloo_ranks_match_one_process_and_agree_on_refusals(tmp_path):
    run_ranks(_scenarios, WORLD_SIZE, str(tmp_path / "init"), timeout=60)


def _hashed_scenario(rank: int) -> None:
    """Each rank brings its own prompt strings; the tables agree with no index collective."""
    group = dist.group.WORLD
    make = lambda **kw: presets.ddpo(4, buffer_size=3, min_count=2, keys="hashed", **kw)  # noqa: E731
    shared, single = make(process_group=group), make()
    rng = random.Random(5)  # the same stream on every rank
    for step in range(10):
        # Rank r draws from its own prompts, which drift: 4 rows cannot hold them all, so keys are evicted.
        batches = [
            [f"rank {r} prompt {rng.randint(step // 2, step // 2 + 2)}" for _ in range(3)] for r in range(WORLD_SIZE)
        ]
        rewards = torch.tensor([[rng.gauss(0, 1) for _ in range(3)] for _ in range(WORLD_SIZE)])
        expected = single.update(prompt_keys(sum(batches, [])), rewards.view(-1))
        got = shared.update(prompt_keys(batches[rank]), rewards[rank])
        torch.testing.assert_close(got, expected[rank * 3 : (rank + 1) * 3])
    for key, value in single.state_dict().items():
        assert torch.equal(shared.state_dict()[key], value), key
    assert int(single.state_dict()["clock"]) == 60
    held, used = shared.table_keys()
    assert int(used.sum()) == 4
    gathered = [None] * WORLD_SIZE
    dist.all_gather_object(gathered, sorted(held[used].tolist()))
    assert gathered[0] == gathered[1]
    # An early prompt of each rank was evicted and starts over with the fallback.
    early = prompt_keys([f"rank {r} prompt 0" for r in range(WORLD_SIZE)])
    assert shared.stats(early).count.tolist() == [0, 0]


def test_two_gloo_ranks_with_hashed_string_keys_agree_through_evictions(tmp_path):
    run_ranks(_hashed_scenario, WORLD_SIZE, str(tmp_path / "init"), timeout=60)
