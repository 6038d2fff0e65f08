"""Segment Decoder: CogVideoX VAE latents -> frames streamed into an mp4 (PyAV, h264, yuv420p).

Input: ``latents [1, F_lat, C, h, w]`` in the layout of the DiT / sampler (frames before channels).
By default (``latents_scaled=True``) they are in the sampler's space, i.e. VAE latents multiplied by
``vae.config.scaling_factor`` (0.7 for CogVideoX-5B), and are divided by it here, as diffusers'
``CogVideoXPipeline.decode_latents`` does. Pass ``latents_scaled=False`` for raw VAE latents.

Streaming without seams: diffusers' ``AutoencoderKLCogVideoX.decode`` itself never decodes the whole
video at once; it walks the latent frames in chunks of two (the first chunk takes the odd frame: 3, then
2, 2, ...) and carries each causal temporal convolution's last frames from chunk to chunk
(``conv_cache``). We run exactly that loop here, but hand the frames of each chunk to the mp4 encoder
as soon as they exist, so the result equals a whole-video ``vae.decode`` (same chunks, same caches: bit
for bit on one machine) while only one chunk of pixels is in memory. No overlap or re-decoding of
earlier latent frames is needed: the conv cache *is* the temporal context. Segment boundaries (13 latent
frames, then 12 per segment, from ``geometry``) fall on chunk boundaries, so progress is reported per
segment: segment 0 gives 49 frames, every later one 48, ``1 + 4 (F_lat - 1)`` in all.

Tiling (``tiling=True``) splits each chunk spatially with the VAE's own tile sizes and blending
(``tile_latent_min_*``, ``tile_overlap_factor_*``, ``blend_v`` / ``blend_h``), each tile with its own
conv cache; blending is per frame, so this equals ``vae.enable_tiling(); vae.decode(z)``.

Frames are written to a temporary file next to ``out_path`` and moved into place (``os.replace``) only
when complete; an existing file is never replaced unless ``overwrite=True``.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable, Iterator

import torch

from .geometry import (
    FPS,
    LATER_SEGMENT_LATENT_FRAMES,
    latent_frames_for_segments,
    pixel_frames_for_latent_frames,
    segments_for_latent_frames,
)


@dataclass
class DecodeInfo:
    """What ``decode_to_mp4`` produced. ``frames`` is the IMAGE batch [N, H, W, 3] (float32 in [0, 1],
    ComfyUI's layout) when asked for, else None."""

    path: str | None
    num_frames: int
    width: int
    height: int
    fps: int
    duration_s: float
    latent_frames: int
    num_segments: int
    frames: torch.Tensor | None = None

    def summary(self) -> str:
        where = f" -> {self.path}" if self.path else ""
        return (
            f"{self.num_frames} frames ({self.latent_frames} latent frames, {self.num_segments} segment(s)), "
            f"{self.width}x{self.height} at {self.fps} fps, {self.duration_s:.2f} s{where}"
        )


def expected_pixel_frames(latent_frames: int) -> int:
    """Frames the CogVideoX VAE makes from ``latent_frames`` (odd) latent frames: 1 + 4 (F - 1)."""
    return pixel_frames_for_latent_frames(latent_frames)


def _chunk_plan(num_frames: int, batch: int) -> list[tuple[int, int]]:
    """The latent-frame chunks of diffusers' ``AutoencoderKLCogVideoX._decode`` (first one takes the
    remainder), so that our streamed decode runs the identical computation."""
    num_batches = max(num_frames // batch, 1)
    rem = num_frames % batch
    return [(batch * i + (0 if i == 0 else rem), min(batch * (i + 1) + rem, num_frames)) for i in range(num_batches)]


def _segment_ends(num_frames: int) -> list[int]:
    """Latent-frame end of each progress unit: the TTT segments when ``num_frames`` is 13 + 12 k,
    otherwise one unit per 12 frames (the chunks still decode identically)."""
    try:
        n = segments_for_latent_frames(num_frames)
        return [latent_frames_for_segments(s + 1) for s in range(n)]
    except ValueError:
        ends = list(range(LATER_SEGMENT_LATENT_FRAMES + 1, num_frames, LATER_SEGMENT_LATENT_FRAMES))
        return ends + [num_frames]


def _validate_latents(vae, latents: torch.Tensor) -> None:
    if latents.ndim != 5:
        raise ValueError(f"latents must be [1, F_lat, C, h, w], got shape {tuple(latents.shape)}")
    b, f, c, h, w = latents.shape
    if b != 1:
        raise ValueError(f"decode one video at a time (batch 1), got batch {b}")
    want_c = vae.config.latent_channels
    if c != want_c:
        raise ValueError(
            f"latents have {c} channels but the VAE expects {want_c} (layout is [1, F_lat, C, h, w]; "
            f"got shape {tuple(latents.shape)})"
        )
    if f < 1 or f % 2 == 0:
        raise ValueError(
            f"{f} latent frames: the CogVideoX VAE decodes an odd number (1 + 4 (F - 1) frames; a TTT video "
            f"has 13 + 12 k)"
        )


@torch.no_grad()
def iter_decoded_segments(
    vae, latents: torch.Tensor, *, tiling: bool = False, latents_scaled: bool = True
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield ``(segment_index, frames [n, H, W, 3] float32 in [0, 1] on the CPU)`` in order, decoding
    chunk by chunk with the conv cache carried across chunks (see the module docstring)."""
    _validate_latents(vae, latents)
    param = next(vae.parameters())
    z = latents.to(device=param.device, dtype=param.dtype).permute(0, 2, 1, 3, 4)  # [1, C, F, h, w]
    if latents_scaled:
        z = z / vae.config.scaling_factor
    num_frames, h, w = z.shape[2], z.shape[3], z.shape[4]
    chunks = _chunk_plan(num_frames, getattr(vae, "num_latent_frames_batch_size", 2))
    use_tiles = tiling and (w > vae.tile_latent_min_width or h > vae.tile_latent_min_height)
    decode_chunk = _TiledChunkDecoder(vae, h, w) if use_tiles else _ChunkDecoder(vae)

    ends = _segment_ends(num_frames)
    seg, pending = 0, []
    for lo, hi in chunks:
        x = decode_chunk(z[:, :, lo:hi])  # [1, 3, n, H, W] in [-1, 1]
        pending.append((x[0].float() / 2 + 0.5).clamp_(0, 1).permute(1, 2, 3, 0).cpu())
        if hi >= ends[seg]:
            yield seg, torch.cat(pending) if len(pending) > 1 else pending[0]
            seg, pending = seg + 1, []
    if pending:  # pragma: no cover - chunks always end on the last unit end
        yield seg, torch.cat(pending)


class _ChunkDecoder:
    def __init__(self, vae):
        self.vae = vae
        self.cache = None

    def __call__(self, z):
        if self.vae.post_quant_conv is not None:
            z = self.vae.post_quant_conv(z)
        x, self.cache = self.vae.decoder(z, conv_cache=self.cache)
        return x


class _TiledChunkDecoder:
    """diffusers' ``tiled_decode`` for one temporal chunk, with one conv cache per spatial tile.

    Tile positions, sizes and blending follow diffusers. One deviation: the pixel stride and blend width
    are derived from the latent stride (``stride_px = overlap_latent * 8``, ``blend = tile_px -
    stride_px``); for CogVideoX's 720x480 tiles these equal diffusers' numbers, but for tile sizes where
    diffusers' two roundings disagree (e.g. the tiny 64x96 VAE) its output comes out larger than the
    video and its blends misaligned, while ours stays exact."""

    def __init__(self, vae, height: int, width: int):
        self.vae = vae
        scale = 2 ** (len(vae.config.block_out_channels) - 1)
        self.tile_h, self.tile_w = vae.tile_latent_min_height, vae.tile_latent_min_width
        step_h = max(1, int(self.tile_h * (1 - vae.tile_overlap_factor_height)))
        step_w = max(1, int(self.tile_w * (1 - vae.tile_overlap_factor_width)))
        self.limit_h, self.limit_w = step_h * scale, step_w * scale
        self.blend_h = self.tile_h * scale - self.limit_h
        self.blend_w = self.tile_w * scale - self.limit_w
        self.rows = list(range(0, height, step_h))
        self.cols = list(range(0, width, step_w))
        self.caches: dict[tuple[int, int], object] = {}

    def __call__(self, z):
        vae = self.vae
        rows = []
        for i in self.rows:
            row = []
            for j in self.cols:
                tile = z[:, :, :, i : i + self.tile_h, j : j + self.tile_w]
                if vae.post_quant_conv is not None:
                    tile = vae.post_quant_conv(tile)
                tile, self.caches[(i, j)] = vae.decoder(tile, conv_cache=self.caches.get((i, j)))
                row.append(tile)
            rows.append(row)
        out_rows = []
        for a, row in enumerate(rows):
            out_row = []
            for b, tile in enumerate(row):
                if a > 0:
                    tile = vae.blend_v(rows[a - 1][b], tile, self.blend_h)
                if b > 0:
                    tile = vae.blend_h(row[b - 1], tile, self.blend_w)
                out_row.append(tile[:, :, :, : self.limit_h, : self.limit_w])
            out_rows.append(torch.cat(out_row, dim=4))
        return torch.cat(out_rows, dim=3)


def decode_to_mp4(
    vae,
    latents: torch.Tensor,
    out_path: str | os.PathLike | None,
    fps: int = FPS,
    tiling: bool = False,
    return_frames: bool = False,
    progress: Callable[[int, int], None] | None = None,
    overwrite: bool = False,
    *,
    latents_scaled: bool = True,
    crf: int = 18,
) -> DecodeInfo:
    """Decode ``latents [1, F_lat, C, h, w]`` segment by segment and stream the frames into an h264 mp4.

    - ``vae``: a diffusers ``AutoencoderKLCogVideoX`` (any device / dtype; latents are moved to it).
    - ``out_path``: the mp4 to write (parent folders are created); None to only return frames.
    - ``progress(done_segments, total_segments)`` is called after each segment; an exception raised
      there (e.g. a user interrupt) stops decoding and leaves no partial file.
    - ``overwrite``: replace an existing file (otherwise FileExistsError before any work).
    - ``return_frames``: also return the IMAGE batch ``[N, H, W, 3]`` float32 in [0, 1] (this holds
      every frame in memory: 1,009 x 480 x 720 x 3 floats is 4.2 GB).
    - ``crf``: x264 quality (lower is better; 18 is visually lossless for most content).

    Returns :class:`DecodeInfo` (frame count = 1 + 4 (F_lat - 1), size, fps, duration)."""
    _validate_latents(vae, latents)
    if out_path is None and not return_frames:
        raise ValueError("nothing to do: give out_path and/or return_frames=True")
    f_lat, h_lat, w_lat = latents.shape[1], latents.shape[3], latents.shape[4]
    scale = 2 ** (len(vae.config.block_out_channels) - 1)
    height, width = h_lat * scale, w_lat * scale
    num_frames = expected_pixel_frames(f_lat)
    ends = _segment_ends(f_lat)
    path = os.fspath(out_path) if out_path is not None else None
    if path is not None:
        if os.path.exists(path) and not overwrite:
            raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
        if height % 2 or width % 2:
            raise ValueError(f"h264 yuv420p needs even frame sizes, got {width}x{height}")

    images = torch.empty(num_frames, height, width, 3, dtype=torch.float32) if return_frames else None
    writer = _Mp4Writer(path, width, height, fps, crf) if path is not None else None
    written = 0
    try:
        for seg, frames in iter_decoded_segments(vae, latents, tiling=tiling, latents_scaled=latents_scaled):
            n = frames.shape[0]
            if frames.shape[1:3] != (height, width):
                raise RuntimeError(f"VAE produced {frames.shape[2]}x{frames.shape[1]} frames, expected {width}x{height}")
            if images is not None:
                images[written : written + n] = frames
            if writer is not None:
                writer.write(frames)
            written += n
            if progress is not None:
                progress(seg + 1, len(ends))
        if written != num_frames:
            raise RuntimeError(f"decoded {written} frames, expected 1 + 4 x ({f_lat} - 1) = {num_frames}")
        if writer is not None:
            if os.path.exists(path) and not overwrite:  # appeared while we were decoding
                raise FileExistsError(f"{path} appeared while decoding; not replacing it (overwrite=False)")
            writer.close(path)
            writer = None
    finally:
        if writer is not None:
            writer.abort()
    return DecodeInfo(
        path=path,
        num_frames=num_frames,
        width=width,
        height=height,
        fps=int(fps),
        duration_s=num_frames / fps,
        latent_frames=f_lat,
        num_segments=len(ends),
        frames=images,
    )


class _Mp4Writer:
    """h264 / yuv420p mp4 via PyAV into a temporary file in the target folder; ``close`` moves it into
    place atomically, ``abort`` deletes it."""

    def __init__(self, path: str, width: int, height: int, fps: int, crf: int):
        import av

        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        # A fresh name (not mkstemp, whose 0600 mode would stick to the final video).
        self.tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.{uuid.uuid4().hex[:8]}.part")
        try:
            self.container = av.open(self.tmp, mode="w", format="mp4")
            codec = "libx264" if "libx264" in av.codecs_available else "h264"
            self.stream = self.container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
            self.stream.width, self.stream.height = width, height
            self.stream.pix_fmt = "yuv420p"
            if codec == "libx264":
                self.stream.options = {"crf": str(crf), "preset": "medium"}
        except BaseException:
            if os.path.exists(self.tmp):
                os.unlink(self.tmp)
            raise
        self._av = av

    def write(self, frames: torch.Tensor) -> None:
        arr = (frames * 255).round_().to(torch.uint8).numpy()
        for img in arr:
            frame = self._av.VideoFrame.from_ndarray(img, format="rgb24")
            for packet in self.stream.encode(frame):
                self.container.mux(packet)

    def close(self, path: str) -> None:
        for packet in self.stream.encode(None):
            self.container.mux(packet)
        self.container.close()
        os.replace(self.tmp, path)

    def abort(self) -> None:
        try:
            self.container.close()
        except Exception:
            pass
        if os.path.exists(self.tmp):
            os.unlink(self.tmp)


__all__ = ["DecodeInfo", "decode_to_mp4", "expected_pixel_frames", "iter_decoded_segments"]
