"""How the benchmarks time a call and describe the machine, shared by the bench_*.py scripts.

* ``time_cpu``: the median seconds per call from ``torch.utils.benchmark``;
* ``time_cuda``: the median over blocks of about 10 ms of calls between CUDA
  events, after a warm-up;
* ``time_thread``: the median CPU seconds of this thread per call, over
  blocks of about 10 ms (steadier than wall time on a busy machine);
* ``time_interleaved``: the same for several calls whose blocks take turns,
  so that their ratio holds through a busy machine's slow phases;
* ``write_report``: a results table as ``<stem>.json`` and ``<stem>.md``;
* ``describe_machine``: what the JSON reports say about the machine and versions.
"""

import json
import os
import platform
import statistics
import time
from typing import Callable, Dict, List, Sequence

import numpy as np
import torch
import torch.utils.benchmark


def time_cpu(fn: Callable[[], object], threads: int, min_run_time: float) -> float:
    """Median seconds per call, with torch.utils.benchmark.

    Args:
        fn: the call to time.
        threads: torch threads while timing.
        min_run_time: seconds of timed runs, at least.

    Returns:
        The median.
    """
    timer = torch.utils.benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads)
    return timer.blocked_autorange(min_run_time=min_run_time).median


def time_cuda(fn: Callable[[], object], min_run_time: float) -> float:
    """Median seconds per call, with CUDA events around blocks of calls.

    Args:
        fn: the call to time; it runs on the current stream.
        min_run_time: seconds of timed runs, at least.

    Returns:
        The median over blocks of the mean time per call in a block.
    """
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    per_block = max(1, int(0.01 / max(start.elapsed_time(end) / 1e3, 1e-7)))  # blocks of about 10 ms
    samples, spent = [], 0.0
    while spent < min_run_time or len(samples) < 5:
        start.record()
        for _ in range(per_block):
            fn()
        end.record()
        torch.cuda.synchronize()
        seconds = start.elapsed_time(end) / 1e3
        samples.append(seconds / per_block)
        spent += seconds
    return statistics.median(samples)


def describe_machine(device: torch.device, threads: int) -> Dict[str, object]:
    """The machine, versions, thread count and device a benchmark's JSON report records.

    Args:
        device: the device the tensor trackers ran on.
        threads: torch threads while timing.

    Returns:
        Platform, processor, core count, Python, torch and NumPy versions,
        ``torch_threads``, ``device`` and, on CUDA, the GPU's name.
    """
    info: Dict[str, object] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "torch_threads": threads,
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def time_thread(fn: Callable[[], object], min_run_time: float) -> float:
    """Median CPU seconds per call of this thread, over blocks of about 10 ms of calls.

    CPU time (``time.thread_time``: user and system, page faults included)
    leaves out the time the thread waits for a core, which on a shared
    machine is most of the noise of wall time. With one torch thread every
    op runs on this one.

    Args:
        fn: the call to time.
        min_run_time: CPU seconds of timed runs, at least.

    Returns:
        The median over blocks of the mean CPU time per call in a block.
    """
    return time_interleaved([fn], min_run_time)[0]


def time_interleaved(fns: Sequence[Callable[[], object]], min_run_time: float) -> List[float]:
    """``time_thread`` of several calls at once, their blocks taking turns.

    A block of about 10 ms of the first call, then one of the second, and
    so on, round and round, until each call has run ``min_run_time`` and at
    least 5 blocks. A shared machine has slow phases lasting seconds, in
    which even CPU time grows (caches and memory bandwidth are shared):
    timed in turns, the calls meet them alike, so their ratio holds where
    times taken one after the other would not. Each block follows one
    untimed call: the first call after another's block runs with that one's
    data in the caches, which at N = 256 cost the tracker's update about
    10% when it was timed.

    Args:
        fns: the calls to time.
        min_run_time: CPU seconds of timed runs of each call, at least.

    Returns:
        Per call, the median over its blocks of the mean CPU seconds per call in a block.
    """
    per_block = []
    for fn in fns:  # a warm-up call, then one timed call sizes the blocks
        fn()
        start = time.thread_time()
        fn()
        per_block.append(max(1, int(0.01 / max(time.thread_time() - start, 1e-7))))
    samples: List[List[float]] = [[] for _ in fns]
    spent = [0.0] * len(fns)
    while min(spent) < min_run_time or min(map(len, samples)) < 5:
        for index, fn in enumerate(fns):
            fn()  # untimed: the first call after another's block finds the caches holding that one's data
            start = time.thread_time()
            for _ in range(per_block[index]):
                fn()
            seconds = time.thread_time() - start
            samples[index].append(seconds / per_block[index])
            spent[index] += seconds
    return [statistics.median(block) for block in samples]


def median_nan_last(values: Sequence[float]) -> float:
    """The median, NaN (such as a ratio whose denominator was at most 0) sorting above every number.

    Args:
        values: at least one number.
    """
    ordered = sorted(values, key=lambda value: (value != value, value))
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def write_report(stem: str, report: Dict[str, object], text: str) -> None:
    """Writes ``report`` to ``<stem>.json`` and ``text`` to ``<stem>.md`` (the directory is created), and says so.

    Args:
        stem: the path without its extension.
        report: the JSON report (command, machine, rows).
        text: its Markdown table.
    """
    os.makedirs(os.path.dirname(stem) or ".", exist_ok=True)
    with open(stem + ".json", "w") as file:
        json.dump(report, file, indent=1)
    with open(stem + ".md", "w") as file:
        file.write(text)
    print(f"Wrote {stem}.json and {stem}.md")
