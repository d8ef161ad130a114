"""Trackers across torch.distributed ranks: two gloo processes on the CPU.

Every rank's state must equal a single-process tracker's fed the concatenated
batches in rank order, and each rank's advantages its slice of that tracker's;
a refused input on one rank raises on every rank, with the state unchanged.
"""


import pytest
import torch
import torch.distributed as dist

from rail_interview.stat_tracking import BatchStatTracker, BufferStatTracker, EmaStatTracker
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
