"""Fast tests of pbs/cluster.py helpers and of ray_cluster.sh input checks and dry run (no namespaces, no Ray)."""
from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "pbs" / "ray_cluster.sh"
_spec = importlib.util.spec_from_file_location("pbs_cluster", REPO / "pbs" / "cluster.py")
C = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(C)


def test_nodefile_unique_in_order(tmp_path):
    f = tmp_path / "nodes"
    f.write_text("x1001c0s0b0n0\nx1001c0s0b0n0\n# comment\n\nx1001c0s1b0n0\nx1001c0s0b0n0\nx1001c0s2b0n0\n")
    assert C.read_nodefile(f) == ["x1001c0s0b0n0", "x1001c0s1b0n0", "x1001c0s2b0n0"]


@pytest.mark.parametrize("content, msg", [(None, "does not exist"), ("", "lists no hosts"),
                                          ("\n# only a comment\n", "lists no hosts")])
def test_nodefile_bad(tmp_path, content, msg):
    f = tmp_path / "nodes"
    if content is not None:
        f.write_text(content)
    with pytest.raises(C.ClusterError, match=msg):
        C.read_nodefile(f)
    with pytest.raises(C.ClusterError, match="PBS_NODEFILE is unset"):
        C.read_nodefile(None)


def test_token_is_fresh_private_and_hex(tmp_path):
    p = tmp_path / "state" / "job1" / "token"
    C.write_token(p)
    first = p.read_text()
    assert len(first) == 64 and int(first, 16) >= 0
    assert stat.S_IMODE(p.stat().st_mode) == 0o600
    assert stat.S_IMODE(p.parent.stat().st_mode) == 0o700
    C.write_token(p)
    assert p.read_text() != first  # a new job never reuses a token
    r = subprocess.run([sys.executable, str(REPO / "pbs" / "cluster.py"), "token", str(p)],
                       capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout == "" and p.read_text() not in r.stderr


def test_ports_free_distinct_and_taken_port_named():
    ports = C.free_ports("127.0.0.1", 5)
    assert len(set(ports)) == 5 and all(1024 <= p <= 65535 for p in ports)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(C.ClusterError, match=f"port {port} on 127.0.0.1 is already taken"):
            C.check_port_free("127.0.0.1", port)
    C.check_port_free("127.0.0.1", port)  # released: free again
    with pytest.raises(C.ClusterError, match="out of range"):
        C.check_port_free("127.0.0.1", 70000)


def test_address_by_interface_and_missing_interface():
    assert C.resolve_address(iface="lo") == "127.0.0.1"
    with pytest.raises(C.ClusterError, match="network interface 'nosuch0' not found .* lo"):
        C.resolve_address(iface="nosuch0")
    with pytest.raises(C.ClusterError, match="either --iface or --host-suffix"):
        C.resolve_address(iface="lo", host_suffix="-hsn0")
    with pytest.raises(C.ClusterError, match="does not resolve"):
        C.resolve_address(host_suffix="-nxnosuchsuffix.invalid")


def _fake_qstat(tmp_path, total, used):
    q = tmp_path / "qstat"
    used_line = f"    resources_used.walltime = {used}\n" if used else ""
    q.write_text("#!/bin/sh\n[ \"$1\" = -f ] || exit 1\ncat <<EOF\nJob Id: $2\n    Job_Name = nx\n"
                 f"    Resource_List.walltime = {total}\n{used_line}EOF\n")
    q.chmod(0o755)
    return str(q)


def test_remaining_walltime_from_qstat_and_override(tmp_path):
    q = _fake_qstat(tmp_path, "02:00:00", "00:17:30")
    assert C.remaining_walltime("123.pbs", qstat=q, env={}) == 7200 - 1050
    q = _fake_qstat(tmp_path, "1:00:05", None)
    assert C.remaining_walltime("123.pbs", qstat=q, env={}) == 3605
    assert C.remaining_walltime("123.pbs", qstat=q, env={"NEUROX_WALLTIME_S": "42"}) == 42
    assert C.remaining_walltime(None, qstat=q, env={}) is None  # no job id: unknown
    assert C.remaining_walltime("1", qstat=str(tmp_path / "none"), env={}) is None


def test_watch_walltime_touches_stop_file_before_the_end(tmp_path, monkeypatch):
    stop = tmp_path / "storage" / "study-a" / "STOP"
    monkeypatch.setenv("NEUROX_WALLTIME_S", "1.6")
    t0 = time.monotonic()
    assert C.watch_walltime(stop, margin_s=1.0, poll_s=0.05)
    took = time.monotonic() - t0
    assert stop.exists() and 0.5 <= took < 1.5
    monkeypatch.delenv("NEUROX_WALLTIME_S")
    monkeypatch.delenv("PBS_JOBID", raising=False)
    assert not C.watch_walltime(tmp_path / "other" / "STOP", margin_s=1.0)
    assert not (tmp_path / "other").exists()


def _cohort(tmp_path, n=7):
    src = tmp_path / "cohort"
    (src / "subjects").mkdir(parents=True)
    (src / "manifest.parquet").write_bytes(b"manifest")
    for i in range(n):
        (src / "subjects" / f"sub-{i:02d}.h5").write_bytes(bytes([i]) * (100 + i))
    return src


def test_stage_full_copy(tmp_path):
    src = _cohort(tmp_path)
    info = C.stage(src, tmp_path / "local", rank=1, world=3, shard=False)
    assert len(info["subjects"]) == 7
    assert (tmp_path / "local" / "manifest.parquet").read_bytes() == b"manifest"
    assert (tmp_path / "local" / "subjects" / "sub-06.h5").read_bytes() == bytes([6]) * 106
    assert json.loads((tmp_path / "local" / "STAGED.json").read_text())["subjects"] == info["subjects"]


def test_stage_shards_partition_the_subjects(tmp_path):
    src = _cohort(tmp_path)
    world = 3
    seen = []
    for r in range(world):
        dst = tmp_path / f"node{r}"
        info = C.stage(src, dst, rank=r, world=world, shard=True)
        here = sorted(p.name for p in (dst / "subjects").glob("*.h5"))
        assert here == sorted(Path(s).name for s in info["subjects"])
        assert (dst / "manifest.parquet").exists()  # metadata goes to every node
        seen += here
    assert sorted(seen) == [f"sub-{i:02d}.h5" for i in range(7)]  # each subject on exactly one node
    assert [len(list((tmp_path / f"node{r}" / "subjects").glob("*.h5"))) for r in range(3)] == [3, 2, 2]
    with pytest.raises(C.ClusterError, match="rank 3 outside"):
        C.stage(src, tmp_path / "x", rank=3, world=3, shard=True)
    with pytest.raises(C.ClusterError, match="not a directory"):
        C.stage(tmp_path / "nope", tmp_path / "x", rank=0, world=1, shard=False)


def test_cleanup_kills_processes_using_the_dir_and_removes_it(tmp_path):
    d = tmp_path / "nx1_0"
    sib = tmp_path / "nx1_01"
    d.mkdir()
    sib.mkdir()
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    p = subprocess.Popen([*sleeper, f"--temp-dir={d}/session_x"])
    q = subprocess.Popen([*sleeper, str(sib)])  # a longer sibling name must not match
    # a Ray worker renames its command line (ray::IDLE): found through the marker its node's `ray start` passed on
    w = subprocess.Popen(sleeper, env={**os.environ, C.NODE_MARKER: str(d)})
    v = subprocess.Popen(sleeper, env={**os.environ, C.NODE_MARKER: str(sib)})
    try:
        assert sorted(C.procs_referencing(str(d))) == sorted([p.pid, w.pid])
        C.cleanup(str(d), grace_s=2)
        assert p.wait(5) == -signal.SIGTERM and w.wait(5) == -signal.SIGTERM
        assert not d.exists() and sib.exists() and q.poll() is None and v.poll() is None
    finally:
        for x in (p, q, w, v):
            x.kill()
            x.wait()


def _script(args, env_extra=None, tmp_path=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PBS_", "RAY_"))}
    env["NEUROX_PYTHON"] = sys.executable
    if tmp_path is not None:
        env["NEUROX_STATE_DIR"] = str(tmp_path / "state")
    env.update(env_extra or {})
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=60)


@pytest.mark.parametrize("setup, msg", [
    ("unset", "PBS_NODEFILE is unset"),
    ("missing", "does not exist"),
    ("empty", "lists no hosts"),
])
def test_bad_nodefile_exits_nonzero_with_message(tmp_path, setup, msg):
    env = {}
    if setup != "unset":
        f = tmp_path / "nodes"
        if setup == "empty":
            f.write_text("\n")
        env["PBS_NODEFILE"] = str(f)
    r = _script(["up", "--iface", "lo"], env, tmp_path)
    assert r.returncode == 2, r.stderr
    assert msg in r.stderr
    assert not (tmp_path / "state").exists()


@pytest.mark.parametrize("args, msg", [
    (["sideways"], "unknown mode 'sideways'"),
    # profiles are discovered from pbs/profiles/ (the message lists them), so only a missing file is refused
    (["up", "--profile", "nosuchsite"], "--profile must be one of aurora, frontier, generic, perlmutter, polaris "
                                        "(pbs/profiles/*.sh); got 'nosuchsite'"),
    (["up", "--profile", "../aurora"], "--profile must be one of"),
    (["up", "--scheduler", "lsf"], "--scheduler must be auto or one of pbs, slurm (pbs/schedulers/*.sh); got 'lsf'"),
    (["up", "--port", "abc"], "option --port must be a non-negative integer, got 'abc'"),
    (["up", "--bogus"], "unknown option '--bogus'"),
    (["up", "--shard"], "--shard needs --stage SRC --stage-to DIR"),
    (["up", "--stage", "/x"], "--stage needs --stage-to"),
])
def test_bad_options_are_named(tmp_path, args, msg):
    r = _script(args, {"PBS_NODEFILE": "/nonexistent"}, tmp_path)
    assert r.returncode == 2 and msg in r.stderr, r.stderr


def test_dry_run_prints_plan_and_starts_nothing(tmp_path):
    f = tmp_path / "nodes"
    f.write_text("nodeA\nnodeA\nnodeB\nnodeC\n")
    r = _script(["run", "--dry-run", "--profile", "aurora", "--iface", "lo", "--launcher", "mpiexec",
                 "--", "ray", "job", "submit", "--working-dir", ".", "--", "python", "study/scaling_law.py"],
                {"PBS_NODEFILE": str(f), "PBS_JOBID": "4242.aurora-pbs", "NEUROX_SKIP_MODULES": "1",
                 "PATH": f"{tmp_path}:{os.environ['PATH']}"}, tmp_path)
    # mpiexec need not exist for a dry run of 3 nodes? it must: the launcher is checked
    assert r.returncode == 2 and "launcher 'mpiexec' not found" in r.stderr
    (tmp_path / "mpiexec").write_text("#!/bin/sh\nexit 0\n")
    (tmp_path / "mpiexec").chmod(0o755)
    r = _script(["run", "--dry-run", "--profile", "aurora", "--iface", "lo", "--launcher", "mpiexec",
                 "--", "ray", "job", "submit", "--working-dir", ".", "--", "python", "study/scaling_law.py"],
                {"PBS_NODEFILE": str(f), "PBS_JOBID": "4242.aurora-pbs", "NEUROX_SKIP_MODULES": "1",
                 "PATH": f"{tmp_path}:{os.environ['PATH']}"}, tmp_path)
    out = r.stdout
    assert r.returncode == 0, r.stderr
    assert "nodes: 3 (nodeA nodeB nodeC)" in out and "head: nodeA at 127.0.0.1" in out
    assert "--dashboard-host 127.0.0.1" in out and "--num-gpus 12" in out  # Aurora: 12 tiles as Ray GPUs
    # Ray's temp dir: in this user's own dir, with a random part (the same one for every node of the job)
    temp = re.search(r"--temp-dir (\S+)", out).group(1)
    assert re.fullmatch(rf"/tmp/nx-{os.geteuid()}/4242\.[0-9a-f]{{8}}_0", temp), temp
    assert "--plasma-directory /dev/shm" in out
    assert f"--nonce {temp.split('.')[1].split('_')[0]}" in out
    assert "RAY_AUTH_MODE=token" in out and "state/4242/token" in out
    assert "mpiexec -n 2 --ppn 1 --cpu-bind none --hostfile" in out  # PALS must not pin Ray to one core and "--rank-offset 1" in out
    assert "study/scaling_law.py" in out
    assert not (tmp_path / "state").exists()  # no token, no state: nothing started


def test_long_tmp_base_is_refused(tmp_path):
    f = tmp_path / "nodes"
    f.write_text("nodeA\n")
    r = _script(["up", "--dry-run", "--iface", "lo", "--tmp-base", "/very/long/node/local/scratch/dir/for/ray"],
                {"PBS_NODEFILE": str(f), "PBS_JOBID": "4242"}, tmp_path)
    assert r.returncode == 2 and "keep it <= 40" in r.stderr


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed (apt-get install shellcheck)")
def test_shell_scripts_pass_shellcheck():
    here = Path(__file__).resolve().parent
    scripts = [SCRIPT, REPO / "pbs" / "job.sh", REPO / "pbs" / "ray_watchdog.sh", REPO / "pbs" / "neurox.sbatch",
               *sorted((REPO / "pbs" / "profiles").glob("*.sh")), *sorted((REPO / "pbs" / "schedulers").glob("*.sh")),
               *sorted((REPO / "pbs").glob("*.pbs")), here / "fake_mpiexec.sh", here / "fake_srun.sh"]
    r = subprocess.run(["shellcheck", "-x", "-s", "bash", *map(str, scripts)], capture_output=True, text=True,
                       cwd=REPO / "pbs")
    assert r.returncode == 0, r.stdout[-3000:]


WATCHDOG = REPO / "pbs" / "ray_watchdog.sh"


def _group_alive(pgid: int) -> bool:
    """Whether a live (not zombie) process of process group ``pgid`` is left (from /proc: a signal-0 probe succeeds
    on a zombie that nobody reaped yet)."""
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat_file.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def test_ray_watchdog_kills_its_group_when_the_agent_dies(tmp_path):
    """The node agent's Ray runs under pbs/ray_watchdog.sh in its own session: when the agent is gone (SIGKILLed
    before its cleanup ran), the command and everything it left in the group are SIGKILLed within ~0.5 s."""
    agent = subprocess.Popen(["sleep", "60"])
    # the command stands for `ray start --block` and its children: a shell that ignores SIGTERM and a child sleep
    node = subprocess.Popen(["setsid", str(WATCHDOG), str(agent.pid), "bash", "-c", "trap '' TERM; sleep 60 & wait"])
    try:
        time.sleep(1.0)
        assert node.poll() is None and _group_alive(node.pid)  # the agent lives: the node runs
        agent.kill()
        agent.wait()
        t0 = time.monotonic()
        while _group_alive(node.pid) and time.monotonic() - t0 < 5:
            node.poll()  # reap the watchdog (our child) once it is killed
            time.sleep(0.05)
        assert not _group_alive(node.pid), "the Ray node's group outlived its agent"
        assert time.monotonic() - t0 < 2.0
    finally:
        agent.kill()
        if _group_alive(node.pid):
            os.killpg(node.pid, signal.SIGKILL)
        node.wait()


def test_ray_watchdog_exits_with_the_command():
    """While the agent lives, the watchdog ends when the command ends, with its status (the agent reads a Ray node
    that exited by itself from the watchdog's exit)."""
    agent = subprocess.Popen(["sleep", "60"])
    try:
        r = subprocess.run([str(WATCHDOG), str(agent.pid), "bash", "-c", "sleep 0.2; exit 7"], timeout=10)
        assert r.returncode == 7
    finally:
        agent.kill()
        agent.wait()
