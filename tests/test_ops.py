"""ttt_core.ops against an independent float64 reference that lets autograd take the inner gradient.

The reference shares no code with ops.py: it writes f, the per-token loss with torch's own layer_norm, and
asks torch.autograd.grad for sum_j eta_j grad l_j, one mini-batch at a time.
"""

import pytest
import torch
import torch.nn.functional as F

from ttt_video.ttt_core.ops import LN_EPS, resolve_backend, ttt_linear, ttt_mlp


def reference_scan(kind, q, k, v, eta, state, ln_w, ln_b, mini_batch_size):
    B, H, N, D = q.shape
    W = [t.detach().clone() for t in state]

    def f(x, params):
        if kind == "mlp":
            W1, b1, W2, b2 = params
            return F.gelu(x @ W1 + b1, approximate="tanh") @ W2 + b2
        W1, b1 = params
        return x @ W1 + b1

    def ln(z):
        # per-head LN: loop over heads so torch's layer_norm applies head h's weight/bias
        return torch.stack([F.layer_norm(z[:, h], (D,), ln_w[h], ln_b[h], eps=LN_EPS) for h in range(H)], dim=1)

    outs = []
    for s in range(0, N, mini_batch_size):
        sl = slice(s, s + mini_batch_size)
        qb, kb, vb, eb = q[:, :, sl], k[:, :, sl], v[:, :, sl], eta[:, :, sl]
        params = [w.detach().requires_grad_(True) for w in W]
        per_token = 0.5 * (ln(f(kb, params)) - (vb - kb)).pow(2).sum(-1)  # [B, H, b]
        grads = torch.autograd.grad((eb * per_token).sum(), params)
        W = [w.detach() - g for w, g in zip(params, grads)]
        outs.append(qb + ln(f(qb, W)))
    return torch.cat(outs, dim=2), tuple(W)


def make_inputs(kind, B, H, N, D, dtype=torch.float64, seed=None, requires_grad=False):
    g = torch.Generator().manual_seed(seed if seed is not None else torch.seed() % 2**31)
    r = lambda *s, scale=1.0: (torch.randn(*s, generator=g, dtype=torch.float64) * scale).to(dtype)
    q = F.normalize(r(B, H, N, D), dim=-1).to(dtype)
    k = F.normalize(r(B, H, N, D), dim=-1).to(dtype)
    v = r(B, H, N, D)
    eta = (torch.rand(B, H, N, generator=g, dtype=torch.float64) * 0.5 + 0.05).to(dtype)
    if kind == "mlp":
        Fh = 4 * D
        state = (r(B, H, D, Fh, scale=0.3), r(B, H, 1, Fh, scale=0.1), r(B, H, Fh, D, scale=0.3), r(B, H, 1, D, scale=0.1))
    else:
        state = (r(B, H, D, D, scale=0.3), r(B, H, 1, D, scale=0.1))
    ln_w = (1.0 + r(H, D, scale=0.2)).to(dtype)
    ln_b = r(H, D, scale=0.2)
    tensors = [q, k, v, eta, *state, ln_w, ln_b]
    if requires_grad:
        tensors = [t.detach().requires_grad_(True) for t in tensors]
    q, k, v, eta, *rest = tensors
    ns = len(state)
    return q, k, v, eta, tuple(rest[:ns]), rest[ns], rest[ns + 1]


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


OPS = {"mlp": ttt_mlp, "linear": ttt_linear}


@pytest.mark.parametrize("kind", ["mlp", "linear"])
@pytest.mark.parametrize("B,H,N,D,mb", [(1, 1, 8, 4, 4), (2, 3, 48, 8, 16), (1, 2, 64, 16, 8), (2, 2, 12, 8, 12)])
def test_matches_float64_reference(kind, B, H, N, D, mb):
    q, k, v, eta, state, ln_w, ln_b = make_inputs(kind, B, H, N, D)
    out, final = OPS[kind](q, k, v, eta, state, ln_w, ln_b, mini_batch_size=mb, backend="torch")
    ref_out, ref_final = reference_scan(kind, q, k, v, eta, state, ln_w, ln_b, mb)
    assert out.shape == q.shape and out.dtype == torch.float64
    assert rel_err(out, ref_out) < 1e-8
    assert len(final) == len(ref_final)
    for a, b in zip(final, ref_final):
        assert rel_err(a, b) < 1e-8
    # the state really moved (a wrong-sign or no-op update would fail the comparison above, but make sure
    # the test is not vacuous: the final state differs from the initial one by more than rounding)
    assert rel_err(final[0], state[0]) > 1e-4


@pytest.mark.parametrize("kind", ["mlp", "linear"])
def test_state_carries_across_calls(kind):
    """Running N tokens at once equals running two halves with the state handed over."""
    q, k, v, eta, state, ln_w, ln_b = make_inputs(kind, 1, 2, 32, 8)
    op = OPS[kind]
    out, final = op(q, k, v, eta, state, ln_w, ln_b, mini_batch_size=8, backend="torch")
    o1, s1 = op(q[:, :, :16], k[:, :, :16], v[:, :, :16], eta[:, :, :16], state, ln_w, ln_b, mini_batch_size=8, backend="torch")
    o2, s2 = op(q[:, :, 16:], k[:, :, 16:], v[:, :, 16:], eta[:, :, 16:], s1, ln_w, ln_b, mini_batch_size=8, backend="torch")
    assert rel_err(torch.cat([o1, o2], dim=2), out) < 1e-12
    for a, b in zip(s2, final):
        assert rel_err(a, b) < 1e-12


@pytest.mark.parametrize("kind", ["mlp", "linear"])
def test_gradcheck(kind):
    q, k, v, eta, state, ln_w, ln_b = make_inputs(kind, 1, 2, 8, 4, requires_grad=True)
    op = OPS[kind]

    def fn(q, k, v, eta, ln_w, ln_b, *state):
        out, final = op(q, k, v, eta, state, ln_w, ln_b, mini_batch_size=4, backend="torch")
        return (out, *final)

    assert torch.autograd.gradcheck(fn, (q, k, v, eta, ln_w, ln_b, *state), eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("kind", ["mlp", "linear"])
def test_rematerialisation_gives_same_gradients(kind):
    inputs = make_inputs(kind, 1, 2, 64, 8, requires_grad=True)
    op = OPS[kind]
    grads = []
    for group in (0, 2):
        q, k, v, eta, state, ln_w, ln_b = inputs
        out, final = op(q, k, v, eta, state, ln_w, ln_b, mini_batch_size=8, checkpoint_group_size=group, backend="torch")
        w = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)
        loss = (out * w).sum() + sum((s * s).sum() for s in final)
        leaves = [q, k, v, eta, *state, ln_w, ln_b]
        grads.append(torch.autograd.grad(loss, leaves))
    for a, b in zip(*grads):
        assert a.abs().sum() > 0
        assert rel_err(a, b) < 1e-12


@pytest.mark.parametrize("kind", ["mlp", "linear"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_low_precision_inputs_use_fp32_state(kind, dtype, tol):
    q, k, v, eta, state, ln_w, ln_b = make_inputs(kind, 1, 2, 32, 16)
    ref_out, ref_final = reference_scan(kind, q, k, v, eta, state, ln_w, ln_b, 16)
    cast = lambda t: t.to(dtype)
    out, final = OPS[kind](cast(q), cast(k), cast(v), cast(eta), tuple(map(cast, state)), cast(ln_w), cast(ln_b),
                           mini_batch_size=16, backend="torch")
    assert out.dtype == dtype
    assert final[0].dtype == (torch.float32 if dtype == torch.bfloat16 else dtype)
    # bf16 error is dominated by rounding the inputs themselves
    assert rel_err(out, ref_out) < tol
    assert rel_err(final[0], ref_final[0]) < tol


def test_sequence_not_multiple_of_mini_batch_names_both_numbers():
    q, k, v, eta, state, ln_w, ln_b = make_inputs("mlp", 1, 1, 20, 4)
    with pytest.raises(ValueError, match=r"N=20.*mini_batch_size=16"):
        ttt_mlp(q, k, v, eta, state, ln_w, ln_b, mini_batch_size=16)


def test_bad_shapes_are_reported():
    q, k, v, eta, state, ln_w, ln_b = make_inputs("linear", 1, 2, 16, 4)
    with pytest.raises(ValueError, match="eta"):
        ttt_linear(q, k, v, eta[:, :1], state, ln_w, ln_b, mini_batch_size=8)
    with pytest.raises(ValueError, match="W1"):
        ttt_linear(q, k, v, eta, (state[0][..., :2], state[1]), ln_w, ln_b, mini_batch_size=8)
    with pytest.raises(ValueError, match="state must have"):
        ttt_mlp(q, k, v, eta, state, ln_w, ln_b, mini_batch_size=8)


def test_auto_backend_is_torch_on_cpu():
    q = torch.randn(1, 1, 64, 64)
    assert resolve_backend("auto", q, 64, "mlp") == "torch"
    with pytest.raises(ValueError, match="backend"):
        resolve_backend("cuda", q, 64, "mlp")


@pytest.mark.parametrize("B,H,N,D,mb", [(2, 3, 48, 8, 16), (1, 2, 256, 64, 64)])
def test_mlp_inference_loop_equals_the_differentiable_loop(B, H, N, D, mb):
    # without autograd the torch backend runs the fused in-place loop (ops._mlp_scan_inference); with inputs
    # that need gradients it runs the readable step: both must give the same numbers
    q, k, v, eta, state, ln_w, ln_b = make_inputs("mlp", B, H, N, D)
    before = [t.clone() for t in state]
    with torch.no_grad():
        fast, fast_final = ttt_mlp(q, k, v, eta, state, ln_w, ln_b, mini_batch_size=mb, backend="torch")
    assert all(torch.equal(a, b) for a, b in zip(state, before))  # the caller's state is not updated in place
    assert fast.grad_fn is None
    tracked = [t.detach().clone().requires_grad_(True) for t in (q, k, v, eta)]
    slow, slow_final = ttt_mlp(*tracked, state, ln_w, ln_b, mini_batch_size=mb, backend="torch")
    assert slow.grad_fn is not None  # (the differentiable path really ran)
    assert rel_err(fast, slow) < 1e-12
    for a, b in zip(fast_final, slow_final):
        assert rel_err(a, b) < 1e-12
    assert rel_err(fast_final[0], state[0]) > 1e-4  # and the returned state moved
