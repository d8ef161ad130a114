"""Trains a toy policy-gradient problem; see rail_interview/training/loop.py.

Usage:
    python scripts/train.py                                   # default config
    python scripts/train.py --config=rail_interview/configs/pass_fail.py   # the pass/fail problem
    python scripts/train.py --config.stat_tracking.method=batch --config.seed=3
    python scripts/train.py --config.stat_tracking.method=rloo --config.stat_tracking.memory=ema
    python scripts/train.py --logdir=/tmp/runs --config.num_epochs=200
    python scripts/train.py --logdir=logs/<run> --resume --config.num_epochs=2000
    torchrun --nproc_per_node=2 scripts/train.py --config.num_epochs=50

The config is locked: a mistyped override such as ``--config.num_epoch=5`` is
an error. Each run writes a new directory under ``--logdir``. With
``--resume``, ``--logdir`` is a run directory: the run continues from its
latest checkpoint, with its own config plus the overrides given here, which
may change only ``training.RESUMABLE_FIELDS`` (num_epochs and the cadences).
A mistake in the config or the run directory ends with a one-line error.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from rail_interview import checkpointing, configs, distributed, training

_CONFIG = configs.define_config_flag("train.py", "Training config file.")
_LOGDIR = flags.DEFINE_string(
    "logdir",
    "logs",
    "Parent directory of the run directory this run creates; with --resume, the run directory to continue.",
)
_RESUME = flags.DEFINE_bool("resume", False, "Continue the run in --logdir from its latest checkpoint.")


def main(argv: list) -> None:
    """Runs training with the parsed config and prints the summary.

    Args:
        argv: leftover command-line arguments; there must be none.
    """
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    config = _CONFIG.value
    try:
        if _RESUME.value:
            overrides = config_flags.get_override_values(flags.FLAGS["config"])
            config = training.load_run_config(_LOGDIR.value, overrides)
        training.validate_config(config)
    except (training.ConfigError, checkpointing.CheckpointError, FileNotFoundError, KeyError) as error:
        sys.exit(f"train.py: error: {' '.join(str(error).split())}")
    context = distributed.init_from_environment(config.device)
    if not context.is_main:
        logging.set_verbosity(logging.WARNING)
    try:
        summary = training.train(config, _LOGDIR.value, resume=_RESUME.value)
    except (training.ConfigError, checkpointing.CheckpointError) as error:
        sys.exit(f"train.py: error: {error}")
    finally:
        distributed.shutdown()
    if not context.is_main:
        return
    method = training.method_name(config.stat_tracking)
    finals = "".join(
        f"  {name} {value:.3f}"
        for name, value in summary.items()
        if name.startswith(("final_", "mean_")) and name not in ("final_reward", "final_reward_epochs")
    )
    print(
        f"final_reward {summary['final_reward']:.2f}{finals}  ({method}, seed {summary['seed']}, "
        f"loop {summary['train_seconds']:.2f} s)  ->  {summary['run_dir']}"
    )


if __name__ == "__main__":
    app.run(main)
