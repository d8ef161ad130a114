"""The presets against plain transcriptions of the systems they reproduce.

Two links, each tested on its own: ``ReferenceAdvantageTracker`` with a
preset's options equals the system's own code (tests/system_references.py),
and the tensor preset equals the system, in float64 to 1e-9 and in float32
to a loose tolerance, whatever the order of the batch. Batches have
singletons, zero-variance (pass/fail) groups, groups spread over the batch
and, for TRL, unscorable (NaN) rewards.
"""

import dataclasses
import random
from typing import Callable, Dict, List, Sequence, Tuple

import hypothesis
import numpy as np
import pytest
import torch
from hypothesis import strategies as st

from rail_interview.stat_tracking import presets
from rail_interview.stat_tracking.reference import ReferenceAdvantageTracker
from system_references import (
    DdpoPerPromptStatTracker,
    FlowGrpoPerPromptStatTracker,
    trl_grpo_advantages,
    verl_grpo_advantages,
    verl_rloo_advantages,
)

NUM_PROMPTS = 6
Batch = Tuple[List[int], List[float]]


class _Stateless:
    """A system's advantage function as an object with ``update``, like the trackers."""

    def __init__(self, function: Callable, **options) -> None:
        self.function, self.options = function, options

    def update(self, prompts: Sequence[int], rewards: Sequence[float]):
        return self.function(list(prompts), list(rewards), **self.options)


class _ClearedEveryUpdate:
    """flow_grpo's tracker as its training script drives it: ``clear()`` after each ``update``."""

    def __init__(self, global_std: bool) -> None:
        self.tracker = FlowGrpoPerPromptStatTracker(global_std)

    def update(self, prompts: Sequence[int], rewards: Sequence[float]):
        advantages = self.tracker.update(prompts, rewards)
        self.tracker.clear()
        return advantages


@dataclasses.dataclass(frozen=True)
class Preset:
    """One preset: its ``presets`` function and arguments, its reference options, its system."""

    function: str
    arguments: Dict[str, object]
    reference: Dict[str, object]
    system: Callable[[], object]
    nan_rewards: bool = False  # the system takes NaN as "unscorable"


PRESETS: Dict[str, Preset] = {
    "ddpo_K4_min3": Preset(
        "ddpo",
        dict(buffer_size=4, min_count=3),
        dict(memory="buffer", buffer_size=4, min_count=3, eps=1e-6, fallback="batch"),
        lambda: DdpoPerPromptStatTracker(4, 3),
    ),
    "ddpo_K3_min1": Preset(
        "ddpo",
        dict(buffer_size=3, min_count=1),
        dict(memory="buffer", buffer_size=3, min_count=1, eps=1e-6, fallback="batch"),
        lambda: DdpoPerPromptStatTracker(3, 1),
    ),
    "ddpo_default": Preset(
        "ddpo",
        {},
        dict(memory="buffer", buffer_size=32, min_count=16, eps=1e-6, fallback="batch"),
        lambda: DdpoPerPromptStatTracker(32, 16),
    ),
    **{
        f"trl_grpo_{scale}": Preset(
            "trl_grpo",
            dict(scale_rewards=scale),
            dict(
                scale={"group": "prompt_std", "batch": "batch_std", "none": "none"}[scale],
                ddof=1,
                eps=1e-4,
                min_count=2,
                fallback="zero",
                nan_rewards="invalid",
            ),
            lambda scale=scale: _Stateless(trl_grpo_advantages, scale_rewards=scale),
            nan_rewards=True,
        )
        for scale in ("group", "batch", "none")
    },
    **{
        f"verl_grpo_std_{norm}": Preset(
            "verl_grpo",
            dict(norm_adv_by_std=norm),
            dict(scale="prompt_std" if norm else "none", ddof=1, eps=1e-6, min_count=2, fallback="raw"),
            lambda norm=norm: _Stateless(verl_grpo_advantages, norm_adv_by_std_in_grpo=norm),
        )
        for norm in (True, False)
    },
    "verl_rloo": Preset(
        "verl_rloo",
        {},
        dict(baseline="leave_one_out", scale="none", min_count=2, fallback="raw"),
        lambda: _Stateless(verl_rloo_advantages),
    ),
    **{
        f"flow_grpo_global_{global_std}": Preset(
            "flow_grpo",
            dict(global_std=global_std),
            dict(scale="batch_std" if global_std else "prompt_std", ddof=0, eps=1e-4, min_count=2, fallback="zero"),
            lambda global_std=global_std: _ClearedEveryUpdate(global_std),
        )
        for global_std in (True, False)
    },
}


def _random_batch(rng: random.Random, size: int, *, nan: bool, layout: str, pass_fail: bool) -> Batch:
    """A batch over NUM_PROMPTS prompts with singletons and repeats, laid out as asked.

    ``layout``: ``"contiguous"`` (groups in blocks), ``"interleaved"`` (round
    robin) or ``"shuffled"``.
    """
    weights = [rng.random() ** 3 for _ in range(NUM_PROMPTS)]  # some prompts frequent, some rare
    ids = sorted(rng.choices(range(NUM_PROMPTS), weights, k=size))
    if layout == "interleaved":
        by_prompt: Dict[int, List[int]] = {}
        for prompt in ids:
            by_prompt.setdefault(prompt, []).append(prompt)
        ids = [group[j] for j in range(size) for group in by_prompt.values() if j < len(group)]
    elif layout == "shuffled":
        rng.shuffle(ids)
    if pass_fail:
        rewards = [float(rng.random() < 0.6) for _ in ids]
    else:
        rewards = [rng.gauss(0.0, 3.0) + (prompt - 2) * 5 for prompt in ids]
    if nan:
        rewards = [float("nan") if rng.random() < 0.2 else r for r in rewards]
    return ids, rewards


def _batches(seed: int, nan: bool) -> List[Batch]:
    """A sequence of batches covering every layout, both reward kinds and awkward sizes."""
    rng = random.Random(seed)
    return [
        _random_batch(rng, size, nan=nan, layout=layout, pass_fail=pass_fail)
        for size, layout, pass_fail in [
            (1, "contiguous", False),
            (12, "contiguous", True),
            (9, "interleaved", False),
            (16, "shuffled", True),
            (20, "shuffled", False),
            (2, "interleaved", True),
            (13, "interleaved", False),
        ]
    ]


def _assert_close(got, want, *, atol: float = 1e-9, rtol: float = 1e-9, message: str = "") -> None:
    torch.testing.assert_close(
        torch.as_tensor(np.asarray(got, dtype=np.float64)),
        torch.as_tensor(np.asarray(want, dtype=np.float64)),
        atol=atol,
        rtol=rtol,
        msg=lambda default: f"{message}\n{default}",
    )


# -- The reference with each preset's options is the system ------------------------------------------------------


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_reference_with_preset_options_matches_the_system(name):
    preset = PRESETS[name]
    for seed in range(3):
        reference, system = ReferenceAdvantageTracker(**preset.reference), preset.system()
        for step, (ids, rewards) in enumerate(_batches(seed, nan=preset.nan_rewards)):
            _assert_close(
                reference.update(ids, rewards),
                system.update(ids, rewards),
                message=f"seed {seed}, step {step}: {ids} {rewards}",
            )


@hypothesis.settings(max_examples=80, deadline=None, derandomize=True)
@hypothesis.given(data=st.data())
def test_reference_matches_the_systems_on_random_sequences(data):
    name = data.draw(st.sampled_from(sorted(PRESETS)), label="preset")
    preset = PRESETS[name]
    reference, system = ReferenceAdvantageTracker(**preset.reference), preset.system()
    # Rewards on a grid of 1/8: exact, so zero-variance groups are common and no group is ill-conditioned.
    grid = st.integers(-24, 24).map(lambda k: k / 8)
    reward = st.one_of(grid, st.just(float("nan"))) if preset.nan_rewards else grid
    for _ in range(data.draw(st.integers(1, 4), label="steps")):
        size = data.draw(st.integers(1, 14), label="size")
        ids = data.draw(st.lists(st.integers(0, 3), min_size=size, max_size=size), label="ids")
        rewards = data.draw(st.lists(reward, min_size=size, max_size=size), label="rewards")
        _assert_close(reference.update(ids, rewards), system.update(ids, rewards), message=name)


def test_trl_unscorable_samples_and_lone_scorable_samples_get_zero():
    nan = float("nan")
    # Prompt 0: 1, NaN, 3 -> mean 2, sample std sqrt(2); prompt 1: 5 and NaN -> one scorable sample.
    ids, rewards = [0, 1, 0, 0, 1], [1.0, 5.0, nan, 3.0, nan]
    expected = [-1 / (2**0.5 + 1e-4), 0.0, 0.0, 1 / (2**0.5 + 1e-4), 0.0]
    _assert_close(trl_grpo_advantages(ids, rewards), expected)
    _assert_close(ReferenceAdvantageTracker(**PRESETS["trl_grpo_group"].reference).update(ids, rewards), expected)


# -- The tensor presets are the systems ----------------------------------------------------------------------------


def _presets():
    return presets


def _tensor_preset(name: str, dtype: torch.dtype, **options):
    preset = PRESETS[name]
    return getattr(_presets(), preset.function)(NUM_PROMPTS, dtype=dtype, **preset.arguments, **options)


def _tensors(ids: List[int], rewards: List[float], dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor(ids, dtype=torch.int64), torch.tensor(rewards, dtype=torch.float64).to(dtype)


@pytest.mark.parametrize("dtype, atol", [(torch.float64, 1e-9), (torch.float32, 1e-4)], ids=["float64", "float32"])
@pytest.mark.parametrize("name", sorted(PRESETS))
def test_tensor_preset_matches_the_system(name, dtype, atol):
    tracker, system = _tensor_preset(name, dtype), PRESETS[name].system()
    for step, (ids, rewards) in enumerate(_batches(seed=7, nan=PRESETS[name].nan_rewards)):
        b_ids, b_rewards = _tensors(ids, rewards, dtype)
        advantages = tracker.update(b_ids, b_rewards)
        assert advantages.dtype == dtype and advantages.shape == b_ids.shape
        # The system sees the rewards as the tracker's dtype holds them.
        _assert_close(
            advantages,
            system.update(ids, b_rewards.double().tolist()),
            atol=atol,
            rtol=atol,
            message=f"step {step}: {ids} {rewards}",
        )


@pytest.mark.parametrize("name", sorted(name for name, preset in PRESETS.items() if preset.function != "ddpo"))
def test_tensor_preset_is_independent_of_sample_order(name):
    # Presets without memory: permuting the batch permutes the advantages, and each order matches the system.
    generator = torch.Generator().manual_seed(3)
    for ids, rewards in _batches(seed=11, nan=PRESETS[name].nan_rewards):
        order = torch.randperm(len(ids), generator=generator).tolist()
        s_ids, s_rewards = [ids[i] for i in order], [rewards[i] for i in order]
        tracker = _tensor_preset(name, torch.float64)
        advantages = tracker.update(*_tensors(ids, rewards, torch.float64))
        shuffled = tracker.update(*_tensors(s_ids, s_rewards, torch.float64))
        _assert_close(shuffled, advantages[order], message=f"{ids} {rewards} order {order}")
        _assert_close(shuffled, PRESETS[name].system().update(s_ids, s_rewards))


def test_tensor_presets_pass_other_keywords_to_the_tracker():
    presets = _presets()
    tracker = presets.trl_grpo(NUM_PROMPTS, memory="buffer", buffer_size=3, dtype=torch.float64)
    options = dict(PRESETS["trl_grpo_group"].reference, memory="buffer", buffer_size=3)
    reference = ReferenceAdvantageTracker(**options)
    for ids, rewards in _batches(seed=5, nan=True):
        _assert_close(tracker.update(*_tensors(ids, rewards, torch.float64)), reference.update(ids, rewards))


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_compiled_preset_update_matches_eager(name):
    eager = _tensor_preset(name, torch.float32, check_values=False)
    compiled_tracker = _tensor_preset(name, torch.float32, check_values=False)
    torch._dynamo.reset()
    compiled = torch.compile(compiled_tracker.update, fullgraph=True, backend="eager")
    rng = random.Random(1)
    for step in range(3):  # one shape: one compilation
        ids, rewards = _random_batch(rng, 12, nan=PRESETS[name].nan_rewards, layout="shuffled", pass_fail=step == 1)
        b_ids, b_rewards = _tensors(ids, rewards, torch.float32)
        _assert_close(
            compiled(b_ids, b_rewards), eager.update(b_ids, b_rewards), atol=1e-6, rtol=1e-6, message=f"step {step}"
        )
    for (key, want), (_, got) in zip(sorted(eager.state_dict().items()), sorted(compiled_tracker.state_dict().items())):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6, msg=key)
