"""Real-time streams for 1-4 step models: stream batch, residual CFG, similarity filter (pure torch).

StreamDiffusion (Kodaira et al., arXiv 2312.12491) written for the ADD sampler of core/sampling.py,
in ComfyUI's sigma space: a sampler state is x = a(sigma) * x0 + sigma * eps (a = 1 for eps and
v-prediction models), the denoiser is ``model(x, sigma_vector) -> x0`` with one sigma per batch row.

* Stream batch (paper Sec. 3.2): with an n-step schedule, the frame that entered k calls ago sits at
  step k. One model call evaluates every frame in flight, each at its own sigma, so a frame leaves
  the pipeline finished after n calls while one new frame enters per call: n sequential evaluations
  per frame become one batched call per frame. Rows re-noised between steps use the noise
  ``noise_fn(frame, step)`` -- the same noise sequential ADD sampling of that frame would draw
  (``sample_add`` with that noise_sampler), so the results are equal up to batching round-off.
  Warm-up: the first n - 1 calls of an empty pipeline finish no frame (each carries frames still in
  flight); ``run_frames(flush=True)`` keeps calling without new frames at the end until every frame
  is out, so every input frame gets its output, in order.
* Residual CFG (paper Sec. 3.3, StreamDiffusion's ``cfg_type``): guidance without a negative pass.
  Each row carries a "stock" noise eps_s, the noise a virtual negative would predict:
      eps_u = delta * eps_s,   x0_u = (x - sigma * eps_u) / a,   x0 = x0_u + g * (x0_cond - x0_u)
  A new frame starts with eps_s = the noise it was noised with (``self``: the input image is the
  virtual negative) or with one real negative evaluation at its first step (``initialize``). After a
  step the virtual negative's x0 estimate, (x - sigma * eps_s) / a, is carried to the next state
  x' = a' x0 + sigma' n', where its noise estimate is
      eps_s' = n' + (a' * sigma) / (a * sigma') * (eps_s - eps),   eps = (x - a * x0) / sigma
  (StreamDiffusion's stock_noise update, in sigma space). ``full`` is ordinary CFG with a negative
  prompt (done by the caller's denoiser); ``none`` is no guidance.
* Similarity filter (paper Sec. 3.4): a frame whose input has cosine similarity SC with the last
  processed input is skipped with probability max(0, (SC - eta) / (1 - eta)); the caller reuses the
  previous output. The uniform draw is seeded per (seed, frame), so a run is reproducible.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from .errors import StreamError

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x rows, sigma rows) -> x0 rows
NoiseFn = Callable[[int, int], torch.Tensor]  # (frame, step) -> (1, C, ...) noise for one frame
Renoise = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (sigma, noise, x0) -> x

CFG_TYPES = ("none", "self", "initialize", "full")
NOISE_MODES = ("fixed", "per_frame")
_MASK64 = (1 << 64) - 1




# ------------------------------------------------------------------------------------------
# seeded noise
# ------------------------------------------------------------------------------------------
def mix_seed(*values: int) -> int:
    """A 63-bit seed from integers (splitmix64 over each value): independent streams per tuple."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (int(v) & _MASK64)) & _MASK64
        h = (h + 0x9E3779B97F4A7C15) & _MASK64
        z = h
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        h = z ^ (z >> 31)
    return h & ((1 << 63) - 1)


def frame_noise(seed: int, frame: int, step: int, shape: Sequence[int], mode: str = "fixed") -> torch.Tensor:
    """N(0, I) noise of ``shape`` (float32, CPU) for a frame at a step.

    fixed: the same noise for every frame at a given step (StreamDiffusion's init_noise; steady
    video, no flicker from the noise). per_frame: independent noise per (frame, step) (txt2img
    streams: every frame a new image). CPU draws, so a seed gives the same frames on any device.
    """
    if mode not in NOISE_MODES:
        raise StreamError(f"noise={mode!r} is unknown; choose one of {', '.join(NOISE_MODES)}.")
    key = mix_seed(seed, 0x5EED, step) if mode == "fixed" else mix_seed(seed, frame, step)
    return torch.randn(tuple(shape), generator=torch.Generator().manual_seed(key), dtype=torch.float32)


# ------------------------------------------------------------------------------------------
# residual CFG
# ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RCFG:
    """StreamDiffusion's guidance options. guidance_scale <= 1 means no guidance for every type."""

    cfg_type: str = "none"
    guidance_scale: float = 1.0
    delta: float = 1.0

    def __post_init__(self):
        if self.cfg_type not in CFG_TYPES:
            raise StreamError(f"cfg_type={self.cfg_type!r} is unknown; choose one of {', '.join(CFG_TYPES)}.")
        g, d = float(self.guidance_scale), float(self.delta)
        if not math.isfinite(g) or g < 1.0:
            raise StreamError(f"guidance_scale={self.guidance_scale!r} must be a number >= 1 (1 = no guidance; "
                              "StreamDiffusion uses 1.2 with LCM-LoRA models).")
        if not math.isfinite(d) or d < 0.0:
            raise StreamError(f"delta={self.delta!r} must be a number >= 0 (1 = StreamDiffusion's default; "
                              "it scales the virtual negative's noise).")

    @property
    def residual(self) -> bool:
        """True when rows carry stock noise (self / initialize)."""
        return self.cfg_type in ("self", "initialize")

    @property
    def needs_negative(self) -> bool:
        """True when a negative prompt is evaluated (initialize at a frame's first step, full always)."""
        return self.cfg_type in ("initialize", "full") and self.guidance_scale > 1.0


def _bshape(sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A per-row sigma vector (K,) (or a scalar) shaped to broadcast over x (K, C, ...)."""
    if sigma.ndim == 0 or sigma.numel() == 1:
        return sigma.reshape(()).to(x)
    return sigma.reshape((-1,) + (1,) * (x.ndim - 1)).to(x)


def x0_scale(renoise: Renoise, sigma_b: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """a(sigma) in x = a x0 + sigma eps, read off the (affine) renoise: 1 for eps / v models."""
    shape = (sigma_b.shape[0] if sigma_b.ndim else 1,) + (1,) * (x.ndim - 1)
    one = torch.ones(shape, dtype=x.dtype, device=x.device)
    return renoise(sigma_b, torch.zeros_like(one), one)


def noise_estimate(renoise: Renoise, x: torch.Tensor, sigma_b: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """eps = (x - a x0) / sigma: the noise a prediction x0 implies (sample_add's inversion)."""
    return (x - renoise(sigma_b, torch.zeros_like(x), x0)) / sigma_b


def rcfg_guide(x: torch.Tensor, sigma_b: torch.Tensor, x0_cond: torch.Tensor, stock: torch.Tensor, rcfg: RCFG,
               renoise: Renoise) -> torch.Tensor:
    """Guided x0 from the conditional x0 and the virtual negative eps_u = delta * stock (module doc)."""
    if rcfg.guidance_scale == 1.0:
        return x0_cond
    a = x0_scale(renoise, sigma_b, x)
    x0_u = (x - sigma_b * (rcfg.delta * stock)) / a
    return x0_u + rcfg.guidance_scale * (x0_cond - x0_u)


def rcfg_next_stock(stock: torch.Tensor, x: torch.Tensor, x0: torch.Tensor, sigma_b: torch.Tensor,
                    sigma_next_b: torch.Tensor, noise_next: torch.Tensor, renoise: Renoise) -> torch.Tensor:
    """Stock noise at the next state x' = a' x0 + sigma' noise_next (module doc; needs sigma' > 0)."""
    eps = noise_estimate(renoise, x, sigma_b, x0)
    ratio = (x0_scale(renoise, sigma_next_b, x) * sigma_b) / (x0_scale(renoise, sigma_b, x) * sigma_next_b)
    return noise_next + ratio * (stock - eps)


def _add_noise(sigma, noise, x0):
    return x0 + sigma * noise


@torch.no_grad()
def sample_add_rcfg(model, x, sigmas, extra_args=None, callback=None, disable=None, rcfg: RCFG = RCFG(),
                    init_noise: Optional[torch.Tensor] = None, uncond: Optional[Denoiser] = None,
                    noise_sampler=None, renoise: Optional[Renoise] = None):
    """ADD sampling (core.sampling.sample_add at noise_strength 1) with residual CFG, k-diffusion signature.

    ``init_noise``: the noise x was made with (the first stock noise for ``self``); ``uncond(x, sigma)``
    -> x0 of the negative prompt, called once (first step) for ``initialize``. ``full`` and ``none``
    need no residual state: use sample_add with a CFG / positive-only denoiser instead.
    """
    from .sampling import default_noise_sampler

    if not rcfg.residual:
        raise StreamError(f"sample_add_rcfg is for cfg_type self/initialize, got {rcfg.cfg_type!r}.")
    extra_args = {} if extra_args is None else extra_args
    noise_sampler = default_noise_sampler(x, seed=extra_args.get("seed", None)) if noise_sampler is None else noise_sampler
    renoise = _add_noise if renoise is None else renoise
    if init_noise is None:
        raise StreamError("cfg_type=self needs the initial noise (the first virtual negative).")
    stock = init_noise.to(x)
    s_in = x.new_ones([x.shape[0]])
    last = [float(s) <= 0 for s in sigmas.tolist()[1:]]
    for i in range(len(sigmas) - 1):
        sigma = sigmas[i] * s_in
        sigma_b = _bshape(sigma, x)
        x0 = model(x, sigma, **extra_args)
        if i == 0 and rcfg.needs_negative:
            stock = noise_estimate(renoise, x, sigma_b, uncond(x, sigma))
        x0 = rcfg_guide(x, sigma_b, x0, stock, rcfg, renoise)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": x0})
        if last[i]:
            x = x0
            continue
        noise = noise_sampler(sigmas[i], sigmas[i + 1])
        sigma_next_b = _bshape(sigmas[i + 1] * s_in, x)
        stock = rcfg_next_stock(stock, x, x0, sigma_b, sigma_next_b, noise, renoise)
        x = renoise(sigma_next_b, noise, x0)
    return x


# ------------------------------------------------------------------------------------------
# stream batch
# ------------------------------------------------------------------------------------------
@dataclass
class Row:
    """One evaluated row of a stream call: its frame, x0 prediction (1, C, ...) and steps done."""

    frame: int
    x0: torch.Tensor
    steps_done: int
    finished: bool


class StreamBatch:
    """The frames in flight of a stream and the batched call that advances them all by one step.

    ``sigmas``: (n + 1,) decreasing, sigmas[:n] > 0 (the ADD schedule; the last is usually 0).
    State between calls: ``x`` (K, C, ...) rows at ``steps`` (index into sigmas), ``frames``, and
    ``stock`` (residual CFG). Rows are ordered newest first (StreamDiffusion's layout). Counters:
    ``calls`` (model calls), ``rows`` (conditional rows evaluated), ``negative_rows``.
    """

    def __init__(self, sigmas: torch.Tensor, rcfg: RCFG = RCFG(), renoise: Optional[Renoise] = None):
        values = [float(s) for s in sigmas.flatten().tolist()]
        if len(values) < 2:
            raise StreamError("the schedule has no step: sigmas need at least two values (one step and a final sigma).")
        if any(not s > 0 for s in values[:-1]) or any(not b < a for a, b in zip(values, values[1:])):
            raise StreamError(f"sigmas {values} must decrease, all but the last > 0: build them with ADD Scheduler.")
        self.sigmas = sigmas.flatten().float()
        self.n = len(values) - 1
        self.rcfg = rcfg
        self.renoise = _add_noise if renoise is None else renoise
        self.x: Optional[torch.Tensor] = None
        self.frames: list[int] = []
        self.steps: list[int] = []
        self.stock: Optional[torch.Tensor] = None
        self.calls = self.rows = self.negative_rows = 0

    @property
    def in_flight(self) -> int:
        return len(self.frames)

    def _sigma_rows(self, steps: list[int], like: torch.Tensor) -> torch.Tensor:
        # indexing the schedule gives the exact floats sequential sampling uses (sigmas[i] * 1)
        sig = self.sigmas.to(like.device)
        return sig[torch.tensor(steps, dtype=torch.long, device=like.device)]

    def step(self, new_x: Optional[torch.Tensor], new_frames: Sequence[int], denoise: Denoiser, noise_fn: NoiseFn,
             uncond: Optional[Denoiser] = None) -> list[Row]:
        """One model call: ``new_x`` (B, C, ...) states at sigmas[0] enter, every row moves one step.

        Returns every evaluated row (newest first); finished rows leave the pipeline.
        """
        xs, frames, steps, stocks = [], [], [], []
        if new_x is not None and new_x.shape[0] > 0:
            if len(new_frames) != new_x.shape[0]:
                raise StreamError(f"{new_x.shape[0]} new rows but {len(new_frames)} frame numbers.")
            xs.append(new_x)
            frames += list(new_frames)
            steps += [0] * new_x.shape[0]
            if self.rcfg.residual:
                stocks.append(torch.cat([noise_fn(f, 0) for f in new_frames]).to(new_x))
        if self.x is not None:
            xs.append(self.x)
            frames += self.frames
            steps += self.steps
            if self.rcfg.residual:
                stocks.append(self.stock)
        if not xs:
            return []
        x = torch.cat(xs) if len(xs) > 1 else xs[0]
        sigma = self._sigma_rows(steps, x)
        sigma_b = _bshape(sigma, x)
        x0 = denoise(x, sigma)
        self.calls += 1
        self.rows += x.shape[0]
        stock = (torch.cat(stocks) if len(stocks) > 1 else stocks[0]) if self.rcfg.residual else None
        if self.rcfg.residual:
            fresh = [i for i, k in enumerate(steps) if k == 0]
            if fresh and self.rcfg.needs_negative:  # initialize: one negative row per new frame
                if uncond is None:
                    raise StreamError("cfg_type=initialize needs a negative prompt: connect 'negative'.")
                idx = torch.tensor(fresh, device=x.device)
                xu, su = x[idx], sigma[idx]
                stock = stock.clone()
                stock[idx] = noise_estimate(self.renoise, xu, _bshape(su, xu), uncond(xu, su))
                self.negative_rows += len(fresh)
            x0 = rcfg_guide(x, sigma_b, x0, stock, self.rcfg, self.renoise)
        done = [k + 1 >= self.n for k in steps]
        out = [Row(f, x0[i:i + 1], k + 1, d) for i, (f, k, d) in enumerate(zip(frames, steps, done))]
        keep = [i for i, d in enumerate(done) if not d]
        if not keep:
            self.x, self.frames, self.steps, self.stock = None, [], [], None
            return out
        idx = torch.tensor(keep, device=x.device)
        next_steps = [steps[i] + 1 for i in keep]
        noise = torch.cat([noise_fn(frames[i], steps[i] + 1) for i in keep]).to(x)
        x0k = x0[idx]
        sigma_next_b = _bshape(self._sigma_rows(next_steps, x), x0k)
        if self.rcfg.residual:
            self.stock = rcfg_next_stock(stock[idx], x[idx], x0k, _bshape(sigma[idx], x0k), sigma_next_b, noise, self.renoise)
        self.x = self.renoise(sigma_next_b, noise, x0k)
        self.frames = [frames[i] for i in keep]
        self.steps = next_steps
        return out


def run_frames(stream: StreamBatch, x: torch.Tensor, frames: Sequence[int], denoise: Denoiser, noise_fn: NoiseFn,
               frames_per_call: int = 1, flush: bool = True, batched: bool = True,
               uncond: Optional[Denoiser] = None, on_call: Optional[Callable[[list[Row]], None]] = None) -> list[tuple[int, torch.Tensor]]:
    """Push frames ``x`` (F, C, ...) at sigmas[0] through ``stream``; returns the emitted (frame, x0).

    batched=True (stream batch): ``frames_per_call`` frames enter per call. flush=True then calls
    until the pipeline is empty and emits only finished frames, in order (F in, F out). flush=False
    (live) emits one output per frame entering: the finished frame, or while the pipeline warms up
    the x0 of the oldest frame in flight (fewer steps); unfinished frames stay in ``stream``.
    batched=False: each group of frames runs all its steps before the next enters (per-frame ADD
    sampling, n calls per group) -- the reference the stream batch equals.
    """
    if frames_per_call < 1:
        raise StreamError(f"frame_buffer_size={frames_per_call} must be >= 1.")
    out: list[tuple[int, torch.Tensor]] = []

    def call(new_x, new_frames):
        rows = stream.step(new_x, new_frames, denoise, noise_fn, uncond)
        if on_call is not None:
            on_call(rows)
        return rows

    for s in range(0, x.shape[0], frames_per_call):
        group_x, group = x[s:s + frames_per_call], list(frames[s:s + frames_per_call])
        rows = call(group_x, group)
        if not batched:
            while stream.in_flight:
                rows += call(None, [])
            out += [(r.frame, r.x0) for r in rows if r.finished]
            continue
        done = sorted((r for r in rows if r.finished), key=lambda r: r.frame)
        if not flush and len(done) < len(group):
            # warm-up: the oldest frames in flight, at the steps they have had so far
            preview = sorted((r for r in rows if not r.finished), key=lambda r: (-r.steps_done, r.frame))
            done = sorted(preview[:len(group) - len(done)], key=lambda r: r.frame) + done
        out += [(r.frame, r.x0) for r in done]
    if batched and flush:
        while stream.in_flight:
            out += [(r.frame, r.x0) for r in sorted(call(None, []), key=lambda r: r.frame) if r.finished]
    return out


def calls_needed(frames: int, steps: int, frames_per_call: int = 1, flush: bool = True, batched: bool = True,
                 in_flight_steps: Sequence[int] = ()) -> int:
    """Model calls ``run_frames`` makes for ``frames`` new frames (progress bars, benchmarks)."""
    groups = -(-frames // frames_per_call) if frames else 0
    if not batched:
        return groups * steps
    if not flush:
        return groups
    # a row at step k needs steps - k more calls; the last group enters at call groups - 1
    need = [steps - int(k) for k in in_flight_steps] + ([groups - 1 + steps] if groups else [])
    return max(need + [groups])


# ------------------------------------------------------------------------------------------
# similarity filter
# ------------------------------------------------------------------------------------------
def skip_probability(similarity: float, threshold: float, identical: bool = False) -> float:
    """StreamDiffusion's P(skip) = max(0, (SC - eta) / (1 - eta)); an identical frame is always skipped.

    At eta >= 1 only identical frames are skipped (the formula would divide by zero).
    """
    if identical:
        return 1.0
    if threshold >= 1.0:
        return 0.0
    return min(1.0, max(0.0, (similarity - threshold) / (1.0 - threshold)))


class SimilarityFilter:
    """Stochastic similarity filter over a sequence of inputs (paper Sec. 3.4).

    ``decide(x, frame)`` -> True to skip: x is compared (cosine similarity, flattened, eps 1e-6) with
    the last input that was processed; a skip is drawn with ``skip_probability`` from a uniform
    seeded per (seed, frame). After ``max_skip_frames`` consecutive skips the next frame is processed
    whatever its similarity (StreamDiffusion's max_skip_frame, here counting consecutive skips).
    """

    def __init__(self, threshold: float = 0.98, max_skip_frames: int = 10, seed: int = 0):
        if not (0.0 <= float(threshold) <= 1.0):
            raise StreamError(f"similarity_threshold={threshold!r} must be in [0, 1] (0.98 = StreamDiffusion's default).")
        if int(max_skip_frames) < 0:
            raise StreamError(f"max_skip_frames={max_skip_frames!r} must be >= 0.")
        self.threshold, self.max_skip_frames, self.seed = float(threshold), int(max_skip_frames), int(seed)
        self.prev: Optional[torch.Tensor] = None
        self.skip_run = 0
        self.skipped = 0
        self.last_similarity: Optional[float] = None

    def decide(self, x: torch.Tensor, frame: int) -> bool:
        cur = x.detach().flatten().float()
        if self.prev is None or self.prev.shape != cur.shape:
            self.prev, self.skip_run = cur.clone(), 0
            return False
        identical = torch.equal(self.prev, cur)
        sim = float(torch.nn.functional.cosine_similarity(self.prev.to(cur.device), cur, dim=0, eps=1e-6))
        self.last_similarity = sim
        u = float(torch.rand((), generator=torch.Generator().manual_seed(mix_seed(self.seed, frame, 0xF117))))
        if u < skip_probability(sim, self.threshold, identical) and self.skip_run < self.max_skip_frames:
            self.skip_run += 1
            self.skipped += 1
            return True
        self.prev, self.skip_run = cur.clone(), 0
        return False
