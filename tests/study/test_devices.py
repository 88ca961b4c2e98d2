"""Device selection without hardware: which accelerator a GPU plan targets, backends, collective env."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch

from study.devices import backend_for, collective_env, detect_device_kind, gpu_kind, rocm_visible_env, select_device

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


# ROCm (Frontier: 8 MI250X GCDs per node). No ROCm hardware here: the rule is checked as data, and the bash profile
# that applies it on every node before Ray starts is checked to agree with the Python function.
ROCM_CASES = [
    ({}, {}),  # nothing set: Ray sets HIP_VISIBLE_DEVICES per worker itself
    ({"ROCR_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7"}, {"HIP_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7"}),
    ({"ROCR_VISIBLE_DEVICES": "4,5,6,7"}, {"HIP_VISIBLE_DEVICES": "0,1,2,3"}),  # HIP indexes what ROCr left
    ({"ROCR_VISIBLE_DEVICES": "GPU-8f3a,GPU-77c1"}, {"HIP_VISIBLE_DEVICES": "0,1"}),  # ROCr also takes UUIDs
    ({"ROCR_VISIBLE_DEVICES": "0,1", "HIP_VISIBLE_DEVICES": "1"}, {}),  # the user's (or Ray's) HIP list stays
    ({"CUDA_VISIBLE_DEVICES": "0,1"}, {"CUDA_VISIBLE_DEVICES": None}),  # HIP would filter by it a second time
    ({"ROCR_VISIBLE_DEVICES": "2,3", "CUDA_VISIBLE_DEVICES": "0"},
     {"HIP_VISIBLE_DEVICES": "0,1", "CUDA_VISIBLE_DEVICES": None}),
]


@pytest.mark.parametrize("environ,change", ROCM_CASES)
def test_rocm_visibility_rule(environ, change):
    assert rocm_visible_env(environ) == change


def _frontier_profile(environ: dict) -> dict:
    show = ["HIP_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES", "CUDA_VISIBLE_DEVICES", "NEUROX_DEVICE",
            "NEUROX_DIST_BACKEND", "NCCL_SOCKET_IFNAME", "NCCL_NET_GDR_LEVEL", "FI_PROVIDER", "FI_CXI_ATS",
            "MIOPEN_USER_DB_PATH"]
    code = "source pbs/profiles/frontier.sh >/dev/null 2>&1; " + "; ".join(
        f"[[ -v {v} ]] && echo \"{v}=${v}\"" for v in show) + "; true"
    r = subprocess.run(["bash", "-c", code], cwd=REPO, capture_output=True, text=True,
                       env={"PATH": "/usr/bin:/bin", "HOME": "/tmp", **environ})
    assert r.returncode == 0, r.stderr
    return dict(line.split("=", 1) for line in r.stdout.splitlines())


@pytest.mark.parametrize("environ,change", ROCM_CASES)
def test_the_frontier_profile_applies_the_same_rocm_rule(environ, change):
    got = _frontier_profile(environ)
    want = {**environ, **change}
    for var in ("HIP_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES", "CUDA_VISIBLE_DEVICES"):
        assert got.get(var) == want.get(var), (var, environ, got)


def test_frontier_ranks_select_their_gcd_as_cuda_with_rccl():
    """A Ray worker on Frontier sees only its GCD (Ray sets HIP_VISIBLE_DEVICES), so a GPU plan targets ``cuda``
    (HIP torch), index 0, over torch's ``nccl`` backend (RCCL) with the profile's RCCL/libfabric settings."""
    env = _frontier_profile({"ROCR_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7"})
    kind = gpu_kind({"NEUROX_DEVICE": env["NEUROX_DEVICE"], "NEUROX_DIST_BACKEND": env["NEUROX_DIST_BACKEND"]})
    assert kind == "cuda" and backend_for(kind) == "nccl"
    assert (env["NCCL_SOCKET_IFNAME"], env["NCCL_NET_GDR_LEVEL"], env["FI_PROVIDER"], env["FI_CXI_ATS"]) == \
        ("hsn0", "3", "cxi", "0")
    assert env["MIOPEN_USER_DB_PATH"].startswith("/tmp/nx-")  # inside the user's private 0700 directory
    assert collective_env(kind, local_rank=3, local_world_size=8, environ={}) == {"NCCL_NVLS_ENABLE": "0"}
    # per worker: Ray narrowed HIP's list to this worker's GCD, so the device index is 0 whatever the local rank
    assert rocm_visible_env({"ROCR_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7", "HIP_VISIBLE_DEVICES": "5"}) == {}
    if torch.cuda.is_available():  # pragma: no cover - only on a GPU node
        assert select_device("cuda", 5, isolated=True) == torch.device("cuda", 0)
