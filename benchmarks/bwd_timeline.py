"""The Gluon TTT-MLP backward's launches on a timeline (device; torch.profiler's CUDA kernel records): per kind of
kernel its count, busy time and how much of it ran while a kernel of another stream ran, and the gaps of the
sequential chain. Shows whether the overlap option (KERNEL_CONFIG mlp_bwd overlap) does overlap.

    python benchmarks/bwd_timeline.py --tokens 21952 --heads 48 --overlap 1
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile

import torch
from gluon_bwd_parts import add_backward_args, backward_case  # benchmarks/ is this script's directory


def _kind(name: str) -> str:
    for key, kind in (("bwd_smem", "sequential"), ("bwd_out", "output"), ("fwd_smem", "states")):
        if key in name:
            return kind
    return "other"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_backward_args(p)
    p.add_argument("--json", default="", help="also write the kernel records here")
    a = p.parse_args(argv)
    run, _, info = backward_case(a)

    run()
    torch.cuda.synchronize()
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    trace = os.path.join(tempfile.mkdtemp(), "trace.json")
    prof.export_chrome_trace(trace)
    with open(trace) as f:
        events = json.load(f)["traceEvents"]
    recs = [dict(name=e["name"], kind=_kind(e["name"]), t0=e["ts"], t1=e["ts"] + e["dur"],
                 stream=e.get("args", {}).get("stream", 0))
            for e in events if e.get("cat") == "kernel"]
    recs.sort(key=lambda x: x["t0"])
    t_start, t_end = recs[0]["t0"], max(x["t1"] for x in recs)
    res = dict(info, wall_us=round(t_end - t_start, 1), kinds={})
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
