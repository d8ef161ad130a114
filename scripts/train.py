"""Trains the toy policy-gradient problem; see rail_interview/training.py.

Usage:
    python scripts/train.py                                   # default config
    python scripts/train.py --config.stat_tracking.method=batch --config.seed=3
    python scripts/train.py --logdir=/tmp/runs --config.num_epochs=200

The config is locked: a mistyped override such as ``--config.num_epoch=5`` is
an error. Each run writes a new directory under ``--logdir``.
"""

from absl import app, flags
from ml_collections import config_flags

from rail_interview import configs, training

_CONFIG = config_flags.DEFINE_config_file(
    "config", configs.DEFAULT_CONFIG_PATH, "Training config file.", lock_config=True
)
_LOGDIR = flags.DEFINE_string("logdir", "logs", "Parent directory of the run directory this run creates.")


def main(argv: list) -> None:
    """Runs training with the parsed config and prints the summary.

    Args:
        argv: leftover command-line arguments; there must be none.
    """
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    summary = training.train(_CONFIG.value, _LOGDIR.value)
    print(f"final_reward {summary['final_reward']:.2f}  ({summary['method']}, seed {summary['seed']}, "
          f"loop {summary['train_seconds']:.2f} s)  ->  {summary['run_dir']}")


if __name__ == "__main__":
    app.run(main)
