"""Compares stat-tracking methods over several seeds; see rail_interview/studies/compare.py.

Usage (the README's results come from these):
    python scripts/compare.py --methods=batch,buffer,ema --out=docs/results/methods
    python scripts/compare.py --methods=batch,buffer,ema --buffer_sizes=2,4,8,16,32,64 \
        --ema_decays=0.1,0.3,0.5,0.7,0.8,0.9,0.95,0.98,0.99 --seeds=10 --out=docs/results/sweep
    python scripts/compare.py --methods=batch,buffer,ema,grpo,grpo+buffer,grpo+ema,dr_grpo,dr_grpo+buffer,\
dr_grpo+ema,rloo,rloo+buffer,rloo+ema --out=docs/results/grpo
    python scripts/compare.py --config=rail_interview/configs/pass_fail.py --seeds=10 \
        --methods=grpo,grpo+buffer,grpo+ema,dr_grpo,dr_grpo+buffer,dr_grpo+ema,rloo,rloo+buffer,rloo+ema \
        --out=docs/results/pass_fail_compare

--config picks the problem (config.problem.name): the default config's
distance problem, or configs/pass_fail.py's pass/fail problem, whose tables
add the medians of its true pass rate and share of zero-variance groups, at
the end and averaged over the run.
(scripts/pass_fail_study.py adds to that comparison each method's own
learning rate, seed-paired wins, group sizes, DAPO and ablations.)

Methods: batch, buffer, ema, and the GRPO family grpo, dr_grpo, rloo, each
alone (memory "none") or with a memory as METHOD+buffer or METHOD+ema
(config.stat_tracking.memory). --buffer_sizes and --ema_decays sweep every
buffer and every EMA setting, the GRPO family's included; each needs a
method with that memory.

Writes into --out: results.md (median and spread of final_reward per
setting), results.csv (one row per run) and curves.png (learning curves,
median over seeds with a band). Without --out that is a fresh temporary
directory, printed at the end: the committed results under docs/results/
change only when --out names them. Runs go to --logdir and use all CPU cores.
Any training config field can be overridden as in train.py, for example
--config.num_epochs=300.

Every flag, and every setting's tracker, is checked before any training: a
mistake ends with a one-line error that names the flag and what it allows.
"""

import math
import os
import re
import tempfile

from absl import app, flags, logging

from rail_interview import configs, problems
from rail_interview.studies import compare as comparison

_CONFIG = configs.define_config_flag("compare.py", "Base training config.")
_METHODS = flags.DEFINE_list(
    "methods",
    ["batch", "buffer", "ema"],
    "Methods to compare: batch, buffer, ema, grpo, dr_grpo, rloo; "
    "METHOD+buffer or METHOD+ema for a GRPO-family METHOD with that memory.",
)
_BUFFER_SIZES = flags.DEFINE_list(
    "buffer_sizes",
    [],
    "Buffer sizes (whole numbers >= 1) to sweep for 'buffer' and METHOD+buffer, which --methods "
    "must name (default: the config's). min_count is min(config min_count, buffer_size // 2), so that small buffers "
    "still switch on.",
)
_EMA_DECAYS = flags.DEFINE_list(
    "ema_decays",
    [],
    "EMA decays, in (0, 1), to sweep for 'ema' and METHOD+ema, which --methods must name (default: the config's).",
)
_SEEDS = flags.DEFINE_integer("seeds", 5, "Run seeds 0 .. seeds-1 for every setting; at least 1.")
_OUT = flags.DEFINE_string(
    "out",
    None,
    "Directory for results.md, results.csv and curves.png (default: a fresh temporary directory, printed at the end).",
)
_LOGDIR = flags.DEFINE_string("logdir", "logs/compare/runs", "Parent directory of the individual runs.")
_WORKERS = flags.DEFINE_integer("workers", None, "Worker processes, at least 1 (default: one per CPU core).")
_BAD_THRESHOLD = flags.DEFINE_float(
    "bad_threshold",
    None,
    "final_reward below this counts as a bad run (default: the problem's, -20 for distance, 0.2 for pass_fail).",
)


def _validator(check):
    """Wraps ``check``, which raises ValueError, as an absl validator that raises flags.ValidationError."""

    def validate(value):
        """True if ``check`` accepts ``value``; else flags.ValidationError with its message."""
        try:
            check(value)
        except ValueError as error:
            raise flags.ValidationError(_flag_names(error)) from error
        return True

    return validate


def _flag_names(error):
    """The error's message on one line, with comparison's argument names written as this script's flags."""
    return re.sub(r"(?<![-\w])(methods|buffer_sizes|ema_decays)\b", r"--\1", " ".join(str(error).split()))


def _check_at_least_one(value):
    """Refuses an integer below 1; None (the default) passes."""
    if value is not None and value < 1:
        raise ValueError(f"must be an integer >= 1, got {value}")


def _check_directory(value):
    """Refuses an empty path or one that exists and is not a directory; None (the default) passes."""
    if value is None:
        return
    if not value:
        raise ValueError("must name a directory")
    if os.path.exists(value) and not os.path.isdir(value):
        raise ValueError(f"must be a directory, but {value!r} is a file")


def _check_threshold(value):
    """Refuses NaN, below which no run would ever count; None (the default) passes."""
    if value is not None and math.isnan(value):
        raise ValueError("must be a number, got nan")


def _check_sweep(values):
    """The cross-flag checks of comparison.check_sweep: a sweep needs a method with its memory."""
    return _validator(
        lambda _: comparison.check_sweep(values["methods"], values["buffer_sizes"], values["ema_decays"])
    )(None)


def _check_settings(values):
    """Builds every setting's config and tracker once, so that a bad setting fails before any training."""
    config = flags.FLAGS["config"].value  # parsed, with its --config.* overrides, before any validator runs
    try:
        settings = comparison.method_settings(config, values["methods"], values["buffer_sizes"], values["ema_decays"])
        comparison.check_settings(config, settings)
    except ValueError as error:
        raise flags.ValidationError(f"{_flag_names(error)} (check the --config.* overrides)") from error
    return True


# absl checks these in this order when it parses the flags, before main, and stops at the first that fails.
flags.register_validator("methods", _validator(comparison.check_sweep))
flags.register_validator("buffer_sizes", _validator(comparison.parse_buffer_sizes))
flags.register_validator("ema_decays", _validator(comparison.parse_ema_decays))
flags.register_validator("seeds", _validator(_check_at_least_one))
flags.register_validator("workers", _validator(_check_at_least_one))
flags.register_validator("bad_threshold", _validator(_check_threshold))
flags.register_validator("out", _validator(_check_directory))
flags.register_validator("logdir", _validator(lambda value: _check_directory(value or "")))
flags.register_multi_flags_validator(["methods", "buffer_sizes", "ema_decays"], _check_sweep)
# Not on "config": absl would print the whole config in the error line.
flags.register_multi_flags_validator(["methods", "buffer_sizes", "ema_decays"], _check_settings)


def build_settings(config, methods, buffer_sizes, ema_decays):
    """Turns the flags into the list of settings to compare.

    See ``comparison.method_settings`` for the method names.

    Args:
        config: the base config (for default buffer size and min_count).
        methods: method names.
        buffer_sizes: buffer sizes to sweep for buffer memories; empty for the config's.
        ema_decays: decays to sweep for EMA memories; empty for the config's.

    Returns:
        A list of comparison.Setting.

    Raises:
        app.UsageError: for anything ``comparison.method_settings`` refuses (the flag validators refuse it first).
    """
    try:
        return comparison.method_settings(
            config, methods, comparison.parse_buffer_sizes(buffer_sizes), comparison.parse_ema_decays(ema_decays)
        )
    except ValueError as error:
        raise app.UsageError(str(error)) from error


def main(argv):
    """Runs the comparison and writes its tables and plot.

    Args:
        argv: leftover command-line arguments; there must be none.
    """
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    settings = build_settings(_CONFIG.value, _METHODS.value, _BUFFER_SIZES.value, _EMA_DECAYS.value)
    logging.info("Comparing %d settings x %d seeds", len(settings), _SEEDS.value)
    results = comparison.run_comparison(
        _CONFIG.value, settings, range(_SEEDS.value), _LOGDIR.value, num_workers=_WORKERS.value
    )
    if _OUT.value is None:
        out = tempfile.mkdtemp(prefix="rail_interview_compare_")
    else:
        out = _OUT.value
        os.makedirs(out, exist_ok=True)
    bad_threshold = _BAD_THRESHOLD.value
    if bad_threshold is None:
        bad_threshold = problems.bad_final_reward(problems.problem_name(_CONFIG.value))
    summaries = comparison.summarize(results, bad_threshold=bad_threshold)
    table = comparison.format_markdown(summaries, bad_threshold=bad_threshold)
    with open(os.path.join(out, "results.md"), "w", encoding="utf-8") as f:
        f.write(table)
    comparison.write_csv(results, os.path.join(out, "results.csv"))
    comparison.plot_curves(results, os.path.join(out, "curves.png"))
    print(table)
    print(f"Wrote results.md, results.csv and curves.png to {out}")


if __name__ == "__main__":
    app.run(main)
