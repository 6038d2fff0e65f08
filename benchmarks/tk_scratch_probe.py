"""Is the paper's ThunderKittens backward (ttt-tk) deterministic, and does it read its scratch before writing it?
One draw (the GPU tests' inputs), their backward run six times with the scratch buffers left uninitialised or filled
with 0 / NaN / 1e3: each run's gradient errors against float64 and the largest difference from the first run.
GPU (sm_90a) only, after scripts/build_ttt_tk.py; the repo importable as ttt_video (scripts/device_tk.sh's shim).

    python3 benchmarks/tk_scratch_probe.py [--build /tmp/ttt_tk_build] [--seeds 1 2]
"""
import argparse
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "tests", "gpu"))
import bench_tk  # noqa: E402
from kernel_checks import make_inputs, rel  # noqa: E402

from ttt_video.ttt_core import ops  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--build", default="/tmp/ttt_tk_build")
    p.add_argument("--src", default=os.path.join(HERE, "..", ".thirdparty", "ttt-tk"))
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    a = p.parse_args(argv)
    tk = bench_tk.load_tk(a.build, a.src)
    for seed in a.seeds:
        g = torch.Generator().manual_seed(seed)
        xs = make_inputs("mlp", 1, 4, 4096, 64, torch.bfloat16, "cuda", g)
        xs[3] = xs[3].to(torch.bfloat16).float()
        dout = torch.randn(1, 4, 4096, 64, generator=g, dtype=torch.float64).cuda()
        ref = [t.detach().double().requires_grad_(True) for t in xs]
        ref_out, _ = ops.ttt_mlp(*ref[:4], tuple(ref[4:8]), ref[8], ref[9], mini_batch_size=64, backend="torch")
        ref_grads = torch.autograd.grad((ref_out * dout).sum(), ref)
        first = None
        for fill in (None, 0.0, float("nan"), 1e3, None, 0.0):
            run = bench_tk.TKRunner(tk, xs[0], xs[1], xs[2], xs[3], xs[4:8], xs[8], xs[9])
            out = run.forward().clone()
            grads = run.backward(dout, scratch_fill=fill)
            torch.cuda.synchronize()
            finite = all(bool(torch.isfinite(t).all()) for t in grads)
            spread = "" if first is None else " max|diff| vs first %.2e" % max(
                (x.double() - y.double()).abs().max().item() for x, y in zip(grads, first))
            first = first or grads
            print(f"seed {seed} fill {fill}: out {rel(out.reshape(ref_out.shape), ref_out):.1e} finite {finite} errs "
                  + " ".join(f"{rel(x, y):.1e}" for x, y in zip(grads, ref_grads)) + spread, flush=True)


if __name__ == "__main__":
    main()
