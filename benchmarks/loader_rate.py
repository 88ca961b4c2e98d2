"""The product loader's rate per worker count: train()'s input path without a model.

Builds what :func:`study.train.train` builds for a run (the spec's ``WindowedDataset`` with on-device finishing,
``PositionDataset`` with the per-sample SimMIM masks, ``make_loader``'s DataLoader over this rank's micro-batches)
and times ``--batches`` micro-batches per worker count after ``--skip`` warm-up batches, including the host-to-
device copy and the device-side finishing. Also reports a worker's CPU time per window (one process making the
loader's batched fetch, ``collate`` included, on one intra-op thread as a worker does; warm cache; before session 16
it timed ``ds[p]`` alone with all of torch's threads), which bounds the rate a node's cores can feed:
``workers / cpu_s_per_window``.

    python benchmarks/loader_rate.py --manifest COHORT/manifest.parquet --workers 2 4 8 --out $OUT/loader_rate.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--manifest", required=True, help="cohort manifest.parquet")
    ap.add_argument("--size", default="51M", help="swift_v2 size (its mask function)")
    ap.add_argument("--overrides", default='{"patch_size":[6,6,6,1],"window_size":[4,4,4,4],'
                                           '"mask_patch_size":[12,12,12,2]}', help="model config overrides (JSON)")
    ap.add_argument("--micro-batch", type=int, default=16, help="windows per micro-batch")
    ap.add_argument("--T", type=int, default=20, help="frames per window")
    ap.add_argument("--workers", type=int, nargs="+", default=[2, 4, 8], help="loader worker counts to time")
    ap.add_argument("--batches", type=int, default=40, help="timed micro-batches per worker count")
    ap.add_argument("--skip", type=int, default=4, help="untimed micro-batches first (worker start, first reads)")
    ap.add_argument("--pin", choices=["on", "off", "both"], default="on",
                    help="the DataLoader's pin_memory (train() pins on CUDA); 'both' times each worker count twice, "
                         "to see whether the one pin-memory thread caps the rate")
    ap.add_argument("--defer", choices=["auto", "on", "off"], default="auto",
                    help="the dataset's on-device finishing (train(): on for accelerators); 'on' on a CPU box times the "
                         "workers' part of the accelerator path (the finishing then runs on the CPU in the main process)")
    ap.add_argument("--out", default=None, help="JSON output path")
    args = ap.parse_args(argv)

    import torch

    from neuro_models import registry as R
    from study.devices import local_context
    from study.loop import PositionDataset, SampleOrder, make_loader, to_device
    from study.run_math import BatchPlan, model_config
    from study.spec import RunSpec
    from study.train import PositionMasks, PretrainState, build_datasets

    ctx = local_context()
    spec = RunSpec(study="bench", family="swift_v2", size=args.size, grid=(96, 96, 96), sequence_length=args.T,
                   batch_size=args.micro_batch, budget=10**6, manifest=args.manifest,
                   model_overrides=json.loads(args.overrides))
    cfg = model_config(spec)
    defer = ctx.device.type != "cpu" if args.defer == "auto" else args.defer == "on"
    _, train_ds, _ = build_datasets(spec, defer=defer)
    order = SampleOrder(len(train_ds), spec.seed)
    ds = PositionDataset(train_ds, order, spec.bad_data, masks=PositionMasks(R.mask_function(cfg), spec.seed))
    plan = BatchPlan.make(spec, 1)
    sync = torch.cuda.synchronize if ctx.device.type == "cuda" else (lambda: None)

    # one process: CPU seconds per window of a worker's fetch (read + decode + mask + collate; the batched fetch
    # a DataLoader worker makes, one intra-op thread as in a worker), warm cache
    from study.loop import collate

    def fetch(first: int) -> None:
        pos = list(range(first, first + args.micro_batch))
        collate(ds.__getitems__(pos) if hasattr(ds, "__getitems__") else [ds[p] for p in pos])

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    fetch(0)
    t0 = time.process_time()
    n1 = 2
    for k in range(n1):
        fetch(100 + k * args.micro_batch)
    cpu_per_window = (time.process_time() - t0) / (n1 * args.micro_batch)
    torch.set_num_threads(threads)
    rows = []
    pins = {"on": [True], "off": [False], "both": [True, False]}[args.pin]
    for w, pin in [(w, pin) for w in args.workers for pin in pins]:
        pin = pin and ctx.device.type == "cuda"
        state = PretrainState()
        loader = make_loader(ds, state, 10**6, plan, ctx, spec.replace(num_workers=w), pin_memory=pin)
        for _ in range(args.skip):
            to_device(next(loader), ctx.device)
        sync()
        t0 = time.perf_counter()
        for _ in range(args.batches):
            b = to_device(next(loader), ctx.device)
        sync()
        dt = time.perf_counter() - t0
        rate = args.batches * args.micro_batch / dt
        rows.append({"workers": w, "pin_memory": pin, "samples_per_s": rate, "per_worker": rate / max(w, 1)})
        print(f"workers {w:2d}, pin {'on ' if pin else 'off'}: {rate:7.1f} samples/s ({rate / max(w, 1):.1f} per "
              "worker)", flush=True)
        del loader, b
    out = {"device": torch.cuda.get_device_name() if ctx.device.type == "cuda" else "cpu", "cores": os.cpu_count(),
           "micro_batch": args.micro_batch, "T": args.T, "defer": defer, "cpu_s_per_window": cpu_per_window,
           "bound_per_worker": 1.0 / cpu_per_window, "rows": rows}
    print(f"one process: {cpu_per_window * 1e3:.1f} ms CPU per window -> at most {1 / cpu_per_window:.1f} "
          "windows/s per worker", flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
