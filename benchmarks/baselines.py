"""Per-prompt trackers as trainers write them today, to measure ours against.

``DdpoStyleStatTracker`` is ddpo-pytorch's ``PerPromptStatTracker.update``
line for line (``ddpo_pytorch/stat_tracking.py``; TRL carries a copy of it
for DDPO, as do many forks): NumPy arrays on the host, a dict from
prompt to ``deque(maxlen=K)``, and a Python loop over the unique prompts of
the batch that builds a boolean mask over the whole batch twice per prompt.
Its cost grows with N times the number of unique prompts. Its semantics are
those of ``BufferStatTracker``.
"""

from __future__ import annotations

import collections
from typing import Deque, Dict, Hashable, Mapping, Optional

import numpy as np
import torch

from rail_interview.stat_tracking import StatTracker, TrackerStats


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


class HostDictStatTracker(StatTracker):
    """A ``StatTracker`` that runs ``DdpoStyleStatTracker`` on the host, as trainers do today.

    Every update copies the batch to the host (a sync on a GPU) and the
    advantages back, so it drops into ``training.train(..., tracker=...)``.

    Args:
        num_prompts: P.
        buffer_size: K.
        min_count: rewards a prompt needs before its own statistics are used.
        device: where advantages are returned.
    """

    def __init__(self, num_prompts: int, buffer_size: int = 32, min_count: int = 16, *, device=None) -> None:
        super().__init__(num_prompts, eps=1e-6, device=device, check_values=False)
        self.min_count = min_count
        self.inner = DdpoStyleStatTracker(buffer_size, min_count, eps=1e-6)

    def _update(self, prompt_ids: torch.Tensor, rewards: torch.Tensor) -> torch.Tensor:
        advantages = self.inner.update(prompt_ids.cpu().numpy(), rewards.cpu().numpy())
        return torch.from_numpy(advantages).to(device=self.device, dtype=self.dtype)

    def _counts(self, prompt_ids: Optional[torch.Tensor]) -> torch.Tensor:
        ids = range(self.num_prompts) if prompt_ids is None else prompt_ids.tolist()
        counts = [len(self.inner.stats.get(i, ())) for i in ids]
        return torch.tensor(counts, dtype=torch.int64, device=self.device)

    def _fallback_mask(self, prompt_ids: torch.Tensor) -> torch.Tensor:
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

    def _state_tensors(self) -> Dict[str, torch.Tensor]:
        return {}
