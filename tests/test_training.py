"""Tests of the training loop, the config and the train.py script end to end."""

import csv
import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

from rail_interview import training
from rail_interview.configs import default

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def _read_metrics(run_dir: str):
    with open(os.path.join(run_dir, "metrics.csv"), newline="") as f:
        return list(csv.DictReader(f))


def test_train_writes_a_complete_run(tiny_config, tmp_path):
    summary = training.train(tiny_config, str(tmp_path))
    run_dir = summary["run_dir"]
    assert os.path.dirname(run_dir) == str(tmp_path)
    rows = _read_metrics(run_dir)
    assert [int(row["epoch"]) for row in rows] == list(range(30))  # chunks of 7, last one partial
    assert set(rows[0]) == {"epoch", "reward_mean", "reward_std", "fallback_frac"}
    last = [float(row["reward_mean"]) for row in rows[-10:]]
    assert summary["final_reward"] == pytest.approx(sum(last) / 10)
    with open(os.path.join(run_dir, "summary.json")) as f:
        assert json.load(f) == summary
    assert summary["method"] == "buffer" and summary["seed"] == 0 and summary["train_seconds"] > 0
    fallback = [float(row["fallback_frac"]) for row in rows]
    assert fallback[0] == 1.0 and fallback[-1] == 0.0  # every prompt starts on batch stats
    with open(os.path.join(run_dir, "config.json")) as f:
        assert json.load(f)["problem"]["num_prompts"] == 8


def test_same_seed_same_result_other_seed_other_result(tiny_config, tmp_path):
    first = training.train(tiny_config, str(tmp_path))
    second = training.train(tiny_config, str(tmp_path))
    assert first["final_reward"] == second["final_reward"]
    assert _read_metrics(first["run_dir"]) == _read_metrics(second["run_dir"])
    tiny_config.seed = 1
    assert training.train(tiny_config, str(tmp_path))["final_reward"] != first["final_reward"]


def _tree(directory: str):
    return {str(p.relative_to(directory)): p.read_bytes() for p in pathlib.Path(directory).rglob("*") if p.is_file()}


def test_rerun_into_same_logdir_neither_mixes_nor_destroys(tiny_config, tmp_path):
    first = training.train(tiny_config, str(tmp_path))
    before = _tree(first["run_dir"])
    assert "stats/prompts.json" in before
    tiny_config.num_epochs = 5
    second = training.train(tiny_config, str(tmp_path))
    assert second["run_dir"] != first["run_dir"]
    assert _tree(first["run_dir"]) == before
    assert len(_read_metrics(second["run_dir"])) == 5


def test_create_run_dir_never_reuses_a_name(tmp_path):
    paths = [training.create_run_dir(str(tmp_path), "run") for _ in range(3)]
    assert [os.path.basename(p) for p in paths] == ["run", "run_1", "run_2"]


@pytest.mark.parametrize("method", ["batch", "buffer", "ema"])
def test_every_method_trains(tiny_config, tmp_path, method):
    tiny_config.stat_tracking.method = method
    tiny_config.stat_tracking.min_count = 2
    summary = training.train(tiny_config, str(tmp_path))
    assert summary["method"] == method and summary["final_reward"] < 0


def test_unknown_method_and_device_are_refused(tiny_config, tmp_path):
    tiny_config.stat_tracking.method = "nope"
    with pytest.raises(ValueError, match="unknown config.stat_tracking.method"):
        training.train(tiny_config, str(tmp_path))
    with pytest.raises(ValueError, match="config.device"):
        training.resolve_device("tpu")


def test_default_config_matches_the_command_line_contract():
    config = default.get_config()
    assert config.num_epochs == 1000 and config.sample_batch_size == 256 and config.seed == 0
    assert config.problem.num_prompts == 64 and config.problem.num_params == 1024
    assert config.device == "auto" and config.stat_tracking.method == "buffer"
    assert config.stat_tracking.buffer_size == 32 and config.stat_tracking.min_count == 16


def _run_script(*args: str, cwd: pathlib.Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "train.py"), *args],
        cwd=cwd, capture_output=True, text=True, timeout=300,
    )


def test_train_script_end_to_end(tmp_path):
    result = _run_script(
        f"--logdir={tmp_path}", "--config.num_epochs=20", "--config.log_every=10",
        "--config.device=cpu", "--config.seed=2", cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    (run_dir,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["seed"] == 2 and summary["num_epochs"] == 20
    assert summary["final_reward"] < 0
    assert "final_reward" in result.stdout and "epochs/s" in result.stderr


def test_train_script_refuses_a_mistyped_override(tmp_path):
    result = _run_script(f"--logdir={tmp_path}", "--config.num_epoch=5", cwd=tmp_path)
    assert result.returncode != 0
    assert "num_epoch" in result.stderr
    assert not any(tmp_path.iterdir())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_train_on_cuda(tiny_config, tmp_path):
    tiny_config.device = "cuda"
    assert training.train(tiny_config, str(tmp_path))["device"].startswith("cuda")
