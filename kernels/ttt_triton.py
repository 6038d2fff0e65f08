"""Triton TTT-MLP / TTT-Linear: forward and backward kernels implementing the ``ttt_core.ops`` contract.

Design (see docs/performance.md for the numbers behind it):
- one program per (batch, head) sequence; both directions of the bidirectional block run in one launch
  when the caller stacks them along the batch dim (the explicit W_end form is permutation-invariant
  inside a mini-batch, so the reversed direction is just another sequence);
- the state (W1, b1, W2, b2) lives in fp32 registers for the whole sequence; every matmul is a ``tl.dot``
  with operands in the input dtype (bf16/fp16) and fp32 accumulation; fp32 inputs use IEEE fp32 dots
  (tf32 would miss the fp32 accuracy target);
- forward saves the state at the start of every G-th mini-batch (G = checkpoint_group_size, default 16,
  like the official scan checkpoints); the backward kernel walks the groups in reverse, recomputes the
  G states of a group into a per-program scratch buffer, then back-propagates through the group's
  mini-batches in reverse, carrying dL/dW_end in fp32 registers.
The official kernel (ttt-tk, ThunderKittens) shards W1/W2 over 2 SMs of a cluster; Triton has no DSMEM,
so here one program holds a whole head's state (simpler, runs on any CUDA GPU, not only Hopper).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

_GELU_C = 0.7978845608028654  # sqrt(2 / pi)
_GELU_A = 0.044715
LN_EPS = 1e-8
DEFAULT_GROUP = 16
# Tests set this: every buffer the kernels write starts NaN-filled, so an element left unwritten shows up.
POISON_OUTPUTS = False


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
def _tanh(u):
    # tanh via sigmoid (tl has no portable tanh across Triton 3.6 / 3.9 and the interpreter)
    return 2.0 * tl.sigmoid(2.0 * u) - 1.0


@triton.jit
def _gelu_parts(z):
    """gelu_tanh(z), its first and second derivative."""
    u = 0.7978845608028654 * (z + 0.044715 * z * z * z)
    du = 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * z * z)
    t = _tanh(u)
    s = 1.0 - t * t
    g = 0.5 * z * (1.0 + t)
    g1 = 0.5 * (1.0 + t) + 0.5 * z * s * du
    g2 = s * (du + 0.5 * z * (6.0 * 0.044715 * 0.7978845608028654 * z - 2.0 * t * du * du))
    return g, g1, g2


@triton.jit
def _gelu_and_grad(z):
    u = 0.7978845608028654 * (z + 0.044715 * z * z * z)
    t = _tanh(u)
    g = 0.5 * z * (1.0 + t)
    g1 = 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * z * z)
    return g, g1


@triton.jit
def _gelu(z):
    u = 0.7978845608028654 * (z + 0.044715 * z * z * z)
    return 0.5 * z * (1.0 + _tanh(u))


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
    a, da = _gelu_and_grad(z1)
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
            zq = _mm(_gelu(_mm(q, w1, DT, IEEE) + b1), w2, DT, IEEE) + b2
            xq, rq = _ln_norm(zq, D, eps)
            out = q.to(tl.float32) + gamma * xq + beta
            tl.store(OUT + offs, out.to(OUT.dtype.element_ty))
    tl.store(W1_OUT + pid64 * D * F + w1_offs, w1)
    tl.store(B1_OUT + pid64 * F + fc[None, :], b1)
    tl.store(W2_OUT + pid64 * F * D + w2_offs, w2)
    tl.store(B2_OUT + pid64 * D + dc[None, :], b2)


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
            a, ga1, ga2 = _gelu_parts(z1)
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
            aq, gq1 = _gelu_and_grad(zq1)
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
    h = pid % H
    DT = Q.dtype.element_ty
    rows = tl.arange(0, MB)
    dc = tl.arange(0, D)
    w_offs = dc[:, None] * D + dc[None, :]
    w = tl.load(W1 + pid64 * D * D + w_offs).to(tl.float32)
    b = tl.load(B1 + pid64 * D + dc[None, :]).to(tl.float32)
    gamma = tl.load(LNW + h * D + dc[None, :]).to(tl.float32)
    beta = tl.load(LNB + h * D + dc[None, :]).to(tl.float32)
    tok = pid64 * N * D
    eta_base = pid64 * N
    tile = rows[:, None] * D + dc[None, :]
    for c in range(n_ck):
        if SAVE:
            ck = pid64 * n_ck + c
            tl.store(CK_W1 + ck * D * D + w_offs, w)
            tl.store(CK_B1 + ck * D + dc[None, :], b)
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
    tl.store(W1_OUT + pid64 * D * D + w_offs, w)
    tl.store(B1_OUT + pid64 * D + dc[None, :], b)


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


def _num_warps(kind: str, D: int, F: int, MB: int) -> int:
    if kind == "linear":
        return 4
    return 8 if D * F >= 64 * 256 else 4


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


def _group(n_mb: int, checkpoint_group_size: int) -> int:
    G = checkpoint_group_size if checkpoint_group_size > 0 else DEFAULT_GROUP
    return max(1, min(G, n_mb))


def _state_f32(t: torch.Tensor, BH: int, *shape) -> torch.Tensor:
    return t.detach().reshape(BH, *shape).to(torch.float32).contiguous()


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
    _ttt_mlp_fwd_kernel[(BH,)](
        q, k, v, eta, ln_w, ln_b, W1, b1, W2, b2, out, *finals, *cks,
        N, H, n_mb, n_ck, G, LN_EPS,
        D=D, F=Fh, MB=mb, SAVE=save, IEEE=q.dtype == torch.float32,
        num_warps=_num_warps("mlp", D, Fh, mb), num_stages=1,
    )
    return out, finals, cks


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
    _ttt_linear_fwd_kernel[(BH,)](
        q, k, v, eta, ln_w, ln_b, W1, b1, out, *finals, *cks,
        N, H, n_mb, n_ck, G, LN_EPS,
        D=D, MB=mb, SAVE=save, IEEE=q.dtype == torch.float32,
        num_warps=_num_warps("linear", D, D, mb), num_stages=1,
    )
    return out, finals, cks


def _prep(q, k, v, eta, ln_weight, ln_bias):
    q, k, v = (t.contiguous() for t in (q, k, v))
    eta = eta.to(torch.float32).contiguous()
    return q, k, v, eta, ln_weight.to(torch.float32).contiguous(), ln_bias.to(torch.float32).contiguous()


def _grad_or_zeros(g, like):
    return like.new_zeros(like.shape) if g is None else g.reshape(like.shape).to(torch.float32).contiguous()


class _TTTMLPFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, eta, W1, b1, W2, b2, ln_weight, ln_bias, mb, G):
        B, H, N, D = q.shape
        qc, kc, vc, etac, lnw, lnb = _prep(q, k, v, eta, ln_weight, ln_bias)
        out, finals, cks = _mlp_forward(qc, kc, vc, etac, (W1, b1, W2, b2), lnw, lnb, mb, G, save=True)
        ctx.save_for_backward(qc, kc, vc, etac, lnw, lnb, *cks)
        ctx.meta = (mb, G, tuple(t.dtype for t in (W1, b1, W2, b2)), eta.dtype, ln_weight.dtype)
        Fh = W1.shape[-1]
        return (out, finals[0].view(B, H, D, Fh), finals[1].view(B, H, 1, Fh),
                finals[2].view(B, H, Fh, D), finals[3].view(B, H, 1, D))

    @staticmethod
    def backward(ctx, dout, dW1e, db1e, dW2e, db2e):
        q, k, v, eta, lnw, lnb, ckW1, ckb1, ckW2, ckb2 = ctx.saved_tensors
        mb, G, sdt, eta_dt, ln_dt = ctx.meta
        B, H, N, D = q.shape
        Fh = ckW1.shape[-1]
        BH, n_mb, n_ck = B * H, N // mb, ckW1.shape[1]
        dev = q.device
        f32 = dict(device=dev, dtype=torch.float32)
        dout = (torch.zeros_like(q) if dout is None else dout).to(q.dtype).contiguous()
        ends = [_grad_or_zeros(g, torch.empty(BH, *s, **f32)) for g, s in
                zip((dW1e, db1e, dW2e, db2e), ((D, Fh), (Fh,), (Fh, D), (D,)))]
        scratch = [_empty(BH, G, *s, device=dev) for s in ((D, Fh), (Fh,), (Fh, D), (D,))]
        dq, dk, dv = _empty_like(q), _empty_like(k), _empty_like(v)
        deta = _empty(B, H, N, device=q.device)
        dstate = [_empty(BH, *s, device=dev) for s in ((D, Fh), (Fh,), (Fh, D), (D,))]
        dlnw, dlnb = _empty(BH, D, device=q.device), _empty(BH, D, device=q.device)
        _ttt_mlp_bwd_kernel[(BH,)](
            q, k, v, eta, lnw, lnb, dout, ckW1, ckb1, ckW2, ckb2, *scratch, *ends,
            dq, dk, dv, deta, *dstate, dlnw, dlnb,
            N, H, n_mb, n_ck, G, LN_EPS,
            D=D, F=Fh, MB=mb, IEEE=q.dtype == torch.float32,
            num_warps=_num_warps("mlp", D, Fh, mb), num_stages=1,
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
            D=D, MB=mb, IEEE=q.dtype == torch.float32,
            num_warps=_num_warps("linear", D, D, mb), num_stages=1,
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
    out, finals, _ = _mlp_forward(qc, kc, vc, etac, state, lnw, lnb, mini_batch_size, G, save=False)
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
