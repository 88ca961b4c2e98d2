"""``python -m study.launch_local``: one line for a spec without a manifest, progress lines while it trains."""
from __future__ import annotations

import io

from study.launch_local import main
from study.reporters import ProgressPrinter
from study.spec import RunSpec


def test_a_spec_without_a_manifest_is_one_line_exit_2(tmp_path, capsys):
    spec = tmp_path / "spec.json"
    spec.write_text(RunSpec(size="debug").to_json())
    assert main(["--spec", str(spec), "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has no 'manifest'" in err[0] and "examples/debug_run.json" in err[0]


def test_progress_lines_are_rate_limited_and_every_evaluation_is_shown():
    out = io.StringIO()
    p = ProgressPrinter("r1", every_s=3600, stream=out)
    p.log({"step": 1, "train_loss": 0.5, "samples_per_s": 12.0})
    p.log({"step": 2, "train_loss": 0.4})  # within the interval: not printed
    p.report({"step": 2, "train_loss": 0.4, "val_loss": 0.45})
    lines = out.getvalue().splitlines()
    assert lines == ["[r1] train step 1  train_loss 0.5  samples_per_s 12.0",
                     "[r1] eval step 2  train_loss 0.4  val_loss 0.45"]


def test_training_by_hand_prints_progress_on_stderr(tiny_cohort, tmp_path, capsys):
    spec = tmp_path / "spec.json"
    spec.write_text(RunSpec(family="neuromamba", size="debug", grid=(24, 24, 24), sequence_length=8, batch_size=4,
                            budget=4, eval_every=2, eval_windows=2, manifest=tiny_cohort,
                            precision="fp32").to_json())
    assert main(["--spec", str(spec), "--run-dir", str(tmp_path / "run"), "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert captured.err.count("] eval step") == 2 and "] train step 1" in captured.err
    assert '"status": "finished"' in captured.out
