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
from typing import Deque, Dict, Hashable, Iterable, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch

from rail_interview.stat_tracking.functional import BASELINES, FALLBACKS, SCALES
from rail_interview.stat_tracking.memory import MEMORIES

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
    mean, variance = mean_variance(values)
    return mean, math.sqrt(variance)


def ema_fold(moments: Dict[Hashable, list], prompt: Hashable, reward: float, decay: float) -> None:
    """Folds one reward into a prompt's moving mean, variance and count, in place.

    The first reward of a prompt sets mean = r, var = 0, count = 1; after
    that d = r - mean; mean += (1 - decay) * d; var = decay * (var + (1 -
    decay) * d * d); count += 1.

    Args:
        moments: prompt to [mean, var, count], updated in place.
        prompt: the reward's prompt.
        reward: the reward.
        decay: weight kept by the old statistics, in (0, 1).
    """
    if prompt not in moments:
        moments[prompt] = [reward, 0.0, 1]
        return
    mean, var, count = moments[prompt]
    delta = reward - mean
    moments[prompt] = [mean + (1 - decay) * delta, decay * (var + (1 - decay) * delta * delta), count + 1]


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
            ema_fold(self.moments, prompt, reward, self.decay)
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


def mean_variance(values: Sequence[float]) -> Tuple[float, float]:
    """Mean and population variance (ddof 0) of a non-empty sequence, exactly rounded sums.

    Args:
        values: numbers.

    Returns:
        (mean, variance) as Python floats.
    """
    mean = math.fsum(values) / len(values)
    return mean, math.fsum((v - mean) ** 2 for v in values) / len(values)


class ReferenceUpdateReport(NamedTuple):
    """What ``ReferenceAdvantageTracker.update_with_report`` returns, as Python values.

    Attributes:
        advantages: [N] advantages (0 for invalid samples).
        valid: [N] whether each sample entered memory and the statistics.
        fallback: [N] valid and its prompt had fewer than ``min_count`` rewards.
        zero_variance: [N] valid and all valid rewards of its prompt in this batch are equal.
        zero_variance_fraction: share of the batch's prompts (with a valid reward)
            whose valid rewards are all equal; 0.0 if no prompt has one.
    """

    advantages: List[float]
    valid: List[bool]
    fallback: List[bool]
    zero_variance: List[bool]
    zero_variance_fraction: float


class ReferenceAdvantageTracker:
    """Dict-based tracker with every memory and estimator option of ``AdvantageTracker``.

    One update, in words (the specification the tensor tracker is tested
    against):

    1. A sample is valid if ``valid`` says so and, with
       ``nan_rewards="invalid"``, its reward is not NaN. Invalid samples touch
       no state and no statistic, and get advantage 0.
    2. Each prompt's valid rewards, in batch order, go into its memory, which
       gives its count n, mean m and population variance v, and each sample's
       weight w in m: ``"none"``, this batch only (w = 1/n); ``"buffer"``, a
       ``deque(maxlen=buffer_size)`` (w = 1/n if the reward is still in it,
       else 0); ``"ema"``, the sequential EMA fold (w = the reward's weight in
       the moving mean).
    3. The batch's valid rewards give a mean B_m and std B_s (with ``ddof``;
       0 when there are at most ``ddof`` of them).
    4. A prompt with n < ``min_count`` falls back: its (mean, std) become
       (B_m, B_s) for ``"batch"``, (0, 1) for ``"raw"``, and its advantages
       are 0 for ``"zero"``. Otherwise its std is sqrt(v * n / (n - ddof)).
       The advantage is a numerator, r - m (``"prompt_mean"``), r - B_m
       (``"batch_mean"``) or (r - m) / (1 - w) (``"leave_one_out"``; r - the
       prompt's mean in fallback), divided by the prompt's std + eps
       (``"prompt_std"``), by B_s + eps (``"batch_std"``) or by 1 (``"none"``).

    With a ``capacity`` (the specification of ``keys="hashed"``), memory is
    an LRU-ordered dict: before step 2, the batch's keys (those with a
    valid sample) are ordered by their last valid occurrence and moved to
    the most recent end, after every earlier key; if there are more than
    ``capacity`` of them, only the last ``capacity`` are; the others
    *overflow*. Then the least recent keys are evicted (their memory
    forgotten) until at most ``capacity`` remain. An overflow key's samples
    get the fallback's advantage (as a prompt with no statistics: from the
    reward, B_m and B_s) and count as fallen back; they still form a group
    for ``zero_variance``.

    Args:
        memory: ``"none"``, ``"buffer"`` or ``"ema"``.
        buffer_size: K, rewards kept per prompt (``memory="buffer"``).
        decay: weight kept by the old statistics at each reward, in (0, 1)
            (``memory="ema"``).
        baseline: ``"prompt_mean"``, ``"leave_one_out"`` or ``"batch_mean"``.
        scale: ``"prompt_std"``, ``"batch_std"`` or ``"none"``.
        ddof: 0 or 1, the delta degrees of freedom of every std.
        eps: added to the std before dividing.
        min_count: valid rewards a prompt needs (this batch included) before
            its own statistics are used.
        fallback: ``"batch"``, ``"raw"`` or ``"zero"``, for prompts below
            ``min_count``.
        nan_rewards: ``"refuse"`` (a NaN reward raises) or ``"invalid"`` (a
            NaN reward marks its sample invalid).
        capacity: the most keys remembered (least recently seen out
            first), or None for no limit.

    Raises:
        ValueError: if an option is unknown or out of range, if
            ``min_count < ddof + 1``, or if ``min_count < 2`` with
            ``"leave_one_out"``.

    Example:
        >>> tracker = ReferenceAdvantageTracker(baseline="leave_one_out", scale="none", fallback="raw")
        >>> [round(a, 9) for a in tracker.update(["a", "a", "a", "b"], [1.0, 2.0, 6.0, 5.0])]
        [-3.0, -1.5, 4.5, 5.0]
    """

    def __init__(
        self,
        memory: str = "none",
        *,
        buffer_size: int = 32,
        decay: float = 0.7,
        baseline: str = "prompt_mean",
        scale: str = "prompt_std",
        ddof: int = 0,
        eps: float = 1e-6,
        min_count: int = 2,
        fallback: str = "batch",
        nan_rewards: str = "refuse",
        capacity: Optional[int] = None,
    ) -> None:
        choices = dict(
            memory=(memory, MEMORIES),
            baseline=(baseline, BASELINES),
            scale=(scale, SCALES),
            fallback=(fallback, FALLBACKS),
            nan_rewards=(nan_rewards, ("refuse", "invalid")),
        )
        for name, (value, allowed) in choices.items():
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        if ddof not in (0, 1):
            raise ValueError(f"ddof must be 0 or 1, got {ddof!r}")
        if buffer_size < 1:
            raise ValueError(f"buffer_size must be at least 1, got {buffer_size!r}")
        if not 0.0 < decay < 1.0:
            raise ValueError(f"decay must lie in (0, 1), got {decay!r}")
        if min_count < ddof + 1:
            raise ValueError(f"min_count must be at least ddof + 1 = {ddof + 1}, got {min_count!r}")
        if baseline == "leave_one_out" and min_count < 2:
            raise ValueError(f"leave_one_out needs min_count >= 2, got {min_count!r}")
        self.memory, self.buffer_size, self.decay = memory, buffer_size, decay
        self.baseline, self.scale, self.ddof, self.eps = baseline, scale, ddof, eps
        self.min_count, self.fallback, self.nan_rewards = min_count, fallback, nan_rewards
        self.buffers: Dict[Hashable, Deque[float]] = {}  # memory="buffer": prompt -> its last K rewards
        self.moments: Dict[Hashable, List[float]] = {}  # memory="ema": prompt -> [mean, var, count]
        self.capacity = capacity
        # With a capacity: the keys remembered, least recently seen first.
        self.recent: "collections.OrderedDict[Hashable, None]" = collections.OrderedDict()

    def update(
        self,
        prompts: Union[Sequence[Hashable], torch.Tensor],
        rewards: Numbers,
        valid: Optional[Union[Sequence[bool], torch.Tensor]] = None,
    ) -> List[float]:
        """Folds the batch's valid samples into memory, then returns its advantages.

        Args:
            prompts: [N] prompt keys (a tensor's elements become Python values).
            rewards: [N] rewards.
            valid: optional [N] bools; False samples are ignored (advantage 0).

        Returns:
            [N] advantages, as Python floats.

        Raises:
            ValueError: on mismatched lengths, an infinite reward, or a NaN
                reward with ``nan_rewards="refuse"``.
        """
        return self.update_with_report(prompts, rewards, valid).advantages

    def update_with_report(
        self,
        prompts: Union[Sequence[Hashable], torch.Tensor],
        rewards: Numbers,
        valid: Optional[Union[Sequence[bool], torch.Tensor]] = None,
    ) -> ReferenceUpdateReport:
        """As ``update``, and also says which samples were valid, fell back or had zero variance.

        Args:
            prompts: [N] prompt keys (a tensor's elements become Python values).
            rewards: [N] rewards.
            valid: optional [N] bools; False samples are ignored (advantage 0).

        Returns:
            A ``ReferenceUpdateReport`` of Python values.

        Raises:
            ValueError: as ``update``.
        """
        prompts, rewards = _checked_batch(prompts, rewards)
        valid = [True] * len(prompts) if valid is None else [bool(v) for v in _as_list(valid)]
        if len(valid) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts and {len(valid)} valid flags")
        if any(math.isinf(r) or (math.isnan(r) and self.nan_rewards == "refuse") for r in rewards):
            raise ValueError("rewards must be finite (NaN is allowed only with nan_rewards='invalid')")
        valid = [v and not math.isnan(r) for v, r in zip(valid, rewards)]
        groups: Dict[Hashable, List[int]] = {}  # prompt -> its valid samples, in batch order
        for i, prompt in enumerate(prompts):
            if valid[i]:
                groups.setdefault(prompt, []).append(i)

        overflow = self._see(prompts, valid) if self.capacity is not None else set()
        prompt_stats: Dict[Hashable, Tuple[int, float, float]] = {}  # prompt -> (n, m, v)
        weights: Dict[int, float] = {}  # valid sample -> weight of its reward in its prompt's mean
        for prompt, samples in groups.items():
            if prompt in overflow:
                prompt_stats[prompt] = (0, math.nan, math.nan)
                continue
            values = [rewards[i] for i in samples]
            prompt_stats[prompt] = self._fold(prompt, values)
            weights.update(zip(samples, self._weights(prompt_stats[prompt][0], len(values))))

        batch_values = [r for r, v in zip(rewards, valid) if v]
        batch_mean, batch_std = 0.0, 0.0
        if batch_values:
            batch_mean = math.fsum(batch_values) / len(batch_values)
        if len(batch_values) > self.ddof:
            squares = math.fsum((r - batch_mean) ** 2 for r in batch_values)
            batch_std = math.sqrt(squares / (len(batch_values) - self.ddof))

        advantages, fallback = [0.0] * len(prompts), [False] * len(prompts)
        for i, (prompt, reward) in enumerate(zip(prompts, rewards)):
            if not valid[i]:
                continue
            count, mean, variance = prompt_stats[prompt]
            fallback[i] = count < self.min_count
            if fallback[i]:
                if self.fallback == "zero":
                    continue
                mean, std = (batch_mean, batch_std) if self.fallback == "batch" else (0.0, 1.0)
                numerator = reward - mean
            else:
                std = math.sqrt(variance * count / (count - self.ddof))
                if self.baseline == "prompt_mean":
                    numerator = reward - mean
                elif self.baseline == "batch_mean":
                    numerator = reward - batch_mean
                else:  # leave_one_out: r minus the mean of the prompt's other rewards
                    numerator = (reward - mean) / (1.0 - weights[i])
            denominator = {"prompt_std": std + self.eps, "batch_std": batch_std + self.eps, "none": 1.0}[self.scale]
            advantages[i] = numerator / denominator

        equal = {prompt: len(set(rewards[i] for i in samples)) == 1 for prompt, samples in groups.items()}
        zero_variance = [valid[i] and equal[prompt] for i, prompt in enumerate(prompts)]
        fraction = sum(equal.values()) / len(equal) if equal else 0.0
        return ReferenceUpdateReport(advantages, valid, fallback, zero_variance, fraction)

    def _see(self, prompts: list, valid: List[bool]) -> set:
        """Moves the batch's keys to the recent end and evicts the oldest; returns the overflow keys."""
        last = {prompt: i for i, (prompt, ok) in enumerate(zip(prompts, valid)) if ok}
        batch = sorted(last, key=last.get)  # least recently seen first
        overflow = set(batch[: max(0, len(batch) - self.capacity)])
        kept = batch[len(overflow) :]
        for prompt in kept:
            self.recent.pop(prompt, None)
        while self.recent and len(self.recent) + len(kept) > self.capacity:
            self._forget(self.recent.popitem(last=False)[0])
        for prompt in kept:
            self.recent[prompt] = None
        for prompt in overflow:
            self._forget(prompt)
        return overflow

    def _forget(self, prompt: Hashable) -> None:
        """Drops a prompt's memory."""
        self.buffers.pop(prompt, None)
        self.moments.pop(prompt, None)

    def _fold(self, prompt: Hashable, values: List[float]) -> Tuple[int, float, float]:
        """Writes one prompt's valid rewards into memory; returns its (count, mean, variance)."""
        if self.memory == "none":
            return (len(values), *mean_variance(values))
        if self.memory == "buffer":
            buffer = self.buffers.setdefault(prompt, collections.deque(maxlen=self.buffer_size))
            buffer.extend(values)
            return (len(buffer), *mean_variance(buffer))
        for reward in values:
            ema_fold(self.moments, prompt, reward, self.decay)
        mean, var, count = self.moments[prompt]
        return count, mean, var

    def _weights(self, count: int, batch_count: int) -> List[float]:
        """Weight of each of a prompt's ``batch_count`` new rewards in its mean, after the fold."""
        if self.memory == "none":
            return [1.0 / count] * batch_count
        if self.memory == "buffer":
            return [1.0 / count if j >= batch_count - self.buffer_size else 0.0 for j in range(batch_count)]
        first_ever = count == batch_count  # the prompt had no reward before this batch
        return [
            self.decay ** (batch_count - 1)
            if first_ever and j == 0
            else (1 - self.decay) * self.decay ** (batch_count - 1 - j)
            for j in range(batch_count)
        ]

    def stats(self) -> Dict[Hashable, Tuple[float, float, int]]:
        """Returns (mean, std, count) of every prompt in memory (empty for ``memory="none"``).

        Returns:
            A dict from prompt to its mean, population std (ddof 0) and count.
        """
        if self.memory == "buffer":
            return {prompt: (*mean_std(buffer), len(buffer)) for prompt, buffer in self.buffers.items()}
        return {prompt: (mean, math.sqrt(var), count) for prompt, (mean, var, count) in self.moments.items()}
