"""Shared pieces of the security tests: a second local user ("the attacker") and a shared /tmp-like directory.

The attacker is an unprivileged uid with no passwd entry, entered with ``setpriv`` (util-linux): its
processes get that uid and gid, no supplementary groups and no new privileges, exactly what another user
logged in on the same node has. Creating it needs root (the tests skip with the reason otherwise).
"""
from __future__ import annotations

import importlib.util
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PY = sys.executable  # the venv is world-readable, so the attacker can run the same interpreter

_spec = importlib.util.spec_from_file_location("pbs_cluster_sec", REPO / "pbs" / "cluster.py")
C = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(C)


def _free_uid(start: int) -> int:
    uid = start
    while True:
        try:
            pwd.getpwuid(uid)
        except KeyError:
            return uid
        uid += 1


ATTACKER = _free_uid(64031)
OTHER = _free_uid(ATTACKER + 1)  # a second unprivileged user (the victim, where the victim must not be root)


def second_uid_unavailable() -> str | None:
    """Why a second uid cannot be used here (None when it can)."""
    if os.geteuid() != 0:
        return "switching to a second uid needs root"
    if not shutil.which("setpriv"):
        return "setpriv (util-linux) not installed"
    r = subprocess.run(as_user(ATTACKER, ["id", "-u"]), capture_output=True, text=True)
    if r.returncode != 0 or r.stdout.strip() != str(ATTACKER):
        return f"setpriv cannot switch to uid {ATTACKER}: {r.stderr.strip()}"
    return None


def as_user(uid: int, argv: list[str]) -> list[str]:
    """``argv`` run as ``uid`` (same gid), no supplementary groups, no new privileges."""
    return ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--no-new-privs", *map(str, argv)]


def run_as(uid: int, argv: list[str], **kw) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "HOME": "/nonexistent", "LANG": "C.UTF-8"}
    return subprocess.run(as_user(uid, argv), capture_output=True, text=True, env=kw.pop("env", env),
                          timeout=kw.pop("timeout", 120), **kw)


def py_as(uid: int, code: str, **kw) -> subprocess.CompletedProcess:
    """Run Python ``code`` as ``uid``; the attack scripts print what they achieved."""
    return run_as(uid, [PY, "-c", code], **kw)


def shared_tmp() -> Path:
    """A directory like /tmp (mode 1777: everyone may create, only owners may rename or delete)."""
    d = Path(tempfile.mkdtemp(prefix="nxsec-", dir="/tmp"))
    d.chmod(0o1777)
    return d
