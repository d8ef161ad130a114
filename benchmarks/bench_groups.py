"""Times GRPO-style group advantages: the presets and trackers against in-batch baselines.

Usage:
    python benchmarks/bench_groups.py                     # CPU, one thread, N = 512, 4096, 32768
    python benchmarks/bench_groups.py --out=benchmarks/results/groups_cpu.md
    python benchmarks/bench_groups.py --quick             # tiny sizes, one short round, a few seconds

For each size (N samples in groups of G, P = N / G dense prompt ids in a
random order, so that groups are not contiguous; rewards uniform in [0, 1))
it measures one update of:

* the baselines of benchmarks/baselines.py: ``python_loop_grpo`` (verl's
  and TRL-era trainers' Python loop) and ``index_add_grpo`` (the vectorised
  twin, reading P from the ids, and with P given);
* ``presets.trl_grpo`` (scale_rewards group, batch, none), ``verl_grpo``,
  ``verl_rloo``, ``flow_grpo``;
* ``AdvantageTracker`` with memory "buffer" (K = 32) and "ema" (decay 0.7),
  GRPO estimator (prompt mean, prompt std, ddof 1).

Trackers are built with ``check_values=False``. For each it reports:

* ``ms``: median milliseconds per update (torch.utils.benchmark
  ``blocked_autorange``, one CPU thread), after three warm-up updates, in
  ``--rounds`` rounds that take turns over all methods: the median over
  rounds;
* ``host syncs``: calls per update that read tensor values to the host, as
  ``sync_counter.SyncCounter`` counts them (each one a device sync on a GPU);
* ``bitwise``: two fresh instances fed the same three batches give
  ``torch.equal`` advantages;
* ``max abs diff vs loop``: on the first batch of a fresh instance, against
  ``python_loop_grpo`` with the same semantics (the preset's eps; batch-std
  presets divide the loop's Dr. GRPO advantages by the batch std); "n/a" for
  the EMA tracker, whose mean is not the group mean. Agreement means at most
  1e-5.

Prints a Markdown table; ``--out`` also writes it, with the machine and the
command, to a file.
"""

from __future__ import annotations

import datetime
import functools
import os
import platform
import statistics
import sys
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

import torch
import torch.utils.benchmark
from absl import app, flags

from rail_interview.stat_tracking import AdvantageTracker, presets

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# pylint: disable=wrong-import-position
from baselines import index_add_grpo, python_loop_grpo  # noqa: E402
from sync_counter import count_syncs  # noqa: E402

#: (N, G) cases: N samples in P = N / G groups of G.
SIZES: Dict[str, List[Tuple[int, int]]] = {
    "full": [(512, 8), (4096, 8), (32768, 16)],
    "quick": [(32, 4), (64, 8)],
}

#: Largest difference from the loop baseline that counts as agreement.
TOLERANCE = 1e-5

FLAGS = flags.FLAGS

Update = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class Method(NamedTuple):
    """One row of the table.

    Attributes:
        name: as printed.
        build: P -> a fresh update function ``(prompt_ids [N], rewards [N]) -> [N]``.
        expected: ``(prompt_ids [N], rewards [N]) -> [N]``, the loop baseline's
            advantages with the same semantics on a first batch, or None.
    """

    name: str
    build: Callable[[int], Update]
    expected: Optional[Update]


def _loop_over_batch_std(prompt_ids: torch.Tensor, rewards: torch.Tensor, ddof: int, eps: float) -> torch.Tensor:
    """The loop's group-centred rewards divided by the batch std (TRL scale_rewards="batch", flow_grpo)."""
    return python_loop_grpo(prompt_ids, rewards, norm_by_std=False) / (rewards.std(correction=ddof) + eps)


def methods() -> List[Method]:
    """The rows of the table, in order.

    Returns:
        The methods.
    """
    grpo_loop = python_loop_grpo
    return [
        Method("python_loop_grpo", lambda p: python_loop_grpo, grpo_loop),
        Method("index_add_grpo (reads P)", lambda p: index_add_grpo, grpo_loop),
        Method("index_add_grpo (P given)", lambda p: functools.partial(index_add_grpo, num_groups=p), grpo_loop),
        Method(
            "presets.trl_grpo(group)",
            lambda p: presets.trl_grpo(p, scale_rewards="group", check_values=False).update,
            functools.partial(python_loop_grpo, eps=1e-4),
        ),
        Method(
            "presets.trl_grpo(batch)",
            lambda p: presets.trl_grpo(p, scale_rewards="batch", check_values=False).update,
            functools.partial(_loop_over_batch_std, ddof=1, eps=1e-4),
        ),
        Method(
            "presets.trl_grpo(none)",
            lambda p: presets.trl_grpo(p, scale_rewards="none", check_values=False).update,
            functools.partial(python_loop_grpo, norm_by_std=False),
        ),
        Method("presets.verl_grpo", lambda p: presets.verl_grpo(p, check_values=False).update, grpo_loop),
        Method(
            "presets.verl_rloo",
            lambda p: presets.verl_rloo(p, check_values=False).update,
            functools.partial(python_loop_grpo, leave_one_out=True),
        ),
        Method(
            "presets.flow_grpo",
            lambda p: presets.flow_grpo(p, check_values=False).update,
            functools.partial(_loop_over_batch_std, ddof=0, eps=1e-4),
        ),
        Method(
            "AdvantageTracker(buffer, K=32, GRPO)",
            lambda p: (
                AdvantageTracker(
                    p, "buffer", buffer_size=32, baseline="prompt_mean", scale="prompt_std", ddof=1, check_values=False
                ).update
            ),
            grpo_loop,
        ),
        Method(
            "AdvantageTracker(ema, decay=0.7, GRPO)",
            lambda p: (
                AdvantageTracker(
                    p, "ema", decay=0.7, baseline="prompt_mean", scale="prompt_std", ddof=1, check_values=False
                ).update
            ),
            None,
        ),
    ]


def make_batch(num_samples: int, group_size: int, seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """A GRPO batch: G samples of each of P = N / G prompts, in a random order.

    Args:
        num_samples: N, a multiple of group_size.
        group_size: G.
        seed: for the order and the rewards.

    Returns:
        int64 [N] prompt ids in [0, P), each G times, and float32 [N] rewards in [0, 1).
    """
    generator = torch.Generator().manual_seed(seed)
    ids = torch.arange(num_samples // group_size).repeat_interleave(group_size)  # [N]
    ids = ids[torch.randperm(num_samples, generator=generator)]
    rewards = torch.rand(num_samples, generator=generator)  # [N]
    return ids, rewards


def check_method(method: Method, num_samples: int, group_size: int) -> Tuple[Dict[str, object], Callable[[], object]]:
    """Checks one method at one size and returns the update to time.

    Args:
        method: the row.
        num_samples: N.
        group_size: G.

    Returns:
        ``syncs`` (host reads per update), ``bitwise`` (two fresh runs
        equal) and ``max_diff`` (against the loop, None where semantics
        differ); and a call of the warmed-up update on a fixed batch.
    """
    num_prompts = num_samples // group_size
    batches = [make_batch(num_samples, group_size, seed) for seed in range(3)]
    update, twin = method.build(num_prompts), method.build(num_prompts)
    first = [update(*batch) for batch in batches]
    second = [twin(*batch) for batch in batches]
    max_diff = None
    if method.expected is not None:
        max_diff = (first[0] - method.expected(*batches[0])).abs().max().item()
    ids, rewards = batches[0]
    call = lambda: update(ids, rewards)  # noqa: E731
    figures = {
        "syncs": count_syncs(call),
        "bitwise": all(torch.equal(a, b) for a, b in zip(first, second)),
        "max_diff": max_diff,
    }
    return figures, call


def time_call(call: Callable[[], object], min_run_time: float) -> float:
    """Median milliseconds per call, one thread, with torch.utils.benchmark.

    Args:
        call: what to time.
        min_run_time: seconds of timed runs, at least.

    Returns:
        The median.
    """
    timer = torch.utils.benchmark.Timer(stmt="call()", globals={"call": call}, num_threads=1)
    return 1e3 * timer.blocked_autorange(min_run_time=min_run_time).median


def run_benchmark(sizes: List[Tuple[int, int]], min_run_time: float, rounds: int) -> List[Dict[str, object]]:
    """Checks, then times, every method at every size.

    Each size is timed in rounds that take turns over all methods, and the
    median over rounds is reported, so that a slow spell of a shared machine
    does not land on one method only.

    Args:
        sizes: (N, G) cases.
        min_run_time: seconds of timed runs per method, size and round, at least.
        rounds: rounds of timing.

    Returns:
        One dict per (size, method): N, G, P, method, ``check_method``'s
        figures, ``ms`` (the median over rounds) and ``rounds_ms``.
    """
    rows = []
    for num_samples, group_size in sizes:
        calls = []
        for method in methods():
            figures, call = check_method(method, num_samples, group_size)
            rows.append(
                {
                    "N": num_samples,
                    "G": group_size,
                    "P": num_samples // group_size,
                    "method": method.name,
                    **figures,
                    "rounds_ms": [],
                }
            )
            calls.append(call)
        size_rows = rows[-len(calls) :]
        for _ in range(rounds):
            for row, call in zip(size_rows, calls):
                row["rounds_ms"].append(time_call(call, min_run_time))
        for row in size_rows:
            row["ms"] = statistics.median(row["rounds_ms"])
            print(f"  N={num_samples} {row['method']}: {row['ms']:.4g} ms, {row['syncs']} syncs", flush=True)
    return rows


def format_table(rows: List[Dict[str, object]]) -> str:
    """Formats results as a Markdown table, with times relative to the two baselines.

    Args:
        rows: as returned by ``run_benchmark``.

    Returns:
        The table.
    """
    header = [
        "N",
        "G",
        "P",
        "method",
        "ms / update",
        "loop / this",
        "this / index_add",
        "host syncs / update",
        "bitwise run to run",
        f"max abs diff vs loop (<= {TOLERANCE:g})",
    ]
    lines = ["| " + " | ".join(header) + " |", "| ---: | ---: | ---: | :--- |" + " ---: |" * 4 + " :---: | ---: |"]
    baseline_ms = {(row["N"], row["method"]): row["ms"] for row in rows}
    for row in rows:
        loop_ms = baseline_ms[(row["N"], "python_loop_grpo")]
        index_add_ms = baseline_ms[(row["N"], "index_add_grpo (reads P)")]
        diff = row["max_diff"]
        diff_cell = "n/a" if diff is None else f"{diff:.1e} {'ok' if diff <= TOLERANCE else 'DIFFERS'}"
        cells = [
            f"{row['N']:,}",
            str(row["G"]),
            f"{row['P']:,}",
            row["method"],
            f"{row['ms']:.4g}",
            f"{loop_ms / row['ms']:.1f}x",
            f"{row['ms'] / index_add_ms:.2f}",
            str(row["syncs"]),
            "yes" if row["bitwise"] else "NO",
            diff_cell,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: List[str]) -> None:
    """Runs the sizes, prints the table and writes it to ``--out``.

    Args:
        argv: leftover command-line arguments; there must be none.
    """
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    torch.set_num_threads(1)
    min_run_time = min(FLAGS.min_run_time, 0.01) if FLAGS.quick else FLAGS.min_run_time
    machine = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"1 thread, device cpu"
    )
    print(machine)
    rounds = 1 if FLAGS.quick else FLAGS.rounds
    rows = run_benchmark(SIZES["quick" if FLAGS.quick else "full"], min_run_time, rounds)
    table = format_table(rows)
    print(table)
    if FLAGS.out:
        command = " ".join(["python", os.path.relpath(sys.argv[0])] + sys.argv[1:])
        with open(FLAGS.out, "w", encoding="utf-8") as f:
            f.write(
                f"# GRPO group advantages, one update (CPU)\n\n{datetime.date.today().isoformat()}, {machine}, "
                f"median over {rounds} round(s) of {min_run_time:g} s or more per method.\n"
                f"Command: `{command}`\n\n{table}\n"
            )
        print(f"Wrote {FLAGS.out}")


def _define_flags() -> None:
    """The script's flags, defined when it runs (so that headline.py can import this module beside others)."""
    flags.DEFINE_bool("quick", False, "Tiny sizes and short timings, for a smoke test.")
    flags.DEFINE_float("min_run_time", 0.3, "Seconds of timed runs per method, size and round, at least.")
    flags.DEFINE_integer("rounds", 3, "Rounds of timing over all methods; the median over rounds is reported.")
    flags.DEFINE_string("out", "", "File to write the Markdown table to; empty to write none.")


if __name__ == "__main__":
    _define_flags()
    app.run(main)
