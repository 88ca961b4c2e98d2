"""Fine-tuning engine: ``train_finetune(spec, ctx, reporter)`` (reached through :func:`study.train.train`).

One :class:`~study.spec.RunSpec` with ``task="finetune"`` trains an encoder + head on a manifest label
(``spec.target``) with one of the seed's strategies (``spec.strategy``):

============  ===========================================================================================
scratch       no pre-trained weights, everything trainable (the seed's "From scratch" row)
full          pre-trained encoder, everything trainable
last_block    pre-trained encoder; only the family's "last block" (for SwiFT: the last Swin stage, 2 blocks
              of full attention at 51M, i.e. the seed's "last block", ~28% of the 51M model; for NeuroMamba
              the last block), the final norm and the head train
lora          pre-trained encoder frozen; LoRA adapters (``peft``, rank ``spec.lora_rank``, alpha = rank)
              on the family's LoRA targets (every ``nn.Linear`` inside the encoder blocks: attention
              qkv/proj and MLP fc1/fc2 for SwiFT) and the head train
prompt        pre-trained encoder frozen; ``spec.prompt_tokens`` learnable tokens and the head train.
              SwiFT prepends the prompts to the flattened token sequence of the last, full-attention
              stage (windowed stages never see them): every token attends to them in each block of that
              stage and they are dropped before pooling (see :mod:`neuro_models.swift.model`)
frozen_mlp    pre-trained encoder frozen; a 2-layer MLP head (hidden width = encoder width) trains
============  ===========================================================================================

Each family says what these strategies touch through its fine-tuning hooks and architecture fields
(:class:`neuro_models.family.FinetuneHooks`, ``ModelFamily.arch_fields``); nothing here looks into a model by
attribute name beyond the downstream-model contract (``.encoder``, ``.head``, ``.prompts``).
Every strategy except ``frozen_mlp`` uses a linear head on mean-pooled features. Frozen parameters have
``requires_grad=False``, are left out of the optimizer and never move.

Training reuses the shared step machinery (:mod:`study.loop`, :mod:`study.run_math`): the deterministic batch plan
(:class:`study.run_math.BatchPlan`, :class:`study.loop.SampleOrder`, per-step micro-batch positions), LR schedule, AdamW/MuAdamW,
gradient accumulation, clipping, bf16 autocast on GPUs, DDP, checkpoints that resume exactly and the
reporter protocol. Classification minimises BCE on a logit; regression minimises MSE on targets
standardised with the mean/std of the *training subjects* and reports MAE in the target's own units.
Evaluation predicts every window of the ``val`` (at each evaluation) and ``test`` (at the end) splits,
averages window predictions per subject, and scores subjects (:mod:`study.metrics`). Test subjects
are the manifest's downstream ``test`` split, which the data layer keeps out of pre-training.
"""
from __future__ import annotations

import math
import os
import time
from typing import Any, Callable, Iterable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from neuro_models import registry as R
from neuro_models.layers import compile_regions
from study import checkpoint as ckpt
from study.devices import DistContext, device_name
from study.metrics import TASK_METRICS, score_subjects
from study.reporters import Reporter
from study.spec import STRATEGIES, RunSpec
from study.loop import (LoopState, Meter, Objective, PositionDataset, SampleOrder, Trainee, TrainResult, autocast,
                        checkpoint_saver, collate, lr_scheduler, make_loader, make_optimizer, restore, run_steps,
                        val_item, wrap_ddp)
from study.run_math import BatchPlan, model_config, total_steps

#: strategies that start from pre-trained weights
NEEDS_WEIGHTS = tuple(s for s in STRATEGIES if s != "scratch")


def check_strategy(strategy: str) -> None:
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy={strategy!r} is not allowed; choose one of {list(STRATEGIES)}")


# --------------------------------------------------------------------------------------------------
# weights
# --------------------------------------------------------------------------------------------------
def _norm(v: Any) -> Any:
    return [_norm(x) for x in v] if isinstance(v, (list, tuple)) else v


def check_compatible(cfg: Any, info: dict[str, Any], path: str | os.PathLike) -> None:
    """Raise :class:`study.checkpoint.CheckpointError` when exported weights belong to another model.

    Compares the architecture fields of ``cfg``'s family (``ModelFamily.arch_fields``: family, width, depths,
    heads, patch and input size, ...) of the weights' stored config with ``cfg`` and names every difference.
    """
    stored = info.get("model_config") or {}
    mine = cfg.__dict__ if not hasattr(cfg, "__dataclass_fields__") else {k: getattr(cfg, k)
                                                                          for k in cfg.__dataclass_fields__}
    diffs = [f"{k}: weights have {stored[k]!r}, the run asks for {mine[k]!r}"
             for k in R.family_of(cfg).arch_fields
             if k in stored and k in mine and _norm(stored[k]) != _norm(mine[k])]
    if diffs:
        raise ckpt.CheckpointError(
            f"weights {path} (family={stored.get('family')!r}, size={stored.get('size')!r}) do not fit this model "
            f"(family={getattr(cfg, 'family', None)!r}, size={getattr(cfg, 'size', None)!r}): " + "; ".join(diffs))


def encoder_state(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The ``encoder.*`` entries of a pre-training state dict, prefix stripped."""
    return {k[len("encoder."):]: v for k, v in sd.items() if k.startswith("encoder.")}


def load_encoder(model: nn.Module, sd: dict[str, torch.Tensor], path: str | os.PathLike = "<weights>") -> None:
    """Load pre-trained encoder weights into ``model.encoder`` strictly (missing/extra/mis-shaped keys raise)."""
    enc_sd = encoder_state(sd)
    if not enc_sd:
        raise ckpt.CheckpointError(f"weights {path} hold no 'encoder.*' tensors")
    own = model.encoder.state_dict()
    missing = sorted(set(own) - set(enc_sd))
    extra = sorted(set(enc_sd) - set(own))
    shapes = [f"{k}: {tuple(enc_sd[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in enc_sd and tuple(enc_sd[k].shape) != tuple(own[k].shape)]
    if missing or extra or shapes:
        raise ckpt.CheckpointError(f"weights {path} do not fit the encoder: missing {missing[:5]}, "
                                   f"unexpected {extra[:5]}, shape mismatches {shapes[:5]}")
    model.encoder.load_state_dict(enc_sd, strict=True)


def load_weights(spec: RunSpec, cfg: Any) -> dict[str, torch.Tensor] | None:
    """Exported weights for ``spec`` (``None`` for ``scratch``), checked against ``cfg`` before any compute."""
    check_strategy(spec.strategy)
    if spec.strategy == "scratch":
        if spec.init_from:
            raise ValueError(f"strategy='scratch' trains from random init; init_from={spec.init_from!r} must be None")
        return None
    if not spec.init_from:
        raise ValueError(f"strategy={spec.strategy!r} needs init_from=<exported weights .safetensors>; "
                         "use strategy='scratch' for random init")
    sd, info = ckpt.load_exported(spec.init_from)
    check_compatible(cfg, info, spec.init_from)
    return sd


# --------------------------------------------------------------------------------------------------
# strategies
# --------------------------------------------------------------------------------------------------
def add_lora(model: nn.Module, targets: list[str], rank: int, alpha: float | None = None) -> list[str]:
    """Inject LoRA adapters (``peft``) into the encoder modules ``targets`` (the family's
    ``FinetuneHooks.lora_targets``) in place; returns the targets."""
    from peft import LoraConfig, inject_adapter_in_model

    if rank <= 0:
        raise ValueError(f"lora_rank={rank} must be positive")
    config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank, lora_dropout=0.0,
                        target_modules=targets, bias="none")
    inject_adapter_in_model(config, model.encoder)
    return targets


def build_model(spec: RunSpec, cfg: Any, weights: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """The downstream model of ``spec`` with its strategy applied (weights loaded, trainable set marked).

    Parameters
    ----------
    spec : RunSpec
        Uses ``strategy``, ``task_type``, ``lora_rank``, ``prompt_tokens``, ``seed``.
    cfg : model config
        From :func:`study.run_math.model_config`.
    weights : dict, optional
        Pre-trained state dict (``encoder.*`` keys are used); ``None`` leaves the random init.

    Returns
    -------
    nn.Module
        With ``requires_grad`` set per the strategy.
    """
    check_strategy(spec.strategy)
    hooks = R.family_of(cfg).finetune
    kw: dict[str, Any] = {}
    if spec.strategy == "prompt":
        if spec.prompt_tokens <= 0:
            raise ValueError(f"strategy='prompt' needs prompt_tokens > 0, got {spec.prompt_tokens}")
        if not hooks.supports_prompts(cfg):
            raise ValueError(f"strategy='prompt' is not supported by family {spec.family!r} (its encoder has no "
                             f"stage that prompt tokens can join for this config); allowed for it: "
                             f"{[s for s in STRATEGIES if s != 'prompt']}")
        kw["prompt_tokens"] = spec.prompt_tokens
    if spec.strategy == "frozen_mlp":
        kw["hidden_dim"] = hooks.feature_dim(cfg)
    torch.manual_seed(spec.seed)
    model = R.build_downstream_model(cfg, task=spec.task_type, num_outputs=1, **kw)
    if weights is not None:
        load_encoder(model, weights, spec.init_from or "<weights>")
    s = spec.strategy
    if s in ("scratch", "full"):
        trainable: Iterable[nn.Parameter] = list(model.parameters())
    elif s == "last_block":
        trainable = hooks.last_block_parameters(model)
    elif s == "lora":
        torch.manual_seed(spec.seed + 1)
        add_lora(model, hooks.lora_targets(model.encoder), spec.lora_rank)
        trainable = [p for n, p in model.encoder.named_parameters() if "lora_" in n] + list(model.head.parameters())
    elif s == "prompt":
        trainable = [model.prompts] + list(model.head.parameters())
    else:  # frozen_mlp
        trainable = list(model.head.parameters())
    keep = {id(p) for p in trainable}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)
    if spec.compile:  # after LoRA and freezing: both change what the compiled blocks compute
        compile_regions(model)
    return model


def trainable_summary(model: nn.Module) -> dict[str, float]:
    """Parameter counts: total, trainable and the trainable fraction (LoRA adapters count as trainable)."""
    total = sum(p.numel() for p in model.parameters())
    train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"n_params": total, "n_trainable": train, "trainable_frac": train / max(total, 1)}


# --------------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------------
def build_finetune_datasets(spec: RunSpec):
    """Train / val / test :class:`data.datasets.WindowedDataset` with ``y`` = ``spec.target``."""
    from data.datasets import WindowedDataset
    from data.manifest import Manifest

    if not spec.manifest:
        raise ValueError("spec.manifest is empty: give the path of a cohort manifest (manifest.parquet)")
    manifest = Manifest.load(spec.manifest)
    if spec.target not in manifest.df.columns:
        raise ValueError(f"target={spec.target!r} is not a manifest column; columns: {sorted(manifest.df.columns)}")
    common = dict(sequence_length=spec.sequence_length, stride_within=spec.stride_within, scaling=spec.scaling,
                  grid=tuple(spec.grid), target=spec.target, cohorts=dict(spec.cohorts) or None)
    train_ds = WindowedDataset(manifest, split="train", stride_between=spec.stride_between,
                               max_subjects=spec.n_subjects, **common)
    val_ds = WindowedDataset(manifest, split="val", stride_between=1.0, **common)
    test_ds = WindowedDataset(manifest, split="test", stride_between=1.0, **common)
    return manifest, train_ds, val_ds, test_ds


def target_stats(spec: RunSpec, train_ds) -> tuple[float, float]:
    """Mean and std of the label over the training *subjects* (regression); (0, 1) for classification."""
    if spec.task_type != "regression":
        return 0.0, 1.0
    df = train_ds.df.drop_duplicates(subset=["cohort", "subject"])
    y = df[spec.target].astype("float64").to_numpy()
    mean = float(y.mean())
    std = float(y.std())
    if not (std > 0 and math.isfinite(std)):
        raise ValueError(f"target={spec.target!r} is constant over the training subjects: cannot standardise")
    return mean, std


def task_loss(task_type: str, out_B1: torch.Tensor, y_B: torch.Tensor) -> torch.Tensor:
    """BCE-with-logits (classification) or MSE (regression, standardised targets)."""
    out = out_B1.float().reshape(-1)
    if task_type == "classification":
        return F.binary_cross_entropy_with_logits(out, y_B.float())
    return F.mse_loss(out, y_B.float())


@torch.no_grad()
def predict(model: nn.Module, ds, spec: RunSpec, ctx: DistContext, *, y_mean: float, y_std: float,
            batch_size: int, quarantine=None) -> tuple[list[str], list[float], list[float]]:
    """Window outputs of every window of ``ds`` (logits, or predictions in target units), gathered on all ranks.

    A window that cannot be read or has non-finite values stops the run with :class:`study.loop.BadDataError`
    naming its file, under either policy (:func:`study.loop.val_item`: evaluation windows are never skipped)."""
    was_training = model.training
    model.eval()
    idx = list(range(len(ds)))[ctx.rank::ctx.world_size]
    subjects: list[str] = []
    outputs: list[float] = []
    targets: list[float] = []
    for a in range(0, len(idx), batch_size):
        batch = collate([val_item(ds, i, quarantine, spec.run_id) for i in idx[a:a + batch_size]])
        x = batch["x"].to(ctx.device)
        bm = batch.get("brain_mask")
        with autocast(ctx, spec):
            out = model(x, brain_mask=bm.to(ctx.device) if bm is not None else None)
        o = out.float().reshape(-1).cpu().double()
        if spec.task_type == "regression":
            o = o * y_std + y_mean
        outputs += o.tolist()
        targets += batch["y"].double().tolist()
        subjects += [f"{c}/{s}" for c, s in zip(batch["cohort"], batch["subject"])]
    if was_training:
        model.train()
    if ctx.is_distributed and dist.is_initialized():
        gathered: list[Any] = [None] * ctx.world_size
        dist.all_gather_object(gathered, (subjects, outputs, targets))
        subjects = [s for g in gathered for s in g[0]]
        outputs = [o for g in gathered for o in g[1]]
        targets = [t for g in gathered for t in g[2]]
    return subjects, outputs, targets


def evaluate_split(model, ds, spec, ctx, *, prefix: str, y_mean: float, y_std: float, batch_size: int,
                   quarantine=None) -> dict[str, float]:
    """Per-subject metrics of one split, keys prefixed (``val_auroc``, ``test_mae``, ...)."""
    if len(ds) == 0:
        return {}
    subjects, outputs, targets = predict(model, ds, spec, ctx, y_mean=y_mean, y_std=y_std, batch_size=batch_size,
                                         quarantine=quarantine)
    scores = score_subjects(spec.task_type, subjects, outputs, targets)
    o = torch.tensor(outputs, dtype=torch.float64)
    t = torch.tensor(targets, dtype=torch.float64)
    if spec.task_type == "classification":
        loss = float(F.binary_cross_entropy_with_logits(o, t))
    else:
        loss = float((((o - t) / y_std) ** 2).mean())
    return {f"{prefix}_loss": loss, **{f"{prefix}_{k}": v for k, v in scores.items()}}


# --------------------------------------------------------------------------------------------------
# the fine-tuning run
# --------------------------------------------------------------------------------------------------
def train_finetune(spec: RunSpec, ctx: DistContext, reporter: Reporter, *,
                   run_dir: str | os.PathLike | None = None, resume_from: str | os.PathLike | None = None,
                   should_stop: Callable[[], bool] | None = None, quarantine=None) -> TrainResult:
    """Fine-tune one run (see the module docstring for the strategies).

    Parameters
    ----------
    spec : RunSpec
        ``task="finetune"``, with ``target``, ``task_type``, ``strategy`` and (except for ``scratch``)
        ``init_from`` = an exported ``.safetensors`` file from :func:`study.checkpoint.export_weights`.
    ctx : DistContext
        Rank, world size and device (process group already initialised when distributed).
    reporter : Reporter
        ``log`` every ``log_every`` steps; ``report`` at each evaluation with per-subject validation
        metrics, and at the end with test metrics (``test_auroc``/``test_bacc`` or ``test_mae``/
        ``test_pearson_r``) and the trainable fraction.
    run_dir, resume_from, should_stop, quarantine
        As in :func:`study.train.train`, which hands ``task="finetune"`` specs here: the training split follows
        ``spec.bad_data`` and the study's quarantine list like pre-training (:class:`study.loop.PositionDataset`);
        a bad val or test window stops the run under either policy.

    Returns
    -------
    TrainResult
        ``final_metrics`` holds the last report row.
    """
    # ---- everything that can be wrong is checked before compute -------------------------------
    if spec.task != "finetune":
        raise ValueError(f"task={spec.task!r}: train_finetune needs task='finetune'")
    check_strategy(spec.strategy)
    if spec.task_type not in TASK_METRICS:
        raise ValueError(f"task_type={spec.task_type!r}; allowed: {list(TASK_METRICS)}")
    if spec.distributed != "ddp":
        raise ValueError(f"distributed={spec.distributed!r} is not supported for fine-tuning; allowed: 'ddp' "
                         "(exported weights load on any number of ranks)")
    t_start = time.perf_counter()
    plan = BatchPlan.make(spec, ctx.world_size)
    device = ctx.device
    cfg = model_config(spec)
    weights = load_weights(spec, cfg)
    fps = R.flops_per_sample(cfg)
    tps = R.tokens_per_sample(cfg)
    n_steps = total_steps(spec, flops_per_sample=fps["train"], tokens_per_sample=tps)
    manifest, train_ds, val_ds, test_ds = build_finetune_datasets(spec)
    order = SampleOrder(len(train_ds), spec.seed)
    y_mean, y_std = target_stats(spec, train_ds)

    model = build_model(spec, cfg, weights).to(device)
    del weights
    counts = trainable_summary(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(model, spec, params=trainable)
    scheduler = lr_scheduler(optimizer, n_steps, spec)
    net = wrap_ddp(model, ctx)

    state = LoopState()
    objects = dict(model=model, optimizer=optimizer, scheduler=scheduler)
    restore(state, resume_from, spec, ctx, **objects)
    save = checkpoint_saver(run_dir, spec, ctx, state, **objects)

    eval_bs = plan.micro_batch
    static = {"run_id": spec.run_id, "task": spec.target, "task_type": spec.task_type, "strategy": spec.strategy,
              "init_from": spec.init_from, **counts, "target_mean": y_mean, "target_std": y_std,
              "device_kind": device_name(device), "device_count": ctx.world_size, "total_steps": n_steps}

    loader_ds = PositionDataset(train_ds, order, spec.bad_data, quarantine=quarantine, run_id=spec.run_id)
    if loader_ds.skip_paths:
        reporter.log({"step": state.step, "bad_data_quarantined": len(loader_ds.skip_paths)})
    batches = make_loader(loader_ds, state, n_steps, plan, ctx, spec, pin_memory=device.type == "cuda")

    def forward_loss(batch: dict[str, Any]) -> tuple[torch.Tensor, float]:
        x = batch["x"].to(device, non_blocking=True)
        y = ((batch["y"] - y_mean) / y_std).to(device)
        bm = batch.get("brain_mask")
        with autocast(ctx, spec):
            out = net(x, brain_mask=bm.to(device, non_blocking=True) if bm is not None else None)
        return task_loss(spec.task_type, out, y), float(x.shape[0] * tps)

    def on_eval(step: int, metrics: dict[str, Any], ckpt_due: bool) -> dict[str, Any]:
        final = step == n_steps
        row = {**static, **metrics,
               **evaluate_split(model, val_ds, spec, ctx, prefix="val", y_mean=y_mean, y_std=y_std,
                                batch_size=eval_bs, quarantine=quarantine)}
        if final:
            row.update(evaluate_split(model, test_ds, spec, ctx, prefix="test", y_mean=y_mean, y_std=y_std,
                                      batch_size=eval_bs, quarantine=quarantine))
        path = save(step) if (final or ckpt_due) else None
        row.update({"is_final": final, "status": "finished" if final else "running",
                    "samples_seen": state.samples_seen, "tokens_seen": state.tokens_seen,
                    "wall_time_s": state.wall_time_s})
        reporter.report(row, checkpoint_dir=path)
        return row

    status, metrics = run_steps(
        spec, ctx, plan, n_steps, state=state, batches=batches,
        trainee=Trainee(net=net, optimizer=optimizer, scheduler=scheduler, engine=None, params=trainable),
        objective=Objective(forward_loss=forward_loss, on_eval=on_eval),
        meter=Meter(t_start=t_start, tokens_per_sample=tps), reporter=reporter, should_stop=should_stop)
    step = state.step
    if status == "stopped":
        path = save(step)
        reporter.report({**static, **metrics, "step": step, "status": "stopped", "is_final": False,
                         "samples_seen": state.samples_seen}, checkpoint_dir=path)
    return TrainResult(run_id=spec.run_id, status=status, step=step, final_metrics=metrics,
                       last_checkpoint=state.last_checkpoint)

