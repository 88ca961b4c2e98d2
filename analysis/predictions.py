"""Pre-registered predictions (issue #26 item 2): say what a run will score before it starts, keep
that statement immutable, and check it against the outcome afterwards.

Pure pandas/NumPy on a results store: imports neither ``study`` nor ``ray`` nor ``torch``.

The row (store table :data:`TABLE`, one per run id)
---------------------------------------------------
``run_id, quantity ("val_loss"), value, lo, hi`` (the predictive interval at ``level``: the fit's
bootstrap replicates of the law at the run's ``N, D``, each with the run-to-run noise of the fit's
residuals added), ``lo_fit, hi_fit`` (the law's interval without run noise), ``noise_sd``, ``N, D,
flops, threshold_flops``, ``fit`` (JSON: the fitted parameters, raw parameters, objective, valid,
n_boot, seed), ``data_runs`` (JSON list: the run ids the fit used), ``study, source, created_utc``
(UTC, ISO 8601), ``schema`` and ``hash``: the SHA-256 of the canonical JSON of every field in
:data:`HASHED` (sorted keys, floats as their shortest round-trip repr).

Immutability
------------
The store is append-only and its readers keep the *last* row per key; this table has no key, so every
row written is kept, and :func:`read_predictions` keeps the *first* row (smallest write stamp) per run
id. :func:`register` refuses nothing and overwrites nothing: a second prediction for a run id that has
one is ignored (the first stands, whatever the second says), and two racing writers end with the same
winner for every reader. A prediction for a run that already has rows in the ``train`` table is
refused (it would not be pre-registered). A row edited in place (a rewritten part file) no longer
matches its hash: :func:`verify` and the report's ``hash_ok`` say so, and calibration leaves it out.

After the runs: :func:`join_outcomes` (prediction against the run's final ``val_loss``: error,
``held``, ``hash_ok``, ``preregistered`` from the store's write stamps), :func:`calibration` (across
stores: how often the interval held, with a Wilson 95% interval of that rate), :func:`report` (table,
plot, JSON; ``python -m analysis predictions <store...>``).
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from analysis.store import SEQ_COL, WRITER_COL, ResultsStore

__all__ = ["TABLE", "HASHED", "SCHEMA", "predict_run", "prediction_row", "row_hash", "verify", "register",
           "read_predictions", "final_losses", "join_outcomes", "calibration", "wilson_interval",
           "plot_predictions", "report", "markdown", "adaptive_report"]

TABLE = "predictions"
SCHEMA = 1
#: The fields the hash covers (every field of the row but the hash itself).
HASHED = ("schema", "run_id", "study", "quantity", "value", "lo", "hi", "level", "lo_fit", "hi_fit", "noise_sd",
          "N", "D", "flops", "threshold_flops", "fit", "data_runs", "source", "created_utc")


def _plain(v):
    """A JSON-able Python scalar from a NumPy/pandas cell (ints stay ints, floats keep every bit)."""
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        v = float(v)  # 1 and 1.0 hash alike: a Parquet round trip or a pandas row may change the type
        if not math.isfinite(v):
            return None if math.isnan(v) else repr(v)
    return v


def row_hash(row: Mapping) -> str:
    """SHA-256 (hex) of the canonical JSON of the :data:`HASHED` fields of ``row``.

    Raises
    ------
    ValueError
        Naming the hashed fields the row lacks.
    """
    missing = [k for k in HASHED if k not in row]
    if missing:
        raise ValueError(f"prediction row lacks hashed field(s) {missing}")
    canon = json.dumps({k: _plain(row[k]) for k in HASHED}, sort_keys=True, separators=(",", ":"),
                       allow_nan=False)
    return hashlib.sha256(canon.encode()).hexdigest()


def verify(rows: pd.DataFrame) -> pd.Series:
    """Per row: whether the stored ``hash`` matches the row's content (False for a tampered row)."""
    if rows.empty:
        return pd.Series([], dtype=bool)
    out = []
    for _, r in rows.iterrows():
        try:
            out.append(isinstance(r.get("hash"), str) and row_hash(r) == r["hash"])
        except (ValueError, TypeError):
            out.append(False)
    return pd.Series(out, index=rows.index, dtype=bool)


def _law(theta_SP: np.ndarray, N: float, D: float) -> np.ndarray:
    a, b, al, be, e = theta_SP
    with np.errstate(all="ignore"):
        return np.exp(e) + np.exp(a - al * np.log(N)) + np.exp(b - be * np.log(D))


def predict_run(fit, N: float, D: float, *, level: float = 0.9, seed: int = 0, noise_var: float | None = None,
                draws: int = 20) -> dict:
    """Prediction of one run's final loss at ``(N, D)`` from a bootstrapped approach-3 fit.

    The law's uncertainty is the spread of the bootstrap replicates at ``(N, D)`` (``lo_fit, hi_fit``);
    the run's own seed noise is added as ``draws`` log-normal draws per replicate with the variance of
    the fit's robust log residuals (:func:`analysis.design.noise_variance`), seeded by ``seed``, giving
    the predictive interval ``lo, hi`` the outcome is checked against.

    Returns
    -------
    dict
        ``value`` (the fit's law at ``N, D``), ``lo, hi, lo_fit, hi_fit, noise_sd, level, n_boot``.
    """
    from analysis.design import RAW, noise_variance

    if not (0 < level < 1):
        raise ValueError(f"level={level!r}: must lie in (0, 1)")
    for name, v in (("N", N), ("D", D)):
        if not (np.isfinite(v) and v > 0):
            raise ValueError(f"{name}={v!r}: must be finite and > 0")
    if fit.bootstrap is None or fit.kind != "chinchilla":
        raise ValueError("fit: needs an approach-3 fit (form 'chinchilla') with bootstrap replicates")
    R = fit.bootstrap[list(RAW)].to_numpy(np.float64)
    reps = _law(R.T, N, D)
    reps = reps[np.isfinite(reps) & (reps > 0)]
    if len(reps) < 10:
        raise ValueError(f"fit: only {len(reps)} bootstrap replicates give a finite loss at N={N:g}, D={D:g}")
    s2 = noise_variance(fit) if noise_var is None else float(noise_var)
    q = (1 - level) / 2
    lo_fit, hi_fit = np.quantile(reps, [q, 1 - q])
    rng = np.random.default_rng(seed)
    full = (reps[:, None] * np.exp(rng.normal(0.0, math.sqrt(s2), (len(reps), draws)))).ravel()
    lo, hi = np.quantile(full, [q, 1 - q])
    value = float(_law(np.asarray(fit.theta[:5], np.float64), N, D))
    return dict(value=value, lo=float(lo), hi=float(hi), lo_fit=float(lo_fit), hi_fit=float(hi_fit),
                noise_sd=math.sqrt(s2), level=float(level), n_boot=int(len(reps)))


def _utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def prediction_row(run_id: str, pred: Mapping, *, fit, data_runs: Sequence[str], N: float, D: float,
                   flops: float, threshold_flops: float, study: str = "", source: str = "",
                   seed: int = 0, created_utc: str | None = None) -> dict:
    """The store row of a prediction (module docstring), hashed. ``pred`` is :func:`predict_run`'s dict;
    ``fit`` the FitResult it came from (its parameters are recorded) or a dict of what to record."""
    if not run_id:
        raise ValueError("run_id: must be a non-empty string")
    if isinstance(fit, Mapping):
        fit_info = dict(fit)
    else:
        fit_info = dict(form=fit.kind, params={k: float(v) for k, v in fit.params.items()},
                        raw=[float(x) for x in np.asarray(fit.theta, np.float64)[:5]],
                        objective=float(fit.objective), valid=bool(fit.valid), n_boot=int(pred.get("n_boot", 0)),
                        seed=int(seed))
    row = dict(schema=SCHEMA, run_id=str(run_id), study=str(study), quantity="val_loss",
               value=float(pred["value"]), lo=float(pred["lo"]), hi=float(pred["hi"]), level=float(pred["level"]),
               lo_fit=float(pred["lo_fit"]), hi_fit=float(pred["hi_fit"]), noise_sd=float(pred["noise_sd"]),
               N=float(N), D=float(D), flops=float(flops), threshold_flops=float(threshold_flops),
               fit=json.dumps(fit_info, sort_keys=True), data_runs=json.dumps(sorted(map(str, data_runs))),
               source=str(source), created_utc=created_utc or _utc_now())
    row["hash"] = row_hash(row)
    return row


def _raw_table(store: ResultsStore, table: str) -> pd.DataFrame:
    """Every row ever written to ``table`` with its write stamp (no deduplication by key)."""
    frames = []
    for p in store.parts(table):
        try:
            frames.append(pd.read_parquet(p))
        except FileNotFoundError:  # merged by a concurrent compaction; re-listed below
            return _raw_table(store, table)
    frames = [f for f in frames if len(f)]
    if not frames:
        return pd.DataFrame()
    df = pd.concat(frames, ignore_index=True, sort=False)
    return df.drop_duplicates([SEQ_COL, WRITER_COL]).sort_values([SEQ_COL, WRITER_COL], kind="stable")


def read_predictions(store_dir: str | os.PathLike, *, internal: bool = False) -> pd.DataFrame:
    """The predictions of a store: the first row written per run id (later ones are ignored), with
    ``hash_ok`` (:func:`verify`). Empty frame when there are none."""
    df = _raw_table(ResultsStore(store_dir), TABLE)
    if df.empty:
        return df
    df = df.drop_duplicates("run_id", keep="first").reset_index(drop=True)
    df["hash_ok"] = verify(df)
    if not internal:
        df = df.drop(columns=[c for c in (SEQ_COL, WRITER_COL) if c in df])
    return df


def register(store_dir: str | os.PathLike, row: Mapping) -> tuple[dict, bool]:
    """Write a prediction row unless its run id has one already.

    Returns
    -------
    (row, written)
        The prediction that stands for the run id (the first one written) and whether this call's row
        is it. A second call for the same run id writes nothing and returns the first row, ``False``.

    Raises
    ------
    ValueError
        If the row's hash does not match its content, or the run already has rows in the ``train``
        table (the prediction would not precede the run).
    """
    row = dict(row)
    if row.get("hash") != row_hash(row):
        raise ValueError(f"prediction for {row.get('run_id')!r}: hash does not match the row's content")
    have = read_predictions(store_dir)
    if not have.empty and (have["run_id"] == row["run_id"]).any():
        return have[have["run_id"] == row["run_id"]].iloc[0].to_dict(), False
    train = _raw_table(ResultsStore(store_dir), "train")
    if not train.empty and "run_id" in train and (train["run_id"] == row["run_id"]).any():
        raise ValueError(f"run {row['run_id']!r} already has results in the train table: a prediction "
                         "written now would not be pre-registered")
    ResultsStore(store_dir).append(TABLE, [row])
    have = read_predictions(store_dir)  # a racing writer may have won: the first row stands for everyone
    first = have[have["run_id"] == row["run_id"]].iloc[0].to_dict()
    return first, first["hash"] == row["hash"]


def final_losses(store_dir: str | os.PathLike, quantity: str = "val_loss") -> pd.DataFrame:
    """``run_id, outcome, first_seq``: the final ``quantity`` of every finished run (``is_final`` rows
    where the table has them) and the write stamp of the run's first train row."""
    from analysis.report import final_rows

    raw = _raw_table(ResultsStore(store_dir), "train")
    if raw.empty or quantity not in raw or "run_id" not in raw:
        return pd.DataFrame(columns=["run_id", "outcome", "first_seq"])
    first = raw.groupby("run_id")[SEQ_COL].min()
    df = ResultsStore(store_dir).read("train")
    f = final_rows(df)
    if "is_final" in f:
        f = f[f["is_final"].fillna(False).astype(bool)]
    v = pd.to_numeric(f[quantity], errors="coerce")
    f = f.assign(outcome=v)[np.isfinite(v) & (v > 0)]
    return pd.DataFrame(dict(run_id=f["run_id"].to_numpy(), outcome=f["outcome"].to_numpy(float),
                             first_seq=first.reindex(f["run_id"]).to_numpy()))


def join_outcomes(store_dir: str | os.PathLike) -> pd.DataFrame:
    """Predictions of one store against outcomes: the prediction's columns plus ``store, outcome,
    error`` (outcome - value), ``rel_error``, ``held`` (``lo <= outcome <= hi``; NA without an outcome),
    ``preregistered`` (the prediction's write stamp precedes the run's first train row) and ``hash_ok``."""
    p = read_predictions(store_dir, internal=True)
    if p.empty:
        return p
    o = final_losses(store_dir, quantity=str(p["quantity"].iloc[0]))
    j = p.merge(o, on="run_id", how="left")
    j.insert(0, "store", str(store_dir))
    j["error"] = j["outcome"] - j["value"]
    j["rel_error"] = j["error"] / j["value"]
    has = j["outcome"].notna()
    j["held"] = pd.array([bool(lo <= y <= hi) if h else pd.NA for lo, y, hi, h in
                          zip(j["lo"], j["outcome"], j["hi"], has)], dtype="boolean")
    j["preregistered"] = pd.array([bool(s < f) if pd.notna(f) else pd.NA
                                   for s, f in zip(j[SEQ_COL], j["first_seq"])], dtype="boolean")
    return j.drop(columns=[SEQ_COL, WRITER_COL, "first_seq"])


def wilson_interval(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson score interval (95% by default) of a proportion ``k / n``."""
    if n <= 0:
        return (float("nan"), float("nan"))
    p = k / n
    den = 1 + z * z / n
    c = (p + z * z / (2 * n)) / den
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return (max(0.0, c - h), min(1.0, c + h))


def calibration(table: pd.DataFrame) -> dict:
    """How often the interval held, over the rows of :func:`join_outcomes` (one or several stores).

    Counted: rows with an outcome, a matching hash and a prediction written before the run started.
    Returns ``n, held, rate, rate_lo, rate_hi`` (Wilson 95%), ``level`` (nominal; the levels when they
    differ), ``excluded`` (``no_outcome, hash_mismatch, not_preregistered``), ``mean_rel_error``,
    ``median_abs_rel_error`` and ``per_store`` (the same counts per store).
    """
    def one(t: pd.DataFrame) -> dict:
        has = t["outcome"].notna()
        ok_hash = t["hash_ok"].astype(bool)
        pre = t["preregistered"].fillna(False).astype(bool)
        use = has & ok_hash & pre
        u = t[use]
        k, n = int(u["held"].astype(bool).sum()), int(len(u))
        lo, hi = wilson_interval(k, n)
        levels = sorted(set(map(float, u["level"]))) if n else []
        return dict(n=n, held=k, rate=(k / n if n else None), rate_lo=(lo if n else None), rate_hi=(hi if n else None),
                    level=(levels[0] if len(levels) == 1 else levels or None),
                    mean_rel_error=(float(u["rel_error"].mean()) if n else None),
                    median_abs_rel_error=(float(u["rel_error"].abs().median()) if n else None),
                    excluded=dict(no_outcome=int((~has).sum()), hash_mismatch=int((has & ~ok_hash).sum()),
                                  not_preregistered=int((has & ok_hash & ~pre).sum())))

    if table is None or table.empty:
        return dict(one(pd.DataFrame(columns=["outcome", "hash_ok", "preregistered", "held", "level", "rel_error"])),
                    per_store={})
    out = one(table)
    out["per_store"] = {s: one(t) for s, t in table.groupby("store", sort=True)}
    return out


def plot_predictions(table: pd.DataFrame):
    """Predicted (with its interval) against observed final loss; the diagonal is a perfect prediction.
    Intervals that held are blue, missed ones red, rows failing the hash or not pre-registered grey."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 5.5), layout="constrained")
    ax = fig.add_subplot()
    t = table[table["outcome"].notna()]
    if t.empty:
        ax.text(0.5, 0.5, "no prediction has an outcome yet", ha="center", va="center", transform=ax.transAxes)
        return fig
    valid = t["hash_ok"].astype(bool) & t["preregistered"].fillna(False).astype(bool)
    for mask, color, label in ((valid & t["held"].fillna(False).astype(bool), "C0", "interval held"),
                               (valid & ~t["held"].fillna(False).astype(bool), "C3", "interval missed"),
                               (~valid, "0.6", "hash mismatch / not pre-registered")):
        s = t[mask]
        if len(s):
            ax.errorbar(s["outcome"], s["value"], yerr=[s["value"] - s["lo"], s["hi"] - s["value"]], fmt="o",
                        color=color, capsize=3, label=f"{label} ({len(s)})")
    lo = float(min(t["outcome"].min(), t["lo"].min())); hi = float(max(t["outcome"].max(), t["hi"].max()))
    pad = 0.05 * (hi - lo or hi)
    ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], "k:", lw=1, label="prediction = outcome")
    ax.set_xlabel("observed final loss"); ax.set_ylabel("pre-registered prediction (interval)")
    ax.set_title("Pre-registered predictions vs outcomes"); ax.legend(fontsize=8)
    return fig


def _fmt(v, spec=".4g"):
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) or v is pd.NA else format(v, spec)


def markdown(table: pd.DataFrame, cal: dict) -> str:
    """The prediction-vs-outcome table and the calibration summary, in Markdown."""
    lines = ["## Pre-registered predictions", ""]
    if table is None or table.empty:
        return "\n".join(lines + ["No predictions in the store(s).", ""])
    lines += ["| store | run | FLOPs | predicted | interval | outcome | rel. error | held | pre-registered | hash |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for _, r in table.iterrows():
        held = "-" if pd.isna(r["held"]) else ("yes" if r["held"] else "NO")
        pre = "-" if pd.isna(r["preregistered"]) else ("yes" if r["preregistered"] else "NO")
        lines.append(f"| {Path(str(r['store'])).parent.name or r['store']} | {r['run_id']} | {_fmt(r['flops'], '.3g')} | "
                     f"{_fmt(r['value'])} | [{_fmt(r['lo'])}, {_fmt(r['hi'])}] ({r['level']:.0%}) | "
                     f"{_fmt(r['outcome'] if pd.notna(r['outcome']) else None)} | "
                     f"{_fmt(r['rel_error'] if pd.notna(r['rel_error']) else None, '+.3g')} | {held} | {pre} | "
                     f"{'ok' if r['hash_ok'] else 'MISMATCH'} |")
    lv = cal["level"]
    lines += ["", f"Calibration: the interval held for {cal['held']} of {cal['n']} run(s)"
              + (f" ({cal['rate']:.0%}, Wilson 95% [{cal['rate_lo']:.0%}, {cal['rate_hi']:.0%}]; nominal "
                 f"{lv if isinstance(lv, list) else format(lv, '.0%')})" if cal["n"] else "")
              + f". Excluded: {cal['excluded']}.", ""]
    if len(cal["per_store"]) > 1:
        lines += ["| store | n | held | rate |", "|---|---|---|---|"]
        for s, c in cal["per_store"].items():
            lines.append(f"| {s} | {c['n']} | {c['held']} | {_fmt(c['rate'], '.2f')} |")
        lines.append("")
    return "\n".join(lines)


def report(stores: Iterable[str | os.PathLike], out_dir: str | os.PathLike | None = None) -> tuple[pd.DataFrame, dict]:
    """Join every store's predictions with outcomes and summarize calibration; with ``out_dir``, write
    ``predictions.md``, ``predictions.json``, ``predictions.csv`` and ``predictions.png`` there.

    Raises
    ------
    ValueError
        If a store folder does not exist.
    """
    frames = []
    for s in stores:
        if not Path(s).is_dir():
            raise ValueError(f"results store {s}: no such folder")
        j = join_outcomes(s)
        if not j.empty:
            frames.append(j)
    table = pd.concat(frames, ignore_index=True, sort=False) if frames else pd.DataFrame()
    cal = calibration(table)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "predictions.md").write_text(markdown(table, cal))
        (out / "predictions.json").write_text(json.dumps(dict(calibration=cal, predictions=json.loads(
            table.to_json(orient="records")) if len(table) else []), indent=1, default=str))
        if len(table):
            table.to_csv(out / "predictions.csv", index=False)
            plot_predictions(table).savefig(out / "predictions.png", dpi=120)
    return table, cal


def adaptive_report(store_dir, out_dir) -> dict:
    """Write the adaptive study's report to ``out_dir``: ``adaptive.md`` (the rounds table of
    :func:`analysis.design.rounds_markdown`, then the pre-registered predictions against outcomes),
    ``adaptive_interval.png`` (:func:`analysis.design.plot_rounds`) and the prediction files. Returns
    ``rounds`` (count), ``files`` and the predictions' ``calibration``."""
    from analysis.design import plot_rounds, read_rounds, rounds_markdown

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rounds = read_rounds(store_dir)
    files = []
    md = ["# Adaptive ladder", ""]
    if rounds is None:
        md.append("No adaptive rounds in the store.\n")
    else:
        plot_rounds(rounds).savefig(out / "adaptive_interval.png", dpi=120)
        files.append("adaptive_interval.png")
        md += [rounds_markdown(rounds), "![interval vs GPU-hours](adaptive_interval.png)", ""]
    table, cal = report([store_dir], out)
    files += [f for f in ("predictions.md", "predictions.json", "predictions.csv", "predictions.png") if (out / f).exists()]
    md.append(markdown(table, cal))
    if (out / "predictions.png").exists():
        md.append("![predictions vs outcomes](predictions.png)\n")
    (out / "adaptive.md").write_text("\n".join(md))
    return dict(rounds=0 if rounds is None else len(rounds), files=["adaptive.md"] + files, calibration=cal)
