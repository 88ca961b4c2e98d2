"""Study plans: named presets (and user functions) that return the runs of a study.

A plan is data: a list of :class:`~study.spec.RunSpec` plus how to execute it (workers per trial,
GPUs, an optional per-size LR search). Presets:

``demo``
    Embedded local Ray, the synthetic cohort, tiny SwiFT v2 widths, an IsoFLOP grid of three compute
    budgets and a data-mixture axis; minutes on a 2-core machine.
``ladder`` / ``ladder-xl``
    The seed's ladder on a real manifest (``ladder``: 51M, 202M, 806M at 1e18..1e19 FLOPs; ``ladder-xl``: up to 3B
    at 3e18..1e20), DeepSpeed, bf16, muP with a transferred LR (``--lr-from``). Site-free: the hardware comes from
    a site profile (``--site NAME``, default ``$NEUROX_SITE``; :mod:`study.sites` reads ``pbs/profiles/NAME.sh``),
    one run per node: the node's devices are a run's workers. Each run is split by the run planner
    (:mod:`study.planner`: micro-batch, checkpointing, ZeRO stage, compile, loader workers) for the site's device
    kind (``--device-kind`` / ``--cpus-per-device`` override the site's).
``mamba-ladder``
    The NeuroMamba ladder (1.4M ... 91M) over compute and data on a real manifest, background removal on, through the
    ladder machinery above (site, planner, muP and ``--lr-from``); see :func:`mamba_ladder`.
``mamba-demo``
    The NeuroMamba counterpart of ``demo``: ``debug`` widths 16-64, background removal on, a 3-budget IsoFLOP grid on
    the demo's synthetic cohort; minutes on 2 CPU cores.
``pkg.module:function``
    A user's own study: the function takes the parsed options (``argparse.Namespace``) and returns a
    list of run specs or a :class:`StudyPlan`.

The compute axis is each model's *analytic* FLOPs (``neuro_models.registry.flops_per_sample``), the
data axis samples/tokens seen; never 6ND.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from neuro_models import registry as R
from study.spec import RunSpec
from study.run_math import model_config, total_steps


@dataclass(frozen=True)
class LRSearch:
    """Optuna search of the peak LR per group of runs (runs that differ only in LR share a group)."""

    low: float = 1e-4
    high: float = 3e-2
    n_trials: int = 6


@dataclass
class StudyPlan:
    name: str
    specs: list[RunSpec]
    description: str = ""
    num_workers: int = 1
    """Ray Train workers (ranks) per trial."""
    use_gpu: bool = False
    lr_search: LRSearch | None = None
    cohort: dict[str, Any] | None = None
    """Synthetic cohort to generate (kwargs of ``data.synthetic.generate_cohort``), or None for ``--manifest``."""
    extra: dict[str, Any] = field(default_factory=dict)
    device_kind: str | None = None
    """Accelerator kind the runs were planned for (``study/device_kinds.json``); None for CPU plans."""
    run_plans: dict[str, Any] = field(default_factory=dict)
    """run id -> :class:`study.planner.RunPlan` (micro-batch, checkpointing, ZeRO, predicted memory and speed)."""

    def validate(self) -> None:
        if not self.specs:
            raise ValueError(f"study plan {self.name!r} has no runs")
        ids = [s.run_id for s in self.specs]
        dup = {i for i in ids if ids.count(i) > 1}
        if dup:
            raise ValueError(f"study plan {self.name!r} has duplicate runs: {sorted(dup)[:3]}")


def isoflop_grid(base: RunSpec, *, budgets: Sequence[float], widths: Sequence[int],
                 min_steps: int = 4, max_steps: int = 10_000,
                 at_width: Callable[[RunSpec, int], RunSpec] | None = None) -> list[RunSpec]:
    """IsoFLOP design: for each compute budget, every width whose step count for that budget lies in
    ``[min_steps, max_steps]``; ``at_width(base, w)`` gives a width's spec (default: ``base`` at width ``w``; a
    preset's width rules, e.g. its LR per width). Raises ``ValueError`` when a budget can be spent by no width."""
    specs: list[RunSpec] = []
    for c in budgets:
        spent = []
        for w in widths:
            spec = (at_width(base, w) if at_width else base.replace(width=w)).replace(budget_kind="flops",
                                                                                      budget=float(c))
            cfg = model_config(spec)
            steps = total_steps(spec, flops_per_sample=R.flops_per_sample(cfg)["train"],
                                tokens_per_sample=R.tokens_per_sample(cfg))
            if min_steps <= steps <= max_steps:
                spent.append(spec)
        if not spent:
            raise ValueError(f"compute budget {c:.3g} FLOPs cannot be spent by any width in {list(widths)} "
                             f"within {min_steps}..{max_steps} steps of batch {base.batch_size}")
        specs += spent
    return specs


def run_summary(spec: RunSpec) -> dict[str, Any]:
    """Parameters, FLOPs, tokens and steps of a run (for --dry-run and GPU-hour estimates), and whether its model drops
    background tokens (``remove_background``; None for a family without the option)."""
    cfg = model_config(spec)
    counts = R.param_counts(cfg)
    fps = R.flops_per_sample(cfg)["train"]
    tps = R.tokens_per_sample(cfg)
    steps = total_steps(spec, flops_per_sample=fps, tokens_per_sample=tps)
    return {"run_id": spec.run_id, "family": spec.family, "size": spec.size, "width": spec.width,
            "params": counts["total"], "steps": steps, "samples": steps * spec.batch_size,
            "tokens": steps * spec.batch_size * tps, "flops": steps * spec.batch_size * fps,
            "n_subjects": spec.n_subjects, "mixture": dict(spec.cohorts) or "all",
            "remove_background": getattr(cfg, "remove_background", None)}


# --------------------------------------------------------------------------------------------------
# presets
# --------------------------------------------------------------------------------------------------
# What this design can show (issue #21 item 4, measured): approach 3 gets alpha, beta > 0 with intervals excluding 0
# and extrapolates to the largest budget within 10%, but analysis.validity marks it not valid (SE of alpha, A, B
# larger than the estimates). Seed-to-seed differences are 3-4% of the loss in the short runs (w32 277 steps: seed 0
# 0.0763, seed 1 0.0737; w16 433 steps: 0.0759 / 0.0731) and 0.15% in longer ones (w32 553 steps: 0.0694 / 0.0693; w48
# 541 steps: 0.0691 / 0.0690), against final losses spread over 0.065-0.090; the SE rule on A = exp(a), with ln N ~
# 12, needs SE(alpha) <~ 0.06. Laws exactly of the form, simulated on these 10 runs at 2.5% or 0.5% noise, were not
# valid, nor a 4x4 width x steps factorial at 0.5%: pinning the magnitudes takes longer runs over a wider range of D
# than 10 minutes on 2 CPUs hold.
DEMO_WIDTHS = (16, 32, 48, 64)
"""First-stage widths (N = 49k, 176k, 381k, 664k parameters: a 13x range)."""
DEMO_BUDGETS = tuple(4.8e10 * 2**k for k in range(6))
"""IsoFLOP budgets, x2 apart (4.8e10 ... 1.5e12 FLOPs)."""
DEMO_LR_AT_16 = 2e-2
"""Peak LR of width 16; other widths get ``DEMO_LR_AT_16 * 16 / width``, the SP rule for Adam's hidden-layer
LR (muP's width scaling). Measured on 300-step runs: width 16 improves up to 4e-2, width 64 is flat over
2.5e-3 ... 1e-2; at 3e-2 a 1624-step width-16 run ended worse than a 406-step one."""
DEMO_MIN_STEPS, DEMO_MAX_STEPS = 200, 1100
"""A budget trains the widths whose step count lies in this band. Shorter runs are still in the transient in
which the model learns the cohort's static anatomy (width 16: val loss 0.13-0.14 at step 100, 0.09 at 200,
0.076 at 433); ``L(N, D)`` does not describe it, and one such point drove approach 3 to beta = 10, E = 0.
Longer runs only confirm a width's floor far from its compute-optimal budget."""
DEMO_COHORT = {"n_subjects": 96, "grid": (24, 24, 24), "n_frames": 40, "seed": 0, "texture": 0.15,
               "texture_exponent": 1.0}
"""The demo's synthetic cohort: the default generator plus a fine anatomical texture (data/README.md)."""


def demo_width(base: RunSpec, width: int) -> RunSpec:
    """``base`` at ``width`` with the demo's width rules: LR ``DEMO_LR_AT_16 * 16 / width`` and a decoder as wide
    as the encoder (a fixed 8-channel decoder caps every width's reconstruction at the same rank)."""
    return base.replace(width=width, lr=DEMO_LR_AT_16 * 16 / width, model_overrides={"decoder_dim": width})


def demo(opts: Any = None) -> StudyPlan:
    """Tiny SwiFT v2 IsoFLOP study on the synthetic cohort (minutes on 2 CPU cores)."""
    manifest = getattr(opts, "manifest", None) or ""
    base = RunSpec(study=getattr(opts, "study_name", None) or "demo", family="swift_v2", size="debug",
                   grid=(24, 24, 24), sequence_length=8, batch_size=4, lr=DEMO_LR_AT_16, schedule="cosine",
                   warmup_frac=0.1, eval_every=100, eval_windows=32, checkpoint_every=100,
                   manifest=manifest, precision="fp32", seed=0)
    # largest budget first: its long runs start at once and the short ones fill in beside them
    specs = isoflop_grid(base, budgets=sorted(DEMO_BUDGETS, reverse=True), widths=DEMO_WIDTHS,
                         min_steps=DEMO_MIN_STEPS, max_steps=DEMO_MAX_STEPS, at_width=demo_width)
    # data-mixture axis: the middle budget on one cohort vs the diverse mixture
    mid = [s for s in specs if s.budget == sorted(DEMO_BUDGETS)[2]]
    if mid:
        one = mid[len(mid) // 2]
        specs.append(one.replace(cohorts={"cohort_a": 1.0}))
    return StudyPlan(name="demo", specs=specs, description=demo.__doc__ or "", cohort=dict(DEMO_COHORT))


MAMBA_DEMO_WIDTHS = (16, 32, 48, 64)
"""NeuroMamba "debug" (2 blocks) at these widths: N = 21k, 48k, 81k, 121k parameters (a 5.8x range)."""
MAMBA_DEMO_BUDGETS = (1.2e10, 2.4e10, 4.8e10)
"""IsoFLOP budgets, x2 apart; with ``MAMBA_DEMO_STEPS`` they train 2, 3 and 3 widths (8 runs)."""
MAMBA_DEMO_STEPS = (100, 800)
"""A budget trains the widths whose step count lies in this band (width 32 at LR 1e-2: val loss 0.0106 at step 100,
0.0089 at 200, 0.0081 at 300; below 100 steps a run is still in the transient)."""
MAMBA_DEMO_LR_AT_32 = 1e-2
"""Peak LR of width 32; other widths get ``MAMBA_DEMO_LR_AT_32 * 32 / width`` (the demo's SP width rule). One check,
not a search: two 300-step width-32 runs on the demo cohort ended at val loss 0.0081 (1e-2) and 0.0092 (3e-3)."""


def mamba_demo(opts: Any = None) -> StudyPlan:
    """Tiny NeuroMamba IsoFLOP study with background removal on the demo's synthetic cohort (minutes on 2 CPU cores).

    The ``debug`` size (2 Mamba blocks) at ``MAMBA_DEMO_WIDTHS``, budgets ``MAMBA_DEMO_BUDGETS``, cosine LR
    ``MAMBA_DEMO_LR_AT_32 * 32 / width``, batch 4 of 8-frame windows of ``DEMO_COHORT`` (24^3: 4x4x4 spatial patches of
    6^3 per 2 frames; background patches, outside the subject's brain mask, are dropped). It shows the report's
    Figure-3 plots (loss against compute and against parameters, one colour per width) of a NeuroMamba ladder; 8
    runs are too few and too short to pin a law, and the report's ``valid`` flags say whether they did."""
    manifest = getattr(opts, "manifest", None) or ""
    base = RunSpec(study=getattr(opts, "study_name", None) or "mamba-demo", family="neuromamba", size="debug",
                   grid=(24, 24, 24), sequence_length=8, batch_size=4, lr=MAMBA_DEMO_LR_AT_32, schedule="cosine",
                   warmup_frac=0.1, eval_every=100, eval_windows=32, checkpoint_every=100,
                   manifest=manifest, precision="fp32", seed=0)
    specs = isoflop_grid(base, budgets=sorted(MAMBA_DEMO_BUDGETS, reverse=True), widths=MAMBA_DEMO_WIDTHS,
                         min_steps=MAMBA_DEMO_STEPS[0], max_steps=MAMBA_DEMO_STEPS[1],  # the longest runs first
                         at_width=lambda b, w: b.replace(width=w, lr=MAMBA_DEMO_LR_AT_32 * 32 / w))
    return StudyPlan(name="mamba-demo", specs=specs, description=mamba_demo.__doc__ or "", cohort=dict(DEMO_COHORT))


def smoke(opts: Any = None) -> StudyPlan:
    """Two tiny runs on a 12-subject synthetic cohort: checks an installation or a cluster in a minute."""
    manifest = getattr(opts, "manifest", None) or ""
    base = RunSpec(study=getattr(opts, "study_name", None) or "smoke", family="swift_v2", size="debug",
                   grid=(24, 24, 24), sequence_length=8, batch_size=4, lr=3e-3, budget_kind="steps", budget=6,
                   eval_every=3, eval_windows=4, checkpoint_every=3, manifest=manifest, precision="fp32")
    return StudyPlan(name="smoke", specs=[base.replace(width=16), base.replace(width=32)],
                     description=smoke.__doc__ or "",
                     cohort={"n_subjects": 12, "grid": (24, 24, 24), "n_frames": 16, "seed": 0})


def smoke_gpu(opts: Any = None) -> StudyPlan:
    """Three tiny runs on one GPU (or XPU tile) each, DeepSpeed ZeRO-0 in bf16, on a 12-subject synthetic
    cohort: checks a GPU node's installation (device isolation, NCCL/xccl process group, trial reuse)."""
    manifest = getattr(opts, "manifest", None) or ""
    base = RunSpec(study=getattr(opts, "study_name", None) or "smoke-gpu", family="swift_v2", size="debug",
                   grid=(24, 24, 24), sequence_length=8, batch_size=4, lr=3e-3, budget_kind="steps", budget=20,
                   eval_every=10, eval_windows=4, checkpoint_every=10, manifest=manifest, precision="bf16",
                   distributed="deepspeed", zero_stage=0)
    return StudyPlan(name="smoke-gpu", specs=[base.replace(width=w) for w in (16, 32, 48)], use_gpu=True,
                     description=smoke_gpu.__doc__ or "",
                     cohort={"n_subjects": 12, "grid": (24, 24, 24), "n_frames": 16, "seed": 0})


#: ZeRO stage of a ladder size: replicated optimizer state (ZeRO-0) while it is small, partitioned (ZeRO-1) from
#: 806M up. ZeRO-1's per-parameter gradient hooks and bucket copies cost a 51M step 27% on an H100 (72 vs 99
#: samples/s compiled, BENCHMARKS.md), and 202M's replicated fp32 Adam state is 2.4 GiB; 806M's is 9.6 GiB.
LADDER_ZERO_STAGE = {"51M": 0, "202M": 0}
#: families without a table above: ZeRO-0 while the replicated fp32 Adam moments (8 B/parameter) stay under 4 GB
#: (the rule the table follows: 202M's 1.6 GiB replicated, 806M's 6.2 GiB partitioned); every NeuroMamba ladder size
LADDER_ZERO0_MAX_PARAMS = 500e6


def ladder_zero_stage(size: str, family: str = "swift_v2") -> int:
    if family == "swift_v2":
        return LADDER_ZERO_STAGE.get(size, 1)
    return 0 if R.param_counts(R.get_config(family, size))["total"] < LADDER_ZERO0_MAX_PARAMS else 1


#: base LR of a ladder that was given no µTransfer result (the seed's SwiFT v2 51M LR; not tuned for any other size
#: or family: a family without a seed LR of its own uses it too and the source says so)
LADDER_DEFAULT_LR = 5e-4


@dataclass(frozen=True)
class LadderLR:
    """How every size of a ladder gets its LR: parametrization, muP base width, base LR, and why."""

    parametrization: str
    base_width: int | None
    lr: float
    source: str
    transferred: bool


def ladder_lr(opts: Any, family: str, sizes: Sequence[str]) -> LadderLR:
    """The ladder's LR rule from ``--parametrization`` (default muP) and ``--lr-from``.

    Under muP with a µTransfer result, every size trains at the result's base LR with its base width (the
    LR that was optimal at every width of the sweep). Without one, muP runs at the preset's default base LR
    with the smallest size's width as the base, and the source says it was not transferred. SP must be asked
    for (``--parametrization sp``): one LR for every size, which biases fitted exponents.
    """
    par = getattr(opts, "parametrization", None) or "mup"
    if par not in ("mup", "sp"):
        raise ValueError(f"--parametrization {par!r}; allowed: 'mup', 'sp'")
    lr_from = getattr(opts, "lr_from", None)
    smallest = R.get_config(family, sizes[0])
    if lr_from:
        if par == "sp":
            raise ValueError("--lr-from gives a muP base LR; it does not apply with --parametrization sp")
        from study.lr_transfer import TransferredLR

        art = TransferredLR.load(lr_from, storage=getattr(opts, "storage", None))
        check_transfer_applies(art, family, sizes)
        return LadderLR("mup", art.base_width, art.base_lr, art.describe(), True)
    other = "" if family == "swift_v2" else f" (SwiFT v2's seed LR, never tuned for {family})"
    if par == "mup":
        bw = int(smallest.embed_dim)
        return LadderLR("mup", bw, LADDER_DEFAULT_LR,
                        f"{LADDER_DEFAULT_LR:g} at muP base width {bw} ({sizes[0]}): the preset's default{other}, NOT "
                        "transferred; run study/mutransfer.py for this family and size and pass --lr-from <study>",
                        False)
    return LadderLR("sp", None, LADDER_DEFAULT_LR,
                    f"{LADDER_DEFAULT_LR:g}{other} for every size under SP (--parametrization sp): not tuned per size; "
                    "SP's optimal LR drifts with width, so exponents fitted on this ladder are biased "
                    "(Porian et al. 2024)", False)


def check_transfer_applies(art: Any, family: str, sizes: Sequence[str]) -> None:
    """Refuse a µTransfer result from another family, or from a size that differs from the ladder's in
    more than width (muP transfers the LR across width only)."""
    import dataclasses

    if art.family != family:
        raise ValueError(f"--lr-from {art.source}: the µTransfer study trained family {art.family!r}, the ladder "
                         f"trains {family!r}")
    ref = R.with_width(R.get_config(family, art.size), art.base_width)
    for size in sizes:
        cfg = R.with_width(R.get_config(family, size), art.base_width)
        diff = sorted(k for k, v in dataclasses.asdict(cfg).items()
                      if k != "size" and v != getattr(ref, k))
        if diff:
            raise ValueError(f"--lr-from {art.source}: size {size!r} differs from the µTransfer study's size "
                             f"{art.size!r} in {diff}, not only in width; muP transfers the LR across width only "
                             f"(run study/mutransfer.py --size {size})")


#: workers per run of a ladder planned for a device kind without a site that counts its devices (``--device-kind``
#: alone, or a profile with an empty ``PROFILE_DEVICES_PER_NODE``): one 4-GPU node
LADDER_DEFAULT_WORKERS = 4


@dataclass(frozen=True)
class LadderHardware:
    """What a ladder run is planned for: the device kind, workers (one node's devices) and cores per device."""

    device_kind: str
    workers: int
    cpus_per_device: int | None
    source: str


def ladder_hardware(opts: Any, preset: str) -> LadderHardware:
    """The hardware of a ladder from ``--site`` (default ``$NEUROX_SITE``), ``--device-kind`` and
    ``--cpus-per-device``; the options override the site's profile. ValueError without a site or a device kind."""
    import os

    from study.sites import load_site, site_names

    name = getattr(opts, "site", None) or os.environ.get("NEUROX_SITE") or None
    site = load_site(name) if name else None
    kind = getattr(opts, "device_kind", None) or (site.device_kind if site else None)
    if not kind:
        why = (f"site {site.name!r} names no device kind (PROFILE_DEVICE_KIND)" if site
               else "no --site given and $NEUROX_SITE is unset")
        raise ValueError(f"preset {preset!r} is planned for a site's hardware, but {why}: pass --site NAME "
                         f"({', '.join(site_names())}) or --device-kind KIND (study/device_kinds.json)")
    workers = (site.devices_per_node if site else None) or LADDER_DEFAULT_WORKERS
    cpus = getattr(opts, "cpus_per_device", None) or (site.cpus_per_device if site else None)
    src = (f"site {site.name}" if site else "--device-kind") + f": {workers} x {kind} per run" + (
        "" if site and site.devices_per_node else f" ({LADDER_DEFAULT_WORKERS}: the site does not count its devices)")
    return LadderHardware(kind, workers, cpus, src)


#: what each family's ladder is called in plan descriptions
LADDER_FAMILY_NAMES = {"swift_v2": "SwiFT v2", "neuromamba": "NeuroMamba"}


def _ladder(opts: Any, *, name: str, budgets: Sequence[float], sizes: Sequence[str],
            n_subjects: Sequence[int], family: str = "swift_v2",
            steps_band: tuple[int, int] | None = None) -> StudyPlan:
    """Every size x budget x subject count of ``family`` on ``--manifest``, planned for ``--site``'s hardware.

    ``steps_band=(lo, hi)`` leaves out a (size, budget) whose step count falls outside it (a ladder whose sizes span
    a wide range cannot spend every budget on every size); the model config's own defaults (NeuroMamba's
    ``remove_background``, ...) are the run's."""
    manifest = getattr(opts, "manifest", None)
    if not manifest:
        raise ValueError(f"preset {name!r} trains on real data: pass --manifest <cohort manifest.parquet>")
    hw = ladder_hardware(opts, name)
    workers = hw.workers
    rule = ladder_lr(opts, family, sizes)
    base = RunSpec(study=getattr(opts, "study_name", None) or name, family=family, size=sizes[0],
                   grid=(96, 96, 96), sequence_length=20, batch_size=8 * workers, lr=rule.lr, schedule="wsd",
                   warmup_frac=0.02, eval_every=500, eval_windows=256, checkpoint_every=500,
                   manifest=manifest, distributed="deepspeed", zero_stage=1, precision="bf16", num_workers=6,
                   parametrization=rule.parametrization, mup_base_width=rule.base_width)
    specs, left_out = [], []
    for c in budgets:
        for size in sizes:
            spec = base.replace(size=size, budget_kind="flops", budget=float(c), zero_stage=ladder_zero_stage(size, family))
            if steps_band is not None and not steps_band[0] <= run_summary(spec)["steps"] <= steps_band[1]:
                left_out.append(f"{size}@{c:.3g}")
                continue
            specs += [spec.replace(n_subjects=n) for n in n_subjects]
    from study.planner import plan_study

    cpus = {} if hw.cpus_per_device is None else {"cpus_per_device": hw.cpus_per_device}
    specs, run_plans = plan_study(specs, hw.device_kind, workers=workers, **cpus)
    what = f"{LADDER_FAMILY_NAMES.get(family, family)} ladder {list(sizes)} x subjects {list(n_subjects)} x budgets"
    if left_out:
        what += f" (left out, steps outside {steps_band[0]}..{steps_band[1]}: {', '.join(left_out)})"
    return StudyPlan(name=name, specs=specs, num_workers=workers, use_gpu=True, description=f"{what}; {hw.source}",
                     extra={"lr_source": rule.source, "lr_transferred": rule.transferred, "hardware": hw.source},
                     device_kind=next(iter(run_plans.values())).device_kind, run_plans=run_plans)


def ladder(opts: Any = None) -> StudyPlan:
    """51M, 202M, 806M x 1000/4000/16000 subjects x 1e18/3e18/1e19 FLOPs; one run per node of ``--site``."""
    return _ladder(opts, name="ladder", budgets=(1e18, 3e18, 1e19), sizes=("51M", "202M", "806M"),
                   n_subjects=(1000, 4000, 16000))


def ladder_xl(opts: Any = None) -> StudyPlan:
    """51M ... 3B x 2000/8000/32000 subjects x 3e18 ... 1e20 FLOPs; one run per node of ``--site``."""
    return _ladder(opts, name="ladder-xl", budgets=(3e18, 1e19, 3e19, 1e20),
                   sizes=("51M", "202M", "806M", "3B"), n_subjects=(2000, 8000, 32000))


MAMBA_LADDER_SIZES = ("1.4M", "3.1M", "12M", "41M", "91M")
MAMBA_LADDER_BUDGETS = (1e17, 3e17, 1e18)
MAMBA_LADDER_SUBJECTS = (1000, 4000, 16000)
MAMBA_LADDER_STEPS = (1000, 250_000)


def mamba_ladder(opts: Any = None) -> StudyPlan:
    """NeuroMamba 1.4M ... 91M x 1000/4000/16000 subjects x 1e17/3e17/1e18 FLOPs, background removal on.

    The sizes are the named ladder of ``neuro_models/mamba/config.py`` from the seed's "small" (1.4M) and best
    (3.1M) models to 91M: a 60x range of parameters (1.5M-91M with the next-token head). The budgets are 10x lower
    than ``ladder``'s because a NeuroMamba sample costs far less than a SwiFT one (1.5e11 training FLOPs at 1.4M,
    8.3e12 at 91M, with 36.4% of the tokens kept after background removal, against 2.5e11 for SwiFT's 51M), so at
    1e17-1e18 the step counts stay in ``MAMBA_LADDER_STEPS`` (1000 ... 250k steps of 8 samples per device): on a
    4-device node 41M and 91M are left out at 1e17 (831 and 378 steps), the rest train at every budget; 13 (size,
    budget) points x 3 subject counts = 39 runs. Their memory and speed come from NeuroMamba's own rows measured
    through ``train()`` on an H100 (``benchmarks/results/planner/h100_mamba_compiled.jsonl``, session 16: compiled
    blocks; 91M with background removal at 51 TFLOP/s, 6.6% of the card's measured dense rate); sizes and settings
    without a row are extrapolated at a measured row's FLOP rate, and the dry run says from which. The subject
    counts are ``ladder``'s, so the two families share one data axis. Background
    removal is the config's default (``remove_background=True``: all-background tokens are dropped and the samples
    packed) and the FLOPs axis counts the kept tokens. LR and hardware as ``ladder`` (muP, ``--lr-from``, ``--site``);
    1.4M-12M have 12 blocks and 41M/91M 24, and muP transfers an LR across width only, so one µTransfer study
    cannot cover the whole ladder (``--lr-from`` names the size that differs)."""
    return _ladder(opts, name="mamba-ladder", budgets=MAMBA_LADDER_BUDGETS, sizes=MAMBA_LADDER_SIZES,
                   n_subjects=MAMBA_LADDER_SUBJECTS, family="neuromamba", steps_band=MAMBA_LADDER_STEPS)


PRESETS: dict[str, Callable[[Any], StudyPlan]] = {"demo": demo, "smoke": smoke, "smoke-gpu": smoke_gpu,
                                                   "ladder": ladder, "ladder-xl": ladder_xl,
                                                   "mamba-ladder": mamba_ladder, "mamba-demo": mamba_demo}

#: former site-named presets -> the command that replaces them (refused with it, exit 2)
RENAMED_PRESETS = {"polaris": "--preset ladder --site polaris", "aurora": "--preset ladder-xl --site aurora"}


def load_plan(preset: str, opts: Any = None) -> StudyPlan:
    """A named preset, or ``pkg.module:function`` returning run specs or a plan."""
    if preset in RENAMED_PRESETS:
        raise ValueError(f"preset {preset!r} is now {RENAMED_PRESETS[preset]} (add --study-name {preset} to resume "
                         "a study it started without --study-name)")
    if preset in PRESETS:
        plan = PRESETS[preset](opts)
    elif ":" in preset:
        mod_name, _, fn_name = preset.partition(":")
        try:
            fn = getattr(importlib.import_module(mod_name), fn_name)
        except (ImportError, AttributeError) as exc:
            raise ValueError(f"preset {preset!r}: cannot import {fn_name} from {mod_name} ({exc})") from exc
        out = fn(opts)
        plan = out if isinstance(out, StudyPlan) else StudyPlan(name=preset, specs=list(out))
    else:
        raise ValueError(f"unknown preset {preset!r}; allowed: {sorted(PRESETS)} or 'pkg.module:function'")
    plan.validate()
    return plan
