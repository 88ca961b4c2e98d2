"""Config ranking (the seed's Table 1): z-normalize each task across configurations, sum, rank."""
from __future__ import annotations

from typing import Mapping, Sequence

import pandas as pd

__all__ = ["DIRECTIONS", "rank_configs"]

#: Default direction per metric name: +1 higher is better, -1 lower is better.
DIRECTIONS = {"auroc": 1, "bacc": 1, "acc": 1, "accuracy": 1, "pearson_r": 1, "r2": 1, "mae": -1, "mse": -1,
              "rmse": -1, "loss": -1}


def rank_configs(table: pd.DataFrame, *, directions: Mapping[str, int | str] | None = None,
                 subsets: Mapping[str, Sequence[str]] | None = None, missing: str = "drop_config",
                 ddof: int = 0) -> pd.DataFrame:
    """Rank configurations by the sum of direction-corrected z-scores over tasks.

    Parameters
    ----------
    table : pandas.DataFrame
        Wide table: one row per configuration (the index), one column per task (metric values;
        NaN marks a missing cell, the seed's ``#N/A``).
    directions : dict, optional
        Per task ``+1``/``"max"`` (higher is better) or ``-1``/``"min"``. Tasks not listed are looked up
        in :data:`DIRECTIONS` by the suffix after the last ``"/"`` or ``":"`` (``"ADHD/auroc"``); a task
        with no known direction raises ``ValueError``.
    subsets : dict, optional
        Named task subsets ranked side by side (default: one subset ``"all"`` with every task).
    missing : {"drop_config", "skip", "drop_task", "error"}
        ``drop_config`` (default, the seed's ``#N/A``): a configuration missing a task of the subset is
        left out of that subset's z-scores and gets no score or rank (NaN) there; ``skip``: a missing
        cell adds nothing to the sum; ``drop_task``: drop the subset's tasks with a missing cell;
        ``error``: raise. The count of missing cells is reported in ``n_missing__<subset>``.
    ddof : int
        Degrees of freedom of the per-task standard deviation (0: population).

    Returns
    -------
    pandas.DataFrame
        Per configuration and subset: ``score__<subset>``, ``rank__<subset>`` (1 = best; ties share
        the lowest rank) and ``n_missing__<subset>``, plus the z-scores ``z__<subset>__<task>``.
    """
    if missing not in ("skip", "drop_config", "drop_task", "error"):
        raise ValueError(f"missing={missing!r}: allowed values are 'skip', 'drop_config', 'drop_task', 'error'")
    df = table.apply(pd.to_numeric, errors="coerce").astype(float)
    sign = {}
    for task in df.columns:
        d = (directions or {}).get(task)
        if d is None:
            key = str(task).replace(":", "/").split("/")[-1].lower()
            d = DIRECTIONS.get(key)
        if isinstance(d, str):
            if d not in ("max", "min"):
                raise ValueError(f"direction of task {task!r} is {d!r}: allowed values are 'max', 'min', +1, -1")
            d = 1 if d == "max" else -1
        if d not in (1, -1):
            raise ValueError(f"task {task!r} has no known direction: pass directions={{{task!r}: 'max' or 'min'}}")
        sign[task] = d
    subsets = dict(subsets or {"all": list(df.columns)})
    out = pd.DataFrame(index=df.index)
    for name, tasks in subsets.items():
        unknown = [t for t in tasks if t not in df.columns]
        if unknown:
            raise ValueError(f"subset {name!r}: unknown task(s) {unknown}; tasks are {list(df.columns)}")
        sub = df[list(tasks)]
        n_missing = sub.isna().sum(axis=1)
        if sub.isna().any().any():
            if missing == "error":
                cells = [(i, t) for t in sub.columns for i in sub.index[sub[t].isna()]]
                raise ValueError(f"subset {name!r}: missing cells {cells[:5]} (pass missing='skip' to rank anyway)")
            if missing == "drop_config":
                sub = sub.dropna(axis=0)
            elif missing == "drop_task":
                sub = sub.dropna(axis=1)
        if sub.shape[0] < 2 or sub.shape[1] == 0:
            raise ValueError(f"subset {name!r}: needs at least 2 configurations and 1 task after handling missing "
                             f"cells, got {sub.shape[0]} x {sub.shape[1]}")
        std = sub.std(axis=0, ddof=ddof)
        if (std == 0).any():
            raise ValueError(f"subset {name!r}: task(s) {list(std.index[std == 0])} have the same value for every "
                             "configuration; z-scores are undefined")
        z = (sub - sub.mean(axis=0)) / std * pd.Series(sign)[sub.columns]
        for t in z.columns:
            out[f"z__{name}__{t}"] = z[t]
        score = z.sum(axis=1, min_count=1)
        out[f"score__{name}"] = score
        out[f"rank__{name}"] = score.rank(ascending=False, method="min")
        out[f"n_missing__{name}"] = n_missing
    first = next(iter(subsets))
    return out.sort_values(f"rank__{first}", na_position="last")
