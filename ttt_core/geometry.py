"""Segment geometry of a multi-segment video: the one place that knows the 13 / 12 latent-frame rule.

A video is a sequence of 3-second segments. The first segment owns 13 latent frames (49 pixel frames
at 4x temporal compression); every later segment adds 12 new latent frames. Segment-local attention
uses window i = latent frames [12 i, 12 i + 13), so neighbouring windows share one latent frame.
Everybody (model, sampler, decoder, trainer) asks this object instead of recomputing the numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

FIRST_SEGMENT_LATENT_FRAMES = 13
LATER_SEGMENT_LATENT_FRAMES = 12
TEMPORAL_COMPRESSION = 4
SPATIAL_COMPRESSION = 8
SECONDS_PER_SEGMENT = 3
FPS = 16


def latent_frames_for_segments(num_segments: int) -> int:
    if num_segments < 1:
        raise ValueError(f"a video needs at least one segment, got {num_segments}")
    return FIRST_SEGMENT_LATENT_FRAMES + LATER_SEGMENT_LATENT_FRAMES * (num_segments - 1)


def segments_for_latent_frames(latent_frames: int) -> int:
    extra = latent_frames - FIRST_SEGMENT_LATENT_FRAMES
    if extra < 0 or extra % LATER_SEGMENT_LATENT_FRAMES:
        raise ValueError(
            f"{latent_frames} latent frames is not 13 + 12 * k for any segment count k >= 0 "
            f"(valid: 13, 25, 37, ...)"
        )
    return 1 + extra // LATER_SEGMENT_LATENT_FRAMES


def pixel_frames_for_latent_frames(latent_frames: int) -> int:
    return 1 + TEMPORAL_COMPRESSION * (latent_frames - 1)


@dataclass(frozen=True)
class VideoGeometry:
    """Token and frame layout of a video of ``num_segments`` 3-s segments.

    latent_height / latent_width are in latent pixels (pixel size / 8); patch_size is the DiT's spatial
    patch; text_tokens_per_segment is the padded text length of one segment.
    """

    num_segments: int
    latent_height: int
    latent_width: int
    patch_size: int
    text_tokens_per_segment: int

    def __post_init__(self):
        if self.num_segments < 1:
            raise ValueError(f"a video needs at least one segment, got {self.num_segments}")
        if self.latent_height % self.patch_size or self.latent_width % self.patch_size:
            raise ValueError(
                f"latent size {self.latent_height}x{self.latent_width} is not divisible by patch size {self.patch_size}"
            )

    # frames -------------------------------------------------------------------------------------
    @property
    def latent_frames(self) -> int:
        return latent_frames_for_segments(self.num_segments)

    @property
    def pixel_frames(self) -> int:
        return pixel_frames_for_latent_frames(self.latent_frames)

    @property
    def pixel_height(self) -> int:
        return self.latent_height * SPATIAL_COMPRESSION

    @property
    def pixel_width(self) -> int:
        return self.latent_width * SPATIAL_COMPRESSION

    @property
    def duration_s(self) -> float:
        return self.pixel_frames / FPS

    def window(self, segment: int) -> tuple[int, int]:
        """Latent frames [start, end) seen by segment ``segment``'s local attention window."""
        self._check_segment(segment)
        start = LATER_SEGMENT_LATENT_FRAMES * segment
        return start, start + FIRST_SEGMENT_LATENT_FRAMES

    def owned_frames(self, segment: int) -> tuple[int, int]:
        """Latent frames [start, end) that segment ``segment`` adds (13 for the first, 12 after)."""
        self._check_segment(segment)
        if segment == 0:
            return 0, FIRST_SEGMENT_LATENT_FRAMES
        start = FIRST_SEGMENT_LATENT_FRAMES + LATER_SEGMENT_LATENT_FRAMES * (segment - 1)
        return start, start + LATER_SEGMENT_LATENT_FRAMES

    def owned_pixel_frames(self, segment: int) -> tuple[int, int]:
        """Pixel frames [start, end) decoded from segment ``segment``'s owned latent frames."""
        lo, hi = self.owned_frames(segment)
        start = 0 if lo == 0 else pixel_frames_for_latent_frames(lo)
        return start, pixel_frames_for_latent_frames(hi)

    # tokens -------------------------------------------------------------------------------------
    @property
    def tokens_per_latent_frame(self) -> int:
        return (self.latent_height // self.patch_size) * (self.latent_width // self.patch_size)

    @property
    def video_tokens(self) -> int:
        return self.latent_frames * self.tokens_per_latent_frame

    @property
    def text_tokens(self) -> int:
        return self.num_segments * self.text_tokens_per_segment

    @property
    def total_tokens(self) -> int:
        return self.video_tokens + self.text_tokens

    def _check_segment(self, segment: int) -> None:
        if not 0 <= segment < self.num_segments:
            raise IndexError(f"segment {segment} out of range for a {self.num_segments}-segment video")
