"""The step machinery shared by every objective: sample order, micro-batches, the position dataset and collate,
optimizer, autocast, checkpoint save/restore, DeepSpeed or DDP, and the optimizer-step loop.

An objective (pre-training in :mod:`study.train`, fine-tuning in :mod:`study.finetune_engine`) builds its model,
data and loss, then hands the loop

* a :class:`LoopState` (or :class:`PretrainState`): the counters that the loop advances and a checkpoint saves,
* a :class:`Trainee`: what the loop steps (the wrapped net, optimizer, scheduler, DeepSpeed engine, parameters),
* an :class:`Objective`: ``forward_loss(batch) -> (loss, tokens)`` and ``on_eval(step, metrics, ckpt_due)``,
* a :class:`Meter`: what the loop needs to report throughput (start time, tokens/FLOPs per sample, peak),

and calls :func:`run_steps`. Objectives import this module and :mod:`study.run_math`, never each other.
It imports neither Ray nor W&B. The batch plan, LR schedule and model config are in :mod:`study.run_math`.

Why one file of ~580 lines: each part is small, and they share the determinism contract (positions, masks,
micro-batches) and the checkpoint contract (the state fields are ``trainer_state.json``'s keys); reading the loop
means reading them together.
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.profiler import record_function

from data.transforms import all_finite
from study import checkpoint as ckpt
from study.devices import DistContext
from study.reporters import Reporter
from study.run_math import BatchPlan, lr_factor, micro_batch_positions
from study.spec import RunSpec


class TrainingDiverged(RuntimeError):
    """Loss became NaN/Inf. Names the step and the last good checkpoint."""

    def __init__(self, step: int, loss: float, last_good: str | None) -> None:
        self.step, self.loss, self.last_good = step, loss, last_good
        super().__init__(f"non-finite loss {loss} at step {step}; last good checkpoint: {last_good or 'none'}")

    def __reduce__(self):  # picklable: Ray ships a worker's exception to the driver
        return (type(self), (self.step, self.loss, self.last_good))


@dataclass
class TrainResult:
    run_id: str
    status: str  # "finished" | "stopped"
    step: int
    final_metrics: dict[str, Any] = field(default_factory=dict)
    last_checkpoint: str | None = None


# --------------------------------------------------------------------------------------------------
# loop state and what the loop is handed
# --------------------------------------------------------------------------------------------------
@dataclass
class LoopState:
    """What the step loop advances and a checkpoint saves (``trainer_state.json``, one key per field)."""

    step: int = 0
    """Optimizer steps done."""
    samples_seen: int = 0
    """Global samples consumed (``step * global_batch``)."""
    tokens_seen: int = 0
    """Tokens processed, as the objective's ``forward_loss`` counts them (all ranks)."""
    wall_time_s: float = 0.0
    """Training wall time, carried across resumes."""
    skipped: int = 0
    """Bad windows skipped under ``bad_data="skip"``."""
    last_checkpoint: str | None = None
    """The newest complete checkpoint directory (saved or resumed from)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def load(self, saved: dict[str, Any]) -> None:
        """Take the fields that a saved trainer state holds (a state of an older format may lack some)."""
        for f in dataclasses.fields(self):
            if f.name in saved:
                setattr(self, f.name, saved[f.name])


@dataclass
class PretrainState(LoopState):
    """:class:`LoopState` plus what pre-training tracks: FLOPs and the best validation loss and checkpoint."""

    flops: float = 0.0
    """Training FLOPs (analytic, per sample, times samples seen)."""
    best_val_loss: float | None = None
    """Lowest validation loss so far."""
    best_checkpoint: str | None = None
    """The checkpoint saved at the best validation loss (kept by retention when ``spec.keep_best``)."""


@dataclass(frozen=True)
class Trainee:
    """What the loop steps."""

    net: Any
    """The module called by ``forward_loss``: the model, its DDP wrapper or the DeepSpeed engine."""
    optimizer: torch.optim.Optimizer
    scheduler: Any
    """The LR scheduler (``LambdaLR`` over :func:`study.run_math.lr_factor`)."""
    engine: Any
    """The DeepSpeed engine, or ``None`` (plain / DDP: the loop steps optimizer and scheduler itself)."""
    params: list[nn.Parameter]
    """The parameters whose gradients are clipped and measured."""


@dataclass(frozen=True)
class Objective:
    """How an objective plugs into the loop."""

    forward_loss: Callable[[dict[str, Any]], tuple[torch.Tensor, float]]
    """One micro-batch (collated, on the host) -> (loss on the device, tokens it counts)."""
    on_eval: Callable[[int, dict[str, Any], bool], dict[str, Any]]
    """``on_eval(step, metrics, checkpoint_due)`` at each evaluation/checkpoint step: evaluates, saves when due,
    reports, and returns the row that becomes the latest metrics."""


@dataclass(frozen=True)
class Meter:
    """What the loop needs for its throughput columns."""

    t_start: float
    """``time.perf_counter()`` when the run (this process's part of it) started."""
    tokens_per_sample: int
    flops_per_sample: float | None = None
    """Training FLOPs per sample; when given, the loop counts ``flops`` (a :class:`PretrainState`) and MFU."""
    peak: float | None = None
    """Peak FLOP/s of one device (MFU is reported when given with ``flops_per_sample``)."""


# --------------------------------------------------------------------------------------------------
# sample order and data plumbing
# --------------------------------------------------------------------------------------------------
class SampleOrder:
    """Seeded permutation of ``n`` samples per epoch; position ``p`` maps to a dataset index."""

    def __init__(self, n: int, seed: int) -> None:
        if n <= 0:
            raise ValueError("the training split has no windows: check the manifest, split and sequence length")
        self.n, self.seed = n, seed
        self._epoch, self._perm = -1, None

    def index(self, position: int) -> int:
        epoch, offset = divmod(position, self.n)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = torch.randperm(self.n, generator=g).tolist()
            self._epoch = epoch
        return self._perm[offset]



def shared_zeros(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Zeros of ``shape``; in a loader worker in new shared memory, as ``default_collate`` allocates a worker's
    batches (a new shared-memory file reads as zeros, and the training process maps it without a copy)."""
    if torch.utils.data.get_worker_info() is None:
        return torch.zeros(shape, dtype=dtype)
    elem = torch.empty(0, dtype=dtype)
    return elem.new(elem._typed_storage()._new_shared(math.prod(shape), device="cpu")).view(shape)


class BufferRing:
    """Reusable shared-memory micro-batch buffers for crop batches: ``slots`` per loader worker. A worker claims a
    free slot (flag 1) before it writes into it, and the consumer releases it (flag 0) once it has copied the batch
    out (:class:`PinnedBatches`), so a buffer is never rewritten while it is read; no timing is assumed. Reuse spares
    the worker a new zero-filled shared-memory segment per micro-batch and the consumer a new mapping and its page
    faults (the consumer keeps each slot's storage, and torch maps a storage it still holds only once).

    Made in the training process before the DataLoader starts its workers (the flags are shared memory); each worker
    keeps its own slots' storages, allocated on a slot's first use (so only as many as the consumer's lag needs). A worker waits for a free slot (its earlier batches are consumed first, in order)
    and raises after ``wait_s`` seconds rather than hang."""

    def __init__(self, workers: int, slots: int, wait_s: float = 600.0) -> None:
        self.flags = torch.zeros(max(1, workers), max(1, slots), dtype=torch.int32).share_memory_()
        self.slots, self.wait_s = max(1, slots), wait_s
        self._buffers: dict[int, torch.Tensor] = {}  # in a worker: slot -> its flat storage

    def acquire(self, shape: tuple[int, ...], dtype: torch.dtype) -> tuple[torch.Tensor, tuple[int, int], bool]:
        """``(buffer of shape, slot, fresh)`` in a loader worker; ``fresh`` buffers are zeros, reused ones hold the
        slot's last batch (the caller overwrites or zeroes what it uses)."""
        info = torch.utils.data.get_worker_info()
        if info is None:
            raise RuntimeError("BufferRing.acquire runs in a loader worker")
        w, n = info.id, math.prod(shape)
        deadline = time.monotonic() + self.wait_s
        while True:
            for s in range(self.slots):  # the lowest free slot: a worker whose batches are copied out soon uses few
                if int(self.flags[w, s]) == 0:
                    self.flags[w, s] = 1
                    buf = self._buffers.get(s)
                    fresh = buf is None or buf.dtype != dtype or buf.numel() < n
                    if fresh:
                        buf = shared_zeros((n,), dtype)
                        self._buffers[s] = buf
                    return buf[:n].view(shape), (w, s), fresh
            if time.monotonic() > deadline:
                raise RuntimeError(f"loader worker {w}: no free batch buffer after {self.wait_s:.0f} s (all "
                                   f"{self.slots} are waiting to be copied out by the training process)")
            time.sleep(0.001)

    def release(self, slot: tuple[int, int]) -> None:
        """The consumer is done with ``slot``'s buffer."""
        self.flags[slot] = 0


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    # default_collate stacks straight into shared memory in a loader worker, so the batch is not copied a second
    # time on its way to the training process (a 51M micro-batch of 16 windows at 96^3 x 20 float16 is 566 MB);
    # items of PositionDataset.__getitems__'s crop batches already live in one such buffer ("x_batch")
    xb = items[0].get("x_batch")
    if xb is not None and len(xb) == len(items) and all(it.get("x_batch") is xb for it in items):
        out: dict[str, Any] = {"x": xb}
        if "buffer_slot" in items[0]:  # a BufferRing's: the consumer releases it after copying the batch out
            out["buffer_slot"] = items[0]["buffer_slot"]
    else:
        out = {"x": torch.utils.data.default_collate([it["x"] for it in items])}
    if "brain_mask" in items[0]:
        out["brain_mask"] = torch.utils.data.default_collate([it["brain_mask"] for it in items])
    for key in ("scale_coef", "crop_shape", "grid_offset"):
        if key in items[0]:
            out[key] = torch.stack([it[key] for it in items])
    if "y" in items[0]:
        out["y"] = torch.stack([torch.as_tensor(it["y"], dtype=torch.float32) for it in items])
    if "mask" in items[0]:
        out["mask"] = torch.stack([it["mask"] for it in items])
    out["cohort"] = [it.get("cohort", "") for it in items]
    out["skipped"] = [msg for it in items for msg in it.get("skipped", ())]
    out["subject"] = [it.get("subject", "") for it in items]
    return out


def _h2d(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device`` without stalling the host: a copy from pageable memory to a CUDA device waits for
    the stream to drain first (CUDA's documented behaviour, ``non_blocking`` or not), which would make every
    micro-step wait for the previous one's GPU work. CPU tensors are staged through pinned memory (PyTorch's
    caching host allocator) unless the loader already pinned them."""
    if device.type == "cuda" and t.device.type == "cpu" and not t.is_pinned():
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Move a collated batch to ``device``, finishing deferred (float16 + scale) inputs there."""
    if "scale_coef" in batch:
        from data.transforms import finish_on_device

        out = finish_on_device(batch, device)
    else:
        out = dict(batch)
        for key in ("x", "brain_mask", "y"):
            if key in out:
                out[key] = _h2d(out[key], device)
    if "mask" in out:
        out["mask"] = _h2d(out["mask"], device)
    return out


class MicroBatches:
    """Batch sampler: this rank's micro-batches (lists of global positions) from ``start`` to ``stop`` steps."""

    def __init__(self, start: int, stop: int, plan: BatchPlan, rank: int) -> None:
        self.start, self.stop, self.plan, self.rank = start, stop, plan, rank

    def __iter__(self):
        for s in range(self.start, self.stop):
            yield from micro_batch_positions(s, self.plan, self.rank)

    def __len__(self) -> int:
        return (self.stop - self.start) * self.plan.accumulation


class BadDataError(RuntimeError):
    """A window could not be used (unreadable subject file, non-finite values); names the file.

    ``path``: the subject file, when known; ``quarantined``: the window was skipped because its file is on the
    study's quarantine list (never raised out of :class:`PositionDataset`)."""

    def __init__(self, msg: str = "", *, path: str | None = None, quarantined: bool = False) -> None:
        super().__init__(msg)
        self.path, self.quarantined = path, quarantined

    def __reduce__(self):  # picklable with its attributes: Ray ships a worker's exception to the driver
        return (_bad_data_error, (str(self), self.path, self.quarantined))


def _bad_data_error(msg: str, path: str | None, quarantined: bool) -> BadDataError:
    return BadDataError(msg, path=path, quarantined=quarantined)


#: how many following windows the ``skip`` policy tries before giving up (windows of quarantined files not counted)
_MAX_SKIP = 32


class PositionDataset(torch.utils.data.Dataset):
    """Maps global sample positions to dataset items (so a DataLoader can prefetch in workers).

    Applies the bad-data policy: a window whose file cannot be read, or whose values are not finite,
    raises :class:`BadDataError` naming the file (``stop``) or is replaced by the next window of the
    dataset and recorded in the item's ``skipped`` list (``skip``).

    With a ``quarantine`` (:class:`data.quarantine.Quarantine`, the study's list) a bad file is recorded there the
    first time this process meets it, under either policy, and under ``skip`` the windows of every file on the list
    (read when the dataset is made) and of every bad file met since are skipped without being read or logged
    again: one ``skipped`` message per bad file and process, not one per window.
    """

    def __init__(self, ds, order: SampleOrder, policy: str = "stop", masks: Callable[[int], torch.Tensor] | None = None,
                 quarantine=None, run_id: str = "") -> None:
        self.ds, self.order, self.policy, self.masks = ds, order, policy, masks
        self.quarantine, self.run_id = quarantine, run_id
        self.skip_paths: set[str] = set(quarantine.skipped_paths()) if quarantine is not None and policy == "skip" \
            else set()
        self._recorded: set[str] = set()
        #: reusable micro-batch buffers for crop batches (:class:`BufferRing`), set by :func:`make_loader` when its
        #: consumer releases them; None: a new shared-memory buffer per micro-batch
        self.ring: BufferRing | None = None

    def __len__(self) -> int:  # pragma: no cover - positions are unbounded
        return 1 << 62

    def _path(self, idx: int) -> str | None:
        where = getattr(self.ds, "window", None)
        return os.path.abspath(where(idx)[0]) if callable(where) else None

    def _bad(self, msg: str, path: str | None, cause: Exception | None = None) -> BadDataError:
        """A :class:`BadDataError`, after recording its file on the quarantine list (once per process)."""
        if path is not None and self.policy == "skip":
            self.skip_paths.add(path)
        if path is not None and self.quarantine is not None and path not in self._recorded:
            self._recorded.add(path)
            what = str(cause) if cause is not None else msg
            if what.startswith(f"{path}: "):
                what = what[len(path) + 2:]
            try:
                self.quarantine.record(path, what, found_by=self.run_id or "a run", policy=self.policy)
            except OSError:  # the list is an optimisation: a run never fails for want of writing it
                pass
        return BadDataError(msg, path=path)

    def _checked(self, idx: int) -> dict[str, Any]:
        path = self._path(idx)
        if path is not None and path in self.skip_paths:
            raise BadDataError(f"window {idx} of {path}: quarantined", path=path, quarantined=True)
        try:
            item = self.ds[idx]
        except (OSError, ValueError, KeyError) as exc:  # SubjectFileError is a ValueError
            raise self._bad(f"window {idx}: {exc}", path, exc) from exc
        # a dataset that verified its windows once (an in-memory pool; ``"finite": True``) is not checked per
        # access: on windows that live on the GPU the check is two host-device syncs each, 32 per step of 16,
        # which kept the host from running ahead (15 ms of a 83 ms step on an H100, BENCHMARKS.md session 15)
        if item.get("finite") is not True and not all_finite(item["x"]):
            src = path or item.get("subject", "?")
            raise self._bad(f"window {idx} of {src} (subject {item.get('subject', '?')}): non-finite values", path)
        return item

    def __getitems__(self, positions: list[int]) -> list[dict[str, Any]]:
        """A micro-batch's items (the DataLoader's batched fetch). Over a dataset that serves crop batches
        (``batches_crops``: deferred windows on a grid), each window's brain-box crop is decoded straight into one
        buffer for the micro-batch (new shared memory in a loader worker, so :func:`collate` returns it as is and
        nothing is copied again on the way to the training process), and :func:`data.transforms.finish_on_device`
        pads on the device. Per window that saves the padded grid's allocation and fill, the paste into it and
        :func:`collate`'s stacking copy: most of a worker's CPU time (fresh pages, not decoding, dominated it).
        Anything else, and any batch with a quarantined, unreadable or non-finite window, goes through
        :meth:`__getitem__` per position (the bad-data policy's path), with the same result."""
        if not getattr(self.ds, "batches_crops", False):
            return [self[p] for p in positions]
        idxs = [self.order.index(p) for p in positions]
        if self.skip_paths and any(self._path(i) in self.skip_paths for i in idxs):
            return [self[p] for p in positions]
        try:
            shapes = [self.ds.crop_shape(i) for i in idxs]
            box = tuple(max(s[d] for s in shapes) for d in range(3))
            shape = (len(idxs), 1, self.ds.sequence_length, *box)
            ring = self.ring if torch.utils.data.get_worker_info() is not None else None
            slot, fresh = None, True
            if ring is not None:
                x, slot, fresh = ring.acquire(shape, torch.float16)
            else:
                x = shared_zeros(shape, torch.float16)
            items = []
            for b, (position, idx) in enumerate(zip(positions, idxs)):
                if not fresh and tuple(shapes[b]) != box:  # a reused buffer: the slot's padding must read zeros
                    x[b].zero_()
                try:
                    item = self.ds.read_crop_into(idx, x[b, 0].numpy())
                except BaseException:
                    if slot is not None:
                        ring.release(slot)
                    raise
                if item.pop("finite") is not True:
                    if slot is not None:
                        ring.release(slot)
                    return [self[p] for p in positions]
                item["x"], item["x_batch"] = x[b], x
                if slot is not None:
                    item["buffer_slot"] = slot
                if self.masks is not None:
                    item["mask"] = self.masks(position)
                items.append(item)
        except (OSError, ValueError, KeyError):  # SubjectFileError is a ValueError; __getitem__ applies the policy
            return [self[p] for p in positions]
        return items

    def __getitem__(self, position: int) -> dict[str, Any]:
        idx = self.order.index(position)
        n = len(self.ds)
        skipped: list[str] = []
        for k in range(n):
            try:
                item = self._checked((idx + k) % n)
                if skipped:
                    item = {**item, "skipped": skipped}
                if self.masks is not None:  # made here, i.e. in a loader worker, not on the training thread
                    item = {**item, "mask": self.masks(position)}
                return item
            except BadDataError as exc:
                if self.policy == "stop":
                    raise
                if exc.quarantined:
                    continue
                skipped.append(str(exc))
                if len(skipped) >= _MAX_SKIP:
                    break
        if not skipped:
            raise BadDataError(f"every window of the training split is in a quarantined file ({len(self.skip_paths)} "
                               "file(s) on the study's quarantine list)")
        raise BadDataError(f"{len(skipped)} consecutive bad windows from position {position}: {skipped[-1]}")


#: how a validation file's record on the quarantine list starts (the runner tells the user to fix or remove it)
VAL_BAD_PREFIX = "(validation split) "


def val_item(val_ds, i: int, quarantine=None, run_id: str = "") -> dict[str, Any]:
    """Window ``i`` of an evaluation split (pre-training's validation windows; fine-tuning's val and test splits).
    An unreadable one, or one with non-finite values, raises :class:`BadDataError` naming its file under either
    policy: a run cannot skip evaluation windows (its ``val_loss`` would not compare with the other runs'). The file
    goes on the study's quarantine list with policy ``stop``."""
    where = getattr(val_ds, "window", None)

    def bad(what: str, msg: str) -> BadDataError:
        path = os.path.abspath(where(i)[0]) if callable(where) else None
        if path is not None and quarantine is not None:
            what = what[len(path) + 2:] if what.startswith(f"{path}: ") else what
            try:
                quarantine.record(path, VAL_BAD_PREFIX + what, found_by=run_id or "a run", policy="stop")
            except OSError:
                pass
        return BadDataError(msg if path is None or path in msg else f"{msg} ({path})", path=path)

    try:
        item = val_ds[i]
    except (OSError, ValueError, KeyError) as exc:  # SubjectFileError is a ValueError
        raise bad(str(exc), f"validation window {i}: {exc}") from exc
    if not all_finite(item["x"]):  # a NaN/inf window would make the run's val_loss NaN without a word
        raise bad("non-finite values", f"validation window {i} (subject {item.get('subject', '?')}): "
                  "non-finite values")
    return item


def make_optimizer(model: nn.Module, spec: RunSpec, params=None) -> torch.optim.Optimizer:
    params = [p for p in (params if params is not None else model.parameters()) if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": spec.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    # on CUDA the fused kernel: one launch per step instead of foreach AdamW's several per parameter chunk
    # (the step's host time on a 51M); elsewhere PyTorch's default implementation
    extra = {"fused": True} if params and all(p.device.type == "cuda" for p in params) else {}
    if spec.parametrization == "mup":
        from mup import MuAdamW

        return MuAdamW(groups, lr=spec.lr, betas=tuple(spec.betas), **extra)
    return torch.optim.AdamW(groups, lr=spec.lr, betas=tuple(spec.betas), **extra)


def autocast(ctx: DistContext, spec: RunSpec):
    kind = ctx.device.type
    use_bf16 = spec.precision == "bf16" or (spec.precision == "auto" and kind in ("cuda", "xpu"))
    if not use_bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=kind, dtype=torch.bfloat16)


def _barrier(ctx: DistContext) -> Callable[[], None]:
    def barrier() -> None:
        if ctx.is_distributed and dist.is_initialized():
            dist.barrier()
    return barrier


def all_reduce_sum(t: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    if ctx.is_distributed and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


#: tensors of at least this many bytes are copied to pinned memory by :class:`PinnedBatches`'s thread pool in slices
PIN_PARALLEL_BYTES = 8 << 20


class PinnedBatches:
    """The batches of ``batches`` (an iterator of collated dicts, e.g. a DataLoader's with ``pin_memory=False``), in
    order, with every tensor copied to pinned memory (``pin=False``: to ordinary memory, for tests on a CPU box) by
    a background thread, large ones in slices over ``threads`` threads, at most ``depth`` batches ahead.

    Why: a worker's micro-batch arrives in a new shared-memory segment; the one thread that
    ``DataLoader(pin_memory=True)`` pins with must fault in every page of it and copy it (~276 MiB per v1-size
    micro-batch of 16 crops). On an H100 host that thread capped the loader at ~130 windows/s from 4 workers on
    (session 17: 1/2/4/8/14 workers gave 48/95/139/123/129); on the CPU box a consumer's copy of a received batch
    costs 11 ms of CPU per window against 0.9 to receive it. Slices of the copy fault and copy in parallel.

    ``device``: the CUDA device the pinning thread makes current (as the DataLoader's own pinning thread does), so
    that pinned allocations do not create a context on device 0 in every rank. :meth:`close` (or dropping the
    iterator) stops the thread and releases ``batches`` (a DataLoader's workers shut down with it); an exception
    in ``batches`` is raised by ``__next__`` in order. With a ``ring`` (:class:`BufferRing`), a batch's buffer slot
    is released once its copy is complete, and its storage kept mapped here for the slot's next batch."""

    def __init__(self, batches: Iterator[dict[str, Any]], *, threads: int = 4, depth: int = 2, pin: bool = True,
                 device: torch.device | None = None, ring: "BufferRing | None" = None) -> None:
        import queue
        import threading
        from concurrent.futures import ThreadPoolExecutor

        self._queue: "queue.Queue" = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix="neurox-pin")
        # the thread holds the source, the queue and the pool, never self: dropping the iterator closes it
        self._thread = threading.Thread(target=PinnedBatches._produce, name="neurox-pin-batches", daemon=True,
                                        args=(batches, self._queue, self._stop, self._pool, max(1, threads), pin,
                                              device, ring))
        self._thread.start()
        self._done = False

    @staticmethod
    def _copy(t: torch.Tensor, pool, threads: int, pin: bool) -> torch.Tensor:
        dst = torch.empty(t.shape, dtype=t.dtype, pin_memory=pin)
        nbytes = t.numel() * t.element_size()
        if nbytes < PIN_PARALLEL_BYTES or t.dim() == 0 or t.shape[0] < 2 or not t.is_contiguous():
            dst.copy_(t)
            return dst
        k = min(threads, t.shape[0])  # slices along the first dimension, one per thread
        bounds = [round(i * t.shape[0] / k) for i in range(k + 1)]
        list(pool.map(lambda ij: dst[ij[0]:ij[1]].copy_(t[ij[0]:ij[1]]), zip(bounds[:-1], bounds[1:])))
        return dst

    @staticmethod
    def _produce(batches, q, stop, pool, threads: int, pin: bool, device, ring) -> None:
        import queue

        def put(item) -> bool:
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        kept: dict = {}  # slot -> its storage, so the slot's next batch maps nothing new
        try:
            if pin and device is not None and device.type == "cuda":
                torch.cuda.set_device(device)
            for batch in batches:
                if stop.is_set():
                    return
                out = {k: PinnedBatches._copy(v, pool, threads, pin) if isinstance(v, torch.Tensor) else v
                       for k, v in batch.items() if k != "buffer_slot"}
                slot = batch.get("buffer_slot")
                if slot is not None and ring is not None:  # copied out: the worker may write the slot again
                    kept[slot] = batch["x"].untyped_storage()
                    ring.release(slot)
                del batch
                if not put(("batch", out)):
                    return
            put(("end", None))
        except BaseException as e:  # handed to the consumer, raised there in order
            put(("error", e))
        finally:
            del batches  # the DataLoader iterator (and its workers) go with the thread
            kept.clear()

    def __iter__(self) -> "PinnedBatches":
        return self

    def __next__(self) -> dict[str, Any]:
        if self._done:
            raise StopIteration
        kind, value = self._queue.get()
        if kind == "batch":
            return value
        self.close()
        if kind == "error":
            raise value
        raise StopIteration

    def close(self) -> None:
        """Stop the thread and release the source (idempotent)."""
        self._done = True
        self._stop.set()
        self._thread.join(timeout=30)
        self._pool.shutdown(wait=False)

    def __del__(self) -> None:
        self._stop.set()


def make_loader(dataset: "PositionDataset", state: LoopState, n_steps: int, plan: BatchPlan, ctx: DistContext,
                spec: RunSpec, *, pin_memory: bool) -> Iterator[dict[str, Any]]:
    """This rank's micro-batches from ``state.step`` to ``n_steps``: a DataLoader over global positions. With
    ``pin_memory`` and loader workers, the batches are pinned by :class:`PinnedBatches` (several threads) instead of
    the DataLoader's one pinning thread, and crop batches are written into a :class:`BufferRing` of reused
    shared-memory buffers (6 per worker, each at most a micro-batch of brain-box crops) that it releases."""
    workers = spec.num_workers
    pinned = pin_memory and workers > 0
    ring = None
    if isinstance(dataset, PositionDataset):
        # reused buffers only where PinnedBatches releases them: a worker has at most ``prefetch_factor`` batches
        # waiting in order, plus the one being copied out and the one it writes
        dataset.ring = ring = BufferRing(workers, 4 + 2) if pinned and getattr(dataset.ds, "batches_crops", False) \
            else None
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=MicroBatches(state.step, n_steps, plan, ctx.rank), collate_fn=collate,
        num_workers=workers, pin_memory=pin_memory and not workers, persistent_workers=False,
        prefetch_factor=4 if workers else None)
    if pinned:
        return PinnedBatches(iter(loader), threads=min(4, max(1, workers // 2)), device=ctx.device, ring=ring)
    return iter(loader)


def lr_scheduler(optimizer: torch.optim.Optimizer, n_steps: int, spec: RunSpec):
    """The spec's LR schedule over ``n_steps`` (see :func:`study.run_math.lr_factor`)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, n_steps, spec))


def wrap_ddp(model: nn.Module, ctx: DistContext) -> nn.Module:
    """``model`` in DDP when the run is distributed, else itself."""
    if not ctx.is_distributed:
        return model
    return nn.parallel.DistributedDataParallel(model, device_ids=[ctx.device.index] if ctx.device.type != "cpu"
                                               else None)


# --------------------------------------------------------------------------------------------------
# checkpoints and the step loop
# --------------------------------------------------------------------------------------------------
def restore(state: LoopState, resume_from, spec: RunSpec, ctx: DistContext, **objects) -> None:
    """Load checkpoint ``resume_from`` (if any) into ``objects`` (model, optimizer, scheduler, ds_engine) and
    the fields of ``state`` it holds; refuse a checkpoint of another run."""
    if resume_from is None:
        return
    loaded = ckpt.load_checkpoint(resume_from, rank=ctx.rank, map_location=ctx.device, **objects)
    if loaded.get("run_id") not in (None, spec.run_id):
        raise ckpt.CheckpointError(f"checkpoint {resume_from} belongs to run {loaded.get('run_id')}, "
                                   f"not {spec.run_id}")
    state.load(loaded)
    state.last_checkpoint = str(resume_from)


def checkpoint_saver(run_dir, spec: RunSpec, ctx: DistContext, state: LoopState,
                     **objects) -> Callable[[int], str | None]:
    """``save(step)``: a complete checkpoint under ``run_dir/checkpoints`` (None without ``run_dir``), then
    retention (the last ``spec.keep_last``, plus ``state.best_checkpoint`` when ``spec.keep_best``)."""
    root = Path(run_dir) / "checkpoints" if run_dir is not None else None
    barrier = _barrier(ctx)

    def save(step: int) -> str | None:
        if root is None:
            return None
        path = ckpt.save_checkpoint(ckpt.step_dir(root, step), rank=ctx.rank, barrier=barrier,
                                    state={**state.to_dict(), "run_id": spec.run_id, "spec": spec.to_dict()}, **objects)
        state.last_checkpoint = str(path)
        if ctx.is_main:
            best = getattr(state, "best_checkpoint", None) if spec.keep_best else None
            ckpt.apply_retention(root, keep_last=spec.keep_last, best=Path(best) if best else None)
        return str(path)

    return save


@contextlib.contextmanager
def manual_gc(every: int):
    """Python's automatic garbage collector off for the block when ``every`` > 0 (the loop then collects
    every ``every`` steps, see ``RunSpec.gc_every``). Objects alive on entry (modules, datasets, the
    launcher's state) are frozen out of later collections, which keeps each one short; both are undone
    on exit, so a reused trial process gets its collector back."""
    if every <= 0:
        yield
        return
    was_enabled = gc.isenabled()
    gc.collect()
    gc.freeze()
    gc.disable()
    try:
        yield
    finally:
        gc.unfreeze()
        if was_enabled:
            gc.enable()


def run_steps(spec: RunSpec, ctx: DistContext, plan: BatchPlan, n_steps: int, *, state: LoopState,
              batches: Iterator[dict[str, Any]], trainee: Trainee, objective: Objective, meter: Meter,
              reporter: Reporter, should_stop: Callable[[], bool] | None = None) -> tuple[str, dict[str, Any]]:
    """The optimizer-step loop (see :func:`_run_steps`), under ``RunSpec.gc_every``'s collector policy."""
    with manual_gc(spec.gc_every):
        return _run_steps(spec, ctx, plan, n_steps, state=state, batches=batches, trainee=trainee,
                          objective=objective, meter=meter, reporter=reporter, should_stop=should_stop)


def _run_steps(spec: RunSpec, ctx: DistContext, plan: BatchPlan, n_steps: int, *, state: LoopState,
               batches: Iterator[dict[str, Any]], trainee: Trainee, objective: Objective, meter: Meter,
               reporter: Reporter, should_stop: Callable[[], bool] | None) -> tuple[str, dict[str, Any]]:
    """The optimizer-step loop of pre-training and fine-tuning, from ``state.step`` to ``n_steps``.

    Per step: this rank's micro-batches (``objective.forward_loss(batch) -> (loss, tokens)`` each; gradient
    accumulation with DDP's ``no_sync`` or DeepSpeed's engine), clipping / gradient norm, the optimizer and
    the LR scheduler. ``state`` (``step``, ``samples_seen``, ``tokens_seen``, ``wall_time_s``, ``skipped``
    and, when ``meter.flops_per_sample`` is given, ``flops`` of a :class:`PretrainState`) is updated in place.
    ``reporter.log`` every ``spec.log_every`` steps; ``objective.on_eval(step, metrics, checkpoint_due)`` at each
    evaluation or checkpoint step returns the row that becomes the latest metrics. Returns
    ``("finished" | "stopped", metrics)``; on ``"stopped"`` (``should_stop()`` turned true) the caller saves
    and reports.

    The summed loss and token count stay on the device between log/evaluation/checkpoint steps: a host
    read every step would stall an accelerator while the next step's Python runs. Divergence is therefore
    detected at the next flush (at most ``log_every`` steps late); ``train_loss`` is the flushed steps' mean.
    """
    net, optimizer, scheduler, engine, params = (trainee.net, trainee.optimizer, trainee.scheduler,
                                                 trainee.engine, trainee.params)
    forward_loss, on_eval = objective.forward_loss, objective.on_eval
    t_start, tokens_per_sample = meter.t_start, meter.tokens_per_sample
    flops_per_sample, peak = meter.flops_per_sample, meter.peak
    device = ctx.device
    step = state.step
    pending = torch.zeros(2, device=device, dtype=torch.float64)
    pending_steps = 0

    def flush() -> float:
        nonlocal pending, pending_steps
        reduced = all_reduce_sum(pending, ctx).cpu()
        loss = float(reduced[0]) / (max(pending_steps, 1) * plan.accumulation * ctx.world_size)
        state.tokens_seen += int(round(float(reduced[1])))
        pending, pending_steps = torch.zeros_like(pending), 0
        if not math.isfinite(loss):
            raise TrainingDiverged(step, loss, state.last_checkpoint)
        return loss

    window_t0, window_samples = time.perf_counter(), 0
    wall_offset = state.wall_time_s - (time.perf_counter() - t_start)
    metrics: dict[str, Any] = {}
    ddp = isinstance(net, nn.parallel.DistributedDataParallel)
    # DeepSpeed ZeRO-0 leaves clipping to us (deepspeed_config): after the boundary micro-step's backward,
    # which all-reduced the gradients, and before the engine's optimizer step
    own_clip = engine is not None and spec.zero_stage == 0
    while step < n_steps:
        if should_stop is not None and should_stop():
            if pending_steps:
                metrics = {**metrics, "train_loss": flush()}
            return "stopped", metrics
        net.train()
        n_micro = plan.accumulation
        loss_sum = torch.zeros((), device=device, dtype=torch.float64)
        tokens = torch.zeros((), device=device, dtype=torch.float64)
        for a in range(n_micro):
            batch = next(batches)
            if batch["skipped"]:
                state.skipped += len(batch["skipped"])
                for msg in batch["skipped"]:
                    reporter.log({"step": step, "bad_data_skipped": msg})
            sync_ctx = net.no_sync() if ddp and a < n_micro - 1 else contextlib.nullcontext()
            with sync_ctx:
                with record_function("neurox.forward"):
                    loss, n_tokens = forward_loss(batch)
                if engine is not None:
                    with record_function("neurox.backward"):
                        engine.backward(loss)
                    if own_clip and a == n_micro - 1:
                        grad_norm = clip_gradients(params, spec.grad_clip)
                    with record_function("neurox.engine_step"):
                        engine.step()  # DeepSpeed counts micro-steps and updates only at the boundary
                else:
                    with record_function("neurox.backward"):
                        (loss / plan.accumulation).backward()
            loss_sum += loss.detach().double()
            tokens += n_tokens
        # the run's base LR times the schedule at this step: under muP, MuAdamW divides the matrix-like
        # groups' LR by their width multiplier, so no param group's LR is the run's LR (the µTransfer
        # analysis fits the base LR, stored as ``lr``/``base_lr`` in every row; this column never shadows it)
        lr_step = spec.lr * lr_factor(step, n_steps, spec)
        with record_function("neurox.optimizer_step"):
            if engine is not None:
                if not own_clip:
                    grad_norm = engine.get_global_grad_norm()
                    grad_norm = grad_norm if grad_norm is not None else float("nan")
            else:
                grad_norm = clip_gradients(params, spec.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
        pending += torch.stack([loss_sum, tokens])
        pending_steps += 1
        step += 1
        if spec.gc_every and step % spec.gc_every == 0:
            gc.collect()  # every rank at the same step: one short common pause instead of one per rank
        state.step = step
        state.samples_seen += plan.global_batch
        if flops_per_sample is not None:
            state.flops += plan.global_batch * flops_per_sample
        window_samples += plan.global_batch
        ckpt_due = bool(spec.checkpoint_every) and step % spec.checkpoint_every == 0
        eval_due = step % spec.eval_every == 0 or step == n_steps or ckpt_due
        log_due = step % spec.log_every == 0 or step == n_steps
        if log_due or eval_due:
            train_loss = flush()
        now = time.perf_counter()
        state.wall_time_s = wall_offset + (now - t_start)
        if log_due:
            sps = window_samples / max(now - window_t0, 1e-9)
            metrics = {"step": step, "train_loss": train_loss, "lr_step": lr_step, "grad_norm": float(grad_norm),
                       "samples_seen": state.samples_seen, "tokens_seen": state.tokens_seen,
                       "samples_per_s": sps, "tokens_per_s": sps * tokens_per_sample,
                       "wall_time_s": state.wall_time_s}
            if flops_per_sample is not None:
                metrics["flops"] = state.flops
                if peak:
                    metrics["mfu"] = sps * flops_per_sample / (peak * ctx.world_size)
            reporter.log(metrics)
            window_t0, window_samples = now, 0
        if eval_due:
            metrics = on_eval(step, {**metrics, "step": step, "train_loss": train_loss}, ckpt_due)
    return "finished", metrics


def clip_gradients(params: list[nn.Parameter], max_norm: float) -> torch.Tensor | float:
    """Global gradient 2-norm (a device tensor: no host read), clipped to ``max_norm`` when it is > 0."""
    if max_norm > 0:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    grads = [p.grad.detach().norm() for p in params if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(grads)) if grads else 0.0


def deepspeed_engine(spec: RunSpec, ctx: DistContext, plan: BatchPlan, model, optimizer, scheduler):
    import deepspeed

    if ctx.device.type == "cpu":
        # DeepSpeed JIT-compiles a shared-memory all-reduce for CPU ranks on first use (minutes of C++
        # build); gloo is fast enough for CPU runs, so mark the op unavailable. DeepSpeed keeps this dict
        # for the process on purpose ("edits to it persist").
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    config = deepspeed_config(spec, plan, ctx.device.type)
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        deepspeed.init_distributed(dist_backend=ctx.backend)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=config, dist_init_required=False)
    return engine


def deepspeed_config(spec: RunSpec, plan: BatchPlan, device_type: str) -> dict[str, Any]:
    """The DeepSpeed config of a run: generated from the spec, ``spec.deepspeed_config`` merged over it, and
    the batch plan and ZeRO stage always the spec's (an override of those keys is ignored)."""
    use_bf16 = spec.precision == "bf16" or (spec.precision == "auto" and device_type in ("cuda", "xpu"))
    config = {
        # ZeRO-0: the step loop clips (run_steps): DeepSpeed's own clip_grad_norm_ builds two CUDA tensors from
        # Python lists per step (each a host-device sync) and leaves the engine's grad norm unset
        "gradient_clipping": 0.0 if spec.zero_stage == 0 else spec.grad_clip,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
        # keep fp32 master weights and autocast like DDP, so ZeRO runs match DDP numerics
        "torch_autocast": {"enabled": use_bf16, "dtype": "bfloat16"},
        "zero_allow_untested_optimizer": True,
    }
    if spec.deepspeed_config:
        config = merge_config(config, json.loads(spec.deepspeed_config))
    return merge_config(config, {"train_batch_size": plan.global_batch,
                                 "train_micro_batch_size_per_gpu": plan.micro_batch,
                                 "gradient_accumulation_steps": plan.accumulation,
                                 "zero_optimization": {"stage": spec.zero_stage}})


def merge_config(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``extra`` merged in recursively (``extra`` wins; nested dicts merge key by key)."""
    out = dict(base)
    for k, v in extra.items():
        out[k] = merge_config(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

