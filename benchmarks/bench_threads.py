"""Times the default training loop with torch's thread count left alone and with config.num_threads=1.

Usage:
    python benchmarks/bench_threads.py            # with one busy process beside it
    python benchmarks/bench_threads.py --busy=0   # on an idle machine

The default problem's tensors hold a few hundred elements, too few to split
across threads; when another process keeps a core busy, torch's threads wait
for each other. This starts ``--busy`` processes that spin, then runs
``scripts/train.py`` (default config, on the CPU) ``--repeats`` times with
``--config.num_threads=0`` (torch's default, one thread per core) and with
``--config.num_threads=1`` (the config's default), and prints the training
loop's seconds from each run's summary.json. Runs go to a temporary directory.
"""

import glob
import json
import os
import statistics
import subprocess
import sys
import tempfile
from typing import List

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_integer("busy", 1, "Processes that keep a core busy while training runs.")
flags.DEFINE_integer("repeats", 3, "Runs per thread setting.")

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "scripts", "train.py")


def loop_seconds(num_threads: int, logdir: str) -> float:
    """Runs the default training once with ``num_threads``; returns its summary's train_seconds."""
    subprocess.run(
        [sys.executable, SCRIPT, f"--config.num_threads={num_threads}", "--config.device=cpu", f"--logdir={logdir}"],
        check=True,
        capture_output=True,
    )
    (summary,) = glob.glob(os.path.join(logdir, "*", "summary.json"))
    with open(summary, encoding="utf-8") as f:
        return json.load(f)["train_seconds"]


def main(argv: List[str]) -> None:
    """Runs both settings beside the busy processes and prints a Markdown table."""
    del argv
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(FLAGS.busy)]
    try:
        rows = []
        for num_threads in (0, 1):
            seconds = [
                loop_seconds(num_threads, tempfile.mkdtemp(prefix="rail_interview_threads_"))
                for _ in range(FLAGS.repeats)
            ]
            rows.append((num_threads, seconds))
    finally:
        for spinner in spinners:
            spinner.kill()
    print(f"| config.num_threads | loop seconds, {FLAGS.repeats} runs beside {FLAGS.busy} busy process(es) | median |")
    print("| --- | --- | ---: |")
    for num_threads, seconds in rows:
        label = "0 (torch's default)" if num_threads == 0 else str(num_threads)
        print(f"| {label} | {', '.join(f'{s:.2f}' for s in seconds)} | {statistics.median(seconds):.2f} |")


if __name__ == "__main__":
    app.run(main)
