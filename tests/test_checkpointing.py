"""Checkpoints and resume: exact continuation, atomic writes, refusal of bad files."""

import filecmp
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from rail_interview import checkpointing, training
from rail_interview.stat_tracking import load_prompt_stats

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture
def config(tiny_config):
    tiny_config.log_every = 10
    tiny_config.checkpoint_every = 20
    tiny_config.stats_log.every = 3
    return tiny_config


def _train(config, logdir, num_epochs, **kwargs):
    config = config.copy_and_resolve_references()
    config.num_epochs = num_epochs
    return training.train(config, str(logdir), **kwargs)


def _assert_same_run(first: str, second: str) -> None:
    for name in ("metrics.csv", "config.json", "checkpoint.pt"):
        assert filecmp.cmp(os.path.join(first, name), os.path.join(second, name), shallow=False), name
    a, b = load_prompt_stats(os.path.join(first, "stats")), load_prompt_stats(os.path.join(second, "stats"))
    for field in ("step", "mean", "std", "count", "fallback", "batch_reward_mean", "batch_count"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field), err_msg=field)
    assert sorted(os.listdir(os.path.join(first, "stats"))) == sorted(os.listdir(os.path.join(second, "stats")))


def test_resumed_run_equals_a_straight_run_bit_for_bit(config, tmp_path):
    straight = _train(config, tmp_path / "straight", 100)
    first = _train(config, tmp_path / "resumed", 60)
    resumed = _train(
        training.load_run_config(first["run_dir"], {"num_epochs": 100}), first["run_dir"], 100, resume=True
    )
    assert resumed["run_dir"] == first["run_dir"]
    assert resumed["final_reward"] == straight["final_reward"]
    _assert_same_run(straight["run_dir"], resumed["run_dir"])
    params = [
        checkpointing.load_checkpoint(os.path.join(s["run_dir"], "checkpoint.pt"), ["params"])["params"]
        for s in (straight, resumed)
    ]
    assert torch.equal(params[0], params[1])


def test_a_run_killed_after_a_checkpoint_drops_what_it_logged_past_it(config, tmp_path):
    straight = _train(config, tmp_path / "straight", 100)
    run_dir = _train(config, tmp_path / "killed", 40)["run_dir"]
    saved = tmp_path / "checkpoint_at_40.pt"
    shutil.copy(os.path.join(run_dir, "checkpoint.pt"), saved)
    # Go on to 60, then put the epoch-40 checkpoint back: as if killed between
    # epochs 40 and 60 after metrics and stats up to 60 were written.
    _train(training.load_run_config(run_dir), run_dir, 60, resume=True)
    shutil.copy(saved, os.path.join(run_dir, "checkpoint.pt"))
    resumed = _train(training.load_run_config(run_dir), run_dir, 100, resume=True)
    assert resumed["final_reward"] == straight["final_reward"]
    _assert_same_run(straight["run_dir"], run_dir)


def test_interrupted_checkpoint_write_leaves_the_previous_one(config, tmp_path, monkeypatch):
    run_dir = _train(config, tmp_path, 20)["run_dir"]
    path = os.path.join(run_dir, "checkpoint.pt")
    before = pathlib.Path(path).read_bytes()

    def killed_mid_write(payload, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", killed_mid_write)
    with pytest.raises(KeyboardInterrupt):
        checkpointing.save_checkpoint(path, {"epoch": 99})
    monkeypatch.undo()
    assert pathlib.Path(path).read_bytes() == before
    assert checkpointing.load_checkpoint(path, ["epoch"])["epoch"] == 20
    resumed = _train(training.load_run_config(run_dir), run_dir, 40, resume=True)
    assert resumed["num_epochs"] == 40


def test_corrupt_missing_and_unsafe_checkpoints_are_refused(config, tmp_path):
    run_dir = _train(config, tmp_path, 20)["run_dir"]
    path = os.path.join(run_dir, "checkpoint.pt")
    with pytest.raises(checkpointing.CheckpointError, match="no checkpoint"):
        checkpointing.load_checkpoint(os.path.join(run_dir, "nope.pt"), [])
    pathlib.Path(path).write_bytes(pathlib.Path(path).read_bytes()[:100])
    with pytest.raises(checkpointing.CheckpointError, match="corrupt"):
        _train(training.load_run_config(run_dir), run_dir, 40, resume=True)
    torch.save({"format": 1, "epoch": 20, "evil": pathlib.Path("/")}, path)  # not plain data
    with pytest.raises(checkpointing.CheckpointError, match="not plain data"):
        checkpointing.load_checkpoint(path, ["epoch"])
    torch.save({"format": 7}, path)
    with pytest.raises(checkpointing.CheckpointError, match="format 1"):
        checkpointing.load_checkpoint(path, [])


def test_checkpoint_of_another_config_is_refused(config, tmp_path):
    run_dir = _train(config, tmp_path / "run", 20)["run_dir"]
    # A resume that changes the config is refused by the field's name, before the checkpoint is read.
    bigger = training.load_run_config(run_dir, {"problem.num_params": 64, "num_epochs": 40})
    with pytest.raises(training.ConfigError, match=r"cannot change config\.problem\.num_params \(32 -> 64\)"):
        training.train(bigger, run_dir, resume=True)
    # A checkpoint brought from a run of another config is refused by what does not fit.
    for name, value, message in (
        ("problem.num_params", 64, "parameters of shape"),
        ("stat_tracking.method", "ema", "does not fit this run's tracker"),
    ):
        other = config.copy_and_resolve_references()
        section, field = name.split(".")
        other[section][field] = value
        other_dir = _train(other, tmp_path / f"other_{field}", 20)["run_dir"]
        shutil.copy(os.path.join(other_dir, "checkpoint.pt"), os.path.join(run_dir, "checkpoint.pt"))
        with pytest.raises(checkpointing.CheckpointError, match=message):
            training.train(training.load_run_config(run_dir, {"num_epochs": 40}), run_dir, resume=True)


def test_checkpoint_every_must_align_with_metric_flushes(config, tmp_path):
    config.checkpoint_every = 15
    with pytest.raises(ValueError, match="multiple of config.log_every"):
        training.train(config, str(tmp_path))


def test_resume_from_the_command_line(tmp_path):
    def run(*args):
        result = subprocess.run(
            [sys.executable, str(REPO_ROOT / "scripts" / "train.py"), *args],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 0, result.stderr
        return result

    common = ["--config.device=cpu", "--config.log_every=10", "--config.checkpoint_every=10"]
    run(f"--logdir={tmp_path / 'a'}", "--config.num_epochs=30", "--config.seed=4", *common)
    run(f"--logdir={tmp_path / 'b'}", "--config.num_epochs=20", "--config.seed=4", *common)
    (resumed_dir,) = (tmp_path / "b").iterdir()
    run(f"--logdir={resumed_dir}", "--resume", "--config.num_epochs=30")  # seed 4 comes from the run's config
    (straight_dir,) = (tmp_path / "a").iterdir()
    assert filecmp.cmp(straight_dir / "metrics.csv", resumed_dir / "metrics.csv", shallow=False)
    missing = subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "train.py"), f"--logdir={tmp_path / 'nowhere'}", "--resume"],
        capture_output=True,
        text=True,
    )
    assert missing.returncode != 0 and "holds no config.json" in missing.stderr


def test_resume_from_a_final_checkpoint_between_metric_flushes(config, tmp_path):
    # The final checkpoint of a 15-epoch run sits mid-chunk (log_every = 10).
    straight = _train(config, tmp_path / "straight", 30)
    run_dir = _train(config, tmp_path / "short", 15)["run_dir"]
    resumed = _train(training.load_run_config(run_dir), run_dir, 30, resume=True)
    assert resumed["final_reward"] == straight["final_reward"]
    assert filecmp.cmp(
        os.path.join(straight["run_dir"], "metrics.csv"), os.path.join(run_dir, "metrics.csv"), shallow=False
    )
    a, b = (
        load_prompt_stats(os.path.join(straight["run_dir"], "stats")),
        load_prompt_stats(os.path.join(run_dir, "stats")),
    )
    np.testing.assert_array_equal(a.step, b.step)
    np.testing.assert_array_equal(a.mean, b.mean)


def test_resume_refuses_fewer_epochs_than_the_checkpoint(config, tmp_path):
    run_dir = _train(config, tmp_path, 20)["run_dir"]
    before = pathlib.Path(run_dir, "metrics.csv").read_bytes()
    with pytest.raises(checkpointing.CheckpointError, match="past config.num_epochs = 5"):
        _train(training.load_run_config(run_dir), run_dir, 5, resume=True)
    assert pathlib.Path(run_dir, "metrics.csv").read_bytes() == before


def test_resume_with_the_stats_log_turned_off_drops_stats_past_the_checkpoint(config, tmp_path):
    run_dir = _train(config, tmp_path, 40)["run_dir"]
    saved = tmp_path / "at40.pt"
    shutil.copy(os.path.join(run_dir, "checkpoint.pt"), saved)
    _train(training.load_run_config(run_dir), run_dir, 60, resume=True)
    shutil.copy(saved, os.path.join(run_dir, "checkpoint.pt"))
    _train(training.load_run_config(run_dir, {"stats_log.every": 0}), run_dir, 50, resume=True)
    assert load_prompt_stats(os.path.join(run_dir, "stats")).step.max() < 40
