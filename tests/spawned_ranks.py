"""Runs a test's worker function in several spawned processes, as torch.distributed ranks would."""

from typing import Callable, Sequence

import pytest
import torch.multiprocessing as mp


def run_ranks(worker: Callable, world_size: int, args: Sequence, *, timeout: float) -> None:
    """Spawns ``worker(rank, *args, failures)`` for every rank and fails the test if any rank failed.

    Args:
        worker: a module-level function (spawn pickles it by name); it puts a
            message on ``failures`` (its last argument) for each failure.
        world_size: how many ranks to start.
        args: the worker's arguments after ``rank``, before ``failures``.
        timeout: seconds each rank may take before the test fails as hung.
    """
    context = mp.get_context("spawn")
    failures = context.SimpleQueue()
    processes = [context.Process(target=worker, args=(rank, *args, failures)) for rank in range(world_size)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=timeout)
    for process in processes:
        if process.is_alive():
            process.kill()
            pytest.fail("a rank hung")
    messages = []
    while not failures.empty():
        messages.append(failures.get())
    assert not messages, "\n".join(messages)
    assert all(process.exitcode == 0 for process in processes)
