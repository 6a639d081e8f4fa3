"""paired_weight: the noise-paired regression of the 1-step student onto the teacher's own samples, and the
data that carries the pairs (teacher_sample's noise, SyntheticTeacherData, LatentDataset)."""

from __future__ import annotations

import pytest
import torch

from training_helpers import single_thread, ring_data, tiny_config, tiny_models  # noqa: F401 (autouse)
from comfyui_add.core.errors import ADDError
from comfyui_add.training import add_step
from comfyui_add.training.add_step import step
from comfyui_add.training.data import LatentDataset, SyntheticTeacherData, teacher_sample
from comfyui_add.training.schedule import DiscreteSchedule
from comfyui_add.training.toy import toy_denoise


def _paired_batch(n: int = 8) -> dict:
    gen = torch.Generator().manual_seed(5)
    return {"x0": ring_data(gen, n)["x0"], "noise": torch.randn(n, 2, generator=gen)}


def test_paired_loss_is_the_one_step_student_from_the_batch_noise_against_x0():
    cfg = tiny_config(paired_weight=2.0)
    models = tiny_models(cfg)
    with torch.no_grad():  # move the student off the teacher so the loss is the student's
        for p in models.student.trainable_parameters():
            p.add_(0.05)
    batch = _paired_batch()
    sched = models.schedule
    sig = sched.sigma(torch.full((8,), sched.num_timesteps - 1)).float()
    expected = (models.student.student(batch["noise"] * (1 + sig[:, None] ** 2).sqrt(), sig, None)
                - batch["x0"]).pow(2).mean()
    got = add_step.paired_loss(batch, models)
    assert torch.allclose(got, expected)
    teacher_out = models.student.teacher(batch["noise"] * (1 + sig[:, None] ** 2).sqrt(), sig, None)
    assert not torch.allclose(got, (teacher_out - batch["x0"]).pow(2).mean())  # the student's, not the teacher's

    losses, logs = step(batch, models, cfg, "G", generator=torch.Generator().manual_seed(0))
    assert logs["paired"] == pytest.approx(float(got.detach()), rel=1e-6)
    assert torch.allclose(losses["total"], cfg.adv_weight * losses["adv"] + cfg.distill_weight * losses["distill"]
                          + 2.0 * losses["paired"])


def test_paired_alone_trains_the_student_toward_the_pairs():
    cfg = tiny_config(paired_weight=1.0, adv_weight=0.0, distill_weight=0.0)
    models = tiny_models(cfg)
    batch = _paired_batch()
    opt = torch.optim.Adam(models.student.trainable_parameters(), lr=1e-2)
    first = None
    for _ in range(40):
        losses, logs = step(batch, models, cfg, "G", generator=torch.Generator().manual_seed(0))
        losses["total"].backward()
        opt.step()
        opt.zero_grad()
        first = first if first is not None else logs["paired"]
    assert logs["paired"] < 0.5 * first


def _one_step_from(models, noise):
    sched = models.schedule
    sig = sched.sigma(torch.full((noise.shape[0],), sched.num_timesteps - 1)).float()
    return models.student.student(noise * (1 + sig[:, None] ** 2).sqrt(), sig, None)


def test_feature_metric_compares_both_sides_at_the_same_noise_and_is_zero_on_the_students_own_output():
    cfg = tiny_config(paired_weight=1.0, paired_metric="features", adv_weight=0.0)
    models = tiny_models(cfg)
    assert models.discriminator is None and models.pair_features is not None  # built for the pairs alone
    batch = _paired_batch()
    with torch.no_grad():
        own = dict(batch, x0=_one_step_from(models, batch["noise"]))
    # a different t-hat or noise on the two sides would leave a distance here
    assert float(add_step.paired_loss(own, models, "features", torch.Generator().manual_seed(1)).detach()) < 1e-10
    far = add_step.paired_loss(batch, models, "features", torch.Generator().manual_seed(1))
    assert float(far.detach()) > 1e-3
    # the distance of unit-normalised feature vectors, not the latent MSE: each layer's term lies in [0, 4]
    assert float(far.detach()) != pytest.approx(float(add_step.paired_loss(batch, models).detach()), rel=1e-3)
    assert float(far.detach()) <= 4.0
    far.backward()  # the gradient reaches the student through the frozen feature network
    assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in models.student.trainable_parameters())
    assert all(p.grad is None for p in models.student.teacher_params())


def test_feature_metric_alone_moves_the_one_step_student_toward_its_pairs():
    cfg = tiny_config(paired_weight=1.0, paired_metric="features", adv_weight=0.0, distill_weight=0.0)
    models = tiny_models(cfg)
    batch = _paired_batch()
    latent = lambda: float((_one_step_from(models, batch["noise"]) - batch["x0"]).pow(2).mean().detach())  # noqa: E731
    opt = torch.optim.Adam(models.student.trainable_parameters(), lr=1e-2)
    before = latent()
    for i in range(60):
        losses, _ = step(batch, models, cfg, "G", generator=torch.Generator().manual_seed(i))
        losses["total"].backward()
        opt.step()
        opt.zero_grad()
    assert latent() < 0.5 * before


def test_the_summed_metric_is_the_latent_mse_plus_the_feature_distance():
    models = tiny_models(tiny_config(paired_weight=1.0, paired_metric="mse+features"))
    batch = _paired_batch()
    got = add_step.paired_loss(batch, models, "mse+features", torch.Generator().manual_seed(2))
    parts = (add_step.paired_loss(batch, models, "mse"),
             add_step.paired_loss(batch, models, "features", torch.Generator().manual_seed(2)))
    assert float(got.detach()) == pytest.approx(float((parts[0] + parts[1]).detach()), rel=1e-6)
    assert min(float(p.detach()) for p in parts) > 0


def test_paired_metric_is_checked_and_the_feature_metric_needs_its_network():
    with pytest.raises(ADDError, match="paired_metric"):
        tiny_config(paired_metric="lpips")
    with pytest.raises(ADDError, match="no 'features' with discriminator 'pixel'"):
        tiny_config(paired_metric="features", discriminator="pixel")
    models = tiny_models(tiny_config(paired_weight=1.0))  # mse: no feature network kept for the pairs
    assert models.pair_features is None
    with pytest.raises(ValueError, match="pair_features"):
        add_step.paired_loss(_paired_batch(), models, "features", torch.Generator())


def test_paired_weight_without_noise_in_the_data_is_a_clear_error():
    cfg = tiny_config(paired_weight=1.0)
    models = tiny_models(cfg)
    with pytest.raises(ADDError, match="paired_weight > 0 needs teacher-generated training data"):
        step(ring_data(torch.Generator().manual_seed(0), 8), models, cfg, "G", generator=torch.Generator())
    with pytest.raises(ADDError, match="paired_weight"):
        tiny_config(paired_weight=-1.0)


def test_teacher_sample_returns_the_noise_it_started_from_and_the_data_carries_it():
    net = tiny_models(tiny_config()).student.teacher_network()
    teacher = lambda x, s, c: toy_denoise(net, x, s, c)  # noqa: E731
    sched = DiscreteSchedule.scaled_linear()
    x0, eps = teacher_sample(teacher, (6, 2), sched, torch.Generator().manual_seed(1), 4, return_noise=True)
    assert torch.equal(eps, torch.randn(6, 2, generator=torch.Generator().manual_seed(1)))
    assert torch.equal(x0, teacher_sample(teacher, (6, 2), sched, torch.Generator().manual_seed(1), 4))

    data = SyntheticTeacherData(teacher, ["a", "b"], lambda ps: (None, None), (2,), sched, steps=4, cfg_scale=1.0)
    batch = data(torch.Generator().manual_seed(2), 5)
    assert batch["noise"].shape == batch["x0"].shape == (5, 2)

    ds = LatentDataset(x0, noise=eps)
    b = ds(torch.Generator().manual_seed(3), 16)
    rows = [int((x0 == r).all(dim=1).nonzero()[0]) for r in b["x0"]]
    assert torch.equal(b["noise"], eps[rows])  # every row keeps its own noise
    with pytest.raises(ValueError, match="noise"):
        LatentDataset(x0, noise=eps[:3])


def test_a_run_on_given_images_drops_the_presets_pairs_and_refuses_the_users():
    from comfyui_add.training.presets import preset_fields
    from comfyui_add.training.setup import RunRequest

    assert preset_fields("small_data")["paired_weight"] > 0
    base = dict(lora_path="x.safetensors", prompts=("a cat",), width=512, height=512, preset="small_data")
    assert RunRequest(**base).config().paired_weight == preset_fields("small_data")["paired_weight"]
    assert RunRequest(**base).config(images=True).paired_weight == 0.0  # images carry no noise to pair with
    mine = RunRequest(**base, train={"paired_weight": 5.0}, explicit=frozenset({"paired_weight"}))
    assert mine.config().paired_weight == 5.0
    with pytest.raises(ADDError, match="paired_weight is 5.0, but this run trains on images"):
        mine.config(images=True)
    # the node's widgets always lose to a preset: a widget value under small_data is the preset's, dropped too
    node = RunRequest(**base, train={"paired_weight": 0.0})
    assert node.config(images=True).paired_weight == 0.0
    assert node.config().paired_weight == preset_fields("small_data")["paired_weight"]


def test_on_given_images_the_presets_distribution_matching_gives_way_to_the_users_distillation_settings():
    """small_data's distribution matching (lambda 25) was measured beside its pairs only: where the pairs are
    dropped (given images) the distillation term is the user's (the widget's, or ADDConfig's default)."""
    from comfyui_add.training.config import ADDConfig
    from comfyui_add.training.presets import WITH_PAIRS_ONLY, preset_fields
    from comfyui_add.training.setup import RunRequest

    small = preset_fields("small_data")
    assert small["distill_loss"] == "dmd" and small["distill_weight"] == 25.0
    assert set(WITH_PAIRS_ONLY) <= set(small)
    base = dict(lora_path="x.safetensors", prompts=("a cat",), width=512, height=512, preset="small_data")
    prompts = RunRequest(**base).config()
    assert (prompts.distill_loss, prompts.distill_weight) == ("dmd", 25.0)
    images = RunRequest(**base).config(images=True)
    assert (images.distill_loss, images.distill_weight) == (ADDConfig.distill_loss, ADDConfig.distill_weight)
    widgets = RunRequest(**base, train={"distill_loss": "regression", "distill_weight": 4.0})
    assert (widgets.config(images=True).distill_loss, widgets.config(images=True).distill_weight) == ("regression", 4.0)
    assert widgets.config().distill_loss == "dmd"  # the preset wins over the widgets where its pairs run
    mine = RunRequest(**base, train={"distill_weight": 7.0}, explicit=frozenset({"distill_weight"}))
    assert mine.config(images=True).distill_weight == 7.0 and mine.config().distill_weight == 7.0
    # pairs turned off by hand (a config file's key): on images the preset's distribution matching still gives way
    off = RunRequest(**base, train={"paired_weight": 0.0}, explicit=frozenset({"paired_weight"}))
    assert off.config(images=True).distill_loss == ADDConfig.distill_loss
    # the paper preset has no pairs: its distillation weight stays on images too
    paper = RunRequest(**{**base, "preset": "paper"}, train={"distill_weight": 9.0})
    assert paper.config(images=True).distill_weight == preset_fields("paper")["distill_weight"]


def test_the_presets_feature_distance_falls_back_to_mse_with_the_pixel_discriminator_and_a_users_is_refused():
    from comfyui_add.training.presets import preset_fields
    from comfyui_add.training.setup import RunRequest

    assert "features" in preset_fields("small_data")["paired_metric"]
    base = dict(lora_path="x.safetensors", prompts=("a cat",), width=512, height=512, preset="small_data")
    assert RunRequest(**base).config().paired_metric == preset_fields("small_data")["paired_metric"]
    pixel = RunRequest(**base, train={"discriminator": "pixel"})
    assert pixel.config().paired_metric == "mse" and pixel.config().paired_weight > 0
    mine = RunRequest(**base, train={"discriminator": "pixel", "paired_metric": "features"},
                      explicit=frozenset({"paired_metric"}))
    with pytest.raises(ADDError, match="paired_metric"):
        mine.config()


def test_the_memory_estimate_counts_the_paired_pass_and_the_fake_scores_adapters():
    from comfyui_add.training.inputs import estimate_memory

    shapes = [((320, 4, 3, 3), 2), ((320, 320), 2), ((320,), 2)]
    plain = estimate_memory(shapes, 320, 4, (64, 64), 16, False)
    cfg = tiny_config(paired_weight=1.0)
    paired = estimate_memory(shapes, 320, 4, (64, 64), 16, False, paired=cfg.paired_passes)
    features = estimate_memory(shapes, 320, 4, (64, 64), 16, False,
                               paired=cfg.replace(paired_metric="features").paired_passes)
    dmd = estimate_memory(shapes, 320, 4, (64, 64), 16, False, dmd=True)
    assert paired["activations"] * 2 == plain["activations"] * 3  # three graph-holding passes, not two
    assert features["activations"] == plain["activations"] * 2  # and the feature network on the paired output
    assert tiny_config().paired_passes == 0
    assert dmd["trainable"] == 2 * plain["trainable"]  # a second LoRA of the same rank, grads and AdamW moments
    assert paired["weights"] == dmd["weights"] == plain["weights"]

