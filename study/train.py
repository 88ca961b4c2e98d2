"""The one train function: ``train(spec, ctx, reporter)``.

It pre-trains (masked-image modeling for SwiFT v2, next-token prediction for NeuroMamba) or fine-tunes
(see :mod:`study.finetune_engine`) one :class:`~study.spec.RunSpec` on whatever the launcher gives it:
one process, ``torchrun`` ranks, or Ray Train workers. It imports neither Ray nor W&B.
This module holds the pre-training objective (model, masks, loss, evaluation); the step machinery both
objectives share (sample order, micro-batches, optimizer, checkpoints, DDP/DeepSpeed, the step loop and its typed
state) is :mod:`study.loop`, the run arithmetic (model config, steps, batch plan, LR schedule)
:mod:`study.run_math`. A ``task="finetune"`` spec is handed to :mod:`study.finetune_engine`, which imports those
two modules and never this one.

Determinism contract (what makes plain python, torchrun and Ray Train give the same losses):

* the global batch of step ``s`` is samples ``order[s*B : (s+1)*B]`` of a seeded permutation per epoch;
  rank ``r`` takes the ``r``-th contiguous slice and splits it into micro-batches, so one process with
  gradient accumulation sees exactly the same micro-batches as ``W`` ranks;
* the random MIM mask of a sample is drawn from a generator seeded by ``(seed, global sample position)``,
  never from a rank's RNG;
* model initialisation is seeded identically on every rank.

Run it directly (one process)::

    python -m study.train --manifest cohort/manifest.parquet --size debug --steps 20

or under torchrun (two CPU ranks)::

    torchrun --nproc-per-node 2 -m study.train --manifest cohort/manifest.parquet --steps 20
"""
from __future__ import annotations

import os
import time
from typing import Any, Callable

import torch

from neuro_models import registry as R
from neuro_models.layers import compile_regions
from study.devices import DistContext, device_name, peak_flops
from study.loop import (VAL_BAD_PREFIX, BadDataError, LoopState, Meter, Objective, PositionDataset,  # noqa: F401
                        PretrainState, SampleOrder, Trainee, TrainingDiverged, TrainResult, all_reduce_sum, autocast,
                        checkpoint_saver, collate, deepspeed_config, deepspeed_engine, free_port, lr_scheduler,
                        make_loader, make_optimizer, manual_gc, merge_config, restore, run_steps, to_device, val_item,
                        wrap_ddp)
from study.reporters import NullReporter, Reporter
from study.run_math import BatchPlan, lr_factor, micro_batch_positions, model_config, total_steps
from study.spec import RunSpec
from study.trace import mark

#: names other modules and tests reach through ``study.train`` (the one train function's module); the step
#: machinery itself lives in :mod:`study.loop`, the run arithmetic in :mod:`study.run_math`
__all__ = ["BadDataError", "BatchPlan", "LoopState", "PositionMasks", "SampleOrder", "TrainResult", "TrainingDiverged",
           "build_datasets", "deepspeed_config", "free_port", "lr_factor", "manual_gc", "merge_config",
           "micro_batch_positions", "model_config", "sample_masks", "total_steps", "train"]

#: sample-position offset for validation masks, so they never collide with training ones
_VAL_SEED_OFFSET = 1 << 40


def build_datasets(spec: RunSpec, *, defer: bool = False):
    from data.datasets import WindowedDataset
    from data.manifest import Manifest

    if not spec.manifest:
        raise ValueError("spec.manifest is empty: give the path of a cohort manifest (manifest.parquet)")
    manifest = Manifest.load(spec.manifest)
    common = dict(sequence_length=spec.sequence_length, stride_within=spec.stride_within,
                  scaling=spec.scaling, grid=tuple(spec.grid), target=spec.target, defer=defer)
    cohorts = dict(spec.cohorts) or None
    train_ds = WindowedDataset(manifest, split="train", stride_between=spec.stride_between, cohorts=cohorts,
                               max_subjects=spec.n_subjects, **common)
    # validation always covers every cohort (reported overall and per cohort), so runs trained on
    # different mixtures are compared on the same windows
    val_ds = WindowedDataset(manifest, split="val", stride_between=1.0, cohorts=None, **common)
    return manifest, train_ds, val_ds



class PositionMasks:
    """The masked-modeling mask of the sample at a global position: a CPU generator seeded by (seed, position),
    so masks do not depend on world size, accumulation or loader workers. Picklable (loader workers)."""

    def __init__(self, make_mask: Callable[..., torch.Tensor], seed: int) -> None:
        self.make_mask, self.seed = make_mask, seed

    def __call__(self, position: int) -> torch.Tensor:
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + position) % (2**63 - 1))
        return self.make_mask(1, generator=g, device=torch.device("cpu"))[0]


def _mask_kwargs(mask: torch.Tensor | None) -> dict[str, Any]:
    """The model's mask arguments. Every mask here comes from the family's ``make_mask`` (``PositionMasks``,
    :func:`sample_masks`), so it masks the same number of tokens in every sample: ``exact_mask=True`` lets
    SimMIM select tokens without checking the count on the device (a host synchronisation per step)."""
    return {"mask": None} if mask is None else {"mask": mask, "exact_mask": True}


def sample_masks(cfg, positions: list[int], seed: int, device: torch.device):
    """Masks of the samples at ``positions`` (``[B, ...]`` on ``device``; None for objectives without masks)."""
    fn = R.mask_function(cfg)
    if fn is None:
        return None
    masks = PositionMasks(fn, seed)
    return torch.stack([masks(p) for p in positions]).to(device)


# --------------------------------------------------------------------------------------------------
# the train function
# --------------------------------------------------------------------------------------------------

def train(spec: RunSpec, ctx: DistContext, reporter: Reporter | None = None, *,
          run_dir: str | os.PathLike | None = None, resume_from: str | os.PathLike | None = None,
          should_stop: Callable[[], bool] | None = None, datasets: tuple | None = None,
          quarantine=None) -> TrainResult:
    """Train one run.

    Parameters
    ----------
    spec : RunSpec
        What to train.
    ctx : DistContext
        Rank, world size and device, built by a launcher (process group already initialised).
    reporter : Reporter
        Receives ``log`` every ``spec.log_every`` steps and ``report`` at each evaluation.
    run_dir : path, optional
        Where checkpoints go (``run_dir/checkpoints/step_*``). ``None``: no checkpoints.
    resume_from : path, optional
        A complete checkpoint directory to resume from (model, optimizer, scheduler, data position, RNG).
    should_stop : callable, optional
        Polled every step; when it returns True the run saves a checkpoint and returns ``status="stopped"``.
    datasets : (train_dataset, val_dataset), optional
        Use these instead of the spec's manifest (benchmarks with preloaded tensors, notebooks). Items
        follow the ``WindowedDataset`` contract.
    quarantine : data.quarantine.Quarantine, optional
        The study's list of bad subject files: a bad file this run meets is recorded there, and under
        ``spec.bad_data="skip"`` the files already on it are skipped from the start (the study launchers pass it).
    """
    if spec.task == "finetune":
        from study.finetune_engine import train_finetune

        return train_finetune(spec, ctx, reporter or NullReporter(), run_dir=run_dir, resume_from=resume_from,
                              should_stop=should_stop, quarantine=quarantine)
    reporter = reporter or NullReporter()
    mark("train_start", run=spec.run_id)
    t_start = time.perf_counter()
    plan = BatchPlan.make(spec, ctx.world_size)
    device = ctx.device

    cfg = model_config(spec)
    fps = R.flops_per_sample(cfg)
    tps = R.tokens_per_sample(cfg)
    n_steps = total_steps(spec, flops_per_sample=fps["train"], tokens_per_sample=tps)
    counts = R.param_counts(cfg)

    if datasets is None:
        # on accelerators the loader ships float16 stored values and the device finishes scaling/padding
        _, train_ds, val_ds = build_datasets(spec, defer=device.type != "cpu")
    else:
        train_ds, val_ds = datasets
    order = SampleOrder(len(train_ds), spec.seed)

    torch.manual_seed(spec.seed)
    model = R.build_pretrain_model(cfg).to(device)
    graphs = uses_cuda_graphs(spec, plan, device)
    if spec.compile:
        compile_regions(model, R.cuda_graph_regions(cfg, plan.micro_batch) if graphs else None)
    optimizer = make_optimizer(model, spec)
    scheduler = lr_scheduler(optimizer, n_steps, spec)

    engine = None
    if spec.distributed == "deepspeed":
        engine = deepspeed_engine(spec, ctx, plan, model, optimizer, scheduler)
        net = engine
    else:
        net = wrap_ddp(model, ctx)

    state = PretrainState()
    objects = dict(model=model, optimizer=optimizer, scheduler=scheduler, ds_engine=engine)
    restore(state, resume_from, spec, ctx, **objects)
    mask_fn = R.mask_function(cfg)
    loader_ds = PositionDataset(train_ds, order, spec.bad_data,
                                masks=PositionMasks(mask_fn, spec.seed) if mask_fn is not None else None,
                                quarantine=quarantine, run_id=spec.run_id)
    if loader_ds.skip_paths:
        reporter.log({"step": state.step, "bad_data_quarantined": len(loader_ds.skip_paths)})
    peak = peak_flops(device)
    save = checkpoint_saver(run_dir, spec, ctx, state, **objects)

    def evaluate() -> dict[str, float]:
        return _evaluate(net if engine is None else engine, cfg, val_ds, spec, ctx, graphs=graphs,
                         quarantine=quarantine)

    batches = make_loader(loader_ds, state, n_steps, plan, ctx, spec,
                          pin_memory=device.type == "cuda" and datasets is None)

    def forward_loss(batch: dict[str, Any]) -> tuple[torch.Tensor, float]:
        batch = to_device(batch, device)
        x = batch["x"]
        if graphs:  # one micro-batch per step: the previous step's graph outputs are dead
            torch.compiler.cudagraph_mark_step_begin()
        with autocast(ctx, spec):
            out = net(x, brain_mask=batch.get("brain_mask"), **_mask_kwargs(batch.get("mask")))
        return out["loss"], float(out.get("num_tokens", x.shape[0] * tps))

    def on_eval(step: int, metrics: dict[str, Any], ckpt_due: bool) -> dict[str, Any]:
        # a checkpoint is always reported with a fresh evaluation (Ray attaches checkpoints to reports)
        val = evaluate()
        is_best = state.best_val_loss is None or val["val_loss"] < state.best_val_loss
        if is_best:
            state.best_val_loss = val["val_loss"]
        path = save(step) if (step == n_steps or ckpt_due) else None
        if is_best and path:
            state.best_checkpoint = path
        row = {**metrics, "run_id": spec.run_id, "step": step, **val,
               "samples_seen": state.samples_seen, "tokens_seen": state.tokens_seen,
               "flops": state.flops, "wall_time_s": state.wall_time_s,
               "is_final": step == n_steps, "status": "finished" if step == n_steps else "running",
               "n_params": counts["total"], "n_params_non_embedding": counts["non_embedding"],
               "device_kind": device_name(device), "device_count": ctx.world_size,
               "total_steps": n_steps, "bad_windows_skipped": state.skipped}
        reporter.report(row, checkpoint_dir=path)
        return row

    mark("loop_start", run=spec.run_id)
    status, metrics = run_steps(
        spec, ctx, plan, n_steps, state=state, batches=batches,
        trainee=Trainee(net=net, optimizer=optimizer, scheduler=scheduler, engine=engine,
                        params=list(model.parameters())),
        objective=Objective(forward_loss=forward_loss, on_eval=on_eval),
        meter=Meter(t_start=t_start, tokens_per_sample=tps, flops_per_sample=fps["train"], peak=peak),
        reporter=reporter, should_stop=should_stop)
    mark("loop_end", run=spec.run_id)
    step = state.step
    if status == "stopped":
        path = save(step)
        reporter.report({**metrics, "step": step, "status": "stopped", "is_final": False,
                         "samples_seen": state.samples_seen, "tokens_seen": state.tokens_seen,
                         "flops": state.flops, "wall_time_s": state.wall_time_s}, checkpoint_dir=path)
    return TrainResult(run_id=spec.run_id, status=status, step=step, final_metrics=metrics,
                       last_checkpoint=state.last_checkpoint)


def uses_cuda_graphs(spec: RunSpec, plan: BatchPlan, device: torch.device) -> bool:
    """Whether a compiled run replays its launch-bound regions as CUDA graphs (``RunSpec.cuda_graphs``).

    Only with one micro-batch per rank and step: CUDA-graph trees reuse a graph's output memory at the next
    replay, so the step marks its start (``cudagraph_mark_step_begin``) before its forward, which would free
    an accumulating micro-batch's gradients. Not under DeepSpeed, whose engine keeps its own gradient buffers
    and hooks (not measured with graphs); the planner runs ZeRO-0 as DDP, which is the same computation."""
    return bool(spec.compile and spec.cuda_graphs and device.type == "cuda" and plan.accumulation == 1
                and spec.distributed != "deepspeed")


@torch.no_grad()
def _evaluate(net, cfg, val_ds, spec: RunSpec, ctx: DistContext, *, graphs: bool = False,
              quarantine=None) -> dict[str, float]:
    """Mean validation loss over a fixed set of windows (fixed masks), overall and per cohort."""
    net.eval()
    n = min(spec.eval_windows, len(val_ds))
    if n == 0:
        return {"val_loss": float("nan")}
    idx = [round(i * len(val_ds) / n) for i in range(n)] if n < len(val_ds) else list(range(n))
    mine = idx[ctx.rank::ctx.world_size]
    cohorts = sorted(set(val_ds.cohort_of(i) for i in idx)) if hasattr(val_ds, "cohort_of") else None
    sums: dict[str, list[float]] = {}
    for i in mine:
        item = val_item(val_ds, i, quarantine, spec.run_id)
        batch = to_device(collate([item]), ctx.device)
        x = batch["x"]
        bm = batch.get("brain_mask")
        mask = sample_masks(cfg, [_VAL_SEED_OFFSET + i], spec.seed, ctx.device)
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
        with autocast(ctx, spec):
            out = net(x, brain_mask=bm, **_mask_kwargs(mask))
        loss = float(out["loss"].float())
        for key in ("", item.get("cohort", "")):
            s = sums.setdefault(key, [0.0, 0.0])
            s[0] += loss
            s[1] += 1
    keys = [""] + (cohorts if cohorts is not None else sorted(k for k in sums if k))
    vec = torch.tensor([v for k in keys for v in sums.get(k, [0.0, 0.0])], dtype=torch.float64, device=ctx.device)
    vec = all_reduce_sum(vec, ctx).cpu()
    out: dict[str, float] = {}
    for j, k in enumerate(keys):
        total, count = float(vec[2 * j]), float(vec[2 * j + 1])
        if count:
            out["val_loss" if k == "" else f"val_loss__{k}"] = total / count
    return out


