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

from rail_interview.stat_tracking.functional import BASELINES, EPS_RULES, FALLBACKS, SCALES

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


class _OneRewardReport(NamedTuple):
    """The five fields of ``ReferenceUpdateReport`` that it holds as a tuple (see there)."""

    advantages: List[float]
    valid: List[bool]
    fallback: List[bool]
    zero_variance: List[bool]
    zero_variance_fraction: float


class ReferenceUpdateReport(_OneRewardReport):
    """What ``ReferenceAdvantageTracker.update_with_report`` returns, as Python values.

    It is (and compares as) the tuple of the first five attributes, those
    of one reward; the others are attributes beside them.

    Attributes:
        advantages: [N] advantages (0 for invalid samples).
        valid: [N] whether each sample entered memory and the statistics.
        fallback: [N] valid and its prompt had fewer than ``min_count`` rewards.
        zero_variance: [N] valid and all valid rewards of its prompt in this batch are equal.
        zero_variance_fraction: share of the batch's prompts (with a valid reward)
            whose valid rewards are all equal; 0.0 if no prompt has one.
        channel_zero_variance_fraction: with several rewards (``num_rewards``
            C > 1), [C]: per reward function, the share of the batch's
            prompts with a reward of it that counts whose counting rewards of
            it are all equal (0.0 where no prompt has one); None with one
            reward. With several rewards, ``zero_variance`` and the fraction
            are those of the combined reward (``"sum_then_normalize"``) or
            of every reward function at once (``"normalize_then_sum"``: each
            reward function's counting rewards all equal), and ``fallback``
            is True where the sample fell back in at least one reward that
            counts.
        parts: [N][S], each sample's advantage from each stream the
            estimator ran on, before the reward weights and the batch
            normalisation: S = C reward functions with
            ``"normalize_then_sum"`` (0.0 where that reward does not count),
            S = 1 (the combined reward's) otherwise.
        divisors: [N][S], what each of ``parts`` was divided by (the std
            after the eps rule, or 1 where nothing divided it: no scale, a
            ``"zero"`` fallback, a reward that does not count), for error
            bounds.
    """

    channel_zero_variance_fraction: Optional[List[float]] = None
    parts: Optional[List[List[float]]] = None
    divisors: Optional[List[List[float]]] = None

    def __new__(
        cls,
        advantages: List[float],
        valid: List[bool],
        fallback: List[bool],
        zero_variance: List[bool],
        zero_variance_fraction: float,
        channel_zero_variance_fraction: Optional[List[float]] = None,
        parts: Optional[List[List[float]]] = None,
        divisors: Optional[List[List[float]]] = None,
    ) -> "ReferenceUpdateReport":
        report = super().__new__(cls, advantages, valid, fallback, zero_variance, zero_variance_fraction)
        report.channel_zero_variance_fraction = channel_zero_variance_fraction
        report.parts, report.divisors = parts, divisors
        return report


class ReferencePromptQuery(NamedTuple):
    """What ``ReferenceAdvantageTracker.query`` returns, as Python values (see ``types.PromptQuery``).

    Attributes:
        pass_rate: [M] the memory's estimate of each prompt's mean reward, NaN
            where it holds nothing.
        uncertainty: [M] the standard error of that estimate, NaN where
            ``pass_rate`` is.
        count: [M] the rewards the memory has folded in for the prompt.
        streak: [M] the prompt's streak, or None without ``track_streaks``.

    With a memory per reward function (``aggregation="normalize_then_sum"``
    with C rewards), ``pass_rate``, ``uncertainty`` and ``count`` are [M][C]
    (``streak`` stays [M]).
    """

    pass_rate: List
    uncertainty: List
    count: List
    streak: Optional[List[int]]


#: The memories, as ``AdvantageTracker(memory=...)`` names them (``memory.MEMORIES``).
MEMORIES = ("none", "buffer", "ema", "beta")

#: A Beta memory's alpha and beta for a prompt before any reward or ``set_prior``.
BETA_PRIOR = 0.5

#: The rules of the Beta memory for a prompt seen several times in one batch.
REPEATS = ("all", "last")

#: What ``normalize`` takes.
NORMALIZE = ("none", "batch")

#: How several rewards per sample become one advantage, as ``AdvantageTracker(aggregation=...)`` names them.
AGGREGATIONS = ("sum_then_normalize", "normalize_then_sum")


class ReferenceAdvantageTracker:
    """Dict-based tracker with every memory and estimator option of ``AdvantageTracker``.

    One update, in words (the specification the tensor tracker is tested
    against):

    0. Refusals, before anything changes (ValueError): inputs of different
       lengths; an infinite reward, or a NaN one with ``nan_rewards="refuse"``;
       with ``memory="beta"``, a valid sample's reward outside [0, 1]; a
       ``discount`` with another memory, of another length, or with a value
       (any sample's, valid or not) outside (0, 1]; rewards that are not
       [N] numbers (one reward) or [N] rows of C (``num_rewards=C`` > 1);
       ``weights`` given to a tracker that does not use them, missing
       where it does, of another length, not finite and non-negative for
       a sample that ``valid`` keeps, or all 0 for the samples that
       ``valid`` keeps where a weighted batch statistic needs them
       (``weighted_normalize``, or ``weighted_stats`` with a batch baseline,
       scale or fallback; see the sections below).
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

    **Dividing by a std.** Wherever steps 4 and 5 divide by a std s (the
    prompt's, the fallback's, B_s, the others' below), the divisor is
    d(s) by the ``eps_rule``: s + eps (``"add"``), max(s, eps) (``"max"``),
    s + eps where s > 0 else 1 (``"nonzero"``: a zero std leaves the sample
    unscaled) or sqrt(s^2 + eps) (``"variance"``). Step 5 divides by d(a_s)
    with ``normalize_eps`` and ``normalize_eps_rule``, a_s with
    ``normalize_ddof`` (None: ``ddof``).

    **Leave-one-out std** (``scale="leave_one_out_std"``, ``memory="none"``
    only): a sample's S is the std (with ``ddof``) of its prompt's *other*
    valid rewards in the batch, exactly 0 when they are fewer than ddof + 1
    or all equal. A sample that falls back is divided by the fallback's
    std, as with ``"prompt_std"``.

    **Sample weights** (``update(..., weights=...)``: each sample's q >= 0,
    a response's length or token count; needed by, and only by, a tracker
    built with ``weighted_stats`` or ``weighted_normalize``):

    * ``weighted_stats`` (``memory="none"`` only): a sample counts as q
      copies of its reward in its prompt's statistics and the batch's:
      m = sum(q r) / sum(q), S = sqrt(sum(q (r - m)^2) / (sum(q) - ddof)),
      0 where sum(q) <= ddof, and w = q / sum(q) for ``"leave_one_out"``
      (a sample whose others weigh 0, w = 1, has no others' mean and falls
      back). n stays the number of rewards (verl's OPO counts them so), but
      a prompt whose weights sum to 0 has no mean: n = 0, so it falls back.
      A sample of weight 0 gets advantage 0 (a response without tokens). B_m and B_s likewise over the
      batch; a batch whose valid weights are all 0 is refused when B_m or
      B_s is used (a batch baseline, scale or fallback).
    * ``weighted_normalize``: step 5's a_m and a_s likewise (``normalize_ddof``
      subtracted from the valid samples' sum(q)); a sample of weight 0 is
      out of them, and its advantage is 0 (it has no tokens to carry one).

    **Several rewards** (``num_rewards=C``: ``rewards`` is [N][C], one
    column per reward function, with weights lambda = ``reward_weights``,
    ones by default). A reward *counts* where ``valid`` keeps its sample
    and, with ``nan_rewards="invalid"``, it is not NaN; a sample none of
    whose rewards counts is invalid (step 1). Then, by ``aggregation``:

    * ``"sum_then_normalize"``: a valid sample's reward is R = the sum of
      lambda_c r_c over its rewards that count (a NaN adds nothing), and
      steps 2 to 6 run on R as on one reward (with C = 1: R = lambda r).
    * ``"normalize_then_sum"``: reward c of prompt p is a prompt of its own,
      whose memory is keyed (p, c) (just p with C = 1): steps 2 to 4 run per
      reward function over its rewards that count (its own memory, n,
      fallback, and B_m, B_s of that reward function's counting rewards),
      giving a_c; a sample's advantage is the sum of lambda_c a_c over its
      rewards that count; then step 5 over the valid samples. Keys (below)
      stay prompts: a prompt is seen when one of its samples is valid, and
      evicting or overflowing it forgets (p, c) for every c (an overflow
      prompt's rewards that count get the fallback's advantage, each from
      its reward function's B_m and B_s). A visit of step 6 is
      zero-variance when each reward function's counting rewards of the
      prompt are all equal (one with none counts as equal).

    The Beta memory takes values in [0, 1] (R, or each r_c that counts);
    with C > 1, or a reward weight other than 1, it needs
    ``"normalize_then_sum"`` (refused when built otherwise). The report's fields with
    several rewards are those ``ReferenceUpdateReport`` describes.

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
        num_rewards: C >= 1, the reward functions per sample.
        reward_weights: C finite numbers, lambda, or None for ones.
        aggregation: ``"sum_then_normalize"`` or ``"normalize_then_sum"``.
        eps_rule: how ``eps`` enters a division by a std: ``"add"``,
            ``"max"``, ``"nonzero"`` or ``"variance"``.
        normalize_ddof: 0 or 1, the ddof of step 5's std, or None for ``ddof``.
        normalize_eps_rule: how ``normalize_eps`` enters step 5's division.
        weighted_stats: sample weights enter the prompts' and the batch's
            statistics (``memory="none"`` only).
        weighted_normalize: sample weights enter step 5.

    Raises:
        ValueError: if an option is unknown or out of range, if
            ``min_count < ddof + 1`` or ``min_count < 2`` with
            ``"leave_one_out"`` (both but for the Beta memory, whose
            ``min_count`` may be any n >= 0), or if ``include_batch`` is
            False without memory; if ``reward_weights`` are not C finite
            numbers, the Beta memory is given C > 1 rewards to sum,
            ``weighted_stats`` is given a memory, or
            ``scale="leave_one_out_std"`` a memory, sample weights or
            ``min_count < 2``.

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
        >>> # GDPO: each of two rewards normalised in its group, then the weighted sum (a NaN adds nothing).
        >>> gdpo = ReferenceAdvantageTracker(num_rewards=2, reward_weights=(1.0, 0.5), aggregation="normalize_then_sum",
        ...                                  eps=0.0, fallback="zero", nan_rewards="invalid")
        >>> nan = float("nan")
        >>> gdpo.update(["a", "a", "a"], [[0.0, nan], [2.0, 5.0], [nan, 3.0]])  # [-1, 1, 0] + 0.5 [0, 1, -1]
        [-1.0, 1.5, -0.5]
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
        num_rewards: int = 1,
        reward_weights: Optional[Sequence[float]] = None,
        aggregation: str = "sum_then_normalize",
        eps_rule: str = "add",
        normalize_ddof: Optional[int] = None,
        normalize_eps_rule: str = "add",
        weighted_stats: bool = False,
        weighted_normalize: bool = False,
    ) -> None:
        choices = dict(
            memory=(memory, MEMORIES),
            baseline=(baseline, BASELINES),
            scale=(scale, SCALES),
            fallback=(fallback, FALLBACKS),
            nan_rewards=(nan_rewards, ("refuse", "invalid")),
            repeats=(repeats, REPEATS),
            normalize=(normalize, NORMALIZE),
            aggregation=(aggregation, AGGREGATIONS),
            eps_rule=(eps_rule, EPS_RULES),
            normalize_eps_rule=(normalize_eps_rule, EPS_RULES),
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
        if normalize_ddof not in (None, 0, 1) or isinstance(normalize_ddof, bool):
            raise ValueError(f"normalize_ddof must be 0, 1 or None, got {normalize_ddof!r}")
        if isinstance(num_rewards, bool) or not isinstance(num_rewards, int) or num_rewards < 1:
            raise ValueError(f"num_rewards must be a positive int, got {num_rewards!r}")
        lambdas = [1.0] * num_rewards if reward_weights is None else _as_list(reward_weights)
        if len(lambdas) != num_rewards or not all(
            isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) for w in lambdas
        ):
            raise ValueError(f"reward_weights must be {num_rewards} finite numbers, got {reward_weights!r}")
        combined = num_rewards > 1 or any(w != 1.0 for w in lambdas)
        if memory == "beta" and aggregation == "sum_then_normalize" and combined:
            raise ValueError(
                "memory='beta' with several rewards, or a reward weighted other than 1, needs "
                "aggregation='normalize_then_sum': a weighted sum of rewards is not a pass rate in [0, 1]"
            )
        if weighted_normalize and normalize != "batch":
            raise ValueError("weighted_normalize needs normalize='batch'")
        if weighted_stats and memory != "none":
            raise ValueError(f"weighted_stats needs memory='none', not {memory!r}")
        if scale == "leave_one_out_std" and (memory != "none" or weighted_stats or min_count < 2):
            raise ValueError("scale='leave_one_out_std' needs memory='none', no weighted_stats and min_count >= 2")
        self.memory, self.buffer_size, self.decay = memory, buffer_size, decay
        self.baseline, self.scale, self.ddof, self.eps = baseline, scale, ddof, eps
        self.min_count, self.fallback, self.nan_rewards = min_count, fallback, nan_rewards
        self.repeats, self.include_batch = repeats, include_batch
        self.normalize, self.normalize_eps = normalize, normalize_eps
        self.track_streaks = track_streaks
        self.num_rewards, self.reward_weights, self.aggregation = num_rewards, [float(w) for w in lambdas], aggregation
        self.eps_rule, self.normalize_eps_rule = eps_rule, normalize_eps_rule
        self.normalize_ddof = ddof if normalize_ddof is None else normalize_ddof
        self.weighted_stats, self.weighted_normalize = weighted_stats, weighted_normalize
        # Memories per prompt: one per reward function (keyed (prompt, c)) when each is normalised on its own.
        self.channels = num_rewards if aggregation == "normalize_then_sum" else 1
        # The memories below are keyed by prompt, or by (prompt, c) with several channels.
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
        weights: Optional[Numbers] = None,
    ) -> List[float]:
        """Folds the batch's valid samples into memory, then returns its advantages.

        Args:
            prompts: [N] prompt keys (a tensor's elements become Python values).
            rewards: [N] rewards; [N][C] (rows of C, or a tensor [N, C]) with
                ``num_rewards=C`` > 1.
            valid: optional [N] bools; False samples are ignored (advantage 0).
            discount: optional [N] discounts in (0, 1], each sample's rho
                (``memory="beta"`` only); None for ``decay``.
            weights: [N] sample weights, with ``weighted_stats`` or
                ``weighted_normalize`` (and only then).

        Returns:
            [N] advantages, as Python floats.

        Raises:
            ValueError: as step 0 of the class docstring says; the state is
                then unchanged.
        """
        return self.update_with_report(prompts, rewards, valid, discount, weights).advantages

    def update_with_report(
        self,
        prompts: Union[Sequence[Hashable], torch.Tensor],
        rewards: Numbers,
        valid: Optional[Union[Sequence[bool], torch.Tensor]] = None,
        discount: Optional[Numbers] = None,
        weights: Optional[Numbers] = None,
    ) -> ReferenceUpdateReport:
        """As ``update``, and also says which samples were valid, fell back or had zero variance.

        Args:
            prompts: [N] prompt keys (a tensor's elements become Python values).
            rewards: as for ``update``.
            valid: optional [N] bools; False samples are ignored (advantage 0).
            discount: as for ``update``.
            weights: as for ``update``.

        Returns:
            A ``ReferenceUpdateReport`` of Python values.

        Raises:
            ValueError: as ``update``.
        """
        prompts, rows = self._checked_rows(prompts, rewards)
        valid = [True] * len(prompts) if valid is None else [bool(v) for v in _as_list(valid)]
        if len(valid) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts and {len(valid)} valid flags")
        if any(math.isinf(r) or (math.isnan(r) and self.nan_rewards == "refuse") for row in rows for r in row):
            raise ValueError("rewards must be finite (NaN is allowed only with nan_rewards='invalid')")
        rhos = self._discounts(discount, len(prompts))
        # The rewards that count: their sample kept by ``valid``, and not NaN.
        counts = [[v and not math.isnan(r) for r in row] for v, row in zip(valid, rows)]
        valid = [any(row) for row in counts]
        masses = self._sample_weights(weights, counts)
        # What the estimator runs on: the combined reward, or each reward function's (see the class docstring).
        if self.aggregation == "sum_then_normalize":
            combined = [
                math.fsum(w * r for w, r, c in zip(self.reward_weights, row, count) if c) if v else math.nan
                for row, count, v in zip(rows, counts, valid)
            ]
            streams = [(combined, valid)]
        else:
            streams = [([row[c] for row in rows], [count[c] for count in counts]) for c in range(self.num_rewards)]
        if self.memory == "beta" and any(
            ok and not 0.0 <= r <= 1.0 for values, counting in streams for r, ok in zip(values, counting)
        ):
            raise ValueError("rewards must lie in [0, 1] with memory='beta'")
        groups: Dict[Hashable, List[int]] = {}  # prompt -> its valid samples, in batch order
        for i, prompt in enumerate(prompts):
            if valid[i]:
                groups.setdefault(prompt, []).append(i)

        overflow = self._see(prompts, valid) if self.capacity is not None else set()
        # Per prompt: whether each stream's counting rewards in the batch are all exactly equal.
        equal = {
            prompt: all(len({values[i] for i in samples if counting[i]}) <= 1 for values, counting in streams)
            for prompt, samples in groups.items()
        }
        if self.track_streaks:
            for prompt in groups:
                if prompt not in overflow:
                    self.streak[prompt] = self.streak.get(prompt, 0) + 1 if equal[prompt] else 0
        stream_results = [
            self._stream_advantages(prompts, values, counting, rhos, masses, overflow, channel)
            for channel, (values, counting) in enumerate(streams)
        ]
        parts = [[result[0][i] for result in stream_results] for i in range(len(prompts))]
        divisors = [[result[1][i] for result in stream_results] for i in range(len(prompts))]
        fallback = [any(result[2][i] for result in stream_results) for i in range(len(prompts))]
        if self.aggregation == "sum_then_normalize":
            advantages = [part[0] for part in parts]
        else:  # the weighted sum of the rewards that count (0.0 for those that do not: nothing to add)
            advantages = [
                math.fsum(w * a for w, a, c in zip(self.reward_weights, part, count) if c) if v else 0.0
                for part, count, v in zip(parts, counts, valid)
            ]

        if self.normalize == "batch":
            kept = [i for i, v in enumerate(valid) if v]
            center, spread = _weighted_mean_std(
                [advantages[i] for i in kept],
                [masses[i] for i in kept] if self.weighted_normalize else None,
                self.normalize_ddof,
            )
            divisor = _divisor(spread, self.normalize_eps, self.normalize_eps_rule)
            # A sample of weight 0 is out of a weighted whitening: advantage 0.
            out = [self.weighted_normalize and masses[i] == 0 for i in range(len(advantages))]
            advantages = [(a - center) / divisor if v and not o else 0.0 for a, v, o in zip(advantages, valid, out)]

        zero_variance = [valid[i] and equal[prompt] for i, prompt in enumerate(prompts)]
        fraction = sum(equal.values()) / len(equal) if equal else 0.0
        channel_fractions = None
        if self.num_rewards > 1:
            channel_fractions = []
            for c in range(self.num_rewards):
                present = [
                    len({rows[i][c] for i in samples if counts[i][c]}) == 1
                    for samples in groups.values()
                    if any(counts[i][c] for i in samples)
                ]
                channel_fractions.append(sum(present) / len(present) if present else 0.0)
        return ReferenceUpdateReport(
            advantages, valid, fallback, zero_variance, fraction, channel_fractions, parts, divisors
        )

    def _stream_advantages(
        self,
        prompts: list,
        rewards: List[float],
        counting: List[bool],
        rhos: List[float],
        masses: Optional[List[float]],
        overflow: set,
        channel: int,
    ) -> Tuple[List[float], List[float], List[bool]]:
        """Steps 2 to 4 on one stream: the combined reward, or reward function ``channel``'s.

        Args:
            prompts: [N] prompt keys.
            rewards: [N] the stream's rewards (meaningless where they do not count).
            counting: [N] the rewards that count.
            rhos: [N] the samples' discounts.
            masses: [N] the samples' weights, or None.
            overflow: the prompts that overflow the capacity.
            channel: the reward function's index (its memory's key with several).

        Returns:
            [N] advantages (0.0 where the reward does not count), [N] what
            each was divided by (1.0 where nothing), and [N] whether each
            counting reward fell back.
        """
        groups: Dict[Hashable, List[int]] = {}  # prompt -> its counting rewards, in batch order
        for i, prompt in enumerate(prompts):
            if counting[i]:
                groups.setdefault(prompt, []).append(i)
        prompt_stats: Dict[Hashable, Tuple[int, float, float]] = {}  # prompt -> (n, m, S)
        weights: Dict[int, float] = {}  # counting sample -> weight of its reward in its prompt's mean
        others: Dict[int, float] = {}  # counting sample -> std of its prompt's other rewards (leave_one_out_std)
        weighted = masses if self.weighted_stats else None
        for prompt, samples in groups.items():
            if prompt in overflow:
                prompt_stats[prompt] = (0, math.nan, math.nan)
                continue
            values = [rewards[i] for i in samples]
            key = self._key(prompt, channel)
            if not self.include_batch:
                prompt_stats[prompt] = self._read(key)
                weights.update((i, 0.0) for i in samples)
            folded = self._fold(
                key, values, [rhos[i] for i in samples], None if weighted is None else [weighted[i] for i in samples]
            )
            if self.include_batch:
                prompt_stats[prompt] = folded[:3]
                weights.update(zip(samples, folded[3]))
            if self.scale == "leave_one_out_std":
                others.update((i, _others_std(values, j, self.ddof)) for j, i in enumerate(samples))

        kept = [i for i, ok in enumerate(counting) if ok]
        batch_mean, batch_std = _weighted_mean_std(
            [rewards[i] for i in kept], None if weighted is None else [weighted[i] for i in kept], self.ddof
        )
        advantages, divisors, fallback = [0.0] * len(prompts), [1.0] * len(prompts), [False] * len(prompts)
        for i, (prompt, reward) in enumerate(zip(prompts, rewards)):
            if not counting[i]:
                continue
            count, mean, std = prompt_stats[prompt]
            # A sample holding all of its prompt's weight (weighted leave-one-out) has no others: it falls back.
            alone = self.baseline == "leave_one_out" and weights.get(i, 0.0) >= 1.0
            fallback[i] = prompt in overflow or count < self.min_count or alone
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
            if self.scale == "leave_one_out_std" and not fallback[i]:
                std = others[i]
            if self.scale != "none":
                divisors[i] = _divisor(batch_std if self.scale == "batch_std" else std, self.eps, self.eps_rule)
            advantages[i] = numerator / divisors[i]
            if weighted is not None and weighted[i] == 0:  # a sample of weight 0 carries no advantage
                advantages[i] = 0.0
        return advantages, divisors, fallback

    def _checked_rows(self, prompts, rewards) -> Tuple[list, List[List[float]]]:
        """The prompts as a list and the rewards as [N] rows of C floats; ValueError for other shapes."""
        prompts, values = _as_list(prompts), _as_list(rewards)
        if len(prompts) != len(values):
            raise ValueError(f"got {len(prompts)} prompts and {len(values)} rewards")
        rows = []
        for value in values:
            row = _as_list(value) if isinstance(value, (list, tuple, torch.Tensor)) else None
            if self.num_rewards == 1:
                if row is not None:
                    raise ValueError("one reward per sample: rewards must be [N] numbers")
                row = [value]
            elif row is None or len(row) != self.num_rewards:
                raise ValueError(f"num_rewards={self.num_rewards}: rewards must be [N] rows of {self.num_rewards}")
            rows.append([float(r) for r in row])
        return prompts, rows

    def _sample_weights(self, weights: Optional[Numbers], counts: List[List[bool]]) -> Optional[List[float]]:
        """Each sample's weight, checked against the rewards that count (see step 0), or None for a tracker without."""
        uses = self.weighted_stats or self.weighted_normalize
        if weights is None:
            if uses:
                raise ValueError("this tracker weights its samples (weighted_stats or weighted_normalize): pass them")
            return None
        if not uses:
            raise ValueError("weights were passed to a tracker without weighted_stats or weighted_normalize")
        masses = [float(q) for q in _as_list(weights)]
        if len(masses) != len(counts):
            raise ValueError(f"got {len(counts)} samples and {len(masses)} weights")
        valid = [any(row) for row in counts]
        if not all(math.isfinite(q) and q >= 0 for q, v in zip(masses, valid) if v):
            raise ValueError("weights must be finite and non-negative for the samples that valid keeps")
        weighted_batch = self.weighted_stats and (
            self.baseline == "batch_mean" or self.scale == "batch_std" or self.fallback == "batch"
        )
        # Each statistic over the batch needs some weight: the whitening's and the combined reward's over the valid
        # samples; with a memory per reward function, each reward function's over its rewards that count.
        columns = [[row[c] for row in counts] for c in range(self.num_rewards)] if self.channels > 1 else []
        streams = ([valid] if self.weighted_normalize or (weighted_batch and not columns) else []) + (
            columns if weighted_batch else []
        )
        for kept in streams:
            if any(kept) and not any(q > 0 for q, k in zip(masses, kept) if k):
                raise ValueError("weights of the rewards that count are all 0: their weighted statistics have no mean")
        return masses

    def _key(self, prompt: Hashable, channel: int) -> Hashable:
        """The memory's key of a prompt's reward function: the prompt, or (prompt, channel) with several channels."""
        return prompt if self.channels == 1 else (prompt, channel)

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
        """Drops a prompt's memory, every reward function's (a Beta state goes back to the prior), and streak."""
        for key in {self._key(prompt, channel) for channel in range(self.channels)}:
            self.buffers.pop(key, None)
            self.moments.pop(key, None)
            self.betas.pop(key, None)
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

    def _fold(
        self, prompt: Hashable, values: List[float], rhos: List[float], masses: Optional[List[float]] = None
    ) -> Tuple[int, float, float, List[float]]:
        """Writes one prompt's valid rewards (and their discounts) into memory.

        Args:
            prompt: the memory's key (a prompt, or (prompt, reward function)).
            values: its rewards that count, in batch order.
            rhos: their discounts.
            masses: their sample weights (``weighted_stats``, no memory), or None.

        Returns:
            Its (n, m, S) after the fold, and the weight of each new reward in m.
        """
        if self.memory == "none" and masses is not None:
            total = math.fsum(masses)
            if total == 0:  # no weighted mean: count 0, so the prompt falls back
                return 0, math.nan, math.nan, [math.nan] * len(values)
            mean, std = _weighted_mean_std(values, masses, self.ddof)
            return len(values), mean, std, [q / total for q in masses]
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
            ValueError: without the Beta memory, with a Beta memory per
                reward function, on mismatched lengths, a prompt given twice,
                more prompts than ``capacity``, s or n out of range, or k not
                finite and positive; the state is then unchanged.
        """
        if self.memory != "beta":
            raise ValueError(f"set_prior needs memory='beta', not {self.memory!r}")
        if self.channels > 1:
            raise ValueError(f"set_prior sets one pass rate per prompt; this tracker keeps {self.channels}")
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

        With a memory per reward function, each of these per reward
        function: [M][C].

        Args:
            prompts: [M] prompt keys.

        Returns:
            A ``ReferencePromptQuery``.
        """
        prompts = _as_list(prompts)
        rates, spreads, counts = [], [], []
        for prompt in prompts:
            estimates = [self._estimate(self._key(prompt, channel)) for channel in range(self.channels)]
            if self.channels == 1:
                estimates = estimates[0]
                rates.append(estimates[0])
                spreads.append(estimates[1])
                counts.append(estimates[2])
            else:
                rates.append([rate for rate, _, _ in estimates])
                spreads.append([spread for _, spread, _ in estimates])
                counts.append([count for _, _, count in estimates])
        streaks = [self.streak.get(prompt, 0) for prompt in prompts] if self.track_streaks else None
        return ReferencePromptQuery(rates, spreads, counts, streaks)

    def _estimate(self, key: Hashable) -> Tuple[float, float, int]:
        """(pass rate, uncertainty, count) of one memory key, as ``query`` describes them."""
        rate, spread, count = math.nan, math.nan, 0
        if self.memory == "beta":
            alpha, beta, count = self._beta_state(key)
            total = alpha + beta
            rate, spread = alpha / total, math.sqrt(alpha * beta / (total * total * (total + 1.0)))
        elif self.memory == "buffer" and self.buffers.get(key):
            count = len(self.buffers[key])
            rate, std = mean_std(self.buffers[key])
            spread = std / math.sqrt(count)
        elif self.memory == "ema" and key in self.moments:
            rate, variance, count = self.moments[key]
            spread = math.sqrt(variance) * math.sqrt((1.0 - self.decay) / (1.0 + self.decay))
        return rate, spread, count

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
            With a memory per reward function the keys are (prompt, c).
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


def _weighted_mean_std(values: Sequence[float], masses: Optional[Sequence[float]], ddof: int) -> Tuple[float, float]:
    """Mean and std with ``ddof`` of values each counted ``masses`` times (frequency weights), exactly rounded sums.

    Args:
        values: numbers.
        masses: one non-negative weight per value, or None for ones.
        ddof: subtracted from the weights' sum (the count without weights).

    Returns:
        sum(q v) / sum(q) (0 when empty, NaN when the weights sum to 0) and
        sqrt(sum(q (v - mean)^2) / (sum(q) - ddof)), 0 when sum(q) <= ddof;
        ``_mean_std_ddof`` without weights.
    """
    if masses is None:
        return _mean_std_ddof(values, ddof)
    total = math.fsum(masses)
    if not values:
        return 0.0, 0.0
    if total == 0:
        return math.nan, 0.0
    mean = math.fsum(q * v for q, v in zip(masses, values)) / total
    if total <= ddof:
        return mean, 0.0
    return mean, math.sqrt(math.fsum(q * (v - mean) ** 2 for q, v in zip(masses, values)) / (total - ddof))


def _others_std(values: Sequence[float], own: int, ddof: int) -> float:
    """The std with ``ddof`` of ``values`` but the one at ``own``: 0 when they are at most ``ddof`` or all equal."""
    others = [v for j, v in enumerate(values) if j != own]
    if len(others) <= ddof or len(set(others)) <= 1:
        return 0.0
    return _mean_std_ddof(others, ddof)[1]


def _divisor(std: float, eps: float, rule: str) -> float:
    """What an advantage is divided by, from a std, by the eps rule (``functional.EPS_RULES``).

    Args:
        std: s >= 0.
        eps: eps >= 0.
        rule: ``"add"`` (s + eps), ``"max"`` (max(s, eps)), ``"nonzero"``
            (s + eps where s > 0, else 1) or ``"variance"`` (sqrt(s^2 + eps)).

    Returns:
        The divisor.
    """
    if rule == "add":
        return std + eps
    if rule == "max":
        return max(std, eps)
    if rule == "nonzero":
        return std + eps if std > 0 else 1.0
    return math.sqrt(std * std + eps)
