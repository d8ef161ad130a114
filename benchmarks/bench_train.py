"""End-to-end cost of stat tracking: epochs per second of the training loop.

Usage:
    python benchmarks/bench_train.py                  # CPU, default and large sizes
    python benchmarks/bench_train.py --config.device=cuda
    python benchmarks/bench_train.py --verbose        # also every run's progress lines

For each size it trains with the batch, buffer and EMA trackers, and with the
DDPO-style dict tracker run on the host (benchmarks/baselines.py), the way
the original trainer did, and prints epochs per second of the training loop
(median of --repeats runs). The stats log is off and the only checkpoint is
the final one, to time tracking alone.
Sizes: "default" (64 prompts, batch 256, the config's one thread) and
"large" (100,000 prompts, batch 65,536, 2**20 parameters, one thread per
core). The runs go to a temporary directory that
is deleted afterwards, and their progress lines (training's logging at
INFO) are hidden unless --verbose, or an explicit --verbosity, asks for them.
"""

import os
import statistics
import sys
import tempfile

from absl import app, flags, logging
from ml_collections import config_flags

from rail_interview import configs, training

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from baselines import HostDictStatTracker  # noqa: E402  pylint: disable=wrong-import-position

_CONFIG = config_flags.DEFINE_config_file("config", configs.DEFAULT_CONFIG_PATH, "Base config.", lock_config=True)
_SIZES = flags.DEFINE_list("sizes", ["default", "large"], "Sizes to run: default, large.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Runs per method and size; the median is reported.")
_EPOCHS = flags.DEFINE_list("epochs", ["1000", "20"], "Epochs per run for each size, in --sizes order.")
_DICT_EPOCHS = flags.DEFINE_list("dict_epochs", ["1000", "2"], "Epochs for the slow dict tracker, per size.")
_VERBOSE = flags.DEFINE_bool("verbose", False, "Show every training run's progress lines (logging at INFO).")

SIZES = {
    "default": {},
    # Tensors of 65,536 samples split well across threads: one per core.
    "large": {
        "problem.num_prompts": 100_000,
        "problem.num_params": 2**20,
        "sample_batch_size": 65_536,
        "num_threads": os.cpu_count() or 1,
    },
}


def main(argv):
    """Runs every method at every size and prints a Markdown table.

    Args:
        argv: leftover command-line arguments; there must be none.
    """
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if not _VERBOSE.value and not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # train() logs its progress at INFO
    print("| size | method | epochs | epochs per second | loop s |")
    print("| --- | --- | ---: | ---: | ---: |")
    with tempfile.TemporaryDirectory() as logdir:
        for size, epochs, dict_epochs in zip(_SIZES.value, _EPOCHS.value, _DICT_EPOCHS.value):
            for method in ("batch", "buffer", "ema", "dict (host, DDPO-style)"):
                config = configs.apply_overrides(_CONFIG.value, SIZES[size])
                config.stats_log.every = 0
                config.checkpoint_every = 0  # one checkpoint, at the end
                config.num_epochs = int(dict_epochs if method.startswith("dict") else epochs)
                config.log_every = config.num_epochs
                runs = []
                for _ in range(_REPEATS.value):
                    tracker = None
                    if method.startswith("dict"):
                        tracker = HostDictStatTracker(
                            config.problem.num_prompts,
                            config.stat_tracking.buffer_size,
                            config.stat_tracking.min_count,
                            device=training.resolve_device(config.device),
                        )
                    else:
                        config.stat_tracking.method = method
                    runs.append(training.train(config, logdir, tracker=tracker)["train_seconds"])
                seconds = statistics.median(runs)
                print(
                    f"| {size} | {method} | {config.num_epochs} | {config.num_epochs / seconds:,.1f} | {seconds:.3f} |",
                    flush=True,
                )


if __name__ == "__main__":
    app.run(main)
