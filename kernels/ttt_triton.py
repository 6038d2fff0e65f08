"""Triton TTT-MLP / TTT-Linear: forward and backward kernels implementing the ``ttt_core.ops`` contract.

Design (see docs/performance.md for the numbers behind it):
- one program per (batch, head) sequence (the TTT-Linear kernels, the MLP backward and the "gmem" MLP
  forward); both directions of the bidirectional block run in one launch when the caller stacks them along
  the batch dim (the explicit W_end form is permutation-invariant inside a mini-batch, so the reversed
  direction is just another sequence);
- the default MLP forward ("split") gives each head 4 programs, each owning a 64-wide slice of the hidden
  units, which meet once per mini-batch through global memory (Triton has no DSMEM, so no clusters); it runs
  while every head of the launch gets its 4 programs at once, else the gmem forward does;
- the state is fp32 (registers, or L1/L2-resident buffers where registers run short); every matmul is a ``tl.dot``
  with operands in the input dtype (bf16/fp16) and fp32 accumulation; fp32 inputs use IEEE fp32 dots
  (tf32 would miss the fp32 accuracy target);
- forward saves the state at the start of every G-th mini-batch (G = checkpoint_group_size, default 16,
  like the official scan checkpoints); the backward kernel walks the groups in reverse, recomputes the
  G states of a group into a per-program scratch buffer, then back-propagates through the group's
  mini-batches in reverse, carrying dL/dW_end in fp32 registers.
The official kernel (ttt-tk, ThunderKittens) shards W1/W2 over 2 SMs of a cluster through DSMEM; the split
forward shards them over 4 programs through L2 instead (runs on any CUDA GPU, not only Hopper).
"""

from __future__ import annotations

import math
import os
import warnings

import torch
import triton
import triton.language as tl

_GELU_C = 0.7978845608028654  # sqrt(2 / pi)
_GELU_A = 0.044715
LN_EPS = 1e-8
DEFAULT_GROUP = 16
# Tests set this: every buffer the kernels write starts NaN-filled, so an element left unwritten shows up.
POISON_OUTPUTS = False
# Triton's CPU interpreter cannot run inline PTX: kernels take the portable path there.
_INTERPRET = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")


def _empty(*shape, device, dtype=torch.float32):
    t = torch.empty(*shape, device=device, dtype=dtype)
    return t.fill_(float("nan")) if POISON_OUTPUTS else t


def _empty_like(t):
    return _empty(*t.shape, device=t.device, dtype=t.dtype)


# ------------------------------------------------------------------------------------------------
# device helpers
# ------------------------------------------------------------------------------------------------
@triton.jit
def _mm(a, b, DT: tl.constexpr, IEEE: tl.constexpr):
    """a @ b with fp32 accumulation: operands in DT (bf16/fp16), or IEEE fp32 for fp32 inputs."""
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a.to(DT), b.to(DT))


@triton.jit
def _tanh(u, IEEE: tl.constexpr):
    if IEEE or _INTERPRET:
        # tanh via sigmoid (tl has no portable tanh across Triton 3.6 / 3.9 and the interpreter)
        return 2.0 * tl.sigmoid(2.0 * u) - 1.0
    else:
        # bf16/fp16 operands: one MUFU instruction instead of exp + reciprocal + 4 FP ops. Its relative error
        # (2^-10.99) is below the bf16 rounding (2^-9) that every GELU output and derivative gets next.
        return tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=r,r", [u], dtype=tl.float32, is_pure=True,
                                         pack=1)


# gelu_tanh(z) = 0.5 z (1 + tanh(u)), u = C (z + A z^3) = z (C + CA z^2); written as fused multiply-adds
# (the element-wise GELU work, on [64, F] tiles per mini-batch, is most of these kernels' instructions)
_GELU_CA = tl.constexpr(0.035677408136300125)  # C * A
_GELU_3CA = tl.constexpr(0.10703222440890037)  # 3 C A: du/dz = C + 3 C A z^2


@triton.jit
def _gelu_parts(z, IEEE: tl.constexpr):
    """gelu_tanh(z), its first and second derivative."""
    z2 = z * z
    du = tl.fma(z2, _GELU_3CA, 0.7978845608028654)
    t = _tanh(z * tl.fma(z2, _GELU_CA, 0.7978845608028654), IEEE)
    s = tl.fma(-t, t, 1.0)
    h = 0.5 * z
    g = tl.fma(h, t, h)
    g1 = tl.fma(h * s, du, tl.fma(0.5, t, 0.5))
    g2 = s * tl.fma(h, tl.fma(-2.0 * t * du, du, 2.0 * _GELU_3CA * z), du)
    return g, g1, g2


@triton.jit
def _gelu_and_grad(z, IEEE: tl.constexpr):
    z2 = z * z
    t = _tanh(z * tl.fma(z2, _GELU_CA, 0.7978845608028654), IEEE)
    h = 0.5 * z
    g = tl.fma(h, t, h)
    g1 = tl.fma(h * tl.fma(-t, t, 1.0), tl.fma(z2, _GELU_3CA, 0.7978845608028654), tl.fma(0.5, t, 0.5))
    return g, g1


@triton.jit
def _gelu(z, IEEE: tl.constexpr):
    h = 0.5 * z
    return tl.fma(h, _tanh(z * tl.fma(z * z, _GELU_CA, 0.7978845608028654), IEEE), h)


@triton.jit
def _ln_norm(z, D: tl.constexpr, eps):
    """Row-wise normalisation (biased variance): returns xhat and 1/std, std = sqrt(var + eps)."""
    mu = tl.sum(z, axis=1) / D
    zc = z - mu[:, None]
    var = tl.sum(zc * zc, axis=1) / D
    rstd = 1.0 / tl.sqrt(var + eps)
    return zc * rstd[:, None], rstd


@triton.jit
def _ln_bwd(gx, xh, rstd, D: tl.constexpr):
    """Gradient w.r.t. z of a LayerNorm given the gradient gx w.r.t. xhat."""
    s1 = tl.sum(gx, axis=1)
    s2 = tl.sum(gx * xh, axis=1)
    return rstd[:, None] * (gx - s1[:, None] / D - xh * (s2[:, None] / D))


@triton.jit
def _ln_target_grad(z, v, k, gamma, beta, D: tl.constexpr, eps):
    """Inner-loss pieces: xhat, rstd, g = LN(z) - (v - k), gx = g * gamma, gz = dl/dz."""
    xh, rstd = _ln_norm(z, D, eps)
    g = gamma * xh + beta - (v - k)
    gx = g * gamma
    gz = _ln_bwd(gx, xh, rstd, D)
    return xh, rstd, g, gx, gz


@triton.jit
def _add2(a0, a1, b0, b1):
    return a0 + b0, a1 + b1


@triton.jit
def _ln_target_grad_2r(z, v, k, gamma, beta, D: tl.constexpr, eps):
    """_ln_target_grad with its four row sums in two reductions, each over a pair (sum z with sum z^2, then the
    LN backward's two): where a row spans several warps each reduction is a shared-memory exchange and a barrier
    on the mini-batch's chain, and a pair costs one. The variance comes from E[z^2] - E[z]^2 (one pass), which
    cancels where a row's mean is large against its spread: the caller keeps z centred."""
    s_z, s_zz = tl.reduce((z, z * z), 1, _add2)
    mu = s_z / D
    rstd = 1.0 / tl.sqrt(tl.maximum(s_zz / D - mu * mu, 0.0) + eps)
    xh = (z - mu[:, None]) * rstd[:, None]
    g = gamma * xh + beta - (v - k)
    gx = g * gamma
    s1, s2 = tl.reduce((gx, gx * xh), 1, _add2)
    gz = rstd[:, None] * (gx - s1[:, None] / D - xh * (s2[:, None] / D))
    return xh, rstd, g, gx, gz


@triton.jit
def _ln_double_bwd(G, gx, g, xh, rstd, gz, gamma, D: tl.constexpr):
    """Back-propagate G = dL/d(gz) through gz = LN_bwd(gx = (gamma xh + beta - y) gamma, xh(z), rstd(z)).

    Returns dz (w.r.t. the LN input z), dg (dL/dg: dk += dg, dv -= dg) and the row sums to add to
    d(gamma), d(beta)."""
    sG = tl.sum(G, axis=1)
    sGx = tl.sum(G * xh, axis=1)
    s2 = tl.sum(gx * xh, axis=1)
    dgx = rstd[:, None] * (G - sG[:, None] / D - xh * (sGx[:, None] / D))
    dxh = -rstd[:, None] * (G * (s2[:, None] / D) + gx * (sGx[:, None] / D))
    dr = tl.sum(G * gz, axis=1) / rstd
    dg = dgx * gamma
    dgamma = tl.sum(dgx * g + dg * xh, axis=0)
    dbeta = tl.sum(dg, axis=0)
    dxh = dxh + dg * gamma
    drt = dr + tl.sum(dxh * xh, axis=1) / rstd
    mean_dxh = tl.sum(dxh, axis=1) / D
    dz = rstd[:, None] * (dxh - mean_dxh[:, None]) - (drt * rstd * rstd / D)[:, None] * xh
    return dz, dg, dgamma, dbeta


@triton.jit
def _mlp_update(k, v, e, w1, b1, w2, b2, gamma, beta, eps, D: tl.constexpr, DT: tl.constexpr, IEEE: tl.constexpr):
    """One mini-batch of TTT-MLP inner training: returns W_end."""
    z1 = _mm(k, w1, DT, IEEE) + b1
    a, da = _gelu_and_grad(z1, IEEE)
    z2 = _mm(a, w2, DT, IEEE) + b2
    xh, rstd, g, gx, gz2 = _ln_target_grad(z2, v, k, gamma, beta, D, eps)
    gz1 = _mm(gz2, tl.trans(w2), DT, IEEE) * da
    p2 = e[:, None] * gz2
    p1 = e[:, None] * gz1
    w2n = w2 - _mm(tl.trans(a), p2, DT, IEEE)
    b2n = b2 - tl.sum(p2, axis=0)[None, :]
    w1n = w1 - _mm(tl.trans(k), p1, DT, IEEE)
    b1n = b1 - tl.sum(p1, axis=0)[None, :]
    return w1n, b1n, w2n, b2n


@triton.jit
def _linear_update(k, v, e, w, b, gamma, beta, eps, D: tl.constexpr, DT: tl.constexpr, IEEE: tl.constexpr):
    z = _mm(k, w, DT, IEEE) + b
    xh, rstd, g, gx, gz = _ln_target_grad(z, v, k, gamma, beta, D, eps)
    p = e[:, None] * gz
    wn = w - _mm(tl.trans(k), p, DT, IEEE)
    bn = b - tl.sum(p, axis=0)[None, :]
    return wn, bn


# ------------------------------------------------------------------------------------------------
# TTT-MLP kernels
# ------------------------------------------------------------------------------------------------
@triton.jit
def _ttt_mlp_fwd_kernel(
    Q, K, V, ETA, LNW, LNB,
    W1, B1, W2, B2,
    OUT, W1_OUT, B1_OUT, W2_OUT, B2_OUT,
    CK_W1, CK_B1, CK_W2, CK_B2,
    N, H, n_mb, n_ck, G, eps,
    D: tl.constexpr, F: tl.constexpr, MB: tl.constexpr, SAVE: tl.constexpr, IEEE: tl.constexpr,
):
    pid = tl.program_id(0)
    pid64 = pid.to(tl.int64)
    h = pid % H
    DT = Q.dtype.element_ty
    rows = tl.arange(0, MB)
    dc = tl.arange(0, D)
    fc = tl.arange(0, F)
    w1_offs = dc[:, None] * F + fc[None, :]
    w2_offs = fc[:, None] * D + dc[None, :]
    w1 = tl.load(W1 + pid64 * D * F + w1_offs).to(tl.float32)
    b1 = tl.load(B1 + pid64 * F + fc[None, :]).to(tl.float32)
    w2 = tl.load(W2 + pid64 * F * D + w2_offs).to(tl.float32)
    b2 = tl.load(B2 + pid64 * D + dc[None, :]).to(tl.float32)
    gamma = tl.load(LNW + h * D + dc[None, :]).to(tl.float32)
    beta = tl.load(LNB + h * D + dc[None, :]).to(tl.float32)
    tok = pid64 * N * D
    eta_base = pid64 * N
    tile = rows[:, None] * D + dc[None, :]
    for c in range(n_ck):
        if SAVE:
            ck = pid64 * n_ck + c
            tl.store(CK_W1 + ck * D * F + w1_offs, w1)
            tl.store(CK_B1 + ck * F + fc[None, :], b1)
            tl.store(CK_W2 + ck * F * D + w2_offs, w2)
            tl.store(CK_B2 + ck * D + dc[None, :], b2)
        i_end = tl.minimum(c * G + G, n_mb)
        for i in range(c * G, i_end):
            offs = tok + i * MB * D + tile
            q = tl.load(Q + offs)
            k = tl.load(K + offs)
            v = tl.load(V + offs).to(tl.float32)
            e = tl.load(ETA + eta_base + i * MB + rows).to(tl.float32)
            w1, b1, w2, b2 = _mlp_update(k, v, e, w1, b1, w2, b2, gamma, beta, eps, D, DT, IEEE)
            zq = _mm(_gelu(_mm(q, w1, DT, IEEE) + b1, IEEE), w2, DT, IEEE) + b2
            xq, rq = _ln_norm(zq, D, eps)
            out = q.to(tl.float32) + gamma * xq + beta
            tl.store(OUT + offs, out.to(OUT.dtype.element_ty))
    tl.store(W1_OUT + pid64 * D * F + w1_offs, w1)
    tl.store(B1_OUT + pid64 * F + fc[None, :], b1)
    tl.store(W2_OUT + pid64 * F * D + w2_offs, w2)
    tl.store(B2_OUT + pid64 * D + dc[None, :], b2)


@triton.jit
def _mlp_chunk_fwd(x, w1t, b1, w2, DT: tl.constexpr, IEEE: tl.constexpr):
    """gelu(x W1[:, c] + b1[c]) W2[c, :]: one F-chunk's contribution to the MLP output (w1t = W1[:, c]^T)."""
    return _mm(_gelu(_mm(x, tl.trans(w1t), DT, IEEE) + b1[None, :], IEEE), w2, DT, IEEE)


@triton.jit
def _mlp_chunk_update(k, e, gz2, p2, w1t, b1, w2, DT: tl.constexpr, IEEE: tl.constexpr):
    """Inner-gradient step for one F-chunk of the state (W1[:, c]^T, b1[c], W2[c, :]).

    Only dot operands are kept in the input dtype (ac, p1c) so the live set stays small."""
    z1c = _mm(k, tl.trans(w1t), DT, IEEE) + b1[None, :]
    ac, gpc = _gelu_and_grad(z1c, IEEE)
    ac = ac.to(DT)
    p1c = e[:, None] * (_mm(gz2, tl.trans(w2), DT, IEEE) * gpc)
    b1 = b1 - tl.sum(p1c, axis=0)
    w2 = w2 - _mm(tl.trans(ac), p2, DT, IEEE)
    w1t = w1t - _mm(tl.trans(p1c.to(DT)), k, DT, IEEE)
    return w1t, b1, w2


@triton.jit
def _ttt_mlp_fwd_chunked_kernel(
    Q, K, V, ETA, LNW, LNB,
    W1, B1, W2, B2,
    OUT, W1_OUT, B1_OUT, W2_OUT, B2_OUT,
    CK_W1, CK_B1, CK_W2, CK_B2,
    N, H, n_mb, n_ck, G, eps,
    D: tl.constexpr, F: tl.constexpr, MB: tl.constexpr, SAVE: tl.constexpr, IEEE: tl.constexpr,
):
    """Forward with the hidden dim split into 2 chunks of F/2 held as separate register tensors.

    f(x) = sum_c gelu(x W1[:, c] + b1[c]) W2[c, :] + b2, and the update of chunk c needs only chunk c
    (plus the full dl/dZ2), so no [b, F] intermediate is live. The state is kept as [F/2, D] tiles
    (W1 transposed) and 1-D biases: with 8 warps Triton's Hopper MMA layout covers 128 rows, so [128, 64]
    accumulators hold no replicated elements, while [64, 64] tiles or [1, F] rows were replicated across
    warp groups (2x-64x the registers) and spilled. Z1 is recomputed in the update pass: 8 instead of
    7 matmul-equivalents per mini-batch."""
    pid = tl.program_id(0)
    pid64 = pid.to(tl.int64)
    h = pid % H
    DT = Q.dtype.element_ty
    FC: tl.constexpr = F // 2
    rows = tl.arange(0, MB)
    dc = tl.arange(0, D)
    cc = tl.arange(0, FC)
    o1 = cc[:, None] + dc[None, :] * F  # W1[:, chunk 0]^T as [FC, D]; chunk 1 adds FC
    o2 = cc[:, None] * D + dc[None, :]  # W2[chunk 0, :]; chunk 1 adds FC * D
    bw1 = W1 + pid64 * D * F
    bw2 = W2 + pid64 * F * D
    bb1 = B1 + pid64 * F
    w1_0 = tl.load(bw1 + o1).to(tl.float32)
    w1_1 = tl.load(bw1 + FC + o1).to(tl.float32)
    b1_0 = tl.load(bb1 + cc).to(tl.float32)
    b1_1 = tl.load(bb1 + FC + cc).to(tl.float32)
    w2_0 = tl.load(bw2 + o2).to(tl.float32)
    w2_1 = tl.load(bw2 + FC * D + o2).to(tl.float32)
    b2 = tl.load(B2 + pid64 * D + dc).to(tl.float32)
    gamma = tl.load(LNW + h * D + dc).to(tl.float32)[None, :]
    beta = tl.load(LNB + h * D + dc).to(tl.float32)[None, :]
    tok = pid64 * N * D
    eta_base = pid64 * N
    tile = rows[:, None] * D + dc[None, :]
    for c in range(n_ck):
        if SAVE:
            ck = pid64 * n_ck + c
            _store_mlp_chunks(CK_W1 + ck * D * F, CK_B1 + ck * F, CK_W2 + ck * F * D, CK_B2 + ck * D,
                              w1_0, w1_1, b1_0, b1_1, w2_0, w2_1, b2, o1, o2, cc, dc, D, FC)
        i_end = tl.minimum(c * G + G, n_mb)
        for i in range(c * G, i_end):
            offs = tok + i * MB * D + tile
            k = tl.load(K + offs)
            v = tl.load(V + offs).to(tl.float32)
            e = tl.load(ETA + eta_base + i * MB + rows).to(tl.float32)
            z2 = b2[None, :] + _mlp_chunk_fwd(k, w1_0, b1_0, w2_0, DT, IEEE)
            z2 += _mlp_chunk_fwd(k, w1_1, b1_1, w2_1, DT, IEEE)
            xh, rstd, g, gx, gz2 = _ln_target_grad(z2, v, k, gamma, beta, D, eps)
            p2 = e[:, None] * gz2
            b2 = b2 - tl.sum(p2, axis=0)
            gz2 = gz2.to(DT)
            p2 = p2.to(DT)
            w1_0, b1_0, w2_0 = _mlp_chunk_update(k, e, gz2, p2, w1_0, b1_0, w2_0, DT, IEEE)
            w1_1, b1_1, w2_1 = _mlp_chunk_update(k, e, gz2, p2, w1_1, b1_1, w2_1, DT, IEEE)
            q = tl.load(Q + offs)  # reloaded (L1/L2 hit) rather than kept live through the update
            zq2 = b2[None, :] + _mlp_chunk_fwd(q, w1_0, b1_0, w2_0, DT, IEEE)
            zq2 += _mlp_chunk_fwd(q, w1_1, b1_1, w2_1, DT, IEEE)
            xq, rq = _ln_norm(zq2, D, eps)
            out = q.to(tl.float32) + gamma * xq + beta
            tl.store(OUT + offs, out.to(OUT.dtype.element_ty))
    _store_mlp_chunks(W1_OUT + pid64 * D * F, B1_OUT + pid64 * F, W2_OUT + pid64 * F * D, B2_OUT + pid64 * D,
                      w1_0, w1_1, b1_0, b1_1, w2_0, w2_1, b2, o1, o2, cc, dc, D, FC)


@triton.jit
def _store_mlp_chunks(PW1, PB1, PW2, PB2, w1_0, w1_1, b1_0, b1_1, w2_0, w2_1, b2, o1, o2, cc, dc,
                      D: tl.constexpr, FC: tl.constexpr):
    tl.store(PW1 + o1, w1_0)
    tl.store(PW1 + FC + o1, w1_1)
    tl.store(PB1 + cc, b1_0)
    tl.store(PB1 + FC + cc, b1_1)
    tl.store(PW2 + o2, w2_0)
    tl.store(PW2 + FC * D + o2, w2_1)
    tl.store(PB2 + dc, b2)


@triton.jit
def _x_w2(x, w2, W2T: tl.constexpr, DT: tl.constexpr, IEEE: tl.constexpr):
    """x [b, FC] @ W2[c, :] where the chunk is held as [FC, D] (W2T False) or transposed [D, FC]."""
    if W2T:
        return _mm(x, tl.trans(w2), DT, IEEE)
    else:
        return _mm(x, w2, DT, IEEE)


@triton.jit
def _x_w2t(x, w2, W2T: tl.constexpr, DT: tl.constexpr, IEEE: tl.constexpr):
    """x [b, D] @ W2[c, :]^T."""
    if W2T:
        return _mm(x, w2, DT, IEEE)
    else:
        return _mm(x, tl.trans(w2), DT, IEEE)


@triton.jit
def _outer_w2(a, b, W2T: tl.constexpr, DT: tl.constexpr, IEEE: tl.constexpr):
    """a^T b for a [b, FC], b [b, D], in the chunk's storage orientation ([FC, D], or [D, FC] = b^T a).

    The transposed orientation keeps every matmul at M = 64 rows (wgmma) when FC < 64."""
    if W2T:
        return _mm(tl.trans(b), a, DT, IEEE)
    else:
        return _mm(tl.trans(a), b, DT, IEEE)


@triton.jit
def _w2_offsets(cc, dc, D: tl.constexpr, W2T: tl.constexpr):
    """Offsets of W2[chunk, :] inside W2 [F, D]: as an [FC, D] tile, or its transpose [D, FC]."""
    if W2T:
        return dc[:, None] + cc[None, :] * D
    else:
        return cc[:, None] * D + dc[None, :]


@triton.jit
def _mlp_gmem_step(KP, VP, e, QP, RW1, RB1, RW2, WW1, WB1, WW2, b2, gamma, beta, eps,
                   D: tl.constexpr, F: tl.constexpr, FC: tl.constexpr, MB: tl.constexpr,
                   WITH_OUT: tl.constexpr, W2T: tl.constexpr, DT: tl.constexpr, IEEE: tl.constexpr,
                   OUT_PASS: tl.constexpr = False):
    """One TTT-MLP mini-batch with W1 [D, F] (stored chunk-major, [F / FC, D, FC]: then every [64, 64] tile
    this kernel loads, k/q/v, W1 and W2 chunks, has the same offsets, one register tensor instead of three;
    see _w1_to_chunks), b1 [F], W2 [F, D] in global memory (L2-resident, fp32).

    Reads the state at RW1/RB1/RW2, writes W_end to WW1/WB1/WW2 (may alias), F-chunk by F-chunk, so only
    [b, FC] / [D, FC] tiles are live in registers; k and q are re-read per chunk (L1 hits) and dl/dZ2 is
    kept in the operand dtype, to keep the live set (and spills) small; v is read at its one use.
    Returns (b2_end, f(q; W_end) before LN) -- the latter only if WITH_OUT."""
    rows = tl.arange(0, MB)
    dc = tl.arange(0, D)
    cc = tl.arange(0, FC)
    tile = rows[:, None] * D + dc[None, :]
    o1 = dc[:, None] * FC + cc[None, :]  # W1 buffers are chunk-major: [F / FC, D, FC]
    o2 = _w2_offsets(cc, dc, D, W2T)
    z2 = tl.zeros([MB, D], dtype=tl.float32) + b2[None, :]
    for ch in range(F // FC):
        k = tl.load(KP + tile)
        w1c = tl.load(RW1 + ch * FC * D + o1)
        b1c = tl.load(RB1 + ch * FC + cc)
        w2c = tl.load(RW2 + ch * FC * D + o2)
        z2 += _x_w2(_gelu(_mm(k, w1c, DT, IEEE) + b1c[None, :], IEEE), w2c, W2T, DT, IEEE)
    k = tl.load(KP + tile)
    # v is read only now, not held through pass 1
    xh, rstd, g, gx, gz2 = _ln_target_grad(z2, tl.load(VP + tile).to(tl.float32), k.to(tl.float32), gamma, beta, D, eps)
    p2 = e[:, None] * gz2
    b2 = b2 - tl.sum(p2, axis=0)
    gz2 = gz2.to(DT)
    p2 = p2.to(DT)
    zq2 = tl.zeros([MB, D], dtype=tl.float32) + b2[None, :]
    for ch in range(F // FC):
        k = tl.load(KP + tile)
        w1c = tl.load(RW1 + ch * FC * D + o1)
        b1c = tl.load(RB1 + ch * FC + cc)
        w2c = tl.load(RW2 + ch * FC * D + o2)
        z1c = _mm(k, w1c, DT, IEEE) + b1c[None, :]
        ac, gpc = _gelu_and_grad(z1c, IEEE)
        p1c = e[:, None] * (_x_w2t(gz2, w2c, W2T, DT, IEEE) * gpc)
        w2c = w2c - _outer_w2(ac.to(DT), p2, W2T, DT, IEEE)
        b1c = b1c - tl.sum(p1c, axis=0)
        w1c = w1c - _mm(tl.trans(k), p1c.to(DT), DT, IEEE)
        tl.debug_barrier()  # every thread has read chunk ch before it is overwritten (in-place update)
        tl.store(WW1 + ch * FC * D + o1, w1c)
        tl.store(WB1 + ch * FC + cc, b1c)
        tl.store(WW2 + ch * FC * D + o2, w2c)
        if WITH_OUT and not OUT_PASS:
            q = tl.load(QP + tile)
            zq2 += _x_w2(_gelu(_mm(q, w1c, DT, IEEE) + b1c[None, :], IEEE), w2c, W2T, DT, IEEE)
    tl.debug_barrier()  # W_end visible to all threads before the next mini-batch reads it
    if WITH_OUT and OUT_PASS:
        # f(q; W_end) in a pass of its own, reading W_end back (L1/L2): fewer live registers in the update pass
        for ch in range(F // FC):
            zq2 += _mlp_chunk_fwd_nt(tl.load(QP + tile), tl.load(WW1 + ch * FC * D + o1), tl.load(WB1 + ch * FC + cc),
                                     tl.load(WW2 + ch * FC * D + o2), W2T, DT, IEEE)
    return b2, zq2


@triton.jit
def _ttt_mlp_fwd_gmem_kernel(
    Q, K, V, ETA, LNW, LNB,
    SW1, SB1, SW2, B2,
    OUT, B2_OUT,
    CK_W1, CK_B1, CK_W2, CK_B2,
    N, H, n_mb, n_ck, G, eps,
    D: tl.constexpr, F: tl.constexpr, FC: tl.constexpr, MB: tl.constexpr, SAVE: tl.constexpr,
    W2T: tl.constexpr, IEEE: tl.constexpr, OUT_PASS: tl.constexpr,
):
    """Forward with the W1/W2 state updated in place in global memory (SW1/SB1/SW2 hold the initial
    state on entry and the final state on exit); see _mlp_gmem_step."""
    pid = tl.program_id(0)
    pid64 = pid.to(tl.int64)
    h = pid % H
    DT = Q.dtype.element_ty
    rows = tl.arange(0, MB)
    dc = tl.arange(0, D)
    fc = tl.arange(0, F)
    pw1 = SW1 + pid64 * D * F
    pb1 = SB1 + pid64 * F
    pw2 = SW2 + pid64 * F * D
    # b2 lives in its output row between mini-batches (like W1/b1/W2): fewer registers held across the scan
    pb2 = B2_OUT + pid64 * D
    tl.store(pb2 + dc, tl.load(B2 + pid64 * D + dc).to(tl.float32))
    tl.debug_barrier()
    tok = pid64 * N * D
    eta_base = pid64 * N
    tile = rows[:, None] * D + dc[None, :]
    for c in range(n_ck):
        if SAVE:
            ck = pid64 * n_ck + c
            _copy_mlp_state(pw1, pb1, pw2, CK_W1 + ck * D * F, CK_B1 + ck * F, CK_W2 + ck * F * D, D, F)
            tl.store(CK_B2 + ck * D + dc, tl.load(pb2 + dc))
        i_end = tl.minimum(c * G + G, n_mb)
        for i in range(c * G, i_end):
            offs = tok + i * MB * D + tile
            e = tl.load(ETA + eta_base + i * MB + rows).to(tl.float32)
            # the LN parameters are re-read each mini-batch (L1 hits) rather than held: registers are short
            b2, zq2 = _mlp_gmem_step(K + tok + i * MB * D, V + tok + i * MB * D, e, Q + tok + i * MB * D, pw1, pb1, pw2, pw1, pb1, pw2, tl.load(pb2 + dc),
                                     tl.load(LNW + h * D + dc)[None, :], tl.load(LNB + h * D + dc)[None, :], eps,
                                     D, F, FC, MB, True, W2T, DT, IEEE, OUT_PASS)
            tl.store(pb2 + dc, b2)  # read by every thread before the step's barriers
            tl.debug_barrier()
            xq, rq = _ln_norm(zq2, D, eps)
            out = (tl.load(Q + offs).to(tl.float32) + tl.load(LNW + h * D + dc)[None, :] * xq
                   + tl.load(LNB + h * D + dc)[None, :])
            tl.store(OUT + offs, out.to(OUT.dtype.element_ty))


@triton.jit
def _copy_mlp_state(RW1, RB1, RW2, WW1, WB1, WW2, D: tl.constexpr, F: tl.constexpr):
    dc = tl.arange(0, D)
    fc = tl.arange(0, F)
    tl.store(WW1 + dc[:, None] * F + fc[None, :], tl.load(RW1 + dc[:, None] * F + fc[None, :]))
    tl.store(WB1 + fc, tl.load(RB1 + fc))
    tl.store(WW2 + fc[:, None] * D + dc[None, :], tl.load(RW2 + fc[:, None] * D + dc[None, :]))


# ------------------------------------------------------------------------------------------------
# TTT-MLP forward with each head's hidden units split over NSPLIT programs ("split")
# ------------------------------------------------------------------------------------------------
# One program per head leaves the forward bound by one SM's dot latency: ~32 dependent 64x64x64 dots per
# mini-batch, 96 programs on 132 SMs. Here the F hidden units of a head are split over NSPLIT programs (a
# "group"), each owning W1[:, slice] and W2[slice, :] (FS = 64 columns) for the whole scan. Everything but
# Z2 = gelu(k W1 + b1) W2 + b2 is local to a slice; Z2 is a sum over the slices, so the group exchanges its
# partial sums once per mini-batch through global memory (one meeting). The output's sum, f(q; W_end), needs no
# meeting of its own: each program computes its partial while it waits at the next meeting and reduces its
# share of the rows (MB / NSPLIT) one meeting later, when every partial is written.
# Programs of a group wait on each other, so they must all be resident at once: the host launches the split
# only where every head's group fits on the GPU at once (split_groups), and a bounded spin reports a stall
# instead of hanging. Triton's interpreter runs programs one after another, so there NSPLIT is 1 (the exchange
# and the deferred output still run); the cross-program path is checked on the device (tests/gpu).
@triton.jit
def _group_arrive(CNT):
    """Tell the group this program's stores so far are done (release)."""
    tl.debug_barrier()  # every thread's stores are issued before the arrival
    tl.atomic_add(CNT, 1, sem="release", scope="gpu")


@triton.jit
def _group_wait(CNT, ERR, target, max_spin):
    """Wait until the group's counter reaches ``target`` (every program arrived; acquire).

    Returns the poll budget for the next wait: 0 after a stall (a group member never arrived, e.g. not
    resident), which is flagged in ERR; the program then runs to its end without waiting again."""
    n = tl.atomic_add(CNT, 0, sem="acquire", scope="gpu")
    spins = 0
    while (n < target) & (spins < max_spin):
        n = tl.atomic_add(CNT, 0, sem="acquire", scope="gpu")
        spins += 1
    if n < target:
        tl.atomic_xchg(ERR, 1)
        max_spin = 0
    tl.debug_barrier()
    return max_spin


@triton.jit
def _split_out_partial(QP, PW1, PB1, PW2, b2, DST, part, tile, fc, o1, o2, DT: tl.constexpr, IEEE: tl.constexpr):
    """This program's share of f(q; W) for one mini-batch (part 0 adds b2): gelu(q W1[:, s] + b1[s]) W2[s, :]."""
    zq = _mm(_gelu(_mm(tl.load(QP + tile), tl.load(PW1 + o1), DT, IEEE) + tl.load(PB1 + fc)[None, :], IEEE),
             tl.load(PW2 + o2), DT, IEEE)
    if part == 0:
        zq += b2[None, :]
    tl.store(DST + tile, zq)


@triton.jit
def _finish_split_rows(OUT, QP, OPART, PLNW, PLNB, rtile, eps, SLOT_STRIDE: tl.constexpr,
                       NSPLIT: tl.constexpr, D: tl.constexpr, RP: tl.constexpr):
    """out = q + LN(f(q; W_end)) for this program's rows, f summed from the group's partials."""
    zq = tl.load(OPART + rtile, cache_modifier=".cg")
    for j in tl.static_range(1, NSPLIT):
        zq += tl.load(OPART + j * SLOT_STRIDE + rtile, cache_modifier=".cg")
    xq, rq = _ln_norm(zq, D, eps)
    dc = tl.arange(0, D)
    out = tl.load(QP + rtile).to(tl.float32) + tl.load(PLNW + dc)[None, :] * xq + tl.load(PLNB + dc)[None, :]
    tl.store(OUT + rtile, out.to(OUT.dtype.element_ty))


@triton.jit
def _split_program(pid, D: tl.constexpr, FS: tl.constexpr, NSPLIT: tl.constexpr, MB: tl.constexpr):
    """Where a split program (forward or backward) stands: its group and part, the number of groups, index
    vectors, the [MB, D] tile offsets, its share of the rows (my_rows, rtile) and the offsets of its W1 / W2
    slices (o1 [D, FS], o2 [FS, D])."""
    RP: tl.constexpr = MB // NSPLIT
    grp = pid // NSPLIT
    part = pid % NSPLIT
    n_groups = tl.num_programs(0) // NSPLIT
    rows = tl.arange(0, MB)
    dc = tl.arange(0, D)
    fc = tl.arange(0, FS)
    tile = rows[:, None] * D + dc[None, :]
    my_rows = part * RP + tl.arange(0, RP)
    rtile = my_rows[:, None] * D + dc[None, :]
    if FS == D and MB == D:  # every [64, 64] tile has the same offsets: one register tensor, not three
        o1 = tile
        o2 = tile
    else:
        o1 = dc[:, None] * FS + fc[None, :]
        o2 = fc[:, None] * D + dc[None, :]
    return grp, part, n_groups, rows, dc, fc, tile, my_rows, rtile, o1, o2


@triton.jit
def _ttt_mlp_fwd_split_kernel(
    Q, K, V, ETA, LNW, LNB,
    SW1, SB1, SW2, SB2,
    OUT, CK_W1, CK_B1, CK_W2, CK_B2,
    XCH, PXCH, OPART, SCR, CNT, ERR,
    BH, N, H, n_mb, n_ck, G, eps, max_spin,
    D: tl.constexpr, FS: tl.constexpr, NSPLIT: tl.constexpr, MB: tl.constexpr, SAVE: tl.constexpr,
    IEEE: tl.constexpr, PARK: tl.constexpr, ROWSHARE: tl.constexpr,
):
    """SW1 (chunk-major, [BH, NSPLIT, D, FS]), SB1 [BH, F], SW2 [BH, F, D], SB2 [BH, D] hold the initial
    state on entry and the final state on exit; each program updates its slices in place (L1/L2-resident:
    held in registers they left too few for several programs per SM). XCH: per program 2 slots of [MB, D]
    fp32 (Z2 partials, by mini-batch parity); OPART: 3 slots (output partials); CNT: a zeroed counter per group.
    PARK: gelu(Z1) and its derivative wait in SCR (per program [2, MB, FS] fp32, L1) instead of registers
    while the program waits for its group (fewer spills, more memory instructions).
    ROWSHARE: the row-wise work after the meeting (summing the Z2 partials, the LN target gradient) is shared
    out: each program does its MB / NSPLIT rows and writes p2 = eta * dl/dZ2 for them to PXCH (per group 2 slots
    of [MB, D] fp32, by mini-batch parity), and a second meeting hands every program the whole p2. Without it,
    every program of the group does all the rows (bitwise alike).

    Mini-batch i: Z2 partial -> arrive -> [output partial of mini-batch i-1 with the current state, W_end(i-1):
    work that hides the wait] -> wait -> Z2 -> finish the rows of output i-2 (its partials were all written
    before the group arrived at i) -> LN gradient -> update. With ROWSHARE: ... wait -> this program's rows of Z2,
    their LN gradient and p2 -> arrive -> [finish the rows of output i-2] -> wait -> all of p2 -> update."""
    F: tl.constexpr = FS * NSPLIT
    RP: tl.constexpr = MB // NSPLIT
    SLOT: tl.constexpr = MB * D
    pid = tl.program_id(0)
    grp, part, n_groups, rows, dc, fc, tile, my_rows, rtile, o1, o2 = _split_program(pid, D, FS, NSPLIT, MB)
    DT = Q.dtype.element_ty
    cnt = CNT + grp * 32  # one 128-byte line per group's counter: the groups' polls do not contend
    xch_grp = XCH + (grp * NSPLIT).to(tl.int64) * 2 * SLOT  # [NSPLIT, 2, MB, D]
    opart_grp = OPART + (grp * NSPLIT).to(tl.int64) * 3 * SLOT  # [NSPLIT, 3, MB, D]
    xch_mine = xch_grp + part * 2 * SLOT
    pxch_grp = PXCH + grp.to(tl.int64) * 2 * SLOT  # [2, MB, D]: only with ROWSHARE
    opart_mine = opart_grp + part * 3 * SLOT
    scr_a = SCR + pid.to(tl.int64) * 2 * MB * FS
    scr_da = scr_a + MB * FS
    tile_f = rows[:, None] * FS + fc[None, :]
    arrivals = 0
    for t in range(0, tl.cdiv(BH - grp, n_groups)):  # the heads of this group: grp, grp + n_groups, ...
        bh64 = grp.to(tl.int64) + t * n_groups
        h = bh64 % H
        pw1 = SW1 + bh64 * D * F + part * D * FS
        pb1 = SB1 + bh64 * F + part * FS
        pw2 = SW2 + bh64 * F * D + part * FS * D
        # b1 and the LN parameters are re-read where used (L1 hits): registers are short
        b2 = tl.load(SB2 + bh64 * D + dc)
        plnw = LNW + h * D
        plnb = LNB + h * D
        tok = bh64 * N * D
        for c in range(n_ck):
            if SAVE:
                ck = bh64 * n_ck + c
                tl.store(CK_W1 + ck * D * F + part * D * FS + o1, tl.load(pw1 + o1))
                tl.store(CK_B1 + ck * F + part * FS + fc, tl.load(pb1 + fc))
                tl.store(CK_W2 + ck * F * D + part * FS * D + o2, tl.load(pw2 + o2))
                if part == 0:
                    tl.store(CK_B2 + ck * D + dc, b2)
            i_end = tl.minimum(c * G + G, n_mb)
            for i in range(c * G, i_end):
                base = tok + i * MB * D
                k = tl.load(K + base + tile)
                z1 = _mm(k, tl.load(pw1 + o1), DT, IEEE) + tl.load(pb1 + fc)[None, :]
                a, da = _gelu_and_grad(z1, IEEE)
                a = a.to(DT)
                if PARK:
                    tl.store(scr_a + tile_f, a.to(tl.float32))
                    tl.store(scr_da + tile_f, da)
                tl.store(xch_mine + (i % 2) * SLOT + tile, _mm(a, tl.load(pw2 + o2), DT, IEEE))
                arrivals += 1
                _group_arrive(cnt)
                if i > 0:
                    _split_out_partial(Q + base - MB * D, pw1, pb1, pw2, b2, opart_mine + ((i - 1) % 3) * SLOT,
                                       part, tile, fc, o1, o2, DT, IEEE)
                max_spin = _group_wait(cnt, ERR, arrivals * NSPLIT, max_spin)
                if ROWSHARE:
                    # this program's rows: Z2 from the partials, the LN target gradient, p2 = eta * dl/dZ2
                    rrows = part * RP + tl.arange(0, RP)
                    z2r = tl.zeros([RP, D], dtype=tl.float32) + b2[None, :]
                    for j in tl.static_range(NSPLIT):
                        z2r += tl.load(xch_grp + j * 2 * SLOT + (i % 2) * SLOT + rtile, cache_modifier=".cg")
                    _, _, _, _, gzr = _ln_target_grad(z2r, tl.load(V + base + rtile).to(tl.float32),
                                                      tl.load(K + base + rtile).to(tl.float32),
                                                      tl.load(plnw + dc)[None, :], tl.load(plnb + dc)[None, :], D, eps)
                    er = tl.load(ETA + bh64 * N + i * MB + rrows).to(tl.float32)
                    tl.store(pxch_grp + (i % 2) * SLOT + rtile, er[:, None] * gzr)
                    # the second meeting: every program's rows of p2 written (the slot of mini-batch i + 2 is
                    # written only after the first meeting of i + 1, which every program reaches after reading)
                    arrivals += 1
                    _group_arrive(cnt)
                    if i > 1:  # work that hides this wait: the rows of output i - 2 (all partials written)
                        _finish_split_rows(OUT + base - 2 * MB * D, Q + base - 2 * MB * D,
                                           opart_grp + ((i - 2) % 3) * SLOT, plnw, plnb, rtile, eps, 3 * SLOT,
                                           NSPLIT, D, RP)
                    max_spin = _group_wait(cnt, ERR, arrivals * NSPLIT, max_spin)
                    p2 = tl.load(pxch_grp + (i % 2) * SLOT + tile, cache_modifier=".cg")
                    if PARK:
                        k = tl.load(K + base + tile)
                        a = tl.load(scr_a + tile_f).to(DT)
                        da = tl.load(scr_da + tile_f)
                    b2 = b2 - tl.sum(p2, axis=0)
                    p2 = p2.to(DT)
                    w2 = tl.load(pw2 + o2)
                    # dl/dZ1 = (dl/dZ2 W2^T) * gelu'(Z1), scaled by eta row-wise: (p2 W2^T) * gelu'(Z1)
                    p1 = _mm(p2, tl.trans(w2), DT, IEEE) * da
                else:
                    z2 = tl.zeros([MB, D], dtype=tl.float32) + b2[None, :]
                    for j in tl.static_range(NSPLIT):
                        z2 += tl.load(xch_grp + j * 2 * SLOT + (i % 2) * SLOT + tile, cache_modifier=".cg")
                    if i > 1:
                        _finish_split_rows(OUT + base - 2 * MB * D, Q + base - 2 * MB * D,
                                           opart_grp + ((i - 2) % 3) * SLOT, plnw, plnb, rtile, eps, 3 * SLOT,
                                           NSPLIT, D, RP)
                    if PARK:
                        k = tl.load(K + base + tile)
                        a = tl.load(scr_a + tile_f).to(DT)
                        da = tl.load(scr_da + tile_f)
                    v = tl.load(V + base + tile).to(tl.float32)
                    e = tl.load(ETA + bh64 * N + i * MB + rows).to(tl.float32)
                    xh, rstd, g, gx, gz2 = _ln_target_grad(z2, v, k.to(tl.float32), tl.load(plnw + dc)[None, :],
                                                           tl.load(plnb + dc)[None, :], D, eps)
                    p2 = e[:, None] * gz2
                    b2 = b2 - tl.sum(p2, axis=0)
                    p2 = p2.to(DT)  # dot operands from here on: half the registers
                    gz2 = gz2.to(DT)
                    # W2, then W1: each slice is read, updated and written back in a phase of its own (a barrier
                    # between the last read and the first write), so only one updated slice is live at a time
                    w2 = tl.load(pw2 + o2)
                    p1 = e[:, None] * (_mm(gz2, tl.trans(w2), DT, IEEE) * da)
                w2 = w2 - _mm(tl.trans(a), p2, DT, IEEE)
                tl.debug_barrier()
                tl.store(pw2 + o2, w2)
                tl.store(pb1 + fc, tl.load(pb1 + fc) - tl.sum(p1, axis=0))
                p1 = p1.to(DT)
                w1 = tl.load(pw1 + o1) - _mm(tl.trans(k), p1, DT, IEEE)
                tl.debug_barrier()
                tl.store(pw1 + o1, w1)
                tl.debug_barrier()  # W_end visible to every thread before the next mini-batch reads it
        # the last mini-batch's output partial, then one more meeting: every partial of the head is written
        last = tok + (n_mb - 1) * MB * D
        _split_out_partial(Q + last, pw1, pb1, pw2, b2, opart_mine + ((n_mb - 1) % 3) * SLOT, part, tile, fc, o1, o2,
                           DT, IEEE)
        arrivals += 1
        _group_arrive(cnt)
        max_spin = _group_wait(cnt, ERR, arrivals * NSPLIT, max_spin)
        if n_mb > 1:
            _finish_split_rows(OUT + last - MB * D, Q + last - MB * D, opart_grp + ((n_mb - 2) % 3) * SLOT,
                               plnw, plnb, rtile, eps, 3 * SLOT, NSPLIT, D, RP)
        _finish_split_rows(OUT + last, Q + last, opart_grp + ((n_mb - 1) % 3) * SLOT, plnw, plnb, rtile, eps,
                           3 * SLOT, NSPLIT, D, RP)
        if part == 0:
            tl.store(SB2 + bh64 * D + dc, b2)

@triton.jit
def _mlp_gmem_bwd_step(QP, KP, DQP, VP, e, DOP, RW1, RB1, RW2, b2, EW1, EB1, EW2, b2e, GW1, GB1, GW2, GB2,
                       LNWP, LNBP, GLNW, GLNB, eps, D: tl.constexpr, F: tl.constexpr, FC: tl.constexpr,
                       MB: tl.constexpr, W2T: tl.constexpr, DT: tl.constexpr, IEEE: tl.constexpr):
    """Back-propagate one TTT-MLP mini-batch, F-chunk by F-chunk, with everything [D, F]-sized in global
    memory: the state at its start (RW1/RB1/RW2, b2) and end (EW1/EB1/EW2, b2e), and the gradient
    accumulators GW1/GB1/GW2/GB2 (dL/dW_end on entry, dL/dW_start on exit). The [D] vectors live in memory
    too: the LN parameters (LNWP/LNBP, read where used) and their gradient accumulators GLNW/GLNB: a [D]
    vector costs a thread as many registers as a [b, D] tile row slice, and six of them carried through the
    scan made this kernel spill (aot_report.py). Writes dq to DQP; returns (dk, dv, deta)."""
    rows = tl.arange(0, MB)
    dc = tl.arange(0, D)
    cc = tl.arange(0, FC)
    tile = rows[:, None] * D + dc[None, :]
    o1 = dc[:, None] * FC + cc[None, :]  # W1 buffers are chunk-major: [F / FC, D, FC]
    o2 = _w2_offsets(cc, dc, D, W2T)
    # pass 1: inner forward at W (keys) and at W_end (queries)
    z2 = tl.zeros([MB, D], dtype=tl.float32) + b2[None, :]
    zq2 = tl.zeros([MB, D], dtype=tl.float32) + b2e[None, :]
    for ch in range(F // FC):
        k = tl.load(KP + tile)
        z2 += _mlp_chunk_fwd_nt(k, tl.load(RW1 + ch * FC * D + o1), tl.load(RB1 + ch * FC + cc),
                                tl.load(RW2 + ch * FC * D + o2), W2T, DT, IEEE)
        q = tl.load(QP + tile)
        zq2 += _mlp_chunk_fwd_nt(q, tl.load(EW1 + ch * FC * D + o1), tl.load(EB1 + ch * FC + cc),
                                 tl.load(EW2 + ch * FC * D + o2), W2T, DT, IEEE)
    xq, rq = _ln_norm(zq2, D, eps)
    do = tl.load(DOP + tile).to(tl.float32)
    dgamma = tl.sum(do * xq, axis=0)
    dbeta = tl.sum(do, axis=0)
    dzq2 = _ln_bwd(do * tl.load(LNWP + dc)[None, :], xq, rq, D)
    db2 = tl.load(GB2 + dc) + tl.sum(dzq2, axis=0)
    dzq2 = dzq2.to(DT)
    # pass 2a: output path; completes dL/dW_end in GW1/GB1/GW2
    dq = tl.load(DOP + tile).to(tl.float32)
    for ch in range(F // FC):
        q = tl.load(QP + tile)
        w1e = tl.load(EW1 + ch * FC * D + o1)
        w2e = tl.load(EW2 + ch * FC * D + o2)
        zq1c = _mm(q, w1e, DT, IEEE) + tl.load(EB1 + ch * FC + cc)[None, :]
        aqc, gq1c = _gelu_and_grad(zq1c, IEEE)
        dw2e = tl.load(GW2 + ch * FC * D + o2) + _outer_w2(aqc.to(DT), dzq2, W2T, DT, IEEE)
        dzq1c = _x_w2t(dzq2, w2e, W2T, DT, IEEE) * gq1c
        dw1e = tl.load(GW1 + ch * FC * D + o1) + _mm(tl.trans(q), dzq1c.to(DT), DT, IEEE)
        db1e = tl.load(GB1 + ch * FC + cc) + tl.sum(dzq1c, axis=0)
        dq += _mm(dzq1c.to(DT), tl.trans(w1e), DT, IEEE)
        tl.debug_barrier()
        tl.store(GW2 + ch * FC * D + o2, dw2e)
        tl.store(GW1 + ch * FC * D + o1, dw1e)
        tl.store(GB1 + ch * FC + cc, db1e)
    tl.store(DQP + tile, dq.to(DQP.dtype.element_ty))
    tl.debug_barrier()
    # pass 2b: the parts of the update path that are sums over F
    k = tl.load(KP + tile)
    xh, rstd, g, gx, gz2 = _ln_target_grad(z2, tl.load(VP + tile).to(tl.float32), k.to(tl.float32),
                                           tl.load(LNWP + dc)[None, :], tl.load(LNBP + dc)[None, :], D, eps)
    gz2_op = gz2.to(DT)
    dp2_acc = tl.zeros([MB, D], dtype=tl.float32)
    gz2_acc = tl.zeros([MB, D], dtype=tl.float32)
    de = tl.zeros([MB], dtype=tl.float32)
    for ch in range(F // FC):
        k = tl.load(KP + tile)
        w2c = tl.load(RW2 + ch * FC * D + o2)
        z1c = _mm(k, tl.load(RW1 + ch * FC * D + o1), DT, IEEE) + tl.load(RB1 + ch * FC + cc)[None, :]
        ac, gpc = _gelu_and_grad(z1c, IEEE)
        gAc = _x_w2t(gz2_op, w2c, W2T, DT, IEEE)
        dp2_acc += _x_w2(ac.to(DT), tl.load(GW2 + ch * FC * D + o2), W2T, DT, IEEE)
        dp1c = -(_mm(k, tl.load(GW1 + ch * FC * D + o1), DT, IEEE) + tl.load(GB1 + ch * FC + cc)[None, :])
        de += tl.sum(dp1c * gAc * gpc, axis=1)
        dgAc = e[:, None] * dp1c * gpc
        gz2_acc += _x_w2(dgAc.to(DT), w2c, W2T, DT, IEEE)
    dp2 = -(dp2_acc + db2[None, :])
    de += tl.sum(dp2 * gz2, axis=1)
    dz2, dg, dgm, dbt = _ln_double_bwd(e[:, None] * dp2 + gz2_acc, gx, g, xh, rstd, gz2,
                                       tl.load(LNWP + dc)[None, :], D)
    dgamma = tl.load(GLNW + dc) + dgamma + dgm
    dbeta = tl.load(GLNB + dc) + dbeta + dbt
    # every thread has read the rows before any overwrites them (a [D] vector is replicated across threads);
    # GB2 was read before pass 2a's barriers
    tl.debug_barrier()
    tl.store(GLNW + dc, dgamma)
    tl.store(GLNB + dc, dbeta)
    tl.store(GB2 + dc, db2 + tl.sum(dz2, axis=0))
    dk = dg
    dv = -dg
    dz2 = dz2.to(DT)
    p2 = (e[:, None] * gz2).to(DT)
    tl.debug_barrier()
    # pass 3: through the update and the inner forward at W; accumulators become dL/dW_start
    for ch in range(F // FC):
        k = tl.load(KP + tile)
        w1c = tl.load(RW1 + ch * FC * D + o1)
        w2c = tl.load(RW2 + ch * FC * D + o2)
        dw1e = tl.load(GW1 + ch * FC * D + o1)
        db1e = tl.load(GB1 + ch * FC + cc)
        dw2e = tl.load(GW2 + ch * FC * D + o2)
        z1c = _mm(k, w1c, DT, IEEE) + tl.load(RB1 + ch * FC + cc)[None, :]
        ac, gpc, gpc2 = _gelu_parts(z1c, IEEE)
        gAc = _x_w2t(gz2_op, w2c, W2T, DT, IEEE)
        p1c = e[:, None] * gAc * gpc
        dAc = _x_w2t(dz2, w2c, W2T, DT, IEEE) - _x_w2t(p2, dw2e, W2T, DT, IEEE)
        dgz1c = -e[:, None] * (_mm(k, dw1e, DT, IEEE) + db1e[None, :])
        dgAc = dgz1c * gpc
        dz1c = dgz1c * gAc * gpc2 + dAc * gpc
        dz1c_op = dz1c.to(DT)
        dk += _mm(dz1c_op, tl.trans(w1c), DT, IEEE) - _mm(p1c.to(DT), tl.trans(dw1e), DT, IEEE)
        dw2s = dw2e + _outer_w2(dgAc.to(DT), gz2_op, W2T, DT, IEEE) + _outer_w2(ac.to(DT), dz2, W2T, DT, IEEE)
        dw1s = dw1e + _mm(tl.trans(k), dz1c_op, DT, IEEE)
        db1s = db1e + tl.sum(dz1c, axis=0)
        tl.debug_barrier()
        tl.store(GW2 + ch * FC * D + o2, dw2s)
        tl.store(GW1 + ch * FC * D + o1, dw1s)
        tl.store(GB1 + ch * FC + cc, db1s)
    tl.debug_barrier()
    return dk, dv, de


@triton.jit
def _mlp_chunk_fwd_nt(x, w1c, b1c, w2c, W2T: tl.constexpr, DT: tl.constexpr, IEEE: tl.constexpr):
    """gelu(x W1c + b1c) W2c for W1c [D, FC] (not transposed)."""
    return _x_w2(_gelu(_mm(x, w1c, DT, IEEE) + b1c[None, :], IEEE), w2c, W2T, DT, IEEE)


@triton.jit
def _ttt_mlp_bwd_gmem_kernel(
    Q, K, V, ETA, LNW, LNB, DOUT,
    CK_W1, CK_B1, CK_W2, CK_B2,
    SC_W1, SC_B1, SC_W2, SC_B2,
    GW1, GB1, GW2, DB2_END,
    DQ, DK, DV, DETA,
    DB2, DLNW, DLNB,
    N, H, n_mb, n_ck, G, eps,
    D: tl.constexpr, F: tl.constexpr, FC: tl.constexpr, MB: tl.constexpr, W2T: tl.constexpr, IEEE: tl.constexpr,
):
    """Backward of the TTT-MLP scan. Per checkpoint group (in reverse): phase A recomputes the states at
    the start of each of its mini-batches plus the end state into G + 1 scratch slots (state in global
    memory, _mlp_gmem_step); phase B back-propagates the mini-batches in reverse (_mlp_gmem_bwd_step).
    GW1/GB1/GW2 hold dL/d(final W1, b1, W2) on entry and dL/d(initial W1, b1, W2) on exit."""
    pid = tl.program_id(0)
    pid64 = pid.to(tl.int64)
    h = pid % H
    DT = Q.dtype.element_ty
    rows = tl.arange(0, MB)
    dc = tl.arange(0, D)
    gw1 = GW1 + pid64 * D * F
    gb1 = GB1 + pid64 * F
    gw2 = GW2 + pid64 * F * D
    # dL/db2 and this program's share of dL/d(LN weight, bias) accumulate in their output rows
    gb2 = DB2 + pid64 * D
    glnw = DLNW + pid64 * D
    glnb = DLNB + pid64 * D
    tl.store(gb2 + dc, tl.load(DB2_END + pid64 * D + dc).to(tl.float32))
    tl.store(glnw + dc, tl.zeros([D], dtype=tl.float32))
    tl.store(glnb + dc, tl.zeros([D], dtype=tl.float32))
    tok = pid64 * N * D
    eta_base = pid64 * N
    tile = rows[:, None] * D + dc[None, :]
    s0 = pid64 * (G + 1)
    for cc_ in range(n_ck):
        c = n_ck - 1 - cc_
        i0 = c * G
        cnt = tl.minimum(G, n_mb - i0)
        ck = pid64 * n_ck + c
        # phase A: slot j = state at the start of mini-batch i0 + j, slot cnt = state after the group
        _copy_mlp_state(CK_W1 + ck * D * F, CK_B1 + ck * F, CK_W2 + ck * F * D,
                        SC_W1 + s0 * D * F, SC_B1 + s0 * F, SC_W2 + s0 * F * D, D, F)
        tl.store(SC_B2 + s0 * D + dc, tl.load(CK_B2 + ck * D + dc))
        tl.debug_barrier()
        for j in range(cnt):
            base = tok + (i0 + j) * MB * D
            e = tl.load(ETA + eta_base + (i0 + j) * MB + rows).to(tl.float32)
            r = s0 + j
            b2, unused = _mlp_gmem_step(K + base, V + base, e, Q + base, SC_W1 + r * D * F, SC_B1 + r * F, SC_W2 + r * F * D,
                                        SC_W1 + (r + 1) * D * F, SC_B1 + (r + 1) * F, SC_W2 + (r + 1) * F * D,
                                        tl.load(SC_B2 + r * D + dc),
                                        tl.load(LNW + h * D + dc)[None, :], tl.load(LNB + h * D + dc)[None, :],
                                        eps, D, F, FC, MB, False, W2T, DT, IEEE)
            tl.store(SC_B2 + (r + 1) * D + dc, b2)
            tl.debug_barrier()  # the next mini-batch reads it
        tl.debug_barrier()
        # phase B
        for jj in range(cnt):
            j = cnt - 1 - jj
            i = i0 + j
            r = s0 + j
            base = tok + i * MB * D
            e = tl.load(ETA + eta_base + i * MB + rows).to(tl.float32)
            dk, dv, de = _mlp_gmem_bwd_step(
                Q + base, K + base, DQ + base, V + base, e, DOUT + base,
                SC_W1 + r * D * F, SC_B1 + r * F, SC_W2 + r * F * D, tl.load(SC_B2 + r * D + dc),
                SC_W1 + (r + 1) * D * F, SC_B1 + (r + 1) * F, SC_W2 + (r + 1) * F * D, tl.load(SC_B2 + (r + 1) * D + dc),
                gw1, gb1, gw2, gb2, LNW + h * D, LNB + h * D, glnw, glnb, eps, D, F, FC, MB, W2T, DT, IEEE)
            tl.store(DK + base + tile, dk.to(DK.dtype.element_ty))
            tl.store(DV + base + tile, dv.to(DV.dtype.element_ty))
            tl.store(DETA + eta_base + i * MB + rows, de)
        tl.debug_barrier()


@triton.jit
def _ttt_mlp_bwd_split_kernel(
    Q, K, V, ETA, LNW, LNB, DOUT,
    CK_W1, CK_B1, CK_W2, CK_B2,
    SC_W1, SC_B1, SC_W2, SC_B2,
    GW1, GB1, GW2, DB2_END,
    DQ, DK, DV, DETA,
    DB2, DLNW, DLNB,
    XCH, XDE, DKX, CNT, ERR,
    BH, N, H, n_mb, n_ck, G, eps, max_spin,
    D: tl.constexpr, FS: tl.constexpr, NSPLIT: tl.constexpr, MB: tl.constexpr, IEEE: tl.constexpr,
):
    """Backward of the TTT-MLP scan with each head's hidden units split over NSPLIT programs, as in the split
    forward (its checkpoints: W1 chunk-major with FS). The gmem backward's F-chunk passes become one slice per
    program; its sums over F meet: per mini-batch once in the recompute (Z2, phase A), twice in the backward
    (Z2 and f(q; W_end) to start; dq, dp2, dL/dgz2 and deta partials before the LN double backward), and dk's
    partials wait for the next meeting. Row-wise work (LN forward / backward / double backward, b2 and the LN
    parameters' gradients) runs in every program alike; program 0 writes what is per head (dv, deta, db2, the
    LN parameters' gradients), each program its share of the rows of dq and dk.
    GW1 (chunk-major [BH, NSPLIT, D, FS]) / GB1 / GW2 hold dL/d(final W1, b1, W2) on entry, dL/d(initial) on exit.
    Scratch per program: SC_* [G + 1] states of its slices; XCH [2, 3, MB, D] and XDE [2, MB] exchange slots
    (by meeting parity); DKX [MB, D] its dk partial."""
    F: tl.constexpr = FS * NSPLIT
    RP: tl.constexpr = MB // NSPLIT
    SLOT: tl.constexpr = MB * D
    pid = tl.program_id(0)
    grp, part, n_groups, rows, dc, fc, tile, my_rows, rtile, o1, o2 = _split_program(pid, D, FS, NSPLIT, MB)
    DT = Q.dtype.element_ty
    cnt_ptr = CNT + grp * 32
    xch_grp = XCH + (grp * NSPLIT).to(tl.int64) * 6 * SLOT  # [NSPLIT, 2, 3, MB, D]
    xch_mine = xch_grp + part * 6 * SLOT
    xde_grp = XDE + (grp * NSPLIT).to(tl.int64) * 2 * MB  # [NSPLIT, 2, MB]
    xde_mine = xde_grp + part * 2 * MB
    dkx_grp = DKX + (grp * NSPLIT).to(tl.int64) * SLOT  # [NSPLIT, MB, D]
    dkx_mine = dkx_grp + part * SLOT
    pid64 = pid.to(tl.int64)
    s0 = pid64 * (G + 1)  # this program's scratch slots
    arrivals = 0
    for t in range(0, tl.cdiv(BH - grp, n_groups)):
        bh64 = grp.to(tl.int64) + t * n_groups
        h = bh64 % H
        plnw = LNW + h * D
        plnb = LNB + h * D
        gw1 = GW1 + bh64 * D * F + part * D * FS
        gb1 = GB1 + bh64 * F + part * FS
        gw2 = GW2 + bh64 * F * D + part * FS * D
        db2 = tl.load(DB2_END + bh64 * D + dc).to(tl.float32)
        if part == 0:
            tl.store(DLNW + bh64 * D + dc, tl.zeros([D], dtype=tl.float32))
            tl.store(DLNB + bh64 * D + dc, tl.zeros([D], dtype=tl.float32))
        tok = bh64 * N * D
        eta_base = bh64 * N
        for cc_ in range(n_ck):
            c = n_ck - 1 - cc_
            i0 = c * G
            cnt = tl.minimum(G, n_mb - i0)
            ck = bh64 * n_ck + c
            # phase A: scratch slot j = the slices at the start of mini-batch i0 + j, slot cnt = after the group
            tl.store(SC_W1 + s0 * D * FS + o1, tl.load(CK_W1 + ck * D * F + part * D * FS + o1))
            tl.store(SC_B1 + s0 * FS + fc, tl.load(CK_B1 + ck * F + part * FS + fc))
            tl.store(SC_W2 + s0 * FS * D + o2, tl.load(CK_W2 + ck * F * D + part * FS * D + o2))
            tl.store(SC_B2 + s0 * D + dc, tl.load(CK_B2 + ck * D + dc))
            tl.debug_barrier()
            for j in range(cnt):
                base = tok + (i0 + j) * MB * D
                r = s0 + j
                k = tl.load(K + base + tile)
                z1 = _mm(k, tl.load(SC_W1 + r * D * FS + o1), DT, IEEE) + tl.load(SC_B1 + r * FS + fc)[None, :]
                a, da = _gelu_and_grad(z1, IEEE)
                a = a.to(DT)
                m = arrivals % 2
                tl.store(xch_mine + m * 3 * SLOT + tile, _mm(a, tl.load(SC_W2 + r * FS * D + o2), DT, IEEE))
                arrivals += 1
                _group_arrive(cnt_ptr)
                max_spin = _group_wait(cnt_ptr, ERR, arrivals * NSPLIT, max_spin)
                b2 = tl.load(SC_B2 + r * D + dc)
                z2 = tl.zeros([MB, D], dtype=tl.float32) + b2[None, :]
                for p in tl.static_range(NSPLIT):
                    z2 += tl.load(xch_grp + p * 6 * SLOT + m * 3 * SLOT + tile, cache_modifier=".cg")
                e = tl.load(ETA + eta_base + (i0 + j) * MB + rows).to(tl.float32)
                xh, rstd, g, gx, gz2 = _ln_target_grad(z2, tl.load(V + base + tile).to(tl.float32), k.to(tl.float32),
                                                       tl.load(plnw + dc)[None, :], tl.load(plnb + dc)[None, :], D, eps)
                p2 = e[:, None] * gz2
                tl.store(SC_B2 + (r + 1) * D + dc, b2 - tl.sum(p2, axis=0))
                w2 = tl.load(SC_W2 + r * FS * D + o2)
                p1 = e[:, None] * (_mm(gz2, tl.trans(w2), DT, IEEE) * da)
                tl.store(SC_W2 + (r + 1) * FS * D + o2, w2 - _mm(tl.trans(a), p2, DT, IEEE))
                tl.store(SC_B1 + (r + 1) * FS + fc, tl.load(SC_B1 + r * FS + fc) - tl.sum(p1, axis=0))
                tl.store(SC_W1 + (r + 1) * D * FS + o1, tl.load(SC_W1 + r * D * FS + o1) - _mm(tl.trans(k), p1, DT, IEEE))
                tl.debug_barrier()  # slot r + 1 complete before the next mini-batch reads it
            # phase B: the group's mini-batches in reverse
            for jj in range(cnt):
                j = cnt - 1 - jj
                i = i0 + j
                r = s0 + j
                base = tok + i * MB * D
                # pass 1: inner forward at W (keys) and at W_end (queries), partial over this slice
                k = tl.load(K + base + tile)
                q = tl.load(Q + base + tile)
                m = arrivals % 2
                tl.store(xch_mine + m * 3 * SLOT + tile,
                         _mlp_chunk_fwd_nt(k, tl.load(SC_W1 + r * D * FS + o1), tl.load(SC_B1 + r * FS + fc),
                                           tl.load(SC_W2 + r * FS * D + o2), False, DT, IEEE))
                tl.store(xch_mine + m * 3 * SLOT + SLOT + tile,
                         _mlp_chunk_fwd_nt(q, tl.load(SC_W1 + (r + 1) * D * FS + o1), tl.load(SC_B1 + (r + 1) * FS + fc),
                                           tl.load(SC_W2 + (r + 1) * FS * D + o2), False, DT, IEEE))
                arrivals += 1
                _group_arrive(cnt_ptr)
                max_spin = _group_wait(cnt_ptr, ERR, arrivals * NSPLIT, max_spin)
                if jj > 0:  # the dk partials of mini-batch i + 1 were all written before this meeting
                    dk_r = tl.load(dkx_grp + rtile, cache_modifier=".cg")
                    for p in tl.static_range(1, NSPLIT):
                        dk_r += tl.load(dkx_grp + p * SLOT + rtile, cache_modifier=".cg")
                    tl.store(DK + base + MB * D + rtile, dk_r.to(DK.dtype.element_ty))
                z2 = tl.zeros([MB, D], dtype=tl.float32) + tl.load(SC_B2 + r * D + dc)[None, :]
                zq2 = tl.zeros([MB, D], dtype=tl.float32) + tl.load(SC_B2 + (r + 1) * D + dc)[None, :]
                for p in tl.static_range(NSPLIT):
                    z2 += tl.load(xch_grp + p * 6 * SLOT + m * 3 * SLOT + tile, cache_modifier=".cg")
                    zq2 += tl.load(xch_grp + p * 6 * SLOT + m * 3 * SLOT + SLOT + tile, cache_modifier=".cg")
                xq, rq = _ln_norm(zq2, D, eps)
                do = tl.load(DOUT + base + tile).to(tl.float32)
                dgamma = tl.sum(do * xq, axis=0)
                dbeta = tl.sum(do, axis=0)
                dzq2 = _ln_bwd(do * tl.load(plnw + dc)[None, :], xq, rq, D)
                db2 = db2 + tl.sum(dzq2, axis=0)
                dzq2 = dzq2.to(DT)
                # pass 2a: the output path; completes dL/dW_end of this slice in GW1 / GB1 / GW2
                q = tl.load(Q + base + tile)  # reloaded: not held across the meeting
                w1e = tl.load(SC_W1 + (r + 1) * D * FS + o1).to(DT)  # dot operands only: held in the operand type
                w2e = tl.load(SC_W2 + (r + 1) * FS * D + o2).to(DT)
                zq1 = _mm(q, w1e, DT, IEEE) + tl.load(SC_B1 + (r + 1) * FS + fc)[None, :]
                aq, gq1 = _gelu_and_grad(zq1, IEEE)
                dw2e = tl.load(gw2 + o2) + _mm(tl.trans(aq.to(DT)), dzq2, DT, IEEE)
                dzq1 = _mm(dzq2, tl.trans(w2e), DT, IEEE) * gq1
                dw1e = tl.load(gw1 + o1) + _mm(tl.trans(q), dzq1.to(DT), DT, IEEE)
                db1e = tl.load(gb1 + fc) + tl.sum(dzq1, axis=0)
                m = arrivals % 2
                tl.store(xch_mine + m * 3 * SLOT + tile, _mm(dzq1.to(DT), tl.trans(w1e), DT, IEEE))  # dq partial
                tl.debug_barrier()
                tl.store(gw2 + o2, dw2e)
                tl.store(gw1 + o1, dw1e)
                tl.store(gb1 + fc, db1e)
                tl.debug_barrier()
                # pass 2b: the sums over F of the update path, partial over this slice. Only z2 stays live across
                # the meeting below (the LN pieces are recomputed after it, k, w2 and gz2's operand copy reloaded
                # or recast where used): tiles held across a meeting were what this kernel spilled (session 11's
                # Nsight Compute: 356 M local-memory requests, 99 % of its memory traffic)
                e = tl.load(ETA + eta_base + i * MB + rows).to(tl.float32)
                k = tl.load(K + base + tile)
                gz2 = _ln_target_grad(z2, tl.load(V + base + tile).to(tl.float32), k.to(tl.float32),
                                      tl.load(plnw + dc)[None, :], tl.load(plnb + dc)[None, :], D, eps)[4]
                w2 = tl.load(SC_W2 + r * FS * D + o2).to(DT)
                z1 = _mm(k, tl.load(SC_W1 + r * D * FS + o1), DT, IEEE) + tl.load(SC_B1 + r * FS + fc)[None, :]
                a, gp = _gelu_and_grad(z1, IEEE)
                gA = _mm(gz2.to(DT), tl.trans(w2), DT, IEEE)
                tl.store(xch_mine + m * 3 * SLOT + SLOT + tile, _mm(a.to(DT), tl.load(gw2 + o2), DT, IEEE))  # dp2
                dp1 = -(_mm(k, tl.load(gw1 + o1), DT, IEEE) + tl.load(gb1 + fc)[None, :])
                tl.store(xde_mine + m * MB + rows, tl.sum(dp1 * gA * gp, axis=1))
                tl.store(xch_mine + m * 3 * SLOT + 2 * SLOT + tile,
                         _mm((e[:, None] * dp1 * gp).to(DT), w2, DT, IEEE))  # dL/dgz2 through gz1
                arrivals += 1
                _group_arrive(cnt_ptr)
                max_spin = _group_wait(cnt_ptr, ERR, arrivals * NSPLIT, max_spin)
                dq_r = tl.load(DOUT + base + rtile).to(tl.float32)
                for p in tl.static_range(NSPLIT):
                    dq_r += tl.load(xch_grp + p * 6 * SLOT + m * 3 * SLOT + rtile, cache_modifier=".cg")
                tl.store(DQ + base + rtile, dq_r.to(DQ.dtype.element_ty))
                k = tl.load(K + base + tile)
                xh, rstd, g, gx, gz2 = _ln_target_grad(z2, tl.load(V + base + tile).to(tl.float32), k.to(tl.float32),
                                                       tl.load(plnw + dc)[None, :], tl.load(plnb + dc)[None, :], D, eps)
                dp2 = tl.zeros([MB, D], dtype=tl.float32) - db2[None, :]
                gz2_acc = tl.zeros([MB, D], dtype=tl.float32)
                de = tl.zeros([MB], dtype=tl.float32)
                for p in tl.static_range(NSPLIT):
                    dp2 -= tl.load(xch_grp + p * 6 * SLOT + m * 3 * SLOT + SLOT + tile, cache_modifier=".cg")
                    gz2_acc += tl.load(xch_grp + p * 6 * SLOT + m * 3 * SLOT + 2 * SLOT + tile, cache_modifier=".cg")
                    de += tl.load(xde_grp + p * 2 * MB + m * MB + rows, cache_modifier=".cg")
                de += tl.sum(dp2 * gz2, axis=1)
                dz2, dg, dgm, dbt = _ln_double_bwd(e[:, None] * dp2 + gz2_acc, gx, g, xh, rstd, gz2,
                                                   tl.load(plnw + dc)[None, :], D)
                db2 = db2 + tl.sum(dz2, axis=0)
                if part == 0:  # per-head results: every program computed them alike
                    tl.store(DLNW + bh64 * D + dc, tl.load(DLNW + bh64 * D + dc) + dgamma + dgm)
                    tl.store(DLNB + bh64 * D + dc, tl.load(DLNB + bh64 * D + dc) + dbeta + dbt)
                    tl.store(DV + base + tile, (-dg).to(DV.dtype.element_ty))
                    tl.store(DETA + eta_base + i * MB + rows, de)
                dz2 = dz2.to(DT)
                p2 = (e[:, None] * gz2).to(DT)
                # pass 3: through the update and the inner forward at W; GW* become dL/dW_start of this slice.
                # Ordered so that few [MB, FS] tiles are live at once: W2's gradient is accumulated and stored
                # first (a, dgA and dL/dW2_end die there), W1's and dk's after it.
                gz2_op = gz2.to(DT)
                w1 = tl.load(SC_W1 + r * D * FS + o1).to(DT)  # W1, W2 and dL/dW1_end as dot operands only
                a, gp, gp2 = _gelu_parts(_mm(k, w1, DT, IEEE) + tl.load(SC_B1 + r * FS + fc)[None, :], IEEE)
                w2 = tl.load(SC_W2 + r * FS * D + o2).to(DT)
                dw2 = tl.load(gw2 + o2)
                dA = _mm(dz2, tl.trans(w2), DT, IEEE) - _mm(p2, tl.trans(dw2), DT, IEEE)
                dw2 += _mm(tl.trans(a.to(DT)), dz2, DT, IEEE)
                dw1e = tl.load(gw1 + o1).to(DT)
                db1e = tl.load(gb1 + fc)
                dgz1 = -e[:, None] * (_mm(k, dw1e, DT, IEEE) + db1e[None, :])
                dw2 += _mm(tl.trans((dgz1 * gp).to(DT)), gz2_op, DT, IEEE)
                tl.debug_barrier()  # every thread has read dL/dW2_end before it is overwritten
                tl.store(gw2 + o2, dw2)
                gA = _mm(gz2_op, tl.trans(w2), DT, IEEE)
                dz1 = dgz1 * gA * gp2 + dA * gp
                dz1_op = dz1.to(DT)
                dkp = _mm(dz1_op, tl.trans(w1), DT, IEEE) - _mm((e[:, None] * gA * gp).to(DT), tl.trans(dw1e), DT, IEEE)
                if part == 0:
                    dkp += dg
                dw1s = tl.load(gw1 + o1) + _mm(tl.trans(k), dz1_op, DT, IEEE)  # fp32 accumulation
                db1s = db1e + tl.sum(dz1, axis=0)
                tl.debug_barrier()
                tl.store(gw1 + o1, dw1s)
                tl.store(gb1 + fc, db1s)
                tl.store(dkx_mine + tile, dkp)
                tl.debug_barrier()
            # one more meeting: the dk partials of the group's first mini-batch
            arrivals += 1
            _group_arrive(cnt_ptr)
            max_spin = _group_wait(cnt_ptr, ERR, arrivals * NSPLIT, max_spin)
            dk_r = tl.load(dkx_grp + rtile, cache_modifier=".cg")
            for p in tl.static_range(1, NSPLIT):
                dk_r += tl.load(dkx_grp + p * SLOT + rtile, cache_modifier=".cg")
            tl.store(DK + tok + i0 * MB * D + rtile, dk_r.to(DK.dtype.element_ty))
        if part == 0:
            tl.store(DB2 + bh64 * D + dc, db2)


@triton.jit
def _ttt_mlp_bwd_kernel(
    Q, K, V, ETA, LNW, LNB, DOUT,
    CK_W1, CK_B1, CK_W2, CK_B2,
    SC_W1, SC_B1, SC_W2, SC_B2,
    DW1_END, DB1_END, DW2_END, DB2_END,
    DQ, DK, DV, DETA,
    DW1, DB1, DW2, DB2, DLNW, DLNB,
    N, H, n_mb, n_ck, G, eps,
    D: tl.constexpr, F: tl.constexpr, MB: tl.constexpr, IEEE: tl.constexpr,
):
    pid = tl.program_id(0)
    pid64 = pid.to(tl.int64)
    h = pid % H
    DT = Q.dtype.element_ty
    rows = tl.arange(0, MB)
    dc = tl.arange(0, D)
    fc = tl.arange(0, F)
    w1_offs = dc[:, None] * F + fc[None, :]
    w2_offs = fc[:, None] * D + dc[None, :]
    gamma = tl.load(LNW + h * D + dc[None, :]).to(tl.float32)
    beta = tl.load(LNB + h * D + dc[None, :]).to(tl.float32)
    # dL/d(state at the end of the current mini-batch), carried backwards through the sequence
    dw1 = tl.load(DW1_END + pid64 * D * F + w1_offs).to(tl.float32)
    db1 = tl.load(DB1_END + pid64 * F + fc[None, :]).to(tl.float32)
    dw2 = tl.load(DW2_END + pid64 * F * D + w2_offs).to(tl.float32)
    db2 = tl.load(DB2_END + pid64 * D + dc[None, :]).to(tl.float32)
    dgamma = tl.zeros([D], dtype=tl.float32)
    dbeta = tl.zeros([D], dtype=tl.float32)
    tok = pid64 * N * D
    eta_base = pid64 * N
    tile = rows[:, None] * D + dc[None, :]
    sc_base = pid64 * G
    for cc in range(n_ck):
        c = n_ck - 1 - cc
        i0 = c * G
        cnt = tl.minimum(G, n_mb - i0)
        # phase A: states at the start of each mini-batch of this group -> scratch
        ck = pid64 * n_ck + c
        w1 = tl.load(CK_W1 + ck * D * F + w1_offs)
        b1 = tl.load(CK_B1 + ck * F + fc[None, :])
        w2 = tl.load(CK_W2 + ck * F * D + w2_offs)
        b2 = tl.load(CK_B2 + ck * D + dc[None, :])
        tl.store(SC_W1 + sc_base * D * F + w1_offs, w1)
        tl.store(SC_B1 + sc_base * F + fc[None, :], b1)
        tl.store(SC_W2 + sc_base * F * D + w2_offs, w2)
        tl.store(SC_B2 + sc_base * D + dc[None, :], b2)
        for j in range(cnt - 1):
            offs = tok + (i0 + j) * MB * D + tile
            k = tl.load(K + offs)
            v = tl.load(V + offs).to(tl.float32)
            e = tl.load(ETA + eta_base + (i0 + j) * MB + rows).to(tl.float32)
            w1, b1, w2, b2 = _mlp_update(k, v, e, w1, b1, w2, b2, gamma, beta, eps, D, DT, IEEE)
            s = sc_base + j + 1
            tl.store(SC_W1 + s * D * F + w1_offs, w1)
            tl.store(SC_B1 + s * F + fc[None, :], b1)
            tl.store(SC_W2 + s * F * D + w2_offs, w2)
            tl.store(SC_B2 + s * D + dc[None, :], b2)
        tl.debug_barrier()
        # phase B: back-propagate through the group's mini-batches in reverse
        for jj in range(cnt):
            j = cnt - 1 - jj
            i = i0 + j
            s = sc_base + j
            w1 = tl.load(SC_W1 + s * D * F + w1_offs)
            b1 = tl.load(SC_B1 + s * F + fc[None, :])
            w2 = tl.load(SC_W2 + s * F * D + w2_offs)
            b2 = tl.load(SC_B2 + s * D + dc[None, :])
            offs = tok + i * MB * D + tile
            q = tl.load(Q + offs)
            k = tl.load(K + offs)
            v = tl.load(V + offs).to(tl.float32)
            e = tl.load(ETA + eta_base + i * MB + rows).to(tl.float32)
            do = tl.load(DOUT + offs).to(tl.float32)
            # recompute the mini-batch
            z1 = _mm(k, w1, DT, IEEE) + b1
            a, ga1, ga2 = _gelu_parts(z1, IEEE)
            z2 = _mm(a, w2, DT, IEEE) + b2
            xh, rstd, g, gx, gz2 = _ln_target_grad(z2, v, k, gamma, beta, D, eps)
            gA = _mm(gz2, tl.trans(w2), DT, IEEE)
            gz1 = gA * ga1
            p2 = e[:, None] * gz2
            p1 = e[:, None] * gz1
            w2e = w2 - _mm(tl.trans(a), p2, DT, IEEE)
            b2e = b2 - tl.sum(p2, axis=0)[None, :]
            w1e = w1 - _mm(tl.trans(k), p1, DT, IEEE)
            b1e = b1 - tl.sum(p1, axis=0)[None, :]
            zq1 = _mm(q, w1e, DT, IEEE) + b1e
            aq, gq1 = _gelu_and_grad(zq1, IEEE)
            zq2 = _mm(aq, w2e, DT, IEEE) + b2e
            xq, rq = _ln_norm(zq2, D, eps)
            # output path: out = q + gamma xq + beta
            dgamma += tl.sum(do * xq, axis=0)
            dbeta += tl.sum(do, axis=0)
            dzq2 = _ln_bwd(do * gamma, xq, rq, D)
            dw2 += _mm(tl.trans(aq), dzq2, DT, IEEE)
            db2 += tl.sum(dzq2, axis=0)[None, :]
            dzq1 = _mm(dzq2, tl.trans(w2e), DT, IEEE) * gq1
            dw1 += _mm(tl.trans(q), dzq1, DT, IEEE)
            db1 += tl.sum(dzq1, axis=0)[None, :]
            dq = do + _mm(dzq1, tl.trans(w1e), DT, IEEE)
            # update path: W2e = W2 - a^T p2, b2e = b2 - sum p2, W1e = W1 - k^T p1, b1e = b1 - sum p1
            dp2 = -(_mm(a, dw2, DT, IEEE) + db2)
            dA = -_mm(p2, tl.trans(dw2), DT, IEEE)
            dp1 = -(_mm(k, dw1, DT, IEEE) + db1)
            dk = -_mm(p1, tl.trans(dw1), DT, IEEE)
            de = tl.sum(dp1 * gz1, axis=1) + tl.sum(dp2 * gz2, axis=1)
            dgz1 = e[:, None] * dp1
            dgA = dgz1 * ga1
            dz1 = dgz1 * gA * ga2
            Gz2 = e[:, None] * dp2 + _mm(dgA, w2, DT, IEEE)
            dw2 += _mm(tl.trans(dgA), gz2, DT, IEEE)
            dz2, dg, dgm, dbt = _ln_double_bwd(Gz2, gx, g, xh, rstd, gz2, gamma, D)
            dgamma += dgm
            dbeta += dbt
            dk += dg
            dv = -dg
            dA += _mm(dz2, tl.trans(w2), DT, IEEE)
            dw2 += _mm(tl.trans(a), dz2, DT, IEEE)
            db2 += tl.sum(dz2, axis=0)[None, :]
            dz1 += dA * ga1
            dk += _mm(dz1, tl.trans(w1), DT, IEEE)
            dw1 += _mm(tl.trans(k), dz1, DT, IEEE)
            db1 += tl.sum(dz1, axis=0)[None, :]
            tl.store(DQ + offs, dq.to(DQ.dtype.element_ty))
            tl.store(DK + offs, dk.to(DK.dtype.element_ty))
            tl.store(DV + offs, dv.to(DV.dtype.element_ty))
            tl.store(DETA + eta_base + i * MB + rows, de)
        tl.debug_barrier()
    tl.store(DW1 + pid64 * D * F + w1_offs, dw1)
    tl.store(DB1 + pid64 * F + fc[None, :], db1)
    tl.store(DW2 + pid64 * F * D + w2_offs, dw2)
    tl.store(DB2 + pid64 * D + dc[None, :], db2)
    tl.store(DLNW + pid64 * D + dc, dgamma)
    tl.store(DLNB + pid64 * D + dc, dbeta)


# ------------------------------------------------------------------------------------------------
# TTT-Linear kernels
# ------------------------------------------------------------------------------------------------
@triton.jit
def _linear_fwd_start(W1, B1, LNW, LNB, pid, H, D: tl.constexpr):
    """A TTT-Linear forward program's start: feature indices, W's offsets, its initial state (fp32) and the LN
    parameters of its head."""
    h = pid % H
    pid64 = pid.to(tl.int64)
    dc = tl.arange(0, D)
    w_offs = dc[:, None] * D + dc[None, :]
    w = tl.load(W1 + pid64 * D * D + w_offs).to(tl.float32)
    b = tl.load(B1 + pid64 * D + dc[None, :]).to(tl.float32)
    gamma = tl.load(LNW + h * D + dc[None, :]).to(tl.float32)
    beta = tl.load(LNB + h * D + dc[None, :]).to(tl.float32)
    return dc, w_offs, w, b, gamma, beta


@triton.jit
def _store_linear_state(PW, PB, slot, w, b, w_offs, dc, D: tl.constexpr):
    """W and b into slot `slot` of [slots, D, D] / [slots, D] buffers (checkpoints, final states)."""
    tl.store(PW + slot * D * D + w_offs, w)
    tl.store(PB + slot * D + dc[None, :], b)


@triton.jit
def _ttt_linear_fwd_kernel(
    Q, K, V, ETA, LNW, LNB,
    W1, B1,
    OUT, W1_OUT, B1_OUT,
    CK_W1, CK_B1,
    N, H, n_mb, n_ck, G, eps,
    D: tl.constexpr, MB: tl.constexpr, SAVE: tl.constexpr, IEEE: tl.constexpr,
):
    pid = tl.program_id(0)
    pid64 = pid.to(tl.int64)
    DT = Q.dtype.element_ty
    rows = tl.arange(0, MB)
    dc, w_offs, w, b, gamma, beta = _linear_fwd_start(W1, B1, LNW, LNB, pid, H, D)
    tok = pid64 * N * D
    eta_base = pid64 * N
    tile = rows[:, None] * D + dc[None, :]
    for c in range(n_ck):
        if SAVE:
            _store_linear_state(CK_W1, CK_B1, pid64 * n_ck + c, w, b, w_offs, dc, D)
        i_end = tl.minimum(c * G + G, n_mb)
        for i in range(c * G, i_end):
            offs = tok + i * MB * D + tile
            q = tl.load(Q + offs)
            k = tl.load(K + offs)
            v = tl.load(V + offs).to(tl.float32)
            e = tl.load(ETA + eta_base + i * MB + rows).to(tl.float32)
            w, b = _linear_update(k, v, e, w, b, gamma, beta, eps, D, DT, IEEE)
            xq, rq = _ln_norm(_mm(q, w, DT, IEEE) + b, D, eps)
            out = q.to(tl.float32) + gamma * xq + beta
            tl.store(OUT + offs, out.to(OUT.dtype.element_ty))
    _store_linear_state(W1_OUT, B1_OUT, pid64, w, b, w_offs, dc, D)


@triton.jit
def _ttt_linear_fwd_pipe_kernel(
    Q, K, V, ETA, LNW, LNB,
    W1, B1,
    OUT, W1_OUT, B1_OUT,
    CK_W1, CK_B1,
    N, H, n_mb, n_ck, G, eps,
    D: tl.constexpr, MB: tl.constexpr, SAVE: tl.constexpr, IEEE: tl.constexpr, FUSED_SUMS: tl.constexpr,
):
    """_ttt_linear_fwd_kernel with one dot fewer on each mini-batch's chain. The inner forward of mini-batch i
    (k_i W) and the output of mini-batch i - 1 (q_{i-1} W, W after its update) read the same W, so they are one
    [2 MB, D] x [D, D] dot: the top MB rows are k_i (the update), the bottom MB rows q_{i-1} (the output). The
    LayerNorm runs on all rows; the update takes the top rows only (eta is zero on the bottom ones, so they add
    nothing to W's and b's gradient sums), and the bottom rows are stored as mini-batch i - 1's output. At small
    mini-batches (16) the forward is a chain of dependent small dots, so one link fewer per mini-batch is the
    lever; the last mini-batch's output is computed after the loop."""
    R: tl.constexpr = 2 * MB
    pid = tl.program_id(0)
    pid64 = pid.to(tl.int64)
    DT = Q.dtype.element_ty
    rows2 = tl.arange(0, R)
    top = rows2 < MB  # rows of the mini-batch being learned; the others are the previous one's queries
    r_in = tl.where(top, rows2, rows2 - MB)
    dc, w_offs, w, b, gamma, beta = _linear_fwd_start(W1, B1, LNW, LNB, pid, H, D)
    if FUSED_SUMS:
        # The one-pass variance cancels where a row of z = x W + b has a large mean against its spread (a bias
        # of mean 30 cost 1.6e-3 in fp32). That mean is x (W 1) / D + mean(b) all along the scan: dl/dz has
        # zero-mean rows (LayerNorm is shift-invariant), so no update moves W's row means or b's mean. W and b
        # are carried with those means taken out (every z row shifts by a constant: each LayerNorm, hence every
        # output, is unchanged, and z is centred); they go back in at every store.
        w_mean = tl.sum(w, axis=1) / D
        b_mean = tl.sum(b, axis=1) / D
    else:
        w_mean = tl.zeros([D], dtype=tl.float32)
        b_mean = tl.zeros([1], dtype=tl.float32)
    w = w - w_mean[:, None]
    b = b - b_mean[:, None]
    tok = pid64 * N * D
    eta_base = pid64 * N
    tile2 = r_in[:, None] * D + dc[None, :]
    for c in range(n_ck):
        if SAVE:
            _store_linear_state(CK_W1, CK_B1, pid64 * n_ck + c, w + w_mean[:, None], b + b_mean[:, None], w_offs, dc, D)
        i_end = tl.minimum(c * G + G, n_mb)
        for i in range(c * G, i_end):
            mb_of_row = tl.where(top, i, i - 1).to(tl.int64)
            offs = tok + mb_of_row[:, None] * (MB * D) + tile2
            has_out = (~top) & (i > 0)  # no previous mini-batch before the first
            x = tl.load(tl.where(top[:, None], K + offs, Q + offs), mask=(top | (i > 0))[:, None], other=0.0)
            v = tl.load(V + offs, mask=top[:, None], other=0.0).to(tl.float32)
            e = tl.load(ETA + eta_base + i * MB + r_in, mask=top, other=0.0).to(tl.float32)
            xf = x.to(tl.float32)
            if FUSED_SUMS:
                xh, rstd, g, gx, gz = _ln_target_grad_2r(_mm(x, w, DT, IEEE) + b, v, xf, gamma, beta, D, eps)
            else:
                xh, rstd, g, gx, gz = _ln_target_grad(_mm(x, w, DT, IEEE) + b, v, xf, gamma, beta, D, eps)
            tl.store(OUT + offs, (xf + gamma * xh + beta).to(OUT.dtype.element_ty), mask=has_out[:, None])
            p = e[:, None] * gz  # zero on the output rows
            w = w - _mm(tl.trans(x), p, DT, IEEE)
            b = b - tl.sum(p, axis=0)[None, :]
    # the last mini-batch's output, at the final W
    rows = tl.arange(0, MB)
    offs = tok + (n_mb - 1) * MB * D + rows[:, None] * D + dc[None, :]
    q = tl.load(Q + offs)
    xq, rq = _ln_norm(_mm(q, w, DT, IEEE) + b, D, eps)
    tl.store(OUT + offs, (q.to(tl.float32) + gamma * xq + beta).to(OUT.dtype.element_ty))
    _store_linear_state(W1_OUT, B1_OUT, pid64, w + w_mean[:, None], b + b_mean[:, None], w_offs, dc, D)


@triton.jit
def _ttt_linear_bwd_kernel(
    Q, K, V, ETA, LNW, LNB, DOUT,
    CK_W1, CK_B1,
    SC_W1, SC_B1,
    DW1_END, DB1_END,
    DQ, DK, DV, DETA,
    DW1, DB1, DLNW, DLNB,
    N, H, n_mb, n_ck, G, eps,
    D: tl.constexpr, MB: tl.constexpr, IEEE: tl.constexpr,
):
    pid = tl.program_id(0)
    pid64 = pid.to(tl.int64)
    h = pid % H
    DT = Q.dtype.element_ty
    rows = tl.arange(0, MB)
    dc = tl.arange(0, D)
    w_offs = dc[:, None] * D + dc[None, :]
    gamma = tl.load(LNW + h * D + dc[None, :]).to(tl.float32)
    beta = tl.load(LNB + h * D + dc[None, :]).to(tl.float32)
    dw = tl.load(DW1_END + pid64 * D * D + w_offs).to(tl.float32)
    db = tl.load(DB1_END + pid64 * D + dc[None, :]).to(tl.float32)
    dgamma = tl.zeros([D], dtype=tl.float32)
    dbeta = tl.zeros([D], dtype=tl.float32)
    tok = pid64 * N * D
    eta_base = pid64 * N
    tile = rows[:, None] * D + dc[None, :]
    sc_base = pid64 * G
    for cc in range(n_ck):
        c = n_ck - 1 - cc
        i0 = c * G
        cnt = tl.minimum(G, n_mb - i0)
        ck = pid64 * n_ck + c
        w = tl.load(CK_W1 + ck * D * D + w_offs)
        b = tl.load(CK_B1 + ck * D + dc[None, :])
        tl.store(SC_W1 + sc_base * D * D + w_offs, w)
        tl.store(SC_B1 + sc_base * D + dc[None, :], b)
        for j in range(cnt - 1):
            offs = tok + (i0 + j) * MB * D + tile
            k = tl.load(K + offs)
            v = tl.load(V + offs).to(tl.float32)
            e = tl.load(ETA + eta_base + (i0 + j) * MB + rows).to(tl.float32)
            w, b = _linear_update(k, v, e, w, b, gamma, beta, eps, D, DT, IEEE)
            s = sc_base + j + 1
            tl.store(SC_W1 + s * D * D + w_offs, w)
            tl.store(SC_B1 + s * D + dc[None, :], b)
        tl.debug_barrier()
        for jj in range(cnt):
            j = cnt - 1 - jj
            i = i0 + j
            s = sc_base + j
            w = tl.load(SC_W1 + s * D * D + w_offs)
            b = tl.load(SC_B1 + s * D + dc[None, :])
            offs = tok + i * MB * D + tile
            q = tl.load(Q + offs)
            k = tl.load(K + offs)
            v = tl.load(V + offs).to(tl.float32)
            e = tl.load(ETA + eta_base + i * MB + rows).to(tl.float32)
            do = tl.load(DOUT + offs).to(tl.float32)
            z = _mm(k, w, DT, IEEE) + b
            xh, rstd, g, gx, gz = _ln_target_grad(z, v, k, gamma, beta, D, eps)
            p = e[:, None] * gz
            we = w - _mm(tl.trans(k), p, DT, IEEE)
            be = b - tl.sum(p, axis=0)[None, :]
            xq, rq = _ln_norm(_mm(q, we, DT, IEEE) + be, D, eps)
            dgamma += tl.sum(do * xq, axis=0)
            dbeta += tl.sum(do, axis=0)
            dzq = _ln_bwd(do * gamma, xq, rq, D)
            dw += _mm(tl.trans(q), dzq, DT, IEEE)
            db += tl.sum(dzq, axis=0)[None, :]
            dq = do + _mm(dzq, tl.trans(we), DT, IEEE)
            dp = -(_mm(k, dw, DT, IEEE) + db)
            dk = -_mm(p, tl.trans(dw), DT, IEEE)
            de = tl.sum(dp * gz, axis=1)
            dz, dg, dgm, dbt = _ln_double_bwd(e[:, None] * dp, gx, g, xh, rstd, gz, gamma, D)
            dgamma += dgm
            dbeta += dbt
            dk += dg
            dv = -dg
            dw += _mm(tl.trans(k), dz, DT, IEEE)
            db += tl.sum(dz, axis=0)[None, :]
            dk += _mm(dz, tl.trans(w), DT, IEEE)
            tl.store(DQ + offs, dq.to(DQ.dtype.element_ty))
            tl.store(DK + offs, dk.to(DK.dtype.element_ty))
            tl.store(DV + offs, dv.to(DV.dtype.element_ty))
            tl.store(DETA + eta_base + i * MB + rows, de)
        tl.debug_barrier()
    tl.store(DW1 + pid64 * D * D + w_offs, dw)
    tl.store(DB1 + pid64 * D + dc[None, :], db)
    tl.store(DLNW + pid64 * D + dc, dgamma)
    tl.store(DLNB + pid64 * D + dc, dbeta)


# ------------------------------------------------------------------------------------------------
# host side
# ------------------------------------------------------------------------------------------------
_SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _pow2(n: int) -> bool:
    return n >= 16 and n & (n - 1) == 0


def triton_supports(q: torch.Tensor, mini_batch_size: int, kind: str) -> bool:
    """True where the Triton kernels run this call: CUDA tensors (or TRITON_INTERPRET on CPU is the
    caller's explicit choice, not 'auto'), bf16/fp16/fp32, power-of-two head dim 16..128 and mini-batch
    16..64 dividing N."""
    if kind not in ("mlp", "linear") or q.dim() != 4 or not q.is_cuda or q.dtype not in _SUPPORTED_DTYPES:
        return False
    N, D = q.shape[-2], q.shape[-1]
    return _pow2(D) and D <= 128 and _pow2(mini_batch_size) and mini_batch_size <= 64 and N % mini_batch_size == 0


# Launch settings per kernel; the benchmark compares variants by editing this dict.
KERNEL_CONFIG = {
    # variant: "gmem" (state in L2, chunked), "chunked" (state in registers, 2 F-chunks), "plain"
    # device-verified in bf16 on Triton 3.6 / H100 (docs/performance.md, session-5 probes): gmem with fc=64.
    # fc=32 builds are wrong there (illegal addresses at 8 warps, wrong b1 at 4 warps) although correct in
    # fp32 and in the interpreter. 4 warps beat 8 for the forward (178 vs 239 ms at the one-minute shape):
    # at 8 warps each 64-row tile is split over two warp groups and spills more (session 6, spill-free code:
    # still 158 vs 142 ms). out_pass: f(q; W_end) in a pass of its own (1) or fused into the update pass (0):
    # 1 won while the forward spilled (170 vs 175 ms). With the spill-free code 0 is faster (134.5 vs 141.8 ms)
    # and passes the 640-token check, but on the device its backward gradients at 4,096 tokens are 3-4e-2
    # (out_pass 1: 5.5-8.8e-3 over 6 seeds), a Hopper-only fault the interpreter does not show: 1 stays.
    # split (session 7): each head's hidden units over fs-column slices in NSPLIT = F / fs programs that meet
    # once per mini-batch. Used while every head gets its group at once (48 heads: 87.9 vs 136.6 ms for gmem,
    # the H100 runs 66 groups at 255 registers); with more heads than that (96 heads: 189 vs 139 ms, two rounds)
    # and off power-of-two slices it falls back to gmem. park: gelu(Z1) and its derivative wait in L1 during
    # the meeting (14 vs 92 spill bytes, same speed). rowshare: the row-wise work after the meeting (Z2 sum, LN
    # target gradient) shared out over the group, with a second meeting (session 8: interpreter-checked, Triton
    # 3.6 sm_90a SASS 4,880 -> 4,296 instructions, FP ops -27 %; off until the device has checked and timed it).
    # fc / w2t / out_pass are the gmem fallback's.
    # smem (session 14, kernels/ttt_gluon.py): a Gluon kernel, one 8-warp CTA per head with the state in shared
    # memory and registers; b1's and b2's updates as small wgmmas (bsum_mma: 63.2 vs 75.6 ms), q / k / v in and the
    # output out by TMA (tma: 59.0 vs 63.6 ms). At the one-minute shape, 96 heads: 58.8-59.4 ms against gmem's 136-138
    # (48 heads: 59.3 vs the split's 88.6); 16 warps 72.3. Runs where ttt_gluon.gluon_supports (Hopper, bf16 / fp16,
    # D 64, F 256, mini-batch 64); elsewhere the split / gmem rule below.
    # pair (session 19): the Gluon forward with two CTAs a head where one a head leaves SMs idle (ttt_gluon.pair_heads:
    # 0 never, 1 where 2 x heads <= SMs, 2 always). 48 heads (the DiT's launch of one direction): 66.7 -> 44.4 ms at
    # the one-minute shape; 96 heads (both directions in one launch) paired: 85.5 against 61.6 (two rounds of CTAs).
    # mix (session 20): with pair 1, where pairing every head would not fit but one CTA a head leaves SMs idle
    # (SMs / 2 < heads < SMs), pair some heads in turn (ttt_gluon.mix_schedule); the value is the one-CTA-a-head time
    # a mini-batch over the paired one's in per cent (H100: 11.23 / 8.13 us), 0 turns it off. 96 heads: 61.2 -> 57.0 ms.
    "mlp_fwd": {"variant": "smem", "smem_num_warps": 8, "bsum_mma": 1, "tma": 1, "pair": 1, "mix": 138,
                "fs": 64, "park": 1, "rowshare": 0, "fc": 64, "w2t": 1, "num_warps": 4, "num_stages": 1, "out_pass": 1},
    # gmem backward (3 F-chunk passes per mini-batch, states and dL/dW in L2): 3.5x faster than "plain"
    # (3.43 -> 0.98 s at the one-minute shape; the whole-state backward stays as the fallback for hidden
    # sizes that are not powers of two).
    # W2 chunks kept [FC, D] (w2t=0; the transposed form only matters at FC < 64): 1,142 vs 1,215 ms fwd+bwd.
    # split backward (session 7, default since session 10): the forward's split, with three meetings per
    # mini-batch, under the same launch rule (split while every head gets its group at once, else gmem). Few
    # heads is where it pays: the toy-world trainer's 12 heads at 8,064 tokens, fwd+bwd 9.9 vs 18.0 ms for gmem
    # (session 10); at 48 heads 778 vs 787 ms (session 7). Session 11, fwd+bwd at 7,616 tokens for 12 / 24 / 32 /
    # 48 heads: 9.4 / 12.2 / 14.6 / 17.9 ms against gmem's 16.9 / 17.2 / 17.6 / 18.2, and 776 vs 783 ms at the
    # one-minute shape's 48: the gain shrinks as programs come to share SMs but never turns into a loss, so no
    # limit of its own. split_num_warps: its warps (8 leave room for 33 groups).
    # smem (session 15, kernels/ttt_gluon.py, the default): the Gluon backward, per checkpoint group the STATES
    # forward (each mini-batch's state into scratch slots), the output path of all its mini-batches at once, then one
    # 8-warp CTA per head back through the group with dL/dW in L2: 74.8 us a mini-batch at 96 heads against the
    # split's ~160; one-minute fwd+bwd 462.8 vs 930.6 ms (docs/performance.md, session 15). Runs where
    # ttt_gluon.gluon_supports; elsewhere the split / gmem rule. The output-path kernel (session 17): out_tma_c, its
    # bf16 terms stored by TMA from shared memory (16.5 -> 13.0 us a mini-batch: the plain stores from the wgmma
    # layouts throttled the load/store unit); out_persist, one CTA an SM looping over the group's items with the next
    # item's copies in flight (12.5-13.1 with both; 0 = a CTA an item, n > 1 = n CTAs). Session 18: gw_hint, the
    # sequential kernel's dL/dW accumulators marked evict-last in L2 (its profile: 1.1 TB/s from DRAM, L2 hit rate
    # 64 %): 45.6-46.2 -> 43.6-44.1 us a mini-batch at 96 heads; overlap, the sequential kernels on a high-priority
    # stream beside the next group's STATES and output-path launches (two scratch sets): at 48 heads, the DiT's
    # launch of one direction, the backward 55.4 -> 46.8 us a mini-batch; at 96 heads no change (the others get
    # 36 SMs and the sequential kernel slows by as much as they gain: 728 -> ~1,030 us a group, its memory shared).
    # bwd_group: the Gluon backward's groups span bwd_group // G of the forward's checkpoint groups (G = 16, the
    # DiT's scan_checkpoint_group_size: 4 of them), each recomputed from its first checkpoint: fewer, longer launches
    # (session 18, gluon_bwd_parts at 96 heads, overlap and gw_hint on: G' 16 69.1 / 69.5, 32 66.3 / 83.7, 64 66.6 /
    # 65.7 us a mini-batch; 48 heads 47.5 / 44.2 / 43.1), scratch in proportion (~1.6 GB at 96 heads, G' 64).
    # pair (session 19): the sequential kernel with two CTAs a head where one a head leaves SMs idle (as mlp_fwd's):
    # 48 heads, gluon_bwd_parts: sequential kernel alone 36.2 / 34.9 -> 25.3 / 25.2 us a mini-batch, backward 45.8 /
    # 44.0 -> 38.3 / 38.2; 96 heads paired (two rounds): 68.8, as unpaired (~67-68), so the rule keeps one a head there.
    "mlp_bwd": {"variant": "smem", "out_persist": 1, "out_tma_c": 1, "overlap": 1, "gw_hint": 1, "bwd_group": 64, "pair": 1,
                "fc": 64, "w2t": 0, "num_warps": 8, "num_stages": 1, "fs": 64, "split_num_warps": 4},
    # pipelined q/k/v loads: 57.7 -> 37.7 ms (run 4). variant "pipe": the output of mini-batch i - 1 computed in
    # mini-batch i's inner-forward dot (one dependent dot fewer per mini-batch). At the one-minute shape (session
    # 12): mini-batch 16 pipe 32.4 vs plain 38.0 ms, mini-batch 64 pipe 28.5 vs plain 14.5 ms (the [128, 64] tile
    # costs more than the link it saves), hence "auto": pipe up to pipe_max_mb. 4 warps beat 1 / 2 / 8 for both
    # (pipe 141 / 68.7 / 32.4 / 38.3 ms). Tried and not kept (docs/performance.md, session 12): "dual" (z_i from
    # k_i W_{i-2} and p_{i-1}, a one-dot chain: 61.4 ms) and transposed tiles (W^T as the A operand of Hopper
    # warpgroup MMAs: 43.0 ms, with pipe's pairing 44.1).
    # fused_sums (session 13): pipe's four LayerNorm row sums as two paired reductions (a row spans the 4 warps, so
    # each sum is a shared-memory exchange and a barrier on the chain), W and b carried centred so that the one-pass
    # variance cannot cancel: 29.1-29.7 vs 32.6-32.9 ms at the one-minute shape (predicted ~5 %, measured 10 %). Not kept:
    # padding the tile to 64 rows so each warp owns whole rows (min_rows=64: 43.7 ms; 255 registers, spills).
    # smem (session 14, kernels/ttt_gluon.py): a Gluon kernel for mini-batch 16, bf16 / fp16, D 64: pipe's row
    # pairing in a 64-row wgmma tile (each warp owns whole rows: LayerNorm sums stay inside a warp), k / q / v / eta
    # one mini-batch ahead by TMA, the output out by TMA: 26.5-26.7 vs pipe's 29.3-29.4 ms at the one-minute shape.
    # Elsewhere (fp32, mini-batch 64, off Hopper) "auto".
    "linear_fwd": {"variant": "smem", "pipe_max_mb": 16, "fused_sums": 1, "num_warps": 4, "num_stages": 3},
    "linear_bwd": {"num_warps": 4, "num_stages": 1},
}

# KERNEL_CONFIG changes from the environment, for a process that cannot edit it (a ComfyUI server, the trainer's
# command line): 'name:key=val,...;...', e.g. TTT_VIDEO_KERNEL_CONFIG='mlp_fwd:pair=0;mlp_bwd:pair=0'
KERNEL_CONFIG_ENV = "TTT_VIDEO_KERNEL_CONFIG"


def apply_config_spec(spec: str) -> None:
    """Install 'name:key=val,...;...' into KERNEL_CONFIG (values are ints, ``variant`` a name). Unknown kernel names
    and malformed items raise ValueError: a typo must not silently leave the default in place."""
    for part in filter(None, (p.strip() for p in spec.split(";"))):
        name, _, items = part.partition(":")
        if name not in KERNEL_CONFIG:
            raise ValueError(f"{KERNEL_CONFIG_ENV}: unknown kernel {name!r} (one of {sorted(KERNEL_CONFIG)})")
        for item in filter(None, (i.strip() for i in items.split(","))):
            key, eq, val = item.partition("=")
            if not eq or not key:
                raise ValueError(f"{KERNEL_CONFIG_ENV}: {item!r} in {part!r} is not key=value")
            try:
                KERNEL_CONFIG[name][key] = val if key == "variant" else int(val)
            except ValueError:
                raise ValueError(f"{KERNEL_CONFIG_ENV}: {key}={val!r} in {part!r} is not an integer") from None


apply_config_spec(os.environ.get(KERNEL_CONFIG_ENV, ""))


def _launch_opts(name: str) -> dict:
    cfg = KERNEL_CONFIG[name]
    opts = {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}
    if cfg.get("maxnreg") and not _interpreting():
        opts["maxnreg"] = cfg["maxnreg"]  # a register cap: more programs per SM, at the price of spills
    return opts


def _check(kind, q, mini_batch_size, D, F):
    if q.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"{kind} triton: inputs must be bf16/fp16/fp32, got {q.dtype}")
    N = q.shape[2]
    if not (_pow2(D) and _pow2(F) and _pow2(mini_batch_size)):
        raise ValueError(
            f"{kind} triton: head dim {D}, hidden {F} and mini_batch_size {mini_batch_size} must be powers of two >= 16"
        )
    if N % mini_batch_size:
        raise ValueError(f"{kind} triton: N={N} is not a multiple of mini_batch_size={mini_batch_size}")


def gluon_bwd_options(G: int) -> dict:
    """ttt_gluon.mlp_backward_gluon's options from KERNEL_CONFIG mlp_bwd, for forward checkpoint groups of G."""
    cfg = KERNEL_CONFIG["mlp_bwd"]
    return dict(out_persist=int(cfg.get("out_persist", 1)), out_tma_c=bool(cfg.get("out_tma_c", 1)),
                overlap=bool(cfg.get("overlap", 0)), gw_hint=bool(cfg.get("gw_hint", 0)),
                group_mul=gluon_bwd_group_mul(G), pair=int(cfg.get("pair", 0)))


def gluon_bwd_group_mul(G: int) -> int:
    """How many of the forward's checkpoint groups (G mini-batches each) one group of the Gluon backward spans:
    KERNEL_CONFIG mlp_bwd bwd_group // G (its groups as near that many mini-batches as multiples of G allow), >= 1."""
    return max(1, int(KERNEL_CONFIG["mlp_bwd"].get("bwd_group", 0)) // max(1, G))


def _group(n_mb: int, checkpoint_group_size: int) -> int:
    G = checkpoint_group_size if checkpoint_group_size > 0 else DEFAULT_GROUP
    return max(1, min(G, n_mb))


def _state_f32(t: torch.Tensor, BH: int, *shape) -> torch.Tensor:
    return t.detach().reshape(BH, *shape).to(torch.float32).contiguous()


def _w1_to_chunks(w1: torch.Tensor, fc: int) -> torch.Tensor:
    """[..., D, F] row-major -> the gmem kernels' chunk-major W1 layout ([..., F / fc, D, fc] in memory),
    returned with the same shape [..., D, F] (only the element order changes)."""
    *lead, D, F = w1.shape
    return w1.reshape(*lead, D, F // fc, fc).transpose(-3, -2).contiguous().reshape(*lead, D, F)


def _w1_from_chunks(w1: torch.Tensor, fc: int) -> torch.Tensor:
    """Inverse of _w1_to_chunks."""
    *lead, D, F = w1.shape
    return w1.reshape(*lead, F // fc, D, fc).transpose(-3, -2).contiguous().reshape(*lead, D, F)


def _mlp_fc(kernel: str, Fh: int) -> int:
    """F-chunk width of a gmem MLP kernel: its configured fc, at most half of F (so the chunk loop runs)."""
    return min(KERNEL_CONFIG[kernel].get("fc", 32), Fh // 2)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# (device, kernel specialisation) -> how many groups of the split forward fit on the GPU at once
_SPLIT_GROUP_CAPACITY: dict = {}
# the last split launch: parts per head, groups, and the compiled kernel's registers / spills (benchmarks, tests)
SPLIT_INFO: dict = {}
# (head dim, mini-batch) the split forward passed the GPU tests at (tests/gpu: H100, Triton 3.6, bf16 / fp16 /
# fp32, session 7); other shapes take gmem on a GPU
SPLIT_DEVICE_VERIFIED = {(64, 64), (64, 32), (64, 16), (32, 32), (128, 64)}
# the split backward: GPU tests at (64, 64) in session 7 (bf16 5.1-6.2e-3, fp32 5.9e-7, one group looping
# over the heads, one mini-batch, 4,096 tokens) and session 10's check of the sync-free version at 12 heads
SPLIT_BWD_DEVICE_VERIFIED = {(64, 64)}
# a group member that never arrives is reported after this many polls (~1 us each) instead of hanging
_SPLIT_MAX_SPIN = 1 << 23
# per CUDA device: the split kernels' stall flag (set by a program that gave up waiting; never cleared: the
# scan's results are wrong from then on) and a pinned host mirror of it. Reading the flag after every launch
# (.item()) drained the stream: one host-device sync per TTT call (16 per toy-world training step, session 8's
# profile). Each launch now queues a copy into the mirror and reads what the copies done so far show, so a
# stall raises at a later call, without a sync; check_split_stalls() waits and reads it (tests, end of a run).
_STALL_FLAGS: dict = {}
_STALL_MESSAGE = ("ttt_mlp triton: a split launch's programs per head did not all run at once (a group member never "
                  "arrived; its results are wrong); set KERNEL_CONFIG['mlp_fwd'] and ['mlp_bwd']['variant'] = 'gmem'")


def _stall_flag(device: torch.device) -> tuple:
    """(flag, host mirror) for the split kernels on ``device``; on a CPU (the interpreter) a fresh flag, no mirror."""
    if device.type != "cuda":
        return torch.zeros(1, device=device, dtype=torch.int32), None
    key = device.index if device.index is not None else torch.cuda.current_device()
    if key not in _STALL_FLAGS:
        _STALL_FLAGS[key] = (torch.zeros(1, device=device, dtype=torch.int32),
                             torch.zeros(1, dtype=torch.int32, pin_memory=True))
    return _STALL_FLAGS[key]


def _after_split_launch(flag, mirror, message: str = _STALL_MESSAGE) -> None:
    if mirror is None:
        stalled = flag.item()  # CPU: no stream to drain
    else:
        mirror.copy_(flag, non_blocking=True)
        stalled = mirror.item()  # the flag as of the last copy the device has done
    if stalled:
        raise RuntimeError(message)


def check_split_stalls() -> None:
    """Wait for the work queued so far and raise if any split launch on any device stalled."""
    for flag, _ in _STALL_FLAGS.values():
        if flag.item():
            raise RuntimeError(_STALL_MESSAGE)


def _split_group_capacity(args, consts, opts, nsplit, device, kernel=None) -> dict:
    """Groups of a split kernel (forward or backward) resident at once: occupancy from the compiled kernel's registers
    and shared memory (the recipe of Triton's fused-softmax tutorial) times the SM count, over NSPLIT."""
    kernel = kernel or _ttt_mlp_fwd_split_kernel
    key = (id(kernel), device.index, tuple(sorted(consts.items())), tuple(sorted(opts.items())), args[0].dtype)
    if key not in _SPLIT_GROUP_CAPACITY:
        compiled = kernel.warmup(*args, grid=(1,), **consts, **opts)
        compiled._init_handles()
        props = triton.runtime.driver.active.utils.get_device_properties(device.index)
        warps = opts["num_warps"]
        regs_per_warp = -(-compiled.n_regs * 32 // 256) * 256  # allocated in units of 256 per warp
        by_regs = props["max_num_regs"] // (regs_per_warp * warps)
        shared = compiled.metadata.shared
        by_smem = props["max_shared_mem"] // (shared + 1024) if shared else 32  # 1 KB reserved per block
        per_sm = min(by_regs, by_smem, 2048 // (32 * warps), 32)
        _SPLIT_GROUP_CAPACITY[key] = dict(capacity=per_sm * props["multiprocessor_count"] // nsplit,
                                          regs=compiled.n_regs, spills=compiled.n_spills, shared=shared,
                                          programs_per_sm=per_sm)
    return _SPLIT_GROUP_CAPACITY[key]


def split_groups(heads: int, capacity: int, forced: int = 0) -> int | None:
    """Groups to launch for a split kernel (forward or backward), or None to use the gmem kernel instead.

    Split only while every head gets a group of its own at once: a second round of heads doubles the time
    (96 heads on the H100's 66 groups: 189 ms against gmem's 139), while one program per head (gmem) runs
    every head at once. ``forced`` (tests) launches that many groups, looping over the heads."""
    if forced:
        return max(1, min(heads, capacity, forced))
    return heads if heads <= capacity else None


def _mlp_split_forward(q, k, v, eta, state, ln_w, ln_b, out, finals, cks, mb, G, save):
    """The split forward (see _ttt_mlp_fwd_split_kernel); None where it cannot run (the caller falls back)."""
    W1, b1, W2, b2 = state
    B, H, N, D = q.shape
    BH, Fh = B * H, W1.shape[-1]
    cfg = KERNEL_CONFIG["mlp_fwd"]
    fs = cfg.get("fs", 64)
    if _interpreting():
        fs = Fh  # programs run one after another in the interpreter: a group of one
    elif (D, mb) not in SPLIT_DEVICE_VERIFIED and not cfg.get("any_shape"):
        return None  # Triton 3.6 miscompiles some shapes on Hopper: only device-checked ones run split
    if Fh % fs or not _pow2(fs) or mb % (Fh // fs):
        return None
    nsplit = Fh // fs
    dev = q.device
    finals[0] = _w1_to_chunks(W1, fs)
    for dst, src in zip(finals[1:], (b1, W2, b2)):
        dst.copy_(src)
    consts = dict(D=D, FS=fs, NSPLIT=nsplit, MB=mb, SAVE=save, IEEE=q.dtype == torch.float32,
                  PARK=bool(cfg.get("park", 1)), ROWSHARE=bool(cfg.get("rowshare", 0)))
    opts = _launch_opts("mlp_fwd")
    n_mb = N // mb
    scalars = (BH, N, H, n_mb, -(-n_mb // G), G, LN_EPS, _SPLIT_MAX_SPIN)
    err, err_mirror = _stall_flag(dev)
    n_groups = BH
    if not _interpreting():
        probe = (q, k, v, eta, ln_w, ln_b, *finals, out, *cks, ln_w, ln_w, ln_w, ln_w, err, err, *scalars)
        cap = _split_group_capacity(probe, consts, opts, nsplit, dev)
        SPLIT_INFO.clear()
        SPLIT_INFO.update(cap)
        n_groups = split_groups(BH, cap["capacity"], cfg.get("groups", 0))
        if n_groups is None:
            SPLIT_INFO.update(nsplit=nsplit, groups=0, heads=BH, fallback="gmem")
            return None
    xch = torch.empty(n_groups * nsplit * 2 * mb * D, device=dev, dtype=torch.float32)
    pxch = torch.empty(n_groups * 2 * mb * D if consts["ROWSHARE"] else 1, device=dev, dtype=torch.float32)
    opart = torch.empty(n_groups * nsplit * 3 * mb * D, device=dev, dtype=torch.float32)
    scratch = torch.empty(n_groups * nsplit * 2 * mb * fs if consts["PARK"] else 1, device=dev, dtype=torch.float32)
    cnt = torch.zeros(n_groups * 32, device=dev, dtype=torch.int32)
    _ttt_mlp_fwd_split_kernel[(n_groups * nsplit,)](
        q, k, v, eta, ln_w, ln_b, *finals, out, *cks, xch, pxch, opart, scratch, cnt, err, *scalars, **consts, **opts,
    )
    SPLIT_INFO.update(nsplit=nsplit, groups=n_groups, heads=BH)
    _after_split_launch(err, err_mirror)
    finals[0] = _w1_from_chunks(finals[0], fs)
    return out, finals, cks, fs  # the checkpoints' W1 are chunk-major with fs


# why the Gluon forwards were given up in this process (empty: they run where ttt_gluon says they can)
GLUON_DISABLED: list = []


def _try_gluon(launch, *args, **kwargs):
    """A Gluon kernel's launch, or None (after a warning, once) where this Triton does not build it: Gluon is
    experimental and its API moves between releases (thread_barrier -> barrier, async_copy_global_to_shared ->
    async_load), and a Triton the kernels do not match must fall back to the Triton kernels, not fail the model."""
    try:
        return launch(*args, **kwargs)
    except (triton.CompilationError, AttributeError, TypeError) as e:
        GLUON_DISABLED.append(repr(e))
        warnings.warn(f"ttt triton: a Gluon kernel does not build with Triton {triton.__version__} "
                      f"({type(e).__name__}: {str(e)[:200]}); using the Triton kernels", RuntimeWarning)
        return None


def _mlp_forward(q, k, v, eta, state, ln_w, ln_b, mb, G, save):
    B, H, N, D = q.shape
    Fh = state[0].shape[-1]
    BH, n_mb = B * H, N // mb
    n_ck = -(-n_mb // G)
    W1, b1, W2, b2 = (_state_f32(state[0], BH, D, Fh), _state_f32(state[1], BH, Fh),
                      _state_f32(state[2], BH, Fh, D), _state_f32(state[3], BH, D))
    out = _empty_like(q)
    finals = [_empty_like(t) for t in (W1, b1, W2, b2)]
    dev = q.device
    if save:
        cks = [_empty(BH, n_ck, *s, device=dev) for s in ((D, Fh), (Fh,), (Fh, D), (D,))]
    else:
        cks = [W1, b1, W2, b2]  # never written (SAVE=False)
    variant = KERNEL_CONFIG["mlp_fwd"]["variant"]
    if variant == "smem":
        from . import ttt_gluon

        if ttt_gluon.gluon_supports(q, D, Fh, mb) and not GLUON_DISABLED:
            cfg = KERNEL_CONFIG["mlp_fwd"]
            res = _try_gluon(ttt_gluon.mlp_forward_gluon, q, k, v, eta, (W1, b1, W2, b2), ln_w, ln_b, out, finals, cks,
                             mb, G, save, num_warps=cfg.get("smem_num_warps", 8), tma=bool(cfg.get("tma", 1)),
                             bsum_mma=bool(cfg.get("bsum_mma", 1)), pair=int(cfg.get("pair", 0)),
                             mix=int(cfg.get("mix", 0)))
            if res is not None:
                return res
        variant = "split"  # no Gluon, not Hopper, fp32 inputs or another shape
    if variant == "split":
        split = _mlp_split_forward(q, k, v, eta, (W1, b1, W2, b2), ln_w, ln_b, out, finals, cks, mb, G, save)
        if split is not None:
            return split
        variant = "gmem"  # a shape the split does not run, or more heads than the GPU runs groups at once
    if variant == "gmem" and _pow2(Fh) and Fh >= 32:
        # state updated in place in the final-state buffers (they start as a copy of the initial state, W1
        # chunk-major); F-chunks of 64 columns (half of F at the small test shapes, so the chunk loop runs)
        FC = _mlp_fc("mlp_fwd", Fh)
        finals[0] = _w1_to_chunks(W1, FC)
        finals[1].copy_(b1)
        finals[2].copy_(W2)
        _ttt_mlp_fwd_gmem_kernel[(BH,)](
            q, k, v, eta, ln_w, ln_b, finals[0], finals[1], finals[2], b2, out, finals[3], *cks,
            N, H, n_mb, n_ck, G, LN_EPS,
            D=D, F=Fh, FC=FC, MB=mb, SAVE=save, W2T=bool(KERNEL_CONFIG["mlp_fwd"].get("w2t", 1)),
            IEEE=q.dtype == torch.float32, OUT_PASS=bool(KERNEL_CONFIG["mlp_fwd"].get("out_pass", 0)),
            **_launch_opts("mlp_fwd"),
        )
        finals[0] = _w1_from_chunks(finals[0], FC)
        return out, finals, cks, FC  # the checkpoints' W1 are chunk-major with FC

    kernel = _ttt_mlp_fwd_chunked_kernel if variant == "chunked" and _pow2(Fh // 2) else _ttt_mlp_fwd_kernel
    kernel[(BH,)](
        q, k, v, eta, ln_w, ln_b, W1, b1, W2, b2, out, *finals, *cks,
        N, H, n_mb, n_ck, G, LN_EPS,
        D=D, F=Fh, MB=mb, SAVE=save, IEEE=q.dtype == torch.float32, **_launch_opts("mlp_fwd"),
    )
    return out, finals, cks, 0  # row-major checkpoints


def _linear_fwd_kernel(mb: int, variant: str | None = None):
    """The TTT-Linear forward kernel for `variant` (default: KERNEL_CONFIG's); "auto": pipe up to mini-batch 16,
    plain above."""
    variant = variant or KERNEL_CONFIG["linear_fwd"].get("variant", "auto")
    if variant in ("auto", "smem"):  # smem (the Gluon kernel) falls back to auto where it does not run
        variant = "pipe" if mb <= KERNEL_CONFIG["linear_fwd"].get("pipe_max_mb", 16) else "plain"
    return _ttt_linear_fwd_pipe_kernel if variant == "pipe" else _ttt_linear_fwd_kernel


def _linear_fwd_options(kernel, cfg: dict | None = None) -> dict:
    """The variant-specific constexprs of a Linear forward kernel from ``cfg`` (default KERNEL_CONFIG's; launches
    and aot_report)."""
    cfg = KERNEL_CONFIG["linear_fwd"] if cfg is None else cfg
    if kernel is _ttt_linear_fwd_pipe_kernel:
        return {"FUSED_SUMS": bool(cfg.get("fused_sums", 1))}
    return {}


def _linear_forward(q, k, v, eta, state, ln_w, ln_b, mb, G, save):
    B, H, N, D = q.shape
    BH, n_mb = B * H, N // mb
    n_ck = -(-n_mb // G)
    W1, b1 = _state_f32(state[0], BH, D, D), _state_f32(state[1], BH, D)
    out = _empty_like(q)
    finals = [_empty_like(W1), _empty_like(b1)]
    if save:
        cks = [_empty(BH, n_ck, *s, device=q.device) for s in ((D, D), (D,))]
    else:
        cks = [W1, b1]
    if KERNEL_CONFIG["linear_fwd"].get("variant") == "smem" and not GLUON_DISABLED:
        from . import ttt_gluon

        if ttt_gluon.linear_gluon_supports(q, D, mb):
            res = _try_gluon(ttt_gluon.linear_forward_gluon, q, k, v, eta, (W1, b1), ln_w, ln_b, out, finals, cks, mb, G,
                             save)
            if res is not None:
                return res
    kernel = _linear_fwd_kernel(mb)
    kernel[(BH,)](
        q, k, v, eta, ln_w, ln_b, W1, b1, out, *finals, *cks,
        N, H, n_mb, n_ck, G, LN_EPS,
        D=D, MB=mb, SAVE=save, IEEE=q.dtype == torch.float32, **_linear_fwd_options(kernel), **_launch_opts("linear_fwd"),
    )
    return out, finals, cks


def _prep(q, k, v, eta, ln_weight, ln_bias):
    q, k, v = (t.contiguous() for t in (q, k, v))
    eta = eta.to(torch.float32).contiguous()
    return q, k, v, eta, ln_weight.to(torch.float32).contiguous(), ln_bias.to(torch.float32).contiguous()


def _grad_or_zeros(g, like):
    return like.new_zeros(like.shape) if g is None else g.reshape(like.shape).to(torch.float32).contiguous()


def _mlp_split_backward(q, k, v, eta, lnw, lnb, dout, cks, ck_fc, ends, mb, G, grads, dstate, dlnw, dlnb) -> bool:
    """The split backward (see _ttt_mlp_bwd_split_kernel) into grads (dq, dk, dv, deta), dstate, dlnw, dlnb;
    False where it cannot run (the caller takes the gmem backward)."""
    B, H, N, D = q.shape
    BH, Fh = B * H, cks[0].shape[-1]
    cfg = KERNEL_CONFIG["mlp_bwd"]
    fs = Fh if _interpreting() else cfg.get("fs", 64)
    if not _interpreting() and not cfg.get("any_shape") and (D, mb) not in SPLIT_BWD_DEVICE_VERIFIED:
        return False  # any_shape: probes and tests of shapes not verified yet
    if Fh % fs or not _pow2(fs) or mb % (Fh // fs):
        return False
    nsplit = Fh // fs
    dev = q.device
    ckW1, ckb1, ckW2, ckb2 = cks
    if ck_fc != fs:  # W1 checkpoints chunk-major with fs
        ckW1 = _w1_from_chunks(ckW1, ck_fc) if ck_fc else ckW1
        ckW1 = _w1_to_chunks(ckW1, fs)
    gw = [_w1_to_chunks(ends[0], fs), ends[1].clone(), ends[2].clone()]
    n_mb = N // mb
    scalars = (BH, N, H, n_mb, ckW1.shape[1], G, LN_EPS, _SPLIT_MAX_SPIN)
    consts = dict(D=D, FS=fs, NSPLIT=nsplit, MB=mb, IEEE=q.dtype == torch.float32)
    opts = dict(_launch_opts("mlp_bwd"), num_warps=cfg.get("split_num_warps", 4))
    err, err_mirror = _stall_flag(dev)

    def buffers(programs):
        scratch = [_empty(programs, G + 1, *s, device=dev) for s in ((D, fs), (fs,), (fs, D), (D,))]
        exch = [_empty(programs, 2, 3, mb, D, device=dev), _empty(programs, 2, mb, device=dev),
                _empty(programs, mb, D, device=dev)]
        return scratch, exch

    n_groups = BH
    if not _interpreting():
        scratch, exch = buffers(1)
        probe = (q, k, v, eta, lnw, lnb, dout, ckW1, ckb1, ckW2, ckb2, *scratch, *gw, ends[3], *grads,
                 dstate[3], dlnw, dlnb, *exch, err, err, *scalars)
        cap = _split_group_capacity(probe, consts, opts, nsplit, dev, kernel=_ttt_mlp_bwd_split_kernel)
        for key in [k_ for k_ in SPLIT_INFO if k_.startswith("bwd_")]:
            del SPLIT_INFO[key]  # the forward's entries stay: tests read both after one call
        SPLIT_INFO.update({f"bwd_{k_}": v_ for k_, v_ in cap.items()})
        n_groups = split_groups(BH, cap["capacity"], cfg.get("groups", 0))
        if n_groups is None:
            SPLIT_INFO.update(bwd_fallback="gmem")
            return False
    scratch, exch = buffers(n_groups * nsplit)
    cnt = torch.zeros(n_groups * 32, device=dev, dtype=torch.int32)
    _ttt_mlp_bwd_split_kernel[(n_groups * nsplit,)](
        q, k, v, eta, lnw, lnb, dout, ckW1, ckb1, ckW2, ckb2, *scratch, *gw, ends[3], *grads,
        dstate[3], dlnw, dlnb, *exch, cnt, err, *scalars, **consts, **opts,
    )
    SPLIT_INFO.update(bwd_nsplit=nsplit, bwd_groups=n_groups, bwd_heads=BH)
    _after_split_launch(err, err_mirror)
    dstate[:3] = [_w1_from_chunks(gw[0], fs), gw[1], gw[2]]
    return True


class _TTTMLPFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, eta, W1, b1, W2, b2, ln_weight, ln_bias, mb, G):
        B, H, N, D = q.shape
        qc, kc, vc, etac, lnw, lnb = _prep(q, k, v, eta, ln_weight, ln_bias)
        out, finals, cks, ck_fc = _mlp_forward(qc, kc, vc, etac, (W1, b1, W2, b2), lnw, lnb, mb, G, save=True)
        ctx.save_for_backward(qc, kc, vc, etac, lnw, lnb, *cks)
        ctx.meta = (mb, G, tuple(t.dtype for t in (W1, b1, W2, b2)), eta.dtype, ln_weight.dtype, ck_fc)
        Fh = W1.shape[-1]
        return (out, finals[0].view(B, H, D, Fh), finals[1].view(B, H, 1, Fh),
                finals[2].view(B, H, Fh, D), finals[3].view(B, H, 1, D))

    @staticmethod
    def backward(ctx, dout, dW1e, db1e, dW2e, db2e):
        q, k, v, eta, lnw, lnb, ckW1, ckb1, ckW2, ckb2 = ctx.saved_tensors
        mb, G, sdt, eta_dt, ln_dt, ck_fc = ctx.meta
        B, H, N, D = q.shape
        Fh = ckW1.shape[-1]
        BH, n_mb, n_ck = B * H, N // mb, ckW1.shape[1]
        dev = q.device
        f32 = dict(device=dev, dtype=torch.float32)
        dout = (torch.zeros_like(q) if dout is None else dout).to(q.dtype).contiguous()
        ends = [_grad_or_zeros(g, torch.empty(BH, *s, **f32)) for g, s in
                zip((dW1e, db1e, dW2e, db2e), ((D, Fh), (Fh,), (Fh, D), (D,)))]
        dq, dk, dv = _empty_like(q), _empty_like(k), _empty_like(v)
        deta = _empty(B, H, N, device=q.device)
        dstate = [_empty(BH, *s, device=dev) for s in ((D, Fh), (Fh,), (Fh, D), (D,))]
        dlnw, dlnb = _empty(BH, D, device=q.device), _empty(BH, D, device=q.device)
        cfg = KERNEL_CONFIG["mlp_bwd"]
        if cfg["variant"] == "smem":
            from . import ttt_gluon

            done = False
            if ttt_gluon.gluon_supports(q, D, Fh, mb) and not GLUON_DISABLED:
                cks_rm = (_w1_from_chunks(ckW1, ck_fc) if ck_fc else ckW1, ckb1, ckW2, ckb2)  # row-major W1
                done = _try_gluon(ttt_gluon.mlp_backward_gluon, q, k, v, eta, lnw, lnb, dout, cks_rm, ends, mb, G,
                                  (dq, dk, dv, deta), dstate, dlnw, dlnb, **gluon_bwd_options(G)) is not None
            cfg = dict(cfg, variant="done" if done else "split")  # elsewhere the split / gmem rule
        if cfg["variant"] == "split":
            done = _mlp_split_backward(q, k, v, eta, lnw, lnb, dout, (ckW1, ckb1, ckW2, ckb2), ck_fc, ends, mb, G,
                                       (dq, dk, dv, deta), dstate, dlnw, dlnb)
            # the gmem fallback keeps the configured w2t / fc (until session 13 it fell back with w2t = 1, the
            # slower orientation: the one-launch fwd+bwd at 96 heads read ~1,090 ms, ~995 with w2t = 0)
            cfg = dict(cfg, variant="done" if done else "gmem")
        gmem = cfg["variant"] == "gmem" and _pow2(Fh) and Fh >= 32
        FC = _mlp_fc("mlp_bwd", Fh) if gmem else 0
        if cfg["variant"] == "done":
            pass
        elif ck_fc != FC:  # checkpoints' W1 in the layout the backward kernel reads (chunk-major for gmem)
            ckW1 = _w1_from_chunks(ckW1, ck_fc) if ck_fc else ckW1
            ckW1 = _w1_to_chunks(ckW1, FC) if FC else ckW1
        if cfg["variant"] == "done":
            pass
        elif gmem:
            scratch = [_empty(BH, G + 1, *s, device=dev) for s in ((D, Fh), (Fh,), (Fh, D), (D,))]
            # dL/dW_end in, dL/dW_start out (W1's chunk-major)
            gw = [_w1_to_chunks(ends[0], FC), ends[1].clone(), ends[2].clone()]
            _ttt_mlp_bwd_gmem_kernel[(BH,)](
                q, k, v, eta, lnw, lnb, dout, ckW1, ckb1, ckW2, ckb2, *scratch, *gw, ends[3],
                dq, dk, dv, deta, dstate[3], dlnw, dlnb,
                N, H, n_mb, n_ck, G, LN_EPS,
                D=D, F=Fh, FC=FC, MB=mb, W2T=bool(cfg.get("w2t", 1)), IEEE=q.dtype == torch.float32,
                **_launch_opts("mlp_bwd"),
            )
            dstate[:3] = [_w1_from_chunks(gw[0], FC), gw[1], gw[2]]
        else:
            scratch = [_empty(BH, G, *s, device=dev) for s in ((D, Fh), (Fh,), (Fh, D), (D,))]
            _ttt_mlp_bwd_kernel[(BH,)](
                q, k, v, eta, lnw, lnb, dout, ckW1, ckb1, ckW2, ckb2, *scratch, *ends,
                dq, dk, dv, deta, *dstate, dlnw, dlnb,
                N, H, n_mb, n_ck, G, LN_EPS,
                D=D, F=Fh, MB=mb, IEEE=q.dtype == torch.float32, **_launch_opts("mlp_bwd"),
            )
        shapes = ((B, H, D, Fh), (B, H, 1, Fh), (B, H, Fh, D), (B, H, 1, D))
        dW1, db1, dW2, db2 = (t.view(*s).to(dt) for t, s, dt in zip(dstate, shapes, sdt))
        dlnw = dlnw.view(B, H, D).sum(0).to(ln_dt)
        dlnb = dlnb.view(B, H, D).sum(0).to(ln_dt)
        return dq, dk, dv, deta.to(eta_dt), dW1, db1, dW2, db2, dlnw, dlnb, None, None


class _TTTLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, eta, W1, b1, ln_weight, ln_bias, mb, G):
        B, H, N, D = q.shape
        qc, kc, vc, etac, lnw, lnb = _prep(q, k, v, eta, ln_weight, ln_bias)
        out, finals, cks = _linear_forward(qc, kc, vc, etac, (W1, b1), lnw, lnb, mb, G, save=True)
        ctx.save_for_backward(qc, kc, vc, etac, lnw, lnb, *cks)
        ctx.meta = (mb, G, (W1.dtype, b1.dtype), eta.dtype, ln_weight.dtype)
        return out, finals[0].view(B, H, D, D), finals[1].view(B, H, 1, D)

    @staticmethod
    def backward(ctx, dout, dW1e, db1e):
        q, k, v, eta, lnw, lnb, ckW1, ckb1 = ctx.saved_tensors
        mb, G, sdt, eta_dt, ln_dt = ctx.meta
        B, H, N, D = q.shape
        BH, n_mb, n_ck = B * H, N // mb, ckW1.shape[1]
        f32 = dict(device=q.device, dtype=torch.float32)
        dout = (torch.zeros_like(q) if dout is None else dout).to(q.dtype).contiguous()
        ends = [_grad_or_zeros(dW1e, torch.empty(BH, D, D, **f32)), _grad_or_zeros(db1e, torch.empty(BH, D, **f32))]
        scratch = [_empty(BH, G, D, D, device=q.device), _empty(BH, G, D, device=q.device)]
        dq, dk, dv = _empty_like(q), _empty_like(k), _empty_like(v)
        deta = _empty(B, H, N, device=q.device)
        dW, db = _empty(BH, D, D, device=q.device), _empty(BH, D, device=q.device)
        dlnw, dlnb = _empty(BH, D, device=q.device), _empty(BH, D, device=q.device)
        _ttt_linear_bwd_kernel[(BH,)](
            q, k, v, eta, lnw, lnb, dout, ckW1, ckb1, *scratch, *ends,
            dq, dk, dv, deta, dW, db, dlnw, dlnb,
            N, H, n_mb, n_ck, G, LN_EPS,
            D=D, MB=mb, IEEE=q.dtype == torch.float32, **_launch_opts("linear_bwd"),
        )
        dW = dW.view(B, H, D, D).to(sdt[0])
        db = db.view(B, H, 1, D).to(sdt[1])
        dlnw = dlnw.view(B, H, D).sum(0).to(ln_dt)
        dlnb = dlnb.view(B, H, D).sum(0).to(ln_dt)
        return dq, dk, dv, deta.to(eta_dt), dW, db, dlnw, dlnb, None, None


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def ttt_mlp_triton(q, k, v, eta, state, ln_weight, ln_bias, mini_batch_size=64, checkpoint_group_size=0):
    """TTT-MLP through the Triton kernels. Returns (out [B,H,N,D] in q's dtype, fp32 final state)."""
    W1, b1, W2, b2 = state
    B, H, N, D = q.shape
    Fh = W1.shape[-1]
    _check("ttt_mlp", q, mini_batch_size, D, Fh)
    G = _group(N // mini_batch_size, checkpoint_group_size)
    if _needs_grad(q, k, v, eta, W1, b1, W2, b2, ln_weight, ln_bias):
        out, *final = _TTTMLPFunction.apply(q, k, v, eta, W1, b1, W2, b2, ln_weight, ln_bias, mini_batch_size, G)
        return out, tuple(final)
    qc, kc, vc, etac, lnw, lnb = _prep(q, k, v, eta, ln_weight, ln_bias)
    out, finals, _, _ = _mlp_forward(qc, kc, vc, etac, state, lnw, lnb, mini_batch_size, G, save=False)
    shapes = ((B, H, D, Fh), (B, H, 1, Fh), (B, H, Fh, D), (B, H, 1, D))
    return out, tuple(t.view(*s) for t, s in zip(finals, shapes))


def ttt_linear_triton(q, k, v, eta, state, ln_weight, ln_bias, mini_batch_size=16, checkpoint_group_size=0):
    """TTT-Linear through the Triton kernels. Returns (out [B,H,N,D] in q's dtype, fp32 final state)."""
    W1, b1 = state
    B, H, N, D = q.shape
    _check("ttt_linear", q, mini_batch_size, D, D)
    G = _group(N // mini_batch_size, checkpoint_group_size)
    if _needs_grad(q, k, v, eta, W1, b1, ln_weight, ln_bias):
        out, *final = _TTTLinearFunction.apply(q, k, v, eta, W1, b1, ln_weight, ln_bias, mini_batch_size, G)
        return out, tuple(final)
    qc, kc, vc, etac, lnw, lnb = _prep(q, k, v, eta, ln_weight, ln_bias)
    out, finals, _ = _linear_forward(qc, kc, vc, etac, state, lnw, lnb, mini_batch_size, G, save=False)
    return out, (finals[0].view(B, H, D, D), finals[1].view(B, H, 1, D))
