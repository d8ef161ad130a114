"""Per-prompt reward stat trackers for policy-gradient RL.

A tracker turns (prompt id, reward) pairs into advantages,
``(reward - mean) / (std + eps)``, with ``mean`` and ``std`` describing recent
rewards of the same prompt, or of the whole batch until a prompt has enough.
``AdvantageTracker`` composes any memory (none, a ring buffer, an EMA, a
Beta posterior of the pass rate) with any estimator of the GRPO family, its
statistics read with the batch or from before it; ``presets`` is the
registry of the combinations by name: those that reproduce public trainers
(DDPO, TRL, verl, flow_grpo, SPO) and the training config's methods.
``tracker.query`` says what memory holds of each prompt (pass rate,
uncertainty, count, zero-variance streak), and ``PromptSampler`` chooses
the next prompts by it, on the device.
Prompts are integer ids in [0, num_prompts), or, with ``keys="hashed"``, any
int64 keys (``prompt_keys`` for strings, ``token_keys`` for token ids) that a
fixed-size LRU table maps to rows. All state lives in fixed-shape tensors on
the tracker's device. This package depends on torch alone (not on the toy
problem, absl, ml_collections or matplotlib) and can be dropped into any
trainer; ``ddpo_compat`` is a drop-in for ddpo-pytorch's tracker.

Dimensions used in docstrings: N samples in a batch, P prompts, K buffer slots.
"""

from rail_interview.stat_tracking import presets
from rail_interview.stat_tracking.batch import BatchStatTracker
from rail_interview.stat_tracking.buffer import BufferStatTracker
from rail_interview.stat_tracking.ema import EmaStatTracker
from rail_interview.stat_tracking.fast_path import CompiledUpdate
from rail_interview.stat_tracking.keys import KeyTable, canonical_text, identity_keys, prompt_keys, token_keys
from rail_interview.stat_tracking.prompt_index import PromptIndex, PromptIndexFullError
from rail_interview.stat_tracking.recording import (
    PromptStatsLog,
    PromptStatsRecorder,
    load_prompt_stats,
    truncate_prompt_stats,
)
from rail_interview.stat_tracking.reference import ReferenceBufferStatTracker, ReferenceEmaStatTracker
from rail_interview.stat_tracking.sampling import PromptSampler, prompt_weights
from rail_interview.stat_tracking.tracker import AdvantageTracker
from rail_interview.stat_tracking.types import PromptQuery, TrackerStats, UpdateReport, resolve_device

#: The tracker interface, for type hints: ``AdvantageTracker`` is the one tracker class.
StatTracker = AdvantageTracker

__all__ = [
    "AdvantageTracker",
    "BatchStatTracker",
    "BufferStatTracker",
    "CompiledUpdate",
    "EmaStatTracker",
    "KeyTable",
    "PromptIndex",
    "PromptIndexFullError",
    "PromptQuery",
    "PromptSampler",
    "PromptStatsLog",
    "PromptStatsRecorder",
    "ReferenceBufferStatTracker",
    "ReferenceEmaStatTracker",
    "StatTracker",
    "TrackerStats",
    "UpdateReport",
    "load_prompt_stats",
    "presets",
    "canonical_text",
    "identity_keys",
    "prompt_keys",
    "prompt_weights",
    "token_keys",
    "truncate_prompt_stats",
    "resolve_device",
]
