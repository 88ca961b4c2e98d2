"""Seeded chaos campaign (issue #29 item 3): random kills during a small study with an Optuna LR search and
early stopping, each followed by the documented recovery, compared with an uninterrupted study.

The study (:func:`search_plan`): one run group of tiny NeuroMamba runs (CPU, fp32, 9 steps, an evaluation and
a checkpoint every step) whose peak LR is searched by Optuna (6 trials in generations of 2, durable in the
study's journal, :mod:`study.search_state`) with ASHA-style early stopping (``--asha``: :class:`study.sweep.StoreASHA`).
With ``--study grid`` (:func:`grid_plan`) the same runs take 6 fixed LRs and no search: ``--asha`` then runs the
grid in generations of 2, each judged against the earlier generations' stored curves
(:func:`study.sweep.run_grid_asha`), and the comparison is of the runs, their rows and their early stops.

A schedule (seeded) is a list of kills at random points of the study (after a random number of stored rows,
plus a random 0-2 s):

* ``driver``: SIGKILL of the driver's whole process group (and any of its Ray processes left), then the
  documented recovery: rerun the same command;
* ``trial``: SIGKILL of one trial actor (``ray::ImplicitFunc``, a descendant of this campaign's driver:
  other users' processes are never touched); the recovery is automatic (Tune retries the trial, the run
  resumes from its newest checkpoint);
* ``worker`` (with ``--launcher ray-train``, where each trial fits a Ray Train ``TorchTrainer``): SIGKILL of one
  Ray Train worker (``ray::RayTrainWorker``, a descendant of the driver); the recovery is automatic (Ray Train
  restarts the worker group from the run's newest checkpoint);
* ``disk`` (a storage fault; ``--kinds driver trial disk``, needs root): the study's storage is a tmpfs of its
  own, filled to ENOSPC for a random 1-4 s, then freed. Writes in that window fail (a checkpoint, a result row,
  Optuna's journal, Tune's state); the recovery is automatic (Tune retries the trial) or, when the command
  exits with an error, rerunning it.
* ``readonly`` (a storage fault; needs root): the study's tmpfs is remounted read-only for a random 1-4 s (as a
  shared file system does when its server or the client's lease is lost), then read-write again; every write in
  that window fails with EROFS; the recovery is as for ``disk``. A remount to read-only waits (up to 10 s) for
  a moment when no file of the study is open for writing, which the kernel requires; if none comes, the fault
  is recorded as not applied.

With ``--cluster`` (needs root) every study runs on two network-namespace nodes (``tests/pbs/pbs_netns.py``; node 0
the head, node 1 a worker) as ``pbs/ray_cluster.sh run --head-restarts <kills> -- <study> --address auto``, one PBS
job (its own job id) per invocation, the reference included (and compared with the embedded Ray's reference), and
two more kinds join (victims only in this cluster's namespaces):

* ``head``: SIGKILL of the head's GCS server; the recovery is the bootstrap's: it sees the head's Ray exit, stops
  the study command, restarts the head on the same addresses, every node agent restarts its Ray against it, and
  the command runs again and resumes from storage (after ``--head-restarts`` restarts, or if one fails, it exits 1
  and the documented recovery is rerunning the same command, as a chained job does);
* ``node``: SIGKILL of every Ray process of the worker node at once (``ray start``, raylet, agents, workers: what a
  lost host takes; its node agent, which stands for the scheduler's per-node task, stays), once a trial actor runs
  there (waiting up to 30 s for one; else the node goes down idle): Ray marks the node dead
  and Tune retries its trial on the head node from the newest checkpoint. The bootstrap does not restart a lost
  node by itself: the agent waits 20 s for a head restart (whose agents all rejoin), else reports the node failed
  and exits, and the study finishes on the head node; a later head restart then fails on that node and exits 1,
  and the recovery is the rerun;
* ``driver``: SIGKILL of the study command's process group under the bootstrap, which then tears the cluster
  down and exits with the command's status: rerun (resubmit) the same command;
* ``trial``: one trial actor on either node (automatic, as without ``--cluster``).

After the schedule the command is rerun until it exits 0, and the study is compared with a reference
(uninterrupted, same seed): the same suggested LRs (trial by trial), the same Optuna trial states and values,
the same finished and early-stopped runs at the same rungs, every (run_id, step) training row once in the raw parts
(the early-stop mark, a copy of a row by design, is not a training row) with equal numbers (rel 1e-6).

    OMP_NUM_THREADS=1 python benchmarks/chaos.py --seeds 1 2 3 --kills 4 --out chaos.json
    OMP_NUM_THREADS=1 python benchmarks/chaos.py --launcher ray-train --kinds driver trial worker --out w.json
    OMP_NUM_THREADS=1 python benchmarks/chaos.py --cluster --kinds driver trial node head --seeds 171 172 --kills 3

Prints and writes JSON (also ``<workdir>/seed<N>.json`` as each schedule ends): per schedule the kills (kind,
time, whether a victim was found), recoveries, time to recover (kill to the study's next new row), rows lost /
duplicated, decisions and suggestions that differed, and the compute lost (:func:`compute_lost`: steps trained
twice per run, from the raw result rows, against the checkpoint interval). The studies run from the committed
code (``git archive HEAD``), frozen once per workdir; a second campaign in the same workdir reuses its reference.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from study.plans import LRSearch, StudyPlan  # noqa: E402
from study.spec import RunSpec  # noqa: E402

STUDY = "chaos"
#: every kind of fault a schedule can draw from
KINDS = ("driver", "trial", "worker", "disk", "readonly", "node", "head")
#: kinds that fault the study's own file system (a tmpfs of its own: :func:`mount_small_disk`, needs root)
STORAGE_KINDS = ("disk", "readonly")
#: kinds that need the study on a cluster (``--cluster``: namespace nodes under ``pbs/ray_cluster.sh run``)
CLUSTER_KINDS = ("node", "head")


@dataclass(frozen=True)
class BatchedLRSearch(LRSearch):
    """An LR search with a fixed generation size (``study.search_state``; default: the trial concurrency)."""

    batch: int = 2


def search_plan(opts: Any = None) -> StudyPlan:
    """One LR group of tiny NeuroMamba runs, 6 Optuna trials in generations of 2 (preset ``chaos:search_plan``)."""
    base = RunSpec(study=getattr(opts, "study_name", None) or STUDY, family="neuromamba", size="debug",
                   grid=(24, 24, 24), sequence_length=8, batch_size=4, budget_kind="steps", budget=9,
                   eval_every=1, eval_windows=2, checkpoint_every=1, manifest=getattr(opts, "manifest", None) or "",
                   precision="fp32", schedule="constant", warmup_frac=0.0, lr=1e-3)
    return StudyPlan(name=STUDY, specs=[base], description="chaos campaign study",
                     lr_search=BatchedLRSearch(low=1e-5, high=3e-2, n_trials=6, batch=2),
                     cohort={"n_subjects": 12, "grid": (24, 24, 24), "n_frames": 16, "seed": 0})


#: the grid study's LRs (``--study grid``): the search's range, 6 runs, in ASHA generations of 2
GRID_LRS = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2)


def grid_plan(opts: Any = None) -> StudyPlan:
    """The same runs on a fixed LR grid with no search (preset ``chaos:grid_plan``): under ``--asha`` the grid runs
    in generations of 2 (:func:`study.sweep.run_grid_asha`), each judged against the earlier ones' stored curves."""
    plan = search_plan(opts)
    return StudyPlan(name=STUDY, specs=[plan.specs[0].replace(lr=lr) for lr in GRID_LRS],
                     description="chaos campaign study (LR grid, ASHA generations)", cohort=plan.cohort)


#: where the study's code runs from: the repository, or a frozen copy (:func:`freeze`)
ROOT = REPO
#: how the campaign's trials train (``--trial-launcher``): "auto" (inline, one worker per run) or "ray-train"
LAUNCHER = "auto"
#: which study the campaign faults: "search" (the Optuna LR search) or "grid" (a fixed LR grid, ASHA generations)
PLAN = "search"
#: the process title of each kill kind's victims (descendants of the campaign's driver only)
VICTIM_TITLE = {"trial": "ray::ImplicitFunc", "worker": "RayTrainWorker"}


def freeze(dest: Path, cluster: bool = False) -> Path:
    """Run the studies from a copy of the code: on a shared checkout another engineer's edit would change the
    study's source hash between a study and its rerun, and the study guard rightly refuses to mix results."""
    import shutil

    global ROOT
    dest = Path(dest)
    pkgs = ("study", "neuro_models", "data", "analysis", "pbs")
    if not (dest / "study").exists():
        dest.mkdir(parents=True, exist_ok=True)
        # the committed code (git HEAD), not the working tree: another engineer's half-made edit of one module
        # (seen: study/train.py importing a name study/loop.py did not have yet) would fail every trial
        arch = subprocess.run(["git", "archive", "HEAD", *pkgs], cwd=REPO, capture_output=True)
        if arch.returncode == 0 and arch.stdout:
            subprocess.run(["tar", "-x", "-C", str(dest)], input=arch.stdout, check=True)
        else:  # not a git checkout: the working tree
            for pkg in pkgs:
                shutil.copytree(REPO / pkg, dest / pkg, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        (dest / "benchmarks").mkdir(parents=True, exist_ok=True)
        shutil.copy2(HERE / "chaos.py", dest / "benchmarks" / "chaos.py")
    if cluster and not (dest / "tests" / "pbs" / "fake_mpiexec.sh").exists():
        # the namespace nodes and the launcher stand-in the cluster mode runs the bootstrap with (test harness)
        harness = [f"tests/pbs/{f}" for f in ("pbs_netns.py", "fake_mpiexec.sh", "node_local.sh")]
        arch = subprocess.run(["git", "archive", "HEAD", *harness], cwd=REPO, capture_output=True)
        if arch.returncode == 0 and arch.stdout:
            subprocess.run(["tar", "-x", "-C", str(dest)], input=arch.stdout, check=True)
        else:
            (dest / "tests" / "pbs").mkdir(parents=True, exist_ok=True)
            for f in harness:
                shutil.copy2(REPO / f, dest / f)
    ROOT = dest
    return dest


def command(storage: Path, name: str = STUDY, launcher: str | None = None) -> list[str]:
    launcher = launcher or LAUNCHER
    return [sys.executable, "study/scaling_law.py", "--preset", f"chaos:{PLAN}_plan", "--study-name", name,
            "--storage", str(storage), "--num-cpus", "2", "--max-concurrent", "2", "--asha", "--no-report",
            *(["--trial-launcher", launcher] if launcher != "auto" else [])]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), str(ROOT / "benchmarks"),
                                                      os.environ.get("PYTHONPATH", "")) if p)}


# ------------------------------------------------------------------------------------------------------ cluster
#: the cluster the studies run on (``--cluster``), or None: an embedded local Ray per invocation
CLUSTER: "Cluster | None" = None


class Cluster:
    """Two network-namespace nodes (``tests/pbs/pbs_netns.NetnsNodes``: node 0 the head, node 1 a worker) on which
    every invocation of the study runs as ``pbs/ray_cluster.sh run --head-restarts K -- <study> --address auto``
    (a PBS job of its own: job id, state dir, node agents through the ``mpiexec`` stand-in), the way
    ``tests/pbs/test_netns_head_loss.py`` runs it. Needs root. Victims are found only in this cluster's namespaces
    (and the study command among them): other users' processes are never touched. :meth:`close` removes the
    namespaces, their processes, and every job's Ray temp dirs and state dirs, also after a failure."""

    def __init__(self, workdir: Path, head_restarts: int, num_cpus: int = 2):
        harness = ROOT / "tests" / "pbs"
        if str(harness) not in sys.path:
            sys.path.insert(0, str(harness))
        from pbs_netns import NetnsNodes, netns_unavailable_reason

        reason = netns_unavailable_reason()
        if reason:
            raise RuntimeError(f"--cluster needs network namespaces: {reason}")
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.head_restarts, self.num_cpus = head_restarts, num_cpus
        self.nodes = NetnsNodes(2, self.workdir)
        self.jobkeys: list[str] = []
        self._next = 80000 + random.SystemRandom().randrange(9000) * 10

    def popen(self, storage: Path, name: str, log) -> subprocess.Popen:
        """Start one invocation (a new job id: a rerun is a resubmitted job) in node 0, output to ``log``."""
        self._next += 1
        jobkey = str(self._next)
        self.jobkeys.append(jobkey)
        env = {k: v for k, v in _env().items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH",
                                                             "RAY_AUTH_MODE")}
        env.update(PBS_NODEFILE=str(self.nodes.nodefile), PBS_JOBID=f"{jobkey}.chaospbs",
                   NX_NETNS_MAP=str(self.nodes.mapfile), NEUROX_LAUNCHER=str(ROOT / "tests" / "pbs" / "fake_mpiexec.sh"),
                   NEUROX_STATE_DIR=str(self.workdir / "state"), NEUROX_PYTHON=sys.executable,
                   PATH=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '/usr/bin:/bin')}",
                   RAY_USAGE_STATS_ENABLED="0")
        argv = [*self.nodes.prefix(0), str(ROOT / "pbs" / "ray_cluster.sh"), "run", "--iface", "hsn0",
                "--num-cpus", str(self.num_cpus), "--object-store-bytes", "100000000", "--join-timeout", "240",
                "--head-restarts", str(self.head_restarts), "--",
                *command(storage, name), "--address", "auto"]
        return subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)

    def _procs(self, i: int) -> list[tuple[int, list[str], bytes]]:
        out = []
        for pid in self.nodes.pids_in(i):
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                env = Path(f"/proc/{pid}/environ").read_bytes()
            except OSError:
                continue
            out.append((pid, [c.decode(errors="replace") for c in cmd if c], env))
        return out

    def victims(self, kind: str) -> list[int]:
        """This cluster's processes a kill of ``kind`` targets (pids; empty when there is none now).

        * ``head``: the head's GCS server (node 0);
        * ``node``: every Ray process of the worker node (its ``ray start``, raylet, agents, workers: they carry
          the bootstrap's node marker ``NEUROX_RAY_NODE_TMP``), not its node agent, which stands for the
          scheduler's per-node task;
        * ``trial``: the trial actors (``ray::ImplicitFunc``) on either node;
        * ``driver``: the study command (a session leader the bootstrap started in node 0)."""
        if kind == "head":
            return [p for p, cmd, _ in self._procs(0) if cmd and "gcs_server" in cmd[0]]
        if kind == "node":
            return self.nodes.ray_pids(1)
        if kind == "trial":
            return self.trials_on(0) + self.trials_on(1)
        if kind == "driver":
            out = []
            for p, cmd, _ in self._procs(0):
                try:
                    leader = os.getpgid(p) == p
                except ProcessLookupError:
                    continue
                if leader and any(c.endswith("study/scaling_law.py") for c in cmd[:2]):
                    out.append(p)
            return out
        raise ValueError(f"no cluster victims for kind {kind!r}")

    def trials_on(self, i: int) -> list[int]:
        """The trial actors running on node ``i``."""
        return [p for p, cmd, _ in self._procs(i) if VICTIM_TITLE["trial"] in " ".join(cmd)]

    def close(self) -> None:
        """Every process in the namespaces, the namespaces, and the jobs' node-local temp dirs and state dirs."""
        import shutil

        try:
            self.nodes.close()
        finally:
            base = Path("/tmp") / f"nx-{os.geteuid()}"
            for key in self.jobkeys:
                for d in base.glob(f"{key}.*_*"):
                    shutil.rmtree(d, ignore_errors=True)
                shutil.rmtree(self.workdir / "state" / key, ignore_errors=True)


def kill_pids(pids: list[int], groups: bool = True) -> None:
    """SIGKILL ``pids`` (and, with ``groups``, their process groups) at once: the namespace harness's ``sigkill``
    (on ``sys.path`` once a cluster exists; every kill that uses this is a cluster kill)."""
    from pbs_netns import sigkill

    sigkill(pids, groups)


def launch(storage: Path, name: str, log) -> subprocess.Popen:
    """One invocation of the study: on an embedded Ray, or (``--cluster``) under the bootstrap on the cluster."""
    if CLUSTER is not None:
        return CLUSTER.popen(storage, name, log)
    return subprocess.Popen(command(storage, name), cwd=ROOT, env=_env(), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)


def stop(proc: subprocess.Popen, timeout: float = 60) -> None:
    """End an invocation this campaign started: SIGTERM (the bootstrap tears its cluster down), then SIGKILL."""
    if proc.poll() is not None:
        return
    if CLUSTER is None:
        _kill_tree(proc)
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        _kill_tree(proc)


# ------------------------------------------------------------------------------------------------------ snapshot
def snapshot(storage: Path, name: str = STUDY) -> dict[str, Any]:
    """What a study left: its searches (trial by trial), its rows (deduplicated), raw key counts, decisions."""
    import pandas as pd

    from study.search_state import (LRSearchState, asha_should_stop, journal_path, run_rows, val_curves)

    store = storage / name / "store"
    plan = search_plan(argparse.Namespace(study_name=name))
    spec = plan.specs[0].replace(manifest=_manifest(storage), study=name)
    key = spec.replace(lr=1.0).spec_hash  # study.sweep.lr_groups' key
    ls = plan.lr_search
    trials = (LRSearchState(journal_path(store), key, seed=spec.seed, low=ls.low, high=ls.high,
                            n_trials=ls.n_trials, batch=ls.batch).trials() if PLAN == "search" else [])
    rows = run_rows(store)
    raw = training_rows(store)  # a duplicate is a training row written twice (as compute_lost counts)
    counts = raw.groupby(["run_id", "step"]).size() if len(raw) else pd.Series(dtype=int)
    curves = val_curves(rows)
    run_of = {t.number: spec.replace(lr=t.lr).run_id for t in trials}
    decisions = {}
    for t in trials:  # the rung each run was stopped at, recomputed from the rows (the rule is pure)
        refs = [curves.get(run_of[r.number], {}) for r in trials if r.generation < t.generation]
        decisions[run_of[t.number]] = asha_should_stop(curves.get(run_of[t.number], {}), refs, max_step=9)
    if PLAN == "grid":  # the grid's generations, as study.sweep.run_grid_asha forms them
        from study.sweep import asha_generations

        gspecs = [s.replace(manifest=spec.manifest, study=name) for s in grid_plan().specs]
        gens = [[s.run_id for s in g] for g in asha_generations(gspecs, 2)]
        for g, gen in enumerate(gens):
            refs = [curves.get(r, {}) for earlier in gens[:g] for r in earlier]
            for r in gen:
                decisions[r] = asha_should_stop(curves.get(r, {}), refs, max_step=9)
    status = {}
    if len(rows):
        for rid, g in rows.groupby("run_id"):
            st = set(g["status"].astype(str)) if "status" in g else set()
            status[rid] = ("finished" if g["is_final"].fillna(False).astype(bool).any()
                           else "early_stopped" if "early_stopped" in st else "unfinished")
    dup = {f"{k[0]}@{k[1]}": int(v) for k, v in counts.items() if v > 1}
    return {"trials": [t.__dict__ for t in trials], "status": status, "decisions": decisions,
            "rows": {f"{r.run_id}@{int(r.step)}": float(r.val_loss) for r in rows.itertuples()
                     if getattr(r, "val_loss", None) is not None},
            "duplicates": dup}


def _manifest(storage: Path) -> str:
    found = sorted((storage / "cohorts").glob("*/manifest.parquet"))
    return str(found[0]) if found else ""


def compare(ref: dict[str, Any], got: dict[str, Any], rel: float = 1e-6) -> dict[str, Any]:
    """Differences between a chaos study and its reference (all empty / zero when it recovered exactly)."""
    rt, gt = ref["trials"], got["trials"]
    lr_diff = [i for i in range(max(len(rt), len(gt)))
               if i >= len(rt) or i >= len(gt) or abs(rt[i]["lr"] - gt[i]["lr"]) > rel * abs(rt[i]["lr"])]
    state_diff = [i for i in range(min(len(rt), len(gt)))
                  if (rt[i]["state"], rt[i]["early_stopped"]) != (gt[i]["state"], gt[i]["early_stopped"])]
    dec_diff = sorted(k for k in set(ref["decisions"]) | set(got["decisions"])
                      if ref["decisions"].get(k) != got["decisions"].get(k))
    status_diff = sorted(k for k in set(ref["status"]) | set(got["status"])
                         if ref["status"].get(k) != got["status"].get(k))
    # rows: every row of the reference must be there with equal numbers; a stopped run may have a row or two
    # past its rung in either study (a stopped trial's last report races its kill), so those are not counted
    lost = [k for k in ref["rows"] if k not in got["rows"] and not _past_stop(k, ref)]
    extra = [k for k in got["rows"] if k not in ref["rows"] and not _past_stop(k, got)]
    unequal = [k for k in ref["rows"] if k in got["rows"]
               and abs(ref["rows"][k] - got["rows"][k]) > rel * max(1.0, abs(ref["rows"][k]))]
    return {"suggestions_differing": len(lr_diff), "trial_states_differing": len(state_diff),
            "decisions_differing": len(dec_diff) + len(status_diff), "rows_lost": len(lost),
            "rows_extra": len(extra), "rows_unequal": len(unequal), "rows_duplicated": len(got["duplicates"]),
            "detail": {"lr": lr_diff, "state": state_diff, "decisions": dec_diff, "status": status_diff,
                       "lost": lost[:10], "extra": extra[:10], "unequal": unequal[:10],
                       "duplicated": list(got["duplicates"])[:10]}}


def _past_stop(key: str, snap: dict[str, Any]) -> bool:
    rid, step = key.rsplit("@", 1)
    rung = snap["decisions"].get(rid)
    return snap["status"].get(rid) == "early_stopped" and rung is not None and int(step) > rung


# ------------------------------------------------------------------------------------------------------ running
def _descendants(pid: int) -> list:
    import psutil

    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _kill_tree(proc: subprocess.Popen) -> None:
    kids = _descendants(proc.pid)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for p in kids:  # Ray processes that left the group (none expected): still ours
        try:
            p.kill()
        except Exception:  # noqa: BLE001 - already gone
            pass
    proc.wait()


def _n_rows(storage: Path, name: str) -> int:
    from study.search_state import run_rows

    return len(run_rows(storage / name / "store"))


def _run_steps(storage: Path, name: str) -> dict[str, int]:
    """Each run's newest stored step (deduplicated rows) at this moment."""
    rows = run_rows_safe(storage / name / "store")
    return {str(r): int(g["step"].max()) for r, g in rows.groupby("run_id")} if len(rows) else {}


def run_rows_safe(store: Path):
    from study.search_state import run_rows

    return run_rows(store)


def training_rows(store: Path):
    """Every raw (run_id, step) row of the store's parts, duplicates kept, early-stop marks left out. The mark
    re-emits, by design, the row of the step at which the stop reached the run (the last one of an inline trial,
    an earlier one when a Ray Train trial trains on for a step or three while it stops): not a training row."""
    import pandas as pd
    import pyarrow.parquet as pq

    parts = sorted((store / "train").glob("part-*.parquet")) if (store / "train").exists() else []
    frames = [pd.read_parquet(p, columns=[c for c in ("run_id", "step", "status") if c in pq.read_schema(p).names])
              for p in parts]
    raw = pd.concat(frames) if frames else pd.DataFrame(columns=["run_id", "step", "status"])
    if "status" not in raw:
        raw["status"] = None
    return raw[raw["status"].astype(str) != "early_stopped"]


def compute_lost(storage: Path, kills: list[dict[str, Any]], name: str = STUDY,
                 interval: int = 1) -> dict[str, Any]:
    """Compute lost per kill, measured from the raw result parts (every step writes a row: ``eval_every=1``).

    A run's steps trained across its attempts are its raw rows; a step trained twice (a resumed attempt that
    started before a step already stored) leaves a second raw row for that (run_id, step). So the steps redone
    are raw rows minus distinct steps, per run (the early-stop mark, which replaces a run's last row by design,
    excepted), and each kill is charged the steps redone by the runs it interrupted (those with a stored step
    at the kill that had not finished). The step in flight at the kill (at most one checkpoint interval, no row
    yet) is lost by construction and not visible in rows: the bound checked is redone <= interval per kill."""
    trained = training_rows(storage / name / "store")
    per_run = {str(r): {"raw_steps": int(len(g)), "distinct_steps": int(g["step"].nunique()),
                        "redone": int(len(g) - g["step"].nunique())} for r, g in trained.groupby("run_id")}
    per_kill = []
    for k in kills:
        if not k.get("applied"):
            continue
        hit = sorted(k.get("steps_at_kill", {}))
        per_kill.append(sum(per_run.get(r, {}).get("redone", 0) for r in hit))
    redone = sum(v["redone"] for v in per_run.values())
    return {"checkpoint_interval_steps": interval, "steps_redone_total": redone,
            "steps_redone_per_kill_max": max(per_kill, default=0),
            "kills_over_interval": sum(1 for x in per_kill if x > interval), "per_run": per_run}


def run_reference(storage: Path, name: str = STUDY, timeout: float = 1800) -> float:
    t0 = time.time()
    storage.mkdir(parents=True, exist_ok=True)
    log_path = storage.parent / f"{storage.name}-driver.log"
    with open(log_path, "wb") as log:
        proc = launch(storage, name, log)
    try:
        rc = proc.wait(timeout)
    finally:
        stop(proc)
    if rc != 0:
        raise RuntimeError(f"reference study failed (rc {rc}):\n{log_path.read_text(errors='replace')[-5000:]}")
    return time.time() - t0


def run_schedule(storage: Path, seed: int, n_kills: int, *, name: str = STUDY, max_rows: int = 40,
                 kinds: tuple[str, ...] = ("driver", "trial"), timeout: float = 3600) -> dict[str, Any]:
    """Run the study under a seeded schedule of ``n_kills`` kills, recover each as documented, finish it.

    Kill ``i`` comes once the store holds a random number of rows (distinct, sorted, in ``1..max_rows``; the
    study writes 46) plus a random 0-2 s: so every kill lands while the study trains, at a random point of
    a run (between evaluations, mid-checkpoint, between a row and Optuna's tell, between generations)."""
    rng = random.Random(seed)
    points = sorted(rng.sample(range(1, max_rows + 1), n_kills))
    schedule = [(rng.choice(kinds), p, rng.uniform(0.0, 2.0)) for p in points]
    t_start = time.time()
    # every invocation's output, appended, beside the storage (which a storage fault may make unwritable):
    # why a command exited with an error is read there
    log_path = storage.parent / f"{storage.name}-driver.log"
    launches: list[subprocess.Popen] = []

    def start() -> subprocess.Popen:
        with open(log_path, "ab") as log:
            log.write(f"\n==== invocation {len(launches) + 1} at {time.time() - t_start:.1f} s\n".encode())
            log.flush()
            launches.append(launch(storage, name, log))
            return launches[-1]

    try:
        return _schedule(storage, name, seed, schedule, rng, start, t_start, log_path, timeout)
    finally:  # also after a failure: no invocation of this schedule outlives it
        for p in launches:
            stop(p)


def _schedule(storage, name, seed, schedule, rng, start, t_start, log_path, timeout) -> dict[str, Any]:
    kills: list[dict[str, Any]] = []
    proc = start()
    reruns = 0
    driver_exit = None
    extra: dict[str, Any] = {}
    for kind, at_rows, jitter in schedule:
        while _n_rows(storage, name) < at_rows:
            if proc.poll() is not None:
                if proc.returncode == 0:
                    break
                # the command stopped with an error (a trial whose retries a kill spent stays asked and the
                # search waits for the next command): the documented recovery, rerun it
                proc = start()
                reruns += 1
            time.sleep(0.3)
        time.sleep(jitter)
        if proc.poll() is not None and proc.returncode != 0:  # failed (e.g. a bootstrap out of head restarts)
            proc = start()
            reruns += 1
        if proc.poll() is not None:  # the study ended before this kill: the schedule's rest is not applied
            kills.append({"kind": kind, "at_rows": at_rows, "applied": False, "why": "study already done"})
            continue
        rows_before = _n_rows(storage, name)
        steps_at_kill = _run_steps(storage, name)
        t_kill = time.time()
        if kind == "driver" and CLUSTER is not None:
            # the study command under the bootstrap (its whole group); the bootstrap sees it fail with the head
            # alive, exits with its status and tears the cluster down: the documented recovery is to rerun (resubmit)
            victims = _wait_victims(proc, kind)
            applied = bool(victims)
            t_kill = time.time()
            if victims:
                kill_pids(victims)
                try:
                    rec_exit = proc.wait(120)
                except subprocess.TimeoutExpired:
                    rec_exit = None
                    stop(proc)
                driver_exit = rec_exit
                rows_before = _n_rows(storage, name)  # after the teardown: no row of the killed study comes later
                proc = start()
                reruns += 1
        elif kind == "driver":
            _kill_tree(proc)
            rows_before = _n_rows(storage, name)  # rows the dying driver's trials wrote are not a recovery
            applied = True
            proc = start()  # the documented recovery
            reruns += 1
        elif kind in ("head", "node") or (kind == "trial" and CLUSTER is not None):
            # head: SIGKILL of the head's GCS server; the bootstrap (--head-restarts) sees the head's Ray exit,
            # stops the command, restarts the head, its node agents restart their Ray against it, and it reruns the
            # command (the study resumes from storage). node: SIGKILL of every Ray process of the worker node at
            # once, as a lost host takes them (its agent stays); Ray marks the node dead, Tune retries its trial on
            # the head node from the newest checkpoint. trial: one trial actor on either node.
            if kind == "node":
                # a node loss that takes a trial with it is the case to recover from: wait (up to 30 s) until
                # a trial actor runs on the worker node; if none comes, the node goes down idle
                t_look = time.time()
                while proc.poll() is None and time.time() - t_look < 30 and not CLUSTER.trials_on(1):
                    time.sleep(0.2)
            victims = _wait_victims(proc, kind)
            applied = bool(victims)
            on_node = None
            restarts_before = _log_count(log_path, HEAD_RESTARTED)
            t_kill = time.time()
            if victims:
                if kind == "node":
                    on_node = len(CLUSTER.trials_on(1))  # trials it ran
                    kill_pids(victims)
                else:
                    kill_pids([rng.choice(victims)], groups=False)
                rows_before = _n_rows(storage, name)
            if kind == "node":
                extra["trials_on_node"] = on_node
            if victims and kind == "head":
                # rows the dying study's trials still write (a trial on node 1 trains on until its raylet notices)
                # are not a recovery: wait for the bootstrap's restart, then for the rerun's first new row
                end = time.time() + 600
                while (time.time() < end and proc.poll() is None
                       and _log_count(log_path, HEAD_RESTARTED) <= restarts_before):
                    time.sleep(0.3)
                extra["head_restart_s"] = round(time.time() - t_kill, 1)
                # False: the kill came after the study command had ended (the bootstrap was tearing down)
                extra["head_restarted"] = _log_count(log_path, HEAD_RESTARTED) > restarts_before
                rows_before = _n_rows(storage, name)
        elif kind == "disk":
            # storage fault: the study's disk (a tmpfs of its own, :func:`mount_small_disk`) fills up for a
            # random 1-4 s, then the ballast is deleted (the operator frees space). Any write in that window
            # (a result row, a checkpoint, Optuna's journal, Tune's experiment state) gets ENOSPC.
            hold = rng.uniform(1.0, 4.0)
            _, free = fill_disk(storage)
            time.sleep(hold)
            (storage / "ballast.bin").unlink(missing_ok=True)
            rows_before = _n_rows(storage, name)
            applied = free < 65536
        elif kind == "readonly":
            # storage fault: the study's file system goes read-only for a random 1-4 s (EROFS for every write)
            hold = rng.uniform(1.0, 4.0)
            applied = remount(storage, "ro", timeout=10.0)
            t_kill = time.time()
            if applied:
                time.sleep(hold)
            if not remount(storage, "rw", timeout=120.0):
                raise RuntimeError(f"could not remount {storage} read-write again")
            rows_before = _n_rows(storage, name)
        else:
            victims: list = []
            t_look = time.time()
            while not victims and proc.poll() is None and time.time() - t_look < 60:
                victims = [p for p in _descendants(proc.pid) if VICTIM_TITLE[kind] in " ".join(_cmdline(p))]
                if not victims:
                    time.sleep(0.3)
            applied = bool(victims)
            t_kill = time.time()
            if victims:
                rng.choice(victims).kill()
                rows_before = _n_rows(storage, name)
        rec = {"kind": kind, "at_rows": at_rows, "applied": applied, "rows_before": rows_before,
               "t": round(t_kill - t_start, 2), "steps_at_kill": steps_at_kill}
        if driver_exit is not None:
            rec["bootstrap_exit"] = driver_exit
            driver_exit = None
        rec.update(extra)
        extra.clear()
        if kind in STORAGE_KINDS:
            rec["hold_s"] = round(hold, 2)
        # time to recover: the kill to the next new row (or the study's end)
        while time.time() - t_kill < 600 and _n_rows(storage, name) <= rows_before:
            if proc.poll() is not None:
                if proc.returncode == 0:
                    break
                rec["driver_exit"] = proc.returncode  # the fault failed the command: rerun it, as documented
                rec["driver_said"] = last_invocation_lines(log_path)
                proc = start()
                reruns += 1
            time.sleep(0.5)
        rec["recover_s"] = round(time.time() - t_kill, 1)
        kills.append(rec)
    # finish: wait, rerun the same command until it exits 0
    rc = proc.wait(timeout=max(1.0, timeout - (time.time() - t_start)))
    final = 0
    while rc != 0 and final < 4:
        final += 1
        proc = start()
        reruns += 1
        rc = proc.wait(timeout=timeout)
    return {"seed": seed, "kills": kills, "reruns": reruns, "exit": rc, "wall_s": round(time.time() - t_start, 1)}


#: what the bootstrap prints once a head restart is done (every node joined again)
HEAD_RESTARTED = "ray_cluster: head restarted"


def _log_count(log_path: Path, needle: str) -> int:
    try:
        return log_path.read_text(errors="replace").count(needle)
    except OSError:
        return 0


def _wait_victims(proc: subprocess.Popen, kind: str, patience: float = 60.0) -> list[int]:
    """Victims of a ``kind`` kill on the cluster, waiting up to ``patience`` s for one (a head restart or a rerun
    may be starting the cluster's Ray again); empty if the invocation ended or none came."""
    t_look = time.time()
    while proc.poll() is None and time.time() - t_look < patience:
        found = CLUSTER.victims(kind)
        if found:
            return found
        time.sleep(0.3)
    return []


def last_invocation_lines(log_path: Path, n: int = 4) -> list[str]:
    """The last ``n`` non-empty lines the latest invocation in a schedule's driver log printed (why it exited)."""
    try:
        text = log_path.read_text(errors="replace")
    except OSError:
        return []
    last = text.rsplit("\n==== invocation ", 1)[-1].splitlines()[1:]
    return [line[:300] for line in last if line.strip()][-n:]


def fill_disk(disk: Path, leave_bytes: int = 0) -> tuple[Path, int]:
    """Fill ``disk`` with a ballast file until ENOSPC, then free ``leave_bytes``; returns the ballast path and the
    bytes left free (also the fault-injection tests' way: tests/faults/test_storage_full.py)."""
    ballast = disk / "ballast.bin"
    chunk = b"\0" * 65536
    with open(ballast, "wb", buffering=0) as fh:
        try:
            while True:
                fh.write(chunk)
        except OSError:
            pass
    if leave_bytes:
        os.truncate(ballast, max(0, ballast.stat().st_size - leave_bytes))
    st = os.statvfs(disk)
    return ballast, st.f_bavail * st.f_frsize


def mount_small_disk(path: Path, size: str = "96m") -> None:
    """Mount a tmpfs of its own at ``path`` (a study's storage, ~2 MB) so that a ``disk`` fault fills only it
    (needs root / CAP_SYS_ADMIN; RuntimeError otherwise)."""
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "neurox-chaos", str(path)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"cannot mount a tmpfs for disk faults: {r.stderr.strip()}")


def remount(path: Path, mode: str, timeout: float) -> bool:
    """Remount ``path`` (a mount point of its own) ``ro`` or ``rw``. The kernel refuses a read-only remount
    (EBUSY) while any file on it is open for writing: retry every 20 ms until ``timeout``; False if it never took."""
    end = time.time() + timeout
    while True:
        r = subprocess.run(["mount", "-o", f"remount,{mode}", str(path)], capture_output=True, text=True)
        if r.returncode == 0:
            return True
        if time.time() >= end:
            return False
        time.sleep(0.02)


def _cmdline(p) -> list[str]:
    try:
        return p.cmdline()
    except Exception:  # noqa: BLE001 - gone or not ours
        return []


def campaign(workdir: Path, seeds: list[int], n_kills: int, launcher: str = "auto", plan: str = "search",
             cluster: bool = False, **kw) -> dict[str, Any]:
    """Run the reference (once per workdir) and one schedule per seed; with ``cluster``, every study (reference
    included) runs on a 2-node namespace cluster under ``pbs/ray_cluster.sh run --head-restarts <n_kills>``."""
    global LAUNCHER, PLAN, CLUSTER
    kinds = tuple(kw.get("kinds", ()))
    if "worker" in kinds and launcher != "ray-train":
        raise ValueError("'worker' kills need Ray Train workers: pass launcher='ray-train' (--launcher ray-train)")
    if plan not in ("search", "grid"):
        raise ValueError(f"plan={plan!r}; expected 'search' or 'grid'")
    if set(CLUSTER_KINDS) & set(kinds) and not cluster:
        raise ValueError("'node' and 'head' kills need the study on a cluster: pass cluster=True (--cluster)")
    if cluster and set(kinds) - {"driver", "trial", *CLUSTER_KINDS}:
        raise ValueError(f"--cluster takes the kinds driver, trial, node, head; got {kinds}")
    LAUNCHER, PLAN = launcher, plan
    workdir.mkdir(parents=True, exist_ok=True)
    freeze(workdir / "code", cluster=cluster)
    if not cluster:
        return _campaign(workdir, seeds, n_kills, launcher, plan, **kw)
    CLUSTER = Cluster(workdir / "cluster", head_restarts=max(1, n_kills))
    try:
        out = _campaign(workdir, seeds, n_kills, launcher, plan, tag="-cluster", **kw)
    finally:
        CLUSTER.close()
        CLUSTER = None
    # the cluster's uninterrupted study against an embedded Ray's (same code, same seed): the placement of
    # trials on nodes must not change a number
    ref_dir = workdir / "reference"
    if not (ref_dir / "reference.json").exists():
        import shutil

        # the same cohort files (run ids hash the manifest), as for every schedule
        shutil.copytree(workdir / "reference-cluster" / "cohorts", ref_dir / "cohorts", dirs_exist_ok=True)
        wall = run_reference(ref_dir)
        (ref_dir / "reference.json").write_text(json.dumps({"wall_s": wall}))
    cmp = compare(snapshot(ref_dir), snapshot(workdir / "reference-cluster"))
    out["reference"]["vs_embedded"] = cmp
    out["summary"]["cluster_reference_vs_embedded"] = {k: v for k, v in cmp.items() if k != "detail"}
    return out


def _campaign(workdir: Path, seeds: list[int], n_kills: int, launcher: str, plan: str, tag: str = "",
              **kw) -> dict[str, Any]:
    tag = "".join(f"-{t}" for t in (launcher, plan) if t not in ("auto", "search")) + tag
    ref_dir = workdir / f"reference{tag}"
    done = (ref_dir / "reference.json")
    if done.exists():  # a campaign in this workdir ran it already (same frozen code): reuse it
        ref_s = json.loads(done.read_text())["wall_s"]
    else:
        ref_s = run_reference(ref_dir)
        done.write_text(json.dumps({"wall_s": ref_s}))
    ref = snapshot(ref_dir)
    out = {"launcher": launcher, "plan": plan, "cluster": CLUSTER is not None,
           "reference": {"wall_s": round(ref_s, 1), "trials": ref["trials"], "status": ref["status"]},
           "schedules": []}
    for seed in seeds:
        sdir = workdir / f"seed{seed}{tag}"
        # the cohort is generated once per storage: copy the reference's so the manifest hash matches
        import shutil

        if set(STORAGE_KINDS) & set(kw.get("kinds", ())):
            mount_small_disk(sdir)
        sdir.mkdir(parents=True, exist_ok=True)
        shutil.copytree(ref_dir / "cohorts", sdir / "cohorts", dirs_exist_ok=True)
        res = run_schedule(sdir, seed, n_kills, **kw)
        res["compare"] = compare(ref, snapshot(sdir))
        res["compute"] = compute_lost(sdir, res["kills"])
        out["schedules"].append(res)
        (workdir / f"{sdir.name}.json").write_text(json.dumps(res, indent=1, default=str))  # per schedule
        print(json.dumps({k: v for k, v in res.items() if k != "compare"} |
                         {"compare": {k: v for k, v in res["compare"].items() if k != "detail"}}), flush=True)
    applied = [k for s in out["schedules"] for k in s["kills"] if k.get("applied")]
    tot = {k: sum(s["compare"][k] for s in out["schedules"]) for k in
           ("suggestions_differing", "trial_states_differing", "decisions_differing", "rows_lost", "rows_extra",
            "rows_unequal", "rows_duplicated")}
    out["summary"] = {"schedules": len(seeds), "kills_applied": len(applied),
                      "steps_redone_total": sum(s["compute"]["steps_redone_total"] for s in out["schedules"]),
                      "steps_redone_per_kill_max": max((s["compute"]["steps_redone_per_kill_max"]
                                                        for s in out["schedules"]), default=0),
                      "by_kind": {kd: sum(1 for k in applied if k["kind"] == kd) for kd in KINDS},
                      "recovered": sum(1 for s in out["schedules"] if s["exit"] == 0),
                      "recover_s_max": max((k["recover_s"] for k in applied), default=None), **tot}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--kills", type=int, default=4, help="kills per schedule")
    ap.add_argument("--max-rows", type=int, default=40,
                    help="kills come at random row counts up to this (the study writes 46 rows)")
    ap.add_argument("--kinds", nargs="+", default=["driver", "trial"], choices=list(KINDS),
                    help="kill kinds drawn from (disk: the study's own tmpfs fills up for 1-4 s; readonly: it "
                         "goes read-only for 1-4 s; both need root; worker: a Ray Train worker, with --launcher "
                         "ray-train)")
    ap.add_argument("--launcher", choices=["auto", "ray-train"], default="auto",
                    help="the study's --trial-launcher (ray-train: a Ray Train TorchTrainer per trial)")
    ap.add_argument("--study", choices=["search", "grid"], default="search",
                    help="search: the Optuna LR search (6 trials in generations of 2); grid: the same runs on a "
                         "fixed grid of 6 LRs under --asha (ASHA generations of 2, no search)")
    ap.add_argument("--cluster", action="store_true",
                    help="run every study on 2 network-namespace nodes under `pbs/ray_cluster.sh run --head-restarts "
                         "<kills>` (root); kinds: driver (the study command), trial, node (every Ray process of the "
                         "worker node), head (the head's GCS server)")
    ap.add_argument("--workdir", default=None, help="where the studies go (default: a new temp dir)")
    ap.add_argument("--out", default=None, help="write the JSON here too")
    args = ap.parse_args(argv)
    import tempfile

    if "worker" in args.kinds and args.launcher != "ray-train":
        ap.error("--kinds worker needs --launcher ray-train (inline trials have no Ray Train workers)")
    if set(CLUSTER_KINDS) & set(args.kinds) and not args.cluster:
        ap.error("--kinds node/head need --cluster (the study on namespace nodes under pbs/ray_cluster.sh)")
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="neurox-chaos-"))
    res = campaign(workdir, args.seeds, args.kills, launcher=args.launcher, plan=args.study, max_rows=args.max_rows,
                   kinds=tuple(args.kinds), cluster=args.cluster)
    text = json.dumps(res, indent=1, default=str)
    if args.out:
        Path(args.out).write_text(text)
    print(json.dumps(res["summary"], indent=1))
    return 0 if all(res["summary"][k] == 0 for k in ("suggestions_differing", "decisions_differing", "rows_lost",
                                                      "rows_duplicated", "rows_unequal")) else 1


if __name__ == "__main__":
    sys.exit(main())
