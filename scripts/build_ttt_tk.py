"""Build the paper's ThunderKittens TTT-MLP kernels (test-time-training/ttt-tk) as a torch extension, for the
side-by-side comparisons in benchmarks/bench_tk.py and benchmarks/bench_block.py (issue 4: "faster than the
paper's ThunderKittens kernel relative to Gated DeltaNet"). Hopper (sm_90a) only, as theirs is; needs nvcc and ninja (the device image has both).

    git clone https://github.com/test-time-training/ttt-tk .thirdparty/ttt-tk   # we measured commit 353b6c8
    python scripts/build_ttt_tk.py [--src .thirdparty/ttt-tk] [--build /tmp/ttt_tk_build] [--check-only]

Their code is never copied into this repository (.thirdparty/ is git-ignored); this script only drives nvcc with
the flags of their setup.py (C++20, fast math, -DKITTENS_HOPPER, sm_90a) through torch.utils.cpp_extension, and
prints the module's path. `--check-only` compiles the two kernel files to objects without linking against
torch's CUDA libraries (a local compile check: needs nvcc and the CUDA headers, no GPU).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

KERNEL_FILES = ("kernels/ttt/ttt.cu", "kernels/ttt_backward/ttt.cu")
BINDINGS = "test_time_training.cpp"
MODULE = "test_time_training"


def cuda_flags(src: Path) -> list[str]:
    return [
        "-DNDEBUG", "-DTORCH_COMPILE", "-DKITTENS_HOPPER", "-std=c++20", "-O3", "--use_fast_math",
        "--expt-extended-lambda", "--expt-relaxed-constexpr", "-forward-unknown-to-host-compiler",
        "-Xcompiler=-Wno-psabi", "-Xcompiler=-fno-strict-aliasing", "-diag-suppress=3189",
        "-Xptxas=--warn-on-spills", f"-I{src / 'include'}", f"-I{src / 'prototype'}",
        "-gencode=arch=compute_90a,code=sm_90a",
    ]


def check_only(src: Path, nvcc: str, extra_includes: list[str]) -> int:
    """Compile each kernel file to an object (no link): catches compile errors before device time is spent."""
    from torch.utils.cpp_extension import include_paths

    inc = [f"-I{p}" for p in include_paths()] + [f"-I{sysconfig.get_path('include')}"]
    inc += [f"-I{p}" for p in extra_includes]
    rc = 0
    for f in KERNEL_FILES:
        t0 = time.time()
        out = Path("/tmp") / (f.replace("/", "_") + ".o")
        cmd = [nvcc, "-c", str(src / f), "-o", str(out), "-Xcompiler", "-fPIC", "-Xptxas=--verbose"]
        cmd += cuda_flags(src) + inc
        proc = subprocess.run(cmd, capture_output=True, text=True)
        tail = (proc.stdout + proc.stderr).strip().splitlines()
        print(f"{f}: rc {proc.returncode} in {time.time() - t0:.0f} s", flush=True)
        print("\n".join(l for l in tail if "error" in l.lower() or "spill" in l.lower() or "registers" in l.lower())
              if proc.returncode == 0 else "\n".join(tail[-40:]))
        rc |= proc.returncode
    return rc


def build(src: Path, build_dir: Path):
    """JIT-build (ninja, MAX_JOBS processes) and import the extension; returns the module."""
    from torch.utils.cpp_extension import load

    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0a")
    build_dir.mkdir(parents=True, exist_ok=True)
    # both kernel files are named ttt.cu and ninja names objects by file name: link them in under distinct names
    # (their includes all go through -I, so the links compile as the originals do)
    links = []
    for f in KERNEL_FILES:
        link = build_dir / (Path(f).parent.name + ".cu")
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(src / f)
        links.append(str(link))
    t0 = time.time()
    mod = load(
        name=MODULE,
        sources=[str(src / BINDINGS)] + links,
        extra_cflags=["-std=c++20", "-O3", "-DTK_COMPILE_TTT", "-DTK_COMPILE_TTT_BACKWARD"],
        extra_cuda_cflags=cuda_flags(src),
        extra_ldflags=["-lcuda"],
        build_directory=str(build_dir),
        verbose=True,  # nvcc's register and spill report goes to the build log
    )
    print(f"built {MODULE} in {time.time() - t0:.0f} s: {mod.__file__}", flush=True)
    return mod


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--src", default=".thirdparty/ttt-tk")
    p.add_argument("--build", default="/tmp/ttt_tk_build")
    p.add_argument("--check-only", action="store_true")
    p.add_argument("--nvcc", default="nvcc")
    p.add_argument("--include", action="append", default=[], help="extra include dirs for --check-only")
    a = p.parse_args(argv)
    src = Path(a.src).resolve()
    missing = [f for f in (BINDINGS, *KERNEL_FILES) if not (src / f).is_file()]
    if missing:
        print(f"ttt-tk sources not found under {src} (missing {', '.join(missing)}); clone "
              "https://github.com/test-time-training/ttt-tk there", file=sys.stderr)
        return 2
    if a.check_only:
        return check_only(src, a.nvcc, a.include)
    build(src, Path(a.build))
    return 0


if __name__ == "__main__":
    sys.exit(main())
