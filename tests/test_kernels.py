"""Triton TTT kernels on CPU through Triton's interpreter (TRITON_INTERPRET=1), at small shapes.

The interpreter must be switched on before triton is imported, so the kernel runs happen in one
subprocess (this file run as a script); the pytest process itself never sets TRITON_INTERPRET, so other
test modules that import triton are unaffected. Each case draws fresh random inputs, poisons every kernel
output (NaN) and compares output, final state and all gradients with ttt_core.ops' torch backend in
float64 (tests/gpu/kernel_checks.py, shared with the device tests in tests/gpu/).

bf16 is checked on the device only: Triton 3.9's interpreter computes tl.dot on bf16 casts wrongly
(a plain fp32 -> bf16 cast followed by tl.dot gives errors of 1e10 there), so here fp32 and fp16 run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent

# kind, B, H, N, D, mini_batch, group, dtype name[, KERNEL_CONFIG changes]
# The default MLP forward is the "split" one (each head's hidden units over F / 64 programs that meet every
# mini-batch; here, where programs run one after another, a group of one program: the exchange, the deferred
# output and the checkpoints still run, the cross-program meeting is checked on the device, tests/gpu). The
# default backward is "gmem" (state in global memory, F-chunks of FC columns; FC = F/2 at these small shapes,
# so the chunk loops run). The cases with changes pin the other variants: the gmem forward (the fallback where
# a launch has more heads than the GPU runs groups at once), with f(q; W_end) fused into its update pass, the
# whole-state "plain" forward and backward, and the split forward without parking or with its row-wise work
# shared out (rowshare).
# The gmem kernels keep W1 chunk-major ([F / FC, D, FC]); the checkpoints are re-laid out when the backward
# reads another layout (plain backward: row-major; a plain forward's row-major checkpoints; another FC).
PLAIN_BWD = {"mlp_bwd": {"variant": "plain"}}
GMEM_FWD = {"mlp_fwd": {"variant": "gmem"}}
FUSED_OUT = {"mlp_fwd": {"variant": "gmem", "out_pass": 0}}
PLAIN_FWD = {"mlp_fwd": {"variant": "plain"}}
NARROW_FWD_CHUNKS = {"mlp_fwd": {"variant": "gmem", "fc": 16}}
SPLIT_NO_PARK = {"mlp_fwd": {"park": 0}}
SPLIT_ROWSHARE = {"mlp_fwd": {"rowshare": 1}}  # rows of the LN work shared out, a second meeting for p2
SPLIT_ROWSHARE_NO_PARK = {"mlp_fwd": {"rowshare": 1, "park": 0}}
GMEM_BWD = {"mlp_bwd": {"variant": "gmem"}}  # the backward's fallback (the default split runs as a group of one here)
# The Linear forward's default ("auto") runs pipe (each mini-batch's output computed in the next one's dot) at
# mini-batch 16 and plain above; the cases with changes pin the other choice.
LINEAR_PIPE = {"linear_fwd": {"variant": "pipe"}}
LINEAR_PLAIN = {"linear_fwd": {"variant": "plain"}}
# pipe's LayerNorm row sums: two paired reductions (the default, "fused_sums") or four; "_inputs": check() options,
# here LayerNorm inputs with large row means (bias mean 30: without pipe's centring the one-pass variance cost
# 1.6e-3 in out). Those cases check the forward only (out, final state): the backward recomputes z uncentred with
# two-pass statistics, and its fp32 gradients there (1.5e-4 in dk) are the problem's conditioning, not this choice.
LINEAR_FOUR_SUMS = {"linear_fwd": {"fused_sums": 0}}
LARGE_MEANS = {"_inputs": {"mean_shift": 30.0}}
CASES = [
    ("mlp", 2, 2, 80, 16, 16, 2, "float32"),  # 5 mini-batches, groups of 2 (last group partial); F=64
    ("mlp", 1, 3, 64, 16, 16, 0, "float32"),  # default group size
    ("mlp", 1, 2, 64, 32, 16, 3, "float16"),
    ("mlp", 1, 1, 96, 32, 32, 2, "float32"),  # D=32, F=128, mini-batch 32
    ("mlp", 1, 2, 16, 16, 16, 1, "float32"),  # one mini-batch: every output is finished after the scan
    ("mlp", 1, 2, 64, 32, 16, 3, "float16", SPLIT_NO_PARK),
    ("mlp", 2, 2, 80, 16, 16, 2, "float32", SPLIT_ROWSHARE),
    ("mlp", 1, 2, 16, 16, 16, 1, "float32", SPLIT_ROWSHARE),  # one mini-batch
    ("mlp", 1, 2, 64, 32, 16, 3, "float16", SPLIT_ROWSHARE_NO_PARK),
    ("mlp", 2, 2, 80, 16, 16, 2, "float32", GMEM_BWD),
    ("mlp", 1, 2, 16, 16, 16, 1, "float32", GMEM_BWD),
    ("mlp", 1, 2, 64, 32, 16, 3, "float16", GMEM_BWD),
    ("mlp", 2, 2, 80, 16, 16, 2, "float32", GMEM_FWD),
    ("mlp", 1, 1, 96, 32, 32, 2, "float32", GMEM_FWD),  # F=128: chunks of 64 (the device's FC)
    ("mlp", 1, 2, 64, 32, 16, 3, "float16", GMEM_FWD),
    ("mlp", 2, 2, 80, 16, 16, 2, "float32", PLAIN_BWD),
    ("mlp", 1, 2, 64, 16, 16, 3, "float16", PLAIN_BWD),
    ("mlp", 1, 1, 96, 32, 32, 2, "float32", FUSED_OUT),
    ("mlp", 1, 2, 64, 32, 16, 3, "float16", FUSED_OUT),
    ("mlp", 2, 2, 80, 16, 16, 2, "float32", PLAIN_FWD),
    ("mlp", 1, 2, 80, 16, 16, 2, "float32", NARROW_FWD_CHUNKS),  # forward FC 16, backward FC 32
    ("linear", 2, 2, 80, 16, 16, 2, "float32"),
    ("linear", 1, 2, 192, 16, 64, 2, "float32"),  # mini-batch 64
    ("linear", 1, 2, 96, 32, 32, 1, "float32"),
    ("linear", 1, 2, 64, 16, 16, 3, "float16"),
    ("linear", 2, 2, 80, 16, 16, 2, "float32", LINEAR_PLAIN),
    ("linear", 1, 2, 64, 16, 16, 3, "float16", LINEAR_PLAIN),
    ("linear", 1, 2, 192, 16, 64, 2, "float32", LINEAR_PIPE),
    ("linear", 1, 2, 16, 16, 16, 1, "float32"),  # one mini-batch (pipe): its output after the loop only
    ("linear", 2, 2, 80, 16, 16, 2, "float32", LINEAR_FOUR_SUMS),
    ("linear", 1, 2, 64, 16, 16, 3, "float16", LINEAR_FOUR_SUMS),
    ("linear", 2, 2, 80, 16, 16, 2, "float32", LARGE_MEANS),
    ("linear", 1, 2, 192, 16, 64, 2, "float32", LARGE_MEANS),  # plain (two-pass variance)
]
TOL = {"float32": 1e-4, "float16": 1e-2}


class _Refuse:
    def __init__(self, name):
        self.name = name

    def __getitem__(self, grid):
        raise AssertionError(f"{self.name} ran in a case whose KERNEL_CONFIG selects another variant")


def _worker() -> None:
    """Runs in the subprocess with TRITON_INTERPRET=1: one JSON line per case."""
    import warnings

    import numpy as np

    warnings.filterwarnings("ignore")
    np.seterr(all="ignore")  # exp overflow inside sigmoid is expected (saturates correctly)
    sys.path.insert(0, str(HERE / "gpu"))
    from kernel_checks import check

    from ttt_video.kernels import ttt_triton

    seed = int(os.environ.get("KERNEL_TEST_SEED", "0"))
    default = {k: dict(v) for k, v in ttt_triton.KERNEL_CONFIG.items()}
    for i, (kind, B, H, N, D, mb, G, dt, *changes) in enumerate(CASES):
        changes = dict(changes[0]) if changes else {}
        inputs = changes.pop("_inputs", {})
        for name, change in changes.items():
            ttt_triton.KERNEL_CONFIG[name].update(change)
        # the case must run the MLP kernels its config selects, not fall back to others
        fwd_kernels = {"split": "_ttt_mlp_fwd_split_kernel", "gmem": "_ttt_mlp_fwd_gmem_kernel"}
        bwd_kernels = {"split": "_ttt_mlp_bwd_split_kernel", "gmem": "_ttt_mlp_bwd_gmem_kernel", "plain": "_ttt_mlp_bwd_kernel"}
        linear_kernels = ("_ttt_linear_fwd_kernel", "_ttt_linear_fwd_pipe_kernel")
        kernels = {n: getattr(ttt_triton, n) for n in (*bwd_kernels.values(), *fwd_kernels.values(), *linear_kernels)}
        # the Gluon backward ("smem") neither: there the split runs
        bwd_variant = {"smem": "split"}.get(ttt_triton.KERNEL_CONFIG["mlp_bwd"]["variant"], ttt_triton.KERNEL_CONFIG["mlp_bwd"]["variant"])
        unused = [n for v, n in bwd_kernels.items() if bwd_variant != v]
        # the Gluon forward ("smem") does not run in the interpreter (nor off Hopper): there its fallback, split, runs
        fwd_variant = {"smem": "split"}.get(ttt_triton.KERNEL_CONFIG["mlp_fwd"]["variant"], ttt_triton.KERNEL_CONFIG["mlp_fwd"]["variant"])
        unused += [n for v, n in fwd_kernels.items() if fwd_variant != v]
        unused += [n for n in linear_kernels if kernels[n] is not ttt_triton._linear_fwd_kernel(mb)]
        for n in unused:
            setattr(ttt_triton, n, _Refuse(n))
        t0 = time.time()
        try:
            errs = check(kind, B, H, N, D, mb, G, getattr(torch, dt), "cpu", seed + i, **inputs)
            print(json.dumps({"case": i, "errs": errs, "s": time.time() - t0}), flush=True)
        except AssertionError as e:
            print(json.dumps({"case": i, "fail": str(e)}), flush=True)
        finally:
            for n, kern in kernels.items():
                setattr(ttt_triton, n, kern)
            for name, cfg in default.items():
                ttt_triton.KERNEL_CONFIG[name] = dict(cfg)


@pytest.fixture(scope="module")
def interpreter_results():
    env = dict(os.environ, TRITON_INTERPRET="1", KERNEL_TEST_SEED=str(torch.seed() % 2**31))
    proc = subprocess.run([sys.executable, __file__, "--worker"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"interpreter worker failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    results = {}
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            rec = json.loads(line)
            results[rec["case"]] = rec
    return results


@pytest.mark.parametrize("case", range(len(CASES)), ids=["-".join(map(str, c[:8])) + ("-" + "-".join(f"{k}={v}" for d in c[8].values() for k, v in d.items()) if len(c) > 8 else "")
                                                         for c in CASES])
def test_triton_interpreter_matches_float64_reference(interpreter_results, case):
    rec = interpreter_results.get(case)
    assert rec is not None, "case did not run"
    assert "fail" not in rec, rec.get("fail")
    tol = TOL[CASES[case][7]]
    names = {"out", "dq", "dk", "dv", "deta", "dW1", "db1", "dln_weight", "dln_bias", "final_W1", "final_b1"}
    assert names <= set(rec["errs"]), f"missing checks: {names - set(rec['errs'])}"
    forward_only = len(CASES[case]) > 8 and "_inputs" in CASES[case][8]
    bad = {k: v for k, v in rec["errs"].items() if not v < tol and not (forward_only and k.startswith("d"))}
    assert not bad, f"relative errors above {tol}: {bad}"


def test_auto_backend_is_torch_on_cpu():
    from ttt_video.kernels import triton_supports
    from ttt_video.ttt_core.ops import resolve_backend

    q = torch.randn(1, 2, 128, 64)
    assert not triton_supports(q, 64, "mlp")
    assert resolve_backend("auto", q, 64, "mlp") == "torch"
    assert resolve_backend("auto", q, 16, "linear") == "torch"


def test_split_forward_runs_only_while_every_head_has_its_group():
    """The split forward's launch plan: one group per head while they all fit on the GPU at once, the gmem
    kernel (None) beyond that (a second round of heads would double the time), forced counts clamped."""
    from ttt_video.kernels.ttt_triton import split_groups

    assert split_groups(48, 66) == 48
    assert split_groups(66, 66) == 66
    assert split_groups(96, 66) is None
    assert split_groups(1, 0) is None  # a kernel that fits no group at all
    assert split_groups(6, 66, forced=1) == 1
    assert split_groups(6, 66, forced=10) == 6
    assert split_groups(6, 4, forced=5) == 4


def test_both_mlp_directions_default_to_gluon_else_the_split_at_the_device_checked_shape():
    """Forward and backward take the Gluon kernels where they run, else the split (under the launch rule above),
    only at shapes the device has checked; the backward's split runs with its own warp count."""
    import torch

    from ttt_video.kernels import ttt_gluon, ttt_triton

    cfg = ttt_triton.KERNEL_CONFIG
    assert cfg["mlp_fwd"]["variant"] == "smem" and cfg["mlp_bwd"]["variant"] == "smem"
    # the Gluon forward only on a CUDA device, bf16 / fp16, at the shape it is written for; else the split
    q = torch.zeros(1, 1, 64, 64, dtype=torch.bfloat16)
    assert not ttt_gluon.gluon_supports(q, 64, 256, 64)  # a CPU tensor
    assert ttt_gluon.GLUON_SHAPES == {(64, 256, 64)}
    # the TMA row views ([B H N, D]) take 32-bit coordinates: longer batches take the Triton kernels
    assert ttt_gluon.tma_rows_fit((2, 48, 351_168)) and not ttt_gluon.tma_rows_fit((64, 48, 700_000))
    assert (64, 64) in ttt_triton.SPLIT_DEVICE_VERIFIED and (64, 64) in ttt_triton.SPLIT_BWD_DEVICE_VERIFIED
    assert cfg["mlp_bwd"]["split_num_warps"] == 4 and cfg["mlp_bwd"]["num_warps"] == 8


def test_pairing_is_on_by_default_and_the_environment_can_turn_it_off(monkeypatch):
    """Both Gluon TTT-MLP directions pair CTAs where heads leave SMs idle (mode 1, the device-measured rule of
    session 19); TTT_VIDEO_KERNEL_CONFIG changes KERNEL_CONFIG in a process that cannot edit it (a ComfyUI server),
    and a malformed value fails loudly instead of leaving the default in place."""
    from ttt_video.kernels import ttt_triton

    assert ttt_triton.KERNEL_CONFIG["mlp_fwd"]["pair"] == 1 and ttt_triton.KERNEL_CONFIG["mlp_bwd"]["pair"] == 1
    assert ttt_triton.KERNEL_CONFIG["mlp_fwd"]["mix"] > 100  # heads paired in turn (session 20), a paired rate > 1
    env = dict(os.environ, TTT_VIDEO_KERNEL_CONFIG="mlp_fwd:pair=0;mlp_bwd:pair=0,bwd_group=32")
    code = ("from ttt_video.kernels import ttt_triton as t; c = t.KERNEL_CONFIG; "
            "print(c['mlp_fwd']['pair'], c['mlp_bwd']['pair'], c['mlp_bwd']['bwd_group'], c['mlp_fwd']['variant'])")
    got = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert got.split() == ["0", "0", "32", "smem"]
    for bad, why in [("mlp_fwdd:pair=0", "unknown kernel"), ("mlp_fwd:pair", "not key=value"),
                     ("mlp_fwd:pair=off", "not an integer")]:
        env["TTT_VIDEO_KERNEL_CONFIG"] = bad
        res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
        assert res.returncode != 0 and why in res.stderr, (bad, res.stderr[-300:])
    # in process: the same parser
    monkeypatch.setitem(ttt_triton.KERNEL_CONFIG, "mlp_fwd", dict(ttt_triton.KERNEL_CONFIG["mlp_fwd"]))
    ttt_triton.apply_config_spec("mlp_fwd:pair=2,variant=gmem")
    assert ttt_triton.KERNEL_CONFIG["mlp_fwd"]["pair"] == 2 and ttt_triton.KERNEL_CONFIG["mlp_fwd"]["variant"] == "gmem"


@pytest.mark.parametrize("BH,n_mb,G", [(96, 5487, 16), (67, 5487, 16), (80, 24, 2), (100, 700, 7), (100, 10, 1)])
def test_mix_schedule_rotates_pairing_within_the_sms(BH, n_mb, G):
    """ttt_gluon.mix_schedule (heads between SMs / 2 and SMs): the groups partition the heads, each group's launches
    cover its scan once, in order, from checkpoint boundaries, alternating paired and not; on long scans, at the
    rates the plan assumes, every group takes the same time (no group sets the end alone), shorter than one CTA a
    head by the planned share, and at the middle of every phase the CTAs running fit on the SMs."""
    from ttt_video.kernels import ttt_gluon

    sms, ratio = 132, 1.38
    plan = ttt_gluon.mix_schedule(BH, sms, n_mb, G, ratio)
    assert plan is not None
    assert [lo for lo, _, _ in plan] == [0] + [hi for _, hi, _ in plan[:-1]] and plan[-1][1] == BH
    spans = []  # per group: (start time, end time, CTAs) of each launch, in one-CTA-a-head mini-batch times
    for lo, hi, segs in plan:
        assert hi > lo and segs[0][0] == 0 and segs[-1][1] == n_mb
        t, span = 0.0, []
        for (s, e, p), nxt in zip(segs, segs[1:] + [(n_mb, None, not segs[-1][2])]):
            assert e > s and s % G == 0 and nxt[0] == e and nxt[2] != p
            span.append((t, t + (e - s) / (ratio if p else 1.0), (hi - lo) * (2 if p else 1)))
            t = span[-1][1]
        spans.append(span)
    assert any(p for _, _, segs in plan for _, _, p in segs)
    end = max(sp[-1][1] for sp in spans)
    assert end < n_mb
    if n_mb >= 100 * G:  # long scans (short ones round to whole checkpoint groups)
        P = len(plan)
        m = (sms - BH) // -(-BH // P)
        assert end / n_mb == pytest.approx(P / (m * ratio + P - m), rel=0.01)
        assert min(sp[-1][1] for sp in spans) / end > 0.98
        for c in range(P):
            t = (c + 0.5) * end / P
            assert sum(n for sp in spans for a, b, n in sp if a <= t < b) <= sms, (c, t)
    # no plan where pairing every head fits, where no group fits the free SMs, or for scans too short to cut
    assert ttt_gluon.mix_schedule(sms // 2, sms, n_mb, G, ratio) is None
    assert ttt_gluon.mix_schedule(sms, sms, n_mb, G, ratio) is None
    assert ttt_gluon.mix_schedule(sms - 1, sms, n_mb, G, ratio) is None
    assert ttt_gluon.mix_schedule(BH, sms, 2 * G - 1, G, ratio) is None


def test_a_split_stall_raises():
    """A program that gave up waiting for its group sets the stall flag: the launch's caller raises (on a CPU at
    once; on a GPU at a later call or at check_split_stalls(), tests/gpu), never returns silently wrong results."""
    import torch

    from ttt_video.kernels.ttt_triton import _after_split_launch, _stall_flag

    flag, mirror = _stall_flag(torch.device("cpu"))
    assert mirror is None and flag.item() == 0
    _after_split_launch(flag, mirror)  # no stall: nothing raised
    flag.fill_(1)
    with pytest.raises(RuntimeError, match="did not all run at once"):
        _after_split_launch(flag, mirror)
    assert _stall_flag(torch.device("cpu"))[0].item() == 0  # each CPU launch gets a fresh flag


def test_bad_shapes_raise_clear_errors():
    from ttt_video.kernels import ttt_linear_triton, ttt_mlp_triton

    q = torch.randn(1, 1, 48, 16)
    eta = torch.rand(1, 1, 48)
    st = (torch.randn(1, 1, 16, 64), torch.randn(1, 1, 1, 64), torch.randn(1, 1, 64, 16), torch.randn(1, 1, 1, 16))
    lw, lb = torch.ones(1, 16), torch.zeros(1, 16)
    with pytest.raises(ValueError, match="N=48 is not a multiple of mini_batch_size=32"):
        ttt_mlp_triton(q, q, q, eta, st, lw, lb, 32, 0)
    with pytest.raises(ValueError, match="powers of two"):
        ttt_linear_triton(q[..., :12], q[..., :12], q[..., :12], eta, (torch.randn(1, 1, 12, 12), torch.randn(1, 1, 1, 12)),
                          torch.ones(1, 12), torch.zeros(1, 12), 16, 0)
    with pytest.raises(TypeError, match="bf16/fp16/fp32"):
        ttt_linear_triton(q.double(), q.double(), q.double(), eta, st[:1] + st[1:2], lw, lb, 16, 0)


def test_linear_forward_default_picks_pipe_at_mini_batch_16_only():
    """The measured choice (docs/performance.md): the Gluon kernel where it runs (session 14: 27.3 vs 29.4 ms at the
    one-minute shape; Hopper, bf16 / fp16, mini-batch 16), else pipe at mini-batch 16 (session 12: 32.4 vs 38.0 ms),
    plain at 64 (14.5 vs 28.5 ms); pipe's row sums paired (session 13: 29.7 vs 32.9 ms)."""
    import torch

    from ttt_video.kernels import ttt_gluon, ttt_triton

    assert ttt_triton.KERNEL_CONFIG["linear_fwd"]["variant"] == "smem"
    assert not ttt_gluon.linear_gluon_supports(torch.zeros(1, 1, 16, 64, dtype=torch.bfloat16), 64, 16)  # CPU
    assert ttt_gluon.LINEAR_GLUON_MB == {16}
    assert ttt_triton.KERNEL_CONFIG["linear_fwd"]["fused_sums"] == 1
    assert ttt_triton._linear_fwd_kernel(16) is ttt_triton._ttt_linear_fwd_pipe_kernel
    assert ttt_triton._linear_fwd_kernel(32) is ttt_triton._ttt_linear_fwd_kernel
    assert ttt_triton._linear_fwd_kernel(64) is ttt_triton._ttt_linear_fwd_kernel


_FALLBACK_SCRIPT = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import torch
from kernel_checks import check
from ttt_video.kernels import ttt_triton as tt

launched = []
kernel = tt._ttt_mlp_bwd_gmem_kernel


class Recorder:
    def __getitem__(self, grid):
        def launch(*args, **kw):
            launched.append({"W2T": kw["W2T"], "FC": kw["FC"], "num_warps": kw["num_warps"]})
            return kernel[grid](*args, **kw)
        return launch


tt._ttt_mlp_bwd_gmem_kernel = Recorder()
tt._mlp_split_backward = lambda *a, **k: False  # as on a GPU with more heads than groups fit at once
errs = check("mlp", 1, 2, 128, 32, 32, 2, torch.float32, "cpu", 7)
print(json.dumps({"launched": launched, "config": tt.KERNEL_CONFIG["mlp_bwd"], "max_err": max(errs.values())}))
"""


def test_split_backward_fallback_runs_gmem_with_its_configured_layout():
    """Where the split backward cannot run (more heads than groups fit), the gmem backward runs with the
    configured W2 orientation and chunk width (it once fell back with w2t = 1: ~9 % slower at the one-minute
    shape), and is right."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", _FALLBACK_SCRIPT, str(HERE / "gpu")], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rec = json.loads(proc.stdout.strip().splitlines()[-1])
    cfg = rec["config"]
    assert rec["launched"] == [{"W2T": bool(cfg["w2t"]), "FC": min(cfg["fc"], 128 // 2), "num_warps": cfg["num_warps"]}]
    assert rec["max_err"] < 1e-4


if __name__ == "__main__" and "--worker" in sys.argv:
    _worker()


def test_gluon_forward_that_does_not_build_falls_back_to_the_split_once(monkeypatch):
    """A Triton whose Gluon API the Gluon forward does not match (it is experimental and renames things between
    releases): the forward warns once, remembers, and runs the split; the next call does not try Gluon again."""
    import torch

    from ttt_video.kernels import ttt_gluon, ttt_triton

    tried, ran_split = [], []

    def broken_gluon(*a, **k):
        tried.append(1)
        raise AttributeError("module 'triton.experimental.gluon.language' has no attribute 'thread_barrier'")

    def fake_split(q, k, v, eta, state, ln_w, ln_b, out, finals, cks, mb, G, save):
        ran_split.append(1)
        return "split-ran"

    monkeypatch.setattr(ttt_gluon, "gluon_supports", lambda *a: True)
    monkeypatch.setattr(ttt_gluon, "mlp_forward_gluon", broken_gluon)
    monkeypatch.setattr(ttt_triton, "_mlp_split_forward", fake_split)
    monkeypatch.setattr(ttt_triton, "GLUON_DISABLED", [])
    B, H, N, D, F = 1, 2, 128, 64, 256
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    q, k, v = (torch.randn(B, H, N, D, generator=g, dtype=torch.bfloat16) for _ in range(3))
    eta = torch.rand(B, H, N, generator=g)
    state = (torch.randn(B, H, D, F, generator=g), torch.randn(B, H, F, generator=g),
             torch.randn(B, H, F, D, generator=g), torch.randn(B, H, D, generator=g))
    ln = (torch.ones(H, D), torch.zeros(H, D))
    with pytest.warns(RuntimeWarning, match="Gluon kernel does not build"):
        assert ttt_triton._mlp_forward(q, k, v, eta, state, *ln, 64, 2, False) == "split-ran"
    assert ttt_triton._mlp_forward(q, k, v, eta, state, *ln, 64, 2, False) == "split-ran"
    assert len(tried) == 1 and len(ran_split) == 2 and "thread_barrier" in ttt_triton.GLUON_DISABLED[0]


def test_gluon_backward_that_does_not_build_falls_back_to_the_split(monkeypatch):
    """The Gluon backward, like the forward: where this Triton's Gluon does not build it, the backward warns, remembers
    (GLUON_DISABLED) and takes the split backward."""
    import torch

    from ttt_video.kernels import ttt_gluon, ttt_triton

    tried, ran_split = [], []

    def broken_gluon(*a, **k):
        tried.append(1)
        raise AttributeError("module 'triton.experimental.gluon.language' has no attribute 'thread_barrier'")

    def fake_split_forward(q, k, v, eta, state, ln_w, ln_b, out, finals, cks, mb, G, save):
        for t, s in zip(finals, state):
            t.copy_(s.reshape(t.shape))
        for c in cks:
            c.zero_()
        out.copy_(q)
        return out, finals, cks, 0

    def fake_split_backward(*a, **k):
        ran_split.append(1)
        return True

    monkeypatch.setattr(ttt_gluon, "gluon_supports", lambda *a: True)
    monkeypatch.setattr(ttt_gluon, "mlp_forward_gluon", lambda *a, **k: None)  # the forward: not under test
    monkeypatch.setattr(ttt_gluon, "mlp_backward_gluon", broken_gluon)
    monkeypatch.setattr(ttt_triton, "_mlp_split_forward", fake_split_forward)
    monkeypatch.setattr(ttt_triton, "_mlp_split_backward", fake_split_backward)
    monkeypatch.setattr(ttt_triton, "GLUON_DISABLED", [])
    B, H, N, D, F = 1, 2, 128, 64, 256
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    q, k, v = (torch.randn(B, H, N, D, generator=g, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    eta = torch.rand(B, H, N, generator=g)
    state = (torch.randn(B, H, D, F, generator=g), torch.randn(B, H, 1, F, generator=g),
             torch.randn(B, H, F, D, generator=g), torch.randn(B, H, 1, D, generator=g))
    out, _ = ttt_triton.ttt_mlp_triton(q, k, v, eta, state, torch.ones(H, D), torch.zeros(H, D), 64, 2)
    with pytest.warns(RuntimeWarning, match="Gluon kernel does not build"):
        out.float().sum().backward()
    assert tried == [1] and ran_split == [1] and "thread_barrier" in ttt_triton.GLUON_DISABLED[0]
