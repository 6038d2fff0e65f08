"""mp4 in and out for the toy world (PyAV, no torch): atomic h264 writing, 16 fps sample-and-hold reading."""

from __future__ import annotations

import os
import uuid
from fractions import Fraction
from typing import Iterable

import numpy as np

from ..geometry import FPS

DEFAULT_CRF = 10  # near-lossless: palette colours survive (yuv420p still halves the chroma resolution)


def write_mp4(path, frames: Iterable[np.ndarray], fps: int = FPS, crf: int = DEFAULT_CRF, overwrite: bool = False) -> int:
    """Write uint8 frames ([H, W, 3] each, or batches [n, H, W, 3]) to an h264 / yuv420p mp4 through a
    temporary file that is moved into place when complete. Returns the number of frames written. Refuses
    to replace an existing file unless ``overwrite``."""
    import av

    path = os.fspath(path)
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path} exists (pass overwrite=True / --overwrite to replace it)")
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.{uuid.uuid4().hex[:8]}.part")
    n = 0
    try:
        with av.open(tmp, mode="w", format="mp4") as container:
            stream = None
            for batch in frames:
                batch = np.asarray(batch)
                if batch.ndim == 3:
                    batch = batch[None]
                for img in batch:
                    if stream is None:
                        h, w = img.shape[:2]
                        if h % 2 or w % 2:
                            raise ValueError(f"h264 / yuv420p needs even frame sizes, got {h}x{w}")
                        codec = "libx264" if "libx264" in av.codecs_available else "h264"
                        stream = container.add_stream(codec, rate=Fraction(fps))
                        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
                        if codec == "libx264":
                            stream.options = {"crf": str(crf), "preset": "medium"}
                    frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(img, dtype=np.uint8), format="rgb24")
                    for packet in stream.encode(frame):
                        container.mux(packet)
                    n += 1
            if stream is None:
                raise ValueError(f"{path}: no frames to write")
            for packet in stream.encode(None):
                container.mux(packet)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return n


def read_video(path, fps: int = FPS, max_frames: int | None = None) -> np.ndarray:
    """All frames of a video as uint8 [N, H, W, 3], resampled to ``fps`` by sample-and-hold (target time t
    takes the frame on screen at t; a 16 fps file comes back frame for frame)."""
    import av

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"video {path} does not exist")
    try:
        container = av.open(path)
    except Exception as err:  # PyAV raises many error types
        raise ValueError(f"{path}: cannot open video ({type(err).__name__}: {err})") from None
    frames, times = [], []
    with container:
        if not container.streams.video:
            raise ValueError(f"{path}: no video stream")
        stream = container.streams.video[0]
        src_dt = 1.0 / float(stream.average_rate) if stream.average_rate else 1.0 / fps
        for i, frame in enumerate(container.decode(stream)):
            times.append(frame.time if frame.time is not None else i * src_dt)
            frames.append(frame.to_ndarray(format="rgb24"))
    if not frames:
        raise ValueError(f"{path}: no frames could be decoded")
    times = np.asarray(times) - times[0]
    if abs(src_dt * fps - 1.0) < 1e-3:
        out = np.stack(frames)
    else:
        end = times[-1] + src_dt
        targets = np.arange(0.0, end - 1e-6, 1.0 / fps)
        idx = np.clip(np.searchsorted(times, targets + 1e-6, side="right") - 1, 0, len(frames) - 1)
        out = np.stack([frames[i] for i in idx])
    return out[:max_frames] if max_frames else out


__all__ = ["DEFAULT_CRF", "read_video", "write_mp4"]
