"""Test harness: run pbs/ray_cluster.sh inside namespace "nodes" (as a PBS or a Slurm job) and inspect what it leaves
behind."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "pbs" / "ray_cluster.sh"
FAKE_MPIEXEC = Path(__file__).resolve().parent / "fake_mpiexec.sh"
FAKE_SRUN = Path(__file__).resolve().parent / "fake_srun.sh"
VENV_BIN = Path(sys.executable).parent


def job_env(nodes, workdir: Path, jobid: str, **extra: str) -> dict:
    """Environment of a PBS job on the namespace nodes: node file, job id, launcher stand-in, shared state."""
    env = dict(os.environ)
    env.update(PBS_NODEFILE=str(nodes.nodefile), PBS_JOBID=f"{jobid}.testpbs", NX_NETNS_MAP=str(nodes.mapfile),
               NEUROX_LAUNCHER=str(FAKE_MPIEXEC), NEUROX_STATE_DIR=str(workdir / "state"),
               NEUROX_PYTHON=sys.executable, PATH=f"{VENV_BIN}:{env['PATH']}", RAY_USAGE_STATS_ENABLED="0")
    for k in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE"):
        env.pop(k, None)
    env.update(extra)
    return env


def slurm_job_env(nodes, workdir: Path, jobid: str, **extra: str) -> dict:
    """Environment of a Slurm batch job on the namespace nodes: the compressed node list, the job id, the batch host,
    the srun stand-in, shared state; no PBS variable."""
    env = {k: v for k, v in job_env(nodes, workdir, jobid).items() if not k.startswith(("PBS_", "SLURM"))}
    env.update(SLURM_JOB_ID=jobid, SLURM_JOB_NODELIST=nodes.slurm_nodelist, SLURM_JOB_NUM_NODES=str(len(nodes.hosts)),
               SLURM_NNODES=str(len(nodes.hosts)), SLURM_NTASKS_PER_NODE="1", SLURMD_NODENAME=nodes.hosts[0],
               SLURM_SUBMIT_DIR=str(REPO), SLURM_SUBMIT_HOST="login01", NEUROX_LAUNCHER=str(FAKE_SRUN))
    env.update(extra)
    return env


def node_tmp_dirs(jobkey: str, base: str = "/tmp") -> list[str]:
    """Ray temp dirs of this job (``<base>/nx-<uid>/<jobkey>.<random>_<rank>``) still present on the (shared)
    node-local file system, in rank order."""
    found = Path(base).glob(f"nx-{os.geteuid()}/{jobkey}.*_*")
    return sorted((str(p) for p in found), key=lambda d: int(d.rsplit("_", 1)[1]))


def procs_of_job(jobkey: str) -> list[str]:
    """Command lines of live processes that belong to the job (its temp dirs or its node agents)."""
    out = []
    tmp = rf"/nx-\d+/{jobkey}\.[0-9a-f]+_\d"
    pat = re.compile(rf"{tmp}|--jobkey {jobkey}\b|state/{jobkey}\b")
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            stat = (d / "stat").read_text()
        except OSError:
            continue
        if stat.rsplit(")", 1)[1].split()[0] == "Z":
            continue
        try:
            env = (d / "environ").read_bytes().decode(errors="replace")
        except OSError:
            env = ""
        if pat.search(cmd) or re.search(rf"NEUROX_RAY_NODE_TMP=[^\0]*{tmp}", env):
            out.append(f"{d.name}: {cmd[:200]}")
    return out


class ClusterProcess:
    """``ray_cluster.sh MODE ...`` running in node 0's namespace, its stderr captured to a file."""

    def __init__(self, nodes, workdir: Path, jobid: str, mode: str, args: list[str], cmd: list[str] | None = None,
                 scheduler: str = "pbs", **env_extra: str):
        self.nodes, self.jobkey = nodes, jobid
        self.state = workdir / "state" / jobid
        self.log_path = workdir / f"cluster-{jobid}.log"
        self.log = open(self.log_path, "w")
        argv = nodes.prefix(0) + [str(SCRIPT), mode, *args] + (["--", *cmd] if cmd else [])
        make_env = slurm_job_env if scheduler == "slurm" else job_env
        self.proc = subprocess.Popen(argv, env=make_env(nodes, workdir, jobid, **env_extra), stdout=self.log,
                                     stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)

    def text(self) -> str:
        return self.log_path.read_text()

    def wait_for(self, needle: str, timeout: float) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if needle in self.text():
                return True
            if self.proc.poll() is not None:
                return needle in self.text()
            time.sleep(0.5)
        return False

    def env_file(self) -> dict:
        return dict(line.split("=", 1) for line in (self.state / "cluster.env").read_text().split())

    def terminate(self, timeout: float = 90) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # what PBS sends before the walltime kill
        try:
            return self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
            self.log.close()

    def in_node(self, i: int, argv: list[str], env: dict | None = None, timeout: float = 300,
                **kw) -> subprocess.CompletedProcess:
        """Run ``argv`` inside node ``i`` (a client on the head node, typically)."""
        return subprocess.run(self.nodes.prefix(i) + argv, env=env, capture_output=True, text=True,
                              timeout=timeout, cwd=REPO, **kw)
