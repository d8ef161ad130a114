"""Every headline figure of the project against its named baseline, in one table from one run.

Usage:
    python benchmarks/headline.py --out=benchmarks/results   # headline_cpu.{json,md}; about 3 minutes
    python benchmarks/headline.py --nocompile                # without the compiled row (no compiler needed)
    python benchmarks/headline.py --quick --nocompile        # tiny sizes, one short round: a smoke test, not figures

One process measures each figure the docs quote as a ratio of ours to a
named baseline, reusing the builders, baselines and agreement checks of the
benchmark that owns it (Dimensions: N samples, P prompts, K buffer slots,
G samples per group, C rewards per sample):

1. **Small batch, eager** (bench_trackers.py), N = 256, P = 64, K = 32: the
   buffer tracker (``presets.ddpo``'s semantics) and the EMA, default checks
   on, against ddpo-pytorch's dict tracker (baselines.py). Target: 10x.
2. **Small batch, compiled**, the same size: the buffer tracker with checks
   off under ``stat_tracking.CompiledUpdate`` where the package has it, else
   ``torch.compile(tracker.update, fullgraph=True, dynamic=False)`` (the
   report says which), against the same dict tracker. Target: 20x.
   ``--nocompile`` leaves this row out.
3. **Large batch**: the same trackers at (32768, 4096) and (4096, 1,000,000).
4. **Group mode** (bench_groups.py): ``presets.verl_grpo`` against
   ``index_add_grpo`` (verl's vectorised code) at (N, G) = (512, 8) and
   (32768, 16), target 2x, eager and (unless ``--nocompile``) compiled;
   ``presets.trl_grpo`` against ``python_loop_grpo`` (TRL's loop).
5. **Hashed keys** (bench_keys.py): each tracker with hashed keys against
   the same with ids, on bench_keys.py's grid. Target: at most 1.5.
6. **P-scaling over the memory floor** (bench_memory_floor.py): the
   update's extra cost from P = 1,000 to 1,000,000 over the bare gather and
   scatter's, timed back to back (the issue's floor) and each right after
   an update (the cache state an update leaves). Target: at most 1.3.
7. **SPO** (bench_spo.py) against the recipe's dict tracker at its first two
   sizes, and **C = 4 rewards** (bench_multi_reward.py) in one tracker
   against four combined by hand, buffer memory, at (4096, 1000).

Every row's agreement is checked first where its benchmark checks it. Then
the rows are timed with this thread's CPU time (one torch thread) in
``--rounds`` rounds, each taking the rows in turn; a row's calls, ours and
the baseline's, are timed together, their blocks of calls taking turns
(``timing.time_interleaved``), so that a busy machine's slow phases fall on
both sides of the ratio alike. A row's times are the medians over rounds,
and its ratio the median of the rounds' ratios. The table has, per row: the figure, ours and the baseline,
the sizes, both times, the ratio (and which way it is taken), the target
where the issue sets one, and whether it is met.
"""

from __future__ import annotations

import datetime
import os
import statistics
import subprocess
import sys
import tempfile
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

import torch
from absl import app, flags

from rail_interview import stat_tracking
from rail_interview.stat_tracking import presets

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# pylint: disable=wrong-import-position
import bench_groups  # noqa: E402
import bench_keys  # noqa: E402
import bench_memory_floor  # noqa: E402
import bench_multi_reward  # noqa: E402
import bench_spo  # noqa: E402
import bench_trackers  # noqa: E402
from revisions import PACKAGE, REPO_ROOT  # noqa: E402
from timing import describe_machine, median_nan_last, time_interleaved, write_report  # noqa: E402

from baselines import SpoDictTracker, python_loop_grpo  # noqa: E402

FLAGS = flags.FLAGS

#: The sizes of each figure: the full run's, and the smoke test's (tiny, not figures).
SIZES: Dict[str, Dict[str, object]] = {
    "full": dict(
        small=(256, 64, 32),
        large=[(32768, 4096, 32), (4096, 1_000_000, 32)],
        groups=[(512, 8), (32768, 16)],
        keys=bench_keys.GRID,
        floor=(bench_memory_floor.NUM_SAMPLES, bench_memory_floor.SMALL, bench_memory_floor.LARGE),
        spo=bench_spo.GRIDS["full"][:2],
        multi_reward=(4096, 1_000),
    ),
    "quick": dict(
        small=(64, 16, 32),
        large=[(512, 64, 32), (256, 10_000, 32)],
        groups=[(32, 4), (64, 8)],
        keys=[(64, 16, 32), (256, 10_000, 32)],
        floor=(256, 100, 10_000),
        spo=bench_spo.GRIDS["quick"],
        multi_reward=(96, 40),
    ),
}

#: Batches of bench_spo.py's and bench_multi_reward.py's agreement checks (their --steps default).
STEPS = 6

Calls = Dict[str, Callable[[], object]]


class Row(NamedTuple):
    """One headline figure: what is timed against what, and the target.

    Attributes:
        figure: the figure's name.
        ours: what of ours is timed.
        baseline: what it is timed against.
        sizes: the sizes, as printed.
        ours_calls: the names of the calls that give our time: one call's
            time, or with two the first's minus the second's (an extra cost).
        baseline_calls: the same for the baseline.
        speedup: the ratio is baseline / ours (a speed-up, the target a
            least) if True, ours / baseline (a cost, the target a most) if False.
        target: the ratio the issue asks for, or None.
        agreement: what was checked to agree before timing, or None.
        max_diff: the largest difference that check found, where it reports one.
    """

    figure: str
    ours: str
    baseline: str
    sizes: str
    ours_calls: Tuple[str, ...]
    baseline_calls: Tuple[str, ...]
    speedup: bool
    target: Optional[float]
    agreement: Optional[str]
    max_diff: Optional[float] = None


def _sizes(**sizes: int) -> str:
    """``N = 4,096, P = 1,000`` from keyword sizes."""
    return ", ".join(f"{name} = {value:,}" for name, value in sizes.items())


def compiled_update(tracker) -> Tuple[Callable[[torch.Tensor, torch.Tensor], torch.Tensor], str]:
    """The compiled fast path of ``tracker``'s update: the package's ``CompiledUpdate`` if it has one.

    Args:
        tracker: a tracker built with ``check_values=False``.

    Returns:
        The compiled update ``(ids [N], rewards [N]) -> [N]`` (it compiles on
        its first call) and what it is, as the report names it.
    """
    try:
        from rail_interview.stat_tracking import CompiledUpdate  # pylint: disable=import-outside-toplevel
    except ImportError:
        return torch.compile(tracker.update, fullgraph=True, dynamic=False), "torch.compile(update, fullgraph=True)"
    return CompiledUpdate(tracker), "CompiledUpdate"


def tracker_rows(calls: Calls, cases: List[Tuple[int, int, int]], figure: str, target: Optional[float]) -> List[Row]:
    """Figures 1 and 3: the buffer and EMA trackers, checks on, against ddpo-pytorch's dict tracker.

    Args:
        calls: the calls to time, by name; this adds its own (``ddpo N,P`` among them).
        cases: (N, P, K) sizes.
        figure: the figure's name.
        target: its target speed-up, or None.

    Returns:
        Two rows per case, buffer and EMA.

    Raises:
        AssertionError: if a tracker disagrees with the dict tracker (bench_trackers.check_agreement).
    """
    cpu, rows = torch.device("cpu"), []
    agreement = (
        "advantages against ddpo-pytorch's and the plain-Python references', 3 batches, within 1e-4 "
        "(bench_trackers.check_agreement)"
    )
    for num_samples, num_prompts, buffer_size in cases:
        bench_trackers.check_agreement(num_samples, num_prompts, buffer_size, cpu)
        ids, rewards = bench_trackers.make_batch(num_samples, num_prompts, seed=10)
        key = f"{num_samples},{num_prompts}"
        trackers = {
            "buffer": (bench_trackers.buffer_tracker(num_prompts, buffer_size, cpu), "buffer tracker (presets.ddpo)"),
            "ema": (bench_trackers.ema_tracker(num_prompts, buffer_size, cpu), "EMA tracker"),
        }
        for name, (tracker, ours) in trackers.items():
            bench_trackers.warmed(tracker, num_samples, num_prompts, cpu)
            calls[f"{name} {key}"] = lambda tracker=tracker, ids=ids, rewards=rewards: tracker.update(ids, rewards)
            rows.append(
                Row(
                    figure,
                    f"{ours}, checks on",
                    "ddpo-pytorch dict",
                    _sizes(N=num_samples, P=num_prompts, K=buffer_size),
                    (f"{name} {key}",),
                    (f"ddpo {key}",),
                    True,
                    target,
                    agreement,
                )
            )
        calls[f"ddpo {key}"] = bench_trackers.baseline_calls(ids, rewards, buffer_size)["ddpo_ms"]
    return rows


def compiled_row(calls: Calls, case: Tuple[int, int, int]) -> Tuple[Row, str]:
    """Figure 2: the buffer tracker's compiled update, checks off, against ddpo-pytorch's dict tracker.

    Args:
        calls: the calls to time, by name; this adds its own. ``tracker_rows``
            must have added the dict tracker's call of this case.
        case: (N, P, K).

    Returns:
        The row, and what compiled the update.

    Raises:
        AssertionError: if the compiled update's advantages differ from the eager update's.
    """
    num_samples, num_prompts, buffer_size = case
    cpu = torch.device("cpu")
    eager = bench_trackers.buffer_tracker(num_prompts, buffer_size, cpu, check_values=False)
    compiled, compiled_with = compiled_update(
        bench_trackers.buffer_tracker(num_prompts, buffer_size, cpu, check_values=False)
    )
    max_diff = 0.0
    # Compiles within these (CompiledUpdate on a shape's second call, torch.compile on its first) and warms up
    # as bench_trackers.warmed does.
    for seed in range(3):
        batch = bench_trackers.make_batch(num_samples, num_prompts, seed)
        got, expected = compiled(*batch), eager.update(*batch)
        torch.testing.assert_close(got, expected, msg=lambda m: f"compiled: {m}")
        max_diff = max(max_diff, (got - expected).abs().max().item())
    ids, rewards = bench_trackers.make_batch(num_samples, num_prompts, seed=10)
    key = f"{num_samples},{num_prompts}"
    calls[f"buffer compiled {key}"] = lambda: compiled(ids, rewards)
    row = Row(
        "small batch, compiled",
        f"buffer tracker, checks off, {compiled_with}",
        "ddpo-pytorch dict",
        _sizes(N=num_samples, P=num_prompts, K=buffer_size),
        (f"buffer compiled {key}",),
        (f"ddpo {key}",),
        True,
        20.0,
        "advantages against the eager update's, 3 batches (torch.testing.assert_close)",
        max_diff,
    )
    return row, compiled_with


def group_rows(calls: Calls, sizes: Dict[str, object]) -> List[Row]:
    """Figure 4: ``presets.verl_grpo`` against ``index_add_grpo`` and ``presets.trl_grpo`` against TRL's loop.

    Args:
        calls: the calls to time, by name; this adds its own.
        sizes: the run's ``SIZES`` entry.

    Returns:
        The rows.

    Raises:
        AssertionError: if a method differs from the loop by more than
            bench_groups.py's tolerance, or from itself run to run.
    """
    methods = {method.name: method for method in bench_groups.methods()}
    pairs = [
        ("presets.verl_grpo", "index_add_grpo (reads P)", "group mode, verl", 2.0),
        ("presets.trl_grpo(group)", "python_loop_grpo", "group mode, TRL", None),
    ]
    rows = []
    for num_samples, group_size in sizes["groups"]:
        diffs = {}
        for name in dict.fromkeys(name for pair in pairs for name in pair[:2]):  # in order, once each
            figures, calls[f"{name} {num_samples}"] = bench_groups.check_method(methods[name], num_samples, group_size)
            assert figures["bitwise"], f"{name}, N={num_samples}: two runs differ"
            assert figures["max_diff"] <= bench_groups.TOLERANCE, f"{name}, N={num_samples}: {figures['max_diff']}"
            diffs[name] = figures["max_diff"]
        text = _sizes(N=num_samples, G=group_size, P=num_samples // group_size)
        agreement = (
            f"both sides' advantages against python_loop_grpo's, within {bench_groups.TOLERANCE:g}, and "
            "bitwise equal run to run (bench_groups.check_method)"
        )
        for ours, baseline, figure, target in pairs:
            rows.append(
                Row(
                    figure,
                    f"{ours}, checks off",
                    baseline,
                    text,
                    (f"{ours} {num_samples}",),
                    (f"{baseline} {num_samples}",),
                    True,
                    target,
                    agreement,
                    max(diffs[ours], diffs[baseline]),
                )
            )
    return rows


def compiled_group_rows(calls: Calls, sizes: Dict[str, object]) -> List[Row]:
    """Figure 4, compiled: ``presets.verl_grpo``'s compiled update against ``index_add_grpo``.

    Checked as the eager rows are (against the loop, within bench_groups.py's
    tolerance), and bitwise equal run to run on the one torch thread the
    figures are timed with. (With more threads inductor's CPU code adds into
    the groups' rows with atomics, and sums can round differently from run
    to run unless ``torch.use_deterministic_algorithms(True)``; see
    ``CompiledUpdate``.) ``group_rows`` must have added the baseline's calls.

    Args:
        calls: the calls to time, by name; this adds its own.
        sizes: the run's ``SIZES`` entry.

    Returns:
        One row per size.

    Raises:
        AssertionError: if the compiled update differs from the loop by more
            than the tolerance, or from itself run to run.
    """
    rows = []
    for num_samples, group_size in sizes["groups"]:
        num_prompts = num_samples // group_size
        batches = [bench_groups.make_batch(num_samples, group_size, seed) for seed in range(3)]
        runs = []
        for _ in range(2):
            update, compiled_with = compiled_update(presets.verl_grpo(num_prompts, check_values=False))
            runs.append([update(*batch) for batch in batches])
        assert all(torch.equal(a, b) for run in runs[1:] for a, b in zip(runs[0], run)), "compiled runs differ"
        max_diff = (runs[0][0] - python_loop_grpo(*batches[0])).abs().max().item()
        assert max_diff <= bench_groups.TOLERANCE, f"compiled verl_grpo, N={num_samples}: {max_diff}"
        ids, rewards = batches[0]
        name = f"presets.verl_grpo compiled {num_samples}"
        calls[name] = lambda update=update, ids=ids, rewards=rewards: update(ids, rewards)
        rows.append(
            Row(
                "group mode, verl, compiled",
                f"presets.verl_grpo, checks off, {compiled_with}",
                "index_add_grpo (reads P)",
                _sizes(N=num_samples, G=group_size, P=num_prompts),
                (name,),
                (f"index_add_grpo (reads P) {num_samples}",),
                True,
                2.0,
                f"advantages against python_loop_grpo's, within {bench_groups.TOLERANCE:g}, and bitwise equal run "
                "to run (one torch thread)",
                max_diff,
            )
        )
    return rows


def key_rows(calls: Calls, sizes: Dict[str, object]) -> List[Row]:
    """Figure 5: each tracker with hashed keys against the same tracker with ids (bench_keys.py's grid).

    Args:
        calls: the calls to time, by name; this adds its own.
        sizes: the run's ``SIZES`` entry.

    Returns:
        The rows.

    Raises:
        AssertionError: if hashed keys and ids give different advantages.
    """
    rows = []
    for num_samples, num_prompts, buffer_size in sizes["keys"]:
        ids, rewards, keys = bench_keys.grid_batch(num_samples, num_prompts)
        for name in bench_keys.TRACKERS:
            key = f"{name} {num_samples},{num_prompts}"
            by_id, hashed = bench_keys.grid_calls(name, num_prompts, buffer_size, ids, rewards, keys)
            calls[f"{key} ids"], calls[f"{key} hashed"] = by_id, hashed
            rows.append(
                Row(
                    "hashed keys",
                    f"{name} tracker, hashed keys, checks on",
                    "the same, ids",
                    _sizes(N=num_samples, P=num_prompts, K=buffer_size),
                    (f"{key} hashed",),
                    (f"{key} ids",),
                    False,
                    1.5,
                    "the first update's advantages, hashed keys against ids (bench_keys.grid_calls)",
                )
            )
    return rows


def floor_rows(calls: Calls, sizes: Dict[str, object]) -> List[Row]:
    """Figure 6: the update's extra cost from a small to a large P over the memory floor's (bench_memory_floor.py).

    Args:
        calls: the calls to time, by name; this adds its own.
        sizes: the run's ``SIZES`` entry.

    Returns:
        The rows; their times are extra costs (the large P's time minus the small P's).
    """
    num_samples, small, large = sizes["floor"]
    drawn = {
        size: bench_memory_floor.batches(num_samples, size, bench_memory_floor.NUM_BATCHES) for size in (small, large)
    }
    rows = []
    for memory in bench_memory_floor.FLOORS:
        for (kind, size), call in bench_memory_floor.memory_calls(memory, drawn).items():
            calls[f"{memory} {kind} P={size}"] = call
        preset = "presets.ddpo" if memory == "buffer" else "presets.ema"
        for figure, kind, baseline in (
            ("P-scaling over the memory floor", "floor", "the bare gather and scatter's extra ms"),
            (
                "P-scaling over the floor between updates",
                "floor_between",
                "the same gather and scatter's extra ms, each after an update",
            ),
        ):
            rows.append(
                Row(
                    figure,
                    f"{memory} update's extra ms ({preset}, checks off)",
                    baseline,
                    f"N = {num_samples:,}, K = {bench_memory_floor.BUFFER_SIZE}, P = {small:,} to {large:,}",
                    (f"{memory} update P={large}", f"{memory} update P={small}"),
                    (f"{memory} {kind} P={large}", f"{memory} {kind} P={small}"),
                    False,
                    1.3,
                    None,
                )
            )
    return rows


def spo_and_multi_reward_rows(calls: Calls, sizes: Dict[str, object]) -> List[Row]:
    """Figure 7: ``presets.spo`` against the SPO recipe's dicts; one tracker of C = 4 rewards against four.

    Args:
        calls: the calls to time, by name; this adds its own.
        sizes: the run's ``SIZES`` entry.

    Returns:
        The rows.

    Raises:
        AssertionError: if a tracker disagrees with its baseline (bench_spo.py's
            and bench_multi_reward.py's checks).
    """
    cpu, rows = torch.device("cpu"), []
    for num_samples, num_prompts in sizes["spo"]:
        baseline = SpoDictTracker(num_prompts)
        trackers = bench_spo.build_trackers(num_prompts, cpu, compile_update=False)
        diffs = bench_spo.check_agreement(baseline, trackers, num_samples, num_prompts, STEPS, cpu)
        ids, rewards, divergence = bench_spo.spo_batch(num_samples, num_prompts, seed=STEPS)
        list_ids, step = ids.tolist(), trackers["spo"][1]
        key = f"{num_samples},{num_prompts}"
        calls[f"spo {key}"] = lambda step=step, batch=(ids, rewards, divergence): step(*batch)
        calls[f"spo dict {key}"] = lambda b=baseline, i=list_ids, r=rewards, d=divergence: b.update(i, r, d)
        agreement = (
            f"advantages over {STEPS} batches and alpha and beta after them, against the dicts', within "
            f"{bench_spo.TOLERANCE:g} (bench_spo.check_agreement)"
        )
        rows.append(
            Row(
                "SPO",
                "presets.spo, checks on",
                "verl SPO recipe's dicts",
                _sizes(N=num_samples, P=num_prompts, G=1),
                (f"spo {key}",),
                (f"spo dict {key}",),
                True,
                None,
                agreement,
                max(diffs["spo"].values()),
            )
        )
    num_samples, num_prompts = sizes["multi_reward"]
    variants = bench_multi_reward.build_variants(
        num_prompts, "buffer", "normalize_then_sum", cpu, check_values=True, compile_update=False
    )
    case = f"N={num_samples} P={num_prompts} buffer normalize_then_sum"
    diffs = bench_multi_reward.check_agreement(variants, num_samples, num_prompts, STEPS, cpu, case)
    ids, rewards = bench_multi_reward.multi_reward_batch(num_samples, num_prompts, seed=STEPS)
    columns = bench_multi_reward.reward_columns(rewards)
    for name in ("one", "by_hand"):
        step = variants[name][1]
        calls[f"multi reward {name}"] = lambda step=step: step(ids, rewards, columns)
    rows.append(
        Row(
            "several rewards (C = 4)",
            "one tracker of 4 rewards (presets.trl_grpo, normalize_then_sum, buffer), checks on",
            "4 single-reward trackers, combined by hand",
            _sizes(N=num_samples, P=num_prompts, C=len(bench_multi_reward.REWARD_WEIGHTS)),
            ("multi reward one",),
            ("multi reward by_hand",),
            True,
            None,
            f"advantages over {STEPS} batches and the memory's state after them, against the four trackers', "
            f"within {bench_multi_reward.TOLERANCE:g} (bench_multi_reward.check_agreement)",
            max(diffs["by_hand"].values()),
        )
    )
    return rows


def time_rows(rows: List[Row], calls: Calls, rounds: int, min_run_time: float) -> List[Dict[str, List[float]]]:
    """Times each row's calls in ``rounds`` rounds, the row's calls taking turns block by block.

    A round takes the rows in turn; each row's calls (ours and the
    baseline's) are timed together by ``timing.time_interleaved``, so that
    the machine's slow phases fall on both sides of its ratio alike. A call
    that several rows share is timed with each of them.

    Args:
        rows: the rows.
        calls: the calls, by name.
        rounds: rounds of timing.
        min_run_time: CPU seconds of timed calls per call, row and round, at least.

    Returns:
        Per row, its calls' milliseconds per call (this thread's CPU time) in each round.
    """
    times: List[Dict[str, List[float]]] = [{name: [] for name in row.ours_calls + row.baseline_calls} for row in rows]
    for round_ in range(rounds):
        for row_times in times:
            names = list(row_times)
            for name, seconds in zip(names, time_interleaved([calls[name] for name in names], min_run_time)):
                row_times[name].append(1e3 * seconds)
        print(f"  round {round_ + 1} of {rounds} done", flush=True)
    return times


def _ms(times: Dict[str, float], names: Tuple[str, ...]) -> float:
    """One call's milliseconds, or the first's minus the second's."""
    return times[names[0]] - (times[names[1]] if len(names) == 2 else 0.0)


def evaluate(rows: List[Row], times: List[Dict[str, List[float]]]) -> List[Dict[str, object]]:
    """Each row's times, ratio and verdict, from its rounds.

    Each round gives the row's two times (a call's, or an extra cost: a
    difference of two calls') and their ratio; the row reports the medians
    over rounds of the times and of the ratio (a median of paired ratios,
    which a slow round moves less than a ratio of medians).

    Args:
        rows: the rows.
        times: as ``time_rows`` returns them.

    Returns:
        One dict per row: its fields, ``ours_ms``, ``baseline_ms``,
        ``ratio``, ``ratio_of``, ``met`` (None without a target or a
        ratio: an extra cost of the baseline's at most 0 in at least half the rounds)
        and every round of its calls (``rounds_ms``) and ratio (``rounds_ratio``).
    """
    results = []
    for row, row_times in zip(rows, times):
        rounds = [
            {name: values[i] for name, values in row_times.items()} for i in range(len(next(iter(row_times.values()))))
        ]
        ours = [_ms(round_, row.ours_calls) for round_ in rounds]
        baseline = [_ms(round_, row.baseline_calls) for round_ in rounds]
        ratios = [
            (b / o if row.speedup else o / b) if (o if row.speedup else b) > 0 else float("nan")
            for o, b in zip(ours, baseline)
        ]
        ratio = median_nan_last(ratios)
        met = None
        if row.target is not None and ratio == ratio:  # not NaN
            met = ratio >= row.target if row.speedup else ratio <= row.target
        result: Dict[str, object] = dict(row._asdict())
        result.update(
            ours_ms=statistics.median(ours),
            baseline_ms=statistics.median(baseline),
            ratio=ratio,
            ratio_of="baseline / ours" if row.speedup else "ours / baseline",
            met=met,
            rounds_ms=row_times,
            rounds_ratio=ratios,
        )
        results.append(result)
    return results


def markdown(results: List[Dict[str, object]], summary: str, command: str) -> str:
    """The table of ``results``, under a title, the run's summary and the command.

    Args:
        results: as ``evaluate`` returns them.
        summary: the machine, library and timing, one paragraph.
        command: the command that made it.

    Returns:
        The Markdown.
    """
    lines = [
        "# Headline figures, one run",
        "",
        summary,
        f"Command: `{command}`",
        "",
        "| figure | ours | baseline | sizes | ours ms | baseline ms | ratio | ratio of | target | met | agree |",
        "| :--- | :--- | :--- | :--- | ---: | ---: | ---: | :--- | ---: | :---: | :--- |",
    ]
    for r in results:
        ratio = f"{r['ratio']:.1f}x" if r["speedup"] else f"{r['ratio']:.2f}"
        target = "" if r["target"] is None else (f">= {r['target']:g}x" if r["speedup"] else f"<= {r['target']:g}")
        met = ("yes" if r["met"] else "**no**") if r["met"] is not None else ("n/a" if target else "")
        agree = "not checked" if r["agreement"] is None else "yes"
        agree += f" ({r['max_diff']:.1e})" if r["max_diff"] is not None else ""
        lines.append(
            f"| {r['figure']} | {r['ours']} | {r['baseline']} | {r['sizes']} | {r['ours_ms']:.3f} "
            f"| {r['baseline_ms']:.3f} | {ratio} | {r['ratio_of']} | {target} | {met} | {agree} |"
        )
    checks = {(r["figure"], r["agreement"]): None for r in results if r["agreement"] is not None}
    lines += ["", "Checked before timing (agree: yes, with the largest difference where the check reports one):", ""]
    lines += [f"- {figure}: {agreement}." for figure, agreement in checks]
    return "\n".join(lines) + "\n"


def library_version() -> Tuple[str, bool]:
    """The HEAD commit (short) and whether the package has uncommitted changes: which code was measured."""

    def git(*args: str) -> str:
        """git's output, stripped."""
        return subprocess.run(["git", *args], cwd=REPO_ROOT, check=True, capture_output=True, text=True).stdout.strip()

    return git("rev-parse", "--short", "HEAD"), bool(git("status", "--porcelain", "--", PACKAGE))


def run(quick: bool, compile_update: bool, rounds: int, min_run_time: float) -> Tuple[List[Dict[str, object]], str]:
    """Checks and builds every row, then times them all in rounds.

    Args:
        quick: the smoke test's tiny sizes.
        compile_update: add the compiled row.
        rounds: rounds of timing.
        min_run_time: CPU seconds of timed calls per call and round, at least.

    Returns:
        The rows, as ``evaluate`` returns them, and what compiled the update
        (``"not run"`` without ``compile_update``).
    """
    torch.set_num_threads(1)
    sizes = SIZES["quick" if quick else "full"]
    calls: Calls = {}
    rows, compiled_with = tracker_rows(calls, [sizes["small"]], "small batch, eager", 10.0), "not run"
    if compile_update:
        row, compiled_with = compiled_row(calls, sizes["small"])
        rows.append(row)
    rows += tracker_rows(calls, sizes["large"], "large batch", None)
    print("trackers: agree", flush=True)
    for family, build in (
        ("groups", group_rows),
        ("keys", key_rows),
        ("memory floor", floor_rows),
        ("SPO and C = 4", spo_and_multi_reward_rows),
    ):
        rows += build(calls, sizes)
        if family == "groups" and compile_update:
            rows += compiled_group_rows(calls, sizes)
        print(f"{family}: built (and agree, where checked)", flush=True)
    print(f"Timing {len(calls)} calls for {len(rows)} rows, {rounds} round(s)", flush=True)
    return evaluate(rows, time_rows(rows, calls, rounds, min_run_time)), compiled_with


def main(argv: List[str]) -> int:
    """Runs every figure, prints the table and writes ``headline_cpu.{json,md}``; returns 0.

    Args:
        argv: leftover command-line arguments; there must be none.
    """
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    rounds = 1 if FLAGS.quick else FLAGS.rounds
    min_run_time = min(FLAGS.min_run_time, 0.01) if FLAGS.quick else FLAGS.min_run_time
    head, modified = library_version()
    print(f"{PACKAGE} of HEAD {head}{', with uncommitted changes' if modified else ''}: {stat_tracking.__file__}")
    results, compiled_with = run(FLAGS.quick, FLAGS.compile, rounds, min_run_time)
    machine = describe_machine(torch.device("cpu"), 1)
    command = " ".join(["python", os.path.relpath(sys.argv[0])] + sys.argv[1:])
    summary = (
        f"{datetime.date.today().isoformat()}, {machine['processor']}, {machine['cpu_count']} cores, "
        f"torch {machine['torch']}, 1 thread; {PACKAGE} of HEAD {head}"
        f"{' with uncommitted changes' if modified else ''}. This thread's CPU time over {rounds} round(s), "
        f"each timing every row's calls together for {min_run_time:g} s or more each, their blocks of calls "
        "taking turns; times are medians over rounds, a ratio the median of the rounds' ratios. "
        f"Compiled update: {compiled_with}."
        + (" **--quick: tiny sizes, a smoke test, not figures.**" if FLAGS.quick else "")
    )
    text = markdown(results, summary, command)
    print(text)
    report = dict(
        date=datetime.date.today().isoformat(),
        command=command,
        machine=machine,
        head=head,
        library_modified=modified,
        clock="thread_cpu",
        rounds=rounds,
        min_run_time_s=min_run_time,
        quick=FLAGS.quick,
        compiled_with=compiled_with,
        rows=results,
    )
    out = FLAGS.out or tempfile.mkdtemp(prefix="headline_")
    write_report(os.path.join(out, "headline_cpu"), report, text)
    return 0


def _define_flags() -> None:
    """The script's flags, defined when it runs (so that tests can import the module)."""
    flags.DEFINE_string("out", None, "Directory for headline_cpu.{json,md} (default: a fresh temporary one).")
    flags.DEFINE_integer("rounds", 5, "Rounds over every call; the median over rounds is reported.")
    flags.DEFINE_float("min_run_time", 0.2, "CPU seconds of timed calls per call and round, at least.")
    flags.DEFINE_bool("quick", False, "Tiny sizes, one round of at most 0.01 s per call: a smoke test, not figures.")
    flags.DEFINE_bool("compile", True, "Time the compiled update (row 2); --nocompile leaves it out.")


if __name__ == "__main__":
    _define_flags()
    app.run(main)
