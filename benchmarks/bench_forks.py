"""Times a tracker's update with each side of one of ``ops.py``'s algorithm forks: what a fork buys, paired.

Every fork of ``ops.py`` (``ops.ALGORITHMS``) chooses between algorithms
with the same results by size and device, and must show its measured gain
(R3 5/5). This script measures it on whole updates, where the gain has to
show: for each case (a preset at a batch size), it builds one tracker per
algorithm of the fork, checks that their advantages agree bit for bit on
the batches timed, then times the updates together, their blocks taking
turns (``timing.time_interleaved``, one torch thread, CPU time), for a
number of rounds. Each row is a case: the median ms per update with each
algorithm, and each one's ratio to the first algorithm's (as
``ops.ALGORITHMS`` lists them) taken per round, both medians over rounds::

    python benchmarks/bench_forks.py --fork=add_at --cases=verl_grpo:32768:2048:16,ddpo:32768:4096:8

Batches are groups of G samples of N / G prompts drawn from P (``--cases``
entries ``preset:N:P:G``); each timed call takes the next of 8 batches.
"""

from __future__ import annotations

import os
import statistics
import sys
from typing import Callable, Dict, List, Tuple

import torch
from absl import app, flags

from rail_interview.stat_tracking import ops, presets

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import median_nan_last, time_interleaved  # noqa: E402  pylint: disable=wrong-import-position

FLAGS = flags.FLAGS

#: Batches each case cycles through.
NUM_BATCHES = 8

#: A case: preset name, N, P, G.
Case = Tuple[str, int, int, int]


def parse_cases(text: str) -> List[Case]:
    """``"preset:N:P:G,..."`` as cases.

    Raises:
        ValueError: an entry is not four fields, or N is not a multiple of G, or N / G > P.
    """
    cases = []
    for entry in text.split(","):
        fields = entry.split(":")
        if len(fields) != 4:
            raise ValueError(f"a case is preset:N:P:G, got {entry!r}")
        name, num_samples, num_prompts, group_size = fields[0], *map(int, fields[1:])
        if num_samples % group_size or num_samples // group_size > num_prompts:
            raise ValueError(f"{entry!r}: N must be a multiple of G, with N / G prompts at most P")
        cases.append((name, num_samples, num_prompts, group_size))
    return cases


def batches(case: Case) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """``NUM_BATCHES`` batches of (int64 [N] ids, float32 [N] rewards): N / G distinct prompts of P, G samples each."""
    _, num_samples, num_prompts, group_size = case
    generator = torch.Generator().manual_seed(0)
    drawn = []
    for _ in range(NUM_BATCHES):
        prompts = torch.randperm(num_prompts, generator=generator)[: num_samples // group_size]
        ids = prompts.repeat_interleave(group_size)[torch.randperm(num_samples, generator=generator)]
        drawn.append((ids, torch.randn(num_samples, generator=generator)))
    return drawn


def updates(fork: str, case: Case) -> Dict[str, Callable[[], object]]:
    """One update call per algorithm of ``fork``, each on a tracker of its own, checked to agree bit for bit.

    Raises:
        AssertionError: two algorithms' advantages differ on a batch.
    """
    drawn = batches(case)
    trackers = {algorithm: presets.get(case[0], case[2], check_values=False) for algorithm in ops.ALGORITHMS[fork]}
    for ids, rewards in drawn:  # the first pass over the batches checks, and warms up
        results = {}
        for algorithm, tracker in trackers.items():
            with ops.forced_algorithms(**{fork: algorithm}):
                results[algorithm] = tracker.update(ids, rewards)
        first = next(iter(results.values()))
        assert all(torch.equal(first, other) for other in results.values()), f"{fork}: the algorithms differ on {case}"

    def call(algorithm: str) -> Callable[[], object]:
        """The timed call of ``algorithm``: its tracker's update of the next batch, the fork forced."""
        tracker, turn = trackers[algorithm], [0]

        def run() -> object:
            """One update of the next batch."""
            ids, rewards = drawn[turn[0] % NUM_BATCHES]
            turn[0] += 1
            with ops.forced_algorithms(**{fork: algorithm}):
                return tracker.update(ids, rewards)

        return run

    return {algorithm: call(algorithm) for algorithm in trackers}


def measure(fork: str, cases: List[Case], rounds: int, min_run_time: float) -> List[Dict[str, object]]:
    """Per case: ms per update with each algorithm (medians over rounds) and each one's ratio to the first's."""
    torch.set_num_threads(1)
    rows = []
    for case in cases:
        calls = updates(fork, case)
        times: Dict[str, List[float]] = {algorithm: [] for algorithm in calls}
        for _ in range(rounds):
            for algorithm, seconds in zip(calls, time_interleaved(list(calls.values()), min_run_time)):
                times[algorithm].append(seconds * 1e3)
        base = next(iter(calls))
        row: Dict[str, object] = dict(preset=case[0], N=case[1], P=case[2], G=case[3])
        for algorithm, values in times.items():
            row[f"{algorithm}_ms"] = statistics.median(values)
            row[f"{algorithm}_over_{base}"] = median_nan_last([v / b for v, b in zip(values, times[base])])
        rows.append(row)
    return rows


def markdown(fork: str, rows: List[Dict[str, object]]) -> str:
    """The table of ``rows``."""
    algorithms = ops.ALGORITHMS[fork]
    base = algorithms[0]
    head = " | ".join(f"{a} ms" for a in algorithms) + " | " + " | ".join(f"{a} / {base}" for a in algorithms[1:])
    lines = [
        f"| preset | N | P | G | {head} |",
        "| :--- | ---: | ---: | ---: | " + "---: | " * (2 * len(algorithms) - 1),
    ]
    for r in rows:
        cells = [f"{r[f'{a}_ms']:.3f}" for a in algorithms] + [f"{r[f'{a}_over_{base}']:.3f}" for a in algorithms[1:]]
        lines.append(f"| {r['preset']} | {r['N']:,} | {r['P']:,} | {r['G']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: List[str]) -> int:
    """Measures and prints the table; returns 0."""
    del argv
    if FLAGS.fork not in ops.ALGORITHMS:
        raise app.UsageError(f"--fork must be one of {sorted(ops.ALGORITHMS)}, got {FLAGS.fork!r}")
    rows = measure(FLAGS.fork, parse_cases(FLAGS.cases), FLAGS.rounds, FLAGS.min_run_time)
    print(f"Fork {FLAGS.fork!r}, 1 torch thread, CPU time, medians of {FLAGS.rounds} rounds:\n")
    print(markdown(FLAGS.fork, rows))
    return 0


def _define_flags() -> None:
    """The script's flags, defined when it runs (so that tests can import the module more than once)."""
    flags.DEFINE_string("fork", "add_at", "The operation of ops.ALGORITHMS whose algorithms are timed.")
    flags.DEFINE_string("cases", "verl_grpo:32768:2048:16", "Comma-separated preset:N:P:G cases.")
    flags.DEFINE_integer("rounds", 7, "Rounds over every call; medians over rounds are reported.")
    flags.DEFINE_float("min_run_time", 0.2, "CPU seconds of timed calls per call and round, at least.")


if __name__ == "__main__":
    _define_flags()
    app.run(main)
