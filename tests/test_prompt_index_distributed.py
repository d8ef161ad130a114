"""PromptIndex across torch.distributed ranks: two gloo processes on the CPU.

Every rank's index must equal one process's fed the concatenated batches in
rank order, and a tracker fed those ids must give every rank the statistics
and advantages of that one process. Refusals (a full index, bad input on one
rank) must raise on every rank and leave every index unchanged.
"""

import inspect
import warnings

import pytest
import torch
import torch.distributed as dist

from rail_interview.stat_tracking import BufferStatTracker, PromptIndex, PromptIndexFullError
from spawned_ranks import run_ranks

WORLD_SIZE = 2
CAPACITY = 8
# One (rank 0's prompts, rank 1's prompts) pair per step. The tracker needs
# batches of one size on every rank; the index alone does not (see below).
BATCHES = [
    (["a cat", "a dog", "a cat"], ["a cow", "a cat", "a fox"]),  # "a cat" on both ranks
    (["a dog", "a cat", "a dog"], ["a hen", "a cow", "a hen"]),  # rank 0 brings nothing new
    (["an owl", "a cat", "an eel"], ["a fox", "a cow", "a dog"]),  # rank 1 brings nothing new
    (["a cow", "a dog", "an owl"], ["a cat", "an eel", "a fox"]),  # nothing new
    (["a hen", "a hen", "a hen"], ["an owl", "a dog", "a hen"]),
]


def _gather(value):
    values = [None] * WORLD_SIZE
    dist.all_gather_object(values, value)
    return values


def _matches_one_process(rank: int, group: dist.ProcessGroup) -> None:
    index = PromptIndex(CAPACITY, process_group=group)
    tracker = BufferStatTracker(CAPACITY, buffer_size=4, min_count=2, dtype=torch.float64, process_group=group)
    single_index = PromptIndex(CAPACITY)
    single_tracker = BufferStatTracker(CAPACITY, buffer_size=4, min_count=2, dtype=torch.float64)
    generator = torch.Generator().manual_seed(0)  # the same stream on every rank
    for prompts_by_rank in BATCHES:
        # Rank 0's rewards are about 1, rank 1's about 100.
        rewards_by_rank = [
            scale * (1 + 0.3 * torch.randn(len(prompts), generator=generator, dtype=torch.float64))
            for scale, prompts in zip([1.0, 100.0], prompts_by_rank)
        ]
        single_ids = single_index.ids(prompts_by_rank[0] + prompts_by_rank[1])
        expected = single_tracker.update(single_ids, torch.cat(rewards_by_rank))
        ids = index.ids(prompts_by_rank[rank])
        advantages = tracker.update(ids, rewards_by_rank[rank])
        mine = slice(rank * len(prompts_by_rank[0]), (rank + 1) * len(prompts_by_rank[0]))
        assert ids.tolist() == single_ids[mine].tolist()  # the one process numbers identically
        torch.testing.assert_close(advantages, expected[mine])

    states = _gather(index.state_dict())
    assert states[0] == states[1] == single_index.state_dict()
    assert len(index) == 7
    stats, single_stats = tracker.stats(), single_tracker.stats()
    for field in ("mean", "std", "count"):
        torch.testing.assert_close(getattr(stats, field), getattr(single_stats, field), equal_nan=True)


def _refusals(rank: int, group: dist.ProcessGroup) -> None:
    index = PromptIndex(CAPACITY, process_group=group)
    index.ids([f"prompt {i}" for i in range(7)] if rank == 0 else ["prompt 6"])  # one id left
    before = index.state_dict()

    # Each rank's new prompt fits alone; together they do not.
    with pytest.raises(PromptIndexFullError, match="7 of 8 ids taken and this call brings 2 new"):
        index.ids(["a yak"] if rank == 0 else ["a gnu", "prompt 1"])
    assert index.state_dict() == before
    # Rank 1 alone overflows, rank 0 brings nothing new.
    with pytest.raises(PromptIndexFullError, match="brings 2 new"):
        index.ids(["prompt 0"] if rank == 0 else ["a gnu", "a yak", "a gnu"])
    assert index.state_dict() == before

    # Bad input on one rank raises on both; the others name that rank.
    with pytest.raises(TypeError, match=r"strings, got int" if rank == 1 else r"rank\(s\) \[1\]"):
        index.ids(["a yak"] if rank == 0 else ["a gnu", 3])
    with pytest.raises(TypeError, match=r"single string" if rank == 0 else r"rank\(s\) \[0\]"):
        index.ids("a yak" if rank == 0 else [])
    assert index.state_dict() == before

    # Indexes loaded from different states are refused on every rank.
    diverged = PromptIndex(CAPACITY, process_group=group)
    diverged.load_state_dict({"prompts": ["a cat"] * (rank == 1)})
    with pytest.raises(ValueError, match=r"different numbers of prompts on different ranks, \[0, 1\]"):
        diverged.ids(["a dog"])

    # The ranks are still in step: batches of different sizes, one new prompt.
    assert index.ids(["a yak"] if rank == 0 else ["prompt 3", "a yak"]).tolist() == ([7] if rank == 0 else [3, 7])
    states = _gather(index.state_dict())
    assert states[0] == states[1] and states[0]["prompts"][-1] == "a yak"


def _warning_without_a_group() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        index = PromptIndex(CAPACITY)
        call_line = inspect.currentframe().f_lineno + 1
        index.ids(["a cat"])
        index.ids(["a dog"])
    assert len(caught) == 1 and caught[0].category is UserWarning, [str(w.message) for w in caught]
    assert "process_group=" in str(caught[0].message) and "2 ranks" in str(caught[0].message)
    assert (caught[0].filename, caught[0].lineno) == (__file__, call_line)  # the caller's line
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        PromptIndex(CAPACITY, process_group=dist.group.WORLD).ids(["a cat"])


def _all_scenarios(rank: int) -> None:
    group = dist.new_group(backend="gloo")
    _matches_one_process(rank, group)
    _refusals(rank, group)
    _warning_without_a_group()


def test_two_gloo_ranks_agree_on_ids_and_match_one_process(tmp_path):
    run_ranks(_all_scenarios, WORLD_SIZE, str(tmp_path / "init"), timeout=60)
