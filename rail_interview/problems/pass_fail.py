"""A second toy problem: pass/fail rewards, small groups, parameters shared between prompts.

Reinforcement learning with verifiable rewards scores each answer pass or
fail, and GRPO-style trainers sample G answers for each of B prompts per
step. This problem has both, and a policy whose parameters all prompts share,
so that a prompt's pass rate moves while it is not sampled and per-prompt
memory can go stale (the first toy problem's prompts mostly own their slot).

* **Prompts**: P prompts, each with a feature vector ``x_p`` (D floats), a
  hidden target ``label_p`` and a sampling std ``sigma_p``.
* **Policy**: one weight vector ``w`` (D floats), shared. For prompt p it
  answers ``Normal(x_p . w, sigma_p)``.
* **Reward**: 1 (pass) when the answer lands within ``tolerance`` of the
  label, else 0 (fail). The pass probability is known in closed form,
  ``Phi((label - m + tol) / sigma) - Phi((label - m - tol) / sigma)`` with
  ``m = x_p . w`` (``pass_probability``), so a run can be measured against
  the truth, not only against its noisy rewards.
* **Difficulty**: sigmas spread over [``min_sigma``, ``max_sigma``), so
  prompts differ in the best pass rate they can reach,
  ``2 Phi(tol / sigma) - 1``, and labels lie far from the initial answers
  (0), so that most prompts start with pass rates near 0.
* **Ceiling, reachable**: labels are ``x_p . w_star`` for a hidden
  ``w_star``, so one weight vector puts every prompt's mean on its label at
  once: ``ceiling()`` is the mean of the prompts' best pass rates, and the
  policy can reach it.
* **Update**: REINFORCE, as the first problem's: each sample proposes
  ``advantage * (answer - m) * x_p`` (the Gaussian score scaled by
  ``sigma**2``), averaged over the batch and scaled by the learning rate.

Every random draw comes from one ``torch.Generator``: one seed, one instance
and one run, bit for bit. ``training.train`` runs it when
``config.problem.name == "pass_fail"`` (``configs/pass_fail.py``): a batch
of N samples is N / G prompts, G samples each (``sample_prompt_ids``), and
metrics.csv gains the true pass rate and the share of zero-variance groups
(``metrics``). ``studies.pass_fail_runs`` and ``studies.pass_fail`` run the same
steps in process for the study of where memory pays.

Dimensions: P prompts, D features, B prompts per step, G samples per prompt,
N = B * G samples per step.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, List, Tuple

import ml_collections
import torch

from rail_interview import problems
from rail_interview.problems.distance import make_prompt_names


def _normal_cdf(value: torch.Tensor) -> torch.Tensor:
    """The standard normal distribution function, elementwise."""
    return 0.5 * (1.0 + torch.erf(value / math.sqrt(2.0)))


@dataclasses.dataclass
class PassFailProblem:
    """One instance of the pass/fail problem: prompts, their features, labels and sigmas.

    Build one with ``PassFailProblem.create``; only the policy changes during
    training.

    Attributes:
        prompt_names: P readable names; prompt id i is ``prompt_names[i]``.
        features: float32 [P, D], each prompt's feature vector.
        labels: float32 [P], each prompt's hidden target, ``features @ w_star``.
        sigmas: float32 [P], each prompt's sampling std.
        tolerance: an answer within this distance of the label passes.
        group_size: G, the samples ``sample_prompt_ids`` draws of each prompt.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> problem = PassFailProblem.create(num_prompts=8, num_features=4, generator=g)
        >>> problem.features.shape, problem.sigmas.shape, problem.tolerance
        (torch.Size([8, 4]), torch.Size([8]), 1.0)
        >>> problem.sample_prompt_ids(8, g).view(2, 4).unique(dim=1).shape  # 2 prompts, 4 samples each
        torch.Size([2, 1])
    """

    #: The columns ``metrics`` adds to a run's metrics.csv.
    metric_names = ("pass_rate", "zero_variance_frac")
    #: With several ranks, every rank draws a step's prompts with one generator seeded alike
    #: and keeps its own slice, so that no prompt is in two ranks' batches (``sample_prompt_ids``).
    shares_prompt_draws = True

    prompt_names: List[str]
    features: torch.Tensor
    labels: torch.Tensor
    sigmas: torch.Tensor
    tolerance: float
    group_size: int = 4

    @classmethod
    def create(
        cls,
        *,
        num_prompts: int,
        num_features: int,
        generator: torch.Generator,
        device: torch.device = torch.device("cpu"),
        tolerance: float = 1.0,
        min_sigma: float = 0.5,
        max_sigma: float = 3.0,
        label_scale: float = 8.0,
        group_size: int = 4,
    ) -> "PassFailProblem":
        """Draws a problem instance.

        Features are standard normal divided by sqrt(D), so ``x_p . w`` has
        the scale of ``w``'s entries; ``w_star`` is normal with std
        ``label_scale``, so labels are of that size while the policy starts
        at 0.

        Args:
            num_prompts: P.
            num_features: D, the policy's parameters; with D < P prompts
                must share them.
            generator: the run's generator, on ``device``.
            device: where the tensors live.
            tolerance: half-width of the passing window around a label.
            min_sigma: smallest sampling std.
            max_sigma: sampling stds are uniform in [min_sigma, max_sigma).
            label_scale: std of ``w_star``'s entries. Smaller puts labels
                nearer the initial answers (0): higher starting pass rates.
            group_size: G, samples per prompt in a batch.

        Returns:
            The instance.

        Raises:
            ValueError: if a size is not positive, or the stds, tolerance or
                label scale are out of range.
        """
        if num_prompts < 1 or num_features < 1 or group_size < 1:
            raise ValueError(
                "num_prompts, num_features and group_size must be positive, got "
                f"{num_prompts}, {num_features} and {group_size}"
            )
        if not 0 < min_sigma <= max_sigma or tolerance <= 0 or label_scale <= 0:
            raise ValueError(
                "need 0 < min_sigma <= max_sigma, tolerance > 0 and label_scale > 0, got "
                f"{min_sigma}, {max_sigma}, {tolerance} and {label_scale}"
            )
        name_generator = torch.Generator().manual_seed(
            int(torch.randint(2**62, (1,), generator=generator, device=device))
        )
        names = make_prompt_names(num_prompts, name_generator)
        features = torch.randn(num_prompts, num_features, generator=generator, device=device) / math.sqrt(num_features)
        target = torch.randn(num_features, generator=generator, device=device) * label_scale  # [D], w_star
        spread = torch.rand(num_prompts, generator=generator, device=device)
        return cls(
            prompt_names=names,
            features=features,
            labels=features @ target,
            sigmas=min_sigma + (max_sigma - min_sigma) * spread,
            tolerance=float(tolerance),
            group_size=int(group_size),
        )

    @property
    def num_prompts(self) -> int:
        """P, the number of prompts."""
        return len(self.prompt_names)

    def sample_groups(self, num_groups: int, group_size: int, generator: torch.Generator) -> torch.Tensor:
        """Draws B distinct prompts and repeats each G times, as GRPO trainers sample.

        Args:
            num_groups: B, at most P.
            group_size: G.
            generator: the run's generator, on the problem's device.

        Returns:
            int64 [B * G], prompt ids, each prompt's G samples contiguous.

        Raises:
            ValueError: if B is not in [1, P] or G < 1.
        """
        if not 1 <= num_groups <= self.num_prompts or group_size < 1:
            raise ValueError(
                f"need 1 <= num_groups <= {self.num_prompts} and group_size >= 1, got {num_groups} and {group_size}"
            )
        chosen = torch.randperm(self.num_prompts, generator=generator, device=self.labels.device)[:num_groups]
        return chosen.repeat_interleave(group_size)

    def sample_prompt_ids(
        self, batch_size: int, generator: torch.Generator, *, rank: int = 0, world_size: int = 1
    ) -> torch.Tensor:
        """A rank's training batch: ``batch_size / G`` distinct prompts, G samples each.

        One random order of the P prompts is drawn, and rank r takes its
        prompts r * B to (r + 1) * B - 1 (B = N / G): with the same
        generator state on every rank, the ranks' prompts are distinct, as a
        data-parallel GRPO trainer shards its prompts. One process
        (rank 0 of 1) draws exactly ``sample_groups(B, G)``.

        Args:
            batch_size: N, a multiple of G with world_size * N / G <= P.
            generator: the generator of the step's prompt draws, on the
                problem's device; in the same state on every rank.
            rank: this process's rank.
            world_size: processes that draw together.

        Returns:
            int64 [N], each prompt's G samples contiguous.

        Raises:
            ValueError: if N is not such a multiple, or rank is not in [0, world_size).
        """
        groups = batch_size // self.group_size
        if batch_size % self.group_size or not 1 <= groups * world_size <= self.num_prompts:
            raise ValueError(
                f"the batch size {batch_size} must be a multiple of the group size {self.group_size}, with at most "
                f"{self.num_prompts} groups across {world_size} process(es)"
            )
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        order = torch.randperm(self.num_prompts, generator=generator, device=self.labels.device)
        return order[rank * groups : (rank + 1) * groups].repeat_interleave(self.group_size)

    def metrics(self, policy: "SharedLinearPolicy", prompt_ids: torch.Tensor, rewards: torch.Tensor) -> torch.Tensor:
        """The values of ``metric_names`` after a step, on the device (no host sync).

        Args:
            policy: the policy, after its update.
            prompt_ids: int64 [N], the step's batch (every rank's, gathered);
                unused: the groups are read off the order, G contiguous
                samples each, as ``sample_prompt_ids`` draws them.
            rewards: float32 [N], their rewards, N a multiple of G.

        Returns:
            float32 [2]: the true mean pass rate over all P prompts, and the
            share of the batch's groups (blocks of G) whose rewards are all
            equal; NaN for an empty batch.
        """
        grouped = rewards.view(-1, self.group_size)  # [N / G, G]
        zero_variance = (grouped.amax(1) == grouped.amin(1)).float().mean()
        return torch.stack((self.pass_probability(policy.means()).mean(), zero_variance))

    def rewards(self, prompt_ids: torch.Tensor, answers: torch.Tensor) -> torch.Tensor:
        """Scores answers: 1.0 within ``tolerance`` of the label, else 0.0.

        Args:
            prompt_ids: int64 [N].
            answers: float32 [N].

        Returns:
            float32 [N] of 0.0 and 1.0.
        """
        return ((answers - self.labels[prompt_ids]).abs() < self.tolerance).float()

    def pass_probability(self, means: torch.Tensor, prompt_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The probability that an answer passes, given the policy's means.

        Args:
            means: float32 [M], the policy's mean answer for each prompt.
            prompt_ids: int64 [M], the prompts, or None for all P in order.

        Returns:
            float32 [M] in [0, 1].
        """
        ids = torch.arange(self.num_prompts, device=self.labels.device) if prompt_ids is None else prompt_ids
        gap, sigma = self.labels[ids] - means, self.sigmas[ids]
        return _normal_cdf((gap + self.tolerance) / sigma) - _normal_cdf((gap - self.tolerance) / sigma)

    def best_pass_probability(self) -> torch.Tensor:
        """float32 [P]: each prompt's pass probability with its mean on its label, ``2 Phi(tol / sigma) - 1``."""
        return self.pass_probability(self.labels)

    def ceiling(self) -> float:
        """The mean pass rate over prompts that one weight vector (``w_star``) reaches."""
        return float(self.best_pass_probability().mean())


class SharedLinearPolicy:
    """The policy: one weight vector shared by every prompt, answering ``Normal(x_p . w, sigma_p)``.

    Args:
        problem: the instance, for each prompt's features and sigma.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> problem = PassFailProblem.create(num_prompts=6, num_features=3, generator=g)
        >>> policy = SharedLinearPolicy(problem)
        >>> ids = problem.sample_groups(2, 4, g)
        >>> rewards = problem.rewards(ids, policy.sample(ids, g))
        >>> ids.shape, sorted(set(rewards.tolist())) <= [0.0, 1.0]
        (torch.Size([8]), True)

    Attributes:
        params: float32 [D], the weights ``w``, starting at 0.
    """

    def __init__(self, problem: PassFailProblem) -> None:
        self.features = problem.features
        self.sigmas = problem.sigmas
        self.params = torch.zeros(problem.features.shape[1], device=problem.features.device)  # [D], starts at 0

    def means(self, prompt_ids: torch.Tensor | None = None) -> torch.Tensor:
        """float32 [M]: the mean answer for prompts [M] (or all P)."""
        features = self.features if prompt_ids is None else self.features[prompt_ids]
        return features @ self.params

    def sample(self, prompt_ids: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Draws one answer per sample.

        Args:
            prompt_ids: int64 [N].
            generator: the run's generator.

        Returns:
            float32 [N], ``x_p . w + sigma_p * noise``.
        """
        noise = torch.randn(prompt_ids.shape, generator=generator, device=self.params.device)  # [N]
        return torch.addcmul(self.means(prompt_ids), self.sigmas[prompt_ids], noise)

    def update(
        self, prompt_ids: torch.Tensor, answers: torch.Tensor, advantages: torch.Tensor, learning_rate: float = 1.0
    ) -> None:
        """Takes one REINFORCE step, in place: ``w += lr * mean(advantage * (answer - m) * x)``.

        Args:
            prompt_ids: int64 [N], the prompts that were sampled.
            answers: float32 [N], what the policy answered.
            advantages: float32 [N], from a stat tracker.
            learning_rate: step size.
        """
        steps = advantages * (answers - self.means(prompt_ids))  # [N]
        self.params.add_(steps @ self.features[prompt_ids], alpha=learning_rate / max(len(prompt_ids), 1))


#: ``PassFailProblem.create``'s options beyond the sizes, by the names that a training config's
#: ``problem`` section and a ``studies.pass_fail_runs.PassFailRun`` give them too.
PROBLEM_OPTIONS = ("group_size", "tolerance", "min_sigma", "max_sigma", "label_scale")


def make_pass_fail_problem(
    *, num_prompts: int, num_features: int, generator: torch.Generator, **options: Any
) -> Tuple[PassFailProblem, SharedLinearPolicy]:
    """Draws a problem instance and a policy at its start (weights 0).

    Args:
        num_prompts: P.
        num_features: D.
        generator: the run's generator; its device is where everything lives.
        **options: ``PassFailProblem.create``'s keywords (tolerance, sigmas, label scale, group size).

    Returns:
        The problem and its policy.
    """
    problem = PassFailProblem.create(
        num_prompts=num_prompts, num_features=num_features, generator=generator, device=generator.device, **options
    )
    return problem, SharedLinearPolicy(problem)


def _check(config: ml_collections.ConfigDict, world_size: int) -> None:
    """Checks the problem's fields, and the batch size against the group size (``ProblemSpec.check``).

    Raises:
        ValueError: naming the first field the problem cannot use.
    """
    problem = config.problem
    problems.check_positive("problem.group_size", problem.group_size, integer=True)
    for field in ("tolerance", "min_sigma", "max_sigma", "label_scale"):
        problems.check_positive(f"problem.{field}", problem[field], integer=False)
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


def _make(config: ml_collections.ConfigDict, generator: torch.Generator) -> Tuple[PassFailProblem, SharedLinearPolicy]:
    """The problem and its policy from ``config.problem`` (``ProblemSpec.make``)."""
    return make_pass_fail_problem(
        num_prompts=config.num_prompts,
        num_features=config.num_params,
        generator=generator,
        **{option: config[option] for option in PROBLEM_OPTIONS},
    )


#: The problem's entry in the registry. Its bad-run floor: 0.2 is twice the mean
#: pass rate runs start at (about 0.1) and 40% of a typical ceiling (0.44 to 0.54
#: over seeds 0 to 9). A step draws G samples of each of its prompts.
SPEC = problems.register(
    problems.ProblemSpec(
        name="pass_fail",
        options=("num_prompts", "num_params", *PROBLEM_OPTIONS),
        make=_make,
        bad_final_reward=0.2,
        check=_check,
        samples_per_prompt=lambda config: config.problem.group_size,
    )
)
