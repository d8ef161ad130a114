"""What the per-prompt stats log costs the training loop.

Usage:
    python benchmarks/bench_stats_log.py                      # default run, every method
    python benchmarks/bench_stats_log.py --repeats=9 --methods=buffer
    python benchmarks/bench_stats_log.py --verbose            # also every run's progress lines

Trains the default config with the stats log off and on, alternating, and
reports the median training-loop wall-clock of each and the overhead. Runs go
to a temporary directory that is deleted afterwards; their progress lines
(training's logging at INFO) are hidden unless --verbose, or an explicit
--verbosity, asks for them.
"""

import statistics
import tempfile

from absl import app, flags, logging
from ml_collections import config_flags

from rail_interview import configs, training

_CONFIG = config_flags.DEFINE_config_file("config", configs.DEFAULT_CONFIG_PATH, "Base config.", lock_config=True)
_METHODS = flags.DEFINE_list("methods", ["batch", "buffer", "ema"], "Stat-tracking methods to measure.")
_REPEATS = flags.DEFINE_integer("repeats", 7, "Runs per method and setting; medians are reported.")
_VERBOSE = flags.DEFINE_bool("verbose", False, "Show every training run's progress lines (logging at INFO).")


def main(argv):
    """Measures and prints the loop time with and without the stats log.

    Args:
        argv: leftover command-line arguments; there must be none.
    """
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if not _VERBOSE.value and not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # train() logs its progress at INFO
    base = _CONFIG.value
    every = base.stats_log.every or 1
    print(
        f"stats log every {every} epoch(s), up to {base.stats_log.max_prompts} prompts; "
        f"{base.num_epochs} epochs, medians of {_REPEATS.value} runs"
    )
    print("| method | loop s, log off | loop s, log on | overhead |")
    print("| --- | ---: | ---: | ---: |")
    with tempfile.TemporaryDirectory() as logdir:
        for method in _METHODS.value:
            seconds = {0: [], every: []}
            for _ in range(_REPEATS.value):
                for log_every in seconds:  # alternate, so that drift hits both alike
                    config = base.copy_and_resolve_references()
                    config.stat_tracking.method = method
                    config.stats_log.every = log_every
                    seconds[log_every].append(training.train(config, logdir)["train_seconds"])
            off, on = statistics.median(seconds[0]), statistics.median(seconds[every])
            print(f"| {method} | {off:.3f} | {on:.3f} | {100 * (on / off - 1):+.1f}% |")


if __name__ == "__main__":
    app.run(main)
