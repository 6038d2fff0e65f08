"""Compile the Triton TTT kernels for sm_90a on a machine with no GPU and report what the compiler did.

Costs no device time: registers, spill bytes and stack frame (ptxas -v), and a histogram of the SASS
instruction classes that decide these kernels' speed (HGMMA = Hopper tensor-core matmuls, HMMA = the older
mma.sync path, LDL/STL = spills, BAR = barriers, MUFU = exp/rcp/tanh, LDS/STS = shared-memory layout
conversions). Use the Triton version of the device (3.6) to see what the device will build:

    pip install --target /tmp/t36 triton==3.6.0
    PYTHONPATH=/tmp/t36 python benchmarks/aot_report.py 'mlp_fwd:fc=64,num_warps=4' 'mlp_bwd:variant=gmem,fc=64'
    PYTHONPATH=/tmp/t36 python benchmarks/aot_report.py --spills mlp_bwd    # + where the spill code comes from

Each argument is a KERNEL_CONFIG entry with overrides, the same syntax as bench_ttt.py --probe. The Gluon forwards
(kernels/ttt_gluon.py) compile the same way: 'mlp_fwd:variant=smem', 'linear_fwd:variant=smem,mb=16',
'mlp_bwd:variant=smem' (its sequential kernel; part=out: the output-path kernel).
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile


import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

INT_ARGS = {"N", "H", "n_mb", "n_ck", "G", "BH", "max_spin", "mb0", "in_mul", "in_add", "n_slots", "cnt", "n_items",
            "h0", "ck_stride"}
INT32_PTRS = {"CNT", "ERR"}
FLOAT_ARGS = {"eps"}
TMA_DESCRIPTORS = {"QD", "KD", "VD", "OD"}  # [MB, D] tiles of q / k / v / out
SLOT_DESCRIPTORS = {"WTD", "W2D", "WTD_OUT", "W2D_OUT", "C2D"}  # the Gluon backward's [F, D] state / term tiles
C1_DESCRIPTORS = {"C1D"}  # its [D, F] output term, stored as [D, 64] boxes
# tensors in the operand dtype (q, k, v, dout and their gradients, the output); every other pointer is fp32
OPERAND_PTRS = {"Q", "K", "V", "DOUT", "OUT", "DQ", "DK", "DV"}
BF16_PTRS = {"C1", "C2"}  # the Gluon backward's output-path terms (bf16 whatever the inputs)
SASS_CLASSES = ["HGMMA", "HMMA", "FFMA", "FMUL", "FADD", "MUFU", "LDL", "STL", "LDG", "STG", "LDS", "STS",
                "LDSM", "STSM", "BAR", "SHFL", "F2F", "WARPSYNC"]


def _kernel_and_constexprs(name: str, cfg: dict, D: int, F: int, op_dtype: str):
    from ttt_video.kernels import ttt_triton as tt

    ieee = op_dtype == "fp32"
    if name == "mlp_fwd":
        if cfg.get("variant") == "smem":
            from ttt_video.kernels import ttt_gluon as tg

            return tg._ttt_mlp_fwd_smem_kernel, dict(D=D, FS=F, MB=64, SAVE=not cfg.get("states", 0), TMA=bool(cfg.get("tma", 1)),
                                                     BSUM_MMA=bool(cfg.get("bsum_mma", 1)),
                                                     STATES=bool(cfg.get("states", 0)),
                                                     num_warps=cfg.get("smem_num_warps", 8),
                                                     PAIR=cfg.get("pair", 0) == 2)  # pair=2: the paired form
        if cfg.get("variant") == "split":
            fs = cfg.get("fs", 64)
            return tt._ttt_mlp_fwd_split_kernel, dict(D=D, FS=fs, NSPLIT=F // fs, MB=64, SAVE=True, IEEE=ieee,
                                                       PARK=bool(cfg.get("park", 1)),
                                                       ROWSHARE=bool(cfg.get("rowshare", 0)))
        if cfg.get("variant", "gmem") == "gmem":
            return tt._ttt_mlp_fwd_gmem_kernel, dict(D=D, F=F, FC=cfg.get("fc", 64), MB=64, SAVE=True,
                                                      W2T=bool(cfg.get("w2t", 1)), IEEE=ieee,
                                                      OUT_PASS=bool(cfg.get("out_pass", 0)))
        return tt._ttt_mlp_fwd_kernel, dict(D=D, F=F, MB=64, SAVE=True, IEEE=ieee)
    if name == "mlp_bwd":
        if cfg.get("variant") == "smem":
            from ttt_video.kernels import ttt_gluon as tg

            if cfg.get("part") == "out":
                return tg._ttt_mlp_bwd_out_kernel, dict(D=D, F=F, MB=64, TMA_C=bool(cfg.get("out_tma_c", 1)),
                                                        num_warps=8)
            return tg._ttt_mlp_bwd_smem_kernel, dict(D=D, F=F, MB=64, num_warps=8, GW_HINT=bool(cfg.get("gw_hint", 0)),
                                                     PAIR=cfg.get("pair", 0) == 2)  # pair=2: the paired form
        if cfg.get("variant") == "split":
            fs = cfg.get("fs", 64)
            return tt._ttt_mlp_bwd_split_kernel, dict(D=D, FS=fs, NSPLIT=F // fs, MB=64, IEEE=ieee)
        if cfg.get("variant") == "gmem":
            return tt._ttt_mlp_bwd_gmem_kernel, dict(D=D, F=F, FC=cfg.get("fc", 64), MB=64,
                                                      W2T=bool(cfg.get("w2t", 1)), IEEE=ieee)
        return tt._ttt_mlp_bwd_kernel, dict(D=D, F=F, MB=64, IEEE=ieee)
    if name == "linear_fwd":
        if cfg.get("variant") == "smem":
            from ttt_video.kernels import ttt_gluon as tg

            return tg._ttt_linear_fwd_smem_kernel, dict(D=D, MB=cfg.get("mb", 16), SAVE=True, num_warps=4)
        kernel = tt._linear_fwd_kernel(cfg.get("mb", 16), cfg.get("variant"))
        return kernel, dict(D=D, MB=cfg.get("mb", 16), SAVE=True, IEEE=ieee, **tt._linear_fwd_options(kernel, cfg))
    if name == "linear_bwd":
        return tt._ttt_linear_bwd_kernel, dict(D=D, MB=cfg.get("mb", 16), IEEE=ieee)
    raise SystemExit(f"unknown kernel {name!r}")


def compile_one(spec: str, D: int = 64, F: int = 256, op_dtype: str = "bf16", arch: int = 90):
    from ttt_video.kernels import ttt_triton as tt

    name, _, kv = spec.partition(":")
    cfg = dict(tt.KERNEL_CONFIG[name])
    for item in filter(None, kv.split(",")):
        key, val = item.split("=")
        cfg[key] = val if key in ("variant", "part") else int(val)
    fn, constexprs = _kernel_and_constexprs(name, cfg, D, F, op_dtype)
    fn = getattr(fn, "fn", fn) if not hasattr(fn, "arg_names") else fn
    signature, attrs = {}, {}
    for i, arg in enumerate(fn.arg_names):
        if arg in constexprs:
            signature[arg] = "constexpr"
        elif arg in TMA_DESCRIPTORS | C1_DESCRIPTORS | SLOT_DESCRIPTORS:  # Gluon TMA descriptors, 16-bit blocks
            from triton.experimental.gluon import language as gl

            if arg in TMA_DESCRIPTORS:  # [MB, D] tiles (the Linear forward's: 3-d boxes)
                box = [2, 16, D] if name == "linear_fwd" else [constexprs["MB"], D]
            else:  # (the paired sequential kernel loads half a state's rows)
                box = [D, 64] if arg in C1_DESCRIPTORS else [F // (1 + bool(constexprs.get("PAIR"))), D]
            layout = gl.NVMMASharedLayout.get_default_for(box, gl.float16)
            signature[arg] = f"tensordesc<{op_dtype}[{', '.join(map(str, box))}],{layout!r}>"
        elif arg in INT_ARGS:
            signature[arg] = "i32"
        elif arg in FLOAT_ARGS:
            signature[arg] = "fp32"
        else:
            signature[arg] = "*" + (op_dtype if arg in OPERAND_PTRS else "bf16" if arg in BF16_PTRS
                                    else "i32" if arg in INT32_PTRS else "fp32")
            attrs[(i,)] = [["tt.divisibility", 16]]
    opts = {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}
    if "num_warps" in constexprs:  # a Gluon kernel: its layouts are written for the warp count it takes
        from triton.experimental.gluon._runtime import GluonASTSource

        src = GluonASTSource(fn, signature, constexprs=constexprs, attrs=attrs)
        opts["num_warps"] = constexprs["num_warps"]
    else:
        src = ASTSource(fn, signature, constexprs=constexprs, attrs=attrs)
    if name == "mlp_bwd" and cfg.get("variant") == "split":
        opts["num_warps"] = cfg.get("split_num_warps", 4)  # as _mlp_split_backward launches it
    if cfg.get("maxnreg"):
        opts["maxnreg"] = cfg["maxnreg"]
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=opts)
    return cfg, compiled


# one SASS instruction in nvdisasm's output: its opcode (after an optional predicate)
_SASS_OP = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9]*)")


def ptxas_path() -> str:
    """The ptxas bundled with Triton (nvdisasm lies beside it)."""
    from triton.backends.nvidia.compiler import get_ptxas

    try:
        return get_ptxas(90).path
    except TypeError:  # Triton >= 3.7 takes no arch
        return get_ptxas().path


def _disassemble(cubin: bytes, line_info: bool = False) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        args = [os.path.join(os.path.dirname(ptxas_path()), "nvdisasm"), "-c", *(["-g"] if line_info else []), f.name]
        return subprocess.run(args, capture_output=True, text=True).stdout


def report(spec: str, op_dtype: str = "bf16") -> dict:
    cfg, compiled = compile_one(spec, op_dtype=op_dtype)
    ptxas = ptxas_path()
    out = {"spec": spec, "dtype": op_dtype, "triton": triton.__version__,
           "shared_bytes": getattr(compiled.metadata, "shared", None)}
    with tempfile.TemporaryDirectory() as d:
        ptx = os.path.join(d, "k.ptx")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        res = subprocess.run([ptxas, "-arch=sm_90a", "-v", ptx, "-o", os.path.join(d, "k.cubin")],
                             capture_output=True, text=True)
        info = res.stderr
        for key, pat in [("registers", r"Used (\d+) registers"), ("stack_bytes", r"(\d+) bytes stack frame"),
                         ("spill_stores", r"(\d+) bytes spill stores"), ("spill_loads", r"(\d+) bytes spill loads")]:
            m = re.search(pat, info)
            out[key] = int(m.group(1)) if m else None
    cubin = compiled.asm.get("cubin")
    if cubin:
        ops = collections.Counter()
        for line in _disassemble(cubin).splitlines():
            m = _SASS_OP.search(line)
            if m:
                ops[m.group(1)] += 1
        out["sass_total"] = sum(ops.values())
        out["sass"] = {k: ops[k] for k in SASS_CLASSES if ops[k]}
    return out


def spills_by_line(spec: str, op_dtype: str = "bf16", top: int = 20) -> list[tuple[int, int, str]]:
    """(spill instructions, all instructions, source line) for the source lines with the most LDL/STL in the
    SASS (nvdisasm -g line info): where the compiler runs out of registers."""
    _, compiled = compile_one(spec, op_dtype=op_dtype)
    where, spills, total = None, collections.Counter(), collections.Counter()
    for line in _disassemble(compiled.asm["cubin"], line_info=True).splitlines():
        m = re.search(r'//## File "([^"]+)", line (\d+)', line)
        if m:
            where = (m.group(1), int(m.group(2)))
            continue
        m = _SASS_OP.search(line)
        if m:
            total[where] += 1
            spills[where] += m.group(1) in ("LDL", "STL")
    rows = []
    for where, n in spills.most_common(top):
        text = ""
        if where and os.path.isfile(where[0]):
            text = f"{os.path.basename(where[0])}:{where[1]}: " + open(where[0]).read().splitlines()[where[1] - 1].strip()
        rows.append((n, total[where], text[:140]))
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("specs", nargs="+", help="e.g. mlp_fwd:fc=64,num_warps=4")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--spills", action="store_true", help="also list the source lines with the most spill code")
    a = p.parse_args(argv)
    for spec in a.specs:
        if a.spills:
            for n, total, text in spills_by_line(spec, a.dtype):
                print(f"  {n:5d} spill / {total:5d} SASS  {text}")
        try:
            r = report(spec, a.dtype)
        except Exception as e:  # noqa: BLE001 - report and go on to the next config
            r = {"spec": spec, "error": f"{type(e).__name__}: {str(e)[:300]}"}
        print(r, flush=True)


if __name__ == "__main__":
    main()
