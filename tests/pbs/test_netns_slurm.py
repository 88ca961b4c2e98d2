"""Slurm proven like PBS: network-namespace "nodes" with a Slurm job's environment, the real bootstrap, an srun
stand-in (tests/pbs/fake_srun.sh), the Frontier profile.

1. A 3-node Slurm job (``SLURM_JOB_NODELIST=nid[001-003]``, ``SLURM_JOB_ID``, ``SLURMD_NODENAME``; Slurm's
   ``--gpu-bind`` leaves ``ROCR_VISIBLE_DEVICES`` set, which Ray refuses without ``HIP_VISIBLE_DEVICES``): the cluster
   forms through one srun step, every node at its hsn0 address with 8 GCDs as Ray GPUs and the profile's RCCL
   environment; the token is private and never printed; a submission without it is refused; ``ray job submit`` of
   the real study (study/scaling_law.py, two tiny runs) finishes both runs on several nodes; SIGTERM leaves nothing.
2. Walltime continuation: the walltime comes from ``SLURM_JOB_END_TIME`` (what Slurm sets; no override), the stop
   file is written before it, a continuation is chained with ``sbatch --dependency=afterany:<job>``, the second
   allocation resumes and completes the study and ``scancel``s the chained job, a third exits at once.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pbs_harness import REPO, ClusterProcess, node_tmp_dirs, procs_of_job  # noqa: E402
from pbs_netns import NetnsNodes, netns_unavailable_reason  # noqa: E402
from test_netns_continuation import _trace  # noqa: E402
from test_netns_study import _runner_ready  # noqa: E402

_reason = netns_unavailable_reason()
pytestmark = [pytest.mark.netns, pytest.mark.slow,
              pytest.mark.skipif(_reason is not None, reason=f"netns: {_reason}")]
HERE = Path(__file__).resolve().parent
ARGS = ["--iface", "hsn0", "--num-cpus", "2", "--object-store-bytes", "100000000", "--join-timeout", "240"]


def _client(c: ClusterProcess, home: Path, token: bool = True) -> dict:
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "HOME": str(home), "RAY_USAGE_STATS_ENABLED": "0"}
    if token:
        e = c.env_file()
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=e["RAY_AUTH_TOKEN_PATH"],
                   RAY_API_SERVER_ADDRESS=e["RAY_API_SERVER_ADDRESS"])
    return env


def test_slurm_job_forms_a_locked_down_cluster_and_runs_the_study(tmp_path):
    why = _runner_ready()
    if why:
        pytest.skip(f"study/scaling_law.py cannot plan the tiny study here: {why}")
    nodes = NetnsNodes(3, tmp_path, slurm=True)
    assert nodes.slurm_nodelist == "nid[001-003]"
    jobid = str(80000 + int(time.time()) % 9999)
    srun_log = tmp_path / "srun.log"
    storage, name = tmp_path / "studies", "slurm-e2e"
    # the Frontier profile with its modules skipped; Slurm's --gpu-bind would leave ROCR_VISIBLE_DEVICES set
    c = ClusterProcess(nodes, tmp_path, jobid, "up", ["--profile", "frontier", *ARGS], scheduler="slurm",
                       NEUROX_SKIP_MODULES="1", NX_SRUN_LOG=str(srun_log), ROCR_VISIBLE_DEVICES="0,1,2,3,4,5,6,7",
                       CUDA_VISIBLE_DEVICES="3")
    try:
        assert c.wait_for("cluster is up", timeout=300), c.text()[-3000:]
        text = c.text()
        assert "starting head on nid001" in text and "all 3 nodes joined" in text
        # one srun step, one task on each other node of the allocation
        assert srun_log.read_text().startswith("srun --overlap --nodes=2 --ntasks=2 --ntasks-per-node=1 "
                                               "--nodelist=nid002,nid003 --kill-on-bad-exit=0 --cpu-bind=none ")
        env = c.env_file()
        assert env["RAY_ADDRESS"].startswith(nodes.ips[0] + ":")
        probe = """
import json, os, ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
ray.init(logging_level='ERROR')
@ray.remote(num_cpus=0)
def where():
    return [ray.util.get_node_ip_address()] + [os.environ.get(k) for k in
            ('NEUROX_DEVICE', 'NEUROX_DIST_BACKEND', 'NCCL_SOCKET_IFNAME', 'RAY_AUTH_MODE', 'NEUROX_SITE')]
nodes = [n for n in ray.nodes() if n['Alive']]
seen = ray.get([where.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n['NodeID'], soft=False)).remote()
                for n in nodes])
print(json.dumps({'nodes': [[n['NodeManagerAddress'], n['Resources'].get('GPU')] for n in nodes], 'seen': seen}))
"""
        r = c.in_node(0, [sys.executable, "-c", probe], env=dict(_client(c, tmp_path), RAY_ADDRESS=env["RAY_ADDRESS"]))
        assert r.returncode == 0, r.stderr[-2000:]
        got = json.loads(r.stdout.strip().splitlines()[-1])
        assert sorted(ip for ip, _ in got["nodes"]) == sorted(nodes.ips)
        assert all(gpu == 8.0 for _, gpu in got["nodes"]), got  # Frontier: 8 GCDs per node
        assert all(s[1:] == ["cuda", "nccl", "hsn0", "token", "frontier"] for s in got["seen"]), got["seen"]
        # token: private, never printed
        tok = Path(env["RAY_AUTH_TOKEN_PATH"])
        assert tok.stat().st_mode & 0o777 == 0o600 and tok.parent.stat().st_mode & 0o777 == 0o700
        assert tok.read_text() not in c.text()
        for log in (c.state / "nodes").glob("*.log"):
            assert tok.read_text() not in log.read_text()
        # no token: refused, no job created
        api = env["RAY_API_SERVER_ADDRESS"]
        code = ("import urllib.request, urllib.error\n"
                f"try:\n    urllib.request.urlopen('{api}/api/jobs/', timeout=10)\n"
                "except urllib.error.HTTPError as e:\n    print(e.code)\n")
        assert c.in_node(0, [sys.executable, "-c", code]).stdout.strip() == "401"
        r = c.in_node(0, [sys.executable, "-m", "ray.scripts.scripts", "job", "submit", "--address", api, "--no-wait",
                          "--", "echo", "x"], env=_client(c, tmp_path, token=False), timeout=120)
        assert r.returncode != 0 and ("401" in r.stdout + r.stderr or "Unauthorized" in r.stdout + r.stderr)
        # the real study, submitted with the token
        submit = ["ray", "job", "submit", "--working-dir", ".", "--", "env", "PYTHONPATH=tests/pbs", "python",
                  "study/scaling_law.py", "--preset", "tiny_plan:plan", "--address", "auto", "--storage",
                  str(storage), "--study-name", name, "--max-concurrent", "2", "--no-report",
                  "--trial-launcher", "inline"]
        r = c.in_node(0, submit, env=_client(c, tmp_path), timeout=900)
        assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
        probe = ("import json, ray\nfrom ray.util.state import list_actors\nray.init(logging_level='ERROR')\n"
                 "ip = {n['NodeID']: n['NodeManagerAddress'] for n in ray.nodes()}\n"
                 "acts = list_actors(filters=[('class_name', '=', 'ImplicitFunc')], limit=1000, detail=True)\n"
                 "print(json.dumps(sorted({ip.get(a.node_id) for a in acts})))\n")
        r = c.in_node(0, [sys.executable, "-c", probe], env=dict(_client(c, tmp_path), RAY_ADDRESS=env["RAY_ADDRESS"]))
        assert r.returncode == 0, r.stderr[-3000:]
        worker_ips = json.loads(r.stdout.strip().splitlines()[-1])
        assert len(worker_ips) >= 2 and set(worker_ips) <= set(nodes.ips), worker_ips
        sys.path.insert(0, str(REPO))
        from analysis.store import read_table

        df = read_table(storage / name / "store", "train")
        assert df["run_id"].nunique() == 2 and df.groupby("run_id")["is_final"].any().all()
        # SIGTERM (Slurm's signal before the walltime kill) tears everything down
        assert c.terminate() == 143, c.text()[-2000:]
        assert procs_of_job(jobid) == [] and node_tmp_dirs(jobid) == [] and not c.state.exists()
        for i in range(3):
            assert nodes.pids_in(i) == [], i
    finally:
        if c.proc.poll() is None:
            c.terminate()
        nodes.close()


def _fake_slurm_tools(bindir: Path, calls: Path) -> None:
    bindir.mkdir()
    for tool, out in (("sbatch", "556;frontier"), ("scancel", "")):  # --parsable prints "id;cluster"
        f = bindir / tool
        # sbatch also logs the environment the next job would inherit (--export=ALL): NEUROX_* and RAY_* variables
        seen = f"env | grep -E '^(RAY_|NEUROX_)' | sed 's/^/  env /' >> {calls}\n" if tool == "sbatch" else ""
        f.write_text(f"#!/bin/sh\necho \"{tool} $*\" >> {calls}\n{seen}[ -n \"{out}\" ] && echo \"{out}\"\nexit 0\n")
        f.chmod(0o755)


def test_slurm_walltime_stop_then_sbatch_continuation_completes(tmp_path):
    nodes = NetnsNodes(2, tmp_path, slurm=True)
    storage, name = tmp_path / "studies", "slurm-cont"
    study = storage / name
    bindir, calls = tmp_path / "bin", tmp_path / "slurm_calls.txt"
    _fake_slurm_tools(bindir, calls)
    job_script = tmp_path / "job.sbatch"
    job_script.write_text("#!/bin/bash\n")
    args = ["--iface", "hsn0", "--num-cpus", "1", "--object-store-bytes", "100000000", "--join-timeout", "240",
            "--storage", str(storage), "--study-name", name, "--stop-margin", "4", "--chain", "2",
            "--job-script", str(job_script)]
    cmd = ["ray", "job", "submit", "--working-dir", str(HERE), "--", "python", "stop_aware_study.py",
           "--storage", str(storage), "--study-name", name, "--trials", "2", "--steps", "300", "--step-s", "0.4"]
    path = f"{bindir}:{Path(sys.executable).parent}:{os.environ['PATH']}"
    jobs = []
    try:
        j1 = str(90000 + int(time.time()) % 9999)
        # Slurm's own walltime variable, fixed at the job's start (unlike NEUROX_WALLTIME_S, which counts from the
        # watcher's start): 90 s from now, so trials run after the cluster forms; the watcher stops them 4 s before
        c1 = ClusterProcess(nodes, tmp_path, j1, "run", args, cmd, scheduler="slurm", PATH=path,
                            SLURM_JOB_END_TIME=str(int(time.time()) + 90), NEUROX_STUDY_TAG="s1")
        jobs.append(c1)
        assert c1.proc.wait(400) == 0, c1.text()[-4000:]
        t1 = c1.text()
        assert (study / "STOP").exists() and "walltime nearly over" in t1 and "stopped by STOP" in t1
        assert not (study / ".pbs_chain" / "complete").exists()
        assert (study / "trace.txt").exists(), "no trial started before the stop: machine too loaded?"
        assert all(max(s) < 299 for s in _trace(study).values())
        assert (f"sbatch --parsable --dependency=afterany:{j1} --export=ALL,NEUROX_CHAIN=1 {job_script}"
                in calls.read_text())
        assert "chained continuation job 556 " in t1
        # the user's settings go along; this job's cluster address, token path and staged data do not
        sent = calls.read_text()
        assert "  env NEUROX_STUDY_TAG=s1" in sent and "  env RAY_AUTH_MODE=token" in sent
        assert all(f"  env {v}=" not in sent for v in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN_PATH",
                                                      "NEUROX_RAY_HEAD_IP", "NEUROX_RAY_NUM_NODES")), sent
        assert procs_of_job(j1) == [] and node_tmp_dirs(j1) == []
        j2 = str(int(j1) + 1)
        c2 = ClusterProcess(nodes, tmp_path, j2, "run", args, cmd, scheduler="slurm", PATH=path,
                            SLURM_JOB_END_TIME=str(int(time.time()) + 1000))
        jobs.append(c2)
        assert c2.proc.wait(400) == 0, c2.text()[-4000:]
        assert "removing the previous allocation's stop file" in c2.text() and "all trials finished" in c2.text()
        assert (study / ".pbs_chain" / "complete").exists()
        steps = _trace(study)
        assert sorted(steps) == [0, 1] and all(sorted(s) == list(range(300)) for s in steps.values()), steps
        assert "scancel 556" in calls.read_text()
        assert procs_of_job(j2) == [] and node_tmp_dirs(j2) == []
        c3 = ClusterProcess(nodes, tmp_path, str(int(j1) + 2), "run", args, cmd, scheduler="slurm", PATH=path)
        jobs.append(c3)
        assert c3.proc.wait(60) == 0
        assert "is already complete" in c3.text() and "starting head" not in c3.text()
    finally:
        for c in jobs:
            if c.proc.poll() is None:
                c.terminate()
        nodes.close()
