"""generate(): storyboard -> embeddings -> sampler -> mp4 on the embedded tiny model; errors are clear and leave
no output file; resume through the pipeline equals an uninterrupted run."""

from __future__ import annotations

import os

import pytest
import torch

from ttt_video.ttt_core import pipeline, sampling
from ttt_video.ttt_core.config import preset
from ttt_video.ttt_core.storyboard import StoryboardError, parse_storyboard

av = pytest.importorskip("av")

STORY_3 = """Negative prompt: blurry, low quality

<scene start>
A red ball rolls across a wooden floor in a bright room.

The ball bumps into a blue box and stops.
<scene end>

<scene start>
A cat jumps onto the box and looks at the ball.
Negative: dark
<scene end>
"""


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    cache = tmp_path_factory.mktemp("textcache")
    b = pipeline.load_model_bundle(None, device="cpu")
    b.cache_dir = str(cache)
    return b


def read_video(path):
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        n = sum(1 for _ in c.decode(video=0))
        return n, s.codec_context.width, s.codec_context.height, s.average_rate


def decoded_frames(path):
    with av.open(str(path)) as c:
        return [f.to_ndarray(format="rgb24").tobytes() for f in c.decode(video=0)]


def test_embedded_default_bundle(bundle):
    assert bundle.is_embedded_default and "cat-and-mouse" in bundle.describe()
    assert bundle.scheduler_config["rescale_betas_zero_snr"] is True
    assert bundle.scheduler_config["prediction_type"] == "v_prediction"
    assert bundle.config.to_dict() == {**preset("toyworld").to_dict(), "scan_checkpoint_group_size": bundle.config.scan_checkpoint_group_size}


def test_generate_three_segments(bundle, tmp_path):
    out = tmp_path / "v.mp4"
    events = []
    res = pipeline.generate(parse_storyboard(STORY_3), out, model=bundle, steps=2, seed=3,
                            progress=lambda stage, d, t, info: events.append((stage, d, t)))
    assert res.num_segments == 3 and res.latent_frames == 37 and res.frames == 145
    assert read_video(out) == (145, 96, 64, 16)
    assert ("sample", 2, 2) in events and any(e[0] == "decode" for e in events) and ("encode", 1, 1) in events
    assert any("cat-and-mouse" in w for w in res.warnings)
    assert not os.path.exists(pipeline.default_checkpoint_path(out))


def test_refuses_to_overwrite_and_writes_nothing_on_failure(bundle, tmp_path):
    out = tmp_path / "v.mp4"
    out.write_bytes(b"precious")
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        pipeline.generate(parse_storyboard(STORY_3), out, model=bundle, steps=1)
    assert out.read_bytes() == b"precious"
    # a failing model: the error surfaces, no mp4 appears
    out2 = tmp_path / "w.mp4"

    class Broken(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner, self.config = inner, inner.config

        def forward(self, **kw):
            raise RuntimeError("model exploded")

    broken = pipeline.ModelBundle(**{**bundle.__dict__, "transformer": Broken(bundle.transformer)})
    with pytest.raises(RuntimeError, match="model exploded"):
        pipeline.generate(parse_storyboard(STORY_3), out2, model=broken, steps=1)
    assert not out2.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["v.mp4"]


MALFORMED = {
    "empty": "",
    "whitespace": "   \n\n  \n",
    "bad_json": '[[{"text": "a cat"}',
    "segment_without_text": '[[{"requires_scene_transition": false}]]',
    "empty_text": '[[{"text": "   "}]]',
    "unknown_field": '[[{"text": "a cat", "colour": "red"}]]',
    "text_not_string": '[[{"text": 42}]]',
    "empty_video_list": "[]",
    "unbalanced_scene": "<scene start>\nA cat sits.\n",
    "nested_scene": "<scene start>\n<scene start>\nA cat.\n<scene end>\n<scene end>\n",
    "over_token_budget": " ".join(["cat"] * 400),
    "only_negative": "Negative prompt: blurry\n",
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_storyboards_fail_clearly_without_output(bundle, tmp_path, case):
    src = tmp_path / ("story.json" if MALFORMED[case].lstrip().startswith("[") else "story.txt")
    src.write_text(MALFORMED[case])
    out = tmp_path / "v.mp4"
    with pytest.raises((StoryboardError, ValueError)) as info:
        pipeline.generate(src, out, model=bundle, steps=1)
    msg = str(info.value)
    assert str(src) in msg or "storyboard" in msg.lower()
    if case == "over_token_budget":
        assert "segment 1" in msg and "over the budget" in msg
    assert not out.exists() and not os.path.exists(pipeline.default_checkpoint_path(out))
    assert sorted(p.name for p in tmp_path.iterdir()) == [src.name]


def test_interrupt_then_resume_gives_identical_video(bundle, tmp_path):
    sb = parse_storyboard(STORY_3)
    full = pipeline.generate(sb, tmp_path / "full.mp4", model=bundle, steps=4, seed=9, keep_latents=True,
                             return_frames=True)
    out = tmp_path / "part.mp4"
    calls = {"n": 0}

    def cancel():
        calls["n"] += 1
        return calls["n"] == 3  # stop before step 3

    with pytest.raises(sampling.SamplingInterrupted) as info:
        pipeline.generate(sb, out, model=bundle, steps=4, seed=9, cancel=cancel)
    ckpt = info.value.checkpoint_path
    assert ckpt == pipeline.default_checkpoint_path(out) and os.path.exists(ckpt) and not out.exists()
    meta = sampling.read_checkpoint_meta(ckpt)
    assert meta["extra"]["storyboard"]["segments"][2]["text"].startswith("A cat jumps")
    # storyboard=None: it comes from the checkpoint
    res = pipeline.generate(None, out, model=bundle, resume=ckpt, keep_latents=True, return_frames=True)
    assert torch.equal(res.latents, full.latents)
    # the frames going into the encoder are identical (x264 itself is not byte-reproducible run to run)
    assert torch.equal(res.images, full.images) and res.images.shape == (145, 64, 96, 3)
    assert len(decoded_frames(out)) == 145
    assert not os.path.exists(ckpt)  # done: the stale state is removed


def test_interrupted_decode_resumes_without_sampling(bundle, tmp_path, monkeypatch):
    sb = parse_storyboard(STORY_3)
    out = tmp_path / "v.mp4"

    def ctrl_c_while_decoding(stage, done, total, info):
        if stage == "decode":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pipeline.generate(sb, out, model=bundle, steps=2, seed=1, progress=ctrl_c_while_decoding)
    ckpt = pipeline.default_checkpoint_path(out)
    assert not out.exists() and sampling.read_checkpoint_meta(ckpt)["step"] == 2
    calls = []
    monkeypatch.setattr(sampling, "_call_model", lambda *a, **k: calls.append(1))
    res = pipeline.generate(None, out, model=bundle, resume=ckpt)
    assert calls == [] and res.frames == 145 and out.exists() and not os.path.exists(ckpt)


def test_clear_errors_for_bad_models_and_paths(tmp_path):
    with pytest.raises(pipeline.PipelineError, match="does not exist"):
        pipeline.load_model_bundle(tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(pipeline.PipelineError, match="neither a CogVideoX folder"):
        pipeline.load_model_bundle(empty)
    with pytest.raises(pipeline.PipelineError, match="output folder"):
        pipeline.generate(parse_storyboard(STORY_3), tmp_path / "missing" / "v.mp4", model=None, steps=1)
