"""Bad data beyond pre-training (issue #28 item 1, the builder's listed gaps): fine-tuning follows the study's policy
and quarantine list (engine, ``study.finetune``, ``study.config_search``'s fine-tuning phase, ``launch_local``); the
durable LR search stops at a bad-data stop without telling its trials FAIL; non-finite values in a validation window
stop the run naming the file (they made ``val_loss`` NaN without a word)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest

from data.quarantine import Quarantine
from study.devices import local_context
from study.reporters import MemoryReporter
from study.spec import RunSpec
from study.train import BadDataError, train
from tests.study.test_quarantine import flip_chunks

GRID = (24, 24, 24)


def nan_frames(path: Path) -> None:
    """Every BOLD value of a subject file NaN (the file reads and decodes: only the values are bad)."""
    import hdf5plugin  # noqa: F401  (the BOLD dataset's compression filter, for writing)

    with h5py.File(path, "r+") as f:
        b = f["bold"]
        b[...] = np.full(b.shape, np.nan, dtype=b.dtype)


@pytest.fixture(scope="module")
def ft_cohort_src(tmp_path_factory):
    """16 subjects (24^3 x 8 frames), a quarter each in val and test (every split has subjects)."""
    from data.synthetic import generate_cohort

    root = tmp_path_factory.mktemp("ftbad")
    return str(generate_cohort(root, n_subjects=16, grid=GRID, n_frames=8, seed=3, progress=False,
                               fractions=(0.5, 0.25, 0.25)))


def _copy(src: str, dst: Path, split: str, damage, n: int = 1) -> tuple[str, list[str]]:
    """A copy of the cohort with ``n`` files of ``split`` damaged by ``damage``: (manifest, bad paths)."""
    shutil.copytree(Path(src).parent, dst)
    df = pd.read_parquet(dst / "manifest.parquet")
    bad = [str((dst / p).resolve()) for p in df[df.split == split].path.iloc[:n]]
    for p in bad:
        damage(Path(p))
    return str(dst / "manifest.parquet"), bad


def _ft_spec(manifest: str, **kw) -> RunSpec:
    base = dict(task="finetune", family="swift_v2", size="debug", grid=GRID, sequence_length=4, batch_size=4,
                budget=6, eval_every=6, precision="fp32", target="trait_bin", task_type="classification",
                lr=3e-3, log_every=1, strategy="scratch", manifest=manifest)
    base.update(kw)
    return RunSpec(**base)


# ------------------------------------------------------------------------------------------------------------------
# item 3: non-finite values in a validation window
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_a_nonfinite_validation_window_stops_the_run_naming_the_file(mamba_spec, tiny_cohort, tmp_path, policy):
    """It used to evaluate to val_loss NaN (a finished run with a NaN point in the fits); now it is bad data, under
    either policy, named, and listed with policy stop and the validation note."""
    manifest, (bad,) = _copy(tiny_cohort, tmp_path / "cohort", "val", nan_frames)
    q = Quarantine(tmp_path / "store")
    spec = mamba_spec.replace(manifest=manifest, bad_data=policy, eval_windows=64, budget=3, eval_every=3)
    with pytest.raises(BadDataError, match="non-finite values") as err:
        train(spec, local_context("cpu"), MemoryReporter(), quarantine=q)
    assert err.value.path == bad and bad in str(err.value)
    (e,) = q.entries()
    assert e.path == bad and e.policy == "stop" and e.what == "(validation split) non-finite values"


# ------------------------------------------------------------------------------------------------------------------
# item 1: the fine-tuning engine
# ------------------------------------------------------------------------------------------------------------------
def test_finetune_skip_run_quarantines_a_bad_train_file_and_the_next_run_never_reads_it(ft_cohort_src, tmp_path):
    manifest, bad = _copy(ft_cohort_src, tmp_path / "cohort", "train", flip_chunks, n=2)
    q = Quarantine(tmp_path / "store")
    first = MemoryReporter()
    res = train(_ft_spec(manifest, bad_data="skip"), local_context("cpu"), first, quarantine=q)
    assert res.status == "finished"
    met = [r["bad_data_skipped"] for r in first.logs if "bad_data_skipped" in r]
    assert met and all(any(b in m for b in bad) for m in met)
    entries = q.entries()
    assert entries and {e.path for e in entries} <= set(bad) and {e.policy for e in entries} == {"skip"}
    second = MemoryReporter()
    assert train(_ft_spec(manifest, bad_data="skip", seed=1), local_context("cpu"), second,
                 quarantine=q).status == "finished"
    assert not [r for r in second.logs if "bad_data_skipped" in r]
    assert [r["bad_data_quarantined"] for r in second.logs if "bad_data_quarantined" in r] == [len(entries)]


def test_finetune_stop_run_names_and_records_the_file(ft_cohort_src, tmp_path):
    manifest, bad = _copy(ft_cohort_src, tmp_path / "cohort", "train", flip_chunks, n=2)
    q = Quarantine(tmp_path / "store")
    with pytest.raises(BadDataError) as err:
        train(_ft_spec(manifest), local_context("cpu"), MemoryReporter(), quarantine=q)
    (e,) = q.entries()
    assert e.path in bad and e.path in str(err.value) and e.policy == "stop"


@pytest.mark.parametrize("split", ["val", "test"])
def test_finetune_bad_evaluation_file_stops_under_skip(ft_cohort_src, tmp_path, split):
    """Val and test windows are never skipped (every run is scored on the same subjects)."""
    manifest, (bad,) = _copy(ft_cohort_src, tmp_path / "cohort", split, nan_frames)
    q = Quarantine(tmp_path / "store")
    with pytest.raises(BadDataError, match="non-finite") as err:
        train(_ft_spec(manifest, bad_data="skip", budget=2, eval_every=2), local_context("cpu"), MemoryReporter(),
              quarantine=q)
    assert err.value.path == bad
    (e,) = q.entries()
    assert e.path == bad and e.policy == "stop" and e.what.startswith("(validation split) ")


# ------------------------------------------------------------------------------------------------------------------
# item 1: study.finetune's CLI
# ------------------------------------------------------------------------------------------------------------------
def test_finetune_cli_stops_with_one_message_then_skips_with_the_command_it_names(ft_cohort_src, tmp_path, capsys,
                                                                                  monkeypatch):
    """A corrupt train file that passes the pre-flight check (NEUROX_VERIFY=off): the first run meets it, no further
    run starts, the file is named once with the rerun command (``--bad-data skip``), no table and no traceback; the
    command it names finishes the grid around the file."""
    import study.finetune as FT
    from analysis.store import read_table

    monkeypatch.setenv("NEUROX_VERIFY", "off")
    manifest, bad = _copy(ft_cohort_src, tmp_path / "cohort", "train", flip_chunks, n=2)
    argv = ["--storage", str(tmp_path / "studies"), "--study-name", "ft", "--manifest", manifest,
            "--tasks", "trait_bin:classification", "--strategies", "scratch", "--repeats", "2", "--steps", "4",
            "--no-progress", "--device", "cpu",
            "--spec-json", json.dumps({"batch_size": 4, "eval_every": 4, "precision": "fp32", "sequence_length": 4})]
    monkeypatch.setattr("sys.argv", ["study/finetune.py", *argv])
    assert FT.main(argv) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    named = [b for b in bad if b in err]
    assert len(named) == 1 and err.count(named[0]) == 1, err
    assert "fine-tuning stopped on bad data" in err and "(1 other fine-tuning run(s) not started)" in err
    assert "--bad-data skip" in err and "no table" in err
    study = tmp_path / "studies" / "ft"
    assert not (study / "finetune_table.md").exists()
    assert {e.policy for e in Quarantine(study / "store").entries()} == {"stop"}

    assert FT.main([*argv, "--bad-data", "skip"]) == 0
    assert len(read_table(study / "store", "finetune")) == 2
    assert set(bad) >= {e.path for e in Quarantine(study / "store").entries()}


# ------------------------------------------------------------------------------------------------------------------
# item 1: config_search
# ------------------------------------------------------------------------------------------------------------------
def test_config_search_bad_data_stop_prints_no_rerun_to_continue(monkeypatch, capsys, tmp_path):
    """The runner's last words already named the file and the command; config_search adds no 'rerun to continue'."""
    import study.config_search as CS
    import study.runner as runner

    def fake_run_plan(plan, args, **kw):
        spec = plan.specs[0]
        return runner.StudyRun(name="cs", study_dir=tmp_path, store_dir=tmp_path / "store", specs=plan.specs,
                               stop_file=tmp_path / "STOP", failed=1, bad_data_stop=True,
                               errors=[{"run_id": spec.run_id, "cause": "BadDataError: x", "trial_path": ""}])

    monkeypatch.setattr(runner, "run_plan", fake_run_plan)
    monkeypatch.setattr(runner, "check_plan", lambda *a, **k: "m")
    monkeypatch.setattr(runner, "finished_runs", lambda store_dir: set())
    assert CS.main(["--quick", "--storage", str(tmp_path)]) == 1
    assert "rerun to continue" not in capsys.readouterr().err


def test_config_search_finetuning_phase_uses_the_study_store_and_policy(monkeypatch, capsys, tmp_path):
    """The fine-tuning phase's runs get --bad-data and the pre-training store's quarantine list; a bad-data stop
    there is the one message with the rerun command, not a traceback."""
    import study.config_search as CS
    import study.finetune as FT
    import study.runner as runner

    store = tmp_path / "cs" / "store"
    bad = str(tmp_path / "sub-07.h5")
    seen = {}

    def fake_run_plan(plan, args, **kw):
        return runner.StudyRun(name="cs", study_dir=tmp_path / "cs", store_dir=store,
                               specs=[s.replace(manifest="m.parquet") for s in plan.specs],
                               stop_file=tmp_path / "STOP")

    def fake_run_grid(cells, *, study_dir, ctx=None, quarantine_dir=None, **kw):
        seen["policies"] = {c[0].bad_data for c in cells}
        seen["quarantine_dir"] = quarantine_dir
        Quarantine(quarantine_dir).record(bad, "cannot decode", found_by=cells[0][0].run_id, policy="stop")
        raise FT.BadDataStopped(cells[0][0].run_id, f"BadDataError: window 3: {bad}: cannot decode",
                                not_run=len(cells) - 1)

    monkeypatch.setattr(runner, "run_plan", fake_run_plan)
    monkeypatch.setattr(runner, "check_plan", lambda *a, **k: "m")
    monkeypatch.setattr(runner.StudyRun, "remaining", property(lambda self: []))  # pre-training finished
    monkeypatch.setattr(CS, "export_all", lambda run, labels, out: {k: "w.safetensors" for k in labels})
    monkeypatch.setattr(FT, "run_grid", fake_run_grid)
    monkeypatch.setattr("sys.argv", ["study/config_search.py", "--quick", "--storage", str(tmp_path)])
    assert CS.main(["--quick", "--storage", str(tmp_path), "--bad-data", "stop"]) == 1
    err = capsys.readouterr().err
    assert seen == {"policies": {"stop"}, "quarantine_dir": store}, err
    assert err.count(bad) == 1 and "--bad-data skip" in err and "rerun to continue" not in err
    assert "Traceback" not in err and not (tmp_path / "cs" / "report").exists()


# ------------------------------------------------------------------------------------------------------------------
# item 2: the durable LR search at a bad-data stop
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.ray
def test_lr_search_stops_at_a_bad_data_stop_and_tells_no_trial_fail(monkeypatch, tmp_path, mamba_spec):
    """Two run groups, 2 trials a generation: the first generation's Tuner meets a bad file; no further Tuner starts
    (neither the group's next generation nor the second group), and the journal keeps the trials asked
    (RUNNING), not FAIL: a rerun with the file fixed or quarantined runs them with the same LRs."""
    import study.sweep as SW
    from study.plans import LRSearch
    from study.run_env import RunEnv
    from study.search_state import LRSearchState, journal_path

    study = "lrbad"
    specs = [mamba_spec.replace(study=study), mamba_spec.replace(study=study, seed=5)]
    assert len(SW.lr_groups(specs)) == 2
    progress = SW.Progress(total=8, study=study)
    fits = []

    class FakeTuner:
        def fit(self):
            fits.append(1)
            progress.errors.append({"run_id": "r", "cause": "BadDataError: window 3: /d/sub-07.h5: cannot decode",
                                    "trial_path": ""})
            SW.request_stop(study, "BadDataError: ...")

    monkeypatch.setattr(SW, "_tuner", lambda *a, **k: FakeTuner())
    SW.reset_bad_data_stop(study)
    env = RunEnv(store_dir=str(tmp_path / "store"))
    lr = LRSearch(n_trials=4)
    try:
        SW.run_lr_search(specs, env=env, setup=SW.TrialSetup(), storage=str(tmp_path / "tune"), study=study,
                         concurrency=2, lr_search=lr, asha=False, stage_ahead=0, progress=progress)
    finally:
        SW.reset_bad_data_stop(study)
    assert fits == [1]
    key = next(iter(SW.lr_groups(specs)))
    state = LRSearchState(journal_path(env.store_dir), key, seed=specs[0].seed, low=lr.low, high=lr.high,
                          n_trials=lr.n_trials, batch=2)
    trials = state.trials()
    assert len(trials) == 2 and {t.state for t in trials} == {"RUNNING"}


# ------------------------------------------------------------------------------------------------------------------
# item 1: launch_local
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.slow  # two 12-step runs: ~60 s on the shared 2-core box under load
def test_launch_local_names_the_bad_file_in_one_line_and_skips_it_with_the_store_list(mamba_spec, tiny_cohort,
                                                                                     tmp_path, capsys):
    from study.launch_local import main

    manifest, bad = _copy(tiny_cohort, tmp_path / "cohort", "train", flip_chunks, n=3)
    spec = tmp_path / "spec.json"
    spec.write_text(mamba_spec.replace(manifest=manifest, budget=12).to_json())
    store = tmp_path / "store"
    argv = ["--spec", str(spec), "--run-dir", str(tmp_path / "run"), "--store", str(store), "--quiet",
            "--device", "cpu"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "stopped on bad data" in err and "--bad-data skip" in err
    (e,) = Quarantine(store).entries()
    assert e.path in bad and e.path in err and e.policy == "stop"
    assert main([*argv[:3], str(tmp_path / "run2"), *argv[4:], "--bad-data", "skip"]) == 0
    assert '"status": "finished"' in capsys.readouterr().out
