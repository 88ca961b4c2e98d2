"""Helpers of the fault-injection suite (a module with a unique name, importable from any test folder)."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from chaos import fill_disk  # noqa: E402,F401  (one ballast writer for the fault tests and the chaos campaign)


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


def assert_rows_equal_reference(store, ref_reports: list[dict], steps: list[int]):
    """The store's train rows are exactly ``steps`` (each once, the last one final) and carry the losses of
    the uninterrupted reference run (rel 1e-6). Returns the rows."""
    import pytest

    from analysis.store import read_table

    rows = read_table(store, "train").sort_values("step")
    assert list(rows["step"]) == steps  # every evaluation exactly once
    assert rows["is_final"].sum() == 1 and bool(rows["is_final"].iloc[-1])
    want = {r["step"]: r for r in ref_reports}
    for _, row in rows.iterrows():
        assert row["train_loss"] == pytest.approx(want[row["step"]]["train_loss"], rel=1e-6), row["step"]
        assert row["val_loss"] == pytest.approx(want[row["step"]]["val_loss"], rel=1e-6), row["step"]
    return rows
