"""After failed trials the console's last words group the failures by cause and say what to do."""
from __future__ import annotations

from pathlib import Path

from study.runner import StudyRun, failure_summary
from study.spec import RunSpec


def test_failures_are_grouped_by_cause_with_advice(tmp_path):
    specs = [RunSpec(seed=i) for i in range(4)]
    run = StudyRun(name="s", study_dir=tmp_path, store_dir=tmp_path / "store", specs=specs,
                   stop_file=tmp_path / "STOP", failed=3, errors=[
                       {"run_id": "a", "cause": "study.loop.BadDataError: /d/sub-07.h5: truncated file",
                        "trial_path": ""},
                       {"run_id": "b", "cause": "study.loop.BadDataError: /d/sub-07.h5: truncated file",
                        "trial_path": ""},
                       {"run_id": "c", "cause": "TrainingDiverged: non-finite loss nan at step 2", "trial_path": ""}])
    lines = failure_summary(run)
    assert lines[0] == "error: 3 trial(s) failed (3 of 4 runs):"
    assert "  study.loop.BadDataError: /d/sub-07.h5: truncated file  [2 run(s): a, b]" in lines
    assert any("fix it or remove it from the manifest" in x for x in lines)
    assert any("a run diverged" in x for x in lines)
    assert any(str(Path(tmp_path) / "tune") in x for x in lines)
