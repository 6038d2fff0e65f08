"""TTTDiT: diffusers equivalence at gate 0, segment-local attention, bidirectional block, multi-segment
forward passes, gradients, gradient checkpointing, variants, and the 5B parameter count on meta."""

from __future__ import annotations

import types

import pytest
import torch
from diffusers import CogVideoXTransformer3DModel
from diffusers.pipelines.cogvideo.pipeline_cogvideox import CogVideoXPipeline

from ttt_video.ttt_core.config import preset
from ttt_video.ttt_core.dit import GATE_NAMES, TTTDiT, _Layout, window_rotary_embedding

DT = torch.float64


def pipeline_rotary(transformer_config, frames: int, height_px: int, width_px: int):
    """image_rotary_emb exactly as diffusers' CogVideoXPipeline builds it for `frames` latent frames."""
    fake_pipe = types.SimpleNamespace(vae_scale_factor_spatial=8, transformer=types.SimpleNamespace(config=transformer_config))
    return CogVideoXPipeline._prepare_rotary_positional_embeddings(fake_pipe, height_px, width_px, frames, torch.device("cpu"))


def make_model(global_layer="ttt_mlp", seed=0, **over) -> TTTDiT:
    torch.manual_seed(seed)
    model = TTTDiT(preset("tiny", global_layer=global_layer, **over)).to(DT)
    with torch.no_grad():  # CogVideoX zero-inits nothing important here, but make the adaLN gates non-trivial
        for name, p in model.named_parameters():
            if not (".ttt." in name or ".ttt_gates." in name):
                p.add_(0.02 * torch.randn_like(p))
    return model


def make_inputs(cfg, S: int, B: int = 2, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    frames = 13 + 12 * (S - 1)
    x = torch.randn(B, frames, cfg.in_channels, cfg.sample_height, cfg.sample_width, generator=g, dtype=DT)
    text = torch.randn(B, S, cfg.max_text_seq_length, cfg.text_embed_dim, generator=g, dtype=DT)
    t = torch.randint(0, 1000, (B,), generator=g)
    return x, text, t


def set_gates(model: TTTDiT, value: float):
    with torch.no_grad():
        for block in model.transformer_blocks:
            for name in GATE_NAMES:
                getattr(block.ttt_gates, name).fill_(value)


# --------------------------------------------------------------------------------------------------
def test_state_dict_names_extend_diffusers():
    cfg = preset("tiny")
    ours = {k: tuple(v.shape) for k, v in TTTDiT(cfg).state_dict().items()}
    ref = {k: tuple(v.shape) for k, v in CogVideoXTransformer3DModel(**cfg.diffusers_kwargs()).state_dict().items()}
    assert {k: ours[k] for k in ref} == ref
    extra = sorted(set(ours) - set(ref))
    assert extra and all(k.split(".")[2] in ("ttt", "ttt_gates") for k in extra), extra[:5]
    assert ours["transformer_blocks.1.ttt_gates.backward_video"] == (cfg.width,)
    assert ours["transformer_blocks.0.ttt.learnable_ttt_lr_weight"] == (2, 1, cfg.width)
    none = TTTDiT(preset("tiny", global_layer="none")).state_dict()
    assert set(none) == set(ref)


def test_gate_zero_single_segment_equals_diffusers():
    cfg = preset("tiny")
    torch.manual_seed(0)
    ref = CogVideoXTransformer3DModel(**cfg.diffusers_kwargs()).to(DT).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.02 * torch.randn_like(p))
    model = TTTDiT(cfg).to(DT).eval()
    missing, unexpected = model.load_state_dict(ref.state_dict(), strict=False)
    assert not unexpected and all(".ttt" in k for k in missing)
    set_gates(model, 0.0)
    x, text, t = make_inputs(cfg, S=1)
    rotary = pipeline_rotary(ref.config, 13, cfg.sample_height * 8, cfg.sample_width * 8)
    with torch.no_grad():
        expected = ref(x, text[:, 0], t, image_rotary_emb=rotary, return_dict=False)[0]
        got = model(x, text, t)
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
        # our window RoPE is the pipeline's
        for a, b in zip(window_rotary_embedding(cfg, cfg.sample_height // 2, cfg.sample_width // 2), rotary):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        # non-zero gates change the output (the comparison above is not vacuous)
        set_gates(model, 0.1)
        assert (model(x, text, t) - expected).abs().max() > 1e-6


def reference_local_attention(block, video, text, S, L, grid, rotary):
    """Loop over windows: window i = text of segment i + latent frames [12 i, 12 i + 13); a frame shared
    by two windows gets the mean of both outputs."""
    frames, gh, gw = grid
    T = gh * gw
    out_v = torch.zeros_like(video)
    count = torch.zeros(frames)
    out_t = torch.empty_like(text)
    for i in range(S):
        f0, f1 = 12 * i, 12 * i + 13
        v_i, t_i = block.attn1(hidden_states=video[:, f0 * T : f1 * T], encoder_hidden_states=text[:, i * L : (i + 1) * L],
                               image_rotary_emb=rotary)
        out_v[:, f0 * T : f1 * T] += v_i
        count[f0:f1] += 1
        out_t[:, i * L : (i + 1) * L] = t_i
    return out_v / count.to(DT).repeat_interleave(T)[None, :, None], out_t


def test_segment_local_attention_matches_window_loop():
    model = make_model("none")
    cfg = model.config
    block = model.transformer_blocks[0]
    S, L, B = 3, cfg.max_text_seq_length, 2
    grid = (37, cfg.sample_height // 2, cfg.sample_width // 2)
    g = torch.Generator().manual_seed(4)
    video = torch.randn(B, 37 * grid[1] * grid[2], cfg.width, generator=g, dtype=DT)
    text = torch.randn(B, S * L, cfg.width, generator=g, dtype=DT)
    rotary = pipeline_rotary(CogVideoXTransformer3DModel(**cfg.diffusers_kwargs()).config, 13, 64, 96)
    windows = torch.stack([torch.arange(12 * i, 12 * i + 13) for i in range(S)])
    layout = _Layout(S, L, grid, windows, torch.bincount(windows.flatten()), rotary, 0)
    with torch.no_grad():
        got_v, got_t = block.local_attention(video, text, layout)
        exp_v, exp_t = reference_local_attention(block, video, text, S, L, grid, rotary)
    torch.testing.assert_close(got_v, exp_v, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got_t, exp_t, rtol=1e-12, atol=1e-12)


def test_bidirectional_block_is_forward_then_reversed_pass():
    model = make_model("ttt_mlp")
    block = model.transformer_blocks[1]
    cfg = model.config
    with torch.no_grad():
        for name in GATE_NAMES:  # distinct per-channel gates
            getattr(block.ttt_gates, name).copy_(torch.randn(cfg.width, dtype=DT))
    S, L, B = 2, cfg.max_text_seq_length, 2
    grid = (25, cfg.sample_height // 2, cfg.sample_width // 2)
    g = torch.Generator().manual_seed(9)
    video = torch.randn(B, 25 * grid[1] * grid[2], cfg.width, generator=g, dtype=DT)
    text = torch.randn(B, S * L, cfg.width, generator=g, dtype=DT)
    layout = _Layout(S, L, grid, torch.zeros(0), torch.zeros(0), None, 0)

    def gate(name, x):
        return torch.tanh(getattr(block.ttt_gates, name)) * x

    with torch.no_grad():
        got_v, got_t = block.bidirectional_ttt(video, text, layout)
        # Z = X' + g_f * TTT(X')
        t4 = text.view(B, S, L, -1)
        t_out, v_out = block.ttt(t4, video, grid)
        z_t, z_v = t4 + gate("forward_text", t_out), video + gate("forward_video", v_out)
        # Z' = Z + g_b * unreverse(TTT(reverse(Z))): text reversed in segment order, video flipped
        r_t, r_v = block.ttt(z_t.flip(1), z_v.flip(1), grid)
        exp_t = z_t + gate("backward_text", r_t.flip(1))
        exp_v = z_v + gate("backward_video", r_v.flip(1))
    torch.testing.assert_close(got_v, exp_v, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got_t, exp_t.reshape(B, S * L, -1), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("global_layer", ["ttt_mlp", "ttt_linear", "none"])
def test_multi_segment_forward_runs(global_layer):
    model = make_model(global_layer).eval()
    cfg = model.config
    for S in (2, 3) if global_layer == "ttt_mlp" else (2,):
        x, text, t = make_inputs(cfg, S, B=1)
        with torch.no_grad():
            out = model(x, text, t)
        assert out.shape == (1, x.shape[1], cfg.out_channels, cfg.sample_height, cfg.sample_width)
        assert torch.isfinite(out).all() and out.std() > 0
    if global_layer == "none":
        assert not list(model.ttt_parameters())
    if global_layer == "ttt_linear":
        assert model.transformer_blocks[0].ttt.W1.shape == (2, 16, 16)


def test_bad_shapes_raise_clear_errors():
    model = make_model("none")
    cfg = model.config
    x, text, t = make_inputs(cfg, S=2, B=1)
    with pytest.raises(ValueError, match=r"2 text segment\(s\) need .* 25 latent frames, got 24"):
        model(x[:, :24], text, t)
    with pytest.raises(ValueError, match=r"3 text segment\(s\) need .*37 latent frames, got 25"):
        model(x, torch.cat([text, text[:, :1]], dim=1), t)
    with pytest.raises(ValueError, match=r"\[B, S, L, text_dim\]"):
        model(x[:, :13], text[:, 0], t)
    out = model(x[:, :13], text[:, :1], torch.tensor(500))  # scalar timestep is broadcast
    assert out.shape[1] == 13


def _loss_and_grads(model, x, text, t):
    model.zero_grad(set_to_none=True)
    out = model(x, text, t)
    (out * torch.linspace(-1, 1, out.numel(), dtype=DT).view_as(out)).sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_gradients_reach_ttt_and_checkpointing_gives_same_grads():
    model = make_model("ttt_mlp", mini_batch_size=16, scan_checkpoint_group_size=2)
    cfg = model.config
    x, text, t = make_inputs(cfg, S=2, B=1)
    model.eval()  # no scan rematerialisation, no block checkpointing
    plain = _loss_and_grads(model, x, text, t)
    ttt_names = [n for n, _ in model.ttt_parameters()]
    assert ttt_names and set(ttt_names) <= set(plain)
    last = len(model.transformer_blocks) - 1
    for name in ttt_names:
        if name == f"transformer_blocks.{last}.ttt_gates.backward_text":
            # the last block's text output is discarded (only video tokens reach norm_out)
            assert plain[name].abs().max() == 0
            continue
        assert plain[name].abs().max() > 0, f"no gradient reached {name}"
    assert plain["patch_embed.proj.weight"].abs().max() > 0

    model.train()  # dropout is 0: train mode only turns on the scan rematerialisation
    model.enable_gradient_checkpointing(True)
    assert model.gradient_checkpointing
    ckpt = _loss_and_grads(model, x, text, t)
    assert set(ckpt) == set(plain)
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-10, atol=1e-12, msg=name)


def test_backend_switch_and_ttt_parameters():
    model = make_model("ttt_mlp")
    model.set_ttt_backend("torch")
    assert model.config.ttt_backend == "torch"
    assert all(b.ttt.backend == "torch" for b in model.transformer_blocks)
    with pytest.raises(ValueError, match="backend"):
        model.set_ttt_backend("cuda-magic")
    names = [n for n, _ in model.ttt_parameters()]
    assert "transformer_blocks.0.ttt.W1" in names and "transformer_blocks.1.ttt_gates.forward_text" in names
    assert not any(n.startswith(("patch_embed", "norm_out")) or ".attn1." in n for n in names)


def test_5b_builds_on_meta_with_expected_parameter_counts():
    cfg = preset("cogvideox-5b")
    with torch.device("meta"):
        model = TTTDiT(cfg)
        cogvideox = CogVideoXTransformer3DModel(**cfg.diffusers_kwargs())
    counts = model.parameter_counts()
    assert counts["cogvideox"] == sum(p.numel() for p in cogvideox.parameters())
    W, H, D = 3072, 48, 64
    per_layer = (
        4 * (W * W + W)  # wq, wk, wv, wo
        + 2 * W  # post_norm
        + 2 * H * D  # ttt_norm weight / bias
        + H * W + H  # learnable_ttt_lr weight / bias
        + H * D * 4 * D + H * 4 * D + H * 4 * D * D + H * D  # W1, b1, W2, b2
        + 4 * W  # gates
    )
    assert counts["ttt"] == 42 * per_layer
    # the numbers the report quotes: 5,570,283,072 CogVideoX + 1,659,895,776 TTT = 7,230,178,848
    assert counts == {"cogvideox": 5_570_283_072, "ttt": 1_659_895_776, "total": 7_230_178_848}
    assert all(p.is_meta for p in model.parameters())
