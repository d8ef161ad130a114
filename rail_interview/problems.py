"""The training problems, by name: ``config.problem.name`` chooses one.

* ``"distance"`` (``toy_problem``, ``configs/default.py``): the original
  task's problem. Rewards ``-|answer - label|``, prompts drawn with
  replacement, each reading one slot of the parameter vector.
* ``"pass_fail"`` (``pass_fail_problem``, ``configs/pass_fail.py``):
  rewards in {0, 1}, G samples of each of N / G distinct prompts per step
  as GRPO trainers sample, one weight vector shared by all prompts.

``training.train`` reaches a problem only through what both offer:

* the problem: ``prompt_names`` and ``num_prompts``;
  ``sample_prompt_ids(N, generator, rank=, world_size=) -> int64 [N]``,
  with ``shares_prompt_draws`` saying whether the ranks draw with one
  generator seeded alike and keep a slice each (the pass/fail problem's
  distinct prompts) or each with its own (the distance problem's);
  ``rewards(prompt_ids, answers) -> float32 [N]``; ``metric_names``, the
  columns it adds to metrics.csv, and ``metrics(policy, prompt_ids,
  rewards) -> float32 [len(metric_names)]``, computed on the device after
  each step;
* the policy: ``params`` (one float32 tensor, what a checkpoint saves),
  ``sample(prompt_ids, generator) -> float32 [N]`` and ``update(prompt_ids,
  answers, advantages, learning_rate)``.

A new problem is a module with these, one entry in ``PROBLEMS``, its
options in ``_OPTIONS`` and its checks in ``check_config``.
"""

from __future__ import annotations

import math
from typing import Any, Tuple

import ml_collections
import torch

from rail_interview.pass_fail_problem import PROBLEM_OPTIONS, make_pass_fail_problem
from rail_interview.toy_problem import make_toy_problem

#: Problem names, the values ``config.problem.name`` may take.
PROBLEMS = ("distance", "pass_fail")

#: A run whose final_reward is below this stalled or diverged (``scripts/compare.py``'s default
#: ``--bad_threshold``, and the floor ``benchmarks/gpu_check.py`` holds full-length runs to). On
#: the distance problem, -20 is far from its -1 to -5 at best and its starts near -100. On the
#: pass/fail problem, 0.2 is twice the mean pass rate runs start at (about 0.1) and 40% of a
#: typical ceiling (0.44 to 0.54 over seeds 0 to 9).
BAD_FINAL_REWARD = {"distance": -20.0, "pass_fail": 0.2}

#: Each problem's fields of ``config.problem`` besides ``name``.
_OPTIONS = {
    "distance": ("num_prompts", "num_params"),
    "pass_fail": ("num_prompts", "num_params", *PROBLEM_OPTIONS),
}


def problem_name(config: ml_collections.ConfigDict) -> str:
    """The problem a config trains: ``config.problem.name``, or ``"distance"`` in configs written before it existed.

    Args:
        config: a training config.

    Returns:
        One of ``PROBLEMS`` (unchecked: ``check_config`` checks it).
    """
    return config.problem.get("name", "distance")


def check_config(config: ml_collections.ConfigDict, *, world_size: int = 1) -> None:
    """Checks ``config.problem``, and the batch size and buffer against it, with messages that name the field.

    Args:
        config: a training config, whose ``stat_tracking`` fields are
            already checked (``training.validate_config`` calls this last).
        world_size: processes that train together; each samples its own
            batch of ``sample_batch_size``, the pass/fail problem's ranks
            from distinct prompts.

    Raises:
        ValueError: naming the first field the problem cannot use (or does
            not have), and what it allows.
    """
    name = problem_name(config)
    if name not in PROBLEMS:
        raise ValueError(f"unknown config.problem.name {name!r}; choose from {', '.join(map(repr, PROBLEMS))}")
    problem = config.problem
    for field in _OPTIONS[name]:
        if field not in problem:
            raise ValueError(f"config.problem.{field} is missing: problem {name!r} needs it")
    for field in problem:
        if field != "name" and field not in _OPTIONS[name]:
            raise ValueError(
                f"config.problem.{field} is not a field of problem {name!r}, whose fields are "
                f"{', '.join(_OPTIONS[name])}: was another problem meant?"
            )

    def positive(field: str, value: Any, *, integer: bool) -> None:
        """Raises unless ``value`` is a finite int (or number) > 0."""
        kind = "an int" if integer else "a number"
        if (
            isinstance(value, bool)
            or not isinstance(value, int if integer else (int, float))
            or not math.isfinite(value)
            or value <= 0
        ):
            raise ValueError(f"config.{field} must be {kind} > 0, got {value!r}")

    positive("problem.num_prompts", problem.num_prompts, integer=True)
    positive("problem.num_params", problem.num_params, integer=True)
    if name == "pass_fail":
        positive("problem.group_size", problem.group_size, integer=True)
        for field in ("tolerance", "min_sigma", "max_sigma", "label_scale"):
            positive(f"problem.{field}", problem[field], integer=False)
        if problem.min_sigma > problem.max_sigma:
            raise ValueError(
                f"config.problem.min_sigma ({problem.min_sigma}) must be at most config.problem.max_sigma "
                f"({problem.max_sigma})"
            )
        size, group = config.sample_batch_size, problem.group_size
        if not isinstance(size, int) or size % group or size // group * world_size > problem.num_prompts:
            ranks = f" across the {world_size} processes" if world_size > 1 else ""
            raise ValueError(
                f"config.sample_batch_size ({size!r}) must be a multiple of config.problem.group_size ({group}) "
                f"with at most config.problem.num_prompts ({problem.num_prompts}) groups{ranks}: each step "
                "samples N / G distinct prompts, G times each"
            )
        # A buffer shorter than a prompt's samples in one step (G: the ranks' prompts are distinct)
        # keeps only the last of them; with a std to divide by, a pass left out of a window of fails
        # gets the advantage 1 / 1e-6.
        tracking = config.stat_tracking
        divides_by_std = tracking.method == "buffer" or (
            tracking.method == "grpo" and tracking.get("memory", "none") == "buffer"
        )
        if divides_by_std and tracking.buffer_size < group:
            raise ValueError(
                f"config.stat_tracking.buffer_size ({tracking.buffer_size}) must be at least "
                f"config.problem.group_size ({group}), a prompt's samples in one step: a shorter buffer keeps only "
                "the last of them, and a pass left out of a window of fails gets the advantage 1 / 1e-6 (the "
                "README's K < G rows collapse)"
            )


def make_problem(config: ml_collections.ConfigDict, generator: torch.Generator) -> Tuple[Any, Any]:
    """Draws the configured problem's instance and its policy at the start.

    Args:
        config: a training config, checked by ``check_config``.
        generator: the run's generator; its device is where everything lives.

    Returns:
        (problem, policy), as the module docstring describes them.
    """
    problem = config.problem
    if problem_name(config) == "pass_fail":
        return make_pass_fail_problem(
            num_prompts=problem.num_prompts,
            num_features=problem.num_params,
            generator=generator,
            **{option: problem[option] for option in PROBLEM_OPTIONS},
        )
    return make_toy_problem(num_prompts=problem.num_prompts, num_params=problem.num_params, generator=generator)
