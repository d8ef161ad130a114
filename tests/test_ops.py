"""The pure tensor functions behind the trackers, each of their algorithms forced on CPU.

Every algorithm a device or a size picks in ``rail_interview.stat_tracking.ops``
is forced here on small CPU batches and compared with a plain float64
computation, so that no path is only taken (and only tested) on a GPU or at
sizes CI never reaches.
"""

import itertools

import pytest
import torch

from rail_interview.stat_tracking import ops
from rail_interview.stat_tracking.buffer import masked_row_mean_std


def _random_ids(num_samples: int, num_prompts: int, seed: int) -> torch.Tensor:
    return torch.randint(num_prompts, (num_samples,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("algorithm", ops.ALGORITHMS["grouping"])
@pytest.mark.parametrize("num_samples, num_prompts", [(1, 1), (2, 1), (5, 3), (7, 50), (300, 40), (300, 10_000)])
def test_every_grouping_algorithm_finds_the_groups(algorithm, num_samples, num_prompts):
    ids = _random_ids(num_samples, num_prompts, seed=num_samples + num_prompts)
    with ops.forced_algorithms(grouping=algorithm):
        groups = ops.group_by_prompt(ids, num_prompts)
    assert torch.equal(groups.sorted_ids, ids[groups.order])
    assert torch.equal(groups.sorted_ids, ids.sort().values)
    assert torch.equal(groups.unsort(groups.sorted_ids), ids)
    # Batch order is kept within a group (a stable sort).
    for prompt in ids.unique():
        assert torch.equal(groups.order[groups.sorted_ids == prompt], (ids == prompt).nonzero().flatten())
    assert torch.equal(groups.start, torch.searchsorted(groups.sorted_ids, groups.sorted_ids))
    assert torch.equal(groups.end, torch.searchsorted(groups.sorted_ids, groups.sorted_ids, right=True))
    assert torch.equal(groups.position, torch.arange(num_samples))


@pytest.mark.parametrize(
    "num_samples, num_prompts, expected",
    [
        (100, 50, "search"),
        (2047, 50, "search"),
        (2048, 50, "counts"),
        (2048, 2048, "counts"),
        (2048, 2049, "runs"),
        (2048, None, "runs"),
    ],
)
def test_automatic_grouping_choice_by_size(num_samples, num_prompts, expected):
    # Forced "counts" needs num_prompts; without it, the scans stand in.
    assert ops._grouping_algorithm(num_samples, num_prompts, torch.device("cpu")) == expected
    with ops.forced_algorithms(grouping="counts"):
        assert ops._grouping_algorithm(5, None, torch.device("cpu")) == "scans"
    # Counts need integer atomics off a CPU, which deterministic mode refuses;
    # the runs read their count back, a sync off a CPU.
    assert ops._grouping_algorithm(2048, 50, torch.device("meta")) == "scans"
    assert ops._grouping_algorithm(2048, 4096, torch.device("meta")) == "scans"
    with ops.forced_algorithms(grouping="runs"):
        assert ops._grouping_algorithm(5, 10, torch.device("meta")) == "scans"


def test_runs_grouping_and_distinct_rows_give_way_where_a_size_cannot_be_read_back():
    # Under torch.compile a size read back would break the graph: the scans
    # and the per-sample rows stand in, forced or not.
    def choices(ids):
        return ops._grouping_algorithm(ids.numel(), 10_000, ids.device), ops.batch_rows_algorithm(
            ids.numel(), 10_001, ids.device
        )

    ids = torch.arange(3000)
    assert choices(ids) == ("runs", "distinct")
    with ops.forced_algorithms(grouping="runs", batch_rows="distinct"):
        seen = []

        def spy(ids):
            seen.append(choices(ids))
            return ids

        torch.compile(spy, backend="eager", fullgraph=True)(ids)
    assert seen == [("scans", "per_sample")]


@pytest.mark.parametrize(
    "num_samples, num_rows, device, expected",
    [
        (100, 100, "cpu", "whole"),
        (100, 101, "cpu", "distinct"),
        (100, 101, "meta", "per_sample"),
        (5, 3, "meta", "whole"),
    ],
)
def test_automatic_batch_rows_choice(num_samples, num_rows, device, expected):
    assert ops.batch_rows_algorithm(num_samples, num_rows, torch.device(device)) == expected


@pytest.mark.parametrize("num_samples, num_prompts", [(1, 1), (6, 2), (300, 10_000), (5000, 40)])
def test_sorted_runs_are_the_distinct_ids_with_their_sizes(num_samples, num_prompts):
    ids = _random_ids(num_samples, num_prompts, seed=num_samples)
    runs = ops.sorted_runs(ids, num_prompts, dtype=torch.int32)
    rows, size = ids.unique(return_counts=True)
    assert runs.rows.dtype == runs.sorted_ids.dtype == torch.int32
    assert torch.equal(runs.rows.long(), rows) and torch.equal(runs.size, size)
    assert torch.equal(runs.sorted_ids.long(), ids[runs.order]) and torch.equal(runs.rows[runs.run], runs.sorted_ids)
    # Batch order is kept within a run (a stable sort).
    assert torch.equal(runs.order, torch.sort(ids, stable=True).indices)


@pytest.mark.parametrize("algorithm", ops.ALGORITHMS["segment_sum"])
@pytest.mark.parametrize("num_samples", [1, 7, 300, 5000])
def test_every_segment_sum_algorithm_sums_each_group(algorithm, num_samples):
    generator = torch.Generator().manual_seed(num_samples)
    ids = torch.randint(40, (num_samples,), generator=generator)
    groups = ops.group_by_prompt(ids, 40)
    values = torch.randn(num_samples, generator=generator, dtype=torch.float64) * 50
    expected = torch.zeros(40, dtype=torch.float64).index_add_(0, ids, values)[groups.sorted_ids]
    with ops.forced_algorithms(segment_sum=algorithm):
        got = ops.segment_sum(values[groups.order], groups)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("algorithm", ops.ALGORITHMS["segment_sum"])
def test_segment_sums_do_not_take_rounding_from_other_groups(algorithm):
    # A group of 1e16-sized terms sorted before a group of 0.01-sized ones:
    # differences of one running sum would lose the small group entirely.
    ids = torch.tensor([0, 0, 1, 1])
    values = torch.tensor([1e16, 1e16, 0.01, 0.03], dtype=torch.float64)
    groups = ops.group_by_prompt(ids, 2)
    with ops.forced_algorithms(segment_sum=algorithm):
        got = ops.segment_sum(values, groups)
    assert got.tolist() == [2e16, 2e16, 0.04, 0.04]


@pytest.mark.parametrize("algorithm", ops.ALGORITHMS["segment_sum"])
def test_segment_sums_are_the_same_bit_for_bit_from_run_to_run(algorithm):
    ids = _random_ids(3000, 30, seed=1)
    groups = ops.group_by_prompt(ids, 30)
    values = torch.randn(3000, generator=torch.Generator().manual_seed(2))
    with ops.forced_algorithms(segment_sum=algorithm):
        first = ops.segment_sum(values, groups)
        assert all(torch.equal(ops.segment_sum(values, groups), first) for _ in range(3))


@pytest.mark.parametrize("num_threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.int64])
@pytest.mark.parametrize("num_samples", [1, 300, ops.SCATTER_ADD_MIN_SAMPLES, 70_000])
def test_add_at_algorithms_add_in_batch_order_bit_for_bit(num_samples, dtype, num_threads):
    # Reference: a plain loop over the batch, in batch order, in the dtype.
    generator = torch.Generator().manual_seed(num_samples)
    num_rows = max(num_samples // 50, 3)
    index = torch.randint(num_rows, (num_samples,), generator=generator)
    values = (torch.randn(num_samples, generator=generator, dtype=torch.float64) * 1e3).to(dtype)
    if num_samples <= 300:
        expected = [torch.zeros((), dtype=dtype) for _ in range(num_rows)]
        for row, value in zip(index.tolist(), values):
            expected[row] = expected[row] + value
        expected = torch.stack(expected)
    else:
        expected = torch.zeros(num_rows, dtype=dtype).index_add_(0, index, values)
    previous = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        for algorithm in ops.ALGORITHMS["add_at"]:
            with ops.forced_algorithms(add_at=algorithm):
                target = torch.zeros(num_rows, dtype=dtype)
                assert ops.add_at(target, index, values) is target
                assert torch.equal(target, expected), algorithm
    finally:
        torch.set_num_threads(previous)


def test_add_at_takes_scatter_add_for_large_float_batches_on_a_cpu_only():
    cpu, smallest = torch.device("cpu"), ops.SCATTER_ADD_MIN_SAMPLES
    assert ops.add_at_algorithm(torch.zeros(smallest - 1), cpu) == "index_add"
    assert ops.add_at_algorithm(torch.zeros(smallest), cpu) == "scatter_add"
    assert ops.add_at_algorithm(torch.zeros(smallest, dtype=torch.float64), cpu) == "scatter_add"
    assert ops.add_at_algorithm(torch.zeros(smallest, dtype=torch.int64), cpu) == "index_add"  # counts
    assert ops.add_at_algorithm(torch.zeros(smallest), torch.device("meta")) == "index_add"
    with ops.forced_algorithms(add_at="scatter_add"):
        assert ops.add_at_algorithm(torch.zeros(1, dtype=torch.int64), torch.device("meta")) == "scatter_add"


@pytest.mark.parametrize("algorithm", ops.ALGORITHMS["batch_stats"])
@pytest.mark.parametrize("num_samples", [1, 2, 5, 1023, 1024, 5000])
def test_every_batch_stats_algorithm_matches_float64(algorithm, num_samples):
    rewards = torch.randn(num_samples, generator=torch.Generator().manual_seed(num_samples)) * 3 - 1000
    with ops.forced_algorithms(batch_stats=algorithm):
        mean, std = ops.batch_mean_std(rewards)
    expected = rewards.double()
    torch.testing.assert_close(mean.double(), expected.mean(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(std.double(), expected.std(correction=0), rtol=1e-4, atol=1e-4)


def test_forced_algorithms_restores_the_previous_choice_and_refuses_unknown_names():
    with ops.forced_algorithms(grouping="scans", batch_stats="two_pass"):
        with ops.forced_algorithms(grouping="counts", batch_stats=None):
            assert ops._forced == {"grouping": "counts"}
        assert ops._forced == {"grouping": "scans", "batch_stats": "two_pass"}
    assert ops._forced == {}
    with pytest.raises(ValueError, match="unknown operation 'sorting'"):
        with ops.forced_algorithms(sorting="scans"):
            pass
    with pytest.raises(ValueError, match=r"unknown grouping algorithm 'fast'.*'search'"):
        with ops.forced_algorithms(grouping="fast"):
            pass


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_compute_dtype_is_float32_or_better(dtype):
    expected = torch.float64 if dtype == torch.float64 else torch.float32
    assert ops.compute_dtype(dtype) == expected


@pytest.mark.parametrize("dtype, buffer_size", list(itertools.product([torch.float32, torch.float64], [1, 6, 8, 300])))
@pytest.mark.parametrize("overwrite", [False, True])
def test_masked_row_mean_std_uses_the_first_count_entries(dtype, buffer_size, overwrite):
    generator = torch.Generator().manual_seed(buffer_size)
    rows = torch.randn(5, buffer_size, generator=generator, dtype=torch.float64) * 10 + 3
    count = torch.tensor([0, 1, min(2, buffer_size), buffer_size - 1, buffer_size])
    rows[torch.arange(buffer_size) >= count.unsqueeze(-1)] = 0  # as in the buffer
    given = rows.to(dtype, copy=True)
    mean, std = masked_row_mean_std(given, count, overwrite=overwrite)
    if not overwrite:
        assert torch.equal(given, rows.to(dtype))
    for row, (n, m, s) in enumerate(zip(count.tolist(), mean.double(), std.double())):
        if n == 0:
            assert m.isnan() and s.isnan()
            continue
        values = rows[row, :n]
        torch.testing.assert_close(m, values.mean(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(s, values.std(correction=0), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("algorithm", ["counts", "scans"])
def test_ids_beyond_int32_are_sorted_as_int64(algorithm):
    # The linear-time algorithms sort ids as int32 only while P allows it.
    ids = torch.tensor([2**40 + 5, 3, 2**40 + 5, 2**33, 3])
    with ops.forced_algorithms(grouping=algorithm):
        groups = ops.group_by_prompt(ids, num_prompts=2**41)  # "counts" would need [P]: scans stand in
    assert groups.sorted_ids.tolist() == [3, 3, 2**33, 2**40 + 5, 2**40 + 5]
    assert groups.order.tolist() == [1, 4, 3, 0, 2]
    assert groups.start.tolist() == [0, 0, 2, 3, 3] and groups.end.tolist() == [2, 2, 3, 5, 5]


@pytest.mark.parametrize("num_samples, expected", [(1, "one_pass"), (1023, "one_pass"), (1024, "two_pass")])
def test_automatic_batch_stats_choice_by_size(num_samples, expected):
    assert ops._batch_stats_algorithm(num_samples) == expected
    with ops.forced_algorithms(batch_stats="one_pass"):
        assert ops._batch_stats_algorithm(5000) == "one_pass"


def test_int32_sorting_and_counting_stop_at_two_to_the_31_prompts():
    assert ops.MAX_INT32_PROMPTS == 2**31  # the most ids int32 holds: [0, 2**31)
    with ops.forced_algorithms(grouping="counts"):
        assert ops._grouping_algorithm(5, 2**31, torch.device("cpu")) == "counts"
        assert ops._grouping_algorithm(5, 2**31 + 1, torch.device("cpu")) == "scans"


@pytest.mark.parametrize("num_prompts", [50, 2**41])
def test_linear_grouping_keeps_batch_order_within_groups(num_prompts):
    # Sorted as int32 or, beyond it, as int64: stably either way.
    ids = _random_ids(500, 5, seed=3) * (num_prompts // 5)
    with ops.forced_algorithms(grouping="scans"):
        groups = ops.group_by_prompt(ids, num_prompts)
    assert torch.equal(groups.order, torch.sort(ids, stable=True).indices)


@pytest.mark.parametrize("algorithm", ops.ALGORITHMS["sort"])
@pytest.mark.parametrize(
    "num_samples, num_prompts",
    [(1, 1), (300, 7), (300, 40_000), (ops.PADDED_SORT_MIN_SAMPLES, 2**15), (9000, 2**15 + 1), (40_000, 500)],
)
def test_every_sort_algorithm_sorts_stably_into_the_dtype_asked(algorithm, num_samples, num_prompts):
    generator = torch.Generator().manual_seed(num_samples)
    ids = torch.randint(num_prompts, (num_samples,), generator=generator)
    ids[-1] = num_prompts - 1  # the narrow dtype's largest value, as the pads, when P = 2**15
    expected_ids, expected_order = torch.sort(ids, stable=True)
    for dtype in (torch.int64, torch.int32):
        with ops.forced_algorithms(sort=algorithm):
            sorted_ids, order = ops.sort_ids(ids, num_prompts, dtype=dtype)
        assert sorted_ids.dtype == dtype and order.dtype == torch.int64
        assert torch.equal(sorted_ids.long(), expected_ids) and torch.equal(order, expected_order)


def test_sort_algorithm_pads_mid_sized_cpu_batches_for_the_radix_sort(monkeypatch):
    cpu, meta = torch.device("cpu"), torch.device("meta")
    smallest, radix = ops.PADDED_SORT_MIN_SAMPLES, ops.RADIX_SORT_MIN_SAMPLES
    monkeypatch.setattr(ops, "radix_sort_available", lambda: True)
    assert ops.sort_algorithm(smallest - 1, 100, cpu) == "direct"
    assert ops.sort_algorithm(smallest, 100, cpu) == ops.sort_algorithm(radix - 1, 2**31, cpu) == "padded"
    assert ops.sort_algorithm(radix, 100, cpu) == ops.sort_algorithm(10, 100, meta) == "narrow"
    assert ops.sort_algorithm(radix, None, cpu) == ops.sort_algorithm(radix, 2**31 + 1, meta) == "direct"
    with ops.forced_algorithms(sort="padded"):
        assert ops.sort_algorithm(10, 100, meta) == "padded"
        assert ops.sort_algorithm(10, None, meta) == "direct"  # no narrow dtype holds the ids
    monkeypatch.setattr(ops, "radix_sort_available", lambda: False)
    assert ops.sort_algorithm(smallest, 100, cpu) == "direct"


def test_radix_sort_available_is_a_bool():
    assert isinstance(ops.radix_sort_available(), bool)


def test_slot_index_dtype_is_int32_for_large_batches_whose_slots_fit(monkeypatch):
    smallest = ops.INT32_SLOTS_MIN_SAMPLES
    assert ops.slot_index_dtype(smallest - 1, True) == ops.slot_index_dtype(smallest, False) == torch.int64
    assert ops.slot_index_dtype(smallest, True) == torch.int32
    with monkeypatch.context() as patch:  # traced by torch.compile: int32 at any size
        patch.setattr(ops, "is_compiling", lambda: True)
        assert ops.slot_index_dtype(1, True) == torch.int32
        assert ops.slot_index_dtype(1, False) == torch.int64
    with ops.forced_algorithms(slot_index="int32"):
        assert ops.slot_index_dtype(1, True) == torch.int32
        assert ops.slot_index_dtype(1, False) == torch.int64  # it would overflow
    with ops.forced_algorithms(slot_index="int64"):
        assert ops.slot_index_dtype(smallest, True) == torch.int64
