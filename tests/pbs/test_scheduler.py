"""The scheduler seam (pbs/scheduler.py, pbs/schedulers/*.sh), the site profiles as data, and both job templates,
without namespaces or Ray: Slurm host lists, job ids, walltime, head choice, and each template's dry-run plan."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("pbs_cluster", REPO / "pbs" / "cluster.py")
C = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(C)
S = C.S  # pbs/scheduler.py, as cluster.py loads it


@pytest.mark.parametrize("text, hosts", [
    ("nid001", ["nid001"]),
    ("nid[001-003]", ["nid001", "nid002", "nid003"]),
    ("nid[001-002,007,010-011]", ["nid001", "nid002", "nid007", "nid010", "nid011"]),
    ("frontier[00098-00099],login1", ["frontier00098", "frontier00099", "login1"]),
    ("a[1-2],b3,c[09-11]", ["a1", "a2", "b3", "c09", "c10", "c11"]),
    ("rack[1-2]-n[01-02]", ["rack1-n01", "rack1-n02", "rack2-n01", "rack2-n02"]),
    ("x[8-12]", ["x8", "x9", "x10", "x11", "x12"]),  # no padding: widths grow
    ("nid[001-002],nid001", ["nid001", "nid002"]),  # unique, in order
])
def test_slurm_host_lists_expand_like_scontrol(text, hosts):
    assert S.expand_hostlist(text) == hosts


@pytest.mark.parametrize("text, msg", [
    ("", "empty Slurm host list"), ("nid[001-003", "unbalanced '\\['"), ("nid001]", "unbalanced '\\]'"),
    ("nid[3-1]", "descending range '3-1'"), ("nid[a-b]", "bad range 'a-b'"), ("a,,b", "empty host name"),
])
def test_bad_slurm_host_lists_are_named(text, msg):
    with pytest.raises(S.SchedulerError, match=msg):
        S.expand_hostlist(text)


def test_slurm_job_hosts_put_the_batch_host_first_and_need_a_node_list(tmp_path):
    env = {"SLURM_JOB_ID": "42", "SLURM_JOB_NODELIST": "nid[001-003]", "SLURMD_NODENAME": "nid002"}
    sl = S.Slurm()
    assert sl.detect(env) and sl.job_id(env) == "42"
    assert sl.hosts(env) == ["nid002", "nid001", "nid003"]
    assert sl.hosts({"SLURM_NODELIST": "n[1-2]"}) == ["n1", "n2"]  # the older variable name
    f = tmp_path / "hosts"
    f.write_text("b\nb\na\n")
    assert sl.hosts(env, str(f)) == ["b", "a"]  # --nodefile wins
    with pytest.raises(S.SchedulerError, match="SLURM_JOB_NODELIST is unset"):
        sl.hosts({"SLURM_JOB_ID": "42"})


def test_scheduler_is_detected_from_the_job_environment():
    assert S.get_scheduler("auto", {"SLURM_JOB_ID": "1"}).name == "slurm"
    assert S.get_scheduler("auto", {"PBS_JOBID": "1.pbs"}).name == "pbs"
    assert S.get_scheduler(None, {}).name == "pbs"  # a plain --nodefile outside any job
    assert S.get_scheduler("auto", {"PBS_JOBID": "1", "SLURM_JOB_ID": "2"}).name == "pbs"  # PBS on a Slurm login
    assert S.get_scheduler("slurm", {}).name == "slurm"
    with pytest.raises(S.SchedulerError, match="allowed: auto, pbs, slurm"):
        S.get_scheduler("lsf", {})


def _fake_squeue(tmp_path, out):
    q = tmp_path / "squeue"
    q.write_text(f"#!/bin/sh\n[ \"$1 $2 $3 $4 $5\" = \"-h -j 42 -o %L\" ] || exit 1\necho '{out}'\n")
    q.chmod(0o755)
    return str(q)


def test_slurm_walltime_from_end_time_or_squeue(tmp_path):
    now = time.time()
    env = {"SLURM_JOB_ID": "42", "SLURM_JOB_END_TIME": str(int(now) + 600)}
    assert 598 <= S.Slurm().walltime_left(env, now=now) <= 600
    env = {"SLURM_JOB_ID": "42"}
    assert S.Slurm(squeue=_fake_squeue(tmp_path, "1-02:03:04")).walltime_left(env) == 86400 + 7384
    assert S.Slurm(squeue=_fake_squeue(tmp_path, "17:30")).walltime_left(env) == 1050
    assert S.Slurm(squeue=_fake_squeue(tmp_path, "UNLIMITED")).walltime_left(env) is None
    assert S.Slurm(squeue=str(tmp_path / "none")).walltime_left(env) is None
    assert S.walltime_left({"NEUROX_WALLTIME_S": "12", "SLURM_JOB_ID": "42"}) == 12.0
    # through the bootstrap's helper, as the walltime watcher calls it
    r = subprocess.run([sys.executable, str(REPO / "pbs" / "cluster.py"), "walltime", "--scheduler", "slurm"],
                       capture_output=True, text=True,
                       env={"PATH": os.environ["PATH"], "SLURM_JOB_ID": "42",
                            "SLURM_JOB_END_TIME": str(int(time.time()) + 300)})
    assert r.returncode == 0 and 290 <= int(r.stdout) <= 300, r.stderr


def test_nodes_helper_prints_the_job_hosts_or_names_the_problem():
    cli = [sys.executable, str(REPO / "pbs" / "cluster.py"), "nodes"]
    r = subprocess.run(cli, capture_output=True, text=True,
                       env={"PATH": os.environ["PATH"], "SLURM_JOB_ID": "9", "SLURM_JOB_NODELIST": "nid[07-08]"})
    assert r.returncode == 0 and r.stdout.split() == ["nid07", "nid08"]
    r = subprocess.run(cli + ["--scheduler", "slurm"], capture_output=True, text=True,
                       env={"PATH": os.environ["PATH"], "SLURM_JOB_ID": "9", "SLURM_JOB_NODELIST": "nid[07-"})
    assert r.returncode == 2 and "ray_cluster: unbalanced '['" in r.stderr


# ------------------------------------------------------------------------------------------ profiles as data
PROFILES = sorted(p.stem for p in (REPO / "pbs" / "profiles").glob("*.sh"))
DATA = ["PROFILE_SCHEDULER", "PROFILE_DEVICE_KIND", "PROFILE_DEVICES_PER_NODE", "PROFILE_CPUS_PER_DEVICE",
        "PROFILE_IFACE", "PROFILE_MODULES",
        "PROFILE_PRESET", "PROFILE_STAGE_TO", "PROFILE_LAUNCHER_ARGS"]


def _profile(name: str, extra: dict | None = None) -> dict:
    code = (f"set -euo pipefail; source pbs/profiles/{name}.sh >/dev/null; "
            + "; ".join(f"echo \"{v}=${{{v}-<unset>}}\"" for v in DATA + ["NCCL_SOCKET_IFNAME", "NEUROX_DEVICE",
                                                                       "NEUROX_DIST_BACKEND"]))
    env = {"PATH": "/usr/bin:/bin", "HOME": "/tmp", "USER": "u"}
    env.update(extra or {})
    r = subprocess.run(["bash", "-c", code], cwd=REPO, capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    return dict(line.split("=", 1) for line in r.stdout.splitlines())


def test_every_profile_is_data_the_bootstrap_understands():
    from study.plans import PRESETS

    assert {"aurora", "polaris", "frontier", "perlmutter", "generic"} <= set(PROFILES)
    kinds = json.loads((REPO / "study" / "device_kinds.json").read_text())
    for name in PROFILES:
        d = _profile(name)
        assert all(d[v] != "<unset>" for v in DATA), (name, d)  # every field declared (possibly empty)
        assert d["PROFILE_SCHEDULER"] in ("", "pbs", "slurm") and (REPO / "pbs" / "schedulers").joinpath(
            f"{d['PROFILE_SCHEDULER'] or 'pbs'}.sh").exists(), name
        assert d["PROFILE_DEVICE_KIND"] == "" or d["PROFILE_DEVICE_KIND"] in kinds, (name, d["PROFILE_DEVICE_KIND"])
        assert d["PROFILE_DEVICES_PER_NODE"] == "" or d["PROFILE_DEVICES_PER_NODE"].isdigit(), name
        assert d["PROFILE_CPUS_PER_DEVICE"] == "" or d["PROFILE_CPUS_PER_DEVICE"].isdigit(), name
        assert d["PROFILE_PRESET"] in PRESETS and d["PROFILE_PRESET"] not in PROFILES, name  # presets are site-free
    want = {"aurora": ("pbs", "max1550-tile", "12", "8"), "polaris": ("pbs", "a100-40gb", "4", "8"),
            "frontier": ("slurm", "mi250x-gcd", "8", "7"), "perlmutter": ("slurm", "a100-40gb", "4", "16"),
            "generic": ("", "", "", "")}
    for name, (sched, kind, n, cpus) in want.items():
        d = _profile(name)
        assert (d["PROFILE_SCHEDULER"], d["PROFILE_DEVICE_KIND"], d["PROFILE_DEVICES_PER_NODE"],
                d["PROFILE_CPUS_PER_DEVICE"]) == (sched, kind, n, cpus)
    # a user's value wins over the profile's
    assert _profile("frontier", {"PROFILE_DEVICES_PER_NODE": "4"})["PROFILE_DEVICES_PER_NODE"] == "4"


# ------------------------------------------------------------------------------------------ job templates
def _stub(bindir: Path, name: str) -> None:
    bindir.mkdir(exist_ok=True)
    (bindir / name).write_text("#!/bin/sh\nexit 0\n")
    (bindir / name).chmod(0o755)


def _template(tmp_path, template: str, env: dict) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("PBS_", "SLURM", "RAY_", "NEUROX_"))}
    base.update(NEUROX_PYTHON=sys.executable, NEUROX_STATE_DIR=str(tmp_path / "state"), NEUROX_SKIP_MODULES="1",
                NEUROX_IFACE="lo", NEUROX_DRY_RUN="1", NEUROX_STORAGE=str(tmp_path / "studies"),
                PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    base.update(env)
    return subprocess.run(["bash", str(REPO / "pbs" / template)], capture_output=True, text=True, env=base,
                          cwd=tmp_path, timeout=60)


def test_slurm_template_plans_a_frontier_job(tmp_path):
    _stub(tmp_path / "bin", "srun")
    r = _template(tmp_path, "neurox.sbatch", dict(
        SLURM_JOB_ID="777", SLURM_JOB_NODELIST="nid[001-003]", SLURMD_NODENAME="nid002", SLURM_SUBMIT_DIR=str(REPO),
        NEUROX_PROFILE="frontier"))
    out = r.stdout
    assert r.returncode == 0, r.stderr
    assert "profile: frontier   scheduler: slurm   nodes: 3 (nid002 nid001 nid003)" in out  # batch host first
    assert "head: nid002 at 127.0.0.1" in out and "--num-gpus 8" in out  # 8 GCDs per node
    assert ("srun --overlap --nodes=2 --ntasks=2 --ntasks-per-node=1 --nodelist=nid001\\,nid003 --kill-on-bad-exit=0 "
            "--cpu-bind=none") in out  # (the dry run quotes the comma)
    assert "node-agent --profile frontier --scheduler slurm" in out and "--rank-offset 1" in out
    assert "state/777/token" in out
    assert "--preset ladder --site frontier" in out  # the site-free ladder, planned for frontier's mi250x-gcd
    assert not (tmp_path / "state").exists() and not (tmp_path / "studies").exists()  # nothing started


def test_pbs_template_plans_a_polaris_job_and_refuses_an_unknown_site(tmp_path):
    _stub(tmp_path / "bin", "mpiexec")
    nodefile = tmp_path / "nodes"
    nodefile.write_text("x3001\nx3001\nx3002\n")
    env = dict(PBS_JOBID="5150.polaris-pbs", PBS_NODEFILE=str(nodefile), PBS_O_WORKDIR=str(REPO),
               NEUROX_PROFILE="polaris")
    r = _template(tmp_path, "neurox.pbs", env)
    out = r.stdout
    assert r.returncode == 0, r.stderr
    assert "profile: polaris   scheduler: pbs   nodes: 2 (x3001 x3002)" in out and "--num-gpus 4" in out
    assert "mpiexec -n 1 --ppn 1 --cpu-bind none --hostfile" in out
    assert "--preset ladder --site polaris" in out  # planned for polaris's a100-40gb (study/sites.py)
    r = _template(tmp_path, "neurox.pbs", dict(env, NEUROX_PROFILE="polaris", NEUROX_PRESET="demo"))
    assert "--preset demo --site polaris" in r.stdout and "--device-kind" not in r.stdout.split("then:")[1]
    r = _template(tmp_path, "neurox.pbs", dict(env, NEUROX_PROFILE="../polaris"))
    assert r.returncode == 2 and "NEUROX_PROFILE='../polaris' is not a file pbs/profiles/NAME.sh" in r.stderr
