"""TTT-MLP and TTT-Linear forwards and the TTT-MLP backward in Gluon (Triton's explicit-layout dialect) for Hopper:
one CTA per (sequence, head) on the sequential chains, the state in shared memory and registers.

Why a second language: the Triton kernels (kernels/ttt_triton.py) cannot keep a tensor in shared memory across
loop iterations. The [64, 256] + [256, 64] fp32 TTT-MLP state (128 KB) does not fit in one program's registers, so
the gmem forward keeps it in L2 and re-reads it three times per mini-batch (~25 us a mini-batch at the one-minute
shape), and the split forward spreads it over 4 programs that meet through global memory (66 groups fit on an
H100, not the 96 heads of a bidirectional launch). Gluon can allocate shared memory explicitly, so here one CTA
of 8 warps (2 warpgroups, each 128 of the 256 hidden units of the [64, 256] tiles) keeps:

    W1 (fp32 master)  registers, in the [64, 256] wgmma accumulator layout (64 a thread)
    W2 (fp32 master)  shared memory [256, 64] (64 KB)
    bf16 copies of W1 / W2 as wgmma operands (32 + 32 KB), b1 (1 KB), b2 in registers

and exchanges tiles between warpgroups through shared memory and a CTA barrier, not global memory and flags;
q / k / v come in and the output goes out by TMA (docs/performance.md, session 14, for each step's measurement).

Per mini-batch (explicit W_end form, the contract of ttt_core.ops.ttt_mlp; p = -eta dl/dZ, eta per token):
    Z1 = k W1 + b1, A = gelu(Z1)             wgmma [64, 64] x [64, 256]
    Z2 = A W2 + b2, LN target gradient       wgmma [64, 256] x [256, 64], rows reduced inside a warp
    P2 = -eta dl/dZ2                          (eta folded before the bf16 rounding: one operand tile, not two)
    P1 = (P2 W2^T) * gelu'(Z1)                wgmma, W2 read transposed in place
    W2 += A^T P2, b2 += sum P2                wgmma, A read transposed in place
    W1 += k^T P1, b1 += sum P1                wgmma into the register master
    out = q + LN(gelu(q W1 + b1) W2 + b2)     two wgmmas with the updated state

Where one CTA a head would leave SMs idle (2 x heads <= SMs: the DiT's launches of one direction), the forward and the
backward's sequential kernel run two CTAs a head instead (PAIR, pair_heads), each with half the hidden units, meeting
through global memory (_pair_meet): the kernels' docstrings and docs/performance.md, session 19. Between SMs / 2 and
SMs heads (the one-launch 96 heads, the DiT's B = 2 launches), the forward pairs some heads in turn
(mix_schedule: groups of heads, each a chain of launches over parts of the scan on a stream of its own; session 20).

The TTT-Linear forward (mini-batch 16) is in _ttt_linear_fwd_smem_kernel's docstring. The TTT-MLP backward
(mlp_backward_gluon: per checkpoint group the forward kernel with STATES, _ttt_mlp_bwd_out_kernel and
_ttt_mlp_bwd_smem_kernel) is described in their docstrings and docs/performance.md, session 15.

bf16 / fp16 inputs only (fp32 inputs take the Triton kernels: wgmma has no IEEE fp32 mode). The CPU interpreter
does not run Gluon: these kernels are checked on the device (tests/gpu/test_kernels_gpu.py) against the float64
reference, like the split forward's group meetings, and compiled for sm_90a in CI (tests/test_aot_report.py).
"""
from __future__ import annotations

import torch
import triton.language as tl

from . import ttt_triton
from .ttt_triton import _GELU_3CA, _GELU_CA, LN_EPS

_GELU_C = tl.constexpr(ttt_triton._GELU_C)  # a constexpr: jit code reads no plain globals

try:  # Gluon ships with Triton >= 3.5; without it the Triton kernels serve every call
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                                  warpgroup_mma_wait)
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    # a CTA-wide barrier: gl.thread_barrier in Triton 3.5-3.6 (the device's), gl.barrier from 3.7 on
    _cta_barrier = getattr(gl, "thread_barrier", None) or gl.barrier
    # a TMA tile load: tma.async_copy_global_to_shared up to 3.6, tma.async_load after
    _tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
    _tma_store = getattr(tma, "async_store", None) or tma.async_copy_shared_to_global
    # a shared buffer seen as another dtype / shape / layout: _reinterpret up to 3.6, reinterpret after
    _PUBLIC_REINTERPRET = tl.constexpr(hasattr(gl.shared_memory_descriptor, "reinterpret"))
    HAVE_GLUON = True
except Exception:  # pragma: no cover - depends on the installed Triton
    HAVE_GLUON = False

# the shapes this kernel is written for: head dim, hidden, mini-batch (the paper's TTT-MLP)
GLUON_SHAPES = {(64, 256, 64)}
# launches so far (tests check that a call took this kernel)
LAUNCHES = 0

if HAVE_GLUON:

    @gluon.jit
    def _tanh(u):
        # one MUFU instruction; its relative error (2^-10.99) is below the bf16 rounding of every use
        return gl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=r,r", [u], dtype=gl.float32,
                                         is_pure=True, pack=1)

    # the tanh-GELU's constants and formulas are ttt_triton's (_gelu, _gelu_and_grad), in Gluon's dialect

    @gluon.jit
    def _gelu(z):
        h = 0.5 * z
        return gl.fma(h, _tanh(z * gl.fma(z * z, _GELU_CA, _GELU_C)), h)

    @gluon.jit
    def _gelu_and_grad(z):
        z2 = z * z
        t = _tanh(z * gl.fma(z2, _GELU_CA, _GELU_C))
        h = 0.5 * z
        g = gl.fma(h, t, h)
        g1 = gl.fma(h * gl.fma(-t, t, 1.0), gl.fma(z2, _GELU_3CA, _GELU_C), gl.fma(0.5, t, 0.5))
        return g, g1

    @gluon.jit
    def _reinterpret(buf, dtype: gl.constexpr, shape: gl.constexpr, layout: gl.constexpr):
        if _PUBLIC_REINTERPRET:
            return buf.reinterpret(dtype, shape, layout)
        else:
            return buf._reinterpret(dtype, shape, layout)

    @gluon.jit
    def _add2(a0, a1, b0, b1):
        return a0 + b0, a1 + b1

    @gluon.jit
    def _ln_rows(z, D: gl.constexpr, eps):
        """xhat and 1/std of each row (two-pass variance)."""
        mu = gl.sum(z, axis=1) / D
        zc = z - mu[:, None]
        rstd = gl.rsqrt(gl.sum(zc * zc, axis=1) / D + eps)
        return zc * rstd[:, None], rstd

    @gluon.jit
    def _w_offsets_strided(R: gl.constexpr, C: gl.constexpr, S: gl.constexpr, L: gl.constexpr):
        """Offsets of an [R, C] block of a row-major matrix with S columns, in layout L (recomputed where used: held
        across the scan they would cost 32 registers a thread)."""
        r = gl.arange(0, R, layout=gl.SliceLayout(1, L))
        c = gl.arange(0, C, layout=gl.SliceLayout(0, L))
        return r[:, None] * S + c[None, :]

    @gluon.jit
    def _w_offsets(R: gl.constexpr, C: gl.constexpr, L: gl.constexpr):
        """Row-major offsets of an [R, C] matrix in layout L."""
        return _w_offsets_strided(R, C, C, L)

    @gluon.jit
    def _store_state(PW1, PB1, PW2, PB2, w1, B1_s, W2F_s, b2, dcol, D: gl.constexpr, FL: gl.constexpr,
                     F: gl.constexpr, L_ZF: gl.constexpr, L_W2: gl.constexpr):
        """The state (W1 from registers, b1 and W2 from shared memory, b2 from registers) to row-major buffers: this
        CTA's FL of the F hidden units (PW1 / PB1 / PW2 point at its first column / element / row)."""
        gl.store(PW1 + _w_offsets_strided(D, FL, F, L_ZF), w1)
        COLF: gl.constexpr = gl.SliceLayout(0, L_ZF)
        gl.store(PB1 + gl.arange(0, FL, layout=COLF), B1_s.load(COLF))
        gl.store(PW2 + _w_offsets(FL, D, L_W2), W2F_s.load(L_W2))
        gl.store(PB2 + dcol, b2)

    @gluon.jit
    def _store_slot(WTD_OUT, W2D_OUT, ST_B1, ST_B2, slot, W1T_s, W2B_s, b1, b2, dcol, F: gl.constexpr,
                    D: gl.constexpr):
        """One state of the backward's recompute into its scratch slot (the caller has fenced and barriered the last
        stores to the shared copies): W1 transposed and W2 in the operand type, by TMA straight from the bf16
        operand copies ([F, D] tiles, the layout the backward loads), b1 / b2 in fp32."""
        _tma_store(WTD_OUT, [slot * F, 0], W1T_s)
        _tma_store(W2D_OUT, [slot * F, 0], W2B_s)
        gl.store(ST_B1 + slot.to(gl.int64) * F + gl.arange(0, F, layout=b1.type.layout), b1)
        gl.store(ST_B2 + slot.to(gl.int64) * D + dcol, b2)

    @gluon.jit
    def _pair_meet(CNT, ERR, target, max_spin):
        """The two CTAs of a head (PAIR) meet: this CTA's stores so far are released to its partner, then it waits
        until the pair's counter reaches ``target`` (both arrived; acquire). The Triton split kernels' meeting (their
        helpers compile the same in Gluon): a bounded poll, a stall flagged in ERR (the scan is wrong from there on)
        and no more waiting. Returns the poll budget for the next meeting."""
        ttt_triton._group_arrive(CNT)
        return ttt_triton._group_wait(CNT, ERR, target, max_spin)

    @gluon.jit
    def _pair_output(OPART, QP, O_s, OD, row, b2, gamma, beta, tile, first, eps, D: gl.constexpr, MB: gl.constexpr):
        """A mini-batch's output from the pair's two partial sums of gelu(q W1' + b1') W2' (OPART: half 0's, half
        1's at + 2 MB D), both CTAs computing the same bits in the same order; the first CTA stores it by TMA."""
        zq = gl.load(OPART + tile) + gl.load(OPART + 2 * MB * D + tile) + b2[None, :]
        xq, rq = _ln_rows(zq, D, eps)
        out = gl.load(QP + tile).to(gl.float32) + gamma * xq + beta
        O_s.store(out.to(O_s.dtype))
        fence_async_shared()
        _cta_barrier()
        if first:
            _tma_store(OD, [row, 0], O_s)

    @gluon.jit
    def _ttt_mlp_fwd_smem_kernel(
        Q, K, V, QD, KD, VD, OD, WTD_OUT, W2D_OUT, ETA, LNW, LNB,
        W1_IN, B1_IN, W2_IN, B2_IN,
        OUT, W1_OUT, B1_OUT, W2_OUT, B2_OUT,
        CK_W1, CK_B1, CK_W2, CK_B2,
        ST_B1, ST_B2,
        XCH, OPART, CNT, ERR,
        N, H, n_mb, n_ck, G, eps, mb0, in_mul, in_add, n_slots, max_spin, h0, ck_stride,
        D: gl.constexpr, FS: gl.constexpr, MB: gl.constexpr, SAVE: gl.constexpr, TMA: gl.constexpr,
        BSUM_MMA: gl.constexpr, STATES: gl.constexpr, num_warps: gl.constexpr, PAIR: gl.constexpr = False,
    ):
        """The TTT-MLP forward (module docstring). With STATES (the backward's recompute of one checkpoint group):
        the state at the start of each of mini-batches [mb0, n_mb) and after the last into the head's scratch slots
        (WTD_OUT / W2D_OUT: W1^T and W2 as [F, D] tiles; ST_B1 / ST_B2), from the checkpoint row pid * in_mul + in_add of W1_IN / B1_IN / W2_IN / B2_IN, and no output.

        PAIR (heads that leave SMs idle: the DiT runs one direction a launch, 48 heads on 132 SMs): two CTAs a head,
        each with F / 2 of the hidden units (W1's columns, b1, W2's rows), as the paper's kernel splits a head over
        two SMs. They meet once a mini-batch through global memory (CNT: a start-order ticket, then a counter a
        pair; _pair_meet): each adds the two [MB, D] partial sums of Z2 = A W2 from XCH in the same order, so both
        run the same LayerNorm and inner-gradient steps on the same bits. The output's partial sums (OPART) are
        written at the end of a mini-batch and summed at the next meeting, so they cost no meeting of their own
        (ttt_triton's split forward does the same). CTAs take their (head, half) from the ticket in the order they
        start, so a CTA only ever waits on a CTA that has started or is the next to start."""
        if STATES:
            gl.static_assert(TMA and BSUM_MMA and not SAVE and not PAIR)
        if PAIR:
            gl.static_assert(TMA and BSUM_MMA)
        F: gl.constexpr = FS // (1 + PAIR)  # this CTA's hidden units (FS: the state's, W1's row stride)
        WG: gl.constexpr = num_warps // 4  # warpgroups: the [MB, F] / [MB, D] tiles' columns are split over them
        # wgmma accumulators: [MB, F] (each warpgroup F / WG columns), [MB, D], and [F, D] (rows over all warps)
        L_ZF: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, WG],
                                                       instr_shape=[16, F // WG, 16])
        L_ZD: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, WG],
                                                       instr_shape=[16, D // WG, 16])
        L_W2: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                       instr_shape=[16, D, 16])
        # row-wise work ([MB, D]: loads, LayerNorms): 8 lanes per row, so row sums stay inside a warp
        BL: gl.constexpr = gl.BlockedLayout([1, D // 8], [4, 8], [num_warps, 1], [1, 0])
        ROW: gl.constexpr = gl.SliceLayout(1, BL)
        COL: gl.constexpr = gl.SliceLayout(0, BL)
        COLF: gl.constexpr = gl.SliceLayout(0, L_ZF)
        S_XD: gl.constexpr = gl.NVMMASharedLayout.get_default_for([MB, D], gl.bfloat16)
        S_XF: gl.constexpr = gl.NVMMASharedLayout.get_default_for([MB, F], gl.bfloat16)
        S_W1: gl.constexpr = gl.NVMMASharedLayout.get_default_for([D, F], gl.bfloat16)
        S_W2: gl.constexpr = gl.NVMMASharedLayout.get_default_for([F, D], gl.bfloat16)
        S_W2F: gl.constexpr = gl.NVMMASharedLayout.get_default_for([F, D], gl.float32)
        S_VEC: gl.constexpr = gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1, order=[0])
        # b1's update (a column sum of P1 over the mini-batch's rows) as P1^T [1 0 .. 0]: a 16-column wgmma instead
        # of a cross-warp reduction of the [MB, F] tile (~600 instructions a warp)
        # E0 has 8 columns per warpgroup: b2's [D, E0W] accumulator splits its columns over the warpgroups, and a
        # wgmma instruction is at least 8 columns wide
        E0W: gl.constexpr = 8 * WG
        L_S1: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                       instr_shape=[16, E0W, 16])
        L_S2: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, WG],
                                                       instr_shape=[16, 8, 16])
        S_ONES: gl.constexpr = gl.NVMMASharedLayout.get_default_for([MB, E0W], gl.bfloat16)
        DT = Q.dtype.element_ty

        if PAIR:
            ticket = gl.atomic_add(CNT, 1)  # start order
            pid = ticket // 2
            half = ticket % 2
            pcnt = CNT + 32 + pid * 32  # the pair's counter, a 128-byte line of its own
        else:
            pid = gl.program_id(0)
            half = 0
        pid64 = pid.to(gl.int64)
        h = (pid + h0) % H  # h0: the launch's first head (mlp_forward_gluon's mix launches some of the heads)

        # k and q tiles; with TMA double-buffered (mini-batch i + 1's are copied while i runs) and v's tile too
        K_s2 = gl.allocate_shared_memory(DT, [1 + TMA, MB, D], S_XD)
        Q_s2 = gl.allocate_shared_memory(DT, [1 + TMA, MB, D], S_XD)
        if PAIR:
            O_s = gl.allocate_shared_memory(DT, [MB, D], S_XD)  # the output's staging tile (V_s holds v then)
        if TMA:
            V_s = gl.allocate_shared_memory(DT, [MB, D], S_XD)
            bars = gl.allocate_shared_memory(gl.int64, [3, 1], mbarrier.MBarrierLayout())  # k/q buffer 0, 1; v
            for j in gl.static_range(3):
                mbarrier.init(bars.index(j), count=1)
        P2_s = gl.allocate_shared_memory(DT, [MB, D], S_XD)
        A_s = gl.allocate_shared_memory(DT, [MB, F], S_XF)  # gelu(Z1), then P1, then gelu(q W1 + b1)
        if STATES:  # W1's copy kept transposed: the scratch slots' [F, D] layout, stored by TMA as it is
            W1T_s = gl.allocate_shared_memory(DT, [F, D], S_W2)
            W1B_s = W1T_s.permute((1, 0))
        else:
            W1B_s = gl.allocate_shared_memory(DT, [D, F], S_W1)
        W2B_s = gl.allocate_shared_memory(DT, [F, D], S_W2)
        W2F_s = gl.allocate_shared_memory(gl.float32, [F, D], S_W2F)
        B1_s = gl.allocate_shared_memory(gl.float32, [F], S_VEC)
        E0_s = gl.allocate_shared_memory(DT, [MB, E0W], S_ONES)  # column 0 ones, the rest zeros
        if BSUM_MMA:
            L_E0: gl.constexpr = gl.BlockedLayout([1, 8], [32 // WG, WG], [num_warps, 1], [1, 0])
            e0c = gl.arange(0, E0W, layout=gl.SliceLayout(0, L_E0))
            E0_s.store(gl.where(e0c[None, :] == 0, 1.0, 0.0).to(DT) + gl.zeros([MB, E0W], DT, L_E0))

        # the initial state
        src = pid64 * in_mul + in_add
        w1 = gl.load(W1_IN + src * D * FS + half * F + _w_offsets_strided(D, F, FS, L_ZF))
        w2 = gl.load(W2_IN + (src * FS + half * F) * D + _w_offsets(F, D, L_W2))
        W1B_s.store(w1.to(DT))
        W2F_s.store(w2)
        W2B_s.store(w2.to(DT))
        b1_in = gl.load(B1_IN + src * FS + half * F + gl.arange(0, F, layout=COLF))
        B1_s.store(b1_in)
        rows = gl.arange(0, MB, layout=ROW)
        dcol = gl.arange(0, D, layout=COL)
        b2 = gl.load(B2_IN + src * D + dcol)
        slot0 = pid * n_slots
        tile = rows[:, None] * D + dcol[None, :]
        tok = pid64 * N * D
        eta_base = pid64 * N
        fence_async_shared()
        _cta_barrier()
        if STATES:
            _store_slot(WTD_OUT, W2D_OUT, ST_B1, ST_B2, slot0, W1T_s, W2B_s, b1_in, b2, dcol, F, D)
        NXT: gl.constexpr = 1 if STATES else 2  # tiles copied ahead: k (and q, which the recompute does not read)
        tile_bytes: gl.constexpr = MB * D * K.dtype.element_ty.primitive_bitwidth // 8
        if TMA:
            mbarrier.expect(bars.index(mb0 % 2), NXT * tile_bytes)
            _tma_load(KD, [pid * N + mb0 * MB, 0], bars.index(mb0 % 2), K_s2.index(mb0 % 2))
            if not STATES:
                _tma_load(QD, [pid * N + mb0 * MB, 0], bars.index(mb0 % 2), Q_s2.index(mb0 % 2))

        for c in range(n_ck):
            if SAVE:
                ck = pid64 * ck_stride + c  # CK_*: the launch's first checkpoint (a launch over part of the scan)
                _store_state(CK_W1 + ck * D * FS + half * F, CK_B1 + ck * FS + half * F,
                             CK_W2 + (ck * FS + half * F) * D, CK_B2 + ck * D, w1, B1_s, W2F_s, b2, dcol, D, F, FS,
                             L_ZF, L_W2)
            i_end = gl.minimum(mb0 + c * G + G, n_mb)
            for i in range(mb0 + c * G, i_end):
                if TMA:
                    K_s = K_s2.index(i % 2)
                    Q_s = Q_s2.index(i % 2)
                    nb = (i + 1) % 2  # the next mini-batch's buffers: free since the previous iteration's last barrier
                    more = i + 1 < n_mb
                    mbarrier.expect(bars.index(nb), NXT * tile_bytes, pred=more)
                    _tma_load(KD, [pid * N + (i + 1) * MB, 0], bars.index(nb), K_s2.index(nb), pred=more)
                    if not STATES:
                        _tma_load(QD, [pid * N + (i + 1) * MB, 0], bars.index(nb), Q_s2.index(nb), pred=more)
                    tma.store_wait(0)  # the previous output's store has read V_s (its staging tile)
                    mbarrier.expect(bars.index(2), tile_bytes)
                    _tma_load(VD, [pid * N + i * MB, 0], bars.index(2), V_s)
                    e = gl.load(ETA + eta_base + i * MB + rows)
                    mbarrier.wait(bars.index(i % 2), ((i - mb0) // 2) % 2)
                    k = K_s.load(BL)
                    if not STATES:
                        q = Q_s.load(BL)
                else:
                    offs = tok + i * MB * D + tile
                    K_s = K_s2.index(0)
                    Q_s = Q_s2.index(0)
                    k = gl.load(K + offs)
                    q = gl.load(Q + offs)
                    K_s.store(k)
                    Q_s.store(q)
                    fence_async_shared()
                    _cta_barrier()
                # inner forward on the keys
                z1 = warpgroup_mma(K_s, W1B_s, gl.zeros([MB, F], gl.float32, L_ZF), use_acc=False)
                a, da = _gelu_and_grad(z1 + B1_s.load(COLF)[None, :])
                # gelu'(Z1) waits through Z2 and the LN in fp16 (16 registers, not 32; 2^-11 relative, below the
                # bf16 rounding P1 gets next)
                da = da.to(gl.float16)
                A_s.store(a.to(DT))
                fence_async_shared()
                _cta_barrier()
                z2 = warpgroup_mma(A_s, W2B_s, gl.zeros([MB, D], gl.float32, L_ZD), use_acc=False)
                # the LN parameters are re-read (L1 hits) rather than held through the scan: registers are short
                if PAIR:  # this half's partial sum out, the meeting, both halves' sums in (mini-batch parity buffers)
                    gamma = gl.load(LNW + h * D + dcol)[None, :]
                    beta = gl.load(LNB + h * D + dcol)[None, :]
                    xp = XCH + (pid64 * 4 + i % 2) * MB * D  # [BH, 2 halves, 2 parities, MB, D]
                    gl.store(xp + half * 2 * MB * D + _w_offsets(MB, D, L_ZD), z2)
                    max_spin = _pair_meet(pcnt, ERR, 2 * (i - mb0 + 1), max_spin)
                    z2 = gl.load(xp + tile) + gl.load(xp + 2 * MB * D + tile) + b2[None, :]
                    if i > mb0:  # the previous mini-batch's output (b2 is still its end state's)
                        _pair_output(OPART + (pid64 * 4 + (i - 1) % 2) * MB * D, Q + tok + (i - 1) * MB * D, O_s, OD,
                                     pid * N + (i - 1) * MB, b2, gamma, beta, tile, half == 0, eps, D, MB)
                else:
                    z2 = gl.convert_layout(z2, BL) + b2[None, :]
                    gamma = gl.load(LNW + h * D + dcol)[None, :]
                    beta = gl.load(LNB + h * D + dcol)[None, :]
                # LayerNorm target gradient: g = LN(z2) - (v - k), dl/dz2 through the LN
                xh, rstd = _ln_rows(z2, D, eps)
                if TMA:
                    mbarrier.wait(bars.index(2), (i - mb0) % 2)
                    v = V_s.load(BL)
                else:
                    v = gl.load(V + offs)
                    e = gl.load(ETA + eta_base + i * MB + rows)
                gx = (gamma * xh + beta - (v.to(gl.float32) - k.to(gl.float32))) * gamma
                s1 = gl.sum(gx, axis=1)
                s2 = gl.sum(gx * xh, axis=1)
                gz2 = rstd[:, None] * (gx - s1[:, None] / D - xh * (s2[:, None] / D))
                p2 = -e[:, None] * gz2
                if not BSUM_MMA:
                    b2 = b2 + gl.sum(p2, axis=0)
                P2_s.store(p2.to(DT))
                fence_async_shared()
                _cta_barrier()
                # P1 = (P2 W2^T) * gelu'(Z1), then W2 += A^T P2: one after the other, so that the W2 update's
                # accumulator is not live beside P2 W2^T and gelu'(Z1) (16 warps leave 128 registers a thread)
                if BSUM_MMA:  # with b2's update, P2^T [1 0 .. 0]
                    ga = warpgroup_mma(P2_s, W2B_s.permute((1, 0)), gl.zeros([MB, F], gl.float32, L_ZF),
                                       use_acc=False, is_async=True)
                    db2 = warpgroup_mma(P2_s.permute((1, 0)), E0_s, gl.zeros([D, E0W], gl.float32, L_S2),
                                        use_acc=False, is_async=True)
                    ga, db2 = warpgroup_mma_wait(num_outstanding=0, deps=(ga, db2))
                    b2 = b2 + gl.convert_layout(gl.sum(db2, axis=1), COL)
                else:
                    ga = warpgroup_mma(P2_s, W2B_s.permute((1, 0)), gl.zeros([MB, F], gl.float32, L_ZF),
                                       use_acc=False)
                ga = ga * da.to(gl.float32)
                if not BSUM_MMA:
                    b1 = B1_s.load(COLF) + gl.sum(ga, axis=0)
                p1 = ga.to(DT)
                w2 = warpgroup_mma(A_s.permute((1, 0)), P2_s, W2F_s.load(L_W2))
                if STATES:
                    tma.store_wait(0)  # the last slot's TMA stores have read W1's and W2's copies
                _cta_barrier()  # every warpgroup is done reading A_s, W2B_s, W2F_s and B1_s
                A_s.store(p1)
                W2F_s.store(w2)
                W2B_s.store(w2.to(DT))
                if not BSUM_MMA:
                    B1_s.store(b1)
                fence_async_shared()
                _cta_barrier()
                if BSUM_MMA:
                    w1 = warpgroup_mma(K_s.permute((1, 0)), A_s, w1, is_async=True)
                    db1 = warpgroup_mma(A_s.permute((1, 0)), E0_s, gl.zeros([F, E0W], gl.float32, L_S1),
                                        use_acc=False, is_async=True)
                    w1, db1 = warpgroup_mma_wait(num_outstanding=0, deps=(w1, db1))
                    b1n = B1_s.load(gl.SliceLayout(1, L_S1)) + gl.sum(db1, axis=1)  # columns 1.. are zeros
                    W1B_s.store(w1.to(DT))
                    _cta_barrier()  # every thread has read b1
                    B1_s.store(b1n)
                else:
                    w1 = warpgroup_mma(K_s.permute((1, 0)), A_s, w1)
                    W1B_s.store(w1.to(DT))
                fence_async_shared()
                _cta_barrier()  # W1B_s and b1 complete; every warpgroup is done reading A_s (P1)
                if STATES:  # the state after mini-batch i: slot i - mb0 + 1
                    _store_slot(WTD_OUT, W2D_OUT, ST_B1, ST_B2, slot0 + i - mb0 + 1, W1T_s, W2B_s,
                                B1_s.load(gl.SliceLayout(1, L_S1)), b2, dcol, F, D)
                if not STATES:  # the output with the updated state
                    zq1 = warpgroup_mma(Q_s, W1B_s, gl.zeros([MB, F], gl.float32, L_ZF), use_acc=False)
                    A_s.store(_gelu(zq1 + B1_s.load(COLF)[None, :]).to(DT))
                    fence_async_shared()
                    _cta_barrier()
                    zq2 = warpgroup_mma(A_s, W2B_s, gl.zeros([MB, D], gl.float32, L_ZD), use_acc=False)
                    if PAIR:  # summed with the other half's at the next meeting
                        gl.store(OPART + (pid64 * 4 + half * 2 + i % 2) * MB * D + _w_offsets(MB, D, L_ZD), zq2)
                        fence_async_shared()
                        _cta_barrier()  # A_s, K_s, Q_s are rewritten by the next mini-batch
                    else:
                        xq, rq = _ln_rows(gl.convert_layout(zq2, BL) + b2[None, :], D, eps)
                        out = (q.to(gl.float32) + gamma * xq + beta).to(DT)
                        if TMA:
                            V_s.store(out)  # v's tile is free: the output leaves through it (a TMA store, no addresses)
                        else:
                            gl.store(OUT + offs, out)
                        fence_async_shared()  # the TMA (async proxy) reads V_s / overwrites the tiles read here
                        _cta_barrier()  # A_s, K_s, Q_s are rewritten by the next mini-batch
                        if TMA:
                            _tma_store(OD, [pid * N + i * MB, 0], V_s)
        if PAIR:  # a last meeting for the last mini-batch's output
            max_spin = _pair_meet(pcnt, ERR, 2 * (n_mb - mb0 + 1), max_spin)
            tma.store_wait(0)  # O_s is free
            _pair_output(OPART + (pid64 * 4 + (n_mb - 1) % 2) * MB * D, Q + tok + (n_mb - 1) * MB * D, O_s, OD,
                         pid * N + (n_mb - 1) * MB, b2, gl.load(LNW + h * D + dcol)[None, :],
                         gl.load(LNB + h * D + dcol)[None, :], tile, half == 0, eps, D, MB)
        if TMA:
            tma.store_wait(0)
        if not STATES:
            _store_state(W1_OUT + pid64 * D * FS + half * F, B1_OUT + pid64 * FS + half * F,
                         W2_OUT + (pid64 * FS + half * F) * D, B2_OUT + pid64 * D, w1, B1_s, W2F_s, b2, dcol, D, F, FS,
                         L_ZF, L_W2)


    @gluon.jit
    def _top_rows(t):
        """Rows 16 w + [0, 8) of a [64, C] wgmma-layout tensor, as [4, 8, C] (w = the warp). In the accumulator
        layout every thread holds row 16 w + r and row 16 w + 8 + r: this keeps the first of the two."""
        C: gl.constexpr = t.shape[1]
        top, bottom = gl.split(gl.permute(gl.reshape(t, [4, 2, 8, C]), (0, 2, 3, 1)))
        return top

    @gluon.jit
    def _k_row_eta(ETA, base, ok, like):
        """eta of the k rows as _top_rows keeps them ([4, 8]: warps 0, 1 hold tokens 8 w + [0, 8), laid out as the
        row sums of ``like``), zero on the q rows' warps and where not ``ok``."""
        L: gl.constexpr = gl.SliceLayout(2, like.type.layout)
        w = gl.arange(0, 4, layout=gl.SliceLayout(1, L))[:, None]
        r = gl.arange(0, 8, layout=gl.SliceLayout(0, L))[None, :]
        return gl.load(ETA + base + (w % 2) * 8 + r, mask=(w < 2) & (r < 8) & ok, other=0.0)

    @gluon.jit
    def _store_top_rows(buf, top):
        """Store a [4, 8, C] tensor (_top_rows) into rows 16 w + [0, 8) of a [64, C] tile, leaving the others."""
        C: gl.constexpr = buf.shape[1]
        S3: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=3)
        _reinterpret(buf, buf.dtype, [4, 16, C], S3).slice(0, 8, dim=1).store(top)

    @gluon.jit
    def _row_sum(a):
        """Row sums of a [4, 8, 64] tensor as _top_rows gives it (a thread holds 16 columns of a row, the row over 4
        lanes). A reduction adds a thread's values one after another (16 dependent adds); summing columns 8 j + c
        over j first gives each thread two independent chains of 8 (its two c) to interleave."""
        s = gl.sum(gl.sum(gl.reshape(a, [a.shape[0], a.shape[1], 8, a.shape[2] // 8]), axis=2), axis=2)
        # the same distribution as a row sum of a itself (a conversion without data movement)
        return gl.convert_layout(s, gl.SliceLayout(2, a.type.layout), assert_trivial=True)

    @gluon.jit
    def _row_sums(a, b):
        """_row_sum of a and of b in one shuffle tree."""
        S: gl.constexpr = [a.shape[0], a.shape[1], 8, a.shape[2] // 8]
        sa, sb = gl.reduce(gl.reduce((gl.reshape(a, S), gl.reshape(b, S)), 2, _add2), 2, _add2)
        L: gl.constexpr = gl.SliceLayout(2, a.type.layout)
        return gl.convert_layout(sa, L, assert_trivial=True), gl.convert_layout(sb, L, assert_trivial=True)

    @gluon.jit
    def _linear_ln_top_rows(z, x, v, gamma, beta, e, eps, D: gl.constexpr):
        """The TTT-Linear forward's LayerNorm work on [4, 8, D] row tiles as _top_rows gives them (a row over 4
        lanes): returns the output x + LN(z) (used for the q rows) and -eta dl/dz (zero where e is: the q rows)."""
        zc = z - (_row_sum(z) / D)[:, :, None]
        rstd = gl.rsqrt(_row_sum(zc * zc) / D + eps)
        xh = zc * rstd[:, :, None]
        y = gamma * xh + beta
        gx = (y - (v - x)) * gamma
        s1, s2 = _row_sums(gx, gx * xh)
        p = (-e * rstd)[:, :, None] * (gx - s1[:, :, None] / D - xh * (s2[:, :, None] / D))
        return x + y, p

    @gluon.jit
    def _rows_boxes(buf, half: gl.constexpr):
        """Rows [32 half, 32 half + 32) of a [64, D] tile as the [2, 16, D] box of a 3-d row descriptor (see
        _row_box_descriptor): rows [0, 8) and [16, 24) of the part are a mini-batch's 16 rows, the rest zeros."""
        D: gl.constexpr = buf.shape[1]
        S3: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=3)
        return _reinterpret(buf, buf.dtype, [2, 2, 16, D], S3).index(half)

    @gluon.jit
    def _linear_load_tiles(KD, QD, VD, X_s, V_s, bars, j, row0, n_mb, NB: gl.constexpr, MB: gl.constexpr):
        """Mini-batch j's row tiles into buffer j % NB (for 0 <= j <= n_mb), in _ttt_linear_fwd_smem_kernel's row
        map: k_j and v_j into rows [0, 8) and [16, 24), q_{j-1} into rows [32, 40) and [48, 56); one TMA box each,
        whose out-of-bounds rows fill the rows between with zeros. The first and last iterations have no q_{-1} /
        k_{n_mb}: they load the sequence's own q_0 / k, v_{n_mb - 1} instead (their results go nowhere: the first
        output is not stored and the last k rows have eta 0), so every phase expects the same bytes (one arrive)."""
        bar = bars.index(j % NB)
        box: gl.constexpr = 32 * X_s.shape[2] * X_s.dtype.primitive_bitwidth // 8  # zero-filled rows count too
        ok = j <= n_mb
        kv_row = (row0 + gl.minimum(j, n_mb - 1) * MB) // 8
        q_row = (row0 + gl.maximum(j - 1, 0) * MB) // 8
        mbarrier.expect(bar, 3 * box, pred=ok)
        _tma_load(KD, [kv_row, 0, 0], bar, _rows_boxes(X_s.index(j % NB), 0), pred=ok)
        _tma_load(VD, [kv_row, 0, 0], bar, _rows_boxes(V_s.index(j % NB), 0), pred=ok)
        _tma_load(QD, [q_row, 0, 0], bar, _rows_boxes(X_s.index(j % NB), 1), pred=ok)

    @gluon.jit
    def _ttt_linear_fwd_smem_kernel(
        KD, QD, VD, OD, ETA, LNW, LNB,
        W1_IN, B1_IN, W1_OUT, B1_OUT, CK_W1, CK_B1,
        N, H, n_mb, G, eps,
        D: gl.constexpr, MB: gl.constexpr, SAVE: gl.constexpr, num_warps: gl.constexpr,
    ):
        """TTT-Linear forward at mini-batch 16, one 4-warp CTA (a warpgroup) per (sequence, head). W (fp32) lives
        in the wgmma accumulator registers, its bf16 copy, the row tiles and -eta dl/dZ in shared memory; k, q, v
        arrive by TMA one mini-batch ahead and the output leaves by TMA.

        Mini-batch i's inner forward and mini-batch i - 1's output share one [64, 64] x [64, 64] wgmma (rows
        [k_i; q_{i-1}], the Triton pipe kernel's pairing, padded to the 64 rows a wgmma takes). The rows are placed
        so that every thread's first accumulator row (row 16 w + r of warp w; its second is 16 w + 8 + r) holds
        data and its second is padding: k_i's rows 0-7 and 8-15 at tile rows [0, 8) and [16, 24), q_{i-1}'s at
        [32, 40) and [48, 56). Keeping the first half of the accumulator's registers (_top_rows) then leaves each
        thread one row x 16 columns, a row over 4 lanes, with no data movement: the LayerNorm work runs on the 16
        values that hold data instead of the padded tile's 32 a thread (session 14's layout), with no trip through
        shared memory (session 16's first try). TMA moves each row tile as one [2, 16, D] box
        (_row_box_descriptor) whose out-of-bounds rows zero-fill the padding, and P and the output go to shared memory
        as the 16 values a thread holds (_store_top_rows)."""
        gl.static_assert(num_warps == 4)
        gl.static_assert(D == 64)  # W's [D, D] tile shares the row tiles' 64-row layout
        gl.static_assert(MB == 16)  # the row map above
        R: gl.constexpr = 64
        K2: gl.constexpr = 32  # rows [0, 32): the k rows with the padding between them (the update's depth)
        NB: gl.constexpr = 2  # row-tile buffers
        L_Z: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, D, 16])
        ROW: gl.constexpr = gl.SliceLayout(1, L_Z)
        COL: gl.constexpr = gl.SliceLayout(0, L_Z)
        S_T: gl.constexpr = gl.NVMMASharedLayout.get_default_for([R, D], gl.bfloat16)
        S_E: gl.constexpr = gl.NVMMASharedLayout.get_default_for([R, K2], gl.bfloat16)
        DT: gl.constexpr = KD.dtype

        pid = gl.program_id(0)
        pid64 = pid.to(gl.int64)
        h = pid % H
        row0 = pid * N  # this sequence's first row in the [B H N, D] views

        X_s = gl.allocate_shared_memory(DT, [NB, R, D], S_T)  # [k_i; q_{i-1}] in the row map, zeros elsewhere
        V_s = gl.allocate_shared_memory(DT, [NB, R, D], S_T)  # v_i in the k rows' places, zeros elsewhere
        O_s = gl.allocate_shared_memory(DT, [R, D], S_T)  # the output in the q rows' places
        P_s = gl.allocate_shared_memory(DT, [R, D], S_T)  # -eta dl/dZ in the k rows' places, zeros elsewhere
        W_s = gl.allocate_shared_memory(DT, [D, D], S_T)  # W in bf16: the next inner forward's operand
        ONES_s = gl.allocate_shared_memory(DT, [R, K2], S_E)  # b's update as 1 P: every row gets the column sums
        bars = gl.allocate_shared_memory(gl.int64, [NB, 1], mbarrier.MBarrierLayout())  # one per row-tile buffer
        for j in gl.static_range(NB):
            mbarrier.init(bars.index(j), count=1)

        rows = gl.arange(0, R, layout=ROW)
        cols = gl.arange(0, D, layout=COL)
        zero_t = gl.zeros([R, D], DT, L_Z)
        for j in gl.static_range(NB):
            X_s.index(j).store(zero_t)
            V_s.index(j).store(zero_t)
        P_s.store(zero_t)
        ONES_s.store(gl.full([R, K2], 1.0, DT, gl.BlockedLayout([1, 8], [32, 1], [4, 1], [1, 0])))
        w = gl.load(W1_IN + pid64 * D * D + rows[:, None] * D + cols[None, :])
        # b is carried as a [R, D] accumulator whose every row is b: it is then the inner forward's accumulator
        # start and its update (1 P, ones times P) a wgmma, with no layout change from rows to columns
        bfull = gl.zeros([R, D], gl.float32, L_Z) + gl.load(B1_IN + pid64 * D + cols)[None, :]
        row_0 = (rows == 0)[:, None]
        b_offs = rows[:, None] * 0 + cols[None, :]
        W_s.store(w.to(DT))
        zf = gl.zeros([R, D], gl.float32, L_Z)
        gamma = _top_rows(zf + gl.load(LNW + h * D + cols)[None, :])
        beta = _top_rows(zf + gl.load(LNB + h * D + cols)[None, :])
        e = _k_row_eta(ETA, pid64 * N, True, gamma)
        fence_async_shared()
        _cta_barrier()
        _linear_load_tiles(KD, QD, VD, X_s, V_s, bars, 0, row0, n_mb, NB, MB)

        # iteration i learns mini-batch i (i < n_mb) and finishes mini-batch i - 1's output (i > 0)
        for i in range(n_mb + 1):
            if SAVE:
                if (i % G == 0) & (i < n_mb):
                    ck = pid64 * ((n_mb + G - 1) // G) + i // G
                    gl.store(CK_W1 + ck * D * D + rows[:, None] * D + cols[None, :], w)
                    gl.store(CK_B1 + ck * D + b_offs, bfull, mask=row_0)
            Xb = X_s.index(i % NB)
            Vb = V_s.index(i % NB)
            mbarrier.wait(bars.index(i % NB), (i // NB) % 2)
            z = warpgroup_mma(Xb, W_s, bfull, is_async=True)
            # while it runs: the next tiles into the other buffer (its readers finished before the last barrier),
            # the next eta, and this mini-batch's rows in the row layout
            _linear_load_tiles(KD, QD, VD, X_s, V_s, bars, i + 1, row0, n_mb, NB, MB)
            e_next = _k_row_eta(ETA, pid64 * N + (i + 1) * MB, i + 1 < n_mb, gamma)
            x_t, v_t = _top_rows(Xb.load(L_Z).to(gl.float32)), _top_rows(Vb.load(L_Z).to(gl.float32))
            z = warpgroup_mma_wait(num_outstanding=0, deps=(z,))
            out, p = _linear_ln_top_rows(_top_rows(z), x_t, v_t, gamma, beta, e, eps, D)
            tma.store_wait(0)  # the last output has left O_s
            # out and P as the 16 values a thread holds (the tiles' padding rows stay the zeros they start as)
            _store_top_rows(O_s, out.to(DT))
            _store_top_rows(P_s, p.to(DT))
            fence_async_shared()
            _cta_barrier()
            if i > 0:
                _tma_store(OD, [(row0 + (i - 1) * MB) // 8, 0, 0], _rows_boxes(O_s, 1))
            # W += k^T P, b += 1 P (the k rows and the zero rows between them: depth 32)
            w = warpgroup_mma(Xb.slice(0, K2).permute((1, 0)), P_s.slice(0, K2), w, is_async=True)
            bfull = warpgroup_mma(ONES_s, P_s.slice(0, K2), bfull, is_async=True)
            w, bfull = warpgroup_mma_wait(num_outstanding=0, deps=(w, bfull))
            W_s.store(w.to(DT))
            fence_async_shared()
            _cta_barrier()
            e = e_next
        tma.store_wait(0)
        gl.store(W1_OUT + pid64 * D * D + rows[:, None] * D + cols[None, :], w)
        gl.store(B1_OUT + pid64 * D + b_offs, bfull, mask=row_0)


    @gluon.jit
    def _add3(a0, a1, a2, b0, b1, b2):
        return a0 + b0, a1 + b1, a2 + b2

    @gluon.jit
    def _gelu_d12(z):
        """gelu_tanh'(z) and gelu_tanh''(z) (ttt_triton._gelu_parts without the value)."""
        z2 = z * z
        du = gl.fma(z2, _GELU_3CA, _GELU_C)
        t = _tanh(z * gl.fma(z2, _GELU_CA, _GELU_C))
        s = gl.fma(-t, t, 1.0)
        h = 0.5 * z
        g1 = gl.fma(h * s, du, gl.fma(0.5, t, 0.5))
        g2 = s * gl.fma(h, gl.fma(-2.0 * t * du, du, 2.0 * _GELU_3CA * z), du)
        return g1, g2

    @gluon.jit
    def _half_cols(L_ZH: gl.constexpr, h: gl.constexpr):
        """Columns [128 h, 128 h + 128) of F in the [MB, 128] half-tile layout."""
        return h * 128 + gl.arange(0, 128, layout=gl.SliceLayout(0, L_ZH))

    @gluon.jit
    def _zq1_half(Q_s, WTe, AA_s, B1P, h: gl.constexpr, MB: gl.constexpr, L_ZH: gl.constexpr, DT: gl.constexpr):
        """Half h of the output's inner forward at W': gelu(q W1' + b1') into AA; returns gelu' (fp16)."""
        z = warpgroup_mma(Q_s, WTe.slice(h * 128, 128, dim=0).permute((1, 0)), gl.zeros([MB, 128], gl.float32, L_ZH),
                          use_acc=False)
        a, ga = _gelu_and_grad(z + gl.load(B1P + _half_cols(L_ZH, h))[None, :])
        AA_s.slice(h * 128, 128, dim=1).store(a.to(DT))
        return ga.to(gl.float16)

    @gluon.jit
    def _dzq1_half(T_s, W2e, gq1, h: gl.constexpr, MB: gl.constexpr, L_ZH: gl.constexpr, DT: gl.constexpr):
        """Half h of dL/dzq1 = (dL/dzq2 W2'^T) gelu'(zq1), in the operand type."""
        g = warpgroup_mma(T_s, W2e.slice(h * 128, 128, dim=0).permute((1, 0)), gl.zeros([MB, 128], gl.float32, L_ZH),
                          use_acc=False)
        return (g * gq1.to(gl.float32)).to(DT)

    @gluon.jit
    def _z1_half(K_s, WTs, AA_s, Z1_s, B1P, h: gl.constexpr, MB: gl.constexpr, L_ZH: gl.constexpr,
                 DT: gl.constexpr):
        """Half h of the keys' inner forward at W: gelu(Z1) into AA (operand type), Z1 into Z1_s (fp16)."""
        z = warpgroup_mma(K_s, WTs.slice(h * 128, 128, dim=0).permute((1, 0)), gl.zeros([MB, 128], gl.float32, L_ZH),
                          use_acc=False)
        z = z + gl.load(B1P + _half_cols(L_ZH, h))[None, :]
        AA_s.slice(h * 128, 128, dim=1).store(_gelu(z).to(DT))
        Z1_s.slice(h * 128, 128, dim=1).store(z.to(gl.float16))

    @gluon.jit
    def _m1_half(GZ_s, K_s, W2s, WTe, Z1_s, BB_s, GB1_s, ETA_ROWS, h: gl.constexpr, MB: gl.constexpr,
                 L_ZH: gl.constexpr, DT: gl.constexpr):
        """Half h of the inner gradient's backward pieces: gA = dl/dZ2 W2^T, m1 = k dL/dW1 + dL/db1 (dL/dP1 = -m1),
        gelu' / gelu'' of Z1. Writes m1 gelu'(Z1) into BB over Z1's half (each thread rewrites the 16-bit elements
        it read); returns -eta m1 gA gelu''(Z1) and gelu'(Z1) (fp16) and the rows' sums of m1 gA gelu'(Z1)."""
        gA = warpgroup_mma(GZ_s, W2s.slice(h * 128, 128, dim=0).permute((1, 0)), gl.zeros([MB, 128], gl.float32, L_ZH),
                           use_acc=False, is_async=True)
        m1 = warpgroup_mma(K_s, WTe.slice(h * 128, 128, dim=0).permute((1, 0)), gl.zeros([MB, 128], gl.float32, L_ZH),
                           use_acc=False, is_async=True)
        gA, m1 = warpgroup_mma_wait(num_outstanding=0, deps=(gA, m1))
        m1 = m1 + GB1_s.slice(h * 128, 128).load(gl.SliceLayout(0, L_ZH))[None, :]
        gp, gp2 = _gelu_d12(Z1_s.slice(h * 128, 128, dim=1).load(L_ZH).to(gl.float32))
        mg = m1 * gA
        e = gl.load(ETA_ROWS + gl.arange(0, MB, layout=gl.SliceLayout(1, L_ZH)))
        t1 = (-e[:, None] * mg * gp2).to(gl.float16)  # dL/dZ1 through gelu'(Z1) in P1
        de1 = gl.sum(mg * gp, axis=1)
        BB_s.slice(h * 128, 128, dim=1).store((m1 * gp).to(DT))
        return t1, gp.to(gl.float16), de1

    @gluon.jit
    def _dz1_half(DZ_s, GZ_s, W2s, W2e, t1, gp, h: gl.constexpr, MB: gl.constexpr, L_ZH: gl.constexpr,
                  DT: gl.constexpr):
        """Half h of dL/dZ1 = t1 + dL/dA gelu'(Z1), dL/dA = dL/dZ2 W2^T - P2 dL/dW2^T (GZ holds -P2), in the operand
        type; and -P1 = (-P2 W2^T) gelu'(Z1)."""
        W2sh = W2s.slice(h * 128, 128, dim=0).permute((1, 0))
        dA = warpgroup_mma(DZ_s, W2sh, gl.zeros([MB, 128], gl.float32, L_ZH), use_acc=False, is_async=True)
        dA = warpgroup_mma(GZ_s, W2e.slice(h * 128, 128, dim=0).permute((1, 0)), dA, is_async=True)
        np1 = warpgroup_mma(GZ_s, W2sh, gl.zeros([MB, 128], gl.float32, L_ZH), use_acc=False, is_async=True)
        dA, np1 = warpgroup_mma_wait(num_outstanding=0, deps=(dA, np1))
        gpf = gp.to(gl.float32)
        return (t1.to(gl.float32) + dA * gpf).to(DT), (np1 * gpf).to(DT)

    @gluon.jit
    def _bwd_out_issue(QD, WTD, W2D, WT_b, W2_b, Q_b, bar, item, ok, cnt, n_slots, N, mb0, F: gl.constexpr,
                       MB: gl.constexpr):
        """The TMA copies of item (head bh, mini-batch j of the group) of _ttt_mlp_bwd_out_kernel: its end state W'
        (W1'^T and W2', slot j + 1) and its q tile."""
        bh = item // cnt
        j = item % cnt
        slot = bh * n_slots + j + 1
        w_bytes: gl.constexpr = WT_b.shape[0] * WT_b.shape[1] * WT_b.dtype.primitive_bitwidth // 8
        tile_bytes: gl.constexpr = Q_b.shape[0] * Q_b.shape[1] * Q_b.dtype.primitive_bitwidth // 8
        mbarrier.expect(bar, 2 * w_bytes + tile_bytes, pred=ok)
        _tma_load(WTD, [slot * F, 0], bar, WT_b, pred=ok)
        _tma_load(W2D, [slot * F, 0], bar, W2_b, pred=ok)
        _tma_load(QD, [bh * N + (mb0 + j) * MB, 0], bar, Q_b, pred=ok)

    @gluon.jit
    def _ttt_mlp_bwd_out_kernel(
        QD, WTD, W2D, C1D, C2D, DOUT, ST_B1, ST_B2, LNW,
        C1, C2, CB1, CVEC, DQ,
        N, H, mb0, cnt, n_slots, n_items, eps,
        D: gl.constexpr, F: gl.constexpr, MB: gl.constexpr, TMA_C: gl.constexpr, num_warps: gl.constexpr,
    ):
        """The output path of the TTT-MLP backward for the (sequence, head, mini-batch) items of a checkpoint group,
        all of them at once: it needs the mini-batch's end state W' (slot j + 1) and dL/dout, not the gradient that
        the scan carries, so it leaves the sequential kernel. Per mini-batch j: dq, and the terms that dL/dW' gains
        from the output: C1 = q^T dL/dzq1 [D, F], C2 = gelu(zq1)^T dL/dzq2 [F, D] (bf16 or fp32, the host's choice),
        CB1 = colsum dL/dzq1 and CVEC = (colsum dL/dzq2, colsum dout * LN(zq2), colsum dout) (fp32); scratch rows
        [BH, G, ...].

        A CTA takes items pid, pid + P, ... (P = the grid): with a grid of one CTA an SM (the 255 registers a thread
        leave room for one) the next item's W' and q arrive by TMA while the current one runs. TMA_C (bf16 terms):
        C2 and C1 leave by TMA from the tiles that held W2' and W1'^T, each read for the last time by then (stores
        from the wgmma layouts throttled the load/store unit: session 17's profile)."""
        gl.static_assert(num_warps == 8)
        L_ZH: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 2], instr_shape=[16, 64, 16])
        L_ZF: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 2],
                                                       instr_shape=[16, F // 2, 16])
        L_ZD: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 2],
                                                       instr_shape=[16, D // 2, 16])
        L_W2: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                       instr_shape=[16, D, 16])
        BL: gl.constexpr = gl.BlockedLayout([1, D // 8], [4, 8], [num_warps, 1], [1, 0])
        COL: gl.constexpr = gl.SliceLayout(0, BL)
        L_S1: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                       instr_shape=[16, 8, 16])
        S_XD: gl.constexpr = gl.NVMMASharedLayout.get_default_for([MB, D], gl.bfloat16)
        S_XF: gl.constexpr = gl.NVMMASharedLayout.get_default_for([MB, F], gl.bfloat16)
        S_FD: gl.constexpr = gl.NVMMASharedLayout.get_default_for([F, D], gl.bfloat16)
        S_DF: gl.constexpr = gl.NVMMASharedLayout.get_default_for([D, F], gl.bfloat16)
        S_ONES: gl.constexpr = gl.NVMMASharedLayout.get_default_for([MB, 8], gl.bfloat16)
        DT: gl.constexpr = QD.dtype

        pid = gl.program_id(0)
        n_prog = gl.num_programs(0)
        WT_s = gl.allocate_shared_memory(DT, [2, F, D], S_FD)
        W2_s = gl.allocate_shared_memory(DT, [2, F, D], S_FD)
        Q_s = gl.allocate_shared_memory(DT, [2, MB, D], S_XD)
        T_s = gl.allocate_shared_memory(DT, [MB, D], S_XD)
        AA_s = gl.allocate_shared_memory(DT, [MB, F], S_XF)
        E0_s = gl.allocate_shared_memory(DT, [MB, 8], S_ONES)
        bars = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        for b in gl.static_range(2):
            mbarrier.init(bars.index(b), count=1)
        L_E0: gl.constexpr = gl.BlockedLayout([1, 8], [32, 1], [num_warps, 1], [1, 0])
        e0c = gl.arange(0, 8, layout=gl.SliceLayout(0, L_E0))
        E0_s.store(gl.where(e0c[None, :] == 0, 1.0, 0.0).to(DT) + gl.zeros([MB, 8], DT, L_E0))
        fence_async_shared()
        _cta_barrier()
        _bwd_out_issue(QD, WTD, W2D, WT_s.index(0), W2_s.index(0), Q_s.index(0), bars.index(0), pid, pid < n_items,
                       cnt, n_slots, N, mb0, F, MB)
        rows = gl.arange(0, MB, layout=gl.SliceLayout(1, BL))
        dcol = gl.arange(0, D, layout=COL)
        it = 0
        for item in range(pid, n_items, n_prog):
            buf = it % 2
            if TMA_C:
                tma.store_wait(0)  # the last item's C1 / C2 stores have read the buffers copied into next
            _bwd_out_issue(QD, WTD, W2D, WT_s.index(1 - buf), W2_s.index(1 - buf), Q_s.index(1 - buf),
                           bars.index(1 - buf), item + n_prog, item + n_prog < n_items, cnt, n_slots, N, mb0, F, MB)
            WT_b = WT_s.index(buf)
            W2_b = W2_s.index(buf)
            Q_b = Q_s.index(buf)
            bh = item // cnt
            j = item % cnt
            i = mb0 + j
            h = bh % H
            slot = bh * n_slots + j + 1  # the end state W'
            out_row = (bh * cnt + j).to(gl.int64)  # this mini-batch's scratch row
            tok = (bh.to(gl.int64) * N + i * MB) * D
            do = gl.load(DOUT + tok + rows[:, None] * D + dcol[None, :]).to(gl.float32)
            mbarrier.wait(bars.index(buf), (it // 2) % 2)

            gq1_0 = _zq1_half(Q_b, WT_b, AA_s, ST_B1 + slot * F, 0, MB, L_ZH, DT)
            gq1_1 = _zq1_half(Q_b, WT_b, AA_s, ST_B1 + slot * F, 1, MB, L_ZH, DT)
            fence_async_shared()
            _cta_barrier()
            zq2 = warpgroup_mma(AA_s, W2_b, gl.zeros([MB, D], gl.float32, L_ZD), use_acc=False)
            zq2 = gl.convert_layout(zq2, BL) + gl.load(ST_B2 + slot * D + dcol)[None, :]
            xq, rq = _ln_rows(zq2, D, eps)
            gxo = do * gl.load(LNW + h * D + dcol)[None, :]
            s1, s2 = gl.reduce((gxo, gxo * xq), 1, _add2)
            dzq2 = rq[:, None] * (gxo - s1[:, None] / D - xq * (s2[:, None] / D))
            gl.store(CVEC + out_row * 3 * D + dcol, gl.sum(dzq2, axis=0))
            gl.store(CVEC + out_row * 3 * D + D + dcol, gl.sum(do * xq, axis=0))
            gl.store(CVEC + out_row * 3 * D + 2 * D + dcol, gl.sum(do, axis=0))
            T_s.store(dzq2.to(DT))
            fence_async_shared()
            _cta_barrier()
            c2 = warpgroup_mma(AA_s.permute((1, 0)), T_s, gl.zeros([F, D], gl.float32, L_W2), use_acc=False,
                               is_async=True)
            dzq1_0 = _dzq1_half(T_s, W2_b, gq1_0, 0, MB, L_ZH, DT)
            dzq1_1 = _dzq1_half(T_s, W2_b, gq1_1, 1, MB, L_ZH, DT)
            c2 = warpgroup_mma_wait(num_outstanding=0, deps=(c2,))
            if not TMA_C:
                gl.store(C2 + out_row * F * D + _w_offsets(F, D, L_W2), c2.to(C2.dtype.element_ty))
            _cta_barrier()  # every read of gelu(zq1) and of W2' is done
            AA_s.slice(0, 128, dim=1).store(dzq1_0)
            AA_s.slice(128, 128, dim=1).store(dzq1_1)
            if TMA_C:
                W2_b.store(c2.to(DT))
            fence_async_shared()
            _cta_barrier()
            if TMA_C:
                _tma_store(C2D, [(bh * cnt + j) * F, 0], W2_b)  # (32-bit coordinates: rows < 2^31, host-checked)
            dq = warpgroup_mma(AA_s, WT_b, gl.zeros([MB, D], gl.float32, L_ZD), use_acc=False, is_async=True)
            db1 = warpgroup_mma(AA_s.permute((1, 0)), E0_s, gl.zeros([F, 8], gl.float32, L_S1), use_acc=False,
                                is_async=True)
            dq, db1 = warpgroup_mma_wait(num_outstanding=0, deps=(dq, db1))
            rz = gl.arange(0, MB, layout=gl.SliceLayout(1, L_ZD))
            cz = gl.arange(0, D, layout=gl.SliceLayout(0, L_ZD))
            dq = dq + gl.load(DOUT + tok + rz[:, None] * D + cz[None, :]).to(gl.float32)
            gl.store(DQ + tok + rz[:, None] * D + cz[None, :], dq.to(DT))
            gl.store(CB1 + out_row * F + gl.arange(0, F, layout=gl.SliceLayout(1, L_S1)), gl.sum(db1, axis=1))
            c1 = warpgroup_mma(Q_b.permute((1, 0)), AA_s, gl.zeros([D, F], gl.float32, L_ZF), use_acc=False)
            if TMA_C:
                _cta_barrier()  # every warpgroup's dq has read W1'^T
                C1_b = _reinterpret(WT_b, DT, [D, F], S_DF)
                C1_b.store(c1.to(DT))
                fence_async_shared()
                _cta_barrier()
                for cc in gl.static_range(F // 64):
                    _tma_store(C1D, [(bh * cnt + j) * D, cc * 64], C1_b.slice(cc * 64, 64, dim=1))
            else:
                gl.store(C1 + out_row * D * F + _w_offsets(D, F, L_ZF), c1.to(C1.dtype.element_ty))
            it += 1
        if TMA_C:
            tma.store_wait(0)

    @gluon.jit
    def _prefetch_l2(P, n_bytes: gl.constexpr, num_warps: gl.constexpr):
        """Ask L2 for n_bytes from P (128-byte lines, no registers held): data that a later load in the scan needs
        and that has left L2 since it was written (the output-path terms, written a kernel earlier)."""
        L_P: gl.constexpr = gl.BlockedLayout([1], [32], [num_warps], [0])
        line = gl.arange(0, n_bytes // 128, layout=L_P) * (128 // (P.dtype.element_ty.primitive_bitwidth // 8))
        gl.inline_asm_elementwise("prefetch.global.L2 [$1]; mov.u32 $0, 0;", "=r,l", [P + line], dtype=gl.int32,
                                  is_pure=False, pack=1)

    @gluon.jit
    def _gw_merge(GWP, CP, a1, b1, a2, b2, MMA: gl.constexpr, TWO: gl.constexpr, W1: gl.constexpr, ADD_C, COPY,
                  F: gl.constexpr, D: gl.constexpr, L_ZD: gl.constexpr, DT: gl.constexpr, HINT: gl.constexpr,
                  FS: gl.constexpr):
        """A gradient accumulator in global memory (fp32; L2-resident) += a1^T b1 (+ a2^T b2) (with MMA) + the next
        mini-batch's output-path term C (where ADD_C), 64 hidden units at a time so that only a [64, 64]
        accumulator is live; COPY (an [F, D] shared buffer) receives the result in bf16 (dL/dW1 transposed), the next
        mini-batch's operand. W1: dL/dW1 [D, F], a = [MB, D] tiles, b = [MB, F]; else dL/dW2 [F, D], a = [MB, F],
        b = [MB, D]. HINT: the accumulator's lines marked evict-last in L2 and the terms' (read once) evict-first,
        so that other kernels' streams (the overlapped backward's) do not push the accumulator out to HBM. F: the
        hidden units merged (this CTA's), FS: the state's (dL/dW1's row stride)."""
        GW_EV: gl.constexpr = "evict_last" if HINT else ""
        C_EV: gl.constexpr = "evict_first" if HINT else ""
        r = gl.arange(0, 64, layout=gl.SliceLayout(1, L_ZD))
        c = gl.arange(0, D, layout=gl.SliceLayout(0, L_ZD))
        if W1:  # chunk ch: columns [64 ch, 64 ch + 64) of [D, F]
            offs = r[:, None] * FS + c[None, :]
            step: gl.constexpr = 64
        else:  # rows [64 ch, 64 ch + 64) of [F, D]
            offs = r[:, None] * D + c[None, :]
            step: gl.constexpr = 64 * D
        nxt = gl.load(GWP + offs, eviction_policy=GW_EV)
        nc = gl.load(CP + offs, mask=(offs >= 0) & ADD_C, other=0.0, eviction_policy=C_EV).to(gl.float32)
        for ch in gl.static_range(F // 64):
            acc = nxt
            cadd = nc
            if ch + 1 < F // 64:
                nxt = gl.load(GWP + (ch + 1) * step + offs, eviction_policy=GW_EV)
                nc = gl.load(CP + (ch + 1) * step + offs, mask=(offs >= 0) & ADD_C, other=0.0,
                             eviction_policy=C_EV).to(gl.float32)
            if MMA:
                if W1:
                    acc = warpgroup_mma(a1.permute((1, 0)), b1.slice(ch * 64, 64, dim=1), acc, is_async=True)
                    if TWO:
                        acc = warpgroup_mma(a2.permute((1, 0)), b2.slice(ch * 64, 64, dim=1), acc, is_async=True)
                else:
                    acc = warpgroup_mma(a1.slice(ch * 64, 64, dim=1).permute((1, 0)), b1, acc, is_async=True)
                    if TWO:
                        acc = warpgroup_mma(a2.slice(ch * 64, 64, dim=1).permute((1, 0)), b2, acc, is_async=True)
                acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
            acc = acc + cadd
            gl.store(GWP + ch * step + offs, acc, eviction_policy=GW_EV)
            if W1:
                COPY.slice(ch * 64, 64, dim=0).permute((1, 0)).store(acc.to(DT))
            else:
                COPY.slice(ch * 64, 64, dim=0).store(acc.to(DT))

    @gluon.jit
    def _ttt_mlp_bwd_smem_kernel(
        KD, WTD, W2D, V, ETA, LNW, LNB, ST_B1, ST_B2,
        C1, C2, CB1, CVEC,
        GW1, GB1, GW2, GVEC,
        DK, DV, DETA,
        XCH, CNT, ERR,
        N, H, mb0, cnt, n_slots, eps, max_spin,
        D: gl.constexpr, F: gl.constexpr, MB: gl.constexpr, num_warps: gl.constexpr, GW_HINT: gl.constexpr = False,
        PAIR: gl.constexpr = False,
    ):
        """The sequential part of the TTT-MLP backward for one checkpoint group (mini-batches mb0 .. mb0 + cnt - 1,
        in reverse), one 8-warp CTA per (sequence, head), after the STATES forward (the state at each mini-batch's
        start in the scratch slots: W1^T and W2 in bf16 as [F, D] tiles, WTD / W2D; b1 / b2 in fp32, ST_B1 / ST_B2)
        and _ttt_mlp_bwd_out_kernel (the output path's terms C1 / C2 / CB1 / CVEC and dq). The gradient
        accumulators (fp32, per head: GW1 [D, F], GB1 [F], GW2 [F, D], GVEC [3, D] = dL/db2, dL/d(LN weight),
        dL/d(LN bias)) hold dL/d(state after the group) on entry and are advanced to the group's start. dL/dW1 and
        dL/dW2 (64 KB each) stay in global memory (L2), updated 64 hidden units at a time, once per mini-batch:
        the update through mini-batch j's inner step and mini-batch j - 1's output term in one pass, which also
        writes their bf16 copies, the operands of mini-batch j - 1.

        Per mini-batch j (W = its start state; dL/dW' = the gradient at its end state with its output's terms):
        the keys' inner forward at W, the inner loss's gradient, and the gradients through W' = W - (its update)
        into dL/dW, dk, dv, deta. The two slot buffers alternate: one holds W, the other dL/dW' in bf16; at the end
        the first takes dL/dW (for j - 1) and the second mini-batch j - 1's W. The [MB, F] element-wise work runs in
        column halves (whole tiles spilled); the [MB, F] / [MB, D] tiles rotate over their buffers from one
        mini-batch to the next (loop-invariant operand addresses are hoisted out of the loop by the compiler, a
        64-bit wgmma descriptor per k-step, and held through the scan they spilled).

        PAIR: two CTAs a head (the forward's pairing: a start-order ticket, _pair_meet), each with half the hidden
        units (its rows of the slots, by TMA boxes of F / 2 rows; its columns of dL/dW1 and rows of dL/dW2; one
        column half of the element-wise work). The sums over the hidden units meet twice a mini-batch through XCH:
        Z2's partial sums, then dL/dP2's, the gradient's W2 term's and deta's row sums; both CTAs add them in the same
        order and so run the same [MB, D] work (GVEC: a copy a half). dk's partial sums go out at the end of a
        mini-batch and are added at the next meeting (a last one after the loop); half 0 stores dk, dv and deta."""
        gl.static_assert(num_warps == 8)
        gl.static_assert(F == 256)
        FL: gl.constexpr = F // (1 + PAIR)  # this CTA's hidden units (PAIR: the half of the slots' rows it loads)
        NH: gl.constexpr = FL // 128  # column halves of the [MB, FL] element-wise work
        L_ZH: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 2], instr_shape=[16, 64, 16])
        L_ZD: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 2],
                                                       instr_shape=[16, D // 2, 16])
        BL: gl.constexpr = gl.BlockedLayout([1, D // 8], [4, 8], [num_warps, 1], [1, 0])
        ROW: gl.constexpr = gl.SliceLayout(1, BL)
        COL: gl.constexpr = gl.SliceLayout(0, BL)
        S_XD: gl.constexpr = gl.NVMMASharedLayout.get_default_for([MB, D], gl.bfloat16)
        S_XF: gl.constexpr = gl.NVMMASharedLayout.get_default_for([MB, FL], gl.bfloat16)
        S_FD: gl.constexpr = gl.NVMMASharedLayout.get_default_for([FL, D], gl.bfloat16)
        S_VEC: gl.constexpr = gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1, order=[0])
        # dL/db1's column sums as [F, MB] x [MB, 8] wgmmas against a ones column (8 columns: the narrowest wgmma)
        L_S1: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                       instr_shape=[16, 8, 16])
        COL1: gl.constexpr = gl.SliceLayout(1, L_S1)
        S_ONES: gl.constexpr = gl.NVMMASharedLayout.get_default_for([MB, 8], gl.bfloat16)
        DT: gl.constexpr = KD.dtype
        tile_bytes: gl.constexpr = MB * D * DT.primitive_bitwidth // 8
        w_bytes: gl.constexpr = FL * D * DT.primitive_bitwidth // 8

        if PAIR:  # _ttt_mlp_fwd_smem_kernel's pairing: a start-order ticket, then a counter a pair
            ticket = gl.atomic_add(CNT, 1)
            pid = ticket // 2
            half = ticket % 2
            pcnt = CNT + 32 + pid * 32
            XS: gl.constexpr = 5 * MB * D  # a half's exchange slots: Z2, dk, dL/dP2, gacc partial sums; de1 (MB)
            xb = XCH + pid.to(gl.int64) * 2 * XS  # half h's slots at + h XS
            zd_offs = _w_offsets(MB, D, L_ZD)
        else:
            pid = gl.program_id(0)
            half = 0
        hc = half * FL  # this CTA's first hidden unit
        pid64 = pid.to(gl.int64)
        h = pid % H
        slot0 = pid * n_slots  # this head's first scratch slot
        crow0 = pid64 * cnt  # this head's first output-term row

        WT_s = gl.allocate_shared_memory(DT, [2, FL, D], S_FD)  # W1^T of a slot / dL/dW1'^T in bf16
        W2_s = gl.allocate_shared_memory(DT, [2, FL, D], S_FD)  # W2 of a slot / dL/dW2' in bf16
        # [MB, F] tiles: AA = gelu(Z1), dL/dZ1; BB = Z1 (fp16), m1 gelu'(Z1), -P1. [MB, D]: k; dl/dZ2, then
        # -P2 = -eta dl/dZ2; dL/dZ2. Rotating roles (AA / BB by the slot parity, the three [MB, D] by jj % 3).
        XY_s = gl.allocate_shared_memory(DT, [2, MB, FL], S_XF)
        Z3_s = gl.allocate_shared_memory(DT, [3, MB, D], S_XD)
        E0_s = gl.allocate_shared_memory(DT, [MB, 8], S_ONES)
        GB1_s = gl.allocate_shared_memory(gl.float32, [FL], S_VEC)
        bars = gl.allocate_shared_memory(gl.int64, [3, 1], mbarrier.MBarrierLayout())  # slot buffers 0, 1; k
        for nb in gl.static_range(3):
            mbarrier.init(bars.index(nb), count=1)

        L_E0: gl.constexpr = gl.BlockedLayout([1, 8], [32, 1], [num_warps, 1], [1, 0])
        e0c = gl.arange(0, 8, layout=gl.SliceLayout(0, L_E0))
        E0_s.store(gl.where(e0c[None, :] == 0, 1.0, 0.0).to(DT) + gl.zeros([MB, 8], DT, L_E0))
        fcol1 = hc + gl.arange(0, FL, layout=COL1)
        GB1_s.store(gl.load(GB1 + pid64 * F + fcol1) + gl.load(CB1 + (crow0 + cnt - 1) * F + fcol1))
        gw1p = GW1 + pid64 * D * F + hc
        gw2p = GW2 + (pid64 * F + hc) * D
        # dL/db2, dL/d(LN weight), dL/d(LN bias): read and written in place (per head: no other CTA touches them),
        # a CTA barrier between every thread's read and any thread's write
        gvec = GVEC + (pid64 * (1 + PAIR) + half) * 3 * D  # PAIR: a copy a half (both hold the same values)
        # the last mini-batch's start state and k; the gradient's bf16 copies with its output term
        Eb = cnt % 2
        mbarrier.expect(bars.index(1 - Eb), 2 * w_bytes)
        _tma_load(WTD, [(slot0 + cnt - 1) * F + hc, 0], bars.index(1 - Eb), WT_s.index(1 - Eb))
        _tma_load(W2D, [(slot0 + cnt - 1) * F + hc, 0], bars.index(1 - Eb), W2_s.index(1 - Eb))
        mbarrier.expect(bars.index(2), tile_bytes)
        _tma_load(KD, [pid * N + (mb0 + cnt - 1) * MB, 0], bars.index(2), Z3_s.index(0))
        # before the first mini-batch only its output term is added (MMA off: the operand tiles passed are unused)
        c1p = C1 + (crow0 + cnt - 1) * D * F + hc
        c2p = C2 + ((crow0 + cnt - 1) * F + hc) * D
        _gw_merge(gw1p, c1p, Z3_s.index(0), XY_s.index(0), Z3_s.index(0), XY_s.index(0), False, False, True, True,
                  WT_s.index(Eb), FL, D, L_ZD, DT, GW_HINT, F)
        _gw_merge(gw2p, c2p, XY_s.index(0), Z3_s.index(0), XY_s.index(0), Z3_s.index(0), False, False, False, True,
                  W2_s.index(Eb), FL, D, L_ZD, DT, GW_HINT, F)
        fence_async_shared()
        _cta_barrier()

        for jj in range(cnt):
            j = cnt - 1 - jj
            i = mb0 + j
            E = (j + 1) % 2  # buffer of dL/dW' in bf16
            S = j % 2  # buffer of the start state W
            WTe = WT_s.index(E)
            W2e = W2_s.index(E)
            WTs = WT_s.index(S)
            W2s = W2_s.index(S)
            AA_s = XY_s.index(E)
            BB_s = XY_s.index(S)
            Z1_s = _reinterpret(BB_s, gl.float16, [MB, FL], S_XF)
            K_s = Z3_s.index(jj % 3)
            GZ_s = Z3_s.index((jj + 1) % 3)
            DZ_s = Z3_s.index((jj + 2) % 3)
            tok = (pid64 * N + i * MB) * D
            rows = gl.arange(0, MB, layout=ROW)
            dcol = gl.arange(0, D, layout=COL)
            tile = rows[:, None] * D + dcol[None, :]
            if j > 0:  # mini-batch j - 1's output-path terms, merged into the gradient at the end of this one
                _prefetch_l2(C1 + (crow0 + j - 1) * D * F, D * F * C1.dtype.element_ty.primitive_bitwidth // 8, num_warps)
                _prefetch_l2(C2 + (crow0 + j - 1) * F * D, F * D * C2.dtype.element_ty.primitive_bitwidth // 8, num_warps)
            mbarrier.wait(bars.index(2), jj % 2)
            mbarrier.wait(bars.index(S), (jj // 2) % 2)

            for hh in gl.static_range(NH):
                _z1_half(K_s, WTs, AA_s, Z1_s, ST_B1 + (slot0 + j) * F + hc, hh, MB, L_ZH, DT)
            fence_async_shared()
            _cta_barrier()
            z2 = warpgroup_mma(AA_s, W2s, gl.zeros([MB, D], gl.float32, L_ZD), use_acc=False)
            if PAIR:  # meeting 2 jj + 1: the Z2 partial sums; the dk partial sums of the mini-batch before (j + 1)
                gl.store(xb + half * XS + zd_offs, z2)
                max_spin = _pair_meet(pcnt, ERR, 2 * (2 * jj + 1), max_spin)
                z2 = gl.load(xb + tile) + gl.load(xb + XS + tile)
                dkf = gl.load(xb + MB * D + tile) + gl.load(xb + XS + MB * D + tile)
                gl.store(DK + tok + MB * D + tile, dkf.to(DT), mask=(tile >= 0) & (half == 0) & (jj > 0))
            else:
                z2 = gl.convert_layout(z2, BL)
            z2 = z2 + gl.load(ST_B2 + (slot0 + j) * D + dcol)[None, :]
            gamma = gl.load(LNW + h * D + dcol)[None, :]
            beta = gl.load(LNB + h * D + dcol)[None, :]
            y = gl.load(V + tok + tile).to(gl.float32) - K_s.load(BL).to(gl.float32)  # the target v - k
            xh, rstd = _ln_rows(z2, D, eps)
            gx = (gamma * xh + beta - y) * gamma
            s1, s2 = gl.reduce((gx, gx * xh), 1, _add2)
            gz2 = rstd[:, None] * (gx - s1[:, None] / D - xh * (s2[:, None] / D))
            GZ_s.store(gz2.to(DT))
            fence_async_shared()
            _cta_barrier()
            eta_rows = ETA + pid64 * N + i * MB
            t1_0, gp_0, de1 = _m1_half(GZ_s, K_s, W2s, WTe, Z1_s, BB_s, GB1_s, eta_rows, 0, MB, L_ZH, DT)
            if not PAIR:
                t1_1, gp_1, de1_1 = _m1_half(GZ_s, K_s, W2s, WTe, Z1_s, BB_s, GB1_s, eta_rows, 1, MB, L_ZH, DT)
                de1 = de1 + de1_1
            fence_async_shared()
            _cta_barrier()
            dp2 = warpgroup_mma(AA_s, W2e, gl.zeros([MB, D], gl.float32, L_ZD), use_acc=False, is_async=True)
            gacc = warpgroup_mma(BB_s, W2s, gl.zeros([MB, D], gl.float32, L_ZD), use_acc=False, is_async=True)
            dp2, gacc = warpgroup_mma_wait(num_outstanding=0, deps=(dp2, gacc))
            e = gl.load(eta_rows + rows)
            # dL/db2 at the end state: the later mini-batches' and this one's output term
            gb2 = gl.load(gvec + dcol) + gl.load(CVEC + (crow0 + j) * 3 * D + dcol)
            if PAIR:  # meeting 2 jj + 2: the partial sums over the hidden units of dL/dP2, gacc and de1
                gl.store(xb + half * XS + 2 * MB * D + zd_offs, dp2)
                gl.store(xb + half * XS + 3 * MB * D + zd_offs, gacc)
                gl.store(xb + half * XS + 4 * MB * D + gl.arange(0, MB, layout=de1.type.layout), de1)
                max_spin = _pair_meet(pcnt, ERR, 2 * (2 * jj + 2), max_spin)
                dp2 = gl.load(xb + 2 * MB * D + tile) + gl.load(xb + XS + 2 * MB * D + tile)
                gacc = gl.load(xb + 3 * MB * D + tile) + gl.load(xb + XS + 3 * MB * D + tile)
                de1 = gl.load(xb + 4 * MB * D + rows) + gl.load(xb + XS + 4 * MB * D + rows)
            else:
                dp2 = gl.convert_layout(dp2, BL)
                gacc = gl.convert_layout(gacc, BL)
                de1 = gl.convert_layout(de1, ROW)
            dp2 = -(dp2 + gb2[None, :])  # dL/dP2
            de = gl.sum(dp2 * gz2, axis=1) - de1
            gl.store(DETA + pid64 * N + i * MB + rows, de, mask=(rows >= 0) & (half == 0))
            gG = e[:, None] * (dp2 - gacc)  # dL/d(dl/dZ2)
            # LN double backward (ttt_triton._ln_double_bwd)
            sG, sGx, s2 = gl.reduce((gG, gG * xh, gx * xh), 1, _add3)
            dgx = rstd[:, None] * (gG - sG[:, None] / D - xh * (sGx[:, None] / D))
            dxh = -rstd[:, None] * (gG * (s2[:, None] / D) + gx * (sGx[:, None] / D))
            dr = gl.sum(gG * gz2, axis=1) / rstd
            dg = dgx * gamma
            gl.store(DV + tok + tile, (-dg).to(DT), mask=(tile >= 0) & (half == 0))
            glnw = gl.load(gvec + D + dcol) + gl.sum(dgx * (gamma * xh + beta - y) + dg * xh, axis=0)
            glnb = gl.load(gvec + 2 * D + dcol) + gl.sum(dg, axis=0)
            dxh = dxh + dg * gamma
            sdx, sdxx = gl.reduce((dxh, dxh * xh), 1, _add2)
            drt = dr + sdxx / rstd
            dz2 = rstd[:, None] * (dxh - sdx[:, None] / D) - (drt * rstd * rstd / D)[:, None] * xh
            gb2 = gb2 + gl.sum(dz2, axis=0)
            DZ_s.store(dz2.to(DT))
            GZ_s.store((-e[:, None] * gz2).to(DT))  # -P2 (every read of dl/dZ2 was waited above)
            fence_async_shared()
            _cta_barrier()
            gl.store(gvec + dcol, gb2)
            gl.store(gvec + D + dcol, glnw)
            gl.store(gvec + 2 * D + dcol, glnb)
            dz1_0, np1_0 = _dz1_half(DZ_s, GZ_s, W2s, W2e, t1_0, gp_0, 0, MB, L_ZH, DT)
            if not PAIR:
                dz1_1, np1_1 = _dz1_half(DZ_s, GZ_s, W2s, W2e, t1_1, gp_1, 1, MB, L_ZH, DT)
            _cta_barrier()  # every read of W2 (gacc, dL/dA, -P1) is done: its buffer takes dL/dW2 for j - 1
            more = j > 0
            # dL/dW2 += (-eta m1 gelu'(Z1))^T dl/dZ2 + gelu(Z1)^T dL/dZ2 = (m1 gelu'(Z1))^T (-P2) + A^T dL/dZ2, and
            # mini-batch j - 1's output term
            _gw_merge(gw2p, C2 + ((crow0 + j - 1) * F + hc) * D, BB_s, GZ_s, AA_s, DZ_s, True, True, False, more, W2s,
                      FL, D, L_ZD, DT, GW_HINT, F)
            _cta_barrier()  # every read of gelu(Z1) and of BB is done
            AA_s.slice(0, 128, dim=1).store(dz1_0)
            BB_s.slice(0, 128, dim=1).store(np1_0)
            if not PAIR:
                AA_s.slice(128, 128, dim=1).store(dz1_1)
                BB_s.slice(128, 128, dim=1).store(np1_1)
            fence_async_shared()
            _cta_barrier()
            rz = gl.arange(0, MB, layout=gl.SliceLayout(1, L_ZD))
            cz = gl.arange(0, D, layout=gl.SliceLayout(0, L_ZD))
            dg_acc = gl.convert_layout(dg, L_ZD)
            if PAIR:  # dL/dk's partial sums, added at the next meeting (dg in half 0's)
                dg_acc = dg_acc * (half == 0).to(gl.float32)
            dk = warpgroup_mma(AA_s, WTs, dg_acc, is_async=True)
            dk = warpgroup_mma(BB_s, WTe, dk, is_async=True)
            db1 = warpgroup_mma(AA_s.permute((1, 0)), E0_s, gl.zeros([FL, 8], gl.float32, L_S1), use_acc=False,
                                is_async=True)
            dk, db1 = warpgroup_mma_wait(num_outstanding=0, deps=(dk, db1))
            if PAIR:
                gl.store(xb + half * XS + MB * D + zd_offs, dk)
            else:
                gl.store(DK + tok + rz[:, None] * D + cz[None, :], dk.to(DT))
            gb1 = GB1_s.load(COL1) + gl.sum(db1, axis=1) + gl.load(CB1 + (crow0 + j - 1) * F + fcol1,
                                                                    mask=(fcol1 >= 0) & more, other=0.0)
            _cta_barrier()  # every read of W1 and of dL/dW1' (dk) and of dL/db1 is done
            GB1_s.store(gb1)
            if more:  # the next mini-batch's start state into dL/dW1''s buffer, its k into this one's dl/dZ2 tile
                mbarrier.expect(bars.index(E), 2 * w_bytes)
                _tma_load(WTD, [(slot0 + j - 1) * F + hc, 0], bars.index(E), WTe)
                _tma_load(W2D, [(slot0 + j - 1) * F + hc, 0], bars.index(E), W2e)
                mbarrier.expect(bars.index(2), tile_bytes)
                _tma_load(KD, [pid * N + (i - 1) * MB, 0], bars.index(2), GZ_s)
            # dL/dW1 += k^T dL/dZ1, and mini-batch j - 1's output term
            _gw_merge(gw1p, C1 + (crow0 + j - 1) * D * F + hc, K_s, AA_s, K_s, AA_s, True, False, True, more, WTs,
                      FL, D, L_ZD, DT, GW_HINT, F)
            fence_async_shared()
            _cta_barrier()
        gl.store(GB1 + pid64 * F + fcol1, GB1_s.load(COL1))
        if PAIR:  # a last meeting for the first mini-batch's dL/dk
            max_spin = _pair_meet(pcnt, ERR, 2 * (2 * cnt + 1), max_spin)
            rows = gl.arange(0, MB, layout=ROW)
            tile = rows[:, None] * D + gl.arange(0, D, layout=COL)[None, :]
            dkf = gl.load(xb + MB * D + tile) + gl.load(xb + XS + MB * D + tile)
            gl.store(DK + (pid64 * N + mb0 * MB) * D + tile, dkf.to(DT), mask=(tile >= 0) & (half == 0))


def tma_rows_fit(shape) -> bool:
    """TMA coordinates are 32-bit: the [B H N, D] row views must have fewer than 2^31 rows."""
    B, H, N = shape[:3]
    return B * H * N < 2**31


def _gluon_device(q: torch.Tensor) -> bool:
    return (HAVE_GLUON and q.device.type == "cuda" and q.dtype in (torch.bfloat16, torch.float16)
            and tma_rows_fit(q.shape))


def gluon_supports(q: torch.Tensor, D: int, F: int, mb: int) -> bool:
    """Whether the Gluon forward runs this call: Gluon present, a Hopper GPU, bf16/fp16, the written-for shape."""
    if not _gluon_device(q):
        return False
    return (D, F, mb) in GLUON_SHAPES and torch.cuda.get_device_capability(q.device)[0] == 9


def _tile_descriptor(t: torch.Tensor, mb: int) -> "TensorDescriptor":
    """A TMA descriptor over [B, H, N, D] (contiguous) as [B H N, D] rows, [mb, D] tiles."""
    D = t.shape[-1]
    layout = gl.NVMMASharedLayout.get_default_for([mb, D], gl.float16)  # 16-bit: the same for bf16
    return TensorDescriptor(t, [t.numel() // D, D], [D, 1], [mb, D], layout)


def _row_box_descriptor(t: torch.Tensor) -> "TensorDescriptor":
    """A TMA descriptor over [B, H, N, D] (contiguous) as [B H N / 8, 8, D], [2, 16, D] boxes: a 16-row mini-batch
    lands in rows [0, 8) and [16, 24) of a 32-row tile, the box's out-of-bounds rows [8, 16) zero-filled on loads
    and skipped on stores (_ttt_linear_fwd_smem_kernel's row map)."""
    D = t.shape[-1]
    layout = gl.NVMMASharedLayout.get_default_for([2, 16, D], gl.float16)  # 16-bit: the same for bf16
    return TensorDescriptor(t, [t.numel() // (8 * D), 8, D], [8 * D, D, 1], [2, 16, D], layout)


def pair_heads(BH: int, dev: torch.device, mode: int, sms: int = 0) -> bool:
    """Whether the forward runs two CTAs a head (the kernel's PAIR): mode 0 never, 2 always (tests, benchmarks),
    1 where every CTA gets an SM of its own (one CTA an SM: the kernel's ~140 KB of shared memory), i.e. where one
    CTA a head would leave SMs idle; with more heads the pairs would run in two rounds (sms: the SM count to plan
    for, 0 the GPU's)."""
    if mode != 1:
        return bool(mode)
    return 2 * BH <= (sms or torch.cuda.get_device_properties(dev).multi_processor_count)


PAIR_LAUNCHES = 0  # forward launches with two CTAs a head (tests check that a call took this path)
MIX_CALLS = 0  # forward calls run as mix_schedule's rotation
PLAN_SMS = 0  # the SM count the forward's pair / mix rules plan for (0: the GPU's; tests set a few: mixed at 2 heads)


def mix_schedule(BH: int, sms: int, n_mb: int, G: int, ratio: float, max_groups: int = 4):
    """Where one CTA a head leaves SMs idle but two would not fit (SMs / 2 < BH < SMs: the one-launch table's 96
    heads, the DiT's B = 2 launches), the forward spends the free SMs on pairing some of the heads and rotates which:
    the heads are cut into P contiguous groups and the scan into P phases; in phase c the m groups j with
    (c - j) mod P < m run paired (two CTAs a head, 2 x their heads in CTAs), the others one CTA a head, and a paired
    phase covers ``ratio`` (one CTA a head's time a mini-batch over the paired one's) times the mini-batches of an
    unpaired one, so every group's phases take about the same time and at most SMs CTAs want an SM at once.

    Each group runs paired m phases of P, so a scan takes P / (m ratio + P - m) of one CTA a head's time; P (at most
    ``max_groups``: a stream a group, and CUDA gives 8 hardware queues, CUDA_DEVICE_MAX_CONNECTIONS, so more streams
    share queues and a launch waiting on its stream holds back the next stream's) and m (m x the largest group <=
    SMs - BH) minimise that. At 96 heads on 132 SMs: P = 3 groups of 32 heads, m = 1, 0.888 x, ~10 us a mini-batch
    against 11.2 (session 20's rates: 8.13 us paired, 11.23 one CTA a head, each the same beside the other as
    alone). Phase boundaries are multiples of G (the checkpoints' positions); a group's phases of one kind in a row
    are one launch, empty ones none.
    Returns [(first head, end head, [(first mini-batch, end mini-batch, paired), ...]), ...] or None."""
    free = sms - BH
    if free <= 0 or 2 * BH <= sms or n_mb < 2 * G:
        return None
    best = None
    for P in range(2, min(max_groups, BH) + 1):
        m = free // -(-BH // P)
        if m >= 1 and (best is None or P / (m * ratio + P - m) < best[0] - 1e-9):
            best = (P / (m * ratio + P - m), P, m)
    if best is None:
        return None
    _, P, m = best
    unit = n_mb / (m * ratio + P - m)  # the mini-batches of an unpaired phase
    plan = []
    for j in range(P):
        segs, pos, ideal = [], 0, 0.0
        for c in range(P):
            paired = (c - j) % P < m
            ideal += unit * (ratio if paired else 1.0)
            end = n_mb if c == P - 1 else min(n_mb, G * round(ideal / G))
            if end > pos and segs and segs[-1][2] == paired:  # phases of one kind in a row: one launch
                segs[-1] = (segs[-1][0], end, paired)
            elif end > pos:
                segs.append((pos, end, paired))
            pos = max(pos, end)
        plan.append((BH * j // P, BH * (j + 1) // P, segs))
    return plan


_MIX_STREAMS: dict = {}


def _mix_streams(dev: torch.device, n: int) -> list:
    idx = dev.index if dev.index is not None else torch.cuda.current_device()
    have = _MIX_STREAMS.setdefault(idx, [])
    while len(have) < n:
        have.append(torch.cuda.Stream(device=idx))
    return have[:n]


def _forward_launch(args, state_in, lo, hi, s, e, paired, err, mb, G, n_ck, save, num_warps, tma, bsum_mma):
    """One launch of the forward kernel over heads [lo, hi) (rows of the [B H, ...] views in ``args``) and mini-batches
    [s, e) of their scans, from ``state_in``'s rows (the initial state, or the final-state buffers that the group's
    previous launch wrote: each CTA reads its own part of a head's state before it writes it)."""
    q, k, v, eta, out, finals, cks, ln_w, ln_b, H = args
    g, (W1, b1, W2, b2) = hi - lo, (t[lo:hi] for t in state_in)
    D, F, N = q.shape[-1], W1.shape[-1], q.shape[1]
    q, k, v, eta, out = (t[lo:hi] for t in (q, k, v, eta, out))
    if paired:
        f32 = dict(device=q.device, dtype=torch.float32)
        xch, opart = torch.empty(g * 4 * mb * D, **f32), torch.empty(g * 4 * mb * D, **f32)
        cnt = torch.zeros(32 * (g + 1), device=q.device, dtype=torch.int32)  # the ticket, then a line a pair
    else:
        xch = opart = b1
        cnt = err = torch.empty(1, device=q.device, dtype=torch.int32)  # (not read)
    cks = [c[lo:hi, s // G:] for c in cks] if save else [c[lo:hi] for c in cks]
    _ttt_mlp_fwd_smem_kernel[(2 * g if paired else g,)](
        q, k, v, *(_tile_descriptor(t, mb) for t in (q, k, v, out, q, q)), eta, ln_w, ln_b, W1, b1, W2, b2, out,
        *(t[lo:hi] for t in finals), *cks, b1, b1,  # (the two descriptors after out's and these: the recompute's)
        xch, opart, cnt, err,
        N, H, e, -(-(e - s) // G), G, LN_EPS, s, 1, 0, 0, ttt_triton._SPLIT_MAX_SPIN, lo, n_ck,
        D=D, FS=F, MB=mb, SAVE=save, TMA=tma, BSUM_MMA=bsum_mma, STATES=False, num_warps=num_warps, PAIR=paired,
    )


def mlp_forward_gluon(q, k, v, eta, state, ln_w, ln_b, out, finals, cks, mb, G, save, num_warps=8, tma=True,
                      bsum_mma=True, pair=0, mix=0):
    """Launch the Gluon forward: fills ``out``, ``finals`` (row-major) and, if ``save``, the row-major checkpoints.
    pair: pair_heads' mode (two CTAs a head where heads leave SMs idle); mix (with pair 1, where pairing every head
    does not fit): mix_schedule's ratio in per cent (0: one CTA a head there), its groups' launches each on a side
    stream of its own, joined before this returns."""
    B, H, N, D = q.shape
    BH = B * H
    n_mb = N // mb
    n_ck = -(-n_mb // G)
    global LAUNCHES, PAIR_LAUNCHES, MIX_CALLS
    LAUNCHES += 1
    sms = PLAN_SMS or torch.cuda.get_device_properties(q.device).multi_processor_count
    paired = pair_heads(BH, q.device, pair, sms)
    plan = mix_schedule(BH, sms, n_mb, G, mix / 100) if pair == 1 and mix and not paired else None
    err, err_mirror = ttt_triton._stall_flag(q.device)
    args = (q.view(BH, N, D), k.view(BH, N, D), v.view(BH, N, D), eta.view(BH, N), out.view(BH, N, D), finals, cks,
            ln_w, ln_b, H)
    opts = (err, mb, G, n_ck, save, num_warps, tma, bsum_mma)
    if plan is None:
        _forward_launch(args, state, 0, BH, 0, n_mb, paired, *opts)
        PAIR_LAUNCHES += paired
    else:
        MIX_CALLS += 1
        caller = torch.cuda.current_stream(q.device)
        start = caller.record_event()
        streams = _mix_streams(q.device, len(plan))
        for stream in streams:
            stream.wait_event(start)
        # issued in the order they should start (streams that share a hardware queue then wait on each other least)
        ratio, launches = mix / 100, []
        for g, (lo, hi, segs) in enumerate(plan):
            t = 0.0
            for n, (s, e, p) in enumerate(segs):
                launches.append((t, g, n, lo, hi, s, e, p))
                t += (e - s) / (ratio if p else 1.0)
        try:
            for _, g, n, lo, hi, s, e, p in sorted(launches):
                with torch.cuda.stream(streams[g]):
                    _forward_launch(args, finals if n else state, lo, hi, s, e, p, *opts)
                PAIR_LAUNCHES += p
        finally:  # also when a launch raises (ttt_triton's fallback then writes the buffers after the queued ones)
            for stream in streams:
                caller.wait_stream(stream)
    if paired or plan is not None:
        ttt_triton._after_split_launch(err, err_mirror, _PAIR_STALL)
    return out, finals, cks, 0


_PAIR_STALL = ("ttt_mlp gluon: a paired kernel's CTA waited for its partner past the poll budget (its results are "
               "wrong); turn pairing off: KERNEL_CONFIG['mlp_fwd']['pair'] = KERNEL_CONFIG['mlp_bwd']['pair'] = 0, or "
               "the environment variable TTT_VIDEO_KERNEL_CONFIG='mlp_fwd:pair=0;mlp_bwd:pair=0'")


LINEAR_GLUON_MB = {16}  # mini-batches the Gluon Linear forward is written for (2 mini-batches in a 64-row tile)
LINEAR_LAUNCHES = 0


def linear_gluon_supports(q: torch.Tensor, D: int, mb: int) -> bool:
    """Whether the Gluon TTT-Linear forward runs this call (as gluon_supports, at D 64 and mini-batch 16)."""
    if not _gluon_device(q):
        return False
    return D == 64 and mb in LINEAR_GLUON_MB and torch.cuda.get_device_capability(q.device)[0] == 9


def linear_forward_gluon(q, k, v, eta, state, ln_w, ln_b, out, finals, cks, mb, G, save):
    """Launch the Gluon TTT-Linear forward: fills ``out``, ``finals`` and, if ``save``, the checkpoints."""
    global LINEAR_LAUNCHES
    W1, b1 = state
    B, H, N, D = q.shape
    LINEAR_LAUNCHES += 1
    _ttt_linear_fwd_smem_kernel[(B * H,)](
        *(_row_box_descriptor(t) for t in (k, q, v, out)), eta, ln_w, ln_b, W1, b1, *finals, *cks,
        N, H, N // mb, G, LN_EPS, D=D, MB=mb, SAVE=save, num_warps=4,
    )
    return out, finals, cks


BWD_LAUNCHES = 0  # Gluon backward calls so far (tests check that a call took this path)


_SEQ_STREAMS: dict = {}  # device index -> the high-priority stream of the overlapped backward's sequential kernels


def _seq_stream(dev: torch.device) -> "torch.cuda.Stream":
    idx = dev.index if dev.index is not None else torch.cuda.current_device()
    if idx not in _SEQ_STREAMS:
        # above the default stream's 0 (lower is higher): the block scheduler gives its CTAs the SMs that free up
        _SEQ_STREAMS[idx] = torch.cuda.Stream(device=idx, priority=-1)
    return _SEQ_STREAMS[idx]


def mlp_backward_gluon(q, k, v, eta, lnw, lnb, dout, cks, ends, mb, G, grads, dstate, dlnw, dlnb,
                       parts=("states", "out", "backward"), out_persist=1, out_tma_c=True, overlap=False,
                       gw_hint=False, group_mul=1, pair=0):
    """The Gluon TTT-MLP backward. Per backward group (group_mul checkpoint groups), last first: the STATES forward (the state at the start of
    each of its mini-batches into scratch slots), _ttt_mlp_bwd_out_kernel (every mini-batch's output path at once:
    dq and the terms dL/dW' gains from the output) and _ttt_mlp_bwd_smem_kernel (the sequential part). cks: the
    forward's row-major checkpoints; ends: dL/d(final state) [BH, ...] fp32; fills grads (dq, dk, dv, deta), dstate
    (dL/d initial state, fp32 [BH, ...]) and dlnw / dlnb ([BH, D] per-head sums). ``parts``: which launches to issue
    (benchmarks/gluon_bwd_parts.py times them apart; anything but all three leaves the gradients meaningless).
    out_persist / out_tma_c: the output-path kernel's forms (KERNEL_CONFIG mlp_bwd; _ttt_mlp_bwd_out_kernel).

    overlap: the sequential kernels (one CTA per head: 96 of 132 SMs at the one-minute shape) on a high-priority
    stream of their own, the next group's STATES and output-path launches on the caller's stream into a second set
    of scratch buffers, so that they run on the SMs the sequential kernel leaves idle (events order each group's
    sequential kernel after its output path, and a group's scratch writes after the sequential kernel two groups
    later that read the same set). The caller's stream waits for the last sequential kernel before returning.
    gw_hint: the sequential kernel's gradient accumulators kept in L2 by eviction hints (_gw_merge's HINT).
    pair: pair_heads' mode for the sequential kernel (PAIR: two CTAs a head, each half the hidden units, meeting
    twice a mini-batch; where heads leave SMs idle).
    group_mul: the backward's groups span group_mul of the forward's checkpoint groups (G' = G group_mul mini-batches,
    each recomputed from the checkpoint at its start; the others are not read): fewer, longer launches.

    Scratch, freed on return: per head (G' + 1) states (2 F D operand-type elements each) and G' output terms (2 D F
    bf16 or fp32 elements each): ~210 MB at the one-minute shape's 96 heads, G' 16, bf16; twice that with overlap,
    and in proportion to G' (1.6 GB at G' 64 with overlap)."""
    global BWD_LAUNCHES
    B, H, N, D = q.shape
    BH, n_mb = B * H, N // mb
    ckW1, ckb1, ckW2, ckb2 = cks
    F, n_ck = ckW1.shape[-1], ckW1.shape[1]
    dev = q.device
    f32 = dict(device=dev, dtype=torch.float32)
    gw = [e.clone() for e in ends[:3]]  # dL/d(W1, b1, W2), advanced group by group to the initial state
    paired = pair_heads(BH, dev, pair)
    # dL/db2 (from dL/d(final b2)), dL/d(LN weight), dL/d(LN bias); paired: a copy a half (the same values)
    gvec_halves = torch.zeros(BH, 1 + paired, 3, D, **f32)
    gvec_halves[:, :, 0] = ends[3][:, None]
    gvec = gvec_halves[:, 0]
    ln_out = torch.zeros(BH, 2, D, **f32)  # the output path's dL/d(LN weight, bias)
    mul = max(1, int(group_mul))
    Gb = G * mul  # the backward's group
    n_slots = Gb + 1
    # the output path's terms, per (head, mini-batch of the group)
    # (bf16 for bf16 inputs: most of the bytes this backward moves, each term rounded once before its fp32 sum;
    # fp32 for fp16 inputs, whose finer operands the bf16 rounding would show: 1.4e-3 against 7.5e-4)
    c_dtype = torch.bfloat16 if q.dtype == torch.bfloat16 else torch.float32
    w_layout = gl.NVMMASharedLayout.get_default_for([F, D], gl.float16)
    # the paired sequential kernel's loads of a slot's rows (half the hidden units a CTA)
    wh_layout = gl.NVMMASharedLayout.get_default_for([F // 2, D], gl.float16)
    # the output-path kernel: one CTA an SM looping over the group's items (out_persist 1; n > 1: n CTAs, the
    # tests' way to give each CTA several items; 0: a CTA an item), its bf16 terms out by TMA (out_tma_c; fp32
    # terms, for fp16 inputs, take plain stores)
    out_ctas = (torch.cuda.get_device_properties(dev).multi_processor_count if out_persist == 1
                else int(out_persist))
    tma_c = bool(out_tma_c) and c_dtype == torch.bfloat16 and BH * Gb * F < 2**31

    def scratch():
        """One set of scratch buffers and their TMA descriptors: (b1 slots, b2 slots, C1, C2, CB1, CVEC, and the
        descriptors of the W1^T / W2 slots, of C1 / C2, and the sequential kernel's of the slots)."""
        st_w1 = torch.empty(BH * n_slots * F, D, device=dev, dtype=q.dtype)  # W1^T per slot
        st_w2 = torch.empty(BH * n_slots * F, D, device=dev, dtype=q.dtype)
        st_b1, st_b2 = torch.empty(BH * n_slots, F, **f32), torch.empty(BH * n_slots, D, **f32)
        c1 = torch.empty(BH * Gb, D, F, device=dev, dtype=c_dtype)
        c2 = torch.empty(BH * Gb, F, D, device=dev, dtype=c_dtype)
        cb1, cvec = torch.empty(BH * Gb, F, **f32), torch.empty(BH * Gb, 3, D, **f32)
        wtd, w2d = (TensorDescriptor(t, list(t.shape), [D, 1], [F, D], w_layout) for t in (st_w1, st_w2))
        if tma_c:
            c1d = TensorDescriptor(c1.view(BH * Gb * D, F), [BH * Gb * D, F], [F, 1], [D, 64],
                                   gl.NVMMASharedLayout.get_default_for([D, 64], gl.float16))
            c2d = TensorDescriptor(c2.view(BH * Gb * F, D), [BH * Gb * F, D], [D, 1], [F, D], w_layout)
        else:
            c1d = c2d = wtd  # (not read)
        if paired:
            seq_d = [TensorDescriptor(t, list(t.shape), [D, 1], [F // 2, D], wh_layout) for t in (st_w1, st_w2)]
        else:
            seq_d = [wtd, w2d]
        return st_b1, st_b2, c1, c2, cb1, cvec, wtd, w2d, c1d, c2d, seq_d

    sets = [scratch() for _ in range(2 if overlap else 1)]
    err, err_mirror = ttt_triton._stall_flag(dev)
    qd, kd, vd = (_tile_descriptor(t, mb) for t in (q, k, v))
    dq, dk, dv, deta = grads
    main = torch.cuda.current_stream(dev)
    seq = _seq_stream(dev) if overlap else main
    if overlap:
        seq.wait_stream(main)  # the inputs and the accumulators above
    seq_done = {}  # group -> event after its sequential kernel (overlap)
    for c in reversed(range(-(-n_mb // Gb))):
        mb0 = c * Gb
        cnt = min(Gb, n_mb - mb0)
        st_b1, st_b2, c1, c2, cb1, cvec, wtd, w2d, c1d, c2d, seq_d = sets[c % len(sets)]
        if overlap and c + 2 in seq_done:  # this set was last read by the sequential kernel two groups later
            main.wait_event(seq_done.pop(c + 2))
        if "states" in parts:
            _ttt_mlp_fwd_smem_kernel[(BH,)](
                q, k, v, qd, kd, vd, vd, wtd, w2d, eta, lnw, lnb, ckW1, ckb1, ckW2, ckb2,
                q, ckW1, ckb1, ckW2, ckb2, ckW1, ckb1, ckW2, ckb2,  # output, finals, checkpoints: not written
                st_b1, st_b2, st_b1, st_b1, ckb1, ckb1,  # (the paired forward's buffers: not read)
                N, H, mb0 + cnt, 1, cnt, LN_EPS, mb0, n_ck, c * mul, n_slots, 0, 0, 1,  # from checkpoint c mul
                D=D, FS=F, MB=mb, SAVE=False, TMA=True, BSUM_MMA=True, STATES=True, num_warps=8,
            )
        if "out" in parts:
            n_items = BH * cnt
            _ttt_mlp_bwd_out_kernel[(min(n_items, out_ctas) if out_ctas else n_items,)](
                qd, wtd, w2d, c1d, c2d, dout, st_b1, st_b2, lnw, c1, c2, cb1, cvec, dq,
                N, H, mb0, cnt, n_slots, n_items, LN_EPS, D=D, F=F, MB=mb, TMA_C=tma_c, num_warps=8,
            )
            ln_out += cvec[:BH * cnt].view(BH, cnt, 3, D)[:, :, 1:].sum(1)
        if "backward" in parts:
            if overlap:
                seq.wait_stream(main)  # this group's states and output terms
            with torch.cuda.stream(seq):
                if paired:  # the exchange slots and a fresh ticket and counters a launch
                    xch = torch.empty(BH * 2 * 5 * mb * D, **f32)
                    pcnt = torch.zeros(32 * (BH + 1), device=dev, dtype=torch.int32)
                else:
                    xch, pcnt = gvec, err
                _ttt_mlp_bwd_smem_kernel[(2 * BH if paired else BH,)](
                    kd, *seq_d, v, eta, lnw, lnb, st_b1, st_b2, c1, c2, cb1, cvec, *gw, gvec_halves, dk, dv, deta,
                    xch, pcnt, err, N, H, mb0, cnt, n_slots, LN_EPS, ttt_triton._SPLIT_MAX_SPIN,
                    D=D, F=F, MB=mb, num_warps=8, GW_HINT=bool(gw_hint), PAIR=paired,
                )
            if overlap:
                seq_done[c] = seq.record_event()
    if overlap:
        main.wait_stream(seq)
    if paired:
        ttt_triton._after_split_launch(err, err_mirror, _PAIR_STALL)
    BWD_LAUNCHES += 1
    dstate[:] = gw + [gvec[:, 0]]
    dlnw.copy_(gvec[:, 1] + ln_out[:, 0])
    dlnb.copy_(gvec[:, 2] + ln_out[:, 1])
    return True
