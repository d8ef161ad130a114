"""Training problems as plugins: the ``Problem`` protocol and a registry that ``config.problem.name`` picks from.

Two problems ship with the package, one module each:

* ``"distance"`` (``distance.py``, ``configs/default.py``): the original
  task's problem. Rewards ``-|answer - label|``, prompts drawn with
  replacement, each reading one slot of the parameter vector.
* ``"pass_fail"`` (``pass_fail.py``, ``configs/pass_fail.py``): rewards in
  {0, 1}, G samples of each of N / G distinct prompts per step as GRPO
  trainers sample, one weight vector shared by all prompts.

A problem is what ``Problem`` and ``Policy`` describe, plus a ``ProblemSpec``
that tells training how to build it from a config: its fields of
``config.problem``, its checks, the final reward below which a run failed,
and how many samples of one prompt a step draws. Adding a problem is one
module that calls ``register(ProblemSpec(...))`` and one config file; the
training loop, the comparison and the checks need no edit (a test registers
a tiny third problem from its own file and trains it).

Dimensions: N samples per step (on one rank), P prompts.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Dict, List, Optional, Protocol, Tuple

import ml_collections
import torch


class Policy(Protocol):
    """What training asks of a problem's policy.

    Attributes:
        params: float32, one tensor: what a checkpoint saves and restores.
    """

    params: torch.Tensor

    def sample(self, prompt_ids: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Draws one answer per sample: int64 [N] ids -> float32 [N] answers."""

    def update(
        self, prompt_ids: torch.Tensor, answers: torch.Tensor, advantages: torch.Tensor, learning_rate: float
    ) -> None:
        """Takes one policy-gradient step in place from int64 [N] ids, float32 [N] answers and advantages."""


class Problem(Protocol):
    """What training asks of a problem instance.

    Attributes:
        prompt_names: P readable names; prompt id i is ``prompt_names[i]``.
        metric_names: the columns ``metrics`` adds to metrics.csv (may be empty).
        shares_prompt_draws: with several ranks, whether every rank draws a
            step's prompts with one generator seeded alike and keeps a slice
            (distinct prompts per rank, as GRPO trainers shard them), or each
            rank draws with its own.
    """

    prompt_names: List[str]
    metric_names: Tuple[str, ...]
    shares_prompt_draws: bool

    @property
    def num_prompts(self) -> int:
        """P."""

    def sample_prompt_ids(
        self, batch_size: int, generator: torch.Generator, *, rank: int = 0, world_size: int = 1
    ) -> torch.Tensor:
        """Draws one rank's prompts of a step: int64 [N] ids in [0, P)."""

    def rewards(self, prompt_ids: torch.Tensor, answers: torch.Tensor) -> torch.Tensor:
        """Scores answers: int64 [N] ids, float32 [N] answers -> float32 [N] rewards."""

    def metrics(self, policy: Any, prompt_ids: torch.Tensor, rewards: torch.Tensor) -> torch.Tensor:
        """The values of ``metric_names`` after a step, float32 [len(metric_names)], on the device (no host sync)."""


def _no_check(config: ml_collections.ConfigDict, world_size: int) -> None:
    """A problem without checks beyond its fields' presence and the positive sizes."""


def _unknown_samples_per_prompt(config: ml_collections.ConfigDict) -> Optional[int]:
    """A problem whose prompts are drawn with replacement: a prompt's samples per step vary."""
    return None


@dataclasses.dataclass(frozen=True)
class ProblemSpec:
    """A problem as training builds it from a config; ``register`` it to make ``config.problem.name`` find it.

    Attributes:
        name: the value of ``config.problem.name``.
        options: its fields of ``config.problem`` besides ``name``; every one
            is required, and no other is allowed. ``num_prompts`` must be one
            of them (an int > 0, checked here, as is ``num_params`` if named).
        make: ``(config.problem, generator) -> (problem, policy)``, drawing
            the instance and the policy at its start with the run's generator
            (whose device is where everything lives).
        bad_final_reward: a run whose final reward is below this stalled or
            diverged (``scripts/compare.py``'s default bad-run threshold, and
            the floor of the GPU check's full-length runs).
        check: ``(config, world_size) -> None``, the problem's own checks of
            ``config.problem`` and of ``sample_batch_size`` against it;
            raises ValueError naming the field.
        samples_per_prompt: ``config -> int or None``, how many samples of
            one prompt one step draws when that is fixed (the pass/fail
            problem's group size G), else None. The tracker's checks use it:
            a buffer shorter than that keeps only the last of them.
    """

    name: str
    options: Tuple[str, ...]
    make: Callable[[ml_collections.ConfigDict, torch.Generator], Tuple[Problem, Policy]]
    bad_final_reward: float
    check: Callable[[ml_collections.ConfigDict, int], None] = _no_check
    samples_per_prompt: Callable[[ml_collections.ConfigDict], Optional[int]] = _unknown_samples_per_prompt


_REGISTRY: Dict[str, ProblemSpec] = {}


def register(spec: ProblemSpec) -> ProblemSpec:
    """Adds a problem to the registry, so that ``config.problem.name = spec.name`` trains it.

    Args:
        spec: the problem.

    Returns:
        ``spec``.

    Raises:
        ValueError: if a problem of that name is registered already, or
            ``num_prompts`` is not among its options.
    """
    if spec.name in _REGISTRY:
        raise ValueError(f"a problem named {spec.name!r} is registered already")
    if "num_prompts" not in spec.options:
        raise ValueError(f"problem {spec.name!r}: options must name num_prompts, got {spec.options}")
    _REGISTRY[spec.name] = spec
    return spec


def names() -> Tuple[str, ...]:
    """The registered problems' names, the values ``config.problem.name`` may take."""
    return tuple(_REGISTRY)


def get(name: str) -> ProblemSpec:
    """The registered problem called ``name``.

    Raises:
        ValueError: for an unknown name, listing the known ones.
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown config.problem.name {name!r}; choose from {', '.join(map(repr, names()))}")
    return _REGISTRY[name]


def problem_name(config: ml_collections.ConfigDict) -> str:
    """The problem a config trains: ``config.problem.name``, or ``"distance"`` in configs written before it existed.

    Args:
        config: a training config.

    Returns:
        The name (unchecked: ``check_config`` checks it).
    """
    return config.problem.get("name", "distance")


def bad_final_reward(name: str) -> float:
    """The final reward below which a run of problem ``name`` stalled or diverged (``ProblemSpec.bad_final_reward``)."""
    return get(name).bad_final_reward


def check_positive(field: str, value: Any, *, integer: bool) -> None:
    """Raises ValueError unless ``config.<field>`` is a finite int (or number) > 0.

    Args:
        field: the field's dotted name after ``config.``, for the message.
        value: its value.
        integer: whether it must be an int.
    """
    kind = "an int" if integer else "a number"
    if (
        isinstance(value, bool)
        or not isinstance(value, int if integer else (int, float))
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ValueError(f"config.{field} must be {kind} > 0, got {value!r}")


def check_config(config: ml_collections.ConfigDict, *, world_size: int = 1) -> None:
    """Checks ``config.problem`` (and the batch size against it), with messages that name the field.

    Args:
        config: a training config.
        world_size: processes that train together, each sampling its own
            batch of ``sample_batch_size``.

    Raises:
        ValueError: naming the first field the problem cannot use (or does
            not have), and what it allows.
    """
    name = problem_name(config)
    spec = get(name)
    problem = config.problem
    for field in spec.options:
        if field not in problem:
            raise ValueError(f"config.problem.{field} is missing: problem {name!r} needs it")
    for field in problem:
        if field != "name" and field not in spec.options:
            raise ValueError(
                f"config.problem.{field} is not a field of problem {name!r}, whose fields are "
                f"{', '.join(spec.options)}: was another problem meant?"
            )
    for field in ("num_prompts", "num_params"):
        if field in spec.options:
            check_positive(f"problem.{field}", problem[field], integer=True)
    spec.check(config, world_size)


def make_problem(config: ml_collections.ConfigDict, generator: torch.Generator) -> Tuple[Problem, Policy]:
    """Draws the configured problem's instance and its policy at the start.

    Args:
        config: a training config, checked by ``check_config``.
        generator: the run's generator; its device is where everything lives.

    Returns:
        (problem, policy).
    """
    return get(problem_name(config)).make(config.problem, generator)


# The problems that ship with the package register themselves; imported last,
# as they import this module's ProblemSpec and register.
from rail_interview.problems import distance, pass_fail  # noqa: E402, F401
