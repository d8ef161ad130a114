"""Plain transcriptions of public systems' advantage code, the oracles of the presets.

Each one is written as its source is (the same loops, numpy or torch calls and
constants), in float64, for a flat batch given as N prompt ids and N rewards:
a group is the samples of one id, in any positions of the batch. What had to
change (a token dimension, a reward-function dimension, contiguous groups) is
said in each docstring.
"""

import random
from collections import defaultdict, deque
from typing import Dict, Hashable, List, Optional, Sequence

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

    How TRL's own code differs: TRL 1.16 aggregates the reward functions
    with ``(rewards_per_func * reward_weights).nansum(dim=1)`` and then
    marks rows where every function returned None NaN again
    (``unscorable_mask``), so a lone function's NaN is left out as here
    (earlier versions turned it into a reward of 0 that counted; the
    multi-reward orders are transcribed in ``system_references_multi.py``);
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
    return verl_grpo_scores(torch.tensor(list(rewards), dtype=torch.float64), index, epsilon, norm_adv_by_std_in_grpo)


def verl_grpo_scores(
    scores: torch.Tensor, index: Sequence[Hashable], epsilon: float, norm_adv_by_std_in_grpo: bool
) -> torch.Tensor:
    """The loop of verl's ``compute_grpo_outcome_advantage`` on [N] scores of any dtype (``verl_grpo_advantages``).

    Args:
        scores: [N] summed token rewards; not changed.
        index: [N] prompt ids.
        epsilon: added to the std before dividing.
        norm_adv_by_std_in_grpo: divide by the group's std.

    Returns:
        [N] advantages of ``scores``' dtype; a singleton's mean 0 and std 1 take that dtype too.
    """
    scores = scores.clone()
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


class SpoBetaTracker:
    """verl ``recipe/spo/spo_ray_trainer.py`` (volcengine/verl, commit 4b2b36432e8ffa463894edd21ec4f9822412905a).

    SPO (Single-stream Policy Optimization): the per-prompt Beta state that
    ``RayPPOTrainer.fit`` keeps in ``prompt2alpha`` / ``prompt2beta``, the
    weighted prompt sampling at the top of each step, the advantages, and the
    discount ``rho`` of ``RayPPOTrainer._get_spo_rho``. Defaults are those of
    ``recipe/spo/config/spo_trainer.yaml`` (``offline_N: 8``, ``rho.type:
    kl``, ``rho.value: 0.875``, ``rho.clip_lower: 0.875``).

    What it does, in order:

    * Prior (``__init__``): offline scores are made binary (``score > 0``);
      a prompt with more than ``offline_n`` of them keeps ``random.sample``
      of ``offline_n``. With ``offline_n == 0`` every prompt gets alpha =
      beta = 0.5 (no ``N_init`` factor). Otherwise ``N_init = 1 / (1 -
      clip_lower)``, ``alpha = N_init * (s + 0.5) / (offline_n + 1)`` and
      ``beta = N_init * (offline_n - s + 0.5) / (offline_n + 1)``, s the
      successes kept: the formula uses ``offline_n``, not the number of
      scores, so missing scores count as failures. The prompts known are the
      keys of the offline file.
    * Sampling (``sampling_weights``, ``sample``): weight ``sqrt(p_hat * (1 -
      p_hat)) + 0.05`` per prompt of the dataloader's batch, 0 for a prompt
      the offline file lacks; probabilities are the weights over their sum
      (uniform when the sum is 0); ``np.random.choice`` of
      ``train_batch_size`` positions, with replacement only when that is more
      than the dataloader's batch.
    * Advantages (``advantages``): every sample of the batch reads its
      prompt's ``p_hat = alpha / (alpha + beta)`` from before this step;
      ``a = r - p_hat``, then ``(a - a.mean()) / (a.std() + 1e-8)`` over all
      samples of the batch, ``torch.std`` unbiased (a batch of one gives NaN).
    * Update (``update``): per sample, from the state read before the step,
      ``alpha = rho * alpha + r`` and ``beta = rho * beta + (1 - r)``; then
      a loop in batch order writes each sample's values into the prompt's
      entry, so when a prompt appears more than once the last sample's
      update stands and the others' rewards are lost.
    * ``rho``: ``rho.type == "constant"``: ``rho.value`` for every sample.
      ``"kl"``: ``clamp(2 ** (-D / 0.06), clip_lower, 0.96)`` per sample,
      where D is the masked mean over response tokens of ``|log pi_then(y) -
      log pi_now(y)|`` (see ``divergence``), y the response stored for the
      prompt the last step it was sampled (the last sample's, with its
      log-probs taken after that step's actor update), pi_now the actor
      after this step's update. A prompt sampled for the first time compares
      its own response with itself: D = 0, rho = 0.96. Samples of a prompt
      repeated in one batch share the stored y (so the same D), or, if new,
      each uses its own response (D = 0).

    Interpretations and changes:

    * Float64 throughout; upstream holds alpha, beta and rho in float32
      tensors (``torch.tensor(..., dtype=torch.float).to(r)``) and writes
      them back with ``.item()``, so upstream values carry float32 rounding.
    * A reward is the response's summed token reward
      (``reward_tensor.sum(dim=-1)``), given here as one number per sample.
      Upstream neither checks nor clips it: binary or fractional rewards in
      [0, 1] are both taken as they are (only offline scores are binarised).
    * D needs the policy's log-probs, so it is an input: ``update`` takes one
      D per sample for ``rho_type="kl"``; the caller must give 0 for a
      prompt's first sample, as upstream computes it.
    * ``random.sample`` and ``np.random.choice`` use the global generators
      upstream; here a ``random.Random`` / ``np.random.RandomState`` can be
      passed. The prompt id is the stripped content of the first chat
      message upstream; here any hashable.
    * Metrics, ``prompt2D`` (stored, never read) and the token dimension of
      the advantages (``advantages.unsqueeze(-1) * response_mask``) are left
      out; a prompt in the batch but not in the offline file is a KeyError
      upstream and here.

    Args:
        offline_scores: prompt -> offline scores of that prompt.
        offline_n: ``trainer.spo.offline_N``.
        rho_type: ``"kl"`` or ``"constant"``.
        rho_value: the constant rho.
        clip_lower: ``trainer.spo.rho.clip_lower``: rho's lower clamp and the
            prior's ``N_init = 1 / (1 - clip_lower)``.
        rng: the generator of the offline subsample, ``random`` if None.
    """

    D_HALF = 0.06
    RHO_MAX = 0.96
    EXPLORATION_EPSILON = 0.05

    def __init__(
        self,
        offline_scores: Dict[Hashable, Sequence[float]],
        offline_n: int = 8,
        rho_type: str = "kl",
        rho_value: float = 0.875,
        clip_lower: float = 0.875,
        rng: Optional[random.Random] = None,
    ) -> None:
        if rho_type not in ("kl", "constant"):
            raise ValueError(f"Unknown rho type: {rho_type}")
        self.offline_n = offline_n
        self.rho_type = rho_type
        self.rho_value = rho_value
        self.clip_lower = clip_lower
        binary = {prompt: [int(score > 0) for score in scores] for prompt, scores in offline_scores.items()}
        self.prompts: List[Hashable] = list(binary)
        self.alpha: Dict[Hashable, float] = {}
        self.beta: Dict[Hashable, float] = {}
        if offline_n == 0:
            for prompt in self.prompts:
                self.alpha[prompt] = 0.5
                self.beta[prompt] = 0.5
        else:
            sampler = random if rng is None else rng
            for prompt, scores in binary.items():
                if len(scores) > offline_n:
                    binary[prompt] = sampler.sample(scores, offline_n)
            n_init = 1 / (1 - clip_lower)
            for prompt in self.prompts:
                successes = sum(binary[prompt])
                self.alpha[prompt] = n_init * (successes + 0.5) / (offline_n + 1)
                self.beta[prompt] = n_init * (offline_n - successes + 0.5) / (offline_n + 1)
        self.sampled_number: Dict[Hashable, int] = defaultdict(int)

    def p_hat(self, prompt: Hashable) -> float:
        """``alpha / (alpha + beta)`` of one prompt, as the sampling step computes it."""
        return float(self.alpha[prompt]) / float(self.alpha[prompt] + self.beta[prompt])

    def sampling_weights(self, prompts: Sequence[Hashable]) -> np.ndarray:
        """Each dataloader-batch prompt's weight: ``sqrt(p_hat * (1 - p_hat)) + 0.05``, 0 if unknown.

        Args:
            prompts: [M] prompt ids of the dataloader's batch.

        Returns:
            float64 [M] weights.
        """
        weights = []
        for prompt in prompts:
            if prompt in self.alpha:
                p = self.p_hat(prompt)
                weights.append((p * (1.0 - p)) ** 0.5 + self.EXPLORATION_EPSILON)
            else:
                weights.append(0.0)
        return np.asarray(weights, dtype=np.float64)

    def sampling_probs(self, prompts: Sequence[Hashable]) -> np.ndarray:
        """The weights over their sum (uniform if the sum is 0), renormalised once more as upstream does."""
        weights = self.sampling_weights(prompts)
        total = float(weights.sum())
        if total > 0.0:
            probs = weights / total
        else:
            probs = np.full(len(weights), 1.0 / len(weights), dtype=np.float64)
        return probs / probs.sum()

    def sample(
        self, prompts: Sequence[Hashable], target_bs: int, random_state: Optional[np.random.RandomState] = None
    ) -> List[int]:
        """Positions of the dataloader's batch kept for the step (``train_batch_size`` of them).

        Args:
            prompts: [M] prompt ids of the dataloader's batch.
            target_bs: ``data.train_batch_size``.
            random_state: draws ``choice``; numpy's global generator if None.

        Returns:
            target_bs positions into ``prompts``, drawn with replacement only if target_bs > M.
        """
        chooser = np.random if random_state is None else random_state
        probs = self.sampling_probs(prompts)
        replace = target_bs > len(prompts)
        return chooser.choice(len(prompts), size=target_bs, replace=replace, p=probs).tolist()

    @staticmethod
    def divergence(
        old_log_probs: torch.Tensor, cur_log_probs: torch.Tensor, response_mask: torch.Tensor
    ) -> torch.Tensor:
        """D per sample: verl's ``masked_mean(|old - cur|, mask, axis=-1)``, ``sum / (mask.sum() + 1e-8)``.

        Args:
            old_log_probs: [M, T] log-probs of the stored responses when stored.
            cur_log_probs: [M, T] the same responses' log-probs under the current actor.
            response_mask: [M, T] 1 on response tokens.

        Returns:
            [M] D.
        """
        kl = (old_log_probs - cur_log_probs).abs()
        summed = (torch.where(response_mask.bool(), kl, 0.0) * response_mask).sum(dim=-1)
        return summed / (response_mask.sum(dim=-1) + 1e-8)

    def rho(self, count: int, divergences: Optional[Sequence[float]] = None) -> torch.Tensor:
        """Each sample's discount: the constant, or ``clamp(2 ** (-D / 0.06), clip_lower, 0.96)``.

        Args:
            count: N, samples in the batch.
            divergences: [N] D per sample, needed for ``rho_type="kl"``.

        Returns:
            float64 [N] rho.
        """
        if self.rho_type == "constant":
            return torch.full((count,), self.rho_value, dtype=torch.float64)
        if divergences is None:
            raise ValueError("rho_type='kl' needs one divergence D per sample")
        d = torch.tensor(list(divergences), dtype=torch.float64)
        if d.shape != (count,):
            raise ValueError(f"expected {count} divergences, got {tuple(d.shape)}")
        rho = torch.pow(2.0, -d / self.D_HALF)
        return torch.clamp(rho, min=self.clip_lower, max=self.RHO_MAX)

    def advantages(self, prompts: Sequence[Hashable], rewards: Sequence[float]) -> torch.Tensor:
        """The step's advantages from the state before the step; the state is not changed.

        Args:
            prompts: [N] prompt ids, a prompt possibly more than once.
            rewards: [N] rewards.

        Returns:
            float64 [N] advantages, normalised over the whole batch.
        """
        r = torch.tensor(list(rewards), dtype=torch.float64)
        alpha = torch.tensor([self.alpha[p] for p in prompts], dtype=torch.float64)
        beta = torch.tensor([self.beta[p] for p in prompts], dtype=torch.float64)
        p_hats = alpha / (alpha + beta)
        advantages = r - p_hats
        return (advantages - advantages.mean()) / (advantages.std() + 1e-8)

    def update(
        self, prompts: Sequence[Hashable], rewards: Sequence[float], divergences: Optional[Sequence[float]] = None
    ) -> None:
        """Folds the step's rewards in: per sample from the pre-step state, then written in batch order.

        Args:
            prompts: [N] prompt ids.
            rewards: [N] rewards.
            divergences: [N] D per sample (``rho_type="kl"`` only).
        """
        r = torch.tensor(list(rewards), dtype=torch.float64)
        alpha = torch.tensor([self.alpha[p] for p in prompts], dtype=torch.float64)
        beta = torch.tensor([self.beta[p] for p in prompts], dtype=torch.float64)
        rho = self.rho(len(prompts), divergences)
        alpha = rho * alpha + r
        beta = rho * beta + (1 - r)
        for i, prompt in enumerate(prompts):
            self.alpha[prompt] = alpha[i].item()
            self.beta[prompt] = beta[i].item()
            self.sampled_number[prompt] += 1

    def step(
        self, prompts: Sequence[Hashable], rewards: Sequence[float], divergences: Optional[Sequence[float]] = None
    ) -> torch.Tensor:
        """One training step: ``advantages`` then ``update``.

        Returns:
            float64 [N] advantages.
        """
        advantages = self.advantages(prompts, rewards)
        self.update(prompts, rewards, divergences)
        return advantages
