"""Data-parallel training across torch.distributed ranks: gloo processes on the CPU.

The trackers' own multi-rank behaviour is tested in tests/test_tracker_distributed.py.
"""

import os

import pytest
import torch
import torch.distributed as dist

from rail_interview import distributed, training
from rail_interview.configs import default
from rail_interview.problems.distance import ToyProblem, make_toy_problem
from rail_interview.stat_tracking import load_prompt_stats
from rail_interview.training.state import TrainingState, make_generators
from spawned_ranks import run_ranks

WORLD_SIZE = 2


def _first_draws(rank: int, world_size: int, seed: int = 0):
    """What rank ``rank`` of ``world_size`` samples in its first epoch: prompt ids and answers."""
    config = default.get_config()
    config.seed = seed
    generator = torch.Generator().manual_seed(seed)  # every rank draws the same instance
    problem, policy = make_toy_problem(num_prompts=64, num_params=1024, generator=generator)
    context = distributed.DistributedContext(rank=rank, world_size=world_size)
    sampler = make_generators(config.seed, generator, problem, context).answers
    ids = problem.sample_prompt_ids(256, sampler)
    return ids, policy.sample(ids, sampler)


def test_every_rank_samples_its_own_prompts_and_rank_zero_samples_as_one_process():
    world_size = 4
    draws = [_first_draws(rank, world_size) for rank in range(world_size)]
    for rank in range(world_size):
        for other in range(rank):
            assert not torch.equal(draws[rank][0], draws[other][0]), f"ranks {other} and {rank} draw alike"
            assert not torch.equal(draws[rank][1], draws[other][1])
    # Rank 0 runs exactly as a single process; each rank's stream depends on its rank and the seed only.
    single = _first_draws(0, 1)
    assert torch.equal(draws[0][0], single[0]) and torch.equal(draws[0][1], single[1])
    for rank in range(world_size):
        again = _first_draws(rank, world_size)
        assert torch.equal(again[0], draws[rank][0])
    assert not torch.equal(_first_draws(1, world_size, seed=1)[0], draws[1][0])


def _training(rank: int, logdir: str) -> None:
    config = default.get_config()
    config.device, config.num_epochs, config.log_every, config.checkpoint_every = "cpu", 20, 10, 10
    config.problem.num_prompts, config.problem.num_params, config.sample_batch_size = 8, 32, 16
    final_params = []
    checkpoint = TrainingState.gather_checkpoint

    def spy(state, next_epoch):
        final_params.append(state.policy.params.clone())
        return checkpoint(state, next_epoch)

    TrainingState.gather_checkpoint = spy
    drawn = []  # this rank's prompt ids, one [16] tensor per epoch
    sample_prompt_ids = ToyProblem.sample_prompt_ids

    def spy_sampling(problem, batch_size, generator, **ranks):
        drawn.append(sample_prompt_ids(problem, batch_size, generator, **ranks))
        return drawn[-1]

    ToyProblem.sample_prompt_ids = spy_sampling
    summary = training.train(config, logdir)
    assert summary["world_size"] == WORLD_SIZE and os.path.isdir(summary["run_dir"])
    gathered = [torch.empty_like(final_params[-1]) for _ in range(WORLD_SIZE)]
    dist.all_gather(gathered, final_params[-1])
    assert torch.equal(gathered[0], gathered[1]), "parameters differ across ranks"
    assert len(os.listdir(logdir)) == 1  # one run directory, written by rank 0 alone

    local_ids = torch.stack(drawn)  # [epochs, 16]
    assert local_ids.shape == (20, 16)
    all_ids = [torch.empty_like(local_ids) for _ in range(WORLD_SIZE)]
    dist.all_gather(all_ids, local_ids)
    assert not torch.equal(all_ids[0], all_ids[1]), "every rank drew the same prompts"
    if rank == 0:  # the stats log counts the global batch: every rank's prompts
        log = load_prompt_stats(os.path.join(summary["run_dir"], training.STATS_DIR))
        global_ids = torch.cat(all_ids, dim=1)  # [epochs, WORLD_SIZE * 16]
        expected = torch.stack([torch.bincount(epoch_ids, minlength=8) for epoch_ids in global_ids])
        assert log.batch_count.tolist() == expected.tolist()


def test_two_gloo_ranks_train_in_step(tmp_path):
    run_ranks(_training, WORLD_SIZE, str(tmp_path / "init"), (str(tmp_path / "runs"),), timeout=240)


def test_torchrun_trains_on_two_cpu_processes(tmp_path):
    import json  # pylint: disable=import-outside-toplevel
    import subprocess  # pylint: disable=import-outside-toplevel
    import sys  # pylint: disable=import-outside-toplevel

    from rail_interview import checkpointing  # pylint: disable=import-outside-toplevel

    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "train.py")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            script,
            f"--logdir={tmp_path}",
            "--config.num_epochs=50",
            "--config.device=cpu",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = tmp_path.iterdir()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["num_epochs"] == 50
    assert result.stdout.count("final_reward") == 1  # rank 0 alone reports
    with pytest.raises(checkpointing.CheckpointError, match="written by 2 process"):
        training.train(training.load_run_config(str(run_dir), {"num_epochs": 60}), str(run_dir), resume=True)
