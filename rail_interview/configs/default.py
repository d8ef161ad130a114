"""Default config: the toy problem as the original task set it up.

Run it with:

    python scripts/train.py

and override any field on the command line, for example:

    python scripts/train.py --config.stat_tracking.method=batch --config.seed=3

A mistyped field name is an error (the config is locked). Expected result on
a laptop-class CPU: 1000 epochs in well under a second of training loop, and a
``final_reward`` (mean batch reward over the last 10 epochs) near -5 with the
default ``method=buffer`` and near -40 with ``method=batch``; the README's
results table has the figures over 5 seeds.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    """Returns the default training config.

    Returns:
        A ConfigDict with the run, problem, training and stat tracking fields.
    """
    config = ml_collections.ConfigDict()

    ###### Run ######
    # Seed of the one torch.Generator that draws the problem instance, the
    # initial parameters and every sample: same seed, same run, bit for bit.
    config.seed = 0
    # Where to run: "auto" (CUDA when available, else CPU), "cpu" or "cuda".
    config.device = "auto"
    # Number of epochs; each epoch samples one batch and takes one update step.
    config.num_epochs = 1000
    # Every this many epochs, metrics are read back from the device, appended
    # to metrics.csv and a progress line is printed. Larger means fewer host
    # syncs; the last partial chunk is always written at the end.
    config.log_every = 100
    # Every this many epochs, and at the end, the model, the tracker state and
    # the random generators are saved to <run_dir>/checkpoint.pt, so that
    # `train.py --logdir=<run_dir> --resume` can continue the run exactly.
    # 0: only at the end. Must be a multiple of log_every.
    config.checkpoint_every = 500
    # CPU threads torch may use (torch.set_num_threads); 0 leaves torch's
    # default (one per core). The default problem's tensors are a few hundred
    # elements, too small to split: one thread is fastest, and it keeps the
    # loop fast when other processes share the cores (measured in the README).
    config.num_threads = 1

    ###### Per-prompt stats log ######
    # Each recorded epoch writes, for each recorded prompt, the tracker's mean,
    # std, count and fallback flag and the prompt's batch reward mean to
    # <run_dir>/stats/ (see the README); scripts/plot_stats.py plots them.
    config.stats_log = ml_collections.ConfigDict()
    # Record one epoch in this many; 0 turns the log off.
    config.stats_log.every = 1
    # Record prompts 0 .. max_prompts - 1 only (prompt ids are a random order
    # of the prompts, so this is a random sample). Bounds the log at
    # max_prompts * 29 bytes per recorded epoch: 7.4 kB at the default.
    config.stats_log.max_prompts = 256

    ###### Problem ######
    config.problem = ml_collections.ConfigDict()
    # Which toy problem (rail_interview/problems/, by its registered name): "distance", this one
    # (reward -|answer - label|), or "pass_fail", whose fields are in
    # configs/pass_fail.py (pass --config=rail_interview/configs/pass_fail.py).
    config.problem.name = "distance"
    # P: number of distinct prompts.
    config.problem.num_prompts = 64
    # S: number of policy parameters; each prompt reads one of them, so with
    # P prompts about P * P / (2 * S) pairs of prompts share a slot.
    config.problem.num_params = 1024

    ###### Training ######
    # N: prompts sampled per epoch, uniformly with replacement (about N / P
    # samples per prompt per epoch).
    config.sample_batch_size = 256
    # Step size of the policy-gradient update.
    config.learning_rate = 1.0

    ###### Stat tracking ######
    config.stat_tracking = ml_collections.ConfigDict()
    # How rewards become advantages:
    #   "buffer": per-prompt mean and std of each prompt's last `buffer_size`
    #             rewards (whole-batch statistics until it has `min_count`);
    #   "ema":    per-prompt exponential moving averages of mean and variance
    #             (whole-batch statistics until it has `min_count` rewards);
    #   "batch":  the whole batch's mean and std, the baseline;
    # and the GRPO family (stat_tracking.presets, with `memory` below):
    #   "grpo":    (r - group mean) / (group sample std (ddof 1) + 1e-6), as
    #              verl's compute_grpo_outcome_advantage and TRL's
    #              scale_rewards="group" (presets.verl_grpo);
    #   "dr_grpo": r - group mean, no std (Dr. GRPO;
    #              presets.verl_grpo(norm_adv_by_std=False));
    #   "rloo":    r - mean of the group's other rewards, no std
    #              (presets.verl_rloo).
    # A "group" is a prompt's samples in the batch (about N / P = 4 here).
    # Any other name of the preset registry works too (presets.names(): "ddpo",
    # "trl_grpo", ...); the fields below are passed to it where its signature
    # names them (presets.parameters(method)).
    config.stat_tracking.method = "buffer"
    # GRPO family only (the other methods refuse anything but "none"): where a
    # prompt's group statistics come from.
    #   "none":   its samples in this batch, as verl and TRL: a prompt needs
    #             2 samples (the preset's min_count, not `min_count` below);
    #   "buffer": its last `buffer_size` rewards, the batch included, and
    #             `min_count` of them;
    #   "ema":    moving averages with `ema_decay`, and `min_count` rewards;
    #   "beta":   a Beta posterior of the pass rate (rewards in [0, 1] only),
    #             discounted by `rho`, and `min_count` rewards.
    config.stat_tracking.memory = "none"
    # GRPO family only (the other methods refuse anything but "auto"): what a
    # prompt with too few rewards gets (here prompts are drawn with
    # replacement, so some have one sample in a batch):
    #   "auto":  the method's own: "zero" for the GRPO family, the whole
    #            batch's statistics for "buffer" and "ema";
    #   "zero":  advantage 0, as TRL gives a group of one;
    #   "raw":   its raw reward, as verl gives a group of one. On this problem
    #            that diverges: raw rewards are about -75 at the start;
    #   "batch": the whole batch's mean and std, as "buffer" and "ema" do.
    config.stat_tracking.fallback = "auto"
    # "buffer" (and memory "buffer"): rewards kept per prompt. The batch holds
    # about N / P = 4 samples of each prompt, so 32 covers about the last 8
    # epochs.
    config.stat_tracking.buffer_size = 32
    # "buffer" and "ema" (and memory "buffer" and "ema"): rewards a prompt
    # needs before its own statistics are used; about 4 epochs of samples here.
    config.stat_tracking.min_count = 16
    # "ema" (and memory "ema"): weight the old statistics keep at each new
    # reward of the prompt.
    # The memory is about 1 / (1 - ema_decay) rewards: 3.3 at 0.7, under one
    # epoch here. The README's sweep found a plateau from 0.3 to 0.8 on this
    # problem; 0.7 is at its top with the longest memory.
    config.stat_tracking.ema_decay = 0.7
    # "spo" (and memory "beta"): the discount of a prompt's pass and fail
    # counts at each reward, in (0, 1]; its memory is about 1 / (1 - rho)
    # rewards.
    config.stat_tracking.rho = 0.9
    # GRPO family with a memory: False takes each prompt's baseline and scale
    # from its memory as it was before the batch (SPO's baseline from the
    # past), True from the memory with the batch folded in.
    config.stat_tracking.include_batch = True
    # Check prompt ids and rewards in every update. On a GPU each check is a
    # host sync, so it is off by default: the training loop's inputs are
    # produced by this package.
    config.stat_tracking.check_values = False

    ###### Prompt selection ######
    config.prompt_sampler = ml_collections.ConfigDict()
    # Which prompts each step trains on:
    #   "none":         the problem draws them (uniformly);
    #   "uniform", "spo", "failure_rate", "greso": a PromptSampler draws them
    #                   by that rule from what the tracker's memory says of
    #                   each prompt (stat_tracking.sampling; docs/pass_rate.md).
    # Problems whose prompts come in groups of G only (the pass/fail problem).
    config.prompt_sampler.rule = "none"
    # "spo" and "failure_rate": added to every weight, so that no prompt is
    # left out for good.
    config.prompt_sampler.epsilon = 0.05
    # "greso": a prompt whose last z visits had all-equal rewards is drawn
    # with weight max(p ** z, min_keep), p = p_easy above a pass rate of 0.5,
    # p_hard below.
    config.prompt_sampler.p_easy = 0.5
    config.prompt_sampler.p_hard = 0.5
    config.prompt_sampler.min_keep = 0.01

    return config
