"""Training with pass-rate memory: the Beta memory, baselines from the past, SPO and a prompt sampler.

``config.stat_tracking`` takes ``memory="beta"``, ``rho`` and ``include_batch``;
``config.prompt_sampler`` chooses each step's prompts from what the
tracker's memory says. Checked here: the config's refusals (by field name),
that a run of ``train()`` is the study's in-process run bit for bit, that
the sampler's state rides in the checkpoint (a resumed run is the straight
one, byte for byte), and that two ranks draw the same distinct prompts and
keep their own.
"""

import filecmp
import importlib
import os

import pytest
import torch
import torch.distributed as dist
from pass_fail_setup import metrics, short_config

from rail_interview import checkpointing, training
from rail_interview.configs import default, pass_fail
from rail_interview.studies import pass_fail_runs
from spawned_ranks import run_ranks

# The module, not ``training.step`` the function it exports.
training_step = importlib.import_module("rail_interview.training.step")


@pytest.fixture
def config():
    """The pass/fail config, shortened (``pass_fail_setup.short_config``)."""
    return short_config()


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"prompt_sampler.rule": "thompson"}, "config.prompt_sampler.rule must be one of 'none', 'uniform', 'spo'"),
        ({"prompt_sampler.rule": "spo", "prompt_sampler.epsilon": -1.0}, "config.prompt_sampler: epsilon"),
        (
            {"prompt_sampler.rule": "greso", "stat_tracking.method": "buffer", "stat_tracking.memory": "none"},
            "does not keep; use one of",
        ),
        ({"stat_tracking.rho": 1.5}, "config.stat_tracking.rho must lie in \\(0, 1\\]"),
        ({"stat_tracking.include_batch": False}, "include_batch=False with memory 'buffer'"),
        (
            {"stat_tracking.include_batch": False, "stat_tracking.memory": "beta"},
            "include_batch=False with memory 'beta' and method 'grpo', which divides by the prompt's std",
        ),
        (
            {"stat_tracking.memory": "none", "prompt_sampler.rule": "spo"},
            "with memory 'none' holds nothing: every weight would be equal",
        ),
        (
            {"prompt_sampler.rule": "greso", "problem.group_size": 1},
            "with config.problem.group_size 1 every visit has one reward",
        ),
        (
            {"stat_tracking.method": "spo", "stat_tracking.memory": "none", "stat_tracking.include_batch": False},
            "include_batch=False does not apply to method 'spo'",
        ),
    ],
)
def test_config_mistakes_are_named(config, fields, message):
    for name, value in fields.items():
        section, field = name.split(".")
        config[section][field] = value
    with pytest.raises(training.ConfigError, match=message):
        training.validate_config(config)


def test_a_sampler_needs_a_problem_of_groups():
    config = default.get_config()
    config.prompt_sampler.rule = "spo"
    with pytest.raises(training.ConfigError, match="problem 'distance' draws its own: leave the rule 'none'"):
        training.validate_config(config)


def test_the_past_only_baseline_is_accepted_where_no_std_can_be_zero(config):
    for method, memory in (("dr_grpo", "beta"), ("dr_grpo", "buffer"), ("rloo", "ema")):
        config.stat_tracking.method, config.stat_tracking.memory = method, memory
        config.stat_tracking.include_batch = False
        training.validate_config(config)


@pytest.mark.parametrize(
    "fields",
    [
        {"stat_tracking.memory": "beta", "prompt_sampler.rule": "spo"},
        {"stat_tracking.memory": "buffer", "prompt_sampler.rule": "greso"},
        {"stat_tracking.memory": "ema", "prompt_sampler.rule": "failure_rate"},
        {
            "stat_tracking.method": "dr_grpo",
            "stat_tracking.memory": "beta",
            "stat_tracking.include_batch": False,
            "stat_tracking.rho": 0.8,
        },
        {"stat_tracking.method": "spo", "stat_tracking.memory": "none", "problem.group_size": 1},
        {
            "stat_tracking.method": "spo",
            "stat_tracking.memory": "none",
            "problem.group_size": 1,
            "sample_batch_size": 16,
            "prompt_sampler.rule": "spo",
        },
    ],
)
def test_a_run_from_the_config_is_the_config_s_training_run(config, tmp_path, fields):
    for name, value in fields.items():
        section, _, field = name.rpartition(".")
        (config[section] if section else config)[field] = value
    rows = metrics(training.train(config, str(tmp_path))["run_dir"])
    run = pass_fail_runs.PassFailRun.from_config(config)
    assert run.sampler == config.prompt_sampler.rule and run.rho == config.stat_tracking.rho
    result = pass_fail_runs.train_pass_fail(run)
    assert [float(r["pass_rate"]) for r in rows] == result["pass_rate"][1:]
    assert [float(r["zero_variance_frac"]) for r in rows] == result["zero_variance"]


def test_the_sampler_chooses_distinct_prompts_g_samples_each(config, monkeypatch, tmp_path):
    config.stat_tracking.memory, config.prompt_sampler.rule = "beta", "spo"
    drawn = []
    choose = training_step.choose_prompts

    def spy(state, batch_size):
        drawn.append(choose(state, batch_size))
        return drawn[-1]

    monkeypatch.setattr(training_step, "choose_prompts", spy)
    config.num_epochs, config.checkpoint_every = 30, 0
    training.train(config, str(tmp_path))
    assert len(drawn) == 30
    for ids in drawn:
        groups = ids.view(-1, config.problem.group_size)  # [B, G]
        assert (groups == groups[:, :1]).all() and len(set(groups[:, 0].tolist())) == len(groups)
    assert len({tuple(ids.tolist()) for ids in drawn}) == 30  # a fresh draw every step


@pytest.mark.parametrize("memory, rule", [("beta", "spo"), ("buffer", "greso")])
def test_a_run_with_a_sampler_resumes_byte_for_byte(config, tmp_path, memory, rule):
    config.stat_tracking.memory, config.prompt_sampler.rule = memory, rule
    straight = training.train(config, str(tmp_path / "straight"))["run_dir"]
    config.num_epochs = 20
    run_dir = training.train(config, str(tmp_path / "resumed"))["run_dir"]
    resumed = training.train(training.load_run_config(run_dir, {"num_epochs": 40}), run_dir, resume=True)
    for name in ("metrics.csv", "checkpoint.pt"):
        assert filecmp.cmp(os.path.join(straight, name), os.path.join(resumed["run_dir"], name), False), name


def test_a_checkpoint_without_the_sampler_s_state_is_refused(config, tmp_path):
    config.stat_tracking.memory, config.prompt_sampler.rule = "beta", "spo"
    config.num_epochs = 20
    run_dir = training.train(config, str(tmp_path))["run_dir"]
    path = os.path.join(run_dir, "checkpoint.pt")
    checkpoint = torch.load(path, weights_only=False)
    del checkpoint["sampler"]
    torch.save(checkpoint, path)
    with pytest.raises(checkpointing.CheckpointError, match="holds no prompt sampler state"):
        training.train(training.load_run_config(run_dir, {"num_epochs": 40}), run_dir, resume=True)


WORLD_SIZE = 2


def _two_ranks(rank, logdir):
    config = pass_fail.get_config()
    config.device, config.num_epochs, config.log_every, config.checkpoint_every = "cpu", 20, 10, 10
    config.sample_batch_size = 32  # per rank: 8 groups of 4
    config.stat_tracking.memory, config.prompt_sampler.rule = "beta", "spo"
    drawn, params = [], []
    choose = training_step.choose_prompts

    def spy(state, batch_size):
        drawn.append(choose(state, batch_size))
        params.append(state.policy.params.clone())
        return drawn[-1]

    training_step.choose_prompts = spy
    summary = training.train(config, os.path.join(logdir, "straight"))
    local_ids = torch.stack(drawn)  # [epochs, 32]
    all_ids = [torch.empty_like(local_ids) for _ in range(WORLD_SIZE)]
    dist.all_gather(all_ids, local_ids)
    for step in range(20):  # a step's 16 groups are 16 distinct prompts, 8 on each rank
        assert len(set(torch.cat([ids[step] for ids in all_ids]).tolist())) == 16
    gathered = [torch.empty_like(params[-1]) for _ in range(WORLD_SIZE)]
    dist.all_gather(gathered, params[-1])
    assert torch.equal(gathered[0], gathered[1]), "parameters differ across ranks"
    config.num_epochs = 10
    run_dir = training.train(config, os.path.join(logdir, "resumed"))["run_dir"]
    config.num_epochs = 20
    resumed = training.train(config, run_dir, resume=True)
    if rank == 0:
        rows = metrics(summary["run_dir"])
        assert len(rows) == 20 and rows == metrics(resumed["run_dir"])


def test_two_gloo_ranks_choose_distinct_prompts_by_one_memory_and_resume(tmp_path):
    run_ranks(_two_ranks, WORLD_SIZE, str(tmp_path / "init"), (str(tmp_path / "runs"),), timeout=240)
