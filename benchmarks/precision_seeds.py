"""Relative error of the TTT kernels against float64, over several fixed seeds (device only).

One seed is one draw; a bound like "< 1e-2 for bf16 operands" needs the spread over draws, and a kernel
change needs the same draws before and after. This runs the long-sequence case of tests/gpu (4,096 tokens,
64 chained mini-batches, bf16) for each seed with the repo's kernels and, with --other FILE, with another
version of kernels/ttt_triton.py (e.g. `git show <commit>:kernels/ttt_triton.py > old.py`) on the same seeds.

    python benchmarks/precision_seeds.py --seeds 6 [--other old.py] [--config mlp_bwd:variant=gmem] [--json out.json]
    python benchmarks/precision_seeds.py --kind linear --shape 1,2,4096,64,16,16 --seed-list 506004197,251556017

--shape B,H,N,D,MB,G picks another case of tests/gpu (e.g. 2,3,640,64,64,4); --repeat R runs every seed R times:
a deterministic kernel gives the same numbers each time, a race does not.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "gpu"))
from kernel_checks import check  # noqa: E402

SHAPE = ("mlp", 1, 2, 4096, 64, 64, 16, "bf16")  # kind, B, H, N (--tokens), D, mini-batch, group, dtype (--dtype)


def _load_other(path: str):
    """Load another ttt_triton.py as a module of the same package (its relative imports then resolve)."""
    import ttt_video.kernels as pkg

    spec = importlib.util.spec_from_file_location("ttt_video.kernels._other_ttt_triton", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return pkg, mod


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def run(seeds, label: str, shape: tuple, device: str, dtype: str, repeat: int = 1, seed0: int = 1000) -> list[dict]:
    """``seeds``: a count (seeds seed0, seed0 + 1, ...) or a list of seeds."""
    rows = []
    kind, B, H, N, D, mb, G = shape
    dt = DTYPES[dtype]
    for seed in (range(seed0, seed0 + seeds) if isinstance(seeds, int) else seeds):
        for rep in range(repeat):
            errs = check(kind, B, H, N, D, mb, G, dt, device, seed=seed)
            worst = max(errs, key=errs.get)
            rows.append({"kernels": label, "seed": seed, "rep": rep, "max": errs[worst], "worst": worst, "errs": errs})
            print(f"{label:6s} seed {seed} rep {rep}: max {errs[worst]:.2e} ({worst}); out {errs['out']:.1e}, "
                  f"dq {errs['dq']:.1e}, dk {errs['dk']:.1e}, dW1 {errs['dW1']:.1e}", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=6)
    ap.add_argument("--other", default=None, help="another kernels/ttt_triton.py to run on the same seeds")
    ap.add_argument("--json", default=None)
    ap.add_argument("--tokens", type=int, default=SHAPE[3], help="sequence length (a multiple of 64)")
    ap.add_argument("--shape", default="", help="B,H,N,D,MB,G (overrides --tokens)")
    ap.add_argument("--repeat", type=int, default=1, help="runs of each seed (a race gives different numbers)")
    ap.add_argument("--seed0", type=int, default=1000)
    ap.add_argument("--seed-list", default="",
                    help="comma list of seeds (e.g. a test's logged draws) instead of --seeds")
    ap.add_argument("--kind", default="mlp", choices=["mlp", "linear"],
                    help="the TTT layer (--shape's MB: its mini-batch)")
    ap.add_argument("--split-any-shape", action="store_true",
                    help="let the split forward run at this (D, mini-batch) although the device has not verified it")
    ap.add_argument("--device", default="cuda", help="cuda; cpu runs the kernels under TRITON_INTERPRET=1")
    ap.add_argument("--dtype", default="bf16", choices=sorted(DTYPES), help="operand dtype (the interpreter: fp16)")
    ap.add_argument("--config", default="", help="';'-separated KERNEL_CONFIG changes for the repo's kernels, e.g. "
                    "'mlp_bwd:variant=gmem' (bench_ttt.py's syntax)")
    args = ap.parse_args()
    if args.config:
        from bench_ttt import _apply_config

        for spec in filter(None, args.config.split(";")):
            _apply_config(spec)
    _, B, H, _, D, mb, G, _ = SHAPE
    kind = args.kind
    shape = (kind, *map(int, args.shape.split(","))) if args.shape else (kind, B, H, args.tokens, D, mb, G)
    seeds = [int(x) for x in args.seed_list.split(",")] if args.seed_list else args.seeds
    if args.split_any_shape:
        from ttt_video.kernels import ttt_triton

        ttt_triton.SPLIT_DEVICE_VERIFIED = ttt_triton.SPLIT_DEVICE_VERIFIED | {(shape[4], shape[5])}
    rows = run(seeds, "repo", shape, args.device, args.dtype, args.repeat, args.seed0)
    if args.other:
        pkg, other = _load_other(args.other)
        repo_mod = pkg.ttt_triton
        pkg.ttt_triton = other  # what kernel_checks.check imports
        sys.modules["ttt_video.kernels.ttt_triton"] = other
        try:
            rows += run(seeds, "other", shape, args.device, args.dtype, args.repeat, args.seed0)
        finally:
            pkg.ttt_triton = repo_mod
            sys.modules["ttt_video.kernels.ttt_triton"] = repo_mod
    for label in sorted({r["kernels"] for r in rows}):
        m = [r["max"] for r in rows if r["kernels"] == label]
        print(f"{label}: max rel err over {len(m)} runs: mean {sum(m) / len(m):.2e}, worst {max(m):.2e}")
        if args.repeat > 1:
            by_seed = {}
            for r in rows:
                if r["kernels"] == label:
                    by_seed.setdefault(r["seed"], []).append(r["max"])
            spread = max(max(v) - min(v) for v in by_seed.values())
            print(f"{label}: largest spread of one seed's max error over its {args.repeat} runs: {spread:.2e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"case": [*shape, args.dtype], "device": args.device, "rows": rows},
                      f, indent=1)


if __name__ == "__main__":
    main()
