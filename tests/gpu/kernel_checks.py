"""Shared checks of the Triton TTT kernels against ttt_core.ops' torch backend in float64.

Used by tests/test_kernels.py (CPU, Triton interpreter, in a subprocess) and tests/gpu/test_kernels_gpu.py
(device). Every run draws fresh random inputs, poisons the kernels' outputs (NaN-filled buffers) and
checks the output, the final state and every gradient (q, k, v, eta, initial state, LN weight/bias).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# relative-error bounds per input dtype (issue 4: bf16 operands < 1e-2, fp32 < 1e-4)
TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def make_inputs(kind, B, H, N, D, dtype, device, generator, mean_shift=0.0):
    """float64 draws rounded to `dtype` (the state stays fp32, like the model's parameters). ``mean_shift`` moves the
    inner model's last bias by that much and its last weight's entries by a tenth of it: LayerNorm inputs whose rows
    have large means against their spread (a one-pass variance cancels there)."""

    def r(*s, scale=1.0):
        return torch.randn(*s, generator=generator, dtype=torch.float64) * scale

    q = F.normalize(r(B, H, N, D), dim=-1)
    k = F.normalize(r(B, H, N, D), dim=-1)
    v = r(B, H, N, D)
    eta = torch.rand(B, H, N, generator=generator, dtype=torch.float64) * 0.5 + 0.05
    if kind == "mlp":
        Fh = 4 * D
        state = [r(B, H, D, Fh, scale=0.3), r(B, H, 1, Fh, scale=0.1), r(B, H, Fh, D, scale=0.3), r(B, H, 1, D, scale=0.1)]
    else:
        state = [r(B, H, D, D, scale=0.3), r(B, H, 1, D, scale=0.1)]
    state[-2] = state[-2] + mean_shift / 10
    state[-1] = state[-1] + mean_shift
    ln_w = 1.0 + r(H, D, scale=0.2)
    ln_b = r(H, D, scale=0.2)
    sdt = torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype
    xs = [t.to(dtype) for t in (q, k, v)] + [eta.to(torch.float32)] + [t.to(sdt) for t in state] + [ln_w.float(), ln_b.float()]
    return [t.to(device) for t in xs]


def rel(a, b):
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def check(kind, B, H, N, D, mb, group, dtype, device, seed, mean_shift=0.0):
    """Run the Triton kernel and the float64 torch reference; return {name: relative error}.

    Raises AssertionError if any kernel output (forward or backward) holds a NaN (= an unwritten,
    poisoned element) or an Inf."""
    from ttt_video.kernels import ttt_triton
    from ttt_video.ttt_core import ops

    g = torch.Generator().manual_seed(seed)
    xs = make_inputs(kind, B, H, N, D, dtype, device, g, mean_shift)
    ns = 4 if kind == "mlp" else 2
    names = ["q", "k", "v", "eta"] + (["W1", "b1", "W2", "b2"] if kind == "mlp" else ["W1", "b1"]) + ["ln_weight", "ln_bias"]
    leaves = [t.detach().clone().requires_grad_(True) for t in xs]
    # the float64 reference runs where the kernel ran: on the device CPU it was most of the long tests' time
    ref_leaves = [t.detach().double().requires_grad_(True) for t in xs]
    kern = ttt_triton.ttt_mlp_triton if kind == "mlp" else ttt_triton.ttt_linear_triton
    ref_op = ops.ttt_mlp if kind == "mlp" else ops.ttt_linear

    old = ttt_triton.POISON_OUTPUTS
    ttt_triton.POISON_OUTPUTS = True
    try:
        q, k, v, eta, *rest = leaves
        out, final = kern(q, k, v, eta, tuple(rest[:ns]), rest[ns], rest[ns + 1], mb, group)
        dout = torch.randn(out.shape, generator=g, dtype=torch.float64)
        dfinal = [torch.randn(t.shape, generator=g, dtype=torch.float64) * 0.1 for t in final]
        loss = (out.double() * dout.to(device)).sum() + sum((f.double() * d.to(device)).sum() for f, d in zip(final, dfinal))
        grads = torch.autograd.grad(loss, leaves)
    finally:
        ttt_triton.POISON_OUTPUTS = old
    for name, t in [("out", out)] + [(f"final_{i}", f) for i, f in enumerate(final)] + [(f"d{n}", t) for n, t in zip(names, grads)]:
        assert torch.isfinite(t).all(), f"{kind} {dtype}: {name} has non-finite (unwritten/poisoned) elements"
    assert out.dtype == dtype and out.shape == xs[0].shape

    rq, rk, rv, reta, *rrest = ref_leaves
    ref_out, ref_final = ref_op(rq, rk, rv, reta, tuple(rrest[:ns]), rrest[ns], rrest[ns + 1], mini_batch_size=mb, backend="torch")
    ref_loss = (ref_out * dout.to(device)).sum() + sum((f * d.to(device)).sum() for f, d in zip(ref_final, dfinal))
    ref_grads = torch.autograd.grad(ref_loss, ref_leaves)
    errs = {"out": rel(out, ref_out)}
    for i, (a, b) in enumerate(zip(final, ref_final)):
        errs[f"final_{names[4 + i]}"] = rel(a, b)
    for n, a, b in zip(names, grads, ref_grads):
        errs[f"d{n}"] = rel(a, b)
    return errs
