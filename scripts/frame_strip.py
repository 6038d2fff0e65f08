"""A frame strip (PNG) of a generated video: the middle frame of every K-th 3-s segment, side by side.

    python scripts/frame_strip.py one_minute.mp4 docs/images/one_minute_strip.png [--every 3] [--scale 2] [--rows 1]

Segment i owns frames [49 + 48 (i - 1), 49 + 48 i) (segment 0: [0, 49)); the strip takes the middle one of each
chosen segment, so tile j shows segment 1 + j * every (1-based). Written atomically; an existing PNG is
refused unless --overwrite. Needs only numpy, zlib and PyAV (no image library).
"""

from __future__ import annotations

import argparse
import os
import struct
import sys
import tempfile
import zlib
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def png_bytes(rgb: np.ndarray) -> bytes:
    """uint8 [H, W, 3] -> PNG file bytes (8-bit RGB, no filter)."""
    h, w, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[y].tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")


def segment_middle_frames(num_frames: int, every: int) -> list[tuple[int, int]]:
    """(segment index, frame index) of the middle frame of every ``every``-th segment."""
    if (num_frames - 1) % 48:
        raise ValueError(f"{num_frames} frames is not 48 K + 1 (a whole number of 3-s segments)")
    segments = (num_frames - 1) // 48
    out = []
    for i in range(0, segments, every):
        lo, hi = (0, 49) if i == 0 else (49 + 48 * (i - 1), 49 + 48 * i)
        out.append((i, (lo + hi) // 2))
    return out


def frame_strip(frames: np.ndarray, every: int = 3, scale: int = 2, rows: int = 1, gap: int = 2) -> np.ndarray:
    picks = segment_middle_frames(len(frames), every)
    tiles = [frames[f].repeat(scale, 0).repeat(scale, 1) for _, f in picks]
    per_row = -(-len(tiles) // rows)
    th, tw, _ = tiles[0].shape
    strip = np.full((rows * th + (rows - 1) * gap, per_row * tw + (per_row - 1) * gap, 3), 255, np.uint8)
    for j, tile in enumerate(tiles):
        r, c = divmod(j, per_row)
        strip[r * (th + gap):r * (th + gap) + th, c * (tw + gap):c * (tw + gap) + tw] = tile
    return strip


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("video", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--every", type=int, default=3, help="every K-th segment (default 3: 7 tiles for 21 segments)")
    ap.add_argument("--scale", type=int, default=2, help="pixel repeat (default 2)")
    ap.add_argument("--rows", type=int, default=1)
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(argv)
    if args.out.exists() and not args.overwrite:
        raise SystemExit(f"{args.out} exists (pass --overwrite)")
    sys.path.insert(0, str(REPO.parent))
    from ttt_video.ttt_core.toyworld.video_io import read_video

    frames = np.asarray(read_video(args.video))
    data = png_bytes(frame_strip(frames, args.every, args.scale, args.rows))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=args.out.parent, prefix=".tmp-")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(tmp, 0o644)
    os.replace(tmp, args.out)
    print(f"wrote {args.out} ({len(data):,} bytes, segments {[i + 1 for i, _ in segment_middle_frames(len(frames), args.every)]})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
