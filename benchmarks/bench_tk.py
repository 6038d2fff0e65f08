"""The paper's ThunderKittens TTT-MLP kernels (ttt-tk, built by scripts/build_ttt_tk.py) beside ours (issue 4).
GPU (sm_90a) only; not a test.

    python benchmarks/bench_tk.py [--build /tmp/ttt_tk_build] [--tokens 351232] [--heads 48] [--json out.json]

ttt-tk computes the function ttt_core.ops.ttt_mlp computes (the W_end form, eta per key token, tanh-GELU, residual
q + LN(f(q; W_end)); their LN eps is 1e-6, ours 1e-8): first its output and every gradient are checked against our
float64 reference on fresh draws (bf16 inputs; eta rounded to bf16, as their wrapper passes it), so the timed calls are
known to compute what ours does. Then, at the one-minute shape, in one process: ttt-tk's forward and
forward + backward (group 16) as the paper's model runs it (each direction a launch of 48 heads: 48 clusters of
2 SMs) and with both directions in one launch (96 heads: 192 CTAs for 132 SMs), ours (Gluon / Triton, `auto`)
the same two ways, and fla's Gated DeltaNet (2 x one direction), printing the ratios to GDN.

Their backward walks whole checkpoint groups (it reads group x 64 tokens a group), so the sequence is a multiple
of 16 x 64 tokens: 351,232 (the one-minute 351,168 plus one mini-batch, 0.02 % more) for every row here.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "tests", "gpu"))
from bench_ttt import _free, _timeit, bench_fla, bench_ttt, ttt_inputs  # noqa: E402

MB = 64


def load_tk(build_dir: str, src: str):
    """Build (or reuse the build in build_dir) and import ttt-tk's extension: scripts/build_ttt_tk.py."""
    sys.path.insert(0, os.path.join(HERE, "..", "scripts"))
    import build_ttt_tk

    return build_ttt_tk.build(Path(src).resolve(), Path(build_dir))


class TKRunner:
    """Our op's arguments (q, k, v [B, H, N, D]; eta [B, H, N]; state; ln [H, D]) in ttt-tk's layout and calls."""

    def __init__(self, tk, q, k, v, eta, state, ln_w, ln_b, group=16):
        B, H, N, D = q.shape
        assert D == 64 and N % (MB * group) == 0, "ttt-tk: head dim 64, whole checkpoint groups"
        self.tk, self.G, self.shape = tk, group, (B, H, N // MB, MB, D)
        bf = torch.bfloat16
        self.q, self.k, self.v = (t.to(bf).reshape(self.shape).contiguous() for t in (q, k, v))
        self.eta = eta.to(bf).reshape(B, H, N // MB, MB, 1).contiguous()
        self.ln_w = ln_w.float().reshape(1, H, 1, D).contiguous()
        self.ln_b = ln_b.float().reshape(1, H, 1, D).contiguous()
        self.state = [s.float().contiguous() for s in state]
        n_ck = N // MB // group
        self.ck = [torch.empty(B, H, n_ck, *s.shape[2:], device=q.device, dtype=torch.float32) for s in self.state]
        self.out = torch.empty(self.shape, device=q.device, dtype=bf)

    def forward(self):
        self.tk.ttt_forward(self.q, self.k, self.v, self.eta, self.ln_w, self.ln_b, *self.state, *self.ck, self.out,
                            self.G)
        return self.out

    def backward(self, dout, scratch_fill=None):
        """Gradients (q, k, v, eta, W1, b1, W2, b2, ln_w, ln_b) of sum(out * dout), the final state's gradient zero
        (as their model's wrapper calls it). Scratch buffers per their README's list, left uninitialised as their
        wrapper leaves them, or filled with `scratch_fill`. Their backward adds into the forward's output buffer
        (a store_add to `o`): read the output before calling this."""
        B, H, NC, CS, D = self.shape
        G, Fh, dev, f32, bf = self.G, 4 * D, self.q.device, torch.float32, torch.bfloat16

        def e(*s, dt=f32):
            return torch.empty(*s, device=dev, dtype=dt)

        scratch = [e(B, H, G, D, Fh), e(B, H, G, 1, Fh), e(B, H, G, Fh, D), e(B, H, G, 1, D),  # states in the group
                   e(B, H, G, CS, D, dt=bf), e(B, H, G, CS, 1),  # x_hat_ln, std_ln
                   *[e(B, H, G, CS, Fh, dt=bf) for _ in range(4)],  # X2, Z1, Z1_bar, X2_bar
                   e(B, H, G, CS, D, dt=bf), e(B, H, G, CS, Fh, dt=bf),  # grad_l_wrt_Z2, grad_l_wrt_Z1
                   e(B, H, G, CS, D, dt=bf), e(B, H, G, CS, D, dt=bf), e(B, H, G, CS, D, dt=bf),  # x_hat, grads
                   e(B, H, G, CS, 1)]  # std_fused
        if scratch_fill is not None:
            for t in scratch:
                t.fill_(scratch_fill)
        last = [torch.zeros_like(s) for s in self.state]
        d_ln_w, d_ln_b = torch.zeros(B, H, 1, D, device=dev), torch.zeros(B, H, 1, D, device=dev)
        d_state = [torch.zeros_like(s) for s in self.state]
        d_eta = torch.zeros(B, H, NC, CS, 1, device=dev, dtype=bf)
        d_q, d_k, d_v = (torch.zeros(self.shape, device=dev, dtype=bf) for _ in range(3))
        self.tk.ttt_backward(self.q, self.k, self.v, self.eta, self.ln_w, self.ln_b, *self.ck, self.out, *scratch,
                             *last, dout.to(bf).reshape(self.shape).contiguous(), d_ln_w, d_ln_b, *d_state, d_eta,
                             d_q, d_k, d_v, G)
        flat = [t.reshape(B, H, NC * CS, D) for t in (d_q, d_k, d_v)]
        return (*flat, d_eta.reshape(B, H, NC * CS), *d_state, d_ln_w.sum(0).reshape(H, D), d_ln_b.sum(0).reshape(H, D))


def tk_op(tk, group=16):
    """ttt-tk behind our op's signature, with autograd (their forward and backward, as ttt-video-dit's TkMLP wraps
    them), for a model's TTT layer (benchmarks/bench_block.py). The sequence is padded with zero-eta tokens to whole
    checkpoint groups (their backward needs them; a zero-eta token changes no state and its output is dropped)."""
    whole = MB * group

    class _TK(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v, eta, W1, b1, W2, b2, ln_w, ln_b):
            ctx.n, ctx.dtypes = q.shape[2], [t.dtype for t in (q, k, v, eta, W1, b1, W2, b2, ln_w, ln_b)]
            pad = (-ctx.n) % whole
            if pad:
                q, k, v = (torch.nn.functional.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
                eta = torch.nn.functional.pad(eta, (0, pad))
            ctx.run = TKRunner(tk, q, k, v, eta, (W1, b1, W2, b2), ln_w, ln_b, group)
            out = ctx.run.forward().reshape(q.shape)[:, :, : ctx.n]
            return out.to(ctx.dtypes[0], copy=True)  # a copy: their backward adds into the output buffer

        @staticmethod
        def backward(ctx, dout):
            n, padded = ctx.n, ctx.run.shape[2] * MB
            grads = list(ctx.run.backward(torch.nn.functional.pad(dout, (0, 0, 0, padded - n))))
            grads[:3] = [g[:, :, :n] for g in grads[:3]]
            grads[3] = grads[3][:, :, :n]
            del ctx.run
            return tuple(g.to(dt) for g, dt in zip(grads, ctx.dtypes))

    def op(q, k, v, eta, state, ln_weight, ln_bias, mini_batch_size=64, checkpoint_group_size=0, backend="auto"):
        if mini_batch_size != MB:
            raise ValueError(f"ttt-tk runs mini-batches of {MB} only, got {mini_batch_size}")
        return _TK.apply(q, k, v, eta, *state, ln_weight, ln_bias), None

    return op


def check_tk(tk, seeds=(1, 2), eta_scales=(1.0, 0.1, 0.01, 1e-4), B=1, H=4, N=4096, group=16) -> list[dict]:
    """ttt-tk and ours against the float64 reference (our ops, torch backend) on the same fresh draws (the GPU
    tests' inputs, eta times each scale: the tests' eta, 0.05-0.55, is far above the model's ~1e-5, to make every
    gradient term count); relative errors per tensor, and the output's over the first mini-batch alone."""
    from kernel_checks import make_inputs, rel

    from ttt_video.ttt_core import ops

    names = ["q", "k", "v", "eta", "W1", "b1", "W2", "b2", "ln_weight", "ln_bias"]
    res = []
    for seed in seeds:
        for scale in eta_scales:
            g = torch.Generator().manual_seed(seed)
            xs = make_inputs("mlp", B, H, N, 64, torch.bfloat16, "cuda", g)
            xs[3] = (xs[3] * scale).to(torch.bfloat16).float()  # their wrapper passes eta in bf16: same values for all
            dout = torch.randn(B, H, N, 64, generator=g, dtype=torch.float64).cuda()
            ref = [t.detach().double().requires_grad_(True) for t in xs]
            ref_out, _ = ops.ttt_mlp(*ref[:4], tuple(ref[4:8]), ref[8], ref[9], mini_batch_size=MB, backend="torch")
            ref_grads = torch.autograd.grad((ref_out * dout).sum(), ref)

            run = TKRunner(tk, xs[0], xs[1], xs[2], xs[3], xs[4:8], xs[8], xs[9], group)
            run.out.fill_(float("nan"))
            got = {"ttt-tk": (run.forward().reshape(B, H, N, 64).clone(), run.backward(dout))}
            leaves = [t.detach().clone().requires_grad_(True) for t in xs]
            ours, _ = ops.ttt_mlp(*leaves[:4], tuple(leaves[4:8]), leaves[8], leaves[9], mini_batch_size=MB,
                                  checkpoint_group_size=group, backend="triton")
            got["ours"] = (ours, torch.autograd.grad((ours.double() * dout).sum(), leaves))
            for who, (out, grads) in got.items():
                errs = {"who": who, "seed": seed, "eta_scale": scale, "out": rel(out, ref_out),
                        "out_mb0": rel(out[..., :MB, :], ref_out[..., :MB, :]),
                        "finite": bool(torch.isfinite(out).all() and all(torch.isfinite(t).all() for t in grads))}
                errs.update({f"d{n}": rel(a, b) for n, a, b in zip(names, grads, ref_grads)})
                res.append(errs)
                print(f"check {who:6s} seed {seed} eta x{scale:g} (B {B} H {H} N {N}): " + " ".join(
                    f"{k}={v:.1e}" if isinstance(v, float) else f"{k}={v}" for k, v in list(errs.items())[3:]),
                    flush=True)
    return res


def time_tk(tk, B, H, N, reps, with_bwd=True) -> dict:
    q, k, v, eta, st, lw, lb = ttt_inputs(B, H, N, 64, 256, "mlp")
    run = TKRunner(tk, q, k, v, eta, st, lw, lb)
    del q, k, v
    res = {"fwd_ms": _timeit(run.forward, reps=reps)}
    if with_bwd:
        dout = torch.randn(run.shape, device="cuda", dtype=torch.bfloat16)

        def fb():
            run.forward()
            run.backward(dout)

        res["fwdbwd_ms"] = _timeit(fb, reps=reps)
    del run
    _free()
    return res


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--build", default="/tmp/ttt_tk_build")
    p.add_argument("--src", default=os.path.join(HERE, "..", ".thirdparty", "ttt-tk"))
    p.add_argument("--tokens", type=int, default=351_232)
    p.add_argument("--heads", type=int, default=48)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--skip", default="", help="comma list of: check,time,ours,gdn,bwd")
    p.add_argument("--json", default="")
    a = p.parse_args(argv)
    skip = set(filter(None, a.skip.split(",")))
    tk = load_tk(a.build, a.src)
    r = {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
         "H": a.heads, "N": a.tokens}
    if "check" not in skip:
        r["check"] = check_tk(tk)
    if "time" in skip:
        return _save(r, a.json)
    H, N, bwd = a.heads, a.tokens, "bwd" not in skip
    from ttt_video.ttt_core.ops import ttt_mlp

    t0 = time.time()
    rows = {}
    for label, B, launches in (("2 launches of one direction (48 heads)", 1, 2), ("one launch, both directions", 2, 1)):
        one = time_tk(tk, B, H, N, a.reps, bwd)
        rows[f"ttt-tk {label}"] = {k: launches * v for k, v in one.items()}
        print(f"ttt-tk {label}: {rows[f'ttt-tk {label}']} ({time.time() - t0:.0f} s)", flush=True)
        if "ours" not in skip:
            one = bench_ttt(ttt_mlp, "mlp", B, H, N, 64, 256, MB, "auto", reps=a.reps, with_bwd=bwd)
            rows[f"ours {label}"] = {k: launches * v for k, v in one.items()}
            print(f"ours {label}: {rows[f'ours {label}']} ({time.time() - t0:.0f} s)", flush=True)
    if "gdn" not in skip:
        os.environ.setdefault("FLA_CACHE_RESULTS", "0")
        g = {k: 2 * v for k, v in bench_fla(1, H, N, 64, reps=a.reps, skip={"gla"}).items()}
        if g:
            rows["fla chunk_gated_delta_rule (2 x one direction)"] = {"fwd_ms": g["gdn_fwd_ms"],
                                                                       "fwdbwd_ms": g.get("gdn_fwdbwd_ms", math.nan)}
    r["rows"] = rows
    print(f"\ndevice {r['device']}, {r['date']}; B 1 x 2 directions, H {H}, N {N}, D 64, mini-batch 64, group 16")
    print("| what | forward ms | fwd+bwd ms | forward / GDN | fwd+bwd / GDN |")
    print("|---|---|---|---|---|")
    gdn = rows.get("fla chunk_gated_delta_rule (2 x one direction)", {})
    for name, t in rows.items():
        f, fb = t.get("fwd_ms", math.nan), t.get("fwdbwd_ms", math.nan)
        rf = f / gdn["fwd_ms"] if gdn else math.nan
        rfb = fb / gdn["fwdbwd_ms"] if gdn else math.nan
        print(f"| {name} | {f:.1f} | {fb:.1f} | {rf:.2f}x | {rfb:.2f}x |")
    _save(r, a.json)


def _save(r: dict, path: str):
    if path:
        with open(path, "w") as fh:
            json.dump(r, fh, indent=1)


if __name__ == "__main__":
    main()
