"""Plain transcriptions of public systems' advantage code, the oracles of the presets.

Each one is written as its source is (the same loops, numpy or torch calls and
constants), in float64, for a flat batch given as N prompt ids and N rewards:
a group is the samples of one id, in any positions of the batch. What had to
change (a token dimension, a reward-function dimension, contiguous groups) is
said in each docstring.
"""

from collections import defaultdict, deque
from typing import Dict, Hashable, List, Sequence

import numpy as np
import torch


class DdpoPerPromptStatTracker:
    """ddpo-pytorch ``ddpo_pytorch/stat_tracking.py``, ``PerPromptStatTracker`` (kvablack/ddpo-pytorch).

    A ``deque(maxlen=buffer_size)`` per prompt; ``np.mean`` / ``np.std``
    (population) of the prompt's deque plus 1e-6, or of the whole batch while
    the deque holds fewer than ``min_count`` rewards.

    Args:
        buffer_size: K, rewards kept per prompt.
        min_count: rewards a prompt needs before its own statistics are used.
    """

    def __init__(self, buffer_size: int, min_count: int) -> None:
        self.buffer_size = buffer_size
        self.min_count = min_count
        self.stats: Dict[Hashable, deque] = {}

    def update(self, prompts: Sequence[Hashable], rewards: Sequence[float]) -> np.ndarray:
        """The original ``update``, with ``prompts`` and ``rewards`` made numpy arrays first.

        Args:
            prompts: [N] prompt ids.
            rewards: [N] rewards.

        Returns:
            float64 [N] advantages.
        """
        prompts = np.asarray(prompts)
        rewards = np.asarray(rewards, dtype=np.float64)
        unique = np.unique(prompts)
        advantages = np.empty_like(rewards)
        for prompt in unique:
            prompt_rewards = rewards[prompts == prompt]
            if prompt not in self.stats:
                self.stats[prompt] = deque(maxlen=self.buffer_size)
            self.stats[prompt].extend(prompt_rewards)

            if len(self.stats[prompt]) < self.min_count:
                mean = np.mean(rewards)
                std = np.std(rewards) + 1e-6
            else:
                mean = np.mean(self.stats[prompt])
                std = np.std(self.stats[prompt]) + 1e-6
            advantages[prompts == prompt] = (prompt_rewards - mean) / std

        return advantages


def trl_grpo_advantages(
    prompts: Sequence[Hashable], rewards: Sequence[float], scale_rewards: str = "group"
) -> torch.Tensor:
    """TRL ``trl/trainer/grpo_trainer.py``, ``GRPOTrainer._generate_and_score_completions``: the advantages.

    As API.md's ``trl_grpo`` states them, for one reward function: a NaN
    reward means "could not be scored". Per group: the mean of its non-NaN
    rewards (``torch.nanmean``), its std with ddof 1 over them
    (``torch.std``); ``advantages = rewards - mean``, divided by
    ``std + 1e-4`` (``"group"``), by the sample std of every non-NaN reward
    of the batch + 1e-4 (``"batch"``; 0 when there is at most one), or by
    nothing (``"none"``). A NaN sample, and a group with one non-NaN reward,
    gets advantage 0.

    How TRL's own code differs: it aggregates the reward functions with
    ``(rewards_per_func * reward_weights).nansum(dim=1)``, so a lone reward
    function's NaN becomes a reward of 0 that enters the group mean and std;
    its groups are contiguous blocks of ``num_generations`` samples
    (``rewards.view(-1, num_generations)``), all of the same size, at least
    2 in training (a group of one would get std NaN from ``torch.std``).

    Args:
        prompts: [N] prompt ids (groups need not be contiguous).
        rewards: [N] rewards, NaN for unscorable samples.
        scale_rewards: ``"group"``, ``"batch"`` or ``"none"``.

    Returns:
        float64 [N] advantages.
    """
    rewards = torch.tensor(list(rewards), dtype=torch.float64)
    groups: Dict[Hashable, List[int]] = defaultdict(list)
    for i, prompt in enumerate(prompts):
        groups[prompt].append(i)
    is_valid = ~torch.isnan(rewards)

    mean_grouped_rewards = torch.zeros_like(rewards)
    std_grouped_rewards = torch.zeros_like(rewards)
    valid_count = torch.zeros_like(rewards)
    for samples in groups.values():
        group = rewards[samples]
        group_valid = group[~torch.isnan(group)]
        if group_valid.numel() == 0:
            continue
        mean_grouped_rewards[samples] = torch.nanmean(group)
        std_grouped_rewards[samples] = torch.std(group_valid) if group_valid.numel() > 1 else 0.0
        valid_count[samples] = float(group_valid.numel())
    advantages = rewards - mean_grouped_rewards

    if scale_rewards == "group":
        std_rewards = std_grouped_rewards
    elif scale_rewards == "batch":
        valid_rewards = rewards[is_valid]
        if valid_rewards.numel() > 1:
            std_rewards = valid_rewards.std().expand_as(rewards)
        else:
            std_rewards = torch.zeros_like(rewards)
    elif scale_rewards == "none":
        std_rewards = None
    else:
        raise ValueError(
            f"Invalid value for scale_rewards: {scale_rewards}. Must be one of 'batch', 'group', or 'none'."
        )
    if std_rewards is not None:
        advantages = advantages / (std_rewards + 1e-4)
    return torch.where(is_valid & (valid_count > 1), advantages, torch.zeros_like(advantages))


def verl_grpo_advantages(
    index: Sequence[Hashable],
    rewards: Sequence[float],
    epsilon: float = 1e-6,
    norm_adv_by_std_in_grpo: bool = True,
) -> torch.Tensor:
    """verl ``verl/trainer/ppo/core_algos.py``, ``compute_grpo_outcome_advantage``.

    The original sums ``token_level_rewards`` [N, T] over tokens and multiplies
    the result by ``response_mask``; here each response is one token with
    mask 1, so ``scores`` are the rewards. A group of one gets mean 0 and
    std 1; others ``torch.mean`` and ``torch.std`` (ddof 1).

    One change: the original's ``torch.tensor(0.0)`` and ``torch.tensor(1.0)``
    are float32 whatever the scores' dtype, so a singleton's ``1.0 +
    epsilon`` rounds to 1.00000095 and its advantage is r / 1.00000095 even
    with float64 scores (4.5e-8 from r / (1 + 1e-6)). Here they take the
    scores' dtype (float64); with verl's float32 scores the two agree.

    Args:
        index: [N] prompt ids.
        rewards: [N] rewards.
        epsilon: added to the std before dividing.
        norm_adv_by_std_in_grpo: divide by the std (GRPO) or not (Dr.GRPO).

    Returns:
        float64 [N] advantages.
    """
    scores = torch.tensor(list(rewards), dtype=torch.float64)

    id2score = defaultdict(list)
    id2mean = {}
    id2std = {}

    with torch.no_grad():
        bsz = scores.shape[0]
        for i in range(bsz):
            id2score[index[i]].append(scores[i])
        for idx in id2score:
            if len(id2score[idx]) == 1:
                id2mean[idx] = torch.tensor(0.0, dtype=scores.dtype)
                id2std[idx] = torch.tensor(1.0, dtype=scores.dtype)
            elif len(id2score[idx]) > 1:
                scores_tensor = torch.stack(id2score[idx])
                id2mean[idx] = torch.mean(scores_tensor)
                id2std[idx] = torch.std(scores_tensor)
            else:
                raise ValueError(f"no score in prompt index: {idx}")
        for i in range(bsz):
            if norm_adv_by_std_in_grpo:
                scores[i] = (scores[i] - id2mean[index[i]]) / (id2std[index[i]] + epsilon)
            else:
                scores[i] = scores[i] - id2mean[index[i]]
    return scores


def verl_rloo_advantages(index: Sequence[Hashable], rewards: Sequence[float]) -> torch.Tensor:
    """verl ``verl/trainer/ppo/core_algos.py``, ``compute_rloo_outcome_advantage``.

    ``scores * n / (n - 1) - mean * n / (n - 1)`` for a group of n > 1 (the
    reward minus the mean of the group's other rewards); a group of one keeps
    its raw reward. One token per response, as ``verl_grpo_advantages``.

    Args:
        index: [N] prompt ids.
        rewards: [N] rewards.

    Returns:
        float64 [N] advantages.
    """
    scores = torch.tensor(list(rewards), dtype=torch.float64)

    id2score = defaultdict(list)
    id2mean = {}

    with torch.no_grad():
        bsz = scores.shape[0]
        for i in range(bsz):
            id2score[index[i]].append(scores[i])
        for idx in id2score:
            if len(id2score[idx]) == 1:
                id2mean[idx] = torch.tensor(0.0)
            elif len(id2score[idx]) > 1:
                id2mean[idx] = torch.mean(torch.stack(id2score[idx]))
            else:
                raise ValueError(f"no score in prompt index: {idx}")
        for i in range(bsz):
            response_num = len(id2score[index[i]])
            if response_num > 1:
                scores[i] = scores[i] * response_num / (response_num - 1) - id2mean[index[i]] * response_num / (
                    response_num - 1
                )
    return scores


class FlowGrpoPerPromptStatTracker:
    """flow_grpo ``flow_grpo/stat_tracking.py``, ``PerPromptStatTracker`` (yifan123/flow_grpo), ``type='grpo'``.

    A list of rewards per prompt; ``np.mean`` of it, and ``np.std``
    (population) of it, or of the whole batch with ``global_std``, plus
    1e-4. flow_grpo's training script calls ``clear()`` after every
    ``update``, so the statistics are of the batch alone; the other
    ``type`` options (gardo, rwr, sft, dpo) are left out.

    Args:
        global_std: divide by the batch's std instead of the prompt's.
    """

    def __init__(self, global_std: bool = False) -> None:
        self.global_std = global_std
        self.stats: Dict[Hashable, list] = {}

    def update(self, prompts: Sequence[Hashable], rewards: Sequence[float]) -> np.ndarray:
        """The original ``update`` with ``type='grpo'`` and no ``dists``.

        Args:
            prompts: [N] prompt ids.
            rewards: [N] rewards.

        Returns:
            float64 [N] advantages.
        """
        prompts = np.array(prompts)
        rewards = np.array(rewards, dtype=np.float64)
        unique = np.unique(prompts)
        advantages = np.empty_like(rewards) * 0.0
        for prompt in unique:
            prompt_rewards = rewards[prompts == prompt]
            if prompt not in self.stats:
                self.stats[prompt] = []
            self.stats[prompt].extend(prompt_rewards)
        for prompt in unique:
            self.stats[prompt] = np.stack(self.stats[prompt])
            prompt_rewards = rewards[prompts == prompt]
            mean = np.mean(self.stats[prompt], axis=0, keepdims=True)
            if self.global_std:
                std = np.std(rewards, axis=0, keepdims=True) + 1e-4
            else:
                std = np.std(self.stats[prompt], axis=0, keepdims=True) + 1e-4
            advantages[prompts == prompt] = (prompt_rewards - mean) / std
        return advantages

    def clear(self) -> None:
        """Forgets every prompt's rewards."""
        self.stats = {}
