"""``ttt-video prepare``: videos + per-segment annotations -> VAE latents + T5 text embeddings on disk.

For each annotated clip (a video file, optionally from ``start_s``, with one text per 3-s segment):

1. read it with PyAV at 16 fps (sample-and-hold: target time t takes the frame on screen at t), resizing each
   frame so that it covers the model's pixel size (aspect ratio kept) and centre-cropping to it:
   720x480 for CogVideoX-5B, 96x64 for the tiny preset;
2. check its length against the annotation. K texts need 48 K + 1 frames (3 K s plus the closing frame;
   13 + 12 (K - 1) latent frames). A clip of exactly 3 K s has 48 K frames at 16 fps, so its last frame is
   repeated once (the official precomp_video's ``pad_video``). A whole-file clip longer than 3 K s by less
   than one segment is centre-cropped (the official ``crop_video``); anything else is a length mismatch and
   the clip is skipped with both numbers in the message (official issues #21 / #30: every text describes
   one 3-s piece of the video, in order, so the count of texts fixes the clip length);
3. split the K segments into items of ``--segments`` segments (default: one item with all K), VAE-encode each
   item once (the posterior mean + log-variance are stored, as the official pipeline does, and the trainer
   samples from it) and T5-encode each segment's text once (scene tokens inserted as at inference);
4. write ``latents/<id>.safetensors`` and ``text/<id>.<i>.safetensors`` atomically and rewrite
   ``manifest.jsonl`` atomically every few seconds and at the end. A re-run skips items already in the
   manifest.

Throughput: a thread pool decodes the next clips (PyAV releases the GIL) while the VAE encodes the current
one, and the texts of several items go through T5 in one batch (no attention mask and fixed-length padding,
so each text's embedding does not depend on its batch); the files and the manifest are the same as when
everything ran one clip at a time.

Annotation formats (see docs/training.md for examples):
- ours: ``{"videos": [{"video": "a.mp4", "start_s": 12.0, "segments": [{"text": ...,
  "requires_scene_transition": false}, ...]}]}`` (or one such video object per JSONL line);
- official per-video JSONL (docs/dataset.md): ``{"mp4": "a.mp4", "text_0": ..., "text_1": ...,
  "scene_start": [...], "scene_end": [...]}``;
- official per-clip JSON (data/precomp_text.py): ``{"<key>": {"mp4": "clip.mp4", "text": ...,
  "scene_start": bool, "scene_end": bool}, ...}`` (each entry one 3-s clip).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import preset
from ..geometry import FPS, SECONDS_PER_SEGMENT, latent_frames_for_segments, pixel_frames_for_latent_frames
from ..storyboard import Segment, Storyboard
from .data import (
    DATASET_INFO_NAME,
    MANIFEST_NAME,
    NULL_TEXT_NAME,
    TEXT_KEY,
    atomic_save_safetensors,
    atomic_write_text,
    host_threads_for_gpu_process,
    read_manifest_records,
    write_item,
    write_manifest,
)

FRAMES_PER_SEGMENT = FPS * SECONDS_PER_SEGMENT  # 48
PREPARE_VERSION = 1
_VIDEO_KEYS = ("video", "mp4", "video_path", "path")


class AnnotationError(ValueError):
    pass


@dataclass
class Clip:
    video: Path
    texts: list[str]
    transitions: list[bool]  # requires_scene_transition per segment
    start_s: float | None  # None: the whole file is the clip
    label: str  # for messages: "<annotation>:<line or key>"


@dataclass
class PrepareSummary:
    written: int = 0
    already_done: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def text(self) -> str:
        lines = [f"prepare: {self.written} item(s) written, {self.already_done} already done, "
                 f"{len(self.skipped)} clip(s) skipped ({self.seconds:.1f} s)"]  # fmt: skip
        for label, reason in self.skipped:
            lines.append(f"  skipped {label}: {reason}")
        for note in self.notes:
            lines.append(f"  note: {note}")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# annotations
# --------------------------------------------------------------------------------------------------
def _load_json_or_jsonl(path: Path) -> list[tuple[str, Any]]:
    """[(label, object)] from a JSON file (list / dict / {"videos": [...]}) or JSONL."""
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        out = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    out.append((f"{path.name}:{lineno}", json.loads(line)))
                except json.JSONDecodeError as err:
                    raise AnnotationError(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
        return out
    if isinstance(data, dict) and isinstance(data.get("videos"), list):
        return [(f"{path.name}:videos[{i}]", v) for i, v in enumerate(data["videos"])]
    if isinstance(data, list):
        return [(f"{path.name}[{i}]", v) for i, v in enumerate(data)]
    if isinstance(data, dict):
        if any(k in data for k in _VIDEO_KEYS):
            return [(path.name, data)]
        return [(f"{path.name}:{k}", v) for k, v in data.items()]
    raise AnnotationError(f"{path}: expected a JSON object, a list or JSONL lines")


def _video_path(obj: dict, label: str, root: Path) -> Path:
    for key in _VIDEO_KEYS:
        if isinstance(obj.get(key), str):
            p = Path(obj[key]).expanduser()
            return p if p.is_absolute() else root / p
    raise AnnotationError(f"{label}: no video path (one of {list(_VIDEO_KEYS)})")


def _flag_list(obj: dict, key: str, n: int, label: str) -> list[bool]:
    v = obj.get(key)
    if v is None:
        return [False] * n
    if isinstance(v, bool):
        return [v] * n if n == 1 else [v] + [False] * (n - 1)
    if not isinstance(v, list) or len(v) != n:
        raise AnnotationError(f"{label}: '{key}' must be a list of {n} booleans (one per text), got {v!r}")
    return [bool(x) for x in v]


def parse_annotations(path: str | Path, videos_root: str | Path | None = None) -> list[Clip]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"annotation file {path} does not exist")
    root = Path(videos_root) if videos_root else path.parent
    clips = []
    for label, obj in _load_json_or_jsonl(path):
        if not isinstance(obj, dict):
            raise AnnotationError(f"{label}: expected an object, got {type(obj).__name__}")
        video = _video_path(obj, label, root)
        if isinstance(obj.get("segments"), list):  # ours
            segs = obj["segments"]
            if not segs:
                raise AnnotationError(f"{label}: 'segments' is empty")
            texts, trans = [], []
            for i, s in enumerate(segs):
                if isinstance(s, str):
                    s = {"text": s}
                if not isinstance(s, dict) or not isinstance(s.get("text"), str) or not s["text"].strip():
                    raise AnnotationError(f"{label}: segment {i + 1} needs a non-empty 'text'")
                texts.append(s["text"])
                trans.append(bool(s.get("requires_scene_transition", False)))
            start = obj.get("start_s")
            clips.append(Clip(video, texts, trans, float(start) if start is not None else None, label))
        elif "text_0" in obj:  # official per-video JSONL
            n = 0
            while f"text_{n}" in obj:
                n += 1
            texts = [str(obj[f"text_{i}"]) for i in range(n)]
            starts = _flag_list(obj, "scene_start", n, label)
            ends = _flag_list(obj, "scene_end", n, label)
            trans = [False] + [starts[i] or ends[i - 1] for i in range(1, n)]
            clips.append(Clip(video, texts, trans, None, label))
        elif isinstance(obj.get("text"), str):  # official per-clip entry: one 3-s clip
            clips.append(Clip(video, [obj["text"]], [False], None, label))
        else:
            raise AnnotationError(
                f"{label}: unknown annotation layout (expected 'segments', 'text_0'.. or 'text'); see docs/training.md"
            )
    return clips


# --------------------------------------------------------------------------------------------------
# video reading
# --------------------------------------------------------------------------------------------------
class VideoReadError(RuntimeError):
    pass


def _cover_crop(frame, width: int, height: int) -> np.ndarray:
    """Resize (aspect kept) so the frame covers width x height, then centre-crop; uint8 [H, W, 3]."""
    w, h = frame.width, frame.height
    scale = max(width / w, height / h)
    rw, rh = max(width, math.ceil(w * scale - 1e-6)), max(height, math.ceil(h * scale - 1e-6))
    img = frame.reformat(width=rw, height=rh, format="rgb24").to_ndarray()
    top, left = (rh - height) // 2, (rw - width) // 2
    return img[top : top + height, left : left + width]


def read_frames_16fps(path: Path, width: int, height: int, start_s: float | None, max_frames: int | None) -> np.ndarray:
    """Frames at 16 fps from ``start_s`` (default 0) as uint8 [N, H, W, 3] (N <= max_frames)."""
    import av

    try:
        container = av.open(str(path))
    except Exception as err:  # PyAV raises many error types (FileNotFoundError, InvalidDataError, ...)
        raise VideoReadError(f"cannot open video ({type(err).__name__}: {err})") from None
    try:
        if not container.streams.video:
            raise VideoReadError("the file has no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        start = float(start_s or 0.0)
        src_dt = 1.0 / float(stream.average_rate) if stream.average_rate else 1.0 / FPS
        if start > 1.0 and stream.time_base is not None:
            container.seek(int(start / float(stream.time_base)), stream=stream, backward=True, any_frame=False)
        out: list[np.ndarray] = []
        k = 0
        prev, prev_img, last_t = None, None, None
        eps = 1e-6

        def take(frame):
            nonlocal prev_img
            if prev_img is None:
                prev_img = _cover_crop(frame, width, height)
            out.append(prev_img)

        try:
            for frame in container.decode(stream):
                t = frame.time if frame.time is not None else (last_t + src_dt if last_t is not None else 0.0)
                if t + src_dt <= start + eps:  # before the clip (after a seek to the previous key frame)
                    last_t = t
                    continue
                while (max_frames is None or k < max_frames) and start + k / FPS < t - eps:
                    if prev is None:  # the clip starts before the first frame: hold the first frame
                        prev, prev_img = frame, None
                    take(prev)
                    k += 1
                if prev is not frame:
                    prev, prev_img = frame, None
                last_t = t
                if max_frames is not None and k >= max_frames:
                    break
        except av.error.FFmpegError as err:
            if prev is None:
                raise VideoReadError(f"cannot decode video ({err})") from None
        if prev is not None and last_t is not None:  # targets shown by the last decoded frame
            while (max_frames is None or k < max_frames) and start + k / FPS < last_t + src_dt - eps:
                take(prev)
                k += 1
        if not out:
            raise VideoReadError("no frames could be decoded" + (f" after {start:.2f} s" if start else ""))
        return np.stack(out)
    finally:
        container.close()


def fit_clip_length(frames: np.ndarray, clip: Clip) -> tuple[np.ndarray, str | None]:
    """Trim / pad to 48 K + 1 frames for K texts, or raise AnnotationError explaining the mismatch."""
    K = len(clip.texts)
    need = pixel_frames_for_latent_frames(latent_frames_for_segments(K))  # 48 K + 1
    have = len(frames)
    have_s = have / FPS
    whole = have // FRAMES_PER_SEGMENT
    where = f" from {clip.start_s:.2f} s" if clip.start_s else ""
    if have == need - 1:
        return np.concatenate([frames, frames[-1:]]), "last frame repeated once (48 K frames -> 48 K + 1)"
    if have < need:
        raise AnnotationError(
            f"annotation has {K} segment text(s), i.e. {3 * K} s = {need} frames at {FPS} fps, but the video{where} "
            f"gives only {have} frames ({have_s:.2f} s, {whole} whole 3-s segment(s)). Each text describes one "
            "3-s piece in order: drop texts, fix start_s, or use a longer clip"
        )
    if have == need or clip.start_s is not None:
        return frames[:need], None
    extra = have - need
    if extra < FRAMES_PER_SEGMENT:  # official crop_video: centre crop of the overflow
        lo = extra // 2
        return frames[lo : lo + need], f"centre-cropped {extra} surplus frame(s) ({extra / FPS:.2f} s)"
    raise AnnotationError(
        f"the video is {have_s:.2f} s ({have} frames at {FPS} fps = {whole} whole 3-s segments) but the annotation "
        f"has {K} segment text(s) ({3 * K} s). Give one text per 3-s segment, or cut the clip (our JSON's "
        "'start_s' takes a 3 K-s window out of a longer video)"
    )


def read_clip(clip: Clip, width: int, height: int) -> tuple[np.ndarray, str | None]:
    """The clip's frames at 16 fps, fitted to 48 K + 1 frames (raises VideoReadError / AnnotationError)."""
    need = pixel_frames_for_latent_frames(latent_frames_for_segments(len(clip.texts)))
    max_frames = need if clip.start_s is not None else None
    frames = read_frames_16fps(clip.video, width, height, clip.start_s, max_frames)
    return fit_clip_length(frames, clip)


def default_decode_workers() -> int:
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, min(4, cores))


class ClipReadAhead:
    """``read_clip`` for the clips of ``plan`` (in that order) on a thread pool, ahead of the consumer.

    At most ``max_ahead`` clips, and ``max_bytes`` of frames (but always one clip), are decoded or being
    decoded and not yet taken. ``take(i)`` returns plan entry i's ``read_clip`` result or raises its error;
    entries before i that were not taken are dropped (the consumer found them done after all). An index
    not in the plan is read on the spot.
    """

    def __init__(self, plan: list[tuple[int, Clip]], width: int, height: int, *, workers: int,
                 max_ahead: int | None = None, max_bytes: int = 2 << 30):  # fmt: skip
        self._todo = deque(plan)
        self._width, self._height = width, height
        self._max_ahead = max_ahead or 2 * workers
        self._max_bytes = max_bytes
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="decode")
        self._ahead: deque[tuple[int, int, Future]] = deque()  # (index, bytes, future)
        self._bytes = 0
        self._fill()

    def _clip_bytes(self, clip: Clip) -> int:
        frames = pixel_frames_for_latent_frames(latent_frames_for_segments(len(clip.texts)))
        if clip.start_s is None:
            frames += FRAMES_PER_SEGMENT  # a whole file may run up to one segment longer before the crop
        return frames * self._width * self._height * 3

    def _fill(self) -> None:
        while self._todo and len(self._ahead) < self._max_ahead:
            index, clip = self._todo[0]
            size = self._clip_bytes(clip)
            if self._ahead and self._bytes + size > self._max_bytes:
                break
            self._todo.popleft()
            self._ahead.append((index, size, self._pool.submit(read_clip, clip, self._width, self._height)))
            self._bytes += size

    def take(self, index: int, clip: Clip) -> tuple[np.ndarray, str | None]:
        while self._ahead and self._ahead[0][0] < index:  # read ahead but not needed after all
            _, size, fut = self._ahead.popleft()
            fut.cancel()
            self._bytes -= size
        while self._todo and self._todo[0][0] < index:
            self._todo.popleft()
        self._fill()
        if not self._ahead or self._ahead[0][0] != index:  # not in the plan
            return read_clip(clip, self._width, self._height)
        _, size, fut = self._ahead.popleft()
        self._bytes -= size
        self._fill()  # the next clip starts decoding before this one is waited for
        return fut.result()

    def close(self) -> None:
        self._todo.clear()
        for _, _, fut in self._ahead:
            fut.cancel()
        self._ahead.clear()
        self._pool.shutdown(wait=True, cancel_futures=True)


# --------------------------------------------------------------------------------------------------
# encoders
# --------------------------------------------------------------------------------------------------
def load_vae(model_root: Path, device: torch.device):
    from diffusers import AutoencoderKLCogVideoX

    folder = model_root / "vae"
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is missing: --model must be a CogVideoX folder with vae/")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    vae = AutoencoderKLCogVideoX.from_pretrained(str(folder), torch_dtype=dtype, use_safetensors=True).to(device)
    vae.eval()
    if device.type == "cuda" and vae.config.sample_height >= 256:
        vae.enable_tiling()  # bounded memory at 720x480; diffusers blends the tiles
    return vae


@torch.no_grad()
def encode_video(vae, frames: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> VAE posterior [F_lat, 2 C, h, w] (mean, log-variance), float32 on CPU."""
    x = torch.from_numpy(frames).to(vae.device).permute(3, 0, 1, 2).unsqueeze(0)  # [1, 3, N, H, W]
    x = x.to(vae.dtype) / 127.5 - 1.0
    dist = vae.encode(x).latent_dist
    params = dist.parameters if hasattr(dist, "parameters") else torch.cat([dist.mean, dist.logvar], 1)
    return params[0].permute(1, 0, 2, 3).float().cpu()  # [F_lat, 2C, h, w]


def load_text_encoder(model_root: Path, device: torch.device):
    from ..text_encoder import SegmentTextEncoder

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return SegmentTextEncoder.from_pretrained(model_root, device=device, dtype=dtype)


# --------------------------------------------------------------------------------------------------
# the command
# --------------------------------------------------------------------------------------------------
MANIFEST_WRITE_INTERVAL_S = 5.0
TEXT_BATCH = 32  # texts per T5 call (items are written once their texts are encoded)


def _default_model_root() -> Path:
    return Path(__file__).resolve().parents[2] / "models" / "embedded-default"


def _item_id(clip: Clip, window: int, n_seg: int) -> str:
    key = json.dumps([str(clip.video.resolve()), clip.start_s, n_seg, window, clip.texts, clip.transitions])
    return f"{clip.video.stem}-{hashlib.sha1(key.encode()).hexdigest()[:10]}-{window:03d}"


def prepare_dataset(*, annotations, out, videos_root=None, model_root=None, preset_name=None,
                    segments_per_item: int = 0, device: str = "auto", store_dtype: str = "bf16",
                    limit: int = 0, progress: bool = True, decode_workers: int | None = None,
                    max_minutes: float = 0.0, shard: tuple[int, int] = (0, 1)) -> PrepareSummary:  # fmt: skip
    """``decode_workers``: threads decoding the next clips while the current one is encoded (default
    min(4, cores)). ``max_minutes`` > 0: start no new clip after that much time (what is done is kept and
    listed in the manifest; a re-run continues). ``shard`` (i, n): only clips i, i + n, i + 2n, ...; with
    n > 1 the items go into the shared ``out`` folder and their records into ``manifest.shard-i-of-n.jsonl``
    (``merge_shard_manifests`` folds them into manifest.jsonl), so n processes can share one GPU."""
    from tqdm import tqdm

    t0 = time.perf_counter()
    out = Path(out)
    model_root = Path(model_root) if model_root else _default_model_root()
    preset_name = preset_name or ("toyworld" if model_root == _default_model_root() else "cogvideox-5b")
    mcfg = preset(preset_name)
    width, height = mcfg.sample_width * 8, mcfg.sample_height * 8
    text_len = mcfg.max_text_seq_length
    sdtype = torch.bfloat16 if store_dtype == "bf16" else torch.float32
    clips = parse_annotations(annotations, videos_root)
    if limit:
        clips = clips[:limit]
    shard_index, shards = shard
    if not (shards >= 1 and 0 <= shard_index < shards):
        raise ValueError(f"shard {shard_index}/{shards}: need 0 <= i < n")
    clips = clips[shard_index::shards]
    manifest_path = out / (shard_manifest_name(shard_index, shards) if shards > 1 else MANIFEST_NAME)
    summary = PrepareSummary()

    info = {
        "preset": preset_name,
        "pixel_width": width,
        "pixel_height": height,
        "fps": FPS,
        "text_tokens": text_len,
        "segments_per_item": segments_per_item,
        "model_root": str(model_root),
        "version": PREPARE_VERSION,
    }
    info_path = out / DATASET_INFO_NAME
    if info_path.is_file():
        old = json.loads(info_path.read_text())
        diff = [k for k in ("preset", "pixel_width", "pixel_height", "text_tokens", "segments_per_item")
                if old.get(k) != info.get(k)]  # fmt: skip
        if diff:
            raise ValueError(
                f"{out} was prepared with other settings ({', '.join(f'{k}: {old.get(k)} vs {info.get(k)}' for k in diff)}); "
                "use a new --out folder (nothing is overwritten)"
            )
    records = read_manifest_records(manifest_path) if manifest_path.is_file() else []
    done = {r["id"]: r for r in records if "id" in r}
    if shards > 1 and (out / MANIFEST_NAME).is_file():  # items a merged earlier run already lists
        done.update({r["id"]: r for r in read_manifest_records(out / MANIFEST_NAME) if "id" in r and r["id"] not in done})

    from ..pipeline import resolve_device

    dev = resolve_device(device)
    if dev.type == "cuda":  # the host decodes and feeds the GPU: bounded torch threads (see the helper)
        threads = host_threads_for_gpu_process()
        if threads is not None:
            torch.set_num_threads(threads)
    vae = text_encoder = None

    def item_layout(clip: Clip) -> tuple[int, int, list[str]]:
        n_seg = segments_per_item or len(clip.texts)
        windows = len(clip.texts) // n_seg
        return n_seg, windows, [_item_id(clip, w, n_seg) for w in range(windows)]

    def all_done(ids: list[str]) -> bool:
        return all(i in done and all((out / p).is_file() for p in [done[i]["vid_emb"], *done[i]["text_chunk_emb"]]) for i in ids)

    layouts = [item_layout(clip) for clip in clips]
    # clips that will need decoding (as far as is known now): read ahead on the decode threads
    plan = [(n, clip) for n, (clip, (_, windows, ids)) in enumerate(zip(clips, layouts))
            if windows and not all_done(ids) and clip.video.is_file()]  # fmt: skip
    reader = ClipReadAhead(plan, width, height, workers=decode_workers or default_decode_workers())
    pending: list[dict[str, Any]] = []  # VAE-encoded items waiting for the batched text encoding
    pending_ids: set[str] = set()

    def flush_pending() -> None:
        """T5-encode the pending items' texts in one batch, then write the items (in their order)."""
        if not pending:
            return
        prompts = [t for it in pending for t in it["prompts"]]
        text = text_encoder.encode(prompts, max_length=text_len, on_overflow="ignore", batch_size=TEXT_BATCH)
        text = text.float().cpu()
        offset = 0
        for it in pending:
            emb = text[offset : offset + len(it["prompts"])]
            offset += len(it["prompts"])
            record = write_item(out, it["id"], it["latent"], emb, store_dtype=sdtype, extra=it["extra"])
            done[it["id"]] = record
            records.append(record)
            summary.written += 1
        pending.clear()
        pending_ids.clear()

    last_manifest_write = time.perf_counter()
    bar = tqdm(clips, desc="prepare", unit="clip", disable=not progress, dynamic_ncols=True)
    try:
        for index, clip in enumerate(bar):
            if max_minutes and time.perf_counter() - t0 > max_minutes * 60:
                summary.notes.append(f"time limit ({max_minutes:g} min): stopped before clip {index + 1} of "
                                     f"{len(clips)}; run again to continue")  # fmt: skip
                break
            K = len(clip.texts)
            n_seg, windows, ids = layouts[index]
            if windows == 0:
                summary.skipped.append((clip.label, f"{K} segment(s) is shorter than --segments {n_seg}"))
                continue
            if pending_ids.intersection(ids):  # the same item twice in the annotations: write the first one
                flush_pending()
            if all_done(ids):
                summary.already_done += windows
                continue
            if not clip.video.is_file():
                summary.skipped.append((clip.label, f"video not found: {clip.video}"))
                continue
            try:
                frames, note = reader.take(index, clip)
            except VideoReadError as err:
                summary.skipped.append((clip.label, f"unreadable video {clip.video.name}: {err}"))
                continue
            except AnnotationError as err:
                summary.skipped.append((clip.label, f"length mismatch ({clip.video.name}): {err}"))
                continue
            if note:
                summary.notes.append(f"{clip.label}: {note}")
            if K % n_seg:
                summary.notes.append(f"{clip.label}: last {K % n_seg} segment(s) unused (items of {n_seg} segments)")
            if vae is None:
                vae = load_vae(model_root, dev)
                text_encoder = load_text_encoder(model_root, dev)
                info["scaling_factor"] = float(vae.config.scaling_factor)
                info["latent_channels"] = int(vae.config.latent_channels)
                null = text_encoder.encode([""], max_length=text_len)[0].float().cpu()
                if not (out / NULL_TEXT_NAME).is_file():
                    atomic_save_safetensors({TEXT_KEY: null.to(sdtype)}, out / NULL_TEXT_NAME)
                info["text_dim"] = int(null.shape[-1])
                atomic_write_text(info_path, json.dumps(info, indent=1, sort_keys=True))
            for w, item_id in enumerate(ids):
                if item_id in done:
                    summary.already_done += 1
                    continue
                seg_lo, seg_hi = w * n_seg, (w + 1) * n_seg
                f_lo = seg_lo * FRAMES_PER_SEGMENT
                f_hi = seg_hi * FRAMES_PER_SEGMENT + 1
                try:
                    latent = encode_video(vae, frames[f_lo:f_hi])
                except RuntimeError as err:
                    raise RuntimeError(
                        f"{clip.label}: the VAE in {model_root / 'vae'} failed to encode {f_hi - f_lo} frames of "
                        f"{width}x{height} ({err})"
                    ) from err
                expected_f = latent_frames_for_segments(n_seg)
                if latent.shape[0] != expected_f:
                    raise RuntimeError(f"VAE gave {latent.shape[0]} latent frames for {f_hi - f_lo} frames, expected {expected_f}")
                board = Storyboard([Segment(text=t, requires_scene_transition=tr)
                                    for t, tr in zip(clip.texts[seg_lo:seg_hi], clip.transitions[seg_lo:seg_hi])])  # fmt: skip
                prompts = board.prompts()
                for i, prompt in enumerate(prompts):  # the encoder's own overflow rule, noted in clip order
                    n = text_encoder.count_tokens(prompt)
                    if n > text_len:
                        summary.notes.append(f"{clip.label}: segment {seg_lo + i + 1} text has {n} tokens, cut to {text_len}")
                start_s = (clip.start_s or 0.0) + seg_lo * SECONDS_PER_SEGMENT
                pending.append({"id": item_id, "latent": latent.to(sdtype), "prompts": prompts, "extra": {
                    "texts": prompts, "source": str(clip.video), "start_s": start_s, "annotation": clip.label}})  # fmt: skip
                pending_ids.add(item_id)
                if sum(len(it["prompts"]) for it in pending) >= TEXT_BATCH:
                    flush_pending()
            # Rewriting the whole manifest after every clip is quadratic in the dataset size (thousands of short
            # toy clips); every few seconds bounds what a crash loses, and the item files themselves are kept.
            if time.perf_counter() - last_manifest_write > MANIFEST_WRITE_INTERVAL_S:
                flush_pending()
                write_manifest(manifest_path, records)
                last_manifest_write = time.perf_counter()
            bar.set_postfix(items=summary.written + len(pending) + summary.already_done, skipped=len(summary.skipped))
        flush_pending()
    finally:
        reader.close()
    bar.close()
    if summary.written:
        write_manifest(manifest_path, records)
    if not info_path.is_file() and (summary.written or summary.already_done):
        atomic_write_text(info_path, json.dumps(info, indent=1, sort_keys=True))
    summary.seconds = time.perf_counter() - t0
    report = {"written": summary.written, "already_done": summary.already_done,
              "skipped": [{"clip": c, "reason": r} for c, r in summary.skipped], "notes": summary.notes}  # fmt: skip
    if out.is_dir():
        report_name = "prepare_report.json" if shards == 1 else f"prepare_report.shard-{shard_index}-of-{shards}.json"
        atomic_write_text(out / report_name, json.dumps(report, indent=1))
    if progress:
        print(summary.text(), flush=True)
    return summary


def shard_manifest_name(index: int, shards: int) -> str:
    return f"manifest.shard-{index}-of-{shards}.jsonl"


def merge_shard_manifests(out: str | Path) -> int:
    """Fold ``manifest.shard-*.jsonl`` (from ``prepare_dataset(shard=...)``) into ``manifest.jsonl``: records
    in the order manifest.jsonl, then shard 0, 1, ...; the first record of an id wins. The merged manifest
    is written (atomically) before the shard manifests are removed, so a crash loses nothing. Returns the
    number of records in the merged manifest."""
    out = Path(out)
    parts = sorted(out.glob("manifest.shard-*-of-*.jsonl"), key=lambda p: [int(x) for x in re.findall(r"\d+", p.name)])
    records: dict[str, dict[str, Any]] = {}
    for path in ([out / MANIFEST_NAME] if (out / MANIFEST_NAME).is_file() else []) + parts:
        for r in read_manifest_records(path):
            records.setdefault(r["id"], r)
    if parts:
        write_manifest(out / MANIFEST_NAME, list(records.values()))
        for path in parts:
            path.unlink()
    return len(records)
