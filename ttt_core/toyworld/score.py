"""Score a toy-world video against its storyboard by reading the story back from the pixels.

Every pixel is classified to the nearest world palette colour (a 32^3 lookup table; pixels farther than
``MAX_COLOUR_DISTANCE`` from every palette colour stay unclassified), so the reading survives h264, mild
noise and blur. Per segment (its own frames, a few frames after the boundary skipped) the scorer reads:

- the room: the most frequent floor / furniture colour;
- the wall colour: the most frequent wall colour;
- the scarf colour: the most frequent scarf colour inside the cat's bounding box;
- the action, from what is on screen and how it moves: cat and mouse present, the cat's horizontal travel
  (chase left / right), its vertical excursion (jump), the mouse vanishing (hide), cheese with the mouse
  and no cat (eat cheese), a still cat lying low (sleep).

Metrics (each a fraction in [0, 1]):

- ``following``: room and action correct in every segment, plus each fact in the segment that names it;
- ``consistency``: every fact checked in every *later* segment where it should be visible (the scarf
  wherever the story has the cat on screen, a room's walls wherever the story is in that room); a segment
  whose colour cannot be read counts as wrong. ``consistency_revisit``: only the checks in a later scene
  than the one that named the fact. ``consistency_gap``: only the checks where the fact is not on screen
  in the previous segment (the cat was away, or another room was shown). Segment-local attention sees the
  previous segment only through one shared latent frame, so these checks are beyond its reach: only a
  global layer (or luck, 1 in 4) gets them right;
- ``smoothness``: the fraction of consecutive frame pairs, outside cuts and scene changes, whose mean
  absolute change is at most ``SMOOTH_THRESHOLD`` (0-255 scale): flicker, noise and jumps lower it.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field

import numpy as np

from .render import segment_frame_ranges
from .world import ACTIONS, EVENTS_FORMAT, check_story, palette, story_from_storyboard

MAX_COLOUR_DISTANCE = 60.0  # palette colours are >= 94 apart
SMOOTH_THRESHOLD = 12.0  # ground truth: <= ~5 per frame pair at 64x96 (see docs/toyworld.md)
SKIP_AFTER_BOUNDARY = 3  # frames at a segment's start left out of the reading (VAE / codec bleed across cuts)
CAT_MIN_FRACTION = 0.01
MOUSE_MIN_FRACTION = 0.006
CHEESE_MIN_FRACTION = 0.003
CHASE_MIN_TRAVEL = 0.15  # of the frame width
JUMP_MIN_RISE = 0.12  # of the frame height
SLEEP_MAX_ASPECT = 0.55  # bounding-box height / width of a lying cat (standing: 0.7)
SLEEP_MIN_LOW = 0.79  # or: the cat's centre this low in the frame (lying: 0.84, standing: 0.73); survives blur

_PALETTE = palette()
LABELS = list(_PALETTE)
_UNKNOWN = len(LABELS)
_ROLE_LABELS: dict[str, list[int]] = {}
for _i, (_label, (_role, _name, _rgb)) in enumerate(_PALETTE.items()):
    _ROLE_LABELS.setdefault(_role, []).append(_i)
_CAT, _MOUSE, _CHEESE = LABELS.index("cat"), LABELS.index("mouse"), LABELS.index("cheese")


def _build_lut() -> np.ndarray:
    centres = (np.arange(32) * 8 + 3.5).astype(np.float32)
    grid = np.stack(np.meshgrid(centres, centres, centres, indexing="ij"), -1).reshape(-1, 3)
    cols = np.array([rgb for _, _, rgb in _PALETTE.values()], np.float32)
    d = np.linalg.norm(grid[:, None, :] - cols[None], axis=-1)
    lut = d.argmin(1).astype(np.uint8)
    lut[d.min(1) > MAX_COLOUR_DISTANCE] = _UNKNOWN
    return lut


_LUT = _build_lut()


def classify(frames: np.ndarray) -> np.ndarray:
    """uint8 [..., 3] -> palette label index per pixel (``len(LABELS)`` = unclassified)."""
    f = frames.astype(np.uint16) >> 3
    return _LUT[(f[..., 0] << 10) | (f[..., 1] << 5) | f[..., 2]]


@dataclass
class SegmentReading:
    index: int
    room: str | None
    walls: str | None
    scarf: str | None
    action: str | None
    cat: float  # fraction of frames with the cat on screen
    mouse: float
    cheese: float
    travel: float  # cat's horizontal travel / frame width (signed)
    rise: float  # cat's highest rise / frame height
    aspect: float | None  # cat bounding box height / width (median)


def _majority(counts: dict[str, int], minimum: int) -> str | None:
    if not counts:
        return None
    name, n = max(counts.items(), key=lambda kv: kv[1])
    return name if n >= minimum else None


def _erode(mask: np.ndarray) -> np.ndarray:
    """4-neighbour binary erosion of [n, H, W] masks (border pixels count as outside)."""
    out = mask.copy()
    out[:, 1:] &= mask[:, :-1]
    out[:, :-1] &= mask[:, 1:]
    out[:, :, 1:] &= mask[:, :, :-1]
    out[:, :, :-1] &= mask[:, :, 1:]
    out[:, 0] = out[:, -1] = False
    out[:, :, 0] = out[:, :, -1] = False
    return out


def read_segment(frames: np.ndarray, index: int = 0) -> SegmentReading:
    """What a segment's frames show (uint8 [n, H, W, 3])."""
    labels = classify(frames)
    n, h, w = labels.shape
    px = h * w
    counts = np.stack([np.bincount(lab.ravel(), minlength=_UNKNOWN + 1) for lab in labels])  # [n, L+1]

    def role_counts(role):
        return {_PALETTE[LABELS[i]][1]: int(counts[:, i].sum()) for i in _ROLE_LABELS[role]}

    room = _majority(role_counts("floor"), int(0.03 * px * n))
    walls = _majority(role_counts("wall"), int(0.03 * px * n))

    # Characters are solid blobs: eroding their masks drops the thin seams of blended colours that h264's
    # half-resolution chroma leaves along edges (red next to green reads as brown, i.e. "mouse").
    cat_mask = _erode(labels == _CAT)
    cat_n = cat_mask.sum((1, 2))
    cat_on = cat_n >= CAT_MIN_FRACTION * px
    mouse_on = _erode(labels == _MOUSE).sum((1, 2)) >= MOUSE_MIN_FRACTION * px
    cheese_on = _erode(labels == _CHEESE).sum((1, 2)) >= CHEESE_MIN_FRACTION * px
    ys, xs = np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64)

    scarf_counts = {_PALETTE[LABELS[i]][1]: 0 for i in _ROLE_LABELS["scarf"]}
    cx, cy, aspects = [], [], []
    for j in np.nonzero(cat_on)[0]:
        m = cat_mask[j]
        col, row = m.sum(0).astype(np.float64), m.sum(1).astype(np.float64)
        tot = col.sum()
        cx.append(col @ xs / tot)
        cy.append(row @ ys / tot)
        # robust bounding box: 3rd..97th percentile of the cat's pixels along each axis
        cc, rc = np.cumsum(col) / tot, np.cumsum(row) / tot
        x0, x1 = np.searchsorted(cc, 0.03), np.searchsorted(cc, 0.97)
        y0, y1 = np.searchsorted(rc, 0.03), np.searchsorted(rc, 0.97)
        aspects.append((y1 - y0 + 1) / (x1 - x0 + 1))
        mx, my = int(0.1 * (x1 - x0 + 1)) + 1, int(0.1 * (y1 - y0 + 1)) + 1
        win = labels[j, max(0, y0 - my) : y1 + my + 1, max(0, x0 - mx) : x1 + mx + 1]
        wc = np.bincount(win.ravel(), minlength=_UNKNOWN + 1)
        for i in _ROLE_LABELS["scarf"]:
            scarf_counts[_PALETTE[LABELS[i]][1]] += int(wc[i])
    scarf = _majority(scarf_counts, int(0.05 * cat_n[cat_on].sum())) if len(cx) else None

    cat_frac, mouse_frac, cheese_frac = float(cat_on.mean()), float(mouse_on.mean()), float(cheese_on.mean())
    travel = rise = 0.0
    aspect = float(np.median(aspects)) if aspects else None
    low = float(np.median(cy) / h) if cy else 0.0
    if len(cx) >= 4:
        k = max(1, len(cx) // 5)
        travel = float((np.median(cx[-k:]) - np.median(cx[:k])) / w)
        base = float(np.median(cy[: max(1, len(cy) // 6)]))
        rise = float(max(0.0, (base - min(cy)) / h))

    q = max(1, n // 5)
    mouse_early = float(mouse_on[: 2 * q].mean())
    mouse_late = float(mouse_on[-q:].mean())
    action = None
    if cat_frac < 0.5:
        if cheese_frac >= 0.5 and mouse_frac >= 0.5:
            action = "eat_cheese"
    elif mouse_early >= 0.5 and mouse_late <= 0.2:
        action = "hide"
    elif abs(travel) >= CHASE_MIN_TRAVEL and mouse_frac >= 0.5:
        action = "chase_right" if travel > 0 else "chase_left"
    elif rise >= JUMP_MIN_RISE:
        action = "jump"
    elif cheese_frac < 0.5 and abs(travel) < CHASE_MIN_TRAVEL / 2 and (
            (aspect is not None and aspect <= SLEEP_MAX_ASPECT) or low >= SLEEP_MIN_LOW):
        action = "sleep"
    return SegmentReading(index, room, walls, scarf, action, cat_frac, mouse_frac, cheese_frac, travel, rise, aspect)


# ------------------------------------------------------------------------------------------------------
@dataclass
class ScoreReport:
    video: str
    num_segments: int
    frames: int
    following: float
    room_accuracy: float
    action_accuracy: float
    stated_accuracy: float | None
    consistency: float | None
    consistency_revisit: float | None
    consistency_gap: float | None
    consistency_scarf: float | None
    consistency_walls: float | None
    consistency_checks: int
    smoothness: float
    mean_change: float
    max_change: float
    segments: list[dict] = field(default_factory=list)
    checks: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def text(self) -> str:
        def pct(v):
            return "  n/a" if v is None else f"{100 * v:5.1f}%"

        lines = [
            f"{self.video}: {self.num_segments} segment(s), {self.frames} frames",
            f"  storyboard following  {pct(self.following)}  (room {pct(self.room_accuracy)}, action "
            f"{pct(self.action_accuracy)}, facts where named {pct(self.stated_accuracy)})",
            f"  long-range consistency {pct(self.consistency)}  (later scenes {pct(self.consistency_revisit)}, "
            f"after a gap {pct(self.consistency_gap)}, scarf {pct(self.consistency_scarf)}, walls "
            f"{pct(self.consistency_walls)}; {self.consistency_checks} checks)",
            f"  smoothness            {pct(self.smoothness)}  (mean change {self.mean_change:.2f}, max {self.max_change:.2f} "
            f"of 255 outside cuts)",
        ]
        bad = [s for s in self.segments if not (s["room_ok"] and s["action_ok"])]
        for s in bad[:10]:
            lines.append(f"    segment {s['index'] + 1}: expected {s['room']} / {s['action']}, read "
                         f"{s['read_room']} / {s['read_action']}")
        if len(bad) > 10:
            lines.append(f"    ... {len(bad) - 10} more segment(s) off the storyboard")
        return "\n".join(lines)


def load_expected(storyboard_or_events) -> dict:
    """The expected story from an events dict / JSON file, a Storyboard, or a storyboard file."""
    from ..storyboard import Storyboard, load_storyboard

    if isinstance(storyboard_or_events, dict):
        return check_story(storyboard_or_events)
    if isinstance(storyboard_or_events, Storyboard):
        return story_from_storyboard(storyboard_or_events)
    path = os.fspath(storyboard_or_events)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"storyboard {path} does not exist")
    if path.lower().endswith(".json"):
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError):
            data = None
        if isinstance(data, dict) and data.get("format") == EVENTS_FORMAT:
            return check_story(data, source=path)
    return story_from_storyboard(load_storyboard(path))


def _mean(values) -> float | None:
    values = list(values)
    return float(np.mean(values)) if values else None


def score_frames(frames: np.ndarray, storyboard_or_events, name: str = "<frames>") -> ScoreReport:
    """Score uint8 frames [N, H, W, 3] (16 fps) against a storyboard or events."""
    story = load_expected(storyboard_or_events)
    segs = story["segments"]
    ranges = segment_frame_ranges(len(segs))
    need = ranges[-1][1]
    if len(frames) < need:
        raise ValueError(
            f"{name}: {len(frames)} frames, but the storyboard's {len(segs)} segment(s) need {need} "
            f"(48 x {len(segs)} + 1 at 16 fps)"
        )
    frames = frames[:need]
    readings = []
    for i, (a, b) in enumerate(ranges):
        skip = SKIP_AFTER_BOUNDARY if i > 0 else 0
        readings.append(read_segment(frames[a + skip : b], i))

    facts = story["facts"]
    per_seg, checks = [], []
    stated_ok = []
    stated_at: dict[tuple, tuple[int, int]] = {}  # fact key -> (segment, scene)
    for s, r in zip(segs, readings):
        room_ok = r.room == s["room"]
        action_ok = r.action == s["action"]
        row = {"index": s["index"], "room": s["room"], "action": s["action"], "read_room": r.room,
               "read_action": r.action, "read_walls": r.walls, "read_scarf": r.scarf, "room_ok": room_ok,
               "action_ok": action_ok, "cat": r.cat, "mouse": r.mouse, "travel": round(r.travel, 3),
               "rise": round(r.rise, 3)}
        for fact in s["states"]:
            if fact == "scarf":
                ok = r.scarf == facts["scarf"]
                stated_at[("scarf",)] = (s["index"], s["scene"])
            else:
                ok = r.walls == facts["walls"][s["room"]]
                stated_at[("walls", s["room"])] = (s["index"], s["scene"])
            stated_ok.append(ok)
            row[f"stated_{fact}_ok"] = ok
        # later segments: every fact already named that should be visible here
        for key, (at, scene) in stated_at.items():
            if at >= s["index"]:
                continue
            if key[0] == "scarf":
                if s.get("cat") is None:
                    continue
                expected, read = facts["scarf"], r.scarf
            else:
                if key[1] != s["room"]:
                    continue
                expected, read = facts["walls"][key[1]], r.walls
            prev = segs[s["index"] - 1]
            gap = prev.get("cat") is None if key[0] == "scarf" else prev["room"] != key[1]
            checks.append({"segment": s["index"], "fact": key[0], "room": key[1] if len(key) > 1 else None,
                           "expected": expected, "read": read, "ok": read == expected,
                           "revisit": s["scene"] != scene, "gap": gap, "named_in_segment": at})
        per_seg.append(row)

    # smoothness: frame pairs inside segments and across boundaries that are not cuts
    diffs = np.abs(np.diff(frames.astype(np.int16), axis=0)).mean(axis=(1, 2, 3))  # pair t: frames t, t+1
    keep = np.ones(len(diffs), bool)
    for s, (a, _) in zip(segs, ranges):
        if s["cut"] and a > 0:
            keep[a - 1] = False
    kept = diffs[keep]
    room_acc = _mean(p["room_ok"] for p in per_seg)
    action_acc = _mean(p["action_ok"] for p in per_seg)
    following = _mean([p["room_ok"] for p in per_seg] + [p["action_ok"] for p in per_seg] + stated_ok)
    return ScoreReport(
        video=name,
        num_segments=len(segs),
        frames=int(len(frames)),
        following=following,
        room_accuracy=room_acc,
        action_accuracy=action_acc,
        stated_accuracy=_mean(stated_ok),
        consistency=_mean(c["ok"] for c in checks),
        consistency_revisit=_mean(c["ok"] for c in checks if c["revisit"]),
        consistency_gap=_mean(c["ok"] for c in checks if c["gap"]),
        consistency_scarf=_mean(c["ok"] for c in checks if c["fact"] == "scarf"),
        consistency_walls=_mean(c["ok"] for c in checks if c["fact"] == "walls"),
        consistency_checks=len(checks),
        smoothness=float((kept <= SMOOTH_THRESHOLD).mean()) if len(kept) else 1.0,
        mean_change=float(kept.mean()) if len(kept) else 0.0,
        max_change=float(kept.max()) if len(kept) else 0.0,
        segments=per_seg,
        checks=checks,
    )


def score_video(video, storyboard_or_events) -> ScoreReport:
    """Score an mp4 (path) or frames (uint8 [N, H, W, 3]) against a storyboard (file or Storyboard) or the
    ground-truth events (dict or ``*.events.json``)."""
    from .video_io import read_video

    if isinstance(video, np.ndarray):
        return score_frames(video, storyboard_or_events)
    return score_frames(read_video(video), storyboard_or_events, name=os.fspath(video))


TABLE_METRICS = (
    ("following", "following"),
    ("room_accuracy", "room"),
    ("action_accuracy", "action"),
    ("consistency", "consistency"),
    ("consistency_revisit", "consistency (later scenes)"),
    ("consistency_gap", "consistency (after a gap)"),
    ("smoothness", "smoothness"),
)


def summarize(reports: list[ScoreReport]) -> dict:
    """Mean of every metric over a set of videos (None where no video has it) and the pooled check counts."""
    out: dict = {"videos": len(reports)}
    for key, _ in TABLE_METRICS:
        vals = [getattr(r, key) for r in reports if getattr(r, key) is not None]
        out[key] = float(np.mean(vals)) if vals else None
    checks = [c for r in reports for c in r.checks]
    out["consistency_pooled"] = _mean(c["ok"] for c in checks)
    out["consistency_gap_pooled"] = _mean(c["ok"] for c in checks if c["gap"])
    out["consistency_checks"] = len(checks)
    return out


def score_table(reports: list[ScoreReport], label: str | None = None, per_video: bool = True) -> str:
    """A Markdown table: one row per video (optional) and the mean over all of them."""
    def pct(v):
        return "n/a" if v is None else f"{100 * v:.1f}"

    head = "| " + " | ".join(["video"] + [h for _, h in TABLE_METRICS]) + " |"
    lines = [head, "|" + "---|" * (len(TABLE_METRICS) + 1)]
    if per_video:
        for r in reports:
            lines.append("| " + " | ".join([os.path.basename(r.video)] + [pct(getattr(r, k)) for k, _ in TABLE_METRICS]) + " |")
    mean = summarize(reports)
    lines.append("| " + " | ".join([f"**{label or 'mean'}** ({len(reports)} videos)"]
                                  + [f"**{pct(mean[k])}**" for k, _ in TABLE_METRICS]) + " |")
    return "\n".join(lines)


__all__ = ["ACTIONS", "LABELS", "ScoreReport", "SegmentReading", "classify", "load_expected", "read_segment",
           "score_frames", "score_table", "score_video", "summarize"]
