"""The chaos campaign's cluster mode (``benchmarks/chaos.py --cluster``, issue #29 item 3): one seeded schedule of a
node kill (every Ray process of the worker node) and a head kill (the head's GCS server) while the campaign's study
runs on two namespace nodes under ``pbs/ray_cluster.sh run --head-restarts 2``; each recovered as documented
(Tune retries a lost node's trial on the head node; the bootstrap restarts the head and reruns the study, which
resumes from storage), and the study equals the uninterrupted one on the same cluster, which equals the embedded
Ray's. Also: nothing of the campaign is left (namespaces, Ray temp dirs, job state). About 2.5 min on the 2-core
box at load ~2."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO / "tests" / "pbs"))
from pbs_netns import netns_unavailable_reason  # noqa: E402

_reason = netns_unavailable_reason()
pytestmark = [pytest.mark.ray, pytest.mark.faults, pytest.mark.slow, pytest.mark.netns,
              pytest.mark.skipif(_reason is not None, reason=f"netns: {_reason}")]

ZERO = dict.fromkeys(("suggestions_differing", "trial_states_differing", "decisions_differing", "rows_lost",
                      "rows_extra", "rows_unequal", "rows_duplicated"), 0)


@pytest.mark.timeout(900)
def test_cluster_schedule_node_then_head_kill_recovers_exactly(tmp_path):
    import chaos

    before = set(subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split())
    res = chaos.campaign(tmp_path, [6], 2, cluster=True, kinds=("node", "head"), max_rows=30)  # node, then head
    s = res["summary"]
    sched = res["schedules"][0]
    assert s["recovered"] == 1 and s["kills_applied"] >= 1, sched
    assert {k: s[k] for k in ZERO} == ZERO, sched["compare"]["detail"]
    assert s["cluster_reference_vs_embedded"] == ZERO, res["reference"]["vs_embedded"]["detail"]
    assert s["steps_redone_per_kill_max"] <= 1
    assert chaos.CLUSTER is None
    # nothing left behind: the campaign's namespaces, its jobs' Ray temp dirs and state dirs
    after = set(subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split())
    assert not {n for n in after - before if n.startswith("nx")}, after - before
    jobs = [d.name for d in (tmp_path / "cluster" / "state" / "logs").iterdir()]
    assert jobs, "no job ran"
    left = [str(p) for j in jobs for p in Path("/tmp", f"nx-{os.geteuid()}").glob(f"{j}.*_*")]
    assert left == [] and not [d for d in (tmp_path / "cluster" / "state").iterdir() if d.name != "logs"], left
