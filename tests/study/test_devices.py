"""Device selection without hardware: which accelerator a GPU plan targets, backends, collective env."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch

from study.devices import backend_for, collective_env, detect_device_kind, gpu_kind, select_device

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("env,kind", [
    ({}, "cuda"),
    ({"NEUROX_DEVICE": "xpu"}, "xpu"),
    ({"NEUROX_DEVICE": "cuda", "NEUROX_DIST_BACKEND": "xccl"}, "cuda"),  # the explicit name wins
    ({"NEUROX_DIST_BACKEND": "xccl"}, "xpu"),
    ({"NEUROX_DIST_BACKEND": "nccl"}, "cuda"),
    ({"NEUROX_DEVICE": "cpu"}, "cuda"),  # a CPU preference says nothing about a GPU plan
])
def test_gpu_kind_is_decided_from_the_environment(env, kind):
    assert gpu_kind(env) == kind
    assert backend_for(kind) == {"cuda": "nccl", "xpu": "xccl"}[kind]


def test_gpu_kind_rejects_unknown_names():
    with pytest.raises(ValueError, match="NEUROX_DEVICE='tpu'"):
        gpu_kind({"NEUROX_DEVICE": "tpu"})


def test_the_aurora_profile_makes_gpu_plans_xpu():
    """A trial driver on Aurora sees no tile (Ray hides them), so the profile must name the device."""
    out = subprocess.run(["bash", "-c", "NEUROX_SKIP_MODULES=1 source pbs/profiles/aurora.sh >/dev/null 2>&1; "
                          "echo \"$NEUROX_DEVICE $NEUROX_DIST_BACKEND\""], cwd=REPO, capture_output=True, text=True)
    device, backend = out.stdout.split()
    assert gpu_kind({"NEUROX_DEVICE": device, "NEUROX_DIST_BACKEND": backend}) == "xpu"


def test_device_requests_fail_clearly_where_the_device_is_missing():
    assert detect_device_kind("cpu") == "cpu" and select_device("cpu", 3, isolated=False) == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="'cuda' was requested but is not available"):
            detect_device_kind("cuda")
    with pytest.raises(ValueError, match="allowed"):
        detect_device_kind("tpu")


def test_collective_env_per_device_kind():
    x = collective_env("xpu", local_rank=5, local_world_size=12, environ={"CCL_ATL_TRANSPORT": "ofi"})
    assert x["CCL_PROCESS_LAUNCHER"] == "none" and (x["CCL_LOCAL_RANK"], x["CCL_LOCAL_SIZE"]) == ("5", "12")
    assert x["CCL_ATL_TRANSPORT"] == "ofi" and x["ZE_FLAT_DEVICE_HIERARCHY"] == "FLAT"
    assert collective_env("cuda", local_rank=0, local_world_size=4, environ={})["NCCL_NVLS_ENABLE"] == "0"
    assert collective_env("cuda", local_rank=0, local_world_size=4, environ={"NCCL_NVLS_ENABLE": "1"}) == \
        {"NCCL_NVLS_ENABLE": "1"}
    assert collective_env("cpu", local_rank=0, local_world_size=2, environ={}) == {}
