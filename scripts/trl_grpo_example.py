"""TRL's GRPO with and without per-prompt memory, on a tiny model on the CPU in about a minute.

Usage (needs the train and trl extras: pip install -e ".[train,trl]"):
    python scripts/trl_grpo_example.py
    python scripts/trl_grpo_example.py --steps=300 --memory=ema --ema_decay=0.9

Trains ``TrackedGRPOTrainer`` twice from the same randomly initialised
one-layer Qwen2 (``rail_interview/studies/tiny_lm.py``: a word-level
tokenizer built locally, nothing downloaded) on the "find the word" task,
whose pass/fail rewards leave many groups of completions all equal:

1. without ``tracker=``: TRL's own GRPO advantages (the memoryless tracker
   that reproduces them);
2. with a per-prompt memory (``presets.trl_grpo(..., memory=...)``): one
   line more.

It prints, for each run, the pass rate over each fifth of the run (the
mean of TRL's logged ``reward``), and what the tracker did (means over
the steps of its ``tracker/*`` metrics): the share of samples in zero-variance groups, the share of
those that got a non-zero advantage from memory (TRL gives them 0), and
the share that fell back for want of history. ``docs/trl.md`` quotes its
output.
"""

import tempfile
import time
from typing import Dict, List

import trl
from absl import app, flags
from transformers import PrinterCallback

from rail_interview.integrations.trl import TrackedGRPOTrainer
from rail_interview.stat_tracking import presets
from rail_interview.studies import tiny_lm

FLAGS = flags.FLAGS
flags.DEFINE_integer("steps", 1000, "Training steps of each run.", lower_bound=10)
flags.DEFINE_integer("num_prompts", 12, "Distinct prompts of the task.", lower_bound=1, upper_bound=24)
flags.DEFINE_enum("memory", "buffer", ["buffer", "ema"], "The memory of the second run.")
flags.DEFINE_integer("buffer_size", 16, "Rewards kept per prompt (--memory=buffer).", lower_bound=1)
flags.DEFINE_float("ema_decay", 0.9, "Weight kept by the old statistics per reward (--memory=ema).")
flags.DEFINE_integer("min_count", 8, "Rewards a prompt needs before its memory is used.", lower_bound=2)
flags.DEFINE_integer("seed", 0, "Seed of the model's weights and of TRL's sampling.")

_METRICS = ("tracker/zero_std_frac", "tracker/zero_std_signal_frac", "tracker/fallback_frac")


def _train(tracker, steps: int, num_prompts: int, seed: int) -> Dict[str, str]:
    """One run; returns its pass rate over each fifth of the steps, the tracker's metrics and its seconds."""
    with tempfile.TemporaryDirectory(prefix="trl-grpo-example-") as output_dir:
        return _train_in(output_dir, tracker, steps, num_prompts, seed)


def _train_in(output_dir: str, tracker, steps: int, num_prompts: int, seed: int) -> Dict[str, str]:
    """``_train`` with TRL's output directory given."""
    config = trl.GRPOConfig(**tiny_lm.trainer_config(output_dir, max_steps=steps, seed=seed, learning_rate=0.2))
    extra = {} if tracker is None else {"tracker": tracker}
    trainer = TrackedGRPOTrainer(
        model=tiny_lm.model(seed),
        reward_funcs=tiny_lm.find_the_word_reward,
        args=config,
        train_dataset=tiny_lm.dataset(num_prompts=num_prompts, repeats=steps),
        processing_class=tiny_lm.tokenizer(),
        **extra,
    )
    trainer.remove_callback(PrinterCallback)  # TRL's per-step dict printout; the summary follows
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    logs = [entry for entry in trainer.state.log_history if "reward" in entry]
    fifth = max(1, len(logs) // 5)
    fifths = [logs[index * fifth : (index + 1) * fifth] for index in range(5)]
    result = {"pass rate by fifth of the run": " ".join(f"{_mean('reward', part):.3f}" for part in fifths)}
    result.update({name: f"{_mean(name, logs):.3f}" for name in _METRICS})
    result["seconds"] = f"{seconds:.1f}"
    return result


def _mean(name: str, entries: List[dict]) -> float:
    """The mean of a logged metric over some steps' log entries."""
    return sum(entry[name] for entry in entries) / len(entries)


def main(argv: List[str]) -> None:
    """Trains both runs and prints the comparison."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if not 0.0 < FLAGS.ema_decay < 1.0:
        raise app.UsageError(f"--ema_decay must be in (0, 1), got {FLAGS.ema_decay}")
    options = {"buffer_size": FLAGS.buffer_size} if FLAGS.memory == "buffer" else {"decay": FLAGS.ema_decay}
    memory = presets.trl_grpo(
        FLAGS.num_prompts, memory=FLAGS.memory, min_count=FLAGS.min_count, keys="hashed", **options
    )
    runs = {
        "TRL's GRPO (no tracker=)": _train(None, FLAGS.steps, FLAGS.num_prompts, FLAGS.seed),
        f"with memory: {memory!r}": _train(memory, FLAGS.steps, FLAGS.num_prompts, FLAGS.seed),
    }
    for name, result in runs.items():
        print(name)
        for metric, value in result.items():
            print(f"  {metric:<30} {value}")


if __name__ == "__main__":
    app.run(main)
