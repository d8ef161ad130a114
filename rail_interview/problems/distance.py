"""The "distance" problem, the original task's: answer each prompt with a hidden number.

A "prompt" is a short text; the policy must learn to answer each prompt with a
hidden number, its label. The policy is deliberately tiny so that the effect of
advantage normalisation is all that matters:

* **Model**: a vector of ``num_params`` floats. A prompt is mapped to one slot
  of that vector (a hash-like random assignment, so two prompts can share a
  slot), and the policy's answer to the prompt is a Gaussian sample
  ``Normal(params[slot], sigma)``, where ``sigma`` is fixed per prompt.
* **Reward**: ``-|sample - label|``, so the best a prompt can do is put its
  slot's value on its label, and then its expected reward is
  ``-sigma * sqrt(2 / pi)``.
* **Update**: REINFORCE. The score of a Gaussian with respect to its mean is
  ``(sample - mean) / sigma**2``; scaled by ``sigma**2`` (a per-prompt step
  size) each sample contributes ``advantage * (sample - params[slot])``.
  Samples that land on the same slot in one batch are averaged.

Prompts draw very different rewards (their labels and sigmas differ), which is
why normalising advantages with whole-batch statistics is noisy and per-prompt
statistics help. Every random draw comes from one ``torch.Generator``, so one
seed gives one problem instance and one run, bit for bit.

Dimensions: N samples in a batch, P prompts, S parameter slots.
"""

from __future__ import annotations

import dataclasses
from typing import List, Tuple

import ml_collections
import torch

from rail_interview import problems

# Word lists for readable prompt names such as "brave-otter". 64 x 64 = 4096
# names; more prompts than that get a numeric suffix ("brave-otter-2").
_ADJECTIVES = (
    "able",
    "amber",
    "ancient",
    "azure",
    "bold",
    "brave",
    "bright",
    "brisk",
    "calm",
    "clever",
    "cosmic",
    "crimson",
    "curious",
    "daring",
    "dusty",
    "eager",
    "early",
    "fancy",
    "fierce",
    "fluffy",
    "gentle",
    "giant",
    "golden",
    "grumpy",
    "happy",
    "hidden",
    "humble",
    "icy",
    "jolly",
    "keen",
    "kind",
    "lazy",
    "little",
    "lively",
    "lucky",
    "mellow",
    "misty",
    "modest",
    "noble",
    "odd",
    "patient",
    "plucky",
    "polite",
    "proud",
    "quick",
    "quiet",
    "rapid",
    "rusty",
    "shy",
    "silent",
    "silver",
    "sleepy",
    "sly",
    "smooth",
    "snowy",
    "spicy",
    "steady",
    "sunny",
    "swift",
    "tidy",
    "tiny",
    "velvet",
    "wild",
    "witty",
)
_NOUNS = (
    "badger",
    "bat",
    "bear",
    "beaver",
    "bison",
    "camel",
    "cat",
    "cobra",
    "crab",
    "crane",
    "crow",
    "deer",
    "dingo",
    "dolphin",
    "dove",
    "duck",
    "eagle",
    "eel",
    "falcon",
    "ferret",
    "finch",
    "fox",
    "frog",
    "gecko",
    "goat",
    "goose",
    "hare",
    "hawk",
    "heron",
    "hippo",
    "ibis",
    "jackal",
    "koala",
    "lemur",
    "lion",
    "llama",
    "lynx",
    "mole",
    "moose",
    "mouse",
    "newt",
    "otter",
    "owl",
    "panda",
    "parrot",
    "pika",
    "puffin",
    "quail",
    "rabbit",
    "raven",
    "seal",
    "shark",
    "sloth",
    "snail",
    "swan",
    "tapir",
    "tiger",
    "toad",
    "trout",
    "turtle",
    "viper",
    "walrus",
    "whale",
    "yak",
)

# The original drew sigma as (hash % 1023) / 256, i.e. uniform on a grid in [0, 4).
_SIGMA_STEPS = 1023
_SIGMA_SCALE = 256.0


def make_prompt_names(num_prompts: int, generator: torch.Generator) -> List[str]:
    """Draws ``num_prompts`` distinct, readable two-word prompt names.

    Args:
        num_prompts: P, how many names.
        generator: a CPU generator; the names depend only on its state.

    Returns:
        P distinct strings such as ``"brave-otter"``.
    """
    num_pairs = len(_ADJECTIVES) * len(_NOUNS)
    rounds = -(-num_prompts // num_pairs)  # ceil
    codes = torch.randperm(num_pairs * rounds, generator=generator)[:num_prompts].tolist()
    names = []
    for code in codes:
        round_index, pair = divmod(code, num_pairs)
        noun, adjective = divmod(pair, len(_ADJECTIVES))
        name = f"{_ADJECTIVES[adjective]}-{_NOUNS[noun]}"
        names.append(name if round_index == 0 else f"{name}-{round_index + 1}")
    return names


@dataclasses.dataclass
class ToyProblem:
    """One instance of the toy problem: prompts, their slots, sigmas and labels.

    Build one with ``ToyProblem.create``. The instance is fixed; only the
    policy's parameters change during training.

    Attributes:
        prompt_names: P readable names; prompt id i is ``prompt_names[i]``.
        slots: int64 [P], the parameter slot each prompt reads, in [0, S).
        sigmas: float32 [P], each prompt's sampling std, in [0, 4).
        labels: float32 [P], each prompt's hidden integer target, in [0, 256).
        num_params: S, the number of policy parameters.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> problem = ToyProblem.create(num_prompts=8, num_params=1024, generator=g)
        >>> len(problem.prompt_names), problem.slots.shape, problem.labels.dtype
        (8, torch.Size([8]), torch.float32)
    """

    #: The columns ``metrics`` adds to a run's metrics.csv: none, the rewards say it all.
    metric_names = ()
    #: Each rank draws its prompts with its own generator (``sample_prompt_ids``).
    shares_prompt_draws = False

    prompt_names: List[str]
    slots: torch.Tensor
    sigmas: torch.Tensor
    labels: torch.Tensor
    num_params: int

    @classmethod
    def create(
        cls,
        *,
        num_prompts: int,
        num_params: int,
        generator: torch.Generator,
        device: torch.device = torch.device("cpu"),
        max_label: int = 256,
    ) -> "ToyProblem":
        """Draws a problem instance.

        Names are drawn on the CPU (they are Python strings); everything else
        on ``device`` with ``generator``, which must live there too.

        Args:
            num_prompts: P, the number of prompts.
            num_params: S, the number of policy parameters (slots).
            generator: the run's generator, on ``device``.
            device: where the tensors live.
            max_label: labels are integers in [0, max_label).

        Returns:
            The instance.

        Raises:
            ValueError: if a size is not positive.
        """
        if num_prompts < 1 or num_params < 1 or max_label < 1:
            raise ValueError(
                "num_prompts, num_params and max_label must be positive, got "
                f"{num_prompts}, {num_params} and {max_label}"
            )
        name_generator = torch.Generator().manual_seed(
            int(torch.randint(2**62, (1,), generator=generator, device=device))
        )
        names = make_prompt_names(num_prompts, name_generator)
        slots = torch.randint(num_params, (num_prompts,), generator=generator, device=device)
        sigma_steps = torch.randint(_SIGMA_STEPS, (num_prompts,), generator=generator, device=device)
        labels = torch.randint(max_label, (num_prompts,), generator=generator, device=device)
        return cls(
            prompt_names=names,
            slots=slots,
            sigmas=sigma_steps.float() / _SIGMA_SCALE,
            labels=labels.float(),
            num_params=num_params,
        )

    @property
    def num_prompts(self) -> int:
        """P, the number of prompts."""
        return len(self.prompt_names)

    def sample_prompt_ids(
        self, batch_size: int, generator: torch.Generator, *, rank: int = 0, world_size: int = 1
    ) -> torch.Tensor:
        """Draws a batch of prompts uniformly, with replacement.

        Args:
            batch_size: N.
            generator: the run's generator, on the problem's device; with
                several ranks, each rank's own (so their draws differ).
            rank: unused: prompts are drawn with replacement, on every rank alike.
            world_size: unused.

        Returns:
            int64 [N], prompt ids in [0, P).
        """
        return torch.randint(self.num_prompts, (batch_size,), generator=generator, device=self.slots.device)

    def metrics(self, policy: "GaussianPolicy", prompt_ids: torch.Tensor, rewards: torch.Tensor) -> torch.Tensor:
        """The values of ``metric_names`` after a step: none on this problem.

        Args:
            policy: the policy, after its update (unused).
            prompt_ids: int64 [N], the step's batch (unused).
            rewards: float32 [N], its rewards (unused).

        Returns:
            float32 [0], on the problem's device.
        """
        return torch.empty(0, device=self.labels.device)

    def rewards(self, prompt_ids: torch.Tensor, samples: torch.Tensor) -> torch.Tensor:
        """Scores samples: ``-|sample - label|``.

        Args:
            prompt_ids: int64 [N].
            samples: float32 [N].

        Returns:
            float32 [N], each sample's reward (at most 0).
        """
        return -(samples - self.labels[prompt_ids]).abs()


class GaussianPolicy:
    """The toy "model": one Gaussian mean per parameter slot.

    For prompt p the policy samples ``Normal(params[slots[p]], sigmas[p])``;
    the slot and sigma of each prompt come from the ``ToyProblem``.

    Args:
        problem: the instance, for each prompt's slot and sigma.
        generator: the run's generator, on the problem's device; it draws the
            initial parameters uniformly in [0, init_max).
        init_max: upper end of the initial parameter range.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> problem = ToyProblem.create(num_prompts=4, num_params=16, generator=g)
        >>> policy = GaussianPolicy(problem, generator=g)
        >>> ids = torch.tensor([0, 0, 3])
        >>> policy.sample(ids, generator=g).shape
        torch.Size([3])
    """

    def __init__(self, problem: ToyProblem, *, generator: torch.Generator, init_max: float = 256.0) -> None:
        self.slots = problem.slots
        self.sigmas = problem.sigmas
        device = problem.slots.device
        self.params = torch.rand(problem.num_params, generator=generator, device=device) * init_max  # [S]

    def sample(self, prompt_ids: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Draws one sample per prompt.

        Args:
            prompt_ids: int64 [N].
            generator: the run's generator.

        Returns:
            float32 [N], ``params[slot] + sigma * noise``.
        """
        noise = torch.randn(prompt_ids.shape, generator=generator, device=self.params.device)  # [N]
        return torch.addcmul(self.params[self.slots[prompt_ids]], self.sigmas[prompt_ids], noise)

    def update(
        self,
        prompt_ids: torch.Tensor,
        samples: torch.Tensor,
        advantages: torch.Tensor,
        learning_rate: float = 1.0,
    ) -> None:
        """Takes one policy-gradient (REINFORCE) step, in place.

        Each sample proposes ``advantage * (sample - params[slot])``; proposals
        for the same slot are averaged, then scaled by ``learning_rate``.

        Args:
            prompt_ids: int64 [N], the prompts that were sampled.
            samples: float32 [N], what the policy sampled for them.
            advantages: float32 [N], from a stat tracker.
            learning_rate: step size.
        """
        slots = self.slots[prompt_ids]  # [N]
        steps = advantages * (samples - self.params[slots])  # [N]
        num_params = self.params.shape[0]
        step_sum = torch.zeros(num_params, device=self.params.device).index_add_(0, slots, steps)  # [S]
        step_count = torch.zeros(num_params, device=self.params.device).index_add_(
            0, slots, torch.ones_like(steps)
        )  # [S]
        self.params.add_(step_sum / step_count.clamp_min(1.0), alpha=learning_rate)


def make_toy_problem(
    *, num_prompts: int, num_params: int, generator: torch.Generator
) -> Tuple[ToyProblem, GaussianPolicy]:
    """Draws a problem instance, then the policy's initial parameters.

    Args:
        num_prompts: P.
        num_params: S.
        generator: the run's generator; its device is where everything lives.

    Returns:
        The problem and a freshly initialised policy for it.
    """
    problem = ToyProblem.create(
        num_prompts=num_prompts, num_params=num_params, generator=generator, device=generator.device
    )
    return problem, GaussianPolicy(problem, generator=generator)


def _make(config: ml_collections.ConfigDict, generator: torch.Generator) -> Tuple[ToyProblem, GaussianPolicy]:
    """The problem and its policy from ``config.problem`` (``ProblemSpec.make``)."""
    return make_toy_problem(num_prompts=config.num_prompts, num_params=config.num_params, generator=generator)


#: The problem's entry in the registry. Its bad-run floor: -20 is far from the
#: -1 to -5 that runs reach at best and from their starts near -100.
SPEC = problems.register(
    problems.ProblemSpec(name="distance", options=("num_prompts", "num_params"), make=_make, bad_final_reward=-20.0)
)
