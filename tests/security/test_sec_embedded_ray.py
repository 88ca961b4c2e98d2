"""The embedded Ray (a study without --address, e.g. on a shared login node) keeps its session, logs and runtime
resources in a private 0700 directory of this user, never Ray's predictable /tmp/ray."""
from __future__ import annotations

import os
import stat
import sys

import pytest

from study.sweep import embedded_temp_dir


def test_embedded_ray_temp_dir_is_private_and_new_each_time(tmp_path):
    a, b = embedded_temp_dir(str(tmp_path)), embedded_temp_dir(str(tmp_path))
    assert a != b and a.parent == b.parent == tmp_path / f"nx-{os.geteuid()}"
    for d in (a, a.parent):
        st = os.lstat(d)
        assert stat.S_IMODE(st.st_mode) == 0o700 and st.st_uid == os.geteuid()
    assert a.name.startswith(f"ray-{os.getpid()}.") and len(a.name.split(".")[-1]) == 8  # not predictable


def test_a_planted_per_user_parent_is_refused_in_one_line(tmp_path):
    (tmp_path / "elsewhere").mkdir()
    os.symlink(tmp_path / "elsewhere", tmp_path / f"nx-{os.geteuid()}")
    with pytest.raises(RuntimeError, match="embedded Ray's temp dir: .*not a directory"):
        embedded_temp_dir(str(tmp_path))


def _dead_pid() -> int:
    """A pid no process has now (a child that has exited and been reaped)."""
    import subprocess

    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_a_killed_drivers_temp_dir_is_swept_at_the_next_start_and_live_ones_are_kept(tmp_path):
    import subprocess
    import time

    from pbs.cluster import sweep_stale_embedded

    base = tmp_path / f"nx-{os.geteuid()}"
    ours = embedded_temp_dir(str(tmp_path))  # this driver is alive: kept
    dead = base / f"ray-{_dead_pid()}.0123abcd"  # a SIGKILLed driver's session
    (dead / "session_x" / "logs").mkdir(parents=True)
    (dead / "session_x" / "logs" / "raylet.out").write_text("log")
    orphan = base / f"ray-{_dead_pid()}.4567cdef"  # driver gone, but its Ray still runs (names the dir): kept
    orphan.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", f"{orphan}/session_y"])
    other = base / "70476.787ac924_1"  # a cluster node's dir: not the sweep's business
    other.mkdir()
    link_target = tmp_path / "target"
    link_target.mkdir()
    (link_target / "keep").write_text("x")
    os.symlink(link_target, base / f"ray-{_dead_pid()}.89abcdef")  # a link is never followed or removed
    try:
        time.sleep(0.1)
        removed = sweep_stale_embedded(str(tmp_path))
        assert removed == [str(dead)]
        assert not dead.exists() and ours.exists() and orphan.exists() and other.exists()
        assert (link_target / "keep").exists()
        # embedded_temp_dir sweeps on its way in
        holder.kill()
        holder.wait()
        new = embedded_temp_dir(str(tmp_path))
        assert not orphan.exists() and new.exists() and ours.exists()
    finally:
        holder.kill()


def test_the_sweep_leaves_a_parent_that_is_not_private_alone(tmp_path):
    from pbs.cluster import sweep_stale_embedded

    base = tmp_path / f"nx-{os.geteuid()}"
    dead = base / f"ray-{_dead_pid()}.0123abcd"
    dead.mkdir(parents=True)
    os.chmod(base, 0o755)
    assert sweep_stale_embedded(str(tmp_path)) == [] and dead.exists()
