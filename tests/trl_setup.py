"""Tiny TRL runs for the integration tests, on ``rail_interview.studies.tiny_lm``'s model and task.

``run`` trains a recording subclass of a trainer (TRL's own, or a tracked
one) and returns it, so that a test can compare what each batch was given.
"""

from __future__ import annotations

import shutil
import tempfile
import weakref
from typing import Any, Dict, List, Optional

import torch
from datasets import Dataset

from rail_interview.studies.tiny_lm import (  # noqa: F401  (re-exported for the tests)
    dataset,
    in_range_reward,
    model,
    model_path,
    sometimes_none_reward,
    tokenizer,
    trainer_config,
)


def even_words_reward(completions: List[Any], **_: Any) -> List[Optional[float]]:
    """None for completions that contain ``w7`` or an odd number of words, else their words ``w<k>`` with even k.

    With ``sometimes_none_reward`` (None for ``w7``) a completion with ``w7``
    is unscorable, and one with an odd number of words has one reward.

    Args:
        completions: [B] completions, text or chat.

    Returns:
        [B] rewards, None where unscorable.
    """
    rewards: List[Optional[float]] = []
    for completion in completions:
        words = (completion if isinstance(completion, str) else completion[0]["content"]).split()
        even = sum(word[:1] == "w" and word[1:].isdigit() and int(word[1:]) % 2 == 0 for word in words)
        rewards.append(None if "w7" in words or len(words) % 2 else float(even))
    return rewards


def recording(trainer_class: type) -> type:
    """A subclass of ``trainer_class`` that keeps each training batch's rewards and advantages."""

    class Recording(trainer_class):
        """``trainer_class``, keeping each batch's advantages (``recorded``, ``eval_recorded``) and training rewards."""

        recorded: List[torch.Tensor]
        rewards: List[torch.Tensor]
        eval_recorded: List[torch.Tensor]

        def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
            """The parent's rewards [B_global, n_funcs], recorded for training batches."""
            result = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
            if self.model.training:
                self.__dict__.setdefault("rewards", []).append(result.detach().clone())
            return result

        def _generate_and_score_completions(self, inputs):
            """The parent's, recording the advantages of training batches."""
            output = super()._generate_and_score_completions(inputs)
            name = "recorded" if self.model.training else "eval_recorded"
            self.__dict__.setdefault(name, []).append(output["advantages"].detach().clone())
            return output

    Recording.__name__ = f"Recording{trainer_class.__name__}"
    return Recording


def config_kwargs(output_dir: Optional[str] = None, **overrides: Any) -> Dict[str, Any]:
    """``tiny_lm.trainer_config``: a tiny CPU run's config keywords."""
    return trainer_config(output_dir, **overrides)


def run(
    trainer_class: type,
    config_class: type,
    *,
    reward_funcs: Any = in_range_reward,
    chat: bool = False,
    seed: int = 0,
    train_dataset: Optional[Dataset] = None,
    resume_from_checkpoint: Optional[str] = None,
    trainer_kwargs: Optional[Dict[str, Any]] = None,
    **config_overrides: Any,
) -> Any:
    """Trains a recording ``trainer_class`` on the tiny task and returns the trainer.

    The model's directory, and the output directory unless one is given,
    are temporary: removed when the trainer is garbage-collected.
    """
    temporary = [tempfile.mkdtemp(prefix="tiny-qwen2-")]
    if "output_dir" not in config_overrides:
        config_overrides["output_dir"] = tempfile.mkdtemp(prefix="tiny-lm-run-")
        temporary.append(config_overrides["output_dir"])
    config = config_class(**config_kwargs(**config_overrides))
    trainer = recording(trainer_class)(
        model=model_path(seed, temporary[0]),
        reward_funcs=reward_funcs,
        args=config,
        train_dataset=train_dataset if train_dataset is not None else dataset(chat=chat),
        processing_class=tokenizer(),
        **(trainer_kwargs or {}),
    )
    for directory in temporary:
        weakref.finalize(trainer, shutil.rmtree, directory, True)
    trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    return trainer


def losses(trainer: Any) -> List[float]:
    """The training loss of each logged step."""
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
