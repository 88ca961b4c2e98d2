"""A job that makes teardown hard (tests/security/test_sec_netns.py): the driver ignores SIGTERM, and one Ray
actor per node ignores SIGTERM too. Touches READY once every actor runs. Usage: stubborn_job.py READY"""
from __future__ import annotations

import signal
import sys
import time
from pathlib import Path

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

signal.signal(signal.SIGTERM, signal.SIG_IGN)
ray.init(logging_level="ERROR")


@ray.remote(num_cpus=0)
class Stubborn:
    def __init__(self):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)

    def ready(self) -> bool:
        return True


actors = [Stubborn.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote()
          for n in ray.nodes() if n["Alive"]]
ray.get([a.ready.remote() for a in actors])
Path(sys.argv[1]).write_text(str(len(actors)))
while True:
    time.sleep(1)
