"""The pass/fail problem (``rail_interview/problems/pass_fail.py``): rewards in {0, 1}, groups of G samples.

Run it with:

    python scripts/train.py --config=rail_interview/configs/pass_fail.py

and override any field as with the default config, for example:

    python scripts/train.py --config=rail_interview/configs/pass_fail.py \\
        --config.stat_tracking.memory=none --config.problem.group_size=2

Each step samples N / G distinct prompts, G answers each, as GRPO trainers
do; metrics.csv gains ``pass_rate`` (the policy's true mean pass rate over
all prompts, from the closed-form pass probability) and
``zero_variance_frac`` (the share of the step's groups whose rewards are all
equal). The fields below are the study's (``scripts/pass_fail_study.py``
builds its runs from this file); the README's section "Where memory pays"
has its results.
"""

import ml_collections

from rail_interview.configs import default


def get_config() -> ml_collections.ConfigDict:
    """Returns the pass/fail training config: the default config's fields, with the problem's and GRPO's values.

    Returns:
        A ConfigDict with the run, problem, training and stat tracking fields.
    """
    config = default.get_config()
    # 300 steps reach about 95% of the ceiling with memory, in well under a
    # second of training loop.
    config.num_epochs = 300
    config.log_every = 50
    config.checkpoint_every = 100

    ###### Problem ######
    config.problem = ml_collections.ConfigDict()
    config.problem.name = "pass_fail"
    # P: number of distinct prompts. A prompt is in a step's batch with
    # probability (N / G) / P: every 4 steps here at G = 4.
    config.problem.num_prompts = 64
    # D: the policy's weights, shared by every prompt (D < P): a step on one
    # prompt moves the pass rates of the others.
    config.problem.num_params = 8
    # G: samples of each prompt in a step. sample_batch_size must be a
    # multiple of it, with at most num_prompts groups.
    config.problem.group_size = 4
    # An answer passes within this distance of the prompt's label.
    config.problem.tolerance = 1.0
    # Each prompt's sampling std is uniform in [min_sigma, max_sigma): its
    # best pass rate, 2 Phi(tolerance / sigma) - 1, runs from 0.95 to 0.26.
    config.problem.min_sigma = 0.5
    config.problem.max_sigma = 3.0
    # Std of the hidden weights' entries: labels are this far from the
    # initial answers (0), so most prompts start near a pass rate of 0.
    # Smaller starts them higher (the study's "higher start" rows use 4, 2, 1).
    config.problem.label_scale = 8.0

    ###### Training ######
    # N: samples per step, N / G = 16 prompts at G = 4.
    config.sample_batch_size = 64
    # The study's shared learning rate; each method's best is in the README.
    config.learning_rate = 5.0

    ###### Stat tracking ######
    # GRPO with a buffer memory: the study's finding (the README's "Where
    # memory pays"). memory="none" is GRPO as verl and TRL run it.
    config.stat_tracking.method = "grpo"
    config.stat_tracking.memory = "buffer"
    # A prompt's 32 last rewards: 8 visits at G = 4. With "grpo" (or method
    # "buffer") it must be at least group_size, a prompt's samples in one
    # step (the processes of a torchrun job draw distinct prompts).
    config.stat_tracking.buffer_size = 32
    # Rewards a prompt's memory needs before its statistics are used (one
    # visit at G = 4); below it, its samples get the fallback (0).
    config.stat_tracking.min_count = 4
    config.stat_tracking.ema_decay = 0.9
    return config
