"""rail_interview: per-prompt reward stat tracking for policy-gradient RL.

Subpackages and modules, data flowing down:
    stat_tracking: the product, trackers that turn rewards into advantages.
        It knows nothing of the problems or training and can be used on its own.
    problems: the testbeds as plugins, a ``Problem`` protocol and a registry
        that ``config.problem.name`` picks from: ``distance`` (the original
        task's, prompts with very different reward distributions) and
        ``pass_fail`` (pass/fail rewards in groups of G, shared parameters).
    training: one training step, the loop ``train(config, logdir)`` over it,
        the run directory and the config's checks.
    studies: several settings over several seeds (``compare``,
        ``scripts/compare.py``) and the pass/fail study of where per-prompt
        memory pays (``pass_fail``, ``pass_fail_runs``).
    configs: ml_collections config files for ``scripts/train.py``.
    stats_plots: plots of a run's per-prompt stats log (``scripts/plot_stats.py``).
    distributed, checkpointing: the little of torch.distributed and
        torch.save that training needs.
"""
