"""The data-diversity comparison (issue #27 item 5): the study report's law per data mixture, side by side.

Hand-made train tables with two mixtures: one follows ``L(C) = E + A C^-alpha`` (0.2% noise), the other has no trend
in C (5% noise). The clean one must come out valid with alpha's interval around the planted value and a held-out
error of a fraction of a percent, equal to what the study report says of that mixture alone; the other must come out
not valid, with the warnings that say why."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from analysis.cli import main
from analysis.diversity import ALL, compare_mixtures, mixture_label, report, split_mixtures
from analysis.report import summarize_study
from analysis.store import ResultsStore

E, A, ALPHA = 0.05, 40.0, 0.15
BUDGETS = np.geomspace(1e10, 1e13, 8)
ONE = json.dumps([["cohort_a", 1.0]])


def clean(C):
    return E + A * C ** -ALPHA


def rows(mixture: str, losses, tag: str) -> list[dict]:
    """One run per budget, two evaluations each (the last final); ``losses`` are the final losses."""
    out = []
    for C, L in zip(BUDGETS, losses):
        rid = f"{tag}-C{C:.2e}"
        out += [dict(run_id=rid, step=50, flops=C / 2, val_loss=L * 1.3, is_final=False, mixture=mixture),
                dict(run_id=rid, step=100, flops=C, val_loss=L, is_final=True, mixture=mixture)]
    return out


def table() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    good = clean(BUDGETS) * np.exp(rng.normal(0, 0.002, len(BUDGETS)))
    flat = 2.0 * np.exp(rng.normal(0, 0.05, len(BUDGETS)))  # above the clean law: the frontier of both is the clean
    return pd.DataFrame(rows("[]", good, "all") + rows(ONE, flat, "a"))


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    return compare_mixtures(table(), tmp_path_factory.mktemp("div"), n_boot=60, source="hand-made")


def test_labels_and_split():
    assert mixture_label("[]") == ALL and mixture_label(None) == ALL and mixture_label(()) == ALL
    assert mixture_label(ONE) == "cohort_a"
    assert mixture_label('[["cohort_a", 0.5], ["cohort_b", 0.5]]') == "cohort_a+cohort_b"
    assert mixture_label({"cohort_a": 0.7, "cohort_b": 0.3}) == "cohort_a:0.7+cohort_b:0.3"
    parts = split_mixtures(table())
    assert list(parts) == ["cohort_a", ALL]  # single cohorts first, the natural mixture last
    assert all(len(p) == 16 for p in parts.values())


def test_clean_mixture_is_a_valid_law_with_the_planted_exponent(result):
    by = {m["mixture"]: m for m in result["mixtures"]}
    g = by[ALL]
    assert g["valid"] is True and g["warnings"] == [], g["warnings"]
    a = g["exponents"]["alpha_C"]
    assert a["lo"] < ALPHA < a["hi"] and a["lo"] > 0 and abs(a["estimate"] - ALPHA) < 0.03, a
    assert "alpha_N" not in g["exponents"]  # no parameter counts: approach 3 is skipped, not invented
    ex = g["extrapolation"]
    assert ex["valid"] is True and abs(ex["rel_error"]) < 0.01, ex
    assert ex["actual"] == pytest.approx(table().query("mixture == '[]' and is_final")["val_loss"].iloc[-1])
    assert ex["compute"] == pytest.approx(BUDGETS[-1])


def test_flat_noisy_mixture_is_not_valid_and_says_why(result):
    b = {m["mixture"]: m for m in result["mixtures"]}["cohort_a"]
    assert b["valid"] is False and b["warnings"]
    a = b["exponents"].get("alpha_C")
    assert a is None or not a["valid"] or a["lo"] <= 0 <= a["hi"], a
    assert any("power_law" in w for w in b["warnings"]), b["warnings"]
    c = next(c for c in result["comparison"] if c["exponent"] == "alpha_C")
    assert c["comparable"] is False and c["not_valid"] == ["cohort_a"]


def test_numbers_are_the_study_reports_of_each_mixture_alone(result, tmp_path):
    """Same rows, the report on a store holding only that mixture: the same extrapolation and exponent."""
    df = table()
    ResultsStore(tmp_path / "store").append("train", df[df["mixture"] == "[]"])
    s = summarize_study(tmp_path / "store", tmp_path / "rep", n_boot=60)
    g = {m["mixture"]: m for m in result["mixtures"]}[ALL]
    assert g["extrapolation"]["rel_error"] == pytest.approx(s["extrapolation"]["rel_error"], rel=1e-12)
    assert g["exponents"]["alpha_C"]["lo"] == pytest.approx(s["power_law"]["intervals"]["alpha"]["lo"], rel=1e-12)
    assert g["valid"] == (not s["warnings"])


def test_two_valid_laws_with_different_exponents_are_told_apart(tmp_path):
    """Both mixtures clean, alpha 0.15 and 0.45: both valid, the alpha_C intervals disjoint and said to differ."""
    rng = np.random.default_rng(1)
    steep = (E + 400.0 * BUDGETS ** -0.45) * np.exp(rng.normal(0, 0.002, len(BUDGETS)))
    good = clean(BUDGETS) * np.exp(rng.normal(0, 0.002, len(BUDGETS)))
    res = compare_mixtures(pd.DataFrame(rows("[]", good, "all") + rows(ONE, steep, "a")), n_boot=60)
    by = {m["mixture"]: m for m in res["mixtures"]}
    assert by["cohort_a"]["valid"] and by[ALL]["valid"], [m["warnings"] for m in res["mixtures"]]
    assert by["cohort_a"]["exponents"]["alpha_C"]["lo"] > by[ALL]["exponents"]["alpha_C"]["hi"]
    c = res["comparison"][0]
    assert c["exponent"] == "alpha_C" and c["comparable"] and not c["overlap"]
    from analysis.diversity import markdown

    assert "cohort_a, all are disjoint: the exponents differ" in markdown(res)


def test_one_mixture_is_refused():
    df = table()
    with pytest.raises(ValueError, match="needs two or more"):
        compare_mixtures(df[df["mixture"] == "[]"], n_boot=10)


def test_report_writes_table_json_plot_and_each_mixtures_report(tmp_path):
    ResultsStore(tmp_path / "s" / "store").append("train", table())
    res = report(tmp_path / "s" / "store", tmp_path / "out", n_boot=30)
    md = (tmp_path / "out" / "diversity.md").read_text()
    assert "| cohort_a" in md and "| all" in md and "NOT VALID" in md and "held-out rel. error" in md
    assert "alpha_C: the 95% intervals of cohort_a, all are not compared: the fit of cohort_a is not a valid law" in md
    saved = json.loads((tmp_path / "out" / "diversity.json").read_text())
    assert [m["mixture"] for m in saved["mixtures"]] == ["cohort_a", "all"]
    assert (tmp_path / "out" / "diversity.png").stat().st_size > 10_000
    assert (tmp_path / "out" / "all" / "summary.md").is_file()
    assert (tmp_path / "out" / "cohort_a" / "loss_vs_flops.png").is_file()
    assert "[mixture all]" in (tmp_path / "out" / "all" / "summary.md").read_text()  # not the temporary store's path
    assert res["files"]["plot"].endswith("diversity.png")


def test_cli(tmp_path, capsys):
    store = tmp_path / "study" / "store"
    ResultsStore(store).append("train", table())
    assert main(["diversity", str(store), "--bootstrap", "20"]) == 0
    out = capsys.readouterr().out
    assert "# Data diversity" in out and (tmp_path / "study" / "report" / "diversity" / "diversity.png").is_file()
    assert main(["diversity", str(store), "--bootstrap", "20", "--json", "--out", str(tmp_path / "o")]) == 0
    data = json.loads(capsys.readouterr().out)
    assert {m["mixture"]: m["valid"] for m in data["mixtures"]} == {"cohort_a": False, "all": True}
    assert main(["diversity", str(store), "--bootstrap", "20", "--strict", "--out", str(tmp_path / "o")]) == 3
    single = tmp_path / "single" / "store"
    ResultsStore(single).append("train", table().query("mixture == '[]'"))
    assert main(["diversity", str(single), "--bootstrap", "20"]) == 2
    assert "needs two or more" in capsys.readouterr().err
