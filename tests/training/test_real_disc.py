"""The discriminator's real side from real images beside teacher-generated batches (``WithRealImages``,
``batch['real']``): the paper's ADD has D learn the data while the pairs and the student's inputs are the teacher's."""

from __future__ import annotations

import pytest
import torch

from training_helpers import single_thread, noisy_ring_data, tiny_config, tiny_models  # noqa: F401 (autouse)
from comfyui_add.core.errors import ADDError
from comfyui_add.training.add_step import step
from comfyui_add.training.data import LatentDataset, WithRealImages
from comfyui_add.training.loop import Trainer


def _ring(n: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    from comfyui_add.training.toy import sample_ring
    return scale * sample_ring(n, torch.Generator().manual_seed(seed))


def test_batches_keep_the_teacher_data_and_carry_the_real_images_for_the_discriminator():
    real_images = _ring(40, 1, scale=3.0)  # far from the ring: a row of 'real' cannot be a teacher row
    data = WithRealImages(noisy_ring_data, LatentDataset(real_images))
    batch = data(torch.Generator().manual_seed(7), 8)
    teacher_only = noisy_ring_data(torch.Generator().manual_seed(7), 8)
    assert torch.equal(batch["x0"], teacher_only["x0"]) and torch.equal(batch["noise"], teacher_only["noise"])
    assert batch["real"]["x0"].shape == (8, 2)
    rows = {tuple(r.tolist()) for r in real_images}
    assert all(tuple(r.tolist()) in rows for r in batch["real"]["x0"])
    again = data(torch.Generator().manual_seed(7), 8)  # all randomness from the trainer's generator (resume)
    assert torch.equal(again["real"]["x0"], batch["real"]["x0"])


def test_the_discriminator_phase_scores_the_real_images_in_place_of_x0():
    cfg = tiny_config()
    x_teacher, x_real = _ring(8, 2), _ring(8, 3, scale=2.0)
    fake = _ring(8, 4, scale=0.5)

    def d_phase(batch):  # fresh models each time: spectral norm's power iteration moves on every forward
        return step(batch, tiny_models(cfg), cfg, "D", generator=torch.Generator().manual_seed(0), fake=fake)

    _, with_real = d_phase({"x0": x_teacher, "real": {"x0": x_real}})
    _, on_real = d_phase({"x0": x_real})
    _, on_teacher = d_phase({"x0": x_teacher})
    assert with_real["d_real"] == on_real["d_real"] and with_real["d_loss"] == on_real["d_loss"]
    assert with_real["d_real"] != on_teacher["d_real"]
    assert with_real["d_fake"] == on_teacher["d_fake"]  # the fake side is the student's, whatever is real


def test_a_run_with_real_images_for_the_discriminator_trains_with_the_pairs():
    cfg = tiny_config(paired_weight=1.0, max_steps=3)
    trainer = Trainer(tiny_models(cfg), cfg, WithRealImages(noisy_ring_data, LatentDataset(_ring(32, 5))))
    result = trainer.run()
    assert result.step == 3 and result.nonfinite_total == 0
    assert result.last_logs["paired"] > 0 and "d_real" in result.last_logs


def test_images_for_the_discriminator_needs_the_adversarial_term():
    assert tiny_config(images_for="discriminator").images_for == "discriminator"
    with pytest.raises(ADDError, match="images_for.*needs adv_weight > 0"):
        tiny_config(images_for="discriminator", adv_weight=0.0)
    with pytest.raises(ADDError, match="images_for"):
        tiny_config(images_for="both")


def test_a_run_whose_images_feed_the_discriminator_keeps_the_presets_pairs_and_records_both_data():
    """The headless config and the node share RunRequest: with images_for 'discriminator' the student trains on
    the teacher's samples, so the preset's pairs and the settings measured beside them stay, a user's pairs are
    allowed, and run.json records the teacher's data and the discriminator's image count (both compared on resume)."""
    from comfyui_add.training.presets import preset_fields
    from comfyui_add.training.setup import RunRequest

    base = dict(lora_path="x.safetensors", prompts=("a cat", "a dog"), width=512, height=512, preset="small_data")
    on_images = RunRequest(**base).config(images=True)
    for_d = RunRequest(**base, train={"images_for": "discriminator"}).config(images=True)
    assert on_images.paired_weight == 0.0 and on_images.distill_loss != preset_fields("small_data")["distill_loss"]
    assert for_d.paired_weight == preset_fields("small_data")["paired_weight"] > 0
    assert for_d.distill_loss == preset_fields("small_data")["distill_loss"]
    mine = RunRequest(**{**base, "preset": "none"}, train={"images_for": "discriminator", "paired_weight": 5.0},
                      explicit=frozenset({"images_for", "paired_weight"}))
    assert mine.config(images=True).paired_weight == 5.0
    info = RunRequest(**base, train={"images_for": "discriminator"}).run_info(n_images=7)
    assert info["data"] == "teacher+images" and info["images"] == 7 and info["data_cfg"] == 7.0
    assert RunRequest(**base).run_info(n_images=7) == {"width": 512, "height": 512, "data": "images", "images": 7}
    with pytest.raises(ADDError, match="images_for is 'discriminator' but adv_weight is 0"):
        RunRequest(**base, train={"images_for": "discriminator", "adv_weight": 0.0}).config(images=True)


def test_resuming_with_the_images_for_the_other_role_or_another_count_is_refused():
    from comfyui_add.training.resume import run_info_conflicts
    from comfyui_add.training.setup import RunRequest

    base = dict(lora_path="x.safetensors", prompts=("a cat",), width=512, height=512)
    saved = RunRequest(**base, train={"images_for": "discriminator"}).run_info(n_images=7)
    assert run_info_conflicts(saved, RunRequest(**base, train={"images_for": "discriminator"}).run_info(7)) == []
    assert any("data" in c for c in run_info_conflicts(saved, RunRequest(**base).run_info(7)))
    assert any("images" in c for c in run_info_conflicts(
        saved, RunRequest(**base, train={"images_for": "discriminator"}).run_info(8)))


def test_real_images_without_the_conditioning_the_training_batches_have_are_refused():
    cond_data = lambda g, b: {**noisy_ring_data(g, b), "cond": torch.zeros(b, 3)}  # noqa: E731
    with pytest.raises(ADDError, match="the training batches have 'cond' and the real images lack it"):
        WithRealImages(cond_data, LatentDataset(_ring(8, 1)))(torch.Generator().manual_seed(0), 4)
    both = WithRealImages(cond_data, LatentDataset(_ring(8, 1), cond=torch.ones(8, 3)))(torch.Generator(), 4)
    assert torch.equal(both["real"]["cond"], torch.ones(4, 3)) and torch.equal(both["cond"], torch.zeros(4, 3))
