"""CPU inference of the torch TTT-MLP backend: the readable differentiable loop vs the fused inference loop,
side by side in one run, at the embedded default's one-minute shape; then one DiT forward of the embedded
default (CFG batch of 2). Not a test.

    python benchmarks/bench_cpu_inference.py [--reps 3] [--threads N]

The embedded default (preset toyworld) at 63 s: 2 heads of 64, TTT-MLP hidden 256, mini-batch 64,
6,072 video + 1,512 text tokens = 7,584 -> 7,616 after padding to the mini-batch; B = 2 (conditional and
unconditional in one batch); 6 layers x 2 directions = 12 scans per DiT forward.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def _median_s(fn, reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    from ttt_video.ttt_core import ops, pipeline

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    g = torch.Generator().manual_seed(0)
    B, H, N, D, Fh, mb = 2, 2, 7616, 64, 256, 64
    q, k, v = (torch.nn.functional.normalize(torch.randn(B, H, N, D, generator=g), dim=-1) for _ in range(3))
    eta = torch.rand(B, H, N, generator=g) * 0.05
    state = (torch.randn(B, H, D, Fh, generator=g) * 0.05, torch.zeros(B, H, 1, Fh),
             torch.randn(B, H, Fh, D, generator=g) * 0.05, torch.zeros(B, H, 1, D))  # fmt: skip
    ln_w, ln_b = torch.ones(H, D), torch.zeros(H, D)
    ln_w4, ln_b4 = ln_w.reshape(1, H, 1, D), ln_b.reshape(1, H, 1, D)

    def readable():
        with torch.no_grad():
            ops._scan(ops._mlp_step, state, q, k, v, eta, ln_w4, ln_b4, mb, 0)

    def fused():
        with torch.no_grad():
            ops.ttt_mlp(q, k, v, eta, state, ln_w, ln_b, mb, backend="torch")

    t_read, t_fused = _median_s(readable, a.reps), _median_s(fused, a.reps)

    bundle = pipeline.load_model_bundle(pipeline.EMBEDDED_DEFAULT_DIR, device="cpu", dtype="float32")
    model, cfg = bundle.transformer, bundle.transformer.config
    x = torch.randn(2, 13 + 12 * 20, cfg.in_channels, cfg.sample_height, cfg.sample_width, generator=g)
    text = torch.randn(2, 21, cfg.max_text_seq_length, cfg.text_embed_dim, generator=g)
    t = torch.tensor([500, 500])

    def forward():
        with torch.no_grad():
            model(x, text, t)

    t_fwd = _median_s(forward, a.reps)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; shape B={B} H={H} N={N} D={D} F={Fh} mb={mb}")
    print("| what | ms | ratio |")
    print("|---|---|---|")
    print(f"| TTT-MLP scan, readable differentiable step (no grad) | {1000 * t_read:.1f} | 1.00 |")
    print(f"| TTT-MLP scan, fused inference loop (the torch backend without autograd) | {1000 * t_fused:.1f} | "
          f"{t_fused / t_read:.2f} |")
    print(f"| DiT forward, embedded default, 63 s, CFG batch 2 (12 fused scans) | {1000 * t_fwd:.0f} | |")
    print(f"| of which TTT scans (12 x fused) | {12000 * t_fused:.0f} | {12 * t_fused / t_fwd:.2f} of the forward |")


if __name__ == "__main__":
    main()
