"""ADD sampling nodes: ADD Scheduler (SIGMAS), ADD Sampler (SAMPLER), ADD KSampler (LATENT).

The math lives in core/schedules.py, core/sampling.py and core/stream.py (residual CFG); this module
only adapts ComfyUI types. By default no CFG: ADD models are distilled to run on the positive
prompt alone, one model evaluation per step. The ADD KSampler's optional cfg_type adds
StreamDiffusion's residual CFG (self / initialize: no extra evaluation per step) or ordinary CFG
(full) for models that gain from a little guidance, such as LCM-LoRA merges.
"""
from __future__ import annotations

import torch

import comfy.model_management
import comfy.sample
import comfy.samplers
import comfy.utils
import latent_preview
from comfy_api.latest import io

from ..adapters import comfy_internals as internals
from ..core.errors import ADDError
from ..core import sampling as add_sampling
from ..core import schedules
from ..core import stream as core_stream

CATEGORY = "ADD/sampling"

_PRESET_TOOLTIP = (
    "add_trailing: ADD / diffusers 'trailing' timesteps (4 steps: 999,749,499,249; 2: 999,499; 1: 999). "
    "sdturbo_grid: ComfyUI's SDTurboScheduler grid (999,899,...). "
    "custom: the timesteps typed in 'custom' (e.g. 999,499). "
    "stream_t_index: StreamDiffusion t_index_list typed in 'custom' (indices into the 50-step LCM schedule; "
    "32,45 for img2img, 0,16,32,45 for txt2img)."
)
_DENOISE_TOOLTIP = (
    "1.0 = txt2img. Below 1 (img2img) sampling starts at t < denoise*1000: add_trailing spreads its steps "
    "over [0, denoise*1000); sdturbo_grid behaves exactly like SDTurboScheduler; custom/stream lists drop "
    "timesteps >= denoise*1000."
)


def schedule_inputs() -> list:
    return [
        io.Int.Input("steps", default=1, min=schedules.MIN_STEPS, max=schedules.MAX_STEPS,
                     tooltip="Model evaluations (1-4). Used by add_trailing and sdturbo_grid; custom lists set their own count."),
        io.Combo.Input("schedule", options=list(schedules.PRESETS), default="add_trailing", tooltip=_PRESET_TOOLTIP),
        io.String.Input("custom", default="999,499", multiline=False,
                        tooltip="For schedule=custom: timesteps 0-999, strictly decreasing (e.g. 999,499). "
                                "For schedule=stream_t_index: t_index_list, strictly increasing (e.g. 32,45)."),
        io.Float.Input("denoise", default=1.0, min=0.01, max=1.0, step=0.01, tooltip=_DENOISE_TOOLTIP),
    ]


def model_t_max(model_sampling) -> int:
    """Highest timestep the model was trained on (999 for SD-family discrete schedules)."""
    table = getattr(model_sampling, "sigmas", None)
    if table is None or len(table) < 2:
        return schedules.NUM_TRAIN_TIMESTEPS - 1
    return min(len(table), schedules.NUM_TRAIN_TIMESTEPS) - 1


def build_sigmas(model, schedule: str, steps: int, denoise: float, custom: str) -> torch.Tensor:
    """SIGMAS (n + 1,) for a preset, from the model's own model_sampling (+ a final 0)."""
    ms = model.get_model_object("model_sampling")
    ts = schedules.timesteps_for(schedule, steps, denoise, custom, t_max=model_t_max(ms))
    return schedules.sigmas_from_timesteps(ts, ms.sigma)


def _sample_add_comfy(model, x, sigmas, extra_args=None, callback=None, disable=None, **options):
    """core.sampling.sample_add, re-noising with the model's own noise_scaling (every family).

    ``model`` is ComfyUI's KSamplerX0Inpaint; the model_sampling is its BaseModel's (the same path
    k-diffusion's ``sample_lcm`` uses in ComfyUI).
    """
    ms = internals.sampler_model_sampling(model)
    if options.get("noise_sampler") is None:  # the host's draws, as its own LCM sampler
        options["noise_sampler"] = internals.host_noise_sampler(x, extra_args)
    return add_sampling.sample_add(model, x, sigmas, extra_args=extra_args, callback=callback, disable=disable,
                                   renoise=lambda s, n, x0: ms.noise_scaling(s, n, x0), **options)


def make_sampler(noise_strength: float = 1.0) -> comfy.samplers.KSAMPLER:
    if not 0.0 <= float(noise_strength) <= 1.0:  # also NaN, which ComfyUI's min/max check lets through
        raise ADDError(f"noise_strength is {noise_strength!r}: type a number from 0 to 1 (1 = ADD/LCM).")
    return comfy.samplers.KSAMPLER(_sample_add_comfy, extra_options={"noise_strength": float(noise_strength)})


class PositiveOnlyGuider(comfy.samplers.CFGGuider):
    """A guider with no negative: each step runs the model once on the positive batch.

    Like core's Guider_Basic. Because there is no uncond to run, model patches that set
    ``disable_cfg1_optimization`` cannot add a second pass.
    """

    def set_conds(self, positive):
        self.inner_set_conds({"positive": positive})

    def predict_noise(self, x, timestep, model_options=None, seed=None):
        return internals.guider_predict_positive(self, x, timestep, model_options, seed)


class RCFGGuider(PositiveOnlyGuider):
    """Positive-only steps plus, on request, the negative prompt's x0 (residual CFG ``initialize``).

    The negative goes through ComfyUI's conditioning path (process_conds, calc_cond_batch) like
    any cond, so patches, LoRAs and every family's extra conds apply to it too.
    """

    def set_conds(self, positive, negative=None):
        conds = {"positive": positive}
        if negative is not None:
            conds["negative"] = negative
        self.inner_set_conds(conds)

    def predict_negative(self, x, timestep, model_options=None):
        """x0 of the negative prompt at (x, timestep): one model evaluation of x's rows."""
        return internals.guider_predict_cond(self, "negative", x, timestep, model_options)


def negative_fn(model, extra_args):
    """``uncond(x, sigma) -> x0`` for a sampler function running under an RCFGGuider (else None).

    ``model`` is the KSamplerX0Inpaint ComfyUI hands to sampler functions (it holds the guider).
    """
    guider = internals.sampler_guider(model)
    if not isinstance(guider, RCFGGuider) or not internals.guider_has_cond(guider, "negative"):
        return None
    return lambda x, sigma: guider.predict_negative(x, sigma, internals.sampler_model_options(extra_args))


def _sample_add_rcfg_comfy(model, x, sigmas, extra_args=None, callback=None, disable=None, rcfg=None, init_noise=None):
    """core.stream.sample_add_rcfg with the model's own noise_scaling and the guider's negative."""
    ms = internals.sampler_model_sampling(model)
    extra_args = {} if extra_args is None else extra_args
    return core_stream.sample_add_rcfg(model, x, sigmas, extra_args=extra_args, callback=callback, disable=disable,
                                       rcfg=rcfg, init_noise=init_noise, uncond=negative_fn(model, extra_args),
                                       noise_sampler=internals.host_noise_sampler(x, extra_args),
                                       renoise=lambda s, n, x0: ms.noise_scaling(s, n, x0))


def check_rcfg(cfg_type: str, guidance_scale: float, delta: float, negative) -> core_stream.RCFG:
    """The residual-CFG widgets as an RCFG, or an ADDError naming the input to fix."""
    try:  # an unknown cfg_type or an out-of-range number is a StreamError (an ADDError) naming the input
        numbers = float(guidance_scale), float(delta)
    except (TypeError, ValueError):
        raise ADDError(f"guidance_scale {guidance_scale!r} and delta {delta!r} must be numbers.") from None
    rcfg = core_stream.RCFG(cfg_type, *numbers)
    if rcfg.needs_negative and negative is None:
        raise ADDError(f"cfg_type={cfg_type} evaluates a negative prompt, but 'negative' is not connected: "
                             "connect a CONDITIONING (e.g. CLIP Text Encode of an empty prompt), or use cfg_type self "
                             "(no negative needed).")
    return rcfg


def check_latent(model, latent, label: str = "latent_image") -> torch.Tensor:
    """The LATENT's samples, checked: a (batch, channels, height, width) tensor (one more dim for
    video formats), batch >= 1, finite, with the model's channel count."""
    samples = latent.get("samples") if isinstance(latent, dict) else None
    if not isinstance(samples, torch.Tensor):
        raise ADDError(f"{label} holds no latent tensor: connect a LATENT (Empty Latent Image or VAE Encode).")
    if getattr(samples, "is_nested", False):
        return samples
    fmt = model.get_model_object("latent_format")
    want_ndim = 2 + int(getattr(fmt, "latent_dimensions", 2))
    if samples.ndim != want_ndim:
        raise ADDError(
            f"{label} has shape {tuple(samples.shape)} ({samples.ndim}-D) but this model takes {want_ndim}-D latents "
            "(batch, channels, height, width): connect a latent made for an image model (Empty Latent Image, or VAE "
            "Encode with this checkpoint's VAE).")
    if samples.shape[0] == 0 or any(int(s) == 0 for s in samples.shape[2:]):
        raise ADDError(f"{label} is empty (shape {tuple(samples.shape)}): set batch_size (and width/height) to at "
                             "least 1 in the node that made it.")
    if samples.is_floating_point() and not bool(torch.isfinite(samples).all()):
        raise ADDError(f"{label} holds NaN or infinite values, which would give NaN images: the node that made it "
                             "failed (e.g. a VAE Encode that overflowed in fp16). Re-encode the image (fp32 VAE) or use a "
                             "fresh Empty Latent Image.")
    check_latent_channels(model, samples, label)
    return samples


def check_latent_channels(model, samples: torch.Tensor, label: str = "latent_image") -> None:
    """A non-empty latent must have the model's latent channel count (empty ones core resizes)."""
    if getattr(samples, "is_nested", False) or samples.ndim < 3:
        return
    fmt = model.get_model_object("latent_format")
    want, got = int(fmt.latent_channels), int(samples.shape[1])
    if got != want and torch.count_nonzero(samples) > 0:
        raise ADDError(
            f"{label} has {got} channels but this model ({type(model.model).__name__}, latent format "
            f"{type(fmt).__name__}) expects {want}. The latent was made by another model family's VAE: encode the "
            f"image with this checkpoint's VAE (VAE Encode with the same checkpoint's VAE output), or load a "
            f"checkpoint of the family the latent came from."
        )


def add_sample(model, positive, latent: dict, seed: int, sigmas: torch.Tensor, noise_strength: float = 1.0,
               rcfg: core_stream.RCFG | None = None, negative=None) -> dict:
    """Seeded ADD sampling of a LATENT dict with the positive conditioning only; returns a new dict.

    ``rcfg`` (optional, cfg_type none = the plain path): full is ordinary CFG with ``negative`` at
    guidance_scale; self / initialize are residual CFG (core.stream.sample_add_rcfg).
    """
    samples = check_latent(model, latent)
    samples = comfy.sample.fix_empty_latent_channels(model, samples)
    noise = comfy.sample.prepare_noise(samples, seed, latent.get("batch_index", None))
    callback = latent_preview.prepare_callback(model, sigmas.shape[-1] - 1)
    cfg_type = "none" if rcfg is None else rcfg.cfg_type
    if cfg_type == "full" and negative is not None:
        guider = comfy.samplers.CFGGuider(model)
        guider.set_conds(positive, negative)
        guider.set_cfg(rcfg.guidance_scale)
    elif cfg_type in ("self", "initialize"):
        if latent.get("noise_mask", None) is not None:
            raise ADDError(f"cfg_type={cfg_type} does not support a latent with a noise mask (inpainting): use "
                                 "cfg_type none or full, or remove Set Latent Noise Mask.")
        guider = RCFGGuider(model)
        guider.set_conds(positive, negative if rcfg.needs_negative else None)
    else:
        guider = PositiveOnlyGuider(model)
        guider.set_conds(positive)
    if cfg_type in ("self", "initialize"):
        sampler = comfy.samplers.KSAMPLER(_sample_add_rcfg_comfy, extra_options={"rcfg": rcfg, "init_noise": noise})
    else:
        sampler = make_sampler(noise_strength)
    out = guider.sample(noise, samples, sampler, sigmas, denoise_mask=latent.get("noise_mask", None),
                        callback=callback, disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed)
    result = latent.copy()
    result["samples"] = out.to(comfy.model_management.intermediate_device())
    return result


def rcfg_inputs(default_type: str = "none", optional: bool = False) -> list:
    """The residual-CFG widgets (shared by ADD KSampler and ADD Stream Batch)."""
    return [
        io.Combo.Input("cfg_type", options=list(core_stream.CFG_TYPES), default=default_type, optional=optional, tooltip=
            "Guidance for models that gain from a little (LCM-LoRA merges). none: no guidance, one evaluation per step "
            "(SD-Turbo / ADD models). self: residual CFG, the input noise acts as the negative, no extra evaluation. "
            "initialize: residual CFG started by one negative-prompt evaluation per image (needs 'negative'). "
            "full: ordinary CFG with 'negative', two evaluations per step."),
        io.Float.Input("guidance_scale", default=1.2, min=1.0, max=20.0, step=0.05, optional=optional, tooltip=
            "Guidance strength for cfg_type self/initialize/full; 1 = none. StreamDiffusion uses 1.2 (residual) to ~1.5."),
        io.Float.Input("delta", default=1.0, min=0.0, max=5.0, step=0.05, optional=optional, tooltip=
            "Residual CFG only: scales the virtual negative's noise (StreamDiffusion's delta). Lower = weaker push away "
            "from the input."),
    ]


def negative_input() -> io.Conditioning.Input:
    return io.Conditioning.Input("negative", optional=True,
                                 tooltip="Negative prompt, used only by cfg_type initialize and full.")


class ADDScheduler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ADDScheduler", display_name="ADD Scheduler", category=CATEGORY,
            description=("ADD / SD-Turbo timesteps as SIGMAS from the model's own noise schedule (works for eps and "
                         "v-prediction, SD1.5/2.x/XL). Plug into SamplerCustom / SamplerCustomAdvanced with ADD Sampler."),
            inputs=[io.Model.Input("model", tooltip="The model whose noise schedule turns timesteps into sigmas."),
                    *schedule_inputs()],
            outputs=[io.Sigmas.Output(tooltip="One sigma per step plus a final 0.")],
        )

    @classmethod
    def execute(cls, model, steps, schedule, custom, denoise) -> io.NodeOutput:
        return io.NodeOutput(build_sigmas(model, schedule, steps, denoise, custom))


class ADDSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ADDSampler", display_name="ADD Sampler", category=CATEGORY,
            description=("ADD sampler: predict x0, re-noise to the next sigma with fresh noise (ADD / LCM update). "
                         "Use with ADD Scheduler in SamplerCustom (cfg 1) or SamplerCustomAdvanced (BasicGuider)."),
            inputs=[io.Float.Input(
                "noise_strength", default=1.0, min=0.0, max=1.0, step=0.01,
                tooltip="Fresh noise between steps. 1 = ADD/LCM (all fresh); lower keeps part of the model's own noise "
                        "estimate (variance preserved); 0 = deterministic.")],
            outputs=[io.Sampler.Output(tooltip="A sampler for SamplerCustom / SamplerCustomAdvanced.")],
        )

    @classmethod
    def execute(cls, noise_strength) -> io.NodeOutput:
        return io.NodeOutput(make_sampler(noise_strength))


class ADDKSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ADDKSampler", display_name="ADD KSampler", category=CATEGORY,
            description=("All-in-one ADD sampling (SD-Turbo, SDXL-Turbo, your ADD-trained models): 1-4 steps, no CFG, "
                         "one model evaluation per step. txt2img with an empty latent, img2img with an encoded image and "
                         "denoise < 1. Optional residual CFG (cfg_type) for LCM-LoRA models that gain from a little "
                         "guidance."),
            inputs=[
                io.Model.Input("model", tooltip="An ADD-distilled model (e.g. sd_turbo, sdxl_turbo)."),
                io.Conditioning.Input("positive", tooltip="The prompt. ADD models run without CFG (cfg_type none)."),
                io.Latent.Input("latent_image", tooltip="Empty latent for txt2img, or a VAE-encoded image for img2img."),
                io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff, control_after_generate=True,
                             tooltip="Noise seed (same noise as core KSampler for the same seed)."),
                *schedule_inputs(),
                *rcfg_inputs("none", optional=True),
                negative_input(),
            ],
            outputs=[io.Latent.Output(tooltip="The denoised latent.")],
        )

    @classmethod
    def execute(cls, model, positive, latent_image, seed, steps, schedule, custom, denoise,
                cfg_type="none", guidance_scale=1.2, delta=1.0, negative=None) -> io.NodeOutput:
        sigmas = build_sigmas(model, schedule, steps, denoise, custom)
        if cfg_type == "none":  # the plain ADD path, exactly as before the option existed
            return io.NodeOutput(add_sample(model, positive, latent_image, seed, sigmas))
        rcfg = check_rcfg(cfg_type, guidance_scale, delta, negative)
        return io.NodeOutput(add_sample(model, positive, latent_image, seed, sigmas, rcfg=rcfg, negative=negative))


NODES = [ADDScheduler, ADDSampler, ADDKSampler]
