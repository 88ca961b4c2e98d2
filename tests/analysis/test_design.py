"""analysis.design: the adaptive ladder's acquisition, target interval, determinism and input checks.

Fits start from the planted law (``warm=``) to keep the file fast; the optimum is still the data's
(a warm-started fit of the same Huber objective), and the bootstrap is the library's.
"""
from __future__ import annotations

import numpy as np
import pytest

from analysis.design import (Target, acquire, candidates, design_round, predict_target, stop_reason,
                             fit_law)
from analysis.bootstrap import bootstrap_fit
from analysis.fits import compute_optimal

LAW = dict(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)  # Hoffmann et al. 2022
THETA = np.array([np.log(LAW["A"]), np.log(LAW["B"]), LAW["alpha"], LAW["beta"], np.log(LAW["E"])])
TARGET = Target(kind="loss", compute=1e21)


def law(N, D):
    return LAW["E"] + LAW["A"] / N ** LAW["alpha"] + LAW["B"] / D ** LAW["beta"]


def test_target_optimum_matches_compute_optimal():
    N = np.repeat(np.geomspace(1e7, 1e9, 4), 3)
    D = np.tile(np.geomspace(1e9, 1e11, 3), 4)
    fit = fit_law(dict(N=N, D=D, L=law(N, D)), warm=THETA)
    ref = compute_optimal(fit, 1e21).iloc[0]
    N_opt, D_opt, L_opt = TARGET.optimum(fit.theta)
    assert N_opt == pytest.approx(ref.N_opt, rel=1e-9)
    assert D_opt == pytest.approx(ref.D_opt, rel=1e-9)
    assert L_opt == pytest.approx(ref.L_opt, rel=1e-9)
    assert Target.parse("optimum@1e21").value(THETA) == pytest.approx(np.log(TARGET.optimum(THETA)[0]))


def test_acquisition_picks_runs_that_vary_D_when_D_is_poorly_constrained():
    # 5 sizes, but every run at D in [1e10, 1.3e10]: beta and B are barely determined
    rng = np.random.default_rng(1)
    N = np.repeat(np.geomspace(1e7, 1e9, 5), 2)
    D = np.tile([1e10, 1.3e10], 5)
    L = law(N, D) * np.exp(rng.normal(0, 0.005, len(N)))
    # equal cost: only informativeness decides. First four vary D (one N), last four vary N (D in the band)
    cands = candidates([1e8] * 4 + [1e7, 3e7, 3e8, 1e9], [1e9, 3e9, 4e10, 1e11] + [1.15e10] * 4, cost=np.ones(8))
    r = design_round(dict(N=N, D=D, L=L), cands, TARGET, warm=THETA, n_boot=100, batch_size=2, seed=0)
    assert set(r.chosen) <= {0, 1, 2, 3}, r.scores
    # every D-varying candidate outscores every N-varying one by a wide margin
    assert r.scores.score[:4].min() > 5 * r.scores.score[4:].max()
    assert [int(r.scores.pick[i]) for i in r.chosen] == [1, 2] and int((r.scores.pick > 0).sum()) == 2


def test_acquisition_weighs_cost_and_does_not_repeat_itself():
    rng = np.random.default_rng(2)
    N = np.repeat(np.geomspace(1e7, 1e9, 4), 3)
    D = np.tile(np.geomspace(1e9, 1e11, 3), 4)
    fit = bootstrap_fit(fit_law(dict(N=N, D=D, L=law(N, D) * np.exp(rng.normal(0, 0.01, len(N)))), warm=THETA),
                        100, seed=0, polish=False)
    cands = candidates([3e8, 3e8], [3e10, 3e10], cost=[1.0, 10.0])  # the same run at 1x and 10x the cost
    chosen, scores = acquire(fit, cands, TARGET, batch_size=1)
    assert chosen == [0] and scores.score[0] == pytest.approx(10 * scores.score[1])
    chosen, _ = acquire(fit, cands, TARGET, batch_size=3, budget=5.0)
    assert chosen == [0]  # the other does not fit in the budget; no repeats
    chosen, _ = acquire(fit, cands, TARGET, batch_size=2, exclude=[0])
    assert chosen == [1]


def test_interval_covers_the_planted_target_on_most_fixed_seeds():
    """A 20-run grid with 1% noise, 100x extrapolation: the 90% interval holds for most of 6 fixed seeds
    (a 90% interval missing 3 or more of 6 has probability ~1.6%) and is not uselessly wide."""
    N = np.repeat(np.geomspace(2e7, 5e8, 5), 4)
    D = np.tile(np.geomspace(2e9, 5e10, 4), 5)
    truth = float(TARGET.value(THETA))
    hits, widths = 0, []
    for seed in range(6):
        rng = np.random.default_rng(100 + seed)
        L = law(N, D) * np.exp(rng.normal(0, 0.01, len(N)))
        p = predict_target(bootstrap_fit(fit_law(dict(N=N, D=D, L=L), warm=THETA), 100, seed=seed, polish=False),
                           TARGET, 0.9)
        hits += p["lo"] <= truth <= p["hi"]
        widths.append(p["rel_width"])
    assert hits >= 4, (hits, widths)
    assert np.median(widths) < 0.2, widths


def test_design_round_is_deterministic_given_the_seed():
    rng = np.random.default_rng(3)
    N = np.repeat(np.geomspace(1e7, 1e9, 4), 3)
    D = np.tile(np.geomspace(1e9, 1e11, 3), 4)
    data = dict(N=N, D=D, L=law(N, D) * np.exp(rng.normal(0, 0.01, len(N))))
    cands = candidates(np.repeat(np.geomspace(1e7, 3e9, 4), 4), np.tile(np.geomspace(1e9, 3e11, 4), 4))
    a = design_round(data, cands, Target.parse("optimum@1e21"), warm=THETA, n_boot=50, seed=7, polish=False)
    b = design_round(data, cands, Target.parse("optimum@1e21"), warm=THETA, n_boot=50, seed=7, polish=False)
    assert a.chosen == b.chosen and a.prediction == b.prediction
    assert np.array_equal(a.scores.score.to_numpy(), b.scores.score.to_numpy())
    assert a.prediction["lo"] < a.prediction["point"] < a.prediction["hi"]


@pytest.mark.parametrize("call, field", [
    (lambda: candidates([1e7, -1], [1e9, 1e9]), "N (parameters)"),
    (lambda: candidates([1e7, 1e8], [1e9, np.nan]), "D (tokens)"),
    (lambda: candidates([1e7, 1e8], [1e9, 1e9], cost=[1.0]), "cost"),
    (lambda: Target(kind="perplexity", compute=1e21), "kind"),
    (lambda: Target(kind="loss", compute=-1.0), "compute"),
    (lambda: Target.parse("loss1e21"), "target"),
    (lambda: Target.parse("loss@big"), "target"),
    (lambda: stop_reason(spent=0.0, budget=0.0), "budget"),
    (lambda: fit_law(dict(N=[1e7] * 6, D=[1e9] * 6, L=[3.0] * 6), warm=[1.0, 2.0]), "warm"),
])
def test_bad_input_raises_value_error_naming_the_field(call, field):
    with pytest.raises(ValueError, match=field.replace("(", r"\(").replace(")", r"\)")):
        call()


def test_acquire_and_predict_refuse_a_fit_without_bootstrap():
    N = np.repeat(np.geomspace(1e7, 1e9, 4), 3)
    D = np.tile(np.geomspace(1e9, 1e11, 3), 4)
    fit = fit_law(dict(N=N, D=D, L=law(N, D)), warm=THETA)
    cands = candidates([1e8], [1e10])
    with pytest.raises(ValueError, match="bootstrap"):
        acquire(fit, cands, TARGET)
    with pytest.raises(ValueError, match="batch_size"):
        acquire(fit, cands, TARGET, batch_size=0)
    with pytest.raises(ValueError, match="level"):
        predict_target(fit, TARGET, level=1.5)


def test_stop_reason():
    assert stop_reason(spent=10, budget=10).startswith("budget spent")
    assert stop_reason(spent=5, budget=10, next_cost=6).startswith("no candidate fits")
    assert stop_reason(spent=5, budget=10, rel_width=0.01, width_goal=0.02).startswith("interval narrow")
    assert stop_reason(spent=5, budget=10, rel_width=0.05, width_goal=0.02) is None


def test_acquire_best_takes_the_batch_with_the_larger_expected_reduction():
    from analysis.design import acquire_best

    rng = np.random.default_rng(4)
    N = np.repeat(np.geomspace(1e7, 1e8, 4), 3)  # a small ladder: the target at 1e21 is a long extrapolation
    D = np.tile(np.geomspace(1e9, 1e10, 3), 4)
    fit = bootstrap_fit(fit_law(dict(N=N, D=D, L=law(N, D) * np.exp(rng.normal(0, 0.01, len(N)))), warm=THETA),
                        100, seed=0, polish=False)
    # cheap runs near the ladder, one expensive run near the target's optimum, a budget that buys either
    cN = [1.2e7, 2e7, 4e7, 8e7, 1e10]
    cD = [2e9, 5e9, 3e9, 8e9, 2e11]
    cands = candidates(cN, cD)
    budget = float(cands.cost.iloc[4])
    ratio = acquire(fit, cands, TARGET, batch_size=5, budget=budget, cost_power=1.0)
    plain = acquire(fit, cands, TARGET, batch_size=5, budget=budget, cost_power=0.0)
    best = acquire_best(fit, cands, TARGET, batch_size=5, budget=budget)
    reductions = [ratio[1].attrs["batch_reduction"], plain[1].attrs["batch_reduction"]]
    assert best[1].attrs["batch_reduction"] == max(reductions)
    assert best[0] == [ratio, plain][int(np.argmax(reductions))][0]
    for chosen, sc in (ratio, plain, best):  # every batch within the budget; reduction = before - after
        assert cands.cost.iloc[chosen].sum() <= budget * (1 + 1e-12)
        assert sc.attrs["batch_reduction"] == pytest.approx(sc.attrs["variance_before"] - sc.attrs["variance_after"])
        assert 0 < sc.attrs["variance_after"] < sc.attrs["variance_before"]
    assert 4 in plain[0] and 4 not in ratio[0]  # the plain greedy buys the big run, the ratio greedy cheap ones
    with pytest.raises(ValueError, match="cost_power"):
        acquire(fit, cands, TARGET, cost_power=-1.0)


def test_design_round_refuses_an_unknown_rule():
    cands = candidates([1e8], [1e10])
    with pytest.raises(ValueError, match="rule='greedy'.*best"):
        design_round(dict(N=[1e7], D=[1e9], L=[3.0]), cands, TARGET, rule="greedy")


def test_relaxed_design_bounds_every_subset_and_takes_all_when_affordable():
    """The relaxation's variance is at most that of the best 0/1 design within the budget (brute force)."""
    import itertools

    from analysis.design import law_gradient, relaxed_design, target_gradient

    N = np.geomspace(3e7, 3e9, 8)
    D = np.geomspace(2e10, 2e9, 8) * np.r_[1, 3, 1, 3, 1, 3, 1, 3]
    cost = 6 * N * D
    J = law_gradient(THETA, N, D)
    g = target_gradient(THETA, TARGET)
    s2 = 1e-4

    def var(sub):
        M = J[list(sub)].T @ J[list(sub)] / s2
        return float(g @ np.linalg.solve(M, g)) if np.linalg.matrix_rank(M) == 5 else np.inf

    budget = 0.5 * cost.sum()
    best = min(var(sub) for k in range(5, 9) for sub in itertools.combinations(range(8), k)
               if cost[list(sub)].sum() <= budget)
    w, v = relaxed_design(np.zeros((5, 5)), J, cost, g, s2, budget=budget)
    assert w @ cost <= budget * (1 + 1e-6) and np.all((w >= 0) & (w <= 1))
    assert v <= best * (1 + 1e-6)
    assert v > 0.3 * best  # a bound, not a degenerate zero
    w_all, v_all = relaxed_design(np.zeros((5, 5)), J, cost, g, s2, budget=2 * cost.sum())
    assert np.allclose(w_all, 1, atol=1e-4) and v_all == pytest.approx(var(range(8)), rel=1e-4)


def test_acquire_relaxed_respects_budget_and_count_and_is_deterministic():
    from analysis.design import acquire_relaxed

    rng = np.random.default_rng(4)
    N = np.repeat(np.geomspace(1e7, 1e8, 4), 3)
    D = np.tile(np.geomspace(1e9, 1e10, 3), 4)
    fit = bootstrap_fit(fit_law(dict(N=N, D=D, L=law(N, D) * np.exp(rng.normal(0, 0.01, len(N)))), warm=THETA),
                        100, seed=0, polish=False)
    cN = np.repeat(np.geomspace(2e7, 2e9, 5), 3)
    cD = np.tile([3e9, 1e10, 3e10], 5)
    cands = candidates(cN, cD)
    budget = 0.3 * float(cands.cost.sum())
    chosen, sc = acquire_relaxed(fit, cands, TARGET, batch_size=4, budget=budget, exclude=[0])
    assert 1 <= len(chosen) <= 4 and 0 not in chosen and len(set(chosen)) == len(chosen)
    assert cands.cost.iloc[chosen].sum() <= budget * (1 + 1e-12)
    assert sc.attrs["batch_reduction"] == pytest.approx(sc.attrs["variance_before"] - sc.attrs["variance_after"])
    # the rounded batch cannot beat its own relaxation
    assert sc.attrs["variance_relaxed"] <= sc.attrs["variance_after"] * (1 + 1e-6)
    assert sc.weight.iloc[0] == 0 and sc.weight.between(0, 1).all()
    again, _ = acquire_relaxed(fit, cands, TARGET, batch_size=4, budget=budget, exclude=[0])
    assert again == chosen


def test_fisher_covariance_is_the_inverse_information_of_the_runs_made():
    """``fisher_covariance``: ``(J'J / s2)^-1`` with ``J`` the finite-difference gradient of log L at the estimate."""
    from analysis.design import fisher_covariance

    rng = np.random.default_rng(5)
    N = np.repeat(np.geomspace(1e7, 1e9, 4), 3)
    D = np.tile(np.geomspace(1e9, 1e11, 3), 4)
    fit = fit_law(dict(N=N, D=D, L=law(N, D) * np.exp(rng.normal(0, 0.01, len(N)))), warm=THETA)

    def logL(th):
        a, b, al, be, e = th
        return np.log(np.exp(e) + np.exp(a) / N ** al + np.exp(b) / D ** be)

    h = 1e-6
    J = np.column_stack([(logL(fit.theta[:5] + h * np.eye(5)[k]) - logL(fit.theta[:5] - h * np.eye(5)[k])) / (2 * h)
                         for k in range(5)])
    S = fisher_covariance(fit, 1e-4)
    np.testing.assert_allclose(S, np.linalg.inv(J.T @ J / 1e-4), rtol=1e-4)


def test_local_rule_buys_the_runs_the_made_runs_leave_open():
    """Rule ``local`` (the relaxed design on the Fisher precision): with D barely varied by the runs made, its
    batch varies D; it stays within budget and count, skips excluded runs, takes no greedy filler, and its
    relaxation bounds the rounded batch."""
    from analysis.design import acquire_by_rule

    rng = np.random.default_rng(1)
    N = np.repeat(np.geomspace(1e7, 1e9, 5), 2)
    D = np.tile([1e10, 1.3e10], 5)
    fit = bootstrap_fit(fit_law(dict(N=N, D=D, L=law(N, D) * np.exp(rng.normal(0, 0.005, len(N)))), warm=THETA),
                        100, seed=0, polish=False)
    cands = candidates([1e8] * 4 + [1e7, 3e7, 3e8, 1e9], [1e9, 3e9, 4e10, 1e11] + [1.15e10] * 4, cost=np.ones(8))
    chosen, sc = acquire_by_rule("local", fit, cands, TARGET, batch_size=2, budget=2.0, exclude=[3])
    assert 1 <= len(chosen) <= 2 and 3 not in chosen and set(chosen) <= {0, 1, 2}, sc
    assert sc.weight.iloc[3] == 0 and sc.weight.iloc[4:].max() < 1e-3
    assert sc.attrs["variance_relaxed"] <= sc.attrs["variance_after"] * (1 + 1e-6)
    # the noise variance cancels out of the relaxation: the same batch at any s2
    assert acquire_by_rule("local", fit, cands, TARGET, batch_size=2, budget=2.0, exclude=[3], noise_var=1e-2)[0] \
        == chosen
