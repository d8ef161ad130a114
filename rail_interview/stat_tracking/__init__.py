"""Per-prompt reward stat trackers for policy-gradient RL.

A tracker turns (prompt id, reward) pairs into advantages,
``(reward - mean) / (std + eps)``, with ``mean`` and ``std`` describing recent
rewards of the same prompt, or of the whole batch until a prompt has enough.
Prompt ids are integers in [0, num_prompts); all state lives in fixed-shape
tensors on the tracker's device. This package does not depend on the toy
problem and can be dropped into any trainer.

Dimensions used in docstrings: N samples in a batch, P prompts, K buffer slots.
"""

from rail_interview.stat_tracking.base import StatTracker, TrackerStats, resolve_device
from rail_interview.stat_tracking.batch import BatchStatTracker
from rail_interview.stat_tracking.buffer import BufferStatTracker
from rail_interview.stat_tracking.ema import EmaStatTracker
from rail_interview.stat_tracking.prompt_index import PromptIndex, PromptIndexFullError
from rail_interview.stat_tracking.recording import (
    PromptStatsLog,
    PromptStatsRecorder,
    load_prompt_stats,
    truncate_prompt_stats,
)
from rail_interview.stat_tracking.reference import ReferenceBufferStatTracker, ReferenceEmaStatTracker

__all__ = [
    "BatchStatTracker",
    "BufferStatTracker",
    "EmaStatTracker",
    "PromptIndex",
    "PromptIndexFullError",
    "PromptStatsLog",
    "PromptStatsRecorder",
    "ReferenceBufferStatTracker",
    "ReferenceEmaStatTracker",
    "StatTracker",
    "TrackerStats",
    "load_prompt_stats",
    "truncate_prompt_stats",
    "resolve_device",
]
