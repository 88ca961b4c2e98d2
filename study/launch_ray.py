"""Launch one run on Ray Train (V2 API): a ``TorchTrainer`` whose workers call :func:`study.train.train`.

Each worker builds a :class:`~study.devices.DistContext` from Ray's train context (Ray already set
up the process group and isolated one GPU/XPU tile per worker), resumes from
``ray.train.get_checkpoint()`` when Ray restarts the run after a failure, and reports through a
:class:`RayReporter` (``ray.train.report`` on every rank: it is a barrier, and DeepSpeed's per-rank
shards are merged into one checkpoint directory in storage).

Inside a Tune trial, :func:`fit_run` adds Tune's ``TuneReportCallback`` so the trial sees every report
(Optuna, ASHA). Outside Tune it is a plain blocking ``fit``.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import ray
import ray.train
import ray.train.torch
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig

from study.devices import DistContext, backend_for, collective_env, detect_device_kind, select_device
from study.reporters import MultiReporter, NullReporter, RankZero
from study.spec import RunSpec
from study.trace import mark


class RayReporter(NullReporter):
    """``ray.train.report`` with the checkpoint directory, on every rank."""

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None = None) -> None:
        clean = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool)) or v is None}
        ckpt = Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(clean, checkpoint=ckpt)


def ray_context(device: str | None) -> DistContext:
    tc = ray.train.get_context()
    kind = detect_device_kind(device)
    os.environ.update(collective_env(kind, local_rank=tc.get_local_rank(),
                                     local_world_size=tc.get_local_world_size()))
    if kind == "cuda":
        dev = ray.train.torch.get_device()
    else:
        dev = select_device(kind, tc.get_local_rank(), isolated=True)
    return DistContext(rank=tc.get_world_rank(), world_size=tc.get_world_size(),
                       local_rank=tc.get_local_rank(), local_world_size=tc.get_local_world_size(),
                       device=dev, backend=backend_for(kind))


def stop_checker(stop_file: str | None, deadline: float | None):
    """``should_stop`` callable: a STOP file appeared (PBS walltime guard) or a deadline passed."""
    if not stop_file and not deadline:
        return None
    last = [0.0, False]

    def should_stop() -> bool:
        now = time.monotonic()
        if now - last[0] > 2.0:  # stat at most every 2 s
            last[0] = now
            last[1] = bool((stop_file and os.path.exists(stop_file)) or (deadline and time.time() > deadline))
        return last[1]

    return should_stop


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """The Ray Train worker function."""
    from study.launch_local import static_row
    from study.reporters import StoreReporter, progress_table
    from study.train import TrainingDiverged, train

    spec = RunSpec.from_dict(config["spec"])
    mark("worker_start", run=spec.run_id)
    ctx = ray_context(config.get("device"))
    reporters = []
    if ctx.rank == 0 and config.get("store_dir"):
        from analysis.store import ResultsStore

        reporters.append(StoreReporter(ResultsStore(config["store_dir"]),
                                       static_row(spec, config.get("manifest_hash")), table=progress_table(spec.task)))
    if ctx.rank == 0 and config.get("wandb"):
        from study.wandb_reporter import WandbReporter

        if config.get("wandb_sweep_id"):
            os.environ["NEUROX_WANDB_SWEEP_ID"] = config["wandb_sweep_id"]
        reporters.append(WandbReporter(spec, dir=config.get("wandb_dir"), group=spec.study))
    reporter = RankZero(ctx.rank, MultiReporter(reporters), all_ranks_report=RayReporter())
    resume = None
    checkpoint = ray.train.get_checkpoint()
    with tempfile.TemporaryDirectory(prefix="neurox-") as local:
        if checkpoint is not None:
            resume = checkpoint.to_directory(os.path.join(local, "resume"))
        try:
            train(spec, ctx, reporter, run_dir=os.path.join(local, "run"), resume_from=resume,
                  should_stop=stop_checker(config.get("stop_file"), config.get("deadline")))
            mark("train_returned", run=spec.run_id)
        except TrainingDiverged as exc:  # name the durable checkpoint, not this worker's temporary copy
            raise TrainingDiverged(exc.step, exc.loss,
                                   durable_name(exc.last_good, config.get("run_storage"))) from None
        finally:
            reporter.close()


def durable_name(local_checkpoint: str | None, run_storage: str | None) -> str | None:
    """Describe a worker-local checkpoint (a temporary directory) by its step and the Ray storage that
    holds its persisted copy."""
    if not local_checkpoint or not run_storage:
        return local_checkpoint
    try:
        step = json.loads((Path(local_checkpoint) / "trainer_state.json").read_text())["step"]
    except (OSError, ValueError, KeyError):
        return local_checkpoint
    return f"step_{step:07d} (persisted by Ray under {run_storage}/checkpoint_*)"


def scaling_for(num_workers: int, use_gpu: bool, cpus_per_worker: float = 1.0,
                accelerator: str = "GPU") -> ScalingConfig:
    resources = {"CPU": cpus_per_worker}
    if use_gpu:
        resources[accelerator] = 1
    return ScalingConfig(num_workers=num_workers, use_gpu=use_gpu and accelerator == "GPU",
                         resources_per_worker=resources)


def fit_run(spec: RunSpec, *, storage: str, num_workers: int = 1, use_gpu: bool = False,
            cpus_per_worker: float = 1.0, store_dir: str | None = None, device: str | None = None,
            max_failures: int = 2, num_to_keep: int = 2, stop_file: str | None = None,
            deadline: float | None = None, manifest_hash: str | None = None, use_wandb: bool = False,
            wandb_sweep_id: str | None = None, in_tune: bool = False):
    """Run ``spec`` with a ``TorchTrainer`` and return Ray's ``Result``.

    ``storage`` (a shared-filesystem path) receives Ray's checkpoints under ``<storage>/<run_id>``;
    rerunning with the same storage restores the run from its latest checkpoint.
    """
    from ray.train.torch import TorchConfig, TorchTrainer

    kind = "cuda" if use_gpu else (device or "cpu")
    callbacks = []
    if in_tune:
        from ray.tune.integration.ray_train import TuneReportCallback

        callbacks.append(TuneReportCallback())
    config = {"spec": spec.to_dict(), "store_dir": store_dir, "device": device or ("cuda" if use_gpu else "cpu"),
              "stop_file": stop_file, "deadline": deadline, "manifest_hash": manifest_hash,
              "run_storage": str(Path(storage) / spec.run_id),
              "wandb": use_wandb, "wandb_dir": str(Path(storage) / "wandb") if use_wandb else None,
              "wandb_sweep_id": wandb_sweep_id}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=config,
        torch_config=TorchConfig(backend=backend_for(kind)),
        scaling_config=scaling_for(num_workers, use_gpu, cpus_per_worker),
        run_config=RunConfig(name=spec.run_id, storage_path=str(storage),
                             failure_config=FailureConfig(max_failures=max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=num_to_keep),
                             callbacks=callbacks or None),
    )
    mark("fit_call", run=spec.run_id)
    return trainer.fit()
