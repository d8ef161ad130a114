"""Shared pytest fixtures, and the helper modules left out of collection where their trainer is missing."""

import importlib.util

import ml_collections
import pytest

from rail_interview.configs import default

# ``--doctest-modules`` imports every module under tests/; these helpers of the TRL tests import
# TRL's stack at the top (their test file skips, or fails under CI, on its own: integration_imports.py).
collect_ignore = ["trl_setup.py", "trl_processes.py"] if importlib.util.find_spec("trl") is None else []


@pytest.fixture
def tiny_config() -> ml_collections.ConfigDict:
    """The default config, shrunk to run in a fraction of a second on CPU."""
    config = default.get_config()
    config.device = "cpu"
    config.num_epochs = 30
    config.log_every = 7
    config.checkpoint_every = 14
    config.problem.num_prompts = 8
    config.problem.num_params = 32
    config.sample_batch_size = 32
    return config
