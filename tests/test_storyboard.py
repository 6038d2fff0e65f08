"""Storyboard parsing: official JSON/JSONL, Format 3, scene tokens, validation and malformed input."""

import json
import os
from pathlib import Path

import pytest

from ttt_video.ttt_core.geometry import FPS, latent_frames_for_segments, pixel_frames_for_latent_frames
from ttt_video.ttt_core.storyboard import (
    SCENE_END_TOKEN,
    SCENE_START_TOKEN,
    StoryboardError,
    load_storyboard,
    parse_storyboard,
    validate,
)

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = ROOT / "storyboards"


def _official_style_video(n, transitions):
    return [
        {"text": f"Segment {i} text, with words.", "requires_scene_transition": t, "neg_text": f"neg {i}" if i % 2 else None}
        for i, t in zip(range(n), transitions)
    ]


def _reference_prompts(video):
    """The official PromptManager rule written out independently: a transition at i (> 0) appends the end
    token to i - 1 and prepends the start token to i."""
    texts = [seg["text"] for seg in video]
    out = list(texts)
    for i in range(1, len(texts)):
        if video[i].get("requires_scene_transition"):
            out[i - 1] = out[i - 1] + "<end_scene>"
            out[i] = "<start_scene>" + out[i]
    return out


def test_official_json_scene_tokens_and_video_choice(tmp_path):
    videos = [
        _official_style_video(4, [True, True, False, True]),  # a transition on the first segment is ignored
        _official_style_video(2, [False, True]),
    ]
    path = tmp_path / "story.json"
    path.write_text(json.dumps(videos, indent=2))
    sb = load_storyboard(path)
    assert sb.num_videos == 2 and sb.video_index == 0 and sb.num_segments == 4
    assert sb.prompts() == _reference_prompts(videos[0])
    # never a start token on the first segment, and the first segment's end token comes from segment 1
    assert not sb.prompts()[0].startswith(SCENE_START_TOKEN)
    assert sb.prompts()[0].endswith(SCENE_END_TOKEN)
    assert sb.prompts()[1] == "<start_scene>Segment 1 text, with words."
    assert sb.negative_prompts() == ["", "neg 1", "", "neg 3"]
    sb2 = load_storyboard(path, video_index=1)
    assert sb2.num_segments == 2 and sb2.prompts() == _reference_prompts(videos[1])
    # segment line numbers point at each object's opening brace
    lines = path.read_text().splitlines()
    for seg in sb.segments + sb2.segments:
        assert lines[seg.line - 1].strip().startswith("{")
    assert sb.segments[1].line > sb.segments[0].line


def test_jsonl_one_video_per_line(tmp_path):
    videos = [_official_style_video(3, [False, True, True]), _official_style_video(1, [False])]
    path = tmp_path / "story.jsonl"
    path.write_text("\n".join(json.dumps(v) for v in videos) + "\n")
    sb = load_storyboard(path, video_index=0)
    assert sb.num_videos == 2 and sb.format == "jsonl"
    assert sb.prompts() == _reference_prompts(videos[0])
    assert load_storyboard(path, video_index=1).num_segments == 1
    # auto-detected from text as well
    assert parse_storyboard(path.read_text()).format == "jsonl"


def test_format3_parsing():
    text = """# title comment
Negative prompt: global bad,
  stuff

<scene start>
First   paragraph
line two.

Second paragraph.
Negative: own negative
continues here
<scene end>
<scene start>
Third paragraph.
<scene end>
"""
    sb = parse_storyboard(text, source="mem.txt")
    assert sb.format == "format3"
    assert [s.text for s in sb.segments] == ["First paragraph line two.", "Second paragraph.", "Third paragraph."]
    assert [s.requires_scene_transition for s in sb.segments] == [False, False, True]
    assert [s.line for s in sb.segments] == [6, 9, 14]
    assert sb.negative_prompt == "global bad, stuff"
    assert sb.negative_prompts() == ["global bad, stuff", "own negative continues here", "global bad, stuff"]
    assert sb.prompts() == [
        "First paragraph line two.",
        "Second paragraph.<end_scene>",
        "<start_scene>Third paragraph.",
    ]
    assert sb.num_scenes == 2


def test_format3_without_markers_is_one_scene():
    sb = parse_storyboard("One.\n\nTwo.\n\n\nThree.\n")
    assert sb.num_segments == 3 and sb.num_scenes == 1
    assert sb.prompts() == ["One.", "Two.", "Three."]
    assert sb.negative_prompts() == ["", "", ""]


def test_duration_uses_geometry():
    for n in (1, 3, 21):
        sb = parse_storyboard("\n\n".join(f"Segment {i}." for i in range(n)))
        assert sb.latent_frames == latent_frames_for_segments(n) == 13 + 12 * (n - 1)
        assert sb.pixel_frames == pixel_frames_for_latent_frames(sb.latent_frames)
        assert sb.duration_s == pytest.approx(sb.pixel_frames / FPS)
    assert parse_storyboard("\n\n".join(["x"] * 21)).pixel_frames == 1009


def test_bundled_storyboards():
    one = load_storyboard(BUNDLED / "one_minute.txt")
    assert one.num_segments == 21 and one.latent_frames == 253 and one.pixel_frames == 1009
    # the toy-world default: no negative prompts (the model's unconditional branch is the empty prompt)
    assert one.num_scenes >= 3 and not one.negative_prompt and not any(s.neg_text for s in one.segments)
    prev = load_storyboard(BUNDLED / "preview_9s.txt")
    assert prev.num_segments == 3 and prev.num_scenes == 2
    features = load_storyboard(BUNDLED / "example_features.txt")
    assert features.num_segments == 21 and features.num_scenes >= 3 and features.negative_prompt
    assert any(s.neg_text for s in features.segments)
    official = load_storyboard(BUNDLED / "example_official.json")
    assert official.num_videos >= 2 and official.format == "json"
    for sb in (one, prev, features, official):
        for p in sb.prompts():
            assert p.count(SCENE_START_TOKEN) <= 1 and p.count(SCENE_END_TOKEN) <= 1


def _word_counter(text):
    return len(text.replace("<", " <").replace(">", "> ").split()) + 1  # scene tokens are words; +1 for end-of-text


def test_validate_token_budget_and_segment_warning():
    sb = parse_storyboard("<scene start>\none two three\n<scene end>\n<scene start>\na b c d e f g\n<scene end>\n", source="s.txt")
    # with the scene tokens: "one two three<end_scene>" -> 4 words + eos = 5; "<start_scene>a ... g" -> 9
    assert validate(sb, _word_counter, max_tokens=9) == []
    with pytest.raises(StoryboardError) as e:
        validate(sb, _word_counter, max_tokens=6)
    msg = str(e.value)
    assert "segment 2" in msg and "9 tokens, 3 over the budget of 6" in msg and "s.txt" in msg
    assert "segment 1" not in msg.split("\n", 1)[1]  # only the long segment is listed
    assert e.value.segment == 2 and e.value.line == 5
    warnings = validate(sb, max_segments_trained=1)
    assert len(warnings) == 1 and "2 segments" in warnings[0] and "trained for" in warnings[0]
    assert validate(sb, max_segments_trained=2) == []


def test_validate_checks_negative_prompts_too():
    sb = parse_storyboard("short\nNegative: " + "bad " * 20)
    with pytest.raises(StoryboardError, match="negative prompt is 21 tokens, 11 over"):
        validate(sb, _word_counter, max_tokens=10)


# ------------------------------------------------------------------------------------------------------
# malformed input: each is a clear StoryboardError naming where, and nothing else happens

SEG = '{"text": "a cat", "requires_scene_transition": false, "neg_text": null}'

MALFORMED = [
    # (name, fmt/filename suffix, content, expected message fragments, expected line)
    ("empty", ".txt", "", ["empty"], None),
    ("whitespace only", ".json", "  \n\n ", ["empty"], None),
    ("bad json", ".json", '[[\n' + SEG + ',\n {"text": "x",}\n]]', ["invalid JSON", "line 3", "column"], 3),
    ("bad jsonl line", ".jsonl", "[" + SEG + "]\n[{\"text\": ]\n", ["invalid JSON", "line 2"], 2),
    ("segment without text", ".json", '[[\n' + SEG + ',\n {"neg_text": "x"}\n]]', ['without "text"', "segment 2", "line 3"], 3),
    ("empty text", ".json", '[[{"text": "   "}]]', ['empty "text"', "segment 1"], 1),
    ("unknown field", ".json", '[[\n {"text": "a", "negative": "b", "requires_transition": true}\n]]',
     ["unknown field", "'negative'", "'requires_transition'", "did you mean 'requires_scene_transition'"], 2),
    ("wrong transition type", ".json", '[[{"text": "a"}, {"text": "b", "requires_scene_transition": "yes"}]]',
     ["true or false", "segment 2"], 1),
    ("wrong neg type", ".json", '[[{"text": "a", "neg_text": 3}]]', ['"neg_text" must be a string'], 1),
    ("object at top", ".json", '{"text": "a"}', ["got an object"], 1),
    ("no videos", ".json", "[]", ["no videos"], 1),
    ("empty video", ".json", "[[]]", ["video 0 has no segments"], 1),
    ("segment not an object", ".json", '[["just a string"]]', ["must be an object"], 1),
    ("reserved token in json", ".json", '[[{"text": "a<start_scene>b"}]]', ["<start_scene>", "requires_scene_transition"], 1),
    ("unclosed scene", ".txt", "<scene start>\nA.\n\nB.\n", ["never closed", "line 1"], 1),
    ("end without start", ".txt", "<scene start>\nA.\n<scene end>\n<scene end>\n", ["without a matching <scene start>"], 4),
    ("nested scene", ".txt", "<scene start>\nA.\n<scene start>\nB.\n<scene end>\n<scene end>\n",
     ["inside the scene opened at line 1"], 3),
    ("empty scene", ".txt", "<scene start>\n<scene end>\n", ["has no segments"], 2),
    ("paragraph outside scene", ".txt", "<scene start>\nA.\n<scene end>\n\nB.\n", ["outside a scene", "segment 2"], 5),
    ("negative without text", ".txt", "A.\n\nNegative: blurry\n", ["no text", "segment 2"], 3),
    ("two negatives", ".txt", "A.\nNegative: x\nNegative: y\n", ["second 'Negative:'", "line 3"], 3),
    ("late global negative", ".txt", "A.\n\nNegative prompt: x\n", ["before the first segment"], 3),
    ("marker inside a line", ".txt", "A. <scene end>\n", ["own"], 1),
    ("reserved token in text", ".txt", "A.<end_scene>\n", ["inserted by the loader"], 1),
    ("only comments", ".txt", "# nothing here\n\n# more\n", ["no segments"], None),
    ("video index out of range", ".json", "[[" + SEG + "]]", ["video index 5 out of range", "1 video"], None),
]


@pytest.mark.parametrize("name,suffix,content,fragments,line", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_storyboards(tmp_path, name, suffix, content, fragments, line):
    path = tmp_path / f"bad{suffix}"
    path.write_text(content)
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(StoryboardError) as e:
        load_storyboard(path, video_index=5 if name == "video index out of range" else 0)
    msg = str(e.value)
    assert msg.startswith(str(path)), msg
    for frag in fragments:
        assert frag in msg, (frag, msg)
    assert e.value.line == line, msg
    assert isinstance(e.value, ValueError)
    assert sorted(os.listdir(tmp_path)) == before  # parsing never writes anything


def test_missing_file_and_non_utf8(tmp_path):
    with pytest.raises(StoryboardError, match="file not found"):
        load_storyboard(tmp_path / "nope.txt")
    p = tmp_path / "latin1.txt"
    p.write_bytes("caf\xe9 scene".encode("latin-1"))
    with pytest.raises(StoryboardError, match="not UTF-8"):
        load_storyboard(p)


def test_bad_format_argument():
    with pytest.raises(ValueError, match="unknown storyboard format"):
        parse_storyboard("x", fmt="yaml")
