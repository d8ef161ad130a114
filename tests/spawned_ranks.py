"""Runs a test's body in several spawned processes, as torch.distributed gloo ranks."""

import datetime
import traceback
from typing import Callable, Sequence

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp


def _rank_main(rank: int, world_size: int, init_file: str, body: Callable, args: Sequence, failures) -> None:
    """One rank: joins the gloo group, runs ``body(rank, *args)``, reports a failure, leaves the group."""
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"file://{init_file}",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=60),
        )
        body(rank, *args)
        # Every rank done communicating before any tears the group down: a rank
        # that destroys its group while a peer still reads from it can abort
        # the peer in gloo's C++ ("terminate called without an active exception").
        dist.barrier()
    except BaseException:  # pylint: disable=broad-except
        failures.put(f"rank {rank}:\n{traceback.format_exc()}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(body: Callable, world_size: int, init_file: str, args: Sequence = (), *, timeout: float) -> None:
    """Runs ``body(rank, *args)`` on every rank of a gloo group; fails the test if any rank failed.

    Args:
        body: a module-level function (spawn pickles it by name), run with the
            default process group already initialised.
        world_size: how many ranks to start.
        init_file: a path for the group's file store, not yet existing.
        args: the body's arguments after ``rank``.
        timeout: seconds each rank may take before the test fails as hung.
    """
    context = mp.get_context("spawn")
    failures = context.SimpleQueue()
    processes = [
        context.Process(target=_rank_main, args=(rank, world_size, init_file, body, tuple(args), failures))
        for rank in range(world_size)
    ]
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
