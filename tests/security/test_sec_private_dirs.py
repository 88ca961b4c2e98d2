"""Shared node, another local user: per-job directories, staged data and cleanup (issue #30 items 1 and 4).

Each test runs the attack as a second uid (``setpriv``) and asserts that it fails. Before the fix, Ray's temp
dir was the predictable ``/tmp/nx<jobid>_<rank>`` with Ray's own 0777 folders inside, staging used
``mkdir(exist_ok=True)`` and ``copyfile`` (0644 copies of 0600 subject files), and ``cleanup`` signalled every
process whose command line named the path.
"""
from __future__ import annotations

import json
import os
import stat
import subprocess
import time
from pathlib import Path

import pytest

from sec_helpers import OTHER, PY, REPO, C, as_user, py_as, run_as

ATTACK_TREE = r"""
import json, os, sys
base, pkg = sys.argv[1], sys.argv[2]
out = {}
def attempt(name, fn):
    try:
        fn(); out[name] = "succeeded"
    except OSError as e:
        out[name] = type(e).__name__
attempt("list_user_dir", lambda: os.listdir(base))
attempt("rename_pkg", lambda: os.rename(pkg, pkg + ".old"))
attempt("replace_main", lambda: open(os.path.join(pkg, "main.py"), "w").write("print('PWNED')"))
attempt("read_driver_log", lambda: open(os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(pkg))),
                                                     "logs", "job-driver-raysubmit_1.log")).read())
print(json.dumps(out))
"""


def test_ray_temp_dir_is_out_of_another_users_reach(shared, attacker):
    d = C.private_dir(shared, "4242.0a1b2c3d_0", per_user=True)
    assert d.parent == shared / f"nx-{os.geteuid()}"
    assert stat.S_IMODE(d.stat().st_mode) == stat.S_IMODE(d.parent.stat().st_mode) == 0o700
    # what Ray 2.60 creates inside its temp dir: folders chmod-ed 0777 (try_make_directory_shared)
    session = d / "session_2026-12-06_10-00-00_000000_1"
    pkg = session / "runtime_resources" / "working_dir_files" / "_ray_pkg_0123456789abcdef"
    pkg.mkdir(parents=True)
    (session / "logs").mkdir()
    for p in (session, session / "runtime_resources", pkg.parent, pkg, session / "logs"):
        p.chmod(0o777)
    (pkg / "main.py").write_text("print('ORIGINAL')\n")
    (session / "logs" / "job-driver-raysubmit_1.log").write_text("secret output\n")
    r = run_as(attacker, [PY, "-c", ATTACK_TREE, str(d.parent), str(pkg)])
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert got == {k: "PermissionError" for k in ("list_user_dir", "rename_pkg", "replace_main", "read_driver_log")}
    assert (pkg / "main.py").read_text() == "print('ORIGINAL')\n"


@pytest.mark.parametrize("plant", ["dir", "symlink", "file"])
def test_a_user_dir_planted_by_another_user_is_refused(shared, attacker, plant):
    mine = shared / f"nx-{os.geteuid()}"
    target = shared / "attackers"
    code = {"dir": f"import os; os.mkdir({str(mine)!r}); os.chmod({str(mine)!r}, 0o777)",
            "symlink": f"import os; os.mkdir({str(target)!r}, 0o777); os.symlink({str(target)!r}, {str(mine)!r})",
            "file": f"open({str(mine)!r}, 'w').close()"}[plant]
    r = py_as(attacker, code)
    assert r.returncode == 0, r.stderr
    with pytest.raises(C.ClusterError) as e:
        C.private_dir(shared, "4242.0a1b2c3d_0", per_user=True)
    msg = str(e.value)
    assert str(mine) in msg
    assert (f"uid {attacker}" in msg) if plant == "dir" else ("not a directory" in msg)
    assert not (target / "4242.0a1b2c3d_0").exists()  # nothing created in the attacker's folder


def test_an_existing_job_dir_is_never_reused(shared):
    C.private_dir(shared, "4242.0a1b2c3d_0", per_user=True)
    with pytest.raises(C.ClusterError, match="already exists"):
        C.private_dir(shared, "4242.0a1b2c3d_0", per_user=True)
    with pytest.raises(C.ClusterError, match="must match"):
        C.private_dir(shared, "../escape", per_user=True)


def test_a_loose_user_dir_of_ours_is_tightened(shared):
    mine = shared / f"nx-{os.geteuid()}"
    mine.mkdir()
    mine.chmod(0o777)
    C.private_dir(shared, "j.1_0", per_user=True)
    assert stat.S_IMODE(mine.stat().st_mode) == 0o700


def test_staged_subject_files_are_not_readable_by_another_user(shared, attacker):
    src = shared / "cohort"
    (src / "subjects").mkdir(parents=True)
    (src / "manifest.parquet").write_bytes(b"manifest")
    (src / "manifest.parquet").chmod(0o644)
    subject = src / "subjects" / "sub-00.h5"
    subject.write_bytes(b"protected health information")
    subject.chmod(0o600)
    src.chmod(0o755)
    (src / "subjects").chmod(0o755)
    # even in a directory others can enter (the old `neurox_<jobid>` under a world-readable --stage-to),
    # the copies carry only owner bits
    dst = shared / "staged"
    C.stage(src, dst, rank=0, world=1, shard=False)
    for d in (dst, dst / "subjects"):
        d.chmod(0o755)
    assert stat.S_IMODE((dst / "subjects" / "sub-00.h5").stat().st_mode) == 0o600
    assert stat.S_IMODE((dst / "manifest.parquet").stat().st_mode) == 0o600  # tightened, never widened
    assert stat.S_IMODE((dst / "STAGED.json").stat().st_mode) == 0o600
    r = run_as(attacker, ["cat", str(dst / "subjects" / "sub-00.h5")])
    assert r.returncode != 0 and "Permission denied" in r.stderr and "protected" not in r.stdout
    # and the real target is a private dir: not even listable
    priv = C.private_dir(shared, "4242.0a1b2c3d", per_user=True)
    C.stage(src, priv, rank=0, world=1, shard=False)
    r = run_as(attacker, ["ls", str(priv)])
    assert r.returncode != 0 and "Permission denied" in r.stderr


def _sleeper(path: Path, uid: int | None = None) -> subprocess.Popen:
    argv = [PY, "-c", "import time; time.sleep(120)", str(path / "session_latest" / "logs")]
    return subprocess.Popen(as_user(uid, argv) if uid is not None else argv)


def test_cleanup_leaves_another_users_processes_alone(shared, attacker):
    d = C.private_dir(shared, "4242.0a1b2c3d_0", per_user=True)
    mine = _sleeper(d)
    theirs = _sleeper(d, attacker)  # e.g. `tail -f` of a log path, or a planted command line
    try:
        time.sleep(0.5)
        assert mine.pid in C.procs_referencing(str(d)) and theirs.pid not in C.procs_referencing(str(d))
        C.cleanup(str(d), grace_s=2, kill_wait_s=1)
        assert mine.wait(5) is not None
        assert theirs.poll() is None  # root would have killed it before the fix
        assert not d.exists()
    finally:
        for p in (mine, theirs):
            p.kill()
            p.wait()


def test_cleanup_by_an_unprivileged_user_skips_others_without_a_traceback(shared, attacker):
    d = shared / "victims-ray-dir"
    d.mkdir()
    os.chown(d, OTHER, OTHER)
    theirs = _sleeper(d, attacker)
    foreign = shared / "attackers-dir"  # a path that is not the victim's: never removed by its cleanup
    r = run_as(attacker, ["mkdir", str(foreign)])
    assert r.returncode == 0, r.stderr
    try:
        time.sleep(0.5)
        for path in (d, foreign):
            r = run_as(OTHER, [PY, str(REPO / "pbs" / "cluster.py"), "cleanup", "--path", str(path), "--grace", "1",
                               "--kill-wait", "1"])
            assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
        assert "not your directory" in r.stderr and foreign.exists()
        assert theirs.poll() is None and not d.exists()
    finally:
        theirs.kill()
        theirs.wait()
