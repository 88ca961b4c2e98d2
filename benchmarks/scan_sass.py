"""Instruction mix of the fused selective scan's token loops, compiled for an H100 (sm_90) on a machine without a GPU.

Each kernel of ``neuro_models/mamba/kernels/selective_scan.py`` is compiled by Triton for sm_90 (bf16 inputs, with
D, z and sequence starts, one launch configuration of ``CONFIGS``) and disassembled with Triton's bundled
``cuobjdump``; every backward branch closes a loop, whose body's instructions are counted by opcode. With the
launch grid this gives the warp-instructions a layer issues and so the time an H100 needs at its issue rate (4
warp-instructions per SM per clock), the floor for a kernel bound by issue rather than memory::

    python benchmarks/scan_sass.py --config 2 --out benchmarks/results/scan_sass.json

Session 18 (issue #24): the token loops run at that floor in the forward and near it in the backward, so
fewer instructions per token is the lever (BENCHMARKS.md, "Session 18").
"""
from __future__ import annotations

import argparse
import collections
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

#: H100 SXM: 132 SMs, 4 schedulers each issuing one warp-instruction per clock; base-to-boost clock range (GHz)
H100_SMS, ISSUE_PER_SM, CLOCKS_GHZ = 132, 4, (1.755, 1.98)


def loop_mix(fn, consts: dict, types: dict, num_warps: int) -> list[dict]:
    """``[{start, end, instructions, ops}]`` of every loop in ``fn``'s sm_90 SASS (innermost first as they appear)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = {n: ("constexpr" if n in consts else types[n]) for n in fn.arg_names}
    src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
    ck = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(ck.asm["cubin"])
    try:
        sass = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(f.name)
    code = [(int(m.group(1), 16), m.group(2)) for m in
            (re.match(r"\s+/\*([0-9a-f]{4,})\*/\s+(.*?);", line) for line in sass.splitlines()) if m]
    loops = []
    for at, ins in code:
        target = re.search(r"BRA\S*\s.*?(0x[0-9a-f]+)", ins)
        if target and int(target.group(1), 16) < at:
            lo = int(target.group(1), 16)
            body = [re.sub(r"^@!?U?P\w+\s+", "", i).split()[0].split(".")[0] for a, i in code if lo <= a <= at]
            loops.append({"start": lo, "end": at, "instructions": len(body),
                          "ops": dict(collections.Counter(body).most_common())})
    return loops


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", type=int, default=None, help="index into CONFIGS (default: the default one)")
    ap.add_argument("--tokens", type=int, default=59_664, help="packed tokens of the layer (one row)")
    ap.add_argument("--channels", type=int, default=384)
    ap.add_argument("--out", default=None, help="JSON file (a Markdown table is printed)")
    a = ap.parse_args(argv)
    from neuro_models.mamba.kernels import selective_scan as K

    idx = K.DEFAULT_CONFIG if a.config is None else a.config
    cfg = K.CONFIGS[idx]
    kernels = [K._chunk_fwd, K._scan_out, K._chunk_bwd, K._scan_bwd]
    types = {"L": "i32", "E": "i32", "N": "i32", "nC": "i32", "R": "i32"}
    types.update({n: "*fp32" for fn in kernels for n in fn.arg_names if n.endswith("_ptr")})
    types.update(u_ptr="*bf16", B_ptr="*bf16", C_ptr="*bf16", z_ptr="*bf16", st_ptr="*u8")
    flags = dict(T_CHUNK=cfg["T_CHUNK"], BLOCK_E=cfg["BLOCK_E"], BLOCK_N=16, HAS_D=True, HAS_Z=True, HAS_STARTS=True)
    programs = math.ceil(a.tokens / cfg["T_CHUNK"]) * math.ceil(a.channels / cfg["BLOCK_E"])
    rows, out = [], {"config": idx, "launch": cfg, "tokens": a.tokens, "channels": a.channels, "programs": programs,
                     "kernels": {}}
    for fn in kernels:
        loops = loop_mix(fn, {k: v for k, v in flags.items() if k in fn.arg_names}, types, cfg["num_warps"])
        warp_instr = sum(lp["instructions"] for lp in loops) * cfg["T_CHUNK"] * cfg["num_warps"] * programs
        floor_ms = [warp_instr / (H100_SMS * ISSUE_PER_SM * ghz * 1e9) * 1e3 for ghz in reversed(CLOCKS_GHZ)]
        out["kernels"][fn.__name__] = {"loops": loops, "warp_instructions": warp_instr, "issue_floor_ms": floor_ms}
        for lp in loops:
            top = ", ".join(f"{k} {v}" for k, v in list(lp["ops"].items())[:8])
            rows.append(f"| `{fn.__name__}` | {lp['instructions']} | {lp['ops'].get('BAR', 0)} | "
                        f"{lp['ops'].get('SHFL', 0)} | {top} |")
        rows.append(f"| `{fn.__name__}` total | {warp_instr / 1e9:.2f}e9 warp-instr | issue floor "
                    f"{floor_ms[0]:.2f}-{floor_ms[1]:.2f} ms | | |")
    print(f"config {idx} {cfg}: {programs} programs of {cfg['T_CHUNK']} tokens x {cfg['BLOCK_E']} channels\n")
    print("| kernel | instructions per token (one loop body) | BAR | SHFL | most frequent |\n|---|---|---|---|---|")
    print("\n".join(rows))
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
