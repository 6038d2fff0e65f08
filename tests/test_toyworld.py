"""Toy world: deterministic renderer, facts stated once, Format 3 storyboards, attribute sizes at the latent
resolution, the dataset generator (frame counts, prepare-compatible annotations, disjoint seeds) and the CLI."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest

from ttt_video.ttt_core import geometry
from ttt_video.ttt_core.storyboard import parse_storyboard
from ttt_video.ttt_core.toyworld import (
    ROOMS,
    SCARF_COLOURS,
    VOCABULARY,
    WALL_COLOURS,
    generate_story,
    render_story,
    segment_frame_ranges,
    story_from_storyboard,
    storyboard_text,
    storyboard_words,
)
from ttt_video.ttt_core.toyworld.dataset import (
    HELDOUT_SEEDS,
    TRAIN_SEEDS,
    make_dataset,
    segments_for_seed,
    split_seeds,
)
from ttt_video.ttt_core.toyworld.render import check_size
from ttt_video.ttt_core.toyworld.score import LABELS, classify, score_frames

av = pytest.importorskip("av")
RNG = np.random.default_rng()


def fresh_seeds(n):
    return [int(s) for s in RNG.choice(TRAIN_SEEDS.stop, size=n, replace=False)]


def test_renderer_is_deterministic_from_the_seed_and_sized_by_geometry():
    seed = fresh_seeds(1)[0]
    for k in (1, 2, 5):
        a = render_story(generate_story(seed, k))
        b = render_story(generate_story(seed, k))
        assert a.dtype == np.uint8 and a.shape == (geometry.pixel_frames_for_latent_frames(
            geometry.latent_frames_for_segments(k)), 64, 96, 3)
        assert np.array_equal(a, b)
    assert render_story(generate_story(seed, 21)).shape[0] == 1009
    # another seed tells another story (facts, rooms or actions) and draws other frames
    other = seed + 1
    assert generate_story(other, 5)["segments"] != generate_story(seed, 5)["segments"] or \
        generate_story(other, 5)["facts"] != generate_story(seed, 5)["facts"]
    assert not np.array_equal(render_story(generate_story(other, 5)), render_story(generate_story(seed, 5)))
    # segment ranges tile the video as geometry says (49, then 48 each)
    ranges = segment_frame_ranges(4)
    assert ranges[0] == (0, 49) and all(b - a == 48 for a, b in ranges[1:]) and ranges[-1][1] == 193
    # same story at 128x192: the same picture at twice the resolution (2x2 blocks average back to 64x96
    # except along shape edges)
    story = generate_story(seed, 2)
    small, big = render_story(story), render_story(story, (128, 192))
    assert big.shape == (97, 128, 192, 3)
    agree = (classify(big[:, ::2, ::2]) == classify(small)).mean()
    assert agree > 0.95, agree
    for bad in ((64, 64), (10, 15), (65, 96)):
        with pytest.raises(ValueError, match="2:3"):
            check_size(bad)


def test_facts_are_named_once_and_rooms_are_revisited():
    revisit_gaps = []
    for seed in fresh_seeds(25):
        story = generate_story(seed, 21)
        segs, facts = story["segments"], story["facts"]
        assert facts["scarf"] in SCARF_COLOURS and set(facts["walls"]) <= set(ROOMS)
        assert segs[0]["cat"] is not None, "segment 1 shows the cat, whose scarf it names"
        # the scarf colour word and "scarf" only in segment 1
        assert f"{facts['scarf']} scarf" in segs[0]["text"]
        assert all("scarf" not in s["text"] for s in segs[1:])
        first_visit = {}
        for s in segs:
            first_visit.setdefault(s["room"], s["index"])
            named = re.findall(r"(\w+) walls", s["text"])
            if s["index"] == first_visit[s["room"]]:
                assert named == [facts["walls"][s["room"]]] and "walls" in s["states"]
            else:
                assert named == [] and "walls" not in s["states"]
            # no colour word of a fact anywhere else in the text
            words = set(re.findall(r"[a-z]+", s["text"].lower()))
            colour_words = words & (set(WALL_COLOURS) | set(SCARF_COLOURS))
            assert len(colour_words) == len(s["states"]), (s["text"], s["states"])
        for room, first in first_visit.items():
            first_scene = segs[first]["scene"]
            later = [s["index"] for s in segs if s["room"] == room and s["scene"] != first_scene]
            if later:
                revisit_gaps.append(3 * (max(later) - first))
        # cut flags: a new scene is always a cut; the first segment never is
        assert not segs[0]["cut"] and all(s["cut"] for s in segs if s["scene_start"] and s["index"])
    assert max(revisit_gaps) >= 30, "stories must return to a room 30 s or more after its walls were named"


def test_storyboards_parse_and_read_back_into_the_same_story():
    for seed in fresh_seeds(6):
        k = int(RNG.integers(1, 22))
        story = generate_story(seed, k)
        text = storyboard_text(story)
        board = parse_storyboard(text, fmt="format3", source=f"seed{seed}.txt")
        assert board.num_segments == k
        assert [s.text for s in board.segments] == [s["text"] for s in story["segments"]]
        assert [s.requires_scene_transition for s in board.segments] == \
            [s["scene_start"] and s["index"] > 0 for s in story["segments"]]
        assert board.num_scenes == story["segments"][-1]["scene"] + 1
        assert set(storyboard_words(text)) <= set(VOCABULARY), set(storyboard_words(text)) - set(VOCABULARY)
        back = story_from_storyboard(board)
        assert back["facts"] == story["facts"]
        for a, b in zip(back["segments"], story["segments"]):
            for key in ("room", "action", "shot", "cut", "states", "scene", "scene_start"):
                assert a[key] == b[key], (seed, a["index"], key, a[key], b[key])
            assert (a["cat"] is None) == (b["cat"] is None)
            assert (a["mouse"] is None) == (b["mouse"] is None), (a["text"], b["mouse"])
    assert len(VOCABULARY) < 80


def test_scored_attributes_cover_latent_pixels():
    """Every attribute the scorer reads covers several latent (8x8) pixels, and the facts still read right
    after the frames are averaged down to the 8x12 latent grid and blown back up."""
    latent_px = 64
    for seed in fresh_seeds(3):
        story = generate_story(seed, 21)
        frames = render_story(story)
        ranges = segment_frame_ranges(21)
        for seg, (a, b) in zip(story["segments"], ranges):
            lab = classify(frames[a + 3 : b : 6])
            count = {name: (lab == LABELS.index(name)).sum((1, 2)).min() for name in LABELS}
            assert count[f"wall:{story['facts']['walls'][seg['room']]}"] >= 10 * latent_px
            assert count[f"floor:{seg['room']}"] >= 10 * latent_px
            if seg["cat"] is not None:
                assert count[f"scarf:{story['facts']['scarf']}"] >= 4 * latent_px, seg
                assert count["cat"] >= 4 * latent_px
            if seg["cheese"] is not None:
                assert count["cheese"] >= 1 * latent_px
        n, h, w, c = frames.shape
        pooled = frames.reshape(n, h // 8, 8, w // 8, 8, c).mean((2, 4))
        blocky = np.repeat(np.repeat(pooled, 8, 1), 8, 2).round().astype(np.uint8)
        report = score_frames(blocky, story)
        assert report.room_accuracy == 1.0
        assert report.stated_accuracy == 1.0
        assert report.consistency >= 0.95, report.checks


def test_dataset_frame_counts_annotations_and_disjoint_seeds(tmp_path):
    from ttt_video.ttt_core.training.prepare import fit_clip_length, parse_annotations, read_frames_16fps

    offset = int(RNG.integers(0, 1000))
    out = tmp_path / "tw"
    info = make_dataset(out, 3, seed=offset, num_segments=(1, 3), heldout_videos=2, progress=False)
    train = json.loads((out / "train" / "annotations.json").read_text())["videos"]
    held = json.loads((out / "heldout" / "annotations.json").read_text())["videos"]
    assert [v["seed"] for v in train] == list(range(offset, offset + 3))
    assert [v["seed"] for v in held] == list(range(HELDOUT_SEEDS.start + offset, HELDOUT_SEEDS.start + offset + 2))
    assert all(v["seed"] in TRAIN_SEEDS for v in train) and all(v["seed"] in HELDOUT_SEEDS for v in held)
    assert set(TRAIN_SEEDS).isdisjoint(range(HELDOUT_SEEDS.start, HELDOUT_SEEDS.start + 10))
    assert info["splits"]["train"]["seeds"] == [offset, offset + 2]
    for split, videos in (("train", train), ("heldout", held)):
        clips = parse_annotations(out / split / "annotations.json")
        assert len(clips) == len(videos)
        for clip, v in zip(clips, videos):
            k = len(v["segments"])
            assert k == segments_for_seed(v["seed"], (1, 3))
            frames = read_frames_16fps(clip.video, 96, 64, None, None)
            assert len(frames) == 48 * k + 1
            fitted, note = fit_clip_length(frames, clip)
            assert note is None and len(fitted) == 48 * k + 1
            assert clip.transitions == [s["requires_scene_transition"] for s in v["segments"]]
            stem = os.path.basename(v["video"])[:-4]
            events = json.loads((out / split / "events" / f"{stem}.events.json").read_text())
            assert events["seed"] == v["seed"] and len(events["segments"]) == k
            board = parse_storyboard((out / split / "storyboards" / f"{stem}.txt").read_text())
            assert [s.text for s in board.segments] == clip.texts
            # the mp4 is the story: it scores as ground truth
            from ttt_video.ttt_core.toyworld.video_io import read_video

            report = score_frames(read_video(clip.video), events)
            assert report.following == 1.0 and report.smoothness == 1.0
    # a re-run finds everything done (nothing re-rendered); other settings are refused
    mtimes = {p: p.stat().st_mtime_ns for p in (out / "train" / "videos").iterdir()}
    make_dataset(out, 3, seed=offset, num_segments=(1, 3), heldout_videos=2, progress=False)
    assert mtimes == {p: p.stat().st_mtime_ns for p in (out / "train" / "videos").iterdir()}
    with pytest.raises(ValueError, match="other settings"):
        make_dataset(out, 3, seed=offset, num_segments=(1, 3), size=(128, 192), progress=False)
    with pytest.raises(ValueError, match="leave the heldout range"):
        split_seeds("heldout", len(HELDOUT_SEEDS) - 1, 2)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "mine.txt").write_text("not a dataset")
    with pytest.raises(FileExistsError):
        make_dataset(tmp_path / "other", 1, progress=False)


def test_cli_render_storyboard_and_score(tmp_path, capsys):
    from ttt_video.ttt_core import cli

    seed = fresh_seeds(1)[0]
    out = tmp_path / "v.mp4"
    assert cli.main(["toyworld", "render", "--seed", str(seed), "--segments", "3", "--out", str(out)]) == 0
    assert out.is_file() and (tmp_path / "v.txt").is_file() and (tmp_path / "v.events.json").is_file()
    assert cli.main(["toyworld", "render", "--seed", str(seed), "--segments", "3", "--out", str(out)]) == 1
    assert "exists" in capsys.readouterr().err
    assert cli.main(["toyworld", "storyboard", "--seed", str(seed), "--segments", "3"]) == 0
    assert capsys.readouterr().out == (tmp_path / "v.txt").read_text()
    assert cli.main(["score", str(out), "--storyboard", str(tmp_path / "v.txt"), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["videos"][0]["following"] == 1.0 and data["videos"][0]["num_segments"] == 3
    assert cli.main(["score", str(out), "--storyboard", str(tmp_path / "v.events.json")]) == 0
    assert "storyboard following  100.0%" in capsys.readouterr().out
    assert cli.main(["score", str(out), str(out), "--storyboard-dir", str(tmp_path), "--table",
                     str(tmp_path / "t.md")]) == 0
    assert "**mean** (2 videos)" in (tmp_path / "t.md").read_text()
    assert cli.main(["score", str(out), "--storyboard", str(tmp_path / "missing.txt")]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_cli_dataset_of_held_out_stories_only(tmp_path, capsys):
    # an eval on another machine needs the held-out set alone (--num 0): no training videos, no crash
    from ttt_video.ttt_core import cli

    assert cli.main(["toyworld", "dataset", "--out", str(tmp_path / "d"), "--num", "0", "--segments", "2",
                     "--heldout", "2", "--workers", "1", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "train: 0 video(s)" in out and f"seeds {HELDOUT_SEEDS.start}..{HELDOUT_SEEDS.start + 1}" in out
    held = json.loads((tmp_path / "d" / "heldout" / "annotations.json").read_text())["videos"]
    assert [v["seed"] for v in held] == [HELDOUT_SEEDS.start, HELDOUT_SEEDS.start + 1]


def _scene_lengths(story):
    lengths = []
    for s in story["segments"]:
        if s["scene_start"]:
            lengths.append(0)
        lengths[-1] += 1
    return lengths


def test_shorter_scenes_change_rooms_more_often_and_keep_the_rules():
    seeds = fresh_seeds(20)
    for seed in seeds:
        default = generate_story(seed, 21)
        assert generate_story(seed, 21, max_scene_segments=4) == default  # the default is 4, not recorded
        assert "max_scene_segments" not in default and max(_scene_lengths(default)) <= 4
        for n in (1, 2):
            story = generate_story(seed, 21, max_scene_segments=n)
            assert story["max_scene_segments"] == n and max(_scene_lengths(story)) <= n
            segs = story["segments"]
            assert all(a["room"] != b["room"] for a, b in zip(segs, segs[1:]) if b["scene_start"])
            # still named once each: the scarf in segment 1, each room's walls on its first visit
            first = {}
            for s in segs:
                first.setdefault(s["room"], s["index"])
                assert ("walls" in s["states"]) == (first[s["room"]] == s["index"])
            assert "scarf" in segs[0]["states"]
    changes = lambda n: sum(len(_scene_lengths(generate_story(s, 21, max_scene_segments=n))) for s in seeds)  # noqa: E731
    assert changes(1) == 21 * len(seeds) and changes(2) > changes(4)
    with pytest.raises(ValueError, match="at least one segment"):
        generate_story(seeds[0], 5, max_scene_segments=0)


def test_dataset_max_scene_segments_shortens_training_stories_only(tmp_path, capsys):
    from ttt_video.ttt_core import cli

    offset = int(RNG.integers(0, 1000))
    out = tmp_path / "d"
    assert cli.main(["toyworld", "dataset", "--out", str(out), "--num", "2", "--segments", "4", "--heldout", "1",
                     "--seed", str(offset), "--max-scene-segments", "1", "--quiet"]) == 0
    capsys.readouterr()
    for v in json.loads((out / "train" / "annotations.json").read_text())["videos"]:
        events = json.loads((out / "train" / "events" / f"{os.path.basename(v['video'])[:-4]}.events.json").read_text())
        assert events == generate_story(v["seed"], 4, max_scene_segments=1) | {"height": 64, "width": 96}
        assert v["segments"][1:] and all(s["requires_scene_transition"] for s in v["segments"][1:])
    held = json.loads((out / "heldout" / "annotations.json").read_text())["videos"]
    events = json.loads((out / "heldout" / "events" / f"{os.path.basename(held[0]['video'])[:-4]}.events.json").read_text())
    assert events == generate_story(held[0]["seed"], 4) | {"height": 64, "width": 96}  # held-out: the default
    # the folder remembers the setting: continuing it with another one is refused
    assert cli.main(["toyworld", "dataset", "--out", str(out), "--num", "2", "--segments", "4", "--heldout", "1",
                     "--seed", str(offset), "--quiet"]) == 1
    assert "max_scene_segments: 1 vs 4" in capsys.readouterr().err
