"""Run-to-run noise of the demo's runs: the same (width, steps) trained with several seeds through ``train()``.

Issue #21 item 4 asks the README's demo for a *valid* approach-3 fit. How much of a final loss is the seed's and not
the law's bounds what any design can pin. Each run is the demo's spec (``study.plans.demo_width``: LR
``2e-2 x 16 / width``, decoder as wide as the encoder, cosine schedule, batch 4 of 8-frame 24^3 windows, the demo's
cohort) with ``budget_kind="steps"``; ``--vary`` picks what the seed changes: ``all`` (the product: initialisation,
data order and masks), ``init`` (data order and masks held at seed 0) or ``data`` (initialisation held at seed 0).
Runs go one at a time on one thread; the table gives the mean, the standard deviation and its ratio to the mean.

    python benchmarks/demo_seed_noise.py --runs 16:217,16:541,32:553,64:641 --seeds 0,1,2 \
        --out benchmarks/results/demo_seed_noise.json
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import study.train as T  # noqa: E402
from data.synthetic import generate_cohort  # noqa: E402
from study.devices import local_context  # noqa: E402
from study.plans import DEMO_COHORT, demo, demo_width  # noqa: E402
from study.reporters import MemoryReporter  # noqa: E402


class _HoldInit:
    """``study.train``'s ``torch`` with ``manual_seed`` pinned to 0 (the model's initialisation stays seed 0's)."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def manual_seed(_seed):
        return torch.manual_seed(0)


def hold(vary: str) -> None:
    """Pin what ``--vary`` keeps at seed 0 (only in this process)."""
    if vary == "init":  # data order and masks (training and validation) from seed 0
        order, masks = T.SampleOrder, T.PositionMasks
        T.SampleOrder = lambda n, seed: order(n, 0)
        T.PositionMasks = lambda fn, seed: masks(fn, 0)
    elif vary == "data":
        T.torch = _HoldInit()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", default="16:217,16:541,32:553,64:641", help="width:steps, comma-separated")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--vary", choices=("all", "init", "data"), default="all")
    ap.add_argument("--cohort", default=None, help="the demo cohort's folder (default: a temporary one)")
    ap.add_argument("--out", default=None, help="JSON file to write")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    hold(a.vary)
    seeds = [int(s) for s in a.seeds.split(",")]
    runs = [tuple(int(x) for x in r.split(":")) for r in a.runs.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        manifest = str(generate_cohort(a.cohort or tmp, progress=False, **DEMO_COHORT))
        base = demo(None).specs[0]
        rows = []
        for w, steps in runs:
            losses, secs = [], []
            for seed in seeds:
                spec = demo_width(base, w).replace(budget_kind="steps", budget=steps, manifest=manifest, seed=seed,
                                                    eval_every=steps, checkpoint_every=0)
                rep, t0 = MemoryReporter(), time.time()
                T.train(spec, local_context("cpu"), rep)
                losses.append(float(rep.reports[-1]["val_loss"]))
                secs.append(time.time() - t0)
                print(f"w{w} {steps} steps seed {seed}: val loss {losses[-1]:.5f} ({secs[-1]:.0f} s)", flush=True)
            m, sd = float(np.mean(losses)), float(np.std(losses, ddof=1)) if len(losses) > 1 else float("nan")
            rows.append(dict(width=w, steps=steps, seeds=seeds, val_loss=losses, mean=m, sd=sd, rel_sd=sd / m,
                             seconds=secs))
    print(f"\nvary: {a.vary}\n")
    print("| width | steps | val loss per seed | mean | sd | sd / mean |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['width']} | {r['steps']} | {', '.join(f'{x:.4f}' for x in r['val_loss'])} | {r['mean']:.4f} | "
              f"{r['sd']:.4f} | {r['rel_sd']:.1%} |")
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(dict(vary=a.vary, torch_threads=1, rows=rows), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
