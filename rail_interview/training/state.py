"""What a run computes with, and what its checkpoint saves and restores: ``TrainingState``.

A run is a problem instance, its policy, a tracker, the random generators
and the ranks it trains on. ``TrainingState.create`` draws them from a
config's seed exactly as every run always has; ``gather_checkpoint`` and
``restore`` carry the parts that change (the policy's parameters, the
tracker's state, every rank's generator states) across a resume, so that a
resumed run equals an uninterrupted one bit for bit.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, NamedTuple, Optional

import torch

from rail_interview import checkpointing, distributed, problems
from rail_interview.stat_tracking import AdvantageTracker, PromptSampler


class Generators(NamedTuple):
    """The random generators of a rank.

    Attributes:
        answers: this rank's generator of answers (rank 0's is the one the
            problem instance was drawn with; rank r > 0 gets its own seed).
        prompts: the generator of prompt draws: ``answers`` itself, unless
            the problem shares prompt draws across several ranks (then one
            generator seeded alike on every rank; see ``problems.Problem``).
    """

    answers: torch.Generator
    prompts: torch.Generator


def make_generators(
    seed: int, generator: torch.Generator, problem: problems.Problem, context: distributed.DistributedContext
) -> Generators:
    """A rank's generators, given the run's seed and the generator that drew the problem.

    Rank 0 keeps drawing from ``generator``, so a single process runs
    exactly as it always has; rank r > 0 samples with a seed derived from
    the run's. Where the problem shares prompt draws and there are several
    ranks, one more generator, seeded alike on every rank, draws the prompts.

    Args:
        seed: the run's seed.
        generator: the generator the problem instance was drawn with.
        problem: the instance.
        context: the ranks.

    Returns:
        The generators.
    """
    seeds = torch.Generator().manual_seed(seed)
    rank_seeds = torch.randint(2**62, (context.world_size,), generator=seeds)
    answers = generator if context.rank == 0 else torch.Generator(device=generator.device)
    if context.rank > 0:
        answers.manual_seed(int(rank_seeds[context.rank]))
    if context.world_size == 1 or not problem.shares_prompt_draws:
        return Generators(answers, answers)
    prompts = torch.Generator(device=generator.device).manual_seed(int(torch.randint(2**62, (1,), generator=seeds)))
    return Generators(answers, prompts)


@dataclasses.dataclass
class TrainingState:
    """A run's parts: what one step computes with and a checkpoint holds.

    Attributes:
        problem: the problem instance.
        policy: its policy; ``policy.params`` is what a checkpoint saves.
        tracker: the stat tracker.
        generators: this rank's generators.
        context: the ranks; a single process by default.
        sampler: what chooses each step's prompts from what memory says of
            them (``config.prompt_sampler``), or None for the problem's own
            draws. Alike on every rank, as the tracker is.
        selection: the tracker the sampler reads (``query``), or None for
            ``tracker`` itself (the study's ablations read another).
    """

    problem: problems.Problem
    policy: problems.Policy
    tracker: AdvantageTracker
    generators: Generators
    context: distributed.DistributedContext = dataclasses.field(default_factory=distributed.DistributedContext)
    sampler: Optional[PromptSampler] = None
    selection: Optional[AdvantageTracker] = None

    @classmethod
    def create(
        cls,
        config: Any,
        tracker: AdvantageTracker,
        *,
        device: torch.device,
        context: Optional[distributed.DistributedContext] = None,
        sampler: Optional[PromptSampler] = None,
    ) -> "TrainingState":
        """Draws a run's problem and policy from ``config.seed`` on ``device``, with ``tracker``.

        Args:
            config: a checked training config.
            tracker: the run's tracker, over ``config.problem.num_prompts`` prompts on ``device``.
            device: where everything lives.
            context: the ranks; a single process if None.
            sampler: the prompt sampler (``training.build_sampler``), or None.

        Returns:
            The state at the start of the run.

        Raises:
            ValueError: if the tracker takes prompt ids (not hashed keys) and
                knows fewer prompts than the problem has.
        """
        context = distributed.DistributedContext() if context is None else context
        generator = torch.Generator(device=device).manual_seed(config.seed)
        problem, policy = problems.make_problem(config, generator)
        if getattr(tracker, "keys", "ids") == "ids" and tracker.num_prompts < problem.num_prompts:
            raise ValueError(
                f"the tracker knows {tracker.num_prompts} prompts, the problem has {problem.num_prompts}: build it "
                "with num_prompts at least config.problem.num_prompts"
            )
        generators = make_generators(config.seed, generator, problem, context)
        return cls(problem, policy, tracker, generators, context, sampler)

    @property
    def shares_prompt_generator(self) -> bool:
        """Whether the ranks draw prompts with a generator of their own, apart from the answers'."""
        return self.generators.prompts is not self.generators.answers

    def gather_checkpoint(self, next_epoch: int) -> Optional[Dict[str, Any]]:
        """Gathers the checkpoint to resume at ``next_epoch`` onto rank 0: a collective, every rank must call it.

        Every rank's generator state is gathered; rank 0 gets the whole
        checkpoint and writes it, the others get None.

        Args:
            next_epoch: the first epoch a resume runs.

        Returns:
            A dict of tensors and plain values (``checkpointing.save_checkpoint``'s payload), on rank 0.
        """
        generator_states = self.context.gather_objects(self.generators.answers.get_state())  # every rank's
        if not self.context.is_main:
            return None
        state = {
            "epoch": next_epoch,
            "world_size": self.context.world_size,
            "params": self.policy.params.cpu(),
            "tracker": {name: tensor.cpu() for name, tensor in self.tracker.state_dict().items()},
            "generators": generator_states,
        }
        if self.shares_prompt_generator:  # the ranks' shared prompt generator, alike on every rank
            state["prompt_generator"] = self.generators.prompts.get_state()
        if self.sampler is not None:  # alike on every rank
            state["sampler"] = {name: tensor.cpu() for name, tensor in self.sampler.state_dict().items()}
        return state

    def restore(self, checkpoint: Dict[str, Any]) -> None:
        """Loads a checkpoint's parameters, tracker state and this rank's generator states.

        Everything is checked before anything changes.

        Args:
            checkpoint: as ``gather_checkpoint`` made it, loaded by ``checkpointing.load_checkpoint``.

        Raises:
            checkpointing.CheckpointError: for a checkpoint of another
                number of processes, parameters of another shape, tracker
                state that does not fit, or no shared prompt generator where
                the run needs one.
        """
        where = "checkpoint"
        if checkpoint.get("world_size", 1) != self.context.world_size:
            raise checkpointing.CheckpointError(
                f"{where} was written by {checkpoint.get('world_size')} process(es); resume with the same number "
                f"(this job has {self.context.world_size})"
            )
        params = checkpoint["params"]
        if not isinstance(params, torch.Tensor) or params.shape != self.policy.params.shape:
            raise checkpointing.CheckpointError(
                f"{where} holds parameters of shape {getattr(params, 'shape', None)}, the config needs "
                f"{tuple(self.policy.params.shape)}: is this the right run and config?"
            )
        if self.shares_prompt_generator and not isinstance(checkpoint.get("prompt_generator"), torch.Tensor):
            raise checkpointing.CheckpointError(
                f"{where} holds no state of the ranks' shared prompt generator: it was written before the ranks of "
                "this problem drew distinct prompts. Start a new run"
            )
        if self.sampler is not None and not isinstance(checkpoint.get("sampler"), dict):
            raise checkpointing.CheckpointError(f"{where} holds no prompt sampler state: it was written without one")
        try:
            self.tracker.load_state_dict(checkpoint["tracker"])
        except (TypeError, ValueError) as error:
            raise checkpointing.CheckpointError(f"{where} does not fit this run's tracker: {error}") from error
        if self.sampler is not None:
            try:
                self.sampler.load_state_dict(checkpoint["sampler"])
            except (TypeError, ValueError) as error:
                raise checkpointing.CheckpointError(
                    f"{where} does not fit this run's prompt sampler: {error}"
                ) from error
        self.policy.params.copy_(params)
        self.generators.answers.set_state(checkpoint["generators"][self.context.rank])
        if self.shares_prompt_generator:
            self.generators.prompts.set_state(checkpoint["prompt_generator"])
