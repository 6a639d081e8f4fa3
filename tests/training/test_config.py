"""ADDConfig: spec defaults, validation naming the bad field, JSON round trip."""

from __future__ import annotations

import json

import pytest

from training_helpers import single_thread  # noqa: F401  (repo root on sys.path; autouse fixture)
from comfyui_add.training.config import ADDConfig


def test_defaults_are_the_spec_values():
    cfg = ADDConfig()
    assert cfg.student_timesteps == (999, 749, 499, 249)
    assert cfg.distill_weight == 2.5 and cfg.r1_gamma == 1e-5
    assert cfg.distill_weighting == "exponential" and cfg.discriminator == "teacher"
    assert cfg.disc_betas == (0.0, 0.999) and cfg.weight_decay == 1e-2 and cfg.grad_clip == 1.0
    assert cfg.lr_student == 1e-4 and cfg.replace(training_mode="full").lr_student == 1e-6


@pytest.mark.parametrize("field,value", [
    ("distill_weight", -1.0),
    ("r1_gamma", float("nan")),
    ("distill_weighting", "linear"),
    ("discriminator", "clip"),
    ("student_timesteps", (999, 1000)),
    ("student_timesteps", ()),
    ("teacher_timestep_range", (500, 10)),
    ("disc_betas", (0.0, 1.0)),
    ("batch_size", 0),
    ("ema_decay", 1.0),
    ("max_nonfinite_steps", 0),
    ("training_mode", "qlora"),
    ("lr_lora", 0.0),
])
def test_bad_value_names_the_field_and_range(field, value):
    with pytest.raises(ValueError) as err:
        ADDConfig(**{field: value})
    msg = str(err.value)
    assert f"ADDConfig.{field}=" in msg and "expected" in msg


def test_bool_is_not_accepted_as_int():
    with pytest.raises(ValueError, match="batch_size"):
        ADDConfig(batch_size=True)


def test_json_round_trip_and_unknown_key():
    cfg = ADDConfig(student_timesteps=(999, 499), ema_decay=0.99, seed=7)
    again = ADDConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
    with pytest.raises(ValueError, match="unknown keys"):
        ADDConfig.from_dict({**cfg.to_dict(), "lamda": 2.0})


def test_config_is_frozen():
    with pytest.raises(AttributeError):
        ADDConfig().batch_size = 8  # type: ignore[misc]


def test_both_loss_weights_zero_is_refused():
    with pytest.raises(ValueError, match="distill_weight"):
        ADDConfig(adv_weight=0.0, distill_weight=0.0)



@pytest.mark.parametrize("value,message", [
    (100, "width 100 must be a multiple of 8 from 64 to 4096 (pixels); try 96."),
    (8192, "width 8192 must be a multiple of 8 from 64 to 4096 (pixels); try 4096."),
    (32, "width 32 must be a multiple of 8 from 64 to 4096 (pixels); try 64."),
    (float("nan"), "width is nan: type a whole number from 64 to 4096 (pixels)."),
    (512.5, "width is 512.5: type a whole number from 64 to 4096 (pixels)."), (True, "width is True"),
])
def test_one_size_check_for_the_node_the_config_and_the_benchmarks(value, message):
    from comfyui_add.core.errors import ADDError
    from comfyui_add.core.images import check_size
    from comfyui_add.training.inputs import check_run_inputs

    assert check_size(512, "width", hint="pixels") == 512 and check_size(512.0, "width") == 512
    with pytest.raises(ADDError) as e:
        check_size(value, "width", hint="pixels")
    assert str(e.value).startswith(message)
    with pytest.raises(ADDError, match="^cfg: width .* must be a multiple of 8 from 64 to 4096 .*; try 96"):
        check_run_inputs({"width": 100}, where="cfg: ")
