"""The README's code example runs as written."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_usage_example_runs():
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## Use the tracker in your own trainer"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace: dict = {}
    exec(compile(code, str(README), "exec"), namespace)  # pylint: disable=exec-used
    advantages = namespace["advantages"]
    assert advantages.shape == (3,)
    assert namespace["checkpoint"]["prompts"] == {"prompts": ["a photo of a cat", "a photo of a dog"]}
