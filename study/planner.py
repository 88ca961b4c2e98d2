"""The run planner: how each run is split on the device kind it will run on, and what it will cost.

For a :class:`~study.spec.RunSpec`, a device kind (``study/device_kinds.json``) and a number of workers, the
planner chooses the micro-batch (hence gradient accumulation), activation checkpointing, the ZeRO stage, compile
and loader workers so that the run fits the device's memory with a margin, and predicts its peak memory,
samples/s and GPU-hours. The global batch is the study's; only how it is split changes. A run that no plan fits
is refused with the reason before anything starts.

Memory (per device, GiB) = model state + activations + a fixed overhead:

* **model state**: fp32 weights 4 B, fp32 gradients 4 B and AdamW's two fp32 moments 8 B per parameter (bf16
  autocast keeps fp32 master weights, DDP and DeepSpeed alike), the optimizer step's temporaries and DDP's gradient
  buckets; ZeRO-1 partitions the moments (and the step's temporaries) over the workers, ZeRO-2 also the gradients,
  ZeRO-3 also the weights. The peak is the larger of the backward's (state + activations) and the step's;
* **activations**: ``micro_batch x (c x E + f x V)`` bytes, where ``E`` is the encoder's activation elements per
  sample (for the 4D Swin families ``sum over stages of tokens x width x depth``) and ``V`` the input's voxel-frames
  (input, decoder and loss); ``c`` and ``f`` are fitted per mode (eager, compiled) to peaks measured through
  ``train()`` (``fit_activation_model``; BENCHMARKS.md, "Run planner"); under checkpointing each block keeps its
  fp32 input and one block is recomputed at a time;
* **overhead**: the CUDA context, cuBLAS/cuDNN workspaces and allocator slack, a constant.

Throughput comes from the committed table of measured rows (``benchmarks/results/planner/*.jsonl``): an exact
(family, size, FLOPs per sample, device kind, micro-batch, compile, checkpointing) row is ``measured``; otherwise
the prediction says how it was made: each measured configuration's rate at the run's micro-batch (its trend in
log2(micro-batch), never above its largest measured one), the achieved FLOP rate interpolated between the measured
configurations just below and above the run's FLOPs per sample (log-log; the nearest end's outside them; NeuroMamba's
rows placed where their sizes are under the run's model settings), another device kind by the ratio of their dense
bf16 peaks, several workers at the measured 4-GPU strong-scaling efficiency. The rows are the device's rate on
preloaded inputs; a run reads its windows through the loader, and each device's host input time per window
(:data:`INPUT_S_PER_WINDOW`, measured on one H100 host) is added to its time per sample.

Why one file of ~530 lines: the memory model, the throughput table and the choice of a plan are read together
(the choice tries micro-batches against both), and each part is short; splitting them would spread one decision.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable

from neuro_models import registry as R
from study.spec import RunSpec

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
MEASURED_DIR = REPO / "benchmarks" / "results" / "planner"

#: fraction of a device's memory a plan may use (the rest absorbs fragmentation spikes and the loader's pinned buffers)
MEMORY_MARGIN = 0.90
#: the training process's time per input window that does not overlap the device's work (receiving a loader batch,
#: copying it to pinned memory and to the device), per device, at 96^3 x 20 windows: on one H100 host (session 18,
#: loaders with reused shared-memory buffers and thread-pool pinning) 51M at micro-batch 32 through the study with 6
#: loader workers ran at 317.0 samples/s against 434.3 on preloaded inputs (0.85 ms), and the v1 configuration
#: through train() with 4 / 8 workers at 206.3 / 204.5 against 238.1 (0.67 ms); the mean, scaled by the window's
#: voxels x frames for other grids and lengths. Measured rows are preloaded (the device's rate); a run reads files.
INPUT_S_PER_WINDOW = 0.76e-3
INPUT_REF_ELEMENTS = 96 ** 3 * 20
INPUT_SOURCE = f"{INPUT_S_PER_WINDOW * 1e3:g} ms per 96^3 x 20 window of host input time, one H100 host (session 18)"


def with_input_cost(rate: float, spec: RunSpec, workers: int) -> float:
    """``rate`` (samples/s of the whole run on preloaded inputs, ``workers`` devices) with each device's host input
    time per window (:data:`INPUT_S_PER_WINDOW`, scaled by the window's elements) added to its time per sample."""
    t = INPUT_S_PER_WINDOW * math.prod(spec.grid) * spec.sequence_length / INPUT_REF_ELEMENTS
    scale = workers * SCALING_EFFICIENCY if workers > 1 else 1.0  # the run's rate over one device's
    return scale / (scale / rate + t)


#: multi-worker rate = workers x one-device rate x this (51M/806M strong scaling at 4 H100s: 95.8% / 90.4%)
SCALING_EFFICIENCY = 0.90
#: model-state bytes per parameter: fp32 weights, fp32 grads, AdamW moments; DDP's buckets hold one more copy
STATE_BYTES = {"weights": 4.0, "grads": 4.0, "moments": 8.0, "ddp_buckets": 4.0}

GiB = 2.0 ** 30
#: MFU assumed only where no measured row exists for a family and mode (the prediction says so)
ASSUMED_MFU = 0.15
#: families whose achieved FLOP rate follows the model (its width), not the work per sample or per micro-step:
#: NeuroMamba's background removal cuts the FLOPs per sample 2.75x at 0.89x / 0.96x the FLOP rate (3.1M 13.9 vs 15.6
#: TFLOP/s, 12M 27.8 vs 28.9) and 91M's micro-batch 2 -> 4 gained 3%, so the throughput extrapolation places a row
#: measured with other model settings at the FLOPs per sample its size has under the run's. SwiFT's rate follows
#: the work per micro-step (51M 41 TFLOP/s at micro-batch 16, 64 at 32; 806M 122 at 4, 238 at 8): its rows stay
#: at the FLOPs per sample they were measured at.
RATE_FOLLOWS_MODEL = frozenset({"neuromamba"})


@dataclass(frozen=True)
class DeviceKind:
    name: str
    vendor: str
    memory_gib: float
    peak_bf16_tflops: float
    matmul_tflops: float | None
    names: tuple


@lru_cache(maxsize=1)
def device_kinds() -> dict[str, DeviceKind]:
    """The device kinds in ``study/device_kinds.json``."""
    raw = json.loads((HERE / "device_kinds.json").read_text())
    return {k: DeviceKind(name=k, vendor=v["vendor"], memory_gib=float(v["memory_gib"]),
                          peak_bf16_tflops=float(v["peak_bf16_tflops"]), matmul_tflops=v.get("matmul_tflops"),
                          names=tuple(v.get("names", ()))) for k, v in raw.items() if not k.startswith("_")}


def device_kind(name: str) -> DeviceKind:
    """A kind by its key (``h100-80gb``) or by a device name the driver reports (``NVIDIA H100 80GB HBM3``)."""
    kinds = device_kinds()
    if name in kinds:
        return kinds[name]
    for kind in kinds.values():
        if any(n.lower() in name.lower() for n in kind.names):
            return kind
    raise ValueError(f"device kind {name!r} is unknown; allowed: {sorted(kinds)} (add one to study/device_kinds.json)")


# --------------------------------------------------------------------------------------------------
# memory model
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ActivationFit:
    """Bytes kept for the backward per sample: ``c x E + f x V`` (E: encoder activation elements, V: input
    voxel-frames). Under activation checkpointing each block keeps only its fp32 input (``saved`` bytes per element)
    and the largest block's full activations exist once, during its recompute."""

    c: float
    f: float
    saved: float = 0.0
    source: str = ""
    transient: float = 0.0
    """Bytes per element of the largest block held once, during its backward (gradients of its activations and a
    kernel's scratch: NeuroMamba's fused scan keeps fp32 states of the whole row for one block at a time)."""


#: least-squares fits (``fit_activation_model``) to the peaks measured through train() on one H100 (DDP, bf16
#: autocast, the model defaults) in benchmarks/results/planner/h100_{eager,compiled}.jsonl (BENCHMARKS.md "Run
#: planner"); checkpointing: 4 B (the fp32 block input) per element, checked against the one checkpointed row
ACTIVATION_FITS: dict[str, ActivationFit] = {
    "eager": ActivationFit(c=37.9, f=6.1, source="h100_eager.jsonl: 51M mb16/32, 202M mb16, 806M mb4/8"),
    "compiled": ActivationFit(c=35.7, f=6.3, source="h100_compiled.jsonl: 51M mb16/32, 806M mb4/8"),
    "checkpointed": ActivationFit(c=37.9, f=6.1, saved=4.0, source="fp32 block inputs + one block recomputed"),
}
#: per-family fits where the family's blocks keep something else than SwiFT's (``ACTIVATION_FITS``): NeuroMamba,
#: compiled, from the four rows of benchmarks/results/planner/h100_mamba_compiled.jsonl (session 16: 1.4M/3.1M/12M
#: without background removal at 12 blocks, 91M with it at 24 blocks), ``f`` taken from SwiFT's fit and ``(c,
#: transient)`` by least squares (``fit_activation_model(rows, f=6.3, transient=True)``): the two depths separate a
#: per-block cost from the one-block backward transient. No eager NeuroMamba peak was measured: eager runs use it too.
#: Held out (session 17, rows 5-7 of that file): 91M with removal at micro-batch 4 +0.3%, 3.1M / 12M with removal at
#: micro-batch 8 +6.1% / +6.8% (predicted above the measured peak). A fit to all seven rows (c 19.76, transient 133.0)
#: leaves those two at +4.7% / +5.3% and moves the four fitted rows to -0.3..-1.7%: the small sizes' bias with
#: removal is the model's form, not its constants, so the four-row fit stays.
FAMILY_ACTIVATION_FITS: dict[str, dict[str, ActivationFit]] = {
    "neuromamba": {"compiled": ActivationFit(c=19.50, f=6.3, transient=141.2,
                                             source="h100_mamba_compiled.jsonl: 1.4M/3.1M mb8, 12M mb4 (no background "
                                                    "removal; session 19's repeats), 91M mb2 (removal, session 16); f "
                                                    "fixed at SwiFT's")},
}
#: model-state bytes per parameter at the activation peak (early in the backward: weights, moments and the last
#: stages' gradients, which hold most parameters) and at the optimizer step (weights, grads, moments and the
#: step's temporaries, one fp32 copy: the 3B's 61.6 GiB at micro-batch 2 is this peak)
PEAK_STATE_BYTES = {"backward": 15.0, "step": 20.0}
#: CUDA context, workspaces and allocator slack (the fits' intercept)
OVERHEAD_GIB = 0.5


def activation_elements(cfg: Any) -> tuple[float, float, float]:
    """``(E, V, B)``: encoder activation elements, input voxel-frames and the largest block's elements per sample."""
    img = getattr(cfg, "img_size", None)
    voxels = float(math.prod(img)) if img else 0.0
    tokens = float(R.tokens_per_sample(cfg))
    if getattr(cfg, "remove_background", False):  # NeuroMamba packs the kept (brain) tokens only
        tokens *= float(cfg.brain_token_fraction)
    if hasattr(cfg, "stage_dims") and hasattr(cfg, "depths"):  # 4D Swin families: patch merging over space only
        per_stage = [tokens / 8 ** i * d for i, d in enumerate(cfg.stage_dims())]
        return sum(e * n for e, n in zip(per_stage, cfg.depths)), voxels, max(per_stage)
    depth = getattr(cfg, "depth", None) or 1
    block = tokens * float(cfg.embed_dim) * 2.0  # Mamba blocks expand the width 2x
    return block * float(depth), voxels, block


def _state_gib(n: float, *, world: int, zero_stage: int, dist: str) -> dict[str, float]:
    w, g, m = 4.0, 4.0, 8.0
    temp = PEAK_STATE_BYTES["step"] - (w + g + m)
    grads_at_peak = PEAK_STATE_BYTES["backward"] - (w + m)
    z = zero_stage if dist == "deepspeed" else 0
    buckets = 4.0 if dist == "ddp" and world > 1 else 0.0
    if z >= 1:
        m, temp = m / world, temp / world
    if z >= 2:
        g, grads_at_peak = g / world, grads_at_peak / world
    if z >= 3:
        w /= world
    return {"backward": n * (w + m + grads_at_peak + buckets) / GiB, "step": n * (w + g + m + temp + buckets) / GiB}


def memory_gib(spec: RunSpec, *, world: int, micro_batch: int, zero_stage: int, checkpointing: bool,
               compiled: bool, distributed: str | None = None) -> dict[str, float]:
    """Predicted peak memory per device (GiB): ``max(state at the backward + activations, state at the step)``
    plus the overhead, with the parts."""
    from study.run_math import model_config

    cfg = model_config(spec)
    n = float(R.param_counts(cfg)["total"])
    state = _state_gib(n, world=world, zero_stage=zero_stage, dist=distributed or spec.distributed)
    e, v, block = activation_elements(cfg)
    if checkpointing:
        fit = ACTIVATION_FITS["checkpointed"]
        per_sample = fit.saved * e + fit.f * v + fit.c * block
    else:
        fam = FAMILY_ACTIVATION_FITS.get(cfg.family)
        fit = (fam["compiled"] if fam else ACTIVATION_FITS["compiled" if compiled else "eager"])
        per_sample = fit.c * e + fit.f * v + fit.transient * block
    act = micro_batch * per_sample / GiB
    total = max(state["backward"] + act, state["step"]) + OVERHEAD_GIB
    return {"state": state["step"], "activations": act, "overhead": OVERHEAD_GIB, "total": total}


def fit_activation_model(rows: Iterable[dict], *, f: float | None = None, transient: bool = False) -> ActivationFit:
    """Least-squares ``(c, f)`` from measured rows of one mode (no checkpointing), given the state model: the
    activation part of each peak is ``peak - overhead - state at the backward`` (rows whose peak is the optimizer
    step's are left out). ``f`` given: only ``c`` (and with ``transient``, the one-block term) is fitted."""
    import numpy as np

    from study.run_math import model_config

    X, y = [], []
    for r in rows:
        spec = RunSpec(family=r["family"], size=r["size"], grid=(96, 96, 96), sequence_length=r.get("T", 20),
                       model_overrides=_row_overrides(r))
        cfg = model_config(spec)
        n = float(R.param_counts(cfg)["total"])
        st = _state_gib(n, world=r["gpus"], zero_stage=r.get("zero_stage", 0), dist=r.get("dist", "ddp"))
        act = r["peak_mem_gib"] - OVERHEAD_GIB - st["backward"]
        if r["peak_mem_gib"] - OVERHEAD_GIB <= st["step"] * 1.02:
            continue
        e, v, block = activation_elements(cfg)
        mb = r["micro_batch"]
        X.append([mb * e] + ([mb * block] if transient else []) + ([] if f is not None else [mb * v]))
        y.append(act * GiB - (0.0 if f is None else mb * f * v))
    if len(X) < 2:
        raise ValueError(f"fit_activation_model needs >= 2 rows whose peak is the backward's, got {len(X)}")
    coef, *_ = np.linalg.lstsq(np.asarray(X), np.asarray(y), rcond=None)
    coef = [float(x) for x in coef]
    c = coef.pop(0)
    t = coef.pop(0) if transient else 0.0
    return ActivationFit(c=c, f=float(f) if f is not None else coef.pop(0), transient=t, source=f"{len(X)} rows")


def _row_overrides(r: dict) -> dict:
    """A measured row's model overrides (``overrides``: JSON text, as benchmarks/train_scaling.py writes it)."""
    ov = r.get("overrides") or {}
    return json.loads(ov) if isinstance(ov, str) else dict(ov)


# --------------------------------------------------------------------------------------------------
# measured throughput
# --------------------------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def measured_rows() -> tuple[dict, ...]:
    """Every row of ``benchmarks/results/planner/*.jsonl`` (one measured configuration each)."""
    rows = []
    for f in sorted(MEASURED_DIR.glob("*.jsonl")) if MEASURED_DIR.is_dir() else []:
        for line in f.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                r["_file"] = f.name
                if r.get("samples_per_s") and r.get("device"):
                    r["device_kind"] = device_kind(r["device"]).name
                    rows.append(r)
    return tuple(rows)


def _rate_at_micro_batch(rows: list[dict], micro_batch: int) -> tuple[float, str]:
    """samples/s of one measured configuration (the rows of one size and FLOPs per sample on one device kind) at
    ``micro_batch``: the measured row; between or below two measured micro-batches the rate's trend in
    log2(micro-batch); above the largest one measured the largest one's rate (a saturated GPU does not speed up)."""
    by_mb = sorted({r["micro_batch"]: r for r in rows}.values(), key=lambda r: r["micro_batch"])
    if any(r["micro_batch"] == micro_batch for r in by_mb):
        return next(r for r in by_mb if r["micro_batch"] == micro_batch)["samples_per_s"], ""
    if len(by_mb) >= 2 and micro_batch < by_mb[-1]["micro_batch"]:
        lo, hi = (by_mb[0], by_mb[1]) if micro_batch <= by_mb[0]["micro_batch"] else next(
            (a, b) for a, b in zip(by_mb, by_mb[1:]) if a["micro_batch"] <= micro_batch <= b["micro_batch"])
        t = math.log2(micro_batch / lo["micro_batch"]) / math.log2(hi["micro_batch"] / lo["micro_batch"])
        how = f"micro-batch {micro_batch} on the log-log line through mb{lo['micro_batch']} and mb{hi['micro_batch']}"
        return lo["samples_per_s"] ** (1 - t) * hi["samples_per_s"] ** t, how
    r = min(by_mb, key=lambda r: abs(math.log2(r["micro_batch"] / micro_batch)))
    return r["samples_per_s"], f"micro-batch {r['micro_batch']} -> {micro_batch} at the same rate"


def interpolate_flop_rate(points: list[tuple[float, float, str]], fps: float) -> tuple[float, str, list[str]]:
    """Achieved FLOP rate at ``fps`` training FLOPs per sample from measured ``(fps, FLOP rate, label)`` points:
    a point's own rate at its FLOPs (within 1%); between the nearest points below and above, log(rate) linear in
    log(FLOPs per sample), so samples/s also lies between theirs (linear in the rate itself put SwiFT 202M at
    micro-batch 8 above 51M's samples/s); outside the measured range the nearest end's rate.
    Returns ``(rate, how, labels of the points used)``."""
    pts = sorted(points, key=lambda p: p[0])
    x = math.log(fps)
    at = [p for p in pts if abs(math.log(p[0]) - x) < 0.01]
    if at:
        return at[0][1], f"from {at[0][2]} at its FLOP rate", [at[0][2]]
    if x < math.log(pts[0][0]) or x > math.log(pts[-1][0]):
        end, which = (pts[0], "least") if x < math.log(pts[0][0]) else (pts[-1], "most")
        return end[1], f"from {end[2]} at its FLOP rate, the {which} FLOPs per sample measured", [end[2]]
    lo, hi = next((a, b) for a, b in zip(pts, pts[1:]) if a[0] < fps < b[0])
    t = (x - math.log(lo[0])) / (math.log(hi[0]) - math.log(lo[0]))
    how = f"interpolated between {lo[2]} and {hi[2]} rows (log FLOP rate linear in log FLOPs per sample)"
    return lo[1] ** (1 - t) * hi[1] ** t, how, [lo[2], hi[2]]


def predict_throughput(spec: RunSpec, kind: DeviceKind, *, world: int, micro_batch: int, compiled: bool,
                       checkpointing: bool, rows: Iterable[dict] | None = None) -> tuple[float | None, str]:
    """``(samples/s of the whole run, source)``: measured where a row matches, else extrapolated and said so.

    Not measured: each measured configuration (size and FLOPs per sample) of the family, mode and device kind gives
    its achieved FLOP rate at this micro-batch (``_rate_at_micro_batch``), and the run's FLOP rate is interpolated
    between the configurations just below and above its training FLOPs per sample (``interpolate_flop_rate``);
    NeuroMamba's configurations sit where their sizes are under the run's model settings (``RATE_FOLLOWS_MODEL``).
    """
    from study.run_math import model_config

    # a row marked ``memory_only`` keeps a memory fit's provenance; its rate is superseded (e.g. measured with an
    # older kernel launch) and is not a throughput row
    rows = [r for r in (measured_rows() if rows is None else rows) if not r.get("memory_only")]
    cfg = model_config(spec)
    fps = R.flops_per_sample(cfg)["train"]

    def same_mode(r):
        return bool(r.get("compile")) == compiled and bool(r.get("checkpointing")) == checkpointing

    cands = [r for r in rows if r["family"] == spec.family and same_mode(r)]
    # the same configuration: size, micro-batch, kind and FLOPs per sample (NeuroMamba's background removal, a
    # SwiFT patch or window override change the work per sample under the same size name)
    exact = [r for r in cands if r["size"] == spec.size and r["micro_batch"] == micro_batch
             and r["device_kind"] == kind.name and abs(math.log(r["train_flops_per_sample"] / fps)) < 0.01]
    if exact:
        r = exact[0]
        rate, src = r["samples_per_s"], f"measured ({r['_file']}: {r['size']} mb{r['micro_batch']} on {kind.name})"
    else:
        if not cands:
            rate = ASSUMED_MFU * kind.peak_bf16_tflops * 1e12 / fps * (world * SCALING_EFFICIENCY if world > 1 else 1)
            return rate, (f"ASSUMED {ASSUMED_MFU:.0%} MFU of {kind.name}'s {kind.peak_bf16_tflops:g} TFLOP/s: no measured "
                          f"row for {spec.family} {'compiled' if compiled else 'eager'}"
                          f"{' checkpointed' if checkpointing else ''} (run benchmarks/planner_calibration.sh)")
        # one source kind: this one if measured, else the kind with the most rows (scaled by the peaks' ratio)
        counts: dict[str, int] = {}
        for r in cands:
            counts[r["device_kind"]] = counts.get(r["device_kind"], 0) + 1
        src_kind = kind.name if kind.name in counts else max(sorted(counts), key=counts.get)
        configs: list[list[dict]] = []  # the rows of one size and FLOPs per sample (one per micro-batch)
        for r in (r for r in cands if r["device_kind"] == src_kind):
            group = next((g for g in configs if g[0]["size"] == r["size"] and abs(math.log(
                g[0]["train_flops_per_sample"] / r["train_flops_per_sample"])) < 0.01), None)
            if group is None:
                configs.append([r])
            else:
                group.append(r)
        ratio: dict[str, float] = {}  # the run's FLOPs per sample over the same run's with a row's overrides

        def place(row: dict) -> float:
            """Where a measured configuration sits on the run's FLOPs-per-sample axis (``RATE_FOLLOWS_MODEL``)."""
            if spec.family not in RATE_FOLLOWS_MODEL:
                return row["train_flops_per_sample"]
            ov = _row_overrides(row)
            key = json.dumps(ov, sort_keys=True)
            if key not in ratio:
                other = spec.replace(model_overrides={**dict(spec.model_overrides), **ov})
                ratio[key] = fps / R.flops_per_sample(model_config(other))["train"]
            return row["train_flops_per_sample"] * ratio[key]

        # one configuration per place: at a place held by two (NeuroMamba's one size measured with removal on and
        # off), the one measured with the run's own settings
        placed: list[tuple[float, list[dict]]] = []
        for g in configs:
            x, own = place(g[0]), abs(math.log(place(g[0]) / g[0]["train_flops_per_sample"]))
            i = next((i for i, (y, _) in enumerate(placed) if abs(math.log(x / y)) < 0.01), None)
            if i is None:
                placed.append((x, g))
            elif own < abs(math.log(placed[i][0] / placed[i][1][0]["train_flops_per_sample"])):
                placed[i] = (x, g)
        points, mb_how = [], {}
        for x, g in placed:
            g_fps, label = g[0]["train_flops_per_sample"], g[0]["size"]
            if abs(math.log(x / g_fps)) >= 0.01:
                label += f" (measured with {', '.join(f'{k}={v}' for k, v in _row_overrides(g[0]).items())})"
            elif sum(h[0]["size"] == g[0]["size"] for _, h in placed) > 1:  # one size at two FLOPs per sample
                label += f" at {g_fps / 1e12:.3g} TFLOP/sample"
            sps, mb_how[label] = _rate_at_micro_batch(g, micro_batch)
            points.append((x, sps * g_fps, label))
        flop_rate, how, used = interpolate_flop_rate(points, fps)
        rate = flop_rate / fps
        how += f" on {src_kind}" + "".join(f", {lab} {mb_how[lab]}" for lab in used if mb_how[lab])
        if src_kind != kind.name:
            sk = device_kinds()[src_kind]
            rate *= kind.peak_bf16_tflops / sk.peak_bf16_tflops
            how += f", x peak ratio {kind.name}/{sk.name}"
        src = ("" if how.startswith("interpolated") else "extrapolated ") + how + f" ({configs[0][0]['_file']})"
    if world > 1:
        rate *= world * SCALING_EFFICIENCY
        src += f"; x {world} workers x {SCALING_EFFICIENCY:.0%} scaling"
    return rate, src


# --------------------------------------------------------------------------------------------------
# the plan
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunPlan:
    """How one run is split and what it is predicted to cost (``--dry-run --json`` prints these fields)."""

    run_id: str
    family: str
    size: str
    parametrization: str
    lr: float
    device_kind: str
    global_batch: int
    micro_batch: int
    accumulation: int
    workers: int
    activation_checkpointing: bool
    zero_stage: int | None
    compile: bool
    loader_workers: int
    predicted_peak_gib: float
    device_memory_gib: float
    predicted_samples_per_s: float | None
    throughput_source: str
    gpu_hours: float | None
    fits: bool
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _divisors_desc(n: int) -> list[int]:
    return [d for d in range(n, 0, -1) if n % d == 0]


def plan_run(spec: RunSpec, kind: DeviceKind | str, *, workers: int, cpus_per_device: int = 8,
             margin: float = MEMORY_MARGIN) -> tuple[RunSpec, RunPlan]:
    """The fastest split of ``spec`` that fits ``kind`` and the spec that carries it.

    Order of preference: no activation checkpointing with the largest micro-batch that fits (fewer, larger
    steps keep a GPU busy: a 51M step is host-bound below ~32 samples per micro-step), then checkpointing; the
    ZeRO stage rises only when model state alone does not fit. Returns ``fits=False`` with the reason when nothing
    does (the caller refuses the run).
    """
    from study.run_math import checkpoint_field

    kind = device_kind(kind) if isinstance(kind, str) else kind
    if spec.batch_size % workers:
        raise ValueError(f"batch_size={spec.batch_size} does not divide across {workers} workers")
    per_rank = spec.batch_size // workers
    compiled = kind.vendor == "cuda"  # Inductor's Triton path; XPU and ROCm keep eager until measured there
    budget = kind.memory_gib * margin
    stages = [spec.zero_stage] if spec.distributed == "ddp" else list(range(spec.zero_stage, 4))
    can_checkpoint = checkpoint_field(spec.family) is not None
    chosen = None
    for z in stages:
        for ckpt in (False, True) if can_checkpoint else (False,):
            for mb in _divisors_desc(per_rank):
                mem = memory_gib(spec, world=workers, micro_batch=mb, zero_stage=z, checkpointing=ckpt,
                                 compiled=compiled and not ckpt)
                if mem["total"] <= budget:
                    chosen = (z, ckpt, mb, mem)
                    break
            if chosen:
                break
        if chosen:
            break
    if chosen is None:
        z, ckpt, mb = stages[-1], can_checkpoint, 1
        mem = memory_gib(spec, world=workers, micro_batch=1, zero_stage=z, checkpointing=ckpt, compiled=False)
        reason = (f"does not fit {kind.name} ({kind.memory_gib:g} GiB, {margin:.0%} usable) with any plan: at "
                  f"micro-batch 1{', activation checkpointing' if ckpt else ''}"
                  f"{f' and ZeRO-{z}' if spec.distributed == 'deepspeed' else ' under DDP'}: model state "
                  f"{mem['state']:.1f} + activations {mem['activations']:.1f} + overhead {mem['overhead']:.1f} = "
                  f"{mem['total']:.1f} GiB")
    else:
        z, ckpt, mb, mem = chosen
        reason = ""
    # ZeRO-0 is data parallelism with replicated optimizer state: DDP computes the same step, and a DDP run's
    # compiled regions may replay as CUDA graphs (study.train.uses_cuda_graphs), which DeepSpeed's are not
    dist_kind = "ddp" if chosen is not None and z == 0 and kind.vendor == "cuda" else spec.distributed
    planned = spec.replace(micro_batch_size=mb, zero_stage=z, compile=compiled and not ckpt, distributed=dist_kind,
                           num_workers=max(1, min(8, cpus_per_device - 2)), activation_checkpointing=ckpt)
    plan = assess_run(planned, kind, workers=workers, margin=margin)
    return planned, dataclasses.replace(plan, fits=chosen is not None, reason=reason)


def assess_run(spec: RunSpec, kind: DeviceKind | str, *, workers: int, margin: float = MEMORY_MARGIN) -> RunPlan:
    """The prediction for ``spec`` as it is configured (micro-batch, checkpointing, ZeRO, compile): nothing chosen."""
    from study.run_math import BatchPlan, checkpoint_field, model_config, total_steps

    kind = device_kind(kind) if isinstance(kind, str) else kind
    bp = BatchPlan.make(spec, workers)
    field = checkpoint_field(spec.family)
    ckpt = bool(spec.activation_checkpointing or (field and dict(spec.model_overrides).get(field)))
    z = spec.zero_stage if spec.distributed == "deepspeed" else None
    mem = memory_gib(spec, world=workers, micro_batch=bp.micro_batch, zero_stage=z or 0, checkpointing=ckpt,
                     compiled=spec.compile)
    rate, source = predict_throughput(spec, kind, world=workers, micro_batch=bp.micro_batch, compiled=spec.compile,
                                      checkpointing=ckpt)
    if rate:  # the rows are the device's rate on preloaded inputs; the run reads its windows from files
        rate, source = with_input_cost(rate, spec, workers), f"{source}; + {INPUT_SOURCE}"
    cfg = model_config(spec)
    steps = total_steps(spec, flops_per_sample=R.flops_per_sample(cfg)["train"],
                        tokens_per_sample=R.tokens_per_sample(cfg))
    fits = mem["total"] <= kind.memory_gib * margin
    return RunPlan(run_id=spec.run_id, family=spec.family, size=spec.size, parametrization=spec.parametrization,
                   lr=spec.lr, device_kind=kind.name, global_batch=spec.batch_size, micro_batch=bp.micro_batch,
                   accumulation=bp.accumulation, workers=workers, activation_checkpointing=ckpt, zero_stage=z,
                   compile=spec.compile, loader_workers=spec.num_workers, predicted_peak_gib=round(mem["total"], 2),
                   device_memory_gib=kind.memory_gib, predicted_samples_per_s=rate, throughput_source=source,
                   gpu_hours=steps * spec.batch_size / rate * workers / 3600 if rate else None, fits=fits,
                   reason="" if fits else f"predicted {mem['total']:.1f} GiB > {margin:.0%} of {kind.memory_gib:g} GiB")


def plan_study(specs: list[RunSpec], kind: DeviceKind | str, *, workers: int, cpus_per_device: int = 8
               ) -> tuple[list[RunSpec], dict[str, RunPlan]]:
    """Plan every run; refuse (``ValueError``, every unfit run and why) when any run fits no plan."""
    out, plans = [], {}
    for spec in specs:
        planned, plan = plan_run(spec, kind, workers=workers, cpus_per_device=cpus_per_device)
        out.append(planned)
        plans[planned.run_id] = plan
    bad = [p for p in plans.values() if not p.fits]
    if bad:
        raise ValueError(f"{len(bad)} run(s) fit no plan on {bad[0].device_kind}:\n" +
                         "\n".join(f"  {p.run_id}: {p.reason}" for p in bad))
    return out, plans
