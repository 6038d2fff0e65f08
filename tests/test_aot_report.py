"""benchmarks/aot_report.py: compiling the Triton kernels for sm_90a without a GPU (the device-free check of
registers and spills that decides which kernel variants are worth a device run)."""

from __future__ import annotations

import re

import pytest


@pytest.fixture(scope="module")
def aot(load_script):
    pytest.importorskip("triton")
    mod = load_script("benchmarks/aot_report.py")
    try:
        mod.ptxas_path()
    except Exception as e:  # noqa: BLE001 - no bundled ptxas on this platform
        pytest.skip(f"Triton's ptxas is not available here: {e}")
    return mod


def test_report_reads_registers_spills_and_sass(aot):
    r = aot.report("linear_fwd:num_warps=4,mb=16")
    assert "error" not in r
    assert 0 < r["registers"] <= 255
    assert r["stack_bytes"] is not None and r["spill_stores"] is not None
    assert r["sass_total"] > 100
    assert r["sass"].get("HGMMA", 0) + r["sass"].get("HMMA", 0) > 0  # the tensor-core matmuls are found


def test_spills_by_line_points_at_kernel_source(aot):
    # the TTT-MLP forward at 4 warps with fused output spills (docs/performance.md): the lines must be found
    rows = aot.spills_by_line("mlp_fwd:variant=gmem,num_warps=4,out_pass=0")
    assert rows and rows[0][0] > 0
    assert all(total >= n > 0 for n, total, _ in rows)
    assert any("ttt_triton.py:" in text for _, _, text in rows)


def test_gluon_forward_compiles_for_hopper(aot):
    """The Gluon forward (kernels/ttt_gluon.py) is checked for results on the device only (the interpreter does not
    run Gluon); here it must at least build for sm_90a with its wgmmas and fit the H100's 227 KB of shared memory."""
    from ttt_video.kernels import ttt_gluon

    if not ttt_gluon.HAVE_GLUON:
        pytest.skip("this Triton has no Gluon")
    cfg, compiled = aot.compile_one("mlp_fwd:variant=smem")
    assert compiled.metadata.num_warps == cfg["smem_num_warps"]
    assert 0 < compiled.metadata.shared <= 227 * 1024
    r = aot.report("mlp_fwd:variant=smem")
    assert r["sass"].get("HGMMA", 0) >= 9  # Z1, Z2, P1, W2, W1, b1, b2, and the output's two
    r = aot.report("linear_fwd:variant=smem,mb=16")  # the Gluon TTT-Linear forward
    assert r["sass"].get("HGMMA", 0) >= 3 and r["spill_stores"] == 0  # Z, W's and b's updates


def test_gluon_paired_forward_compiles_for_hopper(aot):
    """The paired forward (two CTAs a head, each half the hidden units; session 19): half the shared memory of one
    CTA a head, so that the state's halves are what halves, and the pair's meetings are gpu-scope release / acquire
    atomics (the partner's partial sums are read from global memory after the acquire)."""
    from ttt_video.kernels import ttt_gluon

    if not ttt_gluon.HAVE_GLUON:
        pytest.skip("this Triton has no Gluon")
    whole = aot.report("mlp_fwd:variant=smem")
    paired = aot.report("mlp_fwd:variant=smem,pair=2")
    assert 0 < paired["shared_bytes"] < 0.7 * whole["shared_bytes"], (paired["shared_bytes"], whole["shared_bytes"])
    assert paired["sass"].get("HGMMA", 0) < whole["sass"].get("HGMMA", 0)  # [64, 128] tiles: fewer instructions
    _, compiled = aot.compile_one("mlp_fwd:variant=smem,pair=2")
    ptx = compiled.asm["ptx"]
    # the arrival: an add with release semantics (atom or, its result unused, red); the poll: an acquire read
    assert re.search(r"(atom|red)\.global\.gpu\.release\.add", ptx), "no release arrival"
    assert re.search(r"(ld|atom)\.global\.gpu\.acquire", ptx), "no acquire poll"


def test_gluon_backward_compiles_for_hopper(aot):
    """The Gluon TTT-MLP backward's kernels (sequential, output path) and the recompute forward it launches (STATES)
    build for sm_90a within the H100's 227 KB of shared memory (results: tests/gpu, on the device)."""
    from ttt_video.kernels import ttt_gluon

    if not ttt_gluon.HAVE_GLUON:
        pytest.skip("this Triton has no Gluon")
    cfg, compiled = aot.compile_one("mlp_bwd:variant=smem")
    assert compiled.metadata.num_warps == 8
    assert 0 < compiled.metadata.shared <= 227 * 1024
    # ~14 [64, 64] x [64, 256]-sized products per mini-batch: far more wgmma instructions than the forward's
    assert aot.report("mlp_bwd:variant=smem")["sass"].get("HGMMA", 0) >= 100
    # gw_hint (the default, session 18): dL/dW read and written under an L2 evict-last policy, the terms evict-first
    ptx = compiled.asm["ptx"]
    assert "createpolicy.fractional.L2::evict_last" in ptx and "createpolicy.fractional.L2::evict_first" in ptx
    assert "st.global.L1::evict_last.L2::cache_hint" in ptx
    # the output terms by plain stores / by TMA from shared memory (session 17)
    plain, by_tma = (aot.report(f"mlp_bwd:variant=smem,part=out,out_tma_c={t}") for t in (0, 1))
    for r in (plain, by_tma):
        assert 0 < r["shared_bytes"] <= 227 * 1024
    # C1 / C2 ([D, F] + [F, D] a mini-batch) no longer leave thread by thread
    assert by_tma["sass"].get("STG", 0) < plain["sass"].get("STG", 0) / 2, (by_tma["sass"], plain["sass"])
    cfg, compiled = aot.compile_one("mlp_fwd:variant=smem,states=1")
    assert 0 < compiled.metadata.shared <= 227 * 1024
    # the paired sequential kernel (session 19): half the state's rows a CTA, so about half the shared memory and
    # fewer wgmma instructions
    whole, paired = aot.report("mlp_bwd:variant=smem"), aot.report("mlp_bwd:variant=smem,pair=2")
    assert 0 < paired["shared_bytes"] < 0.7 * whole["shared_bytes"]
    assert paired["sass"].get("HGMMA", 0) < whole["sass"].get("HGMMA", 0)


def test_unknown_kernel_name_is_refused(aot):
    with pytest.raises(KeyError):
        aot.report("nope_fwd")
