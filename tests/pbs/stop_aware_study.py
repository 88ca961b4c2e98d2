"""Test harness: a stand-in study driver that honours ``<storage>/<study>/STOP`` like study/scaling_law.py.

Trials of a small Ray Tune sweep keep their own checkpoint (``ckpt/<x>.json``) under the study directory,
check the STOP file at every step, and on seeing it save a final checkpoint and return. A rerun with the
same storage and study name runs only the unfinished trials, each from its checkpoint. Appends
``x node_ip step`` lines to ``<study>/trace.txt``. Exit 0 when all trials finished or were stopped.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import ray
from ray import tune


def trainable(config):
    import time

    study = Path(config["study_dir"])
    x, ck = config["x"], study / "ckpt" / f"{config['x']}.json"
    step = json.loads(ck.read_text())["next"] if ck.exists() else 0
    ip = ray.util.get_node_ip_address()
    while step < config["steps"]:
        if (study / "STOP").exists():
            break
        time.sleep(config["step_s"])
        with open(study / "trace.txt", "a") as f:
            f.write(f"{x} {ip} {step}\n")
        step += 1
        tmp = ck.with_suffix(".tmp")
        tmp.write_text(json.dumps({"next": step}))
        os.replace(tmp, ck)
    if step >= config["steps"]:
        (study / "done").mkdir(exist_ok=True)
        (study / "done" / str(x)).touch()
    tune.report({"next": step})


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--storage", required=True)
    p.add_argument("--study-name", required=True)
    p.add_argument("--trials", type=int, default=4)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--step-s", type=float, default=0.5)
    a = p.parse_args()
    study = Path(a.storage) / a.study_name
    (study / "ckpt").mkdir(parents=True, exist_ok=True)
    done = {int(f.name) for f in (study / "done").glob("*")} if (study / "done").exists() else set()
    todo = [x for x in range(a.trials) if x not in done]
    print(f"resuming: {len(done)} done, {len(todo)} to run", flush=True)
    if todo:
        ray.init(logging_level="ERROR")
        space = {"x": tune.grid_search(todo), "steps": a.steps, "step_s": a.step_s, "study_dir": str(study)}
        tune.Tuner(tune.with_resources(trainable, {"cpu": 1}), param_space=space,
                   run_config=tune.RunConfig(name=f"run{len(done)}", storage_path=str(study / "tune"),
                                             verbose=0)).fit()
    print("stopped by STOP" if (study / "STOP").exists() else "all trials finished", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
