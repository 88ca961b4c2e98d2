"""Launch one run in this process, or as one rank of ``torchrun``.

One process::

    python -m study.launch_local --spec spec.json --run-dir runs/my-run

Two CPU ranks (gloo) or one rank per GPU::

    torchrun --nproc-per-node 2 -m study.launch_local --spec spec.json --run-dir runs/my-run

``--resume`` continues from the newest complete checkpoint under ``--run-dir`` if there is one.
Metrics go to ``<run-dir>/metrics.jsonl`` (rank 0), to the results store with ``--store``, and to W&B
(offline unless a key is configured) with ``--wandb``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from study import checkpoint as ckpt
from study.devices import context_from_env
from study.reporters import MultiReporter, ProgressPrinter, RankZero
from study.run_env import RunEnv, build_reporters, static_row  # noqa: F401  (static_row: its former home)
from study.spec import RunSpec
from study.train import BadDataError, train


def build_parser() -> argparse.ArgumentParser:
    from study.cli_args import HelpFormatter

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--spec", required=True, help="JSON file with the RunSpec fields (examples/debug_run.json)")
    ap.add_argument("--run-dir", required=True, help="checkpoints and metrics.jsonl go here")
    ap.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    ap.add_argument("--store", default=None, help="results-store directory to append rows to")
    ap.add_argument("--wandb", action="store_true", help="log to W&B (offline unless WANDB_API_KEY is set)")
    ap.add_argument("--device", default=None, choices=["cuda", "xpu", "cpu"],
                    help="device kind (default: $NEUROX_DEVICE, else CUDA, else XPU, else CPU)")
    ap.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    ap.add_argument("--bad-data", choices=["stop", "skip"], default=None,
                    help="what the run does with an unusable subject file: 'stop' ends it naming the file, 'skip' "
                         "skips its windows; with --store the file goes on that store's quarantine list "
                         "(<store>/quarantine/), which later runs with 'skip' skip from the start (default: the "
                         "spec's bad_data, 'stop' unless it says otherwise)")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        spec = RunSpec.from_json(Path(args.spec).read_text())
        if args.bad_data:
            spec = spec.replace(bad_data=args.bad_data)
    except (OSError, ValueError) as exc:
        print(f"error: cannot read run spec {args.spec}: {exc}", file=sys.stderr)
        return 2
    try:
        from study.run_math import model_config

        model_config(spec)  # unknown family / size / model field: fail before any process group or data
        if not spec.manifest:
            raise ValueError("it has no 'manifest' (the cohort's manifest.parquet); see examples/debug_run.json")
        if not Path(spec.manifest).is_file():
            raise ValueError(f"manifest {spec.manifest} does not exist")
    except ValueError as exc:
        print(f"error: run spec {args.spec}: {exc}", file=sys.stderr)
        return 2
    import torch.distributed as dist

    ours = not dist.is_initialized()  # called in-process (tests, notebooks): leave a caller's process group alone
    ctx = context_from_env(args.device)
    run_dir = Path(args.run_dir)
    resume = ckpt.latest_checkpoint(run_dir / "checkpoints") if args.resume else None
    env = RunEnv(store_dir=args.store, wandb=args.wandb, device=args.device)
    progress = [] if args.quiet else [ProgressPrinter(spec.run_id)]
    reporter = RankZero(ctx.rank, MultiReporter(build_reporters(spec, env, rank=ctx.rank,
                                                                jsonl=run_dir / "metrics.jsonl", wandb_dir=run_dir)
                                                + progress))
    quarantine = None
    if args.store:  # the store's list of bad subject files (data.quarantine), as a study's runs have it
        from data.quarantine import Quarantine

        quarantine = Quarantine(args.store)
    try:
        result = train(spec, ctx, reporter, run_dir=run_dir, resume_from=resume, quarantine=quarantine)
    except BadDataError as exc:  # one line naming the file, not the loader's traceback
        print(f"error: run {spec.run_id} stopped on bad data: {exc}", file=sys.stderr)
        print(f"  fix or remove the file from {spec.manifest}" + (
            "" if str(exc).startswith("validation window") else ", or rerun with --bad-data skip to train without "
            "its windows"), file=sys.stderr)
        return 2
    finally:
        reporter.close()
        if ours and dist.is_initialized():  # the group torchrun's ranks (or DeepSpeed, for a world of one) made here
            dist.destroy_process_group()
    if ctx.rank == 0:
        print(json.dumps({"run_id": result.run_id, "status": result.status, "step": result.step,
                          "val_loss": result.final_metrics.get("val_loss")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
