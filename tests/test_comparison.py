"""Tests of the comparison library and scripts/compare.py."""

import csv
import pathlib
import subprocess
import sys

import pytest

from rail_interview import configs
from rail_interview.configs import default
from rail_interview.studies import compare as comparison

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_apply_overrides_copies_and_refuses_unknown_fields():
    base = default.get_config()
    config = configs.apply_overrides(base, {"stat_tracking.method": "batch", "seed": 7})
    assert config.stat_tracking.method == "batch" and config.seed == 7
    assert base.stat_tracking.method == "buffer" and base.seed == 0
    with pytest.raises(KeyError, match="stat_tracking.bufer_size"):
        configs.apply_overrides(base, {"stat_tracking.bufer_size": 3})


def test_method_settings_name_the_grpo_family_with_its_memory():
    config = default.get_config()
    settings = comparison.method_settings(
        config,
        ["batch", "buffer", "ema", "grpo", "dr_grpo+buffer", "rloo+ema"],
        buffer_sizes=[4],
        ema_decays=[0.5, 0.9],
    )
    assert [s.name for s in settings] == [
        "batch",
        "buffer K=4 m=2",
        "ema 0.5",
        "ema 0.9",
        "grpo",
        "dr_grpo+buffer K=4 m=2",
        "rloo+ema 0.5",
        "rloo+ema 0.9",
    ]
    by_name = {s.name: dict(s.overrides) for s in settings}
    assert by_name["batch"] == {"stat_tracking.method": "batch"}  # the existing methods keep their overrides
    assert by_name["buffer K=4 m=2"] == {
        "stat_tracking.method": "buffer",
        "stat_tracking.buffer_size": 4,
        "stat_tracking.min_count": 2,
    }
    assert by_name["grpo"] == {"stat_tracking.method": "grpo", "stat_tracking.memory": "none"}
    assert by_name["dr_grpo+buffer K=4 m=2"] == {
        "stat_tracking.method": "dr_grpo",
        "stat_tracking.memory": "buffer",
        "stat_tracking.buffer_size": 4,
        "stat_tracking.min_count": 2,
    }
    assert by_name["rloo+ema 0.9"] == {
        "stat_tracking.method": "rloo",
        "stat_tracking.memory": "ema",
        "stat_tracking.ema_decay": 0.9,
    }
    # Defaults: the config's K, min_count and decay; the GRPO family needs min_count >= 2.
    names = [s.name for s in comparison.method_settings(config, ["grpo+buffer", "rloo+ema"])]
    assert names == ["grpo+buffer K=32 m=16", "rloo+ema 0.7"]
    (tiny,) = comparison.method_settings(config, ["rloo+buffer"], buffer_sizes=[2])
    assert tiny.overrides["stat_tracking.min_count"] == 2
    for bad in ("grpo+lstm", "buffer+ema", "ppo", "grpo+none"):
        with pytest.raises(ValueError, match="unknown method"):
            comparison.method_settings(config, [bad])


def _result(setting, seed, final):
    return comparison.RunResult(setting, seed, final, 0.5, [final] * 20, f"/runs/{setting}{seed}")


def test_summarize_and_markdown():
    results = [_result("a", 0, -1.0), _result("a", 1, -3.0), _result("a", 2, -30.0), _result("b", 0, -50.0)]
    summaries = comparison.summarize(results, bad_threshold=-20.0)
    assert [s.setting for s in summaries] == ["a", "b"]
    a = summaries[0]
    assert (a.num_runs, a.median, a.best, a.worst, a.num_bad) == (3, -3.0, -1.0, -30.0, 1)
    table = comparison.format_markdown(summaries)
    assert "| a | -3.00 | -1.00 | -30.00 | 1/3 | 0.50 |" in table


def test_write_csv_and_plot(tmp_path):
    results = [_result("a", 0, -1.0), _result("a", 1, -3.0), _result("b", 0, -50.0)]
    comparison.write_csv(results, str(tmp_path / "r.csv"))
    with open(tmp_path / "r.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["setting"], int(r["seed"]), float(r["final_reward"])) for r in rows] == [
        ("a", 0, -1.0),
        ("a", 1, -3.0),
        ("b", 0, -50.0),
    ]
    comparison.plot_curves(results, str(tmp_path / "c.png"))
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_problem_metrics_reach_the_table_the_csv_and_a_linear_plot(tmp_path, monkeypatch):
    results = [
        comparison.RunResult("grpo", seed, final, 0.5, [0.1, final], "/r", {"final_pass_rate": 0.4 + seed / 10})
        for seed, final in ((0, 0.3), (1, 0.5), (2, 0.01))
    ]
    (summary,) = comparison.summarize(results, bad_threshold=0.2)
    assert summary.finals == {"final_pass_rate": pytest.approx(0.5)} and summary.num_bad == 1
    table = comparison.format_markdown([summary], bad_threshold=0.2)
    assert "runs below 0.2 | median loop s | median final_pass_rate |" in table and "| 0.500 |" in table
    comparison.write_csv(results, str(tmp_path / "r.csv"))
    with open(tmp_path / "r.csv", newline="") as f:
        assert [float(r["final_pass_rate"]) for r in csv.DictReader(f)] == [0.4, 0.5, 0.6]
    scales = []
    import matplotlib.axes  # pylint: disable=import-outside-toplevel

    set_yscale = matplotlib.axes.Axes.set_yscale
    monkeypatch.setattr(
        matplotlib.axes.Axes, "set_yscale", lambda ax, v, **k: (scales.append(v), set_yscale(ax, v, **k))
    )
    comparison.plot_curves(results, str(tmp_path / "c.png"))
    assert scales == []  # rewards in [0, 1]: linear
    comparison.plot_curves([_result("a", 0, -3.0)], str(tmp_path / "d.png"))
    assert scales and set(scales) == {"symlog"}


def test_compare_script_on_the_pass_fail_problem(tmp_path):
    out = tmp_path / "out"
    result = subprocess.run(
        [
            sys.executable,
            str(REPO_ROOT / "scripts" / "compare.py"),
            f"--config={REPO_ROOT / 'rail_interview' / 'configs' / 'pass_fail.py'}",
            "--methods=grpo,rloo+ema",
            "--seeds=2",
            "--workers=2",
            f"--out={out}",
            f"--logdir={tmp_path / 'runs'}",
            "--config.num_epochs=20",
            "--config.log_every=10",
            "--config.checkpoint_every=0",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    table = (out / "results.md").read_text()
    assert "runs below 0.2" in table and "median final_pass_rate | median final_zero_variance_frac |" in table
    assert "median mean_pass_rate | median mean_zero_variance_frac |" in table
    assert "| grpo |" in table and "| rloo+ema 0.9 |" in table


def test_compare_script_end_to_end(tmp_path):
    out = tmp_path / "out"
    result = subprocess.run(
        [
            sys.executable,
            str(REPO_ROOT / "scripts" / "compare.py"),
            "--methods=batch,buffer,ema",
            "--buffer_sizes=4,8",
            "--ema_decays=0.5",
            "--seeds=2",
            "--workers=2",
            f"--out={out}",
            f"--logdir={tmp_path / 'runs'}",
            "--config.num_epochs=15",
            "--config.problem.num_prompts=8",
            "--config.sample_batch_size=32",
            "--config.device=cpu",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["curves.png", "results.csv", "results.md"]
    table = (out / "results.md").read_text()
    assert "runs below -20 |" in table and "pass_rate" not in table  # the distance problem's threshold and columns
    for name in ("batch", "buffer K=4 m=2", "buffer K=8 m=4", "ema 0.5"):
        assert f"| {name} |" in table
    with open(out / "results.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 8
    assert "[8/8]" in result.stderr


def test_compare_script_runs_the_grpo_family(tmp_path):
    out = tmp_path / "out"
    result = subprocess.run(
        [
            sys.executable,
            str(REPO_ROOT / "scripts" / "compare.py"),
            "--methods=batch,grpo,rloo+buffer,dr_grpo+ema",
            "--seeds=1",
            "--workers=2",
            f"--out={out}",
            f"--logdir={tmp_path / 'runs'}",
            "--config.num_epochs=15",
            "--config.problem.num_prompts=8",
            "--config.sample_batch_size=32",
            "--config.device=cpu",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    table = (out / "results.md").read_text()
    for name in ("batch", "grpo", "rloo+buffer K=32 m=16", "dr_grpo+ema 0.7"):
        assert f"| {name} |" in table
    assert sorted(p.name.split("_", 1)[1] for p in (tmp_path / "runs").iterdir()) == [
        "batch_seed0",
        "dr_grpo+ema_seed0",
        "grpo_seed0",
        "rloo+buffer_seed0",
    ]
    refused = subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "compare.py"), "--methods=buffer+ema", f"--out={out}"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert refused.returncode != 0 and "unknown method 'buffer+ema'" in refused.stderr


@pytest.mark.parametrize("bad", ["0", "-4", "2.5", "abc", "", 0, -1, 2.5, True])
def test_parse_buffer_sizes_refuses_anything_but_whole_numbers_from_one(bad):
    assert comparison.parse_buffer_sizes(["2", 64, "4"]) == [2, 64, 4]
    with pytest.raises(ValueError, match=r"buffer sizes must be whole numbers >= 1, got"):
        comparison.parse_buffer_sizes(["4", bad])


@pytest.mark.parametrize("bad", ["0", "1", "1.5", "-0.1", "nan", "inf", "abc", "", 0.0, 1.0, 1.5, True])
def test_parse_ema_decays_refuses_anything_outside_the_open_unit_interval(bad):
    assert comparison.parse_ema_decays(["0.5", 0.99, "1e-3"]) == [0.5, 0.99, 0.001]
    with pytest.raises(ValueError, match=r"EMA decays must be numbers in the open interval \(0, 1\), got"):
        comparison.parse_ema_decays(["0.5", bad])


def test_parse_sweeps_refuse_repeats_that_would_share_a_setting_name():
    with pytest.raises(ValueError, match="buffer size 4 is listed twice"):
        comparison.parse_buffer_sizes(["4", "8", "04"])
    with pytest.raises(ValueError, match="EMA decay 0.5 is listed twice"):
        comparison.parse_ema_decays(["0.5", "0.50"])


@pytest.mark.parametrize(
    "methods,buffer_sizes,ema_decays,message",
    [
        ([], [], [], "methods is empty: name at least one of"),
        (["batch", "ema", "batch"], [], [], "method 'batch' is listed twice in methods"),
        (["buffer+ema"], [], [], "unknown method 'buffer\\+ema'"),
        (
            ["batch", "ema", "grpo"],
            [4],
            [],
            "buffer_sizes sweeps buffer memories, but methods has none: add 'buffer' or METHOD\\+buffer",
        ),
        (
            ["batch", "buffer", "rloo"],
            [],
            [0.5],
            "ema_decays sweeps EMA memories, but methods has none: add 'ema' or METHOD\\+ema",
        ),
        (["buffer", "rloo+buffer"], [1, 4], [], "buffer_sizes must be >= 2 with 'rloo\\+buffer'"),
        (["ema"], [], ["1.5"], "open interval \\(0, 1\\)"),
    ],
)
def test_check_sweep_refuses_what_would_be_ignored_or_fail_later(methods, buffer_sizes, ema_decays, message):
    with pytest.raises(ValueError, match=message):
        comparison.check_sweep(methods, buffer_sizes, ema_decays)
    with pytest.raises(ValueError, match=message):  # method_settings checks first too
        comparison.method_settings(default.get_config(), methods, buffer_sizes, ema_decays)


def test_check_sweep_accepts_sweeps_of_the_grpo_family_memories_alone():
    comparison.check_sweep(["rloo+buffer", "grpo+ema"], [2, 8], [0.5])
    comparison.check_sweep(["buffer"], [1])  # the tracker's own buffer works with one slot (min_count 1)
    names = [s.name for s in comparison.method_settings(default.get_config(), ["rloo+buffer", "grpo+ema"], [2], [0.5])]
    assert names == ["rloo+buffer K=2 m=2", "grpo+ema 0.5"]


def test_check_settings_and_run_comparison_refuse_a_bad_setting_before_starting_any_worker(monkeypatch, tmp_path):
    config = default.get_config()
    config.device = "cpu"
    good = comparison.Setting("ema 0.5", {"stat_tracking.method": "ema", "stat_tracking.ema_decay": 0.5})
    comparison.check_settings(config, [good])

    def no_pool(*args, **kwargs):
        raise AssertionError("run_comparison started a worker pool for settings it should have refused")

    monkeypatch.setattr(comparison.concurrent.futures, "ProcessPoolExecutor", no_pool)
    cases = [
        (
            [good, comparison.Setting("ema 1.5", {"stat_tracking.method": "ema", "stat_tracking.ema_decay": 1.5})],
            r"setting 'ema 1.5': config.stat_tracking.ema_decay must lie in \(0, 1\)",
        ),
        (
            [comparison.Setting("grpo", {"stat_tracking.method": "grpo", "stat_tracking.fallback": "rawx"})],
            "setting 'grpo': config.stat_tracking \\(method 'grpo'\\): fallback must be one of 'batch', 'raw', 'zero'",
        ),
        ([comparison.Setting("typo", {"stat_tracking.bufer_size": 3})], "setting 'typo': .*stat_tracking.bufer_size"),
        ([good, good], "setting names must be distinct"),
        ([], "there is no setting to compare"),
    ]
    for settings, message in cases:
        with pytest.raises(ValueError, match=message):
            comparison.check_settings(config, settings)
        with pytest.raises(ValueError, match=message):
            comparison.run_comparison(config, settings, [0], str(tmp_path / "runs"), num_workers=1)
    assert not (tmp_path / "runs").exists()


def test_plot_curves_of_runs_shorter_than_the_smoothing_window(tmp_path):
    results = [
        comparison.RunResult("a", seed, -1.0, 0.5, [-3.0, -2.0, -1.0, -1.5, -1.0], f"/runs/a{seed}")
        for seed in range(2)
    ] + [_result("b", 0, -50.0)]  # 5 epochs, and 20
    comparison.plot_curves(results, str(tmp_path / "c.png"), smoothing=10)
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
