"""Shared tiny, seeded pieces for the training-core tests (pure torch; ComfyUI is never imported).

A plain module (not conftest) so the tests also run with ``--noconftest``; it puts the repo root on
sys.path itself, so import it before ``training``.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:  # the repo root is the plugin package; tests import `training.*` from it
    sys.path.insert(0, ROOT)

from scripts.plugin_package import load as _load_package  # noqa: E402

_load_package()  # the package 'comfyui_add' (core/, training/) without ComfyUI

from comfyui_add.training.config import ADDConfig  # noqa: E402
from comfyui_add.training.discriminator import init_from_generator_  # noqa: E402
from comfyui_add.training.add_step import build_models  # noqa: E402
from comfyui_add.training.schedule import DiscreteSchedule  # noqa: E402
from comfyui_add.training.toy import TOY_FEATURES, ToyEpsMLP, sample_ring, toy_denoise  # noqa: E402



@pytest.fixture(autouse=True)
def single_thread():
    """Tiny models run fastest on one thread, and a busy 2-core machine makes a 2-thread pool
    spin-wait (measured 30x slower); restored afterwards so other tests are unaffected.
    Import this name into a test module to apply it there."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def tiny_config(**overrides) -> ADDConfig:
    base = dict(student_timesteps=(999, 499), batch_size=8, max_steps=6, save_every=0, preview_every=0,
                lora_rank=4, lora_alpha=4.0, disc_head_channels=16, lr_lora=1e-3, lr_full=1e-3, lr_disc=1e-3,
                ema_decay=0.9, seed=3)
    base.update(overrides)
    return ADDConfig(**base)


def tiny_network(seed: int = 0) -> ToyEpsMLP:
    return init_from_generator_(ToyEpsMLP(width=32, depth=3), torch.Generator().manual_seed(seed))


def ring_data(generator: torch.Generator, batch_size: int) -> dict:
    return {"x0": sample_ring(batch_size, generator)}


def tiny_models(cfg: ADDConfig, network=None, denoise=toy_denoise):
    network = network if network is not None else tiny_network()
    probe = ring_data(torch.Generator().manual_seed(0), cfg.batch_size)
    return build_models(network, denoise, cfg, DiscreteSchedule.scaled_linear(),
                        feature_modules=TOY_FEATURES[:3], probe_batch=probe)


def noisy_ring_data(generator: torch.Generator, batch_size: int) -> dict:
    """Ring samples with a 'noise' entry, as teacher-generated data carries (the noise-paired regression)."""
    return {"x0": sample_ring(batch_size, generator), "noise": torch.randn(batch_size, 2, generator=generator)}


def straight_and_resumed(cfg: ADDConfig, checkpoint_dir: str, split: int = 2, data=ring_data):
    """(a Trainer run straight to cfg.max_steps, one stopped at ``split``, saved, and resumed in a new Trainer)."""
    from comfyui_add.training.checkpoint import load_checkpoint
    from comfyui_add.training.loop import Trainer

    straight = Trainer(tiny_models(cfg), cfg, data)
    straight.run()
    first = Trainer(tiny_models(cfg.replace(max_steps=split)), cfg.replace(max_steps=split), data)
    first.run(checkpoint_dir=str(checkpoint_dir))
    resumed = Trainer(tiny_models(cfg), cfg, data)
    load_checkpoint(resumed, str(checkpoint_dir))
    resumed.run()
    return straight, resumed
