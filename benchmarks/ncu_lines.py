"""Nsight Compute stall samples per source line of a Triton / Gluon kernel, from the device's per-SASS CSV.

scripts/device_kernels.sh with NCU_SOURCE=1 writes ncu-source.csv (one row per SASS instruction: address, text,
stall samples by reason). NCU cannot map a Triton kernel's SASS to its Python lines, but the same Triton compiles
the same SASS here (no GPU needed): this compiles the kernel like benchmarks/aot_report.py, disassembles it with
line info, checks that the opcodes match the profile's instruction for instruction, and sums the samples per line:

    PYTHONPATH=/tmp/t36:/tmp/pkg python benchmarks/ncu_lines.py docs/device-logs/.../ncu-source.csv 'mlp_fwd:variant=smem'

The device specialises the launch (integer arguments equal to 1, divisibility), so a local build can differ: then
pass the profiled binary itself (--cubin, copied from the device's ~/.triton/cache) and the spec is not compiled.
"""
from __future__ import annotations

import argparse
import collections
import csv
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

_LINE = re.compile(r'//## File "([^"]+)", line (\d+)')
_INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")


def _opcode(text: str) -> str:
    """The opcode of a SASS instruction's text (after an optional predicate)."""
    parts = text.strip().split()
    if parts and parts[0].startswith("@"):
        parts = parts[1:]
    return parts[0] if parts else ""


def local_sass(spec: str, cubin: str = "") -> list[tuple[int, str, str]]:
    """(offset, opcode, 'file:line') for each SASS instruction of the kernel compiled here (or of ``cubin``)."""
    import aot_report

    if cubin:
        binary = open(cubin, "rb").read()
    else:
        binary = aot_report.compile_one(spec)[1].asm["cubin"]
    where, out = "?", []
    for line in aot_report._disassemble(binary, line_info=True).splitlines():
        m = _LINE.search(line)
        if m:
            where = f"{os.path.basename(m.group(1))}:{m.group(2)}"
            continue
        m = _INSTR.search(line)
        if m:
            out.append((int(m.group(1), 16), _opcode(m.group(2)), where))
    return out


def profile_rows(path: str) -> tuple[list[str], list[list[str]]]:
    rows = list(csv.reader(open(path)))
    start = next(i for i, r in enumerate(rows) if r and r[0] == "Address")
    return rows[start], [r for r in rows[start + 1:] if r and r[0].startswith("0x")]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("csv")
    p.add_argument("spec")
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--cubin", default="", help="the profiled binary (instead of compiling the spec here)")
    a = p.parse_args(argv)
    header, rows = profile_rows(a.csv)
    col = {name: i for i, name in enumerate(header)}
    reasons = [h for h in header if h.startswith("stall_") and "Not Issued" not in h]
    base = int(rows[0][0], 16)
    sass = {off: (op, where) for off, op, where in local_sass(a.spec, a.cubin)}
    per_line = collections.Counter()
    per_line_reason = collections.defaultdict(collections.Counter)
    per_reason = collections.Counter()
    mismatches, total = 0, 0
    for r in rows:
        off = int(r[0], 16) - base
        samples = int(r[col["Warp Stall Sampling (All Samples)"]] or 0)
        op, where = sass.get(off, ("?", "?"))
        if op != _opcode(r[1]):
            mismatches += 1
        total += samples
        per_line[where] += samples
        for reason in reasons:
            v = int(r[col[reason]] or 0)
            if v:
                per_line_reason[where][reason[6:]] += v
                per_reason[reason[6:]] += v
    print(f"{len(rows)} instructions profiled, {len(sass)} compiled here, {mismatches} opcode mismatches; "
          f"{total} samples")
    print("by reason:", ", ".join(f"{k} {100 * v / total:.1f}%" for k, v in per_reason.most_common(10)))
    for where, v in per_line.most_common(a.top):
        top = ", ".join(f"{k} {v2}" for k, v2 in per_line_reason[where].most_common(3))
        print(f"{100 * v / total:5.1f}%  {where:28s} {top}")


if __name__ == "__main__":
    main()
