"""rail_interview: per-prompt reward stat tracking for policy-gradient RL.

Subpackages and modules:
    stat_tracking: the product, trackers that turn rewards into advantages.
        It knows nothing of the toy problem and can be used on its own.
    toy_problem: a small policy-gradient problem whose prompts have very
        different reward distributions, the testbed for the trackers.
    pass_fail_problem: the second one, pass/fail rewards in groups of G
        samples per prompt and parameters shared by every prompt.
    problems: the two by name, as ``config.problem.name`` chooses them.
    training: the training loop on either problem, driven by a config.
    pass_fail_training, pass_fail_study: the same steps on the pass/fail
        problem in process, with DAPO and ablations, and the study of
        where per-prompt memory pays.
    comparison: several settings over several seeds (``scripts/compare.py``).
    configs: ml_collections config files for ``scripts/train.py``.
"""
