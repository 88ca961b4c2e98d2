"""The functional-connectivity baseline of a cohort, from the command line or from a study.

Joins :mod:`data.connectivity` (parcel series -> Fisher-z correlations, or the series for the tangent space) and
:mod:`analysis.fc` (logistic / ridge regression fitted on the manifest's ``train`` subjects, the penalty picked by an
inner cross-validation, per-subject AUROC / balanced accuracy or MAE / Pearson r on ``val`` and ``test``; repeats
differ in the inner-CV seed)::

    python -m study.fc_baseline --manifest cohort/manifest.parquet \\
        --tasks trait_bin:classification trait_cont:regression --atlas auto --kind correlation --repeats 3

``study/finetune.py`` adds the same rows (``FCConfig()`` defaults) to every fine-tuning table.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

import pandas as pd

from analysis.fc import METHOD, FCConfig, fc_baseline
from study.metrics import parse_tasks


def run_fc(manifest, tasks: Sequence[tuple[str, str]], cfg: FCConfig = FCConfig()) -> pd.DataFrame:
    """The FC baseline of a cohort (a manifest path or ``data.manifest.Manifest``): one row per task and repeat
    (see :func:`analysis.fc.fc_baseline`) plus ``atlas`` and ``n_parcels``."""
    from data.connectivity import load_parcellation, subject_features
    from data.manifest import Manifest

    m = manifest if isinstance(manifest, Manifest) else Manifest.load(manifest)
    labels_XYZ, atlas = load_parcellation(m, cfg.atlas)
    feats, keys = subject_features(m, labels_XYZ, kind="series" if cfg.kind == "tangent" else "correlation")
    out = fc_baseline(feats, keys, m.df["split"].astype(str).tolist(), m.df.reset_index(drop=True), tasks, cfg)
    out["atlas"] = atlas
    out["n_parcels"] = int(labels_XYZ.max())
    out["method"] = f"{METHOD} ({cfg.kind}, {atlas} atlas)"
    return out


def main(argv: Sequence[str] | None = None) -> int:
    from study.cli_args import HelpFormatter

    ap = argparse.ArgumentParser(prog="python -m study.fc_baseline", description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--manifest", required=True, help="cohort manifest (Parquet) with the label columns")
    ap.add_argument("--tasks", nargs="+", default=["trait_bin:classification", "trait_cont:regression"],
                    help="tasks as <label column>:<classification|regression>")
    ap.add_argument("--atlas", default="auto",
                    help="auto (parcellation.npz beside the manifest, else blocks), blocks[:edge], networks (a "
                         "synthetic cohort's planted maps), or a labels .npz/NIfTI on the cohort's grid")
    ap.add_argument("--kind", default="correlation", choices=["correlation", "tangent"], help="connectivity measure")
    ap.add_argument("--repeats", type=int, default=3, help="repeats (inner-CV seeds seed, seed+1, ...)")
    ap.add_argument("--seed", type=int, default=0, help="first inner-CV seed")
    ap.add_argument("--inner-folds", type=int, default=5, help="folds of the inner cross-validation")
    ap.add_argument("--out", help="also write the per-repeat rows to this file (CSV or Parquet)")
    ap.add_argument("--json", action="store_true", help="print the rows as JSON instead of tables")
    args = ap.parse_args(argv)
    try:
        tasks = parse_tasks(args.tasks)
        cfg = FCConfig(atlas=args.atlas, kind=args.kind, repeats=args.repeats, seed=args.seed,
                       inner_folds=args.inner_folds)
        df = run_fc(args.manifest, tasks, cfg)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.out:
        (df.to_parquet if args.out.endswith(".parquet") else df.to_csv)(args.out, index=False)
    if args.json:
        print(json.dumps(df.to_dict(orient="records"), indent=2, default=str))
        return 0
    cols = [c for c in ("task", "repeat", "auroc", "bacc", "mae", "pearson_r", "chance", "best_penalty", "degenerate")
            if c in df.columns]
    print(df[cols].to_string(index=False))
    print(f"\n{df['method'].iloc[0]}, {int(df['n_parcels'].iloc[0])} parcels; mean ± std over {cfg.repeats} repeats:")
    for task, g in df.groupby("task", sort=False):
        v = g["value"].to_numpy(dtype=float)
        sd = f" ± {v.std(ddof=1):.3f}" if len(v) > 1 else ""
        flags = sorted(set(g["degenerate"].fillna("")) - {""})
        flag = f" [degenerate: {'; '.join(flags)}]" if flags else ""
        print(f"  {task}: {g['metric'].iloc[0]} {v.mean():.3f}{sd} (chance {g['chance'].iloc[0]:.3f}){flag}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
