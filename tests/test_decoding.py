"""Segment Decoder: streamed decode == whole-video diffusers decode, mp4 read back with PyAV, file safety."""

import json
from pathlib import Path

import av
import pytest
import torch

from ttt_video.ttt_core.decoding import decode_to_mp4, expected_pixel_frames, iter_decoded_segments
from ttt_video.ttt_core.geometry import VideoGeometry, latent_frames_for_segments

ROOT = Path(__file__).resolve().parents[1]
EMBEDDED_VAE = ROOT / "models" / "embedded-default" / "vae"
C = json.loads((EMBEDDED_VAE / "config.json").read_text())["latent_channels"]


@pytest.fixture(scope="module")
def vae():
    from diffusers import AutoencoderKLCogVideoX

    return AutoencoderKLCogVideoX.from_pretrained(str(EMBEDDED_VAE)).eval()


def _latents(num_segments, h=8, w=12, c=C):
    return torch.randn(1, latent_frames_for_segments(num_segments), c, h, w)


def _reference_frames(vae, latents, dtype=torch.float64):
    """Whole-video decode through diffusers' public API, in float64: [N, H, W, 3] in [0, 1]."""
    ref_vae = type(vae).from_config(vae.config).to(dtype).eval()
    ref_vae.load_state_dict(vae.state_dict())
    ref_vae.use_tiling = vae.use_tiling
    for k in ("tile_latent_min_height", "tile_latent_min_width", "tile_sample_min_height", "tile_sample_min_width",
              "tile_overlap_factor_height", "tile_overlap_factor_width"):
        setattr(ref_vae, k, getattr(vae, k))
    z = latents.to(dtype).permute(0, 2, 1, 3, 4) / vae.config.scaling_factor
    with torch.no_grad():
        x = ref_vae.decode(z).sample
    return (x[0] / 2 + 0.5).clamp(0, 1).permute(1, 2, 3, 0).float()


def _read_mp4(path):
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
        return s.average_rate, s.width, s.height, s.codec_context.name, s.format.name, frames


def test_streamed_decode_matches_whole_video_decode(vae):
    lat = _latents(3)
    segs = list(iter_decoded_segments(vae, lat))
    geo = VideoGeometry(3, 8, 12, 2, 16)
    assert [i for i, _ in segs] == [0, 1, 2]
    for i, frames in segs:  # 49 frames for the first segment, 48 after: the geometry's pixel ranges
        lo, hi = geo.owned_pixel_frames(i)
        assert frames.shape == (hi - lo, 64, 96, 3)
    streamed = torch.cat([f for _, f in segs])
    ref = _reference_frames(vae, lat)
    assert streamed.shape == ref.shape == (expected_pixel_frames(37), 64, 96, 3) == (145, 64, 96, 3)
    torch.testing.assert_close(streamed, ref, rtol=0, atol=2e-5)
    assert streamed.std() > 0.01  # not a constant picture


def test_tiled_streamed_decode_matches_diffusers_tiling(vae):
    lat = _latents(2)
    # tile sizes whose pixel/latent arithmetic agrees (as CogVideoX's 720x480 ones do)
    saved = {k: getattr(vae, k) for k in ("tile_latent_min_height", "tile_latent_min_width", "tile_sample_min_height",
                                          "tile_sample_min_width", "tile_overlap_factor_height", "tile_overlap_factor_width")}
    try:
        vae.tile_latent_min_height = vae.tile_latent_min_width = 6
        vae.tile_sample_min_height = vae.tile_sample_min_width = 48
        vae.tile_overlap_factor_height = vae.tile_overlap_factor_width = 1 / 6
        vae.use_tiling = True
        ref = _reference_frames(vae, lat)
        vae.use_tiling = False
        info = decode_to_mp4(vae, lat, None, tiling=True, return_frames=True)
        torch.testing.assert_close(info.frames, ref, rtol=0, atol=2e-5)
        untiled = decode_to_mp4(vae, lat, None, tiling=False, return_frames=True).frames
        assert not torch.allclose(untiled, info.frames)  # tiling really happened
    finally:
        for k, v in saved.items():
            setattr(vae, k, v)
    # the VAE's own tile sizes (diffusers' rounding disagrees for 64x96): still the right size
    info = decode_to_mp4(vae, lat, None, tiling=True, return_frames=True)
    assert info.frames.shape == (97, 64, 96, 3) and torch.isfinite(info.frames).all()


@pytest.mark.parametrize("num_segments", [1, 2])
def test_mp4_read_back(vae, tmp_path, num_segments):
    lat = _latents(num_segments)
    out = tmp_path / "sub" / "video.mp4"
    calls = []
    info = decode_to_mp4(vae, lat, out, return_frames=True, progress=lambda d, t: calls.append((d, t)))
    n = 1 + 4 * (lat.shape[1] - 1)
    assert (info.num_frames, info.width, info.height, info.fps) == (n, 96, 64, 16)
    assert info.duration_s == pytest.approx(n / 16)
    assert info.latent_frames == lat.shape[1] and info.num_segments == num_segments
    assert calls == [(i + 1, num_segments) for i in range(num_segments)]
    rate, w, h, codec, pix_fmt, frames = _read_mp4(out)
    assert (rate, w, h, codec, pix_fmt, len(frames)) == (16, 96, 64, "h264", "yuv420p", n)
    # Lossy (the untrained VAE makes pixel noise, and yuv420p halves its chroma: ~0.06 mean error), but
    # the content is the decoded video in order: the frame-shifted comparison is twice as far off.
    decoded = torch.stack([torch.from_numpy(f) for f in frames]).float() / 255
    err = (decoded - info.frames).abs().mean().item()
    shifted = (decoded - info.frames.roll(1, 0)).abs().mean().item()
    assert err < 0.1 and err < 0.6 * shifted, (err, shifted)
    assert [p.name for p in out.parent.iterdir()] == ["video.mp4"]  # no temp files left


def test_refuses_to_overwrite(vae, tmp_path):
    out = tmp_path / "v.mp4"
    out.write_bytes(b"user data")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        decode_to_mp4(vae, _latents(1), out)
    assert out.read_bytes() == b"user data"
    info = decode_to_mp4(vae, _latents(1), out, overwrite=True)
    assert info.num_frames == 49 and len(_read_mp4(out)[-1]) == 49
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.mp4"]


def test_interrupt_leaves_no_file(vae, tmp_path):
    out = tmp_path / "v.mp4"

    def stop(done, total):
        if done == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        decode_to_mp4(vae, _latents(2), out, progress=stop)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("f_lat", [1, 3, 5, 15])
def test_frame_count_any_odd_latent_length(vae, f_lat):
    info = decode_to_mp4(vae, torch.randn(1, f_lat, C, 8, 12), None, return_frames=True)
    assert info.num_frames == info.frames.shape[0] == 1 + 4 * (f_lat - 1)


def test_scaling_convention(vae):
    lat = _latents(1)
    a = decode_to_mp4(vae, lat, None, return_frames=True).frames
    b = decode_to_mp4(vae, lat / vae.config.scaling_factor, None, return_frames=True, latents_scaled=False).frames
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_bad_latents(vae, tmp_path):
    with pytest.raises(ValueError, match="odd"):
        decode_to_mp4(vae, torch.randn(1, 12, C, 8, 12), tmp_path / "a.mp4")
    with pytest.raises(ValueError, match="channels"):
        decode_to_mp4(vae, torch.randn(1, 13, C + 1, 8, 12), tmp_path / "a.mp4")
    with pytest.raises(ValueError, match=r"\[1, F_lat, C, h, w\]"):
        decode_to_mp4(vae, torch.randn(13, C, 8, 12), tmp_path / "a.mp4")
    with pytest.raises(ValueError, match="batch"):
        decode_to_mp4(vae, torch.randn(2, 13, C, 8, 12), tmp_path / "a.mp4")
    assert list(tmp_path.iterdir()) == []
