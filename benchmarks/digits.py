"""Handwritten digits through ComfyUI's own UNet: the image-scale proof of ADD (used by
``benchmarks/bench_digits.py`` and, reduced, by ``tests/test_digits.py``).

Real images without a download: scikit-learn's ``load_digits`` (1,797 grey 8x8 digits, UCI) ships in
its wheel. Everything a user's run goes through is the real thing:

- the teacher is ComfyUI's ``UNetModel`` (``comfy.ldm.modules.diffusionmodules.openaimodel``) inside a
  ComfyUI ``BaseModel`` and ``ModelPatcher``: eps prediction on SD's discrete schedule (1000 steps,
  ``ModelSamplingDiscrete``), cross-attention conditioning, one channel at 8x8 in a "latent" layout
  (a ``LatentFormat`` of 1 channel, scale 1);
- the "text encoder" is :class:`ClassEmbeddingCLIP`: one fixed random context (and pooled vector) per
  class prompt "a handwritten digit 3", the empty prompt for the unconditional pass; it has the
  ``tokenize`` / ``encode_from_tokens`` surface of ComfyUI's CLIP, so the training node's
  ``PromptBank`` encodes the prompts exactly as it does a checkpoint's CLIP;
- the student is trained the way ADD Train trains it: ``adapters.model.frozen_copy``, ``comfy_denoise``,
  ``feature_modules``, ``lora_targets``, ``PromptBank``, ``SyntheticTeacherData`` (teacher-generated
  x0 from the class prompts with CFG: the node's default) in a ``RunSpec`` run by ``ADDRun``, which
  writes a ComfyUI LoRA file; that file is applied with ComfyUI's ``load_lora_for_models`` and sampled
  with the plugin's ADD sampler (``nodes.sampling.add_sample``), like the shipped workflows;
- teacher rows are sampled with ComfyUI's ``comfy.sample.sample`` (euler, CFG).

The evaluator is a small CNN classifier trained on the same train split and frozen: class accuracy
against the prompted class, Frechet distance of its penultimate features (generated vs held-out digits),
and diversity within a class (mean pairwise feature distance, relative to the held-out digits'), with
more (:class:`Evaluator`). The held-out digits are the test split for the proof table and a separate
validation split for the sweeps that choose its settings (:func:`load_splits`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CLASSES = 10
PROMPTS = [f"a handwritten digit {d}" for d in range(CLASSES)]
CACHE = ROOT / ".cache" / "digits"


# --------------------------------------------------------------------------------------------
# sizes
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Size:
    """Every knob of one benchmark run (the full benchmark and the reduced test differ only here)."""

    name: str = "full"
    model_channels: int = 32
    context_dim: int = 32
    teacher_iters: int = 1500
    teacher_batch: int = 64
    teacher_lr: float = 2e-3
    class_dropout: float = 0.1
    clf_epochs: int = 40
    teacher_cfg: float = 2.0  # CFG of the teacher rows and of the teacher-generated training data
    data_steps: int = 10  # teacher steps per generated batch (ADD Train's data_steps)
    data_cfg: float | None = None  # CFG of the teacher-generated training data (None = teacher_cfg)
    # student steps of the proof table: 500 take 28.5 min on 2 CPU cores (two seeds side by side, the teacher
    # cached; the budget is 30); with the pairs, longer training is better (the sweeps: 300, 1,000 and 3,000 steps)
    add_steps: int = 500
    add_batch: int = 32
    lora_rank: int = 16
    lr_lora: float = 1e-3
    lr_disc: float = 1e-3
    disc_t_hi: int = 50  # the teacher-feature discriminator's noise levels t-hat ~ U{0..disc_t_hi}
    spectral_norm: bool = True
    ema_decay: float | None = 0.99  # the student's EMA (sweeps: the largest single gain at 1 step)
    disc_norm: str = "sample"
    disc_features: str = "input+encoder"  # ADDConfig.disc_features: the input convolution lets D see pixel noise
    adv_grad_balance: float = 0.0  # ADDConfig.adv_grad_balance (0 = off)
    lr_schedule: str = "cosine"  # ADDConfig.lr_schedule: 'constant' | 'cosine' (to 0 at the last step)
    distill_cfg: float = 1.0  # CFG of the teacher's distillation target (ADD Train's distill_cfg default)
    # ADDConfig.paired_weight: the noise-paired regression of the 1-step student onto the pool sample each noise
    # became (the small_data preset's; 0 = the paper's terms only). Runs on the real split have no pairs: 0 there.
    paired_weight: float = 100.0
    # ADDConfig.paired_metric: the pairs' distance (the small_data preset's 'mse+features': the sweeps' winner)
    paired_metric: str = "mse+features"
    # ADDConfig.distill_loss / distill_weight: the small_data preset's distribution matching at lambda 25 (the sweeps'
    # winner beside the pairs: better 2- and 4-step students, no decline of the 4-step one with longer training)
    distill_loss: str = "dmd"
    distill_weight: float = 25.0
    per_class: int = 100  # samples per class per row
    pool_per_class: int = 256  # teacher samples per class prompt in the cached training-data pool
    seed: int = 0
    # digits of the train part held out as the validation split the sweeps score against (the test split is
    # the proof's alone); the teacher and the classifiers train on the rest (load_splits)
    val_digits: int = 300
    # ADDConfig.training_mode: 'lora' (adapters of rank lora_rank, lr_lora) | 'full' (every weight, lr_full;
    # sampled through the LoRA the run exports, extracted at rank lora_rank: a rank at least the widest
    # layer, e.g. 1024, keeps the full fine-tune up to fp16 rounding; the error is in train_student's result)
    training_mode: str = "lora"
    lr_full: float = 1e-4  # not tuned

    def key(self, *fields: str) -> str:
        d = dataclasses.asdict(self)
        return hashlib.sha256(json.dumps({f: d[f] for f in fields}, sort_keys=True).encode()).hexdigest()[:12]


FULL = Size()
REDUCED = Size(name="reduced", teacher_iters=500, clf_epochs=15, data_steps=6, add_steps=100, add_batch=16,
               per_class=30, pool_per_class=64)
REDUCED_MARGIN = 0.75  # the reduced test: ADD 1-step FD below this share of the teacher's 1-step FD
TEACHER_FIELDS = ("model_channels", "context_dim", "teacher_iters", "teacher_batch", "teacher_lr", "class_dropout",
                  "seed", "val_digits")
CLASSIFIER_FIELDS = ("clf_epochs", "seed", "val_digits")


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Splits:
    """Three disjoint stratified splits of scikit-learn's 1,797 digits, each (x (N, 1, 8, 8) in [-1, 1], y (N,)):
    ``train`` (the teacher, the classifiers, the pixel basis), ``val`` (what the sweeps score against, to choose
    settings) and ``test`` (what the proof table reports, used for nothing else)."""

    train: tuple[torch.Tensor, torch.Tensor]
    val: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]
    index: dict[str, np.ndarray]  # 'train' / 'val' / 'test' -> rows of load_digits()

    def reference(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The held-out digits samples are compared with: 'val' (the sweeps) or 'test' (the proof)."""
        if name not in ("val", "test"):
            raise ValueError(f"the reference split must be 'val' or 'test', got {name!r}")
        ref = getattr(self, name)
        if len(ref[1]) == 0:
            raise ValueError("this size has no validation split (val_digits 0): score against 'test', or set "
                             "val_digits")
        return ref


def load_splits(size: Size) -> Splits:
    """The fixed splits of ``size``: a stratified 75/25 train/test split (``size.seed``; the test split is the
    one every earlier proof table used), then ``size.val_digits`` of the train part held out, stratified,
    as the validation split (0: none, the teacher sees the whole train part)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0
    y = torch.tensor(d.target, dtype=torch.long)
    tr, te = train_test_split(np.arange(len(y)), test_size=0.25, random_state=size.seed, stratify=d.target)
    if size.val_digits > 0:
        tr, va = train_test_split(tr, test_size=size.val_digits, random_state=size.seed, stratify=d.target[tr])
    else:
        va = tr[:0]
    return Splits((x[tr], y[tr]), (x[va], y[va]), (x[te], y[te]), {"train": tr, "val": va, "test": te})


class ClassEmbeddingCLIP:
    """Stands for a text encoder: the prompt "a handwritten digit d" -> a fixed random context
    (1, tokens, dim) and pooled vector (1, dim); "" -> the unconditional embedding. The subset of
    ComfyUI's CLIP object the training node and the samplers use."""

    def __init__(self, dim: int, tokens: int = 2, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed + 77)
        self.context = torch.randn(CLASSES + 1, tokens, dim, generator=g)
        self.context[CLASSES] = 0.0  # the empty prompt
        self.pooled = self.context.mean(1)

    @staticmethod
    def index(prompt: str) -> int:
        if prompt.strip() == "":
            return CLASSES
        if prompt not in PROMPTS:
            raise ValueError(f"unknown digit prompt {prompt!r}; expected one of {PROMPTS} or ''.")
        return PROMPTS.index(prompt)

    def tokenize(self, text: str) -> str:
        return text

    def encode_from_tokens(self, tokens: str, return_pooled: bool = False, return_dict: bool = False):
        i = self.index(tokens)
        cond, pooled = self.context[i : i + 1].clone(), self.pooled[i : i + 1].clone()
        if return_dict:
            return {"cond": cond, "pooled_output": pooled}
        return (cond, pooled) if return_pooled else cond

    def conditioning(self, prompt: str) -> list:
        """ComfyUI CONDITIONING for one prompt."""
        cond, pooled = self.encode_from_tokens(prompt, return_pooled=True)
        return [[cond, {"pooled_output": pooled}]]


# --------------------------------------------------------------------------------------------
# the ComfyUI model
# --------------------------------------------------------------------------------------------
def unet_config(size: Size) -> dict:
    return {
        "image_size": 8, "in_channels": 1, "out_channels": 1, "model_channels": size.model_channels,
        "num_res_blocks": [1, 1], "channel_mult": [1, 2], "transformer_depth": [1, 1], "transformer_depth_middle": 1,
        "transformer_depth_output": [1, 1, 1, 1], "context_dim": size.context_dim, "use_spatial_transformer": True,
        "use_linear_in_transformer": True, "num_heads": -1, "num_head_channels": 16, "legacy": False,
        "use_checkpoint": False, "adm_in_channels": None, "use_temporal_resblock": False,
        "use_temporal_attention": False,
    }


def model_patcher(size: Size, state_dict: dict | None = None):
    """A ComfyUI ModelPatcher around a BaseModel (eps, SD's discrete schedule) of the digit UNet."""
    import comfy.latent_formats
    import comfy.model_base
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models_base

    class DigitsLatent(comfy.latent_formats.LatentFormat):
        latent_channels = 1
        scale_factor = 1.0

    class DigitsModel(comfy.supported_models_base.BASE):
        latent_format = DigitsLatent
        unet_extra_config = {}

    model_config = DigitsModel(unet_config(size))
    model_config.set_inference_dtype(torch.float32, None)
    model = comfy.model_base.BaseModel(model_config, model_type=comfy.model_base.ModelType.EPS)
    if state_dict is not None:
        model.diffusion_model.load_state_dict(state_dict, strict=True)
    else:
        init_unet_(model.diffusion_model, size.seed)
    dev = mm.get_torch_device()
    return comfy.model_patcher.ModelPatcher(model, load_device=dev, offload_device=mm.unet_offload_device())


# Layers the UNet's own constructor zero-initialises (``zero_module``): the output convolution, the
# second convolution of every ResBlock and every transformer's output projection.
_ZERO_INIT = ("out.2", "out_layers.3", "proj_out")


def init_unet_(unet: nn.Module, seed: int) -> nn.Module:
    """Torch's default initialisation for every layer (ComfyUI's ops skip it: their weights are
    uninitialised memory until a checkpoint is loaded), zeros where the UNet zero-initialises."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, m in unet.named_modules():
            base = next((b for b in type(m).__mro__ if b.__module__.startswith("torch.nn") and
                         hasattr(b, "reset_parameters")), None)
            if base is None:
                continue
            base.reset_parameters(m)
            if name.endswith(_ZERO_INIT):
                for p in m.parameters(recurse=False):
                    p.zero_()
    return unet


def _log(msg: str) -> None:
    print(f"[digits] {msg}", flush=True)


def train_teacher(size: Size, x: torch.Tensor, y: torch.Tensor, clip: ClassEmbeddingCLIP,
                  log: Callable[[str], None] = _log, device: str | torch.device = "cpu") -> dict:
    """Eps-prediction training of the digit UNet through ComfyUI's ``apply_model`` (SD's discrete
    schedule, t ~ U{0..999}), classes dropped to the empty prompt with ``class_dropout`` (for CFG),
    on ``device`` (batches are drawn on the CPU, so the draws do not depend on it).
    Returns the EMA weights (state dict of ``diffusion_model``, on the CPU)."""
    torch.manual_seed(size.seed)
    dev = torch.device(device)
    mp = model_patcher(size)
    base = mp.model.to(dev)
    unet = base.diffusion_model
    unet.train().requires_grad_(True)
    ema = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    opt = torch.optim.AdamW(unet.parameters(), lr=size.teacher_lr, weight_decay=0.0)
    sigmas = base.model_sampling.sigmas.float().cpu()
    context = clip.context.to(dev)
    g = torch.Generator().manual_seed(size.seed)
    t0 = time.perf_counter()
    for it in range(size.teacher_iters):
        idx = torch.randint(0, x.shape[0], (size.teacher_batch,), generator=g)
        x0, cls = x[idx], y[idx].clone()
        cls[torch.rand(cls.shape, generator=g) < size.class_dropout] = CLASSES
        ctx = context[cls.to(dev)]
        t = torch.randint(0, len(sigmas), (x0.shape[0],), generator=g)
        sigma = sigmas[t]
        eps = torch.randn(x0.shape, generator=g)
        x0, sigma, eps = x0.to(dev), sigma.to(dev), eps.to(dev)
        xt = x0 + sigma.view(-1, 1, 1, 1) * eps
        x0_hat = base.apply_model(xt, sigma, c_crossattn=ctx, transformer_options={})
        eps_hat = (xt - x0_hat) / sigma.view(-1, 1, 1, 1)
        loss = F.mse_loss(eps_hat, eps)
        lr = size.teacher_lr * min(1.0, (it + 1) / 100) * 0.5 * (1 + np.cos(np.pi * it / size.teacher_iters))
        for group in opt.param_groups:
            group["lr"] = lr
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            decay = min(0.999, (1 + it) / (10 + it))
            for k, v in unet.state_dict().items():
                if v.is_floating_point():
                    ema[k].mul_(decay).add_(v.detach(), alpha=1 - decay)
                else:
                    ema[k].copy_(v)
        if (it + 1) % max(1, size.teacher_iters // 10) == 0:
            log(f"teacher {it + 1}/{size.teacher_iters}: loss {loss.item():.4f} ({time.perf_counter() - t0:.0f} s)")
    return {k: v.cpu() for k, v in ema.items()}


class Classifier(nn.Module):
    """The frozen evaluator: 8x8 digit -> 10 classes; ``features`` is the 128-d penultimate layer."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(64 * 16, 128), nn.ReLU())
        self.head = nn.Linear(128, CLASSES)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def train_classifier(size: Size, x: torch.Tensor, y: torch.Tensor) -> dict:
    torch.manual_seed(size.seed + 1)
    clf = Classifier()
    opt = torch.optim.Adam(clf.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(size.seed + 1)
    for _ in range(size.clf_epochs):
        perm = torch.randperm(x.shape[0], generator=g)
        for i in range(0, len(perm), 64):
            idx = perm[i : i + 64]
            # small shifts make the evaluator judge shapes, not exact pixel positions
            xb = torch.roll(x[idx], shifts=(int(torch.randint(-1, 2, (1,), generator=g)),
                                            int(torch.randint(-1, 2, (1,), generator=g))), dims=(2, 3))
            loss = F.cross_entropy(clf(xb), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return clf.state_dict()


def cached(name: str, key: str, make: Callable[[], dict], log: Callable[[str], None] = _log) -> dict:
    """A state dict from ``.cache/digits/{name}-{key}.safetensors``, made (and written atomically) when absent."""
    from safetensors.torch import load_file

    from scripts.plugin_package import load

    load()
    from comfyui_add.core.files import atomic_write_safetensors

    CACHE.mkdir(parents=True, exist_ok=True)
    path = CACHE / f"{name}-{key}.safetensors"
    if path.is_file():
        log(f"{name}: cached {path.relative_to(ROOT)}")
        return load_file(str(path))
    t0 = time.perf_counter()
    sd = make()
    atomic_write_safetensors({k: v.contiguous() for k, v in sd.items()}, path)
    log(f"{name}: trained in {time.perf_counter() - t0:.0f} s -> {path.relative_to(ROOT)}")
    return sd


def teacher_and_classifier(size: Size, splits: Splits, clip: ClassEmbeddingCLIP, log: Callable[[str], None] = _log,
                           device: torch.device | str = "cpu", cache: bool = True) -> tuple[dict, dict]:
    """(teacher state dict, classifier state dict), both trained on ``splits.train``, cached in ``.cache/digits/``
    (``cache`` False: trained again)."""
    x, y = splits.train

    def teacher() -> dict:
        return train_teacher(size, x, y, clip, log, device=device)

    def classifier() -> dict:
        return train_classifier(size, x, y)

    if not cache:
        return teacher(), classifier()
    return (cached("teacher", size.key(*TEACHER_FIELDS), teacher, log),
            cached("classifier", size.key(*CLASSIFIER_FIELDS), classifier, log))


def prepare(size: Size, log: Callable[[str], None] = _log, device: torch.device | str = "cpu") -> None:
    """The teacher, the classifier and the teacher-data pool of ``size`` in the cache, made once with every core,
    before worker processes (one thread each) start: otherwise each worker would train its own."""
    import os

    from scripts.comfy_host import import_comfy

    import_comfy()
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, os.cpu_count() or 2))
    try:
        clip = ClassEmbeddingCLIP(size.context_dim, seed=size.seed)
        teacher_sd, _ = teacher_and_classifier(size, load_splits(size), clip, log, device=device)
        teacher_pool(model_patcher(size, teacher_sd), clip, size, log)
    finally:
        torch.set_num_threads(threads)  # the caller's own count again (a test worker's one thread)


# --------------------------------------------------------------------------------------------
# metrics
# --------------------------------------------------------------------------------------------
def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (the FID formula)."""
    from scipy import linalg

    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean, _ = linalg.sqrtm(s1 @ s2, disp=False)
    if not np.isfinite(covmean).all():
        eps = np.eye(s1.shape[0]) * 1e-6
        covmean = linalg.sqrtm((s1 + eps) @ (s2 + eps))
    covmean = covmean.real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


class Evaluator:
    """Every metric the proof reports, so that no single one decides (a change counts only if it holds
    under each):

    - ``fd``: Frechet distance of the frozen classifier's 128-d penultimate features (generated vs the
      held-out reference digits: the test split for the proof, the validation split for the
      sweeps, :meth:`Splits.reference`);
    - ``pix_fd``: Frechet distance of pixel features (the first ``pca_dims`` principal components of the
      train split's pixels): a second, pixel-space distance that the classifier's invariances cannot hide;
    - ``precision`` / ``recall`` (Kynkaanniemi et al. 2019, k-NN manifolds, k=3) in the classifier's
      feature space: the share of samples inside the reference digits' manifold (quality) and of reference digits
      inside the samples' manifold (coverage);
    - ``acc``: share classified as the prompted digit; ``acc2``: the same by a second, independent
      classifier (logistic regression on pixels, scikit-learn);
    - ``diversity``: mean within-class feature distance relative to the reference digits';
    - ``speckle``: mean absolute difference of neighbouring pixels, in [0, 1] (pixel noise raises it);
      ``background``: mean brightness, in [0, 1], of the pixels that are dark in > 90 % of real digits.
    """

    def __init__(self, clf_state: dict, x_ref: torch.Tensor, y_ref: torch.Tensor,
                 x_train: torch.Tensor | None = None, y_train: torch.Tensor | None = None, pca_dims: int = 32,
                 k: int = 3) -> None:
        self.clf = Classifier()
        self.clf.load_state_dict(clf_state)
        self.clf.eval().requires_grad_(False)
        self.k = k
        self.ref_feats = self._features(x_ref)
        self.ref_acc = float((self._logits(x_ref).argmax(1) == y_ref).float().mean())
        self.ref_div = self._diversity(self.ref_feats, y_ref.numpy())
        self.ref_radii = _knn_radii(self.ref_feats, k)
        basis_digits = x_ref if x_train is None else x_train
        pix = _pixels(basis_digits)
        self.pix_mean = pix.mean(0)
        _, _, vt = np.linalg.svd(pix - self.pix_mean, full_matrices=False)
        self.pix_basis = vt[:pca_dims].T  # (64, pca_dims)
        self.ref_pix = self._pix_feats(x_ref)
        self.dark = (pix < -0.9).mean(0) > 0.9  # pixels dark in > 90 % of real digits
        self.clf2 = None
        if x_train is not None and y_train is not None:
            from sklearn.linear_model import LogisticRegression

            self.clf2 = LogisticRegression(max_iter=2000, C=0.5).fit(_pixels(x_train), y_train.numpy())
            self.ref_acc2 = float((self.clf2.predict(_pixels(x_ref)) == y_ref.numpy()).mean())
        self.ref_texture = self.texture(x_ref)

    @torch.no_grad()
    def _features(self, x: torch.Tensor) -> np.ndarray:
        return self.clf.features(x.float().clamp(-1, 1)).numpy().astype(np.float64)

    @torch.no_grad()
    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.clf(x.float().clamp(-1, 1))

    def _pix_feats(self, x: torch.Tensor) -> np.ndarray:
        return (_pixels(x) - self.pix_mean) @ self.pix_basis

    @staticmethod
    def _diversity(feats: np.ndarray, labels: np.ndarray) -> float:
        from scipy.spatial.distance import cdist

        out = []
        for c in range(CLASSES):
            f = feats[labels == c]
            if len(f) > 1:
                d = cdist(f, f)
                out.append(d.sum() / (len(f) * (len(f) - 1)))
        return float(np.mean(out))

    def texture(self, samples: torch.Tensor) -> dict[str, float]:
        """``speckle`` and ``background`` (see the class docstring), both in [0, 1]."""
        img = (samples.float().clamp(-1, 1) + 1) / 2  # (N, 1, 8, 8), ink bright
        dx = (img[..., :, 1:] - img[..., :, :-1]).abs().mean()
        dy = (img[..., 1:, :] - img[..., :-1, :]).abs().mean()
        bg = img.reshape(img.shape[0], -1)[:, torch.from_numpy(self.dark)]
        return {"speckle": float((dx + dy) / 2), "background": float(bg.mean()) if bg.numel() else 0.0}

    def metrics(self, samples: torch.Tensor, classes: torch.Tensor) -> dict[str, float]:
        feats = self._features(samples)
        acc = float((self._logits(samples).argmax(1) == classes).float().mean())
        precision, recall = precision_recall(self.ref_feats, feats, self.k, self.ref_radii)
        out = {"fd": frechet_distance(feats, self.ref_feats), "pix_fd": frechet_distance(self._pix_feats(samples),
                                                                                          self.ref_pix),
               "precision": precision, "recall": recall, "acc": acc,
               "diversity": self._diversity(feats, classes.numpy()) / self.ref_div}
        if self.clf2 is not None:
            out["acc2"] = float((self.clf2.predict(_pixels(samples)) == classes.numpy()).mean())
        out.update(self.texture(samples))
        return out


def _pixels(x: torch.Tensor) -> np.ndarray:
    return x.float().clamp(-1, 1).reshape(x.shape[0], -1).numpy().astype(np.float64)


def _knn_radii(feats: np.ndarray, k: int) -> np.ndarray:
    """Distance of every point to its k-th nearest neighbour in the same set (itself excluded)."""
    from scipy.spatial.distance import cdist

    return np.partition(cdist(feats, feats), k, axis=1)[:, k]


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3,
                     real_radii: np.ndarray | None = None) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al., NeurIPS 2019): precision = share of ``fake``
    inside some real point's k-NN ball; recall = share of ``real`` inside some fake point's k-NN ball."""
    real_radii = _knn_radii(real, k) if real_radii is None else real_radii
    fake_radii = _knn_radii(fake, k)
    from scipy.spatial.distance import cdist

    d = cdist(fake, real)  # (F, R) Euclidean distances
    precision = float((d <= real_radii[None, :]).any(1).mean())
    recall = float((d <= fake_radii[:, None]).any(0).mean())
    return precision, recall


# --------------------------------------------------------------------------------------------
# sampling through ComfyUI
# --------------------------------------------------------------------------------------------
def sample_teacher(mp, clip: ClassEmbeddingCLIP, size: Size, steps: int, cfg: float,
                   sampler: str = "euler", noise_seed: int = 0) -> tuple[torch.Tensor, int]:
    """``per_class`` samples of every class with ComfyUI's KSampler path -> (samples, evals per image).
    ``noise_seed`` picks another set of starting noises (the same in every row for one value)."""
    import comfy.sample

    counted, counter = _count_evals(mp)
    neg = clip.conditioning("")
    out = []
    for c in range(CLASSES):
        latent = torch.zeros(size.per_class, 1, 8, 8)
        seed = _noise_seed(size, c, noise_seed)
        noise = comfy.sample.prepare_noise(latent, seed)
        out.append(comfy.sample.sample(counted, noise, steps, cfg, sampler, "normal", clip.conditioning(PROMPTS[c]),
                                       neg, latent, seed=seed, disable_pbar=True).float())
    return torch.cat(out), counter[0] // (CLASSES * size.per_class)


def _noise_seed(size: Size, c: int, noise_seed: int) -> int:
    return size.seed + 1000 + c + 100 * noise_seed


def sample_student(mp, lora_path: str, clip: ClassEmbeddingCLIP, size: Size, steps: int,
                   noise_seed: int = 0) -> tuple[torch.Tensor, int]:
    """The LoRA file applied with ComfyUI's loader, sampled with the plugin's ADD sampler at ``steps``
    of its trained timesteps (as the ADD Compare node picks them)."""
    import comfy.sd
    import comfy.utils

    from scripts.comfy_host import plugin_module

    sampling = plugin_module("nodes.sampling")
    compare = plugin_module("nodes.compare")
    sd, md = comfy.utils.load_torch_file(lora_path, safe_load=True, return_metadata=True)
    student, _ = comfy.sd.load_lora_for_models(mp, None, sd, 1.0, 0.0)
    ts = compare.pick_timesteps(json.loads(md["add.student_timesteps"]), steps)
    counted, counter = _count_evals(student)
    sigmas = sampling.build_sigmas(counted, "custom", len(ts), 1.0, ",".join(map(str, ts)))
    out = []
    for c in range(CLASSES):
        latent = {"samples": torch.zeros(size.per_class, 1, 8, 8)}
        out.append(sampling.add_sample(counted, clip.conditioning(PROMPTS[c]), latent, _noise_seed(size, c, noise_seed),
                                       sigmas)["samples"].float())
    return torch.cat(out), counter[0] // (CLASSES * size.per_class)


def _count_evals(mp):
    from scripts.comfy_host import plugin_module

    return plugin_module("nodes.compare")._count_evals(mp)


def prompted_classes(size: Size) -> torch.Tensor:
    return torch.arange(CLASSES).repeat_interleave(size.per_class)


# --------------------------------------------------------------------------------------------
# ADD runs, built the way ADD Train builds them
# --------------------------------------------------------------------------------------------
def teacher_pool(mp, clip: ClassEmbeddingCLIP, size: Size, log: Callable[[str], None] = _log
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0 (N, 1, 8, 8), classes (N,)): ``size.pool_per_class`` teacher samples of every class prompt, made with
    the training data's own sampler (``training.data.teacher_sample``: DDIM, ``data_steps`` steps, CFG
    :func:`data_cfg`), cached in ``.cache/digits/``."""
    from scripts.comfy_host import plugin_module

    adapter = plugin_module("adapters.model")
    tr_data = plugin_module("training.data")
    tr_schedule = plugin_module("training.schedule")

    def make() -> dict:
        network = adapter.frozen_copy(mp, torch.device("cpu"))
        schedule = tr_schedule.DiscreteSchedule(adapter.schedule_sigmas(mp))
        g = torch.Generator().manual_seed(size.seed + 4242)
        xs = []
        with torch.no_grad():
            for c in range(CLASSES):
                ctx = clip.context[c : c + 1].expand(size.pool_per_class, -1, -1)
                unc = clip.context[CLASSES : CLASSES + 1].expand(size.pool_per_class, -1, -1)
                xs.append(tr_data.teacher_sample(lambda x, s, cd: adapter.comfy_denoise(network, x, s, cd),
                                                 (size.pool_per_class, 1, 8, 8), schedule, g, size.data_steps,
                                                 cond={"context": ctx}, uncond={"context": unc},
                                                 cfg_scale=data_cfg(size)))
        return {"x0": torch.cat(xs), "classes": torch.arange(CLASSES).repeat_interleave(size.pool_per_class)}

    sd = cached("pool", pool_key(size), make, log)
    return sd["x0"].float(), sd["classes"].long()


def pool_key(size: Size) -> str:
    """The cache key of :func:`teacher_pool`'s file, ``.cache/digits/pool-<key>.safetensors``."""
    fields = (*TEACHER_FIELDS, "data_steps", "teacher_cfg", "pool_per_class")
    return size.key(*fields, *(("data_cfg",) if size.data_cfg is not None else ()))


def data_cfg(size: Size) -> float:
    """The CFG scale of the teacher-generated training data (``data_cfg``, else ``teacher_cfg``)."""
    return size.teacher_cfg if size.data_cfg is None else size.data_cfg


def pool_noise(size: Size) -> torch.Tensor:
    """The pure noise every sample of :func:`teacher_pool` started from (N, 1, 8, 8), replayed from its
    generator (``teacher_sample`` draws nothing else from it): the pairs of the noise-paired regression."""
    g = torch.Generator().manual_seed(size.seed + 4242)
    return torch.cat([torch.randn((size.pool_per_class, 1, 8, 8), generator=g) for _ in range(CLASSES)])


def train_student(mp, clip: ClassEmbeddingCLIP, size: Size, lora_path: str, *, data: str = "teacher",
                  distill_weight: float | None = None, adv_weight: float = 1.0, steps: int | None = None,
                  real: tuple[torch.Tensor, torch.Tensor] | None = None, save_every: int = 0,
                  on_save: Callable[[int, str], None] | None = None, seed: int | None = None,
                  overrides: dict[str, Any] | None = None, device: torch.device | None = None,
                  on_progress: Callable[[dict], None] | None = None,
                  log: Callable[[str], None] = _log) -> dict[str, Any]:
    """One ADD run through the node's adapter and ``training.run`` -> {'seconds', 'logs'} (and 'export':
    the LoRA extraction's rank and errors, for ``size.training_mode == 'full'``).

    ``data='teacher'``: x0 generated by the teacher from the class prompts with CFG (ADD Train's
    default, ``SyntheticTeacherData``); ``data='real'``: the train split (``LatentDataset``, like an
    image batch connected to the node). ``distill_weight`` None = ``size.distill_weight`` (0 turns the
    distillation term off, with ``size.distill_loss``). ``seed`` (default ``size.seed``) seeds the student run only;
    ``overrides`` replaces ``ADDConfig`` fields (the sweeps)."""
    from scripts.comfy_host import plugin_module

    adapter = plugin_module("adapters.model")
    tr_config = plugin_module("training.config")
    tr_data = plugin_module("training.data")
    tr_run = plugin_module("training.run")
    tr_schedule = plugin_module("training.schedule")

    device = torch.device(device) if device is not None else torch.device("cpu")
    t_max = len(adapter.schedule_sigmas(mp)) - 1
    lam = size.distill_weight if distill_weight is None else distill_weight
    cfg = tr_config.ADDConfig(**{**dict(
        student_timesteps=(999, 749, 499, 249), num_train_timesteps=t_max + 1, lora_rank=size.lora_rank,
        lora_alpha=float(size.lora_rank), lr_lora=size.lr_lora, lr_disc=size.lr_disc, distill_weight=lam,
        distill_loss=size.distill_loss if lam > 0 else "regression",
        adv_weight=adv_weight, teacher_cfg_scale=size.distill_cfg, lr_schedule=size.lr_schedule, batch_size=size.add_batch,
        seed=size.seed if seed is None else seed,
        max_steps=int(steps or size.add_steps), save_every=save_every, preview_every=0,
        teacher_timestep_range=(1, t_max), disc_timestep_range=(0, size.disc_t_hi),
        disc_spectral_norm=size.spectral_norm, ema_decay=size.ema_decay, disc_norm=size.disc_norm,
        disc_features=size.disc_features, adv_grad_balance=size.adv_grad_balance,
        training_mode=size.training_mode, lr_full=size.lr_full,
        paired_weight=size.paired_weight if data != "real" else 0.0, paired_metric=size.paired_metric),
        **(overrides or {})})  # one validation of the whole set
    network = adapter.frozen_copy(mp, device)
    bank = adapter.PromptBank(clip, PROMPTS, network, 64, 64)
    schedule = tr_schedule.DiscreteSchedule(adapter.schedule_sigmas(mp))
    if data == "teacher":
        # The teacher's samples from the class prompts (data_steps DDIM steps at CFG data_cfg), made once and
        # cached: the same distribution ADD Train's on-the-fly generator draws from, without paying
        # data_steps x 2 teacher calls per training batch in every run of a sweep.
        x_pool, y_pool = teacher_pool(mp, clip, size, log)
        cond, pooled = bank.encode([PROMPTS[int(c)] for c in y_pool], device)
        noise = pool_noise(size).to(device)

        def data_factory(_teacher):
            return tr_data.LatentDataset(x_pool.to(device), cond=cond, pooled=pooled, uncond=bank.uncond_on(device),
                                         noise=noise)
    elif data == "teacher+real":
        # the teacher's pool for the student's inputs and the pairs, the real train split for what D calls real
        assert real is not None
        x_pool, y_pool = teacher_pool(mp, clip, size, log)
        cond, pooled = bank.encode([PROMPTS[int(c)] for c in y_pool], device)
        noise = pool_noise(size).to(device)
        x_tr, y_tr = real
        cond_r, pooled_r = bank.encode([PROMPTS[int(c)] for c in y_tr], device)

        def data_factory(_teacher):
            return tr_data.WithRealImages(
                tr_data.LatentDataset(x_pool.to(device), cond=cond, pooled=pooled, uncond=bank.uncond_on(device),
                                      noise=noise),
                tr_data.LatentDataset(x_tr.to(device), cond=cond_r, pooled=pooled_r))
    elif data == "teacher_live":
        def data_factory(teacher):
            return tr_data.SyntheticTeacherData(teacher, bank.prompts, lambda ps: bank.encode(ps, device), (1, 8, 8),
                                                schedule, steps=size.data_steps, cfg_scale=data_cfg(size),
                                                uncond=bank.uncond_on(device), device=device)
    elif data == "real":
        assert real is not None
        x_tr, y_tr = real
        cond, pooled = bank.encode([PROMPTS[int(c)] for c in y_tr], device)

        def data_factory(_teacher):
            return tr_data.LatentDataset(x_tr.to(device), cond=cond, pooled=pooled, uncond=bank.uncond_on(device))
    else:
        raise ValueError(f"data must be 'teacher', 'teacher+real', 'teacher_live' or 'real', got {data!r}")
    spec = tr_run.RunSpec(
        cfg=cfg, network=network, denoise=adapter.comfy_denoise, data=None, data_factory=data_factory,
        schedule=schedule, lora_path=lora_path, device=device, feature_modules=adapter.feature_modules(network, cfg.disc_features),
        target_modules=adapter.lora_targets(network), c_dim=bank.c_dim,
        base_info={"base_model": "digits UNet", "base_fingerprint": plugin_module("adapters.patched_weights").weights_fingerprint(mp)},
        run_info={"data": data}, keep_last=1, full_copy=adapter.trainable_copy)
    run = tr_run.ADDRun(spec)
    run.build()
    history: list[dict] = []
    t0 = time.perf_counter()
    every = max(1, cfg.max_steps // 5)

    def progress(stats: dict) -> None:
        history.append(stats["logs"])
        if on_progress is not None:
            on_progress(stats["logs"])
        if stats["step"] % every == 0:
            shown = {k: round(v, 4) for k, v in stats["logs"].items() if k in ("d_loss", "d_real", "d_fake", "fake_loss", "adv", "distill", "grad_adv", "grad_distill")}
            log(f"  step {stats['step']}/{cfg.max_steps} {shown} ({time.perf_counter() - t0:.0f} s)")

    run.train(hooks=tr_run.RunHooks(progress=progress, saved=on_save))
    out: dict[str, Any] = {"seconds": time.perf_counter() - t0, "logs": history}
    if run.export_report is not None:  # training_mode 'full': what the exported LoRA kept of the student
        rep = run.export_report
        out["export"] = {"rank": rep.rank, "relative_error": rep.overall, "mean_layer_error": rep.mean,
                         "worst_layer": list(rep.worst)}
        log(f"  exported the full fine-tune as a {rep.summary()}")
    return out
