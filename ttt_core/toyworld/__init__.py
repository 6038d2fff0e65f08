"""The toy world of the embedded default: a procedural cat-and-mouse cartoon, its storyboards, a dataset
generator for ``ttt-video prepare`` and a scorer that reads the story back from pixels. See docs/toyworld.md.

Pure numpy (plus PyAV for mp4 files); importing it does not import torch.
"""

from .render import DEFAULT_SIZE, iter_segment_frames, num_frames, render_segment_frames, render_story, segment_frame_ranges
from .world import (
    ACTIONS,
    ROOMS,
    SCARF_COLOURS,
    VOCABULARY,
    WALL_COLOURS,
    generate_story,
    palette,
    story_from_storyboard,
    storyboard_text,
    storyboard_words,
)

__all__ = [
    "ACTIONS", "DEFAULT_SIZE", "ROOMS", "SCARF_COLOURS", "VOCABULARY", "WALL_COLOURS", "generate_story",
    "iter_segment_frames", "num_frames", "palette", "render_segment_frames", "render_story",
    "segment_frame_ranges", "story_from_storyboard", "storyboard_text", "storyboard_words",
]
