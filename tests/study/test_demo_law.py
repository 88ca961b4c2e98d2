"""The README's main job and the law it shows: ``python study/scaling_law.py`` (embedded Ray, the demo's synthetic
cohort and IsoFLOP design, study/plans.py ``demo``) must end with an approach-3 fit whose exponents are positive with
95% intervals excluding 0, and an extrapolation to the largest budget within 10% (issue #21 item 4).

What it does not reach yet: ``valid`` (analysis/validity.py). The fit's only warnings are standard errors larger than
their estimates (alpha, A, B): the signs are established, the magnitudes are not pinned. Measured cause (issue #21
item 4 report): seed-to-seed differences of 3-4% of the loss in the short runs (width 32, 277 steps: 0.0763 with seed
0, 0.0737 with seed 1; width 16, 433 steps: 0.0759 vs 0.0731), 0.15% in the longer ones (width 32, 553 steps: 0.0694
vs 0.0693; width 48, 541 steps: 0.0691 vs 0.0690) against final losses spread over 0.065-0.090, on 10 IsoFLOP runs (5
of them under 450 steps) over a 13x range of N and 5x of D; the free 5-parameter fit leaves log residuals of 1.5% rms
on its 11 points, a law with alpha = beta = 0.5 2.5%. The SE rule for ``A`` (``A = exp(a)``, ``a`` correlated with
alpha through ``ln N ~ 12``) needs SE(alpha) <~ 0.06: simulated laws exactly of the form on this design were not valid
at 2.5% or 0.5% noise, nor a 4x4 width x steps factorial at 0.5%. When the design or cohort does reach it, the xfail
below turns into a pass and this docstring must say so."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def law_shape_problems(summary: dict) -> list[str]:
    """What is wrong with a demo summary's law beyond unpinned magnitudes: an approach-3 exponent <= 0 or with an
    interval reaching 0, a warning other than 'standard error larger than itself' (exponent sign, asymptote at its
    bound or above the best loss, too few sizes or budgets, failed bootstrap), or an extrapolation off by > 10%."""
    chin = summary["chinchilla"]
    if "params" not in chin:
        return [f"approach 3 not fitted: {chin}"]
    out = []
    for k in ("alpha", "beta"):
        iv = chin["intervals"][k]
        if not (chin["params"][k] > 0 and iv["lo"] > 0):
            out.append(f"{k} = {chin['params'][k]:.3g}, interval [{iv['lo']:.3g}, {iv['hi']:.3g}]")
    out += [w for w in chin.get("warnings", []) if "standard error" not in w]
    ext = summary["extrapolation"]
    if "rel_error" not in ext or not abs(ext["rel_error"]) <= 0.10:
        out.append(f"extrapolation {ext}")
    return out


def test_law_shape_problems_flags_what_is_not_a_law():
    good = {"chinchilla": {"params": {"alpha": 0.76, "beta": 2.99},
                           "intervals": {"alpha": {"lo": 0.04, "hi": 12.3}, "beta": {"lo": 0.085, "hi": 4.97}},
                           "warnings": ["alpha = 0.762 has a standard error 5.51 larger than itself; the data do not "
                                        "pin it down"]},
            "extrapolation": {"rel_error": 0.054}}
    assert law_shape_problems(good) == []
    bad = json.loads(json.dumps(good))
    bad["chinchilla"]["intervals"]["alpha"]["lo"] = -0.01
    bad["chinchilla"]["warnings"].append("E = 0 is at its bound 0")
    bad["extrapolation"]["rel_error"] = -0.12
    probs = law_shape_problems(bad)
    assert len(probs) == 3 and probs[0].startswith("alpha") and probs[1].startswith("E = 0"), probs
    assert law_shape_problems({"chinchilla": {"skipped": "too few"}, "extrapolation": {}})[0].startswith("approach 3")


@pytest.mark.ray
@pytest.mark.long
@pytest.mark.slow
@pytest.mark.timeout(1800)  # 5-6 min on a 2-core box; 11.6 min when other users loaded it to ~20
def test_demo_main_job_fits_a_law_and_extrapolates(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "study/scaling_law.py", "--storage", str(tmp_path), "--study-name", "demo",
                          "--num-cpus", "2"], cwd=REPO, env=env, capture_output=True, text=True, timeout=1700)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    summary = json.loads((tmp_path / "demo" / "report" / "summary.json").read_text())
    assert law_shape_problems(summary) == [], summary["chinchilla"]
    chin = summary["chinchilla"]
    if not chin["valid"]:
        pytest.xfail(f"issue #21 item 4 open: approach 3 not valid ({'; '.join(chin['warnings'])})")
