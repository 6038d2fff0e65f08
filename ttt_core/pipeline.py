"""Storyboard -> one-minute mp4: the whole job, shared by the ``ttt-video`` CLI and the ComfyUI nodes.

    storyboard -> validate (token budget, segment count) -> per-segment text embeddings (cached on disk;
    the encoder is freed afterwards) -> One-Minute Sampler (sampling.py) -> VAE, segment by segment -> mp4

Models come as a :class:`ModelBundle`: the TTT-DiT plus where its text encoder, VAE and scheduler config
live. ``load_model_bundle(None)`` is the embedded default in ``models/embedded-default/``: a small TTT-DiT
trained on the procedural cat-and-mouse toy world (docs/toyworld.md); it draws that world only.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from . import sampling
from .storyboard import Segment, Storyboard, StoryboardError, load_storyboard, parse_storyboard, validate

PACKAGE_ROOT = Path(__file__).resolve().parents[1]
EMBEDDED_DEFAULT_DIR = PACKAGE_ROOT / "models" / "embedded-default"
EMBEDDED_DEFAULT_NAME = "embedded default"
EMBEDDED_DEFAULT_NOTE = (
    "the embedded default model is a small TTT-DiT (3.3 M parameters) trained on the toy cat-and-mouse world "
    "(docs/toyworld.md, docs/results.md): it draws that world only, as coarse blocks, from storyboards in its "
    "vocabulary (storyboards/one_minute.txt). Bring a fine-tuned CogVideoX/TTT model for real videos."
)

ProgressFn = Callable[[str, int, int, Any], None]  # (stage, done, total, detail)


class PipelineError(RuntimeError):
    """A generate() failure with a clear message (missing model files, bad arguments, ...)."""


# --------------------------------------------------------------------------------------------------
# device / dtype
# --------------------------------------------------------------------------------------------------
def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """"auto" (or None) -> cuda if available, else cpu; otherwise the named device, checked (the one place
    for this rule: generate, prepare and train-vae all take --device)."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"device {device!r}: use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but torch sees no CUDA device")
    return dev


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16, "float64": torch.float64}


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise PipelineError(f"unknown dtype {dtype!r}; choose auto, {', '.join(sorted(_DTYPES))}")
    return _DTYPES[dtype]


# --------------------------------------------------------------------------------------------------
# model bundle
# --------------------------------------------------------------------------------------------------
@dataclass
class ModelBundle:
    """A loaded TTT-DiT and where its companions live (what the Model Loader node passes on)."""

    transformer: torch.nn.Module
    name: str
    text_encoder_root: str | None  # folder with tokenizer/ + text_encoder/
    vae_root: str | None  # folder with vae/ (or a vae folder itself)
    scheduler_config: dict[str, Any] = field(default_factory=dict)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32
    offload: bool = False
    is_embedded_default: bool = False
    cache_dir: str | None = None
    _vae: Any = None

    @property
    def config(self):
        return self.transformer.config

    def describe(self) -> str:
        cfg = self.config
        text = (f"{self.name}: {cfg.num_layers} layers, width {cfg.width}, {cfg.global_layer}, "
                f"{cfg.sample_width * 8}x{cfg.sample_height * 8} px, {self.device}/{str(self.dtype).replace('torch.', '')}")
        return text + (f" -- NOTE: {EMBEDDED_DEFAULT_NOTE}" if self.is_embedded_default else "")

    def text_encoder(self):
        from .text_encoder import SegmentTextEncoder

        if self.text_encoder_root is None:
            raise PipelineError(
                f"model {self.name!r} has no text encoder: give a CogVideoX folder (tokenizer/ + text_encoder/) "
                "with --text-encoder (CLI) or the text encoder input (ComfyUI)"
            )
        dtype = self.dtype if self.device.type == "cuda" else torch.float32
        return SegmentTextEncoder.from_pretrained(self.text_encoder_root, self.device, dtype)

    @property
    def vae_dtype(self) -> torch.dtype:
        return self.dtype if self.device.type == "cuda" else torch.float32

    def vae(self):
        if self._vae is None:
            from diffusers import AutoencoderKLCogVideoX

            if self.vae_root is None:
                raise PipelineError(f"model {self.name!r} has no VAE: give a CogVideoX folder with vae/ (--vae)")
            root = Path(self.vae_root)
            folder = root / "vae" if (root / "vae").is_dir() else root
            if not (folder / "config.json").is_file():
                raise PipelineError(f"no CogVideoX VAE in {root} (expected {folder / 'config.json'})")
            # low_cpu_mem_usage=False: without `accelerate` diffusers would warn on every load; the dtype is
            # chosen at load time (diffusers warns about casting a loaded VAE).
            self._vae = AutoencoderKLCogVideoX.from_pretrained(
                str(folder), use_safetensors=True, low_cpu_mem_usage=False, torch_dtype=self.vae_dtype).eval()
            self._vae.requires_grad_(False)
        return self._vae


def _is_cogvideox_folder(path: Path) -> bool:
    return path.is_dir() and ((path / "model_index.json").is_file() or (path / "transformer").is_dir())


def _read_scheduler_config(root: Path | None) -> dict[str, Any]:
    if root is None:
        return {}
    f = root / "scheduler" / "scheduler_config.json"
    if not f.is_file():
        return {}
    with open(f, encoding="utf-8") as fh:
        return {k: v for k, v in json.load(fh).items() if not k.startswith("_")}


def load_model_bundle(
    model: str | os.PathLike | None = None,
    ttt_weights: str | os.PathLike | None = None,
    *,
    text_encoder: str | os.PathLike | None = None,
    vae: str | os.PathLike | None = None,
    device: str | torch.device | None = "auto",
    dtype: str | torch.dtype | None = "auto",
    offload: bool = False,
    cache_dir: str | None = None,
) -> ModelBundle:
    """Load a TTT-DiT with its companions.

    model: None or "embedded default" (the bundled tiny model); a CogVideoX-style folder (model_index.json
    or transformer/, plus tokenizer/, text_encoder/, vae/, scheduler/); or a single transformer file
    (safetensors; then text_encoder / vae must name CogVideoX folders). ttt_weights: TTT layers to load
    on top (a diffusers CogVideoX-5B plus our fine-tuned TTT weights). offload keeps the model on the CPU
    and moves it to the device only while it runs.
    """
    from .loading import load_ttt_dit

    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    embedded = model is None or str(model).strip().lower() in (EMBEDDED_DEFAULT_NAME, "embedded-default", "embedded_default", "")
    root: Path | None
    if embedded:
        root = EMBEDDED_DEFAULT_DIR
        if not (root / "transformer").is_dir():
            raise PipelineError(
                f"the embedded default model is missing ({root / 'transformer'}); rebuild it with "
                "`python scripts/make_embedded_default.py` (and scripts/build_embedded_assets.py)"
            )
        source: Path = root
        name = EMBEDDED_DEFAULT_NAME
    else:
        path = Path(model).expanduser()
        if not path.exists():
            raise PipelineError(f"model {path} does not exist")
        if path.is_dir() and not _is_cogvideox_folder(path) and not any(path.glob("*.safetensors")):
            raise PipelineError(
                f"{path} is neither a CogVideoX folder (model_index.json or transformer/) nor a folder with a "
                "transformer config.json + safetensors"
            )
        root = path if _is_cogvideox_folder(path) else None
        source = path
        name = path.name
    try:
        transformer = load_ttt_dit(str(source), ttt_weights=str(ttt_weights) if ttt_weights else None)
    except (FileNotFoundError, ValueError, KeyError) as e:
        raise PipelineError(f"could not load the TTT-DiT from {source}: {e}") from e
    transformer.eval().requires_grad_(False)
    transformer.to(dtype=dt, device=torch.device("cpu") if offload else dev)

    te_root = str(text_encoder) if text_encoder else (str(root) if root is not None and (root / "text_encoder").is_dir() else None)
    vae_root = str(vae) if vae else (str(root) if root is not None and (root / "vae").is_dir() else None)
    return ModelBundle(
        transformer=transformer,
        name=name + (f" + {Path(ttt_weights).name}" if ttt_weights else ""),
        text_encoder_root=te_root,
        vae_root=vae_root,
        scheduler_config=_read_scheduler_config(root),
        device=dev,
        dtype=dt,
        offload=offload,
        is_embedded_default=embedded and not ttt_weights,
        cache_dir=cache_dir,
    )


# --------------------------------------------------------------------------------------------------
# storyboard + text
# --------------------------------------------------------------------------------------------------
def as_storyboard(storyboard: Storyboard | str | os.PathLike) -> Storyboard:
    """A Storyboard from an object, a file path, or storyboard text (Format 3 / JSON)."""
    if isinstance(storyboard, Storyboard):
        return storyboard
    if isinstance(storyboard, os.PathLike) or (isinstance(storyboard, str) and "\n" not in storyboard and (
            os.path.isfile(storyboard) or os.path.splitext(storyboard)[1].lower() in (".txt", ".json", ".jsonl"))):
        return load_storyboard(storyboard)
    if isinstance(storyboard, str):
        return parse_storyboard(storyboard)
    raise TypeError(f"storyboard must be a Storyboard, a file path or text, got {type(storyboard).__name__}")


def storyboard_to_dict(sb: Storyboard) -> dict[str, Any]:
    return {
        "segments": [{"text": s.text, "neg_text": s.neg_text, "requires_scene_transition": s.requires_scene_transition}
                     for s in sb.segments],
        "negative_prompt": sb.negative_prompt,
        "source": sb.source,
    }


def storyboard_from_dict(data: dict[str, Any]) -> Storyboard:
    return Storyboard(
        segments=[Segment(text=s["text"], neg_text=s.get("neg_text"), requires_scene_transition=bool(s.get("requires_scene_transition")))
                  for s in data["segments"]],
        negative_prompt=data.get("negative_prompt"),
        source=data.get("source", "<checkpoint>"),
    )


def check_storyboard(bundle: ModelBundle, sb: Storyboard, encoder=None) -> list[str]:
    """validate() against the model: token budget per segment and trained segment count. Returns warnings."""
    cfg = bundle.config
    counter = getattr(encoder, "count_tokens", None) if encoder is not None else None
    return validate(sb, token_counter=counter, max_tokens=cfg.max_text_seq_length if counter else None,
                    max_segments_trained=getattr(cfg, "max_segments_trained", None))


def text_cache_dir(bundle: ModelBundle) -> str | None:
    """Where text embeddings are cached: bundle.cache_dir, else $TTT_VIDEO_CACHE_DIR/text, else
    ~/.cache/ttt-video/text. "off" (either place) disables the cache."""
    root = bundle.cache_dir or os.environ.get("TTT_VIDEO_CACHE_DIR")
    if root and root.lower() == "off":
        return None
    if bundle.cache_dir:
        return bundle.cache_dir
    base = Path(root) if root else Path.home() / ".cache" / "ttt-video"
    return str(base / "text")


def encode_storyboard(bundle: ModelBundle, sb: Storyboard, *, use_negative: bool = True,
                      progress: ProgressFn | None = None) -> tuple[torch.Tensor, torch.Tensor | None, list[str]]:
    """Per-segment prompt (and negative prompt) embeddings [S, L, dim] on the CPU, plus warnings. The text
    encoder is loaded, checked against the storyboard, used, and freed."""
    encoder = bundle.text_encoder()
    try:
        warnings = check_storyboard(bundle, sb, encoder)
        L = bundle.config.max_text_seq_length
        if progress:
            progress("encode", 0, 1, None)
        cache = text_cache_dir(bundle)
        if cache is not None and hasattr(encoder, "encode_cached"):
            cond = encoder.encode_cached(sb.prompts(), cache, max_length=L, on_overflow="error")
            uncond = encoder.encode_cached(sb.negative_prompts(), cache, max_length=L, on_overflow="error") if use_negative else None
        else:
            cond = encoder.encode(sb.prompts(), max_length=L, on_overflow="error")
            uncond = encoder.encode(sb.negative_prompts(), max_length=L, on_overflow="error") if use_negative else None
        if progress:
            progress("encode", 1, 1, None)
    finally:
        if hasattr(encoder, "free"):
            encoder.free()
        del encoder
        if bundle.device.type == "cuda":
            torch.cuda.empty_cache()
    dim = bundle.config.text_embed_dim
    if cond.shape[-1] != dim:
        raise PipelineError(f"the text encoder gives {cond.shape[-1]}-wide embeddings but the TTT-DiT expects {dim}; "
                            "use the text encoder that belongs to this model")
    return cond.float().cpu(), (uncond.float().cpu() if uncond is not None else None), warnings


# --------------------------------------------------------------------------------------------------
# sampling + decoding
# --------------------------------------------------------------------------------------------------
def default_checkpoint_path(out_path: str | os.PathLike) -> str:
    return os.fspath(out_path) + ".resume.safetensors"


def run_sampler(bundle: ModelBundle, cond, uncond, *, progress: ProgressFn | None = None, **kwargs) -> torch.Tensor:
    """sampling.sample on the bundle's transformer (moved to the device for the run when offloading)."""
    model = bundle.transformer
    if bundle.offload:
        model.to(bundle.device)
    user_cb = kwargs.pop("callback", None)

    def callback(info: sampling.StepInfo):
        if progress:
            progress("sample", info.step, info.total, info)
        if user_cb:
            user_cb(info)

    try:
        return sampling.sample(model, cond, uncond, scheduler_config=kwargs.pop("scheduler_config", None) or bundle.scheduler_config,
                               callback=callback, **kwargs)
    finally:
        if bundle.offload:
            model.to("cpu")
            if bundle.device.type == "cuda":
                torch.cuda.empty_cache()


def decode_latents(bundle: ModelBundle, latents: torch.Tensor, out_path: str, *, tiling: bool = False,
                   overwrite: bool = False, return_frames: bool = False, progress: ProgressFn | None = None):
    """Segment-by-segment VAE decode streamed into an mp4 (decoding.decode_to_mp4)."""
    from .decoding import decode_to_mp4

    vae = bundle.vae()
    vae_device = bundle.device
    vae_dtype = bundle.vae_dtype
    if next(vae.parameters()).dtype != vae_dtype:
        vae.to(dtype=vae_dtype)
    vae.to(device=vae_device)

    def dprog(done, total, *rest):
        if progress:
            progress("decode", done, total, None)

    try:
        return decode_to_mp4(vae, latents.to(device=vae_device, dtype=vae_dtype), out_path, tiling=tiling,
                             return_frames=return_frames, progress=dprog, overwrite=overwrite)
    finally:
        if bundle.offload:
            vae.to("cpu")


def frames_of(decoded):
    """The frames decode_to_mp4 returned with return_frames=True (whatever container it used), or None."""
    if decoded is None:
        return None
    if isinstance(decoded, torch.Tensor):
        return decoded
    for attr in ("frames", "images"):
        if getattr(decoded, attr, None) is not None:
            return getattr(decoded, attr)
    if isinstance(decoded, dict):
        return decoded.get("frames")
    if isinstance(decoded, (tuple, list)):
        for item in decoded:
            if isinstance(item, torch.Tensor):
                return item
    return None


@dataclass
class GenerateResult:
    path: str | None
    num_segments: int
    latent_frames: int
    frames: int
    fps: int
    width: int
    height: int
    duration_s: float
    seconds: dict[str, float]
    warnings: list[str]
    segment_seeds: list[int]
    latents: torch.Tensor | None = None
    images: Any = None

    def summary(self) -> str:
        t = ", ".join(f"{k} {v:.1f} s" for k, v in self.seconds.items())
        return (f"{self.path}: {self.frames} frames ({self.num_segments} segments, {self.latent_frames} latent frames -> "
                f"1 + 4 x ({self.latent_frames} - 1)), {self.width}x{self.height} at {self.fps} fps, "
                f"{self.duration_s:.2f} s of video; {t}")


def generate(
    storyboard: Storyboard | str | os.PathLike | None,
    out_path: str | os.PathLike,
    *,
    model: ModelBundle | str | os.PathLike | None = None,
    ttt_weights: str | os.PathLike | None = None,
    text_encoder: str | os.PathLike | None = None,
    vae: str | os.PathLike | None = None,
    steps: int = sampling.DEFAULT_STEPS,
    seed: int = 0,
    guidance: float = sampling.DEFAULT_GUIDANCE,
    guidance_mode: str = "dynamic",
    scheduler: str = "dpmpp_2m",
    segment_seeds: dict[int, int] | Sequence[int | None] | None = None,
    regenerate: Sequence[int] = (),
    variation_seed: int | None = None,
    use_negative: bool = True,
    cfg_mode: str = "auto",
    device: str | torch.device | None = "auto",
    dtype: str | torch.dtype | None = "auto",
    offload: bool = False,
    vae_tiling: bool = False,
    overwrite: bool = False,
    checkpoint_path: str | None = None,
    checkpoint_every: int = 0,
    resume: str | None = None,
    progress: ProgressFn | None = None,
    cancel: Callable[[], bool] | None = None,
    return_frames: bool = False,
    keep_latents: bool = False,
) -> GenerateResult:
    """Render a storyboard to an mp4. Nothing is written at ``out_path`` unless the whole run succeeds
    (an interrupted sampling run leaves ``checkpoint_path``, default ``<out>.resume.safetensors``).

    resume: a checkpoint from an interrupted run; its storyboard (when ``storyboard`` is None) and sampler
    settings are used, so the result equals the uninterrupted run.
    """
    out_path = os.fspath(out_path)
    if os.path.isdir(out_path):
        raise PipelineError(f"--out {out_path} is a folder; give a file name such as {os.path.join(out_path, 'video.mp4')}")
    if os.path.exists(out_path) and not overwrite:
        raise FileExistsError(f"{out_path} already exists; refusing to overwrite it (pass overwrite=True / --overwrite)")
    out_dir = os.path.dirname(os.path.abspath(out_path))
    if not os.path.isdir(out_dir):
        raise PipelineError(f"the output folder {out_dir} does not exist")

    resume_meta = None
    if resume is not None:
        resume_meta = sampling.read_checkpoint_meta(resume)
    if storyboard is None:
        if resume_meta is None or "storyboard" not in resume_meta.get("extra", {}):
            raise PipelineError("no storyboard given (and no resume checkpoint that holds one)")
        sb = storyboard_from_dict(resume_meta["extra"]["storyboard"])
    else:
        sb = as_storyboard(storyboard)

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    bundle = model if isinstance(model, ModelBundle) else load_model_bundle(
        model, ttt_weights, text_encoder=text_encoder, vae=vae, device=device, dtype=dtype, offload=offload)
    timings["load"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    cond, uncond, warnings = encode_storyboard(bundle, sb, use_negative=use_negative, progress=progress)
    timings["text"] = time.perf_counter() - t0
    if bundle.is_embedded_default:
        warnings = [f"NOTE: {EMBEDDED_DEFAULT_NOTE}"] + warnings

    seeds = resolve_seeds_for(sb.num_segments, seed, segment_seeds, regenerate, variation_seed)
    ckpt = checkpoint_path or default_checkpoint_path(out_path)
    extra = {"storyboard": storyboard_to_dict(sb), "out_path": out_path, "model": bundle.name}
    for key, val in (("model", model), ("ttt_weights", ttt_weights), ("text_encoder", text_encoder), ("vae", vae)):
        if isinstance(val, (str, os.PathLike)):
            extra[f"{key}_path"] = os.path.abspath(os.fspath(val))
    t0 = time.perf_counter()
    latents = run_sampler(
        bundle, cond, uncond, progress=progress, steps=steps, seed=seed, scheduler=scheduler, guidance=guidance,
        guidance_mode=guidance_mode, segment_seeds=seeds, cfg_mode=cfg_mode, cancel=cancel,
        checkpoint_path=ckpt, checkpoint_every=checkpoint_every, checkpoint_extra=extra, resume_from=resume,
        keep_final_checkpoint=True,  # an interrupted decode resumes without sampling again
    )
    timings["sample"] = time.perf_counter() - t0
    if resume_meta is not None:
        seeds = resume_meta["settings"]["segment_seeds"]

    t0 = time.perf_counter()
    decoded = decode_latents(bundle, latents, out_path, tiling=vae_tiling, overwrite=overwrite,
                             return_frames=return_frames, progress=progress)
    timings["decode"] = time.perf_counter() - t0
    # The video is written: the state we kept for it (ours, or the default-named one resumed from) is stale.
    for stale in {ckpt, resume} - {None}:
        if os.path.abspath(stale) in (os.path.abspath(ckpt), os.path.abspath(default_checkpoint_path(out_path))) \
                and os.path.exists(stale):
            os.remove(stale)

    cfg = bundle.config
    geo = cfg.geometry(sb.num_segments)
    images = frames_of(decoded) if return_frames else None
    return GenerateResult(
        path=out_path, num_segments=sb.num_segments, latent_frames=geo.latent_frames, frames=geo.pixel_frames,
        fps=16, width=geo.pixel_width, height=geo.pixel_height, duration_s=geo.duration_s, seconds=timings,
        warnings=warnings, segment_seeds=list(seeds), latents=latents if keep_latents else None, images=images,
    )


def resolve_seeds_for(num_segments: int, seed: int, overrides, regenerate, variation_seed) -> list[int]:
    try:
        return sampling.resolve_segment_seeds(num_segments, seed, overrides, regenerate, variation_seed)
    except ValueError as e:
        raise PipelineError(str(e)) from e


__all__ = [
    "EMBEDDED_DEFAULT_DIR", "EMBEDDED_DEFAULT_NAME", "EMBEDDED_DEFAULT_NOTE", "GenerateResult", "ModelBundle",
    "PipelineError", "StoryboardError", "as_storyboard", "check_storyboard", "decode_latents", "encode_storyboard",
    "generate", "load_model_bundle", "resolve_device", "resolve_dtype", "run_sampler",
]
