"""TTTLayer against an independent, loop-by-loop float64 reference of the paper / official semantics."""

from __future__ import annotations

import math

import pytest
import torch

from ttt_video.ttt_core.config import preset
from ttt_video.ttt_core.geometry import VideoGeometry
from ttt_video.ttt_core.ttt_layer import TTTLayer, apply_pairwise_rope, sequence_order, ttt_rope_angles

DT = torch.float64


# --------------------------------------------------------------------------------------------------
# independent reference (explicit loops, complex RoPE, autograd for the inner gradient)
# --------------------------------------------------------------------------------------------------
def ref_rope_complex(x: torch.Tensor, frames: int, height: int, width: int, theta: float = 10000.0):
    """Official precompute_freqs_cis_3d + apply_rotary_emb, written with complex numbers.
    x [N, D] video tokens in (t, y, x) order; token index n gets the position unravel(n)."""
    D = x.shape[-1]
    dt_, dh_ = D // 4, D // 8 * 3
    f_t = 1.0 / theta ** (torch.arange(0, dt_, 2, dtype=DT)[: dt_ // 2] / dt_)
    f_h = 1.0 / theta ** (torch.arange(0, dh_, 2, dtype=DT)[: dh_ // 2] / dh_)
    out = torch.empty_like(x)
    for n in range(x.shape[0]):
        t, rem = divmod(n, height * width)
        yy, xx = divmod(rem, width)
        ang = torch.cat([t * f_t, yy * f_h, xx * f_h])
        z = torch.view_as_complex(x[n].reshape(-1, 2).contiguous()) * torch.polar(torch.ones_like(ang), ang)
        out[n] = torch.view_as_real(z).flatten()
    return out


def ref_head_ln(z, w, b, eps=1e-8):
    mu = z.mean(-1, keepdim=True)
    var = ((z - mu) ** 2).mean(-1, keepdim=True)
    return (z - mu) / torch.sqrt(var + eps) * w + b


def ref_f(x, state, kind):
    if kind == "ttt_mlp":
        W1, b1, W2, b2 = state
        return torch.nn.functional.gelu(x @ W1 + b1, approximate="tanh") @ W2 + b2
    W1, b1 = state
    return x @ W1 + b1


def ref_inner_loop(q, k, v, eta, state, ln_w, ln_b, mb, kind):
    """One head: q, k, v [N, D], eta [N]. Mini-batches of mb tokens; the last one may be shorter (that is
    what padding with eta = 0 tokens must be equivalent to)."""
    outs = []
    state = [s.clone() for s in state]
    for start in range(0, q.shape[0], mb):
        sl = slice(start, start + mb)
        with torch.enable_grad():
            params = [s.detach().requires_grad_(True) for s in state]
            loss = 0.0
            for j in range(k[sl].shape[0]):
                pred = ref_head_ln(ref_f(k[sl][j : j + 1], params, kind), ln_w, ln_b)
                loss = loss + eta[sl][j] * 0.5 * ((pred - (v[sl][j] - k[sl][j])) ** 2).sum()
            grads = torch.autograd.grad(loss, params)
        state = [p.detach() - g for p, g in zip(params, grads)]
        outs.append(q[sl] + ref_head_ln(ref_f(q[sl], state, kind), ln_w, ln_b))
    return torch.cat(outs)


def reverse_inputs(text, video):
    """The official reversed sequence: text reversed in segment order, video flipped as a whole."""
    return text.flip(1), video.flip(1)


def ref_layer(layer: TTTLayer, text, video, grid, reverse=False):
    """Loop-by-loop reference of one direction. text [B, S, L, W], video [B, Nv, W] in natural order."""
    if reverse:
        t_out, v_out = ref_layer(layer, *reverse_inputs(text, video), grid, reverse=False)
        return reverse_inputs(t_out, v_out)
    B, S, L, W = text.shape
    frames, gh, gw = grid
    T = gh * gw
    H, D, mb = layer.num_heads, layer.head_dim, layer.mini_batch_size
    geo = VideoGeometry(S, gh * layer.patch_size, gw * layer.patch_size, layer.patch_size, L)
    t_out = torch.empty_like(text)
    v_out = torch.empty_like(video)
    state = [getattr(layer, n).detach() for n in layer.state_names]
    for b in range(B):
        # interleaved sequence: per segment its text, then its owned frames
        chunks = []
        for s in range(S):
            lo, hi = geo.owned_frames(s)
            chunks.append((text[b, s], ("text", s)))
            chunks.append((video[b, lo * T : hi * T], ("video", lo * T)))
        x_text_all = text[b].reshape(S * L, W)
        head_outs = []
        for h in range(H):
            hs = slice(h * D, (h + 1) * D)

            def proj(lin, x):
                return (x @ lin.weight.T + lin.bias)[:, hs]

            def l2(x):
                return x / x.norm(dim=-1, keepdim=True)

            # projections on the natural layout, RoPE on the video part by video index
            qv = ref_rope_complex(l2(proj(layer.wq, video[b])), frames, gh, gw)
            kv = ref_rope_complex(l2(proj(layer.wk, video[b])), frames, gh, gw)
            qt, kt = l2(proj(layer.wq, x_text_all)), l2(proj(layer.wk, x_text_all))
            q_nat, k_nat = torch.cat([qt, qv]), torch.cat([kt, kv])
            x_nat = torch.cat([x_text_all, video[b]])
            v_nat = proj(layer.wv, x_nat)
            d = v_nat - k_nat
            std = torch.sqrt(((d - d.mean(-1, keepdim=True)) ** 2).sum(-1, keepdim=True) / (D - 1))
            v_nat = k_nat + (d - d.mean(-1, keepdim=True)) / (std + 1e-8) * layer.ttt_norm_weight[h] + layer.ttt_norm_bias[h]
            w_lr = layer.learnable_ttt_lr_weight[h, 0]
            eta_nat = layer.base_lr * torch.sigmoid(x_nat @ w_lr + layer.learnable_ttt_lr_bias[h, 0]) / D / mb
            # interleave by explicit index lists
            idx = []
            for _, (kind, off) in chunks:
                if kind == "text":
                    idx += list(range(off * L, (off + 1) * L))
                else:
                    lo_f = off // T
                    s = [i for i in range(S) if geo.owned_frames(i)[0] == lo_f][0]
                    n_own = (geo.owned_frames(s)[1] - lo_f) * T
                    idx += [S * L + off + i for i in range(n_own)]
            idx = torch.tensor(idx)
            st = [x[h] for x in state]
            o = ref_inner_loop(q_nat[idx], k_nat[idx], v_nat[idx], eta_nat[idx], st,
                               layer.ttt_norm_weight[h], layer.ttt_norm_bias[h], mb, layer.kind)
            o_nat = torch.empty_like(o)
            o_nat[idx] = o
            head_outs.append(o_nat)
        y = torch.cat(head_outs, dim=-1)
        y = torch.nn.functional.layer_norm(y, (W,), layer.post_norm.weight, layer.post_norm.bias, 1e-6)
        y = y @ layer.wo.weight.T + layer.wo.bias
        t_out[b] = y[: S * L].reshape(S, L, W)
        v_out[b] = y[S * L :]
    return t_out, v_out


# --------------------------------------------------------------------------------------------------
def make_layer(global_layer="ttt_mlp", seed=0, **over):
    cfg = preset("tiny", global_layer=global_layer, **over)
    torch.manual_seed(seed)
    layer = TTTLayer(cfg).to(DT)
    with torch.no_grad():  # move every parameter off its init so each one matters
        for p in layer.parameters():
            p.add_(0.05 * torch.randn_like(p))
        layer.learnable_ttt_lr_bias.add_(2.0)  # eta large enough that the inner step is visible
    return layer


def make_inputs(layer, S, B=1, seed=1, L=None):
    g = torch.Generator().manual_seed(seed)
    L = L or 7
    gh, gw = 2, 3
    frames = 13 + 12 * (S - 1)
    W = layer.width
    text = torch.randn(B, S, L, W, generator=g, dtype=DT)
    video = torch.randn(B, frames * gh * gw, W, generator=g, dtype=DT)
    return text, video, (frames, gh, gw)


def test_rope_matches_complex_reference():
    g = torch.Generator().manual_seed(3)
    for D in (16, 64):
        x = torch.randn(2 * 3 * 4, D, generator=g, dtype=DT)
        ang = ttt_rope_angles(D, 2, 3, 4)
        got = apply_pairwise_rope(x, ang.cos(), ang.sin())
        torch.testing.assert_close(got, ref_rope_complex(x, 2, 3, 4), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="head_dim"):
        ttt_rope_angles(12, 1, 1, 1)


def test_sequence_order_interleaves_text_then_owned_frames():
    geo = VideoGeometry(num_segments=3, latent_height=2, latent_width=4, patch_size=2, text_tokens_per_segment=2)
    T, L, S = geo.tokens_per_latent_frame, 2, 3  # T = 2 tokens per frame
    fwd = sequence_order(geo).tolist()
    text = lambda s: [s * L, s * L + 1]  # noqa: E731
    vid = lambda f0, f1: list(range(S * L + f0 * T, S * L + f1 * T))  # noqa: E731
    assert fwd == text(0) + vid(0, 13) + text(1) + vid(13, 25) + text(2) + vid(25, 37)
    # reversed: text segments 2, 1, 0 (in-order tokens), video flipped, chunk sizes 13, 12, 12 frames
    n_v = geo.video_tokens
    flipped = [S * L + n_v - 1 - i for i in range(n_v)]
    rev = sequence_order(geo, reverse=True).tolist()
    assert rev == text(2) + flipped[: 13 * T] + text(1) + flipped[13 * T : 25 * T] + text(0) + flipped[25 * T :]
    assert sorted(rev) == list(range(geo.total_tokens))


@pytest.mark.parametrize("global_layer,S,B", [("ttt_mlp", 1, 2), ("ttt_mlp", 2, 1), ("ttt_linear", 2, 1)])
def test_layer_matches_reference(global_layer, S, B):
    layer = make_layer(global_layer, mini_batch_size=16)
    text, video, grid = make_inputs(layer, S, B=B)
    n = text.shape[1] * text.shape[2] + video.shape[1]
    assert n % layer.mini_batch_size != 0, "choose shapes that need padding"
    with torch.no_grad():
        for reverse in (False, True):
            got_t, got_v = layer(text, video, grid, reverse=reverse)
            ref_t, ref_v = ref_layer(layer, text, video, grid, reverse=reverse)
            torch.testing.assert_close(got_t, ref_t, rtol=1e-9, atol=1e-10)
            torch.testing.assert_close(got_v, ref_v, rtol=1e-9, atol=1e-10)


def test_reverse_is_forward_on_reversed_sequence():
    layer = make_layer(mini_batch_size=16)
    text, video, grid = make_inputs(layer, S=3, B=2, seed=5)
    with torch.no_grad():
        rev_t, rev_v = layer(text, video, grid, reverse=True)
        fwd_on_rev = layer(*reverse_inputs(text, video), grid, reverse=False)
        exp_t, exp_v = reverse_inputs(*fwd_on_rev)
        torch.testing.assert_close(rev_t, exp_t, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(rev_v, exp_v, rtol=1e-12, atol=1e-12)
        # and the two directions really differ
        fwd_t, fwd_v = layer(text, video, grid)
        assert (fwd_v - rev_v).abs().max() > 1e-3


def test_padding_does_not_change_real_outputs():
    layer = make_layer(mini_batch_size=16)
    text, video, grid = make_inputs(layer, S=2, B=2, seed=7)
    with torch.no_grad():
        for reverse in (False, True):
            base_t, base_v = layer(text, video, grid, reverse=reverse)
            for extra, seed in ((0, 11), (1, 12), (3, 13)):
                g = torch.Generator().manual_seed(seed)
                t, v = layer(text, video, grid, reverse=reverse, _extra_pad_mini_batches=extra, _pad_generator=g)
                torch.testing.assert_close(t, base_t, rtol=1e-12, atol=1e-12)
                torch.testing.assert_close(v, base_v, rtol=1e-12, atol=1e-12)


def test_parameter_names_and_shapes():
    cfg = preset("tiny")
    H, D, W = cfg.num_attention_heads, cfg.attention_head_dim, cfg.width
    shapes = {n: tuple(p.shape) for n, p in TTTLayer(cfg).named_parameters()}
    assert shapes == {
        "wq.weight": (W, W), "wq.bias": (W,), "wk.weight": (W, W), "wk.bias": (W,),
        "wv.weight": (W, W), "wv.bias": (W,), "wo.weight": (W, W), "wo.bias": (W,),
        "post_norm.weight": (W,), "post_norm.bias": (W,),
        "ttt_norm_weight": (H, D), "ttt_norm_bias": (H, D),
        "learnable_ttt_lr_weight": (H, 1, W), "learnable_ttt_lr_bias": (H, 1),
        "W1": (H, D, 4 * D), "b1": (H, 1, 4 * D), "W2": (H, 4 * D, D), "b2": (H, 1, D),
    }  # fmt: skip
    lin = dict((n, tuple(p.shape)) for n, p in TTTLayer(preset("tiny", global_layer="ttt_linear")).named_parameters())
    assert lin["W1"] == (H, D, D) and lin["b1"] == (H, 1, D) and "W2" not in lin
    layer = TTTLayer(cfg)
    assert layer.post_norm.eps == 1e-6
    assert torch.all(layer.ttt_norm_weight == 1) and torch.all(layer.b1 == 0)
    # N(0, 0.02) initial state, big enough sample to check the scale
    big = TTTLayer(preset("cogvideox-5b", num_layers=1))
    assert math.isclose(big.W1.std().item(), 0.02, rel_tol=0.02)
    assert math.isclose(big.learnable_ttt_lr_weight.std().item(), 0.02, rel_tol=0.02)


def test_bad_inputs_raise():
    layer = make_layer(mini_batch_size=16)
    text, video, grid = make_inputs(layer, S=2)
    with pytest.raises(ValueError, match="2 segment"):
        layer(text, video[:, : 24 * 6], (24, 2, 3))
    with pytest.raises(ValueError, match="expected"):
        layer(text, video[:, :-1], grid)
