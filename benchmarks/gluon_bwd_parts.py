"""Time the Gluon TTT-MLP backward's two launches apart, on the device (issue 4's backward work).

Per checkpoint group the backward issues the STATES forward (recompute: the state at each mini-batch's start into
scratch slots), the output-path kernel (all mini-batches at once) and the sequential kernel; this prints the whole
backward and each kind of launch alone, at one shape:

    python benchmarks/gluon_bwd_parts.py --tokens 21952 --heads 48      # B = 2 directions
"""
from __future__ import annotations

import argparse
import json

import torch
from bench_ttt import _timeit  # benchmarks/ is this script's directory


def add_backward_args(p: argparse.ArgumentParser):
    """The shape and the backward's KERNEL_CONFIG mlp_bwd options (bwd_timeline.py takes the same); an option left
    out keeps the configured value."""
    p.add_argument("--tokens", type=int, default=21952)
    p.add_argument("--heads", type=int, default=48)
    p.add_argument("--out-persist", type=int, default=None,
                   help="the output-path kernel as one CTA an SM (0: one a item; n > 1: n CTAs)")
    p.add_argument("--out-tma-c", type=int, default=None, help="its bf16 terms out by TMA (0: plain stores)")
    p.add_argument("--overlap", type=int, default=None,
                   help="the sequential kernels on a high-priority stream beside the next group's other launches")
    p.add_argument("--gw-hint", type=int, default=None, help="the sequential kernel's L2 eviction hints")
    p.add_argument("--bwd-group", type=int, default=None, help="the backward's groups: this many mini-batches, a "
                   "multiple of --group (0: --group)")
    p.add_argument("--group", type=int, default=0, help="mini-batches a checkpoint group (0: the default)")
    p.add_argument("--pair", type=int, default=None, help="the sequential kernel with two CTAs a head (0 never, "
                   "1 where heads leave SMs idle, 2 always)")


def backward_case(a):
    """Random bf16 inputs (B = 2 directions x a.heads), the forward with checkpoints, and a.* resolved against
    KERNEL_CONFIG: (backward(parts), forward(), info), the first two callables for timing."""
    from ttt_video.kernels import ttt_gluon, ttt_triton as tt

    cfg = tt.KERNEL_CONFIG["mlp_bwd"]  # the options given on the command line, into the (process's) config
    for key in ("out_persist", "out_tma_c", "overlap", "gw_hint", "bwd_group", "pair"):
        if getattr(a, key) is not None:
            cfg[key] = getattr(a, key)
    B, H, N, D, F, mb, G = 2, a.heads, a.tokens, 64, 256, 64, a.group or tt.DEFAULT_GROUP
    BH = B * H
    g = torch.Generator(device="cuda").manual_seed(0)
    dev = dict(device="cuda")

    def r(*s, dt=torch.bfloat16, scale=1.0):
        return (torch.randn(*s, generator=g, **dev) * scale).to(dt)

    q, k, v, dout = (r(B, H, N, D, scale=0.125) for _ in range(4))
    eta = torch.rand(B, H, N, generator=g, **dev) * 0.01
    state = (r(BH, D, F, dt=torch.float32, scale=0.05), r(BH, F, dt=torch.float32, scale=0.01),
             r(BH, F, D, dt=torch.float32, scale=0.05), r(BH, D, dt=torch.float32, scale=0.01))
    lnw, lnb = torch.ones(H, D, **dev), torch.zeros(H, D, **dev)
    out, finals, cks, ck_fc = tt._mlp_forward(q, k, v, eta, state, lnw, lnb, mb, G, save=True)
    assert ck_fc == 0, "the Gluon forward did not run (not a Hopper GPU?)"
    ends = [torch.zeros_like(t) for t in finals]
    grads = (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty(B, H, N, **dev))
    dlnw, dlnb = torch.empty(BH, D, **dev), torch.empty(BH, D, **dev)
    opts = tt.gluon_bwd_options(G)

    def backward(parts=("states", "out", "backward")):
        ttt_gluon.mlp_backward_gluon(q, k, v, eta, lnw, lnb, dout, cks, ends, mb, G, grads, [None] * 4, dlnw, dlnb,
                                     parts=parts, **opts)

    def forward():
        tt._mlp_forward(q, k, v, eta, state, lnw, lnb, mb, G, save=True)

    info = dict(tokens=N, heads=BH, device=torch.cuda.get_device_name(), group=G, bwd_group=G * opts["group_mul"],
                n_minibatches=N // mb, **{key: int(val) for key, val in opts.items() if key != "group_mul"})
    return backward, forward, info


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_backward_args(p)
    p.add_argument("--reps", type=int, default=3)
    a = p.parse_args(argv)
    backward, forward, res = backward_case(a)
    for name, parts in [("backward_ms", ("states", "out", "backward")), ("states_only_ms", ("states",)),
                        ("out_only_ms", ("out",)), ("sequential_only_ms", ("backward",))]:
        res[name] = _timeit(lambda: backward(parts), reps=a.reps)
    res["forward_ms"] = _timeit(forward, reps=a.reps)
    n_mb = res["n_minibatches"]
    res["us_per_minibatch"] = {k_: round(res[k_] * 1e3 / n_mb, 2) for k_ in res if k_.endswith("_ms")}
    print(json.dumps(res))


if __name__ == "__main__":
    main()
