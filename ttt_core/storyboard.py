"""Storyboards: the text of a multi-segment video, one 3-second segment at a time.

Two input formats are accepted; both give a :class:`Storyboard` of :class:`Segment` objects.

Official JSON / JSONL (test-time-training/ttt-video-dit, ``inputs/example-9s.json``)
    A JSON list of videos, each a list of segment objects
    ``{"text": str, "requires_scene_transition": bool, "neg_text": str | null}``; JSONL holds one
    video (one such list) per line. Only ``text`` is required. A bare list of segment objects (one
    video) is accepted too. One video is picked (``video_index``, default 0); ``Storyboard.num_videos``
    says how many the file holds. Unknown keys are an error that names them.

Format 3 (plain text, written by hand; the paper's "Format 3")::

    # Lines starting with '#' are comments.
    Negative prompt: blurry, deformed limbs, low quality

    <scene start>
    Tom the blue-gray cat naps on a red armchair in a sunny living room. The camera slowly
    pushes in on his face while his whiskers twitch.
    Negative: dark, night

    Jerry the brown mouse tiptoes across the carpet towards a wedge of cheese.
    <scene end>

    <scene start>
    The kitchen at night. ...
    <scene end>

    - A paragraph (lines separated by blank lines) is one 3-s segment; its lines are joined with single
      spaces.
    - ``<scene start>`` / ``<scene end>`` (own line, case-insensitive) wrap the segments of one scene.
      The first segment after a ``<scene start>`` gets ``requires_scene_transition = True`` (except the
      very first segment of the video, as in the official sampler). Markers must balance; scenes may not
      nest or be empty. A file with no markers is a single scene; once markers are used every segment
      must be inside one.
    - A line starting with ``Negative:`` inside a paragraph starts that segment's negative prompt (that
      line and the rest of the paragraph).
    - A paragraph starting with ``Negative prompt:`` before the first segment is the global negative
      prompt, used for every segment without its own.
    - The model's scene tokens (``<start_scene>`` / ``<end_scene>``) are reserved in both formats: the
      loader inserts them.

Scene tokens are inserted exactly like the official ``PromptManager`` (sampler.py): for a segment with a
transition, the previous segment's text gets ``"<end_scene>"`` appended and this one ``"<start_scene>"``
prepended, with no spaces (the official code concatenates the strings directly; T5's tokenizer splits
special tokens out either way, but matching the exact strings keeps token ids identical).
"""

from __future__ import annotations

import difflib
import json
import os
import re
from dataclasses import dataclass
from typing import Callable

from .geometry import FPS, latent_frames_for_segments, pixel_frames_for_latent_frames

SCENE_START_TOKEN = "<start_scene>"
SCENE_END_TOKEN = "<end_scene>"
SEGMENT_FIELDS = ("text", "requires_scene_transition", "neg_text")

_SCENE_START_MARKER = re.compile(r"^<\s*scene\s+start\s*>$", re.IGNORECASE)
_SCENE_END_MARKER = re.compile(r"^<\s*scene\s+end\s*>$", re.IGNORECASE)
_ANY_MARKER = re.compile(r"<\s*scene\s+(start|end)\s*>", re.IGNORECASE)
_NEGATIVE_LINE = re.compile(r"^negative\s*:\s*", re.IGNORECASE)
_GLOBAL_NEGATIVE = re.compile(r"^negative\s+prompt\s*:\s*", re.IGNORECASE)


class StoryboardError(ValueError):
    """A storyboard that cannot be used; the message names the file, line and segment (1-based)."""

    def __init__(self, message: str, *, source: str = "<text>", line: int | None = None, segment: int | None = None):
        self.source = source
        self.line = line
        self.segment = segment
        where = source
        if line is not None:
            where += f", line {line}"
        if segment is not None:
            where += f", segment {segment}"
        super().__init__(f"{where}: {message}")


@dataclass
class Segment:
    """One 3-s segment: its prompt, whether a new scene starts here, an optional negative prompt, and the
    1-based source line it came from (None when unknown)."""

    text: str
    neg_text: str | None = None
    requires_scene_transition: bool = False
    line: int | None = None


@dataclass
class Storyboard:
    """A parsed storyboard. ``negative_prompt`` is the global one (Format 3 header), used for segments
    without their own. ``video_index`` / ``num_videos``: which video of a multi-video JSON file this is."""

    segments: list[Segment]
    negative_prompt: str | None = None
    source: str = "<text>"
    video_index: int = 0
    num_videos: int = 1
    format: str = "format3"

    def __post_init__(self):
        if not self.segments:
            raise StoryboardError("the storyboard has no segments", source=self.source)
        # The official sampler never starts a scene at the very first segment.
        self.segments[0].requires_scene_transition = False

    @property
    def num_segments(self) -> int:
        return len(self.segments)

    @property
    def latent_frames(self) -> int:
        return latent_frames_for_segments(self.num_segments)

    @property
    def pixel_frames(self) -> int:
        return pixel_frames_for_latent_frames(self.latent_frames)

    @property
    def duration_s(self) -> float:
        """Length of the decoded video in seconds (pixel frames / 16 fps)."""
        return self.pixel_frames / FPS

    @property
    def num_scenes(self) -> int:
        return 1 + sum(1 for s in self.segments[1:] if s.requires_scene_transition)

    def prompts(self) -> list[str]:
        """Per-segment prompts with the scene tokens inserted the official way."""
        texts = [s.text for s in self.segments]
        for i in range(1, len(texts)):
            if self.segments[i].requires_scene_transition:
                texts[i - 1] = texts[i - 1] + SCENE_END_TOKEN
                texts[i] = SCENE_START_TOKEN + texts[i]
        return texts

    def negative_prompts(self) -> list[str]:
        """Per-segment negative prompts: the segment's own, else the global one, else ""."""
        fallback = self.negative_prompt or ""
        return [s.neg_text if s.neg_text else fallback for s in self.segments]

    def summary(self) -> str:
        return (
            f"{self.num_segments} segment(s), {self.num_scenes} scene(s), {self.duration_s:.2f} s "
            f"({self.pixel_frames} frames at {FPS} fps)"
            + (f", video {self.video_index + 1} of {self.num_videos}" if self.num_videos > 1 else "")
        )


# ------------------------------------------------------------------------------------------------------
# entry points


def load_storyboard(path: str | os.PathLike, fmt: str = "auto", video_index: int = 0) -> Storyboard:
    """Read and parse a storyboard file (format from ``fmt`` or, for "auto", the extension / content)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise StoryboardError("file not found", source=path)
    try:
        with open(path, "r", encoding="utf-8-sig") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise StoryboardError(f"not UTF-8 text ({e.reason} at byte {e.start})", source=path) from None
    if fmt == "auto":
        ext = os.path.splitext(path)[1].lower()
        fmt = {".json": "json", ".jsonl": "jsonl"}.get(ext, "auto")
    return parse_storyboard(text, fmt=fmt, source=path, video_index=video_index)


def parse_storyboard(text: str, fmt: str = "auto", source: str = "<text>", video_index: int = 0) -> Storyboard:
    """Parse storyboard text. ``fmt``: "auto" (JSON if the first non-blank character is '[' or '{'),
    "json", "jsonl" or "format3"."""
    if fmt not in ("auto", "json", "jsonl", "format3"):
        raise ValueError(f"unknown storyboard format {fmt!r}; use auto, json, jsonl or format3")
    if text.startswith("\ufeff"):
        text = text[1:]
    if not text.strip():
        raise StoryboardError("the storyboard is empty", source=source)
    if fmt == "auto":
        first = text.lstrip()[0]
        if first in "[{":
            fmt = "json"
            # Several JSON values on separate lines: JSONL.
            lines = [ln for ln in text.splitlines() if ln.strip()]
            if len(lines) > 1 and all(ln.lstrip().startswith("[") and ln.rstrip().endswith("]") for ln in lines):
                try:
                    json.loads(text)
                except json.JSONDecodeError:
                    fmt = "jsonl"
        else:
            fmt = "format3"
    if fmt == "format3":
        return _parse_format3(text, source)
    if fmt == "json":
        return _parse_json(text, source, video_index)
    return _parse_jsonl(text, source, video_index)


def validate(
    storyboard: Storyboard,
    token_counter: Callable[[str], int] | None = None,
    max_tokens: int | None = None,
    max_segments_trained: int | None = None,
) -> list[str]:
    """Check a storyboard against a model. Raises :class:`StoryboardError` when a prompt (with its scene
    tokens) or negative prompt is over the text encoder's token budget, naming every such segment and by
    how many tokens; returns warnings (strings) for things that are allowed but risky, such as more
    segments than the model was trained for."""
    warnings: list[str] = []
    if token_counter is not None and max_tokens is not None:
        problems = []
        first_bad = None
        for i, (prompt, neg) in enumerate(zip(storyboard.prompts(), storyboard.negative_prompts())):
            seg = storyboard.segments[i]
            for label, t in (("prompt", prompt), ("negative prompt", neg)):
                if not t:
                    continue
                n = token_counter(t)
                if n > max_tokens:
                    where = f"segment {i + 1}" + (f" (line {seg.line})" if seg.line else "")
                    problems.append(f"{where}: {label} is {n} tokens, {n - max_tokens} over the budget of {max_tokens}")
                    first_bad = first_bad or (i + 1, seg.line)
        if problems:
            raise StoryboardError(
                "text over the text encoder's token budget (shorten these paragraphs; the budget counts the "
                "end-of-text token and any scene token):\n  " + "\n  ".join(problems),
                source=storyboard.source,
                line=first_bad[1],
                segment=first_bad[0],
            )
    if max_segments_trained is not None and storyboard.num_segments > max_segments_trained:
        warnings.append(
            f"{storyboard.source}: {storyboard.num_segments} segments ({storyboard.duration_s:.1f} s) is more than "
            f"the {max_segments_trained} the model was trained for; it will run, but quality past "
            f"{max_segments_trained} segments is untested"
        )
    return warnings


# ------------------------------------------------------------------------------------------------------
# Format 3


def _parse_format3(text: str, source: str) -> Storyboard:
    # Tokenise into items: ("marker", "start"|"end", line) and ("para", [(line_no, text), ...]).
    items: list[tuple] = []
    para: list[tuple[int, str]] = []

    def flush():
        if para:
            items.append(("para", list(para)))
            para.clear()

    for line_no, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if line.startswith("#"):
            continue
        if not line:
            flush()
        elif _SCENE_START_MARKER.match(line):
            flush()
            items.append(("marker", "start", line_no))
        elif _SCENE_END_MARKER.match(line):
            flush()
            items.append(("marker", "end", line_no))
        else:
            if _ANY_MARKER.search(line):
                raise StoryboardError(
                    "scene markers must be on a line of their own", source=source, line=line_no
                )
            for token in (SCENE_START_TOKEN, SCENE_END_TOKEN):
                if token in line:
                    raise StoryboardError(
                        f"{token} is inserted by the loader; mark scenes with <scene start> / <scene end> lines",
                        source=source,
                        line=line_no,
                    )
            para.append((line_no, line))
    flush()

    uses_markers = any(it[0] == "marker" for it in items)
    segments: list[Segment] = []
    global_negative: str | None = None
    in_scene = False
    scene_start_line = None
    scene_has_segments = False
    pending_transition = False

    for it in items:
        if it[0] == "marker":
            kind, line_no = it[1], it[2]
            if kind == "start":
                if in_scene:
                    raise StoryboardError(
                        f"<scene start> inside the scene opened at line {scene_start_line} (missing <scene end>?)",
                        source=source,
                        line=line_no,
                    )
                in_scene, scene_start_line, scene_has_segments = True, line_no, False
                pending_transition = True
            else:
                if not in_scene:
                    raise StoryboardError("<scene end> without a matching <scene start>", source=source, line=line_no)
                if not scene_has_segments:
                    raise StoryboardError(
                        f"the scene opened at line {scene_start_line} has no segments", source=source, line=line_no
                    )
                in_scene = False
            continue

        lines = it[1]
        first_line_no, first_text = lines[0]
        if _GLOBAL_NEGATIVE.match(first_text):
            if segments or in_scene:
                raise StoryboardError(
                    "the global 'Negative prompt:' paragraph must come before the first segment and outside scenes",
                    source=source,
                    line=first_line_no,
                )
            if global_negative is not None:
                raise StoryboardError("a second global 'Negative prompt:' paragraph", source=source, line=first_line_no)
            joined = " ".join([_GLOBAL_NEGATIVE.sub("", first_text, count=1)] + [t for _, t in lines[1:]]).strip()
            if not joined:
                raise StoryboardError("'Negative prompt:' with no text", source=source, line=first_line_no)
            global_negative = _squash(joined)
            continue

        seg_no = len(segments) + 1
        if uses_markers and not in_scene:
            raise StoryboardError(
                "paragraph outside a scene: once <scene start> / <scene end> are used, every segment must be "
                "inside a scene",
                source=source,
                line=first_line_no,
                segment=seg_no,
            )
        text_parts, neg_parts, neg_line = [], [], None
        for line_no, t in lines:
            if _NEGATIVE_LINE.match(t) and not _GLOBAL_NEGATIVE.match(t):
                if neg_line is not None:
                    raise StoryboardError(
                        f"a second 'Negative:' line in one segment (first at line {neg_line})",
                        source=source,
                        line=line_no,
                        segment=seg_no,
                    )
                neg_line = line_no
                neg_parts.append(_NEGATIVE_LINE.sub("", t, count=1))
            elif _GLOBAL_NEGATIVE.match(t):
                raise StoryboardError(
                    "'Negative prompt:' (global) inside a segment; use 'Negative:' for this segment's own, or put "
                    "the global one in its own paragraph before the first segment",
                    source=source,
                    line=line_no,
                    segment=seg_no,
                )
            elif neg_line is not None:
                neg_parts.append(t)
            else:
                text_parts.append(t)
        seg_text = _squash(" ".join(text_parts))
        if not seg_text:
            raise StoryboardError(
                "segment has a 'Negative:' line but no text (a paragraph is one segment; leave no blank line "
                "between a segment and its 'Negative:' line)",
                source=source,
                line=first_line_no,
                segment=seg_no,
            )
        neg_text = _squash(" ".join(neg_parts)) if neg_line is not None else None
        if neg_line is not None and not neg_text:
            raise StoryboardError("'Negative:' with no text", source=source, line=neg_line, segment=seg_no)
        segments.append(
            Segment(text=seg_text, neg_text=neg_text, requires_scene_transition=pending_transition, line=first_line_no)
        )
        pending_transition = False
        scene_has_segments = True

    if in_scene:
        raise StoryboardError(
            f"the scene opened at line {scene_start_line} is never closed (missing <scene end>)",
            source=source,
            line=scene_start_line,
        )
    if not segments:
        raise StoryboardError("no segments (only comments, markers or negative prompts)", source=source)
    return Storyboard(segments=segments, negative_prompt=global_negative, source=source, format="format3")


def _squash(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


# ------------------------------------------------------------------------------------------------------
# JSON / JSONL


def _line_of(text: str, index: int) -> int:
    return text.count("\n", 0, index) + 1


def _json_error(e: json.JSONDecodeError, source: str, line_offset: int = 0) -> StoryboardError:
    return StoryboardError(
        f"invalid JSON: {e.msg} (line {e.lineno + line_offset}, column {e.colno})",
        source=source,
        line=e.lineno + line_offset,
    )


_WS = re.compile(r"[ \t\n\r]*")


def _array_element_offsets(text: str, start: int) -> list[int] | None:
    """Offsets of the elements of the JSON array starting at ``text[start] == '['`` (the text is known to
    be valid JSON). Used only to report line numbers."""
    decoder = json.JSONDecoder()
    if text[start] != "[":
        return None
    idx = _WS.match(text, start + 1).end()
    offsets: list[int] = []
    if text[idx] == "]":
        return offsets
    while True:
        offsets.append(idx)
        _, idx = decoder.raw_decode(text, idx)
        idx = _WS.match(text, idx).end()
        if text[idx] == "]":
            return offsets
        idx = _WS.match(text, idx + 1).end()  # skip ','


def _parse_json(text: str, source: str, video_index: int) -> Storyboard:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise _json_error(e, source) from None
    top = _WS.match(text).end()
    if isinstance(data, dict):
        raise StoryboardError(
            "expected a JSON list of videos (each a list of segment objects), got an object",
            source=source,
            line=_line_of(text, top),
        )
    if not isinstance(data, list):
        raise StoryboardError(
            f"expected a JSON list of videos, got {type(data).__name__}", source=source, line=_line_of(text, top)
        )
    if not data:
        raise StoryboardError("the JSON list holds no videos", source=source, line=_line_of(text, top))
    video_offsets = _array_element_offsets(text, top) or [top] * len(data)
    if all(isinstance(v, dict) for v in data):
        # A bare list of segment objects: one video.
        videos = [data]
        seg_offsets = [video_offsets]
    else:
        videos = data
        seg_offsets = []
        for v, off in zip(data, video_offsets):
            if isinstance(v, list):
                seg_offsets.append(_array_element_offsets(text, off) or [off] * len(v))
            else:
                seg_offsets.append([off])
    return _build_from_videos(
        videos,
        [[_line_of(text, o) for o in offs] for offs in seg_offsets],
        [_line_of(text, o) for o in (video_offsets if len(videos) == len(video_offsets) else [top])],
        source,
        video_index,
        "json",
    )


def _parse_jsonl(text: str, source: str, video_index: int) -> Storyboard:
    videos, seg_lines, video_lines = [], [], []
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            v = json.loads(line)
        except json.JSONDecodeError as e:
            raise _json_error(e, source, line_offset=line_no - 1) from None
        videos.append(v)
        video_lines.append(line_no)
        seg_lines.append([line_no] * (len(v) if isinstance(v, list) else 1))
    if not videos:
        raise StoryboardError("the storyboard is empty", source=source)
    return _build_from_videos(videos, seg_lines, video_lines, source, video_index, "jsonl")


def _build_from_videos(
    videos: list, seg_lines: list[list[int]], video_lines: list[int], source: str, video_index: int, fmt: str
) -> Storyboard:
    n = len(videos)
    if not -n <= video_index < n:
        raise StoryboardError(
            f"video index {video_index} out of range: the file holds {n} video(s) (0..{n - 1})", source=source
        )
    video_index %= n
    video = videos[video_index]
    vline = video_lines[video_index] if video_index < len(video_lines) else None
    if not isinstance(video, list):
        raise StoryboardError(
            f"video {video_index} must be a list of segment objects, got {type(video).__name__}",
            source=source,
            line=vline,
        )
    if not video:
        raise StoryboardError(f"video {video_index} has no segments", source=source, line=vline)
    lines = seg_lines[video_index]
    segments = []
    for i, obj in enumerate(video):
        line = lines[i] if i < len(lines) else vline
        segments.append(_segment_from_obj(obj, source, line, i + 1))
    return Storyboard(segments=segments, source=source, video_index=video_index, num_videos=n, format=fmt)


def _segment_from_obj(obj, source: str, line: int | None, seg_no: int) -> Segment:
    def err(msg: str) -> StoryboardError:
        return StoryboardError(msg, source=source, line=line, segment=seg_no)

    if not isinstance(obj, dict):
        raise err(f"a segment must be an object with a \"text\" field, got {type(obj).__name__}")
    unknown = [k for k in obj if k not in SEGMENT_FIELDS]
    if unknown:
        hints = []
        for k in unknown:
            close = difflib.get_close_matches(str(k), SEGMENT_FIELDS, n=1)
            hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise err(f"unknown field(s) {', '.join(hints)}; allowed: {', '.join(SEGMENT_FIELDS)}")
    if "text" not in obj:
        raise err("segment without \"text\"")
    text = obj["text"]
    if not isinstance(text, str):
        raise err(f"\"text\" must be a string, got {type(text).__name__}")
    if not text.strip():
        raise err("segment with empty \"text\"")
    for token in (SCENE_START_TOKEN, SCENE_END_TOKEN):
        if token in text:
            raise err(f"\"text\" contains {token}; set \"requires_scene_transition\" instead (the loader inserts it)")
    transition = obj.get("requires_scene_transition", False)
    if not isinstance(transition, bool):
        raise err(f"\"requires_scene_transition\" must be true or false, got {transition!r}")
    neg = obj.get("neg_text")
    if neg is not None and not isinstance(neg, str):
        raise err(f"\"neg_text\" must be a string or null, got {type(neg).__name__}")
    # Text is kept as written (the official loader does not normalise whitespace).
    return Segment(text=text, neg_text=neg, requires_scene_transition=transition, line=line)


__all__ = [
    "SCENE_END_TOKEN",
    "SCENE_START_TOKEN",
    "Segment",
    "Storyboard",
    "StoryboardError",
    "load_storyboard",
    "parse_storyboard",
    "validate",
]

