"""One CogVideoX-5B block at the one-minute shape with each global layer: the paper's Fig. 6 (speed relative to the
local-attention model) measured at one block, in one run. GPU only; not a test.

    python benchmarks/bench_block.py [--segments 21] [--reps 3] [--variants local,ours,ttt-tk,gdn] [--json out.json]

Variants, each a `TTTDiT` of one block (5B preset, bf16, random weights), timed on the block alone:
- local: segment-local attention and the feed-forward only (global_layer 'none'): the paper's baseline;
- ours: + the bidirectional gated TTT-MLP layer on our kernels (two launches of 48 heads, as the model runs it);
- ttt-tk: the same layer with the paper's ThunderKittens kernels in place of our op (bench_tk.tk_op; needs
  scripts/build_ttt_tk.py's build);
- gdn: the same layer with fla's chunk_gated_delta_rule in place of the TTT-MLP op (same projections, its decay and
  beta made from the layer's per-token learning-rate logits): the op swapped, not a tuned Gated DeltaNet layer.
Inference = the block's forward without autograd; training = forward + backward (scan checkpoints every 16
mini-batches, as in training), all parameters trainable. The paper's Fig. 6 (63 s, whole model, relative to local
attention): TTT-MLP 2.5x inference / 3.8x training, Gated DeltaNet 1.8x / 1.8x.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from bench_ttt import _free, _timeit  # noqa: E402

# the paper's Fig. 6 (63 s, whole model, inference / training, relative to local attention), per variant
PAPER_FIG6 = {"local": "1x", "ours": "2.5x / 3.8x (TTT-MLP)", "ttt-tk": "2.5x / 3.8x (TTT-MLP)", "gdn": "1.8x / 1.8x"}


def gdn_op(q, k, v, eta, state, ln_weight, ln_bias, mini_batch_size=64, checkpoint_group_size=0, backend="auto"):
    """fla's Gated DeltaNet with our op's signature: q, k, v [B, H, N, D] -> out [B, H, N, D]. Decay and beta from
    eta (a per-token sigmoid of the layer's logits, rescaled back to [0, 1])."""
    import fla.ops.common.chunk_o as chunk_o
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule

    chunk_o.TRITON_ABOVE_3_7_1 = True  # timing only, as bench_ttt.bench_fla: fla #640's guard refuses the backward
    qt, kt, vt = (t.transpose(1, 2).to(torch.bfloat16) for t in (q, k, v))
    # eta = base_lr (0.1 for TTT-MLP) * sigmoid(logits) / head_dim / mini_batch: back to the sigmoid's [0, 1]
    logits = (eta.float() * (mini_batch_size * q.shape[-1] / 0.1)).transpose(1, 2)
    g = F.logsigmoid(logits * 8 + 4)  # decays near 1, as bench_ttt's draws
    beta = logits.to(torch.bfloat16)
    out, _ = chunk_gated_delta_rule(qt, kt, vt, g, beta)
    return out.transpose(1, 2).to(q.dtype), None


def build_block(variant: str, segments: int, op):
    """(block, its call arguments for inference, for training) of a one-block 5B TTTDiT whose TTT layer calls `op`."""
    from ttt_video.ttt_core import ttt_layer
    from ttt_video.ttt_core.config import preset
    from ttt_video.ttt_core.dit import TTTDiT
    from ttt_video.ttt_core.geometry import latent_frames_for_segments

    ttt_layer.ttt_mlp = op  # the layer calls its module's ttt_mlp
    cfg = preset("cogvideox-5b", num_layers=1, global_layer="none" if variant == "local" else "ttt_mlp")
    model = TTTDiT(cfg).to("cuda", torch.bfloat16)
    shape = (1, latent_frames_for_segments(segments), cfg.in_channels, cfg.sample_height, cfg.sample_width)
    latents = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    text = torch.randn(1, segments, cfg.max_text_seq_length, cfg.text_embed_dim, device="cuda", dtype=torch.bfloat16)
    block = model.transformer_blocks[0]
    captured = []

    def keep_args(module, args):
        captured.append(args)

    hook = block.register_forward_pre_hook(keep_args)
    model.eval()
    with torch.no_grad():  # one model forward gives the block's arguments (and compiles the kernels)
        model(latents, text, torch.tensor([500], device="cuda"))
    hook.remove()
    video, text_tokens, emb, layout = captured[0]
    train_layout = dataclasses.replace(layout, scan_checkpoint_group=cfg.scan_checkpoint_group_size)
    return block, (video, text_tokens, emb, layout), (video, text_tokens, emb, train_layout)


def time_block(block, infer_args, train_args, reps, with_bwd=True) -> dict:
    res = {"tokens": infer_args[0].shape[1] + infer_args[1].shape[1]}
    with torch.no_grad():
        res["fwd_ms"] = _timeit(lambda: block(*infer_args), reps=reps)
    if with_bwd:
        block.train()
        gv, gt = torch.randn_like(train_args[0]), torch.randn_like(train_args[1])

        def fb():
            v, t = block(*train_args)
            torch.autograd.backward([v, t], [gv, gt])

        try:
            res["fwdbwd_ms"] = _timeit(fb, reps=reps)
        except torch.OutOfMemoryError as e:
            res["fwdbwd_error"] = f"out of memory: {str(e)[:160]}"
        res["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return res


def profile_block(variant: str, segments: int, op, rows: int = 30):
    """Where one inference forward of the block goes: torch.profiler's CUDA kernel table (after a warm-up call)."""
    from torch.profiler import ProfilerActivity, profile

    block, infer_args, _ = build_block(variant, segments, op)
    with torch.no_grad():
        block(*infer_args)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU], record_shapes=True) as prof:
            block(*infer_args)
            torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows, max_name_column_width=70))
    print(prof.key_averages(group_by_input_shape=True).table(sort_by="cuda_time_total", row_limit=rows,
                                                             max_name_column_width=50, max_shapes_column_width=70))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--segments", type=int, default=21)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--variants", default="local,ours,ttt-tk,gdn")
    p.add_argument("--no-bwd", action="store_true")
    p.add_argument("--tk-build", default="/tmp/ttt_tk_build")
    p.add_argument("--json", default="")
    p.add_argument("--profile", default="", help="a variant: profile one inference forward of its block (torch "
                   "profiler, the top CUDA kernels by time) instead of the table")
    a = p.parse_args(argv)
    from ttt_video.ttt_core import ttt_layer

    ours = ttt_layer.ttt_mlp
    if a.profile:
        return profile_block(a.profile, a.segments, ours)
    ops = {"local": ours, "ours": ours, "gdn": gdn_op}
    variants = a.variants.split(",")
    if "ttt-tk" in variants:
        import bench_tk

        try:
            src = os.path.join(HERE, "..", ".thirdparty", "ttt-tk")
            ops["ttt-tk"] = bench_tk.tk_op(bench_tk.load_tk(a.tk_build, src))
        except Exception as e:  # noqa: BLE001 - report, time the others
            print(f"ttt-tk unavailable: {e!r}"[:400], flush=True)
    r = {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
         "segments": a.segments, "rows": {}}
    for variant in variants:
        t0 = time.time()
        torch.cuda.reset_peak_memory_stats()
        try:
            if variant not in ops:
                raise RuntimeError(f"no op for {variant!r} (known: {', '.join(ops)})")
            block, infer_args, train_args = build_block(variant, a.segments, ops[variant])
            r["rows"][variant] = time_block(block, infer_args, train_args, a.reps, not a.no_bwd)
            del block, infer_args, train_args
        except Exception as e:  # noqa: BLE001 - a failing variant is reported, not fatal
            r["rows"][variant] = {"error": repr(e)[:300]}
        ttt_layer.ttt_mlp = ours
        _free()
        print(f"{variant}: {r['rows'][variant]} ({time.time() - t0:.0f} s)", flush=True)
    base = r["rows"].get("local", {})
    nan = float("nan")
    print(f"\ndevice {r['device']}, {r['date']}; one CogVideoX-5B block (bf16), {a.segments} segments, "
          f"{base.get('tokens', '?')} tokens")
    print("| block | inference ms | training ms | inference / local | training / local | paper Fig. 6 (whole model) |")
    print("|---|---|---|---|---|---|")
    for variant, t in r["rows"].items():
        f, fb = t.get("fwd_ms", nan), t.get("fwdbwd_ms", nan)
        rf, rfb = f / base.get("fwd_ms", nan), fb / base.get("fwdbwd_ms", nan)
        print(f"| {variant} | {f:.1f} | {fb:.1f} | {rf:.2f}x | {rfb:.2f}x | {PAPER_FIG6.get(variant, '')} |")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(r, fh, indent=1)


if __name__ == "__main__":
    main()
