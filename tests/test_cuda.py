"""What only a GPU can check: every tracker and training on CUDA (``pytest -m cuda``).

Every test here is marked ``cuda`` and skipped without a CUDA device, like
the CUDA tests of tests/test_tracker_contract.py: CUDA results equal CPU
results, ``update`` never syncs with the host, and a CUDA-graph replay equals
eager, over the contract's trackers. This file runs those same three checks
over the trackers the contract leaves out (presets and hashed keys), and
adds what the contract does not check: no host sync under each algorithm
``ops.forced_algorithms`` can force, two runs bit for bit identical,
training on CUDA, and the compiled fast path (``CompiledUpdate``): its
graph replays bit for bit equal to eager without a host sync, a new batch
size, ``load_state_dict`` after capture, compile then capture, and the
kernel launches of one eager update against one replay. ``python benchmarks/gpu_check.py`` runs every test marked
``cuda`` and the GPU benchmark, and writes a JSON report
(docs/testing.md).
"""

import math
import pathlib
from typing import Dict, List, Optional, Tuple

import pytest
import test_fast_path as fast_path_tests
import test_tracker_contract as contract
import torch

from rail_interview.stat_tracking import AdvantageTracker, BufferStatTracker, CompiledUpdate, ops, presets

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

#: The trackers the contract's CUDA tests do not build (P = 6 prompts, as there): the presets it
#: leaves out, and hashed keys in a table of 4 rows, so that keys are evicted and batches overflow.
MORE_TRACKERS: Dict[str, contract.TrackerFactory] = {
    "ddpo": lambda **kw: presets.ddpo(6, buffer_size=4, min_count=2, **kw),
    "trl_grpo": lambda **kw: presets.trl_grpo(6, **kw),
    "verl_rloo": lambda **kw: presets.verl_rloo(6, **kw),
    "hashed_buffer": lambda **kw: BufferStatTracker(num_prompts=4, buffer_size=4, min_count=2, keys="hashed", **kw),
    "hashed_grpo": lambda **kw: presets.trl_grpo(4, memory="ema", keys="hashed", **kw),
}
#: Every tracker: the classic classes, each preset and hashed keys.
EVERY_TRACKER: Dict[str, contract.TrackerFactory] = {**contract.ALL_TRACKERS, **MORE_TRACKERS}

#: The contract's CUDA checks, each taking a tracker factory.
CONTRACT_CHECKS = {
    "matches_cpu": contract.test_cuda_matches_cpu,
    "never_syncs": contract.test_cuda_update_never_syncs_with_the_host,
    "graph_replay_matches_eager": contract.test_cuda_graph_replay_matches_eager,
}

#: Each algorithm ops can force, one at a time; key_table="dynamic" reads counts back to the host by
#: design (the CPU default, never chosen on CUDA), so it is not held to being sync-free.
FORCED_ALGORITHMS: List[Dict[str, str]] = [
    {operation: algorithm}
    for operation, algorithms in ops.ALGORITHMS.items()
    for algorithm in algorithms
    if (operation, algorithm) != ("key_table", "dynamic")
]

#: Training runs: (problem, stat_tracking.method or None for the config's own); the distance
#: problem runs its default config, the pass/fail problem its own config (GRPO over a buffer).
TRAINING_RUNS: List[Tuple[str, Optional[str]]] = [
    ("distance", "batch"),
    ("distance", "buffer"),
    ("distance", "ema"),
    ("pass_fail", None),
]


def bad_final_reward(problem: str) -> float:
    """The final reward below which a full-length run of ``problem`` stalled or diverged."""
    from rail_interview import problems  # pylint: disable=import-outside-toplevel

    return problems.bad_final_reward(problem)


@pytest.mark.parametrize("check", sorted(CONTRACT_CHECKS))
@pytest.mark.parametrize("name", sorted(MORE_TRACKERS))
def test_the_contracts_cuda_checks_hold_for_presets_and_hashed_keys(name, check):
    CONTRACT_CHECKS[check](MORE_TRACKERS[name])


@pytest.mark.parametrize("choice", FORCED_ALGORITHMS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("name", sorted(EVERY_TRACKER))
def test_update_never_syncs_under_each_forced_algorithm(name, choice):
    with ops.forced_algorithms(**choice):
        contract.test_cuda_update_never_syncs_with_the_host(EVERY_TRACKER[name])


@pytest.mark.parametrize("num_samples", [16, 4096])
@pytest.mark.parametrize("name", sorted(EVERY_TRACKER))
def test_two_runs_are_identical_bit_for_bit(name, num_samples):
    generator = torch.Generator().manual_seed(2)
    batches = [
        (torch.randint(6, (num_samples,), generator=generator), torch.randn(num_samples, generator=generator) * 10)
        for _ in range(6)
    ]
    runs = []
    for _ in range(2):
        tracker = EVERY_TRACKER[name](device="cuda", check_values=False)
        advantages = [tracker.update(ids.cuda(), rewards.cuda()) for ids, rewards in batches]
        runs.append((advantages, tracker.state_dict()))
    (first, first_state), (second, second_state) = runs
    for step, (a, b) in enumerate(zip(first, second)):
        assert torch.equal(a, b), f"advantages of batch {step} differ"
    contract._assert_state_equal(first_state, second_state)  # pylint: disable=protected-access


def _run_outputs(run_dir: pathlib.Path) -> Dict[str, bytes]:
    """metrics.csv and every stats log file of a run, by path within the run."""
    return {
        path.relative_to(run_dir).as_posix(): path.read_bytes()
        for path in sorted(run_dir.rglob("*"))
        if path.is_file() and (path.name == "metrics.csv" or path.relative_to(run_dir).parts[0] == "stats")
    }


@pytest.mark.parametrize("problem, method", TRAINING_RUNS, ids=[f"{p}-{m or 'config'}" for p, m in TRAINING_RUNS])
def test_training_on_cuda_is_reproducible_and_learns(problem, method, tmp_path):
    from rail_interview import training  # pylint: disable=import-outside-toplevel
    from rail_interview.configs import default, pass_fail  # pylint: disable=import-outside-toplevel

    summaries, outputs = [], []
    for run in range(2):
        config = (pass_fail if problem == "pass_fail" else default).get_config()
        config.device = "cuda"
        if method is not None:
            config.stat_tracking.method = method
        summary = training.train(config, str(tmp_path / str(run)))
        summaries.append(summary)
        outputs.append(_run_outputs(pathlib.Path(summary["run_dir"])))
    assert summaries[0]["device"].startswith("cuda")
    assert "metrics.csv" in outputs[0] and outputs[0] == outputs[1], "two runs with one seed differ"
    if method != "batch":  # the batch baseline has no floor: it is the run the others must beat
        assert summaries[0]["final_reward"] > bad_final_reward(problem)


#: Trackers of pass/fail rewards (the Beta memory refuses others): SPO, a baseline from the past,
#: batch normalisation, streaks and hashed keys in a table of 4 rows. P = 6.
PASS_RATE_TRACKERS: Dict[str, contract.TrackerFactory] = {
    "spo": lambda **kw: presets.spo(6, **kw),
    "spo_repeats_all": lambda **kw: presets.spo(6, repeats="all", **kw),
    "grpo_beta_past_streaks": lambda **kw: presets.verl_grpo(
        6, memory="beta", decay=0.9, include_batch=False, min_count=2, track_streaks=True, **kw
    ),
    "rloo_buffer_past_normalized": lambda **kw: presets.verl_rloo(
        6, memory="buffer", buffer_size=4, include_batch=False, normalize="batch", **kw
    ),
    "hashed_spo": lambda **kw: presets.spo(4, keys="hashed", **kw),
}


def _pass_fail_batches(num_batches: int, batch_size: Optional[int] = None, seed: int = 0):
    """(ids, rewards in {0, 1} and fractions, per-sample discounts in [0.875, 0.96]) on the CPU."""
    generator = torch.Generator().manual_seed(seed)
    for _ in range(num_batches):
        size = batch_size or int(torch.randint(2, 20, (1,), generator=generator))
        ids = torch.randint(6, (size,), generator=generator)
        rewards = (torch.rand(size, generator=generator) < 0.4).float()
        rewards[0] = torch.rand(1, generator=generator).item()  # a fractional score
        discount = 0.875 + 0.085 * torch.rand(size, generator=generator)
        yield ids, rewards, discount


@pytest.mark.parametrize("name", sorted(PASS_RATE_TRACKERS))
def test_pass_rate_memory_on_cuda_matches_cpu_and_never_syncs(name):
    make = PASS_RATE_TRACKERS[name]
    cpu, cuda = make(), make(device="cuda", check_values=False)
    discounted = cpu.memory == "beta"
    batches = list(_pass_fail_batches(10, seed=1))
    torch.cuda.synchronize()
    for ids, rewards, discount in batches:
        extra = {"discount": discount} if discounted else {}
        expected = cpu.update(ids, rewards, **extra)
        extra_cuda = {"discount": discount.cuda()} if discounted else {}
        ids_cuda, rewards_cuda = ids.cuda(), rewards.cuda()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            got = cuda.update(ids_cuda, rewards_cuda, **extra_cuda)
            query = cuda.query(ids_cuda)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.testing.assert_close(got.cpu(), expected)
        reference = cpu.query(ids)
        torch.testing.assert_close(query.pass_rate.cpu(), reference.pass_rate, equal_nan=True)
    for key, value in cpu.state_dict().items():
        torch.testing.assert_close(cuda.state_dict()[key].cpu(), value)


def _assert_graph_replay_matches_eager(make, batches, reward_shape: tuple, extra: Optional[tuple]) -> None:
    """Captures ``update`` in a CUDA graph, replays it over ``batches`` and checks it against an eager tracker.

    The capture follows a warm-up on a side stream, after which the state is
    put back (``load_state_dict`` copies in place, so the capture stays
    valid); each replay's advantages, then the final states, must equal the
    eager tracker's.

    Args:
        make: builds a tracker from ``device`` and ``check_values``.
        batches: (ids [B], rewards [B, *reward_shape], extra values [B]) on the CPU.
        reward_shape: () for one reward, (C,) for several.
        extra: (keyword, fill value) of a per-sample input ``update`` takes
            besides ids and rewards (a discount, weights), or None.
    """
    batches = list(batches)
    batch_size = len(batches[0][0])
    eager, graphed = make(device="cuda", check_values=False), make(device="cuda", check_values=False)
    static_ids = torch.zeros(batch_size, dtype=torch.int64, device="cuda")
    static_rewards = torch.zeros(batch_size, *reward_shape, device="cuda")
    static_extra = {} if extra is None else {extra[0]: torch.full((batch_size,), extra[1], device="cuda")}
    initial = graphed.state_dict()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        graphed.update(static_ids, static_rewards, **static_extra)
    torch.cuda.current_stream().wait_stream(side)
    graphed.load_state_dict(initial)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = graphed.update(static_ids, static_rewards, **static_extra)
    graphed.load_state_dict(initial)
    for ids, rewards, values in batches:
        static_ids.copy_(ids)
        static_rewards.copy_(rewards)
        for tensor in static_extra.values():
            tensor.copy_(values)
        graph.replay()
        eager_extra = {name: values.cuda() for name in static_extra}
        torch.testing.assert_close(static_out, eager.update(ids.cuda(), rewards.cuda(), **eager_extra))
    for key, value in eager.state_dict().items():
        assert torch.equal(graphed.state_dict()[key], value), key


@pytest.mark.parametrize("name", sorted(PASS_RATE_TRACKERS))
def test_pass_rate_memory_graph_replay_matches_eager(name):
    make = PASS_RATE_TRACKERS[name]
    extra = ("discount", 0.9) if make(device="cpu", check_values=False).memory == "beta" else None
    _assert_graph_replay_matches_eager(make, _pass_fail_batches(8, 16, seed=2), (), extra)


#: C = 3 reward functions' weights for the trackers of several rewards.
MULTI_REWARD_WEIGHTS = (1.0, 0.5, 2.0)
#: Trackers of C = 3 rewards per sample, NaN where a function returned nothing, P = 6: both
#: aggregation orders over a buffer; sample weights in the prompts' statistics and the whitening
#: (OPO's and verl's token-weighted whitening) and verl's GDPO over a buffer, both taking weights;
#: hashed keys in a table of 4 rows, so that keys (and their C memory rows) are evicted.
MULTI_REWARD_TRACKERS: Dict[str, contract.TrackerFactory] = {
    "sum_then_normalize_buffer": lambda **kw: AdvantageTracker(
        6,
        "buffer",
        buffer_size=4,
        num_rewards=3,
        reward_weights=MULTI_REWARD_WEIGHTS,
        aggregation="sum_then_normalize",
        nan_rewards="invalid",
        **kw,
    ),
    "normalize_then_sum_buffer": lambda **kw: AdvantageTracker(
        6,
        "buffer",
        buffer_size=4,
        num_rewards=3,
        reward_weights=MULTI_REWARD_WEIGHTS,
        aggregation="normalize_then_sum",
        nan_rewards="invalid",
        normalize="batch",
        **kw,
    ),
    "sum_then_normalize_weighted": lambda **kw: AdvantageTracker(
        6,
        num_rewards=3,
        reward_weights=MULTI_REWARD_WEIGHTS,
        nan_rewards="invalid",
        weighted_stats=True,
        normalize="batch",
        weighted_normalize=True,
        **kw,
    ),
    "verl_gdpo_buffer": lambda **kw: presets.verl_gdpo(
        6,
        num_rewards=3,
        reward_weights=MULTI_REWARD_WEIGHTS,
        memory="buffer",
        buffer_size=4,
        nan_rewards="invalid",
        **kw,
    ),
    "hashed_trl_normalize_then_sum": lambda **kw: presets.trl_grpo(
        4,
        multi_objective_aggregation="normalize_then_sum",
        reward_weights=MULTI_REWARD_WEIGHTS,
        memory="buffer",
        buffer_size=4,
        keys="hashed",
        **kw,
    ),
}


def _several_reward_batches(num_batches: int, batch_size: Optional[int] = None, seed: int = 0):
    """(ids [n] in [0, 6), rewards [n, 3] with NaNs, weights [n]: token counts) on the CPU.

    The first reward is pass/fail (zero-variance groups), the others on two
    scales; about one reward in seven is NaN, and the first sample's are all
    NaN (an unscorable sample).
    """
    generator = torch.Generator().manual_seed(seed)
    for _ in range(num_batches):
        size = batch_size or int(torch.randint(2, 20, (1,), generator=generator))
        ids = torch.randint(6, (size,), generator=generator)
        rewards = torch.randn(size, 3, generator=generator) * torch.tensor([1.0, 5.0, 0.1])
        rewards[:, 0] = (rewards[:, 0] > 0).float()
        rewards[torch.rand(size, 3, generator=generator) < 0.15] = math.nan
        rewards[0] = math.nan
        weights = torch.randint(1, 50, (size,), generator=generator).float()
        yield ids, rewards, weights


def _takes_weights(tracker) -> bool:
    """Whether ``tracker.update`` needs ``weights``."""
    return tracker.weighted_stats or tracker.weighted_normalize


@pytest.mark.parametrize("name", sorted(MULTI_REWARD_TRACKERS))
def test_several_rewards_on_cuda_match_cpu_and_never_sync(name):
    make = MULTI_REWARD_TRACKERS[name]
    cpu, cuda = make(), make(device="cuda", check_values=False)
    weighted = _takes_weights(cpu)
    torch.cuda.synchronize()
    for step, (ids, rewards, weights) in enumerate(_several_reward_batches(10, seed=1)):
        method = "update_with_report" if step % 2 else "update"  # both, in turn
        extra = {"weights": weights} if weighted else {}
        expected = getattr(cpu, method)(ids, rewards, **extra)
        ids_cuda, rewards_cuda = ids.cuda(), rewards.cuda()
        extra_cuda = {"weights": weights.cuda()} if weighted else {}
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            got = getattr(cuda, method)(ids_cuda, rewards_cuda, **extra_cuda)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        if method == "update":
            torch.testing.assert_close(got.cpu(), expected)
            continue
        assert got.channel_zero_variance_fraction is not None
        for field, value in expected._asdict().items():
            torch.testing.assert_close(getattr(got, field).cpu(), value, msg=lambda m, f=field: f"{f}: {m}")
    for key, value in cpu.state_dict().items():
        torch.testing.assert_close(cuda.state_dict()[key].cpu(), value)


@pytest.mark.parametrize("name", sorted(MULTI_REWARD_TRACKERS))
def test_several_rewards_graph_replay_matches_eager(name):
    make = MULTI_REWARD_TRACKERS[name]
    extra = ("weights", 1.0) if _takes_weights(make(device="cpu", check_values=False)) else None
    _assert_graph_replay_matches_eager(make, _several_reward_batches(8, 16, seed=2), (3,), extra)


def test_prompt_sampler_draws_as_on_the_cpu_without_a_sync_and_in_a_cuda_graph():
    from rail_interview.stat_tracking import PromptSampler  # pylint: disable=import-outside-toplevel

    cpu_tracker = presets.spo(6)
    cuda_tracker = presets.spo(6, device="cuda", check_values=False)
    cpu_sampler = PromptSampler(torch.arange(6), "spo", seed=3)
    cuda_sampler = PromptSampler(torch.arange(6, device="cuda"), "spo", seed=3, check_values=False)
    for ids, rewards, _ in _pass_fail_batches(5, seed=4):
        cpu_tracker.update(ids, rewards)
        cuda_tracker.update(ids.cuda(), rewards.cuda())
        expected = cpu_sampler.draw(cpu_tracker, 3)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            got = cuda_sampler.draw(cuda_tracker, 3)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert torch.equal(got.cpu(), expected)
    # The whole step, draw then update, captured in one graph and replayed: the draws go on.
    graph_sampler = PromptSampler(torch.arange(6, device="cuda"), "spo", seed=5, check_values=False)
    eager_sampler = PromptSampler(torch.arange(6, device="cuda"), "spo", seed=5, check_values=False)
    graphed, eager = (
        presets.spo(6, device="cuda", check_values=False),
        presets.spo(6, device="cuda", check_values=False),
    )
    static_rewards = torch.zeros(3, device="cuda")
    sampler_state, tracker_state = graph_sampler.state_dict(), graphed.state_dict()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        graphed.update(graph_sampler.draw(graphed, 3), static_rewards)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_ids = graph_sampler.draw(graphed, 3)
        static_out = graphed.update(static_ids, static_rewards)
    graph_sampler.load_state_dict(sampler_state)
    graphed.load_state_dict(tracker_state)
    for _, rewards, _ in _pass_fail_batches(6, 3, seed=6):
        static_rewards.copy_(rewards)
        graph.replay()
        ids = eager_sampler.draw(eager, 3)
        assert torch.equal(static_ids, ids)
        torch.testing.assert_close(static_out, eager.update(ids, rewards.cuda()))


# -- The compiled fast path: CompiledUpdate's CUDA graphs ------------------------------------------------------------

#: Trackers of the fast path's CUDA tests, P = 6, with the kind of batch each takes: a buffer, an EMA,
#: TRL's GRPO (NaN as unscorable), SPO (a discount per sample), hashed keys in a table of 4 rows (keys
#: evicted), and verl's GDPO (C = 3 rewards with NaNs, sample weights).
FAST_PATH_TRACKERS: Dict[str, Tuple[contract.TrackerFactory, str]] = {
    "buffer": (lambda **kw: BufferStatTracker(6, buffer_size=4, min_count=2, **kw), "plain"),
    "ema": (lambda **kw: presets.ema(6, decay=0.8, min_count=2, **kw), "plain"),
    "trl_grpo": (lambda **kw: presets.trl_grpo(6, **kw), "plain"),
    "spo": (lambda **kw: presets.spo(6, **kw), "pass_fail"),
    "hashed_buffer": (MORE_TRACKERS["hashed_buffer"], "plain"),
    "verl_gdpo_buffer": (MULTI_REWARD_TRACKERS["verl_gdpo_buffer"], "several"),
}


def _fast_path_batches(kind: str, num_batches: int, batch_size: int, seed: int) -> List[Tuple]:
    """(ids [n], rewards [n] or [n, 3], keyword inputs) on CUDA, for a tracker of ``FAST_PATH_TRACKERS``."""
    if kind == "pass_fail":
        batches = [(i, r, {"discount": d}) for i, r, d in _pass_fail_batches(num_batches, batch_size, seed)]
    elif kind == "several":
        batches = [(i, r, {"weights": w}) for i, r, w in _several_reward_batches(num_batches, batch_size, seed)]
    else:
        generator = torch.Generator().manual_seed(seed)
        batches = [
            (
                torch.randint(6, (batch_size,), generator=generator),
                (torch.randn(batch_size, generator=generator) * 10).round() / 2,
                {},
            )
            for _ in range(num_batches)
        ]
    return [(i.cuda(), r.cuda(), {k: v.cuda() for k, v in extra.items()}) for i, r, extra in batches]


def _without_a_sync(call):
    """``call()`` under ``torch.cuda.set_sync_debug_mode("error")``: any host sync raises."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        return call()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("name", sorted(FAST_PATH_TRACKERS))
def test_compiled_update_graph_replay_equals_eager_bit_for_bit_without_a_sync(name):
    make, kind = FAST_PATH_TRACKERS[name]
    fast, eager = CompiledUpdate(make(device="cuda", check_values=False)), make(device="cuda", check_values=False)
    assert fast.mode == "cuda_graph"
    for step, (ids, rewards, extra) in enumerate(_fast_path_batches(kind, 8, 16, seed=3)):
        report = step % 2 == 1  # update and update_with_report in turn: two signatures, each captured once
        call = fast.update_with_report if report else fast
        want = (eager.update_with_report if report else eager.update)(ids, rewards, **extra)
        # Steps 0 and 1 capture (a capture syncs); from step 2 on every call is a replay.
        got = call(ids, rewards, **extra) if step < 2 else _without_a_sync(lambda: call(ids, rewards, **extra))
        fast_path_tests._assert_same_bits(got, want, f"{name} step {step}")  # pylint: disable=protected-access
    fast_path_tests._assert_same_state(fast.tracker, eager, name)  # pylint: disable=protected-access
    assert len(fast.shapes) == 2


@pytest.mark.parametrize("name", ["buffer", "hashed_buffer", "spo", "ema"])
def test_compiled_update_captures_a_new_batch_size_and_honours_load_state_dict(name, monkeypatch):
    # Small decay-power tables: the EMA's grow at the larger size, after the smaller one's capture,
    # whose graph must keep reading the old table (kept alive, ops.DecayPowers).
    monkeypatch.setattr(ops.DecayPowers, "MIN_ENTRIES", 8)
    monkeypatch.setattr(ops.DecayPowers, "CHUNK", 4)
    make, kind = FAST_PATH_TRACKERS[name]
    fast, eager = CompiledUpdate(make(device="cuda", check_values=False)), make(device="cuda", check_values=False)
    fresh = make(device="cuda", check_values=False).state_dict()
    small, large = _fast_path_batches(kind, 6, 16, seed=4), _fast_path_batches(kind, 6, 40, seed=5)
    batches = [small[0], small[1], large[0], large[1], small[2], large[2], small[3], large[3], small[4], large[4]]
    midway = None
    for step, (ids, rewards, extra) in enumerate(batches):
        if step == 4:
            midway = eager.state_dict()
        if step in (6, 8):  # back to a checkpoint, then a reset: copied into the captured state in place
            state = midway if step == 6 else fresh
            fast.tracker.load_state_dict(state)
            eager.load_state_dict(state)
        want = eager.update(ids, rewards, **extra)
        captured = step in (0, 2)  # each size's first call captures
        got = fast(ids, rewards, **extra) if captured else _without_a_sync(lambda: fast(ids, rewards, **extra))
        fast_path_tests._assert_same_bits(got, want, f"{name} step {step}")  # pylint: disable=protected-access
        fast_path_tests._assert_same_state(fast.tracker, eager, f"{name} step {step}")  # pylint: disable=protected-access
    assert len(fast.shapes) == 2


def test_compiled_update_without_copies_returns_the_graphs_static_outputs():
    make, kind = FAST_PATH_TRACKERS["buffer"]
    fast = CompiledUpdate(make(device="cuda", check_values=False), copy_outputs=False)
    eager = make(device="cuda", check_values=False)
    outputs = []
    for step, (ids, rewards, extra) in enumerate(_fast_path_batches(kind, 4, 16, seed=6)):
        outputs.append(fast(ids, rewards, **extra))
        want = eager.update(ids, rewards, **extra)
        assert torch.equal(outputs[-1], want), f"step {step}"
    assert outputs[1] is outputs[2] is outputs[3] and outputs[0] is not outputs[1]  # step 0 ran on a side stream


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_update_compiled_then_captured_matches_eager(backend):
    """``"compile+cuda_graph"``: aot_eager runs eager's kernels (bit for bit); inductor's differ by rounding."""
    make, kind = FAST_PATH_TRACKERS["buffer"]
    tracker = make(device="cuda", check_values=False)
    fast, eager = (
        CompiledUpdate(tracker, mode="compile+cuda_graph", backend=backend),
        make(device="cuda", check_values=False),
    )
    for step, (ids, rewards, extra) in enumerate(_fast_path_batches(kind, 6, 16, seed=7)):
        want = eager.update(ids, rewards, **extra)
        # Step 0 runs eagerly, step 1 compiles and captures; replays from step 2.
        got = fast(ids, rewards, **extra) if step < 2 else _without_a_sync(lambda: fast(ids, rewards, **extra))
        if backend == "aot_eager":
            fast_path_tests._assert_same_bits(got, want, f"step {step}")  # pylint: disable=protected-access
        else:
            torch.testing.assert_close(got, want)
    for key, value in eager.state_dict().items():
        torch.testing.assert_close(tracker.state_dict()[key], value)


def _launches(call) -> Dict[str, float]:
    """What one call launches, from torch.profiler: kernel launches, graph launches, copies, GPU events."""
    from torch.autograd import DeviceType  # pylint: disable=import-outside-toplevel
    from torch.profiler import ProfilerActivity, profile  # pylint: disable=import-outside-toplevel

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as profiler:
        call()
        torch.cuda.synchronize()
    events = profiler.events()
    names = [event.name for event in events]
    return {
        "kernel_launches": sum(n.startswith(("cudaLaunchKernel", "cuLaunchKernel")) for n in names),
        "graph_launches": sum(n in ("cudaGraphLaunch", "cuGraphLaunch") for n in names),
        "memcpy_calls": sum(n.startswith(("cudaMemcpy", "cuMemcpy")) for n in names),
        "gpu_events": sum(event.device_type == DeviceType.CUDA for event in events),
    }


def _milliseconds(call, repeats: int = 200) -> float:
    """The mean time of ``call()`` on the GPU's clock, over ``repeats`` calls after 10 more."""
    for _ in range(10):
        call()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        call()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def test_a_replay_is_one_graph_launch_against_the_eager_updates_kernel_launches(record_property):
    """At the benchmark's small size (N = 256, P = 64, K = 32): launches and times of eager and replay.

    The figures go to the test's properties, which benchmarks/gpu_check.py
    writes into its report.
    """
    make = lambda: BufferStatTracker(64, buffer_size=32, min_count=16, device="cuda", check_values=False)  # noqa: E731
    eager, fast = make(), CompiledUpdate(make())
    generator = torch.Generator().manual_seed(8)
    ids, rewards = torch.randint(64, (256,), generator=generator).cuda(), torch.randn(256, generator=generator).cuda()
    for _ in range(3):
        eager.update(ids, rewards)
        fast(ids, rewards)
    eager_launches, replay_launches = (
        _launches(lambda: eager.update(ids, rewards)),
        _launches(lambda: fast(ids, rewards)),
    )
    figures = {f"eager_{k}": v for k, v in eager_launches.items()}
    figures.update({f"replay_{k}": v for k, v in replay_launches.items()})
    figures["eager_ms"] = round(_milliseconds(lambda: eager.update(ids, rewards)), 4)
    figures["replay_ms"] = round(_milliseconds(lambda: fast(ids, rewards)), 4)
    for name, value in figures.items():
        record_property(name, value)
    print(f"fast path launches and times at N = 256, P = 64, K = 32: {figures}")
    assert replay_launches["graph_launches"] == 1, figures
    assert eager_launches["kernel_launches"] > replay_launches["kernel_launches"], figures
