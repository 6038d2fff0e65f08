"""TTT inner-loop ops: the contract shared by the PyTorch reference and the Triton kernels.

    out, (W1, b1, W2, b2) = ttt_mlp(q, k, v, eta, (W1, b1, W2, b2), ln_weight, ln_bias, mini_batch_size=64)
    out, (W1, b1)         = ttt_linear(q, k, v, eta, (W1, b1), ln_weight, ln_bias, mini_batch_size=16)

Shapes: q, k, v [B, H, N, D]; eta [B, H, N] (final per-token inner learning rate); TTT-MLP state
W1 [B, H, D, F], b1 [B, H, 1, F], W2 [B, H, F, D], b2 [B, H, 1, D]; TTT-Linear state W1 [B, H, D, D],
b1 [B, H, 1, D]; ln_weight, ln_bias [H, D]. N must be a multiple of mini_batch_size.

Semantics, for each mini-batch of b tokens with state W at its start (non-causal inside a mini-batch, as in
the video model):
    f(x; W)  = gelu_tanh(x W1 + b1) W2 + b2      (MLP)   or   x W1 + b1   (Linear)
    l_j(W)   = 1/2 || LN(f(k_j; W)) - (v_j - k_j) ||^2     (per-head LN, biased variance, eps 1e-8)
    W_end    = W - sum_j eta_j grad_W l_j(W)
    out_i    = q_i + LN(f(q_i; W_end))
and W_end starts the next mini-batch. This is the official dual form (ttt-video-dit) with every row of its
eta matrix equal to [eta_1 .. eta_b]; we use the explicit form (compute W_end, then evaluate f at q), which is
what the kernels implement too. The inner gradients are written out by hand (LN and tanh-GELU backward) so
the whole computation stays differentiable for the outer (training) loss: gradients flow to q, k, v, eta,
the initial state and the LN parameters.

Precision: half/bfloat16 inputs are computed with a float32 state (as the official kernel keeps its state in
fp32); float32/float64 inputs are computed in their own dtype. The output has q's dtype, the state the
computation dtype.

Memory: with ``checkpoint_group_size = G > 0`` and autograd enabled, the scan is rematerialised every G
mini-batches (only the state at group boundaries is kept), so activation memory does not grow with
N x state size (official: scan checkpoints every 16 mini-batches in training).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

LN_EPS = 1e-8
_GELU_C = math.sqrt(2.0 / math.pi)

BACKENDS = ("auto", "torch", "triton")

__all__ = ["ttt_mlp", "ttt_linear", "BACKENDS", "LN_EPS", "resolve_backend"]


# --------------------------------------------------------------------------------------------------
# small pieces with hand-written backward (used inside the inner loop)
# --------------------------------------------------------------------------------------------------
def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def _gelu_tanh_grad(x: torch.Tensor) -> torch.Tensor:
    inner = _GELU_C * (x + 0.044715 * x.pow(3))
    t = torch.tanh(inner)
    return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * _GELU_C * (1.0 + 3 * 0.044715 * x * x)


def _ln_forward(z: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor):
    """Per-head LayerNorm over the last dim. weight/bias broadcast as [H, 1, D]. Returns (y, xhat, std)."""
    mu = z.mean(dim=-1, keepdim=True)
    var = (z - mu).pow(2).mean(dim=-1, keepdim=True)
    std = torch.sqrt(var + LN_EPS)
    xhat = (z - mu) / std
    return weight * xhat + bias, xhat, std


def _ln_fused_l2_grad(z: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor):
    """Gradient of 1/2 ||LN(z) - target||^2 with respect to z, per row."""
    y, xhat, std = _ln_forward(z, weight, bias)
    g_xhat = (y - target) * weight
    d = z.shape[-1]
    return (
        d * g_xhat - g_xhat.sum(dim=-1, keepdim=True) - xhat * (g_xhat * xhat).sum(dim=-1, keepdim=True)
    ) / (d * std)


# --------------------------------------------------------------------------------------------------
# one mini-batch (all tensors batched over [B, H]; mini-batch tokens on dim -2)
# --------------------------------------------------------------------------------------------------
def _mlp_step(state, q, k, v, eta, ln_w, ln_b):
    W1, b1, W2, b2 = state
    target = v - k
    z1 = k @ W1 + b1
    x2 = _gelu_tanh(z1)
    z2 = x2 @ W2 + b2
    g2 = _ln_fused_l2_grad(z2, target, ln_w, ln_b)  # dl/dz2  [.., b, D]
    g1 = (g2 @ W2.transpose(-1, -2)) * _gelu_tanh_grad(z1)  # dl/dz1  [.., b, F]
    e = eta.unsqueeze(-1)  # [.., b, 1]
    W1 = W1 - k.transpose(-1, -2) @ (e * g1)
    b1 = b1 - (e * g1).sum(dim=-2, keepdim=True)
    W2 = W2 - x2.transpose(-1, -2) @ (e * g2)
    b2 = b2 - (e * g2).sum(dim=-2, keepdim=True)
    zq = _gelu_tanh(q @ W1 + b1) @ W2 + b2
    out = q + _ln_forward(zq, ln_w, ln_b)[0]
    return out, (W1, b1, W2, b2)


def _linear_step(state, q, k, v, eta, ln_w, ln_b):
    W1, b1 = state
    z = k @ W1 + b1
    g = _ln_fused_l2_grad(z, v - k, ln_w, ln_b)
    e = eta.unsqueeze(-1)
    W1 = W1 - k.transpose(-1, -2) @ (e * g)
    b1 = b1 - (e * g).sum(dim=-2, keepdim=True)
    out = q + _ln_forward(q @ W1 + b1, ln_w, ln_b)[0]
    return out, (W1, b1)


@torch.no_grad()
def _mlp_scan_inference(q, k, v, eta, state, ln_w, ln_b, mini_batch_size: int):
    """_scan(_mlp_step, ...) without autograd, for inference: the same math on [B*H] batches with fused and
    in-place ops (baddbmm, GELU and its derivative as single operators, LayerNorm through native_layer_norm):
    0.7-0.8x the readable step's time at the embedded default's one-minute shape, where the scans were ~70 %
    of a CPU forward (1,500 mini-batch steps per denoising step, each a few small matmuls, so per-operator
    overhead matters; docs/performance.md). Checked against _mlp_step in float64 (tests/test_ops.py)."""
    B, H, N, D = q.shape
    BH, b = B * H, mini_batch_size
    Fh = state[0].shape[-1]
    q3, k3 = q.reshape(BH, N, D), k.reshape(BH, N, D)
    target3 = (v - k).reshape(BH, N, D)
    eta3 = eta.reshape(BH, N, 1)
    W1, b1, W2, b2 = (t.reshape(BH, *t.shape[2:]).clone() for t in state)  # updated in place below
    w = ln_w.expand(B, H, 1, D).reshape(BH, 1, D)
    beta = ln_b.expand(B, H, 1, D).reshape(BH, 1, D)
    out = torch.empty_like(q3)
    for i in range(N // b):
        sl = slice(i * b, (i + 1) * b)
        k_, e = k3[:, sl], eta3[:, sl]
        z1 = torch.baddbmm(b1, k_, W1)
        x2 = F.gelu(z1, approximate="tanh")
        z2 = torch.baddbmm(b2, x2, W2)
        # dl/dz2 of 1/2 ||LN(z2) - target||^2 (as _ln_fused_l2_grad); native_layer_norm also returns 1/std
        xhat, _, rstd = torch.native_layer_norm(z2, (D,), None, None, LN_EPS)
        g_xhat = torch.addcmul(beta, w, xhat).sub_(target3[:, sl]).mul_(w)
        g2 = (g_xhat * D).sub_(g_xhat.sum(-1, keepdim=True)).sub_(xhat * (g_xhat * xhat).sum(-1, keepdim=True))
        g2.mul_(rstd / D)
        # dl/dz1 = (g2 W2^T) * GELU'(z1), in one fused operator
        eg1 = torch.ops.aten.gelu_backward(torch.bmm(g2, W2.transpose(1, 2)), z1, approximate="tanh").mul_(e)
        eg2 = g2.mul_(e)
        W1.baddbmm_(k_.transpose(1, 2), eg1, alpha=-1.0)
        b1.sub_(eg1.sum(1, keepdim=True))
        W2.baddbmm_(x2.transpose(1, 2), eg2, alpha=-1.0)
        b2.sub_(eg2.sum(1, keepdim=True))
        zq = torch.baddbmm(b2, F.gelu(torch.baddbmm(b1, q3[:, sl], W1), approximate="tanh"), W2)
        ln = F.layer_norm(zq, (D,), eps=LN_EPS)
        torch.addcmul(q3[:, sl] + beta, w, ln, out=out[:, sl])
    final = (W1.reshape(B, H, D, Fh), b1.reshape(B, H, 1, Fh), W2.reshape(B, H, Fh, D), b2.reshape(B, H, 1, D))
    return out.reshape(B, H, N, D), final


def _scan(step, state, q, k, v, eta, ln_w, ln_b, mini_batch_size: int, group: int):
    """Run ``step`` over mini-batches; with group > 0 and grad enabled, checkpoint every ``group`` of them."""
    n_mb = q.shape[-2] // mini_batch_size

    def run_range(first: int, last: int, *flat_state):
        st = tuple(flat_state)
        outs = []
        for i in range(first, last):
            sl = slice(i * mini_batch_size, (i + 1) * mini_batch_size)
            o, st = step(st, q[..., sl, :], k[..., sl, :], v[..., sl, :], eta[..., sl], ln_w, ln_b)
            outs.append(o)
        return (torch.cat(outs, dim=-2), *st)

    use_ckpt = group > 0 and torch.is_grad_enabled() and n_mb > group
    if not use_ckpt:
        out, *state = run_range(0, n_mb, *state)
        return out, tuple(state)
    outs = []
    for first in range(0, n_mb, group):
        last = min(first + group, n_mb)
        out, *state = checkpoint(run_range, first, last, *state, use_reentrant=False)
        outs.append(out)
    return torch.cat(outs, dim=-2), tuple(state)


# --------------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------------
def _check_inputs(kind, q, k, v, eta, state, ln_weight, ln_bias, mini_batch_size, expected_state):
    if q.dim() != 4:
        raise ValueError(f"{kind}: q must be [B, H, N, D], got shape {tuple(q.shape)}")
    B, H, N, D = q.shape
    for name, t in (("k", k), ("v", v)):
        if t.shape != q.shape:
            raise ValueError(f"{kind}: {name} has shape {tuple(t.shape)}, expected {tuple(q.shape)} like q")
    if eta.shape != (B, H, N):
        raise ValueError(f"{kind}: eta has shape {tuple(eta.shape)}, expected {(B, H, N)}")
    for name, t in (("ln_weight", ln_weight), ("ln_bias", ln_bias)):
        if t.shape != (H, D):
            raise ValueError(f"{kind}: {name} has shape {tuple(t.shape)}, expected {(H, D)}")
    if len(state) != len(expected_state):
        raise ValueError(f"{kind}: state must have {len(expected_state)} tensors, got {len(state)}")
    for (name, shape), t in zip(expected_state, state):
        if tuple(t.shape) != shape:
            raise ValueError(f"{kind}: {name} has shape {tuple(t.shape)}, expected {shape}")
    if mini_batch_size < 1:
        raise ValueError(f"{kind}: mini_batch_size must be >= 1, got {mini_batch_size}")
    if N % mini_batch_size:
        raise ValueError(
            f"{kind}: sequence length N={N} is not a multiple of mini_batch_size={mini_batch_size}; "
            f"pad the sequence to {math.ceil(N / mini_batch_size) * mini_batch_size} tokens"
        )
    if not q.is_floating_point():
        raise TypeError(f"{kind}: inputs must be floating point, got {q.dtype}")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def resolve_backend(backend: str, q: torch.Tensor, mini_batch_size: int, kind: str) -> str:
    """'auto' -> 'triton' for CUDA tensors whose shape the kernels support, else 'torch'."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend != "auto":
        return backend
    if not q.is_cuda:
        return "torch"
    try:
        from ..kernels import triton_supports
    except ImportError:  # triton missing on this machine
        return "torch"
    return "triton" if triton_supports(q, mini_batch_size, kind) else "torch"


def _run_torch(step, q, k, v, eta, state, ln_weight, ln_bias, mini_batch_size, checkpoint_group_size):
    cdt = _compute_dtype(q.dtype)
    H, D = ln_weight.shape
    q_, k_, v_, eta_ = (t.to(cdt) for t in (q, k, v, eta))
    state_ = tuple(t.to(cdt) for t in state)
    ln_w = ln_weight.to(cdt).reshape(1, H, 1, D)
    ln_b = ln_bias.to(cdt).reshape(1, H, 1, D)
    tracked = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, eta, ln_weight, ln_bias, *state))
    if step is _mlp_step and not tracked:  # nothing to differentiate: the fused inference loop
        out, final = _mlp_scan_inference(q_, k_, v_, eta_, state_, ln_w, ln_b, mini_batch_size)
    else:
        out, final = _scan(step, state_, q_, k_, v_, eta_, ln_w, ln_b, mini_batch_size, checkpoint_group_size)
    return out.to(q.dtype), final


def ttt_mlp(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    eta: torch.Tensor,
    state: Sequence[torch.Tensor],
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    mini_batch_size: int = 64,
    checkpoint_group_size: int = 0,
    backend: str = "auto",
):
    """TTT-MLP inner loop (see module docstring). Returns (out [B, H, N, D], (W1, b1, W2, b2))."""
    B, H, N, D = q.shape if q.dim() == 4 else (0, 0, 0, 0)
    Fh = state[0].shape[-1] if len(state) else 0
    expected = (("W1", (B, H, D, Fh)), ("b1", (B, H, 1, Fh)), ("W2", (B, H, Fh, D)), ("b2", (B, H, 1, D)))
    _check_inputs("ttt_mlp", q, k, v, eta, state, ln_weight, ln_bias, mini_batch_size, expected)
    if resolve_backend(backend, q, mini_batch_size, "mlp") == "triton":
        from ..kernels import ttt_mlp_triton

        return ttt_mlp_triton(q, k, v, eta, tuple(state), ln_weight, ln_bias, mini_batch_size, checkpoint_group_size)
    return _run_torch(_mlp_step, q, k, v, eta, state, ln_weight, ln_bias, mini_batch_size, checkpoint_group_size)


def ttt_linear(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    eta: torch.Tensor,
    state: Sequence[torch.Tensor],
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    mini_batch_size: int = 16,
    checkpoint_group_size: int = 0,
    backend: str = "auto",
):
    """TTT-Linear inner loop (see module docstring). Returns (out [B, H, N, D], (W1, b1))."""
    B, H, N, D = q.shape if q.dim() == 4 else (0, 0, 0, 0)
    expected = (("W1", (B, H, D, D)), ("b1", (B, H, 1, D)))
    _check_inputs("ttt_linear", q, k, v, eta, state, ln_weight, ln_bias, mini_batch_size, expected)
    if resolve_backend(backend, q, mini_batch_size, "linear") == "triton":
        from ..kernels import ttt_linear_triton

        return ttt_linear_triton(q, k, v, eta, tuple(state), ln_weight, ln_bias, mini_batch_size, checkpoint_group_size)
    return _run_torch(_linear_step, q, k, v, eta, state, ln_weight, ln_bias, mini_batch_size, checkpoint_group_size)
