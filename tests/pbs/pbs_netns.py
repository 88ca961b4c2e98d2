"""Test harness: network namespaces as PBS "nodes" joined by veth pairs on a bridge.

Each node namespace gets ``lo``, ``hsn0`` (its address on a private 10.x subnet, the "high-speed network")
and a ``mgmt0`` (one end of a veth pair inside the node) with a second address so that automatic NIC choice must refuse to guess. The bridge
lives in a namespace of its own, so the host's network is never touched and only namespace addresses are
contacted. ``NetnsNodes.close()`` removes everything it created, also after a failure.
"""
from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from pathlib import Path


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


def netns_unavailable_reason() -> str | None:
    """Why namespaces cannot be created here (None when they can)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if not shutil.which("ip"):
        return "iproute2 'ip' command not found"
    name = "nxprobe" + secrets.token_hex(2)
    r = _ip("netns", "add", name, check=False)
    if r.returncode != 0:
        return f"cannot create a network namespace: {r.stderr.strip()}"
    _ip("netns", "del", name, check=False)
    return None


class NetnsNodes:
    """``n`` namespaces named like hosts, a node file listing them, and the map the fake mpiexec reads."""

    def __init__(self, n: int, workdir: Path, slurm: bool = False):
        self.tag = secrets.token_hex(2)
        self.subnet = 100 + int(self.tag, 16) % 150
        # Slurm-style names (nid001, nid002, ...) give a compressed SLURM_JOB_NODELIST like Frontier's: nid[001-003]
        self.hosts = [f"nid{i + 1:03d}" for i in range(n)] if slurm else [f"nxnode{i}" for i in range(n)]
        self.slurm_nodelist = f"nid[001-{n:03d}]" if slurm and n > 1 else ",".join(self.hosts)
        self.namespaces = [f"nx{self.tag}n{i}" for i in range(n)]
        self.switch = f"nx{self.tag}sw"
        self.ips = [f"10.213.{self.subnet}.{i + 1}" for i in range(n)]
        self.workdir = Path(workdir)
        self.nodefile = self.workdir / "nodefile"
        self.mapfile = self.workdir / "netns.map"
        self._created: list[str] = []
        try:
            self._build()
        except Exception:
            self.close()
            raise

    def _build(self) -> None:
        _ip("netns", "add", self.switch)
        self._created.append(self.switch)
        self.sw("ip", "link", "add", "br0", "type", "bridge")
        self.sw("ip", "link", "set", "br0", "up")
        self.sw("ip", "link", "set", "lo", "up")
        for i, ns in enumerate(self.namespaces):
            _ip("netns", "add", ns)
            self._created.append(ns)
            a, b = f"v{self.tag}n{i}", f"v{self.tag}s{i}"
            _ip("link", "add", a, "type", "veth", "peer", "name", b)
            _ip("link", "set", a, "netns", ns)
            _ip("link", "set", b, "netns", self.switch)
            self.sw("ip", "link", "set", b, "master", "br0")
            self.sw("ip", "link", "set", b, "up")
            self.exec(i, "ip", "link", "set", a, "name", "hsn0")
            self.exec(i, "ip", "addr", "add", f"{self.ips[i]}/24", "dev", "hsn0")
            self.exec(i, "ip", "link", "set", "hsn0", "up")
            self.exec(i, "ip", "link", "set", "lo", "up")
            self.exec(i, "ip", "link", "add", "mgmt0", "type", "veth", "peer", "name", "mgmt0p")
            self.exec(i, "ip", "addr", "add", f"10.214.{self.subnet}.{i + 1}/24", "dev", "mgmt0")
            self.exec(i, "ip", "link", "set", "mgmt0", "up")
        self.nodefile.write_text("".join(f"{h}\n{h}\n" for h in self.hosts))  # PBS repeats hosts per chunk
        self.mapfile.write_text("".join(f"{h} {ns}\n" for h, ns in zip(self.hosts, self.namespaces)))

    def sw(self, *cmd: str) -> None:
        subprocess.run(["ip", "netns", "exec", self.switch, *cmd], check=True, capture_output=True)

    def exec(self, i: int, *cmd: str) -> None:
        subprocess.run(["ip", "netns", "exec", self.namespaces[i], *cmd], check=True, capture_output=True)

    def prefix(self, i: int) -> list[str]:
        """Command prefix that runs something inside node ``i``."""
        return ["ip", "netns", "exec", self.namespaces[i]]

    def pids_in(self, i: int) -> list[int]:
        r = _ip("netns", "pids", self.namespaces[i], check=False)
        return [int(p) for p in r.stdout.split()]

    def ray_pids(self, i: int) -> list[int]:
        """Every process of node ``i``'s Ray (its ``ray start``, raylet, agents, workers): they carry the bootstrap's
        node marker ``NEUROX_RAY_NODE_TMP``; the node agent, which stands for the scheduler's per-node task, does not."""
        out = []
        for pid in self.pids_in(i):
            try:
                env = Path(f"/proc/{pid}/environ").read_bytes()
            except OSError:
                continue
            if b"\0NEUROX_RAY_NODE_TMP=" in b"\0" + env:
                out.append(pid)
        return out

    def close(self) -> None:
        """Kill whatever still runs in the namespaces, then delete them (veths and bridge go with them)."""
        import signal

        for ns in self._created:
            r = _ip("netns", "pids", ns, check=False)
            for p in r.stdout.split():
                try:
                    os.kill(int(p), signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for ns in reversed(self._created):
            _ip("netns", "del", ns, check=False)
        self._created.clear()


def sigkill(pids: list[int], groups: bool = True) -> set[int]:
    """SIGKILL ``pids`` and, with ``groups``, their process groups, at once (a host's loss takes them together).
    Returns the process groups signalled; processes already gone are skipped."""
    import signal

    gids: set[int] = set()
    if groups:
        for pid in pids:
            try:
                gids.add(os.getpgid(pid))
            except ProcessLookupError:
                pass
    for g in gids:
        try:
            os.killpg(g, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return gids
