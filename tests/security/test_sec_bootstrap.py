"""The real bootstrap (pbs/ray_cluster.sh) against a second start, a planted directory and a bad study name.

These stop before Ray starts (the refusals come first), so they run on the host's loopback (`--iface lo`)
without network namespaces. Before the fix, the teardown trap was set before the "state dir exists" check
(a second start removed the running cluster's token and `running` marker), the temp and staging dirs were
the predictable `/tmp/nx<jobid>_<rank>` and `<stage-to>/neurox_<jobid>` used whoever had created them, and
`--study-name ../x` created `<storage>/../x/.pbs_chain`.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from sec_helpers import C, REPO, py_as

SCRIPT = REPO / "pbs" / "ray_cluster.sh"


def _bootstrap(tmp_path, args, jobid="4242", **extra):
    nodes = tmp_path / "nodes"
    nodes.write_text("localhost\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PBS_", "RAY_", "NEUROX_"))}
    env.update(PBS_NODEFILE=str(nodes), PBS_JOBID=f"{jobid}.pbs", NEUROX_PYTHON=sys.executable,
               NEUROX_STATE_DIR=str(tmp_path / "state"), PATH=f"{Path(sys.executable).parent}:{env['PATH']}", **extra)
    argv = ["bash", str(SCRIPT), "up", "--iface", "lo", "--num-cpus", "1", *args]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:  # a regression started Ray: stop it (its processes run in sessions of their own)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        bases = [Path(args[i + 1]) for i, a in enumerate(args[:-1]) if a == "--tmp-base"] or [Path("/tmp")]
        for base in bases:
            for d in [*base.glob(f"nx{jobid}_*"), *base.glob(f"nx-{os.geteuid()}/{jobid}.*")]:
                C.cleanup(str(d), grace_s=2, kill_wait_s=2)
        pytest.fail(f"the bootstrap did not stop within 120 s (it started Ray?): {argv}")
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def test_second_start_in_the_same_job_leaves_the_running_cluster_alone(tmp_path):
    # a running cluster of job 4242: its private state dir with the token and the `running` marker
    state = C.private_dir(tmp_path / "state", "4242")
    (state / "nodes").mkdir()
    C.write_token(state / "token")
    token = (state / "token").read_text()
    (state / "running").touch()
    r = _bootstrap(tmp_path, [])
    assert r.returncode == 2, r.stderr
    assert f"state dir {state}" in r.stderr and "already exists" in r.stderr
    assert "tearing down" not in r.stderr
    assert (state / "running").exists() and (state / "token").read_text() == token  # the first cluster runs on


@pytest.mark.parametrize("where", ["tmp-base", "stage-to"])
def test_a_dir_planted_by_another_user_stops_the_job_before_ray_starts(tmp_path, shared, attacker, where):
    # `shared` stands for the node's /tmp (short: Ray's temp dir must stay <= 40 characters)
    base = shared if where == "tmp-base" else shared / "local"
    base.mkdir(exist_ok=True)
    base.chmod(0o1777)
    planted = base / f"nx-{os.geteuid()}"
    r = py_as(attacker, f"import os; os.mkdir({str(planted)!r}); os.chmod({str(planted)!r}, 0o777)")
    assert r.returncode == 0, r.stderr
    src = tmp_path / "cohort"
    src.mkdir()
    (src / "manifest.parquet").write_bytes(b"m")
    args = ["--tmp-base", str(shared)]
    if where == "stage-to":
        (shared / f"nx-{os.geteuid()}").mkdir(mode=0o700)  # our own Ray temp parent is fine here
        args += ["--stage", str(src), "--stage-to", str(base)]
    r = _bootstrap(tmp_path, args)
    assert r.returncode == 2, r.stderr[-2000:]
    assert str(planted) in r.stderr and f"belongs to uid {attacker}" in r.stderr
    assert "starting head" not in r.stderr
    assert os.listdir(planted) == []  # nothing of ours went into the attacker's folder
    assert not (tmp_path / "state" / "4242").exists()  # our own state (token) is removed
    if where == "stage-to":  # the Ray temp dir made before staging failed is removed too
        assert list((shared / f"nx-{os.geteuid()}").iterdir()) == []


def test_a_study_name_with_a_path_is_refused_before_anything_is_written(tmp_path):
    storage = tmp_path / "storage" / "studies"
    storage.mkdir(parents=True)
    r = _bootstrap(tmp_path, ["--storage", str(storage), "--study-name", "../escaped"])
    assert r.returncode == 2
    assert "--study-name '../escaped' must match" in r.stderr
    assert not (tmp_path / "storage" / "escaped").exists()
    assert not (tmp_path / "state").exists()
