"""Times one tracker update against the dict trackers people use today.

Usage:
    python benchmarks/bench_trackers.py                    # CPU, one thread, the full grid
    python benchmarks/bench_trackers.py --out=benchmarks/results   # the same, into the committed results
    python benchmarks/bench_trackers.py --grid=headline --compile
    python benchmarks/bench_trackers.py --device=cuda      # CUDA events and CUDA-graph replay too

For every case (N samples, P prompts, K buffer slots) it first feeds the same
batches to every tracker and checks that their advantages agree, then times
``update`` on a fixed batch drawn uniformly over the P prompts:

* ``ddpo``: ddpo-pytorch's tracker, line for line, in benchmarks/baselines.py;
* ``reference``: rail_interview's plain-Python ReferenceBufferStatTracker;
* ``buffer`` and ``ema``: the tensor trackers, default input checks on;
* ``buffer compiled`` (with --compile): ``torch.compile(tracker.update)`` of a
  tracker with value checks off;
* on CUDA, ``buffer graph``: the update replayed from a captured CUDA graph.

The baselines get NumPy arrays and Python lists prepared outside the timed
region (in a real trainer, moving the batch to the host costs extra).
Each tracker is timed in ``--rounds`` rounds that take turns over all
trackers, each round a median over many runs (CPU: torch.utils.benchmark;
CUDA: CUDA events); the median over rounds is reported, so that a slow spell
of a shared machine does not land on one tracker only. Prints a Markdown table and writes JSON with the machine, torch
version and thread count to --out: a fresh temporary directory unless
--out names one (``--out=benchmarks/results`` regenerates the committed
results), printed at the end.
"""

import datetime
import json
import os
import re
import statistics
import sys
import tempfile
from typing import Callable, Dict, List, Tuple

import numpy as np
import torch
from absl import app, flags

from rail_interview.stat_tracking import (
    BufferStatTracker,
    EmaStatTracker,
    ReferenceBufferStatTracker,
    ReferenceEmaStatTracker,
)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import describe_machine, time_cpu, time_cuda  # noqa: E402  pylint: disable=wrong-import-position

from baselines import DdpoStyleStatTracker  # noqa: E402  pylint: disable=wrong-import-position

GRIDS: Dict[str, List[Tuple[int, int, int]]] = {
    # The table the issue asked for, plus sweeps of P at N = 4096 and of N at P = 4096.
    "full": [(256, 64, 32), (2048, 256, 32), (8192, 1024, 32), (32768, 4096, 32)]
    + [(4096, p, 32) for p in (1_000, 10_000, 100_000, 1_000_000)]
    + [(n, 4096, 32) for n in (256, 1024, 4096, 16384, 65536)],
    "headline": [(256, 64, 32), (32768, 4096, 32), (4096, 1_000, 32), (4096, 1_000_000, 32)],
    "quick": [(64, 8, 4), (300, 50, 8)],
}

FLAGS = flags.FLAGS


def min_count_for(buffer_size: int) -> int:
    """min_count used with a buffer of K slots: 16, or K / 2 for small buffers."""
    return max(1, min(16, buffer_size // 2))


def make_batch(num_samples: int, num_prompts: int, seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """A batch drawn uniformly over the prompts.

    Args:
        num_samples: N.
        num_prompts: P.
        seed: draws the ids and the rewards.

    Returns:
        int64 [N] ids in [0, P) and float32 [N] rewards (mean -50, std 10), on the CPU.
    """
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(num_prompts, (num_samples,), generator=generator)
    rewards = torch.randn(num_samples, generator=generator) * 10 - 50
    return ids, rewards


def buffer_tracker(
    num_prompts: int, buffer_size: int, device: torch.device, check_values: bool = True
) -> BufferStatTracker:
    """The buffer tracker this script times (``presets.ddpo``'s semantics): K slots, ``min_count_for(K)``.

    Args:
        num_prompts: P.
        buffer_size: K.
        device: its device.
        check_values: its input value checks.

    Returns:
        A fresh tracker.
    """
    return BufferStatTracker(
        num_prompts, buffer_size, min_count_for(buffer_size), device=device, check_values=check_values
    )


def ema_tracker(num_prompts: int, buffer_size: int, device: torch.device) -> EmaStatTracker:
    """The EMA tracker this script times: decay 0.9, ``min_count_for(K)``, default checks.

    Args:
        num_prompts: P.
        buffer_size: K (only sets min_count).
        device: its device.

    Returns:
        A fresh tracker.
    """
    return EmaStatTracker(num_prompts, 0.9, min_count_for(buffer_size), device=device)


def warmed(tracker, num_samples: int, num_prompts: int, device: torch.device):
    """Feeds ``tracker`` three batches (seeds 0 to 2), so that timing sees partly full buffers, as in training.

    Args:
        tracker: a tensor tracker.
        num_samples: N.
        num_prompts: P.
        device: where the batches go.

    Returns:
        ``tracker``.
    """
    for seed in range(3):
        tracker.update(*(t.to(device) for t in make_batch(num_samples, num_prompts, seed)))
    return tracker


def baseline_calls(ids: torch.Tensor, rewards: torch.Tensor, buffer_size: int) -> Dict[str, Callable[[], object]]:
    """The dict trackers' updates on host copies of a batch, after three warm-up updates of it.

    Args:
        ids: int64 [N] ids, on the CPU.
        rewards: float32 [N], on the CPU.
        buffer_size: K.

    Returns:
        ``ddpo_ms`` (ddpo-pytorch's tracker on NumPy arrays) and
        ``reference_ms`` (ReferenceBufferStatTracker on Python lists): calls
        of one update, the arrays and lists prepared outside them.
    """
    ddpo = DdpoStyleStatTracker(buffer_size, min_count_for(buffer_size))
    reference = ReferenceBufferStatTracker(buffer_size, min_count_for(buffer_size))
    np_ids, np_rewards, list_ids, list_rewards = ids.numpy(), rewards.numpy(), ids.tolist(), rewards.tolist()
    for _ in range(3):
        ddpo.update(np_ids, np_rewards)
        reference.update(list_ids, list_rewards)
    return {
        "ddpo_ms": lambda: ddpo.update(np_ids, np_rewards),
        "reference_ms": lambda: reference.update(list_ids, list_rewards),
    }


def check_agreement(num_samples: int, num_prompts: int, buffer_size: int, device: torch.device) -> None:
    """Feeds three batches to every tracker and raises if their advantages disagree.

    Args:
        num_samples: N.
        num_prompts: P.
        buffer_size: K.
        device: the tensor trackers' device.

    Raises:
        AssertionError: if a tracker disagrees with its reference.
    """
    ddpo = DdpoStyleStatTracker(buffer_size, min_count_for(buffer_size))
    reference = ReferenceBufferStatTracker(buffer_size, min_count_for(buffer_size))
    ema_reference = ReferenceEmaStatTracker(0.9, min_count_for(buffer_size))
    buffer = buffer_tracker(num_prompts, buffer_size, device)
    ema = ema_tracker(num_prompts, buffer_size, device)
    for seed in range(3):
        ids, rewards = make_batch(num_samples, num_prompts, seed)
        expected = np.asarray(reference.update(ids.tolist(), rewards.tolist()))
        np.testing.assert_allclose(ddpo.update(ids.numpy(), rewards.numpy()), expected, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(
            buffer.update(ids.to(device), rewards.to(device)).cpu().numpy(), expected, rtol=1e-4, atol=1e-4
        )
        np.testing.assert_allclose(
            ema.update(ids.to(device), rewards.to(device)).cpu().numpy(),
            np.asarray(ema_reference.update(ids.tolist(), rewards.tolist())),
            rtol=1e-4,
            atol=1e-4,
        )


def _graphed_update(tracker: BufferStatTracker, ids: torch.Tensor, rewards: torch.Tensor) -> Callable[[], None]:
    """Captures ``tracker.update`` in a CUDA graph and returns its replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            tracker.update(ids, rewards)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        tracker.update(ids, rewards)
    return graph.replay


def run_case(
    num_samples: int,
    num_prompts: int,
    buffer_size: int,
    device: torch.device,
    *,
    threads: int,
    min_run_time: float,
    rounds: int,
    compile_update: bool,
    baselines: bool,
) -> Dict[str, object]:
    """Checks agreement, then times every tracker on one case.

    Args:
        num_samples: N.
        num_prompts: P.
        buffer_size: K.
        device: the tensor trackers' device.
        threads: torch threads while timing on the CPU.
        min_run_time: seconds of timed runs per tracker and round, at least.
        rounds: rounds of timing over all trackers.
        compile_update: time ``torch.compile(update)`` of the buffer tracker too.
        baselines: time the ddpo and reference dict trackers too.

    Returns:
        The case's sizes, the median over rounds of each tracker's median
        milliseconds per update, and every round's figure.
    """
    check_agreement(num_samples, num_prompts, buffer_size, device)
    ids, rewards = make_batch(num_samples, num_prompts, seed=10)
    on_device = ids.to(device), rewards.to(device)
    timer = (
        (lambda fn: time_cuda(fn, min_run_time))
        if device.type == "cuda"
        else (lambda fn: time_cpu(fn, threads, min_run_time))
    )
    result: Dict[str, object] = {"N": num_samples, "P": num_prompts, "K": buffer_size}

    # What to time, by result name: (the call, its timer).
    calls: Dict[str, Tuple[Callable[[], object], Callable[[Callable[[], object]], float]]] = {}
    buffer = warmed(buffer_tracker(num_prompts, buffer_size, device), num_samples, num_prompts, device)
    calls["buffer_ms"] = (lambda: buffer.update(*on_device)), timer
    ema = warmed(ema_tracker(num_prompts, buffer_size, device), num_samples, num_prompts, device)
    calls["ema_ms"] = (lambda: ema.update(*on_device)), timer
    if compile_update:
        compiled_tracker = warmed(
            buffer_tracker(num_prompts, buffer_size, device, check_values=False), num_samples, num_prompts, device
        )
        compiled = torch.compile(compiled_tracker.update, fullgraph=True, dynamic=False)
        compiled(*on_device)  # compile outside the timed region
        calls["buffer_compiled_ms"] = (lambda: compiled(*on_device)), timer
    if device.type == "cuda":
        graphed = buffer_tracker(num_prompts, buffer_size, device, check_values=False)
        calls["buffer_graph_ms"] = _graphed_update(graphed, *on_device), timer
    if baselines:
        slow_timer = lambda fn: time_cpu(fn, 1, max(min_run_time, 0.3))  # noqa: E731
        for name, call in baseline_calls(ids, rewards, buffer_size).items():
            calls[name] = call, slow_timer

    # Rounds over all trackers in turn, so that a slow spell of the machine
    # hits every tracker alike; the median over rounds is reported.
    times: Dict[str, List[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, (call, time_call) in calls.items():
            times[name].append(1e3 * time_call(call))
    for name, values in times.items():
        result[name] = statistics.median(values)
    result["rounds"] = times

    if device.type == "cuda":
        state_bytes = sum(t.numel() * t.element_size() for t in graphed.state_dict().values())
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        buffer.update(*on_device)
        torch.cuda.synchronize()
        result["state_mb"] = state_bytes / 2**20
        result["update_peak_extra_mb"] = (torch.cuda.max_memory_allocated(device) - before) / 2**20
    return result


def format_table(rows: List[Dict[str, object]]) -> str:
    """Formats results as a Markdown table with speedups over the dict trackers.

    Args:
        rows: as returned by ``run_case``.

    Returns:
        The table.
    """
    columns = [
        c
        for c in (
            "ddpo_ms",
            "reference_ms",
            "buffer_ms",
            "ema_ms",
            "buffer_compiled_ms",
            "buffer_graph_ms",
            "state_mb",
            "update_peak_extra_mb",
        )
        if c in rows[0]
    ]
    header = ["N", "P", "K"] + [c.replace("_ms", " ms").replace("_mb", " MB").replace("_", " ") for c in columns]
    ratios = [("ddpo_ms", "buffer_ms"), ("reference_ms", "buffer_ms"), ("ddpo_ms", "ema_ms")]
    ratios = [r for r in ratios if r[0] in rows[0]]
    header += [f"{a.split('_')[0]} / {b.split('_')[0]}" for a, b in ratios]
    lines = ["| " + " | ".join(header) + " |", "|" + " ---: |" * len(header)]
    for row in rows:
        cells = [f"{row['N']:,}", f"{row['P']:,}", str(row["K"])]
        cells += [f"{row[c]:.3f}" if row[c] < 10 else f"{row[c]:.1f}" for c in columns]
        cells += [f"{row[a] / row[b]:.1f}x" for a, b in ratios]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv):
    """Runs the grid, prints the table and writes the JSON.

    Args:
        argv: leftover command-line arguments; there must be none.
    """
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    torch.set_num_threads(FLAGS.threads)
    device = torch.empty(0, device=FLAGS.device).device
    machine = describe_machine(device, FLAGS.threads)
    print(
        f"{machine['gpu'] if 'gpu' in machine else machine['processor']}, torch {torch.__version__}, "
        f"{FLAGS.threads} thread(s), device {device}"
    )
    rows = []
    for num_samples, num_prompts, buffer_size in GRIDS[FLAGS.grid]:
        rows.append(
            run_case(
                num_samples,
                num_prompts,
                buffer_size,
                device,
                threads=FLAGS.threads,
                min_run_time=FLAGS.min_run_time,
                rounds=FLAGS.rounds,
                compile_update=FLAGS.compile,
                baselines=FLAGS.baselines,
            )
        )
        print(
            f"  N={num_samples} P={num_prompts} K={buffer_size}: "
            + ", ".join(f"{k} {v:.3f}" for k, v in rows[-1].items() if k.endswith("_ms")),
            flush=True,
        )
    print(format_table(rows))
    if FLAGS.out != "":
        out = tempfile.mkdtemp(prefix="rail_interview_bench_trackers_") if FLAGS.out is None else FLAGS.out
        os.makedirs(out, exist_ok=True)
        tag = re.sub(r"[^a-z0-9]+", "-", str(machine.get("gpu", device.type)).lower()).strip("-")
        path = os.path.join(out, f"trackers_{tag}_{FLAGS.grid}.json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump(
                {
                    "date": datetime.date.today().isoformat(),
                    "grid": FLAGS.grid,
                    "machine": machine,
                    "command": " ".join(sys.argv),
                    "results": rows,
                },
                f,
                indent=2,
            )
        print(f"Wrote {path}")


def _define_flags() -> None:
    """The script's flags, defined when it runs (so that headline.py can import this module beside others)."""
    flags.DEFINE_enum("grid", "full", list(GRIDS), "Which cases to run.")
    flags.DEFINE_string("device", "cpu", "Device of the tensor trackers: cpu or cuda.")
    flags.DEFINE_integer("threads", 1, "CPU threads for torch (the baselines are single-threaded).")
    flags.DEFINE_float("min_run_time", 0.4, "Seconds of timed runs per tracker, case and round, at least.")
    flags.DEFINE_integer("rounds", 3, "Rounds of timing over all trackers; the median over rounds is reported.")
    flags.DEFINE_bool("compile", False, "Also time torch.compile(update) of the buffer tracker.")
    flags.DEFINE_bool("baselines", True, "Time the ddpo and reference dict trackers too.")
    flags.DEFINE_string(
        "out",
        None,
        "Directory for the JSON results (default: a fresh temporary directory; "
        "--out=benchmarks/results regenerates the committed ones); empty to write none.",
    )


if __name__ == "__main__":
    _define_flags()
    app.run(main)
