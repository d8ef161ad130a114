"""A resume is a transaction: it checks everything first, refuses by name, and corrupts nothing.

Also the summary's fields over a resume, the thread setting, the one-line
errors of train.py, agreement between ranks on a failed checkpoint load, and
runs killed with SIGKILL at random moments, resumed until done, against a
straight run, byte for byte.
"""

import filecmp
import glob
import json
import os
import pathlib
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist

from rail_interview import checkpointing, training
from rail_interview.configs import default
from spawned_ranks import run_ranks

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "scripts" / "train.py"


@pytest.fixture
def config(tiny_config):
    tiny_config.log_every = 10
    tiny_config.checkpoint_every = 20
    tiny_config.stats_log.every = 1
    return tiny_config


def _train(config, logdir, num_epochs, **overrides):
    config = config.copy_and_resolve_references()
    config.num_epochs = num_epochs
    for name, value in overrides.items():
        section, _, field = name.rpartition(".")
        (config[section] if section else config)[field] = value
    return training.train(config, str(logdir))


def _resume(run_dir, **overrides):
    return training.train(training.load_run_config(run_dir, overrides), run_dir, resume=True)


def _snapshot(run_dir):
    """Every file of a run directory, by relative path, as bytes."""
    files = {}
    for path in sorted(glob.glob(os.path.join(run_dir, "**"), recursive=True)):
        if os.path.isfile(path):
            with open(path, "rb") as f:
                files[os.path.relpath(path, run_dir)] = f.read()
    return files


def test_a_refused_resume_writes_nothing_and_names_the_field(config, tmp_path):
    run_dir = _train(config, tmp_path, 40)["run_dir"]
    before = _snapshot(run_dir)
    with pytest.raises(
        training.ConfigError, match=r"cannot change config\.seed \(0 -> 3\).*may change only num_epochs"
    ):
        _resume(run_dir, seed=3, num_epochs=60)
    assert _snapshot(run_dir) == before  # config.json still says seed 0 and 40 epochs
    assert _resume(run_dir, num_epochs=60)["num_epochs"] == 60  # a plain resume goes on


def test_a_resume_that_changes_the_problem_is_refused_with_the_stats_log_off(config, tmp_path):
    run_dir = _train(config, tmp_path, 40, **{"stats_log.every": 0})["run_dir"]
    for field, value in (
        ("seed", 3),
        ("learning_rate", 0.5),
        ("stat_tracking.method", "ema"),
        ("problem.num_prompts", 9),
    ):
        with pytest.raises(training.ConfigError, match=rf"cannot change config\.{field.replace('.', '[.]')}"):
            _resume(run_dir, num_epochs=60, **{field: value})
    # What cannot change the result may change.
    summary = _resume(
        run_dir, num_epochs=60, log_every=20, checkpoint_every=40, num_threads=2, **{"stats_log.every": 2}
    )
    assert summary["num_epochs"] == 60 and summary["resumed_at_epoch"] == 40


def test_a_damaged_stats_chunk_before_the_checkpoint_is_named_and_one_after_it_is_redone(config, tmp_path):
    straight = _train(config, tmp_path / "straight", 60)["run_dir"]
    run_dir = _train(config, tmp_path / "damaged", 60)["run_dir"]
    chunks = sorted(glob.glob(os.path.join(run_dir, "stats", "chunk_*.npz")))
    # With the checkpoint put back at epoch 40 (as if killed after logging past it), the chunks
    # from epoch 40 on are recomputed, whatever their state: a damaged last chunk is redone.
    copy = _copy_run(run_dir, tmp_path / "copy")
    _set_checkpoint(config, copy, tmp_path, 40)
    with open(sorted(glob.glob(os.path.join(copy, "stats", "chunk_*.npz")))[-1], "wb") as f:
        f.write(b"not a zip file")
    _resume(copy, num_epochs=60)
    _assert_same_files(straight, copy)
    # A chunk before the checkpoint cannot be redone: refused, naming it, nothing written.
    with open(chunks[0], "wb") as f:
        f.write(b"PK\x03\x04 truncated")
    _set_checkpoint(config, run_dir, tmp_path, 40)
    before = _snapshot(run_dir)
    with pytest.raises(
        checkpointing.CheckpointError, match=rf"stats chunk .*{os.path.basename(chunks[0])} cannot be read"
    ):
        _resume(run_dir, num_epochs=60)
    assert _snapshot(run_dir) == before


def test_a_truncated_metrics_file_is_refused_by_name_or_redone(config, tmp_path):
    straight = _train(config, tmp_path / "straight", 60)["run_dir"]
    run_dir = _copy_run(_train(config, tmp_path / "run", 60)["run_dir"], tmp_path / "copy")
    _set_checkpoint(config, run_dir, tmp_path, 40)
    metrics = os.path.join(run_dir, "metrics.csv")
    with open(metrics, encoding="utf-8") as f:
        text = f.read()
    # Killed mid-append past the checkpoint: a partial last line, redone.
    with open(metrics, "w", encoding="utf-8") as f:
        f.write(text[: text.index("\n45,") + 6])
    _resume(run_dir, num_epochs=60)
    _assert_same_files(straight, run_dir)
    # Rows before the checkpoint lost: refused, naming the file.
    _set_checkpoint(config, run_dir, tmp_path, 40)
    with open(metrics, "w", encoding="utf-8") as f:
        f.write(text[: text.index("\n30,") + 1])
    with pytest.raises(checkpointing.CheckpointError, match=r"metrics\.csv holds epochs 0 to 29 only"):
        _resume(run_dir, num_epochs=60)


def _copy_run(run_dir, destination):
    import shutil  # pylint: disable=import-outside-toplevel

    shutil.copytree(run_dir, destination)
    return str(destination)


def _set_checkpoint(config, run_dir, tmp_path, epoch):
    """Puts the checkpoint (and train_time.json) of a fresh run at ``epoch`` into ``run_dir``."""
    import shutil  # pylint: disable=import-outside-toplevel

    source = _train(config, tmp_path / f"checkpoint_{epoch}_{len(os.listdir(tmp_path))}", epoch)["run_dir"]
    shutil.copy(os.path.join(source, "checkpoint.pt"), os.path.join(run_dir, "checkpoint.pt"))


def _assert_same_files(first, second):
    for name in ["metrics.csv", "checkpoint.pt"] + [
        os.path.join("stats", os.path.basename(p)) for p in glob.glob(os.path.join(first, "stats", "*"))
    ]:
        assert filecmp.cmp(os.path.join(first, name), os.path.join(second, name), shallow=False), name
    assert sorted(os.listdir(os.path.join(first, "stats"))) == sorted(os.listdir(os.path.join(second, "stats")))


def test_the_summary_times_the_whole_run_and_says_how_many_epochs_final_reward_averages(config, tmp_path, caplog):
    with caplog.at_level("INFO"):
        short = _train(config, tmp_path / "short", 5)
    assert short["final_reward_epochs"] == 5 and "mean of the last 5 epochs" in caplog.text
    first = _train(config, tmp_path / "long", 40)
    resumed = _resume(first["run_dir"], num_epochs=60)
    with open(os.path.join(first["run_dir"], training.TRAIN_TIME_FILE), encoding="utf-8") as f:
        assert json.load(f)["epoch"] == 60
    assert resumed["timed_epochs"] == 60 and resumed["resumed_at_epoch"] == 40
    assert resumed["train_seconds"] > first["train_seconds"] * 0.5
    assert resumed["epochs_per_second"] == pytest.approx(60 / resumed["train_seconds"])
    assert resumed["final_reward_epochs"] == 10


def test_the_thread_setting_is_applied(config, tmp_path):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        _train(config, tmp_path, 3, num_threads=1)
        assert torch.get_num_threads() == 1
        _train(config, tmp_path, 3, num_threads=0)  # 0 leaves torch's setting alone
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert default.get_config().num_threads == 1


@pytest.mark.parametrize(
    "override, message",
    [
        ("--config.num_epoch=5", "no such config field: 'num_epoch' Did you mean \"num_epochs\""),
        ("--config.checkpoint_every=250", "config.checkpoint_every (250) must be 0 or a multiple of config.log_every"),
        ("--config.stat_tracking.method=foo", "unknown config.stat_tracking.method 'foo'; choose from 'ddpo'"),
        ("--config.stat_tracking.ema_decay=1.5", "config.stat_tracking.ema_decay must lie in (0, 1), got 1.5"),
        ("--config.num_threads=-1", "config.num_threads must be an int >= 0, got -1"),
        ("--config.device=cuda", "config.device is 'cuda' but torch sees no CUDA device"),
    ],
)
def test_train_script_states_config_mistakes_in_one_line(override, message, tmp_path):
    if "cuda" in override and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    result = subprocess.run(
        [sys.executable, str(SCRIPT), override, f"--logdir={tmp_path}"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and "\\n" not in result.stderr
    assert result.stderr.strip().splitlines() == [f"train.py: error: {message}"] or message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not os.listdir(tmp_path)  # nothing written


def _failing_load_on_rank_one(rank, logdir):
    config = default.get_config()
    config.device, config.num_epochs, config.log_every, config.checkpoint_every = "cpu", 20, 10, 10
    config.problem.num_prompts, config.problem.num_params, config.sample_batch_size = 8, 32, 16
    run_dir = training.train(config, logdir)["run_dir"]
    if rank == 1:

        def unreadable(path, required):
            raise checkpointing.CheckpointError(f"checkpoint {path} is corrupt or not plain data: simulated")

        checkpointing.load_checkpoint = unreadable
    config.num_epochs = 30
    with pytest.raises(
        checkpointing.CheckpointError,
        match=r"corrupt or not plain data: simulated \(while loading the checkpoint, on rank\(s\) \[1\]",
    ):
        training.train(config, run_dir, resume=True)
    dist.barrier()


def test_a_checkpoint_unreadable_on_one_rank_fails_every_rank_with_the_same_error(tmp_path):
    run_ranks(_failing_load_on_rank_one, 2, str(tmp_path / "init"), (str(tmp_path / "runs"),), timeout=90)


def _train_command(*args):
    return [
        sys.executable,
        str(SCRIPT),
        "--config.device=cpu",
        "--config.num_epochs=8000",
        "--config.log_every=50",
        "--config.checkpoint_every=500",
        "--config.stats_log.every=2",
        *args,
    ]


def _epochs_logged(run_dirs):
    """Rows of metrics.csv in the first of ``run_dirs`` that has one (0 before)."""
    for run_dir in run_dirs:
        path = os.path.join(run_dir, "metrics.csv")
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                return max(0, sum(1 for _ in f) - 1)
    return 0


def test_runs_killed_at_random_moments_resume_to_a_straight_run_byte_for_byte(tmp_path):
    subprocess.run(_train_command(f"--logdir={tmp_path / 'straight'}"), check=True, capture_output=True, timeout=120)
    (straight,) = glob.glob(str(tmp_path / "straight" / "*"))
    rng = random.Random(0)
    parent, kills = str(tmp_path / "killed"), 0
    for _ in range(8):  # four kills at random moments of the loop, then on to the end
        runs = [d for d in glob.glob(os.path.join(parent, "*")) if os.path.isfile(os.path.join(d, "checkpoint.pt"))]
        if runs and os.path.isfile(os.path.join(runs[0], "summary.json")):
            break
        done, existing = 0, set(glob.glob(os.path.join(parent, "*")))
        if runs:
            with open(os.path.join(runs[0], training.TRAIN_TIME_FILE), encoding="utf-8") as f:
                done = json.load(f)["epoch"]
        command = _train_command(f"--logdir={runs[0]}", "--resume") if runs else _train_command(f"--logdir={parent}")
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        # Kill once the run has logged past a random epoch, a random few milliseconds later.
        target = rng.randint(done + 200, 7800) if kills < 4 and done + 200 < 7800 else None
        time.sleep(0.5)  # a resume first rewrites metrics.csv back to the checkpoint
        while process.poll() is None and target is not None:
            watched = runs or sorted(set(glob.glob(os.path.join(parent, "*"))) - existing)
            if _epochs_logged(watched) >= target:
                time.sleep(rng.uniform(0, 0.03))
                process.send_signal(signal.SIGKILL)
                kills += 1
                break
            time.sleep(0.005)
        _, errors = process.communicate(timeout=120)
        assert process.returncode in (0, -signal.SIGKILL), errors
    assert kills >= 3
    (run_dir,) = [d for d in glob.glob(os.path.join(parent, "*")) if os.path.isfile(os.path.join(d, "summary.json"))]
    _assert_same_files(straight, run_dir)
    with open(os.path.join(run_dir, "summary.json"), encoding="utf-8") as f:
        assert json.load(f)["num_epochs"] == 8000
