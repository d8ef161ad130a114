"""Tests of PromptIndex, the string-to-id map for trainers with text prompts.

Several ranks: tests/test_prompt_index_distributed.py.
"""

import warnings

import pytest
import torch
import torch.distributed as dist

from rail_interview.stat_tracking import (
    BufferStatTracker,
    PromptIndex,
    PromptIndexFullError,
    ReferenceBufferStatTracker,
)


def test_ids_are_stable_and_first_come_first_served():
    index = PromptIndex(capacity=4)
    assert index.ids(["b", "a", "b"]).tolist() == [0, 1, 0]
    assert index.ids(["c", "a"]).tolist() == [2, 1]
    assert len(index) == 3 and "c" in index and "d" not in index
    assert [index.prompt(i) for i in range(3)] == ["b", "a", "c"]


def test_full_index_refuses_the_whole_batch_and_adds_nothing():
    index = PromptIndex(capacity=3)
    index.ids(["a", "b"])
    with pytest.raises(PromptIndexFullError, match="full: 2 of 3 ids taken.*2 new prompt.*e.g. 'c'"):
        index.ids(["a", "c", "d"])
    assert len(index) == 2 and "c" not in index
    assert index.ids(["c"]).tolist() == [2]


def test_bad_prompts_and_ids():
    index = PromptIndex(capacity=2)
    with pytest.raises(TypeError, match="strings"):
        index.ids(["a", 3])
    with pytest.raises(TypeError, match="single string"):
        index.ids("a cat")
    assert len(index) == 0
    with pytest.raises(KeyError, match="no prompt has id 0"):
        index.prompt(0)
    with pytest.raises(ValueError):
        PromptIndex(capacity=0)


def test_state_round_trip_and_refusal():
    index = PromptIndex(capacity=3)
    index.ids(["x", "y"])
    restored = PromptIndex(capacity=3)
    restored.load_state_dict(index.state_dict())
    assert restored.ids(["y", "z"]).tolist() == [1, 2]
    for bad in [{"prompts": ["a", "a"]}, {"prompts": ["a", "b", "c", "d"]}, {"prompts": [1]}, {}]:
        with pytest.raises(ValueError):
            restored.load_state_dict(bad)
    assert len(restored) == 3


def test_state_round_trip_keeps_the_saved_order_of_unsorted_prompts():
    index = PromptIndex(capacity=4)
    index.load_state_dict({"prompts": ["b", "a", "c"]})
    assert index.ids(["a", "b", "c", "d"]).tolist() == [1, 0, 2, 3]
    restored = PromptIndex(capacity=4)
    restored.load_state_dict(index.state_dict())
    assert restored.state_dict() == {"prompts": ["b", "a", "c", "d"]}
    assert restored.ids(["c", "b", "d", "a"]).tolist() == [2, 0, 3, 1]


def test_no_warning_in_a_single_process():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        PromptIndex(capacity=2).ids(["a cat"])


def test_a_one_rank_process_group_numbers_like_a_plain_index(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # one rank: no warning, with or without a group
            plain = PromptIndex(capacity=3)
            shared = PromptIndex(capacity=3, process_group=dist.group.WORLD)
            for prompts in [["b", "a", "b"], [], ["c", "a"]]:
                assert shared.ids(prompts).tolist() == plain.ids(prompts).tolist()
        assert shared.state_dict() == plain.state_dict() == {"prompts": ["b", "a", "c"]}
        with pytest.raises(PromptIndexFullError):
            shared.ids(["d"])
        with pytest.raises(TypeError, match="strings"):
            shared.ids([None])
        assert shared.state_dict() == {"prompts": ["b", "a", "c"]}
    finally:
        dist.destroy_process_group()


def test_string_prompts_through_a_tracker_match_the_reference():
    index = PromptIndex(capacity=10)
    tracker = BufferStatTracker(num_prompts=10, buffer_size=4, min_count=2, dtype=torch.float64)
    reference = ReferenceBufferStatTracker(buffer_size=4, min_count=2)
    batches = [(["a cat", "a dog", "a cat"], [1.0, 2.0, 4.0]), (["a dog", "a cow", "a cat"], [3.0, 9.0, 0.5])]
    for prompts, rewards in batches:
        advantages = tracker.update(index.ids(prompts), torch.tensor(rewards, dtype=torch.float64))
        torch.testing.assert_close(advantages, torch.tensor(reference.update(prompts, rewards), dtype=torch.float64))


def test_properties_and_unknown_ids():
    index = PromptIndex(capacity=3)
    index.ids(["a"])
    assert index.capacity == 3 and index.process_group is None
    for prompt_id in (-1, 1):
        with pytest.raises(KeyError, match=f"no prompt has id {prompt_id}"):
            index.prompt(prompt_id)
