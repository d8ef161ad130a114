"""Per-prompt trackers as trainers write them today, to measure ours against.

``DdpoStyleStatTracker`` is ddpo-pytorch's ``PerPromptStatTracker.update``
line for line (``ddpo_pytorch/stat_tracking.py``; TRL carries a copy of it
for DDPO, as do many forks): NumPy arrays on the host, a dict from
prompt to ``deque(maxlen=K)``, and a Python loop over the unique prompts of
the batch that builds a boolean mask over the whole batch twice per prompt.
Its cost grows with N times the number of unique prompts. Its semantics are
those of ``BufferStatTracker``.

``python_loop_grpo`` and ``index_add_grpo`` are the in-batch group baselines
of GRPO trainers (no memory across batches): the first a Python loop over
samples and groups as verl's ``compute_grpo_outcome_advantage`` and TRL-era
trainers ship it, the second a vectorised twin with ``index_add_`` as in
verl's vectorised path. Both give, for a sample of group g (the samples of
the batch with its prompt id), ``(r - mean_g) / (std_g + eps)`` with the
group's sample standard deviation (ddof 1); a group of one sample takes mean
0 and std 1, as in verl. Flags give Dr. GRPO (no std: ``r - mean_g``) and
RLOO (``r`` minus the mean of the group's other samples, a singleton keeping
its raw reward).

Dimensions: N samples in a batch, P prompts, K buffer slots.
"""

from __future__ import annotations

import collections
from typing import Deque, Dict, Hashable, List, Mapping, Optional

import numpy as np
import torch

from rail_interview.stat_tracking import TrackerStats


class DdpoStyleStatTracker:
    """ddpo-pytorch's per-prompt tracker: a dict of deques over NumPy.

    Args:
        buffer_size: K, rewards kept per prompt.
        min_count: rewards a prompt needs before its own statistics are used.
        eps: added to the standard deviation before dividing.
    """

    def __init__(self, buffer_size: int = 32, min_count: int = 16, *, eps: float = 1e-6) -> None:
        self.buffer_size = buffer_size
        self.min_count = min_count
        self.eps = eps
        self.stats: Dict[Hashable, Deque[float]] = {}

    def update(self, prompts: np.ndarray, rewards: np.ndarray) -> np.ndarray:
        """Appends the batch to the buffers and returns its advantages.

        Kept as in ddpo-pytorch, including the mask built twice per prompt,
        so that the benchmark measures the code trainers run.

        Args:
            prompts: [N] prompt keys.
            rewards: float [N].

        Returns:
            float [N] advantages, of the rewards' dtype.
        """
        prompts = np.array(prompts)
        rewards = np.array(rewards)
        unique = np.unique(prompts)
        advantages = np.empty_like(rewards)
        for prompt in unique:
            prompt_rewards = rewards[prompts == prompt]
            if prompt not in self.stats:
                self.stats[prompt] = collections.deque(maxlen=self.buffer_size)
            self.stats[prompt].extend(prompt_rewards)
            if len(self.stats[prompt]) < self.min_count:
                mean = np.mean(rewards)
                std = np.std(rewards) + self.eps
            else:
                mean = np.mean(self.stats[prompt])
                std = np.std(self.stats[prompt]) + self.eps
            advantages[prompts == prompt] = (prompt_rewards - mean) / std
        return advantages


class HostDictStatTracker:
    """``DdpoStyleStatTracker`` on the host, as trainers run it today, behind the tracker methods training calls.

    Every update copies the batch to the host (a sync on a GPU) and the
    advantages back, so it drops into ``training.train(..., tracker=...)``:
    it has what the loop, the checkpoint and the stats recorder call
    (``update``, ``fallback_mask``, ``stats_snapshot`` and
    ``stats_from_snapshot``, ``state_dict`` and ``load_state_dict``). Its
    buffers are not in the state dict: a resumed run starts them empty.

    Args:
        num_prompts: P.
        buffer_size: K.
        min_count: rewards a prompt needs before its own statistics are used.
        device: where advantages are returned.
    """

    def __init__(self, num_prompts: int, buffer_size: int = 32, min_count: int = 16, *, device=None) -> None:
        self.num_prompts, self.min_count = num_prompts, min_count
        self.device = torch.device("cpu") if device is None else torch.device(device)
        self.dtype, self.process_group = torch.float32, None
        self.inner = DdpoStyleStatTracker(buffer_size, min_count, eps=1e-6)

    def update(self, prompt_ids: torch.Tensor, rewards: torch.Tensor) -> torch.Tensor:
        """Advantages of a batch: int64 [N] ids and float [N] rewards -> float32 [N] on ``device``."""
        advantages = self.inner.update(prompt_ids.cpu().numpy(), rewards.cpu().numpy())
        return torch.from_numpy(advantages).to(device=self.device, dtype=self.dtype)

    def _counts(self, prompt_ids: Optional[torch.Tensor]) -> torch.Tensor:
        ids = range(self.num_prompts) if prompt_ids is None else prompt_ids.tolist()
        counts = [len(self.inner.stats.get(i, ())) for i in ids]
        return torch.tensor(counts, dtype=torch.int64, device=self.device)

    def fallback_mask(self, prompt_ids: torch.Tensor) -> torch.Tensor:
        """bool [N]: the samples whose prompt has fewer than ``min_count`` rewards."""
        return self._counts(prompt_ids) < self.min_count

    def stats_snapshot(self, prompt_ids: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """Returns the buffer lengths (means and stds are not reported).

        Args:
            prompt_ids: int64 [M], or None for all prompts.

        Returns:
            ``{"count": [M]}``.
        """
        return {"count": self._counts(prompt_ids)}

    def stats_from_snapshot(self, snapshot: Mapping[str, torch.Tensor]) -> TrackerStats:
        """Returns NaN means and stds with the recorded counts.

        Args:
            snapshot: ``{"count": [*B, M]}``.

        Returns:
            TrackerStats of [*B, M] tensors.
        """
        count = snapshot["count"]
        nan = torch.full(count.shape, float("nan"), device=count.device)
        return TrackerStats(mean=nan, std=nan.clone(), count=count.clone(), fallback=count < self.min_count)

    def state_dict(self) -> Dict[str, torch.Tensor]:
        """Empty: the host buffers are not saved."""
        return {}

    def load_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Accepts only the empty state this tracker saves."""
        if state_dict:
            raise ValueError(f"HostDictStatTracker saves no state, got {sorted(state_dict)}")


def python_loop_grpo(
    prompt_ids: torch.Tensor,
    rewards: torch.Tensor,
    eps: float = 1e-6,
    norm_by_std: bool = True,
    leave_one_out: bool = False,
) -> torch.Tensor:
    """GRPO group advantages with a Python loop, as verl and TRL-era trainers write them.

    The ids are read to the host once (verl keeps them there as a NumPy array
    of uids), the rewards are gathered per group in a ``defaultdict(list)``
    of 0-dim tensors, each group is reduced with ``torch.stack`` /
    ``torch.mean`` / ``torch.std``, and a loop writes ``scores[i]``.

    Args:
        prompt_ids: int [N] group keys (any values).
        rewards: float [N].
        eps: added to the group std before dividing.
        norm_by_std: divide by the group std (GRPO); False gives Dr. GRPO.
        leave_one_out: RLOO: ``(r - mean) * n / (n - 1)``, that is ``r`` minus
            the mean of the group's other samples, not divided by a std
            (``norm_by_std`` and ``eps`` are ignored).

    Returns:
        [N] advantages, of the rewards' dtype and device.
    """
    index: List[int] = prompt_ids.tolist()
    scores = rewards.clone()
    id2score: Dict[int, List[torch.Tensor]] = collections.defaultdict(list)
    id2mean: Dict[int, torch.Tensor] = {}
    id2std: Dict[int, torch.Tensor] = {}
    with torch.no_grad():
        for i in range(len(index)):
            id2score[index[i]].append(scores[i])
        for idx, group in id2score.items():
            if len(group) == 1:
                id2mean[idx] = torch.tensor(0.0, dtype=scores.dtype, device=scores.device)
                id2std[idx] = torch.tensor(1.0, dtype=scores.dtype, device=scores.device)
            else:
                group_scores = torch.stack(group)
                id2mean[idx] = torch.mean(group_scores)
                id2std[idx] = torch.std(group_scores)
        for i in range(len(index)):
            idx = index[i]
            size = len(id2score[idx])
            if leave_one_out:
                if size > 1:
                    scores[i] = (scores[i] - id2mean[idx]) * size / (size - 1)
            elif norm_by_std:
                scores[i] = (scores[i] - id2mean[idx]) / (id2std[idx] + eps)
            else:
                scores[i] = scores[i] - id2mean[idx]
    return scores


def index_add_grpo(
    prompt_ids: torch.Tensor,
    rewards: torch.Tensor,
    eps: float = 1e-6,
    norm_by_std: bool = True,
    leave_one_out: bool = False,
    num_groups: Optional[int] = None,
) -> torch.Tensor:
    """GRPO group advantages, vectorised with ``index_add_``: ``python_loop_grpo``'s twin.

    Group counts, sums and sums of squared deviations from the group mean
    (two passes, as ``torch.std`` does) are accumulated into [P] tensors with
    ``index_add_``. The ids must be dense (in [0, P)); P is read back from
    the ids (``int(prompt_ids.max()) + 1``, one host sync) unless given.

    Args:
        prompt_ids: int64 [N] dense group ids.
        rewards: float [N].
        eps: added to the group std before dividing.
        norm_by_std: divide by the group std (GRPO); False gives Dr. GRPO.
        leave_one_out: RLOO, as in ``python_loop_grpo``.
        num_groups: P, at least ``max(prompt_ids) + 1``; None to read it
            from the ids.

    Returns:
        [N] advantages, of the rewards' dtype and device.
    """
    if num_groups is None:
        num_groups = int(prompt_ids.max()) + 1
    zeros = torch.zeros(num_groups, dtype=rewards.dtype, device=rewards.device)  # [P]
    count = zeros.index_add(0, prompt_ids, torch.ones_like(rewards))  # [P]
    mean = zeros.index_add(0, prompt_ids, rewards) / count.clamp(min=1)  # [P]
    deviation = rewards - mean[prompt_ids]  # [N]
    b_count = count[prompt_ids]  # [N]
    singleton = b_count < 2  # [N]
    if leave_one_out:
        return torch.where(singleton, rewards, deviation * b_count / (b_count - 1).clamp(min=1))
    b_advantage = torch.where(singleton, rewards, deviation)  # singleton: mean 0
    if not norm_by_std:
        return b_advantage
    square_sum = zeros.index_add(0, prompt_ids, deviation * deviation)  # [P]
    std = (square_sum / (count - 1).clamp(min=1)).sqrt()  # [P]
    b_std = torch.where(singleton, torch.ones_like(rewards), std[prompt_ids])  # [N], singleton: std 1
    return b_advantage / (b_std + eps)


class SpoDictTracker:
    """SPO's per-prompt Beta tracker as verl's recipe runs it: two dicts, tensors built per step, ``.item()`` writes.

    ``RayPPOTrainer.fit`` of verl's ``recipe/spo/spo_ray_trainer.py``
    (volcengine/verl, commit 4b2b36432e8ffa463894edd21ec4f9822412905a; its
    transcription in float64 is ``SpoBetaTracker`` in
    tests/system_references.py). The state is ``prompt2alpha`` and
    ``prompt2beta``, Python dicts from prompt to float, here keyed by int
    prompt ids in [0, P) and starting at 0.5 each (SPO's prior without
    offline data, ``offline_N: 0``). One ``update`` is the recipe's
    tracker work of one step, in its order and dtypes:

    * alpha and beta of the batch by a list comprehension over its prompts,
      made float32 tensors with ``torch.tensor(..., dtype=torch.float).to(r)``;
    * ``p_hats = alpha / (alpha + beta)``, ``a = r - p_hats``,
      ``(a - a.mean()) / (a.std() + 1e-8)`` (torch's unbiased std);
    * rho per sample as ``_get_spo_rho`` computes it: ``rho.type: kl``,
      ``clamp(2 ** (-D / 0.06), clip_lower, 0.96)`` from the given D (the
      recipe measures D on the policy's log-probs; here it is an input), or
      ``torch.full`` of the constant for ``rho.type: constant``;
    * ``alpha = rho * alpha + r``, ``beta = rho * beta + (1 - r)``, then a
      Python loop over the batch writes ``alpha[i].item()`` and
      ``beta[i].item()`` into the dicts, so a prompt repeated in a batch
      keeps its last sample's update.

    Left out, each of which the recipe also runs in that step and which would
    only add to its cost: the ``spo/*`` metrics (a dozen ``.mean().item()``
    and a ``torch.quantile``), ``prompt2sampled_number`` and its counts, the
    token dimension of the advantages (``advantages.unsqueeze(-1) *
    response_mask``) and the KL-rho's log-prob bookkeeping. The recipe runs
    this on the driver, with the batch's tensors on the host.

    Args:
        num_prompts: P, prompt ids in [0, P).
        rho_type: ``"kl"`` (``update`` takes D) or ``"constant"``.
        rho_value: the constant rho (``trainer.spo.rho.value``).
        clip_lower: rho's lower clamp under ``"kl"`` (``trainer.spo.rho.clip_lower``).
    """

    D_HALF = 0.06
    RHO_MAX = 0.96

    def __init__(
        self, num_prompts: int, *, rho_type: str = "kl", rho_value: float = 0.875, clip_lower: float = 0.875
    ) -> None:
        if rho_type not in ("kl", "constant"):
            raise ValueError(f"Unknown rho type: {rho_type}")
        self.rho_type, self.rho_value, self.clip_lower = rho_type, rho_value, clip_lower
        self.prompt2alpha: Dict[int, float] = {k: 0.5 for k in range(num_prompts)}
        self.prompt2beta: Dict[int, float] = {k: 0.5 for k in range(num_prompts)}

    def rho(self, count: int, divergence: Optional[torch.Tensor]) -> torch.Tensor:
        """Each sample's discount, as ``_get_spo_rho`` returns it.

        Args:
            count: N.
            divergence: float32 [N] D, needed for ``rho_type="kl"``.

        Returns:
            float32 [N] rho (D's dtype under ``"kl"``).
        """
        if self.rho_type == "constant":
            return torch.full((count,), self.rho_value, dtype=torch.float32)
        if divergence is None:
            raise ValueError("rho_type='kl' needs one divergence D per sample")
        d_half = torch.as_tensor(self.D_HALF, dtype=divergence.dtype, device=divergence.device)
        rho = torch.pow(2.0, -divergence / d_half)
        return torch.clamp(rho, min=self.clip_lower, max=self.RHO_MAX)

    def update(
        self, prompts: List[int], rewards: torch.Tensor, divergence: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """The step's advantages from the state before it; then the rewards are written into the dicts.

        Args:
            prompts: [N] prompt ids, a Python list (the recipe's ``micro_prompts``).
            rewards: float32 [N] rewards in [0, 1] (the recipe's summed token rewards).
            divergence: float32 [N] D per sample, for ``rho_type="kl"``.

        Returns:
            [N] advantages, of the rewards' dtype.
        """
        r = rewards
        alpha = [self.prompt2alpha[_] for _ in prompts]
        beta = [self.prompt2beta[_] for _ in prompts]
        alpha = torch.tensor(alpha, dtype=torch.float).to(r)
        beta = torch.tensor(beta, dtype=torch.float).to(r)
        neff = alpha + beta
        p_hats = alpha / neff
        advantages = r - p_hats
        advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)

        rho = self.rho(len(prompts), divergence)
        alpha = rho * alpha + r
        beta = rho * beta + (1 - r)
        for i in range(len(alpha)):
            self.prompt2alpha[prompts[i]] = alpha[i].item()
            self.prompt2beta[prompts[i]] = beta[i].item()
        return advantages
