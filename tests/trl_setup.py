"""Tiny TRL runs for the integration tests and the example: a Qwen2 model and a word-level tokenizer built locally.

Nothing is downloaded: the tokenizer is a ``tokenizers`` word-level
vocabulary of 32 words and the model a randomly initialised
``Qwen2ForCausalLM`` with hidden size 16, so a training step takes a few
milliseconds on a CPU.

The task: prompts are a few words; the reward counts the words of the
completion whose number lies in the prompt's own range, so prompts have
different reward distributions and groups are rarely all equal.
"""

from __future__ import annotations

import tempfile
from typing import Any, Dict, List, Optional

import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

VOCABULARY = ["<pad>", "<eos>", "<unk>"] + [f"w{index}" for index in range(29)]

#: A chat template for the word-level tokenizer: each message's content, then the generation prompt.
CHAT_TEMPLATE = "{% for message in messages %}{{ message['content'] }} {% endfor %}"


def tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over ``VOCABULARY`` with pad, eos and a chat template."""
    core = Tokenizer(models.WordLevel({word: index for index, word in enumerate(VOCABULARY)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    result = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    result.chat_template = CHAT_TEMPLATE
    return result


def model(seed: int = 0) -> Qwen2ForCausalLM:
    """A randomly initialised one-layer Qwen2 with hidden size 16, the same for the same seed."""
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=len(VOCABULARY),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=None,
    )
    return Qwen2ForCausalLM(config)


def dataset(num_prompts: int = 8, chat: bool = False, repeats: int = 1) -> Dataset:
    """Prompts ``"w<i> w<i+1> w<i+2>"`` (or one user message each), with an integer ``prompt_id`` column.

    Args:
        num_prompts: distinct prompts.
        chat: each prompt as a list of one user message instead of text.
        repeats: rows per prompt, so that prompts come back within one epoch.
    """
    identities = [index for index in range(num_prompts) for _ in range(repeats)]
    texts = [f"w{3 + index} w{4 + index} w{5 + index}" for index in identities]
    prompts: List[Any] = [[{"role": "user", "content": text}] for text in texts] if chat else texts
    return Dataset.from_dict({"prompt": prompts, "prompt_id": identities})


def in_range_reward(completions: List[Any], prompt_id: List[int], **_: Any) -> List[float]:
    """The count of completion words ``w<k>`` with k within 6 of the prompt's first word."""
    rewards = []
    for completion, identity in zip(completions, prompt_id):
        text = completion if isinstance(completion, str) else completion[0]["content"]
        numbers = [int(word[1:]) for word in text.split() if word.startswith("w") and word[1:].isdigit()]
        rewards.append(float(sum(3 + identity <= number <= 9 + identity for number in numbers)))
    return rewards


def sometimes_none_reward(completions: List[Any], **_: Any) -> List[Optional[float]]:
    """None (unscorable) for completions that contain ``w7``, else the number of words."""
    texts = [c if isinstance(c, str) else c[0]["content"] for c in completions]
    return [None if "w7" in text.split() else float(len(text.split())) for text in texts]


def recording(trainer_class: type) -> type:
    """A subclass of ``trainer_class`` that keeps each training batch's rewards and advantages."""

    class Recording(trainer_class):
        """``trainer_class``, keeping each training batch's advantages (``recorded``) and rewards (``rewards``)."""

        recorded: List[torch.Tensor]
        rewards: List[torch.Tensor]

        def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
            """The parent's rewards [B_global, n_funcs], recorded for training batches."""
            result = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
            if self.model.training:
                self.__dict__.setdefault("rewards", []).append(result.detach().clone())
            return result

        def _generate_and_score_completions(self, inputs):
            """The parent's, recording the advantages of training batches."""
            output = super()._generate_and_score_completions(inputs)
            if self.model.training:
                self.__dict__.setdefault("recorded", []).append(output["advantages"].detach().clone())
            return output

    Recording.__name__ = f"Recording{trainer_class.__name__}"
    return Recording


def model_path(seed: int = 0) -> str:
    """A directory holding ``model(seed)``, for trainers that load a reference model from the policy's path."""
    directory = tempfile.mkdtemp(prefix="tiny-qwen2-")
    model(seed).save_pretrained(directory)
    return directory


def config_kwargs(output_dir: Optional[str] = None, **overrides: Any) -> Dict[str, Any]:
    """The keywords of a tiny CPU run, shared by ``GRPOConfig`` and ``RLOOConfig``."""
    kwargs: Dict[str, Any] = dict(
        output_dir=output_dir or tempfile.mkdtemp(),
        per_device_train_batch_size=8,
        num_generations=4,
        max_completion_length=6,
        max_steps=3,
        logging_steps=1,
        # Plain SGD: an update proportional to the gradient. Adam turns a gradient of 1e-9 (float32
        # rounding of an advantage that is 0 in the other computation) into a full step of the
        # learning rate, which would make two runs that agree to rounding diverge.
        optim="sgd",
        learning_rate=0.5,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        seed=0,
        bf16=False,
        disable_tqdm=True,
    )
    kwargs.update(overrides)
    return kwargs


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
    """Trains a recording ``trainer_class`` on the tiny task and returns the trainer."""
    config = config_class(**config_kwargs(**config_overrides))
    trainer = recording(trainer_class)(
        model=model_path(seed),
        reward_funcs=reward_funcs,
        args=config,
        train_dataset=train_dataset if train_dataset is not None else dataset(chat=chat),
        processing_class=tokenizer(),
        **(trainer_kwargs or {}),
    )
    trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    return trainer


def losses(trainer: Any) -> List[float]:
    """The training loss of each logged step."""
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
