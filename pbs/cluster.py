#!/usr/bin/env python3
"""Helpers for ``pbs/ray_cluster.sh``: addresses, ports, tokens, node waits, walltime, staging, cleanup.

What differs between schedulers (node list, job id, walltime) is behind the seam in ``pbs/scheduler.py``.

Each sub-command does one job the bash bootstrap finds awkward and prints its answer on stdout
(one line, no secrets). Errors go to stderr as ``ray_cluster: <message>`` with exit status 2 for bad
input and 3 for a timeout, so the shell script can forward them unchanged.

Usage (as run by the bootstrap)::

    python pbs/cluster.py addr --iface hsn0                # IPv4 of an interface on this node
    python pbs/cluster.py addr --host-suffix -hsn0         # resolve "$(hostname -s)-hsn0"
    python pbs/cluster.py ports --host 10.1.2.3 --count 3  # free TCP ports on that address
    python pbs/cluster.py check-port --host 10.1.2.3 --port 6379
    python pbs/cluster.py nodefile "$PBS_NODEFILE"         # unique hosts, one a line
    python pbs/cluster.py token PATH                       # fresh 256-bit token, file mode 0600
    python pbs/cluster.py wait --address IP:PORT --state-dir D --nodefile F --timeout 300
    python pbs/cluster.py walltime [--scheduler slurm]     # seconds left in this job
    python pbs/cluster.py scheduler [--scheduler auto]     # which scheduler's job this is: pbs or slurm
    python pbs/cluster.py nodes --scheduler slurm          # the job's unique hosts, head first, one a line
    python pbs/cluster.py private-dir --parent /tmp --per-user --name 123.9f3a_0   # new 0700 dir, printed
    python pbs/cluster.py nonce                            # 8 random hex characters for per-job names
    python pbs/cluster.py stage --src DIR --dst DIR --rank R --world N [--shard]
    python pbs/cluster.py cleanup --path /tmp/nx-1000/123.9f3a_0 [--grace 2] [--kill-after 1]

This module imports neither ``study`` nor ``ray`` at import time (``wait`` imports Ray lazily).

Why ``wait`` uses Ray's private ``ray._raylet.GcsClient`` (checked against the installed Ray 2.60): it asks the head's
GCS, once a second and with a timeout of its own, which nodes are alive, from the bootstrap process, which is not a
Ray driver. Ray has no public API for that. ``ray.nodes()`` is a DeveloperAPI ("for debugging only") that needs
``ray.init``: this process would become a driver of the cluster it is still forming (a job entry, a core worker)
and ``ray.init`` waits out its own retries while the GCS is not up yet. ``ray.util.state.list_nodes(address=...)``,
also a DeveloperAPI, goes through the dashboard's HTTP state API, which comes up after the GCS (so a slow
dashboard would read as nodes that never joined), and resolves a GCS address by building this same private
``GcsClient`` with up to 20 retries. The import stays in ``_alive_node_ips`` alone, listed with this reason in
``tests/test_import_layering.py`` (``KNOWN_PRIVATE_RAY``); ``tests/pbs/test_netns_cluster.py`` exercises it.
"""
from __future__ import annotations

import argparse
import fcntl
import importlib.util
import ipaddress
import json
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import time
from pathlib import Path


def _load_scheduler_module():
    """``pbs/scheduler.py`` (the scheduler seam), loaded by path: this file runs as a script and as a test import."""
    name = "neurox_pbs_scheduler"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().with_name("scheduler.py"))
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]


S = _load_scheduler_module()
EXIT_BAD_INPUT = 2
EXIT_TIMEOUT = 3
_SIOCGIFADDR = 0x8915


class ClusterError(Exception):
    """A configuration or environment problem that the user must fix; carries an exit status."""

    def __init__(self, message: str, code: int = EXIT_BAD_INPUT):
        super().__init__(message)
        self.code = code


# --------------------------------------------------------------------------------------------
# Addresses and ports
# --------------------------------------------------------------------------------------------
def interface_ipv4(name: str) -> str | None:
    """Return the first IPv4 address of network interface ``name``, or None if it has none.

    Parameters
    ----------
    name : str
        Interface name as shown by ``ip addr`` (e.g. ``hsn0``).

    Returns
    -------
    str or None
        Dotted-quad address; None when the interface exists but has no IPv4 address.

    Raises
    ------
    ClusterError
        If no interface of that name exists on this node.
    """
    names = [n for _, n in socket.if_nameindex()]
    if name not in names:
        raise ClusterError(
            f"network interface '{name}' not found on {socket.gethostname()} "
            f"(interfaces here: {', '.join(names)}); pass --iface with one of them or --host-suffix"
        )
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            packed = fcntl.ioctl(s.fileno(), _SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
        except OSError:
            return None
    return socket.inet_ntoa(packed[20:24])


def non_loopback_ipv4() -> dict[str, str]:
    """Map every interface with a non-loopback IPv4 address to that address."""
    found = {}
    for _, name in socket.if_nameindex():
        try:
            ip = interface_ipv4(name)
        except ClusterError:
            continue
        if ip and not ipaddress.ip_address(ip).is_loopback:
            found[name] = ip
    return found


def resolve_address(iface: str | None = None, host_suffix: str | None = None) -> str:
    """Pick this node's address on the high-speed network, never guessing among several NICs.

    Parameters
    ----------
    iface : str, optional
        Interface whose IPv4 address to use (``hsn0`` on Aurora and Polaris).
    host_suffix : str, optional
        Suffix appended to the short host name and resolved (``-hsn0`` gives ``x1000c0s0b0n0-hsn0``).

    Returns
    -------
    str
        The IPv4 address Ray should bind to on this node.

    Raises
    ------
    ClusterError
        When the interface is missing or has no address, the name does not resolve, or neither option
        was given and the node has several candidate interfaces.
    """
    if iface and host_suffix:
        raise ClusterError("give either --iface or --host-suffix, not both")
    if iface:
        ip = interface_ipv4(iface)
        if not ip:
            raise ClusterError(f"network interface '{iface}' on {socket.gethostname()} has no IPv4 address")
        return ip
    if host_suffix:
        name = socket.gethostname().split(".")[0] + host_suffix
        try:
            infos = socket.getaddrinfo(name, None, socket.AF_INET)
        except socket.gaierror as e:
            raise ClusterError(f"host name '{name}' (--host-suffix '{host_suffix}') does not resolve: {e}")
        return infos[0][4][0]
    found = non_loopback_ipv4()
    if len(found) == 1:
        return next(iter(found.values()))
    if not found:
        raise ClusterError(f"no non-loopback IPv4 interface on {socket.gethostname()}; pass --iface")
    listing = ", ".join(f"{n}={ip}" for n, ip in sorted(found.items()))
    raise ClusterError(
        f"{socket.gethostname()} has several network interfaces ({listing}); "
        "choose the high-speed one with --iface NAME or --host-suffix SUFFIX"
    )


def check_port_free(host: str, port: int) -> None:
    """Raise ClusterError naming ``host:port`` if that TCP port cannot be bound."""
    if not 1 <= port <= 65535:
        raise ClusterError(f"port {port} out of range 1..65535")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError as e:
            raise ClusterError(f"port {port} on {host} is already taken ({e.strerror}); choose another")


def free_ports(host: str, count: int) -> list[int]:
    """Return ``count`` distinct TCP ports that are free on ``host`` right now.

    All sockets stay bound until every port is chosen, so the ports are distinct; the caller
    starts Ray immediately afterwards to keep the race window short.
    """
    socks, ports = [], []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


# --------------------------------------------------------------------------------------------
# Node file, token
# --------------------------------------------------------------------------------------------
def read_nodefile(path: str | os.PathLike | None) -> list[str]:
    """Return the unique host names of a PBS node file in order (PBS repeats a host per cpu/rank).

    Raises
    ------
    ClusterError
        If the path is unset, missing, unreadable or lists no host.
    """
    if not path:
        raise ClusterError("no node file: PBS_NODEFILE is unset (run inside a PBS job or pass --nodefile)")
    p = Path(path)
    if not p.is_file():
        raise ClusterError(f"node file '{p}' does not exist")
    hosts: list[str] = []
    for line in p.read_text().splitlines():
        h = line.split("#", 1)[0].strip()
        if h and h not in hosts:
            hosts.append(h)
    if not hosts:
        raise ClusterError(f"node file '{p}' lists no hosts")
    return hosts


def write_token(path: str | os.PathLike) -> None:
    """Write a fresh 256-bit hex token to ``path`` with mode 0600 (parent 0700); never print it."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(p.parent, 0o700)
    if p.exists():
        p.unlink()
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))


# --------------------------------------------------------------------------------------------
# Private per-job directories
# --------------------------------------------------------------------------------------------
#: what a name used in a path may look like (study names, job keys, run ids): no '/', no leading '.' or '-'
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def _owner(uid: int) -> str:
    try:
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f"uid {uid}"


def user_dir(path: str | os.PathLike) -> Path:
    """Make sure ``path`` is a real directory owned by this user with mode 0700 (created if missing).

    It is the per-user parent of per-job directories (``/tmp/nx-<uid>``, ``<stage-to>/nx-<uid>``, the
    state dir): nobody else can create, rename or read anything inside it. A path that exists as a symlink,
    a non-directory or a directory of another user is refused (another user may have created it in advance
    to read or replace a job's files); a directory of ours with group/other bits is tightened to 0700.

    Raises
    ------
    ClusterError
        Naming the path and its owner.
    """
    p = Path(path)
    old = os.umask(0o077)
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.mkdir(p, 0o700)
        except FileExistsError:
            pass
        except OSError as e:
            raise ClusterError(f"cannot create directory {p}: {e.strerror}")
    finally:
        os.umask(old)
    st = os.lstat(p)
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise ClusterError(f"{p} exists but is not a directory (a symlink or a file): refusing to use it; "
                           "remove it or choose another base directory")
    if st.st_uid != os.geteuid():
        raise ClusterError(f"{p} belongs to {_owner(st.st_uid)}, not to you ({_owner(os.geteuid())}): refusing "
                           "to use it (another user could read or replace this job's files); remove it or "
                           "choose another base directory")
    if stat.S_IMODE(st.st_mode) != 0o700:
        os.chmod(p, 0o700)
    return p


def private_dir(parent: str | os.PathLike, name: str, per_user: bool = False) -> Path:
    """Create the new directory ``parent/name`` (or ``parent/nx-<uid>/name``) with mode 0700 and return it.

    The parent goes through :func:`user_dir`; the directory itself must not exist yet (``mkdir`` without
    ``exist_ok``), so a directory planted in advance, or a second start of the same job, is refused.

    Raises
    ------
    ClusterError
        When ``name`` is not a plain name, the parent is not this user's, or the directory exists.
    """
    if not NAME_RE.fullmatch(name):
        raise ClusterError(f"directory name {name!r} must match {NAME_RE.pattern}")
    base = Path(parent) / f"nx-{os.geteuid()}" if per_user else Path(parent)
    base = user_dir(base)
    d = base / name
    try:
        os.mkdir(d, 0o700)
    except FileExistsError:
        st = os.lstat(d)
        raise ClusterError(f"{d} already exists (owned by {_owner(st.st_uid)}): refusing to reuse it; another "
                           "start of this job is running, or a crashed one left it (remove it)")
    except OSError as e:
        raise ClusterError(f"cannot create directory {d}: {e.strerror}")
    os.chmod(d, 0o700)  # exactly 0700, whatever the umask
    return d


# --------------------------------------------------------------------------------------------
# Waiting for nodes
# --------------------------------------------------------------------------------------------
def _alive_node_ips(address: str, timeout: float) -> tuple[set[str], bool]:
    """The live nodes' IPs, and whether the head node's dashboard agent has registered its address in the GCS.

    The job API hands each submission to that agent; until it registers, Ray 2.60's job server waits 10 s and then
    refuses ``ray job submit`` with HTTP 500 "No available agent to submit job" (seen once on a loaded 2-core CI
    box, session 18), so the cluster is not ready for the command before it."""
    from ray._raylet import GcsClient  # lazy: only the head needs Ray here
    from ray.dashboard.consts import DASHBOARD_AGENT_ADDR_NODE_ID_PREFIX

    client = GcsClient(address=address)
    infos = client.get_all_node_info(timeout=timeout)
    alive, agent = set(), False
    for node_id, info in infos.items():
        if info.state == 0:  # GcsNodeInfo.ALIVE
            alive.add(info.node_manager_address)
            if info.is_head_node:  # the key the job server reads (ray/dashboard/modules/job/job_head.py)
                key = f"{DASHBOARD_AGENT_ADDR_NODE_ID_PREFIX}{node_id.hex()}".encode()
                agent = bool(client.internal_kv_get(key, b"dashboard", timeout=timeout))
    return alive, agent


def node_registrations(state_dir: Path) -> tuple[dict[int, dict], dict[int, str]]:
    """Read the ``nodes/<rank>.json`` and ``nodes/<rank>.error`` files written by node agents."""
    regs, errors = {}, {}
    d = state_dir / "nodes"
    if d.is_dir():
        for f in d.iterdir():
            m = re.fullmatch(r"(\d+)\.(json|error)", f.name)
            if not m:
                continue
            try:
                text = f.read_text()
            except OSError:
                continue
            if m.group(2) == "json":
                try:
                    regs[int(m.group(1))] = json.loads(text)
                except json.JSONDecodeError:
                    continue  # being written
            else:
                errors[int(m.group(1))] = text.strip()
    return regs, errors


def wait_for_nodes(address: str, hosts: list[str], head_ip: str, state_dir: Path, timeout: float,
                   poll_s: float = 1.0, progress: bool = True, head_pid: int | None = None) -> dict[int, str]:
    """Block until every host of the node file runs a live Ray node and the head's dashboard agent has registered
    (the job API needs it), or fail naming the missing ones.

    Parameters
    ----------
    address : str
        GCS address ``ip:port`` of the head.
    hosts : list of str
        Unique hosts in node-file order; host 0 is the head.
    head_ip : str
        The head's Ray address.
    state_dir : pathlib.Path
        Job state directory where node agents register (``nodes/<rank>.json``) or report errors.
    timeout : float
        Seconds to wait in all.
    head_pid : int, optional
        PID of the head's ``ray start``; if it exits, fail at once instead of waiting out the timeout.

    Returns
    -------
    dict
        rank -> node IP for every node.

    Raises
    ------
    ClusterError
        On a node agent's error (exit 2) or on timeout (exit 3), naming each missing node and why.
    """
    deadline = time.monotonic() + timeout
    bar = None
    if progress:
        try:
            from tqdm import tqdm

            bar = tqdm(total=len(hosts), desc="ray nodes joined", file=sys.stderr, leave=False)
        except ImportError:  # pragma: no cover - tqdm is a dependency
            bar = None
    alive: set[str] = set()
    agent, last_err = False, None
    try:
        while True:
            if head_pid is not None and (not Path(f"/proc/{head_pid}").exists() or _is_zombie(head_pid)):
                raise ClusterError(f"the head's Ray process (pid {head_pid}) exited before the cluster formed")
            regs, errors = node_registrations(state_dir)
            if errors:
                lines = [f"node {r} ({hosts[r] if r < len(hosts) else '?'}): {msg}"
                         for r, msg in sorted(errors.items())]
                raise ClusterError("node agents failed:\n  " + "\n  ".join(lines))
            try:
                alive, agent = _alive_node_ips(address, timeout=max(1.0, min(5.0, deadline - time.monotonic())))
                last_err = None
            except Exception as e:  # GCS not up yet
                last_err = e
            ips = {0: head_ip}
            ips.update({r: reg["ip"] for r, reg in regs.items()})
            joined = {r for r in range(len(hosts)) if ips.get(r) in alive}
            if bar is not None and len(joined) != bar.n:
                bar.update(len(joined) - bar.n)
            if len(joined) == len(hosts) and agent:
                return {r: ips[r] for r in range(len(hosts))}
            if time.monotonic() >= deadline:
                if len(joined) == len(hosts):
                    raise ClusterError(f"all {len(hosts)} nodes joined, but the head's dashboard agent did not "
                                       f"register within {timeout:g} s, so the job API would refuse `ray job "
                                       "submit`: see dashboard_agent.log in the head's Ray session logs",
                                       code=EXIT_TIMEOUT)
                missing = []
                for r, h in enumerate(hosts):
                    if r in joined:
                        continue
                    if r == 0:
                        why = "head did not come up" + (f" ({last_err})" if last_err else "")
                    elif r not in regs:
                        why = "its node agent never started (check the launcher and the node)"
                    else:
                        why = f"agent started at {regs[r]['ip']} but the node never joined the Ray cluster"
                    missing.append(f"node {r} ({h}): {why}")
                raise ClusterError(
                    f"only {len(joined)} of {len(hosts)} nodes joined within {timeout:g} s; missing:\n  "
                    + "\n  ".join(missing), code=EXIT_TIMEOUT)
            time.sleep(poll_s)
    finally:
        if bar is not None:
            bar.close()


# --------------------------------------------------------------------------------------------
# Walltime
# --------------------------------------------------------------------------------------------
def remaining_walltime(jobid: str | None = None, qstat: str = "qstat", env=None,
                       scheduler: str | None = None) -> float | None:
    """Seconds left before the job's walltime ends, or None when unknown.

    ``NEUROX_WALLTIME_S`` (seconds left at the time of the call) overrides the lookup. Otherwise the scheduler
    answers (``pbs/scheduler.py``): PBS from ``qstat -f $PBS_JOBID`` (``Resource_List.walltime`` minus
    ``resources_used.walltime``), Slurm from ``$SLURM_JOB_END_TIME`` or ``squeue -o %L``.
    """
    env = dict(os.environ if env is None else env)
    if env.get("NEUROX_WALLTIME_S"):
        return float(env["NEUROX_WALLTIME_S"])
    sched = S.get_scheduler(scheduler, env)
    if isinstance(sched, S.PBS):
        sched = S.PBS(qstat=qstat)
        if jobid:
            env["PBS_JOBID"] = jobid
        elif not env.get("PBS_JOBID"):
            return None
    elif jobid:
        env["SLURM_JOB_ID"] = jobid
    return sched.walltime_left(env)


def watch_walltime(stop_file: Path, margin_s: float, jobid: str | None = None, poll_s: float = 5.0,
                   scheduler: str | None = None) -> bool:
    """Sleep until ``margin_s`` seconds before the walltime ends, then create ``stop_file``.

    The study runner polls ``<storage>/<study>/STOP``: it stops starting trials, lets running trials
    write a final checkpoint and exits, so the next allocation resumes the study. Returns True when
    the file was created, False when the walltime is unknown (nothing to watch).
    """
    left = remaining_walltime(jobid, scheduler=scheduler)
    if left is None:
        print("ray_cluster: walltime unknown (no job id, qstat/squeue or SLURM_JOB_END_TIME; NEUROX_WALLTIME_S "
              "unset): "
              "no automatic stop", file=sys.stderr)
        return False
    deadline = time.monotonic() + left - margin_s
    while time.monotonic() < deadline:
        time.sleep(min(poll_s, max(0.0, deadline - time.monotonic())))
    stop_file.parent.mkdir(parents=True, exist_ok=True)
    stop_file.write_text(f"walltime ends in {max(0, int(margin_s))} s; stop trials with a final checkpoint\n")
    print(f"ray_cluster: walltime nearly over: created {stop_file}", file=sys.stderr)
    return True


# --------------------------------------------------------------------------------------------
# Staging
# --------------------------------------------------------------------------------------------
SUBJECT_SUFFIXES = (".h5", ".hdf5")


def stage(src: Path, dst: Path, rank: int, world: int, shard: bool) -> dict:
    """Copy a data directory to node-local storage; with ``shard``, only this node's subject files.

    Subject files (``*.h5``/``*.hdf5``) are sorted by relative path and node ``rank`` of ``world``
    keeps those with ``index % world == rank``; every other file (manifest, metadata) is copied to
    every node. Writes ``dst/STAGED.json`` listing the subject files this node holds.

    Copies are created mode 0600 and then given the source's owner bits only (a 0600 or 0644 source
    becomes 0600, a 0444 one 0400): staged data is never more readable than the source, and ``dst``
    should be a :func:`private_dir` (0700) so nobody else can reach it at all.

    Returns
    -------
    dict
        ``{"rank", "world", "shard", "subjects": [...], "bytes"}``.
    """
    if not src.is_dir():
        raise ClusterError(f"--stage source '{src}' is not a directory")
    if not 0 <= rank < world:
        raise ClusterError(f"rank {rank} outside 0..{world - 1}")
    files = sorted(p.relative_to(src) for p in src.rglob("*") if p.is_file())
    subjects = [f for f in files if f.suffix in SUBJECT_SUFFIXES]
    keep_subjects = subjects[rank::world] if shard else subjects
    chosen = [f for f in files if f.suffix not in SUBJECT_SUFFIXES] + keep_subjects
    nbytes = 0
    old = os.umask(0o077)
    try:
        for rel in chosen:
            out = dst / rel
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_name(f"{out.name}.part{os.getpid()}")
            mode = stat.S_IMODE(os.stat(src / rel).st_mode) & 0o700
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "wb") as fo, open(src / rel, "rb") as fi:
                shutil.copyfileobj(fi, fo, 16 << 20)
                os.fchmod(fo.fileno(), mode)
            os.replace(tmp, out)
            nbytes += out.stat().st_size
        info = {"rank": rank, "world": world, "shard": shard, "subjects": [str(f) for f in keep_subjects],
                "bytes": nbytes}
        (dst / "STAGED.json").write_text(json.dumps(info, indent=1))
    finally:
        os.umask(old)
    return info


# --------------------------------------------------------------------------------------------
# Cleanup
# --------------------------------------------------------------------------------------------
NODE_MARKER = "NEUROX_RAY_NODE_TMP"
"""Environment variable set on each node's ``ray start`` (value: that node's Ray temp dir). Every Ray
process of the node inherits it, also workers whose command line Ray renames (``ray::IDLE``)."""


def _proc_uid(pid_dir: Path) -> int | None:
    """Real uid of a process (``/proc/<pid>/status``), or None when it is gone."""
    try:
        for line in (pid_dir / "status").read_text().splitlines():
            if line.startswith("Uid:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def procs_referencing(path: str) -> list[int]:
    """PIDs (other than this one) of a node's Ray processes: the command line mentions ``path`` (the node's
    Ray temp dir) or the environment holds ``NEUROX_RAY_NODE_TMP=<path>``.

    Only this user's processes count: another user's process that merely names the path (``tail -f`` of a
    log, a planted command line) is neither signalled nor waited for, also when running as root."""
    return _procs_naming([path])[path]


def _procs_naming(paths: list[str]) -> dict[str, list[int]]:
    """For each of ``paths``, the PIDs (other than this one) of this user's processes that name it (see
    :func:`procs_referencing`), in one pass over ``/proc``."""
    found: dict[str, list[int]] = {p: [] for p in paths}
    me, uid = os.getpid(), os.geteuid()
    # match the path itself or the path followed by '/' (not a longer sibling like _10 vs _1)
    needles = {p: re.compile(re.escape(p.rstrip("/").encode()) + rb"(?:/|$)") for p in paths}
    markers = {p: f"{NODE_MARKER}={p.rstrip('/')}".encode() for p in paths}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == me:
            continue
        if _proc_uid(d) != uid:
            continue
        try:
            args = (d / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        env = None
        for p in paths:
            if any(needles[p].search(arg) for arg in args):
                found[p].append(int(d.name))
                continue
            if env is None:
                try:
                    env = (d / "environ").read_bytes().split(b"\0")
                except OSError:  # gone
                    env = []
            if markers[p] in env:
                found[p].append(int(d.name))
    return found


def cleanup(path: str, grace_s: float = 10.0, kill_wait_s: float = 5.0) -> int:
    """SIGTERM every process of this user using ``path``, SIGKILL survivors after ``grace_s`` (waiting at most
    ``kill_wait_s`` more), then remove ``path`` if it is this user's directory.

    Another user's processes and a path owned by someone else are skipped (with a note on stderr), never a
    traceback. Returns the number of processes that had to be signalled.
    """
    pids = procs_referencing(path)
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, kill_wait_s)):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
            except PermissionError:  # changed owner (setuid exec) since the scan: not ours to stop
                print(f"ray_cluster: process {pid} is not yours any more; left alone", file=sys.stderr)
        end = time.monotonic() + wait
        while time.monotonic() < end:
            pids = [p for p in pids if Path(f"/proc/{p}").exists() and not _is_zombie(p)]
            if not pids:
                break
            time.sleep(0.1)
        if not pids:
            break
    try:
        st = os.lstat(path)
    except OSError:
        return len(pids)
    if st.st_uid != os.geteuid() or stat.S_ISLNK(st.st_mode):
        print(f"ray_cluster: {path} is not your directory ({_owner(st.st_uid)}); not removing it", file=sys.stderr)
    else:
        shutil.rmtree(path, ignore_errors=True)
    return len(pids)


EMBEDDED_RE = re.compile(r"ray-(\d+)\.[0-9a-f]{8}")
"""Name of an embedded Ray's temp dir (``study.sweep.embedded_temp_dir``): the driver's pid, then a nonce."""


def sweep_stale_embedded(parent: str | os.PathLike) -> list[str]:
    """Remove the embedded-Ray temp dirs (``<parent>/nx-<uid>/ray-<pid>.<nonce>``) that a killed driver left.

    A driver that exits normally removes its own (``study.sweep.disconnect_ray``); a SIGKILLed one (a chaos test,
    the OOM killer, a node's job killed at its walltime) leaves its Ray session behind, 2-4 MB of logs and sockets
    each, on a node-local ``/tmp`` that other jobs share. One is stale when its driver pid is gone and no process of
    this user names the dir (command line or the node marker), so a dir whose pid was reused, or whose Ray processes
    still run, is kept. Only this user's own 0700 parent is looked at, and only real directories of this user are
    removed. Returns the removed paths.
    """
    base = Path(parent) / f"nx-{os.geteuid()}"
    try:
        st = os.lstat(base)
    except OSError:
        return []
    if st.st_uid != os.geteuid() or not stat.S_ISDIR(st.st_mode) or stat.S_IMODE(st.st_mode) & 0o077:
        return []  # not ours, or not private: user_dir refuses it with a message when the driver asks for one
    candidates = []
    for d in base.iterdir():
        m = EMBEDDED_RE.fullmatch(d.name)
        if not m:
            continue
        try:
            os.kill(int(m.group(1)), 0)
            continue  # the driver (or a process that took its pid) is alive: keep
        except ProcessLookupError:
            pass
        except PermissionError:  # another user's process holds the pid now: the driver is gone
            pass
        dst = os.lstat(d)
        if dst.st_uid == os.geteuid() and stat.S_ISDIR(dst.st_mode):
            candidates.append(str(d))
    if not candidates:
        return []
    used = {p for p, pids in _procs_naming(candidates).items() if pids}
    removed = []
    for c in candidates:
        if c not in used:
            shutil.rmtree(c, ignore_errors=True)
            removed.append(c)
    return removed


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cluster.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("addr")
    a.add_argument("--iface")
    a.add_argument("--host-suffix")
    a = sub.add_parser("ports")
    a.add_argument("--host", required=True)
    a.add_argument("--count", type=int, default=1)
    a = sub.add_parser("check-port")
    a.add_argument("--host", required=True)
    a.add_argument("--port", type=int, required=True)
    a = sub.add_parser("nodefile")
    a.add_argument("path", nargs="?")
    a = sub.add_parser("token")
    a.add_argument("path")
    a = sub.add_parser("wait")
    a.add_argument("--address", required=True)
    a.add_argument("--head-ip", required=True)
    a.add_argument("--state-dir", required=True)
    a.add_argument("--nodefile", required=True)
    a.add_argument("--timeout", type=float, default=300.0)
    a.add_argument("--head-pid", type=int)
    a = sub.add_parser("walltime")
    a.add_argument("--jobid")
    a.add_argument("--scheduler")
    a = sub.add_parser("watch-walltime")
    a.add_argument("--stop-file", required=True)
    a.add_argument("--margin", type=float, default=600.0)
    a.add_argument("--jobid")
    a.add_argument("--scheduler")
    a = sub.add_parser("scheduler")
    a.add_argument("--scheduler", default="auto")
    a = sub.add_parser("nodes")
    a.add_argument("--scheduler", default="auto")
    a.add_argument("--nodefile")
    a = sub.add_parser("stage")
    a.add_argument("--src", required=True)
    a.add_argument("--dst", required=True)
    a.add_argument("--rank", type=int, required=True)
    a.add_argument("--world", type=int, required=True)
    a.add_argument("--shard", action="store_true")
    a = sub.add_parser("cleanup")
    a.add_argument("--path", required=True)
    a.add_argument("--grace", type=float, default=10.0)
    a.add_argument("--kill-wait", type=float, default=5.0)
    a = sub.add_parser("private-dir")
    a.add_argument("--parent", required=True)
    a.add_argument("--name", required=True)
    a.add_argument("--per-user", action="store_true")
    sub.add_parser("nonce")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run one sub-command; print its answer; return the exit status."""
    args = _parser().parse_args(argv)
    try:
        if args.cmd == "addr":
            print(resolve_address(args.iface, args.host_suffix))
        elif args.cmd == "ports":
            print(" ".join(map(str, free_ports(args.host, args.count))))
        elif args.cmd == "check-port":
            check_port_free(args.host, args.port)
        elif args.cmd == "nodefile":
            print("\n".join(read_nodefile(args.path or os.environ.get("PBS_NODEFILE"))))
        elif args.cmd == "token":
            write_token(args.path)
        elif args.cmd == "wait":
            ips = wait_for_nodes(args.address, read_nodefile(args.nodefile), args.head_ip,
                                 Path(args.state_dir), args.timeout, head_pid=args.head_pid)
            print(" ".join(ips[r] for r in sorted(ips)))
        elif args.cmd == "walltime":
            left = remaining_walltime(args.jobid, scheduler=args.scheduler)
            print("" if left is None else int(left))
        elif args.cmd == "watch-walltime":
            watch_walltime(Path(args.stop_file), args.margin, args.jobid, scheduler=args.scheduler)
        elif args.cmd == "scheduler":
            print(S.get_scheduler(args.scheduler).name)
        elif args.cmd == "nodes":
            print("\n".join(S.get_scheduler(args.scheduler).hosts(os.environ, args.nodefile)))
        elif args.cmd == "stage":
            info = stage(Path(args.src), Path(args.dst), args.rank, args.world, args.shard)
            print(f"staged {len(info['subjects'])} subject files ({info['bytes']} bytes) to {args.dst}")
        elif args.cmd == "cleanup":
            cleanup(args.path, args.grace, args.kill_wait)
        elif args.cmd == "private-dir":
            print(private_dir(args.parent, args.name, args.per_user))
        elif args.cmd == "nonce":
            print(secrets.token_hex(4))
    except (ClusterError, S.SchedulerError) as e:
        print(f"ray_cluster: {e}", file=sys.stderr)
        return getattr(e, "code", EXIT_BAD_INPUT)
    return 0


if __name__ == "__main__":
    sys.exit(main())
