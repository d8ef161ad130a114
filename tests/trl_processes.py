"""One process of a multi-process TRL run, started by ``torchrun`` from ``tests/test_trl_integration.py``.

Usage: ``torchrun --nproc_per_node 2 tests/trl_processes.py OUTPUT_DIR``.

Each process trains ``TrackedGRPOTrainer`` with a buffer memory on the tiny
task (``trl_setup``) for three steps, on the CPU (gloo), and saves to
``OUTPUT_DIR/process<i>.pt`` what the test compares with one process: each
step's gathered keys and rewards, the advantages this process trained on,
and its tracker's final state.
"""

import os
import sys

import torch
import trl
import trl_setup

from rail_interview.integrations.trl import TrackedGRPOTrainer
from rail_interview.stat_tracking import presets

#: The tracker every process builds; the test builds the same one for the single-process reference.
TRACKER_OPTIONS = dict(memory="buffer", buffer_size=8, min_count=2, keys="hashed")
NUM_PROMPTS = 16


class KeyRecording(trl_setup.recording(TrackedGRPOTrainer)):
    """Also keeps each training batch's gathered keys."""

    def _gather_keys(self, inputs, output):
        """The parent's keys [B_global], recorded."""
        keys = super()._gather_keys(inputs, output)
        self.__dict__.setdefault("keys", []).append(keys.clone())
        return keys


def main(output_dir: str) -> None:
    """Trains three steps and saves this process's record."""
    # Six samples per process, groups of four: the second group of each batch straddles the processes.
    run_dir = os.path.join(output_dir, "run")
    config = trl.GRPOConfig(**trl_setup.config_kwargs(run_dir, per_device_train_batch_size=6, max_steps=3))
    trainer = KeyRecording(
        model=trl_setup.model(0),  # an object: under torchrun, save_pretrained may write on one process only
        reward_funcs=[trl_setup.in_range_reward, trl_setup.sometimes_none_reward],
        args=config,
        train_dataset=trl_setup.dataset(num_prompts=4),
        processing_class=trl_setup.tokenizer(),
        tracker=presets.trl_grpo(NUM_PROMPTS, **TRACKER_OPTIONS),
    )
    trainer.train()
    record = {
        "process_index": trainer.accelerator.process_index,
        "num_processes": trainer.accelerator.num_processes,
        "keys": trainer.keys,
        "rewards": trainer.rewards,
        "advantages": trainer.recorded,
        "state": trainer.tracker.state_dict(),
    }
    torch.save(record, os.path.join(output_dir, f"process{trainer.accelerator.process_index}.pt"))


if __name__ == "__main__":
    main(sys.argv[1])
