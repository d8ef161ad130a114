"""Compares stat-tracking methods over several seeds; see rail_interview/comparison.py.

Usage (the README's results come from these):
    python scripts/compare.py --methods=batch,buffer,ema --out=docs/results/methods
    python scripts/compare.py --methods=batch,buffer,ema --buffer_sizes=2,4,8,16,32,64 \
        --ema_decays=0.1,0.3,0.5,0.7,0.8,0.9,0.95,0.98,0.99 --seeds=10 --out=docs/results/sweep
    python scripts/compare.py --methods=batch,buffer,ema,grpo,grpo+buffer,grpo+ema,dr_grpo,dr_grpo+buffer,\
dr_grpo+ema,rloo,rloo+buffer,rloo+ema --out=docs/results/grpo

Methods: batch, buffer, ema, and the GRPO family grpo, dr_grpo, rloo, each
alone (memory "none") or with a memory as METHOD+buffer or METHOD+ema
(config.stat_tracking.memory). --buffer_sizes and --ema_decays sweep every
buffer and every EMA setting, the GRPO family's included.

Writes into --out: results.md (median and spread of final_reward per
setting), results.csv (one row per run) and curves.png (learning curves,
median over seeds with a band). Runs go to --logdir and use all CPU cores.
Any training config field can be overridden as in train.py, for example
--config.num_epochs=300.
"""

import os

from absl import app, flags, logging
from ml_collections import config_flags

from rail_interview import comparison, configs

_CONFIG = config_flags.DEFINE_config_file(
    "config", configs.DEFAULT_CONFIG_PATH, "Base training config.", lock_config=True
)
_METHODS = flags.DEFINE_list(
    "methods", ["batch", "buffer", "ema"], "Methods to compare: batch, buffer, ema, grpo, dr_grpo, rloo; "
    "METHOD+buffer or METHOD+ema for a GRPO-family METHOD with that memory."
)
_BUFFER_SIZES = flags.DEFINE_list(
    "buffer_sizes", [], "Buffer sizes to sweep for 'buffer' and METHOD+buffer (default: the config's). min_count is "
    "min(config min_count, buffer_size // 2), so that small buffers still switch on."
)
_EMA_DECAYS = flags.DEFINE_list(
    "ema_decays", [], "EMA decays to sweep for 'ema' and METHOD+ema (default: the config's)."
)
_SEEDS = flags.DEFINE_integer("seeds", 5, "Run seeds 0 .. seeds-1 for every setting.")
_OUT = flags.DEFINE_string("out", "logs/compare", "Directory for results.md, results.csv and curves.png.")
_LOGDIR = flags.DEFINE_string("logdir", "logs/compare/runs", "Parent directory of the individual runs.")
_WORKERS = flags.DEFINE_integer("workers", None, "Worker processes (default: one per CPU core).")
_BAD_THRESHOLD = flags.DEFINE_float("bad_threshold", -20.0, "final_reward below this counts as a bad run.")


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
        app.UsageError: for an unknown method.
    """
    try:
        return comparison.method_settings(config, methods, [int(s) for s in buffer_sizes],
                                          [float(d) for d in ema_decays])
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
    os.makedirs(_OUT.value, exist_ok=True)
    summaries = comparison.summarize(results, bad_threshold=_BAD_THRESHOLD.value)
    table = comparison.format_markdown(summaries, bad_threshold=_BAD_THRESHOLD.value)
    with open(os.path.join(_OUT.value, "results.md"), "w", encoding="utf-8") as f:
        f.write(table)
    comparison.write_csv(results, os.path.join(_OUT.value, "results.csv"))
    comparison.plot_curves(results, os.path.join(_OUT.value, "curves.png"))
    print(table)
    print(f"Wrote results.md, results.csv and curves.png to {_OUT.value}")


if __name__ == "__main__":
    app.run(main)
