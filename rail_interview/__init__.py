"""rail_interview: per-prompt reward stat tracking for policy-gradient RL.

Subpackages and modules:
    stat_tracking: the product, trackers that turn rewards into advantages.
        It knows nothing of the toy problem and can be used on its own.
    toy_problem: a small policy-gradient problem whose prompts have very
        different reward distributions, the testbed for the trackers.
    training: the training loop on the toy problem, driven by a config.
    configs: ml_collections config files for ``scripts/train.py``.
"""
