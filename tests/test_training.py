"""Tests of the training loop, the config and the train.py script end to end."""

import csv
import filecmp
import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from rail_interview import checkpointing, stat_tracking, training
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


def _train_to(config, logdir, num_epochs, **kwargs):
    config = config.copy_and_resolve_references()
    config.num_epochs = num_epochs
    return training.train(config, str(logdir), **kwargs)


@pytest.mark.parametrize("stats_every", [1, 2, 3])
def test_resume_from_an_older_checkpoint_at_a_stats_chunk_boundary(tiny_config, tmp_path, stats_every):
    # tiny_config checkpoints every 14 epochs. With stats_log.every = 1 (the
    # default) or 2, epoch 14 is recorded and starts a stats chunk; with 3 the
    # first chunk after the checkpoint starts at epoch 15.
    tiny_config.stats_log.every = stats_every
    straight = _train_to(tiny_config, tmp_path / "straight", 30)
    run_dir = _train_to(tiny_config, tmp_path / "killed", 14)["run_dir"]
    checkpoint = os.path.join(run_dir, checkpointing.CHECKPOINT_FILE)
    saved = tmp_path / "checkpoint_at_14.pt"
    shutil.copy(checkpoint, saved)
    # Go on to epoch 28, then put the epoch-14 checkpoint back: as if killed
    # after the stats and metrics past epoch 14 were written.
    _train_to(training.load_run_config(run_dir), run_dir, 28, resume=True)
    first_chunk_after = 14 + (-14) % stats_every  # the first recorded epoch from 14 on
    assert pathlib.Path(run_dir, training.STATS_DIR, f"chunk_{first_chunk_after:09d}.npz").is_file()
    shutil.copy(saved, checkpoint)
    resumed = _train_to(training.load_run_config(run_dir), run_dir, 30, resume=True)
    assert resumed["final_reward"] == straight["final_reward"]
    for name in ("metrics.csv", checkpointing.CHECKPOINT_FILE):
        assert filecmp.cmp(os.path.join(straight["run_dir"], name), os.path.join(run_dir, name), shallow=False)
    stats_dirs = [os.path.join(d, training.STATS_DIR) for d in (straight["run_dir"], run_dir)]
    a, b = (stat_tracking.load_prompt_stats(d) for d in stats_dirs)
    assert a.step.tolist() == list(range(0, 30, stats_every))
    for field in ("step", "mean", "std", "count", "fallback", "batch_reward_mean", "batch_count"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field), err_msg=field)
    assert sorted(os.listdir(stats_dirs[0])) == sorted(os.listdir(stats_dirs[1]))


def test_create_run_dir_never_reuses_a_name(tmp_path):
    paths = [training.create_run_dir(str(tmp_path), "run") for _ in range(3)]
    assert [os.path.basename(p) for p in paths] == ["run", "run_1", "run_2"]


class ZeroAdvantageTracker(stat_tracking.BatchStatTracker):
    """A tracker that learns nothing: every advantage is 0, so the policy never moves."""

    def update(self, prompt_ids: torch.Tensor, rewards: torch.Tensor) -> torch.Tensor:
        super().update(prompt_ids, rewards)
        return torch.zeros_like(rewards)


@pytest.fixture(scope="module")
def default_runs(tmp_path_factory):
    """Final and first-epoch rewards of the default config (1000 epochs, seed 0) for every method.

    "none" is the same run with all-zero advantages: the policy keeps its
    initial parameters. About 0.2 s per run on a CPU.
    """
    logdir = tmp_path_factory.mktemp("default_runs")
    config = default.get_config()
    config.device = "cpu"
    runs = {}
    threads = torch.get_num_threads()
    # Same results on any number of threads; one is fastest for these small
    # tensors, and keeps the runs fast on a busy machine.
    torch.set_num_threads(1)
    try:
        for method in ("batch", "buffer", "ema", "none"):
            config.stat_tracking.method = "batch" if method == "none" else method
            tracker = ZeroAdvantageTracker(config.problem.num_prompts) if method == "none" else None
            summary = training.train(config, str(logdir), tracker=tracker)
            assert summary["method"] == config.stat_tracking.method and summary["num_epochs"] == 1000
            first_epoch = float(_read_metrics(summary["run_dir"])[0]["reward_mean"])
            runs[method] = (summary["final_reward"], first_epoch)
    finally:
        torch.set_num_threads(threads)
    return runs


@pytest.mark.parametrize("method", ["batch", "buffer", "ema"])
def test_every_method_trains(default_runs, method):
    # Measured on seed 0: none -75.9 (first epoch -68.0), batch -37.8,
    # buffer -5.0, ema -4.4. Any method learns: at least 20 better than not
    # learning at all, and than its own first epoch.
    final, first_epoch = default_runs[method]
    no_learning, _ = default_runs["none"]
    assert final > no_learning + 20 and final > first_epoch + 20, (final, first_epoch, no_learning)


@pytest.mark.parametrize("method", ["buffer", "ema"])
def test_per_prompt_methods_beat_the_batch_baseline(default_runs, method):
    # The point of the project (PROBLEM.md): per-prompt statistics turn a noisy
    # learner (about -40 here) into a good one (about -5).
    final, _ = default_runs[method]
    batch, _ = default_runs["batch"]
    assert final > batch + 20 and final > -15, (final, batch)


def test_unknown_method_and_device_are_refused(tiny_config, tmp_path):
    tiny_config.stat_tracking.method = "nope"
    with pytest.raises(
        ValueError,
        match="unknown config.stat_tracking.method 'nope'; choose from 'ddpo', 'trl_grpo', 'verl_grpo', "
        "'verl_rloo', 'flow_grpo', 'spo', 'buffer', 'ema', 'batch', 'grpo', 'dr_grpo', 'rloo'",
    ):
        training.train(tiny_config, str(tmp_path))
    with pytest.raises(ValueError, match="config.device"):
        training.resolve_device("tpu")


@pytest.mark.parametrize("method", ["verl_gdpo", "nemo_rl_gdpo", "flow_factory_gdpo", "verl_opo"])
def test_presets_of_several_rewards_or_weights_are_refused_by_name(tiny_config, tmp_path, method):
    # The toy problem gives one reward per sample and no response lengths: say so before any work.
    tiny_config.stat_tracking.method = method
    with pytest.raises(ValueError, match=f"method '{method}' takes several rewards per sample or sample weights"):
        training.train(tiny_config, str(tmp_path))
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize(
    "method, memory",
    [
        ("grpo", "none"),
        ("dr_grpo", "none"),
        ("rloo", "none"),
        ("grpo", "buffer"),
        ("rloo", "ema"),
    ],
)
def test_grpo_family_methods_train(tiny_config, tmp_path, method, memory):
    tiny_config.stat_tracking.method, tiny_config.stat_tracking.memory = method, memory
    summary = training.train(tiny_config, str(tmp_path))
    assert np.isfinite(summary["final_reward"]) and summary["method"] == method
    suffix = "" if memory == "none" else f"+{memory}"
    assert os.path.basename(summary["run_dir"]).endswith(f"_{method}{suffix}_seed0")
    fallback = [float(row["fallback_frac"]) for row in _read_metrics(summary["run_dir"])]
    if memory == "none":  # the singletons of each batch, not every sample (the tracker remembers nothing)
        assert max(fallback) < 0.5
    else:  # batch statistics until a prompt has min_count rewards
        assert fallback[0] == 1.0 and fallback[-1] == 0.0


def test_grpo_family_trackers_are_the_presets():
    config = default.get_config().stat_tracking
    config.method, config.memory = "dr_grpo", "none"
    tracker = training.build_tracker(config, num_prompts=4, device=torch.device("cpu"))
    assert (tracker.memory, tracker.baseline, tracker.scale, tracker.ddof, tracker.min_count, tracker.fallback) == (
        "none",
        "prompt_mean",
        "none",
        1,
        2,
        "zero",
    )
    config.method, config.memory, config.fallback = "rloo", "ema", "batch"
    tracker = training.build_tracker(config, num_prompts=4, device=torch.device("cpu"))
    assert (tracker.memory, tracker.baseline, tracker.scale, tracker.min_count, tracker.fallback) == (
        "ema",
        "leave_one_out",
        "none",
        config.min_count,
        "batch",
    )
    config.fallback = "median"
    with pytest.raises(
        ValueError,
        match=r"config.stat_tracking \(method 'rloo'\): fallback must be one of 'batch', 'raw', 'zero'; got 'median'",
    ):
        training.build_tracker(config, num_prompts=4, device=torch.device("cpu"))
    # In-batch GRPO with fallback "raw": verl's advantages; a singleton (prompt 2) keeps its raw reward.
    config.method, config.memory, config.fallback = "grpo", "none", "raw"
    tracker = training.build_tracker(config, num_prompts=4, device=torch.device("cpu"))
    advantages = tracker.update(torch.tensor([0, 0, 1, 2, 1]), torch.tensor([1.0, 0.0, 2.0, -3.0, 4.0]))
    stds = torch.tensor([0.5, 0.5, 2.0, 1.0, 2.0]).sqrt()  # sample stds of groups [1, 0] and [2, 4]; 1 for prompt 2
    expected = torch.tensor([0.5, -0.5, -1.0, -3.0, 1.0]) / stds
    torch.testing.assert_close(advantages, expected, rtol=1e-5, atol=1e-5)
    # metrics.csv's fallback_frac: the singleton alone (the tracker's own fallback_mask says every sample).
    ids = torch.tensor([0, 0, 1, 2, 1])
    assert training.fallback_mask(tracker, ids).tolist() == [False, False, False, True, False]


def test_unknown_memory_and_memory_with_a_non_grpo_method_are_refused(tiny_config, tmp_path):
    tiny_config.stat_tracking.method, tiny_config.stat_tracking.memory = "grpo", "lstm"
    with pytest.raises(
        ValueError, match="method 'grpo'\\): memory must be one of 'none', 'buffer', 'ema', 'beta'; got 'lstm'"
    ):
        training.train(tiny_config, str(tmp_path))
    tiny_config.stat_tracking.method, tiny_config.stat_tracking.memory = "buffer", "ema"
    with pytest.raises(ValueError, match="memory='ema' does not apply to method 'buffer'.*'grpo', 'dr_grpo', 'rloo'"):
        training.train(tiny_config, str(tmp_path))
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("method", ["buffer", "ema", "batch", "trl_grpo"])
def test_a_fallback_is_refused_by_a_method_that_has_its_own(tiny_config, method):
    """No option is silently ignored: "auto" (the method's own) is the only fallback these take from the config."""
    tiny_config.stat_tracking.method, tiny_config.stat_tracking.fallback = method, "zero"
    with pytest.raises(
        training.ConfigError, match=f"fallback='zero' does not apply to method '{method}'.*leave it 'auto'"
    ):
        training.validate_config(tiny_config)
    tiny_config.stat_tracking.fallback = "auto"
    training.validate_config(tiny_config)


def test_any_registered_preset_is_a_method_and_gets_the_fields_its_signature_names(tiny_config):
    tiny_config.stat_tracking.method, tiny_config.stat_tracking.buffer_size = "ddpo", 8
    tiny_config.stat_tracking.min_count = 4
    tracker = training.build_tracker(tiny_config.stat_tracking, num_prompts=4, device=torch.device("cpu"))
    assert (tracker.memory, tracker.buffer_size if hasattr(tracker, "buffer_size") else 8, tracker.min_count) == (
        "buffer",
        8,
        4,
    )
    tiny_config.stat_tracking.method = "no_such_method"
    with pytest.raises(training.ConfigError, match="unknown config.stat_tracking.method 'no_such_method'; choose from"):
        training.validate_config(tiny_config)


def test_default_config_matches_the_command_line_contract():
    config = default.get_config()
    assert config.num_epochs == 1000 and config.sample_batch_size == 256 and config.seed == 0
    assert config.problem.num_prompts == 64 and config.problem.num_params == 1024
    assert config.device == "auto" and config.stat_tracking.method == "buffer"
    assert config.stat_tracking.buffer_size == 32 and config.stat_tracking.min_count == 16
    assert config.stat_tracking.memory == "none"


def _run_script(*args: str, cwd: pathlib.Path, threads: int = 0) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads)) if threads else None
    return subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "train.py"), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )


def test_train_script_end_to_end(tmp_path):
    # The default run (buffer tracker, 1000 epochs), on the CPU and seed 2; one
    # thread (same result) keeps it near half a second on a busy machine.
    result = _run_script(f"--logdir={tmp_path}", "--config.device=cpu", "--config.seed=2", cwd=tmp_path, threads=1)
    assert result.returncode == 0, result.stderr
    (run_dir,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["seed"] == 2 and summary["num_epochs"] == 1000 and summary["method"] == "buffer"
    rows = _read_metrics(str(run_dir))
    assert len(rows) == 1000
    # Measured: first epoch -78.4, final -5.8 (the batch baseline: -38.4).
    first_epoch = float(rows[0]["reward_mean"])
    assert first_epoch < -50 and summary["final_reward"] > -20, (first_epoch, summary["final_reward"])
    assert f"final_reward {summary['final_reward']:.2f}" in result.stdout and "epochs/s" in result.stderr


def test_train_script_refuses_a_mistyped_override(tmp_path):
    result = _run_script(f"--logdir={tmp_path}", "--config.num_epoch=5", cwd=tmp_path)
    assert result.returncode != 0
    assert "num_epoch" in result.stderr
    assert not any(tmp_path.iterdir())


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_train_on_cuda(tiny_config, tmp_path):
    tiny_config.device = "cuda"
    assert training.train(tiny_config, str(tmp_path))["device"].startswith("cuda")
