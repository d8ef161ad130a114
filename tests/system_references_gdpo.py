"""Plain transcriptions of two public GDPO advantage computations: several rewards per sample.

GDPO (https://arxiv.org/abs/2601.05242) normalises each reward component within its
prompt's group before the weighted sum, so that one reward's scale does not drown
another's, then normalises the sum over the batch. Two public trainers implement it:

* NeMo-RL (NVIDIA-NeMo/RL) ``GDPOAdvantageEstimator``: ``nemo_rl_gdpo_advantages``;
* Flow-Factory (X-GenGroup/Flow-Factory) ``AdvantageProcessor.compute_gdpo``:
  ``FlowFactoryAdvantageProcessor``.

As in ``system_references.py``, each one keeps its source's loops, calls and
constants, in float64, for a flat batch given as N prompt ids (any hashables; a
group is the samples of one id, in any positions) and the rewards of each
component. What had to change is said in each docstring.

Rewards are given as the systems take them, a mapping from a component's name to
its N rewards, or as an [N, C] array whose column c becomes the component named
``f"{prefix}{c:0Nd}"`` (zero-padded, so that sorting the names keeps the columns'
order, which NeMo-RL's weights depend on).
"""

from typing import Dict, Hashable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

Rewards = Union[Mapping[str, Sequence[float]], Sequence[Sequence[float]], np.ndarray, torch.Tensor]


def _components(rewards: Rewards, prefix: str) -> Dict[str, torch.Tensor]:
    """A name -> float64 [N] tensor mapping, from a mapping (names kept) or an [N, C] array (named by column)."""
    if isinstance(rewards, Mapping):
        return {key: torch.as_tensor(np.asarray(value, dtype=np.float64)) for key, value in rewards.items()}
    table = torch.as_tensor(np.asarray(rewards, dtype=np.float64))
    if table.ndim != 2:
        raise ValueError(f"rewards must be [N, C], got shape {tuple(table.shape)}")
    width = len(str(max(table.shape[1] - 1, 0)))
    return {f"{prefix}{c:0{width}d}": table[:, c].clone() for c in range(table.shape[1])}


def _prompt_numbers(prompts: Sequence[Hashable]) -> List[int]:
    """Each prompt's number, in order of first appearance (the systems take integer ids)."""
    numbers: Dict[Hashable, int] = {}
    return [numbers.setdefault(prompt, len(numbers)) for prompt in prompts]


# NeMo-RL ------------------------------------------------------------------------------------------

NEMO_RL_COMMIT = "7ea279abfbeb698b092856d0dab61e7cf39bc909"


def nemo_rl_calculate_baseline_and_std_per_prompt(
    prompts: torch.Tensor,
    rewards: torch.Tensor,
    valid_mask: torch.Tensor,
    leave_one_out_baseline: bool = True,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """NeMo-RL ``nemo_rl/algorithms/utils.py``, ``calculate_baseline_and_std_per_prompt``.

    Transcribed from NVIDIA-NeMo/RL at commit 7ea279abfbeb698b092856d0dab61e7cf39bc909
    (the newest snapshot, 2026-08-22; the file last changed in ea147e38db68).

    What it does, per prompt (``torch.unique(prompts, dim=0)``; a group is the rows
    of ``prompts`` equal to it, ``.all(1)``):

    * A group with at most one valid sample: baseline = the sample's own reward,
      std stays 0 (so its advantage is 0).
    * Otherwise a mask matrix, ``1 - eye(n)`` (leave one out) or ``ones(n, n)``;
      ``num_valid`` = valid samples of the group, minus 1 when leaving one out;
      baseline = ``mask @ (r * valid) / num_valid``, the mean of the others (or
      of all); the second moment likewise, ``mask @ (r ** 2 * valid) / num_valid``;
      std = ``sqrt((E[r^2] - E[r]^2) * num_valid / (num_valid - 1))`` with
      ``.nan_to_num(0)``. So with leave-one-out each sample has its own std, that
      of the other samples' rewards; the variance is not centred (second moment
      minus squared mean), and a negative or NaN result becomes std 0. With
      leave-one-out and two samples ``num_valid = 1``: ``0 * (1 / 0)`` is NaN and
      the std 0.

    Changes: upstream's mask matrix is float32 (``torch.eye`` / ``torch.ones``
    default dtype), as is ``num_valid`` (``valid_mask.float()``), so
    ``num_valid / (num_valid - 1)`` is rounded to float32 (4/3 becomes
    1.33333337) and float64 rewards would fail in ``torch.matmul`` (dtypes
    differ); here both take the rewards' dtype. The device handling is left out,
    and so is ``std_rewards`` (GDPO does not pass it: the std is of ``rewards``).

    Args:
        prompts: [N, S] prompt ids (upstream the prompts' tokens; here [N, 1] numbers).
        rewards: [N] float64 rewards.
        valid_mask: [N] 0/1, 1 to keep a sample.
        leave_one_out_baseline: leave each sample out of its own baseline and std.

    Returns:
        float64 [N] baselines and [N] stds.
    """
    unique_prompts = torch.unique(prompts, dim=0)

    baseline = torch.zeros_like(rewards)
    sq_baseline = torch.zeros_like(rewards)
    std = torch.zeros_like(rewards)

    for i in range(len(unique_prompts)):
        is_matching_prompt = (prompts == unique_prompts[i]).all(1)
        prompt_idx = torch.arange(len(prompts))[is_matching_prompt]

        if leave_one_out_baseline:
            baseline_mask_matrix = 1 - torch.eye(len(prompt_idx), dtype=rewards.dtype)
        else:
            baseline_mask_matrix = torch.ones((len(prompt_idx), len(prompt_idx)), dtype=rewards.dtype)

        if valid_mask[prompt_idx].sum() <= 1:
            # Ignore sample: there are no valid responses, so set baseline equal to reward
            # to ignore it in the loss computation
            baseline[prompt_idx] = rewards[prompt_idx]
        else:
            num_valid = valid_mask[prompt_idx].to(rewards.dtype).sum() - int(leave_one_out_baseline)
            prompt_baseline = (
                torch.matmul(baseline_mask_matrix, rewards[prompt_idx] * valid_mask[prompt_idx]) / num_valid
            )
            std_prompt_baseline = prompt_baseline  # ``std_rewards is rewards``
            std_prompt_baseline_square = (
                torch.matmul(baseline_mask_matrix, torch.pow(rewards[prompt_idx], 2) * valid_mask[prompt_idx])
                / num_valid
            )

            baseline[prompt_idx] = prompt_baseline
            sq_baseline[prompt_idx] = std_prompt_baseline_square
            std[prompt_idx] = (
                ((std_prompt_baseline_square - std_prompt_baseline.square()) * (num_valid / (num_valid - 1)))
                .sqrt()
                .nan_to_num(0)
            )

    return baseline, std


def nemo_rl_gdpo_advantages(
    prompts: Sequence[Hashable],
    rewards: Rewards,
    reward_weights: Optional[Sequence[float]] = None,
    normalize_rewards: bool = True,
    use_leave_one_out_baseline: bool = True,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """NeMo-RL ``nemo_rl/algorithms/advantage_estimator.py``, ``GDPOAdvantageEstimator.compute_advantage``.

    Transcribed from NVIDIA-NeMo/RL at commit 7ea279abfbeb698b092856d0dab61e7cf39bc909
    (the newest snapshot, 2026-08-22; the file last changed in ea147e38db68), with
    ``get_gdpo_reward_component_keys`` from ``nemo_rl/algorithms/utils.py``.

    What it does, in order:

    1. The components are the batch's keys that start with ``"reward/"``, sorted
       by name; fewer than two is a ValueError (GDPO refuses a single reward).
       ``reward_weights`` (None: all 1.0) must have one weight per component, in
       that sorted order, else ValueError.
    2. Per component, ``calculate_baseline_and_std_per_prompt`` with every sample
       valid (``torch.ones_like``); ``adv_k = r - baseline``; with
       ``normalize_rewards``, the samples whose std is > 0 are divided by
       ``std + 1e-6``; a std of 0 leaves the sample unscaled (not zeroed).
    3. ``advantages = sum(weight * adv_k)`` (Python ``sum``, from 0, in the
       sorted order).
    4. Over the whole batch: ``(a - a.mean()) / a.std()`` (``torch.std``,
       Bessel-corrected, no epsilon) if that std is > 0, else ``a - a.mean()``.
       This runs whatever ``normalize_rewards`` says. A batch of one has std NaN
       (with a warning), which is not > 0: its advantage is 0.

    Interpretations and changes:

    * Upstream ``prompt_ids`` are the prompts' token rows [N, S]; here any
      hashables, numbered in order of appearance and made an [N, 1] tensor.
    * Rewards are float64 by default. Upstream's are float32, and its
      uncentred variance then matters: for a sample whose leave-one-out
      rewards are all equal (say [11.775, 11.775, 11.775]) float32 rounding can
      leave ``E[r^2] - E[r]^2`` a little above 0, a std of about 4e-3 instead
      of 0, and that sample's component advantage is multiplied by about 250
      where float64 leaves it unscaled; after the batch normalisation it
      dominates the batch. ``dtype=torch.float32`` runs every step in float32,
      as upstream does.
    * The estimator's config defaults are ``normalize_rewards=True`` and
      ``use_leave_one_out_baseline=True`` (``AdvEstimatorConfig``); the GDPO
      example ``examples/configs/gdpo_math_1B.yaml`` sets
      ``use_leave_one_out_baseline: false``.
    * Upstream returns ``advantages.expand(mask.shape)``, [N, T]: the token mask
      only sets the shape and enters no statistic. Here the [N] column.
    * NaN rewards are not handled: a NaN reaches its group's baselines, the
      batch mean and std, and every advantage of the batch is NaN.

    Args:
        prompts: [N] prompt ids.
        rewards: ``"reward/<name>"`` -> [N] rewards (other keys ignored, as
            upstream), or an [N, C] array whose columns are the components in
            order.
        reward_weights: [C] weights in the components' sorted order, or None.
        normalize_rewards: divide each component's advantage by its std.
        use_leave_one_out_baseline: each sample's baseline and std leave it out.
        dtype: of the rewards and so of every statistic; torch.float32 is upstream's.

    Returns:
        [N] advantages in ``dtype``.
    """
    repeated_batch = {key: value.to(dtype) for key, value in _components(rewards, "reward/").items()}
    prompt_ids = torch.tensor(_prompt_numbers(prompts), dtype=torch.int64).unsqueeze(-1)

    reward_component_keys = sorted(k for k in repeated_batch.keys() if isinstance(k, str) and k.startswith("reward/"))
    if len(reward_component_keys) < 2:
        raise ValueError(
            f"GDPO requires multiple reward components (reward/name1, reward/name2, ...). "
            f"This batch has {len(reward_component_keys)} component(s): {reward_component_keys}."
        )
    weights = reward_weights
    if weights is None:
        weights = [1.0] * len(reward_component_keys)
    elif len(weights) != len(reward_component_keys):
        raise ValueError(
            f"reward_weights has {len(weights)} entries but this batch has "
            f"{len(reward_component_keys)} reward components ({reward_component_keys})."
        )
    valid = torch.ones_like(repeated_batch[reward_component_keys[0]])
    leave_one_out = use_leave_one_out_baseline
    assert prompt_ids.shape[0] == valid.shape[0], (
        f"prompt_ids must match reward batch size; got {prompt_ids.shape[0]} vs {valid.shape[0]}"
    )
    advantage_parts = []
    for key in reward_component_keys:
        r = repeated_batch[key]
        base, std_k = nemo_rl_calculate_baseline_and_std_per_prompt(
            prompt_ids,
            r,
            valid,
            leave_one_out_baseline=leave_one_out,
        )
        adv_k = (r - base).unsqueeze(-1)
        if normalize_rewards:
            epsilon = 1e-6
            non_zero_std_mask = std_k > 0
            adv_k[non_zero_std_mask] = adv_k[non_zero_std_mask] / (std_k.unsqueeze(-1)[non_zero_std_mask] + epsilon)

        advantage_parts.append(adv_k)

    advantages = sum(weight * adv_k for weight, adv_k in zip(weights, advantage_parts))
    # Normalize combined advantage to zero mean and unit std
    adv_std = advantages.std()
    if adv_std > 0:
        advantages = (advantages - advantages.mean()) / adv_std
    else:
        advantages = advantages - advantages.mean()

    return advantages.squeeze(-1)


# Flow-Factory -------------------------------------------------------------------------------------

FLOW_FACTORY_COMMIT = "a0b2bc5a2b4fbf9125429b3fb70c0c5d7631047c"


class FlowFactoryAdvantageProcessor:
    """Flow-Factory ``src/flow_factory/advantage/advantage_processor.py``, ``AdvantageProcessor`` (GDPO only).

    Transcribed from X-GenGroup/Flow-Factory at commit
    a0b2bc5a2b4fbf9125429b3fb70c0c5d7631047c (the newest snapshot, 2026-05-02;
    the file last changed in cbee8a2240fd). ``compute_advantages`` with
    ``aggregation_func=None`` runs ``"gdpo"``; the trainers pass
    ``training_args.advantage_aggregation``, whose default is ``'gdpo'``
    (``GRPOTrainingArguments``, ``hparams/training_args.py``), with
    ``global_std`` defaulting to True there and in the processor.

    What ``compute_gdpo`` does, in order (one process):

    1. ``collect_group_rewards``: each reward as a numpy array; the groups are
       ``np.unique(unique_ids, return_inverse=True)``.
    2. For each reward, in the mapping's order, for each group: ``np.mean`` and
       ``max(np.std(group), 1e-6)`` (population std, floored at 1e-6: a
       zero-variance group or a singleton gets 0; a group whose std is below
       1e-6 is divided by 1e-6); ``(r - mean) / std``, times the reward's weight
       (``reward_weights[key]``: a reward without one is a KeyError).
    3. ``np.sum`` over the rewards.
    4. ``_global_mean_std`` of the sum, then ``(sum - mean) / std``. With
       ``sampler_type="group_contiguous"`` (what ``"auto"`` resolves to unless
       the prompts do not divide over the ranks) it reduces ``(count, sum, sum
       of squares)`` and takes ``std = max((ss / n - mean ** 2) ** 0.5, 1e-6)``,
       a population variance that is not centred; with
       ``"distributed_k_repeat"`` (gathered arrays) ``np.mean`` and
       ``max(np.std(values), 1e-6)``.

    ``global_std`` is stored and never read by ``compute_gdpo``: it switches
    only the ``"sum"`` aggregation (``compute_weighted_sum``) between the
    batch's std and each group's. So ``aggregation_func="gdpo"`` with
    ``global_std=True`` computes exactly what it does with ``global_std=False``.
    The same held before the processor was split out (``GRPOTrainer.
    compute_advantages_gdpo`` in ``trainers/grpo.py`` at cc83694).
    ``compute_gdpo`` does not check the groups' size (``compute_weighted_sum``
    raises on a group of other than ``group_size`` samples), so singletons and
    unequal groups go through.

    Interpretations and changes:

    * Float64 throughout unless ``upstream_float32``. Upstream ``"distributed_k_repeat"`` casts rewards and
      ids to float32 (``.float()``) before the gather, and
      ``"group_contiguous"`` builds its ``(count, sum, sum of squares)`` with
      ``torch.tensor([...])`` (float32 by default), so upstream's batch mean
      and std carry float32 rounding; rewards arrive as the reward models give
      them (typically float32), and numpy then computes the per-group
      statistics in that dtype. The 1e-6 floor is below float32's resolution
      for rewards near 1: a group of three rewards 1.892 has a float32
      ``np.mean`` one ulp (2^-23) low and ``np.std`` 2^-23, so each of its
      samples gets 2^-23 / 1e-6 = 0.119 where float64 gives 0.
      ``upstream_float32=True`` reproduces that.
    * One process: the all-reduce, the gather and ``_to_local``'s slice are
      identities. ``unique_id`` (an int per prompt) is here any hashable,
      numbered in order of appearance.
    * Metrics (``_build_gdpo_log_data``) and writing into the samples are left
      out. Upstream returns a tensor on the accelerator's device; here a CPU
      float64 tensor.
    * NaN rewards are not handled: ``max(nan, 1e-6)`` is NaN, the batch mean is
      NaN, every advantage of the batch is NaN. A negative uncentred variance
      would raise a TypeError upstream (``max`` of a complex number); here too.

    Args:
        reward_weights: reward name -> weight.
        group_size: K, samples per prompt (read by the ``"sum"`` path only).
        global_std: stored, unused by GDPO.
        sampler_type: ``"group_contiguous"`` or ``"distributed_k_repeat"``.
        upstream_float32: reproduce upstream with float32 reward tensors: the
            rewards are float32, ``"distributed_k_repeat"`` casts with
            ``.float()``, the reduced ``(count, sum, sum of squares)`` is float32.
    """

    def __init__(
        self,
        reward_weights: Mapping[str, float],
        group_size: int,
        global_std: bool = True,
        sampler_type: str = "distributed_k_repeat",
        upstream_float32: bool = False,
    ) -> None:
        self.upstream_float32 = upstream_float32
        self.reward_dtype = torch.float32 if upstream_float32 else torch.float64
        self.reward_weights = dict(reward_weights)
        self.group_size = group_size
        self.global_std = global_std
        self.sampler_type = sampler_type
        self.group_on_same_rank = sampler_type == "group_contiguous"

    def collect_group_rewards(
        self, prompts: Sequence[Hashable], rewards: Mapping[str, torch.Tensor]
    ) -> Tuple[Dict[str, np.ndarray], np.ndarray]:
        """Rewards as numpy arrays and each sample's group index (``np.unique(..., return_inverse=True)``)."""
        unique_id_list = _prompt_numbers(prompts)
        rewards = {key: torch.as_tensor(value).to(self.reward_dtype) for key, value in rewards.items()}
        if self.group_on_same_rank:
            collected_rewards = {key: torch.as_tensor(value).cpu().numpy() for key, value in rewards.items()}
            unique_ids = np.array(unique_id_list, dtype=np.int64)
            _unique_ids, group_indices = np.unique(unique_ids, return_inverse=True)
            return collected_rewards, group_indices
        rewards = {key: torch.as_tensor(value) for key, value in rewards.items()}
        reward_keys = list(rewards.keys())
        unique_ids = torch.tensor(unique_id_list, dtype=torch.int64)
        # Upstream ``.float()`` (float32) on both; float64 here unless upstream_float32.
        columns = [rewards[k].view(-1).to(self.reward_dtype) for k in reward_keys]
        columns.append(unique_ids.to(self.reward_dtype))
        packed = torch.stack(columns, dim=1)  # (B, N+1)

        gathered = packed.cpu().numpy()  # accelerator.gather on one process

        collected_rewards = {key: gathered[:, i] for i, key in enumerate(reward_keys)}
        gathered_ids = gathered[:, -1].astype(np.int64)
        _unique_ids, group_indices = np.unique(gathered_ids, return_inverse=True)
        return collected_rewards, group_indices

    def _global_mean_std(self, values: np.ndarray) -> tuple:
        """Batch mean and std: uncentred from (count, sum, sum of squares), or ``np.mean`` / ``np.std``."""
        if self.group_on_same_rank:
            # Upstream: torch.tensor([...]) is float32; float64 here.
            t = torch.tensor(
                [float(len(values)), float(np.sum(values)), float(np.sum(values**2))],
                dtype=torch.float32 if self.upstream_float32 else torch.float64,
            )
            # accelerator.reduce(t, reduction="sum") on one process: t.
            n, s, ss = t[0].item(), t[1].item(), t[2].item()
            mean = s / n
            std = max((ss / n - mean**2) ** 0.5, 1e-6)
        else:
            mean = float(np.mean(values))
            std = max(float(np.std(values)), 1e-6)
        return mean, std

    def compute_gdpo(self, prompts: Sequence[Hashable], rewards: Rewards) -> torch.Tensor:
        """``compute_gdpo`` (metrics and the write into samples left out).

        Args:
            prompts: [N] prompt ids.
            rewards: name -> [N] rewards (iterated in the mapping's order), or
                an [N, C] array whose column c is named ``f"r{c}"`` (zero-padded).

        Returns:
            float64 [N] advantages.
        """
        gathered_rewards, group_indices = self.collect_group_rewards(prompts, _components(rewards, "r"))

        # Per-reward group-wise normalisation
        all_reward_advantages = []
        for key, reward_array in gathered_rewards.items():
            reward_adv = np.zeros_like(reward_array, dtype=np.float64)
            for group_id in np.unique(group_indices):
                mask = group_indices == group_id
                group_rewards = reward_array[mask]
                mean = np.mean(group_rewards)
                std = max(np.std(group_rewards), 1e-6)
                reward_adv[mask] = (group_rewards - mean) / std
            all_reward_advantages.append(reward_adv * self.reward_weights[key])

        # Combine and batch normalise
        combined_advantages = np.sum(all_reward_advantages, axis=0)
        bn_mean, bn_std = self._global_mean_std(combined_advantages)
        advantages = (combined_advantages - bn_mean) / bn_std

        return torch.as_tensor(advantages)


def flow_factory_gdpo_advantages(
    prompts: Sequence[Hashable],
    rewards: Rewards,
    reward_weights: Optional[Union[Mapping[str, float], Sequence[float]]] = None,
    sampler_type: str = "group_contiguous",
    global_std: bool = True,
    upstream_float32: bool = False,
) -> torch.Tensor:
    """Flow-Factory's ``aggregation_func="gdpo"`` on one batch: ``FlowFactoryAdvantageProcessor.compute_gdpo``.

    Args:
        prompts: [N] prompt ids.
        rewards: name -> [N] rewards, or [N, C].
        reward_weights: name -> weight (a mapping), [C] weights for [N, C]
            rewards, or None for every reward's default weight 1.0
            (``RewardArguments.weight``).
        sampler_type: ``"group_contiguous"`` (uncentred batch std) or
            ``"distributed_k_repeat"`` (``np.std``).
        global_std: passed to the processor, which GDPO ignores.
        upstream_float32: float32 rewards and reductions, as upstream runs.

    Returns:
        float64 [N] advantages.
    """
    named = _components(rewards, "r")
    if reward_weights is None:
        weights: Dict[str, float] = {key: 1.0 for key in named}
    elif isinstance(reward_weights, Mapping):
        weights = dict(reward_weights)
    else:
        if len(reward_weights) != len(named):
            raise ValueError(f"{len(reward_weights)} weights for {len(named)} rewards")
        weights = dict(zip(named, reward_weights))
    processor = FlowFactoryAdvantageProcessor(
        weights, group_size=0, global_std=global_std, sampler_type=sampler_type, upstream_float32=upstream_float32
    )
    return processor.compute_gdpo(prompts, named)
