"""µTransfer and config-search studies: plans and the analysis wiring on planted results."""
from __future__ import annotations

import argparse
import math

import pandas as pd
import pytest

from analysis.store import ResultsStore
from study.config_search import factor_variants, plan_config_search, rank
from study.mutransfer import analyse, plan_mutransfer


def test_mutransfer_plan_covers_widths_lrs_and_parametrizations():
    plan = plan_mutransfer(family="swift_v2", size="debug", widths=[16, 32, 48, 64], lrs=[1e-3, 4e-3, 1.6e-2],
                           base_width=16, steps=5)
    assert len(plan.specs) == 24 and len({s.run_id for s in plan.specs}) == 24
    assert {s.parametrization for s in plan.specs} == {"sp", "mup"}
    assert all(s.mup_base_width == 16 for s in plan.specs)
    with pytest.raises(ValueError, match="at least 4 distinct widths"):
        plan_mutransfer(family="swift_v2", size="debug", widths=[16, 32, 48], lrs=[1e-3, 2e-3, 4e-3],
                        base_width=16, steps=5)


def test_mutransfer_analysis_recovers_planted_lr_drift(tmp_path):
    """SP: LR* halves per width doubling (slope -1); muP: LR* constant (slope 0)."""
    plan = plan_mutransfer(family="swift_v2", size="debug", widths=[16, 32, 64, 128],
                           lrs=[2.0 ** e for e in range(-14, -2)], base_width=16, steps=5)
    rows = []
    for s in plan.specs:
        opt = -8.0 - (math.log2(s.width / 16) if s.parametrization == "sp" else 0.0)
        loss = 1.0 + 0.05 * (math.log2(s.lr) - opt) ** 2
        rows.append({"run_id": s.run_id, "step": 5, "is_final": True, "lr": s.lr, "width": s.width,
                     "parametrization": s.parametrization, "val_loss": loss})
    ResultsStore(tmp_path / "store").append("train", rows)
    out = analyse(tmp_path / "store", tmp_path / "report", plan.specs)
    slopes = {r["parametrization"]: r for r in out["slopes"]}
    slope_key = [k for k in slopes["sp"] if k.startswith("slope")][0]
    assert slopes["sp"][slope_key] == pytest.approx(-1.0, abs=1e-6)
    assert slopes["mup"][slope_key] == pytest.approx(0.0, abs=1e-6)
    assert (tmp_path / "report" / "mutransfer.png").stat().st_size > 1000


def test_config_search_varies_each_of_the_eight_factors():
    labels = factor_variants(24, 8)
    assert {k.split("_")[0] for k in labels} == {"ISM", "MPS", "MR", "MT", "PS", "SBS", "SL", "SWS"}
    plan, specs = plan_config_search(argparse.Namespace(study_name=None, manifest=None), grid=24, seq=8, steps=4)
    assert list(specs)[0] == "default" and len(plan.specs) == len(specs) == 1 + len(labels)
    d = specs["default"]
    for label, s in specs.items():  # every variant differs from the default in one factor only
        if label == "default":
            continue
        diff = [k for k, v in s.to_dict().items() if v != d.to_dict()[k]]
        assert len(diff) == 1, (label, diff)


def test_config_search_ranking_uses_directions():
    df = pd.DataFrame([
        {"checkpoint": c, "task": t, "metric": m, "value": v}
        for c, auroc, mae in [("default", 0.7, 1.0), ("MR_0p9", 0.8, 0.9), ("scratch", 0.6, 1.2)]
        for t, m, v in [("trait_bin", "auroc", auroc), ("trait_cont", "mae", mae)]])
    wide, ranked = rank(df, ["default", "MR_0p9"])
    assert set(wide.index) == {"default", "MR_0p9", "From_scratch"}
    r = ranked["rank__all"]
    assert r["MR_0p9"] == 1 and r["From_scratch"] == 3
