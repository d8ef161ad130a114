"""Which prompts to train on next: weights from a tracker's memory, and a sampler that draws by them on the device.

A tracker remembers how each prompt has fared (``AdvantageTracker.query``
gives its pass rate, the uncertainty of it, and its streak of
zero-variance visits). ``prompt_weights`` turns that into one weight per
prompt by a named rule; ``PromptSampler`` draws prompts of a fixed pool by
those weights, without a host sync, so that choosing the next batch can
run in the same compiled graph or CUDA graph as the tracker's update.

**Rules** (``RULES``), for a pass rate p clamped to [0, 1]:

==================== ======================================= =====================================
rule                 weight                                  from
==================== ======================================= =====================================
``"uniform"``        1                                       every prompt alike
``"spo"``            ``sqrt(p * (1 - p)) + epsilon``         SPO (verl ``recipe/spo``)
``"failure_rate"``   ``1 - p + epsilon``                     Kimi k1.5's prioritized sampling
``"greso"``          ``max(p_side ** streak, min_keep)``     GRESO's pre-rollout filter (a keep
                                                             probability)
==================== ======================================= =====================================

A prompt the memory holds nothing for (pass rate NaN) gets the rule's
largest weight, so that unknown prompts are explored first: 1 for
``uniform``, ``0.5 + epsilon`` for ``spo``, ``1 + epsilon`` for
``failure_rate``; for ``greso`` its streak decides (a prompt never visited
has streak 0 and weight 1, the largest). ``prompt_weights`` documents each
rule's source and where it departs from it.

**Drawing.** Without replacement, the draws are successive sampling
proportional to weight (Plackett-Luce): each next prompt is drawn from
those not drawn yet, with probability its weight over theirs. It is done
in one pass by an exponential race (Gumbel-top-k): each prompt gets an
exponential time ``E / w`` and the ``num`` earliest win, in order. With
replacement, draws are independent, by inverse CDF: a float64 cumulative
sum of the weights and ``searchsorted``. A prompt of weight 0 is never
drawn while a positive-weight prompt is left to draw: without replacement,
once every positive-weight prompt is drawn, the rest of the draw is filled
uniformly at random from the zero-weight ones; with replacement, they are
never drawn, unless every weight is 0, when draws are uniform over the pool
(as SPO does when its weights sum to 0). ``keep`` is the other use of a
weight, GRESO's: each prompt kept, independently, with probability its
weight.

**Randomness** is counter-based, so that it needs no ``torch.Generator``
(which breaks ``torch.compile(fullgraph=True)``) and resumes exactly: the
state is a seed and a count of draws, two int64 tensors on the device.
Draw number c (``draw`` and ``keep`` each count one) takes the SplitMix64
stream started at ``mix64(mix64(seed) + c * G)`` (G the 64-bit golden
ratio): uniform i is the top 53 bits of ``mix64(start + (i + 1) * G)``
over 2**53, in [0, 1). Integer arithmetic wraps the same on every device,
so the uniforms are identical bit for bit on CPU and GPU; the draws agree
too, except where the float64 rounding of ``log`` or of the cumulative sum
differs between devices and two prompts are within that rounding of a tie.

Dimensions: M prompts in the pool (or asked about), ``num`` draws.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Dict, Mapping, Union

import torch

from rail_interview.stat_tracking.keys import mix64
from rail_interview.stat_tracking.ops import is_compiling
from rail_interview.stat_tracking.types import PromptQuery
from rail_interview.stat_tracking.validation import check_choice, check_state_dict, is_integer_dtype

if TYPE_CHECKING:
    from rail_interview.stat_tracking.tracker import AdvantageTracker

__all__ = ["RULES", "PromptSampler", "prompt_weights"]

#: The rules ``prompt_weights`` knows, by name.
RULES = ("uniform", "spo", "failure_rate", "greso")

#: What ``PromptSampler`` takes weights from: a tracker (anything with ``query``), a query, or weights.
WeightSource = Union["AdvantageTracker", PromptQuery, torch.Tensor]

# The 64-bit golden ratio, odd: SplitMix64's increment, here also the step between draws' streams.
_GOLDEN = 0x9E3779B97F4A7C15 - (1 << 64)
# Top 53 bits of a 64-bit word: a logical shift right by 11.
_MANTISSA_BITS = 53
_UNIT = 2.0**-_MANTISSA_BITS
# The least log of an exponential time in the race: u = 2**-53 gives E = -log1p(-u) ~ 2**-53. Clamping
# there keeps u = 0 (E = 0, log E = -inf) from beating every weight, zero weights included.
_LEAST_LOG_TIME = math.log(_UNIT)
# Keys of zero-weight prompts in the race: beyond every positive weight's key, log E - log w <= 3.6 + 744.5.
_ZERO_WEIGHT_KEY = 4096.0


def _check_number(name: str, value: object, low: float, high: float, *, low_open: bool = False) -> None:
    """Raises ValueError unless ``value`` is a real number in [low, high] ((low, high] with ``low_open``)."""
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low) and value <= high
    if not ok:
        bounds = f"{'(' if low_open else '['}{low}, {high}]"
        raise ValueError(f"{name} must be a number in {bounds}, got {value!r}")


def _check_rule_options(rule: object, epsilon: object, p_easy: object, p_hard: object, min_keep: object) -> None:
    """Raises ValueError for an unknown rule or an option out of range (no host sync)."""
    check_choice("rule", rule, RULES)
    _check_number("epsilon", epsilon, 0.0, math.inf)
    _check_number("p_easy", p_easy, 0.0, 1.0, low_open=True)
    _check_number("p_hard", p_hard, 0.0, 1.0, low_open=True)
    _check_number("min_keep", min_keep, 0.0, 1.0)


def _describe(value: object) -> str:
    """A tensor's shape and dtype, or another value's type, for messages."""
    if isinstance(value, torch.Tensor):
        return f"shape {tuple(value.shape)} and dtype {value.dtype}"
    return type(value).__name__


def _check_query(query: object, rule: str) -> None:
    """Raises unless ``query`` is a PromptQuery of 1-D tensors that ``rule`` can use (no host sync)."""
    if not isinstance(query, PromptQuery):
        raise TypeError(f"query must be a PromptQuery (as AdvantageTracker.query returns), got {type(query).__name__}")
    rate = query.pass_rate
    if not isinstance(rate, torch.Tensor) or rate.ndim != 1 or not rate.dtype.is_floating_point:
        raise ValueError(f"query.pass_rate must be a 1-D floating tensor [M], got {_describe(rate)}")
    if rule != "greso":
        return
    streak = query.streak
    if streak is None:
        raise ValueError(
            "rule 'greso' needs each prompt's streak of zero-variance visits, and query.streak is None: "
            "build the tracker with track_streaks=True"
        )
    if not isinstance(streak, torch.Tensor) or streak.shape != rate.shape or not is_integer_dtype(streak.dtype):
        raise ValueError(
            f"query.streak must be an integer tensor of pass_rate's shape {tuple(rate.shape)}, got {_describe(streak)}"
        )
    if streak.device != rate.device:
        raise ValueError(f"query.streak must be on pass_rate's device {rate.device}, got {streak.device}")


def prompt_weights(
    query: PromptQuery,
    rule: str,
    *,
    epsilon: float = 0.05,
    p_easy: float = 0.5,
    p_hard: float = 0.5,
    min_keep: float = 0.01,
) -> torch.Tensor:
    """Each prompt's sampling weight by a named rule, from what a tracker's memory says of it.

    A pure function of tensor ops: no host sync, no Python branch on
    values. The pass rate p is clamped to [0, 1] first (a buffer or EMA
    memory of rewards outside [0, 1] gives means outside it; the rules
    read it as a pass rate). A NaN pass rate (memory holds nothing)
    gets the rule's largest weight, to explore unknown prompts first.

    * ``"uniform"``: 1.
    * ``"spo"``: ``sqrt(p * (1 - p)) + epsilon``, the weight SPO (Single-stream
      Policy Optimization) samples the prompts of each step by: verl
      ``recipe/spo/spo_ray_trainer.py`` (commit 4b2b364; transcribed in
      ``tests/system_references.py``, ``SpoBetaTracker.sampling_weights``),
      epsilon 0.05 there. SPO reads p from its per-prompt Beta (the
      tracker's ``"beta"`` memory). Departure: SPO gives weight 0 to a
      prompt missing from its offline file; here an unknown prompt gets
      the largest weight, ``0.5 + epsilon``.
    * ``"failure_rate"``: ``1 - p + epsilon``: Kimi k1.5's prioritized
      sampling (arXiv:2501.12599, "Sampling strategies": problems drawn
      in proportion to ``1 - s_i``, s_i the success rate), the pass-rate
      curriculum. ``epsilon=0`` is Kimi's rule; the default keeps
      mastered prompts a small chance. Unknown: ``1 + epsilon``.
    * ``"greso"``: a keep probability, ``max(p_side ** z, min_keep)`` with z
      the prompt's streak: GRESO's probabilistic pre-rollout filter (Zheng
      et al. 2025, "Act Only When It Pays: Efficient Reinforcement Learning
      for LLM Reasoning via Selective Rollouts", arXiv:2506.02177),
      transcribed from its code, Infini-AI-Lab/GRESO @ b277843,
      ``verl/trainer/ttis/presampling_selector.py``:
      ``easy_probabilistic_skip`` and ``hard_probabilistic_skip`` skip a
      prompt with probability ``1 - max(p ** count, 0.01)``, count its
      latest visits in a row whose mean reward was >= 0.98 (easy, with
      ``p_easy``) or <= 0.11 (hard, with ``p_hard``). Its training scripts
      start ``p_easy = p_hard = 0.5``, the defaults here; ``min_keep`` is
      the code's 0.01. A prompt with streak 0 (never visited, or its last
      visit had differing rewards) is always kept. GRESO filters each
      prompt of a batch independently with this probability
      (``PromptSampler.keep``); drawing a fixed number in proportion to it
      (``PromptSampler.draw``) is the other use. Needs ``query.streak``:
      build the tracker with ``track_streaks=True``. Departures:

      1. z is the tracker's streak of visits whose rewards were all
         exactly equal: GRESO's count for binary rewards in groups of
         fewer than 10 (its thresholds then mean all passed or all
         failed; its scripts sample 8), but also groups all equal at
         another value.
      2. The tracker does not say at which value a streak's rewards were
         equal, so the side comes from the pass rate: ``p_easy`` above
         0.5, ``p_hard`` below, the larger of the two (the gentler
         filter) at exactly 0.5 or NaN. GRESO keeps a count per side, so
         a streak that changes sides (all passed, then all failed) counts
         again from 1 there, and on from 2 here; with ``p_easy ==
         p_hard`` the side does not matter.
      3. GRESO adapts ``p_easy`` and ``p_hard`` every step
         (``verl/trainer/ppo/ray_trainer.py``: by 0.01, within [0.05,
         0.95], steering the fractions of easy and hard zero-variance
         prompts to 1/3 and 2/3 of a target, 0.25). Here they are
         arguments: a trainer that adapts them calls this function with
         the current values and hands the weights to ``PromptSampler.keep``.

    Args:
        query: what the tracker says of M prompts (``AdvantageTracker.query``);
            ``pass_rate`` float [M], and for ``"greso"`` ``streak`` int64 [M].
        rule: one of ``RULES``.
        epsilon: >= 0, the exploration floor added by ``"spo"`` and
            ``"failure_rate"``.
        p_easy: in (0, 1], ``"greso"``'s keep probability per visit of a
            streak of a prompt that passes (pass rate above 0.5).
        p_hard: in (0, 1], likewise for a prompt that fails (below 0.5).
        min_keep: in [0, 1], ``"greso"``'s least keep probability.

    Returns:
        float [M] weights, >= 0, in ``query.pass_rate``'s dtype and device.

    Raises:
        ValueError: for an unknown rule, an option out of range, a query
            whose tensors are not 1-D of one length, or ``"greso"`` without
            ``query.streak`` (a tracker without ``track_streaks=True``).
        TypeError: if ``query`` is not a PromptQuery.

    Example:
        >>> query = PromptQuery(
        ...     pass_rate=torch.tensor([0.5, 0.9, 0.0, float("nan")]),
        ...     uncertainty=torch.zeros(4),
        ...     count=torch.tensor([8, 8, 8, 0]),
        ...     streak=torch.tensor([0, 1, 3, 0]),
        ... )
        >>> prompt_weights(query, "spo")
        tensor([0.5500, 0.3500, 0.0500, 0.5500])
        >>> prompt_weights(query, "failure_rate", epsilon=0.0)
        tensor([0.5000, 0.1000, 1.0000, 1.0000])
        >>> prompt_weights(query, "greso")  # 0.5 ** streak
        tensor([1.0000, 0.5000, 0.1250, 1.0000])
    """
    _check_rule_options(rule, epsilon, p_easy, p_hard, min_keep)
    _check_query(query, rule)
    rate = query.pass_rate
    if rule == "uniform":
        return torch.ones_like(rate)
    if rule == "spo":
        p = rate.clamp(0.0, 1.0)
        return (torch.sqrt(p * (1.0 - p)) + epsilon).masked_fill(torch.isnan(rate), 0.5 + epsilon)
    if rule == "failure_rate":
        return (1.0 - rate.clamp(0.0, 1.0) + epsilon).masked_fill(torch.isnan(rate), 1.0 + epsilon)
    # "greso": the undecided side (0.5 or NaN) gets the gentler of the two probabilities.
    base = torch.full_like(rate, max(p_easy, p_hard))
    base = base.masked_fill(rate > 0.5, p_easy).masked_fill(rate < 0.5, p_hard)
    return torch.pow(base, query.streak.to(rate.dtype)).clamp_min(min_keep)


def _uniforms(seed: torch.Tensor, counter: torch.Tensor, num: int) -> torch.Tensor:
    """float64 [num] uniforms in [0, 1), the ``counter``-th stream of ``seed`` (see the module docstring).

    Args:
        seed: int64 scalar tensor.
        counter: int64 scalar tensor, on the seed's device.
        num: how many.
    """
    start = mix64(mix64(seed) + counter * _GOLDEN)
    index = torch.arange(1, num + 1, dtype=torch.int64, device=seed.device)
    words = mix64(start + index * _GOLDEN)
    top = (words >> (64 - _MANTISSA_BITS)) & ((1 << _MANTISSA_BITS) - 1)  # logical shift: sign bits cleared
    return top.to(torch.float64) * _UNIT


class PromptSampler:
    """Draws prompts of a fixed pool by weights from a tracker's memory, on the device, without a host sync.

    Each call reads the tracker (``tracker.query(pool)``), weighs every
    prompt of the pool by ``rule`` (``prompt_weights``), and draws:

    * ``draw(source, num)``: ``num`` positions into the pool, int64
      [num]; the prompts are ``sampler.pool[positions]``. Without
      replacement, successive sampling proportional to weight, in the
      order drawn; with replacement, independent draws proportional to
      weight. See the module docstring for zero weights.
    * ``keep(source)``: bool [M], each prompt kept independently with
      probability its weight (clipped to [0, 1]): GRESO's filter, with
      ``rule="greso"``.

    ``source`` is a tracker (anything with ``query(pool)``), a
    ``PromptQuery`` of the pool's prompts, or weights (float [M]), so the
    sampler works without a tracker too. Every call advances a draw
    counter: the state (``state_dict``) is the seed and that counter, and a
    sampler that loads it makes the same later draws from the same
    weights, on any device.

    With ``check_values`` off (and the tracker's too), ``draw`` and
    ``keep`` are tensor ops only and compile with
    ``torch.compile(fullgraph=True)``. With it on (the default), they
    refuse weights that are negative, NaN or infinite, at the cost of one
    host sync per call.

    Args:
        pool: int64 [M], M >= 1, the prompts to draw from: the ids or
            hashed keys the tracker takes. The sampler keeps a copy, on
            the pool's device, where its state lives too.
        rule: one of ``RULES`` (see ``prompt_weights``).
        replacement: draw with replacement (``num`` may then exceed M).
        seed: an int in int64's range; samplers with the same seed and
            counter make the same draws.
        epsilon: ``prompt_weights``'s epsilon.
        p_easy: ``prompt_weights``'s p_easy (``"greso"``).
        p_hard: ``prompt_weights``'s p_hard (``"greso"``).
        min_keep: ``prompt_weights``'s min_keep (``"greso"``).
        check_values: refuse negative or non-finite weights (a host sync
            per call); switch off (here or later, ``sampler.check_values =
            False``) to compile or for a sync-free hot path.

    Raises:
        TypeError: if ``pool`` is not an integer tensor or ``seed`` not an int.
        ValueError: if ``pool`` is not 1-D and non-empty, ``seed`` is out of
            int64's range, or an option is unknown or out of range.

    Example:
        >>> pool = torch.tensor([101, 102, 103, 104])  # prompt ids or keys
        >>> sampler = PromptSampler(pool, "spo", seed=7)
        >>> query = PromptQuery(  # from tracker.query(pool), or by hand
        ...     pass_rate=torch.tensor([0.5, 1.0, 0.0, float("nan")]),
        ...     uncertainty=torch.zeros(4),
        ...     count=torch.tensor([8, 8, 8, 0]),
        ...     streak=None,
        ... )
        >>> sampler.weights(query)  # the unknown prompt weighs the most
        tensor([0.5500, 0.0500, 0.0500, 0.5500])
        >>> positions = sampler.draw(query, 2)
        >>> positions, sampler.pool[positions]
        (tensor([3, 0]), tensor([104, 101]))
        >>> state = sampler.state_dict()
        >>> later = sampler.draw(query, 2)
        >>> sampler.load_state_dict(state)
        >>> torch.equal(sampler.draw(query, 2), later)
        True
        >>> sampler
        PromptSampler(num_prompts=4, rule='spo', replacement=False, epsilon=0.05, device=cpu)
    """

    def __init__(
        self,
        pool: torch.Tensor,
        rule: str = "spo",
        *,
        replacement: bool = False,
        seed: int = 0,
        epsilon: float = 0.05,
        p_easy: float = 0.5,
        p_hard: float = 0.5,
        min_keep: float = 0.01,
        check_values: bool = True,
    ) -> None:
        if not isinstance(pool, torch.Tensor) or not is_integer_dtype(pool.dtype):
            kind = pool.dtype if isinstance(pool, torch.Tensor) else type(pool).__name__
            raise TypeError(f"pool must be an integer tensor of prompt ids or keys, got {kind}")
        if pool.ndim != 1 or pool.shape[0] == 0:
            raise ValueError(f"pool must be a non-empty 1-D tensor [M], got shape {tuple(pool.shape)}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        if not -(1 << 63) <= seed < 1 << 63:
            raise ValueError(f"seed must lie in int64's range [-2**63, 2**63), got {seed}")
        if not isinstance(replacement, bool):
            raise TypeError(f"replacement must be a bool, got {type(replacement).__name__}")
        _check_rule_options(rule, epsilon, p_easy, p_hard, min_keep)
        self._pool = pool.detach().to(torch.int64, copy=True)
        self._rule, self._replacement = rule, replacement
        self._options = {
            "epsilon": float(epsilon),
            "p_easy": float(p_easy),
            "p_hard": float(p_hard),
            "min_keep": float(min_keep),
        }
        self.check_values = check_values
        self._seed = torch.tensor(seed, dtype=torch.int64, device=pool.device)
        self._draws = torch.zeros((), dtype=torch.int64, device=pool.device)

    # Options, read-only.

    @property
    def pool(self) -> torch.Tensor:
        """int64 [M], the prompts drawn from (the sampler's own tensor: do not modify it)."""
        return self._pool

    @property
    def num_prompts(self) -> int:
        """M, the number of prompts in the pool."""
        return self._pool.shape[0]

    @property
    def rule(self) -> str:
        """The weighting rule, one of ``RULES``."""
        return self._rule

    @property
    def replacement(self) -> bool:
        """Whether ``draw`` draws with replacement."""
        return self._replacement

    @property
    def epsilon(self) -> float:
        """The exploration floor of ``"spo"`` and ``"failure_rate"``."""
        return self._options["epsilon"]

    @property
    def p_easy(self) -> float:
        """``"greso"``'s keep probability per visit of a passing prompt's streak."""
        return self._options["p_easy"]

    @property
    def p_hard(self) -> float:
        """``"greso"``'s keep probability per visit of a failing prompt's streak."""
        return self._options["p_hard"]

    @property
    def min_keep(self) -> float:
        """``"greso"``'s least keep probability."""
        return self._options["min_keep"]

    @property
    def device(self) -> torch.device:
        """Where the pool and the state live; draws are made there."""
        return self._pool.device

    def __repr__(self) -> str:
        options = f"num_prompts={self.num_prompts}, rule={self._rule!r}, replacement={self._replacement}"
        if self._rule in ("spo", "failure_rate"):
            options += f", epsilon={self.epsilon!r}"
        elif self._rule == "greso":
            options += f", p_easy={self.p_easy!r}, p_hard={self.p_hard!r}, min_keep={self.min_keep!r}"
        return f"{type(self).__name__}({options}, device={self.device})"

    # Drawing.

    def weights(self, source: WeightSource) -> torch.Tensor:
        """Each pool prompt's weight, from a tracker, a query or weights (no host sync, no value check).

        Args:
            source: a tracker (anything with ``query``: ``source.query(pool)``
                is read), a ``PromptQuery`` of the pool's M prompts, or
                weights, float [M] on the pool's device, returned as they are.

        Returns:
            float [M] on the pool's device.

        Raises:
            TypeError: if ``source`` is none of these, or weights are not floating.
            ValueError: if the query or weights are not of the pool's shape
                and device, or ``prompt_weights`` refuses the query.
        """
        if isinstance(source, torch.Tensor):
            weights = source
            if not weights.dtype.is_floating_point:
                raise TypeError(f"weights must be a floating tensor, got dtype {weights.dtype}")
        elif isinstance(source, PromptQuery) or callable(getattr(source, "query", None)):
            query = source if isinstance(source, PromptQuery) else source.query(self._pool)
            weights = prompt_weights(query, self._rule, **self._options)
        else:
            raise TypeError(
                "source must be a tracker (with query), a PromptQuery or a float tensor of weights, "
                f"got {type(source).__name__}"
            )
        if weights.shape != self._pool.shape or weights.device != self.device:
            raise ValueError(
                f"the weights must be [M] = {tuple(self._pool.shape)} on the pool's device {self.device}, got "
                f"shape {tuple(weights.shape)} on {weights.device}: query the tracker with sampler.pool"
            )
        return weights

    def draw(self, source: WeightSource, num: int) -> torch.Tensor:
        """Draws ``num`` prompts of the pool by their weights; returns their positions in the pool.

        Without replacement, the positions are distinct and in the order
        drawn (successive sampling proportional to weight); with
        replacement, independent draws proportional to weight. Advances
        the draw counter by one; a refused call leaves it as it was.

        Args:
            source: a tracker, a ``PromptQuery`` or weights (see ``weights``).
            num: how many, >= 0; at most M without replacement.

        Returns:
            int64 [num] positions in [0, M); ``sampler.pool[positions]`` are the prompts.

        Raises:
            ValueError: if ``num`` is out of range, the weights are refused
                (with ``check_values``: negative, NaN or infinite), or the
                call is compiled with ``check_values`` on.
            TypeError: as ``weights`` raises.
        """
        if isinstance(num, bool) or not isinstance(num, int) or num < 0:
            raise ValueError(f"num must be an int >= 0, got {num!r}")
        if not self._replacement and num > self.num_prompts:
            raise ValueError(
                f"cannot draw {num} prompts without replacement from a pool of {self.num_prompts}; "
                "build the sampler with replacement=True to draw more"
            )
        weights = self._checked_weights(source, "draw").to(torch.float64)
        uniforms = _uniforms(self._seed, self._draws, num if self._replacement else self.num_prompts)
        self._draws.add_(1)
        if self._replacement:
            return self._draw_with_replacement(weights, uniforms)
        return self._race(weights, uniforms, num)

    def keep(self, source: WeightSource) -> torch.Tensor:
        """Keeps each prompt of the pool independently, with probability its weight (GRESO's filter).

        Weights are read as probabilities: 0 or less never, 1 or more
        always. Advances the draw counter by one; a refused call leaves it
        as it was.

        Args:
            source: a tracker, a ``PromptQuery`` or weights (see ``weights``).

        Returns:
            bool [M], True for the prompts kept.

        Raises:
            ValueError: as ``draw`` raises for refused weights.
            TypeError: as ``weights`` raises.
        """
        weights = self._checked_weights(source, "keep").to(torch.float64)
        uniforms = _uniforms(self._seed, self._draws, self.num_prompts)
        self._draws.add_(1)
        return uniforms < weights

    def _checked_weights(self, source: WeightSource, method: str) -> torch.Tensor:
        """``weights(source)``, with negative and non-finite weights refused when ``check_values`` is on."""
        if self.check_values and is_compiling():
            raise ValueError(
                f"{type(self).__name__}.{method} cannot be compiled with check_values=True: the check reads "
                "the weights back to the host. Set sampler.check_values = False (and the tracker's) before "
                "torch.compile."
            )
        weights = self.weights(source)
        if self.check_values:
            bad = ~torch.isfinite(weights) | (weights < 0)
            if bad.any():
                raise ValueError(
                    f"weights must be finite and >= 0, got {int(bad.sum())} negative, NaN or infinite "
                    f"of {self.num_prompts}, first at position {int(bad.nonzero()[0, 0])}"
                )
        return weights

    @staticmethod
    def _draw_with_replacement(weights: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
        """Inverse CDF: position i where cdf[i - 1] <= u * total < cdf[i].

        Args:
            weights: float64 [M], >= 0.
            uniforms: float64 [num] in [0, 1).
        """
        cdf = torch.cumsum(weights, 0)  # [M]
        total = cdf[-1]
        # All weights 0: uniform over the pool.
        cdf = torch.where(total > 0, cdf, torch.arange(1, cdf.shape[0] + 1, dtype=cdf.dtype, device=cdf.device))
        positions = torch.searchsorted(cdf, uniforms * cdf[-1], right=True)  # [num]
        # u * total < total in float64, unless total is subnormal: then stay on the last positive weight.
        positions_all = torch.arange(weights.shape[0], device=weights.device)
        last = torch.where(weights > 0, positions_all, 0).amax()
        last = torch.where(total > 0, last, weights.shape[0] - 1)
        return torch.minimum(positions, last)

    @staticmethod
    def _race(weights: torch.Tensor, uniforms: torch.Tensor, num: int) -> torch.Tensor:
        """Successive sampling by an exponential race: the ``num`` least ``E / w`` win, in order.

        Keys are compared in log space, ``log E - log w``, finite for every
        positive weight; zero weights get keys past all of those, so they
        come last, in a uniformly random order of their own.

        Args:
            weights: float64 [M], >= 0.
            uniforms: float64 [M] in [0, 1).
            num: <= M.
        """
        log_time = torch.log(-torch.log1p(-uniforms)).clamp_min(_LEAST_LOG_TIME)  # log of Exp(1), [M]
        keys = torch.where(weights > 0, log_time - torch.log(weights), _ZERO_WEIGHT_KEY + log_time)
        return torch.topk(keys, num, largest=False, sorted=True).indices

    # State.

    def state_dict(self) -> Dict[str, torch.Tensor]:
        """A copy of the state: ``seed`` and ``draws`` (the draw counter), int64 scalars on the device.

        Returns:
            Tensors by name; ``load_state_dict`` of a sampler built with the
            same pool and options continues with the same draws.
        """
        return {"seed": self._seed.clone(), "draws": self._draws.clone()}

    def load_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Replaces the state with a copy of ``state_dict``, in place (a compiled caller stays valid).

        Everything is checked before anything is copied, so a refused state
        leaves the sampler as it was.

        Args:
            state_dict: as ``state_dict`` returns it, on any device.

        Raises:
            TypeError: if it is not a mapping of tensors.
            ValueError: if its keys, shapes or dtypes differ, or ``draws`` is negative.
        """
        live = {"seed": self._seed, "draws": self._draws}
        kind = type(self).__name__
        check_state_dict(kind, live, state_dict, what="sampler")
        if int(state_dict["draws"]) < 0:
            raise ValueError(f"{kind} state 'draws' must be >= 0, got {int(state_dict['draws'])}")
        for name, tensor in live.items():
            tensor.copy_(state_dict[name])
