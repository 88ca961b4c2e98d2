"""Run arithmetic shared by planning and the step loop: the model config a spec asks for, how many optimizer
steps its budget buys, how a global batch splits over ranks and micro-batches, and the LR schedule.

Pure functions of a :class:`~study.spec.RunSpec` (and the model registry's analytic counts): no torch loop
code, no data loading, no process groups. Planning (:mod:`study.plans`, :mod:`study.planner`) imports this
module, never the step loop (:mod:`study.loop`) or an objective (:mod:`study.train`,
:mod:`study.finetune_engine`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from neuro_models import registry as R
from study.spec import RunSpec, model_overrides


def checkpoint_field(family: str) -> str | None:
    """The config field that turns on a family's activation checkpointing (``ModelFamily.checkpoint_field``), or
    None for a family without it."""
    return R.get_family(family).checkpoint_field


def model_config(spec: RunSpec):
    """The model config a spec asks for (input size from the data grid and sequence length)."""
    overrides = model_overrides(spec)
    overrides.setdefault("img_size", (*spec.grid, spec.sequence_length))
    overrides["parametrization"] = spec.parametrization
    if spec.mup_base_width is not None:
        overrides["mup_base_width"] = spec.mup_base_width
    if spec.activation_checkpointing:
        field = checkpoint_field(spec.family)
        if field is None:
            raise ValueError(f"activation_checkpointing=True: family {spec.family!r} cannot recompute activations")
        overrides[field] = True
    cfg = R.get_config(spec.family, spec.size, **overrides)
    if spec.width is not None:
        cfg = R.with_width(cfg, spec.width)
    return cfg


def total_steps(spec: RunSpec, *, flops_per_sample: float, tokens_per_sample: int) -> int:
    """Optimizer steps that ``spec.budget`` (of kind ``spec.budget_kind``) buys, rounded up."""
    per_step = {"steps": 1, "samples": spec.batch_size, "tokens": spec.batch_size * tokens_per_sample,
                "flops": spec.batch_size * flops_per_sample}[spec.budget_kind]
    return max(1, math.ceil(spec.budget / per_step - 1e-9))


@dataclass(frozen=True)
class BatchPlan:
    """How a global batch splits over ranks and micro-batches."""

    global_batch: int
    world_size: int
    micro_batch: int

    @property
    def per_rank(self) -> int:
        return self.global_batch // self.world_size

    @property
    def accumulation(self) -> int:
        return self.per_rank // self.micro_batch

    @classmethod
    def make(cls, spec: RunSpec, world_size: int) -> "BatchPlan":
        if spec.batch_size % world_size:
            raise ValueError(f"batch_size={spec.batch_size} does not divide across world_size={world_size} ranks")
        per_rank = spec.batch_size // world_size
        micro = spec.micro_batch_size or per_rank
        if per_rank % micro:
            raise ValueError(f"micro_batch_size={micro} must divide the per-rank batch {per_rank} "
                             f"(batch_size={spec.batch_size}, world_size={world_size})")
        return cls(spec.batch_size, world_size, micro)


def micro_batch_positions(step: int, plan: BatchPlan, rank: int) -> list[list[int]]:
    """Global sample positions of this rank's micro-batches at ``step``."""
    start = step * plan.global_batch + rank * plan.per_rank
    return [list(range(start + a * plan.micro_batch, start + (a + 1) * plan.micro_batch))
            for a in range(plan.accumulation)]


def lr_factor(step: int, total: int, spec: RunSpec) -> float:
    """LR multiplier at optimizer step ``step`` (0-based) of ``total``."""
    warmup = int(round(spec.warmup_frac * total))
    if warmup and step < warmup:
        return (step + 1) / warmup
    if spec.schedule == "constant":
        return 1.0
    floor = spec.min_lr_ratio
    if spec.schedule == "cosine":
        progress = (step - warmup) / max(1, total - warmup)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    # wsd: stable at 1 until the last decay_frac of the run, then linear decay to the floor
    decay = int(round(spec.decay_frac * total))
    decay_start = total - decay
    if step < decay_start or decay == 0:
        return 1.0
    progress = (step - decay_start + 1) / decay
    return 1.0 - (1 - floor) * min(1.0, progress)
