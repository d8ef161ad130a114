"""The pass/fail problem's steps in process: one run, its learning curve and its summary, with DAPO and ablations.

``train_pass_fail(PassFailRun(...))`` trains ``problems.pass_fail``'s shared
linear policy as a GRPO-style trainer would: each step samples G answers
for each of B distinct prompts, scores them pass or fail, turns rewards into
advantages with a tracker of the GRPO family (with or without per-prompt
memory), and takes one REINFORCE step. It records the policy's true mean
pass rate after every step (from the closed-form pass probability, not the
noisy rewards), the share of the step's groups whose rewards are all equal
(zero variance: no signal for in-batch GRPO) and the samples spent.

The estimator is ``method``: ``"grpo"`` (``presets.verl_grpo``: group mean
and sample std), ``"dr_grpo"`` (no std) or ``"rloo"`` (leave-one-out
mean), with ``memory``: ``"none"`` (the group alone), ``"buffer"``,
``"ema"`` or ``"beta"`` (the prompt's recent rewards across steps, the
group included, or with ``include_batch=False`` the memory before the
step only); or ``"spo"`` (``presets.spo``: a Beta memory's pass rate
before the step as the baseline, advantages whitened over the batch; one
answer per prompt, G = 1, as SPO samples). ``sampler`` chooses each step's
prompts by a ``PromptSampler`` rule from what the tracker's memory says
(or, with ``selection_memory="beta"``, from a Beta memory kept beside an
estimator that has none: selection without the memory's baseline).
Each step is ``training.step``, the one ``training.train`` takes, so a run
is ``train()``'s run of the same config bit for bit
(``PassFailRun.from_config`` maps a config to a run), without the run
directory, checkpoint and logs that the study's thousands of short runs do
not need. Beyond them, two hooks of the step:

* ``dynamic_sampling`` (``DynamicSampling``, a draw): DAPO's alternative to memory. Groups whose rewards
  are all equal are dropped and more groups are drawn, up to
  ``max_resample`` times B, until B groups with signal fill the step; the
  samples drawn are all counted as spent. This is the group filter of
  verl's DAPO recipe (``algorithm.filter_groups`` with metric ``acc``:
  drop groups whose accuracy has std 0, generate again, keep the first B),
  with B groups per generation (verl's ``gen_batch_size`` may be larger).
  Where the cap is reached first, this trains on the groups it kept, where
  verl's ``max_num_gen_batches`` raises an error; and a prompt may come
  back in a later draw of the same step (its groups then merge, as the
  tracker groups by prompt id).
* ``ablation`` (an estimate), to name the mechanism by which memory helps:
  ``"zero_variance_only"``: the memory's advantages for zero-variance
  groups only, the group's own (in-batch) advantages elsewhere;
  ``"group_mean_memory_std"``: the group's mean as the baseline, the
  memory's std (ddof 1) as the scale (0 below ``min_count``);
  ``"oracle"``: the true pass probability p as the baseline and, for
  ``"grpo"``, sqrt(p (1 - p)) as the scale: what a perfect memory would give.

Dimensions: B groups (prompts) per step, G samples per group, N = B * G.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Dict, List, Optional

import ml_collections
import torch

from rail_interview import training
from rail_interview.problems.pass_fail import (
    PROBLEM_OPTIONS,
    PassFailProblem,
    SharedLinearPolicy,
    make_pass_fail_problem,
)
from rail_interview.stat_tracking import AdvantageTracker, PromptSampler
from rail_interview.training.state import Generators, TrainingState
from rail_interview.training.step import Estimate, Samples, draw_samples, step, tracker_advantages

#: Estimators: the registry's methods that take a memory (the GRPO family).
METHODS = training.memory_methods()
MEMORIES = training.config.MEMORIES
#: Every method a run takes: the GRPO family (with a memory) and SPO (its own Beta memory).
ALL_METHODS = (*METHODS, "spo")
ABLATIONS = ("none", "zero_variance_only", "group_mean_memory_std", "oracle")
#: ``sampler``'s values: "none" (the problem's own uniform draws) or a ``PromptSampler`` rule.
SAMPLERS = training.config.SAMPLER_RULES


@dataclasses.dataclass(frozen=True)
class PassFailRun:
    """The settings of one run.

    Attributes:
        method: ``"grpo"``, ``"dr_grpo"``, ``"rloo"`` or ``"spo"``.
        memory: ``"none"``, ``"buffer"``, ``"ema"`` or ``"beta"``
            (``"none"`` for ``"spo"``, which has its own).
        group_size: G, samples per prompt per step.
        num_groups: B, prompts per step.
        num_prompts: P; a prompt is revisited about every P / B steps.
        num_features: D, the shared weights.
        tolerance: an answer within this distance of the label passes.
        min_sigma: the smallest sampling std of a prompt.
        max_sigma: sampling stds are uniform in [min_sigma, max_sigma).
        label_scale: how far labels lie from the initial answers.
        learning_rate: the REINFORCE step size.
        num_steps: policy updates.
        seed: the one generator's seed: problem, answers and sampling.
        buffer_size: K, with ``memory="buffer"``.
        ema_decay: with ``memory="ema"``.
        rho: the Beta memory's discount (``memory="beta"``, ``"spo"``,
            ``selection_memory="beta"``).
        include_batch: False takes a prompt's baseline and scale from its
            memory before the step (with a memory of the GRPO family).
        min_count: rewards a prompt's memory needs before its own statistics
            are used (with a memory); below it, the group's advantage is 0.
        sampler: ``"none"`` or a ``PromptSampler`` rule choosing each
            step's B prompts of the P (``config.prompt_sampler.rule``).
        selection_memory: ``"none"``: the sampler reads the run's tracker;
            ``"beta"``: a Beta memory kept beside it, updated with every
            batch, which the sampler reads (for an estimator without memory).
        dynamic_sampling: drop zero-variance groups and draw more (DAPO).
        max_resample: with ``dynamic_sampling``, the most groups drawn per
            step, as a multiple of B.
        ablation: ``"none"`` or one of ``ABLATIONS`` (see the module
            docstring); the first two need a memory.
    """

    method: str = "grpo"
    memory: str = "none"
    group_size: int = 4
    num_groups: int = 16
    num_prompts: int = 64
    num_features: int = 8
    tolerance: float = 1.0
    min_sigma: float = 0.5
    max_sigma: float = 3.0
    label_scale: float = 8.0
    learning_rate: float = 5.0
    num_steps: int = 300
    seed: int = 0
    buffer_size: int = 32
    ema_decay: float = 0.9
    rho: float = 0.9
    include_batch: bool = True
    min_count: int = 4
    sampler: str = "none"
    selection_memory: str = "none"
    dynamic_sampling: bool = False
    max_resample: int = 4
    ablation: str = "none"

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict, **changes: Any) -> "PassFailRun":
        """The run ``training.train`` makes of a pass/fail config (one process), with ``changes``.

        Args:
            config: a training config with ``problem.name == "pass_fail"``
                (``configs/pass_fail.py``) and a method of the GRPO family.
            **changes: fields to set besides (``dynamic_sampling``,
                ``ablation``, ``learning_rate``, ...).

        Returns:
            The run.

        Raises:
            training.ConfigError: if ``training.validate_config`` refuses the
                config, or it is not the pass/fail problem with fallback
                "auto" or "zero" and a method of the GRPO family or "spo".
        """
        training.validate_config(config)
        problem, tracking = config.problem, config.stat_tracking
        if (
            problem.get("name") != "pass_fail"
            or tracking.get("fallback", "auto") not in ("auto", "zero")
            or tracking.method not in ALL_METHODS
        ):
            raise training.ConfigError(
                "a PassFailRun is made of a config with problem.name 'pass_fail', stat_tracking.fallback 'auto' or "
                f"'zero' and a stat_tracking.method of {', '.join(map(repr, ALL_METHODS))} (configs/pass_fail.py), "
                f"got {problem.get('name')!r}, {tracking.get('fallback')!r} and {tracking.method!r}"
            )
        run = cls(
            method=tracking.method,
            memory=tracking.memory,
            group_size=problem.group_size,
            num_groups=config.sample_batch_size // problem.group_size,
            num_prompts=problem.num_prompts,
            num_features=problem.num_params,
            tolerance=problem.tolerance,
            min_sigma=problem.min_sigma,
            max_sigma=problem.max_sigma,
            label_scale=problem.label_scale,
            learning_rate=config.learning_rate,
            num_steps=config.num_epochs,
            seed=config.seed,
            buffer_size=tracking.buffer_size,
            ema_decay=tracking.ema_decay,
            rho=tracking.rho,
            include_batch=tracking.include_batch,
            min_count=tracking.min_count,
            sampler=config.prompt_sampler.rule,
        )
        return dataclasses.replace(run, **changes)


def build_tracker(run: PassFailRun) -> AdvantageTracker:
    """The run's tracker, as ``training.build_tracker`` builds it: its method's preset, with its memory.

    Args:
        run: the settings.

    Returns:
        The tracker, over ``num_prompts`` prompt ids, on the CPU; for the
        GRPO family with fallback "zero" (a prompt below its min_count gets
        advantage 0). It keeps zero-variance streaks where the sampler's
        rule is "greso".

    Raises:
        ValueError: for an unknown method or memory.
    """
    if run.method not in ALL_METHODS:
        raise ValueError(f"method must be one of {', '.join(map(repr, ALL_METHODS))}; got {run.method!r}")
    if run.memory not in MEMORIES:
        raise ValueError(f"memory must be one of {', '.join(map(repr, MEMORIES))}; got {run.memory!r}")
    config = ml_collections.ConfigDict(
        {
            "method": run.method,
            "memory": run.memory,
            "buffer_size": run.buffer_size,
            "min_count": run.min_count,
            "ema_decay": run.ema_decay,
            "rho": run.rho,
            "include_batch": run.include_batch,
            "fallback": "auto" if run.method == "spo" else "zero",
            "check_values": False,
        }
    )
    streaks = run.sampler == "greso" and run.selection_memory == "none"
    with warnings.catch_warnings():
        # The study's rows of a buffer or EMA read before the step show the collapse the tracker warns of.
        warnings.filterwarnings("ignore", message="include_batch=False with a prompt std")
        return training.build_tracker(
            config, num_prompts=run.num_prompts, device=torch.device("cpu"), track_streaks=streaks
        )


def build_sampler(run: PassFailRun) -> Optional[PromptSampler]:
    """The run's prompt sampler (``training.build_sampler``'s, on the CPU), or None for the problem's draws.

    Args:
        run: the settings.

    Returns:
        A ``PromptSampler`` over the P prompt ids, seeded with the run's seed, or None.

    Raises:
        ValueError: for an unknown rule or selection memory, or a selection memory without a sampler.
    """
    if run.sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {', '.join(map(repr, SAMPLERS))}; got {run.sampler!r}")
    if run.selection_memory not in ("none", "beta"):
        raise ValueError(f"selection_memory must be 'none' or 'beta'; got {run.selection_memory!r}")
    if run.sampler == "none":
        if run.selection_memory != "none":
            raise ValueError("selection_memory feeds a sampler: set sampler to a rule")
        return None
    # As training.build_sampler builds it from configs/pass_fail.py, whose rule options are the defaults.
    return PromptSampler(torch.arange(run.num_prompts), run.sampler, seed=run.seed, check_values=False)


@dataclasses.dataclass(frozen=True)
class DynamicSampling:
    """DAPO's draw (a ``step`` hook): groups are drawn B at a time until B with a pass and a fail are kept.

    B = N / G groups of G samples (the problem's ``group_size``) are drawn
    at a time; the last draw's extra groups are dropped, and after
    ``max_resample * B`` groups drawn the step trains on the groups it kept
    (maybe none).

    Attributes:
        max_resample: the most groups drawn per step, as a multiple of B.
    """

    max_resample: int

    def __call__(self, state: TrainingState, batch_size: int) -> Samples:
        """Draws the step's samples (``training.step.Draw``), with the groups drawn and those with signal."""
        group_size = state.problem.group_size  # G
        num_groups = batch_size // group_size  # B
        kept: List[Samples] = []
        drawn, with_signal = 0, 0
        while True:
            samples = draw_samples(state, batch_size)
            grouped = samples.rewards.view(-1, group_size)
            signal = grouped.amax(1) != grouped.amin(1)  # [B], groups with a pass and a fail
            with_signal += int(signal.sum())
            keep = signal.repeat_interleave(group_size)
            kept.append(Samples(samples.prompt_ids[keep], samples.answers[keep], samples.rewards[keep]))
            drawn += num_groups
            if sum(len(part.prompt_ids) for part in kept) >= batch_size or drawn >= self.max_resample * num_groups:
                break
        ids, answers, rewards = (
            torch.cat([getattr(part, name) for part in kept])[:batch_size]
            for name in ("prompt_ids", "answers", "rewards")
        )
        return Samples(ids, answers, rewards, groups_drawn=drawn, groups_with_signal=with_signal)


def _estimate(run: PassFailRun, problem: PassFailProblem, policy: SharedLinearPolicy) -> Estimate:
    """The run's ``step`` hook from rewards to advantages: the tracker's, or an ablation's."""
    if run.ablation == "none":
        return tracker_advantages
    if run.ablation == "oracle":

        def oracle(tracker: AdvantageTracker, samples: Samples) -> torch.Tensor:
            """The true pass probability p as the baseline and, for GRPO, sqrt(p (1 - p)) as the scale."""
            passing = problem.pass_probability(policy.means(samples.prompt_ids), samples.prompt_ids)  # [N], p
            numerator = samples.rewards - passing
            if run.method == "grpo":
                numerator = numerator / (torch.sqrt(passing * (1 - passing)) + 1e-6)
            return numerator

        return oracle
    in_batch = build_tracker(dataclasses.replace(run, memory="none"))  # the same estimator without memory

    def ablation(tracker: AdvantageTracker, samples: Samples) -> torch.Tensor:
        """The memory's advantages mixed with the group's own (see the module docstring)."""
        ids, rewards = samples.prompt_ids, samples.rewards
        report = tracker.update_with_report(ids, rewards)
        group = in_batch.update_with_report(ids, rewards)
        if run.ablation == "zero_variance_only":
            return torch.where(group.zero_variance, report.advantages, group.advantages)
        stats = tracker.stats(ids)  # after the update: the batch included
        count = stats.count.float()
        std = stats.std * torch.sqrt(count / (count - 1).clamp_min(1))  # ddof 1, as the group's std
        total = torch.zeros(run.num_prompts).index_add_(0, ids, rewards)
        size = torch.zeros(run.num_prompts).index_add_(0, ids, torch.ones_like(rewards))
        deviation = rewards - (total / size.clamp_min(1))[ids]  # from the group's mean
        return torch.where(count >= run.min_count, deviation / (std + 1e-6), 0.0)

    return ablation


def _with_selection_memory(estimate: Estimate, selection: AdvantageTracker) -> Estimate:
    """``estimate``, with every batch also folded into the Beta memory the sampler reads."""

    def estimate_and_remember(tracker: AdvantageTracker, samples: Samples) -> torch.Tensor:
        """The run's advantages; the selection memory takes the batch in (its advantages unused)."""
        selection.update(samples.prompt_ids, samples.rewards)
        return estimate(tracker, samples)

    return estimate_and_remember


def train_pass_fail(run: PassFailRun) -> Dict[str, Any]:
    """Trains one run and returns its learning curve and summary.

    Each step is ``training.step``, the step ``train()`` takes, with the
    run's hooks: DAPO's draw (``DynamicSampling``) and the ablations'
    advantages.

    Args:
        run: the settings.

    Returns:
        ``pass_rate`` (float list [num_steps + 1], the true mean pass rate
        over prompts, before the first step and after each),
        ``zero_variance`` (float list [num_steps], the share of each step's
        drawn groups with all rewards equal), ``samples`` (int list
        [num_steps], samples drawn per step), ``ceiling`` (the best mean
        pass rate one weight vector reaches) and ``settings``.

    Raises:
        ValueError: for an unknown ablation, one that needs a memory without one, or dynamic sampling with a
            prompt sampler.
    """
    if run.ablation not in ABLATIONS:
        raise ValueError(f"ablation must be one of {', '.join(map(repr, ABLATIONS))}; got {run.ablation!r}")
    if run.dynamic_sampling and run.sampler != "none":
        raise ValueError("dynamic_sampling draws again from an unchanged memory: use it with sampler 'none'")
    if run.ablation in ("zero_variance_only", "group_mean_memory_std") and run.memory == "none":
        raise ValueError(f"ablation {run.ablation!r} needs a memory ('buffer', 'ema' or 'beta')")
    generator = torch.Generator().manual_seed(run.seed)
    problem, policy = make_pass_fail_problem(
        num_prompts=run.num_prompts,
        num_features=run.num_features,
        generator=generator,
        **{option: getattr(run, option) for option in PROBLEM_OPTIONS},
    )
    sampler = build_sampler(run)
    state = TrainingState(problem, policy, build_tracker(run), Generators(generator, generator), sampler=sampler)
    draw = DynamicSampling(run.max_resample) if run.dynamic_sampling else draw_samples
    estimate = _estimate(run, problem, policy)
    if run.selection_memory == "beta":
        state.selection = AdvantageTracker(
            run.num_prompts, "beta", decay=run.rho, track_streaks=run.sampler == "greso", check_values=False
        )
        estimate = _with_selection_memory(estimate, state.selection)
    pass_rate = [float(problem.pass_probability(policy.means()).mean())]
    zero_variance: List[float] = []
    samples: List[int] = []
    for _ in range(run.num_steps):
        batch = step(
            state,
            batch_size=run.num_groups * run.group_size,
            learning_rate=run.learning_rate,
            draw=draw,
            estimate=estimate,
        )
        # As training.train computes them: the pass rate after the step, the batch's zero-variance groups.
        rate, fraction = problem.metrics(policy, batch.prompt_ids, batch.rewards).tolist()
        drawn = batch.local.groups_drawn or run.num_groups
        zero_variance.append(1.0 - batch.local.groups_with_signal / drawn if run.dynamic_sampling else fraction)
        samples.append(drawn * run.group_size)
        pass_rate.append(rate)
    return {
        "pass_rate": pass_rate,
        "zero_variance": zero_variance,
        "samples": samples,
        "ceiling": problem.ceiling(),
        "settings": dataclasses.asdict(run),
    }


def summarize(result: Dict[str, Any], *, threshold: float = 0.75) -> Dict[str, float]:
    """The metrics a comparison reads off a run.

    Args:
        result: as ``train_pass_fail`` returns it.
        threshold: a fraction of the ceiling.

    Returns:
        ``start`` (the pass rate before the first step, as a fraction of
        the ceiling), ``area`` (mean pass rate over the steps, as a fraction
        of the ceiling: the area under the curve), ``area_same_samples`` (the same
        over the samples a run without dynamic sampling spends,
        ``num_steps * N``: each step's pass rate weighs as many samples as
        it drew, up to that budget; equal to ``area`` without dynamic
        sampling, and the fair measure of DAPO, which draws more per step),
        ``final`` (the last pass rate, as a fraction of the ceiling),
        ``steps_to_threshold`` (the first step whose pass rate reaches
        ``threshold`` of the ceiling, or inf), ``zero_variance`` (the mean
        share of zero-variance groups) and ``samples`` (samples spent in all).
    """
    ceiling, curve = result["ceiling"], result["pass_rate"][1:]
    reached = [step for step, rate in enumerate(curve, 1) if rate >= threshold * ceiling]
    budget = len(curve) * result["settings"]["num_groups"] * result["settings"]["group_size"]
    weighted, spent = 0.0, 0
    for rate, drawn in zip(curve, result["samples"]):
        take = min(drawn, budget - spent)
        weighted, spent = weighted + rate * take, spent + take
    return {
        "start": result["pass_rate"][0] / ceiling,
        "area": sum(curve) / len(curve) / ceiling,
        "area_same_samples": weighted / max(spent, 1) / ceiling,
        "final": curve[-1] / ceiling,
        "steps_to_threshold": float(reached[0]) if reached else float("inf"),
        "zero_variance": sum(result["zero_variance"]) / len(result["zero_variance"]),
        "samples": float(sum(result["samples"])),
    }
