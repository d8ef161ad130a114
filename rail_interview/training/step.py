"""One training step, the one that every run takes: draw, score, advantages, gather, update.

``step(state, batch_size=..., learning_rate=...)`` is the whole step of
``train()``, of the pass/fail study's thousands of in-process runs, of DAPO
and of the ablations. What they vary is a hook, not a copy:

* ``draw(state, batch_size) -> Samples``: how a rank's samples are drawn
  and scored (``draw_samples``: the problem's prompts, one answer each; the
  study's dynamic sampling draws until enough groups have signal);
* ``estimate(tracker, samples) -> advantages``: how rewards become
  advantages (``tracker_advantages``: ``tracker.update``; the study's
  ablations mix in other baselines).

Under ``torchrun`` each rank draws its own samples and the tracker sees
every rank's (it gathers); the policy update applies the global batch, in
rank order, on every rank, so that parameters stay identical.

Dimensions: N samples per rank, W ranks.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch

from rail_interview.stat_tracking import AdvantageTracker
from rail_interview.training.state import TrainingState


@dataclasses.dataclass(frozen=True)
class Samples:
    """A rank's samples of one step, scored.

    Attributes:
        prompt_ids: int64 [N].
        answers: float32 [N], the policy's answers.
        rewards: float32 [N].
        groups_drawn: with dynamic sampling, the groups drawn in all (the
            kept ones and the dropped ones); None otherwise.
        groups_with_signal: with dynamic sampling, how many of them had
            rewards that differ; None otherwise.
    """

    prompt_ids: torch.Tensor
    answers: torch.Tensor
    rewards: torch.Tensor
    groups_drawn: Optional[int] = None
    groups_with_signal: Optional[int] = None


@dataclasses.dataclass(frozen=True)
class Batch:
    """The global batch of one step, as the policy update applied it.

    Attributes:
        prompt_ids: int64 [W * N], every rank's, in rank order.
        answers: float32 [W * N].
        rewards: float32 [W * N].
        advantages: float32 [W * N].
        local: this rank's ``Samples`` (with dynamic sampling's counts).
    """

    prompt_ids: torch.Tensor
    answers: torch.Tensor
    rewards: torch.Tensor
    advantages: torch.Tensor
    local: Samples


#: How a rank's samples are drawn: ``(state, batch_size) -> Samples``.
Draw = Callable[[TrainingState, int], Samples]

#: How rewards become advantages: ``(tracker, samples) -> float [N]``.
Estimate = Callable[[AdvantageTracker, Samples], torch.Tensor]


def draw_samples(state: TrainingState, batch_size: int) -> Samples:
    """Draws this rank's prompts, one answer for each, and scores them.

    Args:
        state: the run; its problem draws the prompts with the prompt
            generator (or its sampler chooses them: ``choose_prompts``), its
            policy answers with the answer generator.
        batch_size: N.

    Returns:
        The samples.
    """
    context = state.context
    if state.sampler is not None:
        prompt_ids = choose_prompts(state, batch_size)  # [N]
    else:
        prompt_ids = state.problem.sample_prompt_ids(  # [N]
            batch_size, state.generators.prompts, rank=context.rank, world_size=context.world_size
        )
    answers = state.policy.sample(prompt_ids, state.generators.answers)  # [N]
    return Samples(prompt_ids, answers, state.problem.rewards(prompt_ids, answers))


def choose_prompts(state: TrainingState, batch_size: int) -> torch.Tensor:
    """This rank's prompts, chosen by the run's sampler from what memory says: B = N / G of them, G samples each.

    Every rank's sampler and tracker are alike, so every rank draws the same
    W * B distinct prompts and keeps its own B, in rank order, as the
    problem's own draws do.

    Args:
        state: the run, with a sampler and a problem of groups (``group_size``).
        batch_size: N, a multiple of G.

    Returns:
        int64 [N], each prompt's G samples contiguous.
    """
    group_size = state.problem.group_size
    groups, context = batch_size // group_size, state.context
    source = state.tracker if state.selection is None else state.selection
    positions = state.sampler.draw(source, groups * context.world_size)  # [W * B]
    chosen = state.sampler.pool[positions[context.rank * groups : (context.rank + 1) * groups]]  # [B]
    return chosen.repeat_interleave(group_size)


def tracker_advantages(tracker: AdvantageTracker, samples: Samples) -> torch.Tensor:
    """The tracker's advantages: ``tracker.update(prompt_ids, rewards)`` (which gathers across ranks).

    Args:
        tracker: the run's tracker.
        samples: this rank's samples.

    Returns:
        float32 [N].
    """
    return tracker.update(samples.prompt_ids, samples.rewards)


def step(
    state: TrainingState,
    *,
    batch_size: int,
    learning_rate: float,
    draw: Draw = draw_samples,
    estimate: Estimate = tracker_advantages,
) -> Batch:
    """Takes one training step: draw and score, advantages, gather every rank's batch, update the policy.

    A process that draws no samples (dynamic sampling that kept none) leaves
    the tracker and the policy as they were. Under torchrun that is an
    error: the tracker's update is a collective every rank must join.

    Args:
        state: the run: problem, policy, tracker, generators and ranks.
        batch_size: N, samples per rank.
        learning_rate: the policy update's step size.
        draw: how the samples are drawn (``draw_samples``).
        estimate: how rewards become advantages (``tracker_advantages``).

    Returns:
        The global batch.

    Raises:
        ValueError: if a rank of several drew no samples.
    """
    local = draw(state, batch_size)
    if local.prompt_ids.numel() == 0:
        if state.context.world_size > 1:
            raise ValueError(f"rank {state.context.rank} drew no samples; every rank must join the tracker's update")
        advantages = torch.zeros_like(local.rewards)
    else:
        advantages = estimate(state.tracker, local)  # [N]
    prompt_ids, answers, rewards, advantages = state.context.all_gather(
        local.prompt_ids, local.answers, local.rewards, advantages
    )
    if prompt_ids.numel():
        state.policy.update(prompt_ids, answers, advantages, learning_rate)
    return Batch(prompt_ids, answers, rewards, advantages, local)
