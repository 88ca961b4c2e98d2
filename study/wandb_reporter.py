"""W&B reporter: rank 0 only, offline by default, online when a key is configured, grouped by study.

Mode: ``$WANDB_MODE`` if set; otherwise ``online`` when ``WANDB_API_KEY`` is set (or a netrc login
exists) and ``offline`` when not. Offline runs land under ``<dir>/wandb/offline-run-*`` and can be
uploaded later with ``wandb sync <dir>/wandb/offline-run-*``. Keys are never logged.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from study.reporters import NullReporter
from study.spec import RunSpec


def wandb_mode() -> str:
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


class WandbReporter(NullReporter):
    def __init__(self, spec: RunSpec, *, dir: str | os.PathLike | None = None, group: str | None = None,
                 project: str | None = None) -> None:
        import wandb

        self._wandb = wandb
        if os.environ.get("NEUROX_WANDB_SWEEP_ID"):
            os.environ.setdefault("WANDB_SWEEP_ID", os.environ["NEUROX_WANDB_SWEEP_ID"])
        d = Path(dir or ".")
        d.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=project or os.environ.get("WANDB_PROJECT", "neurox"),
                              group=group or spec.study, name=spec.run_id, id=spec.spec_hash + "-" + spec.study[:20],
                              config=spec.to_dict(), dir=str(d), mode=wandb_mode(), resume="allow",
                              reinit="finish_previous", settings=wandb.Settings(console="off", silent=True))

    def log(self, metrics: dict[str, Any]) -> None:
        step = metrics.get("step")
        self.run.log({f"train/{k}": v for k, v in metrics.items() if k != "step"}, step=step)

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None = None) -> None:
        step = metrics.get("step")
        vals = {f"eval/{k}": v for k, v in metrics.items() if k.startswith("val_loss") and v is not None}
        vals.update({k: metrics[k] for k in ("flops", "tokens_seen", "samples_seen") if k in metrics})
        self.run.log(vals, step=step)

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


def sweep_parameters(specs) -> dict:
    """The spec fields that vary across ``specs``, as a W&B grid-sweep parameter block."""
    dicts = [s.to_dict() for s in specs]
    params = {}
    for key in dicts[0]:
        values = {json.dumps(d[key], default=list, sort_keys=True) for d in dicts}
        if len(values) > 1:
            params[key] = {"values": [json.loads(v) for v in sorted(values)]}
    return params


def create_sweep(study: str, specs, *, project: str | None = None) -> str | None:
    """Register the study as a W&B sweep when online (so the dashboard shows parallel coordinates and
    parameter importance over the varying spec fields); returns the sweep id, or None when offline.
    Runs join it through ``WANDB_SWEEP_ID``."""
    if wandb_mode() != "online" or not specs:
        return None
    import wandb

    config = {"name": study, "method": "grid", "metric": {"name": "eval/val_loss", "goal": "minimize"},
              "parameters": sweep_parameters(specs) or {"seed": {"values": [specs[0].seed]}}}
    return wandb.sweep(config, project=project or os.environ.get("WANDB_PROJECT", "neurox"))
