"""The verl integration against verl itself: its ``compute_advantage``, ``DataProto`` and ``RayPPOTrainer``.

Every advantage here comes out of verl's own
``ray_trainer.compute_advantage`` on a real ``DataProto``, with the
estimator looked up in verl's registry by name, as ``fit`` does. The
trainer tests build a real ``TrackedRayPPOTrainer`` (a real config from
verl's generated ``ppo_trainer.yaml``, real dataloaders over rows shaped as
verl's ``RLHFDataset`` yields them, verl's ``collate_fn``), and call the
overridden methods as ``fit`` calls them. What cannot run here is Ray and
the model workers: the actor worker group, whose ``save_checkpoint`` and
``load_checkpoint`` write the model, is a stand-in that records its calls.
"""

from integration_imports import require

core_algos = require("verl.trainer.ppo.core_algos", "verl")
ray_trainer = require("verl.trainer.ppo.ray_trainer", "verl")

import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import uuid  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import verl  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from verl import DataProto  # noqa: E402
from verl.single_controller.ray import ResourcePoolManager  # noqa: E402
from verl.trainer.config import AlgoConfig  # noqa: E402
from verl.trainer.ppo.utils import Role  # noqa: E402
from verl.utils.dataset.rl_dataset import collate_fn  # noqa: E402

from rail_interview.integrations import verl as rail_verl  # noqa: E402
from rail_interview.stat_tracking import AdvantageTracker, presets, prompt_keys  # noqa: E402

EPS32 = torch.finfo(torch.float32).eps
#: The bound on |ours - verl's|, in units of EPS32 * (|advantage| + M / D) (see test_presets_match_verl).
BOUND_ULPS = 4


@pytest.fixture
def register():
    """Registers trackers under fresh names, and takes the names out of verl's registry afterwards."""
    names = []

    def add(tracker: AdvantageTracker) -> str:
        name = f"test_rail_{uuid.uuid4().hex[:12]}"
        rail_verl.register_tracker_estimator(name, tracker)
        names.append(name)
        return name

    yield add
    for name in names:
        core_algos.ADV_ESTIMATOR_REGISTRY.pop(name, None)


def random_batch(seed: int):
    """A batch as verl's fit holds it at compute_advantage: interleaved, uneven groups and varied masks.

    Returns the DataProto's pieces: token rewards float32 [bs, T], response
    mask int64 [bs, T] (each row a random length, some rows empty), uids (an
    object array of uuid strings, groups of 1 to 9 samples in a shuffled order).
    """
    generator = torch.Generator().manual_seed(seed)
    num_groups = int(torch.randint(1, 12, (), generator=generator))
    sizes = torch.randint(1, 10, (num_groups,), generator=generator)
    group = torch.repeat_interleave(torch.arange(num_groups), sizes)
    group = group[torch.randperm(len(group), generator=generator)]  # interleaved
    names = np.array([str(uuid.UUID(int=int(torch.randint(0, 2**62, (), generator=generator)))) for _ in sizes])
    uids = names[group.numpy()].astype(object)
    bs, length = len(group), int(torch.randint(1, 7, (), generator=generator))
    kind = seed % 4
    if kind == 0:  # a score on the last response token, as reward functions give it
        rewards = torch.zeros(bs, length)
        rewards[:, -1] = torch.randn(bs, generator=generator) * 10.0 ** float(
            torch.randint(-2, 3, (), generator=generator)
        )
    elif kind == 1:  # pass/fail: many zero-variance groups
        rewards = torch.randint(0, 2, (bs, length), generator=generator).float()
    elif kind == 2:  # a large offset, a small spread
        rewards = torch.randn(bs, length, generator=generator) * 1e-2 + 50.0
    else:
        rewards = torch.randn(bs, length, generator=generator)
    lengths = torch.randint(0, length + 1, (bs,), generator=generator)
    mask = (torch.arange(length) < lengths[:, None]).long()
    return rewards, mask, uids


def advantages(rewards: torch.Tensor, mask: torch.Tensor, uids: np.ndarray, estimator: str, **config) -> DataProto:
    """verl's ``compute_advantage`` on a fresh DataProto, as ``fit`` calls it (the config is the algorithm's)."""
    data = DataProto.from_dict(
        tensors={"token_level_rewards": rewards.clone(), "response_mask": mask.clone()},
        non_tensors={"uid": uids.copy()},
    )
    algorithm = AlgoConfig(adv_estimator=estimator, **config)
    return ray_trainer.compute_advantage(data, adv_estimator=estimator, config=algorithm)


def group_bound(rewards: torch.Tensor, uids: np.ndarray, reference: torch.Tensor, method: str) -> torch.Tensor:
    """BOUND_ULPS * EPS32 * (|a| + M / D) per sample, float64 [bs, 1].

    M is the largest |score| of the sample's group and D what verl divides
    the group's deviations by: the group's sample std + 1e-6 (GRPO) or
    (n - 1) / n (RLOO), 1 + 1e-6 or 1 for a group of one.
    """
    _, group = np.unique(uids.astype(str), return_inverse=True)
    group = torch.from_numpy(group.reshape(-1))
    scores = rewards.sum(-1).double()
    num = int(group.max()) + 1
    count = torch.bincount(group, minlength=num).double()[group]
    largest = torch.zeros(num, dtype=torch.float64).scatter_reduce(0, group, scores.abs(), "amax")[group]
    mean = torch.zeros(num, dtype=torch.float64).index_add(0, group, scores)[group] / count
    squares = torch.zeros(num, dtype=torch.float64).index_add(0, group, (scores - mean) ** 2)[group]
    if method == "grpo":
        divisor = torch.where(count > 1, (squares / (count - 1).clamp_min(1)).sqrt() + 1e-6, 1 + 1e-6)
    else:
        divisor = torch.where(count > 1, (count - 1) / count, 1.0)
    size = reference.abs().double().amax(-1)
    return (BOUND_ULPS * EPS32 * (size + largest / divisor))[:, None]


@pytest.mark.parametrize("method", ["grpo", "rloo"])
def test_presets_match_verl(method):
    """rail_verl_grpo / rail_verl_rloo give verl's grpo / rloo, to a few float32 ulps, through compute_advantage.

    Both compute one formula in float32 from the same scores (verl sums the
    token rewards the same way), with sums in a different order: verl takes
    torch.mean and torch.std of each group's stacked scores, and RLOO as
    r * n / (n - 1) - mean * n / (n - 1); the tracker sums groups with
    index_add_ and takes (r - mean) / (1 - 1 / n). Each rounds the group's
    mean to a few ulps of its largest score, an error then divided by the
    std (or multiplied by n / (n - 1)). So the bound per sample is
    4 * eps32 * (|advantage| + largest |score| of its group / divisor);
    these 48 batches reach at most about half of it.
    """
    worst = 0.0
    for seed in range(48):
        rewards, mask, uids = random_batch(seed)
        ours = advantages(rewards, mask, uids, f"rail_verl_{method}")
        verls = advantages(rewards, mask, uids, method)
        mine, theirs = ours.batch["advantages"], verls.batch["advantages"]
        assert mine.shape == theirs.shape == rewards.shape and mine.dtype == theirs.dtype == torch.float32
        assert ours.batch["returns"].equal(mine)
        assert (mine[mask == 0] == 0).all()  # masked tokens exactly 0, as verl's
        bound = group_bound(rewards, uids, theirs, method)
        assert ((mine - theirs).abs().double() <= bound).all(), f"seed {seed}"
        worst = max(worst, float(((mine - theirs).abs().double() / bound).max()))
        # Stamped uids (any key, even one shared by all) change nothing for a memoryless tracker.
        stamped = np.array([f"7/{uid}" for uid in uids], dtype=object)
        assert advantages(rewards, mask, stamped, f"rail_verl_{method}").batch["advantages"].equal(mine)
    assert worst < 1.0


def test_opo_preset_matches_verl():
    """rail_verl_opo gives verl's opo (r minus the length-weighted group mean) to float32 rounding.

    verl sums len * score over the group in stacked order and divides by the
    summed lengths; the tracker does the same sums with index_add_. Each
    rounds the baseline to a few ulps of the group's largest |score|. A group
    whose responses are all empty has a NaN baseline in verl (NaN tokens);
    here an empty response weighs 0 and gets advantage 0.
    """
    for seed in range(48):
        rewards, mask, uids = random_batch(seed)
        mine = advantages(rewards, mask, uids, "rail_verl_opo").batch["advantages"]
        theirs = advantages(rewards, mask, uids, "opo").batch["advantages"]
        assert mine.shape == theirs.shape and mine.dtype == theirs.dtype == torch.float32
        finite = torch.isfinite(theirs)
        assert (mine[~finite] == 0).all(), f"seed {seed}"
        scores = rewards.sum(-1).abs()
        largest = torch.tensor([float(scores[uids == uid].max()) for uid in uids])[:, None]
        bound = 4 * EPS32 * (theirs.abs().double() + largest)
        assert ((mine - theirs).abs().double() <= bound)[finite].all(), f"seed {seed}"


def gdpo_batch(seed: int, num_rewards: int):
    """A DataProto as verl's fit holds it at compute_advantage for ``gdpo``: C reward columns, prompts, masks.

    Responses have 1 to 6 tokens (verl's gdpo writes each score at the last
    response token, so an empty response has no place for it), groups are
    interleaved and uneven, rewards are pass/fail, graded or continuous.
    """
    generator = torch.Generator().manual_seed(seed)
    num_groups = int(torch.randint(1, 10, (), generator=generator))
    sizes = torch.randint(1, 8, (num_groups,), generator=generator)
    group = torch.repeat_interleave(torch.arange(num_groups), sizes)
    group = group[torch.randperm(len(group), generator=generator)]
    uids = np.array([f"uid{int(g)}" for g in group], dtype=object)
    bs, prompt_length, length = len(group), 3, 6
    lengths = torch.randint(1, length + 1, (bs,), generator=generator)
    lengths[0] = max(int(lengths[0]), 2)  # verl's whitening refuses a batch of one token
    response_mask = (torch.arange(length) < lengths[:, None]).long()
    attention_mask = torch.cat([torch.ones(bs, prompt_length, dtype=torch.long), response_mask], dim=1)
    columns = {}
    for c in range(num_rewards):
        kind = (seed + c) % 3
        if kind == 0:
            values = torch.randint(0, 2, (bs,), generator=generator).float()
        elif kind == 1:
            values = torch.randint(0, 5, (bs,), generator=generator).float() / 4
        else:
            values = torch.randn(bs, generator=generator)
        columns[f"reward_{c}"] = values.numpy().astype(np.float64)
    scores = sum(torch.from_numpy(columns[name]).float() for name in columns)
    token_rewards = torch.zeros(bs, length)
    token_rewards[torch.arange(bs), lengths - 1] = scores
    return DataProto.from_dict(
        tensors={
            "token_level_rewards": token_rewards,
            "response_mask": response_mask,
            "attention_mask": attention_mask,
            "prompts": torch.zeros(bs, prompt_length, dtype=torch.long),
        },
        non_tensors={"uid": uids, **columns},
    )


@pytest.mark.parametrize("weights", [None, [1.0, 0.5, 2.0]])
def test_gdpo_tracker_takes_verls_gdpo_slot_and_matches_it(weights):
    """presets.verl_gdpo registered as verl's "gdpo" (replace=True) gives verl's gdpo advantages.

    verl computes per reward key its GRPO in float32, sums with float32
    weights and whitens over tokens with rsqrt(var + 1e-8); the tracker does
    the same in float32 with its own summation order. The whitening divides
    by the batch std of the summed advantages, so rounding of a few ulps of
    the largest per-key advantage in each term bounds the difference: a
    relative 2e-5 of the batch's largest advantage holds over these batches.
    """
    names = [f"reward_{c}" for c in range(3)]
    config = dict(gdpo_reward_keys=names, **({} if weights is None else {"gdpo_reward_weights": weights}))
    original = core_algos.ADV_ESTIMATOR_REGISTRY["gdpo"]
    expected = []
    batches = [gdpo_batch(seed, 3) for seed in range(24)]
    for data in batches:
        algorithm = AlgoConfig(adv_estimator="gdpo", **config)
        expected.append(ray_trainer.compute_advantage(copy_proto(data), adv_estimator="gdpo", config=algorithm))
    tracker = presets.verl_gdpo(64, 3, reward_weights=weights)
    try:
        estimator = rail_verl.register_tracker_estimator("gdpo", tracker, replace=True)
        assert core_algos.get_adv_estimator_fn("gdpo") is estimator
        for seed, (data, want) in enumerate(zip(batches, expected)):
            algorithm = AlgoConfig(adv_estimator="gdpo", **config)
            got = ray_trainer.compute_advantage(copy_proto(data), adv_estimator="gdpo", config=algorithm)
            mine, theirs = got.batch["advantages"], want.batch["advantages"]
            assert mine.dtype == theirs.dtype == torch.float32 and mine.shape == theirs.shape
            assert (mine[data.batch["response_mask"] == 0] == 0).all()
            scale = float(theirs.abs().max()) + 1.0
            assert float((mine - theirs).abs().max()) <= 2e-5 * scale, f"seed {seed}"
    finally:
        core_algos.ADV_ESTIMATOR_REGISTRY["gdpo"] = original


def copy_proto(data: DataProto) -> DataProto:
    """A fresh DataProto with copies of ``data``'s tensors and columns (compute_advantage writes into it)."""
    return DataProto.from_dict(
        tensors={name: tensor.clone() for name, tensor in data.batch.items()},
        non_tensors={name: np.array(values, copy=True) for name, values in data.non_tensor_batch.items()},
    )


def test_several_rewards_are_refused_without_verls_columns():
    """A tracker of several rewards under a name other than "gdpo" never sees the columns: refused, state kept."""
    tracker = presets.verl_gdpo(16, 2, memory="buffer", buffer_size=4, keys="hashed")
    estimator = rail_verl.TrackerEstimator(tracker)
    data = gdpo_batch(0, 2)
    stamped = np.array([f"{i % 3}/{uid}" for i, uid in enumerate(data.non_tensor_batch["uid"])], dtype=object)
    before = state(tracker)
    args = (data.batch["token_level_rewards"], data.batch["response_mask"])
    with pytest.raises(ValueError, match="estimator named 'gdpo' only"):
        estimator(*args, index=stamped, config=AlgoConfig(adv_estimator="x"))
    columns = dict(data.non_tensor_batch)
    with pytest.raises(ValueError, match="names 1 rewards; the tracker takes 2"):
        estimator(*args, index=stamped, config={"gdpo_reward_keys": ["reward_0"]}, non_tensor_batch=columns)
    with pytest.raises(ValueError, match="differ from the tracker's reward_weights"):
        config = {"gdpo_reward_keys": ["reward_0", "reward_1"], "gdpo_reward_weights": [1.0, 2.0]}
        estimator(*args, index=stamped, config=config, non_tensor_batch=columns)
    with pytest.raises(ValueError, match=r"reward column\(s\) \['missing'\] not in the batch"):
        estimator(*args, index=stamped, config={"gdpo_reward_keys": ["reward_0", "missing"]}, non_tensor_batch=columns)
    assert_same_state(tracker, before)
    # Weights compare as given, not rounded to the tracker's float32: 0.3 and 0.7 are the config's 0.3 and 0.7.
    weighted = rail_verl.TrackerEstimator(presets.verl_gdpo(16, 2, reward_weights=[0.3, 0.7]))
    config = {"gdpo_reward_keys": ["reward_0", "reward_1"], "gdpo_reward_weights": [0.3, 0.7]}
    plain = np.array([str(uid) for uid in data.non_tensor_batch["uid"]], dtype=object)
    weighted(*args, index=plain, config=config, non_tensor_batch=columns)
    # With the columns, memory per reward: state [P, C, K].
    estimator(*args, index=stamped, config={"gdpo_reward_keys": ["reward_0", "reward_1"]}, non_tensor_batch=columns)
    assert tracker.state_dict()["rewards"].shape == (16, 2, 4)


def test_presets_are_registered_by_import():
    for name, build in zip(rail_verl.PRESETS, (presets.verl_grpo, presets.verl_rloo, presets.verl_opo), strict=True):
        tracker = rail_verl.registered_tracker(name)
        assert repr(tracker) == repr(build(rail_verl.PRESET_NUM_PROMPTS))
        assert core_algos.get_adv_estimator_fn(name).tracker is tracker


def prompt_rows(count: int, start: int = 0) -> list:
    """Rows as verl's RLHFDataset.__getitem__ yields them (raw_prompt messages, dummy_tensor, index, ...)."""
    return [
        {
            "raw_prompt": [{"role": "user", "content": f"What is {i} + {i}?"}],
            "dummy_tensor": torch.tensor([0], dtype=torch.uint8),
            "data_source": "toy",
            "reward_model": {"ground_truth": str(2 * i)},
            "extra_info": {"index": i},
            "index": i,
            "tools_kwargs": {},
            "interaction_kwargs": {},
        }
        for i in range(start, start + count)
    ]


def rollout_step(prompts: DataProto, estimator: str, rollouts: int, seed: int, stamp=None):
    """One step of ``fit`` from the uids to the advantages, minus generation: returns (batch, advantages [bs]).

    The prompts get fresh uuid uids (as fit does), ``stamp`` (the trainer's
    ``_get_gen_batch``, or ``stamp_uids``) splits or stamps them, they are
    repeated ``rollouts`` times interleaved (as fit does), and the rollouts
    get random rewards and response masks before verl's compute_advantage.
    """
    prompts.non_tensor_batch["uid"] = np.array([str(uuid.uuid4()) for _ in range(len(prompts))], dtype=object)
    if stamp is not None:
        stamp(prompts)
    batch = prompts.repeat(repeat_times=rollouts, interleave=True)
    generator = torch.Generator().manual_seed(seed)
    rewards = torch.zeros(len(batch), 4)
    rewards[:, -1] = torch.rand(len(batch), generator=generator)
    mask = (torch.arange(4) < torch.randint(1, 5, (len(batch), 1), generator=generator)).long()
    data = DataProto.from_dict(
        tensors={"token_level_rewards": rewards, "response_mask": mask},
        non_tensors={"uid": batch.non_tensor_batch["uid"]},
    )
    result = ray_trainer.compute_advantage(data, adv_estimator=estimator, config=AlgoConfig(adv_estimator=estimator))
    return batch, rewards.sum(-1), result.batch["advantages"][:, 0]  # first token, never masked


@pytest.mark.parametrize("memory", ["buffer", "ema"])
def test_memory_persists_across_steps_under_stable_keys(register, memory):
    options = dict(memory=memory, min_count=4, fallback="raw", keys="hashed")
    tracker = presets.grpo(16, **options)
    name = register(tracker)
    reference = presets.grpo(16, **options)  # the same tracker, fed directly with the prompts' keys
    keys = prompt_keys(['[{"content":"What is %d + %d?","role":"user"}]' % (i, i) for i in range(3)])
    for step in range(3):
        prompts = DataProto.from_single_dict(collate_fn(prompt_rows(3)))
        batch, scores, first = rollout_step(prompts, name, rollouts=2, seed=step, stamp=rail_verl.stamp_uids)
        # Six samples, two per prompt; the uids differ per step, the keys do not.
        assert rail_verl.uid_keys(batch.non_tensor_batch["uid"]).tolist() == keys.repeat_interleave(2).tolist()
        assert tracker.stats(keys).count.tolist() == [2 * (step + 1)] * 3  # memory grows across calls
        expected = reference.update(keys.repeat_interleave(2), scores)
        torch.testing.assert_close(first, expected, rtol=0, atol=0)
        memoryless = rollout_step(prompts, "rail_verl_grpo", rollouts=2, seed=step)[2]
        if step == 0:  # 2 rewards < min_count: the raw fallback, score / (1 + 1e-6)
            torch.testing.assert_close(first, scores / (1 + 1e-6))
        else:  # from step 2 on, the memory's statistics, not the group's alone
            assert not torch.allclose(first, memoryless)


def test_spo_runs_as_a_verl_estimator_with_one_rollout_per_prompt(register):
    # SPO's single stream inside verl: one rollout per prompt (rollout.n = 1), its Beta memory under the
    # prompts' stable keys, equal to presets.spo fed the keys directly, and to the transcription of SPO's recipe.
    from system_references import SpoBetaTracker  # pylint: disable=import-outside-toplevel

    tracker = presets.spo(16, rho=0.9, keys="hashed", dtype=torch.float64)
    name = register(tracker)
    direct = presets.spo(16, rho=0.9, keys="hashed", dtype=torch.float64)
    recipe = SpoBetaTracker({i: [] for i in range(4)}, offline_n=0, rho_type="constant", rho_value=0.9)
    keys = prompt_keys(['[{"content":"What is %d + %d?","role":"user"}]' % (i, i) for i in range(4)])
    for step in range(3):
        prompts = DataProto.from_single_dict(collate_fn(prompt_rows(4)))
        _, scores, first = rollout_step(prompts, name, rollouts=1, seed=step, stamp=rail_verl.stamp_uids)
        expected = direct.update(keys, scores.double())
        torch.testing.assert_close(first.double(), expected, rtol=1e-6, atol=1e-6)  # verl hands back float32
        torch.testing.assert_close(
            expected, recipe.step(list(range(4)), scores.double().tolist()), rtol=1e-12, atol=1e-12
        )
    assert tracker.query(keys).count.tolist() == [3] * 4


def state(tracker: AdvantageTracker) -> dict:
    return {name: tensor.clone() for name, tensor in tracker.state_dict().items()}


def assert_same_state(tracker: AdvantageTracker, before: dict) -> None:
    after = tracker.state_dict()
    assert after.keys() == before.keys() and all(after[name].equal(before[name]) for name in before)


def test_memory_refuses_plain_uuids_and_leaves_the_tracker_untouched(register):
    tracker = presets.grpo(8, memory="ema", min_count=2, keys="hashed")
    name = register(tracker)
    rewards, mask, uids = random_batch(3)
    stamped = np.array([f"{i % 5}/{uid}" for i, uid in enumerate(uids)], dtype=object)
    advantages(rewards, mask, stamped, name)  # some memory to keep
    before = state(tracker)
    with pytest.raises(ValueError, match="carry no stable prompt key.*TrackedRayPPOTrainer"):
        advantages(rewards, mask, uids, name)
    assert_same_state(tracker, before)


def test_bad_inputs_are_refused_before_the_tracker_changes():
    hashed = presets.grpo(4, memory="buffer", buffer_size=8, min_count=2, keys="hashed")
    ids = presets.grpo(4, memory="ema", min_count=2)
    memoryless = presets.verl_grpo(2)
    rewards, mask = torch.rand(3, 2), torch.ones(3, 2, dtype=torch.long)
    stamped = np.array(["1/a", "1/b", "2/c"], dtype=object)
    for tracker in (hashed, ids):
        rail_verl.TrackerEstimator(tracker)(rewards, mask, stamped)
    before = {id(hashed): state(hashed), id(ids): state(ids)}
    cases = [
        (hashed, (rewards.long(), mask, stamped), {}, TypeError, "floating tensor"),
        (hashed, (rewards, mask.tolist(), stamped), {}, TypeError, "response_mask must be a tensor"),
        (hashed, (rewards[:, 0], mask[:, 0], stamped), {}, ValueError, "2-D"),
        (hashed, (rewards, mask[:, :1], stamped), {}, ValueError, "of its shape"),
        (hashed, (rewards, mask, None), {}, ValueError, "index .* is missing"),
        (hashed, (rewards, mask, stamped[:2]), {}, ValueError, r"one uid per sample, \[3\]"),
        (hashed, (rewards, mask, np.array(["1/a", "b", "2/c"], dtype=object)), {}, ValueError, "1 of 3 uids"),
        (hashed, (rewards, mask, np.array(["x/a", "1/b", "2/c"], dtype=object)), {}, ValueError, "decimal int64"),
        (
            hashed,
            (torch.rand(6, 2), mask[:1].repeat(6, 1), np.array([f"{i}/u" for i in range(6)])),
            {},
            ValueError,
            "6 distinct prompts but the tracker has num_prompts=4",
        ),
        (ids, (rewards, mask, np.array(["1/a", "4/b", "2/c"], dtype=object)), {}, ValueError, r"outside \[0, 4\)"),
        (hashed, (rewards, mask, stamped), {"config": AlgoConfig(norm_adv_by_std_in_grpo=False)}, ValueError, "std"),
        (hashed, (rewards.clone().fill_(float("nan")), mask, stamped), {}, ValueError, "finite"),
        (memoryless, (rewards, mask, np.array(["a", "b", "c"], dtype=object)), {}, ValueError, "3 distinct uids"),
    ]
    for tracker, args, kwargs, error, message in cases:
        with pytest.raises(error, match=message):
            rail_verl.TrackerEstimator(tracker)(*args, **kwargs)
        if tracker is not memoryless:
            assert_same_state(tracker, before[id(tracker)])


def test_registration_refuses_taken_names_and_unfit_trackers():
    existing = core_algos.ADV_ESTIMATOR_REGISTRY["rail_verl_grpo"]
    for name in ("rail_verl_grpo", "grpo", "gae", "reinforce_plus_plus_baseline"):
        with pytest.raises(ValueError, match=f"named '{name}' is already registered.*replace=True"):
            rail_verl.register_tracker_estimator(name, presets.verl_grpo(4))
    assert core_algos.ADV_ESTIMATOR_REGISTRY["rail_verl_grpo"] is existing
    try:  # replace=True takes the name, for this process
        replaced = rail_verl.register_tracker_estimator("rail_verl_grpo", presets.verl_grpo(4), replace=True)
        assert core_algos.ADV_ESTIMATOR_REGISTRY["rail_verl_grpo"] is replaced is not existing
    finally:
        core_algos.ADV_ESTIMATOR_REGISTRY["rail_verl_grpo"] = existing
    with pytest.raises(TypeError, match="non-empty string"):
        rail_verl.register_tracker_estimator("", presets.verl_grpo(4))
    with pytest.raises(TypeError, match="AdvantageTracker"):
        rail_verl.register_tracker_estimator("test_rail_not_a_tracker", core_algos.compute_rloo_outcome_advantage)
    assert "test_rail_not_a_tracker" not in core_algos.ADV_ESTIMATOR_REGISTRY
    with pytest.raises(ValueError, match="names .*compute_grpo_outcome_advantage.*not a tracker estimator"):
        rail_verl.registered_tracker(core_algos.AdvantageEstimator.GRPO)


class ActorGroupStandIn:
    """Stands in for the actor's Ray worker group (the one thing here that needs Ray and a model).

    Writes a marker where the worker group would write the model, and records where it is asked to load from.
    """

    def __init__(self) -> None:
        self.loaded = []

    def save_checkpoint(self, local_path, remote_path, global_step, max_ckpt_to_keep=None):
        os.makedirs(local_path, exist_ok=True)
        with open(os.path.join(local_path, "model.txt"), "w") as file:
            file.write(str(global_step))

    def load_checkpoint(self, local_path, del_local_after_load=False):
        self.loaded.append(local_path)


def make_trainer(estimator: str, checkpoints: str, **trainer_options):
    """A real TrackedRayPPOTrainer on CPU: verl's generated config, real dataloaders, no Ray."""
    config = OmegaConf.load(os.path.join(os.path.dirname(verl.__file__), "trainer/config/_generated_ppo_trainer.yaml"))
    config.algorithm.adv_estimator = estimator
    config.data.train_batch_size = 2
    config.data.dataloader_num_workers = 0
    config.trainer.total_epochs = 1
    config.trainer.default_local_dir = checkpoints
    for key, value in trainer_options.items():
        config.trainer[key] = value
    rows = prompt_rows(6)
    with pytest.warns(FutureWarning, match="deprecated"):  # verl's legacy trainer says so when built
        trainer = rail_verl.TrackedRayPPOTrainer(
            config=config,
            tokenizer=None,
            role_worker_mapping={Role.ActorRollout: object},
            resource_pool_manager=ResourcePoolManager(resource_pool_spec={}, mapping={}),
            train_dataset=rows,
            val_dataset=rows,
            collate_fn=collate_fn,
        )
    trainer.actor_rollout_wg = ActorGroupStandIn()
    return trainer


def test_trainer_stamps_uids_and_checkpoints_the_tracker(register, tmp_path, capsys):
    options = dict(memory="ema", decay=0.8, min_count=4, keys="hashed")
    name = register(presets.grpo(32, **options))
    checkpoints = str(tmp_path / "checkpoints")
    trainer = make_trainer(name, checkpoints)
    assert trainer.advantage_tracker is rail_verl.registered_tracker(name)
    loader = iter(trainer.train_dataloader)
    for step in (1, 2):
        prompts = DataProto.from_single_dict(next(loader))
        raw_prompts = prompts.non_tensor_batch["raw_prompt"].copy()
        generation = []
        batch, _, _ = rollout_step(
            prompts, name, rollouts=3, seed=step, stamp=lambda b: generation.append(trainer._get_gen_batch(b))
        )
        # fit's batch and its generation batch carry the same stamped uids, keyed by the prompts' messages.
        (gen_batch,) = generation
        uids = prompts.non_tensor_batch["uid"]
        assert list(gen_batch.non_tensor_batch["uid"]) == list(uids)
        assert "raw_prompt" in gen_batch.non_tensor_batch and "raw_prompt" not in prompts.non_tensor_batch
        keys = rail_verl.uid_keys(uids)
        expected = rail_verl.prompt_keys_of(
            DataProto.from_single_dict({"dummy": torch.zeros(2), "raw_prompt": raw_prompts})
        )
        assert keys.tolist() == expected.tolist() and len(set(uids)) == 2
    trainer.global_steps = 2
    trainer._save_checkpoint()
    step_folder = os.path.join(checkpoints, "global_step_2")
    assert sorted(os.listdir(step_folder)) == ["actor", "data.pt", rail_verl.TRACKER_FILE]
    with open(os.path.join(checkpoints, "latest_checkpointed_iteration.txt")) as file:
        assert file.read() == "2"
    saved = state(trainer.advantage_tracker)
    assert int(saved["clock"]) == 12  # two steps of 2 prompts x 3 rollouts

    # A new process's trainer: a fresh tracker of the same options, resuming from the latest checkpoint.
    resumed_name = register(presets.grpo(32, **options))
    resumed = make_trainer(resumed_name, checkpoints)
    resumed.global_steps = 0
    resumed._load_checkpoint()
    assert resumed.global_steps == 2
    assert resumed.actor_rollout_wg.loaded == [os.path.join(os.path.abspath(step_folder), "actor")]
    assert_same_state(resumed.advantage_tracker, saved)
    # verl restored its dataloader from data.pt too: both trainers go on with the same third batch.
    following = next(iter(resumed.train_dataloader))["raw_prompt"]
    assert [m[0]["content"] for m in following] == [m[0]["content"] for m in next(loader)["raw_prompt"]]
    # And both trackers give the same advantages from here on.
    prompts = DataProto.from_single_dict(collate_fn(prompt_rows(2)))
    first = rollout_step(prompts, name, rollouts=3, seed=3, stamp=rail_verl.stamp_uids)[2]
    again = rollout_step(prompts, resumed_name, rollouts=3, seed=3, stamp=rail_verl.stamp_uids)[2]
    assert first.equal(again)

    # resume_path loads that folder; resume_mode=disable loads nothing.
    by_path = make_trainer(register(presets.grpo(32, **options)), str(tmp_path / "elsewhere"))
    by_path.config.trainer.resume_mode = "resume_path"
    by_path.config.trainer.resume_from_path = step_folder
    by_path._load_checkpoint()
    assert_same_state(by_path.advantage_tracker, saved)
    disabled = make_trainer(register(presets.grpo(32, **options)), checkpoints, resume_mode="disable")
    disabled._load_checkpoint()
    assert disabled.actor_rollout_wg.loaded == [] and int(disabled.advantage_tracker.state_dict()["clock"]) == 0
    capsys.readouterr()  # verl prints its progress


def test_tracker_state_files(tmp_path):
    tracker = presets.grpo(4, memory="buffer", buffer_size=4, min_count=2)
    tracker.update(torch.tensor([0, 0, 1]), torch.tensor([1.0, 0.0, 0.5]))
    path = rail_verl.save_tracker_state(tracker, str(tmp_path / "global_step_1"))
    assert os.listdir(tmp_path / "global_step_1") == [rail_verl.TRACKER_FILE] and path.endswith(
        "rail_interview_tracker.pt"
    )
    other = presets.grpo(5, memory="buffer", buffer_size=4, min_count=2)
    before = state(other)
    with pytest.raises(ValueError, match="does not fit"):
        rail_verl.load_tracker_state(other, str(tmp_path / "global_step_1"))
    assert_same_state(other, before)
    with pytest.raises(FileNotFoundError, match="memory .buffer. would start over.*save_tracker_state"):
        rail_verl.load_tracker_state(other, str(tmp_path))
    assert not rail_verl.load_tracker_state(presets.verl_grpo(4), str(tmp_path))  # nothing to lose without memory


def test_trainer_needs_a_tracker_estimator(tmp_path):
    with pytest.raises(ValueError, match="'grpo' names .* not a tracker estimator"):
        make_trainer("grpo", str(tmp_path))


def test_keys_are_pinned_and_stamping_is_idempotent():
    """Keys are the same in every process and run: pinned here (BLAKE2b and token_keys' hash, not Python's hash)."""
    raw_prompt = np.fromiter([[{"role": "user", "content": "What is 1 + 1?"}], "What is 1 + 1?"], dtype=object)
    batch = DataProto.from_single_dict(
        {
            "input_ids": torch.tensor([[0, 0, 5, 6], [5, 6, 0, 0]]),
            "attention_mask": torch.tensor([[0, 0, 1, 1], [1, 1, 0, 0]]),
            "raw_prompt": raw_prompt,
            "index": np.array([3, 2**62], dtype=object),
        }
    )
    assert rail_verl.prompt_keys_of(batch).tolist() == [-3289331471951313879, -6341082405051275806]
    assert rail_verl.prompt_keys_of(batch, "index").tolist() == [3, 2**62]
    assert rail_verl.prompt_keys_of(batch, "input_ids").tolist() == [-4746873406069132101] * 2  # padding does not count
    batch.non_tensor_batch["uid"] = np.array(["0f8e", "c2a1"], dtype=object)
    uids = rail_verl.stamp_uids(batch)
    assert uids.tolist() == ["-3289331471951313879/0f8e", "-6341082405051275806/c2a1"]
    assert rail_verl.stamp_uids(batch).tolist() == uids.tolist()  # stamping again changes nothing
    assert not any("_" in uid for uid in uids)  # verl's V1 trainer splits its keys on "_"
    with pytest.raises(KeyError, match="no column 'prompt'.*raw_prompt"):
        rail_verl.prompt_keys_of(batch, "prompt")
    batch.non_tensor_batch["image"] = np.array([object(), object()], dtype=object)
    with pytest.raises(ValueError, match="prompt 0 cannot be keyed.*another column"):
        rail_verl.prompt_keys_of(batch, "image")


def test_verl_imports_the_presets_in_every_process():
    """VERL_USE_EXTERNAL_MODULES: a fresh process that imports verl has the presets, without ray_trainer."""
    code = (
        "import sys, verl\n"
        "from verl.trainer.ppo import core_algos\n"
        "print(type(core_algos.get_adv_estimator_fn('rail_verl_rloo')).__name__)\n"
        "print('verl.trainer.ppo.ray_trainer' in sys.modules)\n"
    )
    environment = dict(os.environ, VERL_USE_EXTERNAL_MODULES="rail_interview.integrations.verl")
    result = subprocess.run([sys.executable, "-c", code], env=environment, capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["TrackerEstimator", "False"]
