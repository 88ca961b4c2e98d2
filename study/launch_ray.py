"""Launch one run on Ray Train (V2 API): a ``TorchTrainer`` whose workers call :func:`study.train.train`.

Each worker builds a :class:`~study.devices.DistContext` from Ray's train context (Ray already set
up the process group and isolated one GPU/XPU tile per worker), resumes from
``ray.train.get_checkpoint()`` when Ray restarts the run after a failure, and reports through a
:class:`RayReporter` (``ray.train.report`` on every rank: it is a barrier, and DeepSpeed's per-rank
shards are merged into one checkpoint directory in storage).

Inside a Tune trial, :func:`fit_run` adds Tune's ``TuneReportCallback`` so the trial sees every report
(Optuna, ASHA). Outside Tune it is a plain blocking ``fit``.

:func:`run_inline` is the single-worker alternative for sweeps: the Tune trial actor holds the worker's
resources and calls :func:`study.train.train` itself, and Tune reuses the actor for the next trial. A trial
then starts no Train controller, worker process or helper actors (about 10 s of process starts and imports
per trial on a 2-core machine; BENCHMARKS.md, study machinery). Checkpoints go straight to the run's storage
(``<storage>/<run_id>/inline/checkpoints``); either launcher resumes from the newest checkpoint of both
(:func:`study.checkpoint.resume_point`).
"""
from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from typing import Any

import ray
import ray.train
import ray.train.torch
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig

from study.checkpoint import INLINE_DIR, checkpoint_step, resume_point
from study.devices import DistContext, backend_for, collective_env, detect_device_kind, gpu_kind, select_device
from study.reporters import MultiReporter, NullReporter, RankZero
from study.run_env import RunEnv, build_reporters
from study.spec import RunSpec
from study.trace import mark


def _scalars(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool)) or v is None}


class RayReporter(NullReporter):
    """``ray.train.report`` with the checkpoint directory, on every rank."""

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None = None) -> None:
        ray.train.report(_scalars(metrics),
                         checkpoint=Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None)


class TuneReporter(NullReporter):
    """``ray.tune.report`` of each evaluation (inline trials). The checkpoint is not handed to Tune: train()
    already wrote it to the run's storage, where :func:`study.checkpoint.resume_point` finds it. When Tune stops the trial
    (ASHA), this call ends the training thread (``SystemExit``) after the row is stored."""

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None = None) -> None:
        from ray import tune

        tune.report(_scalars(metrics))


def stored_steps(store_dir: str | os.PathLike | None, spec: RunSpec) -> set[int] | None:
    """Steps of ``spec``'s rows in the results store (``None`` without a store: no filtering)."""
    if not store_dir:
        return None
    from analysis.store import read_table
    from study.reporters import progress_table

    try:
        df = read_table(store_dir, progress_table(spec.task))
    except (FileNotFoundError, ValueError):
        return set()
    if df is None or df.empty or "run_id" not in df:
        return set()
    return {int(s) for s in df.loc[df["run_id"] == spec.run_id, "step"]}


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


def _any_stop(*checks):
    checks = [c for c in checks if c is not None]
    return (lambda: any(c() for c in checks)) if checks else None


def quarantine_of(env: RunEnv):
    """The study's list of bad subject files (:mod:`data.quarantine`), beside its results store; ``None`` without
    one."""
    if not env.store_dir:
        return None
    from data.quarantine import Quarantine

    return Quarantine(env.store_dir)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """The Ray Train worker function (``config``: the spec and the :class:`~study.run_env.RunEnv` as dicts)."""
    from study.train import TrainingDiverged, train

    spec = RunSpec.from_dict(config["spec"])
    env = RunEnv.from_dict(config["env"])
    run_storage = env.run_storage(spec)
    mark("worker_start", run=spec.run_id)
    ctx = ray_context(env.device)
    reporter = RankZero(ctx.rank, MultiReporter(build_reporters(spec, env, rank=ctx.rank, wandb_group=spec.study)),
                        all_ranks_report=RayReporter())
    checkpoint = ray.train.get_checkpoint()
    with tempfile.TemporaryDirectory(prefix="neurox-") as local:
        # Ray's checkpoint is the newest its controller registered, which lags what the worker persisted (seen: 2
        # steps behind when the driver was killed, each retrained and its row written twice); an inline trial of an
        # earlier study run may also have left a newer one. The newest complete one whose row is stored wins.
        resume = resume_checkpoint(checkpoint, resume_point(run_storage, stored_steps(env.store_dir, spec)),
                                   os.path.join(local, "resume"))
        try:
            train(spec, ctx, reporter, run_dir=os.path.join(local, "run"), resume_from=resume,
                  should_stop=stop_checker(env.stop_file, env.deadline), quarantine=quarantine_of(env))
            mark("train_returned", run=spec.run_id)
        except TrainingDiverged as exc:  # name the durable checkpoint, not this worker's temporary copy
            raise TrainingDiverged(exc.step, exc.loss,
                                   durable_name(exc.last_good, str(run_storage) if run_storage else None)) from None
        finally:
            reporter.close()


def newer_checkpoint(ray_dir: str | None, ours: str | os.PathLike | None) -> str | None:
    """Of Ray's checkpoint (a local copy of the newest one its controller registered) and the newest complete
    checkpoint found in the run's storage with its row stored (:func:`study.checkpoint.resume_point`), the one of
    the later step; Ray's on a tie or when the other's step cannot be read."""
    if ours is None:
        return ray_dir
    if ray_dir is None:
        return str(ours)
    ray_step, our_step = checkpoint_step(ray_dir), checkpoint_step(ours)
    return str(ours) if our_step is not None and (ray_step is None or our_step > ray_step) else ray_dir


def resume_checkpoint(checkpoint, ours: str | os.PathLike | None, local: str) -> str | None:
    """Where a Ray Train worker resumes: :func:`newer_checkpoint` of Ray's ``checkpoint`` (a
    ``ray.train.Checkpoint`` or None) and ``ours``, copying Ray's to ``local`` only when it may win. On a local or
    shared file system Ray's step is read in place, so when ours is as new (after a driver kill, the usual case)
    the checkpoint, gigabytes at the large sizes, is not copied to the worker's temp dir for nothing."""
    if checkpoint is None:
        return newer_checkpoint(None, ours)
    if ours is not None:
        our_step, ray_step = checkpoint_step(ours), _step_in_place(checkpoint)
        if our_step is not None and ray_step is not None and our_step >= ray_step:
            return str(ours)
    return newer_checkpoint(checkpoint.to_directory(local), ours)


def _step_in_place(checkpoint) -> int | None:
    """A ``ray.train.Checkpoint``'s step read where it lies, when that is this machine's file system; else None."""
    try:
        import pyarrow.fs as pafs

        if isinstance(checkpoint.filesystem, pafs.LocalFileSystem):
            return checkpoint_step(checkpoint.path)
    except Exception:  # noqa: BLE001 - any doubt: copy it, as before
        return None
    return None


def _run_env(env: RunEnv, fn: str) -> RunEnv:
    """``env``, checked: a :class:`~study.run_env.RunEnv` with a storage directory."""
    if not isinstance(env, RunEnv):
        raise TypeError(f"{fn}: env must be a study.run_env.RunEnv, got {type(env).__name__}")
    if not env.storage:
        raise ValueError(f"{fn}: the run environment has no storage (RunEnv.storage): give the shared-filesystem "
                         "directory that keeps the run's checkpoints")
    return env


def durable_name(local_checkpoint: str | None, run_storage: str | None) -> str | None:
    """Describe a worker-local checkpoint (a temporary directory) by its step and the Ray storage that
    holds its persisted copy."""
    if not local_checkpoint or not run_storage:
        return local_checkpoint
    step = checkpoint_step(local_checkpoint)
    if step is None:
        return local_checkpoint
    return f"step_{step:07d} (persisted by Ray under {run_storage}/checkpoint_*)"


def scaling_for(num_workers: int, use_gpu: bool, cpus_per_worker: float = 1.0,
                accelerator: str = "GPU") -> ScalingConfig:
    resources = {"CPU": cpus_per_worker}
    if use_gpu:
        resources[accelerator] = 1
    return ScalingConfig(num_workers=num_workers, use_gpu=use_gpu and accelerator == "GPU",
                         resources_per_worker=resources)


def fit_run(spec: RunSpec, env: RunEnv, *, num_workers: int = 1, use_gpu: bool = False,
            cpus_per_worker: float = 1.0, max_failures: int = 2, num_to_keep: int = 2, in_tune: bool = False):
    """Run ``spec`` with a ``TorchTrainer`` and return Ray's ``Result``.

    ``env.storage`` (a shared-filesystem path) receives Ray's checkpoints under ``<storage>/<run_id>``;
    rerunning with the same storage restores the run from its latest checkpoint.
    """
    env = _run_env(env, "fit_run")
    from ray.train.torch import TorchConfig, TorchTrainer

    kind = env.device or (gpu_kind() if use_gpu else "cpu")  # cuda, or xpu on Aurora (NEUROX_DEVICE)
    callbacks = []
    if in_tune:
        from ray.tune.integration.ray_train import TuneReportCallback

        callbacks.append(TuneReportCallback())
    config = {"spec": spec.to_dict(), "env": dataclasses.replace(env, device=kind).to_dict()}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=config,
        torch_config=TorchConfig(backend=backend_for(kind)),
        scaling_config=scaling_for(num_workers, use_gpu, cpus_per_worker),
        run_config=RunConfig(name=spec.run_id, storage_path=str(env.storage),
                             failure_config=FailureConfig(max_failures=max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=num_to_keep),
                             callbacks=callbacks or None),
    )
    mark("fit_call", run=spec.run_id)
    return trainer.fit()


def run_inline(spec: RunSpec, env: RunEnv, *, use_gpu: bool = False, extra_reporter=None, should_stop=None):
    """Train ``spec`` in this process: a Tune trial actor that holds one worker's resources (Ray already
    isolated its GPU/XPU tile). Returns :class:`study.train.TrainResult`.

    The process group of one that DeepSpeed needs is created (on a free loopback port) by the actor's first
    DeepSpeed trial and kept for the actor's life: DeepSpeed caches its groups, so a group destroyed and made
    again breaks the next trial ("Group ... is not registered", seen on an H100). The run's device memory is
    released at the end, so a reused actor starts the next trial clean. Results go to the store,
    W&B and Tune (:class:`TuneReporter`, or ``extra_reporter``) exactly as from a Ray Train worker.
    ``should_stop`` (polled every step, like ``train``'s) stops the run beside the STOP file and deadline.
    """
    env = _run_env(env, "run_inline")
    import gc

    import torch
    import torch.distributed as dist

    from study.train import free_port, train

    mark("worker_start", run=spec.run_id)
    kind = detect_device_kind(env.device or (gpu_kind() if use_gpu else "cpu"))
    os.environ.update(collective_env(kind, local_rank=0, local_world_size=1))
    if not dist.is_initialized():  # several trial actors share a node: each takes its own port
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", LOCAL_RANK="0",
                          WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
    ctx = DistContext(rank=0, world_size=1, local_rank=0, local_world_size=1,
                      device=select_device(kind, 0, isolated=True), backend=backend_for(kind))
    reporters = build_reporters(spec, env, wandb_group=spec.study)
    reporters.append(extra_reporter if extra_reporter is not None else TuneReporter())
    reporter = MultiReporter(reporters)
    run_storage = env.run_storage(spec)
    try:
        resume = resume_point(run_storage, stored_steps(env.store_dir, spec))
        result = train(spec, ctx, reporter, run_dir=run_storage / INLINE_DIR, resume_from=resume,
                       should_stop=_any_stop(stop_checker(env.stop_file, env.deadline), should_stop),
                       quarantine=quarantine_of(env))
        mark("train_returned", run=spec.run_id)
        return result
    finally:
        reporter.close()
        gc.collect()
        if ctx.device.type == "cuda":
            torch.cuda.empty_cache()
        elif ctx.device.type == "xpu" and hasattr(torch, "xpu"):
            torch.xpu.empty_cache()
