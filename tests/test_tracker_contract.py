"""The contract every per-prompt tracker keeps: bad input, state, sync-free update.

Each test runs over every tracker in ``TRACKERS``, so a new tracker gets the
whole contract checked by adding one line.
"""

import inspect
import warnings
from typing import Callable, Dict

import pytest
import torch
from algorithm_choices import ALGORITHM_CHOICES

from rail_interview.stat_tracking import (
    AdvantageTracker,
    BatchStatTracker,
    BufferStatTracker,
    EmaStatTracker,
    StatTracker,
    memory,
    ops,
    presets,
)
from rail_interview.stat_tracking.buffer import masked_row_mean_std

TrackerFactory = Callable[..., StatTracker]

#: The trackers with per-prompt state.
TRACKERS: Dict[str, TrackerFactory] = {
    "buffer": lambda **kw: BufferStatTracker(num_prompts=6, buffer_size=4, min_count=2, **kw),
    "ema": lambda **kw: EmaStatTracker(num_prompts=6, decay=0.7, min_count=2, **kw),
    # The GRPO family with memory: leave-one-out over an EMA, GRPO over a buffer.
    "rloo_ema": lambda **kw: presets.verl_rloo(6, memory="ema", decay=0.6, fallback="batch", **kw),
    "grpo_buffer": lambda **kw: presets.verl_grpo(
        6, memory="buffer", buffer_size=4, min_count=3, fallback="zero", **kw
    ),
}
#: Every tracker, the stateless ones included (the batch baseline, in-batch GRPO).
ALL_TRACKERS: Dict[str, TrackerFactory] = {
    **TRACKERS,
    "batch": lambda **kw: BatchStatTracker(num_prompts=6, **kw),
    "grpo": lambda **kw: presets.verl_grpo(6, **kw),
    "flow_grpo": lambda **kw: presets.flow_grpo(6, **kw),
}


def cuda_only(test: Callable) -> Callable:
    """Marks a CUDA test (``pytest -m cuda`` selects them; tests/test_cuda.py has more), skipped without CUDA."""
    return pytest.mark.cuda(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")(test))


@pytest.fixture(params=sorted(TRACKERS))
def make_tracker(request) -> TrackerFactory:
    return TRACKERS[request.param]


@pytest.fixture(params=sorted(ALL_TRACKERS))
def make_any_tracker(request) -> TrackerFactory:
    return ALL_TRACKERS[request.param]


def _random_batches(num_batches: int, num_prompts: int = 6, device: str = "cpu", seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    for _ in range(num_batches):
        size = int(torch.randint(1, 20, (1,), generator=generator))
        ids = torch.randint(num_prompts, (size,), generator=generator)
        rewards = torch.randn(size, generator=generator) * 10 - 50
        yield ids.to(device), rewards.to(device)


def _assert_state_equal(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name


def _warmed_up(make_tracker: TrackerFactory) -> StatTracker:
    tracker = make_tracker()
    for ids, rewards in _random_batches(5):
        tracker.update(ids, rewards)
    return tracker


BAD_INPUTS = [
    ("not tensors", lambda: ([0, 1], [1.0, 2.0]), TypeError, "must be torch tensors"),
    ("lengths differ", lambda: (torch.tensor([0, 1]), torch.tensor([1.0])), ValueError, "one length"),
    ("not 1-D", lambda: (torch.tensor([[0, 1]]), torch.tensor([[1.0, 2.0]])), ValueError, "1-D"),
    ("float ids", lambda: (torch.tensor([0.0, 1.0]), torch.tensor([1.0, 2.0])), TypeError, "integer"),
    ("bool rewards", lambda: (torch.tensor([0, 1]), torch.tensor([True, False])), TypeError, "floating or integer"),
    ("id too large", lambda: (torch.tensor([0, 6]), torch.tensor([1.0, 2.0])), ValueError, r"\[0, 6\)"),
    ("negative id", lambda: (torch.tensor([-1, 0]), torch.tensor([1.0, 2.0])), ValueError, r"\[0, 6\)"),
    ("nan reward", lambda: (torch.tensor([0, 1]), torch.tensor([1.0, float("nan")])), ValueError, "finite"),
    ("inf reward", lambda: (torch.tensor([0, 1]), torch.tensor([float("-inf"), 1.0])), ValueError, "finite"),
    (
        "other device",
        lambda: (torch.tensor([0, 1], device="meta"), torch.tensor([1.0, 2.0], device="meta")),
        ValueError,
        "device",
    ),
    (
        "ids on another device",
        lambda: (torch.tensor([0, 1], device="meta"), torch.tensor([1.0, 2.0])),
        ValueError,
        "device",
    ),
    (
        "rewards on another device",
        lambda: (torch.tensor([0, 1]), torch.tensor([1.0, 2.0], device="meta")),
        ValueError,
        "device",
    ),
    ("bool ids", lambda: (torch.tensor([True, False]), torch.tensor([1.0, 2.0])), TypeError, "integer"),
    ("complex ids", lambda: (torch.tensor([0j, 1j]), torch.tensor([1.0, 2.0])), TypeError, "integer"),
    (
        "one nan among many",
        lambda: (torch.tensor([0, 1, 2]), torch.tensor([1.0, float("nan"), 3.0])),
        ValueError,
        "got 1 NaN or infinite",
    ),
    (
        "overflows float32",
        lambda: (torch.tensor([0, 1]), torch.tensor([1e39, 1.0], dtype=torch.float64)),
        ValueError,
        "finite in torch.float32",
    ),
    ("inf and -inf", lambda: (torch.tensor([0, 1]), torch.tensor([float("inf"), float("-inf")])), ValueError, "finite"),
]

# Checks that cost no host sync, and so stay on with check_values=False.
ALWAYS_CHECKED = [
    case
    for case in BAD_INPUTS
    if case[0]
    in (
        "not tensors",
        "lengths differ",
        "not 1-D",
        "float ids",
        "bool rewards",
        "other device",
        "ids on another device",
        "rewards on another device",
        "bool ids",
        "complex ids",
    )
]


@pytest.mark.parametrize("name, inputs, error, match", BAD_INPUTS, ids=[case[0] for case in BAD_INPUTS])
def test_bad_input_raises_and_leaves_state_untouched(make_tracker, name, inputs, error, match):
    tracker = _warmed_up(make_tracker)
    before = tracker.state_dict()
    with pytest.raises(error, match=match):
        tracker.update(*inputs())
    _assert_state_equal(tracker.state_dict(), before)


@pytest.mark.parametrize("name, inputs, error, match", ALWAYS_CHECKED, ids=[case[0] for case in ALWAYS_CHECKED])
def test_shape_dtype_and_device_checks_stay_on_without_value_checks(make_tracker, name, inputs, error, match):
    tracker = make_tracker(check_values=False)
    before = tracker.state_dict()
    with pytest.raises(error, match=match):
        tracker.update(*inputs())
    _assert_state_equal(tracker.state_dict(), before)


def test_empty_batch_returns_empty_and_changes_nothing(make_tracker):
    tracker = _warmed_up(make_tracker)
    before = tracker.state_dict()
    advantages = tracker.update(torch.tensor([], dtype=torch.int64), torch.tensor([], dtype=torch.float64))
    assert advantages.shape == (0,) and advantages.dtype == tracker.dtype
    _assert_state_equal(tracker.state_dict(), before)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.uint8, torch.uint16, torch.uint32])
def test_any_integer_id_dtype_is_accepted(make_tracker, dtype):
    a, b = make_tracker(), make_tracker()
    for ids, rewards in _random_batches(5):
        torch.testing.assert_close(a.update(ids.to(dtype), rewards), b.update(ids, rewards))


def test_finite_rewards_whose_sum_overflows_are_accepted(make_tracker):
    # The value check sums the rewards first; an overflowing sum of finite
    # rewards must fall through to the exact check, not be refused. Every
    # prompt falls back to the batch, whose rewards are all equal: advantage 0.
    tracker = make_tracker()
    advantages = tracker.update(torch.tensor([0, 1, 2]), torch.tensor([3e38, 3e38, 3e38]))
    assert advantages.tolist() == [0.0, 0.0, 0.0]
    assert tracker.stats().count.tolist() == [1, 1, 1, 0, 0, 0]


def test_rewards_that_require_grad_do_not_pull_the_state_into_autograd(make_tracker):
    tracker = make_tracker()
    for ids, rewards in _random_batches(3):
        advantages = tracker.update(ids, rewards.requires_grad_())
        assert not advantages.requires_grad
    assert not any(t.requires_grad for t in tracker.state_dict().values())


def test_state_dict_mid_stream_continues_identically(make_tracker):
    tracker = _warmed_up(make_tracker)
    state = tracker.state_dict()
    resumed = make_tracker()
    resumed.load_state_dict(state)
    for ids, rewards in _random_batches(10, seed=1):
        assert torch.equal(tracker.update(ids, rewards), resumed.update(ids, rewards))
    _assert_state_equal(tracker.state_dict(), resumed.state_dict())


def test_state_dict_is_a_copy(make_tracker):
    tracker = _warmed_up(make_tracker)
    state = tracker.state_dict()
    snapshot = {name: tensor.clone() for name, tensor in state.items()}
    for ids, rewards in _random_batches(3, seed=2):
        tracker.update(ids, rewards)
    _assert_state_equal(state, snapshot)


def test_stats_are_copies_of_the_right_shapes(make_tracker):
    tracker = _warmed_up(make_tracker)
    stats = tracker.stats()
    assert stats.mean.shape == stats.std.shape == stats.count.shape == stats.fallback.shape == (6,)
    assert stats.count.dtype == torch.int64 and stats.fallback.dtype == torch.bool
    stats.count.fill_(-5)
    assert (tracker.stats().count >= 0).all()


def test_stats_of_some_prompts_match_stats_of_all(make_tracker):
    tracker = _warmed_up(make_tracker)
    everything = tracker.stats()
    some = torch.tensor([4, 0, 4])
    subset = tracker.stats(some)
    for field, full in zip(subset, everything):
        torch.testing.assert_close(field, full[some], equal_nan=True)


def _wrong_states(state: Dict[str, torch.Tensor]):
    name = sorted(state)[0]
    yield "missing key", {k: v for k, v in state.items() if k != name}, ValueError, "expects keys"
    yield "extra key", {**state, "other": torch.zeros(1)}, ValueError, "expects keys"
    yield "wrong shape", {**state, name: torch.cat([state[name], state[name]])}, ValueError, "shape"
    yield "wrong dtype", {**state, name: state[name].to(torch.float16)}, ValueError, "dtype"
    yield "not a tensor", {**state, name: state[name].tolist()}, TypeError, "tensor"
    yield "not a mapping", list(state.values()), TypeError, "mapping"
    yield "negative count", {**state, "count": state["count"] - 100}, ValueError, "count"


def test_wrong_state_is_refused_and_changes_nothing(make_tracker):
    tracker = _warmed_up(make_tracker)
    before = tracker.state_dict()
    for label, state, error, match in _wrong_states(tracker.state_dict()):
        with pytest.raises(error, match=match):
            tracker.load_state_dict(state)
        _assert_state_equal(tracker.state_dict(), before)


def test_state_of_another_size_is_refused():
    tracker = BufferStatTracker(num_prompts=6, buffer_size=4, min_count=2)
    with pytest.raises(ValueError, match="shape"):
        tracker.load_state_dict(BufferStatTracker(num_prompts=6, buffer_size=5, min_count=2).state_dict())


def test_inconsistent_buffer_pointers_are_refused():
    tracker = BufferStatTracker(num_prompts=2, buffer_size=4, min_count=2)
    state = tracker.state_dict()
    state["count"] = torch.tensor([2, 0])
    state["head"] = torch.tensor([3, 0])  # a buffer that is not full must have head == count
    with pytest.raises(ValueError, match="head == count"):
        tracker.load_state_dict(state)
    state["count"] = torch.tensor([5, 0])
    with pytest.raises(ValueError, match="count"):
        tracker.load_state_dict(state)


@pytest.mark.parametrize("algorithms", ALGORITHM_CHOICES, ids=lambda c: "-".join(c.values()))
def test_compiles_fullgraph_without_data_dependent_python(make_any_tracker, algorithms):
    # Traced, the trackers write their state with index_put_ instead of
    # scatter_ (ops.write_at): this runs that branch on a CPU.
    torch._dynamo.reset()
    with ops.forced_algorithms(**algorithms):
        eager = make_any_tracker(check_values=False)
        compiled_tracker = make_any_tracker(check_values=False)
        compiled_update = torch.compile(compiled_tracker.update, fullgraph=True, backend="eager", dynamic=True)
        for ids, rewards in _random_batches(6, seed=3):
            torch.testing.assert_close(compiled_update(ids, rewards), eager.update(ids, rewards))
    _assert_state_equal(compiled_tracker.state_dict(), eager.state_dict())


def test_fullgraph_compilation_catches_a_host_sync():
    # What makes the test above a proof: data-dependent Python (.item(),
    # bool(tensor), an if on a value) cannot be traced into one graph. An
    # explicit device copy such as .cpu() is not caught on a CPU; the CUDA
    # sync-debug test catches it.
    def branch_on_a_value(x: torch.Tensor) -> torch.Tensor:
        return x + 1 if x.min().item() >= 0 else x - 1

    compiled = torch.compile(branch_on_a_value, fullgraph=True, backend="eager")
    with pytest.raises(Exception, match="data-dependent|item|Data-dependent"):
        compiled(torch.tensor([1, 2]))


def test_compiling_with_value_checks_on_names_the_fix(make_any_tracker):
    torch._dynamo.reset()
    tracker = make_any_tracker(check_values=True)
    compiled = torch.compile(tracker.update, fullgraph=True, backend="eager")
    with pytest.raises(Exception) as caught:
        compiled(torch.tensor([0, 1]), torch.tensor([1.0, 2.0]))
    assert "cannot be compiled with check_values=True" in f"{caught.value} {caught.value.__cause__}"
    assert "check_values=False" in f"{caught.value} {caught.value.__cause__}"


BAD_IDS = [
    ("a list", lambda: [0, 1], TypeError, "must be a torch tensor"),
    ("float ids", lambda: torch.tensor([0.0]), TypeError, "integer"),
    ("2-D", lambda: torch.tensor([[0, 1]]), ValueError, "1-D"),
    ("negative id", lambda: torch.tensor([-1]), ValueError, r"\[0, 6\)"),
    ("id too large", lambda: torch.tensor([0, 6]), ValueError, r"\[0, 6\)"),
    ("other device", lambda: torch.tensor([0], device="meta"), ValueError, "device"),
    ("bool ids", lambda: torch.tensor([True]), TypeError, "integer"),
    ("complex ids", lambda: torch.tensor([1j]), TypeError, "integer"),
]


@pytest.mark.parametrize("method", ["stats", "fallback_mask"])
@pytest.mark.parametrize("name, ids, error, match", BAD_IDS, ids=[case[0] for case in BAD_IDS])
def test_ids_of_stats_and_fallback_mask_are_checked_alike_by_every_tracker(
    make_any_tracker, method, name, ids, error, match
):
    tracker = make_any_tracker()
    with pytest.raises(error, match=match):
        getattr(tracker, method)(ids())


def test_stats_and_fallback_mask_agree_across_trackers_on_good_ids(make_any_tracker):
    tracker = make_any_tracker()
    for ids, rewards in _random_batches(3):
        tracker.update(ids, rewards)
    some = torch.tensor([5, 0, 5], dtype=torch.int32)
    stats = tracker.stats(some)
    assert stats.count.shape == (3,) and torch.equal(tracker.fallback_mask(some), stats.fallback)


@cuda_only
def test_cuda_matches_cpu(make_any_tracker):
    cpu, cuda = make_any_tracker(), make_any_tracker(device="cuda")
    for ids, rewards in _random_batches(10, seed=4):
        torch.testing.assert_close(cuda.update(ids.cuda(), rewards.cuda()).cpu(), cpu.update(ids, rewards))


@cuda_only
def test_cuda_update_never_syncs_with_the_host(make_any_tracker):
    tracker = make_any_tracker(device="cuda", check_values=False)
    batches = list(_random_batches(6, device="cuda", seed=5))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for ids, rewards in batches:
            tracker.update(ids, rewards)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@cuda_only
def test_cuda_graph_replay_matches_eager(make_any_tracker):
    batch_size = 16
    generator = torch.Generator().manual_seed(6)
    batches = [
        (torch.randint(6, (batch_size,), generator=generator), torch.randn(batch_size, generator=generator) * 10)
        for _ in range(8)
    ]
    eager = make_any_tracker(device="cuda", check_values=False)
    graphed = make_any_tracker(device="cuda", check_values=False)
    static_ids = torch.zeros(batch_size, dtype=torch.int64, device="cuda")
    static_rewards = torch.zeros(batch_size, device="cuda")
    # Warm up on a side stream (as CUDA graph capture requires), then restore the state.
    initial = graphed.state_dict()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        graphed.update(static_ids, static_rewards)
    torch.cuda.current_stream().wait_stream(side)
    graphed.load_state_dict(initial)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = graphed.update(static_ids, static_rewards)
    graphed.load_state_dict(initial)  # capture does not run the kernels, but be explicit
    for ids, rewards in batches:
        static_ids.copy_(ids)
        static_rewards.copy_(rewards)
        graph.replay()
        torch.testing.assert_close(static_out, eager.update(ids.cuda(), rewards.cuda()))
    _assert_state_equal(graphed.state_dict(), eager.state_dict())


MIN_COUNT_TRACKERS = {
    "buffer": lambda min_count: BufferStatTracker(num_prompts=6, buffer_size=4, min_count=min_count),
    "ema": lambda min_count: EmaStatTracker(num_prompts=6, min_count=min_count),
}


@pytest.mark.parametrize("kind", sorted(MIN_COUNT_TRACKERS))
def test_min_count_below_two_warns_with_the_fix(kind):
    with pytest.warns(UserWarning, match=r"min_count=1.*Use min_count >= 2"):
        MIN_COUNT_TRACKERS[kind](1)


@pytest.mark.filterwarnings("error")
@pytest.mark.parametrize("kind", sorted(MIN_COUNT_TRACKERS))
def test_min_count_of_two_does_not_warn(kind):
    MIN_COUNT_TRACKERS[kind](2)


def test_defaults_are_the_documented_ones():
    # TRACKERS.md and the README: buffer K = 32 and min_count 16 (DDPO's),
    # EMA decay 0.7 and min_count 16, eps 1e-6 (1e-7 for the batch baseline).
    buffer, ema, batch = BufferStatTracker(1), EmaStatTracker(1), BatchStatTracker(1)
    assert (buffer.buffer_size, buffer.min_count, buffer.eps) == (32, 16, 1e-6)
    assert (ema.decay, ema.min_count, ema.eps) == (0.7, 16, 1e-6)
    assert batch.eps == 1e-7
    for tracker in (buffer, ema, batch):
        assert tracker.dtype == torch.float32 and tracker.device == torch.device("cpu") and tracker.check_values
        assert tracker.process_group is None


@pytest.mark.parametrize(
    "eps, accepted",
    [(0, True), (0.0, True), (1e-3, True), (-1e-9, False), (True, False), ("1e-6", False), (float("nan"), False)],
)
def test_eps_must_be_a_non_negative_number(make_any_tracker, eps, accepted):
    if accepted:
        assert make_any_tracker(eps=eps).eps == eps
    else:
        with pytest.raises(ValueError, match="eps must be a non-negative number"):
            make_any_tracker(eps=eps)


def test_one_sample_with_a_bad_id_is_refused(make_any_tracker):
    tracker = make_any_tracker()
    with pytest.raises(ValueError, match=r"\[0, 6\)"):
        tracker.update(torch.tensor([6]), torch.tensor([1.0]))


def test_the_min_count_warning_points_at_the_callers_line():
    with pytest.warns(UserWarning, match="min_count=1") as caught:
        call_line = inspect.currentframe().f_lineno + 1
        BufferStatTracker(num_prompts=2, buffer_size=4, min_count=1)
    assert (caught[0].filename, caught[0].lineno) == (__file__, call_line)


def test_buffer_size_is_capped_where_float32_counts_stay_exact():
    from rail_interview.stat_tracking.buffer import MAX_BUFFER_SIZE

    assert MAX_BUFFER_SIZE == 2**24  # float32 holds every integer up to 2**24
    assert BufferStatTracker(1, buffer_size=MAX_BUFFER_SIZE, min_count=2).buffer_size == MAX_BUFFER_SIZE
    with pytest.raises(ValueError, match=f"buffer_size must be at most {2**24}"):
        BufferStatTracker(1, buffer_size=MAX_BUFFER_SIZE + 1, min_count=2)


def test_a_one_rank_process_group_gives_what_no_group_gives(make_any_tracker, tmp_path):
    # The distributed update's gather, verdict and slicing, in one process;
    # two real ranks are in tests/test_distributed.py and
    # tests/test_tracker_distributed.py.
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        alone, grouped = make_any_tracker(), make_any_tracker(process_group=dist.group.WORLD)
        for ids, rewards in _random_batches(4):
            assert torch.equal(grouped.update(ids, rewards), alone.update(ids, rewards))
        empty = torch.tensor([], dtype=torch.int64), torch.tensor([])
        assert grouped.update(*empty).shape == (0,)
        _assert_state_equal(grouped.state_dict(), alone.state_dict())
        with pytest.raises(ValueError, match=r"\[0, 6\)"):
            grouped.update(torch.tensor([6]), torch.tensor([1.0]))
        _assert_state_equal(grouped.state_dict(), alone.state_dict())
    finally:
        dist.destroy_process_group()


def test_stats_of_no_prompts_are_empty(make_any_tracker):
    stats = make_any_tracker().stats(torch.tensor([], dtype=torch.int64))
    assert all(field.shape == (0,) for field in stats)


def test_count_out_of_range_names_the_range():
    tracker = BufferStatTracker(num_prompts=2, buffer_size=4, min_count=2)
    state = tracker.state_dict()
    with pytest.raises(ValueError, match=r"'count' must lie in \[0, 4\], got values from 0 to 5"):
        tracker.load_state_dict({**state, "count": torch.tensor([5, 0]), "head": torch.tensor([1, 0])})
    ema = EmaStatTracker(num_prompts=2)
    with pytest.raises(ValueError, match="'count' must lie in >= 0, got values from -1 to 0"):
        ema.load_state_dict({**ema.state_dict(), "count": torch.tensor([-1, 0])})


CPU = torch.device("cpu")
#: A batch, ddof and own_weight passed to ``Memory.fold`` by position.
FOLD_ARGS = (torch.tensor([0, 1]), torch.tensor([1.0, 2.0]), 0, False)

KEYWORD_ONLY = {
    "buffer": lambda: BufferStatTracker(6, 4, 2, 1e-6),
    "ema": lambda: EmaStatTracker(6, 0.7, 2, 1e-6),
    "batch": lambda: BatchStatTracker(6, 1e-7),
    "masked_row_mean_std": lambda: masked_row_mean_std(torch.zeros(1, 2), torch.tensor([1]), True),
    "ddpo": lambda: presets.ddpo(6, 32, 16, torch.float32),
    "trl_grpo": lambda: presets.trl_grpo(6, "group", torch.float32),
    "verl_grpo": lambda: presets.verl_grpo(6, True, torch.float32),
    "verl_rloo": lambda: presets.verl_rloo(6, torch.float32),
    "flow_grpo": lambda: presets.flow_grpo(6, True, torch.float32),
    "verl_gdpo": lambda: presets.verl_gdpo(6, 2, None),
    "nemo_rl_gdpo": lambda: presets.nemo_rl_gdpo(6, 2, None),
    "flow_factory_gdpo": lambda: presets.flow_factory_gdpo(6, 2, None),
    "verl_opo": lambda: presets.verl_opo(6, torch.float32),
    "no_memory": lambda: memory.NoMemory(3, torch.float32, CPU),
    "buffer_memory": lambda: memory.BufferMemory(3, 4, torch.float32, CPU),
    "ema_memory": lambda: memory.EmaMemory(3, 0.5, torch.float32, CPU),
    "make_memory": lambda: memory.make_memory("none", 3, 4, 0.5, torch.float32, CPU),
    "no_memory.fold": lambda: memory.NoMemory(3, dtype=torch.float32, device=CPU).fold(*FOLD_ARGS),
    "buffer_memory.fold": lambda: memory.BufferMemory(3, 4, dtype=torch.float32, device=CPU).fold(*FOLD_ARGS),
    "ema_memory.fold": lambda: memory.EmaMemory(3, 0.5, dtype=torch.float32, device=CPU).fold(*FOLD_ARGS),
}


@pytest.mark.parametrize("name", sorted(KEYWORD_ONLY))
def test_options_after_the_sizes_are_keyword_only(name):
    # Keyword-only options stop argument-order bugs (an eps taken for a min_count).
    with pytest.raises(TypeError, match="positional argument"):
        KEYWORD_ONLY[name]()


def test_the_one_tracker_class_takes_its_options_by_keyword():
    from rail_interview.stat_tracking import AdvantageTracker

    assert StatTracker is AdvantageTracker  # the old interface's name, kept for type hints
    with pytest.raises(TypeError, match="positional argument"):
        AdvantageTracker(2, "buffer", 32)


def test_a_buffer_smaller_than_min_count_warns_at_the_callers_line_and_an_equal_one_does_not():
    with pytest.warns(UserWarning, match="buffer_size 3 < min_count 4") as caught:
        call_line = inspect.currentframe().f_lineno + 1
        BufferStatTracker(num_prompts=2, buffer_size=3, min_count=4)
    assert (caught[0].filename, caught[0].lineno) == (__file__, call_line)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        BufferStatTracker(num_prompts=2, buffer_size=4, min_count=4)


@pytest.mark.parametrize(
    "valid, error, match",
    [
        (torch.tensor([1, 0, 1]), TypeError, "valid must be a bool tensor or None, got torch.int64"),
        ([True, False, True], TypeError, "valid must be a bool tensor or None, got list"),
        (torch.tensor([True, False]), ValueError, r"valid must have the shape of prompt_ids \(3,\)"),
    ],
)
def test_a_bad_valid_mask_raises_and_leaves_state_untouched(make_any_tracker, valid, error, match):
    tracker = _warmed_up(make_any_tracker)
    before = tracker.state_dict()
    with pytest.raises(error, match=match):
        tracker.update(torch.tensor([0, 1, 2]), torch.tensor([1.0, 2.0, 3.0]), valid)
    _assert_state_equal(tracker.state_dict(), before)


def test_nan_as_unscorable_still_refuses_infinite_rewards_and_accepts_nan():
    tracker = presets.trl_grpo(6, memory="ema")
    tracker.update(torch.tensor([0, 0, 1]), torch.tensor([1.0, 2.0, 3.0]))
    before = tracker.state_dict()
    with pytest.raises(ValueError, match=r"rewards must not be infinite .* got 1 infinite value"):
        tracker.update(torch.tensor([0, 1, 2]), torch.tensor([1.0, float("inf"), float("nan")]))
    _assert_state_equal(tracker.state_dict(), before)
    advantages = tracker.update(torch.tensor([2, 2]), torch.tensor([float("nan"), float("nan")]))
    assert advantages.tolist() == [0.0, 0.0]
    _assert_state_equal(tracker.state_dict(), before)  # unscorable samples enter no memory


def test_repr_shows_a_single_rewards_weight_and_order():
    # A checkpoint's "saved by X, restored into Y" check compares reprs: a weight that changes advantages must show.
    weighted = AdvantageTracker(2, reward_weights=[2.0], scale="none")
    assert "reward_weights=(2.0,)" in repr(weighted) and repr(weighted) != repr(AdvantageTracker(2, scale="none"))
    assert "aggregation='normalize_then_sum'" in repr(AdvantageTracker(2, aggregation="normalize_then_sum"))
    assert "reward_weights" not in repr(AdvantageTracker(2, reward_weights=[1.0]))
