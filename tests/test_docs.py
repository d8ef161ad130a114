"""The documentation runs as written: README.md and every docs/*.md page.

Every fenced ```python block of README.md and of docs/*.md (not docs/results/,
which the scripts write) runs in a fresh namespace of its own, with the
working directory at a temporary directory, so that a block that writes files
leaves nothing in the repository. Blocks do not build on each other: each one
is self-contained, as a reader copying it would need. Tracebacks name the page
and its line. Shell blocks (```bash and others) are not run.

A block that cannot run here (it needs CUDA, or a process group started by
torchrun) is marked by the line just before its fence:

    <!-- docs-test: skip (needs CUDA) -->

with the reason in the brackets. Such a block is still compiled, so that its
syntax stays right. Use the marker sparingly.

A block that needs a trainer package from an extra (``trl``, ``verl``) says so:

    <!-- docs-test: needs (trl) -->

It runs where the package is installed, skips where it is not, and fails
under CI (``tests/integration_imports.py``), which installs every extra.

A few blocks whose comments state values are also checked for them (CHECKS,
keyed by page and a piece of the block's code). Besides running the blocks,
these tests check that relative links and images point to files (and
headings) that exist, that docs/index.md lists every page, and that the
README stays a front door of about 12 KB.
"""

from __future__ import annotations

import dataclasses
import pathlib
import re

import pytest
import torch
from integration_imports import require

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = [README, *sorted(DOCS.glob("*.md"))]
README_MAX_BYTES = 12_500  # "at most about 12 KB": the rest belongs in docs/

FENCE = re.compile(r"^(?P<indent>\s*)(?P<ticks>```+)\s*(?P<lang>[\w+-]*)\s*$")
SKIP = re.compile(r"^\s*<!--\s*docs-test:\s*skip\s*\((?P<reason>[^)]+)\)\s*-->\s*$")
NEEDS = re.compile(r"^\s*<!--\s*docs-test:\s*needs\s*\((?P<package>trl|verl)\)\s*-->\s*$")
LINK = re.compile(r"!?\[[^\]]*\]\((?P<target>[^)\s]+)\)")


@dataclasses.dataclass(frozen=True)
class Block:
    """One fenced code block of a page."""

    page: pathlib.Path
    line: int  # 1-based line of the first line of code (after the opening fence)
    language: str
    code: str
    skip_reason: str | None
    needs: str | None = None  # the extra (and package) the block imports, or None


def code_blocks(page: pathlib.Path) -> list[Block]:
    """Every fenced block of ``page``, in order, with its indentation removed."""
    lines = page.read_text(encoding="utf-8").split("\n")
    blocks = []
    index = 0
    while index < len(lines):
        opening = FENCE.match(lines[index])
        if not opening:
            index += 1
            continue
        indent, ticks = opening["indent"], opening["ticks"]
        previous = next((text for text in reversed(lines[:index]) if text.strip()), "")
        skip, needs = SKIP.match(previous), NEEDS.match(previous)
        body = []
        index += 1
        first = index + 1
        while index < len(lines) and lines[index].strip() != ticks:
            text = lines[index]
            body.append(text[len(indent) :] if text.startswith(indent) else text.lstrip())
            index += 1
        if index == len(lines):
            raise AssertionError(f"{page.relative_to(ROOT)}:{first - 1}: a code fence that is never closed")
        code = "\n".join(body) + "\n"
        blocks.append(
            Block(page, first, opening["lang"].lower(), code, skip and skip["reason"], needs and needs["package"])
        )
        index += 1
    return blocks


def python_blocks() -> list:
    """A pytest param per Python block of every page, named by page, block index and line."""
    params = []
    for page in PAGES:
        for number, block in enumerate(b for b in code_blocks(page) if b.language == "python"):
            name = f"{page.relative_to(ROOT).as_posix()}:block{number}:line{block.line}"
            params.append(pytest.param(block, id=name))
    return params


def run_block(block: Block) -> dict:
    """Runs one block in a fresh namespace; line numbers in tracebacks are the page's."""
    source = "\n" * (block.line - 1) + block.code
    namespace: dict = {"__name__": "__docs__"}
    exec(compile(source, str(block.page), "exec"), namespace)  # pylint: disable=exec-used
    return namespace


@pytest.mark.parametrize("block", python_blocks())
def test_python_block_runs(block: Block, tmp_path, monkeypatch):
    compile("\n" * (block.line - 1) + block.code, str(block.page), "exec")
    if block.skip_reason:
        pytest.skip(f"marked in the page: {block.skip_reason}")
    if block.needs:
        require(block.needs, block.needs)
    monkeypatch.chdir(tmp_path)
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    try:
        namespace = run_block(block)
    finally:  # training.train sets both for its run; the rest of the suite keeps its own
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
    for check in checks_for(block):
        check(namespace)


def test_the_blocks_are_found():
    blocks = [p.values[0] for p in python_blocks()]
    assert any(b.page == README for b in blocks), "the README's quick start is a Python block"
    skipped = [b for b in blocks if b.skip_reason]
    assert len(skipped) <= max(2, len(blocks) // 5), "skip markers are for the few blocks that need CUDA or torchrun"


def test_readme_is_a_front_door():
    size = len(README.read_bytes())
    assert size <= README_MAX_BYTES, f"README.md is {size} bytes; move detail to a docs/ page and link it"
    text = README.read_text(encoding="utf-8")
    for marker in ("<!-- ci:install-and-train -->", "<!-- ci:test -->"):
        after = text.split(marker + "\n", 1)
        assert len(after) == 2, f".ci/run reads the command after {marker}"
        assert after[1].startswith("```bash\n"), f"{marker} must be followed by a bash block"


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: pathlib.Path) -> set[str]:
    """The anchors of a page's headings (outside code blocks)."""
    found, inside = set(), False
    for line in page.read_text(encoding="utf-8").split("\n"):
        if FENCE.match(line):
            inside = not inside
        elif not inside and re.match(r"#{1,6} ", line):
            found.add(github_anchor(line.lstrip("#")))
    return found


def links(page: pathlib.Path) -> list[tuple[int, str]]:
    """(line, target) of every Markdown link and image outside code blocks."""
    found, inside = [], False
    for number, line in enumerate(page.read_text(encoding="utf-8").split("\n"), start=1):
        if FENCE.match(line):
            inside = not inside
        elif not inside:
            found.extend((number, m["target"]) for m in LINK.finditer(re.sub(r"`[^`]*`", "", line)))
    return found


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(page: pathlib.Path):
    broken = []
    for line, target in links(page):
        if re.match(r"[a-z]+:", target):
            continue  # https:, mailto:
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"line {line}: {target} (no such file)")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"line {line}: {target} (no such heading)")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)


def test_the_index_lists_every_page():
    index = DOCS / "index.md"
    listed = {(DOCS / target.partition("#")[0]).resolve() for _, target in links(index)}
    missing = [p.name for p in DOCS.glob("*.md") if p != index and p.resolve() not in listed]
    assert not missing, f"docs/index.md does not link {missing}"
    readme_links = {(ROOT / target.partition("#")[0]).resolve() for _, target in links(README)}
    assert index.resolve() in readme_links, "the README links docs/index.md"


# What some blocks compute, checked beyond "it runs" (their comments state these values), keyed by the
# page and a piece of the block's code; test_python_block_runs applies them.


def check_usage_example(namespace: dict) -> None:
    assert namespace["advantages"].shape == (3,)
    assert namespace["checkpoint"]["prompts"] == {"prompts": ["a photo of a cat", "a photo of a dog"]}


def check_grpo_family_example(namespace: dict) -> None:
    assert namespace["advantages"].tolist() == pytest.approx([0.7071, -0.7071, 0.0, 0.0, 0.3], abs=1e-4)
    report = namespace["report"]
    assert report.zero_variance.tolist() == [False, False, True, True, True]
    assert report.fallback.tolist() == [True] * 5  # min_count=4: every prompt starts on the batch's statistics


def check_prompt_keys_example(namespace: dict) -> None:
    assert namespace["keys"][0] == namespace["keys"][1]
    assert namespace["advantages"].shape == (2,)
    assert namespace["tracker"].stats(namespace["prompt_keys"](["a cat"])).count.tolist() == [2]
    assert torch.isfinite(namespace["advantages"]).all()


def check_quick_start(namespace: dict) -> None:
    assert namespace["advantages"].tolist() == pytest.approx([0.7071, -0.7071, -0.7071, 0.7071], abs=1e-3)
    assert namespace["stats"].count.tolist() == [2]


def check_trl_example(namespace: dict) -> None:
    counts = namespace["counts"]
    assert sorted(counts[counts > 0].tolist()) == [12, 12]
    assert 0.0 <= namespace["logged"] <= 1.0


CHECKS = {
    ("docs/usage.md", "PromptIndex(capacity=num_prompts)"): check_usage_example,
    ("docs/presets.md", "presets.verl_grpo(8)"): check_grpo_family_example,
    ("docs/prompt_keys.md", "token_keys(token_ids, attention_mask)"): check_prompt_keys_example,
    ("README.md", "presets.trl_grpo(num_prompts=1024"): check_quick_start,
    ("docs/trl.md", "TrackedGRPOTrainer("): check_trl_example,
}


def checks_for(block: Block) -> list:
    page = block.page.relative_to(ROOT).as_posix()
    return [check for (name, text), check in CHECKS.items() if name == page and text in block.code]


def test_every_check_finds_its_block():
    for page, text in CHECKS:
        found = [b for b in code_blocks(ROOT / page) if b.language == "python" and text in b.code]
        assert len(found) == 1, f"{page}: {len(found)} Python blocks contain {text!r}"
