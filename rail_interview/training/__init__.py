"""Training a problem's policy with a stat tracker: ``train(config, logdir) -> summary``.

The package, in the order a run meets it:

* ``config``: the config checked once (``validate_config``), the tracker it
  names built from the preset registry (``build_tracker``), resume rules;
* ``state``: the run's parts (``TrainingState``: problem, policy, tracker,
  generators, ranks) and what a checkpoint saves of them;
* ``step``: one training step, the one every run takes (``step``), with
  its hooks for how samples are drawn and advantages estimated;
* ``metrics``: the per-epoch metrics and the writer of metrics.csv;
* ``run_files``: the run directory's files, created or resumed as a transaction;
* ``loop``: ``train()``, a short loop over those parts.
"""

from rail_interview.training.config import (
    RESUMABLE_FIELDS,
    ConfigError,
    build_sampler,
    build_tracker,
    check_resume_config,
    load_run_config,
    memory_methods,
    method_name,
    resolve_device,
    validate_config,
)
from rail_interview.training.loop import train
from rail_interview.training.metrics import METRIC_NAMES, fallback_mask
from rail_interview.training.run_files import FINAL_REWARD_EPOCHS, STATS_DIR, TRAIN_TIME_FILE, create_run_dir
from rail_interview.training.state import TrainingState
from rail_interview.training.step import Batch, Samples, step

__all__ = [
    "Batch",
    "ConfigError",
    "FINAL_REWARD_EPOCHS",
    "METRIC_NAMES",
    "RESUMABLE_FIELDS",
    "STATS_DIR",
    "Samples",
    "TRAIN_TIME_FILE",
    "TrainingState",
    "build_tracker",
    "build_sampler",
    "check_resume_config",
    "create_run_dir",
    "fallback_mask",
    "load_run_config",
    "memory_methods",
    "method_name",
    "resolve_device",
    "step",
    "train",
    "validate_config",
]
