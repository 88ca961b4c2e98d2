"""Helpers of the fault-injection suite (a module with a unique name, importable from any test folder)."""
from __future__ import annotations

import os


def ray_processes(title: str) -> list:
    """Processes started by *this* process's Ray runtime whose command line (Ray's process title) contains
    ``title``, e.g. ``RayTrainWorker`` or ``ray::ImplicitFunc``: other users' Ray processes are never matched."""
    import psutil

    out = []
    for p in psutil.Process().children(recursive=True):
        try:
            if title in " ".join(p.cmdline()):
                out.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return out


def fill_disk(disk, leave_bytes: int = 0):
    """Fill ``disk`` with a ballast file until ENOSPC, then free ``leave_bytes``; returns the ballast path."""
    ballast = disk / "ballast.bin"
    chunk = b"\0" * 65536
    with open(ballast, "wb", buffering=0) as fh:
        try:
            while True:
                fh.write(chunk)
                fh.flush()
        except OSError:
            pass
    if leave_bytes:
        size = ballast.stat().st_size
        os.truncate(ballast, max(0, size - leave_bytes))
    st = os.statvfs(disk)
    return ballast, st.f_bavail * st.f_frsize
