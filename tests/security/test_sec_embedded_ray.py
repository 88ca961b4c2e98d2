"""The embedded Ray (a study without --address, e.g. on a shared login node) keeps its session, logs and runtime
resources in a private 0700 directory of this user, never Ray's predictable /tmp/ray."""
from __future__ import annotations

import os
import stat

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
