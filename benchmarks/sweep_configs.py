"""The named configurations of ``benchmarks/sweep_digits.py`` (``--sweep NAME``; ``--list`` prints them).
What each showed is recorded in ``benchmarks/README_digits.md``."""
from __future__ import annotations

from typing import Any

# --------------------------------------------------------------------------------------------
# the configurations tried (README_digits.md records what each showed)
# --------------------------------------------------------------------------------------------
# Every configuration starts from benchmarks.digits.FULL as it is now. The sweeps before 'paired' ran when FULL had
# no noise-paired regression (paired_weight 0; since 'critic': EMA + input features): add {"paired_weight": 0.0}
# to re-run one of them as it was. Every sweep up to 'paired_metric' ran with the pairs measured as latent MSE
# (FULL's paired_metric was 'mse', now 'mse+features'): add {"paired_metric": "mse"} to re-run one as it was. Every
# sweep before 'dmd_pairs1000' ran with the paper's distillation regression at lambda 2.5 (FULL now has distribution
# matching at lambda 25): REGRESSION below is merged under each of their configurations, so they re-run as they ran.
# The README's commands give --steps (FULL.add_steps is the proof table's 500).

SWEEPS: dict[str, dict[str, dict[str, Any]]] = {
    # Does longer training help or hurt, and is the adversarial part the cause? (--steps 1000 or more)
    "length": {
        "add": {"paired_weight": 0.0},  # round two's settings
        "pairs_only": {"adv_weight": 0.0, "distill_weight": 0.0, "paired_metric": "mse"},
        "adv_paired100": {"distill_weight": 0.0, "paired_weight": 100.0, "paired_metric": "mse"},
        "distill_only": {"adv_weight": 0.0},
        "adv_only": {"distill_weight": 0.0},
        "balance1": {"adv_grad_balance": 1.0},
        "add_paired100": {"paired_weight": 100.0, "paired_metric": "mse"},
        "add_both": {},  # round three's shipped settings: the pairs as mse+features, the regression
    },
    # round three's settings (MSE pairs, the regression) over 3,000 steps (its own sweep name: the runs of
    # 'length' are keyed by configuration and seed, not by length): --steps 3000 --eval-every 500
    "length3000": {
        "add_paired100": {"paired_weight": 100.0, "paired_metric": "mse"},
    },
    # One seed each, 300 steps: what the discriminator sees, its regularisation, the student's EMA.
    "scan": {
        "add": {},
        "feat_input": {"disc_features": "input+encoder"},
        "feat_all": {"disc_features": "all"},
        "pixel_d": {"discriminator": "pixel"},
        "ema": {"ema_decay": 0.99},
        "r1_1e-2": {"r1_gamma": 1e-2},
    },
    # One seed each, 300 steps, on top of the input convolution's features: a stronger critic.
    "critic": {
        "feat_input_ema": {"disc_features": "input+encoder", "ema_decay": 0.99},
        "feat_input_ttur3": {"disc_features": "input+encoder", "disc_updates": 3},
        "feat_input_nosn": {"disc_features": "input+encoder", "spectral_norm": False},
        "pixel_d": {"discriminator": "pixel"},
    },
    # The adversarial pull on x_hat rescaled to a multiple of the distillation pull (adv_grad_balance).
    "balance": {
        "ema_bal1": {"disc_features": "input+encoder", "ema_decay": 0.99, "adv_grad_balance": 1.0},
        "ema_bal0.3": {"disc_features": "input+encoder", "ema_decay": 0.99, "adv_grad_balance": 0.3},
    },
    # The student's EMA with lower learning rates (less noise in the weights it averages).
    "lr": {
        "ema_lr3e-4": {"disc_features": "input+encoder", "ema_decay": 0.99, "lr_lora": 3e-4},
        "ema_lr3e-4_d3e-4": {"disc_features": "input+encoder", "ema_decay": 0.99, "lr_lora": 3e-4, "lr_disc": 3e-4},
    },
    # the student: LoRA rank 16 (the proof's) and 64 against every weight (the paper's setup), the full
    # student sampled through a LoRA extracted at rank 1024 (wider than any layer: exact up to fp16)
    "student": {
        "lora16": {},
        "lora64": {"lora_rank": 64},
        "full_1e-4": {"training_mode": "full", "lr_full": 1e-4, "lora_rank": 1024},
        "full_1e-5": {"training_mode": "full", "lr_full": 1e-5, "lora_rank": 1024},
    },
    # the distillation target's CFG: the training data (what D calls real) is the teacher at CFG 2, the
    # target defaults to CFG 1, so the two terms may pull toward two distributions
    "target": {
        "distill_cfg2": {"distill_cfg": 2.0},
        "distill_cfg3": {"distill_cfg": 3.0},
    },
    # what the discriminator calls real: the real train split instead of the teacher's samples
    "data": {
        "real": {"data": "real"},
    },
    # distribution matching (DMD/DMD2) in place of the pointwise regression: a fake score (second LoRA on
    # the teacher) learns the student's samples; the student moves along teacher score - fake score
    "dmd": {
        "dmd": {"distill_loss": "dmd"},
        "dmd_only": {"distill_loss": "dmd", "adv_weight": 0.0},
        "dmd_only_cfg2": {"distill_loss": "dmd", "adv_weight": 0.0, "distill_cfg": 2.0},
    },
    # distribution matching needs the fake score to keep up: a student learning rate well below the critics'
    "dmd_lr": {
        "dmd_only_lr1e-4": {"distill_loss": "dmd", "adv_weight": 0.0, "lr_lora": 1e-4},
        "dmd_only_lr3e-5": {"distill_loss": "dmd", "adv_weight": 0.0, "lr_lora": 3e-5},
    },
    # distribution matching on the single step only: the fake score then models exactly the 1-step samples
    "dmd_ts999": {
        "dmd_only_ts999_lr1e-4": {"distill_loss": "dmd", "adv_weight": 0.0, "lr_lora": 1e-4, "student_timesteps": [999]},
        "dmd_only_ts999": {"distill_loss": "dmd", "adv_weight": 0.0, "student_timesteps": [999]},
    },
    # the noise-paired regression (paired_weight): the 1-step student from the noise each pool sample started
    # from, regressed onto that sample (the teacher's ODE map), alone and added to ADD
    "paired": {
        "paired_only": {"adv_weight": 0.0, "distill_weight": 0.0, "paired_weight": 1.0, "paired_metric": "mse"},
        "add_paired10": {"paired_weight": 10.0, "paired_metric": "mse"},
        "add_paired100": {"paired_weight": 100.0, "paired_metric": "mse"},
    },
    # which student timesteps are trained: the single step starts at 999 only; the default spreads the batch
    # over four (999, 749, 499, 249), so a quarter of it trains the 1-step map
    "timesteps": {
        "ts999": {"student_timesteps": [999]},
        "ts999_499": {"student_timesteps": [999, 499]},
    },
    # distribution matching with t inside [0.02 T, 0.98 T] (DMD2), and the critic's two time-scale rule
    "dmd_trim": {
        "dmd_only": {"distill_loss": "dmd", "adv_weight": 0.0},
        "dmd_only_ttur3": {"distill_loss": "dmd", "adv_weight": 0.0, "disc_updates": 3},
    },
    # the distillation weight lambda with the pairs on: the distillation pull on x_hat is 30-60x below the
    # adversarial pull at the paper's 2.5, so with the pairs beside them it changed nothing measurable
    "lambda": {
        "lam25": {"distill_weight": 25.0, "paired_metric": "mse"},
        "lam100": {"distill_weight": 100.0, "paired_metric": "mse"},
    },
    # the pairs' distance: LPIPS-like in the discriminator's feature network instead of latent MSE
    "paired_metric": {
        "feat_pairs100": {"paired_metric": "features"},
        "feat_pairs10": {"paired_metric": "features", "paired_weight": 10.0},
        "both_pairs100": {"paired_metric": "mse+features"},
    },
    # DMD2's backward simulation: the 2- and 4-step student trains on its own inputs below the top timestep
    "bsim": {
        "bsim": {"backward_simulation": True, "paired_metric": "mse"},
    },
    # the student's capacity with the shipped pairs: a regression onto the teacher's ODE map may want more freedom
    # than ADD's terms alone did ('student' ran without pairs)
    "student_pairs": {
        "lora64": {"lora_rank": 64},
        "full_1e-4": {"training_mode": "full", "lr_full": 1e-4, "lora_rank": 1024},
    },
    # backward simulation with the shipped pairs over 1,000 steps, where the 4-step student declined
    # (--steps 1000 --eval-every 250; 'length/add_both' is the same run without it)
    "bsim1000": {
        "bsim_both": {"backward_simulation": True},
    },
    # the adversarial weight with the shipped pairs: at 1 step ADD, adversarial only and pairs only are equal
    # within the spread; does a larger adversarial weight make the term count there?
    "adv_weight": {
        "adv5": {"adv_weight": 5.0},
        "adv20": {"adv_weight": 20.0},
        "adv0.3": {"adv_weight": 0.3},
        "adv0.1": {"adv_weight": 0.1},
    },
    # the weaker adversarial pull over 1,000 steps: does the 4-step student still decline?
    # (--steps 1000 --eval-every 250; 'length/add_both' is weight 1)
    "adv_weight1000": {
        "adv0.3": {"adv_weight": 0.3},
    },
    # distribution matching beside the shipped pairs: the adversarial term's strength drives the multi-step
    # student's collapse ('adv_weight'); distribution matching alone made the best 4-step student ('dmd_lr')
    "dmd_pairs": {
        "dmd_pairs": {"distill_loss": "dmd"},
        "dmd_pairs_lam25": {"distill_loss": "dmd", "distill_weight": 25.0},
    },
    # distribution matching (lambda 25) beside the shipped pairs over 1,000 steps, where the 4-step student
    # declined (--steps 1000 --eval-every 250; 'length/add_both' is the run without it)
    "dmd_pairs1000": {
        "dmd_pairs_lam25": {"distill_loss": "dmd", "distill_weight": 25.0},
    },
    # the teacher-generated training data (and the pairs' targets): its CFG (the teacher's 25 steps at CFG 2,
    # the table's target, keep 0.76 of the test split's diversity) and the sampler's steps
    "data_cfg": {
        "data_cfg1": {"data_cfg": 1.0, "paired_metric": "mse"},
        "data_cfg1.5": {"data_cfg": 1.5, "paired_metric": "mse"},
        "data_steps25": {"data_steps": 25, "paired_metric": "mse"},
    },
    # the shipped choices checked again on the validation split (every sweep above was scored on the test split,
    # before the splits had a validation part): the shipped settings against each choice undone, at the proof's
    # length (--steps 500 --eval-every 250)
    "validation": {
        "shipped": {},
        "regression": {"distill_loss": "regression", "distill_weight": 2.5},
        "mse_pairs": {"paired_metric": "mse"},
        "paper_terms": {"paired_weight": 0.0, "distill_loss": "regression", "distill_weight": 2.5},
        # two of round one's choices that the preset keeps: the student's EMA, the input convolution's features
        "no_ema": {"ema_decay": None},
        "encoder_features": {"disc_features": "encoder"},
    },
    # the paper's data for the discriminator: the real train split as what D calls real, while the student's inputs,
    # the distillation term and the pairs stay the teacher's (data 'teacher+real'); with the ablations beside it
    # (--steps 500, on the validation split)
    "real_disc": {
        "add_realD": {"data": "teacher+real"},
        "adv_only_realD": {"data": "teacher+real", "distill_weight": 0.0},
        "distill_only": {"adv_weight": 0.0},
        # a stronger pull of the real-data discriminator beside the pairs (with D on the teacher's samples, weight 5
        # made the single step worse: 'adv_weight')
        "add_realD_adv5": {"data": "teacher+real", "adv_weight": 5.0},
    },
    # the rest of the preset's choices from rounds one and two, each undone on its own on the validation split
    # (--steps 500; the shipped run is 'validation/shipped'): the learning rates, the discriminator's noise range,
    # its head norm
    "validation2": {
        "lr3e-4": {"lr_lora": 3e-4, "lr_disc": 3e-4},
        "lr3e-3": {"lr_lora": 3e-3, "lr_disc": 3e-3},
        "disc_t999": {"disc_t_hi": 999},
        "norm_batch_local": {"disc_norm": "batch_local"},
    },
}

# the distillation term of every sweep before 'dmd_pairs1000' (FULL's until then); a configuration's own keys win
REGRESSION: dict[str, Any] = {"distill_loss": "regression", "distill_weight": 2.5}
_AFTER_REGRESSION = ("dmd_pairs1000", "validation", "real_disc", "validation2")
for _sweep, _configs in SWEEPS.items():
    if _sweep not in _AFTER_REGRESSION:
        for _name, _overrides in _configs.items():
            _configs[_name] = {**REGRESSION, **_overrides}
