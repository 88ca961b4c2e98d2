"""Multi-node proof on one machine: network namespaces as PBS nodes, a fake mpiexec, the real bootstrap.

The module fixture starts ``pbs/ray_cluster.sh up`` on three namespace "nodes" (1 CPU each); the tests
then check, in order: the cluster forms with every node and its security settings; a job without the
token is refused; a Tune sweep places trials on all nodes; killing one node's Ray processes fails its
trials over to the others; SIGTERM (PBS's signal before the walltime kill) tears everything down.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pbs_harness import REPO, ClusterProcess, node_tmp_dirs, procs_of_job  # noqa: E402
from pbs_netns import NetnsNodes, netns_unavailable_reason  # noqa: E402

_reason = netns_unavailable_reason()
pytestmark = [pytest.mark.netns, pytest.mark.skipif(_reason is not None, reason=f"netns: {_reason}")]

HERE = Path(__file__).resolve().parent
UP_ARGS = ["--iface", "hsn0", "--num-cpus", "1", "--object-store-bytes", "100000000", "--join-timeout", "240"]
# Faster node-death detection than Ray's default (~15 s): the GCS health-checks raylets every second.
FAST_HEALTH = dict(RAY_health_check_period_ms="1000", RAY_health_check_failure_threshold="3",
                   RAY_health_check_initial_delay_ms="1000")


def _jobid() -> str:
    return str(70000 + int(time.time() * 1000) % 29999)


def _client_env(cluster: ClusterProcess, home: Path, token: bool = True) -> dict:
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "HOME": str(home),
           "RAY_USAGE_STATS_ENABLED": "0"}
    if token:
        e = cluster.env_file()
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=e["RAY_AUTH_TOKEN_PATH"])
    return env


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    work = tmp_path_factory.mktemp("pbs_netns")
    nodes = NetnsNodes(3, work)
    jobid = _jobid()
    # the Aurora profile (modules skipped): 12 GPU tiles per node as Ray GPUs, its oneCCL/Level Zero environment
    # A RAY_AUTH_TOKEN in the user's environment must not replace the job's token (Ray prefers it over the file).
    c = ClusterProcess(nodes, work, jobid, "up", ["--profile", "aurora", *UP_ARGS], NEUROX_SKIP_MODULES="1",
                       RAY_AUTH_TOKEN="f" * 64, **FAST_HEALTH)
    c.work = work
    try:
        assert c.wait_for("cluster is up", timeout=300), c.text()
        yield c
    finally:
        if c.proc.poll() is None:
            c.terminate()
        nodes.close()
        for d in node_tmp_dirs(jobid):
            subprocess.run([sys.executable, str(REPO / "pbs" / "cluster.py"), "cleanup", "--path", d, "--grace", "1"],
                           check=False)


@pytest.mark.slow
def test_cluster_forms_with_all_nodes_and_is_locked_down(cluster):
    nodes = cluster.nodes
    env = cluster.env_file()
    head_ip, dash_port = env["RAY_API_SERVER_ADDRESS"].rsplit("/", 1)[1].split(":")
    assert head_ip == nodes.ips[0] and env["RAY_ADDRESS"].startswith(nodes.ips[0] + ":")
    # every node joined with its high-speed address (not mgmt0), 1 CPU each
    probe = """
import json, os, ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
ray.init(logging_level='ERROR')
@ray.remote(num_cpus=0)
def where():
    return [ray.util.get_node_ip_address(), os.environ.get('ZE_FLAT_DEVICE_HIERARCHY'),
            os.environ.get('CCL_PROCESS_LAUNCHER'), os.environ.get('RAY_AUTH_MODE')]
nodes = [n for n in ray.nodes() if n['Alive']]
seen = ray.get([where.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n['NodeID'], soft=False)).remote()
                for n in nodes])
print(json.dumps({'nodes': [[n['NodeManagerAddress'], n['Resources'].get('CPU'), n['Resources'].get('GPU')]
                            for n in nodes], 'seen': seen}))
"""
    r = cluster.in_node(0, [sys.executable, "-c", probe],
                        env=dict(_client_env(cluster, cluster.work), RAY_ADDRESS=env["RAY_ADDRESS"]))
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    alive = got["nodes"]
    assert sorted(ip for ip, _, _ in alive) == sorted(nodes.ips)
    assert all(cpu == 1.0 and gpu == 12.0 for _, cpu, gpu in alive), alive  # Aurora: 12 tiles per node
    # the profile's environment reaches Ray workers on every node
    assert sorted(s[0] for s in got["seen"]) == sorted(nodes.ips)
    assert all(s[1:] == ["FLAT", "none", "token"] for s in got["seen"]), got["seen"]
    assert "cannot import dpctl" in cluster.text()  # the profile warns that Ray cannot bind tiles here
    # token: fresh, 64 hex chars, 0600 in a 0700 directory, never printed
    tok_path = Path(env["RAY_AUTH_TOKEN_PATH"])
    token = tok_path.read_text()
    assert len(token) == 64 and int(token, 16) >= 0
    assert tok_path.stat().st_mode & 0o777 == 0o600
    assert tok_path.parent.stat().st_mode & 0o777 == 0o700
    assert token not in cluster.text()
    for log in (cluster.state / "nodes").glob("*.log"):
        assert token not in log.read_text()
    # dashboard bound to the head's address only: loopback inside the head namespace refuses
    r = cluster.in_node(0, [sys.executable, "-c",
                            f"import socket; socket.create_connection(('127.0.0.1', {dash_port}), timeout=3)"])
    assert r.returncode != 0 and "Connection refused" in r.stderr
    # each node's Ray temp dir is node-local and short
    tmp = node_tmp_dirs(cluster.jobkey)
    assert [d.rsplit("_", 1)[1] for d in tmp] == ["0", "1", "2"] and all(len(d) <= 40 for d in tmp), tmp
    # private: in this user's own 0700 dir (Ray chmods its temp dir itself to 0777; the parent keeps everyone
    # else out), with one random part shared by the job's nodes
    user_dir = Path(f"/tmp/nx-{os.geteuid()}")
    assert {Path(d).parent for d in tmp} == {user_dir}
    assert user_dir.stat().st_mode & 0o777 == 0o700 and user_dir.stat().st_uid == os.geteuid()
    assert len({Path(d).name.split("_")[0] for d in tmp}) == 1


@pytest.mark.slow
def test_job_without_token_is_refused(cluster, tmp_path):
    env = cluster.env_file()
    api = env["RAY_API_SERVER_ADDRESS"]
    marker = f"nx-unauth-{time.time_ns()}"
    submit = [sys.executable, "-m", "ray.scripts.scripts", "job", "submit", "--address", api, "--no-wait", "--",
              "echo", marker]
    # no token at all (fresh HOME, so no ~/.ray/auth_token either)
    r = cluster.in_node(0, submit, env=_client_env(cluster, tmp_path, token=False), timeout=120)
    assert r.returncode != 0
    assert "401" in r.stdout + r.stderr or "Unauthorized" in r.stdout + r.stderr, (r.stdout + r.stderr)[-2000:]
    # a wrong token
    wrong = tmp_path / "wrong_token"
    wrong.write_text("0" * 64)
    wrong.chmod(0o600)
    bad_env = dict(_client_env(cluster, tmp_path, token=False), RAY_AUTH_MODE="token",
                   RAY_AUTH_TOKEN_PATH=str(wrong))
    r = cluster.in_node(0, submit, env=bad_env, timeout=120)
    assert r.returncode != 0
    assert "403" in r.stdout + r.stderr or "Invalid" in r.stdout + r.stderr, (r.stdout + r.stderr)[-2000:]
    # the GCS (gRPC) refuses a client without the token, and accepts one with it
    gcs = ("from ray._raylet import GcsClient\n"
           f"print(len(GcsClient(address='{env['RAY_ADDRESS']}').get_all_node_info(timeout=10)))\n")
    r = cluster.in_node(0, [sys.executable, "-c", gcs], env=_client_env(cluster, tmp_path, token=False), timeout=120)
    assert r.returncode != 0 and "nauthenticated" in r.stderr, (r.stdout + r.stderr)[-2000:]
    r = cluster.in_node(0, [sys.executable, "-c", gcs], env=_client_env(cluster, tmp_path), timeout=120)
    assert r.returncode == 0 and int(r.stdout.strip().splitlines()[-1]) >= 3, (r.stdout + r.stderr)[-2000:]
    # raw HTTP without the header is refused too, and the refused submissions created no job
    code = ("import sys, urllib.request, urllib.error\n"
            f"try:\n    urllib.request.urlopen('{api}/api/jobs/', timeout=10)\n"
            "except urllib.error.HTTPError as e:\n    print(e.code)\n")
    r = cluster.in_node(0, [sys.executable, "-c", code])
    assert r.stdout.strip() == "401"
    r = cluster.in_node(0, [sys.executable, "-m", "ray.scripts.scripts", "job", "list", "--address", api],
                        env=_client_env(cluster, tmp_path), timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert marker not in r.stdout


def _submit_tune(cluster, tmp_path, trials, steps, step_s, wait=True):
    env = cluster.env_file()
    trace, out = tmp_path / "trace.txt", tmp_path / "out.json"
    argv = [sys.executable, "-m", "ray.scripts.scripts", "job", "submit", "--address", env["RAY_API_SERVER_ADDRESS"],
            "--working-dir", str(HERE), "--", "python", "tune_job.py", "--trials", str(trials), "--steps", str(steps),
            "--step-s", str(step_s), "--trace", str(trace), "--out", str(out), "--storage", str(tmp_path / "tune")]
    full = cluster.nodes.prefix(0) + argv
    proc = subprocess.Popen(full, env=_client_env(cluster, tmp_path), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=REPO)
    if wait:
        text, _ = proc.communicate(timeout=400)
        return proc.returncode, text, trace, out
    return proc, trace, out


def _trace(trace: Path) -> list[tuple[str, str, int]]:
    if not trace.exists():
        return []
    rows = []
    for line in trace.read_text().splitlines():
        parts = line.split()
        if len(parts) == 3:
            rows.append((parts[0], parts[1], int(parts[2])))
    return rows


@pytest.mark.slow
def test_tune_sweep_places_trials_on_every_node(cluster, tmp_path):
    rc, text, trace, out = _submit_tune(cluster, tmp_path, trials=6, steps=3, step_s=0.3)
    assert rc == 0, text[-3000:]
    result = json.loads(out.read_text())
    assert sorted(t["x"] for t in result["trials"]) == list(range(6))
    assert all(t["error"] is None and t["step"] == 2 for t in result["trials"]), result
    used = {ip for _, ip, _ in _trace(trace)}
    assert used == set(cluster.nodes.ips), used  # 1 CPU per node, 3 trials at a time: one on each node


@pytest.mark.slow
def test_killing_a_node_fails_its_trials_over(cluster, tmp_path):
    nodes = cluster.nodes
    victim_ip = nodes.ips[2]
    victim_tmp = node_tmp_dirs(cluster.jobkey)[-1]
    assert victim_tmp.endswith("_2")
    proc, trace, out = _submit_tune(cluster, tmp_path, trials=4, steps=14, step_s=0.5, wait=False)
    try:
        end = time.monotonic() + 240
        while time.monotonic() < end and not any(ip == victim_ip for _, ip, _ in _trace(trace)):
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            time.sleep(0.5)
        assert any(ip == victim_ip for _, ip, _ in _trace(trace)), "no trial ever ran on node 2"
        # kill every Ray process of node 2 at once (its node agent stays, as a node's supervisor would)
        killed = 0
        for pid in nodes.pids_in(2):
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if b"node-agent" in cmd or b"fake_mpiexec" in cmd:
                continue
            try:
                import os

                os.kill(pid, signal.SIGKILL)
                killed += 1
            except ProcessLookupError:
                pass
        assert killed >= 3
        text, _ = proc.communicate(timeout=400)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, text[-3000:]
    result = json.loads(out.read_text())
    assert all(t["error"] is None and t["step"] == 13 for t in result["trials"]), result
    assert sorted(result["alive_nodes"]) == sorted(nodes.ips[:2])
    rows = _trace(trace)
    moved = []
    for tid in {t for t, _, _ in rows}:
        ips = [ip for t, ip, _ in rows if t == tid]
        steps = [s for t, _, s in rows if t == tid]
        if victim_ip in ips and ips[-1] != victim_ip:
            moved.append(tid)
            assert max(steps) == 13
            # restored from a checkpoint, not restarted from scratch: step 0 ran once only
            assert steps.count(0) == 1
    assert moved, rows
    # node 2's agent noticed its Ray node died, cleaned its temp dir and deregistered
    end = time.monotonic() + 30
    while time.monotonic() < end and (Path(victim_tmp).exists() or (cluster.state / "nodes" / "2.json").exists()):
        time.sleep(0.5)
    assert not Path(victim_tmp).exists()
    assert not (cluster.state / "nodes" / "2.json").exists()


@pytest.mark.slow
def test_sigterm_tears_everything_down(cluster):
    assert cluster.proc.poll() is None
    rc = cluster.terminate()
    assert rc == 143, cluster.text()[-2000:]
    assert "tearing down" in cluster.text()
    assert procs_of_job(cluster.jobkey) == []
    assert node_tmp_dirs(cluster.jobkey) == []
    assert not cluster.state.exists()  # token removed with the state dir
    for i in range(3):
        assert cluster.nodes.pids_in(i) == [], i


# ---------------------------------------------------------------------------------------------- bad input
@pytest.fixture
def two_nodes(tmp_path):
    nodes = NetnsNodes(2, tmp_path)
    try:
        yield nodes
    finally:
        nodes.close()


def _run_to_end(nodes, tmp_path, args, timeout=120, **env):
    jobid = _jobid()
    c = ClusterProcess(nodes, tmp_path, jobid, "up", args, **env)
    try:
        rc = c.proc.wait(timeout)
    finally:
        if c.proc.poll() is None:
            c.terminate()
        c.log.close()
    return rc, c.text(), jobid, c


def _nothing_left(nodes, jobid, c):
    assert procs_of_job(jobid) == []
    assert node_tmp_dirs(jobid) == []
    assert not c.state.exists()
    for i in range(len(nodes.namespaces)):
        assert nodes.pids_in(i) == []


def test_missing_interface_is_named(two_nodes, tmp_path):
    rc, text, jobid, c = _run_to_end(two_nodes, tmp_path, ["--iface", "hsn9"], timeout=60)
    assert rc == 2
    assert "network interface 'hsn9' not found" in text and "hsn0" in text  # lists the interfaces it has
    _nothing_left(two_nodes, jobid, c)


def test_several_nics_are_not_guessed(two_nodes, tmp_path):
    rc, text, jobid, c = _run_to_end(two_nodes, tmp_path, [], timeout=60)
    assert rc == 2
    assert "several network interfaces" in text and "hsn0=" in text and "mgmt0=" in text
    _nothing_left(two_nodes, jobid, c)


def test_port_taken_is_refused(two_nodes, tmp_path):
    holder = subprocess.Popen(two_nodes.prefix(0) + [
        sys.executable, "-c",
        f"import socket, time; s = socket.socket(); s.bind(('{two_nodes.ips[0]}', 0)); s.listen(); "
        "print(s.getsockname()[1], flush=True); time.sleep(120)"], stdout=subprocess.PIPE, text=True)
    try:
        port = int(holder.stdout.readline())
        rc, text, jobid, c = _run_to_end(two_nodes, tmp_path, ["--iface", "hsn0", "--port", str(port)], timeout=60)
    finally:
        holder.kill()
        holder.wait()
    assert rc == 2
    assert f"port {port} on {two_nodes.ips[0]} is already taken" in text
    _nothing_left(two_nodes, jobid, c)


@pytest.mark.slow
def test_node_that_never_joins_is_named_and_nothing_is_left(two_nodes, tmp_path):
    # node 1's link to the bridge is down: its agent starts and registers, but Ray cannot reach the head
    subprocess.run(["ip", "netns", "exec", two_nodes.switch, "ip", "link", "set", f"v{two_nodes.tag}s1", "down"],
                   check=True)
    rc, text, jobid, c = _run_to_end(two_nodes, tmp_path, UP_ARGS[:-1] + ["60"], timeout=300)
    assert rc == 3, text[-3000:]
    assert "only 1 of 2 nodes joined within 60 s" in text
    assert "node 1 (nxnode1): agent started at " + two_nodes.ips[1] in text
    _nothing_left(two_nodes, jobid, c)


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["ssh", "pbsdsh"])
def test_fallback_launchers_form_the_cluster(two_nodes, tmp_path, launcher):
    import os

    out = tmp_path / "alive.json"
    src = tmp_path / "cohort"
    (src / "subjects").mkdir(parents=True)
    (src / "manifest.parquet").write_bytes(b"m")
    for i in range(3):
        (src / "subjects" / f"sub-{i}.h5").write_bytes(b"x" * (10 + i))
    local = tmp_path / "nodelocal"
    probe = f"""
import json, os, ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
ray.init(logging_level='ERROR')
@ray.remote(num_cpus=0)
def staged():
    d = os.environ['NEUROX_STAGED_DATA']
    return [d, sorted(os.listdir(os.path.join(d, 'subjects')))]
nodes = [n for n in ray.nodes() if n['Alive']]
got = ray.get([staged.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n['NodeID'], soft=False)).remote()
               for n in nodes])
json.dump({{'alive': sorted(n['NodeManagerAddress'] for n in nodes), 'staged': got}}, open('{out}', 'w'))
"""
    jobid = _jobid()
    local.mkdir()
    # node 1's agent mounts its own tmpfs over `local` (tests/pbs/node_local.sh): node-local storage, as on a cluster
    c = ClusterProcess(two_nodes, tmp_path, jobid, "run", UP_ARGS + ["--stage", str(src), "--stage-to", str(local)],
                       [sys.executable, "-c", probe], NX_NODE_LOCAL=str(local),
                       NEUROX_LAUNCHER=launcher, PATH=f"{HERE / 'fakebin'}:{Path(sys.executable).parent}:"
                                                       f"{os.environ['PATH']}")
    try:
        rc = c.proc.wait(300)
    finally:
        if c.proc.poll() is None:
            c.terminate()
    assert rc == 0, c.text()[-3000:]
    got = json.loads(out.read_text())
    assert got["alive"] == sorted(two_nodes.ips)
    # every node's Ray workers see their node's staged copy, at the same private path on every node
    staged = got["staged"][0][0]
    assert got["staged"] == [[staged, ["sub-0.h5", "sub-1.h5", "sub-2.h5"]]] * 2
    assert Path(staged).parent == local / f"nx-{os.geteuid()}" and Path(staged).name.startswith(f"{jobid}.")
    assert "tearing down" in c.text()
    assert not Path(staged).exists()  # staged data is removed at teardown
    _nothing_left(two_nodes, jobid, c)


@pytest.mark.slow
def test_two_jobs_share_nodes_and_tear_down_independently(two_nodes, tmp_path):
    ja = _jobid()
    jb = str(int(ja) + 1)
    a = ClusterProcess(two_nodes, tmp_path, ja, "up", UP_ARGS)
    b = ClusterProcess(two_nodes, tmp_path, jb, "up", UP_ARGS)
    try:
        assert a.wait_for("cluster is up", 300), a.text()[-3000:]
        assert b.wait_for("cluster is up", 300), b.text()[-3000:]
        ea, eb = a.env_file(), b.env_file()
        assert ea["RAY_ADDRESS"] != eb["RAY_ADDRESS"]
        assert ea["RAY_API_SERVER_ADDRESS"] != eb["RAY_API_SERVER_ADDRESS"]
        assert Path(ea["RAY_AUTH_TOKEN_PATH"]).read_text() != Path(eb["RAY_AUTH_TOKEN_PATH"]).read_text()
        assert a.terminate() == 143
        assert procs_of_job(ja) == [] and node_tmp_dirs(ja) == []
        # job B is untouched: still both nodes, reachable with its own token
        probe = ("import json, ray; ray.init(logging_level='ERROR'); "
                 "print(json.dumps(sorted(n['NodeManagerAddress'] for n in ray.nodes() if n['Alive'])))")
        env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "HOME": str(tmp_path),
               "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": eb["RAY_AUTH_TOKEN_PATH"],
               "RAY_ADDRESS": eb["RAY_ADDRESS"]}
        r = b.in_node(0, [sys.executable, "-c", probe], env=env, timeout=120)
        assert r.returncode == 0, r.stderr[-2000:]
        assert json.loads(r.stdout.strip().splitlines()[-1]) == sorted(two_nodes.ips)
        assert b.terminate() == 143
        assert procs_of_job(jb) == [] and node_tmp_dirs(jb) == []
    finally:
        for c in (a, b):
            if c.proc.poll() is None:
                c.terminate()
