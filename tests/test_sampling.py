"""One-Minute Sampler: schedule, update steps against float64 references, guidance, seeds / keep mask,
interrupt + resume (bit-identical), callback, checkpoint file."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

from ttt_video.ttt_core import sampling as S
from ttt_video.ttt_core.config import preset
from ttt_video.ttt_core.dit import TTTDiT
from ttt_video.ttt_core.geometry import VideoGeometry


# ----------------------------------------------------------------------------------------------------
# float64 references, written from the formulas (not from the code under test)
# ----------------------------------------------------------------------------------------------------
def ref_alphas_cumprod() -> np.ndarray:
    """CogVideoX: scaled-linear betas 0.00085..0.012 over 1000 steps, SNR shift 1, zero terminal SNR
    (Lin et al. 2023, Algorithm 1: shift and scale sqrt(alpha_bar) so the last one is 0)."""
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
    abar = np.cumprod(1.0 - betas)
    s = np.sqrt(abar)
    s0, sT = s[0], s[-1]
    s = (s - sT) * s0 / (s0 - sT)
    return s**2


def ref_alpha(abar, t):
    return 1.0 if t < 0 else abar[t]


def ref_ddim(v, x, t, t_prev, abar):
    a, ap = ref_alpha(abar, t), ref_alpha(abar, t_prev)
    x0 = math.sqrt(a) * x - math.sqrt(1 - a) * v
    eps = math.sqrt(1 - a) * x + math.sqrt(a) * v
    return math.sqrt(ap) * x0 + math.sqrt(1 - ap) * eps


def ref_dpmpp_2m(v, x, old_x0, t, t_prev, t_back, noise, abar):
    """The official VPSDEDPMPP2MSampler update in terms of log-SNR lambda = log(sqrt(a / (1 - a)))."""
    a, ap = ref_alpha(abar, t), ref_alpha(abar, t_prev)
    lam = lambda al: 0.5 * math.log(al / (1 - al)) if 0 < al < 1 else (math.inf if al >= 1 else -math.inf)
    h = lam(ap) - lam(a)
    x0 = math.sqrt(a) * x - math.sqrt(1 - a) * v
    keep_x = math.sqrt((1 - ap) / (1 - a)) * math.exp(-h)
    to_x0 = -math.expm1(-2 * h) * math.sqrt(ap)  # = (1 - e^{-2h}) sqrt(a_prev)
    noise_scale = math.sqrt(1 - ap) * math.sqrt(1 - math.exp(-2 * h))
    if old_x0 is not None and t_prev >= 0:
        ab = ref_alpha(abar, t_back)
        r = (lam(a) - lam(ab)) / h
        x0 = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * old_x0
    return keep_x * x + to_x0 * x0 + noise_scale * noise


# ----------------------------------------------------------------------------------------------------
def test_schedule_matches_official_discretisation():
    sched = S.make_scheduler("ddim")
    sched.set_timesteps(50)
    ours = [int(t) for t in sched.timesteps]
    # official: generate_roughly_equally_spaced_steps(50, 1000), sampled from the noisiest
    official = np.linspace(999, 0, 50, endpoint=False).astype(int)[::-1][::-1].tolist()
    assert ours == official == list(range(999, 0, -20))
    assert sched.config.prediction_type == "v_prediction"
    ac = sched.alphas_cumprod.double().numpy()
    np.testing.assert_allclose(ac, ref_alphas_cumprod(), rtol=1e-10, atol=1e-12)
    assert ac[-1] == 0.0  # zero terminal SNR


@pytest.mark.parametrize("steps", [50, 10])
def test_ddim_step_matches_float64_reference_and_diffusers(steps):
    sched = S.make_scheduler("ddim")
    sched.set_timesteps(steps)
    ts = [int(t) for t in sched.timesteps]
    abar = ref_alphas_cumprod()
    g = torch.Generator().manual_seed(1)
    for i in (0, 1, len(ts) // 2, len(ts) - 1):
        x = torch.randn(2, 3, 4, 5, generator=g)
        v = torch.randn(2, 3, 4, 5, generator=g)
        t, tp = ts[i], ts[i + 1] if i + 1 < len(ts) else -1
        ours, _ = S.ddim_step(sched, v, x, t, tp)
        ref = ref_ddim(v.double().numpy(), x.double().numpy(), t, tp, abar)
        np.testing.assert_allclose(ours.double().numpy(), ref, rtol=1e-5, atol=1e-5)
        dif = sched.step(v, t, x, return_dict=False)[0]  # diffusers: prev = t - 1000 // steps
        torch.testing.assert_close(ours, dif, rtol=1e-6, atol=1e-6)


def test_dpmpp_2m_step_matches_float64_reference_and_diffusers():
    sched = S.make_scheduler("dpmpp_2m")
    sched.set_timesteps(50)
    ts = [int(t) for t in sched.timesteps]
    abar = ref_alphas_cumprod()
    g = torch.Generator().manual_seed(2)
    old = None
    x = torch.randn(1, 5, 4, 6, 6, generator=g)
    for i in (0, 1, 2, 25, 48, 49):
        v = torch.randn_like(x)
        noise = torch.randn_like(x)
        old_in = torch.randn_like(x) if i > 0 else None
        t, tp = ts[i], ts[i + 1] if i + 1 < len(ts) else -1
        back = ts[i - 1] if i > 0 else None
        ours, x0 = S.dpmpp_2m_step(sched, v, x, old_in, t, tp, back, noise)
        ref = ref_dpmpp_2m(v.double().numpy(), x.double().numpy(), None if old_in is None else old_in.double().numpy(),
                           t, tp, back, noise.double().numpy(), abar)
        np.testing.assert_allclose(ours.double().numpy(), ref, rtol=2e-5, atol=2e-5)
        # diffusers draws its noise from a generator (twice on 2M steps, using the second): feed the same.
        gen = torch.Generator().manual_seed(100 + i)
        n1 = torch.randn(x.shape, generator=torch.Generator().manual_seed(100 + i))
        n_used = n1
        if old_in is not None and i > 0 and tp >= 0:
            g2 = torch.Generator().manual_seed(100 + i)
            torch.randn(x.shape, generator=g2)
            n_used = torch.randn(x.shape, generator=g2)
        dif, dif_x0 = sched.step(v, old_in, t, back, x, generator=gen, return_dict=False)
        ours2, _ = S.dpmpp_2m_step(sched, v, x, old_in, t, tp, back, n_used)
        torch.testing.assert_close(ours2, dif, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(x0, dif_x0)
        assert torch.isfinite(ours).all()
        old = x0
    assert old is not None


def test_guidance_modes():
    s, n = 6.0, 50
    ws = [S.guidance_scale("dynamic", s, i, n, 999 - 20 * i) for i in range(n)]
    assert ws[0] == 1.0
    assert all(b >= a for a, b in zip(ws, ws[1:]))  # ramps up
    assert ws[-1] == pytest.approx(1 + s * (1 - math.cos(math.pi * (49 / 50) ** 5)) / 2)
    assert ws[-1] > 6.5 and ws[n // 2] < 1.1
    assert S.guidance_scale("constant", 4.5, 3, n, 939) == 4.5
    # official orientation: (N - t) / N on the DDPM timestep; last step (t = 19): (31/50)^5
    assert S.guidance_scale("official", s, 49, n, 19) == pytest.approx(1 + 3 * (1 - math.cos(math.pi * 0.62**5)))
    off = [S.guidance_scale("official", s, i, n, 999 - 20 * i) for i in range(n)]
    assert all(1.0 <= w <= 1 + s for w in off)
    assert any(b < a for a, b in zip(off, off[1:]))  # not a ramp: the quirk documented in sampling.py
    with pytest.raises(ValueError, match="guidance mode"):
        S.guidance_scale("cosine", s, 0, n, 999)


def test_segment_seeds_and_keep_mask_noise():
    seeds = S.resolve_segment_seeds(4, seed=7)
    assert len(set(seeds)) == 4 and seeds == S.resolve_segment_seeds(4, seed=7)
    rerolled = S.resolve_segment_seeds(4, seed=7, regenerate=[2], variation_seed=3)
    assert [a == b for a, b in zip(seeds, rerolled)] == [True, True, False, True]
    explicit = S.resolve_segment_seeds(4, seed=7, overrides={1: 1234})
    assert explicit[1] == 1234 and explicit[0] == seeds[0]
    with pytest.raises(ValueError, match="segment 6"):
        S.resolve_segment_seeds(4, seed=7, regenerate=[5])

    geo = VideoGeometry(4, 8, 12, 2, 16)
    a = S.segment_noise((4, 8, 12), seeds)
    b = S.segment_noise((4, 8, 12), rerolled)
    assert a.shape == (1, geo.latent_frames, 4, 8, 12)
    for seg in range(4):
        lo, hi = geo.owned_frames(seg)
        same = torch.equal(a[:, lo:hi], b[:, lo:hi])
        assert same == (seg != 2), seg
    # a segment's noise depends only on its own seed, not on its position or neighbours
    single = S.segment_noise((4, 8, 12), [seeds[0]])
    assert torch.equal(single, a[:, :13])
    assert abs(a.std().item() - 1) < 0.05 and not torch.equal(S.segment_noise((4, 8, 12), seeds, 1), a)


# ----------------------------------------------------------------------------------------------------
# with the tiny TTT-DiT
# ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return TTTDiT(preset("tiny")).eval()


def _emb(segments, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(segments, 16, 32, generator=g), torch.randn(segments, 16, 32, generator=g)


@pytest.mark.parametrize("scheduler", ["ddim", "dpmpp_2m"])
def test_same_seed_same_video_and_keep_mask(tiny_model, scheduler):
    cond, unc = _emb(3, 1)
    a = S.sample(tiny_model, cond, unc, steps=3, seed=5, scheduler=scheduler)
    b = S.sample(tiny_model, cond, unc, steps=3, seed=5, scheduler=scheduler)
    c = S.sample(tiny_model, cond, unc, steps=3, seed=6, scheduler=scheduler)
    assert a.shape == (1, 37, 4, 8, 12) and torch.isfinite(a).all()
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    # regenerate segment 2 (0-based 1): its frames change most; the model is global so others move a bit
    seeds = S.resolve_segment_seeds(3, 5, regenerate=[1])
    d = S.sample(tiny_model, cond, unc, steps=3, segment_seeds=seeds, scheduler=scheduler)
    diff = (a - d).abs().mean(dim=(0, 2, 3, 4))
    assert diff[13:25].mean() > 3 * diff[:12].mean() and diff[13:25].mean() > 3 * diff[26:].mean()


def test_one_segment_and_no_cfg(tiny_model):
    cond, _ = _emb(1, 2)
    out = S.sample(tiny_model, cond, None, steps=2, seed=1, scheduler="ddim")
    assert out.shape == (1, 13, 4, 8, 12) and torch.isfinite(out).all()


def test_batched_and_sequential_cfg_agree(tiny_model):
    cond, unc = _emb(2, 3)
    a = S.sample(tiny_model, cond, unc, steps=2, seed=1, cfg_mode="batched", guidance_mode="constant", guidance=4.0)
    b = S.sample(tiny_model, cond, unc, steps=2, seed=1, cfg_mode="sequential", guidance_mode="constant", guidance=4.0)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    # guidance matters: w = 1 (conditional only) differs from w = 4
    c = S.sample(tiny_model, cond, unc, steps=2, seed=1, guidance_mode="constant", guidance=1.0)
    assert not torch.allclose(a, c, atol=1e-4)


def test_callback_progress_and_preview(tiny_model):
    cond, unc = _emb(3, 4)
    seen = []
    S.sample(tiny_model, cond, unc, steps=4, seed=1, callback=seen.append)
    assert [i.step for i in seen] == [1, 2, 3, 4] and all(i.total == 4 for i in seen)
    assert [i.segment for i in seen] == [0, 1, 2, 0]
    img = seen[-1].preview()
    assert img.shape == (64, 96, 3) and img.dtype == np.uint8 and img.max() > img.min()
    assert seen[-1].eta_s == 0.0 and seen[0].eta_s >= 0
    assert seen[0].guidance == 1.0 and seen[-1].guidance > 1.0


class _Boom(Exception):
    pass


@pytest.mark.parametrize("scheduler,how", [("dpmpp_2m", "cancel"), ("ddim", "cancel"), ("dpmpp_2m", "raise"),
                                           ("dpmpp_2m", "ctrl_c")])
def test_interrupt_and_resume_is_bit_identical(tiny_model, tmp_path, scheduler, how):
    cond, unc = _emb(3, 5)
    kw = dict(steps=5, seed=11, scheduler=scheduler, guidance=6.0)
    full = S.sample(tiny_model, cond, unc, **kw)
    ckpt = tmp_path / "state.safetensors"
    k = 3
    calls = {"n": 0}

    if how == "ctrl_c":
        class CtrlC(torch.nn.Module):  # Ctrl-C arrives in the middle of step k's forward pass
            def __init__(self, inner):
                super().__init__()
                self.inner = inner
                self.config = inner.config

            def forward(self, **kw_):
                calls["n"] += 1
                if calls["n"] == k + 1:
                    raise KeyboardInterrupt
                return self.inner(**kw_)

        with pytest.raises(S.SamplingInterrupted) as info:
            S.sample(CtrlC(tiny_model), cond, unc, cfg_mode="batched", checkpoint_path=str(ckpt), **kw)
        stopped_at = info.value.step
        assert stopped_at == k and info.value.checkpoint_path == str(ckpt)
    else:
        def cancel():
            calls["n"] += 1
            if calls["n"] == k + 1:
                if how == "raise":
                    raise _Boom("user cancelled")
                return True
            return False

        if how == "raise":
            with pytest.raises(_Boom) as info:
                S.sample(tiny_model, cond, unc, cancel=cancel, checkpoint_path=str(ckpt), **kw)
            assert info.value.ttt_checkpoint_path == str(ckpt)
        else:
            with pytest.raises(S.SamplingInterrupted, match="before step 4 of 5") as info:
                S.sample(tiny_model, cond, unc, cancel=cancel, checkpoint_path=str(ckpt), **kw)
            assert info.value.step == k

    tensors, meta = S.load_checkpoint(str(ckpt))
    assert meta["step"] == k and meta["settings"]["scheduler"] == scheduler and meta["settings"]["seed"] == 11
    assert ("old_x0" in tensors) == (k > 0)
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".ttt-ckpt-")]  # atomic write left no temp file
    resumed_steps = []
    # settings passed now are ignored: the checkpoint's win
    out = S.sample(tiny_model, cond, unc, steps=99, seed=0, scheduler="ddim", resume_from=str(ckpt),
                   callback=lambda i: resumed_steps.append(i.step))
    assert resumed_steps == [4, 5]
    assert torch.equal(out, full)


def test_resume_refuses_other_embeddings_or_shape(tiny_model, tmp_path):
    cond, unc = _emb(2, 6)
    ckpt = str(tmp_path / "c.safetensors")
    with pytest.raises(S.SamplingInterrupted):
        S.sample(tiny_model, cond, unc, steps=3, stop_after=1, checkpoint_path=ckpt)
    other, _ = _emb(2, 7)
    with pytest.raises(ValueError, match="different text embeddings"):
        S.sample(tiny_model, other, unc, resume_from=ckpt)
    c3, u3 = _emb(3, 6)
    with pytest.raises(ValueError, match="latents of shape"):
        S.sample(tiny_model, c3, u3, resume_from=ckpt)
    other_model = TTTDiT(preset("tiny")).eval()  # same architecture, other weights
    with pytest.raises(ValueError, match="other model weights"):
        S.sample(other_model, cond, unc, resume_from=ckpt)
    bad = tmp_path / "not.safetensors"
    bad.write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="not a sampler checkpoint"):
        S.sample(tiny_model, cond, unc, resume_from=str(bad))


def test_bad_settings_are_clear(tiny_model):
    cond, unc = _emb(1, 8)
    with pytest.raises(ValueError, match="unknown scheduler"):
        S.sample(tiny_model, cond, unc, steps=2, scheduler="euler")
    with pytest.raises(ValueError, match="steps must be"):
        S.sample(tiny_model, cond, unc, steps=0)
    with pytest.raises(ValueError, match="2 segment seeds"):
        S.sample(tiny_model, cond, unc, steps=1, segment_seeds=[1, 2])
    with pytest.raises(ValueError, match="do not match"):
        S.sample(tiny_model, cond, unc[:, :8], steps=1)


def test_auto_cfg_falls_back_to_sequential_when_batched_does_not_fit(tiny_model, tmp_path):
    cond, unc = _emb(2, 9)
    seen_batches = []

    class SmallGPU(torch.nn.Module):  # "runs out of memory" for a batch of two
        def __init__(self, inner):
            super().__init__()
            self.inner, self.config = inner, inner.config

        def forward(self, hidden_states, **kw):
            seen_batches.append(hidden_states.shape[0])
            if hidden_states.shape[0] > 1:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 80 GiB")
            return self.inner(hidden_states=hidden_states, **kw)

    kw = dict(steps=3, seed=2, guidance_mode="constant", guidance=5.0)
    ref = S.sample(tiny_model, cond, unc, cfg_mode="sequential", **kw)
    ckpt = str(tmp_path / "c.safetensors")
    out = S.sample(SmallGPU(tiny_model), cond, unc, cfg_mode="auto", checkpoint_path=ckpt, checkpoint_every=1, **kw)
    assert seen_batches.count(2) == 1 and seen_batches.count(1) == 6  # tried once, then two passes per step
    assert torch.equal(out, ref)
    assert S.read_checkpoint_meta(ckpt)["settings"]["cfg_mode"] == "sequential"
    with pytest.raises(torch.cuda.OutOfMemoryError):  # an explicit "batched" is not second-guessed
        S.sample(SmallGPU(tiny_model), cond, unc, cfg_mode="batched", **kw)


def test_segment_list_and_seed_parsing_for_people():
    assert S.parse_segment_list("3, 5-7") == [2, 4, 5, 6]
    assert S.parse_segment_seeds("3=123,5=77") == {2: 123, 4: 77}
    assert S.parse_segment_seeds("11,12,13") == {0: 11, 1: 12, 2: 13}
    for bad in ("0", "4-2", "x", "1-"):
        with pytest.raises(ValueError):
            S.parse_segment_list(bad)
    for bad in ("3=1,4", "a=1", "0=5"):
        with pytest.raises(ValueError):
            S.parse_segment_seeds(bad)
