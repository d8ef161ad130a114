"""Times tracker updates of a git revision against the working tree, interleaved.

Usage:
    python benchmarks/ab_trackers.py --rev=HEAD            # is my uncommitted change faster?
    python benchmarks/ab_trackers.py --rev=1a5a1d0 --tracker=EmaStatTracker

A change to the update is often worth a few percent, less than this kind of
machine drifts between two runs of bench_trackers.py. So both versions run in
one process, on the same batches, in alternating rounds: the package as it is
at ``--rev`` is extracted with ``git archive`` into a temporary directory
under another name, imported next to the working tree's, checked to return
the same advantages, then timed. Prints each case's median over rounds and
the ratio new / old (below 1: the working tree is faster).
"""

import importlib
import os
import statistics
import sys
import tempfile
from typing import List, Tuple

import torch
import torch.utils.benchmark
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from revisions import PACKAGE, REPO_ROOT, import_revision  # noqa: E402  pylint: disable=wrong-import-position

CASES: List[Tuple[int, int]] = [(256, 64), (4096, 1_000), (4096, 1_000_000), (32768, 4096)]

_REV = flags.DEFINE_string("rev", "HEAD", "Git revision to compare the working tree against.")
_TRACKER = flags.DEFINE_enum(
    "tracker", "BufferStatTracker", ["BufferStatTracker", "EmaStatTracker"], "Which tracker to time."
)
_ROUNDS = flags.DEFINE_integer("rounds", 7, "Alternating rounds; the median over rounds is reported.")
_MIN_RUN_TIME = flags.DEFINE_float("min_run_time", 0.15, "Seconds of timed runs per version, case and round.")


def main(argv):
    """Times both versions on every case and prints the ratios.

    Args:
        argv: leftover command-line arguments; there must be none.
    """
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    torch.set_num_threads(1)
    new = importlib.import_module(f"{PACKAGE}.stat_tracking")
    with tempfile.TemporaryDirectory() as directory:
        old = import_revision(_REV.value, directory)
        print(
            f"{_TRACKER.value}: {_REV.value} (old) against the working tree (new), one thread, "
            f"medians over {_ROUNDS.value} alternating rounds"
        )
        for num_samples, num_prompts in CASES:
            generator = torch.Generator().manual_seed(0)
            ids = torch.randint(num_prompts, (num_samples,), generator=generator)
            rewards = torch.randn(num_samples, generator=generator) * 10 - 50
            trackers = []
            for module in (old, new):
                cls = getattr(module, _TRACKER.value)
                buffer = _TRACKER.value == "BufferStatTracker"
                tracker = cls(num_prompts, 32, 16) if buffer else cls(num_prompts, 0.9, 16)
                for _ in range(3):
                    tracker.update(ids, rewards)
                trackers.append(tracker)
            torch.testing.assert_close(trackers[0].update(ids, rewards), trackers[1].update(ids, rewards))
            times: List[List[float]] = [[], []]
            for _ in range(_ROUNDS.value):
                for version, tracker in enumerate(trackers):
                    timer = torch.utils.benchmark.Timer(
                        stmt="update(ids, rewards)",
                        num_threads=1,
                        globals={"update": tracker.update, "ids": ids, "rewards": rewards},
                    )
                    times[version].append(1e3 * timer.blocked_autorange(min_run_time=_MIN_RUN_TIME.value).median)
            old_ms, new_ms = (statistics.median(t) for t in times)
            print(
                f"  N={num_samples:>6} P={num_prompts:>9}: old {old_ms:.3f} ms, new {new_ms:.3f} ms, "
                f"new / old {new_ms / old_ms:.2f}",
                flush=True,
            )


if __name__ == "__main__":
    os.chdir(REPO_ROOT)
    app.run(main)
