"""The fused Triton selective scan (``neuro_models.mamba.kernels.selective_scan``) against the float64 sequential
reference, values and every gradient, under the Triton interpreter on CPU; its custom-op (fake/meta) registration;
and the ``impl="auto"`` selection. On GPU see ``benchmarks/mamba_scan_benchmark.py``.

The interpreter must be on before Triton decorates the kernels, so the kernel checks run this file as a script in a
subprocess (``python test_mamba_scan_triton.py <case>``, through ``interpreted.run_check``); it prints ``ok`` last.
The interpreter runs each program's time loop in Python, so the default-suite cases shrink ``T_CHUNK`` to 8 (every
configuration's ``BLOCK_E`` and ``num_warps`` as used, several chunks per row); the ``slow`` cases run every
configuration of ``CONFIGS`` exactly, and a NeuroMamba model with the fused scan against the chunked one.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.nn.functional as F

try:  # as a pytest module; the subprocess script only needs torch and neuro_models
    from interpreted import run_check  # this folder (pytest puts it on sys.path)
except ImportError:  # pragma: no cover
    run_check = None

from neuro_models.mamba.scan import SCAN_ENV, selective_scan, selective_scan_sequential

# ------------------------------------------------------------------------------------------------------------------
# shared by the in-process tests and the subprocess cases
# ------------------------------------------------------------------------------------------------------------------


def packed_starts(R: int, L: int, lengths: list[list[int]], gap: int = 3) -> torch.Tensor:
    """Sequence starts of rows packed like ``tokens.pack_kept``: each sample preceded by ``gap`` gap tokens; the row
    ends in padding (the round-up)."""
    starts = torch.zeros(R, L, dtype=torch.bool)
    for r, lens in enumerate(lengths):
        pos = 0
        for n in lens:
            pos += gap
            starts[r, pos] = True
            pos += n
        assert pos <= L, (pos, L)
    return starts


def make_inputs(R, L, E, N, *, seed=0, dtypes=None, with_D=True, with_z=True):
    """float64 leaves and the same values in the kernel's dtypes (``dtypes``: name -> dtype, default float32), both
    requiring grad; the float64 ones are the low-precision values upcast, so only the kernel's arithmetic differs."""
    g = torch.Generator().manual_seed(seed)
    dt = torch.float64
    vals = {"u": torch.randn(R, L, E, generator=g, dtype=dt),
            "delta": F.softplus(torch.randn(R, L, E, generator=g, dtype=dt) - 1.0),
            "A": -torch.exp(torch.randn(E, N, generator=g, dtype=dt)),
            "B": torch.randn(R, L, N, generator=g, dtype=dt),
            "C": torch.randn(R, L, N, generator=g, dtype=dt),
            "D": torch.randn(E, generator=g, dtype=dt) if with_D else None,
            "z": torch.randn(R, L, E, generator=g, dtype=dt) if with_z else None}
    dtypes = dtypes or {}
    low, ref = {}, {}
    for k, v in vals.items():
        if v is None:
            low[k] = ref[k] = None
            continue
        t = v.to(dtypes.get(k, torch.float32))
        low[k] = t.clone().requires_grad_()
        ref[k] = t.to(dt).requires_grad_()
    return low, ref


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def check_against_reference(fn, R, L, E, N, starts, *, dtypes=None, with_D=True, with_z=True, seed=0,
                            what="") -> None:
    """``fn(u, delta, A, B, C, D, z, starts)`` (a fused scan) against ``selective_scan_sequential`` in float64:
    the output, and the gradient of every input, for a random upstream gradient.

    Tolerances: the output is float32 (1e-5 relative L2, float32 arithmetic over <= a few hundred steps); each
    gradient comes back in its input's dtype, so 1e-5 for float32 and 2^-8 (the bf16/fp16 rounding) otherwise."""
    low, ref = make_inputs(R, L, E, N, seed=seed, dtypes=dtypes, with_D=with_D, with_z=with_z)
    names = [k for k in ("u", "delta", "A", "B", "C", "D", "z") if low[k] is not None]
    dy = torch.randn(R, L, E, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    y_ref = selective_scan_sequential(*(ref[k] for k in ("u", "delta", "A", "B", "C", "D", "z")), starts=starts)
    g_ref = torch.autograd.grad((y_ref * dy).sum(), [ref[k] for k in names])
    y = fn(*(low[k] for k in ("u", "delta", "A", "B", "C", "D", "z")), starts)
    assert y.dtype == torch.float32 and y.shape == (R, L, E), (what, y.dtype, y.shape)
    g = torch.autograd.grad((y * dy.float()).sum(), [low[k] for k in names])
    assert rel(y, y_ref) < 1e-5, (what, "y", rel(y, y_ref))
    for k, a, b in zip(names, g, g_ref):
        assert a.dtype == low[k].dtype and a.shape == low[k].shape, (what, k, a.dtype, a.shape)
        tol = 1e-5 if low[k].dtype == torch.float32 else 2.0 ** -8
        assert rel(a, b) < tol, (what, k, rel(a, b), tol)


# ------------------------------------------------------------------------------------------------------------------
# subprocess cases (TRITON_INTERPRET=1)
# ------------------------------------------------------------------------------------------------------------------


def _fused(cfg):
    from neuro_models.mamba.kernels.selective_scan import fused_selective_scan

    return lambda u, d, A, B, C, D, z, st: fused_selective_scan(u, d, A, B, C, D, z, st, config=cfg)


def _cases_for(cfg: dict, *, bf16: bool, fp16: bool) -> None:
    """One configuration with its T_CHUNK shrunk (the default suite): rows of 3 chunks, the last partial; E spanning
    a partial second channel block; resets at packed sample starts after gap tokens (one on a chunk boundary, a
    one-token sample just after another boundary)."""
    T, BE = cfg["T_CHUNK"], cfg["BLOCK_E"]
    R, L, E = 2, 2 * T + 5, BE + 3
    starts = packed_starts(R, L, [[T - 4, 1, 4], [T - 6, T - 6, 7]])
    assert starts[1, T] and starts[0, T + 2], "a start on a chunk boundary, a one-token sample after the boundary"
    fn = _fused(cfg)
    check_against_reference(fn, R, L, E, 16, starts, what=f"{cfg} fp32")
    if bf16:  # the model's mix under bf16 autocast: u, B, C, z in bf16, delta and A and D in float32
        dts = {"u": torch.bfloat16, "B": torch.bfloat16, "C": torch.bfloat16, "z": torch.bfloat16}
        check_against_reference(fn, R, L, E, 16, starts, dtypes=dts, what=f"{cfg} bf16 mix")
    if fp16:
        dts = {k: torch.float16 for k in ("u", "delta", "B", "C", "z")}
        check_against_reference(fn, R, L, E, 16, starts, dtypes=dts, seed=4, what=f"{cfg} fp16")


def case_small() -> None:
    """Every configuration's BLOCK_E / num_warps with T_CHUNK 8 (the carries over several chunks as on a GPU)."""
    from neuro_models.mamba.kernels.selective_scan import CONFIGS

    for i, cfg in enumerate(CONFIGS):
        _cases_for(dict(cfg, T_CHUNK=8), bf16=(i == 0), fp16=(i == 0))
    # 6 chunks (the carry loop's groups of four, full and partial), starts in several; and no D, no z, no starts,
    # N not a power of two, one row
    small = dict(CONFIGS[0], T_CHUNK=8)
    check_against_reference(_fused(small), 1, 45, 6, 16, packed_starts(1, 45, [[9, 1, 17, 5]]), seed=6,
                            what="6 chunks")
    check_against_reference(_fused(small), 1, 19, 6, 5, None, with_D=False, with_z=False, seed=5,
                            what="no D/z/starts, N=5")


def case_configs() -> None:
    """Every configuration of CONFIGS exactly (slow under the interpreter, whose cost grows with tokens x channel
    blocks: so one row and one partial channel block here; two blocks are covered by case_small): fp32 and the bf16
    mix, resets after gap tokens, one on a chunk boundary for a one-token sample, 3 chunks, the last partial."""
    from neuro_models.mamba.kernels.selective_scan import CONFIGS

    for cfg in CONFIGS:
        T, BE = cfg["T_CHUNK"], cfg["BLOCK_E"]
        L, E = 2 * T + 5, BE - 3
        starts = packed_starts(1, L, [[T - 6, 1, T - 12, 7]])
        assert starts[0, T] and starts[0, T + 4]
        fn = _fused(cfg)
        check_against_reference(fn, 1, L, E, 16, starts, what=f"{cfg} fp32")
        dts = {"u": torch.bfloat16, "B": torch.bfloat16, "C": torch.bfloat16, "z": torch.bfloat16}
        check_against_reference(fn, 1, L, E, 16, starts, dtypes=dts, seed=2, what=f"{cfg} bf16 mix")
        print(cfg, "passed", flush=True)


def case_op() -> None:
    """The custom op's registration: ``torch.library.opcheck`` (schema, fake tensor, autograd registration,
    AOT dispatch) on both ops, and a ``torch.compile(fullgraph=True)`` of a scan with its backward through the fake
    implementations, which must equal the eager result."""
    from neuro_models.mamba.kernels.selective_scan import CONFIGS

    low, _ = make_inputs(1, 9, 5, 4, seed=7)
    starts = packed_starts(1, 9, [[2, 1]], gap=2)
    tile = [c for c in CONFIGS if c.get("BWD_BLOCK_E")]
    assert tile, "a configuration with the tile backward"
    for cfg in (dict(CONFIGS[0], T_CHUNK=4), dict(tile[0], T_CHUNK=4)):  # the token-loop and the tile backward
        args = (low["u"], low["delta"], low["A"], low["B"], low["C"], low["D"], low["z"], starts,
                cfg["T_CHUNK"], cfg["BLOCK_E"], cfg["num_warps"], cfg.get("BWD_BLOCK_E", 0),
                cfg.get("BWD_WARPS", cfg["num_warps"]))
        torch.library.opcheck(torch.ops.neuromamba.selective_scan_fwd.default, args)
        y, h_in = torch.ops.neuromamba.selective_scan_fwd(*args)
        dy = torch.randn_like(y)
        bargs = (dy,) + tuple(a.detach() if isinstance(a, torch.Tensor) and a.dtype.is_floating_point else a
                              for a in args[:8]) + (h_in.detach(),) + args[8:]
        torch.library.opcheck(torch.ops.neuromamba.selective_scan_bwd.default, bargs)

    def step(u, d, A, B, C, D, z, st):
        y = selective_scan(u, d, A, B, C, D, z, st, impl="fused")
        return (y * y).sum()

    leaves = [low[k] for k in ("u", "delta", "A", "B", "C", "D", "z")]
    eager = torch.autograd.grad(step(*leaves, starts), leaves)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(*leaves, starts), leaves)
    for a, b in zip(got, eager):
        assert torch.equal(a, b), rel(a, b)


def case_model() -> None:
    """NeuroMamba (debug size, background removal and packing) with the fused scan equals the chunked scan: loss and
    every parameter gradient, in float32."""
    from neuro_models import registry as R

    img = (12, 18, 24, 6)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 1, *img, generator=g)
    m = torch.zeros(2, *img[:3], dtype=torch.bool)
    m[0, 2:9, 3:10, 4:15] = True
    m[1, 7:12, 1:16, 13:24] = True
    out = {}
    for impl in ("chunked", "fused"):
        torch.manual_seed(0)
        model = R.build_pretrain_model(R.get_config("neuromamba", "debug", img_size=img, scan_impl=impl))
        loss = model(x, brain_mask=m)["loss"]
        loss.backward()
        out[impl] = (loss.detach(), torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert abs(float(out["fused"][0] - out["chunked"][0])) <= 1e-5 * abs(float(out["chunked"][0])), out
    assert rel(out["fused"][1], out["chunked"][1]) < 1e-5, rel(out["fused"][1], out["chunked"][1])


CASES = {"small": case_small, "configs": case_configs, "op": case_op, "model": case_model}

# ------------------------------------------------------------------------------------------------------------------
# pytest
# ------------------------------------------------------------------------------------------------------------------


def _run(case: str) -> None:
    run_check("test_mamba_scan_triton.py", case)


def test_kernel_matches_float64_reference_and_custom_op_registration():
    """Cases "small" (every block size against the float64 reference) and "op" (opcheck, compiled graph) in one
    subprocess: the interpreter's import is paid once (the default suite's budget on 2 shared cores)."""
    _run("small,op")


@pytest.mark.slow
def test_kernel_matches_float64_reference_every_launch_configuration():
    _run("configs")


@pytest.mark.slow
def test_model_with_fused_scan_matches_chunked_scan():
    _run("model")


def _compile_for_h100(fn, types: dict, consts: dict, num_warps: int) -> str:
    """Compile a kernel for sm_90 with Triton's bundled ptxas (no GPU needed); its resource usage line."""
    import subprocess
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = {n: ("constexpr" if n in consts else types[n]) for n in fn.arg_names}
    src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
    ck = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(cuobjdump):
        return ""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(ck.asm["cubin"])
    out = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    os.unlink(f.name)
    return " ".join(line.strip() for line in out.splitlines() if "REG:" in line)


@pytest.mark.slow
def test_kernels_compile_for_h100_without_spills():
    """Every kernel, every launch configuration, bf16 inputs with D, z and starts, compiled to an sm_90 cubin on
    CPU: catches what the interpreter cannot (Triton type/compile errors on the GPU path, register spills)."""
    triton = pytest.importorskip("triton")
    from neuro_models.mamba.kernels import selective_scan as K

    if os.environ.get("TRITON_INTERPRET") == "1" or not hasattr(K._scan_bwd, "arg_names"):
        pytest.skip("the kernels are interpreted functions in this process")
    if not os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")):
        pytest.skip("Triton's bundled ptxas is missing")
    kernels = (K._chunk_fwd, K._carry, K._scan_out, K._chunk_bwd, K._scan_bwd, K._scan_bwd_tile)
    types = {"L": "i32", "E": "i32", "N": "i32", "nC": "i32", "R": "i32"}
    types.update({n: "*fp32" for fn in kernels for n in fn.arg_names if n.endswith("_ptr")})
    types.update(u_ptr="*bf16", B_ptr="*bf16", C_ptr="*bf16", z_ptr="*bf16", st_ptr="*u8")
    for cfg in K.CONFIGS:
        flags = dict(T_CHUNK=cfg["T_CHUNK"], BLOCK_E=cfg["BLOCK_E"], BLOCK_N=16, HAS_D=True, HAS_Z=True,
                     HAS_STARTS=True, REVERSE=True)
        for fn in kernels:
            tile = fn is K._scan_bwd_tile
            if tile and "BWD_BLOCK_E" not in cfg:
                continue
            f = dict(flags, BLOCK_E=cfg["BWD_BLOCK_E"]) if tile else flags
            usage = _compile_for_h100(fn, types, {k: v for k, v in f.items() if k in fn.arg_names},
                                      cfg["BWD_WARPS"] if tile else cfg["num_warps"])
            assert "LOCAL:0 " in usage + " " or not usage, (cfg, fn.__name__, usage)  # no register spills


def test_reference_helper_can_fail():
    """The comparison used by every case must reject a scan that is wrong only after a reset."""
    def no_reset(u, d, A, B, C, D, z, st):
        return selective_scan_sequential(u.float(), d.float(), A.float(), B.float(), C.float(), D.float(),
                                         z.float(), starts=None)

    starts = packed_starts(1, 20, [[5, 6]])
    with pytest.raises(AssertionError):
        check_against_reference(no_reset, 1, 20, 3, 4, starts)
    check_against_reference(lambda u, d, A, B, C, D, z, st: selective_scan_sequential(
        u.float(), d.float(), A.float(), B.float(), C.float(), D.float(), z.float(), starts=st), 1, 20, 3, 4, starts)


def test_auto_selection_and_override(monkeypatch):
    from neuro_models.mamba import scan
    from neuro_models.mamba.kernels import selective_scan as K

    u = torch.zeros(1, 4, 2)
    monkeypatch.delenv(SCAN_ENV, raising=False)
    if os.environ.get("TRITON_INTERPRET") != "1":  # plain CPU: the fused scan cannot run, auto keeps the old choice
        assert not K.available(torch.device("cpu")) and scan._auto_impl(u) == "auto"
        with pytest.raises(RuntimeError, match="chunked"):
            K.fused_selective_scan(u, u, torch.zeros(2, 3), torch.zeros(1, 4, 3), torch.zeros(1, 4, 3))
    assert scan._auto_impl(u.double()) in ("auto",)  # float64 never goes to the float32 kernel
    monkeypatch.setattr(K, "available", lambda device: True)
    # on since the H100 check: where the kernel can run (and is not the CPU interpreter), auto picks it
    assert scan.FUSED_IN_AUTO and K.default_config() == K.CONFIGS[K.DEFAULT_CONFIG]
    monkeypatch.setattr(K, "INTERPRET", False)
    assert scan._auto_impl(u) == "fused" and scan._auto_impl(u.double()) == "auto"
    monkeypatch.setattr(K, "INTERPRET", True)  # the interpreter is a test vehicle, never auto's choice
    assert scan._auto_impl(u) == "auto"
    monkeypatch.setattr(K, "INTERPRET", False)
    monkeypatch.setattr(scan, "FUSED_IN_AUTO", False)
    assert scan._auto_impl(u) == "auto"
    monkeypatch.setattr(scan, "FUSED_IN_AUTO", True)
    monkeypatch.setenv(SCAN_ENV, "chunked")
    assert scan._auto_impl(u) == "chunked"
    monkeypatch.setenv(SCAN_ENV, "auto")
    with pytest.raises(ValueError, match=SCAN_ENV):
        scan._auto_impl(u)
    with pytest.raises(ValueError, match="float64"):
        K.fused_selective_scan(u.double(), u.double(), torch.zeros(2, 3), torch.zeros(1, 4, 3), torch.zeros(1, 4, 3))
    with pytest.raises(ValueError, match="B has shape"):
        K.fused_selective_scan(u, u, torch.zeros(2, 3), torch.zeros(1, 5, 3), torch.zeros(1, 4, 3))


def test_config_accepts_fused_and_env_forces_chunked(monkeypatch):
    """``scan_impl="fused"`` is a valid config; ``$NEUROMAMBA_SCAN=chunked`` makes "auto" the chunked scan, equal to it
    bit for bit."""
    from neuro_models import registry as R

    R.get_config("neuromamba", "debug", scan_impl="fused")
    monkeypatch.setenv(SCAN_ENV, "chunked")
    low, _ = make_inputs(1, 12, 3, 4)
    args = [low[k].detach() for k in ("u", "delta", "A", "B", "C", "D", "z")]
    st = packed_starts(1, 12, [[4, 3]], gap=1)
    assert torch.equal(selective_scan(*args, st, impl="auto"), selective_scan(*args, st, impl="chunked"))


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("run with TRITON_INTERPRET=1 (through interpreted.run_check)")
    torch.manual_seed(0)
    for case in sys.argv[1].split(","):
        CASES[case]()
        print(case, "passed", flush=True)
    print("ok")


def test_scan_config_from_environment(monkeypatch):
    """``NEUROMAMBA_SCAN_CONFIG``: an index into CONFIGS or a JSON launch configuration (a candidate timed through
    the model before it enters the list); anything else is refused with the variable's name."""
    from neuro_models.mamba.kernels import selective_scan as K

    monkeypatch.delenv(K._ENV_CONFIG, raising=False)
    assert K.default_config() is K.CONFIGS[K.DEFAULT_CONFIG]
    monkeypatch.setenv(K._ENV_CONFIG, "1")
    assert K.default_config() is K.CONFIGS[1]
    monkeypatch.setenv(K._ENV_CONFIG, '{"T_CHUNK": 256, "BLOCK_E": 32, "num_warps": 1}')
    assert K.default_config() == {"T_CHUNK": 256, "BLOCK_E": 32, "num_warps": 1}
    monkeypatch.setenv(K._ENV_CONFIG, '{"T_CHUNK": 32, "BLOCK_E": 64, "num_warps": 4, "BWD_BLOCK_E": 0}')
    assert K.default_config()["BWD_BLOCK_E"] == 0
    for bad, why in [(str(len(K.CONFIGS)), "index into CONFIGS"), ("fast", "index into CONFIGS"),
                     ('{"T_CHUNK": 256, "BLOCK_E": 32}', "missing \\['num_warps'\\]"),
                     ('{"T_CHUNK": 256, "BLOCK_E": 24, "num_warps": 1}', "BLOCK_E=24 must be a power of two"),
                     ('{"T_CHUNK": 256, "BLOCK_E": 32, "num_warps": 0}', "num_warps=0"),
                     ('{"T_CHUNK": 256, "BLOCK_E": 32, "num_warps": 1, "WARPS": 2}', "unknown \\['WARPS'\\]"),
                     ('{"T_CHUNK": 256,', "not JSON")]:
        monkeypatch.setenv(K._ENV_CONFIG, bad)
        with pytest.raises(ValueError, match=why):
            K.default_config()
