"""Run a study's specs as Ray Tune trials.

Two trial launchers (:attr:`TrialSetup.launcher`):

* ``"ray-train"``: each trial fits a Ray Train ``TorchTrainer`` (Train V2 pattern): any number of workers,
  DeepSpeed across them, Ray Train's worker-level restarts. The trial driver holds 0.01 CPU.
* ``"inline"`` (single-worker runs, the default for them): the trial actor holds the worker's resources and
  calls ``train()`` itself (:func:`study.launch_ray.run_inline`), and Tune reuses the actor across trials, so
  a trial starts no new process. Failures are retried by Tune from the run's newest checkpoint.

* Grid runs: one Tuner over ``tune.grid_search`` of the spec dicts.
* LR search: runs that differ only in LR are grouped, and each group's Optuna search (log-uniform ``lr``)
  lives in a journal file under the study's storage (:mod:`study.search_state`): generations of LRs, one
  Tuner each, with :class:`StoreASHA`; a rerun of the same command continues every search where it was.
* ASHA (``--asha``) stops poor trials early on ``val_loss`` reported at each evaluation.

Resources per trial and concurrency come from the cluster: a trial driver takes 0.01 CPU (more would
deadlock small machines), each Ray Train worker one GPU (GPU plans) or an equal share of the CPUs.

About 500 lines: placement, trial function, Tune callbacks and the grid / LR-search / ASHA drivers are one
Tune layer over the same trial context.

Every trial gets the study's :class:`~study.run_env.RunEnv` (where results, checkpoints and stop signals are)
and a :class:`TrialSetup` (how it trains), both typed; this module and :mod:`study.launch_ray` are where the
study imports Ray (:func:`connect_ray` included).
"""
from __future__ import annotations

import logging
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import ray
from ray import tune
from ray.tune.schedulers import FIFOScheduler

from study.launch_ray import fit_run
from study.run_env import RunEnv
from study.spec import RunSpec
from study.sweep_bad_data import QUIET_TUNE_ENV, BadDataStop, is_bad_data, request_stop, stopped
from study.sweep_bad_data import reset as reset_bad_data_stop
from study.trace import mark

TRIAL_DRIVER_CPU = 0.01

# Tune's TensorBoard logger notes every non-scalar config value at INFO (our specs hold tuples)
logging.getLogger("ray.tune.logger.tensorboardx").setLevel(logging.WARNING)


#: trials started ahead of a free slot: their Tune actor, Train controller and helper actors start while
#: the running trials train, and their worker placement group waits; when a slot frees only the worker
#: process remains to start (see ``benchmarks/study_overhead.py``)
STAGE_AHEAD = int(os.environ.get("NEUROX_STAGE_AHEAD", "1"))


@dataclass(frozen=True)
class Placement:
    concurrency: int
    num_workers: int
    use_gpu: bool
    cpus_per_worker: float
    stage_ahead: int = 0
    inline: bool = False

    @property
    def max_concurrent_trials(self) -> int:
        """Tune's limit: the trials that run plus the ones staged behind them."""
        return self.concurrency + self.stage_ahead

    @property
    def launcher(self) -> str:
        return "inline" if self.inline else "ray-train"

    @property
    def trial_resources(self) -> dict[str, float]:
        """What one Tune trial actor holds: the worker's share (inline) or a driver's sliver (Ray Train)."""
        if not self.inline:
            return {"CPU": TRIAL_DRIVER_CPU}
        return {"CPU": self.cpus_per_worker, **({"GPU": 1.0} if self.use_gpu else {})}

    def trial_setup(self) -> "TrialSetup":
        """How each trial of a sweep on this placement trains (``run_trials(setup=...)``)."""
        return TrialSetup(launcher=self.launcher, trial_resources=self.trial_resources,
                          num_workers=self.num_workers, use_gpu=self.use_gpu, cpus_per_worker=self.cpus_per_worker)


@dataclass(frozen=True, kw_only=True)
class TrialSetup:
    """How each trial of a sweep trains (from a :class:`Placement`)."""

    launcher: str = "ray-train"
    """``"inline"`` (``train()`` in the reused trial actor) or ``"ray-train"`` (a ``TorchTrainer`` per trial)."""
    trial_resources: dict[str, float] = field(default_factory=lambda: {"CPU": TRIAL_DRIVER_CPU})
    """What one Tune trial actor holds."""
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    max_failures: int = 2
    """Ray Train's worker-level restarts of a run (inline trials: added to Tune's retries)."""
    trial_retries: int = 1
    """Tune's retries of a failed trial."""

    @property
    def inline(self) -> bool:
        return self.launcher == "inline"

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TrialSetup":
        """From :func:`dataclasses.asdict` output (a trial's config; other keys ignored)."""
        names = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in names and v is not None})


def plan_placement(cpus: float, gpus: float, num_workers: int, use_gpu: bool, max_concurrent: int | None = None,
                   stage_ahead: int = STAGE_AHEAD, node_cpus: float | None = None,
                   launcher: str = "auto") -> Placement:
    """Trials that fit ``cpus``/``gpus`` at once and CPUs per worker (pure: no Ray call).

    ``launcher``: ``"inline"``, ``"ray-train"`` or ``"auto"`` (inline when a run has one worker).
    Ray Train trials: every trial driver, staged ones included, holds :data:`TRIAL_DRIVER_CPU`; the rest of
    the CPUs is shared by the running trials' workers. Inline trials are their own worker: no driver share
    and no staging (a reused actor has nothing left to start). CPUs go in steps of 0.01; GPU workers take at
    most 8 CPUs each. A worker lives on one node: with ``node_cpus`` (the largest node's CPUs) it never asks
    for more than that node can give beside all the trial drivers.
    """
    if num_workers < 1:
        raise ValueError(f"num_workers={num_workers}; allowed: >= 1")
    if launcher not in ("auto", "inline", "ray-train"):
        raise ValueError(f"launcher={launcher!r}; allowed: auto, inline, ray-train")
    inline = launcher == "inline" or (launcher == "auto" and num_workers == 1)
    if inline and num_workers != 1:
        raise ValueError(f"the inline launcher runs one worker per trial; this plan has {num_workers}: "
                         f"use --trial-launcher ray-train")
    if inline:
        stage_ahead = 0
    if use_gpu:
        if gpus < num_workers:
            raise RuntimeError(f"the plan needs {num_workers} GPUs per trial but the Ray cluster has {gpus:g}")
        conc = int(gpus // num_workers)
    else:
        conc = max(1, int(cpus // num_workers))
    if max_concurrent:
        conc = min(conc, max_concurrent)
    drivers = 0.0 if inline else (conc + stage_ahead) * TRIAL_DRIVER_CPU
    cpw = (cpus - drivers) / (conc * num_workers)
    if node_cpus:
        cpw = min(cpw, node_cpus - drivers)
    if use_gpu:
        cpw = min(8.0, cpw)
        cpw = float(math.floor(cpw)) if cpw >= 1 else math.floor(cpw * 100) / 100
    else:
        cpw = math.floor(cpw * 100) / 100
    if cpw <= 0:
        raise RuntimeError(f"{cpus:g} CPUs cannot host {conc} trial(s) of {num_workers} worker(s)")
    return Placement(concurrency=conc, num_workers=num_workers, use_gpu=use_gpu, cpus_per_worker=cpw,
                     stage_ahead=stage_ahead, inline=inline)


def placement(num_workers: int, use_gpu: bool, max_concurrent: int | None = None,
              stage_ahead: int = STAGE_AHEAD, launcher: str = "auto") -> Placement:
    """:func:`plan_placement` for the connected Ray cluster."""
    res = ray.cluster_resources()
    node_cpus = max((float(n.get("Resources", {}).get("CPU", 0)) for n in ray.nodes() if n.get("Alive")),
                    default=None)
    return plan_placement(float(res.get("CPU", 1)), float(res.get("GPU", 0)), num_workers, use_gpu,
                          max_concurrent, stage_ahead, node_cpus=node_cpus or None, launcher=launcher)


def probe_address(address: str, timeout: float = 5.0) -> None:
    """Fail fast (seconds, not Ray's minutes of retries) when a ``host:port`` or ``ray://`` / ``http://``
    address does not accept TCP connections. ``auto`` and ``local`` are left to Ray."""
    import socket
    from urllib.parse import urlparse

    if address in ("auto", "local"):
        return
    hostport = urlparse(address).netloc if "://" in address else address
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise ConnectionError(f"cannot reach the Ray cluster at {address!r}: expected host:port")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except OSError as exc:
        raise ConnectionError(f"cannot reach the Ray cluster at {address!r}: {exc}") from exc


#: how long a trial's Train controller waits for its workers' resources (staged trials wait for a slot)
WORKER_WAIT_S = 6 * 3600


def ray_connected() -> bool:
    """Whether this process is connected to Ray (for callers outside the launch and sweep modules)."""
    return ray.is_initialized()


def cluster_cpus() -> float:
    """The connected Ray cluster's CPUs."""
    return float(ray.cluster_resources().get("CPU", 1))


def connect_ray(address: str | None, num_cpus: int | None, repo_root: Path) -> None:
    """Connect to the Ray cluster at ``address`` (or ``RAY_ADDRESS``), or start an embedded loopback-only Ray
    with ``num_cpus``; workers get the environment the study's runs need."""
    env = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2"),
           # a staged trial's controller waits for its workers' resources while other trials train
           "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": os.environ.get("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S",
                                                                    str(WORKER_WAIT_S)),
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "WANDB_MODE": os.environ.get("WANDB_MODE", "offline" if not os.environ.get("WANDB_API_KEY") else "online")}
    from study import trace

    if os.environ.get(trace.ENV):  # phase marks (study.trace) from every worker
        env[trace.ENV] = os.environ[trace.ENV]
    os.environ.update(env)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Tune's TensorBoard files duplicate the results store and make Tune print a hint nobody can act on; its JSON
    # and CSV loggers are added explicitly by run_trials (set this to "0" to have all three back)
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        probe_address(address)
        try:
            ray.init(address=address, runtime_env={"env_vars": env}, log_to_driver=False)
        except Exception as exc:  # ConnectionError, TimeoutError, RuntimeError depending on the failure
            raise ConnectionError(f"cannot reach the Ray cluster at {address!r}: {exc}") from exc
    else:
        pp = os.pathsep.join(p for p in (str(repo_root), os.environ.get("PYTHONPATH", "")) if p)
        # embedded Ray: loopback only, with Ray's default token authentication, and its session, logs and runtime
        # resources in a private 0700 directory of this user instead of the predictable /tmp/ray (SECURITY.md: a
        # shared login node). The dashboard (also on loopback) serves the state API that Ray Train's
        # PlacementGroupCleaner polls: without it a trial stopped by Tune (ASHA) leaks its workers' placement
        # group and the next trial never starts.
        global _EMBEDDED_TMP
        _EMBEDDED_TMP = embedded_temp_dir()
        # Ray logs that it turned token authentication on by default: that is the configuration we want, and
        # the line asks a user to opt out of it
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
        ray.init(num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=False,
                 _node_ip_address="127.0.0.1", _temp_dir=str(_EMBEDDED_TMP),
                 runtime_env={"env_vars": {**env, "PYTHONPATH": pp}})


#: the embedded Ray's private temp dir while it runs (removed by :func:`disconnect_ray`)
_EMBEDDED_TMP: Path | None = None


def embedded_temp_dir(base: str | None = None) -> Path:
    """A new 0700 directory ``<tmp>/nx-<uid>/ray-<pid>.<random>`` for an embedded Ray (``pbs.cluster.private_dir``:
    the per-user parent must be ours and 0700, the directory must not exist yet). ``$NEUROX_RAY_TMP`` sets the base
    (Ray's unix socket paths must stay under ~100 characters)."""
    import secrets
    import tempfile

    from pbs.cluster import ClusterError, private_dir, sweep_stale_embedded

    base = base or os.environ.get("NEUROX_RAY_TMP") or tempfile.gettempdir()
    try:  # what SIGKILLed drivers left (their Ray sessions), before adding ours
        stale = sweep_stale_embedded(base)
    except OSError:
        stale = []
    if stale:
        print(f"removed {len(stale)} Ray temp dir(s) of killed drivers under {Path(stale[0]).parent}", file=sys.stderr)
    try:
        return private_dir(base, f"ray-{os.getpid()}.{secrets.token_hex(4)}", per_user=True)
    except ClusterError as exc:  # another user's nx-<uid>, a planted symlink: one line, like every bad input
        raise RuntimeError(f"embedded Ray's temp dir: {exc}") from None


def disconnect_ray() -> None:
    global _EMBEDDED_TMP
    ray.shutdown()
    if _EMBEDDED_TMP is not None:  # our own embedded Ray's session and logs: nothing else uses them
        import shutil

        shutil.rmtree(_EMBEDDED_TMP, ignore_errors=True)
        _EMBEDDED_TMP = None


def trial(config: dict[str, Any]) -> None:
    """Tune function trainable: one run = ``train()`` in this actor (inline launcher) or one
    ``TorchTrainer.fit`` (reports flow through TuneReportCallback)."""
    spec = trial_spec(config)
    mark("trial_start", run=spec.run_id)
    env = RunEnv.from_dict(config["ctx"]["env"])
    setup = TrialSetup.from_dict(config["ctx"]["setup"])
    if setup.inline:
        from study.launch_ray import run_inline

        run_inline(spec, env, use_gpu=setup.use_gpu)
        mark("fit_returned", run=spec.run_id)
        return
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, int(setup.cpus_per_worker))))
    result = fit_run(spec, env, num_workers=setup.num_workers, use_gpu=setup.use_gpu,
                     cpus_per_worker=setup.cpus_per_worker, max_failures=setup.max_failures, in_tune=True)
    mark("fit_returned", run=spec.run_id)
    if getattr(result, "error", None):
        raise result.error
    # Train reports reach Tune through TuneReportCallback's queue; a short run can end before the last
    # one is consumed, so hand the final metrics to Tune explicitly.
    final = {k: v for k, v in (result.metrics or {}).items() if isinstance(v, (int, float, str, bool))}
    if final:
        tune.report(final)


def error_cause(trial) -> str:
    """The last ``Type: message`` line of a failed trial's traceback (what a user acts on), else a pointer to it."""
    text = ""
    try:  # the driver's staging copy first: the durable one is written after the failure callbacks run
        if trial.error_file and os.path.exists(trial.error_file):
            with open(trial.error_file) as f:
                text = f.read()
        text = text or trial.get_error() or ""
    except Exception:  # noqa: BLE001 - storage gone: say where to look
        pass
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    for ln in reversed(lines):  # a bad subject file, however deep it is wrapped (Ray Train, a DataLoader worker)
        if "BadDataError: " in ln:
            return ln[:500]
    for ln in reversed(lines):
        head = ln.split(":", 1)[0]
        if ":" in ln and head.replace(".", "").replace("_", "").isalnum() and head[:1].isupper():
            return ln[:500]
    return lines[-1][:500] if lines else f"no error text; see {getattr(trial, 'path', '?')}"


class Progress(tune.Callback):
    """Live progress: runs done / running / failed and the best validation loss so far."""

    def __init__(self, total: int, study: str, store_dir: str | None = None) -> None:
        self.total, self.study = total, study  # no stream attribute: Tune pickles its callbacks
        self.store_dir = store_dir  # where early stops are recorded (see :func:`record_early_stop`)
        self.done = self.failed = self.running = self.early_stopped = 0
        self.errors: list[dict] = []  # run id, the error's last line, where Tune keeps its traceback
        self._failed_ids: set[str] = set()  # trials counted as failed (a bad-data failure counts at its first try)
        self.not_run = 0  # trials stopped or never started because the study stopped on a bad subject file
        self.best: tuple[float, str] | None = None
        self.t0 = time.time()

    def _line(self, note: str = "") -> None:
        best = f"best val_loss {self.best[0]:.4f} ({self.best[1]})" if self.best else "best val_loss -"
        el = time.time() - self.t0
        print(f"[{self.study}] {el:6.0f}s  done {self.done}/{self.total}  running {self.running}  "
              f"failed {self.failed}  {best}{'  ' + note if note else ''}", file=sys.stdout, flush=True)

    def _count_running(self, trials, ended=None) -> None:
        self.running = sum(1 for t in trials if t.status == "RUNNING" and t is not ended)

    def on_trial_start(self, iteration, trials, trial, **info):
        self._count_running(trials)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        v = result.get("val_loss")
        if v is not None and math.isfinite(v) and (self.best is None or v < self.best[0]):
            self.best = (float(v), str(result.get("run_id", trial.trial_id)))

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._count_running(trials, ended=trial)
        if trial.trial_id in self._failed_ids:  # failed on bad data, then stopped with the sweep: counted
            return
        if stopped(self.study) and not (trial.last_result or {}).get("is_final"):
            self.not_run += 1  # stopped (or never started) because the study stopped on bad data
            return
        self.done += 1
        note = ""
        last = trial.last_result or {}
        # ended while its last report said "running" (not final, not stopped by the walltime guard):
        # the scheduler (ASHA) stopped it
        if self.store_dir and last.get("status") == "running" and not last.get("is_final"):
            self.early_stopped += 1
            run_id = trial_spec(trial.config).run_id
            step = record_early_stop(self.store_dir, run_id)
            note = f"early-stopped {run_id} at step {step}"
        self._line(note)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._count_running(trials, ended=trial)
        self._failure(trial, final=True)

    def on_trial_recover(self, iteration, trials, trial, **info):
        self._failure(trial, final=False)

    def _failure(self, trial, final: bool) -> None:
        """One console line per failed trial (its cause and where its traceback is; Tune keeps tracebacks off the
        console: :data:`study.sweep_bad_data.QUIET_TUNE_ENV`). A failure on a bad subject file is not retried: it
        stops the study (:func:`study.sweep_bad_data.request_stop`); other failures are retried by Tune and count
        when the retries are spent."""
        if trial.trial_id in self._failed_ids:
            return
        cause = error_cause(trial)
        if not final and not is_bad_data(cause):
            return
        self._failed_ids.add(trial.trial_id)
        self.failed += 1
        try:
            run_id = trial_spec(trial.config).run_id
        except Exception:  # noqa: BLE001 - a config without a spec: name the trial
            run_id = trial.trial_id
        self.errors.append({"run_id": run_id, "cause": cause, "trial_path": str(trial.path or "")})
        log = f"{trial.path}/error.txt" if trial.path else "its trial folder"
        if is_bad_data(cause):
            first = request_stop(self.study, cause)
            self._line(f"FAILED {run_id}: bad subject file{'; stopping the study' if first else ''} "
                       f"(traceback: {log})")
        else:
            self._line(f"FAILED {run_id}: {cause[:200]} (traceback: {log})")


def release_orphaned_placement_groups() -> int:
    """Remove placement groups whose creating actor is dead; returns how many.

    A trial that Tune stops (ASHA) is killed with its Ray Train controller. Ray Train's own cleaner removes
    the workers' placement group it was told about, but a controller killed while it restarts its worker
    group can leave a *second* group that reaches the GCS after the controller died (seen on Ray 2.60:
    such a group stays CREATED, is marked as created by a live actor, and holds the workers' CPUs, so the
    next trial waits forever). Groups created by a driver (Tune's own trial groups) and detached groups are
    never touched. Uses Ray's GCS tables (no dashboard needed); returns 0 if they cannot be read.
    """
    try:
        from ray._private.state import state
        from ray.core.generated import gcs_pb2
        from ray.util.placement_group import PlacementGroup, remove_placement_group

        table = state._connect_and_get_accessor().get_placement_group_table()
    except Exception:  # a Ray without these internals: rely on Ray Train's cleaner alone
        return 0
    data = gcs_pb2.PlacementGroupTableData
    released = 0
    for raw in table:
        pg = data.FromString(raw)
        if pg.state == data.REMOVED or pg.is_detached:
            continue
        creator = ray.ActorID(pg.creator_actor_id)
        if creator.is_nil():
            continue
        if not pg.creator_actor_dead:
            info = state.actor_table(creator.hex())
            if not info or info.get("State") != "DEAD":
                continue
        remove_placement_group(PlacementGroup(ray.PlacementGroupID(pg.placement_group_id)))
        released += 1
    return released


class PlacementGroupJanitor(tune.Callback):
    """Runs :func:`release_orphaned_placement_groups` every ``interval_s`` of Tune's loop."""

    def __init__(self, interval_s: float = 5.0) -> None:
        self.interval_s, self.last, self.released = interval_s, 0.0, 0

    def on_step_end(self, iteration, trials, **info):
        now = time.monotonic()
        if now - self.last >= self.interval_s:
            self.last = now
            n = release_orphaned_placement_groups()
            if n:
                self.released += n
                print(f"released {n} placement group(s) left by a stopped trial's Ray Train controller",
                      flush=True)


def trial_spec(config: dict[str, Any]) -> RunSpec:
    """The run a trial's config describes (an Optuna-suggested ``lr`` replaces the spec's)."""
    spec = RunSpec.from_dict(config["spec"])
    return spec.replace(lr=float(config["lr"])) if "lr" in config else spec


def record_early_stop(store_dir: str, run_id: str) -> int | None:
    """Mark a run the scheduler stopped: its last stored row is re-emitted with ``status="early_stopped"``
    (same key, so it replaces the row). The runner counts such runs as done, so a resumed study does not
    rerun what ASHA already judged; analysis sees the loss the run reached. Returns that row's step."""
    from analysis.store import append_rows, read_table

    try:
        df = read_table(store_dir, "train")
    except (FileNotFoundError, ValueError):
        return None
    rows = df[df["run_id"] == run_id] if "run_id" in df else df.iloc[:0]
    if rows.empty:
        return None
    last = rows.sort_values("step").iloc[-1].to_dict()
    last.update(status="early_stopped", is_final=False)
    append_rows(store_dir, "train", [{k: v for k, v in last.items() if not str(k).startswith("_")}])
    return int(last["step"])


def _tuner(param_space: dict, *, env: RunEnv, setup: TrialSetup, name: str, storage: str, concurrency: int,
           progress: Progress, num_samples: int = 1, search_alg=None, scheduler=None, stage_ahead: int = 0):
    # Tune's function runner can emit a bookkeeping result (e.g. on trial end) without the trial's
    # metrics; with a metric-driven scheduler/searcher its strict check would abort the whole sweep.
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    inline = setup.inline
    trainable = tune.with_resources(trial, setup.trial_resources or {"CPU": TRIAL_DRIVER_CPU})
    tune_config = tune.TuneConfig(num_samples=num_samples, max_concurrent_trials=concurrency + stage_ahead,
                                  search_alg=search_alg, scheduler=scheduler, reuse_actors=inline,
                                  metric="val_loss" if (search_alg or scheduler) else None,
                                  mode="min" if (search_alg or scheduler) else None)
    # Tune's JSON and CSV result files (its ResultGrid reads them) but not its TensorBoard files: nothing reads
    # those, and with them Tune prints a TensorBoard hint nobody can act on (TUNE_DISABLE_AUTO_CALLBACK_LOGGERS
    # is set in connect_ray, so these two are added here explicitly)
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    callbacks = [progress, JsonLoggerCallback(), CSVLoggerCallback()] + ([] if inline else [PlacementGroupJanitor()])
    # inline trials have no Ray Train restarts below them: Tune's retries take Train's share too
    retries = setup.trial_retries + (setup.max_failures if inline else 0)
    for k, v in QUIET_TUNE_ENV.items():  # trial tracebacks stay in each trial's error.txt, off the console
        os.environ.setdefault(k, v)
    run_config = tune.RunConfig(name=name, storage_path=storage, callbacks=callbacks, verbose=0,
                                stop=BadDataStop(progress.study),
                                failure_config=tune.FailureConfig(max_failures=retries))
    # plain dicts in the trial config (Tune stores it); trial() rebuilds the typed objects
    ctx = {"env": env.to_dict(), "setup": asdict(setup)}
    return tune.Tuner(trainable, param_space={**param_space, "ctx": ctx}, tune_config=tune_config,
                      run_config=run_config)


def lr_groups(specs: Iterable[RunSpec]) -> dict[str, list[RunSpec]]:
    """Runs that differ only in their LR (keyed by the spec hash at lr=1)."""
    groups: dict[str, list[RunSpec]] = {}
    for s in specs:
        groups.setdefault(s.replace(lr=1.0).spec_hash, []).append(s)
    return groups


def coarse_to_fine(n: int) -> list[int]:
    """Indices ``0..n-1`` ordered ends and middle first, then ever finer midpoints (0, n-1, n/2, n/4, 3n/4, ...)."""
    order: list[int] = []
    seen: set[int] = set()
    k = 1
    while len(order) < n:
        for j in range(k + 1):
            i = round(j * (n - 1) / k) if n > 1 else 0
            if i not in seen:
                seen.add(i)
                order.append(i)
        k *= 2
    return order


def asha_order(specs: list[RunSpec]) -> list[RunSpec]:
    """The order a grid runs in under ASHA: within each group of runs that differ only in LR, coarse-to-fine
    over the sorted LRs. Asynchronous successive halving can only stop a trial that is worse than trials
    already seen at the same rung, so an ascending LR grid (each run better than the last, up to the optimum)
    is its worst case; spreading the first trials over the range gives it references early. Measured and
    simulated in BENCHMARKS.md (study machinery)."""
    out: list[RunSpec] = []
    for group in lr_groups(specs).values():
        ordered = sorted(group, key=lambda s: s.lr)
        out += [ordered[i] for i in coarse_to_fine(len(ordered))]
    return out


def asha_batches(specs: list[RunSpec]) -> list[tuple[list[RunSpec], bool]]:
    """Split a grid for ASHA: ``(runs, use_asha)`` per Tuner. ASHA compares trials at equal steps, which is
    only fair between runs that differ in LR alone (a longer budget decays its LR later and looks worse
    early); so each LR group of two or more runs gets its own Tuner with ASHA (coarse-to-fine order), and
    runs with nothing to compare to share one Tuner without it."""
    groups = list(lr_groups(specs).values())
    singles = [g[0] for g in groups if len(g) == 1]
    out = [(asha_order(g), True) for g in groups if len(g) > 1]
    return ([(singles, False)] if singles else []) + out


def asha_generations(group: list[RunSpec], size: int) -> list[list[RunSpec]]:
    """An LR group of a grid under ASHA, in generations of ``size`` runs (coarse-to-fine, :func:`asha_order`). A run
    is judged against the runs of earlier generations only (:class:`StoreASHA`), so the early stops are a function
    of the stored rows: the same after a kill and a rerun of the command, whichever trial reported first.
    Computed on the whole group, finished runs included, so a rerun keeps every run in its generation."""
    ordered = asha_order(group)
    size = max(1, int(size))
    return [ordered[i:i + size] for i in range(0, len(ordered), size)]


class StoreASHA(FIFOScheduler):
    """ASHA's stopping rule as a pure function of stored rows (:func:`study.search_state.asha_should_stop`):
    a run is judged on its own validation curve (seeded from the store: rows of an earlier, killed attempt
    count) against ``references`` (the curves of earlier generations' runs, all in the store). No rung state
    lives only in memory, so a resumed study makes the decisions an uninterrupted one makes."""

    def __init__(self, curves: Mapping[str, Mapping[int, float]], references: list[Mapping[int, float]]) -> None:
        super().__init__()
        self.curves = {k: dict(v) for k, v in curves.items()}
        self.references = [dict(r) for r in references]
        self.decisions: dict[str, int] = {}

    def on_trial_result(self, tune_controller, trial, result):
        from study.search_state import asha_should_stop

        step, v = result.get("step"), result.get("val_loss")
        if (result.get("is_final") or result.get("status") != "running" or step is None or v is None
                or not math.isfinite(float(v))):
            return self.CONTINUE
        run_id = str(result.get("run_id") or trial_spec(trial.config).run_id)
        curve = self.curves.setdefault(run_id, {})
        curve.setdefault(int(step), float(v))  # a re-emitted row carries the stored numbers: the first one wins
        rung = asha_should_stop(curve, self.references, max_step=result.get("total_steps"))
        if rung is None:
            return self.CONTINUE
        self.decisions[run_id] = rung
        return self.STOP


def run_lr_search(specs: list[RunSpec], *, env: RunEnv, setup: TrialSetup, storage: str, study: str,
                  concurrency: int, lr_search, asha: bool, stage_ahead: int, progress: Progress) -> None:
    """Durable Optuna LR search per run group (:mod:`study.search_state`): generations of trials asked from the
    group's journal-stored Optuna study, each run as one Tuner (grid over the generation's LRs) with
    :class:`StoreASHA`; a rerun of the same command continues each search where it was."""
    from study.search_state import LRSearchState, journal_path, run_rows, val_curves

    def stop_requested() -> bool:
        return bool((env.stop_file and os.path.exists(env.stop_file)) or (env.deadline and time.time() > env.deadline))

    for key, group in lr_groups(specs).items():
        if stopped(study):  # a bad subject file stopped the study: no later group's search starts
            return
        base = group[0]

        def run_id_of(lr: float, base=base) -> str:
            return base.replace(lr=float(lr)).run_id

        state = LRSearchState(journal_path(env.store_dir), key, seed=base.seed, low=lr_search.low,
                              high=lr_search.high, n_trials=lr_search.n_trials,
                              batch=getattr(lr_search, "batch", None) or concurrency)
        while not stop_requested() and not stopped(study):
            state.sync(env.store_dir, run_id_of)  # runs finished before a kill: told, never rerun
            todo = state.ask_generation()
            if not todo:
                break
            gen = todo[0].generation
            refs = [run_id_of(t.lr) for t in state.references(gen)]
            mine = [run_id_of(t.lr) for t in todo]
            curves = val_curves(run_rows(env.store_dir, refs + mine)) if asha else {}
            scheduler = StoreASHA({r: curves.get(r, {}) for r in mine}, [curves.get(r, {}) for r in refs]) \
                if asha else None
            tuner = _tuner({"spec": tune.grid_search([base.replace(lr=t.lr).to_dict() for t in todo])}, env=env,
                           setup=setup, name=f"{study}-lr-{key}-g{gen}", storage=storage, concurrency=concurrency,
                           progress=progress, scheduler=scheduler,
                           stage_ahead=stage_ahead if len(todo) > concurrency else 0)
            n_errors = len(progress.errors)
            tuner.fit()
            diverged = {e["run_id"] for e in progress.errors[n_errors:] if "TrainingDiverged" in e["cause"]}
            state.sync(env.store_dir, run_id_of, fail=diverged)
            if stopped(study):  # bad data: its trials stay asked, not FAIL (only TrainingDiverged is), and a rerun
                return  # with the file fixed or quarantined runs them with the same LRs; the runner names the file
            if any(t.state == "RUNNING" for t in state.trials() if t.generation == gen):
                # failed for another cause (retries spent on killed actors, a lost node) or stopped by the
                # walltime guard: the next generation waits for these; rerunning the command retries them
                print(f"[{study}] LR search {key}: generation {gen} has unfinished trials; rerun the same "
                      "command to continue the search", flush=True)
                break


def run_grid_asha(specs: list[RunSpec], grid: list[RunSpec], *, env: RunEnv, setup: TrialSetup, storage: str,
                  study: str, concurrency: int, stage_ahead: int, progress: Progress) -> None:
    """A grid under ASHA without an LR search: runs with nothing to compare to (alone in their LR group) in one
    Tuner; every LR group of two or more runs in :func:`asha_generations` of ``concurrency`` runs, one Tuner per
    generation with :class:`StoreASHA` against the earlier generations' stored curves (the rule the durable LR
    search uses). ``grid`` is the whole grid (finished runs included), ``specs`` what is left to run."""
    from study.search_state import run_rows, val_curves

    todo = {s.run_id for s in specs}
    for k, (batch, use_asha) in enumerate(asha_batches(grid)):
        if stopped(study):  # a bad subject file stopped the study: no further Tuner
            return
        if not use_asha:
            mine = [s for s in batch if s.run_id in todo]
            if mine:
                _tuner({"spec": tune.grid_search([s.to_dict() for s in mine])}, env=env, setup=setup,
                       name=f"{study}-tune", storage=storage, concurrency=concurrency, progress=progress,
                       stage_ahead=stage_ahead if len(mine) > concurrency else 0).fit()
            continue
        key = lr_groups(batch).popitem()[0]
        gens = asha_generations(batch, concurrency)
        for g, gen in enumerate(gens):
            mine = [s.run_id for s in gen if s.run_id in todo]
            if not mine or stopped(study):
                continue
            refs = [s.run_id for earlier in gens[:g] for s in earlier]
            curves = val_curves(run_rows(env.store_dir, refs + mine))
            scheduler = StoreASHA({r: curves.get(r, {}) for r in mine}, [curves.get(r, {}) for r in refs])
            _tuner({"spec": tune.grid_search([s.to_dict() for s in gen if s.run_id in todo])}, env=env, setup=setup,
                   name=f"{study}-asha-{key}-g{g}", storage=storage, concurrency=concurrency, progress=progress,
                   scheduler=scheduler).fit()


def run_trials(specs: list[RunSpec], *, env: RunEnv, setup: TrialSetup, storage: str, study: str,
               concurrency: int, lr_search=None, asha: bool = False, max_steps: int | None = None,
               stage_ahead: int = 0, grid: list[RunSpec] | None = None) -> dict[str, int]:
    """Run ``specs`` (already filtered to what is not finished) and return trial counts.

    Each trial gets the run environment ``env`` and trains as ``setup`` says (:meth:`Placement.trial_setup`).

    ``concurrency`` trials run at once; ``stage_ahead`` more start early and wait for their workers'
    resources (the placement must leave them :data:`TRIAL_DRIVER_CPU` each: :func:`plan_placement`).
    With ``asha`` (and no LR search) the grid runs as :func:`run_grid_asha` says; ``grid`` is the study's whole
    grid, finished runs included (default ``specs``): it fixes each run's ASHA generation across reruns.
    ``max_steps`` is accepted for callers and unused: the stored-row rule reads each run's own step count, and
    never stops a run at its last step.
    """
    if not isinstance(env, RunEnv) or not isinstance(setup, TrialSetup):
        raise TypeError("run_trials() needs env= (a study.run_env.RunEnv) and setup= (a TrialSetup)")
    progress = Progress(total=len(specs) if lr_search is None else
                        len(lr_groups(specs)) * lr_search.n_trials, study=study,
                        store_dir=env.store_dir if asha else None)
    reset_bad_data_stop(study)
    progress._line("starting")

    if lr_search is None and asha:
        run_grid_asha(specs, list(grid) if grid is not None else specs, env=env, setup=setup, storage=storage,
                      study=study, concurrency=concurrency, stage_ahead=stage_ahead, progress=progress)
    elif lr_search is None:
        _tuner({"spec": tune.grid_search([s.to_dict() for s in specs])}, env=env, setup=setup, name=f"{study}-tune",
               storage=storage, concurrency=concurrency, progress=progress,
               stage_ahead=stage_ahead if len(specs) > concurrency else 0).fit()
    else:
        run_lr_search(specs, env=env, setup=setup, storage=storage, study=study, concurrency=concurrency,
                      lr_search=lr_search, asha=asha, stage_ahead=stage_ahead, progress=progress)
    return {"done": progress.done, "failed": progress.failed, "early_stopped": progress.early_stopped,
            "errors": progress.errors, "bad_data_stop": stopped(study), "not_run": progress.not_run}
