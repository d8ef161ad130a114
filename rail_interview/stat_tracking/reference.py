"""Plain-Python reference trackers: the specification in code.

These are what per-prompt trackers look like in trainers today: a dict from
prompt to a ``collections.deque`` of its rewards, looped over on the host.
They are slow, and obviously correct: the tests compare the tensor trackers
with them and the benchmarks time against them. Prompts can be any hashable
value (strings, ints); arithmetic is in Python floats (float64) with
``math.fsum``.
"""

from __future__ import annotations

import collections
import math
from typing import Deque, Dict, Hashable, Iterable, List, Sequence, Tuple, Union

import torch

Numbers = Union[Sequence[float], torch.Tensor]


def _as_list(values: Union[Iterable, torch.Tensor]) -> list:
    return values.tolist() if isinstance(values, torch.Tensor) else list(values)


def mean_std(values: Sequence[float]) -> Tuple[float, float]:
    """Mean and population std (ddof 0) of a non-empty sequence, exactly rounded sums.

    Args:
        values: numbers.

    Returns:
        (mean, std) as Python floats.
    """
    mean = math.fsum(values) / len(values)
    return mean, math.sqrt(math.fsum((v - mean) ** 2 for v in values) / len(values))


def _checked_batch(prompts, rewards) -> Tuple[list, List[float]]:
    prompts, rewards = _as_list(prompts), [float(r) for r in _as_list(rewards)]
    if len(prompts) != len(rewards):
        raise ValueError(f"got {len(prompts)} prompts and {len(rewards)} rewards")
    return prompts, rewards


class ReferenceBufferStatTracker:
    """Dict-of-deques buffer tracker with DDPO semantics.

    Args:
        buffer_size: K, rewards kept per prompt.
        min_count: rewards a prompt needs before its own statistics are used.
        eps: added to the standard deviation before dividing.

    Example:
        >>> tracker = ReferenceBufferStatTracker(buffer_size=4, min_count=2)
        >>> [round(a, 4) for a in tracker.update(["a", "a", "b"], [1.0, 3.0, 10.0])]
        [-1.0, 1.0, 1.3822]
    """

    def __init__(self, buffer_size: int = 32, min_count: int = 16, *, eps: float = 1e-6) -> None:
        self.buffer_size = buffer_size
        self.min_count = min_count
        self.eps = eps
        self.buffers: Dict[Hashable, Deque[float]] = {}

    def update(self, prompts: Union[Sequence[Hashable], torch.Tensor], rewards: Numbers) -> List[float]:
        """Appends the batch to the buffers, then returns its advantages.

        Args:
            prompts: [N] prompt keys (a tensor's elements become Python values).
            rewards: [N] rewards.

        Returns:
            [N] advantages, as Python floats.
        """
        prompts, rewards = _checked_batch(prompts, rewards)
        if not prompts:
            return []
        for prompt, reward in zip(prompts, rewards):
            self.buffers.setdefault(prompt, collections.deque(maxlen=self.buffer_size)).append(reward)
        batch_stats = mean_std(rewards)
        prompt_stats = {
            prompt: mean_std(self.buffers[prompt]) if len(self.buffers[prompt]) >= self.min_count else batch_stats
            for prompt in dict.fromkeys(prompts)
        }
        return [
            (reward - prompt_stats[prompt][0]) / (prompt_stats[prompt][1] + self.eps)
            for prompt, reward in zip(prompts, rewards)
        ]

    def stats(self) -> Dict[Hashable, Tuple[float, float, int]]:
        """Returns (mean, std, count) of every prompt seen.

        Returns:
            A dict from prompt to its buffer's mean, population std and length.
        """
        return {prompt: (*mean_std(buffer), len(buffer)) for prompt, buffer in self.buffers.items()}


class ReferenceEmaStatTracker:
    """Dict-based EMA tracker that folds in one reward at a time.

    Args:
        decay: weight kept by the old statistics at each reward.
        min_count: rewards a prompt needs before its own statistics are used.
        eps: added to the standard deviation before dividing.

    Example:
        >>> tracker = ReferenceEmaStatTracker(decay=0.5, min_count=2)
        >>> [round(a, 4) for a in tracker.update(["a", "a", "b"], [1.0, 3.0, 10.0])]
        [-1.0, 1.0, 1.3822]
    """

    def __init__(self, decay: float = 0.7, min_count: int = 16, *, eps: float = 1e-6) -> None:
        self.decay = decay
        self.min_count = min_count
        self.eps = eps
        self.moments: Dict[Hashable, List[float]] = {}  # prompt -> [mean, var, count]

    def update(self, prompts: Union[Sequence[Hashable], torch.Tensor], rewards: Numbers) -> List[float]:
        """Folds the batch into the averages, in order, then returns its advantages.

        Args:
            prompts: [N] prompt keys (a tensor's elements become Python values).
            rewards: [N] rewards.

        Returns:
            [N] advantages, as Python floats.
        """
        prompts, rewards = _checked_batch(prompts, rewards)
        if not prompts:
            return []
        for prompt, reward in zip(prompts, rewards):
            if prompt not in self.moments:
                self.moments[prompt] = [reward, 0.0, 1]
                continue
            mean, var, count = self.moments[prompt]
            delta = reward - mean
            self.moments[prompt] = [
                mean + (1 - self.decay) * delta,
                self.decay * (var + (1 - self.decay) * delta * delta),
                count + 1,
            ]
        batch_mean, batch_std = mean_std(rewards)
        advantages = []
        for prompt, reward in zip(prompts, rewards):
            mean, var, count = self.moments[prompt]
            if count < self.min_count:
                mean, std = batch_mean, batch_std
            else:
                std = math.sqrt(var)
            advantages.append((reward - mean) / (std + self.eps))
        return advantages

    def stats(self) -> Dict[Hashable, Tuple[float, float, int]]:
        """Returns (mean, std, count) of every prompt seen.

        Returns:
            A dict from prompt to its moving mean, std and count.
        """
        return {prompt: (mean, math.sqrt(var), count) for prompt, (mean, var, count) in self.moments.items()}
