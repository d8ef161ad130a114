"""Tests of the per-prompt stats log: recording, loading, partial logs, plotting."""

import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import torch

from rail_interview import stats_plots, training
from rail_interview.stat_tracking import (
    AdvantageTracker,
    BatchStatTracker,
    BufferStatTracker,
    EmaStatTracker,
    PromptStatsRecorder,
    load_prompt_stats,
    truncate_prompt_stats,
)

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def _drive(tracker, recorder, num_steps, seed=0):
    """Runs updates and recording; returns what stats() said after each step, and the batches."""
    generator = torch.Generator().manual_seed(seed)
    expected, batches = [], []
    for step in range(num_steps):
        ids = torch.randint(tracker.num_prompts, (12,), generator=generator)
        rewards = torch.randn(12, generator=generator) * 5 - 20
        tracker.update(ids, rewards)
        recorder.record(step, ids, rewards)
        expected.append(tracker.stats())
        batches.append((ids, rewards))
    recorder.flush()
    return expected, batches


@pytest.mark.parametrize(
    "make_tracker",
    [
        lambda: BufferStatTracker(num_prompts=6, buffer_size=4, min_count=3),
        lambda: EmaStatTracker(num_prompts=6, decay=0.6, min_count=3),
        lambda: BatchStatTracker(num_prompts=6),
    ],
    ids=["buffer", "ema", "batch"],
)
@pytest.mark.parametrize("recorded", [None, [4, 1, 5], [5, 0, 4, 1, 3, 2]], ids=["all", "subset", "all_reordered"])
def test_round_trip_what_was_recorded_is_what_loads(tmp_path, make_tracker, recorded):
    tracker = make_tracker()
    prompt_ids = torch.arange(6) if recorded is None else torch.tensor(recorded)
    names = [f"p{i}" for i in prompt_ids.tolist()]
    recorder = PromptStatsRecorder(str(tmp_path), tracker, prompt_ids, prompt_names=names, every=2, chunk_size=3)
    expected, batches = _drive(tracker, recorder, num_steps=15)
    log = load_prompt_stats(str(tmp_path))
    steps = list(range(0, 15, 2))
    assert log.step.tolist() == steps  # 8 recorded steps in chunks of 3, 3 and 2
    assert len(list(tmp_path.glob("chunk_*.npz"))) == 3
    assert log.prompt_ids.tolist() == prompt_ids.tolist() and log.prompt_names == names
    for row, step in enumerate(steps):
        stats = expected[step]
        np.testing.assert_allclose(log.mean[row], stats.mean[prompt_ids].numpy(), rtol=1e-6)
        np.testing.assert_allclose(log.std[row], stats.std[prompt_ids].numpy(), rtol=1e-5, atol=1e-6)
        assert log.count[row].tolist() == stats.count[prompt_ids].tolist()
        assert log.fallback[row].tolist() == stats.fallback[prompt_ids].tolist()
        ids, rewards = batches[step]
        for column, prompt in enumerate(prompt_ids.tolist()):
            mine = rewards[ids == prompt]
            assert log.batch_count[row, column] == len(mine)
            if len(mine):
                assert log.batch_reward_mean[row, column] == pytest.approx(mine.mean().item(), rel=1e-5)
            else:
                assert np.isnan(log.batch_reward_mean[row, column])
    for name in ("mean", "std", "batch_reward_mean"):
        assert getattr(log, name).dtype == np.float32
    assert log.count.dtype == np.int64 and log.fallback.dtype == bool


def test_every_prompt_in_another_order_is_recorded_under_its_own_id(tmp_path):
    # Every prompt, but not in id order: the columns follow prompt_ids, so the
    # recorder must not take the shortcut it takes for ids 0, 1, ..., P - 1.
    tracker = EmaStatTracker(num_prompts=2, decay=0.5, min_count=1)
    recorder = PromptStatsRecorder(str(tmp_path), tracker, torch.tensor([1, 0]), chunk_size=1)
    ids, rewards = torch.tensor([0, 0, 1]), torch.tensor([1.0, 3.0, 10.0])
    tracker.update(ids, rewards)
    recorder.record(0, ids, rewards)
    log = load_prompt_stats(str(tmp_path))
    assert log.prompt_ids.tolist() == [1, 0]
    assert log.mean[0].tolist() == [10.0, 2.0]  # prompt 1's mean, then prompt 0's
    assert log.count[0].tolist() == [1, 2] and log.batch_count[0].tolist() == [1, 2]
    assert log.batch_reward_mean[0].tolist() == [10.0, 2.0]


def test_chunks_load_with_numpy_alone(tmp_path):
    tracker = EmaStatTracker(num_prompts=3, decay=0.5, min_count=1)
    _drive(tracker, PromptStatsRecorder(str(tmp_path), tracker, torch.arange(3), chunk_size=4), num_steps=4)
    with np.load(tmp_path / "chunk_000000000.npz") as chunk:
        assert set(chunk.files) == {"step", "mean", "std", "count", "fallback", "batch_reward_mean", "batch_count"}
        assert chunk["mean"].shape == (4, 3)


def test_killed_run_loads_up_to_its_last_complete_chunk(tmp_path):
    tracker = BufferStatTracker(num_prompts=4, buffer_size=4, min_count=2)
    _drive(tracker, PromptStatsRecorder(str(tmp_path), tracker, torch.arange(4), chunk_size=5), num_steps=15)
    chunks = sorted(tmp_path.glob("chunk_*.npz"))
    assert len(chunks) == 3
    data = chunks[-1].read_bytes()
    chunks[-1].write_bytes(data[: len(data) // 2])  # killed while a copy was being written
    (tmp_path / "chunk_000000015.npz.tmp").write_bytes(b"half a chunk")  # killed mid-write
    with pytest.warns(UserWarning, match="unreadable chunk chunk_000000010"):
        log = load_prompt_stats(str(tmp_path))
    assert log.step.tolist() == list(range(10))


def test_missing_or_empty_logs_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no per-prompt stats log"):
        load_prompt_stats(str(tmp_path / "nowhere"))
    tracker = EmaStatTracker(num_prompts=2)
    PromptStatsRecorder(str(tmp_path), tracker, torch.arange(2))
    with pytest.raises(FileNotFoundError, match="no complete chunk"):
        load_prompt_stats(str(tmp_path))


def test_recorder_refuses_a_directory_that_holds_a_log_and_bad_prompt_ids(tmp_path):
    tracker = EmaStatTracker(num_prompts=3, decay=0.5, min_count=1)
    _drive(tracker, PromptStatsRecorder(str(tmp_path), tracker, torch.arange(3), chunk_size=2), num_steps=2)
    with pytest.raises(FileExistsError, match="already holds a stats log"):
        PromptStatsRecorder(str(tmp_path), tracker, torch.arange(3))
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        PromptStatsRecorder(str(tmp_path / "other"), tracker, torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="prompt_names"):
        PromptStatsRecorder(str(tmp_path / "other"), tracker, torch.arange(2), prompt_names=["a"])
    with pytest.raises(ValueError, match="must not repeat"):
        PromptStatsRecorder(str(tmp_path / "other"), tracker, torch.tensor([2, 2, 0]))
    with pytest.raises(ValueError, match="integer"):
        PromptStatsRecorder(str(tmp_path / "other"), tracker, torch.tensor([True, False]))
    with pytest.raises(ValueError, match="1-D integer"):
        PromptStatsRecorder(str(tmp_path / "other"), tracker, torch.tensor([[0, 1]]))
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        PromptStatsRecorder(str(tmp_path / "other"), tracker, torch.tensor([-1, 0]))
    with pytest.raises(TypeError, match="positional argument"):
        PromptStatsRecorder(str(tmp_path / "other"), tracker, torch.arange(3), None, 1)


def test_append_continues_a_log_of_the_same_prompts_only(tmp_path):
    tracker = EmaStatTracker(num_prompts=3, decay=0.5, min_count=1)
    _drive(tracker, PromptStatsRecorder(str(tmp_path), tracker, torch.arange(3), chunk_size=2), num_steps=4)
    with pytest.raises(ValueError, match="records other prompts"):
        PromptStatsRecorder(str(tmp_path), tracker, torch.arange(2), append=True)
    recorder = PromptStatsRecorder(str(tmp_path), tracker, torch.arange(3), append=True, chunk_size=2)
    generator = torch.Generator().manual_seed(1)
    for step in range(4, 6):
        ids, rewards = torch.randint(3, (5,), generator=generator), torch.randn(5, generator=generator)
        tracker.update(ids, rewards)
        recorder.record(step, ids, rewards)
    recorder.flush()
    assert load_prompt_stats(str(tmp_path)).step.tolist() == list(range(6))


def _chunk_names(directory):
    return sorted(path.name for path in directory.glob("chunk_*"))


def test_truncate_at_a_chunk_start_drops_that_chunk_and_the_later_ones(tmp_path):
    tracker = EmaStatTracker(num_prompts=3, decay=0.5, min_count=1)
    _drive(tracker, PromptStatsRecorder(str(tmp_path), tracker, torch.arange(3), chunk_size=3), num_steps=9)
    assert _chunk_names(tmp_path) == ["chunk_000000000.npz", "chunk_000000003.npz", "chunk_000000006.npz"]
    truncate_prompt_stats(str(tmp_path), 9)  # past the end: nothing to forget
    assert len(_chunk_names(tmp_path)) == 3
    (tmp_path / "chunk_000000009.npz.tmp").write_bytes(b"half a chunk")  # killed mid-write
    truncate_prompt_stats(str(tmp_path), 6)  # exactly where a chunk starts
    assert _chunk_names(tmp_path) == ["chunk_000000000.npz", "chunk_000000003.npz"]
    truncate_prompt_stats(str(tmp_path), 3)
    assert _chunk_names(tmp_path) == ["chunk_000000000.npz"]
    assert load_prompt_stats(str(tmp_path)).step.tolist() == [0, 1, 2]
    # The log continues from the truncation point as if never written past it.
    recorder = PromptStatsRecorder(str(tmp_path), tracker, torch.arange(3), chunk_size=3, append=True)
    for step in range(3, 5):
        recorder.record(step, torch.tensor([0, 1]), torch.tensor([1.0, 2.0]))
    recorder.flush()
    assert load_prompt_stats(str(tmp_path)).step.tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="spans step 4"):
        truncate_prompt_stats(str(tmp_path), 4)  # inside the chunk of steps 3 and 4
    truncate_prompt_stats(str(tmp_path), 0)
    assert _chunk_names(tmp_path) == []


def test_training_writes_a_loadable_log_bounded_by_the_config(tiny_config, tmp_path):
    tiny_config.stats_log.every = 3
    tiny_config.stats_log.max_prompts = 5
    run_dir = training.train(tiny_config, str(tmp_path))["run_dir"]
    log = load_prompt_stats(os.path.join(run_dir, "stats"))
    assert log.step.tolist() == list(range(0, 30, 3))
    assert log.mean.shape == (10, 5) and log.prompt_ids.tolist() == [0, 1, 2, 3, 4]
    assert log.fallback[0].all() and not log.fallback[-1].any()
    tiny_config.stats_log.every = 0
    run_dir = training.train(tiny_config, str(tmp_path))["run_dir"]
    assert not os.path.exists(os.path.join(run_dir, "stats"))


def test_choose_prompts_by_name_id_or_sample(tiny_config, tmp_path):
    run = stats_plots.load_run(training.train(tiny_config, str(tmp_path))["run_dir"])
    names = run.stats.prompt_names
    assert stats_plots.choose_prompts(run.stats, [names[3], "5"]) == [3, 5]
    sample = stats_plots.choose_prompts(run.stats, max_prompts=3, seed=1)
    assert len(sample) == 3 and sample == sorted(sample)
    assert stats_plots.choose_prompts(run.stats, max_prompts=100) == list(range(8))
    with pytest.raises(KeyError, match="not in the stats log"):
        stats_plots.choose_prompts(run.stats, ["no-such-prompt"])


def _plot(*args):
    return subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "plot_stats.py"), *args],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_plot_script_writes_the_png_for_one_and_for_two_runs(tiny_config, tmp_path):
    first = training.train(tiny_config, str(tmp_path / "runs"))["run_dir"]
    tiny_config.stat_tracking.method = "ema"
    second = training.train(tiny_config, str(tmp_path / "runs"))["run_dir"]
    result = _plot(f"--logdir={first}")
    assert result.returncode == 0, result.stderr
    assert pathlib.Path(first, "prompt_stats.png").read_bytes()[:4] == b"\x89PNG"
    result = _plot(f"--logdir={first},{second}", f"--out={tmp_path / 'both'}", "--max_prompts=3")
    assert result.returncode == 0, result.stderr
    assert "3 prompts, 2 run(s)" in result.stdout
    assert (tmp_path / "both" / "prompt_stats.png").is_file()


def test_plot_script_explains_a_missing_or_empty_directory(tmp_path):
    result = _plot(f"--logdir={tmp_path / 'nowhere'}")
    assert result.returncode != 0 and "is not a run directory" in result.stderr
    (tmp_path / "empty").mkdir()
    result = _plot(f"--logdir={tmp_path / 'empty'}")
    assert result.returncode != 0 and "is not a run directory" in result.stderr


def test_truncate_refuses_a_step_inside_a_chunk_of_several_steps(tmp_path):
    tracker = BufferStatTracker(num_prompts=3, buffer_size=4, min_count=2)
    _drive(tracker, PromptStatsRecorder(str(tmp_path), tracker, torch.arange(3), chunk_size=4), num_steps=8)
    (tmp_path / "chunk_000000001.npz.tmp").write_bytes(b"half a chunk")  # sorts before the chunks it must not hide
    with pytest.raises(ValueError, match="spans step 3"):
        truncate_prompt_stats(str(tmp_path), 3)  # the first chunk holds steps 0 to 3
    truncate_prompt_stats(str(tmp_path), 4)
    assert _chunk_names(tmp_path) == ["chunk_000000000.npz"]


def test_loading_stops_at_an_unreadable_chunk_in_the_middle(tmp_path):
    # The steps after a gap would be misread as following on: stop, do not skip.
    tracker = BufferStatTracker(num_prompts=4, buffer_size=4, min_count=2)
    _drive(tracker, PromptStatsRecorder(str(tmp_path), tracker, torch.arange(4), chunk_size=5), num_steps=15)
    (tmp_path / "chunk_000000005.npz").write_bytes(b"not a chunk")
    with pytest.warns(UserWarning, match="unreadable chunk chunk_000000005"):
        log = load_prompt_stats(str(tmp_path))
    assert log.step.tolist() == list(range(5))


def test_recorder_writes_a_chunk_every_100_steps_by_default(tmp_path):
    tracker = BatchStatTracker(num_prompts=2)
    recorder = PromptStatsRecorder(str(tmp_path), tracker, torch.arange(2))
    for step in range(201):
        recorder.record(step, torch.tensor([0, 1]), torch.tensor([1.0, 2.0]))
    assert _chunk_names(tmp_path) == ["chunk_000000000.npz", "chunk_000000100.npz"]  # step 200 not yet written


def test_a_tracker_of_several_rewards_is_refused_with_the_reason(tmp_path):
    tracker = AdvantageTracker(3, "buffer", buffer_size=4, num_rewards=2, aggregation="normalize_then_sum")
    with pytest.raises(ValueError, match="one reward per prompt and step; this tracker takes 2 per sample"):
        PromptStatsRecorder(str(tmp_path), tracker, torch.arange(3))
    assert not list(tmp_path.iterdir())
