"""The toy-world scorer: ground-truth renders score ~100% through an mp4 round trip (and from the storyboard
text alone); each perturbation lowers the metric it should (scarf / walls -> consistency, room / frozen
frames -> following, temporal noise -> smoothness) and leaves the others; colour classification matches a
float64 nearest-colour reference."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from ttt_video.ttt_core.storyboard import parse_storyboard
from ttt_video.ttt_core.toyworld import (
    ROOMS,
    SCARF_COLOURS,
    WALL_COLOURS,
    generate_story,
    palette,
    render_segment_frames,
    render_story,
    segment_frame_ranges,
    storyboard_text,
)
from ttt_video.ttt_core.toyworld.score import (
    LABELS,
    MAX_COLOUR_DISTANCE,
    SMOOTH_THRESHOLD,
    classify,
    score_frames,
    score_table,
    score_video,
    summarize,
)
from ttt_video.ttt_core.toyworld.video_io import read_video, write_mp4

av = pytest.importorskip("av")
RNG = np.random.default_rng()


def fresh_seed() -> int:
    return int(RNG.integers(0, 1_000_000))


def story_with_revisit(num_segments=21):
    """A fresh story in which some room is shown again in a later scene (most are)."""
    while True:
        story = generate_story(fresh_seed(), num_segments)
        first_scene = {}
        for s in story["segments"]:
            first_scene.setdefault(s["room"], s["scene"])
        if any(s["scene"] != first_scene[s["room"]] for s in story["segments"]):
            return story


def mp4_round_trip(tmp_path, frames, name="v.mp4"):
    path = tmp_path / name
    write_mp4(path, [frames])
    return path


def test_classify_matches_float64_nearest_colour():
    cols = np.array([rgb for _, _, rgb in palette().values()], np.float64)
    # pixels near a palette colour (within 40) and random pixels anywhere
    near = cols[RNG.integers(0, len(cols), 4000)] + RNG.uniform(-23, 23, (4000, 3))
    anywhere = RNG.uniform(0, 255, (20000, 3))
    px = np.clip(np.concatenate([near, anywhere]), 0, 255).round()
    d = np.linalg.norm(px[:, None, :] - cols[None], axis=-1)
    ref = np.where(d.min(1) <= MAX_COLOUR_DISTANCE, d.argmin(1), len(LABELS))
    got = classify(px.astype(np.uint8)[None]).ravel()
    # the lookup table quantises to 8-level bins: it may differ only within a bin's reach of a decision border
    second = np.sort(d, 1)[:, 1]
    clear = (second - d.min(1) > 15) & (np.abs(d.min(1) - MAX_COLOUR_DISTANCE) > 8)
    assert clear.sum() > 10000
    assert np.array_equal(got[clear], ref[clear])
    assert (got[: len(near)] == ref[: len(near)]).mean() > 0.99


def test_ground_truth_scores_full_marks_through_mp4(tmp_path):
    reports = []
    for n, (k, size) in enumerate(((21, (64, 96)), (21, (64, 96)), (6, (128, 192)))):
        story = generate_story(fresh_seed(), k)
        path = mp4_round_trip(tmp_path, render_story(story, size), f"gt{n}.mp4")
        rep = score_video(path, story)
        reports.append(rep)
        assert rep.frames == 48 * k + 1
        assert rep.following == 1.0, rep.text()
        assert rep.consistency == 1.0 and rep.consistency_checks >= k - 1, rep.text()
        assert rep.smoothness == 1.0 and rep.max_change <= SMOOTH_THRESHOLD
        # the storyboard text alone gives the same expectations, hence the same score
        board = tmp_path / f"gt{n}.txt"
        board.write_text(storyboard_text(story))
        rep_txt = score_video(path, board)
        assert (rep_txt.following, rep_txt.consistency, rep_txt.smoothness) == (rep.following, rep.consistency, rep.smoothness)
        assert rep_txt.checks == rep.checks
    # cuts are excluded from smoothness: the ground truth jumps there
    story = story_with_revisit()
    frames = render_story(story)
    cut_starts = [a for s, (a, _) in zip(story["segments"], segment_frame_ranges(21)) if s["cut"]]
    jumps = [np.abs(frames[a].astype(int) - frames[a - 1]).mean() for a in cut_starts]
    assert max(jumps) > SMOOTH_THRESHOLD
    # the table: one row per video and their mean, equal to a plain average
    mean = summarize(reports)
    assert mean["following"] == pytest.approx(np.mean([r.following for r in reports]))
    assert mean["consistency_checks"] == sum(r.consistency_checks for r in reports)
    table = score_table(reports)
    assert table.count("\n") == len(reports) + 2 and "**mean** (3 videos)" in table


def _render_with(story, variant, use_variant):
    return np.concatenate([render_segment_frames(variant if use_variant(i) else story, i) for i in range(len(story["segments"]))])


def test_wrong_scarf_after_segment_one_lowers_consistency_only(tmp_path):
    story = generate_story(fresh_seed(), 21)
    wrong = copy.deepcopy(story)
    wrong["facts"]["scarf"] = str(RNG.choice([c for c in SCARF_COLOURS if c != story["facts"]["scarf"]]))
    frames = _render_with(story, wrong, lambda i: i > 0)
    rep = score_video(mp4_round_trip(tmp_path, frames), story)
    scarf_checks = [c for c in rep.checks if c["fact"] == "scarf"]
    assert scarf_checks and all(c["read"] == wrong["facts"]["scarf"] for c in scarf_checks)
    assert rep.consistency_scarf == 0.0 and rep.consistency_walls == 1.0
    assert rep.consistency < 0.75
    assert rep.following == 1.0 and rep.smoothness == 1.0  # segment 1 is right; the story is followed


def test_wrong_walls_on_return_lowers_long_range_consistency():
    story = story_with_revisit()
    wrong = copy.deepcopy(story)
    for room, colour in story["facts"]["walls"].items():
        wrong["facts"]["walls"][room] = str(RNG.choice([c for c in WALL_COLOURS if c != colour]))
    first_scene = {}
    for s in story["segments"]:
        first_scene.setdefault(s["room"], s["scene"])
    frames = _render_with(story, wrong, lambda i: story["segments"][i]["scene"] != first_scene[story["segments"][i]["room"]])
    rep = score_frames(noisy(frames, 4), story)
    wall_revisits = [c for c in rep.checks if c["fact"] == "walls" and c["revisit"]]
    assert wall_revisits and not any(c["ok"] for c in wall_revisits)
    assert all(c["ok"] for c in rep.checks if not (c["fact"] == "walls" and c["revisit"]))
    assert rep.consistency_revisit < 0.8 and rep.consistency < 1.0
    assert rep.following == 1.0
    # the first segment back in a room follows another room: a gap that only a global layer bridges
    gaps = [c for c in rep.checks if c["gap"]]
    assert any(c["fact"] == "walls" for c in gaps) and not any(c["ok"] for c in gaps if c["fact"] == "walls")


def test_forgetting_after_the_cat_was_away_lowers_gap_consistency():
    """What segment-local attention would do: keep the scarf while the cat stays on screen, re-draw it at
    random once a segment without the cat broke the chain."""
    while True:
        story = generate_story(fresh_seed(), 21)
        segs = story["segments"]
        away = [i for i, s in enumerate(segs) if s["cat"] is None]
        if away and any(s["cat"] is not None for s in segs[away[0] + 1 :]):
            break
    wrong = copy.deepcopy(story)
    wrong["facts"]["scarf"] = str(RNG.choice([c for c in SCARF_COLOURS if c != story["facts"]["scarf"]]))
    rep = score_frames(_render_with(story, wrong, lambda i: i > away[0]), story)
    gap_scarf = [c for c in rep.checks if c["gap"] and c["fact"] == "scarf"]
    assert gap_scarf and not any(c["ok"] for c in gap_scarf)
    assert rep.consistency_gap < 1.0 and rep.consistency_scarf < 1.0 and rep.consistency_walls == 1.0
    assert all(c["ok"] for c in rep.checks if c["segment"] <= away[0])
    assert rep.following == 1.0


def test_wrong_room_lowers_following_not_consistency():
    story = generate_story(fresh_seed(), 12)
    moved = copy.deepcopy(story)
    shift = {r: ROOMS[(ROOMS.index(r) + 1) % len(ROOMS)] for r in ROOMS}
    for s in moved["segments"]:
        s["room"] = shift[s["room"]]
    # keep each segment's wall colour, so only the room (floor and furniture) is wrong
    moved["facts"]["walls"] = {shift[r]: c for r, c in story["facts"]["walls"].items()}
    rep = score_frames(render_story(moved), story)
    assert rep.room_accuracy == 0.0 and rep.action_accuracy == 1.0
    assert rep.following < 0.7
    assert rep.consistency == 1.0


def test_frozen_frames_fail_the_moving_actions():
    story = generate_story(fresh_seed(), 21)
    frames = render_story(story)
    for a, b in segment_frame_ranges(21):
        frames[a:b] = frames[a]
    rep = score_frames(frames, story)
    moving = [s for s in rep.segments if s["action"] in ("chase_left", "chase_right", "jump", "hide")]
    assert moving and not any(s["action_ok"] for s in moving)
    assert rep.action_accuracy < 0.7 and rep.following < 0.9
    assert rep.room_accuracy == 1.0


def noisy(frames, sigma):
    return np.clip(frames + RNG.normal(0, sigma, frames.shape), 0, 255).round().astype(np.uint8)


def test_noise_and_blur(tmp_path):
    story = generate_story(fresh_seed(), 12)
    frames = render_story(story)
    # mild: noise sigma 5 and a 3x3 box blur -> still read perfectly
    f = frames.astype(np.float32)
    p = np.pad(f, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    blurred = sum(p[:, i : i + f.shape[1], j : j + f.shape[2]] for i in range(3) for j in range(3)) / 9
    mild = score_video(mp4_round_trip(tmp_path, noisy(blurred, 5), "mild.mp4"), story)
    assert mild.following >= 0.97 and mild.consistency == 1.0 and mild.smoothness >= 0.97, mild.text()
    # strong temporal noise (sigma 25, fresh every frame): the story is still there, the video flickers
    strong = score_frames(noisy(frames, 25), story)
    assert strong.smoothness < 0.1 and strong.mean_change > SMOOTH_THRESHOLD
    assert strong.following >= 0.95 and strong.consistency >= 0.95
    # a jump inside a segment (its second half spliced from a segment in another room, no cut) is caught
    # by smoothness and by nothing else at that segment's start
    ranges = segment_frame_ranges(12)
    i = int(RNG.integers(0, 12))
    j = next(k for k in range(12) if story["segments"][k]["room"] != story["segments"][i]["room"]) \
        if len({s["room"] for s in story["segments"]}) > 1 else None
    spliced = frames.copy()
    (a, b) = ranges[i]
    mid = (a + b) // 2
    other = render_story(generate_story(fresh_seed(), 12))[ranges[j][0]:] if j is None else frames[ranges[j][0]:]
    spliced[mid:b] = other[: b - mid]
    rep_spliced = score_frames(spliced, story)
    assert rep_spliced.max_change > SMOOTH_THRESHOLD
    assert rep_spliced.smoothness < score_frames(frames, story).smoothness == 1.0


def test_errors_name_the_problem(tmp_path):
    story = generate_story(fresh_seed(), 3)
    frames = render_story(story)
    with pytest.raises(ValueError, match=r"96 frames, but the storyboard's 3 segment\(s\) need 145"):
        score_frames(frames[:96], story)
    board = parse_storyboard("A cat sleeps.\n\nThe cat sleeps in the kitchen.\n", source="s.txt")
    with pytest.raises(ValueError, match="s.txt, segment 1: no room"):
        score_frames(frames, board)
    with pytest.raises(FileNotFoundError):
        score_video(tmp_path / "none.mp4", story)
    bad = copy.deepcopy(story)
    bad["segments"][1]["action"] = "dance"
    with pytest.raises(ValueError, match="segment 2: unknown action 'dance'"):
        score_frames(frames, bad)
    assert read_video(mp4_round_trip(tmp_path, frames)).shape == frames.shape
