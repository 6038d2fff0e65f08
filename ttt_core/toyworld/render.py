"""Pure-numpy renderer of a toy-world story: flat-coloured 2D shapes, 16 fps, any 2:3 frame size.

Shapes live in world units (the 96 x 64 wide shot). Each frame maps its pixel grid to world coordinates
through the segment's camera (wide: the whole room; close-up: zoom 1.6 on the subject), so the same story
renders at 64x96, 128x192, ... Colours are flat palette colours without anti-aliasing, so every pixel is
one exact palette entry in a ground-truth render.

Frames: segment 0 draws phases u = k/48 for k = 0..48 (49 frames), every later segment k = 1..48 (48
frames; its u = 0 is the previous segment's last frame), so a K-segment story has 48 K + 1 frames, the
count ``geometry`` gives (21 segments: 1,009).
"""

from __future__ import annotations

import math
from typing import Iterator

import numpy as np

from ..geometry import FPS, VideoGeometry, latent_frames_for_segments, pixel_frames_for_latent_frames
from .world import (
    CAT_FUR,
    CHEESE,
    CLOSE_ZOOM,
    HOLE,
    MOUSE_FLOOR_Y,
    MOUSE_FUR,
    ROOM_FLOOR,
    ROOM_HOLE_X,
    SCARF_COLOURS,
    WALL_BOTTOM,
    WALL_COLOURS,
    WORLD_HEIGHT,
    WORLD_WIDTH,
)

FRAMES_PER_SEGMENT = 48
DEFAULT_SIZE = (64, 96)  # H x W: the tiny preset's 8 x 12 latent
CAT_Y = 48.0  # torso centre of a standing cat
CLOSE_Y = WALL_BOTTOM + 4  # close-ups keep the wall in the top third (its colour is a fact to check)
EYE = HOLE  # eyes are black dots (a palette colour, so they never read as a stray room/fact colour)


def check_size(size) -> tuple[int, int]:
    h, w = (int(v) for v in size)
    if h < 16 or w < 24 or h * 3 != w * 2:
        raise ValueError(f"frame size {h}x{w} (H x W): need a 2:3 size of at least 16x24, e.g. 64x96 or 128x192")
    return h, w


def num_frames(num_segments: int) -> int:
    return pixel_frames_for_latent_frames(latent_frames_for_segments(num_segments))


class _Canvas:
    """One frame: an RGB buffer and the world coordinates of its pixel centres."""

    def __init__(self, img: np.ndarray, xs: np.ndarray, ys: np.ndarray):
        self.img, self.xs, self.ys = img, xs, ys

    def _window(self, x0, x1, y0, y1):
        c0, c1 = np.searchsorted(self.xs, [x0, x1])
        r0, r1 = np.searchsorted(self.ys, [y0, y1])
        return r0, r1, c0, c1

    def rect(self, x0, y0, x1, y1, colour):
        r0, r1, c0, c1 = self._window(min(x0, x1), max(x0, x1), min(y0, y1), max(y0, y1))
        if r1 > r0 and c1 > c0:
            self.img[r0:r1, c0:c1] = colour

    def ellipse(self, cx, cy, rx, ry, colour, upper_only=False):
        if rx <= 0 or ry <= 0:
            return
        r0, r1, c0, c1 = self._window(cx - rx, cx + rx, cy - ry, cy if upper_only else cy + ry)
        if r1 <= r0 or c1 <= c0:
            return
        dx = (self.xs[c0:c1] - cx) / rx
        dy = (self.ys[r0:r1] - cy) / ry
        mask = dy[:, None] ** 2 + dx[None, :] ** 2 <= 1.0
        self.img[r0:r1, c0:c1][mask] = colour

    def polygon(self, pts, colour):
        """Convex polygon (points in order, either orientation)."""
        pts = np.asarray(pts, dtype=np.float64)
        r0, r1, c0, c1 = self._window(pts[:, 0].min(), pts[:, 0].max(), pts[:, 1].min(), pts[:, 1].max())
        if r1 <= r0 or c1 <= c0:
            return
        X, Y = np.meshgrid(self.xs[c0:c1], self.ys[r0:r1])
        sign = None
        inside = np.ones_like(X, dtype=bool)
        for (ax, ay), (bx, by) in zip(pts, np.roll(pts, -1, axis=0)):
            cross = (bx - ax) * (Y - ay) - (by - ay) * (X - ax)
            s = np.sign((bx - ax) * (pts[:, 1].mean() - ay) - (by - ay) * (pts[:, 0].mean() - ax))
            sign = s if s != 0 else (sign or 1)
            inside &= cross * sign >= 0
        self.img[r0:r1, c0:c1][inside] = colour


def camera_of(seg: dict) -> tuple[float, float, float]:
    """(centre x, centre y, zoom) of a segment's camera."""
    if seg["shot"] == "close":
        if seg["action"] == "eat_cheese" and seg.get("mouse") and seg.get("cheese"):
            return (seg["mouse"]["x0"] + seg["cheese"]["x"]) / 2, CLOSE_Y, CLOSE_ZOOM
        if seg.get("cat"):
            return seg["cat"]["x0"], CLOSE_Y, CLOSE_ZOOM
    return WORLD_WIDTH / 2, WORLD_HEIGHT / 2, 1.0


def _grid(size, camera):
    h, w = size
    cx, cy, zoom = camera
    scale = w / WORLD_WIDTH * zoom  # pixels per world unit
    xs = cx + (np.arange(w) + 0.5 - w / 2) / scale
    ys = cy + (np.arange(h) + 0.5 - h / 2) / scale
    return xs, ys


def _background(size, room: str, wall: str, camera) -> np.ndarray:
    h, w = size
    xs, ys = _grid(size, camera)
    img = np.empty((h, w, 3), np.uint8)
    cv = _Canvas(img, xs, ys)
    img[:] = WALL_COLOURS[wall]
    floor = ROOM_FLOOR[room]
    cv.rect(-1e3, WALL_BOTTOM, 1e3, 1e3, floor)
    if room == "kitchen":  # fridge
        cv.rect(2, 6, 22, 44, floor)
    elif room == "living room":  # sofa with arms
        cv.rect(52, 24, 92, 41, floor)
        cv.rect(48, 18, 56, 41, floor)
        cv.rect(88, 18, 96, 41, floor)
    elif room == "garden":  # bushes
        cv.ellipse(12, 32, 12, 12, floor)
        cv.ellipse(28, 35, 9, 9, floor)
    elif room == "bedroom":  # bed with a headboard
        cv.rect(54, 26, 94, 42, floor)
        cv.rect(88, 14, 94, 42, floor)
    cv.ellipse(ROOM_HOLE_X[room], WALL_BOTTOM, 8, 12, HOLE, upper_only=True)
    return img


def _draw_cat(cv: _Canvas, x: float, y_off: float, facing: int, pose: str, scarf, t: float):
    f = 1 if facing >= 0 else -1
    if pose == "sleep":
        cy = CAT_Y + 4
        breathe = 0.8 * math.sin(2 * math.pi * t / 1.5)
        cv.ellipse(x - f * 23, cy + 5, 9, 3.5, CAT_FUR)  # tail along the floor
        cv.ellipse(x, cy, 21, 9 + breathe, CAT_FUR)
        hx, hy = x + f * 22, cy + 1
        cv.ellipse(hx, hy, 9, 8.5, CAT_FUR)
        cv.polygon([(hx - 7, hy - 3), (hx - 3, hy - 13), (hx, hy - 4)], CAT_FUR)
        cv.polygon([(hx, hy - 4), (hx + 3, hy - 13), (hx + 7, hy - 3)], CAT_FUR)
        cv.rect(x + f * 3, cy - 9, x + f * 21, cy + 9, scarf)  # scarf: 18 x 18 world units
        cv.rect(hx + f * 1, hy - 2.5, hx + f * 6, hy - 1.5, EYE)  # closed eye
        return
    cy = CAT_Y + y_off
    cv.ellipse(x - f * 19, cy - 9, 3.5, 10, CAT_FUR)  # upright tail
    for lx in (-12, -6, 6, 12):
        cv.rect(x + f * lx - 2, cy + 2, x + f * lx + 2, cy + 13, CAT_FUR)
    cv.ellipse(x, cy, 17, 9, CAT_FUR)
    hx, hy = x + f * 17, cy - 11
    cv.ellipse(hx, hy, 9, 9, CAT_FUR)
    cv.polygon([(hx - 8, hy - 4), (hx - 5, hy - 14), (hx - 1, hy - 7)], CAT_FUR)
    cv.polygon([(hx + 1, hy - 7), (hx + 5, hy - 14), (hx + 8, hy - 4)], CAT_FUR)
    cv.rect(x + f * 2, cy - 8, x + f * 20, cy + 8, scarf)  # scarf: 18 x 16 world units
    cv.rect(hx + f * 3, hy - 4, hx + f * 6, hy - 1, EYE)


def _draw_mouse(cv: _Canvas, x: float, y: float, facing: int, scale: float, t: float, running: bool):
    if scale <= 0.02:
        return
    f = 1 if facing >= 0 else -1
    bob = 0.8 * abs(math.sin(2 * math.pi * t * 3)) if running else 0.0
    y = y - bob
    s = scale
    cv.rect(x - f * 18 * s, y + 2 * s, x - f * 8 * s, y + 3.5 * s, MOUSE_FUR)  # tail
    cv.ellipse(x, y, 9 * s, 6 * s, MOUSE_FUR)
    cv.ellipse(x + f * 9 * s, y - 2 * s, 5.5 * s, 4.5 * s, MOUSE_FUR)
    cv.ellipse(x + f * 5 * s, y - 7 * s, 3.5 * s, 3.5 * s, MOUSE_FUR)
    if s > 0.5:
        cv.rect(x + f * 10 * s, y - 4 * s, x + f * 12 * s, y - 2 * s, EYE)


def _draw_cheese(cv: _Canvas, x: float, size: float):
    base = MOUSE_FLOOR_Y + 6
    w, hgt = 15 * size, 20 * size
    cv.polygon([(x - w, base), (x + w, base), (x + w, base - hgt)], CHEESE)


def _ease(u: float) -> float:
    return u * u * (3 - 2 * u)


def render_segment_frames(story: dict, index: int, size=DEFAULT_SIZE) -> np.ndarray:
    """uint8 [n, H, W, 3] frames segment ``index`` owns (49 for the first, 48 after)."""
    size = check_size(size)
    seg = story["segments"][index]
    facts = story["facts"]
    scarf = SCARF_COLOURS[facts["scarf"]]
    wall = facts["walls"][seg["room"]]
    camera = camera_of(seg)
    bg = _background(size, seg["room"], wall, camera)
    xs, ys = _grid(size, camera)
    ks = range(0, FRAMES_PER_SEGMENT + 1) if index == 0 else range(1, FRAMES_PER_SEGMENT + 1)
    start_frame = segment_frame_ranges(len(story["segments"]))[index][0]
    out = np.empty((len(ks), size[0], size[1], 3), np.uint8)
    for j, k in enumerate(ks):
        u = k / FRAMES_PER_SEGMENT
        t = (start_frame + j) / FPS
        img = out[j]
        img[:] = bg
        cv = _Canvas(img, xs, ys)
        ch = seg.get("cheese")
        if ch:
            bites = math.floor(u * 4) / 4  # four bites over the segment
            _draw_cheese(cv, ch["x"], ch["size0"] + (ch["size1"] - ch["size0"]) * bites)
        m = seg.get("mouse")
        if m:
            if m.get("hide_at") is not None:
                h_at = m["hide_at"]
                v = _ease(min(u / h_at, 1.0))
                mx = m["x0"] + (m["x1"] - m["x0"]) * v
                shrink = min(max((u - h_at) / 0.15, 0.0), 1.0)
                my = MOUSE_FLOOR_Y + (WALL_BOTTOM - 4 - MOUSE_FLOOR_Y) * shrink
                _draw_mouse(cv, mx, my, m["facing"], 1.0 - shrink, t, running=u < h_at)
            else:
                mx = m["x0"] + (m["x1"] - m["x0"]) * u
                _draw_mouse(cv, mx, MOUSE_FLOOR_Y, m["facing"], 1.0, t, running=m["x1"] != m["x0"])
        c = seg.get("cat")
        if c:
            if m and m.get("hide_at") is not None:
                cx = c["x0"] + (c["x1"] - c["x0"]) * _ease(min(u / 0.7, 1.0))
            else:
                cx = c["x0"] + (c["x1"] - c["x0"]) * u
            y_off = 0.0
            if c.get("jump"):
                v = (u - 0.2) / 0.6
                if 0 < v < 1:
                    y_off = -c["jump"] * 4 * v * (1 - v)
            _draw_cat(cv, cx, y_off, c["facing"], c["pose"], scarf, t)
    return out


def iter_segment_frames(story: dict, size=DEFAULT_SIZE) -> Iterator[np.ndarray]:
    """Frames segment by segment (bounded memory for long videos at large sizes)."""
    for i in range(len(story["segments"])):
        yield render_segment_frames(story, i, size)


def render_story(story: dict, size=DEFAULT_SIZE) -> np.ndarray:
    """All frames of a story: uint8 [48 K + 1, H, W, 3]."""
    return np.concatenate(list(iter_segment_frames(story, size)))


def segment_frame_ranges(num_segments: int) -> list[tuple[int, int]]:
    """Pixel frames [start, end) each segment owns (49 for the first, 48 after), from ``geometry``."""
    geo = VideoGeometry(num_segments, latent_height=1, latent_width=1, patch_size=1, text_tokens_per_segment=0)
    return [geo.owned_pixel_frames(i) for i in range(num_segments)]


__all__ = ["DEFAULT_SIZE", "check_size", "iter_segment_frames", "num_frames", "render_segment_frames",
           "render_story", "segment_frame_ranges"]
