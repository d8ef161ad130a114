"""What the pass/fail training tests share: the config they shorten, and the metrics a run writes."""

import csv
import os
from typing import Dict, List

import ml_collections

from rail_interview.configs import pass_fail


def short_config() -> ml_collections.ConfigDict:
    """The pass/fail config, shortened to 40 epochs on the CPU (logs every 10, checkpoints every 20)."""
    config = pass_fail.get_config()
    config.device, config.num_epochs, config.log_every, config.checkpoint_every = "cpu", 40, 10, 20
    return config


def metrics(run_dir: str) -> List[Dict[str, str]]:
    """The rows of a run's metrics.csv, as dicts of strings."""
    with open(os.path.join(run_dir, "metrics.csv"), newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))
