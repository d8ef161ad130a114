"""Installs rail_interview: a per-prompt reward stat tracker and its toy testbed."""

import pathlib

import setuptools

_HERE = pathlib.Path(__file__).parent

setuptools.setup(
    name="rail_interview",
    version="0.1.0",
    description=(
        "Tensor-native per-prompt reward stat tracking for policy-gradient RL, "
        "with a toy policy-gradient problem that shows why it matters."
    ),
    long_description=(_HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=setuptools.find_packages(include=["rail_interview", "rail_interview.*"]),
    # The library (rail_interview.stat_tracking) needs torch, unpinned so that
    # users keep the torch build (CPU or CUDA) they already have, and numpy,
    # in which the stats recorder writes its .npz chunks (and the ddpo-pytorch
    # drop-in takes and returns arrays).
    install_requires=["torch>=2.1", "numpy"],
    extras_require={
        # The toy problem's training, its config files and its plots (scripts/).
        "train": ["absl-py", "ml_collections", "matplotlib"],
        # hypothesis draws the random update sequences of tests/test_tracker_matrix.py;
        # ruff checks style and formatting (ruff.toml) before the tests run.
        "test": ["pytest", "hypothesis", "ruff"],
        # rail_interview.integrations.trl subclasses TRL's trainers and overrides private
        # methods, which a new minor version may move: the range is the one tested
        # (docs/trl.md). transformers, accelerate, datasets and tokenizers come with trl.
        "trl": ["trl>=1.16,<1.17"],
        # rail_interview.integrations.verl registers estimators through verl's own
        # register_adv_est. verl's ray_trainer imports cachetools, uvicorn and fastapi
        # without declaring them (docs/verl.md).
        "verl": ["verl>=0.9.1,<0.10", "cachetools", "uvicorn", "fastapi"],
    },
)
