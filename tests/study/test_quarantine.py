"""Bad data across a study's trials (issue #28 item 1): the quarantine list in the study's store, the skip policy that
reads it, the stop policy that names the file once and stops the study, and the console without tracebacks."""
from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
import time
from pathlib import Path

import h5py
import pandas as pd
import pytest

from data.quarantine import Quarantine
from study.devices import local_context
from study.reporters import MemoryReporter
from study.train import BadDataError, train

REPO = Path(__file__).resolve().parents[2]


def flip_chunks(path: Path) -> None:
    """One byte flipped in every chunk of the BOLD data: the file still opens and its header reads (the quick
    pre-flight check of a large cohort would pass it), every window read fails to decode."""
    with h5py.File(path, "r") as f:
        d = f["bold"].id
        infos = [d.get_chunk_info(i) for i in range(d.get_num_chunks())]
    with open(path, "r+b") as fh:
        for info in infos:
            at = info.byte_offset + info.size // 2
            fh.seek(at)
            b = fh.read(1)
            fh.seek(at)
            fh.write(bytes([b[0] ^ 0xFF]))


@pytest.fixture
def corrupt_cohort(tiny_cohort, tmp_path):
    """A copy of the tiny cohort whose train files of cohort_c have a corrupt chunk inside: manifest, bad paths."""
    dst = tmp_path / "cohort"
    shutil.copytree(Path(tiny_cohort).parent, dst)
    df = pd.read_parquet(dst / "manifest.parquet")
    bad = [str((dst / p).resolve()) for p in df[(df.split == "train") & (df.cohort == "cohort_c")].path]
    assert bad
    for p in bad:
        flip_chunks(Path(p))
    return str(dst / "manifest.parquet"), bad


def test_the_list_is_append_only_and_the_newest_record_of_a_file_wins(tmp_path):
    q = Quarantine(tmp_path / "store")
    assert q.entries() == [] and q.skipped_paths() == set()
    f = tmp_path / "sub-01.h5"
    f.write_bytes(b"x" * 10)
    t0 = time.time()
    q.record(str(f), "cannot decode", found_by="run-a", policy="stop")
    q.record(str(f), "cannot decode", found_by="run-b", policy="skip")
    q.record(str(tmp_path / "gone.h5"), "does not exist", found_by="preflight", policy="skip")
    assert len(list((tmp_path / "store" / "quarantine").glob("*.json"))) == 3  # appended, never rewritten
    by = {e.path: e for e in Quarantine(tmp_path / "store").entries()}  # another reader (trial, resumed study)
    assert by[str(f)].found_by == "run-b" and by[str(f)].policy == "skip"
    assert q.skipped_paths() == {str(f), str(tmp_path / "gone.h5")}
    assert {e.path for e in q.found_since(t0)} == set(by)
    assert q.found_since(time.time() + 1) == []
    f.write_bytes(b"y" * 11)  # repaired or replaced since: no longer skipped
    assert q.skipped_paths() == {str(tmp_path / "gone.h5")}
    with pytest.raises(ValueError, match="policy"):
        q.record(str(f), "x", found_by="r", policy="ignore")


def test_the_store_ignores_the_list(tmp_path):
    """``quarantine/`` sits beside the results store's tables and is not one of them."""
    from analysis.store import ResultsStore, read_table

    Quarantine(tmp_path).record(str(tmp_path / "a.h5"), "bad", found_by="preflight", policy="skip")
    ResultsStore(tmp_path).append("train", [{"run_id": "r", "step": 1, "val_loss": 1.0}])
    assert ResultsStore(tmp_path).tables() == ["train"]
    assert len(read_table(tmp_path, "train")) == 1


def test_bad_data_error_keeps_its_file_across_processes():
    e = pickle.loads(pickle.dumps(BadDataError("window 3: /d/sub-07.h5: cannot decode", path="/d/sub-07.h5")))
    assert isinstance(e, BadDataError) and e.path == "/d/sub-07.h5" and "sub-07" in str(e)
    assert str(BadDataError("message only")) == "message only"  # how a DataLoader worker's error is rebuilt


def test_a_skip_run_quarantines_what_it_meets_and_the_next_run_never_reads_it(mamba_spec, corrupt_cohort, tmp_path):
    manifest, bad = corrupt_cohort
    q = Quarantine(tmp_path / "store")
    spec = mamba_spec.replace(manifest=manifest, budget=12, bad_data="skip")
    first = MemoryReporter()
    assert train(spec, local_context("cpu"), first, quarantine=q).status == "finished"
    met = [r["bad_data_skipped"] for r in first.logs if "bad_data_skipped" in r]
    assert met and all(any(b in m for b in bad) for m in met)
    entries = q.entries()
    assert entries and {e.path for e in entries} <= set(bad)
    assert all(e.policy == "skip" and e.found_by == spec.run_id and "decode" in e.what for e in entries)
    assert len(met) == len({e.path for e in entries})  # one message per bad file, not one per window

    second = MemoryReporter()  # a later trial (or the same run in a resumed study): skips them from the start
    res = train(spec.replace(seed=1, budget=6), local_context("cpu"), second, quarantine=q)
    assert res.status == "finished"
    assert not [r for r in second.logs if "bad_data_skipped" in r]  # never read, so never met again
    assert [r["bad_data_quarantined"] for r in second.logs if "bad_data_quarantined" in r] == [len(entries)]
    assert len(q.entries()) == len(entries)


def test_a_stop_run_records_the_file_it_stops_at(mamba_spec, corrupt_cohort, tmp_path):
    manifest, bad = corrupt_cohort
    q = Quarantine(tmp_path / "store")
    spec = mamba_spec.replace(manifest=manifest, budget=12)
    with pytest.raises(BadDataError) as err:
        train(spec, local_context("cpu"), MemoryReporter(), quarantine=q)
    (e,) = q.entries()
    assert e.path in bad and e.path in str(err.value) and e.policy == "stop" and e.found_by == spec.run_id
    assert Path(e.path).name in str(err.value)


def test_a_bad_validation_file_stops_the_run_under_either_policy(mamba_spec, tiny_cohort, tmp_path):
    """Validation windows cannot be skipped (val_loss would not compare across runs): the file is named, listed with
    policy stop, and the advice is to fix or remove it, not --bad-data skip."""
    from study.runner import StudyRun, failure_summary

    dst = tmp_path / "cohort"
    shutil.copytree(Path(tiny_cohort).parent, dst)
    df = pd.read_parquet(dst / "manifest.parquet")
    bad = str((dst / df[df.split == "val"].path.iloc[0]).resolve())
    flip_chunks(Path(bad))
    q = Quarantine(tmp_path / "store")
    spec = mamba_spec.replace(manifest=str(dst / "manifest.parquet"), bad_data="skip", eval_windows=64)
    with pytest.raises(BadDataError, match="validation window") as err:
        train(spec, local_context("cpu"), MemoryReporter(), quarantine=q)
    assert err.value.path == bad
    (e,) = q.entries()
    assert e.path == bad and e.policy == "stop" and e.what.startswith("(validation split) ")
    run = StudyRun(name="s", study_dir=tmp_path, store_dir=q.store_dir, specs=[spec], stop_file=tmp_path / "STOP",
                   failed=1, errors=[{"run_id": spec.run_id, "cause": f"BadDataError: {err.value}", "trial_path": ""}],
                   bad_data_stop=True, bad_files=[e])
    text = "\n".join(failure_summary(run))
    assert "validation files cannot be skipped" in text and "--bad-data skip" not in text


def test_preflight_findings_go_on_the_list_once(mamba_spec, corrupt_cohort, tmp_path, monkeypatch, capsys):
    from study.preflight import check_specs, quarantine_found

    manifest, bad = corrupt_cohort
    monkeypatch.setenv("NEUROX_VERIFY", "full")
    spec = mamba_spec.replace(manifest=manifest, bad_data="skip")
    q = Quarantine(tmp_path / "store")
    check_specs([spec], manifest)
    assert capsys.readouterr().err.count("quarantined") == len(bad)
    assert quarantine_found(q, manifest) == len(bad)
    assert {e.path for e in q.entries()} == set(bad) and {e.found_by for e in q.entries()} == {"preflight"}
    check_specs([spec], manifest)  # a resumed study checks again: nothing new to record
    assert quarantine_found(q, manifest) == 0


def test_bad_data_option_sets_every_run_and_is_in_every_study_cli():
    from study import scaling_law
    from study.runner import with_bad_data
    from study.spec import RunSpec

    args = scaling_law.parse_args(["--bad-data", "skip"])
    specs = with_bad_data([RunSpec(seed=0), RunSpec(seed=1)], args)
    assert {s.bad_data for s in specs} == {"skip"}
    assert specs[0].run_id == RunSpec(seed=0).run_id  # same runs: a rerun with the option resumes them
    assert with_bad_data([RunSpec()], scaling_law.parse_args([]))[0].bad_data == "stop"
    with pytest.raises(SystemExit):
        scaling_law.parse_args(["--bad-data", "ignore"])


def test_rerun_command_sets_the_option():
    from study.runner import rerun_command

    argv = ["study/scaling_law.py", "--preset", "smoke", "--bad-data", "stop", "--study-name", "x y"]
    assert rerun_command("--bad-data", "skip", argv) == \
        "python study/scaling_law.py --preset smoke --study-name 'x y' --bad-data skip"
    assert rerun_command("--bad-data", "skip", ["study/mutransfer.py", "--bad-data=stop"]) == \
        "python study/mutransfer.py --bad-data skip"


def test_failure_summary_names_each_bad_file_once_with_the_command(tmp_path, monkeypatch):
    from data.quarantine import Entry
    from study.runner import StudyRun, failure_summary
    from study.spec import RunSpec

    monkeypatch.setattr(sys, "argv", ["study/scaling_law.py", "--study-name", "demo-corrupt"])
    cause = "study.loop.BadDataError: window 4: /d/sub-07.h5: cannot decode frames [0:8] (corrupt data?)"
    run = StudyRun(name="s", study_dir=tmp_path, store_dir=tmp_path / "store",
                   specs=[RunSpec(seed=i, manifest="/d/manifest.parquet") for i in range(13)],
                   stop_file=tmp_path / "STOP", failed=1, errors=[{"run_id": "a", "cause": cause, "trial_path": ""}],
                   bad_data_stop=True, not_run=12,
                   bad_files=[Entry("/d/sub-07.h5", "cannot decode frames [0:8] (corrupt data?)", "a", "stop", 0.0)])
    text = "\n".join(failure_summary(run))
    assert text.count("/d/sub-07.h5") == 1, text
    assert "the study stopped launching trials (12 other run(s) stopped or not started)" in text
    assert "fix or remove them from /d/manifest.parquet" in text
    assert "python study/scaling_law.py --study-name demo-corrupt --bad-data skip" in text
    assert "rerunning the same command" not in text  # it would meet the same file


def test_the_report_lists_the_bad_files(tmp_path):
    from analysis.report import bad_subject_files

    assert bad_subject_files(tmp_path) == []
    Quarantine(tmp_path).record("/d/sub-07.h5", "cannot decode", found_by="preflight", policy="skip")
    assert bad_subject_files(tmp_path) == [dict(path="/d/sub-07.h5", what="cannot decode", found_by="preflight",
                                                policy="skip")]


@pytest.mark.slow
@pytest.mark.ray
def test_a_study_stops_at_a_bad_file_then_quarantines_it_with_the_skip_option(tmp_path):
    """The issue's scenario with a file that passes the pre-flight check (NEUROX_VERIFY=off stands in for a large
    cohort's quick check) and fails inside: the default study names it once and stops without a report or a
    traceback on the console; the command it prints (``--bad-data skip``) finishes the study around it, and the
    report lists it (about 90 s on 2 cores)."""
    from study.plans import load_plan
    from study.runner import ensure_cohort

    storage = tmp_path / "studies"
    manifest = Path(ensure_cohort(load_plan("smoke"), storage))
    df = pd.read_parquet(manifest)
    bad = [str((manifest.parent / p).resolve()) for p in df[df.split == "train"].path.iloc[:3]]
    for p in bad:
        flip_chunks(Path(p))
    env = {"OMP_NUM_THREADS": "1", "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "RAY_USAGE_STATS_ENABLED": "0",
           "NEUROX_VERIFY": "off", "HOME": os.environ.get("HOME", str(tmp_path))}
    cmd = [sys.executable, "study/scaling_law.py", "--preset", "smoke", "--storage", str(storage),
           "--study-name", "demo-corrupt"]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=400, env=env)
    out = r.stdout + r.stderr
    assert r.returncode == 1, out[-3000:]
    assert "Traceback" not in out and "Error file:" not in out and "Unhandled error" not in out, out[-3000:]
    failed = [ln for ln in out.splitlines() if "FAILED" in ln]
    assert 1 <= len(failed) <= 2 and all("bad subject file" in ln and "error.txt" in ln for ln in failed), failed
    assert sum("stopping the study" in ln for ln in failed) == 1
    assert "the study stopped launching trials" in r.stderr
    named = [b for b in bad if b in r.stderr]
    assert named and all(r.stderr.count(b) == 1 for b in named), r.stderr
    assert "--bad-data skip" in r.stderr and "no report" in r.stderr
    assert not (storage / "demo-corrupt" / "report").exists()
    met = Quarantine(storage / "demo-corrupt" / "store").entries()
    assert {e.path for e in met} == set(named) and {e.policy for e in met} == {"stop"}

    r = subprocess.run(cmd + ["--bad-data", "skip"], cwd=REPO, capture_output=True, text=True, timeout=400, env=env)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    assert "Traceback" not in out and "FAILED" not in out, out[-3000:]
    assert "subject file(s) quarantined: every run skipped their windows" in r.stderr
    entries = Quarantine(storage / "demo-corrupt" / "store").entries()
    assert set(named) <= {e.path for e in entries} <= set(bad)
    md = (storage / "demo-corrupt" / "report" / "summary.md").read_text()
    assert "Bad subject files" in md and all(e.path in md for e in entries)


class _FakeTrial:
    def __init__(self, tmp_path, name: str, error: str | None, last_result=None):
        from study.spec import RunSpec

        self.trial_id, self.status, self.last_result = name, "RUNNING", last_result or {}
        self.config = {"spec": RunSpec(seed=len(name)).to_dict()}
        self.path = str(tmp_path / name)
        self.error_file = None
        if error is not None:
            Path(self.path).mkdir(parents=True)
            self.error_file = str(Path(self.path) / "error.txt")
            Path(self.error_file).write_text(error)

    def get_error(self):
        return None


WRAPPED = ("Traceback (most recent call last):\n  File \"x.py\", line 1\nstudy.loop.BadDataError: window 4: /d/sub-07.h5: "
           "cannot decode frames [0:8]\n\nThe above exception was the direct cause of the following exception:\n"
           "ray.train.base_trainer.TrainingFailedError: Training failed due to worker errors\n")


def test_the_first_bad_data_failure_stops_the_sweep_and_is_counted_once(tmp_path, capsys):
    """Tune's callbacks, driven by hand: a bad-data failure counts at its first attempt (no retries: each would fail
    the same way), stops the sweep once, and trials stopped with it are neither done nor failed."""
    from study.sweep import Progress, error_cause
    from study.sweep_bad_data import BadDataStop, reset, stopped

    reset("q")
    p, stopper = Progress(total=4, study="q"), BadDataStop("q")
    flaky = _FakeTrial(tmp_path, "flaky", "Traceback ...\nRuntimeError: NCCL timeout\n")
    p.on_trial_recover(0, [], flaky)  # another failure: Tune retries it, nothing counted yet
    assert p.failed == 0 and not stopper.stop_all()
    bad = _FakeTrial(tmp_path, "bad", WRAPPED)
    assert error_cause(bad) == "study.loop.BadDataError: window 4: /d/sub-07.h5: cannot decode frames [0:8]"
    p.on_trial_recover(0, [], bad)
    assert p.failed == 1 and stopper.stop_all() and stopped("q")
    p.on_trial_complete(0, [bad], bad)  # stopped by the stopper while pending its retry
    p.on_trial_error(0, [bad], bad)
    other = _FakeTrial(tmp_path, "other", None, last_result={"status": "running", "is_final": False})
    p.on_trial_complete(0, [other], other)
    done = _FakeTrial(tmp_path, "done", None, last_result={"status": "finished", "is_final": True})
    p.on_trial_complete(0, [done], done)
    assert (p.failed, p.done, p.not_run) == (1, 1, 1)
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "FAILED" in ln]
    assert len(lines) == 1 and "bad subject file; stopping the study" in lines[0]
    assert f"{bad.path}/error.txt" in lines[0] and "Traceback" not in lines[0]
    reset("q")
    assert not stopper.stop_all()
