"""The pass/fail problem chosen in the config: train.py, resume, config checks, ranks, and the in-process runs."""

import filecmp
import json
import math
import os
import pathlib
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from pass_fail_setup import metrics, short_config

from rail_interview import problems, training
from rail_interview.configs import default, pass_fail
from rail_interview.problems.pass_fail import PassFailProblem
from rail_interview.studies import pass_fail_runs
from rail_interview.training.state import TrainingState
from spawned_ranks import run_ranks

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG_PATH = REPO_ROOT / "rail_interview" / "configs" / "pass_fail.py"


@pytest.fixture
def config():
    """The pass/fail config, shortened (``pass_fail_setup.short_config``)."""
    return short_config()


def test_the_config_chooses_the_problem(config, tmp_path):
    summary = training.train(config, str(tmp_path))
    rows = metrics(summary["run_dir"])
    assert list(rows[0]) == ["epoch", "reward_mean", "reward_std", "fallback_frac", "pass_rate", "zero_variance_frac"]
    assert {float(r["reward_mean"]) * config.sample_batch_size % 1 for r in rows} == {0.0}  # counts of passes
    assert summary["problem"] == "pass_fail" and 0 < summary["final_pass_rate"] < 1
    assert summary["final_zero_variance_frac"] == pytest.approx(
        sum(float(r["zero_variance_frac"]) for r in rows[-10:]) / 10
    )
    for name in ("pass_rate", "zero_variance_frac"):
        assert summary[f"mean_{name}"] == pytest.approx(sum(float(r[name]) for r in rows) / len(rows))
    assert problems.problem_name(default.get_config()) == "distance"


def test_a_run_from_the_config_is_the_config_s_training_run(config, tmp_path):
    """Both take training.step; from_config maps every field, so the curves agree bit for bit."""
    config.stat_tracking.method, config.stat_tracking.memory = "rloo", "ema"
    config.problem.group_size, config.seed = 2, 3
    rows = metrics(training.train(config, str(tmp_path))["run_dir"])
    result = pass_fail_runs.train_pass_fail(pass_fail_runs.PassFailRun.from_config(config))
    assert [float(r["pass_rate"]) for r in rows] == result["pass_rate"][1:]
    assert [float(r["zero_variance_frac"]) for r in rows] == result["zero_variance"]


def test_from_config_takes_every_field_and_refuses_another_problem(config):
    config.problem.label_scale, config.problem.tolerance, config.stat_tracking.buffer_size = 2.0, 0.5, 8
    run = pass_fail_runs.PassFailRun.from_config(config, dynamic_sampling=True)
    assert (run.label_scale, run.tolerance, run.buffer_size, run.num_groups) == (2.0, 0.5, 8, 16)
    assert run.dynamic_sampling and run.num_steps == config.num_epochs and run.memory == "buffer"
    with pytest.raises(training.ConfigError, match="problem.name 'pass_fail'"):
        pass_fail_runs.PassFailRun.from_config(default.get_config())


def test_a_pass_fail_run_resumes_byte_for_byte(config, tmp_path):
    straight = training.train(config, str(tmp_path / "straight"))["run_dir"]
    config.num_epochs = 20
    run_dir = training.train(config, str(tmp_path / "resumed"))["run_dir"]
    resumed = training.train(training.load_run_config(run_dir, {"num_epochs": 40}), run_dir, resume=True)
    assert filecmp.cmp(os.path.join(straight, "metrics.csv"), os.path.join(resumed["run_dir"], "metrics.csv"), False)
    straight_summary = json.loads(pathlib.Path(straight, "summary.json").read_text())
    for name in ("final_pass_rate", "mean_pass_rate", "mean_zero_variance_frac"):  # mean_*: rows before the resume too
        assert resumed[name] == straight_summary[name]


def test_a_run_directory_written_before_problem_name_existed_resumes(tiny_config, tmp_path):
    tiny_config.num_epochs = 14
    run_dir = training.train(tiny_config, str(tmp_path))["run_dir"]
    config_path = pathlib.Path(run_dir, "config.json")
    saved = json.loads(config_path.read_text())
    del saved["problem"]["name"]  # as this project wrote config.json before it had two problems
    config_path.write_text(json.dumps(saved))
    config = training.load_run_config(run_dir, {"num_epochs": 30})
    assert config.problem.name == "distance"
    assert training.train(config, run_dir, resume=True)["resumed_at_epoch"] == 14


@pytest.mark.parametrize("method, fallback", [("ema", "batch"), ("buffer", "zero"), ("batch", "raw")])
def test_a_run_directory_written_when_every_method_saved_a_fallback_resumes(tiny_config, tmp_path, method, fallback):
    """Before "auto", config.json held a fallback for every method, read by the GRPO family alone."""
    tiny_config.num_epochs, tiny_config.stat_tracking.method = 14, method
    straight = training.train(tiny_config, str(tmp_path / "straight"))["run_dir"]
    run_dir = training.train(tiny_config, str(tmp_path / "old"))["run_dir"]
    config_path = pathlib.Path(run_dir, "config.json")
    saved = json.loads(config_path.read_text())
    saved["stat_tracking"]["fallback"] = fallback  # as this project wrote it then
    config_path.write_text(json.dumps(saved))
    config = training.load_run_config(run_dir, {"num_epochs": 14})
    assert config.stat_tracking.fallback == "auto"
    training.check_resume_config(saved, config)  # the run's own config, as it reads today
    assert training.train(config, run_dir, resume=True)["resumed_at_epoch"] == 14
    assert metrics(run_dir) == metrics(straight)


def test_a_run_written_before_problem_name_existed_may_resume():
    saved = json.loads(default.get_config().to_json())
    del saved["problem"]["name"]
    training.check_resume_config(saved, default.get_config())
    other = default.get_config()
    other.problem.name = "pass_fail"
    with pytest.raises(training.ConfigError, match=r"config.problem.name \('distance' -> 'pass_fail'\)"):
        training.check_resume_config(saved, other)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("problem.name", "maze", "unknown config.problem.name 'maze'; choose from 'distance', 'pass_fail'"),
        ("sample_batch_size", 66, "config.sample_batch_size (66) must be a multiple of config.problem.group_size (4)"),
        ("sample_batch_size", 512, "with at most config.problem.num_prompts (64) groups"),
        ("problem.group_size", 0, "config.problem.group_size must be an int > 0, got 0"),
        ("problem.min_sigma", 4.0, "config.problem.min_sigma (4.0) must be at most config.problem.max_sigma (3.0)"),
        ("problem.label_scale", 0.0, "config.problem.label_scale must be a number > 0, got 0.0"),
        ("problem.tolerance", float("nan"), "config.problem.tolerance must be a number > 0, got nan"),
        (
            "stat_tracking.buffer_size",
            2,
            "config.stat_tracking.buffer_size (2) must be at least config.problem.group_size (4)",
        ),
    ],
)
def test_pass_fail_config_mistakes_are_named(config, field, value, message):
    *parents, leaf = field.split(".")
    node = config
    for part in parents:
        node = node[part]
    node[leaf] = value
    with pytest.raises(training.ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        training.validate_config(config)


@pytest.mark.parametrize(
    "method, memory, refused",
    [
        ("grpo", "buffer", True),  # divides by the buffer's std
        ("buffer", "none", True),  # so does the project's buffer tracker
        ("dr_grpo", "buffer", False),  # no std: a pass outside the window gets at most 1
        ("rloo", "buffer", False),
        ("grpo", "ema", False),  # buffer_size unused
    ],
)
def test_a_buffer_shorter_than_the_group_is_refused_where_it_divides_by_a_std(config, method, memory, refused):
    config.stat_tracking.method, config.stat_tracking.memory, config.stat_tracking.buffer_size = method, memory, 2
    config.stat_tracking.min_count = 2
    if refused:
        with pytest.raises(training.ConfigError, match=r"buffer_size \(2\) must be at least"):
            training.validate_config(config)
    else:
        training.validate_config(config)


def test_with_several_processes_every_rank_s_groups_need_prompts_of_their_own(config):
    config.sample_batch_size, config.stat_tracking.buffer_size = 128, 4  # 32 groups of P = 64
    training.validate_config(config)
    problems.check_config(config, world_size=2)
    with pytest.raises(ValueError, match=r"at most config.problem.num_prompts \(64\) groups across the 3 processes"):
        problems.check_config(config, world_size=3)


def test_a_field_of_the_other_problem_is_refused(config):
    config.problem.name = "distance"
    with pytest.raises(training.ConfigError, match="config.problem.group_size is not a field of problem 'distance'"):
        training.validate_config(config)


def test_a_tracker_field_of_the_wrong_type_is_named_before_the_problem_reads_it(config):
    config.stat_tracking.buffer_size = None
    with pytest.raises(training.ConfigError, match="config.stat_tracking.buffer_size must be an int"):
        training.validate_config(config)


def test_a_problem_field_missing_is_named(config):
    del config.problem["label_scale"]
    with pytest.raises(training.ConfigError, match="config.problem.label_scale is missing: problem 'pass_fail'"):
        training.validate_config(config)


def test_train_script_runs_the_pass_fail_config(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            str(REPO_ROOT / "scripts" / "train.py"),
            f"--config={CONFIG_PATH}",
            "--config.num_epochs=20",
            "--config.log_every=10",
            "--config.checkpoint_every=0",
            f"--logdir={tmp_path}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "pass_rate" in result.stderr and "final_pass_rate" in result.stdout
    (run_dir,) = tmp_path.glob("*grpo+buffer_seed0")
    assert json.loads((run_dir / "config.json").read_text())["problem"]["name"] == "pass_fail"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_pass_fail_problem_trains_on_cuda(config, tmp_path):
    config.device = "cuda"
    summary = training.train(config, str(tmp_path))
    assert summary["device"].startswith("cuda") and 0 <= summary["final_pass_rate"] <= 1


WORLD_SIZE = 2


def _two_ranks(rank, logdir):
    config = pass_fail.get_config()
    config.device, config.num_epochs, config.log_every, config.checkpoint_every = "cpu", 20, 10, 10
    config.sample_batch_size = 32  # per rank: 8 groups of 4
    config.stat_tracking.buffer_size = 4  # one group: enough, as no prompt is in two ranks' batches
    params, drawn = [], []
    checkpoint, sample_prompt_ids = TrainingState.gather_checkpoint, PassFailProblem.sample_prompt_ids

    def spy(state, next_epoch):
        params.append(state.policy.params.clone())
        return checkpoint(state, next_epoch)

    def spy_sampling(problem, batch_size, generator, **ranks):
        drawn.append(sample_prompt_ids(problem, batch_size, generator, **ranks))
        return drawn[-1]

    TrainingState.gather_checkpoint = spy
    PassFailProblem.sample_prompt_ids = spy_sampling
    summary = training.train(config, os.path.join(logdir, "straight"))
    gathered = [torch.empty_like(params[-1]) for _ in range(WORLD_SIZE)]
    dist.all_gather(gathered, params[-1])
    assert torch.equal(gathered[0], gathered[1]), "parameters differ across ranks"
    local_ids = torch.stack(drawn)  # [epochs, 32]
    all_ids = [torch.empty_like(local_ids) for _ in range(WORLD_SIZE)]
    dist.all_gather(all_ids, local_ids)
    for step in range(20):  # a step's 16 groups are 16 distinct prompts, 8 on each rank
        assert len(set(torch.cat([ids[step] for ids in all_ids]).tolist())) == 16
    assert not torch.equal(all_ids[0], all_ids[1])

    # Stopped at epoch 10 and resumed, the run is the straight one: the shared prompt draws resume too.
    config.num_epochs = 10
    run_dir = training.train(config, os.path.join(logdir, "resumed"))["run_dir"]
    config.num_epochs = 20
    resumed = training.train(config, run_dir, resume=True)
    if rank == 0:
        rows = metrics(summary["run_dir"])
        assert len(rows) == 20 and rows == metrics(resumed["run_dir"])


def test_two_gloo_ranks_train_the_pass_fail_problem_on_distinct_prompts_and_resume(tmp_path):
    run_ranks(_two_ranks, WORLD_SIZE, str(tmp_path / "init"), (str(tmp_path / "runs"),), timeout=240)


def test_stats_plots_use_a_linear_axis_for_pass_fail_rewards(config, tmp_path, monkeypatch):
    import matplotlib.figure  # pylint: disable=import-outside-toplevel

    from rail_interview import stats_plots  # pylint: disable=import-outside-toplevel

    saved = []  # per saved figure: each visible Axes' (y scale, y limits) as drawn
    savefig = matplotlib.figure.Figure.savefig

    def spy(figure, *args, **kwargs):
        saved.append({(ax.get_yscale(), ax.get_ylim()) for ax in figure.get_axes() if ax.get_visible()})
        return savefig(figure, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", spy)
    run = stats_plots.load_run(training.train(config, str(tmp_path / "runs"))["run_dir"])
    stats_plots.plot_prompt_stats([run], [0, 1, 2], str(tmp_path / "pass_fail.png"))
    assert saved[-1] == {("linear", (-0.05, 1.05))}  # the reward curve and every panel
    distance = default.get_config()
    distance.device, distance.num_epochs, distance.problem.num_prompts, distance.sample_batch_size = "cpu", 20, 8, 32
    run = stats_plots.load_run(training.train(distance, str(tmp_path / "runs"))["run_dir"])
    stats_plots.plot_prompt_stats([run], [0, 1], str(tmp_path / "distance.png"))
    ((scale, (low, high)),) = saved[-1]  # symlog, from a power of ten below the lowest reward to 0.5
    assert scale == "symlog" and high == 0.5 and low <= -10 and math.log10(-low) == int(math.log10(-low))
