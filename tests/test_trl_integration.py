"""TrackedGRPOTrainer and TrackedRLOOTrainer against the real TRL trainers, on a tiny model on the CPU.

Each test trains TRL's own trainer (``trl_setup``: a Qwen2 with hidden size
16, a word-level tokenizer built here, no downloads) for a few steps. The
untouched trainer is the reference: with the default tracker the tracked
trainer generates the same completions, gets the same rewards, and trains
on the same advantages to float32 rounding (the tracker's scatter sums and
TRL's grouped means round differently: at most 5e-7 here), so the weights
after three steps agree to 1e-4.
"""

import os
import subprocess
import sys

import pytest
import torch
from integration_imports import require

trl = require("trl", "trl")

import trl_setup  # noqa: E402  (needs trl, imported above)

from rail_interview.integrations.trl import (  # noqa: E402
    CHECKPOINT_FILE,
    TrackedGRPOTrainer,
    TrackedRLOOTrainer,
    grpo_tracker,
    rloo_tracker,
)
from rail_interview.stat_tracking import canonical_text, presets, prompt_keys, token_keys  # noqa: E402

TWO_REWARDS = [trl_setup.in_range_reward, trl_setup.sometimes_none_reward]
# One reward never None, one None for w7, one None for w7 or an odd number of words: rows with some None.
THREE_REWARDS = [*TWO_REWARDS, trl_setup.even_words_reward]
# Both None for w7: unscorable rows; one None for an odd number of words: rows with one reward.
NONE_REWARDS = [trl_setup.sometimes_none_reward, trl_setup.even_words_reward]
TRAINERS = {
    "grpo": (trl.GRPOTrainer, TrackedGRPOTrainer, trl.GRPOConfig),
    "rloo": (trl.RLOOTrainer, TrackedRLOOTrainer, trl.RLOOConfig),
}


def tenths_reward(completions, prompt_id, **_):
    """0.1 for even prompts (every group of them all equal), ``in_range_reward`` / 10 + 0.05 for odd ones.

    Neither is a dyadic fraction, so float32 rounds them.
    """
    in_range = trl_setup.in_range_reward(completions, prompt_id)
    return [0.1 if identity % 2 == 0 else reward / 10 + 0.05 for reward, identity in zip(in_range, prompt_id)]


def _assert_same_training(plain, tracked, advantage_tolerance: float = 1e-6) -> None:
    """Same rewards, advantages to float32 rounding, same losses and weights to the rounding's effect."""
    assert len(plain.recorded) == len(tracked.recorded) == 3
    for reference, ours in zip(plain.rewards, tracked.rewards):
        torch.testing.assert_close(ours, reference, rtol=0, atol=0, equal_nan=True)
    for reference, ours in zip(plain.recorded, tracked.recorded):
        torch.testing.assert_close(ours, reference, rtol=advantage_tolerance, atol=advantage_tolerance)
    torch.testing.assert_close(trl_setup.losses(tracked), trl_setup.losses(plain), rtol=1e-5, atol=1e-6)
    for reference, ours in zip(plain.model.parameters(), tracked.model.parameters()):
        torch.testing.assert_close(ours, reference, rtol=0, atol=1e-4)


@pytest.mark.parametrize(
    "name, options",
    [
        ("grpo", {}),
        ("grpo", {"scale_rewards": "batch"}),
        ("grpo", {"scale_rewards": "none", "reward_weights": [1.0, 0.5]}),
        ("rloo", {}),
        ("rloo", {"normalize_advantages": True, "reward_clip_range": (0.0, 5.5), "reward_weights": [2.0, 1.0]}),
    ],
)
def test_default_tracker_trains_as_the_untouched_trainer(name, options):
    plain_class, tracked_class, config_class = TRAINERS[name]
    plain = trl_setup.run(plain_class, config_class, reward_funcs=TWO_REWARDS, **options)
    tracked = trl_setup.run(tracked_class, config_class, reward_funcs=TWO_REWARDS, **options)
    assert tracked.tracker.memory == "none"
    _assert_same_training(plain, tracked)


def test_default_tracker_groups_as_trl_when_a_prompt_repeats_within_a_batch():
    # One prompt: each generation batch holds it in two groups, which TRL normalises apart.
    data = trl_setup.dataset(num_prompts=1, repeats=8)
    plain = trl_setup.run(trl.GRPOTrainer, trl.GRPOConfig, reward_funcs=TWO_REWARDS, train_dataset=data)
    tracked = trl_setup.run(TrackedGRPOTrainer, trl.GRPOConfig, reward_funcs=TWO_REWARDS, train_dataset=data)
    _assert_same_training(plain, tracked)


@pytest.mark.parametrize(
    "reward_funcs, options",
    [
        (THREE_REWARDS, {"multi_objective_aggregation": "normalize_then_sum", "reward_weights": [1.0, 0.5, 2.0]}),
        (NONE_REWARDS, {"multi_objective_aggregation": "normalize_then_sum", "scale_rewards": "batch"}),
        (
            NONE_REWARDS,
            {
                "multi_objective_aggregation": "normalize_then_sum",
                "scale_rewards": "none",
                "reward_weights": [0.3, 1.7],
            },
        ),
        (THREE_REWARDS, {"scale_rewards": "none", "reward_weights": [0.5, 1.0, -1.0]}),
        (NONE_REWARDS, {"scale_rewards": "batch", "reward_weights": [1.0, 0.25]}),
        (
            [trl_setup.sometimes_none_reward],
            {"multi_objective_aggregation": "normalize_then_sum", "reward_weights": [2.0]},
        ),
    ],
)
def test_default_tracker_reproduces_multi_objective_aggregation(reward_funcs, options):
    # Several reward functions, some returning None, weighted: the default tracker takes [N, C] and
    # combines them in the config's order (normalize_then_sum ignores scale_rewards, as TRL does).
    plain = trl_setup.run(trl.GRPOTrainer, trl.GRPOConfig, reward_funcs=reward_funcs, **options)
    tracked = trl_setup.run(TrackedGRPOTrainer, trl.GRPOConfig, reward_funcs=reward_funcs, **options)
    tracker = tracked.tracker
    assert tracker.memory == "none" and tracker.num_rewards == len(reward_funcs)
    assert tracker.reward_weights == tuple(tracked.reward_weights.tolist())
    if len(reward_funcs) > 1:
        assert tracker.aggregation == options.get("multi_objective_aggregation", "sum_then_normalize")
    rewards = torch.cat(plain.rewards)
    some_none = rewards.isnan().any(dim=1) & ~rewards.isnan().all(dim=1)
    assert some_none.any() or len(reward_funcs) == 1  # rows where only some functions returned None
    if reward_funcs[0] is trl_setup.sometimes_none_reward:
        assert rewards.isnan().all(dim=1).any()  # unscorable rows
    _assert_same_training(plain, tracked)


def test_one_weighted_reward_function_trains_as_before_bit_for_bit():
    # The default tracker weighs a lone function itself ([N], reward_weights=(0.5,)); a tracker without
    # weights is given the weighted sum, as every tracker was before several rewards: the same bits.
    common = dict(reward_funcs=trl_setup.sometimes_none_reward, reward_weights=[0.5])
    plain = trl_setup.run(trl.GRPOTrainer, trl.GRPOConfig, **common)
    default = trl_setup.run(TrackedGRPOTrainer, trl.GRPOConfig, **common)
    summed = trl_setup.run(TrackedGRPOTrainer, trl.GRPOConfig, trainer_kwargs={"tracker": grpo_tracker(2)}, **common)
    assert default.tracker.reward_weights == (0.5,) and summed.tracker.reward_weights == (1.0,)
    for reference, ours in zip(summed.recorded, default.recorded):
        torch.testing.assert_close(ours, reference, rtol=0, atol=0)
    _assert_same_training(plain, default)


def test_non_dyadic_rewards_agree_to_the_rounding_of_a_zero_variance_group():
    # A group of seven rewards of 0.1 has std 0, and its float32 mean is not exactly 0.1: both sides
    # divide that rounding by 0 + 1e-4 (TRL gives 7.45e-5 where the exact answer is 0), each from its
    # own sum, so the two agree only to that noise: about |r| * n * 6e-8 / 1e-4.
    sizes = dict(per_device_train_batch_size=14, num_generations=7)
    plain = trl_setup.run(trl.GRPOTrainer, trl.GRPOConfig, reward_funcs=tenths_reward, **sizes)
    tracked = trl_setup.run(TrackedGRPOTrainer, trl.GRPOConfig, reward_funcs=tenths_reward, **sizes)
    noise = [
        advantages.view(-1, 7)[rewards.view(-1, 7).eq(0.1).all(dim=1)].abs().max()
        for rewards, advantages in zip(plain.rewards, plain.recorded)
        if rewards.view(-1, 7).eq(0.1).all(dim=1).any()
    ]
    assert noise and max(noise) > 0  # the case is exercised: TRL's all-equal groups get rounding noise
    _assert_same_training(plain, tracked, advantage_tolerance=1e-3)


def test_unscorable_rows_get_advantage_zero_and_stay_out_of_memory():
    tracker = presets.trl_grpo(8, memory="buffer", buffer_size=64, min_count=2, keys="hashed")
    trainer = trl_setup.run(
        TrackedGRPOTrainer,
        trl.GRPOConfig,
        reward_funcs=trl_setup.sometimes_none_reward,
        trainer_kwargs={"tracker": tracker},
    )
    unscorable = torch.cat([rewards.isnan().all(dim=1) for rewards in trainer.rewards])
    assert 0 < unscorable.sum() < len(unscorable)
    assert torch.all(torch.cat(trainer.recorded)[unscorable] == 0)
    assert int(tracker.stats().count.sum()) == int((~unscorable).sum())


@pytest.mark.parametrize("memory", [{"memory": "buffer", "buffer_size": 16}, {"memory": "ema", "decay": 0.8}])
def test_memory_counts_across_steps_and_changes_the_advantages(memory):
    # Four prompts, two per step: by step 3 each prompt comes back with its earlier rewards in memory.
    data = trl_setup.dataset(num_prompts=4)
    tracker = presets.trl_grpo(8, min_count=2, keys="hashed", **memory)
    plain = trl_setup.run(trl.GRPOTrainer, trl.GRPOConfig, reward_funcs=TWO_REWARDS, train_dataset=data, max_steps=4)
    tracked = trl_setup.run(
        TrackedGRPOTrainer,
        trl.GRPOConfig,
        reward_funcs=TWO_REWARDS,
        train_dataset=data,
        max_steps=4,
        trainer_kwargs={"tracker": tracker},
    )
    counts = tracker.stats().count
    assert sorted(counts[counts > 0].tolist()) == [8, 8, 8, 8]
    if memory["memory"] == "buffer":
        # Steps 1 and 2 see each prompt for the first time: the batch's group is all the buffer holds.
        for reference, ours in zip(plain.recorded[:2], tracked.recorded[:2]):
            torch.testing.assert_close(ours, reference, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(tracked.recorded[2], plain.recorded[2], atol=1e-3)
    logged = {name for entry in tracked.state.log_history for name in entry}
    assert {"tracker/fallback_frac", "tracker/zero_std_frac", "tracker/zero_std_signal_frac"} <= logged


def test_per_function_memory_keeps_each_reward_s_statistics():
    # normalize_then_sum with a buffer: each prompt keeps each reward function's last rewards.
    data = trl_setup.dataset(num_prompts=4)
    config = dict(multi_objective_aggregation="normalize_then_sum", reward_weights=[1.0, 0.5, 2.0])
    common = dict(reward_funcs=THREE_REWARDS, train_dataset=data, max_steps=4, **config)
    tracker = grpo_tracker(8, "group", "normalize_then_sum", [1.0, 0.5, 2.0], memory="buffer", buffer_size=16)
    plain = trl_setup.run(trl.GRPOTrainer, trl.GRPOConfig, **common)
    tracked = trl_setup.run(TrackedGRPOTrainer, trl.GRPOConfig, trainer_kwargs={"tracker": tracker}, **common)
    state = tracker.state_dict()
    assert state["rewards"].shape == (8, 3, 16) and state["count"].shape == (8, 3)
    counts = tracker.stats().count  # [P, C]
    used = counts[:, 0] > 0
    assert counts[used, 0].tolist() == [8, 8, 8, 8]  # in_range_reward is never None
    scored = (~torch.cat(tracked.rewards).isnan()).sum(dim=0)  # [C], the rewards each function gave
    assert counts.sum(dim=0).tolist() == scored.tolist() and scored[2] < scored[1] < scored[0]
    # Steps 1 and 2 see each prompt for the first time: the batch's group is all the buffer holds.
    for reference, ours in zip(plain.recorded[:2], tracked.recorded[:2]):
        torch.testing.assert_close(ours, reference, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(tracked.recorded[2], plain.recorded[2], atol=1e-3)
    logged = {name for entry in tracked.state.log_history for name in entry}
    assert {"tracker/fallback_frac", "tracker/zero_std_frac", "tracker/zero_std_signal_frac"} <= logged


def test_rloo_with_memory_counts_across_steps():
    tracker = rloo_tracker(8, memory="buffer", buffer_size=16, min_count=2)
    trainer = trl_setup.run(
        TrackedRLOOTrainer,
        trl.RLOOConfig,
        reward_funcs=TWO_REWARDS,
        train_dataset=trl_setup.dataset(num_prompts=4),
        max_steps=4,
        trainer_kwargs={"tracker": tracker},
    )
    counts = tracker.stats().count
    assert sorted(counts[counts > 0].tolist()) == [8, 8, 8, 8]
    assert all(torch.isfinite(advantages).all() for advantages in trainer.recorded)


def test_logged_advantages_are_the_ones_trained_on():
    tracker = presets.trl_grpo(8, memory="ema", decay=0.5, min_count=2, keys="hashed")
    trainer = trl_setup.run(
        TrackedGRPOTrainer,
        trl.GRPOConfig,
        reward_funcs=TWO_REWARDS,
        train_dataset=trl_setup.dataset(num_prompts=2),
        trainer_kwargs={"tracker": tracker},
    )
    assert list(trainer._logs["advantages"]) == trainer.recorded[-1].tolist()


@pytest.mark.parametrize(
    "reward_funcs, config",
    [
        (TWO_REWARDS, {}),
        (THREE_REWARDS, {"multi_objective_aggregation": "normalize_then_sum", "reward_weights": [1.0, 0.5, 2.0]}),
    ],
)
def test_resume_from_a_checkpoint_equals_the_straight_run(tmp_path, reward_funcs, config):
    def tracker():
        aggregation = config.get("multi_objective_aggregation", "sum_then_normalize")
        weights = config.get("reward_weights")
        return grpo_tracker(8, "group", aggregation, weights, memory="buffer", buffer_size=8, min_count=2)

    # Prompts come back within the first epoch: resumed at an epoch boundary, the untouched
    # GRPOTrainer, too, samples other completions than its straight run (docs/trl.md).
    data = trl_setup.dataset(num_prompts=4, repeats=2)
    common = dict(reward_funcs=reward_funcs, train_dataset=data, max_steps=4, **config)
    common.update(save_strategy="steps", save_steps=2)
    straight = trl_setup.run(
        TrackedGRPOTrainer,
        trl.GRPOConfig,
        output_dir=str(tmp_path / "a"),
        trainer_kwargs={"tracker": tracker()},
        **common,
    )
    checkpoint = tmp_path / "a" / "checkpoint-2"
    assert (checkpoint / CHECKPOINT_FILE).exists()
    resumed = trl_setup.run(
        TrackedGRPOTrainer,
        trl.GRPOConfig,
        output_dir=str(tmp_path / "b"),
        resume_from_checkpoint=str(checkpoint),
        trainer_kwargs={"tracker": tracker()},
        **common,
    )
    assert len(resumed.recorded) == 2
    for reference, ours in zip(straight.recorded[2:], resumed.recorded):
        torch.testing.assert_close(ours, reference, rtol=0, atol=0)
    expected = straight.tracker.state_dict()
    assert int(straight.tracker.stats().count.max()) == 8  # a prompt seen at two steps
    assert expected["rewards"].shape == ((8, 3, 8) if config else (8, 8))  # [P, C, K] with each reward's own
    for name, value in resumed.tracker.state_dict().items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=0, equal_nan=True)


def test_resume_without_tracker_state_is_refused_for_a_memory(tmp_path):
    common = dict(reward_funcs=TWO_REWARDS, max_steps=2, save_strategy="steps", save_steps=1)
    trl_setup.run(trl.GRPOTrainer, trl.GRPOConfig, output_dir=str(tmp_path / "plain"), **common)
    tracker = presets.trl_grpo(8, memory="buffer", buffer_size=8, min_count=2, keys="hashed")
    with pytest.raises(FileNotFoundError, match=CHECKPOINT_FILE):
        trl_setup.run(
            TrackedGRPOTrainer,
            trl.GRPOConfig,
            output_dir=str(tmp_path / "tracked"),
            resume_from_checkpoint=str(tmp_path / "plain" / "checkpoint-1"),
            trainer_kwargs={"tracker": tracker},
            **common,
        )


def test_evaluation_leaves_the_memory_untouched_and_gives_trl_s_advantages():
    common = dict(reward_funcs=TWO_REWARDS, max_steps=2, per_device_eval_batch_size=8)
    evaluation = {"eval_dataset": trl_setup.dataset(num_prompts=2)}
    tracker = grpo_tracker(8, memory="buffer", buffer_size=8, min_count=2)
    trainer = trl_setup.run(
        TrackedGRPOTrainer, trl.GRPOConfig, trainer_kwargs={"tracker": tracker, **evaluation}, **common
    )
    before = {name: value.clone() for name, value in tracker.state_dict().items()}
    assert "eval_loss" in trainer.evaluate()
    for name, value in tracker.state_dict().items():
        torch.testing.assert_close(value, before[name], rtol=0, atol=0, equal_nan=True)
    assert len(trainer.recorded) == 2 and len(trainer.eval_recorded) >= 1
    # With the default tracker, training is TRL's to rounding, so evaluation sees the same model:
    # its advantages are TRL's own.
    # (Each evaluates right after its own training: sampling draws from torch's global generator,
    # which train() seeds.)
    plain = trl_setup.run(trl.GRPOTrainer, trl.GRPOConfig, trainer_kwargs=evaluation, **common)
    plain.evaluate()
    default = trl_setup.run(TrackedGRPOTrainer, trl.GRPOConfig, trainer_kwargs=evaluation, **common)
    default.evaluate()
    assert len(default.eval_recorded) == len(plain.eval_recorded) >= 1
    for reference, ours in zip(plain.eval_recorded, default.eval_recorded):
        torch.testing.assert_close(ours, reference, rtol=0, atol=0)


def test_chat_prompts_are_keyed_by_their_canonical_text():
    tracker = presets.trl_grpo(8, memory="buffer", buffer_size=8, min_count=2, keys="hashed")
    data = trl_setup.dataset(num_prompts=2, chat=True)
    trl_setup.run(
        TrackedGRPOTrainer,
        trl.GRPOConfig,
        reward_funcs=TWO_REWARDS,
        train_dataset=data,
        trainer_kwargs={"tracker": tracker},
    )
    expected = prompt_keys([canonical_text(prompt) for prompt in data["prompt"]])
    keys, used = tracker.table_keys()
    assert sorted(keys[used].tolist()) == sorted(expected.tolist())


def test_prompts_keyed_by_token_ids_or_an_id_column():
    data = trl_setup.dataset(num_prompts=2)
    by_tokens = presets.trl_grpo(8, memory="buffer", buffer_size=8, min_count=2, keys="hashed")
    trl_setup.run(
        TrackedGRPOTrainer,
        trl.GRPOConfig,
        train_dataset=data,
        trainer_kwargs={"tracker": by_tokens, "prompt_key": "prompt_ids"},
    )
    encoded = trl_setup.tokenizer()(list(data["prompt"]), return_tensors="pt", padding=True)
    keys, used = by_tokens.table_keys()
    assert sorted(keys[used].tolist()) == sorted(token_keys(encoded["input_ids"], encoded["attention_mask"]).tolist())

    by_id = presets.trl_grpo(2, memory="buffer", buffer_size=64, min_count=2)
    trainer = trl_setup.run(
        TrackedGRPOTrainer,
        trl.GRPOConfig,
        train_dataset=data,
        trainer_kwargs={"tracker": by_id, "prompt_key": "prompt_id"},
    )
    samples = sum(len(advantages) for advantages in trainer.recorded)
    assert by_id.stats().count.tolist() == [samples // 2, samples // 2]


def test_refusals_name_the_problem(tmp_path):
    config = trl.GRPOConfig(**trl_setup.config_kwargs(str(tmp_path)))
    common = dict(reward_funcs=TWO_REWARDS, train_dataset=trl_setup.dataset(), processing_class=trl_setup.tokenizer())
    with pytest.raises(ValueError, match="keys='hashed'"):
        TrackedGRPOTrainer(
            model=trl_setup.model(), args=config, tracker=presets.trl_grpo(8, memory="buffer", buffer_size=4), **common
        )
    with pytest.raises(ValueError, match="has 1 rows but a generation batch holds 2 prompts"):
        TrackedGRPOTrainer(model=trl_setup.model(), args=config, tracker=grpo_tracker(1, memory="ema"), **common)
    with pytest.warns(UserWarning, match="scale='batch_std' .the config's: 'prompt_std'."):
        TrackedGRPOTrainer(model=trl_setup.model(), args=config, tracker=grpo_tracker(8, "batch"), **common)
    with pytest.raises(ValueError, match="the tracker is on meta but the trainer on cpu"):
        TrackedGRPOTrainer(model=trl_setup.model(), args=config, tracker=grpo_tracker(8, device="meta"), **common)
    with pytest.raises(TypeError, match="AdvantageTracker"):
        TrackedGRPOTrainer(model=trl_setup.model(), args=config, tracker="buffer", **common)
    # Trackers whose rewards do not fit two reward functions.
    with pytest.raises(ValueError, match="takes 3 rewards per sample .num_rewards=3. but the trainer has 2"):
        TrackedGRPOTrainer(model=trl_setup.model(), args=config, tracker=grpo_tracker(8, num_rewards=3), **common)
    with pytest.raises(ValueError, match=r"weighs one reward \(reward_weights=\(2.0,\)\) but the trainer has 2"):
        TrackedGRPOTrainer(
            model=trl_setup.model(), args=config, tracker=grpo_tracker(8, reward_weights=[2.0]), **common
        )
    refusing = presets.trl_grpo(8, reward_weights=[1.0, 1.0], nan_rewards="refuse", keys="hashed")
    with pytest.raises(ValueError, match="nan_rewards='refuse', but a reward function that returns None"):
        TrackedGRPOTrainer(model=trl_setup.model(), args=config, tracker=refusing, **common)
    rloo_config = trl.RLOOConfig(**trl_setup.config_kwargs(str(tmp_path), beta=0.0))  # no reference model
    with pytest.raises(ValueError, match="TrackedRLOOTrainer gives it one reward per sample"):
        TrackedRLOOTrainer(model=trl_setup.model(), args=rloo_config, tracker=rloo_tracker(8, num_rewards=2), **common)
    # Trackers unlike the config's aggregation and weights: used, with a warning that names them.
    weighted = trl.GRPOConfig(**trl_setup.config_kwargs(str(tmp_path), reward_weights=[1.0, 0.5]))
    with pytest.warns(UserWarning, match=r"reward_weights=\(1.0, 1.0\) \(the config's: \(1.0, 0.5\)\)"):
        TrackedGRPOTrainer(model=trl_setup.model(), args=weighted, tracker=grpo_tracker(8, num_rewards=2), **common)
    gdpo = trl.GRPOConfig(**trl_setup.config_kwargs(str(tmp_path), multi_objective_aggregation="normalize_then_sum"))
    with pytest.warns(UserWarning, match="aggregation='sum_then_normalize' .the config's: 'normalize_then_sum'."):
        TrackedGRPOTrainer(model=trl_setup.model(), args=gdpo, tracker=grpo_tracker(8, num_rewards=2), **common)
    with pytest.warns(
        UserWarning, match="num_rewards=1 and no reward_weights .*the tracker is given their weighted sum"
    ):
        TrackedGRPOTrainer(model=trl_setup.model(), args=gdpo, tracker=grpo_tracker(8), **common)
    trainer = TrackedGRPOTrainer(
        model=trl_setup.model(), args=config, tracker=grpo_tracker(8, memory="ema"), prompt_key="missing", **common
    )
    with pytest.raises(KeyError, match="no 'missing' column"):
        trainer.train()


def test_two_processes_give_the_advantages_of_one_process_on_the_gathered_batch(tmp_path):
    script = os.path.join(os.path.dirname(__file__), "trl_processes.py")
    environment = dict(os.environ, OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", script, str(tmp_path)]
    finished = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=240)
    assert finished.returncode == 0, finished.stderr[-4000:]
    records = [torch.load(tmp_path / f"process{index}.pt") for index in range(2)]
    assert [record["num_processes"] for record in records] == [2, 2]

    sys.path.insert(0, os.path.dirname(__file__))
    import trl_processes

    one = presets.trl_grpo(trl_processes.NUM_PROMPTS, **trl_processes.TRACKER_OPTIONS)
    for step in range(3):
        keys, rewards_per_func = records[0]["keys"][step], records[0]["rewards"][step]
        torch.testing.assert_close(records[1]["keys"][step], keys, rtol=0, atol=0)
        torch.testing.assert_close(records[1]["rewards"][step], rewards_per_func, rtol=0, atol=0, equal_nan=True)
        valid = ~rewards_per_func.isnan().all(dim=1)
        rewards = torch.where(valid, rewards_per_func.nansum(dim=1), 0.0)
        expected = one.update(keys, rewards, valid)
        ours = torch.cat([records[0]["advantages"][step], records[1]["advantages"][step]])
        torch.testing.assert_close(ours, expected, rtol=0, atol=0)
    for record in records:
        for name, value in one.state_dict().items():
            torch.testing.assert_close(record["state"][name], value, rtol=0, atol=0, equal_nan=True)


def test_checkpoint_file_is_in_every_checkpoint_directory(tmp_path):
    output_dir = str(tmp_path)
    trl_setup.run(
        TrackedGRPOTrainer,
        trl.GRPOConfig,
        output_dir=output_dir,
        max_steps=2,
        save_strategy="steps",
        save_steps=1,
        trainer_kwargs={"tracker": presets.trl_grpo(8, memory="ema", decay=0.9, keys="hashed")},
    )
    for step in (1, 2):
        saved = torch.load(os.path.join(output_dir, f"checkpoint-{step}", CHECKPOINT_FILE), weights_only=True)
        assert saved["format"] == 1 and "memory='ema'" in saved["tracker"]


def test_the_example_script_trains_both_runs_and_prints_what_changed():
    script = os.path.join(os.path.dirname(__file__), "..", "scripts", "trl_grpo_example.py")
    command = [sys.executable, script, "--steps=10", "--num_prompts=2", "--min_count=2"]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=240)
    assert finished.returncode == 0, finished.stderr[-4000:]
    lines = finished.stdout.splitlines()
    assert lines[0] == "TRL's GRPO (no tracker=)" and lines[6].startswith("with memory: AdvantageTracker(")
    signal = [float(line.split()[-1]) for line in lines if "tracker/zero_std_signal_frac" in line]
    assert signal[0] == 0.0 and len(signal) == 2  # TRL's own advantages give all-equal groups nothing
    bad = subprocess.run([sys.executable, script, "--ema_decay=1.5", "--memory=ema"], capture_output=True, text=True)
    assert bad.returncode != 0 and "--ema_decay must be in (0, 1)" in bad.stderr


def test_resume_into_a_tracker_with_other_options_warns_with_both(tmp_path):
    common = dict(reward_funcs=TWO_REWARDS, max_steps=2, save_strategy="steps", save_steps=1)
    trl_setup.run(
        TrackedGRPOTrainer,
        trl.GRPOConfig,
        output_dir=str(tmp_path / "a"),
        trainer_kwargs={"tracker": grpo_tracker(8, memory="buffer", buffer_size=8, min_count=2)},
        **common,
    )
    with pytest.warns(UserWarning, match="min_count=2.*is restored into.*min_count=3"):
        trl_setup.run(
            TrackedGRPOTrainer,
            trl.GRPOConfig,
            output_dir=str(tmp_path / "b"),
            resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-1"),
            trainer_kwargs={"tracker": grpo_tracker(8, memory="buffer", buffer_size=8, min_count=3)},
            **common,
        )
