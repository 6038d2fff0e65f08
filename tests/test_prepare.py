"""`ttt-video prepare`: 16-fps reading, length rules, annotation formats, resumability, bad inputs.

Videos are made here with PyAV (uniform grey frames whose level encodes the source frame index, so the
16-fps resampling and the crop can be checked), then encoded with the tiny embedded VAE / T5.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

av = pytest.importorskip("av")

from ttt_video.ttt_core.training import prepare as prep  # noqa: E402
from ttt_video.ttt_core.training.data import LatentVideoDataset, load_manifest, sample_generator  # noqa: E402


def make_video(path: Path, n_frames: int, fps: int = 24, size=(128, 80), level=lambda i: (i * 3) % 250, codec="libx264"):
    """Grey frames: frame i has every pixel = level(i); a white bar on the left marks the horizontal crop."""
    w, h = size
    container = av.open(str(path), mode="w")
    stream = container.add_stream(codec, rate=fps)
    stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
    stream.options = {"crf": "0", "preset": "ultrafast"} if codec == "libx264" else {}
    for i in range(n_frames):
        img = np.full((h, w, 3), level(i), dtype=np.uint8)
        img[:, :8] = 255
        frame = av.VideoFrame.from_ndarray(img, format="rgb24")
        for packet in stream.encode(frame):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()
    return path


def test_read_16fps_sample_and_hold_and_cover_crop(tmp_path):
    path = make_video(tmp_path / "a.mp4", 72, fps=24, size=(128, 80))  # 3.0 s
    frames = prep.read_frames_16fps(path, 96, 64, None, None)
    assert frames.shape == (48, 64, 96, 3)  # 3 s at 16 fps: 48 frames (the 49th would be at t = 3.0 s)
    # 128x80 -> cover 96x64: scale max(0.75, 0.8) = 0.8 -> 103x64, centre crop removes 3 columns on the left
    # (the white 8-px bar shrinks to ~6.4 px, 3 of them cropped away)
    centre = frames[:, 32, 48, 0].astype(int)
    expected = np.array([(int(k * 24 / 16) * 3) % 250 for k in range(48)])  # source frame shown at k / 16 s
    assert np.abs(centre - expected).max() <= 3
    assert frames[:, 32, 0, 0].min() > 240  # the bar is still there on the left ...
    assert np.abs(frames[:, 32, 5, 0].astype(int) - expected).max() <= 12  # ... but ~3 px wide, not ~6 (cropped)

    # a window from start_s: frame 0 is the source frame on screen at 1.25 s (index 30)
    part = prep.read_frames_16fps(path, 96, 64, 1.25, 5)
    assert part.shape[0] == 5
    assert abs(int(part[0, 32, 48, 0]) - (30 * 3) % 250) <= 3


EMBEDDED = Path(__file__).resolve().parents[1] / "models" / "embedded-default"


def make_model_root(tmp_path: Path) -> Path:
    """A tiny CogVideoX-format folder: the embedded T5 tokenizer / encoder and a small seeded VAE.

    The VAE is built here (diffusers' AutoencoderKLCogVideoX, 4 latent channels, 8x / 4x compression like the
    embedded one) with at least one resnet per block, which diffusers' encoder needs to change widths."""
    from diffusers import AutoencoderKLCogVideoX

    root = tmp_path / "model"
    root.mkdir()
    for sub in ("tokenizer", "text_encoder"):
        (root / sub).symlink_to(EMBEDDED / sub, target_is_directory=True)
    torch.manual_seed(0)
    vae = AutoencoderKLCogVideoX(block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4,
                                 latent_channels=4, sample_height=64, sample_width=96, scaling_factor=0.7)  # fmt: skip
    vae.save_pretrained(root / "vae", safe_serialization=True)
    return root


def _clip(n_texts, start=None):
    return prep.Clip(Path("v.mp4"), [f"t{i}" for i in range(n_texts)], [False] * n_texts, start, "ann:1")


def test_length_rules_pad_crop_and_mismatch():
    frames = np.zeros((48, 4, 4, 3), np.uint8)
    frames[-1] = 7
    out, note = prep.fit_clip_length(frames, _clip(1))  # exactly 3 s: last frame repeated once
    assert out.shape[0] == 49 and (out[-1] == 7).all() and "repeated" in note
    frames = np.arange(49 + 20)[:, None, None, None].repeat(3, -1).astype(np.uint8)
    out, note = prep.fit_clip_length(frames, _clip(1))  # 20 surplus frames: centre crop
    assert out.shape[0] == 49 and out[0, 0, 0, 0] == 10 and "centre-cropped" in note
    with pytest.raises(prep.AnnotationError, match=r"3 segment text\(s\).*145 frames.*only 100 frames"):
        prep.fit_clip_length(np.zeros((100, 4, 4, 3), np.uint8), _clip(3))
    with pytest.raises(prep.AnnotationError, match=r"9\.0+ s .*3 whole 3-s segments.*1 segment text"):
        prep.fit_clip_length(np.zeros((144, 4, 4, 3), np.uint8), _clip(1))
    out, note = prep.fit_clip_length(np.zeros((300, 4, 4, 3), np.uint8), _clip(2, start=1.0))  # window of a long video
    assert out.shape[0] == 97 and note is None


def test_annotation_formats(tmp_path):
    ours = {"videos": [{"video": "a.mp4", "start_s": 2.0, "segments": [
        {"text": "one"}, {"text": "two", "requires_scene_transition": True}]}]}  # fmt: skip
    (tmp_path / "ours.json").write_text(json.dumps(ours))
    (tmp_path / "official.jsonl").write_text(json.dumps(
        {"mp4": "b.mp4", "text_0": "x", "text_1": "y", "text_2": "z", "scene_start": [True, False, True],
         "scene_end": [True, False, False]}) + "\n")  # fmt: skip
    (tmp_path / "clips.json").write_text(json.dumps(
        {"k1": {"mp4": "ep/c1.mp4", "text": "a", "scene_start": True, "scene_end": False}}))  # fmt: skip
    a = prep.parse_annotations(tmp_path / "ours.json")
    assert a[0].texts == ["one", "two"] and a[0].transitions == [False, True] and a[0].start_s == 2.0
    b = prep.parse_annotations(tmp_path / "official.jsonl")
    assert b[0].texts == ["x", "y", "z"] and b[0].transitions == [False, True, True] and b[0].start_s is None
    c = prep.parse_annotations(tmp_path / "clips.json", videos_root=tmp_path / "root")
    assert c[0].texts == ["a"] and c[0].video == tmp_path / "root" / "ep" / "c1.mp4"
    (tmp_path / "bad.json").write_text(json.dumps([{"mp4": "b.mp4", "text_0": "x", "scene_start": [True, False]}]))
    with pytest.raises(prep.AnnotationError, match="scene_start.*list of 1"):
        prep.parse_annotations(tmp_path / "bad.json")


def test_prepare_end_to_end_resumable_with_bad_cases(tmp_path, capsys):
    vids = tmp_path / "videos"
    vids.mkdir()
    make_video(vids / "long.mp4", 16 * 7, fps=16)  # 7 s: segments from start_s 0.5 -> two 3-s segments fit
    make_video(vids / "exact.mp4", 48, fps=16)  # exactly 3 s
    make_video(vids / "short.mp4", 60, fps=24)  # 2.5 s: too short for one segment
    (vids / "broken.mp4").write_bytes(b"\x00not a video" * 50)
    ann = {"videos": [
        {"video": "long.mp4", "start_s": 0.5, "segments": [{"text": "a cat"}, {"text": "a dog", "requires_scene_transition": True}]},
        {"video": "exact.mp4", "segments": [{"text": "a bird"}]},
        {"video": "short.mp4", "segments": [{"text": "too short"}]},
        {"video": "broken.mp4", "segments": [{"text": "unreadable"}]},
        {"video": "missing.mp4", "segments": [{"text": "nowhere"}]},
    ]}  # fmt: skip
    (vids / "ann.json").write_text(json.dumps(ann))
    out = tmp_path / "prepared"
    model = make_model_root(tmp_path)
    kw = dict(model_root=model, preset_name="tiny", device="cpu")
    s1 = prep.prepare_dataset(annotations=vids / "ann.json", out=out, segments_per_item=1, **kw)
    assert s1.written == 3 and s1.already_done == 0  # long.mp4 -> 2 items, exact.mp4 -> 1
    reasons = dict(s1.skipped)
    assert "length mismatch" in reasons["ann.json:videos[2]"] and "only 40 frames" in reasons["ann.json:videos[2]"]
    assert "unreadable video" in reasons["ann.json:videos[3]"]
    assert "not found" in reasons["ann.json:videos[4]"]
    printed = capsys.readouterr().out
    assert "3 item(s) written" in printed and "skipped ann.json:videos[2]" in printed

    items, info = load_manifest(out / "manifest.jsonl")
    assert info["preset"] == "tiny" and info["pixel_width"] == 96 and info["latent_channels"] == 4
    assert [it.num_segments for it in items] == [1, 1, 1]
    recs = [it.record for it in items]
    # scene tokens are placed within each item as at inference: a 1-segment item has none
    assert recs[0]["texts"] == ["a cat"] and recs[1]["texts"] == ["a dog"]
    assert recs[1]["start_s"] == pytest.approx(3.5)
    for rec in recs:  # paths relative to the manifest, files exist
        assert not Path(rec["vid_emb"]).is_absolute() and (out / rec["vid_emb"]).is_file()
    ds = LatentVideoDataset(out / "manifest.jsonl", 1, expect_channels=4, expect_text=(16, 32))
    lat, txt = ds.load(0, sample_generator(0, 0, 0))
    assert lat.shape == (13, 4, 8, 12) and txt.shape == (1, 16, 32) and torch.isfinite(lat).all()
    assert not list(out.rglob("*.tmp"))  # nothing half-written

    mtime = (out / recs[0]["vid_emb"]).stat().st_mtime_ns
    s2 = prep.prepare_dataset(annotations=vids / "ann.json", out=out, segments_per_item=1, progress=False, **kw)
    assert s2.written == 0 and s2.already_done == 3
    assert (out / recs[0]["vid_emb"]).stat().st_mtime_ns == mtime  # not re-encoded

    with pytest.raises(ValueError, match="other settings"):
        prep.prepare_dataset(annotations=vids / "ann.json", out=out, segments_per_item=2, progress=False, **kw)

    # the same data as one 2-segment item (a 6-s stage)
    s3 = prep.prepare_dataset(annotations=vids / "ann.json", out=tmp_path / "p2", segments_per_item=2, progress=False, **kw)
    assert s3.written == 1
    items2, _ = load_manifest(tmp_path / "p2")
    lat2, txt2 = LatentVideoDataset(tmp_path / "p2", 2).load(0, sample_generator(0, 0, 0))
    assert lat2.shape == (25, 4, 8, 12) and txt2.shape == (2, 16, 32)
    assert items2[0].record["texts"] == ["a cat<end_scene>", "<start_scene>a dog"]


# --------------------------------------------------------------------------------------------------
# decoding ahead on threads, batched text encoding
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_root(tmp_path_factory):
    return make_model_root(tmp_path_factory.mktemp("vae"))


def test_clip_read_ahead_matches_reading_in_turn(tmp_path):
    rng = np.random.default_rng()
    clips = []
    for i in range(5):
        offset = int(rng.integers(0, 50))
        path = make_video(tmp_path / f"c{i}.mp4", 48 + int(rng.integers(0, 30)), fps=16, level=lambda k, o=offset: (o + 5 * k) % 250)
        clips.append(prep.Clip(path, ["x"], [False], None, f"a:{i}"))
    (tmp_path / "bad.mp4").write_bytes(b"\x00garbage" * 40)
    clips.insert(3, prep.Clip(tmp_path / "bad.mp4", ["x"], [False], None, "a:bad"))
    plan = [(n, c) for n, c in enumerate(clips) if n != 1]  # clip 1 is not planned: read when asked
    reader = prep.ClipReadAhead(plan, 96, 64, workers=2, max_bytes=1)  # budget of one clip at a time
    try:
        assert len(reader._ahead) == 1
        for n, clip in enumerate(clips):
            if n == 4:
                continue  # planned but skipped by the consumer: dropped
            if clip.video.name == "bad.mp4":
                with pytest.raises(prep.VideoReadError):
                    reader.take(n, clip)
                continue
            frames, note = reader.take(n, clip)
            ref, ref_note = prep.fit_clip_length(prep.read_frames_16fps(clip.video, 96, 64, None, None), clip)
            assert np.array_equal(frames, ref) and note == ref_note
            assert len(reader._ahead) <= 1
    finally:
        reader.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("decode")]


def _write_ann(folder: Path, entries) -> Path:
    (folder / "ann.json").write_text(json.dumps({"videos": entries}))
    return folder / "ann.json"


def test_pipelined_prepare_writes_what_one_clip_at_a_time_writes(tmp_path, model_root, monkeypatch):
    vids = tmp_path / "videos"
    vids.mkdir()
    rng = np.random.default_rng()
    entries = []
    for i in range(6):
        segs = 1 + i % 2
        offset = int(rng.integers(0, 100))
        make_video(vids / f"v{i}.mp4", 48 * segs, fps=16, level=lambda k, o=offset: (o + 3 * k) % 250)
        texts = [{"text": f"clip {i} part {j} " + "word " * int(rng.integers(1, 30))} for j in range(segs)]
        entries.append({"video": f"v{i}.mp4", "segments": texts})
    entries.insert(2, dict(entries[0]))  # the same clip twice: written once, then already done
    ann = _write_ann(vids, entries)
    kw = dict(model_root=model_root, preset_name="tiny", device="cpu", segments_per_item=1, progress=False,
              store_dtype="fp32")  # fmt: skip

    monkeypatch.setattr(prep, "TEXT_BATCH", 1)  # one item at a time, decoding in turn
    one = prep.prepare_dataset(annotations=ann, out=tmp_path / "one", decode_workers=1, **kw)
    monkeypatch.setattr(prep, "TEXT_BATCH", 4)  # texts of several items per T5 call, 3 decode threads
    many = prep.prepare_dataset(annotations=ann, out=tmp_path / "many", decode_workers=3, **kw)
    assert one.written == many.written == 9 and one.already_done == many.already_done == 1
    assert one.notes == many.notes and one.skipped == many.skipped
    a = (tmp_path / "one" / "manifest.jsonl").read_text().splitlines()
    b = (tmp_path / "many" / "manifest.jsonl").read_text().splitlines()
    assert a == b and len(a) == 9
    from safetensors.torch import load_file

    for rec in map(json.loads, a):
        la, lb = load_file(tmp_path / "one" / rec["vid_emb"]), load_file(tmp_path / "many" / rec["vid_emb"])
        assert torch.equal(la["latent_dist"], lb["latent_dist"])
        for rel in rec["text_chunk_emb"]:
            ta, tb = load_file(tmp_path / "one" / rel)["text_emb"], load_file(tmp_path / "many" / rel)["text_emb"]
            assert torch.allclose(ta, tb, rtol=1e-5, atol=1e-6)  # a row's embedding does not depend on its batch


def test_decode_thread_failure_stops_prepare(tmp_path, model_root, monkeypatch):
    vids = tmp_path / "videos"
    vids.mkdir()
    for i in range(4):
        make_video(vids / f"v{i}.mp4", 48, fps=16)
    ann = _write_ann(vids, [{"video": f"v{i}.mp4", "segments": [{"text": "a"}]} for i in range(4)])
    real = prep.read_frames_16fps

    def failing(path, *a, **k):
        if path.name == "v2.mp4":
            raise KeyError("decoder bug")  # not a per-clip skip reason: must stop the run
        return real(path, *a, **k)

    monkeypatch.setattr(prep, "read_frames_16fps", failing)
    with pytest.raises(KeyError, match="decoder bug"):
        prep.prepare_dataset(annotations=ann, out=tmp_path / "out", model_root=model_root, preset_name="tiny",
                             device="cpu", segments_per_item=1, progress=False, decode_workers=2)  # fmt: skip
    assert not [t for t in threading.enumerate() if t.name.startswith("decode")]



def test_time_limit_keeps_what_is_done_and_a_rerun_continues(tmp_path, model_root, monkeypatch):
    vids = tmp_path / "videos"
    vids.mkdir()
    for i in range(3):
        make_video(vids / f"v{i}.mp4", 48, fps=16, level=lambda k, o=40 * i: (o + 3 * k) % 250)
    ann = _write_ann(vids, [{"video": f"v{i}.mp4", "segments": [{"text": f"clip {i}"}]} for i in range(3)])
    kw = dict(annotations=ann, out=tmp_path / "out", model_root=model_root, preset_name="tiny", device="cpu",
              segments_per_item=1, progress=False)  # fmt: skip
    real_encode = prep.encode_video

    def slow_encode(vae, frames):
        import time

        time.sleep(1.5)  # the first clip alone outlasts the 1-s limit below (set-up before it takes ~0.05 s)
        return real_encode(vae, frames)

    monkeypatch.setattr(prep, "encode_video", slow_encode)
    first = prep.prepare_dataset(max_minutes=1.0 / 60, **kw)
    assert first.written == 1 and any("time limit" in n for n in first.notes)
    assert len(load_manifest(tmp_path / "out" / "manifest.jsonl")[0]) == 1  # the finished item is listed
    rest = prep.prepare_dataset(**kw)
    assert rest.already_done == 1 and rest.written == 2
    assert len(load_manifest(tmp_path / "out" / "manifest.jsonl")[0]) == 3


def test_shards_and_processes_write_what_one_process_writes(tmp_path, model_root):
    """--processes N: clips split round-robin over N processes sharing one out folder; the merged manifest
    lists what a single process lists (same items, same latents), and a re-run finds everything done."""
    import argparse

    from ttt_video.ttt_core.training import cli

    vids = tmp_path / "videos"
    vids.mkdir()
    rng = np.random.default_rng()
    entries = []
    for i in range(5):
        offset = int(rng.integers(0, 100))
        make_video(vids / f"v{i}.mp4", 96, fps=16, level=lambda k, o=offset: (o + 3 * k) % 250)
        entries.append({"video": f"v{i}.mp4", "segments": [{"text": f"clip {i} part {j}"} for j in range(2)]})
    ann = _write_ann(vids, entries)
    kw = dict(annotations=ann, model_root=model_root, preset_name="tiny", device="cpu", segments_per_item=1,
              progress=False, store_dtype="fp32")  # fmt: skip
    one = prep.prepare_dataset(out=tmp_path / "one", **kw)
    assert one.written == 10
    # three shards in turn into one folder (what three processes do side by side), then the merge
    for i in range(3):
        prep.prepare_dataset(out=tmp_path / "sharded", shard=(i, 3), **kw)
    assert not (tmp_path / "sharded" / "manifest.jsonl").exists()
    assert prep.merge_shard_manifests(tmp_path / "sharded") == 10
    assert not list((tmp_path / "sharded").glob("manifest.shard-*"))
    with pytest.raises(ValueError, match="shard 3/3"):
        prep.prepare_dataset(out=tmp_path / "bad", shard=(3, 3), **kw)

    ns = argparse.Namespace(annotations=str(ann), videos=None, out=str(tmp_path / "procs"), model=str(model_root),
                            preset="tiny", segments=1, device="cpu", store_dtype="fp32", limit=0, max_minutes=0.0,
                            processes=2)  # fmt: skip
    assert cli.run_prepare(ns) == 0
    from safetensors.torch import load_file

    ref = {r["id"]: r for r in prep.read_manifest_records(tmp_path / "one" / "manifest.jsonl")}
    for folder in ("sharded", "procs"):
        got = {r["id"]: r for r in prep.read_manifest_records(tmp_path / folder / "manifest.jsonl")}
        assert got.keys() == ref.keys()
        for item_id, rec in got.items():
            a = load_file(tmp_path / "one" / ref[item_id]["vid_emb"])["latent_dist"]
            assert torch.equal(load_file(tmp_path / folder / rec["vid_emb"])["latent_dist"], a)
    again = prep.prepare_dataset(out=tmp_path / "procs", shard=(1, 2), **kw)  # a re-run reads the merged manifest
    assert again.written == 0 and again.already_done == 4


def test_processes_report_a_bad_input_once_per_process_and_fail(tmp_path, model_root, capfd):
    import argparse

    from ttt_video.ttt_core.training import cli

    ann = _write_ann(tmp_path, [{"video": "missing.mp4", "segments": "not a list"}])
    ns = argparse.Namespace(annotations=str(ann), videos=None, out=str(tmp_path / "out"), model=str(model_root),
                            preset="tiny", segments=1, device="cpu", store_dtype="fp32", limit=0, max_minutes=0.0,
                            processes=2)  # fmt: skip
    assert cli.run_prepare(ns) == 1
    err = capfd.readouterr().err
    assert "[shard 0/2] error:" in err and "[shard 1/2] error:" in err and "Traceback" not in err
    assert "failed" in err
