"""Premise probe (session 20): do a paired launch over some heads and a one-CTA-a-head launch over the rest run
side by side on one GPU at their own rates? Times each alone and both at once at the one-minute shape."""
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_ttt import ttt_inputs  # noqa: E402

from ttt_video.kernels import ttt_triton  # noqa: E402


def fwd(args, pair):
    ttt_triton.KERNEL_CONFIG["mlp_fwd"]["pair"] = pair
    q, k, v, eta, st, lw, lb = args
    return ttt_triton._mlp_forward(q, k, v, eta, st, lw, lb, 64, 16, False)


def sl(args, h0, h1):
    q, k, v, eta, st, lw, lb = args
    return (q[:, h0:h1].contiguous(), k[:, h0:h1].contiguous(), v[:, h0:h1].contiguous(), eta[:, h0:h1].contiguous(),
            tuple(t[:, h0:h1].contiguous() for t in st), lw[h0:h1].contiguous(), lb[h0:h1].contiguous())


def timed(jobs, reps=3):
    """jobs: [(args, pair)], each on a stream of its own; returns (wall ms, [per-stream ms]) medians."""
    streams = [torch.cuda.Stream() for _ in jobs]
    walls, per = [], []
    for r in range(reps + 1):
        torch.cuda.synchronize()
        t0 = torch.cuda.Event(enable_timing=True)
        t0.record()
        ends = []
        for s, (a, p) in zip(streams, jobs):
            s.wait_event(t0)
            with torch.cuda.stream(s):
                fwd(a, p)
                e = torch.cuda.Event(enable_timing=True)
                e.record()
                ends.append(e)
        torch.cuda.synchronize()
        if r:
            per.append([t0.elapsed_time(e) for e in ends])
            walls.append(max(per[-1]))
    walls.sort()
    return walls[len(walls) // 2], [sorted(x)[len(x) // 2] for x in zip(*per)]


def main():
    N = int(os.environ.get("PROBE_TOKENS", 351168))
    H = 96
    n_mb = N // 64
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    args = ttt_inputs(1, H, N, 64, 256, "mlp")
    res = {"tokens": N, "sms": sms}
    res["all96_unpaired"] = timed([(args, 0)])[0]
    for npair in (36, 33, 30):
        A, Bx = sl(args, 0, npair), sl(args, npair, H)
        a_alone = timed([(A, 2)])[0]
        b_alone = timed([(Bx, 0)])[0]
        wall, (a_c, b_c) = timed([(A, 2), (Bx, 0)])
        # a schedule rotating the paired heads (each paired p = npair / H of its scan) at the side-by-side rates
        p = npair / H
        pred = (p * a_c + (1 - p) * b_c)
        res[f"pair{npair}"] = dict(paired_alone=a_alone, unpaired_alone=b_alone, both_wall=wall, paired_in_both=a_c,
                                   unpaired_in_both=b_c, us_mb_paired=1e3 * a_c / n_mb,
                                   us_mb_unpaired=1e3 * b_c / n_mb, rotated_prediction_ms=pred)
        print(npair, json.dumps(res[f"pair{npair}"]), flush=True)
    print("RESULT " + json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
