"""Test harness job: a small Ray Tune sweep submitted to the namespace cluster with `ray job submit`.

Each trial runs ``--steps`` iterations of ``--step-s`` seconds on one CPU, checkpoints every step, and
appends ``trial_id node_ip step`` to ``--trace`` (all test "nodes" share the file system), so the test
sees where every trial ran, including after a fail-over. A trial restored from its checkpoint continues
at the next step. Writes a JSON summary (status, failures, last node) per trial to ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import ray
from ray import tune


def trainable(config):
    ctx = tune.get_context()
    start = 0
    ckpt = tune.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            start = json.load(open(os.path.join(d, "state.json")))["step"] + 1
    ip = ray.util.get_node_ip_address()
    for step in range(start, config["steps"]):
        time.sleep(config["step_s"])
        with open(config["trace"], "a") as f:
            f.write(f"{ctx.get_trial_id()} {ip} {step}\n")
        with tempfile.TemporaryDirectory() as d:
            json.dump({"step": step}, open(os.path.join(d, "state.json"), "w"))
            tune.report({"step": step, "score": config["x"] * step, "node_ip": ip},
                        checkpoint=tune.Checkpoint.from_directory(d))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--trials", type=int, default=6)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--step-s", type=float, default=0.5)
    p.add_argument("--trace", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--storage", required=True)
    a = p.parse_args()
    ray.init(logging_level="ERROR")  # RAY_ADDRESS is set by the job supervisor
    space = {"x": tune.grid_search(list(range(a.trials))), "steps": a.steps, "step_s": a.step_s, "trace": a.trace}
    tuner = tune.Tuner(
        tune.with_resources(trainable, {"cpu": 1}),
        param_space=space,
        run_config=tune.RunConfig(name="nxtest", storage_path=a.storage, verbose=0,
                                  failure_config=tune.FailureConfig(max_failures=3)),
    )
    grid = tuner.fit()
    out = []
    for r in grid:
        out.append({"x": r.config["x"], "error": None if r.error is None else str(r.error)[:300],
                    "step": (r.metrics or {}).get("step"), "node_ip": (r.metrics or {}).get("node_ip")})
    nodes = sorted({n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]})
    json.dump({"trials": out, "alive_nodes": nodes}, open(a.out, "w"), indent=1)


if __name__ == "__main__":
    main()
