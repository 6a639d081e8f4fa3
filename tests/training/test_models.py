"""Frozen means frozen, gradients go where the paper says, LoRA/DINOv2 plumbing (ADD Sec. 3)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from training_helpers import single_thread, ring_data, tiny_config, tiny_models, tiny_network  # noqa: F401 (autouse)
from comfyui_add.training import add_step
from comfyui_add.core.errors import ADDError
from comfyui_add.training.discriminator import (Discriminator, DinoV2Features, FrozenModule, HookedActivations, load_dinov2,
                                    probe_feature_channels)
from comfyui_add.training.add_step import step, student_input
from comfyui_add.training.schedule import DiscreteSchedule
from comfyui_add.training.student import LoRAStudent
from comfyui_add.training.toy import toy_denoise


def _batch(cfg, seed=1):
    return ring_data(torch.Generator().manual_seed(seed), cfg.batch_size)


def _teacher_grads(models):
    return [p.grad for p in models.student.teacher_params()]


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_phase_g_adversarial_gradient_flows_through_frozen_teacher_only_to_student(mode):
    # distill_weight=0: the student's gradient can only come through D -> frozen teacher features.
    cfg = tiny_config(training_mode=mode, distill_weight=0.0)
    models = tiny_models(cfg)
    if mode == "lora":  # up starts at 0; make the adapters non-trivial so every factor gets gradient
        with torch.no_grad():
            for p in models.student.trainable_parameters():
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(5))
    gen = torch.Generator().manual_seed(0)
    losses, logs = step(_batch(cfg), models, cfg, "G", generator=gen)
    losses["total"].backward()
    assert all(g is None for g in _teacher_grads(models)), "gradient reached the frozen teacher"
    assert all(p.grad is None for p in models.discriminator.heads.parameters()), "heads trained in phase G"
    student_grads = [p.grad for p in models.student.trainable_parameters()]
    assert all(g is not None for g in student_grads)
    assert sum(float(g.abs().sum()) for g in student_grads) > 0
    assert logs["adv"] == pytest.approx(float(losses["adv"].detach()))


def test_phase_d_trains_heads_only():
    cfg = tiny_config(training_mode="full")
    models = tiny_models(cfg)
    gen = torch.Generator().manual_seed(0)
    losses, _ = step(_batch(cfg), models, cfg, "D", generator=gen)
    losses["total"].backward()
    assert all(g is None for g in _teacher_grads(models))
    assert all(p.grad is None for p in models.student.trainable_parameters()), "student got gradient in phase D"
    assert sum(float(p.grad.abs().sum()) for p in models.discriminator.heads.parameters() if p.grad is not None) > 0
    assert float(losses["r1"].detach()) > 0


def test_teacher_target_is_detached(monkeypatch):
    cfg = tiny_config(adv_weight=0.0, training_mode="lora")
    models = tiny_models(cfg)
    seen = []
    original = add_step.teacher_x0

    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        seen.append(out.requires_grad)
        return out

    monkeypatch.setattr(add_step, "teacher_x0", spy)
    losses, _ = step(_batch(cfg), models, cfg, "G", generator=torch.Generator().manual_seed(0))
    assert seen == [False]
    losses["total"].backward()
    assert all(g is None for g in _teacher_grads(models))
    assert any(p.grad is not None for p in models.student.trainable_parameters())


def test_top_timestep_input_is_pure_noise_and_finite():
    cfg = tiny_config(student_timesteps=(999,))
    models = tiny_models(cfg)
    x0 = torch.randn(8, 2)
    x_a, sigma, t = student_input(x0, models, cfg, torch.Generator().manual_seed(0))
    x_b, _, _ = student_input(x0 * 1e3, models, cfg, torch.Generator().manual_seed(0))
    assert (t == 999).all()
    assert torch.equal(x_a, x_b), "x0 leaked into the top-timestep input (zero terminal SNR)"
    out = models.student.student(x_a, sigma, None)
    assert torch.isfinite(out).all()
    # the same path on a zero-terminal-SNR schedule (alpha_999 = 0 in the table) stays finite
    ztsnr = DiscreteSchedule.from_alphas_cumprod(torch.linspace(0.999, 0.0, 1000, dtype=torch.float64))
    models.schedule = ztsnr
    x, sigma, _ = student_input(x0, models, cfg, torch.Generator().manual_seed(0))
    assert torch.isfinite(x).all() and torch.isfinite(models.student.student(x, sigma, None)).all()
    losses, _ = step({"x0": x0}, models, cfg, "G", generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(losses["total"])


def test_frozen_module_cannot_be_unfrozen():
    frozen = FrozenModule(nn.Linear(3, 3))
    frozen.train()
    assert not frozen.module.training
    with pytest.raises(RuntimeError, match="frozen"):
        frozen.requires_grad_(True)
    assert not any(p.requires_grad for p in frozen.parameters())


def test_discriminator_train_keeps_features_frozen_and_owns_only_heads():
    cfg = tiny_config()
    models = tiny_models(cfg)
    disc = models.discriminator
    disc.train(True)
    assert disc.heads.training
    assert not models.student.teacher_network().training
    head_ids = {id(p) for p in disc.heads.parameters()}
    assert {id(p) for p in disc.parameters()} == head_ids
    assert all(k.startswith("heads.") for k in disc.state_dict())


def test_hooked_activations_errors_and_early_stop():
    net = tiny_network()
    with pytest.raises(ValueError, match="no submodule named"):
        HookedActivations(net, ["acts.9"])
    calls = []
    net.out.register_forward_hook(lambda *a: calls.append(1))
    feats = HookedActivations(net, ["acts.0", "acts.1"])(lambda: net(torch.zeros(2, 2), torch.zeros(2)))
    assert [f.shape for f in feats] == [torch.Size([2, 32])] * 2
    assert calls == [], "forward was not stopped after the last requested activation"


def test_lora_student_starts_at_teacher_and_exports_comfy_keys():
    net = tiny_network()
    ref = tiny_network()
    gen = torch.Generator().manual_seed(0)
    lora = LoRAStudent(net, toy_denoise, rank=4, alpha=2.0, generator=gen, target_modules=["inp", "layers.0", "out"])
    x, sigma = torch.randn(5, 2), torch.full((5,), 3.0)
    assert torch.equal(lora.student(x, sigma, None), toy_denoise(ref, x, sigma))
    with torch.no_grad():
        for p in lora.trainable_parameters():
            p.normal_(0, 0.2, generator=gen)
    moved = lora.student(x, sigma, None)
    assert not torch.allclose(moved, toy_denoise(ref, x, sigma))
    assert torch.equal(lora.teacher(x, sigma, None), toy_denoise(ref, x, sigma)), "teacher pass saw the adapters"

    sd = lora.lora_state_dict(prefix="diffusion_model.")
    assert set(sd) == {f"diffusion_model.{m}.{k}" for m in ("inp", "layers.0", "out")
                       for k in ("lora_up.weight", "lora_down.weight", "alpha")}
    assert sd["diffusion_model.inp.lora_down.weight"].shape == (4, net.inp.in_features)
    assert sd["diffusion_model.inp.lora_up.weight"].shape == (32, 4)
    assert float(sd["diffusion_model.out.alpha"]) == 2.0
    # ComfyUI's LoRA math: W' = W + (alpha/rank) * up @ down reproduces the hooked student
    fused = tiny_network()
    with torch.no_grad():
        for m in ("inp", "layers.0", "out"):
            layer = fused.get_submodule(m)
            up, down = sd[f"diffusion_model.{m}.lora_up.weight"], sd[f"diffusion_model.{m}.lora_down.weight"]
            layer.weight += (float(sd[f"diffusion_model.{m}.alpha"]) / 4) * up @ down
    assert torch.allclose(toy_denoise(fused, x, sigma), moved, atol=1e-5)
    # load back into a fresh student
    other = LoRAStudent(tiny_network(), toy_denoise, rank=4, alpha=1.0, generator=torch.Generator().manual_seed(9),
                        target_modules=["inp", "layers.0", "out"])
    other.load_lora_state_dict(sd)
    assert torch.allclose(other.student(x, sigma, None), moved)
    lora.remove()
    assert torch.equal(toy_denoise(net, x, sigma), toy_denoise(ref, x, sigma))


def test_lora_on_conv2d_matches_fused_weights():
    conv = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.SiLU(), nn.Conv2d(6, 3, 1))
    gen = torch.Generator().manual_seed(0)
    lora = LoRAStudent(conv, lambda n, x, s, c: n(x), rank=2, alpha=2.0, generator=gen)
    with torch.no_grad():
        for p in lora.trainable_parameters():
            p.normal_(0, 0.3, generator=gen)
    x = torch.randn(2, 3, 5, 5, generator=gen)
    out = lora.student(x, None, None)
    sd = lora.lora_state_dict(prefix="")
    fused = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.SiLU(), nn.Conv2d(6, 3, 1))
    fused.load_state_dict(conv.state_dict())
    with torch.no_grad():
        for name in ("0", "2"):
            up, down = sd[f"{name}.lora_up.weight"], sd[f"{name}.lora_down.weight"]
            w = fused.get_submodule(name).weight
            w += (up.flatten(1) @ down.flatten(1)).reshape(w.shape)
    assert torch.allclose(fused(x), out, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# DINOv2 from a local file (tiny random config; never downloads)
# ---------------------------------------------------------------------------------------------
def _tiny_dino_config():
    transformers = pytest.importorskip("transformers")
    return transformers.Dinov2Config(hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                                     intermediate_size=64, patch_size=14, image_size=28)


def test_dinov2_loads_from_local_safetensors_and_passes_gradient(tmp_path):
    from safetensors.torch import save_file
    from transformers import Dinov2Model

    config = _tiny_dino_config()
    reference = Dinov2Model(config).eval()
    path = tmp_path / "dino.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(path))
    model = load_dinov2(path, config)
    assert isinstance(model, FrozenModule) and not any(p.requires_grad for p in model.parameters())
    pix = torch.rand(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(model(pixel_values=pix).last_hidden_state, reference(pixel_values=pix).last_hidden_state)

    decode = lambda z: torch.sigmoid(z[:, :3])  # noqa: E731  stand-in VAE: latents (B,4,8,8) -> [0,1]
    feats = DinoV2Features(model, decode, blocks=(0, 1, 2, 3))
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(2, 4, 8, 8, generator=gen)
    channels = probe_feature_channels(feats, z, None, gen)
    assert channels == [32] * 5  # patch embedding + 4 blocks
    disc = Discriminator(feats, channels, head_channels=8, generator=gen)
    z.requires_grad_(True)
    logits = disc(z, None, None, generator=gen)
    assert [lg.shape for lg in logits] == [torch.Size([2, 1, 1 + 16 * 16])] * 5
    sum(lg.mean() for lg in logits).backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())


def test_dinov2_missing_or_wrong_file_is_a_clear_error(tmp_path):
    from safetensors.torch import save_file

    config = _tiny_dino_config()
    with pytest.raises(ADDError, match="dinov2_file absent.safetensors does not exist"):
        load_dinov2(tmp_path / "absent.safetensors", config)
    wrong = tmp_path / "wrong.safetensors"
    save_file({"foo.weight": torch.zeros(2)}, str(wrong))
    with pytest.raises(ADDError, match=r"dinov2_file wrong.safetensors does not hold DINOv2 .* tensors are missing"):
        load_dinov2(wrong, config)
    shaped = tmp_path / "shaped.safetensors"
    save_file({"embeddings.cls_token": torch.zeros(1, 1, 3)}, str(shaped))
    with pytest.raises(ADDError, match="dinov2_file shaped.safetensors holds tensors of other shapes"):
        load_dinov2(shaped, config)
    pickle = tmp_path / "weights.pth"
    pickle.write_bytes(b"\x80\x04")
    with pytest.raises(ADDError, match="dinov2_file weights.pth is not a .safetensors file"):
        load_dinov2(pickle, config)
    with pytest.raises(ValueError, match="out of range"):
        # the 4-layer test model has no block 5, 8 or 11
        DinoV2Features(load_dinov2(_save_random(tmp_path, config), config), lambda z: z, blocks=(2, 5, 8, 11))


def _save_random(tmp_path, config):
    from safetensors.torch import save_file
    from transformers import Dinov2Model

    path = tmp_path / "rand.safetensors"
    save_file({k: v.contiguous() for k, v in Dinov2Model(config).state_dict().items()}, str(path))
    return path


def test_pixel_discriminator_sees_the_latent_and_trains_like_the_teacher_one():
    cfg = tiny_config(discriminator="pixel", training_mode="full")
    models = tiny_models(cfg)
    gen = torch.Generator().manual_seed(0)
    d_losses, _ = step(_batch(cfg), models, cfg, "D", generator=gen)
    d_losses["total"].backward()
    assert all(p.grad is None for p in models.student.trainable_parameters())
    assert sum(float(p.grad.abs().sum()) for p in models.discriminator.heads.parameters() if p.grad is not None) > 0
    for p in models.discriminator.heads.parameters():
        p.grad = None
    g_losses, _ = step(_batch(cfg), models, cfg, "G", generator=torch.Generator().manual_seed(1))
    g_losses["total"].backward()
    assert sum(float(p.grad.abs().sum()) for p in models.student.trainable_parameters() if p.grad is not None) > 0


@pytest.mark.parametrize("adv_weight", [1.0, 0.0])
def test_gradient_shares_are_logged_and_split_the_gradient_on_x_hat(adv_weight):
    cfg = tiny_config(training_mode="full", adv_weight=adv_weight, distill_weight=2.5)
    models = tiny_models(cfg)
    batch = _batch(cfg)
    gen = torch.Generator().manual_seed(0)
    fake = add_step.student_forward(batch, models, cfg, gen)
    seen = {}

    def keep(g):
        seen["total"] = g.norm().item()

    fake.register_hook(keep)
    losses, logs = step(batch, models, cfg, "G", generator=gen, fake=fake)
    assert logs["grad_distill"] > 0 and logs["grad_adv"] == 0.0  # the adversarial share arrives with backward
    losses["total"].backward()
    if adv_weight == 0.0:
        assert logs["grad_adv"] == pytest.approx(0.0, abs=1e-6 * logs["grad_distill"])
        assert seen["total"] == pytest.approx(logs["grad_distill"], rel=1e-5)
    else:
        assert logs["grad_adv"] > 0
        # the two shares and the total obey the triangle inequality (they are the parts of one gradient)
        assert seen["total"] <= logs["grad_adv"] + logs["grad_distill"] + 1e-6


@pytest.mark.parametrize("balance", [0.5, 2.0])
def test_adv_grad_balance_rescales_the_adversarial_pull_on_x_hat(balance):
    cfg = tiny_config(training_mode="full", adv_grad_balance=balance)
    models = tiny_models(cfg)
    batch = _batch(cfg)
    gen = torch.Generator().manual_seed(0)
    fake = add_step.student_forward(batch, models, cfg, gen)
    losses, logs = step(batch, models, cfg, "G", generator=gen, fake=fake)
    g_d = torch.autograd.grad(losses["distill"] * cfg.distill_weight, fake, retain_graph=True)[0]
    seen = {}

    def keep(g):
        seen["g"] = g

    fake.register_hook(keep)  # registered after the balancing hook: sees what flows on into the student
    losses["total"].backward()
    g_adv_out = seen["g"] - g_d
    assert logs["grad_adv"] > 0  # measured before rescaling
    assert g_adv_out.norm().item() == pytest.approx(balance * logs["grad_distill"], rel=1e-4)
