"""A training config checked once, before any work, and the tracker it names.

``validate_config`` checks every field training reads, with messages that
name the field. ``build_tracker`` builds the tracker of
``config.stat_tracking`` from the preset registry
(``rail_interview.stat_tracking.presets``): ``method`` is any registered
preset name (``buffer``, ``ema``, ``batch``, ``grpo``, ``dr_grpo``,
``rloo``, or a public trainer's: ``ddpo``, ``trl_grpo``, ...), and the
section's other fields are passed to it where its signature names them (the
signature is the schema). ``memory`` and ``fallback`` hold a neutral value
(``"none"`` and ``"auto"``: the method's own) unless set; a method that
has no such option refuses any other value, so that no option is silently
ignored. ``buffer_size``, ``min_count`` and ``ema_decay`` are read by the
methods that name them (``presets.parameters(method)``).

A resume may change only ``RESUMABLE_FIELDS`` (``check_resume_config``);
``load_run_config`` reads a run's own config back.
"""

from __future__ import annotations

import functools
import json
import math
import os
import warnings
from typing import Any, Dict, Optional, Tuple

import ml_collections
import torch

from rail_interview import configs, problems, stat_tracking
from rail_interview.stat_tracking import presets

#: The config fields a resumed run may change: none of them changes what the
#: run computes (epochs, parameters, metrics), only how long it runs, how
#: often it writes, or how fast.
RESUMABLE_FIELDS = (
    "num_epochs",
    "log_every",
    "checkpoint_every",
    "num_threads",
    "stats_log.every",
    "stat_tracking.check_values",
)

#: ``config.stat_tracking``'s option fields, by the preset parameter each one sets.
TRACKER_FIELDS = {
    "memory": "memory",
    "fallback": "fallback",
    "buffer_size": "buffer_size",
    "min_count": "min_count",
    "ema_decay": "decay",
    "rho": "rho",
    "include_batch": "include_batch",
}

#: Option fields whose value means "the method's own": passed only when set
#: otherwise, and refused by a method that has no such option.
NEUTRAL_VALUES = {"memory": "none", "fallback": "auto", "include_batch": True}

#: Fields later versions added, with the value that reads an earlier run's
#: config.json as it ran (``upgrade_saved_config``).
ADDED_FIELDS = {
    "stat_tracking.rho": 0.9,
    "stat_tracking.include_batch": True,
    "prompt_sampler.rule": "none",
    "prompt_sampler.epsilon": 0.05,
    "prompt_sampler.p_easy": 0.5,
    "prompt_sampler.p_hard": 0.5,
    "prompt_sampler.min_keep": 0.01,
}

#: ``config.prompt_sampler.rule``'s values: "none" (the problem draws its prompts) or a sampler rule.
SAMPLER_RULES = ("none", *stat_tracking.sampling.RULES)


#: The values of ``config.stat_tracking.memory``, for the methods that take one.
MEMORIES = stat_tracking.memory.MEMORIES


def memory_methods() -> Tuple[str, ...]:
    """The registry's methods that take ``config.stat_tracking.memory`` (the GRPO family: grpo, dr_grpo, rloo)."""
    return tuple(name for name in presets.names() if "memory" in presets.parameters(name))


def single_reward_methods() -> Tuple[str, ...]:
    """The registry's methods a training run can use: one reward per sample, no sample weights.

    The toy problem scores each answer with one reward and has no response
    lengths, so the presets of several rewards (``verl_gdpo``,
    ``nemo_rl_gdpo``, ``flow_factory_gdpo``) and of length-weighted samples
    (``verl_opo``) are for other trainers (``docs/several_rewards.md``).
    """
    return tuple(name for name in presets.names() if _takes_one_plain_reward(name))


@functools.lru_cache(maxsize=None)
def _takes_one_plain_reward(name: str) -> bool:
    """Whether preset ``name``'s tracker, with its defaults, takes one reward per sample and no weights."""
    tracker = presets.get(name, 1)
    return tracker.num_rewards == 1 and not (tracker.weighted_stats or tracker.weighted_normalize)


class ConfigError(ValueError):
    """A config value training cannot use, or a change a resume may not make; the message names the field."""


def resolve_device(name: str) -> torch.device:
    """Turns the config's device name into a torch device.

    Args:
        name: "auto" (CUDA when available, else CPU), "cpu" or "cuda".

    Returns:
        The device.

    Raises:
        ConfigError: for another name, or "cuda" without a GPU.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name not in ("cpu", "cuda"):
        raise ConfigError(f"config.device must be 'auto', 'cpu' or 'cuda', got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("config.device is 'cuda' but torch sees no CUDA device: use 'auto' or 'cpu'")
    return stat_tracking.resolve_device(name)


def method_name(config: ml_collections.ConfigDict) -> str:
    """A run's method with its memory, as in run directory names: ``"buffer"``, ``"grpo"``, ``"rloo+ema"``.

    Args:
        config: the ``stat_tracking`` section of the training config.

    Returns:
        ``method``, followed by ``+memory`` where the memory is not ``"none"``.
    """
    memory = config.get("memory", "none")
    return config.method if memory == "none" else f"{config.method}+{memory}"


def tracker_options(config: ml_collections.ConfigDict) -> Dict[str, Any]:
    """The keywords that ``config.stat_tracking`` passes to its method's preset.

    Args:
        config: the ``stat_tracking`` section of the training config.

    Returns:
        ``{parameter: value}`` for each option field the preset names (see
        the module docstring), ``ema_decay`` as ``decay``.

    Raises:
        ConfigError: for an unknown method, one the toy problem cannot feed
            (``single_reward_methods``), or a ``memory`` or ``fallback``
            other than the neutral value for a method without that option.
    """
    trainable = single_reward_methods()
    if config.method in presets.names() and config.method not in trainable:
        raise ConfigError(
            f"config.stat_tracking.method {config.method!r} takes several rewards per sample or sample weights "
            "(response lengths), which this toy problem does not give; it is for other trainers "
            f"(docs/several_rewards.md). Choose from {', '.join(map(repr, trainable))}"
        )
    if config.method not in trainable:
        raise ConfigError(
            f"unknown config.stat_tracking.method {config.method!r}; choose from {', '.join(map(repr, trainable))}"
        )
    parameters = presets.parameters(config.method)
    options = {}
    for field, parameter in TRACKER_FIELDS.items():
        value = config.get(field, NEUTRAL_VALUES.get(field))
        if field in NEUTRAL_VALUES and value == NEUTRAL_VALUES[field]:
            continue
        if parameter in parameters:
            options[parameter] = value
        elif field in NEUTRAL_VALUES:
            raise ConfigError(
                f"config.stat_tracking.{field}={value!r} does not apply to method {config.method!r}, which has "
                f"its own; leave it {NEUTRAL_VALUES[field]!r} (methods that take it: "
                f"{', '.join(repr(m) for m in presets.names() if parameter in presets.parameters(m))})"
            )
    return options


def build_tracker(
    config: ml_collections.ConfigDict,
    *,
    num_prompts: int,
    device: torch.device,
    process_group: Optional["torch.distributed.ProcessGroup"] = None,
    track_streaks: bool = False,
) -> stat_tracking.AdvantageTracker:
    """Builds the tracker that ``config.method`` names, with the section's options (see the module docstring).

    "buffer", "ema" and "batch" are this project's trackers; "grpo",
    "dr_grpo" and "rloo" are verl's estimators, with an optional per-prompt
    ``memory`` ("buffer", "ema" or "beta") and, below ``min_count`` rewards, the
    ``fallback`` "zero" (TRL's rule for a group of one) unless set to "raw"
    (verl's) or "batch" (DDPO's). ``presets`` documents each.

    Args:
        config: the ``stat_tracking`` section of the training config.
        num_prompts: P.
        device: where the tracker's state lives.
        process_group: ranks that share the tracker's statistics, or None.
        track_streaks: keep each prompt's zero-variance streak (what
            ``prompt_sampler.rule`` "greso" reads); the method's preset must
            take the option.

    Returns:
        The tracker.

    Raises:
        ConfigError: for an unknown method, an option it refuses, or an
            option value out of range (the message names the field).
    """
    options = tracker_options(config)
    if track_streaks:
        takes = [m for m in presets.names() if "track_streaks" in presets.parameters(m) or m == "spo"]
        if config.method not in takes:
            raise ConfigError(
                f"config.prompt_sampler.rule 'greso' reads each prompt's zero-variance streak, which method "
                f"{config.method!r} does not keep; use one of {', '.join(map(repr, takes))}"
            )
        options["track_streaks"] = True
    try:
        return presets.get(
            config.method,
            num_prompts,
            **options,
            device=device,
            check_values=config.check_values,
            process_group=process_group,
        )
    except (TypeError, ValueError) as error:
        raise ConfigError(f"config.stat_tracking (method {config.method!r}): {error}") from error


def build_sampler(config: ml_collections.ConfigDict, *, device: torch.device) -> Optional[stat_tracking.PromptSampler]:
    """The prompt sampler that ``config.prompt_sampler`` names, or None for the problem's own draws.

    Its pool is every prompt id, its seed the run's, and it checks the
    weights it draws by as the tracker checks its inputs
    (``stat_tracking.check_values``).

    Args:
        config: a checked training config.
        device: where the tracker lives (the sampler's pool and state go there too).

    Returns:
        The sampler, or None with rule "none".
    """
    sampling = config.get("prompt_sampler", {})
    rule = sampling.get("rule", "none")
    if rule == "none":
        return None
    return stat_tracking.PromptSampler(
        torch.arange(config.problem.num_prompts, device=device),
        rule,
        seed=config.seed,
        check_values=config.stat_tracking.check_values,
        **{name: sampling[name] for name in ("epsilon", "p_easy", "p_hard", "min_keep")},
    )


def _check_sampler(config: ml_collections.ConfigDict) -> None:
    """Checks ``config.prompt_sampler``: its rule, a trial build, and a problem whose prompts come in groups.

    Raises:
        ConfigError: naming the field.
    """
    sampling = config.get("prompt_sampler")
    if sampling is None:
        return
    rule = sampling.get("rule", "none")
    if rule not in SAMPLER_RULES:
        raise ConfigError(
            f"config.prompt_sampler.rule must be one of {', '.join(map(repr, SAMPLER_RULES))}, got {rule!r}"
        )
    if rule == "none":
        return
    if not problems.get(problems.problem_name(config)).samples_per_prompt(config):
        raise ConfigError(
            f"config.prompt_sampler.rule {rule!r} chooses a step's prompts, which needs a problem that samples "
            f"each chosen prompt G times (problem 'pass_fail'); problem {problems.problem_name(config)!r} draws "
            "its own: leave the rule 'none'"
        )
    try:
        build_sampler(config, device=torch.device("cpu"))  # a trial build: its options' own checks
    except (TypeError, ValueError) as error:
        raise ConfigError(f"config.prompt_sampler: {error}") from error


def _check_number(name: str, value: Any, low: float, *, integer: bool, inclusive: bool = True) -> None:
    """Raises ConfigError unless ``config.<name>`` is a finite int (or number) >= ``low`` (> if not inclusive)."""
    kind = "an int" if integer else "a number"
    if (
        isinstance(value, bool)
        or not isinstance(value, int if integer else (int, float))
        or not math.isfinite(value)
        or value < low
        or (not inclusive and value == low)
    ):
        bound = f">= {low}" if inclusive else f"> {low}"
        raise ConfigError(f"config.{name} must be {kind} {bound}, got {value!r}")


def _check_tracker(config: ml_collections.ConfigDict) -> None:
    """Checks ``config.stat_tracking``: its numbers, a trial build of its tracker, and its memory against the problem.

    A buffer shorter than a prompt's samples in one step (the pass/fail
    problem's G: the ranks' prompts are distinct) keeps only the last of
    them; with a std to divide by, a pass left out of a window of fails gets
    the advantage 1 / 1e-6. So does a pass read against a buffer or EMA of
    fails from before the step (``include_batch=False``).

    Raises:
        ConfigError: naming the field.
    """
    tracking = config.stat_tracking
    _check_number("stat_tracking.buffer_size", tracking.buffer_size, 1, integer=True)
    _check_number("stat_tracking.min_count", tracking.min_count, 1, integer=True)
    decay = tracking.ema_decay
    if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0 < decay < 1:
        raise ConfigError(f"config.stat_tracking.ema_decay must lie in (0, 1), got {decay!r}")
    rho = tracking.get("rho", ADDED_FIELDS["stat_tracking.rho"])
    if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not 0 < rho <= 1:
        raise ConfigError(f"config.stat_tracking.rho must lie in (0, 1], got {rho!r}")
    if not isinstance(tracking.get("include_batch", True), bool):
        raise ConfigError(f"config.stat_tracking.include_batch must be a bool, got {tracking.include_batch!r}")
    greso = config.get("prompt_sampler", {}).get("rule", "none") == "greso"
    with warnings.catch_warnings():  # a trial build: the run's own build warns
        warnings.simplefilter("ignore")
        tracker = build_tracker(tracking, num_prompts=1, device=torch.device("cpu"), track_streaks=greso)
    if tracker.scale == "prompt_std" and not tracker.include_batch:
        raise ConfigError(
            f"config.stat_tracking.include_batch=False with memory {tracker.memory!r} and method "
            f"{tracking.method!r}, which divides by the prompt's std: a pass after a run of fails meets a "
            "remembered std near 0 (exactly 0 for a buffer or EMA of fails, and for a Beta memory once p "
            "rounds to 0) and gets an advantage up to 1 / 1e-6 (the pass/fail study's such rows collapse). "
            "Use a method without a std ('dr_grpo', 'rloo', 'spo'), or include_batch=True"
        )
    rule = config.get("prompt_sampler", {}).get("rule", "none")
    if rule not in ("none", "uniform") and tracker.memory == "none":
        raise ConfigError(
            f"config.prompt_sampler.rule {rule!r} weighs prompts by what the tracker's memory holds, and method "
            f"{tracking.method!r} with memory 'none' holds nothing: every weight would be equal. Give the "
            "method a memory (stat_tracking.memory), or use rule 'uniform'"
        )
    samples = problems.get(problems.problem_name(config)).samples_per_prompt(config)
    if rule == "greso" and samples == 1:
        raise ConfigError(
            "config.prompt_sampler.rule 'greso' skips prompts whose visits had all-equal rewards, and with "
            "config.problem.group_size 1 every visit has one reward: every prompt's streak would only grow"
        )
    if tracker.memory == "buffer" and tracker.scale == "prompt_std" and samples and tracking.buffer_size < samples:
        raise ConfigError(
            f"config.stat_tracking.buffer_size ({tracking.buffer_size}) must be at least "
            f"config.problem.group_size ({samples}), a prompt's samples in one step: a shorter buffer keeps only "
            "the last of them, and a pass left out of a window of fails gets the advantage 1 / 1e-6 (the "
            "pass/fail study's K < G rows collapse)"
        )


def validate_config(config: ml_collections.ConfigDict, *, world_size: int = 1) -> None:
    """Checks every value training reads, before any work, with messages that name the field.

    Args:
        config: a training config (``configs/default.py``).
        world_size: processes that train together (each samples its own batch).

    Raises:
        ConfigError: naming the first field with a value training cannot
            use, and the values it can.
    """
    for name in ("num_epochs", "log_every", "sample_batch_size"):
        _check_number(name, config[name], 1, integer=True)
    _check_number("checkpoint_every", config.checkpoint_every, 0, integer=True)
    if config.checkpoint_every % config.log_every:
        raise ConfigError(
            f"config.checkpoint_every ({config.checkpoint_every}) must be 0 or a multiple of config.log_every "
            f"({config.log_every}), so that checkpoints fall where metrics are written"
        )
    _check_number("num_threads", config.get("num_threads", 0), 0, integer=True)
    _check_number("learning_rate", config.learning_rate, 0, integer=False, inclusive=False)
    _check_number("stats_log.every", config.stats_log.every, 0, integer=True)
    _check_number("stats_log.max_prompts", config.stats_log.max_prompts, 1, integer=True)
    try:
        problems.check_config(config, world_size=world_size)
    except ValueError as error:
        raise ConfigError(str(error)) from error
    _check_sampler(config)
    _check_tracker(config)
    resolve_device(config.device)


def _flatten(config: Any, prefix: str = "") -> Dict[str, Any]:
    """A config (or its JSON dict) as dotted field names to values."""
    items = config.items() if hasattr(config, "items") else []
    flat: Dict[str, Any] = {}
    for name, value in items:
        if hasattr(value, "items"):
            flat.update(_flatten(value, f"{prefix}{name}."))
        else:
            flat[f"{prefix}{name}"] = value
    return flat


def upgrade_saved_config(saved: Dict[str, Any]) -> Dict[str, Any]:
    """A run's config.json as today's fields say it, for runs written by earlier versions.

    Runs written before ``problem.name`` existed trained the distance
    problem. Fields added since (``ADDED_FIELDS``) get the value that
    computes what those runs computed. Runs written before ``stat_tracking.fallback`` took ``"auto"``
    saved a fallback for every method, which only the GRPO family read: a
    method without a fallback of its own reads ``"auto"`` now.

    Args:
        saved: the parsed config.json; modified in place.

    Returns:
        ``saved``.
    """
    saved.setdefault("problem", {}).setdefault("name", "distance")
    for name, value in ADDED_FIELDS.items():
        section, field = name.split(".")
        saved.setdefault(section, {}).setdefault(field, value)
    tracking = saved.get("stat_tracking", {})
    method = tracking.get("method")
    if "fallback" in tracking and method in presets.names() and "fallback" not in presets.parameters(method):
        tracking["fallback"] = NEUTRAL_VALUES["fallback"]
    return saved


def check_resume_config(saved: Dict[str, Any], config: ml_collections.ConfigDict) -> None:
    """Refuses a resume whose config changes a field other than ``RESUMABLE_FIELDS``.

    Args:
        saved: the run's config.json, as a dict.
        config: the config the resume would run with.

    Raises:
        ConfigError: naming the first changed field, its two values and the
            fields a resume may change.
    """
    before = _flatten(upgrade_saved_config(json.loads(json.dumps(saved))))
    after = _flatten(json.loads(config.to_json()))
    for name in sorted(set(before) | set(after)):
        if name in RESUMABLE_FIELDS or before.get(name) == after.get(name):
            continue
        raise ConfigError(
            f"a resume cannot change config.{name} ({before.get(name, 'absent')!r} -> {after.get(name, 'absent')!r}): "
            f"the checkpoint was made with the run's own value. A resume may change only "
            f"{', '.join(RESUMABLE_FIELDS)}; start a new run to change the rest"
        )


def load_run_config(run_dir: str, overrides: Optional[Dict[str, Any]] = None) -> ml_collections.ConfigDict:
    """Returns the config a run was started with, with ``overrides`` applied.

    ``scripts/train.py --resume`` uses it: the run's own config.json, plus the
    fields given on the command line (typically a larger ``num_epochs``).

    Args:
        run_dir: a run directory written by ``train``.
        overrides: dotted field paths to values, e.g. ``{"num_epochs": 2000}``.

    Returns:
        The config.

    Raises:
        FileNotFoundError: if ``run_dir`` holds no config.json.
        KeyError: if an override names a field the config lacks.
    """
    path = os.path.join(run_dir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{run_dir!r} holds no config.json: pass the run directory that train.py printed")
    with open(path, encoding="utf-8") as f:
        saved = upgrade_saved_config(json.load(f))
    return configs.apply_overrides(ml_collections.ConfigDict(saved), overrides or {})
