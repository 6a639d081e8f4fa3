"""Presets of ADD Train / the headless trainer: what they set, what the user keeps."""

from __future__ import annotations

import pytest

from training_helpers import single_thread  # noqa: F401 (autouse)
from comfyui_add.training.config import ADDConfig
from comfyui_add.training.presets import PRESET_NAMES, apply_preset, preset_fields


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_every_preset_makes_a_valid_config(name):
    fields, _ = apply_preset(name, {})
    ADDConfig(**fields)


def test_none_changes_nothing_and_unknown_names_the_choices():
    assert apply_preset("none", {"lr_lora": 3e-4}) == ({"lr_lora": 3e-4}, {})
    with pytest.raises(ValueError, match="small_data"):
        preset_fields("fast")


def test_preset_wins_over_widgets_but_not_over_explicit_keys():
    fields, changed = apply_preset("small_data", {"lr_lora": 1e-4, "lora_rank": 8}, explicit={"lr_disc"})
    assert fields["lr_lora"] == 1e-3 and changed["lr_lora"] == 1e-3
    assert fields["lora_rank"] == 8 and "lora_rank" not in changed  # not a preset field
    assert "lr_disc" not in changed and "lr_disc" not in fields  # the user's explicit key stays theirs


def test_timestep_ranges_are_clipped_to_the_models_schedule():
    assert preset_fields("small_data", t_max=30)["disc_timestep_range"] == (0, 30)


def test_on_given_images_a_preset_sets_neither_its_pairs_nor_what_was_measured_beside_them():
    from comfyui_add.training.presets import WITH_PAIRS_ONLY, fields_on_run, preset_fields

    small = preset_fields("small_data")
    assert fields_on_run("small_data") == small
    on_images = fields_on_run("small_data", images=True)
    assert "paired_weight" not in on_images and not set(WITH_PAIRS_ONLY) & set(on_images)
    assert {k: v for k, v in small.items() if k in on_images} == on_images and on_images["lr_lora"] == small["lr_lora"]
    assert fields_on_run("paper", images=True) == preset_fields("paper")  # no pairs there: nothing is left out
