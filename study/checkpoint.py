"""Checkpoints that resume exactly, a retention policy, and consolidated weight export.

Layout of one checkpoint directory (``.../step_000120``)::

    trainer_state.json     step, samples/tokens/FLOPs seen, wall time, best validation loss, spec
    rng_rank{r}.pt         python / numpy / torch (CPU and device) RNG states of every rank
    model.pt optim.pt sched.pt       (DDP / single process: written by rank 0)
    ds/                    DeepSpeed's own per-rank checkpoint (model, optimizer and ZeRO shards)
    COMPLETE               written last: a directory without it is never trusted by a resume

Exports are world-size independent: one ``.safetensors`` file (ZeRO shards gathered) whose metadata
holds the model config, the run spec and the muP base width, loadable on any number of devices.
"""
from __future__ import annotations

import dataclasses
import errno
import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

STATE_FILE = "trainer_state.json"
COMPLETE = "COMPLETE"
_STEP_RE = re.compile(r"^step_(\d+)$")
#: Below this many free bytes a failed write is reported as a full disk.
_FULL_BYTES = 1 << 20


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or belongs to another model."""


def step_dir(root: str | os.PathLike, step: int) -> Path:
    return Path(root) / f"step_{step:07d}"


def is_complete(path: str | os.PathLike) -> bool:
    return (Path(path) / COMPLETE).exists() and (Path(path) / STATE_FILE).exists()


def list_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = _STEP_RE.match(p.name)
        if m and is_complete(p):
            out.append((int(m.group(1)), p))
    return [p for _, p in sorted(out)]


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    ckpts = list_checkpoints(root)
    return ckpts[-1] if ckpts else None


def checkpoint_step(path: str | os.PathLike) -> int | None:
    """The step recorded in a checkpoint directory's trainer state (``None`` if it cannot be read)."""
    try:
        return int(json.loads((Path(path) / STATE_FILE).read_text())["step"])
    except (OSError, ValueError, KeyError):
        return None


#: subdirectory of a run's storage (``<storage>/<run_id>``) where inline trials keep their run directory
INLINE_DIR = "inline"


def resume_point(run_storage: str | os.PathLike | None, stored_steps: set[int] | None = None) -> Path | None:
    """The newest complete checkpoint of a run in a study's storage: the ones an inline trial wrote
    (``<run_storage>/inline/checkpoints/step_*``) and the ones Ray Train persisted (``<run_storage>/checkpoint_*``),
    so a study rerun with the other launcher continues the run instead of restarting it.

    ``stored_steps`` (the steps whose result row is in the store) excludes checkpoints whose row was never
    written: a checkpoint is complete before its evaluation row is appended, so a process killed in between
    would otherwise resume past a row it never stored (seen in the inline SIGKILL fault test). The run then
    resumes from an earlier checkpoint (or the start) and re-emits that row with the same numbers."""
    if not run_storage:
        return None
    root = Path(run_storage)
    # directories of either name: our step_* and Ray Train's checkpoint_<time> copies; each state file read once
    found = list_checkpoints(root / INLINE_DIR / "checkpoints") + sorted(root.glob("checkpoint_*"))
    steps = [(checkpoint_step(c), c) for c in found if is_complete(c)]
    steps = [(s, c) for s, c in steps if s is not None and (stored_steps is None or s in stored_steps)]
    return max(steps, key=lambda sc: sc[0])[1] if steps else None


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _atomic_write(path: Path, write) -> None:
    """Write through a Python file object (so a full disk raises ``OSError`` ENOSPC, not a C++ stream
    error), fsync, rename; on failure remove the temporary file and raise :class:`CheckpointError`."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:
        why = str(exc)
        try:  # torch's zip writer hides ENOSPC behind "unexpected pos": say so when the disk is full
            free = shutil.disk_usage(path.parent).free
            if getattr(exc, "errno", None) == errno.ENOSPC or free < _FULL_BYTES:
                why = f"{os.strerror(errno.ENOSPC)}, {free} bytes free ({exc})"
        except OSError:
            pass
        try:
            tmp.unlink()
        except OSError:
            pass
        raise CheckpointError(f"cannot write checkpoint file {path}: {why}") from exc


def _atomic_torch_save(obj: Any, path: Path) -> None:
    _atomic_write(path, lambda fh: torch.save(obj, fh))


def _atomic_write_text(path: Path, text: str) -> None:
    _atomic_write(path, lambda fh: fh.write(text.encode()))


def save_checkpoint(path: str | os.PathLike, *, rank: int, barrier, state: dict[str, Any],
                    model: torch.nn.Module | None = None, optimizer=None, scheduler=None,
                    ds_engine=None) -> Path:
    """Save a checkpoint from every rank (collective: all ranks must call it).

    Writes files under a directory and marks it complete only after every rank has written, so an
    interrupted save (a killed worker, a full disk) leaves a directory that :func:`list_checkpoints`
    ignores.
    """
    path = Path(path)
    try:
        return _save_checkpoint(path, rank=rank, barrier=barrier, state=state, model=model,
                                optimizer=optimizer, scheduler=scheduler, ds_engine=ds_engine)
    except (OSError, RuntimeError) as exc:  # a full disk, a vanished mount: name the fallback
        previous = [p for p in list_checkpoints(path.parent) if p != path]
        raise CheckpointError(f"saving checkpoint {path} failed ({exc}); it is left without a {COMPLETE} marker "
                              f"and will not be resumed from; last complete checkpoint: "
                              f"{previous[-1] if previous else 'none'}") from exc


def _save_checkpoint(path: Path, *, rank: int, barrier, state, model, optimizer, scheduler, ds_engine) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    marker = path / COMPLETE
    if rank == 0 and marker.exists():
        marker.unlink()
    barrier()
    if ds_engine is not None:
        ds_engine.save_checkpoint(str(path / "ds"), tag="ds", client_state={})
    elif rank == 0:
        _atomic_torch_save(model.state_dict(), path / "model.pt")
        _atomic_torch_save(optimizer.state_dict(), path / "optim.pt")
        _atomic_torch_save(scheduler.state_dict(), path / "sched.pt")
    _atomic_torch_save(rng_state(), path / f"rng_rank{rank}.pt")
    barrier()
    if rank == 0:
        _atomic_write_text(path / STATE_FILE, json.dumps(state, indent=1, default=str))
        _atomic_write_text(marker, "ok\n")
    barrier()
    return path


def load_trainer_state(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not is_complete(path):
        raise CheckpointError(f"checkpoint {path} is incomplete (no {COMPLETE} marker): refusing to resume from it")
    return json.loads((path / STATE_FILE).read_text())


def load_checkpoint(path: str | os.PathLike, *, rank: int, model=None, optimizer=None, scheduler=None,
                    ds_engine=None, map_location="cpu") -> dict[str, Any]:
    """Restore model, optimizer, scheduler and this rank's RNG; returns the trainer state."""
    path = Path(path)
    state = load_trainer_state(path)
    if ds_engine is not None:
        load_path, _ = ds_engine.load_checkpoint(str(path / "ds"), tag="ds")
        if load_path is None:
            raise CheckpointError(f"DeepSpeed found no checkpoint under {path / 'ds'}")
    else:
        model.load_state_dict(torch.load(path / "model.pt", map_location=map_location, weights_only=True))
        optimizer.load_state_dict(torch.load(path / "optim.pt", map_location=map_location, weights_only=False))
        scheduler.load_state_dict(torch.load(path / "sched.pt", map_location=map_location, weights_only=False))
    rng_file = path / f"rng_rank{rank}.pt"
    if rng_file.exists():
        set_rng_state(torch.load(rng_file, map_location="cpu", weights_only=False))
    return state


def apply_retention(root: str | os.PathLike, *, keep_last: int, best: Path | None = None) -> list[Path]:
    """Delete complete checkpoints except the ``keep_last`` newest and ``best``; also incomplete leftovers
    older than the newest complete one. Returns what was deleted."""
    root = Path(root)
    ckpts = list_checkpoints(root)
    keep = set(ckpts[-keep_last:]) if keep_last > 0 else set()
    if best is not None:
        keep.add(Path(best))
    deleted = []
    for p in ckpts:
        if p not in keep:
            shutil.rmtree(p, ignore_errors=True)
            deleted.append(p)
    if ckpts:
        newest = int(_STEP_RE.match(ckpts[-1].name).group(1))
        for p in root.iterdir():
            m = _STEP_RE.match(p.name)
            if m and int(m.group(1)) < newest and not is_complete(p):
                shutil.rmtree(p, ignore_errors=True)
                deleted.append(p)
    return deleted


# --------------------------------------------------------------------------------------------------
# consolidated export
# --------------------------------------------------------------------------------------------------
def _config_to_json(cfg: Any) -> str:
    return json.dumps(dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else dict(cfg), default=list)


def consolidated_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Full fp32 model state from a checkpoint directory, whatever the world size or ZeRO stage."""
    path = Path(path)
    if (path / "ds").is_dir():
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(path / "ds"), tag="ds")
    if (path / "model.pt").exists():
        return torch.load(path / "model.pt", map_location="cpu", weights_only=True)
    raise CheckpointError(f"{path} holds neither model.pt nor a DeepSpeed checkpoint")


def export_weights(checkpoint: str | os.PathLike, out_file: str | os.PathLike, *, model_config: Any,
                   spec_json: str, mup_base_width: int | None = None) -> Path:
    """Write one world-size-independent ``.safetensors`` file with config, spec and muP base width."""
    from safetensors.torch import save_file

    sd = consolidated_state_dict(checkpoint)
    sd = {k.removeprefix("module."): v.detach().float().contiguous() for k, v in sd.items()}
    meta = {"model_config": _config_to_json(model_config), "spec": spec_json,
            "mup_base_width": json.dumps(mup_base_width), "format": "neurox-weights-v1"}
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_file.with_name(out_file.name + ".tmp")
    save_file(sd, str(tmp), metadata=meta)
    os.replace(tmp, out_file)
    return out_file


def load_exported(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """State dict and metadata (``model_config``, ``spec`` as dicts) of an exported weights file."""
    from safetensors import safe_open

    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"weights file {path} does not exist")
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata() or {}
        if meta.get("format") != "neurox-weights-v1":
            raise CheckpointError(f"{path} is not a NeuroX weights export (format={meta.get('format')!r})")
        sd = {k: fh.get_tensor(k) for k in fh.keys()}
    info = {"model_config": json.loads(meta["model_config"]), "spec": json.loads(meta["spec"]),
            "mup_base_width": json.loads(meta.get("mup_base_width", "null"))}
    return sd, info
