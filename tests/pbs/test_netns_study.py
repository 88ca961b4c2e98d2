"""The real study runner on the namespace cluster: `ray job submit --working-dir . -- python study/scaling_law.py`.

Uses a two-run user preset (tests/pbs/tiny_plan.py) so it fits 2 CPU cores; checks that both runs finish,
their rows land in the results store, and their Ray Train workers ran on different nodes.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pbs_harness import REPO, ClusterProcess, node_tmp_dirs, procs_of_job  # noqa: E402
from pbs_netns import NetnsNodes, netns_unavailable_reason  # noqa: E402

_reason = netns_unavailable_reason()
pytestmark = [pytest.mark.netns, pytest.mark.slow,
              pytest.mark.skipif(_reason is not None, reason=f"netns: {_reason}")]


def _runner_ready() -> str | None:
    r = subprocess.run([sys.executable, "study/scaling_law.py", "--preset", "tiny_plan:plan", "--dry-run"],
                       cwd=REPO, capture_output=True, text=True, timeout=300,
                       env={"PATH": "/usr/bin:/bin", "PYTHONPATH": "tests/pbs", "HOME": "/tmp"})
    return None if r.returncode == 0 else (r.stdout + r.stderr).strip().splitlines()[-1]


@pytest.mark.parametrize("launcher,trainer_class", [("inline", "ImplicitFunc"), ("ray-train", "RayTrainWorker")])
def test_scaling_law_study_runs_on_the_cluster(tmp_path, launcher, trainer_class):
    """The study trains on several nodes: inline trials in Tune's trial actors (``ImplicitFunc``), or Ray Train
    workers (``RayTrainWorker``) with ``--trial-launcher ray-train``."""
    why = _runner_ready()
    if why:
        pytest.skip(f"study/scaling_law.py cannot plan the tiny study here: {why}")
    nodes = NetnsNodes(3, tmp_path)
    storage, name = tmp_path / "studies", "pbs-e2e"
    jobid = str(50000 + int(time.time()) % 9999)
    c = ClusterProcess(nodes, tmp_path, jobid, "up",
                       ["--iface", "hsn0", "--num-cpus", "2", "--object-store-bytes", "100000000",
                        "--join-timeout", "240"])
    try:
        assert c.wait_for("cluster is up", timeout=300), c.text()[-3000:]
        env_file = c.env_file()
        client = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "HOME": str(tmp_path),
                  "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": env_file["RAY_AUTH_TOKEN_PATH"],
                  "RAY_API_SERVER_ADDRESS": env_file["RAY_API_SERVER_ADDRESS"], "RAY_USAGE_STATS_ENABLED": "0"}
        submit = ["ray", "job", "submit", "--working-dir", ".", "--", "env", "PYTHONPATH=tests/pbs", "python",
                  "study/scaling_law.py", "--preset", "tiny_plan:plan", "--address", "auto", "--storage",
                  str(storage), "--study-name", name, "--max-concurrent", "2", "--no-report",
                  "--trial-launcher", launcher]
        r = c.in_node(0, submit, env=client, timeout=900)
        assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
        probe = ("import json, ray\n"
                 "from ray.util.state import list_actors\n"
                 "ray.init(logging_level='ERROR')\n"
                 "ip = {n['NodeID']: n['NodeManagerAddress'] for n in ray.nodes()}\n"
                 f"acts = list_actors(filters=[('class_name', '=', '{trainer_class}')], limit=1000, detail=True)\n"
                 "print(json.dumps(sorted({ip.get(a.node_id) for a in acts})))\n")
        r = c.in_node(0, [sys.executable, "-c", probe], env=dict(client, RAY_ADDRESS=env_file["RAY_ADDRESS"]))
        assert r.returncode == 0, r.stderr[-3000:]
        worker_ips = json.loads(r.stdout.strip().splitlines()[-1])
        assert len(worker_ips) >= 2 and set(worker_ips) <= set(nodes.ips), worker_ips
        sys.path.insert(0, str(REPO))
        from analysis.store import read_table

        df = read_table(storage / name / "store", "train")
        assert df["run_id"].nunique() == 2
        assert df.groupby("run_id")["is_final"].any().all()
    finally:
        if c.proc.poll() is None:
            c.terminate()
        nodes.close()
    assert procs_of_job(jobid) == [] and node_tmp_dirs(jobid) == []
