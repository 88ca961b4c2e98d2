"""The attacks of issue #30 against a real cluster on network-namespace "nodes" (tests/pbs/pbs_netns.py).

Marked ``slow`` and ``netns`` (root, ``ip``); the local-user attacks also need a second uid (``setpriv``).
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "pbs"))
from pbs_harness import ClusterProcess, node_tmp_dirs, procs_of_job  # noqa: E402
from pbs_netns import NetnsNodes, netns_unavailable_reason  # noqa: E402
from sec_helpers import C  # noqa: E402

_reason = netns_unavailable_reason()
pytestmark = [pytest.mark.netns, pytest.mark.slow,
              pytest.mark.skipif(_reason is not None, reason=f"netns: {_reason}")]
ARGS = ["--iface", "hsn0", "--num-cpus", "1", "--object-store-bytes", "100000000", "--join-timeout", "240"]


def _jobid() -> str:
    return str(60000 + int(time.time() * 1000) % 9999)


@pytest.fixture
def nodes(tmp_path):
    n = NetnsNodes(2, tmp_path)
    try:
        yield n
    finally:
        n.close()


def _listeners(nodes, i: int) -> list[tuple[str, int, str]]:
    """(address, port, process) of every listening TCP socket in node ``i``."""
    r = subprocess.run(nodes.prefix(i) + ["ss", "-ltnpH"], capture_output=True, text=True, check=True)
    out = []
    for line in r.stdout.splitlines():
        f = line.split()
        addr, port = f[3].rsplit(":", 1)
        proc = re.search(r'\(\("([^"]+)"', f[-1])
        out.append((addr.strip("[]").removeprefix("::ffff:"), int(port), proc.group(1) if proc else "?"))
    return out


def _head_ports(nodes) -> tuple[dict, dict]:
    """The head's `ray start --head` options and environment (ports it was given)."""
    for pid in nodes.pids_in(0):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
        except OSError:
            continue
        if "start" in argv and "--head" in argv:
            opts = {a: argv[i + 1] for i, a in enumerate(argv[:-1]) if a.startswith("--") and a.endswith("port")}
            env = dict(e.split("=", 1) for e in Path(f"/proc/{pid}/environ").read_bytes().decode().split("\0") if "=" in e)
            return opts, env
    raise AssertionError("no head `ray start` process")


def test_local_user_cannot_inject_code_or_read_data_and_peers_see_only_documented_ports(nodes, tmp_path, shared,
                                                                                        attacker):
    nodes.nodefile.write_text("nxnode0\n")  # a one-node job; node 1 is only a network peer
    wd = tmp_path / "wd"
    wd.mkdir()
    (wd / "main.py").write_text("print('ORIGINAL')\n")
    src = tmp_path / "cohort" / "subjects"
    src.mkdir(parents=True)
    (src / "sub-00.h5").write_bytes(b"protected health information")
    (src.parent / "manifest.parquet").write_bytes(b"m")
    stage_to = shared / "local"
    stage_to.mkdir()
    stage_to.chmod(0o1777)
    out = tmp_path / "attack.json"
    jobid = _jobid()
    c = ClusterProcess(nodes, tmp_path, jobid, "run",
                       ARGS + ["--stage", str(src.parent), "--stage-to", str(stage_to)],
                       [sys.executable, str(HERE / "working_dir_attack.py"), str(wd), str(out), str(attacker),
                        str(stage_to), jobid])
    try:
        assert c.wait_for("all 1 nodes joined", 240), c.text()[-3000:]
        # while the job runs: what listens where on the head, and what a network peer reaches
        opts, env = _head_ports(nodes)
        listening = _listeners(nodes, 0)
        head_ip = nodes.ips[0]
        rc = c.proc.wait(400)
    finally:
        if c.proc.poll() is None:
            c.terminate()
    assert rc == 0, c.text()[-3000:]
    got = json.loads(out.read_text())
    # the injected code never ran; the second submission reused the job's own cached package
    assert "ORIGINAL" in got["first"] and "ORIGINAL" in got["second"], got
    assert "PWNED" not in got["second"]
    attack = got["attack"]
    assert attack["found"] == [] and attack["done"] == [], attack
    user_dir = f"/tmp/nx-{os.geteuid()}"
    assert user_dir in attack["denied"] and str(stage_to / f"nx-{os.geteuid()}") in attack["denied"], attack
    assert Path(got["staged"]).parent == stage_to / f"nx-{os.geteuid()}" and not Path(got["staged"]).exists()
    # services: wildcard listeners are only the ones Ray 2.60 cannot bind to an address (all need the token,
    # except the head's two metrics endpoints, which get per-job ports); the rest is on the head's address
    wildcard = {(p, proc) for a, p, proc in listening if a in ("0.0.0.0", "*", "::")}
    expected = {int(opts["--port"]), int(opts["--node-manager-port"]), int(opts["--object-manager-port"]),
                int(opts["--dashboard-agent-grpc-port"]), int(env["DASHBOARD_METRIC_PORT"]),
                int(env["AUTOSCALER_METRIC_PORT"])}
    workers = range(10002, 20000)  # Ray's default worker port range: drivers' and workers' gRPC (token checked)
    assert {p for p, _ in wildcard if p not in workers} <= expected, (wildcard, expected)
    assert all(a in (head_ip, "127.0.0.1") for a, _, _ in listening if a not in ("0.0.0.0", "*", "::")), listening
    ports = {p for _, p, _ in listening}
    assert int(opts["--metrics-export-port"]) not in ports  # the per-node metrics exporter is off
    assert not ports & {44217, 44227}  # Ray's fixed metrics ports: two jobs on a node would collide
    assert int(env["DASHBOARD_METRIC_PORT"]) != int(env["AUTOSCALER_METRIC_PORT"])
    assert procs_of_job(jobid) == [] and node_tmp_dirs(jobid) == []


@pytest.mark.parametrize("frozen_agent", [False, True], ids=["agents-respond", "agent-frozen"])
def test_teardown_meets_its_deadline_with_processes_that_ignore_sigterm(nodes, tmp_path, frozen_agent):
    """PBS sends SIGTERM, then SIGKILL kill_delay (10 s) later. Measured before the fix on this scenario with a
    frozen node agent: 27.7 s (sequential waits of 20 s for the nodes, 5.5 s per process group, 5+5 s cleanup)."""
    src = tmp_path / "cohort" / "subjects"
    src.mkdir(parents=True)
    for i in range(3):
        (src / f"sub-{i}.h5").write_bytes(os.urandom(1 << 20))
    stage_to = tmp_path / "local"
    stage_to.mkdir()
    ready = tmp_path / "ready"
    jobid = _jobid()
    c = ClusterProcess(nodes, tmp_path, jobid, "run", ARGS + ["--stage", str(src.parent), "--stage-to", str(stage_to)],
                       [sys.executable, str(HERE / "stubborn_job.py"), str(ready)], NX_NODE_LOCAL=str(stage_to))
    try:
        end = time.monotonic() + 300
        while time.monotonic() < end and not ready.exists():
            assert c.proc.poll() is None, c.text()[-3000:]
            time.sleep(0.5)
        assert ready.read_text() == "2", c.text()[-3000:]
        staged = list(stage_to.glob(f"nx-{os.geteuid()}/{jobid}.*"))  # the head's copy (node 1's is on its tmpfs)
        assert len(staged) == 1
        if frozen_agent:  # node 1's agent never reacts (a hung node): the head must not wait for it
            for pid in nodes.pids_in(1):
                try:  # the agent's `sleep 0.5` children come and go between the listing and the read
                    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                except OSError:
                    continue
                if argv[0] == b"bash" and b"node-agent" in argv:
                    os.kill(pid, signal.SIGSTOP)
        t0 = time.monotonic()
        c.proc.send_signal(signal.SIGTERM)
        rc = c.proc.wait(60)
        took = time.monotonic() - t0
    finally:
        if c.proc.poll() is None:
            c.terminate()
        if frozen_agent:  # what PBS's SIGKILL does to the hung node's processes
            nodes.close()
            for d in node_tmp_dirs(jobid):
                C.cleanup(d, grace_s=1, kill_wait_s=1)
    text = c.text()
    assert rc == 143, text[-3000:]
    m = re.search(r"teardown took (\d+) ms", text)
    print(f"teardown ({'frozen agent' if frozen_agent else 'agents respond'}): {took:.2f} s from SIGTERM to exit; "
          f"script: {m.group(1) if m else '?'} ms")
    assert took < 9.0, text[-3000:]  # --teardown-s 8 (default): below PBS's 10 s kill_delay
    assert not staged[0].exists() and not c.state.exists()  # staged data and the token's state dir are gone
    if not frozen_agent:
        assert procs_of_job(jobid) == [] and node_tmp_dirs(jobid) == []
        for i in range(2):
            assert nodes.pids_in(i) == [], i
    else:
        assert "did not report a clean exit" in text
