"""Walltime-aware continuation across allocations on namespace nodes, with a stand-in study driver.

Allocation 1 ("walltime" 40 s, stop margin 4 s): the watcher creates <storage>/<study>/STOP, trials
checkpoint and return, the job ends cleanly, the study is not marked complete, a continuation job was
chained with ``qsub -W depend=afterany:<job>``. Allocation 2 (same study name): the stale STOP is
removed, the unfinished trials resume from their checkpoints and finish, the study is marked complete
and the chained job is cancelled. Allocation 3 exits at once without starting Ray.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pbs_harness import ClusterProcess, node_tmp_dirs, procs_of_job  # noqa: E402
from pbs_netns import NetnsNodes, netns_unavailable_reason  # noqa: E402

_reason = netns_unavailable_reason()
pytestmark = [pytest.mark.netns, pytest.mark.slow,
              pytest.mark.skipif(_reason is not None, reason=f"netns: {_reason}")]


def _fake_pbs_tools(bindir: Path, calls: Path) -> None:
    bindir.mkdir()
    for tool, out in (("qsub", "555.testpbs"), ("qdel", "")):
        f = bindir / tool
        f.write_text(f"#!/bin/sh\necho \"{tool} $*\" >> {calls}\n[ -n \"{out}\" ] && echo {out}\nexit 0\n")
        f.chmod(0o755)


def _trace(study: Path) -> dict[int, list[int]]:
    steps: dict[int, list[int]] = {}
    for line in (study / "trace.txt").read_text().splitlines():
        x, _, s = line.split()
        steps.setdefault(int(x), []).append(int(s))
    return steps


def test_stop_before_walltime_then_resume_and_complete(tmp_path):
    nodes = NetnsNodes(2, tmp_path)
    storage, name = tmp_path / "studies", "cont-study"
    study = storage / name
    bindir, calls = tmp_path / "bin", tmp_path / "pbs_calls.txt"
    _fake_pbs_tools(bindir, calls)
    here = Path(__file__).resolve().parent
    job_script = tmp_path / "job.pbs"
    job_script.write_text("#!/bin/bash\n")
    args = ["--iface", "hsn0", "--num-cpus", "1", "--object-store-bytes", "100000000", "--join-timeout", "240",
            "--storage", str(storage), "--study-name", name, "--stop-margin", "4", "--chain", "2",
            "--job-script", str(job_script)]
    cmd = ["ray", "job", "submit", "--working-dir", str(here), "--", "python", "stop_aware_study.py",
           "--storage", str(storage), "--study-name", name, "--trials", "2", "--steps", "100", "--step-s", "0.4"]
    jobs = []
    try:
        import os

        path = f"{bindir}:{Path(sys.executable).parent}:{os.environ['PATH']}"
        # allocation 1
        j1 = str(60000 + int(time.time()) % 9999)
        c1 = ClusterProcess(nodes, tmp_path, j1, "run", args, cmd, NEUROX_WALLTIME_S="40", PATH=path,
                            NEUROX_STUDY_TAG="a1")
        jobs.append(c1)
        assert c1.proc.wait(400) == 0, c1.text()[-4000:]
        t1 = c1.text()
        assert (study / "STOP").exists() and "walltime nearly over" in t1 and "stopped by STOP" in t1
        assert "stopped before the walltime" in t1
        assert not (study / ".pbs_chain" / "complete").exists()
        assert (study / "trace.txt").exists(), "no trial started before the stop: machine too loaded?"
        first = _trace(study)
        assert all(max(s) < 99 for s in first.values()), first  # nobody finished
        assert f"qsub -W depend=afterany:{j1}.testpbs -v NEUROX_CHAIN=1" in calls.read_text()
        assert "NEUROX_STUDY_TAG=a1" in calls.read_text()  # the user's NEUROX_* settings go along
        assert procs_of_job(j1) == [] and node_tmp_dirs(j1) == []
        # allocation 2: same study name
        j2 = str(int(j1) + 1)
        c2 = ClusterProcess(nodes, tmp_path, j2, "run", args, cmd, NEUROX_WALLTIME_S="1000", PATH=path)
        jobs.append(c2)
        assert c2.proc.wait(400) == 0, c2.text()[-4000:]
        t2 = c2.text()
        assert "removing the previous allocation's stop file" in t2 and "all trials finished" in t2
        assert not (study / "STOP").exists()
        assert (study / ".pbs_chain" / "complete").exists()
        steps = _trace(study)
        assert sorted(steps) == [0, 1]
        for x, s in steps.items():
            assert sorted(s) == list(range(100)), (x, s)  # resumed from the checkpoint: every step exactly once
        assert "qdel 555.testpbs" in calls.read_text()
        assert procs_of_job(j2) == [] and node_tmp_dirs(j2) == []
        # allocation 3 (e.g. the chained job if qdel raced): nothing to do, no Ray started
        j3 = str(int(j1) + 2)
        c3 = ClusterProcess(nodes, tmp_path, j3, "run", args, cmd, PATH=path)
        jobs.append(c3)
        assert c3.proc.wait(60) == 0
        assert "is already complete" in c3.text() and "starting head" not in c3.text()
    finally:
        for c in jobs:
            if c.proc.poll() is None:
                c.terminate()
        nodes.close()
