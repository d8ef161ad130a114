"""The pass/fail study: its rows built from the config, the learning-rate choice on tuning seeds, and its files."""

import csv
import os
import subprocess
import sys

from rail_interview.configs import pass_fail
from rail_interview.studies import pass_fail as pass_fail_study

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_grid_has_every_estimator_memory_and_group_size_and_the_fragile_points():
    config = pass_fail.get_config()
    cells = pass_fail_study.cells(config)
    names = {(c.name, c.group_size) for c in cells}
    for size in pass_fail_study.GROUP_SIZES:
        for method in pass_fail_study.METHODS:
            for memory in pass_fail_study.MEMORIES:
                assert ((method if memory == "none" else f"{method}+{memory}"), size) in names
        assert ("grpo dynamic sampling (DAPO)", size) in names
    assert ("grpo, oracle baseline", 2) in names and ("grpo+buffer, P = 256", 4) in names
    assert {("grpo, label_scale 1", 2), ("grpo+buffer, label_scale 2", 4), ("grpo+buffer K=8", 16)} <= names
    # Every row draws N samples per step, or N / 4 for four times the steps (SPO drawing a quarter of the prompts).
    batch, steps = config.sample_batch_size, config.num_epochs
    for cell in cells:
        samples = cell.run.num_groups * cell.group_size
        assert (samples, cell.run.num_steps) in ((batch, steps), (batch // 4, steps * 4)), cell.name
    # Every row is paired with a reference row: in-batch GRPO on the same problem (at its G, or at G = 4
    # for single-stream rows), or, for the rows that select by their memory, the same estimator and memory
    # drawing uniformly.
    for cell in cells:
        (reference,) = [c for c in cells if (c.name, c.group_size) == cell.reference_key]
        assert reference.run.num_prompts == cell.run.num_prompts and reference.run.label_scale == cell.run.label_scale
        assert reference.run.sampler == "none" and reference.run.include_batch and reference.run.ablation == "none"
        if cell.run.sampler != "none" and cell.run.selection_memory == "none":  # selection by the row's memory
            assert (reference.run.method, reference.run.memory) == (cell.run.method, cell.run.memory)
        else:
            assert (reference.run.method, reference.run.memory) == ("grpo", "none")
    short = [c for c in cells if c.block == "short buffers"]
    assert short and all(c.run.buffer_size < c.group_size and c.run.min_count <= c.run.buffer_size for c in short)
    # R3's rows: SPO at G = 1, every memory from the past only, every rule on every memory (and on SPO).
    assert ("spo", 1) in names and ("spo, B = 16, sampler spo", 1) in names
    for memory in ("buffer", "ema", "beta"):
        assert (f"grpo+{memory}, past only", 4) in names
    for rule in pass_fail_study.SELECTION_RULES:
        assert (f"grpo, sampler {rule} (Beta memory for selection only)", 4) in names
        assert {(f"grpo+{memory}, sampler {rule}", 4) for memory in ("buffer", "ema", "beta")} <= names
    selection_only = [c for c in cells if "selection only" in c.name]
    assert all(c.run.memory == "none" and c.run.selection_memory == "beta" for c in selection_only)


def test_the_rows_follow_the_config():
    config = pass_fail.get_config()
    config.problem.tolerance, config.num_epochs, config.stat_tracking.ema_decay = 0.5, 120, 0.8
    cells = pass_fail_study.cells(config)
    assert {c.run.tolerance for c in cells} == {0.5} and {c.run.num_steps for c in cells} == {120, 480}
    assert {c.run.ema_decay for c in cells} == {0.8}
    assert {c.run.label_scale for c in cells if c.block != "higher start"} == {config.problem.label_scale}
    assert {c.run.label_scale for c in cells if c.block == "higher start"} == set(pass_fail_study.LABEL_SCALES)


def test_a_small_study_writes_its_tables_and_plot(tmp_path):
    config = pass_fail.get_config()
    config.num_epochs = 15
    result = pass_fail_study.run_study(config, str(tmp_path), seeds=[0, 1], tuning_seeds=[100], quick=True)
    assert {"results.md", "results.csv", "curves.png"} <= set(os.listdir(tmp_path))
    rows = result["rows"]
    assert len(rows) == 2 * len(pass_fail_study.cells(config, quick=True))
    best = [r for r in rows if r["rate"] == "best"]
    for row in best:
        assert row["learning_rate"] == max(row["sweep"], key=row["sweep"].get)  # chosen on the tuning seeds
        assert row["wins_vs_reference"] == "" or row["wins_vs_reference"].endswith("/2")
    assert all(r["learning_rate"] == config.learning_rate for r in rows if r["rate"] == "shared")
    assert all(0 < r["start"] < 0.5 for r in rows)  # the config's problem starts low
    plain = [r for r in rows if "DAPO" not in r["cell"]]
    assert all(r["area"] == r["area_same_samples"] for r in plain)  # only dynamic sampling draws more samples
    assert all(r["samples"] > 15 * 64 for r in rows if "DAPO" in r["cell"])
    with open(tmp_path / "results.csv", encoding="utf-8") as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    text = (tmp_path / "results.md").read_text(encoding="utf-8")
    assert "## Learning-rate sweep" in text and "### Prompts revisited four times less often" in text
    assert "## Single stream against groups, at equal samples" in text and "### Prompt selection" in text
    # SPO against every group row of VERSUS, each of its group sizes (2 and 8 in the quick grid), and SPO at
    # P = 256 against the group rows of that block.
    versus = result["versus"]
    assert {(row["cell"], row["G"]) for row in versus if row["stream"] == "spo"} == {
        (name, size) for name in pass_fail_study.VERSUS for size in (2, 8)
    }
    rare = {(row["cell"], row["G"]) for row in versus if row["stream"] == "spo, P = 256"}
    assert rare == {(f"grpo{memory}, P = 256", 4) for memory in ("", "+buffer", "+ema", "+beta")}
    assert all(row["stream_wins"].endswith("/2") for row in versus)


def _script(*args):
    return subprocess.run(
        [sys.executable, os.path.join(REPO_ROOT, "scripts", "pass_fail_study.py"), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_pass_fail_study_script_refuses_bad_flags_and_configs_in_one_line():
    for args, message in (
        (["--seeds=0"], "--seeds"),
        (["--config.problem.group_size=3"], "config.sample_batch_size (64) must be a multiple"),
        (["--config.problem.lable_scale=2"], "no such config field"),
        (["--config.sample_batch_size=60"], "multiple of every group size of the study (2, 4, 8, 16)"),
        (
            [f"--config={os.path.join(REPO_ROOT, 'rail_interview', 'configs', 'default.py')}"],
            "problem.name 'pass_fail'",
        ),
    ):
        result = _script(*args)
        assert result.returncode != 0 and "Traceback" not in result.stderr and message in result.stderr, result.stderr
