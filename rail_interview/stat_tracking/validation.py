"""Checks of everything a tracker is given: options, batches, prompt ids and state dicts.

Each check raises a ``TypeError`` or ``ValueError`` whose message names the
problem, before anything is changed. Shapes, dtypes and devices cost no
host sync and are always checked; ranges and finiteness read values back
to the host, so trackers run them only with ``check_values``.

Dimensions: N samples in a batch, P prompts, M prompt ids asked about.
"""

from __future__ import annotations

import math
import os
import sys
import warnings
from typing import Mapping, Optional, Sequence, Tuple

import torch

from rail_interview.stat_tracking.ops import cast, is_compiling

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def is_integer_dtype(dtype: torch.dtype) -> bool:
    """True for the integer dtypes that can hold prompt ids (bool does not count).

    Args:
        dtype: any torch dtype.
    """
    return not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)


def check_positive_int(name: str, value: object) -> None:
    """Raises ValueError unless ``value`` is an int >= 1 (bool does not count).

    Args:
        name: the argument's name, for the message.
        value: the value to check.
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def check_choice(name: str, value: object, choices: Sequence[str]) -> None:
    """Raises ValueError unless ``value`` is one of ``choices``.

    Args:
        name: the option's name, for the message.
        value: the value to check.
        choices: the values allowed.
    """
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")


def check_tracker_options(
    num_prompts: int,
    *,
    eps: float,
    dtype: torch.dtype,
    choices: Mapping[str, Tuple[object, Sequence[str]]],
    ddof: int,
    min_count: int,
    baseline: str,
    memory: str = "none",
    include_batch: bool = True,
    normalize_eps: float = 1e-8,
    track_streaks: bool = False,
    normalize_eps_rule: str = "add",
) -> None:
    """Raises ValueError for tracker options out of range or contradicting each other.

    Args:
        num_prompts: P, a positive int.
        eps: a non-negative number.
        dtype: a floating dtype.
        choices: option name to (value, the values allowed), checked in order.
        ddof: 0 or 1.
        min_count: a positive int, at least ddof + 1, and 2 with
            ``leave_one_out``; with the Beta memory, whose prior always
            gives a mean and a std, any int >= 0.
        baseline: the estimator's baseline.
        memory: the memory's name (its own options are checked where it is built).
        include_batch: a bool; False needs a memory.
        normalize_eps: a positive number (>= 0 with ``normalize_eps_rule="nonzero"``,
            where a zero std leaves the advantages unscaled).
        track_streaks: a bool.
        normalize_eps_rule: how ``normalize_eps`` enters the whitening.
    """
    check_positive_int("num_prompts", num_prompts)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"eps must be a non-negative number, got {eps!r}")
    # A batch whose advantages are all equal has std 0: only a positive eps keeps its whitening finite,
    # unless a zero std leaves them unscaled.
    floor = 0 if normalize_eps_rule == "nonzero" else math.nextafter(0, 1)
    if isinstance(normalize_eps, bool) or not isinstance(normalize_eps, (int, float)) or not normalize_eps >= floor:
        kind = "non-negative" if floor == 0 else "positive"
        raise ValueError(f"normalize_eps must be a {kind} number, got {normalize_eps!r}")
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating dtype, got {dtype}")
    for name, value in (("include_batch", include_batch), ("track_streaks", track_streaks)):
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be a bool, got {value!r}")
    for name, (value, allowed) in choices.items():
        check_choice(name, value, allowed)
    if ddof not in (0, 1) or isinstance(ddof, bool):
        raise ValueError(f"ddof must be 0 or 1, got {ddof!r}")
    if not include_batch and memory == "none":
        raise ValueError(
            "include_batch=False reads each prompt's statistics from before the batch, which needs a memory "
            "('buffer', 'ema' or 'beta'); without one every prompt would fall back"
        )
    if memory == "beta":
        if isinstance(min_count, bool) or not isinstance(min_count, int) or min_count < 0:
            raise ValueError(f"min_count must be an int >= 0, got {min_count!r}")
        return
    check_positive_int("min_count", min_count)
    if min_count < ddof + 1:
        raise ValueError(
            f"min_count must be at least ddof + 1 = {ddof + 1}: a std with ddof={ddof} needs "
            f"{ddof + 1} rewards; got {min_count}"
        )
    if baseline == "leave_one_out" and min_count < 2:
        raise ValueError(f"leave_one_out needs min_count >= 2 (a lone reward has no others); got {min_count}")


def check_reward_options(
    num_rewards: int,
    reward_weights: Optional[Sequence[float]],
    *,
    aggregation: str,
    memory: str,
    scale: str,
    weighted_stats: bool,
    weighted_normalize: bool,
    include_batch: bool,
    min_count: int,
    normalize: str = "none",
) -> Tuple[float, ...]:
    """Raises ValueError for the options of several rewards and of sample weights that cannot work together.

    Args:
        num_rewards: C, a positive int.
        reward_weights: C finite numbers, or None for ones.
        aggregation: checked against ``AGGREGATIONS`` by the caller.
        memory: the memory's name.
        scale: the estimator's scale.
        weighted_stats: a bool; sample weights enter the prompts' statistics.
        weighted_normalize: a bool; sample weights enter the batch normalisation.
        include_batch: whether the batch enters the prompts' statistics.
        min_count: the estimator's min_count.
        normalize: the tracker's ``normalize``.

    Returns:
        The C weights, as floats.
    """
    check_positive_int("num_rewards", num_rewards)
    for name, value in (("weighted_stats", weighted_stats), ("weighted_normalize", weighted_normalize)):
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be a bool, got {value!r}")
    if reward_weights is None:
        weights: Tuple[float, ...] = (1.0,) * num_rewards
    else:
        if isinstance(reward_weights, torch.Tensor):
            reward_weights = reward_weights.tolist()
        try:
            weights = tuple(reward_weights)
        except TypeError:
            raise ValueError(f"reward_weights must be a sequence of {num_rewards} numbers, got {reward_weights!r}")
        if len(weights) != num_rewards or not all(
            isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) for w in weights
        ):
            raise ValueError(f"reward_weights must be {num_rewards} finite numbers (one per reward), got {weights!r}")
        weights = tuple(float(w) for w in weights)
    if memory == "beta" and aggregation == "sum_then_normalize" and weights != (1.0,):
        raise ValueError(
            "memory='beta' with several rewards, or a reward weighted other than 1, needs "
            "aggregation='normalize_then_sum' (a Beta posterior per reward function): a weighted sum of rewards is "
            "not a pass rate in [0, 1]"
        )
    if weighted_normalize and normalize != "batch":
        raise ValueError("weighted_normalize=True weighs the batch normalisation, which needs normalize='batch'")
    if weighted_stats and memory != "none":
        raise ValueError(
            f"weighted_stats=True needs memory='none': a {memory!r} memory keeps rewards, not their weights, "
            "so past rewards could not be weighted"
        )
    if scale == "leave_one_out_std":
        if memory != "none" or not include_batch:
            raise ValueError(
                "scale='leave_one_out_std' is the std of the other rewards in the batch: it needs memory='none'"
            )
        if weighted_stats:
            raise ValueError("scale='leave_one_out_std' takes no sample weights (weighted_stats=False)")
        if min_count < 2:
            raise ValueError(
                f"scale='leave_one_out_std' needs min_count >= 2 (a lone reward has no others); got {min_count}"
            )
    return weights


def check_weights(weights: object, prompt_ids: torch.Tensor, device: torch.device) -> None:
    """Checks the kind, shape and device of ``update``'s sample weights (no host sync).

    Args:
        weights: float [N].
        prompt_ids: int [N], the batch's ids.
        device: the tracker's device.

    Raises:
        TypeError: if ``weights`` is not a floating or integer tensor.
        ValueError: if its shape or device differ from the ids'.
    """
    if not isinstance(weights, torch.Tensor) or weights.dtype.is_complex or weights.dtype == torch.bool:
        kind = weights.dtype if isinstance(weights, torch.Tensor) else type(weights).__name__
        raise TypeError(f"weights must be a floating or integer tensor [N] (a response's tokens), got {kind}")
    if weights.shape != prompt_ids.shape or weights.device != device:
        raise ValueError(
            f"weights must have the shape of prompt_ids {tuple(prompt_ids.shape)} and be on {device}, "
            f"got shape {tuple(weights.shape)} on {weights.device}"
        )


def check_weight_values(
    weights: torch.Tensor, counted: torch.Tensor, *, whole_batch: bool = False, each_column: bool = False
) -> None:
    """Raises ValueError unless the weights of the samples that count are finite and non-negative, and some positive.

    A weight of 0 (a response without tokens) leaves a sample out of weighted
    statistics. A weighted statistic of the batch needs some weight to have a
    mean at all: of the samples that count (``whole_batch``), or, for
    statistics per reward function, of each function's counting rewards
    (``each_column``). Host syncs.

    Args:
        weights: float [N].
        counted: bool [N], or [N, C] per reward function: what enters the
            statistics (valid, and not NaN where NaN marks an unscorable reward).
        whole_batch: refuse a batch whose counting samples all weigh 0.
        each_column: refuse a reward function whose counting rewards all weigh 0.
    """
    samples = counted if counted.ndim == 1 else counted.any(-1)  # [N]
    num_bad = int((samples & ~(torch.isfinite(weights) & (weights >= 0))).sum())
    if num_bad:
        raise ValueError(f"weights must be finite and non-negative for valid samples, got {num_bad} that are not")
    heavy = weights > 0  # [N]
    if whole_batch and bool(samples.any()) and not bool((heavy & samples).any()):
        raise ValueError("weights of the valid samples are all 0: their weighted normalisation has no mean")
    if each_column and counted.ndim == 2:
        empty = counted.any(0) & ~(counted & heavy.unsqueeze(-1)).any(0)  # [C]
        if bool(empty.any()):
            raise ValueError(
                f"weights of reward function(s) {empty.nonzero().flatten().tolist()}'s counting rewards are all 0: "
                "their weighted batch statistics have no mean"
            )


def warn_at_caller(message: str) -> None:
    """Issues a UserWarning that points at the first caller outside this package.

    Args:
        message: the warning.
    """
    frame, level = sys._getframe(1), 2  # level 2: this function's caller; pylint: disable=protected-access
    while frame is not None and os.path.dirname(os.path.abspath(frame.f_code.co_filename)) == _PACKAGE_DIR:
        frame, level = frame.f_back, level + 1
    warnings.warn(message, UserWarning, stacklevel=level)


def check_discount(name: str, value: object, *, allow_one: bool = True) -> float:
    """Returns a discount (a decay) as a float, or raises ValueError unless it lies in (0, 1] (or (0, 1)).

    The Beta memory's discount may be 1 (a plain count); the EMA's decay may
    not (its statistics would never move).

    Args:
        name: the option's name, for the message.
        value: the discount.
        allow_one: whether 1 (no discount) is allowed.

    Returns:
        ``float(value)``.
    """
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not number or not (0.0 < value < 1.0 or (allow_one and value == 1.0)):
        bound = "(0, 1]" if allow_one else "(0, 1)"
        raise ValueError(f"{name} must lie in {bound}, got {value!r}")
    return float(value)


def warn_about_small_stds(memory: str, scale: str, min_count: int, include_batch: bool) -> None:
    """Warns of tracker options under which a prompt's std can be 0 or nearly, so advantages reach 1 / eps.

    Args:
        memory: the memory's name.
        scale: the estimator's scale.
        min_count: rewards a prompt needs before its own statistics are used.
        include_batch: whether a prompt's statistics include the batch.
    """
    if scale == "prompt_std" and not include_batch:
        warn_at_caller(
            "include_batch=False with a prompt std: a reward unlike every remembered one (a pass after a "
            "run of fails) meets a std near 0 (exactly 0 for a buffer or EMA of equal rewards, and for a "
            "Beta memory once p rounds to 0 or 1) and gets |reward - mean| / eps (about 1e6; +-inf in "
            "float16). The pass/fail study's such rows collapse; use scale='none' with normalize='batch' "
            "(SPO's) or scale='batch_std', or include_batch=True."
        )
    if memory not in ("none", "beta") and scale == "prompt_std" and min_count < 2:
        warn_at_caller(
            f"min_count={min_count}: a prompt's own statistics are used from its first reward, when its "
            "std is 0 or rests on one or two rewards, so advantages can reach |reward - mean| / eps "
            "(about 1e6 times the reward spread; +-inf in float16). Use min_count >= 2, better 8 or more."
        )


def check_batch(
    prompt_ids: torch.Tensor,
    rewards: torch.Tensor,
    valid: Optional[torch.Tensor],
    device: torch.device,
    num_rewards: int = 1,
) -> None:
    """Checks the types, shapes, dtypes and devices of ``update``'s inputs (no host sync).

    Args:
        prompt_ids: integer [N].
        rewards: floating or integer [N], or [N, C] for C = ``num_rewards`` > 1.
        valid: bool [N], or None.
        device: the tracker's device, where all three must be.
        num_rewards: C, the reward functions the tracker takes.

    Raises:
        TypeError: if an input is not a tensor, ids are not integers, rewards
            are neither floating nor integer, or ``valid`` is not bool.
        ValueError: if the shapes differ or are not 1-D (rewards [N, C]
            with several rewards), or a tensor is on another device.
    """
    if not isinstance(prompt_ids, torch.Tensor) or not isinstance(rewards, torch.Tensor):
        raise TypeError(
            "prompt_ids and rewards must be torch tensors, got "
            f"{type(prompt_ids).__name__} and {type(rewards).__name__}"
        )
    if num_rewards > 1:
        if prompt_ids.ndim != 1 or rewards.shape != (*prompt_ids.shape, num_rewards):
            raise ValueError(
                f"with num_rewards={num_rewards}, prompt_ids must be [N] and rewards [N, {num_rewards}] (one column "
                f"per reward function), got shapes {tuple(prompt_ids.shape)} and {tuple(rewards.shape)}"
            )
    elif prompt_ids.ndim != 1 or rewards.shape != prompt_ids.shape:
        raise ValueError(
            "prompt_ids and rewards must be 1-D tensors of one length [N], got shapes "
            f"{tuple(prompt_ids.shape)} and {tuple(rewards.shape)}"
        )
    if not is_integer_dtype(prompt_ids.dtype):
        raise TypeError(f"prompt_ids must be an integer tensor, got dtype {prompt_ids.dtype}")
    if rewards.dtype.is_complex or rewards.dtype == torch.bool:
        raise TypeError(f"rewards must be a floating or integer tensor, got dtype {rewards.dtype}")
    if prompt_ids.device != device or rewards.device != device:
        raise ValueError(
            f"prompt_ids and rewards must be on the tracker's device {device}, got "
            f"{prompt_ids.device} and {rewards.device}"
        )
    if valid is not None:
        if not isinstance(valid, torch.Tensor) or valid.dtype != torch.bool:
            kind = valid.dtype if isinstance(valid, torch.Tensor) else type(valid).__name__
            raise TypeError(f"valid must be a bool tensor or None, got {kind}")
        if valid.shape != prompt_ids.shape or valid.device != device:
            raise ValueError(
                f"valid must have the shape of prompt_ids {tuple(prompt_ids.shape)} and be on {device}, "
                f"got shape {tuple(valid.shape)} on {valid.device}"
            )


def convert_batch(prompt_ids: torch.Tensor, rewards: torch.Tensor, dtype: torch.dtype) -> Tuple[torch.Tensor, ...]:
    """Converts checked inputs to int64 ids and ``dtype`` rewards, out of autograd.

    Convert before checking values: a finite float64 or integer reward can
    overflow the tracker's dtype.

    Args:
        prompt_ids: integer [N].
        rewards: floating or integer [N] (or [N, C]).
        dtype: the tracker's dtype.

    Returns:
        int64 [N] ids and ``dtype`` [N] (or [N, C]) rewards, detached.
    """
    rewards = cast(rewards, dtype)
    return cast(prompt_ids, torch.int64), rewards.detach() if rewards.requires_grad else rewards


def check_prompt_ids(prompt_ids: torch.Tensor, method: str, device: torch.device) -> torch.Tensor:
    """Checks ids given to ``stats`` or ``fallback_mask`` as ``update`` checks its own (no host sync).

    Args:
        prompt_ids: integer [M].
        method: the public method's name, for the messages.
        device: the tracker's device.

    Returns:
        int64 [M] ids on ``device``.

    Raises:
        TypeError: if ``prompt_ids`` is not an integer tensor.
        ValueError: if it is not 1-D or is on another device.
    """
    if not isinstance(prompt_ids, torch.Tensor):
        raise TypeError(f"{method}: prompt_ids must be a torch tensor, got {type(prompt_ids).__name__}")
    if prompt_ids.ndim != 1:
        raise ValueError(f"{method}: prompt_ids must be a 1-D tensor [M], got shape {tuple(prompt_ids.shape)}")
    if not is_integer_dtype(prompt_ids.dtype):
        raise TypeError(f"{method}: prompt_ids must be an integer tensor, got dtype {prompt_ids.dtype}")
    if prompt_ids.device != device:
        raise ValueError(f"{method}: prompt_ids must be on the tracker's device {device}, got {prompt_ids.device}")
    return prompt_ids.long()


def refuse_compiled_value_checks(kind: str, method: str) -> None:
    """Raises a clear error when torch.compile traces a method whose value checks are on.

    The value checks read tensors back to the host, which a full graph
    cannot hold; without this, dynamo fails with a cryptic message about
    a data-dependent symbol. Call it only when the checks are on.

    Args:
        kind: the tracker's class name, for the message.
        method: the public method being traced, for the message.
    """
    if is_compiling():
        raise ValueError(
            f"{kind}.{method} cannot be compiled with check_values=True: the value checks "
            "read ids and rewards back to the host. Build the tracker with check_values=False (or set "
            "tracker.check_values = False) before torch.compile; shapes, dtypes and devices stay checked."
        )


def check_id_range(prompt_ids: torch.Tensor, num_prompts: int) -> None:
    """Raises ValueError unless every id lies in [0, P) (one host sync).

    Args:
        prompt_ids: int64 [M], M >= 1.
        num_prompts: P.
    """
    low, high = (bound.item() for bound in torch.aminmax(prompt_ids))
    if low < 0 or high >= num_prompts:
        raise ValueError(f"prompt_ids must lie in [0, {num_prompts}), got values from {low} to {high}")


def check_rewards(rewards: torch.Tensor, *, nan_is_invalid: bool, compute_dtype: torch.dtype) -> None:
    """Raises ValueError for rewards that are not finite (one host sync).

    Args:
        rewards: float [N] (or [N, C]), N >= 1, in the tracker's dtype.
        nan_is_invalid: NaN marks an unscorable sample (``nan_rewards="invalid"``):
            refuse only infinities.
        compute_dtype: the dtype sums are taken in.
    """
    if nan_is_invalid:
        if torch.isinf(rewards).any():
            raise ValueError(
                f"rewards must not be infinite in {rewards.dtype} (NaN marks an unscorable sample), "
                f"got {int(torch.isinf(rewards).sum())} infinite value(s)"
            )
        return
    # A sum is finite when every reward is, unless finite rewards overflow
    # it: only then is the exact, slower check needed.
    if not math.isfinite(rewards.sum(dtype=compute_dtype).item()):
        finite = torch.isfinite(rewards)
        if not finite.all():
            raise ValueError(
                f"rewards must be finite in {rewards.dtype}, got {int((~finite).sum())} NaN or infinite value(s)"
            )


def check_state_dict(kind: str, live: Mapping[str, torch.Tensor], state_dict: object, *, what: str = "tracker") -> None:
    """Raises unless ``state_dict`` has the keys, shapes and dtypes of the live state.

    Args:
        kind: the class name of what loads it, for the messages.
        live: its state tensors by name.
        state_dict: the candidate.
        what: what loads it, in the message for other keys ("tracker", "sampler").

    Raises:
        TypeError: if ``state_dict`` is not a mapping of tensors.
        ValueError: if its keys, shapes or dtypes differ from ``live``'s.
    """
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"{kind}.load_state_dict expects a mapping, got {type(state_dict).__name__}")
    if set(state_dict) != set(live):
        raise ValueError(
            f"{kind}.load_state_dict expects keys {sorted(live)}, got {sorted(state_dict)}: "
            f"is this the state of another kind of {what}?"
        )
    for name, tensor in live.items():
        given = state_dict[name]
        if not isinstance(given, torch.Tensor):
            raise TypeError(f"{kind} state {name!r} must be a tensor, got {type(given).__name__}")
        if given.shape != tensor.shape or given.dtype != tensor.dtype:
            raise ValueError(
                f"{kind} state {name!r} must have shape {tuple(tensor.shape)} and dtype "
                f"{tensor.dtype}, got shape {tuple(given.shape)} and dtype {given.dtype}"
            )


def check_discount_tensor(discount: object, num_samples: int, device: torch.device, memory: str) -> None:
    """Checks a per-sample discount given to ``update`` (no host sync).

    Args:
        discount: the ``discount`` argument, not None.
        num_samples: N, the batch's samples.
        device: the tracker's device.
        memory: the tracker's memory; only ``"beta"`` takes a discount.

    Raises:
        ValueError: if the memory is not the Beta memory, or the tensor is
            not 1-D of length N or is on another device.
        TypeError: if it is not a floating tensor.
    """
    if memory != "beta":
        raise ValueError(f"a per-sample discount needs memory='beta'; this tracker's memory is {memory!r}")
    if not isinstance(discount, torch.Tensor) or not discount.dtype.is_floating_point:
        kind = discount.dtype if isinstance(discount, torch.Tensor) else type(discount).__name__
        raise TypeError(f"discount must be a floating tensor [N] or None, got {kind}")
    if discount.shape != (num_samples,) or discount.device != device:
        raise ValueError(
            f"discount must be a 1-D tensor of the batch's length {num_samples} on {device}, got shape "
            f"{tuple(discount.shape)} on {discount.device}"
        )


def check_unit_rewards(rewards: torch.Tensor, valid: Optional[torch.Tensor], discount: Optional[torch.Tensor]) -> None:
    """Raises ValueError unless valid rewards lie in [0, 1] and discounts in (0, 1] (host syncs).

    The Beta memory counts a reward r as r of a success and 1 - r of a
    failure, which means nothing outside [0, 1]. NaN rewards (unscorable,
    with ``nan_rewards="invalid"``) and invalid samples' rewards are not
    checked; every sample's discount is.

    Args:
        rewards: float [N] (or [N, C]), N >= 1.
        valid: bool [N], or None.
        discount: float [N], or None.
    """
    outside = (rewards < 0) | (rewards > 1)  # NaN compares False
    if valid is not None:
        outside &= valid.view(-1, *[1] * (rewards.ndim - 1))
    bad = [int(outside.sum())]
    if discount is not None:
        bad.append(int((~((discount > 0) & (discount <= 1))).sum()))
    if bad[0]:
        raise ValueError(
            f"rewards must lie in [0, 1] with memory='beta' (a reward is a success's share), got {bad[0]} outside"
        )
    if len(bad) > 1 and bad[1]:
        raise ValueError(f"discount must lie in (0, 1], got {bad[1]} value(s) outside or NaN")


def check_prior_tensor(
    name: str, value: object, prompt_ids: torch.Tensor, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """Checks the kind and shape of one of ``set_prior``'s per-prompt tensors and converts it to ``dtype`` (no sync).

    Args:
        name: the argument's name (successes, trials, strength), for the messages.
        value: the argument.
        prompt_ids: int64 [M].
        device: the tracker's device.
        dtype: the compute dtype.

    Returns:
        ``dtype`` [M].

    Raises:
        TypeError: if it is not a real (floating or integer) tensor.
        ValueError: if it is not 1-D of length M or is on another device.
    """
    if not isinstance(value, torch.Tensor) or value.dtype.is_complex or value.dtype == torch.bool:
        kind = value.dtype if isinstance(value, torch.Tensor) else type(value).__name__
        raise TypeError(f"set_prior: {name} must be a floating or integer tensor, got {kind}")
    if value.shape != prompt_ids.shape or value.device != device:
        raise ValueError(
            f"set_prior: {name} must have the shape of prompt_ids {tuple(prompt_ids.shape)} on {device}, "
            f"got shape {tuple(value.shape)} on {value.device}"
        )
    return value.to(dtype)


def check_prior_values(
    prompt_ids: torch.Tensor,
    successes: torch.Tensor,
    trials: torch.Tensor,
    strength: object,
    hashed: bool,
    num_prompts: int,
) -> None:
    """Raises ValueError for ``set_prior`` values out of range (one host sync).

    Args:
        prompt_ids: int64 [M], M >= 1.
        successes: float [M].
        trials: float [M].
        strength: a float [M] tensor (a number is checked where it is given).
        hashed: whether the ids are keys (no range to check).
        num_prompts: P.
    """
    if not hashed:
        check_id_range(prompt_ids, num_prompts)
    if len(torch.unique(prompt_ids)) != len(prompt_ids):
        raise ValueError("set_prior: prompt_ids must be distinct (a prompt has one prior)")
    if not (torch.isfinite(trials).all() and (trials >= 0).all()):
        raise ValueError("set_prior: trials must be finite and >= 0")
    if not ((successes >= 0).all() and (successes <= trials).all()):
        raise ValueError("set_prior: successes must lie in [0, trials]")
    if isinstance(strength, torch.Tensor) and not (torch.isfinite(strength).all() and (strength > 0).all()):
        raise ValueError("set_prior: strength must be finite and positive")


def check_prior_fits(alpha: torch.Tensor, beta: torch.Tensor, dtype: torch.dtype) -> None:
    """Raises ValueError unless a prior's alpha and beta are finite in the state's dtype (one host sync).

    Args:
        alpha: float [M], computed in the compute dtype.
        beta: float [M].
        dtype: the tracker's dtype, that the state is kept in.
    """
    if not (torch.isfinite(alpha.to(dtype)).all() and torch.isfinite(beta.to(dtype)).all()):
        raise ValueError(f"set_prior: the prior's alpha or beta overflows {dtype}: lower strength or the counts")


def check_count_range(name: str, count: torch.Tensor, high: Optional[int] = None) -> None:
    """Raises ValueError unless every count lies in [0, high] (or is >= 0).

    Args:
        name: the tracker class name, for the message.
        count: int64 [P], a candidate ``count`` state.
        high: the largest count allowed, or None for no upper bound.
    """
    if count.numel() and (count.min() < 0 or (high is not None and count.max() > high)):
        bound = f"[0, {high}]" if high is not None else ">= 0"
        raise ValueError(
            f"{name} state 'count' must lie in {bound}, got values from {int(count.min())} to {int(count.max())}"
        )
