"""BufferStatTracker against the dict-of-deques reference, and hand-checked cases."""

import math
import random

import pytest
import torch

from rail_interview.stat_tracking import BufferStatTracker, ReferenceBufferStatTracker


def _assert_matches_reference(tracker, reference, ids, rewards, *, atol=1e-9, rtol=1e-9):
    advantages = tracker.update(ids, rewards)
    expected = torch.tensor(reference.update(ids, rewards), dtype=torch.float64)
    torch.testing.assert_close(advantages.double(), expected, atol=atol, rtol=rtol)
    stats = tracker.stats()
    ref_stats = reference.stats()
    for prompt in range(tracker.num_prompts):
        if prompt in ref_stats:
            mean, std, count = ref_stats[prompt]
            assert stats.count[prompt].item() == count
            assert stats.mean[prompt].item() == pytest.approx(mean, rel=rtol, abs=atol)
            assert stats.std[prompt].item() == pytest.approx(std, rel=rtol, abs=atol)
            assert stats.fallback[prompt].item() == (count < tracker.min_count)
        else:
            assert stats.count[prompt].item() == 0 and stats.fallback[prompt].item()
            assert math.isnan(stats.mean[prompt].item()) and math.isnan(stats.std[prompt].item())


@pytest.mark.parametrize(
    "num_prompts, buffer_size, min_count, max_batch",
    [
        (1, 4, 2, 20),  # one prompt, repeated far beyond the buffer in each batch
        (5, 3, 2, 40),
        (64, 32, 16, 256),  # the toy problem's setting
        (300, 8, 3, 100),  # more prompts than samples: the per-sample path
        (7, 1, 1, 30),  # a buffer of one
        (10, 4, 6, 50),  # buffer_size < min_count: always the batch fallback
    ],
)
@pytest.mark.filterwarnings("ignore:buffer_size")
def test_random_sequences_match_the_reference(num_prompts, buffer_size, min_count, max_batch):
    rng = random.Random(num_prompts * 1000 + buffer_size)
    generator = torch.Generator().manual_seed(rng.randrange(2**31))
    tracker = BufferStatTracker(num_prompts, buffer_size, min_count, dtype=torch.float64)
    reference = ReferenceBufferStatTracker(buffer_size, min_count)
    for _ in range(25):
        batch = rng.randint(1, max_batch)
        # Skewed prompt choice so that some prompts repeat a lot and some are rare.
        weights = torch.rand(num_prompts, generator=generator) ** 4
        ids = torch.multinomial(weights, batch, replacement=True, generator=generator)
        rewards = torch.randn(batch, generator=generator, dtype=torch.float64) * 30 - 100
        _assert_matches_reference(tracker, reference, ids, rewards)


def test_float32_matches_the_reference_for_rewards_far_from_zero():
    generator = torch.Generator().manual_seed(0)
    tracker = BufferStatTracker(16, 8, 4)
    reference = ReferenceBufferStatTracker(8, 4)
    for _ in range(30):
        ids = torch.randint(16, (64,), generator=generator)
        rewards = (torch.randn(64, generator=generator) * 2 - 200).float()
        _assert_matches_reference(tracker, reference, ids, rewards, atol=2e-4, rtol=1e-4)


def test_prompt_repeated_more_than_buffer_size_keeps_its_last_rewards():
    tracker = BufferStatTracker(num_prompts=2, buffer_size=3, min_count=1, dtype=torch.float64)
    tracker.update(torch.tensor([0] * 7 + [1]), torch.tensor([1.0, 2, 3, 4, 5, 6, 7, 100]))
    state = tracker.state_dict()
    # Rewards 1..7 go to slots 0,1,2,0,1,2,0: the buffer ends as [7, 5, 6], head at 1.
    assert state["rewards"][0].tolist() == [7.0, 5.0, 6.0]
    assert state["count"].tolist() == [3, 1] and state["head"].tolist() == [1, 1]
    assert tracker.stats().mean[0].item() == pytest.approx(6.0)


def test_hand_computed_case():
    tracker = BufferStatTracker(num_prompts=3, buffer_size=2, min_count=2)
    # Batch 1: prompt 0 gets 1 and 3 (count 2: its own stats, mean 2, std 1);
    # prompt 2 gets 8 (count 1: batch stats over [1, 3, 8], mean 4, std sqrt(26/3)).
    first = tracker.update(torch.tensor([0, 2, 0]), torch.tensor([1.0, 8.0, 3.0]))
    batch_std = math.sqrt(26 / 3)
    torch.testing.assert_close(first, torch.tensor([-1.0 / (1 + 1e-6), 4 / (batch_std + 1e-6), 1.0 / (1 + 1e-6)]))
    # Batch 2: prompt 0 gets 7, evicting 1: buffer [7, 3], mean 5, std 2.
    # Prompt 2 gets 10: buffer [8, 10], mean 9, std 1.
    second = tracker.update(torch.tensor([2, 0]), torch.tensor([10.0, 7.0]))
    torch.testing.assert_close(second, torch.tensor([1.0 / (1 + 1e-6), 2.0 / (2 + 1e-6)]))
    stats = tracker.stats()
    torch.testing.assert_close(stats.mean[[0, 2]], torch.tensor([5.0, 9.0]))
    torch.testing.assert_close(stats.std[[0, 2]], torch.tensor([2.0, 1.0]))
    assert stats.count.tolist() == [2, 0, 2] and stats.fallback.tolist() == [False, True, False]


def test_min_count_boundary_switches_from_batch_to_own_statistics():
    tracker = BufferStatTracker(num_prompts=2, buffer_size=8, min_count=3)
    ids = torch.tensor([0, 1])
    tracker.update(ids, torch.tensor([10.0, 0.0]))
    second = tracker.update(ids, torch.tensor([12.0, 0.0]))  # count 2 < 3: batch stats
    torch.testing.assert_close(second, torch.tensor([1.0, -1.0]), rtol=0, atol=1e-5)
    assert tracker.fallback_mask(ids).tolist() == [True, True]
    third = tracker.update(ids, torch.tensor([14.0, 0.0]))  # count 3: own stats
    # Prompt 0: buffer [10, 12, 14], mean 12, std sqrt(8/3); prompt 1: all zero, std 0.
    torch.testing.assert_close(third, torch.tensor([2 / (math.sqrt(8 / 3) + 1e-6), 0.0]))
    assert tracker.fallback_mask(ids).tolist() == [False, False]


def test_every_prompt_at_once_and_one_sample_each():
    tracker = BufferStatTracker(num_prompts=100, buffer_size=4, min_count=1, dtype=torch.float64)
    reference = ReferenceBufferStatTracker(4, 1)
    generator = torch.Generator().manual_seed(1)
    for _ in range(6):
        ids = torch.randperm(100, generator=generator)
        _assert_matches_reference(tracker, reference, ids, torch.randn(100, generator=generator, dtype=torch.float64))


def test_integer_rewards_are_converted_not_truncated():
    tracker = BufferStatTracker(num_prompts=1, buffer_size=4, min_count=1)
    advantages = tracker.update(torch.tensor([0, 0]), torch.tensor([1, 2]))
    assert advantages.dtype == torch.float32
    torch.testing.assert_close(advantages, torch.tensor([-1.0, 1.0]), rtol=0, atol=1e-5)
    assert tracker.stats().mean.item() == 1.5


def test_buffer_smaller_than_min_count_warns():
    with pytest.warns(UserWarning, match="buffer_size 4 < min_count 8"):
        BufferStatTracker(num_prompts=2, buffer_size=4, min_count=8)


@pytest.mark.parametrize("kwargs", [dict(buffer_size=0), dict(min_count=0), dict(buffer_size=2.5)])
def test_bad_constructor_arguments(kwargs):
    with pytest.raises(ValueError):
        BufferStatTracker(num_prompts=4, **kwargs)


def test_reference_accepts_any_hashable_prompt():
    reference = ReferenceBufferStatTracker(buffer_size=2, min_count=1)
    assert reference.update(["x", "y"], [1.0, 2.0]) == [0.0, 0.0]
    assert set(reference.stats()) == {"x", "y"}
    with pytest.raises(ValueError, match="2 prompts and 1 rewards"):
        reference.update(["x", "y"], [1.0])


def test_float64_keeps_tiny_spreads_far_from_zero():
    # float32 cannot resolve a mean finer than ~1e-5 at -200 (see the docstring);
    # float64 state can, and that is the documented remedy.
    generator = torch.Generator().manual_seed(0)
    tracker = BufferStatTracker(4, 8, 4, dtype=torch.float64)
    reference = ReferenceBufferStatTracker(8, 4)
    for _ in range(20):
        ids = torch.randint(4, (32,), generator=generator)
        rewards = -200.0 + 1e-4 * torch.randn(32, generator=generator, dtype=torch.float64)
        _assert_matches_reference(tracker, reference, ids, rewards, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("num_prompts", [500, 5000])
def test_large_batches_match_the_reference(num_prompts):
    # Batches from LINEAR_GROUPING_MIN_SAMPLES on find their groups from
    # per-prompt counts (P <= N) or with linear scans (P > N).
    generator = torch.Generator().manual_seed(7)
    tracker = BufferStatTracker(num_prompts, 8, 3, dtype=torch.float64)
    reference = ReferenceBufferStatTracker(8, 3)
    for _ in range(4):
        ids = torch.randint(num_prompts, (3000,), generator=generator)
        _assert_matches_reference(tracker, reference, ids, torch.randn(3000, generator=generator, dtype=torch.float64))


def test_loaded_state_resumes_writing_at_head():
    # A full buffer's state is (count == K, head): the next reward must
    # overwrite the slot at head, the oldest one.
    tracker = BufferStatTracker(num_prompts=1, buffer_size=3, min_count=1, dtype=torch.float64)
    state = {
        "rewards": torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.float64),
        "count": torch.tensor([3]),
        "head": torch.tensor([1]),
    }
    tracker.load_state_dict(state)
    tracker.update(torch.tensor([0]), torch.tensor([7.0], dtype=torch.float64))
    after = tracker.state_dict()
    assert after["rewards"].tolist() == [[1.0, 7.0, 3.0]]
    assert after["count"].tolist() == [3] and after["head"].tolist() == [2]


def test_loaded_state_ignores_values_past_count():
    # A hand-made state may hold anything in the slots past count; they are
    # not rewards and must not reach the statistics.
    tracker = BufferStatTracker(num_prompts=2, buffer_size=4, min_count=1, dtype=torch.float64)
    rewards = torch.tensor([[1.0, 3.0, 99.0, -7.0], [5.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    tracker.load_state_dict({"rewards": rewards, "count": torch.tensor([2, 1]), "head": torch.tensor([2, 1])})
    stats = tracker.stats()
    assert stats.mean.tolist() == [2.0, 5.0]
    torch.testing.assert_close(stats.std, torch.tensor([1.0, 0.0], dtype=torch.float64))  # a norm: not exact
    assert tracker.state_dict()["rewards"].tolist() == [[1.0, 3.0, 0.0, 0.0], [5.0, 0.0, 0.0, 0.0]]
    tracker.update(torch.tensor([0]), torch.tensor([5.0], dtype=torch.float64))
    assert tracker.stats().mean[0].item() == 3.0


def test_float16_buffer_sums_rows_in_float32():
    # R2 1/5 repro 2: the row sum 80032 overflows float16; the answer fits.
    tracker = BufferStatTracker(1, buffer_size=2, min_count=1, dtype=torch.float16)
    advantages = tracker.update(torch.tensor([0, 0]), torch.tensor([40000.0, 40032.0]))
    assert advantages.dtype == torch.float16 and advantages.tolist() == [-1.0, 1.0]
    # K = 128 overflowed from rewards of about 600 on.
    tracker = BufferStatTracker(1, buffer_size=128, min_count=2, dtype=torch.float16)
    rewards = torch.cat([torch.full((64,), 600.0), torch.full((64,), 602.0)])
    torch.testing.assert_close(
        tracker.update(torch.zeros(128, dtype=torch.int64), rewards),
        torch.cat([-torch.ones(64), torch.ones(64)]).half(),
    )
    stats = tracker.stats()
    assert stats.mean.tolist() == [601.0] and stats.std.tolist() == [1.0]


@pytest.mark.parametrize("grouping", ["search", "counts", "scans"])
def test_no_buffer_slot_is_written_twice_in_one_update(monkeypatch, grouping):
    # Which of two writes to one slot wins is undefined on CUDA: rewards pushed
    # out within their own batch must go to the scratch slot, never to a slot
    # that a later reward of the batch also writes. Batches of 1 and 3 samples
    # take the path for more rows (P + 1 = 4) than samples, the others the
    # path for fewer.
    import rail_interview.stat_tracking.memory as memory_module
    from rail_interview.stat_tracking import ops

    tracker = BufferStatTracker(num_prompts=3, buffer_size=4, min_count=2)
    scratch = (3 + 1) * 4  # after the slots of the 3 prompts and of the invalid-sample row
    write_at = memory_module.write_at
    slot_writes = []

    def checked_write_at(state, index, values):
        if state.data_ptr() == tracker._memory._slots.data_ptr():
            slots = index[index != scratch]
            slot_writes.append(slots.numel())
            assert slots.unique().numel() == slots.numel(), f"a slot written twice: {sorted(slots.tolist())}"
        write_at(state, index, values)

    monkeypatch.setattr(memory_module, "write_at", checked_write_at)
    generator = torch.Generator().manual_seed(0)
    with ops.forced_algorithms(grouping=grouping):
        for size in (1, 3, 9, 14, 30):
            tracker.update(torch.randint(3, (size,), generator=generator), torch.randn(size, generator=generator))
    assert len(slot_writes) == 5 and max(slot_writes) <= 3 * 4


def test_state_with_head_out_of_range_or_non_finite_rewards_is_refused():
    tracker = BufferStatTracker(num_prompts=2, buffer_size=4, min_count=2)
    tracker.update(torch.tensor([0, 1]), torch.tensor([1.0, 2.0]))
    before = tracker.state_dict()
    full = {"rewards": torch.ones(2, 4), "count": torch.tensor([4, 4]), "head": torch.tensor([0, 4])}
    with pytest.raises(ValueError, match=r"'head' must lie in \[0, 4\)"):
        tracker.load_state_dict(full)
    with pytest.raises(ValueError, match=r"'head' must lie in \[0, 4\)"):
        tracker.load_state_dict({**full, "head": torch.tensor([-1, 0])})
    rewards = torch.ones(2, 4)
    rewards[1, 2] = float("nan")
    with pytest.raises(ValueError, match="'rewards' must be finite"):
        tracker.load_state_dict({**full, "rewards": rewards, "head": torch.tensor([0, 0])})
    after = tracker.state_dict()
    assert all(torch.equal(after[name], before[name]) for name in before)


@pytest.mark.parametrize("batch_rows", ["whole", "distinct"])
def test_slot_arithmetic_in_int64_gives_what_int32_gives(monkeypatch, batch_rows):
    # Slots are computed in int32 for large batches when they fit, else in
    # int64 (ops.slot_index_dtype): int32 forced on small batches here, and
    # int64 by a buffer of "2**31 slots or more" (a lower bound), on batches
    # that take the path for fewer rows than samples and the distinct rows'.
    import rail_interview.stat_tracking.memory as memory_module
    from rail_interview.stat_tracking import ops

    generator = torch.Generator().manual_seed(0)
    batches = [
        (torch.randint(5, (size,), generator=generator), torch.randn(size, generator=generator))
        for size in (8, 20, 7, 30)
    ]
    with ops.forced_algorithms(slot_index="int32", batch_rows=batch_rows):
        narrow = BufferStatTracker(num_prompts=5, buffer_size=3, min_count=2)
        expected = [narrow.update(ids, rewards) for ids, rewards in batches]
        monkeypatch.setattr(memory_module, "MAX_INT32_SLOTS", 0)
        wide = BufferStatTracker(num_prompts=5, buffer_size=3, min_count=2)
        for (ids, rewards), advantages in zip(batches, expected):
            assert torch.equal(wide.update(ids, rewards), advantages)
    for name, tensor in narrow.state_dict().items():
        assert torch.equal(wide.state_dict()[name], tensor), name
