"""Scaling-curve figures (matplotlib). Imported only by reporting commands.

Figures are ``matplotlib.figure.Figure`` objects written straight to files: nothing here
touches pyplot's global state or selects a backend, so importing this module changes
nothing for a caller that plots interactively.

Each function takes plain rows (dicts with ``compute``, ``error``, ``model``, ``family``,
``params``...), draws one figure and writes it as PNG and SVG next to ``out_stem``;
it returns the paths written.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import matplotlib
import numpy as np
from matplotlib import ticker
from matplotlib.figure import Figure

FAMILY_STYLE = {"vit": dict(color="tab:blue", marker="o", label="ViT"),
                "resnet": dict(color="tab:orange", marker="s", label="ResNet")}


def _save(fig, out_stem: str) -> list[str]:
    paths = []
    for ext in ("png", "svg"):
        path = f"{out_stem}.{ext}"
        fig.savefig(path, dpi=150, bbox_inches="tight")
        paths.append(path)
    return paths


def _fmt_params(n: float | None) -> str:
    if n is None:
        return "?"
    for unit, div in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= div:
            return f"{n / div:.3g}{unit}"
    return str(int(n))


def _percent(v: float, _pos=None) -> str:
    return f"{100 * v:.3g}%"


def _is_mantissa(v: float, keep: Sequence[int]) -> tuple[bool, int]:
    """Whether ``v = m × 10^e`` with m in ``keep``; and e."""
    e = math.floor(math.log10(v))
    return any(abs(v / 10 ** e - m) < 1e-6 for m in keep), e


def _percent_minor(v: float, _pos=None) -> str:
    """Label minor ticks at 2, 3 and 5 × 10^k only (readable on a log axis)."""
    return _percent(v) if v > 0 and _is_mantissa(v, (2, 3, 5))[0] else ""


def _sci_minor(v: float, _pos=None) -> str:
    """``2×10^e`` and ``5×10^e`` minor labels, nothing elsewhere."""
    if v <= 0:
        return ""
    ok, e = _is_mantissa(v, (2, 5))
    return rf"${round(v / 10 ** e):d}\times10^{{{e}}}$" if ok else ""


def _log_axes(ax, xlabel: str, ylabel: str, percent_y: bool = True) -> None:
    """Log-log axes with grids; an error axis is labelled in percent."""
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, which="major", alpha=0.4)
    ax.grid(True, which="minor", alpha=0.15)
    lo, hi = ax.get_xlim()
    if 4 <= hi / lo < 100:  # 1-2 decades: minor labels at 2 and 5 × 10^k only (wider: none, the default)
        ax.xaxis.set_minor_formatter(ticker.FuncFormatter(_sci_minor))
    if percent_y:
        lo, hi = ax.get_ylim()
        ax.yaxis.set_major_formatter(ticker.FuncFormatter(_percent))
        ratio = hi / lo
        minor = _percent if ratio < 8 else _percent_minor if ratio < 30 else (lambda v, p=None: "")
        ax.yaxis.set_minor_formatter(ticker.FuncFormatter(minor))


def plot_frontier(rows: Sequence[dict], frontier: Sequence[dict], predict: Callable | None, out_stem: str, *,
                  fit_label: str = "", asymptote: float | None = None, title: str = "",
                  xlabel: str = "training compute (FLOPs) = 3 × forward FLOPs × examples seen",
                  ylabel: str = "test error (log scale)") -> list[str]:
    """Error vs compute (log-log), one colour per model size, frontier and fitted law (Zhai et al. Fig. 2)."""
    fig = Figure(figsize=(8.5, 5.5))
    ax = fig.subplots()
    models = sorted({r["model"] for r in rows}, key=lambda m: min(r["params"] or 0 for r in rows if r["model"] == m))
    cmap = matplotlib.colormaps["viridis"]
    for i, m in enumerate(models):
        pts = sorted((r for r in rows if r["model"] == m), key=lambda r: r["compute"])
        color = cmap(i / max(len(models) - 1, 1) * 0.9)
        ax.plot([r["compute"] for r in pts], [r["error"] for r in pts], "-o", color=color, ms=5, lw=1.2,
                alpha=0.9, label=f"{m} ({_fmt_params(pts[0]['params'])})")
    if frontier:
        fx = [r["compute"] for r in frontier]
        ax.scatter(fx, [r["error"] for r in frontier], s=110, facecolors="none", edgecolors="red", lw=1.3,
                   zorder=5, label="frontier points")
    if predict is not None and frontier:
        lo = min(r["compute"] for r in rows) / 1.5
        hi = max(r["compute"] for r in rows) * 3
        xs = np.logspace(math.log10(lo), math.log10(hi), 200)
        ax.plot(xs, predict(xs), "--", color="red", lw=1.8, label=fit_label or "saturating power-law fit")
        if asymptote is not None and asymptote > 0:
            ax.axhline(asymptote, color="red", lw=0.8, ls=":", label=f"fitted irreducible error c = {asymptote:.3f}")
    _log_axes(ax, xlabel, ylabel)
    ax.set_title(title or "Compute-error frontier")
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5), title="model (params)", title_fontsize=8)
    return _save(fig, out_stem)


def plot_families(rows: Sequence[dict], frontiers: dict[str, Sequence[dict]], out_stem: str, *, title: str = "",
                  xlabel: str = "training compute (FLOPs)", ylabel: str = "test error (log scale)") -> list[str]:
    """ViT vs ResNet: error vs compute with each family's frontier (the ViT paper's Fig. 5)."""
    fig = Figure(figsize=(7.5, 5.0))
    ax = fig.subplots()
    for fam in sorted({r["family"] for r in rows}):
        style = dict(FAMILY_STYLE.get(fam, dict(color="gray", marker="^", label=fam)))
        pts = [r for r in rows if r["family"] == fam]
        ax.scatter([r["compute"] for r in pts], [r["error"] for r in pts], color=style["color"],
                   marker=style["marker"], s=30, alpha=0.6, label=f"{style['label']} runs ({len(pts)})")
        fr = frontiers.get(fam) or []
        if fr:
            ax.step([r["compute"] for r in fr] + [max(r["compute"] for r in rows) * 1.5],
                    [r["error"] for r in fr] + [fr[-1]["error"]], where="post", color=style["color"], lw=2,
                    label=f"{style['label']} frontier")
    _log_axes(ax, xlabel, ylabel)
    ax.set_title(title or "ViT vs ResNet at equal training compute")
    ax.legend(fontsize=9, loc="best")
    return _save(fig, out_stem)


def plot_ablations(panels: Sequence[dict], out_stem: str, *, title: str = "",
                   xlabel: str = "forward GFLOPs per example", ylabel: str = "test error (log scale)") -> list[str]:
    """Error vs model compute when one axis changes (the ViT paper's Fig. 8).

    ``panels``: ``[{"title": "depth", "series": [{"label": ..., "x": [...], "y": [...],
    "annotations": [...]}, ...]}, ...]``; panels without series are left out (one that
    says so is drawn when all are empty).
    """
    panels = [p for p in panels if p.get("series")] or list(panels[:1])
    n = max(len(panels), 1)
    fig = Figure(figsize=(max(4.6 * n, 6.0), 4.4))
    axes = fig.subplots(1, n, squeeze=False, sharey=True)
    for ax, panel in zip(axes[0], panels):
        series = panel.get("series") or []
        cmap = matplotlib.colormaps["plasma"]
        for i, s in enumerate(series):
            color = cmap(i / max(len(series) - 1, 1) * 0.85)
            ax.plot(s["x"], s["y"], "-o", color=color, ms=5, label=s["label"])
            for x, y, a in zip(s["x"], s["y"], s.get("annotations") or []):
                ax.annotate(str(a), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7, color=color)
        if not series:
            ax.text(0.5, 0.5, f"no points vary {panel['title']}", ha="center", va="center", transform=ax.transAxes)
        _log_axes(ax, xlabel, ylabel if ax is axes[0][0] else "")
        ax.set_title(f"scaling {panel['title']}")
        if series:
            ax.legend(fontsize=7, loc="best", title=panel.get("legend_title"), title_fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, out_stem)



def plot_data_size(series: Sequence[dict], gaps: Sequence[dict], out_stem: str, *, title: str = "",
                   crossover: float | None = None, longer: Sequence[dict] = (), longer_gaps: Sequence[dict] = (),
                   xlabel: str = "training examples (class-balanced subset)",
                   ylabel: str = "test error (log scale)") -> list[str]:
    """Error vs training-set size (log-log) with seed error bars, and the ViT − ResNet gap (ViT paper Fig. 3).

    ``series``: ``[{"label", "family", "x": sizes, "mean": [...], "std": [...] (None for one seed),
    "seeds": [...]}]``, one line per model; the larger model of a family is drawn dashed.
    ``gaps``: ``[{"label", "x", "mean", "std"}]``, ViT − ResNet error in points per size; > 0:
    ResNet ahead. ``crossover`` marks the size where the first gap changes sign. ``longer``
    (``[{"family", "x", "y"}]``) and ``longer_gaps`` (``[{"x", "y"}]``) are longer-training runs,
    drawn as crosses.
    """
    fig = Figure(figsize=(12.5, 4.8))
    ax, gx = fig.subplots(1, 2, gridspec_kw=dict(width_ratios=[1.25, 1]))
    drawn: dict[str, int] = {}
    for s in series:
        style = dict(FAMILY_STYLE.get(s["family"], dict(color="gray", marker="^", label=s["family"])))
        k = drawn.get(s["family"], 0)
        drawn[s["family"]] = k + 1
        std = [0.0 if v is None else v for v in s["std"]]
        ax.errorbar(s["x"], s["mean"], yerr=std, color=style["color"], marker=style["marker"], ms=5, capsize=3,
                    lw=1.4, ls="-" if k == 0 else "--", mfc=style["color"] if k == 0 else "white",
                    label=s["label"])
        for x, y, n in zip(s["x"], s["mean"], s["seeds"]):
            if n > 1 and s is series[0]:
                ax.annotate(f"{n} seeds", (x, y), textcoords="offset points", xytext=(4, 6), fontsize=7,
                            color="gray")
    for fam in sorted({p["family"] for p in longer}):
        pts = [p for p in longer if p["family"] == fam]
        style = FAMILY_STYLE.get(fam, dict(color="gray", label=fam))
        ax.scatter([p["x"] for p in pts], [p["y"] for p in pts], marker="x", s=40, color=style["color"],
                   label=f"{style['label']}, twice the steps (seed 0)")
    _log_axes(ax, xlabel, ylabel)
    ax.set_title("test error vs training-set size (mean ± std over seeds)")
    ax.legend(fontsize=8, loc="upper right")
    cmap = matplotlib.colormaps["viridis"]
    for i, g in enumerate(gaps):
        color = "black" if i == 0 else cmap(0.25 + 0.5 * i / max(len(gaps) - 1, 1))
        std = [0.0 if v is None else 100 * v for v in g["std"]]
        gx.errorbar(g["x"], [100 * v for v in g["mean"]], yerr=std, color=color, marker="o", ms=5, capsize=3,
                    lw=1.8 if i == 0 else 1.1, ls="-" if i == 0 else ":", label=g["label"])
    if longer_gaps:
        gx.scatter([g["x"] for g in longer_gaps], [100 * g["y"] for g in longer_gaps], marker="x", s=50, color="red",
                   zorder=5, label="best ViT − best ResNet, twice the steps (seed 0)")
    gx.axhline(0, color="gray", lw=0.8)
    if crossover is not None:
        gx.axvline(crossover, color="red", lw=1, ls="--", label=f"crossover ≈ {crossover:,.0f} examples")
    gx.set_xscale("log")
    gx.set_xlabel(xlabel)
    gx.set_ylabel("ViT − ResNet test error (points; > 0: ResNet ahead)")
    gx.grid(True, which="major", alpha=0.4)
    gx.grid(True, which="minor", alpha=0.15)
    gx.set_title("the gap")
    gx.legend(fontsize=8, loc="best")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, out_stem)
