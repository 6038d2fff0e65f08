"""The Gluon TTT-MLP backward's launches on a timeline (device; torch.profiler's CUDA kernel records): per kind of
kernel its count, busy time and how much of it ran while a kernel of another stream ran, and the gaps of the
sequential chain. Shows whether the overlap option (KERNEL_CONFIG mlp_bwd overlap) does overlap.

    python benchmarks/bwd_timeline.py --tokens 21952 --heads 48 --overlap 1
"""
from __future__ import annotations

import argparse
import json

import torch


def _kind(name: str) -> str:
    for key, kind in (("bwd_smem", "sequential"), ("bwd_out", "output"), ("fwd_smem", "states")):
        if key in name:
            return kind
    return "other"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=21952)
    p.add_argument("--heads", type=int, default=48)
    p.add_argument("--overlap", type=int, default=None, help="default: KERNEL_CONFIG's")
    p.add_argument("--out-persist", type=int, default=1)
    p.add_argument("--json", default="", help="also write the kernel records here")
    p.add_argument("--gw-hint", type=int, default=None, help="the sequential kernel's L2 eviction hints (default: "
                   "KERNEL_CONFIG's)")
    a = p.parse_args(argv)
    from ttt_video.kernels import ttt_gluon, ttt_triton as tt

    cfg = tt.KERNEL_CONFIG["mlp_bwd"]
    a.overlap = int(cfg.get("overlap", 0)) if a.overlap is None else a.overlap
    a.gw_hint = int(cfg.get("gw_hint", 0)) if a.gw_hint is None else a.gw_hint

    B, H, N, D, mb, G = 2, a.heads, a.tokens, 64, 64, tt.DEFAULT_GROUP
    BH = B * H
    g = torch.Generator(device="cuda").manual_seed(0)

    def r(*s, dt=torch.bfloat16, scale=1.0):
        return (torch.randn(*s, generator=g, device="cuda") * scale).to(dt)

    q, k, v, dout = (r(B, H, N, D, scale=0.125) for _ in range(4))
    eta = torch.rand(B, H, N, generator=g, device="cuda") * 0.01
    state = (r(BH, D, 4 * D, dt=torch.float32, scale=0.05), r(BH, 4 * D, dt=torch.float32, scale=0.01),
             r(BH, 4 * D, D, dt=torch.float32, scale=0.05), r(BH, D, dt=torch.float32, scale=0.01))
    lnw, lnb = torch.ones(H, D, device="cuda"), torch.zeros(H, D, device="cuda")
    _, finals, cks, _ = tt._mlp_forward(q, k, v, eta, state, lnw, lnb, mb, G, save=True)
    ends = [torch.zeros_like(t) for t in finals]
    grads = (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty(B, H, N, device="cuda"))
    dlnw, dlnb = torch.empty(BH, D, device="cuda"), torch.empty(BH, D, device="cuda")

    def run():
        ttt_gluon.mlp_backward_gluon(q, k, v, eta, lnw, lnb, dout, cks, ends, mb, G, grads, [None] * 4, dlnw, dlnb,
                                     out_persist=a.out_persist, overlap=bool(a.overlap), gw_hint=bool(a.gw_hint),
                                     group_mul=tt.gluon_bwd_group_mul(G))

    run()
    torch.cuda.synchronize()
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    import os
    import tempfile

    trace = os.path.join(tempfile.mkdtemp(), "trace.json")
    prof.export_chrome_trace(trace)
    with open(trace) as f:
        events = json.load(f)["traceEvents"]
    recs = [dict(name=e["name"], kind=_kind(e["name"]), t0=e["ts"], t1=e["ts"] + e["dur"],
                 stream=e.get("args", {}).get("stream", 0))
            for e in events if e.get("cat") == "kernel"]
    recs.sort(key=lambda x: x["t0"])
    t_start, t_end = recs[0]["t0"], max(x["t1"] for x in recs)
    res = {"tokens": N, "heads": BH, "overlap": a.overlap, "gw_hint": a.gw_hint, "out_persist": a.out_persist,
           "wall_us": round(t_end - t_start, 1), "kinds": {}}
    for kind in ("states", "output", "sequential", "other"):
        ks = [x for x in recs if x["kind"] == kind]
        if not ks:
            continue
        others = [x for x in recs if x["kind"] != kind and x["stream"] != ks[0]["stream"]]
        busy = sum(x["t1"] - x["t0"] for x in ks)
        shared = sum(max(0, min(x["t1"], o["t1"]) - max(x["t0"], o["t0"])) for x in ks for o in others)
        res["kinds"][kind] = {"count": len(ks), "busy_us": round(busy, 1), "overlapped_us": round(shared, 1),
                              "streams": sorted({x["stream"] for x in ks})}
    seqs = [x for x in recs if x["kind"] == "sequential"]
    gaps = [b["t0"] - a_["t1"] for a_, b in zip(seqs, seqs[1:])]
    res["sequential_gaps_us"] = {"sum": round(sum(gaps), 1), "max": round(max(gaps), 1) if gaps else 0}
    print(json.dumps(res))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(recs, f)


if __name__ == "__main__":
    main()
