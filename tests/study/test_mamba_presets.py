"""NeuroMamba ladders as studies (issue #24 item 3): the ``mamba-ladder`` preset on a site's GPUs and real data, the
``mamba-demo`` preset on 2 CPUs, both with background removal on, and their dry runs."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from study.plans import (DEMO_COHORT, MAMBA_DEMO_BUDGETS, MAMBA_DEMO_STEPS, MAMBA_DEMO_WIDTHS, MAMBA_LADDER_BUDGETS,
                         MAMBA_LADDER_SIZES, MAMBA_LADDER_STEPS, MAMBA_LADDER_SUBJECTS, load_plan, run_summary)
from study.run_math import model_config
from study.scaling_law import main

REPO = Path(__file__).resolve().parents[2]


def _mamba_ladder(tmp_path, **kw):
    return load_plan("mamba-ladder", SimpleNamespace(manifest=str(tmp_path / "m.parquet"), storage=str(tmp_path),
                                                     site=kw.pop("site", "polaris"), **kw))


def test_mamba_ladder_trains_the_neuromamba_sizes_over_compute_and_data_with_background_removal(tmp_path):
    plan = _mamba_ladder(tmp_path)
    assert {s.family for s in plan.specs} == {"neuromamba"}
    assert {s.size for s in plan.specs} == set(MAMBA_LADDER_SIZES) == {"1.4M", "3.1M", "12M", "41M", "91M"}
    assert {s.budget for s in plan.specs} == set(MAMBA_LADDER_BUDGETS)
    assert {s.n_subjects for s in plan.specs} == set(MAMBA_LADDER_SUBJECTS)
    assert all(model_config(s).remove_background for s in plan.specs)  # the config default, never turned off
    assert plan.use_gpu and plan.num_workers == 4 and plan.device_kind == "a100-40gb"
    # every (size, budget) in the step band; 41M and 91M cannot spend 1e17 in 1000+ steps of 32 samples
    points = {(s.size, s.budget) for s in plan.specs}
    assert ("41M", 1e17) not in points and ("91M", 1e17) not in points and len(points) == 13
    assert len(plan.specs) == 13 * 3
    assert all(MAMBA_LADDER_STEPS[0] <= run_summary(s)["steps"] <= MAMBA_LADDER_STEPS[1] for s in plan.specs)
    assert "41M@1e+17" in plan.description and "NeuroMamba ladder" in plan.description
    # small models replicate their optimizer state; every run fits the A100 with the planner's margin
    assert {s.zero_stage for s in plan.specs} == {0}
    assert all(p.fits for p in plan.run_plans.values())
    # muP at the smallest size's width, the LR said to be a default from another family and not transferred
    assert {(s.parametrization, s.mup_base_width) for s in plan.specs} == {("mup", 128)}
    assert "NOT transferred" in plan.extra["lr_source"] and "never tuned for neuromamba" in plan.extra["lr_source"]


def test_swift_ladders_keep_their_plan_after_the_family_argument(tmp_path):
    plan = load_plan("ladder", SimpleNamespace(manifest=str(tmp_path / "m.parquet"), site="polaris"))
    assert {s.family for s in plan.specs} == {"swift_v2"} and len(plan.specs) == 27
    assert "never tuned" not in plan.extra["lr_source"] and plan.description.startswith("SwiFT v2 ladder")
    assert {s.size: s.zero_stage for s in plan.specs} == {"51M": 0, "202M": 0, "806M": 1}


def test_mamba_ladder_refuses_one_mutransfer_study_for_sizes_of_another_depth(tmp_path):
    from study.lr_transfer import TRANSFER_FILE, TransferredLR

    TransferredLR(family="neuromamba", size="1.4M", base_width=128, base_lr=2.0 ** -10, lr_lo=2.0 ** -10.4,
                  lr_hi=2.0 ** -9.6, widths=(64, 128, 256, 512), slope=0.05, slope_lo=-0.2, slope_hi=0.3,
                  sp_slope=-0.9, study="mutm").write(tmp_path / "mutm" / "report" / TRANSFER_FILE)
    with pytest.raises(ValueError, match=r"size '41M' differs .* \['depth'\]"):
        _mamba_ladder(tmp_path, lr_from="mutm")


def test_mamba_ladder_dry_run_names_the_family_and_background_removal(tmp_path, capsys):
    (tmp_path / "m.parquet").write_bytes(b"")
    assert main(["--preset", "mamba-ladder", "--site", "polaris", "--manifest", str(tmp_path / "m.parquet"),
                 "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "study plan 'mamba-ladder': 39 runs" in out and "planned for site polaris: 4 x a100-40gb per run" in out
    assert sum(line.startswith("neuromamba-") for line in out.splitlines()) == 39
    assert "background removal: on (remove_background=True) in 39 runs" in out
    assert "GPU-hours on a100-40gb" in out and " NO " not in out
    assert main(["--preset", "mamba-ladder", "--site", "polaris", "--manifest", str(tmp_path / "m.parquet"),
                 "--dry-run", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert {r["family"] for r in rows[:-1]} == {"neuromamba"} and all(r["remove_background"] for r in rows[:-1])
    assert main(["--preset", "mamba-ladder", "--site", "polaris"]) == 2  # real data only
    assert "--manifest" in capsys.readouterr().err


def test_mamba_demo_is_a_small_cpu_isoflop_grid_on_the_demo_cohort(capsys):
    plan = load_plan("mamba-demo")
    assert not plan.use_gpu and plan.cohort == DEMO_COHORT and plan.num_workers == 1
    assert {(s.family, s.size) for s in plan.specs} == {("neuromamba", "debug")}
    assert {s.width for s in plan.specs} <= set(MAMBA_DEMO_WIDTHS) and len({s.width for s in plan.specs}) == 4
    assert {s.budget for s in plan.specs} == set(MAMBA_DEMO_BUDGETS) and len(plan.specs) == 8
    assert all(model_config(s).remove_background for s in plan.specs)
    steps = [run_summary(s)["steps"] for s in plan.specs]
    assert all(MAMBA_DEMO_STEPS[0] <= n <= MAMBA_DEMO_STEPS[1] for n in steps)
    assert sum(steps) < 2000  # what keeps it within minutes on 2 CPUs
    assert {(s.width, s.lr) for s in plan.specs} == {(16, 0.02), (32, 0.01), (48, 0.01 * 32 / 48), (64, 0.005)}
    assert main(["--preset", "mamba-demo", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "study plan 'mamba-demo': 8 runs, 1 worker(s)/run, CPU" in out
    assert "neuromamba-debug-w16-sp-F2.4e10" in out and "background removal: on (remove_background=True) in 8 runs" in out


def test_a_swift_dry_run_says_nothing_about_background_removal(capsys):
    assert main(["--preset", "smoke", "--dry-run"]) == 0
    assert "background removal" not in capsys.readouterr().out


def test_a_checkpointed_neuromamba_run_recomputes_its_blocks_with_the_same_gradients():
    """What the planner turns on when a NeuroMamba run does not fit: ``activation_checkpointing`` -> the config's
    ``checkpoint_blocks``, numerically the same step."""
    import torch

    from neuro_models import registry as R
    from study.spec import RunSpec

    spec = RunSpec(family="neuromamba", size="debug", grid=(24, 24, 24), sequence_length=8, batch_size=2)
    grads = []
    for ckpt in (False, True):
        cfg = model_config(spec.replace(activation_checkpointing=ckpt))
        assert cfg.checkpoint_blocks is ckpt
        torch.manual_seed(0)
        model = R.build_pretrain_model(cfg).train()
        torch.manual_seed(1)
        x, bm = torch.randn(2, 1, 24, 24, 24, 8), torch.zeros(2, 24, 24, 24)
        bm[:, 3:21, 3:21, 3:21] = 1
        model(x, brain_mask=bm)["loss"].backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert grads[0].abs().max() > 0 and torch.allclose(grads[0], grads[1], atol=1e-7)


@pytest.mark.ray
@pytest.mark.long
@pytest.mark.slow
@pytest.mark.timeout(1800)  # 5 min on a free 2-core box; longer when other users load it
def test_mamba_demo_runs_end_to_end_and_reports_figure_3(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "study/scaling_law.py", "--preset", "mamba-demo", "--storage", str(tmp_path),
                          "--num-cpus", "2"], cwd=REPO, env=env, capture_output=True, text=True, timeout=1700)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    report = tmp_path / "mamba-demo" / "report"
    summary = json.loads((report / "summary.json").read_text())
    assert summary["n_final_points"] == 8 and summary["n_dropped"] == 0
    for fn in ("loss_vs_compute_by_size.png", "loss_vs_params_by_size.png"):
        assert fn in summary["plots"] and (report / fn).stat().st_size > 1000
    assert summary["size_plots"]["sizes"] == 4
    # losses fall with compute: the best run at the largest budget beats the best at the smallest
    from analysis.report import final_rows
    from analysis.store import read_table

    fin = final_rows(read_table(tmp_path / "mamba-demo" / "store", "train").dropna(subset=["val_loss"]))
    best = fin.groupby("spec.budget")["val_loss"].min()
    assert best.loc[max(MAMBA_DEMO_BUDGETS)] < best.loc[min(MAMBA_DEMO_BUDGETS)]
