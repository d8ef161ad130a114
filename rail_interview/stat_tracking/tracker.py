"""One tracker: keys to rows, a memory, then an estimator; the distributed gather wraps it all.

``AdvantageTracker`` is every tracker of this package. What differs between
DDPO's per-prompt buffer, GRPO's in-batch groups, RLOO's leave-one-out
baseline or Dr. GRPO's unscaled advantages is a choice of parts. Reading
one ``update`` top to bottom:

1. **Checks** (``validation.py``): shapes, dtypes and devices, then (with
   ``check_values``) id ranges and reward values. With a process group,
   the batches of every rank are gathered first (``distributed.py``).
2. **Rows**: with ``keys="ids"`` a prompt id is its row; with
   ``keys="hashed"`` a ``KeyTable`` (``keys.py``) maps keys to rows.
   Invalid samples go to the spare row P.
3. **Memory** (``memory.py``): what a prompt's statistics describe.
   ``"none"``: its samples in this batch (GRPO); ``"buffer"``: its last K
   rewards (DDPO); ``"ema"``: exponential moving averages. The current
   batch is always included. It hands the estimator one ``SampleStats``.
4. **Estimator** (``functional.py``, pure functions): a baseline, a scale,
   ``ddof``, ``eps`` and a fallback for prompts with fewer than
   ``min_count`` rewards.
5. **Report** (``functional.update_report``), for ``update_with_report``.

A valid mask flows through all of it: invalid samples never enter memory
or statistics and get advantage 0. ``presets`` names the combinations that
reproduce public trainers; ``BufferStatTracker``, ``EmaStatTracker`` and
``BatchStatTracker`` are thin classes over this one.

All state lives in fixed-shape tensors on the tracker's device, allocated
once in the constructor and only ever modified in place, so that
``update`` can be captured in a CUDA graph and ``load_state_dict`` keeps
those captures valid.

Dtypes: the state is kept in the tracker's ``dtype``; statistics are
accumulated in ``ops.compute_dtype(dtype)`` (float32 for float16 and
bfloat16), and advantages are computed there and returned in ``dtype``:

* float32 and float64: rewards, and their deviations from a mean, up to
  about 1e19 (float64: 1e154): their squares must fit the dtype. The mean
  is exact to the dtype's rounding at the rewards' magnitude (about 1e-7
  relative in float32), so a prompt whose spread is below about 1e-5 of its
  rewards' magnitude needs float64.
* bfloat16: float32's range, about 3 significant digits per stored value.
* float16: rewards and stored statistics within +-65504, about 3
  significant digits, and steps of 1 above 1024 (so rewards near 60000 are
  rounded to multiples of 32 before anything is computed).

Advantages larger than the dtype's range become +-inf (in float16, beyond
65504: a spread below about 1e-5 of ``|reward - mean|``). Wherever the
advantage fits the dtype it is finite.

Dimensions: N samples in a batch, P prompts, R = P + 1 rows, K buffer
slots, M prompts asked about.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import torch

from rail_interview.stat_tracking.distributed import gather_batch
from rail_interview.stat_tracking.functional import (
    BASELINES,
    EPS_RULES,
    FALLBACKS,
    NORMALIZE,
    SCALES,
    batch_advantages,
    channel_zero_variance,
    equal_groups,
    fallback_advantages,
    leave_one_out_std,
    normalized_advantages,
    prompt_advantages,
    update_report,
)
from rail_interview.stat_tracking.keys import KeyTable
from rail_interview.stat_tracking.memory import Memory, make_memory
from rail_interview.stat_tracking.ops import (
    batch_mean_std,
    cast,
    compute_dtype,
    group_by_prompt,
    take,
    unsort,
    weighted_mean_std,
    write_at,
)
from rail_interview.stat_tracking.types import (
    Device,
    PromptQuery,
    SampleStats,
    TrackerStats,
    UpdateReport,
    resolve_device,
)
from rail_interview.stat_tracking.validation import (
    check_batch,
    check_discount_tensor,
    check_id_range,
    check_prior_fits,
    check_prior_tensor,
    check_prior_values,
    check_prompt_ids,
    check_reward_options,
    check_rewards,
    check_state_dict,
    check_tracker_options,
    check_unit_rewards,
    check_weight_values,
    check_weights,
    convert_batch,
    refuse_compiled_value_checks,
    warn_about_small_stds,
)

__all__ = [
    "AGGREGATIONS",
    "AdvantageTracker",
    "BASELINES",
    "COMMON_OPTIONS",
    "EPS_RULES",
    "FALLBACKS",
    "KEYS",
    "NAN_REWARDS",
    "NORMALIZE",
    "SCALES",
]

#: The choices of the options that are not the estimator's.
NAN_REWARDS = ("refuse", "invalid")
KEYS = ("ids", "hashed")
#: How several rewards per sample become one advantage: summed (weighted) and
#: then normalised as one reward, or each normalised by its own statistics and
#: then summed (GDPO).
AGGREGATIONS = ("sum_then_normalize", "normalize_then_sum")

#: The keywords every tracker class and preset takes besides its own options:
#: where the state lives and how inputs are checked, shared and keyed.
COMMON_OPTIONS = ("dtype", "device", "check_values", "process_group", "keys")


def only_options(kind: str, options: Mapping[str, Any], allowed: Tuple[str, ...]) -> Dict[str, Any]:
    """The keyword options a thin tracker class passes on, refusing any it does not take.

    Args:
        kind: the class's name, for the message.
        options: the keywords given.
        allowed: the keywords it takes.

    Returns:
        ``options``, as a dict.

    Raises:
        TypeError: for a keyword not in ``allowed``, as Python does for a
            function without it.
    """
    for name in options:
        if name not in allowed:
            raise TypeError(f"{kind}() got an unexpected keyword argument {name!r}; it takes {', '.join(allowed)}")
    return dict(options)


class _Rows(NamedTuple):
    """Where each sample of a batch goes in memory, and the groups its report counts."""

    rows: torch.Tensor  # int64 [N], in [0, P]; P for samples that stay out of memory
    rewards: torch.Tensor  # float [N] (or [N, C]), what memory takes in: 0 for samples out of it
    overflow: Optional[torch.Tensor]  # bool [N], hashed keys beyond the table's rows, or None
    groups: Optional[torch.Tensor]  # int64 [N], each sample's key group (hashed keys), or None
    num_groups: int  # the groups of ``groups``, or R


class AdvantageTracker:
    """Turns rewards into advantages from a prompt's memory and an estimator of choice.

    For one ``update(prompt_ids, rewards, valid)``:

    1. The memory takes in the batch's valid samples and gives, for each
       prompt of the batch, count n, mean m and population variance v (the
       batch included), and for each sample the weight w of its own reward
       in m (``"none"``: 1/n; ``"buffer"``: 1/n, or 0 for a reward pushed
       out within its batch; ``"ema"``: the reward's decay weight;
       ``"beta"``: m = alpha / (alpha + beta), v = m (1 - m), w the reward's
       weight in alpha over alpha + beta). With ``include_batch=False``,
       n, m and v are the memory's before the batch (w = 0), and the batch
       is folded in after.
    2. The batch's mean B_m and std B_s (dividing by n_valid - ddof; 0 when
       n_valid <= ddof) come from the valid samples.
    3. A prompt with n < ``min_count`` falls back: its (mean, std) become
       (B_m, B_s) with ``fallback="batch"``, (0, 1) with ``"raw"``, and with
       ``"zero"`` its advantages are 0. Otherwise its std is
       S = sqrt(v * n / (n - ddof)).
    4. advantage = numerator / scale, with numerator r - m
       (``baseline="prompt_mean"``), r - B_m (``"batch_mean"``) or
       (r - m) / (1 - w) (``"leave_one_out"``: r minus the mean of the other
       rewards, ``(r - m) * n / (n - 1)`` when weights are equal; not applied
       on fallback), and scale S + eps (``scale="prompt_std"``), B_s + eps
       (``"batch_std"``) or 1 (``"none"``). With ``normalize="batch"`` the
       valid samples' advantages are then whitened over the batch,
       (a - mean) / (std + ``normalize_eps``), std with ``ddof``.
    5. Invalid samples (``valid`` False, or NaN rewards with
       ``nan_rewards="invalid"``) get advantage 0 and change no state.

    **Several rewards.** With ``num_rewards=C`` > 1, ``update`` takes
    rewards [N, C], one column per reward function (NaN where a function
    returned nothing, with ``nan_rewards="invalid"``; a row with no reward
    that counts is an invalid sample), combined with ``reward_weights`` by
    ``aggregation``: ``"sum_then_normalize"`` sums the weighted rewards that
    count and runs the steps above on the sum; ``"normalize_then_sum"``
    runs them on each reward function's rewards, with its own memory (reward
    c of prompt p in memory row p * C + c; the state dict, ``stats``,
    ``query`` and ``fallback_mask`` show it as [P, C, ...]), and sums the
    weighted advantages, before the whitening. **Sample weights**
    (``update(..., weights=)``, frequency weights such as token counts)
    enter the prompts' statistics (``weighted_stats``) or the whitening
    (``weighted_normalize``); a sample of weight 0 gets advantage 0 there.
    ``docs/several_rewards.md`` has the presets that match TRL, verl,
    NeMo-RL and Flow-Factory.

    **Keys.** With ``keys="ids"`` prompts are ids in [0, P). With
    ``keys="hashed"`` they are any int64 keys (``prompt_keys``,
    ``token_keys``) in ``update``, ``stats`` and ``fallback_mask``: a
    ``KeyTable`` of P rows on the device maps them to memory rows, and when
    a batch brings new keys to a full table the least recently seen keys
    are evicted, their rows reset, so that a prompt that comes back starts
    over with the fallback. A batch with more than P distinct keys keeps
    the P seen last in it; the others' samples overflow: they get the
    fallback's advantage (computed from their own reward, as for a prompt
    with no statistics), count as fallen back in the report, and are
    forgotten. The table's ``keys``, ``last_seen`` and ``clock`` join the
    state dict; ``stats()`` without keys then reports rows, and
    ``table_keys()`` says which key each row holds.

    ``update`` is built from tensor ops: no Python loop over prompts or
    samples and no host sync (with ``check_values`` off), so it can be
    captured in a CUDA graph or compiled with ``torch.compile(fullgraph=True)``.
    ``update_with_report`` also says which samples were valid, fell back,
    or belong to a zero-variance group (all valid rewards of the prompt in
    this batch exactly equal), with the fraction of such groups, all on the
    device. State dicts hold the memory's state (nothing for ``"none"``).

    Args:
        num_prompts: P, the number of distinct prompt ids, ids in [0, P).
        memory: ``"none"``, ``"buffer"``, ``"ema"`` or ``"beta"`` (rewards
            in [0, 1]; see ``beta_memory.BetaMemory``).
        buffer_size: K, rewards kept per prompt by ``memory="buffer"``.
        decay: weight kept by the old statistics at each reward, for
            ``memory="ema"``, in (0, 1); for ``memory="beta"``, the
            discount rho in (0, 1] (1: a plain count).
        baseline: ``"prompt_mean"``, ``"leave_one_out"`` or ``"batch_mean"``.
        scale: ``"prompt_std"``, ``"batch_std"``, ``"leave_one_out_std"``
            (the std of the prompt's other rewards in the batch; no memory)
            or ``"none"``.
        ddof: 0 (population std) or 1 (sample std), for the prompt's std and
            the batch's.
        eps: enters the division by the std as ``eps_rule`` says (added, by default).
        min_count: rewards a prompt needs (this batch's included) before its
            own statistics are used; at least ddof + 1, and 2 with
            ``leave_one_out``.
        fallback: what a prompt below ``min_count`` gets: ``"batch"``,
            ``"raw"`` or ``"zero"`` (see above).
        nan_rewards: ``"refuse"``: a NaN reward is bad input (refused with
            ``check_values``); ``"invalid"``: a NaN reward marks an
            unscorable sample, treated as ``valid`` False.
        device: where the state lives; inputs must be on it.
        dtype: floating dtype of the state and of the advantages; statistics
            are accumulated in float32 for float16 and bfloat16 (see the
            module docstring for what each dtype can represent).
        check_values: if True, ``update`` checks that ids lie in [0, P) and
            rewards are finite. On a GPU each check is a host sync; switch it
            off (here or later, ``tracker.check_values = False``) for a
            sync-free hot path once the inputs are trusted. Shapes, dtypes
            and devices are always checked (that costs no sync).
        process_group: a ``torch.distributed`` process group, or None for a
            single process. With a group, every rank passes its local batch
            to ``update``; the tracker all-gathers the batches in rank order,
            updates identical state on every rank, and returns the local
            samples' advantages. Local batches must have the same size on
            every rank. Use gloo with a CPU tracker, NCCL with a CUDA one.
            With hashed keys the ranks need no collective beyond the
            tracker's own gather: each updates its table with the same
            gathered batch.
        keys: ``"ids"`` or ``"hashed"`` (see above).
        repeats: ``memory="beta"``: ``"all"`` folds every sample of a
            prompt in batch order; ``"last"`` (SPO's) keeps the last one's
            update, computed from the state before the batch.
        include_batch: whether a prompt's statistics include this batch
            (True) or are its memory's before it (False: a baseline from the
            past only, SPO's; needs a memory).
        normalize: ``"none"`` or ``"batch"``: whiten the advantages over
            the batch's valid samples at the end (SPO's last step).
        normalize_eps: enters the whitening's division as
            ``normalize_eps_rule`` says (added to the std, by default).
        track_streaks: keep each prompt's run of zero-variance visits
            (``query().streak``; the state dict gains ``streak`` [P]).
        num_rewards: C, reward functions per sample: ``update`` then takes
            rewards [N, C] (see "Several rewards" above).
        reward_weights: C finite weights of the reward functions, or None
            for ones.
        aggregation: ``"sum_then_normalize"`` or ``"normalize_then_sum"``.
        eps_rule: how ``eps`` enters the division by a std:
            ``"add"`` (std + eps), ``"max"`` (max(std, eps)), ``"nonzero"``
            (std + eps where std > 0, else unscaled) or ``"variance"``
            (sqrt(std^2 + eps)); see ``functional.scale_divisor``.
        normalize_ddof: the whitening's ddof, or None for ``ddof``.
        normalize_eps_rule: how ``normalize_eps`` enters the whitening, as
            ``eps_rule``.
        weighted_stats: ``update``'s ``weights`` enter the prompts' and the
            batch's mean and std as frequency weights (OPO's
            length-weighted baseline; ``memory="none"`` only).
        weighted_normalize: they enter the whitening (verl's token-weighted
            ``masked_whiten``; needs ``normalize="batch"``).

    Raises:
        ValueError: if an option is unknown or out of range, or the options
            contradict each other.

    Example:
        >>> # GRPO's group-normalised advantages (sample std), groups interleaved:
        >>> tracker = AdvantageTracker(2, "none", ddof=1, fallback="zero")
        >>> tracker.update(torch.tensor([0, 1, 0, 1]), torch.tensor([1.0, 0.0, 0.0, 0.0]))
        tensor([ 0.7071,  0.0000, -0.7071,  0.0000])
        >>> report = tracker.update_with_report(torch.tensor([0, 0, 1]), torch.tensor([1.0, 1.0, 5.0]))
        >>> report.zero_variance, report.zero_variance_fraction
        (tensor([True, True, True]), tensor(1.))
        >>> tracker
        AdvantageTracker(num_prompts=2, memory='none', baseline='prompt_mean', scale='prompt_std', ddof=1, \
eps=1e-06, min_count=2, fallback='zero', nan_rewards='refuse', keys='ids', dtype=torch.float32, device=cpu)
    """

    #: The options ``repr`` shows, in order; None for every option of ``AdvantageTracker``.
    _repr_options: Optional[Tuple[str, ...]] = None

    def __init__(
        self,
        num_prompts: int,
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
        device: Device = None,
        dtype: torch.dtype = torch.float32,
        check_values: bool = True,
        process_group: Optional["torch.distributed.ProcessGroup"] = None,
        keys: str = "ids",
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
            keys=(keys, KEYS),
            baseline=(baseline, BASELINES),
            scale=(scale, SCALES),
            fallback=(fallback, FALLBACKS),
            nan_rewards=(nan_rewards, NAN_REWARDS),
            normalize=(normalize, NORMALIZE),
            aggregation=(aggregation, AGGREGATIONS),
            eps_rule=(eps_rule, EPS_RULES),
            normalize_eps_rule=(normalize_eps_rule, EPS_RULES),
        )
        check_tracker_options(
            num_prompts,
            eps=eps,
            dtype=dtype,
            choices=choices,
            ddof=ddof,
            min_count=min_count,
            baseline=baseline,
            memory=memory,
            include_batch=include_batch,
            normalize_eps=normalize_eps,
            track_streaks=track_streaks,
            normalize_eps_rule=normalize_eps_rule,
        )
        if normalize_ddof is not None and (normalize_ddof not in (0, 1) or isinstance(normalize_ddof, bool)):
            raise ValueError(f"normalize_ddof must be 0, 1 or None (the tracker's ddof), got {normalize_ddof!r}")
        weights = check_reward_options(
            num_rewards,
            reward_weights,
            aggregation=aggregation,
            memory=memory,
            scale=scale,
            weighted_stats=weighted_stats,
            weighted_normalize=weighted_normalize,
            include_batch=include_batch,
            min_count=min_count,
            normalize=normalize,
        )
        self._num_prompts, self._eps, self._dtype = num_prompts, float(eps), dtype
        self._device = resolve_device(device)
        self._compute_dtype = compute_dtype(dtype)  # what statistics accumulate in
        self.check_values = check_values
        self._process_group = process_group
        self._num_rewards, self._aggregation, self._weight_values = num_rewards, aggregation, weights
        self._eps_rule, self._normalize_eps_rule = eps_rule, normalize_eps_rule
        self._normalize_ddof = ddof if normalize_ddof is None else normalize_ddof
        self._weighted_stats, self._weighted_normalize = weighted_stats, weighted_normalize
        # C reward functions' weights in the compute dtype, or None for one reward of weight 1.
        self._reward_weights = (
            torch.tensor(weights, dtype=self._compute_dtype, device=self._device)
            if num_rewards > 1 or weights != (1.0,)
            else None
        )
        # Memory rows per prompt: one per reward function when each is normalised
        # by its own statistics, prompt p's reward c in row p * C + c.
        self._channels = num_rewards if aggregation == "normalize_then_sum" else 1
        self._memory: Memory = make_memory(
            memory,
            num_prompts * self._channels,
            buffer_size=buffer_size,
            decay=decay,
            dtype=dtype,
            device=self._device,
            repeats=repeats,
        )
        self._include_batch, self._normalize, self._normalize_eps = include_batch, normalize, float(normalize_eps)
        # Each row's run of zero-variance visits (row P, the spare, included), or None.
        self._streak = torch.zeros(num_prompts + 1, dtype=torch.int64, device=self._device) if track_streaks else None
        warn_about_small_stds(memory, scale, min_count, include_batch)
        self._baseline, self._scale, self._ddof = baseline, scale, ddof
        self._min_count, self._fallback, self._nan_rewards, self._keys = min_count, fallback, nan_rewards, keys
        # With a batch baseline and no prompt std, and no prompt that can fall
        # back, an in-batch tracker needs no per-prompt statistics at all.
        batch_only = memory == "none" and baseline == "batch_mean" and scale != "prompt_std"  # pragma: no mutate (fork)
        self._needs_fold = not (batch_only and min_count <= 1)  # pragma: no mutate (fork)
        self._needs_batch = baseline == "batch_mean" or scale == "batch_std" or fallback == "batch"
        # A tracker that keeps nothing per prompt needs no table, only to accept any key.
        keeps_rows = self._needs_fold or track_streaks
        self._table = KeyTable(num_prompts, device=self._device) if keys == "hashed" and keeps_rows else None
        # Invalid samples sit in row P with reward 0, whose mean is 0 in the
        # buffer and EMA, so their advantage is 0 / scale, exactly 0, unless the
        # batch's mean enters it (a batch baseline or fallback, a batch
        # normalisation), the scale can be 0 (a std with eps 0), or row P's
        # mean is not 0 (the Beta memory's prior, or a read before the batch):
        # only then are they masked at the end.
        zero_scale = scale != "none" and self._eps == 0 and eps_rule != "nonzero"  # pragma: no mutate (fork)
        self._mask_invalid = (  # pragma: no mutate (fork)
            baseline == "batch_mean"
            or fallback == "batch"
            or zero_scale
            or memory == "beta"
            or not include_batch
            or normalize != "none"
        )

    # Options, read-only: changing one would change what the state means.

    @property
    def num_prompts(self) -> int:
        """P, the number of prompt ids (or, with hashed keys, rows) the tracker holds."""
        return self._num_prompts

    @property
    def eps(self) -> float:
        """Added to the standard deviation before dividing."""
        return self._eps

    @property
    def device(self) -> torch.device:
        """The device of the state; inputs must be on it."""
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        """The floating dtype of the state and of the advantages."""
        return self._dtype

    @property
    def process_group(self) -> Optional["torch.distributed.ProcessGroup"]:
        """The process group whose ranks share this tracker's statistics, or None."""
        return self._process_group

    @property
    def memory(self) -> str:
        """``"none"``, ``"buffer"``, ``"ema"`` or ``"beta"``."""
        return self._memory.kind

    @property
    def include_batch(self) -> bool:
        """Whether a sample's statistics include this batch (False: from the memory before it)."""
        return self._include_batch

    @property
    def normalize(self) -> str:
        """``"none"``, or ``"batch"``: the advantages whitened over the batch's valid samples at the end."""
        return self._normalize

    @property
    def normalize_eps(self) -> float:
        """Added to the advantages' std before the batch normalisation divides by it."""
        return self._normalize_eps

    @property
    def track_streaks(self) -> bool:
        """Whether each prompt's run of zero-variance visits is kept (``query().streak``)."""
        return self._streak is not None

    @property
    def num_rewards(self) -> int:
        """C, the reward functions per sample (``rewards`` is [N] for 1, [N, C] otherwise)."""
        return self._num_rewards

    @property
    def reward_weights(self) -> Tuple[float, ...]:
        """The C reward functions' weights in the weighted sum, as given (used in the compute dtype)."""
        return self._weight_values

    @property
    def aggregation(self) -> str:
        """``"sum_then_normalize"`` or ``"normalize_then_sum"`` (several rewards)."""
        return self._aggregation

    @property
    def eps_rule(self) -> str:
        """How ``eps`` enters the division by a std (``functional.scale_divisor``)."""
        return self._eps_rule

    @property
    def normalize_ddof(self) -> int:
        """The ddof of the batch normalisation's std."""
        return self._normalize_ddof

    @property
    def normalize_eps_rule(self) -> str:
        """How ``normalize_eps`` enters the batch normalisation."""
        return self._normalize_eps_rule

    @property
    def weighted_stats(self) -> bool:
        """Whether sample weights enter the prompts' (and the batch's) mean and std."""
        return self._weighted_stats

    @property
    def weighted_normalize(self) -> bool:
        """Whether sample weights enter the batch normalisation (verl's token-weighted whitening)."""
        return self._weighted_normalize

    @property
    def baseline(self) -> str:
        """``"prompt_mean"``, ``"leave_one_out"`` or ``"batch_mean"``."""
        return self._baseline

    @property
    def scale(self) -> str:
        """``"prompt_std"``, ``"batch_std"`` or ``"none"``."""
        return self._scale

    @property
    def ddof(self) -> int:
        """0 (population std) or 1 (sample std)."""
        return self._ddof

    @property
    def min_count(self) -> int:
        """Rewards a prompt needs before its own statistics are used."""
        return self._min_count

    @property
    def fallback(self) -> str:
        """What a prompt below ``min_count`` gets: ``"batch"``, ``"raw"`` or ``"zero"``."""
        return self._fallback

    @property
    def nan_rewards(self) -> str:
        """``"refuse"`` or ``"invalid"``: what a NaN reward is."""
        return self._nan_rewards

    @property
    def keys(self) -> str:
        """``"ids"`` (ids in [0, P)) or ``"hashed"`` (any int64 keys, through a ``KeyTable``)."""
        return self._keys

    def __repr__(self) -> str:
        names = self._repr_options
        if names is None:
            own = {"buffer": ("buffer_size",), "ema": ("decay",), "beta": ("decay", "repeats")}.get(self.memory, ())
            names = ("num_prompts", "memory", *own, "baseline", "scale", "ddof", "eps", "min_count", "fallback")
            names += ("nan_rewards", "keys", "dtype", "device")
            # The options added with the Beta memory, shown where they are not their defaults.
            if not self._include_batch:
                names += ("include_batch",)
            if self._normalize != "none":
                names += ("normalize", "normalize_eps")
                if self._normalize_ddof != self._ddof:
                    names += ("normalize_ddof",)
                if self._normalize_eps_rule != "add":
                    names += ("normalize_eps_rule",)
            if self.track_streaks:
                names += ("track_streaks",)
            # The options of several rewards and of sample weights, where they are not their defaults.
            if self._eps_rule != "add":
                names += ("eps_rule",)
            if self._num_rewards > 1:
                names += ("num_rewards",)
            if self._reward_weights is not None:
                names += ("reward_weights",)
            if self._num_rewards > 1 or self._aggregation != "sum_then_normalize":
                names += ("aggregation",)
            names += tuple(name for name in ("weighted_stats", "weighted_normalize") if getattr(self, name))
        values = {
            "buffer_size": getattr(self._memory, "buffer_size", None),
            "decay": getattr(self._memory, "decay", None),
            "repeats": getattr(self._memory, "repeats", None),
        }
        shown = (values[name] if name in values else getattr(self, name) for name in names)
        fields = (
            f"{name}={value if isinstance(value, torch.device) else repr(value)}" for name, value in zip(names, shown)
        )
        return f"{type(self).__name__}({', '.join(fields)})"

    def table_keys(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """With hashed keys, the key each row holds: the rows of ``stats()`` without keys.

        Returns:
            int64 [P] keys and bool [P], True for rows that hold a key
            (rows never used, or a tracker that keeps nothing per prompt:
            False).

        Raises:
            ValueError: if the tracker takes ids.
        """
        if self._keys != "hashed":
            raise ValueError("table_keys needs keys='hashed'; with ids, row i is prompt i")
        if self._table is None:
            return (
                torch.zeros(self._num_prompts, dtype=torch.int64, device=self._device),
                torch.zeros(self._num_prompts, dtype=torch.bool, device=self._device),
            )
        return self._table.keys()

    # Updates.

    def update(
        self,
        prompt_ids: torch.Tensor,
        rewards: torch.Tensor,
        valid: Optional[torch.Tensor] = None,
        *,
        discount: Optional[torch.Tensor] = None,
        weights: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Adds a batch of rewards to the statistics and returns its advantages.

        Args:
            prompt_ids: integer [N], the prompt id of each sample, in [0, P)
                (any int64 keys with ``keys="hashed"``).
            rewards: float or integer [N], the reward of each sample (integer
                rewards are converted to ``dtype``, never truncated); in
                [0, 1] with the Beta memory. With ``num_rewards=C`` > 1,
                [N, C]: one column per reward function, NaN where a function
                returned nothing (with ``nan_rewards="invalid"``; a row that
                is NaN throughout is an invalid sample).
            valid: bool [N], False for samples that must not count (never
                enter memory or any statistic, and get advantage 0), or
                None for all valid. With a process group, pass it on every
                rank or on none.
            discount: float [N] in (0, 1], each sample's discount rho, in
                place of ``decay`` (the Beta memory only: SPO's KL-adaptive
                rho, ``functional.spo_discount``), or None. With a process
                group, pass it on every rank or on none.
            weights: float or integer [N], each sample's weight (a response's
                length or token count), non-negative for valid samples: 0
                leaves a sample out of the weighted statistics and gives it
                advantage 0 (a response without tokens); a prompt whose
                samples all weigh 0 falls back, and a weighted batch
                statistic needs some weight. Needed by and only by trackers
                built with ``weighted_stats`` or ``weighted_normalize``. With
                a process group, on every rank.

        Returns:
            ``dtype`` [N], the advantage of each sample, on ``device``.

        Raises:
            TypeError: if an input is not a tensor, ids are not integers or
                rewards are neither floating nor integer.
            ValueError: if the inputs are not 1-D of one length (rewards
                [N, C] with several rewards), are on another device, or
                (with ``check_values``) an id lies outside [0, P) or a
                reward is not finite once converted to ``dtype``.
                The state is then unchanged. Without ``check_values`` such
                values are not caught: an id outside [0, P) is undefined
                behaviour (an IndexError on a CPU, a device-side assert on
                CUDA) and a NaN reward poisons its prompt's statistics
                (unless the tracker takes NaN as unscorable:
                ``nan_rewards="invalid"``). With a process group, see
                ``distributed.gather_batch`` for how the ranks agree.
                With the Beta memory, a reward outside [0, 1] (or a
                discount outside (0, 1]) is refused as a non-finite one is;
                so are weights passed to a tracker that does not use them,
                missing where it does, or (with ``check_values``) out of
                range for a valid sample.
        """
        return self._dispatch(prompt_ids, rewards, valid, discount, weights, report=False)

    def update_with_report(
        self,
        prompt_ids: torch.Tensor,
        rewards: torch.Tensor,
        valid: Optional[torch.Tensor] = None,
        *,
        discount: Optional[torch.Tensor] = None,
        weights: Optional[torch.Tensor] = None,
    ) -> UpdateReport:
        """``update``, and what it did to each sample (see ``UpdateReport``).

        The report costs O(N + P) more work than ``update`` and no host sync.

        Args:
            prompt_ids: as for ``update``.
            rewards: as for ``update``.
            valid: as for ``update``.
            discount: as for ``update``.
            weights: as for ``update``.

        Returns:
            The ``UpdateReport``; with a process group, of this rank's samples
            (the fraction is the whole gathered batch's).

        Raises:
            TypeError, ValueError: as ``update``.
        """
        return self._dispatch(prompt_ids, rewards, valid, discount, weights, report=True)

    def _dispatch(
        self,
        prompt_ids: torch.Tensor,
        rewards: torch.Tensor,
        valid: Optional[torch.Tensor],
        discount: Optional[torch.Tensor],
        weights: Optional[torch.Tensor],
        report: bool,
    ) -> Union[torch.Tensor, UpdateReport]:
        """Validates, then runs ``_update`` here or on the batch gathered from every rank."""
        if self._process_group is None:
            prompt_ids, rewards, valid = self._validate_inputs(prompt_ids, rewards, valid, discount, weights)
            return self._update(prompt_ids, rewards, valid, report, discount, weights)

        def validate(ids: torch.Tensor, values: torch.Tensor, mask: Optional[torch.Tensor]):
            """``_validate_inputs`` with this rank's discount and weights."""
            return self._validate_inputs(ids, values, mask, discount, weights)

        prompt_ids, rewards, valid, discount, weights, mine = gather_batch(
            validate,
            prompt_ids,
            rewards,
            valid,
            group=self._process_group,
            device=self._device,
            check_values=self.check_values,
            discount=discount,
            dtype=self._compute_dtype,
            weights=weights,
        )
        if self.check_values and weights is not None and prompt_ids.numel() > 0:
            self._check_weights(weights, rewards, valid, sums=True)  # every rank sees the same batch: all agree
        result = self._update(prompt_ids, rewards, valid, report, discount, weights)  # [W * N]
        return result.local(mine) if report else result[mine]

    def _check_weights(
        self, weights: torch.Tensor, rewards: torch.Tensor, valid: Optional[torch.Tensor], *, sums: bool
    ) -> None:
        """Refuses weights out of range for what counts (``validation.check_weight_values``), or without a mean.

        Args:
            weights: float [N].
            rewards: ``dtype`` [N] or [N, C], NaN where unscorable.
            valid: bool [N], or None.
            sums: also refuse where a weighted batch statistic would have no weight at all.
        """
        counted = rewards == rewards if self._nan_rewards == "invalid" else torch.ones_like(rewards, dtype=torch.bool)
        if valid is not None:
            counted = counted & valid.view(-1, *[1] * (rewards.ndim - 1))
        weighted_batch = sums and self._weighted_stats and self._needs_batch
        check_weight_values(
            weights,
            counted,
            whole_batch=sums and (self._weighted_normalize or (weighted_batch and self._channels == 1)),
            each_column=weighted_batch and self._channels > 1,
        )

    def _validate_inputs(
        self,
        prompt_ids: torch.Tensor,
        rewards: torch.Tensor,
        valid: Optional[torch.Tensor] = None,
        discount: Optional[torch.Tensor] = None,
        weights: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """Checks the inputs of ``update`` and converts them to int64 ids and ``dtype`` rewards.

        Raises:
            TypeError, ValueError: as documented in ``update``.
        """
        check_batch(prompt_ids, rewards, valid, self._device, self._num_rewards)
        if discount is not None:
            check_discount_tensor(discount, len(prompt_ids), self._device, self.memory)
        uses_weights = self._weighted_stats or self._weighted_normalize
        if weights is not None:
            if not uses_weights:
                raise ValueError(
                    "weights were passed to a tracker that would ignore them: build it with weighted_stats=True "
                    "(weights in the prompts' statistics) or weighted_normalize=True (in the batch normalisation)"
                )
            check_weights(weights, prompt_ids, self._device)
        elif uses_weights:
            raise ValueError(
                "this tracker weights its samples (weighted_stats or weighted_normalize): pass weights=[N], "
                "each sample's length or token count"
            )
        if self.check_values:
            refuse_compiled_value_checks(type(self).__name__, "update")
        prompt_ids, rewards = convert_batch(prompt_ids, rewards, self._dtype)
        if self.check_values and prompt_ids.numel() > 0:
            if self._keys == "ids":
                check_id_range(prompt_ids, self._num_prompts)
            nan_is_invalid = self._nan_rewards == "invalid"
            check_rewards(rewards, nan_is_invalid=nan_is_invalid, compute_dtype=self._compute_dtype)
            if self.memory == "beta":
                check_unit_rewards(rewards, valid, discount)
            if weights is not None:
                # With a process group, whether some weight is positive is the gathered batch's question.
                self._check_weights(weights, rewards, valid, sums=self._process_group is None)
        return prompt_ids, rewards, valid

    def _update(
        self,
        prompt_ids: torch.Tensor,
        rewards: torch.Tensor,
        valid: Optional[torch.Tensor],
        report: bool,
        discount: Optional[torch.Tensor] = None,
        weights: Optional[torch.Tensor] = None,
    ) -> Union[torch.Tensor, UpdateReport]:
        """Does the work of ``update`` on validated inputs.

        Args:
            prompt_ids: int64 [N] on ``device``, in [0, P) (or keys).
            rewards: ``dtype`` [N] (or [N, C]) on ``device``.
            valid: bool [N] on ``device``, or None for all valid.
            report: return an ``UpdateReport`` instead of the advantages.
            discount: float [N], each sample's rho (Beta memory), or None.
            weights: float [N], each sample's weight, or None.

        Returns:
            ``dtype`` [N], the advantages, or their ``UpdateReport``.
        """
        if weights is not None:
            weights = cast(weights, self._compute_dtype)
            if valid is not None:
                weights = torch.where(valid, weights, 1)  # [N]: an invalid sample's weight may be anything
        channels = None  # [N, C] rewards of several functions, and which of them count (for the report)
        if rewards.ndim == 2:
            if self._channels > 1:
                return self._update_channels(
                    prompt_ids, *self._channel_rewards(rewards, valid), report, discount, weights
                )
            if report:
                channels = self._channel_rewards(rewards, valid)
            rewards = self._weighted_sum(rewards)  # [N], NaN for rows where no reward counts
        elif self._reward_weights is not None and self._aggregation == "sum_then_normalize":
            rewards = cast(rewards, self._compute_dtype) * self._reward_weights  # [N], one weighted reward
        if self._nan_rewards == "invalid":
            scorable = rewards == rewards  # [N], False exactly where NaN
            valid = scorable if valid is None else valid & scorable
        if prompt_ids.numel() == 0:  # pragma: no mutate (empty)
            return self._empty_result(rewards, report)
        rewards = cast(rewards, self._compute_dtype)  # [N], float32 for 16-bit dtypes
        if valid is not None:
            rewards = torch.where(valid, rewards, 0)  # [N]
        rows = self._rows(prompt_ids, rewards, valid)
        batch_mean = batch_std = None
        if self._needs_batch:
            batch_mean, batch_std = self._batch_stats(rewards, valid, weights)
        options = dict(
            scale=self._scale, eps=self._eps, batch_mean=batch_mean, batch_std=batch_std, eps_rule=self._eps_rule
        )
        if self._streak is not None:
            self._count_streaks(rows.rows, equal_groups(rows.rows, self._num_prompts + 1, rows.rewards))
        advantages, fallback = self._estimate(
            rows.rows, rows.rewards, rewards, rows.overflow, options, report, discount, weights
        )
        if valid is not None and self._mask_invalid:
            advantages = torch.where(valid, advantages, 0)
        if self._weighted_stats:
            advantages = torch.where(weights > 0, advantages, 0)  # [N]: a sample of weight 0 carries no advantage
        if self._reward_weights is not None and self._aggregation == "normalize_then_sum":
            advantages = advantages * self._reward_weights  # [N]: one reward, weighted once normalised
        advantages = cast(self._normalized(advantages, valid, weights), self._dtype)
        if self._needs_fold and not self._include_batch:
            self._fold_past(rows.rows, rows.rewards, discount)
        if not report:
            return advantages
        group_ids, num_groups = (rows.rows, rows.num_groups) if rows.groups is None else (rows.groups, rows.num_groups)
        result = update_report(
            group_ids, num_groups, rows.rewards if rows.groups is None else rewards, valid, advantages, fallback
        )
        if channels is None:
            return result
        fraction = self._channel_fractions(*channel_zero_variance(group_ids, num_groups, *channels))
        return result._replace(channel_zero_variance_fraction=fraction)

    def _empty_result(self, rewards: torch.Tensor, report: bool) -> Union[torch.Tensor, UpdateReport]:
        """What ``update`` returns for a batch of no samples."""
        advantages = rewards.new_zeros(0, dtype=self._dtype)
        if not report:
            return advantages
        empty = torch.zeros(0, dtype=torch.bool, device=self._device)
        zero = torch.zeros((), device=self._device)
        channel = torch.zeros(self._num_rewards, device=self._device) if self._num_rewards > 1 else None
        return UpdateReport(advantages, empty, empty, empty, zero, channel)

    def _batch_stats(
        self, rewards: torch.Tensor, valid: Optional[torch.Tensor], weights: Optional[torch.Tensor]
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """The batch's mean and std of valid rewards ([N], or [N, C] per column), weighted with ``weighted_stats``."""
        if self._weighted_stats or rewards.ndim == 2:
            return weighted_mean_std(rewards, valid, weights if self._weighted_stats else None, ddof=self._ddof)
        return batch_mean_std(rewards, valid, ddof=self._ddof)

    def _normalized(
        self, advantages: torch.Tensor, valid: Optional[torch.Tensor], weights: Optional[torch.Tensor]
    ) -> torch.Tensor:
        """The advantages whitened over the batch if ``normalize="batch"``, else as they are."""
        if self._normalize != "batch":
            return advantages
        return normalized_advantages(
            advantages,
            valid,
            ddof=self._normalize_ddof,
            eps=self._normalize_eps,
            eps_rule=self._normalize_eps_rule,
            weights=weights if self._weighted_normalize else None,
        )

    # Several rewards.

    def _channel_rewards(
        self, rewards: torch.Tensor, valid: Optional[torch.Tensor]
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """[N, C] rewards in the compute dtype (0 where they do not count) and bool [N, C], where they do."""
        rewards = cast(rewards, self._compute_dtype)
        counts = rewards == rewards if self._nan_rewards == "invalid" else torch.ones_like(rewards, dtype=torch.bool)
        if valid is not None:
            counts = counts & valid.unsqueeze(-1)
        return torch.where(counts, rewards, 0), counts

    def _weighted_sum(self, rewards: torch.Tensor) -> torch.Tensor:
        """TRL's ``sum_then_normalize`` reward: ``nansum_c(w_c r_c)``, NaN where every reward is NaN.

        A NaN reward adds nothing (with ``nan_rewards="invalid"``, a reward
        function that returned None); a row of NaN stays NaN, an invalid
        sample. Masked-out samples are zeroed later, by the one-reward path.

        Args:
            rewards: ``dtype`` [N, C].

        Returns:
            float [N] in the compute dtype.
        """
        weighted = cast(rewards, self._compute_dtype) * self._reward_weights  # [N, C]
        if self._nan_rewards != "invalid":
            return weighted.sum(1)  # a NaN, refused with check_values, poisons its row as with one reward
        return torch.where(rewards.isnan().all(1), math.nan, weighted.nansum(1))

    def _channel_fractions(self, equal: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """float32 [C]: per reward function, the share of present groups whose rewards are all equal."""
        groups = present.sum(0).clamp_min(1).float()  # [C]
        return (equal & present).sum(0).float() / groups

    def _channel_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Memory rows of some prompts' rows, all C reward functions: int64 [M * C] (row P: the spare)."""
        if self._channels == 1:
            return rows
        channel = torch.arange(self._channels, device=rows.device)  # [C]
        spare = self._num_prompts * self._channels
        rows = rows.unsqueeze(-1)  # [M, 1]
        return torch.where(rows == self._num_prompts, spare, rows * self._channels + channel).reshape(-1)

    def _per_prompt(self, tensor: torch.Tensor) -> torch.Tensor:
        """A memory tensor with C rows per prompt seen as [M, C, ...] (as it is with one)."""
        if self._channels == 1:
            return tensor
        return tensor.unflatten(0, (-1, self._channels))

    def _update_channels(
        self,
        prompt_ids: torch.Tensor,
        rewards: torch.Tensor,
        counts: torch.Tensor,
        report: bool,
        discount: Optional[torch.Tensor],
        weights: Optional[torch.Tensor],
    ) -> Union[torch.Tensor, UpdateReport]:
        """``_update`` of ``aggregation="normalize_then_sum"``: each reward by its own statistics, then the sum.

        Reward c of prompt p lives in memory row p * C + c, so every memory,
        the estimator and the fallback work on the N * C (sample, reward)
        pairs as they work on N samples; the pairs that do not count go to
        the spare row and get advantage 0. The C advantages of a sample are
        summed with the reward weights; a sample none of whose rewards
        counts is invalid (advantage 0). Then the batch normalisation.

        Args:
            prompt_ids: int64 [N] (or keys).
            rewards: float [N, C] in the compute dtype, 0 where they do not count.
            counts: bool [N, C], the rewards that count.
            report: return an ``UpdateReport``.
            discount: float [N], or None (every reward of a sample takes its discount).
            weights: float [N], or None.

        Returns:
            ``dtype`` [N], the advantages, or their ``UpdateReport``.
        """
        num_samples, num_channels = rewards.shape
        valid = counts.any(1)  # [N]
        if num_samples == 0:  # pragma: no mutate (empty)
            return self._empty_result(rewards[:, 0], report)
        rows = self._rows(prompt_ids, rewards, valid)
        spare = self._num_prompts * num_channels
        flat_rows = None  # [N * C], each pair's memory row, where something is kept per prompt
        in_memory = counts  # [N, C]: without per-prompt statistics every counting reward enters the batch's
        if self._needs_fold or self._streak is not None:
            in_memory = counts & (rows.rows != self._num_prompts).unsqueeze(-1)  # [N, C]
            channel = torch.arange(num_channels, device=self._device)  # [C]
            memory_rows = torch.where(in_memory, rows.rows.unsqueeze(-1) * num_channels + channel, spare)  # [N, C]
            flat_rows = memory_rows.reshape(-1)  # [N * C]
        flat_rewards = torch.where(in_memory, rewards, 0).reshape(-1)  # [N * C]
        flat_counts = counts.reshape(-1)  # [N * C]

        def flat(tensor: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
            """A per-sample [N] (or per-reward [C]) tensor spread over the N * C pairs."""
            return None if tensor is None else tensor.expand(num_samples, num_channels).reshape(-1)

        batch_mean = batch_std = None
        if self._needs_batch:
            batch_mean, batch_std = self._batch_stats(rewards, counts, weights)  # [C], per reward
        options = dict(
            scale=self._scale,
            eps=self._eps,
            batch_mean=flat(batch_mean),
            batch_std=flat(batch_std),
            eps_rule=self._eps_rule,
        )
        pair_weights = flat(None if weights is None else weights.unsqueeze(-1))
        pair_discount = flat(None if discount is None else discount.unsqueeze(-1))
        if self._streak is not None:
            # A visit is zero-variance when every reward function's rewards are.
            equal_rows = equal_groups(flat_rows, spare + 1, flat_rewards)  # [P * C + 1]
            equal = equal_rows[:-1].view(self._num_prompts, num_channels).all(1)  # [P]
            self._count_streaks(rows.rows, torch.cat([equal, equal.new_ones(1)]))
        overflow = None if rows.overflow is None else flat(rows.overflow.unsqueeze(-1))  # [N * C]
        advantages, fallback = self._estimate(  # [N * C]
            flat_rows, flat_rewards, rewards.reshape(-1), overflow, options, report, pair_discount, pair_weights
        )
        kept = flat_counts if pair_weights is None or not self._weighted_stats else flat_counts & (pair_weights > 0)
        advantages = torch.where(kept, advantages, 0).view(num_samples, num_channels)  # [N, C]
        combined = torch.where(valid, (advantages * self._reward_weights).sum(1), 0)  # [N]
        combined = cast(self._normalized(combined, valid, weights), self._dtype)
        if self._needs_fold and not self._include_batch:
            self._fold_past(flat_rows, flat_rewards, pair_discount)
        if not report:
            return combined
        group_ids, num_groups = (rows.rows, rows.num_groups) if rows.groups is None else (rows.groups, rows.num_groups)
        equal, present = channel_zero_variance(group_ids, num_groups, rewards, counts)  # [G - 1, C]
        every = (equal | ~present).all(1)  # [G - 1], every reward function's rewards equal
        any_present = present.any(1)  # [G - 1]
        spare_group = torch.ones(1, dtype=torch.bool, device=self._device)
        zero_variance = take(torch.cat([every, spare_group]), group_ids) & valid  # [N]
        fraction = (every & any_present).sum().float() / any_present.sum().clamp_min(1).float()
        fell_back = (
            torch.zeros_like(valid) if fallback is None else (fallback.view(num_samples, num_channels) & counts).any(1)
        )
        return UpdateReport(
            combined, valid, fell_back, zero_variance, fraction, self._channel_fractions(equal, present)
        )

    def _estimate(
        self,
        rows: Optional[torch.Tensor],
        memory_rewards: torch.Tensor,
        rewards: torch.Tensor,
        overflow: Optional[torch.Tensor],
        options: Dict[str, Any],
        report: bool,
        discount: Optional[torch.Tensor],
        weights: Optional[torch.Tensor],
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Steps 3 and 4 for M items, the samples or the (sample, reward) pairs: the memory, then the estimator.

        Without per-prompt statistics the batch's alone; with them, ``_fold``
        and ``functional.prompt_advantages``; items whose keys overflowed the
        table get the fallback's advantage, from their own rewards.

        Args:
            rows: int64 [M], each item's memory row (the spare row for those
                out of memory), or None when nothing is kept per prompt.
            memory_rewards: float [M], what memory takes in: 0 for items out of it.
            rewards: float [M], each counting item's reward, overflowed or
                not (0 for the others), in the compute dtype.
            overflow: bool [M], items whose keys overflowed the table, or None.
            options: ``scale``, ``eps``, ``eps_rule``, and ``batch_mean`` and
                ``batch_std``: scalars, or [M] in item order (one per reward
                function, spread over the pairs), or None when unused.
            report: whether to say which items fell back.
            discount: float [M], each item's rho (Beta memory), or None.
            weights: float [M], each item's weight, or None.

        Returns:
            float [M] advantages in item order, and bool [M], the items that
            fell back (or None when none can, or without ``report``).
        """
        fallback = None
        if not self._needs_fold:
            advantages = batch_advantages(rewards, **options)
        else:
            stats = self._fold(rows, memory_rewards, discount, weights)
            in_stats_order = options
            if stats.groups is not None and options["batch_mean"] is not None and options["batch_mean"].ndim:
                # The statistics come sorted by memory row; each item's batch mean and std must follow.
                order = stats.groups.order
                in_stats_order = dict(
                    options, batch_mean=take(options["batch_mean"], order), batch_std=take(options["batch_std"], order)
                )
            advantages, fallback = prompt_advantages(
                stats,
                baseline=self._baseline,
                min_count=self._min_count,
                fallback=self._fallback,
                report=report,
                overwrite=True,  # the statistics are this update's own temporaries
                **in_stats_order,
            )
        if overflow is not None:
            # Keys beyond the table's rows: the fallback, from their own rewards.
            overflowed = fallback_advantages(rewards, fallback=self._fallback, **options)
            advantages = torch.where(overflow, overflowed, advantages)
            fallback = overflow if fallback is None else fallback | overflow
        return advantages, fallback

    def _fold(
        self,
        rows: torch.Tensor,
        rewards: torch.Tensor,
        discount: Optional[torch.Tensor],
        weights: Optional[torch.Tensor] = None,
    ) -> SampleStats:
        """With ``include_batch``, folds the batch into memory and returns the statistics after it; else those before.

        Without ``include_batch`` nothing is folded here: the update calls
        ``_fold_past`` once its advantages are final.

        Args:
            rows: int64 [M], each sample's (or, with a memory per reward
                function, each (sample, reward) pair's) memory row; the
                spare row (P, or P * C) for those out of memory.
            rewards: float [M] in the compute dtype, 0 for those out of memory.
            discount: float [M], each one's rho (Beta memory), or None.
            weights: float [M], each one's weight (``weighted_stats``; no memory), or None.

        Returns:
            The samples' ``SampleStats``.
        """
        extra: Dict[str, torch.Tensor] = {} if discount is None else {"discount": cast(discount, self._compute_dtype)}
        if self._weighted_stats:
            extra["weights"] = weights
        own_weight = self._baseline == "leave_one_out"
        if self._include_batch:
            stats = self._memory.fold(rows, rewards, ddof=self._ddof, own_weight=own_weight, **extra)
            if self._scale == "leave_one_out_std":
                stats = stats.per_sample()
                labels, num_labels = self._group_labels(rows, stats)
                others = leave_one_out_std(
                    labels, num_labels, stats.rewards, stats.count, stats.deviation, stats.std, ddof=self._ddof
                )
                stats = stats._replace(std=others)
            return stats
        # The statistics before the batch; the update folds the batch in last (_fold_past).
        return self._memory.read(rows, rewards, ddof=self._ddof)

    def _group_labels(self, rows: torch.Tensor, stats: SampleStats) -> Tuple[torch.Tensor, int]:
        """Each sample's group as a label in [0, L), in the statistics' output order, and L.

        ``leave_one_out_std`` sums into one entry per label: with the memory
        rows as labels that is O(P * C) per update, so where those outnumber
        the samples each group is labelled by its first position in the
        sorted batch instead, O(N) whatever P. The groups are the same, and
        so is every sum (each adds its group's samples in the same order).

        Args:
            rows: int64 [M], each item's memory row, in batch order.
            stats: the items' statistics (their ``groups`` give the output order).

        Returns:
            int64 [M] labels and their number.
        """
        num_rows = self._num_prompts * self._channels + 1  # pragma: no mutate (spare)
        if stats.groups is not None:  # sorted output order: the group's first sorted position
            return stats.groups.start, rows.numel()
        if num_rows <= rows.numel():  # pragma: no mutate (fork)
            return rows, num_rows
        groups = group_by_prompt(rows, num_rows)
        return unsort(groups.start, groups.order), rows.numel()

    def _fold_past(self, rows: torch.Tensor, rewards: torch.Tensor, discount: Optional[torch.Tensor]) -> None:
        """Without ``include_batch``: folds the batch into memory, the update's last step.

        The advantages read the statistics from before the batch. Compiled, a
        write to the state before the advantages are final (their whitening
        included) makes inductor copy the whole state to keep its old values,
        a [P] copy of each state tensor per update (SPO at P = 1,000,000:
        5 to 6.7 ms against 0.8 ms eager); last, it writes in place. Eager,
        the order changes nothing.

        Args:
            rows: as for ``_fold``.
            rewards: as for ``_fold``.
            discount: as for ``_fold``.
        """
        extra: Dict[str, torch.Tensor] = {} if discount is None else {"discount": cast(discount, self._compute_dtype)}
        self._memory.fold(rows, rewards, ddof=self._ddof, own_weight=False, **extra)

    def _count_streaks(self, rows: torch.Tensor, equal: torch.Tensor) -> None:
        """Adds this batch's visits to each row's run of zero-variance visits (O(N + P), no host sync).

        Args:
            rows: int64 [N], each sample's row; P (never reported) for samples out of memory.
            equal: bool [P + 1], whether each row's rewards in this batch are all equal.
        """
        streak = take(self._streak, rows)  # [N]
        write_at(self._streak, rows, torch.where(take(equal, rows), streak + 1, 0))

    def _rows(self, prompt_ids: torch.Tensor, rewards: torch.Tensor, valid: Optional[torch.Tensor]) -> _Rows:
        """Maps a batch to memory rows: its ids, or its keys' rows in the table.

        Invalid samples, and with hashed keys the samples of keys beyond the
        table's rows (overflow), go to the spare row P with reward 0: no
        mask is needed past here.

        Args:
            prompt_ids: int64 [N], ids in [0, P) (or keys).
            rewards: float [N] (or [N, C]) in the compute dtype, invalid samples' set to 0.
            valid: bool [N], or None.

        Returns:
            The rows, what memory takes in, and the groups the report counts.
        """
        overflow = groups = None
        num_groups = self._num_prompts + 1
        in_memory = valid  # samples that go into a row of the memory
        if self._table is not None:
            assignment = self._table.assign(prompt_ids, valid)
            if assignment.fresh.numel():  # pragma: no mutate (empty)
                self._reset_rows(assignment.fresh)
            prompt_ids, overflow = assignment.rows, assignment.overflow
            groups, num_groups = assignment.group, assignment.num_groups
            if overflow is not None:
                in_memory = ~overflow if valid is None else valid & ~overflow
        elif self._keys == "hashed":
            # No table (nothing is kept per prompt): the report's groups are the batch's distinct keys,
            # numbered by their first position in the sorted batch; invalid samples in the spare group N.
            sorted_keys = group_by_prompt(prompt_ids)
            num_groups = len(prompt_ids) + 1
            groups = sorted_keys.unsort(sorted_keys.start)  # [N], in [0, N)
            if valid is not None:
                groups = torch.where(valid, groups, num_groups - 1)
        if in_memory is not None:
            prompt_ids = torch.where(in_memory, prompt_ids, self._num_prompts)  # [N]
            if overflow is not None:
                rewards = torch.where(in_memory.view(-1, *[1] * (rewards.ndim - 1)), rewards, 0)  # [N] (or [N, C])
        return _Rows(prompt_ids, rewards, overflow, groups, num_groups)

    # Statistics.

    def stats(self, prompt_ids: Optional[torch.Tensor] = None) -> TrackerStats:
        """Returns a copy of the per-prompt statistics (see ``TrackerStats``).

        Args:
            prompt_ids: integer [M] tensor on ``device``, the prompts to
                report (keys, with hashed keys), or None for all P (rows,
                with hashed keys). Asking for a few prompts costs O(M), not
                O(P).

        Returns:
            TrackerStats of [M] (or [P]) tensors; [M, C] with per-reward
            statistics (``aggregation="normalize_then_sum"``).

        Raises:
            TypeError, ValueError: if ``prompt_ids`` is not a 1-D integer
                tensor on ``device``, or (with ``check_values``) an id lies
                outside [0, P); as for ``update``'s ids.
        """
        if prompt_ids is not None:
            prompt_ids = self._validate_prompt_ids(prompt_ids, "stats")
        return self.stats_from_snapshot(self.stats_snapshot(prompt_ids))

    def stats_snapshot(self, prompt_ids: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """Returns the raw memory behind ``stats`` for some prompts, computing nothing.

        This is the cheap half of ``stats``, for recording statistics every
        step and computing them later for many steps at once (see
        ``PromptStatsRecorder``). The tensors may alias the live state: copy
        them before the next ``update``.

        Args:
            prompt_ids: int64 [M] on ``device`` (keys, with hashed keys), or
                None for all P prompts (rows, with hashed keys).

        Returns:
            Tensors by name, each with the prompt dimension [M] (or [P]) first:
            ``{"rewards": [M, K], "count": [M]}`` for a buffer,
            ``{"mean", "var", "count"}`` for an EMA, ``{"count"}`` (zeros)
            without memory. A key not in the table gets count 0 (and zero
            rewards). With several rewards normalised each by its own
            statistics (``aggregation="normalize_then_sum"``), [M, C, ...]:
            the reward function's dimension follows the prompt's.
        """
        if self._table is None or prompt_ids is None:
            snapshot = self._memory.snapshot(None if prompt_ids is None else self._channel_rows(prompt_ids))
            return {name: self._per_prompt(tensor) for name, tensor in snapshot.items()}
        rows = self._table.lookup(prompt_ids)  # [M], -1 for keys not in the table
        absent = rows < 0
        snapshot = self._memory.snapshot(self._channel_rows(rows.clamp_min(0)))
        return {
            name: torch.where(absent.view(-1, *[1] * (tensor.ndim - 1)), 0, tensor)
            for name, tensor in ((name, self._per_prompt(tensor)) for name, tensor in snapshot.items())
        }

    def stats_from_snapshot(self, snapshot: Mapping[str, torch.Tensor]) -> TrackerStats:
        """Computes ``stats`` from snapshots, stacked along any leading dimensions.

        Args:
            snapshot: as returned by ``stats_snapshot``, each tensor with
                extra leading dimensions [*B] if several were stacked.

        Returns:
            TrackerStats of new [*B, M] tensors; NaN means and stds for
            prompts the memory holds nothing for.
        """
        mean, std, count = self._memory.stats_from_snapshot(snapshot)
        fallback = count < self._min_count if self._needs_fold else torch.ones_like(count, dtype=torch.bool)
        return TrackerStats(mean=mean, std=std, count=count, fallback=fallback)

    def fallback_mask(self, prompt_ids: torch.Tensor) -> torch.Tensor:
        """Tells which prompts hold too few rewards for their own statistics.

        Called right after ``update(prompt_ids, rewards)`` of a tracker with
        memory, it tells which of that batch's samples got the tracker's
        fallback: the batch is counted before that choice is made. A tracker
        without memory holds nothing after the update, so it says True
        everywhere; ``update_with_report`` tells which samples of the batch
        fell back, for every tracker.

        Args:
            prompt_ids: integer [N] tensor on ``device``, checked as
                ``update``'s ids are.

        Returns:
            bool [N], True where the prompt holds fewer than ``min_count``
            rewards (always True for a tracker without per-prompt state);
            [N, C], per reward function, with ``aggregation="normalize_then_sum"``.

        Raises:
            TypeError, ValueError: for bad ids, as ``stats``.
        """
        return self._fallback_mask(self._validate_prompt_ids(prompt_ids, "fallback_mask"))

    def _fallback_mask(self, prompt_ids: torch.Tensor) -> torch.Tensor:
        """``fallback_mask`` of checked int64 [N] ids (or keys)."""
        if not self._needs_fold:
            shape = (len(prompt_ids), self._channels) if self._channels > 1 else prompt_ids.shape
            return torch.ones(shape, dtype=torch.bool, device=prompt_ids.device)
        if self._table is None:
            return self._per_prompt(self._memory.counts(self._channel_rows(prompt_ids))) < self._min_count
        rows = self._table.lookup(prompt_ids)  # [N], -1 for keys not in the table
        counts = self._per_prompt(self._memory.counts(self._channel_rows(rows.clamp_min(0))))  # [N] or [N, C]
        absent = rows < 0 if self._channels == 1 else (rows < 0).unsqueeze(-1)
        return absent | (counts < self._min_count)

    def query(self, prompt_ids: torch.Tensor) -> PromptQuery:
        """Says what memory holds of some prompts: pass rate, its uncertainty, count and zero-variance streak.

        Read-only (no state changes, not even the key table's recency) and
        without a host sync (with ``check_values`` off), so a prompt sampler
        can call it every step (``sampling.PromptSampler``).

        Args:
            prompt_ids: integer [M] tensor on ``device``: ids in [0, P), or
                keys with ``keys="hashed"`` (a key not in the table reads as
                a prompt never seen: NaN, or the Beta memory's default prior).

        Returns:
            The ``PromptQuery`` of [M] tensors; ``streak`` is None unless
            the tracker was built with ``track_streaks=True``. With per-reward
            statistics (``aggregation="normalize_then_sum"``) ``pass_rate``,
            ``uncertainty`` and ``count`` are [M, C].

        Raises:
            TypeError, ValueError: for bad ids, as ``stats``.

        Example:
            >>> tracker = AdvantageTracker(3, "buffer", buffer_size=4)
            >>> _ = tracker.update(torch.tensor([0, 0, 1]), torch.tensor([1.0, 0.0, 1.0]))
            >>> tracker.query(torch.tensor([0, 2]))
            PromptQuery(pass_rate=tensor([0.5000,    nan]), uncertainty=tensor([0.3536,    nan]), \
count=tensor([2, 0]), streak=None)
        """
        prompt_ids = self._validate_prompt_ids(prompt_ids, "query")
        if self._table is None:
            pass_rate, uncertainty, count = map(self._per_prompt, self._memory.estimate(self._channel_rows(prompt_ids)))
            streak = None if self._streak is None else take(self._streak, prompt_ids)
            return PromptQuery(pass_rate, uncertainty, count, streak)
        rows = self._table.lookup(prompt_ids)  # [M], -1 for keys not in the table
        absent = rows < 0
        # A key not in the table reads as the spare row P freshly reset: it is
        # reset before every fold, so read a fresh memory's answer instead.
        estimate = self._memory.estimate(self._channel_rows(rows.clamp_min(0)))
        pass_rate, uncertainty, count = map(self._per_prompt, estimate)
        streak = None if self._streak is None else torch.where(absent, 0, take(self._streak, rows.clamp_min(0)))
        absent = absent if self._channels == 1 else absent.unsqueeze(-1)
        fresh_rate, fresh_uncertainty = self._memory.unseen_estimate
        pass_rate = torch.where(absent, fresh_rate, pass_rate)
        uncertainty = torch.where(absent, fresh_uncertainty, uncertainty)
        count = torch.where(absent, 0, count)
        return PromptQuery(pass_rate, uncertainty, count, streak)

    def set_prior(
        self,
        prompt_ids: torch.Tensor,
        successes: torch.Tensor,
        trials: torch.Tensor,
        *,
        strength: Optional[Union[float, torch.Tensor]] = None,
    ) -> None:
        """Sets the Beta memory's prior of some prompts from offline pass counts (SPO's offline estimate).

        For each prompt, with s successes in n trials::

            alpha = strength * (s + 0.5) / (n + 1),  beta = strength * (n - s + 0.5) / (n + 1)

        a mean of (s + 0.5) / (n + 1) (Jeffreys' half counts) worth
        ``strength`` rewards (alpha + beta); ``strength=None`` means n + 1,
        the Jeffreys posterior itself (alpha = s + 0.5, beta = n - s + 0.5).
        SPO uses ``strength = 1 / (1 - rho_min)`` (8 at its default rho_min
        0.875) with n its ``offline_N`` for every prompt, counting missing
        scores as failures. The prompts' counts and streaks become 0. With
        hashed keys, each key takes a row of the table (as ``update`` would
        give it, evicting the least recently seen when full), and a key
        evicted later comes back with the default prior.

        Args:
            prompt_ids: integer [M] on ``device``, distinct ids in [0, P) (or keys).
            successes: float or integer [M], s, in [0, n].
            trials: float or integer [M], n >= 0.
            strength: a positive number, or a float [M] tensor, or None.

        Raises:
            ValueError: if the memory is not ``"beta"``, or (with
                ``check_values``) an id is out of range or repeated, more
                keys are given than the table has rows, or the counts or
                strength are out of range. The state is then unchanged.
            TypeError: for tensors of the wrong kind.

        Example:
            >>> tracker = AdvantageTracker(2, "beta", decay=0.9)
            >>> tracker.set_prior(torch.tensor([1]), torch.tensor([3]), torch.tensor([4]))
            >>> tracker.query(torch.tensor([0, 1])).pass_rate  # the default prior, then 3.5 / 5
            tensor([0.5000, 0.7000])
        """
        if self.memory != "beta":
            raise ValueError(
                f"set_prior needs memory='beta' (a Beta posterior per prompt); this tracker's is {self.memory!r}"
            )
        if self._channels > 1:
            raise ValueError(
                f"set_prior sets one pass rate per prompt; this tracker keeps {self._channels} per prompt "
                "(num_rewards with aggregation='normalize_then_sum')"
            )
        prompt_ids = self._validate_prompt_ids(prompt_ids, "set_prior")
        if len(prompt_ids) > self._num_prompts:
            raise ValueError(f"set_prior: {len(prompt_ids)} prompts do not fit the tracker's {self._num_prompts} rows")
        compute = self._compute_dtype
        successes, trials = (
            check_prior_tensor(name, value, prompt_ids, self._device, compute)
            for name, value in (("successes", successes), ("trials", trials))
        )
        if strength is None:
            strength = trials + 1.0
        elif isinstance(strength, torch.Tensor):
            strength = check_prior_tensor("strength", strength, prompt_ids, self._device, compute)
        elif isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0 < strength < math.inf:
            raise ValueError(
                f"set_prior: strength must be a finite positive number, a tensor or None, got {strength!r}"
            )
        if self.check_values and prompt_ids.numel():
            check_prior_values(prompt_ids, successes, trials, strength, self._table is not None, self._num_prompts)
        if prompt_ids.numel() == 0:  # pragma: no mutate (empty)
            return
        alpha = strength * (successes + 0.5) / (trials + 1.0)
        beta = strength * (trials - successes + 0.5) / (trials + 1.0)
        if self.check_values:
            check_prior_fits(alpha, beta, self._dtype)
        rows = prompt_ids
        if self._table is not None:
            assignment = self._table.assign(prompt_ids)
            if assignment.fresh.numel():  # pragma: no mutate (empty)
                self._reset_rows(assignment.fresh)
            rows = assignment.rows
        self._memory.set_prior(rows, alpha, beta)
        if self._streak is not None:
            self._streak.index_fill_(0, rows, 0)

    def _validate_prompt_ids(self, prompt_ids: torch.Tensor, method: str) -> torch.Tensor:
        """Checks ids given to ``stats`` or ``fallback_mask`` as ``update`` checks its own; int64 [M] back."""
        prompt_ids = check_prompt_ids(prompt_ids, method, self._device)
        if self.check_values:
            refuse_compiled_value_checks(type(self).__name__, method)
            if self._keys == "ids" and prompt_ids.numel() > 0:
                check_id_range(prompt_ids, self._num_prompts)
        return prompt_ids

    # State.

    def state_dict(self) -> Dict[str, torch.Tensor]:
        """Returns a copy of the state, safe to keep while updating goes on.

        Returns:
            Tensors by name, on ``device``: the memory's (``rewards`` [P, K],
            ``count`` [P], ``head`` [P] for a buffer; ``mean``, ``var``,
            ``count`` [P] for an EMA; nothing without memory; [P, C, ...]
            with per-reward statistics), and with hashed keys the table's. Pass them to ``load_state_dict`` of a
            tracker built with the same arguments to continue identically.
        """
        return {name: tensor.clone() for name, tensor in self._state_tensors().items()}

    def load_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Replaces the state with a copy of ``state_dict``, in place.

        Everything is checked before anything is copied, so a refused state
        leaves the tracker exactly as it was. The state tensors keep their
        identity (they are copied into), so a captured CUDA graph stays valid.

        Args:
            state_dict: as returned by ``state_dict`` of a tracker of the same
                class, num_prompts, buffer size and dtype; on any device.

        Raises:
            TypeError: if ``state_dict`` is not a mapping of tensors.
            ValueError: if its keys, shapes or dtypes differ from this
                tracker's, or its values break the tracker's invariants.
        """
        check_state_dict(type(self).__name__, self._state_tensors(), state_dict)
        self._check_state_values(state_dict)
        self._assign_state(state_dict)

    def _state_tensors(self) -> Dict[str, torch.Tensor]:
        """The state tensors by name: the live ones, or views built from them."""
        state = {name: self._per_prompt(tensor) for name, tensor in self._memory.state_tensors().items()}
        if self._streak is not None:
            state["streak"] = self._streak[:-1]
        if self._table is not None:
            state.update(self._table.state_tensors())
        return state

    def _check_state_values(self, state: Mapping[str, torch.Tensor]) -> None:
        """Raises ValueError if a candidate state (of the right shapes and dtypes) breaks an invariant."""
        self._memory.check_state_values(self._memory_state(state), type(self).__name__)
        if self._streak is not None and (state["streak"] < 0).any():
            raise ValueError(f"{type(self).__name__} state 'streak' must be non-negative")
        if self._table is not None:
            self._table.check_state_values(state, type(self).__name__)

    def _assign_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Copies a checked state into the live state tensors, in place."""
        self._memory.assign_state(self._memory_state(state))
        if self._streak is not None:
            self._streak[:-1].copy_(state["streak"])
        if self._table is not None:
            self._table.load(state)

    def _memory_state(self, state: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
        """The memory's part of a state dict in its own layout: [P * C, ...] for [P, C, ...]."""
        if self._channels == 1:
            return state
        return {name: state[name].flatten(0, 1) for name in self._memory.state_tensors()}

    def _reset_rows(self, rows: torch.Tensor) -> None:
        """Forgets everything some rows hold: memory and streak (keys evicted from the table)."""
        self._memory.reset_rows(self._channel_rows(rows))
        if self._streak is not None:
            self._streak.index_fill_(0, rows, 0)
