"""One device layer for CUDA (NCCL), Intel XPU (native ``torch.xpu``, xccl/oneCCL) and CPU (gloo).

The launchers call :func:`select_device` and :func:`collective_env` and build a :class:`DistContext`
that :func:`study.train.train` receives; the train function never asks where it runs.

XPU notes (Aurora): under Ray every worker sees only its own tile through ``ZE_AFFINITY_MASK`` (Ray
sets it per worker, like ``CUDA_VISIBLE_DEVICES``), so the local device index is always 0. oneCCL,
started without its own launcher, needs ``CCL_PROCESS_LAUNCHER=none`` and ``CCL_LOCAL_RANK`` /
``CCL_LOCAL_SIZE`` per rank. ``intel-extension-for-pytorch`` is imported only when native
``torch.xpu`` is missing (torch < 2.5).
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from typing import Mapping

import torch

#: Dense bf16 peak FLOP/s per device (datasheet), for MFU. Keyed by a substring of the device name.
PEAK_BF16_FLOPS: dict[str, float] = {
    "H200": 989e12,
    "H100": 989e12,  # SXM; the PCIe card is lower (756e12)
    "A100": 312e12,
    "Max 1550": 419e12,  # per tile (two tiles per Intel Data Center GPU Max 1550 at 838 TFLOP/s)
    "L40S": 362e12,
}


def xpu_available() -> bool:
    """True when an Intel GPU is usable through native ``torch.xpu`` (or IPEX on old torch)."""
    xpu = getattr(torch, "xpu", None)
    if xpu is None:
        try:  # pragma: no cover - only on old stacks with IPEX
            importlib.import_module("intel_extension_for_pytorch")
            xpu = getattr(torch, "xpu", None)
        except ImportError:
            return False
    try:
        return bool(xpu is not None and xpu.is_available())
    except Exception:  # pragma: no cover
        return False


def detect_device_kind(prefer: str | None = None) -> str:
    """Pick ``cuda``, ``xpu`` or ``cpu``: ``prefer`` (or ``$NEUROX_DEVICE``) wins when given and available."""
    prefer = prefer or os.environ.get("NEUROX_DEVICE")
    available = {"cuda": torch.cuda.is_available(), "xpu": xpu_available(), "cpu": True}
    if prefer:
        if prefer not in available:
            raise ValueError(f"device={prefer!r}; allowed: 'cuda', 'xpu', 'cpu'")
        if not available[prefer]:
            raise RuntimeError(f"device {prefer!r} was requested but is not available on this machine")
        return prefer
    for kind in ("cuda", "xpu"):
        if available[kind]:
            return kind
    return "cpu"


def gpu_kind(env: dict[str, str] | None = None) -> str:
    """The accelerator a GPU plan runs on, decided where no accelerator may be visible (a trial driver holds
    none, so Ray hides them from it): ``$NEUROX_DEVICE`` if it names one, ``xpu`` when
    ``$NEUROX_DIST_BACKEND`` is ``xccl`` (both set by ``pbs/profiles/aurora.sh``), else ``cuda``."""
    env = os.environ if env is None else env
    named = env.get("NEUROX_DEVICE", "")
    if named in ("cuda", "xpu"):
        return named
    if named and named != "cpu":
        raise ValueError(f"NEUROX_DEVICE={named!r}; allowed: 'cuda', 'xpu', 'cpu'")
    return "xpu" if env.get("NEUROX_DIST_BACKEND") in ("xccl", "ccl") else "cuda"


def rocm_visible_env(environ: Mapping[str, str]) -> dict[str, str | None]:
    """Device-visibility changes a node needs before Ray starts on AMD GPUs under ROCm (value None: unset it).

    ROCm torch (HIP) reports the GPUs (MI250X: one device per GCD) as ``cuda`` and RCCL answers to the ``nccl``
    backend, so selection is CUDA's: Ray gives each worker its devices and the index is 0 (:func:`select_device`).
    Visibility has three layers: ROCr's ``ROCR_VISIBLE_DEVICES`` (set by Slurm's ``--gpu-bind``) filters first,
    ``HIP_VISIBLE_DEVICES`` indexes what ROCr left, and HIP honours ``CUDA_VISIBLE_DEVICES`` as well. Ray sets
    ``HIP_VISIBLE_DEVICES`` per worker but refuses to start when only ``ROCR_VISIBLE_DEVICES`` is set; so with
    ROCr's list alone, HIP's becomes ``0..n-1`` (all of ROCr's, renumbered), and a ``CUDA_VISIBLE_DEVICES`` is
    unset (it would filter a second time). ``pbs/profiles/frontier.sh`` applies the same rule in bash.

    Pure function (returns what to change; callers apply it), so it is unit-testable without hardware.
    """
    out: dict[str, str | None] = {}
    rocr = [d for d in environ.get("ROCR_VISIBLE_DEVICES", "").split(",") if d.strip()]
    if rocr and not environ.get("HIP_VISIBLE_DEVICES"):
        out["HIP_VISIBLE_DEVICES"] = ",".join(str(i) for i in range(len(rocr)))
    if "CUDA_VISIBLE_DEVICES" in environ:
        out["CUDA_VISIBLE_DEVICES"] = None
    return out


def backend_for(kind: str) -> str:
    """torch.distributed backend for a device kind."""
    return {"cuda": "nccl", "xpu": "xccl", "cpu": "gloo"}[kind]


def select_device(kind: str, local_rank: int, *, isolated: bool) -> torch.device:
    """The torch device of this rank.

    ``isolated`` means the launcher already restricted visibility to one device per worker (Ray sets
    ``CUDA_VISIBLE_DEVICES`` / ``ZE_AFFINITY_MASK``), so the device index is 0; otherwise (torchrun)
    it is ``local_rank``.
    """
    if kind == "cpu":
        return torch.device("cpu")
    index = 0 if isolated else local_rank
    dev = torch.device(kind, index)
    getattr(torch, kind).set_device(dev)
    return dev


def collective_env(kind: str, *, local_rank: int, local_world_size: int,
                   environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment variables a rank needs before ``init_process_group`` on ``kind``.

    Pure function (returns what to set; callers apply it), so it is unit-testable without hardware.
    """
    environ = os.environ if environ is None else environ
    env: dict[str, str] = {}
    if kind == "xpu":
        env["CCL_PROCESS_LAUNCHER"] = "none"
        env["CCL_LOCAL_RANK"] = str(local_rank)
        env["CCL_LOCAL_SIZE"] = str(local_world_size)
        env.setdefault("CCL_ATL_TRANSPORT", environ.get("CCL_ATL_TRANSPORT", "mpi"))
        env["ZE_FLAT_DEVICE_HIERARCHY"] = environ.get("ZE_FLAT_DEVICE_HIERARCHY", "FLAT")
    elif kind == "cuda":
        # NVLink SHARP/multicast stays off unless the user opts in.
        env["NCCL_NVLS_ENABLE"] = environ.get("NCCL_NVLS_ENABLE", "0")
    return env


def peak_flops(device: torch.device) -> float | None:
    """Datasheet dense bf16 peak of ``device`` (FLOP/s) or None when unknown (CPU)."""
    if device.type == "cpu":
        return None
    try:
        name = getattr(torch, device.type).get_device_name(device)
    except Exception:  # pragma: no cover
        return None
    for key, value in PEAK_BF16_FLOPS.items():
        if key in name:
            return value
    return None


def device_name(device: torch.device) -> str:
    if device.type == "cpu":
        return "cpu"
    try:
        return getattr(torch, device.type).get_device_name(device)
    except Exception:  # pragma: no cover
        return device.type


@dataclass(frozen=True)
class DistContext:
    """Where this rank runs. Built by the launchers; read by :func:`study.train.train`."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str = "gloo"

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def device_kind(self) -> str:
        return self.device.type


def local_context(device: str | None = None) -> DistContext:
    """Single-process context on the best (or requested) device."""
    kind = detect_device_kind(device)
    dev = select_device(kind, 0, isolated=False)
    return DistContext(device=dev, backend=backend_for(kind))


def context_from_env(device: str | None = None, *, isolated: bool = False,
                     init_process_group: bool = True) -> DistContext:
    """Context from torchrun-style variables (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE).

    Initializes the default process group when ``WORLD_SIZE > 1`` and none exists yet.
    """
    import torch.distributed as dist

    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    kind = detect_device_kind(device)
    os.environ.update(collective_env(kind, local_rank=local_rank, local_world_size=local_world))
    dev = select_device(kind, local_rank, isolated=isolated)
    backend = backend_for(kind)
    if world > 1 and init_process_group and not dist.is_initialized():
        dist.init_process_group(backend=backend, rank=rank, world_size=world)
    return DistContext(rank=rank, world_size=world, local_rank=local_rank, local_world_size=local_world,
                       device=dev, backend=backend)
