"""Phase marks for finding where a trial's time goes.

``mark("what", run=...)`` appends ``{"t": unix time, "what": ..., "pid": ..., "run": ...}`` as one JSON line to the file named
by ``$NEUROX_TRACE_FILE``, and does nothing when it is unset (the default: one ``os.environ`` lookup).
:func:`study.runner.connect_ray` forwards the variable to Ray's workers; ``benchmarks/study_overhead.py``
turns the marks into a per-phase table.
"""
from __future__ import annotations

import json
import os
import time

ENV = "NEUROX_TRACE_FILE"


def mark(what: str, **info) -> None:
    """Record that ``what`` happened now (``info``: e.g. ``run=run_id``, to group a trial's marks)."""
    path = os.environ.get(ENV)
    if not path:
        return
    line = json.dumps({"t": time.time(), "what": what, "pid": os.getpid(), **info}) + "\n"
    with open(path, "a") as f:  # one short append per mark: atomic enough for concurrent writers
        f.write(line)


def read(path: str | os.PathLike) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
