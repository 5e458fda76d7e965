"""Plotting helpers the figures share: a line per setting (its seeds as a mean with a
min-max band, crosses where a member diverged), colours and styles per line key, hollow
markers for lines that coincide, one legend per figure beside the top-right panel and a
caption under the panels."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable

import numpy as np
import pandas as pd

SYMBOL = {"lr": "η", "batch_size": "B", "weight_decay": "λ", "momentum": "μ", "dataset": "",
          "loss": "", "model": "", "epochs": "epochs"}


def fmt(key: str, value: Any) -> str:
    if isinstance(value, float):
        text = f"{value:g}"
    else:
        text = str(value)
    sym = SYMBOL.get(key, key)
    return f"{sym}={text}" if sym else text


@dataclass
class Line:
    key: tuple                  # values of the line keys
    label: str
    members: list[Any]          # one RunData per seed

    @property
    def diverged(self) -> list[Any]:
        return [m for m in self.members if m.diverged_epoch is not None]


def stack(series: list[pd.Series]) -> pd.DataFrame:
    return pd.concat(series, axis=1) if series else pd.DataFrame()


def plot_series(ax, line: Line, series: list[pd.Series], color, style="-", label=True,
                 positive=False, **kw):
    """Mean over seeds with a min-max band; crosses where a member diverged. Further
    keywords (a marker of the line's own) go to the mean's line."""
    if "marker" in kw:
        style = "".join(c for c in style if c in "-.:") or "-"
    frame = stack([s.astype(float) for s in series])
    if positive:
        frame = frame.where(frame > 0)
    # eval metrics exist only at logged epochs (log_every > 1): join those points
    frame = frame.dropna(how="all")
    if frame.empty or frame.notna().sum().sum() == 0:
        ax.plot([], [], style, color=color, label=line.label if label else None, **kw)
        for _ in line.diverged:
            ax.plot([], [], "x", color=color)
        return
    mean = frame.mean(axis=1, skipna=True)
    if "marker" in kw:
        kw.setdefault("markevery", max(1, len(mean) // 10))
    ax.plot(mean.index, mean.values, style, color=color, lw=1.4, label=line.label if label else None,
            **kw)
    if frame.shape[1] > 1:
        ax.fill_between(mean.index, frame.min(axis=1).values, frame.max(axis=1).values,
                        color=color, alpha=0.15, lw=0)
    for m, s in zip(line.members, series):
        if m.diverged_epoch is not None:
            fin = s.astype(float)
            fin = fin[np.isfinite(fin) & ((fin > 0) if positive else True)]
            if len(fin):
                ax.plot([fin.index[-1]], [fin.values[-1]], "x", color=color, ms=9, mew=2)


def palette(n: int):
    from matplotlib import colormaps
    cmap = colormaps["viridis"]
    return [cmap(x) for x in (np.linspace(0.0, 0.9, n) if n > 1 else [0.3])]


def line_colors(lines: Iterable[Line]) -> dict:
    values = sorted({ln.key[0] for ln in lines}, key=lambda v: (str(type(v)), v))
    return dict(zip(values, palette(len(values))))


STYLES = ["-", "--", ":", "-."]
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "<", ">"]


def line_styles(lines: Iterable[Line]) -> dict:
    rest = sorted({ln.key[1:] for ln in lines}, key=str)
    return {r: STYLES[i % len(STYLES)] for i, r in enumerate(rest)}


def mean(series: list[pd.Series]) -> pd.Series:
    frame = stack([s.astype(float) for s in series]).dropna(how="all")
    return frame.mean(axis=1, skipna=True) if not frame.empty else pd.Series(dtype=float)


def short(label: str) -> str:
    """A line's label without its seed count and notes ("B=32 (2 seeds)" -> "B=32")."""
    return label.split(" (")[0].split(" —")[0]


def mark_coincident(panels: dict[Any, list[Line]], series_of: Callable[[Any, Line], list[pd.Series]],
                    panel: str | None = None) -> dict[str, dict]:
    """Lines drawn exactly over another's values in some panel would be invisible: give
    each of them a hollow marker of its own shape and size (drawn over one another they
    all show), and say in its label which lines it coincides with. `series_of(pv, line)`:
    the line's series (one per seed) in panel `pv`; `panel` names the panels' key for the
    note. Labels are changed in place, alike in every panel; returns the plot keywords
    per (new) label."""
    notes: dict[str, list[str]] = {}
    for pv, lines in panels.items():
        means = [(ln, mean(series_of(pv, ln))) for ln in lines]
        for ln, m in means:
            same = [o for o, om in means if o is not ln and len(m) and m.index.equals(om.index)
                    and np.allclose(m.to_numpy(float), om.to_numpy(float), equal_nan=True)]
            if same:
                where = f" at {fmt(panel, pv)}" if panel and len(panels) > 1 else ""
                note = "coincides with " + " and ".join(short(o.label) for o in same) + where
                if note not in notes.setdefault(ln.label, []):
                    notes[ln.label].append(note)
    involved = list(notes)
    kws = {}
    for j, label in enumerate(involved):
        new = f"{label} — {'; '.join(notes[label])}"
        for ln in (ln for lines in panels.values() for ln in lines if ln.label == label):
            ln.label = new
        kws[new] = dict(marker=MARKERS[j % len(MARKERS)], ms=max(4.0, 11.0 - 2.5 * j),
                        mfc="none", mew=1.3)
    return kws


def legend(fig) -> None:
    """One legend for the figure, each label once whichever panel drew it, to the right
    of the top-right panel: below the figure's title, in room the layout reserves."""
    handles: dict[str, Any] = {}
    for ax in fig.axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    if not handles:
        return
    grid = [ax for ax in fig.axes if ax.get_subplotspec() is not None]
    anchor = min(grid, key=lambda ax: (ax.get_subplotspec().rowspan.start,
                                       -ax.get_subplotspec().colspan.stop))
    anchor.legend(list(handles.values()), list(handles), loc="upper left", bbox_to_anchor=(1.02, 1.0),
                  borderaxespad=0.0, fontsize=8)


def figure_legend(fig):
    """The figure's one legend (see `legend`), None when it has none."""
    legends = [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None] + list(fig.legends)
    return legends[0] if legends else None


def caption(fig, text: str) -> None:
    """A note under the figure, in room the layout reserves below the axes."""
    fig.supxlabel(text, fontsize=8)
