"""Figures T1 and T2: the theory's checks drawn from the runs' lemmas.parquet and
theory.parquet (rankbias.train.theory), in the layout of ``rankbias.analysis.figures``: a colour per
line (and in figT2 a marker per weight decay), several seeds as their mean with a
min-max band, one legend for the figure, notes in a caption under the panels."""
from __future__ import annotations

import numpy as np
import pandas as pd

from rankbias.analysis.plotting import Line, caption, legend, mark_coincident, plot_series
from rankbias.store.theory_tables import LEMMAS_FILE, THEORY_FILE

KINDS = ("lemmas", "theorem1")
STAGE_STYLE = {"fresh": "-", "trained": "--"}


def _log_scale(ax, axis: str = "y", base: float = 10) -> None:
    """Log scale where the axis has positive data to show (a figure without its runs'
    theory tables yet still draws)."""
    data = [ln.get_ydata() if axis == "y" else ln.get_xdata() for ln in ax.get_lines()]
    if any(np.any(np.asarray(d, dtype=float) > 0) for d in data):
        (ax.set_yscale if axis == "y" else ax.set_xscale)("log", base=base)


def _table(member, name: str) -> pd.DataFrame:
    df = member.run.table(name)
    return df if df is not None else pd.DataFrame()


def draw(fig, kind: str, lines: list[Line], colors: dict, markers: dict | None = None,
         marker_by: str = "") -> None:
    """Draw `kind` into `fig`: a colour per line's first key (`colors`) and, in figT2, a
    marker per the rest of its key (`markers`, by ``line.key[1:]``; `marker_by` names
    those keys, e.g. "λ", for the caption)."""
    if kind == "lemmas":
        _lemmas(fig, lines, colors)
    else:
        _theorem1(fig, lines, colors, markers or {}, marker_by)
    legend(fig)


def _lemmas(fig, lines: list[Line], colors: dict) -> None:
    ax1, ax2 = fig.subplots(1, 2)
    names: dict[int, str] = {}
    widest = 0
    drawn: dict[tuple, list[pd.Series]] = {}       # (panel, stage, line) -> a series per seed
    for ln in lines:
        tables = [_table(m, LEMMAS_FILE) for m in ln.members]
        for stage in STAGE_STYLE:
            one, batch = [], []
            for t in tables:
                t = t[t["stage"] == stage] if len(t) else t
                if not len(t):
                    one.append(pd.Series(dtype=float))
                    batch.append(pd.Series(dtype=float))
                    continue
                l1 = t[t["lemma"] == 1]
                one.append(l1.groupby("index")["rank"].max().astype(float))
                names.update(dict(zip(l1["index"].astype(int), l1["layer"])))
                l2 = t[(t["lemma"] == 2) & (t["kind"] == "hidden")]
                batch.append(l2.groupby("batch_size")["rank"].max().astype(float))
                widest = max([widest, *l2["max_rank"].astype(int)])
            drawn[1, stage, id(ln)], drawn[2, stage, id(ln)] = one, batch
    # networks without BN all have rank 1 in Lemma 1: lines on one another, marked
    kws = mark_coincident({(ax, stage): lines for ax in (1, 2) for stage in STAGE_STYLE},
                          lambda pv, ln: drawn[pv[0], pv[1], id(ln)])
    for ln in lines:
        c, kw = colors[ln.key[0]], kws.get(ln.label, {})
        for stage, style in STAGE_STYLE.items():
            first = stage == "fresh"
            one, batch = drawn[1, stage, id(ln)], drawn[2, stage, id(ln)]
            if any(len(s) for s in one):
                plot_series(ax1, ln, one, c, style + "o", label=first, **kw)
            plot_series(ax2, ln, batch, c, style + "o", label=first and not any(len(s) for s in one), **kw)
    ax1.axhline(1, color="k", ls=":", lw=1.2, label="bound: rank ≤ 1")
    if names:
        ax1.set_xticks(sorted(names), [names[i] for i in sorted(names)], rotation=45, ha="right", fontsize=8)
    ax1.set_ylim(-0.1, 3)
    ax1.set_xlabel("weight matrix")
    ax1.set_ylabel("rank (max over samples and outputs)")
    ax1.set_title("(a) Lemma 1: per-sample gradients ∂f_c(x)/∂W and ∇_W ℓ(x), no BN", fontsize=10)
    bs = sorted({b for ln in lines for m in ln.members for b in _table(m, LEMMAS_FILE).get("batch_size", [])})
    if bs:
        b = np.array(bs, dtype=float)
        ax2.plot(b, b, "k:", lw=1.2, label="bound: rank ≤ B")
        if widest:
            ax2.axhline(widest, color="0.6", ls="-.", lw=1, label=f"largest possible rank ({widest})")
    _log_scale(ax2, "x", 2)
    _log_scale(ax2, "y", 2)
    ax2.set_xlabel("batch size B")
    ax2.set_ylabel("rank of ∇_W L_S (max over hidden matrices)")
    ax2.set_title("(b) Lemma 2: batch-loss gradient, with and without BN", fontsize=10)
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    caption(fig, "solid: freshly initialised network; dashed: after training")


def _own_size(t: pd.DataFrame, batch_size: int) -> pd.DataFrame:
    """The rows of the run's own B when it was measured, else of its smallest B*."""
    if not len(t):
        return t
    b = batch_size if (t["batch_size"] == batch_size).any() else int(t["batch_size"].min())
    return t[(t["batch_size"] == b) & (t["kind"] == "hidden")]


def _theorem1(fig, lines: list[Line], colors: dict, markers: dict, marker_by: str) -> None:
    ax1, ax2 = fig.subplots(1, 2)
    for ln in lines:
        c = colors[ln.key[0]]
        mk = {"marker": markers.get(ln.key[1:], "o"), "ms": 5, "mfc": "none", "mew": 1.2}
        left, right, ratio = [], [], []
        for m in ln.members:
            t = _own_size(_table(m, THEORY_FILE), int(m.spec["batch_size"]))
            g = t.groupby("epoch") if len(t) else None
            left.append(g["left"].mean() if g is not None else pd.Series(dtype=float))
            right.append(g["right"].mean() if g is not None else pd.Series(dtype=float))
            ratio.append(g["ratio"].median() if g is not None else pd.Series(dtype=float))
        plot_series(ax1, ln, left, c, "-", positive=True, **mk)
        plot_series(ax1, ln, right, c, "--", label=False, positive=True, **mk)
        plot_series(ax2, ln, ratio, c, "-", label=False, positive=True, **mk)
    _log_scale(ax1)
    ax1.set_ylabel("mean over hidden matrices")
    ax1.set_title("(a) left(B*) = ‖W − W_B*‖_F (solid) ≤ right(B*) = min_S ‖G_S‖_F / λ (dashed)", fontsize=10)
    ax2.axhline(1, color="k", ls=":", lw=1.2, label="left = right (the bound)")
    _log_scale(ax2)
    ax2.set_ylabel("left / right, median over hidden matrices")
    ax2.set_title("(b) tightness of Theorem 1", fontsize=10)
    for ax in (ax1, ax2):
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    styles = f"colour: B; marker: {marker_by} (see the legend). " if len(markers) > 1 and marker_by else ""
    caption(fig, styles + "B* = the run's own batch size; λ = torch's weight_decay (the paper's 2λ); "
            "S: the sampled batches of size B*")
