"""Segment Decoder node: TTT_LATENTS -> mp4 in ComfyUI's output folder (+ IMAGE batch when asked)."""

from __future__ import annotations

import re
from pathlib import Path

from . import _comfy

log = _comfy.log


def next_output_path(prefix: str, ext: str = ".mp4") -> tuple[Path, str]:
    """output/<prefix>_00001.mp4 with the first free counter; returns (path, subfolder)."""
    prefix = prefix.strip().replace("\\", "/") or "ttt_video/video"
    if prefix.startswith("/") or ".." in prefix.split("/"):
        raise ValueError(f"filename_prefix {prefix!r} must stay inside ComfyUI's output folder")
    out_root = _comfy.output_directory()
    folder = (out_root / prefix).parent
    stem = Path(prefix).name
    folder.mkdir(parents=True, exist_ok=True)
    pattern = re.compile(re.escape(stem) + r"_(\d{5})" + re.escape(ext) + "$")
    used = [int(m.group(1)) for p in folder.iterdir() if (m := pattern.match(p.name))]
    counter = max(used, default=0) + 1
    return folder / f"{stem}_{counter:05d}{ext}", folder.relative_to(out_root).as_posix()


def read_first_frame(path: str):
    """[1, H, W, 3] float in [0, 1] (ComfyUI IMAGE) of the mp4's first frame."""
    import av
    import numpy as np
    import torch

    with av.open(path) as container:
        frame = next(container.decode(video=0)).to_ndarray(format="rgb24")
    return torch.from_numpy(np.ascontiguousarray(frame)).float().div(255).unsqueeze(0)


def frames_to_image_batch(frames):
    """Decoded frames -> ComfyUI IMAGE [N, H, W, 3] float32 in [0, 1]."""
    import numpy as np
    import torch

    t = frames if isinstance(frames, torch.Tensor) else torch.from_numpy(np.asarray(frames))
    if t.dim() == 5:  # [B, F, ...]
        t = t[0]
    if t.shape[-1] != 3 and t.shape[1] == 3:  # [F, 3, H, W]
        t = t.permute(0, 2, 3, 1)
    if t.dtype == torch.uint8:
        return t.float().div(255).contiguous()
    t = t.float()
    if t.min() < 0:  # [-1, 1]
        t = (t + 1) / 2
    return t.clamp(0, 1).contiguous()


class TTTSegmentDecoder:
    """Decodes the latents segment by segment with the CogVideoX VAE, streaming frames into an mp4."""

    CATEGORY = "TTT Video"
    FUNCTION = "decode"
    OUTPUT_NODE = True
    RETURN_TYPES = ("STRING", "IMAGE", "INT", "STRING")
    RETURN_NAMES = ("video_path", "images", "frame_count", "info")
    OUTPUT_TOOLTIPS = (
        "the mp4 written to ComfyUI's output folder (h264, 16 fps)",
        "all frames when return_images is on (for ComfyUI's video nodes / VideoHelperSuite), else only the first frame",
        "frames = 1 + 4 x (latent frames - 1): 49 for 3 s, 1,009 for 63 s",
        "frame count, size, fps",
    )
    DESCRIPTION = "Decode the One-Minute Sampler's latents into an mp4 (16 fps), segment by segment."

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("TTT_MODEL", {"tooltip": "the same model bundle the sampler used (its VAE decodes)"}),
                "latents": ("TTT_LATENTS", {"tooltip": "from One-Minute Sampler"}),
                "filename_prefix": ("STRING", {"default": "ttt_video/video",
                                               "tooltip": "output/<prefix>_00001.mp4; existing files are never replaced"}),
                "return_images": ("BOOLEAN", {"default": False,
                                              "tooltip": "also return every frame as an IMAGE batch (a minute at 720x480 is "
                                                         "about 4 GB of float32)"}),
                "vae_tiling": ("BOOLEAN", {"default": False, "tooltip": "decode in spatial tiles (less GPU memory)"}),
            }
        }

    def decode(self, model, latents, filename_prefix, return_images, vae_tiling):
        from ..ttt_core import pipeline
        from ..ttt_core.geometry import FPS, pixel_frames_for_latent_frames

        lat = latents["latents"]
        path, subfolder = next_output_path(filename_prefix)
        bar = _comfy.progress_bar(latents["num_segments"])
        interrupted = _comfy.interrupt_check()

        def progress(stage, done, total, detail=None):
            if bar is not None and stage == "decode":
                bar.update_absolute(done, total)
            if interrupted is not None:
                interrupted()  # cancel between segments; decode_to_mp4 then leaves no partial file

        decoded = pipeline.decode_latents(model, lat, str(path), tiling=vae_tiling, return_frames=return_images,
                                          progress=progress)
        frames = pipeline.frames_of(decoded) if return_images else None
        images = frames_to_image_batch(frames) if frames is not None else read_first_frame(str(path))
        f_lat = lat.shape[1]
        n = pixel_frames_for_latent_frames(f_lat)
        h, w = lat.shape[-2] * 8, lat.shape[-1] * 8
        info = (f"{path.name}: {n} frames = 1 + 4 x ({f_lat} - 1) latent frames, {w}x{h}, {FPS} fps, "
                f"{n / FPS:.2f} s ({latents['num_segments']} segments)")
        if getattr(model, "is_embedded_default", False):
            info += " -- embedded default model: the toy cat-and-mouse world only (docs/toyworld.md)"
        log.info("wrote %s (%s)", path, info)
        return {"ui": {"text": [info]}, "result": (str(path), images, n, info)}
