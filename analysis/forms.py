"""The registry of fit forms: each scaling-law form is one class, and this registry is the only list.

A form declares its variables, parameter names, transform (how the data enter the objective),
predict function, default grid of starts, default objective and the facts its validity check
needs. The fitter (:func:`analysis.fitter.fit_form`), the bootstrap, the extrapolation check, the
CLI (``python -m analysis fit <command> [--flag]``), the report and the plots read everything from
here. Adding a form = one class decorated with :func:`register` + a test.

==========================  ============  =========================================================  =====================
registry name               CLI           law                                                        paper
==========================  ============  =========================================================  =====================
``chinchilla``              chinchilla    ``L = E + A / N**alpha + B / D**beta``                     Hoffmann et al. 2022
``power``                   power         ``L = E + A x**-alpha``                                    Kaplan et al. 2020 form
``chinchilla-shared``       chinchilla    ``L = E + A / N**eta + B / D**eta`` (one exponent)         Gadre et al. 2024
                            --shared-exponent
``data-constrained``        data-         ``L = E + A / N'**alpha + B / D'**beta`` with repeated      Muennighoff et al. 2023
                            constrained   data ``D'`` and excess parameters ``N'`` (base frozen)
``loglog``                  power         ``y = k x**a``, weighted least squares of log y on log x   Porian et al. 2024
                            --loglog
==========================  ============  =========================================================  =====================
"""
from __future__ import annotations

from typing import Callable, ClassVar, Mapping

import numpy as np

from analysis._common import FitError, check_positive
from analysis.objective import LogLSEObjective, Objective, ReparamObjective, ResidualObjective
from analysis.validity import Thresholds

__all__ = ["Form", "FORMS", "register", "get_form", "form_for_cli", "cli_commands", "CHINCHILLA_GRID", "POWER_GRID",
           "ChinchillaForm", "PowerForm", "SharedExponentForm", "DataConstrainedForm", "LogLogForm", "wls_loglog"]

#: The registry: name -> form class. Filled by :func:`register`; nothing else lists forms.
FORMS: dict[str, type["Form"]] = {}


def register(cls: type["Form"]) -> type["Form"]:
    """Class decorator: add a form to :data:`FORMS` under ``cls.name``."""
    if cls.name in FORMS:
        raise ValueError(f"form {cls.name!r} is registered twice")
    FORMS[cls.name] = cls
    return cls


def get_form(form: "str | Form", **options) -> "Form":
    """A form instance from its registry name (or an instance passed through)."""
    if isinstance(form, Form):
        return form
    if form not in FORMS:
        raise ValueError(f"form={form!r}: allowed values are {sorted(FORMS)}")
    return FORMS[form](**options)


def cli_commands() -> list[str]:
    """The ``fit`` commands of the CLI, from the registry."""
    return sorted({cls.command for cls in FORMS.values()})


def form_for_cli(command: str, flags: Mapping[str, bool]) -> type["Form"]:
    """The registered form of ``python -m analysis fit <command>`` with the given flags set."""
    cands = [c for c in FORMS.values() if c.command == command]
    if not cands:
        raise ValueError(f"fit {command!r}: allowed forms are {cli_commands()}")
    on = [c for c in cands if c.flag and flags.get(c.flag)]
    if len(on) > 1:
        raise ValueError(f"fit {command}: choose one of {['--' + c.flag.replace('_', '-') for c in on]}")
    if on:
        return on[0]
    plain = [c for c in cands if not c.flag]
    if not plain:
        raise ValueError(f"fit {command} needs {cands[0].flag}")
    return plain[0]


#: The Chinchilla approach-3 grid of starts (6 * 6 * 5 * 5 * 5 = 4500 points).
CHINCHILLA_GRID: dict[str, np.ndarray] = {
    "a": np.arange(0.0, 25.0 + 1e-9, 5.0),
    "b": np.arange(0.0, 25.0 + 1e-9, 5.0),
    "e": np.arange(-1.0, 1.0 + 1e-9, 0.5),
    "alpha": np.arange(0.0, 2.0 + 1e-9, 0.5),
    "beta": np.arange(0.0, 2.0 + 1e-9, 0.5),
}
#: Grid of starts for the one-variable law (x is rescaled by its geometric mean before fitting).
POWER_GRID: dict[str, np.ndarray] = {
    "a": np.arange(-5.0, 5.0 + 1e-9, 2.5),
    "e": np.arange(-1.0, 1.0 + 1e-9, 0.5),
    "alpha": np.arange(0.0, 2.0 + 1e-9, 0.5),
}


class Form:
    """Base class of a fit form (declarations; the fitting lives in :mod:`analysis.fitter`).

    Class attributes
    ----------------
    name : str
        Registry key (``FitResult.kind``).
    title : str
        The law in words and symbols (report headings, plot labels, CLI help).
    paper, recipe : str
        Where the form and its fitting recipe come from.
    variables : tuple of str
        Data keys besides the target (``N, D`` / ``x`` / ``N, D, U``).
    target : str
        Data key of the fitted quantity (``L``; ``y`` for :class:`LogLogForm`).
    labels : dict
        Data key -> description used in error messages.
    param_names : tuple of str
        Raw parameter vector, in order (what the optimizer sees).
    exponents : dict
        Named exponent -> variable it belongs to; each must be > 0 (validity).
    se_params : tuple of str
        Named parameters whose bootstrap SE must stay below their magnitude (validity).
    scale_terms : dict
        Scale parameter -> (its exponent, its variable) for terms ``scale / variable**exponent``: validity judges
        such a scale by the term at the data's geometric mean of the variable, not by the coefficient at
        ``variable = 1``, whose SE depends on the variable's units (``A`` at N = 1 parameter is ~ln N = 12
        e-folds from the data, so SE(A) > A follows from any SE(alpha) above ~0.06).
    asymptote : str or None
        Named irreducible loss compared with the lowest observed loss (validity).
    default_objective : str
        Objective used when the caller names none (:mod:`analysis.objective`).
    grid : dict
        Default starts per raw parameter (the full product is optimized).
    min_points : int
        Fewest points the fit accepts.
    command, flag : str
        CLI: ``python -m analysis fit <command> [--<flag>]``.
    """

    name: ClassVar[str]
    title: ClassVar[str]
    paper: ClassVar[str] = ""
    recipe: ClassVar[str] = ""
    variables: ClassVar[tuple[str, ...]]
    target: ClassVar[str] = "L"
    labels: ClassVar[dict] = {"N": "N (parameters)", "D": "D (tokens)", "U": "U (unique tokens)", "L": "L (loss)",
                              "x": "x", "y": "y"}
    param_names: ClassVar[tuple[str, ...]]
    exponents: ClassVar[dict] = {}
    se_params: ClassVar[tuple[str, ...]] = ()
    scale_terms: ClassVar[dict] = {}
    asymptote: ClassVar[str | None] = "E"
    default_objective: ClassVar[str] = "huber"
    grid: ClassVar[dict] = {}
    min_points: ClassVar[int] = 1
    command: ClassVar[str]
    flag: ClassVar[str | None] = None
    closed_form: ClassVar[bool] = False
    #: extra starts for the huber-mle stage (raw parameters, e.g. the paper's published values)
    mle_starts: ClassVar[tuple] = ()

    @classmethod
    def from_cli(cls, args) -> "Form":
        """The form instance for the CLI's arguments (options such as a frozen base)."""
        return cls()

    # -- data
    def check_data(self, data: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Validated float arrays of the variables and the target (raises :class:`FitError`)."""
        out = {}
        for k in (*self.variables, self.target):
            if k not in data or data[k] is None:
                raise FitError(f"form {self.name!r} needs {self.labels.get(k, k)}")
            out[k] = check_positive(self.labels.get(k, k), data[k])
        n = {len(v) for v in out.values()}
        if len(n) != 1:
            raise FitError(f"{', '.join(out)} must have the same length, got {[len(v) for v in out.values()]}")
        if len(out[self.target]) < self.min_points:
            raise FitError(f"{self.title}: needs at least {self.min_points} points, got {len(out[self.target])}")
        return out

    def cli_data(self, col: Callable[[str], np.ndarray], args) -> dict:
        """Arrays for this form from a table (``col(name)`` reads a column) and the CLI's arguments."""
        raise NotImplementedError

    # -- the law
    def objective(self, data: Mapping[str, np.ndarray], objective: Objective):
        """``(batched objective over raw parameters [+ objective extras], x_scale)``."""
        raise NotImplementedError

    def named(self, theta, x_scale: float = 1.0) -> dict:
        """Named parameters from raw ones (``theta`` may be ``(P, S)``: vectorized over replicates)."""
        raise NotImplementedError

    def predict(self, params: Mapping[str, float], *X) -> np.ndarray:
        """The law at the given variables (in the order of :attr:`variables`)."""
        raise NotImplementedError

    def label(self, params: Mapping[str, float]) -> str:
        """The fitted law in one line (plot legends)."""
        return self.title

    def compute(self, data: Mapping[str, np.ndarray], flops_per_param_token: float = 6.0) -> np.ndarray:
        """Compute budget per row (the extrapolation check holds out the largest)."""
        raise FitError(f"form {self.name!r} has no compute budget per run")

    def distinct(self, data: Mapping[str, np.ndarray], t: Thresholds) -> dict:
        """``what -> (distinct count, minimum)`` for the validity check."""
        return {}

    def validity_facts(self, fit) -> dict:
        """Extra keyword arguments of :func:`analysis.validity.check_validity` for a fit of this form."""
        return {}

    def to_dict(self, fit) -> dict:
        """Extra JSON keys of a fit of this form."""
        return {}


class _LSEForm(Form):
    def _obj(self, logX, logy, objective: Objective):
        return LogLSEObjective.for_objective(logX, logy, objective)


@register
class ChinchillaForm(_LSEForm):
    """Chinchilla approach 3 (Hoffmann et al. 2022, App. D.2): ``L = E + A / N**alpha + B / D**beta``,
    fitted as ``log L ~ LSE(a - alpha log N, b - beta log D, e)`` with the Huber loss (delta 1e-3) of the
    log residual summed over points, L-BFGS from every point of :data:`CHINCHILLA_GRID` (4500 starts)."""

    name = "chinchilla"
    title = "Approach 3: L(N, D) = E + A/N^alpha + B/D^beta"
    paper = "Hoffmann et al. 2022 (App. D.2); Besiroglu et al. 2024 (huber-mle)"
    recipe = "Huber delta=1e-3 on log L, summed; L-BFGS from 4500 grid starts"
    variables = ("N", "D")
    param_names = ("a", "b", "alpha", "beta", "e")
    exponents = {"alpha": "N", "beta": "D"}
    se_params = ("E", "A", "B", "alpha", "beta")
    scale_terms = {"A": ("alpha", "N"), "B": ("beta", "D")}
    grid = CHINCHILLA_GRID
    min_points = 6
    command = "chinchilla"
    #: Hoffmann et al.'s published estimates (A=406.4, B=410.7, E=1.69, alpha=0.34, beta=0.28): Epoch's
    #: maximum-likelihood fit starts there
    mle_starts = ((np.log(406.4), np.log(410.7), 0.34, 0.28, np.log(1.69)),)

    def check_data(self, data):
        out = super().check_data(data)
        if len(np.unique(out["N"])) < 2 or len(np.unique(out["D"])) < 2:
            raise FitError(f"approach 3 needs at least 2 distinct N and 2 distinct D, got "
                           f"{len(np.unique(out['N']))} and {len(np.unique(out['D']))}")
        return out

    def cli_data(self, col, args):
        N = col(args.params)
        if args.tokens:
            D = col(args.tokens)
        elif args.flops:
            D = col(args.flops) / (args.flops_per_param_token * N)
        else:
            raise ValueError(f"fit {self.command} needs --tokens D or --flops C (D = C / (6 N))")
        return dict(N=N, D=D, L=col(args.loss))

    def objective(self, data, objective):
        return self._obj(np.column_stack([np.log(data["N"]), np.log(data["D"])]), np.log(data["L"]), objective), 1.0

    def named(self, theta, x_scale=1.0):
        a, b, al, be, e = theta[:5]
        return dict(E=np.exp(e), A=np.exp(a), B=np.exp(b), alpha=al, beta=be, a=a, b=b, e=e)

    def predict(self, params, *X):
        N, D = (np.asarray(v, dtype=np.float64) for v in X)
        return params["E"] + params["A"] / N ** params["alpha"] + params["B"] / D ** params["beta"]

    def label(self, p):
        return f"L = {p['E']:.3g} + {p['A']:.3g}/N^{p['alpha']:.3g} + {p['B']:.3g}/D^{p['beta']:.3g}"

    def compute(self, data, flops_per_param_token=6.0):
        return flops_per_param_token * np.asarray(data["N"], float) * np.asarray(data["D"], float)

    def distinct(self, data, t):
        return {"sizes N": (len(np.unique(data["N"])), t.min_distinct_chinchilla),
                "token counts D": (len(np.unique(data["D"])), t.min_distinct_chinchilla)}


@register
class PowerForm(_LSEForm):
    """One-variable saturating power law ``L = E + A x**-alpha`` (x = C, N or D), fitted like approach 3;
    ``x`` is divided by its geometric mean inside the fit (parameters reported in the original units)."""

    name = "power"
    title = "L(C) = E + A C^-alpha on the compute frontier"
    paper = "Kaplan et al. 2020 (form); Hoffmann et al. 2022 (fit)"
    recipe = "Huber delta=1e-3 on log L, summed; L-BFGS from 125 grid starts"
    variables = ("x",)
    param_names = ("a", "alpha", "e")
    exponents = {"alpha": "x"}
    se_params = ("E", "A", "alpha")
    scale_terms = {"A": ("alpha", "x")}
    grid = POWER_GRID
    min_points = 4
    command = "power"

    def check_data(self, data):
        out = super().check_data(data)
        if len(np.unique(out["x"])) < 3:
            raise FitError(f"the one-variable law has 3 parameters and needs at least 4 points with 3 distinct "
                           f"x values, got {len(out['L'])} points and {len(np.unique(out['x']))} distinct x")
        return out

    def cli_data(self, col, args):
        if not args.x:
            raise ValueError("fit power needs --x COLUMN (compute, parameters or tokens)")
        return dict(x=col(args.x), L=col(args.loss))

    def objective(self, data, objective):
        scale = float(np.exp(np.mean(np.log(data["x"]))))
        return self._obj(np.log(data["x"] / scale)[:, None], np.log(data["L"]), objective), scale

    def named(self, theta, x_scale=1.0):
        a, al, e = theta[:3]
        a = a + al * np.log(x_scale)  # undo the rescaling x -> x / x_scale
        return dict(E=np.exp(e), A=np.exp(a), alpha=al, a=a, e=e)

    def predict(self, params, *X):
        (x,) = X
        return params["E"] + params["A"] * np.asarray(x, dtype=np.float64) ** (-params["alpha"])

    def label(self, p):
        return f"L = {p['E']:.3g} + {p['A']:.3g} C^-{p['alpha']:.3g}"

    def compute(self, data, flops_per_param_token=6.0):
        return np.asarray(data["x"], float)

    def distinct(self, data, t):
        return {"x values": (len(np.unique(data["x"])), t.min_distinct_power)}


@register
class SharedExponentForm(ChinchillaForm):
    """Gadre et al. 2024: Chinchilla's form with one exponent for N and D, ``L = E + A / N**eta + B / D**eta``
    (their reparametrization by the token multiplier M = D / N, ``L = E + (a M**eta + b M**-eta) C**-eta``, is
    the same law). Least squares on the loss itself (their ``curve_fit``) from their grid of starts
    (A, B in {1e2, 3e2, 1e3, 3e3}, eta in {0.1, 0.3}, E in {~0, 1, 2, 10}: 128 starts); 4 parameters,
    so 5 points suffice."""

    name = "chinchilla-shared"
    title = "Shared exponent: L(N, D) = E + A/N^eta + B/D^eta"
    paper = "Gadre et al. 2024"
    recipe = "least squares on L itself (objective lsq); 128 grid starts; >= 5 points"
    param_names = ("a", "b", "eta", "e")
    exponents = {"eta": "N and D"}
    se_params = ("E", "A", "B", "eta")
    scale_terms = {"A": ("eta", "N"), "B": ("eta", "D")}
    grid = {"a": np.log([1e2, 3e2, 1e3, 3e3]), "b": np.log([1e2, 3e2, 1e3, 3e3]), "eta": np.array([0.1, 0.3]),
            "e": np.log([0.1, 1.0, 2.0, 10.0])}  # E = 0 of their grid is not representable in log E: 0.1
    default_objective = "lsq"
    min_points = 5
    flag = "shared_exponent"
    mle_starts = ()

    def objective(self, data, objective):
        inner, _ = super().objective(data, objective)
        extra = len(objective.extra_params)
        # free [a, b, eta, e (, log_sigma)] -> inner [a, b, alpha=eta, beta=eta, e (, log_sigma)]
        M = np.zeros((5 + extra, 4 + extra))
        M[0, 0] = M[1, 1] = M[2, 2] = M[3, 2] = M[4, 3] = 1.0
        for j in range(extra):
            M[5 + j, 4 + j] = 1.0
        return ReparamObjective(inner, M), 1.0

    def named(self, theta, x_scale=1.0):
        a, b, eta, e = theta[:4]
        return dict(E=np.exp(e), A=np.exp(a), B=np.exp(b), eta=eta, a=a, b=b, e=e)

    def predict(self, params, *X):
        N, D = (np.asarray(v, dtype=np.float64) for v in X)
        return params["E"] + params["A"] / N ** params["eta"] + params["B"] / D ** params["eta"]

    def label(self, p):
        return f"L = {p['E']:.3g} + {p['A']:.3g}/N^{p['eta']:.3g} + {p['B']:.3g}/D^{p['eta']:.3g}"


#: Starts of log R_D* and log R_N* (8 x 8 = 64) for the data-constrained form.
DATA_CONSTRAINED_GRID = {"log_r_d_star": np.log([1.0, 2.5, 5.0, 10.0, 15.0, 25.0, 50.0, 100.0]),
                         "log_r_n_star": np.log([1.0, 2.5, 5.0, 10.0, 15.0, 25.0, 50.0, 100.0])}


@register
class DataConstrainedForm(Form):
    """Muennighoff et al. 2023, eq. 5: ``L = E + A / N'**alpha + B / D'**beta`` with

    * ``D' = U_D + U_D R_D* (1 - exp(-R_D / R_D*))``, ``R_D = D / U_D - 1`` (repeated epochs of the
      ``U_D`` unique tokens);
    * ``N' = U_N + U_N R_N* (1 - exp(-R_N / R_N*))``, ``R_N = N / U_N - 1``, with ``U_N = min(N, N_opt(U_D))``:
      the compute-optimal size of the base law for ``U_D`` tokens, ``N_opt = G**((alpha+beta)/alpha)
      U_D**(beta/alpha)``, ``G = (alpha A / (beta B))**(1/(alpha+beta))``.

    The base ``E, A, B, alpha, beta`` is frozen (a first-stage approach-3 fit, or the paper's values); only
    ``R_D*`` and ``R_N*`` are fitted, by the Huber loss (delta 1e-3) of the log residual from a grid of
    starts (:data:`DATA_CONSTRAINED_GRID`).

    Parameters
    ----------
    base : dict
        ``E, A, B, alpha, beta`` of the frozen base law (``alpha, beta > 0``).
    """

    name = "data-constrained"
    title = "Data-constrained: L = E + A/N'^alpha + B/D'^beta (R_D*, R_N*)"
    paper = "Muennighoff et al. 2023"
    recipe = "base frozen; Huber delta=1e-3 on log L over R_D*, R_N* from 64 grid starts"
    variables = ("N", "D", "U")
    param_names = ("log_r_d_star", "log_r_n_star")
    se_params = ("r_d_star", "r_n_star")
    asymptote = None  # E is the frozen base's: validity_facts compares it with the lowest loss
    grid = DATA_CONSTRAINED_GRID
    min_points = 3
    command = "data-constrained"
    BASE_KEYS = ("A", "B", "E", "alpha", "beta")

    def __init__(self, base: Mapping[str, float] | None = None):
        if base is None:
            raise ValueError("data-constrained form: base= needs E, A, B, alpha, beta of the frozen base law "
                             "(CLI: --base A,B,E,alpha,beta)")
        missing = [k for k in self.BASE_KEYS if k not in base]
        if missing:
            raise ValueError(f"base: missing {missing}; it needs {list(self.BASE_KEYS)}")
        self.base = {k: float(base[k]) for k in self.BASE_KEYS}
        if not (self.base["alpha"] > 0 and self.base["beta"] > 0 and self.base["A"] > 0 and self.base["B"] > 0):
            raise ValueError(f"base: A, B, alpha and beta must be > 0, got {self.base}")

    @classmethod
    def from_cli(cls, args) -> "DataConstrainedForm":
        if not getattr(args, "base", None):
            raise ValueError("fit data-constrained needs --base A,B,E,alpha,beta (the frozen base law)")
        return cls(cls.parse_base(args.base))

    @classmethod
    def parse_base(cls, text: str) -> dict:
        """``"A,B,E,alpha,beta"`` -> dict (the CLI's ``--base``)."""
        parts = [p for p in str(text).split(",") if p.strip()]
        if len(parts) != 5:
            raise ValueError(f"--base {text!r}: expected 5 comma-separated numbers A,B,E,alpha,beta")
        return dict(zip(cls.BASE_KEYS, map(float, parts)))

    def check_data(self, data):
        out = super().check_data(data)
        if np.any(out["U"] > out["D"] * (1 + 1e-12)):
            raise FitError("U (unique tokens) must not exceed D (tokens seen)")
        return out

    def cli_data(self, col, args):
        for flag, v in (("--params", args.params), ("--tokens", args.tokens), ("--unique", args.unique)):
            if not v:
                raise ValueError(f"fit data-constrained needs {flag} COLUMN")
        return dict(N=col(args.params), D=col(args.tokens), U=col(args.unique), L=col(args.loss))

    def effective(self, N, D, U, r_d_star, r_n_star):
        """``(N', D')`` of the paper's eq. 5; ``r_*_star`` broadcast against the data."""
        p = self.base
        al, be = p["alpha"], p["beta"]
        G = (al * p["A"] / (be * p["B"])) ** (1.0 / (al + be))
        U_N = np.minimum(N, G ** ((al + be) / al) * U ** (be / al))
        R_D = D / U - 1.0
        R_N = N / U_N - 1.0
        Dp = U + U * r_d_star * (1.0 - np.exp(-R_D / r_d_star))
        Np = U_N + U_N * r_n_star * (1.0 - np.exp(-R_N / r_n_star))
        return Np, Dp

    def objective(self, data, objective):
        N, D, U = data["N"], data["D"], data["U"]
        p = self.base

        def logpred(th_SP):
            Np, Dp = self.effective(N[None, :], D[None, :], U[None, :], np.exp(th_SP[:, :1]), np.exp(th_SP[:, 1:2]))
            return np.log(p["E"] + p["A"] / Np ** p["alpha"] + p["B"] / Dp ** p["beta"])

        return ResidualObjective(logpred, np.log(data["L"]), objective, 2), 1.0

    def named(self, theta, x_scale=1.0):
        lrd, lrn = theta[:2]
        return dict(r_d_star=np.exp(lrd), r_n_star=np.exp(lrn), log_r_d_star=lrd, log_r_n_star=lrn)

    def predict(self, params, *X):
        N, D, U = (np.asarray(v, dtype=np.float64) for v in X)
        Np, Dp = self.effective(N, D, U, params["r_d_star"], params["r_n_star"])
        b = self.base
        return b["E"] + b["A"] / Np ** b["alpha"] + b["B"] / Dp ** b["beta"]

    def label(self, p):
        return f"data-constrained, R_D* = {p['r_d_star']:.3g}, R_N* = {p['r_n_star']:.3g}"

    def compute(self, data, flops_per_param_token=6.0):
        return flops_per_param_token * np.asarray(data["N"], float) * np.asarray(data["D"], float)

    def distinct(self, data, t):
        return {"sizes N": (len(np.unique(data["N"])), t.min_distinct_chinchilla),
                "unique-token counts U": (len(np.unique(data["U"])), t.min_distinct_chinchilla)}

    def validity_facts(self, fit):
        b = self.base
        data = fit.extra.get("_data", {})
        return dict(exponents={"alpha": b["alpha"], "beta": b["beta"]}, exponent_of={"alpha": "N'", "beta": "D'"},
                    asymptote=("E", b["E"], float(np.min(data["L"]))) if "L" in data else None)

    def to_dict(self, fit):
        return dict(r_d_star=float(fit.params["r_d_star"]), r_n_star=float(fit.params["r_n_star"]), base=dict(self.base))


def wls_loglog(x, y, w=None):
    """Weighted least squares of ``log y`` on ``log x``; ``w`` is ``(n,)`` or ``(S, n)`` (one fit per row).

    Returns
    -------
    slope, intercept : ndarray
        Scalars for 1-D ``w`` (or ``None``), arrays of length ``S`` for 2-D ``w``.
    """
    lx, ly = np.log(np.asarray(x, float)), np.log(np.asarray(y, float))
    W = np.ones_like(lx) if w is None else np.asarray(w, dtype=np.float64)
    one = W.ndim == 1
    W = np.atleast_2d(W)
    sw = W.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        mx = (W * lx).sum(axis=1) / sw
        my = (W * ly).sum(axis=1) / sw
        dx = lx[None, :] - mx[:, None]
        slope = (W * dx * (ly[None, :] - my[:, None])).sum(axis=1) / (W * dx * dx).sum(axis=1)
    icpt = my - slope * mx
    return (slope[0], icpt[0]) if one else (slope, icpt)


@register
class LogLogForm(Form):
    """Porian et al. 2024: a pure power law ``y = k x**a`` (e.g. ``N*(C)``) by weighted least squares of
    ``log y`` on ``log x`` with weights ``w`` (theirs: ``1 / std**2`` of the bootstrap spread of each
    optimum's log). Closed form. The exponent's interval is t-based (``n - 2`` degrees of freedom, the
    weights taken as relative: ``cov = s**2 (X'WX)^-1``, ``s**2 = sum w r**2 / (n - 2)``) or, after a
    bootstrap, the percentile interval of the weighted refits."""

    name = "loglog"
    title = "Weighted log-log power law: y = k x^a"
    paper = "Porian et al. 2024"
    recipe = "weighted least squares of log y on log x (weights 1/std^2); closed form"
    variables = ("x",)
    target = "y"
    param_names = ("exponent", "log_coef")
    se_params = ("exponent",)
    asymptote = None
    min_points = 3
    command = "power"
    flag = "loglog"
    closed_form = True

    def check_data(self, data):
        out = super().check_data(data)
        w = data.get("w")
        if w is not None:
            out["w"] = check_positive("w (weights)", w)
            if len(out["w"]) != len(out["x"]):
                raise FitError(f"w (weights) has {len(out['w'])} values, x has {len(out['x'])}")
        if len(np.unique(out["x"])) < 2:
            raise FitError("the log-log power law needs at least 2 distinct x values")
        return out

    def cli_data(self, col, args):
        if not args.x:
            raise ValueError("fit power --loglog needs --x COLUMN")
        ycol = args.y or args.loss
        if not ycol:
            raise ValueError("fit power --loglog needs --y COLUMN (or --loss)")
        return dict(x=col(args.x), y=col(ycol), w=col(args.weights) if args.weights else None)

    def solve(self, data, W=None) -> np.ndarray:
        """Raw parameters ``[exponent, log_coef]``: one row, or one per row of the multiplicities ``W``."""
        w = data.get("w")
        if W is None:
            ww = w
        else:
            ww = W * (1.0 if w is None else w[None, :])
        s, i = wls_loglog(data["x"], data["y"], ww)
        return np.column_stack([np.atleast_1d(s), np.atleast_1d(i)])

    def t_interval(self, data, theta, level: float = 0.95) -> tuple[float, float, float]:
        """``(se, lo, hi)`` of the exponent from the weighted regression (t with n - 2 dof)."""
        from scipy import stats

        lx, ly = np.log(data["x"]), np.log(data["y"])
        w = np.ones_like(lx) if data.get("w") is None else data["w"]
        r = ly - (theta[0] * lx + theta[1])
        dof = len(lx) - 2
        if dof <= 0:
            return float("nan"), float("nan"), float("nan")
        mx = np.sum(w * lx) / np.sum(w)
        s2 = np.sum(w * r * r) / dof
        se = float(np.sqrt(s2 / np.sum(w * (lx - mx) ** 2)))
        tq = stats.t.ppf(0.5 + level / 2, dof)
        return se, float(theta[0] - tq * se), float(theta[0] + tq * se)

    def named(self, theta, x_scale=1.0):
        a, lk = theta[:2]
        return dict(exponent=a, coef=np.exp(lk), log_coef=lk)

    def predict(self, params, *X):
        (x,) = X
        return params["coef"] * np.asarray(x, dtype=np.float64) ** params["exponent"]

    def label(self, p):
        return f"y = {p['coef']:.3g} x^{p['exponent']:.3g}"

    def compute(self, data, flops_per_param_token=6.0):
        return np.asarray(data["x"], float)

    def _interval(self, fit, level):
        if fit.bootstrap is not None:
            iv = fit.intervals(level)
            return float(iv.loc["exponent", "se"]), float(iv.loc["exponent", "lo"]), float(iv.loc["exponent", "hi"]), "bootstrap"
        se, lo, hi = self.t_interval(fit.extra["_data"], fit.theta, level)
        return se, lo, hi, "t"

    def validity_facts(self, fit, level: float = 0.95):
        se, lo, hi, _ = self._interval(fit, level)
        return dict(intervals={"exponent": (lo, hi)}, se={"exponent": (fit.params["exponent"], se)},
                    distinct={"x values": (len(np.unique(fit.extra["_data"]["x"])), 3)})

    def to_dict(self, fit, level: float = 0.95):
        se, lo, hi, how = self._interval(fit, level)
        return dict(exponent=float(fit.params["exponent"]), coef=float(fit.params["coef"]), exponent_se=se,
                    exponent_ci=[lo, hi], interval_method=how, weighted=fit.extra["_data"].get("w") is not None)
