"""Tests of what scripts/plot_stats.py accepts: runs of one problem only, and any log PromptStatsRecorder wrote."""

import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

from rail_interview import stats_plots, training
from rail_interview.stat_tracking import EmaStatTracker, PromptStatsRecorder

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def _train(config, logdir, **fields):
    """Trains a tiny run with config fields set (``problem__num_prompts=16``: problem.num_prompts); returns its dir."""
    for name, value in fields.items():
        section = config
        *parents, leaf = name.split("__")
        for parent in parents:
            section = section[parent]
        section[leaf] = value
    return training.train(config, str(logdir))["run_dir"]


def _own_trainer_log(directory, *, num_prompts=8, prompt_ids=(0, 1, 2, 3), prompt_names=None, num_steps=10):
    """Records a stats log with PromptStatsRecorder as one's own trainer would: no metrics.csv, no config.json."""
    tracker = EmaStatTracker(num_prompts=num_prompts, decay=0.5, min_count=2)
    recorder = PromptStatsRecorder(
        str(directory), tracker, torch.tensor(prompt_ids), prompt_names=prompt_names, chunk_size=4
    )
    generator = torch.Generator().manual_seed(0)
    for step in range(num_steps):
        ids = torch.randint(num_prompts, (16,), generator=generator)
        rewards = torch.randn(16, generator=generator) * 5 - 20
        tracker.update(ids, rewards)
        recorder.record(step, ids, rewards)
    recorder.flush()
    return str(directory)


def _names(run_dir):
    with open(os.path.join(run_dir, training.STATS_DIR, "prompts.json"), encoding="utf-8") as f:
        return json.load(f)["prompt_names"]


def _plot(*args):
    return subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "plot_stats.py"), *args],
        capture_output=True,
        text=True,
        timeout=300,
    )


def _one_line_error(result):
    """The error line of a failed run of the script, checked to be one line and no traceback."""
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("error: "), result.stderr
    return lines[-1]


# Finding 3: overlaid runs must be of one problem, and are matched by prompt name.


def test_runs_of_other_seeds_are_refused_not_drawn_under_the_first_runs_names(tiny_config, tmp_path):
    seed0 = stats_plots.load_run(_train(tiny_config, tmp_path, seed=0))
    seed3 = stats_plots.load_run(_train(tiny_config, tmp_path, seed=3))
    # Same prompt ids, other prompts: id 0 is fierce-otter in one and odd-bear in the other.
    assert seed0.stats.prompt_ids.tolist() == seed3.stats.prompt_ids.tolist()
    assert seed0.stats.prompt_names[0] != seed3.stats.prompt_names[0]
    with pytest.raises(ValueError, match="different problems") as caught:
        stats_plots.plot_prompt_stats([seed0, seed3], [0, 1], str(tmp_path / "p.png"))
    assert isinstance(caught.value, stats_plots.RunMismatchError)  # which the script reports in one line
    message = str(caught.value)
    assert seed0.run_dir in message and seed3.run_dir in message and "seed 0 vs 3" in message
    assert repr(seed0.stats.prompt_names[0]) in message and repr(seed3.stats.prompt_names[0]) in message
    assert not (tmp_path / "p.png").exists()


def test_same_seed_with_another_problem_config_is_refused_although_names_coincide(tiny_config, tmp_path):
    # The names are drawn first, so 8 and 16 prompts of seed 0 share the first 8 names; slots and labels differ.
    small = stats_plots.load_run(_train(tiny_config, tmp_path, problem__num_prompts=8))
    large = stats_plots.load_run(_train(tiny_config, tmp_path, problem__num_prompts=16))
    assert large.stats.prompt_names[:8] == small.stats.prompt_names
    with pytest.raises(ValueError, match="problem.num_prompts 8 vs 16"):
        stats_plots.plot_prompt_stats([small, large], [0, 1], str(tmp_path / "p.png"))
    assert not (tmp_path / "p.png").exists()


def test_a_recorder_log_naming_prompts_by_id_is_refused_next_to_a_training_run(tiny_config, tmp_path):
    run = stats_plots.load_run(_train(tiny_config, tmp_path / "runs"))
    own = stats_plots.load_run(_own_trainer_log(tmp_path / "own"))  # names "0", "1", ...: no config to compare
    with pytest.raises(ValueError, match=r"id 0 is '.+' in the first and '0' in the second"):
        stats_plots.plot_prompt_stats([run, own], [0, 1], str(tmp_path / "p.png"))


def test_plot_script_refuses_runs_of_two_seeds_in_one_line(tiny_config, tmp_path):
    seed0 = _train(tiny_config, tmp_path, seed=0)
    seed3 = _train(tiny_config, tmp_path, seed=3)
    line = _one_line_error(_plot(f"--logdir={seed0},{seed3}", f"--out={tmp_path / 'out'}"))
    assert "different problems" in line and seed0 in line and seed3 in line and "seed 0 vs 3" in line
    assert not (tmp_path / "out" / "prompt_stats.png").exists()


def test_plot_script_overlays_runs_of_one_problem_on_the_prompts_all_recorded(tiny_config, tmp_path):
    # Same problem, the second run records only its first 4 prompts, under the same names.
    full = _train(tiny_config, tmp_path)
    part = _train(tiny_config, tmp_path, stats_log__max_prompts=4, stat_tracking__method="ema")
    assert _names(part) == _names(full)[:4]
    result = _plot(f"--logdir={full},{part}", f"--out={tmp_path / 'out'}")
    assert result.returncode == 0, result.stderr
    assert "4 prompts, 2 run(s)" in result.stdout
    assert (tmp_path / "out" / "prompt_stats.png").is_file()
    line = _one_line_error(_plot(f"--logdir={full},{part}", f"--prompts={_names(full)[6]}"))
    assert "not recorded by every run" in line and _names(full)[6] in line


# Finding 4: any log PromptStatsRecorder wrote is accepted; errors point at what exists.


def test_load_run_reads_a_recorder_directory_without_metrics(tmp_path):
    own = _own_trainer_log(tmp_path / "mine", prompt_names=["a", "b", "c", "d"])
    run = stats_plots.load_run(own)
    assert run.stats.prompt_names == ["a", "b", "c", "d"] and run.stats.step.tolist() == list(range(10))
    assert run.epoch is None and run.reward_mean is None and run.config is None and run.label == "mine"
    assert stats_plots.metrics_notes([run]) == [
        f"note: {own!r} has no metrics.csv (a stats log written by PromptStatsRecorder): its batch-mean reward "
        "curve is left out, its per-prompt panels are drawn"
    ]


def test_load_run_of_a_runs_stats_folder_loads_the_whole_run(tiny_config, tmp_path):
    run_dir = _train(tiny_config, tmp_path)
    whole, folder = stats_plots.load_run(run_dir), stats_plots.load_run(os.path.join(run_dir, "stats"))
    assert folder.label == whole.label == "buffer, seed 0" and folder.config == whole.config
    assert folder.epoch.tolist() == whole.epoch.tolist() == list(range(30))
    assert stats_plots.metrics_notes([folder]) == []


def test_plot_script_draws_a_recorder_directory_alone_and_next_to_a_run(tiny_config, tmp_path):
    run_dir = _train(tiny_config, tmp_path / "runs")
    # One's own trainer on the same problem, recording 3 of its prompts under their names.
    own = _own_trainer_log(tmp_path / "own", prompt_ids=(5, 1, 2), prompt_names=[_names(run_dir)[i] for i in (5, 1, 2)])
    result = _plot(f"--logdir={own}")
    assert result.returncode == 0, result.stderr
    assert "no metrics.csv" in result.stdout and "3 prompts, 1 run(s)" in result.stdout
    assert pathlib.Path(own, "prompt_stats.png").read_bytes()[:4] == b"\x89PNG"
    result = _plot(f"--logdir={run_dir},{own}", f"--out={tmp_path / 'both'}")
    assert result.returncode == 0, result.stderr
    assert "3 prompts, 2 run(s)" in result.stdout
    notes = [line for line in result.stdout.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and own in notes[0]
    assert (tmp_path / "both" / "prompt_stats.png").is_file()


def test_load_run_errors_name_what_the_directory_holds(tiny_config, tmp_path):
    run_dir = _train(tiny_config, tmp_path, stats_log__every=0)
    stats_dir = os.path.join(run_dir, "stats")
    with pytest.raises(FileNotFoundError) as caught:
        stats_plots.load_run(run_dir)
    message = str(caught.value)
    assert "has no per-prompt stats log" in message and "stats_log.every=0" in message
    assert "point at" not in message  # not sent to stats/, which does not exist
    with pytest.raises(FileNotFoundError, match="has no per-prompt stats log: .*stats_log.every=0"):
        stats_plots.load_run(stats_dir)  # the stats/ it lacks: the same answer, not "does not exist"
    with pytest.raises(FileNotFoundError, match="is not a run directory or a stats log: it does not exist"):
        stats_plots.load_run(str(tmp_path / "nowhere"))
    os.mkdir(stats_dir)  # a stats folder without its prompts.json
    with pytest.raises(FileNotFoundError, match=r"has no per-prompt stats log: .*stats holds no prompts.json"):
        stats_plots.load_run(run_dir)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds neither metrics.csv nor prompts.json"):
        stats_plots.load_run(str(tmp_path / "empty"))


def test_plot_script_explains_a_run_without_stats_log_in_one_line(tiny_config, tmp_path):
    run_dir = _train(tiny_config, tmp_path, stats_log__every=0)
    line = _one_line_error(_plot(f"--logdir={run_dir}"))
    assert "has no per-prompt stats log" in line and "stats_log.every=0" in line
    line = _one_line_error(_plot(f"--logdir={os.path.join(run_dir, 'stats')}"))  # where the old error pointed
    assert "has no per-prompt stats log" in line and "stats_log.every=0" in line
