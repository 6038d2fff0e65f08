"""The cat-and-mouse world: palette, vocabulary, stories (event lists) and their Format 3 storyboards.

A *story* is a JSON-able dict, deterministic from ``(seed, num_segments)``::

    {"format": "ttt-video-toyworld-events", "version": 1, "seed": 7, "num_segments": 21,
     "facts": {"scarf": "red", "walls": {"kitchen": "pink", "garden": "mint", ...}},
     "segments": [{"index": 0, "room": "kitchen", "action": "sleep", "shot": "wide", "scene": 0,
                   "scene_start": true, "cut": false, "states": ["walls", "scarf"], "text": "...",
                   "cat": {...} | null, "mouse": {...} | null, "cheese": {...} | null}, ...]}

``cut`` is true when the picture jumps at the segment's first frame (a new scene or a camera cut inside
one); ``states`` lists the facts the segment's text names. The character dicts hold the trajectory the
renderer draws (world units: the 96 x 64 wide shot; ``x0`` -> ``x1`` over the segment).

Long-range facts (the point of the world): the cat's scarf colour is named in segment 1 only, and a
room's wall colour only on the first visit. Both are drawn at random per video, so nothing but the earlier
text says which colour a later segment must show.
"""

from __future__ import annotations

import copy
import re

import numpy as np

EVENTS_FORMAT = "ttt-video-toyworld-events"
EVENTS_VERSION = 1

# World units: the wide shot spans 96 x 64 (width x height); renderers scale to any 2:3 frame size.
WORLD_WIDTH = 96.0
WORLD_HEIGHT = 64.0
WALL_BOTTOM = 38.0  # wall above, floor below
CAT_FLOOR_Y = 52.0  # the cat's torso centre when standing
MOUSE_FLOOR_Y = 46.0  # the mouse runs along the foot of the wall (behind the cat), where the holes are

# ------------------------------------------------------------------------------------------------------
# palette. Every colour the scorer reads is at least 94 RGB units from every other (nearest-colour
# classification survives h264, mild noise and blur). Fixed colours identify characters and rooms; the
# wall and scarf colours are the per-video facts.
# ------------------------------------------------------------------------------------------------------
CAT_FUR = (128, 128, 128)
MOUSE_FUR = (150, 90, 40)
CHEESE = (255, 210, 0)
HOLE = (10, 10, 10)

ROOMS = ("kitchen", "living room", "garden", "bedroom")
ROOM_FLOOR = {  # floor and furniture colour: identifies the room
    "kitchen": (245, 245, 245),  # white tiles and fridge
    "living room": (40, 40, 150),  # navy carpet and sofa
    "garden": (60, 170, 40),  # grass and bushes
    "bedroom": (150, 30, 120),  # plum rug and bed
}
ROOM_HOLE_X = {"kitchen": 80.0, "living room": 14.0, "garden": 82.0, "bedroom": 16.0}

WALL_COLOURS = {
    "pink": (255, 150, 210),
    "blue": (100, 200, 255),
    "orange": (255, 120, 40),
    "mint": (160, 255, 190),
}
SCARF_COLOURS = {
    "red": (220, 20, 20),
    "navy": (20, 60, 240),
    "purple": (160, 40, 220),
    "teal": (0, 140, 130),
}
# "navy" rather than a second "blue" so every colour word names one colour in one role.

ACTIONS = ("chase_left", "chase_right", "jump", "hide", "eat_cheese", "sleep")
CAT_ACTIONS = ("chase_left", "chase_right", "jump", "hide", "sleep")  # the cat is on screen
SHOTS = ("wide", "close")
CLOSE_ZOOM = 1.6

# Every word a generated storyboard uses (lower-case; punctuation aside). A tiny tokenizer covering this
# list covers every toy-world storyboard; ``storyboard_words`` checks it.
VOCABULARY = tuple(sorted(set(
    "a the with in and to of at on back up high into hide hides runs stops sleeps jumps eats watches chases "
    "cuts holds camera shot wide close-up same cat gray mouse brown scarf walls wall floor hole mousehole "
    "piece cheese left right kitchen living room garden bedroom".split()
) | set(WALL_COLOURS) | set(SCARF_COLOURS)))

ACTION_WORDS = {
    "chase_left": "chase left",
    "chase_right": "chase right",
    "jump": "jump",
    "hide": "hide in the mousehole",
    "eat_cheese": "eat cheese",
    "sleep": "sleep",
}


def palette() -> dict[str, tuple[str, str, tuple[int, int, int]]]:
    """label -> (role, name, rgb) for every colour the scorer classifies. Roles: cat, mouse, cheese, hole,
    floor (name = room), wall (name = colour word), scarf (name = colour word)."""
    out = {
        "cat": ("cat", "cat", CAT_FUR),
        "mouse": ("mouse", "mouse", MOUSE_FUR),
        "cheese": ("cheese", "cheese", CHEESE),
        "hole": ("hole", "hole", HOLE),
    }
    for room, rgb in ROOM_FLOOR.items():
        out[f"floor:{room}"] = ("floor", room, rgb)
    for name, rgb in WALL_COLOURS.items():
        out[f"wall:{name}"] = ("wall", name, rgb)
    for name, rgb in SCARF_COLOURS.items():
        out[f"scarf:{name}"] = ("scarf", name, rgb)
    return out


# ------------------------------------------------------------------------------------------------------
# story generation
# ------------------------------------------------------------------------------------------------------
_ACTION_WEIGHTS = {"chase_left": 2, "chase_right": 2, "jump": 1.5, "hide": 1.5, "eat_cheese": 1.5, "sleep": 1.5}


def _chase(direction: int, state: dict, wide: bool):
    """Cat behind the mouse, both run ``direction`` (+1 right, -1 left) until the mouse nears the edge."""
    cat, mouse = state.get("cat"), state.get("mouse")
    end_mouse = 86.0 if direction > 0 else 10.0
    ok = (
        wide and cat is not None and mouse is not None and cat["pose"] == "stand"
        and cat["facing"] == direction == mouse["facing"]
        and (cat["x"] - mouse["x"]) * direction < -20
        and (end_mouse - mouse["x"]) * direction >= 30
    )
    if ok:
        c0, m0 = cat["x"], mouse["x"]
    else:
        m0 = 48.0 - 4.0 * direction
        c0 = m0 - 40.0 * direction
    dx = end_mouse - m0
    return ok, {"x0": c0, "x1": c0 + dx, "pose": "stand", "facing": direction, "jump": 0.0}, \
        {"x0": m0, "x1": m0 + dx, "hide_at": None, "facing": direction}, None


def _jump(state: dict, wide: bool, rng):
    cat, mouse = state.get("cat"), state.get("mouse")
    ok = wide and cat is not None and cat["pose"] == "stand"
    if ok:
        x, facing = cat["x"], cat["facing"]
        m = None if mouse is None else {"x0": mouse["x"], "x1": mouse["x"], "hide_at": None, "facing": mouse["facing"]}
    else:
        facing = int(rng.choice([-1, 1]))
        x, m = 48.0 - 8.0 * facing, None
    return ok, {"x0": x, "x1": x, "pose": "stand", "facing": facing, "jump": 24.0}, m, None


def _hide(state: dict, wide: bool, hole_x: float):
    cat, mouse = state.get("cat"), state.get("mouse")
    ok = (
        wide and cat is not None and mouse is not None and cat["pose"] == "stand" and abs(mouse["x"] - hole_x) >= 24
        and cat["facing"] == mouse["facing"] == (1 if hole_x > mouse["x"] else -1)  # no turning on the spot
    )
    if ok:
        m0, c0 = mouse["x"], cat["x"]
        d = cat["facing"]
    else:
        d = 1 if hole_x > 48 else -1
        m0 = hole_x - 40.0 * d
        c0 = m0 - 34.0 * d
    c1 = hole_x - 30.0 * d
    return ok, {"x0": c0, "x1": c1, "pose": "stand", "facing": d, "jump": 0.0}, \
        {"x0": m0, "x1": hole_x, "hide_at": 0.6, "facing": d}, None


def _eat(state: dict, rng):
    facing = int(rng.choice([-1, 1]))
    m = 48.0 - 12.0 * facing
    return False, None, {"x0": m, "x1": m, "hide_at": None, "facing": facing}, {"x": m + 22.0 * facing, "size0": 1.0, "size1": 0.7}


def _sleep(state: dict, prev_action: str | None, shot: str, prev_shot: str | None, rng):
    cat = state.get("cat")
    ok = prev_action == "sleep" and shot == prev_shot and cat is not None
    if ok:
        x, facing = cat["x"], cat["facing"]
    else:
        facing = int(rng.choice([-1, 1]))
        x = 48.0
    return ok, {"x0": x, "x1": x, "pose": "sleep", "facing": facing, "jump": 0.0}, None, None


MAX_SCENE_SEGMENTS = 4  # scenes last 1-4 segments unless a dataset asks for shorter ones


def generate_story(seed: int, num_segments: int, max_scene_segments: int = MAX_SCENE_SEGMENTS) -> dict:
    """The events of one video, deterministic from ``seed``, ``num_segments`` and ``max_scene_segments`` (numpy
    PCG64). Shorter scenes mean more room changes, i.e. more moments where a remembered wall colour must be tied
    to its room (a training-data option; the held-out stories keep the default)."""
    if num_segments < 1:
        raise ValueError(f"a video needs at least one segment, got {num_segments}")
    if max_scene_segments < 1:
        raise ValueError(f"a scene needs at least one segment, got max_scene_segments={max_scene_segments}")
    rng = np.random.default_rng([int(seed), 0x70E5])
    scarf = str(rng.choice(list(SCARF_COLOURS)))
    walls = {room: str(rng.choice(list(WALL_COLOURS))) for room in ROOMS}
    rooms_used = [str(r) for r in rng.permutation(ROOMS)[: int(rng.integers(2, 4))]]

    # scenes: 1-max_scene_segments segments each, never the same room twice in a row
    scenes: list[tuple[str, int]] = []
    left = num_segments
    prev_room = None
    while left > 0:
        n = min(left, int(rng.integers(1, max_scene_segments + 1)))
        room = str(rng.choice([r for r in rooms_used if r != prev_room]))
        scenes.append((room, n))
        prev_room, left = room, left - n

    actions = list(_ACTION_WEIGHTS)
    p = np.array([_ACTION_WEIGHTS[a] for a in actions])
    p = p / p.sum()
    segments = []
    state: dict = {}
    prev_action = prev_shot = None
    seen_rooms: set[str] = set()
    for scene_no, (room, n) in enumerate(scenes):
        for k in range(n):
            i = len(segments)
            action = str(rng.choice(actions, p=p))
            if i == 0 and action not in CAT_ACTIONS:  # segment 1 shows the cat (it names the scarf)
                action = str(rng.choice(CAT_ACTIONS))
            shot = "close" if action in ("eat_cheese", "sleep") and rng.random() < 0.4 else "wide"
            scene_start = k == 0
            st = {} if scene_start else state
            wide = shot == "wide" and prev_shot == "wide"
            if action in ("chase_left", "chase_right"):
                ok, cat, mouse, cheese = _chase(-1 if action == "chase_left" else 1, st, wide)
            elif action == "jump":
                ok, cat, mouse, cheese = _jump(st, wide, rng)
            elif action == "hide":
                ok, cat, mouse, cheese = _hide(st, wide, ROOM_HOLE_X[room])
            elif action == "eat_cheese":
                ok, cat, mouse, cheese = _eat(st, rng)
            else:
                ok, cat, mouse, cheese = _sleep(st, prev_action if not scene_start else None, shot, prev_shot, rng)
            cut = i > 0 and (scene_start or not ok)
            states = []
            if room not in seen_rooms:
                states.append("walls")
                seen_rooms.add(room)
            if i == 0:
                states.append("scarf")
            seg = {
                "index": i, "room": room, "action": action, "shot": shot, "scene": scene_no,
                "scene_start": scene_start, "cut": cut, "states": states,
                "cat": cat, "mouse": mouse, "cheese": cheese,
            }
            seg["text"] = segment_text(seg, {"scarf": scarf, "walls": walls})
            segments.append(seg)
            # state at the segment's end
            state = {
                "cat": None if cat is None else {"x": cat["x1"], "pose": cat["pose"], "facing": cat["facing"]},
                "mouse": None if mouse is None or mouse["hide_at"] is not None
                else {"x": mouse["x1"], "facing": mouse["facing"]},
            }
            prev_action, prev_shot = action, shot
    story = {
        "format": EVENTS_FORMAT,
        "version": EVENTS_VERSION,
        "seed": int(seed),
        "num_segments": num_segments,
        "facts": {"scarf": scarf, "walls": {r: walls[r] for r in ROOMS if r in seen_rooms}},
        "segments": segments,
    }
    if max_scene_segments != MAX_SCENE_SEGMENTS:  # recorded only when set: events written before it stay valid
        story["max_scene_segments"] = int(max_scene_segments)
    return story


# ------------------------------------------------------------------------------------------------------
# storyboard text
# ------------------------------------------------------------------------------------------------------
def segment_text(seg: dict, facts: dict) -> str:
    """One Format 3 paragraph (room, action, camera) built from the segment's events."""
    room = seg["room"]
    if "walls" in seg["states"]:
        parts = [f"A {room} with {facts['walls'][room]} walls."]
    elif seg["scene_start"]:
        parts = [f"Back in the {room}."]
    else:
        parts = [f"In the {room}."]
    the_cat = f"The gray cat in a {facts['scarf']} scarf" if "scarf" in seg["states"] else "The cat"
    a = seg["action"]
    if a == "chase_left":
        parts.append(f"{the_cat} chases the brown mouse to the left.")
    elif a == "chase_right":
        parts.append(f"{the_cat} chases the brown mouse to the right.")
    elif a == "jump":
        parts.append(f"{the_cat} jumps up high.")
        if seg["mouse"] is not None:
            parts.append("The mouse watches.")
    elif a == "hide":
        parts.append("The mouse runs into the mousehole to hide.")
        parts.append(f"{the_cat} stops at the hole.")
    elif a == "eat_cheese":
        parts.append("The brown mouse eats a piece of cheese.")
    elif a == "sleep":
        parts.append(f"{the_cat} sleeps on the floor.")
    shot = "wide shot" if seg["shot"] == "wide" else "close-up"
    if seg["index"] == 0 or seg["scene_start"]:
        parts.append(f"A {shot}." if seg["shot"] == "wide" else "A close-up.")
    elif seg["cut"]:
        parts.append(f"The camera cuts to a {shot}.")
    else:
        parts.append(f"The camera holds the same {shot}.")
    return " ".join(parts)


def storyboard_text(story: dict) -> str:
    """The story as a Format 3 storyboard: one paragraph per segment, one <scene start>/<scene end> block
    per room visit."""
    lines = [f"# ttt-video toy world, seed {story['seed']}, {story['num_segments']} segment(s)", ""]
    for seg in story["segments"]:
        if seg["scene_start"]:
            if seg["index"] > 0:
                lines += ["<scene end>", ""]
            lines.append("<scene start>")
        lines += [seg["text"], ""]
    lines.append("<scene end>")
    return "\n".join(lines) + "\n"


def storyboard_words(text: str) -> list[str]:
    """The words of a storyboard's segment text (lower-case, no punctuation, comments and markers dropped)."""
    words = []
    for line in text.splitlines():
        s = line.strip()
        if not s or s.startswith("#") or s.startswith("<"):
            continue
        words += re.findall(r"[a-z][a-z-]*", s.lower())
    return words


# ------------------------------------------------------------------------------------------------------
# reading a storyboard back into expected events (for scoring videos from any storyboard in this language)
# ------------------------------------------------------------------------------------------------------
_ROOM_RE = re.compile(r"\b(kitchen|living room|garden|bedroom)\b", re.IGNORECASE)
_WALLS_RE = re.compile(r"\b([a-z]+)\s+walls\b", re.IGNORECASE)
_SCARF_RE = re.compile(r"\b([a-z]+)\s+scarf\b", re.IGNORECASE)


def _action_of(text: str) -> str | None:
    t = text.lower()
    if "chases" in t and "left" in t:
        return "chase_left"
    if "chases" in t and "right" in t:
        return "chase_right"
    if "mousehole" in t or "hide" in t:
        return "hide"
    if "cheese" in t and "eats" in t:
        return "eat_cheese"
    if "sleeps" in t:
        return "sleep"
    if "jumps" in t:
        return "jump"
    return None


def story_from_storyboard(storyboard) -> dict:
    """Expected events from a parsed :class:`~ttt_video.ttt_core.storyboard.Storyboard` written in the world's
    language: room and action per segment, facts where they are named, cuts from scene transitions and
    "cuts" in the text. Raises ValueError naming the segment when a room or an action cannot be found."""
    facts: dict = {"scarf": None, "walls": {}}
    segments = []
    room = None
    scene = 0
    for i, s in enumerate(storyboard.segments):
        text = s.text
        scene_start = i == 0 or s.requires_scene_transition
        if i > 0 and s.requires_scene_transition:
            scene += 1
        m = _ROOM_RE.search(text)
        if m:
            room = m.group(1).lower()
        elif scene_start:
            room = None
        if room is None:
            raise ValueError(f"{storyboard.source}, segment {i + 1}: no room named ({', '.join(ROOMS)})")
        action = _action_of(text)
        if action is None:
            raise ValueError(f"{storyboard.source}, segment {i + 1}: no action found in {text!r}")
        states = []
        w = _WALLS_RE.search(text)
        if w and w.group(1).lower() in WALL_COLOURS and room not in facts["walls"]:
            facts["walls"][room] = w.group(1).lower()
            states.append("walls")
        c = _SCARF_RE.search(text)
        if c and c.group(1).lower() in SCARF_COLOURS and facts["scarf"] is None:
            facts["scarf"] = c.group(1).lower()
            states.append("scarf")
        shot = "close" if "close-up" in text.lower() else "wide"
        cut = i > 0 and (scene_start or "cuts" in text.lower())
        segments.append({
            "index": i, "room": room, "action": action, "shot": shot, "scene": scene, "scene_start": scene_start,
            "cut": cut, "states": states, "text": text,
            "cat": {} if action in CAT_ACTIONS else None,
            "mouse": {} if action != "sleep" and not (action == "jump" and "mouse" not in text.lower()) else None,
            "cheese": {} if action == "eat_cheese" else None,
        })
    return {"format": EVENTS_FORMAT, "version": EVENTS_VERSION, "seed": None, "num_segments": len(segments),
            "facts": facts, "segments": segments}


def check_story(story: dict, source: str = "<events>") -> dict:
    """Validate an events dict (as loaded from JSON); returns a deep copy."""
    if not isinstance(story, dict) or story.get("format") != EVENTS_FORMAT:
        raise ValueError(f"{source}: not a toy-world events file (format {EVENTS_FORMAT!r} expected)")
    segs = story.get("segments")
    if not isinstance(segs, list) or not segs:
        raise ValueError(f"{source}: no segments")
    for i, s in enumerate(segs):
        for key in ("room", "action", "shot", "cut", "states"):
            if key not in s:
                raise ValueError(f"{source}, segment {i + 1}: missing {key!r}")
        if s["room"] not in ROOMS:
            raise ValueError(f"{source}, segment {i + 1}: unknown room {s['room']!r}")
        if s["action"] not in ACTIONS:
            raise ValueError(f"{source}, segment {i + 1}: unknown action {s['action']!r}")
    return copy.deepcopy(story)


__all__ = [
    "ACTIONS", "CAT_ACTIONS", "EVENTS_FORMAT", "ROOMS", "SCARF_COLOURS", "VOCABULARY", "WALL_COLOURS",
    "check_story", "generate_story", "palette", "segment_text", "story_from_storyboard", "storyboard_text",
    "storyboard_words",
]
