"""Compute-error frontiers and the saturating power law of Zhai et al. (2022), "Scaling Vision Transformers".

    E(C) = a · (C + d)^(−b) + c

``c`` is the irreducible error the frontier saturates to, ``b`` the power-law exponent,
``d`` shifts the curve at small compute, ``a`` sets its scale. The fit is least squares on
the logarithm of the error (residual ``log E_model − log E_observed``), so every point
counts by its *relative* deviation whether its error is 30% or 3%; scipy's bounded
trust-region solver runs from a grid of starting points and keeps the best.

Intervals come from a bootstrap: by default the residual bootstrap (the compute values of
the frontier stay fixed, each refit sees the fitted curve times resampled, variance-
inflated log residuals), which suits the short, fixed designs of a compute sweep; the
pairs bootstrap (resample points with replacement) is available as ``method="pairs"``.
Percentile intervals; a resample whose fit fails is dropped and counted.

Compute is rescaled internally by ``scale`` (default: the median compute) for numerical
conditioning; the returned coefficients are in the caller's unit of C.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np

PARAMS = ("a", "b", "c", "d")


def saturating_power_law(compute, a: float, b: float, c: float, d: float):
    """``a · (C + d)^(−b) + c``, elementwise."""
    return a * (np.asarray(compute, np.float64) + d) ** (-b) + c


def pareto_frontier(compute: Sequence[float], error: Sequence[float]) -> np.ndarray:
    """Indices of the compute-error frontier, in increasing compute.

    A point is on the frontier when every point with no more compute has a strictly higher
    error (ties in compute: the lowest error wins).
    """
    compute = np.asarray(compute, np.float64)
    error = np.asarray(error, np.float64)
    order = np.lexsort((error, compute))
    out, best = [], math.inf
    for i in order:
        if error[i] < best:
            out.append(int(i))
            best = error[i]
    return np.asarray(out, dtype=int)


@dataclasses.dataclass
class PowerLawFit:
    """Fitted ``E = a (C + d)^(-b) + c`` with C in the caller's unit."""

    a: float
    b: float
    c: float
    d: float
    n: int  # points fitted
    rms_log_residual: float  # sqrt(mean((log E_fit - log E)^2)); ~ relative error
    max_rel_residual: float  # max |E_fit / E - 1|
    intervals: dict[str, tuple[float, float]]  # bootstrap percentile interval per parameter
    level: float  # e.g. 0.95
    n_boot: int  # resamples requested
    n_boot_ok: int  # resamples whose fit succeeded
    method: str
    at_bound: list[str] = dataclasses.field(default_factory=list)  # e.g. ["b at its upper bound 10"]

    def predict(self, compute):
        return saturating_power_law(compute, self.a, self.b, self.c, self.d)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


B_MAX = 10.0  # exponents this large mean the data do not determine b (Zhai et al. find 0.3-0.6)


def _bounds(x: np.ndarray, e: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """a > 0; 0 < b <= B_MAX; 0 <= c < min E (the asymptote lies below every point); 0 <= d <= 100 max C."""
    return (np.array([1e-12, 1e-4, 0.0, 0.0]),
            np.array([np.inf, B_MAX, float(np.min(e)) * (1 - 1e-9), 100.0 * float(np.max(x))]))


def _solve(x: np.ndarray, e: np.ndarray, start: np.ndarray | None = None) -> tuple[np.ndarray, float]:
    """Least squares in log E for the parameters (a, b, c, d) with x = C / scale. Returns (params, cost).

    Without ``start`` a grid of 36 starting points is tried; with one (a bootstrap refit
    starting from the full fit) only that start and a pure power law (c = d = 0) are.
    """
    from scipy.optimize import least_squares  # analysis-only dependency

    e_min = float(np.min(e))
    x_max = float(np.max(x))
    log_e = np.log(e)

    def residuals(p):
        a, b, c, d = p
        return np.log(a * (x + d) ** (-b) + c) - log_e

    lower, upper = _bounds(x, e)
    x_ref = float(np.min(x))

    def guess(b0, c0, d0):
        return [max(float(np.max(e)) - c0, 1e-9) * (x_ref + d0) ** b0, b0, c0, d0]

    if start is None:
        starts = [guess(b0, c_frac * e_min, d0) for b0 in (0.1, 0.3, 0.7, 1.5) for c_frac in (0.0, 0.5, 0.9)
                  for d0 in (0.0, x_ref, float(np.median(x)))]
    else:
        starts = [start, guess(0.3, 0.0, 0.0)]
    best, best_cost = None, math.inf
    for p0 in starts:
        p0 = np.minimum(np.maximum(p0, lower), upper)
        try:
            r = least_squares(residuals, p0, bounds=(lower, upper), method="trf", x_scale="jac", max_nfev=2000)
        except (ValueError, FloatingPointError):
            continue
        if r.success and np.all(np.isfinite(r.x)) and r.cost < best_cost:
            best, best_cost = r.x, float(r.cost)
    if best is None:
        raise RuntimeError("the saturating power-law fit did not converge from any starting point")
    return best, best_cost


def _unscale(p: np.ndarray, scale: float) -> np.ndarray:
    # a (x + d_s)^-b with x = C/s  ==  a s^b (C + d_s s)^-b
    a, b, c, d = p
    return np.array([a * scale ** b, b, c, d * scale])


def fit_saturating_power_law(compute: Sequence[float], error: Sequence[float], *, bootstrap: int = 1000,
                             level: float = 0.95, method: str = "residuals", seed: int = 0,
                             scale: float | None = None) -> PowerLawFit:
    """Fit ``E = a (C + d)^(-b) + c`` to points ``(C_i, E_i)`` (C > 0, 0 < E) with bootstrap intervals.

    Needs at least 4 points with distinct compute (5 or more to have any residual).
    """
    c_arr = np.asarray(compute, np.float64)
    e_arr = np.asarray(error, np.float64)
    if c_arr.shape != e_arr.shape or c_arr.ndim != 1:
        raise ValueError(f"compute and error must be 1-D of the same length, got {c_arr.shape} and {e_arr.shape}.")
    if not (np.all(np.isfinite(c_arr)) and np.all(np.isfinite(e_arr))):
        raise ValueError("compute and error must be finite.")
    if np.any(c_arr <= 0) or np.any(e_arr <= 0):
        raise ValueError("compute and error must be positive (an error of exactly 0 has no logarithm).")
    if len(np.unique(c_arr)) < 4:
        raise ValueError(f"the saturating power law has 4 parameters; got {len(np.unique(c_arr))} distinct "
                         "compute values. Add training budgets or model sizes to the sweep.")
    if method not in ("residuals", "pairs"):
        raise ValueError(f"method={method!r}: use 'residuals' or 'pairs'.")
    scale = float(scale or np.median(c_arr))
    x = c_arr / scale
    p_scaled, _ = _solve(x, e_arr)
    p = _unscale(p_scaled, scale)
    lower, upper = _bounds(x, e_arr)
    at_bound = []
    for j, name in enumerate(PARAMS):
        if name == "d" and p_scaled[j] <= lower[j] + 1e-9:
            continue  # d = 0 is the plain shifted law, not a sign of trouble
        if p_scaled[j] <= lower[j] * (1 + 1e-6) + 1e-12:
            at_bound.append(f"{name} at its lower bound {lower[j]:.3g}")
        elif np.isfinite(upper[j]) and p_scaled[j] >= upper[j] * (1 - 1e-6):
            at_bound.append(f"{name} at its upper bound" + (" (the lowest error)" if name == "c" else
                                                             f" {upper[j] if name == 'b' else upper[j] * scale:.3g}"))
    fitted = saturating_power_law(x, *p_scaled)
    res = np.log(fitted) - np.log(e_arr)
    n = len(x)

    rng = np.random.default_rng(seed)
    samples = []
    centred = (res - res.mean()) * math.sqrt(n / max(n - 4, 1))  # inflate for the 4 fitted parameters
    for _ in range(int(bootstrap)):
        if method == "residuals":
            xb = x
            eb = fitted * np.exp(rng.choice(centred, size=n, replace=True))
        else:
            idx = rng.integers(0, n, n)
            xb, eb = x[idx], e_arr[idx]
            if len(np.unique(xb)) < 4:
                continue
        try:
            pb, _ = _solve(xb, eb, start=p_scaled)
        except RuntimeError:
            continue
        samples.append(_unscale(pb, scale))
    alpha = (1 - level) / 2
    intervals = {}
    if samples:
        s = np.asarray(samples)
        for j, name in enumerate(PARAMS):
            lo, hi = np.quantile(s[:, j], [alpha, 1 - alpha])
            intervals[name] = (float(lo), float(hi))
    return PowerLawFit(
        a=float(p[0]), b=float(p[1]), c=float(p[2]), d=float(p[3]), n=n,
        rms_log_residual=float(np.sqrt(np.mean(res ** 2))),
        max_rel_residual=float(np.max(np.abs(fitted / e_arr - 1))),
        intervals=intervals, level=level, n_boot=int(bootstrap), n_boot_ok=len(samples), method=method,
        at_bound=at_bound)


def fit_pure_power_law(compute: Sequence[float], error: Sequence[float]) -> tuple[float, float, float]:
    """``E = a C^(-b)`` by linear least squares in log-log space: returns (a, b, rms_log_residual)."""
    lc = np.log(np.asarray(compute, np.float64))
    le = np.log(np.asarray(error, np.float64))
    slope, intercept = np.polyfit(lc, le, 1)
    res = intercept + slope * lc - le
    return float(math.exp(intercept)), float(-slope), float(np.sqrt(np.mean(res ** 2)))
