"""Matplotlib figures for the analysis (no pyplot state: every function returns a ``Figure``).

Figures are built with :class:`matplotlib.figure.Figure` directly, so they work headless (Agg) and
inside notebooks; save with ``fig.savefig(path)``.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from analysis.fits import FitResult, IsoFLOPResult

__all__ = ["plot_loss_vs_flops", "plot_loss_by_size", "size_labels", "law_label", "plot_isoflop", "plot_optimal_allocation", "plot_lr_transfer", "plot_radar",
           "plot_scaling", "power_law_band"]


def power_law_band(fit: FitResult, x, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Percentile band of the bootstrap predictions of a one-variable fit at ``x`` (any registered
    one-variable form: its ``predict`` is applied to every replicate)."""
    if fit.bootstrap is None:
        raise ValueError("the fit has no bootstrap replicates: call bootstrap_fit first")
    b = fit.bootstrap
    x = np.asarray(x, dtype=np.float64)
    reps = {k: b[k].to_numpy()[:, None] for k in b.columns}
    pred = fit.form.predict(reps, x[None, :])
    q = (1 - level) / 2
    return np.nanquantile(pred, q, axis=0), np.nanquantile(pred, 1 - q, axis=0)


NOT_A_LAW = "not a valid law"


def _law_style(valid: bool, label: str) -> dict:
    """Line style of a fitted law: solid when valid, dashed and labelled :data:`NOT_A_LAW` when not."""
    return dict(ls="-", label=label) if valid else dict(ls="--", label=f"{NOT_A_LAW}: {label}")


def law_label(fit: FitResult, level: float = 0.95) -> str:
    """The fitted law's equation, then each exponent and the asymptote with its bootstrap interval when there is one
    (``alpha = 0.16 [0.12, 0.20]``), for a legend."""
    text = fit.form.label(fit.params)
    if fit.bootstrap is None:
        return text
    iv = fit.intervals(level)
    parts = [f"{k} = {iv.loc[k, 'estimate']:.3g} [{iv.loc[k, 'lo']:.3g}, {iv.loc[k, 'hi']:.3g}]"
             for k in iv.index if k in ("alpha", "beta", "E")]
    return text + ("\n" + ", ".join(parts) + f" ({level:.0%})" if parts else "")


def plot_loss_vs_flops(C, L, *, fit: FitResult | None = None, frontier: Sequence[int] | None = None,
                       curves: pd.DataFrame | None = None, labels=None, sizes=None, size_name: str = "parameters",
                       markers=None, marker_name: str = "budget", extend: float = 10.0,
                       loss_name: str = "validation loss (val_loss)", title: str = "Loss vs compute") -> Figure:
    """Loss against FLOPs: runs, the compute frontier, the fitted law and its bootstrap band.

    Parameters
    ----------
    C, L : array-like
        Compute and loss of the (final) points.
    fit : FitResult, optional
        One-variable fit ``L(C)``; its bootstrap replicates give the band and the legend gives its equation
        with intervals. A fit that is not a valid law (``fit.valid`` False) is drawn dashed and labelled
        "not a valid law", never as a solid line.
    frontier : sequence of int, optional
        Indices of the frontier points (highlighted).
    curves : pandas.DataFrame, optional
        Columns ``run, C, L``: whole training curves drawn faintly behind the points (one legend entry).
    labels : array-like, optional
        A category per point, one colour each (used when ``sizes`` is not given).
    sizes : array-like, optional
        Model size per point (``size_name``): colours on a sequential colormap, one legend entry per size.
    markers : array-like, optional
        A second category per point (``marker_name``: compute budget or data mixture) shown by marker shape.
    extend : float
        The fitted curve extends this factor beyond the largest C.
    """
    fig = Figure(figsize=(10.5, 4.8), layout="constrained")
    ax = fig.add_subplot()
    if curves is not None and len(curves):
        for k, (_, c) in enumerate(curves.groupby("run")):
            ax.plot(c["C"], c["L"], color="0.8", lw=0.8, zorder=1,
                    label="training curves (each run's evaluations)" if k == 0 else None)
    C = np.asarray(C, dtype=float); L = np.asarray(L, dtype=float)
    shapes = "osD^vP*Xh<>"
    mk = np.zeros(len(C), dtype=int)
    if markers is not None:
        mk, mnames = pd.factorize(pd.Series(np.asarray(markers)).astype(str))
        for m, name in enumerate(mnames):  # marker legend entries in neutral grey
            ax.scatter([], [], marker=shapes[m % len(shapes)], color="0.4", s=22, label=f"{marker_name} {name}")
    if sizes is not None:
        import matplotlib as mpl

        sz = np.asarray(sizes, dtype=float)
        uniq = np.unique(sz[np.isfinite(sz)])
        cmap = mpl.colormaps["viridis"]
        color_of = {u: cmap(0.1 + 0.8 * i / max(1, len(uniq) - 1)) for i, u in enumerate(uniq)}
        for u in uniq:
            sel = sz == u
            for m in np.unique(mk[sel]):
                s2 = sel & (mk == m)
                ax.scatter(C[s2], L[s2], s=26, zorder=3, color=color_of[u], marker=shapes[m % len(shapes)],
                           label=f"{size_name} {u:.3g}" if m == np.unique(mk[sel])[0] else None)
    elif labels is None:
        for m in np.unique(mk):
            ax.scatter(C[mk == m], L[mk == m], s=18, zorder=3, color="C0", marker=shapes[m % len(shapes)],
                       label="runs" if m == 0 else None)
    else:
        codes, names = pd.factorize(pd.Series(np.asarray(labels)))
        for i, name in enumerate(names):
            ax.scatter(C[codes == i], L[codes == i], s=18, zorder=3, color=f"C{i % 10}", label=str(name))
    if frontier is not None and len(frontier):
        f = np.asarray(frontier)
        ax.plot(C[f], L[f], "o", mfc="none", mec="k", ms=9, zorder=4, label="compute frontier (best loss per C)")
    if fit is not None:
        xs = np.geomspace(C.min(), C.max() * extend, 200)
        ax.plot(xs, fit.predict(xs), **_law_style(fit.valid, law_label(fit)), color="r", zorder=5)
        if fit.bootstrap is not None:
            lo, hi = power_law_band(fit, xs)
            ax.fill_between(xs, lo, hi, color="r", alpha=0.2, zorder=2, label="95% band of the fitted law")
    ax.set_xscale("log"); ax.set_yscale("log")
    ax.set_xlabel("training compute C (FLOPs)"); ax.set_ylabel(loss_name); ax.set_title(title)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    return fig


def size_labels(params, size=None, width=None) -> list[str]:
    """A legend label per run naming its model: ``"51M (5.72e+07 params)"``, or ``"debug w32 (4.8e+04 params)"`` when
    the runs' widths differ (one named size trained at several widths)."""
    n = np.asarray(params, dtype=float)
    names = [""] * len(n) if size is None else [str(x) for x in size]
    ws = None if width is None else pd.to_numeric(pd.Series(np.asarray(width, dtype=object)), errors="coerce")
    vary = ws is not None and ws.notna().all() and ws.nunique() > 1
    out = []
    for i in range(len(n)):
        head = " ".join(p for p in (names[i], f"w{int(ws.iloc[i])}" if vary else "") if p)
        out.append(f"{head} ({n[i]:.3g} params)" if head else f"{n[i]:.3g} params")
    return out


def plot_loss_by_size(x, L, params, *, labels=None, groups=None, x_name: str = "training compute C (FLOPs)",
                      loss_name: str = "final validation loss", group_name: str = "budget",
                      title: str = "Final loss by model size") -> Figure:
    """The seed's Figure 3 panels: final loss against ``x`` (compute, or parameters), one colour per model size.

    Parameters
    ----------
    x, L : array-like
        The x value (training FLOPs, or parameters) and final loss of every run.
    params : array-like
        Parameters of each run's model: runs with the same count are one size (one colour, one legend entry, ordered
        small to large on a sequential colormap).
    labels : array-like, optional
        Legend text per run (the first run of a size names it; :func:`size_labels`); default ``"N params"``.
    groups : array-like, optional
        A group per run (the planned compute budget). Without it, each size's line joins its best (lowest) loss at
        each distinct ``x`` (against compute: how the size's loss falls with compute; other runs of the size at that
        ``x``, e.g. other subject counts or data mixtures, are points off the line). With it, each size is drawn as
        points only and a dashed grey line joins each group's best loss of every size (against parameters: the
        IsoFLOP profiles).

    Both axes are logarithmic. Every size is one ``Line2D`` labelled with its size; a group line is labelled only
    once ("same budget") and the others start with ``_``.
    """
    import matplotlib as mpl

    x = np.asarray(x, dtype=float); L = np.asarray(L, dtype=float); n = np.asarray(params, dtype=float)
    ok = np.isfinite(x) & np.isfinite(L) & np.isfinite(n) & (x > 0) & (L > 0)
    if not ok.any():
        raise ValueError("plot_loss_by_size: no run with a positive finite x, loss and parameter count")
    lab = np.asarray(labels if labels is not None else [f"{v:.3g} params" for v in n], dtype=object)
    fig = Figure(figsize=(8.5, 4.8), layout="constrained")
    ax = fig.add_subplot()
    uniq = np.unique(n[ok])
    cmap = mpl.colormaps["viridis"]
    for i, u in enumerate(uniq):
        sel = ok & (n == u)
        d = pd.DataFrame({"x": x[sel], "L": L[sel]})
        color = cmap(0.05 + 0.85 * i / max(1, len(uniq) - 1))
        if groups is None:
            top = d.groupby("x")["L"].idxmin()
            best = d.loc[top].sort_values("x")
            ax.plot(best["x"], best["L"], "o-", color=color, ms=5, label=str(lab[sel][0]), zorder=3)
            rest = d.drop(index=top.to_numpy())
            if len(rest):
                ax.plot(rest["x"], rest["L"], "o", ls="none", mfc="none", color=color, ms=5, zorder=3,
                        label="_other runs of the size")
        else:
            ax.plot(d["x"], d["L"], "o", ls="none", color=color, ms=6, label=str(lab[sel][0]), zorder=3)
    if groups is not None:
        g = pd.Series(np.asarray(groups, dtype=object))[ok].astype(str).to_numpy()
        d = pd.DataFrame({"g": g, "x": x[ok], "L": L[ok]})
        named = False
        for name, gd in d.groupby("g", sort=False):
            best = gd.groupby("x", as_index=False)["L"].min().sort_values("x")
            if len(best) > 1:
                ax.plot(best["x"], best["L"], "--", color="0.6", lw=1, zorder=2,
                        label=f"_{group_name} {name}" if named else f"same {group_name} (best run per size)")
                ax.annotate(str(name), (best["x"].iloc[-1], best["L"].iloc[-1]), xytext=(4, 0), fontsize=6,
                            textcoords="offset points", color="0.4", va="center")
                named = True
    ax.set_xscale("log"); ax.set_yscale("log")
    ax.set_xlabel(x_name); ax.set_ylabel(loss_name); ax.set_title(title)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    return fig


def plot_isoflop(C, size, L, result: IsoFLOPResult) -> Figure:
    """IsoFLOP curves (loss vs size per budget) with the parabola fits and their vertices; the power law of
    the vertices is dashed and labelled "not a valid law" when ``result.valid`` is False."""
    fig = Figure(figsize=(10, 4.2))
    ax, ax2 = fig.subplots(1, 2)
    C = np.asarray(C, float); S = np.asarray(size, float); L = np.asarray(L, float)
    budgets = result.vertices["C"].to_numpy()
    colors = [f"C{i % 10}" for i in range(len(budgets))]
    for col, (_, v) in zip(colors, result.vertices.iterrows()):
        m = C == v.C
        ax.plot(S[m], L[m], "o", color=col, label=f"C={v.C:.2g}")
        xs = np.linspace(np.log(S[m]).min(), np.log(S[m]).max(), 100)
        ax.plot(np.exp(xs), v.p2 * xs ** 2 + v.p1 * xs + v.p0, "-", color=col)
        ax.plot(v.opt, v.L_min, "k*", ms=10)
    ax.set_xscale("log"); ax.set_xlabel(result.variable); ax.set_ylabel("loss"); ax.set_title("IsoFLOP profiles")
    ax.legend(fontsize=7)
    ax2.loglog(budgets, result.vertices["opt"], "k*", ms=10, label="vertices")
    xs = np.geomspace(budgets.min(), budgets.max() * 10, 50)
    ax2.loglog(xs, result.predict_opt(xs), color="r", **_law_style(
        result.valid, f"{result.variable}_opt ∝ C^{result.exponent:.3f} [{result.exponent_ci[0]:.3f}, "
                      f"{result.exponent_ci[1]:.3f}]"))
    ax2.set_xlabel("C (FLOPs)"); ax2.set_ylabel(f"{result.variable}_opt"); ax2.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_optimal_allocation(table: pd.DataFrame, *, valid: bool = True) -> Figure:
    """N_opt and D_opt against C (from :func:`analysis.fits.compute_optimal`), with intervals when present.

    ``valid=False`` (the approach-3 fit is not a valid law) draws the lines dashed and labelled so.
    """
    fig = Figure(figsize=(6.4, 4.4))
    ax = fig.add_subplot()
    for name, col in (("N_opt", "C0"), ("D_opt", "C1")):
        ax.loglog(table["C"], table[name], color=col, **_law_style(valid, name))
        if f"{name}_lo" in table:
            ax.fill_between(table["C"], table[f"{name}_lo"], table[f"{name}_hi"], color=col, alpha=0.2)
    ax.set_xlabel("C (FLOPs)"); ax.set_ylabel("parameters / tokens"); ax.legend()
    ax.set_title("Compute-optimal allocation")
    fig.tight_layout()
    return fig


def plot_lr_transfer(df: pd.DataFrame, per_width: pd.DataFrame | None = None, *, lr_col: str = "lr",
                     loss_col: str = "val_loss", width_col: str = "width", param_col: str = "parametrization",
                     slopes: pd.DataFrame | None = None) -> Figure:
    """Loss against learning rate per width, one panel per parametrization (SP | muP), LR* marked.

    With ``slopes`` (from :func:`analysis.mutransfer.lr_transfer`) each panel's title gives the slope
    and the verdict, or says that the verdict is not trustworthy (``valid`` False).
    """
    pars = list(pd.unique(df[param_col])) if param_col in df.columns else ["all"]
    fig = Figure(figsize=(5 * len(pars) + 2, 4), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(pars), sharey=True))
    widths = sorted(pd.unique(df[width_col]))
    for ax, par in zip(axes, pars):
        d = df if par == "all" else df[df[param_col] == par]
        for i, w in enumerate(widths):
            g = d[d[width_col] == w].groupby(lr_col)[loss_col].mean()
            if g.empty:
                continue
            ax.plot(g.index, g.values, "o-", color=f"C{i % 10}", label=f"width {w:g}")
            if per_width is not None and len(per_width):
                r = per_width[(per_width.parametrization == par) & (per_width.width == float(w))]
                if len(r):
                    ax.axvline(r.lr_opt.iloc[0], color=f"C{i % 10}", ls=":", lw=1)
        title = {"mup": "muP", "sp": "SP"}.get(str(par), str(par))
        if slopes is not None and len(slopes) and (slopes.parametrization == par).any():
            r = slopes[slopes.parametrization == par].iloc[0]
            title += f": slope {r.slope:+.2f} [{r.lo:+.2f}, {r.hi:+.2f}]"
            if "valid" in r and not r.valid:
                title += "\nverdict not trustworthy (see warnings)"
        ax.set_xscale("log", base=2); ax.set_xlabel("base learning rate (the run's LR)"); ax.set_title(title, fontsize=9)
    axes[0].set_ylabel(f"final {loss_col}")
    # one legend for the figure: every width's colour (the same in every panel) and what the dotted lines are
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=f"C{i % 10}", marker="o", label=f"width {w:g}") for i, w in enumerate(widths)]
    if per_width is not None and len(per_width):
        handles.append(Line2D([], [], color="0.3", ls=":", label="fitted optimal LR (quadratic in log2 LR)"))
    fig.legend(handles=handles, fontsize=8, loc="outside right upper")
    return fig


def plot_radar(table: pd.DataFrame, *, title: str = "Downstream tasks") -> Figure:
    """Radar plot: one polygon per row (configuration or model size), one spoke per task column.

    Values are drawn as given (e.g. AUROC, or ranks/z-scores for mixed metrics); NaN cells are drawn at 0.
    """
    tasks = list(table.columns)
    if len(tasks) < 3:
        raise ValueError(f"a radar plot needs at least 3 task columns, got {len(tasks)}")
    ang = np.linspace(0, 2 * np.pi, len(tasks), endpoint=False)
    fig = Figure(figsize=(6, 6))
    ax = fig.add_subplot(projection="polar")
    for i, (name, row) in enumerate(table.iterrows()):
        v = np.nan_to_num(row.to_numpy(dtype=float))
        ax.plot(np.r_[ang, ang[:1]], np.r_[v, v[:1]], "-", color=f"C{i % 10}", label=str(name))
        ax.fill(np.r_[ang, ang[:1]], np.r_[v, v[:1]], color=f"C{i % 10}", alpha=0.1)
    ax.set_xticks(ang); ax.set_xticklabels(tasks, fontsize=8)
    ax.set_title(title); ax.legend(fontsize=8, loc="upper right", bbox_to_anchor=(1.25, 1.1))
    fig.tight_layout()
    return fig


def plot_scaling(table: pd.DataFrame, *, unit_label: str = "nodes") -> Figure:
    """Throughput against units with the ideal line per baseline (from :func:`analysis.efficiency.scaling_table`)."""
    fig = Figure(figsize=(6.4, 4.4))
    ax = fig.add_subplot()
    ax.loglog(table["units"], table["throughput"], "ko-", label="measured")
    for i, c in enumerate(c for c in table.columns if c.startswith("ideal_")):
        m = table[c].notna()
        ax.loglog(table.loc[m, "units"], table.loc[m, c], "--", color=f"C{i}", label=f"ideal ({c[6:]})")
        eff = table.loc[m, f"efficiency_{c[6:]}"]
        for u, t, e in zip(table.loc[m, "units"], table.loc[m, "throughput"], eff):
            if e != 1.0:
                ax.annotate(f"{100 * e:.1f}%", (u, t), textcoords="offset points", xytext=(4, -10 - 10 * i),
                            fontsize=7, color=f"C{i}")
    ax.set_xlabel(unit_label); ax.set_ylabel("throughput (samples/s)"); ax.set_title("Strong scaling")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
