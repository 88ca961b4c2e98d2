"""Reporters: where :func:`study.train.train` sends metrics and checkpoints.

The train function sees only the :class:`Reporter` protocol:

* ``log(metrics)`` every ``log_every`` optimizer steps (cheap: a JSONL line, a W&B point);
* ``report(metrics, checkpoint_dir=None)`` at each evaluation, with the checkpoint saved at that step,
  if any (Ray reports it as a ``ray.train.Checkpoint``; the results store gets one row).

Only rank 0's calls are forwarded by :class:`RankZero`, except ``report`` under Ray, which every rank
must call (Ray Train V2 gathers per-rank checkpoint shards). This module imports neither Ray nor W&B;
those reporters live in :mod:`study.launch_ray` and :mod:`study.wandb_reporter`.
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Iterable, Protocol


class Reporter(Protocol):
    def log(self, metrics: dict[str, Any]) -> None: ...

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None = None) -> None: ...

    def close(self) -> None: ...


def _jsonable(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if hasattr(v, "item"):
        return v.item()
    return v


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


class NullReporter:
    def log(self, metrics: dict[str, Any]) -> None:
        pass

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None = None) -> None:
        pass

    def close(self) -> None:
        pass


class MemoryReporter(NullReporter):
    """Keeps every logged and reported dict in memory (tests, notebooks)."""

    def __init__(self) -> None:
        self.logs: list[dict[str, Any]] = []
        self.reports: list[dict[str, Any]] = []
        self.checkpoints: list[str | None] = []

    def log(self, metrics: dict[str, Any]) -> None:
        self.logs.append(dict(metrics))

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None = None) -> None:
        self.reports.append(dict(metrics))
        self.checkpoints.append(checkpoint_dir)


class JSONLReporter(NullReporter):
    """Appends one JSON line per log/report to ``path`` (flushed each line, so a crash loses nothing)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "a", buffering=1)

    def _write(self, kind: str, metrics: dict[str, Any], **extra: Any) -> None:
        rec = {"kind": kind, "time": time.time(), **{k: _jsonable(v) for k, v in metrics.items()}, **extra}
        self._fh.write(json.dumps(rec, default=str) + "\n")

    def log(self, metrics: dict[str, Any]) -> None:
        self._write("log", metrics)

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None = None) -> None:
        self._write("report", metrics, checkpoint=checkpoint_dir)

    def close(self) -> None:
        if not self._fh.closed:
            self._fh.close()


def progress_table(task: str) -> str:
    """Results-store table of a run's evaluation rows: ``train`` (pre-training) or ``finetune_steps``."""
    return "train" if task == "pretrain" else "finetune_steps"


class StoreReporter(NullReporter):
    """Writes one results-store row per report (table ``train``, or ``finetune_steps`` for fine-tuning).

    ``static`` holds the columns every row shares (run id, spec fields, provenance, parameter counts).
    The per-cell summary of a fine-tuning study (table ``finetune``) is written by :mod:`study.finetune`.
    """

    def __init__(self, store, static: dict[str, Any], table: str = "train") -> None:
        self.store = store
        self.static = dict(static)
        self.table = table

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None = None) -> None:
        values = {k: _jsonable(v) for k, v in metrics.items()}
        shadowed = sorted(k for k, v in values.items() if k in self.static and not _same(self.static[k], v))
        if shadowed:  # a metric must never overwrite a run's identity (the old "lr" bug inverted µTransfer)
            raise ValueError(f"metrics {shadowed} would overwrite the run's static columns of the same name "
                             f"({ {k: self.static[k] for k in shadowed} } -> { {k: values[k] for k in shadowed} }); "
                             "log them under another name")
        self.store.append(self.table, [{**self.static, **values}])


class ProgressPrinter(NullReporter):
    """One progress line on stderr at most every ``every_s`` seconds (and at each evaluation), for runs launched by
    hand (``study.launch_local``): step, losses, samples/s."""

    def __init__(self, run_id: str, every_s: float = 5.0, stream=None) -> None:
        self.run_id, self.every_s, self.stream = run_id, every_s, stream
        self._last = float("-inf")

    def _line(self, m: dict[str, Any], tag: str) -> None:
        parts = [f"[{self.run_id}] {tag} step {m.get('step')}"]
        for k, fmt in (("train_loss", ".4g"), ("val_loss", ".4g"), ("samples_per_s", ".1f"), ("lr_step", ".3g")):
            v = m.get(k)
            if isinstance(v, (int, float)):
                parts.append(f"{k} {format(v, fmt)}")
        import sys

        print("  ".join(parts), file=self.stream or sys.stderr, flush=True)

    def log(self, metrics: dict[str, Any]) -> None:
        now = time.monotonic()
        if now - self._last >= self.every_s:
            self._last = now
            self._line(metrics, "train")

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None = None) -> None:
        self._line(metrics, "eval")


class MultiReporter(NullReporter):
    def __init__(self, reporters: Iterable[Reporter]) -> None:
        self.reporters = list(reporters)

    def log(self, metrics: dict[str, Any]) -> None:
        for r in self.reporters:
            r.log(metrics)

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None = None) -> None:
        for r in self.reporters:
            r.report(metrics, checkpoint_dir)

    def close(self) -> None:
        for r in self.reporters:
            r.close()


class RankZero(NullReporter):
    """Forwards calls only on rank 0; ``all_ranks_report`` reporters get ``report`` on every rank."""

    def __init__(self, rank: int, reporter: Reporter, all_ranks_report: Reporter | None = None) -> None:
        self.rank = rank
        self.reporter = reporter
        self.all_ranks_report = all_ranks_report

    def log(self, metrics: dict[str, Any]) -> None:
        if self.rank == 0:
            self.reporter.log(metrics)

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None = None) -> None:
        if self.rank == 0:
            self.reporter.report(metrics, checkpoint_dir)
        if self.all_ranks_report is not None:
            self.all_ranks_report.report(metrics, checkpoint_dir)

    def close(self) -> None:
        if self.rank == 0:
            self.reporter.close()
        if self.all_ranks_report is not None:
            self.all_ranks_report.close()
