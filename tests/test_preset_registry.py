"""The preset registry: names, parameters, lookup, and the training methods built exactly as before.

The training config names a method (``config.stat_tracking.method``) and
the training code builds ``presets.get(method, P, **options)`` with the
options that ``presets.parameters(method)`` names. Before the registry,
``training.build_tracker`` mapped the methods to trackers through a string
table; ``_build_tracker_before_the_registry`` transcribes what it built
(commit c3a6c03, ``rail_interview/training.py``), and the registry's
trackers must give the same advantages, reports and state dicts bit for bit.
"""

import itertools
import warnings
from typing import Dict, Optional

import pytest
import torch

from rail_interview.stat_tracking import (
    AdvantageTracker,
    BatchStatTracker,
    BufferStatTracker,
    EmaStatTracker,
    presets,
)

NUM_PROMPTS = 5
COMMON = {"dtype": torch.float32, "device": None, "check_values": True, "process_group": None, "keys": "ids"}
PUBLIC = (
    "ddpo",
    "trl_grpo",
    "verl_grpo",
    "verl_rloo",
    "flow_grpo",
    "spo",
    "verl_gdpo",
    "nemo_rl_gdpo",
    "flow_factory_gdpo",
    "verl_opo",
)
TRAINING = ("buffer", "ema", "batch", "grpo", "dr_grpo", "rloo")


def _build_tracker_before_the_registry(
    method: str, memory: str, buffer_size: int, min_count: int, decay: float, fallback: str, **common
) -> AdvantageTracker:
    """``training.build_tracker`` as it was, for a config's method and options."""
    family = {
        "grpo": ("verl_grpo", {}),
        "dr_grpo": ("verl_grpo", {"norm_adv_by_std": False}),
        "rloo": ("verl_rloo", {}),
    }
    if method in family:
        preset, options = family[method]
        if memory == "buffer":
            options = dict(options, memory="buffer", buffer_size=buffer_size)
        elif memory == "ema":
            options = dict(options, memory="ema", decay=decay)
        if memory != "none":
            options.update(min_count=min_count)
        return getattr(presets, preset)(NUM_PROMPTS, fallback=fallback, **options, **common)
    if method == "batch":
        return BatchStatTracker(NUM_PROMPTS, **common)
    if method == "buffer":
        return BufferStatTracker(NUM_PROMPTS, buffer_size=buffer_size, min_count=min_count, **common)
    return EmaStatTracker(NUM_PROMPTS, decay=decay, min_count=min_count, **common)


def _config_options(method: str, options: Dict) -> Dict:
    """The options the training code passes: those the method's preset names."""
    return {name: value for name, value in options.items() if name in presets.parameters(method)}


def _build_quietly(build, *args, **kwargs) -> AdvantageTracker:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # min_count below 2, or a buffer below min_count
        return build(*args, **kwargs)


def _grid():
    for method in TRAINING:
        memories = ("none", "buffer", "ema") if method in ("grpo", "dr_grpo", "rloo") else ("none",)
        fallbacks = ("zero", "raw", "batch") if method in ("grpo", "dr_grpo", "rloo") else ("zero",)
        for memory, fallback, buffer_size, min_count, decay, dtype in itertools.product(
            memories, fallbacks, (2, 32), (2, 3, 16), (0.5, 0.9), (torch.float32, torch.float64)
        ):
            yield (
                method,
                dict(memory=memory, buffer_size=buffer_size, min_count=min_count, decay=decay, fallback=fallback),
                dtype,
            )


def _assert_identical(got: Optional[torch.Tensor], want: Optional[torch.Tensor], message: str) -> None:
    if want is None:  # a report's field of several rewards, with one
        assert got is None, message
        return
    assert got.dtype == want.dtype and torch.equal(got, want), message
    if got.is_floating_point():
        assert torch.equal(torch.signbit(got), torch.signbit(want)), message  # zeros of one sign too


@pytest.mark.parametrize("method", TRAINING)
def test_every_training_method_builds_what_the_training_code_built_before(method):
    generator = torch.Generator().manual_seed(len(method))
    cases = [(options, dtype) for name, options, dtype in _grid() if name == method]
    for options, dtype in cases:
        message = f"{method} {options} {dtype}"
        common = dict(COMMON, dtype=dtype)
        before = _build_quietly(_build_tracker_before_the_registry, method, **options, **common)
        now = _build_quietly(presets.get, method, NUM_PROMPTS, **_config_options(method, options), **common)
        assert type(now) is type(before) and repr(now) == repr(before), message
        for step in range(4):
            ids = torch.randint(NUM_PROMPTS, (7 + 3 * step,), generator=generator)
            rewards = torch.randn(len(ids), generator=generator, dtype=torch.float64).round().to(dtype)
            if step % 2:
                got, want = now.update_with_report(ids, rewards), before.update_with_report(ids, rewards)
                for field, a, b in zip(got._fields, got, want):
                    _assert_identical(a, b, f"{message} step {step} {field}")
            else:
                _assert_identical(now.update(ids, rewards), before.update(ids, rewards), f"{message} step {step}")
        state, expected = now.state_dict(), before.state_dict()
        assert set(state) == set(expected), message
        for name in state:
            _assert_identical(state[name], expected[name], f"{message} state {name}")


def test_a_grpo_method_without_memory_needs_two_samples_whatever_min_count_says():
    assert presets.get("grpo", NUM_PROMPTS, min_count=7).min_count == 2
    assert presets.get("rloo", NUM_PROMPTS, memory="buffer", min_count=7).min_count == 7


def test_names_list_the_public_presets_then_the_training_methods():
    assert presets.names() == PUBLIC + TRAINING


@pytest.mark.parametrize(
    "name, own",
    [
        ("ddpo", {"buffer_size": 32, "min_count": 16}),
        (
            "trl_grpo",
            {"scale_rewards": "group", "multi_objective_aggregation": "sum_then_normalize", "reward_weights": None},
        ),
        ("verl_gdpo", {"num_rewards": 2, "reward_weights": None}),
        (
            "nemo_rl_gdpo",
            {"num_rewards": 2, "reward_weights": None, "normalize_rewards": True, "use_leave_one_out_baseline": True},
        ),
        ("flow_factory_gdpo", {"num_rewards": 2, "reward_weights": None}),
        ("verl_opo", {}),
        ("verl_grpo", {"norm_adv_by_std": True}),
        ("verl_rloo", {}),
        ("flow_grpo", {"global_std": True}),
        ("spo", {"rho": 0.875, "repeats": "last"}),
        ("buffer", {"buffer_size": 32, "min_count": 16}),
        ("ema", {"decay": 0.7, "min_count": 16}),
        ("batch", {}),
        *[
            (
                name,
                {
                    "memory": "none",
                    "buffer_size": 32,
                    "decay": 0.7,
                    "rho": 0.9,
                    "min_count": 16,
                    "fallback": "zero",
                    "include_batch": True,
                    "track_streaks": False,
                },
            )
            for name in ("grpo", "dr_grpo", "rloo")
        ],
    ],
)
def test_parameters_are_the_named_keywords_with_their_defaults(name, own):
    assert presets.parameters(name) == {**own, **COMMON}


def test_public_presets_pass_other_keywords_on_and_training_methods_refuse_them():
    assert presets.get("verl_grpo", NUM_PROMPTS, memory="ema", decay=0.5).memory == "ema"
    for method in TRAINING:
        with pytest.raises(TypeError, match="unexpected keyword argument 'eps'"):
            presets.get(method, NUM_PROMPTS, eps=1e-3)


def test_options_are_checked_once_by_the_tracker():
    with pytest.raises(ValueError, match="memory must be one of 'none', 'buffer', 'ema', 'beta'; got 'lstm'"):
        presets.get("grpo", NUM_PROMPTS, memory="lstm")
    with pytest.raises(ValueError, match="fallback must be one of 'batch', 'raw', 'zero'; got 'mean'"):
        presets.get("dr_grpo", NUM_PROMPTS, fallback="mean")


@pytest.mark.parametrize("lookup", [presets.get, presets.parameters])
def test_an_unknown_name_is_refused_with_the_choices(lookup):
    args = ("grpo2",) if lookup is presets.parameters else ("grpo2", NUM_PROMPTS)
    with pytest.raises(ValueError, match=r"unknown preset 'grpo2'; choose from 'ddpo', .*'rloo'"):
        lookup(*args)


def test_register_adds_a_preset_and_refuses_a_taken_name():
    def halved(num_prompts: int, *, decay: float = 0.5, device: Optional[str] = None, **options) -> AdvantageTracker:
        return AdvantageTracker(num_prompts, "ema", decay=decay, device=device, **options)

    try:
        assert presets.register("test_halved")(halved) is halved
        assert presets.names()[-1] == "test_halved"
        assert presets.parameters("test_halved") == {"decay": 0.5, "device": None}
        assert presets.get("test_halved", 3, min_count=4).min_count == 4
        with pytest.raises(ValueError, match="a preset named 'test_halved' is already registered"):
            presets.register("test_halved")(halved)
    finally:
        presets._PRESETS.pop("test_halved", None)  # pylint: disable=protected-access


def test_the_module_table_lists_every_preset():
    table = presets.__doc__
    for name in presets.names():
        assert f"\n{name} " in table, name
