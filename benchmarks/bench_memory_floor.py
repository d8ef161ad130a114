"""The memory floor of P-scaling: how much of the update's extra cost at a large P the memory system alone explains.

With many prompts (P = 1,000,000: a 128 MB buffer of K = 32 float32 slots),
the rows a batch touches are scattered over memory that the caches do not
hold, so reading and writing them costs more than at P = 1,000, whatever
the code around them does. This script times that floor: the bare gather
and scatter of the touched rows (for a buffer, the [N, K] rows read and the
N slots and counters written; for an EMA, its three [N] reads and writes),
nothing else, at both sizes; and the tracker's update (``presets.ddpo``,
``presets.ema``, value checks off) at the same sizes on the same batches.
It reports the update's extra cost at the large P against the floor's
extra cost: 1.0 means the update pays for the larger P no more than the
memory system makes it.

Two floors. The bare floor's calls run back to back, so the rows of its 16
batches (about 1 MB) stay in the caches from call to call. In training the
update's own temporaries push them out between updates, so the second
floor, "between updates", runs the same reads and writes each right after
an update of another tracker at the small P (which cancels from the extra
cost): the memory system's price in the cache state an update leaves.

Each timed call takes the next of 16 batches drawn beforehand (groups of 8
samples of N / 8 prompts drawn uniformly from P), so that, as in training,
each call touches rows the previous one did not. Times are this thread's
CPU time (one torch thread); each round times a memory's six calls (the
floor, the floor between updates and the update, at both sizes) together,
their blocks taking turns (``timing.time_interleaved``), so that a busy
phase falls on all of them. The extra costs and their ratios are taken per
round; the table has their medians over rounds::

    python benchmarks/bench_memory_floor.py --out=benchmarks/results   # memory_floor_cpu.{json,md}, about a minute
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
from typing import Callable, Dict, List, Tuple

import torch
from absl import app, flags

from rail_interview.stat_tracking import presets

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import describe_machine, median_nan_last, time_interleaved, write_report  # noqa: E402  pylint: disable=wrong-import-position

FLAGS = flags.FLAGS

#: Batch size, buffer slots, the two sizes of P, and batches cycled through.
NUM_SAMPLES, BUFFER_SIZE, SMALL, LARGE, NUM_BATCHES = 4096, 32, 1_000, 1_000_000, 16


def batches(num_samples: int, num_prompts: int, count: int) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """``count`` batches of (ids int64 [N], rewards float32 [N]): groups of 8, prompts uniform over [0, P)."""
    generator = torch.Generator().manual_seed(0)
    drawn = []
    for _ in range(count):
        prompts = torch.randint(num_prompts, (num_samples // 8,), generator=generator)
        ids = prompts.repeat_interleave(8)[torch.randperm(num_samples, generator=generator)]
        drawn.append((ids, torch.rand(num_samples, generator=generator)))
    return drawn


def cycling(calls: List[Callable[[], object]]) -> Callable[[], object]:
    """One call that runs the next of ``calls`` each time."""
    position = [0]

    def call() -> object:
        """Runs the next call, and returns what it returns."""
        position[0] = (position[0] + 1) % len(calls)
        return calls[position[0]]()

    return call


def buffer_floor(num_prompts: int, drawn) -> Callable[[], object]:
    """The bare reads and writes of a ring buffer's touched rows: [N, K] rows and counters read, N slots written."""
    buffer = torch.zeros(num_prompts + 1, BUFFER_SIZE)
    seen = torch.zeros(num_prompts + 1, dtype=torch.int64)
    flat = buffer.view(-1)

    def touch(ids: torch.Tensor, rewards: torch.Tensor) -> object:
        """Reads the batch's rows and counters, writes its slots and counters; returns the rows read."""
        counts = seen.index_select(0, ids)  # [N]
        rows = buffer.index_select(0, ids)  # [N, K]
        flat.scatter_(0, ids * BUFFER_SIZE + counts % BUFFER_SIZE, rewards)
        seen.scatter_(0, ids, counts + 1)
        return rows

    return cycling([lambda ids=ids, rewards=rewards: touch(ids, rewards) for ids, rewards in drawn])


def ema_floor(num_prompts: int, drawn) -> Callable[[], object]:
    """The bare reads and writes of an EMA's touched entries: mean, variance and count, N of each."""
    state = [torch.zeros(num_prompts + 1), torch.zeros(num_prompts + 1), torch.zeros(num_prompts + 1)]

    def touch(ids: torch.Tensor, rewards: torch.Tensor) -> object:
        """Reads the batch's entries of the three state tensors and writes them back changed; returns what it read."""
        read = [tensor.index_select(0, ids) for tensor in state]
        for tensor, values in zip(state, read):
            tensor.scatter_(0, ids, values + rewards)
        return read

    return cycling([lambda ids=ids, rewards=rewards: touch(ids, rewards) for ids, rewards in drawn])


def update(memory: str, num_prompts: int, drawn) -> Callable[[], object]:
    """The tracker's update (``presets.ddpo`` or ``presets.ema``, checks off) on the same batches."""
    build = presets.ddpo if memory == "buffer" else presets.ema
    tracker = build(num_prompts, check_values=False)
    return cycling([lambda ids=ids, rewards=rewards: tracker.update(ids, rewards) for ids, rewards in drawn])


FLOORS = {"buffer": buffer_floor, "ema": ema_floor}

#: The kinds of call ``memory_calls`` builds, in order.
KINDS = ("floor", "floor_between", "update")


def between_updates(floor: Callable[[], object], other: Callable[[], object]) -> Callable[[], object]:
    """The floor's call after another tracker's update: the bare reads and writes in an update's cache state.

    Timed back to back, the floor's calls keep the rows of its 16 batches in
    the caches; between two updates, the update's own temporaries have
    pushed them out. ``other`` is the same update at the small P, a tracker
    of its own, the same call at both sizes, so it cancels from the extra
    cost.
    """

    def call() -> object:
        """Runs ``other``, then the floor; returns what the floor returns."""
        other()
        return floor()

    return call


def memory_calls(memory: str, drawn: Dict[int, list]) -> Dict[Tuple[str, int], Callable[[], object]]:
    """The floor's and the update's calls of one memory at each size of P.

    Args:
        memory: ``"buffer"`` or ``"ema"``.
        drawn: P -> its batches, as ``batches`` draws them.

    Returns:
        ``(kind, P)`` -> a call that cycles through P's batches, for kind
        ``"floor"`` (the bare reads and writes), ``"floor_between"`` (the
        same after an update of a tracker at the smallest P on its own
        batches, ``between_updates``) and ``"update"`` (the tracker's update,
        checks off), in that order.
    """
    smallest = min(drawn)
    other = update(memory, smallest, drawn[smallest])  # a tracker of its own, so its state is apart
    calls: Dict[Tuple[str, int], Callable[[], object]] = {}
    for kind in KINDS:
        for size, size_batches in drawn.items():
            if kind == "update":
                calls[kind, size] = update(memory, size, size_batches)
            else:
                floor = FLOORS[memory](size, size_batches)
                calls[kind, size] = floor if kind == "floor" else between_updates(floor, other)
    return calls


def measure(rounds: int, min_run_time: float) -> List[Dict[str, float]]:
    """Per memory: floor and update ms at both sizes, medians over ``rounds``, and the extra-cost ratio."""
    torch.set_num_threads(1)
    drawn = {size: batches(NUM_SAMPLES, size, NUM_BATCHES) for size in (SMALL, LARGE)}
    rows = []
    for memory in FLOORS:
        calls = memory_calls(memory, drawn)
        times: Dict[Tuple[str, int], List[float]] = {key: [] for key in calls}
        for _ in range(rounds):  # the six calls in turns, block by block: a busy phase falls on all
            for key, seconds in zip(calls, time_interleaved(list(calls.values()), min_run_time)):
                times[key].append(seconds * 1e3)
        extra = {kind: [big - small for big, small in zip(times[kind, LARGE], times[kind, SMALL])] for kind in KINDS}
        ratios = {
            floor: [u / f if f > 0 else float("nan") for u, f in zip(extra["update"], extra[floor])]
            for floor in ("floor", "floor_between")
        }
        ms = {key: statistics.median(values) for key, values in times.items()}
        rows.append(
            dict(
                memory=memory,
                floor_small_ms=ms["floor", SMALL],
                floor_large_ms=ms["floor", LARGE],
                update_small_ms=ms["update", SMALL],
                update_large_ms=ms["update", LARGE],
                floor_extra_ms=statistics.median(extra["floor"]),
                floor_between_extra_ms=statistics.median(extra["floor_between"]),
                update_extra_ms=statistics.median(extra["update"]),
                extra_ratio=median_nan_last(ratios["floor"]),
                extra_ratio_between=median_nan_last(ratios["floor_between"]),
            )
        )
    return rows


def markdown(rows: List[Dict[str, float]], command: str, machine: Dict[str, object]) -> str:
    """The table of ``rows``, with the command and the machine."""
    where = f"{machine.get('platform')}, torch {machine.get('torch')}, 1 thread, CPU time"
    lines = [
        "# The memory floor of P-scaling",
        "",
        f"{where}. Command: `{command}`. N = {NUM_SAMPLES:,}, K = {BUFFER_SIZE}, P = {SMALL:,} and {LARGE:,}.",
        "",
        "| memory | floor ms, small P | floor ms, large P | update ms, small P | update ms, large P "
        "| floor's extra ms | floor's extra between updates, ms | update's extra ms | update's extra / floor's "
        "| update's extra / floor's between updates |",
        "| :--- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['memory']} | {r['floor_small_ms']:.3f} | {r['floor_large_ms']:.3f} | {r['update_small_ms']:.3f} "
            f"| {r['update_large_ms']:.3f} | {r['floor_extra_ms']:.3f} | {r['floor_between_extra_ms']:.3f} "
            f"| {r['update_extra_ms']:.3f} | {r['extra_ratio']:.2f} | {r['extra_ratio_between']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: List[str]) -> int:
    """Measures, prints and writes the table; returns 0."""
    del argv
    rows = measure(FLAGS.rounds, FLAGS.min_run_time)
    command = "python benchmarks/bench_memory_floor.py" + (f" --out={FLAGS.out}" if FLAGS.out else "")
    if FLAGS.rounds != 5 or FLAGS.min_run_time != 0.2:
        command += f" --rounds={FLAGS.rounds} --min_run_time={FLAGS.min_run_time}"
    machine = describe_machine(torch.device("cpu"), 1)
    text = markdown(rows, command, machine)
    print(text)
    out = FLAGS.out or tempfile.mkdtemp(prefix="memory_floor_")
    write_report(os.path.join(out, "memory_floor_cpu"), dict(command=command, machine=machine, rows=rows), text)
    return 0


def _define_flags() -> None:
    """The script's flags, defined when it runs (so that tests can import the module more than once)."""
    flags.DEFINE_string("out", None, "Directory for memory_floor_cpu.{json,md} (default: a fresh temporary one).")
    flags.DEFINE_integer("rounds", 5, "Rounds over every call; the median over rounds is reported.")
    flags.DEFINE_float("min_run_time", 0.2, "CPU seconds of timed calls per call and round, at least.")


if __name__ == "__main__":
    _define_flags()
    app.run(main)
