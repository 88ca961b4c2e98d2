"""The run environment: where a run's results, checkpoints and stop signals are, handed from the study runner
(:mod:`study.runner`) through the sweep (:mod:`study.sweep`) to either launcher (:mod:`study.launch_ray`,
:mod:`study.launch_local`), and the one place that builds a run's reporters.

:class:`RunEnv` is a frozen dataclass of plain values, so it crosses process boundaries as is (a Tune trial's
config, a Ray Train worker's ``train_loop_config``: :meth:`RunEnv.to_dict` / :meth:`RunEnv.from_dict`).
:func:`build_reporters` gives the reporters a run's rank 0 feeds (JSONL, results store with the run's static
columns, W&B); the launchers add their own (Ray's, Tune's) and wrap them.

This module imports neither Ray nor W&B at import time (W&B only when a run asks for it).
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from study.provenance import provenance
from study.reporters import JSONLReporter, StoreReporter, progress_table
from study.spec import RunSpec


@dataclass(frozen=True, kw_only=True)
class RunEnv:
    """Everything about where a run lives that is not the run itself (:class:`~study.spec.RunSpec`)."""

    storage: str | None = None
    """Run storage: run ``r`` keeps its checkpoints under ``<storage>/<r>`` (Ray's ``checkpoint_*`` and the
    inline launcher's ``inline/checkpoints``); W&B files go to ``<storage>/wandb``."""
    store_dir: str | None = None
    """The study's results store (``analysis.store``); ``None``: rows go nowhere durable."""
    stop_file: str | None = None
    """A file whose appearance stops the run gracefully (final checkpoint; the walltime guard writes it)."""
    deadline: float | None = None
    """``time.time()`` after which the run stops gracefully (``--walltime-s``)."""
    manifest_hash: str | None = None
    """The cohort manifest's content hash, computed once by the runner (provenance columns)."""
    wandb: bool = False
    """Also log to W&B (offline unless a key is configured)."""
    wandb_sweep_id: str | None = None
    """The W&B sweep the study's runs join (made by the runner), if any."""
    device: str | None = None
    """Device kind for the workers (``cuda``, ``xpu``, ``cpu``); ``None``: detected."""

    def run_storage(self, spec: RunSpec) -> Path | None:
        """``<storage>/<run_id>``: where this run's checkpoints are (``None`` without storage)."""
        return Path(self.storage) / spec.run_id if self.storage else None

    @property
    def wandb_dir(self) -> str | None:
        """Where W&B writes (``<storage>/wandb``) when the run logs to W&B, else ``None``."""
        return str(Path(self.storage) / "wandb") if self.wandb and self.storage else None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "RunEnv":
        """From :meth:`to_dict`'s output (keys that are not fields are ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def static_row(spec: RunSpec, manifest_hash: str | None = None) -> dict:
    """Columns every result row of ``spec`` carries (identity, spec fields, provenance)."""
    prov = provenance(spec.manifest, manifest_hash=manifest_hash)
    return {"run_id": spec.run_id, "study": spec.study, "family": spec.family, "size": spec.size,
            "width": spec.width, "parametrization": spec.parametrization, "lr": spec.lr, "base_lr": spec.lr,
            "batch_size": spec.batch_size, "n_subjects": spec.n_subjects,
            "mixture": json.dumps(spec.cohorts), "seed": spec.seed, **prov, **spec.flat_columns()}


def build_reporters(spec: RunSpec, env: RunEnv, *, rank: int = 0, jsonl: str | os.PathLike | None = None,
                    wandb_dir: str | os.PathLike | None = None, wandb_group: str | None = None) -> list:
    """The reporters rank ``rank`` of a run feeds (an empty list on other ranks).

    Parameters
    ----------
    spec, env
        The run and where it lives.
    jsonl : path, optional
        A ``metrics.jsonl`` file (plain-python / torchrun runs).
    wandb_dir : path, optional
        Where W&B writes when ``env.wandb``; default ``env.wandb_dir``.
    wandb_group : str, optional
        The W&B group (the Ray launchers group a study's runs by ``spec.study``).

    Returns
    -------
    list
        JSONL (``jsonl``), the results store (``env.store_dir``, with :func:`static_row`'s columns; a metric
        may not overwrite one: :class:`~study.reporters.StoreReporter` raises) and W&B (``env.wandb``, in the
        sweep ``env.wandb_sweep_id`` if any).
    """
    if rank != 0:
        return []
    reporters: list = []
    if jsonl is not None:
        reporters.append(JSONLReporter(Path(jsonl)))
    if env.store_dir:
        from analysis.store import ResultsStore

        reporters.append(StoreReporter(ResultsStore(env.store_dir), static_row(spec, env.manifest_hash),
                                       table=progress_table(spec.task)))
    if env.wandb:
        from study.wandb_reporter import WandbReporter

        if env.wandb_sweep_id:
            os.environ["NEUROX_WANDB_SWEEP_ID"] = env.wandb_sweep_id
        where = wandb_dir if wandb_dir is not None else env.wandb_dir
        reporters.append(WandbReporter(spec, dir=where, group=wandb_group))
    return reporters
