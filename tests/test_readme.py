"""The README's code example runs as written."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_usage_example_runs():
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## Use the tracker in your own trainer") :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace: dict = {}
    exec(compile(code, str(README), "exec"), namespace)  # pylint: disable=exec-used
    advantages = namespace["advantages"]
    assert advantages.shape == (3,)
    assert namespace["checkpoint"]["prompts"] == {"prompts": ["a photo of a cat", "a photo of a dog"]}


def test_grpo_family_example_runs_and_gives_the_advantages_its_comment_states():
    import torch

    text = README.read_text(encoding="utf-8")
    section = text[text.index("## The GRPO family") :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace: dict = {}
    exec(compile(code, str(README), "exec"), namespace)  # pylint: disable=exec-used
    torch.testing.assert_close(
        namespace["advantages"], torch.tensor([0.7071, -0.7071, 0.0, 0.0, 0.3]), atol=1e-4, rtol=0
    )
    report = namespace["report"]
    assert report.zero_variance.tolist() == [False, False, True, True, True]
    assert report.fallback.tolist() == [True] * 5  # min_count=4: every prompt starts on the batch's statistics


def test_prompt_keys_example_runs():
    import torch

    text = README.read_text(encoding="utf-8")
    section = text[text.index("### Prompt keys: strings, token ids") :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace: dict = {}
    exec(compile(code, str(README), "exec"), namespace)  # pylint: disable=exec-used
    assert namespace["keys"][0] == namespace["keys"][1]
    assert namespace["advantages"].shape == (2,)
    assert namespace["tracker"].stats(namespace["prompt_keys"](["a cat"])).count.tolist() == [2]
    assert torch.isfinite(namespace["advantages"]).all()
