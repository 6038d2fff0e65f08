"""TTT kernel benchmark at the one-minute shape (issue 4). GPU only; not a test.

    python benchmarks/bench_ttt.py [--tokens 351168] [--heads 48] [--dim 64] [--json out.json]

Prints one table: TTT-MLP Triton forward (both directions in one launch) and forward+backward; the same as
the DiT launches it (the reversed direction runs on the forward's output: 2 launches of H heads), with the
default forward and with the gmem forward pinned; the torch
reference (timed on a slice, extrapolated linearly: the scan is sequential in N), fla's
chunk_gated_delta_rule and chunk_simple_gla at the same shape (both directions), SDPA local attention
(21 windows of ~18,048 tokens), a bf16 matmul measured in the same run, the FLOP count of the explicit
W_end form and its floor, and the three target ratios.

fla refuses its gated backward kernel on Hopper with Triton < 3.7.1 (fla issue #640, a Triton miscompile);
we bypass that guard for TIMING ONLY (its numerical results there are not used).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time

import torch
import torch.nn.functional as F


def _timeit(fn, reps: int = 5, warmup: int = 1) -> float:
    """Median milliseconds of fn() over reps, CUDA events, after warmup calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e))
    return statistics.median(times)


def _free():
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


def matmul_tflops() -> float:
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms = _timeit(lambda: a @ b, reps=20, warmup=3)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def copy_tbps() -> float:
    x = torch.empty(2**30, device="cuda", dtype=torch.uint8).random_(0, 255)
    y = torch.empty_like(x)
    ms = _timeit(lambda: y.copy_(x), reps=20, warmup=3)
    return 2 * x.numel() / (ms * 1e-3) / 1e12


def ttt_inputs(B, H, N, D, Fh, kind, dtype=torch.bfloat16, mb=64, requires_grad=False):
    dev = "cuda"
    q = F.normalize(torch.randn(B, H, N, D, device=dev, dtype=dtype), dim=-1)
    k = F.normalize(torch.randn(B, H, N, D, device=dev, dtype=dtype), dim=-1)
    v = torch.randn(B, H, N, D, device=dev, dtype=dtype)
    # realistic scale: base_lr * sigmoid(.) / head_dim / mini_batch (base_lr 0.1 MLP, 1.0 Linear)
    base_lr = 0.1 if kind == "mlp" else 1.0
    eta = base_lr * torch.sigmoid(torch.randn(B, H, N, device=dev)) / D / mb
    if kind == "mlp":
        state = [torch.randn(B, H, D, Fh, device=dev) * 0.02, torch.zeros(B, H, 1, Fh, device=dev),
                 torch.randn(B, H, Fh, D, device=dev) * 0.02, torch.zeros(B, H, 1, D, device=dev)]
    else:
        state = [torch.randn(B, H, D, D, device=dev) * 0.02, torch.zeros(B, H, 1, D, device=dev)]
    ln_w = torch.ones(H, D, device=dev) + 0.1 * torch.randn(H, D, device=dev)
    ln_b = 0.1 * torch.randn(H, D, device=dev)
    ts = [q, k, v, eta, *state, ln_w, ln_b]
    if requires_grad:
        ts = [t.detach().requires_grad_(True) for t in ts]
    q, k, v, eta, *rest = ts
    return q, k, v, eta, tuple(rest[:-2]), rest[-2], rest[-1]


def bench_ttt(op, kind, B, H, N, D, Fh, mb, backend, group=16, reps=3, with_bwd=True):
    res = {}
    q, k, v, eta, st, lw, lb = ttt_inputs(B, H, N, D, Fh, kind, mb=mb)
    with torch.no_grad():
        res["fwd_ms"] = _timeit(lambda: op(q, k, v, eta, st, lw, lb, mini_batch_size=mb, backend=backend), reps=reps)
    del q, k, v, eta, st
    _free()
    if with_bwd:
        q, k, v, eta, st, lw, lb = ttt_inputs(B, H, N, D, Fh, kind, mb=mb, requires_grad=True)
        dout = torch.randn_like(q)

        def fb():
            out, _ = op(q, k, v, eta, st, lw, lb, mini_batch_size=mb, checkpoint_group_size=group, backend=backend)
            out.backward(dout)

        res["fwdbwd_ms"] = _timeit(fb, reps=reps)
        del q, k, v, eta, st, dout
        _free()
    return res


def bench_fla(B, H, N, D, reps=3, skip=frozenset()):
    """fla Gated DeltaNet and simple_gla (Mamba2-like) at [B, N, H, D], bf16 (`skip` may hold gdn / gla)."""
    out = {}
    try:
        import fla.ops.common.chunk_o as chunk_o
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
        from fla.ops.simple_gla import chunk_simple_gla
    except Exception as e:  # noqa: BLE001 - report and go on
        print(f"fla unavailable: {e!r}", file=sys.stderr)
        return out
    chunk_o.TRITON_ABOVE_3_7_1 = True  # timing-only bypass of the #640 guard (see module docstring)
    dev, dt = "cuda", torch.bfloat16

    def mk(rg):
        q = F.normalize(torch.randn(B, N, H, D, device=dev, dtype=dt), dim=-1).requires_grad_(rg)
        k = F.normalize(torch.randn(B, N, H, D, device=dev, dtype=dt), dim=-1).requires_grad_(rg)
        v = torch.randn(B, N, H, D, device=dev, dtype=dt).requires_grad_(rg)
        g = F.logsigmoid(torch.randn(B, N, H, device=dev, dtype=torch.float32) + 4).requires_grad_(rg)
        beta = torch.sigmoid(torch.randn(B, N, H, device=dev, dtype=dt)).requires_grad_(rg)
        return q, k, v, g, beta

    q, k, v, g, beta = mk(False)
    with torch.no_grad():
        if "gdn" not in skip:
            out["gdn_fwd_ms"] = _timeit(lambda: chunk_gated_delta_rule(q, k, v, g, beta), reps=reps)
        if "gla" not in skip:
            out["gla_fwd_ms"] = _timeit(lambda: chunk_simple_gla(q, k, v, g), reps=reps)
    del q, k, v, g, beta
    _free()
    q, k, v, g, beta = mk(True)
    do = torch.randn_like(v)

    def gdn_fb():
        o, _ = chunk_gated_delta_rule(q, k, v, g, beta)
        o.backward(do)

    def gla_fb():
        o, _ = chunk_simple_gla(q, k, v, g)
        o.backward(do)

    if "gdn" not in skip:
        try:
            out["gdn_fwdbwd_ms"] = _timeit(gdn_fb, reps=reps)
        except Exception as e:  # noqa: BLE001
            print(f"gdn backward failed: {e!r}", file=sys.stderr)
    if "gla" not in skip:
        try:
            out["gla_fwdbwd_ms"] = _timeit(gla_fb, reps=reps)
        except Exception as e:  # noqa: BLE001
            print(f"simple_gla backward failed: {e!r}", file=sys.stderr)
    del q, k, v, g, beta, do
    _free()
    return out


def bench_sdpa(windows, L, H, D, reps=3):
    q, k, v = (torch.randn(windows, H, L, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    with torch.no_grad():
        ms = _timeit(lambda: F.scaled_dot_product_attention(q, k, v), reps=reps)
    del q, k, v
    _free()
    return ms


def _apply_config(spec: str):
    """'name:key=val,...' -> a copy of KERNEL_CONFIG with that entry changed (installed in place; the entries held
    before are left as they were)."""
    from ttt_video.kernels import ttt_triton

    cfg = {k: dict(v) for k, v in ttt_triton.KERNEL_CONFIG.items()}
    ttt_triton.KERNEL_CONFIG.clear()
    ttt_triton.KERNEL_CONFIG.update(cfg)
    ttt_triton.apply_config_spec(spec)
    name = spec.partition(":")[0]
    return name, ttt_triton.KERNEL_CONFIG[name]


def probe_one(spec: str, H: int, N: int, D: int, reps: int) -> dict:
    """One kernel config: correctness (bf16, small shape, fwd + bwd vs float64) then timing at full shape."""
    import os

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "gpu"))
    from kernel_checks import check

    from ttt_video.ttt_core.ops import ttt_linear, ttt_mlp

    name, cfg = _apply_config(spec)
    kind = "mlp" if name.startswith("mlp") else "linear"
    mb = 64 if kind == "mlp" else int(cfg.get("mb", 16))
    res = {"spec": spec}
    errs = check(kind, 2, 3, 10 * mb, D, mb, 4, torch.bfloat16, "cuda", seed=1234)
    res["max_rel_err"] = max(errs.values())
    res["worst"] = max(errs, key=errs.get)
    if res["max_rel_err"] < 1e-2:
        op = ttt_mlp if kind == "mlp" else ttt_linear
        res.update(bench_ttt(op, kind, 2, H, N, D, 4 * D if kind == "mlp" else D, mb, "triton", reps=reps,
                             with_bwd=name.endswith("bwd"), group=int(cfg.get("group", 16))))
    from ttt_video.kernels import ttt_triton

    if cfg.get("variant") == "split":
        res["split"] = dict(ttt_triton.SPLIT_INFO)  # groups launched, registers, spills of the split forward
    return res


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=351_168)
    p.add_argument("--heads", type=int, default=48)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--torch-slice", type=int, default=4096, help="tokens for the extrapolated torch reference")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--skip", default="", help="comma list of: mlp,dir,linear,torch,fla,gdn,gla,sdpa,bwd")
    p.add_argument("--json", default="")
    p.add_argument("--probe", default="", help="';'-separated kernel configs, each checked and timed in its own "
                   "subprocess (a crash or a wrong result does not stop the run)")
    p.add_argument("--probe-one", default="", help=argparse.SUPPRESS)
    p.add_argument("--variants", default="", help="';'-separated kernel configs to time first, e.g. "
                   "'mlp_fwd:variant=gmem,num_warps=8;linear_fwd:num_stages=3,mb=16'")
    p.add_argument("--config", default="", help="';'-separated KERNEL_CONFIG changes for the whole run, e.g. "
                   "'mlp_fwd:variant=split' (the table's TTT rows then time that variant)")
    a = p.parse_args(argv)
    for spec in filter(None, a.config.split(";")):
        _apply_config(spec)
    skip = set(filter(None, a.skip.split(",")))
    if a.probe_one:
        print("PROBE " + json.dumps(probe_one(a.probe_one, a.heads, a.tokens, a.dim, a.reps)), flush=True)
        return
    if a.probe:
        import subprocess

        probes = []
        for spec in a.probe.split(";"):
            t1 = time.time()
            cmd = [sys.executable, __file__, "--probe-one", spec, "--tokens", str(a.tokens), "--heads", str(a.heads),
                   "--dim", str(a.dim), "--reps", str(a.reps)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            lines = [l for l in proc.stdout.splitlines() if l.startswith("PROBE ")]
            rec = json.loads(lines[-1][6:]) if lines else {"spec": spec, "error": (proc.stderr or proc.stdout)[-600:]}
            rec["wall_s"] = round(time.time() - t1)
            probes.append(rec)
            print("probe", json.dumps(rec), flush=True)
        if a.json:
            with open(a.json.replace(".json", "_probe.json"), "w") as f:
                json.dump(probes, f, indent=1)
        return
    from ttt_video.ttt_core.ops import ttt_linear, ttt_mlp

    H, N, D = a.heads, a.tokens, a.dim
    Fh = 4 * D
    B2 = 2  # both directions stacked along the batch dim: one launch
    r = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "H": H, "N": N, "D": D,
         "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    import triton

    r["triton"] = triton.__version__
    r["matmul_tflops"] = matmul_tflops()
    r["copy_tbps"] = copy_tbps()
    print(f"bf16 matmul {r['matmul_tflops']:.0f} TFLOP/s, copy {r['copy_tbps']:.2f} TB/s", flush=True)

    if a.variants:
        from ttt_video.kernels import ttt_triton

        base = {k: dict(v) for k, v in ttt_triton.KERNEL_CONFIG.items()}
        r["variants"] = {}
        for spec in a.variants.split(";"):
            ttt_triton.KERNEL_CONFIG.clear()
            ttt_triton.KERNEL_CONFIG.update(base)  # each variant against the run's config (_apply_config copies)
            name, entry = _apply_config(spec)
            kind = "mlp" if name.startswith("mlp") else "linear"
            mb = 64 if kind == "mlp" else int(entry.get("mb", 16))
            t1 = time.time()
            try:
                res = bench_ttt(ttt_mlp if kind == "mlp" else ttt_linear, kind, B2, H, N, D, Fh if kind == "mlp" else D,
                                mb, "triton", reps=a.reps, with_bwd=name.endswith("bwd"))
            except Exception as e:  # noqa: BLE001 - a failing variant is reported, not fatal
                res = {"error": repr(e)[:300]}
            r["variants"][spec] = res
            print(f"variant {spec}: {res} ({time.time() - t1:.0f}s)", flush=True)
        ttt_triton.KERNEL_CONFIG.clear()
        ttt_triton.KERNEL_CONFIG.update(base)

    t0 = time.time()
    if "mlp" not in skip:
        try:
            mlp = bench_ttt(ttt_mlp, "mlp", B2, H, N, D, Fh, 64, "triton", reps=a.reps, with_bwd="bwd" not in skip)
        except Exception as e:  # noqa: BLE001 - report, then time the rest
            mlp = {"error": repr(e)[:300]}
        r.update({f"mlp_{k}": v for k, v in mlp.items()})
        print(f"ttt-mlp triton {mlp} ({time.time() - t0:.0f}s incl. compile)", flush=True)
    if "mlp" not in skip and "dir" not in skip:
        # The DiT runs the reversed direction on the forward direction's output: two launches of B x H heads
        # (48 here), where the default forward splits each head over 4 programs; gmem pinned for comparison.
        from ttt_video.kernels import ttt_triton

        base = {k: dict(v) for k, v in ttt_triton.KERNEL_CONFIG.items()}
        for key, spec in (("mlp_dir", ""), ("mlp_dir_gmem", "mlp_fwd:variant=gmem")):
            if spec:
                _apply_config(spec)
            try:
                one = bench_ttt(ttt_mlp, "mlp", 1, H, N, D, Fh, 64, "triton", reps=a.reps, with_bwd="bwd" not in skip)
                r.update({f"{key}_{k}": 2 * v for k, v in one.items()})
                if key == "mlp_dir":
                    r["mlp_dir_split"] = dict(ttt_triton.SPLIT_INFO)
            except Exception as e:  # noqa: BLE001 - report, then time the rest
                r[f"{key}_error"] = repr(e)[:300]
            print(f"ttt-mlp triton one direction per launch ({spec or 'default'}) x2: "
                  f"{ {k: v for k, v in r.items() if k.startswith(key + '_')} }", flush=True)
            ttt_triton.KERNEL_CONFIG.clear()
            ttt_triton.KERNEL_CONFIG.update({k: dict(v) for k, v in base.items()})
    if "linear" not in skip:
        for mb in (16, 64):
            lin = bench_ttt(ttt_linear, "linear", B2, H, N, D, D, mb, "triton", reps=a.reps,
                            with_bwd="bwd" not in skip)
            r.update({f"lin{mb}_{k}": v for k, v in lin.items()})
            print(f"ttt-linear mb{mb} triton {lin} ({time.time() - t0:.0f}s since start)", flush=True)
    if "torch" not in skip:
        ns = a.torch_slice
        tr = bench_ttt(ttt_mlp, "mlp", B2, H, ns, D, Fh, 64, "torch", reps=1, with_bwd="bwd" not in skip)
        r.update({f"torch_mlp_{k}": v * N / ns for k, v in tr.items()})
        print(f"ttt-mlp torch slice {ns}: {tr}", flush=True)
    if "fla" not in skip:
        # one direction at a time (B=2 runs out of memory in fla's fwd+bwd at this length); x2 = both
        r.update({k: 2 * v for k, v in bench_fla(1, H, N, D, reps=a.reps, skip=skip).items()})
        print({k: v for k, v in r.items() if k.startswith(("gdn", "gla"))}, f"({time.time() - t0:.0f}s since start)",
              flush=True)
    if "sdpa" not in skip:
        r["sdpa_ms"] = bench_sdpa(21, 18_048, H, D, reps=a.reps)

    # FLOPs of the explicit W_end form (7 matmuls of 2 b D F per mini-batch of b tokens), both directions
    flops_fwd = 2 * 7 * 2 * N * D * Fh * H
    r["mlp_fwd_tflop"] = flops_fwd / 1e12
    r["mlp_fwd_floor_ms"] = flops_fwd / (r["matmul_tflops"] * 1e12) * 1e3
    bytes_fwd = 2 * (4 * N * H * D * 2 + N * H * 4)
    r["mlp_fwd_bytes_floor_ms"] = bytes_fwd / (r["copy_tbps"] * 1e12) * 1e3

    rows = []

    def row(name, key, flops=None):
        if key in r:
            ms = r[key]
            tf = f"{flops / (ms * 1e-3) / 1e12:7.1f}" if flops else "      -"
            rows.append(f"| {name:<52} | {ms:10.1f} | {tf} |")

    print()
    print(f"device {r['device']}, torch {r['torch']}, triton {r['triton']}, {r['date']}")
    print(f"shape B=1 x 2 directions, H={H}, N={N}, D={D}, F={Fh}; bf16 matmul {r['matmul_tflops']:.0f} TFLOP/s "
          f"(= 100%), copy {r['copy_tbps']:.2f} TB/s")
    print(f"TTT-MLP fwd FLOPs (explicit W_end, both dirs) {r['mlp_fwd_tflop']:.2f} TFLOP; floor "
          f"{r['mlp_fwd_floor_ms']:.1f} ms (compute), {r['mlp_fwd_bytes_floor_ms']:.1f} ms (bytes)")
    print("| what (both directions unless noted)                  |    ms      | TFLOP/s |")
    print("|------------------------------------------------------|------------|---------|")
    row("TTT-MLP triton forward", "mlp_fwd_ms", flops_fwd)
    row("TTT-MLP triton forward+backward (G=16)", "mlp_fwdbwd_ms", flops_fwd * 33 / 7)
    for spec, res in r.get("variants", {}).items():  # --variants: the rows above with a KERNEL_CONFIG change
        for what, mul in (("fwd", 1), ("fwdbwd", 33 / 7)):
            if spec.startswith("mlp") and f"{what}_ms" in res:
                r[f"variant_{spec}_{what}_ms"] = res[f"{what}_ms"]
                row(f"  same, {spec}: {what}", f"variant_{spec}_{what}_ms", flops_fwd * mul)
    row("TTT-MLP triton fwd, 2 launches of 1 direction (DiT)", "mlp_dir_fwd_ms", flops_fwd)
    row("TTT-MLP triton fwd+bwd, 2 launches of 1 direction", "mlp_dir_fwdbwd_ms", flops_fwd * 33 / 7)
    row("  same, gmem forward pinned: fwd", "mlp_dir_gmem_fwd_ms", flops_fwd)
    row("  same, gmem forward pinned: fwd+bwd", "mlp_dir_gmem_fwdbwd_ms", flops_fwd * 33 / 7)
    row("TTT-MLP torch forward (extrapolated)", "torch_mlp_fwd_ms", flops_fwd)
    row("TTT-MLP torch forward+backward (extrapolated)", "torch_mlp_fwdbwd_ms")
    row("TTT-Linear mb16 triton forward", "lin16_fwd_ms", 2 * 3 * 2 * N * D * D * H)
    row("TTT-Linear mb16 triton forward+backward", "lin16_fwdbwd_ms")
    row("TTT-Linear mb64 triton forward", "lin64_fwd_ms", 2 * 3 * 2 * N * D * D * H)
    row("TTT-Linear mb64 triton forward+backward", "lin64_fwdbwd_ms")
    row("fla chunk_gated_delta_rule forward (2 x one direction)", "gdn_fwd_ms")
    row("fla chunk_gated_delta_rule fwd+bwd (2 x one direction)", "gdn_fwdbwd_ms")
    row("fla chunk_simple_gla forward (2 x one direction)", "gla_fwd_ms")
    row("fla chunk_simple_gla fwd+bwd (2 x one direction)", "gla_fwdbwd_ms")
    row("SDPA local attention fwd (21 x 18,048, once)", "sdpa_ms", 21 * 4 * 18_048**2 * D * H)
    print("\n".join(rows))
    ratios = {}
    if "gdn_fwd_ms" in r and "mlp_fwd_ms" in r:
        ratios["mlp_fwd / gdn_fwd (target <= 1.0, stretch 0.5)"] = r["mlp_fwd_ms"] / r["gdn_fwd_ms"]
    if "gdn_fwd_ms" in r and "mlp_dir_fwd_ms" in r:
        ratios["mlp_fwd as the DiT launches it (2 x one direction) / gdn_fwd"] = r["mlp_dir_fwd_ms"] / r["gdn_fwd_ms"]
    if "gdn_fwdbwd_ms" in r and "mlp_dir_fwdbwd_ms" in r:
        ratios["mlp_fwdbwd as the DiT launches it / gdn_fwdbwd"] = r["mlp_dir_fwdbwd_ms"] / r["gdn_fwdbwd_ms"]
    if "gdn_fwdbwd_ms" in r and "mlp_fwdbwd_ms" in r:
        ratios["mlp_fwdbwd / gdn_fwdbwd (target <= 1.5)"] = r["mlp_fwdbwd_ms"] / r["gdn_fwdbwd_ms"]
    if "gdn_fwd_ms" in r and "lin16_fwd_ms" in r:
        ratios["linear_fwd(mb16) / gdn_fwd (target <= 0.5)"] = r["lin16_fwd_ms"] / r["gdn_fwd_ms"]
    for k, v in ratios.items():
        print(f"ratio {k}: {v:.2f}")
    r["ratios"] = ratios
    if a.json:
        with open(a.json, "w") as f:
            json.dump(r, f, indent=1)


if __name__ == "__main__":
    main()
