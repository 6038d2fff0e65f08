"""Storyboard Loader node: a storyboard file (ComfyUI input/ or bundled) or text -> TTT_STORYBOARD."""

from __future__ import annotations

import hashlib
from pathlib import Path

from . import _comfy

TEXT_CHOICE = "(use the text below)"
BUNDLED_PREFIX = "bundled/"
STORYBOARD_EXTENSIONS = (".txt", ".json", ".jsonl")


def bundled_storyboards() -> dict[str, Path]:
    folder = _comfy.PACK_ROOT / "storyboards"
    if not folder.is_dir():
        return {}
    return {BUNDLED_PREFIX + p.name: p for p in sorted(folder.iterdir())
            if p.is_file() and p.suffix.lower() in STORYBOARD_EXTENSIONS}


def input_storyboards() -> dict[str, Path]:
    folder = _comfy.input_directory()
    if not folder.is_dir():
        return {}
    found = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.suffix.lower() in STORYBOARD_EXTENSIONS:
            found[p.relative_to(folder).as_posix()] = p
    return found


def storyboard_choices() -> list[str]:
    return [TEXT_CHOICE, *bundled_storyboards(), *input_storyboards()]


def resolve_storyboard_file(choice: str) -> Path:
    table = {**bundled_storyboards(), **input_storyboards()}
    if choice not in table:
        raise FileNotFoundError(f"storyboard {choice!r} is not in ComfyUI's input folder ({_comfy.input_directory()}) "
                                "or among the bundled ones")
    return table[choice]


class TTTStoryboardLoader:
    """Reads a storyboard: official ttt-video-dit JSON / JSONL or hand-written Format 3 text."""

    CATEGORY = "TTT Video"
    FUNCTION = "load"
    RETURN_TYPES = ("TTT_STORYBOARD", "INT", "FLOAT", "STRING")
    RETURN_NAMES = ("storyboard", "segments", "duration_s", "summary")
    OUTPUT_TOOLTIPS = (
        "the parsed storyboard (prompts with scene tokens, negative prompts)",
        "number of 3-second segments",
        "video length in seconds: (1 + 4 x (latent frames - 1)) / 16 fps",
        "one-line summary",
    )
    DESCRIPTION = ("Load a storyboard: one 3-second segment per paragraph (Format 3 text, scenes in <scene start> ... "
                   "<scene end>, 'Negative:' lines) or the official JSON / JSONL segment list.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "storyboard_file": (storyboard_choices(), {
                    "default": TEXT_CHOICE,
                    "tooltip": "a .txt / .json / .jsonl file from ComfyUI's input folder or a bundled example; "
                               f"'{TEXT_CHOICE}' uses the text box instead",
                }),
                "storyboard_text": ("STRING", {
                    "multiline": True,
                    "default": "",
                    "tooltip": "storyboard text (Format 3 or JSON), used when the file choice is "
                               f"'{TEXT_CHOICE}'. One paragraph = one 3-second segment.",
                }),
                "video_index": ("INT", {
                    "default": 1, "min": 1, "max": 10000,
                    "tooltip": "which video of a multi-video JSON / JSONL file (1-based)",
                }),
            }
        }

    @classmethod
    def IS_CHANGED(cls, storyboard_file, storyboard_text, video_index):
        h = hashlib.sha256(f"{storyboard_file}\0{storyboard_text}\0{video_index}".encode())
        if storyboard_file != TEXT_CHOICE:
            try:
                h.update(resolve_storyboard_file(storyboard_file).read_bytes())
            except OSError:
                pass
        return h.hexdigest()

    def load(self, storyboard_file, storyboard_text, video_index=1):
        from ..ttt_core.storyboard import load_storyboard, parse_storyboard

        if storyboard_file == TEXT_CHOICE:
            if not storyboard_text.strip():
                raise ValueError("Storyboard Loader: the text box is empty; write a storyboard there or pick a file")
            sb = parse_storyboard(storyboard_text, source="storyboard text", video_index=video_index - 1)
        else:
            sb = load_storyboard(resolve_storyboard_file(storyboard_file), video_index=video_index - 1)
        return (sb, sb.num_segments, float(sb.duration_s), sb.summary())
