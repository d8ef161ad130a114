"""Shared pytest fixtures."""

import ml_collections
import pytest

from rail_interview.configs import default


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
