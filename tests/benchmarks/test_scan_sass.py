"""benchmarks/scan_sass.py: the scan kernels' loop bodies counted in sm_90 SASS, compiled without a GPU."""
import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


@pytest.mark.slow
def test_loop_bodies_and_issue_floor(tmp_path):
    triton = pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("the kernels are interpreted functions in this process")
    if not os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")):
        pytest.skip("Triton's bundled cuobjdump is missing")
    from benchmarks import scan_sass

    out = tmp_path / "sass.json"
    assert scan_sass.main(["--config", "2", "--tokens", "1024", "--channels", "32", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    k = res["kernels"]
    assert res["programs"] == 4 * 2  # 1024 / 256 token chunks x 32 / 16 channel blocks
    assert [len(k[n]["loops"]) for n in ("_chunk_fwd", "_scan_out", "_chunk_bwd", "_scan_bwd")] == [1, 1, 1, 2]
    # the reverse loop of the backward is the longest body, with the per-token reductions' barriers and shuffles
    fwd, rev = k["_scan_bwd"]["loops"]
    assert rev["instructions"] > fwd["instructions"] and rev["ops"].get("BAR", 0) > 0 and rev["ops"].get("SHFL", 0) > 0
    assert k["_chunk_fwd"]["loops"][0]["ops"].get("BAR", 0) == 0 and k["_chunk_fwd"]["loops"][0]["ops"]["LDG"] > 0
    for name, v in k.items():
        per_token = sum(lp["instructions"] for lp in v["loops"])
        assert v["warp_instructions"] == per_token * 256 * 2 * res["programs"], name  # T_CHUNK x warps x programs
        lo, hi = v["issue_floor_ms"]
        assert lo < hi and hi == pytest.approx(v["warp_instructions"] / (132 * 4 * 1.755e9) * 1e3)
