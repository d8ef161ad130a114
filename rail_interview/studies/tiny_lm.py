"""A tiny language-model task for TRL's trainers on a CPU: the TRL example's and the integration tests' testbed.

Nothing is downloaded. The tokenizer is a ``tokenizers`` word-level
vocabulary of 32 words (``w0`` .. ``w28`` and three special tokens), the
model a randomly initialised one-layer ``Qwen2ForCausalLM`` with hidden
size 16: a training step of a few milliseconds.

The task, **find the word**: prompt i is the three words
``w<3+i> w<4+i> w<5+i>``; a completion passes (reward 1) if it contains the
prompt's target word ``w<TARGET_OFFSET+i>`` (mod 29), else fails (0). A
random completion of 6 words passes about a fifth of the time, so many
groups of 4 completions are all failures (or all passes): the
zero-variance groups that GRPO gives no signal and a per-prompt memory
does. ``in_range_reward`` and ``sometimes_none_reward`` are denser rewards,
the second with unscorable completions (None), for the tests.

Needs the ``trl`` extra (``pip install -e ".[trl]"``): transformers,
tokenizers and datasets.
"""

from __future__ import annotations

import tempfile
from typing import Any, Dict, List, Optional

import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

__all__ = [
    "CHAT_TEMPLATE",
    "NUM_WORDS",
    "TARGET_OFFSET",
    "VOCABULARY",
    "dataset",
    "find_the_word_reward",
    "in_range_reward",
    "model",
    "model_path",
    "sometimes_none_reward",
    "tokenizer",
]

#: The plain words ``w0`` .. ``w28``.
NUM_WORDS = 29
VOCABULARY = ["<pad>", "<eos>", "<unk>"] + [f"w{index}" for index in range(NUM_WORDS)]
#: Prompt i's target word is ``w<(i + TARGET_OFFSET) % NUM_WORDS>``: not among its own words.
TARGET_OFFSET = 11
#: A chat template for the word-level tokenizer: each message's content, space-separated.
CHAT_TEMPLATE = "{% for message in messages %}{{ message['content'] }} {% endfor %}"


def tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over ``VOCABULARY`` with ``<pad>``, ``<eos>`` and a chat template.

    Returns:
        The tokenizer: whitespace-split words, unknown words as ``<unk>``.

    Example:
        >>> tokenizer()("w3 w4 w5")["input_ids"]
        [6, 7, 8]
    """
    core = Tokenizer(models.WordLevel({word: index for index, word in enumerate(VOCABULARY)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    result = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    result.chat_template = CHAT_TEMPLATE
    return result


def model(seed: int = 0) -> Qwen2ForCausalLM:
    """A randomly initialised one-layer Qwen2 with hidden size 16 over ``VOCABULARY``.

    Args:
        seed: the torch seed its weights are drawn with: the same seed gives
            the same model.

    Returns:
        The model, in float32 on the CPU.
    """
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


def model_path(seed: int = 0, directory: Optional[str] = None) -> str:
    """Saves ``model(seed)`` to a directory, for trainers that load a reference model from the policy's path.

    Args:
        seed: as for ``model``.
        directory: where to save; a new temporary directory if None.

    Returns:
        The directory, loadable with ``from_pretrained`` (TRL's ``model=``).
    """
    directory = directory or tempfile.mkdtemp(prefix="tiny-qwen2-")
    model(seed).save_pretrained(directory)
    return directory


def dataset(num_prompts: int = 8, chat: bool = False, repeats: int = 1) -> Dataset:
    """The prompts ``"w<3+i> w<4+i> w<5+i>"``, with an integer ``prompt_id`` column.

    Args:
        num_prompts: distinct prompts, at most ``NUM_WORDS - 5``.
        chat: each prompt as a list of one user message instead of text.
        repeats: rows per prompt, so that prompts come back within one epoch.

    Returns:
        A dataset of ``num_prompts * repeats`` rows with columns ``prompt``
        and ``prompt_id``.

    Raises:
        ValueError: for a ``num_prompts`` the vocabulary cannot spell.
    """
    if not 1 <= num_prompts <= NUM_WORDS - 5:
        raise ValueError(f"num_prompts must be in [1, {NUM_WORDS - 5}], got {num_prompts}")
    identities = [index for index in range(num_prompts) for _ in range(repeats)]
    texts = [f"w{3 + index} w{4 + index} w{5 + index}" for index in identities]
    prompts: List[Any] = [[{"role": "user", "content": text}] for text in texts] if chat else texts
    return Dataset.from_dict({"prompt": prompts, "prompt_id": identities})


def _words(completion: Any) -> List[str]:
    """The words of a completion, text or a list of one assistant message."""
    text = completion if isinstance(completion, str) else completion[0]["content"]
    return text.split()


def find_the_word_reward(completions: List[Any], prompt_id: List[int], **_: Any) -> List[float]:
    """1.0 if the completion contains its prompt's target word, else 0.0 (a TRL reward function).

    Args:
        completions: [B] completions, text or chat.
        prompt_id: [B] the dataset's ``prompt_id`` of each completion.

    Returns:
        [B] rewards.
    """
    targets = [f"w{(identity + TARGET_OFFSET) % NUM_WORDS}" for identity in prompt_id]
    return [float(target in _words(completion)) for completion, target in zip(completions, targets)]


def in_range_reward(completions: List[Any], prompt_id: List[int], **_: Any) -> List[float]:
    """The number of completion words ``w<k>`` with k within 6 above the prompt's first word.

    Args:
        completions: [B] completions, text or chat.
        prompt_id: [B] the dataset's ``prompt_id`` of each completion.

    Returns:
        [B] rewards.
    """
    rewards = []
    for completion, identity in zip(completions, prompt_id):
        numbers = [int(word[1:]) for word in _words(completion) if word[:1] == "w" and word[1:].isdigit()]
        rewards.append(float(sum(3 + identity <= number <= 9 + identity for number in numbers)))
    return rewards


def sometimes_none_reward(completions: List[Any], **_: Any) -> List[Optional[float]]:
    """None (unscorable) for completions that contain ``w7``, else their number of words.

    Args:
        completions: [B] completions, text or chat.

    Returns:
        [B] rewards, None where unscorable.
    """
    return [None if "w7" in _words(completion) else float(len(_words(completion))) for completion in completions]


def trainer_config(output_dir: Optional[str] = None, **overrides: Any) -> Dict[str, Any]:
    """The keywords of a tiny CPU run, shared by TRL's ``GRPOConfig`` and ``RLOOConfig``.

    Plain SGD: its update is proportional to the gradient. Adam turns a
    gradient of 1e-9 (the float32 rounding of an advantage that is exactly 0
    in another computation) into a full step of the learning rate, which
    would make two runs that agree to rounding diverge.

    Args:
        output_dir: the run's directory; a new temporary one if None.
        **overrides: any other config field.

    Returns:
        The keywords.
    """
    kwargs: Dict[str, Any] = dict(
        output_dir=output_dir or tempfile.mkdtemp(prefix="tiny-lm-run-"),
        per_device_train_batch_size=8,
        num_generations=4,
        max_completion_length=6,
        max_steps=3,
        logging_steps=1,
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
