"""The scheduler seam of the cluster layer: what the bootstrap asks of PBS or Slurm, one class each.

A scheduler answers four questions from inside a job: is this its job (:meth:`Scheduler.detect`), the job id,
the job's hosts (head first), and the walltime left. How nodes are started (``mpiexec``/``pbsdsh`` or ``srun``),
how a continuation job is chained (``qsub -W depend=afterany`` or ``sbatch --dependency=afterany``) and how it
is cancelled live beside it in ``pbs/schedulers/<name>.sh`` (the shell half of the same seam). Site settings
(modules, interfaces, collective libraries, device kind) are not here: they are profiles, ``pbs/profiles/``.

Adding a scheduler = a subclass here registered in :data:`SCHEDULERS` plus ``pbs/schedulers/<name>.sh``.
Imports neither ``study`` nor ``ray``.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Mapping


class SchedulerError(Exception):
    """A job environment the bootstrap cannot use (names the variable or file and what was expected)."""


def _hms_to_s(text: str) -> int:
    """``[days-]hh:mm:ss`` / ``mm:ss`` / ``ss`` (PBS and Slurm time formats) to seconds."""
    text = text.strip()
    days = 0
    if "-" in text:
        d, text = text.split("-", 1)
        days = int(d)
    s = 0
    for p in text.split(":"):
        s = s * 60 + int(p)
    return days * 86400 + s


def unique_hosts(lines) -> list[str]:
    """Unique host names in order, ignoring blank lines and ``#`` comments."""
    hosts: list[str] = []
    for line in lines:
        h = line.split("#", 1)[0].strip()
        if h and h not in hosts:
            hosts.append(h)
    return hosts


def read_hostfile(path: str | os.PathLike | None, what: str = "PBS_NODEFILE") -> list[str]:
    """Unique hosts of a node file (PBS repeats a host per chunk/cpu)."""
    if not path:
        raise SchedulerError(f"no node file: {what} is unset (run inside a PBS job or pass --nodefile)")
    p = Path(path)
    if not p.is_file():
        raise SchedulerError(f"node file '{p}' does not exist")
    hosts = unique_hosts(p.read_text().splitlines())
    if not hosts:
        raise SchedulerError(f"node file '{p}' lists no hosts")
    return hosts


# --------------------------------------------------------------------------------------------
# Slurm host lists
# --------------------------------------------------------------------------------------------
def _split_top(text: str) -> list[str]:
    """Split on commas outside brackets: ``a[1-2],b`` -> ``['a[1-2]', 'b']``."""
    parts, depth, cur = [], 0, ""
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise SchedulerError(f"unbalanced ']' in Slurm host list {text!r}")
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    if depth != 0:
        raise SchedulerError(f"unbalanced '[' in Slurm host list {text!r}")
    parts.append(cur)
    return parts


def _expand_range(body: str, whole: str) -> list[str]:
    out = []
    for item in body.split(","):
        if not re.fullmatch(r"\d+(-\d+)?", item):
            raise SchedulerError(f"bad range {item!r} in Slurm host list {whole!r} (expected N or N-M)")
        if "-" in item:
            lo, hi = item.split("-")
            if int(hi) < int(lo):
                raise SchedulerError(f"descending range {item!r} in Slurm host list {whole!r}")
            width = len(lo)  # zero padding is kept: nid[001-003] -> nid001 nid002 nid003
            out += [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
        else:
            out.append(item)
    return out


def expand_hostlist(text: str) -> list[str]:
    """Expand a Slurm host list (``SLURM_JOB_NODELIST``) the way ``scontrol show hostnames`` does.

    Handles ``nid[001-003,007]``, several groups (``a[1-2],b3``), several bracket groups in one name
    (``rack[1-2]-node[01-02]``, expanded as a product in order) and keeps zero padding.

    Raises
    ------
    SchedulerError
        On unbalanced brackets, an empty name or a range that is not ``N`` or ``N-M`` ascending.
    """
    text = text.strip()
    if not text:
        raise SchedulerError("empty Slurm host list")
    hosts: list[str] = []
    for part in _split_top(text):
        if not part:
            raise SchedulerError(f"empty host name in Slurm host list {text!r}")
        names = [""]
        for literal, body in re.findall(r"([^\[\]]*)(?:\[([^\]]*)\])?", part):
            if not literal and body == "":
                continue
            items = _expand_range(body, text) if body else [""]
            names = [n + literal + i for n in names for i in items]
        for n in names:
            if n not in hosts:
                hosts.append(n)
    return hosts


# --------------------------------------------------------------------------------------------
# The interface and its implementations
# --------------------------------------------------------------------------------------------
class Scheduler:
    """What the bootstrap asks of a batch scheduler from inside a job (the Python half of the seam).

    Attributes
    ----------
    name : str
        The name ``--scheduler`` takes, and the shell half's file name ``pbs/schedulers/<name>.sh``.
    """

    name = ""

    def detect(self, env: Mapping[str, str]) -> bool:
        """True when ``env`` is the environment of one of this scheduler's jobs."""
        raise NotImplementedError

    def job_id(self, env: Mapping[str, str]) -> str | None:
        """The job id, or None outside a job."""
        raise NotImplementedError

    def hosts(self, env: Mapping[str, str], nodefile: str | None = None) -> list[str]:
        """Unique hosts of the job, the head (the host running the job script) first."""
        raise NotImplementedError

    def walltime_left(self, env: Mapping[str, str]) -> float | None:
        """Seconds before the job's walltime ends, or None when unknown."""
        raise NotImplementedError


class PBS(Scheduler):
    """PBS Pro / OpenPBS (Aurora, Polaris): ``$PBS_NODEFILE``, ``$PBS_JOBID``, ``qstat -f``."""

    name = "pbs"

    def __init__(self, qstat: str = "qstat"):
        self.qstat = qstat

    def detect(self, env):
        return bool(env.get("PBS_JOBID") or env.get("PBS_NODEFILE"))

    def job_id(self, env):
        return env.get("PBS_JOBID") or None

    def hosts(self, env, nodefile=None):
        return read_hostfile(nodefile or env.get("PBS_NODEFILE"), "PBS_NODEFILE")

    def walltime_left(self, env):
        jobid = self.job_id(env)
        if not jobid or not shutil.which(self.qstat):
            return None
        try:
            out = subprocess.run([self.qstat, "-f", jobid], capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.TimeoutExpired):
            return None
        total = re.search(r"Resource_List\.walltime\s*=\s*([\d:]+)", out)
        if not total:
            return None
        used = re.search(r"resources_used\.walltime\s*=\s*([\d:]+)", out)
        return float(_hms_to_s(total.group(1)) - (_hms_to_s(used.group(1)) if used else 0))


class Slurm(Scheduler):
    """Slurm (Frontier, Perlmutter): ``$SLURM_JOB_NODELIST`` (compressed), ``$SLURM_JOB_ID``, the walltime from
    ``$SLURM_JOB_END_TIME`` (Slurm >= 21.08) or ``squeue -h -j ID -o %L``."""

    name = "slurm"

    def __init__(self, squeue: str = "squeue"):
        self.squeue = squeue

    def detect(self, env):
        return bool(env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID"))

    def job_id(self, env):
        return env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID") or None

    def hosts(self, env, nodefile=None):
        if nodefile:
            hosts = read_hostfile(nodefile, "--nodefile")
        else:
            text = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
            if not text:
                raise SchedulerError("no node list: SLURM_JOB_NODELIST is unset (run inside a Slurm job "
                                     "(sbatch/salloc) or pass --nodefile)")
            hosts = expand_hostlist(text)
        # the batch script runs on the allocation's first node, which Slurm names in SLURMD_NODENAME
        me = env.get("SLURMD_NODENAME")
        if me in hosts:
            hosts.remove(me)
            hosts.insert(0, me)
        return hosts

    def walltime_left(self, env, now: float | None = None):
        end = env.get("SLURM_JOB_END_TIME")
        if end and end.isdigit() and int(end) > 0:
            return float(int(end) - (time.time() if now is None else now))
        jobid = self.job_id(env)
        if not jobid or not shutil.which(self.squeue):
            return None
        try:
            out = subprocess.run([self.squeue, "-h", "-j", jobid, "-o", "%L"], capture_output=True, text=True,
                                 timeout=30).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return None
        if not re.fullmatch(r"(\d+-)?\d+(:\d+){0,2}", out):  # UNLIMITED, NOT_SET, empty
            return None
        return float(_hms_to_s(out))


#: every scheduler the bootstrap knows, by ``--scheduler`` name (each with ``pbs/schedulers/<name>.sh``)
SCHEDULERS: dict[str, type[Scheduler]] = {"pbs": PBS, "slurm": Slurm}


def get_scheduler(name: str | None, env: Mapping[str, str] | None = None) -> Scheduler:
    """The scheduler named ``name`` (``pbs``, ``slurm``), or for ``auto``/None the one whose job this is
    (Slurm when only Slurm's variables are set, else PBS, which also serves a plain ``--nodefile``)."""
    env = os.environ if env is None else env
    if name in (None, "", "auto"):
        slurm, pbs = Slurm(), PBS()
        return slurm if slurm.detect(env) and not pbs.detect(env) else pbs
    if name not in SCHEDULERS:
        raise SchedulerError(f"scheduler {name!r}; allowed: auto, {', '.join(sorted(SCHEDULERS))}")
    return SCHEDULERS[name]()


def walltime_left(env: Mapping[str, str] | None = None, scheduler: str | None = None) -> float | None:
    """Seconds left in this job: ``$NEUROX_WALLTIME_S`` (seconds left at the time of the call) if set, else the
    scheduler's answer."""
    env = os.environ if env is None else env
    if env.get("NEUROX_WALLTIME_S"):
        return float(env["NEUROX_WALLTIME_S"])
    return get_scheduler(scheduler, env).walltime_left(env)
