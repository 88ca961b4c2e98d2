"""Head loss on namespace nodes (issue #29 item 2): the head's GCS dies while the study runs.

``ray_cluster.sh run --head-restarts 1`` notices that the head's Ray exited, stops the study command, restarts the
head on the same addresses, every node agent restarts its Ray node against it, and the command runs again: the
study resumes from its storage. Compared with the same study run without a fault (embedded Ray on this machine):
the same runs, every (run, step) row exactly once, and equal losses.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pbs_harness import REPO, ClusterProcess, node_tmp_dirs, procs_of_job  # noqa: E402
from pbs_netns import NetnsNodes, netns_unavailable_reason  # noqa: E402

_reason = netns_unavailable_reason()
pytestmark = [pytest.mark.netns, pytest.mark.slow,
              pytest.mark.skipif(_reason is not None, reason=f"netns: {_reason}")]

STUDY = ["study/scaling_law.py", "--preset", "tiny_plan:longer", "--max-concurrent", "2", "--no-report",
         "--trial-launcher", "inline"]


def _rows(storage: Path, name: str):
    sys.path.insert(0, str(REPO))
    from analysis.store import read_table

    df = read_table(storage / name / "store", "train")
    return df.sort_values(["run_id", "step"]).reset_index(drop=True)


def _gcs_pids(nodes) -> list[int]:
    out = []
    for pid in nodes.pids_in(0):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"gcs_server" in cmd.split(b"\0")[0]:
            out.append(pid)
    return out


def _checkpoints(storage: Path, name: str) -> list[Path]:
    return list((storage / name / "runs").glob("*/*/checkpoints/step_*/COMPLETE"))


def test_head_loss_restarts_the_head_and_the_study_resumes(tmp_path):
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "HOME": str(tmp_path), "PYTHONPATH": "tests/pbs",
           "RAY_USAGE_STATS_ENABLED": "0"}
    # the reference: the same study, no fault, embedded Ray
    ref = tmp_path / "ref"
    r = subprocess.run([sys.executable, *STUDY, "--storage", str(ref), "--study-name", "hl", "--num-cpus", "2"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    want = _rows(ref, "hl")

    nodes = NetnsNodes(2, tmp_path)
    storage = tmp_path / "studies"
    jobid = str(70000 + int(time.time()) % 9999)
    cmd = ["env", "PYTHONPATH=tests/pbs", sys.executable, *STUDY, "--address", "auto", "--storage", str(storage),
           "--study-name", "hl"]
    c = ClusterProcess(nodes, tmp_path, jobid, "run",
                       ["--iface", "hsn0", "--num-cpus", "2", "--object-store-bytes", "100000000",
                        "--join-timeout", "240", "--head-restarts", "1"], cmd)
    try:
        end = time.monotonic() + 400
        while time.monotonic() < end and not _checkpoints(storage, "hl"):
            assert c.proc.poll() is None, c.text()[-4000:]
            time.sleep(0.2)
        assert _checkpoints(storage, "hl"), "no checkpoint before the deadline: machine too loaded?"
        gcs = _gcs_pids(nodes)
        assert len(gcs) == 1, gcs
        os.kill(gcs[0], signal.SIGKILL)  # the head is lost mid-study
        rc = c.proc.wait(600)
        text = c.text()
        assert rc == 0, text[-5000:]
    finally:
        if c.proc.poll() is None:
            c.terminate()
        nodes.close()
    assert "head lost" in text and "head restarted" in text, text[-3000:]
    assert procs_of_job(jobid) == [] and node_tmp_dirs(jobid) == []
    got = _rows(storage, "hl")
    # the same runs, each (run, step) row exactly once, the same numbers as without the fault
    assert not got.duplicated(["run_id", "step"]).any(), got[["run_id", "step"]]
    assert list(zip(got.run_id, got.step)) == list(zip(want.run_id, want.step))
    assert got.groupby("run_id")["is_final"].any().all()
    for col in ("train_loss", "val_loss"):
        a, b = got[col].to_numpy(float), want[col].to_numpy(float)
        np.testing.assert_array_equal(np.isnan(a), np.isnan(b))
        np.testing.assert_allclose(a[~np.isnan(a)], b[~np.isnan(b)], rtol=1e-6, err_msg=col)
