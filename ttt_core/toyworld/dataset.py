"""Toy-world datasets for ``ttt-video prepare``: mp4s, storyboards, ground-truth events and annotations.

Layout of ``make_dataset(out_dir, ...)``::

    out_dir/toyworld_dataset.json          settings and the seeds of every split (a re-run must match them)
    out_dir/train/annotations.json         {"videos": [{"video": "videos/tw0000000.mp4", "segments": [...]}]}
    out_dir/train/videos/tw0000000.mp4     48 K + 1 frames, 16 fps, h264
    out_dir/train/storyboards/tw0000000.txt           the Format 3 storyboard
    out_dir/train/events/tw0000000.events.json        ground truth for the scorer
    out_dir/heldout/...                    the same for the held-out split

Seeds: video ``i`` of split ``train`` uses world seed ``TRAIN_SEEDS.start + seed + i``, of ``heldout``
``HELDOUT_SEEDS.start + seed + i``. The ranges are disjoint, so no held-out story is ever trained on;
asking for more videos than a range holds is an error.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path

import numpy as np

from .render import DEFAULT_SIZE, check_size, iter_segment_frames, num_frames
from .video_io import DEFAULT_CRF, read_video, write_mp4
from .world import MAX_SCENE_SEGMENTS, generate_story, storyboard_text

TRAIN_SEEDS = range(0, 1_000_000)
HELDOUT_SEEDS = range(1_000_000, 1_100_000)
SPLITS = {"train": TRAIN_SEEDS, "heldout": HELDOUT_SEEDS}
INFO_NAME = "toyworld_dataset.json"
DATASET_VERSION = 1


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.part")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def video_id(world_seed: int) -> str:
    return f"tw{world_seed:07d}"


def segments_for_seed(world_seed: int, num_segments) -> int:
    """Segment count of a dataset video: fixed, or drawn from the inclusive range by the video's own seed."""
    lo, hi = (num_segments, num_segments) if isinstance(num_segments, int) else (int(num_segments[0]), int(num_segments[1]))
    if not 1 <= lo <= hi:
        raise ValueError(f"num_segments range {lo}..{hi} is not 1 <= lo <= hi")
    return int(np.random.default_rng([int(world_seed), 0x5E6]).integers(lo, hi + 1))


def split_seeds(split: str, seed: int, count: int) -> list[int]:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use {' or '.join(SPLITS)}")
    rng = SPLITS[split]
    first = rng.start + int(seed)
    if seed < 0 or first + count > rng.stop:
        raise ValueError(f"{split} seeds {first}..{first + count - 1} leave the {split} range "
                         f"{rng.start}..{rng.stop - 1} (seed offset {seed}, {count} videos)")
    return list(range(first, first + count))


def render_video(world_seed: int, num_segments: int, out_mp4, size=DEFAULT_SIZE, crf: int = DEFAULT_CRF,
                 overwrite: bool = False) -> dict:
    """Render one story to ``out_mp4`` and write ``<stem>.txt`` (storyboard) and ``<stem>.events.json``
    beside it. Returns the story."""
    size = check_size(size)
    out_mp4 = Path(out_mp4)
    story = generate_story(world_seed, num_segments)
    story["height"], story["width"] = size
    stem = out_mp4.with_suffix("")
    side = [Path(f"{stem}.txt"), Path(f"{stem}.events.json")]
    if not overwrite:
        for p in [out_mp4, *side]:
            if p.exists():
                raise FileExistsError(f"{p} exists (use --overwrite to replace it)")
    n = write_mp4(out_mp4, iter_segment_frames(story, size), crf=crf, overwrite=overwrite)
    assert n == num_frames(num_segments)
    _atomic_write_text(side[0], storyboard_text(story))
    _atomic_write_text(side[1], json.dumps(story, indent=1))
    return story


def _render_entry(job: tuple) -> dict:
    """Render one dataset video (and its storyboard and events) unless an identical one exists; return its
    annotation entry. A module-level function so worker processes can run it."""
    root, ws, num_segments, size, crf, max_scene_segments = job
    vid = video_id(ws)
    k = segments_for_seed(ws, num_segments)
    story = generate_story(ws, k, max_scene_segments)
    story["height"], story["width"] = size
    mp4 = root / "videos" / f"{vid}.mp4"
    events = root / "events" / f"{vid}.events.json"
    board = root / "storyboards" / f"{vid}.txt"
    done = mp4.is_file() and events.is_file() and board.is_file()
    if done:
        try:
            done = json.loads(events.read_text(encoding="utf-8")) == story
        except (OSError, json.JSONDecodeError):
            done = False
    if not done:  # (re)render: files of an interrupted or older run are replaced
        write_mp4(mp4, iter_segment_frames(story, size), crf=crf, overwrite=True)
        _atomic_write_text(board, storyboard_text(story))
        _atomic_write_text(events, json.dumps(story, indent=1))
    return {
        "video": f"videos/{vid}.mp4",
        "seed": ws,
        "segments": [{"text": s["text"], "requires_scene_transition": bool(s["scene_start"] and s["index"] > 0)}
                     for s in story["segments"]],
    }


def _write_split(root: Path, split: str, seeds: list[int], num_segments, size, crf: int, progress: bool,
                 workers: int = 0, max_scene_segments: int = MAX_SCENE_SEGMENTS) -> list[dict]:
    jobs = [(root, ws, num_segments, size, crf, max_scene_segments) for ws in seeds]
    for sub in ("videos", "events", "storyboards"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(jobs), desc=f"toyworld {split}", unit="video", dynamic_ncols=True)
    entries = []
    if workers > 1 and len(jobs) > 1:
        import multiprocessing as mp

        # spawn, not fork: the caller may hold threads (torch) that fork would copy half-initialised
        with mp.get_context("spawn").Pool(workers) as pool:
            for entry in pool.imap(_render_entry, jobs, chunksize=max(1, min(16, len(jobs) // (4 * workers)))):
                entries.append(entry)
                if bar is not None:
                    bar.update()
    else:
        for job in jobs:
            entries.append(_render_entry(job))
            if bar is not None:
                bar.update()
    if bar is not None:
        bar.close()
    _atomic_write_text(root / "annotations.json", json.dumps({"videos": entries}, indent=1))
    return entries


def make_dataset(out_dir, num_videos: int, seed: int = 0, num_segments=(1, 21), size=DEFAULT_SIZE,
                 heldout_videos: int = 0, crf: int = DEFAULT_CRF, progress: bool = True, workers: int = 0,
                 max_scene_segments: int = MAX_SCENE_SEGMENTS) -> dict:
    """Write ``num_videos`` training videos (world seeds ``seed``, ``seed + 1``, ... of TRAIN_SEEDS) and
    ``heldout_videos`` held-out ones (the same offsets into HELDOUT_SEEDS), each with ``num_segments``
    segments (an int, or an inclusive (lo, hi) range drawn per video). Re-running continues an interrupted
    run; a folder made with other settings is refused. ``workers`` > 1 renders in that many processes (the
    same stories and frames; h264 files are not byte-reproducible either way). ``max_scene_segments`` shortens the
    training stories' scenes (more room changes); the held-out split always keeps the default, so evaluations stay
    comparable. Returns the dataset info (also written to ``toyworld_dataset.json``)."""
    t0 = time.perf_counter()
    size = check_size(size)
    out = Path(out_dir)
    seg_range = [num_segments, num_segments] if isinstance(num_segments, int) else [int(v) for v in num_segments]
    segments_for_seed(0, seg_range)  # validates the range
    if max_scene_segments < 1:
        raise ValueError(f"max_scene_segments must be >= 1, got {max_scene_segments}")
    info = {
        "format": "ttt-video-toyworld-dataset",
        "version": DATASET_VERSION,
        "height": size[0],
        "width": size[1],
        "fps": 16,
        "num_segments": seg_range,
        "crf": crf,
        "seed_offset": int(seed),
        "max_scene_segments": int(max_scene_segments),  # of the training split
        "splits": {},
    }
    splits = {"train": split_seeds("train", seed, num_videos)}
    if heldout_videos:
        splits["heldout"] = split_seeds("heldout", seed, heldout_videos)
    info_path = out / INFO_NAME
    if info_path.is_file():
        old = json.loads(info_path.read_text(encoding="utf-8"))
        old.setdefault("max_scene_segments", MAX_SCENE_SEGMENTS)  # folders made before the option existed
        diff = [k for k in ("height", "width", "num_segments", "crf", "seed_offset", "version", "max_scene_segments")
                if old.get(k) != info.get(k)]
        if diff:
            raise ValueError(f"{out} holds a toy-world dataset made with other settings "
                             f"({', '.join(f'{k}: {old.get(k)} vs {info.get(k)}' for k in diff)}); use a new folder")
    elif out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not a toy-world dataset folder (no {INFO_NAME}); use a new folder")
    out.mkdir(parents=True, exist_ok=True)
    for split, seeds in splits.items():
        entries = _write_split(out / split, split, seeds, seg_range, size, crf, progress, workers,
                               max_scene_segments if split == "train" else MAX_SCENE_SEGMENTS)
        info["splits"][split] = {
            "videos": len(entries),
            "seeds": [seeds[0], seeds[-1]] if seeds else [],
            "segments": sum(len(e["segments"]) for e in entries),
            "annotations": f"{split}/annotations.json",
        }
    _atomic_write_text(info_path, json.dumps(info, indent=1))
    info["seconds"] = time.perf_counter() - t0
    return info


def check_video_file(path, num_segments: int) -> int:
    """Frame count of a dataset mp4, checked against the segment count (48 K + 1)."""
    n = len(read_video(path))
    if n != num_frames(num_segments):
        raise ValueError(f"{path}: {n} frames, expected {num_frames(num_segments)} for {num_segments} segment(s)")
    return n


__all__ = ["HELDOUT_SEEDS", "SPLITS", "TRAIN_SEEDS", "make_dataset", "render_video", "segments_for_seed",
           "split_seeds", "video_id"]
