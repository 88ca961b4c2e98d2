"""Checkpoints that resume exactly, a retention policy, and consolidated weight export.

Layout of one checkpoint directory (``.../step_000120``)::

    trainer_state.json     step, samples/tokens/FLOPs seen, wall time, best validation loss, spec
    rng_rank{r}.pt         python / numpy / torch (CPU, CUDA, XPU) RNG states of every rank, as tensors and
                           plain types only (format ``neurox-rng-v2``)
    model.pt optim.pt sched.pt       (DDP / single process: written by rank 0)
    ds/                    DeepSpeed's own per-rank checkpoint (model, optimizer and ZeRO shards)
    COMPLETE               written last: a directory without it is never trusted by a resume; it lists every
                           file the saving rank wrote with its size (``neurox-complete-v1``), so a copy of the
                           directory cut short (Ray Train persists checkpoints with a multi-threaded copy, in no
                           particular order) is not trusted either

Exports are world-size independent: one ``.safetensors`` file (ZeRO shards gathered) whose metadata
holds the model config, the run spec and the muP base width, loadable on any number of devices.

Loading never runs code from a file: a run resumes automatically from shared project storage, where another
user may be able to plant a file. Every ``.pt`` file is read with ``torch.load(weights_only=True)`` (tensors,
dicts, lists, tuples, numbers, strings, None), plus, for RNG files written before the ``neurox-rng-v2``
format, numpy's array reconstruction for uint32 arrays (:data:`LEGACY_RNG_GLOBALS`). A file that needs
anything else raises :class:`CheckpointError` naming the file and what it asked for. DeepSpeed's own
checkpoint files go through the same check (:func:`_check_ds_files`) before DeepSpeed reads them.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import pickle
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


COMPLETE_FORMAT = "neurox-complete-v1"


def is_complete(path: str | os.PathLike) -> bool:
    """The directory holds a whole checkpoint: its marker, its trainer state, and every file the marker lists
    at its recorded size (markers written before the list existed, ``ok``, are trusted as before)."""
    path = Path(path)
    try:
        text = (path / COMPLETE).read_text()
    except OSError:
        return False
    if not (path / STATE_FILE).exists():
        return False
    try:
        manifest = json.loads(text)
    except ValueError:
        return True  # a legacy "ok" marker
    if not isinstance(manifest, dict) or manifest.get("format") != COMPLETE_FORMAT:
        return True
    for name, size in manifest.get("files", {}).items():
        try:
            if (path / name).stat().st_size != size:
                return False
        except OSError:
            return False
    return True


def mark_complete(path: str | os.PathLike) -> Path:
    """Write ``path``'s COMPLETE marker (atomically): every file under it, the marker excepted, with its size.
    The list guards against a copy cut short, not against tampering: whoever can write the directory can
    rewrite the list too (loading is guarded separately: weights-only, see the module docstring)."""
    path = Path(path)
    files = {str(f.relative_to(path)): f.stat().st_size for f in sorted(path.rglob("*"))
             if f.is_file() and f.name != COMPLETE and not f.name.endswith(".tmp")}
    _atomic_write_text(path / COMPLETE, json.dumps({"format": COMPLETE_FORMAT, "files": files}, indent=1))
    return path / COMPLETE


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


RNG_FORMAT = "neurox-rng-v2"


def _xpu_available() -> bool:
    return hasattr(torch, "xpu") and torch.xpu.is_available()


def rng_state() -> dict[str, Any]:
    """This process's RNG states as tensors and plain types (loadable with ``weights_only=True``).

    Python's Mersenne Twister (624 words + position) and numpy's (``MT19937`` key, position, cached Gaussian)
    are stored as int64 tensors plus numbers; torch's CPU, CUDA and XPU generator states are byte tensors.
    """
    version, words, gauss = random.getstate()
    kind, key, pos, has_gauss, cached = np.random.get_state()
    state = {"format": RNG_FORMAT,
             "python": {"version": int(version), "state": torch.tensor(words, dtype=torch.int64),
                        "gauss_next": gauss},
             "numpy": {"kind": str(kind), "key": torch.from_numpy(np.asarray(key, dtype=np.int64)),
                       "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if _xpu_available():
        state["xpu"] = torch.xpu.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore states saved by :func:`rng_state` (or the pre-v2 format: Python tuple, numpy tuple)."""
    py, npy = state["python"], state["numpy"]
    if isinstance(py, dict):
        random.setstate((py["version"], tuple(int(w) for w in py["state"].tolist()), py["gauss_next"]))
    else:  # pre-v2: random.getstate() as is
        random.setstate(py)
    if isinstance(npy, dict):
        np.random.set_state((npy["kind"], npy["key"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                             npy["cached_gaussian"]))
    else:  # pre-v2: np.random.get_state() as is
        np.random.set_state(npy)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "xpu" in state and _xpu_available():
        torch.xpu.set_rng_state_all(state["xpu"])


def _numpy_array_globals() -> list:
    """What unpickling a plain numpy array needs (numpy 1 and 2 name the module differently)."""
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct
    return [_reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


#: extra globals a pre-v2 RNG file (numpy's MT19937 key as a uint32 ndarray) may use; constructors of plain
#: arrays and dtypes, not callables that run code
LEGACY_RNG_GLOBALS = _numpy_array_globals()


def safe_load(path: str | os.PathLike, *, map_location: Any = "cpu", extra_globals: list | None = None) -> Any:
    """``torch.load(path, weights_only=True)``: tensors and plain types (plus ``extra_globals``) only.

    Raises
    ------
    CheckpointError
        When the file needs anything else (an object whose unpickling could run code): names the file and
        the globals it asked for; nothing from it is executed.
    """
    path = Path(path)
    try:
        with torch.serialization.safe_globals(list(extra_globals or [])):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        try:
            wanted = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception:  # not a zip checkpoint: the unpickler's own message says what it met
            wanted = []
        allowed = {f"{g.__module__}.{g.__qualname__}" for g in (extra_globals or [])}
        wanted = [g for g in wanted if g not in allowed]
        what = f"it asks for {', '.join(wanted)}" if wanted else str(exc).strip().splitlines()[0]
        raise CheckpointError(f"refusing to load {path}: it needs more than tensors and plain types ({what}); "
                              "loading it could run code planted in it. Checkpoints written by NeuroX never "
                              "need that: was this file replaced?") from exc


def _deepspeed_globals() -> list:
    """Plain-data classes DeepSpeed pickles into its ZeRO optimizer files (an enum, a dataclass, the loss
    scaler's attributes); nothing else is allowed while DeepSpeed reads a checkpoint."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


@contextlib.contextmanager
def _weights_only_everywhere(allowed: list, where: Path):
    """Force ``weights_only=True`` on every ``torch.load`` inside (DeepSpeed passes ``weights_only=False``),
    allowing ``allowed`` besides tensors and plain types; an unpickling error names ``where``."""
    key = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
    old = os.environ.get(key)
    os.environ[key] = "1"
    try:
        with torch.serialization.safe_globals(allowed):
            yield
    except pickle.UnpicklingError as exc:
        raise CheckpointError(f"refusing to load the DeepSpeed checkpoint {where}: a file needs more than tensors, "
                              f"plain types and {[g.__name__ for g in allowed]} "
                              f"({str(exc).strip().splitlines()[0]}); loading it could run code planted in it") from exc
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old


def _check_ds_files(ds_dir: Path, allowed: list) -> None:
    """Name the first DeepSpeed file that needs globals beyond ``allowed`` (read without unpickling)."""
    names = {f"{g.__module__}.{g.__qualname__}" for g in allowed}
    for f in sorted(ds_dir.rglob("*.pt")):
        try:
            wanted = [g for g in torch.serialization.get_unsafe_globals_in_checkpoint(f) if g not in names]
        except Exception as exc:  # not a zip archive, truncated, ...
            raise CheckpointError(f"cannot read DeepSpeed checkpoint file {f}: {exc}") from exc
        if wanted:
            raise CheckpointError(f"refusing to load {f}: it needs more than tensors and plain types (it asks for "
                                  f"{', '.join(wanted)}); loading it could run code planted in it. Checkpoints "
                                  "written by NeuroX never need that: was this file replaced?")


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
        mark_complete(path)
    barrier()
    return path


def load_trainer_state(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not is_complete(path):
        raise CheckpointError(f"checkpoint {path} is incomplete (no {COMPLETE} marker, no {STATE_FILE}, or a file "
                              f"missing or of another size than the marker lists): refusing to resume from it")
    return json.loads((path / STATE_FILE).read_text())


def load_checkpoint(path: str | os.PathLike, *, rank: int, model=None, optimizer=None, scheduler=None,
                    ds_engine=None, map_location="cpu") -> dict[str, Any]:
    """Restore model, optimizer, scheduler and this rank's RNG; returns the trainer state."""
    path = Path(path)
    state = load_trainer_state(path)
    if ds_engine is not None:
        allowed = _deepspeed_globals()
        _check_ds_files(path / "ds", allowed)
        with _weights_only_everywhere(allowed, path / "ds"):
            load_path, _ = ds_engine.load_checkpoint(str(path / "ds"), tag="ds")
        if load_path is None:
            raise CheckpointError(f"DeepSpeed found no checkpoint under {path / 'ds'}")
    else:
        model.load_state_dict(safe_load(path / "model.pt", map_location=map_location))
        optimizer.load_state_dict(safe_load(path / "optim.pt", map_location=map_location))
        scheduler.load_state_dict(safe_load(path / "sched.pt", map_location=map_location))
    rng_file = path / f"rng_rank{rank}.pt"
    if rng_file.exists():
        set_rng_state(safe_load(rng_file, extra_globals=LEGACY_RNG_GLOBALS))
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

        allowed = _deepspeed_globals()
        _check_ds_files(path / "ds", allowed)
        with _weights_only_everywhere(allowed, path / "ds"):
            return get_fp32_state_dict_from_zero_checkpoint(str(path / "ds"), tag="ds")
    if (path / "model.pt").exists():
        return safe_load(path / "model.pt")
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
