"""One-Minute Sampler: v-prediction sampling of a whole multi-segment video with CogVideoX's schedule.

What it does, and where it comes from:

- Schedule: CogVideoX's zero-terminal-SNR DDPM discretisation (scaled-linear betas 0.00085 .. 0.012,
  1000 training steps, SNR shift 1.0, "trailing" timestep spacing: 999, 979, ..., 19 for 50 steps), taken
  from diffusers' ``CogVideoXDDIMScheduler`` / ``CogVideoXDPMScheduler`` (``alphas_cumprod``,
  ``set_timesteps``, ``get_variables``, ``get_mult``). The official sampler's
  ``generate_roughly_equally_spaced_steps`` gives the same 50 timesteps.
- Samplers: ``ddim`` (the paper) and ``dpmpp_2m`` (the official code's VP-SDE DPM++ 2M, stochastic; the
  same update as diffusers' ``CogVideoXDPMScheduler.step``). We do the update ourselves from the diffusers
  pieces for two reasons: (1) the SDE noise of every step comes from per-segment seeds, so a segment an
  artist keeps also keeps its noise; (2) the "previous timestep" is the next entry of the timestep list
  (diffusers uses ``t - 1000 // steps``, which never reaches the clean endpoint when ``steps`` does not
  divide 1000). For 50 steps both are identical to diffusers (tested).
- Classifier-free guidance on the v-prediction (equivalent to guidance on x0, which is what the official
  code does: x0 is affine in v with the same coefficients for both branches). Modes:

  * ``dynamic`` (default): ``w = 1 + s * (1 - cos(pi * (i / N) ** 5)) / 2`` with ``i`` the 0-based step
    index, so guidance ramps from 1 at the first (pure-noise) step to ~1 + s at the last.
  * ``official``: exactly what the official code (and CogVideoX's sat code and diffusers'
    ``use_dynamic_cfg``) computes: ``(N - t) / N`` with ``t`` the DDPM timestep (999 .. 19), not the step
    counter. For N = 50 that ratio is negative and large for all but the last three steps, so ``w`` jumps
    around pseudo-randomly in [1, 1 + s]. Kept for reproducing their evaluation; ``dynamic`` is the ramp
    the formula was written for.
  * ``constant``: ``w = s``.

- Noise: every segment owns latent frames (13 for the first, 12 after: ``VideoGeometry.owned_frames``);
  the initial noise of those frames, and for ``dpmpp_2m`` each step's SDE noise, is drawn from that
  segment's own seed. Regenerating one segment (new seed) leaves every other segment's noise untouched
  (the model is global, so their content may still shift slightly).
- Interrupt / resume: ``cancel`` is checked before every step; on cancel, Ctrl-C or any error inside a
  step, the latents at the start of that step, the DPM++ history (previous x0 prediction), the step index
  and every setting go into one safetensors file (tensors + JSON metadata, written atomically).
  ``sample(..., resume_from=path)`` continues from there and produces bit-identical latents to an
  uninterrupted run on the same machine.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch

from .geometry import latent_frames_for_segments

SCHEDULERS = ("dpmpp_2m", "ddim")
GUIDANCE_MODES = ("dynamic", "constant", "official")
CFG_MODES = ("auto", "batched", "sequential")
DEFAULT_STEPS = 50
DEFAULT_GUIDANCE = 6.0
CHECKPOINT_FORMAT = "ttt-video-sampler-checkpoint/1"
_META_KEY = "ttt_video_sampler"

# THUDM/CogVideoX-5b scheduler/scheduler_config.json (and the official eval config: shift 1.0, 1000 steps).
COGVIDEOX_SCHEDULER_CONFIG: dict[str, Any] = {
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "clip_sample_range": 1.0,
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "rescale_betas_zero_snr": True,
    "sample_max_value": 1.0,
    "set_alpha_to_one": True,
    "snr_shift_scale": 1.0,
    "steps_offset": 0,
    "timestep_spacing": "trailing",
}


class SamplingInterrupted(Exception):
    """Sampling stopped by a cancel request or Ctrl-C; ``checkpoint_path`` resumes it (None if not saved)."""

    def __init__(self, message: str, checkpoint_path: str | None, step: int, total: int):
        super().__init__(message)
        self.checkpoint_path = checkpoint_path
        self.step = step
        self.total = total


class _CancelRequested(Exception):
    pass


# --------------------------------------------------------------------------------------------------
# schedule and guidance
# --------------------------------------------------------------------------------------------------
def make_scheduler(name: str, config: dict[str, Any] | None = None):
    """diffusers CogVideoX scheduler for ``name`` (``ddim`` or ``dpmpp_2m``) with ``config`` (default:
    CogVideoX-5B's zero-SNR v-prediction config)."""
    from diffusers import CogVideoXDDIMScheduler, CogVideoXDPMScheduler

    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")
    cfg = dict(COGVIDEOX_SCHEDULER_CONFIG)
    if config:
        cfg.update({k: v for k, v in config.items() if not k.startswith("_")})
    if cfg.get("prediction_type") != "v_prediction":
        raise ValueError(f"TTT-DiT is a v-prediction model; scheduler config has prediction_type={cfg.get('prediction_type')!r}")
    cls = CogVideoXDDIMScheduler if name == "ddim" else CogVideoXDPMScheduler
    return cls.from_config(cfg)


def guidance_scale(mode: str, scale: float, step_index: int, num_steps: int, timestep: int) -> float:
    """CFG weight of step ``step_index`` (0-based) whose DDPM timestep is ``timestep`` (see module doc)."""
    if mode == "constant":
        return float(scale)
    if mode == "dynamic":
        progress = step_index / num_steps
    elif mode == "official":
        progress = (num_steps - timestep) / num_steps  # the official code's orientation, quirk included
    else:
        raise ValueError(f"unknown guidance mode {mode!r}; choose one of {', '.join(GUIDANCE_MODES)}")
    return 1.0 + float(scale) * (1.0 - math.cos(math.pi * progress**5)) / 2.0


# --------------------------------------------------------------------------------------------------
# seeds and noise
# --------------------------------------------------------------------------------------------------
def derive_seed(*parts: int) -> int:
    """A 63-bit seed mixed from integers (independent streams for (seed, segment), (seed, step), ...)."""
    words = np.random.SeedSequence([int(p) & 0xFFFFFFFFFFFFFFFF for p in parts]).generate_state(2, np.uint32)
    return int((int(words[0]) << 31) ^ int(words[1])) & 0x7FFFFFFFFFFFFFFF


def parse_segment_list(text: str) -> list[int]:
    """'3,5-7' -> [2, 4, 5, 6]: segments numbered from 1 by people, from 0 inside. ValueError if malformed."""
    out: list[int] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        try:
            if "-" in part:
                a, b = part.split("-", 1)
                lo, hi = int(a), int(b)
                if lo > hi:
                    raise ValueError
                out.extend(range(lo - 1, hi))
            else:
                out.append(int(part) - 1)
        except ValueError:
            raise ValueError(f"bad segment number or range {part!r} in {text!r} (use e.g. '3,5-7')") from None
    if any(i < 0 for i in out):
        raise ValueError("segments are numbered from 1")
    return out


def parse_segment_seeds(text: str) -> dict[int, int]:
    """'3=123,5=77' -> {2: 123, 4: 77}; a plain list '11,12,13' gives segments 1, 2, 3 in order."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    try:
        if all("=" in p for p in parts):
            seeds = {int(k) - 1: int(v) for k, v in (p.split("=", 1) for p in parts)}
        elif not any("=" in p for p in parts):
            seeds = {i: int(p) for i, p in enumerate(parts)}
        else:
            raise ValueError
    except ValueError:
        raise ValueError(
            f"segment seeds {text!r}: use SEGMENT=SEED pairs ('3=123,5=77') or one seed per segment ('11,12,13')"
        ) from None
    if any(k < 0 for k in seeds):
        raise ValueError("segments are numbered from 1")
    return seeds


def resolve_segment_seeds(
    num_segments: int,
    seed: int,
    overrides: dict[int, int] | Sequence[int | None] | None = None,
    regenerate: Sequence[int] = (),
    variation_seed: int | None = None,
) -> list[int]:
    """Per-segment noise seeds.

    Segment i gets ``derive_seed(seed, i)`` unless ``overrides`` names it (a dict {segment: seed} or a list
    with None for "derived"). Segments listed in ``regenerate`` (the complement of the "keep" mask) get a
    fresh seed from ``variation_seed`` (default seed + 1) so only their noise changes.
    """
    if num_segments < 1:
        raise ValueError(f"a video needs at least one segment, got {num_segments}")
    seeds = [derive_seed(seed, i) for i in range(num_segments)]
    if overrides is not None:
        items = overrides.items() if isinstance(overrides, dict) else enumerate(overrides)
        for i, s in items:
            if s is None:
                continue
            if not 0 <= int(i) < num_segments:
                raise ValueError(f"segment seed given for segment {int(i) + 1}, but the storyboard has {num_segments} segments")
            seeds[int(i)] = int(s)
    vseed = seed + 1 if variation_seed is None else variation_seed
    for i in regenerate:
        if not 0 <= int(i) < num_segments:
            raise ValueError(f"cannot regenerate segment {int(i) + 1}: the storyboard has {num_segments} segments")
        seeds[int(i)] = derive_seed(vseed, 1_000_003, int(i))
    return seeds


def _owned_ranges(num_segments: int) -> list[tuple[int, int]]:
    # VideoGeometry.owned_frames without needing the spatial sizes.
    from .geometry import FIRST_SEGMENT_LATENT_FRAMES, LATER_SEGMENT_LATENT_FRAMES

    ranges = [(0, FIRST_SEGMENT_LATENT_FRAMES)]
    for s in range(1, num_segments):
        start = FIRST_SEGMENT_LATENT_FRAMES + LATER_SEGMENT_LATENT_FRAMES * (s - 1)
        ranges.append((start, start + LATER_SEGMENT_LATENT_FRAMES))
    return ranges


def segment_noise(frame_shape: Sequence[int], segment_seeds: Sequence[int], stream: int = 0) -> torch.Tensor:
    """Gaussian noise [1, F_lat, C, h, w] in float32 on CPU where each segment's owned frames come from its
    own seed. ``stream`` 0 is the initial noise (seeded with the segment seed itself); stream k > 0 is the
    SDE noise of step k - 1."""
    ranges = _owned_ranges(len(segment_seeds))
    parts = []
    for (lo, hi), s in zip(ranges, segment_seeds):
        gen = torch.Generator(device="cpu")
        gen.manual_seed(int(s) if stream == 0 else derive_seed(int(s), stream))
        parts.append(torch.randn((hi - lo, *frame_shape), generator=gen, dtype=torch.float32))
    return torch.cat(parts, dim=0).unsqueeze(0)


# --------------------------------------------------------------------------------------------------
# one update step (float32, pure functions of their inputs)
# --------------------------------------------------------------------------------------------------
def _alpha(scheduler, timestep: int) -> torch.Tensor:
    return scheduler.alphas_cumprod[timestep] if timestep >= 0 else scheduler.final_alpha_cumprod


def predicted_x0(scheduler, v: torch.Tensor, x: torch.Tensor, timestep: int) -> torch.Tensor:
    a = _alpha(scheduler, timestep)
    return a**0.5 * x - (1 - a) ** 0.5 * v


def ddim_step(scheduler, v, x, timestep: int, prev_timestep: int):
    """Deterministic DDIM (eta 0) step, as ``CogVideoXDDIMScheduler.step``; returns (x_prev, x0)."""
    a_t, a_prev = _alpha(scheduler, timestep), _alpha(scheduler, prev_timestep)
    x0 = a_t**0.5 * x - (1 - a_t) ** 0.5 * v
    c_x = ((1 - a_prev) / (1 - a_t)) ** 0.5
    c_x0 = a_prev**0.5 - a_t**0.5 * c_x
    return c_x * x + c_x0 * x0, x0


def dpmpp_2m_step(scheduler, v, x, old_x0, timestep: int, prev_timestep: int, back_timestep: int | None, noise):
    """VP-SDE DPM++ 2M step, as ``CogVideoXDPMScheduler.step`` but with the noise passed in; returns
    (x_prev, x0). ``back_timestep`` is the previous (noisier) timestep, None at the first step."""
    a_t, a_prev = _alpha(scheduler, timestep), _alpha(scheduler, prev_timestep)
    a_back = _alpha(scheduler, back_timestep) if back_timestep is not None else None
    x0 = a_t**0.5 * x - (1 - a_t) ** 0.5 * v
    h, r, _, _ = scheduler.get_variables(a_t, a_prev, a_back)
    mult = list(scheduler.get_mult(h, r, a_t, a_prev, a_back))
    mult_noise = (1 - a_prev) ** 0.5 * (1 - (-2 * h).exp()) ** 0.5
    if old_x0 is None or prev_timestep < 0:
        return mult[0] * x - mult[1] * x0 + mult_noise * noise, x0
    x0_d = mult[2] * x0 - mult[3] * old_x0
    return mult[0] * x - mult[1] * x0_d + mult_noise * noise, x0


# --------------------------------------------------------------------------------------------------
# checkpoint file
# --------------------------------------------------------------------------------------------------
def save_checkpoint(path: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> str:
    """Write tensors + JSON metadata to one safetensors file atomically (temp file + os.replace)."""
    from safetensors.torch import save_file

    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".ttt-ckpt-", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, tmp,
                  metadata={_META_KEY: json.dumps(meta, sort_keys=True)})
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def load_checkpoint(path: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise FileNotFoundError(f"resume checkpoint {path} does not exist")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            meta_raw = (f.metadata() or {}).get(_META_KEY)
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # not a safetensors file
        raise ValueError(f"{path} is not a sampler checkpoint (could not read it as safetensors: {e})") from e
    if meta_raw is None:
        raise ValueError(f"{path} is a safetensors file but not a ttt-video sampler checkpoint (no '{_META_KEY}' metadata)")
    meta = json.loads(meta_raw)
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: unsupported checkpoint format {meta.get('format')!r} (expected {CHECKPOINT_FORMAT})")
    return tensors, meta


def read_checkpoint_meta(path: str) -> dict[str, Any]:
    return load_checkpoint(path)[1]


def tensor_fingerprint(*tensors: torch.Tensor | None) -> str:
    h = hashlib.sha256()
    for t in tensors:
        if t is None:
            h.update(b"none")
            continue
        t = t.detach().to("cpu").contiguous()
        h.update(str((tuple(t.shape), str(t.dtype))).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:32]


def model_fingerprint(model: torch.nn.Module) -> str:
    """Cheap identity of a model's weights (parameter count + samples of the first and last tensors), so a
    checkpoint is not resumed with other weights under the same name."""
    params = [p for p in model.parameters()]
    if not params:
        return "no-parameters"
    sample = [p.detach().reshape(-1)[:4096].float() for p in (params[0], params[len(params) // 2], params[-1])]
    return f"{sum(p.numel() for p in params)}-" + tensor_fingerprint(*sample)[:16]


# --------------------------------------------------------------------------------------------------
# sampler
# --------------------------------------------------------------------------------------------------
@dataclass
class SamplerSettings:
    steps: int = DEFAULT_STEPS
    scheduler: str = "dpmpp_2m"
    guidance: float = DEFAULT_GUIDANCE
    guidance_mode: str = "dynamic"
    seed: int = 0
    segment_seeds: list[int] = field(default_factory=list)
    cfg_mode: str = "auto"
    scheduler_config: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps must be a positive integer, got {self.steps!r}")
        n_train = int(self.scheduler_config.get("num_train_timesteps", 1000))
        if self.steps > n_train:
            raise ValueError(f"steps={self.steps} exceeds the scheduler's {n_train} training timesteps")
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {self.scheduler!r}; choose one of {', '.join(SCHEDULERS)}")
        if self.guidance_mode not in GUIDANCE_MODES:
            raise ValueError(f"unknown guidance mode {self.guidance_mode!r}; choose one of {', '.join(GUIDANCE_MODES)}")
        if self.cfg_mode not in CFG_MODES:
            raise ValueError(f"unknown cfg mode {self.cfg_mode!r}; choose one of {', '.join(CFG_MODES)}")
        if not math.isfinite(self.guidance) or self.guidance < 0:
            raise ValueError(f"guidance must be a finite number >= 0, got {self.guidance!r}")


@dataclass
class StepInfo:
    """What the per-step callback receives (after step ``step`` of ``total`` is done, 1-based)."""

    step: int
    total: int
    timestep: int
    guidance: float
    latents: torch.Tensor  # [1, F_lat, C, h, w] float32, the new noisy latents
    denoised: torch.Tensor  # [1, F_lat, C, h, w] the model's current x0 prediction
    segment: int  # the segment shown by preview() this step (cycles through the video)
    num_segments: int
    elapsed_s: float

    @property
    def eta_s(self) -> float:
        return self.elapsed_s / max(self.step, 1) * (self.total - self.step)

    def preview(self, upscale: int = 8) -> np.ndarray:
        """Cheap RGB preview (uint8 [H, W, 3]) of the middle owned latent frame of ``segment``'s x0
        prediction: the first three latent channels, min-max normalised. Rough colours, right layout."""
        lo, hi = _owned_ranges(self.num_segments)[self.segment]
        frame = self.denoised[0, (lo + hi) // 2].float()
        c = frame.shape[0]
        rgb = frame[:3] if c >= 3 else frame[:1].expand(3, -1, -1)
        lo_v, hi_v = rgb.amin(), rgb.amax()
        rgb = (rgb - lo_v) / (hi_v - lo_v + 1e-6)
        img = (rgb.permute(1, 2, 0) * 255).round().clamp(0, 255).to(torch.uint8)
        if upscale > 1:
            img = img.repeat_interleave(upscale, 0).repeat_interleave(upscale, 1)
        return img.numpy()


def _latent_layout(model, config, num_segments: int) -> tuple[int, ...]:
    cfg = config if config is not None else getattr(model, "config", None)
    if cfg is None:
        raise ValueError("cannot tell the latent shape: pass config= (a TTTDiTConfig)")
    get = (lambda k: cfg[k]) if isinstance(cfg, dict) else (lambda k: getattr(cfg, k))
    return (get("in_channels"), get("sample_height"), get("sample_width"))


def _as_batch(emb: torch.Tensor | None, name: str) -> torch.Tensor | None:
    if emb is None:
        return None
    if emb.dim() == 3:
        emb = emb.unsqueeze(0)
    if emb.dim() != 4 or emb.shape[0] != 1:
        raise ValueError(f"{name} must be [S, L, dim] (or [1, S, L, dim]), got {tuple(emb.shape)}")
    return emb


def _call_model(model, x, emb, t):
    out = model(hidden_states=x, encoder_hidden_states=emb, timestep=t)
    if isinstance(out, (tuple, list)):
        out = out[0]
    elif hasattr(out, "sample"):
        out = out.sample
    return out


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


@torch.no_grad()
def sample(
    model: torch.nn.Module,
    cond: torch.Tensor,
    uncond: torch.Tensor | None = None,
    *,
    steps: int = DEFAULT_STEPS,
    seed: int = 0,
    scheduler: str = "dpmpp_2m",
    guidance: float = DEFAULT_GUIDANCE,
    guidance_mode: str = "dynamic",
    segment_seeds: Sequence[int] | None = None,
    cfg_mode: str = "auto",
    scheduler_config: dict[str, Any] | None = None,
    config=None,
    callback: Callable[[StepInfo], None] | None = None,
    cancel: Callable[[], bool] | None = None,
    checkpoint_path: str | None = None,
    checkpoint_every: int = 0,
    checkpoint_extra: dict[str, Any] | None = None,
    resume_from: str | None = None,
    stop_after: int | None = None,
    keep_final_checkpoint: bool = False,
) -> torch.Tensor:
    """Sample the latents of a whole video: returns [1, F_lat, C, h, w] float32 on the model's device.

    cond / uncond: text embeddings [S, L, dim] (uncond: per-segment negative prompts; None -> no CFG).
    segment_seeds: one seed per segment (see ``resolve_segment_seeds``); default derived from ``seed``.
    callback(StepInfo) after each step; cancel() before each step (return True or raise to stop).
    checkpoint_path: where an interrupted run leaves its state (None: not saved); checkpoint_every > 0 also
    saves every k steps. resume_from: a checkpoint; its settings replace the arguments above, and cond /
    uncond must be the same embeddings. stop_after: stop (as if cancelled) before that 0-based step.
    keep_final_checkpoint: also save the finished latents (step = total) so a caller whose next stage (VAE
    decoding) is interrupted can resume straight to it; the caller removes the file when done.
    """
    cond = _as_batch(cond, "cond")
    uncond = _as_batch(uncond, "uncond")
    if uncond is not None and uncond.shape != cond.shape:
        raise ValueError(f"negative-prompt embeddings {tuple(uncond.shape)} do not match prompt embeddings {tuple(cond.shape)}")
    num_segments = cond.shape[1]
    latent_frames = latent_frames_for_segments(num_segments)
    frame_shape = _latent_layout(model, config, num_segments)
    try:
        param = next(model.parameters())
        device, model_dtype = param.device, param.dtype
    except StopIteration:
        device, model_dtype = cond.device, cond.dtype
    emb_fp = tensor_fingerprint(cond, uncond)
    model_fp = model_fingerprint(model)

    start_step, old_x0, x = 0, None, None
    if resume_from is not None:
        tensors, meta = load_checkpoint(resume_from)
        settings = SamplerSettings(**meta["settings"])
        if meta["latent_shape"] != [1, latent_frames, *frame_shape]:
            raise ValueError(
                f"checkpoint {resume_from} holds latents of shape {meta['latent_shape']}, but this model and "
                f"{num_segments}-segment storyboard need {[1, latent_frames, *frame_shape]}"
            )
        if meta["embedding_fingerprint"] != emb_fp:
            raise ValueError(
                f"checkpoint {resume_from} was made with different text embeddings (another storyboard, "
                f"negative prompts or text encoder); resume needs the same ones"
            )
        if meta.get("model_fingerprint") not in (None, model_fp):
            raise ValueError(f"checkpoint {resume_from} was made with other model weights; resume needs the same model")
        start_step = int(meta["step"])
        x = tensors["latents"].to(device)
        old_x0 = tensors["old_x0"].to(device) if "old_x0" in tensors else None
    else:
        seeds = list(segment_seeds) if segment_seeds is not None else resolve_segment_seeds(num_segments, seed)
        if len(seeds) != num_segments:
            raise ValueError(f"{len(seeds)} segment seeds given for a {num_segments}-segment storyboard")
        settings = SamplerSettings(
            steps=int(steps), scheduler=scheduler, guidance=float(guidance), guidance_mode=guidance_mode,
            seed=int(seed), segment_seeds=[int(s) for s in seeds], cfg_mode=cfg_mode,
            scheduler_config=dict(COGVIDEOX_SCHEDULER_CONFIG, **{k: v for k, v in (scheduler_config or {}).items() if not k.startswith("_")}),
        )
    settings.validate()
    if len(settings.segment_seeds) != num_segments:
        raise ValueError(f"checkpoint has {len(settings.segment_seeds)} segment seeds for a {num_segments}-segment storyboard")

    sched = make_scheduler(settings.scheduler, settings.scheduler_config)
    sched.set_timesteps(settings.steps)
    timesteps = [int(t) for t in sched.timesteps]
    n = len(timesteps)
    if x is None:
        x = segment_noise(frame_shape, settings.segment_seeds, 0).to(device)
    use_cfg = uncond is not None
    cfg_batched = settings.cfg_mode != "sequential"
    cond_d = cond.to(device=device, dtype=model_dtype)
    uncond_d = uncond.to(device=device, dtype=model_dtype) if use_cfg else None

    def save_state(step: int, latents: torch.Tensor, prev_x0: torch.Tensor | None, reason: str) -> str | None:
        if checkpoint_path is None or step == 0:  # nothing done yet: nothing worth keeping
            return None
        tensors = {"latents": latents.float()}
        if prev_x0 is not None:
            tensors["old_x0"] = prev_x0.float()
        meta = {
            "format": CHECKPOINT_FORMAT,
            "step": step,
            "total_steps": n,
            "reason": reason,
            "settings": asdict(settings),
            "latent_shape": [1, latent_frames, *frame_shape],
            "num_segments": num_segments,
            "embedding_fingerprint": emb_fp,
            "model_fingerprint": model_fp,
            "model_dtype": str(model_dtype),
            "saved_at": time.strftime("%Y-%m-%d %H:%M:%S"),
            "extra": checkpoint_extra or {},
        }
        return save_checkpoint(checkpoint_path, tensors, meta)

    def predict_v(x_in: torch.Tensor, t: int, w: float) -> torch.Tensor:
        nonlocal cfg_batched
        xm = x_in.to(model_dtype)
        if not use_cfg or w == 1.0:  # w = 1 is the conditional prediction alone
            return _call_model(model, xm, cond_d, torch.full((1,), t, device=device, dtype=torch.long)).float()
        if cfg_batched:
            try:
                out = _call_model(model, torch.cat([xm, xm]), torch.cat([uncond_d, cond_d]),
                                  torch.full((2,), t, device=device, dtype=torch.long)).float()
                v_u, v_c = out.chunk(2)
                return v_u + w * (v_c - v_u)
            except RuntimeError as e:
                # Batched CFG did not fit: fall back to two passes for the rest of the run.
                if settings.cfg_mode != "auto" or not _is_oom(e):
                    raise
                cfg_batched = False
                settings.cfg_mode = "sequential"
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        tt = torch.full((1,), t, device=device, dtype=torch.long)
        v_u = _call_model(model, xm, uncond_d, tt).float()
        v_c = _call_model(model, xm, cond_d, tt).float()
        return v_u + w * (v_c - v_u)

    t0 = time.perf_counter()
    i = start_step
    try:
        for i in range(start_step, n):
            if stop_after is not None and i >= stop_after:
                raise _CancelRequested()
            if cancel is not None and cancel():
                raise _CancelRequested()
            t = timesteps[i]
            prev_t = timesteps[i + 1] if i + 1 < n else -1
            w = guidance_scale(settings.guidance_mode, settings.guidance, i, n, t)
            v = predict_v(x, t, w)
            if settings.scheduler == "ddim":
                x_new, x0 = ddim_step(sched, v, x, t, prev_t)
            else:
                noise = segment_noise(frame_shape, settings.segment_seeds, i + 1).to(device)
                back_t = timesteps[i - 1] if i > 0 else None
                x_new, x0 = dpmpp_2m_step(sched, v, x, old_x0, t, prev_t, back_t, noise)
            x, old_x0 = x_new.float(), x0.float()
            if checkpoint_every and (i + 1) % checkpoint_every == 0 and i + 1 < n:
                save_state(i + 1, x, old_x0, "periodic")
            if callback is not None:
                callback(StepInfo(step=i + 1, total=n, timestep=t, guidance=w, latents=x, denoised=x0,
                                  segment=i % num_segments, num_segments=num_segments,
                                  elapsed_s=time.perf_counter() - t0))
    except (_CancelRequested, KeyboardInterrupt) as e:
        path = save_state(i, x, old_x0, "interrupted")
        where = f"; resumable checkpoint: {path}" if path else ""
        raise SamplingInterrupted(f"sampling stopped before step {i + 1} of {n}{where}", path, i, n) from e
    except BaseException as e:
        # A cancel callback that raises (ComfyUI's interrupt) or a real error: keep the state, re-raise as is.
        path = save_state(i, x, old_x0, f"{type(e).__name__}")
        if path is not None and hasattr(e, "add_note"):
            e.add_note(f"ttt-video: sampling state before step {i + 1} of {n} saved to {path} (resume from it)")
        if path is not None:
            try:
                e.ttt_checkpoint_path = path  # type: ignore[attr-defined]
            except Exception:
                pass
        raise
    if keep_final_checkpoint and start_step < n:
        save_state(n, x, old_x0, "complete")
    return x

