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


class ReferencePromptQuery(NamedTuple):
    """What ``ReferenceAdvantageTracker.query`` returns, as Python values (see ``types.PromptQuery``).

    Attributes:
        pass_rate: [M] the memory's estimate of each prompt's mean reward, NaN
            where it holds nothing.
        uncertainty: [M] the standard error of that estimate, NaN where
            ``pass_rate`` is.
        count: [M] the rewards the memory has folded in for the prompt.
        streak: [M] the prompt's streak, or None without ``track_streaks``.
    """

    pass_rate: List[float]
    uncertainty: List[float]
    count: List[int]
    streak: Optional[List[int]]


#: The memories, as ``AdvantageTracker(memory=...)`` names them (``memory.MEMORIES``).
MEMORIES = ("none", "buffer", "ema", "beta")

#: A Beta memory's alpha and beta for a prompt before any reward or ``set_prior``.
BETA_PRIOR = 0.5

#: The rules of the Beta memory for a prompt seen several times in one batch.
REPEATS = ("all", "last")

#: What ``normalize`` takes.
NORMALIZE = ("none", "batch")


class ReferenceAdvantageTracker:
    """Dict-based tracker with every memory and estimator option of ``AdvantageTracker``.

    One update, in words (the specification the tensor tracker is tested
    against):

    0. Refusals, before anything changes (ValueError): inputs of different
       lengths; an infinite reward, or a NaN one with ``nan_rewards="refuse"``;
       with ``memory="beta"``, a valid sample's reward outside [0, 1]; a
       ``discount`` with another memory, of another length, or with a value
       (any sample's, valid or not) outside (0, 1].
    1. A sample is valid if ``valid`` says so and, with
       ``nan_rewards="invalid"``, its reward is not NaN. Invalid samples touch
       no state and no statistic, and get advantage 0.
    2. Each prompt's valid rewards, in batch order, go into its memory, which
       gives its count n, mean m and std S, and each sample's weight w in m:

       * ``"none"``: this batch only: n its valid rewards, m their mean,
         S = sqrt(v * n / (n - ddof)) with v their population variance;
         w = 1/n.
       * ``"buffer"``: a ``deque(maxlen=buffer_size)``; n, m and S of the
         deque as for ``"none"``; w = 1/n if the reward is still in it,
         else 0.
       * ``"ema"``: the sequential EMA fold (``ema_fold``); m its mean, S =
         sqrt(var * n / (n - ddof)); w = the reward's weight in the mean.
       * ``"beta"``: per prompt alpha, beta (both 0.5 until a reward or
         ``set_prior``) and a count. Each sample has a discount rho: its
         entry of ``discount``, else ``decay``. With ``repeats="all"`` every
         valid reward r, in batch order, does ``alpha <- rho * alpha + r;
         beta <- rho * beta + (1 - r)``; with ``repeats="last"`` (SPO's
         code) only the prompt's last valid sample does, from the state
         before the batch (the others' rewards are lost). Either way count
         += the prompt's valid samples in the batch. m = p = alpha / (alpha
         + beta), S = sqrt(p (1 - p)) whatever ``ddof``, and w = the
         reward's weight in alpha (``"all"``: the product of the later
         samples' rho in the prompt's batch; ``"last"``: 1 for the last
         sample, 0 for the others) over alpha + beta.

       With ``include_batch=False`` (baselines from the past only), n, m and
       S are instead those of the prompt's memory as it was *before* the
       batch, the same for all its samples, and w = 0 (so leave-one-out is
       r - m); the batch is then folded in as above. A prompt the memory
       holds nothing for has n = 0 (the Beta memory: its prior, p = 0.5).
    3. The batch's valid rewards give a mean B_m and std B_s (with ``ddof``;
       0 when there are at most ``ddof`` of them).
    4. A prompt with n < ``min_count`` falls back: its (mean, std) become
       (B_m, B_s) for ``"batch"``, (0, 1) for ``"raw"``, and its advantages
       are 0 for ``"zero"``. Otherwise (mean, std) are (m, S).
       The advantage is a numerator, r - m (``"prompt_mean"``), r - B_m
       (``"batch_mean"``) or (r - m) / (1 - w) (``"leave_one_out"``; r - the
       prompt's mean in fallback), divided by the prompt's std + eps
       (``"prompt_std"``), by B_s + eps (``"batch_std"``) or by 1 (``"none"``).
    5. With ``normalize="batch"``, last of all (after fallbacks, overflow and
       invalid samples' zeros), the valid samples' advantages a become
       (a - a_m) / (a_s + ``normalize_eps``), a_m and a_s their mean and std
       (with ``ddof``; 0 when there are at most ``ddof`` of them). Invalid
       samples stay 0.
    6. With ``track_streaks``, each prompt *visited* (at least one valid
       sample that went into its memory; overflow samples do not) gets
       streak + 1 if its valid rewards in the batch are all exactly equal,
       else 0. Other prompts keep theirs; a prompt never visited has 0.

    With a ``capacity`` (the specification of ``keys="hashed"``), memory is
    an LRU-ordered dict: before step 2, the batch's keys (those with a
    valid sample) are ordered by their last valid occurrence and moved to
    the most recent end, after every earlier key; if there are more than
    ``capacity`` of them, only the last ``capacity`` are; the others
    *overflow*. Then the least recent keys are evicted (their memory
    forgotten: buffer, EMA, Beta state back to the prior with count 0, and
    streak) until at most ``capacity`` remain. An overflow key's samples
    get the fallback's advantage (as a prompt with no statistics: from the
    reward, B_m and B_s) and count as fallen back, whatever ``min_count``;
    they still form a group for ``zero_variance``, and the key is
    forgotten.

    ``set_prior`` sets Beta priors and ``query`` reads each prompt's pass
    rate, its uncertainty, count and streak, changing nothing.

    Args:
        memory: ``"none"``, ``"buffer"``, ``"ema"`` or ``"beta"``.
        buffer_size: K, rewards kept per prompt (``memory="buffer"``).
        decay: weight kept by the old statistics at each reward, in (0, 1)
            (``memory="ema"``); the Beta memory's discount rho when no
            ``discount`` is given, in (0, 1] (``memory="beta"``).
        baseline: ``"prompt_mean"``, ``"leave_one_out"`` or ``"batch_mean"``.
        scale: ``"prompt_std"``, ``"batch_std"`` or ``"none"``.
        ddof: 0 or 1, the delta degrees of freedom of every std (but the
            Beta memory's).
        eps: added to the std before dividing.
        min_count: valid rewards a prompt needs (this batch included, unless
            ``include_batch`` is False) before its own statistics are used;
            any n >= 0 with the Beta memory.
        fallback: ``"batch"``, ``"raw"`` or ``"zero"``, for prompts below
            ``min_count``.
        nan_rewards: ``"refuse"`` (a NaN reward raises) or ``"invalid"`` (a
            NaN reward marks its sample invalid).
        capacity: the most keys remembered (least recently seen out
            first), or None for no limit.
        repeats: ``"all"`` or ``"last"``, the Beta memory's rule for a
            prompt seen several times in a batch.
        include_batch: whether a sample's statistics include its batch
            (False: the memory before the batch; not with ``"none"``).
        normalize: ``"none"`` or ``"batch"`` (step 5).
        normalize_eps: added to the std of step 5.
        track_streaks: keep each prompt's streak (step 6).

    Raises:
        ValueError: if an option is unknown or out of range, if
            ``min_count < ddof + 1`` or ``min_count < 2`` with
            ``"leave_one_out"`` (both but for the Beta memory, whose
            ``min_count`` may be any n >= 0), or if ``include_batch`` is
            False without memory.

    Example:
        >>> tracker = ReferenceAdvantageTracker(baseline="leave_one_out", scale="none", fallback="raw")
        >>> [round(a, 9) for a in tracker.update(["a", "a", "a", "b"], [1.0, 2.0, 6.0, 5.0])]
        [-3.0, -1.5, 4.5, 5.0]
        >>> # SPO: a pass rate from the past only, r - p, whitened over the batch.
        >>> spo = ReferenceAdvantageTracker(
        ...     "beta", decay=0.9, repeats="last", include_batch=False, scale="none", min_count=0,
        ...     normalize="batch", ddof=1, track_streaks=True,
        ... )
        >>> [round(a, 4) for a in spo.update(["a", "a", "b"], [1.0, 1.0, 0.0])]
        [0.5774, 0.5774, -1.1547]
        >>> query = spo.query(["a", "b", "c"])
        >>> [round(p, 4) for p in query.pass_rate], query.count, query.streak
        ([0.7632, 0.2368, 0.5], [2, 1, 0], [1, 1, 0])
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
        repeats: str = "all",
        include_batch: bool = True,
        normalize: str = "none",
        normalize_eps: float = 1e-8,
        track_streaks: bool = False,
    ) -> None:
        choices = dict(
            memory=(memory, MEMORIES),
            baseline=(baseline, BASELINES),
            scale=(scale, SCALES),
            fallback=(fallback, FALLBACKS),
            nan_rewards=(nan_rewards, ("refuse", "invalid")),
            repeats=(repeats, REPEATS),
            normalize=(normalize, NORMALIZE),
        )
        for name, (value, allowed) in choices.items():
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        if ddof not in (0, 1):
            raise ValueError(f"ddof must be 0 or 1, got {ddof!r}")
        if buffer_size < 1:
            raise ValueError(f"buffer_size must be at least 1, got {buffer_size!r}")
        if memory == "beta":
            if not 0.0 < decay <= 1.0:
                raise ValueError(f"decay must lie in (0, 1] with memory='beta', got {decay!r}")
            if min_count < 0:
                raise ValueError(f"min_count must be at least 0, got {min_count!r}")
        else:
            if not 0.0 < decay < 1.0:
                raise ValueError(f"decay must lie in (0, 1), got {decay!r}")
            if min_count < ddof + 1:
                raise ValueError(f"min_count must be at least ddof + 1 = {ddof + 1}, got {min_count!r}")
            if baseline == "leave_one_out" and min_count < 2:
                raise ValueError(f"leave_one_out needs min_count >= 2, got {min_count!r}")
        if not include_batch and memory == "none":
            raise ValueError("include_batch=False needs a memory: without one there is no past to read")
        if not normalize_eps >= 0:
            raise ValueError(f"normalize_eps must be non-negative, got {normalize_eps!r}")
        self.memory, self.buffer_size, self.decay = memory, buffer_size, decay
        self.baseline, self.scale, self.ddof, self.eps = baseline, scale, ddof, eps
        self.min_count, self.fallback, self.nan_rewards = min_count, fallback, nan_rewards
        self.repeats, self.include_batch = repeats, include_batch
        self.normalize, self.normalize_eps = normalize, normalize_eps
        self.track_streaks = track_streaks
        self.buffers: Dict[Hashable, Deque[float]] = {}  # memory="buffer": prompt -> its last K rewards
        self.moments: Dict[Hashable, List[float]] = {}  # memory="ema": prompt -> [mean, var, count]
        self.betas: Dict[Hashable, list] = {}  # memory="beta": prompt -> [alpha, beta, count]; absent: the prior
        self.streak: Dict[Hashable, int] = {}  # track_streaks: prompt -> its streak; absent: 0
        self.capacity = capacity
        # With a capacity: the keys remembered, least recently seen first.
        self.recent: "collections.OrderedDict[Hashable, None]" = collections.OrderedDict()

    def update(
        self,
        prompts: Union[Sequence[Hashable], torch.Tensor],
        rewards: Numbers,
        valid: Optional[Union[Sequence[bool], torch.Tensor]] = None,
        discount: Optional[Numbers] = None,
    ) -> List[float]:
        """Folds the batch's valid samples into memory, then returns its advantages.

        Args:
            prompts: [N] prompt keys (a tensor's elements become Python values).
            rewards: [N] rewards.
            valid: optional [N] bools; False samples are ignored (advantage 0).
            discount: optional [N] discounts in (0, 1], each sample's rho
                (``memory="beta"`` only); None for ``decay``.

        Returns:
            [N] advantages, as Python floats.

        Raises:
            ValueError: as step 0 of the class docstring says; the state is
                then unchanged.
        """
        return self.update_with_report(prompts, rewards, valid, discount).advantages

    def update_with_report(
        self,
        prompts: Union[Sequence[Hashable], torch.Tensor],
        rewards: Numbers,
        valid: Optional[Union[Sequence[bool], torch.Tensor]] = None,
        discount: Optional[Numbers] = None,
    ) -> ReferenceUpdateReport:
        """As ``update``, and also says which samples were valid, fell back or had zero variance.

        Args:
            prompts: [N] prompt keys (a tensor's elements become Python values).
            rewards: [N] rewards.
            valid: optional [N] bools; False samples are ignored (advantage 0).
            discount: as for ``update``.

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
        rhos = self._discounts(discount, len(prompts))
        valid = [v and not math.isnan(r) for v, r in zip(valid, rewards)]
        if self.memory == "beta" and any(v and not 0.0 <= r <= 1.0 for r, v in zip(rewards, valid)):
            raise ValueError("rewards must lie in [0, 1] with memory='beta'")
        groups: Dict[Hashable, List[int]] = {}  # prompt -> its valid samples, in batch order
        for i, prompt in enumerate(prompts):
            if valid[i]:
                groups.setdefault(prompt, []).append(i)

        overflow = self._see(prompts, valid) if self.capacity is not None else set()
        prompt_stats: Dict[Hashable, Tuple[int, float, float]] = {}  # prompt -> (n, m, S)
        weights: Dict[int, float] = {}  # valid sample -> weight of its reward in its prompt's mean
        for prompt, samples in groups.items():
            if prompt in overflow:
                prompt_stats[prompt] = (0, math.nan, math.nan)
                continue
            values = [rewards[i] for i in samples]
            if not self.include_batch:
                prompt_stats[prompt] = self._read(prompt)
                weights.update((i, 0.0) for i in samples)
            folded = self._fold(prompt, values, [rhos[i] for i in samples])
            if self.include_batch:
                prompt_stats[prompt] = folded[:3]
                weights.update(zip(samples, folded[3]))
            if self.track_streaks:
                self.streak[prompt] = self.streak.get(prompt, 0) + 1 if len(set(values)) == 1 else 0

        batch_mean, batch_std = _mean_std_ddof([r for r, v in zip(rewards, valid) if v], self.ddof)
        advantages, fallback = [0.0] * len(prompts), [False] * len(prompts)
        for i, (prompt, reward) in enumerate(zip(prompts, rewards)):
            if not valid[i]:
                continue
            count, mean, std = prompt_stats[prompt]
            fallback[i] = prompt in overflow or count < self.min_count
            if fallback[i]:
                if self.fallback == "zero":
                    continue
                mean, std = (batch_mean, batch_std) if self.fallback == "batch" else (0.0, 1.0)
                numerator = reward - mean
            elif self.baseline == "prompt_mean":
                numerator = reward - mean
            elif self.baseline == "batch_mean":
                numerator = reward - batch_mean
            else:  # leave_one_out: r minus the mean of the prompt's other rewards
                numerator = (reward - mean) / (1.0 - weights[i])
            denominator = {"prompt_std": std + self.eps, "batch_std": batch_std + self.eps, "none": 1.0}[self.scale]
            advantages[i] = numerator / denominator

        if self.normalize == "batch":
            center, spread = _mean_std_ddof([a for a, v in zip(advantages, valid) if v], self.ddof)
            advantages = [(a - center) / (spread + self.normalize_eps) if v else 0.0 for a, v in zip(advantages, valid)]

        equal = {prompt: len(set(rewards[i] for i in samples)) == 1 for prompt, samples in groups.items()}
        zero_variance = [valid[i] and equal[prompt] for i, prompt in enumerate(prompts)]
        fraction = sum(equal.values()) / len(equal) if equal else 0.0
        return ReferenceUpdateReport(advantages, valid, fallback, zero_variance, fraction)

    def _discounts(self, discount: Optional[Numbers], size: int) -> List[float]:
        """Each sample's rho: ``discount`` checked, or ``decay`` for every sample."""
        if discount is None:
            return [float(self.decay)] * size
        if self.memory != "beta":
            raise ValueError(f"a per-sample discount needs memory='beta', not {self.memory!r}")
        rhos = [float(rho) for rho in _as_list(discount)]
        if len(rhos) != size:
            raise ValueError(f"got {size} samples and {len(rhos)} discounts")
        if not all(0.0 < rho <= 1.0 for rho in rhos):
            raise ValueError("discounts must lie in (0, 1]")
        return rhos

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
        """Drops a prompt's memory (a Beta state goes back to the prior) and streak."""
        self.buffers.pop(prompt, None)
        self.moments.pop(prompt, None)
        self.betas.pop(prompt, None)
        self.streak.pop(prompt, None)

    def _std(self, count: int, variance: float) -> float:
        """sqrt(variance * n / (n - ddof)); NaN where n <= ddof (such a prompt always falls back)."""
        return math.sqrt(variance * count / (count - self.ddof)) if count > self.ddof else math.nan

    def _beta_state(self, prompt: Hashable) -> list:
        """[alpha, beta, count] of a prompt, the prior's if the memory holds nothing for it."""
        return list(self.betas.get(prompt, (BETA_PRIOR, BETA_PRIOR, 0)))

    def _read(self, prompt: Hashable) -> Tuple[int, float, float]:
        """(n, m, S) of a prompt's memory as it is now (n = 0, m = S = NaN where it holds nothing but a prior)."""
        if self.memory == "buffer":
            values = self.buffers.get(prompt, ())
            if not values:
                return 0, math.nan, math.nan
            mean, variance = mean_variance(values)
            return len(values), mean, self._std(len(values), variance)
        if self.memory == "ema":
            if prompt not in self.moments:
                return 0, math.nan, math.nan
            mean, variance, count = self.moments[prompt]
            return count, mean, self._std(count, variance)
        alpha, beta, count = self._beta_state(prompt)
        p = alpha / (alpha + beta)
        return count, p, math.sqrt(max(p * (1.0 - p), 0.0))

    def _fold(self, prompt: Hashable, values: List[float], rhos: List[float]) -> Tuple[int, float, float, List[float]]:
        """Writes one prompt's valid rewards (and their discounts) into memory.

        Returns:
            Its (n, m, S) after the fold, and the weight of each new reward in m.
        """
        if self.memory == "none":
            mean, variance = mean_variance(values)
            return len(values), mean, self._std(len(values), variance), [1.0 / len(values)] * len(values)
        if self.memory == "buffer":
            buffer = self.buffers.setdefault(prompt, collections.deque(maxlen=self.buffer_size))
            buffer.extend(values)
            mean, variance = mean_variance(buffer)
            count = len(buffer)
            kept = [1.0 / count if j >= len(values) - self.buffer_size else 0.0 for j in range(len(values))]
            return count, mean, self._std(count, variance), kept
        if self.memory == "ema":
            first_ever = prompt not in self.moments
            for reward in values:
                ema_fold(self.moments, prompt, reward, self.decay)
            mean, variance, count = self.moments[prompt]
            last = len(values) - 1
            weights = [
                self.decay**last if first_ever and j == 0 else (1 - self.decay) * self.decay ** (last - j)
                for j in range(len(values))
            ]
            return count, mean, self._std(count, variance), weights
        alpha, beta, count = self._beta_state(prompt)
        if self.repeats == "all":
            for reward, rho in zip(values, rhos):
                alpha, beta = rho * alpha + reward, rho * beta + (1.0 - reward)
            in_alpha = [math.prod(rhos[j + 1 :]) for j in range(len(values))]
        else:  # "last": the last sample's update from the state before the batch stands
            alpha, beta = rhos[-1] * alpha + values[-1], rhos[-1] * beta + (1.0 - values[-1])
            in_alpha = [0.0] * (len(values) - 1) + [1.0]
        count += len(values)
        self.betas[prompt] = [alpha, beta, count]
        total = alpha + beta
        p = alpha / total
        return count, p, math.sqrt(max(p * (1.0 - p), 0.0)), [w / total for w in in_alpha]

    def set_prior(
        self,
        prompts: Union[Sequence[Hashable], torch.Tensor],
        successes: Numbers,
        trials: Numbers,
        *,
        strength: Optional[Union[float, Numbers]] = None,
    ) -> None:
        """Sets the Beta prior of some prompts from s successes in n trials (``memory="beta"`` only).

        alpha = k (s + 0.5) / (n + 1) and beta = k (n - s + 0.5) / (n + 1),
        with k = ``strength``, or n + 1 when None (alpha = s + 0.5, beta =
        n - s + 0.5); count and streak become 0. With a ``capacity`` (at
        least M) the prompts are seen as a batch of valid samples is, in the
        order given (moved to the recent end, the oldest keys evicted).

        Args:
            prompts: [M] distinct prompt keys.
            successes: [M] s, with 0 <= s <= n.
            trials: [M] n >= 0, finite.
            strength: k > 0 (one number, or [M]), the prior's alpha + beta,
                or None for n + 1.

        Raises:
            ValueError: without the Beta memory, on mismatched lengths, a
                prompt given twice, more prompts than ``capacity``, s or n
                out of range, or k not finite and positive; the state is then
                unchanged.
        """
        if self.memory != "beta":
            raise ValueError(f"set_prior needs memory='beta', not {self.memory!r}")
        prompts = _as_list(prompts)
        successes = [float(s) for s in _as_list(successes)]
        trials = [float(n) for n in _as_list(trials)]
        if strength is None:
            weights = [n + 1.0 for n in trials]
        elif isinstance(strength, (int, float)):
            weights = [float(strength)] * len(prompts)
        else:
            weights = [float(k) for k in _as_list(strength)]
        if not len(prompts) == len(successes) == len(trials) == len(weights):
            sizes = f"{len(successes)} successes, {len(trials)} trials and {len(weights)} strengths"
            raise ValueError(f"got {len(prompts)} prompts, {sizes}")
        if len(set(prompts)) != len(prompts):
            raise ValueError("prompts must be distinct (a prompt has one prior)")
        if self.capacity is not None and len(prompts) > self.capacity:
            raise ValueError(f"{len(prompts)} prompts do not fit the capacity of {self.capacity} keys")
        if not all(math.isfinite(n) and 0.0 <= s <= n for s, n in zip(successes, trials)):
            raise ValueError("successes and trials must be finite with 0 <= successes <= trials")
        if not all(math.isfinite(k) and k > 0 for k in weights):
            raise ValueError(f"strength must be finite and positive, or None; got {strength!r}")
        if self.capacity is not None:
            self._see(prompts, [True] * len(prompts))
        for prompt, s, n, k in zip(prompts, successes, trials, weights):
            self.betas[prompt] = [k * (s + 0.5) / (n + 1.0), k * (n - s + 0.5) / (n + 1.0), 0]
            self.streak.pop(prompt, None)

    def query(self, prompts: Union[Sequence[Hashable], torch.Tensor]) -> ReferencePromptQuery:
        """Each prompt's pass rate (mean reward), its uncertainty, count and streak; changes nothing.

        * ``"beta"``: p = alpha / (alpha + beta) and the posterior's std
          sqrt(alpha beta / ((alpha + beta)**2 (alpha + beta + 1))), the
          prior's (p = 0.5) for a prompt never seen;
        * ``"buffer"``: the buffer's mean and population std / sqrt(n);
        * ``"ema"``: the moving mean and sqrt(var) * sqrt((1 - decay) / (1 + decay));
        * NaN for both where the memory holds nothing (always without memory).

        Args:
            prompts: [M] prompt keys.

        Returns:
            A ``ReferencePromptQuery``.
        """
        prompts = _as_list(prompts)
        rates, spreads, counts = [], [], []
        for prompt in prompts:
            rate, spread, count = math.nan, math.nan, 0
            if self.memory == "beta":
                alpha, beta, count = self._beta_state(prompt)
                total = alpha + beta
                rate, spread = alpha / total, math.sqrt(alpha * beta / (total * total * (total + 1.0)))
            elif self.memory == "buffer" and self.buffers.get(prompt):
                count = len(self.buffers[prompt])
                rate, std = mean_std(self.buffers[prompt])
                spread = std / math.sqrt(count)
            elif self.memory == "ema" and prompt in self.moments:
                rate, variance, count = self.moments[prompt]
                spread = math.sqrt(variance) * math.sqrt((1.0 - self.decay) / (1.0 + self.decay))
            rates.append(rate)
            spreads.append(spread)
            counts.append(count)
        streaks = [self.streak.get(prompt, 0) for prompt in prompts] if self.track_streaks else None
        return ReferencePromptQuery(rates, spreads, counts, streaks)

    def streaks(self) -> Dict[Hashable, int]:
        """Returns the streak of every prompt that has one (``track_streaks``); others have 0.

        Returns:
            A dict from prompt to its streak (a copy).
        """
        return dict(self.streak)

    def stats(self) -> Dict[Hashable, Tuple[float, float, int]]:
        """Returns (mean, std, count) of every prompt in memory (empty for ``memory="none"``).

        Returns:
            A dict from prompt to its mean, population std (ddof 0) and count;
            for the Beta memory p, sqrt(p (1 - p)) and count, of every prompt
            that got a reward or a prior (the others hold the default prior).
        """
        if self.memory == "buffer":
            return {prompt: (*mean_std(buffer), len(buffer)) for prompt, buffer in self.buffers.items()}
        if self.memory == "beta":
            return {prompt: self._read(prompt) for prompt in self.betas}
        return {prompt: (mean, math.sqrt(var), count) for prompt, (mean, var, count) in self.moments.items()}


def _mean_std_ddof(values: Sequence[float], ddof: int) -> Tuple[float, float]:
    """Mean (0 when empty) and std with ``ddof`` (0 when there are at most ``ddof`` values), exactly rounded sums."""
    mean = math.fsum(values) / len(values) if values else 0.0
    if len(values) <= ddof:
        return mean, 0.0
    return mean, math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (len(values) - ddof))
