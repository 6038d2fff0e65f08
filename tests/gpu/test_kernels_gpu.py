"""Triton TTT kernels on a CUDA GPU (run on the device by scripts/device_kernels.sh; skipped elsewhere).

Compares output, final state and every gradient with ttt_core.ops' torch backend in float64 on fresh
random inputs, with poisoned (NaN-filled) outputs. Triton 3.6 on Hopper has a known miscompile (fla #640),
so these must pass on the device itself, not only under the CPU interpreter (tests/test_kernels.py).
Set KERNEL_ERR_LOG=path to append every case's relative errors as JSON lines.
"""

from __future__ import annotations

import json
import os
import statistics
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kernel_checks import TOL, check, make_inputs  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run scripts/device_kernels.sh on the device)")

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
CASES = [
    # kind, B, H, N, D, mini_batch, group, dtype
    ("mlp", 2, 3, 640, 64, 64, 4, BF16),  # 10 mini-batches: groups 4, 4, 2
    ("mlp", 1, 2, 384, 64, 64, 4, FP32),
    ("linear", 2, 3, 320, 64, 16, 8, BF16),
    ("linear", 1, 2, 384, 64, 64, 4, BF16),
    ("linear", 1, 2, 256, 64, 16, 0, FP32),
    # fp16 and small head dims run under the CPU interpreter (tests/test_kernels.py); each extra
    # dtype/shape here costs a Triton compile on every fresh device machine.
]


_LAST_SEED = [None]


def _fresh_seed() -> int:
    """A fresh draw's seed, remembered so that _log records it (a failing draw can then be rerun)."""
    _LAST_SEED[0] = torch.seed() % 2**31
    return _LAST_SEED[0]


def _log(rec):
    rec.setdefault("seed", _LAST_SEED[0])
    path = os.environ.get("KERNEL_ERR_LOG")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(rec) + "\n")


# One bf16 / fp16 draw at 640 tokens has a heavy-tailed error, the inputs', not a kernel's (session 13: 150 fixed
# seeds of the (2, 3, 640) case, each run 1-3 times with identical numbers, also with 4 processes sharing the GPU:
# mean 6.0e-3, 3 draws above 1e-2, worst 2.4e-2; one suite draw reached 8.0e-2). A tail draw keeps out, the final
# states and dq at their usual ~3e-3 and raises only the gradients through the inner loss (dk, dv, deta, dW, db).
# So a low-precision case takes SHORT_DRAWS draws and bounds every error's median by TOL, each draw by TAIL_MAX;
# fp32 (no tail: 6-7e-7 on every draw) keeps one draw under TOL.
# Session 14 found wider tails at the long scan: seeds 1018101729 and 1929791519 (1 x 2 x 4,096 tokens) give 1.35e-1 /
# 3.5e-2 with the session-13 gmem forward and 1.58e-1 / 3.8e-2 with the Gluon one, identical over repeats and with
# or without TMA (docs/device-logs/kernels-session14-2026-11-24/7): so the per-draw cap only catches gross faults;
# the medians carry the accuracy bound.
SHORT_DRAWS = 3
TAIL_MAX = 2.5e-1


def _checked(tag, kind, B, H, N, D, mb, G, dt, draws=None, tol=None) -> dict:
    """check() over fresh draws (SHORT_DRAWS for bf16/fp16, one for fp32), each logged with its seed; asserts the
    bounds above (the median under ``tol``, default TOL[dt]) and returns the median errors."""
    tol = tol or TOL[dt]
    runs = []
    for _ in range(draws or (1 if dt == FP32 else SHORT_DRAWS)):
        errs = check(kind, B, H, N, D, mb, G, dt, "cuda", seed=_fresh_seed())
        _log({"case": tag, "errs": errs})
        runs.append(errs)
    med = {k: statistics.median(d[k] for d in runs) for k in runs[0]}
    worst = {k: max(d[k] for d in runs) for k in runs[0]}
    cap = TAIL_MAX if len(runs) > 1 else tol
    print(tag, {k: f"{med[k]:.1e}/{worst[k]:.1e}" for k in med})
    bad = {k: f"median {med[k]:.1e}, worst {worst[k]:.1e}" for k in med if not (med[k] < tol and worst[k] < cap)}
    assert not bad, f"errors over {len(runs)} draw(s) above {tol} (median) / {cap} (each draw): {bad}"
    return med


@pytest.mark.parametrize("case", CASES, ids=["-".join(str(x) for x in c).replace("torch.", "") for c in CASES])
def test_gpu_kernel_matches_float64_reference(case):
    kind, B, H, N, D, mb, G, dt = case
    _checked([kind, B, H, N, D, mb, G, str(dt)], *case)


# The long scan (4,096 tokens, 64 chained mini-batches, bf16) has the same tail, wider: over 40 fixed seeds
# (benchmarks/precision_seeds.py, session 12) the default kernels' worst relative error per draw has median 6.8e-3,
# 6 draws above 1e-2 and 3 above 1.5e-2 (up to 2.8e-2), and the session-11 kernels give the same numbers seed by
# seed; a forward variant that passed the short cases (out_pass 0, session 6) reached 3-4e-2 on every draw. So a
# long case takes LONG_DRAWS draws and bounds every error's median by LONG_TOL (each draw by TAIL_MAX).
LONG_TOL = 1.5e-2
LONG_DRAWS = 5


def _long_scan_errors(tag) -> dict:
    return _checked(tag, "mlp", 1, 2, 4096, 64, 64, 16, BF16, draws=LONG_DRAWS, tol=LONG_TOL)


def test_long_sequence_bf16():
    """4,096 tokens (64 mini-batches) forward and backward: the bf16 error must not grow with the scan."""
    med = _long_scan_errors(["mlp-long", 1, 2, 4096, 64, 64, 16, "bf16"])
    assert med["out"] < 1e-2 and med["final_W1"] < 1e-2 and med["dq"] < 1e-2


# The split forward (the default: each head's hidden units over 4 programs that exchange partial sums every
# mini-batch): a group per head, one group looping over all heads, a register cap (more programs per SM), no
# parking of gelu(Z1) in L1; and the gmem forward, its fallback where a launch has more heads than groups fit.
SPLIT_CHANGES = [{}, {"groups": 1}, {"maxnreg": 168}, {"park": 0}, {"rowshare": 1}, {"rowshare": 1, "groups": 1},
                 {"rowshare": 1, "park": 0}]


@pytest.mark.parametrize("dt", [BF16, FP32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("direction", ["fwd", "bwd"])
def test_gmem_kernels_match_float64_reference(direction, dt, monkeypatch):
    """The gmem forward / backward: the split's fallback where a launch has more heads than groups fit (96
    heads at the one-minute shape)."""
    from ttt_video.kernels import ttt_triton

    name = f"mlp_{direction}"
    monkeypatch.setitem(ttt_triton.KERNEL_CONFIG, name, dict(ttt_triton.KERNEL_CONFIG[name], variant="gmem"))
    monkeypatch.setattr(ttt_triton, f"_ttt_mlp_{direction}_split_kernel", None)  # must not run
    _checked([f"mlp-gmem-{direction}", str(dt)], "mlp", 2, 3, 640, 64, 64, 4, dt)


def test_a_split_stall_is_reported_without_a_sync_per_launch(monkeypatch):
    from ttt_video.kernels import ttt_triton

    # split launches in both directions (the defaults on Hopper, the Gluon kernels, have no group meetings to stall)
    for name in ("mlp_fwd", "mlp_bwd"):
        monkeypatch.setitem(ttt_triton.KERNEL_CONFIG, name, dict(ttt_triton.KERNEL_CONFIG[name], variant="split"))

    _checked(["mlp-stall-flag-clear"], "mlp", 1, 2, 256, 64, 64, 4, BF16)
    ttt_triton.check_split_stalls()  # a correct run leaves the flag clear
    flag, mirror = ttt_triton._stall_flag(torch.device("cuda"))
    flag.fill_(1)  # as a program that gave up waiting would
    try:
        with pytest.raises(RuntimeError, match="did not all run at once"):
            ttt_triton.check_split_stalls()
        with pytest.raises(RuntimeError, match="did not all run at once"):
            for _ in range(3):  # seen at the latest at the launch after the device copied the flag
                torch.cuda.synchronize()
                check("mlp", 1, 2, 256, 64, 64, 4, BF16, "cuda", seed=1)
    finally:
        torch.cuda.synchronize()
        flag.zero_()
        torch.cuda.synchronize()
        mirror.zero_()


def test_split_forward_falls_back_to_gmem_beyond_one_round(monkeypatch):
    """More heads than groups that fit at once: the gmem forward runs (and is right)."""
    from ttt_video.kernels import ttt_triton

    monkeypatch.setattr(ttt_triton, "_split_group_capacity", lambda *a, **k: {"capacity": 2})
    # the split as both directions' first choice (the defaults, the Gluon kernels, would take this call)
    for name in ("mlp_fwd", "mlp_bwd"):
        monkeypatch.setitem(ttt_triton.KERNEL_CONFIG, name, dict(ttt_triton.KERNEL_CONFIG[name], variant="split"))
    _checked(["mlp-split-fallback"], "mlp", 2, 3, 256, 64, 64, 2, BF16)
    assert ttt_triton.SPLIT_INFO.get("fallback") == "gmem" and ttt_triton.SPLIT_INFO["heads"] == 6
    assert ttt_triton.SPLIT_INFO.get("bwd_fallback") == "gmem"  # the backward follows the same rule


@pytest.mark.parametrize("dt", [BF16, FP32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("change", SPLIT_CHANGES, ids=["capacity", "one-group", "maxnreg168", "no-park", "rowshare",
                                                     "rowshare-one-group", "rowshare-no-park"])
def test_split_forward_matches_float64_reference(change, dt, monkeypatch):
    from ttt_video.kernels import ttt_triton

    monkeypatch.setitem(ttt_triton.KERNEL_CONFIG, "mlp_fwd", dict(ttt_triton.KERNEL_CONFIG["mlp_fwd"], variant="split", **change))
    ttt_triton.SPLIT_INFO.clear()
    _checked(["mlp-split", str(change), str(dt)], "mlp", 2, 3, 640, 64, 64, 4, dt)
    ttt_triton.check_split_stalls()
    print("split", change, dt, ttt_triton.SPLIT_INFO)
    assert ttt_triton.SPLIT_INFO.get("nsplit") == 4 and ttt_triton.SPLIT_INFO["heads"] == 6
    assert ttt_triton.SPLIT_INFO["groups"] == (1 if change.get("groups") == 1 else 6)


@pytest.mark.parametrize("n_tokens", [64, 128, 192])
def test_split_forward_short_scans(n_tokens, monkeypatch):
    """1-3 mini-batches: the outputs finished after the scan (the last two) cover the whole sequence."""
    from ttt_video.kernels import ttt_triton

    monkeypatch.setitem(ttt_triton.KERNEL_CONFIG, "mlp_fwd", dict(ttt_triton.KERNEL_CONFIG["mlp_fwd"], variant="split"))
    _checked(["mlp-split-short", n_tokens], "mlp", 1, 3, n_tokens, 64, 64, 2, BF16)
    assert ttt_triton.SPLIT_INFO.get("nsplit") == 4


# Shapes beyond the paper's (D 64, mini-batch 64): D 32 (F 128, 2 programs per head), D 128 (F 512, 8), smaller
# mini-batches (16 / 32 rows: 4- and 8-row output shares), fp16. They run split only once listed in
# SPLIT_DEVICE_VERIFIED (this Triton miscompiles some shapes on Hopper); here they are forced to run it.
OTHER_SPLIT_SHAPES = [(32, 32, BF16), (128, 64, BF16), (64, 16, BF16), (64, 32, BF16), (64, 64, FP16)]


@pytest.mark.parametrize("shape", OTHER_SPLIT_SHAPES, ids=[f"D{d}-mb{m}-{str(t)[6:]}" for d, m, t in OTHER_SPLIT_SHAPES])
def test_split_forward_other_shapes(shape, monkeypatch):
    from ttt_video.kernels import ttt_triton

    D, mb, dt = shape
    monkeypatch.setattr(ttt_triton, "SPLIT_DEVICE_VERIFIED", {(D, mb)})
    monkeypatch.setitem(ttt_triton.KERNEL_CONFIG, "mlp_fwd", dict(ttt_triton.KERNEL_CONFIG["mlp_fwd"], variant="split"))
    ttt_triton.SPLIT_INFO.clear()
    _checked(["mlp-split-shape", D, mb, str(dt)], "mlp", 1, 3, 6 * mb, D, mb, 2, dt)
    assert ttt_triton.SPLIT_INFO.get("nsplit") == 4 * D // 64


SPLIT_BWD = {"variant": "split", "split_num_warps": 4, "any_shape": 1}


@pytest.mark.parametrize("case", [(2, 3, 640, BF16, {}), (1, 2, 384, FP32, {}), (2, 3, 640, BF16, {"groups": 1}),
                                  (1, 3, 64, BF16, {}), (1, 2, 4096, BF16, {})],
                         ids=["bf16", "fp32", "bf16-one-group", "one-minibatch", "long-bf16"])
def test_split_backward_matches_float64_reference(case, monkeypatch):
    from ttt_video.kernels import ttt_triton

    B, H, N, dt, change = case
    monkeypatch.setitem(ttt_triton.KERNEL_CONFIG, "mlp_bwd", dict(ttt_triton.KERNEL_CONFIG["mlp_bwd"], **SPLIT_BWD, **change))
    ttt_triton.SPLIT_INFO.clear()
    if N > 1000:
        _long_scan_errors(["mlp-split-bwd", B, H, N, str(dt), str(change)])
        assert ttt_triton.SPLIT_INFO.get("bwd_nsplit") == 4
        return
    _checked(["mlp-split-bwd", B, H, N, str(dt), str(change)], "mlp", B, H, N, 64, 64, 4, dt)
    print("split bwd", case, ttt_triton.SPLIT_INFO)
    assert ttt_triton.SPLIT_INFO.get("bwd_nsplit") == 4


@pytest.mark.parametrize("rowshare", [0, 1])
def test_split_forward_long_sequence_bf16(rowshare, monkeypatch):
    from ttt_video.kernels import ttt_triton

    monkeypatch.setitem(ttt_triton.KERNEL_CONFIG, "mlp_fwd",
                        dict(ttt_triton.KERNEL_CONFIG["mlp_fwd"], variant="split", rowshare=rowshare))
    _long_scan_errors(["mlp-split-long", 1, 2, 4096, 64, 64, 16, "bf16", f"rowshare={rowshare}"])
    assert ttt_triton.SPLIT_INFO.get("nsplit") == 4


# The Gluon forward (kernels/ttt_gluon.py, variant "smem": one CTA per head, the state in shared memory; the
# default on Hopper for bf16 / fp16 at D 64, F 256, mini-batch 64): each option, short scans, checkpoint groups that
# do not divide the scan, the long scan, and fp32 inputs, which it leaves to the Triton kernels.
SMEM_CHANGES = [{}, {"bsum_mma": 0}, {"tma": 0}, {"smem_num_warps": 16}]


def _smem_config(monkeypatch, **change):
    from ttt_video.kernels import ttt_gluon, ttt_triton

    # one CTA a head unless ``change`` says otherwise (the default pairs CTAs at these tests' few heads)
    change = {"pair": 0, **change}
    monkeypatch.setitem(ttt_triton.KERNEL_CONFIG, "mlp_fwd", dict(ttt_triton.KERNEL_CONFIG["mlp_fwd"], variant="smem", **change))
    return ttt_gluon


@pytest.mark.parametrize("dt", [BF16, FP16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("change", SMEM_CHANGES, ids=["default", "bsum-reduce", "no-tma", "16-warps"])
def test_smem_forward_matches_float64_reference(change, dt, monkeypatch):
    ttt_gluon = _smem_config(monkeypatch, **change)
    n0 = ttt_gluon.LAUNCHES
    _checked(["mlp-smem", str(change), str(dt)], "mlp", 2, 3, 640, 64, 64, 4, dt)
    assert ttt_gluon.LAUNCHES > n0


# The paired Gluon forward (KERNEL_CONFIG mlp_fwd pair, session 19: two CTAs a head, each half the hidden units,
# meeting through global memory once a mini-batch): pair=2 forces it. Checkpoints it saves feed the backward, so
# the gradients check them too. Short scans and groups, fp16, more CTAs than SMs (the start-order ticket: a CTA
# waiting for an SM must not hang its partner), and the long scan.
PAIR_CASES = [(2, 3, 640, 4, BF16), (2, 3, 640, 4, FP16), (1, 3, 64, 1, BF16), (1, 3, 192, 2, BF16),
              (1, 2, 448, 3, BF16)]


@pytest.mark.parametrize("case", PAIR_CASES, ids=["-".join(str(x) for x in c).replace("torch.", "") for c in PAIR_CASES])
def test_paired_forward_matches_float64_reference(case, monkeypatch):
    from ttt_video.kernels import ttt_triton

    ttt_gluon = _smem_config(monkeypatch, pair=2)
    B, H, N, G, dt = case
    n0 = ttt_gluon.PAIR_LAUNCHES
    _checked(["mlp-pair", *map(str, case)], "mlp", B, H, N, 64, 64, G, dt)
    assert ttt_gluon.PAIR_LAUNCHES > n0
    ttt_triton.check_split_stalls()


def test_paired_forward_with_more_ctas_than_sms(monkeypatch):
    from ttt_video.kernels import ttt_triton

    ttt_gluon = _smem_config(monkeypatch, pair=2)
    H = torch.cuda.get_device_properties(0).multi_processor_count // 2 + 11  # 2 H CTAs: more than the SMs
    n0 = ttt_gluon.PAIR_LAUNCHES
    _checked(["mlp-pair-many-ctas", H], "mlp", 1, H, 128, 64, 64, 2, BF16, draws=2)
    assert ttt_gluon.PAIR_LAUNCHES > n0
    ttt_triton.check_split_stalls()


def test_paired_forward_long_sequence_bf16(monkeypatch):
    ttt_gluon = _smem_config(monkeypatch, pair=2)
    n0 = ttt_gluon.PAIR_LAUNCHES
    _long_scan_errors(["mlp-pair-long", 1, 2, 4096, 64, 64, 16, "bf16"])
    assert ttt_gluon.PAIR_LAUNCHES > n0


def test_pair_rule_pairs_heads_only_where_they_leave_sms_idle():
    from ttt_video.kernels import ttt_gluon

    dev = torch.device("cuda")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    assert ttt_gluon.pair_heads(sms // 2, dev, 1) and not ttt_gluon.pair_heads(sms // 2 + 1, dev, 1)
    assert not ttt_gluon.pair_heads(1, dev, 0) and ttt_gluon.pair_heads(4 * sms, dev, 2)


# heads between SMs / 2 and SMs: the forward as ttt_gluon.mix_schedule's rotation, the groups' launches (paired and
# not, several a group, each from the previous one's final state) on side streams; the backward (the default) then
# reads the checkpoints those launches wrote. At the GPU's SM count (B H 80-100) in fp16: over 80-100 heads a bf16
# draw often holds an ill-conditioned head whose gradients come out 1e-2 to 0.14 off whatever the forward (mixed,
# one CTA a head or the Triton gmem one give the same errors on those draws: session 20, seed_compare.py), while fp16's
# ~1e-3 leaves a wrong checkpoint or state hand-off nowhere to hide. bf16 at few heads, planned for a few SMs
# (PLAN_SMS), as the other bf16 tests.
MIX_CASES = [(1, 100, 640, 1, FP16, 0), (2, 40, 1536, 3, FP16, 0), (1, 97, 1024, 2, FP16, 0),
             (1, 3, 1536, 2, BF16, 5), (2, 2, 768, 3, BF16, 7), (1, 3, 640, 1, BF16, 5)]


@pytest.mark.parametrize("case", MIX_CASES, ids=["-".join(str(x) for x in c).replace("torch.", "") for c in MIX_CASES])
def test_mixed_forward_matches_float64_reference(case, monkeypatch):
    from ttt_video.kernels import ttt_triton

    ttt_gluon = _smem_config(monkeypatch, pair=1, mix=138)
    B, H, N, G, dt, sms = case
    monkeypatch.setattr(ttt_gluon, "PLAN_SMS", sms)
    sms = sms or torch.cuda.get_device_properties(0).multi_processor_count
    assert ttt_gluon.mix_schedule(B * H, sms, N // 64, G, 1.38) is not None, "the case must take the mixed path"
    n0, p0 = ttt_gluon.MIX_CALLS, ttt_gluon.PAIR_LAUNCHES
    _checked(["mlp-mix", *map(str, case)], "mlp", B, H, N, 64, 64, G, dt, draws=2)
    assert ttt_gluon.MIX_CALLS > n0 and ttt_gluon.PAIR_LAUNCHES > p0
    ttt_triton.check_split_stalls()


def test_mixed_forward_long_sequence_bf16(monkeypatch):
    """The long scan's shape (2 heads: at 80 heads a draw more often holds an ill-conditioned head, whose gradients
    come out 2e-2 to 0.5 off whatever the forward: session 20, benchmarks/seed_compare.py) planned for 3 SMs, so its
    2 heads run as the mixed rotation: launches from checkpoint boundaries in groups of 16."""
    ttt_gluon = _smem_config(monkeypatch, pair=1, mix=138)
    monkeypatch.setattr(ttt_gluon, "PLAN_SMS", 3)
    assert ttt_gluon.mix_schedule(2, 3, 64, 16, 1.38) is not None
    n0 = ttt_gluon.MIX_CALLS
    _long_scan_errors(["mlp-mix-long", 1, 2, 4096, 64, 64, 16, "bf16"])
    assert ttt_gluon.MIX_CALLS > n0


def test_mixed_forward_launch_failure_falls_back_after_the_queued_launches(monkeypatch):
    """A mixed plan's launch that fails after others were queued on the side streams (a Gluon kernel variant this
    Triton does not build): mlp_forward_gluon joins the side streams before the error leaves it, so the Triton
    fallback that ttt_triton then runs writes the outputs after the queued launches, never beside them."""
    from ttt_video.kernels import ttt_triton

    ttt_gluon = _smem_config(monkeypatch, pair=1, mix=138)
    monkeypatch.setattr(ttt_gluon, "PLAN_SMS", 5)
    monkeypatch.setattr(ttt_triton, "GLUON_DISABLED", [])
    real, calls = ttt_gluon._forward_launch, []

    def second_fails(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise TypeError("simulated: a kernel variant this Triton does not build")
        return real(*a, **k)

    monkeypatch.setattr(ttt_gluon, "_forward_launch", second_fails)
    with pytest.warns(RuntimeWarning, match="using the Triton kernels"):
        _checked(["mlp-mix-fallback"], "mlp", 1, 3, 1536, 64, 64, 2, BF16, draws=1)
    assert len(calls) == 2 and ttt_triton.GLUON_DISABLED


# The Gluon backward (kernels/ttt_gluon.py, mlp_bwd variant "smem", the default on Hopper: per checkpoint group the
# recompute forward, the output path of all its mini-batches, then one 8-warp CTA per head back through the group):
# the tests below run each Gluon direction alone (the other one the default), every gradient against the float64
# reference.
GLUON_DIRECTIONS = ["forward", "backward"]


def _gluon_direction(monkeypatch, direction, **bwd_change):
    """The Gluon kernel of ``direction`` pinned (the backward's KERNEL_CONFIG entry with ``bwd_change``, e.g.
    bwd_group=0: its groups the forward's checkpoint groups, which the group-structure tests need); returns a
    function giving its launch count so far."""
    from ttt_video.kernels import ttt_triton

    ttt_gluon = _smem_config(monkeypatch)
    if direction == "backward":  # one CTA a head unless bwd_change says otherwise
        bwd_change = {"pair": 0, **bwd_change}
        monkeypatch.setitem(ttt_triton.KERNEL_CONFIG, "mlp_bwd",
                            dict(ttt_triton.KERNEL_CONFIG["mlp_bwd"], variant="smem", **bwd_change))
        return lambda: ttt_gluon.BWD_LAUNCHES
    return lambda: ttt_gluon.LAUNCHES


@pytest.mark.parametrize("bwd_group", [0, 64], ids=["groups-4-4-2", "one-group-of-10"])
@pytest.mark.parametrize("dt", [BF16, FP16], ids=["bf16", "fp16"])
def test_smem_backward_matches_float64_reference(dt, bwd_group, monkeypatch):
    launches = _gluon_direction(monkeypatch, "backward", bwd_group=bwd_group)
    n0 = launches()
    _checked(["mlp-smem-bwd", str(dt), bwd_group], "mlp", 2, 3, 640, 64, 64, 4, dt)
    assert launches() > n0


# The paired sequential backward kernel (KERNEL_CONFIG mlp_bwd pair, session 19: two CTAs a head, each half the
# hidden units, meeting twice a mini-batch; dk's partial sums added at the next meeting): pair=2 forces it.
PAIR_BWD_CASES = [(2, 3, 640, 4, BF16, 0), (2, 3, 640, 4, FP16, 0), (2, 3, 640, 4, BF16, 64), (1, 3, 64, 1, BF16, 0),
                  (1, 2, 448, 3, BF16, 0), (1, 2, 1280, 3, BF16, 9)]


@pytest.mark.parametrize("case", PAIR_BWD_CASES,
                         ids=["-".join(str(x) for x in c).replace("torch.", "") for c in PAIR_BWD_CASES])
def test_paired_backward_matches_float64_reference(case, monkeypatch):
    from ttt_video.kernels import ttt_triton

    B, H, N, G, dt, bwd_group = case
    launches = _gluon_direction(monkeypatch, "backward", pair=2, bwd_group=bwd_group)
    n0 = launches()
    _checked(["mlp-pair-bwd", *map(str, case)], "mlp", B, H, N, 64, 64, G, dt)
    assert launches() > n0
    ttt_triton.check_split_stalls()


def test_paired_backward_with_more_ctas_than_sms(monkeypatch):
    from ttt_video.kernels import ttt_triton

    launches = _gluon_direction(monkeypatch, "backward", pair=2)
    H = torch.cuda.get_device_properties(0).multi_processor_count // 2 + 11
    n0 = launches()
    _checked(["mlp-pair-bwd-many-ctas", H], "mlp", 1, H, 128, 64, 64, 2, BF16, draws=2)
    assert launches() > n0
    ttt_triton.check_split_stalls()


def test_paired_backward_long_sequence_bf16(monkeypatch):
    launches = _gluon_direction(monkeypatch, "backward", pair=2)
    n0 = launches()
    _long_scan_errors(["mlp-pair-bwd-long", 1, 2, 4096, 64, 64, 16, "bf16"])
    assert launches() > n0


@pytest.mark.parametrize("form", [(0, 0), (0, 1), (1, 0), (5, 1), (5, 0)],
                         ids=["item-ctas-plain", "item-ctas-tma", "sm-ctas-plain", "5-ctas-tma", "5-ctas-plain"])
@pytest.mark.parametrize("dt", [BF16, FP16], ids=["bf16", "fp16"])
def test_smem_backward_output_path_forms(form, dt, monkeypatch):
    """The output-path kernel's forms (KERNEL_CONFIG mlp_bwd out_persist, out_tma_c): a CTA an item or a loop over
    items (5 CTAs for 2 x 3 heads x 7 mini-batches: each CTA several items, both buffers, and a last round that
    leaves CTAs idle), bf16 terms by TMA or plain stores (fp16 inputs' fp32 terms take the stores whatever the
    option), in groups 3 + 3 + 1."""
    from ttt_video.kernels import ttt_triton

    launches = _gluon_direction(monkeypatch, "backward", bwd_group=0)
    persist, tma_c = form
    monkeypatch.setitem(ttt_triton.KERNEL_CONFIG, "mlp_bwd",
                        dict(ttt_triton.KERNEL_CONFIG["mlp_bwd"], out_persist=persist, out_tma_c=tma_c))
    n0 = launches()
    _checked(["mlp-smem-bwd-out", persist, tma_c, str(dt)], "mlp", 2, 3, 448, 64, 64, 3, dt)
    assert launches() > n0


@pytest.mark.parametrize("persist", [0, 1], ids=["item-ctas", "sm-ctas"])
def test_smem_backward_overlapped_streams(persist, monkeypatch):
    """KERNEL_CONFIG mlp_bwd overlap: the sequential kernels on a stream of their own beside the next group's
    launches, two scratch sets taking turns; one mini-batch a group (7 groups: each set reused three times)."""
    from ttt_video.kernels import ttt_triton

    launches = _gluon_direction(monkeypatch, "backward", bwd_group=0)
    monkeypatch.setitem(ttt_triton.KERNEL_CONFIG, "mlp_bwd",
                        dict(ttt_triton.KERNEL_CONFIG["mlp_bwd"], overlap=1, out_persist=persist))
    n0 = launches()
    _checked(["mlp-smem-bwd-overlap", persist], "mlp", 2, 3, 448, 64, 64, 1, BF16)
    assert launches() > n0


def test_smem_backward_overlap_gives_the_serial_bits(monkeypatch):
    """The overlapped backward runs the same kernels on the same data in the same per-head order, so its gradients
    are bit for bit the serial backward's; at 96 heads (the SMs busy, so that a missing wait between the streams
    would let a kernel read a scratch set being rewritten) and 32 groups of 2 mini-batches."""
    from ttt_video.kernels import ttt_triton

    _gluon_direction(monkeypatch, "backward", bwd_group=0)
    g = torch.Generator().manual_seed(_fresh_seed())
    xs = make_inputs("mlp", 2, 48, 4096, 64, BF16, "cuda", g)
    dout = torch.randn(xs[0].shape, generator=g).to("cuda", BF16)
    runs = []
    for overlap in (0, 1, 0, 1):
        monkeypatch.setitem(ttt_triton.KERNEL_CONFIG, "mlp_bwd",
                            dict(ttt_triton.KERNEL_CONFIG["mlp_bwd"], overlap=overlap))
        leaves = [t.detach().clone().requires_grad_(True) for t in xs]
        q, k, v, eta, *rest = leaves
        out, final = ttt_triton.ttt_mlp_triton(q, k, v, eta, tuple(rest[:4]), rest[4], rest[5], 64, 2)
        loss = (out.float() * dout.float()).sum() + sum((f.float() * 0.1).sum() for f in final)
        runs.append(torch.autograd.grad(loss, leaves))
    names = ["q", "k", "v", "eta", "W1", "b1", "W2", "b2", "ln_weight", "ln_bias"]
    for i, r in enumerate(runs[1:], 1):
        differ = [n for n, a, b in zip(names, runs[0], r) if not torch.equal(a, b)]
        assert not differ, f"run {i} ({'overlapped' if i % 2 else 'serial'}) differs from the first serial run: {differ}"


@pytest.mark.parametrize("n_tokens,group,bwd_group", [(448, 2, 6), (1280, 3, 9), (1024, 4, 64)],
                         ids=["7-mb-as-6-1", "20-mb-as-9-9-2", "16-mb-as-16"])
def test_smem_backward_groups_span_checkpoint_groups(n_tokens, group, bwd_group, monkeypatch):
    """KERNEL_CONFIG mlp_bwd bwd_group: each backward group spans bwd_group // group of the forward's checkpoint
    groups and recomputes from the first of them (7 mini-batches in checkpoint groups of 2 as backward groups of 6
    and 1, from checkpoints 0 and 3; 20 in 3s as 9, 9, 2; 16 in 4s as one group)."""
    from ttt_video.kernels import ttt_triton

    launches = _gluon_direction(monkeypatch, "backward", bwd_group=bwd_group)
    assert ttt_triton.gluon_bwd_group_mul(group) == bwd_group // group
    n0 = launches()
    _checked(["mlp-smem-bwd-span", n_tokens, group, bwd_group], "mlp", 1, 3, n_tokens, 64, 64, group, BF16)
    assert launches() > n0


@pytest.mark.parametrize("direction", GLUON_DIRECTIONS)
@pytest.mark.parametrize("n_tokens,group", [(64, 1), (128, 3), (192, 2), (448, 3), (1024, 16)])
def test_smem_short_scans_and_groups(n_tokens, group, direction, monkeypatch):
    """1-3 mini-batches, one mini-batch per checkpoint, groups that do not divide the scan (7 = 3 + 3 + 1), and one
    full group of 16."""
    launches = _gluon_direction(monkeypatch, direction, bwd_group=0)
    n0 = launches()
    _checked([f"mlp-smem-{direction}-short", n_tokens, group], "mlp", 1, 3, n_tokens, 64, 64, group, BF16)
    assert launches() > n0


@pytest.mark.parametrize("direction", GLUON_DIRECTIONS)
def test_smem_long_sequence_bf16(direction, monkeypatch):
    launches = _gluon_direction(monkeypatch, direction)
    n0 = launches()
    _long_scan_errors([f"mlp-smem-{direction}-long", 1, 2, 4096, 64, 64, 16, "bf16"])
    assert launches() > n0


@pytest.mark.parametrize("direction", GLUON_DIRECTIONS)
def test_smem_leaves_fp32_to_the_triton_kernels(direction, monkeypatch):
    launches = _gluon_direction(monkeypatch, direction)
    n0 = launches()
    _checked([f"mlp-smem-{direction}-fp32-fallback"], "mlp", 1, 2, 384, 64, 64, 4, FP32)
    assert launches() == n0


def test_auto_backend_picks_triton_on_cuda():
    from ttt_video.kernels import ttt_triton
    from ttt_video.ttt_core import ops

    B, H, N, D = 1, 2, 256, 64
    q, k, v = (torch.randn(B, H, N, D, device="cuda", dtype=BF16) for _ in range(3))
    eta = torch.rand(B, H, N, device="cuda") * 0.01
    st = (torch.randn(B, H, D, 4 * D, device="cuda") * 0.02, torch.zeros(B, H, 1, 4 * D, device="cuda"),
          torch.randn(B, H, 4 * D, D, device="cuda") * 0.02, torch.zeros(B, H, 1, D, device="cuda"))
    lw, lb = torch.ones(H, D, device="cuda"), torch.zeros(H, D, device="cuda")
    assert ops.resolve_backend("auto", q, 64, "mlp") == "triton"
    assert ops.resolve_backend("auto", q, 16, "linear") == "triton"
    assert ops.resolve_backend("auto", q[..., :100, :], 64, "mlp") == "torch"  # N not a multiple: torch
    out_auto, _ = ops.ttt_mlp(q, k, v, eta, st, lw, lb, mini_batch_size=64, backend="auto")
    out_tri, _ = ttt_triton.ttt_mlp_triton(q, k, v, eta, st, lw, lb, 64, 0)
    assert torch.equal(out_auto, out_tri)


LINEAR_CASES = [c for c in CASES if c[0] == "linear"]


@pytest.mark.parametrize("case", LINEAR_CASES, ids=["-".join(str(x) for x in c).replace("torch.", "") for c in LINEAR_CASES])
@pytest.mark.parametrize("variant", ["pipe", "plain", "pipe-four-sums"])
def test_linear_forward_variants_match_float64_reference(variant, case, monkeypatch):
    """Both TTT-Linear forwards at every Linear shape, whichever the default ("auto") picks there: plain, and
    pipe (each mini-batch's output in the next one's dot, one dependent dot fewer per mini-batch)."""
    from ttt_video.kernels import ttt_triton

    change = {"variant": "pipe", "fused_sums": 0} if variant == "pipe-four-sums" else {"variant": variant}
    monkeypatch.setitem(ttt_triton.KERNEL_CONFIG, "linear_fwd", dict(ttt_triton.KERNEL_CONFIG["linear_fwd"], **change))
    other = {"plain": "_ttt_linear_fwd_pipe_kernel"}.get(variant, "_ttt_linear_fwd_kernel")
    monkeypatch.setattr(ttt_triton, other, None)  # must not run
    kind, B, H, N, D, mb, G, dt = case
    _checked([f"linear-{variant}", B, H, N, D, mb, G, str(dt)], *case)


@pytest.mark.parametrize("variant", ["pipe", "plain"])
def test_linear_forward_with_large_layernorm_means(variant, monkeypatch):
    """LayerNorm inputs whose rows have means ~30x their spread (the bias moved by 30): pipe's one-pass variance
    must not cancel (it carries W and b centred); forward only, fp32 (see tests/test_kernels.py's LARGE_MEANS)."""
    from ttt_video.kernels import ttt_triton

    monkeypatch.setitem(ttt_triton.KERNEL_CONFIG, "linear_fwd", dict(ttt_triton.KERNEL_CONFIG["linear_fwd"], variant=variant))
    errs = check("linear", 2, 3, 320, 64, 16, 8, FP32, "cuda", seed=_fresh_seed(), mean_shift=30.0)
    _log({"case": [f"linear-{variant}-large-means"], "errs": errs})
    bad = {k: v for k, v in errs.items() if not k.startswith("d") and not v < TOL[FP32]}
    assert not bad, f"forward errors above {TOL[FP32]}: {bad}"


# The Gluon TTT-Linear forward (kernels/ttt_gluon.py, variant "smem": mini-batch 16, bf16 / fp16, D 64): the default
# case, fp16, 1-3 mini-batch scans (the last output is finished in an extra iteration), checkpoint groups that do not
# divide the scan, a long scan, large LayerNorm means (bf16 here: the kernel has no fp32 path), and the fallbacks.
@pytest.mark.parametrize("case", [(2, 3, 320, 8, BF16), (2, 3, 320, 8, FP16), (1, 3, 16, 1, BF16), (1, 3, 32, 3, BF16),
                                  (1, 3, 48, 2, BF16), (1, 2, 1360, 7, BF16), (1, 2, 4096, 16, BF16)],
                         ids=["bf16", "fp16", "one-minibatch", "two", "three", "groups-7", "long"])
def test_linear_smem_forward_matches_float64_reference(case, monkeypatch):
    from ttt_video.kernels import ttt_gluon, ttt_triton

    monkeypatch.setitem(ttt_triton.KERNEL_CONFIG, "linear_fwd", dict(ttt_triton.KERNEL_CONFIG["linear_fwd"], variant="smem"))
    B, H, N, G, dt = case
    n0 = ttt_gluon.LINEAR_LAUNCHES
    # 85 and 256 chained mini-batches are long scans, with the long scans' gradient tail: session 16's suite drew
    # seeds at 1.0-1.6e-2 (dk, deta, dW1) and one at 3.4e-1, and each gives the same errors with the session-14 kernel
    # (docs/device-logs/kernels-session16-2026-11-24/7-reseed.txt, 9/reseed.txt)
    long = dict(draws=LONG_DRAWS, tol=LONG_TOL) if N >= 1024 else {}
    _checked(["linear-smem", B, H, N, G, str(dt)], "linear", B, H, N, 64, 16, G, dt, **long)
    assert ttt_gluon.LINEAR_LAUNCHES > n0


def test_linear_smem_forward_with_large_layernorm_means(monkeypatch):
    from ttt_video.kernels import ttt_gluon, ttt_triton

    monkeypatch.setitem(ttt_triton.KERNEL_CONFIG, "linear_fwd", dict(ttt_triton.KERNEL_CONFIG["linear_fwd"], variant="smem"))
    n0 = ttt_gluon.LINEAR_LAUNCHES
    errs = check("linear", 2, 3, 320, 64, 16, 8, BF16, "cuda", seed=_fresh_seed(), mean_shift=30.0)
    _log({"case": ["linear-smem-large-means"], "errs": errs})
    bad = {k: v for k, v in errs.items() if not k.startswith("d") and not v < TOL[BF16]}
    assert not bad and ttt_gluon.LINEAR_LAUNCHES > n0, f"forward errors above {TOL[BF16]}: {bad}"


@pytest.mark.parametrize("case", [(1, 2, 256, 16, FP32), (1, 2, 384, 64, BF16)], ids=["fp32", "mb64"])
def test_linear_smem_forward_leaves_other_cases_to_the_triton_kernels(case, monkeypatch):
    from ttt_video.kernels import ttt_gluon, ttt_triton

    monkeypatch.setitem(ttt_triton.KERNEL_CONFIG, "linear_fwd", dict(ttt_triton.KERNEL_CONFIG["linear_fwd"], variant="smem"))
    B, H, N, mb, dt = case
    n0 = ttt_gluon.LINEAR_LAUNCHES
    _checked(["linear-smem-fallback", B, H, N, mb, str(dt)], "linear", B, H, N, 64, mb, 4, dt)
    assert ttt_gluon.LINEAR_LAUNCHES == n0
