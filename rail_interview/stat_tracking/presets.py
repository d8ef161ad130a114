"""Trackers by name: the presets that reproduce public trainers, and the training vocabulary.

One registry: ``get(name, num_prompts, **overrides)`` builds the preset
``name``, ``names()`` lists every name, and ``parameters(name)`` gives the
named keyword parameters of a preset with their defaults: the schema a
config section is checked against, so that no option is silently ignored.
``register(name)`` adds a preset. Every preset takes ``num_prompts`` and the
keyword-only ``dtype``, ``device``, ``check_values``, ``process_group`` and
``keys`` (as for ``AdvantageTracker``), and returns an ``AdvantageTracker``.

The public trainers' presets give the advantages the named system gives
for the same samples grouped by prompt id, whatever the order of the
samples in the batch (groups need not be contiguous, nor of one size), and
pass any other keyword to ``AdvantageTracker``: ``trl_grpo(P,
memory="buffer", buffer_size=32)`` is TRL's estimator over each prompt's
last 32 rewards instead of its group alone. The training vocabulary
(``config.stat_tracking.method``) has explicit options only.

================= ====== ============= ========== ==== ==== ========= ======== =========================================
preset            memory baseline      scale      ddof eps  min_count fallback matches
================= ====== ============= ========== ==== ==== ========= ======== =========================================
ddpo              buffer prompt_mean   prompt_std 0    1e-6 16        batch    ddpo-pytorch's PerPromptStatTracker
trl_grpo          none   prompt_mean   per option 1    1e-4 2         zero     TRL's GRPOTrainer, one reward or several
verl_grpo         none   prompt_mean   prompt_std 1    1e-6 2         raw      verl's compute_grpo_outcome_advantage
verl_rloo         none   leave_one_out none       0    --   2         raw      verl's compute_rloo_outcome_advantage
flow_grpo         none   prompt_mean   batch_std  0    1e-4 2         zero     flow_grpo's PerPromptStatTracker
spo               beta   past (a)      none (b)   1    --   0         --       verl's SPO recipe (spo_ray_trainer.py)
verl_gdpo         none   prompt_mean   prompt_std 1    1e-6 2         raw      verl's compute_gdpo_outcome_advantage (c)
nemo_rl_gdpo      none   leave_one_out others (d) 1    1e-6 2         zero     NeMo-RL's GDPOAdvantageEstimator (c)
flow_factory_gdpo none   prompt_mean   max (e)    0    1e-6 1         zero     Flow-Factory's compute_gdpo (c)
verl_opo          none   weighted (f)  none       0    --   2         raw      verl's compute_opo_outcome_advantage
buffer            buffer prompt_mean   prompt_std 0    1e-6 16        batch    ddpo (BufferStatTracker)
ema               ema    prompt_mean   prompt_std 0    1e-6 16        batch    none: this package's EMA
batch             none   batch_mean    batch_std  0    1e-7 1         batch    none: whole-batch normalisation
grpo              option prompt_mean   prompt_std 1    1e-6 2 or 16   option   verl's GRPO
dr_grpo           option prompt_mean   none       1    --   2 or 16   option   verl's Dr. GRPO
rloo              option leave_one_out none       0    --   2 or 16   option   verl's RLOO
================= ====== ============= ========== ==== ==== ========= ======== =========================================

(a) the prompt's mean from the memory before the batch
(``include_batch=False``); (b) then the advantages are whitened over the
batch (``normalize="batch"``, ``normalize_eps=1e-8``); (c) several
rewards [N, C], each normalised in its group, summed with weights, then
whitened over the batch (``aggregation="normalize_then_sum"``; verl's
over response tokens, ``weights=`` lengths); (d) the std of the group's
other rewards, a zero one unscaled; (e) ``max(std, 1e-6)``, population std;
(f) the group's mean weighted by response length (``weights=``).
``trl_grpo`` takes several reward functions too (``reward_weights``,
``multi_objective_aggregation``).

``grpo``, ``dr_grpo`` and ``rloo`` are ``verl_grpo``,
``verl_grpo(norm_adv_by_std=False)`` and ``verl_rloo`` with a choice of
memory: without one (min_count 2, as verl) they are verl's estimators, and
exactly verl's advantages with ``fallback="raw"``; their default fallback is
``"zero"`` (TRL's rule for a group of one).

The tests compare each public trainer's preset with a plain transcription
of the system's code (``tests/system_references.py``) on random batches
with singletons, zero-variance groups and interleaved groups, in float64
to 1e-9.

Example:
    >>> from rail_interview.stat_tracking import presets
    >>> presets.get("grpo", 4, memory="ema", decay=0.9)
    AdvantageTracker(num_prompts=4, memory='ema', decay=0.9, baseline='prompt_mean', scale='prompt_std', ddof=1, \
eps=1e-06, min_count=16, fallback='zero', nan_rewards='refuse', keys='ids', dtype=torch.float32, device=cpu)
    >>> sorted(presets.parameters("ema"))
    ['check_values', 'decay', 'device', 'dtype', 'keys', 'min_count', 'process_group']
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, TypeVar

import torch

from rail_interview.stat_tracking.batch import BatchStatTracker
from rail_interview.stat_tracking.buffer import BufferStatTracker
from rail_interview.stat_tracking.ema import EmaStatTracker
from rail_interview.stat_tracking.tracker import AGGREGATIONS, AdvantageTracker
from rail_interview.stat_tracking.types import Device

__all__ = [
    "batch",
    "buffer",
    "ddpo",
    "dr_grpo",
    "ema",
    "flow_factory_gdpo",
    "flow_grpo",
    "get",
    "grpo",
    "names",
    "nemo_rl_gdpo",
    "parameters",
    "register",
    "rloo",
    "spo",
    "trl_grpo",
    "verl_gdpo",
    "verl_grpo",
    "verl_opo",
    "verl_rloo",
]

Preset = TypeVar("Preset", bound=Callable[..., AdvantageTracker])
ProcessGroup = Optional["torch.distributed.ProcessGroup"]

_PRESETS: Dict[str, Callable[..., AdvantageTracker]] = {}
_TRL_SCALES = {"group": "prompt_std", "batch": "batch_std", "none": "none"}


def register(name: str) -> Callable[[Preset], Preset]:
    """Registers a function of ``(num_prompts, **options)`` as the preset ``name``.

    Args:
        name: the name ``get`` and a config know it by.

    Returns:
        A decorator that registers the function and returns it unchanged.

    Raises:
        ValueError: if ``name`` is already registered.
    """

    def decorate(build: Preset) -> Preset:
        """Adds ``build`` to the registry under ``name`` and returns it."""
        if name in _PRESETS:
            raise ValueError(f"a preset named {name!r} is already registered")
        _PRESETS[name] = build
        return build

    return decorate


def names() -> Tuple[str, ...]:
    """The registered presets' names.

    Returns:
        Every name ``get`` takes, in registration order: the public trainers'
        presets, the training config's methods, then any registered later.
    """
    return tuple(_PRESETS)


def _lookup(name: str) -> Callable[..., AdvantageTracker]:
    """The preset ``name``, or a ValueError naming the choices."""
    if name not in _PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(map(repr, _PRESETS))}")
    return _PRESETS[name]


def get(name: str, num_prompts: int, **overrides: Any) -> AdvantageTracker:
    """Builds the preset ``name`` over ``num_prompts`` prompts.

    Args:
        name: one of ``names()``.
        num_prompts: P.
        **overrides: keyword options of the preset (see ``parameters``).

    Returns:
        The tracker.

    Raises:
        ValueError: for an unknown name (naming the choices), or an option
            out of range.
        TypeError: for a keyword the preset does not take.
    """
    return _lookup(name)(num_prompts, **overrides)


def parameters(name: str) -> Dict[str, Any]:
    """The named keyword parameters of the preset ``name``, with their defaults.

    ``num_prompts`` and a ``**options`` passthrough are left out: these are
    the options a config may set for the preset.

    Args:
        name: one of ``names()``.

    Returns:
        Parameter name to default value, in signature order.

    Raises:
        ValueError: for an unknown name.
    """
    named = list(inspect.signature(_lookup(name)).parameters.values())[1:]
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {parameter.name: parameter.default for parameter in named if parameter.kind in kinds}


def _common(
    dtype: torch.dtype, device: Device, check_values: bool, process_group: ProcessGroup, keys: str
) -> Dict[str, Any]:
    """The keywords every preset passes on to its tracker unchanged."""
    return dict(dtype=dtype, device=device, check_values=check_values, process_group=process_group, keys=keys)


def _build(num_prompts: int, options: dict, overrides: dict) -> AdvantageTracker:
    """An ``AdvantageTracker`` of a preset's options, updated by the caller's keywords."""
    return AdvantageTracker(num_prompts, **{**options, **overrides})


@register("ddpo")
def ddpo(
    num_prompts: int,
    buffer_size: int = 32,
    min_count: int = 16,
    *,
    dtype: torch.dtype = torch.float32,
    device: Device = None,
    check_values: bool = True,
    process_group: ProcessGroup = None,
    keys: str = "ids",
    **options: Any,
) -> AdvantageTracker:
    """ddpo-pytorch's ``PerPromptStatTracker`` (``ddpo_pytorch/stat_tracking.py``).

    Per prompt, a ``deque(maxlen=buffer_size)`` extended with the batch's
    rewards in batch order; a prompt with fewer than ``min_count`` rewards
    (the batch included) is normalised with the whole batch's mean and
    ``np.std`` (population), others with their buffer's; eps 1e-6 is added
    to the std. Same results as ``BufferStatTracker``.

    Departures: ddpo-pytorch returns advantages in the rewards' dtype
    (``np.empty_like(rewards)``), so integer rewards give truncated integer
    advantages; here they are ``dtype``. It computes in float64 when given
    float64 NumPy rewards; pass ``dtype=torch.float64`` for that.

    Args:
        num_prompts: P, ids in [0, P).
        buffer_size: K, rewards kept per prompt.
        min_count: rewards a prompt needs before its own statistics are used.
        dtype, device, check_values, process_group, keys: as for ``AdvantageTracker``.
        **options: other ``AdvantageTracker`` keywords.

    Returns:
        The tracker.
    """
    return _build(
        num_prompts,
        dict(
            memory="buffer",
            buffer_size=buffer_size,
            baseline="prompt_mean",
            scale="prompt_std",
            ddof=0,
            eps=1e-6,
            min_count=min_count,
            fallback="batch",
            **_common(dtype, device, check_values, process_group, keys),
        ),
        options,
    )


@register("trl_grpo")
def trl_grpo(
    num_prompts: int,
    scale_rewards: str = "group",
    *,
    multi_objective_aggregation: str = "sum_then_normalize",
    reward_weights: Optional[Sequence[float]] = None,
    dtype: torch.dtype = torch.float32,
    device: Device = None,
    check_values: bool = True,
    process_group: ProcessGroup = None,
    keys: str = "ids",
    **options: Any,
) -> AdvantageTracker:
    """TRL ``GRPOTrainer``'s advantages (``_generate_and_score_completions``), with one reward function or several.

    advantage = (r - group mean) / (std + 1e-4), with the std
    ``scale_rewards="group"``: the group's sample std (ddof 1);
    ``"batch"``: the sample std of every valid reward of the batch;
    ``"none"``: no division (Dr. GRPO). A NaN reward marks an unscorable
    sample: it is left out of the group's mean and std and of the batch's
    std, and gets advantage 0; a group with one valid sample gets 0.

    A row where every reward function returned None (a lone function's
    NaN) is unscorable in TRL 1.16 too (its ``unscorable_mask``): left out
    of the group's mean and std, advantage 0.

    **Several reward functions** (TRL 1.16's ``multi_objective_aggregation``,
    lines 2679 to 2730 of ``trl/trainer/grpo_trainer.py`` at f2cd57710ae3):
    ``reward_weights`` gives C weights (TRL's ``args.reward_weights``) and
    ``rewards`` is then [N, C], NaN where a function returned None.
    ``"sum_then_normalize"`` (TRL's default) sums the weighted rewards
    (``nansum``: a None adds nothing; a row of None is unscorable) and
    normalises the sum as above. ``"normalize_then_sum"`` normalises each
    function's rewards within the group (mean, sample std + 1e-4, whatever
    ``scale_rewards`` says, as TRL does), sums them with the weights (a None
    adds 0), then whitens the sums over the batch's scorable samples:
    ``(a - mean) / (std + 1e-4)``, sample std. With one reward function and
    ``"normalize_then_sum"`` TRL also whitens at the end, and so does this.

    Departures: TRL needs groups of ``num_generations`` contiguous samples;
    here any grouping by id works. TRL gives a group of one sample a NaN std
    (``torch.std``); here such a group gets 0. TRL's ``nanstd`` takes its
    Bessel factor ``n / (n - 1)`` as a float32 division of two integers, so
    in float64 its advantages differ from these (exact) ones by up to about
    1e-8 relative (n = 4: -1.2245948715 against -1.2245948898 on [1, 0, 2,
    1]); in float32 both round alike.

    Args:
        num_prompts: P, ids in [0, P).
        scale_rewards: ``"group"``, ``"batch"`` or ``"none"``.
        multi_objective_aggregation: ``"sum_then_normalize"`` or ``"normalize_then_sum"``.
        reward_weights: C weights, one per reward function, or None for one
            reward function (``rewards`` [N]).
        dtype, device, check_values, process_group, keys: as for ``AdvantageTracker``.
        **options: other ``AdvantageTracker`` keywords (``memory=...``, ...).

    Returns:
        The tracker.

    Raises:
        ValueError: if ``scale_rewards`` or ``multi_objective_aggregation``
            is not one of TRL's.
    """
    if scale_rewards not in _TRL_SCALES:
        raise ValueError(f"scale_rewards must be 'group', 'batch' or 'none'; got {scale_rewards!r}")
    if multi_objective_aggregation not in AGGREGATIONS:
        raise ValueError(
            f"multi_objective_aggregation must be 'sum_then_normalize' or 'normalize_then_sum'; "
            f"got {multi_objective_aggregation!r}"
        )
    whitened = multi_objective_aggregation == "normalize_then_sum"
    several = {} if reward_weights is None else dict(num_rewards=len(reward_weights), reward_weights=reward_weights)
    return _build(
        num_prompts,
        dict(
            memory="none",
            baseline="prompt_mean",
            scale="prompt_std" if whitened else _TRL_SCALES[scale_rewards],
            ddof=1,
            eps=1e-4,
            min_count=2,
            fallback="zero",
            nan_rewards="invalid",
            aggregation=multi_objective_aggregation,
            **(dict(normalize="batch", normalize_ddof=1, normalize_eps=1e-4) if whitened else {}),
            **several,
            **_common(dtype, device, check_values, process_group, keys),
        ),
        options,
    )


@register("verl_grpo")
def verl_grpo(
    num_prompts: int,
    norm_adv_by_std: bool = True,
    *,
    dtype: torch.dtype = torch.float32,
    device: Device = None,
    check_values: bool = True,
    process_group: ProcessGroup = None,
    keys: str = "ids",
    **options: Any,
) -> AdvantageTracker:
    """verl's ``compute_grpo_outcome_advantage`` (``verl/trainer/ppo/core_algos.py``).

    advantage = (r - group mean) / (group sample std + 1e-6), or
    r - group mean with ``norm_adv_by_std=False`` (Dr. GRPO); a group of one
    sample gets mean 0 and std 1: r / (1 + 1e-6), or r. Groups are samples
    of one id (verl's ``index``).

    verl computes in the scores' dtype (float32) and returns token-level
    advantages (the score times the response mask); this returns one
    advantage per sample. verl builds a singleton's mean and std as float32
    tensors, so with float64 scores its 1 + 1e-6 is rounded to float32
    (1.00000095); here it is computed in ``dtype``, a relative difference
    of 5e-8.

    Args:
        num_prompts: P, ids in [0, P).
        norm_adv_by_std: divide by the group's std (verl's ``norm_adv_by_std_in_grpo``).
        dtype, device, check_values, process_group, keys: as for ``AdvantageTracker``.
        **options: other ``AdvantageTracker`` keywords.

    Returns:
        The tracker.
    """
    return _build(
        num_prompts,
        dict(
            memory="none",
            baseline="prompt_mean",
            scale="prompt_std" if norm_adv_by_std else "none",
            ddof=1,
            eps=1e-6,
            min_count=2,
            fallback="raw",
            **_common(dtype, device, check_values, process_group, keys),
        ),
        options,
    )


@register("verl_rloo")
def verl_rloo(
    num_prompts: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: Device = None,
    check_values: bool = True,
    process_group: ProcessGroup = None,
    keys: str = "ids",
    **options: Any,
) -> AdvantageTracker:
    """verl's ``compute_rloo_outcome_advantage`` (``verl/trainer/ppo/core_algos.py``).

    advantage = r * n / (n - 1) - mean * n / (n - 1) for a group of n >= 2
    samples, that is r minus the mean of the group's other samples; a group
    of one keeps its raw reward. Computed as (r - mean) / (1 - 1/n), equal up
    to rounding.

    Args:
        num_prompts: P, ids in [0, P).
        dtype, device, check_values, process_group, keys: as for ``AdvantageTracker``.
        **options: other ``AdvantageTracker`` keywords.

    Returns:
        The tracker.
    """
    return _build(
        num_prompts,
        dict(
            # ddof only shapes a std, which RLOO does not use.
            memory="none",
            baseline="leave_one_out",
            scale="none",
            ddof=0,
            min_count=2,
            fallback="raw",
            **_common(dtype, device, check_values, process_group, keys),
        ),
        options,
    )


@register("flow_grpo")
def flow_grpo(
    num_prompts: int,
    global_std: bool = True,
    *,
    dtype: torch.dtype = torch.float32,
    device: Device = None,
    check_values: bool = True,
    process_group: ProcessGroup = None,
    keys: str = "ids",
    **options: Any,
) -> AdvantageTracker:
    """flow_grpo's ``PerPromptStatTracker`` (``flow_grpo/stat_tracking.py``), cleared after every update.

    Its trainers call ``clear()`` after each ``update``, so a prompt's
    statistics are its group in the batch: advantage = (r - group mean) /
    (std + 1e-4), with ``np.std`` (population) of the whole batch when
    ``global_std``, else of the group. A group of one gets 0 (its reward
    minus itself), as there.

    Args:
        num_prompts: P, ids in [0, P).
        global_std: scale by the batch's std instead of the group's.
        dtype, device, check_values, process_group, keys: as for ``AdvantageTracker``.
        **options: other ``AdvantageTracker`` keywords.

    Returns:
        The tracker.
    """
    return _build(
        num_prompts,
        dict(
            memory="none",
            baseline="prompt_mean",
            scale="batch_std" if global_std else "prompt_std",
            ddof=0,
            eps=1e-4,
            min_count=2,
            fallback="zero",
            **_common(dtype, device, check_values, process_group, keys),
        ),
        options,
    )


@register("spo")
def spo(
    num_prompts: int,
    rho: float = 0.875,
    repeats: str = "last",
    *,
    dtype: torch.dtype = torch.float32,
    device: Device = None,
    check_values: bool = True,
    process_group: ProcessGroup = None,
    keys: str = "ids",
    **options: Any,
) -> AdvantageTracker:
    """SPO's advantages and per-prompt Beta tracker (verl recipe ``spo/spo_ray_trainer.py``).

    Transcribed from ``RayPPOTrainer.fit`` at volcengine/verl commit
    4b2b36432e8ffa463894edd21ec4f9822412905a (``tests/system_references.py``,
    ``SpoBetaTracker``). Per sample, with its prompt's alpha and beta as they
    were before the batch: ``a = r - alpha / (alpha + beta)``; then over the
    whole batch ``(a - mean(a)) / (std(a) + 1e-8)`` with torch's unbiased
    std. Then every reward is folded in: ``alpha <- rho * alpha + r``,
    ``beta <- rho * beta + (1 - r)``, with ``repeats="last"`` as in the
    reference: each sample's update is computed from the state before the
    batch and the last one written stands, so a prompt repeated in a batch
    keeps only its last sample's reward. ``repeats="all"`` folds every
    sample instead. SPO samples one answer per prompt, where the two agree.

    The discount is ``rho`` (``rho.type: constant``; ``rho.value`` is 0.875
    in SPO's config), or per sample: pass
    ``update(..., discount=functional.spo_discount(D))`` for SPO's default
    KL-adaptive rho (``rho.type: kl``), D measured by the trainer on each
    prompt's previous response. Rows start at alpha = beta = 0.5, SPO's
    prior without offline data (``offline_N: 0``); set SPO's offline prior
    with ``tracker.set_prior(ids, successes, offline_n, strength=1 / (1 -
    rho_min))``. Prompt selection by ``sqrt(p (1 - p)) + 0.05`` is
    ``sampling.PromptSampler(rule="spo")``.

    Departures: a batch with one valid sample gets advantage 0 (torch's std
    of one sample is NaN there); invalid samples (``valid``, or NaN with
    ``nan_rewards="invalid"``) get 0, stay out of the mean and std and of
    memory (the reference has no such samples); rewards outside [0, 1] are
    refused with ``check_values`` (the reference takes them as they are).
    The reference keeps alpha and beta in float32 tensors rounded through
    ``.item()``; here they are in ``dtype`` (float64 matches its float64
    transcription to rounding).

    Args:
        num_prompts: P, ids in [0, P).
        rho: the discount of every reward, in (0, 1], unless ``update`` is given ``discount``.
        repeats: ``"last"`` (the reference's) or ``"all"``.
        dtype, device, check_values, process_group, keys: as for ``AdvantageTracker``.
        **options: other ``AdvantageTracker`` keywords.

    Returns:
        The tracker.

    Raises:
        TypeError: for ``decay``: SPO's discount is ``rho``.

    Example:
        >>> tracker = spo(2, rho=0.9, dtype=torch.float64)
        >>> tracker.update(torch.tensor([0, 1, 1]), torch.tensor([1.0, 0.0, 1.0]))  # p_hat 0.5 for both
        tensor([ 0.5774, -1.1547,  0.5774], dtype=torch.float64)
        >>> tracker.state_dict()["alpha"]  # 0.9 * 0.5 + r, prompt 1's last sample standing
        tensor([1.4500, 1.4500], dtype=torch.float64)
    """
    if "decay" in options:
        raise TypeError("spo() takes the discount as rho, not decay")
    return _build(
        num_prompts,
        dict(
            memory="beta",
            decay=rho,
            repeats=repeats,
            baseline="prompt_mean",
            scale="none",
            ddof=1,
            min_count=0,
            fallback="zero",
            include_batch=False,
            normalize="batch",
            normalize_eps=1e-8,
            **_common(dtype, device, check_values, process_group, keys),
        ),
        options,
    )


@register("verl_gdpo")
def verl_gdpo(
    num_prompts: int,
    num_rewards: int = 2,
    *,
    reward_weights: Optional[Sequence[float]] = None,
    dtype: torch.dtype = torch.float32,
    device: Device = None,
    check_values: bool = True,
    process_group: ProcessGroup = None,
    keys: str = "ids",
    **options: Any,
) -> AdvantageTracker:
    """verl's ``compute_gdpo_outcome_advantage`` (``algorithm.adv_estimator=gdpo``): GRPO per reward, then whitening.

    verl 0.9.1 (``verl/trainer/ppo/core_algos.py``; byte-identical to tag
    v0.9.0, 483b8a009ba3, and main 1dda039b9c63), with
    ``algorithm.gdpo_reward_keys`` the C columns of ``rewards`` [N, C] and
    ``gdpo_reward_weights`` the ``reward_weights``. Per reward, verl's GRPO
    (``verl_grpo``: group mean, sample std + 1e-6, a group of one keeps its
    raw reward over 1 + 1e-6); the weighted sum; then ``masked_whiten`` over
    the batch's response tokens: pass ``weights=response_mask.sum(-1)``, and
    each advantage enters the mean and the variance once per token (frequency
    weights, variance over tokens - 1), divided by ``sqrt(var + 1e-8)``. The
    tracker returns one advantage per sample: multiply by the response mask
    for verl's [N, T].

    Departures: verl runs in float32 whatever the dtype (its scores and
    weights are float32 tensors); here ``dtype`` decides. verl has no NaN
    handling (a NaN reward makes the whole batch NaN); here a NaN is refused
    (``check_values``), or with ``nan_rewards="invalid"`` leaves its reward
    function's statistics. verl raises when the batch has fewer than two
    response tokens; here the std is then 0 and the advantages are
    ``(a - mean) / 1e-4``. In training verl ignores
    ``norm_adv_by_std_in_grpo`` and ``epsilon`` for GDPO, and so does this
    preset.

    Args:
        num_prompts: P, ids in [0, P).
        num_rewards: C, the reward keys.
        reward_weights: C weights, or None for ones.
        dtype, device, check_values, process_group, keys: as for ``AdvantageTracker``.
        **options: other ``AdvantageTracker`` keywords (``memory="buffer"``:
            each reward normalised by its prompt's last rewards).

    Returns:
        The tracker; its ``update`` needs ``weights`` (response lengths).
    """
    return _build(
        num_prompts,
        dict(
            memory="none",
            baseline="prompt_mean",
            scale="prompt_std",
            ddof=1,
            eps=1e-6,
            min_count=2,
            fallback="raw",
            num_rewards=num_rewards,
            reward_weights=reward_weights,
            aggregation="normalize_then_sum",
            normalize="batch",
            normalize_ddof=1,
            normalize_eps=1e-8,
            normalize_eps_rule="variance",
            weighted_normalize=True,
            **_common(dtype, device, check_values, process_group, keys),
        ),
        options,
    )


@register("nemo_rl_gdpo")
def nemo_rl_gdpo(
    num_prompts: int,
    num_rewards: int = 2,
    *,
    reward_weights: Optional[Sequence[float]] = None,
    normalize_rewards: bool = True,
    use_leave_one_out_baseline: bool = True,
    dtype: torch.dtype = torch.float32,
    device: Device = None,
    check_values: bool = True,
    process_group: ProcessGroup = None,
    keys: str = "ids",
    **options: Any,
) -> AdvantageTracker:
    """NeMo-RL's ``GDPOAdvantageEstimator``: per reward a leave-one-out baseline and std, the sum, then the batch.

    NVIDIA-NeMo/RL at 7ea279abfbeb (``nemo_rl/algorithms/advantage_estimator.py``
    and ``calculate_baseline_and_std_per_prompt`` in ``utils.py``). Per
    reward function, with ``use_leave_one_out_baseline`` (NeMo-RL's default):
    r minus the mean of the group's other rewards, divided, with
    ``normalize_rewards``, by the std of those others (Bessel) + 1e-6 where
    that std is > 0, and left unscaled where it is 0 (``eps_rule="nonzero"``,
    ``scale="leave_one_out_std"``). Without it: the group's mean and sample
    std. A group with one sample gets 0. Then the weighted sum, and over the
    batch ``(a - mean) / std`` (Bessel, no eps), or ``a - mean`` where that
    std is 0.

    Departures: NeMo-RL computes each variance as E[r^2] - E[r]^2. Here it is
    centred, so rewards whose others are all equal get std exactly 0 (left
    unscaled); NeMo-RL's rounding can leave a tiny positive std there and
    multiply that advantage by up to 1e6 (in float32 for rewards such as
    11.775, and in float64 too for other values). Elsewhere the two agree to
    rounding. NeMo-RL takes the components ``reward/*`` in sorted name
    order and needs at least two; here the columns are in the order given,
    and any C works. NaN rewards poison NeMo-RL's batch; here they are
    refused (or, with ``nan_rewards="invalid"``, leave their reward's
    statistics).

    Args:
        num_prompts: P, ids in [0, P).
        num_rewards: C, the reward components.
        reward_weights: C weights, or None for ones.
        normalize_rewards: divide each reward's advantage by its std.
        use_leave_one_out_baseline: each sample's baseline and std leave it out.
        dtype, device, check_values, process_group, keys: as for ``AdvantageTracker``.
        **options: other ``AdvantageTracker`` keywords.

    Returns:
        The tracker.
    """
    if use_leave_one_out_baseline:
        baseline, scale = "leave_one_out", "leave_one_out_std"
    else:
        baseline, scale = "prompt_mean", "prompt_std"
    return _build(
        num_prompts,
        dict(
            memory="none",
            baseline=baseline,
            scale=scale if normalize_rewards else "none",
            ddof=1,
            eps=1e-6,
            eps_rule="nonzero",
            min_count=2,
            fallback="zero",
            num_rewards=num_rewards,
            reward_weights=reward_weights,
            aggregation="normalize_then_sum",
            normalize="batch",
            normalize_ddof=1,
            normalize_eps=0.0,
            normalize_eps_rule="nonzero",
            **_common(dtype, device, check_values, process_group, keys),
        ),
        options,
    )


@register("flow_factory_gdpo")
def flow_factory_gdpo(
    num_prompts: int,
    num_rewards: int = 2,
    *,
    reward_weights: Optional[Sequence[float]] = None,
    dtype: torch.dtype = torch.float32,
    device: Device = None,
    check_values: bool = True,
    process_group: ProcessGroup = None,
    keys: str = "ids",
    **options: Any,
) -> AdvantageTracker:
    """Flow-Factory's ``compute_gdpo`` (``aggregation_func="gdpo"``, its default): floored stds throughout.

    X-GenGroup/Flow-Factory at a0b2bc5a2b4f
    (``src/flow_factory/advantage/advantage_processor.py``). Per reward, the
    group's ``(r - mean) / max(std, 1e-6)`` with the population std (a
    group of one gets 0), times its weight; the sum; then over the batch
    ``(a - mean) / max(std, 1e-6)``, population std. Its ``global_std``
    (True by default) is never read by GDPO, so there is no such option here.

    Departures: Flow-Factory computes in NumPy from float32 rewards; with
    ``sampler_type="group_contiguous"`` its batch std is uncentred
    (``sqrt(E[a^2] - E[a]^2)``), which differs from this centred one by
    rounding (about 1e-7 relative in float32); with
    ``"distributed_k_repeat"`` it is ``np.std``.

    Args:
        num_prompts: P, ids in [0, P).
        num_rewards: C, the reward models.
        reward_weights: C weights, or None for ones.
        dtype, device, check_values, process_group, keys: as for ``AdvantageTracker``.
        **options: other ``AdvantageTracker`` keywords.

    Returns:
        The tracker.
    """
    return _build(
        num_prompts,
        dict(
            memory="none",
            baseline="prompt_mean",
            scale="prompt_std",
            ddof=0,
            eps=1e-6,
            eps_rule="max",
            min_count=1,
            fallback="zero",
            num_rewards=num_rewards,
            reward_weights=reward_weights,
            aggregation="normalize_then_sum",
            normalize="batch",
            normalize_ddof=0,
            normalize_eps=1e-6,
            normalize_eps_rule="max",
            **_common(dtype, device, check_values, process_group, keys),
        ),
        options,
    )


@register("verl_opo")
def verl_opo(
    num_prompts: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: Device = None,
    check_values: bool = True,
    process_group: ProcessGroup = None,
    keys: str = "ids",
    **options: Any,
) -> AdvantageTracker:
    """verl's ``compute_opo_outcome_advantage`` (``adv_estimator=opo``): r minus the length-weighted group mean.

    verl 0.9.1 (``verl/trainer/ppo/core_algos.py``; byte-identical to tag
    v0.9.0, 483b8a009ba3). Pass ``weights=response_mask.sum(-1)``: the
    baseline is ``sum(l * r) / sum(l)`` over the group; no std, no eps; a
    group of one keeps its raw reward (baseline 0).

    Departures: an empty response (weight 0) gets advantage 0 here, where
    verl computes r - baseline and its response mask then zeroes it; a
    group whose responses are all empty has a NaN baseline in verl (NaN
    advantages, even on masked tokens) and 0 here.

    Args:
        num_prompts: P, ids in [0, P).
        dtype, device, check_values, process_group, keys: as for ``AdvantageTracker``.
        **options: other ``AdvantageTracker`` keywords.

    Returns:
        The tracker; its ``update`` needs ``weights`` (response lengths).
    """
    return _build(
        num_prompts,
        dict(
            memory="none",
            baseline="prompt_mean",
            scale="none",
            ddof=0,
            min_count=2,
            fallback="raw",
            weighted_stats=True,
            **_common(dtype, device, check_values, process_group, keys),
        ),
        options,
    )


@register("buffer")
def buffer(
    num_prompts: int,
    buffer_size: int = 32,
    min_count: int = 16,
    *,
    dtype: torch.dtype = torch.float32,
    device: Device = None,
    check_values: bool = True,
    process_group: ProcessGroup = None,
    keys: str = "ids",
) -> BufferStatTracker:
    """``BufferStatTracker``: DDPO's per-prompt ring buffer, the training config's ``"buffer"``.

    Args:
        num_prompts: P.
        buffer_size: K, rewards kept per prompt.
        min_count: rewards a prompt needs before its own statistics are used.
        dtype, device, check_values, process_group, keys: as for ``AdvantageTracker``.

    Returns:
        ``BufferStatTracker(num_prompts, buffer_size, min_count, ...)``.
    """
    return BufferStatTracker(
        num_prompts, buffer_size, min_count, **_common(dtype, device, check_values, process_group, keys)
    )


@register("ema")
def ema(
    num_prompts: int,
    decay: float = 0.7,
    min_count: int = 16,
    *,
    dtype: torch.dtype = torch.float32,
    device: Device = None,
    check_values: bool = True,
    process_group: ProcessGroup = None,
    keys: str = "ids",
) -> EmaStatTracker:
    """``EmaStatTracker``: per-prompt moving averages, the training config's ``"ema"``.

    Args:
        num_prompts: P.
        decay: weight kept by the old statistics at each reward, in (0, 1).
        min_count: rewards a prompt needs before its own statistics are used.
        dtype, device, check_values, process_group, keys: as for ``AdvantageTracker``.

    Returns:
        ``EmaStatTracker(num_prompts, decay, min_count, ...)``.
    """
    return EmaStatTracker(num_prompts, decay, min_count, **_common(dtype, device, check_values, process_group, keys))


@register("batch")
def batch(
    num_prompts: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: Device = None,
    check_values: bool = True,
    process_group: ProcessGroup = None,
    keys: str = "ids",
) -> BatchStatTracker:
    """``BatchStatTracker``: whole-batch normalisation, the training config's ``"batch"``.

    Args:
        num_prompts: P.
        dtype, device, check_values, process_group, keys: as for ``AdvantageTracker``.

    Returns:
        ``BatchStatTracker(num_prompts, ...)``.
    """
    return BatchStatTracker(num_prompts, **_common(dtype, device, check_values, process_group, keys))


def _grpo_family(name: str, build: Callable[..., AdvantageTracker], summary: str) -> Callable[..., AdvantageTracker]:
    """Registers a GRPO-family method of the training config: ``build`` with a choice of memory.

    Args:
        name: the method's name.
        build: the public preset it is, with its fixed keywords.
        summary: the first line of its docstring.

    Returns:
        The registered preset.
    """

    def preset(
        num_prompts: int,
        *,
        memory: str = "none",
        buffer_size: int = 32,
        decay: float = 0.7,
        rho: float = 0.9,
        min_count: int = 16,
        fallback: str = "zero",
        include_batch: bool = True,
        track_streaks: bool = False,
        dtype: torch.dtype = torch.float32,
        device: Device = None,
        check_values: bool = True,
        process_group: ProcessGroup = None,
        keys: str = "ids",
    ) -> AdvantageTracker:
        """The GRPO-family method ``name`` (this docstring is replaced below, with ``summary`` and the Args)."""
        options: Dict[str, Any] = dict(memory=memory)
        if memory == "buffer":
            options.update(buffer_size=buffer_size, min_count=min_count)
        elif memory == "ema":
            options.update(decay=decay, min_count=min_count)
        elif memory == "beta":
            options.update(decay=rho, min_count=min_count)
        if not include_batch:
            options.update(include_batch=False)
        if track_streaks:
            options.update(track_streaks=True)
        return build(
            num_prompts, fallback=fallback, **options, **_common(dtype, device, check_values, process_group, keys)
        )

    preset.__name__ = preset.__qualname__ = name
    preset.__doc__ = f"""{summary}

    Args:
        num_prompts: P.
        memory: where a prompt's group statistics come from: ``"none"`` (its
            samples in this batch, as verl and TRL), ``"buffer"`` (its last
            ``buffer_size`` rewards), ``"ema"`` (moving averages with
            ``decay``) or ``"beta"`` (a Beta posterior of the pass rate,
            discounted by ``rho``: rewards in [0, 1]).
        buffer_size: K, rewards kept per prompt with ``memory="buffer"``.
        decay: weight kept by the old statistics with ``memory="ema"`` (only).
        rho: the discount of every reward with ``memory="beta"`` (only), in
            (0, 1]; the training config's ``stat_tracking.rho``, as for ``spo``.
        min_count: rewards a prompt's memory needs; without memory a group
            needs 2, as in verl.
        include_batch: whether a prompt's statistics include this batch (as
            GRPO's do), or come from its memory before it (False: the
            baseline from the past only, as SPO's; needs a memory).
        track_streaks: keep each prompt's run of zero-variance visits, for
            ``query`` (and ``sampling.PromptSampler(rule="greso")``).
        fallback: what a prompt with too few rewards gets: ``"zero"`` (TRL's
            rule for a group of one), ``"raw"`` (verl's: its raw reward) or
            ``"batch"`` (DDPO's: the whole batch's statistics).
        dtype, device, check_values, process_group, keys: as for ``AdvantageTracker``.

    Returns:
        The tracker.

    Raises:
        ValueError: for an unknown memory or fallback, or an option out of range.
    """
    return register(name)(preset)


grpo = _grpo_family(
    "grpo",
    verl_grpo,
    "GRPO: (r - group mean) / (group sample std + 1e-6), ``verl_grpo`` with a choice of memory.",
)
dr_grpo = _grpo_family(
    "dr_grpo",
    lambda num_prompts, **options: verl_grpo(num_prompts, norm_adv_by_std=False, **options),
    "Dr. GRPO: r - group mean, ``verl_grpo(norm_adv_by_std=False)`` with a choice of memory.",
)
rloo = _grpo_family(
    "rloo",
    verl_rloo,
    "RLOO: r - the mean of the group's other rewards, ``verl_rloo`` with a choice of memory.",
)
